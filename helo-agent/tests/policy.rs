//! The policy service against a scripted Postfix on loopback, no root: the wire protocol, many
//! requests on one connection, bad input closing only its own connection, and bans that reach
//! the store at verdict time.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helo_agent::blocklist::BanStore;
use helo_agent::blocklist::fake::{self, FakeStore};
use helo_agent::config::{Config, HostFacts};
use helo_agent::judge::{Judge, Live, Parts};
use helo_agent::policy::{self, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Service {
    addr: std::net::SocketAddr,
    store: Arc<Mutex<FakeStore>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Service {
    async fn start() -> Service {
        Service::start_with(false).await
    }

    /// `enforce`: as when XDP could not be attached, bans are enforced by the service itself.
    async fn start_with(enforce: bool) -> Service {
        let text = "[identity]\ndetect = false\ndomains = [\"example.com\"]\n\
                    addresses = [\"192.0.2.25\", \"2001:db8:25::1\"]\n[allowlist]\nnetworks = []\n";
        let config = Config::parse(text, Path::new("t.toml"), &HostFacts::default()).unwrap();
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (bans, _worker) = fake::spawn_worker(store.clone());
        let enforce =
            enforce.then(|| Arc::new(store.clone()) as Arc<dyn helo_agent::blocklist::BanCheck>);
        let shared =
            Judge::new(Live::of(&config), Parts { bans: Some(bans), enforce, ..Parts::default() });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(policy::serve(vec![Listener::Inet(listener)], shared, async {
            let _ = stopped.await;
        }));
        Service { addr, store, stop: Some(stop) }
    }

    fn banned(&self) -> Vec<String> {
        self.store.entries().unwrap().iter().map(|(t, _)| t.to_string()).collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn request(instance: &str, client: &str, helo: &str) -> String {
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
         client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n\
         helo_name={helo}\nsender=a@b.example\nrecipient=user@example.com\n\
         instance={instance}\nsize=0\nccert_subject=\nfuture_attribute=x\n\n"
    )
}

/// Reads one answer (up to the empty line).
async fn answer(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\n\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        if n == 0 {
            break;
        }
        out.push(byte[0]);
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn a_forged_helo_is_refused_and_banned_at_verdict_time_a_good_one_is_dunno() {
    let service = Service::start().await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    postfix.write_all(request("a.1", "203.0.113.9", "mx.example.com").as_bytes()).await.unwrap();
    assert_eq!(
        answer(&mut postfix).await,
        "action=553 5.7.1 sorry, your HELO host name has been denied\n\n"
    );
    // The ban is in before the session ends: the kernel drops only new connections.
    for _ in 0..100 {
        if !service.banned().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(service.banned(), ["203.0.113.9"]);
    postfix
        .write_all(request("b.1", "203.0.113.10", "mail.sender.example").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer(&mut postfix).await, "action=DUNNO\n\n");
}

/// Regression (issue 27): a monitor on the gateway, from one of our own addresses or from
/// loopback (left out of the allowlist here), saying our own name through Postfix was banned
/// and the ban published. Still refused (the rules say so), never banned; a bot after them is.
#[tokio::test]
async fn our_own_addresses_and_loopback_are_refused_but_never_banned() {
    let service = Service::start().await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    for (i, client) in ["192.0.2.25", "2001:db8:25::1", "127.0.0.1", "::1"].iter().enumerate() {
        let req = request(&format!("own.{i}"), client, "mx.example.com");
        postfix.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(
            answer(&mut postfix).await,
            "action=553 5.7.1 sorry, your HELO host name has been denied\n\n",
            "{client}"
        );
    }
    postfix.write_all(request("bot.1", "203.0.113.9", "mx.example.com").as_bytes()).await.unwrap();
    answer(&mut postfix).await;
    for _ in 0..100 {
        if !service.banned().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.banned(), ["203.0.113.9"], "only the bot");
}

#[tokio::test]
async fn ten_thousand_requests_on_one_connection() {
    let service = Service::start().await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    let (mut read, mut write) = postfix.split();
    let writer = async {
        for i in 0..10_000 {
            let req = request(&format!("s.{i}"), "203.0.113.10", "mail.sender.example");
            write.write_all(req.as_bytes()).await.unwrap();
        }
    };
    let reader = async {
        let expected = b"action=DUNNO\n\n".repeat(10_000);
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(60), read.read_exact(&mut got))
            .await
            .expect("10k answers in time")
            .unwrap();
        assert!(got == expected, "10k DUNNO answers, in order");
    };
    tokio::join!(writer, reader);
}

#[tokio::test]
async fn garbage_closes_its_own_connection_and_nothing_else() {
    let service = Service::start().await;
    let mut good = TcpStream::connect(service.addr).await.unwrap();
    for garbage in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[b'x'; 100_000], b"helo_name=\xff\xfe\n\n"] {
        let mut bad = TcpStream::connect(service.addr).await.unwrap();
        let _ = bad.write_all(garbage).await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the bad connection is closed");
        assert!(rest.is_empty() || !String::from_utf8_lossy(&rest).contains("action="));
    }
    good.write_all(request("g.1", "203.0.113.10", "mail.sender.example").as_bytes()).await.unwrap();
    assert_eq!(answer(&mut good).await, "action=DUNNO\n\n", "the other connection lives on");
}

#[tokio::test]
async fn a_slow_writer_is_served_byte_by_byte() {
    let service = Service::start().await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    for byte in request("w.1", "203.0.113.10", "mail.sender.example").bytes() {
        postfix.write_all(&[byte]).await.unwrap();
    }
    assert_eq!(answer(&mut postfix).await, "action=DUNNO\n\n");
}

/// Without XDP, a banned client's later sessions are refused by the policy service itself
/// (the kernel would have dropped its connection).
#[tokio::test]
async fn without_xdp_a_banned_clients_next_session_is_refused() {
    let service = Service::start_with(true).await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    postfix.write_all(request("x.1", "203.0.113.9", "mx.example.com").as_bytes()).await.unwrap();
    assert!(answer(&mut postfix).await.starts_with("action=553"));
    for _ in 0..100 {
        if !service.banned().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    postfix
        .write_all(request("x.2", "203.0.113.9", "good.sender.example").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        answer(&mut postfix).await,
        "action=554 5.7.1 Error: this address is banned for a while\n\n"
    );
    postfix
        .write_all(request("x.3", "203.0.113.10", "good.sender.example").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer(&mut postfix).await, "action=DUNNO\n\n", "a neighbour is served");
}

/// Regression (issue 17): a bot banned at its session's verdict that came back at once, before
/// the ban worker had written the kernel map, got DUNNO for its next session's fresh HELO and
/// its message was delivered. XDP attached (no enforcement from the maps here): the service
/// itself refuses a new session of a client whose ban was just decided, while the bot's own
/// session keeps hearing its 553.
#[tokio::test]
async fn a_bot_returning_before_its_ban_reaches_the_kernel_is_refused() {
    let service = Service::start().await;
    let mut postfix = TcpStream::connect(service.addr).await.unwrap();
    let session = |port: u16, helo: &str| {
        request("", "203.0.113.9", helo)
            .replace("instance=\n", &format!("instance=\nclient_port={port}\n"))
    };
    postfix.write_all(session(40001, "mx.example.com").as_bytes()).await.unwrap();
    assert!(answer(&mut postfix).await.starts_with("action=553"));
    postfix.write_all(session(40001, "mx.example.com").as_bytes()).await.unwrap();
    assert!(answer(&mut postfix).await.starts_with("action=553"), "its own session: still 553");
    // Back at once, on a new connection (another smtpd), a fresh valid HELO.
    let mut other = TcpStream::connect(service.addr).await.unwrap();
    other.write_all(session(40002, "mail.sender.example").as_bytes()).await.unwrap();
    assert_eq!(
        answer(&mut other).await,
        "action=554 5.7.1 Error: this address is banned for a while\n\n",
        "a returning bot is refused even before its ban is in the kernel"
    );
    other
        .write_all(request("n.1", "203.0.113.10", "mail.sender.example").as_bytes())
        .await
        .unwrap();
    assert_eq!(answer(&mut other).await, "action=DUNNO\n\n", "a neighbour is served");
}
