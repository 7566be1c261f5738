//! After a pass verdict: both directions relayed zero-copy with splice(2) through a pipe, so
//! message bytes never enter user space. Where a pipe or splice is unavailable the relay falls
//! back to a plain copy and says so.
//!
//! No `unsafe`: rustix's `splice` takes borrowed descriptors; tokio's readiness drives it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe holds by default: one splice moves at most this much.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Relayed {
    /// Client to MTA.
    pub up: u64,
    /// MTA to client.
    pub down: u64,
    /// Whether the bytes went through splice (false: copied in user space).
    pub spliced: bool,
    /// Why the relay ended early (idle timeout, a socket error); `None` when both sides closed.
    /// The byte counts hold either way.
    pub error: Option<io::Error>,
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

/// Relays until both sides have closed, or nothing moved for `idle`.
pub async fn relay(client: TcpStream, upstream: TcpStream, idle: Duration) -> Relayed {
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1).min(idle)).await;
            let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            if quiet >= idle.as_millis() as u64 {
                return;
            }
        }
    };
    let pipes = (
        pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC),
        pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC),
    );
    let (Ok(up_pipe), Ok(down_pipe)) = pipes else {
        tracing::warn!("no pipe for splice: relaying with a user-space copy");
        return copy(client, upstream, idle).await;
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        let up = splice_one_way(&client, &upstream, &up_pipe, &up, &touch);
        let down = splice_one_way(&upstream, &client, &down_pipe, &down, &touch);
        tokio::try_join!(up, down)
    };
    let error = tokio::select! {
        result = both => result.err(),
        () = watchdog => Some(io::Error::new(io::ErrorKind::TimedOut, format!("no traffic for {}s", idle.as_secs()))),
    };
    Relayed { up: up.into_inner(), down: down.into_inner(), spliced: true, error }
}

/// Moves `from` to `to` through `pipe` until `from` ends, then half-closes `to`.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &(rustix::fd::OwnedFd, rustix::fd::OwnedFd),
    total: &AtomicU64,
    touch: &impl Fn(),
) -> io::Result<()> {
    match splice_until_end(from, to, pipe, total, touch).await {
        Err(e) if !peer_gone(&e) => return Err(e),
        _ => {}
    }
    // The peer's end of stream: pass the half-close on.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(())
}

async fn splice_until_end(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &(rustix::fd::OwnedFd, rustix::fd::OwnedFd),
    total: &AtomicU64,
    touch: &impl Fn(),
) -> io::Result<()> {
    let (pipe_read, pipe_write) = pipe;
    loop {
        from.readable().await?;
        let moved = match from.try_io(Interest::READABLE, || {
            splice(from, None, pipe_write, None, CHUNK, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
                .map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if moved == 0 {
            return Ok(());
        }
        touch();
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_read, None, to, None, left, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    left -= n;
                    touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(moved as u64, Ordering::Relaxed);
    }
}

async fn copy(mut client: TcpStream, mut upstream: TcpStream, idle: Duration) -> Relayed {
    // The fallback has no per-byte activity hook: bound the whole relay by the idle time
    // times a generous factor instead.
    let copied =
        tokio::time::timeout(idle * 10, tokio::io::copy_bidirectional(&mut client, &mut upstream))
            .await;
    match copied {
        Ok(Ok((up, down))) => Relayed { up, down, spliced: false, error: None },
        Ok(Err(e)) => Relayed { error: (!peer_gone(&e)).then_some(e), ..Default::default() },
        Err(_) => Relayed {
            error: Some(io::Error::new(io::ErrorKind::TimedOut, "relay took too long")),
            ..Default::default()
        },
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

    #[tokio::test]
    async fn splice_relays_both_ways_byte_for_byte_and_passes_half_closes() {
        // client_far <-> client_near [relay] upstream_near <-> upstream_far
        let (mut client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        let relay = tokio::spawn(relay(client_near, upstream_near, Duration::from_secs(5)));
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
    }

    /// A client that resets after QUIT (our 221 unread) ends the relay normally, counted.
    #[tokio::test]
    async fn a_reset_after_the_last_bytes_is_an_ordinary_end() {
        let (client_far, client_near) = pair().await;
        let (upstream_near, mut upstream_far) = pair().await;
        let relay = tokio::spawn(relay(client_near, upstream_near, Duration::from_secs(5)));
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
        assert_eq!((relayed.up, relayed.down, relayed.spliced), (6, 15, true));
    }

    #[tokio::test]
    async fn an_idle_relay_is_ended() {
        let (_client_far, client_near) = pair().await;
        let (upstream_near, _upstream_far) = pair().await;
        let started = Instant::now();
        let relayed = relay(client_near, upstream_near, Duration::from_millis(300)).await;
        assert_eq!(
            relayed.error.expect("an idle relay ends in error").kind(),
            io::ErrorKind::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
