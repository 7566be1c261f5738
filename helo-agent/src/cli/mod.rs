//! Command line: `helo-agent run | ban | unban | list | check | check-config | stats | reload |
//! tophelos | top | detach` (and the hidden `generate`, for the package). `ban`, `unban`, `list` and `stats` go through the running agent's control
//! socket when there is one, else to the pinned maps; `reload`, `tophelos` and `top` need the agent. Parses arguments, runs the
//! command, prints human or `--json` output; `check` also answers by its exit status. Errors
//! bubble up as `anyhow` with their reason.
//!
//! The rooms: `args.rs` the clap definitions; `check.rs` the `check` command (the judge's
//! hearing, driven as a door drives it, and its explanations); `bans.rs` ban, unban, list,
//! stats, detach; `link.rs` the link to the running agent (its control socket) and the
//! commands only the agent answers; `generate.rs` the man pages and completions.

mod args;
mod bans;
mod check;
mod generate;
mod link;
mod passes;

use std::path::Path;
use std::process::ExitCode;

pub use self::args::{
    Cli, CliCommand, EXIT_BAN, EXIT_REJECT, Generated, INSTALLED_CONFIG, LogFormat, config_path,
};
use crate::config::{Config, Overrides};

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
    let path = cli.config_path();
    let Cli { command, .. } = cli;
    let path = path.as_deref();
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match command {
        CliCommand::Run { .. } => done(run_agent(load(path, &overrides)?, overrides)),
        CliCommand::Ban { target, ttl, reason, prefix } => {
            let config = load(path, &overrides)?;
            done(bans::ban(&config, &target, ttl.as_deref(), &reason, prefix))
        }
        CliCommand::Unban { target, prefix } => {
            done(bans::unban(&load(path, &overrides)?, &target, prefix))
        }
        CliCommand::List { json } => done(bans::list(&load(path, &overrides)?, json)),
        CliCommand::Passes { json, remove } => {
            let config = load(path, &overrides)?;
            done(match remove {
                Some(target) => passes::remove(&config, &target),
                None => passes::list(&config, json),
            })
        }
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
            let session = check::Session {
                client,
                previous: &previous,
                exempt_listener,
                pregreeted,
                networks,
            };
            check::check(&config, &helo, &session, !no_dns, json)
        }
        CliCommand::CheckConfig { file } => done(check_config(file.as_deref().or(path))),
        CliCommand::Stats { json } => done(bans::stats(&load(path, &overrides)?, json)),
        CliCommand::Reload => done(link::reload(path, &overrides)),
        CliCommand::Tophelos { since, limit, json, suggest: false } => {
            done(link::tophelos(&load(path, &overrides)?, &since, limit, json))
        }
        CliCommand::Tophelos { suggest: true, .. } => done(link::suggest(&load(path, &overrides)?)),
        CliCommand::Top { since } => done(link::top(&load(path, &overrides)?, &since)),
        CliCommand::Detach { maps } => done(bans::detach(&load(path, &overrides)?, maps)),
        CliCommand::Generate { what, out } => {
            for file in generate::write(what, &out)
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
    for warning in unreadable_by_the_agent(&config) {
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
    if config.steer.enabled() {
        let endpoints: Vec<String> =
            config.steer.addresses.iter().map(ToString::to_string).collect();
        let sockets: Vec<String> = config
            .proxy
            .listeners
            .iter()
            .filter(|l| l.check_helo)
            .map(|l| l.address.to_string())
            .collect();
        let passes = config.steer.pass_ttl().map_or("no passes (pass_ttl 0s)".into(), |ttl| {
            format!("passes for {}", crate::duration::format(ttl))
        });
        println!(
            "steering: {} to the agent's sockets {} (strangers) or straight to the MTA (passes, or no agent running); {passes}",
            endpoints.join(", "),
            sockets.join(", ")
        );
    }
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

/// The files a reload reads again that the agent, once it runs as `agent.user`, may not read:
/// the config itself (a SIGHUP reload is then refused; `helo-agent reload` as root hands the
/// agent the file) and its rule files (every reload is then refused).
fn unreadable_by_the_agent(config: &Config) -> Vec<String> {
    let Some(user) = &config.agent.user else { return Vec::new() };
    let Ok(agent) = crate::privilege::lookup(user) else { return Vec::new() };
    if agent.uid == 0 {
        return Vec::new();
    }
    let mut warnings = Vec::new();
    if let Some(path) = &config.source
        && let Some(why) = unreadable(path, agent.uid, agent.gid)
    {
        warnings.push(format!(
            "agent.user {user} may not read {} ({why}): a SIGHUP reload (kill -HUP) will be \
             refused; `helo-agent reload` as root hands the agent the file and works; make it \
             0640 root:{user}, as the package installs it, for both",
            path.display()
        ));
    }
    for path in &config.rule_files {
        if let Some(why) = unreadable(path, agent.uid, agent.gid) {
            warnings.push(format!(
                "agent.user {user} may not read {} ({why}): every reload will be refused; make \
                 it readable to {user} (0644, or 0640 root:{user})",
                path.display()
            ));
        }
    }
    warnings
}

/// Why a process of `uid` with the one group `gid` (the agent drops every other group) may not
/// read `path`, if it may not: the file's mode, or a directory on the way it may not search.
fn unreadable(path: &Path, uid: u32, gid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let allowed = |meta: &std::fs::Metadata, bit: u32| {
        let mode = meta.mode();
        if meta.uid() == uid {
            mode & (bit << 6) != 0
        } else if meta.gid() == gid {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    };
    let who = |meta: &std::fs::Metadata| {
        format!("mode {:04o}, owner {}, group {}", meta.mode() & 0o7777, meta.uid(), meta.gid())
    };
    let path = std::path::absolute(path).ok()?;
    for dir in path.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).ok()?;
        if !allowed(&meta, 0o1) {
            return Some(format!("its directory {} has {}", dir.display(), who(&meta)));
        }
    }
    let meta = std::fs::metadata(&path).ok()?;
    (!allowed(&meta, 0o4)).then(|| who(&meta))
}

/// `run`: the agent, until SIGINT or SIGTERM.
fn run_agent(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    crate::agent::run(config, overrides, shutdown_signal())?;
    Ok(())
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

    /// Issue 27: a root-only config broke every reload, and `check-config` said ok.
    #[test]
    fn files_the_agent_may_not_read_are_found() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("helo-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("helo-filter.toml");
        std::fs::write(&file, "").unwrap();
        let me = rustix::process::getuid().as_raw();
        let my_group = rustix::process::getgid().as_raw();
        let (other, other_group) = (me.wrapping_add(4242), my_group.wrapping_add(4242));
        let mode = |m| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert_eq!(unreadable(&file, me, my_group), None, "the owner reads 0600");
        let why = unreadable(&file, other, other_group).expect("no one else does");
        assert!(why.starts_with("mode 0600"), "{why}");
        mode(0o640);
        assert_eq!(unreadable(&file, other, my_group), None, "the group reads 0640");
        assert!(unreadable(&file, other, other_group).is_some());
        mode(0o644);
        assert_eq!(unreadable(&file, other, other_group), None);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let why = unreadable(&file, other, other_group).expect("the directory is closed");
        assert!(why.starts_with("its directory "), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
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
}
