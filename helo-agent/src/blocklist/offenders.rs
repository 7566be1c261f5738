//! Who offended and how often: pure, time passed in (CLOCK_BOOTTIME ns). Repeat offenders get
//! longer bans: each new offence multiplies the TTL by `bans.escalation_factor`, up to
//! `bans.max_ttl`; the history is an LRU of `bans.history_size` and forgets an offender (a
//! host, or the prefix a rule's ban covers) after `bans.max_ttl` without offences. The ban
//! worker owns one.
//!
//! Every offence is counted and banned: there is no rate cap. One used to drop the rule bans
//! beyond `bans.max_per_second` so that a flood could not fill the LRU maps; in a storm every
//! one of them was a real offender's, and the bots whose bans it dropped came back and
//! delivered (issue 29). The maps are sized for a storm instead, and the ban worker warns
//! long before they fill.

use std::num::NonZeroUsize;
use std::time::Duration;

use lru::LruCache;

use crate::addr::BanTarget;
use crate::config::Escalation;

/// One address's offences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offence {
    pub count: u32,
    /// The latest, boot ns.
    pub last_ns: u64,
}

/// The TTL for an offender's `count`-th offence (1-based).
pub fn escalated(base: Duration, count: u32, escalation: &Escalation) -> Duration {
    let factor = u64::from(escalation.factor.max(1)).saturating_pow(count.saturating_sub(1));
    let secs = base.as_secs().saturating_mul(factor);
    Duration::from_secs(secs).min(escalation.max_ttl.max(base))
}

/// The offence history, under the escalation settings in force.
pub struct Offenders {
    escalation: Escalation,
    history: LruCache<BanTarget, Offence>,
}

impl Offenders {
    /// Starts with `restored` offences (target, count, last offence in boot ns), from a
    /// snapshot, at `now`.
    pub fn new(escalation: Escalation, mut restored: Vec<(BanTarget, u32, u64)>) -> Self {
        let mut history = LruCache::new(capacity(&escalation));
        restored.sort_by_key(|(_, _, last)| *last);
        for (target, count, last_ns) in restored {
            history.put(target, Offence { count, last_ns });
        }
        Offenders { escalation, history }
    }

    pub fn escalation(&self) -> Escalation {
        self.escalation
    }

    /// How long an address is remembered without offences (`bans.max_ttl`), ns.
    pub fn forget_ns(&self) -> u64 {
        u64::try_from(self.escalation.max_ttl.as_nanos()).unwrap_or(u64::MAX)
    }

    /// A rule's offence by `target` at `now`, whose rule bans for `base`: its count (1: the
    /// first, or the first since the history forgot it) and the escalated TTL.
    pub fn offend(&mut self, target: BanTarget, base: Duration, now: u64) -> (u32, Duration) {
        let forget_ns = self.forget_ns();
        let count = match self.history.get_mut(&target) {
            Some(offence) if now.saturating_sub(offence.last_ns) < forget_ns => {
                offence.count += 1;
                offence.last_ns = now;
                offence.count
            }
            _ => {
                self.history.put(target, Offence { count: 1, last_ns: now });
                1
            }
        };
        (count, escalated(base, count, &self.escalation))
    }

    /// Offences another gateway counted for `target` (`count`, the latest at `last_ns`): the
    /// history keeps the larger count and the later time.
    pub fn join(&mut self, target: BanTarget, count: u32, last_ns: u64) {
        match self.history.get_mut(&target) {
            Some(offence) => {
                offence.count = offence.count.max(count);
                offence.last_ns = offence.last_ns.max(last_ns);
            }
            None => {
                self.history.put(target, Offence { count, last_ns });
            }
        }
    }

    /// Forgets `target`'s offences (an unban); whether there were any.
    pub fn forget(&mut self, target: &BanTarget) -> bool {
        self.history.pop(target).is_some()
    }

    /// `target`'s offences, without making it recent.
    pub fn peek(&self, target: &BanTarget) -> Option<Offence> {
        self.history.peek(target).copied()
    }

    /// Every offender, most recent first.
    pub fn iter(&self) -> impl Iterator<Item = (&BanTarget, &Offence)> {
        self.history.iter()
    }

    /// New settings (a reload): the history resized.
    pub fn reconfigure(&mut self, escalation: Escalation) {
        if escalation.history != self.escalation.history {
            self.history.resize(capacity(&escalation));
        }
        self.escalation = escalation;
    }
}

fn capacity(escalation: &Escalation) -> NonZeroUsize {
    NonZeroUsize::new(escalation.history.max(1)).expect("at least 1")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESCALATION: Escalation =
        Escalation { factor: 2, max_ttl: Duration::from_secs(8 * 3600), history: 2 };

    #[test]
    fn ttl_doubles_per_offence_up_to_the_maximum() {
        let base = Duration::from_secs(3600);
        let ttls: Vec<u64> =
            (1..=6).map(|n| escalated(base, n, &ESCALATION).as_secs() / 3600).collect();
        assert_eq!(ttls, [1, 2, 4, 8, 8, 8]);
        assert_eq!(escalated(base, u32::MAX, &ESCALATION).as_secs(), 8 * 3600);
        let flat = Escalation { factor: 1, ..ESCALATION };
        assert_eq!(escalated(base, 5, &flat), base);
    }
}
