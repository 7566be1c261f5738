//! Command line: `helo-agent run | ban | unban | list | check | check-config | stats | reload |
//! tophelos | top | detach` (and the hidden `generate`, for the package). `ban`, `unban`, `list` and `stats` go through the running agent's control
//! socket when there is one, else to the pinned maps; `reload`, `tophelos` and `top` need the agent. Parses arguments, runs the
//! command, prints human or `--json` output; `check` also answers by its exit status. Errors
//! bubble up as `anyhow` with their reason.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use helo_common::REASON_TEXT_LEN;

use crate::addr::BanTarget;
use crate::blocklist::{BanEntry, Blocklist, MAX_TTL, Ttl};
use crate::config::{AttachMode, Config, ConfigError, GreetingMode, Overrides, ProxyProtocol};
use crate::control::{Answer, ClientError, Envelope, Request, XdpStats};
use crate::ebpf::PinnedMaps;
use crate::judge::{Heard, Hearing, Law, ReuseSeen};
use crate::report::HeloRow;
use crate::rules::{Action, RejectAt, Verdict};

#[derive(Debug, Parser)]
#[command(
    name = "helo-agent",
    version,
    about = "Protects a mail gateway from spam bots by their HELO, and bans them in the kernel with XDP",
    long_about = "Protects a mail gateway from spam bots by their SMTP HELO/EHLO name. Bans are kept \
                  in pinned BPF maps and enforced by an XDP program on the ingress interface: a banned \
                  source's new connections to the SMTP ports are dropped until the ban expires.\n\n\
                  With no --config the agent runs on embedded defaults (see helo-filter.example.toml)."
)]
pub struct Cli {
    /// Config file (TOML). Default: embedded defaults.
    #[arg(long, global = true, env = "HELO_FILTER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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
        /// IPv4 or IPv6 address, or an IPv6 /64 (2001:db8:1:2::/64).
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
        /// The address or IPv6 /64 as it was banned.
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
        /// Skip the DNS lookups the agent makes for the DNS checks (the HELO name's A, AAAA
        /// and MX records; the client's forward-confirmed reverse name, with --client).
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
        /// The config to check; default: --config, else the embedded defaults.
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
    /// expired and capped per second and in force, the kernel's XDP drops per second, the top
    /// HELOs and rules of the last --since, the open sessions, the policy service and the
    /// fleet. q, Esc or Ctrl-C quits. Made for 80x24; over ssh, use `ssh -t`. Needs the
    /// running agent's control socket (root); without an agent it says which socket it tried
    /// and exits 1.
    Top {
        /// How far back the top HELOs and rules look: 1m, 5m, 1h (at most agent.report_window).
        #[arg(long, value_name = "DURATION", default_value = "5m")]
        since: String,
    },
    /// Remove the XDP program from the interface: it stays attached after the agent exits
    /// (so bans hold through restarts) until this removes its pinned link.
    Detach {
        /// Also remove the pinned ban maps and counters (the bans are lost; the snapshot file
        /// stays and is restored at the next start).
        #[arg(long)]
        maps: bool,
    },
    /// Write the man pages or the shell completions into a directory (`cargo xtask package`
    /// calls this).
    #[command(hide = true)]
    Generate {
        what: crate::generate::Generated,
        /// The directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

impl Cli {
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
                 the README)",
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

/// The error and its causes, each once, for `main` to print. The agent's error types put their
/// cause in their own message (the logs print only that) and also return it as `source()`, so
/// printing the chain as anyhow's `{:#}` does shows an OS error twice: `cannot listen on
/// [::]:25: Address already in use (os error 98): Address already in use (os error 98)`. A cause whose text is
/// already shown is left out here, for every error type at once.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Runs the command; the exit status on success (`check` answers by it, see
/// [`CHECK_EXIT_STATUS`]). `main` prints an error with [`describe`] and exits 1.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = cli.overrides();
    let Cli { config: path, command, .. } = cli;
    let path = path.as_deref();
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match command {
        CliCommand::Run { .. } => done(run_agent(load(path, &overrides)?, overrides)),
        CliCommand::Ban { target, ttl, reason, prefix } => {
            let config = load(path, &overrides)?;
            done(ban(&config, &target, ttl.as_deref(), &reason, prefix))
        }
        CliCommand::Unban { target, prefix } => {
            done(unban(&load(path, &overrides)?, &target, prefix))
        }
        CliCommand::List { json } => done(list(&load(path, &overrides)?, json)),
        CliCommand::Check {
            helo,
            client,
            previous,
            exempt_listener,
            pregreeted,
            no_dns,
            networks,
            json,
        } => {
            let config = Config::load(path)?;
            let session =
                Session { client, previous: &previous, exempt_listener, pregreeted, networks };
            check(&config, &helo, &session, !no_dns, json)
        }
        CliCommand::CheckConfig { file } => done(check_config(file.as_deref().or(path))),
        CliCommand::Stats { json } => done(stats(&load(path, &overrides)?, json)),
        CliCommand::Reload => done(reload(path, &overrides)),
        CliCommand::Tophelos { since, limit, json, suggest: false } => {
            done(tophelos(&load(path, &overrides)?, &since, limit, json))
        }
        CliCommand::Tophelos { suggest: true, .. } => done(suggest(&load(path, &overrides)?)),
        CliCommand::Top { since } => done(top(&load(path, &overrides)?, &since)),
        CliCommand::Detach { maps } => done(detach(&load(path, &overrides)?, maps)),
        CliCommand::Generate { what, out } => {
            for file in crate::generate::write(what, &out)
                .map_err(|e| anyhow::anyhow!("cannot write into {}: {e}", out.display()))?
            {
                println!("{}", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The config at `path` (or the embedded defaults), with the command line's flags in force.
fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
    Ok(Config::load_with(path, overrides)?)
}

/// `check`: prints the verdict, and answers by the exit status.
/// What `check` knows of the session besides the HELO.
struct Session<'a> {
    client: Option<std::net::IpAddr>,
    previous: &'a [String],
    exempt_listener: bool,
    pregreeted: bool,
    /// `--networks`: the reuse count to judge with.
    networks: Option<usize>,
}

fn check(
    config: &Config,
    helo: &str,
    session: &Session,
    dns: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Session { client, previous, exempt_listener, pregreeted, networks } = *session;
    for warning in &config.warnings {
        eprintln!("helo-agent: warning: {warning}");
    }
    // As the agent would: where it does not greet itself, nobody is ever judged a pregreeter.
    let greets = config.proxy.greeting == GreetingMode::Own && !config.proxy.listeners.is_empty();
    if pregreeted && !greets {
        eprintln!(
            "helo-agent: note: --pregreeted ignored: the pregreet test runs only where the proxy \
             greets itself (proxy.greeting = \"own\", proxy.listeners not empty)"
        );
    }
    let pregreeted = pregreeted && greets;
    // The door's hearing, driven as a door drives it: the lookups the agent would make,
    // where DNS can still change the verdict; HELO reuse last, with the count given, since
    // `check` keeps none.
    let law = Law::given(&config.rules, networks);
    let mut hearing = Hearing::of(client, exempt_listener).after(previous.to_vec());
    if dns {
        hearing.look();
    }
    if pregreeted {
        hearing.pregreeted();
    }
    let mut looked = None;
    if let Heard::Lookup { name, .. } = hearing.hear(&law, helo, None) {
        looked = Some(lookups(config, &name, client)?);
        hearing.on_dns(&law, looked.as_ref());
    }
    let verdict = hearing.verdict().expect("judged").clone();
    let reuse = describe_reuse(&config.rules, hearing.reuse(), helo, networks);
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(&verdict)?;
        value["helo"] = helo.into();
        value["dns"] = serde_json::to_value(&looked)?;
        value["networks"] = serde_json::to_value(networks)?;
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
    } else {
        write_verdict(&mut out, &verdict)?;
        if let Some(dns) = &looked {
            writeln!(out, "dns: {}", describe_dns(dns))?;
        }
        if let Some(reuse) = reuse {
            writeln!(out, "reuse: {reuse}")?;
        }
    }
    Ok(match verdict.action {
        Action::Pass => ExitCode::SUCCESS,
        Action::Reject => ExitCode::from(EXIT_REJECT),
        Action::Ban => ExitCode::from(EXIT_BAN),
    })
}

/// The DNS facts for `helo` (and `client`'s reverse name), from the config's resolvers.
fn lookups(
    config: &Config,
    helo: &str,
    client: Option<std::net::IpAddr>,
) -> anyhow::Result<crate::rules::DnsFacts> {
    use crate::dns::{Dns, Need};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let dns = Dns::new(&config.dns)?;
        // Waiting for a slot (Need::Required), the lookups always answer.
        let facts = match client {
            Some(ip) => dns.facts(helo, ip, Need::Required).await,
            None => dns
                .helo(helo, Need::Required)
                .await
                .map(|helo| crate::rules::DnsFacts { helo, client: Default::default() }),
        };
        Ok(facts.unwrap_or_default())
    })
}

/// `check --networks`: the count includes this client's own network, so it is 1 or more.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// One line on how `check` judged HELO reuse (`seen`), where the check is on and would look
/// at this HELO.
fn describe_reuse(
    rules: &crate::rules::RuleSet,
    seen: ReuseSeen,
    helo: &str,
    networks: Option<usize>,
) -> Option<String> {
    use crate::rules::helo::{self, Helo};
    use crate::rules::{Check, CheckAction};
    // Where the check cannot judge, a `--networks` the admin gave is answered, not ignored.
    if rules.action(Check::HeloReuse) == CheckAction::Off {
        return networks
            .map(|_| "not judged: checks.helo_reuse is \"off\" (--networks ignored)".into());
    }
    let limits = rules.reuse;
    let window = crate::duration::format(limits.window);
    Some(match (networks, seen) {
        (_, ReuseSeen::Decided(rule)) => {
            return networks
                .map(|_| format!("never counted: rule {rule} decided first (--networks ignored)"));
        }
        (_, ReuseSeen::NotCounted | ReuseSeen::Nothing)
            if matches!(helo::parse(helo), Helo::Name(_)) =>
        {
            "never counted: the client's forward-confirmed reverse name is this HELO".to_owned()
        }
        (_, ReuseSeen::NotCounted | ReuseSeen::Nothing) => {
            "never counted: not a domain name (a literal or an address)".to_owned()
        }
        (None, ReuseSeen::Counted) => format!(
            "not judged: check keeps no count of client networks; --networks N judges as if N \
             networks (this one's included) had used the name in the last {window} (reused from \
             reuse.clients = {}); `helo-agent tophelos` shows the running agent's counts",
            limits.clients
        ),
        (Some(n), ReuseSeen::Counted) => format!(
            "{n} client networks in the last {window} (reused from reuse.clients = {})",
            limits.clients
        ),
    })
}

/// One line on what DNS said.
fn describe_dns(dns: &crate::rules::DnsFacts) -> String {
    use crate::rules::{ClientDns, HeloDns};
    let helo = match &dns.helo {
        HeloDns::NotLooked => "HELO not looked up".to_owned(),
        HeloDns::Found { addresses, mx } => {
            let mut records: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            if *mx {
                records.push("MX".into());
            }
            format!("HELO name found ({})", records.join(" "))
        }
        HeloDns::Missing => "HELO name has no A, AAAA or MX record".to_owned(),
        HeloDns::TempFail(why) => format!("HELO lookup failed temporarily ({why})"),
    };
    let client = match &dns.client {
        ClientDns::NotLooked => "client not looked up (give --client)".to_owned(),
        ClientDns::Confirmed(name) => format!("client's reverse name {name} (forward-confirmed)"),
        ClientDns::Unconfirmed(names) if names.is_empty() => "client has no reverse name".into(),
        ClientDns::Unconfirmed(names) => {
            format!("client's reverse names {} do not point back at it", names.join(" "))
        }
        ClientDns::TempFail(why) => format!("client's reverse lookup failed temporarily ({why})"),
    };
    format!("{helo}; {client}")
}

/// `reload`: the running agent re-reads its own config, and decides, logs and counts the result
/// (`reloads_total{result}`) as for SIGHUP. The CLI reads the config only to find the agent, so
/// a file that does not validate reaches the agent too (which refuses it and says why) instead
/// of stopping here unseen by the agent's log and metrics.
fn reload(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<()> {
    let (socket, pin_dir, own_error) = match Config::load_with(path, overrides) {
        Ok(config) => (config.agent.control_socket, config.xdp.pin_dir, None),
        // A bad flag is this command's own mistake, not the agent's config.
        Err(error @ ConfigError::Flag { .. }) => return Err(error.into()),
        Err(error) => {
            let (socket, pin_dir) = crate::config::control_locations(path);
            (socket, overrides.pin_dir.clone().unwrap_or(pin_dir), Some(error))
        }
    };
    let envelope = Envelope { pin_dir, request: Request::Reload };
    let answer = match crate::control::request(&socket, &envelope) {
        Ok(answer) => answer,
        Err(error @ (ClientError::Refused { .. } | ClientError::OtherPinDir { .. })) => {
            return Err(error.into());
        }
        Err(error) => match own_error {
            Some(own) => anyhow::bail!("{own} (and no agent answered to reload: {error})"),
            None => return Err(error.into()),
        },
    };
    let Answer::Reloaded(summary) = answer else { return Err(unexpected(answer)) };
    println!(
        "reloaded {}: {} regex rules, {} table entries, {} allowlisted networks",
        summary.config, summary.badhelo_patterns, summary.table_entries, summary.allowlist
    );
    for warning in &summary.warnings {
        println!("warning: {warning}");
    }
    for key in &summary.needs_restart {
        println!("not changed: {key} (takes effect at a restart)");
    }
    Ok(())
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// `check-config`: loads the config at `path` (every rule file too) and says what it holds.
fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
    let rules = &config.rules;
    println!(
        "config ok: {} ({} domain table entries, {} regex rules, {} identity names, {} proxy listeners, {} session threads{}, upstream {}, {} policy listeners)",
        path.map_or("<embedded defaults>".into(), |p| p.display().to_string()),
        rules.table.len(),
        rules.badhelo.len(),
        rules.identity.names.len(),
        config.proxy.listeners.len(),
        config.proxy.worker_count(),
        if config.proxy.workers == 0 { " (one per CPU here)" } else { "" },
        config.proxy.upstream,
        config.policy.listeners.len(),
    );
    if let Some(redis) = &config.fleet.redis {
        // Only the configuration: whether Redis answers shows at `run` (its log and
        // helo_filter_fleet_connected).
        println!(
            "fleet: node {} through {redis}, keys {}*",
            config.fleet.node, config.fleet.prefix
        );
    }
    Ok(())
}

/// `run`: the agent, until SIGINT or SIGTERM.
fn run_agent(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    crate::agent::run(config, overrides, shutdown_signal())?;
    Ok(())
}

/// `ban`: through the agent when one runs, else straight into the pinned maps.
fn ban(
    config: &Config,
    target: &str,
    ttl: Option<&str>,
    reason: &str,
    prefix: bool,
) -> anyhow::Result<()> {
    let target = parse_target(target, prefix)?;
    let ttl = match ttl {
        None => Ttl::For(config.rules.ban_ttl),
        Some(text) => parse_ttl(text)?,
    };
    let reason = reason.trim();
    anyhow::ensure!(
        reason.len() <= REASON_TEXT_LEN,
        "--reason is {} bytes long; a ban keeps at most {REASON_TEXT_LEN}: shorten it",
        reason.len()
    );
    if let Some(net) = config.rules.allowlist.iter().find(|net| target.overlaps(net)) {
        anyhow::bail!(
            "{target} is in the allowlisted network {net} and would never be dropped: remove it \
             from allowlist.networks first"
        );
    }
    let ttl_secs = match ttl {
        Ttl::For(d) => Some(d.as_secs().max(1)),
        Ttl::Forever => None,
    };
    let request = Request::Ban { target: target.to_string(), ttl_secs, reason: reason.to_owned() };
    let through_agent = AgentLink::of(config).ask(request)?.is_some();
    if !through_agent {
        let mut list = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?);
        list.ban(&target, ttl, reason, crate::clock::boot_ns())?;
    }
    let how_long = match ttl {
        Ttl::For(d) => format!("for {}", crate::duration::format(d)),
        Ttl::Forever => "forever".into(),
    };
    match (config.fleet.redis.is_some(), through_agent) {
        (true, true) => println!(
            "banned {target} {how_long}, here and, through the fleet, on the other gateways"
        ),
        (true, false) => println!(
            "banned {target} {how_long} on this gateway only: the agent is not running, so the \
             fleet is not told"
        ),
        (false, _) => println!("banned {target} {how_long}"),
    }
    Ok(())
}

/// `ban --ttl`: a duration up to [`MAX_TTL`], or `forever`.
fn parse_ttl(text: &str) -> anyhow::Result<Ttl> {
    if text == "forever" {
        return Ok(Ttl::Forever);
    }
    let ttl = crate::duration::parse(text)?;
    anyhow::ensure!(!ttl.is_zero(), "--ttl must be longer than 0s");
    anyhow::ensure!(
        ttl <= MAX_TTL,
        "--ttl {text} is longer than the longest ban, {} (about ten years): use --ttl forever \
         for a ban that never ends",
        crate::duration::format(MAX_TTL)
    );
    Ok(Ttl::For(ttl))
}

/// `unban`: through the agent (which also forgets the offences) when one runs, else in the
/// pinned maps.
fn unban(config: &Config, target: &str, prefix: bool) -> anyhow::Result<()> {
    let target = parse_target(target, prefix)?;
    let request = Request::Unban { target: target.to_string() };
    let fleet = config.fleet.redis.is_some();
    let (was_banned, through_agent) = match AgentLink::of(config).ask(request)? {
        Some(Answer::Unbanned(answer)) if fleet && !answer.was_banned => {
            println!(
                "{target} was not banned here; the other gateways are told to lift it (through \
                 Redis: at once, or when it is reachable again)"
            );
            return Ok(());
        }
        Some(Answer::Unbanned(answer)) => (answer.was_banned, true),
        Some(other) => return Err(unexpected(other)),
        None => {
            // No agent: the pinned maps, and the snapshot the next start would restore from.
            let in_maps = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?).unban(&target)?;
            let in_snapshot = match &config.snapshot.path {
                Some(path) => crate::blocklist::snapshot::forget(path, &target.to_string())?,
                None => false,
            };
            (in_maps || in_snapshot, false)
        }
    };
    anyhow::ensure!(was_banned, "{target} is not banned (see `helo-agent list`)");
    match (fleet, through_agent) {
        (true, true) => println!(
            "unbanned {target} here; the other gateways are told to lift it (through Redis: at \
             once, or when it is reachable again)"
        ),
        (true, false) => println!(
            "unbanned {target} on this gateway only: the agent is not running, so the fleet still \
             holds the ban, and this gateway takes it back at its next start; unban through a \
             running agent to lift it everywhere"
        ),
        (false, _) => println!("unbanned {target}"),
    }
    Ok(())
}

/// `list`: the bans in force, from the agent or the pinned maps.
fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let entries: Vec<BanEntry> = match AgentLink::of(config).ask(Request::List)? {
        Some(Answer::Listed(entries)) => entries,
        Some(other) => return Err(unexpected(other)),
        None => {
            Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?).list(crate::clock::boot_ns())?
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
        return Ok(());
    }
    // With a fleet, where each ban was made: `here`, or the other gateway's node name.
    let from = config.fleet.redis.is_some() || entries.iter().any(|e| e.origin.is_some());
    let header = if from { "FROM          REASON" } else { "REASON" };
    writeln!(out, "{:<42} {:>10} {:>10}  {header}", "ADDRESS", "REMAINING", "HITS")?;
    for e in &entries {
        let remaining = e.remaining_secs.map_or("forever".into(), |s| {
            crate::duration::format(std::time::Duration::from_secs(s))
        });
        let origin = match (from, &e.origin) {
            (false, _) => String::new(),
            (true, origin) => format!("{:<13} ", origin.as_deref().unwrap_or("here")),
        };
        // A reason may come from another gateway, or anyone who can write to its Redis: no
        // control characters reach the terminal.
        let reason: String =
            e.reason.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        writeln!(out, "{:<42} {:>10} {:>10}  {origin}{reason}", e.target, remaining, e.hits)?;
    }
    Ok(())
}

/// `stats`: the XDP counters, from the agent or the pinned maps.
fn stats(config: &Config, json: bool) -> anyhow::Result<()> {
    let stats = match AgentLink::of(config).ask(Request::Stats)? {
        Some(Answer::Stats(stats)) => stats,
        Some(other) => return Err(unexpected(other)),
        None => XdpStats(PinnedMaps::open(&config.xdp.pin_dir)?.stats()?),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &stats)?;
        writeln!(out)?;
        return Ok(());
    }
    for stat in helo_common::Stat::ALL {
        writeln!(out, "{:<14} {}", stat.name(), stats.get(stat))?;
    }
    Ok(())
}

/// `tophelos`: the running agent's HELO report.
fn tophelos(config: &Config, since: &str, limit: usize, json: bool) -> anyhow::Result<()> {
    let since = crate::duration::parse(since)?;
    let request = Request::Tophelos { since_secs: since.as_secs(), limit };
    let rows: Vec<HeloRow> = match AgentLink::of(config).require(request)? {
        Answer::Tophelos(rows) => rows,
        other => return Err(unexpected(other)),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    write_tophelos(&mut out, &rows)?;
    Ok(())
}

/// The `tophelos` table: a reused name (`helo_reuse`) is marked `*` after its NETWORKS.
fn write_tophelos(out: &mut impl std::io::Write, rows: &[HeloRow]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>9} {:>8} {:>9} {:>9}  {:<40} RULES",
        "SESSIONS", "CLIENTS", "NETWORKS", "REJECTED", "HELO"
    )?;
    for row in rows {
        let plus = if row.clients_capped { "+" } else { "" };
        let networks = format!(
            "{}{}{}",
            row.networks,
            if row.networks_capped { "+" } else { "" },
            if row.reused { "*" } else { " " }
        );
        let rules: Vec<String> =
            row.rules.iter().map(|r| format!("{}={}", r.rule, r.sessions)).collect();
        // The HELO is the client's text, invalid ones included: no escape sequence a bot sent
        // reaches the admin's terminal (as in `top`).
        let helo: String = row.helo.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        writeln!(
            out,
            "{:>9} {:>8} {:>9} {:>9}  {:<40} {}",
            row.sessions,
            format!("{}{plus}", row.clients),
            networks,
            row.rejected,
            helo,
            rules.join(" ")
        )?;
    }
    if rows.iter().any(|row| row.reused) {
        writeln!(
            out,
            "* reused: used by reuse.clients client networks or more within reuse.window \
             (`helo-agent tophelos --suggest` for badhelo lines to review)"
        )?;
    }
    Ok(())
}

/// `tophelos --suggest`: badhelo lines for the names the running agent holds as reused.
fn suggest(config: &Config) -> anyhow::Result<()> {
    let report = match AgentLink::of(config).require(Request::ReusedHelos)? {
        Answer::ReusedHelos(report) => report,
        other => return Err(unexpected(other)),
    };
    print!("{}", crate::reuse::suggest_badhelo(&report));
    Ok(())
}

/// `top`: the live view of the running agent.
fn top(config: &Config, since: &str) -> anyhow::Result<()> {
    let since = crate::duration::parse(since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    crate::top::run(crate::top::Target {
        socket: config.agent.control_socket.clone(),
        pin_dir: config.xdp.pin_dir.clone(),
        since,
    })?;
    Ok(())
}

/// `detach`: removes the pinned link (and with `maps` the pinned maps).
fn detach(config: &Config, maps: bool) -> anyhow::Result<()> {
    let removed = crate::ebpf::detach(&config.xdp.pin_dir, maps)?;
    if removed.is_empty() {
        println!("nothing pinned in {}", config.xdp.pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    if AgentLink::of(config).ask(Request::Stats).is_ok_and(|answer| answer.is_some()) {
        println!(
            "note: an agent is still running and holds the program until it exits; stop it to \
             detach now"
        );
    }
    Ok(())
}

fn write_verdict(out: &mut impl std::io::Write, verdict: &Verdict) -> std::io::Result<()> {
    let mut headline = verdict.action.to_string();
    if let Some(ttl) = verdict.ttl {
        headline.push_str(&format!(" for {}", crate::duration::format(ttl)));
    }
    if verdict.action != Action::Pass {
        let at = match verdict.reject_at {
            RejectAt::Helo => "at HELO",
            RejectAt::Rcpt => "at RCPT TO",
        };
        headline.push_str(&format!(" (rejected {at})"));
    }
    writeln!(out, "verdict: {headline}")?;
    writeln!(out, "rule:    {}", verdict.rule)?;
    writeln!(out, "reason:  {}", verdict.reason)?;
    if let Some(entry) = &verdict.entry {
        writeln!(out, "entry:   {entry}: {}", entry.text)?;
    }
    if let Some(reply) = &verdict.reply {
        writeln!(out, "reply:   {} {}", reply.code, reply.text)?;
    }
    for logged in &verdict.logged {
        let at = logged.entry.as_ref().map(|e| format!(" [{e}: {}]", e.text)).unwrap_or_default();
        writeln!(out, "log-only: {}: {}{at}", logged.rule, logged.reason)?;
    }
    Ok(())
}

fn parse_target(text: &str, prefix: bool) -> anyhow::Result<BanTarget> {
    let target: BanTarget = text.parse()?;
    Ok(match (prefix, target) {
        (false, t) | (true, t @ BanTarget::V6Net64(_)) => t,
        (true, BanTarget::V6(o)) => BanTarget::prefix(std::net::Ipv6Addr::from(o).into()),
        (true, BanTarget::V4(_)) => anyhow::bail!("--prefix applies to IPv6 addresses only"),
    })
}

/// The running agent, reached through its control socket.
struct AgentLink<'a> {
    socket: &'a Path,
    pin_dir: &'a Path,
}

impl<'a> AgentLink<'a> {
    /// The agent `config` names: its control socket, for its pin directory.
    fn of(config: &'a Config) -> Self {
        AgentLink { socket: &config.agent.control_socket, pin_dir: &config.xdp.pin_dir }
    }

    /// The agent's answer; `None` when no agent runs there (or it guards another pin
    /// directory), so the caller works on the pinned maps itself.
    fn ask(&self, request: Request) -> anyhow::Result<Option<Answer>> {
        match self.require(request) {
            Ok(answer) => Ok(Some(answer)),
            Err(ClientError::NotRunning { .. } | ClientError::OtherPinDir { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The agent's answer; an error when no agent runs.
    fn require(&self, request: Request) -> Result<Answer, ClientError> {
        let envelope = Envelope { pin_dir: self.pin_dir.to_owned(), request };
        crate::control::request(self.socket, &envelope)
    }
}

/// An answer of another kind than the request's: [`crate::control::request`] decodes each as
/// its request's, so this is a bug.
fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!(
        "the agent answered {answer:?} to another request: this is a bug, please report it"
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn an_error_prints_each_cause_once() {
        let os = || std::io::Error::from_raw_os_error(98);
        let read = crate::config::ConfigError::RuleFile {
            key: "rules.badhelo_file",
            path: "/etc/badhelo".into(),
            source: os(),
        };
        let text = describe(&anyhow::Error::new(read));
        assert_eq!(text.matches("(os error 98)").count(), 1, "{text}");
        assert!(text.starts_with("cannot read rules.badhelo_file file /etc/badhelo: "), "{text}");
        // A cause the message does not already show is still printed.
        let text = describe(&anyhow::Error::new(os()).context("reading the thing"));
        assert!(
            text.starts_with("reading the thing: ") && text.ends_with("(os error 98)"),
            "{text}"
        );
    }

    /// tophelos marks a reused name after its networks, and says what the mark means.
    #[test]
    fn tophelos_marks_reused_names() {
        let row = |helo: &str, networks, networks_capped, reused| HeloRow {
            helo: helo.into(),
            sessions: 40,
            clients: 30,
            clients_capped: false,
            rejected: 0,
            rules: Vec::new(),
            networks,
            networks_capped,
            reused,
        };
        let mut out = Vec::new();
        let rows =
            [row("bot.example", 23, false, true), row("mail.sender.example", 1, false, false)];
        write_tophelos(&mut out, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>()[..5],
            ["SESSIONS", "CLIENTS", "NETWORKS", "REJECTED", "HELO"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["40", "30", "23*", "0", "bot.example"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["40", "30", "1", "0", "mail.sender.example"]
        );
        assert!(lines[3].starts_with("* reused:") && lines[3].contains("--suggest"), "{text}");
        let mut out = Vec::new();
        write_tophelos(&mut out, &[row("busy.example", 1000, true, true)]).unwrap();
        assert!(String::from_utf8(out).unwrap().contains(" 1000+* "), "capped and reused");
        let mut out = Vec::new();
        write_tophelos(&mut out, &rows[1..]).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("reused"), "no legend without a mark");
    }

    /// A bot chooses its HELO: an invalid one with escape sequences (colours, a window title
    /// set by OSC) is counted as sent, and `tophelos` must not play it on the admin's terminal.
    #[test]
    fn tophelos_prints_no_control_characters() {
        let row = HeloRow {
            helo: "\u{1b}[31mred\u{1b}]0;pwned\u{7}.test\r".into(),
            sessions: 1,
            clients: 1,
            clients_capped: false,
            rejected: 1,
            rules: vec![crate::report::RuleCount { rule: "invalid".into(), sessions: 1 }],
            networks: 0,
            networks_capped: false,
            reused: false,
        };
        let mut out = Vec::new();
        write_tophelos(&mut out, &[row]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains("?[31mred?]0;pwned?.test? "), "{text:?}");
    }

    #[test]
    fn prefix_flag_widens_ipv6_only() {
        assert_eq!(parse_target("2001:db8:1:2::9", true).unwrap().to_string(), "2001:db8:1:2::/64");
        assert_eq!(parse_target("2001:db8:1:2::9", false).unwrap().to_string(), "2001:db8:1:2::9");
        assert!(parse_target("192.0.2.1", true).is_err());
    }
}
