//! The pregreet test's pass cache: clients that stayed silent through the wait, each until its
//! pass expires (`pregreet.pass_ttl`; postscreen keeps a pass for `postscreen_greet_ttl`, a
//! day), so a good client pays the wait once rather than at every connection. Bounded
//! (`pregreet.pass_cache_size`, least recently seen forgotten first) and shared by every
//! session; the ban worker saves it with the ban snapshot and the agent restores it at start.
//!
//! Times are wall-clock Unix seconds, given by the caller (tests pass their own), as the
//! snapshot stores them. A pass is not extended by use: as in postscreen, a client is tested
//! again once its pass has expired.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use serde::{Deserialize, Serialize};

/// A client that stayed silent through the pregreet wait: greeted at once until `until_unix`
/// (how the ban snapshot stores a pass).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPass {
    pub client: String,
    /// Unix seconds.
    pub until_unix: u64,
}

pub struct PassCache {
    /// Client (canonical) to the Unix second its pass expires.
    passes: Mutex<LruCache<IpAddr, u64>>,
}

impl PassCache {
    pub fn new(capacity: usize) -> Self {
        PassCache { passes: Mutex::new(LruCache::new(bound(capacity))) }
    }

    /// Whether `ip` holds a pass in force at `now_unix`. An expired pass is forgotten.
    pub fn passed(&self, ip: IpAddr, now_unix: u64) -> bool {
        let ip = crate::addr::canonical(ip);
        let mut passes = self.passes.lock().expect("pass cache lock");
        match passes.get(&ip) {
            Some(&until) if until > now_unix => true,
            Some(_) => {
                passes.pop(&ip);
                false
            }
            None => false,
        }
    }

    /// `ip` stayed silent through the wait at `now_unix`: it passes for `ttl`. `capacity` is the
    /// bound in force (a reload may change it; the cache follows).
    pub fn pass(&self, ip: IpAddr, now_unix: u64, ttl: Duration, capacity: usize) {
        let until = now_unix.saturating_add(ttl.as_secs().max(1));
        let mut passes = self.passes.lock().expect("pass cache lock");
        if passes.cap() != bound(capacity) {
            passes.resize(bound(capacity));
        }
        passes.put(crate::addr::canonical(ip), until);
    }

    /// Passes held (expired ones included until they are next asked about or saved).
    pub fn len(&self) -> usize {
        self.passes.lock().expect("pass cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The passes in force at `now_unix`, least recently seen first, for the snapshot.
    pub fn saved(&self, now_unix: u64) -> Vec<SavedPass> {
        let passes = self.passes.lock().expect("pass cache lock");
        passes
            .iter()
            .rev()
            .filter(|&(_, &until)| until > now_unix)
            .map(|(ip, &until)| SavedPass { client: ip.to_string(), until_unix: until })
            .collect()
    }

    /// Puts back the saved passes still in force at `now_unix` (in their order, so the most
    /// recently seen stay longest); returns how many. Entries that do not parse are skipped.
    pub fn restore(&self, saved: &[SavedPass], now_unix: u64) -> usize {
        let mut passes = self.passes.lock().expect("pass cache lock");
        let mut restored = 0;
        for pass in saved {
            let Ok(ip) = pass.client.parse::<IpAddr>() else { continue };
            if pass.until_unix > now_unix {
                passes.put(crate::addr::canonical(ip), pass.until_unix);
                restored += 1;
            }
        }
        restored
    }
}

fn bound(capacity: usize) -> NonZeroUsize {
    NonZeroUsize::new(capacity.max(1)).expect("at least 1")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_pass_holds_for_its_ttl_and_is_not_extended_by_use() {
        let cache = PassCache::new(10);
        assert!(!cache.passed(ip("203.0.113.9"), 1000));
        cache.pass(ip("203.0.113.9"), 1000, DAY, 10);
        assert!(cache.passed(ip("203.0.113.9"), 1000 + 86_399));
        assert!(cache.passed(ip("::ffff:203.0.113.9"), 1001), "one client, however written");
        assert!(!cache.passed(ip("203.0.113.9"), 1000 + 86_400), "expired: tested again");
        assert!(cache.is_empty(), "an expired pass is forgotten when asked about");
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_least_recently_seen() {
        let cache = PassCache::new(2);
        cache.pass(ip("192.0.2.1"), 0, DAY, 2);
        cache.pass(ip("192.0.2.2"), 0, DAY, 2);
        assert!(cache.passed(ip("192.0.2.1"), 1), "seen again: now the most recent");
        cache.pass(ip("192.0.2.3"), 0, DAY, 2);
        assert_eq!(cache.len(), 2);
        assert!(!cache.passed(ip("192.0.2.2"), 1), "the least recently seen went");
        assert!(cache.passed(ip("192.0.2.1"), 1) && cache.passed(ip("192.0.2.3"), 1));
        cache.pass(ip("192.0.2.4"), 0, DAY, 1);
        assert_eq!(cache.len(), 1, "a smaller bound after a reload applies at once");
    }

    #[test]
    fn saved_passes_come_back_in_order_and_expired_ones_do_not() {
        let cache = PassCache::new(10);
        cache.pass(ip("192.0.2.1"), 100, Duration::from_secs(50), 10);
        cache.pass(ip("2001:db8::1"), 100, DAY, 10);
        cache.pass(ip("192.0.2.2"), 100, DAY, 10);
        let saved = cache.saved(120);
        let clients: Vec<&str> = saved.iter().map(|p| p.client.as_str()).collect();
        assert_eq!(clients, ["192.0.2.1", "2001:db8::1", "192.0.2.2"], "oldest first");
        assert_eq!(cache.saved(160).len(), 2, "an expired pass is not saved");

        let after = PassCache::new(2);
        let mut with_garbage = saved.clone();
        with_garbage.push(SavedPass { client: "not-an-ip".into(), until_unix: u64::MAX });
        assert_eq!(after.restore(&with_garbage, 160), 2);
        assert!(after.passed(ip("2001:db8::1"), 160) && after.passed(ip("192.0.2.2"), 160));
        assert!(!after.passed(ip("192.0.2.1"), 160), "expired while the agent was down");
    }
}
