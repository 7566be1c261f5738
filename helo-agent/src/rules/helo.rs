//! What a HELO/EHLO argument is: a host name, a bare IP address, an address literal, or not
//! valid at all. Names are normalized once (ASCII lowercase, one trailing dot removed, U-labels
//! to A-labels) so every check compares like with like.

use std::net::IpAddr;

/// RFC 1035: at most 255 octets in a name (253 in text), 63 in a label.
pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Helo {
    /// A syntactically valid host name, normalized (lowercase A-labels, no trailing dot).
    Name(String),
    /// An IP address without brackets (`192.0.2.1`, `2001:db8::1`): not what RFC 5321 allows.
    BareIp(IpAddr),
    /// An address literal: `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    Literal(IpAddr),
    /// Not a host name, not an address: the reason says why.
    Invalid(Invalid),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    TooLong,
    LabelTooLong,
    EmptyLabel,
    /// A character no host name has (`_`, `!`, space, control characters...).
    BadCharacter(char),
    /// Brackets around something that is not an address.
    BadLiteral,
    /// Non-ASCII that is not a valid internationalized name.
    BadIdn,
}

impl Invalid {
    pub fn describe(self) -> String {
        match self {
            Invalid::Empty => "empty HELO argument".into(),
            Invalid::TooLong => format!("HELO name longer than {MAX_NAME_LEN} characters"),
            Invalid::LabelTooLong => format!("HELO name has a label longer than {MAX_LABEL_LEN}"),
            Invalid::EmptyLabel => "HELO name has an empty label (`..` or a leading dot)".into(),
            Invalid::BadCharacter(c) => format!("HELO name contains {c:?}, which no host name has"),
            Invalid::BadLiteral => "HELO address literal does not hold an IP address".into(),
            Invalid::BadIdn => "HELO name is not a valid internationalized domain name".into(),
        }
    }
}

/// Classifies a HELO argument (as the client sent it, without the verb).
pub fn parse(argument: &str) -> Helo {
    let text = argument.trim_matches(|c| c == ' ' || c == '\t');
    if text.is_empty() {
        return Helo::Invalid(Invalid::Empty);
    }
    if let Some(inner) = text.strip_prefix('[') {
        return match inner.strip_suffix(']').and_then(parse_literal) {
            Some(ip) => Helo::Literal(ip),
            None => Helo::Invalid(Invalid::BadLiteral),
        };
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Helo::BareIp(ip);
    }
    match normalize_name(name) {
        Ok(name) => Helo::Name(name),
        Err(invalid) => Helo::Invalid(invalid),
    }
}

/// `192.0.2.1` or `IPv6:2001:db8::1` (the tag is case-insensitive, RFC 5321 4.1.3).
fn parse_literal(inner: &str) -> Option<IpAddr> {
    // Compare bytes: slicing the str at 5 could cut a multi-byte character (found by fuzzing).
    if inner.len() > 5 && inner.as_bytes()[..5].eq_ignore_ascii_case(b"ipv6:") {
        return inner[5..].parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    inner.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Lowercase A-label form of a host name, checked for syntax. Used for HELOs and for every name
/// in rules, so both sides compare equal.
pub fn normalize_name(name: &str) -> Result<String, Invalid> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(Invalid::Empty);
    }
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        if let Some(c) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(Invalid::BadCharacter(c));
        }
        idna::domain_to_ascii(name).map_err(|_| Invalid::BadIdn)?
    };
    if ascii.len() > MAX_NAME_LEN {
        return Err(Invalid::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(Invalid::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(Invalid::LabelTooLong);
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(Invalid::BadCharacter(c));
        }
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Helo {
        Helo::Name(s.into())
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(parse("Mail.Example.COM"), name("mail.example.com"));
        assert_eq!(parse("mail.example.com."), name("mail.example.com"));
        assert_eq!(parse("  mx1.example.net "), name("mx1.example.net"));
        assert_eq!(parse("localhost"), name("localhost"));
        assert_eq!(parse("a-b.c-d"), name("a-b.c-d"));
    }

    #[test]
    fn idn_names_become_a_labels() {
        assert_eq!(parse("mail.bücher.example"), name("mail.xn--bcher-kva.example"));
        assert_eq!(parse("MAIL.XN--BCHER-KVA.EXAMPLE"), name("mail.xn--bcher-kva.example"));
        assert_eq!(parse("mail.bü cher.example"), Helo::Invalid(Invalid::BadCharacter(' ')));
    }

    #[test]
    fn bare_ips_are_recognized() {
        assert_eq!(parse("192.0.2.1"), Helo::BareIp("192.0.2.1".parse().unwrap()));
        assert_eq!(parse("192.0.2.1."), Helo::BareIp("192.0.2.1".parse().unwrap()));
        assert_eq!(parse("2001:db8::1"), Helo::BareIp("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn literals_v4_and_v6() {
        assert_eq!(parse("[192.0.2.1]"), Helo::Literal("192.0.2.1".parse().unwrap()));
        assert_eq!(parse("[IPv6:2001:db8::1]"), Helo::Literal("2001:db8::1".parse().unwrap()));
        assert_eq!(parse("[ipv6:2001:DB8::1]"), Helo::Literal("2001:db8::1".parse().unwrap()));
        for bad in ["[2001:db8::1]", "[192.0.2]", "[foo]", "[192.0.2.1", "[]", "[IPv6:]"] {
            assert_eq!(parse(bad), Helo::Invalid(Invalid::BadLiteral), "{bad}");
        }
    }

    /// Regression (cargo fuzz, smtp_session and helo_rules): a literal whose 5th byte falls
    /// inside a multi-byte character panicked on a str slice.
    #[test]
    fn literal_with_multibyte_characters_does_not_panic() {
        assert_eq!(parse("[I\u{fffd}\u{fffd}6:2001:db8::1]"), Helo::Invalid(Invalid::BadLiteral));
        assert_eq!(parse("[abcd\u{e9}]"), Helo::Invalid(Invalid::BadLiteral));
        assert_eq!(parse("[\u{e9}\u{e9}\u{e9}]"), Helo::Invalid(Invalid::BadLiteral));
    }

    #[test]
    fn invalid_names_say_why() {
        assert_eq!(parse(""), Helo::Invalid(Invalid::Empty));
        assert_eq!(parse("   "), Helo::Invalid(Invalid::Empty));
        assert_eq!(parse("."), Helo::Invalid(Invalid::Empty));
        assert_eq!(parse("a..b"), Helo::Invalid(Invalid::EmptyLabel));
        assert_eq!(parse(".example.com"), Helo::Invalid(Invalid::EmptyLabel));
        assert_eq!(parse("my_host.example"), Helo::Invalid(Invalid::BadCharacter('_')));
        assert_eq!(parse("host!.example"), Helo::Invalid(Invalid::BadCharacter('!')));
        assert_eq!(parse("two words"), Helo::Invalid(Invalid::BadCharacter(' ')));
        assert_eq!(parse(&"a".repeat(64)), Helo::Invalid(Invalid::LabelTooLong));
        assert_eq!(parse(&"a.".repeat(128)), Helo::Invalid(Invalid::TooLong));
        assert_eq!(parse(&"a.".repeat(127)), name(&["a"; 127].join(".")), "253 characters fit");
        assert_eq!(parse(&"x".repeat(10_000)), Helo::Invalid(Invalid::TooLong));
        assert_eq!(
            parse(&format!("{}.example", "x".repeat(64))),
            Helo::Invalid(Invalid::LabelTooLong)
        );
        assert_eq!(parse(&["a"; 127].join(".")), name(&["a"; 127].join(".")));
    }
}
