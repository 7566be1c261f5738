//! The hand-off to the MTA: connect (from the client's own address in transparent mode), send
//! the PROXY header, read the MTA's greeting; and QUIT when the MTA's part is over.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::header;
use crate::config::{ProxyConfig, ProxyProtocol};
use crate::judge::End;
use crate::smtp::MAX_COMMAND_LINE;
use crate::smtp::reply::{ReplyScan, scan_reply};

/// How long a QUIT to an MTA being let go may take to write.
const QUIT_WRITE: Duration = Duration::from_secs(5);

/// What the MTA answered the HELO and EHLO of the last passed session, kept for sessions
/// rejected before the MTA ever heard from them: a rejected bot then reads at its EHLO the
/// capabilities the MTA offers, as a good client does, not a list of the proxy's own that
/// would tell it it was caught. Until a session passed, the proxy answers with its own.
#[derive(Default)]
pub struct Learned {
    replies: std::sync::Mutex<[Option<std::sync::Arc<[u8]>>; 2]>,
}

impl Learned {
    /// The MTA's last answer to EHLO (`ehlo`) or HELO.
    pub fn reply(&self, ehlo: bool) -> Option<std::sync::Arc<[u8]>> {
        self.replies.lock().expect("learned replies lock")[usize::from(ehlo)].clone()
    }

    /// The MTA answered a passed EHLO (`ehlo`) or HELO with `reply`.
    pub fn learn(&self, ehlo: bool, reply: &[u8]) {
        let mut replies = self.replies.lock().expect("learned replies lock");
        let slot = &mut replies[usize::from(ehlo)];
        if slot.as_deref() != Some(reply) {
            *slot = Some(reply.into());
        }
    }
}

pub struct Greeting {
    pub bytes: Vec<u8>,
    pub code: u16,
}

/// Connects to the MTA, sends the PROXY header and reads the MTA's greeting, all within
/// `upstream_timeout`. Errors: the session's end and what went wrong.
pub async fn open(
    config: &ProxyConfig,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(TcpStream, Greeting), (End, String)> {
    let connect = async {
        match config.proxy_protocol {
            ProxyProtocol::Transparent => connect_as(peer.ip(), config.upstream).await,
            _ => TcpStream::connect(config.upstream).await,
        }
    };
    let mut upstream = match tokio::time::timeout(config.upstream_timeout, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err((End::UpstreamUnreachable, e.to_string())),
        Err(_) => return Err((End::UpstreamUnreachable, "connect timed out".into())),
    };
    let _ = upstream.set_nodelay(true);
    let header = header::encode(config.proxy_protocol, peer, local);
    upstream.write_all(&header).await.map_err(|e| (End::UpstreamError, e.to_string()))?;
    let greeting = read_greeting(&mut upstream, config.upstream_timeout)
        .await
        .map_err(|e| (End::UpstreamError, e.to_string()))?;
    Ok((upstream, greeting))
}

/// Tells a connected MTA that its part of the session is over; its 221 is not awaited.
pub async fn quit(upstream: &mut Option<TcpStream>) {
    if let Some(mut mta) = upstream.take() {
        let _ = tokio::time::timeout(QUIT_WRITE, mta.write_all(b"QUIT\r\n")).await;
    }
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

/// Reads one complete reply (the greeting) within `limit`.
async fn read_greeting(upstream: &mut TcpStream, limit: Duration) -> io::Result<Greeting> {
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
            buf.reserve(1024);
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
