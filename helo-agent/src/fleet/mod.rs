//! Several gateways, one memory: every ban and unban made here is shared with the other
//! gateways of the fleet through Redis, and theirs are applied here, in the kernel maps, with
//! the same expiry.
//!
//! One task owns the Redis connections. The ban worker hands it this gateway's bans and unbans
//! over a bounded queue it never waits on, and it hands the worker the others' (see
//! `blocklist::worker`). Sessions and local bans never wait on Redis: with Redis down or slow,
//! bans go on locally, events wait in a bounded outbox, and the task reconnects with backoff.
//!
//! Redis holds state, not only messages. Each ban is a key (`<prefix>ban:<target>`, the
//! record as JSON, expiring with the ban or with its offence history, whichever is later); an
//! unban replaces the record with the unban's (kept [`UNBAN_KEPT`]), so a gateway that was
//! away when it was published still lifts the ban when it catches up. Each change is also
//! published on `<prefix>events` for speed. On every (re)connection the task subscribes
//! first, then reads every key (catch-up: the records of targets this gateway changed since,
//! still in its outbox, are left for the outbox), then sends its outbox. An epoch key, set
//! once by the first gateway to reach a Redis and read again every 5 s, tells a Redis that
//! lost its data (restarted empty, flushed) from one that kept it: then every gateway puts
//! back the bans it holds (`SET NX`, so a newer record or an unban wins) and catches up
//! again. What a gateway receives it never publishes again; its own messages coming back on
//! the channel are skipped by the publishing process's id, so two gateways that share a node
//! name (cloned hosts) still hear each other, and are warned about it.
//!
//! With Redis Sentinel (`redis+sentinel://`, see [`endpoint`]) the master is asked of the
//! sentinels at every connection. When the master dies, the connections fail, and the task
//! asks again (at most 1 s apart) until the sentinels name the replica they promoted; there
//! it subscribes, catches up and sends its outbox like after any outage, and puts back the
//! bans it holds (`SET NX`), since a replica may miss the master's last writes. A node that
//! answers `READONLY` was demoted under a live connection: that connection counts as lost,
//! the event it refused stays in the outbox, and the master is asked for again.
//!
//! Not covered: an unban made while a gateway was cut off from Redis for longer than
//! [`UNBAN_KEPT`] does not reach it; it keeps that ban until it expires (unban again there).
//! An unban that a dying master took but had not yet passed to its replica is lost with it.

pub mod endpoint;
pub mod message;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use tokio::sync::mpsc;

use crate::blocklist::worker::{Arrival, BanSender};
use crate::config::FleetConfig;
use crate::metrics::Metrics;
use message::{BanRecord, Event, Keys};

/// This gateway's events waiting for the fleet task; the worker drops (and counts) beyond.
const QUEUE: usize = 4096;
/// Events kept while Redis is unreachable; beyond, the oldest are dropped, and on reconnection
/// every ban held here is put back instead.
const OUTBOX: usize = 100_000;
/// How long an unban's record stays in Redis for the gateways that were away when it was
/// published (as long as a rule's ban lasts at most by default, `bans.max_ttl`).
pub const UNBAN_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The connection is checked this often (the epoch read again), so a dead peer, and a Redis
/// that lost its data under a live connection, are noticed.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Keys asked for per SCAN step and read per MGET; events written per round trip.
const BATCH: usize = 1000;

/// The queue from the ban worker to the fleet task.
pub fn queue() -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    mpsc::channel(QUEUE)
}

/// Why a connection to Redis ended or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{operation}: {source}")]
    Redis { operation: &'static str, source: redis::RedisError },
    #[error("{operation}: no answer within {timeout:?} (fleet.timeout)")]
    Timeout { operation: &'static str, timeout: Duration },
    #[error("the subscription ended: Redis closed the connection")]
    Unsubscribed,
    #[error("Redis lost its data (the epoch key changed or is gone): putting back and catching up")]
    EpochChanged,
    #[error(
        "{operation}: the node is a replica now (READONLY): the master moved, asking for it again"
    )]
    ReadOnly { operation: &'static str },
    #[error("asking the sentinels for the master: {0}")]
    Discovery(redis::RedisError),
}

/// The fleet task: see the module's documentation.
pub struct Fleet {
    config: FleetConfig,
    keys: Keys,
    bans: BanSender,
    metrics: Arc<Metrics>,
    outbox: VecDeque<Event>,
    /// The outbox dropped events: put back everything held at the next connection.
    overflowed: bool,
    /// The epoch last seen in Redis.
    epoch: Option<String>,
    /// This agent process, in every message it publishes.
    instance: String,
    /// Whether another gateway was heard using this node name (warned once).
    twin_warned: bool,
    /// The master last connected to (`host:port`).
    master: Option<String>,
}

/// An open link to Redis: a connection for commands and one subscribed to the channel.
struct Link {
    commands: redis::aio::MultiplexedConnection,
    messages: redis::aio::PubSubStream,
}

impl Fleet {
    pub fn new(config: FleetConfig, bans: BanSender, metrics: Arc<Metrics>) -> Self {
        let keys = Keys::new(&config.prefix);
        let instance =
            format!("{}/{}/{}", config.node, std::process::id(), crate::clock::unix_ns());
        Fleet {
            instance,
            twin_warned: false,
            config,
            keys,
            bans,
            metrics,
            outbox: VecDeque::new(),
            overflowed: false,
            epoch: None,
            master: None,
        }
    }

    /// Runs until the worker's side of the queue closes (the agent stops).
    pub async fn run(mut self, mut local: mpsc::Receiver<Event>) {
        let Some(url) = self.config.redis.clone() else { return };
        let endpoint = match endpoint::Endpoint::parse(url.expose()) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                tracing::error!(redis = %url, %error, "fleet off: fleet.redis does not read");
                return;
            }
        };
        if endpoint.tls() {
            // rustls needs a crypto provider; another part may have installed one already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let sentinel_password = self.config.sentinel_password.as_ref().map(|p| p.0.as_str());
        let mut discovery = match endpoint::Discovery::new(&endpoint, sentinel_password) {
            Ok(discovery) => discovery,
            Err(error) => {
                tracing::error!(redis = %url, %error, "fleet off: the Redis URL does not open");
                return;
            }
        };
        let backoff_range = discovery.backoff();
        let mut backoff = backoff_range.0;
        let mut down_since: Option<std::time::Instant> = None;
        loop {
            // Connecting and catching up are bounded by fleet.timeout per command; meanwhile
            // this gateway's events wait in the queue.
            let started = std::time::Instant::now();
            let connected = match self.connect(&mut discovery).await {
                Ok(mut link) => self.catch_up(&mut link).await.map(|bans| (link, bans)),
                Err(error) => Err(error),
            };
            match connected {
                Ok((mut link, bans)) => {
                    self.metrics.fleet.connected.set(1);
                    let ms = started.elapsed().as_millis() as u64;
                    let master = self.master.as_deref().unwrap_or_default();
                    match down_since.take() {
                        Some(since) => {
                            tracing::info!(redis = %url, master, node = self.config.node, down_ms = since.elapsed().as_millis() as u64, bans, ms, "fleet: Redis reachable again, caught up (bans: other gateways' records read)")
                        }
                        None => {
                            tracing::info!(redis = %url, master, node = self.config.node, bans, ms, "fleet: connected to Redis, caught up (bans: other gateways' records read)")
                        }
                    }
                    backoff = backoff_range.0;
                    let error = match self.serve(&mut link, &mut local).await {
                        None => return,
                        Some(error) => error,
                    };
                    self.metrics.fleet.connected.set(0);
                    if matches!(error, FleetError::EpochChanged) {
                        // Connected all along: put back and catch up at once.
                        tracing::warn!(redis = %url, "fleet: Redis lost its data under a live connection (flushed, or evicted under maxmemory)");
                        continue;
                    }
                    tracing::warn!(redis = %url, %error, "fleet: lost Redis; bans go on locally and are shared when it is back");
                    down_since = Some(std::time::Instant::now());
                }
                Err(error) => {
                    self.metrics.fleet.connected.set(0);
                    if down_since.is_none() {
                        tracing::warn!(redis = %url, %error, "fleet: cannot reach Redis (check fleet.redis: address, port, password; and that redis-server runs); bans go on locally, retrying with backoff");
                        down_since = Some(std::time::Instant::now());
                    } else {
                        tracing::debug!(redis = %url, %error, "fleet: Redis still unreachable");
                    }
                }
            }
            // Wait before the next attempt, still taking this gateway's events.
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    closed = self.buffer(&mut local) => if closed {
                        self.stopping_unshared();
                        return;
                    },
                }
            }
            backoff = (backoff * 2).min(backoff_range.1);
        }
    }

    /// The agent stops with Redis unreachable: what was not shared is said.
    fn stopping_unshared(&self) {
        if !self.outbox.is_empty() {
            tracing::warn!(
                events = self.outbox.len(),
                "fleet: stopping with bans and unbans made here not shared (Redis unreachable); they stay on this gateway"
            );
        }
    }

    /// Takes one event from the worker into the outbox; `true` when the queue has closed.
    async fn buffer(&mut self, local: &mut mpsc::Receiver<Event>) -> bool {
        match local.recv().await {
            Some(event) => {
                self.hold(event);
                false
            }
            None => true,
        }
    }

    fn hold(&mut self, event: Event) {
        if self.outbox.len() >= OUTBOX {
            self.outbox.pop_front();
            self.metrics.fleet.dropped.inc();
            if !self.overflowed {
                tracing::warn!(
                    kept = OUTBOX,
                    "fleet outbox full: the oldest events are dropped; every ban held here will be put back when Redis is reachable"
                );
            }
            self.overflowed = true;
        }
        self.outbox.push_back(event);
        crate::metrics::set_gauge(&self.metrics.fleet.outbox, self.outbox.len());
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        future: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, FleetError> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(classify(operation, source)),
            Err(_) => Err(FleetError::Timeout { operation, timeout }),
        }
    }

    /// Finds the master, connects, subscribes, and checks the epoch (putting back what is
    /// held when Redis lost its data, or when the master changed: a promoted replica may lack
    /// the old master's last writes).
    async fn connect(&mut self, discovery: &mut endpoint::Discovery) -> Result<Link, FleetError> {
        let timeout = self.config.timeout;
        let (client, master) = match tokio::time::timeout(timeout, discovery.master()).await {
            Ok(Ok(found)) => found,
            Ok(Err(source)) if discovery.is_sentinel() => {
                return Err(FleetError::Discovery(source));
            }
            Ok(Err(source)) => return Err(FleetError::Redis { operation: "connecting", source }),
            Err(_) => {
                return Err(FleetError::Timeout { operation: "asking for the master", timeout });
            }
        };
        let mut commands =
            self.timed("connecting", client.get_multiplexed_async_connection()).await?;
        let mut pubsub =
            self.timed("connecting for the channel", client.get_async_pubsub()).await?;
        self.timed("SUBSCRIBE", pubsub.subscribe(self.keys.channel())).await?;
        let mine = format!("{}-{}", self.config.node, crate::clock::unix_ns());
        let key = self.keys.epoch();
        let set: bool = self.timed("SET epoch", commands.set_nx(&key, &mine)).await?;
        let epoch: String = self.timed("GET epoch", commands.get(&key)).await?;
        let lost = match &self.epoch {
            Some(seen) => *seen != epoch,
            None => false,
        };
        let moved = self.master.as_ref().is_some_and(|before| *before != master);
        if moved {
            let before = self.master.as_deref().unwrap_or_default();
            tracing::warn!(
                from = before,
                to = master,
                "fleet: the Redis master moved (a failover); putting back the bans held here"
            );
            self.metrics.fleet.failed_over(crate::clock::unix_ns() / 1_000_000_000);
        }
        if lost || moved || self.overflowed {
            if lost {
                tracing::warn!(
                    created_here = set,
                    "fleet: Redis lost its data (a new epoch); putting back the bans held here"
                );
            }
            self.put_back(&mut commands).await?;
            self.overflowed = false;
        }
        self.epoch = Some(epoch);
        self.metrics.fleet.set_master(&master);
        self.master = Some(master);
        Ok(Link { commands, messages: pubsub.into_on_message() })
    }

    /// Writes every ban held here into Redis, keeping what Redis has (`SET NX`).
    async fn put_back(
        &self,
        commands: &mut redis::aio::MultiplexedConnection,
    ) -> Result<(), FleetError> {
        let held = self.bans.export().await.unwrap_or_default();
        let count = held.len();
        for chunk in held.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for record in chunk {
                set_record(&mut pipe, &self.keys, record, true);
            }
            self.timed("putting bans back", pipe.query_async::<()>(commands)).await?;
        }
        tracing::info!(bans = count, "fleet: bans held here put back into Redis");
        Ok(())
    }

    /// Reads every ban record in Redis and applies the others' (the worker keeps a longer ban
    /// it has), then sends the outbox; the number of records of other gateways read.
    async fn catch_up(&mut self, link: &mut Link) -> Result<usize, FleetError> {
        let pattern = self.keys.ban_pattern();
        // What this gateway changed while away is newer than Redis's record: the outbox says it.
        let changed_here: std::collections::HashSet<_> =
            self.outbox.iter().map(Event::target).collect();
        let mut cursor: u64 = 0;
        let mut records = Vec::new();
        let mut read = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .timed(
                    "SCAN",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(BATCH)
                        .query_async(&mut link.commands),
                )
                .await?;
            if !keys.is_empty() {
                let values: Vec<Option<Vec<u8>>> = self
                    .timed("MGET", redis::cmd("MGET").arg(&keys).query_async(&mut link.commands))
                    .await?;
                for value in values.into_iter().flatten() {
                    match Event::decode(&value) {
                        // This gateway's own records too: a ban in Redis is in force in the
                        // fleet, and this gateway may have lost its maps since it made it. An
                        // unban's record lifts the ban here if this gateway missed it.
                        Ok(event) if !changed_here.contains(&event.target()) => {
                            records.push(event);
                        }
                        Ok(_) => {}
                        Err(reason) => {
                            self.metrics.fleet.ignored.inc();
                            tracing::warn!(%reason, "fleet: a ban key in Redis does not decode; ignored");
                        }
                    }
                }
            }
            if records.len() >= BATCH {
                read += records.len();
                self.apply(std::mem::take(&mut records), Arrival::CatchUp).await;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        read += records.len();
        self.apply(records, Arrival::CatchUp).await;
        while !self.outbox.is_empty() {
            let chunk: Vec<Event> = self.outbox.iter().take(BATCH).cloned().collect();
            self.write(&mut link.commands, &chunk).await?;
            self.outbox.drain(..chunk.len());
        }
        crate::metrics::set_gauge(&self.metrics.fleet.outbox, 0);
        Ok(read)
    }

    /// Connected: publishes this gateway's events and applies the others' until the connection
    /// fails (its error) or the agent stops (`None`).
    async fn serve(
        &mut self,
        link: &mut Link,
        local: &mut mpsc::Receiver<Event>,
    ) -> Option<FleetError> {
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = local.recv() => {
                    // Whatever else waits goes in the same round trip: a burst of bans must
                    // not outrun this task (the worker drops what its queue has no room for).
                    let mut batch = vec![event?];
                    while batch.len() < BATCH {
                        match local.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    if let Err(error) = self.write(&mut link.commands, &batch).await {
                        batch.into_iter().for_each(|event| self.hold(event));
                        return Some(error);
                    }
                }
                message = link.messages.next() => {
                    let Some(message) = message else { return Some(FleetError::Unsubscribed) };
                    self.received(message.get_payload_bytes()).await;
                }
                _ = check.tick() => {
                    let key = self.keys.epoch();
                    let epoch: Option<String> =
                        match self.timed("GET epoch", link.commands.get(&key)).await {
                            Ok(epoch) => epoch,
                            Err(error) => return Some(error),
                        };
                    if epoch != self.epoch {
                        return Some(FleetError::EpochChanged);
                    }
                }
            }
        }
    }

    /// One message from the channel.
    async fn received(&mut self, payload: &[u8]) {
        let (event, from) = match Event::decode_from(payload) {
            Ok(decoded) => decoded,
            Err(reason) => {
                self.metrics.fleet.ignored.inc();
                let shown =
                    String::from_utf8_lossy(&payload[..payload.len().min(120)]).into_owned();
                tracing::warn!(%reason, message = shown, "fleet: a message on the channel is not ours or is malformed; ignored");
                return;
            }
        };
        if from.as_deref() == Some(self.instance.as_str()) {
            return; // our own, coming back
        }
        if event.node() == self.config.node && !self.twin_warned {
            self.twin_warned = true;
            tracing::warn!(
                node = self.config.node,
                "fleet: another gateway uses this node name; set a distinct fleet.node on each (its bans are applied all the same, but listed as this gateway's)"
            );
        }
        let at_ms = match &event {
            Event::Ban(record) => record.at_ms,
            Event::Unban { at_ms, .. } => *at_ms,
        };
        let now_ms = crate::clock::unix_ns() / 1_000_000;
        self.metrics.fleet.lag.observe(now_ms.saturating_sub(at_ms) as f64 / 1000.0);
        self.apply(vec![event], Arrival::Live).await;
    }

    /// Hands remote events to the ban worker, waiting while its queue is full.
    async fn apply(&self, mut events: Vec<Event>, arrival: Arrival) {
        while !events.is_empty() {
            match self.bans.remote(events, arrival) {
                Ok(()) => return,
                Err(back) => {
                    events = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// Records and publishes a batch of this gateway's events, in one round trip.
    async fn write(
        &self,
        commands: &mut redis::aio::MultiplexedConnection,
        events: &[Event],
    ) -> Result<(), FleetError> {
        let mut pipe = redis::pipe();
        for event in events {
            match event {
                Event::Ban(record) => set_record(&mut pipe, &self.keys, record, false),
                Event::Unban { target, .. } => {
                    // Kept for the gateways that are away now (see the module's documentation).
                    pipe.set_options(
                        self.keys.ban(target),
                        event.encode(),
                        redis::SetOptions::default()
                            .with_expiration(redis::SetExpiry::PX(UNBAN_KEPT.as_millis() as u64)),
                    )
                    .ignore();
                }
            }
            pipe.publish(self.keys.channel(), event.encode_from(Some(&self.instance))).ignore();
        }
        self.timed("publishing", pipe.query_async::<()>(commands)).await?;
        self.metrics.fleet.published.inc_by(events.len() as u64);
        Ok(())
    }
}

/// `SET <key> <record> [PXAT keep_until] [NX]` into `pipe`.
fn set_record(pipe: &mut redis::Pipeline, keys: &Keys, record: &BanRecord, only_new: bool) {
    let command =
        pipe.cmd("SET").arg(keys.ban(&record.target)).arg(Event::Ban(record.clone()).encode());
    if let Some(until) = record.keep_until_ms {
        command.arg("PXAT").arg(until.max(1));
    }
    if only_new {
        command.arg("NX");
    }
    command.ignore();
}

/// A Redis error, as the task acts on it: `READONLY` says the node was demoted (the master
/// moved), which is a lost connection, not a refused command.
fn classify(operation: &'static str, source: redis::RedisError) -> FleetError {
    if source.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
        FleetError::ReadOnly { operation }
    } else {
        FleetError::Redis { operation, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readonly_from_a_demoted_master_is_a_lost_connection() {
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        let error = classify("publishing", readonly);
        assert!(matches!(error, FleetError::ReadOnly { operation: "publishing" }), "{error:?}");
        assert!(error.to_string().contains("asking for it again"), "{error}");
        let other = redis::RedisError::from((redis::ErrorKind::Io, "connection reset"));
        assert!(matches!(classify("SCAN", other), FleetError::Redis { .. }));
    }
}
