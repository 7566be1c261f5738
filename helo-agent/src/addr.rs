//! Addresses as bans and allowlists see them, and their encoding as ban map keys.
//!
//! A ban covers one IPv4 host or an IPv4 prefix from /24 to /31, one IPv6 host or an IPv6
//! prefix from /48 to /127: the /64 (one customer's whole prefix, the unit a bot hops around
//! in) has a map of its own, as a rule's ban covers it by default ([`BanScope`]).
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are the IPv4 host they name: a dual-stack
//! listener reports v4 clients that way, and the kernel sees them as IPv4 on the wire.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv6Net};

/// The prefix length of the IPv6 prefix bans with a map of their own.
pub const V6_PREFIX_BAN_LEN: u8 = 64;

/// The prefix lengths an IPv4 ban may have (32: one host).
pub const V4_LENS: std::ops::RangeInclusive<u8> = 24..=32;
/// The prefix lengths an IPv6 ban may have (128: one host).
pub const V6_LENS: std::ops::RangeInclusive<u8> = 48..=128;

/// What a rule's ban covers around the client: the prefix length for each family
/// (`bans.prefix_v4`, `bans.prefix_v6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanScope {
    pub v4: u8,
    pub v6: u8,
}

impl Default for BanScope {
    /// The client's IPv4 host, the client's IPv6 /64.
    fn default() -> Self {
        BanScope { v4: 32, v6: V6_PREFIX_BAN_LEN }
    }
}

impl BanScope {
    /// The ban a rule makes for a client at `ip`.
    pub fn covering(&self, ip: IpAddr) -> BanTarget {
        match canonical(ip) {
            ip @ IpAddr::V4(_) => BanTarget::of(ip, self.v4),
            ip @ IpAddr::V6(_) => BanTarget::of(ip, self.v6),
        }
    }
}

/// What the proxy's per-address session cap (`proxy.max_sessions_per_ip`) counts a client
/// as: its IPv4 host, or its IPv6 /64 (a bot holds the whole /64 and could open 50 sessions
/// from each of its addresses).
pub fn session_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        v4 => v4,
    }
}

/// Ordered as an admin reads addresses (see [`Ord`] below), so listings sort numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BanTarget {
    /// One IPv4 host; key of the v4 ban map.
    V4([u8; 4]),
    /// One IPv6 host; key of the v6 ban map.
    V6([u8; 16]),
    /// An IPv6 /64: the first 8 bytes; key of the v6 /64 ban map.
    V6Net64([u8; 8]),
    /// An IPv4 prefix of 24 to 31 bits, host bits clear, and its length; key of the v4 prefix
    /// ban map.
    V4Net([u8; 4], u8),
    /// An IPv6 prefix of 48 to 127 bits but 64, host bits clear, and its length; key of the
    /// v6 prefix ban map.
    V6Net([u8; 16], u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error(
        "{input:?} is not an IP address or CIDR (examples: 192.0.2.7, 2001:db8::7, 2001:db8:1:2::/64)"
    )]
    Syntax { input: String },
    #[error(
        "{input:?}: an IPv4 ban covers a prefix of /24 to /32 (one host); to never drop a \
         network, allowlist it instead"
    )]
    V4Prefix { input: String },
    #[error("{input:?}: an IPv6 ban covers a prefix of /48 to /128 (one host); write {suggestion}")]
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

    /// The /64 around an IPv6 address; an IPv4 address's host.
    pub fn prefix(ip: IpAddr) -> Self {
        match canonical(ip) {
            ip @ IpAddr::V4(_) => BanTarget::of(ip, 32),
            ip @ IpAddr::V6(_) => BanTarget::of(ip, V6_PREFIX_BAN_LEN),
        }
    }

    /// The ban of the `len`-bit prefix around `ip` (canonical first), clamped to what a ban
    /// of its family may cover ([`V4_LENS`], [`V6_LENS`]).
    pub fn of(ip: IpAddr, len: u8) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => match len.clamp(*V4_LENS.start(), *V4_LENS.end()) {
                32 => BanTarget::V4(v4.octets()),
                len => BanTarget::V4Net(helo_common::PrefixV4::new(v4.octets(), len).addr, len),
            },
            IpAddr::V6(v6) => match len.clamp(*V6_LENS.start(), *V6_LENS.end()) {
                128 => BanTarget::V6(v6.octets()),
                V6_PREFIX_BAN_LEN => BanTarget::V6Net64(helo_common::v6_prefix64(&v6.octets())),
                len => BanTarget::V6Net(helo_common::PrefixV6::new(v6.octets(), len).addr, len),
            },
        }
    }

    /// The network this ban covers: a host (/32, /128) or a prefix.
    pub fn network(&self) -> IpNet {
        match self {
            BanTarget::V4(o) => IpNet::from(IpAddr::V4(Ipv4Addr::from(*o))),
            BanTarget::V6(o) => IpNet::from(IpAddr::V6(Ipv6Addr::from(*o))),
            BanTarget::V6Net64(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                Ipv6Net::new(Ipv6Addr::from(full), V6_PREFIX_BAN_LEN).expect("64 <= 128").into()
            }
            BanTarget::V4Net(a, len) => {
                ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *len).expect("24..=31 <= 32").into()
            }
            BanTarget::V6Net(a, len) => {
                Ipv6Net::new(Ipv6Addr::from(*a), *len).expect("48..=127 <= 128").into()
            }
        }
    }

    /// Whether this ban covers more than one address.
    pub fn is_prefix(&self) -> bool {
        !matches!(self, BanTarget::V4(_) | BanTarget::V6(_))
    }

    /// Whether `ip` is inside this ban.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.network().contains(&canonical(ip))
    }

    /// Whether this ban lies wholly inside `net`, where it would never drop anything if `net`
    /// is allowlisted (an allowlisted network inside a banned prefix passes, the rest of the
    /// prefix is dropped).
    pub fn within(&self, net: &IpNet) -> bool {
        net.contains(&self.network())
    }

    /// The ban maps, by the names metrics and warnings give them (see [`BanTarget::map`]).
    pub const MAPS: [&'static str; 5] = ["v4", "v6", "v6_net", "v4_prefix", "v6_prefix"];

    /// The ban map this ban lives in, by its name in metrics and warnings.
    pub fn map(&self) -> &'static str {
        match self {
            BanTarget::V4(_) => "v4",
            BanTarget::V6(_) => "v6",
            BanTarget::V6Net64(_) => "v6_net",
            BanTarget::V4Net(..) => "v4_prefix",
            BanTarget::V6Net(..) => "v6_prefix",
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

    /// `192.0.2.7`, `192.0.2.7/32`, `192.0.2.0/24`, `2001:db8::7`, `2001:db8::7/128`,
    /// `2001:db8:1:2::/64`, `2001:db8::/48`. Host bits past the prefix are ignored, as
    /// `ip route` does. An IPv4-mapped IPv6 prefix (`::ffff:192.0.2.0/120`) is the IPv4 one.
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
        // A mapped IPv4 prefix counts its 96 bits of mapping.
        let len = if ip_is_v4 && !ip.is_ipv4() { len.saturating_sub(96) } else { len };
        match ip_is_v4 {
            true if V4_LENS.contains(&len) => Ok(BanTarget::of(ip, len)),
            false if V6_LENS.contains(&len) => Ok(BanTarget::of(ip, len)),
            true => Err(AddrError::V4Prefix { input: text.to_owned() }),
            false => Err(AddrError::V6Prefix {
                input: text.to_owned(),
                suggestion: format!("{addr}/128, {addr}/64 or {addr}/48"),
            }),
        }
    }
}

impl fmt::Display for BanTarget {
    /// Hosts as a plain address, prefixes with their length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.is_prefix() {
            true => write!(f, "{}", self.network()),
            false => write!(f, "{}", self.network().addr()),
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
        assert!(matches!(t("192.0.2.0/23"), Err(AddrError::V4Prefix { .. })));
        assert!(matches!(t("::ffff:192.0.2.0/100"), Err(AddrError::V4Prefix { .. })));
        let err = t("2001:db8::/47").unwrap_err();
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
    fn prefixes_of_every_allowed_length_parse_to_their_maps_keys() {
        assert_eq!(t("192.0.2.77/24"), Ok(BanTarget::V4Net([192, 0, 2, 0], 24)));
        assert_eq!(t("::ffff:192.0.2.77/120"), Ok(BanTarget::V4Net([192, 0, 2, 0], 24)));
        assert_eq!(t("192.0.2.77/28"), Ok(BanTarget::V4Net([192, 0, 2, 64], 28)));
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(t("2001:db8:aa:bb::9/48"), Ok(BanTarget::V6Net(v6("2001:db8:aa::"), 48)));
        assert_eq!(t("2001:db8:aa:bb::9/56"), Ok(BanTarget::V6Net(v6("2001:db8:aa::"), 56)));
        assert_eq!(t("2001:db8:aa:bb::9/127"), Ok(BanTarget::V6Net(v6("2001:db8:aa:bb::8"), 127)));
        assert_eq!(
            t("2001:db8:aa:bb::9/64"),
            Ok(BanTarget::prefix("2001:db8:aa:bb::".parse().unwrap()))
        );
        let p48 = t("2001:db8:aa::/48").unwrap();
        assert!(p48.covers("2001:db8:aa:ffff::1".parse().unwrap()));
        assert!(!p48.covers("2001:db8:ab::1".parse().unwrap()));
        assert!(t("10.1.2.0/24").unwrap().covers("::ffff:10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn a_rule_covers_the_v6_64_and_the_v4_host_by_default_and_what_the_scope_says() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let scope = BanScope::default();
        assert_eq!(scope.covering(ip("2001:db8:5::10")).to_string(), "2001:db8:5::/64");
        assert_eq!(scope.covering(ip("192.0.2.9")).to_string(), "192.0.2.9");
        assert_eq!(scope.covering(ip("::ffff:192.0.2.9")).to_string(), "192.0.2.9");
        let wide = BanScope { v4: 24, v6: 48 };
        assert_eq!(wide.covering(ip("2001:db8:5:6::10")).to_string(), "2001:db8:5::/48");
        assert_eq!(wide.covering(ip("192.0.2.9")).to_string(), "192.0.2.0/24");
        let hosts = BanScope { v4: 32, v6: 128 };
        assert_eq!(hosts.covering(ip("2001:db8:5::10")), BanTarget::host(ip("2001:db8:5::10")));
    }

    #[test]
    fn the_session_cap_counts_a_v6_64_as_one_client() {
        let key = |s: &str| session_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:5::10"), key("2001:db8:5::11"));
        assert_eq!(key("2001:db8:5::10"), "2001:db8:5::");
        assert_ne!(key("2001:db8:5::10"), key("2001:db8:5:1::10"));
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn display_round_trips() {
        for s in ["192.0.2.7", "192.0.2.0/24", "2001:db8::7", "2001:db8:1:2::/64", "2001:db8::/48"]
        {
            assert_eq!(t(s).unwrap().to_string(), s);
            assert_eq!(t(&t(s).unwrap().to_string()), t(s));
        }
    }
}
