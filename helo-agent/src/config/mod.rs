//! Configuration: TOML read into [`RawConfig`] (serde, unknown keys refused), then validated into
//! [`Config`], which holds real values: parsed networks, durations, and the compiled
//! [`RuleSet`] with the imported rule files. Nothing binds or loads before the whole config has
//! validated. With no file the agent runs on the embedded defaults, which
//! `helo-filter.example.toml` documents key by key (a test keeps the two in step).

pub mod import;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::blocklist::Ttl;
use crate::blocklist::worker::Escalation;
use crate::ebpf::{AttachMode, MapSizes};
use crate::proxy::header::ProxyProtocol;
use crate::rules::badhelo::BadheloSet;
use crate::rules::table::DomainPattern;
use crate::rules::{CHECK_COUNT, Check, CheckAction, EntryRef, Identity, RejectAt, RuleSet};

/// Directories the snapshot may not live in directly (the agent chowns the snapshot's
/// directory to agent.user).
const SHARED_DIRS: &[&str] = &[
    "/",
    "/etc",
    "/home",
    "/opt",
    "/root",
    "/run",
    "/srv",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/run",
    "/var/tmp",
    "/var/spool",
];

/// The example config, every key at its default, with comments.
pub const EXAMPLE: &str = include_str!("../../helo-filter.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("cannot read {key} file {path}: {source}")]
    RuleFile { key: &'static str, path: PathBuf, source: std::io::Error },
    /// Every rule entry that does not load (domain patterns, access table lines, regexes), each
    /// as `file:line: what is wrong`, so one `check-config` run lists them all.
    #[error("{}", bad_entries(.0))]
    BadEntries(Vec<String>),
}

fn bad_entries(entries: &[String]) -> String {
    match entries {
        [one] => format!("bad rule entry: {one}"),
        all => format!(
            "{} bad rule entries, each with its file and line:\n  {}",
            all.len(),
            all.join("\n  ")
        ),
    }
}

/// Port 465 is SMTPS (RFC 8314 implicit TLS): the client starts TLS with its first byte.
pub const SMTPS_PORT: u16 = 465;

/// Refuses a listener the proxy cannot serve. Used for `proxy.listeners` and `run --listen`.
pub fn check_listener(address: std::net::SocketAddr) -> Result<(), String> {
    if address.port() == SMTPS_PORT {
        return Err(format!(
            "{address}: port {SMTPS_PORT} is SMTPS, where clients speak TLS from the first byte: \
             the proxy cannot read their HELO there, and its plaintext greeting breaks them; let \
             the MTA listen on {SMTPS_PORT} itself (the XDP filter still drops banned sources \
             there while {SMTPS_PORT} is in xdp.ports)"
        ));
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub agent: RawAgent,
    pub xdp: RawXdp,
    pub bans: RawBans,
    pub allowlist: RawAllowlist,
    pub identity: RawIdentity,
    pub rules: RawRules,
    pub checks: RawChecks,
    pub reject: RawReject,
    pub proxy: RawProxy,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAgent {
    pub user: String,
    pub control_socket: PathBuf,
    pub metrics: String,
    pub report_window: String,
}

impl Default for RawAgent {
    fn default() -> Self {
        Self {
            user: "helo-filter".into(),
            control_socket: PathBuf::from("/run/helo-filter/control.sock"),
            metrics: String::new(),
            report_window: "24h".into(),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    pub listeners: Vec<RawListener>,
    pub upstream: String,
    pub proxy_protocol: ProxyProtocol,
    pub greeting: GreetingMode,
    pub hostname: String,
    pub trusted_proxies: Vec<String>,
    pub helo_timeout: String,
    pub idle_timeout: String,
    pub upstream_timeout: String,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    pub shutdown_grace: String,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listeners: vec![
                RawListener { address: "0.0.0.0:25".into(), check_helo: true },
                RawListener { address: "[::]:25".into(), check_helo: true },
            ],
            upstream: "127.0.0.1:10025".into(),
            proxy_protocol: ProxyProtocol::V2,
            greeting: GreetingMode::Own,
            hostname: String::new(),
            trusted_proxies: Vec::new(),
            helo_timeout: "60s".into(),
            idle_timeout: "5m".into(),
            upstream_timeout: "30s".into(),
            max_sessions: 10_000,
            max_sessions_per_ip: 20,
            shutdown_grace: "30s".into(),
        }
    }
}

/// Who greets the client: the proxy itself, connecting to the MTA only for a client whose HELO
/// passed (as postscreen does: idle and rejected bots never take an MTA process), or the MTA,
/// connected at accept and its own banner relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GreetingMode {
    Own,
    Mta,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: String,
    #[serde(default = "yes")]
    pub check_helo: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawXdp {
    pub interface: Option<String>,
    pub mode: AttachMode,
    pub ports: Vec<u16>,
    pub pin_dir: PathBuf,
    pub max_bans_v4: u32,
    pub max_bans_v6: u32,
    pub max_bans_v6_net: u32,
}

impl Default for RawXdp {
    fn default() -> Self {
        let sizes = MapSizes::default();
        Self {
            interface: None,
            mode: AttachMode::Auto,
            ports: helo_common::DEFAULT_PORTS.to_vec(),
            pin_dir: PathBuf::from(crate::ebpf::DEFAULT_PIN_DIR),
            max_bans_v4: sizes.bans_v4,
            max_bans_v6: sizes.bans_v6,
            max_bans_v6_net: sizes.bans_v6_net,
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBans {
    pub default_ttl: String,
    pub escalation_factor: u32,
    pub max_ttl: String,
    pub history_size: usize,
    pub max_per_second: u32,
    pub snapshot: PathBuf,
    pub snapshot_interval: String,
}

impl Default for RawBans {
    fn default() -> Self {
        Self {
            default_ttl: "1h".into(),
            escalation_factor: 2,
            max_ttl: "1w".into(),
            history_size: 100_000,
            max_per_second: 100,
            snapshot: PathBuf::from("/var/lib/helo-filter/bans.json"),
            snapshot_interval: "5m".into(),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAllowlist {
    pub networks: Vec<String>,
}

impl Default for RawAllowlist {
    fn default() -> Self {
        Self { networks: vec!["127.0.0.0/8".into(), "::1/128".into()] }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub detect: bool,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self { domains: Vec::new(), addresses: Vec::new(), detect: true }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRules {
    pub domains: Vec<String>,
    pub regexes: Vec<String>,
    pub badhelo_file: Option<PathBuf>,
    pub access_file: Option<PathBuf>,
    pub access_parent_matches_subdomains: bool,
}

impl Default for RawRules {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            regexes: Vec::new(),
            badhelo_file: None,
            access_file: None,
            access_parent_matches_subdomains: true,
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawChecks {
    pub table: CheckAction,
    pub forged_identity: CheckAction,
    pub badhelo: CheckAction,
    pub invalid: CheckAction,
    pub localhost: CheckAction,
    pub bare_ip: CheckAction,
    pub literal_mismatch: CheckAction,
    pub no_dot: CheckAction,
    pub private_suffix: CheckAction,
    pub dynamic: CheckAction,
    pub changed: CheckAction,
}

impl Default for RawChecks {
    /// Safe for a real gateway: ban only the unmistakable bot marks (our own identity, a bare IP,
    /// localhost), reject the rest of the RFC violations, and only log the heuristics.
    fn default() -> Self {
        use CheckAction::{Ban, Log, Reject};
        Self {
            table: Reject,
            forged_identity: Ban,
            badhelo: Reject,
            invalid: Reject,
            localhost: Ban,
            bare_ip: Ban,
            literal_mismatch: Reject,
            no_dot: Reject,
            private_suffix: Reject,
            dynamic: Log,
            changed: Log,
        }
    }
}

impl RawChecks {
    fn actions(&self) -> [CheckAction; CHECK_COUNT] {
        let mut actions = [CheckAction::Off; CHECK_COUNT];
        for check in Check::ALL {
            actions[check as usize] = match check {
                Check::Table => self.table,
                Check::ForgedIdentity => self.forged_identity,
                Check::Badhelo => self.badhelo,
                Check::Invalid => self.invalid,
                Check::Localhost => self.localhost,
                Check::BareIp => self.bare_ip,
                Check::LiteralMismatch => self.literal_mismatch,
                Check::NoDot => self.no_dot,
                Check::PrivateSuffix => self.private_suffix,
                Check::Dynamic => self.dynamic,
                Check::Changed => self.changed,
            };
        }
        actions
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReject {
    pub at: RejectAt,
    pub message: String,
}

impl Default for RawReject {
    fn default() -> Self {
        Self { at: RejectAt::Rcpt, message: "sorry, your HELO host name has been denied".into() }
    }
}

/// What the host says about itself, for `identity.detect`. Read once, at load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub hostname: Option<String>,
    /// The first line of /etc/mailname (Debian's name of the mail system).
    pub mailname: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl HostFacts {
    pub fn detect() -> Self {
        let hostname = rustix::system::uname().nodename().to_string_lossy().trim().to_owned();
        let mailname = std::fs::read_to_string("/etc/mailname")
            .ok()
            .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
            .filter(|name| !name.is_empty());
        let addresses = if_addrs::get_if_addrs()
            .map(|ifs| ifs.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        HostFacts { hostname: Some(hostname).filter(|h| !h.is_empty()), mailname, addresses }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from (`None`: embedded defaults), for messages.
    pub source: Option<PathBuf>,
    pub xdp: XdpConfig,
    /// The compiled rules; they also hold the allowlist and the ban TTL the rest of the agent
    /// uses.
    pub rules: Arc<RuleSet>,
    /// The text of the 553 reply to a rejected client.
    pub reject_message: String,
    /// Things that load but deserve a look (entries Postfix would ignore, duplicates).
    pub warnings: Vec<String>,
    pub escalation: Escalation,
    pub proxy: ProxyConfig,
    pub agent: AgentConfig,
    pub snapshot: SnapshotConfig,
}

/// Process-level settings: who the agent runs as, where it is controlled and observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The user to switch to after binding and attaching; `None` stays root.
    pub user: Option<String>,
    pub control_socket: PathBuf,
    /// Prometheus metrics over HTTP; `None`: off.
    pub metrics: Option<std::net::SocketAddr>,
    /// How far back `tophelos` can look.
    pub report_window: Duration,
}

/// Where bans and offence history are saved, and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// `None`: no snapshots.
    pub path: Option<PathBuf>,
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub address: std::net::SocketAddr,
    /// false: a submission listener, HELO not checked (the NOBADHELO idea).
    pub check_helo: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    pub upstream: std::net::SocketAddr,
    pub proxy_protocol: ProxyProtocol,
    pub greeting: GreetingMode,
    /// The name in the proxy's own 220 and its replies to rejected clients.
    pub hostname: String,
    /// Front proxies (load balancers) whose PROXY header names the real client.
    pub trusted_proxies: Vec<IpNet>,
    /// From the greeting to the HELO/EHLO.
    pub helo_timeout: Duration,
    /// Between reads from a rejected client, and of a relayed session with no traffic.
    pub idle_timeout: Duration,
    /// To connect to the MTA and read its greeting.
    pub upstream_timeout: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// On SIGTERM/SIGINT: how long sessions in flight may take to end.
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct XdpConfig {
    /// `None`: the interface of the default route.
    pub interface: Option<String>,
    pub mode: AttachMode,
    pub ports: Vec<u16>,
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
}

impl Config {
    /// Reads and validates `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                parse_raw(&text, path)?
            }
        };
        let host = if raw.identity.detect { HostFacts::detect() } else { HostFacts::default() };
        Self::from_raw(raw, path, &host)
    }

    /// Parses and validates TOML text; `path` names it in errors. `host` stands in for detection.
    pub fn parse(text: &str, path: &Path, host: &HostFacts) -> Result<Self, ConfigError> {
        Self::from_raw(parse_raw(text, path)?, Some(path), host)
    }

    pub fn from_raw(
        raw: RawConfig,
        path: Option<&Path>,
        host: &HostFacts,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.map_or_else(|| PathBuf::from("<embedded defaults>"), Path::to_owned),
            key: key.to_owned(),
            message,
        };
        if raw.xdp.ports.is_empty() {
            return Err(invalid("xdp.ports", "no ports: list at least one, such as 25".into()));
        }
        if raw.xdp.ports.contains(&0) {
            return Err(invalid("xdp.ports", "port 0 is not a TCP port".into()));
        }
        for (key, size) in [
            ("xdp.max_bans_v4", raw.xdp.max_bans_v4),
            ("xdp.max_bans_v6", raw.xdp.max_bans_v6),
            ("xdp.max_bans_v6_net", raw.xdp.max_bans_v6_net),
        ] {
            if !(16..=16_777_216).contains(&size) {
                return Err(invalid(key, format!("{size} is outside 16..=16777216")));
            }
        }
        if let Some(iface) = &raw.xdp.interface
            && (iface.is_empty() || iface.len() > 15 || iface.contains('/'))
        {
            return Err(invalid("xdp.interface", format!("{iface:?} is not an interface name")));
        }
        if !raw.xdp.pin_dir.is_absolute() {
            return Err(invalid("xdp.pin_dir", "must be an absolute path under a bpffs".into()));
        }
        let default_ttl = crate::duration::parse(&raw.bans.default_ttl)
            .map_err(|e| invalid("bans.default_ttl", e.to_string()))?;
        if default_ttl.is_zero() {
            return Err(invalid("bans.default_ttl", "must be longer than 0s".into()));
        }
        let allowlist = parse_networks(&raw.allowlist.networks)
            .map_err(|message| invalid("allowlist.networks", message))?;
        let message = raw.reject.message.trim().to_owned();
        if message.is_empty() || message.len() > 400 || message.contains(['\r', '\n']) {
            return Err(invalid(
                "reject.message",
                "must be one line of text, at most 400 characters".into(),
            ));
        }

        let duration = |key: &str, text: &str| {
            let value = crate::duration::parse(text).map_err(|e| invalid(key, e.to_string()))?;
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s".into()));
            }
            Ok(value)
        };
        let max_ttl = duration("bans.max_ttl", &raw.bans.max_ttl)?;
        if raw.bans.escalation_factor == 0 {
            return Err(invalid(
                "bans.escalation_factor",
                "must be 1 (no escalation) or more".into(),
            ));
        }
        if raw.bans.history_size == 0 {
            return Err(invalid("bans.history_size", "must be at least 1".into()));
        }
        if raw.bans.max_per_second == 0 {
            return Err(invalid("bans.max_per_second", "must be at least 1".into()));
        }
        let escalation = Escalation {
            factor: raw.bans.escalation_factor,
            max_ttl,
            history: raw.bans.history_size,
            max_per_second: raw.bans.max_per_second,
        };
        let absolute = |key: &str, path: PathBuf| {
            if path.is_absolute() {
                Ok(path)
            } else {
                Err(invalid(key, format!("{} is not an absolute path", path.display())))
            }
        };
        let socket = |key: &str, text: &str| {
            text.trim().parse::<std::net::SocketAddr>().map_err(|_| {
                invalid(
                    key,
                    format!("{text:?} is not an address:port (write 0.0.0.0:25 or [::]:25)"),
                )
            })
        };
        if raw.proxy.listeners.is_empty() {
            return Err(invalid(
                "proxy.listeners",
                "no listeners: give at least one address".into(),
            ));
        }
        let listeners = raw
            .proxy
            .listeners
            .iter()
            .map(|l| {
                let address = socket("proxy.listeners.address", &l.address)?;
                check_listener(address)
                    .map_err(|message| invalid("proxy.listeners.address", message))?;
                Ok(ListenerConfig { address, check_helo: l.check_helo })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if raw.proxy.max_sessions == 0 || raw.proxy.max_sessions_per_ip == 0 {
            return Err(invalid("proxy.max_sessions", "session limits must be at least 1".into()));
        }
        let proxy = ProxyConfig {
            listeners,
            upstream: socket("proxy.upstream", &raw.proxy.upstream)?,
            proxy_protocol: raw.proxy.proxy_protocol,
            greeting: raw.proxy.greeting,
            trusted_proxies: parse_networks(&raw.proxy.trusted_proxies)
                .map_err(|message| invalid("proxy.trusted_proxies", message))?,
            hostname: match raw.proxy.hostname.trim() {
                "" => host.hostname.clone().unwrap_or_else(|| {
                    let name = rustix::system::uname().nodename().to_string_lossy().into_owned();
                    if name.is_empty() { "localhost".into() } else { name }
                }),
                name if name.contains(|c: char| c.is_whitespace() || c.is_control()) => {
                    return Err(invalid("proxy.hostname", format!("{name:?} is not a host name")));
                }
                name => name.to_owned(),
            },
            helo_timeout: duration("proxy.helo_timeout", &raw.proxy.helo_timeout)?,
            idle_timeout: duration("proxy.idle_timeout", &raw.proxy.idle_timeout)?,
            upstream_timeout: duration("proxy.upstream_timeout", &raw.proxy.upstream_timeout)?,
            max_sessions: raw.proxy.max_sessions,
            max_sessions_per_ip: raw.proxy.max_sessions_per_ip,
            shutdown_grace: duration("proxy.shutdown_grace", &raw.proxy.shutdown_grace)?,
        };

        let agent = AgentConfig {
            user: match raw.agent.user.trim() {
                "" | "root" => None,
                user => Some(user.to_owned()),
            },
            control_socket: absolute("agent.control_socket", raw.agent.control_socket)?,
            metrics: match raw.agent.metrics.trim() {
                "" | "off" => None,
                text => Some(socket("agent.metrics", text)?),
            },
            report_window: duration("agent.report_window", &raw.agent.report_window)?,
        };
        let snapshot = SnapshotConfig {
            path: if raw.bans.snapshot.as_os_str().is_empty() {
                None
            } else {
                let path = absolute("bans.snapshot", raw.bans.snapshot)?;
                // The agent gives the snapshot's directory to agent.user: never a shared one.
                let dir = path.parent().unwrap_or(Path::new("/"));
                if SHARED_DIRS.iter().any(|shared| dir == Path::new(shared)) {
                    return Err(invalid(
                        "bans.snapshot",
                        format!(
                            "{} is a shared directory, and the agent makes the snapshot's \
                             directory its own: use a directory of its own, such as \
                             /var/lib/helo-filter/bans.json",
                            dir.display()
                        ),
                    ));
                }
                Some(path)
            },
            interval: duration("bans.snapshot_interval", &raw.bans.snapshot_interval)?,
        };

        let mut warnings = Vec::new();
        if agent.user.is_none() {
            warnings.push(
                "agent.user is empty: the agent keeps running as root after start-up (set \
                 agent.user = \"helo-filter\" to drop privileges)"
                    .to_owned(),
            );
        }
        if let Some(address) = agent.metrics
            && !address.ip().is_loopback()
        {
            warnings.push(format!(
                "agent.metrics = {address} is reachable from other hosts: bind it to 127.0.0.1 \
                 unless a firewall guards it"
            ));
        }
        let identity = identity(&raw.identity, host, &mut warnings)
            .map_err(|(key, message)| invalid(key, message))?;
        // Every bad entry of every rule source at once, not the first one only.
        let mut bad = Vec::new();
        let table = table(&raw.rules, &mut warnings, &mut bad)?;
        let badhelo = badhelo(&raw.rules, &mut bad)?;
        if !bad.is_empty() {
            return Err(ConfigError::BadEntries(bad));
        }

        let mut ports = raw.xdp.ports;
        ports.sort_unstable();
        ports.dedup();
        let rules = RuleSet {
            actions: raw.checks.actions(),
            identity,
            allowlist,
            table,
            badhelo,
            reject_at: raw.reject.at,
            ban_ttl: default_ttl,
        };
        Ok(Config {
            source: path.map(Path::to_owned),
            xdp: XdpConfig {
                interface: raw.xdp.interface,
                mode: raw.xdp.mode,
                ports,
                pin_dir: raw.xdp.pin_dir,
                sizes: MapSizes {
                    bans_v4: raw.xdp.max_bans_v4,
                    bans_v6: raw.xdp.max_bans_v6,
                    bans_v6_net: raw.xdp.max_bans_v6_net,
                },
            },
            rules: Arc::new(rules),
            reject_message: message,
            warnings,
            escalation,
            proxy,
            agent,
            snapshot,
        })
    }

    pub fn default_ban_ttl(&self) -> Ttl {
        Ttl::For(self.rules.ban_ttl)
    }
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.to_string().trim_end().to_owned(),
    })
}

fn config_entry(key: &str, index: usize, text: &str) -> Arc<EntryRef> {
    Arc::new(EntryRef { source: format!("config {key}"), line: index + 1, text: text.to_owned() })
}

/// Our identity: configured names and addresses, plus (with `detect`) the host name, its
/// domain, /etc/mailname and the local addresses. Detected names cover that name only.
fn identity(
    raw: &RawIdentity,
    host: &HostFacts,
    warnings: &mut Vec<String>,
) -> Result<Identity, (&'static str, String)> {
    let mut identity = Identity::default();
    for (index, text) in raw.domains.iter().enumerate() {
        let pattern = DomainPattern::parse(text).map_err(|e| ("identity.domains", e))?;
        if let Some(dup) =
            identity.names.insert(&pattern, config_entry("identity.domains", index, text))
        {
            warnings.push(format!("identity.domains: {text:?} repeats {:?}", dup.existing.text));
        }
    }
    for text in &raw.addresses {
        let ip: IpAddr = text.trim().parse().map_err(|_| {
            (
                "identity.addresses",
                format!("{text:?} is not an IP address (write 192.0.2.25 or 2001:db8::25)"),
            )
        })?;
        identity.addresses.insert(crate::addr::canonical(ip));
    }
    if raw.detect {
        let mut detected: Vec<(String, &str)> = Vec::new();
        if let Some(hostname) = &host.hostname {
            detected.push((hostname.clone(), "host name"));
            if let Some((_, domain)) = hostname.split_once('.')
                && domain.contains('.')
            {
                detected.push((domain.to_owned(), "host's domain"));
            }
        }
        if let Some(mailname) = &host.mailname {
            detected.push((mailname.clone(), "/etc/mailname"));
        }
        for (name, origin) in detected {
            // A host name that is not a valid DNS name (containers) cannot be forged in a HELO.
            if let Ok(pattern) = DomainPattern::parse(&format!("={name}")) {
                let entry = Arc::new(EntryRef {
                    source: format!("detected {origin}"),
                    line: 0,
                    text: format!("={}", pattern.name),
                });
                identity.names.insert(&pattern, entry);
            }
        }
        for ip in &host.addresses {
            let is_link_local =
                matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
            if !is_link_local {
                identity.addresses.insert(crate::addr::canonical(*ip));
            }
        }
    }
    Ok(identity)
}

fn read_rule_file(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::RuleFile {
        key,
        path: path.to_owned(),
        source,
    })
}

/// The domain table: `rules.domains` first, then the Postfix access file. Entries that do not
/// parse go to `bad`.
fn table(
    raw: &RawRules,
    warnings: &mut Vec<String>,
    bad: &mut Vec<String>,
) -> Result<crate::rules::table::DomainTable<crate::rules::TableEntry>, ConfigError> {
    let mut table = crate::rules::table::DomainTable::default();
    for (index, text) in raw.domains.iter().enumerate() {
        let pattern = match DomainPattern::parse(text) {
            Ok(pattern) => pattern,
            Err(why) => {
                bad.push(format!("{}: {why}", config_entry("rules.domains", index, text)));
                continue;
            }
        };
        let entry = crate::rules::TableEntry {
            action: crate::rules::TableAction::Deny(None),
            entry: config_entry("rules.domains", index, text),
        };
        if let Some(dup) = table.insert(&pattern, entry) {
            warnings.push(format!("rules.domains: {text:?} repeats {}", dup.existing.entry));
        }
    }
    if let Some(path) = &raw.access_file {
        let text = read_rule_file("rules.access_file", path)?;
        let source = path.display().to_string();
        let imported =
            match import::access_table(&text, &source, raw.access_parent_matches_subdomains) {
                Ok(imported) => imported,
                Err(errors) => {
                    bad.extend(errors);
                    return Ok(table);
                }
            };
        warnings.extend(imported.warnings);
        for (pattern, entry) in imported.entries {
            let at = entry.entry.clone();
            if let Some(dup) = table.insert(&pattern, entry) {
                warnings.push(format!(
                    "{at}: {pattern} is already covered by {} ({}); the first entry wins",
                    dup.existing.entry, dup.existing.entry.text
                ));
            }
        }
    }
    Ok(table)
}

/// The regex rules: `rules.regexes` first, then the badhelo file. Patterns that do not parse go
/// to `bad` (and the set returned is empty).
fn badhelo(raw: &RawRules, bad: &mut Vec<String>) -> Result<BadheloSet, ConfigError> {
    let inline: String = raw.regexes.iter().map(|line| format!("{line}\n")).collect();
    let mut rules = import::badhelo(&inline, "config rules.regexes");
    if let Some(path) = &raw.badhelo_file {
        let text = read_rule_file("rules.badhelo_file", path)?;
        rules.extend(import::badhelo(&text, &path.display().to_string()));
    }
    Ok(BadheloSet::new(rules).unwrap_or_else(|errors| {
        bad.extend(errors);
        BadheloSet::default()
    }))
}

/// The control socket and the pin directory named in the config file at `path`, read leniently
/// (the defaults for what is missing, or when the file does not read or parse): `helo-agent
/// reload` must reach the agent even when the file does not validate, so that the agent itself
/// refuses it, says why, and counts the refusal.
pub fn control_locations(path: Option<&Path>) -> (PathBuf, PathBuf) {
    let table = path
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok());
    let get = |section: &str, key: &str| {
        table.as_ref()?.get(section)?.get(key)?.as_str().map(PathBuf::from)
    };
    (
        get("agent", "control_socket").unwrap_or_else(|| RawAgent::default().control_socket),
        get("xdp", "pin_dir").unwrap_or_else(|| RawXdp::default().pin_dir),
    )
}

/// Parses CIDRs (a bare address means that one host), refusing host bits set below the prefix
/// length, since `192.0.2.1/24` is usually a typo for something else.
pub fn parse_networks(items: &[String]) -> Result<Vec<IpNet>, String> {
    items.iter().map(|item| parse_network(item)).collect()
}

pub fn parse_network(item: &str) -> Result<IpNet, String> {
    let text = item.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{item:?} is not a network (write 192.0.2.0/24 or 2001:db8::/32)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!("{item:?} has host bits set: did you mean {}?", net.trunc()));
    }
    Ok(net)
}

#[cfg(test)]
mod tests;
