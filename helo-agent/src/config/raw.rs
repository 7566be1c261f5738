//! The config as written: TOML read by serde into [`RawConfig`], every key at its default when
//! missing, unknown keys refused. The command line's [`Overrides`] replace keys here, before
//! validation, so a flag is checked exactly as the key it replaces.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{AttachMode, DEFAULT_PIN_DIR, GreetingMode, MapSizes, ProxyProtocol};
use crate::rules::{CHECK_COUNT, Check, CheckAction, RejectAt};

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
    pub policy: RawPolicy,
    pub fleet: RawFleet,
    pub dns: RawDns,
    pub pregreet: RawPregreet,
    pub reuse: RawReuse,
    pub steer: RawSteer,
    pub impersonation: RawImpersonation,
    pub trust: RawTrust,
}

/// `[impersonation]`: the big providers `checks.impersonation` knows.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawImpersonation {
    /// The built-in list (README, "Impersonation").
    pub builtin: bool,
    /// More providers, or more domains of a built-in one (same name): name = [domains].
    pub providers: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for RawImpersonation {
    fn default() -> Self {
        Self { builtin: true, providers: Default::default() }
    }
}

/// `[trust]`: the trust anchor of the heuristic checks.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTrust {
    pub forward_confirmed: bool,
}

impl Default for RawTrust {
    fn default() -> Self {
        Self { forward_confirmed: true }
    }
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
    pub workers: usize,
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
            max_sessions_per_ip: 50,
            shutdown_grace: "30s".into(),
            workers: 0,
        }
    }
}

/// `[steer]`: the kernel front door (see `crate::config::SteerConfig`).
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSteer {
    pub addresses: Vec<String>,
    pub pass_ttl: String,
    pub max_passes_v4: u32,
    pub max_passes_v6: u32,
}

impl Default for RawSteer {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            pass_ttl: "1d".into(),
            max_passes_v4: helo_common::DEFAULT_MAX_PASS_V4,
            max_passes_v6: helo_common::DEFAULT_MAX_PASS_V6,
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub listeners: Vec<String>,
    pub socket_group: String,
    pub socket_mode: String,
    pub allow_remote: bool,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            socket_group: "postfix".into(),
            socket_mode: "0660".into(),
            allow_remote: false,
        }
    }
}

/// `[pregreet]`: the proxy's pregreet test (`checks.pregreet` says what a pregreet does).
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPregreet {
    pub wait: String,
    pub pass_ttl: String,
    pub pass_cache_size: usize,
}

impl Default for RawPregreet {
    /// postscreen's defaults: `postscreen_greet_wait` 6s (not under stress), and
    /// `postscreen_greet_ttl` 1d; its cache has no bound, ours has.
    fn default() -> Self {
        Self { wait: "6s".into(), pass_ttl: "1d".into(), pass_cache_size: 100_000 }
    }
}

/// `[reuse]`: when a HELO name counts as reused (`checks.helo_reuse` says what that does).
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReuse {
    pub clients: usize,
    pub window: String,
}

impl Default for RawReuse {
    fn default() -> Self {
        Self { clients: 20, window: "1h".into() }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDns {
    pub servers: Vec<String>,
    pub timeout: String,
    pub cache_size: usize,
    pub max_lookups: usize,
    pub failure_ttl: String,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: "2s".into(),
            cache_size: 10_000,
            max_lookups: 256,
            failure_ttl: "30s".into(),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    pub redis: String,
    pub sentinel_password: String,
    pub node: String,
    pub prefix: String,
    pub timeout: String,
}

impl Default for RawFleet {
    fn default() -> Self {
        Self {
            redis: String::new(),
            sentinel_password: String::new(),
            node: String::new(),
            prefix: "helo-filter:".into(),
            timeout: "2s".into(),
        }
    }
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
    pub max_bans_v4_prefix: u32,
    pub max_bans_v6_prefix: u32,
}

impl Default for RawXdp {
    fn default() -> Self {
        let sizes = MapSizes::default();
        Self {
            interface: None,
            mode: AttachMode::Auto,
            ports: helo_common::DEFAULT_PORTS.to_vec(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            max_bans_v4: sizes.bans_v4,
            max_bans_v6: sizes.bans_v6,
            max_bans_v6_net: sizes.bans_v6_net,
            max_bans_v4_prefix: sizes.bans_v4_prefix,
            max_bans_v6_prefix: sizes.bans_v6_prefix,
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
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    /// No longer used (rule bans are never dropped): accepted, with a warning, so that an
    /// older config still loads.
    pub max_per_second: Option<u32>,
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
            prefix_v4: 32,
            prefix_v6: 64,
            max_per_second: None,
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
    pub extra_tlds: Vec<String>,
}

impl Default for RawRules {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            regexes: Vec::new(),
            badhelo_file: None,
            access_file: None,
            access_parent_matches_subdomains: true,
            extra_tlds: Vec::new(),
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawChecks {
    pub pregreet: CheckAction,
    pub table: CheckAction,
    pub forged_identity: CheckAction,
    pub badhelo: CheckAction,
    pub invalid: CheckAction,
    pub localhost: CheckAction,
    pub bare_ip: CheckAction,
    pub literal_mismatch: CheckAction,
    pub impersonation: CheckAction,
    pub no_dot: CheckAction,
    pub private_suffix: CheckAction,
    pub unknown_tld: CheckAction,
    pub dynamic: CheckAction,
    pub changed: CheckAction,
    pub unknown_helo: CheckAction,
    pub helo_not_client: CheckAction,
    pub helo_reuse: CheckAction,
}

impl Default for RawChecks {
    /// Safe for a real gateway: ban only the unmistakable bot marks (our own identity, a big
    /// provider's name from elsewhere, a bare IP, localhost), reject the rest of the RFC
    /// violations and the offline heuristics (which spare a forward-confirmed client), and only
    /// log the rest.
    fn default() -> Self {
        use CheckAction::{Ban, Log, Reject};
        Self {
            pregreet: Log,
            table: Reject,
            forged_identity: Ban,
            badhelo: Reject,
            invalid: Reject,
            localhost: Ban,
            bare_ip: Ban,
            literal_mismatch: Reject,
            impersonation: Ban,
            no_dot: Reject,
            private_suffix: Reject,
            unknown_tld: Reject,
            dynamic: Reject,
            changed: Log,
            unknown_helo: Log,
            helo_not_client: Log,
            helo_reuse: Log,
        }
    }
}

impl RawChecks {
    pub(super) fn actions(&self) -> [CheckAction; CHECK_COUNT] {
        let mut actions = [CheckAction::Off; CHECK_COUNT];
        for check in Check::ALL {
            actions[check as usize] = match check {
                Check::Pregreet => self.pregreet,
                Check::Table => self.table,
                Check::ForgedIdentity => self.forged_identity,
                Check::Badhelo => self.badhelo,
                Check::Invalid => self.invalid,
                Check::Localhost => self.localhost,
                Check::BareIp => self.bare_ip,
                Check::LiteralMismatch => self.literal_mismatch,
                Check::Impersonation => self.impersonation,
                Check::NoDot => self.no_dot,
                Check::PrivateSuffix => self.private_suffix,
                Check::UnknownTld => self.unknown_tld,
                Check::Dynamic => self.dynamic,
                Check::Changed => self.changed,
                Check::UnknownHelo => self.unknown_helo,
                Check::HeloNotClient => self.helo_not_client,
                Check::HeloReuse => self.helo_reuse,
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

/// Values given on the command line, each replacing a key of the file (or of the embedded
/// defaults) before validation. A reload applies them again to the re-read file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--pin-dir`: xdp.pin_dir.
    pub pin_dir: Option<PathBuf>,
    /// `run --iface`: xdp.interface.
    pub interface: Option<String>,
    /// `run --xdp-mode`: xdp.mode.
    pub mode: Option<AttachMode>,
    /// `run --listen`: replaces proxy.listeners, each one checking HELO.
    pub listen: Vec<SocketAddr>,
    /// `run --upstream`: proxy.upstream.
    pub upstream: Option<SocketAddr>,
    /// `run --proxy-protocol`: proxy.proxy_protocol.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl Overrides {
    /// Writes the overrides into `raw`. Returns each key replaced with the flag that replaced
    /// it, so that an error names the flag the admin typed.
    pub fn apply(&self, raw: &mut RawConfig) -> Vec<(&'static str, &'static str)> {
        let mut replaced = Vec::new();
        if let Some(dir) = &self.pin_dir {
            raw.xdp.pin_dir = dir.clone();
            replaced.push(("xdp.pin_dir", "--pin-dir"));
        }
        if let Some(interface) = &self.interface {
            raw.xdp.interface = Some(interface.clone());
            replaced.push(("xdp.interface", "--iface"));
        }
        if let Some(mode) = self.mode {
            raw.xdp.mode = mode;
            replaced.push(("xdp.mode", "--xdp-mode"));
        }
        if !self.listen.is_empty() {
            raw.proxy.listeners = self
                .listen
                .iter()
                .map(|address| RawListener { address: address.to_string(), check_helo: true })
                .collect();
            replaced.push(("proxy.listeners", "--listen"));
        }
        if let Some(upstream) = self.upstream {
            raw.proxy.upstream = upstream.to_string();
            replaced.push(("proxy.upstream", "--upstream"));
        }
        if let Some(protocol) = self.proxy_protocol {
            raw.proxy.proxy_protocol = protocol;
            replaced.push(("proxy.proxy_protocol", "--proxy-protocol"));
        }
        replaced
    }
}
