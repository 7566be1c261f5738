//! An in-memory [`BanStore`] for tests: no kernel, no root.

use std::collections::BTreeMap;

use helo_common::{BanValue, REASON_TEXT_LEN};

use super::{BanStore, StoreError};
use crate::addr::BanTarget;

/// A ban worker over `store` (a fake one, or one shared with the test), with escalation by 2
/// up to a day, for tests of what sends bans; join the handle (after dropping every sender) to
/// see what was banned.
pub fn spawn_worker<S: BanStore + Send + 'static>(
    store: S,
) -> (super::worker::BanSender, std::thread::JoinHandle<super::Blocklist<S>>) {
    let escalation = crate::config::Escalation {
        factor: 2,
        max_ttl: std::time::Duration::from_secs(86_400),
        history: 100,
    };
    super::worker::spawn(store, escalation, crate::clock::boot_ns)
}

#[derive(Debug)]
pub struct FakeStore {
    bans: BTreeMap<BanTarget, BanValue>,
    reasons: BTreeMap<u32, [u8; REASON_TEXT_LEN]>,
    capacity: usize,
    reason_capacity: usize,
}

impl Default for FakeStore {
    fn default() -> Self {
        Self::with_capacity(usize::MAX)
    }
}

impl FakeStore {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            bans: BTreeMap::new(),
            reasons: BTreeMap::new(),
            capacity,
            reason_capacity: usize::MAX,
        }
    }

    pub fn with_reason_capacity(reason_capacity: usize) -> Self {
        Self { reason_capacity, ..Self::default() }
    }

    pub fn len(&self) -> usize {
        self.bans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }

    /// What the kernel does when it drops a packet for `target`.
    pub fn bump_hits(&mut self, target: &BanTarget, by: u64) {
        if let Some(value) = self.bans.get_mut(target) {
            value.hits += by;
        }
    }
}

impl BanStore for FakeStore {
    fn get(&self, target: &BanTarget) -> Result<Option<BanValue>, StoreError> {
        Ok(self.bans.get(target).copied())
    }

    fn put(&mut self, target: &BanTarget, value: &BanValue) -> Result<(), StoreError> {
        if !self.bans.contains_key(target) && self.bans.len() >= self.capacity {
            return Err(StoreError::Full { map: "fake", capacity: self.capacity });
        }
        self.bans.insert(*target, *value);
        Ok(())
    }

    fn remove(&mut self, target: &BanTarget) -> Result<bool, StoreError> {
        Ok(self.bans.remove(target).is_some())
    }

    fn entries(&self) -> Result<Vec<(BanTarget, BanValue)>, StoreError> {
        Ok(self.bans.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn reason(&self, code: u32) -> Result<Option<[u8; REASON_TEXT_LEN]>, StoreError> {
        Ok(self.reasons.get(&code).copied())
    }

    fn put_reason(&mut self, code: u32, text: &[u8; REASON_TEXT_LEN]) -> Result<(), StoreError> {
        if self.reasons.len() >= self.reason_capacity {
            return Err(StoreError::Full { map: "fake reasons", capacity: self.reason_capacity });
        }
        self.reasons.insert(code, *text);
        Ok(())
    }

    /// Every map holds `capacity` (shared, here), when there is one.
    fn capacities(&self) -> Vec<(&'static str, usize)> {
        if self.capacity == usize::MAX {
            return Vec::new();
        }
        BanTarget::MAPS.iter().map(|name| (*name, self.capacity)).collect()
    }
}
