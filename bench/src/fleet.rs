//! Issue 14's figures: bans shared through Redis. Gateways are agents (release build) in one
//! namespace, each with XDP in native mode on its own veth end, and a real `redis-server` on
//! that namespace's loopback.
//!
//! (a) Propagation: 1000 bans, one at a time, each sent to gateway 1's control socket; the
//! time until it is in gateway 2's kernel ban map (polled every 50 µs through the pinned map),
//! which is when gateway 2's XDP drops the address. (b) Catch-up: 100k ban records of another
//! gateway put into Redis, then a new gateway started: from its control socket answering (the
//! fleet task starts with it) to all 100k in its kernel map. (c) Ban throughput with the fleet
//! on against an agent with it off, same run, alternating rounds: admin bans through the
//! control socket from 4 threads as fast as the worker takes them.

use std::path::Path;
use std::time::{Duration, Instant};

use helo_agent::addr::BanTarget;
use helo_agent::blocklist::BanStore as _;
use helo_agent::control::{Envelope, Request};
use helo_agent::ebpf::PinnedMaps;
use tests::netns::Netns;
use tests::redis::Redis;
use tests::{AgentProcess, PinDir};

use crate::report::{Report, f};
use crate::{median, progress};

const REDIS_PORT: u16 = 6391;
const PASSWORD: &str = "bench";
const PROPAGATED: usize = 1000;
const CATCH_UP: usize = 100_000;
const THROUGHPUT_BANS: usize = 10_000;
const THREADS: usize = 4;
const ROUNDS: usize = 5;
/// The Sentinel service's nodes (on the bench namespace's loopback).
const MASTER_PORT: u16 = 6392;
const REPLICA_PORT: u16 = 6393;
const SENTINEL_PORTS: [u16; 3] = [26393, 26394, 26395];
const SERVICE: &str = "bench";
/// Sentinel's `down-after-milliseconds` (the default is 30 s).
const DOWN_AFTER_MS: u64 = 1000;
/// Bans timed one at a time before and after the failover.
const PROPAGATED_FAILOVER: usize = 300;
/// Each gateway bans one address this often during the failover.
const STREAM_EVERY: Duration = Duration::from_millis(10);
/// Gateways on one Redis in the fan-out measure.
const SCALE: [usize; 3] = [2, 4, 8];

/// One agent in the bench namespace, on its own veth end, with or without the fleet.
struct Gateway {
    pins: PinDir,
    agent: AgentProcess,
}

impl Gateway {
    fn start(
        ns: &Netns,
        iface: &str,
        node: &str,
        fleet: Option<(&Redis, &str)>,
        port: u16,
    ) -> Self {
        let pins = PinDir::new();
        let fleet = match fleet {
            Some((redis, prefix)) => format!(
                "[fleet]\nredis = \"{}\"\nnode = \"{node}\"\nprefix = \"{prefix}\"\n",
                redis.url()
            ),
            None => String::new(),
        };
        let config =
            pins.config(&format!("{fleet}[bans]\nsnapshot = \"\"\n[identity]\ndetect = false\n"));
        let control = pins.control_socket();
        let listen = format!("127.0.0.1:{port}");
        let agent =
            AgentProcess::run_in(ns, &config, iface, "native", &["--listen", &listen], move || {
                tests::control_answers(&control)
            });
        Gateway { pins, agent }
    }

    /// A gateway whose `fleet.redis` is `url` (a Sentinel service, say).
    fn start_url(ns: &Netns, iface: &str, node: &str, url: &str, prefix: &str, port: u16) -> Self {
        let pins = PinDir::new();
        let config = pins.config(&format!(
            "[fleet]\nredis = \"{url}\"\nnode = \"{node}\"\nprefix = \"{prefix}\"\n\
             [bans]\nsnapshot = \"\"\n[identity]\ndetect = false\n"
        ));
        let control = pins.control_socket();
        let listen = format!("127.0.0.1:{port}");
        let agent =
            AgentProcess::run_in(ns, &config, iface, "native", &["--listen", &listen], move || {
                tests::control_answers(&control)
            });
        Gateway { pins, agent }
    }

    fn ban(&self, target: &str) -> anyhow::Result<()> {
        let envelope = Envelope {
            pin_dir: self.pins.path().to_owned(),
            request: Request::Ban {
                target: target.into(),
                ttl_secs: Some(3600),
                reason: "bench".into(),
            },
        };
        helo_agent::control::request(&self.pins.control_socket(), &envelope)?;
        Ok(())
    }

    fn maps(&self) -> anyhow::Result<PinnedMaps> {
        Ok(PinnedMaps::open(self.pins.path())?)
    }
}

/// The `i`-th address from `10.<block>.0.0` on (past 65535 into the next block).
fn address(block: u8, i: usize) -> String {
    let high = usize::from(block) + (i >> 16);
    format!("10.{high}.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

pub fn run(report: &mut Report, _out: &Path) -> anyhow::Result<()> {
    let ns = Netns::new("hfbf");
    // Four for the single Redis, three for the Sentinel service, up to SCALE.last() for the
    // fan-out.
    let ifaces = veth_ends(&ns, 4 + 3 + SCALE[SCALE.len() - 1]);
    let redis = Redis::start(&ns, "127.0.0.1", REDIS_PORT, PASSWORD);
    let prefix = format!("{}:", tests::unique("bench-fleet-"));

    progress("fleet: two gateways");
    let gw1 = Gateway::start(&ns, &ifaces[0], "gw1", Some((&redis, &prefix)), 2601);
    let gw2 = Gateway::start(&ns, &ifaces[1], "gw2", Some((&redis, &prefix)), 2602);
    let gw2_maps = gw2.maps()?;

    progress(&format!("fleet: propagation of {PROPAGATED} bans, one at a time"));
    let mut delays = Vec::with_capacity(PROPAGATED);
    for i in 0..PROPAGATED {
        let target = address(100, i);
        let key: BanTarget = target.parse()?;
        let started = Instant::now();
        gw1.ban(&target)?;
        loop {
            if gw2_maps.get(&key)?.is_some() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(5),
                "ban {i} ({target}) did not reach gateway 2 in 5 s"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        delays.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() as f64 * p) as usize).min(delays.len() - 1)];
    let (p50, p99, max) = (pct(0.50), pct(0.99), delays[delays.len() - 1]);

    progress(&format!("fleet: {CATCH_UP} ban records into Redis"));
    let mut load = Vec::new();
    let now_ms = helo_agent::clock::unix_ns() / 1_000_000;
    for i in 0..CATCH_UP {
        let target: BanTarget = address(120, i).parse()?;
        let record = helo_agent::fleet::message::BanRecord {
            target,
            expires_ms: Some(now_ms + 3_600_000),
            reason: "bench".into(),
            node: "elsewhere".into(),
            offences: 1,
            at_ms: now_ms,
            keep_until_ms: Some(now_ms + 3_600_000),
        };
        let value = helo_agent::fleet::message::Event::Ban(record).encode();
        let key = format!("{prefix}ban:{target}");
        resp(&mut load, &["SET", &key, &value, "PXAT", &(now_ms + 3_600_000).to_string()]);
    }
    let memory_before = used_memory(&redis)?;
    let loaded = redis.cli_with_input(&["--pipe"], Some(&load));
    anyhow::ensure!(loaded.contains("errors: 0"), "redis-cli --pipe: {loaded}");
    let per_ban = (used_memory(&redis)? - memory_before) as f64 / CATCH_UP as f64;
    let record_bytes = load.len() as f64 / CATCH_UP as f64;

    progress("fleet: a new gateway catches up");
    let gw3 = Gateway::start(&ns, &ifaces[2], "gw3", Some((&redis, &prefix)), 2603);
    let ready = Instant::now();
    let gw3_maps = gw3.maps()?;
    let wanted = CATCH_UP + PROPAGATED;
    loop {
        let held = gw3_maps.entries()?.len();
        if held >= wanted {
            break;
        }
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "gateway 3 held {held} of {wanted} bans after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let catch_up = ready.elapsed().as_secs_f64();
    let logged = gw3.agent.log();
    let logged_ms = logged
        .lines()
        .find(|l| l.contains("connected to Redis, caught up"))
        .and_then(|l| l.split(" ms=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    drop(gw3);

    progress("fleet: ban throughput, fleet on and off, alternating rounds");
    let off = Gateway::start(&ns, &ifaces[3], "off", None, 2604);
    let (mut on_rates, mut off_rates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (gateway, rates, block) in
            [(&gw1, &mut on_rates, 130 + round as u8), (&off, &mut off_rates, 140 + round as u8)]
        {
            rates.push(throughput(gateway, block)?);
        }
        progress(&format!(
            "fleet: round {}: on {:.0}/s, off {:.0}/s",
            round + 1,
            on_rates[round],
            off_rates[round]
        ));
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        format!("{lo:.0}–{hi:.0}")
    };
    let (on_range, off_range) = (range(&on_rates), range(&off_rates));
    let (on, offm) = (median(&mut on_rates), median(&mut off_rates));
    let ratio = on / offm;
    let losses = gw1.agent.log().matches("lost Redis").count();

    report.section(
        "Fleet: bans shared through Redis (issue 14)",
        "Agents (release build) in one namespace, each with XDP in native mode on its own veth \
         end; a real redis-server 7 on the namespace's loopback, with a password. Propagation: \
         1000 bans sent one at a time to gateway 1's control socket, each timed until it is in \
         gateway 2's kernel ban map (polled every 50 µs through the pinned map): from then \
         gateway 2's XDP drops the address. Catch-up: 100k ban records of another gateway put \
         into Redis (plus the 1000 above), then a third gateway started: from its control \
         socket answering (its fleet task starts then) to all of them in its kernel map. \
         Throughput: admin bans through the control socket from 4 threads, 10000 a round, to an \
         agent with the fleet on and one with it off, 5 rounds alternating, medians (min–max).",
        &["measure", "helo-filter fleet", "peer / goal"],
        &[
            vec![
                "propagation, ban on gw1 → in gw2's kernel map".into(),
                format!("p50 {} ms, p99 {} ms, max {} ms", f(p50, 1), f(p99, 1), f(max, 1)),
                "goal p99 < 1 s; CrowdSec's bouncer polls every 10 s by default".into(),
            ],
            vec![
                format!("catch-up of {} bans by a new gateway", CATCH_UP + PROPAGATED),
                format!(
                    "{catch_up:.2} s (the agent's own log: connected and read in {logged_ms} ms)"
                ),
                "goal < 2 s".into(),
            ],
            vec![
                "Redis memory per ban record".into(),
                format!(
                    "{per_ban:.0} bytes (100k bans: {:.1} MB; the SET command with key and JSON \
                     record: {record_bytes:.0} bytes)",
                    per_ban * 100_000.0 / 1e6
                ),
                "".into(),
            ],
            vec![
                "ban throughput, fleet on / off".into(),
                format!("{on:.0} / {offm:.0} bans/s ({on_range} / {off_range}): {:.2}x", ratio),
                "goal ≥ 0.9x".into(),
            ],
        ],
        &[format!(
            "Redis connection losses logged by gateway 1 during the run: {losses}. The \
             2 cores are shared by the agents, Redis and the load; the fleet's own work \
             (publishing, gateway 2 applying every ban) is inside the \"on\" figure."
        )],
    );
    report.target("fleet propagation p99 < 1 s", p99 < 1000.0, format!("p99 {} ms", f(p99, 1)));
    report.target(
        "a new gateway catches up on 100k bans in < 2 s",
        catch_up < 2.0,
        format!("{catch_up:.2} s"),
    );
    report.target(
        "ban throughput with the fleet ≥ 0.9x without",
        ratio >= 0.9,
        format!("{ratio:.2}x"),
    );
    drop((gw1, gw2, off));

    fan_out(report, &ns, &ifaces[7..], &redis)?;
    drop(redis);
    failover(report, &ns, &ifaces[4..7], (p50, p99))?;
    Ok(())
}

/// `count` veth ends in `ns` (pairs, both ends up).
fn veth_ends(ns: &Netns, count: usize) -> Vec<String> {
    let mut ends = Vec::new();
    while ends.len() < count {
        let (a, b) = (tests::unique("hfv"), tests::unique("hfv"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ns.ip(&["link", "set", &a, "up"]);
        ns.ip(&["link", "set", &b, "up"]);
        ends.push(a);
        ends.push(b);
    }
    ends
}

/// Waits until every address of `targets` is in every map of `maps`; how long it took, or
/// `None` past `limit`, with the number still missing.
fn all_everywhere(
    maps: &[&PinnedMaps],
    targets: &[BanTarget],
    limit: Duration,
) -> anyhow::Result<Result<Duration, usize>> {
    let started = Instant::now();
    let mut pending: Vec<(usize, BanTarget)> =
        (0..maps.len()).flat_map(|m| targets.iter().map(move |t| (m, *t))).collect();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        for (m, target) in pending {
            if maps[m].get(&target)?.is_none() {
                still.push((m, target));
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(Ok(started.elapsed()));
        }
        if started.elapsed() > limit {
            return Ok(Err(pending.len()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many gateways one Redis master serves: the throughput measure above with 2, 4 and 8
/// gateways on one Redis (one banning, the others applying), and Redis's CPU per ban.
fn fan_out(
    report: &mut Report,
    ns: &Netns,
    ifaces: &[String],
    redis: &Redis,
) -> anyhow::Result<()> {
    let prefix = format!("{}:", tests::unique("bench-fanout-"));
    let mut gateways: Vec<Gateway> = Vec::new();
    let mut rows = Vec::new();
    let mut per_ban = Vec::new();
    let ticks_per_sec = 100.0; // USER_HZ
    for (step, &n) in SCALE.iter().enumerate() {
        while gateways.len() < n {
            let i = gateways.len();
            let node = format!("fan{}", i + 1);
            gateways.push(Gateway::start(
                ns,
                &ifaces[i],
                &node,
                Some((redis, &prefix)),
                2620 + i as u16,
            ));
        }
        progress(&format!("fleet: fan-out, {n} gateways on one Redis"));
        let maps: Vec<PinnedMaps> =
            gateways[1..].iter().map(Gateway::maps).collect::<anyhow::Result<_>>()?;
        let block = 150 + step as u8;
        let redis_before = crate::procfs::process_ticks(redis.pid());
        let started = Instant::now();
        let rate = throughput(&gateways[0], block)?;
        let targets: Vec<BanTarget> =
            (0..THROUGHPUT_BANS).map(|i| address(block, i).parse()).collect::<Result<_, _>>()?;
        let map_refs: Vec<&PinnedMaps> = maps.iter().collect();
        let everywhere = all_everywhere(&map_refs, &targets, Duration::from_secs(60))?;
        let delivered = started.elapsed();
        let redis_cpu =
            (crate::procfs::process_ticks(redis.pid()) - redis_before) as f64 / ticks_per_sec;
        let us_per_ban = redis_cpu * 1e6 / THROUGHPUT_BANS as f64;
        per_ban.push((n as f64, us_per_ban));
        rows.push(vec![
            format!("{n}"),
            format!("{rate:.0}/s"),
            match everywhere {
                Ok(_) => format!("{:.2} s", delivered.as_secs_f64()),
                Err(missing) => format!("{missing} missing after 60 s"),
            },
            format!("{us_per_ban:.1} µs"),
        ]);
    }
    // Redis's CPU per ban grows with the subscribers: a + b·n, from the first and last point.
    let ((n0, c0), (n1, c1)) = (per_ban[0], per_ban[per_ban.len() - 1]);
    let b = ((c1 - c0) / (n1 - n0)).max(0.01);
    let a = (c0 - b * n0).max(0.0);
    let serves = |rate: f64| ((1e6 / rate - a) / b).max(0.0);
    report.table(
        &[
            "gateways on one Redis",
            "bans/s into gateway 1",
            "all applied everywhere",
            "Redis CPU per ban",
        ],
        &rows,
        &[format!(
            "Fan-out: the throughput measure above (10000 admin bans into gateway 1 from 4 \
             threads) with 2, 4 and 8 gateways on one Redis, each applying every ban to its \
             kernel map; \"all applied everywhere\": from the first ban to the last in the last \
             gateway's map; Redis's CPU (utime+stime of redis-server, 10 ms ticks) over the same \
             time, per ban. Fit: {a:.1} µs + {b:.2} µs per subscribed gateway per ban, so one \
             Redis core is saturated by about {:.0} gateways at 1000 bans/s fleet-wide, \
             {:.0} at 100/s (a storm that bans 100 bots a second, every second). All agents, \
             Redis and the load share the 2 cores here; Redis's own per-ban cost is the figure \
             that carries to other machines.",
            serves(1000.0),
            serves(100.0),
        )],
    );
    drop(gateways);
    Ok(())
}

/// Issue 28's figures: a Sentinel service (a master, a replica, three sentinels, quorum 2,
/// `down-after-milliseconds` [`DOWN_AFTER_MS`]) and three gateways on it; the master killed
/// under a stream of bans on all three.
fn failover(
    report: &mut Report,
    ns: &Netns,
    ifaces: &[String],
    single: (f64, f64),
) -> anyhow::Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tests::redis::Sentinel;

    progress("fleet: a Sentinel service, three gateways on it");
    let mut master = Redis::start(ns, "127.0.0.1", MASTER_PORT, PASSWORD);
    let replica =
        Redis::start_replica(ns, "127.0.0.1", REPLICA_PORT, ("127.0.0.1", MASTER_PORT), PASSWORD);
    wait(Duration::from_secs(10), "the replica in sync", || replica.replica_in_sync())?;
    let sentinels: Vec<Sentinel> = SENTINEL_PORTS
        .iter()
        .map(|&port| Sentinel::start(ns, "127.0.0.1", port, &master, SERVICE, 2, DOWN_AFTER_MS))
        .collect();
    wait(Duration::from_secs(30), "the sentinels to know the replica and each other", || {
        sentinels.iter().all(|s| s.ready(SERVICE, 1, 2))
    })?;
    let hosts: Vec<String> = SENTINEL_PORTS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+sentinel://:{PASSWORD}@{}/{SERVICE}/0", hosts.join(","));
    let prefix = format!("{}:", tests::unique("bench-sentinel-"));
    let gateways: Vec<Gateway> = (0..3)
        .map(|i| {
            Gateway::start_url(
                ns,
                &ifaces[i],
                &format!("sg{}", i + 1),
                &url,
                &prefix,
                2610 + i as u16,
            )
        })
        .collect();
    let maps: Vec<PinnedMaps> =
        gateways.iter().map(Gateway::maps).collect::<anyhow::Result<_>>()?;
    let all: Vec<&PinnedMaps> = maps.iter().collect();

    progress("fleet: propagation through the Sentinel master, before");
    let before = propagation(&gateways[0], &maps[1], 170, PROPAGATED_FAILOVER)?;

    progress("fleet: kill -9 of the master under a stream of bans on the three gateways");
    let stop = AtomicBool::new(false);
    let made: Mutex<Vec<(BanTarget, Instant)>> = Mutex::new(Vec::new());
    let switched: Mutex<Option<Instant>> = Mutex::new(None);
    let replica_node = replica.node();
    let (killed_at, recovered) = std::thread::scope(|scope| -> anyhow::Result<_> {
        for (g, gateway) in gateways.iter().enumerate() {
            let (stop, made) = (&stop, &made);
            scope.spawn(move || {
                for i in 0..60_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let target = address(172 + g as u8, i);
                    if gateway.ban(&target).is_ok() {
                        let key: BanTarget = target.parse().expect("an address");
                        made.lock().unwrap().push((key, Instant::now()));
                    }
                    std::thread::sleep(STREAM_EVERY);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        master.kill();
        let killed_at = Instant::now();
        {
            let (stop, switched, sentinels, node) = (&stop, &switched, &sentinels, &replica_node);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if sentinels[0].master(SERVICE).as_deref() == Some(node.as_str()) {
                        *switched.lock().unwrap() = Some(Instant::now());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        // The first ban made after the death that is in all three kernel maps.
        let mut recovered = None;
        while killed_at.elapsed() < Duration::from_secs(60) {
            let after: Vec<BanTarget> = made
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, at)| *at > killed_at)
                .map(|(t, _)| *t)
                .collect();
            let mut found = false;
            for target in after {
                if all.iter().all(|m| m.get(&target).ok().flatten().is_some()) {
                    found = true;
                    break;
                }
            }
            if found {
                recovered = Some(killed_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        Ok((killed_at, recovered))
    })?;
    let recovered = recovered.ok_or_else(|| {
        anyhow::anyhow!("no ban reached every gateway within 60 s of the master's death")
    })?;
    let switched = switched
        .lock()
        .unwrap()
        .map(|at| at.duration_since(killed_at))
        .ok_or_else(|| anyhow::anyhow!("the sentinels did not fail over within 60 s"))?;
    let made: Vec<BanTarget> = made.into_inner().unwrap().into_iter().map(|(t, _)| t).collect();
    let lost = match all_everywhere(&all, &made, Duration::from_secs(30))? {
        Ok(_) => 0,
        Err(missing) => missing,
    };
    progress("fleet: propagation through the new master, after");
    let after = propagation(&gateways[0], &maps[1], 171, PROPAGATED_FAILOVER)?;
    let moved =
        gateways.iter().filter(|g| g.agent.log().contains("the Redis master moved")).count();
    let flowing = recovered.as_secs_f64() - switched.as_secs_f64();

    report.section(
        "Fleet: a Redis Sentinel failover (issue 28)",
        &format!(
            "A Sentinel service on the bench namespace's loopback: a master, a replica, three \
             sentinels (quorum 2, down-after-milliseconds {DOWN_AFTER_MS}, failover-timeout \
             5000), redis-server 7 in sentinel mode; three gateways (release agents, XDP native \
             on veth ends) with fleet.redis = redis+sentinel://... naming the three sentinels. \
             Propagation, before and after: {PROPAGATED_FAILOVER} bans one at a time on gateway 1, \
             each timed until it is in gateway 2's kernel map (as the single-Redis row, measured \
             in the same run). Failover: each gateway bans a new address every 10 ms through its \
             control socket; after 2 s the master is killed with SIGKILL; \"sentinels\": until \
             the first sentinel names the replica (polled every 10 ms); \"fleet-wide again\": \
             until the first ban made after the death is in all three kernel maps (polled every \
             1 ms); the stream goes on 2 s more; then every ban the three made, before, during \
             and after, is looked for in all three maps (30 s allowed)."
        ),
        &["measure", "helo-filter fleet", "goal"],
        &[
            vec![
                "propagation gw1 → gw2, one Redis (above)".into(),
                format!("p50 {} ms, p99 {} ms", f(single.0, 1), f(single.1, 1)),
                "".into(),
            ],
            vec![
                "propagation through the Sentinel master, before".into(),
                format!("p50 {} ms, p99 {} ms", f(before.0, 1), f(before.1, 1)),
                "p99 < 1 s".into(),
            ],
            vec![
                "propagation through the new master, after".into(),
                format!("p50 {} ms, p99 {} ms", f(after.0, 1), f(after.1, 1)),
                "p99 < 1 s".into(),
            ],
            vec![
                "master killed → sentinels name the replica".into(),
                format!("{:.2} s", switched.as_secs_f64()),
                "Sentinel's own (down-after 1 s + election)".into(),
            ],
            vec![
                "master killed → first ban in every gateway's kernel map again".into(),
                format!("{:.2} s ({flowing:+.2} s after the sentinels)", recovered.as_secs_f64()),
                "within 2 s of the sentinels' failover".into(),
            ],
            vec![
                format!("bans lost, of {} made on the three during the run", made.len()),
                format!("{lost}"),
                "0".into(),
            ],
        ],
        &[format!(
            "Gateways that logged \"the Redis master moved\": {moved} of 3. The 2 cores are \
             shared by the three agents, two redis-servers, three sentinels and the load; \
             single runs on a noisy machine, compare the ratios."
        )],
    );
    report.target(
        "fleet-wide bans again within 2 s of the Sentinel failover",
        flowing < 2.0,
        format!(
            "{flowing:.2} s after the sentinels ({:.2} s after the death)",
            recovered.as_secs_f64()
        ),
    );
    report.target(
        "a Redis failover loses no ban",
        lost == 0,
        format!("{lost} lost of {}", made.len()),
    );
    drop((gateways, sentinels, replica, master));
    Ok(())
}

/// `count` bans one at a time on `from`, each timed until it is in `to`: (p50, p99) in ms.
fn propagation(
    from: &Gateway,
    to: &PinnedMaps,
    block: u8,
    count: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut delays = Vec::with_capacity(count);
    for i in 0..count {
        let target = address(block, i);
        let key: BanTarget = target.parse()?;
        let started = Instant::now();
        from.ban(&target)?;
        while to.get(&key)?.is_none() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(5),
                "ban {i} ({target}) did not propagate in 5 s"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        delays.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() as f64 * p) as usize).min(delays.len() - 1)];
    Ok((pct(0.50), pct(0.99)))
}

/// Redis's `used_memory`, bytes.
fn used_memory(redis: &Redis) -> anyhow::Result<i64> {
    let info = redis.cli(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.trim().strip_prefix("used_memory:"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO memory: {info}"))
}

/// Polls `check` every 50 ms for up to `limit`.
fn wait(limit: Duration, what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !check() {
        anyhow::ensure!(started.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Bans per second from [`THREADS`] threads, [`THROUGHPUT_BANS`] in all, into `10.<block>/16`.
fn throughput(gateway: &Gateway, block: u8) -> anyhow::Result<f64> {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for i in (t..THROUGHPUT_BANS).step_by(THREADS) {
                        gateway.ban(&address(block, i))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("a ban thread panicked"))
    })?;
    Ok(THROUGHPUT_BANS as f64 / started.elapsed().as_secs_f64())
}

/// One command in RESP, for `redis-cli --pipe`.
fn resp(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
}
