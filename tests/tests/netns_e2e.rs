//! End to end on the real kernel path: a client namespace joined by veth to a gateway namespace
//! that runs a TCP listener on port 25 and the agent with XDP attached in native mode. Bans are
//! made with the `helo-agent` CLI from another shell (the root namespace), as an admin would.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::netns::{Netns, in_netns, veth};
use tests::{AgentProcess, PinDir, agent_cli, require_root};

const GW_V4: &str = "198.51.100.1";
const GW_V6: &str = "2001:db8:100::1";
const CLIENT: &str = "198.51.100.2";
const NEIGHBOUR: &str = "198.51.100.3";
const ALLOWLISTED: &str = "198.51.100.130";
const CLIENT_V6: &str = "2001:db8:100::2";

/// A TCP server on [::]:25 in the gateway namespace that greets and closes; stops when dropped.
struct Greeter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = std::net::TcpListener::bind("[::]:25").expect("bind [::]:25");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        use std::io::Write as _;
                        let _ = conn.write_all(b"220 gateway ESMTP test\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("listener ready");
        Greeter { stop, thread: Some(thread) }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `src` (inside the client namespace) to `dst:25`; the greeting, or the error kind.
fn connect(client: &Netns, src: &str, dst: &str) -> Result<String, std::io::ErrorKind> {
    let src: IpAddr = src.parse().unwrap();
    let dst = SocketAddr::new(dst.parse().unwrap(), 25);
    client.enter(move || {
        let domain = socket2::Domain::for_address(dst);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
        socket.connect_timeout(&dst.into(), Duration::from_secs(1)).map_err(|e| e.kind())?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = [0u8; 64];
        let n = stream.read(&mut greeting).map_err(|e| e.kind())?;
        Ok(String::from_utf8_lossy(&greeting[..n]).into_owned())
    })
}

fn greeted(result: Result<String, std::io::ErrorKind>, who: &str) {
    match result {
        Ok(greeting) => assert!(greeting.starts_with("220 "), "{who}: greeting {greeting:?}"),
        Err(kind) => panic!("{who} could not connect: {kind:?}"),
    }
}

fn dropped(result: Result<String, std::io::ErrorKind>, who: &str) {
    assert_eq!(
        result,
        Err(std::io::ErrorKind::TimedOut),
        "{who}: a banned source's SYN must be dropped (no answer at all, not a refusal)"
    );
}

fn dropped_counter(pin_dir: &PinDir) -> u64 {
    let json = agent_cli(pin_dir.path(), &["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&json).expect("stats --json");
    stats["dropped"].as_u64().expect("dropped counter")
}

struct Testbed {
    gateway: Netns,
    client: Netns,
    gw_if: String,
    pin_dir: PinDir,
    _greeter: Greeter,
    config: std::path::PathBuf,
}

fn testbed() -> Testbed {
    require_root();
    let gateway = Netns::new("hfgw");
    let client = Netns::new("hfcl");
    let (gw_if, cl_if) = veth(&gateway, &client);
    gateway.ip(&["addr", "add", &format!("{GW_V4}/24"), "dev", &gw_if]);
    gateway.ip(&["addr", "add", &format!("{GW_V6}/64"), "dev", &gw_if, "nodad"]);
    for addr in [CLIENT, NEIGHBOUR, ALLOWLISTED] {
        client.ip(&["addr", "add", &format!("{addr}/24"), "dev", &cl_if]);
    }
    client.ip(&["addr", "add", &format!("{CLIENT_V6}/64"), "dev", &cl_if, "nodad"]);
    let greeter = Greeter::start(&gateway);
    let pin_dir = PinDir::new();
    let config = pin_dir.config("[allowlist]\nnetworks = [\"198.51.100.128/25\"]\n");
    Testbed { gateway, client, gw_if, pin_dir, _greeter: greeter, config }
}

impl Testbed {
    fn start_agent(&self) -> AgentProcess {
        self.start_agent_with(&[])
    }

    /// The agent, ready once XDP is attached and its control socket answers (which it does
    /// only after attaching and restoring the snapshot).
    fn start_agent_with(&self, extra: &[&str]) -> AgentProcess {
        let pin = self.pin_dir.path().to_str().unwrap().to_owned();
        let config = self.config.to_str().unwrap().to_owned();
        let (gateway, gw_if) = (self.gateway.name.clone(), self.gw_if.clone());
        let attached = move || {
            let out = std::process::Command::new("ip")
                .args(["-n", &gateway, "link", "show", &gw_if])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
        };
        let pin_dir = self.pin_dir.path().to_owned();
        let control = self.pin_dir.control_socket();
        let prefix = self.gateway.exec_prefix();
        AgentProcess::start(
            &prefix.each_ref().map(String::as_str),
            &[
                "--config",
                &config,
                "--pin-dir",
                &pin,
                "run",
                "--iface",
                &self.gw_if,
                "--xdp-mode",
                "native",
                // The greeter owns port 25 here: these suites are about the kernel path, so
                // the proxy listens out of the way.
                "--listen",
                "127.0.0.1:10026",
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
            move || {
                pin_dir.join(helo_common::maps::BANS_V4).exists()
                    && attached()
                    && tests::control_answers(&control)
            },
        )
    }

    fn attached(&self) -> bool {
        self.gateway.ip(&["link", "show", &self.gw_if]).contains("prog/xdp")
    }

    fn cli(&self, args: &[&str]) -> String {
        agent_cli(
            self.pin_dir.path(),
            &[&["--config", self.config.to_str().unwrap()], args].concat(),
        )
    }
}

#[test]
fn ban_drops_until_expiry_spares_others_and_allowlisted_clients() {
    let bed = testbed();
    let mut agent = bed.start_agent();

    greeted(connect(&bed.client, CLIENT, GW_V4), "client before any ban");

    let before = dropped_counter(&bed.pin_dir);
    agent_cli(bed.pin_dir.path(), &["ban", CLIENT, "--ttl", "3s", "--reason", "e2e"]);
    let banned_at = Instant::now();
    let listing = agent_cli(bed.pin_dir.path(), &["list"]);
    assert!(listing.contains(CLIENT) && listing.contains("e2e"), "list shows the ban:\n{listing}");

    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client");
    assert!(dropped_counter(&bed.pin_dir) > before, "the drop counter rises");
    greeted(connect(&bed.client, NEIGHBOUR, GW_V4), "an unbanned neighbour");

    // Banned too, but in the agent's allowlist: never dropped. (The CLI without the agent's
    // config does not know the allowlist, so the ban goes in; the kernel must still spare it.)
    agent_cli(bed.pin_dir.path(), &["ban", ALLOWLISTED, "--ttl", "1h"]);
    greeted(connect(&bed.client, ALLOWLISTED, GW_V4), "an allowlisted client though banned");

    // After the 3 s TTL the kernel lets the client through again.
    let expiry = banned_at + Duration::from_millis(3_300);
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()));
    greeted(connect(&bed.client, CLIENT, GW_V4), "client after its ban expired");

    assert!(agent.stop(), "the agent exits cleanly on SIGTERM:\n{}", agent.log());
}

#[test]
fn ipv6_prefix_ban_drops_until_unbanned() {
    let bed = testbed();
    let _agent = bed.start_agent();
    greeted(connect(&bed.client, CLIENT_V6, GW_V6), "v6 client before any ban");

    agent_cli(bed.pin_dir.path(), &["ban", CLIENT_V6, "--prefix", "--ttl", "10m"]);
    let listing = agent_cli(bed.pin_dir.path(), &["list", "--json"]);
    assert!(listing.contains("2001:db8:100::/64"), "the /64 is listed:\n{listing}");
    dropped(connect(&bed.client, CLIENT_V6, GW_V6), "v6 client in a banned /64");
    // IPv4 from the same host is another source: untouched.
    greeted(connect(&bed.client, CLIENT, GW_V4), "the same host over IPv4");

    // Unbanning the host alone lifts nothing, and says which ban to lift.
    let output = std::process::Command::new(tests::agent_bin())
        .arg("--pin-dir")
        .arg(bed.pin_dir.path())
        .args(["unban", CLIENT_V6])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "unban of a host inside a banned /64: {stderr}");
    assert!(stderr.contains("unban 2001:db8:100::/64"), "{stderr}");
    dropped(connect(&bed.client, CLIENT_V6, GW_V6), "v6 client still in a banned /64");
    agent_cli(bed.pin_dir.path(), &["unban", "2001:db8:100::/64"]);
    greeted(connect(&bed.client, CLIENT_V6, GW_V6), "v6 client after unban");
}

/// The program stays attached through its pinned link while the agent is down, the next agent
/// swaps its program in without a gap, and `detach` removes it.
#[test]
fn bans_hold_while_the_agent_is_down_and_across_a_restart() {
    let bed = testbed();
    let mut first = bed.start_agent();
    bed.cli(&["ban", CLIENT, "--ttl", "10m", "--reason", "restart"]);
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client");

    // Load across the restart: the banned client and a neighbour keep connecting.
    let stop = Arc::new(AtomicBool::new(false));
    let load = |src: &'static str| {
        let (stop, client) = (stop.clone(), bed.client.name.clone());
        std::thread::spawn(move || {
            let (mut answered, mut dropped) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let attempt = tests::netns::in_netns(&client, move || {
                    let src: IpAddr = src.parse().unwrap();
                    let dst = SocketAddr::new(GW_V4.parse().unwrap(), 25);
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
                    socket.connect_timeout(&dst.into(), Duration::from_millis(300)).is_ok()
                });
                if attempt { answered += 1 } else { dropped += 1 }
            }
            (answered, dropped)
        })
    };
    let (banned_load, neighbour_load) = (load(CLIENT), load(NEIGHBOUR));
    std::thread::sleep(Duration::from_millis(500));
    assert!(first.stop(), "first agent exits cleanly:\n{}", first.log());
    assert!(bed.attached(), "the program stays attached after the agent exits");
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client while the agent is down");
    greeted(connect(&bed.client, NEIGHBOUR, GW_V4), "others while the agent is down");

    let second = bed.start_agent();
    assert!(
        second.log().contains("replaced_previous")
            && second.log().contains("replaced_previous=true"),
        "the new program goes into the pinned link:\n{}",
        second.log()
    );
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client after the restart");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (banned_answered, banned_dropped) = banned_load.join().unwrap();
    let (neighbour_answered, _) = neighbour_load.join().unwrap();
    assert_eq!(banned_answered, 0, "the banned client got through during the restart");
    assert!(
        banned_dropped > 0 && neighbour_answered > 0,
        "the load ran: {banned_dropped} dropped, {neighbour_answered} served"
    );
    drop(second);

    let removed = bed.cli(&["detach"]);
    assert!(removed.contains("xdp-link-"), "detach removes the pinned link:\n{removed}");
    assert!(!bed.attached(), "detach leaves no program on the interface");
    greeted(connect(&bed.client, CLIENT, GW_V4), "client once the program is detached");
}

/// What a reboot does to the pinned maps (they are gone), done with `detach --maps`: the next
/// agent restores the bans from the snapshot the last one saved at shutdown.
#[test]
fn bans_come_back_from_the_snapshot_when_the_maps_are_gone() {
    let bed = testbed();
    let mut first = bed.start_agent();
    // Through the control socket: the agent's worker writes the ban.
    bed.cli(&["ban", CLIENT, "--ttl", "10m", "--reason", "from-snapshot"]);
    assert!(first.stop(), "first agent exits cleanly:\n{}", first.log());
    let saved = std::fs::read_to_string(bed.pin_dir.snapshot()).expect("a snapshot was saved");
    assert!(saved.contains(CLIENT) && saved.contains("from-snapshot"), "snapshot: {saved}");

    bed.cli(&["detach", "--maps"]);
    assert!(!bed.pin_dir.path().join(helo_common::maps::BANS_V4).exists(), "maps removed");
    greeted(connect(&bed.client, CLIENT, GW_V4), "client with no maps and no program");

    let second = bed.start_agent();
    assert!(second.log().contains("restored=1"), "one ban restored:\n{}", second.log());
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client after the restore");
    let listing: serde_json::Value = serde_json::from_str(&bed.cli(&["list", "--json"])).unwrap();
    assert_eq!(listing[0]["reason"], "from-snapshot", "{listing}");
    let left = listing[0]["remaining_secs"].as_u64().unwrap();
    assert!((540..=600).contains(&left), "the remaining time is kept, not reset: {left} s");
}

/// A corrupt snapshot is reported and set aside; the agent starts anyway.
#[test]
fn a_corrupt_snapshot_is_set_aside_not_fatal() {
    let bed = testbed();
    std::fs::write(bed.pin_dir.snapshot(), b"{\"version\": 1, \"bans\": [{\"target\"").unwrap();
    let agent = bed.start_agent();
    let log = agent.log();
    assert!(log.contains("ban snapshot is corrupt"), "reported:\n{log}");
    assert!(!bed.pin_dir.snapshot().exists(), "the corrupt file is renamed aside");
    let dir = bed.pin_dir.snapshot().parent().unwrap().to_owned();
    let aside = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("bans.json.corrupt-"));
    assert!(aside, "bans.json.corrupt-<time> is kept for a look");
}

/// SIGKILL, then a restart: bans held in the kernel meanwhile, and the new agent serves
/// sessions (through the proxy, to the greeter as MTA) within 2 s of its start.
#[test]
fn after_sigkill_a_restart_serves_within_two_seconds_and_bans_hold() {
    let bed = testbed();
    let upstream = ["--upstream", "127.0.0.1:25"];
    let mut first = bed.start_agent_with(&upstream);
    bed.cli(&["ban", CLIENT, "--ttl", "10m"]);
    first.kill();
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client after the agent was killed");

    let gateway = bed.gateway.name.clone();
    let started = Instant::now();
    let second = bed.start_agent_with(&upstream);
    let deadline = started + Duration::from_secs(2);
    let mut served = false;
    while Instant::now() < deadline + Duration::from_secs(1) && !served {
        served = in_netns(&gateway, || tests::greeting("127.0.0.1:10026").is_some());
    }
    let recovery = started.elapsed();
    assert!(served, "the restarted agent serves:\n{}", second.log());
    assert!(recovery <= Duration::from_secs(2), "served {recovery:?} after the restart (over 2 s)");
    eprintln!("recovery after SIGKILL: served {} ms after the restart", recovery.as_millis());
    dropped(connect(&bed.client, CLIENT, GW_V4), "banned client after the restart");
}

/// XDP unavailable (native mode on loopback, which has no driver XDP): the agent says so and
/// still enforces bans, closing a banned client at accept instead of failing open.
#[test]
fn without_xdp_bans_are_enforced_at_accept() {
    let bed = testbed();
    let pin = bed.pin_dir.path().to_str().unwrap().to_owned();
    let config = bed.config.to_str().unwrap().to_owned();
    let prefix = bed.gateway.exec_prefix();
    let gateway = bed.gateway.name.clone();
    // The greeter on port 25 plays the MTA; the proxy listens on 2525.
    let greeted_on_2525 =
        move || in_netns(&gateway, || tests::greeting("127.0.0.1:2525").is_some());
    let agent = AgentProcess::start(
        &prefix.each_ref().map(String::as_str),
        &[
            "--config",
            &config,
            "--pin-dir",
            &pin,
            "run",
            "--iface",
            "lo",
            "--xdp-mode",
            "native",
            "--listen",
            "127.0.0.1:2525",
            "--upstream",
            "127.0.0.1:25",
        ],
        greeted_on_2525.clone(),
    );
    assert!(agent.log().contains("XDP NOT ATTACHED"), "the agent says so loudly:\n{}", agent.log());
    agent_cli(bed.pin_dir.path(), &["--config", &config, "ban", "127.0.0.1", "--ttl", "10m"]);
    assert!(!greeted_on_2525(), "a banned client gets no greeting");
    agent_cli(bed.pin_dir.path(), &["unban", "127.0.0.1"]);
    assert!(greeted_on_2525(), "served again after unban");
}
