//! Arbitrary client bytes through the session as the agent's I/O loop drives it: bytes into
//! [`Session::input`] in chunks whose sizes come from the data, every step [`Session::next_step`]
//! allows, and MTA reply codes taken from the data for the lines forwarded after a pass. No
//! panic; replies well formed; a waiting session is released by the replies it waits for; a
//! session that closed or went opaque is never fed again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use helo_agent::config::{Config, HostFacts};
use helo_agent::judge::Client;
use helo_agent::proxy::session::{AfterReply, Session, Step};
use helo_agent::rules::RuleSet;
use helo_agent::smtp::MAX_COMMAND_LINE;
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
    let client = Client::new("203.0.113.9".parse().unwrap(), None, false);
    let mut session = Session::new(rules(), client, "denied", "mx".into());
    let mut rest = data;
    while !rest.is_empty() {
        let take = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        session.input().extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        while let Some(step) = session.next_step() {
            match step {
                Step::Close(answer, _) => return well_formed(&answer),
                Step::Opaque => return,
                Step::Reply(answer) | Step::Reject(answer) => well_formed(&answer),
                Step::Pass(line) | Step::Forward(line) => {
                    assert!(line.ends_with(b"\n") && line.len() <= MAX_COMMAND_LINE);
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
        }
        assert!(session.input().len() < MAX_COMMAND_LINE, "a full buffer is a step, not a wait");
    }
});
