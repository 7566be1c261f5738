//! The control socket: a unix socket through which the CLI's `ban`, `unban`, `list`, `stats`,
//! `reload`, `tophelos` (and `tophelos --suggest`) and `top` reach the running agent. One JSON request line, one JSON
//! answer line, then the connection closes. Both ends speak in the types here ([`Request`],
//! [`Answer`]); the JSON is written and read in this module only ([`encode`], [`request`]).
//!
//! Only root may use it: the socket is created mode 0600 by root before the agent drops its
//! privileges, and the server also checks the peer's uid (SO_PEERCRED), so a socket file with
//! loosened permissions still refuses other users. Every request names the pin directory the
//! CLI means; an agent guarding another one refuses, so the CLI never changes the wrong maps.

pub mod server;

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blocklist::BanEntry;
use crate::blocklist::passes::PassEntry;
/// What a reload swapped in (the answer to [`Request::Reload`]).
pub use crate::reload::ReloadSummary;
use crate::report::{HeloRow, RuleCount};
use crate::reuse::ReuseReport;

/// Requests and answers are one line each, at most this long.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// How long the CLI waits for the agent (a reload compiles rules).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The pin directory the CLI works on.
    pub pin_dir: PathBuf,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `ttl_secs: None` bans forever.
    Ban {
        target: String,
        ttl_secs: Option<u64>,
        reason: String,
    },
    Unban {
        target: String,
    },
    List,
    /// The steering passes in force.
    Passes,
    /// Removes the steering passes of a client, or of every client inside a network.
    RemovePasses {
        target: String,
    },
    Stats,
    /// Re-read the config. `config`: the file as the root CLI read it, for an agent that no
    /// longer may (a root-only file: the agent runs as `agent.user`); used when it is the
    /// agent's own file, else the agent reads its own.
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<HandedConfig>,
    },
    Tophelos {
        since_secs: u64,
        limit: usize,
    },
    /// Every HELO name the reuse memory holds as reused now (`tophelos --suggest`).
    ReusedHelos,
    /// The counters `helo-agent top` shows, with the `limit` top HELOs and rules of the last
    /// `since_secs`.
    Overview {
        since_secs: u64,
        limit: usize,
    },
}

/// A config file as the CLI read it, handed to the agent with `reload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedConfig {
    pub path: PathBuf,
    pub text: String,
}

/// The agent's answer to a request it carried out, one variant per [`Request`] variant. On the
/// wire it is the `data` of `{"ok":true,"data":...}`, without a tag: the client knows what it
/// asked, and [`Answer::decode`] reads it as that.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Banned(Banned),
    Unbanned(Unbanned),
    Listed(Vec<BanEntry>),
    Passes(Vec<PassEntry>),
    PassesRemoved(PassesRemoved),
    Stats(XdpStats),
    Reloaded(ReloadSummary),
    Tophelos(Vec<HeloRow>),
    ReusedHelos(ReuseReport),
    Overview(Box<Overview>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Banned {
    /// When the ban ends (CLOCK_BOOTTIME ns; `u64::MAX`: never).
    pub expires_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassesRemoved {
    /// How many passes went.
    pub removed: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbanned {
    /// Whether there was a ban to lift.
    pub was_banned: bool,
}

/// The agent's counters at one moment, for `helo-agent top`: totals since the agent started
/// (the viewer turns two of them into rates), gauges, and the report's top HELOs and rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overview {
    /// When it was taken, CLOCK_BOOTTIME in ms: rates are measured on the agent's clock, not
    /// on when the answers arrived.
    pub at_ms: u64,
    /// Finished sessions by verdict, both doors.
    pub sessions: Verdicts,
    pub sessions_open: u64,
    pub bans: BanCounts,
    /// The XDP verdict counters; `None` when the map could not be read.
    pub xdp: Option<XdpStats>,
    /// How far back `top_helos` and `top_rules` look.
    pub since_secs: u64,
    pub top_helos: Vec<HeloRow>,
    /// Rules by the sessions they rejected or banned.
    pub top_rules: Vec<RuleCount>,
    pub policy: PolicyState,
    /// The fleet channel; `None` when this agent has none.
    pub fleet: Option<FleetState>,
}

/// Sessions by verdict; `none`: the client gave no HELO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdicts {
    pub pass: u64,
    pub reject: u64,
    pub ban: u64,
    pub none: u64,
}

/// The ban counters: totals since the agent started, and the bans in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanCounts {
    pub added: u64,
    /// Expired bans swept from the maps.
    pub expired: u64,
    /// Rule bans decided and waiting for the ban worker (never dropped).
    #[serde(default)]
    pub queued: u64,
    pub active: u64,
}

/// The Postfix policy service as the agent runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Where it listens; empty: off.
    pub listeners: Vec<String>,
}

/// The fleet's counters (bans shared with other gateways through Redis).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    /// Connected to Redis (subscribed and caught up).
    pub connected: bool,
    /// Bans and unbans made here and written to Redis.
    pub published: u64,
    /// Bans and unbans made by other gateways and applied here.
    pub applied: u64,
    /// Bans from other gateways refused (the address is allowlisted here).
    pub refused: u64,
    /// Bans and unbans made here waiting for Redis to come back.
    pub outbox: u64,
    /// The Redis node written to (the master, `host:port`); `None` before the first
    /// connection (and from an agent that predates it).
    #[serde(default)]
    pub master: Option<String>,
    /// When this gateway last found a new master (a failover), Unix seconds.
    #[serde(default)]
    pub last_failover_secs: Option<u64>,
}

/// The XDP program's verdict counters, summed over CPUs. On the wire an object by counter name
/// (`{"dropped":3,...}`, names in alphabetical order); a counter an older agent lacks reads as 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpStats(pub [u64; helo_common::STAT_COUNT as usize]);

impl XdpStats {
    pub fn get(&self, stat: helo_common::Stat) -> u64 {
        self.0[stat as usize]
    }
}

impl Serialize for XdpStats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let by_name: std::collections::BTreeMap<&str, u64> =
            helo_common::Stat::ALL.iter().map(|&stat| (stat.name(), self.get(stat))).collect();
        by_name.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for XdpStats {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let by_name = std::collections::BTreeMap::<String, u64>::deserialize(deserializer)?;
        let mut totals = [0; helo_common::STAT_COUNT as usize];
        for (name, value) in by_name {
            if let Some(stat) = helo_common::Stat::ALL.into_iter().find(|s| s.name() == name) {
                totals[stat as usize] = value;
            }
        }
        Ok(XdpStats(totals))
    }
}

impl Answer {
    /// Reads `data` as the answer to `request`.
    fn decode(request: &Request, data: serde_json::Value) -> Result<Answer, serde_json::Error> {
        use serde_json::from_value;
        Ok(match request {
            Request::Ban { .. } => Answer::Banned(from_value(data)?),
            Request::Unban { .. } => Answer::Unbanned(from_value(data)?),
            Request::List => Answer::Listed(from_value(data)?),
            Request::Passes => Answer::Passes(from_value(data)?),
            Request::RemovePasses { .. } => Answer::PassesRemoved(from_value(data)?),
            Request::Stats => Answer::Stats(from_value(data)?),
            Request::Reload { .. } => Answer::Reloaded(from_value(data)?),
            Request::Tophelos { .. } => Answer::Tophelos(from_value(data)?),
            Request::ReusedHelos => Answer::ReusedHelos(from_value(data)?),
            Request::Overview { .. } => Answer::Overview(from_value(data)?),
        })
    }
}

/// One answer line as it travels: `{"ok":true,"data":ANSWER}`, or `{"ok":false,"error":TEXT,
/// "data":null}`; a refusal for another pin directory has `"data":{"pin_dir":GUARDED}`.
#[derive(Serialize)]
struct WireAnswer<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    data: WireData<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireData<'a> {
    Answer(&'a Answer),
    OtherPinDir { pin_dir: &'a Path },
    None,
}

/// [`WireAnswer`] as the client reads it: `data` is decoded once it is known which it is.
#[derive(Deserialize)]
struct ReadAnswer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct OtherPinDir {
    pin_dir: PathBuf,
}

/// Why the agent did not carry out a request: its message, and for a refusal because it guards
/// another pin directory, that directory.
pub struct Refusal<'a> {
    pub message: String,
    pub guards: Option<&'a Path>,
}

/// The answer line (with its newline) for what the agent did.
pub fn encode(answer: Result<&Answer, Refusal<'_>>) -> Vec<u8> {
    let wire = match answer {
        Ok(answer) => WireAnswer { ok: true, error: None, data: WireData::Answer(answer) },
        Err(Refusal { message, guards }) => WireAnswer {
            ok: false,
            error: Some(message),
            data: guards.map_or(WireData::None, |pin_dir| WireData::OtherPinDir { pin_dir }),
        },
    };
    let mut line = serde_json::to_vec(&wire).expect("answers serialize");
    line.push(b'\n');
    line
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens there (no socket file, or a stale one).
    #[error("no agent is running at {path} (start it with `helo-agent run`)")]
    NotRunning { path: PathBuf },
    #[error("{path}: permission denied: the control socket is root-only; run this as root")]
    Denied { path: PathBuf },
    #[error("control socket {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("the agent at {path} sent an answer that does not parse: {source}")]
    Garbled { path: PathBuf, source: serde_json::Error },
    /// The agent guards another pin directory; the message says which.
    #[error("{message}")]
    OtherPinDir { guards: PathBuf, message: String },
    /// The agent refused or failed the request, and says why.
    #[error("{message}")]
    Refused { message: String },
}

/// Sends one request to the agent at `path` and returns its answer; an error the agent reports
/// is [`ClientError::Refused`] (or [`ClientError::OtherPinDir`]).
pub fn request(path: &Path, envelope: &Envelope) -> Result<Answer, ClientError> {
    let io = |error: std::io::Error| ClientError::Io { path: path.to_owned(), error };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning { path: path.to_owned() });
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::Denied { path: path.to_owned() });
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(envelope).expect("requests serialize");
    line.push(b'\n');
    // An agent that refuses us answers without reading: a failed write still leaves its
    // answer to read.
    let written = stream.write_all(&line);
    let mut answer = Vec::new();
    let read = std::io::BufReader::new(std::io::Read::take(stream, MAX_MESSAGE as u64))
        .read_until(b'\n', &mut answer);
    if answer.is_empty() {
        written.map_err(io)?;
        read.map_err(io)?;
    }
    let garbled = |source| ClientError::Garbled { path: path.to_owned(), source };
    let answer: ReadAnswer = serde_json::from_slice(&answer).map_err(garbled)?;
    if answer.ok {
        return Answer::decode(&envelope.request, answer.data).map_err(garbled);
    }
    let message = answer.error.unwrap_or_default();
    Err(match serde_json::from_value::<OtherPinDir>(answer.data) {
        Ok(OtherPinDir { pin_dir }) => ClientError::OtherPinDir { guards: pin_dir, message },
        Err(_) => ClientError::Refused { message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let envelope = Envelope {
            pin_dir: "/sys/fs/bpf/helo-filter".into(),
            request: Request::Ban {
                target: "192.0.2.1".into(),
                ttl_secs: Some(60),
                reason: "x".into(),
            },
        };
        let text = serde_json::to_string(&envelope).unwrap();
        assert_eq!(
            text,
            r#"{"pin_dir":"/sys/fs/bpf/helo-filter","command":"ban","target":"192.0.2.1","ttl_secs":60,"reason":"x"}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), envelope);
        let list: Envelope = serde_json::from_str(r#"{"pin_dir":"/p","command":"list"}"#).unwrap();
        assert_eq!(list.request, Request::List);
        assert!(
            serde_json::from_str::<Envelope>(r#"{"pin_dir":"/p","command":"rm -rf"}"#).is_err()
        );
    }

    #[test]
    fn answers_have_a_stable_wire_form() {
        let answer = Answer::Unbanned(Unbanned { was_banned: true });
        let line = encode(Ok(&answer));
        assert_eq!(line, b"{\"ok\":true,\"data\":{\"was_banned\":true}}\n");
        let message = "no".to_owned();
        let line = encode(Err(Refusal { message, guards: Some(Path::new("/p")) }));
        assert_eq!(line, b"{\"ok\":false,\"error\":\"no\",\"data\":{\"pin_dir\":\"/p\"}}\n");
        let line = encode(Err(Refusal { message: "no".into(), guards: None }));
        assert_eq!(line, b"{\"ok\":false,\"error\":\"no\",\"data\":null}\n");
        let mut totals = [0; helo_common::STAT_COUNT as usize];
        totals[helo_common::Stat::Dropped as usize] = 3;
        let stats = serde_json::to_string(&XdpStats(totals)).unwrap();
        assert!(
            stats.starts_with(r#"{"allowlisted":0,"banned_not_syn":0,"dropped":3,"#),
            "{stats}"
        );
        let read: XdpStats = serde_json::from_str(r#"{"dropped":3,"future":1}"#).unwrap();
        assert_eq!(read, XdpStats(totals));
    }

    #[test]
    fn an_overview_goes_and_comes_back_whole() {
        let request: Envelope = serde_json::from_str(
            r#"{"pin_dir":"/p","command":"overview","since_secs":300,"limit":9}"#,
        )
        .unwrap();
        assert_eq!(request.request, Request::Overview { since_secs: 300, limit: 9 });
        let overview = Overview {
            at_ms: 12_345,
            sessions: Verdicts { pass: 3, reject: 2, ban: 1, none: 0 },
            sessions_open: 1,
            bans: BanCounts { added: 1, expired: 0, queued: 0, active: 1 },
            xdp: Some(XdpStats([7; helo_common::STAT_COUNT as usize])),
            since_secs: 300,
            top_helos: Vec::new(),
            top_rules: vec![RuleCount { rule: "no_dot".into(), sessions: 2 }],
            policy: PolicyState { listeners: vec!["127.0.0.1:10040".into()] },
            fleet: Some(FleetState {
                connected: true,
                master: Some("10.0.0.6:6379".into()),
                last_failover_secs: Some(1_700_000_000),
                ..FleetState::default()
            }),
        };
        let line = encode(Ok(&Answer::Overview(Box::new(overview.clone()))));
        let read: ReadAnswer = serde_json::from_slice(&line).unwrap();
        let answer = Answer::decode(&request.request, read.data).unwrap();
        assert_eq!(answer, Answer::Overview(Box::new(overview)));
    }

    #[test]
    fn a_missing_socket_means_no_agent() {
        let envelope = Envelope { pin_dir: "/p".into(), request: Request::List };
        let err = request(Path::new("/nonexistent/helo.sock"), &envelope).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    }
}
