//! The SMTP client the `bots` and `storm` sections' bots and legitimate senders are: connect
//! from an address of its own, wait for the whole greeting (a two-line greeting's second line
//! too, as a client that waits out a pregreet test does), HELO, MAIL, RCPT, DATA with a
//! subject, QUIT. Async (tokio), so that thousands of sessions can be in flight from one
//! thread of the client namespace; every session is bounded in time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

use tests::postfix::DOMAIN;

/// How one SMTP session ended, as its client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ended {
    /// No connection: refused (a reject rule) or no answer in the connect time (a drop).
    NoConnection,
    /// Closed before the greeting (helo-filter refusing at accept).
    ClosedAtGreeting,
    /// A reply that was not 2xx/3xx, with its code.
    Refused(u16),
    /// The message was taken (250 after DATA).
    Delivered,
    /// The connection broke mid-session.
    Broken,
    /// The session did not end within its bound.
    TimedOut,
}

impl Ended {
    /// A 4xx reply: the sender keeps the message and tries again later.
    pub fn deferred(self) -> bool {
        matches!(self, Ended::Refused(code) if (400..500).contains(&code))
    }
}

/// How long a session may take: to connect (a dropped SYN is retried by the kernel after 1 s,
/// 3 s, ...), and in all.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub connect: Duration,
    pub session: Duration,
}

/// One session from `from` to `to`: HELO `helo`, then a message with `subject` when the
/// recipient is taken.
pub async fn session(
    from: IpAddr,
    to: SocketAddr,
    helo: &str,
    subject: &str,
    bounds: Bounds,
) -> Ended {
    let Some(mut smtp) = Smtp::connect(from, to, bounds.connect).await else {
        return Ended::NoConnection;
    };
    let ended = match timeout(bounds.session, smtp.transaction(from, helo, subject)).await {
        Ok(ended) => ended,
        Err(_) => Ended::TimedOut,
    };
    if !matches!(ended, Ended::Broken | Ended::ClosedAtGreeting | Ended::TimedOut) {
        let _ = timeout(Duration::from_secs(1), smtp.command("QUIT")).await;
    }
    ended
}

struct Smtp {
    lines: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Smtp {
    async fn connect(from: IpAddr, to: SocketAddr, within: Duration) -> Option<Smtp> {
        let socket = if from.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.ok()?;
        socket.bind(SocketAddr::new(from, 0)).ok()?;
        let stream = timeout(within, socket.connect(to)).await.ok()?.ok()?;
        let (read, write) = stream.into_split();
        Some(Smtp { lines: BufReader::new(read), write })
    }

    /// The code of the next complete reply; `None` at end of stream or error.
    async fn reply(&mut self) -> Option<u16> {
        let mut line = String::new();
        for _ in 0..100 {
            line.clear();
            if self.lines.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.get(..3)?.parse().ok();
            }
        }
        None
    }

    async fn command(&mut self, line: &str) -> Option<u16> {
        self.write.write_all(format!("{line}\r\n").as_bytes()).await.ok()?;
        self.reply().await
    }

    async fn transaction(&mut self, from: IpAddr, helo: &str, subject: &str) -> Ended {
        match self.reply().await {
            None => return Ended::ClosedAtGreeting,
            Some(220) => {}
            Some(code) => return Ended::Refused(code),
        }
        let steps = [
            format!("HELO {helo}"),
            format!("MAIL FROM:<sender@{from}.example>"),
            format!("RCPT TO:<user@{DOMAIN}>"),
        ];
        for step in &steps {
            match self.command(step).await {
                None => return Ended::Broken,
                Some(code) if code >= 400 => return Ended::Refused(code),
                Some(_) => {}
            }
        }
        match self.command("DATA").await {
            Some(354) => {}
            None => return Ended::Broken,
            Some(code) => return Ended::Refused(code),
        }
        let message = format!("Subject: {subject}\r\n\r\nhello from {from}\r\n.");
        match self.command(&message).await {
            Some(250) => Ended::Delivered,
            None => Ended::Broken,
            Some(code) => Ended::Refused(code),
        }
    }
}

/// A single-threaded tokio runtime for a client namespace's thread: its sockets are made in
/// the namespace the thread entered.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the clients")
}
