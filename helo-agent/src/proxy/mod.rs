//! The transparent SMTP proxy: session threads (each with its own runtime, all accepting on the
//! same listening sockets), one task per session on the thread that accepted it, the upstream
//! connection with a PROXY header, and the relay that takes over once a passed session is
//! opaque.
//!
//! A session: admit (global and per-address limits, else 421), greet (`proxy.greeting`: the
//! proxy's own 220, or the MTA connected at accept with its banner relayed), then read client
//! lines through [`session::Session`], which makes every reply decision. Pass: the MTA is
//! connected if it was not (PROXY header; unreachable: 421 4.3.0, no ban) and the client's
//! lines go to it one at a time, its replies back, every later HELO judged, until STARTTLS,
//! DATA or BDAT makes the session opaque and [`relay`] takes over. Reject/ban (first HELO or a
//! later one): a connected MTA gets QUIT, the proxy answers the client to the end, and a ban is
//! queued when the session closes (earlier, XDP would drop the client's ACKs of our own 553s).
//! Shutdown: sessions without mail are told 421 at once, relaying ones get the grace. One log
//! line per session.

mod handler;
pub mod header;
pub mod outcome;
pub mod relay;
pub mod session;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use self::handler::{Context, Handler, close_with};
use self::outcome::Outcome;
use crate::config::ListenerConfig;
use crate::judge::{Client, Door, Judge, Live, Open, Record, Refusal, Transport};
use crate::rules::Action;
use crate::smtp::reply;

/// The longest PROXY header taken from a trusted front proxy (v2 with TLVs; v1 is at most 107).
const MAX_HEADER: usize = 1100;
/// After the grace: how long cut sessions get to log and queue their bans.
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Where a shutdown stands, as sessions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drain {
    Running,
    /// The listeners are closed: sessions that carry no mail (before their verdict, or
    /// rejected) are told 421 and end now; relaying ones get `proxy.shutdown_grace`.
    Draining,
    /// The grace is over: every session still open ends now, logged (and banned) as usual.
    Cut,
}

/// What the proxy's sessions share besides the judge: the limits, the drain, the throttled
/// warnings.
struct Shared {
    judge: Arc<Judge>,
    /// Fixed at start: the semaphore is sized by it.
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    drain: watch::Sender<Drain>,
    refused: Throttled,
    accept_failed: Throttled,
    /// Connections closed at accept (banned, or a ban just decided), summed up in the log.
    closed_at_accept: Throttled,
    /// What the MTA answers HELO and EHLO, for rejected sessions.
    learned: upstream::Learned,
}

impl Shared {
    fn new(judge: Arc<Judge>) -> Arc<Self> {
        let max_sessions = judge.live().config.max_sessions;
        Arc::new(Shared {
            judge,
            max_sessions,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            per_ip: Mutex::new(HashMap::new()),
            drain: watch::Sender::new(Drain::Running),
            refused: Throttled::default(),
            accept_failed: Throttled::default(),
            closed_at_accept: Throttled::default(),
            learned: upstream::Learned::default(),
        })
    }

    /// Sessions open now.
    fn open_sessions(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    /// A session of a client at `ip`, within the limits: `per_ip_limit` counts an IPv6
    /// client's whole /64 as one client (see [`crate::addr::session_key`]).
    fn admit(self: &Arc<Self>, ip: IpAddr, per_ip_limit: usize) -> Option<Admission> {
        let ip = crate::addr::session_key(ip);
        let permit = self.sessions.clone().try_acquire_owned().ok()?;
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= per_ip_limit {
            return None;
        }
        *count += 1;
        let open = self.judge.court().opened();
        Some(Admission { shared: self.clone(), ip, _permit: permit, _open: open })
    }
}

/// A warning a flood would repeat thousands of times a second (refused connections, failed
/// accepts): written at most once per second, saying how many occurrences it stands for.
#[derive(Default)]
pub struct Throttled {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(1);

    /// Counts one occurrence; `Some(n)` when it is to be written, standing for `n` occurrences
    /// (this one and those folded since the last line).
    pub fn tick(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("throttle lock");
        let (last, folded) = &mut *state;
        *folded += 1;
        if last.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(folded))
    }
}

/// A session's place in the limits, given back when dropped.
struct Admission {
    shared: Arc<Shared>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
    _open: Open,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut per_ip = self.shared.per_ip.lock().expect("per-ip lock");
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// A listener on a session thread's runtime, and whether it checks HELO.
struct Bound {
    listener: TcpListener,
    check_helo: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: io::Error,
}

/// One session thread's listening sockets, bound before any runtime exists, each with whether
/// it checks HELO.
pub type StdListeners = Vec<(std::net::TcpListener, bool)>;

/// Binds every listener before any runtime exists (the agent binds port 25 as root, then drops
/// privileges, then starts its threads), and hands each session thread its own descriptor of
/// the same socket. One socket per address, without `SO_REUSEPORT`: a port another program
/// holds is refused at start, and the port stays the agent's alone. (Postfix's master sets
/// `SO_REUSEPORT` on its listeners and runs as root, as the agent binds: with a socket per
/// thread in a `SO_REUSEPORT` group, the kernel would let an MTA still on port 25 share it,
/// and give it a share of the clients, unfiltered.) Whichever thread is free first accepts.
/// Non-blocking, for [`serve`].
pub fn bind_std(
    listeners: &[ListenerConfig],
    threads: usize,
) -> Result<Vec<StdListeners>, BindError> {
    let mut sets: Vec<StdListeners> = (0..threads).map(|_| Vec::new()).collect();
    for l in listeners {
        let err = |source| BindError { address: l.address, source };
        let socket = listen(l.address).map_err(err)?;
        for set in &mut sets {
            set.push((socket.try_clone().map_err(err)?, l.check_helo));
        }
    }
    Ok(sets)
}

/// A non-blocking listening socket; IPv6 ones v6-only, so `0.0.0.0:25` and `[::]:25` coexist.
fn listen(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Starting the session threads failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot start session thread {index}: {source}")]
pub struct ThreadError {
    pub index: usize,
    pub source: io::Error,
}

/// Runs the proxy until `shutdown` completes, then drains it (see [`drain`]). Each of `sets`
/// (from [`bind_std`]) gets its own thread with a single-threaded runtime, which accepts on
/// the listening sockets and runs every session it accepted to its end there (a session never
/// moves between threads, and no thread wakes another for it, as in HAProxy).
/// Every session shares the `judge` (the rules, the court, the bans, the memories), and the
/// proxy's own limits and drain. The caller's runtime keeps the rest (control socket, metrics,
/// policy service, ban worker). A failing session is logged, never fatal. Returns once the
/// sessions have drained and the threads have ended.
pub async fn serve(
    sets: Vec<StdListeners>,
    judge: Arc<Judge>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ThreadError> {
    serve_with(sets, judge, shutdown, Serving::default()).await
}

/// How [`serve_with`] runs besides the listeners and the judge.
#[derive(Default)]
pub struct Serving {
    /// Steering: the kernel hands new connections to the MTA once the agent's sockets are out
    /// of its map, so nothing waits for the agent to exit. Sessions are not told 421 at
    /// shutdown: every one, before its verdict too, is judged and relayed to its end (within
    /// `proxy.shutdown_grace`).
    pub judge_to_the_end: bool,
    /// Each session thread beats its slot (its index) while its event loop turns.
    pub beats: Option<Arc<crate::watchdog::Heartbeats>>,
}

/// [`serve`], with the steering mode's shutdown and the watchdog's heartbeats.
pub async fn serve_with(
    sets: Vec<StdListeners>,
    judge: Arc<Judge>,
    shutdown: impl Future<Output = ()>,
    serving: Serving,
) -> Result<(), ThreadError> {
    let shared = Shared::new(judge);
    let (stop, stopping) = watch::channel(false);
    let (end, ending) = watch::channel(false);
    // Each thread holds a clone until its listeners are closed; `recv` is `None` when all are.
    let (closing, mut closed) = tokio::sync::mpsc::channel::<()>(1);
    // Runtimes and conversions first, so a failure leaves no thread behind.
    let mut prepared = Vec::with_capacity(sets.len());
    for (index, set) in sets.into_iter().enumerate() {
        let err = |source| ThreadError { index, source };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(err)?;
        let listeners = {
            let _inside = runtime.enter();
            set.into_iter()
                .map(|(listener, check_helo)| {
                    Ok(Bound { listener: TcpListener::from_std(listener)?, check_helo })
                })
                .collect::<io::Result<Vec<_>>>()
                .map_err(err)?
        };
        prepared.push((index, runtime, listeners));
    }
    let mut threads = Vec::with_capacity(prepared.len());
    let mut failed = None;
    for (index, runtime, listeners) in prepared {
        let shared = shared.clone();
        let mut stopping = stopping.clone();
        let mut ending = ending.clone();
        let closing = closing.clone();
        let beats = serving.beats.clone();
        let spawned =
            std::thread::Builder::new().name(format!("helo-proxy-{index}")).spawn(move || {
                runtime.block_on(async move {
                    if let Some(beats) = beats {
                        tokio::spawn(beats.keep_beating(index));
                    }
                    let stop = async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    };
                    accept_until(listeners, &shared, stop).await;
                    drop(closing);
                    // The sessions run on this thread: it turns until they have drained.
                    let _ = ending.wait_for(|end| *end).await;
                });
                // Dropping the runtime drops what is still open (cut sessions, lookups).
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(source) => {
                failed = Some(ThreadError { index, source });
                break;
            }
        }
    }
    drop(closing);
    if failed.is_none() {
        tracing::debug!(threads = threads.len(), "session threads started");
        shutdown.await;
    }
    stop.send_replace(true);
    let _ = closed.recv().await;
    if failed.is_none() {
        if !serving.judge_to_the_end {
            shared.drain.send_replace(Drain::Draining);
        }
        drain(&shared).await;
    }
    end.send_replace(true);
    let joined = tokio::task::spawn_blocking(move || {
        threads.into_iter().filter_map(|thread| thread.join().err()).count()
    })
    .await;
    if !matches!(joined, Ok(0)) {
        tracing::error!("a session thread panicked");
    }
    failed.map_or(Ok(()), Err)
}

/// Accepts on every listener until `stop` completes, then closes them.
async fn accept_until(listeners: Vec<Bound>, shared: &Arc<Shared>, stop: impl Future<Output = ()>) {
    let mut tasks = tokio::task::JoinSet::new();
    for bound in listeners {
        tasks.spawn(accept(bound, shared.clone()));
    }
    stop.await;
    tasks.shutdown().await;
}

/// One listener's accept loop: a task per session, on this runtime.
async fn accept(bound: Bound, shared: Arc<Shared>) {
    loop {
        match bound.listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(shared.clone(), stream, peer, bound.check_helo));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(count) = shared.accept_failed.tick(Instant::now()) {
                    tracing::warn!(%error, count, "accept failed (count: since the last such line); out of file descriptors? raise LimitNOFILE or lower proxy.max_sessions");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// After the listeners close: waits for sessions in flight to end, up to
/// `proxy.shutdown_grace`, saying every second how many are left. What is still open then is
/// cut when the runtime stops.
async fn drain(shared: &Shared) {
    let grace = shared.judge.live().config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let mut last_report = tokio::time::Instant::now();
    loop {
        let open = shared.open_sessions();
        if open == 0 {
            tracing::info!("all sessions ended");
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                open,
                grace_s = grace.as_secs(),
                "shutdown grace over: cutting the sessions still open"
            );
            shared.drain.send_replace(Drain::Cut);
            // Cut sessions still write their log line and queue their ban; give them a moment.
            let cut_by = tokio::time::Instant::now() + CUT_WAIT;
            while shared.open_sessions() > 0 && tokio::time::Instant::now() < cut_by {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return;
        }
        if now >= last_report {
            let left = deadline.saturating_duration_since(now).as_secs();
            tracing::info!(open, seconds_left = left, "draining: waiting for sessions to end");
            last_report = now + Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One accepted connection, to its end: who it is, refused or admitted, the session, its
/// conclusion.
async fn handle(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, check_helo: bool) {
    let started = Instant::now();
    let live = shared.judge.live();
    let Some(mut arrival) = arrive(&shared, &live, client, peer, check_helo).await else { return };
    let Some(_admission) = admit(&shared, &live, &mut arrival).await else { return };
    let Arrival { stream, who, peer, local, input } = arrival;
    let _ = stream.set_nodelay(true);
    let judge = &*shared.judge;
    let drain = shared.drain.subscribe();
    let learned = &shared.learned;
    let context = Context { judge, live: &live, who, peer, local, drain, learned };
    let outcome = Handler::new(context, stream, input).run().await;
    let record = Record {
        door: Door::Proxy,
        client: &who,
        helo: outcome.helo.as_deref(),
        helos: &outcome.helos,
        verdict: outcome.verdict.as_ref(),
        logged: &outcome.logged,
        dns: outcome.dns.as_deref(),
        ms: started.elapsed().as_millis() as u64,
        transport: Some(Transport {
            bytes_in: outcome.up,
            bytes_out: outcome.down,
            spliced: outcome.spliced,
            copied: outcome.copied,
            tls: outcome.tls,
            accepted: outcome.accepted,
            end: outcome.end,
            error: outcome.error.as_deref().unwrap_or(""),
            pregreet: outcome.pregreet.as_deref(),
        }),
    };
    judge.conclude(&record, &live);
    count_relay(judge, &outcome);
}

/// A connection as it arrived: the client resolved once (every later step uses this value),
/// the addresses the MTA is told, and the client bytes read after a front proxy's header.
struct Arrival {
    stream: TcpStream,
    who: Client,
    peer: SocketAddr,
    local: SocketAddr,
    input: Vec<u8>,
}

/// Who the client is (a trusted front proxy says so in its PROXY header; anyone else's header
/// is refused in the session), and whether the judge refuses it at once; `None`: closed.
async fn arrive(
    shared: &Shared,
    live: &Live,
    stream: TcpStream,
    peer: SocketAddr,
    check_helo: bool,
) -> Option<Arrival> {
    let from = crate::addr::canonical(peer.ip());
    let local = stream.local_addr().unwrap_or(peer);
    let mut arrival = Arrival {
        stream,
        who: Client::new(from, None, !check_helo),
        peer,
        local,
        input: Vec::new(),
    };
    let balancer =
        live.config.trusted_proxies.iter().any(|net| net.contains(&from)).then_some(from);
    if let Some(balancer) = balancer {
        match read_inbound(&mut arrival.stream, live.config.helo_timeout).await {
            Ok((header::Inbound::Proxied { client: real, local: dst }, after)) => {
                arrival.peer = real;
                arrival.local = dst;
                arrival.input = after;
            }
            Ok((header::Inbound::Local, after)) => arrival.input = after,
            Err(error) => {
                tracing::warn!(%balancer, %error, "trusted front proxy sent no valid PROXY header: connection closed");
                return None;
            }
        }
    }
    arrival.who = Client::new(arrival.peer.ip(), balancer, !check_helo);
    let ip = arrival.who.ip;
    // What XDP would have done, as near as user space can: no greeting, just gone.
    let Some(refusal) = shared.judge.refused_at_accept(&arrival.who) else {
        return Some(arrival);
    };
    match refusal {
        Refusal::Banned => {
            tracing::debug!(client = %ip, via = ?balancer, "banned client closed at accept");
        }
        Refusal::BanPending => {
            tracing::debug!(client = %ip, via = ?balancer, "client with a ban just decided closed at accept");
        }
    }
    // A returning bot floods this path: one line a second at most, with how many it stands for.
    if let Some(count) = shared.closed_at_accept.tick(Instant::now()) {
        tracing::info!(
            client = %ip,
            count,
            "clients closed at accept, banned where XDP cannot drop them or with a ban just \
             decided (count: since the last such line; client: the latest)"
        );
    }
    None
}

/// A place in the limits for `arrival`, or `421` and `None` beyond them.
async fn admit(shared: &Arc<Shared>, live: &Live, arrival: &mut Arrival) -> Option<Admission> {
    let ip = arrival.who.ip;
    if let Some(admission) = shared.admit(ip, live.config.max_sessions_per_ip) {
        return Some(admission);
    }
    let refusal = reply::line(421, "4.7.0", "Error: too many connections");
    if let Some(count) = shared.refused.tick(Instant::now()) {
        tracing::warn!(
            client = %ip,
            count,
            "sessions refused at the connection limits (count: since the last such line; \
             proxy.max_sessions, proxy.max_sessions_per_ip)"
        );
    }
    close_with(&mut arrival.stream, &refusal).await;
    None
}

/// The proxy's own counters: how sessions ended, and the bytes relayed by each path.
fn count_relay(judge: &Judge, outcome: &Outcome) {
    let Some(metrics) = &judge.court().metrics else { return };
    metrics
        .session_ends
        .get_or_create(&crate::metrics::EndLabels { end: outcome.end.as_str() })
        .inc();
    if outcome.verdict.as_ref().is_some_and(|v| v.action == Action::Pass) {
        // Spliced: the client's side once opaque. Copied: the command lines and the replies.
        let (spliced, copied) = if outcome.spliced {
            (outcome.up.saturating_sub(outcome.copied), outcome.copied + outcome.down)
        } else {
            (0, outcome.up + outcome.down)
        };
        let path = |path| crate::metrics::PathLabels { path };
        metrics.relay_bytes.get_or_create(&path("splice")).inc_by(spliced);
        metrics.relay_bytes.get_or_create(&path("copy")).inc_by(copied);
    }
}

/// Reads a trusted front proxy's PROXY header within `limit`, into a buffer: returns the header
/// and the client bytes that came after it in the same reads (the session's first input).
async fn read_inbound(
    client: &mut TcpStream,
    limit: Duration,
) -> io::Result<(header::Inbound, Vec<u8>)> {
    let read = async {
        let mut buf: Vec<u8> = Vec::with_capacity(256);
        loop {
            match header::decode(&buf) {
                header::Decoded::NeedMore if buf.len() >= MAX_HEADER => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "PROXY header too long",
                    ));
                }
                header::Decoded::NeedMore => {}
                header::Decoded::Header { len, inbound } => {
                    buf.drain(..len);
                    return Ok((inbound, buf));
                }
                header::Decoded::Invalid(why) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                }
            }
            buf.reserve(256);
            if client.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a PROXY header",
                ));
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every session's future is as large as the largest state it may ever await, for its whole
    /// life, idle bots' included. The DNS lookups awaited inline made it 2.3 times larger: the
    /// bench's idle session went from 5.1 to 11.6 KiB, past the 8 KiB goal. What only some
    /// sessions reach (the relay, the close, the MTA connection, DNS) is boxed.
    #[tokio::test]
    async fn a_session_future_stays_small() {
        let config = crate::config::Config::parse(
            "",
            std::path::Path::new("t"),
            &crate::config::HostFacts::default(),
        )
        .unwrap();
        let shared = Shared::new(Judge::new(Live::of(&config), Default::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let session = handle(shared, server, peer, true);
        let size = std::mem::size_of_val(&session);
        // 4.2 kB with the boxing, 10.4 kB without it (debug and release alike).
        assert!(size <= 6144, "a session's future is {size} bytes");
    }

    /// The session threads accept on one socket: port 0 is chosen once, and any thread takes
    /// a connection. A port another program holds is refused, whether it set `SO_REUSEPORT`
    /// (as Postfix's master does, as root) or not. With a socket per thread in a
    /// `SO_REUSEPORT` group, the agent bound beside a listening Postfix, which then got a share
    /// of the clients, unfiltered (found in a trial).
    #[test]
    fn the_threads_share_one_socket_and_a_port_in_use_is_refused() {
        let any = [ListenerConfig { address: "127.0.0.1:0".parse().unwrap(), check_helo: true }];
        let sets = bind_std(&any, 3).unwrap();
        assert_eq!(sets.len(), 3);
        let port = sets[0][0].0.local_addr().unwrap().port();
        for set in &sets {
            assert_eq!(set[0].0.local_addr().unwrap().port(), port);
        }
        for _ in 0..3 {
            drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
        for set in &sets {
            assert!(set[0].0.accept().is_ok(), "every thread's descriptor takes connections");
        }

        for shared_port in [false, true] {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_reuse_port(shared_port).unwrap();
            socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
            socket.listen(16).unwrap();
            let address = socket.local_addr().unwrap().as_socket().unwrap();
            let held = [ListenerConfig { address, check_helo: true }];
            for threads in [1, 2] {
                let error = bind_std(&held, threads).unwrap_err();
                assert_eq!(
                    error.source.kind(),
                    io::ErrorKind::AddrInUse,
                    "{threads} threads, holder with SO_REUSEPORT: {shared_port}"
                );
            }
        }
    }

    #[test]
    fn a_flood_of_warnings_is_one_line_a_second_with_its_count() {
        let throttled = Throttled::default();
        let start = Instant::now();
        assert_eq!(throttled.tick(start), Some(1), "the first is written");
        for i in 1..480 {
            assert_eq!(throttled.tick(start + Duration::from_micros(i * 200)), None);
        }
        assert_eq!(
            throttled.tick(start + Duration::from_millis(1000)),
            Some(480),
            "the next line stands for the 479 folded and itself"
        );
        assert_eq!(throttled.tick(start + Duration::from_millis(1001)), None);
    }

    /// An MTA that accepts a transaction and then waits for the message forever.
    async fn patient_mta(listener: TcpListener) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"220 mta.test ESMTP\r\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer: &[u8] = if line == "DATA" { b"354 go ahead\r\n" } else { b"250 ok\r\n" };
            write.write_all(answer).await.unwrap();
            if line == "DATA" {
                // The message is read, never answered: the client does not finish it.
                while let Ok(Some(_)) = lines.next_line().await {}
                return;
            }
        }
    }

    /// Regression (issue 25): a client that stalls mid-DATA was logged `side=agent` (a relay
    /// error was always the agent's), the side operators alert on. Its session line now says
    /// `end=relay_error side=client`.
    #[tokio::test]
    async fn a_client_stalling_mid_data_is_logged_on_the_client_side() {
        use tokio::io::AsyncWriteExt;
        let mta = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let text = format!(
            "[identity]\ndetect = false\n[checks]\npregreet = \"off\"\n\
             [proxy]\nupstream = \"{}\"\nproxy_protocol = \"none\"\nidle_timeout = \"1s\"\n",
            mta.local_addr().unwrap()
        );
        let config = crate::config::Config::parse(
            &text,
            std::path::Path::new("t"),
            &crate::config::HostFacts::default(),
        )
        .unwrap();
        let shared = Shared::new(Judge::new(Live::of(&config), Default::default()));
        let (logs, _logging) = crate::testing::Captured::start();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let client_side = async {
            let mut reply = vec![0u8; 512];
            let _ = client.read(&mut reply).await.unwrap();
            for line in [
                "EHLO mail.sender.example",
                "MAIL FROM:<a@b.example>",
                "RCPT TO:<c@d.example>",
                "DATA",
            ] {
                client.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
                let n = client.read(&mut reply).await.unwrap();
                assert!(n > 0, "answered: {line}");
            }
            client.write_all(b"Subject: stalled\r\n\r\nhalf a li").await.unwrap();
            // Stalled: the agent ends the session at its idle limit.
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
        };
        tokio::join!(patient_mta(mta), handle(shared, server, peer, true), client_side);
        let logs = logs.text();
        let line = logs.lines().find(|l| l.contains(" session ")).expect(&logs);
        assert!(line.contains("end=\"relay_error\"") && line.contains("side=\"client\""), "{line}");
    }
}
