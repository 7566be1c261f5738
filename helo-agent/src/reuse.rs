//! HELO reuse: which client networks used each HELO name lately, for the `helo_reuse` check
//! (`[reuse]`). Spamware sends one made-up name from thousands of infected hosts; an honest MTA
//! names itself. A name used by `reuse.clients` or more distinct client networks (a /24 for
//! IPv4, a /64 for IPv6: one customer, whose hosts may well share a name) within
//! `reuse.window` is reused.
//!
//! [`Tracker`] is pure: time is passed in (whole seconds on one clock; the judge uses
//! CLOCK_BOOTTIME), nothing is read or written outside it. [`Memory`] shares one tracker between
//! every session of both doors. What is counted is the judge's decision (`judge::Hearing`, with
//! `RuleSet::reuse_name`): only domain names no other rule decided, and never a client whose
//! forward-confirmed reverse DNS gives the name. Names are counted lower case, without a
//! trailing dot.
//!
//! Memory is bounded (about 15 MB at most): [`MAX_NAMES`] names, [`MAX_NETWORKS_PER_NAME`]
//! networks per name, [`MAX_NETWORKS`] networks in all. Beyond a name's cap, further networks are
//! not stored: its count stays at the cap (a lower bound, marked `capped`) until older networks
//! leave the window; `reuse.clients` is at most the cap, so a capped name is always reused.
//! Beyond the name or the total cap, the least recently used names are forgotten first (their
//! counts start again): a flood of one-off names pushes out other one-off names, while a name
//! bots keep using stays recent. The memory is not saved: a restart starts counting afresh.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use serde::{Deserialize, Serialize};

/// Names remembered at most.
pub const MAX_NAMES: usize = 50_000;
/// Networks remembered per name at most; also the largest `reuse.clients`.
pub const MAX_NETWORKS_PER_NAME: usize = 1_000;
/// Networks remembered over every name at most.
pub const MAX_NETWORKS: usize = 200_000;

/// A client network as reuse counts them: the /24 of an IPv4 address, the /64 of an IPv6 one
/// (an IPv4-mapped IPv6 address is its IPv4 address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Network {
    V4([u8; 3]),
    V6([u8; 8]),
}

impl Network {
    pub fn of(ip: IpAddr) -> Self {
        match crate::addr::canonical(ip) {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                Network::V4([a, b, c])
            }
            IpAddr::V6(v6) => Network::V6(helo_common::v6_prefix64(&v6.octets())),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::V4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Network::V6(prefix) => {
                let mut octets = [0u8; 16];
                octets[..8].copy_from_slice(prefix);
                write!(f, "{}/64", std::net::Ipv6Addr::from(octets))
            }
        }
    }
}

/// How many distinct networks used a name within the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub networks: usize,
    /// More networks used it than the per-name cap holds: `networks` is a lower bound.
    pub capped: bool,
}

/// One name used by `reuse.clients` networks or more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reused {
    pub helo: String,
    pub networks: usize,
    /// `networks` is a lower bound (the per-name cap was reached).
    pub capped: bool,
}

/// The names reused now, with the limits that made them so: the `tophelos --suggest` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReuseReport {
    /// `reuse.clients` in force.
    pub clients: usize,
    /// `reuse.window` in force, in seconds.
    pub window_secs: u64,
    /// Most networks first, ties by name.
    pub helos: Vec<Reused>,
}

/// The networks that used one name, each with when it last did. A session from a network
/// that already used the name costs a binary search, whatever the number of networks (a big
/// provider's pool name may have a thousand); the expired ones are swept at most once a second.
struct Uses {
    /// Sorted by network.
    seen: Vec<(Network, u64)>,
    /// No use in `seen` is older than this.
    oldest: u64,
    /// When a network was last turned away because `seen` was full.
    capped_at: Option<u64>,
}

impl Uses {
    fn first(network: Network, now: u64) -> Self {
        Uses { seen: vec![(network, now)], oldest: now, capped_at: None }
    }

    /// Drops the uses older than the window; returns how many went. Nothing to do (no scan)
    /// while the oldest use is within it, so at most one scan per second of `now`.
    fn expire(&mut self, now: u64, window: u64) -> usize {
        if within(self.oldest, now, window) {
            return 0;
        }
        let before = self.seen.len();
        self.seen.retain(|(_, at)| within(*at, now, window));
        self.oldest = self.seen.iter().map(|(_, at)| *at).min().unwrap_or(now);
        before - self.seen.len()
    }

    fn count(&self, now: u64, window: u64) -> Count {
        Count {
            networks: self.seen.iter().filter(|(_, at)| within(*at, now, window)).count(),
            capped: self.capped(now, window),
        }
    }

    /// Whether a network was turned away within the window.
    fn capped(&self, now: u64, window: u64) -> bool {
        self.capped_at.is_some_and(|at| within(at, now, window))
    }
}

/// Whether a use at `at` is within the `window` seconds before `now`.
fn within(at: u64, now: u64, window: u64) -> bool {
    now.saturating_sub(at) < window
}

/// The bounds of a [`Tracker`]: the constants above, smaller in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub names: usize,
    pub networks_per_name: usize,
    pub networks: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps { names: MAX_NAMES, networks_per_name: MAX_NETWORKS_PER_NAME, networks: MAX_NETWORKS }
    }
}

/// Which networks used each name, bounded (see the module documentation).
pub struct Tracker {
    /// Unbounded as a cache: the caps are kept by hand, since two of them count networks.
    names: LruCache<String, Uses>,
    /// Networks held over every name (expired ones included until their name is next used).
    networks: usize,
    caps: Caps,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::with_caps(Caps::default())
    }
}

impl Tracker {
    pub fn with_caps(caps: Caps) -> Self {
        Tracker { names: LruCache::unbounded(), networks: 0, caps }
    }

    /// `client` used `name` at `now`: remembered. The distinct networks that used the name
    /// within the `window` before `now`, this client's included.
    pub fn observe(&mut self, name: &str, client: IpAddr, now: u64, window: Duration) -> Count {
        let window = window.as_secs().max(1);
        let network = Network::of(client);
        let name = lower(name);
        let count = match self.names.get_mut(name.as_ref()) {
            Some(uses) => {
                self.networks -= uses.expire(now, window);
                match uses.seen.binary_search_by_key(&network, |(n, _)| *n) {
                    Ok(at) => uses.seen[at].1 = now,
                    Err(at) if uses.seen.len() < self.caps.networks_per_name => {
                        uses.seen.insert(at, (network, now));
                        uses.oldest = uses.oldest.min(now);
                        self.networks += 1;
                    }
                    Err(_) => uses.capped_at = Some(now),
                }
                // Every use left is within the window.
                Count { networks: uses.seen.len(), capped: uses.capped(now, window) }
            }
            None => {
                let uses = Uses::first(network, now);
                self.names.push(name.into_owned(), uses);
                self.networks += 1;
                Count { networks: 1, capped: false }
            }
        };
        // The name just used is the most recent: it is never the one forgotten.
        while self.names.len() > self.caps.names || self.networks > self.caps.networks {
            let Some((_, forgotten)) = self.names.pop_lru() else { break };
            self.networks -= forgotten.seen.len();
        }
        count
    }

    /// The count for `name` at `now`, recording nothing.
    pub fn count(&self, name: &str, now: u64, window: Duration) -> Count {
        let window = window.as_secs().max(1);
        self.names
            .peek(lower(name).as_ref())
            .map(|uses| uses.count(now, window))
            .unwrap_or_default()
    }

    /// Every name used by `clients` networks or more within the `window` before `now`, most
    /// networks first, ties by name.
    pub fn reused(&self, now: u64, window: Duration, clients: usize) -> Vec<Reused> {
        let window = window.as_secs().max(1);
        let mut reused: Vec<Reused> = self
            .names
            .iter()
            .filter_map(|(name, uses)| {
                let count = uses.count(now, window);
                (count.networks >= clients).then(|| Reused {
                    helo: name.clone(),
                    networks: count.networks,
                    capped: count.capped,
                })
            })
            .collect();
        reused.sort_by(|a, b| b.networks.cmp(&a.networks).then_with(|| a.helo.cmp(&b.helo)));
        reused
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Networks held over every name.
    pub fn networks(&self) -> usize {
        self.networks
    }
}

/// The name as the memory keys it: lower case, without a trailing dot, as `rules::helo::parse`
/// gives it to the judge. `tophelos` asks for its rows' names as the client sent them
/// (`bot.example.` included), and must find the count the judge kept under `bot.example`.
fn lower(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// One [`Tracker`] shared by every session of both doors.
#[derive(Default)]
pub struct Memory(Mutex<Tracker>);

impl Memory {
    /// See [`Tracker::observe`].
    pub fn observe(&self, name: &str, client: IpAddr, now: u64, window: Duration) -> Count {
        self.lock().observe(name, client, now, window)
    }

    /// See [`Tracker::count`].
    pub fn count(&self, name: &str, now: u64, window: Duration) -> Count {
        self.lock().count(name, now, window)
    }

    /// See [`Tracker::reused`].
    pub fn reused(&self, now: u64, window: Duration, clients: usize) -> Vec<Reused> {
        self.lock().reused(now, window, clients)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.0.lock().expect("reuse memory lock")
    }
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.try_lock() {
            Ok(tracker) => write!(f, "Memory {{ names: {} }}", tracker.len()),
            Err(_) => f.write_str("Memory { .. }"),
        }
    }
}

/// `helo-agent tophelos --suggest`: qmail badhelo lines for the reused names, anchored and
/// escaped, under a header that says they are suggestions to review. Nothing applies them.
pub fn suggest_badhelo(report: &ReuseReport) -> String {
    let window = crate::duration::format(Duration::from_secs(report.window_secs));
    let mut out = format!(
        "# helo-agent tophelos --suggest: HELO names used by {} or more client networks (/24, /64) \
         in the last {window}\n\
         # (reuse.clients, reuse.window), by clients whose reverse DNS did not confirm the name.\n\
         # SUGGESTIONS TO REVIEW, never applied by the agent: a provider's outbound pool may share\n\
         # one name honestly. A badhelo line rejects every client that sends the name, also the\n\
         # ones whose reverse DNS confirms it (helo_reuse spares them; badhelo runs first).\n\
         # Keep the lines you agree with in rules.badhelo_file (or rules.regexes), then\n\
         # `helo-agent reload`.\n",
        report.clients
    );
    if report.helos.is_empty() {
        out.push_str("# (no name is reused now)\n");
    }
    for reused in &report.helos {
        let plus = if reused.capped { "+" } else { "" };
        out.push_str(&format!("# {}{plus} networks\n", reused.networks));
        // `\.?`: the memory holds the name without a trailing dot, but a bot may send it with
        // one (`EHLO bot.example.`), and a badhelo line sees the HELO as sent.
        out.push_str(&format!("^{}\\.?$\n", escape_ere(&reused.helo)));
    }
    out
}

/// `text` as a POSIX extended regular expression that matches it literally.
pub fn escape_ere(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(
            c,
            '.' | '[' | ']' | '\\' | '(' | ')' | '*' | '+' | '?' | '{' | '}' | '|' | '^' | '$'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The `n`th IPv4 /24 (198.51.n.x), or a host in it.
    fn v4(n: u32, host: u8) -> IpAddr {
        let n = n as u8;
        IpAddr::from([198, 51, n, host])
    }

    #[test]
    fn networks_are_ipv4_24s_and_ipv6_64s() {
        let mut t = Tracker::default();
        let seen = |t: &mut Tracker, client: &str| t.observe("bot.example", ip(client), 100, HOUR);
        assert_eq!(seen(&mut t, "198.51.100.1").networks, 1);
        assert_eq!(seen(&mut t, "198.51.100.254").networks, 1, "the same /24");
        assert_eq!(seen(&mut t, "::ffff:198.51.100.7").networks, 1, "IPv4-mapped: the same /24");
        assert_eq!(seen(&mut t, "198.51.101.1").networks, 2, "the next /24");
        assert_eq!(seen(&mut t, "2001:db8:1:2::1").networks, 3);
        assert_eq!(seen(&mut t, "2001:db8:1:2:ffff::9").networks, 3, "the same /64");
        assert_eq!(seen(&mut t, "2001:db8:1:3::1").networks, 4, "the next /64");
        assert_eq!(Network::of(ip("198.51.100.9")).to_string(), "198.51.100.0/24");
        assert_eq!(Network::of(ip("2001:db8:1:2::9")).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn names_are_counted_lower_case_and_apart() {
        let mut t = Tracker::default();
        t.observe("Bot.Example", v4(1, 1), 100, HOUR);
        assert_eq!(t.observe("bot.example", v4(2, 1), 100, HOUR).networks, 2);
        assert_eq!(t.observe("other.example", v4(3, 1), 100, HOUR).networks, 1);
        assert_eq!(t.count("BOT.EXAMPLE", 100, HOUR).networks, 2);
        assert_eq!(t.count("never.example", 100, HOUR), Count::default());
    }

    /// The judge counts the name `rules::helo::parse` gives (`bot.example` for `EHLO
    /// Bot.Example.`), while `tophelos` asks for its rows as the client sent them: a row of
    /// `bot.example.` must show the name's count and mark, not 0.
    /// The count skips its scan while the oldest use is in the window, and looks networks up
    /// by binary search: against a plain model (every network's last use, counted over the
    /// window), 20000 uses of one name from 300 networks, the clock moving 0 to 3 seconds at
    /// a time over a 60 s window, give the same count every time.
    #[test]
    fn the_count_is_exact_as_uses_come_and_expire() {
        let mut tracker = Tracker::default();
        let mut model = std::collections::HashMap::<Network, u64>::new();
        let window = Duration::from_secs(60);
        let (mut now, mut seed) = (1_000u64, 7u64);
        for _ in 0..20_000 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            now += (seed >> 62) % 4;
            let client = IpAddr::from(std::net::Ipv4Addr::from(
                0x0a00_0000 + (((seed >> 20) % 300) as u32) * 256,
            ));
            model.insert(Network::of(client), now);
            let expected = model.values().filter(|at| now - **at < 60).count();
            let count = tracker.observe("pool.example.net", client, now, window);
            assert_eq!(count.networks, expected, "at {now}");
            assert_eq!(tracker.count("pool.example.net", now, window).networks, expected);
        }
        assert_eq!(
            tracker.networks,
            tracker.names.iter().map(|(_, u)| u.seen.len()).sum::<usize>()
        );
    }

    #[test]
    fn a_trailing_dot_is_the_same_name() {
        let mut t = Tracker::default();
        t.observe("bot.example", v4(1, 1), 100, HOUR);
        t.observe("bot.example", v4(2, 1), 100, HOUR);
        assert_eq!(t.count("bot.example.", 100, HOUR).networks, 2, "as tophelos asks");
        assert_eq!(t.count("BOT.example.", 100, HOUR).networks, 2);
        assert_eq!(t.observe("Bot.Example.", v4(3, 1), 100, HOUR).networks, 3, "one name");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn uses_older_than_the_window_are_not_counted() {
        let mut t = Tracker::default();
        t.observe("bot.example", v4(1, 1), 1_000, HOUR);
        t.observe("bot.example", v4(2, 1), 2_000, HOUR);
        assert_eq!(t.count("bot.example", 4_599, HOUR).networks, 2, "both within the hour");
        assert_eq!(t.count("bot.example", 4_600, HOUR).networks, 1, "the first is an hour old");
        assert_eq!(t.observe("bot.example", v4(3, 1), 4_600, HOUR).networks, 2);
        assert_eq!(t.networks(), 2, "the expired network was dropped when the name was used");
        // A use refreshes its network: it counts for another whole window.
        t.observe("bot.example", v4(2, 7), 5_000, HOUR);
        assert_eq!(t.count("bot.example", 8_500, HOUR).networks, 1);
        assert_eq!(t.count("bot.example", 8_600, HOUR).networks, 0);
        // The window is the one given: a reload may change it.
        assert_eq!(t.count("bot.example", 8_600, 2 * HOUR).networks, 2);
    }

    /// Small caps, so the tests reach them quickly; the defaults are the constants.
    const CAPS: Caps = Caps { names: 50, networks_per_name: 10, networks: 100 };

    #[test]
    fn a_name_holds_at_most_its_cap_of_networks_and_says_so() {
        assert_eq!(
            (Caps::default().names, Caps::default().networks_per_name, Caps::default().networks),
            (MAX_NAMES, MAX_NETWORKS_PER_NAME, MAX_NETWORKS)
        );
        let mut t = Tracker::with_caps(CAPS);
        let mut last = Count::default();
        for n in 0..CAPS.networks_per_name as u32 + 5 {
            last = t.observe("bot.example", v4(n, 1), 100, HOUR);
        }
        assert_eq!(last, Count { networks: CAPS.networks_per_name, capped: true });
        assert_eq!(t.networks(), CAPS.networks_per_name);
        let reused = t.reused(100, HOUR, CAPS.networks_per_name);
        assert_eq!(reused.len(), 1, "capped at reuse.clients' largest value: still reused");
        assert!(reused[0].capped);
        // Once the old networks leave the window, new ones are counted again.
        assert_eq!(
            t.observe("bot.example", v4(1, 1), 100 + 3600, HOUR),
            Count { networks: 1, capped: false }
        );
    }

    #[test]
    fn beyond_the_name_cap_the_least_recently_used_name_goes() {
        let mut t = Tracker::with_caps(CAPS);
        t.observe("kept.example", v4(1, 1), 100, HOUR);
        t.observe("kept.example", v4(2, 1), 100, HOUR);
        for i in 0..CAPS.names {
            if i == CAPS.names / 2 {
                // Bots keep using it: it stays recent.
                t.observe("kept.example", v4(3, 1), 101, HOUR);
            }
            t.observe(&format!("once{i}.example"), v4(9, 1), 101, HOUR);
        }
        assert_eq!(t.len(), CAPS.names);
        assert_eq!(t.count("kept.example", 101, HOUR).networks, 3, "recently used: kept");
        assert_eq!(t.count("once0.example", 101, HOUR).networks, 0, "the oldest: forgotten");
        assert_eq!(t.count(&format!("once{}.example", CAPS.names - 1), 101, HOUR).networks, 1);
    }

    #[test]
    fn the_networks_over_every_name_are_capped_too() {
        let mut t = Tracker::with_caps(CAPS);
        let names = CAPS.networks / CAPS.networks_per_name + 3;
        for name in 0..names {
            for n in 0..CAPS.networks_per_name as u32 {
                t.observe(&format!("bot{name}.example"), v4(n, 1), 100, HOUR);
            }
        }
        assert!(names < CAPS.names, "the name cap is not what bounds this");
        assert!(t.networks() <= CAPS.networks, "{}", t.networks());
        assert_eq!(t.count("bot0.example", 100, HOUR).networks, 0, "the least recent forgotten");
        let last = format!("bot{}.example", names - 1);
        assert_eq!(t.count(&last, 100, HOUR).networks, CAPS.networks_per_name);
    }

    #[test]
    fn reused_lists_names_at_the_threshold_most_networks_first() {
        let mut t = Tracker::default();
        for n in 0..25 {
            t.observe("big.example", v4(n, 1), 100, HOUR);
        }
        for n in 0..20 {
            t.observe("edge.example", v4(n, 1), 100, HOUR);
            t.observe("also.example", v4(n, 1), 100, HOUR);
        }
        for n in 0..19 {
            t.observe("below.example", v4(n, 1), 100, HOUR);
        }
        let names: Vec<(String, usize)> =
            t.reused(100, HOUR, 20).into_iter().map(|r| (r.helo, r.networks)).collect();
        assert_eq!(
            names,
            [("big.example".into(), 25), ("also.example".into(), 20), ("edge.example".into(), 20)]
        );
        assert!(t.reused(100 + 3600, HOUR, 20).is_empty(), "the window is over");
    }

    #[test]
    fn suggestions_are_anchored_escaped_badhelo_lines_under_a_review_header() {
        let report = ReuseReport {
            clients: 20,
            window_secs: 3600,
            helos: vec![
                Reused { helo: "bot.example.com".into(), networks: 1000, capped: true },
                Reused { helo: "friend".into(), networks: 23, capped: false },
            ],
        };
        let text = suggest_badhelo(&report);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, [r"^bot\.example\.com\.?$", r"^friend\.?$"]);
        assert!(text.contains("used by 20 or more client networks (/24, /64) in the last 1h"));
        assert!(text.contains("SUGGESTIONS TO REVIEW, never applied"), "{text}");
        // The guard that spares a forward-confirmed client does not protect it from a line.
        assert!(text.contains("also the\n# ones whose reverse DNS confirms it"), "{text}");
        assert!(text.contains("# 1000+ networks\n^bot"), "{text}");
        // The lines load as a qmail badhelo file and match the name, and only the name.
        let rules = crate::config::import::badhelo(&text, "suggested");
        assert_eq!(rules.len(), 2, "the header is comments");
        let set = crate::rules::badhelo::BadheloSet::new(rules).expect("the lines compile");
        assert!(set.first_match("BOT.example.com").is_some(), "case-insensitive, as qmail");
        // The memory counts `EHLO bot.example.com.` as bot.example.com: the line the admin is
        // offered must catch the bots that send it with the trailing dot too.
        assert!(set.first_match("bot.example.com.").is_some(), "with a trailing dot");
        assert!(set.first_match("friend.").is_some(), "with a trailing dot");
        assert!(set.first_match("bot.example.com..").is_none(), "one dot at most");
        assert!(set.first_match("botxexample.com").is_none(), "the dots are literal");
        assert!(set.first_match("a.bot.example.com").is_none(), "anchored");
        assert!(set.first_match("friendly").is_none(), "anchored");
        let none = suggest_badhelo(&ReuseReport { helos: vec![], ..report });
        assert!(none.ends_with("# (no name is reused now)\n"), "{none}");
        assert_eq!(escape_ere(r"a.b*c[d]$\"), r"a\.b\*c\[d\]\$\\");
    }
}
