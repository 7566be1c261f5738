//! Configuration, in layers as ripgrep has them: TOML read into [`RawConfig`] (serde, unknown
//! keys refused), the command line's [`Overrides`] written over it, then the whole validated
//! into [`Config`] ([`validate`], one function per section), which holds real values: parsed
//! networks, durations, and the compiled [`RuleSet`] with the imported rule files. Nothing binds
//! or loads before the whole config has validated. With no file the agent runs on the embedded
//! defaults, which `helo-filter.example.toml` documents key by key (a test keeps the two in
//! step).
//!
//! The plain values the settings are made of ([`ProxyProtocol`], [`AttachMode`], [`MapSizes`],
//! [`Escalation`], [`DEFAULT_PIN_DIR`]) are defined here, so this module needs no runtime module
//! (proxy, ebpf, blocklist); the command line's clap glue for them is in `cli`.

pub mod import;
pub mod raw;
mod validate;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use self::raw::{Overrides, RawConfig};
use crate::rules::RuleSet;

/// The example config, every key at its default, with comments.
pub const EXAMPLE: &str = include_str!("../../helo-filter.example.toml");

/// Where the pinned maps, counters and link live unless xdp.pin_dir or `--pin-dir` says.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/helo-filter";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    /// A command-line flag's value that does not validate (see [`Overrides`]).
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("cannot read {key} file {path}: {source}")]
    RuleFile { key: &'static str, path: PathBuf, source: std::io::Error },
    /// Every rule entry that does not load (domain patterns, access table lines, regexes), each
    /// as `file:line: what is wrong`, so one `check-config` run lists them all; with the
    /// warnings the rule files gave so far (skipped entries), which an admin fixing the errors
    /// needs as much.
    #[error("{}", bad_entries(bad, warnings))]
    BadEntries { bad: Vec<String>, warnings: Vec<String> },
}

fn bad_entries(bad: &[String], warnings: &[String]) -> String {
    let mut text = match bad {
        [one] => format!("bad rule entry: {one}"),
        all => format!(
            "{} bad rule entries, each with its file and line:\n  {}",
            all.len(),
            all.join("\n  ")
        ),
    };
    match warnings {
        [] => {}
        [one] => text.push_str(&format!("\nand a warning:\n  {one}")),
        all => text.push_str(&format!("\nand {} warnings:\n  {}", all.len(), all.join("\n  "))),
    }
    text
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

/// How the MTA learns the real client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the MTA sees the proxy's address.
    None,
    /// A PROXY protocol v1 (text) header.
    V1,
    /// A PROXY protocol v2 (binary) header.
    V2,
    /// No header: the connection to the MTA comes from the client's own address
    /// (IP_TRANSPARENT), for MTAs that cannot take PROXY headers. IP_TRANSPARENT needs
    /// CAP_NET_RAW (or CAP_NET_ADMIN; the agent keeps CAP_NET_RAW after dropping privileges)
    /// and a route that brings the MTA's replies back to this host (see the README).
    Transparent,
}

/// How to attach the XDP program: let the kernel pick, native (driver) only, or generic (skb)
/// only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native mode, falling back to generic mode (with a warning) where the driver has no XDP.
    Auto,
    /// Native (driver) mode only: fails where the driver has no XDP support.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Skb,
}

/// Capacities of the ban maps (LRU: when full, the least recently used ban goes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub bans_v4: u32,
    pub bans_v6: u32,
    pub bans_v6_net: u32,
    pub bans_v4_prefix: u32,
    pub bans_v6_prefix: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            bans_v4: helo_common::DEFAULT_MAX_BANS_V4,
            bans_v6: helo_common::DEFAULT_MAX_BANS_V6,
            bans_v6_net: helo_common::DEFAULT_MAX_BANS_V6_NET,
            bans_v4_prefix: helo_common::DEFAULT_MAX_BANS_V4_PREFIX,
            bans_v6_prefix: helo_common::DEFAULT_MAX_BANS_V6_PREFIX,
        }
    }
}

/// Longer bans for repeat offenders (`[bans]`; the ban worker applies them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escalation {
    /// Each new offence multiplies the TTL by this (1: no escalation).
    pub factor: u32,
    /// The longest escalated ban; an address without offences this long is forgotten.
    pub max_ttl: Duration,
    /// Offenders remembered at most (an LRU).
    pub history: usize,
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
    /// The rule files it names (`rules.access_file`, `rules.badhelo_file`), which a reload
    /// reads again.
    pub rule_files: Vec<PathBuf>,
    pub xdp: XdpConfig,
    /// The compiled rules; they also hold the allowlist and the ban TTL the rest of the agent
    /// uses.
    pub rules: Arc<RuleSet>,
    /// The text of the 553 reply to a rejected client.
    pub reject_message: String,
    /// Things that load but deserve a look (entries Postfix would ignore, duplicates).
    pub warnings: Vec<String>,
    pub escalation: Escalation,
    /// What a rule's ban covers around the client (`bans.prefix_v4`, `bans.prefix_v6`).
    pub scope: crate::addr::BanScope,
    pub proxy: ProxyConfig,
    pub policy: PolicyConfig,
    pub agent: AgentConfig,
    pub snapshot: SnapshotConfig,
    pub fleet: FleetConfig,
    pub dns: DnsConfig,
    pub steer: SteerConfig,
}

/// The resolver the DNS checks ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers; empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<std::net::SocketAddr>,
    /// One lookup's longest wait; past it the answer is a temporary failure.
    pub timeout: Duration,
    /// Answers cached at most (positive and negative), each for its TTL.
    pub cache_size: usize,
    /// Lookups in flight at most; beyond, a session whose verdict does not depend on DNS
    /// skips its lookups, and one whose verdict does waits its turn.
    pub max_lookups: usize,
    /// How long a lookup that got no answer to trust (a timeout, SERVFAIL) is remembered as
    /// such: a dead resolver costs each new name one `timeout`, not every session.
    pub failure_ttl: Duration,
}

/// Bans shared with the other gateways through Redis: off when `redis` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// One Redis (`redis://`, `rediss://`) or a Sentinel service (`redis+sentinel://`,
    /// `rediss+sentinel://`; see `crate::fleet::endpoint`).
    pub redis: Option<RedisUrl>,
    /// The password the sentinels require, if any (the master's is in the URL).
    pub sentinel_password: Option<Secret>,
    /// This gateway's name in the fleet (default: the host name).
    pub node: String,
    /// Prepended to every key and to the channel.
    pub prefix: String,
    /// How long one Redis command may take before the connection counts as lost.
    pub timeout: Duration,
}

/// A Redis URL; shown with its password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl RedisUrl {
    /// The URL to connect with (password included).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RedisUrl {
    /// `scheme://user:***@host:port/db`: safe for logs. Whatever comes before the last `@`
    /// (after the scheme) is credentials and is masked, but for a user name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = &self.0;
        let Some(at) = url.rfind('@') else { return f.write_str(url) };
        let start = url.find("://").map_or(0, |scheme| scheme + 3).min(at);
        let credentials = &url[start..at];
        match credentials.split_once(':') {
            Some((user, _)) if !user.contains('/') => {
                write!(f, "{}{user}:***{}", &url[..start], &url[at..])
            }
            _ => write!(f, "{}***{}", &url[..start], &url[at..]),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// A password outside a URL; shown as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The Postfix policy service (`check_policy_service`): off when it has no listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub listeners: Vec<PolicyListen>,
    /// The group a unix socket is given (Postfix's smtpd runs as `postfix`); `None`: root's.
    pub socket_group: Option<String>,
    /// The permission bits of a unix socket.
    pub socket_mode: u32,
}

/// Where the policy service listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyListen {
    Inet(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for PolicyListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyListen::Inet(address) => write!(f, "{address}"),
            PolicyListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
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
    /// Threads that accept and run sessions, each with its own event loop, all accepting on
    /// the same listening sockets; 0: one per CPU the agent may run on.
    pub workers: usize,
    /// The pregreet test (`[pregreet]`), run where the proxy greets itself.
    pub pregreet: PregreetConfig,
}

impl ProxyConfig {
    /// Most `proxy.workers` may be.
    pub const MAX_WORKERS: usize = 256;

    /// The session threads to start: `workers`, or for 0 one per CPU in the agent's affinity
    /// mask and cgroup quota (`taskset -c 0` gives 1).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(Self::MAX_WORKERS),
            n => n,
        }
    }
}

/// The pregreet test: the proxy greets with `220-` and sends the final `220 ` line after
/// `wait`; a client that speaks before it is a pregreeter (`checks.pregreet`). A client that
/// stayed silent is remembered for `pass_ttl` and greeted at once meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PregreetConfig {
    pub wait: Duration,
    pub pass_ttl: Duration,
    /// Clients remembered at most (least recently seen forgotten first).
    pub pass_cache_size: usize,
}

/// `[steer]`: the kernel front door. With `addresses`, an sk_lookup program hands each new
/// connection to those endpoints (the MTA's own port-25 listeners) to the agent's listeners
/// (`proxy.listeners`, one per address family), unless the client holds a pass, which sends it
/// straight to the MTA; with no agent socket in the kernel's map, everyone goes to the MTA.
/// Empty: today's mode, where the agent owns port 25.
#[derive(Clone, Debug, PartialEq)]
pub struct SteerConfig {
    pub addresses: Vec<std::net::SocketAddr>,
    /// How long a client that showed itself an honest sender goes straight to the MTA; zero:
    /// no passes are written (every client is judged, and the door still fails open).
    pub pass_ttl: Duration,
    pub sizes: PassSizes,
}

impl SteerConfig {
    pub fn enabled(&self) -> bool {
        !self.addresses.is_empty()
    }

    /// The TTL of the passes the agent writes: `None` when steering is off or `pass_ttl` is 0.
    pub fn pass_ttl(&self) -> Option<Duration> {
        (self.enabled() && !self.pass_ttl.is_zero()).then_some(self.pass_ttl)
    }
}

/// Capacities of the pass maps (LRU: when full, the least recently used pass goes, and that
/// client is judged again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassSizes {
    pub v4: u32,
    pub v6: u32,
}

impl Default for PassSizes {
    fn default() -> Self {
        PassSizes { v4: helo_common::DEFAULT_MAX_PASS_V4, v6: helo_common::DEFAULT_MAX_PASS_V6 }
    }
}

impl PassSizes {
    /// What the pass maps are created with when steering is off: one entry each, so today's
    /// mode does not pay for them (at their defaults, about 7 MB preallocated).
    pub const UNUSED: PassSizes = PassSizes { v4: 1, v6: 1 };
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
        Self::load_with(path, &Overrides::default())
    }

    /// As [`Config::load`], with the command line's `overrides` written over the file before
    /// it is validated.
    pub fn load_with(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                parse_raw(&text, path)?
            }
        };
        let host = if raw.identity.detect { HostFacts::detect() } else { HostFacts::default() };
        Self::from_raw(raw, overrides, path, &host)
    }

    /// As [`Config::load_with`], from the text of the file at `path` read by someone else: the
    /// root CLI hands the agent a root-only config this way at `reload`, which the agent,
    /// no longer root, could not read itself.
    pub fn load_text(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, path)?;
        let host = if raw.identity.detect { HostFacts::detect() } else { HostFacts::default() };
        Self::from_raw(raw, overrides, Some(path), &host)
    }

    /// Parses and validates TOML text; `path` names it in errors. `host` stands in for detection.
    pub fn parse(text: &str, path: &Path, host: &HostFacts) -> Result<Self, ConfigError> {
        Self::from_raw(parse_raw(text, path)?, &Overrides::default(), Some(path), host)
    }

    /// Writes `overrides` over `raw`, then validates the result; `path` names the file in
    /// errors (`None`: the embedded defaults), and a flag's bad value is refused by the flag.
    pub fn from_raw(
        mut raw: RawConfig,
        overrides: &Overrides,
        path: Option<&Path>,
        host: &HostFacts,
    ) -> Result<Self, ConfigError> {
        let flags = overrides.apply(&mut raw);
        validate::config(&raw, &validate::Origin { path, flags }, host)
    }
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.to_string().trim_end().to_owned(),
    })
}

/// The control socket and the pin directory named in the config file at `path` (the defaults
/// for what it leaves out), read from a file that parses as TOML but may not validate:
/// `helo-agent reload` must reach the agent even then, so that the agent itself refuses the
/// file, says why, and counts the refusal. `None` when the file cannot say (it does not read,
/// it is not TOML, or one of the two is not a string): the caller stops with the file's own
/// error rather than guess, since the defaults could name another agent.
pub fn control_locations(path: Option<&Path>) -> Option<(PathBuf, PathBuf)> {
    let table = match path {
        Some(path) => {
            Some(toml::from_str::<toml::Table>(&std::fs::read_to_string(path).ok()?).ok()?)
        }
        None => None,
    };
    let get = |section: &str, key: &str| -> Option<Option<PathBuf>> {
        match table.as_ref().and_then(|t| t.get(section)?.get(key)) {
            None => Some(None),
            Some(value) => value.as_str().map(|v| Some(PathBuf::from(v))),
        }
    };
    Some((
        get("agent", "control_socket")?.unwrap_or_else(|| raw::RawAgent::default().control_socket),
        get("xdp", "pin_dir")?.unwrap_or_else(|| raw::RawXdp::default().pin_dir),
    ))
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
