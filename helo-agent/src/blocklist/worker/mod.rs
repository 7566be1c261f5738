//! Bans requested by sessions, applied off the async path: a thread owns the [`Blocklist`]
//! (map writes are syscalls) and takes requests over a channel that never blocks the sender.
//! Repeat offenders get longer bans ([`Offenders`], pure). A rule's ban is never thrown away:
//! the requests queue, in order, however many arrive at once (a storm of forging bots), and
//! the doors hold each client until the worker has written its ban ([`BanSender::applied`];
//! the court's hold). Everything else that reaches the worker (an admin's command, the fleet's
//! events) waits in a bounded share of the queue and is refused beyond it. The worker warns
//! when a ban map fills past half, long before the kernel's LRU evicts a ban in force. The
//! worker also sweeps expired bans from the store at start and
//! every minute, saves the snapshot (see [`super::snapshot`]) [`SAVE_AFTER_CHANGE`] after bans
//! change, every `snapshot_interval` and when it stops, and answers the control socket's
//! ban/unban/list, so one thread writes the maps. The ban gauges are set from a full walk at
//! start, at each sweep and each snapshot, and moved by each ban and unban in between.
//!
//! With a fleet, the worker's fleet half (`fleet.rs`) hands every ban and unban made here to
//! the fleet task, and applies the bans other gateways made.

mod fleet;
mod passes;

pub use fleet::Spared;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helo_common::BanValue;
use ipnet::IpNet;

use super::offenders::Offenders;
use super::snapshot::{self, SavedOffence, SnapshotError};
use super::{BanEntry, BanStore, Blocklist, StoreError, Ttl};
use crate::addr::BanTarget;
use crate::clock::Now;
use crate::config::Escalation;
use crate::fleet::message::{BanRecord, Event};
use crate::metrics::Metrics;

/// How often expired bans whose source never came back are swept from the store (the kernel
/// removes the others when they come back).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How long after the first change to the bans (since the last save) the snapshot is written.
/// Changes in that time are saved together, so a burst of bans costs one write (a walk of the
/// maps and an fsync) and a crash (kill -9, power loss) loses at most this much of them.
pub const SAVE_AFTER_CHANGE: Duration = Duration::from_secs(5);

/// Messages other than rule bans (admin commands, the fleet's events) waiting at most; beyond,
/// they are refused (the fleet task waits and retries, an admin is told to try again). Rule
/// bans are never refused: each waits as long as the worker is behind, about 150 bytes (the
/// address, the TTL, the reason), and the worker writes some 200k a second.
const QUEUE: usize = 4096;

/// Rule bans waiting, at which the worker warns (then at each doubling): it is behind.
const BEHIND: u64 = 1024;

#[derive(Debug)]
pub struct BanRequest {
    pub client: IpAddr,
    /// What the ban covers: the client's address, or a prefix around it (`bans.prefix_v4`,
    /// `bans.prefix_v6`); its offences are counted under it.
    pub target: BanTarget,
    /// The rule's TTL, before escalation.
    pub ttl: Duration,
    pub reason: String,
}

/// An admin's request (the control socket), answered with an [`AdminAnswer`].
#[derive(Debug)]
pub enum AdminCommand {
    /// A manual ban: no escalation.
    Ban {
        target: BanTarget,
        ttl: Ttl,
        reason: String,
    },
    /// Lifts a ban and forgets the address's offences.
    Unban {
        target: BanTarget,
    },
    List,
    /// The steering passes in force.
    Passes,
    /// Removes every steering pass inside a network (a host is a /32 or a /128).
    RemovePasses {
        net: IpNet,
    },
}

/// The worker's answer to an [`AdminCommand`], variant for variant.
#[derive(Debug)]
pub enum AdminAnswer {
    Banned(BanValue),
    /// Whether there was a ban to lift.
    Unbanned(bool),
    Listed(Vec<BanEntry>),
    Passes(Vec<crate::blocklist::passes::PassEntry>),
    /// How many passes went.
    PassesRemoved(usize),
}

/// Why an admin's command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the ban worker is busy or gone: try again")]
    Busy,
    #[error("the ban worker stopped: the agent is shutting down or failed; see its log")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Message {
    /// A rule's ban, with its place in the queue (see [`Queue::requested`]).
    Offence(u64, BanRequest),
    Admin(AdminCommand, tokio::sync::oneshot::Sender<Result<AdminAnswer, WorkerError>>),
    /// Boxed: the guards' sets would make every message as large.
    Reconfigure(Escalation, Box<Spared>),
    /// A steering pass for an honest sender, for this long.
    Pass(IpAddr, Duration),
    /// Bans and unbans other gateways made.
    Remote(Vec<Event>, Arrival),
    /// Every ban held, as the fleet records it (to put back into a Redis that lost them).
    Export(tokio::sync::oneshot::Sender<Vec<BanRecord>>),
    Stop,
}

/// How remote events reached this gateway: as they happened (logged one by one), or in a
/// catch-up on what Redis holds (logged as a summary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    Live,
    CatchUp,
}

/// The worker's side of the fleet: this gateway's name and where its own bans and unbans go.
pub struct FleetLink {
    pub node: String,
    pub events: tokio::sync::mpsc::Sender<Event>,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct BanSender {
    tx: Sender<Message>,
    queue: Arc<Queue>,
}

/// What waits for the worker, shared by every sender and the worker.
#[derive(Default)]
struct Queue {
    /// Rule bans requested so far: the place in the queue of the latest. Taken with the
    /// request sent under [`Queue::order`], so places are in the order the worker takes them.
    requested: AtomicU64,
    /// Rule bans the worker has taken (written, or failed and logged): the place of the latest.
    applied: AtomicU64,
    /// Other messages waiting (at most [`QUEUE`]).
    others: AtomicUsize,
    order: Mutex<()>,
}

impl BanSender {
    fn new(tx: Sender<Message>) -> Self {
        BanSender { tx, queue: Arc::default() }
    }

    /// Queues a rule's ban, behind those requested before; never blocks, never drops it. Its
    /// place in the queue ([`BanSender::applied`] says when the worker has taken it); `None`
    /// when the worker has gone (the agent is stopping; logged).
    pub fn ban(&self, request: BanRequest) -> Option<u64> {
        let _order = self.queue.order.lock().expect("ban queue lock");
        let place = self.queue.requested.load(Ordering::Relaxed) + 1;
        match self.tx.send(Message::Offence(place, request)) {
            Ok(()) => {
                self.queue.requested.store(place, Ordering::Release);
                Some(place)
            }
            Err(std::sync::mpsc::SendError(Message::Offence(_, r))) => {
                tracing::error!(client = %r.client, "the ban worker is gone (the agent is stopping): ban not written");
                None
            }
            Err(_) => None,
        }
    }

    /// Queues a steering pass for `client` (see `crate::blocklist::passes`); never blocks. A
    /// pass lost to a full queue costs nothing but the client's next judging.
    pub fn pass(&self, client: IpAddr, ttl: Duration) {
        let _ = self.send(Message::Pass(client, ttl));
    }

    /// Whether the worker has taken the rule ban queued at `place` (see [`BanSender::ban`]).
    pub fn applied(&self, place: u64) -> bool {
        self.queue.applied.load(Ordering::Acquire) >= place
    }

    /// Whether every rule ban requested has been taken.
    pub fn idle(&self) -> bool {
        let queue = &self.queue;
        queue.applied.load(Ordering::Acquire) >= queue.requested.load(Ordering::Acquire)
    }

    /// Rule bans waiting for the worker now.
    pub fn waiting(&self) -> u64 {
        let queue = &self.queue;
        queue
            .requested
            .load(Ordering::Acquire)
            .saturating_sub(queue.applied.load(Ordering::Acquire))
    }

    /// Sends a message other than a rule's ban: refused when [`QUEUE`] of them wait
    /// (`Refused::Full`) or the worker has gone.
    fn send(&self, message: Message) -> Result<(), Refused> {
        if self.queue.others.load(Ordering::Acquire) >= QUEUE {
            return Err(Refused::Full(message));
        }
        self.queue.others.fetch_add(1, Ordering::AcqRel);
        self.tx.send(message).map_err(|_| {
            self.queue.others.fetch_sub(1, Ordering::AcqRel);
            Refused::Gone
        })
    }

    /// Runs an admin command on the worker and waits for its answer.
    pub async fn command(&self, command: AdminCommand) -> Result<AdminAnswer, WorkerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Message::Admin(command, reply)).map_err(|_| WorkerError::Busy)?;
        answer.await.map_err(|_| WorkerError::Stopped)?
    }

    /// New escalation settings and what remote bans spare (a reload).
    pub fn reconfigure(&self, escalation: Escalation, spared: Spared) {
        // A reload is rare: it waits its turn past the bound rather than be lost.
        self.queue.others.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(Message::Reconfigure(escalation, Box::new(spared))).is_err() {
            self.queue.others.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Hands remote events to the worker without blocking: `Err` gives them back when
    /// [`QUEUE`] messages other than rule bans wait (the caller, the fleet task, waits and
    /// retries; it is off the session path).
    pub fn remote(&self, events: Vec<Event>, arrival: Arrival) -> Result<(), Vec<Event>> {
        match self.send(Message::Remote(events, arrival)) {
            Ok(()) => Ok(()),
            Err(Refused::Full(Message::Remote(events, _))) => Err(events),
            Err(_) => Ok(()), // the worker is gone: the agent is stopping
        }
    }

    /// Every ban held, as fleet records.
    pub async fn export(&self) -> Result<Vec<BanRecord>, WorkerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Message::Export(reply)).map_err(|_| WorkerError::Busy)?;
        answer.await.map_err(|_| WorkerError::Stopped)
    }
}

/// Why a message other than a rule's ban was not sent.
enum Refused {
    /// [`QUEUE`] such messages wait: here it is back.
    Full(Message),
    Gone,
}

/// The worker thread; [`Worker::stop`] saves the snapshot and joins it.
pub struct Worker<S> {
    tx: Sender<Message>,
    handle: std::thread::JoinHandle<Blocklist<S>>,
}

impl<S> Worker<S> {
    /// Asks the worker to finish (after the requests already queued), save, and return.
    pub fn stop(self) -> Blocklist<S> {
        let _ = self.tx.send(Message::Stop);
        self.handle.join().expect("the ban worker panicked")
    }
}

/// Everything the worker starts with.
pub struct Options {
    pub escalation: Escalation,
    /// CLOCK_BOOTTIME ns; tests pass a fake.
    pub clock: fn() -> u64,
    /// Where and how often to save; `None`: never.
    pub snapshot: Option<(PathBuf, Duration)>,
    pub metrics: Option<Arc<Metrics>>,
    /// Offences restored from a snapshot: target, count, last offence (boot ns).
    pub history: Vec<(BanTarget, u32, u64)>,
    /// The gateways that made the restored bans made elsewhere.
    pub origins: Vec<(BanTarget, String)>,
    /// `None`: no fleet.
    pub fleet: Option<FleetLink>,
    /// Remote bans of these addresses are refused.
    pub spared: Spared,
    /// The judge's pregreet passes, saved with each snapshot; `None`: none saved.
    pub passes: Option<Arc<crate::passes::PassCache>>,
    /// The steering door's pass maps (written, taken away by every ban, saved with each
    /// snapshot); `None`: steering is off.
    pub steer: Option<Box<dyn crate::blocklist::passes::PassStore>>,
}

impl Options {
    pub fn new(escalation: Escalation, clock: fn() -> u64) -> Self {
        Options {
            escalation,
            clock,
            snapshot: None,
            metrics: None,
            history: Vec::new(),
            origins: Vec::new(),
            fleet: None,
            spared: Spared::default(),
            passes: None,
            steer: None,
        }
    }
}

/// Starts the worker; it runs until [`Worker::stop`] or until every sender is dropped, then
/// returns the blocklist.
pub fn spawn<S: BanStore + Send + 'static>(
    store: S,
    escalation: Escalation,
    clock: fn() -> u64,
) -> (BanSender, std::thread::JoinHandle<Blocklist<S>>) {
    let (tx, rx) = channel();
    let sender = BanSender::new(tx);
    let queue = sender.queue.clone();
    let options = Options::new(escalation, clock);
    let handle = std::thread::Builder::new()
        .name("helo-bans".into())
        .spawn(move || State::new(Blocklist::new(store), options, queue).run(rx))
        .expect("spawn the ban worker thread");
    (sender, handle)
}

/// [`spawn`] with snapshots, metrics and a restored history; stopped with [`Worker::stop`].
pub fn start<S: BanStore + Send + 'static>(
    list: Blocklist<S>,
    options: Options,
) -> (BanSender, Worker<S>) {
    let (tx, rx) = channel();
    let sender = BanSender::new(tx.clone());
    let queue = sender.queue.clone();
    let handle = std::thread::Builder::new()
        .name("helo-bans".into())
        .spawn(move || State::new(list, options, queue).run(rx))
        .expect("spawn the ban worker thread");
    (sender, Worker { tx, handle })
}

struct State<S> {
    list: Blocklist<S>,
    options: Options,
    offenders: Offenders,
    queue: Arc<Queue>,
    /// Rule bans waiting at the last warning that the worker is behind (0: none since).
    behind: u64,
    /// The fill of each ban map, in quarters, at its last warning (see [`State::warn_fill`]).
    fill_warned: HashMap<&'static str, u8>,
    /// Entries in each ban map (by [`BanTarget::map`]): counted by each walk, moved by each
    /// change.
    entries: HashMap<&'static str, usize>,
    /// When the bans first changed since the last save (boot ns); `None`: nothing unsaved.
    unsaved: Option<u64>,
    /// The gateway each ban from elsewhere came from; bans made here are not listed.
    origins: HashMap<BanTarget, Arc<str>>,
    /// Events the fleet queue had no room for, since the last warning.
    unpublished: u64,
}

impl<S: BanStore> State<S> {
    fn new(list: Blocklist<S>, mut options: Options, queue: Arc<Queue>) -> Self {
        let restored = std::mem::take(&mut options.history);
        let offenders = Offenders::new(options.escalation, restored);
        let origins = std::mem::take(&mut options.origins)
            .into_iter()
            .map(|(target, node)| (target, Arc::from(node)))
            .collect();
        State {
            list,
            options,
            offenders,
            queue,
            behind: 0,
            fill_warned: HashMap::new(),
            entries: HashMap::new(),
            unsaved: None,
            origins,
            unpublished: 0,
        }
    }

    fn run(mut self, rx: Receiver<Message>) -> Blocklist<S> {
        let clock = self.options.clock;
        let every = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let sweep_ns = every(SWEEP_EVERY);
        let save_ns = self.options.snapshot.as_ref().map_or(u64::MAX, |(_, d)| every(*d));
        let after_change_ns = every(SAVE_AFTER_CHANGE);
        // The first sweep at once: it sets the gauges from the maps as the agent found them.
        let mut next_sweep = clock();
        let mut next_save = clock().saturating_add(save_ns);
        loop {
            let now = clock();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now.saturating_add(sweep_ns);
            }
            let save_due = self.unsaved.map_or(u64::MAX, |t| t.saturating_add(after_change_ns));
            if now >= next_save || now >= save_due {
                self.save_logged();
                next_save = now.saturating_add(save_ns);
            }
            let save_due = self.unsaved.map_or(u64::MAX, |t| t.saturating_add(after_change_ns));
            let wait = next_sweep.min(next_save).min(save_due).saturating_sub(now);
            let message = rx.recv_timeout(Duration::from_nanos(wait));
            if matches!(&message, Ok(m) if !matches!(m, Message::Offence(..) | Message::Stop)) {
                self.queue.others.fetch_sub(1, Ordering::AcqRel);
            }
            match message {
                Ok(Message::Offence(place, request)) => {
                    self.offence(request);
                    self.queue.applied.store(place, Ordering::Release);
                    self.note_queue(place);
                }
                Ok(Message::Admin(command, reply)) => {
                    let _ = reply.send(self.command(command));
                }
                Ok(Message::Reconfigure(escalation, spared)) => {
                    self.offenders.reconfigure(escalation);
                    self.options.spared = *spared;
                }
                Ok(Message::Remote(events, arrival)) => self.remote(events, arrival),
                Ok(Message::Pass(client, ttl)) => self.grant_pass(client, ttl),
                Ok(Message::Export(reply)) => {
                    let _ = reply.send(self.export());
                }
                Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        self.save_logged();
        self.list
    }

    /// Removes expired bans and counts what is left, from one walk of the maps.
    fn sweep(&mut self, now: u64) {
        let entries = match self.list.store().entries() {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "sweeping expired bans failed");
                return;
            }
        };
        match self.list.remove_expired(&entries, now) {
            Ok(0) => {}
            Ok(purged) => {
                tracing::debug!(purged, "expired bans swept");
                if let Some(m) = &self.options.metrics {
                    m.bans_swept.inc_by(purged as u64);
                }
            }
            Err(error) => tracing::warn!(%error, "sweeping expired bans failed"),
        }
        let left: Vec<_> = entries.into_iter().filter(|(_, v)| v.active_at(now)).collect();
        if let Err(error) = self.list.keep_lengths(&left) {
            tracing::warn!(%error, "updating the prefix lengths the kernel looks up failed");
        }
        if !self.origins.is_empty() {
            let held: std::collections::HashSet<_> = left.iter().map(|(t, _)| *t).collect();
            self.origins.retain(|target, _| held.contains(target));
        }
        self.count_entries(&left, now);
        self.count_passes(&self.pass_entries());
    }

    /// Sets the entry counts and the ban gauges from `entries`, the maps' content as last
    /// listed, and warns of a map filling up.
    fn count_entries(&mut self, entries: &[(BanTarget, helo_common::BanValue)], now: u64) {
        let mut counts: HashMap<&'static str, usize> =
            BanTarget::MAPS.iter().map(|name| (*name, 0)).collect();
        for (target, _) in entries {
            *counts.entry(target.map()).or_default() += 1;
        }
        for (name, n) in &counts {
            self.warn_fill(name, *n);
        }
        self.entries = counts;
        let Some(metrics) = &self.options.metrics else { return };
        let active = entries.iter().filter(|(_, v)| v.active_at(now)).count();
        crate::metrics::set_gauge(&metrics.bans_active, active);
        for (name, n) in &self.entries {
            let labels = crate::metrics::NameLabels { name };
            crate::metrics::set_gauge(&metrics.map_entries.get_or_create(&labels), *n);
        }
        for (name, capacity) in self.list.store().capacities() {
            let labels = crate::metrics::NameLabels { name };
            crate::metrics::set_gauge(&metrics.map_capacity.get_or_create(&labels), capacity);
        }
    }

    /// Keeps the counts and gauges current between walks, from what the store held for one
    /// target `before` and `after` a change, and notes the change for the snapshot. Between
    /// walks they miss only what happens without the worker: bans expiring (`bans_active`),
    /// the kernel removing expired entries and LRU evictions (`map_entries`).
    fn changed(&mut self, target: &BanTarget, before: Option<BanValue>, after: Option<BanValue>) {
        self.mark_unsaved();
        if after.is_some() {
            // Every ban applied passes through here (a rule's, an admin's, another gateway's).
            self.revoke_passes(target);
        }
        let now = (self.options.clock)();
        let name = target.map();
        let count = self.entries.entry(name).or_default();
        match (before.is_some(), after.is_some()) {
            (false, true) => *count += 1,
            (true, false) => *count = count.saturating_sub(1),
            _ => {}
        }
        let count = *count;
        self.warn_fill(name, count);
        let Some(metrics) = &self.options.metrics else { return };
        let step = |gauge: &prometheus_client::metrics::gauge::Gauge, was: bool, is: bool| {
            if is && !was {
                gauge.inc();
            } else if was && !is {
                gauge.dec();
            }
        };
        let active = |v: &Option<BanValue>| v.is_some_and(|v| v.active_at(now));
        step(&metrics.bans_active, active(&before), active(&after));
        let labels = crate::metrics::NameLabels { name };
        crate::metrics::set_gauge(&metrics.map_entries.get_or_create(&labels), count);
    }

    /// Notes a change the snapshot does not hold yet: it is saved [`SAVE_AFTER_CHANGE`] after
    /// the first one.
    fn mark_unsaved(&mut self) {
        if self.options.snapshot.is_some() && self.unsaved.is_none() {
            self.unsaved = Some((self.options.clock)());
        }
    }

    /// After the rule ban at `place`: the queue gauge, and a warning when the worker is
    /// behind ([`BEHIND`] bans waiting, then each doubling; once more when it has caught up).
    fn note_queue(&mut self, place: u64) {
        let waiting = self.queue.requested.load(Ordering::Acquire).saturating_sub(place);
        if let Some(m) = &self.options.metrics {
            crate::metrics::set_gauge(&m.ban_queue, waiting as usize);
        }
        if waiting >= BEHIND && waiting >= self.behind.saturating_mul(2) {
            self.behind = waiting;
            tracing::warn!(
                waiting,
                "the ban worker is behind: {waiting} rule bans wait to be written (none is \
                 dropped; the doors refuse their clients meanwhile)"
            );
        } else if waiting == 0 && self.behind > 0 {
            self.behind = 0;
            tracing::info!("the ban worker has caught up: every rule ban is written");
        }
    }

    /// Warns when a ban map fills past a half, three quarters and nine tenths of its
    /// capacity (once per level, again after it fell below): when full, the kernel evicts the
    /// least recently used bans, in force or not, and a bot whose ban went comes back.
    fn warn_fill(&mut self, map: &'static str, entries: usize) {
        let Some(capacity) = self.capacity(map) else { return };
        let level = match entries.saturating_mul(20) / capacity.max(1) {
            18.. => 3,
            15..=17 => 2,
            10..=14 => 1,
            _ => 0,
        };
        let warned = self.fill_warned.entry(map).or_insert(0);
        if level > *warned {
            let percent = entries.saturating_mul(100) / capacity.max(1);
            tracing::warn!(
                map,
                entries,
                capacity,
                "ban map {map} is {percent}% full ({entries} of {capacity}): when it is full \
                 the kernel evicts the least recently used bans, even bans in force; raise its \
                 capacity in [xdp] (a pinned map keeps its size until it is removed) or shorten \
                 bans.default_ttl"
            );
        }
        *warned = level;
    }

    /// The capacity of the ban map `map`, as the store reports it.
    fn capacity(&self, map: &'static str) -> Option<usize> {
        self.list.store().capacities().into_iter().find(|(name, _)| *name == map).map(|(_, c)| c)
    }

    fn offence(&mut self, request: BanRequest) {
        let now = (self.options.clock)();
        let target = request.target;
        let (count, ttl) = self.offenders.offend(target, request.ttl, now);
        let before = self.list.store().get(&target).ok().flatten();
        match self.list.ban(&target, Ttl::For(ttl), &request.reason, now) {
            Ok(value) => {
                self.changed(&target, before, Some(value));
                self.origins.remove(&target);
                if let Some(m) = &self.options.metrics {
                    m.bans_added.inc();
                }
                tracing::info!(
                    client = %request.client,
                    %target,
                    ttl = %crate::duration::format(ttl),
                    offence = count,
                    reason = request.reason,
                    "banned"
                );
                self.publish_ban(target, value, &request.reason, count);
            }
            Err(error) => tracing::error!(client = %request.client, %error, "ban failed"),
        }
    }

    fn command(&mut self, command: AdminCommand) -> Result<AdminAnswer, WorkerError> {
        let now = (self.options.clock)();
        match command {
            AdminCommand::Ban { target, ttl, reason } => {
                let before = self.list.store().get(&target).ok().flatten();
                let value = self.list.ban(&target, ttl, &reason, now)?;
                self.changed(&target, before, Some(value));
                self.origins.remove(&target);
                if let Some(m) = &self.options.metrics {
                    m.bans_added.inc();
                }
                tracing::info!(%target, reason, "banned by an admin");
                self.publish_ban(target, value, &reason, 0);
                Ok(AdminAnswer::Banned(value))
            }
            AdminCommand::Unban { target } => {
                let was = self.lift(&target)?;
                tracing::info!(%target, was_banned = was, "unbanned by an admin");
                // Published even when not banned here: another gateway may hold it.
                self.publish_unban(target);
                Ok(AdminAnswer::Unbanned(was))
            }
            AdminCommand::List => {
                let mut entries = self.list.list(now)?;
                if self.options.fleet.is_some() {
                    for entry in &mut entries {
                        let target = entry.target.parse().ok();
                        let origin = target.and_then(|t| self.origins.get(&t));
                        entry.origin = origin.map(|node| node.to_string());
                    }
                }
                Ok(AdminAnswer::Listed(entries))
            }
            AdminCommand::Passes => Ok(AdminAnswer::Passes(self.list_passes()?)),
            AdminCommand::RemovePasses { net } => {
                Ok(AdminAnswer::PassesRemoved(self.remove_passes(&net, "admin")?))
            }
        }
    }

    /// Lifts a ban and forgets the offences (an unban, here or from the fleet); whether there
    /// was a ban.
    fn lift(&mut self, target: &BanTarget) -> Result<bool, StoreError> {
        let forgot = self.offenders.forget(target);
        self.origins.remove(target);
        let before = self.list.store().get(target).ok().flatten();
        let was = self.list.unban(target)?;
        if was {
            self.changed(target, before, None);
        } else if forgot {
            self.mark_unsaved();
        }
        Ok(was)
    }

    /// Saves the snapshot to `path`; the number of bans saved.
    fn save(&mut self, path: &std::path::Path) -> Result<usize, SnapshotError> {
        let now = Now { boot_ns: (self.options.clock)(), unix_ns: crate::clock::unix_ns() };
        let offences = self
            .offenders
            .iter()
            .map(|(target, o)| SavedOffence {
                target: target.to_string(),
                count: o.count,
                last_unix: snapshot::boot_to_unix(o.last_ns, now) / 1_000_000_000,
            })
            .collect();
        self.unsaved = None;
        let entries = self.list.store().entries()?;
        let origin = |target: &BanTarget| self.origins.get(target).map(|node| node.to_string());
        let mut captured = snapshot::capture(&self.list, &entries, offences, &origin, now)?;
        if let Some(passes) = &self.options.passes {
            captured.passes = passes.saved(now.unix_ns / 1_000_000_000);
        }
        let steer_passes = self.pass_entries();
        captured.steer_passes = crate::blocklist::passes::saved(&steer_passes, now);
        self.count_passes(&steer_passes);
        snapshot::save(path, &captured)?;
        self.count_entries(&entries, now.boot_ns);
        Ok(captured.bans.len())
    }

    fn save_logged(&mut self) {
        let Some((path, _)) = self.options.snapshot.clone() else { return };
        let started = std::time::Instant::now();
        let result = self.save(&path);
        if let Some(m) = &self.options.metrics {
            let result = if result.is_ok() { "ok" } else { "error" };
            m.snapshots.get_or_create(&crate::metrics::ResultLabels { result }).inc();
        }
        match result {
            Ok(bans) => tracing::debug!(
                bans,
                ms = started.elapsed().as_millis() as u64,
                "ban snapshot saved"
            ),
            Err(error) => tracing::error!(%error, "ban snapshot not saved"),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::blocklist::fake::FakeStore;

    pub(super) const ESCALATION: Escalation =
        Escalation { factor: 2, max_ttl: Duration::from_secs(8 * 3600), history: 2 };

    /// Issue 29: in a storm of 1500 forging bots, `bans.max_per_second = 100` dropped 397
    /// bans ("ban rate cap reached: ban dropped") and 380 of those bots delivered on their
    /// return. A wave far beyond that rate, at one instant, is banned whole, in order.
    #[test]
    fn a_storm_of_bans_at_one_instant_is_applied_whole_never_dropped() {
        static FROZEN: AtomicU64 = AtomicU64::new(5_000_000_000);
        fn frozen() -> u64 {
            FROZEN.load(Ordering::Relaxed)
        }
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let metrics = Arc::new(Metrics::default());
        let options =
            Options { metrics: Some(metrics.clone()), ..Options::new(ESCALATION, frozen) };
        let (bans, worker) = start(Blocklist::new(store.clone()), options);
        let storm: Vec<String> = (0..3000u32)
            .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff))
            .collect();
        for ip in &storm {
            assert!(bans.ban(request(ip)).is_some(), "{ip}: the request is taken");
        }
        sync(&bans);
        let held = store.entries().unwrap().len();
        assert_eq!(held, storm.len(), "every ban of the storm is in the map");
        assert_eq!(metrics.bans_added.get(), storm.len() as u64);
        drop(bans);
        worker.stop();
    }

    static NOW: AtomicU64 = AtomicU64::new(0);
    pub(super) fn now() -> u64 {
        NOW.load(Ordering::Relaxed)
    }

    #[test]
    fn the_worker_escalates_repeat_offenders_and_forgets_in_lru_order() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, worker) = spawn(store.clone(), ESCALATION, now);
        let ban = |ip: &str| {
            assert!(
                bans.ban(BanRequest {
                    client: ip.parse().unwrap(),
                    target: BanTarget::host(ip.parse().unwrap()),
                    ttl: Duration::from_secs(3600),
                    reason: "forged_identity".into(),
                })
                .is_some()
            )
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
            target: BanTarget::host("198.51.100.77".parse().unwrap()),
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

    /// Waits until the worker has handled everything sent before (a `list` round trip).
    pub(super) fn sync(bans: &BanSender) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(bans.command(AdminCommand::List)).expect("the worker answers");
    }

    pub(super) fn request(ip: &str) -> BanRequest {
        let client = ip.parse().unwrap();
        BanRequest {
            client,
            target: BanTarget::host(client),
            ttl: Duration::from_secs(3600),
            reason: "x".into(),
        }
    }

    /// The judge's pregreet passes ride along in the ban snapshot, which the worker writes.
    #[test]
    fn the_snapshot_carries_the_pregreet_passes() {
        let dir = std::env::temp_dir().join(format!("helo-worker-passes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        let passes = Arc::new(crate::passes::PassCache::new(10));
        let unix = crate::clock::unix_ns() / 1_000_000_000;
        passes.pass("203.0.113.9".parse().unwrap(), unix, Duration::from_secs(86_400), 10);
        let options = Options {
            snapshot: Some((path.clone(), Duration::from_secs(3600))),
            passes: Some(passes),
            ..Options::new(ESCALATION, now)
        };
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        drop(bans);
        worker.stop();
        let snapshot::Loaded::Good(saved) =
            snapshot::load(&path, Now { boot_ns: 0, unix_ns: 0 }).unwrap()
        else {
            panic!("a good snapshot")
        };
        assert_eq!(
            saved.passes,
            [snapshot::SavedPass { client: "203.0.113.9".into(), until_unix: unix + 86_400 }]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After `kill -9` the snapshot held 0 of 260 bans in force: it was written only every
    /// `snapshot_interval` (5 minutes) and at a clean stop.
    #[test]
    fn bans_reach_the_snapshot_soon_after_they_change_one_write_per_burst() {
        static CLOCK: AtomicU64 = AtomicU64::new(1_000_000_000);
        fn clock() -> u64 {
            CLOCK.load(Ordering::Relaxed)
        }
        let advance = || {
            CLOCK.fetch_add(u64::try_from(SAVE_AFTER_CHANGE.as_nanos()).unwrap(), Ordering::Relaxed)
        };
        let dir = std::env::temp_dir().join(format!("helo-worker-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bans.json");
        let metrics = Arc::new(Metrics::default());
        let options = Options {
            snapshot: Some((path.clone(), Duration::from_secs(3600))),
            metrics: Some(metrics.clone()),
            ..Options::new(ESCALATION, clock)
        };
        let (bans, worker) = start(Blocklist::new(FakeStore::default()), options);
        let saves = || {
            metrics.snapshots.get_or_create(&crate::metrics::ResultLabels { result: "ok" }).get()
        };
        let saved = || match snapshot::load(&path, Now { boot_ns: 0, unix_ns: 0 }).unwrap() {
            snapshot::Loaded::Good(snapshot) => snapshot.bans.len(),
            other => panic!("no good snapshot: {other:?}"),
        };

        for i in 1..=50 {
            assert!(bans.ban(request(&format!("203.0.113.{i}"))).is_some());
        }
        sync(&bans);
        assert_eq!(saves(), 0, "a burst is saved once, SAVE_AFTER_CHANGE after its first ban");
        advance();
        sync(&bans); // wakes the worker, which then saves
        sync(&bans);
        assert_eq!(saves(), 1, "one write for the burst, long before the 1 h interval");
        assert_eq!(saved(), 50);

        assert!(bans.ban(request("198.51.100.1")).is_some());
        sync(&bans);
        assert_eq!(saves(), 1, "the next change waits its turn too");
        advance();
        sync(&bans);
        sync(&bans);
        assert_eq!(saves(), 2);
        assert_eq!(saved(), 51);

        advance();
        sync(&bans);
        sync(&bans);
        assert_eq!(saves(), 2, "nothing changed: nothing written");
        drop(bans);
        worker.stop();
        assert_eq!(saves(), 3, "and once more at the stop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `bans_active` and `map_entries` lagged up to a minute after start and after bursts: they
    /// were set only by the minute's sweep and by snapshots.
    #[test]
    fn the_ban_gauges_are_current_at_start_and_after_each_ban_and_unban() {
        const SEC: u64 = 1_000_000_000;
        fn clock() -> u64 {
            100 * SEC
        }
        let mut list = Blocklist::new(FakeStore::default());
        let hour = Ttl::For(Duration::from_secs(3600));
        list.ban(&"192.0.2.1".parse().unwrap(), hour, "", 100 * SEC).unwrap();
        list.ban(&"2001:db8:1:2::/64".parse().unwrap(), Ttl::Forever, "", 0).unwrap();
        list.ban(&"192.0.2.2".parse().unwrap(), Ttl::For(Duration::from_secs(1)), "", 0).unwrap();
        let metrics = Arc::new(Metrics::default());
        let options = Options { metrics: Some(metrics.clone()), ..Options::new(ESCALATION, clock) };
        let (bans, worker) = start(list, options);
        let gauges = || {
            let entries = |name| {
                metrics.map_entries.get_or_create(&crate::metrics::NameLabels { name }).get()
            };
            (metrics.bans_active.get(), entries("v4"), entries("v6"), entries("v6_net"))
        };
        sync(&bans);
        assert_eq!(gauges(), (2, 1, 0, 1), "right after start (the expired ban swept)");

        assert!(bans.ban(request("2001:db8:9::1")).is_some());
        sync(&bans);
        assert_eq!(gauges(), (3, 1, 1, 1), "after a rule's ban");
        assert!(bans.ban(request("2001:db8:9::1")).is_some());
        sync(&bans);
        assert_eq!(gauges(), (3, 1, 1, 1), "a repeat offence replaces its ban");

        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let command = |command| runtime.block_on(bans.command(command)).unwrap();
        command(AdminCommand::Unban { target: "192.0.2.1".parse().unwrap() });
        assert_eq!(gauges(), (2, 0, 1, 1), "after an unban");
        command(AdminCommand::Unban { target: "192.0.2.1".parse().unwrap() });
        assert_eq!(gauges(), (2, 0, 1, 1), "unbanning what is not banned changes nothing");
        command(AdminCommand::Ban {
            target: "192.0.2.3".parse().unwrap(),
            ttl: hour,
            reason: "".into(),
        });
        assert_eq!(gauges(), (3, 1, 1, 1), "after an admin's ban");
        drop(bans);
        worker.stop();
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
            target: BanTarget::host(ip.parse().unwrap()),
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
