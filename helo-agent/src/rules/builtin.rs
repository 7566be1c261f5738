//! The built-in HELO checks: each a pure function of the parsed HELO (and the client address
//! where it matters) that returns why it fires, or `None`.

use std::net::IpAddr;

use super::helo::{Helo, parse};
use crate::addr::canonical;

/// Top-level names that never exist in public DNS (RFC 6762, 8375, 2606 and common practice).
pub const PRIVATE_SUFFIXES: &[&str] =
    &["local", "lan", "localdomain", "internal", "home", "home.arpa", "invalid"];

pub fn invalid(helo: &Helo) -> Option<String> {
    match helo {
        Helo::Invalid(why) => Some(why.describe()),
        _ => None,
    }
}

pub fn localhost(helo: &Helo) -> Option<String> {
    let Helo::Name(name) = helo else { return None };
    (name == "localhost" || name.starts_with("localhost."))
        .then(|| format!("HELO {name} names the client's own loopback host"))
}

pub fn bare_ip(helo: &Helo) -> Option<String> {
    let Helo::BareIp(ip) = helo else { return None };
    Some(format!("HELO is a bare IP address {ip} (RFC 5321 wants a name or [address literal])"))
}

/// An address literal must be the client's own address (IPv4-mapped forms compare equal).
pub fn literal_mismatch(helo: &Helo, client: Option<IpAddr>) -> Option<String> {
    let (Helo::Literal(literal), Some(client)) = (helo, client) else { return None };
    (canonical(*literal) != canonical(client))
        .then(|| format!("HELO address literal [{literal}] is not the client's address {client}"))
}

pub fn no_dot(helo: &Helo) -> Option<String> {
    let Helo::Name(name) = helo else { return None };
    (!name.contains('.')).then(|| format!("HELO {name} is not a fully qualified domain name"))
}

pub fn private_suffix(helo: &Helo) -> Option<String> {
    let Helo::Name(name) = helo else { return None };
    PRIVATE_SUFFIXES
        .iter()
        .find(|suffix| {
            name.len() > suffix.len()
                && name.ends_with(*suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        })
        .map(|suffix| format!("HELO {name} ends in .{suffix}, which is not a public domain"))
}

/// A name that embeds the client's IPv4 octets, forwards or backwards (`203-0-113-9.dyn.isp`,
/// `9.113.0.203.dsl.isp`, `host203-0-113-9`): the mark of a dynamic or generic address.
pub fn dynamic(helo: &Helo, client: Option<IpAddr>) -> Option<String> {
    let (Helo::Name(name), Some(IpAddr::V4(v4))) = (helo, client.map(canonical)) else {
        return None;
    };
    embeds_octets(name, v4)
        .then(|| format!("HELO {name} embeds the client's address {v4}: a dynamic-looking name"))
}

/// Whether `name` holds the four octets of `v4` as four numbers in a row, forwards or
/// backwards, whatever separates them.
fn embeds_octets(name: &str, v4: std::net::Ipv4Addr) -> bool {
    let octets = v4.octets();
    let mut groups = [0u16; 32];
    let mut count = 0;
    for digits in name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()) {
        if count == groups.len() {
            break;
        }
        // Longer than 3 digits cannot be an octet: keep a value that matches none.
        groups[count] =
            if digits.len() <= 3 { digits.parse().unwrap_or(u16::MAX) } else { u16::MAX };
        count += 1;
    }
    let groups = &groups[..count];
    let forward = octets.map(u16::from);
    let mut backward = forward;
    backward.reverse();
    groups.windows(4).any(|w| w == forward || w == backward)
}

/// Words that mark a reverse name as an access provider's pool rather than a mail server's own
/// name (each a whole word of letters: `dsl` in `dsl-1.isp`, `pool` in `pool-71-1-2-3.isp`,
/// never inside another word). Taken from what Spamhaus's "generic rDNS" advice, SpamAssassin's
/// `RDNS_DYNAMIC` and rspamd's hfilter look for, kept to the words no mail server's name needs.
pub const POOL_WORDS: &[&str] = &[
    "adsl",
    "broadband",
    "cable",
    "cpe",
    "cust",
    "customer",
    "dhcp",
    "dial",
    "dialin",
    "dialup",
    "dip",
    "dsl",
    "dyn",
    "dynamic",
    "dynamicip",
    "ftth",
    "pool",
    "ppp",
    "pppoe",
    "res",
    "residential",
    "sdsl",
    "vdsl",
    "xdsl",
];

/// Why a forward-confirmed reverse name is generic (an access provider's name for an address
/// of its pool, not a mail server's own name), if it is: it embeds the client's IPv4 address
/// (four numbers in a row, forwards or backwards, or the eight hex digits of the address), or
/// has a word of [`POOL_WORDS`]. A generic name is no trust anchor: a bot on a home line has
/// one, set by its provider.
pub fn generic(name: &str, client: IpAddr) -> Option<String> {
    if let IpAddr::V4(v4) = canonical(client) {
        let hex = format!("{:08x}", u32::from(v4));
        if embeds_octets(name, v4) || name.contains(&hex) {
            return Some(format!("{name} embeds the address {v4}"));
        }
    }
    name.split(|c: char| !c.is_ascii_alphabetic())
        .find(|word| POOL_WORDS.contains(word))
        .map(|word| format!("{name} has the pool word {word:?}"))
}

/// Top-level names RFC 2606 reserves for testing and documentation: not in the root zone, but
/// no bot's invention either, and what every test bed (this project's included) names its
/// hosts with. Taken as delegated.
pub const RESERVED_TLDS: &[&str] = &["example", "test"];

/// The last label of a host name, if it is not a top-level domain of the root zone (the ICANN
/// section of the Public Suffix List, which the `psl` crate embeds at build time), nor
/// reserved for testing ([`RESERVED_TLDS`]), nor one of `extra` (`rules.extra_tlds`, lower
/// case). A numeric last label (`host.123`) is none.
pub fn unknown_tld(helo: &Helo, extra: &[String]) -> Option<String> {
    let Helo::Name(name) = helo else { return None };
    let tld = name.rsplit('.').next()?;
    let known = is_tld(tld) || RESERVED_TLDS.contains(&tld) || extra.iter().any(|e| e == tld);
    if !name.contains('.') || known {
        return None;
    }
    Some(format!("HELO {name} ends in .{tld}, which is no top-level domain"))
}

/// Whether `label` (lower case) is a top-level domain delegated in the root zone, as the
/// Public Suffix List's ICANN section says.
pub fn is_tld(label: &str) -> bool {
    use psl::Psl as _;
    let info = psl::List.find(std::iter::once(label.as_bytes()));
    info.typ == Some(psl::Type::Icann) && info.len == label.len()
}

/// The HELO changed to a different name within one session.
pub fn changed(helo: &Helo, previous: &[String]) -> Option<String> {
    let last = previous.last()?;
    let before = parse(last);
    (before != *helo).then(|| format!("HELO changed within the session (was {last:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Helo {
        parse(s)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn localhost_forms() {
        assert!(localhost(&h("localhost")).is_some());
        assert!(localhost(&h("LOCALHOST.localdomain")).is_some());
        assert!(localhost(&h("localhost.")).is_some());
        assert!(localhost(&h("localhostess.example")).is_none());
        assert!(localhost(&h("mail.localhost.example")).is_none());
    }

    #[test]
    fn literal_must_be_the_client() {
        assert!(literal_mismatch(&h("[192.0.2.1]"), ip("192.0.2.1")).is_none());
        assert!(literal_mismatch(&h("[192.0.2.1]"), ip("::ffff:192.0.2.1")).is_none());
        assert!(literal_mismatch(&h("[192.0.2.1]"), ip("192.0.2.2")).is_some());
        assert!(literal_mismatch(&h("[IPv6:2001:db8::25]"), ip("2001:db8::25")).is_none());
        assert!(literal_mismatch(&h("[IPv6:2001:db8::25]"), ip("2001:db8::26")).is_some());
        assert!(literal_mismatch(&h("[IPv6:2001:db8::25]"), ip("192.0.2.1")).is_some());
        assert!(literal_mismatch(&h("[192.0.2.1]"), None).is_none(), "no client: no verdict");
    }

    #[test]
    fn private_suffixes_only_as_whole_labels() {
        for name in
            ["pc.local", "box.lan", "x.localdomain", "db.corp.internal", "nas.home", "a.home.arpa"]
        {
            assert!(private_suffix(&h(name)).is_some(), "{name}");
        }
        for name in ["mail.example.com", "local", "mail.glocal", "homestead.example", "lan.example"]
        {
            assert!(private_suffix(&h(name)).is_none(), "{name}");
        }
    }

    #[test]
    fn dynamic_names_embedding_the_client_ip() {
        let client = ip("203.0.113.9");
        for name in [
            "203-0-113-9.dyn.isp.example",
            "9.113.0.203.dsl.isp.example",
            "host203-0-113-9.pool.example",
            "cpe-203.0.113.9.cable.example",
        ] {
            assert!(dynamic(&h(name), client).is_some(), "{name}");
        }
        for name in [
            "mail-wr1-f41.google.com",
            "203-0-113-10.dyn.isp.example",
            "mx.example.com",
            "1203-0-113-9.example",
        ] {
            assert!(dynamic(&h(name), client).is_none(), "{name}");
        }
        assert!(dynamic(&h("203-0-113-9.example"), ip("2001:db8::1")).is_none());
        assert!(dynamic(&h("203-0-113-9.example"), ip("::ffff:203.0.113.9")).is_some());
    }

    #[test]
    fn changed_compares_normalized_names() {
        assert!(changed(&h("mail.example.com"), &[]).is_none());
        assert!(changed(&h("mail.example.com"), &["MAIL.example.com.".into()]).is_none());
        assert!(changed(&h("other.example.com"), &["mail.example.com".into()]).is_some());
    }

    #[test]
    fn simple_shapes() {
        assert!(no_dot(&h("exchange01")).is_some());
        assert!(no_dot(&h("mail.example.com")).is_none());
        assert!(no_dot(&h("[192.0.2.1]")).is_none());
        assert!(bare_ip(&h("192.0.2.1")).is_some());
        assert!(bare_ip(&h("[192.0.2.1]")).is_none());
        assert!(invalid(&h("bad!name.example")).is_some());
        assert!(invalid(&h("bad_name.example")).is_none(), "Postfix takes `_`");
        assert!(invalid(&h("good.example")).is_none());
    }

    #[test]
    fn numeric_names_and_u_labels_are_invalid_but_addresses_are_bare_ips() {
        for name in ["192.0.2", "10.0.0.0.1", "300.1.2.3", "mail.bücher.example"] {
            assert!(invalid(&h(name)).is_some(), "{name}");
            assert!(bare_ip(&h(name)).is_none(), "{name}");
        }
        for address in ["192.0.2.1", "192.0.2.1.", "2001:db8::1"] {
            assert!(invalid(&h(address)).is_none(), "{address}");
            assert!(bare_ip(&h(address)).is_some(), "{address}");
        }
        assert!(invalid(&h("mail.xn--bcher-kva.example")).is_none());
        assert!(invalid(&h("mail.123.example")).is_none(), "only the last label counts");
        assert!(invalid(&h("mail.example.123")).is_none(), "Postfix takes it: unknown_tld judges");
    }

    /// Issue 26: a name under a TLD the root zone does not have is judged offline.
    #[test]
    fn tlds_are_the_root_zone_s_and_the_admin_s() {
        let none: &[String] = &[];
        for name in ["lakewjf.awlekfj", "discwji.sfhiwho", "mail.example.123", "mail.corp"] {
            assert!(unknown_tld(&h(name), none).is_some(), "{name}");
        }
        for name in [
            "mail.example.com",
            "mx.example.co.uk",
            "smtp.xn--p1ai",
            "a.b.museum",
            "x.in-addr.arpa",
            "mail",
        ] {
            assert!(unknown_tld(&h(name), none).is_none(), "{name}");
        }
        assert!(unknown_tld(&h("mail.corp"), &["corp".into()]).is_none(), "rules.extra_tlds");
        assert!(!is_tld("co.uk") && !is_tld("uk.") && is_tld("uk") && is_tld("google"));
    }

    /// A forward-confirmed reverse name is no trust anchor where an access provider made it
    /// for a pool address; a mail server's own name is.
    #[test]
    fn generic_reverse_names_embed_the_address_or_a_pool_word() {
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        for name in [
            "203-0-113-9.dyn.isp.example",
            "9.113.0.203.in-addr.isp.example",
            "host-cb007109.isp.example",
            "pool-71-1-2-3.nycmny.fios.isp.example",
            "dsl-provider.isp.example",
            "cpe-x.res.isp.example",
        ] {
            assert!(generic(name, client).is_some(), "{name}");
        }
        for name in [
            "mail-wr1-f41.google.com",
            "a8-30.smtp-out.amazonses.com",
            "mail.company.example",
            "mail135-27.atl141.mcdlv.net",
            "resolver.example",
            "poolside.example",
        ] {
            assert!(generic(name, client).is_none(), "{name}");
        }
    }
}
