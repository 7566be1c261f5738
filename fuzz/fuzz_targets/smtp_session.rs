//! Arbitrary client bytes through the line scanner and the session state machine, as the proxy
//! feeds them: no panic, lines never longer than the buffer or the limit, and a session that
//! passed or closed is never fed again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use helo_agent::config::{Config, HostFacts};
use helo_agent::proxy::session::{Session, Step};
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
                        Step::Pass | Step::Close(_) => return,
                        Step::Reply(answer) | Step::Reject(answer) => {
                            assert!(answer.ends_with(b"\r\n"), "replies end in CRLF");
                            assert!(
                                answer[..3].iter().all(u8::is_ascii_digit),
                                "replies start with a code"
                            );
                        }
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
