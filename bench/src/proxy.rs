//! Benchmarks 3 (session rate and latency), 4 (DATA relay) and 6 (memory per idle session): helo-agent against
//! HAProxy in TCP mode and direct connections, with Postfix's smtp-sink as the MTA, all on
//! loopback. The agent runs the release build with `--proxy-protocol none` (HAProxy sends no
//! header either), an empty allowlist so every HELO goes through the rules, XDP in skb mode on
//! lo. Rounds alternate between the targets so drift hits all of them alike.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{AgentProcess, PinDir};

use crate::procfs::{process_ticks, rss_kib};
use crate::report::{Report, f};
use crate::{median, progress};

const SINK: &str = "127.0.0.1:10025";
const AGENT: &str = "127.0.0.1:2525";
const HAPROXY: &str = "127.0.0.1:2526";
const SESSIONS: usize = 4000;
const CONCURRENCY: usize = 20;
const ROUNDS: usize = 3;
const MESSAGE_MB: usize = 10;
const MESSAGES: usize = 30;
const IDLE: usize = 5000;

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {addr} after 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn smtp_sink() -> anyhow::Result<Guard> {
    let child = Command::new("smtp-sink")
        .args(["-u", "nobody", "-m", "8000", "-c", SINK, "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start smtp-sink (apt package postfix): {e}"))?;
    wait_listening(SINK)?;
    Ok(Guard(child))
}

fn haproxy(dir: &Path) -> anyhow::Result<Guard> {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 7000\n  nbthread 2\n\
             defaults\n  mode tcp\n  timeout connect 30s\n  timeout client 5m\n  timeout server 5m\n  option splice-auto\n\
             frontend smtp\n  bind {HAPROXY}\n  default_backend mta\n\
             backend mta\n  server sink {SINK}\n"
        ),
    )?;
    let log = dir.join("haproxy.log");
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&config)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start haproxy (apt package haproxy): {e}"))?;
    let guard = Guard(child);
    wait_listening(HAPROXY).map_err(|e| {
        anyhow::anyhow!("{e}; haproxy said:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    })?;
    Ok(guard)
}

fn agent(pins: &PinDir) -> AgentProcess {
    let config = pins.config(
        "[allowlist]\nnetworks = []\n[identity]\ndetect = false\n[proxy]\nmax_sessions = 9000\nmax_sessions_per_ip = 100000\nupstream = \"127.0.0.1:10025\"\n",
    );
    let agent_bin = "127.0.0.1:2525";
    AgentProcess::start(
        &[],
        &[
            "--config",
            config.to_str().unwrap(),
            "run",
            "--iface",
            "lo",
            "--xdp-mode",
            "skb",
            "--listen",
            agent_bin,
            "--proxy-protocol",
            "none",
        ],
        move || TcpStream::connect(agent_bin).is_ok(),
    )
}

/// Reads one SMTP reply (its last line starts with `code` and a space).
fn reply(reader: &mut BufReader<TcpStream>, code: &str) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        anyhow::ensure!(reader.read_line(&mut line)? > 0, "connection closed waiting for {code}");
        anyhow::ensure!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            return Ok(());
        }
    }
}

/// One whole SMTP session with a message of `body` bytes; returns its duration.
fn session(addr: &str, body: &[u8]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    reply(&mut reader, "220")?;
    writer.write_all(b"EHLO mail.bench-sender.example\r\n")?;
    reply(&mut reader, "250")?;
    writer.write_all(b"MAIL FROM:<a@bench-sender.example>\r\n")?;
    reply(&mut reader, "250")?;
    writer.write_all(b"RCPT TO:<b@bench-rcpt.example>\r\n")?;
    reply(&mut reader, "250")?;
    writer.write_all(b"DATA\r\n")?;
    reply(&mut reader, "354")?;
    writer.write_all(body)?;
    writer.write_all(b".\r\n")?;
    reply(&mut reader, "250")?;
    writer.write_all(b"QUIT\r\n")?;
    reply(&mut reader, "221")?;
    Ok(started.elapsed())
}

struct Rate {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_secs: f64,
}

/// `count` sessions over `threads` connections at a time; the proxy's CPU from `pid`.
fn drive(
    addr: &str,
    count: usize,
    threads: usize,
    body: &[u8],
    pid: Option<u32>,
) -> anyhow::Result<Rate> {
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let cpu0 = pid.map_or(0, process_ticks);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (next, latencies, errors) = (next.clone(), latencies.clone(), errors.clone());
            scope.spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match session(addr, body) {
                        Ok(d) => latencies.lock().unwrap().push(d.as_secs_f64() * 1000.0),
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu1 = pid.map_or(0, process_ticks);
    let errors = errors.lock().unwrap();
    anyhow::ensure!(
        errors.is_empty(),
        "{} sessions failed through {addr}, first: {}",
        errors.len(),
        errors[0]
    );
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok(Rate {
        per_second: count as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_secs: (cpu1 - cpu0) as f64 / hz,
    })
}

pub fn run(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(tests::unique("hfbench-"));
    std::fs::create_dir_all(&work)?;
    let result = run_in(report, out, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(report: &mut Report, out: &Path, work: &Path) -> anyhow::Result<()> {
    let _sink = smtp_sink()?;
    let haproxy = haproxy(work)?;
    let pins = PinDir::new();
    let agent = agent(&pins);
    let targets: [(&str, &str, Option<u32>); 3] = [
        ("direct to smtp-sink", SINK, None),
        ("helo-agent", AGENT, Some(agent.pid())),
        ("HAProxy 2.6 (TCP mode)", HAPROXY, Some(haproxy.0.id())),
    ];

    // 3. Sessions: one small message each.
    let small = b"Subject: bench\r\n\r\nhello\r\n".to_vec();
    let mut rates: Vec<Vec<Rate>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for (i, (name, addr, pid)) in targets.iter().enumerate() {
            progress(&format!("proxy: {SESSIONS} sessions through {name}, round {}", round + 1));
            rates[i].push(drive(addr, SESSIONS, CONCURRENCY, &small, *pid)?);
        }
    }
    let med =
        |i: usize, get: fn(&Rate) -> f64| median(&mut rates[i].iter().map(get).collect::<Vec<_>>());
    let rate: Vec<f64> = (0..targets.len()).map(|i| med(i, |r| r.per_second)).collect();
    let (direct, ours, haproxy_rate) = (rate[0], rate[1], rate[2]);
    report.target(
        "session rate >= 1.5x HAProxy",
        ours >= 1.5 * haproxy_rate,
        format!("{:.0}/s vs {:.0}/s ({:.2}x)", ours, haproxy_rate, ours / haproxy_rate),
    );
    report.target(
        "session rate >= 0.7x direct",
        ours >= 0.7 * direct,
        format!("{:.0}/s vs {:.0}/s ({:.2}x)", ours, direct, ours / direct),
    );
    let rows: Vec<Vec<String>> = targets
        .iter()
        .enumerate()
        .map(|(i, (name, _, pid))| {
            vec![
                (*name).to_owned(),
                f(rate[i], 0),
                f(rate[i] / direct, 2),
                f(med(i, |r| r.p50_ms), 2),
                f(med(i, |r| r.p99_ms), 2),
                if pid.is_some() {
                    f(med(i, |r| r.cpu_secs) * 1e6 / SESSIONS as f64, 0)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    report.section(
        "3. Proxy session rate",
        &format!(
            "{SESSIONS} sessions per round, {CONCURRENCY} at a time, {ROUNDS} rounds alternating between \
             targets, medians. Each session: greeting, EHLO, MAIL, RCPT, DATA with a 23-byte body, QUIT \
             (a Rust client in bench/src/proxy.rs, timing each session). smtp-sink is the MTA. \
             Plot: `session_rate.png`."
        ),
        &["path", "sessions/s", "vs direct", "p50 ms", "p99 ms", "proxy CPU µs/session"],
        &rows,
        &[
            "All processes (client threads, proxy, smtp-sink) share the machine's 2 cores, and loopback \
             runs the receiving TCP stack inline in the sender, so every extra hop costs twice."
                .into(),
            "**What limits helo-agent here** (perf record on the agent during these rounds, \
             2026-11-22): 89% of its samples are in the kernel, 8% in its own code, 0.2% in the XDP \
             program. A quarter is scheduling (`_raw_spin_unlock_irqrestore` in wake-ups, \
             `finish_task_switch`): 2 runtime threads, 20 client threads and smtp-sink trade 2 \
             cores. Per session the agent creates two pipes and splices even a 23-byte message, \
             where HAProxy's `splice-auto` copies small transfers; and with its own greeting it \
             connects to the MTA only after the EHLO, one more round trip inside each session \
             (the price of keeping idle and rejected bots off the MTA). A single runtime thread (TOKIO_WORKER_THREADS=1) was slower \
             (3.1k/s). What would close part of the gap: copy first and switch to splice only when \
             a read fills the buffer (splice-auto), and reuse pipes across sessions. The 1.5x \
             HAProxy target also assumed the agent does less per session than a generic proxy; it \
             does more (it parses and answers SMTP up to the HELO)."
                .into(),
        ],
    );
    let groups: Vec<String> = targets.iter().map(|t| t.0.to_owned()).collect();
    crate::plot::bars(
        &out.join("session_rate.png"),
        "SMTP sessions per second",
        "sessions/s",
        &groups,
        &[("sessions/s".into(), rate.clone())],
    )?;

    // 4. DATA relay: 10 MB messages.
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmn\r\n";
    // Whole lines, so the final ".\r\n" starts a line.
    let big: Vec<u8> = line.repeat((MESSAGE_MB << 20) / line.len());
    let mut relay: Vec<Vec<Rate>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for (i, (name, addr, pid)) in targets.iter().enumerate() {
            progress(&format!(
                "proxy: {MESSAGES} x {MESSAGE_MB} MB through {name}, round {}",
                round + 1
            ));
            relay[i].push(drive(addr, MESSAGES, 1, &big, *pid)?);
        }
    }
    let gb = (MESSAGES * MESSAGE_MB) as f64 / 1024.0;
    let relay_med =
        |i: usize, get: fn(&Rate) -> f64| median(&mut relay[i].iter().map(get).collect::<Vec<_>>());
    let cpu_per_gb: Vec<f64> =
        (0..targets.len()).map(|i| relay_med(i, |r| r.cpu_secs) / gb).collect();
    let mb_s: Vec<f64> =
        (0..targets.len()).map(|i| relay_med(i, |r| r.per_second) * MESSAGE_MB as f64).collect();
    report.target(
        "DATA relay CPU no worse than HAProxy (splice)",
        cpu_per_gb[1] <= cpu_per_gb[2] * 1.05,
        format!("{:.2} vs {:.2} CPU s/GB", cpu_per_gb[1], cpu_per_gb[2]),
    );
    let rows: Vec<Vec<String>> = targets
        .iter()
        .enumerate()
        .map(|(i, (name, _, pid))| {
            vec![
                (*name).to_owned(),
                f(mb_s[i], 0),
                if pid.is_some() { f(cpu_per_gb[i], 2) } else { "-".into() },
            ]
        })
        .collect();
    report.section(
        "4. DATA relay",
        &format!(
            "{MESSAGES} messages of {MESSAGE_MB} MB per round, one at a time, {ROUNDS} rounds, medians. \
             Throughput is the client's; CPU is the proxy process's user + system time (splice work \
             in the kernel is system time of the process that calls it). helo-agent splices after \
             the HELO; HAProxy runs with `option splice-auto`. Plot: `relay_cpu.png`."
        ),
        &["path", "MB/s", "proxy CPU s/GB"],
        &rows,
        &[],
    );
    crate::plot::bars(
        &out.join("relay_cpu.png"),
        "CPU seconds per GB relayed (lower is better)",
        "CPU s / GB",
        &groups[1..],
        &[("CPU s/GB".into(), cpu_per_gb[1..].to_vec())],
    )?;

    // 6. Memory: idle sessions that never send HELO.
    let mut memory_rows = Vec::new();
    let mut per_session_ours = 0.0;
    for (name, addr, pid) in &targets[1..] {
        let pid = pid.expect("a proxy");
        let before = rss_kib(pid);
        progress(&format!("proxy: {IDLE} idle sessions to {name}"));
        let mut held = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            let stream = TcpStream::connect(addr)?;
            held.push(stream);
        }
        // Every session greeted: the proxy holds both sides.
        for stream in &mut held {
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf)?;
            anyhow::ensure!(buf[..n].starts_with(b"220"), "idle session not greeted by {name}");
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(pid);
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / IDLE as f64;
        if *name == "helo-agent" {
            per_session_ours = per;
        }
        memory_rows.push(vec![
            (*name).to_owned(),
            format!("{}", before / 1024),
            format!("{}", after / 1024),
            f(per / 1024.0, 2),
        ]);
        drop(held);
        std::thread::sleep(Duration::from_secs(1));
    }
    report.target(
        "memory <= 8 KiB per idle session",
        per_session_ours <= 8.0 * 1024.0,
        format!("{:.2} KiB", per_session_ours / 1024.0),
    );
    report.section(
        "6. Memory per idle session",
        &format!(
            "{IDLE} connections opened and greeted, then left silent (no HELO); the proxy's RSS \
             (VmRSS) before and after, divided by the sessions. 5000, not the 10k the issue asks: this \
             machine's hard open-file limit is 20000, and HAProxy, which connects to the MTA at \
             accept, holds two sockets per session and smtp-sink one. helo-agent, greeting itself, \
             holds one and the MTA none."
        ),
        &["proxy", "RSS before MiB", "RSS with idle sessions MiB", "KiB per session"],
        &memory_rows,
        &["Kernel socket buffers are not in RSS; they are the same for both proxies.".into()],
    );
    drop(agent);
    Ok(())
}
