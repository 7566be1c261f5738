//! A real resolver for the DNS tests: dnsmasq on a loopback port of its own, authoritative for
//! `test.` (unknown names there are NXDOMAIN), with the records a test gives, a subdomain
//! (`slow.test`) whose queries go to a socket that never answers (a resolver timing out), and
//! its query log in a file, to count the queries that reached it. Killed when dropped.

#![allow(dead_code, reason = "each test file uses some of it")]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dnsmasq {
    child: Child,
    pub address: SocketAddr,
    log: PathBuf,
    /// Takes `slow.test` queries and never answers.
    _silent: UdpSocket,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` (dnsmasq options such as
    /// `--host-record=mail.good.test,127.0.0.1`) and waits until it answers.
    pub fn start(records: &[String]) -> Self {
        let silent = UdpSocket::bind("127.0.0.1:0").expect("a silent socket");
        let port = free_udp_port();
        let log =
            std::env::temp_dir().join(format!("helo-dnsmasq-{}-{port}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let child = Command::new("dnsmasq")
            .args(["--no-daemon", "--bind-interfaces", "--listen-address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .args(["--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--local=/test/"])
            // Authoritative for the test networks' reverse zones too: no PTR is NXDOMAIN.
            .args(["--local=/2.0.192.in-addr.arpa/", "--local=/0.0.127.in-addr.arpa/"])
            .arg(format!("--server=/slow.test/127.0.0.1#{}", silent.local_addr().unwrap().port()))
            // Local records with a TTL, so the agent may cache them (dnsmasq gives 0 by default).
            .args(["--local-ttl=300", "--log-queries", "--user=root"])
            .arg(format!("--log-facility={}", log.display()))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (cargo xtask setup installs dnsmasq-base)");
        let dnsmasq = Dnsmasq {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _silent: silent,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dnsmasq.log().contains("started") {
            assert!(Instant::now() < deadline, "dnsmasq did not start in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        dnsmasq
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Queries for `name` of `kind` (A, AAAA, MX, PTR) that reached dnsmasq.
    pub fn queries(&self, kind: &str, name: &str) -> usize {
        let wanted = format!("query[{kind}] {name} from");
        self.log().lines().filter(|line| line.contains(&wanted)).count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A UDP port nobody uses now (dnsmasq binds UDP and TCP on it).
fn free_udp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
