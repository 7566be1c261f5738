//! The transparent SMTP proxy: listeners, one task per session, the upstream connection with a
//! PROXY header, and the relay that takes over after a pass verdict.
//!
//! A session: admit (global and per-address limits, else 421), greet (`proxy.greeting`: the
//! proxy's own 220, or the MTA connected at accept with its banner relayed), then read client
//! lines through [`session::Session`] until the verdict. Pass: the MTA is connected if it was
//! not (PROXY header; unreachable: 421 4.3.0, no ban), the HELO line and anything pipelined
//! after it go to it, and [`relay`] takes over. Reject/ban: a connected MTA gets QUIT, the
//! proxy answers the client to the end, and a ban is queued when the session closes (earlier,
//! XDP would drop the client's ACKs of our own 553s). One log line per session.

pub mod header;
pub mod relay;
pub mod session;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::session::{Session, Step};
use crate::blocklist::BanCheck;
use crate::blocklist::worker::{BanRequest, BanSender};
use crate::config::{GreetingMode, ListenerConfig, ProxyConfig};
use crate::rules::{Action, RuleSet};
use crate::smtp::reply::{ReplyScan, greeting_host, scan_reply};
use crate::smtp::{LineScan, MAX_COMMAND_LINE, reply, scan_line};

/// Bytes read at a time before the verdict. Reads go straight into the session's buffer, which
/// starts small: an idle session (a bot that never sends HELO) holds about 1 KiB of it.
const READ_CHUNK: usize = 1024;
/// How long a one-line refusal (limits, MTA unavailable) may take to write.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

/// What a reload replaces. A session takes the current one when it starts and keeps it to
/// its end, so a reload never changes the rules under a session in flight.
pub struct Live {
    pub config: ProxyConfig,
    pub rules: Arc<RuleSet>,
    pub reject_message: String,
}

/// Where sessions are counted besides the log: metrics and the tophelos report.
pub struct Observe {
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub report_window: Duration,
    /// The ban maps, read for clients behind a trusted front proxy.
    pub lookup: Option<Arc<dyn BanCheck>>,
}

impl Default for Observe {
    fn default() -> Self {
        Observe { metrics: None, report_window: Duration::from_secs(24 * 3600), lookup: None }
    }
}

/// What every session shares.
pub struct Shared {
    live: RwLock<Arc<Live>>,
    /// Where bans go; `None` runs the proxy without banning (rejections only).
    pub bans: Option<BanSender>,
    /// When XDP could not be attached: bans are enforced here, at accept.
    pub enforce: Option<Arc<dyn BanCheck>>,
    /// The bans, for clients behind a trusted front proxy (XDP sees only the proxy).
    pub lookup: Option<Arc<dyn BanCheck>>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub report: Mutex<crate::report::Report>,
    /// Fixed at start: the semaphore is sized by it.
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Shared {
    pub fn new(
        config: ProxyConfig,
        rules: Arc<RuleSet>,
        reject_message: String,
        bans: Option<BanSender>,
        enforce: Option<Arc<dyn BanCheck>>,
        observe: Observe,
    ) -> Arc<Self> {
        let max_sessions = config.max_sessions;
        let sessions = Arc::new(Semaphore::new(max_sessions));
        Arc::new(Shared {
            live: RwLock::new(Arc::new(Live { config, rules, reject_message })),
            bans,
            enforce,
            lookup: observe.lookup,
            metrics: observe.metrics,
            report: Mutex::new(crate::report::Report::new(observe.report_window)),
            max_sessions,
            sessions,
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// The settings new sessions start with.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("live config lock").clone()
    }

    /// Swaps in reloaded settings for the sessions that start from now on.
    pub fn replace(&self, live: Live) {
        *self.live.write().expect("live config lock") = Arc::new(live);
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, per_ip_limit: usize) -> Option<Admission> {
        let permit = self.sessions.clone().try_acquire_owned().ok()?;
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= per_ip_limit {
            return None;
        }
        *count += 1;
        Some(Admission { shared: self.clone(), ip, _permit: permit })
    }
}

/// A session's place in the limits, given back when dropped.
struct Admission {
    shared: Arc<Shared>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
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

/// A bound listener and whether it checks HELO.
pub struct Bound {
    pub listener: TcpListener,
    pub check_helo: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: io::Error,
}

/// Binds every listener (in a runtime). IPv6 sockets are v6-only, so `0.0.0.0:25` and
/// `[::]:25` coexist.
pub fn bind(listeners: &[ListenerConfig]) -> Result<Vec<Bound>, BindError> {
    bind_std(listeners)?
        .into_iter()
        .zip(listeners)
        .map(|((listener, check_helo), l)| {
            let listener = TcpListener::from_std(listener)
                .map_err(|source| BindError { address: l.address, source })?;
            Ok(Bound { listener, check_helo })
        })
        .collect()
}

/// Binds every listener before any runtime exists (the agent binds port 25 as root, then drops
/// privileges, then starts the runtime). Non-blocking, ready for [`bind`]'s conversion.
pub fn bind_std(
    listeners: &[ListenerConfig],
) -> Result<Vec<(std::net::TcpListener, bool)>, BindError> {
    listeners
        .iter()
        .map(|l| {
            let err = |source| BindError { address: l.address, source };
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(l.address),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(err)?;
            socket.set_reuse_address(true).map_err(err)?;
            if l.address.is_ipv6() {
                socket.set_only_v6(true).map_err(err)?;
            }
            socket.set_nonblocking(true).map_err(err)?;
            socket.bind(&l.address.into()).map_err(err)?;
            socket.listen(1024).map_err(err)?;
            Ok((socket.into(), l.check_helo))
        })
        .collect()
}

/// Accepts on every listener until `shutdown` completes. A failing session is logged, never
/// fatal.
pub async fn serve(listeners: Vec<Bound>, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let mut tasks = tokio::task::JoinSet::new();
    for bound in listeners {
        let shared = shared.clone();
        tasks.spawn(async move {
            loop {
                match bound.listener.accept().await {
                    Ok((stream, peer)) => {
                        let shared = shared.clone();
                        tokio::spawn(handle(shared, stream, peer, bound.check_helo));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    shutdown.await;
    tasks.shutdown().await;
    drain(&shared).await;
}

/// After the listeners close: waits for sessions in flight to end, up to
/// `proxy.shutdown_grace`, saying every second how many are left. What is still open then is
/// cut when the runtime stops.
async fn drain(shared: &Shared) {
    let grace = shared.live().config.shutdown_grace;
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

/// How a session ended, for its log line.
#[derive(Default)]
struct Outcome {
    helo: Option<String>,
    verdict: Option<crate::rules::Verdict>,
    up: u64,
    down: u64,
    spliced: bool,
    /// Bytes of the relayed session's client side that passed through user space: the HELO
    /// line and what the client pipelined after it (everything later is spliced). The MTA's
    /// replies are copied (to watch for an MTA that dies) and counted in `down`.
    copied: u64,
    end: &'static str,
    error: Option<String>,
}

async fn handle(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, check_helo: bool) {
    let started = Instant::now();
    let live = shared.live();
    let from = crate::addr::canonical(peer.ip());
    let mut local = client.local_addr().unwrap_or(peer);
    let mut peer = peer;
    // A trusted front proxy (load balancer) says who the client is; anyone else's PROXY header
    // is refused in the session.
    let balancer =
        live.config.trusted_proxies.iter().any(|net| net.contains(&from)).then_some(from);
    if let Some(balancer) = balancer {
        match read_inbound(&mut client, live.config.helo_timeout).await {
            Ok(header::Inbound::Proxied { client: real, local: dst }) => {
                peer = real;
                local = dst;
            }
            Ok(header::Inbound::Local) => {}
            Err(error) => {
                tracing::warn!(%balancer, %error, "trusted front proxy sent no valid PROXY header: connection closed");
                return;
            }
        }
    }
    let ip = crate::addr::canonical(peer.ip());
    // Behind a balancer XDP sees only the balancer, so the bans are checked here; without XDP,
    // for everyone.
    let check = if balancer.is_some() { shared.lookup.as_ref() } else { shared.enforce.as_ref() };
    if let Some(check) = check
        && check.banned(ip, crate::clock::boot_ns())
    {
        // What XDP would have done, as near as user space can: no greeting, just gone.
        tracing::debug!(client = %ip, via = ?balancer, "banned client closed at accept");
        return;
    }
    let Some(_admission) = shared.admit(ip, live.config.max_sessions_per_ip) else {
        let refusal = reply::line(421, "4.7.0", "Error: too many connections");
        let _ = send(&mut client, &refusal, REFUSAL_WRITE).await;
        tracing::warn!(client = %ip, "session refused: connection limit");
        return;
    };
    let _ = client.set_nodelay(true);
    let outcome = run_session(&live, client, peer, local, check_helo).await;
    let verdict = outcome.verdict.as_ref();
    let action = verdict.map_or("none", |v| match v.action {
        Action::Pass => "pass",
        Action::Reject => "reject",
        Action::Ban => "ban",
    });
    tracing::info!(
        client = %ip,
        helo = outcome.helo.as_deref().unwrap_or(""),
        verdict = action,
        rule = verdict.map_or("", |v| v.rule),
        reason = verdict.map_or("", |v| v.reason.as_str()),
        ttl = verdict.and_then(|v| v.ttl).map(crate::duration::format).unwrap_or_default(),
        bytes_in = outcome.up,
        bytes_out = outcome.down,
        spliced = outcome.spliced,
        copied = outcome.copied,
        ms = started.elapsed().as_millis() as u64,
        end = outcome.end,
        error = outcome.error.as_deref().unwrap_or(""),
        "session"
    );
    observe(&shared, ip, &outcome, action);
    if let (Some(verdict), Some(bans)) = (verdict, &shared.bans)
        && verdict.action == Action::Ban
    {
        // Never the MTA's own address (the gateway would cut itself off), nor a front proxy's
        // (every client behind it would be cut off).
        if ip == crate::addr::canonical(live.config.upstream.ip())
            || live.config.trusted_proxies.iter().any(|net| net.contains(&ip))
        {
            tracing::warn!(client = %ip, rule = verdict.rule, "not banning the MTA's own address");
            return;
        }
        bans.ban(BanRequest {
            client: ip,
            ttl: verdict.ttl.unwrap_or(Duration::from_secs(3600)),
            reason: format!("{}: {}", verdict.rule, outcome.helo.as_deref().unwrap_or("")),
        });
    }
}

/// Counts a finished session for the metrics and the tophelos report.
fn observe(shared: &Shared, ip: IpAddr, outcome: &Outcome, action: &'static str) {
    let verdict = outcome.verdict.as_ref();
    if let Some(helo) = &outcome.helo {
        let rejected_by = verdict.filter(|v| v.action != Action::Pass).map(|v| v.rule);
        let now = crate::clock::unix_ns() / 1_000_000_000;
        shared.report.lock().expect("report lock").record(now, helo, ip, rejected_by);
    }
    let Some(metrics) = &shared.metrics else { return };
    let rule = verdict.map_or("", |v| v.rule);
    metrics.sessions.get_or_create(&crate::metrics::VerdictLabels { verdict: action, rule }).inc();
    metrics.session_ends.get_or_create(&crate::metrics::EndLabels { end: outcome.end }).inc();
    if outcome.verdict.as_ref().is_some_and(|v| v.action == Action::Pass) {
        // Spliced: the client's side after the HELO line. Copied: that line and the replies.
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

async fn run_session(
    live: &Live,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    check_helo: bool,
) -> Outcome {
    let config = &live.config;
    let mut outcome = Outcome::default();
    let unavailable =
        reply::line(421, "4.3.0", "Error: service temporarily unavailable, try again later");

    // Who greets: the MTA (connected now, its banner relayed), or the proxy itself (the MTA
    // is connected only for a client whose HELO passes).
    let (mut upstream, host) = match config.greeting {
        GreetingMode::Mta => {
            let (mta, greeting) = match open_upstream(config, peer, local).await {
                Ok(opened) => opened,
                Err((end, error)) => {
                    return fail(&mut client, &unavailable, outcome, end, error).await;
                }
            };
            if send(&mut client, &greeting.bytes, config.idle_timeout).await.is_err() {
                outcome.end = "client_gone";
                return outcome;
            }
            outcome.down += greeting.bytes.len() as u64;
            if greeting.code != 220 {
                outcome.end = "upstream_refused";
                return outcome;
            }
            let host = greeting_host(&greeting.bytes).unwrap_or_else(|| "localhost".into());
            (Some(mta), host)
        }
        GreetingMode::Own => {
            let banner = format!("220 {} ESMTP\r\n", config.hostname);
            if send(&mut client, banner.as_bytes(), config.idle_timeout).await.is_err() {
                outcome.end = "client_gone";
                return outcome;
            }
            outcome.down += banner.len() as u64;
            (None, config.hostname.clone())
        }
    };

    // Client commands up to the verdict, and after a rejection.
    let mut session = Session::new(
        &live.rules,
        crate::addr::canonical(peer.ip()),
        !check_helo,
        &live.reject_message,
        host,
    );
    let mut buf: Vec<u8> = Vec::new();
    let helo_deadline = tokio::time::Instant::now() + config.helo_timeout;
    loop {
        // A PROXY header from a peer not in proxy.trusted_proxies: refused, never believed.
        if outcome.up == 0 && session.helo().is_none() && refuses_header(&buf) {
            let refusal =
                reply::line(554, "5.7.0", "Error: PROXY header from an untrusted address");
            let _ = send(&mut client, &refusal, config.idle_timeout).await;
            outcome.down += refusal.len() as u64;
            tracing::warn!(client = %peer.ip(), "PROXY header from an address not in proxy.trusted_proxies: refused");
            return finish(outcome, &session, "untrusted_proxy_header");
        }
        // Every complete line in the buffer, in order (PIPELINING).
        loop {
            let (len, content) = match scan_line(&buf, MAX_COMMAND_LINE) {
                LineScan::Line { len, content } => (len, content),
                LineScan::NeedMore => break,
                LineScan::TooLong => {
                    let _ = send(
                        &mut client,
                        &reply::line(500, "5.5.2", "Error: line too long"),
                        config.idle_timeout,
                    )
                    .await;
                    return finish(outcome, &session, "line_too_long");
                }
            };
            outcome.up += len as u64;
            let step = session.on_line(&buf[..content]);
            match step {
                Step::Reply(answer) => {
                    buf.drain(..len);
                    if send(&mut client, &answer, config.idle_timeout).await.is_err() {
                        return finish(outcome, &session, "client_gone");
                    }
                    outcome.down += answer.len() as u64;
                }
                Step::Close(answer) => {
                    if let Some(mut mta) = upstream.take() {
                        let _ = mta.write_all(b"QUIT\r\n").await;
                    }
                    let _ = send(&mut client, &answer, config.idle_timeout).await;
                    outcome.down += answer.len() as u64;
                    return finish(outcome, &session, "closed");
                }
                Step::Reject(answer) => {
                    buf.drain(..len);
                    if let Some(mut mta) = upstream.take() {
                        // The MTA's part ends here; its 221 is not awaited.
                        let _ = mta.write_all(b"QUIT\r\n").await;
                    }
                    if send(&mut client, &answer, config.idle_timeout).await.is_err() {
                        return finish(outcome, &session, "client_gone");
                    }
                    outcome.down += answer.len() as u64;
                }
                Step::Pass => {
                    let mut mta = match upstream.take() {
                        Some(mta) => mta,
                        None => match open_upstream(config, peer, local).await {
                            // The MTA's banner is ours to swallow: the client had ours.
                            Ok((mta, greeting)) if greeting.code == 220 => mta,
                            Ok((_, greeting)) => {
                                let said =
                                    String::from_utf8_lossy(&greeting.bytes).trim().to_owned();
                                outcome.error = Some(format!("MTA greeted with {said:?}"));
                                let _ = send(&mut client, &unavailable, config.idle_timeout).await;
                                return finish(outcome, &session, "upstream_refused");
                            }
                            Err((end, error)) => {
                                outcome.error = Some(error);
                                let _ = send(&mut client, &unavailable, config.idle_timeout).await;
                                return finish(outcome, &session, end);
                            }
                        },
                    };
                    // The HELO line and everything pipelined after it: the only bytes of the
                    // relayed session that pass through user space.
                    outcome.up += (buf.len() - len) as u64;
                    outcome.copied = buf.len() as u64;
                    if let Err(e) = mta.write_all(&buf).await {
                        let _ = send(&mut client, &unavailable, config.idle_timeout).await;
                        outcome.error = Some(e.to_string());
                        return finish(outcome, &session, "upstream_error");
                    }
                    buf.clear();
                    let mut outcome = finish(outcome, &session, "relayed");
                    let relayed = relay::relay(client, mta, config.idle_timeout).await;
                    outcome.up += relayed.up;
                    outcome.down += relayed.down;
                    outcome.spliced = relayed.spliced;
                    if relayed.upstream_lost {
                        // Told 421; never a ban (the verdict was a pass).
                        outcome.end = "upstream_lost";
                    }
                    if let Some(e) = relayed.error {
                        outcome.end = "relay_error";
                        outcome.error = Some(e.to_string());
                    }
                    return outcome;
                }
            }
        }
        // Read more: by the HELO deadline before a verdict, within the idle time after one.
        let deadline = if session.verdict().is_none() {
            helo_deadline
        } else {
            tokio::time::Instant::now() + config.idle_timeout
        };
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return finish(outcome, &session, "client_closed"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                outcome.error = Some(e.to_string());
                return finish(outcome, &session, "client_error");
            }
            Err(_) => {
                let _ = send(
                    &mut client,
                    &reply::line(421, "4.4.2", "Error: timeout exceeded"),
                    config.idle_timeout,
                )
                .await;
                return finish(outcome, &session, "timeout");
            }
        }
    }
}

/// Whether the first bytes of a session are a PROXY header (complete enough to tell).
fn refuses_header(buf: &[u8]) -> bool {
    buf.starts_with(b"PROXY ") || buf.starts_with(&header::V2_SIGNATURE)
}

/// Reads a trusted front proxy's PROXY header, exactly its bytes (peeked first, so none of the
/// client's SMTP is consumed), within `limit`.
async fn read_inbound(client: &mut TcpStream, limit: Duration) -> io::Result<header::Inbound> {
    let read = async {
        let mut peeked = vec![0u8; 1100];
        loop {
            let n = client.peek(&mut peeked).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a PROXY header",
                ));
            }
            match header::decode(&peeked[..n]) {
                header::Decoded::NeedMore if n < peeked.len() => {
                    // Wait for more than what is already there.
                    client.readable().await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                header::Decoded::NeedMore => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "PROXY header too long",
                    ));
                }
                header::Decoded::Header { len, inbound } => {
                    let mut skip = vec![0u8; len];
                    client.read_exact(&mut skip).await?;
                    return Ok(inbound);
                }
                header::Decoded::Invalid(why) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                }
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))?
}

/// Connects to the MTA (from the client's address in transparent mode), sends the PROXY header
/// and reads the MTA's greeting, all within `upstream_timeout`. Errors: the session's `end` and
/// what went wrong.
async fn open_upstream(
    config: &ProxyConfig,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(TcpStream, Greeting), (&'static str, String)> {
    let connect = async {
        match config.proxy_protocol {
            header::ProxyProtocol::Transparent => connect_as(peer.ip(), config.upstream).await,
            _ => TcpStream::connect(config.upstream).await,
        }
    };
    let mut upstream = match tokio::time::timeout(config.upstream_timeout, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(("upstream_unreachable", e.to_string())),
        Err(_) => return Err(("upstream_unreachable", "connect timed out".into())),
    };
    let _ = upstream.set_nodelay(true);
    let header = header::encode(config.proxy_protocol, peer, local);
    upstream.write_all(&header).await.map_err(|e| ("upstream_error", e.to_string()))?;
    let greeting = read_reply(&mut upstream, config.upstream_timeout)
        .await
        .map_err(|e| ("upstream_error", e.to_string()))?;
    Ok((upstream, greeting))
}

/// Writes to the client within `limit`: a client that stops reading cannot hold a session.
async fn send(client: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    tokio::time::timeout(limit, client.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))?
}

fn finish(mut outcome: Outcome, session: &Session<'_>, end: &'static str) -> Outcome {
    outcome.helo = session.helo().map(str::to_owned);
    outcome.verdict = session.verdict().cloned();
    outcome.end = end;
    outcome
}

async fn fail(
    client: &mut TcpStream,
    answer: &[u8],
    mut outcome: Outcome,
    end: &'static str,
    error: String,
) -> Outcome {
    let _ = send(client, answer, REFUSAL_WRITE).await;
    outcome.down += answer.len() as u64;
    outcome.end = end;
    outcome.error = Some(error);
    outcome
}

/// Connects to `upstream` from the client's own address (transparent mode).
async fn connect_as(client: IpAddr, upstream: SocketAddr) -> io::Result<TcpStream> {
    let client = crate::addr::canonical(client);
    if client.is_ipv4() != upstream.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "transparent mode cannot reach the MTA at {upstream} from {client}: give the MTA an address of each family"
            ),
        ));
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if client.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(client, 0).into())?;
    tokio::net::TcpSocket::from_std_stream(socket.into()).connect(upstream).await
}

struct Greeting {
    bytes: Vec<u8>,
    code: u16,
}

/// Reads one complete reply (the greeting) within `limit`.
async fn read_reply(upstream: &mut TcpStream, limit: Duration) -> io::Result<Greeting> {
    let read = async {
        let mut buf = Vec::new();
        loop {
            match scan_reply(&buf, MAX_COMMAND_LINE) {
                ReplyScan::Complete { len, code } => {
                    if len != buf.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "MTA spoke before it was asked",
                        ));
                    }
                    return Ok(Greeting { bytes: buf, code });
                }
                ReplyScan::Malformed => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MTA greeting is not an SMTP reply",
                    ));
                }
                ReplyScan::NeedMore => {}
            }
            buf.reserve(READ_CHUNK);
            let n = upstream.read_buf(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "MTA closed before its greeting",
                ));
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no greeting from the MTA in time"))?
}
