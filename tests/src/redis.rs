//! A private `redis-server` for the fleet suite and bench: inside a network namespace, on an
//! address and port of the caller's, with a password, saving nothing (so a restart comes back
//! empty, as a Redis without persistence does), in plain TCP or TLS only. Killed when dropped.

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
    /// TLS only: the CA certificate clients verify it with.
    pub ca: Option<PathBuf>,
}

/// A server certificate for TLS: the CA's certificate, and the server's certificate and key
/// (for `address`), made with openssl in `dir`.
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
        Self::spawn(ns, address, port, password, None)
    }

    /// The same, speaking only TLS (`rediss://`).
    pub fn start_tls(ns: &Netns, address: &str, port: u16, password: &str, tls: &TlsFiles) -> Self {
        Self::spawn(ns, address, port, password, Some(tls))
    }

    fn spawn(ns: &Netns, address: &str, port: u16, password: &str, tls: Option<&TlsFiles>) -> Self {
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
            ],
        };
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .args(["redis-server", "--bind", address])
            .args(&listen)
            .args(["--requirepass", password, "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"])
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
            ca: tls.map(|tls| tls.ca.clone()),
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
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
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
            .args(self.ca.iter().flat_map(|ca| [Path::new("--tls"), Path::new("--cacert"), ca]))
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
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
