//! One session's I/O loop, in the shape of mini-redis's `Handler`: a small struct that owns the
//! sockets and the [`Session`], reads, asks the session, writes. Every reply decision is the
//! session's (sans-IO); this file only moves bytes, waits, and carries out the steps.
//!
//! The loop: greet (the proxy's own banner, or the MTA's), then take every step the buffered
//! input allows, then wait for the first of: client bytes (unless the session waits for the
//! MTA), MTA replies (while lines go to it), the deadline, a shutdown. The deadline is the
//! pregreet wait's end while the greeting waits (the client then passed: the final line, and
//! the pass cache remembers it), then the HELO timeout, then the idle timeout. It ends in a
//! close with a last reply, or, once the session is opaque, in [`relay`](super::relay).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::outcome::Outcome;
use super::session::{AfterReply, Opacity, Session, Step};
use super::upstream::{self, Greeting};
use super::{Drain, relay};
use crate::config::{GreetingMode, ProxyConfig};
use crate::dns::{Dns, Need};
use crate::judge::{Client, End, Judge, Live};
use crate::rules::{Action, ClientDns, DnsFacts, HeloDns};
use crate::smtp::MAX_COMMAND_LINE;
use crate::smtp::reply::{self, ReplyScan, greeting_host, scan_reply};

/// Bytes read at a time. Reads go straight into the session's buffer, which starts small: an
/// idle session (a bot that never sends HELO) holds about 1 KiB of it.
const READ_CHUNK: usize = 1024;
/// How long a last reply before a close may take to write.
const LAST_WRITE: Duration = Duration::from_secs(5);
/// After a session's last reply and half-close: how long the client's remaining input is read
/// and dropped, so that closing does not reset the connection before the reply is read.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What the loop does next.
enum Flow {
    Next,
    /// End the session with this reply (if any) to the client.
    Close(End, Option<Vec<u8>>),
    /// The session is opaque: relay the rest.
    Opaque(Opacity),
}

/// What a session is given besides its connection (mini-redis's `Handler` gets the shared
/// database and the shutdown signal the same way).
pub(super) struct Context<'a> {
    pub judge: &'a Judge,
    /// The settings the session started with, kept to its end.
    pub live: &'a Live,
    pub who: Client,
    /// The client's address and port, and the address it connected to, as the MTA is told
    /// (a trusted front proxy's header may have named them).
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub drain: watch::Receiver<Drain>,
    /// The MTA's answers to HELO and EHLO, as the last passed session heard them.
    pub learned: &'a upstream::Learned,
}

/// Whether any HELO of this client is judged at all (not allowlisted, not on a listener that
/// judges none): only then is DNS worth asking.
fn judged_at_all(live: &Live, who: &Client) -> bool {
    !who.exempt && !live.rules.allowlist.iter().any(|net| net.contains(&who.ip))
}

/// The client's forward-confirmed reverse name: known at accept (cached), or looked up from
/// then on, the lookup aborted if the session ends first.
enum Reverse {
    Known(ClientDns),
    Asked(tokio::task::JoinHandle<Option<ClientDns>>),
}

impl Reverse {
    /// The answer, waiting for it (`None`: no slot was free, or the task failed).
    async fn get(&mut self) -> Option<ClientDns> {
        match self {
            Reverse::Known(known) => Some(known.clone()),
            Reverse::Asked(lookup) => lookup.await.ok().flatten(),
        }
    }
}

impl Drop for Reverse {
    fn drop(&mut self) {
        if let Reverse::Asked(lookup) = self {
            lookup.abort();
        }
    }
}

/// Lookups in the background for checks in `log` mode (the session never waits for them):
/// what they find joins the session's log if it comes before the session ends. Aborted if the
/// session ends first.
struct Late {
    helo: String,
    task: tokio::task::JoinHandle<DnsFacts>,
}

impl Late {
    /// The answer if it is in.
    fn ready(&mut self) -> Option<DnsFacts> {
        use futures_util::FutureExt as _;
        if !self.task.is_finished() {
            return None;
        }
        (&mut self.task).now_or_never().and_then(Result::ok)
    }
}

impl Drop for Late {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) struct Handler<'a> {
    judge: &'a Judge,
    learned: &'a upstream::Learned,
    live: &'a Live,
    config: &'a ProxyConfig,
    who: Client,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    upstream: Option<TcpStream>,
    session: Session<'a>,
    /// MTA bytes not relayed yet (a reply in pieces).
    replies: Vec<u8>,
    last_reply: Option<u16>,
    outcome: Outcome,
    drain: watch::Receiver<Drain>,
    helo_deadline: tokio::time::Instant,
    /// The end of the pregreet wait, while the greeting waits.
    greet_deadline: tokio::time::Instant,
    /// A ban verdict was told to the judge (once).
    condemned: bool,
    /// When the client pregreeted, after the greeting began.
    pregreet_ms: Option<u64>,
    /// The client's reverse name on its way, for the DNS checks (only with a resolver).
    reverse: Option<Reverse>,
    /// Background lookups for the log (boxed: rare, and a session lives long).
    late: Option<Box<Late>>,
}

impl<'a> Handler<'a> {
    /// A handler for one admitted session. `input`: client bytes already read (after a
    /// trusted front proxy's header).
    pub(super) fn new(context: Context<'a>, client: TcpStream, input: Vec<u8>) -> Self {
        let Context { judge, live, who, peer, local, drain, learned } = context;
        let config = &live.config;
        let mut session =
            Session::new(judge.law(live), who, &live.reject_message, config.hostname.clone());
        session.learned(learned.reply(true).as_deref(), learned.reply(false).as_deref());
        session.input().extend_from_slice(&input);
        // The DNS checks: the client's reverse names are looked up from now, in the background
        // (a client seen lately is known already: no task), and the HELO name when the HELO
        // comes, if DNS can still decide it.
        let reverse = match judge.dns() {
            Some(dns) if judged_at_all(live, &who) => {
                session.enable_dns();
                Some(match dns.cached_client(who.ip) {
                    Some(known) => Reverse::Known(known),
                    None => {
                        let (dns, ip) = (dns.clone(), who.ip);
                        Reverse::Asked(tokio::spawn(
                            async move { dns.client(ip, Need::Optional).await },
                        ))
                    }
                })
            }
            _ => None,
        };
        let now = tokio::time::Instant::now();
        Handler {
            judge,
            learned,
            live,
            config,
            who,
            client,
            peer,
            local,
            upstream: None,
            session,
            replies: Vec::new(),
            last_reply: None,
            outcome: Outcome::default(),
            drain,
            helo_deadline: now,
            greet_deadline: now,
            condemned: false,
            pregreet_ms: None,
            reverse,
            late: None,
        }
    }

    /// Runs the session to its end.
    pub(super) async fn run(mut self) -> Outcome {
        if let Err(end) = self.greet().await {
            return self.finish(end);
        }
        self.serve().await
    }

    /// Who greets: the MTA (connected now, its banner relayed), or the proxy itself (the MTA
    /// is connected only for a client whose HELO passes), with the pregreet test unless the
    /// client passed it lately. Then the deadlines start.
    async fn greet(&mut self) -> Result<(), End> {
        let config = self.config;
        let banner = match config.greeting {
            GreetingMode::Mta => {
                let (mta, greeting) =
                    match Box::pin(upstream::open(config, self.peer, self.local)).await {
                        Ok(opened) => opened,
                        Err((end, error)) => {
                            self.outcome.error = Some(error);
                            self.outcome.down += close_with(&mut self.client, &unavailable()).await;
                            return Err(end);
                        }
                    };
                self.upstream = Some(mta);
                if greeting.code == 220 {
                    let host = greeting_host(&greeting.bytes);
                    self.session.set_host(host.unwrap_or_else(|| "localhost".into()));
                }
                greeting
            }
            GreetingMode::Own => {
                let passed = self.judge.passes().passed(self.who.ip, unix_secs());
                let teaser = self.session.takes_pregreet_test() && !passed;
                Greeting { code: 220, bytes: self.session.greet(teaser) }
            }
        };
        if send(&mut self.client, &banner.bytes, config.idle_timeout).await.is_err() {
            return Err(End::ClientGone);
        }
        self.outcome.down += banner.bytes.len() as u64;
        if banner.code != 220 {
            return Err(End::UpstreamRefused);
        }
        let now = tokio::time::Instant::now();
        self.greet_deadline = now + config.pregreet.wait;
        // The HELO timeout counts from the final greeting line.
        let wait =
            if self.session.greeting_pending() { config.pregreet.wait } else { Duration::ZERO };
        self.helo_deadline = now + wait + config.helo_timeout;
        Ok(())
    }
}

impl Handler<'_> {
    async fn serve(mut self) -> Outcome {
        let flow = loop {
            let flow = self.steps().await;
            self.start_late();
            self.note_pregreet();
            self.condemn_once();
            if !matches!(flow, Flow::Next) {
                break flow;
            }
            let flow = self.wait().await;
            self.condemn_once();
            if !matches!(flow, Flow::Next) {
                break flow;
            }
        };
        // The relay's, the close's and the MTA connection's futures are boxed: inline, they would
        // make every session's future as large as the largest of them for its whole life, the
        // idle ones (most of them, under a bot flood) included.
        match flow {
            Flow::Opaque(opacity) => Box::pin(self.relay(opacity)).await,
            Flow::Close(end, goodbye) => Box::pin(self.close(end, goodbye)).await,
            Flow::Next => unreachable!("the loop ends on another flow"),
        }
    }

    /// A ban verdict takes effect at accept from now on (see `Court::condemn`), not when the
    /// session ends and its ban is queued.
    fn condemn_once(&mut self) {
        if self.condemned {
            return;
        }
        if let Some(verdict) = self.session.verdict().filter(|v| v.action == Action::Ban) {
            self.judge.condemn(&self.who, verdict, self.live);
            self.condemned = true;
        }
    }

    /// A pregreet is seen in the first steps after the read that brought it: when, for the log.
    fn note_pregreet(&mut self) {
        if self.pregreet_ms.is_none() && self.session.pregreet().is_some() {
            let began = self.greet_deadline - self.config.pregreet.wait;
            self.pregreet_ms = Some(began.elapsed().as_millis() as u64);
        }
    }

    /// Every step the buffered input allows.
    async fn steps(&mut self) -> Flow {
        let mut next = self.session.next_step();
        while let Some(step) = next.take() {
            let flow = match step {
                Step::Lookup { helo, client, need } => {
                    // Boxed, like the relay's: the resolver's futures are large, and inline
                    // they would make every session's future (the idle bots' too) as large.
                    let facts = Box::pin(self.lookups(helo.as_deref(), client, need)).await;
                    next = Some(self.session.on_dns(facts));
                    continue;
                }
                Step::Reply(answer) => self.tell(&answer).await,
                Step::Close(answer, end) => Flow::Close(end, Some(answer)),
                Step::Reject(answer) => {
                    upstream::quit(&mut self.upstream).await;
                    self.tell(&answer).await
                }
                Step::Defer => Flow::Next,
                Step::Pass(line) | Step::Forward(line) | Step::Chunk(line) => {
                    self.forward(&line).await
                }
                Step::Stream(len) => Box::pin(self.stream(len)).await,
            };
            if !matches!(flow, Flow::Next) {
                return flow;
            }
            next = self.session.next_step();
        }
        Flow::Next
    }

    /// The HELO name's records (`helo`) and the client's forward-confirmed reverse name
    /// (`client`; looked up from accept), in parallel, each bounded by `dns.timeout`: the
    /// session waits for the slower one. A part not asked for, or without a free slot where
    /// the session can go without, stays `NotLooked`.
    async fn lookups(&mut self, helo: Option<&str>, client: bool, need: Need) -> DnsFacts {
        let Some(dns) = self.judge.dns() else { return DnsFacts::default() };
        let dns: &Dns = dns;
        let ip = self.who.ip;
        let mut reverse = if client { self.reverse.take() } else { None };
        let client_dns = async {
            if !client {
                return ClientDns::NotLooked;
            }
            let known = match reverse.as_mut() {
                Some(reverse) => reverse.get().await,
                None => None,
            };
            match known {
                Some(known) => known,
                None => dns.client(ip, need).await.unwrap_or_default(),
            }
        };
        let helo_dns = async {
            match helo {
                Some(name) => dns.helo(name, need).await.unwrap_or_default(),
                None => HeloDns::NotLooked,
            }
        };
        let (helo, client) = tokio::join!(helo_dns, client_dns);
        if client != ClientDns::NotLooked {
            self.reverse = Some(Reverse::Known(client.clone()));
        }
        DnsFacts { helo, client }
    }

    /// A HELO judged whose `log` checks would read DNS: its lookups start in the background
    /// (never waited for; skipped when every lookup slot is taken).
    fn start_late(&mut self) {
        let Some(helo) = self.session.take_late() else { return };
        let Some(dns) = self.judge.dns().cloned() else { return };
        let (ip, name) = (self.who.ip, helo.clone());
        let mut reverse = self.reverse.take();
        let task = tokio::spawn(async move {
            let client = async {
                let known = match reverse.as_mut() {
                    Some(reverse) => reverse.get().await,
                    None => None,
                };
                match known {
                    Some(known) => known,
                    None => dns.client(ip, Need::Optional).await.unwrap_or_default(),
                }
            };
            let (helo, client) = tokio::join!(
                async { dns.helo(&name, Need::Optional).await.unwrap_or_default() },
                client
            );
            DnsFacts { helo, client }
        });
        self.late = Some(Box::new(Late { helo, task }));
    }

    /// The background lookups' answer, if it is in: it joins the session's log.
    fn join_late(&mut self) {
        if let Some(mut late) = self.late.take() {
            match late.ready() {
                Some(facts) => self.session.on_late_dns(&late.helo, facts),
                None => self.late = Some(late),
            }
        }
    }

    /// Writes to the client.
    async fn tell(&mut self, bytes: &[u8]) -> Flow {
        if send(&mut self.client, bytes, self.config.idle_timeout).await.is_err() {
            return Flow::Close(End::ClientGone, None);
        }
        self.outcome.down += bytes.len() as u64;
        Flow::Next
    }

    /// A line for the MTA, connecting it first when the proxy greeted itself.
    async fn forward(&mut self, line: &[u8]) -> Flow {
        if self.upstream.is_none() {
            match Box::pin(upstream::open(self.config, self.peer, self.local)).await {
                // The MTA's banner is ours to swallow: the client had ours.
                Ok((mta, greeting)) if greeting.code == 220 => self.upstream = Some(mta),
                Ok((_, greeting)) => {
                    let said = String::from_utf8_lossy(&greeting.bytes).trim().to_owned();
                    self.outcome.error = Some(format!("MTA greeted with {said:?}"));
                    return Flow::Close(End::UpstreamRefused, Some(unavailable()));
                }
                Err((end, error)) => {
                    self.outcome.error = Some(error);
                    return Flow::Close(end, Some(unavailable()));
                }
            }
        }
        let mta = self.upstream.as_mut().expect("connected above");
        // Command lines pass through user space; message data never does.
        self.outcome.copied += line.len() as u64;
        if let Err(e) = write_within(mta, line, self.config.idle_timeout).await {
            self.outcome.error = Some(e.to_string());
            return Flow::Close(End::UpstreamError, Some(unavailable()));
        }
        Flow::Next
    }

    /// The rest of a BDAT chunk, `len` bytes, straight from the client to the MTA (spliced
    /// when many), within the idle timeout, cut by a shutdown past its grace like a relay.
    async fn stream(&mut self, len: u64) -> Flow {
        let mta = self.upstream.as_ref().expect("a chunk follows a relayed BDAT");
        let drain = &mut self.drain;
        let cut = async {
            let _ = drain.wait_for(|d| *d == Drain::Cut).await;
        };
        let moved = tokio::select! {
            moved = relay::move_exact(&self.client, mta, len, self.config.idle_timeout) => moved,
            () = cut => {
                let (answer, end) = self.session.on_shutdown();
                return Flow::Close(end, Some(answer));
            }
        };
        match moved {
            Ok(moved) => {
                self.session.streamed(moved.moved);
                self.outcome.copied += moved.copied;
                self.outcome.spliced |= moved.copied < moved.moved;
                if moved.client_closed {
                    // Mid-chunk: the MTA sees the end of stream and drops the transaction.
                    Flow::Close(End::ClientClosed, None)
                } else {
                    Flow::Next
                }
            }
            Err(e) => {
                self.outcome.error = Some(e.to_string());
                match (e.side, e.kind()) {
                    (crate::judge::Side::Client, io::ErrorKind::TimedOut) => {
                        let (answer, end) = self.session.on_timeout();
                        Flow::Close(end, Some(answer))
                    }
                    (crate::judge::Side::Client, _) => Flow::Close(End::ClientError, None),
                    _ => Flow::Close(End::UpstreamError, Some(unavailable())),
                }
            }
        }
    }

    /// Waits for the client (unless the session waits for the MTA), the MTA's replies (while
    /// they are read), the deadline, or a shutdown.
    async fn wait(&mut self) -> Flow {
        let deadline = if self.session.greeting_pending() {
            self.greet_deadline
        } else if self.session.verdict().is_none() {
            self.helo_deadline
        } else {
            tokio::time::Instant::now() + self.config.idle_timeout
        };
        let relaying = self.session.relaying();
        let hears_mta = self.upstream.is_some() && self.session.hears_mta();
        // Mail may be on its way through a relaying session in a transaction: it gets the
        // drain's grace. A session before its verdict, rejected, or relaying but idle between
        // transactions carries none and is told so at once (the MTA gets QUIT), as Postfix's
        // smtpd is on a stop; one that goes idle between transactions during the grace too.
        let carries_mail = relaying && !self.session.between_transactions();
        let stop_on = if carries_mail { Drain::Cut } else { Drain::Draining };
        let reading_client = !self.session.waiting();
        let input = self.session.input();
        input.reserve(READ_CHUNK);
        if hears_mta {
            self.replies.reserve(READ_CHUNK);
        }
        let mta = self.upstream.as_mut();
        let replies = &mut self.replies;
        let drain = &mut self.drain;
        tokio::select! {
            read = self.client.read_buf(input), if reading_client => match read {
                // The client closed with its commands sent: the relay passes the half-close
                // on and relays what the MTA still says.
                Ok(0) if relaying => Flow::Opaque(Opacity::Data),
                Ok(0) => Flow::Close(End::ClientClosed, None),
                Ok(_) => Flow::Next,
                Err(e) => {
                    self.outcome.error = Some(e.to_string());
                    Flow::Close(End::ClientError, None)
                }
            },
            read = async { mta.expect("guarded").read_buf(replies).await }, if hears_mta => match read {
                Ok(0) | Err(_) => self.mta_ended(),
                Ok(_) => self.on_replies().await,
            },
            () = tokio::time::sleep_until(deadline) => {
                if self.session.greeting_pending() {
                    // The client stayed silent through the wait: it passed.
                    let greeting = self.session.on_greet_wait();
                    let pregreet = &self.config.pregreet;
                    let (ttl, size) = (pregreet.pass_ttl, pregreet.pass_cache_size);
                    self.judge.passes().pass(self.peer.ip(), unix_secs(), ttl, size);
                    return self.tell(&greeting).await;
                }
                let (answer, end) = self.session.on_timeout();
                Flow::Close(end, Some(answer))
            }
            () = async { let _ = drain.wait_for(|d| *d >= stop_on).await; } => {
                let (answer, end) = self.session.on_shutdown();
                Flow::Close(end, Some(answer))
            }
        }
    }

    /// The MTA's side ended: after its goodbye that is the session's end; otherwise it died
    /// mid-session, and the client is told (never banned).
    fn mta_ended(&mut self) -> Flow {
        self.upstream = None;
        if self.replies.is_empty() && matches!(self.last_reply, Some(221 | 421)) {
            return Flow::Close(End::Relayed, None);
        }
        let lost = if self.replies.is_empty() {
            relay::UPSTREAM_LOST.to_vec()
        } else {
            [&self.replies[..], b"\r\n", relay::UPSTREAM_LOST].concat()
        };
        self.replies.clear();
        Flow::Close(End::UpstreamLost, Some(lost))
    }

    /// Relays every complete reply to the client, in order; what one means may end the
    /// watching (opaque) or release a deferred rejection.
    async fn on_replies(&mut self) -> Flow {
        loop {
            let (len, code) = match scan_reply(&self.replies, MAX_COMMAND_LINE) {
                ReplyScan::Complete { len, code } => (len, code),
                ReplyScan::NeedMore => return Flow::Next,
                ReplyScan::Malformed if !self.session.relaying() => {
                    self.outcome.error = Some("MTA reply is not SMTP".into());
                    return Flow::Close(End::UpstreamError, Some(unavailable()));
                }
                // Not SMTP as the proxy knows it: stop reading, relay blind.
                ReplyScan::Malformed => return Flow::Opaque(Opacity::Tls),
            };
            let reply: Vec<u8> = self.replies.drain(..len).collect();
            if let flow @ Flow::Close(..) = self.tell(&reply).await {
                return flow;
            }
            self.last_reply = Some(code);
            let after = self.session.on_reply(code, &reply);
            if let Some((ehlo, reply)) = self.session.take_learned() {
                self.learned.learn(ehlo, reply);
            }
            match after {
                AfterReply::Continue => {}
                AfterReply::Opaque(opacity) => return Flow::Opaque(opacity),
                AfterReply::Reject(answer) => {
                    upstream::quit(&mut self.upstream).await;
                    self.replies.clear();
                    return self.tell(&answer).await;
                }
            }
        }
    }

    /// The session is opaque: what is buffered goes on each way, then the relay moves the rest
    /// untouched (splice for the client's side).
    async fn relay(mut self, opacity: Opacity) -> Outcome {
        let rest = self.session.take_input();
        self.outcome.copied += rest.len() as u64;
        self.outcome.up = self.session.consumed() + rest.len() as u64;
        self.outcome.tls = opacity == Opacity::Tls;
        let mut mta = self.upstream.take().expect("an opaque session has its MTA");
        if let Err(e) = write_within(&mut mta, &rest, self.config.idle_timeout).await {
            self.outcome.error = Some(e.to_string());
            return self.finish(End::UpstreamError);
        }
        let replies = std::mem::take(&mut self.replies);
        if send(&mut self.client, &replies, self.config.idle_timeout).await.is_err() {
            return self.finish(End::ClientGone);
        }
        self.outcome.down += replies.len() as u64;
        let mut outcome = self.finish(End::Relayed);
        let mut drain = self.drain;
        let cut = async {
            let _ = drain.wait_for(|d| *d == Drain::Cut).await;
        };
        let late = self.late.take();
        let relayed = relay::relay(self.client, mta, self.config.idle_timeout, opacity, cut).await;
        // The log lookups had the whole relay to answer.
        if let Some(mut late) = late
            && let Some(facts) = late.ready()
        {
            self.session.on_late_dns(&late.helo, facts);
            outcome.logged = self.session.logged().to_vec();
            outcome.verdict = self.session.verdict().cloned();
            outcome.dns = self.session.dns();
        }
        outcome.up += relayed.up;
        outcome.down += relayed.down;
        outcome.spliced = relayed.spliced;
        outcome.copied += relayed.copied;
        if relayed.upstream_lost {
            // Told 421; never a ban (the verdict was a pass).
            outcome.end = End::UpstreamLost;
        }
        if relayed.cut {
            outcome.end = End::Shutdown;
        } else if let Some(e) = relayed.error {
            outcome.end = End::RelayError(e.side);
            outcome.error = Some(e.to_string());
        }
        outcome
    }

    /// Ends the session: a connected MTA gets QUIT, the client its last reply and a clean close.
    async fn close(mut self, end: End, goodbye: Option<Vec<u8>>) -> Outcome {
        upstream::quit(&mut self.upstream).await;
        if let Some(goodbye) = goodbye {
            self.outcome.down += close_with(&mut self.client, &goodbye).await;
        }
        self.outcome.up = self.session.consumed();
        self.finish(end)
    }

    fn finish(&mut self, end: End) -> Outcome {
        self.join_late();
        let mut outcome = std::mem::take(&mut self.outcome);
        outcome.dns = self.session.dns();
        outcome.helo = self.session.helo().map(str::to_owned);
        if self.session.helos().len() > 1 {
            outcome.helos = self.session.helos().to_vec();
        }
        outcome.logged = self.session.logged().to_vec();
        outcome.pregreet = self.session.pregreet().map(|p| {
            let ms = self.pregreet_ms.unwrap_or_default();
            format!("{} bytes after {ms} ms: {}", p.bytes, p.text)
        });
        outcome.verdict = self.session.verdict().cloned();
        outcome.accepted = self.session.accepted();
        outcome.end = end;
        outcome
    }
}

fn unix_secs() -> u64 {
    crate::clock::unix_ns() / 1_000_000_000
}

fn unavailable() -> Vec<u8> {
    reply::line(421, "4.3.0", "Error: service temporarily unavailable, try again later")
}

/// Writes to the client within `limit`: a client that stops reading cannot hold a session.
pub(super) async fn send(client: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    tokio::time::timeout(limit, client.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))?
}

/// Ends a connection the way an MTA does: the last reply, a half-close, then whatever the
/// client still sends is read and dropped for a short while. Closing with unread input would
/// make the kernel answer with a reset, and the reset destroys the reply before the client
/// reads it. Returns the bytes written.
pub(super) async fn close_with(client: &mut TcpStream, answer: &[u8]) -> u64 {
    if send(client, answer, LAST_WRITE).await.is_err() {
        return 0;
    }
    let _ = client.shutdown().await;
    let linger = async {
        // On the heap: a buffer on the stack would be part of every session's future, idle
        // ones included, for its whole life.
        let mut sink = vec![0u8; 1024];
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
