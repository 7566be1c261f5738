//! The DNS checks against a real resolver (dnsmasq, serving a test zone on a loopback port):
//! what the resolver module makes of each kind of answer, its cache, and the policy service
//! judging with it. The proxy's sessions with DNS are in `proxy.rs`.

mod dnsmasq;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dnsmasq::Dnsmasq;
use helo_agent::blocklist::BanStore;
use helo_agent::blocklist::fake::{self, FakeStore};
use helo_agent::config::{Config, HostFacts};
use helo_agent::dns::{Dns, Need};
use helo_agent::judge::{Judge, Live, Parts};
use helo_agent::policy::{self, Listener};
use helo_agent::rules::{ClientDns, HeloDns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test zone: a name that points at 127.0.0.1 (the tests' client), one with only an MX,
/// one that points elsewhere, and reverse names for 192.0.2.10 (confirmed) and 192.0.2.11
/// (a PTR whose name points elsewhere).
fn zone() -> Vec<String> {
    [
        "--host-record=mail.good.test,127.0.0.1",
        "--host-record=other.test,192.0.2.99",
        "--mx-host=mxonly.test,mail.good.test",
        "--host-record=confirmed.test,192.0.2.10",
        "--ptr-record=10.2.0.192.in-addr.arpa,confirmed.test",
        "--ptr-record=11.2.0.192.in-addr.arpa,liar.test",
        "--host-record=liar.test,192.0.2.99",
    ]
    .map(String::from)
    .to_vec()
}

fn config(dns: &Dnsmasq, checks: &str) -> Config {
    let text = format!(
        "[identity]\ndetect = false\ndomains = [\"example.com\"]\n[allowlist]\nnetworks = []\n\
         [dns]\nservers = [\"{}\"]\ntimeout = \"1s\"\n[checks]\n{checks}",
        dns.address
    );
    Config::parse(&text, Path::new("t.toml"), &HostFacts::default()).unwrap()
}

#[tokio::test]
async fn each_kind_of_answer_becomes_the_right_fact() {
    let server = Dnsmasq::start(&zone());
    let dns = Dns::new(&config(&server, "").dns).unwrap();
    let helo = |name: &'static str| {
        let dns = &dns;
        async move { dns.helo(name, Need::Required).await.expect("a slot") }
    };
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(helo("mail.good.test").await, HeloDns::Found { addresses: vec![local], mx: false });
    assert_eq!(helo("MAIL.Good.Test.").await, HeloDns::Found { addresses: vec![local], mx: false });
    assert_eq!(helo("nope.test").await, HeloDns::Missing, "NXDOMAIN");
    assert_eq!(helo("mxonly.test").await, HeloDns::Found { addresses: vec![], mx: true });
    let started = Instant::now();
    let HeloDns::TempFail(why) = helo("x.slow.test").await else { panic!("a timeout") };
    assert!(why.contains("no answer"), "{why}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by dns.timeout");

    // The client's forward-confirmed reverse name: a PTR name whose addresses include it.
    let client = |ip: &'static str| {
        let dns = &dns;
        async move { dns.client(ip.parse().unwrap(), Need::Required).await.expect("a slot") }
    };
    assert_eq!(client("192.0.2.10").await, ClientDns::Confirmed("confirmed.test".into()));
    assert_eq!(
        client("192.0.2.11").await,
        ClientDns::Unconfirmed(vec!["liar.test".into()]),
        "its PTR name does not point back"
    );
    assert_eq!(client("192.0.2.12").await, ClientDns::Unconfirmed(vec![]), "no PTR");
}

/// Answers are cached for their TTL: two sessions with one HELO ask the resolver once.
/// (Negative answers are cached for the TTL their SOA gives, RFC 2308; dnsmasq's local
/// answers carry none, so they are asked again here.)
#[tokio::test]
async fn a_second_lookup_of_a_name_comes_from_the_cache() {
    let server = Dnsmasq::start(&zone());
    let dns = Dns::new(&config(&server, "").dns).unwrap();
    for _ in 0..2 {
        dns.helo("mail.good.test", Need::Required).await.unwrap();
        dns.helo("mxonly.test", Need::Required).await.unwrap();
    }
    assert_eq!(server.queries("A", "mail.good.test"), 1, "{}", server.log());
    assert_eq!(server.queries("MX", "mxonly.test"), 1, "{}", server.log());
}

/// Lookups beyond dns.max_lookups: a session whose verdict does not depend on DNS goes on
/// without; one whose verdict does waits its turn.
#[tokio::test]
async fn lookups_are_bounded_in_number() {
    let server = Dnsmasq::start(&zone());
    let mut config = config(&server, "").dns;
    config.max_lookups = 1;
    let dns = Arc::new(Dns::new(&config).unwrap());
    let slow = tokio::spawn({
        let dns = dns.clone();
        async move { dns.helo("y.slow.test", Need::Required).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(dns.helo("mail.good.test", Need::Optional).await, None, "no slot: skipped");
    let waited = dns.helo("mail.good.test", Need::Required).await;
    assert!(matches!(waited, Some(HeloDns::Found { .. })), "{waited:?}");
    assert!(matches!(slow.await.unwrap(), Some(HeloDns::TempFail(_))));
}

/// The policy service with the DNS checks enforcing: a HELO that exists and points at the
/// client passes; one that does not exist is rejected (and not banned: `reject`); one whose
/// lookups time out gets 450 and no ban; the client's name comes from Postfix's attributes.
#[tokio::test]
async fn the_policy_service_judges_with_dns() {
    let server = Dnsmasq::start(&zone());
    let config = config(&server, "unknown_helo = \"ban\"\nhelo_not_client = \"reject\"\n");
    let store = Arc::new(Mutex::new(FakeStore::default()));
    let (bans, _worker) = fake::spawn_worker(store.clone());
    let dns = Some(Arc::new(Dns::new(&config.dns).unwrap()));
    let shared = Judge::new(Live::of(&config), Parts { bans: Some(bans), dns, ..Parts::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(policy::serve(vec![Listener::Inet(listener)], shared, async {
        let _ = stopped.await;
    }));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut ask = async |port: u16, client: &str, client_name: &str, helo: &str| {
        let request = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n\
             client_port={port}\nclient_name={client_name}\nreverse_client_name={client_name}\n\
             helo_name={helo}\n\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\n\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
            assert_eq!(read.await.unwrap().unwrap(), 1, "the service answers");
            out.push(byte[0]);
        }
        String::from_utf8(out).unwrap()
    };
    assert_eq!(ask(1, "127.0.0.1", "unknown", "mail.good.test").await, "action=DUNNO\n\n");
    let slow = ask(2, "127.0.0.1", "unknown", "z.slow.test").await;
    assert!(slow.starts_with("action=450 4.7.1 <") && slow.contains("try again later"), "{slow}");
    let missing = ask(3, "203.0.113.7", "unknown", "nope.test").await;
    assert!(missing.starts_with("action=553 "), "{missing}");
    let elsewhere = ask(4, "203.0.113.8", "unknown", "other.test").await;
    assert!(elsewhere.starts_with("action=553 "), "{elsewhere}");
    // other.test does not point at .9, but Postfix confirmed .9's name is other.test.
    let confirmed = ask(5, "203.0.113.9", "other.test", "other.test").await;
    assert_eq!(confirmed, "action=DUNNO\n\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.entries().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the missing name's client was not banned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let banned: Vec<String> = store.entries().unwrap().iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(banned, ["203.0.113.7"], "only unknown_helo bans; a 450 never does");
    let _ = stop.send(());
}
