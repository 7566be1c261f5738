//! Shared helpers for the root-only suites in `tests/tests/`: hand-built frames, a program loaded
//! into its own pin directory, network namespaces with veth, and the agent as a child process.
//! Every resource is owned by a guard whose `Drop` removes it, so a failing test cleans up too.

pub mod frames;
pub mod netns;
pub mod postfix;
pub mod redis;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Panics unless running as root: these suites load XDP programs and create namespaces.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the root suites need root (BPF, namespaces): run them with `sudo -E cargo xtask test`"
    );
}

/// A unique, short name for this process and call: `<prefix><pid % 100000><n>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One test's agent files: a pin directory on bpffs and a state directory (control socket,
/// ban snapshot, config), both removed, with everything in them, when dropped. Tests running
/// side by side never share a socket, a snapshot or maps.
pub struct PinDir(pub PathBuf, PathBuf);

impl PinDir {
    pub fn new() -> Self {
        ensure_bpffs();
        let name = unique("helo-test-");
        let state = std::env::temp_dir().join(format!("{name}-state"));
        std::fs::create_dir_all(&state).expect("state directory");
        PinDir(PathBuf::from("/sys/fs/bpf").join(name), state)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn control_socket(&self) -> PathBuf {
        self.1.join("control.sock")
    }

    pub fn snapshot(&self) -> PathBuf {
        self.1.join("bans.json")
    }

    /// Writes the agent config `text` with this test's pin directory, control socket and
    /// snapshot filled in (where `text` does not set them); returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let mut table: toml::Table = text.parse().expect("test config parses");
        let mut set = |section: &str, key: &str, value: &Path| {
            let section = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a table");
            section
                .entry(key)
                .or_insert_with(|| toml::Value::String(value.to_str().unwrap().to_owned()));
        };
        set("xdp", "pin_dir", &self.0);
        set("agent", "control_socket", &self.control_socket());
        set("bans", "snapshot", &self.snapshot());
        // The pregreet test (on by default: a new client waits 6 s for the final 220, in two
        // lines) and the DNS checks (on by default, in log mode: they would ask the machine's
        // resolver, which a test must not depend on) are off unless a suite sets them itself.
        // So are the other readers of DNS, unless the suite brings its own resolver
        // (`dns.servers`): the trust anchor and `impersonation`.
        let own_resolver = table
            .get("dns")
            .and_then(|dns| dns.get("servers"))
            .is_some_and(|servers| servers.as_array().is_some_and(|s| !s.is_empty()));
        if let toml::Value::Table(checks) =
            table.entry("checks").or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            let mut off = vec!["pregreet", "unknown_helo", "helo_not_client"];
            if !own_resolver {
                off.push("impersonation");
            }
            for check in off {
                checks.entry(check).or_insert_with(|| toml::Value::String("off".into()));
            }
        }
        if !own_resolver
            && let toml::Value::Table(trust) =
                table.entry("trust").or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            trust.entry("forward_confirmed").or_insert(toml::Value::Boolean(false));
        }
        let path = self.1.join(unique("agent-").to_string() + ".toml");
        std::fs::write(&path, toml::to_string(&table).unwrap()).expect("write the test config");
        path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
}

/// Runs a command to completion and panics, with its output, when it fails.
pub fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The greeting at `addr`, if it greets with a 220 within 2 s (a QUIT follows, best effort).
/// A 421 (say, the agent with no MTA behind it yet) is no greeting.
pub fn greeting(addr: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let addr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).ok()?;
    let _ = stream.write_all(b"QUIT\r\n");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.starts_with("220").then_some(text)
}

/// Whether an agent answers on the control socket at `path`.
pub fn control_answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// The helo-agent binary under test: `HELO_AGENT_BIN` (set by `cargo xtask test`), else the
/// debug build in the workspace target directory.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("HELO_AGENT_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/helo-agent");
    assert!(
        bin.exists(),
        "{} not found: run the root suites with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// `helo-agent --pin-dir DIR ARGS...`, run to completion; panics when it fails. With
/// `--no-config` unless ARGS name a config: the installed one (the package test installs it,
/// perhaps at the same time) is every command's default, and this one is not a test's.
pub fn agent_cli(pin_dir: &Path, args: &[&str]) -> String {
    let mut command = Command::new(agent_bin());
    if !args.iter().any(|a| a.starts_with("--config")) {
        command.arg("--no-config");
    }
    run(command.arg("--pin-dir").arg(pin_dir).args(args))
}

/// The agent running as a child; stopped with SIGTERM (then SIGKILL) when dropped.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `helo-agent ARGS...` through `prefix` (for example `ip netns exec NS`), logging to
    /// a file, and waits until `ready` holds (or panics after 20 s with the log).
    pub fn start(prefix: &[&str], args: &[&str], ready: impl Fn() -> bool) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique("helo-agent-")));
        let file = std::fs::File::create(&log).expect("agent log file");
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        command.args(args).stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut agent = AgentProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the agent exited ({status}) before it was ready:\n{}", agent.log());
            }
            assert!(Instant::now() < deadline, "the agent was not ready in 20 s:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// `helo-agent --config CONFIG run --iface IFACE --xdp-mode MODE EXTRA...` inside `ns`
    /// (through [`netns::Netns::exec_prefix`]), ready once `ready` holds.
    pub fn run_in(
        ns: &netns::Netns,
        config: &Path,
        iface: &str,
        mode: &str,
        extra: &[&str],
        ready: impl Fn() -> bool,
    ) -> Self {
        let prefix = ns.exec_prefix();
        let config = config.to_str().expect("a UTF-8 config path");
        let mut args = vec!["--config", config, "run", "--iface", iface, "--xdp-mode", mode];
        args.extend(extra);
        Self::start(&prefix.each_ref().map(String::as_str), &args, ready)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or the OOM killer would; waits for the process to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (up to 10 s) for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("child pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
