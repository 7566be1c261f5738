//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN: TCP segments over IPv4 and IPv6, with an
//! optional 802.1Q tag and IPv6 extension headers. Checksums are left zero: XDP does not check
//! them, and neither does the program.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&40_000u16.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
    t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]); // offset, flags, win, csum, urg
    t
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]); // id, DF, ttl, proto, csum
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// A TCP segment (SYN unless `flags` says otherwise) from `src` to `dst:dport` over IPv4.
pub fn tcp_v4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let seg = tcp(dport, flags);
    let mut f = ethernet(0x0800);
    f.extend(ipv4_header(src, dst, 6, seg.len()));
    f.extend(seg);
    f
}

pub fn syn_v4(src: &str, dport: u16) -> Vec<u8> {
    tcp_v4(src.parse().unwrap(), "198.51.100.1".parse().unwrap(), dport, SYN)
}

/// A UDP datagram to `dport` over IPv4 (never guarded).
pub fn udp_v4(src: &str, dport: u16) -> Vec<u8> {
    let mut udp = 40_000u16.to_be_bytes().to_vec();
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&[0, 8, 0, 0]);
    let mut f = ethernet(0x0800);
    f.extend(ipv4_header(src.parse().unwrap(), "198.51.100.1".parse().unwrap(), 17, udp.len()));
    f.extend(udp);
    f
}

/// A TCP segment over IPv6, with the given extension headers (next-header codes) before TCP.
pub fn tcp_v6_ext(src: Ipv6Addr, dst: Ipv6Addr, dport: u16, flags: u8, ext: &[u8]) -> Vec<u8> {
    let seg = tcp(dport, flags);
    let mut exts = Vec::new();
    for (i, kind) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(6);
        match kind {
            44 => exts.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 1]), // first fragment, M=0
            _ => exts.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),  // 8 bytes, PadN
        }
    }
    let first = ext.first().copied().unwrap_or(6);
    let mut f = ethernet(0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((exts.len() + seg.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[first, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend(exts);
    f.extend(seg);
    f
}

pub fn syn_v6(src: &str, dport: u16) -> Vec<u8> {
    tcp_v6_ext(src.parse().unwrap(), "2001:db8:100::1".parse().unwrap(), dport, SYN, &[])
}

/// The same frame with one 802.1Q tag (VLAN 42) after the MAC addresses.
pub fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00, 0x00, 42]);
    f.extend_from_slice(&frame[12..]);
    f
}
