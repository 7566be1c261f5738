//! The judge: the one place that turns "this client said this HELO" into a verdict and its
//! consequences, whichever front door heard it, and the owner of what the doors share. The
//! proxy and the Postfix policy service hand it the same facts and get the same verdict, log
//! line, reports and ban; a door only speaks its protocol, and no door imports another.
//!
//! - [`Judge`]: what every door shares, behind a narrow API: the live settings a reload swaps
//!   ([`Live`]: the rules, the proxy's settings, the reject text), the [`Court`], the resolver
//!   of the DNS checks, the ban maps read where the kernel cannot enforce them
//!   ([`Judge::refused_at_accept`]), and the judge's memories: which client networks used
//!   each HELO lately (`crate::reuse`), which clients passed the pregreet test lately
//!   (`crate::passes`), and which were told 450 for a HELO that DNS alone kept from a ban
//!   (`deferrals.rs`: their next session answers for that HELO first).
//! - [`Client`]: who the client is, resolved once at accept (the real address after a trusted
//!   front proxy, canonical; the listener's facts).
//! - [`Hearing`] (`hearing.rs`): one session's judging, sans-IO, the sequence written once:
//!   every door and `helo-agent check` drive it the same way.
//! - [`Court`] (`court.rs`): what a finished session's verdict causes: its log line
//!   ([`Record`], `record.rs`), the tophelos and metrics observation, the never-ban guards
//!   ([`NeverBan`]) and the ban request.

mod court;
pub mod deferrals;
pub mod hearing;
mod record;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use rustc_hash::FxHashSet;

pub use self::court::{Court, Open, PENDING_HOLD};
pub use self::hearing::{Heard, Hearing, Law, ReuseSeen};
pub use self::record::{Door, End, Record, Side, Transport, honest};
use crate::blocklist::BanCheck;
use crate::blocklist::worker::BanSender;
use crate::config::{Config, ProxyConfig};
use crate::dns::Dns;
use crate::metrics::Metrics;
use crate::passes::PassCache;
use crate::report::HeloRow;
use crate::reuse::{Memory, ReuseReport};
use crate::rules::{RuleSet, Verdict};

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

/// What a reload replaces. A session takes the current one when it starts and keeps it to
/// its end, so a reload never changes the rules under a session in flight.
pub struct Live {
    pub config: ProxyConfig,
    pub rules: Arc<RuleSet>,
    pub reject_message: String,
    /// Whether a loopback client may be banned: never in the agent (`false` from
    /// [`Live::of`]). The transcript tests, which run without root and so can only have
    /// clients on loopback, turn it on to see bans at all.
    pub loopback_bannable: bool,
    /// How long a steering pass lasts; `None`: steering is off or writes no passes.
    pub pass_ttl: Option<Duration>,
    /// What a rule's ban covers around the client (`bans.prefix_v4`, `bans.prefix_v6`).
    pub scope: crate::addr::BanScope,
}

impl Live {
    /// What `config` puts in force.
    pub fn of(config: &Config) -> Self {
        Live {
            config: config.proxy.clone(),
            rules: config.rules.clone(),
            reject_message: config.reject_message.clone(),
            loopback_bannable: false,
            pass_ttl: config.steer.pass_ttl(),
            scope: config.scope,
        }
    }

    /// The addresses these settings never ban.
    pub fn never_ban(&self) -> NeverBan<'_> {
        NeverBan {
            mta: self.config.upstream.ip(),
            trusted_proxies: &self.config.trusted_proxies,
            allowlist: &self.rules.allowlist,
            own: &self.rules.identity.addresses,
            loopback: !self.loopback_bannable,
        }
    }
}

/// Addresses never banned, as the configuration in force says: checked by the court for
/// every ban verdict of either door, before the ban is held at accept, queued for the kernel
/// or published to the fleet.
#[derive(Clone, Copy, Debug)]
pub struct NeverBan<'a> {
    /// The MTA's own address: banning it would cut the gateway off from itself.
    pub mta: IpAddr,
    /// Front proxies: banning one would cut off every client behind it.
    pub trusted_proxies: &'a [IpNet],
    pub allowlist: &'a [IpNet],
    /// Our own addresses (`identity.addresses`, and the host's own with `identity.detect`): a
    /// monitor or a local application that connects from one of them is the gateway itself,
    /// whatever it says (a forged-looking HELO is its own name), and a ban would travel to
    /// the whole fleet, cutting this gateway off from every other.
    pub own: &'a FxHashSet<IpAddr>,
    /// Loopback clients (127.0.0.0/8, ::1): local processes, whatever `allowlist.networks`
    /// says. `false` only in tests (see [`Live::loopback_bannable`]).
    pub loopback: bool,
}

impl NeverBan<'_> {
    /// The ban `scope` makes for `ip`, narrowed to `ip` alone when the prefix would cover the
    /// MTA's own address, one of our own addresses or a trusted front proxy (the kernel would
    /// drop them, and the fleet would ban our gateway everywhere; an allowlisted network
    /// inside a banned prefix is passed by the kernel, so it narrows nothing).
    pub fn target(&self, ip: IpAddr, scope: crate::addr::BanScope) -> crate::addr::BanTarget {
        let target = scope.covering(ip);
        let mta = crate::addr::canonical(self.mta);
        if target.is_prefix()
            && (target.covers(mta)
                || self.own.iter().any(|own| target.covers(crate::addr::canonical(*own)))
                || self.trusted_proxies.iter().any(|net| target.overlaps(net)))
        {
            tracing::info!(client = %ip, prefix = %target, "banning the client alone: its prefix holds the MTA, one of our own addresses or a trusted front proxy");
            return crate::addr::BanTarget::host(ip);
        }
        target
    }

    /// Why a ban of `target` that another gateway made must not be applied here, if it must
    /// not: the same guards, for a ban this gateway did not decide (another gateway judges by
    /// its own config: a monitor of ours that said our name there is a forger to it). A ban
    /// inside an allowlisted network would drop nothing; a prefix that merely holds one is
    /// applied (the kernel passes the allowlisted addresses in it). A ban that covers the MTA,
    /// one of our own addresses, loopback or a front proxy is refused whole: those are not in
    /// the kernel's allowlist, and only the ban's maker knows the bot it was made for.
    pub fn refuses_remote(&self, target: &crate::addr::BanTarget) -> Option<String> {
        if let Some(net) = self.allowlist.iter().find(|net| target.within(net)) {
            return Some(format!("the address is in this gateway's allowlist ({net})"));
        }
        let ours = std::iter::once(self.mta).chain(self.own.iter().copied());
        if let Some(ip) = ours.map(crate::addr::canonical).find(|ip| target.covers(*ip)) {
            return Some(format!(
                "it covers {ip}, this gateway's own address (proxy.upstream, identity.addresses)"
            ));
        }
        let localhost = [IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
        if self.loopback
            && (target.network().addr().is_loopback()
                || localhost.iter().any(|ip| target.covers(*ip)))
        {
            return Some("it covers loopback addresses: local processes".to_owned());
        }
        if let Some(net) = self.trusted_proxies.iter().find(|net| target.overlaps(net)) {
            return Some(format!("it covers a trusted front proxy ({net}, proxy.trusted_proxies)"));
        }
        None
    }

    /// Why `ip` must not be banned, if it must not.
    pub fn reason(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = crate::addr::canonical(ip);
        if ip == crate::addr::canonical(self.mta) {
            Some("the MTA's own address (proxy.upstream)")
        } else if self.loopback && ip.is_loopback() {
            Some("a loopback address: a local process")
        } else if self.own.contains(&ip) {
            Some("one of our own addresses (identity.addresses, identity.detect)")
        } else if self.trusted_proxies.iter().any(|net| net.contains(&ip)) {
            Some("a trusted front proxy (proxy.trusted_proxies)")
        } else if self.allowlist.iter().any(|net| net.contains(&ip)) {
            Some("allowlisted (allowlist.networks)")
        } else {
            None
        }
    }
}

/// Why a door refuses a client before hearing it (see [`Judge::refused_at_accept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Banned in the maps, where the kernel does not drop it: XDP is not attached, or the
    /// client came through a trusted front proxy (XDP sees only the proxy).
    Banned,
    /// A ban decided a moment ago, maybe not in the kernel yet.
    BanPending,
}

/// What the judge is given besides the live settings.
pub struct Parts {
    /// Where bans go; `None` judges without banning (rejections only).
    pub bans: Option<BanSender>,
    /// The ban maps, read for every client: XDP is not attached, so nothing else refuses them.
    pub enforce: Option<Arc<dyn BanCheck>>,
    /// The ban maps, read for clients behind a trusted front proxy (XDP sees only the proxy).
    pub lookup: Option<Arc<dyn BanCheck>>,
    pub metrics: Option<Arc<Metrics>>,
    /// How far back tophelos counts (`agent.report_window`).
    pub report_window: Duration,
    /// The pregreet test's passes, shared with the ban worker (which saves them with the
    /// snapshot); `None`: a fresh cache of `pregreet.pass_cache_size`.
    pub passes: Option<Arc<PassCache>>,
    /// The resolver of the DNS checks; `None`: no lookups (the DNS checks do not fire).
    pub dns: Option<Arc<Dns>>,
}

impl Default for Parts {
    fn default() -> Self {
        Parts {
            bans: None,
            enforce: None,
            lookup: None,
            metrics: None,
            report_window: Duration::from_secs(24 * 3600),
            passes: None,
            dns: None,
        }
    }
}

/// What the doors share: see the module doc.
pub struct Judge {
    live: RwLock<Arc<Live>>,
    court: Court,
    dns: Option<Arc<Dns>>,
    enforce: Option<Arc<dyn BanCheck>>,
    lookup: Option<Arc<dyn BanCheck>>,
    /// Which client networks used each HELO name lately: outlives every reload, so no count is
    /// lost when the rules change.
    memory: Arc<Memory>,
    passes: Arc<PassCache>,
    /// The bans DNS put off (see [`deferrals`]): outlive every reload too.
    deferrals: deferrals::Deferrals,
}

impl Judge {
    pub fn new(live: Live, parts: Parts) -> Arc<Self> {
        let passes = parts
            .passes
            .unwrap_or_else(|| Arc::new(PassCache::new(live.config.pregreet.pass_cache_size)));
        Arc::new(Judge {
            court: Court::new(parts.bans, parts.metrics, parts.report_window),
            live: RwLock::new(Arc::new(live)),
            dns: parts.dns,
            enforce: parts.enforce,
            lookup: parts.lookup,
            memory: Arc::default(),
            passes,
            deferrals: deferrals::Deferrals::default(),
        })
    }

    /// The settings new sessions start with.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("live config lock").clone()
    }

    /// Swaps in reloaded settings for the sessions that start from now on; the memories stay.
    pub fn replace(&self, live: Live) {
        *self.live.write().expect("live config lock") = Arc::new(live);
    }

    /// What a session under `live` is judged by.
    pub fn law<'a>(&'a self, live: &'a Live) -> Law<'a> {
        Law::new(&live.rules, &self.memory).deferring(&self.deferrals)
    }

    pub fn court(&self) -> &Court {
        &self.court
    }

    /// The resolver of the DNS checks, if any.
    pub fn dns(&self) -> Option<&Arc<Dns>> {
        self.dns.as_ref()
    }

    /// The clients that passed the pregreet test lately.
    pub fn passes(&self) -> &PassCache {
        &self.passes
    }

    /// The HELO reuse memory.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// Whether `client` is banned in the maps where the kernel does not drop it (XDP not
    /// attached; behind a trusted front proxy, XDP sees only the proxy).
    pub fn banned(&self, client: &Client) -> bool {
        let check = if client.via.is_some() { &self.lookup } else { &self.enforce };
        check.as_ref().is_some_and(|check| check.banned(client.ip, crate::clock::boot_ns()))
    }

    /// Why a door refuses `client` as it arrives (a connection, a new SMTP session), before
    /// hearing a word: what XDP would have done, as near as user space can (an allowlisted
    /// client passes, even inside a banned prefix), and a ban decided a moment ago that may
    /// not be in the kernel yet (a bot that reconnects at once would otherwise pass with a
    /// fresh HELO).
    pub fn refused_at_accept(&self, client: &Client) -> Option<Refusal> {
        if self.live().rules.allowlist.iter().any(|net| net.contains(&client.ip)) {
            return None;
        }
        if self.banned(client) {
            Some(Refusal::Banned)
        } else if self.court.ban_pending(client.ip) {
            Some(Refusal::BanPending)
        } else {
            None
        }
    }

    /// A session's verdict is a ban, decided now (see [`Court::condemn`]).
    pub fn condemn(&self, client: &Client, verdict: &Verdict, live: &Live) {
        self.court.condemn(client, verdict, &live.never_ban(), live.scope);
    }

    /// A session is over (see [`Court::conclude`]); an honest sender earns a steering pass
    /// (see [`honest`]).
    pub fn conclude(&self, record: &Record<'_>, live: &Live) {
        self.court.conclude(record, &live.never_ban(), live.scope);
        if let Some(ttl) = live.pass_ttl
            && honest(record)
        {
            self.court.grant_pass(record.client.ip, ttl);
        }
    }

    /// `tophelos` rows with the reuse memory's count of each name (over `reuse.window` up to
    /// now, whatever `--since` the rows cover) and whether that makes it reused.
    pub fn mark_reuse(&self, mut rows: Vec<HeloRow>) -> Vec<HeloRow> {
        let limits = self.live().rules.reuse;
        let now = reuse_now();
        for row in &mut rows {
            let count = self.memory.count(&row.helo, now, limits.window);
            row.networks = count.networks as u64;
            row.networks_capped = count.capped;
            row.reused = count.networks >= limits.clients;
        }
        rows
    }

    /// Every name reused now, with the limits in force (`tophelos --suggest`).
    pub fn reused(&self) -> ReuseReport {
        let limits = self.live().rules.reuse;
        ReuseReport {
            clients: limits.clients,
            window_secs: limits.window.as_secs(),
            helos: self.memory.reused(reuse_now(), limits.window, limits.clients),
        }
    }
}

/// The reuse memory's clock, in seconds, for every use and count of it: the boot clock, so a
/// count never jumps with the wall clock.
pub fn reuse_now() -> u64 {
    crate::clock::boot_ns() / 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Report;

    #[test]
    fn never_ban_names_the_right_reason() {
        let proxies = ["192.0.2.0/28".parse().unwrap()];
        let allow = ["198.51.100.128/25".parse().unwrap()];
        let own: FxHashSet<IpAddr> =
            ["192.0.2.25", "2001:db8::25"].iter().map(|a| a.parse().unwrap()).collect();
        let never = NeverBan {
            mta: "::ffff:127.0.0.1".parse().unwrap(),
            trusted_proxies: &proxies,
            allowlist: &allow,
            own: &own,
            loopback: true,
        };
        let reason = |ip: &str| never.reason(ip.parse().unwrap());
        assert_eq!(reason("127.0.0.1"), Some("the MTA's own address (proxy.upstream)"));
        let local = Some("a loopback address: a local process");
        assert_eq!(
            (reason("127.0.0.2"), reason("::1"), reason("::ffff:127.1.2.3")),
            (local, local, local)
        );
        let ours = Some("one of our own addresses (identity.addresses, identity.detect)");
        assert_eq!(
            (reason("192.0.2.25"), reason("2001:db8::25"), reason("::ffff:192.0.2.25")),
            (ours, ours, ours)
        );
        assert_eq!(
            NeverBan { loopback: false, ..never }.reason("127.0.0.2".parse().unwrap()),
            None
        );
        assert_eq!(reason("192.0.2.5"), Some("a trusted front proxy (proxy.trusted_proxies)"));
        assert_eq!(reason("198.51.100.200"), Some("allowlisted (allowlist.networks)"));
        assert_eq!(reason("203.0.113.9"), None);
    }

    /// A rule's ban covers the client's prefix, but never one that holds the MTA, one of our
    /// own addresses or a trusted front proxy (the kernel would drop them): then the client
    /// alone. An allowlisted network
    /// inside the prefix narrows nothing (the kernel passes it).
    #[test]
    fn a_rule_ban_narrows_to_the_client_when_its_prefix_holds_the_mta_us_or_a_front_proxy() {
        use crate::addr::BanScope;
        let proxies = ["2001:db8:7::5/128".parse().unwrap(), "192.0.2.5/32".parse().unwrap()];
        let allow = ["2001:db8:8::99/128".parse().unwrap()];
        let own: FxHashSet<IpAddr> = ["2001:db8:9::1".parse().unwrap()].into_iter().collect();
        let never = NeverBan {
            mta: "2001:db8:6::25".parse().unwrap(),
            trusted_proxies: &proxies,
            allowlist: &allow,
            own: &own,
            loopback: true,
        };
        let target = |ip: &str, scope| never.target(ip.parse().unwrap(), scope).to_string();
        let wide = BanScope { v4: 24, v6: 64 };
        assert_eq!(target("2001:db8:5::10", wide), "2001:db8:5::/64");
        assert_eq!(target("2001:db8:6::10", wide), "2001:db8:6::10", "the MTA's /64");
        assert_eq!(target("2001:db8:7::10", wide), "2001:db8:7::10", "a front proxy's /64");
        assert_eq!(target("2001:db8:9::10", wide), "2001:db8:9::10", "our own address's /64");
        assert_eq!(target("2001:db8:8::10", wide), "2001:db8:8::/64", "an allowlisted host inside");
        assert_eq!(target("192.0.2.77", wide), "192.0.2.77", "a front proxy's /24");
        assert_eq!(target("198.51.100.77", wide), "198.51.100.0/24");
        assert_eq!(target("198.51.100.77", BanScope::default()), "198.51.100.77");
    }

    fn judge(extra: &str) -> Arc<Judge> {
        let text = format!("[identity]\ndetect = false\n{extra}");
        let config = Config::parse(&text, std::path::Path::new("t"), &Default::default()).unwrap();
        Judge::new(Live::of(&config), Parts::default())
    }

    /// tophelos rows carry the memory's count and the mark; `--suggest` lists what is reused.
    #[test]
    fn tophelos_rows_are_marked_from_the_reuse_memory() {
        let judge = judge("[reuse]\nclients = 2\n");
        let (memory, window) = (judge.memory(), judge.live().rules.reuse.window);
        let now = reuse_now();
        for client in ["198.51.1.7", "198.51.2.7", "198.51.2.8"] {
            memory.observe("bulk.example", client.parse().unwrap(), now, window);
        }
        memory.observe("mail.example", "198.51.3.7".parse().unwrap(), now, window);
        let mut report = Report::new(Duration::from_secs(3600));
        let unix = crate::clock::unix_ns() / 1_000_000_000;
        report.record(unix, "Bulk.Example", "198.51.1.7".parse().unwrap(), None);
        report.record(unix, "mail.example", "198.51.3.7".parse().unwrap(), None);
        let rows = judge.mark_reuse(report.top(unix, Duration::from_secs(60), 10));
        let marks: Vec<(&str, u64, bool)> =
            rows.iter().map(|r| (r.helo.as_str(), r.networks, r.reused)).collect();
        assert_eq!(marks, [("bulk.example", 2, true), ("mail.example", 1, false)]);
        let report = judge.reused();
        assert_eq!((report.clients, report.window_secs), (2, 3600));
        let names: Vec<&str> = report.helos.iter().map(|r| r.helo.as_str()).collect();
        assert_eq!(names, ["bulk.example"]);
    }

    #[test]
    fn a_client_is_canonical_once() {
        let client = Client::new("::ffff:203.0.113.9".parse().unwrap(), None, false);
        assert_eq!(client.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    /// One refusal at accept for every door: the maps where the kernel cannot drop the client
    /// (behind a front proxy: the lookup; else only without XDP), then a ban just decided.
    #[test]
    fn a_client_is_refused_at_accept_by_the_maps_xdp_cannot_enforce_or_a_ban_just_decided() {
        use crate::blocklist::fake::{FakeStore, spawn_worker};
        use crate::blocklist::{Blocklist, Ttl};
        let text = "[identity]\ndetect = false\ndomains = [\"example.com\"]\n";
        let config = Config::parse(text, std::path::Path::new("t"), &Default::default()).unwrap();
        let store = Arc::new(std::sync::Mutex::new(FakeStore::default()));
        let target = crate::addr::BanTarget::host("203.0.113.9".parse().unwrap());
        Blocklist::new(store.clone()).ban(&target, Ttl::Forever, "t", 0).unwrap();
        let (bans, _worker) = spawn_worker(FakeStore::default());
        let lookup = Some(Arc::new(store) as Arc<dyn BanCheck>);
        let judge =
            Judge::new(Live::of(&config), Parts { bans: Some(bans), lookup, ..Default::default() });
        let ip = "203.0.113.9".parse().unwrap();
        let direct = Client::new(ip, None, false);
        let proxied = Client::new(ip, Some([192, 0, 2, 1].into()), false);
        assert_eq!(judge.refused_at_accept(&direct), None, "XDP drops it: nothing to do here");
        assert_eq!(judge.refused_at_accept(&proxied), Some(Refusal::Banned));
        let bot = Client::new("198.51.100.7".parse().unwrap(), None, false);
        let live = judge.live();
        let mut hearing = Hearing::new(&bot);
        hearing.hear(&judge.law(&live), "mx.example.com", None);
        assert_eq!(judge.refused_at_accept(&bot), None);
        judge.condemn(&bot, hearing.verdict().unwrap(), &live);
        assert_eq!(judge.refused_at_accept(&bot), Some(Refusal::BanPending));
    }

    /// The pass rule (see [`honest`]): a proxy session whose every HELO passed with no check
    /// doubting it, that did not pregreet, came straight and had a recipient accepted earns a
    /// steering pass through the ban worker; miss one and it earns none.
    #[test]
    fn an_honest_sender_earns_a_steering_pass_and_a_doubted_one_none() {
        use std::sync::Mutex;

        use crate::blocklist::Blocklist;
        use crate::blocklist::fake::FakeStore;
        use crate::blocklist::passes::FakePasses;
        use crate::blocklist::worker::{AdminCommand, Options, start};
        let passes = Arc::new(Mutex::new(FakePasses::default()));
        let escalation = crate::config::Escalation {
            factor: 2,
            max_ttl: Duration::from_secs(3600),
            history: 16,
        };
        let options = Options {
            steer: Some(Box::new(passes.clone())),
            ..Options::new(escalation, crate::clock::boot_ns)
        };
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        let text = "[identity]\ndetect = false\n[steer]\naddresses = [\"203.0.113.5:25\"]\n\
                    [[proxy.listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let config = Config::parse(text, std::path::Path::new("t"), &Default::default()).unwrap();
        let judge =
            Judge::new(Live::of(&config), Parts { bans: Some(bans.clone()), ..Default::default() });
        let live = judge.live();
        assert_eq!(live.pass_ttl, Some(Duration::from_secs(24 * 3600)));
        let session =
            |ip: &str, helo: &str, via: Option<IpAddr>, pregreet: Option<&str>, accepted: bool| {
                let client = Client::new(ip.parse().unwrap(), via, false);
                let mut hearing = Hearing::new(&client);
                hearing.hear(&judge.law(&live), helo, None);
                let verdict = hearing.verdict().cloned();
                let logged: Vec<&'static str> =
                    verdict.iter().flat_map(|v| v.logged.iter().map(|m| m.rule)).collect();
                let record = Record {
                    door: Door::Proxy,
                    client: &client,
                    helo: Some(helo),
                    helos: &[],
                    verdict: verdict.as_ref(),
                    logged: &logged,
                    dns: None,
                    ms: 1,
                    transport: Some(Transport {
                        bytes_in: 0,
                        bytes_out: 0,
                        spliced: false,
                        copied: 0,
                        tls: false,
                        accepted,
                        end: End::Relayed,
                        error: "",
                        pregreet,
                    }),
                };
                judge.conclude(&record, &live);
            };
        session("198.51.100.1", "mail.sender.example", None, None, true);
        session("198.51.100.2", "mail.sender.example", None, None, false);
        session(
            "198.51.100.3",
            "mail.sender.example",
            None,
            Some("4 bytes after 10 ms: EHLO"),
            true,
        );
        session("198.51.100.4", "mail.sender.example", Some([192, 0, 2, 1].into()), None, true);
        session("198.51.100.5", "198-51-100-5.dyn.isp.example", None, None, true);
        session("198.51.100.6", "localhost", None, None, true);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(bans.command(AdminCommand::Passes)).unwrap();
        let held: Vec<String> =
            passes.lock().unwrap().passes.keys().map(ToString::to_string).collect();
        assert_eq!(held, ["198.51.100.1"], "only the honest sender (the dynamic name is logged)");
        drop((judge, bans));
        worker.stop();
    }
}
