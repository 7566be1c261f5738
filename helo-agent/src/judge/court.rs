//! Where verdicts have consequences: [`Court::conclude`] writes a finished session's log line,
//! counts it for tophelos and the metrics, applies the never-ban guards (each refusal logged
//! with its reason) and requests the ban, whose TTL the ban worker escalates for repeat
//! offenders. [`Court::condemn`] and [`Court::ban_pending`] hold a ban just decided at the
//! doors until the ban worker has written it into the kernel. What happens when a verdict is
//! `ban` is read here, and nowhere else.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::record::{Record, action, log_line};
use super::{Client, NeverBan};
use crate::blocklist::worker::{BanRequest, BanSender};
use crate::metrics::{Metrics, VerdictLabels};
use crate::report::Report;
use crate::rules::{Action, Verdict};

/// Where verdicts have consequences: the ban queue, the metrics, the tophelos report.
pub struct Court {
    /// Where bans go; `None` judges without banning (rejections only).
    bans: Option<BanSender>,
    pub metrics: Option<Arc<Metrics>>,
    pub report: Mutex<Report>,
    /// Bans decided in the last [`PENDING_HOLD`], maybe not in the kernel yet.
    pending: Pending,
    /// Proxy sessions open now (see [`Court::opened`]).
    open: Arc<AtomicUsize>,
}

impl Court {
    pub fn new(bans: Option<BanSender>, metrics: Option<Arc<Metrics>>, window: Duration) -> Self {
        Court {
            bans,
            metrics,
            report: Mutex::new(Report::new(window)),
            pending: Pending::default(),
            open: Arc::default(),
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

    /// Asks the ban worker for a steering pass for `client` (see [`super::honest`]).
    pub fn grant_pass(&self, client: IpAddr, ttl: Duration) {
        if let Some(bans) = &self.bans {
            bans.pass(client, ttl);
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

    /// A proxy session is open until the returned guard is dropped (the `sessions_open` gauge
    /// and `top` read [`Court::open_sessions`]).
    pub fn opened(&self) -> Open {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self.open.clone())
    }

    /// Proxy sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.open.load(Ordering::Relaxed)
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

/// An open session, counted until dropped.
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::{Door, Hearing, Law};

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

    /// Regression (issue 27): a monitor on the gateway connecting from one of our own
    /// addresses and saying our name was banned for an hour and the ban published to the
    /// fleet; loopback too where the allowlist left it out. Neither is ever banned nor held at
    /// accept, through either door (both conclude here).
    #[test]
    fn a_ban_verdict_reaches_the_ban_worker_and_a_guarded_address_does_not() {
        use crate::blocklist::BanStore;
        let config = crate::config::Config::parse(
            "[identity]\ndetect = false\ndomains = [\"example.com\"]\n\
             addresses = [\"198.51.100.25\", \"2001:db8:25::1\"]\n\
             [allowlist]\nnetworks = [\"198.51.100.128/25\"]\n\
             [proxy]\nupstream = \"192.0.2.25:25\"\n",
            std::path::Path::new("t"),
            &crate::config::HostFacts::default(),
        )
        .unwrap();
        let live = super::super::Live::of(&config);
        let (sender, worker) =
            crate::blocklist::fake::spawn_worker(crate::blocklist::fake::FakeStore::default());
        let court = Court::new(Some(sender), None, Duration::from_secs(3600));
        let never = live.never_ban();
        let clients = [
            "203.0.113.9",
            "192.0.2.25",
            "198.51.100.25",
            "2001:db8:25::1",
            "::ffff:198.51.100.25",
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "198.51.100.200",
        ];
        for ip in clients {
            let client = Client::new(ip.parse().unwrap(), None, false);
            let mut hearing = Hearing::new(&client);
            hearing.hear(&Law::given(&config.rules, None), "mx.example.com", None);
            // The allowlisted client passes; the others are banned by the rules.
            let verdict = hearing.verdict().unwrap().clone();
            court.condemn(&client, &verdict, &never);
            let record = Record {
                door: Door::Proxy,
                client: &client,
                helo: Some("mx.example.com"),
                helos: &[],
                verdict: Some(&verdict),
                logged: &[],
                dns: None,
                ms: 1,
                transport: None,
            };
            court.conclude(&record, &never);
            let held = court.ban_pending(client.ip);
            assert_eq!(held, ip == "203.0.113.9", "{ip}: held at accept only when bannable");
        }
        let now = crate::clock::unix_ns() / 1_000_000_000;
        let rows = court.report.lock().unwrap().top(now, Duration::from_secs(60), 10);
        assert_eq!(rows.len(), 1, "every session observed under its HELO");
        drop(court);
        let list = worker.join().unwrap();
        let banned: Vec<String> =
            list.store().entries().unwrap().iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(banned, ["203.0.113.9"], "ours, the MTA, loopback, the allowlist: never banned");
        let reason = list.list(crate::clock::boot_ns()).unwrap()[0].reason.clone();
        assert_eq!(reason, "forged_identity: mx.example.com");
    }
}
