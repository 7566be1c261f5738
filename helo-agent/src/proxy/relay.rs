//! Once a passed session is opaque (message data, or TLS after STARTTLS): the client's side
//! (message data, the heavy direction) is relayed zero-copy with splice(2) through a pipe, so
//! message bytes never enter user space. The MTA's replies (a few hundred bytes a session) are
//! copied. In plaintext the relay watches the last one: when the MTA's connection ends without
//! a goodbye (221, or its own 421) while the client is still talking, the MTA died
//! mid-session, and the client gets `421 4.4.2` instead of a silent close — no mail is lost,
//! because nothing the MTA did not acknowledge counts as sent. Inside TLS the relay can read
//! no reply and writes nothing of its own: the stream belongs to the two TLS ends.
//! Where a pipe or splice is unavailable the relay falls back to a plain copy and says so.
//!
//! A relay that fails says which side failed ([`RelayError`]): a socket error names the side
//! of its socket; silence past the idle limit names the side whose turn it was, where the relay
//! can tell ([`Turn`]: a client that stops mid-message after DATA is the client's fault, a
//! complete message unanswered the MTA's), and the agent where it cannot (inside TLS, or once
//! the client's data is spliced past user space).
//!
//! No `unsafe`: rustix's `splice` takes borrowed descriptors; tokio's readiness drives it.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::session::Opacity;
use crate::judge::Side;

/// Bytes a pipe holds by default: one splice moves at most this much.
const CHUNK: usize = 64 * 1024;
/// The client's bytes are copied through user space until one read fills this much: then a
/// large transfer is under way and the relay switches to splice (HAProxy's splice-auto idea).
/// A small message never pays for a pipe, its two descriptors and two splices per read.
const COPY_FIRST: usize = 8 * 1024;

#[derive(Debug, Default)]
pub struct Relayed {
    /// Client to MTA.
    pub up: u64,
    /// MTA to client.
    pub down: u64,
    /// Whether the client's side switched to splice (a read filled [`COPY_FIRST`]).
    pub spliced: bool,
    /// Client bytes copied through user space before that (all of them when not spliced).
    pub copied: u64,
    /// Why the relay ended early (idle timeout, a socket error), and on which side; `None`
    /// when both sides closed. The byte counts hold either way.
    pub error: Option<RelayError>,
    /// The MTA went away mid-session; the client was told 421.
    pub upstream_lost: bool,
    /// Ended by the shutdown (its grace was over).
    pub cut: bool,
}

/// A relay's failure and the side it happened on.
#[derive(Debug)]
pub struct RelayError {
    pub side: Side,
    pub error: io::Error,
}

impl RelayError {
    pub fn kind(&self) -> io::ErrorKind {
        self.error.kind()
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Tags an I/O error with the side whose socket it came from.
fn on(side: Side) -> impl Fn(io::Error) -> RelayError {
    move |error| RelayError { side, error }
}

/// Whose turn it is to speak, as far as the relay can see the client's bytes: in plaintext
/// message data after DATA (354) the client speaks until the lone dot that ends the message,
/// and then the MTA owes its reply. Fed the client's bytes while they pass through user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Inside the message: the client's turn. `line_start`: the last byte ended a line; `dot`:
    /// the line so far is `.` (1) or `.\r` (2).
    Data { line_start: bool, dot: u8 },
    /// The message is complete: the MTA owes its reply.
    DataEnd,
    /// The MTA answered the complete message: the client's turn again.
    Answered,
    /// The relay cannot tell (TLS, a BDAT chunk of unknown size, bytes after the message,
    /// spliced data).
    Unknown,
}

impl Turn {
    /// At the start of the relay of `opacity`.
    pub fn at(opacity: Opacity) -> Turn {
        match opacity {
            Opacity::Data => Turn::Data { line_start: true, dot: 0 },
            Opacity::Tls | Opacity::Chunks => Turn::Unknown,
        }
    }

    /// The client sent `bytes`.
    pub fn client(self, bytes: &[u8]) -> Turn {
        bytes.iter().fold(self, |turn, &b| match turn {
            Turn::Data { line_start, dot } => match (b, dot) {
                (b'\n', 1 | 2) => Turn::DataEnd,
                (b'\r', 1) => Turn::Data { line_start: false, dot: 2 },
                (b'.', _) if line_start => Turn::Data { line_start: false, dot: 1 },
                (b'\n', _) => Turn::Data { line_start: true, dot: 0 },
                _ => Turn::Data { line_start: false, dot: 0 },
            },
            // Commands after the message: whether the MTA owes replies is not followed.
            Turn::DataEnd | Turn::Answered | Turn::Unknown => Turn::Unknown,
        })
    }

    /// The MTA sent a complete reply line.
    pub fn mta(self) -> Turn {
        match self {
            Turn::DataEnd => Turn::Answered,
            turn => turn,
        }
    }

    /// Who kept the relay silent past its idle limit; `client_done`: the client had closed
    /// its side (the MTA owes what is left).
    pub fn idle(self, client_done: bool) -> Side {
        match self {
            _ if client_done => Side::Mta,
            Turn::Data { .. } | Turn::Answered => Side::Client,
            Turn::DataEnd => Side::Mta,
            Turn::Unknown => Side::Agent,
        }
    }

    fn code(self) -> u8 {
        match self {
            Turn::Unknown => 0,
            Turn::Data { line_start, dot } => 1 + u8::from(line_start) * 4 + dot,
            Turn::DataEnd => 8,
            Turn::Answered => 9,
        }
    }

    fn from_code(code: u8) -> Turn {
        match code {
            1..=7 => Turn::Data { line_start: (code - 1) & 4 != 0, dot: (code - 1) & 3 },
            8 => Turn::DataEnd,
            9 => Turn::Answered,
            _ => Turn::Unknown,
        }
    }
}

/// The [`Turn`] both directions of a relay share (they run in one task, one after the other).
struct SharedTurn(AtomicU8);

impl SharedTurn {
    fn get(&self) -> Turn {
        Turn::from_code(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, turn: Turn) {
        self.0.store(turn.code(), Ordering::Relaxed);
    }
}

/// The reply the MTA sends when it drops a session it lost: the client retries later.
pub const UPSTREAM_LOST: &[u8] =
    b"421 4.4.2 Error: connection to the mail server lost, try again later\r\n";

/// The code of the last complete reply line seen in a byte stream, fed in pieces.
#[derive(Debug, Default)]
pub struct LastReply {
    digits: [u8; 3],
    in_line: usize,
    pub code: Option<u16>,
}

impl LastReply {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.code = (self.in_line >= 3 && self.digits.iter().all(u8::is_ascii_digit))
                    .then(|| self.digits.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0')));
                self.in_line = 0;
            } else {
                if self.in_line < 3 {
                    self.digits[self.in_line] = b;
                }
                self.in_line += 1;
            }
        }
    }

    /// Whether the stream ended on a reply that closes the session.
    pub fn said_goodbye(&self) -> bool {
        self.in_line == 0 && matches!(self.code, Some(221 | 421))
    }

    /// Whether a reply line is half-sent.
    pub fn mid_line(&self) -> bool {
        self.in_line > 0
    }
}

/// Whether an error only means the peer has gone: a reset after its last bytes (a client that
/// closes with our 221 unread) or a write to a side that has closed. That ends one direction
/// like an end of stream.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Relays until both sides have closed, nothing moved for `idle`, or `cut` completes.
/// `opacity` says whether the MTA's replies can be read (message data) or not (TLS).
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    opacity: Opacity,
    cut: impl std::future::Future<Output = ()>,
) -> Relayed {
    // The idle deadline: one timer, armed for `idle` after the last traffic known when it was
    // armed. Traffic only moves a timestamp; when the timer fires early (there was traffic
    // since), it is armed again for the rest. A session shorter than `idle` arms it once.
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let watchdog = async {
        let idle_ms = idle.as_millis() as u64;
        let mut wake = tokio::time::Instant::from_std(start) + idle;
        loop {
            tokio::time::sleep_until(wake).await;
            let quiet =
                (start.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
            if quiet >= idle_ms {
                return;
            }
            wake = tokio::time::Instant::now() + Duration::from_millis(idle_ms - quiet);
        }
    };
    let (up, down, copied) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let spliced = std::sync::atomic::AtomicBool::new(false);
    let client_done = std::sync::atomic::AtomicBool::new(false);
    let lost = std::sync::atomic::AtomicBool::new(false);
    let turn = SharedTurn(AtomicU8::new(Turn::at(opacity).code()));
    let both = async {
        let up = async {
            let counts = UpCounts { total: &up, copied: &copied, spliced: &spliced, turn: &turn };
            let result = client_to_mta(&client, &upstream, &counts, &touch).await;
            client_done.store(true, Ordering::Relaxed);
            result
        };
        let watch = opacity != Opacity::Tls;
        let down = Down { total: &down, client_done: &client_done, turn: &turn };
        let down = replies(&upstream, &client, &down, &touch, watch.then_some(&lost));
        tokio::try_join!(up, down)
    };
    let mut cut_short = false;
    let error = tokio::select! {
        result = both => result.err(),
        () = watchdog => {
            let side = turn.get().idle(client_done.load(Ordering::Relaxed));
            let error = io::Error::new(io::ErrorKind::TimedOut, format!("no traffic for {}s", idle.as_secs()));
            Some(RelayError { side, error })
        }
        () = cut => {
            cut_short = true;
            None
        }
    };
    Relayed {
        up: up.into_inner(),
        down: down.into_inner(),
        spliced: spliced.into_inner(),
        copied: copied.into_inner(),
        error,
        upstream_lost: lost.into_inner(),
        cut: cut_short,
    }
}

/// Copies the MTA's replies to the client until the MTA's side ends, then half-closes the
/// client's. With `lost` (plaintext replies), an end without a goodbye while the client still
/// talks gets the client a 421; without it (TLS), nothing is added to the stream.
/// What the MTA's direction counts and shares.
struct Down<'a> {
    total: &'a AtomicU64,
    client_done: &'a std::sync::atomic::AtomicBool,
    turn: &'a SharedTurn,
}

async fn replies(
    from: &TcpStream,
    to: &TcpStream,
    down: &Down<'_>,
    touch: &impl Fn(),
    lost: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(), RelayError> {
    let mut last = LastReply::default();
    let mut buf = vec![0u8; 4096];
    let ended = loop {
        let n = match read_some(from, &mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        touch();
        last.feed(&buf[..n]);
        if last.code.is_some() && !last.mid_line() {
            down.turn.set(down.turn.get().mta());
        }
        if let Err(e) = write_all(to, &buf[..n]).await {
            if peer_gone(&e) {
                // The client has gone: nothing left to tell it.
                let _ = rustix::net::shutdown(from, rustix::net::Shutdown::Read);
                return Ok(());
            }
            return Err(on(Side::Client)(e));
        }
        down.total.fetch_add(n as u64, Ordering::Relaxed);
    };
    match ended {
        Err(e) if !peer_gone(&e) => return Err(on(Side::Mta)(e)),
        _ => {}
    }
    if let Some(lost) = lost
        && !last.said_goodbye()
        && !down.client_done.load(Ordering::Relaxed)
    {
        lost.store(true, Ordering::Relaxed);
        let notice = if last.mid_line() {
            [b"\r\n", UPSTREAM_LOST].concat()
        } else {
            UPSTREAM_LOST.to_vec()
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), write_all(to, &notice)).await;
    }
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(())
}

/// What is there to read (0: end of stream), once `from` is readable: [`write_all`]'s twin for
/// a stream both directions share. A read shorter than `buf` drained the socket, so its
/// readiness is cleared with it, tokio's own rule for `poll_read` (which `try_read` lacks; the
/// next edge comes with new bytes, and an end of stream stays ready): the next call waits
/// instead of asking the kernel once more for nothing, one EAGAIN less per command and reply.
async fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        let mut drained = None;
        let read = from.try_io(Interest::READABLE, || {
            let (n, _) = rustix::net::recv(from, &mut *buf, rustix::net::RecvFlags::empty())?;
            if 0 < n && n < buf.len() {
                // Counted here; the WouldBlock is what makes tokio clear the readiness.
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (read, drained) {
            (_, Some(n)) => return Ok(n),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (result, None) => return result,
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the client's direction counts and shares.
struct UpCounts<'a> {
    total: &'a AtomicU64,
    copied: &'a AtomicU64,
    spliced: &'a std::sync::atomic::AtomicBool,
    turn: &'a SharedTurn,
}

/// Moves the client's bytes to the MTA until the client's side ends, then half-closes the
/// MTA's: copied first, spliced once a read fills [`COPY_FIRST`].
async fn client_to_mta(
    from: &TcpStream,
    to: &TcpStream,
    counts: &UpCounts<'_>,
    touch: &impl Fn(),
) -> Result<(), RelayError> {
    match copy_then_splice(from, to, counts, touch).await {
        Err(e) if !peer_gone(&e.error) => return Err(e),
        _ => {}
    }
    // The peer's end of stream: pass the half-close on.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(())
}

async fn copy_then_splice(
    from: &TcpStream,
    to: &TcpStream,
    counts: &UpCounts<'_>,
    touch: &impl Fn(),
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; COPY_FIRST];
    let pipe = loop {
        let n = read_some(from, &mut buf).await.map_err(on(Side::Client))?;
        if n == 0 {
            return Ok(());
        }
        touch();
        counts.turn.set(counts.turn.get().client(&buf[..n]));
        write_all(to, &buf[..n]).await.map_err(on(Side::Mta))?;
        counts.total.fetch_add(n as u64, Ordering::Relaxed);
        counts.copied.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() {
            match pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) {
                Ok(pipe) => break pipe,
                Err(error) => {
                    tracing::warn!(%error, "no pipe for splice: relaying with a user-space copy");
                }
            }
        }
    };
    drop(buf);
    counts.spliced.store(true, Ordering::Relaxed);
    // From here the client's bytes never reach user space: whose turn it is, is unknown.
    counts.turn.set(Turn::Unknown);
    splice_until_end(from, to, &pipe, counts.total, touch).await
}

async fn splice_until_end(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &(rustix::fd::OwnedFd, rustix::fd::OwnedFd),
    total: &AtomicU64,
    touch: &impl Fn(),
) -> Result<(), RelayError> {
    let (pipe_read, pipe_write) = pipe;
    loop {
        from.readable().await.map_err(on(Side::Client))?;
        let moved = match from.try_io(Interest::READABLE, || {
            splice(from, None, pipe_write, None, CHUNK, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
                .map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(on(Side::Client)(e)),
        };
        if moved == 0 {
            return Ok(());
        }
        touch();
        let mut left = moved;
        while left > 0 {
            to.writable().await.map_err(on(Side::Mta))?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_read, None, to, None, left, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    left -= n;
                    touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on(Side::Mta)(e)),
            }
        }
        total.fetch_add(moved as u64, Ordering::Relaxed);
    }
}

/// What [`move_exact`] moved.
#[derive(Debug, Default)]
pub struct Moved {
    /// Bytes that reached the MTA.
    pub moved: u64,
    /// Of them, copied through user space (the rest spliced).
    pub copied: u64,
    /// The client closed before the chunk was complete.
    pub client_closed: bool,
}

/// Moves exactly `len` bytes of a BDAT chunk from the client to the MTA, and not one more
/// (the client's next command follows them): copied when few, spliced through a pipe when
/// many, as the relay does. Each wait for either side is bounded by `idle`.
pub async fn move_exact(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    idle: Duration,
) -> Result<Moved, RelayError> {
    let mut moved = Moved::default();
    let pipe = if len >= 2 * COPY_FIRST as u64 {
        pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).ok()
    } else {
        None
    };
    let Some((pipe_read, pipe_write)) = pipe else {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(COPY_FIRST).min(COPY_FIRST)];
        while moved.moved < len {
            let want = usize::try_from(len - moved.moved).unwrap_or(buf.len()).min(buf.len());
            let n = within(idle, Side::Client, read_some(from, &mut buf[..want])).await?;
            if n == 0 {
                moved.client_closed = true;
                break;
            }
            within(idle, Side::Mta, write_all(to, &buf[..n])).await?;
            moved.moved += n as u64;
            moved.copied += n as u64;
        }
        return Ok(moved);
    };
    while moved.moved < len {
        let want = usize::try_from(len - moved.moved).unwrap_or(CHUNK).min(CHUNK);
        let into_pipe = async {
            loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from, None, &pipe_write, None, want, SpliceFlags::NONBLOCK)
                        .map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            }
        };
        let n = within(idle, Side::Client, into_pipe).await?;
        if n == 0 {
            moved.client_closed = true;
            break;
        }
        let mut left = n;
        while left > 0 {
            let out_of_pipe = async {
                loop {
                    to.writable().await?;
                    match to.try_io(Interest::WRITABLE, || {
                        splice(&pipe_read, None, to, None, left, SpliceFlags::NONBLOCK)
                            .map_err(io::Error::from)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        result => return result,
                    }
                }
            };
            left -= within(idle, Side::Mta, out_of_pipe).await?;
        }
        moved.moved += n as u64;
    }
    Ok(moved)
}

/// `io` within `idle`, its failure (or the silence) tagged with `side`.
async fn within<T>(
    idle: Duration,
    side: Side,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(idle, io).await {
        Ok(result) => result.map_err(on(side)),
        Err(_) => {
            let error = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no traffic for {}s", idle.as_secs()),
            );
            Err(RelayError { side, error })
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A plaintext relay with a 5 s idle limit and no shutdown, in its own task.
    fn spawn_relay(client: TcpStream, upstream: TcpStream) -> tokio::task::JoinHandle<Relayed> {
        spawn_idle(client, upstream, Duration::from_secs(5))
    }

    /// A plaintext relay (after DATA) with the `idle` limit and no shutdown, in its own task.
    fn spawn_idle(
        client: TcpStream,
        upstream: TcpStream,
        idle: Duration,
    ) -> tokio::task::JoinHandle<Relayed> {
        tokio::spawn(relay(client, upstream, idle, Opacity::Data, std::future::pending()))
    }

    #[tokio::test]
    async fn splice_relays_both_ways_byte_for_byte_and_passes_half_closes() {
        // client_far <-> client_near [relay] upstream_near <-> upstream_far
        let (mut client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        let relay = spawn_relay(client_near, upstream_near);
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            client_far.write_all(&sent).await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_far.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut received = Vec::new();
        upstream_far.read_to_end(&mut received).await.unwrap();
        assert!(
            received == body,
            "every byte arrives unchanged ({} of {})",
            received.len(),
            body.len()
        );
        upstream_far.write_all(b"250 2.0.0 Ok: queued\r\n").await.unwrap();
        upstream_far.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"250 2.0.0 Ok: queued\r\n");
        let relayed = relay.await.unwrap();
        assert!(relayed.error.is_none(), "{:?}", relayed.error);
        assert_eq!((relayed.up, relayed.down, relayed.spliced), (body.len() as u64, 22, true));
        assert!(relayed.copied < body.len() as u64 / 10, "most of it spliced: {}", relayed.copied);
        assert!(!relayed.upstream_lost, "the client had finished: no 421");
    }

    /// A client that resets after QUIT (our 221 unread) ends the relay normally, counted.
    #[tokio::test]
    async fn a_reset_after_the_last_bytes_is_an_ordinary_end() {
        let (client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        let relay = spawn_relay(client_near, upstream_near);
        let mut client_far = client_far.into_std().unwrap();
        client_far.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut client_far, b"QUIT\r\n").unwrap();
        let mut quit = [0u8; 6];
        upstream_far.read_exact(&mut quit).await.unwrap();
        upstream_far.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Close with the 221 unread: the kernel answers with a reset.
        socket2::SockRef::from(&client_far).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client_far);
        drop(upstream_far);
        let relayed = relay.await.unwrap();
        assert!(relayed.error.is_none(), "a reset after the end is no error: {:?}", relayed.error);
        assert_eq!((relayed.up, relayed.down, relayed.spliced), (6, 15, false), "6 bytes: copied");
        assert!(!relayed.upstream_lost, "221 then close is the ordinary end");
    }

    /// A BDAT chunk is moved to its last byte and not one more, small (copied) or large
    /// (spliced), whatever the pieces it arrives in; what follows stays for the commands.
    #[tokio::test]
    async fn a_chunk_moves_exactly_its_length() {
        for len in [1usize, 100, 3 * COPY_FIRST + 7, 300_000] {
            let (mut client_far, client_near) = pair().await;
            let (upstream_near, mut upstream_far) = pair().await;
            let chunk: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sent = [&chunk[..], b"QUIT\r\n"].concat();
            let writer = tokio::spawn(async move {
                for piece in sent.chunks(50_000) {
                    client_far.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                client_far
            });
            let idle = Duration::from_secs(5);
            let moved = move_exact(&client_near, &upstream_near, len as u64, idle).await.unwrap();
            assert_eq!((moved.moved, moved.client_closed), (len as u64, false), "{len}");
            assert_eq!(
                moved.copied == moved.moved,
                len < 2 * COPY_FIRST,
                "{len}: spliced when large"
            );
            let mut got = vec![0u8; len];
            upstream_far.read_exact(&mut got).await.unwrap();
            assert!(got == chunk, "{len}: byte for byte");
            let _client_far = writer.await.unwrap();
            let mut rest = [0u8; 6];
            let mut client_near = client_near;
            client_near.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"QUIT\r\n", "{len}: the next command is left for the session");
        }
    }

    #[test]
    fn the_last_reply_code_is_tracked_across_pieces() {
        let mut last = LastReply::default();
        last.feed(b"250-mx\r\n250 8BITM");
        assert_eq!(last.code, Some(250));
        assert!(last.mid_line());
        last.feed(b"IME\r\n22");
        assert!(!last.said_goodbye());
        last.feed(b"1 2.0.0 Bye\r\n");
        assert!(last.said_goodbye());
        last.feed(b"421 4.4.2 timeout\n");
        assert!(last.said_goodbye(), "the MTA's own 421 is a goodbye too");
        last.feed(b"354 go ahead\r\n");
        assert!(!last.said_goodbye());
    }

    /// The MTA dies while the client is mid-transaction: the client gets a 421, not a silent
    /// close.
    #[tokio::test]
    async fn an_mta_that_dies_mid_session_gets_the_client_a_421() {
        let (mut client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        let relay = spawn_relay(client_near, upstream_near);
        client_far.write_all(b"MAIL FROM:<a@b.example>\r\n").await.unwrap();
        let mut mail = [0u8; 25];
        upstream_far.read_exact(&mut mail).await.unwrap();
        upstream_far.write_all(b"250 2.1.0 Ok\r\n").await.unwrap();
        client_far.write_all(b"DATA\r\n").await.unwrap();
        upstream_far.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await.unwrap();
        drop(upstream_far); // killed: no 221
        let mut seen = Vec::new();
        client_far.read_to_end(&mut seen).await.unwrap();
        let seen = String::from_utf8(seen).unwrap();
        assert!(
            seen.ends_with(
                "\r\n421 4.4.2 Error: connection to the mail server lost, try again later\r\n"
            ),
            "{seen}"
        );
        let relayed = relay.await.unwrap();
        assert!(relayed.upstream_lost);
    }

    /// Traffic keeps a relay alive past its idle limit; the limit counts from the last of it.
    #[tokio::test]
    async fn the_idle_limit_counts_from_the_last_traffic() {
        let (mut client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        // Traffic every 150 ms, well inside the limit even on a loaded machine.
        let idle = Duration::from_millis(500);
        let started = Instant::now();
        let relay = spawn_idle(client_near, upstream_near, idle);
        let mut got = [0u8; 6];
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client_far.write_all(b"NOOP\r\n").await.unwrap();
            upstream_far.read_exact(&mut got).await.unwrap();
        }
        let last_traffic = started.elapsed();
        assert!(last_traffic >= Duration::from_millis(1500), "3 idle limits of traffic");
        let relayed = relay.await.unwrap();
        let ended = started.elapsed();
        assert_eq!(relayed.error.expect("ended idle").kind(), io::ErrorKind::TimedOut);
        assert_eq!(relayed.up, 60, "every NOOP relayed before the end");
        assert!(
            ended >= last_traffic + idle && ended < last_traffic + idle * 3,
            "ended {ended:?}, {last_traffic:?} after the start, with the last traffic"
        );
    }

    #[tokio::test]
    async fn an_idle_relay_is_ended() {
        let (_client_far, client_near) = pair().await;
        let (upstream_near, _upstream_far) = pair().await;
        let started = Instant::now();
        let relayed = relay(
            client_near,
            upstream_near,
            Duration::from_millis(300),
            Opacity::Data,
            std::future::pending(),
        )
        .await;
        assert_eq!(
            relayed.error.expect("an idle relay ends in error").kind(),
            io::ErrorKind::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// Whose turn it is in plaintext message data: the client's until the lone dot, then the
    /// MTA's until it answers; unknown where the relay cannot follow.
    #[test]
    fn the_turn_follows_the_message_to_its_dot_and_the_mtas_answer() {
        let data = Turn::at(Opacity::Data);
        assert_eq!(data.idle(false), Side::Client, "354 said: the client's data is awaited");
        let half = data.client(b"Subject: x\r\n\r\nhalf a li");
        assert_eq!(half.idle(false), Side::Client, "stalled mid-line");
        let lines = half.client(b"ne\r\n..stuffed, not the end\r\n");
        assert_eq!(lines.idle(false), Side::Client, "stalled between lines");
        let end = lines.client(b"\r\n.").client(b"\r").client(b"\n");
        assert_eq!(end, Turn::DataEnd, "the dot line in three pieces");
        assert_eq!(end.idle(false), Side::Mta, "a complete message unanswered");
        assert_eq!(data.client(b"x\n.\n"), Turn::DataEnd, "bare LF, as Postfix takes it");
        assert_eq!(data.client(b".\r\n"), Turn::DataEnd, "an empty message");
        assert_eq!(
            end.mta().idle(false),
            Side::Client,
            "answered: the next command is the client's"
        );
        assert_eq!(
            end.mta().client(b"QUIT\r\n").idle(false),
            Side::Agent,
            "commands: not followed"
        );
        assert_eq!(half.idle(true), Side::Mta, "the client closed its side: the MTA owes the rest");
        assert_eq!(Turn::at(Opacity::Tls).idle(false), Side::Agent, "inside TLS: cannot tell");
        assert_eq!(Turn::at(Opacity::Chunks).client(b".\r\n"), Turn::Unknown, "BDAT: no dot");
        for turn in [half, end, end.mta(), Turn::Unknown, data.client(b"."), data.client(b".\r")] {
            assert_eq!(Turn::from_code(turn.code()), turn);
        }
    }

    /// Regression (issue 25): a client that stalls mid-DATA ended the relay on its idle limit
    /// as an error of the agent's own (`side=agent`), the side operators alert on. The relay
    /// now names the client; and the MTA where a complete message goes unanswered.
    #[tokio::test]
    async fn an_idle_relay_names_the_side_whose_turn_it_was() {
        for (sent, side) in
            [(&b"Subject: x\r\n\r\nhalf a li"[..], Side::Client), (b"hi\r\n.\r\n", Side::Mta)]
        {
            let (mut client_far, client_near) = pair().await;
            let (upstream_near, mut upstream_far) = pair().await;
            let relay = spawn_idle(client_near, upstream_near, Duration::from_millis(300));
            client_far.write_all(sent).await.unwrap();
            let mut got = vec![0u8; sent.len()];
            upstream_far.read_exact(&mut got).await.unwrap();
            let error = relay.await.unwrap().error.expect("ended idle");
            assert_eq!((error.kind(), error.side), (io::ErrorKind::TimedOut, side), "{sent:?}");
        }
    }
}
