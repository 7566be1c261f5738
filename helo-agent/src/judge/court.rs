//! Where verdicts have consequences: [`Court::conclude`] writes a finished session's log line,
//! counts it for tophelos and the metrics, applies the never-ban guards (each refusal logged
//! with its reason) and requests the ban, whose TTL the ban worker escalates for repeat
//! offenders. [`Court::condemn`] and [`Court::ban_pending`] hold a ban just decided at the
//! doors until the ban worker has written it into the kernel, however long it waits in the
//! worker's queue (a storm's bans are never dropped: they queue). What happens when a verdict
//! is `ban` is read here, and nowhere else.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::record::{Record, action, log_line};
use super::{Client, NeverBan};
use crate::addr::{BanScope, BanTarget};
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
    /// Bans decided in the last [`PENDING_HOLD`], or still waiting for the ban worker.
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

    /// A session is over: its log line, its observation, and its ban if the verdict says so:
    /// of what `scope` covers around the client (its IPv6 /64 by default).
    pub fn conclude(&self, record: &Record<'_>, never: &NeverBan<'_>, scope: BanScope) {
        log_line(record);
        self.observe(record);
        let Some(verdict) = record.verdict.filter(|v| v.action == Action::Ban) else { return };
        let ip = record.client.ip;
        if let Some(why) = never.reason(ip) {
            tracing::warn!(client = %ip, rule = verdict.rule, why, "not banning: {why}");
            return;
        }
        let (Some(bans), Some(ttl)) = (&self.bans, verdict.ttl) else { return };
        let target = never.target(ip, scope);
        let place = bans.ban(BanRequest {
            client: ip,
            target,
            ttl,
            reason: format!("{}: {}", verdict.rule, record.helo.unwrap_or("")),
        });
        if let Some(place) = place {
            // The hold starts again now, and lasts until the worker has written the ban.
            let now = crate::clock::boot_ns();
            self.pending.insert(target, now, ttl, Some(place), |p| self.written(p));
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
    pub fn condemn(
        &self,
        client: &Client,
        verdict: &Verdict,
        never: &NeverBan<'_>,
        scope: BanScope,
    ) {
        if verdict.action != Action::Ban || self.bans.is_none() || never.reason(client.ip).is_some()
        {
            return;
        }
        if let Some(ttl) = verdict.ttl {
            let now = crate::clock::boot_ns();
            let target = never.target(client.ip, scope);
            self.pending.insert(target, now, ttl, None, |p| self.written(p));
        }
    }

    /// An admin lifted `target`: the doors stop holding a ban just decided for the addresses
    /// it covers (else an unban right after a ban would not reach the doors for up to
    /// [`PENDING_HOLD`]).
    pub fn forgive(&self, target: &BanTarget) {
        self.pending.forget(|held| target.overlaps(&held.network()));
    }

    /// Whether a ban of `ip` was decided within the last [`PENDING_HOLD`], or waits for the ban
    /// worker still: it may not be in the kernel map yet, so a door refuses the client itself.
    /// Takes no lock unless a ban was decided within the hold or waits.
    pub fn ban_pending(&self, ip: IpAddr) -> bool {
        let idle = self.bans.as_ref().is_none_or(BanSender::idle);
        let (ip, now) = (crate::addr::canonical(ip), crate::clock::boot_ns());
        self.pending.contains(ip, now, idle, |place| self.written(place))
    }

    /// Whether the ban worker has written the rule ban at `place` in its queue.
    fn written(&self, place: u64) -> bool {
        self.bans.as_ref().is_none_or(|bans| bans.applied(place))
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

/// How long a decided ban is enforced by the doors themselves at least (and longer while it
/// waits in the ban worker's queue): far longer than the worker takes to write a ban
/// (microseconds; a snapshot save can hold it for a fraction of a second), short enough that
/// an admin's `unban` right after a ban is not undone for long.
pub const PENDING_HOLD: Duration = Duration::from_secs(5);
/// Decided bans remembered at most (about 100 bytes each: 6 MB); beyond, the oldest are
/// forgotten, written or not. The worker writes some 200k bans a second: only a worker stuck
/// far behind a storm of more than this many new clients lets one through.
const PENDING_CAPACITY: usize = 65_536;

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
    /// How long each ban's clients are held.
    held: HashMap<BanTarget, Hold>,
    /// The decisions in the order made, for expiry and the bound.
    order: VecDeque<(BanTarget, Hold)>,
    /// The prefix lengths held bans have had (IPv6 or not, length): a client is looked up
    /// under each (a few at most: the scopes of the configs in force since the start).
    lengths: BTreeSet<(bool, u8)>,
}

/// One decided ban's hold at the doors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hold {
    /// Held until then at least (boot ns): the decision and [`PENDING_HOLD`] (never past the
    /// ban's own end).
    until: u64,
    /// Held until then at most, written or not (boot ns): the ban's own end.
    ends: u64,
    /// The ban's place in the ban worker's queue (`None`: not requested yet): held while the
    /// worker has not written it.
    place: Option<u64>,
}

impl Hold {
    fn holds(&self, now: u64, written: &impl Fn(u64) -> bool) -> bool {
        now < self.until || (now < self.ends && self.place.is_some_and(|p| !written(p)))
    }
}

impl Pending {
    /// Holds the clients of `target` for a ban of `ttl` decided at `now` (at `place` in the
    /// worker's queue, once requested); `written` says whether the worker has written the ban
    /// at a place.
    fn insert(
        &self,
        target: BanTarget,
        now: u64,
        ttl: Duration,
        place: Option<u64>,
        written: impl Fn(u64) -> bool,
    ) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let hold = Hold {
            until: now.saturating_add(ns(ttl.min(PENDING_HOLD))),
            ends: now.saturating_add(ns(ttl)),
            place,
        };
        let mut recent = self.recent.lock().expect("pending bans lock");
        // The latest decision holds the client: a session's ban request replaces its verdict's.
        recent.held.insert(target, hold);
        recent.order.push_back((target, hold));
        if target.is_prefix() {
            let net = target.network();
            recent.lengths.insert((net.addr().is_ipv6(), net.prefix_len()));
        }
        while let Some(&(old, old_hold)) = recent.order.front() {
            if old_hold.holds(now, &written) && recent.order.len() <= PENDING_CAPACITY {
                break;
            }
            recent.order.pop_front();
            // Only the client's latest decision removes it.
            if recent.held.get(&old) == Some(&old_hold) {
                recent.held.remove(&old);
            }
        }
        self.latest.fetch_max(now, Ordering::Relaxed);
    }

    /// Forgets the bans `covered` says.
    fn forget(&self, covered: impl Fn(&BanTarget) -> bool) {
        let mut recent = self.recent.lock().expect("pending bans lock");
        recent.held.retain(|target, _| !covered(target));
        recent.order.retain(|(target, _)| !covered(target));
    }

    /// Whether `ip` is held at `now`; `idle`: the ban worker has written every ban requested,
    /// `written`: whether it has written the one at a place in its queue.
    fn contains(&self, ip: IpAddr, now: u64, idle: bool, written: impl Fn(u64) -> bool) -> bool {
        let hold = u64::try_from(PENDING_HOLD.as_nanos()).unwrap_or(u64::MAX);
        let latest = self.latest.load(Ordering::Relaxed);
        if latest == 0 || (idle && now >= latest.saturating_add(hold)) {
            return false;
        }
        let recent = self.recent.lock().expect("pending bans lock");
        let holds = |target: BanTarget| {
            recent.held.get(&target).is_some_and(|hold| hold.holds(now, &written))
        };
        holds(BanTarget::host(ip))
            || recent
                .lengths
                .iter()
                .filter(|(v6, _)| *v6 == ip.is_ipv6())
                .any(|(_, len)| holds(BanTarget::of(ip, *len)))
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
        let written = |_| true;
        let contains = |ip, now| pending.contains(ip, now, true, written);
        let host = BanTarget::host;
        assert!(!contains(ip(1), 10 * sec), "nothing decided");
        pending.insert(host(ip(1)), 10 * sec, Duration::from_secs(3600), Some(1), written);
        assert!(contains(ip(1), 10 * sec));
        assert!(!contains(ip(2), 10 * sec));
        assert!(contains(ip(1), 14 * sec));
        assert!(!contains(ip(1), 15 * sec), "past the hold");
        pending.insert(host(ip(3)), 20 * sec, Duration::from_secs(1), None, written);
        assert!(!contains(ip(3), 21 * sec), "never longer than the ban itself");
        for i in 0..(PENDING_CAPACITY as u32 + 100) {
            pending.insert(host(ip(100 + i)), 30 * sec, Duration::from_secs(60), None, written);
        }
        let recent = pending.recent.lock().unwrap();
        assert!(recent.order.len() <= PENDING_CAPACITY && recent.held.len() <= PENDING_CAPACITY);
        drop(recent);
        assert!(!contains(ip(100), 30 * sec), "the oldest forgotten first");
        pending.forget(|held| *held == host(ip(200)));
        assert!(!contains(ip(200), 30 * sec), "an admin's unban ends the hold");
        assert!(contains(ip(201), 30 * sec));
        assert!(contains(ip(100 + PENDING_CAPACITY as u32 + 99), 30 * sec));
    }

    /// A ban waiting in the worker's queue past the hold (a worker far behind a storm) still
    /// holds its client at the doors until it is written: the bot must not slip through in
    /// between. Never past the ban's own end.
    #[test]
    fn a_ban_not_yet_written_holds_its_client_past_the_hold() {
        let pending = Pending::default();
        let (bot, sec) = (IpAddr::from([203, 0, 113, 9]), 1_000_000_000u64);
        let written = std::sync::atomic::AtomicU64::new(0);
        let is_written = |place| written.load(Ordering::Relaxed) >= place;
        pending.insert(
            BanTarget::host(bot),
            10 * sec,
            Duration::from_secs(60),
            Some(7),
            is_written,
        );
        assert!(pending.contains(bot, 20 * sec, false, is_written), "waiting: held past the hold");
        assert!(!pending.contains(bot, 71 * sec, false, is_written), "never past the ban's end");
        written.store(7, Ordering::Relaxed);
        assert!(!pending.contains(bot, 20 * sec, true, is_written), "written: the kernel has it");
        assert!(pending.contains(bot, 12 * sec, true, is_written), "the hold itself still holds");
    }

    /// A rule's ban covers the client's /64: a bot that hops to the next address of its /64
    /// at once is held at the doors too, and an unban of the /64 ends the hold.
    #[test]
    fn a_prefix_ban_holds_every_address_inside_it() {
        let pending = Pending::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sec = 1_000_000_000u64;
        let written = |_| true;
        let target = BanScope::default().covering(ip("2001:db8:5::10"));
        pending.insert(target, 10 * sec, Duration::from_secs(3600), None, written);
        assert!(pending.contains(ip("2001:db8:5::11"), 11 * sec, true, written));
        assert!(pending.contains(ip("2001:db8:5::ffff:1"), 11 * sec, true, written));
        assert!(!pending.contains(ip("2001:db8:6::11"), 11 * sec, true, written));
        assert!(!pending.contains(ip("192.0.2.1"), 11 * sec, true, written));
        pending.forget(|held| held.overlaps(&"2001:db8:5::/64".parse().unwrap()));
        assert!(!pending.contains(ip("2001:db8:5::11"), 11 * sec, true, written));
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
            court.condemn(&client, &verdict, &never, BanScope::default());
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
            court.conclude(&record, &never, BanScope::default());
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
