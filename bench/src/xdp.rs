//! Benchmark 1: the XDP program's cost per packet, with BPF_PROG_TEST_RUN on hand-built SYN frames:
//! banned source, unbanned source, allowlisted source, a port not guarded; with 1k, 100k and 1M
//! bans in the map. Benchmark 7: ban throughput into the kernel map, and restoring a 100k-ban snapshot.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use helo_agent::addr::BanTarget;
use helo_agent::blocklist::snapshot::{self, SavedBan, Snapshot};
use helo_agent::blocklist::{BanStore as _, Blocklist, Ttl};
use helo_agent::clock::{Now, boot_ns};
use helo_agent::config::MapSizes;
use helo_agent::ebpf::{self, LoadOptions, PinnedMaps, XdpProgram};
use helo_common::BanValue;
use tests::PinDir;
use tests::frames;

use crate::report::{Report, f};
use crate::{median, progress};

const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn load(dir: &PinDir, allow: &[ipnet::IpNet]) -> anyhow::Result<XdpProgram> {
    Ok(ebpf::load(&LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes { bans_v4: 1 << 21, ..MapSizes::default() },
        ports: &helo_common::DEFAULT_PORTS,
        allow,
        passes: helo_agent::config::PassSizes::UNUSED,
    })?)
}

/// The `i`-th banned address: 10.0.0.0/8 onwards.
fn banned(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + i as u32)
}

pub fn run(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    let dir = PinDir::new();
    let allow: Vec<ipnet::IpNet> = vec!["192.0.2.0/24".parse()?];
    let program = load(&dir, &allow)?;
    let mut maps = PinnedMaps::open(dir.path())?;
    let value = BanValue::new(u64::MAX - 1, 0);
    let cases: [(&str, Vec<u8>); 4] = [
        ("banned (drop)", frames::tcp_v4(banned(7), "198.51.100.1".parse()?, 25, frames::SYN)),
        ("not banned (pass)", frames::syn_v4("203.0.113.9", 25)),
        ("allowlisted (pass)", frames::syn_v4("192.0.2.5", 25)),
        ("port not guarded (pass)", frames::syn_v4("203.0.113.9", 80)),
    ];
    let mut filled = 0;
    let mut rows = Vec::new();
    let mut by_case: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for size in SIZES {
        progress(&format!("xdp: filling the v4 ban map to {size} entries"));
        while filled < size {
            maps.put(&BanTarget::V4(banned(filled).octets()), &value)?;
            filled += 1;
        }
        let mut row = vec![format!("{size}")];
        for (c, (name, frame)) in cases.iter().enumerate() {
            let mut runs: Vec<f64> = (0..ROUNDS)
                .map(|_| program.test_run(frame, REPEAT).map(|(_, d)| d.as_nanos() as f64))
                .collect::<Result<_, _>>()?;
            let ns = median(&mut runs);
            progress(&format!("xdp: {size} entries, {name}: {ns:.1} ns/packet"));
            by_case[c].push(ns);
            row.push(f(ns, 1));
        }
        rows.push(row);
    }
    let hit_1k = by_case[0][0];
    let hit_1m = by_case[0][2];
    let flat = hit_1m <= hit_1k * 1.5 && by_case[1][2] <= by_case[1][0] * 1.5;
    report.target(
        "XDP cost flat: 1M entries within 1.5x of 1k",
        flat,
        format!(
            "banned: {:.1} → {:.1} ns ({:.2}x); not banned: {:.1} → {:.1} ns ({:.2}x)",
            hit_1k,
            hit_1m,
            hit_1m / hit_1k,
            by_case[1][0],
            by_case[1][2],
            by_case[1][2] / by_case[1][0]
        ),
    );
    let mut header = vec!["bans in map"];
    header.extend(cases.iter().map(|(n, _)| *n));
    report.section(
        "1. XDP cost per packet",
        &format!(
            "The real program in the kernel via BPF_PROG_TEST_RUN (aya `TestRun`), {REPEAT} runs per \
             measurement, median of {ROUNDS}; ns per packet as the kernel reports it. SYN frames \
             built by hand (tests/src/frames.rs). The v4 ban map is an LRU hash of 2M slots, \
             filled to each size. Plot: `xdp_cost.png`."
        ),
        &header,
        &rows,
        &["Test runs go through the kernel's test harness (an skb-less xdp_buff per run), so \
           absolute figures are a little above what a NIC's driver path costs; the comparison \
           across map sizes is the point."
            .into()],
    );
    let groups: Vec<String> = SIZES.iter().map(|s| format!("{s} bans")).collect();
    let series: Vec<(String, Vec<f64>)> =
        cases.iter().zip(&by_case).map(|((n, _), v)| ((*n).to_owned(), v.clone())).collect();
    crate::plot::bars(
        &out.join("xdp_cost.png"),
        "XDP cost per packet",
        "ns / packet",
        &groups,
        &series,
    )?;
    drop(program);

    bans_and_restore(report)
}

/// 7. Bans per second into the kernel map, and a 100k-ban snapshot restored into empty maps.
fn bans_and_restore(report: &mut Report) -> anyhow::Result<()> {
    const N: usize = 100_000;
    let dir = PinDir::new();
    let program = load(&dir, &[])?;
    let mut list = Blocklist::new(PinnedMaps::open(dir.path())?);
    progress(&format!("bans: {N} bans through Blocklist::ban"));
    let started = Instant::now();
    let now = boot_ns();
    for i in 0..N {
        let target = BanTarget::V4(banned(i).octets());
        list.ban(
            &target,
            Ttl::For(Duration::from_secs(3600)),
            &format!("badhelo: bot{i}.example"),
            now,
        )?;
    }
    let ban_secs = started.elapsed().as_secs_f64();
    let rate = N as f64 / ban_secs;

    let at = Now::read();
    let snap = Snapshot {
        version: snapshot::VERSION,
        saved_unix: at.unix_ns / 1_000_000_000,
        bans: (0..N)
            .map(|i| SavedBan {
                target: banned(i).to_string(),
                expires_unix: Some(at.unix_ns / 1_000_000_000 + 3600),
                reason: format!("badhelo: bot{i}.example"),
                hits: 0,
                origin: None,
            })
            .collect(),
        offences: Vec::new(),
        passes: Vec::new(),
        steer_passes: Vec::new(),
    };
    let file = std::env::temp_dir().join(tests::unique("helo-bench-snapshot-"));
    snapshot::save(&file, &snap)?;
    let size = std::fs::metadata(&file)?.len();
    drop((list, program));
    let fresh = PinDir::new();
    let program = load(&fresh, &[])?;
    let mut list = Blocklist::new(PinnedMaps::open(fresh.path())?);
    progress(&format!("bans: restoring a {N}-ban snapshot ({} KiB) into empty maps", size / 1024));
    let started = Instant::now();
    let loaded = match snapshot::load(&file, Now::read())? {
        snapshot::Loaded::Good(s) => s,
        other => anyhow::bail!("snapshot did not load: {other:?}"),
    };
    let parsed = started.elapsed();
    let done = snapshot::restore(&mut list, &loaded, Now::read())?;
    let restore = started.elapsed();
    let _ = std::fs::remove_file(&file);
    anyhow::ensure!(done.restored == N, "restored {} of {N}", done.restored);
    anyhow::ensure!(list.store().entries()?.len() == N, "map holds {N}");
    drop(program);
    report.target(
        "restore 100k bans under 1 s",
        restore < Duration::from_secs(1),
        format!("{:.0} ms", restore.as_secs_f64() * 1000.0),
    );
    report.section(
        "7. Ban throughput and snapshot restore",
        "Bans written by `Blocklist::ban` (what the ban worker runs: a reason-table lookup and insert, \
         a hit-count lookup, the map update) for 100k distinct addresses and reasons; then a snapshot of \
         100k bans saved, read back and restored into empty pinned maps (what a start after a reboot \
         does).",
        &["measure", "value"],
        &[
            vec!["bans per second into the kernel map".into(), f(rate, 0)],
            vec![format!("{N} bans"), format!("{:.2} s", ban_secs)],
            vec!["snapshot file".into(), format!("{} KiB", size / 1024)],
            vec!["snapshot parse".into(), format!("{:.0} ms", parsed.as_secs_f64() * 1000.0)],
            vec!["restore, parse included".into(), format!("{:.0} ms", restore.as_secs_f64() * 1000.0)],
        ],
        &["Rule bans are never capped: in a storm they queue behind the ban worker, which writes \
           them at this rate."
            .into()],
    );
    Ok(())
}
