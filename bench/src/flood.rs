//! Benchmark 2, drop under flood: hping3 floods SYNs to port 25 from an attacker namespace over veth at a
//! gateway namespace where the source is banned three ways in turn: helo-filter's XDP program
//! (native mode on the veth), an nftables set with element timeouts in the netdev ingress hook,
//! and iptables (raw PREROUTING) with an ipset. Compared: the CPU the machine spends per dropped
//! packet, not counting hping3's own CPU time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::netns::{Netns, veth};
use tests::{AgentProcess, PinDir, agent_cli};

use crate::procfs::{cpu_ticks, process_ticks};
use crate::report::{Report, f};
use crate::{median, progress};

const GW: &str = "10.99.0.1";
const ATTACKER: &str = "10.99.0.2";
const FLOOD: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;

struct Flooded {
    dropped: u64,
    gateway_ns_per_packet: f64,
    packets_per_second: f64,
}

/// Floods for [`FLOOD`]; `dropped` reads the filter's drop counter.
fn flood(attacker: &Netns, dropped: &dyn Fn() -> u64) -> anyhow::Result<Flooded> {
    let before = dropped();
    let (busy0, _) = cpu_ticks();
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &attacker.name, "hping3", "-S", "-p", "25", "--flood", "-q", GW])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(FLOOD);
    let hping = process_ticks(child.id());
    let (busy1, _) = cpu_ticks();
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    let dropped = dropped() - before;
    anyhow::ensure!(dropped > 1000, "only {dropped} packets dropped: is the filter in place?");
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let gateway_secs = (busy1 - busy0).saturating_sub(hping) as f64 / hz;
    Ok(Flooded {
        dropped,
        gateway_ns_per_packet: gateway_secs * 1e9 / dropped as f64,
        packets_per_second: dropped as f64 / elapsed.as_secs_f64(),
    })
}

fn in_ns(ns: &Netns, args: &[&str]) -> String {
    tests::run(Command::new("ip").args(["netns", "exec", &ns.name]).args(args))
}

/// helo-filter's XDP drop: the agent attached natively to `gw_if` (its proxy out of the way),
/// the attacker banned.
fn xdp_peer(gateway: &Netns, gw_if: &str) -> (PinDir, AgentProcess) {
    let pins = PinDir::new();
    let config = pins.config("[allowlist]\nnetworks = []\n[identity]\ndetect = false\n");
    let control = pins.control_socket();
    let agent = AgentProcess::run_in(
        gateway,
        &config,
        gw_if,
        "native",
        &["--listen", "127.0.0.1:10026"],
        move || tests::control_answers(&control),
    );
    agent_cli(pins.path(), &["ban", ATTACKER, "--ttl", "1h"]);
    (pins, agent)
}

/// Packets helo-filter's XDP program dropped.
fn xdp_dropped(pins: &PinDir) -> u64 {
    let json = agent_cli(pins.path(), &["stats", "--json"]);
    serde_json::from_str::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v["dropped"].as_u64())
        .unwrap_or(0)
}

/// The nftables peer: a netdev ingress chain on `gw_if` dropping the guarded ports from a set
/// holding the attacker (with a timeout, as bans have).
fn nft_set_drop(gateway: &Netns, gw_if: &str) -> anyhow::Result<()> {
    let rules = format!(
        "table netdev hfbench {{\n set banned {{ type ipv4_addr; flags timeout; elements = {{ {ATTACKER} timeout 1h }} }}\n \
         chain ingress {{ type filter hook ingress device \"{gw_if}\" priority -500; policy accept;\n  \
         ip saddr @banned tcp dport {{ 25, 465, 587 }} counter drop\n }}\n}}\n"
    );
    let file = std::env::temp_dir().join(tests::unique("hfbench-nft-"));
    std::fs::write(&file, rules)?;
    in_ns(gateway, &["nft", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Packets the nftables peer dropped.
fn nft_dropped(gateway: &Netns) -> u64 {
    number_after(
        &in_ns(gateway, &["nft", "list", "chain", "netdev", "hfbench", "ingress"]),
        "packets",
    )
}

const NFT_REMOVE: &[&str] = &["nft", "delete", "table", "netdev", "hfbench"];

/// The iptables peer: raw PREROUTING dropping the guarded ports from an ipset holding the
/// attacker.
fn ipset_drop(gateway: &Netns) {
    in_ns(gateway, &["ipset", "create", "hfban", "hash:ip", "timeout", "3600"]);
    in_ns(gateway, &["ipset", "add", "hfban", ATTACKER]);
    let rule = "-t raw -A PREROUTING -p tcp -m multiport --dports 25,465,587 -m set --match-set hfban src -j DROP";
    let mut args = vec!["iptables"];
    args.extend(rule.split(' '));
    in_ns(gateway, &args);
}

/// Packets the iptables peer dropped.
fn ipset_dropped(gateway: &Netns) -> u64 {
    let text = in_ns(gateway, &["iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"]);
    text.lines()
        .find(|l| l.contains("match-set hfban"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn remove_ipset_drop(gateway: &Netns) {
    in_ns(gateway, &["iptables", "-t", "raw", "-F", "PREROUTING"]);
    in_ns(gateway, &["ipset", "destroy", "hfban"]);
}

/// The first number after `word` in `text`.
fn number_after(text: &str, word: &str) -> u64 {
    text.split(word)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn run(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    let gateway = Netns::new("hfbg");
    let attacker = Netns::new("hfba");
    let (gw_if, at_if) = veth(&gateway, &attacker);
    gateway.ip(&["addr", "add", &format!("{GW}/24"), "dev", &gw_if]);
    attacker.ip(&["addr", "add", &format!("{ATTACKER}/24"), "dev", &at_if]);
    let mut results: Vec<(&str, Vec<Flooded>)> = Vec::new();

    // helo-filter: the agent attaches XDP in native mode; the ban is made with the CLI.
    if std::env::var_os("HF_LIVE_ONLY").is_some() {
        return live_frames(report, out, &gateway, &attacker, &gw_if, &at_if);
    }
    {
        let (pins, _agent) = xdp_peer(&gateway, &gw_if);
        let counter = || xdp_dropped(&pins);
        let mut runs = Vec::new();
        for round in 0..ROUNDS {
            progress(&format!("flood: helo-filter XDP, round {}", round + 1));
            runs.push(flood(&attacker, &counter)?);
        }
        results.push(("helo-filter XDP (native)", runs));
        agent_cli(pins.path(), &["detach", "--maps"]);
    }

    // nftables: a set with timeouts, netdev ingress on the same veth.
    {
        nft_set_drop(&gateway, &gw_if)?;
        let counter = || nft_dropped(&gateway);
        let mut runs = Vec::new();
        for round in 0..ROUNDS {
            progress(&format!("flood: nftables netdev set, round {}", round + 1));
            runs.push(flood(&attacker, &counter)?);
        }
        results.push(("nftables netdev ingress set", runs));
        in_ns(&gateway, NFT_REMOVE);
    }

    // iptables (raw PREROUTING) + ipset.
    {
        ipset_drop(&gateway);
        let counter = || ipset_dropped(&gateway);
        let mut runs = Vec::new();
        for round in 0..ROUNDS {
            progress(&format!("flood: iptables + ipset, round {}", round + 1));
            runs.push(flood(&attacker, &counter)?);
        }
        results.push(("iptables raw + ipset", runs));
        remove_ipset_drop(&gateway);
    }

    let summary: Vec<(&str, f64, f64)> = results
        .iter()
        .map(|(name, runs)| {
            let mut cost: Vec<f64> = runs.iter().map(|r| r.gateway_ns_per_packet).collect();
            let mut rate: Vec<f64> = runs.iter().map(|r| r.packets_per_second).collect();
            (*name, median(&mut cost), median(&mut rate))
        })
        .collect();
    let xdp = summary[0].1;
    let nft = summary[1].1;
    report.target(
        "flood (hping3 over veth, skbs): XDP CPU per dropped packet at most 1/3 of nftables",
        xdp * 3.0 <= nft,
        format!("{:.0} ns vs {:.0} ns ({:.2}x)", xdp, nft, xdp / nft),
    );
    let rows: Vec<Vec<String>> = summary
        .iter()
        .zip(&results)
        .map(|((name, cost, rate), (_, runs))| {
            vec![
                (*name).to_owned(),
                f(*cost, 0),
                f(cost / xdp, 2),
                f(*rate / 1e3, 0),
                runs.iter().map(|r| r.dropped.to_string()).collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    report.section(
        "2. Drop under a SYN flood",
        &format!(
            "hping3 `-S -p 25 --flood` from an attacker namespace over a veth pair for {} s, {ROUNDS} \
             rounds per filter, medians. The gateway side's cost: the whole machine's busy CPU time \
             (/proc/stat, idle and iowait excluded) minus hping3's own user and system time, divided \
             by the packets the filter counted as dropped. All three drop before the TCP stack. \
             Plot: `flood_cpu.png`.",
            FLOOD.as_secs()
        ),
        &["filter", "ns CPU per dropped packet", "vs XDP", "k packets/s dropped", "dropped per round"],
        &rows,
        &[
            "On a veth pair the sender's transmit and the receiver's work share the machine's two \
             cores; what a NIC would take off the CPU (DMA, the driver's own ring work) is not \
             modelled. iptables here is Debian 12's iptables-nft with the xt_set match."
                .into(),
            "**Why XDP does not win here** (perf record -a during the XDP rounds, 2026-11-22): on \
             veth, the packets arrive as socket buffers the sender already built, and native XDP \
             must turn each into an XDP buffer first: `veth_xdp_rcv_skb` → `skb_pp_cow_data` \
             copies it into a page-pool page, then the veth NAPI poll runs the program. That copy \
             and the extra NAPI hop cost more than the netdev ingress hook's set lookup on the \
             skb that exists anyway. XDP's advantage — dropping before any skb is allocated, in \
             the driver's receive loop — needs a NIC driver with native XDP, which this VM does not \
             have (eth0 refuses native mode). The target cannot be shown on this machine; on \
             hardware, run `cargo xtask bench flood` with the attacker on another host (the code \
             takes the interface from the namespace pair today)."
                .into(),
        ],
    );
    let groups: Vec<String> = summary.iter().map(|(n, _, _)| (*n).to_owned()).collect();
    crate::plot::bars(
        &out.join("flood_cpu.png"),
        "CPU per dropped SYN (lower is better)",
        "ns / packet",
        &groups,
        &[("CPU per dropped packet".into(), summary.iter().map(|s| s.1).collect())],
    )?;
    live_frames(report, out, &gateway, &attacker, &gw_if, &at_if)
}

/// Issue 29's investigation: why XDP lost legitimate connections here, and frames before the
/// program, where nftables lost none (kept as the section's note: the evidence for the method).
const LOST_BEFORE_THE_PROGRAM: &str = "**Why XDP lost legitimate connections here, and the program counted fewer frames than were sent** (issue 29, investigated 2026-12-03 with the per-step counters of bench/src/kcounters.rs: `ethtool -S` and `ip -s link` on both veth ends, /proc/net/softnet_stat, /proc/stat's softirq ticks per CPU, `nstat` in both namespaces). Until then the legitimate client and the greeter ran on any CPU and TSO was on. The frames the program never counted were never handed to it: the attacker veth counted them as `tx_queue_0_xdp_xmit_errors` (at 500k/s 43024, at 1000k/s 71201, at full speed 197545: exactly sent minus counted), equal to the gateway veth's `rx_dropped`. veth_xdp_xmit had found the gateway veth's receive ring full: 256 slots (`VETH_RING_SIZE`, not settable), which the generator's frames and the veth's NAPI poll share. The lost legitimate connections died at the same ring: the attacker veth's `tx_dropped` exceeded those frame errors by one or two a step, the client's own handshake packets (a veth has no qdisc to hold them back), and the gateway counted `TCPSynRetrans` for SYN-ACKs whose final ACK never came; each of those connections missed its 1 s timeout. Why the ring filled with XDP and never with nftables: a veth puts a packet in its peer's ring and schedules the peer's NAPI on the CPU that sent it. The generator (CPU 1) sends 64 frames, and its `local_bh_enable` runs the NAPI poll at once on CPU 1: producer and consumer alternate, the ring cannot fill. With an XDP program on the gateway veth, the legitimate client's packets took that ring as well (the gateway veth's `rx_queue_0_xdp_packets` was the frames plus the client's packets; with nftables, the frames alone: the client's TCP packets, TSO-eligible, went to the CPU's backlog instead), so the client, and the TCP stack acknowledging the greeter's replies, scheduled the NAPI on CPU 0; the generator then ran beside it on CPU 1, faster than the program's poll, and overflowed the ring until its burst (a quarter second's worth) ended. /proc/stat showed softirq ticks on CPU 0 in exactly the steps with ring errors. With the client pinned to the generator's CPU and nothing else changed, no XDP step had a ring error or a lost connection. A NIC has neither quirk: its receive ring takes every packet, and a queue's NAPI runs on its interrupt's CPU whoever sent, so the method now models that (above). Nothing in the program or the product's defaults was at fault. What stays true on hardware: a receive ring overflows when packets arrive faster than the receiving core handles them, whatever the filter, and XDP, several times cheaper per dropped packet than nftables, keeps up to a several times higher rate; give a NIC that must take floods a large ring (`ethtool -G IFACE rx 4096`, the README says so).";

/// The legitimate client beside the attacker.
const LEGIT: &str = "10.99.0.3";
/// Offered rates per step (packets/s); `None`: as fast as one CPU generates.
const LIVE_RATES: [Option<f64>; 4] = [Some(250e3), Some(500e3), Some(1e6), None];
const LIVE_STEP: Duration = Duration::from_secs(2);
/// The CPU the generator is pinned to; the receiving veth's NAPI runs there too.
const GEN_CPU: usize = 1;

/// One step of the live-frames flood.
struct Step {
    rate: Option<f64>,
    sent: u64,
    dropped: u64,
    secs: f64,
    /// Generator thread + ksoftirqd on its CPU, seconds.
    cpu: f64,
    legit_ok: usize,
    legit_failed: usize,
    /// What the kernel counted on the way during the step (the counters that moved).
    moved: crate::kcounters::Counters,
}

/// A TCP listener on GW:25 in the gateway namespace that greets and closes, until dropped.
struct Greeter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(gateway: &Netns) -> anyhow::Result<Greeter> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = gateway.spawn(move || {
            pin_to_receive_cpu("the greeter");
            let listener = match std::net::TcpListener::bind((GW, 25)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = listener.set_nonblocking(true);
            let _ = ready_tx.send(Ok(()));
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        use std::io::Write as _;
                        let _ = stream.write_all(b"220 gw ESMTP\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready.recv()?.map_err(|e| anyhow::anyhow!("greeter on {GW}:25: {e}"))?;
        Ok(Greeter { stop, thread: Some(thread) })
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The two ends of the veth pair under the flood: (gateway namespace, its veth), (attacker
/// namespace, its veth).
struct Wire<'a> {
    gateway: (&'a str, &'a str),
    attacker: (&'a str, &'a str),
}

impl Wire<'_> {
    /// Both veth ends' counters, the softnet backlogs', and both namespaces' TCP counters.
    fn counters(&self) -> crate::kcounters::Counters {
        use crate::kcounters::{link, softnet, tcp};
        let mut all = link(self.gateway.0, self.gateway.1, "gw");
        all.extend(link(self.attacker.0, self.attacker.1, "at"));
        all.extend(softnet());
        all.extend(tcp(self.gateway.0, "gw"));
        all.extend(tcp(self.attacker.0, "at"));
        all
    }
}

/// Pins the calling thread to [`GEN_CPU`]. Whatever sends into the gateway veth (the
/// legitimate client, and the TCP stack acknowledging the greeter's replies on the greeter's
/// CPU) schedules that veth's receive NAPI on its own CPU; pinned there, the NAPI always runs
/// on the generator's CPU, as a NIC queue's runs on its interrupt's CPU. From another CPU it
/// runs beside the generator, which then overflows the veth's ring (see the notes).
fn pin_to_receive_cpu(who: &str) {
    if let Err(e) = crate::livegen::pin_to(GEN_CPU) {
        progress(&format!("flood: cannot pin {who} to CPU {GEN_CPU}: {e}"));
    }
}

/// One connection of the legitimate client: greeted with a 220 within 1 s of connecting
/// (itself within 1 s).
fn greeted() -> bool {
    let attempt = || -> std::io::Result<bool> {
        use std::io::Read as _;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let from: std::net::Ipv4Addr = LEGIT.parse().expect("an address");
        socket.bind(&std::net::SocketAddr::from((from, 0)).into())?;
        let to: std::net::SocketAddr = format!("{GW}:25").parse().expect("address");
        socket.connect_timeout(&to.into(), Duration::from_secs(1))?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting)?;
        Ok(&greeting == b"220")
    };
    matches!(attempt(), Ok(true))
}

/// Waits (at most 5 s) until the legitimate client is greeted with the filter in place and no
/// flood: the neighbour entries both ways resolved again (the floor's drop-all drops ARP too)
/// before a step counts anything.
fn until_greeted(attacker: &Netns) -> anyhow::Result<()> {
    let started = Instant::now();
    let ok = attacker.enter(|| {
        pin_to_receive_cpu("the legitimate client");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if greeted() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    anyhow::ensure!(ok, "the legitimate client is not greeted on {GW}:25 without a flood (5 s)");
    let took = started.elapsed();
    if took > Duration::from_millis(500) {
        progress(&format!("flood: the legitimate client was greeted after {took:?}"));
    }
    Ok(())
}

/// Runs the steps against whatever filter is in place; `dropped` reads its counter.
fn live_steps(
    attacker: &Netns,
    wire: &Wire,
    frame: &[u8],
    dropped: &dyn Fn() -> u64,
) -> anyhow::Result<Vec<Step>> {
    let at_if = wire.attacker.1;
    let mut steps = Vec::new();
    for rate in LIVE_RATES {
        let before = dropped();
        let counters = wire.counters();
        let (at_if, frame) = (at_if.to_owned(), frame.to_vec());
        let generator = attacker.spawn(move || -> anyhow::Result<(u64, f64, f64)> {
            crate::livegen::pin_to(GEN_CPU)?;
            let program = crate::livegen::Program::returning(crate::livegen::XDP_TX)?;
            let ifindex = crate::livegen::ifindex_of(&at_if)?;
            let soft = crate::livegen::ksoftirqd(GEN_CPU);
            let soft0 = soft.map_or(0, process_ticks);
            let own0 = crate::livegen::thread_ticks();
            let (sent, took) = crate::livegen::flood(&program, &frame, ifindex, rate, LIVE_STEP)?;
            let ticks = crate::livegen::thread_ticks() - own0
                + soft.map_or(0, process_ticks).saturating_sub(soft0);
            let hz = rustix::param::clock_ticks_per_second() as f64;
            Ok((sent, took.as_secs_f64(), ticks as f64 / hz))
        });
        let legit = attacker.spawn(|| {
            pin_to_receive_cpu("the legitimate client");
            let (mut ok, mut failed) = (0, 0);
            let until = Instant::now() + LIVE_STEP;
            while Instant::now() < until {
                if greeted() {
                    ok += 1
                } else {
                    failed += 1
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        });
        let (sent, secs, cpu) =
            generator.join().map_err(|_| anyhow::anyhow!("generator panicked"))??;
        let (legit_ok, legit_failed) =
            legit.join().map_err(|_| anyhow::anyhow!("legit client panicked"))?;
        std::thread::sleep(Duration::from_millis(200));
        let dropped = dropped().saturating_sub(before);
        let moved = crate::kcounters::moved(&counters, &wire.counters());
        progress(&format!(
            "flood: {}: sent {sent}, dropped {dropped}, legit {legit_ok}/{}; moved: {}",
            rate.map_or("max".into(), |r| format!("{:.0}k/s", r / 1e3)),
            legit_ok + legit_failed,
            crate::kcounters::show(&moved, &[])
        ));
        steps.push(Step { rate, sent, dropped, secs, cpu, legit_ok, legit_failed, moved });
    }
    Ok(steps)
}

fn live_frames(
    report: &mut Report,
    out: &Path,
    gateway: &Netns,
    attacker: &Netns,
    gw_if: &str,
    at_if: &str,
) -> anyhow::Result<()> {
    attacker.ip(&["addr", "add", &format!("{LEGIT}/24"), "dev", at_if]);
    // Every packet to the gateway through its veth's receive ring, for every filter, as every
    // packet goes through a NIC's: with TSO on the attacker's side, the legitimate client's
    // TCP packets would take that ring only while an XDP program is attached (see the notes).
    let tso = {
        let i = at_if.to_owned();
        attacker.enter(move || crate::livegen::set_tso(&i, false))
    };
    tso.map_err(|e| anyhow::anyhow!("turning TSO off on the attacker veth: {e}"))?;
    let gw_mac = crate::livegen::mac_of(&gateway.name, gw_if)?;
    let at_mac = crate::livegen::mac_of(&attacker.name, at_if)?;
    let frame = crate::livegen::syn_frame(
        ATTACKER.parse::<std::net::Ipv4Addr>()?.octets(),
        GW.parse::<std::net::Ipv4Addr>()?.octets(),
        at_mac,
        gw_mac,
    );
    // What xdp-trafficgen (xdp-tools) says here: the same kernel path, UDP only.
    let trafficgen = Command::new("timeout")
        .args([
            "20",
            "ip",
            "netns",
            "exec",
            &attacker.name,
            "xdp-trafficgen",
            "udp",
            "-n",
            "200000",
        ])
        .args(["-a", GW, "-A", ATTACKER, "-p", "9", "-m"])
        .arg(gw_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
        .arg(at_if)
        .output();
    let trafficgen = match trafficgen {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let last: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            format!(
                "exit {}: {}",
                o.status.code().unwrap_or(-1),
                last.iter().rev().take(2).rev().copied().collect::<Vec<_>>().join(" / ")
            )
        }
        Err(e) => format!("could not run: {e}"),
    };
    // Does the kernel take live frames at all?
    let probe = {
        let (at_if, frame) = (at_if.to_owned(), frame.clone());
        attacker.enter(move || -> std::io::Result<()> {
            let program = crate::livegen::Program::returning(crate::livegen::XDP_TX)?;
            program.send_live(&frame, crate::livegen::ifindex_of(&at_if)?, 64)
        })
    };
    if let Err(error) = probe {
        report.section(
            "2b. Drop under a SYN flood, frames as from a NIC",
            "BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on the attacker's veth (XDP_TX).",
            &["what", "answer"],
            &[
                vec!["BPF_PROG_RUN live frames".into(), format!("refused: {error}")],
                vec!["xdp-trafficgen udp".into(), trafficgen],
            ],
            &["The kernel refused live frames: the veth figure above stands, with its explanation.".into()],
        );
        return Ok(());
    }
    let _greeter = Greeter::start(gateway)?;
    let wire = Wire { gateway: (&gateway.name, gw_if), attacker: (&attacker.name, at_if) };
    let mut results: Vec<(&str, Vec<Step>)> = Vec::new();

    // The floor: every frame dropped by a two-instruction XDP program. What is left above it
    // is each filter's own cost.
    {
        progress("flood: live frames, XDP drop-all floor");
        let i = gw_if.to_owned();
        let link = gateway.enter(move || -> std::io::Result<_> {
            let program = crate::livegen::Program::returning(crate::livegen::XDP_DROP)?;
            let link = program.attach(crate::livegen::ifindex_of(&i)?)?;
            Ok((program, link))
        })?;
        // The floor has no counter: every frame that reaches the program is dropped.
        let mut steps = live_steps(attacker, &wire, &frame, &|| 0)?;
        for step in &mut steps {
            step.dropped = step.sent;
        }
        results.push(("floor: XDP drop-all (2 instructions)", steps));
        drop(link);
    }
    {
        progress("flood: live frames, helo-filter XDP");
        let (pins, _agent) = xdp_peer(gateway, gw_if);
        let counter = || xdp_dropped(&pins);
        until_greeted(attacker)?;
        results.push(("helo-filter XDP (native)", live_steps(attacker, &wire, &frame, &counter)?));
        agent_cli(pins.path(), &["detach", "--maps"]);
    }
    // Without an XDP program the veth takes redirected frames only with its NAPI on (GRO).
    let gro = {
        let i = gw_if.to_owned();
        gateway.enter(move || crate::livegen::set_gro(&i, true))
    };
    gro.map_err(|e| {
        anyhow::anyhow!("turning GRO on for the gateway veth (needed for frames without XDP): {e}")
    })?;
    {
        progress("flood: live frames, nftables netdev set");
        nft_set_drop(gateway, gw_if)?;
        let counter = || nft_dropped(gateway);
        let steps =
            until_greeted(attacker).and_then(|()| live_steps(attacker, &wire, &frame, &counter));
        in_ns(gateway, NFT_REMOVE);
        results.push(("nftables netdev ingress set", steps?));
    }
    {
        progress("flood: live frames, iptables + ipset");
        ipset_drop(gateway);
        let counter = || ipset_dropped(gateway);
        let steps =
            until_greeted(attacker).and_then(|()| live_steps(attacker, &wire, &frame, &counter));
        remove_ipset_drop(gateway);
        results.push(("iptables raw + ipset", steps?));
    }

    // Per filter: the full-speed step's cost, and the best rate with no legitimate loss.
    let max_step = |steps: &[Step]| {
        steps
            .iter()
            .find(|s| s.rate.is_none())
            .map(|s| (s.cpu * 1e9 / s.dropped.max(1) as f64, s.dropped as f64 / s.secs))
    };
    let floor = max_step(&results[0].1).map_or(0.0, |(c, _)| c);
    let mut rows = Vec::new();
    let mut above: Vec<f64> = Vec::new();
    let mut clean_rates: Vec<f64> = Vec::new();
    for (name, steps) in &results {
        let (cost, rate) = max_step(steps).unwrap_or((0.0, 0.0));
        let clean = steps
            .iter()
            .filter(|s| s.legit_failed == 0)
            .map(|s| s.dropped as f64 / s.secs)
            .fold(0.0, f64::max);
        above.push((cost - floor).max(0.0));
        clean_rates.push(clean);
        rows.push(vec![
            (*name).to_owned(),
            f(cost, 0),
            f((cost - floor).max(0.0), 0),
            f(rate / 1e3, 0),
            // The floor drops the legitimate client's packets too.
            if name.starts_with("floor") { "-".into() } else { f(clean / 1e3, 0) },
            steps
                .iter()
                .map(|s| {
                    // Frames the gateway veth's ring had no room for (never seen by a filter),
                    // and the other packets the attacker's side could not hand over.
                    let ring = s.moved.get("at:tx_queue_0_xdp_xmit_errors").copied().unwrap_or(0);
                    let other = s
                        .moved
                        .get("at:link_tx_dropped")
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(ring);
                    format!(
                        "{}: {} of {} dropped, legit {}/{}{}",
                        s.rate.map_or("max".into(), |r| format!("{:.0}k/s", r / 1e3)),
                        s.dropped,
                        s.sent,
                        s.legit_ok,
                        s.legit_ok + s.legit_failed,
                        if ring + other > 0 {
                            format!(" (ring full: {ring} frames, {other} other packets)")
                        } else {
                            String::new()
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ]);
    }
    let (xdp, nft) = (above[1], above[2]);
    report.target(
        "flood (XDP live frames, as from a NIC): XDP CPU per dropped packet above the floor at most 1/3 of nftables",
        xdp * 3.0 <= nft,
        format!("{xdp:.0} ns vs {nft:.0} ns ({:.2}x); with the generator: {} vs {} ns", xdp / nft.max(1e-9), rows[1][1], rows[2][1]),
    );
    // Issue 29: legitimate connections survive the flood at least as well with XDP.
    let success = |steps: &[Step]| -> Vec<f64> {
        steps
            .iter()
            .map(|s| s.legit_ok as f64 / (s.legit_ok + s.legit_failed).max(1) as f64)
            .collect()
    };
    let (xdp_ok, nft_ok) = (success(&results[1].1), success(&results[2].1));
    report.target(
        "flood (live frames): at every offered rate, the legitimate success rate with XDP at least nftables'",
        xdp_ok.iter().zip(&nft_ok).all(|(x, n)| x >= n),
        xdp_ok
            .iter()
            .zip(&nft_ok)
            .zip(&results[1].1)
            .map(|((x, n), s)| {
                let rate = s.rate.map_or("max".into(), |r| format!("{:.0}k/s", r / 1e3));
                format!("{rate}: {:.0}% vs {:.0}%", x * 100.0, n * 100.0)
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let (xdp_clean, nft_clean) = (clean_rates[1], clean_rates[2]);
    report.target(
        "flood (live frames): the highest rate with no legitimate loss with XDP at least twice nftables'",
        xdp_clean >= 2.0 * nft_clean,
        format!(
            "{:.0}k/s vs {:.0}k/s ({:.1}x)",
            xdp_clean / 1e3,
            nft_clean / 1e3,
            xdp_clean / nft_clean.max(1.0)
        ),
    );
    report.section(
        "2b. Drop under a SYN flood, frames as from a NIC (XDP live frames)",
        &format!(
            "The same SYN (valid checksums) from the banned attacker, generated by BPF_PROG_RUN with \
             BPF_F_TEST_XDP_LIVE_FRAMES on the attacker's veth (a two-instruction program returning \
             XDP_TX, pinned to CPU {GEN_CPU}; bench/src/livegen.rs), so each frame reaches the gateway's \
             veth as an xdp_frame, as from a NIC's driver: native XDP runs on it before any skb exists \
             (no `skb_pp_cow_data` copy), and a frame XDP passes is built into an skb in the veth's \
             NAPI poll. For nftables and iptables the gateway veth has GRO on (without an XDP program a \
             veth takes redirected frames only with its NAPI on). Steps of {} s at {} (average; sent in bursts of a quarter second's worth) and full speed, \
             with a legitimate client (its own address) connecting to a listener on port 25 every \
             50 ms (1 s timeout) throughout, once it has been greeted with the filter in place and no \
             flood. As on a NIC, every packet to the gateway takes its veth's receive ring (TSO off \
             on the attacker's veth) and the ring's NAPI runs on one CPU, the generator's: the \
             legitimate client and the greeter run there too (a veth schedules its peer's NAPI on \
             the CPU that sent; see the notes). Ring full: frames and packets the gateway veth's \
             ring had no room for (`ethtool -S`: the attacker veth's `xdp_xmit_errors` and \
             `tx_dropped`), counted per step. CPU: the generator thread's time plus ksoftirqd/{GEN_CPU}'s \
             (the receiving NAPI poll runs on the generator's CPU, and with tick accounting its \
             softirq time is charged to the thread it interrupts), over the packets the filter \
             counted as dropped, at full speed. The floor is the same flood into a two-instruction \
             XDP drop-all program: generating, sending and receiving a frame; `above the floor` is \
             each filter's own cost. xdp-trafficgen (xdp-tools 1.3.1) on the same veth: {trafficgen}. \
             It sends only UDP or a real TCP stream, so the SYN frames are generated by the same \
             kernel mechanism from bench/src/livegen.rs. Plot: `flood_live_cpu.png`.",
            LIVE_STEP.as_secs(),
            LIVE_RATES.iter().flatten().map(|r| format!("{:.0}k", r / 1e3)).collect::<Vec<_>>().join(", ")
        ),
        &["filter", "ns CPU per dropped packet (generator included)", "above the floor", "k packets/s dropped at full speed", "highest k/s with no legitimate loss", "steps"],
        &rows,
        &[
            "One CPU generates and receives, so the full-speed rate is what one core does end to end; on hardware the sender is another host and the receiving core does only the receive side.".into(),
            LOST_BEFORE_THE_PROGRAM.into(),
        ],
    );
    let groups: Vec<String> = results.iter().skip(1).map(|(n, _)| (*n).to_owned()).collect();
    crate::plot::bars(
        &out.join("flood_live_cpu.png"),
        "CPU per dropped SYN above the floor, live XDP frames (lower is better)",
        "ns / packet",
        &groups,
        &[("above the drop-all floor".into(), above[1..].to_vec())],
    )?;
    Ok(())
}
