//! The link to the running agent, its control socket ([`AgentLink`]), and the commands only
//! the agent answers: `reload`, `tophelos` (and `--suggest`), `top`.

use std::io::Write as _;

use std::path::Path;

use crate::config::{Config, ConfigError, Overrides};
use crate::control::{Answer, ClientError, Envelope, HandedConfig, Request};
use crate::report::HeloRow;

/// The running agent, reached through its control socket.
pub(super) struct AgentLink<'a> {
    socket: &'a Path,
    pin_dir: &'a Path,
}

impl<'a> AgentLink<'a> {
    /// The agent `config` names: its control socket, for its pin directory.
    pub(super) fn of(config: &'a Config) -> Self {
        AgentLink { socket: &config.agent.control_socket, pin_dir: &config.xdp.pin_dir }
    }

    /// The agent's answer; `None` when no agent runs there (or it guards another pin
    /// directory), so the caller works on the pinned maps itself.
    pub(super) fn ask(&self, request: Request) -> anyhow::Result<Option<Answer>> {
        match self.require(request) {
            Ok(answer) => Ok(Some(answer)),
            Err(ClientError::NotRunning { .. } | ClientError::OtherPinDir { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The agent's answer; an error when no agent runs.
    pub(super) fn require(&self, request: Request) -> Result<Answer, ClientError> {
        let envelope = Envelope { pin_dir: self.pin_dir.to_owned(), request };
        crate::control::request(self.socket, &envelope)
    }
}

/// An answer of another kind than the request's: [`crate::control::request`] decodes each as
/// its request's, so this is a bug.
pub(super) fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!(
        "the agent answered {answer:?} to another request: this is a bug, please report it"
    )
}

/// `reload`: the running agent re-reads its own config, and decides, logs and counts the result
/// (`reloads_total{result}`) as for SIGHUP. The CLI reads the config only to find the agent, so
/// a file that does not validate reaches the agent too (which refuses it and says why) instead
/// of stopping here unseen by the agent's log and metrics; but a file that does not even parse
/// stops here, with its error: its control socket is unknown, and the default one may be
/// another agent's. The CLI (root: the control socket is root-only) hands the agent the file
/// as it read it, so that a root-only config reloads too; the agent takes it when it is its
/// own file.
pub(super) fn reload(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<()> {
    let (socket, pin_dir, own_error) = match Config::load_with(path, overrides) {
        Ok(config) => (config.agent.control_socket, config.xdp.pin_dir, None),
        // A bad flag is this command's own mistake, not the agent's config.
        Err(error @ ConfigError::Flag { .. }) => return Err(error.into()),
        Err(error) => match crate::config::control_locations(path) {
            Some((socket, pin_dir)) => {
                (socket, overrides.pin_dir.clone().unwrap_or(pin_dir), Some(error))
            }
            None => return Err(error.into()),
        },
    };
    let config = match path {
        Some(path) => Some(HandedConfig {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            text: std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?,
        }),
        None => None,
    };
    let envelope = Envelope { pin_dir, request: Request::Reload { config } };
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

/// `tophelos`: the running agent's HELO report.
pub(super) fn tophelos(
    config: &Config,
    since: &str,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
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
pub(super) fn suggest(config: &Config) -> anyhow::Result<()> {
    let report = match AgentLink::of(config).require(Request::ReusedHelos)? {
        Answer::ReusedHelos(report) => report,
        other => return Err(unexpected(other)),
    };
    print!("{}", crate::reuse::suggest_badhelo(&report));
    Ok(())
}

/// `top`: the live view of the running agent.
pub(super) fn top(config: &Config, since: &str) -> anyhow::Result<()> {
    let since = crate::duration::parse(since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    crate::top::run(crate::top::Target {
        socket: config.agent.control_socket.clone(),
        pin_dir: config.xdp.pin_dir.clone(),
        since,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
