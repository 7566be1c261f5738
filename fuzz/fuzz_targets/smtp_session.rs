//! Arbitrary client bytes through the line scanner and the session state machine, as the proxy
//! feeds them, with MTA reply codes taken from the data for the lines forwarded after a pass:
//! no panic, lines never longer than the buffer or the limit, replies well formed, a waiting
//! session released by the replies it waits for, and a session that closed or went opaque is
//! never fed again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use helo_agent::config::{Config, HostFacts};
use helo_agent::proxy::session::{AfterReply, Session, Step};
use helo_agent::rules::RuleSet;
use helo_agent::smtp::{LineScan, MAX_COMMAND_LINE, scan_line};
use libfuzzer_sys::fuzz_target;

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let text = "[identity]\ndetect = false\ndomains = [\"example.com\"]\naddresses = [\"192.0.2.25\"]\n\
                    [rules]\nregexes = ['^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}', '!\\.']\n";
        (*Config::parse(text, Path::new("fuzz"), &HostFacts::default()).unwrap().rules).clone()
    })
}

fn well_formed(answer: &[u8]) {
    assert!(answer.ends_with(b"\r\n"), "replies end in CRLF");
    assert!(answer[..3].iter().all(u8::is_ascii_digit), "replies start with a code");
}

fuzz_target!(|data: &[u8]| {
    let mut session =
        Session::new(rules(), "203.0.113.9".parse().unwrap(), false, "denied", "mx".into());
    let mut buf: Vec<u8> = Vec::new();
    // Feed in chunks whose sizes come from the data itself, as reads would split it.
    let mut rest = data;
    while !rest.is_empty() {
        let take = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match scan_line(&buf, MAX_COMMAND_LINE) {
                LineScan::Line { len, content } => {
                    assert!(content < len && len <= buf.len() && len <= MAX_COMMAND_LINE);
                    match session.on_line(&buf[..content]) {
                        Step::Close(_) | Step::Opaque => return,
                        Step::Pass | Step::Forward | Step::Defer => {
                            // The MTA answers what it owes, with codes taken from the data.
                            let mut answered = 0;
                            while session.waiting() {
                                answered += 1;
                                assert!(
                                    answered < 10_000,
                                    "a waiting session is released by replies"
                                );
                                let code = 200 + u16::from(rest.first().copied().unwrap_or(0)) * 2;
                                match session.on_reply(code) {
                                    AfterReply::Opaque(_) => return,
                                    AfterReply::Reject(answer) => well_formed(&answer),
                                    AfterReply::Continue => {}
                                }
                            }
                        }
                        Step::Reply(answer) | Step::Reject(answer) => well_formed(&answer),
                    }
                    buf.drain(..len);
                }
                LineScan::NeedMore => {
                    assert!(buf.len() < MAX_COMMAND_LINE);
                    break;
                }
                LineScan::TooLong => return,
            }
        }
    }
});
