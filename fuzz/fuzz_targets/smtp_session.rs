//! Arbitrary client bytes through the session as the agent's I/O loop drives it: bytes into
//! [`Session::input`] in chunks whose sizes come from the data, every step [`Session::next_step`]
//! allows, and MTA reply codes taken from the data for the lines forwarded after a pass. No
//! panic; replies well formed; a waiting session is released by the replies it waits for; a
//! session that closed or went opaque is never fed again.
//!
//! The first byte picks the pregreet check's action (off, log, reject, ban) and whether the
//! greeting waits (the pregreet test's `220-` line); while it waits, a chunk's high bit ends
//! the wait before the chunk arrives (a patient client), else the chunk is a pregreet. Bytes
//! that arrive while the greeting waits always end the wait.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use helo_agent::config::{Config, HostFacts};
use helo_agent::judge::{Client, Law};
use helo_agent::proxy::session::{AfterReply, Session, Step};
use helo_agent::reuse::Memory;
use helo_agent::rules::{ClientDns, DnsFacts, HeloDns, RuleSet};
use helo_agent::smtp::MAX_RELAYED_LINE;
use libfuzzer_sys::fuzz_target;

/// One rule set per action of `checks.pregreet`.
fn rules() -> &'static [RuleSet; 4] {
    static RULES: OnceLock<[RuleSet; 4]> = OnceLock::new();
    RULES.get_or_init(|| {
        ["off", "log", "reject", "ban"].map(|pregreet| {
            let text = format!(
                "[identity]\ndetect = false\ndomains = [\"example.com\"]\naddresses = [\"192.0.2.25\"]\n\
                 [rules]\nregexes = ['^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{{1,3}}){{4}}', '!\\.']\n\
                 [checks]\npregreet = \"{pregreet}\"\n"
            );
            (*Config::parse(&text, Path::new("fuzz"), &HostFacts::default()).unwrap().rules).clone()
        })
    })
}

fn well_formed(answer: &[u8]) {
    assert!(answer.ends_with(b"\r\n"), "replies end in CRLF");
    assert!(answer[..3].iter().all(u8::is_ascii_digit), "replies start with a code");
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else { return };
    let client = Client::new("203.0.113.9".parse().unwrap(), None, false);
    let rules = &rules()[usize::from(first & 3)];
    static MEMORY: OnceLock<Memory> = OnceLock::new();
    let law = Law::new(rules, MEMORY.get_or_init(Memory::default));
    let mut session = Session::new(law, client, "denied", "mx".into());
    if first & 8 != 0 {
        session.enable_dns();
    }
    // What "DNS" answers a lookup, from the data.
    let answer = || match first >> 5 {
        0 => None,
        1 => Some(HeloDns::Missing),
        2 => Some(HeloDns::TempFail("timeout".into())),
        _ => Some(HeloDns::Found { addresses: vec![client.ip], mx: first & 16 != 0 }),
    };
    if first & 4 != 0 {
        let teaser = session.greet(true);
        assert!(teaser.starts_with(b"220-") && session.greeting_pending());
        well_formed(&teaser);
    }
    while !rest.is_empty() {
        if session.greeting_pending() && rest[0] & 0x80 != 0 {
            let greeting = session.on_greet_wait();
            assert!(greeting.starts_with(b"220 ") && !session.greeting_pending());
            well_formed(&greeting);
        }
        let take = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        session.input().extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        let mut next = session.next_step();
        while let Some(step) = next.take() {
            match step {
                Step::Lookup { helo, client, .. } => {
                    assert!(first & 8 != 0, "DNS only where asked for");
                    assert!(helo.as_ref().is_none_or(|name| name.contains('.')), "names only");
                    let helo = if helo.is_some() { answer().unwrap_or_default() } else { HeloDns::NotLooked };
                    let client =
                        if client { ClientDns::Unconfirmed(vec![]) } else { ClientDns::NotLooked };
                    next = Some(session.on_dns(DnsFacts { helo, client }));
                    continue;
                }
                Step::Close(answer, _) => return well_formed(&answer),
                Step::Reply(answer) | Step::Reject(answer) => well_formed(&answer),
                Step::Pass(line) | Step::Forward(line) => {
                    assert!(line.ends_with(b"\n") && line.len() <= MAX_RELAYED_LINE);
                }
                Step::Chunk(bytes) => assert!(!bytes.is_empty(), "a chunk step moves bytes"),
                Step::Stream(len) => {
                    // The rest of a BDAT chunk, straight from the data, as the I/O loop moves
                    // it from the socket.
                    assert!(len > 0 && session.input().is_empty());
                    if rest.is_empty() {
                        return;
                    }
                    let moved = (len.min(rest.len() as u64)) as usize;
                    rest = &rest[moved..];
                    session.streamed(moved as u64);
                }
                Step::Defer => {}
            }
            // The MTA answers what it owes while the session waits, codes from the data.
            let mut answered = 0;
            while session.waiting() {
                answered += 1;
                assert!(answered < 10_000, "a waiting session is released by replies");
                let code = 200 + u16::from(rest.first().copied().unwrap_or(0)) * 2;
                match session.on_reply(code, b"250 mta\r\n") {
                    AfterReply::Opaque(_) => return,
                    AfterReply::Reject(answer) => well_formed(&answer),
                    AfterReply::Continue => {}
                }
            }
            next = session.next_step();
        }
        assert!(session.input().len() < MAX_RELAYED_LINE, "a full buffer is a step, not a wait");
        assert!(!session.greeting_pending(), "bytes during the wait end it (a pregreet)");
        assert!(first & 4 != 0 || session.pregreet().is_none(), "no teaser, no pregreet");
        if session.pregreet().is_none() {
            assert!(session.verdict().is_none_or(|v| v.rule != "pregreet"), "judged on facts");
        }
    }
});
