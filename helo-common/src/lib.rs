//! Types shared by the XDP program (`helo-ebpf`) and the agent (`helo-agent`).
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
}

/// The program's entry point name in the object file.
pub const PROGRAM_NAME: &str = "helo_xdp";

/// Destination ports guarded by default: SMTP, SMTPS (implicit TLS submission) and submission.
pub const DEFAULT_PORTS: [u16; 3] = [25, 465, 587];

/// Default capacities. The ban maps are LRU: when full, the least recently used ban goes.
pub const DEFAULT_MAX_BANS_V4: u32 = 262_144;
pub const DEFAULT_MAX_BANS_V6: u32 = 131_072;
pub const DEFAULT_MAX_BANS_V6_NET: u32 = 65_536;
pub const MAX_ALLOW_ENTRIES: u32 = 4_096;
pub const MAX_REASONS: u32 = 4_096;
/// Number of entries in the port map: one per TCP port.
pub const PORT_MAP_LEN: u32 = 65_536;

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

/// Verdict counters: indices of the per-CPU stats array. Every packet the program sees is counted
/// under exactly one of them.
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
}

/// Entries of the stats map. A pinned stats map of another size was left by another version;
/// the agent replaces it (the counters start from zero).
pub const STAT_COUNT: u32 = 7;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Passed,
        Stat::Dropped,
        Stat::ExpiredPass,
        Stat::Allowlisted,
        Stat::NotGuarded,
        Stat::ParseError,
        Stat::BannedNotSyn,
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
        }
    }
}

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
            maps::ALLOW_V4,
            maps::ALLOW_V6,
            maps::PORTS,
            maps::STATS,
            maps::REASONS,
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
    fn prefix64_takes_the_network_half() {
        let addr = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(v6_prefix64(&addr), [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
    }
}
