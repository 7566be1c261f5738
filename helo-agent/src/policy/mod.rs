//! The second front door: Postfix's policy service (`check_policy_service`). Postfix asks,
//! over a long-lived connection, one request at a time, what to do with a client; the agent
//! answers with the same judge, the same log line (`door=policy`), tophelos, metrics and bans
//! as the proxy, and nothing in the mail path changes.
//!
//! One SMTP session is one `instance`: its HELO is judged once (again only if it changes),
//! it gets one log line per verdict, and one ban. A ban is applied at verdict time: the kernel
//! drops only a banned source's new connections, so the session that earned it goes on to
//! hear Postfix's 5xx and say QUIT. [`protocol`] is the wire format, sans-IO; [`PolicySession`]
//! the decisions, pure; this file the listeners and the per-connection loop.

pub mod protocol;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use self::protocol::{Answer, Parser, Request};
use crate::config::{PolicyConfig, PolicyListen};
use crate::dns::Dns;
use crate::judge::{self, Client, Door, NeverBan, Record};
use crate::proxy::{Live, Shared};
use crate::rules::{Action, ClientDns, DnsFacts, HeloDns, Verdict};

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
                PolicyListen::Unix(path) => bind_unix(path, gid, config.socket_mode)
                    .map(|l| StdListener::Unix(l, path.clone())),
            }
        })
        .collect()
}

fn bind_unix(
    path: &std::path::Path,
    gid: Option<u32>,
    mode: u32,
) -> Result<std::os::unix::net::UnixListener, BindError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let listen = PolicyListen::Unix(path.to_owned());
    let err = |source| BindError::Listen { listen: listen.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process answers on this socket: stop it, or choose another path",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(BindError::InTheWay { path: path.to_owned() }),
        Err(_) => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::process::Gid::from_raw(gid)))
            .map_err(|e| err(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Serves every listener until `shutdown` completes.
pub async fn serve(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let (shared, limit) = (shared.clone(), limit.clone());
        tasks.spawn(async move {
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                let accepted = match &listener {
                    Listener::Inet(l) => l.accept().await.map(|(s, peer)| {
                        let (read, write) = s.into_split();
                        (
                            Box::new(read) as Box<dyn AsyncRead + Send + Unpin>,
                            Box::new(write) as Box<dyn AsyncWrite + Send + Unpin>,
                            peer.to_string(),
                        )
                    }),
                    Listener::Unix(l, path) => l.accept().await.map(|(s, _)| {
                        let (read, write) = s.into_split();
                        (
                            Box::new(read) as Box<dyn AsyncRead + Send + Unpin>,
                            Box::new(write) as Box<dyn AsyncWrite + Send + Unpin>,
                            format!("unix:{}", path.display()),
                        )
                    }),
                };
                match accepted {
                    Ok((read, write, from)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            connection(read, write, &from, &shared).await;
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
    shared: &Shared,
) {
    let mut parser = Parser::default();
    let mut session = PolicySession::default();
    loop {
        match parser.next_request() {
            Ok(Some(request)) => {
                let live = shared.live();
                let answer = match (request.client_address, &shared.enforce) {
                    // Without XDP nothing else keeps a banned client out: refuse it here.
                    (Some(ip), Some(bans))
                        if bans.banned(crate::addr::canonical(ip), crate::clock::boot_ns()) =>
                    {
                        tracing::debug!(client = %ip, "policy request from a banned client");
                        Answer::Refuse { code: 554, text: BANNED.into() }
                    }
                    // A new SMTP session from a client whose ban was decided a moment ago: the
                    // kernel may not have the ban yet, so it is refused here (its own session
                    // goes on hearing its 553).
                    (Some(ip), _) if session.is_new(&request) && shared.court.ban_pending(ip) => {
                        tracing::debug!(client = %ip, "policy request from a client with a ban just decided");
                        Answer::Refuse { code: 554, text: BANNED.into() }
                    }
                    _ => {
                        let looked = session.lookups(&request, &live, shared.dns.as_deref()).await;
                        session.on_request(&request, &live, &shared.court, looked)
                    }
                };
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

/// What one policy connection knows of the SMTP session its requests belong to. Postfix's
/// smtpd keeps one policy connection per process and serves sessions one after another on it.
/// A session is its client's address and port (`client_port`, Postfix 3.0 and later): the
/// `instance` attribute is per mail transaction, empty before MAIL FROM and new at each one,
/// so it cannot tell sessions apart (without `client_port` it is the best there is).
/// What [`PolicySession::lookups`] learnt for one request, for [`PolicySession::on_request`].
#[derive(Default)]
pub struct Lookups {
    /// What DNS says (`None`: nothing known).
    pub facts: Option<DnsFacts>,
    /// The verdict on the HELO without DNS, when it was judged to decide whether to look:
    /// `on_request` judges again only what DNS can change (`judge::with_dns`).
    pub without_dns: Option<Verdict>,
}

#[derive(Default)]
pub struct PolicySession {
    key: Option<SessionKey>,
    client: Option<Client>,
    helos: Vec<String>,
    verdict: Option<Verdict>,
    logged: Vec<&'static str>,
    started: Option<Instant>,
}

/// One SMTP session, as the policy requests tell it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SessionKey {
    address: std::net::IpAddr,
    port: Option<u16>,
    /// Only without a port.
    instance: Option<String>,
}

impl SessionKey {
    fn of(request: &Request, address: std::net::IpAddr) -> Self {
        SessionKey {
            address,
            port: request.client_port,
            instance: if request.client_port.is_some() { None } else { request.instance.clone() },
        }
    }
}

impl PolicySession {
    /// Whether `request` belongs to another SMTP session than the one before it.
    pub fn is_new(&self, request: &Request) -> bool {
        request
            .client_address
            .is_some_and(|address| self.key.as_ref() != Some(&SessionKey::of(request, address)))
    }

    /// What DNS says for the HELO this request will have judged: the client's names from
    /// Postfix whenever it sends them (`client_name` is its forward-confirmed name, as Postfix
    /// checked it: what `dynamic`, `helo_not_client` and `helo_reuse` spare a client telling
    /// the truth for), and the HELO name's records from the resolver (`dns`) when they can
    /// change the verdict, with the verdict without DNS that decided to look.
    pub async fn lookups(&self, request: &Request, live: &Live, dns: Option<&Dns>) -> Lookups {
        let (Some(address), Some(helo)) = (request.client_address, request.helo_name.as_deref())
        else {
            return Lookups::default();
        };
        // A new session's first HELO is always judged (on_request starts the session afresh).
        let same = self.key.as_ref() == Some(&SessionKey::of(request, address));
        if helo.is_empty() || (same && !self.judges(helo)) {
            return Lookups::default();
        }
        let client = match (&request.client_name, &request.reverse_client_name) {
            (None, None) => ClientDns::NotLooked,
            (verified, reverse) => {
                crate::dns::from_postfix(verified.as_deref(), reverse.as_deref())
            }
        };
        let mut records = HeloDns::NotLooked;
        let mut without_dns = None;
        if let Some(dns) = dns {
            let who = Client::new(address, None, false);
            let previous: &[String] = if same { &self.helos } else { &[] };
            let verdict = judge::classify(&live.rules, &who, helo, previous, None, false);
            if let Some((name, need)) = judge::dns_need(&live.rules, &verdict, helo) {
                // No lookup slot free for a session that can go without: judged without.
                records = dns.helo(&name, need).await.unwrap_or_default();
            }
            without_dns = Some(verdict);
        }
        let facts = match (records, client) {
            (HeloDns::NotLooked, ClientDns::NotLooked) => None,
            (helo, client) => Some(DnsFacts { helo, client }),
        };
        Lookups { facts, without_dns }
    }

    /// Whether this session judges `helo` now: unless it is rejected already, or `helo` is the
    /// HELO it judged last (Postfix repeats it in every request of the session).
    fn judges(&self, helo: &str) -> bool {
        let rejected = self.verdict.as_ref().is_some_and(|v| v.action != Action::Pass);
        let judged = self.helos.last().is_some_and(|last| last == helo);
        !rejected && !judged
    }

    /// Answers one request; a new verdict is concluded (logged, observed, banned) on the spot.
    /// `looked`: what [`Self::lookups`] found for it.
    pub fn on_request(
        &mut self,
        request: &Request,
        live: &Live,
        court: &judge::Court,
        looked: Lookups,
    ) -> Answer {
        if request.request.as_deref().is_some_and(|r| r != "smtpd_access_policy") {
            return Answer::Dunno;
        }
        let Some(address) = request.client_address else {
            tracing::debug!("policy request without a client address: DUNNO");
            return Answer::Dunno;
        };
        let key = SessionKey::of(request, address);
        if self.key.as_ref() != Some(&key) {
            *self = PolicySession {
                key: Some(key),
                client: Some(Client::new(address, None, false)),
                started: Some(Instant::now()),
                ..Default::default()
            };
        }
        let Some(helo) = request.helo_name.as_deref().filter(|h| !h.is_empty()) else {
            tracing::debug!(
                client = %address,
                state = request.protocol_state.as_deref().unwrap_or(""),
                "policy request without a HELO yet: DUNNO"
            );
            return Answer::Dunno;
        };
        let client = self.client.expect("set with the key");
        if self.judges(helo) {
            let (rules, dns) = (&live.rules, looked.facts.as_ref());
            let verdict = match (looked.without_dns, dns) {
                // Judged without DNS to decide the lookups: only what DNS changes again.
                (Some(without), Some(dns)) => {
                    judge::with_dns(rules, &client, helo, &self.helos, dns, false, without)
                }
                (Some(without), None) => without,
                (None, dns) => judge::classify(rules, &client, helo, &self.helos, dns, false),
            };
            let verdict = judge::reuse(rules, &client, helo, dns, verdict);
            self.helos.push(helo.to_owned());
            for m in &verdict.logged {
                if !self.logged.contains(&m.rule) {
                    self.logged.push(m.rule);
                }
            }
            self.verdict = Some(verdict);
            let started = *self.started.get_or_insert_with(Instant::now);
            self.conclude(court, live, started);
        }
        let verdict = self.verdict.as_ref().expect("judged above");
        match verdict.action {
            Action::Pass => Answer::Dunno,
            Action::Reject | Action::Ban => match &verdict.reply {
                Some(custom) => Answer::Refuse { code: custom.code, text: custom.text.clone() },
                None => {
                    Answer::Refuse { code: 553, text: format!("5.7.1 {}", live.reject_message) }
                }
            },
        }
    }

    fn conclude(&self, court: &judge::Court, live: &Live, started: Instant) {
        let (Some(client), Some(verdict)) = (&self.client, &self.verdict) else { return };
        let helos: &[String] = if self.helos.len() > 1 { &self.helos } else { &[] };
        let record = Record {
            door: Door::Policy,
            client,
            helo: self.helos.last().map(String::as_str),
            helos,
            verdict: Some(verdict),
            logged: &self.logged,
            ms: started.elapsed().as_millis() as u64,
            transport: None,
        };
        let never = NeverBan {
            mta: live.config.upstream.ip(),
            trusted_proxies: &live.config.trusted_proxies,
            allowlist: &live.rules.allowlist,
        };
        court.conclude(&record, &never);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, HostFacts};

    fn live(extra: &str) -> Live {
        let text = format!("[identity]\ndetect = false\ndomains = [\"example.com\"]\n{extra}");
        let config = Config::parse(&text, Path::new("t"), &HostFacts::default()).unwrap();
        Live {
            config: config.proxy.clone(),
            rules: config.rules.clone(),
            reject_message: config.reject_message.clone(),
        }
    }

    fn request(instance: &str, helo: Option<&str>, client: &str) -> Request {
        Request {
            request: Some("smtpd_access_policy".into()),
            protocol_state: Some("RCPT".into()),
            helo_name: helo.map(str::to_owned),
            client_address: Some(client.parse().unwrap()),
            instance: Some(instance.into()),
            ..Default::default()
        }
    }

    fn sessions(court: &judge::Court) -> u64 {
        let now = crate::clock::unix_ns() / 1_000_000_000;
        let rows = court.report.lock().unwrap().top(now, Duration::from_secs(60), 100);
        rows.iter().map(|r| r.sessions).sum()
    }

    #[test]
    fn a_forged_helo_is_refused_with_the_proxys_text_and_judged_once_per_session() {
        let live = live("");
        let court = judge::Court::new(None, None, Duration::from_secs(3600));
        let mut session = PolicySession::default();
        let forged = request("a.1", Some("mx.example.com"), "203.0.113.9");
        let refuse = Answer::Refuse {
            code: 553,
            text: "5.7.1 sorry, your HELO host name has been denied".into(),
        };
        assert_eq!(session.on_request(&forged, &live, &court, Lookups::default()), refuse);
        assert_eq!(
            session.on_request(&forged, &live, &court, Lookups::default()),
            refuse,
            "every RCPT of it"
        );
        let good = request("a.1", Some("mail.sender.example"), "203.0.113.9");
        assert_eq!(
            session.on_request(&good, &live, &court, Lookups::default()),
            refuse,
            "rejected stays rejected"
        );
        assert_eq!(sessions(&court), 1, "one session, one observation");
        let next = request("b.2", Some("mail.sender.example"), "203.0.113.9");
        assert_eq!(
            session.on_request(&next, &live, &court, Lookups::default()),
            Answer::Dunno,
            "a new instance"
        );
        assert_eq!(sessions(&court), 2);
    }

    #[test]
    fn no_helo_yet_is_dunno_and_a_changed_helo_is_judged_with_the_one_before() {
        let live = live("[checks]\nchanged = \"reject\"");
        let court = judge::Court::new(None, None, Duration::from_secs(3600));
        let mut session = PolicySession::default();
        assert_eq!(
            session.on_request(
                &request("c.1", None, "203.0.113.9"),
                &live,
                &court,
                Lookups::default()
            ),
            Answer::Dunno
        );
        let one = request("c.1", Some("one.sender.example"), "203.0.113.9");
        assert_eq!(session.on_request(&one, &live, &court, Lookups::default()), Answer::Dunno);
        let two = request("c.1", Some("two.sender.example"), "203.0.113.9");
        assert!(matches!(
            session.on_request(&two, &live, &court, Lookups::default()),
            Answer::Refuse { code: 553, .. }
        ));
        assert_eq!(session.verdict.as_ref().unwrap().rule, "changed");
    }

    /// An access-table entry's own reply is carried over; a 4xx entry is a temporary refusal
    /// and never a ban; a `log` check answers DUNNO.
    #[test]
    fn entry_replies_4xx_entries_and_log_checks() {
        let dir = std::env::temp_dir().join(format!("helo-policy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let access = dir.join("helo_access");
        std::fs::write(
            &access,
            "go.away.example 550 5.7.1 Go away\nslow.down.example 450 4.7.1 Try later\n",
        )
        .unwrap();
        let live = live(&format!(
            "[rules]\naccess_file = {:?}\n[checks]\ntable = \"ban\"\nno_dot = \"log\"\n",
            access.display()
        ));
        let court = judge::Court::new(None, None, Duration::from_secs(3600));
        let answer = |instance: &str, helo: &str| {
            let mut session = PolicySession::default();
            let answer = session.on_request(
                &request(instance, Some(helo), "203.0.113.9"),
                &live,
                &court,
                Lookups::default(),
            );
            (answer, session.verdict.map(|v| v.action))
        };
        assert_eq!(
            answer("e.1", "go.away.example"),
            (Answer::Refuse { code: 550, text: "5.7.1 Go away".into() }, Some(Action::Ban))
        );
        assert_eq!(
            answer("e.2", "slow.down.example"),
            (Answer::Refuse { code: 450, text: "4.7.1 Try later".into() }, Some(Action::Reject)),
            "a 4xx entry never bans"
        );
        assert_eq!(answer("e.3", "nodot"), (Answer::Dunno, Some(Action::Pass)), "log: DUNNO");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request as Postfix 3.x sends it at `state`: with `client_port`; `instance` empty
    /// before MAIL FROM.
    fn postfix(state: &str, client: &str, port: u16, instance: &str, helo: &str) -> Request {
        Request {
            protocol_state: Some(state.into()),
            client_port: Some(port),
            ..request(instance, Some(helo), client)
        }
    }

    /// A court whose bans reach a ban worker over a fake store; returns what was banned.
    fn court_with_bans() -> (
        judge::Court,
        std::thread::JoinHandle<crate::blocklist::Blocklist<crate::blocklist::fake::FakeStore>>,
    ) {
        let (bans, worker) =
            crate::blocklist::fake::spawn_worker(crate::blocklist::fake::FakeStore::default());
        (judge::Court::new(Some(bans), None, Duration::from_secs(3600)), worker)
    }

    fn banned(
        court: judge::Court,
        worker: std::thread::JoinHandle<
            crate::blocklist::Blocklist<crate::blocklist::fake::FakeStore>,
        >,
    ) -> Vec<(String, String)> {
        use crate::blocklist::BanStore as _;
        drop(court);
        let list = worker.join().unwrap();
        let entries = list.store().entries().unwrap();
        entries
            .iter()
            .map(|(t, v)| (t.to_string(), list.reason_of(v.reason).unwrap_or_default()))
            .collect()
    }

    /// Regression (found trying the README's HELO-stage placement against a real Postfix):
    /// Postfix sends `instance=` empty before MAIL FROM, and the service took every request on
    /// a connection for one session, so a bot's forged HELO banned the innocent client the
    /// same smtpd had served before, and the next good client was refused.
    #[test]
    fn sessions_on_one_connection_are_told_apart_by_client_address_and_port() {
        let live = live("");
        let (court, worker) = court_with_bans();
        let mut connection = PolicySession::default();
        let good = postfix("EHLO", "203.0.113.3", 40001, "", "good.example.org");
        assert_eq!(connection.on_request(&good, &live, &court, Lookups::default()), Answer::Dunno);
        let bot = postfix("EHLO", "203.0.113.8", 40002, "", "mx.example.com");
        assert!(matches!(
            connection.on_request(&bot, &live, &court, Lookups::default()),
            Answer::Refuse { code: 553, .. }
        ));
        let next = postfix("EHLO", "203.0.113.4", 40003, "", "good6.example.org");
        assert_eq!(
            connection.on_request(&next, &live, &court, Lookups::default()),
            Answer::Dunno,
            "not the bot's verdict"
        );
        let banned = banned(court, worker);
        assert_eq!(banned.len(), 1, "{banned:?}");
        assert_eq!(banned[0].0, "203.0.113.8", "the bot, never the client before it");
    }

    /// Regression: `instance` changes with each transaction, and a session with two was judged
    /// (and banned, escalated) twice.
    #[test]
    fn one_session_with_several_transactions_is_judged_and_banned_once() {
        let live = live("");
        let (court, worker) = court_with_bans();
        let mut connection = PolicySession::default();
        for instance in ["a.1", "a.2", "a.3"] {
            let rcpt = postfix("RCPT", "203.0.113.9", 40100, instance, "mx.example.com");
            assert!(matches!(
                connection.on_request(&rcpt, &live, &court, Lookups::default()),
                Answer::Refuse { .. }
            ));
        }
        assert_eq!(sessions(&court), 1, "one observation");
        assert_eq!(banned(court, worker).len(), 1, "one ban");
    }

    /// HELO reuse at the policy door: the sessions of the memory the rules carry count, the
    /// one that reaches reuse.clients is refused, and a client Postfix forward-confirmed under
    /// the HELO name is neither counted nor refused, with or without a resolver.
    #[tokio::test]
    async fn the_policy_door_counts_reuse_in_the_rules_memory_and_spares_a_confirmed_client() {
        let live = live("[checks]\nhelo_reuse = \"reject\"\n[reuse]\nclients = 5\n");
        let court = judge::Court::new(None, None, Duration::from_secs(3600));
        let ask = |n: u8, client_name: &str| {
            let mut request = postfix("RCPT", &format!("198.51.{n}.9"), 40000, "i.1", "bulk.test");
            request.client_name = Some(client_name.into());
            request.reverse_client_name = Some(client_name.into());
            request
        };
        let mut answers = Vec::new();
        for n in 1..=6 {
            let mut session = PolicySession::default();
            let request = ask(n, "unknown");
            let looked = session.lookups(&request, &live, None).await;
            answers.push(session.on_request(&request, &live, &court, looked));
            let mut confirmed = PolicySession::default();
            let request = ask(100 + n, "bulk.test");
            let looked = confirmed.lookups(&request, &live, None).await;
            assert_eq!(
                looked.facts.as_ref().map(|d| &d.client),
                Some(&ClientDns::Confirmed("bulk.test".into()))
            );
            assert_eq!(
                confirmed.on_request(&request, &live, &court, looked),
                Answer::Dunno,
                "Postfix confirmed its name: never reuse"
            );
        }
        assert_eq!(answers[..4], [Answer::Dunno, Answer::Dunno, Answer::Dunno, Answer::Dunno]);
        assert!(matches!(answers[4], Answer::Refuse { code: 553, .. }), "{:?}", answers[4]);
        assert!(matches!(answers[5], Answer::Refuse { code: 553, .. }), "{:?}", answers[5]);
        let now = judge::reuse_now();
        let count = live.rules.memory.count("bulk.test", now, live.rules.reuse.window);
        assert_eq!(count.networks, 6, "the confirmed clients were not counted");
    }

    #[test]
    fn other_request_types_are_dunno() {
        let live = live("");
        let court = judge::Court::new(None, None, Duration::from_secs(3600));
        let mut other = request("d.1", Some("mx.example.com"), "203.0.113.9");
        other.request = Some("junk".into());
        assert_eq!(
            PolicySession::default().on_request(&other, &live, &court, Lookups::default()),
            Answer::Dunno
        );
    }
}
