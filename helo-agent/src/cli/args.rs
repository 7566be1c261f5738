//! The command line's definitions (clap derive), apart from what runs them (`cli/mod.rs`
//! dispatches): the subcommands and flags, their help, and the values flags take.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{AttachMode, Overrides, ProxyProtocol};

#[derive(Debug, Parser)]
#[command(
    name = "helo-agent",
    version,
    about = "Protects a mail gateway from spam bots by their HELO, and bans them in the kernel with XDP",
    long_about = "Protects a mail gateway from spam bots by their SMTP HELO/EHLO name. Bans are kept \
                  in pinned BPF maps and enforced by an XDP program on the ingress interface: a banned \
                  source's new connections to the SMTP ports are dropped until the ban expires.\n\n\
                  Every command reads one config: --config FILE, else the file HELO_FILTER_CONFIG \
                  names, else the installed /etc/helo-filter/helo-filter.toml where it exists, else \
                  the embedded defaults (see helo-filter.example.toml); --no-config asks for the \
                  embedded defaults whatever is installed."
)]
pub struct Cli {
    /// Config file (TOML). Default: the file the HELO_FILTER_CONFIG environment variable names,
    /// else /etc/helo-filter/helo-filter.toml where it exists, else the embedded defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read no config file: the embedded defaults, even where HELO_FILTER_CONFIG is set or
    /// /etc/helo-filter/helo-filter.toml exists (`cargo xtask run` runs the agent so).
    #[arg(long, global = true, conflicts_with = "config")]
    pub no_config: bool,
    /// Directory of the pinned maps; overrides xdp.pin_dir.
    #[arg(long, global = true, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the SMTP proxy (proxy.listeners), the Postfix policy service (policy.listeners) and
    /// the XDP ban filter until SIGINT or SIGTERM (needs root).
    Run {
        /// Interface to guard; overrides xdp.interface. Default: the default route's.
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
        /// XDP attach mode; overrides xdp.mode.
        #[arg(long, value_enum)]
        xdp_mode: Option<AttachMode>,
        /// Listen for SMTP here (repeatable); replaces proxy.listeners. Default: 0.0.0.0:25, [::]:25.
        /// [::]:25 alone takes no IPv4 (the agent sets IPV6_V6ONLY): list 0.0.0.0:25 too. Not
        /// 465: SMTPS clients start TLS at once; let the MTA listen there.
        #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
        listen: Vec<std::net::SocketAddr>,
        /// The MTA to hand sessions to; overrides proxy.upstream. Default: 127.0.0.1:10025.
        #[arg(long, value_name = "ADDR:PORT")]
        upstream: Option<std::net::SocketAddr>,
        /// How the MTA learns the real client; overrides proxy.proxy_protocol. Default: v2.
        #[arg(long, value_enum)]
        proxy_protocol: Option<ProxyProtocol>,
    },
    /// Ban an address: its new connections to the guarded ports are dropped until the ban
    /// expires.
    Ban {
        /// IPv4 or IPv6 address, or a prefix: IPv4 /24 to /32 (192.0.2.0/24), IPv6 /48 to /128
        /// (2001:db8:1:2::/64, 2001:db8:7::/48).
        target: String,
        /// How long: 30s, 10m, 1h, 2d, 1w, 1h30m, at most 3650d (about ten years); or
        /// "forever". Default: bans.default_ttl.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Why, shown by `list`: at most 64 bytes of UTF-8 (a longer one is refused).
        #[arg(long, value_name = "TEXT", default_value = "manual")]
        reason: String,
        /// Ban the /64 around an IPv6 address instead of the one host.
        #[arg(long)]
        prefix: bool,
    },
    /// Lift a ban. It also forgets the address's offence history (its next rule ban starts again at
    /// the rule's TTL). With a fleet, the running agent lifts it on every gateway. With no agent
    /// running, the ban is also removed from the snapshot (on this gateway only).
    Unban {
        /// The address or prefix as it was banned (as `list` shows it).
        target: String,
        /// Lift the /64 ban around an IPv6 address.
        #[arg(long)]
        prefix: bool,
    },
    /// List bans in force, by address (IPv4 first, then IPv6, numerically): address, remaining
    /// TTL, hits (connection attempts refused), reason; with a fleet, also the gateway that
    /// made each ban (`here` or its node name).
    List {
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the steering passes in force (`[steer]`): clients the kernel sends straight to the
    /// MTA's own listener, unjudged by the proxy, until the pass expires (`steer.pass_ttl`),
    /// by address: remaining time, hits (connections sent straight). A ban removes a pass.
    Passes {
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
        /// Remove the pass of this client, or of every client in this network (2001:db8::/64):
        /// its next connection is judged again. With no agent running, also from the snapshot.
        #[arg(long, value_name = "ADDRESS|NETWORK", conflicts_with = "json")]
        remove: Option<String>,
    },
    /// Explain what the rules decide for a HELO, as the agent would (like `postmap -q`); the
    /// exit status says the verdict.
    #[command(after_help = CHECK_EXIT_STATUS)]
    Check {
        /// The HELO/EHLO argument, as a client would send it.
        helo: String,
        /// The client's address (literal and dynamic-name checks need it).
        #[arg(long, value_name = "IP")]
        client: Option<std::net::IpAddr>,
        /// An earlier HELO of the same session (repeatable, oldest first).
        #[arg(long, value_name = "HELO")]
        previous: Vec<String>,
        /// As on a listener with check_helo = false (submission).
        #[arg(long)]
        exempt_listener: bool,
        /// The client spoke before the greeting was complete (failed the pregreet test, which
        /// only the proxy runs, and only with proxy.greeting = "own").
        #[arg(long)]
        pregreeted: bool,
        /// Skip the DNS lookups the agent makes (the HELO name's A, AAAA and MX records; the
        /// client's forward-confirmed reverse name, with --client): the heuristics then enforce
        /// against everyone, and names under a big provider are not judged.
        #[arg(long)]
        no_dns: bool,
        /// Judge HELO reuse as if N (1 or more) distinct client networks (/24, /64; this
        /// client's included) had used the name within reuse.window. `check` keeps no count of its
        /// own; without this flag helo_reuse is not judged (the running agent's counts are in
        /// `helo-agent tophelos`).
        #[arg(long, value_name = "N", value_parser = at_least_one())]
        networks: Option<usize>,
        /// One JSON object: verdict, rule, reason, entry, ttl, logged, dns, networks.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config (and the rule files it names) without running anything. Every rule
    /// entry that does not load is listed, with its file and line; then the exit status is 1.
    CheckConfig {
        /// The config to check; default: the one every command reads (--config,
        /// HELO_FILTER_CONFIG, else /etc/helo-filter/helo-filter.toml where it exists, else the
        /// embedded defaults).
        file: Option<PathBuf>,
    },
    /// XDP verdict counters, summed over CPUs.
    Stats {
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Make the running agent re-read its config and rule files (as SIGHUP does). A config
    /// that does not validate is refused with the reason; the one in force keeps running.
    Reload,
    /// HELO names the running agent has seen: sessions, distinct clients, rejections by rule,
    /// and the client networks that used each lately (HELO reuse; `*` marks a reused name).
    ///
    /// NETWORKS is the reuse count: distinct client networks (/24, /64) that used the name
    /// within reuse.window up to now, whatever --since says, without the clients whose
    /// reverse DNS confirms the name or the sessions another rule decided. A name with
    /// reuse.clients networks or more is reused (checks.helo_reuse).
    Tophelos {
        /// How far back: 10m, 1h, 1d (at most agent.report_window).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        since: String,
        /// Show this many names.
        #[arg(long, default_value_t = 30)]
        limit: usize,
        /// One JSON array, for scripts.
        #[arg(long, conflicts_with = "suggest")]
        json: bool,
        /// Instead of the table: qmail badhelo lines (anchored, escaped regexes) for every name
        /// reused now, under a comment header, for an admin to review and copy into
        /// rules.badhelo_file. Nothing is applied. --since and --limit do not apply: the
        /// names are those reused within reuse.window.
        #[arg(long)]
        suggest: bool,
    },
    /// Live view of the running agent in the terminal, refreshed every second (q quits).
    ///
    /// Sessions per second and in total by verdict (pass, reject, ban, no HELO), bans added,
    /// expired per second, waiting and in force, the kernel's XDP drops per second, the top
    /// HELOs and rules of the last --since, the open sessions, the policy service and the
    /// fleet. q, Esc or Ctrl-C quits. Made for 80x24; over ssh, use `ssh -t`. Needs the
    /// running agent's control socket (root); without an agent it says which socket it tried
    /// and exits 1.
    Top {
        /// How far back the top HELOs and rules look: 1m, 5m, 1h (at most agent.report_window).
        #[arg(long, value_name = "DURATION", default_value = "5m")]
        since: String,
    },
    /// Remove the XDP program from the interface and the steering program from the network
    /// namespace: they stay attached after the agent exits (so bans and steering hold through
    /// restarts) until this removes their pinned links.
    Detach {
        /// Also remove the pinned ban and pass maps and the counters (the bans and passes are
        /// lost; the snapshot file stays and is restored at the next start).
        #[arg(long)]
        maps: bool,
    },
    /// Write the man pages or the shell completions into a directory (`cargo xtask package`
    /// calls this).
    #[command(hide = true)]
    Generate {
        what: Generated,
        /// The directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// The installed config (the Debian package's conffile): every command's default where it
/// exists, as postconf and fail2ban-client read theirs.
pub const INSTALLED_CONFIG: &str = "/etc/helo-filter/helo-filter.toml";

impl Cli {
    /// The config file every command reads; `None`: the embedded defaults.
    pub fn config_path(&self) -> Option<PathBuf> {
        let env = std::env::var_os("HELO_FILTER_CONFIG");
        config_path(self.config.clone(), env, self.no_config, Path::new(INSTALLED_CONFIG))
    }

    /// The flags that replace config keys, for [`Config::load_with`]: `--pin-dir` for every
    /// command, and `run`'s own. They are validated with the file, and refused by their name.
    pub fn overrides(&self) -> Overrides {
        let mut overrides = Overrides { pin_dir: self.pin_dir.clone(), ..Overrides::default() };
        if let CliCommand::Run { iface, xdp_mode, listen, upstream, proxy_protocol } = &self.command
        {
            overrides.interface = iface.clone();
            overrides.mode = *xdp_mode;
            overrides.listen = listen.clone();
            overrides.upstream = *upstream;
            overrides.proxy_protocol = *proxy_protocol;
        }
        overrides
    }
}

/// Which config a command reads: `--no-config` the embedded defaults; else `--config`; else
/// the file `HELO_FILTER_CONFIG` names (when set and not empty); else `installed` where it
/// exists; else the embedded defaults (`None`).
pub fn config_path(
    flag: Option<PathBuf>,
    env: Option<OsString>,
    no_config: bool,
    installed: &Path,
) -> Option<PathBuf> {
    if no_config {
        return None;
    }
    flag.or_else(|| env.filter(|e| !e.is_empty()).map(PathBuf::from))
        .or_else(|| installed.exists().then(|| installed.to_owned()))
}

/// `run --xdp-mode`: the values and their help. The mode itself is a config value (no clap in
/// `config`).
impl ValueEnum for AttachMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[AttachMode::Auto, AttachMode::Native, AttachMode::Skb]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            AttachMode::Auto => PossibleValue::new("auto").help(
                "Native mode, falling back to generic mode (with a warning) where the driver has \
                 no XDP",
            ),
            AttachMode::Native => PossibleValue::new("native")
                .help("Native (driver) mode only: fails where the driver has no XDP support"),
            AttachMode::Skb => {
                PossibleValue::new("skb").help("Generic (skb) mode: works on any interface, slower")
            }
        })
    }
}

/// `run --proxy-protocol`: the values and their help, as for [`AttachMode`].
impl ValueEnum for ProxyProtocol {
    fn value_variants<'a>() -> &'a [Self] {
        &[ProxyProtocol::None, ProxyProtocol::V1, ProxyProtocol::V2, ProxyProtocol::Transparent]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            ProxyProtocol::None => {
                PossibleValue::new("none").help("No header: the MTA sees the proxy's address")
            }
            ProxyProtocol::V1 => PossibleValue::new("v1"),
            ProxyProtocol::V2 => PossibleValue::new("v2"),
            ProxyProtocol::Transparent => PossibleValue::new("transparent").help(
                "No header: the connection to the MTA comes from the client's own address \
                 (IP_TRANSPARENT), for MTAs that cannot take PROXY headers. IP_TRANSPARENT needs \
                 CAP_NET_RAW (or CAP_NET_ADMIN; the agent keeps CAP_NET_RAW after dropping \
                 privileges) and a route that brings the MTA's replies back to this host (see \
                 docs/doors.md)",
            ),
        })
    }
}

/// `check`'s exit status for a reject verdict.
pub const EXIT_REJECT: u8 = 3;

/// `check`'s exit status for a ban verdict.
pub const EXIT_BAN: u8 = 4;

const CHECK_EXIT_STATUS: &str = "Exit status, for scripts (with or without --json):
  0  pass
  3  reject (at HELO or at RCPT TO, 4xx or 5xx)
  4  ban (rejected, and the client would be banned)
  1  error: the config or a rule file does not load
  2  usage: a missing or malformed argument";

fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    let address = text.parse().map_err(|e| format!("{e}: write 0.0.0.0:25 or [::]:25"))?;
    crate::config::check_listener(address)?;
    Ok(address)
}

/// `check --networks`: the count includes this client's own network, so it is 1 or more.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// What `helo-agent generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    /// helo-agent.8, helo-agent-<subcommand>.8 and helo-filter.toml.5 (roff).
    Man,
    /// helo-agent.bash, _helo-agent (zsh) and helo-agent.fish.
    Completions,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 30: the installed config is every command's default where it exists;
    /// `--config` and HELO_FILTER_CONFIG win over it, `--no-config` over everything.
    #[test]
    fn the_installed_config_is_the_default_where_it_exists() {
        let dir = std::env::temp_dir().join(format!("helo-installed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let installed = dir.join("helo-filter.toml");
        let flag = || Some(PathBuf::from("/srv/flag.toml"));
        let env = || Some(OsString::from("/srv/env.toml"));
        let path = |flag, env, no_config| config_path(flag, env, no_config, &installed);
        assert_eq!(path(None, None, false), None, "nothing installed: the embedded defaults");
        std::fs::write(&installed, "").unwrap();
        assert_eq!(path(None, None, false), Some(installed.clone()), "installed: the default");
        assert_eq!(path(None, Some(OsString::new()), false), Some(installed.clone()), "empty env");
        assert_eq!(path(None, env(), false), env().map(PathBuf::from), "the environment wins");
        assert_eq!(path(flag(), env(), false), flag(), "the flag wins over both");
        assert_eq!(path(None, env(), true), None, "--no-config: the embedded defaults");
        assert_eq!(path(None, None, true), None);
        std::fs::remove_dir_all(&dir).unwrap();
        use clap::Parser as _;
        let both = Cli::try_parse_from(["helo-agent", "--config", "a", "--no-config", "list"]);
        assert!(both.is_err(), "--config and --no-config conflict");
        let cli = Cli::try_parse_from(["helo-agent", "list", "--no-config"]).unwrap();
        assert_eq!(cli.config_path(), None, "a global flag, after the command too");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
    /// `--xdp-mode` and `--proxy-protocol` take the values the config file takes.
    #[test]
    fn flag_values_are_spelled_as_in_the_config_file() {
        fn same<T: ValueEnum + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>() {
            use serde::de::IntoDeserializer as _;
            for value in T::value_variants() {
                let name = value.to_possible_value().expect("not hidden").get_name().to_owned();
                let deserializer: serde::de::value::StringDeserializer<serde::de::value::Error> =
                    name.clone().into_deserializer();
                assert_eq!(&T::deserialize(deserializer).expect(&name), value, "{name}");
            }
        }
        same::<AttachMode>();
        same::<ProxyProtocol>();
    }
}
