//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) that tells the MTA the real
//! client and the address it connected to. Postfix takes both with
//! `smtpd_upstream_proxy_protocol = haproxy`.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` to `local`; empty for [`ProxyProtocol::None`].
/// Mixed families (an IPv4 client seen on an IPv6 socket) are written as IPv4 when the local
/// address maps, else as IPv6 with the client mapped.
pub fn encode(protocol: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client_ip, local_ip) = same_family(client.ip(), local.ip());
    match protocol {
        ProxyProtocol::None | ProxyProtocol::Transparent => Vec::new(),
        ProxyProtocol::V1 => {
            let family = if client_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {client_ip} {local_ip} {} {}\r\n", client.port(), local.port())
                .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY command
            let mut addresses = Vec::with_capacity(36);
            match (client_ip, local_ip) {
                (IpAddr::V4(c), IpAddr::V4(l)) => {
                    out.push(0x11); // AF_INET, STREAM
                    addresses.extend_from_slice(&c.octets());
                    addresses.extend_from_slice(&l.octets());
                }
                (c, l) => {
                    out.push(0x21); // AF_INET6, STREAM
                    addresses.extend_from_slice(&v6(c).octets());
                    addresses.extend_from_slice(&v6(l).octets());
                }
            }
            addresses.extend_from_slice(&client.port().to_be_bytes());
            addresses.extend_from_slice(&local.port().to_be_bytes());
            out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
            out.extend(addresses);
            out
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(client: IpAddr, local: IpAddr) -> (IpAddr, IpAddr) {
    let (c, l) = (crate::addr::canonical(client), crate::addr::canonical(local));
    if c.is_ipv4() == l.is_ipv4() { (c, l) } else { (IpAddr::V6(v6(c)), IpAddr::V6(v6(l))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = encode(ProxyProtocol::V2, sa("203.0.113.9:40000"), sa("198.51.100.1:25"));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 9, 198, 51, 100, 1, 0x9c, 0x40, 0, 25,
        ]);
        assert_eq!(h, expected);
    }

    #[test]
    fn v2_ipv6_and_mapped_clients() {
        let h = encode(ProxyProtocol::V2, sa("[2001:db8::9]:40000"), sa("[2001:db8::1]:25"));
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        // A dual-stack socket reports v4 clients as ::ffff:a.b.c.d: written as plain IPv4.
        let h = encode(
            ProxyProtocol::V2,
            sa("[::ffff:203.0.113.9]:40000"),
            sa("[::ffff:198.51.100.1]:25"),
        );
        assert_eq!(&h[12..20], &[0x21, 0x11, 0, 12, 203, 0, 113, 9]);
        // Mixed: the v4 side is mapped into v6.
        let h = encode(ProxyProtocol::V2, sa("203.0.113.9:40000"), sa("[2001:db8::1]:25"));
        assert_eq!(&h[13..16], &[0x21, 0, 36]);
        assert_eq!(
            &h[16..32],
            &"::ffff:203.0.113.9".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn v1_and_none() {
        assert_eq!(
            encode(ProxyProtocol::V1, sa("203.0.113.9:40000"), sa("198.51.100.1:25")),
            b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n"
        );
        assert_eq!(
            encode(ProxyProtocol::V1, sa("[2001:db8::9]:1"), sa("[2001:db8::1]:25")),
            b"PROXY TCP6 2001:db8::9 2001:db8::1 1 25\r\n"
        );
        assert!(encode(ProxyProtocol::None, sa("203.0.113.9:1"), sa("198.51.100.1:25")).is_empty());
        assert!(
            encode(ProxyProtocol::Transparent, sa("203.0.113.9:1"), sa("198.51.100.1:25"))
                .is_empty()
        );
    }
}

/// The longest v1 header the spec allows, CRLF included.
const V1_MAX: usize = 107;
/// The longest v2 header accepted: the fixed part, IPv6 addresses and room for TLVs.
const V2_MAX: usize = 16 + 1024;

/// What a front proxy (a load balancer the agent trusts) says about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// The real client and the address it connected to.
    Proxied { client: SocketAddr, local: SocketAddr },
    /// The balancer speaking for itself (v2 LOCAL, v1 UNKNOWN: health checks).
    Local,
}

/// [`decode`]'s answer for the bytes read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    NeedMore,
    /// A header of `len` bytes; what follows is the client's SMTP.
    Header {
        len: usize,
        inbound: Inbound,
    },
    Invalid(&'static str),
}

/// Whether `bytes` start like a PROXY header (v1 or v2), as far as they go.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    let v1 = b"PROXY ";
    let n = bytes.len().min(v1.len());
    let m = bytes.len().min(V2_SIGNATURE.len());
    (n > 0 && bytes[..n] == v1[..n]) || (m > 0 && bytes[..m] == V2_SIGNATURE[..m])
}

/// Decodes a PROXY v1 or v2 header at the start of `bytes` (sans-IO: call again with more
/// bytes on [`Decoded::NeedMore`]). Bounded: never asks for more than a header can hold.
pub fn decode(bytes: &[u8]) -> Decoded {
    if bytes.is_empty() || (bytes.len() < V2_SIGNATURE.len() && looks_like_header(bytes)) {
        return Decoded::NeedMore;
    }
    if bytes.starts_with(&V2_SIGNATURE) {
        return decode_v2(bytes);
    }
    if bytes.starts_with(b"PROXY ") {
        return decode_v1(bytes);
    }
    Decoded::Invalid("no PROXY header")
}

fn decode_v1(bytes: &[u8]) -> Decoded {
    let Some(end) = bytes.iter().take(V1_MAX).position(|b| *b == b'\n') else {
        return if bytes.len() >= V1_MAX {
            Decoded::Invalid("PROXY v1 line too long")
        } else {
            Decoded::NeedMore
        };
    };
    let Some(line) = bytes[..end].strip_suffix(b"\r") else {
        return Decoded::Invalid("PROXY v1 line without CRLF");
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Decoded::Invalid("PROXY v1 line is not ASCII");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let len = end + 1;
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Decoded::Header { len, inbound: Inbound::Local },
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let parsed = (|| {
                let src: IpAddr = src.parse().ok()?;
                let dst: IpAddr = dst.parse().ok()?;
                let v4 = *family == "TCP4";
                (src.is_ipv4() == v4 && dst.is_ipv4() == v4).then_some(())?;
                let sport: u16 = port(sport)?;
                let dport: u16 = port(dport)?;
                Some(Inbound::Proxied {
                    client: SocketAddr::new(src, sport),
                    local: SocketAddr::new(dst, dport),
                })
            })();
            match parsed {
                Some(inbound) => Decoded::Header { len, inbound },
                None => Decoded::Invalid("PROXY v1 addresses do not parse"),
            }
        }
        _ => Decoded::Invalid("PROXY v1 line is malformed"),
    }
}

/// A decimal port without sign or leading zeros, as the spec writes them.
fn port(text: &str) -> Option<u16> {
    (!text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0')))
    .then(|| text.parse().ok())?
}

fn decode_v2(bytes: &[u8]) -> Decoded {
    if bytes.len() < 16 {
        return Decoded::NeedMore;
    }
    let (ver_cmd, family) = (bytes[12], bytes[13]);
    let body = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let len = 16 + body;
    if ver_cmd >> 4 != 2 {
        return Decoded::Invalid("PROXY v2 header with another version");
    }
    if len > V2_MAX {
        return Decoded::Invalid("PROXY v2 header too long");
    }
    if bytes.len() < len {
        return Decoded::NeedMore;
    }
    let addresses = &bytes[16..len];
    match ver_cmd & 0x0f {
        0x0 => Decoded::Header { len, inbound: Inbound::Local },
        0x1 => {
            let inbound = match family {
                0x11 if addresses.len() >= 12 => {
                    let a = |i: usize| {
                        IpAddr::from(<[u8; 4]>::try_from(&addresses[i..i + 4]).expect("4"))
                    };
                    let p = |i: usize| u16::from_be_bytes([addresses[i], addresses[i + 1]]);
                    Inbound::Proxied {
                        client: SocketAddr::new(a(0), p(8)),
                        local: SocketAddr::new(a(4), p(10)),
                    }
                }
                0x21 if addresses.len() >= 36 => {
                    let a = |i: usize| {
                        IpAddr::from(<[u8; 16]>::try_from(&addresses[i..i + 16]).expect("16"))
                    };
                    let p = |i: usize| u16::from_be_bytes([addresses[i], addresses[i + 1]]);
                    Inbound::Proxied {
                        client: SocketAddr::new(a(0), p(32)),
                        local: SocketAddr::new(a(16), p(34)),
                    }
                }
                // UNSPEC (or a family we do not proxy, such as AF_UNIX): the balancer itself.
                0x00 => Inbound::Local,
                _ => return Decoded::Invalid("PROXY v2 header with an unsupported address family"),
            };
            Decoded::Header { len, inbound }
        }
        _ => Decoded::Invalid("PROXY v2 header with an unknown command"),
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn what_we_encode_we_decode_at_every_split_point() {
        for (client, local) in [
            (addr("198.51.100.7:40000"), addr("192.0.2.1:25")),
            (addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:25")),
        ] {
            for protocol in [ProxyProtocol::V1, ProxyProtocol::V2] {
                let mut bytes = encode(protocol, client, local);
                let len = bytes.len();
                bytes.extend_from_slice(b"EHLO x\r\n");
                for cut in 0..len {
                    assert_eq!(
                        decode(&bytes[..cut]),
                        Decoded::NeedMore,
                        "{protocol:?} cut at {cut}"
                    );
                }
                assert_eq!(
                    decode(&bytes),
                    Decoded::Header { len, inbound: Inbound::Proxied { client, local } },
                    "{protocol:?}"
                );
            }
        }
    }

    #[test]
    fn local_and_unknown_are_the_balancer_itself() {
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(decode(&v2), Decoded::Header { len: 16, inbound: Inbound::Local });
        assert_eq!(
            decode(b"PROXY UNKNOWN\r\nEHLO"),
            Decoded::Header { len: 15, inbound: Inbound::Local }
        );
    }

    #[test]
    fn malformed_headers_are_invalid_not_waited_for() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"EHLO mail.example.com\r\n",
        ] {
            assert!(
                matches!(decode(bad), Decoded::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(decode(&long), Decoded::Invalid("PROXY v1 line too long"));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(decode(&huge), Decoded::Invalid("PROXY v2 header too long"));
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0x00, 0x0c]);
        assert!(matches!(decode(&v3), Decoded::Invalid(_)));
    }

    #[test]
    fn headers_are_recognised_from_their_first_bytes() {
        assert!(looks_like_header(b"PRO"));
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"\r\n\r\n\0"));
        assert!(!looks_like_header(b"EHLO"));
        assert!(!looks_like_header(b"\r\n\r\nX"));
    }
}
