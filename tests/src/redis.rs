//! A private `redis-server` for the fleet suite and bench: inside a network namespace, on an
//! address and port of the caller's, with a password, saving nothing (so a restart comes back
//! empty, as a Redis without persistence does), in plain TCP or TLS only; and the pieces of a
//! Redis Sentinel service (a replica, sentinels: Debian's `redis-server` in sentinel mode,
//! the binary the `redis-sentinel` package links to). Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

pub struct Redis {
    child: Child,
    ns: String,
    pub address: String,
    pub port: u16,
    pub password: String,
    /// TLS only: its certificate, and the CA clients verify it with (sentinels watching it
    /// speak TLS with the same files).
    pub tls: Option<TlsFiles>,
}

/// A server certificate for TLS: the CA's certificate, and the server's certificate and key
/// (for `address`), made with openssl in `dir`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn make(dir: &Path, address: &str) -> Self {
        let path = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            crate::run(Command::new("openssl").args(args).current_dir(dir));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=helo test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={address}"),
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(path("ext"), format!("subjectAltName=IP:{address}\n")).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            "server.pem",
        ]);
        TlsFiles { ca: path("ca.pem"), cert: path("server.pem"), key: path("server.key") }
    }
}

impl Redis {
    /// Starts it and waits (up to 10 s) until it answers PING.
    pub fn start(ns: &Netns, address: &str, port: u16, password: &str) -> Self {
        Self::spawn(ns, address, port, password, None, &[])
    }

    /// A replica of `master` (same password), as Sentinel wants it: it announces `address`,
    /// and every node has `masterauth`, since any may become a replica after a failover.
    pub fn start_replica(
        ns: &Netns,
        address: &str,
        port: u16,
        master: (&str, u16),
        password: &str,
    ) -> Self {
        let master_port = master.1.to_string();
        Self::spawn(ns, address, port, password, None, &["--replicaof", master.0, &master_port])
    }

    /// The same, speaking only TLS (`rediss://`), to its clients and its replicas.
    pub fn start_tls(ns: &Netns, address: &str, port: u16, password: &str, tls: &TlsFiles) -> Self {
        Self::spawn(ns, address, port, password, Some(tls), &[])
    }

    /// A replica of `master` that speaks only TLS, to its master too.
    pub fn start_tls_replica(
        ns: &Netns,
        address: &str,
        port: u16,
        master: (&str, u16),
        password: &str,
        tls: &TlsFiles,
    ) -> Self {
        let master_port = master.1.to_string();
        Self::spawn(
            ns,
            address,
            port,
            password,
            Some(tls),
            &["--replicaof", master.0, &master_port],
        )
    }

    fn spawn(
        ns: &Netns,
        address: &str,
        port: u16,
        password: &str,
        tls: Option<&TlsFiles>,
        extra: &[&str],
    ) -> Self {
        let port_text = port.to_string();
        let listen: Vec<&str> = match tls {
            None => vec!["--port", &port_text],
            Some(tls) => vec![
                "--port",
                "0",
                "--tls-port",
                &port_text,
                "--tls-cert-file",
                tls.cert.to_str().unwrap(),
                "--tls-key-file",
                tls.key.to_str().unwrap(),
                "--tls-ca-cert-file",
                tls.ca.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
                "--tls-replication",
                "yes",
            ],
        };
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .args(["redis-server", "--bind", address])
            .args(&listen)
            .args(["--requirepass", password, "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"])
            .args(["--masterauth", password, "--replica-announce-ip", address])
            // A replica loads its master's data from the socket, writing no dump.rdb.
            .args(["--repl-diskless-load", "swapdb", "--dir"])
            .arg(std::env::temp_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (cargo xtask setup installs it)");
        let redis = Redis {
            child,
            ns: ns.name.clone(),
            address: address.to_owned(),
            port,
            password: password.to_owned(),
            tls: tls.cloned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer in 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    /// The URL an agent connects with (`[fleet] redis`).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://:{}@{}:{}/0", self.password, self.address, self.port)
    }

    /// `redis-cli ARGS...` with the password, inside the namespace; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_with_input(args, None)
    }

    /// `redis-cli ARGS...` with `input` on its standard input (`--pipe` for bulk loads).
    pub fn cli_with_input(&self, args: &[&str], input: Option<&[u8]>) -> String {
        use std::io::Write as _;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .args(["redis-cli", "--no-auth-warning", "-h", &self.address])
            .args(["-p", &self.port.to_string(), "-a", &self.password])
            .args(tls_args(self.tls.as_ref()))
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run redis-cli");
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(input).expect("write to redis-cli");
        }
        let out = child.wait_with_output().expect("redis-cli output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The redis-server process (nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port`, as the agents and the sentinels name it.
    pub fn node(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    /// Whether it is a replica whose link to its master is up (the initial sync done).
    pub fn replica_in_sync(&self) -> bool {
        let info = self.cli(&["INFO", "replication"]);
        info.contains("role:slave") && info.contains("master_link_status:up")
    }
}

/// One Redis Sentinel process (`redis-server <conf> --sentinel`) in a namespace, watching a
/// master under `service`, with its config file in a directory of its own (Sentinel rewrites
/// it). Killed when dropped.
pub struct Sentinel {
    child: Child,
    ns: String,
    pub address: String,
    pub port: u16,
    dir: PathBuf,
    /// TLS only (as its master): the files it serves and checks with.
    tls: Option<TlsFiles>,
}

/// `redis-cli`'s arguments for a server that speaks only TLS.
fn tls_args(tls: Option<&TlsFiles>) -> Vec<&Path> {
    tls.map_or(Vec::new(), |tls| vec![Path::new("--tls"), Path::new("--cacert"), &tls.ca])
}

impl Sentinel {
    /// Starts it and waits (up to 10 s) until it answers PING. `down_after_ms`: how long the
    /// master must not answer before this sentinel calls it down; `quorum`: how many
    /// sentinels must agree. A master that speaks only TLS gets a sentinel that does too,
    /// with the same certificate, to its clients, its peers and the nodes it watches.
    pub fn start(
        ns: &Netns,
        address: &str,
        port: u16,
        master: &Redis,
        service: &str,
        quorum: u32,
        down_after_ms: u64,
    ) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("helo-sentinel-"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        let listen = match &master.tls {
            None => format!("port {port}\n"),
            Some(tls) => format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind {address}\nprotected-mode no\ndaemonize no\n\
                 loglevel notice\nlogfile {log}\ndir {dir}\n\
                 sentinel announce-ip {address}\n\
                 sentinel monitor {service} {host} {master_port} {quorum}\n\
                 sentinel auth-pass {service} {password}\n\
                 sentinel down-after-milliseconds {service} {down_after_ms}\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                log = dir.join("sentinel.log").display(),
                dir = dir.display(),
                host = master.address,
                master_port = master.port,
                password = master.password,
            ),
        )
        .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel (cargo xtask setup installs it)");
        let sentinel = Sentinel {
            child,
            ns: ns.name.clone(),
            address: address.to_owned(),
            port,
            dir,
            tls: master.tls.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sentinel.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis sentinel did not answer in 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        sentinel
    }

    /// `redis-cli ARGS...` against this sentinel; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .args(["redis-cli", "-h", &self.address, "-p", &self.port.to_string()])
            .args(tls_args(self.tls.as_ref()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The master it names for `service` now (`host:port`).
    pub fn master(&self, service: &str) -> Option<String> {
        let out = self.cli(&["SENTINEL", "get-master-addr-by-name", service]);
        let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
        Some(format!("{}:{}", lines.next()?, lines.next()?))
    }

    /// Whether it knows `replicas` replicas in sync (not down) and `others` other sentinels:
    /// what it needs before it can take part in a failover.
    pub fn ready(&self, service: &str, replicas: usize, others: usize) -> bool {
        let known = self.cli(&["SENTINEL", "replicas", service]);
        let up = known.lines().filter(|l| l.trim() == "slave").count();
        let sentinels = self.cli(&["SENTINEL", "sentinels", service]);
        let peers = sentinels.lines().filter(|l| l.trim() == "runid").count();
        up >= replicas && peers >= others
    }

    /// Its log (for a failed test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
