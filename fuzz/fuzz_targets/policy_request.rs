//! Arbitrary bytes from a "Postfix" through the policy request parser, in chunks whose sizes
//! come from the data, as the agent reads them: no panic; the buffer stays bounded; a request
//! once parsed is the same whatever the split (checked against one whole-input parse); an
//! answer is always one `action=` line and an empty line.
#![no_main]

use helo_agent::policy::protocol::{Answer, MAX_LINE, MAX_REQUEST, Parser};
use libfuzzer_sys::fuzz_target;

fn parse_all(chunks: &mut dyn Iterator<Item = &[u8]>) -> (Vec<String>, bool) {
    let mut parser = Parser::default();
    let mut seen = Vec::new();
    for chunk in chunks {
        parser.input().extend_from_slice(chunk);
        loop {
            match parser.next_request() {
                Ok(Some(request)) => {
                    seen.push(format!("{request:?}"));
                    if let Some(helo) = &request.helo_name {
                        let answer = Answer::Refuse { code: 553, text: helo.clone() }.encode();
                        assert!(answer.starts_with(b"action=553 ") && answer.ends_with(b"\n\n"));
                        assert_eq!(answer.iter().filter(|b| **b == b'\n').count(), 2);
                    }
                }
                Ok(None) => {
                    assert!(parser.input().len() <= MAX_REQUEST + MAX_LINE + 256);
                    break;
                }
                Err(_) => return (seen, true),
            }
        }
    }
    (seen, false)
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        let take = (usize::from(rest[0]) % 97 + 1).min(rest.len());
        chunks.push(&rest[..take]);
        rest = &rest[take..];
    }
    let (split, split_failed) = parse_all(&mut chunks.iter().copied());
    let (whole, whole_failed) = parse_all(&mut std::iter::once(data));
    assert_eq!(split_failed, whole_failed, "the verdict on the stream does not depend on reads");
    assert_eq!(split, whole, "requests do not depend on how the stream was read");
});
