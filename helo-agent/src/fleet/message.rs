//! What gateways tell each other through Redis, sans IO: the ban and unban events published on
//! the channel, the ban records kept under keys (the same JSON), and the key names. Decoding
//! happens here, at the edge: anything that is not a well-formed event of this version is an
//! [`Undecodable`] with the reason, and nothing downstream looks at JSON.
//!
//! Times are wall-clock Unix milliseconds: each gateway's boot clock (what the kernel measures
//! bans on) starts at its own boot, so only the wall clock means the same on every host.

use serde::{Deserialize, Serialize};

use crate::addr::BanTarget;

/// The wire version; an event of another version is ignored (and logged), not misread.
pub const VERSION: u32 = 1;

/// A ban as every gateway applies it: the same target, expiry and reason everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanRecord {
    pub target: BanTarget,
    /// When the ban ends (Unix ms); `None`: never.
    pub expires_ms: Option<u64>,
    pub reason: String,
    /// The gateway that made the ban.
    pub node: String,
    /// The offender's offences so far, this one included (0: an admin's ban, no offence).
    pub offences: u32,
    /// When the ban was made (Unix ms): the lag of the gateways that apply it, and the time of
    /// the last offence.
    pub at_ms: u64,
    /// Until when the record is worth keeping (Unix ms): the ban's end or, if later, the end of
    /// the offence history (`bans.max_ttl` after the offence); `None`: never.
    pub keep_until_ms: Option<u64>,
}

impl BanRecord {
    /// Whether the ban is in force at `now_ms`.
    pub fn active_at(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|end| end > now_ms)
    }
}

/// One message on the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ban(BanRecord),
    /// A ban lifted (and the offences forgotten) by an admin on `node`.
    Unban {
        target: BanTarget,
        node: String,
        at_ms: u64,
    },
}

impl Event {
    pub fn node(&self) -> &str {
        match self {
            Event::Ban(record) => &record.node,
            Event::Unban { node, .. } => node,
        }
    }

    pub fn target(&self) -> BanTarget {
        match self {
            Event::Ban(record) => record.target,
            Event::Unban { target, .. } => *target,
        }
    }

    /// The record or message as stored and published by no gateway in particular (a key's
    /// value).
    pub fn encode(&self) -> String {
        self.encode_from(None)
    }

    /// The message as published by the gateway process `from` (see [`Event::decode_from`]).
    pub fn encode_from(&self, from: Option<&str>) -> String {
        let from = from.map(str::to_owned);
        let wire = match self {
            Event::Ban(r) => Wire {
                v: VERSION,
                kind: Kind::Ban,
                target: r.target.to_string(),
                node: r.node.clone(),
                at_ms: r.at_ms,
                expires_ms: r.expires_ms,
                reason: Some(r.reason.clone()),
                offences: r.offences,
                keep_until_ms: r.keep_until_ms,
                from,
            },
            Event::Unban { target, node, at_ms } => Wire {
                v: VERSION,
                kind: Kind::Unban,
                target: target.to_string(),
                node: node.clone(),
                at_ms: *at_ms,
                expires_ms: None,
                reason: None,
                offences: 0,
                keep_until_ms: None,
                from,
            },
        };
        serde_json::to_string(&wire).expect("an event serializes")
    }

    /// Reads a record from a key (or a message, whoever sent it).
    pub fn decode(bytes: &[u8]) -> Result<Event, Undecodable> {
        Event::decode_from(bytes).map(|(event, _)| event)
    }

    /// Reads a message from the channel, with the gateway process that published it (each
    /// agent process has its own, so it skips its own messages even when another gateway
    /// shares its node name). Text that reaches logs and listings is made safe: control
    /// characters become `?`, the reason is cut to what a ban holds.
    pub fn decode_from(bytes: &[u8]) -> Result<(Event, Option<String>), Undecodable> {
        if bytes.len() > MAX_MESSAGE {
            return Err(Undecodable(format!("{} bytes, more than {MAX_MESSAGE}", bytes.len())));
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| Undecodable(e.to_string()))?;
        if wire.v != VERSION {
            return Err(Undecodable(format!("version {}, this agent speaks {VERSION}", wire.v)));
        }
        let target: BanTarget =
            wire.target.parse().map_err(|e: crate::addr::AddrError| Undecodable(e.to_string()))?;
        if wire.node.is_empty()
            || wire.node.len() > MAX_NODE
            || wire.node.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(Undecodable(format!("node name {:?} is not a gateway's name", wire.node)));
        }
        let event = match wire.kind {
            Kind::Ban => Event::Ban(BanRecord {
                target,
                expires_ms: wire.expires_ms,
                reason: safe_reason(wire.reason.as_deref().unwrap_or_default()),
                node: wire.node,
                offences: wire.offences,
                at_ms: wire.at_ms,
                keep_until_ms: wire.keep_until_ms,
            }),
            Kind::Unban => Event::Unban { target, node: wire.node, at_ms: wire.at_ms },
        };
        Ok((event, wire.from))
    }
}

/// A reason as a ban holds it: control characters as `?`, at most
/// [`helo_common::REASON_TEXT_LEN`] bytes (cut at a character boundary).
pub fn safe_reason(reason: &str) -> String {
    let mut safe = String::with_capacity(reason.len().min(helo_common::REASON_TEXT_LEN));
    for c in reason.chars().map(|c| if c.is_control() { '?' } else { c }) {
        if safe.len() + c.len_utf8() > helo_common::REASON_TEXT_LEN {
            break;
        }
        safe.push(c);
    }
    safe
}

/// Why a message was ignored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Undecodable(pub String);

/// Longer messages are not ours (a record is about 250 bytes).
const MAX_MESSAGE: usize = 4096;
/// The longest node name accepted (host names are at most 253).
pub const MAX_NODE: usize = 253;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    kind: Kind,
    target: String,
    node: String,
    at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    offences: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_until_ms: Option<u64>,
    /// The publishing agent process, on the channel only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Ban,
    Unban,
}

/// Key and channel names under one prefix, so several fleets (or a test) can share a Redis.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.to_owned() }
    }

    /// The channel events are published on.
    pub fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The key holding the record of one target's ban (and offences).
    pub fn ban(&self, target: &BanTarget) -> String {
        format!("{}ban:{target}", self.prefix)
    }

    /// The pattern that SCAN walks to catch up.
    pub fn ban_pattern(&self) -> String {
        // A prefix may hold glob characters: escape them.
        let mut escaped = String::with_capacity(self.prefix.len() + 5);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped + "ban:*"
    }

    /// The key holding this Redis's epoch: a value set once by the first gateway to connect.
    /// When it changes, Redis lost its data (restarted empty) and the gateways put back what
    /// they hold.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> BanRecord {
        BanRecord {
            target: "192.0.2.7".parse().unwrap(),
            expires_ms: Some(1_700_000_600_000),
            reason: "forged_own_name".into(),
            node: "mx1".into(),
            offences: 2,
            at_ms: 1_700_000_000_000,
            keep_until_ms: Some(1_700_086_400_000),
        }
    }

    #[test]
    fn events_round_trip() {
        let ban = Event::Ban(record());
        assert_eq!(Event::decode(ban.encode().as_bytes()), Ok(ban));
        let forever = Event::Ban(BanRecord { expires_ms: None, keep_until_ms: None, ..record() });
        assert_eq!(Event::decode(forever.encode().as_bytes()), Ok(forever));
        let unban = Event::Unban {
            target: "2001:db8:1:2::/64".parse().unwrap(),
            node: "mx2".into(),
            at_ms: 5,
        };
        assert_eq!(Event::decode(unban.encode().as_bytes()), Ok(unban));
    }

    /// Issue 27: a rule's ban of a prefix (an IPv6 /64 by default, a /48 or an IPv4 /24 as
    /// configured) travels to the fleet as the prefix, under a key of its own.
    #[test]
    fn prefix_bans_travel_as_their_prefix() {
        let keys = Keys::new("helo-filter:");
        for target in
            ["2001:db8:5::/64", "2001:db8:7::/48", "198.51.100.0/24", "2001:db8:7f::8/127"]
        {
            let ban = Event::Ban(BanRecord { target: target.parse().unwrap(), ..record() });
            assert!(ban.encode().contains(&format!(r#""target":"{target}""#)), "{}", ban.encode());
            assert_eq!(Event::decode(ban.encode().as_bytes()), Ok(ban));
            let key = keys.ban(&target.parse().unwrap());
            assert_eq!(key, format!("helo-filter:ban:{target}"));
        }
    }

    #[test]
    fn the_wire_form_is_stable() {
        assert_eq!(
            Event::Ban(record()).encode(),
            r#"{"v":1,"kind":"ban","target":"192.0.2.7","node":"mx1","at_ms":1700000000000,"expires_ms":1700000600000,"reason":"forged_own_name","offences":2,"keep_until_ms":1700086400000}"#
        );
    }

    #[test]
    fn garbage_and_foreign_messages_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"hello", "expected"),
            (b"", "EOF"),
            (br#"{"v":2,"kind":"ban","target":"192.0.2.7","node":"x","at_ms":1}"#, "version 2"),
            (
                br#"{"v":1,"kind":"nuke","target":"192.0.2.7","node":"x","at_ms":1}"#,
                "unknown variant",
            ),
            (br#"{"v":1,"kind":"ban","target":"192.0.2.0/16","node":"x","at_ms":1}"#, "/24 to /32"),
            (br#"{"v":1,"kind":"ban","target":"example.com","node":"x","at_ms":1}"#, "not an IP"),
            (br#"{"v":1,"kind":"ban","target":"192.0.2.7","node":"","at_ms":1}"#, "node name"),
            (
                br#"{"v":1,"kind":"ban","target":"192.0.2.7","node":"x","at_ms":1,"extra":1}"#,
                "unknown field",
            ),
            (br#"{"v":1,"kind":"ban","node":"x","at_ms":1}"#, "missing field"),
            (&[0xff, 0xfe, 0x00], "expected"),
        ];
        for (input, why) in cases {
            let Err(Undecodable(reason)) = Event::decode(input) else {
                panic!("{:?} decoded", String::from_utf8_lossy(input));
            };
            assert!(reason.contains(why), "{:?}: {reason}", String::from_utf8_lossy(input));
        }
        assert!(Event::decode(&vec![b' '; 5000]).is_err());
    }

    #[test]
    fn the_publisher_travels_with_the_message_and_text_is_made_safe() {
        let ban = Event::Ban(record());
        let (event, from) =
            Event::decode_from(ban.encode_from(Some("mx1/42/7")).as_bytes()).unwrap();
        assert_eq!((event, from.as_deref()), (ban.clone(), Some("mx1/42/7")));
        assert_eq!(Event::decode_from(ban.encode().as_bytes()).unwrap().1, None);
        let hostile = br#"{"v":1,"kind":"ban","target":"192.0.2.66","node":"evil","at_ms":1,"reason":"\u001b[31mRED and a reason far longer than the sixty-four bytes a ban can hold"}"#;
        let r = match Event::decode(hostile) {
            Ok(Event::Ban(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.reason, "?[31mRED and a reason far longer than the sixty-four bytes a ban");
        assert!(r.reason.len() <= helo_common::REASON_TEXT_LEN);
        assert_eq!(safe_reason("é".repeat(40).as_str()).len(), 64, "cut at a char boundary");
        let spaced =
            br#"{"v":1,"kind":"unban","target":"192.0.2.66","node":"two words","at_ms":1}"#;
        assert!(Event::decode(spaced).is_err());
    }

    #[test]
    fn keys_live_under_the_prefix_and_the_pattern_escapes_globs() {
        let keys = Keys::new("helo-filter:");
        assert_eq!(keys.channel(), "helo-filter:events");
        assert_eq!(keys.ban(&"192.0.2.7".parse().unwrap()), "helo-filter:ban:192.0.2.7");
        assert_eq!(keys.ban_pattern(), "helo-filter:ban:*");
        assert_eq!(Keys::new("t[1]*:").ban_pattern(), r"t\[1\]\*:ban:*");
    }

    #[test]
    fn activity_follows_the_expiry() {
        let r = record();
        assert!(r.active_at(1_700_000_599_999));
        assert!(!r.active_at(1_700_000_600_000));
        assert!(BanRecord { expires_ms: None, ..r }.active_at(u64::MAX));
    }
}
