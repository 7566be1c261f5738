//! The steering door's passes: clients the kernel sends straight to the MTA until their pass
//! expires (postscreen's cache of clients that passed its tests, kept in the kernel's pass maps,
//! `HELO_PASS_V4`/`_V6`). The judge decides who earns one (`crate::judge::honest`); the ban
//! worker, the one thread that writes the maps, writes it, and takes it away with every ban
//! that covers the client, whoever made the ban (a rule here, an admin, another gateway).
//! Written against [`PassStore`], implemented over the pinned maps in `crate::ebpf` and by
//! [`FakePasses`] in tests.

use std::net::IpAddr;

use helo_common::PassValue;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::clock::Now;

/// Where passes live.
pub trait PassStore: Send {
    /// `client`'s pass, expired or not.
    fn get(&self, client: IpAddr) -> Result<Option<PassValue>, StoreError>;
    /// Writes `client`'s pass (replacing one there).
    fn put(&mut self, client: IpAddr, value: &PassValue) -> Result<(), StoreError>;
    /// Removes every pass of a client inside `net`; returns how many went.
    fn remove_within(&mut self, net: &IpNet) -> Result<usize, StoreError>;
    /// Every pass, expired ones included.
    fn entries(&self) -> Result<Vec<(IpAddr, PassValue)>, StoreError>;
}

/// One pass as `helo-agent passes` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassEntry {
    pub client: String,
    /// Seconds left, rounded up.
    pub remaining_secs: u64,
    /// Connections the kernel sent straight to the MTA on it (approximate under contention).
    pub hits: u64,
}

/// How a pass is saved in the snapshot: until a wall-clock instant (the boot clock restarts at
/// a reboot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSteerPass {
    pub client: String,
    /// Unix seconds.
    pub until_unix: u64,
}

/// What `helo-agent passes --remove` takes: a client address (IPv4-mapped IPv6 as IPv4) or a
/// network, whose every pass goes.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(ip) = text.trim().parse::<IpAddr>() {
        return Ok(IpNet::from(crate::addr::canonical(ip)));
    }
    crate::config::parse_network(text)
}

/// The passes in force at `now`, by address (IPv4 first, numerically).
pub fn list(entries: &[(IpAddr, PassValue)], now_ns: u64) -> Vec<PassEntry> {
    let mut live: Vec<&(IpAddr, PassValue)> =
        entries.iter().filter(|(_, v)| v.active_at(now_ns)).collect();
    live.sort_by_key(|(ip, _)| (ip.is_ipv6(), *ip));
    live.iter()
        .map(|(ip, v)| PassEntry {
            client: ip.to_string(),
            remaining_secs: (v.expires_ns - now_ns).div_ceil(1_000_000_000),
            hits: v.hits,
        })
        .collect()
}

/// The passes in force, for the snapshot.
pub fn saved(entries: &[(IpAddr, PassValue)], now: Now) -> Vec<SavedSteerPass> {
    entries
        .iter()
        .filter(|(_, v)| v.active_at(now.boot_ns))
        .map(|(ip, v)| SavedSteerPass {
            client: ip.to_string(),
            until_unix: super::snapshot::boot_to_unix(v.expires_ns, now).div_ceil(1_000_000_000),
        })
        .collect()
}

/// Puts saved passes back into `store` with their remaining time; expired and unreadable ones
/// are skipped. Returns how many were restored.
pub fn restore(store: &mut dyn PassStore, saved: &[SavedSteerPass], now: Now) -> usize {
    let mut restored = 0;
    for pass in saved {
        let Ok(client) = pass.client.parse::<IpAddr>() else { continue };
        let expires =
            super::snapshot::unix_to_boot(pass.until_unix.saturating_mul(1_000_000_000), now);
        if expires <= now.boot_ns {
            continue;
        }
        if store.put(client, &PassValue::new(expires)).is_ok() {
            restored += 1;
        }
    }
    restored
}

/// An in-memory pass store, for tests.
#[derive(Debug, Default)]
pub struct FakePasses {
    pub passes: std::collections::BTreeMap<IpAddr, PassValue>,
}

impl PassStore for FakePasses {
    fn get(&self, client: IpAddr) -> Result<Option<PassValue>, StoreError> {
        Ok(self.passes.get(&crate::addr::canonical(client)).copied())
    }

    fn put(&mut self, client: IpAddr, value: &PassValue) -> Result<(), StoreError> {
        self.passes.insert(crate::addr::canonical(client), *value);
        Ok(())
    }

    fn remove_within(&mut self, net: &IpNet) -> Result<usize, StoreError> {
        let before = self.passes.len();
        self.passes.retain(|ip, _| !net.contains(ip));
        Ok(before - self.passes.len())
    }

    fn entries(&self) -> Result<Vec<(IpAddr, PassValue)>, StoreError> {
        Ok(self.passes.iter().map(|(ip, v)| (*ip, *v)).collect())
    }
}

impl<P: PassStore + ?Sized> PassStore for std::sync::Arc<std::sync::Mutex<P>> {
    fn get(&self, client: IpAddr) -> Result<Option<PassValue>, StoreError> {
        self.lock().expect("pass store lock").get(client)
    }

    fn put(&mut self, client: IpAddr, value: &PassValue) -> Result<(), StoreError> {
        self.lock().expect("pass store lock").put(client, value)
    }

    fn remove_within(&mut self, net: &IpNet) -> Result<usize, StoreError> {
        self.lock().expect("pass store lock").remove_within(net)
    }

    fn entries(&self) -> Result<Vec<(IpAddr, PassValue)>, StoreError> {
        self.lock().expect("pass store lock").entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_keeps_passes_in_force_in_address_order_and_saving_round_trips() {
        let mut store = FakePasses::default();
        let now = Now { boot_ns: 10_000_000_000, unix_ns: 1_700_000_000_000_000_000 };
        store
            .put("2001:db8::5".parse().unwrap(), &PassValue::new(now.boot_ns + 3_000_000_000))
            .unwrap();
        store
            .put("198.51.100.9".parse().unwrap(), &PassValue::new(now.boot_ns + 1_500_000_000))
            .unwrap();
        store.put("198.51.100.8".parse().unwrap(), &PassValue::new(now.boot_ns - 1)).unwrap();
        let entries = store.entries().unwrap();
        let listed = list(&entries, now.boot_ns);
        let shown: Vec<(&str, u64)> =
            listed.iter().map(|e| (e.client.as_str(), e.remaining_secs)).collect();
        assert_eq!(shown, [("198.51.100.9", 2), ("2001:db8::5", 3)], "the expired one is gone");
        let kept = saved(&entries, now);
        assert_eq!(kept.len(), 2);
        let mut fresh = FakePasses::default();
        let later = Now { boot_ns: 5_000_000_000, unix_ns: now.unix_ns + 1_000_000_000 };
        assert_eq!(restore(&mut fresh, &kept, later), 2);
        let v6 = fresh.passes[&"2001:db8::5".parse::<IpAddr>().unwrap()];
        assert_eq!(v6.expires_ns, later.boot_ns + 2_000_000_000, "a second of it went by");
    }

    #[test]
    fn removing_within_a_network_takes_every_pass_in_it() {
        let mut store = FakePasses::default();
        for ip in ["2001:db8:1:2::7", "2001:db8:1:2::8", "2001:db8:1:3::7", "198.51.100.7"] {
            store.put(ip.parse().unwrap(), &PassValue::new(u64::MAX)).unwrap();
        }
        let net: IpNet = "2001:db8:1:2::/64".parse().unwrap();
        assert_eq!(store.remove_within(&net).unwrap(), 2);
        assert_eq!(store.passes.len(), 2);
    }
}
