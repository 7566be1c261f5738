//! `helo-agent top` against a real agent: the agent guards a gateway namespace (XDP on its
//! veth, the proxy on port 25, a scripted MTA behind it), a client namespace makes SMTP
//! sessions that pass, are rejected and are banned, and `top` runs under tmux at 80x24. The
//! test reads the screen (`tmux capture-pane -p`) until it shows the counts those sessions
//! make, then presses `q` and checks that `top` exits 0. Every wait is bounded; the tmux
//! server, the agent and the namespaces are removed by guards, also when the test fails.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::netns::{Netns, veth};
use tests::{AgentProcess, PinDir, agent_bin, require_root, unique};

const GW: &str = "198.51.100.1";
/// Says a good HELO.
const GOOD: &str = "198.51.100.10";
/// Says a name without a dot: rejected (`no_dot`).
const NO_DOT: &str = "198.51.100.11";
/// Says `localhost`: rejected and banned (`localhost`).
const LOCALHOST: &str = "198.51.100.12";
/// Where the scripted MTA listens, in the gateway namespace.
const MTA: &str = "127.0.0.1:10025";

/// A scripted MTA: greets, answers 250 to everything but QUIT (221). Stops when dropped.
struct ScriptedMta {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedMta {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = std::net::TcpListener::bind(MTA).expect("bind the MTA");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || mta_session(conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("the MTA listens");
        ScriptedMta { stop, thread: Some(thread) }
    }
}

fn mta_session(conn: TcpStream) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let _ = writer.write_all(b"220 mta.test ESMTP\r\n");
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let quit = line.eq_ignore_ascii_case("QUIT");
        let reply: &[u8] = if quit { b"221 bye\r\n" } else { b"250 mta.test\r\n" };
        if writer.write_all(reply).is_err() || quit {
            return;
        }
    }
}

impl Drop for ScriptedMta {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One SMTP session from `src` in the client namespace: EHLO `helo`, MAIL, RCPT, QUIT. The
/// replies, one per command (the greeting first).
fn session(client: &Netns, src: &'static str, helo: &'static str) -> Vec<String> {
    client.enter(move || {
        let src: IpAddr = src.parse().unwrap();
        let dst = SocketAddr::new(GW.parse().unwrap(), 25);
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
        socket
            .connect_timeout(&dst.into(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{src} cannot connect to the proxy: {e}"));
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        // A reply may have several lines; its last has a space after the code.
        let mut reply = || {
            let mut text = String::new();
            loop {
                let mut line = String::new();
                let n = reader.read_line(&mut line).unwrap_or(0);
                text.push_str(&line);
                if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                    return text.trim_end().to_owned();
                }
            }
        };
        let mut replies = vec![reply()];
        for command in [
            format!("EHLO {helo}"),
            "MAIL FROM:<a@b.example>".into(),
            "RCPT TO:<c@d.example>".into(),
        ]
        .into_iter()
        .chain(["QUIT".to_owned()])
        {
            writer.write_all(format!("{command}\r\n").as_bytes()).unwrap();
            replies.push(reply());
        }
        replies
    })
}

/// Whether a new connection from `src` is answered within 1 s (a banned one is dropped).
fn answered(client: &Netns, src: &'static str) -> bool {
    client.enter(move || {
        let src: IpAddr = src.parse().unwrap();
        let dst = SocketAddr::new(GW.parse().unwrap(), 25);
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
        socket.connect_timeout(&dst.into(), Duration::from_secs(1)).is_ok()
    })
}

/// A tmux server of this test's own (`tmux -L NAME`), killed with everything in it when
/// dropped.
struct Tmux {
    server: String,
}

impl Tmux {
    /// Runs `command` in a detached 80x24 window through `sh`, which writes `exited: STATUS`
    /// on the screen after it and stays a minute, to be read (tmux blanks a dead pane that
    /// used the alternate screen, even with remain-on-exit).
    fn start(command: &[&str]) -> Self {
        let tmux = Tmux { server: unique("helo-top-") };
        let mut args = vec!["new-session", "-d", "-s", "top", "-x", "80", "-y", "24"];
        args.extend(["sh", "-c", r#""$0" "$@"; echo "exited: $?"; sleep 60"#]);
        args.extend(command);
        tmux.run(&args);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        tests::run(
            Command::new("tmux")
                .args(["-L", &self.server, "-f", "/dev/null"])
                .args(args)
                .env("LANG", "C.UTF-8")
                .env("TERM", "xterm-256color"),
        )
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// Waits up to `limit` for `what` to hold on the screen; the last screen either way.
    fn wait_for(&self, limit: Duration, what: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if what(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                return Err(screen);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.server, "kill-server"]).output();
    }
}

/// The screen's lines as words, box borders left out.
fn lines(screen: &str) -> impl Iterator<Item = Vec<&str>> {
    screen.lines().map(|line| {
        line.split(|c: char| c.is_whitespace() || "│┌┐└┘─".contains(c))
            .filter(|w| !w.is_empty())
            .collect()
    })
}

/// The words of the first screen line that starts with `word` (the left box's rows).
fn row<'a>(screen: &'a str, word: &str) -> Vec<&'a str> {
    lines(screen).find(|w| w.first() == Some(&word)).unwrap_or_default()
}

/// The `n`th word after `word` on the first line that has it: in a box of counters, 1 is the
/// rate and 2 the total.
fn after<'a>(screen: &'a str, word: &str, n: usize) -> Option<&'a str> {
    let words = lines(screen).find(|w| w.contains(&word))?;
    let at = words.iter().position(|w| *w == word)?;
    words.get(at + n).copied()
}

struct Gateway {
    gateway: Netns,
    client: Netns,
    gw_if: String,
    pin_dir: PinDir,
    config: std::path::PathBuf,
}

fn gateway() -> Gateway {
    require_root();
    let gateway = Netns::new("hftg");
    let client = Netns::new("hftc");
    let (gw_if, cl_if) = veth(&gateway, &client);
    gateway.ip(&["addr", "add", &format!("{GW}/24"), "dev", &gw_if]);
    for addr in [GOOD, NO_DOT, LOCALHOST] {
        client.ip(&["addr", "add", &format!("{addr}/24"), "dev", &cl_if]);
    }
    let pin_dir = PinDir::new();
    let config = pin_dir.config("[identity]\ndetect = false\n");
    Gateway { gateway, client, gw_if, pin_dir, config }
}

impl Gateway {
    fn start_agent(&self) -> AgentProcess {
        let pin = self.pin_dir.path().to_str().unwrap().to_owned();
        let config = self.config.to_str().unwrap().to_owned();
        let control = self.pin_dir.control_socket();
        let (gateway, gw_if) = (self.gateway.name.clone(), self.gw_if.clone());
        let attached = move || {
            let out = Command::new("ip").args(["-n", &gateway, "link", "show", &gw_if]).output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        };
        let prefix = self.gateway.exec_prefix();
        let listen = format!("{GW}:25");
        AgentProcess::start(
            &prefix.each_ref().map(String::as_str),
            &[
                &["--config", &config, "--pin-dir", &pin][..],
                &["run", "--iface", &self.gw_if, "--xdp-mode", "native", "--listen", &listen],
                &["--upstream", MTA, "--proxy-protocol", "none"],
            ]
            .concat(),
            move || attached() && tests::control_answers(&control),
        )
    }

    /// `helo-agent --config C --pin-dir P top`, as a command line for tmux.
    fn top_command(&self) -> Vec<String> {
        vec![
            agent_bin().display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.path().display().to_string(),
            "top".into(),
        ]
    }
}

#[test]
fn top_shows_what_real_sessions_counted_and_quits_on_q_and_sigterm() {
    let bed = gateway();
    let _mta = ScriptedMta::start(&bed.gateway);
    let agent = bed.start_agent();
    let command = bed.top_command();
    let tmux = Tmux::start(&command.iter().map(String::as_str).collect::<Vec<_>>());
    let fail = |what: &str, screen: &str| -> ! {
        panic!("{what}; the screen:\n{screen}\nthe agent's log:\n{}", agent.log())
    };
    let first = tmux
        .wait_for(Duration::from_secs(10), |s| {
            s.contains("helo-agent top") && s.contains("q: quit")
        })
        .unwrap_or_else(|screen| fail("top did not draw in 10 s", &screen));
    assert!(
        first.lines().count() <= 24 && first.lines().all(|l| l.chars().count() <= 80),
        "fits 80x24:\n{first}"
    );

    for _ in 0..3 {
        let replies = session(&bed.client, GOOD, "mail.example.com");
        assert!(replies[0].starts_with("220") && replies[1].starts_with("250"), "{replies:?}");
        assert!(replies[3].starts_with("250"), "a good client's RCPT reaches the MTA: {replies:?}");
    }
    for _ in 0..2 {
        let replies = session(&bed.client, NO_DOT, "friend");
        assert!(replies[3].starts_with("553"), "friend is rejected at RCPT TO: {replies:?}");
    }
    let replies = session(&bed.client, LOCALHOST, "localhost");
    assert!(replies[3].starts_with("553"), "localhost is rejected at RCPT TO: {replies:?}");
    // The ban lands when the session ends; the next connection from there is dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered(&bed.client, LOCALHOST) {
        assert!(Instant::now() < deadline, "localhost's client was not banned:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    let counted = |s: &str| {
        after(s, "pass", 2) == Some("3")
            && after(s, "reject", 2) == Some("2")
            && after(s, "ban", 2) == Some("1")
            && after(s, "added", 2) == Some("1")
            && after(s, "active", 1) == Some("1")
            && after(s, "dropped", 2).and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 1)
            && after(s, "mail.example.com", 1) == Some("3")
            && after(s, "friend", 1) == Some("2")
    };
    let screen = tmux
        .wait_for(Duration::from_secs(10), counted)
        .unwrap_or_else(|screen| fail("top did not show the sessions' counts in 10 s", &screen));
    // The top HELOs: sessions, rejected, the rule; the rules box.
    assert_eq!(row(&screen, "friend")[..4], ["friend", "2", "2", "no_dot"], "{screen}");
    assert_eq!(row(&screen, "localhost")[..4], ["localhost", "1", "1", "localhost"], "{screen}");
    assert_eq!(after(&screen, "mail.example.com", 2), Some("0"), "{screen}");
    assert!(row(&screen, "policy").contains(&"off"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let after_exit = tmux
        .wait_for(Duration::from_secs(5), |s| s.contains("exited: "))
        .unwrap_or_else(|screen| fail("q did not end top in 5 s", &screen));
    assert!(after_exit.contains("exited: 0"), "top exits 0 on q:\n{after_exit}");
    assert!(
        !after_exit.contains("Top HELOs"),
        "the terminal is back from the alternate screen:\n{after_exit}"
    );
    drop(tmux);

    // SIGTERM (`kill`, or an ssh session that ends) also gives the terminal back.
    let tmux = Tmux::start(&command.iter().map(String::as_str).collect::<Vec<_>>());
    tmux.wait_for(Duration::from_secs(10), |s| s.contains("q: quit"))
        .unwrap_or_else(|screen| fail("top did not draw in 10 s", &screen));
    let shell = tmux.run(&["display-message", "-p", "-t", "top", "#{pane_pid}"]);
    let top = tests::run(Command::new("pgrep").args(["-P", shell.trim()]));
    tests::run(Command::new("kill").args(["-TERM", top.trim()]));
    let after_term = tmux
        .wait_for(Duration::from_secs(5), |s| s.contains("exited: "))
        .unwrap_or_else(|screen| fail("SIGTERM did not end top in 5 s", &screen));
    assert!(
        after_term.contains("exited: 0") && !after_term.contains("Top HELOs"),
        "top ends cleanly on SIGTERM, the terminal restored:\n{after_term}"
    );

    // Its terminal gone (an ssh session dropped; here the tmux server killed): top used to spin
    // on end of file at full CPU, deaf to SIGHUP and SIGTERM, until kill -9.
    let tmux = Tmux::start(&command.iter().map(String::as_str).collect::<Vec<_>>());
    tmux.wait_for(Duration::from_secs(10), |s| s.contains("q: quit"))
        .unwrap_or_else(|screen| fail("top did not draw in 10 s", &screen));
    let shell = tmux.run(&["display-message", "-p", "-t", "top", "#{pane_pid}"]);
    let top = tests::run(Command::new("pgrep").args(["-P", shell.trim()]));
    let proc = std::path::PathBuf::from(format!("/proc/{}", top.trim()));
    drop(tmux);
    // Gone, or a zombie nobody reaps (this machine's PID 1 may not).
    let running = || {
        std::fs::read_to_string(proc.join("stat"))
            .is_ok_and(|stat| stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while running() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", top.trim()]).status();
            panic!("top was still running 5 s after its terminal went away");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With no agent at the socket, `top` says which socket it tried and what to do, and exits 1
/// without drawing anything.
#[test]
fn top_without_an_agent_says_what_to_do() {
    require_root();
    let pin_dir = PinDir::new();
    let config = pin_dir.config("");
    let out = Command::new(agent_bin())
        .arg("--config")
        .arg(&config)
        .arg("--pin-dir")
        .arg(pin_dir.path())
        .arg("top")
        .output()
        .expect("helo-agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let socket = pin_dir.control_socket();
    assert!(
        stderr.contains(&socket.display().to_string()) && stderr.contains("helo-agent run"),
        "names the socket tried and how to start the agent:\n{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing drawn: {:?}", String::from_utf8_lossy(&out.stdout));
}
