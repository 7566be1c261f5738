//! The steering decision of the sk_lookup program: which listening socket a new TCP
//! connection to a steered endpoint goes to.
//!
//! In order, for a connection to an address and port in the steering map:
//! 1. a client in an allowlisted network goes straight to the MTA (it is never judged, as XDP
//!    never drops it);
//! 2. a client with a ban in force (of its host, its /64 or a prefix of a length in use, as
//!    XDP looks them up) goes to the agent, whatever its pass says: XDP normally
//!    drops its SYN first, so it gets here only when XDP is not on its path (not attached, or
//!    another interface), and the agent then refuses it at accept;
//! 3. a client with a pass in force goes straight to the MTA, and the pass counts the hit; an
//!    expired pass is removed;
//! 4. everyone else goes to the agent's socket for the family, exactly that socket (never
//!    another member of its reuseport group, which may be an old agent's during an upgrade);
//!    when there is none (the agent is down) or the kernel refuses it, to the MTA: fail open.
//!
//! "Straight to the MTA" is the kernel's regular lookup: the program selects no socket and
//! returns `SK_PASS`. Connections to any other address or port are not looked at.

use aya_ebpf::{
    bindings::BPF_SK_LOOKUP_F_NO_REUSEPORT, helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key,
    programs::SkLookupContext,
};
use helo_common::{
    AGENT_SOCKET_V4, AGENT_SOCKET_V6, BanValue, LENGTHS_V4, LENGTHS_V6, PassValue, PrefixV4,
    PrefixV6, Stat, SteerEndpoint, v6_prefix64,
};

use crate::{
    AGENT_SOCKETS, ALLOW_V4, ALLOW_V6, BANS_V4, BANS_V4_PREFIX, BANS_V6, BANS_V6_NET,
    BANS_V6_PREFIX, PASS_V4, PASS_V6, STEER, lengths, lookup,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
/// `-ENOENT` from the agent sockets map: the slot is empty.
const NO_SOCKET: i32 = -2;

/// Who the client is, as far as steering goes.
enum Client {
    Allowlisted,
    Banned,
    Passed,
    Stranger,
}

/// The outcome for this lookup, or `None` when it is not for a steered endpoint.
#[inline(always)]
pub fn try_helo_steer(ctx: &SkLookupContext) -> Option<Stat> {
    if lookup::protocol(ctx) != IPPROTO_TCP {
        return None;
    }
    let port = lookup::local_port(ctx);
    let v4 = match lookup::family(ctx) {
        AF_INET => steered(&SteerEndpoint::v4(lookup::local_v4(ctx), port)).map(|()| true)?,
        AF_INET6 => steered(&SteerEndpoint::v6(lookup::local_v6(ctx), port)).map(|()| false)?,
        _ => return None,
    };
    // Only now, for a steered endpoint: every other connection in the namespace pays for the
    // endpoint lookup alone.
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let (client, slot) = if v4 {
        (client_v4(lookup::remote_v4(ctx), now), AGENT_SOCKET_V4)
    } else {
        (client_v6(lookup::remote_v6(ctx), now), AGENT_SOCKET_V6)
    };
    Some(match client {
        Client::Allowlisted => Stat::SteerAllowlisted,
        Client::Passed => Stat::SteerPassed,
        Client::Banned => to_agent(ctx, slot, Stat::SteerBanned),
        Client::Stranger => to_agent(ctx, slot, Stat::Steered),
    })
}

#[inline(always)]
fn steered(endpoint: &SteerEndpoint) -> Option<()> {
    STEER.get_ptr(endpoint).map(|_| ())
}

#[inline(always)]
fn client_v4(source: [u8; 4], now: u64) -> Client {
    if ALLOW_V4.get(Key::new(32, source)).is_some() {
        return Client::Allowlisted;
    }
    if banned(BANS_V4.get_ptr(source), now) || banned_prefix_v4(source, now) {
        return Client::Banned;
    }
    let Some(pass) = PASS_V4.get_ptr_mut(source) else { return Client::Stranger };
    // SAFETY: `pass` is what the lookup just returned.
    if unsafe { take_pass(pass, now) } {
        return Client::Passed;
    }
    let _ = PASS_V4.remove(source);
    Client::Stranger
}

#[inline(always)]
fn client_v6(source: [u8; 16], now: u64) -> Client {
    if ALLOW_V6.get(Key::new(128, source)).is_some() {
        return Client::Allowlisted;
    }
    if banned(BANS_V6.get_ptr(source), now)
        || banned(BANS_V6_NET.get_ptr(v6_prefix64(&source)), now)
        || banned_prefix_v6(source, now)
    {
        return Client::Banned;
    }
    let Some(pass) = PASS_V6.get_ptr_mut(source) else { return Client::Stranger };
    // SAFETY: `pass` is what the lookup just returned.
    if unsafe { take_pass(pass, now) } {
        return Client::Passed;
    }
    let _ = PASS_V6.remove(source);
    Client::Stranger
}

/// Whether a prefix ban of a length in use covers `source` (XDP's probes, the same lengths).
#[inline(always)]
fn banned_prefix_v4(source: [u8; 4], now: u64) -> bool {
    for &len in lengths(LENGTHS_V4).iter() {
        if len != 0 && banned(BANS_V4_PREFIX.get_ptr(PrefixV4::new(source, len)), now) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn banned_prefix_v6(source: [u8; 16], now: u64) -> bool {
    for &len in lengths(LENGTHS_V6).iter() {
        if len != 0 && banned(BANS_V6_PREFIX.get_ptr(PrefixV6::new(source, len)), now) {
            return true;
        }
    }
    false
}

/// Whether a ban map lookup found a ban in force. An expired ban is left for XDP (or the
/// agent's sweep) to remove.
#[inline(always)]
fn banned(ban: Option<*const BanValue>, now: u64) -> bool {
    match ban {
        // SAFETY: `ban` came from a lookup in this program run and stays valid for all of it
        // (RCU); an LRU eviction may recycle it, in which case we read another ban's expiry,
        // which is harmless for a steering decision (the agent judges either way).
        Some(ban) => unsafe { (*ban).expires_ns > now },
        None => false,
    }
}

/// Whether the pass is in force at `now`; if so, counts the connection it lets through.
///
/// # Safety
///
/// `pass` must come from a successful lookup in a pass map during this program run.
#[inline(always)]
unsafe fn take_pass(pass: *mut PassValue, now: u64) -> bool {
    // SAFETY: per the contract, `pass` points at a live value of the map for the rest of this
    // program run (RCU). `hits` may lose an increment to a concurrent lookup on another CPU
    // (no atomic add in `core` for the BPF target): it is approximate, documented so.
    unsafe {
        if (*pass).expires_ns <= now {
            return false;
        }
        (*pass).hits = (*pass).hits.wrapping_add(1);
    }
    true
}

/// Gives the connection to the agent's socket in `slot`; `assigned` is the outcome counted
/// when that works. `BPF_SK_LOOKUP_F_NO_REUSEPORT`: exactly the socket in the map, never a
/// socket the kernel would pick from its reuseport group.
#[inline(always)]
fn to_agent(ctx: &SkLookupContext, slot: u32, assigned: Stat) -> Stat {
    match AGENT_SOCKETS.redirect_sk_lookup(ctx, slot, u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT)) {
        Ok(()) => assigned,
        Err(NO_SOCKET) => Stat::SteerNoAgent,
        Err(_) => Stat::SteerError,
    }
}
