//! XDP verdicts on hand-built frames, run in the kernel with BPF_PROG_TEST_RUN. Each test loads
//! the real program into its own pin directory, bans through the same code the CLI uses, and
//! checks both the verdict and the counter that moved.

use std::time::Duration;

use aya::maps::{MapData, MapInfo, PerCpuArray};
use helo_agent::addr::BanTarget;
use helo_agent::blocklist::{BanStore, Blocklist, Ttl};
use helo_agent::clock::boot_ns;
use helo_agent::config::MapSizes;
use helo_agent::ebpf::{self, LoadOptions, PinnedMaps, XdpProgram};
use helo_common::{BanValue, STAT_COUNT, Stat};
use tests::frames::{self, ACK, FIN, PSH, RST, SYN};
use tests::{PinDir, require_root};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Loaded {
    program: XdpProgram,
    bans: Blocklist<PinnedMaps>,
    // Dropped last: removes the pinned maps.
    _dir: PinDir,
}

fn load_with(allow: &[&str]) -> Loaded {
    require_root();
    let dir = PinDir::new();
    let allow: Vec<ipnet::IpNet> = allow.iter().map(|n| n.parse().unwrap()).collect();
    let program = ebpf::load(&LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes::default(),
        ports: &helo_common::DEFAULT_PORTS,
        allow: &allow,
        passes: helo_agent::config::PassSizes::UNUSED,
    })
    .unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
    let bans = Blocklist::new(PinnedMaps::open(dir.path()).expect("pinned maps"));
    Loaded { program, bans, _dir: dir }
}

fn load() -> Loaded {
    load_with(&[])
}

impl Loaded {
    fn stats(&self) -> [u64; STAT_COUNT as usize] {
        self.bans.store().stats().expect("stats")
    }

    /// Runs `frame` once and returns the action and which counter moved (exactly one must).
    fn verdict(&self, frame: &[u8]) -> (u32, Stat) {
        let before = self.stats();
        let (action, _) = self.program.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = self.stats();
        let moved: Vec<Stat> =
            Stat::ALL.into_iter().filter(|s| after[*s as usize] != before[*s as usize]).collect();
        assert_eq!(moved.len(), 1, "exactly one counter must move per frame, moved: {moved:?}");
        assert_eq!(after[moved[0] as usize], before[moved[0] as usize] + 1);
        (action, moved[0])
    }

    fn ban(&mut self, target: &str) {
        let target: BanTarget = target.parse().unwrap();
        self.bans.ban(&target, Ttl::For(Duration::from_secs(600)), "test", boot_ns()).unwrap();
    }
}

#[test]
fn banned_v4_syn_to_port_25_is_dropped_and_the_hit_counted() {
    let mut xdp = load();
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_PASS, Stat::Passed));
    xdp.ban("203.0.113.9");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_DROP, Stat::Dropped));
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 587)), (XDP_DROP, Stat::Dropped));
    let entries = xdp.bans.list(boot_ns()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].hits, 2);
    // Another source to the same port is untouched.
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.10", 25)), (XDP_PASS, Stat::Passed));
}

/// A ban used to drop every packet of the banned source, so the client's ACK and FIN after our
/// 221 were lost: the session that earned the ban could not end (our socket sat in FIN-WAIT-1)
/// and `hits` counted teardown instead of returning bots. Only a connection-opening SYN is
/// dropped; everything else of a banned source passes, counted as `banned_not_syn`.
#[test]
fn a_banned_clients_teardown_packets_pass() {
    let mut xdp = load();
    xdp.ban("203.0.113.9");
    xdp.ban("2001:db8:bad::9");
    xdp.ban("2001:db8:bad:1::/64");
    let gw_v4 = "198.51.100.1".parse().unwrap();
    let gw_v6 = "2001:db8:100::1".parse().unwrap();
    let v4 = |flags| frames::tcp_v4("203.0.113.9".parse().unwrap(), gw_v4, 25, flags);
    let v6 = |src: &str, flags, ext: &[u8]| {
        frames::tcp_v6_ext(src.parse().unwrap(), gw_v6, 587, flags, ext)
    };
    let opening = [("SYN", SYN), ("SYN|PSH", SYN | PSH)];
    let other = [
        ("ACK", ACK),
        ("PSH|ACK", PSH | ACK),
        ("FIN|ACK", FIN | ACK),
        ("RST", RST),
        ("RST|ACK", RST | ACK),
        ("SYN|ACK", SYN | ACK),
    ];
    for (name, flags) in other {
        let cases = [
            ("v4", v4(flags)),
            ("v4 with a VLAN tag", frames::vlan_tagged(&v4(flags))),
            ("v6 host", v6("2001:db8:bad::9", flags, &[])),
            ("v6 host behind extension headers", v6("2001:db8:bad::9", flags, &[0, 60])),
            ("v6 in a banned /64", v6("2001:db8:bad:1::7", flags, &[])),
        ];
        for (family, frame) in cases {
            assert_eq!(
                xdp.verdict(&frame),
                (XDP_PASS, Stat::BannedNotSyn),
                "{name} from a banned source ({family}) must pass"
            );
        }
    }
    for (name, flags) in opening {
        assert_eq!(xdp.verdict(&v4(flags)), (XDP_DROP, Stat::Dropped), "{name} v4");
        let frame = v6("2001:db8:bad::9", flags, &[0, 60]);
        assert_eq!(xdp.verdict(&frame), (XDP_DROP, Stat::Dropped), "{name} v6 host");
        let frame = v6("2001:db8:bad:1::7", flags, &[]);
        assert_eq!(xdp.verdict(&frame), (XDP_DROP, Stat::Dropped), "{name} v6 /64");
    }
    // Hits count refused connection attempts only: the two opening packets of each ban.
    let mut hits: Vec<(String, u64)> =
        xdp.bans.list(boot_ns()).unwrap().into_iter().map(|e| (e.target, e.hits)).collect();
    hits.sort();
    assert_eq!(
        hits,
        [
            ("2001:db8:bad:1::/64".to_owned(), 2),
            ("2001:db8:bad::9".to_owned(), 2),
            ("203.0.113.9".to_owned(), 2)
        ]
    );
}

#[test]
fn banned_v6_syn_to_port_25_is_dropped() {
    let mut xdp = load();
    xdp.ban("2001:db8:bad::9");
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:bad::9", 25)), (XDP_DROP, Stat::Dropped));
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:bad::10", 25)), (XDP_PASS, Stat::Passed));
}

#[test]
fn v6_prefix_ban_covers_the_whole_64_and_nothing_else() {
    let mut xdp = load();
    xdp.ban("2001:db8:bad:1::/64");
    for host in ["2001:db8:bad:1::1", "2001:db8:bad:1:ffff:ffff:ffff:ffff"] {
        assert_eq!(xdp.verdict(&frames::syn_v6(host, 25)), (XDP_DROP, Stat::Dropped), "{host}");
    }
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:bad:2::1", 25)), (XDP_PASS, Stat::Passed));
}

#[test]
fn the_same_banned_source_to_other_ports_passes_untouched() {
    let mut xdp = load();
    xdp.ban("203.0.113.9");
    xdp.ban("2001:db8:bad::9");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 22)), (XDP_PASS, Stat::NotGuarded));
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 2525)), (XDP_PASS, Stat::NotGuarded));
    assert_eq!(xdp.verdict(&frames::udp_v4("203.0.113.9", 25)), (XDP_PASS, Stat::NotGuarded));
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:bad::9", 22)), (XDP_PASS, Stat::NotGuarded));
}

#[test]
fn expired_ban_passes_and_the_kernel_removes_it() {
    let mut xdp = load();
    let target: BanTarget = "203.0.113.9".parse().unwrap();
    let past = BanValue::new(boot_ns() - 1, 0);
    // Straight into the map: an expired ban is what a ban looks like after its TTL.
    let mut maps = PinnedMaps::open(xdp._dir.path()).unwrap();
    maps.put(&target, &past).unwrap();
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_PASS, Stat::ExpiredPass));
    assert_eq!(maps.get(&target).unwrap(), None, "the program removes the expired entry");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_PASS, Stat::Passed));
    // A ban that ends a moment from now drops now and passes once its time is up.
    xdp.bans.ban(&target, Ttl::For(Duration::from_millis(300)), "short", boot_ns()).unwrap();
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_DROP, Stat::Dropped));
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_PASS, Stat::ExpiredPass));
}

#[test]
fn expired_host_ban_still_falls_back_to_a_live_v6_prefix_ban() {
    let mut xdp = load();
    let host: BanTarget = "2001:db8:bad::9".parse().unwrap();
    let mut maps = PinnedMaps::open(xdp._dir.path()).unwrap();
    maps.put(&host, &BanValue::new(boot_ns() - 1, 0)).unwrap();
    xdp.ban("2001:db8:bad::/64");
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:bad::9", 25)), (XDP_DROP, Stat::Dropped));
    assert_eq!(maps.get(&host).unwrap(), None);
}

#[test]
fn allowlisted_source_passes_though_banned() {
    let mut xdp = load_with(&["203.0.113.0/28", "2001:db8:600d::/48"]);
    xdp.ban("203.0.113.9");
    xdp.ban("2001:db8:600d::9");
    xdp.ban("2001:db8:600d::/64");
    xdp.ban("203.0.113.99");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_PASS, Stat::Allowlisted));
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:600d::9", 25)), (XDP_PASS, Stat::Allowlisted));
    // Outside the allowlisted /28: the ban holds.
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.99", 25)), (XDP_DROP, Stat::Dropped));
}

/// Issue 27: a rule's ban covers a prefix (the IPv6 /64 by default; /48 to /128 and IPv4 /24
/// to /32 as configured): every address inside is dropped, nothing outside; each length in
/// use is probed, an expired prefix ban passes (and goes) while a ban of another length still
/// drops.
#[test]
fn prefix_bans_of_every_length_drop_inside_and_nothing_outside() {
    let mut xdp = load();
    xdp.ban("198.51.100.0/24");
    xdp.ban("192.0.2.64/28");
    xdp.ban("2001:db8:4800::/48");
    xdp.ban("2001:db8:5600:ab00::/56");
    xdp.ban("2001:db8:7f::8/127");
    let drop_v4 = ["198.51.100.1", "198.51.100.255", "192.0.2.64", "192.0.2.79"];
    let pass_v4 = ["198.51.101.1", "192.0.2.63", "192.0.2.80"];
    let drop_v6 = [
        "2001:db8:4800::1",
        "2001:db8:4800:ffff:ffff::1",
        "2001:db8:5600:abff::1",
        "2001:db8:7f::8",
        "2001:db8:7f::9",
    ];
    let pass_v6 = ["2001:db8:4801::1", "2001:db8:5600:ac00::1", "2001:db8:7f::a"];
    for host in drop_v4 {
        assert_eq!(xdp.verdict(&frames::syn_v4(host, 25)), (XDP_DROP, Stat::Dropped), "{host}");
    }
    for host in pass_v4 {
        assert_eq!(xdp.verdict(&frames::syn_v4(host, 25)), (XDP_PASS, Stat::Passed), "{host}");
    }
    for host in drop_v6 {
        assert_eq!(xdp.verdict(&frames::syn_v6(host, 25)), (XDP_DROP, Stat::Dropped), "{host}");
    }
    for host in pass_v6 {
        assert_eq!(xdp.verdict(&frames::syn_v6(host, 25)), (XDP_PASS, Stat::Passed), "{host}");
    }
    let listed: Vec<String> =
        xdp.bans.list(boot_ns()).unwrap().into_iter().map(|e| e.target).collect();
    assert_eq!(
        listed,
        [
            "192.0.2.64/28",
            "198.51.100.0/24",
            "2001:db8:7f::8/127",
            "2001:db8:4800::/48",
            "2001:db8:5600:ab00::/56"
        ]
    );
    // An expired /48 around a live /56: the /56 still drops, and the /48 goes.
    let mut maps = PinnedMaps::open(xdp._dir.path()).unwrap();
    let wide: BanTarget = "2001:db8:5600::/48".parse().unwrap();
    maps.put(&wide, &BanValue::new(boot_ns() - 1, 0)).unwrap();
    let inside = frames::syn_v6("2001:db8:5600:ab00::1", 25);
    assert_eq!(xdp.verdict(&inside), (XDP_DROP, Stat::Dropped));
    assert_eq!(maps.get(&wide).unwrap(), None, "the program removes the expired prefix ban");
    // An expired prefix ban alone: passed as expired, and gone.
    let alone: BanTarget = "2001:db8:4900::/48".parse().unwrap();
    maps.put(&alone, &BanValue::new(boot_ns() - 1, 0)).unwrap();
    let frame = frames::syn_v6("2001:db8:4900:1::1", 25);
    assert_eq!(xdp.verdict(&frame), (XDP_PASS, Stat::ExpiredPass));
    assert_eq!(maps.get(&alone).unwrap(), None);
    assert_eq!(xdp.verdict(&frame), (XDP_PASS, Stat::Passed));
}

/// The kernel probes only the prefix lengths bans are held at, and at most
/// `helo_common::PREFIX_SLOTS` of them a family: a ban at one more is refused with the lengths
/// in use, and a length whose bans are all gone is dropped from the probes.
#[test]
fn prefix_lengths_in_use_are_bounded_and_tidied() {
    let mut xdp = load();
    let lengths = |maps: &PinnedMaps| {
        let mut l = helo_agent::blocklist::BanStore::prefix_lengths(maps, true);
        l.sort_unstable();
        l
    };
    for len in 48..48 + helo_common::PREFIX_SLOTS as u8 {
        xdp.ban(&format!("2001:db8:{len:x}::/{len}"));
    }
    let nine: BanTarget = "2001:db8:99::/100".parse().unwrap();
    let err = xdp.bans.ban(&nine, Ttl::Forever, "", boot_ns()).unwrap_err();
    assert!(err.to_string().contains("/48, /49"), "{err}");
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:99::1", 25)), (XDP_PASS, Stat::Passed));
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:37::1", 25)), (XDP_DROP, Stat::Dropped));
    assert_eq!(lengths(xdp.bans.store()), (48..56).collect::<Vec<u8>>());
    xdp.bans.unban(&"2001:db8:37::/55".parse().unwrap()).unwrap();
    let left = xdp.bans.store().entries().unwrap();
    xdp.bans.keep_lengths(&left).unwrap();
    assert_eq!(lengths(xdp.bans.store()), [48, 49, 50, 51, 52, 53, 54]);
    xdp.bans.ban(&nine, Ttl::Forever, "", boot_ns()).expect("a freed length is free again");
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:99::1", 25)), (XDP_DROP, Stat::Dropped));
}

/// Issue 27: an allowlisted address inside a banned prefix still passes (the rest of the
/// prefix is dropped), whatever the length.
#[test]
fn an_allowlisted_address_inside_a_banned_prefix_passes() {
    let mut xdp = load_with(&["2001:db8:5::99/128", "198.51.100.77/32", "2001:db8:6:1::/64"]);
    xdp.ban("2001:db8:5::/64");
    xdp.ban("2001:db8:6::/48");
    xdp.ban("198.51.100.0/24");
    for host in ["2001:db8:5::99", "2001:db8:6:1::5"] {
        assert_eq!(xdp.verdict(&frames::syn_v6(host, 25)), (XDP_PASS, Stat::Allowlisted), "{host}");
    }
    assert_eq!(xdp.verdict(&frames::syn_v4("198.51.100.77", 25)), (XDP_PASS, Stat::Allowlisted));
    for host in ["2001:db8:5::98", "2001:db8:6:2::5"] {
        assert_eq!(xdp.verdict(&frames::syn_v6(host, 25)), (XDP_DROP, Stat::Dropped), "{host}");
    }
    assert_eq!(xdp.verdict(&frames::syn_v4("198.51.100.78", 25)), (XDP_DROP, Stat::Dropped));
}

/// A pin directory an older version made has no maps for prefixes of other lengths than /64:
/// its bans work on (the CLI working on it without an agent says to start one for a /48),
/// and the next start adds the new maps and keeps every ban.
#[test]
fn a_pin_directory_of_the_older_layout_gains_the_prefix_maps_and_keeps_its_bans() {
    require_root();
    let dir = PinDir::new();
    let options = LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes::default(),
        passes: helo_agent::config::PassSizes::UNUSED,
        ports: &helo_common::DEFAULT_PORTS,
        allow: &[],
    };
    drop(ebpf::load(&options).unwrap());
    for name in [
        helo_common::maps::BANS_V4_PREFIX,
        helo_common::maps::BANS_V6_PREFIX,
        helo_common::maps::BAN_LENGTHS,
    ] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    let mut old = Blocklist::new(PinnedMaps::open(dir.path()).expect("the older layout opens"));
    old.ban(&"203.0.113.9".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap();
    old.ban(&"2001:db8:bad::/64".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap();
    let err = old.ban(&"2001:db8::/48".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap_err();
    assert!(err.to_string().contains("start the agent once"), "{err}");
    let program = ebpf::load(&options).unwrap();
    let mut bans = Blocklist::new(PinnedMaps::open(dir.path()).unwrap());
    bans.ban(&"2001:db8::/48".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap();
    for (frame, what) in [
        (frames::syn_v4("203.0.113.9", 25), "the older host ban"),
        (frames::syn_v6("2001:db8:bad::1", 25), "the older /64 ban"),
        (frames::syn_v6("2001:db8:0:1::1", 25), "a /48 ban"),
    ] {
        assert_eq!(program.test_run(&frame, 1).unwrap().0, XDP_DROP, "{what}");
    }
}

/// A reload replaces the allowlist in the kernel in place: the new networks are spared, the
/// dropped ones are not.
#[test]
fn a_reloaded_allowlist_takes_effect_in_the_kernel() {
    let mut xdp = load_with(&["203.0.113.0/28", "2001:db8:600d::/48"]);
    xdp.ban("203.0.113.9");
    xdp.ban("198.51.100.9");
    xdp.ban("2001:db8:600d::9");
    let mut allowlist = xdp.program.take_allowlist().expect("the loaded tries");
    let new: Vec<ipnet::IpNet> =
        ["198.51.100.0/24", "2001:db8:600d::/48"].iter().map(|n| n.parse().unwrap()).collect();
    allowlist.replace(&new).unwrap();
    let mut held = allowlist.networks();
    held.sort();
    assert_eq!(held, new, "exactly the new allowlist");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_DROP, Stat::Dropped));
    assert_eq!(xdp.verdict(&frames::syn_v4("198.51.100.9", 25)), (XDP_PASS, Stat::Allowlisted));
    assert_eq!(xdp.verdict(&frames::syn_v6("2001:db8:600d::9", 25)), (XDP_PASS, Stat::Allowlisted));
}

#[test]
fn vlan_tagged_frames_are_judged_like_untagged_ones() {
    let mut xdp = load();
    xdp.ban("203.0.113.9");
    xdp.ban("2001:db8:bad::9");
    let v4 = frames::vlan_tagged(&frames::syn_v4("203.0.113.9", 25));
    assert_eq!(xdp.verdict(&v4), (XDP_DROP, Stat::Dropped));
    let v6 = frames::vlan_tagged(&frames::syn_v6("2001:db8:bad::9", 25));
    assert_eq!(xdp.verdict(&v6), (XDP_DROP, Stat::Dropped));
    let other = frames::vlan_tagged(&frames::syn_v4("203.0.113.10", 25));
    assert_eq!(xdp.verdict(&other), (XDP_PASS, Stat::Passed));
    let ssh = frames::vlan_tagged(&frames::syn_v4("203.0.113.9", 22));
    assert_eq!(xdp.verdict(&ssh), (XDP_PASS, Stat::NotGuarded));
}

#[test]
fn ipv6_extension_headers_do_not_hide_a_banned_source() {
    let mut xdp = load();
    xdp.ban("2001:db8:bad::9");
    let (src, dst) = ("2001:db8:bad::9".parse().unwrap(), "2001:db8:100::1".parse().unwrap());
    for chain in [&[0u8][..], &[60], &[0, 60], &[44], &[0, 43, 60, 44]] {
        let frame = frames::tcp_v6_ext(src, dst, 25, SYN, chain);
        assert_eq!(xdp.verdict(&frame), (XDP_DROP, Stat::Dropped), "extension chain {chain:?}");
    }
    // Five extension headers is more than the program walks: passed and counted, never dropped.
    let long = frames::tcp_v6_ext(src, dst, 25, SYN, &[0, 60, 60, 60, 60]);
    assert_eq!(xdp.verdict(&long), (XDP_PASS, Stat::ParseError));
}

#[test]
fn non_first_fragments_pass_as_not_guarded() {
    let mut xdp = load();
    xdp.ban("203.0.113.9");
    let mut frame = frames::syn_v4("203.0.113.9", 25);
    frame[14 + 6] = 0x00;
    frame[14 + 7] = 0x10; // fragment offset 16 (x8 bytes)
    assert_eq!(xdp.verdict(&frame), (XDP_PASS, Stat::NotGuarded));
}

#[test]
fn truncated_and_malformed_frames_pass_and_are_counted() {
    let mut xdp = load();
    xdp.ban("203.0.113.9");
    xdp.ban("2001:db8:bad::9");
    let v4 = frames::syn_v4("203.0.113.9", 25);
    let v6 = frames::syn_v6("2001:db8:bad::9", 25);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Cut inside the IP header, inside the TCP ports, and (the sources are banned, so their
    // flags are read) before the TCP flags, for both families.
    for cut in [15, 20, 33, 34, 35, 40, 47] {
        cases.push((format!("v4 cut at {cut}"), v4[..cut].to_vec()));
    }
    for cut in [20, 53, 54, 56, 60, 67] {
        cases.push((format!("v6 cut at {cut}"), v6[..cut].to_vec()));
    }
    let mut bad_version = v4.clone();
    bad_version[14] = 0x55;
    cases.push(("IPv4 header with version 5".into(), bad_version));
    let mut short_ihl = v4.clone();
    short_ihl[14] = 0x43;
    cases.push(("IPv4 IHL of 3 words".into(), short_ihl));
    let mut long_ihl = v4.clone();
    long_ihl[14] = 0x4f; // 60-byte header: the TCP ports would lie past the frame's end
    cases.push(("IPv4 IHL past the end".into(), long_ihl));
    let mut v6_bad_version = v6.clone();
    v6_bad_version[14] = 0x40;
    cases.push(("IPv6 header with version 4".into(), v6_bad_version));
    let tagged = frames::vlan_tagged(&v4);
    cases.push(("VLAN tag without payload".into(), tagged[..17].to_vec()));
    for (name, frame) in cases {
        assert_eq!(xdp.verdict(&frame), (XDP_PASS, Stat::ParseError), "{name}");
    }
    // A bare Ethernet header of an unknown type is simply not ours.
    let mut arp = v4[..14].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(xdp.verdict(&arp), (XDP_PASS, Stat::NotGuarded));
}

#[test]
fn ipv4_mapped_bans_land_in_the_ipv4_map() {
    let mut xdp = load();
    xdp.ban("::ffff:203.0.113.9");
    assert_eq!(xdp.verdict(&frames::syn_v4("203.0.113.9", 25)), (XDP_DROP, Stat::Dropped));
}

#[test]
fn configured_ports_replace_the_defaults() {
    require_root();
    let dir = PinDir::new();
    let program = ebpf::load(&LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes::default(),
        ports: &[2525],
        allow: &[],
        passes: helo_agent::config::PassSizes::UNUSED,
    })
    .unwrap();
    let mut bans = Blocklist::new(PinnedMaps::open(dir.path()).unwrap());
    bans.ban(&"203.0.113.9".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap();
    let run = |port| program.test_run(&frames::syn_v4("203.0.113.9", port), 1).unwrap().0;
    assert_eq!(run(2525), XDP_DROP);
    assert_eq!(run(25), XDP_PASS);
}

#[test]
fn bans_survive_a_reload_of_the_program() {
    require_root();
    let dir = PinDir::new();
    let options = LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes::default(),
        ports: &helo_common::DEFAULT_PORTS,
        allow: &[],
        passes: helo_agent::config::PassSizes::UNUSED,
    };
    {
        let _first = ebpf::load(&options).unwrap();
        let mut bans = Blocklist::new(PinnedMaps::open(dir.path()).unwrap());
        bans.ban(&"203.0.113.9".parse().unwrap(), Ttl::Forever, "kept", boot_ns()).unwrap();
    }
    let second = ebpf::load(&options).unwrap();
    let (action, _) = second.test_run(&frames::syn_v4("203.0.113.9", 25), 1).unwrap();
    assert_eq!(action, XDP_DROP, "a ban pinned by the first load holds in the second");
}

/// The counters map grew a counter (`banned_not_syn`). An older build's map, pinned with fewer
/// entries, would be reused as it is: the new counter would go uncounted and `stats` could not
/// read it. A start replaces it, and puts it back when it fails before attaching.
#[test]
fn a_counters_map_pinned_by_an_older_version_is_replaced() {
    require_root();
    let dir = PinDir::new();
    std::fs::create_dir_all(dir.path()).unwrap();
    let stats_pin = dir.path().join(helo_common::maps::STATS);
    let older = PerCpuArray::<MapData, u64>::create(STAT_COUNT - 1, 0).expect("a counters map");
    older.pin(&stats_pin).expect("pinned");
    let counters = || MapInfo::from_pin(&stats_pin).expect("a pinned counters map").max_entries();
    let options = LoadOptions {
        pin_dir: dir.path(),
        sizes: MapSizes::default(),
        ports: &helo_common::DEFAULT_PORTS,
        allow: &[],
        passes: helo_agent::config::PassSizes::UNUSED,
    };

    let failed = ebpf::load(&options).expect("load");
    assert_eq!(counters(), STAT_COUNT, "a new map while the start runs");
    failed.discard();
    assert_eq!(counters(), STAT_COUNT - 1, "a failed start puts the older map back");
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, [helo_common::maps::STATS], "and removes the maps it created");

    let mut program = ebpf::load(&options).expect("load");
    program.keep_pins();
    assert_eq!(counters(), STAT_COUNT);
    assert!(!dir.path().join("HELO_STATS_OLD").exists(), "the older map is gone");
    let mut bans = Blocklist::new(PinnedMaps::open(dir.path()).unwrap());
    bans.ban(&"203.0.113.9".parse().unwrap(), Ttl::Forever, "", boot_ns()).unwrap();
    let ack =
        frames::tcp_v4("203.0.113.9".parse().unwrap(), "198.51.100.1".parse().unwrap(), 25, ACK);
    assert_eq!(program.test_run(&ack, 1).unwrap().0, XDP_PASS);
    let stats = bans.store().stats().expect("every counter reads");
    assert_eq!(stats[Stat::BannedNotSyn as usize], 1);
}
