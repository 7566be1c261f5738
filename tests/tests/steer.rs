//! The steering front door (sk_lookup), kernel side: the program's decisions through
//! BPF_PROG_TEST_RUN with the live maps, then real TCP connections over veth between a client
//! namespace and a gateway namespace, where an "MTA" keeps port 25 and an "agent" socket on
//! 127.0.0.1:2525 / [::1]:2525 sits in the agent sockets map. Each listener answers every
//! connection with one line: its name, the accepted socket's local address (getsockname) and
//! the peer, so a test sees which socket the kernel chose and what destination it kept.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use helo_agent::addr::BanTarget;
use helo_agent::blocklist::{Blocklist, Ttl};
use helo_agent::clock::boot_ns;
use helo_agent::config::{AttachMode, MapSizes};
use helo_agent::ebpf::{
    self, AgentSockets, Family, LoadOptions, PassMaps, PinnedMaps, SteerLookup, XdpProgram,
};
use helo_common::{PassValue, STAT_COUNT, Stat};
use tests::netns::{Netns, in_netns, veth};
use tests::{PinDir, agent_cli, require_root};

const SK_PASS: u32 = 1;

const MX_V4: &str = "203.0.113.5:25";
const MX_V6: &str = "[2001:db8::5]:25";
const AGENT_V4: &str = "127.0.0.1:2525";
const AGENT_V6: &str = "[::1]:2525";

fn load(dir: &Path, allow: &[&str]) -> XdpProgram {
    let allow: Vec<ipnet::IpNet> = allow.iter().map(|n| n.parse().unwrap()).collect();
    let mut program = ebpf::load(&LoadOptions {
        pin_dir: dir,
        sizes: MapSizes::default(),
        ports: &helo_common::DEFAULT_PORTS,
        allow: &allow,
        passes: helo_agent::config::PassSizes::default(),
    })
    .unwrap_or_else(|e| panic!("loading the programs: {e}"));
    let endpoints = [MX_V4.parse().unwrap(), MX_V6.parse().unwrap()];
    program.load_steering(&endpoints).unwrap_or_else(|e| panic!("loading steering: {e}"));
    program
}

/// A listening TCP socket; IPv6 ones v6-only unless `dual`.
fn listen(addr: &str, dual: bool) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        socket.set_only_v6(!dual).unwrap();
    }
    socket.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(128).unwrap();
    socket.into()
}

fn cookie(socket: &TcpListener) -> u64 {
    rustix::net::sockopt::socket_cookie(socket).expect("SO_COOKIE")
}

fn stats(dir: &Path) -> [u64; STAT_COUNT as usize] {
    PinnedMaps::open(dir).unwrap().stats().unwrap()
}

/// The steering counter that moved between `before` and `after`, if one did; panics if more
/// than one did, or by more than one, or if an XDP counter moved.
fn moved(before: &[u64], after: &[u64]) -> Option<Stat> {
    let moved: Vec<Stat> =
        Stat::ALL.into_iter().filter(|s| after[*s as usize] != before[*s as usize]).collect();
    assert!(moved.len() <= 1, "at most one counter moves per lookup, moved: {moved:?}");
    let stat = *moved.first()?;
    assert!(Stat::STEER.contains(&stat), "{stat:?} is not a steering counter");
    assert_eq!(after[stat as usize], before[stat as usize] + 1);
    Some(stat)
}

fn ban(dir: &Path, target: &str) {
    let mut bans = Blocklist::new(PinnedMaps::open(dir).unwrap());
    let target: BanTarget = target.parse().unwrap();
    bans.ban(&target, Ttl::For(Duration::from_secs(600)), "test", boot_ns()).unwrap();
}

fn pass(dir: &Path, client: &str, expires_ns: u64) {
    let mut passes = PassMaps::open(dir).unwrap();
    passes.insert(client.parse().unwrap(), &PassValue::new(expires_ns)).unwrap();
}

fn pass_of(dir: &Path, client: &str) -> Option<PassValue> {
    PassMaps::open(dir).unwrap().get(client.parse().unwrap()).unwrap()
}

const MINUTE_NS: u64 = 60_000_000_000;

// --- The program's decisions, through BPF_PROG_TEST_RUN ---------------------------------------

/// The program loaded (not attached) with a real listening socket per family in its agent
/// sockets map, and one lookup run at a time.
struct Bench {
    program: XdpProgram,
    sockets: AgentSockets,
    agent_v4: TcpListener,
    agent_v6: TcpListener,
    dir: PinDir,
}

impl Bench {
    fn new(allow: &[&str]) -> Self {
        require_root();
        let dir = PinDir::new();
        let mut program = load(dir.path(), allow);
        let mut sockets = program.take_agent_sockets().expect("the agent sockets map");
        // Bound on loopback and never connected to: they only need to be listening sockets.
        let agent_v4 = listen("127.0.0.1:0", false);
        let agent_v6 = listen("[::1]:0", false);
        assert_eq!(sockets.set(agent_v4.as_fd()).unwrap(), Family::V4);
        assert_eq!(sockets.set(agent_v6.as_fd()).unwrap(), Family::V6);
        Bench { program, sockets, agent_v4, agent_v6, dir }
    }

    /// Runs one lookup from `remote` to `local`; returns the socket selected (by cookie) and
    /// the steering counter that moved.
    fn lookup(&self, remote: &str, local: &str) -> (Option<u64>, Option<Stat>) {
        let lookup = SteerLookup {
            remote: SocketAddr::new(remote.parse().unwrap(), 40_000),
            local: local.parse().unwrap(),
        };
        let before = stats(self.dir.path());
        let run = self.program.steer_test_run(&lookup, 1).expect("BPF_PROG_TEST_RUN");
        assert_eq!(run.action, SK_PASS, "the program never refuses a connection");
        (run.selected, moved(&before, &stats(self.dir.path())))
    }

    fn v4(&self) -> Option<u64> {
        Some(cookie(&self.agent_v4))
    }

    fn v6(&self) -> Option<u64> {
        Some(cookie(&self.agent_v6))
    }
}

#[test]
fn a_stranger_goes_to_the_agent_socket_of_its_family() {
    let bench = Bench::new(&[]);
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (bench.v6(), Some(Stat::Steered)));
}

#[test]
fn only_the_steered_addresses_and_ports_are_looked_at() {
    let bench = Bench::new(&[]);
    for (remote, local) in [
        // A local client to the MTA on loopback, and to the agent's own port.
        ("127.0.0.1", "127.0.0.1:25"),
        ("127.0.0.1", "127.0.0.1:2525"),
        ("::1", "[::1]:25"),
        // The steered address on another port, and another address on port 25.
        ("198.51.100.7", "203.0.113.5:587"),
        ("198.51.100.7", "203.0.113.6:25"),
        ("2001:db8:1::7", "[2001:db8::5]:587"),
        ("2001:db8:1::7", "[2001:db8::6]:25"),
    ] {
        assert_eq!(bench.lookup(remote, local), (None, None), "{remote} -> {local}");
    }
}

#[test]
fn a_pass_in_force_goes_straight_to_the_mta_and_counts_its_hits() {
    let bench = Bench::new(&[]);
    let dir = bench.dir.path();
    pass(dir, "198.51.100.7", boot_ns() + MINUTE_NS);
    pass(dir, "2001:db8:1::7", boot_ns() + MINUTE_NS);
    for _ in 0..3 {
        assert_eq!(bench.lookup("198.51.100.7", MX_V4), (None, Some(Stat::SteerPassed)));
    }
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (None, Some(Stat::SteerPassed)));
    assert_eq!(pass_of(dir, "198.51.100.7").unwrap().hits, 3);
    assert_eq!(pass_of(dir, "2001:db8:1::7").unwrap().hits, 1);
    // The pass is the client's, not its network's.
    assert_eq!(bench.lookup("198.51.100.8", MX_V4), (bench.v4(), Some(Stat::Steered)));
    assert_eq!(bench.lookup("2001:db8:1::8", MX_V6), (bench.v6(), Some(Stat::Steered)));
}

#[test]
fn an_expired_pass_is_steered_again_and_the_kernel_removes_it() {
    let bench = Bench::new(&[]);
    let dir = bench.dir.path();
    pass(dir, "198.51.100.7", boot_ns() - 1);
    pass(dir, "2001:db8:1::7", boot_ns() - 1);
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (bench.v6(), Some(Stat::Steered)));
    assert_eq!(pass_of(dir, "198.51.100.7"), None);
    assert_eq!(pass_of(dir, "2001:db8:1::7"), None);
    // A pass that ends a moment from now holds now and is gone once its time is up.
    pass(dir, "198.51.100.7", boot_ns() + 300_000_000);
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (None, Some(Stat::SteerPassed)));
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
}

/// A ban in force means XDP did not drop the SYN (not attached, or not on this path): the
/// agent must see the client, which refuses it, whatever its pass says.
#[test]
fn a_banned_client_with_a_pass_goes_to_the_agent() {
    let bench = Bench::new(&[]);
    let dir = bench.dir.path();
    for client in ["198.51.100.7", "2001:db8:1::7", "2001:db8:bad::7"] {
        pass(dir, client, boot_ns() + MINUTE_NS);
    }
    ban(dir, "198.51.100.7");
    ban(dir, "2001:db8:1::7");
    ban(dir, "2001:db8:bad::/64");
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::SteerBanned)));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (bench.v6(), Some(Stat::SteerBanned)));
    assert_eq!(bench.lookup("2001:db8:bad::7", MX_V6), (bench.v6(), Some(Stat::SteerBanned)));
    assert_eq!(pass_of(dir, "198.51.100.7").unwrap().hits, 0, "no hit for a banned client");
}

#[test]
fn an_allowlisted_client_goes_straight_to_the_mta() {
    let bench = Bench::new(&["198.51.100.0/24", "2001:db8:600d::/48"]);
    ban(bench.dir.path(), "198.51.100.7");
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (None, Some(Stat::SteerAllowlisted)));
    assert_eq!(bench.lookup("2001:db8:600d::7", MX_V6), (None, Some(Stat::SteerAllowlisted)));
    assert_eq!(bench.lookup("192.0.2.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
}

/// Issue 27: the steering program consults the ban maps as XDP does, prefixes of every length
/// in use included, and passes an allowlisted client inside a banned prefix straight to the MTA,
/// as XDP passes it.
#[test]
fn a_prefix_ban_steers_its_clients_to_the_agent_and_an_allowlisted_one_inside_passes() {
    let bench = Bench::new(&["2001:db8:5::99/128", "198.51.100.77/32"]);
    let dir = bench.dir.path();
    for client in ["2001:db8:5::7", "2001:db8:48:1::7", "198.51.100.7", "2001:db8:5::99"] {
        pass(dir, client, boot_ns() + MINUTE_NS);
    }
    ban(dir, "2001:db8:5::/64");
    ban(dir, "2001:db8:48::/48");
    ban(dir, "198.51.100.0/24");
    for client in ["2001:db8:5::7", "2001:db8:48:1::7"] {
        assert_eq!(bench.lookup(client, MX_V6), (bench.v6(), Some(Stat::SteerBanned)), "{client}");
    }
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::SteerBanned)));
    assert_eq!(bench.lookup("2001:db8:5::99", MX_V6), (None, Some(Stat::SteerAllowlisted)));
    assert_eq!(bench.lookup("198.51.100.77", MX_V4), (None, Some(Stat::SteerAllowlisted)));
    assert_eq!(bench.lookup("2001:db8:49::7", MX_V6), (bench.v6(), Some(Stat::Steered)));
    assert_eq!(bench.lookup("198.51.101.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
}

#[test]
fn with_no_agent_socket_every_connection_goes_to_the_mta() {
    let mut bench = Bench::new(&[]);
    bench.sockets.clear(Family::V4).unwrap();
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (None, Some(Stat::SteerNoAgent)));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (bench.v6(), Some(Stat::Steered)));
    // Closing the socket empties its slot (the kernel's sock_map_close), as a crash does.
    let Bench { agent_v6, .. } = &mut bench;
    let closed = std::mem::replace(agent_v6, listen("[::1]:0", false));
    drop(closed);
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (None, Some(Stat::SteerNoAgent)));
}

/// A slot with no socket (a steering agent with one family only, or a socket already closed)
/// is emptied without an error: the agent empties both slots at every stop, and logged an
/// error for the empty one (the kernel answers EINVAL there, not ENOENT).
#[test]
fn emptying_an_empty_agent_slot_is_not_an_error() {
    let mut bench = Bench::new(&[]);
    bench.sockets.clear(Family::V4).unwrap();
    bench.sockets.clear(Family::V4).unwrap_or_else(|e| panic!("the slot was empty already: {e}"));
    let Bench { agent_v6, .. } = &mut bench;
    drop(std::mem::replace(agent_v6, listen("[::1]:0", false)));
    bench.sockets.clear(Family::V6).unwrap_or_else(|e| panic!("its socket closed: {e}"));
}

#[test]
fn the_steered_endpoints_can_be_replaced_in_place() {
    let mut bench = Bench::new(&[]);
    let mut endpoints = bench.program.take_steer_endpoints().expect("the endpoints map");
    let mut held = endpoints.endpoints();
    held.sort();
    assert_eq!(held, [MX_V4.parse::<SocketAddr>().unwrap(), MX_V6.parse().unwrap()]);
    endpoints.replace(&["203.0.113.5:587".parse().unwrap()]).unwrap();
    assert_eq!(endpoints.endpoints(), ["203.0.113.5:587".parse::<SocketAddr>().unwrap()]);
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (None, None));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (None, None));
    assert_eq!(bench.lookup("198.51.100.7", "203.0.113.5:587"), (bench.v4(), Some(Stat::Steered)));
}

#[test]
fn a_socket_of_the_wrong_kind_is_refused() {
    let mut bench = Bench::new(&[]);
    let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(bench.sockets.set(unix.as_fd()).is_err(), "a unix socket is no agent socket");
    // A TCP socket that is not listening: the kernel refuses it in the map.
    let idle = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(bench.sockets.set(idle.as_fd()).is_err());
    // The sockets in the map are still the agent's.
    assert_eq!(bench.lookup("198.51.100.7", MX_V4), (bench.v4(), Some(Stat::Steered)));
    assert_eq!(bench.lookup("2001:db8:1::7", MX_V6), (bench.v6(), Some(Stat::Steered)));
}

#[test]
fn pass_maps_list_and_remove_by_client_and_network() {
    let bench = Bench::new(&[]);
    let dir = bench.dir.path();
    let until = boot_ns() + MINUTE_NS;
    for client in ["198.51.100.7", "2001:db8:1::7", "2001:db8:1::8", "2001:db8:2::7"] {
        pass(dir, client, until);
    }
    let mut passes = PassMaps::open(dir).unwrap();
    // An IPv4-mapped address is the IPv4 client.
    assert_eq!(
        passes.get("::ffff:198.51.100.7".parse().unwrap()).unwrap().unwrap().expires_ns,
        until
    );
    let mut all: Vec<String> =
        passes.entries().unwrap().into_iter().map(|(ip, _)| ip.to_string()).collect();
    all.sort();
    assert_eq!(all, ["198.51.100.7", "2001:db8:1::7", "2001:db8:1::8", "2001:db8:2::7"]);
    assert_eq!(passes.remove_within(&"2001:db8:1::/64".parse().unwrap()).unwrap(), 2);
    assert!(passes.remove("198.51.100.7".parse().unwrap()).unwrap());
    assert!(!passes.remove("198.51.100.7".parse().unwrap()).unwrap());
    let left: Vec<IpAddr> = passes.entries().unwrap().into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(left, ["2001:db8:2::7".parse::<IpAddr>().unwrap()]);
}

/// What the program costs a new connection, from the kernel's own clock over a million runs
/// each: printed for the record (run with `--nocapture`), bounded loosely so that a program
/// that went badly wrong (a loop, a hash walk) fails.
#[test]
fn steering_costs_well_under_a_microsecond_a_lookup() {
    let bench = Bench::new(&[]);
    pass(bench.dir.path(), "198.51.100.8", boot_ns() + 10 * MINUTE_NS);
    let runs = 1_000_000;
    for (name, remote, local) in [
        ("not steered (127.0.0.1:25)", "127.0.0.1", "127.0.0.1:25"),
        ("stranger, to the agent", "198.51.100.7", MX_V4),
        ("pass, to the MTA", "198.51.100.8", MX_V4),
        ("stranger v6, to the agent", "2001:db8:1::7", MX_V6),
    ] {
        let lookup = SteerLookup {
            remote: SocketAddr::new(remote.parse().unwrap(), 40_000),
            local: local.parse().unwrap(),
        };
        let run = bench.program.steer_test_run(&lookup, runs).unwrap();
        eprintln!(
            "sk_lookup test run, {name}: {} ns a lookup ({runs} runs)",
            run.duration.as_nanos()
        );
        assert!(run.duration < Duration::from_micros(2), "{name}: {:?} a lookup", run.duration);
    }
}

// --- Real connections over veth ----------------------------------------------------------------

/// A listener that answers each connection with `NAME local peer\n`, until dropped (which
/// closes the socket).
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn new(name: &'static str, listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let local = conn.local_addr().unwrap();
                        let _ = conn.write_all(format!("{name} {local} {peer}\n").as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("{name}: accept: {e}"),
                }
            }
        });
        Server { stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Who answered a connection: the listener's name, the accepted socket's local address and
/// the peer it saw.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    name: String,
    local: SocketAddr,
    peer: IpAddr,
}

/// Connects from `source` in namespace `ns` to `dest`, and reads the answer line (`None`: the
/// connection was accepted by the kernel but no one answered within 500 ms). Panics when the
/// connection fails.
fn connect(ns: &str, source: &str, dest: &str) -> Option<Answer> {
    try_connect(ns, source, dest).unwrap_or_else(|e| panic!("{source} -> {dest}: {e}"))
}

/// [`connect`], with a failed connection (refused, or no SYN|ACK within 2 s) as an error.
fn try_connect(ns: &str, source: &str, dest: &str) -> std::io::Result<Option<Answer>> {
    let source: IpAddr = source.parse().unwrap();
    let dest: SocketAddr = dest.parse().unwrap();
    in_netns(ns, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(dest),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&dest.into(), Duration::from_secs(2))?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut line = String::new();
        let _ = stream.read_to_string(&mut line);
        let mut words = line.split_whitespace();
        let answer = (|| {
            let name = words.next()?.to_owned();
            let local = words.next()?.parse().ok()?;
            let peer = words.next()?.parse::<SocketAddr>().ok()?.ip();
            Some(Answer { name, local, peer })
        })();
        Ok(answer)
    })
}

/// The name of who answered a connection from `source` to `dest` over the veth.
fn answered(front: &Front, source: &str, dest: &str) -> Option<String> {
    connect(&front.cli.name, source, dest).map(|a| a.name)
}

/// A gateway namespace with the MTA on port 25 (`[::]:25`, dual stack) and the programs
/// loaded and steering attached, and a client namespace with .10-.12 and ::10-::12, joined by
/// veth.
struct Front {
    mta: Option<Server>,
    program: Option<XdpProgram>,
    sockets: AgentSockets,
    gw_if: String,
    cli: Netns,
    gw: Netns,
    dir: PinDir,
}

impl Front {
    fn new() -> Self {
        require_root();
        let dir = PinDir::new();
        let gw = Netns::new("hfsg");
        let cli = Netns::new("hfsc");
        let (gw_if, cli_if) = veth(&gw, &cli);
        gw.ip(&["addr", "add", "203.0.113.5/24", "dev", &gw_if]);
        gw.ip(&["addr", "add", "2001:db8::5/64", "dev", &gw_if, "nodad"]);
        for host in ["10", "11", "12"] {
            cli.ip(&["addr", "add", &format!("203.0.113.{host}/24"), "dev", &cli_if]);
            cli.ip(&["addr", "add", &format!("2001:db8::{host}/64"), "dev", &cli_if, "nodad"]);
        }
        let pin_dir = dir.path().to_owned();
        let (program, sockets, mta) = gw.enter(move || {
            let mut program = load(&pin_dir, &[]);
            let sockets = program.take_agent_sockets().unwrap();
            let mta = listen("[::]:25", true);
            let attached = program.attach_steering().expect("attach steering");
            assert!(!attached.replaced && attached.pinned, "{attached:?}");
            (program, sockets, mta)
        });
        let front = Front {
            mta: Some(Server::new("MTA", mta)),
            program: Some(program),
            sockets,
            gw_if,
            cli,
            gw,
            dir,
        };
        // Both veth ends up and the v6 neighbours reachable: the MTA answers before a test
        // begins (no agent socket yet: everything fails open to it).
        let deadline = Instant::now() + Duration::from_secs(5);
        for (source, dest) in [("203.0.113.10", MX_V4), ("2001:db8::10", MX_V6)] {
            while !matches!(try_connect(&front.cli.name, source, dest), Ok(Some(_))) {
                assert!(Instant::now() < deadline, "the MTA at {dest} never answered");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        front
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A listening socket made in the gateway namespace.
    fn listen(&self, addr: &'static str) -> TcpListener {
        self.gw.enter(move || listen(addr, false))
    }

    /// An agent on `addr` (in the gateway namespace), its socket in the map; answers as `name`.
    fn agent(&mut self, name: &'static str, addr: &'static str) -> Server {
        let listener = self.listen(addr);
        self.sockets.set(listener.as_fd()).unwrap();
        Server::new(name, listener)
    }
}

#[test]
fn a_strangers_connection_reaches_the_agent_with_its_original_destination() {
    let mut front = Front::new();
    let _agent4 = front.agent("AGENT", AGENT_V4);
    let _agent6 = front.agent("AGENT", AGENT_V6);
    let v4 = connect(&front.cli.name, "203.0.113.10", MX_V4).expect("an answer");
    assert_eq!(
        v4,
        Answer {
            name: "AGENT".into(),
            local: MX_V4.parse().unwrap(),
            peer: "203.0.113.10".parse().unwrap()
        },
        "the agent's socket on {AGENT_V4} got it, and getsockname is the address dialled"
    );
    let v6 = connect(&front.cli.name, "2001:db8::10", MX_V6).expect("an answer");
    assert_eq!(
        v6,
        Answer {
            name: "AGENT".into(),
            local: MX_V6.parse().unwrap(),
            peer: "2001:db8::10".parse().unwrap()
        }
    );
    let stats = stats(front.dir());
    assert_eq!(stats[Stat::Steered as usize], 2);
}

#[test]
fn a_pass_sends_the_next_connection_to_the_mta_and_an_expired_one_is_steered_again() {
    let mut front = Front::new();
    let _agent4 = front.agent("AGENT", AGENT_V4);
    let _agent6 = front.agent("AGENT", AGENT_V6);
    for (client, other, dest) in
        [("203.0.113.11", "203.0.113.10", MX_V4), ("2001:db8::11", "2001:db8::10", MX_V6)]
    {
        assert_eq!(answered(&front, client, dest).as_deref(), Some("AGENT"), "{client}");
        pass(front.dir(), client, boot_ns() + MINUTE_NS);
        for _ in 0..3 {
            assert_eq!(answered(&front, client, dest).as_deref(), Some("MTA"), "{client}");
        }
        assert_eq!(answered(&front, other, dest).as_deref(), Some("AGENT"), "{other}");
        assert_eq!(pass_of(front.dir(), client).unwrap().hits, 3);
        pass(front.dir(), client, boot_ns() - 1);
        assert_eq!(answered(&front, client, dest).as_deref(), Some("AGENT"), "{client} expired");
        assert_eq!(pass_of(front.dir(), client), None, "the kernel removed the expired pass");
    }
}

/// XDP is not attached here, so the banned client's SYN reaches the lookup: its pass must not
/// take it past the agent.
#[test]
fn a_banned_source_with_a_pass_is_not_passed_straight() {
    let mut front = Front::new();
    let _agent4 = front.agent("AGENT", AGENT_V4);
    let _agent6 = front.agent("AGENT", AGENT_V6);
    for (client, dest) in [("203.0.113.12", MX_V4), ("2001:db8::12", MX_V6)] {
        pass(front.dir(), client, boot_ns() + MINUTE_NS);
        assert_eq!(answered(&front, client, dest).as_deref(), Some("MTA"));
        ban(front.dir(), client);
        assert_eq!(answered(&front, client, dest).as_deref(), Some("AGENT"), "{client}");
    }
    assert_eq!(stats(front.dir())[Stat::SteerBanned as usize], 2);
}

#[test]
fn closing_the_agent_socket_fails_open_to_the_mta() {
    let mut front = Front::new();
    let agent4 = front.agent("AGENT", AGENT_V4);
    let agent6 = front.agent("AGENT", AGENT_V6);
    let before = stats(front.dir());
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("AGENT"));
    drop(agent4);
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("MTA"));
    assert_eq!(answered(&front, "2001:db8::10", MX_V6).as_deref(), Some("AGENT"));
    drop(agent6);
    assert_eq!(answered(&front, "2001:db8::10", MX_V6).as_deref(), Some("MTA"));
    let after = stats(front.dir());
    let no_agent = Stat::SteerNoAgent as usize;
    assert_eq!(after[no_agent] - before[no_agent], 2);
}

/// A child process that holds a descriptor of a socket; killed when dropped.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_of_the_process_holding_the_agent_socket_fails_open() {
    let mut front = Front::new();
    let agent = front.listen(AGENT_V4);
    front.sockets.set(agent.as_fd()).unwrap();
    // Hand the socket to a child process (a descriptor without close-on-exec, which the child
    // inherits) and close ours: the child alone holds it, as an agent process would.
    let inherited = rustix::io::dup(&agent).expect("dup");
    let child = std::process::Command::new("sleep").arg("600").spawn().expect("spawn sleep");
    let mut holder = Holder(child);
    drop(inherited);
    drop(agent);
    let before = stats(front.dir());
    // Steered to the child's socket, which stays in the map: the kernel accepts the connection
    // there, and no one answers.
    assert_eq!(connect(&front.cli.name, "203.0.113.10", MX_V4), None);
    assert_eq!(moved(&before, &stats(front.dir())), Some(Stat::Steered));

    holder.0.kill().expect("kill -9");
    holder.0.wait().unwrap();
    // The process's descriptors are closed before wait() returns, and the last close removes
    // the socket from the map. (Another test's short-lived child, spawned in the instant the
    // descriptor was inheritable, could hold it a moment longer: hence a bounded retry.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = stats(front.dir());
        let answer = answered(&front, "203.0.113.10", MX_V4);
        if answer.as_deref() == Some("MTA") {
            assert_eq!(moved(&before, &stats(front.dir())), Some(Stat::SteerNoAgent));
            break;
        }
        assert!(Instant::now() < deadline, "still steered to the killed process's socket");
    }
}

#[test]
fn a_second_agent_socket_replaces_the_first() {
    let mut front = Front::new();
    let _first = front.agent("FIRST", AGENT_V4);
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("FIRST"));
    // The same program, another socket: the first stays open and gets nothing more.
    let _second = front.agent("SECOND", "127.0.0.1:2526");
    for _ in 0..3 {
        assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("SECOND"));
    }
}

/// A new agent's start loads its own program with its own sockets and swaps it into the link
/// the first pinned (BPF_LINK_UPDATE on the netns link): from then on its socket gets every
/// steered connection, while the old agent (still running, socket open) gets none; the passes
/// and bans are the pinned ones both share.
#[test]
fn a_new_agents_program_takes_over_the_pinned_link_atomically() {
    let mut front = Front::new();
    let _old = front.agent("OLD", AGENT_V4);
    pass(front.dir(), "203.0.113.11", boot_ns() + MINUTE_NS);
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("OLD"));
    let pin_dir = front.dir().to_owned();
    let (new_program, _new_sockets, new) = front.gw.enter(move || {
        let mut program = load(&pin_dir, &[]);
        let mut sockets = program.take_agent_sockets().unwrap();
        let listener = listen("127.0.0.1:2526", false);
        sockets.set(listener.as_fd()).unwrap();
        let attached = program.attach_steering().expect("attach steering");
        assert!(attached.replaced && attached.pinned, "{attached:?}");
        (program, sockets, listener)
    });
    let _new = Server::new("NEW", new);
    for _ in 0..3 {
        assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("NEW"));
    }
    assert_eq!(answered(&front, "203.0.113.11", MX_V4).as_deref(), Some("MTA"), "pass kept");
    let links: Vec<_> = std::fs::read_dir(front.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("steer-link-"))
        .collect();
    assert_eq!(links.len(), 1, "one pinned steering link");
    // Both agents' programs closed (they exit): the pinned link keeps the new one steering.
    drop(new_program);
    front.program = None;
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("NEW"));
}

#[test]
fn a_local_client_to_port_25_is_not_steered() {
    let mut front = Front::new();
    let _agent4 = front.agent("AGENT", AGENT_V4);
    let _agent6 = front.agent("AGENT", AGENT_V6);
    for (source, dest) in [("127.0.0.1", "127.0.0.1:25"), ("::1", "[::1]:25")] {
        let answer = connect(&front.gw.name, source, dest).expect("an answer");
        assert_eq!(answer.name, "MTA", "{source} -> {dest}");
    }
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("AGENT"));
}

/// The whole kernel side at once: XDP on the gateway's veth drops a banned client's SYN before
/// any lookup, the steering program sends a stranger to the agent, and `helo-agent detach`
/// removes both pinned links, after which the MTA takes every connection again.
#[test]
fn xdp_and_steering_attach_together_and_detach_removes_both() {
    let mut front = Front::new();
    let iface = front.gw_if.clone();
    let mut program = front.program.take().unwrap();
    let (program, attached) = front.gw.enter(move || {
        let attached = program.attach(&iface, AttachMode::Native).expect("attach XDP");
        (program, attached)
    });
    assert!(attached.pinned, "{attached:?}");
    front.program = Some(program);
    let _agent = front.agent("AGENT", AGENT_V4);
    ban(front.dir(), "203.0.113.12");
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("AGENT"));
    let before = stats(front.dir());
    let refused = try_connect(&front.cli.name, "203.0.113.12", MX_V4);
    assert!(refused.is_err(), "the banned client's connection must time out: {refused:?}");
    let after = stats(front.dir());
    assert!(after[Stat::Dropped as usize] > before[Stat::Dropped as usize], "XDP dropped it");
    assert_eq!(after[Stat::SteerBanned as usize], before[Stat::SteerBanned as usize]);

    // The agent exits (its program handles close): the pinned links keep both programs on.
    front.program = None;
    assert_eq!(answered(&front, "203.0.113.10", MX_V4).as_deref(), Some("AGENT"));
    let out = agent_cli(front.dir(), &["detach"]);
    let removed: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("removed ")).collect();
    assert_eq!(removed.len(), 2, "{out}");
    assert!(removed.iter().any(|p| p.contains("/xdp-link-")), "{out}");
    assert!(removed.iter().any(|p| p.contains("/steer-link-")), "{out}");
    // The kernel releases a link unpinned from bpffs from a work queue, a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    while answered(&front, "203.0.113.10", MX_V4).as_deref() != Some("MTA") {
        assert!(Instant::now() < deadline, "still steered 2 s after detach");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(answered(&front, "203.0.113.12", MX_V4).as_deref(), Some("MTA"), "no XDP now");
    let out = agent_cli(front.dir(), &["detach", "--maps"]);
    for map in [helo_common::maps::PASS_V4, helo_common::maps::PASS_V6] {
        assert!(out.contains(map), "detach --maps removes {map}:\n{out}");
    }
    drop(front.mta.take());
}
