//! Validation: [`RawConfig`] into [`Config`], one small function per section. An error names
//! the key (or the flag that replaced it, see [`super::Overrides`]) and the fix; the first bad
//! value stops validation, except rule entries, which are all listed at once.

mod steer;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::raw::{
    RawAgent, RawBans, RawConfig, RawDns, RawFleet, RawIdentity, RawImpersonation, RawPolicy,
    RawPregreet, RawProxy, RawReject, RawReuse, RawRules, RawXdp,
};
use super::{
    AgentConfig, Config, ConfigError, DnsConfig, Escalation, FleetConfig, HostFacts,
    ListenerConfig, MapSizes, PolicyConfig, PolicyListen, PregreetConfig, ProxyConfig, RedisUrl,
    SnapshotConfig, XdpConfig, check_listener, import, parse_networks,
};
use crate::rules::badhelo::BadheloSet;
use crate::rules::providers::Providers;
use crate::rules::table::{DomainPattern, DomainTable};
use crate::rules::{EntryRef, Identity, ReuseLimits, RuleSet, TableAction, TableEntry};

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

/// Where the values under validation came from, for errors: the file (`None`: the embedded
/// defaults), and the keys that command-line flags replaced, each with its flag.
pub(super) struct Origin<'a> {
    pub path: Option<&'a Path>,
    pub flags: Vec<(&'static str, &'static str)>,
}

impl Origin<'_> {
    /// The error for `key`, or for the flag that gave its value.
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        let by_flag = self.flags.iter().find(|(replaced, _)| {
            key.strip_prefix(replaced).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        });
        match by_flag {
            Some(&(_, flag)) => ConfigError::Flag { flag, message },
            None => ConfigError::Invalid {
                path: self
                    .path
                    .map_or_else(|| PathBuf::from("<embedded defaults>"), Path::to_owned),
                key: key.to_owned(),
                message,
            },
        }
    }

    /// A duration longer than zero.
    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let value = crate::duration::parse(text).map_err(|e| self.invalid(key, e.to_string()))?;
        if value.is_zero() {
            return Err(self.invalid(key, "must be longer than 0s"));
        }
        Ok(value)
    }

    fn socket(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.trim().parse().map_err(|_| {
            self.invalid(
                key,
                format!("{text:?} is not an address:port (write 0.0.0.0:25 or [::]:25)"),
            )
        })
    }

    fn absolute(&self, key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
        if path.is_absolute() {
            Ok(path.to_owned())
        } else {
            Err(self.invalid(key, format!("{} is not an absolute path", path.display())))
        }
    }
}

/// The whole config, section by section.
pub(super) fn config(
    raw: &RawConfig,
    origin: &Origin,
    host: &HostFacts,
) -> Result<Config, ConfigError> {
    let xdp = xdp(&raw.xdp, origin)?;
    let ban_ttl = origin.duration("bans.default_ttl", &raw.bans.default_ttl)?;
    let allowlist = parse_networks(&raw.allowlist.networks)
        .map_err(|message| origin.invalid("allowlist.networks", message))?;
    let reject_message = reject_message(&raw.reject, origin)?;
    let escalation = escalation(&raw.bans, origin)?;
    let scope = scope(&raw.bans, origin)?;
    let proxy = proxy(&raw.proxy, &raw.pregreet, host, origin)?;
    let policy = policy(&raw.policy, origin)?;
    if proxy.listeners.is_empty() && policy.listeners.is_empty() {
        return Err(origin.invalid(
            "proxy.listeners",
            "no listeners at all: give proxy.listeners (the SMTP proxy), policy.listeners (the \
             Postfix policy service), or both",
        ));
    }
    let agent = agent(&raw.agent, origin)?;
    let snapshot = snapshot(&raw.bans, origin)?;
    let fleet = fleet(&raw.fleet, host, origin)?;
    let dns = dns(&raw.dns, origin)?;
    let reuse = reuse(&raw.reuse, origin)?;
    let steer = steer::config(&raw.steer, &proxy, origin)?;
    let mut warnings = agent_warnings(&agent);
    warnings.extend(steer::warnings(&steer, &xdp));
    if raw.bans.max_per_second.is_some() {
        warnings.push(
            "bans.max_per_second is no longer used: rule bans are never dropped (a storm's bans \
             are all written, the ban maps are sized for it); remove the line"
                .to_owned(),
        );
    }
    let identity = identity(&raw.identity, host, &raw.proxy.hostname, &mut warnings, origin)?;
    let (table, badhelo) = rule_entries(&raw.rules, &mut warnings)?;
    let rules = RuleSet {
        actions: raw.checks.actions(),
        identity,
        allowlist,
        table,
        badhelo,
        reject_at: raw.reject.at,
        ban_ttl,
        reuse,
        providers: providers(&raw.impersonation, origin)?,
        extra_tlds: extra_tlds(&raw.rules.extra_tlds, origin)?,
        trust: raw.trust.forward_confirmed,
    };
    let rule_files =
        [&raw.rules.access_file, &raw.rules.badhelo_file].into_iter().flatten().cloned().collect();
    Ok(Config {
        source: origin.path.map(Path::to_owned),
        rule_files,
        xdp,
        rules: Arc::new(rules),
        reject_message,
        warnings,
        escalation,
        scope,
        proxy,
        policy,
        agent,
        snapshot,
        fleet,
        dns,
        steer,
    })
}

/// `[impersonation]`: the built-in providers (unless `builtin = false`) and the admin's.
fn providers(raw: &RawImpersonation, origin: &Origin) -> Result<Providers, ConfigError> {
    let key = "impersonation.providers";
    let mut extra = Vec::new();
    for (name, domains) in &raw.providers {
        if domains.is_empty() {
            return Err(origin.invalid(key, format!("{name:?} has no domains: list at least one")));
        }
        let domains = domains
            .iter()
            .map(|d| {
                crate::rules::helo::normalize_name(d).map_err(|why| {
                    origin.invalid(
                        key,
                        format!("{d:?} ({name}) is not a domain name: {}", why.describe()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        extra.push((name.clone(), domains));
    }
    Providers::new(raw.builtin, &extra).map_err(|message| origin.invalid(key, message))
}

/// `rules.extra_tlds`: top-level labels taken as delegated (an internal `corp`), lower case,
/// without dots.
fn extra_tlds(raw: &[String], origin: &Origin) -> Result<Vec<String>, ConfigError> {
    raw.iter()
        .map(|text| {
            let tld = text.trim().trim_start_matches('.').to_ascii_lowercase();
            let label = !tld.is_empty()
                && tld.len() <= 63
                && tld.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if label {
                Ok(tld)
            } else {
                Err(origin.invalid(
                    "rules.extra_tlds",
                    format!(
                        "{text:?} is not one top-level label (write \"corp\", not \"example.corp\")"
                    ),
                ))
            }
        })
        .collect()
}

/// `[reuse]`: how many client networks make a HELO name reused, within what window.
fn reuse(raw: &RawReuse, origin: &Origin) -> Result<ReuseLimits, ConfigError> {
    let most = crate::reuse::MAX_NETWORKS_PER_NAME;
    if raw.clients < 2 {
        return Err(origin.invalid(
            "reuse.clients",
            format!(
                "{} would make every HELO name reused at its first use: give 2 or more (default \
                 20; checks.helo_reuse = \"off\" turns the check off, whatever this says)",
                raw.clients
            ),
        ));
    }
    if raw.clients > most {
        return Err(origin.invalid(
            "reuse.clients",
            format!(
                "{} is more than the {most} networks a name's count holds: give at most {most}",
                raw.clients
            ),
        ));
    }
    Ok(ReuseLimits { clients: raw.clients, window: origin.duration("reuse.window", &raw.window)? })
}

/// `[dns]`: nameservers as `address` or `address:port` (port 53 by default).
fn dns(raw: &RawDns, origin: &Origin) -> Result<DnsConfig, ConfigError> {
    let servers = raw
        .servers
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    origin.invalid(
                        "dns.servers",
                        format!("{text:?} is not an address or address:port (write 192.0.2.53, [2001:db8::53]:53)"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if raw.max_lookups == 0 {
        return Err(origin.invalid("dns.max_lookups", "must be at least 1"));
    }
    Ok(DnsConfig {
        servers,
        timeout: origin.duration("dns.timeout", &raw.timeout)?,
        cache_size: raw.cache_size,
        max_lookups: raw.max_lookups,
        failure_ttl: origin.duration("dns.failure_ttl", &raw.failure_ttl)?,
    })
}

/// `[fleet]`: a Redis URL or a Sentinel service (empty: off), this gateway's name, the key
/// prefix, a timeout.
fn fleet(raw: &RawFleet, host: &HostFacts, origin: &Origin) -> Result<FleetConfig, ConfigError> {
    use crate::fleet::endpoint::{Endpoint, EndpointError};
    let url = raw.redis.trim();
    let redis = match url {
        "" => None,
        url => {
            let shown = RedisUrl(url.to_owned()).to_string();
            match Endpoint::parse(url) {
                // Not shown: it may hold a password, and this message reaches logs.
                Err(error @ EndpointError::Scheme) => {
                    return Err(origin.invalid("fleet.redis", error.to_string()));
                }
                Err(error) => {
                    return Err(origin.invalid("fleet.redis", format!("{shown}: {error}")));
                }
                Ok(Endpoint::Direct(_)) => {
                    if let Err(error) = redis::Client::open(url) {
                        return Err(origin.invalid("fleet.redis", format!("{shown}: {error}")));
                    }
                }
                Ok(Endpoint::Sentinel(_)) => {}
            }
            Some(RedisUrl(url.to_owned()))
        }
    };
    let sentinel_password = match raw.sentinel_password.as_str() {
        "" => None,
        password => {
            if !redis.as_ref().is_some_and(|url| url.expose().contains("+sentinel://")) {
                return Err(origin.invalid(
                    "fleet.sentinel_password",
                    "is for a Sentinel service: set fleet.redis to redis+sentinel://..., or \
                     remove it",
                ));
            }
            Some(super::Secret(password.to_owned()))
        }
    };
    let node = match raw.node.trim() {
        "" => host.hostname.clone().unwrap_or_default(),
        node => node.to_owned(),
    };
    // Checked only where it is used: a host without a name may run without a fleet.
    if redis.is_some()
        && (node.is_empty()
            || node.len() > crate::fleet::message::MAX_NODE
            || node.contains(|c: char| c.is_whitespace() || c.is_control()))
    {
        return Err(origin.invalid(
            "fleet.node",
            format!("{node:?} is not a usable node name: give a short name without spaces"),
        ));
    }
    if raw.prefix.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(origin.invalid("fleet.prefix", "must not hold spaces or control characters"));
    }
    Ok(FleetConfig {
        redis,
        sentinel_password,
        node,
        prefix: raw.prefix.clone(),
        timeout: origin.duration("fleet.timeout", &raw.timeout)?,
    })
}

/// `policy.listeners`: `host:port` or `unix:/absolute/path`. An inet listener answers whoever
/// reaches it, so one off loopback needs `policy.allow_remote`.
fn policy(raw: &RawPolicy, origin: &Origin) -> Result<PolicyConfig, ConfigError> {
    let key = "policy.listeners";
    let listeners = raw
        .listeners
        .iter()
        .map(|text| {
            if let Some(path) = text.strip_prefix("unix:") {
                return Ok(PolicyListen::Unix(origin.absolute(key, Path::new(path))?));
            }
            let address = origin.socket(key, text.strip_prefix("inet:").unwrap_or(text))?;
            if !address.ip().is_loopback() && !raw.allow_remote {
                return Err(origin.invalid(
                    key,
                    format!(
                        "{address} is not a loopback address, and the policy service answers \
                         anyone who reaches it: listen on 127.0.0.1 (or a unix socket), or set \
                         policy.allow_remote = true and firewall the port"
                    ),
                ));
            }
            Ok(PolicyListen::Inet(address))
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let socket_mode = u32::from_str_radix(raw.socket_mode.trim(), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            origin.invalid("policy.socket_mode", "not an octal mode: write \"0660\" or \"0666\"")
        })?;
    let group = raw.socket_group.trim();
    Ok(PolicyConfig {
        listeners,
        socket_group: (!group.is_empty()).then(|| group.to_owned()),
        socket_mode,
    })
}

fn xdp(raw: &RawXdp, origin: &Origin) -> Result<XdpConfig, ConfigError> {
    if raw.ports.is_empty() {
        return Err(origin.invalid("xdp.ports", "no ports: list at least one, such as 25"));
    }
    if raw.ports.contains(&0) {
        return Err(origin.invalid("xdp.ports", "port 0 is not a TCP port"));
    }
    for (key, size) in [
        ("xdp.max_bans_v4", raw.max_bans_v4),
        ("xdp.max_bans_v6", raw.max_bans_v6),
        ("xdp.max_bans_v6_net", raw.max_bans_v6_net),
        ("xdp.max_bans_v4_prefix", raw.max_bans_v4_prefix),
        ("xdp.max_bans_v6_prefix", raw.max_bans_v6_prefix),
    ] {
        if !(16..=16_777_216).contains(&size) {
            return Err(origin.invalid(key, format!("{size} is outside 16..=16777216")));
        }
    }
    if let Some(iface) = &raw.interface
        && (iface.is_empty() || iface.len() > 15 || iface.contains('/'))
    {
        return Err(origin.invalid("xdp.interface", format!("{iface:?} is not an interface name")));
    }
    if !raw.pin_dir.is_absolute() {
        return Err(origin.invalid("xdp.pin_dir", "must be an absolute path under a bpffs"));
    }
    let mut ports = raw.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    Ok(XdpConfig {
        interface: raw.interface.clone(),
        mode: raw.mode,
        ports,
        pin_dir: raw.pin_dir.clone(),
        sizes: MapSizes {
            bans_v4: raw.max_bans_v4,
            bans_v6: raw.max_bans_v6,
            bans_v6_net: raw.max_bans_v6_net,
            bans_v4_prefix: raw.max_bans_v4_prefix,
            bans_v6_prefix: raw.max_bans_v6_prefix,
        },
    })
}

/// The text of the 553 reply: one line.
fn reject_message(raw: &RawReject, origin: &Origin) -> Result<String, ConfigError> {
    let message = raw.message.trim();
    if message.is_empty() || message.len() > 400 || message.contains(['\r', '\n']) {
        return Err(
            origin.invalid("reject.message", "must be one line of text, at most 400 characters")
        );
    }
    Ok(message.to_owned())
}

/// `bans.prefix_v4` and `bans.prefix_v6`: what a rule's ban covers around the client.
fn scope(raw: &RawBans, origin: &Origin) -> Result<crate::addr::BanScope, ConfigError> {
    use crate::addr::{V4_LENS, V6_LENS};
    if !V4_LENS.contains(&raw.prefix_v4) {
        return Err(origin.invalid(
            "bans.prefix_v4",
            format!("/{} is outside /24 to /32 (32: the client's address alone)", raw.prefix_v4),
        ));
    }
    if !V6_LENS.contains(&raw.prefix_v6) {
        return Err(origin.invalid(
            "bans.prefix_v6",
            format!(
                "/{} is outside /48 to /128 (64: the client's /64; 128: its address alone)",
                raw.prefix_v6
            ),
        ));
    }
    Ok(crate::addr::BanScope { v4: raw.prefix_v4, v6: raw.prefix_v6 })
}

fn escalation(raw: &RawBans, origin: &Origin) -> Result<Escalation, ConfigError> {
    let max_ttl = origin.duration("bans.max_ttl", &raw.max_ttl)?;
    if raw.escalation_factor == 0 {
        return Err(origin.invalid("bans.escalation_factor", "must be 1 (no escalation) or more"));
    }
    if raw.history_size == 0 {
        return Err(origin.invalid("bans.history_size", "must be at least 1"));
    }
    Ok(Escalation { factor: raw.escalation_factor, max_ttl, history: raw.history_size })
}

fn proxy(
    raw: &RawProxy,
    pregreet: &RawPregreet,
    host: &HostFacts,
    origin: &Origin,
) -> Result<ProxyConfig, ConfigError> {
    let listeners = raw
        .listeners
        .iter()
        .map(|l| {
            let address = origin.socket("proxy.listeners.address", &l.address)?;
            check_listener(address)
                .map_err(|message| origin.invalid("proxy.listeners.address", message))?;
            Ok(ListenerConfig { address, check_helo: l.check_helo })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if raw.max_sessions == 0 || raw.max_sessions_per_ip == 0 {
        return Err(origin.invalid("proxy.max_sessions", "session limits must be at least 1"));
    }
    if raw.workers > ProxyConfig::MAX_WORKERS {
        return Err(origin.invalid(
            "proxy.workers",
            format!(
                "{} session threads is more than {}; 0 starts one per CPU",
                raw.workers,
                ProxyConfig::MAX_WORKERS
            ),
        ));
    }
    Ok(ProxyConfig {
        listeners,
        upstream: origin.socket("proxy.upstream", &raw.upstream)?,
        proxy_protocol: raw.proxy_protocol,
        greeting: raw.greeting,
        trusted_proxies: parse_networks(&raw.trusted_proxies)
            .map_err(|message| origin.invalid("proxy.trusted_proxies", message))?,
        hostname: hostname(&raw.hostname, host, origin)?,
        helo_timeout: origin.duration("proxy.helo_timeout", &raw.helo_timeout)?,
        idle_timeout: origin.duration("proxy.idle_timeout", &raw.idle_timeout)?,
        upstream_timeout: origin.duration("proxy.upstream_timeout", &raw.upstream_timeout)?,
        max_sessions: raw.max_sessions,
        max_sessions_per_ip: raw.max_sessions_per_ip,
        shutdown_grace: origin.duration("proxy.shutdown_grace", &raw.shutdown_grace)?,
        workers: raw.workers,
        pregreet: pregreet_test(pregreet, origin)?,
    })
}

/// The longest `pregreet.wait`: clients give up on a greeting (RFC 5321 §4.5.3.2.1 asks them
/// to wait 5 minutes; some wait far less), and every new client pays the wait.
const MAX_PREGREET_WAIT: Duration = Duration::from_secs(60);

/// `[pregreet]`: the wait before the final greeting line, and the pass cache.
fn pregreet_test(raw: &RawPregreet, origin: &Origin) -> Result<PregreetConfig, ConfigError> {
    let wait = origin.duration("pregreet.wait", &raw.wait)?;
    if wait > MAX_PREGREET_WAIT {
        return Err(origin.invalid(
            "pregreet.wait",
            "at most 60s: every new client waits this long for the greeting, and clients give up \
             (postscreen waits 6s)",
        ));
    }
    if raw.pass_cache_size == 0 {
        return Err(origin.invalid(
            "pregreet.pass_cache_size",
            "must be at least 1 (to test every connection, set pregreet.pass_ttl = \"1s\")",
        ));
    }
    Ok(PregreetConfig {
        wait,
        pass_ttl: origin.duration("pregreet.pass_ttl", &raw.pass_ttl)?,
        pass_cache_size: raw.pass_cache_size,
    })
}

/// The proxy's own name; empty: the host's.
fn hostname(raw: &str, host: &HostFacts, origin: &Origin) -> Result<String, ConfigError> {
    match raw.trim() {
        "" => Ok(host.hostname.clone().unwrap_or_else(|| {
            let name = rustix::system::uname().nodename().to_string_lossy().into_owned();
            if name.is_empty() { "localhost".into() } else { name }
        })),
        name if name.contains(|c: char| c.is_whitespace() || c.is_control()) => {
            Err(origin.invalid("proxy.hostname", format!("{name:?} is not a host name")))
        }
        name => Ok(name.to_owned()),
    }
}

fn agent(raw: &RawAgent, origin: &Origin) -> Result<AgentConfig, ConfigError> {
    Ok(AgentConfig {
        user: match raw.user.trim() {
            "" | "root" => None,
            user => Some(user.to_owned()),
        },
        control_socket: origin.absolute("agent.control_socket", &raw.control_socket)?,
        metrics: match raw.metrics.trim() {
            "" | "off" => None,
            text => Some(origin.socket("agent.metrics", text)?),
        },
        report_window: origin.duration("agent.report_window", &raw.report_window)?,
    })
}

fn snapshot(raw: &RawBans, origin: &Origin) -> Result<SnapshotConfig, ConfigError> {
    let path = if raw.snapshot.as_os_str().is_empty() {
        None
    } else {
        let path = origin.absolute("bans.snapshot", &raw.snapshot)?;
        // The agent gives the snapshot's directory to agent.user: never a shared one.
        let dir = path.parent().unwrap_or(Path::new("/"));
        if SHARED_DIRS.iter().any(|shared| dir == Path::new(shared)) {
            return Err(origin.invalid(
                "bans.snapshot",
                format!(
                    "{} is a shared directory, and the agent makes the snapshot's directory its \
                     own: use a directory of its own, such as /var/lib/helo-filter/bans.json",
                    dir.display()
                ),
            ));
        }
        Some(path)
    };
    Ok(SnapshotConfig {
        path,
        interval: origin.duration("bans.snapshot_interval", &raw.snapshot_interval)?,
    })
}

/// Settings that load but deserve a look.
fn agent_warnings(agent: &AgentConfig) -> Vec<String> {
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
    warnings
}

/// The domain table and the regex rules, with every bad entry of every rule source at once, not
/// the first one only.
fn rule_entries(
    raw: &RawRules,
    warnings: &mut Vec<String>,
) -> Result<(DomainTable<TableEntry>, BadheloSet), ConfigError> {
    let mut bad = Vec::new();
    let table = table(raw, warnings, &mut bad)?;
    let badhelo = badhelo(raw, warnings, &mut bad)?;
    if !bad.is_empty() {
        return Err(ConfigError::BadEntries { bad, warnings: std::mem::take(warnings) });
    }
    Ok((table, badhelo))
}

fn config_entry(key: &str, index: usize, text: &str) -> Arc<EntryRef> {
    Arc::new(EntryRef { source: format!("config {key}"), line: index + 1, text: text.to_owned() })
}

/// Our identity: configured names and addresses, plus (with `detect`) the host name, its
/// domain, /etc/mailname and the local addresses. Detected names cover that name only.
fn identity(
    raw: &RawIdentity,
    host: &HostFacts,
    proxy_hostname: &str,
    warnings: &mut Vec<String>,
    origin: &Origin,
) -> Result<Identity, ConfigError> {
    let mut identity = Identity::default();
    for (index, text) in raw.domains.iter().enumerate() {
        let pattern =
            DomainPattern::parse(text).map_err(|e| origin.invalid("identity.domains", e))?;
        if let Some(dup) =
            identity.names.insert(&pattern, config_entry("identity.domains", index, text))
        {
            warnings.push(format!("identity.domains: {text:?} repeats {:?}", dup.existing.text));
        }
    }
    for text in &raw.addresses {
        let ip: IpAddr = text.trim().parse().map_err(|_| {
            origin.invalid(
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
        // The name the proxy greets with is ours too: a bot that echoes it back forges it.
        if !proxy_hostname.trim().is_empty() {
            detected.push((proxy_hostname.trim().to_owned(), "proxy.hostname"));
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

/// A rule file's text. One that is not UTF-8 (a Latin-1 comment) still loads, with a warning.
fn read_rule_file(
    key: &'static str,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::RuleFile {
        key,
        path: path.to_owned(),
        source,
    })?;
    let (text, warning) = import::decode(bytes, &path.display().to_string());
    warnings.extend(warning);
    Ok(text)
}

/// The domain table: `rules.domains` first, then the Postfix access file. Entries that do not
/// parse go to `bad`.
fn table(
    raw: &RawRules,
    warnings: &mut Vec<String>,
    bad: &mut Vec<String>,
) -> Result<DomainTable<TableEntry>, ConfigError> {
    let mut table = DomainTable::default();
    for (index, text) in raw.domains.iter().enumerate() {
        let pattern = match DomainPattern::parse(text) {
            Ok(pattern) => pattern,
            Err(why) => {
                bad.push(format!("{}: {why}", config_entry("rules.domains", index, text)));
                continue;
            }
        };
        let entry = TableEntry {
            action: TableAction::Deny(None),
            entry: config_entry("rules.domains", index, text),
        };
        if let Some(dup) = table.insert(&pattern, entry) {
            warnings.push(format!("rules.domains: {text:?} repeats {}", dup.existing.entry));
        }
    }
    if let Some(path) = &raw.access_file {
        let text = read_rule_file("rules.access_file", path, warnings)?;
        let source = path.display().to_string();
        let imported = import::access_table(&text, &source, raw.access_parent_matches_subdomains);
        warnings.extend(imported.warnings);
        if !imported.errors.is_empty() {
            bad.extend(imported.errors);
            return Ok(table);
        }
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
fn badhelo(
    raw: &RawRules,
    warnings: &mut Vec<String>,
    bad: &mut Vec<String>,
) -> Result<BadheloSet, ConfigError> {
    let inline: String = raw.regexes.iter().map(|line| format!("{line}\n")).collect();
    let mut rules = import::badhelo(&inline, "config rules.regexes");
    if let Some(path) = &raw.badhelo_file {
        let text = read_rule_file("rules.badhelo_file", path, warnings)?;
        rules.extend(import::badhelo(&text, &path.display().to_string()));
    }
    Ok(BadheloSet::new(rules).unwrap_or_else(|errors| {
        bad.extend(errors);
        BadheloSet::default()
    }))
}
