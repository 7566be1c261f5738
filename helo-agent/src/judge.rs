//! The judging core: the one place that turns "this client said this HELO" into a verdict and
//! its consequences, whichever front door heard it. The proxy asks it today; the Postfix policy
//! service will ask the same functions with the same facts.
//!
//! - [`Client`]: who the client is, resolved once at accept (the real address after a trusted
//!   front proxy, canonical; the listener's facts).
//! - [`classify`]: the verdict on one HELO, given the ones before it in the session, by every
//!   check but HELO reuse; [`reuse`]: the last check, which counts the client in the memory
//!   both doors share and judges the count. A door calls [`classify`] (again once DNS has
//!   answered, see [`dns_need`]), then [`reuse`] once with the verdict it ended with.
//! - [`Court::conclude`]: what a finished session's verdict causes, in one place: the session's
//!   log line, the tophelos and metrics observation, the never-ban guards (allowlist, the MTA's
//!   own address, trusted front proxies; each refusal logged with its reason) and the ban
//!   request, whose TTL the ban worker escalates for repeat offenders.
//! - [`Court::ban_pending`]: whether a ban for a client was decided so recently that the ban
//!   worker may not have written it into the kernel yet. Doors ask it when a client connects
//!   (or, for the policy service, when a new SMTP session asks), so a bot that comes straight
//!   back after its ban was decided is refused rather than let through by the race.
//!
//! What happens when a verdict is `ban` is read here, and nowhere else.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

use crate::blocklist::worker::{BanRequest, BanSender};
use crate::dns::Need;
use crate::metrics::{Metrics, VerdictLabels};
use crate::report::{HeloRow, Report};
use crate::reuse::ReuseReport;
use crate::rules::{Action, DnsFacts, Facts, RuleSet, Verdict};

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

/// The verdict on `helo`, said by `client` after `previous` HELOs in the same session, with
/// what DNS said when the door looked (see `crate::dns`), and whether the client spoke before
/// the greeting was complete (`pregreeted`: only the proxy greeting itself can tell).
pub fn classify(
    rules: &RuleSet,
    client: &Client,
    helo: &str,
    previous: &[String],
    dns: Option<&DnsFacts>,
    pregreeted: bool,
) -> Verdict {
    rules.classify(&Facts {
        client: Some(client.ip),
        argument: helo,
        previous,
        exempt_listener: client.exempt,
        dns,
        pregreeted,
        reuse: None,
    })
}

/// [`classify`]'s verdict on the same HELO once DNS has answered with `dns`, from `verdict`,
/// the verdict without DNS that [`dns_need`] asked the lookups for: only what DNS can change is
/// judged again (`RuleSet::with_dns`), not every rule a second time.
pub fn with_dns(
    rules: &RuleSet,
    client: &Client,
    helo: &str,
    previous: &[String],
    dns: &DnsFacts,
    pregreeted: bool,
    verdict: Verdict,
) -> Verdict {
    rules.with_dns(
        verdict,
        &Facts {
            client: Some(client.ip),
            argument: helo,
            previous,
            exempt_listener: client.exempt,
            dns: Some(dns),
            pregreeted,
            reuse: None,
        },
    )
}

/// The last check, HELO reuse (`checks.helo_reuse`, `[reuse]`): given `verdict`, the verdict
/// of [`classify`] on the same HELO with the DNS facts the door ended with, the client's
/// network is counted for the name in the memory both doors share ([`RuleSet::memory`]), and
/// the count judged. Nothing is counted where [`RuleSet::reuse_name`] says so: a rule decided,
/// the HELO is no domain name, or the client's forward-confirmed reverse name is the HELO (so
/// a door calls this after its lookups, never before). Once per judged HELO.
pub fn reuse(
    rules: &RuleSet,
    client: &Client,
    helo: &str,
    dns: Option<&DnsFacts>,
    verdict: Verdict,
) -> Verdict {
    let Some(name) = rules.reuse_name(&verdict, helo, dns) else { return verdict };
    let count = rules.memory.observe(&name, client.ip, reuse_now(), rules.reuse.window);
    rules.with_reuse(verdict, helo, dns, count.networks)
}

/// `tophelos` rows with the reuse memory's count of each name (over `reuse.window` up to now,
/// whatever `--since` the rows cover) and whether that makes it reused.
pub fn mark_reuse(mut rows: Vec<HeloRow>, rules: &RuleSet) -> Vec<HeloRow> {
    let now = reuse_now();
    for row in &mut rows {
        let count = rules.memory.count(&row.helo, now, rules.reuse.window);
        row.networks = count.networks as u64;
        row.networks_capped = count.capped;
        row.reused = count.networks >= rules.reuse.clients;
    }
    rows
}

/// Every name reused now, with the limits in force (`tophelos --suggest`).
pub fn reused(rules: &RuleSet) -> ReuseReport {
    let limits = rules.reuse;
    ReuseReport {
        clients: limits.clients,
        window_secs: limits.window.as_secs(),
        helos: rules.memory.reused(reuse_now(), limits.window, limits.clients),
    }
}

/// The reuse memory's clock, in seconds, for every use and count of it: the boot clock, so a
/// count never jumps with the wall clock.
pub fn reuse_now() -> u64 {
    crate::clock::boot_ns() / 1_000_000_000
}

/// Whether DNS can still change `verdict`, the verdict on `helo` without DNS, and so whether
/// the door should look: `None` when the DNS checks are off, the HELO is not a domain name, or
/// a rule already decided (DNS checks come last). [`Need::Required`] when a DNS check enforces
/// (the session waits for the answers), or `helo_reuse` does (its guard, the client's
/// forward-confirmed reverse name, must be known before a name is judged reused);
/// [`Need::Optional`] when they only log (the lookups are skipped when every lookup slot is
/// taken). `helo_reuse` in `log` asks for no lookup of its own: it reads what the DNS checks'
/// lookups found.
pub fn dns_need(rules: &RuleSet, verdict: &Verdict, helo: &str) -> Option<(String, Need)> {
    use crate::rules::{Check, CheckAction};
    let enforces = |a: &CheckAction| matches!(a, CheckAction::Reject | CheckAction::Ban);
    let actions = [rules.action(Check::UnknownHelo), rules.action(Check::HeloNotClient)];
    let need = if actions.iter().any(enforces) || enforces(&rules.action(Check::HeloReuse)) {
        Need::Required
    } else if actions.contains(&CheckAction::Log) {
        Need::Optional
    } else {
        return None;
    };
    match crate::rules::helo::parse(helo) {
        crate::rules::helo::Helo::Name(name) if name.contains('.') && verdict.rule == "pass" => {
            Some((name, need))
        }
        _ => None,
    }
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
    /// What the client sent before the greeting was complete, and when (the pregreet test).
    pub pregreet: Option<&'a str>,
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
    /// Bans decided in the last [`PENDING_HOLD`], maybe not in the kernel yet.
    pending: Pending,
}

impl Court {
    pub fn new(bans: Option<BanSender>, metrics: Option<Arc<Metrics>>, window: Duration) -> Self {
        Court {
            bans,
            metrics,
            report: Mutex::new(Report::new(window)),
            pending: Pending::default(),
        }
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
        let queued = bans.ban(BanRequest {
            client: ip,
            ttl,
            reason: format!("{}: {}", verdict.rule, record.helo.unwrap_or("")),
        });
        if queued {
            // The hold starts again now: the worker has yet to take the request.
            self.pending.insert(ip, crate::clock::boot_ns(), ttl);
        }
    }

    /// A session's verdict is a ban, decided now, though the ban is requested only when the
    /// session ends (the proxy: earlier, XDP would drop the client's ACKs of our own 553s).
    /// From now the client's new connections are refused at accept, as the kernel will refuse
    /// them once the ban is in. Nothing happens for a client that is never banned.
    pub fn condemn(&self, client: &Client, verdict: &Verdict, never: &NeverBan<'_>) {
        if verdict.action != Action::Ban || self.bans.is_none() || never.reason(client.ip).is_some()
        {
            return;
        }
        if let Some(ttl) = verdict.ttl {
            self.pending.insert(client.ip, crate::clock::boot_ns(), ttl);
        }
    }

    /// An admin lifted `target`: the doors stop holding a ban just decided for the addresses
    /// it covers (else an unban right after a ban would not reach the doors for up to
    /// [`PENDING_HOLD`]).
    pub fn forgive(&self, target: &crate::addr::BanTarget) {
        self.pending.forget(|ip| target.overlaps(&ipnet::IpNet::from(ip)));
    }

    /// Whether a ban of `ip` was decided within the last [`PENDING_HOLD`]: the ban worker may
    /// not have written it into the kernel map yet, so a door refuses the client itself. Takes
    /// no lock unless a ban was decided within the hold.
    pub fn ban_pending(&self, ip: IpAddr) -> bool {
        self.pending.contains(crate::addr::canonical(ip), crate::clock::boot_ns())
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

/// How long a decided ban is enforced by the doors themselves: far longer than the ban worker
/// takes to write a ban (microseconds; a snapshot save can hold it for a fraction of a
/// second), short enough that an admin's `unban` right after a ban is not undone for long.
pub const PENDING_HOLD: Duration = Duration::from_secs(5);
/// Decided bans remembered at most; beyond, the oldest are forgotten (they are long written).
const PENDING_CAPACITY: usize = 4096;

/// Bans decided recently: bounded, time-limited, cheap to ask when empty.
#[derive(Default)]
struct Pending {
    /// Boot ns of the latest decision (0: none): when it is older than the hold, nothing is
    /// pending and [`Pending::contains`] answers without the lock.
    latest: AtomicU64,
    recent: Mutex<RecentBans>,
}

#[derive(Default)]
struct RecentBans {
    /// Until when each client is held (boot ns).
    until: HashMap<IpAddr, u64>,
    /// The decisions in the order made, for expiry and the bound.
    order: VecDeque<(IpAddr, u64)>,
}

impl Pending {
    fn insert(&self, ip: IpAddr, now: u64, ttl: Duration) {
        let hold = u64::try_from(ttl.min(PENDING_HOLD).as_nanos()).unwrap_or(u64::MAX);
        let until = now.saturating_add(hold);
        let mut recent = self.recent.lock().expect("pending bans lock");
        let held = recent.until.entry(ip).or_insert(0);
        *held = (*held).max(until);
        recent.order.push_back((ip, until));
        while let Some(&(old, old_until)) = recent.order.front() {
            if old_until > now && recent.order.len() <= PENDING_CAPACITY {
                break;
            }
            recent.order.pop_front();
            // Only the client's latest decision removes it.
            if recent.until.get(&old) == Some(&old_until) {
                recent.until.remove(&old);
            }
        }
        self.latest.fetch_max(now, Ordering::Relaxed);
    }

    /// Forgets the clients `covered` says.
    fn forget(&self, covered: impl Fn(IpAddr) -> bool) {
        let mut recent = self.recent.lock().expect("pending bans lock");
        recent.until.retain(|ip, _| !covered(*ip));
        recent.order.retain(|(ip, _)| !covered(*ip));
    }

    fn contains(&self, ip: IpAddr, now: u64) -> bool {
        let hold = u64::try_from(PENDING_HOLD.as_nanos()).unwrap_or(u64::MAX);
        let latest = self.latest.load(Ordering::Relaxed);
        if latest == 0 || now >= latest.saturating_add(hold) {
            return false;
        }
        let recent = self.recent.lock().expect("pending bans lock");
        recent.until.get(&ip).is_some_and(|&until| now < until)
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
        pregreet = t.and_then(|t| t.pregreet),
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
    fn pending_bans_are_held_for_the_hold_and_bounded() {
        let pending = Pending::default();
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + i));
        let sec = 1_000_000_000u64;
        assert!(!pending.contains(ip(1), 10 * sec), "nothing decided");
        pending.insert(ip(1), 10 * sec, Duration::from_secs(3600));
        assert!(pending.contains(ip(1), 10 * sec));
        assert!(!pending.contains(ip(2), 10 * sec));
        assert!(pending.contains(ip(1), 14 * sec));
        assert!(!pending.contains(ip(1), 15 * sec), "past the hold");
        pending.insert(ip(3), 20 * sec, Duration::from_secs(1));
        assert!(!pending.contains(ip(3), 21 * sec), "never longer than the ban itself");
        for i in 0..(PENDING_CAPACITY as u32 + 100) {
            pending.insert(ip(100 + i), 30 * sec, Duration::from_secs(60));
        }
        let recent = pending.recent.lock().unwrap();
        assert!(recent.order.len() <= PENDING_CAPACITY && recent.until.len() <= PENDING_CAPACITY);
        drop(recent);
        assert!(!pending.contains(ip(100), 30 * sec), "the oldest forgotten first");
        pending.forget(|client| client == ip(200));
        assert!(!pending.contains(ip(200), 30 * sec), "an admin's unban ends the hold");
        assert!(pending.contains(ip(201), 30 * sec));
        assert!(pending.contains(ip(100 + PENDING_CAPACITY as u32 + 99), 30 * sec));
    }

    fn rules(extra: &str) -> Arc<RuleSet> {
        let text = format!("[identity]\ndetect = false\n{extra}");
        crate::config::Config::parse(&text, std::path::Path::new("t"), &Default::default())
            .unwrap()
            .rules
    }

    /// HELO reuse asks for DNS only where it enforces (its guard must be known first); in
    /// `log` it reads what the DNS checks looked up, and asks nothing with them off.
    #[test]
    fn helo_reuse_asks_for_dns_only_where_it_enforces() {
        let off = "[checks]\nunknown_helo = \"off\"\nhelo_not_client = \"off\"\n";
        let need = |extra: &str, helo: &str| {
            let rules = rules(&format!("{off}{extra}"));
            let client = Client::new("198.51.100.7".parse().unwrap(), None, false);
            let verdict = classify(&rules, &client, helo, &[], None, false);
            dns_need(&rules, &verdict, helo).map(|(_, need)| need)
        };
        assert_eq!(need("helo_reuse = \"log\"", "bulk.example"), None);
        assert_eq!(need("helo_reuse = \"reject\"", "bulk.example"), Some(Need::Required));
        assert_eq!(need("helo_reuse = \"ban\"", "localhost"), None, "a rule decided");
    }

    /// tophelos rows carry the memory's count and the mark; `--suggest` lists what is reused.
    #[test]
    fn tophelos_rows_are_marked_from_the_reuse_memory() {
        let rules = rules("[reuse]\nclients = 2\n");
        let now = reuse_now();
        for client in ["198.51.1.7", "198.51.2.7", "198.51.2.8"] {
            rules.memory.observe("bulk.example", client.parse().unwrap(), now, rules.reuse.window);
        }
        rules.memory.observe(
            "mail.example",
            "198.51.3.7".parse().unwrap(),
            now,
            rules.reuse.window,
        );
        let mut report = Report::new(Duration::from_secs(3600));
        let unix = crate::clock::unix_ns() / 1_000_000_000;
        report.record(unix, "Bulk.Example", "198.51.1.7".parse().unwrap(), None);
        report.record(unix, "mail.example", "198.51.3.7".parse().unwrap(), None);
        let rows = mark_reuse(report.top(unix, Duration::from_secs(60), 10), &rules);
        let marks: Vec<(&str, u64, bool)> =
            rows.iter().map(|r| (r.helo.as_str(), r.networks, r.reused)).collect();
        assert_eq!(marks, [("bulk.example", 2, true), ("mail.example", 1, false)]);
        let report = reused(&rules);
        assert_eq!((report.clients, report.window_secs), (2, 3600));
        let names: Vec<&str> = report.helos.iter().map(|r| r.helo.as_str()).collect();
        assert_eq!(names, ["bulk.example"]);
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
            let verdict = classify(&rules, &client, "mx.example.com", &[], None, false);
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
