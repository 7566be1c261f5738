//! Types shared by the kernel programs (`helo-ebpf`: the XDP drop and the sk_lookup steering)
//! and the agent (`helo-agent`).
//!
//! Both sides must agree byte for byte on map names, keys and values, so they live here, once.
//! Every value type is `#[repr(C)]`, `Copy` and free of padding, with a compile-time size check;
//! keys are plain byte arrays in network byte order, so no endianness conversion happens on
//! the per-packet path.
#![no_std]

use core::mem::size_of;

/// Map names as they appear in the eBPF object and under the pin directory.
/// The kernel keeps at most 15 characters of a map name.
pub mod maps {
    /// `LRU_HASH<[u8; 4], BanValue>`: banned IPv4 hosts.
    pub const BANS_V4: &str = "HELO_BANS_V4";
    /// `LRU_HASH<[u8; 16], BanValue>`: banned IPv6 hosts.
    pub const BANS_V6: &str = "HELO_BANS_V6";
    /// `LRU_HASH<[u8; 8], BanValue>`: banned IPv6 /64 prefixes (the first 8 bytes).
    pub const BANS_V6_NET: &str = "HELO_BANS_V6N";
    /// `LRU_HASH<PrefixV4, BanValue>`: banned IPv4 prefixes, /24 to /31.
    pub const BANS_V4_PREFIX: &str = "HELO_BANS_V4P";
    /// `LRU_HASH<PrefixV6, BanValue>`: banned IPv6 prefixes of other lengths than /64, /48 to
    /// /127.
    pub const BANS_V6_PREFIX: &str = "HELO_BANS_V6P";
    /// `ARRAY<[u8; PREFIX_SLOTS]>` of two entries ([`super::LENGTHS_V4`],
    /// [`super::LENGTHS_V6`]): the prefix lengths the prefix ban maps hold bans of, one per
    /// non-zero byte. The programs probe the prefix maps for these lengths only.
    pub const BAN_LENGTHS: &str = "HELO_BAN_LENS";
    /// `LPM_TRIE<[u8; 4], u8>`: IPv4 networks that are never dropped.
    pub const ALLOW_V4: &str = "HELO_ALLOW_V4";
    /// `LPM_TRIE<[u8; 16], u8>`: IPv6 networks that are never dropped.
    pub const ALLOW_V6: &str = "HELO_ALLOW_V6";
    /// `ARRAY<u8>` indexed by TCP destination port (host order): non-zero means guarded.
    pub const PORTS: &str = "HELO_PORTS";
    /// `PERCPU_ARRAY<u64>` indexed by [`super::Stat`].
    pub const STATS: &str = "HELO_STATS";
    /// `HASH<u32, [u8; REASON_TEXT_LEN]>`: ban reason texts by reason code. Written and read by
    /// user space only; the kernel carries the code.
    pub const REASONS: &str = "HELO_REASONS";
    /// `LRU_HASH<[u8; 4], PassValue>`: IPv4 clients that go straight to the MTA (steering).
    pub const PASS_V4: &str = "HELO_PASS_V4";
    /// `LRU_HASH<[u8; 16], PassValue>`: IPv6 clients that go straight to the MTA (steering).
    pub const PASS_V6: &str = "HELO_PASS_V6";
    /// `HASH<SteerEndpoint, u8>`: the local addresses and ports whose new TCP connections the
    /// sk_lookup program steers (non-zero value). Written from the config at every start.
    pub const STEER: &str = "HELO_STEER";
    /// `SOCKMAP` of [`super::AGENT_SOCKETS`] slots: the agent's listening socket for IPv4
    /// lookups ([`super::AGENT_SOCKET_V4`]) and for IPv6 ones ([`super::AGENT_SOCKET_V6`]).
    pub const AGENT_SOCKETS: &str = "HELO_AGENT_SK";
}

/// The XDP program's entry point name in the object file.
pub const PROGRAM_NAME: &str = "helo_xdp";

/// The sk_lookup (steering) program's entry point name in the same object.
pub const STEER_PROGRAM_NAME: &str = "helo_steer";

/// Destination ports guarded by default: SMTP, SMTPS (implicit TLS submission) and submission.
pub const DEFAULT_PORTS: [u16; 3] = [25, 465, 587];

/// Default capacities. The ban maps are LRU: when full, the least recently used ban goes.
pub const DEFAULT_MAX_BANS_V4: u32 = 262_144;
pub const DEFAULT_MAX_BANS_V6: u32 = 65_536;
pub const DEFAULT_MAX_BANS_V6_NET: u32 = 262_144;
pub const DEFAULT_MAX_BANS_V4_PREFIX: u32 = 65_536;
pub const DEFAULT_MAX_BANS_V6_PREFIX: u32 = 65_536;

/// Prefix lengths of each family the prefix ban maps may hold bans of at once: each costs a
/// packet from that family one more lookup.
pub const PREFIX_SLOTS: usize = 8;
// The programs read the slots as one u64 to see whether any is in use.
const _: () = assert!(PREFIX_SLOTS == 8);
/// Entry of the lengths map ([`maps::BAN_LENGTHS`]) for IPv4 prefixes.
pub const LENGTHS_V4: u32 = 0;
/// Entry of the lengths map for IPv6 prefixes.
pub const LENGTHS_V6: u32 = 1;
pub const MAX_ALLOW_ENTRIES: u32 = 4_096;
pub const MAX_REASONS: u32 = 4_096;
/// Number of entries in the port map: one per TCP port.
pub const PORT_MAP_LEN: u32 = 65_536;
/// Capacities of the pass maps (LRU: when full, the least recently used pass goes, and that
/// client is judged again, which is safe).
pub const DEFAULT_MAX_PASS_V4: u32 = 65_536;
pub const DEFAULT_MAX_PASS_V6: u32 = 32_768;
/// Steered endpoints (address and port pairs) the steering map holds.
pub const MAX_STEER_ENDPOINTS: u32 = 64;

/// Slot of the agent's socket for IPv4 lookups in the agent sockets map. An IPv4 lookup can
/// only be given an `AF_INET` socket (or a dual-stack `AF_INET6` one), so each family has its own.
pub const AGENT_SOCKET_V4: u32 = 0;
/// Slot of the agent's socket for IPv6 lookups (an `AF_INET6` socket).
pub const AGENT_SOCKET_V6: u32 = 1;
/// Slots of the agent sockets map.
pub const AGENT_SOCKETS: u32 = 2;

/// Bytes of reason text kept per reason code (NUL padded, UTF-8, cut at a char boundary).
pub const REASON_TEXT_LEN: usize = 64;

/// `expires_ns` of a ban that never expires.
pub const NEVER_EXPIRES: u64 = u64::MAX;

/// The value of every ban map entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanValue {
    /// The instant the ban ends, in CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns()`).
    pub expires_ns: u64,
    /// Packets dropped because of this ban; incremented by the kernel.
    pub hits: u64,
    /// Reason code: a key of the reasons map (0: none given).
    pub reason: u32,
    /// Reserved, zero. Keeps the struct free of implicit padding.
    pub flags: u32,
}

const _: () = assert!(size_of::<BanValue>() == 24);

impl BanValue {
    pub const fn new(expires_ns: u64, reason: u32) -> Self {
        Self { expires_ns, hits: 0, reason, flags: 0 }
    }

    /// Whether the ban is still in force at `now_ns` (CLOCK_BOOTTIME).
    #[inline(always)]
    pub const fn active_at(&self, now_ns: u64) -> bool {
        self.expires_ns > now_ns
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code, reason = "aya reads map values as plain bytes: `Pod` is its promise")]
// SAFETY: `BanValue` is `#[repr(C)]`, `Copy`, made only of integers and has no padding (size
// asserted above), so every bit pattern is a valid value.
unsafe impl aya::Pod for BanValue {}

/// The value of every pass map entry: the client goes straight to the MTA until `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassValue {
    /// The instant the pass ends, in CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns()`).
    pub expires_ns: u64,
    /// Connections passed straight to the MTA on this entry; incremented by the kernel, and
    /// approximate as a ban's `hits` are (no atomic add on the BPF target in `core`).
    pub hits: u64,
}

const _: () = assert!(size_of::<PassValue>() == 16);

impl PassValue {
    pub const fn new(expires_ns: u64) -> Self {
        Self { expires_ns, hits: 0 }
    }

    /// Whether the pass still holds at `now_ns` (CLOCK_BOOTTIME).
    #[inline(always)]
    pub const fn active_at(&self, now_ns: u64) -> bool {
        self.expires_ns > now_ns
    }
}

#[cfg(feature = "user")]
// SAFETY: `PassValue` is `#[repr(C)]`, `Copy`, two u64 and no padding (size asserted above), so
// every bit pattern is a valid value.
#[allow(unsafe_code, reason = "aya reads map values as plain bytes: `Pod` is its promise")]
unsafe impl aya::Pod for PassValue {}

/// The key of the steering map: a local address and TCP port whose new connections are steered.
/// An IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`), so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SteerEndpoint {
    /// The IPv6 address, or the IPv4-mapped IPv4 address, in network byte order.
    pub addr: [u8; 16],
    /// The TCP port, in network byte order.
    pub port: [u8; 2],
    /// Reserved, zero. Keeps the key free of implicit padding (and so of random key bytes).
    pub reserved: [u8; 2],
}

const _: () = assert!(size_of::<SteerEndpoint>() == 20);

impl SteerEndpoint {
    /// The key for IPv4 address `addr` (network order) and port `port` (host order).
    #[inline(always)]
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = addr;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
            port: port.to_be_bytes(),
            reserved: [0; 2],
        }
    }

    /// The key for IPv6 address `addr` (network order) and port `port` (host order).
    #[inline(always)]
    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port: port.to_be_bytes(), reserved: [0; 2] }
    }
}

#[cfg(feature = "user")]
// SAFETY: `SteerEndpoint` is `#[repr(C)]`, `Copy`, byte arrays only, no padding (size asserted
// above), so every bit pattern is a valid value.
#[allow(unsafe_code, reason = "aya reads map values as plain bytes: `Pod` is its promise")]
unsafe impl aya::Pod for SteerEndpoint {}

/// Verdict counters: indices of the per-CPU stats array, shared by both programs. The XDP
/// program counts every frame it sees under exactly one of [`Stat::XDP`]; the steering program
/// counts every lookup for a steered endpoint under exactly one of [`Stat::STEER`] (lookups for
/// other addresses and ports are not its business and are not counted).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// TCP to a guarded port from a source that is not banned.
    Passed = 0,
    /// Dropped: a connection-opening packet (TCP SYN without ACK) from a source whose ban has
    /// not expired. Only these count as the ban's `hits`.
    Dropped = 1,
    /// The source had a ban that has expired: passed, and the entry removed.
    ExpiredPass = 2,
    /// The source is in an allowlisted network: passed, whatever the ban maps say.
    Allowlisted = 3,
    /// Not TCP to a guarded port (other ports, UDP, ARP, non-first fragments): passed untouched.
    NotGuarded = 4,
    /// The frame could not be parsed (truncated, bad header lengths): passed (fail open).
    ParseError = 5,
    /// Any other TCP packet (ACK, FIN, RST, data, SYN|ACK) from a source whose ban has not
    /// expired: passed, so a session open when the ban came (the one that earned it) can end
    /// cleanly. A banned source can open no new connection.
    BannedNotSyn = 6,
    /// Steering: a new connection to a steered endpoint from a client without a pass in force
    /// (a stranger, or a pass that expired: the kernel removes it) was given to the agent.
    Steered = 7,
    /// Steering: the client's pass is in force: straight to the MTA's own listener.
    SteerPassed = 8,
    /// Steering: the client is in an allowlisted network: straight to the MTA, never judged.
    SteerAllowlisted = 9,
    /// Steering: the client has a ban in force (XDP did not drop its SYN: not attached, or not
    /// on this path) and was given to the agent whatever its pass says.
    SteerBanned = 10,
    /// Steering: no agent socket for the family (the agent is down): the MTA's listener gets
    /// the connection (fail open).
    SteerNoAgent = 11,
    /// Steering: the kernel refused the agent's socket (not listening, or of the wrong family):
    /// the MTA's listener gets the connection (fail open).
    SteerError = 12,
}

/// Entries of the stats map. A pinned stats map of another size was left by another version;
/// the agent replaces it (the counters start from zero).
pub const STAT_COUNT: u32 = 13;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Passed,
        Stat::Dropped,
        Stat::ExpiredPass,
        Stat::Allowlisted,
        Stat::NotGuarded,
        Stat::ParseError,
        Stat::BannedNotSyn,
        Stat::Steered,
        Stat::SteerPassed,
        Stat::SteerAllowlisted,
        Stat::SteerBanned,
        Stat::SteerNoAgent,
        Stat::SteerError,
    ];

    /// The XDP program's verdicts: every frame it sees is counted under exactly one.
    pub const XDP: [Stat; 7] = [
        Stat::Passed,
        Stat::Dropped,
        Stat::ExpiredPass,
        Stat::Allowlisted,
        Stat::NotGuarded,
        Stat::ParseError,
        Stat::BannedNotSyn,
    ];

    /// The steering program's outcomes: every lookup for a steered endpoint is counted under
    /// exactly one.
    pub const STEER: [Stat; 6] = [
        Stat::Steered,
        Stat::SteerPassed,
        Stat::SteerAllowlisted,
        Stat::SteerBanned,
        Stat::SteerNoAgent,
        Stat::SteerError,
    ];

    /// Stable snake_case name, used in `helo-agent stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Passed => "passed",
            Stat::Dropped => "dropped",
            Stat::ExpiredPass => "expired_pass",
            Stat::Allowlisted => "allowlisted",
            Stat::NotGuarded => "not_guarded",
            Stat::ParseError => "parse_error",
            Stat::BannedNotSyn => "banned_not_syn",
            Stat::Steered => "steered",
            Stat::SteerPassed => "steer_passed",
            Stat::SteerAllowlisted => "steer_allowed",
            Stat::SteerBanned => "steer_banned",
            Stat::SteerNoAgent => "steer_no_agent",
            Stat::SteerError => "steer_error",
        }
    }
}

/// The key of the IPv4 prefix ban map: a prefix length and the address with the host bits
/// cleared (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixV4 {
    pub len: u32,
    pub addr: [u8; 4],
}

const _: () = assert!(size_of::<PrefixV4>() == 8);

impl PrefixV4 {
    /// The `len`-bit prefix of `addr`.
    #[inline(always)]
    pub fn new(addr: [u8; 4], len: u8) -> Self {
        let len = len as u32;
        // One shift, no loop: the verifier walks every branch of a loop once per path.
        let mask = u32::MAX.checked_shl(32u32.saturating_sub(len)).unwrap_or(0);
        let addr = (u32::from_be_bytes(addr) & mask).to_be_bytes();
        PrefixV4 { len, addr }
    }
}

/// The key of the IPv6 prefix ban map (lengths other than /64): a prefix length and the
/// address with the host bits cleared (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixV6 {
    pub len: u32,
    pub addr: [u8; 16],
}

const _: () = assert!(size_of::<PrefixV6>() == 20);

impl PrefixV6 {
    /// The `len`-bit prefix of `addr`: two 64-bit halves (the BPF target has no 128-bit
    /// shift), a shift each, no loop.
    #[inline(always)]
    pub fn new(addr: [u8; 16], len: u8) -> Self {
        let len = len as u32;
        let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = addr;
        let high = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let low = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        let high_mask = u64::MAX.checked_shl(64u32.saturating_sub(len)).unwrap_or(0);
        let low_mask = match len {
            0..=64 => 0,
            _ => u64::MAX.checked_shl(128u32.saturating_sub(len)).unwrap_or(0),
        };
        let [a0, a1, a2, a3, a4, a5, a6, a7] = (high & high_mask).to_be_bytes();
        let [b0, b1, b2, b3, b4, b5, b6, b7] = (low & low_mask).to_be_bytes();
        let addr = [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7];
        PrefixV6 { len, addr }
    }
}

#[cfg(feature = "user")]
// SAFETY: `PrefixV4` and `PrefixV6` are `#[repr(C)]`, `Copy`, integers and byte arrays without
// padding (sizes asserted above), so every bit pattern is a valid value.
#[allow(unsafe_code, reason = "aya reads map keys as plain bytes: `Pod` is its promise")]
unsafe impl aya::Pod for PrefixV4 {}
#[cfg(feature = "user")]
// SAFETY: as above.
#[allow(unsafe_code, reason = "aya reads map keys as plain bytes: `Pod` is its promise")]
unsafe impl aya::Pod for PrefixV6 {}

/// The key of the IPv6 prefix ban map: the /64 network part of an address.
#[inline(always)]
pub fn v6_prefix64(addr: &[u8; 16]) -> [u8; 8] {
    [addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7]]
}

/// FNV-1a, 32 bits: the reason code of a reason text. Equal texts share one code, so writers
/// never race for slots.
pub const fn reason_code(text: &[u8]) -> u32 {
    if text.is_empty() {
        return 0;
    }
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < text.len() {
        hash ^= text[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    // 0 means "no reason"; keep it free.
    if hash == 0 { 1 } else { hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            maps::BANS_V4,
            maps::BANS_V6,
            maps::BANS_V6_NET,
            maps::BANS_V4_PREFIX,
            maps::BANS_V6_PREFIX,
            maps::BAN_LENGTHS,
            maps::ALLOW_V4,
            maps::ALLOW_V6,
            maps::PORTS,
            maps::STATS,
            maps::REASONS,
            maps::PASS_V4,
            maps::PASS_V6,
            maps::STEER,
            maps::AGENT_SOCKETS,
        ] {
            assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN - 1");
        }
    }

    #[test]
    fn stat_indices_are_dense_and_match_all() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i);
        }
    }

    #[test]
    fn the_two_programs_counters_split_all_of_them() {
        let mut both: [Option<Stat>; STAT_COUNT as usize] = [None; STAT_COUNT as usize];
        for stat in Stat::XDP.into_iter().chain(Stat::STEER) {
            assert!(both[stat as usize].is_none(), "{stat:?} is in both programs' sets");
            both[stat as usize] = Some(stat);
        }
        assert_eq!(both.map(Option::unwrap), Stat::ALL);
    }

    #[test]
    fn counter_names_fit_the_stats_column() {
        // `helo-agent stats` prints names in a 14-character column.
        for stat in Stat::ALL {
            assert!(stat.name().len() <= 14, "{} is too long", stat.name());
        }
    }

    #[test]
    fn pass_holds_until_its_expiry() {
        let pass = PassValue::new(1_000);
        assert!(pass.active_at(999));
        assert!(!pass.active_at(1_000));
    }

    #[test]
    fn steer_endpoints_map_ipv4_and_keep_network_order() {
        let v4 = SteerEndpoint::v4([203, 0, 113, 5], 25);
        assert_eq!(v4.addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 5]);
        assert_eq!(v4.port, [0, 25]);
        let v6 = SteerEndpoint::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], 587);
        assert_eq!(v6.port, [0x02, 0x4b]);
        assert_eq!(v6.reserved, [0, 0]);
    }

    #[test]
    fn reason_codes_are_stable_and_never_zero_for_text() {
        assert_eq!(reason_code(b""), 0);
        assert_eq!(reason_code(b"forged helo"), reason_code(b"forged helo"));
        assert_ne!(reason_code(b"forged helo"), reason_code(b"bare ip"));
        assert_ne!(reason_code(b"a"), 0);
    }

    #[test]
    fn ban_is_active_until_its_expiry() {
        let ban = BanValue::new(1_000, 0);
        assert!(ban.active_at(999));
        assert!(!ban.active_at(1_000));
        assert!(BanValue::new(NEVER_EXPIRES, 0).active_at(u64::MAX - 1));
    }

    #[test]
    fn prefix_keys_clear_the_host_bits() {
        assert_eq!(PrefixV4::new([192, 0, 2, 77], 24), PrefixV4 { len: 24, addr: [192, 0, 2, 0] });
        assert_eq!(PrefixV4::new([192, 0, 2, 77], 28).addr, [192, 0, 2, 64]);
        assert_eq!(PrefixV4::new([192, 0, 2, 77], 32).addr, [192, 0, 2, 77]);
        let addr = [0x20, 0x01, 0x0d, 0xb8, 0xab, 0xcd, 0xef, 0x12, 9, 9, 9, 9, 9, 9, 9, 9];
        let p48 = PrefixV6::new(addr, 48);
        assert_eq!(p48.len, 48);
        assert_eq!(p48.addr, [0x20, 0x01, 0x0d, 0xb8, 0xab, 0xcd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PrefixV6::new(addr, 60).addr[6..9], [0xef, 0x10, 0]);
        assert_eq!(PrefixV6::new(addr, 52).addr[6..8], [0xe0, 0]);
        assert_eq!(PrefixV6::new(addr, 127).addr[15], 8);
        assert_eq!(PrefixV6::new(addr, 64).addr[7..], [0x12, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PrefixV6::new(addr, 128).addr, addr);
        assert_eq!(PrefixV6::new(addr, 0).addr, [0; 16]);
        assert_eq!(PrefixV4::new([192, 0, 2, 77], 0).addr, [0; 4]);
    }

    #[test]
    fn prefix64_takes_the_network_half() {
        let addr = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(v6_prefix64(&addr), [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
    }
}
