//! Frames the way a NIC's driver hands them over: BPF_PROG_RUN with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` (kernel 5.18+, what `xdp-trafficgen` from xdp-tools uses) runs
//! a two-instruction XDP program (`return XDP_TX`) on a frame we built, once per packet, and
//! the kernel sends each out of the attacker's veth as an `xdp_frame`. The receiving veth's
//! NAPI poll runs its native XDP program on that frame before any socket buffer exists; a
//! frame XDP passes is built into an skb there, as a driver would. xdp-trafficgen itself sends
//! only UDP (or a real TCP stream), so the SYN flood is generated here by the same mechanism.
//!
//! The bpf(2) calls are made directly (aya loads programs only from ELF objects); every
//! `unsafe` is one syscall or ioctl on memory owned by the caller for its duration.
#![allow(unsafe_code, reason = "raw bpf(2) and ioctl calls aya has no API for")]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

pub const XDP_DROP: i32 = 1;
pub const XDP_TX: i32 = 3;

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
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
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `struct xdp_md` as BPF_PROG_RUN takes it for context.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] bpf_attr prefix owned by the caller, valid for the call;
    // the kernel reads (and for test runs writes) at most size_of::<T>() bytes of it.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, size_of::<T>())
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// An XDP program that returns `verdict` for every frame.
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    pub fn returning(verdict: i32) -> io::Result<Program> {
        // r0 = verdict; exit
        let insns: [u64; 2] = [0xb7 | ((verdict as u32 as u64) << 32), 0x95];
        let license = b"GPL\0";
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        attr.prog_name[..7].copy_from_slice(b"hf_live");
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
        Ok(Program { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// Attaches in native (driver) mode to `ifindex` of the calling thread's namespace; the
    /// link, and the attachment, last as long as the returned descriptor.
    pub fn attach(&self, ifindex: u32) -> io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: 0,
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: as above, a new descriptor from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Runs the program `count` times on `frame` as live frames arriving on `ifindex` (of the
    /// calling thread's namespace): with XDP_TX each is sent out of that interface.
    pub fn send_live(&self, frame: &[u8], ifindex: u32, count: u32) -> io::Result<()> {
        let mut ctx =
            XdpMd { data_end: frame.len() as u32, ingress_ifindex: ifindex, ..Default::default() };
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: count,
            ctx_size_in: size_of::<XdpMd>() as u32,
            ctx_in: &mut ctx as *mut XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: 64,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
    }
}

/// Sends `frame` out of `ifindex` at about `rate` packets a second on average (`None`: as fast
/// as the CPU goes) for `length`; returns the packets sent and the time it took. Each call
/// sends a quarter second's worth at full speed (the kernel sets up and tears down a page
/// pool per call, and the teardown waits for an RCU grace period: small calls would measure
/// that wait), then sleeps to the average rate.
pub fn flood(
    program: &Program,
    frame: &[u8],
    ifindex: u32,
    rate: Option<f64>,
    length: Duration,
) -> io::Result<(u64, Duration)> {
    let chunk = rate.map_or(1 << 20, |r| (r / 4.0).max(1024.0) as u32);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < length {
        program.send_live(frame, ifindex, chunk)?;
        sent += u64::from(chunk);
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok((sent, started.elapsed()))
}

/// Turns GRO on for `ifname` (legacy ETHTOOL_SGRO): a veth without an XDP program takes
/// XDP-redirected frames only with its NAPI on, which GRO turns on.
pub fn set_gro(ifname: &str, on: bool) -> io::Result<()> {
    const ETHTOOL_SGRO: u32 = 0x2c;
    set_offload(ifname, ETHTOOL_SGRO, on)
}

/// Turns TCP segmentation offload on or off for `ifname` (legacy ETHTOOL_STSO). A veth whose
/// sender has TSO hands TCP packets to its peer's receive NAPI (and its ring) only when an XDP
/// program is attached there; with TSO off it does so whenever that NAPI is on, XDP or not.
pub fn set_tso(ifname: &str, on: bool) -> io::Result<()> {
    const ETHTOOL_STSO: u32 = 0x1f;
    set_offload(ifname, ETHTOOL_STSO, on)
}

/// One legacy ethtool "set value" command on `ifname`, in the calling thread's namespace.
fn set_offload(ifname: &str, cmd: u32, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut value = EthtoolValue { cmd, data: u32::from(on) };
    let mut req = Ifreq { name: [0; 16], data: &mut value, _pad: [0; 16] };
    let bytes = ifname.as_bytes();
    anyhow_len(bytes.len())?;
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed when `sock` drops.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor from the kernel.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `req` and `value` live on this stack frame for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req as *mut Ifreq) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn anyhow_len(len: usize) -> io::Result<()> {
    if len < 16 {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"))
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE on any machine this runs on.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t for the call.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A SYN from `src` to `dst:25`, with valid IPv4 and TCP checksums (iptables' raw table sees
/// packets after the IP header is checked), between the given MAC addresses.
pub fn syn_frame(src: [u8; 4], dst: [u8; 4], src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut frame = tests::frames::tcp_v4(src.into(), dst.into(), 25, tests::frames::SYN);
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    let ip = 14;
    let ip_sum = checksum(&frame[ip..ip + 20], 0);
    frame[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = ip + 20;
    let len = (frame.len() - tcp) as u32;
    let pseudo: u32 = [&src[..], &dst[..]]
        .iter()
        .flat_map(|a| a.chunks(2))
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>()
        + 6
        + len;
    let tcp_sum = checksum(&frame[tcp..], pseudo);
    frame[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    frame
}

fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The MAC address of `ifname` in namespace `ns` (`ip -n NS -o link`: sysfs shows the
/// mounting namespace, not a thread's).
pub fn mac_of(ns: &str, ifname: &str) -> io::Result<[u8; 6]> {
    let text = tests::run(
        std::process::Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", ifname]),
    );
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("no MAC for {ifname}: {text}"));
    let hex = text
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(bad)?;
    let mut mac = [0u8; 6];
    for (i, part) in hex.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// The index of `ifname` in the calling thread's namespace.
pub fn ifindex_of(ifname: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated name owned for the call; the lookup uses a socket of the
    // calling thread's network namespace.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 { Err(io::Error::last_os_error()) } else { Ok(index) }
}

/// utime + stime of the calling thread, in clock ticks.
pub fn thread_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// The pid of `ksoftirqd/<cpu>`, which takes softirq work (the veth's NAPI poll) the CPU
/// could not finish on the way out of an interrupt or syscall.
pub fn ksoftirqd(cpu: usize) -> Option<u32> {
    let want = format!("ksoftirqd/{cpu}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == want).then_some(pid)
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let frame = syn_frame([10, 99, 0, 2], [10, 99, 0, 1], [2; 6], [4; 6]);
        assert_eq!(checksum(&frame[14..34], 0), 0, "IPv4 header");
        let len = (frame.len() - 34) as u32;
        let pseudo = 0x0a63 + 0x0002 + 0x0a63 + 0x0001 + 6 + len;
        assert_eq!(checksum(&frame[34..], pseudo), 0, "TCP with its pseudo header");
    }
}
