//! Bounds-checked views into the frame. All pointer arithmetic of the program lives here.

use aya_ebpf::programs::XdpContext;

/// Copies `N` bytes at `offset` out of the frame, or `None` when the frame is too short.
///
/// The explicit `start + offset + N > end` comparison is what the verifier needs to accept the
/// read, whatever `offset` is.
#[inline(always)]
pub fn read<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    let ptr = (start + offset) as *const [u8; N];
    // SAFETY: the range [start + offset, start + offset + N) was checked against data_end just
    // above, so it lies inside the frame; read_unaligned makes no alignment assumption.
    Some(unsafe { core::ptr::read_unaligned(ptr) })
}

#[inline(always)]
pub fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}
