//! The ban worker's pass half (see `crate::blocklist::passes`): the steering door's passes are
//! written on the thread that writes the bans, so a pass and a ban of the same client are
//! applied in the order they were decided, and every ban, whoever made it, takes away the
//! passes it covers before the next request is read.

use std::net::IpAddr;
use std::time::Duration;

use helo_common::PassValue;
use ipnet::IpNet;

use super::State;
use crate::addr::BanTarget;
use crate::blocklist::passes::{self, PassEntry};
use crate::blocklist::{BanStore, StoreError};

impl<S: BanStore> State<S> {
    /// `client` showed itself an honest sender: its next connections go straight to the MTA
    /// for `ttl`. Never for a client banned now (its host or its IPv6 /64).
    pub(super) fn grant_pass(&mut self, client: IpAddr, ttl: Duration) {
        let now = (self.options.clock)();
        let banned = |target: BanTarget| {
            self.list.store().get(&target).ok().flatten().is_some_and(|b| b.active_at(now))
        };
        if banned(BanTarget::host(client)) || banned(BanTarget::prefix(client)) {
            return;
        }
        let Some(store) = self.options.steer.as_mut() else { return };
        let expires = crate::clock::after(now, ttl);
        let had = store.get(client).ok().flatten().is_some_and(|v| v.active_at(now));
        match store.put(client, &PassValue::new(expires)) {
            Ok(()) => {
                tracing::debug!(%client, ttl = %crate::duration::format(ttl), "steering pass written");
                if let Some(m) = &self.options.metrics {
                    m.steer.passes_granted.inc();
                    if !had {
                        m.steer.passes.inc();
                    }
                }
                self.mark_unsaved();
            }
            Err(error) => tracing::warn!(%client, %error, "steering pass not written"),
        }
    }

    /// A ban of `target` is in: the passes of every client it covers go (an IPv6 /64 ban takes
    /// those of every host in it).
    pub(super) fn revoke_passes(&mut self, target: &BanTarget) {
        if let Err(error) = self.remove_passes(&target.network(), "ban") {
            tracing::warn!(%target, %error, "steering passes of a banned client not removed");
        }
    }

    /// Removes every pass inside `net`; returns how many went.
    pub(super) fn remove_passes(&mut self, net: &IpNet, why: &str) -> Result<usize, StoreError> {
        let Some(store) = self.options.steer.as_mut() else { return Ok(0) };
        let removed = store.remove_within(net)?;
        if removed > 0 {
            tracing::info!(%net, removed, why, "steering passes removed");
            if let Some(m) = &self.options.metrics {
                m.steer.passes_revoked.inc_by(removed as u64);
                m.steer.passes.dec_by(removed as i64);
            }
            self.mark_unsaved();
        }
        Ok(removed)
    }

    /// The passes in force, for `helo-agent passes`.
    pub(super) fn list_passes(&self) -> Result<Vec<PassEntry>, StoreError> {
        let Some(store) = self.options.steer.as_ref() else { return Ok(Vec::new()) };
        Ok(passes::list(&store.entries()?, (self.options.clock)()))
    }

    /// Sets the passes gauge from a full walk (at start, each sweep and each snapshot).
    pub(super) fn count_passes(&self, entries: &[(IpAddr, PassValue)]) {
        let (Some(metrics), Some(_)) = (&self.options.metrics, &self.options.steer) else { return };
        let now = (self.options.clock)();
        let active = entries.iter().filter(|(_, v)| v.active_at(now)).count();
        crate::metrics::set_gauge(&metrics.steer.passes, active);
    }

    /// Every pass, expired ones included (empty without steering).
    pub(super) fn pass_entries(&self) -> Vec<(IpAddr, PassValue)> {
        let Some(store) = self.options.steer.as_ref() else { return Vec::new() };
        store.entries().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::blocklist::Blocklist;
    use crate::blocklist::fake::FakeStore;
    use crate::blocklist::passes::FakePasses;
    use crate::blocklist::worker::tests::{ESCALATION, now, request, sync};
    use crate::blocklist::worker::{AdminAnswer, AdminCommand, Arrival, Options, start};
    use crate::fleet::message::{BanRecord, Event};

    fn held(passes: &Arc<Mutex<FakePasses>>) -> Vec<String> {
        passes.lock().unwrap().passes.keys().map(ToString::to_string).collect()
    }

    /// Every ban takes the passes it covers, whoever made it: a rule's here, an admin's (an
    /// IPv6 /64 takes every host's in it), another gateway's. A banned client earns none.
    #[test]
    fn every_ban_removes_the_passes_it_covers_and_a_banned_client_earns_none() {
        let passes = Arc::new(Mutex::new(FakePasses::default()));
        let options = Options {
            steer: Some(Box::new(passes.clone())),
            metrics: Some(Arc::new(crate::metrics::Metrics::default())),
            ..Options::new(ESCALATION, now)
        };
        let metrics = options.metrics.clone().unwrap();
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        let hour = Duration::from_secs(3600);
        for ip in
            ["198.51.100.7", "198.51.100.8", "198.51.100.9", "2001:db8:1:2::7", "2001:db8:1:2::8"]
        {
            bans.pass(ip.parse().unwrap(), hour);
        }
        sync(&bans);
        assert_eq!(held(&passes).len(), 5);
        assert_eq!(metrics.steer.passes.get(), 5);

        bans.ban(request("198.51.100.7")); // a rule's ban here
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let command = |command| runtime.block_on(bans.command(command)).unwrap();
        command(AdminCommand::Ban {
            target: "2001:db8:1:2::/64".parse().unwrap(),
            ttl: crate::blocklist::Ttl::For(hour),
            reason: "admin".into(),
        });
        let at_ms = crate::clock::unix_ns() / 1_000_000;
        let remote = Event::Ban(BanRecord {
            target: "198.51.100.8".parse().unwrap(),
            expires_ms: Some(at_ms + 3_600_000),
            reason: "forged".into(),
            node: "mx2".into(),
            offences: 1,
            at_ms,
            keep_until_ms: None,
        });
        bans.remote(vec![remote], Arrival::Live).unwrap();
        sync(&bans);
        assert_eq!(held(&passes), ["198.51.100.9"], "each ban took its passes");
        assert_eq!(metrics.steer.passes.get(), 1);
        assert_eq!(metrics.steer.passes_revoked.get(), 4);

        bans.pass("198.51.100.7".parse().unwrap(), hour);
        bans.pass("2001:db8:1:2::99".parse().unwrap(), hour);
        sync(&bans);
        assert_eq!(held(&passes), ["198.51.100.9"], "banned (host or /64): no pass");

        let AdminAnswer::Passes(listed) = command(AdminCommand::Passes) else { panic!() };
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].remaining_secs, 3600);
        let AdminAnswer::PassesRemoved(n) =
            command(AdminCommand::RemovePasses { net: "198.51.100.0/24".parse().unwrap() })
        else {
            panic!()
        };
        assert_eq!(n, 1);
        assert!(held(&passes).is_empty());
        drop(bans);
        worker.stop();
    }

    /// The steering passes ride along in the snapshot, with their wall-clock expiry.
    #[test]
    fn the_snapshot_carries_the_steering_passes() {
        let dir = std::env::temp_dir().join(format!("helo-worker-steer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        let passes = Arc::new(Mutex::new(FakePasses::default()));
        let options = Options {
            steer: Some(Box::new(passes.clone())),
            snapshot: Some((path.clone(), Duration::from_secs(3600))),
            ..Options::new(ESCALATION, crate::clock::boot_ns)
        };
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        bans.pass("203.0.113.9".parse().unwrap(), Duration::from_secs(600));
        drop(bans);
        worker.stop();
        let text = std::fs::read_to_string(&path).unwrap();
        let snapshot: crate::blocklist::snapshot::Snapshot = serde_json::from_str(&text).unwrap();
        let [saved] = &snapshot.steer_passes[..] else { panic!("{text}") };
        assert_eq!(saved.client, "203.0.113.9");
        let now = crate::clock::unix_ns() / 1_000_000_000;
        assert!(saved.until_unix.abs_diff(now + 600) <= 2, "{saved:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
