//! The transparent SMTP proxy: listeners, one task per session, the upstream connection with a
//! PROXY header, and the relay that takes over once a passed session is opaque.
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use self::session::{AfterReply, Opacity, Session, Step};
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
/// After a session's last reply and half-close: how long the client's remaining input is read
/// and dropped, so that closing does not reset the connection before the reply is read.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
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
    drain: watch::Sender<Drain>,
    refused: Throttled,
    accept_failed: Throttled,
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
            drain: watch::Sender::new(Drain::Running),
            refused: Throttled::default(),
            accept_failed: Throttled::default(),
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
                        if let Some(count) = shared.accept_failed.tick(Instant::now()) {
                            tracing::warn!(%error, count, "accept failed (count: since the last such line); out of file descriptors? raise LimitNOFILE or lower proxy.max_sessions");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    shutdown.await;
    tasks.shutdown().await;
    shared.drain.send_replace(Drain::Draining);
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

/// How a session ended, for its log line.
#[derive(Default)]
struct Outcome {
    helo: Option<String>,
    verdict: Option<crate::rules::Verdict>,
    up: u64,
    down: u64,
    spliced: bool,
    /// Bytes of the relayed session's client side that passed through user space: the command
    /// lines up to the point the session became opaque (message data and TLS are spliced).
    /// The MTA's replies are copied (to watch them) and counted in `down`.
    copied: u64,
    /// The session went opaque at STARTTLS: the rest was TLS.
    tls: bool,
    /// Every HELO/EHLO the proxy saw, when there was more than one.
    helos: Vec<String>,
    /// Rules that matched in `log` mode.
    logged: Vec<&'static str>,
    end: &'static str,
    error: Option<String>,
}

async fn handle(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, check_helo: bool) {
    let started = Instant::now();
    let live = shared.live();
    let from = crate::addr::canonical(peer.ip());
    let drain = shared.drain.subscribe();
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
        if let Some(count) = shared.refused.tick(Instant::now()) {
            tracing::warn!(
                client = %ip,
                count,
                "sessions refused at the connection limits (count: since the last such line; \
                 proxy.max_sessions, proxy.max_sessions_per_ip)"
            );
        }
        close_with(&mut client, &refusal).await;
        return;
    };
    let _ = client.set_nodelay(true);
    let outcome = run_session(&live, client, peer, local, check_helo, drain).await;
    let verdict = outcome.verdict.as_ref();
    let action = verdict.map_or("none", |v| match v.action {
        Action::Pass => "pass",
        Action::Reject => "reject",
        Action::Ban => "ban",
    });
    tracing::info!(
        client = %ip,
        helo = outcome.helo.as_deref().unwrap_or(""),
        helos = outcome.helos.join(" "),
        verdict = action,
        rule = verdict.map_or("", |v| v.rule),
        reason = verdict.map_or("", |v| v.reason.as_str()),
        logged = outcome.logged.join(","),
        ttl = verdict.and_then(|v| v.ttl).map(crate::duration::format).unwrap_or_default(),
        bytes_in = outcome.up,
        bytes_out = outcome.down,
        spliced = outcome.spliced,
        copied = outcome.copied,
        tls = outcome.tls,
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
    mut drain: watch::Receiver<Drain>,
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
                    outcome.error = Some(error);
                    outcome.down += close_with(&mut client, &unavailable).await;
                    outcome.end = end;
                    return outcome;
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

    let mut session = Session::new(
        &live.rules,
        crate::addr::canonical(peer.ip()),
        !check_helo,
        &live.reject_message,
        host,
    );
    // Client bytes not yet handled, and MTA bytes not yet relayed (a reply in pieces).
    let mut buf: Vec<u8> = Vec::new();
    let mut replies: Vec<u8> = Vec::new();
    let mut last_reply: Option<u16> = None;
    let helo_deadline = tokio::time::Instant::now() + config.helo_timeout;
    // The session's end, and the reply (if any) the client gets before the close.
    let (end, goodbye): (&'static str, Option<Vec<u8>>) = 'session: loop {
        // A PROXY header from a peer not in proxy.trusted_proxies: refused, never believed.
        if outcome.up == 0 && session.helo().is_none() && refuses_header(&buf) {
            tracing::warn!(client = %peer.ip(), "PROXY header from an address not in proxy.trusted_proxies: refused");
            let refusal =
                reply::line(554, "5.7.0", "Error: PROXY header from an untrusted address");
            break 'session ("untrusted_proxy_header", Some(refusal));
        }
        // Every complete line in the buffer, in order (PIPELINING), while the session may
        // take one.
        while !session.waiting() {
            let (len, content) = match scan_line(&buf, MAX_COMMAND_LINE) {
                LineScan::Line { len, content } => (len, content),
                LineScan::NeedMore => break,
                LineScan::TooLong => {
                    let too_long = reply::line(500, "5.5.2", "Error: line too long");
                    break 'session ("line_too_long", Some(too_long));
                }
            };
            outcome.up += len as u64;
            match session.on_line(&buf[..content]) {
                Step::Reply(answer) => {
                    buf.drain(..len);
                    if send(&mut client, &answer, config.idle_timeout).await.is_err() {
                        break 'session ("client_gone", None);
                    }
                    outcome.down += answer.len() as u64;
                }
                Step::Close(answer) => {
                    buf.drain(..len);
                    break 'session ("closed", Some(answer));
                }
                Step::Reject(answer) => {
                    buf.drain(..len);
                    quit(&mut upstream).await;
                    if send(&mut client, &answer, config.idle_timeout).await.is_err() {
                        break 'session ("client_gone", None);
                    }
                    outcome.down += answer.len() as u64;
                }
                Step::Defer => {
                    buf.drain(..len);
                }
                Step::Pass | Step::Forward => {
                    if upstream.is_none() {
                        match open_upstream(config, peer, local).await {
                            // The MTA's banner is ours to swallow: the client had ours.
                            Ok((mta, greeting)) if greeting.code == 220 => upstream = Some(mta),
                            Ok((_, greeting)) => {
                                let said =
                                    String::from_utf8_lossy(&greeting.bytes).trim().to_owned();
                                outcome.error = Some(format!("MTA greeted with {said:?}"));
                                break 'session ("upstream_refused", Some(unavailable));
                            }
                            Err((end, error)) => {
                                outcome.error = Some(error);
                                break 'session (end, Some(unavailable));
                            }
                        }
                    }
                    let mta = upstream.as_mut().expect("connected above");
                    // Command lines pass through user space; message data never does.
                    outcome.copied += len as u64;
                    if let Err(e) = write_within(mta, &buf[..len], config.idle_timeout).await {
                        outcome.error = Some(e.to_string());
                        break 'session ("upstream_error", Some(unavailable));
                    }
                    buf.drain(..len);
                }
                Step::Opaque => {
                    // BDAT: its line is forwarded with what follows it, in the relay.
                    outcome.up -= len as u64;
                    let mta = upstream.take().expect("a relaying session has its MTA");
                    return relay_rest(
                        outcome,
                        &session,
                        config,
                        client,
                        mta,
                        buf,
                        replies,
                        Opacity::Data,
                        &mut drain,
                    )
                    .await;
                }
            }
        }

        // Wait for the client (unless the session waits for the MTA), the MTA's replies
        // (while lines go to it), the deadline, or a shutdown.
        let deadline = if session.verdict().is_none() {
            helo_deadline
        } else {
            tokio::time::Instant::now() + config.idle_timeout
        };
        let relaying = session.relaying();
        let hears_mta = upstream.is_some() && session.hears_mta();
        // Mail may be on its way through a relaying session: it gets the drain's grace. A
        // session before its verdict, or rejected, carries none and is told so at once.
        let stop_on = if relaying { Drain::Cut } else { Drain::Draining };
        let reading_client = !session.waiting();
        buf.reserve(READ_CHUNK);
        replies.reserve(READ_CHUNK);
        let mta = upstream.as_mut();
        tokio::select! {
            read = client.read_buf(&mut buf), if reading_client => match read {
                Ok(0) if relaying => {
                    // The client closed with its commands sent: the relay passes the
                    // half-close on and relays what the MTA still says.
                    let mta = upstream.take().expect("relaying");
                    return relay_rest(
                        outcome, &session, config, client, mta, buf, replies, Opacity::Data,
                        &mut drain,
                    )
                    .await;
                }
                Ok(0) => break 'session ("client_closed", None),
                Ok(_) => {}
                Err(e) => {
                    outcome.error = Some(e.to_string());
                    break 'session ("client_error", None);
                }
            },
            read = async { mta.expect("guarded").read_buf(&mut replies).await }, if hears_mta => match read {
                Ok(0) | Err(_) => {
                    upstream = None;
                    if replies.is_empty() && matches!(last_reply, Some(221 | 421)) {
                        break 'session ("relayed", None);
                    }
                    // The MTA died mid-session: the client is told, never banned.
                    let lost = if replies.is_empty() {
                        relay::UPSTREAM_LOST.to_vec()
                    } else {
                        [&replies[..], b"\r\n", relay::UPSTREAM_LOST].concat()
                    };
                    break 'session ("upstream_lost", Some(lost));
                }
                Ok(_) => {
                    // Relay every complete reply; what it means may end the watching.
                    loop {
                        let (len, code) = match scan_reply(&replies, MAX_COMMAND_LINE) {
                            ReplyScan::Complete { len, code } => (len, code),
                            ReplyScan::NeedMore => break,
                            ReplyScan::Malformed if !session.relaying() => {
                                outcome.error = Some("MTA reply is not SMTP".into());
                                break 'session ("upstream_error", Some(unavailable));
                            }
                            ReplyScan::Malformed => {
                                // Not SMTP as the proxy knows it: stop reading, relay blind.
                                let mta = upstream.take().expect("relaying");
                                return relay_rest(
                                    outcome, &session, config, client, mta, buf, replies,
                                    Opacity::Tls, &mut drain,
                                )
                                .await;
                            }
                        };
                        if send(&mut client, &replies[..len], config.idle_timeout).await.is_err() {
                            break 'session ("client_gone", None);
                        }
                        outcome.down += len as u64;
                        replies.drain(..len);
                        last_reply = Some(code);
                        match session.on_reply(code) {
                            AfterReply::Continue => {}
                            AfterReply::Opaque(opacity) => {
                                let mta = upstream.take().expect("relaying");
                                return relay_rest(
                                    outcome, &session, config, client, mta, buf, replies,
                                    opacity, &mut drain,
                                )
                                .await;
                            }
                            AfterReply::Reject(answer) => {
                                quit(&mut upstream).await;
                                replies.clear();
                                if send(&mut client, &answer, config.idle_timeout).await.is_err() {
                                    break 'session ("client_gone", None);
                                }
                                outcome.down += answer.len() as u64;
                                break;
                            }
                        }
                    }
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                break 'session ("timeout", Some(reply::line(421, "4.4.2", "Error: timeout exceeded")));
            }
            () = async { let _ = drain.wait_for(|d| *d >= stop_on).await; } => {
                let closing = reply::line(421, "4.3.2", "Error: service shutting down, try again later");
                break 'session ("shutdown", Some(closing));
            }
        }
    };
    quit(&mut upstream).await;
    if let Some(goodbye) = goodbye {
        outcome.down += close_with(&mut client, &goodbye).await;
    }
    finish(outcome, &session, end)
}

/// After the session became opaque: forwards what is buffered each way, then relays the rest
/// untouched (splice for the client's side).
#[allow(clippy::too_many_arguments)]
async fn relay_rest(
    mut outcome: Outcome,
    session: &Session<'_>,
    config: &ProxyConfig,
    mut client: TcpStream,
    mut mta: TcpStream,
    buf: Vec<u8>,
    replies: Vec<u8>,
    opacity: Opacity,
    drain: &mut watch::Receiver<Drain>,
) -> Outcome {
    outcome.up += buf.len() as u64;
    outcome.copied += buf.len() as u64;
    outcome.tls = opacity == Opacity::Tls;
    if let Err(e) = write_within(&mut mta, &buf, config.idle_timeout).await {
        outcome.error = Some(e.to_string());
        return finish(outcome, session, "upstream_error");
    }
    if send(&mut client, &replies, config.idle_timeout).await.is_err() {
        return finish(outcome, session, "client_gone");
    }
    outcome.down += replies.len() as u64;
    let mut outcome = finish(outcome, session, "relayed");
    let cut = async {
        let _ = drain.wait_for(|d| *d == Drain::Cut).await;
    };
    let relayed = relay::relay(client, mta, config.idle_timeout, opacity, cut).await;
    outcome.up += relayed.up;
    outcome.down += relayed.down;
    outcome.spliced = relayed.spliced;
    if relayed.upstream_lost {
        // Told 421; never a ban (the verdict was a pass).
        outcome.end = "upstream_lost";
    }
    if relayed.cut {
        outcome.end = "shutdown";
    } else if let Some(e) = relayed.error {
        outcome.end = "relay_error";
        outcome.error = Some(e.to_string());
    }
    outcome
}

/// Tells a connected MTA that its part of the session is over; its 221 is not awaited.
async fn quit(upstream: &mut Option<TcpStream>) {
    if let Some(mut mta) = upstream.take() {
        let _ = tokio::time::timeout(REFUSAL_WRITE, mta.write_all(b"QUIT\r\n")).await;
    }
}

/// Ends a session the way an MTA does: the last reply, a half-close, then whatever the client
/// still sends is read and dropped for a short while. Closing with unread input would make the
/// kernel answer with a reset, and the reset destroys the reply before the client reads it.
/// Returns the bytes written.
async fn close_with(client: &mut TcpStream, answer: &[u8]) -> u64 {
    if send(client, answer, REFUSAL_WRITE).await.is_err() {
        return 0;
    }
    let _ = client.shutdown().await;
    let linger = async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, linger).await;
    answer.len() as u64
}

/// Writes to the MTA within `limit`.
async fn write_within(mta: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    tokio::time::timeout(limit, mta.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "MTA does not read"))?
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
    if session.helos().len() > 1 {
        outcome.helos = session.helos().to_vec();
    }
    outcome.logged = session.logged().to_vec();
    outcome.verdict = session.verdict().cloned();
    outcome.end = end;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
