//! The ban worker's fleet half (see `crate::fleet`): every ban and unban made here is handed
//! to the fleet task as an [`Event`] (never waiting: a full queue drops it, counted), and the
//! bans other gateways made arrive as remote events: applied with their expiry, never handed
//! back, refused where a ban made here would be ([`Spared`]: the allowlist, the MTA, our own
//! addresses, loopback, trusted front proxies). The offence count they carry joins the history,
//! so escalation counts offences made anywhere in the fleet.

use std::net::IpAddr;
use std::sync::Arc;

use helo_common::{BanValue, NEVER_EXPIRES};
use ipnet::IpNet;
use rustc_hash::FxHashSet;

use super::{Arrival, State};
use crate::addr::BanTarget;
use crate::blocklist::BanStore;
use crate::blocklist::snapshot;
use crate::clock::Now;
use crate::config::Config;
use crate::fleet::message::{BanRecord, Event};
use crate::judge::NeverBan;

const NS_PER_MS: u64 = 1_000_000;
/// Remote expiries this close to a ban's here are the same ban.
const SAME_EXPIRY_NS: u64 = 1_000_000_000;

impl<S: BanStore> State<S> {
    /// Hands an unban made here to the fleet (nothing without one).
    pub(super) fn publish_unban(&mut self, target: BanTarget) {
        let Some(fleet) = &self.options.fleet else { return };
        let at_ms = crate::clock::unix_ns() / NS_PER_MS;
        let node = fleet.node.clone();
        self.publish(Event::Unban { target, node, at_ms });
    }

    /// Hands a ban made here to the fleet (nothing without one).
    pub(super) fn publish_ban(
        &mut self,
        target: BanTarget,
        value: BanValue,
        reason: &str,
        offences: u32,
    ) {
        let Some(fleet) = &self.options.fleet else { return };
        let now = Now { boot_ns: (self.options.clock)(), unix_ns: crate::clock::unix_ns() };
        let record = self.record(target, value, reason, offences, fleet.node.clone(), now);
        self.publish(Event::Ban(record));
    }

    /// A ban as the fleet records it, made at `now`.
    pub(super) fn record(
        &self,
        target: BanTarget,
        value: BanValue,
        reason: &str,
        offences: u32,
        node: String,
        now: Now,
    ) -> BanRecord {
        let at_ms = now.unix_ns / NS_PER_MS;
        let expires_ms = (value.expires_ns != NEVER_EXPIRES)
            .then(|| snapshot::boot_to_unix(value.expires_ns, now) / NS_PER_MS);
        let remember_ms =
            u64::try_from(self.offenders.escalation().max_ttl.as_millis()).unwrap_or(u64::MAX);
        let keep_until_ms = expires_ms.map(|end| match offences {
            0 => end,
            _ => end.max(at_ms.saturating_add(remember_ms)),
        });
        BanRecord {
            target,
            expires_ms,
            reason: reason.to_owned(),
            node,
            offences,
            at_ms,
            keep_until_ms,
        }
    }

    pub(super) fn publish(&mut self, event: Event) {
        let Some(fleet) = &self.options.fleet else { return };
        if fleet.events.try_send(event).is_err() {
            self.unpublished += 1;
            if let Some(m) = &self.options.metrics {
                m.fleet.dropped.inc();
            }
            if self.unpublished == 1 || self.unpublished.is_power_of_two() {
                tracing::warn!(
                    dropped = self.unpublished,
                    "fleet queue full: a ban or unban was not shared (the fleet task is stuck)"
                );
            }
        }
    }

    /// Applies what other gateways did.
    pub(super) fn remote(&mut self, events: Vec<Event>, arrival: Arrival) {
        let now = Now { boot_ns: (self.options.clock)(), unix_ns: crate::clock::unix_ns() };
        let (mut applied, mut refused) = (0usize, 0usize);
        let mut reasons = std::collections::HashSet::new();
        for event in events {
            let outcome = match event {
                Event::Ban(record) => self.remote_ban(record, now, arrival, &mut reasons),
                Event::Unban { target, node, .. } => match self.lift(&target) {
                    // A catch-up reads every unban kept in Redis again: only news is logged.
                    Ok(was) if was || arrival == Arrival::Live => {
                        tracing::info!(%target, node, was_banned = was, "unbanned by another gateway");
                        Remote::Applied
                    }
                    Ok(_) => Remote::Kept,
                    Err(error) => {
                        tracing::error!(%target, node, %error, "unban from the fleet failed");
                        Remote::Failed
                    }
                },
            };
            match outcome {
                Remote::Applied => applied += 1,
                Remote::Refused => refused += 1,
                Remote::Kept | Remote::Failed => {}
            }
        }
        if let Some(m) = &self.options.metrics {
            m.fleet.applied.inc_by(applied as u64);
            m.fleet.refused.inc_by(refused as u64);
        }
        if arrival == Arrival::CatchUp && (applied > 0 || refused > 0) {
            tracing::debug!(applied, refused, "a batch of the fleet's bans applied");
        }
    }

    /// One remote ban; `reasons` are the reason codes known to be stored (see
    /// [`crate::blocklist::Blocklist::put_ban`]).
    fn remote_ban(
        &mut self,
        record: BanRecord,
        now: Now,
        arrival: Arrival,
        reasons: &mut std::collections::HashSet<u32>,
    ) -> Remote {
        let BanRecord { target, ref node, ref reason, .. } = record;
        if let Some(why) = self.options.spared.never_ban().refuses_remote(&target) {
            tracing::warn!(%target, node, reason, "ban from another gateway refused: {why}");
            return Remote::Refused;
        }
        let age_ns = now.unix_ns.saturating_sub(record.at_ms.saturating_mul(NS_PER_MS));
        if record.offences > 0 && age_ns < self.offenders.forget_ns() {
            let last_ns = now.boot_ns.saturating_sub(age_ns);
            self.offenders.join(target, record.offences, last_ns);
            self.mark_unsaved();
        }
        if !record.active_at(now.unix_ns / NS_PER_MS) {
            return Remote::Kept; // only its offences still count
        }
        // Never longer than a ban made here can be (a record from anyone who can write to
        // Redis is not trusted with "for 500 years").
        let longest = crate::clock::after(now.boot_ns, crate::blocklist::MAX_TTL);
        let expires_ns = match record.expires_ms {
            None => NEVER_EXPIRES,
            Some(ms) => snapshot::unix_to_boot(ms.saturating_mul(NS_PER_MS), now).min(longest),
        };
        let before = self.list.store().get(&target).ok().flatten();
        // A rule's ban never shortens one held here: as long here already, or longer (within a
        // second: the same record read twice, from the catch-up and the channel, converts to
        // instants a few microseconds apart). An admin's ban (no offence) is taken as made,
        // shorter too: a re-ban with a shorter TTL means it.
        if let Some(old) = before
            && old.active_at(now.boot_ns)
            && (old.expires_ns.saturating_add(SAME_EXPIRY_NS) >= expires_ns)
            && (record.offences > 0 || old.expires_ns.abs_diff(expires_ns) < SAME_EXPIRY_NS)
        {
            return Remote::Kept;
        }
        let hits = before.map_or(0, |old| old.hits);
        let value = match self.list.put_ban(&target, expires_ns, reason, hits, reasons) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%target, node, %error, "ban from another gateway not applied");
                return Remote::Failed;
            }
        };
        self.changed(&target, before, Some(value));
        // This gateway's own record (read back from Redis after losing its maps) is its own.
        let own = self.options.fleet.as_ref().is_some_and(|fleet| fleet.node == *node);
        if own {
            self.origins.remove(&target);
        } else {
            self.origins.insert(target, Arc::from(node.as_str()));
        }
        if arrival == Arrival::Live {
            tracing::info!(%target, node, reason, offence = record.offences, "banned by another gateway");
        }
        Remote::Applied
    }

    /// Every ban held, as fleet records: those made here under this node's name.
    pub(super) fn export(&self) -> Vec<BanRecord> {
        let Some(fleet) = &self.options.fleet else { return Vec::new() };
        let now = Now { boot_ns: (self.options.clock)(), unix_ns: crate::clock::unix_ns() };
        let Ok(entries) = self.list.store().entries() else { return Vec::new() };
        entries
            .into_iter()
            .filter(|(_, value)| value.active_at(now.boot_ns))
            .map(|(target, value)| {
                let reason = self.list.reason_of(value.reason).unwrap_or_default();
                let node = self.origins.get(&target).map_or(fleet.node.clone(), |n| n.to_string());
                let offence = self.offenders.peek(&target);
                let offences = offence.map_or(0, |o| o.count);
                let mut record = self.record(target, value, &reason, offences, node, now);
                if let Some(offence) = offence {
                    // The offence's own time, so the history is forgotten when it should be.
                    record.at_ms = snapshot::boot_to_unix(offence.last_ns, now) / NS_PER_MS;
                }
                record
            })
            .collect()
    }
}

/// What this gateway never bans, held by the worker for the bans other gateways made (see
/// [`NeverBan::refuses_remote`]): the judge's guards, owned, renewed at each reload.
#[derive(Clone, Debug)]
pub struct Spared {
    /// `proxy.upstream`'s address.
    pub mta: IpAddr,
    /// `identity.addresses`, with `identity.detect` the host's own.
    pub own: FxHashSet<IpAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub allowlist: Vec<IpNet>,
}

impl Default for Spared {
    /// Loopback alone (and the unspecified address, for an MTA not known).
    fn default() -> Self {
        Spared {
            mta: IpAddr::from([0, 0, 0, 0]),
            own: FxHashSet::default(),
            trusted_proxies: Vec::new(),
            allowlist: Vec::new(),
        }
    }
}

impl Spared {
    /// What `config` spares.
    pub fn of(config: &Config) -> Self {
        Spared {
            mta: config.proxy.upstream.ip(),
            own: config.rules.identity.addresses.clone(),
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            allowlist: config.rules.allowlist.clone(),
        }
    }

    /// The judge's guards over these addresses (loopback always spared).
    fn never_ban(&self) -> NeverBan<'_> {
        NeverBan {
            mta: self.mta,
            trusted_proxies: &self.trusted_proxies,
            allowlist: &self.allowlist,
            own: &self.own,
            loopback: true,
        }
    }
}

/// What became of one remote event.
enum Remote {
    Applied,
    /// The address is spared here ([`Spared`]).
    Refused,
    /// Nothing to write: a ban as long is in force here, or the record only carries offences.
    Kept,
    Failed,
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::blocklist::Blocklist;
    use crate::blocklist::fake::FakeStore;
    use crate::blocklist::worker::tests::{ESCALATION, now, request, sync};
    use crate::blocklist::worker::{AdminAnswer, AdminCommand, FleetLink, Options, start};
    use crate::metrics::Metrics;

    fn fleet_options(
        clock: fn() -> u64,
        allowlist: &[&str],
    ) -> (Options, tokio::sync::mpsc::Receiver<Event>) {
        let (events, queue) = tokio::sync::mpsc::channel(16);
        let options = Options {
            fleet: Some(FleetLink { node: "mx1".into(), events }),
            spared: Spared {
                allowlist: allowlist.iter().map(|n| n.parse().unwrap()).collect(),
                ..Spared::default()
            },
            metrics: Some(Arc::new(Metrics::default())),
            ..Options::new(ESCALATION, clock)
        };
        (options, queue)
    }

    /// A ban another gateway made, of an address this one spares, is refused whole: our own
    /// address (a monitor of ours that said our name there), a prefix that holds it, the MTA,
    /// loopback, a trusted front proxy; the same ban of a neighbour is applied. Before the
    /// fix only the allowlist was checked, and this gateway banned itself on the fleet's word.
    #[test]
    fn remote_bans_of_what_this_gateway_spares_are_refused() {
        let (mut options, _queue) = fleet_options(now, &[]);
        options.spared = Spared {
            mta: "127.0.0.1".parse().unwrap(),
            own: ["192.0.2.25", "2001:db8:25::25"].iter().map(|a| a.parse().unwrap()).collect(),
            trusted_proxies: vec!["198.51.100.0/28".parse().unwrap()],
            allowlist: Vec::new(),
        };
        let metrics = options.metrics.clone().unwrap();
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, worker) = start(Blocklist::new(store.clone()), options);
        let refused = [
            "192.0.2.25",
            "192.0.2.0/24",
            "2001:db8:25::25",
            "2001:db8:25::/64",
            "127.0.0.5",
            "::1",
            "198.51.100.3",
            "198.51.100.0/24",
        ];
        let applied = ["192.0.2.26", "2001:db8:26::/64", "198.51.100.16"];
        let events = refused.iter().chain(&applied).map(|t| remote_ban(t, "mx2", 1, 600));
        bans.remote(events.collect(), Arrival::Live).unwrap();
        sync(&bans);
        for target in refused {
            assert!(store.get(&target.parse().unwrap()).unwrap().is_none(), "{target} refused");
        }
        for target in applied {
            assert!(store.get(&target.parse().unwrap()).unwrap().is_some(), "{target} applied");
        }
        assert_eq!((metrics.fleet.applied.get(), metrics.fleet.refused.get()), (3, 8));
        drop(bans);
        worker.stop();
    }

    #[test]
    fn spared_comes_from_the_config_in_force() {
        let text = r#"
            [identity]
            detect = false
            addresses = ["192.0.2.25"]
            [allowlist]
            networks = ["10.9.0.0/16"]
            [proxy]
            upstream = "192.0.2.80:10025"
            trusted_proxies = ["198.51.100.7"]
        "#;
        let host = crate::config::HostFacts::default();
        let config = Config::parse(text, std::path::Path::new("test.toml"), &host).unwrap();
        let spared = Spared::of(&config);
        let why = |t: &str| spared.never_ban().refuses_remote(&t.parse().unwrap());
        assert!(why("10.9.3.4").unwrap().contains("allowlist"));
        assert!(why("192.0.2.25").unwrap().contains("own address"));
        assert!(why("192.0.2.80").unwrap().contains("own address"), "the MTA");
        assert!(why("198.51.100.7").unwrap().contains("trusted front proxy"));
        assert_eq!(why("192.0.2.26"), None);
    }

    fn remote_ban(target: &str, node: &str, offences: u32, secs: u64) -> Event {
        let at_ms = crate::clock::unix_ns() / NS_PER_MS;
        Event::Ban(BanRecord {
            target: target.parse().unwrap(),
            expires_ms: Some(at_ms + secs * 1000),
            reason: "forged_own_name".into(),
            node: node.into(),
            offences,
            at_ms,
            keep_until_ms: Some(at_ms + 8 * 3600 * 1000),
        })
    }

    #[test]
    fn bans_made_here_are_handed_to_the_fleet_with_their_offence_count() {
        let (options, mut queue) = fleet_options(now, &[]);
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        bans.ban(request("203.0.113.5"));
        bans.ban(request("203.0.113.5"));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let command = |command| runtime.block_on(bans.command(command)).unwrap();
        command(AdminCommand::Unban { target: "198.51.100.9".parse().unwrap() });
        drop(bans);
        worker.stop();
        let mut events = Vec::new();
        while let Ok(event) = queue.try_recv() {
            events.push(event);
        }
        let [Event::Ban(first), Event::Ban(second), Event::Unban { target, node, .. }] =
            &events[..]
        else {
            panic!("{events:?}");
        };
        assert_eq!((first.offences, second.offences), (1, 2));
        assert_eq!(first.node, "mx1");
        let hour_ms = 3600 * 1000;
        let ttl = |r: &BanRecord| r.expires_ms.unwrap() - r.at_ms;
        assert!(ttl(first).abs_diff(hour_ms) < 5000, "{first:?}");
        assert!(ttl(second).abs_diff(2 * hour_ms) < 5000, "escalated: {second:?}");
        assert_eq!(second.keep_until_ms, Some(second.at_ms + 8 * hour_ms), "offences outlive it");
        assert_eq!(
            target.to_string(),
            "198.51.100.9",
            "an unban goes out even when not banned here"
        );
        assert_eq!(node, "mx1");
    }

    #[test]
    fn remote_bans_apply_with_their_expiry_count_their_offences_and_are_not_sent_back() {
        let (options, mut queue) = fleet_options(now, &["192.0.2.0/24"]);
        let metrics = options.metrics.clone().unwrap();
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, worker) = start(Blocklist::new(store.clone()), options);
        bans.remote(
            vec![
                remote_ban("203.0.113.7", "mx2", 2, 600),
                remote_ban("192.0.2.10", "mx3", 1, 600),
                remote_ban("2001:db8:1:2::/64", "mx3", 0, 60),
            ],
            Arrival::Live,
        )
        .unwrap();
        sync(&bans);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let AdminAnswer::Listed(listed) =
            runtime.block_on(bans.command(AdminCommand::List)).unwrap()
        else {
            panic!()
        };
        let shown: Vec<(&str, Option<&str>)> =
            listed.iter().map(|e| (e.target.as_str(), e.origin.as_deref())).collect();
        assert_eq!(
            shown,
            [("203.0.113.7", Some("mx2")), ("2001:db8:1:2::/64", Some("mx3"))],
            "the allowlisted address was refused"
        );
        assert!(listed[0].remaining_secs.unwrap().abs_diff(600) <= 2, "{listed:?}");
        assert_eq!((metrics.fleet.applied.get(), metrics.fleet.refused.get()), (2, 1));
        // The third offence here is the third in the fleet: 4 h, not 1 h.
        bans.ban(request("203.0.113.7"));
        sync(&bans);
        let Ok(Event::Ban(mine)) = queue.try_recv() else { panic!("the local ban is published") };
        assert_eq!(mine.offences, 3);
        assert!((mine.expires_ms.unwrap() - mine.at_ms).abs_diff(4 * 3600 * 1000) < 5000);
        assert!(queue.try_recv().is_err(), "remote bans are never published again");
        // An unban from the fleet lifts the ban and forgets the offences.
        bans.remote(
            vec![Event::Unban {
                target: "203.0.113.7".parse().unwrap(),
                node: "mx2".into(),
                at_ms: 0,
            }],
            Arrival::Live,
        )
        .unwrap();
        sync(&bans);
        assert!(store.get(&"203.0.113.7".parse().unwrap()).unwrap().is_none());
        bans.ban(request("203.0.113.7"));
        sync(&bans);
        let Ok(Event::Ban(again)) = queue.try_recv() else { panic!() };
        assert_eq!(again.offences, 1, "forgotten with the unban");
        drop(bans);
        worker.stop();
    }

    #[test]
    fn a_shorter_remote_ban_keeps_the_longer_one_here_and_export_gives_every_ban_held() {
        let (options, _queue) = fleet_options(now, &[]);
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        bans.ban(request("203.0.113.8")); // 1 h here
        bans.remote(
            vec![remote_ban("203.0.113.8", "mx2", 1, 60), remote_ban("203.0.113.9", "mx2", 0, 60)],
            Arrival::CatchUp,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut held = runtime.block_on(bans.export()).unwrap();
        held.sort_by_key(|r| r.target);
        // Whole minutes left, rounded: the milliseconds between the bans and the export (more
        // of them on a loaded machine) must not turn 60 s into 0 minutes.
        let minutes = |r: &BanRecord| (r.expires_ms.unwrap() - r.at_ms + 30_000) / 60_000;
        let shown: Vec<(String, &str, u64)> =
            held.iter().map(|r| (r.target.to_string(), r.node.as_str(), minutes(r))).collect();
        assert_eq!(
            shown,
            [("203.0.113.8".into(), "mx1", 60), ("203.0.113.9".into(), "mx2", 1)],
            "the hour-long ban made here stays, under this node's name"
        );
        drop(bans);
        worker.stop();
    }
}
