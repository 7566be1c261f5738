//! The policy door's listeners and connections: bound before the runtime exists (as root,
//! before privileges drop), served until shutdown, one task per Postfix connection. Requests
//! in, answers out, through [`PolicySession`], until Postfix closes the connection, it idles,
//! or it sends something that is not the protocol (closed with a log line; the agent goes on).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::protocol::{Answer, Parser, Request};
use super::session::{Late, PolicySession, Step};
use crate::config::{PolicyConfig, PolicyListen};
use crate::dns::Need;
use crate::judge::{Client, Judge, Refusal};
use crate::rules::{ClientDns, DnsFacts, HeloDns};
use crate::unix::UnixBindError;

/// Policy connections served at once (Postfix opens one per smtpd process, 100 by default).
const MAX_CONNECTIONS: usize = 1024;
/// A connection with no request for this long is closed (Postfix's own idle limit for policy
/// connections, `smtpd_policy_service_max_idle`, is 300 s; it reconnects as needed).
const IDLE: Duration = Duration::from_secs(330);
/// The answer for a banned client when XDP is not attached (it would not have connected).
const BANNED: &str = "5.7.1 Error: this address is banned for a while";
/// How long one answer may take to write.
const WRITE: Duration = Duration::from_secs(10);

/// A bound policy listener.
pub enum Listener {
    Inet(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Inet(l) => {
                l.local_addr().map_or_else(|_| "inet:?".into(), |a: SocketAddr| format!("inet:{a}"))
            }
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// A policy listener bound before the runtime exists (as root, before privileges drop).
pub enum StdListener {
    Inet(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl StdListener {
    /// On the runtime.
    pub fn into_async(self) -> Result<Listener, BindError> {
        match self {
            StdListener::Inet(l) => {
                let listen = l.local_addr().map(PolicyListen::Inet);
                tokio::net::TcpListener::from_std(l).map(Listener::Inet).map_err(|source| {
                    let listen =
                        listen.unwrap_or_else(|_| PolicyListen::Inet(([0, 0, 0, 0], 0).into()));
                    BindError::Listen { listen, source }
                })
            }
            StdListener::Unix(l, path) => match tokio::net::UnixListener::from_std(l) {
                Ok(l) => Ok(Listener::Unix(l, path)),
                Err(source) => Err(BindError::Listen { listen: PolicyListen::Unix(path), source }),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen for policy requests on {listen}: {source}")]
    Listen { listen: PolicyListen, source: std::io::Error },
    #[error(
        "policy.socket_group {group:?} is not a group on this host: create it, or set \
         policy.socket_group to the group Postfix's smtpd runs as"
    )]
    NoSuchGroup { group: String },
    #[error(
        "a file that is not a socket is in the way at {path}: give policy.listeners a path of \
         its own"
    )]
    InTheWay { path: PathBuf },
}

/// Binds every policy listener. A unix socket gets `socket_group` and `socket_mode`; a socket
/// file nobody answers on (left by a crash) is replaced, anything else at its path refused.
pub fn bind_std(config: &PolicyConfig) -> Result<Vec<StdListener>, BindError> {
    let gid = match &config.socket_group {
        Some(group) => {
            let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
            let gid = crate::privilege::find_group(&text, group)
                .ok_or_else(|| BindError::NoSuchGroup { group: group.clone() })?;
            Some(gid)
        }
        None => None,
    };
    config
        .listeners
        .iter()
        .map(|listen| {
            let err = |source| BindError::Listen { listen: listen.clone(), source };
            match listen {
                PolicyListen::Inet(address) => {
                    let listener = std::net::TcpListener::bind(address).map_err(err)?;
                    listener.set_nonblocking(true).map_err(err)?;
                    Ok(StdListener::Inet(listener))
                }
                PolicyListen::Unix(path) => match crate::unix::bind(path, config.socket_mode, gid) {
                    Ok(listener) => Ok(StdListener::Unix(listener, path.clone())),
                    Err(UnixBindError::InTheWay) => Err(BindError::InTheWay { path: path.clone() }),
                    Err(UnixBindError::Answering) => Err(err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another process answers on this socket: stop it, or choose another path",
                    ))),
                    Err(UnixBindError::Io(source)) => Err(err(source)),
                },
            }
        })
        .collect()
}

/// A reader and a writer of one accepted connection, and who it is from.
type Accepted = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>, String);

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Inet(l) => l.accept().await.map(|(s, peer)| {
                let (read, write) = s.into_split();
                (Box::new(read) as _, Box::new(write) as _, peer.to_string())
            }),
            Listener::Unix(l, path) => l.accept().await.map(|(s, _)| {
                let (read, write) = s.into_split();
                (Box::new(read) as _, Box::new(write) as _, format!("unix:{}", path.display()))
            }),
        }
    }
}

/// Serves every listener until `shutdown` completes.
pub async fn serve(
    listeners: Vec<Listener>,
    judge: Arc<Judge>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let (judge, limit) = (judge.clone(), limit.clone());
        tasks.spawn(async move {
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                match listener.accept().await {
                    Ok((read, write, from)) => {
                        let judge = judge.clone();
                        tokio::spawn(async move {
                            connection(read, write, &from, judge).await;
                            drop(permit);
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "policy accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    shutdown.await;
    tasks.shutdown().await;
}

/// One policy connection: requests in, answers out, until Postfix closes it, it idles, or it
/// sends something that is not the protocol (closed with a log line; the agent goes on).
async fn connection(
    mut read: Box<dyn AsyncRead + Send + Unpin>,
    mut write: Box<dyn AsyncWrite + Send + Unpin>,
    from: &str,
    judge: Arc<Judge>,
) {
    let mut parser = Parser::default();
    let mut session = PolicySession::default();
    loop {
        match parser.next_request() {
            Ok(Some(request)) => {
                let answer = answer(&mut session, &request, &judge).await;
                if let Some(late) = session.take_late() {
                    look_later(late, judge.clone());
                }
                let sent = tokio::time::timeout(WRITE, write.write_all(&answer.encode())).await;
                if !matches!(sent, Ok(Ok(()))) {
                    tracing::debug!(from, "policy client stopped reading: connection closed");
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(from, %error, "policy connection closed: not the policy protocol");
                return;
            }
        }
        parser.input().reserve(1024);
        match tokio::time::timeout(IDLE, read.read_buf(parser.input())).await {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::debug!(from, %error, "policy connection ended");
                return;
            }
            Err(_) => {
                tracing::debug!(from, "policy connection idle: closed");
                return;
            }
        }
    }
}

/// Answers one request: a refused client at once, else the session's answer, after the
/// lookups it asks for.
async fn answer(session: &mut PolicySession, request: &Request, judge: &Judge) -> Answer {
    if let Some(refusal) = refused(session, request, judge) {
        let client = request.client_address.map(|ip| ip.to_string()).unwrap_or_default();
        match refusal {
            Refusal::Banned => tracing::debug!(client, "policy request from a banned client"),
            Refusal::BanPending => {
                tracing::debug!(client, "policy request from a client with a ban just decided")
            }
        }
        return Answer::Refuse { code: 554, text: BANNED.into() };
    }
    let live = judge.live();
    let mut step = session.on_request(request, judge, &live);
    loop {
        match step {
            Step::Answer(answer) => return answer,
            Step::Lookup { helo, client, need } => {
                let facts = lookups(judge, request, helo.as_deref(), client, need).await;
                step = session.on_dns(facts, judge, &live);
            }
        }
    }
}

/// What a [`Step::Lookup`] asks for: the HELO name's records and the client's reverse name.
async fn lookups(
    judge: &Judge,
    request: &Request,
    helo: Option<&str>,
    client: bool,
    need: Need,
) -> DnsFacts {
    let Some(dns) = judge.dns() else { return DnsFacts::default() };
    let helo_dns = async {
        match helo {
            Some(name) => dns.helo(name, need).await.unwrap_or_default(),
            None => HeloDns::NotLooked,
        }
    };
    let client_dns = async {
        match request.client_address {
            Some(ip) if client => dns.client(ip, need).await.unwrap_or_default(),
            _ => ClientDns::NotLooked,
        }
    };
    let (helo, client) = tokio::join!(helo_dns, client_dns);
    DnsFacts { helo, client }
}

/// Lookups only `log` checks want, in the background (Postfix has its answer): what they find
/// is logged in a `session dns` line; nothing when no lookup slot is free.
fn look_later(late: Late, judge: Arc<Judge>) {
    tokio::spawn(async move {
        let Some(dns) = judge.dns() else { return };
        let client = async {
            match &late.client_dns {
                ClientDns::NotLooked => dns.client(late.client, Need::Optional).await,
                known => Some(known.clone()),
            }
        };
        let (helo, client) = tokio::join!(dns.helo(&late.name, Need::Optional), client);
        let (Some(helo), Some(client)) = (helo, client) else { return };
        let facts = DnsFacts { helo, client };
        let logged = crate::policy::session::late_logged(&judge.live(), &late, &facts).join(",");
        tracing::info!(
            door = "policy",
            client = %late.client,
            helo = late.argument,
            logged,
            dns = facts.summary(),
            "session dns"
        );
    });
}

/// Why `request`'s client is refused before it is heard, if it is. Without XDP nothing else
/// keeps a banned client out; and a new SMTP session from a client whose ban was decided a
/// moment ago is refused (the kernel may not have the ban yet), while the session that earned
/// it goes on hearing its 553.
fn refused(session: &PolicySession, request: &Request, judge: &Judge) -> Option<Refusal> {
    let client = Client::new(request.client_address?, None, false);
    if session.is_new(request) {
        judge.refused_at_accept(&client)
    } else {
        judge.banned(&client).then_some(Refusal::Banned)
    }
}
