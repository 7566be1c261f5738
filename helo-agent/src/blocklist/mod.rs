//! Bans: what goes into the kernel's ban maps, for how long, and why.
//!
//! The logic (TTL to expiry instant, reason texts, listing with remaining time, skipping and
//! purging expired entries) lives here and is written against [`BanStore`], so it is tested
//! against [`fake::FakeStore`]. The real store over the pinned BPF maps is in `crate::ebpf`.
//! Time is passed in (CLOCK_BOOTTIME ns, see `crate::clock`), never read here.

pub mod fake;
pub mod offenders;
pub mod passes;
pub mod snapshot;
pub mod worker;

use std::time::Duration;

use helo_common::{BanValue, NEVER_EXPIRES, REASON_TEXT_LEN};
use serde::{Deserialize, Serialize};

use crate::addr::BanTarget;

/// Where bans live. Implemented over the pinned BPF maps and by an in-memory fake.
pub trait BanStore {
    fn get(&self, target: &BanTarget) -> Result<Option<BanValue>, StoreError>;
    fn put(&mut self, target: &BanTarget, value: &BanValue) -> Result<(), StoreError>;
    /// Removes a ban; `Ok(false)` when there was none.
    fn remove(&mut self, target: &BanTarget) -> Result<bool, StoreError>;
    fn entries(&self) -> Result<Vec<(BanTarget, BanValue)>, StoreError>;
    fn reason(&self, code: u32) -> Result<Option<[u8; REASON_TEXT_LEN]>, StoreError>;
    fn put_reason(&mut self, code: u32, text: &[u8; REASON_TEXT_LEN]) -> Result<(), StoreError>;
    /// The capacity of each ban map, by [`BanTarget::map`]'s names (none: unbounded).
    fn capacities(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }
    /// The lengths of the IPv4 (`v6` false) or IPv6 prefix bans the store may hold besides
    /// hosts and /64s: the kernel programs probe these. By default every length a ban may
    /// have.
    fn prefix_lengths(&self, v6: bool) -> Vec<u8> {
        match v6 {
            false => crate::addr::V4_LENS.filter(|len| *len != 32).collect(),
            true => crate::addr::V6_LENS.filter(|len| ![64, 128].contains(len)).collect(),
        }
    }
    /// Stops probing prefix lengths of which no ban is left: `used` are the (IPv6, length)
    /// pairs the prefix bans in force have.
    fn keep_lengths(&mut self, _used: &[(bool, u8)]) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ban map {map}: {operation} failed: {source}")]
    Map {
        map: &'static str,
        operation: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("ban map {map} is full ({capacity} entries)")]
    Full { map: &'static str, capacity: usize },
    #[error(
        "the pinned maps hold no prefix bans other than /64 yet (they were made by an older \
         version): start the agent once to add them, or ban a host or a /64"
    )]
    NoPrefixMaps,
    #[error(
        "a /{len} ban would be a {family} prefix length more to look up for every packet, and \
         these are in use already: {in_use}; ban at one of them, or lift the bans of one"
    )]
    Lengths { family: &'static str, len: u8, in_use: String },
}

/// Whether an address is banned now, for enforcing bans in user space when XDP cannot be
/// attached: a ban of the host, of its IPv6 /64 or of a prefix of a length in use counts, as
/// in the kernel.
pub trait BanCheck: Send + Sync {
    fn banned(&self, ip: std::net::IpAddr, now_ns: u64) -> bool;
}

impl<S: BanStore + Send + Sync> BanCheck for S {
    fn banned(&self, ip: std::net::IpAddr, now_ns: u64) -> bool {
        let active = |target: BanTarget| {
            self.get(&target).ok().flatten().is_some_and(|ban| ban.active_at(now_ns))
        };
        let host = BanTarget::host(ip);
        let prefix = BanTarget::prefix(ip);
        if active(host) || (prefix != host && active(prefix)) {
            return true;
        }
        let v6 = crate::addr::canonical(ip).is_ipv6();
        self.prefix_lengths(v6).into_iter().any(|len| active(BanTarget::of(ip, len)))
    }
}

/// The longest finite ban: 3650 days, about ten years. Bans expire on the kernel's 64-bit
/// nanosecond boot clock, which ends 584 years after boot; a longer TTL used to saturate there
/// and become a ban that never ends while `ban` printed its length. `forever` says that openly.
pub const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);

/// How long a ban lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    For(Duration),
    Forever,
}

/// One ban as `list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanEntry {
    pub target: String,
    /// Seconds left, rounded up; `None` for a ban that never expires.
    pub remaining_secs: Option<u64>,
    pub reason: String,
    /// Packets the kernel dropped because of this ban (approximate under contention).
    pub hits: u64,
    /// The gateway that made the ban, when another gateway of the fleet did; `None`: this one
    /// (or the fleet is off, or the listing came from the maps with no agent running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

pub struct Blocklist<S> {
    store: S,
}

impl<S: BanStore> Blocklist<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Bans `target` for `ttl` from `now_ns`. Re-banning replaces the expiry and the reason and
    /// keeps the hit count.
    pub fn ban(
        &mut self,
        target: &BanTarget,
        ttl: Ttl,
        reason: &str,
        now_ns: u64,
    ) -> Result<BanValue, StoreError> {
        let text = reason_text(reason);
        let code = helo_common::reason_code(trim_nul(&text));
        if code != 0 && self.store.reason(code)?.is_none() {
            // The reasons table only makes listings readable: a full table must not stop a ban.
            if let Err(error) = self.store.put_reason(code, &text) {
                tracing::warn!(%error, reason, "ban reason text not stored; list shows its code");
            }
        }
        let expires_ns = match ttl {
            Ttl::For(ttl) => crate::clock::after(now_ns, ttl),
            Ttl::Forever => NEVER_EXPIRES,
        };
        let hits = self.store.get(target)?.map_or(0, |old| old.hits);
        let value = BanValue { hits, ..BanValue::new(expires_ns, code) };
        self.store.put(target, &value)?;
        Ok(value)
    }

    /// Writes a ban with a given expiry, reason and hit count (a restore, a fleet's ban); the
    /// value written. `known` remembers reason codes already stored, sparing a lookup per ban.
    pub fn put_ban(
        &mut self,
        target: &BanTarget,
        expires_ns: u64,
        reason: &str,
        hits: u64,
        known: &mut std::collections::HashSet<u32>,
    ) -> Result<BanValue, StoreError> {
        let text = reason_text(reason);
        let code = helo_common::reason_code(trim_nul(&text));
        if code != 0
            && known.insert(code)
            && self.store.reason(code)?.is_none()
            && let Err(error) = self.store.put_reason(code, &text)
        {
            tracing::warn!(%error, reason, "ban reason text not stored; list shows its code");
        }
        let value = BanValue { hits, ..BanValue::new(expires_ns, code) };
        self.store.put(target, &value)?;
        Ok(value)
    }

    /// Stops the kernel probing prefix lengths no ban in `entries` (the bans in force, as
    /// listed) has.
    pub fn keep_lengths(&mut self, entries: &[(BanTarget, BanValue)]) -> Result<(), StoreError> {
        let mut used: Vec<(bool, u8)> = entries
            .iter()
            .filter_map(|(target, _)| match target {
                BanTarget::V4Net(_, len) => Some((false, *len)),
                BanTarget::V6Net(_, len) => Some((true, *len)),
                _ => None,
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        self.store.keep_lengths(&used)
    }

    /// Lifts a ban. `Ok(false)` when `target` was not banned.
    pub fn unban(&mut self, target: &BanTarget) -> Result<bool, StoreError> {
        self.store.remove(target)
    }

    /// Bans in force at `now_ns`, by address (IPv4 first, numerically; see [`BanTarget`]'s
    /// order). Expired entries are left out (the kernel removes them when their source comes
    /// back; [`Self::remove_expired`] sweeps).
    pub fn list(&self, now_ns: u64) -> Result<Vec<BanEntry>, StoreError> {
        let mut live: Vec<(BanTarget, BanValue)> =
            self.store.entries()?.into_iter().filter(|(_, v)| v.active_at(now_ns)).collect();
        live.sort_by_key(|(target, _)| *target);
        live.into_iter()
            .map(|(target, value)| {
                let remaining_secs = (value.expires_ns != NEVER_EXPIRES)
                    .then(|| (value.expires_ns - now_ns).div_ceil(1_000_000_000));
                Ok(BanEntry {
                    target: target.to_string(),
                    remaining_secs,
                    reason: self.reason_of(value.reason)?,
                    hits: value.hits,
                    origin: None,
                })
            })
            .collect()
    }

    /// Removes those of `entries` (as the store listed them) expired at `now_ns`; returns how
    /// many. The caller lists the entries, so one walk of the maps also serves its counting.
    pub fn remove_expired(
        &mut self,
        entries: &[(BanTarget, BanValue)],
        now_ns: u64,
    ) -> Result<usize, StoreError> {
        let mut purged = 0;
        for (target, value) in entries {
            if !value.active_at(now_ns) && self.store.remove(target)? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    pub fn reason_of(&self, code: u32) -> Result<String, StoreError> {
        if code == 0 {
            return Ok(String::new());
        }
        Ok(match self.store.reason(code)? {
            Some(text) => String::from_utf8_lossy(trim_nul(&text)).into_owned(),
            None => format!("#{code:08x}"),
        })
    }
}

/// `reason` as stored: UTF-8, cut at a char boundary to fit, NUL padded.
fn reason_text(reason: &str) -> [u8; REASON_TEXT_LEN] {
    let reason = reason.trim();
    let mut end = reason.len().min(REASON_TEXT_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut text = [0u8; REASON_TEXT_LEN];
    text[..end].copy_from_slice(&reason.as_bytes()[..end]);
    text
}

fn trim_nul(text: &[u8]) -> &[u8] {
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    &text[..end]
}

/// A shared store, so a test (or the agent's CLI side) can look while the worker writes.
impl<S: BanStore> BanStore for std::sync::Arc<std::sync::Mutex<S>> {
    fn get(&self, t: &BanTarget) -> Result<Option<helo_common::BanValue>, StoreError> {
        self.lock().expect("store lock").get(t)
    }
    fn put(&mut self, t: &BanTarget, v: &helo_common::BanValue) -> Result<(), StoreError> {
        self.lock().expect("store lock").put(t, v)
    }
    fn remove(&mut self, t: &BanTarget) -> Result<bool, StoreError> {
        self.lock().expect("store lock").remove(t)
    }
    fn entries(&self) -> Result<Vec<(BanTarget, helo_common::BanValue)>, StoreError> {
        self.lock().expect("store lock").entries()
    }
    fn reason(&self, code: u32) -> Result<Option<[u8; helo_common::REASON_TEXT_LEN]>, StoreError> {
        self.lock().expect("store lock").reason(code)
    }
    fn put_reason(
        &mut self,
        code: u32,
        text: &[u8; helo_common::REASON_TEXT_LEN],
    ) -> Result<(), StoreError> {
        self.lock().expect("store lock").put_reason(code, text)
    }
    fn capacities(&self) -> Vec<(&'static str, usize)> {
        self.lock().expect("store lock").capacities()
    }
    fn prefix_lengths(&self, v6: bool) -> Vec<u8> {
        self.lock().expect("store lock").prefix_lengths(v6)
    }
    fn keep_lengths(&mut self, used: &[(bool, u8)]) -> Result<(), StoreError> {
        self.lock().expect("store lock").keep_lengths(used)
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeStore;
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn target(s: &str) -> BanTarget {
        s.parse().unwrap()
    }

    #[test]
    fn a_ban_holds_until_its_ttl_and_not_after() {
        let mut list = Blocklist::new(FakeStore::default());
        let t = target("192.0.2.7");
        list.ban(&t, Ttl::For(Duration::from_secs(3)), "manual", 100 * SEC).unwrap();
        let banned = |ip: &str, now| list.store().banned(ip.parse().unwrap(), now);
        assert!(banned("192.0.2.7", 100 * SEC));
        assert!(banned("192.0.2.7", 103 * SEC - 1));
        assert!(!banned("192.0.2.7", 103 * SEC));
        assert!(!banned("192.0.2.8", 100 * SEC));
    }

    #[test]
    fn list_shows_remaining_reason_and_hits_and_skips_expired() {
        let mut list = Blocklist::new(FakeStore::default());
        list.ban(&target("192.0.2.7"), Ttl::For(Duration::from_secs(60)), "forged helo", 0)
            .unwrap();
        list.ban(&target("2001:db8::/64"), Ttl::Forever, "", 0).unwrap();
        list.ban(&target("192.0.2.9"), Ttl::For(Duration::from_secs(1)), "short", 0).unwrap();
        let entries = list.list(10 * SEC + 1).unwrap();
        assert_eq!(
            entries,
            vec![
                BanEntry {
                    target: "192.0.2.7".into(),
                    remaining_secs: Some(50),
                    reason: "forged helo".into(),
                    hits: 0,
                    origin: None,
                },
                BanEntry {
                    target: "2001:db8::/64".into(),
                    remaining_secs: None,
                    reason: String::new(),
                    hits: 0,
                    origin: None,
                },
            ]
        );
    }

    /// `list` sorted addresses as text: 10.0.0.10 before 10.0.0.9, IPv6 between IPv4s.
    #[test]
    fn list_sorts_by_address_numerically_not_as_text() {
        let mut list = Blocklist::new(UnorderedStore(FakeStore::default()));
        for addr in
            ["2001:db8::a", "10.0.0.10", "2001:db8::/64", "3.3.3.3", "10.0.0.9", "2001:db8::9"]
        {
            list.ban(&target(addr), Ttl::For(Duration::from_secs(60)), "", 0).unwrap();
        }
        let listed: Vec<String> = list.list(0).unwrap().into_iter().map(|e| e.target).collect();
        assert_eq!(
            listed,
            ["3.3.3.3", "10.0.0.9", "10.0.0.10", "2001:db8::/64", "2001:db8::9", "2001:db8::a"]
        );
    }

    /// The fake, handing out its entries in reverse text order, as a hash map may.
    struct UnorderedStore(FakeStore);

    impl BanStore for UnorderedStore {
        fn get(&self, t: &BanTarget) -> Result<Option<BanValue>, StoreError> {
            self.0.get(t)
        }
        fn put(&mut self, t: &BanTarget, v: &BanValue) -> Result<(), StoreError> {
            self.0.put(t, v)
        }
        fn remove(&mut self, t: &BanTarget) -> Result<bool, StoreError> {
            self.0.remove(t)
        }
        fn entries(&self) -> Result<Vec<(BanTarget, BanValue)>, StoreError> {
            let mut all = self.0.entries()?;
            all.sort_by_key(|(t, _)| std::cmp::Reverse(t.to_string()));
            Ok(all)
        }
        fn reason(&self, code: u32) -> Result<Option<[u8; REASON_TEXT_LEN]>, StoreError> {
            self.0.reason(code)
        }
        fn put_reason(
            &mut self,
            code: u32,
            text: &[u8; REASON_TEXT_LEN],
        ) -> Result<(), StoreError> {
            self.0.put_reason(code, text)
        }
    }

    /// `ban --ttl 99999w` printed 699993d but listed as forever: the expiry saturated. The CLI
    /// now refuses TTLs over MAX_TTL; one of MAX_TTL lists as what it is, even after a long
    /// uptime.
    #[test]
    fn the_longest_ban_lists_as_its_length_not_as_forever() {
        let mut list = Blocklist::new(FakeStore::default());
        let uptime = 100 * 365 * 86_400 * SEC;
        let value = list.ban(&target("192.0.2.1"), Ttl::For(MAX_TTL), "", uptime).unwrap();
        assert_ne!(value.expires_ns, NEVER_EXPIRES);
        assert_eq!(list.list(uptime).unwrap()[0].remaining_secs, Some(MAX_TTL.as_secs()));
    }

    #[test]
    fn reban_replaces_expiry_and_reason_but_keeps_hits() {
        let mut list = Blocklist::new(FakeStore::default());
        let t = target("192.0.2.7");
        list.ban(&t, Ttl::For(Duration::from_secs(5)), "first", 0).unwrap();
        list.store.bump_hits(&t, 7);
        let value = list.ban(&t, Ttl::For(Duration::from_secs(50)), "second", 0).unwrap();
        assert_eq!(value.hits, 7);
        assert_eq!(value.expires_ns, 50 * SEC);
        assert_eq!(list.list(0).unwrap()[0].reason, "second");
    }

    #[test]
    fn unban_reports_whether_there_was_a_ban() {
        let mut list = Blocklist::new(FakeStore::default());
        let t = target("2001:db8::1");
        assert!(!list.unban(&t).unwrap());
        list.ban(&t, Ttl::Forever, "x", 0).unwrap();
        assert!(list.unban(&t).unwrap());
        assert!(!list.store().banned("2001:db8::1".parse().unwrap(), 0));
    }

    #[test]
    fn purge_removes_only_expired() {
        let mut list = Blocklist::new(FakeStore::default());
        list.ban(&target("192.0.2.1"), Ttl::For(Duration::from_secs(1)), "", 0).unwrap();
        list.ban(&target("192.0.2.2"), Ttl::For(Duration::from_secs(100)), "", 0).unwrap();
        let entries = list.store().entries().unwrap();
        assert_eq!(list.remove_expired(&entries, 2 * SEC).unwrap(), 1);
        assert_eq!(list.store().len(), 1);
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let mut list = Blocklist::new(FakeStore::default());
        let long = "é".repeat(40); // 80 bytes
        list.ban(&target("192.0.2.1"), Ttl::Forever, &long, 0).unwrap();
        let shown = &list.list(0).unwrap()[0].reason;
        assert_eq!(shown, &"é".repeat(32));
    }

    #[test]
    fn a_full_reason_table_does_not_stop_a_ban() {
        let mut list = Blocklist::new(FakeStore::with_reason_capacity(0));
        list.ban(&target("192.0.2.1"), Ttl::Forever, "why", 0).unwrap();
        let entry = &list.list(0).unwrap()[0];
        assert_eq!(entry.reason, format!("#{:08x}", helo_common::reason_code(b"why")));
    }

    #[test]
    fn ban_check_sees_host_and_prefix_bans_in_force() {
        let mut list = Blocklist::new(FakeStore::default());
        list.ban(&target("192.0.2.7"), Ttl::For(Duration::from_secs(10)), "", 0).unwrap();
        list.ban(&target("2001:db8:1:2::/64"), Ttl::Forever, "", 0).unwrap();
        let store = list.store();
        assert!(store.banned("192.0.2.7".parse().unwrap(), SEC));
        assert!(store.banned("::ffff:192.0.2.7".parse().unwrap(), SEC));
        assert!(!store.banned("192.0.2.7".parse().unwrap(), 10 * SEC), "expired");
        assert!(!store.banned("192.0.2.8".parse().unwrap(), SEC));
        assert!(store.banned("2001:db8:1:2::99".parse().unwrap(), SEC));
        assert!(!store.banned("2001:db8:1:3::99".parse().unwrap(), SEC));
    }

    #[test]
    fn a_full_ban_map_is_an_error() {
        let mut list = Blocklist::new(FakeStore::with_capacity(1));
        list.ban(&target("192.0.2.1"), Ttl::Forever, "", 0).unwrap();
        let err = list.ban(&target("192.0.2.2"), Ttl::Forever, "", 0).unwrap_err();
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
    }
}
