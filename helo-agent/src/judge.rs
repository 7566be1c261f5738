//! The judging core: the one place that turns "this client said this HELO" into a verdict and
//! its consequences, whichever front door heard it. The proxy asks it today; the Postfix policy
//! service will ask the same functions with the same facts.
//!
//! - [`Client`]: who the client is, resolved once at accept (the real address after a trusted
//!   front proxy, canonical; the listener's facts).
//! - [`classify`]: the verdict on one HELO, given the ones before it in the session.
//! - [`Court::conclude`]: what a finished session's verdict causes, in one place: the session's
//!   log line, the tophelos and metrics observation, the never-ban guards (allowlist, the MTA's
//!   own address, trusted front proxies; each refusal logged with its reason) and the ban
//!   request, whose TTL the ban worker escalates for repeat offenders.
//!
//! What happens when a verdict is `ban` is read here, and nowhere else.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

use crate::blocklist::worker::{BanRequest, BanSender};
use crate::metrics::{Metrics, VerdictLabels};
use crate::report::Report;
use crate::rules::{Action, Facts, RuleSet, Verdict};

/// The client as the agent knows it, resolved once when the connection is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    /// The real client (after a trusted front proxy), canonical: an IPv4-mapped IPv6 address is
    /// the IPv4 address.
    pub ip: IpAddr,
    /// The trusted front proxy the client came through, if any.
    pub via: Option<IpAddr>,
    /// The listener judges no HELO (a submission port: qmail's `NOBADHELO` idea).
    pub exempt: bool,
}

impl Client {
    pub fn new(ip: IpAddr, via: Option<IpAddr>, exempt: bool) -> Self {
        Client { ip: crate::addr::canonical(ip), via, exempt }
    }
}

/// The verdict on `helo`, said by `client` after `previous` HELOs in the same session.
pub fn classify(rules: &RuleSet, client: &Client, helo: &str, previous: &[String]) -> Verdict {
    rules.classify(&Facts {
        client: Some(client.ip),
        argument: helo,
        previous,
        exempt_listener: client.exempt,
    })
}

/// Which door heard the session (the `door` of its log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    Proxy,
    /// Postfix's policy service (`check_policy_service`).
    Policy,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Proxy => "proxy",
            Door::Policy => "policy",
        }
    }
}

/// A finished session, as a door tells it.
#[derive(Debug)]
pub struct Record<'a> {
    pub door: Door,
    pub client: &'a Client,
    /// The HELO the verdict is about.
    pub helo: Option<&'a str>,
    /// Every HELO the door saw, when there was more than one.
    pub helos: &'a [String],
    pub verdict: Option<&'a Verdict>,
    /// Rules that matched in `log` mode, over every HELO.
    pub logged: &'a [&'static str],
    pub ms: u64,
    /// What the proxy adds about the connection; `None` for a door that carries no bytes.
    pub transport: Option<Transport<'a>>,
}

/// The proxy's facts about a session's connection, for its log line.
#[derive(Debug)]
pub struct Transport<'a> {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub spliced: bool,
    pub copied: u64,
    pub tls: bool,
    pub end: &'static str,
    pub side: &'static str,
    pub error: &'a str,
}

/// Addresses never banned, as the configuration in force says.
#[derive(Clone, Copy, Debug)]
pub struct NeverBan<'a> {
    /// The MTA's own address: banning it would cut the gateway off from itself.
    pub mta: IpAddr,
    /// Front proxies: banning one would cut off every client behind it.
    pub trusted_proxies: &'a [IpNet],
    pub allowlist: &'a [IpNet],
}

impl NeverBan<'_> {
    /// Why `ip` must not be banned, if it must not.
    pub fn reason(&self, ip: IpAddr) -> Option<&'static str> {
        if ip == crate::addr::canonical(self.mta) {
            Some("the MTA's own address (proxy.upstream)")
        } else if self.trusted_proxies.iter().any(|net| net.contains(&ip)) {
            Some("a trusted front proxy (proxy.trusted_proxies)")
        } else if self.allowlist.iter().any(|net| net.contains(&ip)) {
            Some("allowlisted (allowlist.networks)")
        } else {
            None
        }
    }
}

/// Where verdicts have consequences: the ban queue, the metrics, the tophelos report.
pub struct Court {
    /// Where bans go; `None` judges without banning (rejections only).
    pub bans: Option<BanSender>,
    pub metrics: Option<Arc<Metrics>>,
    pub report: Mutex<Report>,
}

impl Court {
    pub fn new(bans: Option<BanSender>, metrics: Option<Arc<Metrics>>, window: Duration) -> Self {
        Court { bans, metrics, report: Mutex::new(Report::new(window)) }
    }

    /// A session is over: its log line, its observation, and its ban if the verdict says so.
    pub fn conclude(&self, record: &Record<'_>, never: &NeverBan<'_>) {
        log_line(record);
        self.observe(record);
        let Some(verdict) = record.verdict.filter(|v| v.action == Action::Ban) else { return };
        let ip = record.client.ip;
        if let Some(why) = never.reason(ip) {
            tracing::warn!(client = %ip, rule = verdict.rule, why, "not banning: {why}");
            return;
        }
        let (Some(bans), Some(ttl)) = (&self.bans, verdict.ttl) else { return };
        bans.ban(BanRequest {
            client: ip,
            ttl,
            reason: format!("{}: {}", verdict.rule, record.helo.unwrap_or("")),
        });
    }

    /// Counts a finished session for tophelos and the metrics.
    fn observe(&self, record: &Record<'_>) {
        let verdict = record.verdict;
        if let Some(helo) = record.helo {
            let rejected_by = verdict.filter(|v| v.action != Action::Pass).map(|v| v.rule);
            let now = crate::clock::unix_ns() / 1_000_000_000;
            self.report.lock().expect("report lock").record(
                now,
                helo,
                record.client.ip,
                rejected_by,
            );
        }
        if let Some(metrics) = &self.metrics {
            let labels =
                VerdictLabels { verdict: action(verdict), rule: verdict.map_or("", |v| v.rule) };
            metrics.sessions.get_or_create(&labels).inc();
        }
    }
}

fn action(verdict: Option<&Verdict>) -> &'static str {
    verdict.map_or("none", |v| v.action.as_str())
}

/// One line per session: the client, the HELO, the verdict and why, and how it went.
fn log_line(record: &Record<'_>) {
    let verdict = record.verdict;
    let via = record.client.via.map(|v| v.to_string()).unwrap_or_default();
    let helo = record.helo.unwrap_or("");
    let helos = record.helos.join(" ");
    let rule = verdict.map_or("", |v| v.rule);
    let reason = verdict.map_or("", |v| v.reason.as_str());
    let logged = record.logged.join(",");
    let ttl = verdict.and_then(|v| v.ttl).map(crate::duration::format).unwrap_or_default();
    let door = record.door.as_str();
    // A door without a connection of its own (the policy service) has no transport fields:
    // `None` values are left out of the line.
    let t = record.transport.as_ref();
    tracing::info!(
        door,
        client = %record.client.ip,
        via,
        helo,
        helos,
        verdict = action(verdict),
        rule,
        reason,
        logged,
        ttl,
        bytes_in = t.map(|t| t.bytes_in),
        bytes_out = t.map(|t| t.bytes_out),
        spliced = t.map(|t| t.spliced),
        copied = t.map(|t| t.copied),
        tls = t.map(|t| t.tls),
        ms = record.ms,
        end = t.map(|t| t.end),
        side = t.map(|t| t.side),
        error = t.map(|t| t.error),
        "session"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_ban_names_the_right_reason() {
        let proxies = ["192.0.2.0/28".parse().unwrap()];
        let allow = ["198.51.100.128/25".parse().unwrap()];
        let never = NeverBan {
            mta: "::ffff:127.0.0.1".parse().unwrap(),
            trusted_proxies: &proxies,
            allowlist: &allow,
        };
        let reason = |ip: &str| never.reason(ip.parse().unwrap());
        assert_eq!(reason("127.0.0.1"), Some("the MTA's own address (proxy.upstream)"));
        assert_eq!(reason("192.0.2.5"), Some("a trusted front proxy (proxy.trusted_proxies)"));
        assert_eq!(reason("198.51.100.200"), Some("allowlisted (allowlist.networks)"));
        assert_eq!(reason("203.0.113.9"), None);
    }

    #[test]
    fn a_client_is_canonical_once() {
        let client = Client::new("::ffff:203.0.113.9".parse().unwrap(), None, false);
        assert_eq!(client.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_ban_verdict_reaches_the_ban_worker_and_a_guarded_address_does_not() {
        use crate::blocklist::BanStore;
        let rules = crate::config::Config::parse(
            "[identity]\ndetect = false\ndomains = [\"example.com\"]\n",
            std::path::Path::new("t"),
            &crate::config::HostFacts::default(),
        )
        .unwrap()
        .rules;
        let (sender, worker) =
            crate::blocklist::fake::spawn_worker(crate::blocklist::fake::FakeStore::default());
        let court = Court::new(Some(sender), None, Duration::from_secs(3600));
        let never =
            NeverBan { mta: "192.0.2.25".parse().unwrap(), trusted_proxies: &[], allowlist: &[] };
        for ip in ["203.0.113.9", "192.0.2.25"] {
            let client = Client::new(ip.parse().unwrap(), None, false);
            let verdict = classify(&rules, &client, "mx.example.com", &[]);
            assert_eq!(verdict.action, Action::Ban);
            let record = Record {
                door: Door::Proxy,
                client: &client,
                helo: Some("mx.example.com"),
                helos: &[],
                verdict: Some(&verdict),
                logged: &[],
                ms: 1,
                transport: None,
            };
            court.conclude(&record, &never);
        }
        let now = crate::clock::unix_ns() / 1_000_000_000;
        let rows = court.report.lock().unwrap().top(now, Duration::from_secs(60), 10);
        assert_eq!(rows.len(), 1, "both sessions observed under their HELO");
        drop(court);
        let list = worker.join().unwrap();
        let banned: Vec<String> =
            list.store().entries().unwrap().iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(banned, ["203.0.113.9"], "the MTA's own address is never banned");
        let reason = list.list(crate::clock::boot_ns()).unwrap()[0].reason.clone();
        assert_eq!(reason, "forged_identity: mx.example.com");
    }
}
