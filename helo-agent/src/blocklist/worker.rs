//! Bans requested by sessions, applied off the async path: a thread owns the [`Blocklist`]
//! (map writes are syscalls) and takes requests over a bounded channel that never blocks the
//! sender. Repeat offenders get longer bans: each new offence multiplies the TTL by `factor`,
//! up to `max_ttl`; the offence history is an LRU of bounded size and forgets an address after
//! `max_ttl` without offences. The worker also sweeps expired bans from the store every minute.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use lru::LruCache;

use super::{BanStore, Blocklist, Ttl};
use crate::addr::BanTarget;

/// How often expired bans whose source never came back are swept from the store (the kernel
/// removes the others when they come back).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Requests waiting at most; beyond, new ones are dropped (and counted) rather than block.
const QUEUE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escalation {
    pub factor: u32,
    pub max_ttl: Duration,
    pub history: usize,
    /// Bans applied per second at most (a burst up to this many); beyond, requests are
    /// dropped, so a flood of bad sessions cannot fill the LRU maps with noise and evict
    /// real bans.
    pub max_per_second: u32,
}

#[derive(Debug)]
pub struct BanRequest {
    pub client: IpAddr,
    /// The rule's TTL, before escalation.
    pub ttl: Duration,
    pub reason: String,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct BanSender {
    tx: SyncSender<BanRequest>,
}

impl BanSender {
    /// Queues a ban; never blocks. `false` when the queue is full or the worker has gone.
    pub fn ban(&self, request: BanRequest) -> bool {
        match self.tx.try_send(request) {
            Ok(()) => true,
            Err(TrySendError::Full(r)) => {
                tracing::warn!(client = %r.client, "ban queue full: ban dropped");
                false
            }
            Err(TrySendError::Disconnected(r)) => {
                tracing::error!(client = %r.client, "ban worker gone: ban dropped");
                false
            }
        }
    }
}

struct Offence {
    count: u32,
    last_ns: u64,
}

/// The TTL for an offender's `count`-th offence (1-based).
pub fn escalated(base: Duration, count: u32, escalation: &Escalation) -> Duration {
    let factor = u64::from(escalation.factor.max(1)).saturating_pow(count.saturating_sub(1));
    let secs = base.as_secs().saturating_mul(factor);
    Duration::from_secs(secs).min(escalation.max_ttl.max(base))
}

/// Starts the worker; it runs until every sender is dropped, then returns the blocklist.
pub fn spawn<S: BanStore + Send + 'static>(
    store: S,
    escalation: Escalation,
    clock: fn() -> u64,
) -> (BanSender, std::thread::JoinHandle<Blocklist<S>>) {
    let (tx, rx) = sync_channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("helo-bans".into())
        .spawn(move || run(Blocklist::new(store), escalation, clock, rx))
        .expect("spawn the ban worker thread");
    (BanSender { tx }, handle)
}

fn run<S: BanStore>(
    mut list: Blocklist<S>,
    escalation: Escalation,
    clock: fn() -> u64,
    rx: Receiver<BanRequest>,
) -> Blocklist<S> {
    let capacity = NonZeroUsize::new(escalation.history.max(1)).expect("at least 1");
    let mut history: LruCache<BanTarget, Offence> = LruCache::new(capacity);
    let forget_ns = u64::try_from(escalation.max_ttl.as_nanos()).unwrap_or(u64::MAX);
    let mut bucket = TokenBucket::new(escalation.max_per_second, clock());
    let mut capped: u64 = 0;
    let sweep_ns = u64::try_from(SWEEP_EVERY.as_nanos()).unwrap_or(u64::MAX);
    let mut next_sweep = clock().saturating_add(sweep_ns);
    loop {
        let now = clock();
        if now >= next_sweep {
            match list.purge_expired(now) {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired bans swept"),
                Err(error) => tracing::warn!(%error, "sweeping expired bans failed"),
            }
            next_sweep = now.saturating_add(sweep_ns);
        }
        let request = match rx.recv_timeout(Duration::from_nanos(next_sweep - now)) {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let now = clock();
        if !bucket.take(now) {
            capped += 1;
            if capped == 1 || capped.is_power_of_two() {
                tracing::warn!(client = %request.client, capped, per_second = escalation.max_per_second, "ban rate cap reached: ban dropped");
            }
            continue;
        }
        let target = BanTarget::host(request.client);
        let count = match history.get_mut(&target) {
            Some(offence) if now.saturating_sub(offence.last_ns) < forget_ns => {
                offence.count += 1;
                offence.last_ns = now;
                offence.count
            }
            _ => {
                history.put(target, Offence { count: 1, last_ns: now });
                1
            }
        };
        let ttl = escalated(request.ttl, count, &escalation);
        match list.ban(&target, Ttl::For(ttl), &request.reason, now) {
            Ok(_) => tracing::info!(
                client = %request.client,
                ttl = %crate::duration::format(ttl),
                offence = count,
                reason = request.reason,
                "banned"
            ),
            Err(error) => tracing::error!(client = %request.client, %error, "ban failed"),
        }
    }
    list
}

/// At most `rate` tokens a second, holding up to `rate`.
struct TokenBucket {
    rate: u64,
    tokens_milli: u64,
    last_ns: u64,
}

impl TokenBucket {
    fn new(rate: u32, now_ns: u64) -> Self {
        let rate = u64::from(rate.max(1));
        TokenBucket { rate, tokens_milli: rate * 1000, last_ns: now_ns }
    }

    fn take(&mut self, now_ns: u64) -> bool {
        let elapsed_ms = now_ns.saturating_sub(self.last_ns) / 1_000_000;
        if elapsed_ms > 0 {
            self.tokens_milli = (self.tokens_milli + elapsed_ms * self.rate).min(self.rate * 1000);
            self.last_ns = now_ns;
        }
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// A shared store, so a test (or the agent's CLI side) can look while the worker writes.
impl<S: BanStore> BanStore for std::sync::Arc<std::sync::Mutex<S>> {
    fn get(&self, t: &BanTarget) -> Result<Option<helo_common::BanValue>, super::StoreError> {
        self.lock().expect("store lock").get(t)
    }
    fn put(&mut self, t: &BanTarget, v: &helo_common::BanValue) -> Result<(), super::StoreError> {
        self.lock().expect("store lock").put(t, v)
    }
    fn remove(&mut self, t: &BanTarget) -> Result<bool, super::StoreError> {
        self.lock().expect("store lock").remove(t)
    }
    fn entries(&self) -> Result<Vec<(BanTarget, helo_common::BanValue)>, super::StoreError> {
        self.lock().expect("store lock").entries()
    }
    fn reason(
        &self,
        code: u32,
    ) -> Result<Option<[u8; helo_common::REASON_TEXT_LEN]>, super::StoreError> {
        self.lock().expect("store lock").reason(code)
    }
    fn put_reason(
        &mut self,
        code: u32,
        text: &[u8; helo_common::REASON_TEXT_LEN],
    ) -> Result<(), super::StoreError> {
        self.lock().expect("store lock").put_reason(code, text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::blocklist::fake::FakeStore;

    const ESCALATION: Escalation = Escalation {
        factor: 2,
        max_ttl: Duration::from_secs(8 * 3600),
        history: 2,
        max_per_second: 1000,
    };

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(3, 0);
        assert_eq!((0..5).filter(|_| bucket.take(0)).count(), 3, "a burst of 3");
        assert!(!bucket.take(100_000_000), "0.1 s later: 0.3 tokens");
        assert!(bucket.take(400_000_000), "0.4 s later: 1.2 tokens");
        assert_eq!(
            (0..10).filter(|_| bucket.take(10_000_000_000)).count(),
            3,
            "refills to the burst only"
        );
    }

    #[test]
    fn bans_beyond_the_rate_cap_are_dropped() {
        static FROZEN: AtomicU64 = AtomicU64::new(5_000_000_000);
        fn frozen() -> u64 {
            FROZEN.load(Ordering::Relaxed)
        }
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let capped = Escalation { max_per_second: 2, ..ESCALATION };
        let (bans, worker) = spawn(store, capped, frozen);
        for i in 1..=5 {
            bans.ban(BanRequest {
                client: format!("203.0.113.{i}").parse().unwrap(),
                ttl: Duration::from_secs(60),
                reason: String::new(),
            });
        }
        drop(bans);
        let list = worker.join().unwrap();
        assert_eq!(list.store().entries().unwrap().len(), 2, "the clock stood still: two bans");
    }

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

    static NOW: AtomicU64 = AtomicU64::new(0);
    fn now() -> u64 {
        NOW.load(Ordering::Relaxed)
    }

    #[test]
    fn the_worker_escalates_repeat_offenders_and_forgets_in_lru_order() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, worker) = spawn(store.clone(), ESCALATION, now);
        let ban = |ip: &str| {
            assert!(bans.ban(BanRequest {
                client: ip.parse().unwrap(),
                ttl: Duration::from_secs(3600),
                reason: "forged_identity".into(),
            }))
        };
        ban("203.0.113.9");
        ban("203.0.113.9");
        ban("203.0.113.9");
        // Two other offenders push .9 out of the 2-entry history: its next ban starts again.
        ban("203.0.113.10");
        ban("203.0.113.11");
        ban("203.0.113.9");
        ban("::ffff:203.0.113.11");
        drop(bans);
        let list = worker.join().unwrap();
        let ttl_of = |ip: &str| {
            let target = BanTarget::host(ip.parse().unwrap());
            list.store().get(&target).unwrap().unwrap().expires_ns / 1_000_000_000 / 3600
        };
        assert_eq!(ttl_of("203.0.113.9"), 1, "history forgot it: first offence again");
        assert_eq!(ttl_of("203.0.113.10"), 1);
        assert_eq!(ttl_of("203.0.113.11"), 2, "the mapped form is the same offender");
        assert_eq!(list.list(0).unwrap()[0].reason, "forged_identity");
    }

    #[test]
    fn an_old_offence_is_forgotten_after_max_ttl() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        static LATER: AtomicU64 = AtomicU64::new(0);
        fn later() -> u64 {
            LATER.load(Ordering::Relaxed)
        }
        let (bans, worker) = spawn(store, ESCALATION, later);
        let request = || BanRequest {
            client: "198.51.100.77".parse().unwrap(),
            ttl: Duration::from_secs(3600),
            reason: String::new(),
        };
        bans.ban(request());
        // Let the worker take the first request before the clock jumps.
        std::thread::sleep(Duration::from_millis(100));
        LATER.store(9 * 3600 * 1_000_000_000, Ordering::Relaxed);
        bans.ban(request());
        drop(bans);
        let list = worker.join().unwrap();
        let target = BanTarget::host("198.51.100.77".parse().unwrap());
        let value = list.store().get(&target).unwrap().unwrap();
        assert_eq!(value.expires_ns, 10 * 3600 * 1_000_000_000, "a one-hour ban from the new now");
    }

    #[test]
    fn the_worker_sweeps_expired_bans() {
        static CLOCK: AtomicU64 = AtomicU64::new(0);
        fn clock() -> u64 {
            CLOCK.load(Ordering::Relaxed)
        }
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, worker) = spawn(store, ESCALATION, clock);
        let request = |ip: &str, secs| BanRequest {
            client: ip.parse().unwrap(),
            ttl: Duration::from_secs(secs),
            reason: String::new(),
        };
        bans.ban(request("198.51.100.1", 1));
        std::thread::sleep(Duration::from_millis(100));
        // A minute later the first ban has long expired; the next request wakes the worker.
        CLOCK.store(61 * 1_000_000_000, Ordering::Relaxed);
        bans.ban(request("198.51.100.2", 3600));
        drop(bans);
        let list = worker.join().unwrap();
        let left: Vec<String> =
            list.store().entries().unwrap().iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(left, ["198.51.100.2"], "the expired ban was swept");
    }
}
