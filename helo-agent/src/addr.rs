//! Addresses as bans and allowlists see them, and their encoding as ban map keys.
//!
//! A ban covers one IPv4 host, one IPv6 host, or one IPv6 /64 (one customer's whole prefix, the
//! unit a bot hops around in). IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are the IPv4
//! host they name: a dual-stack listener reports v4 clients that way, and the kernel sees them
//! as IPv4 on the wire.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv6Net};

/// The prefix length of an IPv6 prefix ban.
pub const V6_PREFIX_BAN_LEN: u8 = 64;

/// Ordered as an admin reads addresses (see [`Ord`] below), so listings sort numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BanTarget {
    /// One IPv4 host; key of the v4 ban map.
    V4([u8; 4]),
    /// One IPv6 host; key of the v6 ban map.
    V6([u8; 16]),
    /// An IPv6 /64: the first 8 bytes; key of the v6 prefix ban map.
    V6Net64([u8; 8]),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error(
        "{input:?} is not an IP address or CIDR (examples: 192.0.2.7, 2001:db8::7, 2001:db8:1:2::/64)"
    )]
    Syntax { input: String },
    #[error(
        "{input:?}: IPv4 bans are per host (/32); to never drop a network, allowlist it instead"
    )]
    V4Prefix { input: String },
    #[error("{input:?}: IPv6 bans cover one host (/128) or one /64 prefix; write {suggestion}")]
    V6Prefix { input: String, suggestion: String },
    #[error("{input:?}: the prefix length must be a number no larger than {max}")]
    PrefixLen { input: String, max: u8 },
}

impl BanTarget {
    /// The host ban for one address (IPv4-mapped IPv6 becomes IPv4).
    pub fn host(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => BanTarget::V4(v4.octets()),
            IpAddr::V6(v6) => BanTarget::V6(v6.octets()),
        }
    }

    /// The widest ban for an address: IPv4 host, or the /64 around an IPv6 address.
    pub fn prefix(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => BanTarget::V4(v4.octets()),
            IpAddr::V6(v6) => BanTarget::V6Net64(helo_common::v6_prefix64(&v6.octets())),
        }
    }

    /// The network this ban covers: a /32, a /128 or a /64.
    pub fn network(&self) -> IpNet {
        match self {
            BanTarget::V4(o) => IpNet::from(IpAddr::V4(Ipv4Addr::from(*o))),
            BanTarget::V6(o) => IpNet::from(IpAddr::V6(Ipv6Addr::from(*o))),
            BanTarget::V6Net64(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                Ipv6Net::new(Ipv6Addr::from(full), V6_PREFIX_BAN_LEN).expect("64 <= 128").into()
            }
        }
    }

    /// The ban maps, by the names metrics and warnings give them (see [`BanTarget::map`]).
    pub const MAPS: [&'static str; 3] = ["v4", "v6", "v6_net"];

    /// The ban map this ban lives in, by its name in metrics and warnings.
    pub fn map(&self) -> &'static str {
        match self {
            BanTarget::V4(_) => "v4",
            BanTarget::V6(_) => "v6",
            BanTarget::V6Net64(_) => "v6_net",
        }
    }

    /// Whether this ban and `net` overlap, either way round (a /64 may hold an allowlisted
    /// host, or lie inside an allowlisted network).
    pub fn overlaps(&self, net: &IpNet) -> bool {
        let banned = self.network();
        net.contains(&banned) || banned.contains(net)
    }
}

impl Ord for BanTarget {
    /// IPv4 before IPv6, then by numeric address; a /64 sorts by its network, just before
    /// the hosts inside it. Text order would put `10.0.0.10` before `10.0.0.9`.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |t: &BanTarget| {
            let net = t.network();
            let (family, addr) = match net.addr() {
                IpAddr::V4(v4) => (4u8, u128::from(u32::from(v4))),
                IpAddr::V6(v6) => (6, u128::from(v6)),
            };
            (family, addr, net.prefix_len())
        };
        key(self).cmp(&key(other))
    }
}

impl PartialOrd for BanTarget {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for BanTarget {
    type Err = AddrError;

    /// `192.0.2.7`, `192.0.2.7/32`, `2001:db8::7`, `2001:db8::7/128`, `2001:db8:1:2::/64`.
    /// Host bits below a /64 are ignored, as `ip route` does.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let syntax = || AddrError::Syntax { input: text.to_owned() };
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| syntax())?;
        let ip_is_v4 = canonical(ip).is_ipv4();
        let Some(len) = len else { return Ok(BanTarget::host(ip)) };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| AddrError::PrefixLen { input: text.to_owned(), max })?;
        match (ip_is_v4, ip.is_ipv4(), len) {
            (true, true, 32) | (true, false, 128) | (false, _, 128) => Ok(BanTarget::host(ip)),
            (false, _, V6_PREFIX_BAN_LEN) => Ok(BanTarget::prefix(ip)),
            (true, _, _) => Err(AddrError::V4Prefix { input: text.to_owned() }),
            (false, _, _) => Err(AddrError::V6Prefix {
                input: text.to_owned(),
                suggestion: format!("{addr}/128 or {addr}/64"),
            }),
        }
    }
}

impl fmt::Display for BanTarget {
    /// Hosts as a plain address, the /64 with its prefix length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::V6Net64(_) => write!(f, "{}", self.network()),
            _ => write!(f, "{}", self.network().addr()),
        }
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they carry; everything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_overlapping_allowlisted_networks_are_found() {
        let net: ipnet::IpNet = "2001:db8::/32".parse().unwrap();
        assert!("2001:db8:1:2::/64".parse::<BanTarget>().unwrap().overlaps(&net));
        assert!("2001:db8::1".parse::<BanTarget>().unwrap().overlaps(&net));
        assert!(!"2001:db9::1".parse::<BanTarget>().unwrap().overlaps(&net));
        let wide: ipnet::IpNet = "2001:db8:1:2:3::/80".parse().unwrap();
        assert!("2001:db8:1:2::/64".parse::<BanTarget>().unwrap().overlaps(&wide));
        let v4: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
        assert!("10.1.2.3".parse::<BanTarget>().unwrap().overlaps(&v4));
        assert!(!"11.1.2.3".parse::<BanTarget>().unwrap().overlaps(&v4));
    }

    fn t(s: &str) -> Result<BanTarget, AddrError> {
        s.parse()
    }

    #[test]
    fn hosts_parse_to_host_keys() {
        assert_eq!(t("192.0.2.7"), Ok(BanTarget::V4([192, 0, 2, 7])));
        assert_eq!(t(" 192.0.2.7/32 "), Ok(BanTarget::V4([192, 0, 2, 7])));
        let v6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(t("2001:db8::7"), Ok(BanTarget::V6(v6)));
        assert_eq!(t("2001:db8::7/128"), Ok(BanTarget::V6(v6)));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_host() {
        assert_eq!(t("::ffff:192.0.2.7"), Ok(BanTarget::V4([192, 0, 2, 7])));
        assert_eq!(t("::ffff:192.0.2.7/128"), Ok(BanTarget::V4([192, 0, 2, 7])));
        let mapped = canonical("::ffff:192.0.2.7".parse().unwrap());
        assert!(BanTarget::V4([192, 0, 2, 7]).network().contains(&mapped));
    }

    #[test]
    fn v6_prefix_keys_keep_the_network_half_only() {
        let expected = BanTarget::V6Net64([0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        assert_eq!(t("2001:db8:1:2::/64"), Ok(expected));
        assert_eq!(t("2001:db8:1:2:aaaa::5/64"), Ok(expected));
        assert_eq!(expected.to_string(), "2001:db8:1:2::/64");
        let covers = |ip: &str| expected.network().contains(&ip.parse::<IpAddr>().unwrap());
        assert!(covers("2001:db8:1:2:ffff::1"));
        assert!(!covers("2001:db8:1:3::1"));
        assert!(!covers("192.0.2.1"));
    }

    #[test]
    fn unsupported_prefixes_say_what_to_do() {
        assert!(matches!(t("192.0.2.0/24"), Err(AddrError::V4Prefix { .. })));
        let err = t("2001:db8::/48").unwrap_err();
        assert!(matches!(err, AddrError::V6Prefix { .. }));
        assert!(err.to_string().contains("2001:db8::/64"), "{err}");
        assert!(matches!(t("192.0.2.1/33"), Err(AddrError::PrefixLen { .. })));
        assert!(matches!(t("192.0.2.1/x"), Err(AddrError::PrefixLen { .. })));
        assert!(matches!(t("mail.example.com"), Err(AddrError::Syntax { .. })));
        assert!(matches!(t(""), Err(AddrError::Syntax { .. })));
        assert!(matches!(t("999.1.1.1"), Err(AddrError::Syntax { .. })));
    }

    #[test]
    fn targets_sort_numerically_v4_first_and_a_64_by_its_network() {
        let mut targets: Vec<BanTarget> = [
            "2001:db8::10",
            "10.0.0.10",
            "2001:db8:0:1::/64",
            "2001:db8::9",
            "9.255.255.255",
            "2001:db8::/64",
            "10.0.0.9",
            "::1",
            "2001:db8:0:1::1",
            "192.0.2.1",
        ]
        .iter()
        .map(|s| t(s).unwrap())
        .collect();
        targets.sort();
        let sorted: Vec<String> = targets.iter().map(ToString::to_string).collect();
        assert_eq!(
            sorted,
            [
                "9.255.255.255",
                "10.0.0.9",
                "10.0.0.10",
                "192.0.2.1",
                "::1",
                "2001:db8::/64",
                "2001:db8::9",
                "2001:db8::10",
                "2001:db8:0:1::/64",
                "2001:db8:0:1::1",
            ]
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["192.0.2.7", "2001:db8::7", "2001:db8:1:2::/64"] {
            assert_eq!(t(s).unwrap().to_string(), s);
            assert_eq!(t(&t(s).unwrap().to_string()), t(s));
        }
    }
}
