//! The kernel front door end to end, with real parts: a private Postfix in a gateway namespace
//! that keeps its own port-25 smtpd on the gateway's public addresses (198.51.100.1:25 and
//! [2001:db8:100::1]:25, with the agent's policy door at RCPT, as the README sets it up) and a
//! PROXY smtpd on 127.0.0.1:10025; the agent with `[steer]` on those endpoints, its own
//! sockets on 127.0.0.1:2525 and [::1]:2525, XDP on the gateway's veth; clients in a client
//! namespace (swaks, and a small SMTP client of our own for IPv6 and the connection loop).
//!
//! Which socket took a connection shows in its greeting: the agent greets as `agent.gw.test`,
//! Postfix as `mx.gw.test ESMTP Postfix`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::netns::{Netns, in_netns, spawn_in, veth};
use tests::postfix::{DOMAIN, Postfix, UPSTREAM, wait_for};
use tests::{AgentProcess, PinDir, agent_bin, greeting, require_root, run};

const GW4: &str = "198.51.100.1";
const GW6: &str = "2001:db8:100::1";
const AGENT_NAME: &str = "agent.gw.test";
const POSTFIX_BANNER: &str = "mx.gw.test ESMTP Postfix";

/// Fields drop in order: the agent stops, then Postfix, then the namespaces go.
struct Bed {
    agent: Option<AgentProcess>,
    postfix: Postfix,
    gateway: Netns,
    client: Netns,
    gw_if: String,
    pin_dir: PinDir,
    config: PathBuf,
}

/// The agent's config: steering on the gateway's two endpoints, the agent's own sockets, the
/// policy door for Postfix's port-25 smtpd, our own name forged by bots.
fn agent_config(pass_ttl: &str) -> String {
    format!(
        "[steer]\naddresses = [\"{GW4}:25\", \"[{GW6}]:25\"]\npass_ttl = \"{pass_ttl}\"\n\
         [identity]\ndetect = false\ndomains = [\"=mx.gw.test\"]\n\
         [policy]\nlisteners = [\"127.0.0.1:10040\"]\n\
         [proxy]\nhostname = \"{AGENT_NAME}\"\nshutdown_grace = \"5s\"\n\
         [[proxy.listeners]]\naddress = \"127.0.0.1:2525\"\n\
         [[proxy.listeners]]\naddress = \"[::1]:2525\"\n"
    )
}

/// The port-25 smtpd Postfix keeps (on the steered endpoints), with the policy door at RCPT.
fn services() -> String {
    let smtpd = |addr: &str| {
        format!(
            "{addr}:25 inet n - n - - smtpd\n  -o {{ smtpd_recipient_restrictions = \
             check_policy_service inet:127.0.0.1:10040, reject_unauth_destination }}\n"
        )
    };
    smtpd(GW4) + &smtpd(&format!("[{GW6}]"))
}

fn bed(name: &str, clients: &[&str], pass_ttl: &str) -> Bed {
    require_root();
    let gateway = Netns::new("hfsg");
    let client = Netns::new("hfsc");
    let (gw_if, cl_if) = veth(&gateway, &client);
    gateway.ip(&["addr", "add", &format!("{GW4}/24"), "dev", &gw_if]);
    gateway.ip(&["-6", "addr", "add", &format!("{GW6}/64"), "dev", &gw_if, "nodad"]);
    for addr in clients {
        let (family, len) = if addr.contains(':') { ("-6", 64) } else { ("-4", 24) };
        let mut args = vec![family, "addr", "add"];
        let with_len = format!("{addr}/{len}");
        args.extend([with_len.as_str(), "dev", &cl_if]);
        if family == "-6" {
            args.push("nodad");
        }
        client.ip(&args);
    }
    let extra = "inet_protocols = all\nsmtpd_policy_service_default_action = DUNNO\n";
    let postfix = Postfix::start(&gateway, name, extra, &services());
    let gw = gateway.name.clone();
    wait_for("Postfix on the public port 25", Duration::from_secs(20), move || {
        in_netns(&gw, || TcpStream::connect(format!("{GW4}:25")).is_ok())
    });
    let pin_dir = PinDir::new();
    let config = pin_dir.config(&agent_config(pass_ttl));
    let mut bed = Bed { agent: None, postfix, gateway, client, gw_if, pin_dir, config };
    bed.start_agent();
    bed
}

impl Bed {
    fn start_agent(&mut self) {
        self.agent = Some(self.spawn_agent(&[]));
    }

    /// The agent in the gateway namespace, ready when its own socket greets; `env` as
    /// `KEY=value` (through env(1)).
    fn spawn_agent(&self, env: &[&str]) -> AgentProcess {
        let mut prefix: Vec<String> = self.gateway.exec_prefix().to_vec();
        if !env.is_empty() {
            prefix.push("env".into());
            prefix.extend(env.iter().map(|e| e.to_string()));
        }
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let args = [
            "--config",
            self.config.to_str().unwrap(),
            "run",
            "--iface",
            &self.gw_if,
            "--xdp-mode",
            "native",
            "--upstream",
            UPSTREAM,
        ];
        let gateway = self.gateway.name.clone();
        AgentProcess::start(&prefix, &args, move || {
            in_netns(&gateway, || greeting("127.0.0.1:2525").is_some())
        })
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("the agent runs")
    }

    /// `helo-agent --config CONFIG ARGS...` (through the control socket when the agent runs).
    fn cli(&self, args: &[&str]) -> String {
        run(Command::new(agent_bin()).arg("--config").arg(&self.config).args(args))
    }

    fn passes(&self) -> Vec<String> {
        let listed: serde_json::Value =
            serde_json::from_str(&self.cli(&["passes", "--json"])).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["client"].as_str().unwrap().to_owned())
            .collect()
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["stats", "--json"])).unwrap()
    }

    /// A whole SMTP transaction from `source` to the gateway's endpoint of its family.
    fn mail(&self, source: &str, helo: &str, tag: &str) -> Session {
        let source: IpAddr = source.parse().unwrap();
        let server: SocketAddr = if source.is_ipv6() {
            format!("[{GW6}]:25").parse().unwrap()
        } else {
            format!("{GW4}:25").parse().unwrap()
        };
        let (helo, tag) = (helo.to_owned(), tag.to_owned());
        in_netns(&self.client.name, move || smtp(source, server, &helo, &tag))
    }

    /// Sessions the agent logged for `client` so far.
    fn agent_sessions(&self, client: &str) -> usize {
        let wanted = format!("client={client} ");
        self.agent()
            .log()
            .lines()
            .filter(|l| l.contains(" session") && l.contains(&wanted))
            .filter(|l| l.contains("door=\"proxy\"") || l.contains("door=proxy "))
            .count()
    }

    /// Waits until the agent has logged `sessions` proxy sessions of `client`, and asserts that
    /// it logged no more. The line is written when a session ends, after the client has read
    /// the QUIT reply, so a count taken as soon as the client returns can be one short.
    fn expect_agent_sessions(&self, client: &str, sessions: usize) {
        wait_for(&format!("{sessions} proxy sessions of {client}"), Duration::from_secs(5), || {
            self.agent_sessions(client) >= sessions
        });
        assert_eq!(self.agent_sessions(client), sessions, "{}", self.agent().log());
    }

    fn delivered_with(&self, tag: &str) -> bool {
        self.postfix.delivered().iter().any(|m| String::from_utf8_lossy(m).contains(tag))
    }
}

/// What a session saw.
#[derive(Debug, Default)]
struct Session {
    greeting: String,
    /// The reply to RCPT TO (its code), 0 if not reached.
    rcpt: u16,
    /// The reply to the message's final dot, 0 if not reached.
    data: u16,
    error: Option<String>,
}

impl Session {
    fn by_agent(&self) -> bool {
        self.greeting.contains(AGENT_NAME)
    }

    fn by_postfix(&self) -> bool {
        self.greeting.contains(POSTFIX_BANNER)
    }
}

/// A small SMTP client: EHLO, MAIL, RCPT, DATA with `tag` in the body, QUIT; stops at the first
/// reply that is not the one hoped for.
fn smtp(source: IpAddr, server: SocketAddr, helo: &str, tag: &str) -> Session {
    let mut session = Session::default();
    let result = (|| -> std::io::Result<()> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut reply = || -> std::io::Result<(u16, String)> {
            let mut text = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, text));
                }
                text.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                    return Ok((code, text));
                }
            }
        };
        let (code, text) = reply()?;
        session.greeting = text;
        if code != 220 {
            return Ok(());
        }
        let mut say = |line: &str| writer.write_all(format!("{line}\r\n").as_bytes());
        say(&format!("EHLO {helo}"))?;
        if reply()?.0 != 250 {
            return Ok(());
        }
        say("MAIL FROM:<sender@sender.example>")?;
        reply()?;
        say(&format!("RCPT TO:<user@{DOMAIN}>"))?;
        session.rcpt = reply()?.0;
        if session.rcpt != 250 {
            say("QUIT")?;
            let _ = reply();
            return Ok(());
        }
        say("DATA")?;
        if reply()?.0 != 354 {
            return Ok(());
        }
        say(&format!("Subject: {tag}\r\n\r\n{tag}\r\n."))?;
        session.data = reply()?.0;
        say("QUIT")?;
        let _ = reply();
        Ok(())
    })();
    session.error = result.err().map(|e| e.to_string());
    session
}

/// Whether a SYN from `source` to the gateway gets an answer within 1 s (XDP drops a banned
/// source's SYN: no answer).
fn answers(client_ns: &str, source: &str) -> bool {
    let source: IpAddr = source.parse().unwrap();
    in_netns(client_ns, move || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        let server: SocketAddr = format!("{GW4}:25").parse().unwrap();
        socket.connect_timeout(&server.into(), Duration::from_secs(1)).is_ok()
    })
}

/// A stranger is judged by the agent and delivered; its next session goes straight to
/// Postfix's own port-25 smtpd (the agent has no session for it), IPv4 and IPv6; a forged HELO
/// gets 553 and a ban, and the bot's return is dropped; a ban removes a pass; a known sender
/// whose HELO turns bad at Postfix's port 25 is banned by the policy door and loses its pass;
/// an expired pass is judged again.
#[test]
fn strangers_are_judged_known_senders_go_straight_to_postfix_and_bans_take_passes() {
    let stranger = "198.51.100.10";
    let bot = "198.51.100.11";
    let turncoat = "198.51.100.12";
    let expiring = "198.51.100.13";
    let stranger6 = "2001:db8:100::10";
    let bed = bed("steer", &[stranger, bot, turncoat, expiring, stranger6], "1d");

    // A stranger: judged by the agent, relayed with PROXY v2 to 127.0.0.1:10025, delivered.
    let first = bed.mail(stranger, "mail.sender.example", "stranger-first");
    assert!(first.by_agent(), "{first:?}\n{}", bed.agent().log());
    assert_eq!((first.rcpt, first.data), (250, 250), "{first:?}");
    wait_for("the stranger's first message", Duration::from_secs(20), || {
        bed.delivered_with("stranger-first")
    });
    bed.expect_agent_sessions(stranger, 1);
    wait_for("the stranger's pass", Duration::from_secs(5), || {
        bed.passes().contains(&stranger.to_owned())
    });

    // Its next session: Postfix's own smtpd, the agent never hears of it.
    let before = bed.stats();
    let second = bed.mail(stranger, "mail.sender.example", "stranger-second");
    assert!(second.by_postfix(), "{second:?}");
    assert_eq!((second.rcpt, second.data), (250, 250), "{second:?}");
    wait_for("the stranger's second message", Duration::from_secs(20), || {
        bed.delivered_with("stranger-second")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bed.agent_sessions(stranger), 1, "no proxy session for a known sender");
    let after = bed.stats();
    assert!(after["steer_passed"].as_u64() > before["steer_passed"].as_u64(), "{after}");

    // IPv6 alike.
    let first6 = bed.mail(stranger6, "mail6.sender.example", "stranger6-first");
    assert!(first6.by_agent() && first6.data == 250, "{first6:?}");
    wait_for("the IPv6 stranger's pass", Duration::from_secs(5), || {
        bed.passes().contains(&stranger6.to_owned())
    });
    let second6 = bed.mail(stranger6, "mail6.sender.example", "stranger6-second");
    assert!(second6.by_postfix() && second6.data == 250, "{second6:?}");
    wait_for("both IPv6 messages", Duration::from_secs(20), || {
        bed.delivered_with("stranger6-first") && bed.delivered_with("stranger6-second")
    });

    // A bot forging our name: 553 at RCPT from the agent, banned, its return dropped by XDP.
    let forged = bed.mail(bot, "mx.gw.test", "bot");
    assert!(forged.by_agent(), "{forged:?}");
    assert_eq!(forged.rcpt, 553, "{forged:?}");
    wait_for("the bot's ban", Duration::from_secs(5), || bed.cli(&["list"]).contains(bot));
    assert!(!answers(&bed.client.name, bot), "the bot's return is dropped");
    assert!(!bed.passes().contains(&bot.to_owned()));

    // A ban removes the pass, and after the unban the client is judged again.
    bed.cli(&["ban", stranger, "--ttl", "1h", "--reason", "test"]);
    assert!(!bed.passes().contains(&stranger.to_owned()), "the ban took the pass");
    bed.cli(&["unban", stranger]);
    let judged = bed.mail(stranger, "mail.sender.example", "stranger-third");
    assert!(judged.by_agent(), "judged again: {judged:?}");

    // A known sender whose HELO turns bad at Postfix's port 25: the policy door bans it, and
    // the pass goes.
    let honest = bed.mail(turncoat, "relay.turncoat.example", "turncoat-first");
    assert!(honest.by_agent() && honest.data == 250, "{honest:?}");
    wait_for("the turncoat's pass", Duration::from_secs(5), || {
        bed.passes().contains(&turncoat.to_owned())
    });
    let bad = bed.mail(turncoat, "localhost", "turncoat-bad");
    assert!(bad.by_postfix(), "straight to Postfix: {bad:?}");
    assert!(bad.rcpt >= 500, "Postfix refused at RCPT through the policy door: {bad:?}");
    wait_for("the turncoat's ban", Duration::from_secs(5), || {
        bed.cli(&["list"]).contains(turncoat)
    });
    assert!(!bed.passes().contains(&turncoat.to_owned()), "the ban took the pass");
    assert!(!answers(&bed.client.name, turncoat), "its next SYN is dropped");
    assert!(!bed.delivered_with("turncoat-bad"));

    // An expired pass is judged again: passes of 2 s after a reload (pass_ttl is live).
    std::fs::write(
        &bed.config,
        std::fs::read_to_string(&bed.config).unwrap().replace("\"1d\"", "\"2s\""),
    )
    .unwrap();
    bed.cli(&["reload"]);
    let fresh = bed.mail(expiring, "mail.expiring.example", "expiring-1");
    assert!(fresh.by_agent(), "{fresh:?}");
    wait_for("the short pass", Duration::from_secs(5), || {
        bed.passes().contains(&expiring.to_owned())
    });
    std::thread::sleep(Duration::from_millis(2500));
    let again = bed.mail(expiring, "mail.expiring.example", "expiring-2");
    assert!(again.by_agent(), "the pass expired: judged again: {again:?}");
    bed.expect_agent_sessions(expiring, 2);
}

/// Fail open and restart: with the agent killed (-9) a stranger delivers straight to Postfix
/// while a banned client stays dropped; a restart (SIGTERM, then a new agent) under a loop of
/// connections every 25 ms refuses none of them (no reset, no 421, no timeout); the watchdog's
/// notifications reach NOTIFY_SOCKET; both programs load together and `detach` removes both.
#[test]
fn a_crash_or_a_restart_refuses_nothing_and_detach_removes_both_programs() {
    let stranger = "198.51.100.20";
    let banned = "198.51.100.21";
    let looper = "198.51.100.22";
    let mut bed = bed("steer-restart", &[stranger, banned, looper], "1d");
    let links = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("link"))
            .collect()
    };
    let pinned = links(bed.pin_dir.path());
    assert!(pinned.iter().any(|n| n.starts_with("xdp-link-")), "{pinned:?}");
    assert!(pinned.iter().any(|n| n.starts_with("steer-link-")), "{pinned:?}");

    bed.cli(&["ban", banned, "--ttl", "1h"]);
    bed.agent.as_mut().unwrap().kill();
    let crashed = bed.mail(stranger, "mail.sender.example", "while-down");
    assert!(crashed.by_postfix(), "fail open: {crashed:?}");
    assert_eq!(crashed.data, 250, "{crashed:?}");
    assert!(!answers(&bed.client.name, banned), "a banned client stays dropped meanwhile");

    // The watchdog's side, with a NOTIFY_SOCKET of our own.
    let notify_path = bed.pin_dir.snapshot().with_file_name("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // The agent writes to it after dropping root, as to systemd's world-writable socket.
    run(Command::new("chmod").arg("0777").arg(&notify_path));
    notify.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let socket_env = format!("NOTIFY_SOCKET={}", notify_path.display());
    bed.agent = Some(bed.spawn_agent(&[&socket_env, "WATCHDOG_USEC=1000000"]));
    let mut heard = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && heard.iter().filter(|m: &&String| *m == "WATCHDOG=1").count() < 2
    {
        let mut buf = [0u8; 256];
        if let Ok(n) = notify.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert_eq!(heard.first().map(String::as_str), Some("READY=1"), "{heard:?}");
    assert!(heard.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2, "{heard:?}");

    // The loop: a connection every 25 ms, each a greeting and a QUIT.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        let source: IpAddr = looper.parse().unwrap();
        spawn_in(&bed.client.name, move || {
            let server: SocketAddr = format!("{GW4}:25").parse().unwrap();
            let (mut made, mut refused) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) && made < 1000 {
                made += 1;
                let session = greet_and_quit(source, server);
                if let Err(why) = session {
                    refused.push(why);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (made, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut old = bed.agent.take().unwrap();
    let stopped = old.stop();
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    while let Ok(n) = notify.recv(&mut buf) {
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(heard.iter().any(|m| m == "STOPPING=1"), "{heard:?}");
    bed.start_agent();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (made, refused) = looping.join().unwrap();
    assert!(stopped, "the agent stopped cleanly:\n{}", old.log());
    assert!(made >= 40, "the loop ran: {made}");
    assert!(refused.is_empty(), "{} of {made} refused: {refused:?}", refused.len());
    eprintln!("restart under a 25 ms loop: {made} connections, 0 refused");

    // Detach removes both links.
    bed.agent.as_mut().unwrap().stop();
    bed.cli(&["detach"]);
    assert!(links(bed.pin_dir.path()).is_empty(), "{:?}", links(bed.pin_dir.path()));
}

/// A connection from `source`: the greeting (any server's, 220), QUIT, the 221; `Err` says
/// how it was refused.
fn greet_and_quit(source: IpAddr, server: SocketAddr) -> Result<(), String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    socket.bind(&SocketAddr::new(source, 0).into()).map_err(|e| e.to_string())?;
    socket
        .connect_timeout(&server.into(), Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    let read_reply =
        |reader: &mut BufReader<TcpStream>, line: &mut String| -> Result<String, String> {
            loop {
                line.clear();
                reader.read_line(line).map_err(|e| format!("read: {e}"))?;
                if line.is_empty() {
                    return Err("closed".into());
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(line.clone());
                }
            }
        };
    let greeting = read_reply(&mut reader, &mut line)?;
    if !greeting.starts_with("220") {
        return Err(format!("greeting {greeting:?}"));
    }
    (&stream).write_all(b"QUIT\r\n").map_err(|e| format!("write: {e}"))?;
    let bye = read_reply(&mut reader, &mut line)?;
    if !bye.starts_with("221") {
        return Err(format!("QUIT answered {bye:?}"));
    }
    Ok(())
}
