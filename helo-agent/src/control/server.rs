//! The agent's side of the control socket: accept, check the peer is root, read one request,
//! answer, close. A bad or slow client costs one task and a timeout, never the agent.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::{
    Answer, BanCounts, Banned, Envelope, FleetState, HandedConfig, MAX_MESSAGE, Overview,
    PolicyState, Refusal, ReloadSummary, Request, Unbanned, Verdicts, XdpStats,
};
use crate::addr::{AddrError, BanTarget};
use crate::blocklist::Ttl;
use crate::blocklist::worker::{AdminAnswer, AdminCommand, BanSender, WorkerError};
use crate::ebpf::EbpfError;
use crate::judge::Judge;
use crate::reload::ReloadError;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A reload in progress, as [`Control::reload`] starts it.
pub type Reloading = Pin<Box<dyn Future<Output = Result<ReloadSummary, ReloadError>> + Send>>;
/// The allowlisted network a ban target falls in, if any.
pub type AllowlistCheck = Box<dyn Fn(&BanTarget) -> Option<String> + Send + Sync>;

/// What the control socket can reach in the running agent.
pub struct Control {
    pub pin_dir: PathBuf,
    pub bans: BanSender,
    pub judge: Arc<Judge>,
    /// The XDP counters.
    pub stats: Box<dyn Fn() -> Result<XdpStats, EbpfError> + Send + Sync>,
    /// Re-reads and swaps in the config (the file as the root CLI handed it, if it did);
    /// answers what changed.
    pub reload: Box<dyn Fn(Option<HandedConfig>) -> Reloading + Send + Sync>,
    /// Allowlisted networks: a manual ban inside one is refused.
    pub allowlisted: AllowlistCheck,
    /// Where the policy service listens (fixed at start), for `top`.
    pub policy_listeners: Vec<String>,
    /// Whether the fleet is on (`fleet.redis`, fixed at start), for `top`.
    pub fleet: bool,
}

/// Why a request was refused or failed; the client receives the message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("permission denied: the control socket is root-only")]
    NotRoot { uid: Option<u32> },
    #[error(
        "this agent guards the pin directory {}, not {}: pass the same --config or --pin-dir as \
         the agent",
        guards.display(),
        asked.display()
    )]
    OtherPinDir { guards: PathBuf, asked: PathBuf },
    #[error("reading the request: {0}")]
    Read(std::io::Error),
    #[error("no request within 10 s")]
    Timeout,
    #[error("not a control request: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    Target(#[from] AddrError),
    #[error("{0}")]
    PassTarget(String),
    #[error(
        "{target} is in the allowlisted network {network} and would never be dropped: remove it \
         from allowlist.networks first"
    )]
    Allowlisted { target: BanTarget, network: String },
    #[error("the ttl must be longer than 0s")]
    ZeroTtl,
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("the ban worker answered {0:?} to another command: this is a bug, please report it")]
    Mismatched(AdminAnswer),
    #[error(transparent)]
    Stats(#[from] EbpfError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, control: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move { connection(stream, &control).await });
    }
}

async fn connection(mut stream: UnixStream, control: &Control) {
    let result = handle(&mut stream, control).await;
    let line = match &result {
        Ok(answer) => super::encode(Ok(answer)),
        Err(error) => {
            let guards = match error {
                ControlError::OtherPinDir { guards, .. } => Some(guards.as_path()),
                _ => None,
            };
            super::encode(Err(Refusal { message: error.to_string(), guards }))
        }
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line)).await;
}

/// Checks the peer, reads its request and carries it out.
async fn handle(stream: &mut UnixStream, control: &Control) -> Result<Answer, ControlError> {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) {
        tracing::warn!(uid, "control socket: refused a connection from a non-root user");
        return Err(ControlError::NotRoot { uid });
    }
    let envelope = read_request(stream).await?;
    if envelope.pin_dir != control.pin_dir {
        return Err(ControlError::OtherPinDir {
            guards: control.pin_dir.clone(),
            asked: envelope.pin_dir,
        });
    }
    answer(envelope.request, control).await
}

async fn read_request(stream: &mut UnixStream) -> Result<Envelope, ControlError> {
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_MESSAGE as u64));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ControlError::Read(e)),
        Err(_) => return Err(ControlError::Timeout),
    }
    serde_json::from_slice(&line).map_err(ControlError::Malformed)
}

async fn answer(request: Request, control: &Control) -> Result<Answer, ControlError> {
    Ok(match request {
        Request::Ban { target, ttl_secs, reason } => {
            Answer::Banned(ban(control, &target, ttl_secs, reason).await?)
        }
        Request::Unban { target } => {
            let target: BanTarget = target.parse()?;
            // An admin's unban also ends the doors' own hold on a ban just decided.
            control.judge.court().forgive(&target);
            match control.bans.command(AdminCommand::Unban { target }).await? {
                AdminAnswer::Unbanned(was_banned) => Answer::Unbanned(Unbanned { was_banned }),
                other => return Err(ControlError::Mismatched(other)),
            }
        }
        Request::List => match control.bans.command(AdminCommand::List).await? {
            AdminAnswer::Listed(entries) => Answer::Listed(entries),
            other => return Err(ControlError::Mismatched(other)),
        },
        Request::Passes => match control.bans.command(AdminCommand::Passes).await? {
            AdminAnswer::Passes(entries) => Answer::Passes(entries),
            other => return Err(ControlError::Mismatched(other)),
        },
        Request::RemovePasses { target } => {
            let net =
                crate::blocklist::passes::parse_net(&target).map_err(ControlError::PassTarget)?;
            match control.bans.command(AdminCommand::RemovePasses { net }).await? {
                AdminAnswer::PassesRemoved(removed) => {
                    Answer::PassesRemoved(crate::control::PassesRemoved { removed })
                }
                other => return Err(ControlError::Mismatched(other)),
            }
        }
        Request::Stats => Answer::Stats((control.stats)()?),
        Request::Reload { config } => Answer::Reloaded((control.reload)(config).await?),
        Request::Tophelos { since_secs, limit } => {
            let now = crate::clock::unix_ns() / 1_000_000_000;
            let rows = control.judge.court().report.lock().expect("report lock").top(
                now,
                Duration::from_secs(since_secs),
                limit,
            );
            Answer::Tophelos(control.judge.mark_reuse(rows))
        }
        Request::ReusedHelos => Answer::ReusedHelos(control.judge.reused()),
        Request::Overview { since_secs, limit } => {
            Answer::Overview(Box::new(overview(control, Duration::from_secs(since_secs), limit)))
        }
    })
}

/// The rule ids a pass verdict carries besides the checks' own (`table` for an `OK` entry):
/// the sessions counter is read by label, so every rule must be named here or in
/// [`crate::rules::Check::ALL`].
const PASS_RULES: [&str; 3] = ["pass", "allowlist", "exempt_listener"];

/// The counters `top` shows, read from the metrics, the report, the XDP map and the sessions
/// open now.
fn overview(control: &Control, since: Duration, limit: usize) -> Overview {
    let now = crate::clock::unix_ns() / 1_000_000_000;
    let (top_helos, top_rules) = {
        let report = control.judge.court().report.lock().expect("report lock");
        (report.top(now, since, limit), report.top_rules(now, since, limit))
    };
    let top_helos = control.judge.mark_reuse(top_helos);
    let metrics = control.judge.court().metrics.as_deref();
    let gauge = |gauge: &prometheus_client::metrics::gauge::Gauge| gauge.get().max(0) as u64;
    Overview {
        at_ms: crate::clock::boot_ns() / 1_000_000,
        sessions: metrics.map(session_totals).unwrap_or_default(),
        sessions_open: control.judge.court().open_sessions() as u64,
        bans: metrics
            .map(|m| BanCounts {
                added: m.bans_added.get(),
                expired: m.bans_swept.get(),
                queued: gauge(&m.ban_queue),
                active: gauge(&m.bans_active),
            })
            .unwrap_or_default(),
        xdp: (control.stats)().ok(),
        since_secs: since.as_secs(),
        top_helos,
        top_rules,
        policy: PolicyState { listeners: control.policy_listeners.clone() },
        fleet: metrics.filter(|_| control.fleet).map(|m| FleetState {
            connected: m.fleet.connected.get() > 0,
            published: m.fleet.published.get(),
            applied: m.fleet.applied.get(),
            refused: m.fleet.refused.get(),
            outbox: gauge(&m.fleet.outbox),
            master: m.fleet.master_address(),
            last_failover_secs: u64::try_from(m.fleet.last_failover.get()).ok().filter(|&t| t > 0),
        }),
    }
}

/// The sessions counter summed by verdict over its rules.
fn session_totals(metrics: &crate::metrics::Metrics) -> Verdicts {
    use crate::metrics::VerdictLabels;
    let rules = crate::rules::Check::ALL.map(|check| check.name());
    let mut totals = Verdicts::default();
    for (verdict, slot) in [
        ("pass", &mut totals.pass),
        ("reject", &mut totals.reject),
        ("ban", &mut totals.ban),
        ("none", &mut totals.none),
    ] {
        for rule in rules.iter().chain(&PASS_RULES).chain(&[""]) {
            if let Some(counter) = metrics.sessions.get(&VerdictLabels { verdict, rule }) {
                *slot += counter.get();
            }
        }
    }
    totals
}

async fn ban(
    control: &Control,
    target: &str,
    ttl_secs: Option<u64>,
    reason: String,
) -> Result<Banned, ControlError> {
    let target: BanTarget = target.parse()?;
    if let Some(network) = (control.allowlisted)(&target) {
        return Err(ControlError::Allowlisted { target, network });
    }
    let ttl = match ttl_secs {
        None => Ttl::Forever,
        Some(0) => return Err(ControlError::ZeroTtl),
        Some(secs) => Ttl::For(Duration::from_secs(secs)),
    };
    match control.bans.command(AdminCommand::Ban { target, ttl, reason }).await? {
        AdminAnswer::Banned(value) => Ok(Banned { expires_ns: value.expires_ns }),
        other => Err(ControlError::Mismatched(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, VerdictLabels};

    /// The sessions counter is read by label: a rule id missing from the labels `top` reads
    /// would leave its sessions out of the totals unseen.
    #[test]
    fn every_rule_a_verdict_carries_is_read_from_the_sessions_counter() {
        let config = crate::config::Config::parse(
            "[allowlist]\nnetworks = [\"192.0.2.0/24\"]\n[identity]\ndetect = false\n\
             domains = [\"example.org\"]\n",
            std::path::Path::new("t"),
            &crate::config::HostFacts::default(),
        )
        .unwrap();
        let known: Vec<&str> =
            crate::rules::Check::ALL.map(|c| c.name()).into_iter().chain(PASS_RULES).collect();
        let cases = [
            ("mail.example.com", "198.51.100.1", false),
            ("anything", "192.0.2.7", false),
            ("anything", "198.51.100.1", true),
            ("friend", "198.51.100.1", false),
            ("localhost", "198.51.100.1", false),
            ("example.org", "198.51.100.1", false),
        ];
        let mut rules = Vec::new();
        for (helo, client, exempt_listener) in cases {
            let facts = crate::rules::Facts {
                client: Some(client.parse().unwrap()),
                argument: helo,
                previous: &[],
                exempt_listener,
                dns: None,
                pregreeted: false,
                reuse: None,
                looks: false,
            };
            rules.push(config.rules.classify(&facts).rule);
        }
        assert_eq!(
            rules,
            ["pass", "allowlist", "exempt_listener", "no_dot", "localhost", "forged_identity"]
        );
        for rule in rules {
            assert!(known.contains(&rule), "{rule} is not read by session_totals");
        }
    }

    #[test]
    fn session_totals_sum_each_verdict_over_its_rules() {
        let metrics = Metrics::default();
        let count = |verdict, rule, n| {
            metrics.sessions.get_or_create(&VerdictLabels { verdict, rule }).inc_by(n);
        };
        count("pass", "pass", 5);
        count("pass", "allowlist", 2);
        count("pass", "table", 1);
        count("reject", "no_dot", 3);
        count("reject", "badhelo", 1);
        count("ban", "localhost", 2);
        count("none", "", 4);
        assert_eq!(session_totals(&metrics), Verdicts { pass: 8, reject: 4, ban: 2, none: 4 });
    }
}
