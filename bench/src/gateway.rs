//! The pieces of a bench mail gateway that several sections share: dnsmasq as the gateway
//! namespace's resolver, the agent's config with the defaults an admin keeps, fail2ban as an
//! admin runs it beside Postfix, and the CPU time of the gateway namespace's processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::PinDir;
use tests::netns::Netns;

use crate::Guard;
use crate::procfs::process_ticks;

/// The gateways an admin could run on one Postfix, as the `bots` and `storm` sections set them
/// up, each section with the ones it compares; each on an address of its own on the section's
/// network. The steering front door (sk_lookup) joins them when it exists: a variant, its name,
/// its address, and its arm where a section starts its setups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Postfix alone, `check_helo_access` on its own names and addresses.
    Postfix,
    /// Postfix behind postscreen.
    Postscreen,
    /// Postfix with fail2ban watching its log.
    Fail2ban,
    /// helo-filter's proxy in front of Postfix.
    Proxy,
    /// helo-filter's policy service inside Postfix.
    Policy,
    /// helo-filter's steering front door: Postfix keeps port 25 (with the policy door), the
    /// kernel steers strangers to the agent and known senders straight to Postfix.
    Steer,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Setup::Postfix => "Postfix alone (check_helo_access)",
            Setup::Postscreen => "Postfix + postscreen",
            Setup::Fail2ban => "Postfix + fail2ban (nftables)",
            Setup::Proxy => "helo-filter proxy + Postfix",
            Setup::Policy => "helo-filter policy service in Postfix",
            Setup::Steer => "helo-filter steering + Postfix",
        }
    }

    /// The last byte of its address on the section's network (fail2ban watches Postfix alone's
    /// smtpd, so they share one).
    pub fn host(self) -> u8 {
        match self {
            Setup::Postfix | Setup::Fail2ban => 1,
            Setup::Postscreen => 2,
            Setup::Proxy => 3,
            Setup::Policy => 4,
            Setup::Steer => 5,
        }
    }
}

/// Where [`Dnsmasq`] answers, inside its namespace.
pub const RESOLVER: &str = "127.0.0.1:5353";

/// The agent's config as an admin keeps it, with what a bench gateway must say itself:
/// `identity` (the names and addresses a forging bot says; detection off, the namespace has
/// no real host name), no allowlist (every client is a stranger here), `door` (a listener
/// section, or nothing), and dnsmasq at [`RESOLVER`] as the resolver. The pregreet test
/// (`log`, 6 s wait) and the DNS checks (`log`) are on, at their defaults, where the tests
/// crate's configs turn them off.
pub fn agent_config(pins: &PinDir, identity: &str, door: &str) -> PathBuf {
    pins.config(&format!(
        "[allowlist]\nnetworks = []\n[identity]\ndetect = false\n{identity}\n\
         [checks]\npregreet = \"log\"\nunknown_helo = \"log\"\nhelo_not_client = \"log\"\n\
         [dns]\nservers = [\"{RESOLVER}\"]\n{door}"
    ))
}

/// dnsmasq in `ns` on [`RESOLVER`], authoritative (with an SOA, so negative answers are
/// cached as a real zone's are) for the zones of a configuration the caller gives
/// (`auth-zone=` and `host-record=` lines), logging its queries when `log_queries` (a line
/// per query: a cost of its own under a storm). Killed when dropped, its files removed.
pub struct Dnsmasq {
    _child: Guard,
    pub log: PathBuf,
    zone: PathBuf,
}

impl Dnsmasq {
    pub fn start(ns: &Netns, zones: &str, log_queries: bool) -> anyhow::Result<Self> {
        let base = std::env::temp_dir().join(tests::unique("helo-bench-dns-"));
        let (zone, log) = (base.with_extension("conf"), base.with_extension("log"));
        std::fs::write(&zone, zones)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg("dnsmasq")
            .args(["--no-daemon", "--bind-interfaces", "--listen-address=127.0.0.1"])
            .arg(format!("--port={}", RESOLVER.rsplit(':').next().unwrap_or("53")))
            .args(["--no-resolv", "--no-hosts", "--user=root"])
            .args(log_queries.then_some("--log-queries"))
            .args(["--auth-server=ns.bench.test,127.0.0.1", "--auth-ttl=300", "--local-ttl=300"])
            .arg("--auth-soa=1,hostmaster.bench.test,1200,120,1209600,300")
            .arg(format!("--conf-file={}", zone.display()))
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start dnsmasq (apt package dnsmasq-base): {e}"))?;
        let dnsmasq = Dnsmasq { _child: Guard(child), log, zone };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&dnsmasq.log).unwrap_or_default().contains("started") {
            anyhow::ensure!(Instant::now() < deadline, "dnsmasq did not start in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(dnsmasq)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.zone);
    }
}

/// The network namespace id of the calling thread, as /proc/*/ns/net links name it.
pub fn ns_id_of(ns: &Netns) -> String {
    ns.enter(|| {
        std::fs::read_link("/proc/thread-self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    })
}

/// CPU ticks of every process in the namespace `ns_id`, by pid, with its command name.
pub fn ns_processes(ns_id: &str) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let link = std::fs::read_link(format!("/proc/{pid}/ns/net"));
        if link.is_ok_and(|l| l.display().to_string() == ns_id) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.insert(pid, (comm.trim().to_owned(), process_ticks(pid)));
        }
    }
    out
}

/// Postfix's daemons, by command name (the capture pipe's shell too); anything else in the
/// gateway namespace is the filter's (helo-agent, fail2ban-server and the nft it runs).
pub const POSTFIX: [&str; 16] = [
    "master",
    "smtpd",
    "qmgr",
    "pickup",
    "cleanup",
    "trivial-rewrite",
    "pipe",
    "postlog",
    "anvil",
    "proxymap",
    "tlsmgr",
    "scache",
    "bounce",
    "local",
    "sh",
    "cat",
];

/// CPU seconds spent between two samples: (MTA, filter daemon), by command name. Processes that
/// started and ended between the samples are not seen.
pub fn cpu_between(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
) -> (f64, f64) {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let (mut mta, mut filter) = (0u64, 0u64);
    for (pid, (comm, ticks)) in after {
        let spent = ticks.saturating_sub(before.get(pid).map_or(0, |(_, t)| *t));
        if POSTFIX.contains(&comm.as_str()) {
            mta += spent;
        } else {
            filter += spent;
        }
    }
    (mta as f64 / hz, filter as f64 / hz)
}

/// fail2ban run as an admin would run it, from a private copy of Debian's configuration with
/// its own socket, pid file and log, reading Postfix's log from where it ends at the start
/// (`logpath = FILE tail`: what an earlier setup left there is not its business); stopped (and
/// its pid killed if need be) when dropped.
pub struct Fail2ban {
    dir: PathBuf,
    ns: String,
}

impl Fail2ban {
    pub fn start(gateway: &Netns, postfix_log: &Path) -> anyhow::Result<Fail2ban> {
        let dir = std::env::temp_dir().join(tests::unique("hf-fail2ban-"));
        tests::run(Command::new("cp").args(["-a", "/etc/fail2ban"]).arg(&dir));
        let guard = Fail2ban { dir: dir.clone(), ns: gateway.name.clone() };
        let _ = std::fs::remove_file(dir.join("jail.d/defaults-debian.conf"));
        let d = dir.display();
        std::fs::write(
            dir.join("fail2ban.local"),
            format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {d}/fail2ban.log\nsocket = {d}/f2b.sock\n\
                 pidfile = {d}/f2b.pid\ndbfile = :memory:\n"
            ),
        )?;
        // Debian's postfix filter knows rejections of unknown hosts, relay and the like, not a
        // HELO refused by check_helo_access ("Helo command rejected: Access denied"): one line
        // teaches it, as an admin would add it.
        std::fs::write(
            dir.join("filter.d/postfix.local"),
            "[Definition]\nfailregex = <mdre-<mode>>\n            \
             ^%(_pref)s from [^[]*\\[<HOST>\\]%(_port)s: 554 5\\.7\\.1 <[^>]*>: Helo command rejected: Access denied\n",
        )?;
        std::fs::write(
            dir.join("jail.local"),
            format!(
                "[DEFAULT]\nbackend = polling\nbanaction = nftables-multiport\nbantime = 1h\n\
                 findtime = 10m\nmaxretry = 1\n\n[sshd]\nenabled = false\n\n\
                 [postfix]\nenabled = true\nport = smtp\nlogpath = {} tail\n",
                postfix_log.display()
            ),
        )?;
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", gateway.name))
            .args(["env", "TZ=UTC", "fail2ban-client", "-c"])
            .arg(&dir)
            .args(["-b", "start"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "fail2ban-client start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !guard.client(&["status", "postfix"]).is_some_and(|s| s.contains("Currently banned"))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "fail2ban's postfix jail not up in 20 s:\n{}",
                guard.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(guard)
    }

    fn client(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg("fail2ban-client")
            .arg("-c")
            .arg(&self.dir)
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("fail2ban.log")).unwrap_or_default()
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("f2b.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        let _ = self.client(&["stop"]);
        if let Some(pid) = pid {
            for _ in 0..50 {
                if rustix::process::test_kill_process(pid).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        // The ban action's table, in case the stop left it (the namespace goes too).
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "inet", "f2b-table"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file removed when dropped.
pub struct RemoveFile(pub PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
