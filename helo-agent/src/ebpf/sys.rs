//! The three bpf() commands aya 0.14 does not offer for sk_lookup: opening a pinned link
//! (`BPF_OBJ_GET`; aya's `PinnedLink` keeps its descriptor to itself), swapping the program
//! of a netns link (`BPF_LINK_UPDATE`; aya does it for XDP and TC links only), and a test run
//! with a context and no packet (`BPF_PROG_TEST_RUN`; aya has no `TestRun` for `SkLookup`).
//! The agent's only `unsafe` code is here: each call passes one `#[repr(C)]` attribute struct
//! laid out as the kernel's `union bpf_attr` member for the command.
#![allow(
    unsafe_code,
    reason = "bpf() commands aya 0.14 lacks for sk_lookup links and test runs; each call is one #[repr(C)] bpf_attr member"
)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

const BPF_PROG_TEST_RUN: libc::c_int = 10;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_UPDATE: libc::c_int = 29;

/// `bpf(cmd, attr, sizeof(attr))`. The kernel reads `size_of::<T>()` bytes (and requires the
/// rest of its own, larger union to be zero, which it fills in itself).
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` struct of the layout the kernel expects
    // for `cmd`, and its exact size is passed, so the kernel reads and writes only inside it; the
    // user buffers it points to are borrowed by the caller for the duration of the call.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>() as libc::c_uint)
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// `BPF_OBJ_GET`'s member of `union bpf_attr`.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// The struct's alignment padding, explicit so that it is zero.
    pad: u32,
}

/// Opens the object (here: a link) pinned at `path` on bpffs.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the pin path"))?;
    let mut attr =
        ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, pad: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`'s member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps `program` into `link` atomically: every lookup runs either the old program or the
/// new one, never neither. Fails with `ENOLINK` when the link's namespace is gone, `EINVAL`
/// when the link is of another type than the program.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `struct bpf_sk_lookup` as user space hands it to a test run (72 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkLookupCtx {
    /// Out: the cookie of the socket the program selected (in: must be zero).
    pub cookie: u64,
    pub family: u32,
    pub protocol: u32,
    /// Network byte order, as in memory.
    pub remote_ip4: [u8; 4],
    pub remote_ip6: [u8; 16],
    /// Network byte order.
    pub remote_port: [u8; 2],
    pub pad: u16,
    pub local_ip4: [u8; 4],
    pub local_ip6: [u8; 16],
    /// Host byte order.
    pub local_port: u32,
    /// Must be zero for a test run.
    pub ingress_ifindex: u32,
    pub tail: u32,
}

const _: () = assert!(size_of::<SkLookupCtx>() == 72);

/// `BPF_PROG_TEST_RUN`'s member of `union bpf_attr`.
#[repr(C)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// Runs the sk_lookup `program` `repeat` times on `ctx`; returns its verdict, the context the
/// kernel wrote back (the selected socket's cookie) and the mean time of a run.
pub fn test_run_sk_lookup(
    program: BorrowedFd<'_>,
    ctx: &SkLookupCtx,
    repeat: u32,
) -> io::Result<(u32, SkLookupCtx, Duration)> {
    let mut out = SkLookupCtx::default();
    let mut attr = TestRun {
        prog_fd: program.as_raw_fd() as u32,
        retval: 0,
        data_size_in: 0,
        data_size_out: 0,
        data_in: 0,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: size_of::<SkLookupCtx>() as u32,
        ctx_size_out: size_of::<SkLookupCtx>() as u32,
        ctx_in: std::ptr::from_ref(ctx) as u64,
        ctx_out: std::ptr::from_mut(&mut out) as u64,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, out, Duration::from_nanos(u64::from(attr.duration))))
}
