//! A private Postfix instance for the root suites and the benchmarks: its own config and queue
//! directories under /var/tmp/helo-filter-e2e, its log in a file (there is no syslog here), the
//! test domain delivered to a pipe that keeps each message, an smtpd taking PROXY v2 on
//! [`UPSTREAM`], and whatever other services a caller adds. Stopped and removed when dropped.
//! `../shared/TESTBED.md` has the facts this is built on.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::run;

/// The instance's host name (`myhostname`).
pub const MTA_NAME: &str = "mx.gw.test";
/// Where its PROXY-taking smtpd listens, inside the namespace.
pub const UPSTREAM: &str = "127.0.0.1:10025";
/// The domain it delivers (to the capture pipe).
pub const DOMAIN: &str = "e2e.test";

/// A private Postfix instance, stopped and removed when dropped.
pub struct Postfix {
    dir: PathBuf,
    // Held while the instance lives: another test run on this machine waits for it instead of
    // clobbering the same directory. Declared last, so it is released after the cleanup.
    _lock: std::fs::File,
}

impl Postfix {
    /// `extra`: lines added to the instance's main.cf (TLS settings, say); `services`: lines
    /// added to its master.cf (more smtpd listeners).
    pub fn start(ns: &Netns, name: &str, extra: &str, services: &str) -> Postfix {
        assert!(INSTANCES.contains(&name), "add {name} to INSTANCES");
        let parent = PathBuf::from("/var/tmp/helo-filter-e2e");
        std::fs::create_dir_all(&parent).unwrap();
        let lock = std::fs::File::create(parent.join(format!("{name}.lock"))).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let dir = parent.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["queue", "data", "out"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        run(Command::new("chown").args(["postfix:postfix"]).arg(dir.join("data")));
        run(Command::new("chmod").args(["1777"]).arg(dir.join("out")));
        allow_config_directories();
        let capture = dir.join("capture.sh");
        std::fs::write(
            &capture,
            // Named by arrival (fixed-width nanoseconds), so sorting names sorts deliveries.
            format!(
                "#!/bin/sh\nout={}/$(date +%s%N)-$1\ncat > \"$out.tmp\" && mv \"$out.tmp\" \"$out\"\n",
                dir.join("out").display()
            ),
        )
        .unwrap();
        run(Command::new("chmod").arg("755").arg(&capture));
        let d = dir.display();
        std::fs::write(
            dir.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
                 maillog_file = {d}/postfix.log\nmyhostname = {MTA_NAME}\nmydomain = gw.test\n\
                 mydestination =\nrelay_domains = {DOMAIN}\ntransport_maps = inline:{{{DOMAIN}=capture:}}\n\
                 inet_interfaces = all\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n\
                 smtpd_peername_lookup = no\nsmtp_dns_support_level = disabled\nalias_maps =\n\
                 alias_database =\nmessage_size_limit = 52428800\nbiff = no\n\
                 smtpd_banner = $myhostname ESMTP Postfix\n{extra}"
            ),
        )
        .unwrap();
        let system_master = std::fs::read_to_string("/etc/postfix/master.cf").unwrap();
        let mut master: String = system_master
            .lines()
            .filter(|l| !l.starts_with("smtp      inet") && !l.starts_with("smtp inet"))
            .map(|l| format!("{l}\n"))
            .collect();
        master.push_str(&format!(
            "{UPSTREAM} inet n - n - - smtpd\n  -o smtpd_upstream_proxy_protocol=haproxy\n\
             capture unix - n n - - pipe\n  user=nobody argv={} ${{queue_id}}\n",
            capture.display()
        ));
        master.push_str(services);
        std::fs::write(dir.join("master.cf"), master).unwrap();
        run(Command::new("postconf").arg("-c").arg(&dir).args(["-F", "*/*/chroot = n"]));
        let ns_path = format!("--net=/var/run/netns/{}", ns.name);
        run(Command::new("nsenter").arg(&ns_path).args(["postfix", "-c"]).arg(&dir).arg("start"));
        let postfix = Postfix { dir, _lock: lock };
        wait_for("Postfix smtpd on 127.0.0.1:10025", Duration::from_secs(20), || {
            ns.enter(|| std::net::TcpStream::connect(UPSTREAM).is_ok())
        });
        postfix
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Its `maillog_file` (what a log watcher such as fail2ban reads).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postfix.log")
    }

    /// Messages delivered so far, by file name.
    pub fn delivered(&self) -> Vec<Vec<u8>> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("out"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_none_or(|e| e != "tmp"))
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Waits for the `n`-th delivery and returns its body (after the first blank line).
    pub fn body_of_delivery(&self, n: usize) -> Vec<u8> {
        wait_for(&format!("delivery #{n}\n{}", self.log()), Duration::from_secs(30), || {
            self.delivered().len() >= n
        });
        let message = self.delivered().remove(n - 1);
        let start =
            message.windows(2).position(|w| w == b"\n\n").expect("a header/body separator") + 2;
        message[start..].to_vec()
    }
}

impl Drop for Postfix {
    /// Stops the instance by its pid file: no namespace is needed for that, so this works even
    /// when the gateway namespace is already gone. A master that survives is killed.
    fn drop(&mut self) {
        let pid_file = self.dir.join("queue/pid/master.pid");
        let pid =
            std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok());
        let _ = Command::new("postfix").arg("-c").arg(&self.dir).arg("abort").output();
        if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
            for _ in 0..50 {
                if rustix::process::test_kill_process(pid).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The instances this file starts, one directory each under /var/tmp/helo-filter-e2e.
const INSTANCES: [&str; 16] = [
    "main",
    "helo",
    "ops",
    "bytes",
    "tls",
    "policy",
    "sweep",
    "self",
    "storm",
    "hop",
    "bench-policy",
    "bench-bots",
    "bench-storm",
    "steer",
    "steer-restart",
    "bench-steer",
];

/// `postfix -c DIR` refuses directories the system main.cf does not list. The tests run in
/// parallel, so the list is updated once for all of them (a read-modify-write each would race).
fn allow_config_directories() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let current = run(Command::new("postconf").args(["-h", "alternate_config_directories"]));
        let mut dirs: Vec<String> =
            current.split([',', ' ', '\n']).filter(|d| !d.is_empty()).map(str::to_owned).collect();
        for name in INSTANCES {
            let dir = format!("/var/tmp/helo-filter-e2e/{name}");
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        run(Command::new("postconf")
            .arg("-e")
            .arg(format!("alternate_config_directories = {}", dirs.join(", "))));
    });
}

pub fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
