//! The helo-filter kernel programs: one object, two programs sharing the ban maps, the
//! allowlist and the counters.
//!
//! `helo_xdp`, the XDP drop. For every frame on the gateway's ingress interface: parse
//! Ethernet (one 802.1Q/802.1ad tag), IPv4 or IPv6 (walking up to four extension headers) and
//! TCP. Connection-opening packets (SYN without ACK) to a guarded destination port from a
//! banned, unexpired source are dropped; everything else passes, the rest of a banned source's
//! packets included, so that the session that earned the ban (and any other one already open)
//! can end cleanly while no new one can start. A source is banned by a ban of its host, of its
//! IPv6 /64, or of a prefix of another length in use (IPv4 /24 to /31, IPv6 /48 to /127), each
//! one hash lookup. Allowlisted networks pass whatever the ban maps say. Each frame is counted
//! under exactly one verdict in a per-CPU array; nothing is logged per packet.
//!
//! `helo_steer`, the sk_lookup steering (the front door, attached to the agent's network
//! namespace): a new TCP connection to a steered address and port goes to the agent's socket
//! unless its client has a pass in force (or is allowlisted), in which case the MTA's own
//! listener gets it; with no agent socket it goes to the MTA too (fail open). The decision is in
//! `steer.rs`, the context reads in `lookup.rs`.
#![no_std]
#![no_main]

mod lookup;
mod packet;
mod steer;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, xdp_action},
    helpers::bpf_ktime_get_boot_ns,
    macros::{map, sk_lookup, xdp},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, SockMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkLookupContext, XdpContext},
};
use helo_common::{
    AGENT_SOCKETS as AGENT_SOCKET_SLOTS, BanValue, DEFAULT_MAX_BANS_V4, DEFAULT_MAX_BANS_V4_PREFIX,
    DEFAULT_MAX_BANS_V6, DEFAULT_MAX_BANS_V6_NET, DEFAULT_MAX_BANS_V6_PREFIX, DEFAULT_MAX_PASS_V4,
    DEFAULT_MAX_PASS_V6, LENGTHS_V4, LENGTHS_V6, MAX_ALLOW_ENTRIES, MAX_REASONS,
    MAX_STEER_ENDPOINTS, PORT_MAP_LEN, PREFIX_SLOTS, PassValue, PrefixV4, PrefixV6,
    REASON_TEXT_LEN, STAT_COUNT, Stat, SteerEndpoint, v6_prefix64,
};
use packet::{be16, read};

// Ban and stats maps are pinned by name so that bans and counters outlive the agent; the agent
// chooses the pin directory and may resize the ban maps before loading.
#[map(name = "HELO_BANS_V4")]
static BANS_V4: LruHashMap<[u8; 4], BanValue> = LruHashMap::pinned(DEFAULT_MAX_BANS_V4, 0);
#[map(name = "HELO_BANS_V6")]
static BANS_V6: LruHashMap<[u8; 16], BanValue> = LruHashMap::pinned(DEFAULT_MAX_BANS_V6, 0);
#[map(name = "HELO_BANS_V6N")]
static BANS_V6_NET: LruHashMap<[u8; 8], BanValue> = LruHashMap::pinned(DEFAULT_MAX_BANS_V6_NET, 0);
// Prefix bans of other lengths (IPv4 /24 to /31, IPv6 /48 to /127 but /64): one hash map per
// family keyed by (length, prefix), probed once for each length in use (`BAN_LENGTHS`), so a
// packet's cost grows with the lengths in use, never with the number of bans.
#[map(name = "HELO_BANS_V4P")]
static BANS_V4_PREFIX: LruHashMap<PrefixV4, BanValue> =
    LruHashMap::pinned(DEFAULT_MAX_BANS_V4_PREFIX, 0);
#[map(name = "HELO_BANS_V6P")]
static BANS_V6_PREFIX: LruHashMap<PrefixV6, BanValue> =
    LruHashMap::pinned(DEFAULT_MAX_BANS_V6_PREFIX, 0);
#[map(name = "HELO_BAN_LENS")]
static BAN_LENGTHS: Array<[u8; PREFIX_SLOTS]> = Array::pinned(2, 0);
#[map(name = "HELO_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);
#[map(name = "HELO_REASONS")]
static REASONS: HashMap<u32, [u8; REASON_TEXT_LEN]> = HashMap::pinned(MAX_REASONS, 0);
// Passes outlive the agent as bans do: a returning sender goes straight to the MTA across
// restarts.
#[map(name = "HELO_PASS_V4")]
static PASS_V4: LruHashMap<[u8; 4], PassValue> = LruHashMap::pinned(DEFAULT_MAX_PASS_V4, 0);
#[map(name = "HELO_PASS_V6")]
static PASS_V6: LruHashMap<[u8; 16], PassValue> = LruHashMap::pinned(DEFAULT_MAX_PASS_V6, 0);

// Configuration maps: written by the agent from its config at every start, so not pinned.
#[map(name = "HELO_ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);
#[map(name = "HELO_ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);
#[map(name = "HELO_PORTS")]
static PORTS: Array<u8> = Array::with_max_entries(PORT_MAP_LEN, 0);
#[map(name = "HELO_STEER")]
static STEER: HashMap<SteerEndpoint, u8> = HashMap::with_max_entries(MAX_STEER_ENDPOINTS, 0);
// Not pinned either: the agent's sockets belong to the program its start loaded, so swapping
// the program into the pinned link hands the steered endpoints and the new agent's sockets over
// in one step, and the old agent's sockets go with the old program.
#[map(name = "HELO_AGENT_SK")]
static AGENT_SOCKETS: SockMap = SockMap::with_max_entries(AGENT_SOCKET_SLOTS, 0);

// `#[map(name = ...)]` takes only a literal. helo-common owns the names the agent opens the maps
// by; every literal above is checked against it here, at compile time.
const _: () = {
    use helo_common::maps;
    assert!(same(maps::BANS_V4, "HELO_BANS_V4"));
    assert!(same(maps::BANS_V6, "HELO_BANS_V6"));
    assert!(same(maps::BANS_V6_NET, "HELO_BANS_V6N"));
    assert!(same(maps::BANS_V4_PREFIX, "HELO_BANS_V4P"));
    assert!(same(maps::BANS_V6_PREFIX, "HELO_BANS_V6P"));
    assert!(same(maps::BAN_LENGTHS, "HELO_BAN_LENS"));
    assert!(same(maps::STATS, "HELO_STATS"));
    assert!(same(maps::REASONS, "HELO_REASONS"));
    assert!(same(maps::ALLOW_V4, "HELO_ALLOW_V4"));
    assert!(same(maps::ALLOW_V6, "HELO_ALLOW_V6"));
    assert!(same(maps::PORTS, "HELO_PORTS"));
    assert!(same(maps::PASS_V4, "HELO_PASS_V4"));
    assert!(same(maps::PASS_V6, "HELO_PASS_V6"));
    assert!(same(maps::STEER, "HELO_STEER"));
    assert!(same(maps::AGENT_SOCKETS, "HELO_AGENT_SK"));
    assert!(same(helo_common::PROGRAM_NAME, "helo_xdp"));
    assert!(same(helo_common::STEER_PROGRAM_NAME, "helo_steer"));
};

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const ETH_HDR_LEN: usize = 14;
const VLAN_HDR_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const IPV6_HDR_LEN: usize = 40;
const IPV6_EXT_HOP_BY_HOP: u8 = 0;
const IPV6_EXT_ROUTING: u8 = 43;
const IPV6_EXT_FRAGMENT: u8 = 44;
const IPV6_EXT_DEST_OPTS: u8 = 60;
const IPV6_MAX_EXT_HEADERS: usize = 4;

#[xdp]
pub fn helo_xdp(ctx: XdpContext) -> u32 {
    let stat = match try_helo_xdp(&ctx) {
        Ok(stat) => stat,
        // Fail open: a frame we cannot parse is passed to the stack, never dropped. Dropping on
        // a parser gap would silently cut mail; the kernel's own stack rejects real garbage, and
        // the parse_error counter makes the gap visible.
        Err(ParseError) => Stat::ParseError,
    };
    count(stat);
    match stat {
        Stat::Dropped => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[sk_lookup]
pub fn helo_steer(ctx: SkLookupContext) -> u32 {
    if let Some(stat) = steer::try_helo_steer(&ctx) {
        count(stat);
    }
    // Fail open, always: `SK_PASS` delivers the connection to the socket the decision
    // selected (the agent's), or, with none selected, lets the kernel's regular lookup find the
    // MTA's listener. `SK_DROP` (0) would refuse the connection: this program never refuses one.
    SK_PASS
}

/// The frame is shorter than its headers say, or a header is malformed.
struct ParseError;

#[inline(always)]
fn try_helo_xdp(ctx: &XdpContext) -> Result<Stat, ParseError> {
    let mut offset = ETH_HDR_LEN;
    let mut ether_type = be16(read::<2>(ctx, 12).ok_or(ParseError)?);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        // One tag: TCI (2 bytes), then the encapsulated EtherType.
        ether_type = be16(read::<2>(ctx, ETH_HDR_LEN + 2).ok_or(ParseError)?);
        offset += VLAN_HDR_LEN;
    }
    match ether_type {
        ETH_P_IPV4 => ipv4(ctx, offset),
        ETH_P_IPV6 => ipv6(ctx, offset),
        _ => Ok(Stat::NotGuarded),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Result<Stat, ParseError> {
    let hdr = read::<20>(ctx, offset).ok_or(ParseError)?;
    let version = hdr[0] >> 4;
    let header_len = ((hdr[0] & 0x0f) as usize) * 4;
    if version != 4 || header_len < 20 {
        return Err(ParseError);
    }
    if hdr[9] != IPPROTO_TCP {
        return Ok(Stat::NotGuarded);
    }
    // Only the first fragment carries the TCP ports.
    let fragment_offset = be16([hdr[6], hdr[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Ok(Stat::NotGuarded);
    }
    let tcp = offset + header_len;
    if !guarded(tcp_dest_port(ctx, tcp)?) {
        return Ok(Stat::NotGuarded);
    }
    let source = [hdr[12], hdr[13], hdr[14], hdr[15]];
    if ALLOW_V4.get(Key::new(32, source)).is_some() {
        return Ok(Stat::Allowlisted);
    }
    let mut expired = false;
    if let Some(ban) = BANS_V4.get_ptr_mut(source) {
        // SAFETY: `ban` is what the lookup just returned.
        match unsafe { judge(ctx, tcp, ban) }? {
            Judgement::Banned(stat) => return Ok(stat),
            Judgement::Expired => {
                let _ = BANS_V4.remove(source);
                expired = true;
                // A prefix ban may still cover the host: on to them.
            }
        }
    }
    let lengths = lengths(LENGTHS_V4);
    if u64::from_ne_bytes(lengths) == 0 {
        return Ok(if expired { Stat::ExpiredPass } else { Stat::Passed });
    }
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut hit = None;
    // The length of an expired ban met (0: none). A length, not an `Option` of the key: the
    // payload of a `None` is undefined, and LLVM may spill it from a register the verifier
    // holds unread.
    let mut stale = 0u8;
    for &len in lengths.iter() {
        if len == 0 {
            continue;
        }
        if let Some(ban) = BANS_V4_PREFIX.get_ptr_mut(PrefixV4::new(source, len)) {
            // SAFETY: `ban` is what the lookup just returned.
            if unsafe { (*ban).expires_ns } > now {
                hit = Some(ban);
                break;
            }
            stale = len;
        }
    }
    if stale != 0 {
        // One expired prefix ban goes per packet; the others when their sources come back.
        let _ = BANS_V4_PREFIX.remove(PrefixV4::new(source, stale));
        expired = true;
    }
    if let Some(ban) = hit {
        // SAFETY: `ban` is what a lookup returned in this run.
        if let Judgement::Banned(stat) = unsafe { judge(ctx, tcp, ban) }? {
            return Ok(stat);
        }
    }
    Ok(if expired { Stat::ExpiredPass } else { Stat::Passed })
}

/// The prefix lengths the prefix ban maps of a family hold bans of (zero bytes: unused
/// slots), from the lengths map's entry `family` ([`LENGTHS_V4`] or [`LENGTHS_V6`]).
#[inline(always)]
fn lengths(family: u32) -> [u8; PREFIX_SLOTS] {
    BAN_LENGTHS.get(family).copied().unwrap_or([0; PREFIX_SLOTS])
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Result<Stat, ParseError> {
    let hdr = read::<IPV6_HDR_LEN>(ctx, offset).ok_or(ParseError)?;
    if hdr[0] >> 4 != 6 {
        return Err(ParseError);
    }
    let mut next = hdr[6];
    let mut transport = offset + IPV6_HDR_LEN;
    // Walk a bounded chain of extension headers so that a hop-by-hop or destination-options
    // header cannot smuggle a banned source past the filter.
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS => {
                let ext = read::<2>(ctx, transport).ok_or(ParseError)?;
                next = ext[0];
                transport += (ext[1] as usize + 1) * 8;
            }
            IPV6_EXT_FRAGMENT => {
                let ext = read::<8>(ctx, transport).ok_or(ParseError)?;
                if be16([ext[2], ext[3]]) >> 3 != 0 {
                    // Not the first fragment: no ports to look at.
                    return Ok(Stat::NotGuarded);
                }
                next = ext[0];
                transport += 8;
            }
            _ => return Ok(Stat::NotGuarded),
        }
    }
    if next != IPPROTO_TCP {
        // More extension headers than any real SMTP client sends.
        return Err(ParseError);
    }
    if !guarded(tcp_dest_port(ctx, transport)?) {
        return Ok(Stat::NotGuarded);
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&hdr[8..24]);
    if ALLOW_V6.get(Key::new(128, source)).is_some() {
        return Ok(Stat::Allowlisted);
    }
    let mut expired_host = false;
    if let Some(ban) = BANS_V6.get_ptr_mut(source) {
        // SAFETY: `ban` is what the lookup just returned.
        match unsafe { judge(ctx, transport, ban) }? {
            Judgement::Banned(stat) => return Ok(stat),
            Judgement::Expired => {
                let _ = BANS_V6.remove(source);
                // A prefix ban may still cover the host: on to them.
                expired_host = true;
            }
        }
    }
    let mut expired = expired_host;
    let prefix = v6_prefix64(&source);
    if let Some(ban) = BANS_V6_NET.get_ptr_mut(prefix) {
        // SAFETY: `ban` is what the lookup just returned.
        match unsafe { judge(ctx, transport, ban) }? {
            Judgement::Banned(stat) => return Ok(stat),
            Judgement::Expired => {
                let _ = BANS_V6_NET.remove(prefix);
                expired = true;
            }
        }
    }
    let lengths = lengths(LENGTHS_V6);
    if u64::from_ne_bytes(lengths) == 0 {
        return Ok(if expired { Stat::ExpiredPass } else { Stat::Passed });
    }
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut hit = None;
    // The length of an expired ban met (0: none). A length, not an `Option` of the key: the
    // payload of a `None` is undefined, and LLVM may spill it from a register the verifier
    // holds unread.
    let mut stale = 0u8;
    for &len in lengths.iter() {
        if len == 0 {
            continue;
        }
        if let Some(ban) = BANS_V6_PREFIX.get_ptr_mut(PrefixV6::new(source, len)) {
            // SAFETY: `ban` is what the lookup just returned.
            if unsafe { (*ban).expires_ns } > now {
                hit = Some(ban);
                break;
            }
            stale = len;
        }
    }
    if stale != 0 {
        // One expired prefix ban goes per packet; the others when their sources come back.
        let _ = BANS_V6_PREFIX.remove(PrefixV6::new(source, stale));
        expired = true;
    }
    if let Some(ban) = hit {
        // SAFETY: `ban` is what a lookup returned in this run.
        if let Judgement::Banned(stat) = unsafe { judge(ctx, transport, ban) }? {
            return Ok(stat);
        }
    }
    Ok(if expired { Stat::ExpiredPass } else { Stat::Passed })
}

#[inline(always)]
fn tcp_dest_port(ctx: &XdpContext, offset: usize) -> Result<u16, ParseError> {
    // Source port (2 bytes), destination port (2 bytes).
    let ports = read::<4>(ctx, offset).ok_or(ParseError)?;
    Ok(be16([ports[2], ports[3]]))
}

#[inline(always)]
fn guarded(port: u16) -> bool {
    matches!(PORTS.get(port as u32), Some(flag) if *flag != 0)
}

enum Judgement {
    /// The ban is in force: [`Stat::Dropped`] or [`Stat::BannedNotSyn`].
    Banned(Stat),
    /// The ban has expired: the caller removes it and passes the packet.
    Expired,
}

/// The verdict for a packet from a source with a ban: dropped when the ban is in force and the
/// packet opens a connection (SYN without ACK), counted as a hit of the ban; any other packet
/// passes, so that connections already open (the session that earned the ban among them) can
/// end. The TCP flags are read only here, for banned sources; `tcp` is the TCP header's offset.
///
/// # Safety
///
/// `ban` must come from a successful lookup in one of the ban maps during this program run.
#[inline(always)]
unsafe fn judge(ctx: &XdpContext, tcp: usize, ban: *mut BanValue) -> Result<Judgement, ParseError> {
    // SAFETY: per the contract, `ban` points at a live value of the map for the rest of this
    // program run (RCU); LRU eviction may recycle it, in which case we read another ban's
    // fields, which is harmless for a drop decision.
    let expires_ns = unsafe { (*ban).expires_ns };
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if expires_ns <= now {
        return Ok(Judgement::Expired);
    }
    let [flags] = read::<1>(ctx, tcp + TCP_FLAGS_OFFSET).ok_or(ParseError)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(Judgement::Banned(Stat::BannedNotSyn));
    }
    // SAFETY: as above; `hits` is a u64 inside the value. `core` has no atomic
    // read-modify-write for the BPF target, so two CPUs dropping for the same source at the
    // same instant may lose an increment: `hits` is an approximate count, documented so.
    unsafe { (*ban).hits = (*ban).hits.wrapping_add(1) };
    Ok(Judgement::Banned(Stat::Dropped))
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of a successful lookup, so no other CPU writes it. Both programs
        // run on the receive path in softirq context, where one does not interrupt the other
        // on its CPU; a test run (process context) could lose an increment to a packet arriving
        // on its CPU, which a counter tolerates.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
