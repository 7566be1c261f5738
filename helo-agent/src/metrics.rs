//! Counters for Prometheus, and the small HTTP endpoint that serves them (`GET /metrics`,
//! OpenMetrics text). Off by default; `agent.metrics` names the address (keep it on localhost).
//!
//! Sessions are counted by verdict and rule and by how they ended; bans as added, swept and in
//! force; reloads and ban snapshots by result; the XDP program's per-CPU verdict counters are
//! read from the pinned map at each scrape.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    pub address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub sessions: Family<VerdictLabels, Counter>,
    pub session_ends: Family<EndLabels, Counter>,
    pub bans_added: Counter,
    /// Rule bans waiting for the ban worker.
    pub ban_queue: Gauge,
    pub bans_swept: Counter,
    pub bans_active: Gauge,
    pub map_entries: Family<NameLabels, Gauge>,
    pub map_capacity: Family<NameLabels, Gauge>,
    pub xdp_packets: Family<NameLabels, Counter>,
    pub relay_bytes: Family<PathLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub snapshots: Family<ResultLabels, Counter>,
    pub sessions_open: Gauge,
    /// Bans shared with other gateways (`[fleet]`).
    pub fleet: FleetMetrics,
    /// The steering front door (`[steer]`).
    pub steer: SteerMetrics,
    /// The XDP counters as last read, to add only what is new.
    xdp_seen: Mutex<[u64; helo_common::STAT_COUNT as usize]>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("helo_filter");
        let sessions = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "sessions",
            "SMTP sessions by verdict (pass, reject, ban, none: no HELO) and deciding rule",
            sessions.clone(),
        );
        let session_ends = Family::<EndLabels, Counter>::default();
        registry.register(
            "session_ends",
            "Sessions by how they ended (relayed, closed, timeout, upstream_unreachable, upstream_error, ...)",
            session_ends.clone(),
        );
        let bans_added = Counter::default();
        registry.register("bans_added", "Bans written to the kernel maps", bans_added.clone());
        let ban_queue = Gauge::default();
        registry.register(
            "ban_queue",
            "Rule bans decided and waiting for the ban worker to write them (none is ever dropped; the doors refuse their clients meanwhile)",
            ban_queue.clone(),
        );
        let bans_swept = Counter::default();
        registry.register(
            "bans_expired",
            "Expired bans swept from the maps by the agent",
            bans_swept.clone(),
        );
        let bans_active = Gauge::default();
        registry.register(
            "bans_active",
            "Bans in force: counted at start, each minute and each snapshot, moved by each ban and unban",
            bans_active.clone(),
        );
        let map_entries = Family::<NameLabels, Gauge>::default();
        registry.register(
            "map_entries",
            "Entries in each ban map, expired ones included: counted at start, each minute and each snapshot, moved by each ban and unban",
            map_entries.clone(),
        );
        let map_capacity = Family::<NameLabels, Gauge>::default();
        registry.register(
            "map_capacity",
            "Capacity of each ban map: when map_entries reaches it, the kernel evicts the least recently used bans, even bans in force",
            map_capacity.clone(),
        );
        let xdp_packets = Family::<NameLabels, Counter>::default();
        registry.register(
            "xdp_packets",
            "Packets seen by the XDP program, by verdict (passed, dropped, expired_pass, allowlisted, not_guarded, parse_error, banned_not_syn)",
            xdp_packets.clone(),
        );
        let relay_bytes = Family::<PathLabels, Counter>::default();
        registry.register(
            "relay_bytes",
            "Bytes of relayed sessions by path: splice (in the kernel) or copy (through user space)",
            relay_bytes.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Config reloads by result (ok, refused)", reloads.clone());
        let snapshots = Family::<ResultLabels, Counter>::default();
        registry.register(
            "snapshots",
            "Ban snapshots written, by result (ok, error)",
            snapshots.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register("sessions_open", "Sessions open now", sessions_open.clone());
        let fleet = FleetMetrics::register(&mut registry);
        let steer = SteerMetrics::register(&mut registry);
        Metrics {
            registry,
            sessions,
            session_ends,
            bans_added,
            ban_queue,
            bans_swept,
            bans_active,
            map_entries,
            map_capacity,
            xdp_packets,
            relay_bytes,
            reloads,
            snapshots,
            sessions_open,
            fleet,
            steer,
            xdp_seen: Mutex::new([0; helo_common::STAT_COUNT as usize]),
        }
    }
}

/// The steering front door's counters (all zero with steering off).
pub struct SteerMetrics {
    /// New connections the steering program decided, by outcome.
    pub connections: Family<NameLabels, Counter>,
    /// Passes in force in the kernel's pass maps: counted at start, each minute and each
    /// snapshot, moved by each pass written or taken away.
    pub passes: Gauge,
    pub passes_granted: Counter,
    pub passes_revoked: Counter,
}

impl SteerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = SteerMetrics {
            connections: Family::default(),
            passes: Gauge::default(),
            passes_granted: Counter::default(),
            passes_revoked: Counter::default(),
        };
        let steer = registry.sub_registry_with_prefix("steer");
        steer.register(
            "connections",
            "New connections to the steered endpoints, by the steering program's decision (steered: to the agent; steer_passed: a pass, straight to the MTA; steer_allowed, steer_banned, steer_no_agent: no agent socket, to the MTA; steer_error)",
            m.connections.clone(),
        );
        steer.register(
            "passes",
            "Passes in force (clients that go straight to the MTA): counted at start, each minute and each snapshot, moved by each pass written or taken away",
            m.passes.clone(),
        );
        steer.register(
            "passes_granted",
            "Passes written after an honest session",
            m.passes_granted.clone(),
        );
        steer.register(
            "passes_revoked",
            "Passes taken away by a ban (any ban: a rule's, an admin's, another gateway's) or by an admin",
            m.passes_revoked.clone(),
        );
        m
    }
}

/// The fleet's counters (all zero with the fleet off).
pub struct FleetMetrics {
    /// 1 while connected to Redis (subscribed and caught up), else 0.
    pub connected: Gauge,
    pub published: Counter,
    pub applied: Counter,
    pub refused: Counter,
    pub ignored: Counter,
    pub dropped: Counter,
    pub outbox: Gauge,
    pub lag: Histogram,
    /// The Redis node written to (the master): one series, its address as a label, at 1.
    pub master: Family<AddressLabels, Gauge>,
    /// The same address, for the control socket (`top`).
    master_address: Mutex<Option<String>>,
    /// Times the master changed under this gateway (a failover).
    pub failovers: Counter,
    /// When the last failover was seen (Unix seconds); 0: none yet.
    pub last_failover: Gauge,
}

impl FleetMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = FleetMetrics {
            connected: Gauge::default(),
            published: Counter::default(),
            applied: Counter::default(),
            refused: Counter::default(),
            ignored: Counter::default(),
            dropped: Counter::default(),
            outbox: Gauge::default(),
            lag: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            master: Family::default(),
            master_address: Mutex::new(None),
            failovers: Counter::default(),
            last_failover: Gauge::default(),
        };
        let fleet = registry.sub_registry_with_prefix("fleet");
        fleet.register(
            "connected",
            "1 while connected to the fleet's Redis, else 0",
            m.connected.clone(),
        );
        fleet.register(
            "published",
            "Bans and unbans made here and written to Redis",
            m.published.clone(),
        );
        fleet.register(
            "applied",
            "Bans and unbans made by other gateways and applied here",
            m.applied.clone(),
        );
        fleet.register(
            "refused",
            "Bans from other gateways refused: they cover an address this gateway never bans (allowlist, own addresses, loopback, trusted proxies)",
            m.refused.clone(),
        );
        fleet.register(
            "ignored",
            "Messages on the fleet channel that were malformed or foreign, ignored",
            m.ignored.clone(),
        );
        fleet.register(
            "dropped",
            "Bans and unbans not shared: the fleet queue or the outbox was full",
            m.dropped.clone(),
        );
        fleet.register(
            "outbox",
            "Bans and unbans made here waiting for Redis to come back",
            m.outbox.clone(),
        );
        fleet.register(
            "lag_seconds",
            "From a ban on another gateway to its arrival here (wall clocks of both)",
            m.lag.clone(),
        );
        fleet.register(
            "master",
            "The Redis node this gateway writes to (the master), as the label address; 1",
            m.master.clone(),
        );
        fleet.register(
            "failovers",
            "Times the Redis master changed under this gateway (a Sentinel failover)",
            m.failovers.clone(),
        );
        fleet.register(
            "last_failover_timestamp_seconds",
            "When this gateway last found a new Redis master (Unix time); 0: never",
            m.last_failover.clone(),
        );
        m
    }

    /// The master now written to (`host:port`).
    pub fn set_master(&self, address: &str) {
        let mut current = self.master_address.lock().expect("fleet master lock");
        if current.as_deref() != Some(address) {
            self.master.clear();
            self.master.get_or_create(&AddressLabels { address: address.to_owned() }).set(1);
            *current = Some(address.to_owned());
        }
    }

    /// The master last connected to, if any.
    pub fn master_address(&self) -> Option<String> {
        self.master_address.lock().expect("fleet master lock").clone()
    }

    /// A failover seen at `unix_secs`.
    pub fn failed_over(&self, unix_secs: u64) {
        self.failovers.inc();
        self.last_failover.set(i64::try_from(unix_secs).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    /// Adds what the XDP counters gained since the last call (a recreated map starts again).
    pub fn update_xdp(&self, totals: &[u64; helo_common::STAT_COUNT as usize]) {
        let mut seen = self.xdp_seen.lock().expect("xdp counters lock");
        // The steering program's counters share the map; they are not XDP packets.
        for stat in helo_common::Stat::XDP {
            let i = stat as usize;
            let gained = totals[i].checked_sub(seen[i]).unwrap_or(totals[i]);
            self.xdp_packets.get_or_create(&NameLabels { name: stat.name() }).inc_by(gained);
            seen[i] = totals[i];
        }
        for stat in helo_common::Stat::STEER {
            let i = stat as usize;
            let gained = totals[i].checked_sub(seen[i]).unwrap_or(totals[i]);
            self.steer.connections.get_or_create(&NameLabels { name: stat.name() }).inc_by(gained);
            seen[i] = totals[i];
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Sets a gauge to a count.
pub fn set_gauge(gauge: &Gauge, value: usize) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8192;

/// Serves `GET /metrics` on `listener` until the task is dropped. `refresh` runs before each
/// scrape (it reads the XDP counters).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
) {
    let refresh = std::sync::Arc::new(refresh);
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let read = async {
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&chunk[..n]);
                }
                std::io::Result::Ok(())
            };
            if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(Ok(()))) {
                return;
            }
            let (status, content_type, body) =
                if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?") {
                    refresh();
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    )
                } else {
                    tracing::debug!(%peer, "metrics: not GET /metrics");
                    ("404 Not Found", "text/plain", "GET /metrics\n".to_owned())
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let write = async {
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, write).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_counters_add_only_what_is_new_and_survive_a_reset() {
        let metrics = Metrics::default();
        let mut totals = [0u64; helo_common::STAT_COUNT as usize];
        totals[helo_common::Stat::Dropped as usize] = 10;
        metrics.update_xdp(&totals);
        totals[helo_common::Stat::Dropped as usize] = 15;
        metrics.update_xdp(&totals);
        let dropped = || metrics.xdp_packets.get_or_create(&NameLabels { name: "dropped" }).get();
        assert_eq!(dropped(), 15);
        totals[helo_common::Stat::Dropped as usize] = 4; // the maps were recreated
        metrics.update_xdp(&totals);
        assert_eq!(dropped(), 19);
        let text = metrics.encode();
        assert!(text.contains("helo_filter_xdp_packets_total{name=\"dropped\"} 19"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
