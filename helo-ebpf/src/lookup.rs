//! Reads of the sk_lookup context. All context access of the steering program lives here.
//!
//! The verifier rewrites each read of `struct bpf_sk_lookup` into a read of the kernel's own
//! lookup state, and accepts only reads of a field's exact size at its exact offset. A plain
//! copy of the 16-byte address arrays lets LLVM merge or split the loads, which the verifier
//! rejects; so every field is read as one `u32` with `read_volatile`, which LLVM keeps as is.

use aya_ebpf::{bindings::bpf_sk_lookup, programs::SkLookupContext};

/// One field of the context.
macro_rules! field {
    ($ctx:expr, $($field:tt)+) => {{
        let lookup: *const bpf_sk_lookup = $ctx.lookup;
        // SAFETY: `lookup` is the context the kernel passed to this program run, valid for all
        // of it; the field is an aligned u32 inside it, read once at its own size.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*lookup).$($field)+)) }
    }};
}

#[inline(always)]
pub fn family(ctx: &SkLookupContext) -> u32 {
    field!(ctx, family)
}

#[inline(always)]
pub fn protocol(ctx: &SkLookupContext) -> u32 {
    field!(ctx, protocol)
}

/// The local (destination) port. The context holds it in host byte order.
#[inline(always)]
pub fn local_port(ctx: &SkLookupContext) -> u16 {
    field!(ctx, local_port) as u16
}

/// The IPv4 addresses are `__be32`: their bytes in memory are the address in network order.
#[inline(always)]
pub fn local_v4(ctx: &SkLookupContext) -> [u8; 4] {
    field!(ctx, local_ip4).to_ne_bytes()
}

#[inline(always)]
pub fn remote_v4(ctx: &SkLookupContext) -> [u8; 4] {
    field!(ctx, remote_ip4).to_ne_bytes()
}

#[inline(always)]
pub fn local_v6(ctx: &SkLookupContext) -> [u8; 16] {
    join([
        field!(ctx, local_ip6[0]),
        field!(ctx, local_ip6[1]),
        field!(ctx, local_ip6[2]),
        field!(ctx, local_ip6[3]),
    ])
}

#[inline(always)]
pub fn remote_v6(ctx: &SkLookupContext) -> [u8; 16] {
    join([
        field!(ctx, remote_ip6[0]),
        field!(ctx, remote_ip6[1]),
        field!(ctx, remote_ip6[2]),
        field!(ctx, remote_ip6[3]),
    ])
}

/// Four `__be32` words, as the 16 bytes of the address in network order.
#[inline(always)]
fn join(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}
