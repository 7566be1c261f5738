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
        let config = pins.config(&format!(
            "{fleet}[bans]\nmax_per_second = 1000000\nsnapshot = \"\"\n[identity]\ndetect = false\n"
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
    let mut ifaces = Vec::new();
    for pair in 0..2 {
        let (a, b) = (tests::unique("hfv"), tests::unique("hfv"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ns.ip(&["link", "set", &a, "up"]);
        ns.ip(&["link", "set", &b, "up"]);
        ifaces.push(a);
        ifaces.push(b);
        let _ = pair;
    }
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
    let loaded = redis.cli_with_input(&["--pipe"], Some(&load));
    anyhow::ensure!(loaded.contains("errors: 0"), "redis-cli --pipe: {loaded}");

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
    drop((gw1, gw2, off, redis));
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
