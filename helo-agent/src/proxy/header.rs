//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) that tells the MTA the real
//! client and the address it connected to. Postfix takes both with
//! `smtpd_upstream_proxy_protocol = haproxy`.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the MTA sees the proxy's address.
    None,
    V1,
    V2,
    /// No header: the connection to the MTA comes from the client's own address
    /// (IP_TRANSPARENT), for MTAs that cannot take PROXY headers. Needs CAP_NET_ADMIN and a
    /// route that brings the MTA's replies back to this host (see the README).
    Transparent,
}

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
