//! Command line: `helo-agent run | ban | unban | list | check | check-config | stats | reload |
//! tophelos | detach`. `ban`, `unban`, `list` and `stats` go through the running agent's control
//! socket when there is one, else to the pinned maps; `reload` and `tophelos` need the agent. Parses arguments, runs the
//! command, prints human or `--json` output; `check` also answers by its exit status. Errors
//! bubble up as `anyhow` with their reason.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use helo_common::REASON_TEXT_LEN;

use crate::addr::BanTarget;
use crate::agent::RunOptions;
use crate::blocklist::{BanEntry, Blocklist, MAX_TTL, Ttl};
use crate::config::Config;
use crate::control::{ClientError, Envelope, Request};
use crate::ebpf::{AttachMode, PinnedMaps};
use crate::report::HeloRow;
use crate::rules::{Action, Facts, RejectAt, Verdict};

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
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SMTP proxy and the XDP ban filter until SIGINT or SIGTERM (needs root).
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
        proxy_protocol: Option<crate::proxy::header::ProxyProtocol>,
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
    /// Lift a ban. The running agent also forgets the address's offence history, so its next
    /// rule ban starts again at the rule's TTL, without escalation.
    Unban {
        /// The address or IPv6 /64 as it was banned.
        target: String,
        /// Lift the /64 ban around an IPv6 address.
        #[arg(long)]
        prefix: bool,
    },
    /// List bans in force, by address (IPv4 first, then IPv6, numerically): address, remaining
    /// TTL, hits (connection attempts refused), reason.
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
        /// One JSON object: verdict, rule, reason, entry, ttl, logged.
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
    /// HELO names the running agent has seen: sessions, distinct clients, rejections by rule.
    Tophelos {
        /// How far back: 10m, 1h, 1d (at most agent.report_window).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        since: String,
        /// Show this many names.
        #[arg(long, default_value_t = 30)]
        limit: usize,
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove the XDP program from the interface: it stays attached after the agent exits
    /// (so bans hold through restarts) until this removes its pinned link.
    Detach {
        /// Also remove the pinned ban maps and counters (the bans are lost; the snapshot file
        /// stays and is restored at the next start).
        #[arg(long)]
        maps: bool,
    },
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
pub fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match &cli.command {
        Command::Check { helo, client, previous, exempt_listener, json } => {
            let config = Config::load(cli.config.as_deref())?;
            check(&config, helo, *client, previous, *exempt_listener, *json)
        }
        Command::Reload => reload(&cli).map(|()| std::process::ExitCode::SUCCESS),
        _ => execute(cli).map(|()| std::process::ExitCode::SUCCESS),
    }
}

/// `check`: prints the verdict, and answers by the exit status.
fn check(
    config: &Config,
    helo: &str,
    client: Option<std::net::IpAddr>,
    previous: &[String],
    exempt_listener: bool,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    for warning in &config.warnings {
        eprintln!("helo-agent: warning: {warning}");
    }
    let facts = Facts { client, argument: helo, previous, exempt_listener };
    let verdict = config.rules.classify(&facts);
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(&verdict)?;
        value["helo"] = helo.into();
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
    } else {
        write_verdict(&mut out, &verdict)?;
    }
    Ok(match verdict.action {
        Action::Pass => std::process::ExitCode::SUCCESS,
        Action::Reject => std::process::ExitCode::from(EXIT_REJECT),
        Action::Ban => std::process::ExitCode::from(EXIT_BAN),
    })
}

/// `reload`: the running agent re-reads its own config, and decides, logs and counts the result
/// (`reloads_total{result}`) as for SIGHUP. The CLI reads the config only to find the agent, so
/// a file that does not validate reaches the agent too (which refuses it and says why) instead
/// of stopping here unseen by the agent's log and metrics.
fn reload(cli: &Cli) -> anyhow::Result<()> {
    let (socket, pin_dir, own_error) = match Config::load(cli.config.as_deref()) {
        Ok(config) => (config.agent.control_socket, config.xdp.pin_dir, None),
        Err(error) => {
            let (socket, pin_dir) = crate::config::control_locations(cli.config.as_deref());
            (socket, pin_dir, Some(error))
        }
    };
    let pin_dir = cli.pin_dir.clone().unwrap_or(pin_dir);
    let envelope = Envelope { pin_dir, request: Request::Reload };
    let response = match crate::control::request(&socket, &envelope) {
        Ok(response) => response,
        Err(error) => match own_error {
            Some(own) => anyhow::bail!("{own} (and no agent answered to reload: {error})"),
            None => return Err(error.into()),
        },
    };
    anyhow::ensure!(response.ok, response.error.unwrap_or_default());
    let summary = response.data;
    println!(
        "reloaded {}: {} regex rules, {} table entries, {} allowlisted networks",
        summary["config"].as_str().unwrap_or("?"),
        summary["badhelo_patterns"],
        summary["table_entries"],
        summary["allowlist"]
    );
    for warning in summary["warnings"].as_array().into_iter().flatten() {
        println!("warning: {}", warning.as_str().unwrap_or_default());
    }
    for key in summary["needs_restart"].as_array().into_iter().flatten() {
        println!("not changed: {} (takes effect at a restart)", key.as_str().unwrap_or_default());
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

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    if let Command::CheckConfig { file } = &cli.command {
        let path = file.as_deref().or(cli.config.as_deref());
        let config = Config::load(path)?;
        for warning in &config.warnings {
            println!("warning: {warning}");
        }
        let rules = &config.rules;
        println!(
            "config ok: {} ({} domain table entries, {} regex rules, {} identity names, {} listeners, upstream {})",
            path.map_or("<embedded defaults>".into(), |p| p.display().to_string()),
            rules.table.len(),
            rules.badhelo.len(),
            rules.identity.names.len(),
            config.proxy.listeners.len(),
            config.proxy.upstream,
        );
        return Ok(());
    }
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(dir) = &cli.pin_dir {
        config.xdp.pin_dir = dir.clone();
    }
    let agent = AgentLink { socket: &config.agent.control_socket, pin_dir: &config.xdp.pin_dir };
    match cli.command {
        Command::Run { iface, xdp_mode, listen, upstream, proxy_protocol } => {
            let options = RunOptions {
                interface: iface,
                mode: xdp_mode,
                listen,
                upstream,
                proxy_protocol,
                pin_dir: cli.pin_dir,
            };
            options.apply(&mut config);
            crate::agent::run(config, options, shutdown_signal())?;
        }
        Command::Ban { target, ttl, reason, prefix } => {
            let target = parse_target(&target, prefix)?;
            let ttl = match ttl.as_deref() {
                None => config.default_ban_ttl(),
                Some("forever") => Ttl::Forever,
                Some(text) => {
                    let ttl = crate::duration::parse(text)?;
                    anyhow::ensure!(!ttl.is_zero(), "--ttl must be longer than 0s");
                    anyhow::ensure!(
                        ttl <= MAX_TTL,
                        "--ttl {text} is longer than the longest ban, {} (about ten years): use \
                         --ttl forever for a ban that never ends",
                        crate::duration::format(MAX_TTL)
                    );
                    Ttl::For(ttl)
                }
            };
            let reason = reason.trim();
            anyhow::ensure!(
                reason.len() <= REASON_TEXT_LEN,
                "--reason is {} bytes long; a ban keeps at most {REASON_TEXT_LEN}: shorten it",
                reason.len()
            );
            if let Some(net) = config.rules.allowlist.iter().find(|net| target.overlaps(net)) {
                anyhow::bail!(
                    "{target} is in the allowlisted network {net} and would never be dropped: \
                     remove it from allowlist.networks first"
                );
            }
            let ttl_secs = match ttl {
                Ttl::For(d) => Some(d.as_secs().max(1)),
                Ttl::Forever => None,
            };
            let request =
                Request::Ban { target: target.to_string(), ttl_secs, reason: reason.to_owned() };
            if agent.ask(request)?.is_none() {
                let mut list = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?);
                list.ban(&target, ttl, reason, crate::clock::boot_ns())?;
            }
            let how_long = match ttl {
                Ttl::For(d) => crate::duration::format(d),
                Ttl::Forever => "forever".into(),
            };
            println!("banned {target} for {how_long}");
        }
        Command::Unban { target, prefix } => {
            let target = parse_target(&target, prefix)?;
            let was_banned = match agent.ask(Request::Unban { target: target.to_string() })? {
                Some(data) => data["was_banned"].as_bool().unwrap_or(false),
                None => Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?).unban(&target)?,
            };
            if was_banned {
                println!("unbanned {target}");
            } else {
                anyhow::bail!("{target} is not banned (see `helo-agent list`)");
            }
        }
        Command::List { json } => {
            let entries: Vec<BanEntry> = match agent.ask(Request::List)? {
                Some(data) => serde_json::from_value(data)?,
                None => Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?)
                    .list(crate::clock::boot_ns())?,
            };
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &entries)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{:<42} {:>10} {:>10}  REASON", "ADDRESS", "REMAINING", "HITS")?;
                for e in &entries {
                    let remaining = e.remaining_secs.map_or("forever".into(), |s| {
                        crate::duration::format(std::time::Duration::from_secs(s))
                    });
                    writeln!(
                        out,
                        "{:<42} {:>10} {:>10}  {}",
                        e.target, remaining, e.hits, e.reason
                    )?;
                }
            }
        }
        Command::Check { .. } | Command::Reload => unreachable!("handled by `run`"),
        Command::CheckConfig { .. } => unreachable!("handled before the config is loaded"),
        Command::Stats { json } => {
            let object = match agent.ask(Request::Stats)? {
                Some(data) => data,
                None => crate::agent::stats_json(&PinnedMaps::open(&config.xdp.pin_dir)?)
                    .map_err(anyhow::Error::msg)?,
            };
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &object)?;
                writeln!(out)?;
            } else {
                for stat in helo_common::Stat::ALL {
                    writeln!(out, "{:<14} {}", stat.name(), object[stat.name()])?;
                }
            }
        }
        Command::Tophelos { since, limit, json } => {
            let since = crate::duration::parse(&since)?;
            let rows = agent.require(Request::Tophelos { since_secs: since.as_secs(), limit })?;
            let rows: Vec<HeloRow> = serde_json::from_value(rows)?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &rows)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:>9} {:>8} {:>9}  {:<40} RULES",
                    "SESSIONS", "CLIENTS", "REJECTED", "HELO"
                )?;
                for row in &rows {
                    let plus = if row.clients_capped { "+" } else { "" };
                    let rules: Vec<String> =
                        row.rules.iter().map(|r| format!("{}={}", r.rule, r.sessions)).collect();
                    writeln!(
                        out,
                        "{:>9} {:>8} {:>9}  {:<40} {}",
                        row.sessions,
                        format!("{}{plus}", row.clients),
                        row.rejected,
                        row.helo,
                        rules.join(" ")
                    )?;
                }
            }
        }
        Command::Detach { maps } => {
            let removed = crate::ebpf::detach(&config.xdp.pin_dir, maps)?;
            if removed.is_empty() {
                println!("nothing pinned in {}", config.xdp.pin_dir.display());
            }
            for path in removed {
                println!("removed {}", path.display());
            }
            if agent.ask(Request::Stats).is_ok_and(|answer| answer.is_some()) {
                println!(
                    "note: an agent is still running and holds the program until it exits; \
                     stop it to detach now"
                );
            }
        }
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

impl AgentLink<'_> {
    /// The agent's answer; `None` when no agent runs there (or it guards another pin
    /// directory), so the caller works on the pinned maps itself.
    fn ask(&self, request: Request) -> anyhow::Result<Option<serde_json::Value>> {
        let envelope = Envelope { pin_dir: self.pin_dir.to_owned(), request };
        match crate::control::request(self.socket, &envelope) {
            Ok(response) if response.ok => Ok(Some(response.data)),
            Ok(response) if response.data.get("pin_dir").is_some() => Ok(None),
            Ok(response) => anyhow::bail!(response.error.unwrap_or_default()),
            Err(ClientError::NotRunning { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The agent's answer; an error when no agent runs.
    fn require(&self, request: Request) -> anyhow::Result<serde_json::Value> {
        let envelope = Envelope { pin_dir: self.pin_dir.to_owned(), request };
        let response = crate::control::request(self.socket, &envelope)?;
        anyhow::ensure!(response.ok, response.error.unwrap_or_default());
        Ok(response.data)
    }
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

    #[test]
    fn prefix_flag_widens_ipv6_only() {
        assert_eq!(parse_target("2001:db8:1:2::9", true).unwrap().to_string(), "2001:db8:1:2::/64");
        assert_eq!(parse_target("2001:db8:1:2::9", false).unwrap().to_string(), "2001:db8:1:2::9");
        assert!(parse_target("192.0.2.1", true).is_err());
    }
}
