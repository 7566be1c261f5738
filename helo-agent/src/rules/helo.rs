//! What a HELO/EHLO argument is: a host name, a bare IP address, an address literal, or not
//! valid at all. Names are normalized once (ASCII lowercase, one trailing dot removed) so every
//! check compares like with like; names in rules may be written as U-labels and are kept as
//! A-labels.
//!
//! A HELO is a host name exactly where Postfix's `valid_hostname()` (src/util/valid_hostname.c)
//! says so, after smtpd's `dup_if_truncate()` took one final dot off: ASCII letters, digits,
//! `_` and hyphens, labels of 1 to 63 characters, no hyphen at a label's start or end, at most
//! 255 characters, and not all digits (`192.0.2` is no name). An IPv4 or IPv6 address is
//! recognised first (a bare IP, judged by `bare_ip`). What helo-filter refuses beyond that is a
//! check of its own, named and documented: a last label that is no top-level domain
//! (`unknown_tld`, which covers `host.123`), `no_dot`, `private_suffix`. A non-ASCII HELO
//! (U-labels) is not a host name: Postfix's `reject_invalid_helo_hostname` refuses it with and
//! without `smtputf8_enable` (`valid_hostname`, ASCII only: "EAI not allowed here",
//! smtpd_check.c), and with `smtputf8_enable = no` smtpd turns every non-ASCII byte of the HELO
//! into `?` before any check sees it. Access tables still find such a HELO ([`table_key`]), as
//! Postfix's `check_helo_access` does, so an `OK` entry can let one through.
//!
//! Names in rules ([`normalize_name`], [`table_name`]) are held to RFC 5321 and RFC 3696: no
//! `_` (but in access-table keys, as Postfix takes them) and no all-numeric last label.

use std::borrow::Cow;
use std::net::IpAddr;

/// RFC 1035: at most 255 octets in a name (253 in text), 63 in a label.
pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;
/// Postfix's `VALID_HOSTNAME_LEN`: the longest HELO name `valid_hostname()` takes.
pub const MAX_HELO_LEN: usize = 255;

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
    /// A character no host name has (`!`, space, control characters...; `_` only in names in
    /// rules).
    BadCharacter(char),
    /// A label starts or ends with a hyphen (Postfix: "misplaced hyphen").
    MisplacedHyphen,
    /// Digits and dots only (`192.0.2`, `1.2.3.4.5`): neither a host name (Postfix: "numeric
    /// hostname") nor an IPv4 address.
    Numeric,
    /// Brackets around something that is not an address.
    BadLiteral,
    /// Non-ASCII that is not a valid internationalized name.
    BadIdn,
    /// Non-ASCII (U-labels): not a host name in a HELO (see the module documentation).
    NonAscii,
    /// The last label is all digits (`192.0.2`, `host.123`): no host name ends so (RFC 3696
    /// section 2), and it is no IPv4 address either.
    NumericTld,
}

impl Invalid {
    pub fn describe(self) -> String {
        match self {
            Invalid::Empty => "empty HELO argument".into(),
            Invalid::TooLong => format!("HELO name longer than {MAX_HELO_LEN} characters"),
            Invalid::LabelTooLong => format!("HELO name has a label longer than {MAX_LABEL_LEN}"),
            Invalid::EmptyLabel => "HELO name has an empty label (`..` or a leading dot)".into(),
            Invalid::BadCharacter(c) => format!("HELO name contains {c:?}, which no host name has"),
            Invalid::MisplacedHyphen => {
                "HELO name has a label that starts or ends with a hyphen".into()
            }
            Invalid::Numeric => {
                "HELO name is all digits and dots: neither a host name nor an IPv4 address".into()
            }
            Invalid::BadLiteral => "HELO address literal does not hold an IP address".into(),
            Invalid::BadIdn => "HELO name is not a valid internationalized domain name".into(),
            Invalid::NonAscii => {
                "HELO name is not ASCII: a HELO names the host in A-labels (xn--...)".into()
            }
            Invalid::NumericTld => {
                "HELO name ends in an all-numeric label, which no host name has (RFC 3696 section \
                 2) and which is no IPv4 address"
                    .into()
            }
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
    // Addresses first: `192.0.2.1` is a bare address, not a name with an all-numeric label.
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Helo::BareIp(ip);
    }
    if !name.is_ascii() {
        return Helo::Invalid(match name.chars().find(|c| c.is_control() || c.is_whitespace()) {
            Some(c) => Invalid::BadCharacter(c),
            None => Invalid::NonAscii,
        });
    }
    // The text as sent: one final dot comes off, so a second one is an empty label.
    match valid_hostname(text) {
        Ok(name) => Helo::Name(name),
        Err(invalid) => Helo::Invalid(invalid),
    }
}

/// Postfix's `valid_hostname()` on an ASCII HELO, after smtpd took one final dot off: the
/// name in lower case, or why it is none.
fn valid_hostname(text: &str) -> Result<String, Invalid> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err(Invalid::Empty);
    }
    if name.len() > MAX_HELO_LEN {
        return Err(Invalid::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(Invalid::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(Invalid::LabelTooLong);
        }
        if let Some(c) =
            label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(Invalid::BadCharacter(c));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(Invalid::MisplacedHyphen);
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(Invalid::Numeric);
    }
    Ok(name)
}

/// The text a HELO is looked up by in an access table, as Postfix's `check_helo_access` looks
/// up the HELO as sent: a name (normalized), a bare address (`192.0.2.1`, `2001:db8::1`) or an
/// address literal (`[192.0.2.1]`, `[ipv6:2001:db8::1]`), each matching a table key of the same
/// text. Names that are not host names only for a `_` (Postfix's `valid_hostname` takes it) or
/// for U-labels are looked up too, so a table entry decides about them before the `invalid`
/// check does. Any other invalid HELO has no key. Table keys go through the same function
/// (`key` parsed as if it were a HELO), so both sides always compare alike.
pub fn table_key<'a>(helo: &'a Helo, argument: &str) -> Option<Cow<'a, str>> {
    match helo {
        Helo::Name(name) => Some(Cow::Borrowed(name)),
        Helo::BareIp(ip) => Some(Cow::Owned(ip.to_string())),
        Helo::Literal(IpAddr::V4(ip)) => Some(Cow::Owned(format!("[{ip}]"))),
        Helo::Literal(IpAddr::V6(ip)) => Some(Cow::Owned(format!("[ipv6:{ip}]"))),
        Helo::Invalid(_) => {
            table_name(argument.trim_matches(|c| c == ' ' || c == '\t')).ok().map(Cow::Owned)
        }
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
    normalize(name, false)
}

/// As [`normalize_name`], but a `_` in a label is taken, as Postfix's `valid_hostname` takes it:
/// for access-table keys and the HELOs looked up by them.
pub fn table_name(name: &str) -> Result<String, Invalid> {
    normalize(name, true)
}

fn normalize(name: &str, underscore: bool) -> Result<String, Invalid> {
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
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || (underscore && *c == '_')))
        {
            return Err(Invalid::BadCharacter(c));
        }
    }
    // RFC 3696 section 2: a top-level label is never all digits (`split` yields at least one).
    if ascii.rsplit('.').next().is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit())) {
        return Err(Invalid::NumericTld);
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
        // One final dot is the root; two leave an empty label (found by a new-admin trial:
        // `bot.example..` passed as `bot.example`).
        assert_eq!(parse("mail.example.com.."), Helo::Invalid(Invalid::EmptyLabel));
        assert_eq!(parse("."), Helo::Invalid(Invalid::Empty));
    }

    #[test]
    fn a_labels_are_names_and_u_labels_are_not() {
        assert_eq!(parse("MAIL.XN--BCHER-KVA.EXAMPLE"), name("mail.xn--bcher-kva.example"));
        assert_eq!(parse("mail.bücher.example"), Helo::Invalid(Invalid::NonAscii));
        assert_eq!(parse("mail.bücher.example."), Helo::Invalid(Invalid::NonAscii));
        assert_eq!(parse("mail.bü cher.example"), Helo::Invalid(Invalid::BadCharacter(' ')));
        assert_eq!(parse("mail.bü\u{7}.example"), Helo::Invalid(Invalid::BadCharacter('\u{7}')));
        // Names in rules may still be written as U-labels.
        assert_eq!(normalize_name("mail.bücher.example").unwrap(), "mail.xn--bcher-kva.example");
    }

    /// Postfix's valid_hostname(): a name of digits and dots only is none; a numeric last label
    /// alone is (`unknown_tld` judges it, a check of its own).
    #[test]
    fn only_an_all_numeric_name_is_no_host_name_as_postfix_says() {
        for bad in ["192.0.2", "192.0.2.1.5", "999.0.2.1", "1", "01.02.03.04", "1.2.3.4.5."] {
            assert_eq!(parse(bad), Helo::Invalid(Invalid::Numeric), "{bad}");
        }
        // Bare addresses are checked first and stay bare addresses.
        assert_eq!(parse("192.0.2.1"), Helo::BareIp("192.0.2.1".parse().unwrap()));
        assert_eq!(parse("192.0.2.1."), Helo::BareIp("192.0.2.1".parse().unwrap()));
        for good in
            ["host.123", "HOST.123.", "host.123a", "3com.example", "123.example", "a.b-1", "x0"]
        {
            assert!(matches!(parse(good), Helo::Name(_)), "{good}");
        }
        // Names in rules keep RFC 3696's rule.
        assert_eq!(normalize_name("example.123"), Err(Invalid::NumericTld));
    }

    /// Regression (issue 26): `mail_gw.example.com` was invalid, although Postfix's own
    /// valid_hostname() takes an underscore; its hyphen rule is Postfix's too.
    #[test]
    fn underscores_pass_and_misplaced_hyphens_do_not_as_in_postfix() {
        assert_eq!(parse("Mail_GW.example.com"), name("mail_gw.example.com"));
        assert_eq!(parse("_dmarc.example.com"), name("_dmarc.example.com"));
        for bad in ["-mail.example.com", "mail-.example.com", "mail.example.com-", "mail.-.example"]
        {
            assert_eq!(parse(bad), Helo::Invalid(Invalid::MisplacedHyphen), "{bad}");
        }
        assert_eq!(parse("xn--bcher-kva.example"), name("xn--bcher-kva.example"));
        assert_eq!(normalize_name("my_host.example"), Err(Invalid::BadCharacter('_')), "rules");
    }

    #[test]
    fn table_keys_are_the_helo_text_postfix_looks_up() {
        let key = |s: &str| table_key(&parse(s), s).map(|k| k.into_owned());
        let cases = [
            ("Mail.Example.COM.", Some("mail.example.com")),
            ("192.0.2.1", Some("192.0.2.1")),
            ("2001:DB8:0::1", Some("2001:db8::1")),
            ("[192.0.2.1]", Some("[192.0.2.1]")),
            ("[IPv6:2001:DB8::1]", Some("[ipv6:2001:db8::1]")),
            // Invalid as host names, but Postfix's tables find them.
            ("My_Host.example", Some("my_host.example")),
            ("mail.bücher.example", Some("mail.xn--bcher-kva.example")),
            // Nothing to look up.
            ("", None),
            ("[foo]", None),
            ("192.0.2", None),
            ("bad!name.example", None),
            ("under_score.123", Some("under_score.123")),
        ];
        for (helo, expected) in cases {
            assert_eq!(key(helo).as_deref(), expected, "{helo:?}");
        }
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
        assert_eq!(parse("host!.example"), Helo::Invalid(Invalid::BadCharacter('!')));
        assert_eq!(parse("two words"), Helo::Invalid(Invalid::BadCharacter(' ')));
        assert_eq!(parse(&"a".repeat(64)), Helo::Invalid(Invalid::LabelTooLong));
        assert_eq!(parse(&"a.".repeat(129)), Helo::Invalid(Invalid::TooLong));
        assert_eq!(parse(&"a.".repeat(128)), name(&["a"; 128].join(".")), "255 characters fit");
        assert_eq!(parse(&"x".repeat(10_000)), Helo::Invalid(Invalid::TooLong));
        assert_eq!(
            parse(&format!("{}.example", "x".repeat(64))),
            Helo::Invalid(Invalid::LabelTooLong)
        );
        assert_eq!(parse(&["a"; 127].join(".")), name(&["a"; 127].join(".")));
    }
}
