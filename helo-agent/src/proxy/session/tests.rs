//! The sans-IO session's transcripts: every reply decision, line by line.
use std::path::Path;

use super::*;
use crate::config::{Config, HostFacts};
use crate::rules::{Action, RuleSet};

fn rules(extra: &str) -> std::sync::Arc<RuleSet> {
    let text = format!("[identity]\ndetect = false\ndomains = [\"example.com\"]\n{extra}");
    Config::parse(&text, Path::new("t"), &HostFacts::default()).unwrap().rules
}

/// The doors' law over `rules`, counting reuse in one memory for every test.
fn law(rules: &RuleSet) -> Law<'_> {
    static MEMORY: std::sync::LazyLock<crate::reuse::Memory> =
        std::sync::LazyLock::new(Default::default);
    Law::new(rules, &MEMORY)
}

fn session(rules: &RuleSet) -> Session<'_> {
    Session::new(
        law(rules),
        Client::new("203.0.113.9".parse().unwrap(), None, false),
        "sorry, your HELO host name has been denied",
        "mx.example.com".into(),
    )
}

fn text(step: Step) -> String {
    match step {
        Step::Reply(b) => format!("reply {}", String::from_utf8(b).unwrap()),
        Step::Close(b, _) => format!("close {}", String::from_utf8(b).unwrap()),
        Step::Reject(b) => format!("reject {}", String::from_utf8(b).unwrap()),
        Step::Pass(_) => "pass".into(),
        Step::Forward(line) => format!("forward {}", String::from_utf8_lossy(&line)),
        Step::Chunk(bytes) => format!("chunk {}", String::from_utf8_lossy(&bytes)),
        Step::Stream(len) => format!("stream {len}"),
        Step::Defer => "defer".into(),
        Step::Lookup { helo, client, need } => {
            format!("lookup {} client={client} {need:?}", helo.unwrap_or_default())
        }
    }
}

/// With a resolver, a HELO that DNS can still decide waits for it, and its verdict comes
/// with the answer; one another rule decided never asks.
#[test]
fn a_helo_dns_can_decide_waits_for_it() {
    use crate::rules::{ClientDns, DnsFacts, HeloDns};
    let rules = rules("[checks]\nunknown_helo = \"reject\"\n");
    let mut s = session(&rules);
    s.enable_dns();
    // The HELO's records; then, as a match would rest on it, the client's reverse name.
    let asked = "lookup mail.sender.example client=false Required";
    assert_eq!(text(s.on_line(b"EHLO Mail.Sender.Example")), asked);
    assert!(s.verdict().is_none(), "no verdict before the answer");
    let missing = DnsFacts { helo: HeloDns::Missing, client: ClientDns::NotLooked };
    assert_eq!(text(s.on_dns(missing)), "lookup  client=true Required");
    let unconfirmed = DnsFacts { helo: HeloDns::NotLooked, client: ClientDns::Unconfirmed(vec![]) };
    assert!(text(s.on_dns(unconfirmed)).starts_with("reject 250-mx.example.com"));
    assert_eq!(s.verdict().map(|v| v.rule), Some("unknown_helo"));

    let mut s = session(&rules);
    s.enable_dns();
    assert!(text(s.on_line(b"EHLO localhost")).starts_with("reject"), "decided: no lookup");
    let mut s = session(&rules);
    s.enable_dns();
    assert_eq!(text(s.on_line(b"EHLO mail.sender.example")), asked);
    assert_eq!(
        text(s.on_dns(DnsFacts::default())),
        "pass",
        "no answer (no slot): judged without DNS"
    );
    // Without a resolver nothing waits.
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO mail.sender.example")), "pass");
}

#[test]
fn before_helo_the_proxy_answers_itself() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"NOOP")), "reply 250 2.0.0 Ok\r\n");
    assert_eq!(
        text(s.on_line(b"MAIL FROM:<a@b>")),
        "reply 503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    assert_eq!(
        text(s.on_line(b"GET / HTTP/1.0")),
        "reply 502 5.5.2 Error: command not recognized\r\n"
    );
    assert_eq!(text(s.on_line(b"QUIT")), "close 221 2.0.0 Bye\r\n");
    assert!(s.verdict().is_none());
}

#[test]
fn commands_before_helo_are_limited() {
    let rules = rules("");
    let mut s = session(&rules);
    for _ in 0..MAX_COMMANDS_BEFORE_HELO {
        assert!(matches!(s.on_line(b"NOOP"), Step::Reply(_)));
    }
    assert_eq!(text(s.on_line(b"NOOP")), "close 421 4.7.0 Error: too many commands\r\n");
}

#[test]
fn a_good_helo_passes() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO mail.sender.example")), "pass");
    assert_eq!(s.helo(), Some("mail.sender.example"));
    assert_eq!(s.verdict().unwrap().rule, "pass");
}

#[test]
fn qmail_style_rejection_at_rcpt() {
    let rules = rules("");
    let mut s = session(&rules);
    let transcript: Vec<String> = [
        &b"EHLO mx.example.com"[..],
        b"MAIL FROM:<bot@spam.example>",
        b"RCPT TO:<user@example.com>",
        b"DATA",
        b"BDAT 10 LAST",
        b"STARTTLS",
        b"HELO good.sender.example",
        b"RCPT TO:<user@example.com>",
        b"QUIT",
    ]
    .iter()
    .map(|l| text(s.on_line(l)))
    .collect();
    assert_eq!(
        transcript,
        [
            "reject 250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "reply 250 2.1.0 Ok\r\n",
            "reply 553 5.7.1 sorry, your HELO host name has been denied\r\n",
            "reply 554 5.5.1 Error: no valid recipients\r\n",
            "reply 554 5.5.1 Error: no valid recipients\r\n",
            "reply 454 4.7.0 TLS not available\r\n",
            "reply 250 mx.example.com\r\n",
            "reply 553 5.7.1 sorry, your HELO host name has been denied\r\n",
            "close 221 2.0.0 Bye\r\n",
        ]
    );
    let verdict = s.verdict().unwrap();
    assert_eq!((verdict.action, verdict.rule), (crate::rules::Action::Ban, "forged_identity"));
    assert_eq!(s.helo(), Some("mx.example.com"), "the log names the first HELO");
}

#[test]
fn rejection_at_helo_refuses_every_helo_after() {
    let rules = rules("[reject]\nat = \"helo\"");
    let mut s = session(&rules);
    let deny = "553 5.7.1 sorry, your HELO host name has been denied\r\n";
    assert_eq!(text(s.on_line(b"HELO localhost")), format!("reject {deny}"));
    assert_eq!(
        text(s.on_line(b"HELO mail.sender.example")),
        format!("reply {deny}"),
        "no second chance"
    );
    assert_eq!(
        text(s.on_line(b"MAIL FROM:<a@b>")),
        "reply 503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
}

#[test]
fn a_rejected_session_is_closed_after_too_many_commands() {
    let rules = rules("");
    let mut s = session(&rules);
    assert!(matches!(s.on_line(b"HELO localhost"), Step::Reject(_)));
    for _ in 0..MAX_REJECTED_COMMANDS {
        assert!(matches!(s.on_line(b"NOOP"), Step::Reply(_)));
    }
    assert_eq!(text(s.on_line(b"NOOP")), "close 421 4.7.0 Error: too many errors\r\n");
}

/// Regression (issue 11): only the first HELO was judged, so a forged one could follow a
/// good one and reach the MTA.
#[test]
fn a_forged_helo_after_a_good_one_is_judged_and_rejected() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO good.sender.example")), "pass");
    let mta_said = b"250-mta.test\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n";
    assert_eq!(s.on_reply(250, mta_said), AfterReply::Continue);
    assert_eq!(
        text(s.on_line(b"EHLO mx.example.com")),
        "reject 250-mta.test\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n",
        "the MTA's own answer again: the client cannot tell"
    );
    assert!(s.rejected() && !s.relaying());
    assert_eq!(s.helo(), Some("mx.example.com"), "the log names the HELO that failed");
    assert_eq!(s.helos(), ["good.sender.example", "mx.example.com"]);
    assert_eq!(s.verdict().unwrap().rule, "forged_identity");
    assert_eq!(
        text(s.on_line(b"RCPT TO:<user@example.com>")),
        "reply 553 5.7.1 sorry, your HELO host name has been denied\r\n"
    );
}

/// Pipelined in one write: the forged HELO's answer waits for the replies the MTA owes for
/// the lines before it, so the client reads every reply in order.
#[test]
fn a_later_rejection_waits_for_the_replies_the_mta_owes() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO good.sender.example")), "pass");
    assert_eq!(text(s.on_line(b"MAIL FROM:<a@b.example>")), "forward MAIL FROM:<a@b.example>");
    assert_eq!(s.on_line(b"HELO mx.example.com"), Step::Defer);
    assert!(s.waiting(), "no line is read while the rejection waits");
    assert_eq!(s.on_reply(250, b"250-mta.test\r\n250 8BITMIME\r\n"), AfterReply::Continue);
    assert_eq!(
        s.on_reply(250, b"250 2.1.0 Ok\r\n"),
        AfterReply::Reject(b"250 mta.test\r\n".to_vec()),
        "the MAIL reply was the last one owed; a HELO the MTA never answered: as it would, with \
         the name from its EHLO answer"
    );
    assert!(!s.waiting());
}

#[test]
fn a_changed_helo_that_passes_is_forwarded_and_logged() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO one.sender.example")), "pass");
    assert_eq!(text(s.on_line(b"EHLO two.sender.example")), "forward EHLO two.sender.example");
    assert_eq!(s.verdict().unwrap().action, Action::Pass);
    assert_eq!(s.logged(), ["changed"], "checks.changed fires live (log by default)");
    assert_eq!(s.helo(), Some("two.sender.example"));
}

#[test]
fn starttls_and_data_make_the_session_opaque_only_when_the_mta_accepts() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO good.sender.example")), "pass");
    let ehlo_reply = reply::ehlo("mta.test", &["PIPELINING", "STARTTLS"]);
    assert_eq!(s.on_reply(250, &ehlo_reply), AfterReply::Continue);
    assert_eq!(text(s.on_line(b"STARTTLS")), "forward STARTTLS");
    assert!(s.waiting(), "what follows STARTTLS may be TLS: wait for the reply");
    assert_eq!(s.on_reply(454, b""), AfterReply::Continue, "refused: still plaintext");
    assert!(!s.waiting());
    assert_eq!(text(s.on_line(b"DATA")), "forward DATA");
    assert!(s.waiting());
    assert_eq!(s.on_reply(554, b""), AfterReply::Continue, "no recipients: still commands");
    assert_eq!(
        s.on_line(b"EHLO mx.example.com"),
        Step::Reject(ehlo_reply),
        "a HELO after a refused DATA is judged"
    );

    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO good.sender.example")), "pass");
    assert_eq!(text(s.on_line(b"STARTTLS")), "forward STARTTLS");
    assert_eq!(s.on_reply(250, b""), AfterReply::Continue, "the EHLO reply");
    assert_eq!(s.on_reply(220, b""), AfterReply::Opaque(Opacity::Tls));

    let mut s = session(&rules);
    assert_eq!(text(s.on_line(b"EHLO good.sender.example")), "pass");
    assert_eq!(text(s.on_line(b"DATA")), "forward DATA");
    assert_eq!(s.on_reply(250, b""), AfterReply::Continue);
    assert_eq!(s.on_reply(354, b""), AfterReply::Opaque(Opacity::Data));
}

/// Feeds `bytes` as one read and takes every step it allows (up to a [`Step::Stream`], which
/// the I/O loop would carry out before asking again, or a close).
fn feed(s: &mut Session<'_>, bytes: &[u8]) -> Vec<String> {
    s.input().extend_from_slice(bytes);
    let mut steps = Vec::new();
    while let Some(step) = s.next_step() {
        let last = matches!(step, Step::Stream(_) | Step::Close(..));
        steps.push(text(step));
        if last {
            break;
        }
    }
    steps
}

/// Regression (issue 27): `EHLO good`, then a `BDAT 5` (or `BDAT 0`) that Postfix refuses
/// with 503, then `EHLO <our name>`: the proxy had stopped reading commands at the BDAT, the
/// forged EHLO reached Postfix and the message was delivered. The chunk is length-delimited:
/// relayed to its last byte, and the next line is a command again, judged.
#[test]
fn a_refused_bdat_keeps_the_session_judged() {
    let rules = rules("");
    for (bdat, chunk) in [("BDAT 5", "hello"), ("BDAT 0", ""), ("bdat 7 last", "EHLO x\n")] {
        let mut s = session(&rules);
        assert_eq!(feed(&mut s, b"EHLO good.sender.example\r\n"), ["pass"]);
        let ehlo_reply = reply::ehlo("mta.test", &["PIPELINING", "CHUNKING"]);
        assert_eq!(s.on_reply(250, &ehlo_reply), AfterReply::Continue);
        let mut expected = vec![format!("forward {bdat}\r\n")];
        if !chunk.is_empty() {
            expected.push(format!("chunk {chunk}"));
        }
        expected.push("defer".into());
        let sent = format!("{bdat}\r\n{chunk}EHLO mx.example.com\r\n");
        assert_eq!(feed(&mut s, sent.as_bytes()), expected, "{bdat}");
        assert_eq!(
            s.on_reply(503, b"503 5.5.1 Error: need RCPT command\r\n"),
            AfterReply::Reject(ehlo_reply),
            "{bdat}: the forged EHLO is judged once the BDAT is answered"
        );
        assert_eq!(s.verdict().unwrap().rule, "forged_identity");
        let ehlo = "EHLO good.sender.example\r\n".len();
        assert_eq!(s.consumed(), (ehlo + sent.len()) as u64, "{bdat}: every byte handled");
    }
}

/// A chunk in pieces: what is buffered goes as it is, the rest is streamed (the I/O loop
/// moves it, spliced when large), and the line after it is a command again; a message sent
/// with `BDAT n LAST` is followed by commands the proxy still judges.
#[test]
fn bdat_chunks_are_followed_to_their_last_byte() {
    let rules = rules("");
    let mut s = session(&rules);
    feed(&mut s, b"EHLO good.sender.example\r\n");
    s.on_reply(250, b"250 mta.test\r\n");
    assert_eq!(
        feed(
            &mut s,
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 100000 LAST\r\nSubj"
        ),
        [
            "forward MAIL FROM:<a@b.example>\r\n",
            "forward RCPT TO:<c@d.example>\r\n",
            "forward BDAT 100000 LAST\r\n",
            "chunk Subj",
            "stream 99996",
        ]
    );
    s.streamed(99_991);
    assert_eq!(feed(&mut s, b""), ["stream 5"]);
    assert_eq!(feed(&mut s, b"\r\n.\r\nQ"), ["chunk \r\n.\r\n"], "a dot is chunk data");
    assert_eq!(feed(&mut s, b"UIT\r\n"), ["forward QUIT\r\n"], "then a command again");
    for code in [250, 250, 250, 250] {
        assert_eq!(s.on_reply(code, b""), AfterReply::Continue);
    }
    // After the message: a forged HELO is judged.
    let mut s = session(&rules);
    feed(&mut s, b"EHLO good.sender.example\r\n");
    s.on_reply(250, b"250 mta.test\r\n");
    assert_eq!(feed(&mut s, b"BDAT 3 LAST\r\nhi\n"), ["forward BDAT 3 LAST\r\n", "chunk hi\n"]);
    assert_eq!(s.on_reply(250, b"250 2.0.0 Ok: queued\r\n"), AfterReply::Continue);
    assert_eq!(
        feed(&mut s, b"HELO localhost\r\n"),
        ["reject 250 mta.test\r\n"],
        "a HELO after a message is judged, answered as the MTA answers HELO"
    );
}

/// A BDAT whose size cannot be read: Postfix answers 521 and hangs up; the proxy waits for
/// the answer, and only an MTA that accepts it leaves the session opaque.
#[test]
fn a_bdat_of_unreadable_size_waits_for_the_mta() {
    let rules = rules("");
    for (code, after) in [(521, AfterReply::Continue), (250, AfterReply::Opaque(Opacity::Chunks))] {
        let mut s = session(&rules);
        feed(&mut s, b"EHLO good.sender.example\r\n");
        s.on_reply(250, b"250 mta.test\r\n");
        assert_eq!(feed(&mut s, b"BDAT five LAST\r\nhello"), ["forward BDAT five LAST\r\n"]);
        assert!(s.waiting(), "what follows is unknown until the MTA answers");
        assert_eq!(s.on_reply(code, b""), after, "{code}");
        assert_eq!(s.take_input(), b"hello", "{code}: kept for the relay");
    }
}

/// Where the proxy answers itself, a BDAT is refused and its chunk read and dropped, never
/// taken for commands; one of unreadable size is answered as Postfix answers it.
#[test]
fn a_bdat_the_proxy_answers_has_its_chunk_dropped() {
    let rules = rules("");
    let mut s = session(&rules);
    assert_eq!(
        feed(&mut s, b"BDAT 6\r\nQUIT\r\nNOOP\r\n"),
        ["reply 503 5.5.1 Error: send HELO/EHLO first\r\n", "reply 250 2.0.0 Ok\r\n"]
    );
    assert_eq!(feed(&mut s, b"HELO localhost\r\n").len(), 1);
    assert!(s.rejected());
    assert_eq!(
        feed(&mut s, b"BDAT 10 LAST\r\nRCPT"),
        ["reply 554 5.5.1 Error: no valid recipients\r\n"]
    );
    assert_eq!(feed(&mut s, b" TO:<aQUIT\r\n"), ["close 221 2.0.0 Bye\r\n"], "the chunk dropped");
    let mut s = session(&rules);
    assert_eq!(feed(&mut s, b"BDAT -1\r\n"), ["close 521 5.5.4 Syntax: BDAT count [LAST]\r\n"]);
    let mut s = session(&rules);
    let huge = format!("BDAT {}\r\n", MAX_DISCARDED + 1);
    assert_eq!(feed(&mut s, huge.as_bytes()), ["close 421 4.7.0 Error: too much BDAT content\r\n"]);
}

/// After AUTH the MTA's 334 makes the next line a SASL response: relayed unparsed (`EHLO`
/// is valid base64), up to RFC 4954's 12288 octets; the session waits for each answer.
#[test]
fn sasl_responses_are_relayed_unparsed() {
    let rules = rules("");
    let mut s = session(&rules);
    feed(&mut s, b"EHLO good.sender.example\r\n");
    s.on_reply(250, b"250 mta.test\r\n");
    assert_eq!(feed(&mut s, b"AUTH LOGIN\r\nEHLO\r\n"), ["forward AUTH LOGIN\r\n"]);
    assert!(s.waiting(), "the answer to AUTH says what the next line is");
    assert_eq!(s.on_reply(334, b"334 VXNlcm5hbWU6\r\n"), AfterReply::Continue);
    assert_eq!(feed(&mut s, b""), ["forward EHLO\r\n"], "a response, not a bare EHLO");
    assert_eq!(s.helos(), ["good.sender.example"], "not heard as a HELO");
    assert_eq!(s.on_reply(334, b"334 UGFzc3dvcmQ6\r\n"), AfterReply::Continue);
    let long = format!("{}\r\n", "A".repeat(12_288));
    assert_eq!(feed(&mut s, long.as_bytes()), [format!("forward {long}")]);
    assert_eq!(s.on_reply(235, b"235 2.7.0 Authentication successful\r\n"), AfterReply::Continue);
    assert_eq!(
        feed(&mut s, b"EHLO localhost\r\n"),
        ["reject 250 mta.test\r\n"],
        "commands again: judged, answered as the MTA answered the first"
    );
}

/// Regression (issue 27): after a passed HELO a 2467-byte `AUTH XOAUTH2` line and a
/// 2000-byte `MAIL FROM` got `500 line too long` and a close, though the MTA takes them.
/// The proxy relays lines up to RFC 4954's 12288 octets and keeps its 1000-byte bound where
/// it answers itself.
#[test]
fn long_lines_are_relayed_after_a_pass_and_bounded_where_the_proxy_answers() {
    let rules = rules("");
    let mut s = session(&rules);
    feed(&mut s, b"EHLO good.sender.example\r\n");
    s.on_reply(250, b"250 mta.test\r\n");
    let mail = format!("MAIL FROM:<{}@sender.example>\r\n", "a".repeat(2000));
    assert_eq!(feed(&mut s, mail.as_bytes()), [format!("forward {mail}")]);
    s.on_reply(250, b"");
    let auth = format!("AUTH XOAUTH2 {}\r\n", "dXNlcj1h".repeat(307));
    assert!(auth.len() > 2460);
    assert_eq!(feed(&mut s, auth.as_bytes()), [format!("forward {auth}")]);
    s.on_reply(235, b"");
    let longest = format!("NOOP {}\r\n", "x".repeat(MAX_RELAYED_LINE - 7));
    assert_eq!(longest.len(), MAX_RELAYED_LINE);
    assert_eq!(feed(&mut s, longest.as_bytes()).len(), 1);
    s.on_reply(250, b"");
    let past = "x".repeat(MAX_RELAYED_LINE);
    assert_eq!(feed(&mut s, past.as_bytes()), ["close 500 5.5.2 Error: line too long\r\n"]);

    // Before a HELO, and in a rejected session, the proxy answers: 1000 bytes.
    let mut s = session(&rules);
    let noop = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE));
    assert_eq!(feed(&mut s, noop.as_bytes()), ["close 500 5.5.2 Error: line too long\r\n"]);
    let mut s = session(&rules);
    feed(&mut s, b"HELO localhost\r\n");
    assert_eq!(feed(&mut s, mail.as_bytes()), ["close 500 5.5.2 Error: line too long\r\n"]);
}

#[test]
fn the_pregreet_test_greets_in_two_lines_and_a_patient_client_passes() {
    let rules = rules("");
    let mut s = session(&rules);
    assert!(s.takes_pregreet_test(), "on by default (log)");
    assert_eq!(s.greet(true), b"220-mx.example.com ESMTP\r\n");
    assert!(s.greeting_pending());
    assert_eq!(s.next_step(), None, "nothing sent: wait on");
    assert_eq!(s.on_greet_wait(), b"220 mx.example.com ESMTP\r\n");
    assert!(!s.greeting_pending());
    assert_eq!(feed(&mut s, b"EHLO mail.sender.example\r\n"), ["pass"]);
    assert_eq!(s.pregreet(), None);
    assert!(s.logged().is_empty(), "{:?}", s.logged());

    let mut s = session(&rules);
    assert_eq!(s.greet(false), b"220 mx.example.com ESMTP\r\n", "a pass in force: one line");
    assert!(!s.greeting_pending());
}

/// An impatient client pipelines its whole transaction right after connecting, as bots do.
#[test]
fn a_pregreeter_is_caught_by_the_action_of_checks_pregreet() {
    let impatient: &[u8] = b"EHLO mail.sender.example\r\nMAIL FROM:<a@b.example>\r\n\
          RCPT TO:<c@example.com>\r\nQUIT\r\n";
    let ehlo = "250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
    let protocol_error = "550 5.5.1 Protocol error\r\n";
    let cases: [(&str, &[&str], Option<Action>); 4] = [
        // log: the final line at once, then every command in order, to the MTA.
        (
            "",
            &[
                "reply 220 mx.example.com ESMTP\r\n",
                "pass",
                "forward MAIL FROM:<a@b.example>\r\n",
                "forward RCPT TO:<c@example.com>\r\n",
                "forward QUIT\r\n",
            ],
            None,
        ),
        // reject: no final line (postscreen's way); 550 at RCPT TO, qmail style.
        (
            "[checks]\npregreet = \"reject\"",
            &[
                &format!("reject {ehlo}"),
                "reply 250 2.1.0 Ok\r\n",
                &format!("reply {protocol_error}"),
                "close 221 2.0.0 Bye\r\n",
            ],
            Some(Action::Reject),
        ),
        (
            "[checks]\npregreet = \"ban\"",
            &[
                &format!("reject {ehlo}"),
                "reply 250 2.1.0 Ok\r\n",
                &format!("reply {protocol_error}"),
                "close 221 2.0.0 Bye\r\n",
            ],
            Some(Action::Ban),
        ),
        (
            "[checks]\npregreet = \"reject\"\n[reject]\nat = \"helo\"",
            &[
                &format!("reject {protocol_error}"),
                "reply 503 5.5.1 Error: send HELO/EHLO first\r\n",
                "reply 503 5.5.1 Error: need MAIL command\r\n",
                "close 221 2.0.0 Bye\r\n",
            ],
            Some(Action::Reject),
        ),
    ];
    for (config, transcript, enforced) in cases {
        let rules = rules(config);
        let mut s = session(&rules);
        s.greet(true);
        assert_eq!(feed(&mut s, impatient), transcript, "{config:?}");
        let pregreet = s.pregreet().expect("seen");
        assert_eq!(pregreet.bytes, impatient.len());
        assert!(pregreet.text.starts_with("EHLO mail.sender.example\\r\\nMAIL FROM:"));
        assert!(pregreet.text.ends_with("QUIT\\r\\n"), "{}", pregreet.text);
        let verdict = s.verdict().unwrap();
        match enforced {
            None => {
                assert_eq!(verdict.action, Action::Pass);
                assert_eq!(s.logged(), ["pregreet"], "logged with the session");
            }
            Some(action) => {
                assert_eq!((verdict.action, verdict.rule), (action, "pregreet"), "{config}");
                assert_eq!(verdict.ttl.is_some(), action == Action::Ban);
            }
        }
    }
}

#[test]
fn a_partial_line_or_a_non_command_before_the_greeting_is_a_pregreet_too() {
    let rules = rules("");
    let mut s = session(&rules);
    s.greet(true);
    assert_eq!(feed(&mut s, b"EH"), ["reply 220 mx.example.com ESMTP\r\n"]);
    assert!(!s.greeting_pending());
    assert_eq!(feed(&mut s, b"LO mail.sender.example\r\n"), ["pass"], "the bytes were kept");
    assert_eq!(s.pregreet().unwrap().text, "EH");
    assert_eq!(s.logged(), ["pregreet"]);

    let rules = super::tests::rules("[checks]\npregreet = \"ban\"");
    let mut s = session(&rules);
    s.greet(true);
    let probe = [&b"\x16\x03\x01"[..], &[b'x'; 200], b"\r\n"].concat();
    assert_eq!(feed(&mut s, &probe), ["reply 502 5.5.2 Error: command not recognized\r\n"]);
    let shown = &s.pregreet().unwrap().text;
    assert_eq!(*shown, format!("\\x16\\x03\\x01{}", "x".repeat(97)), "100 bytes, escaped");
    assert_eq!(s.pregreet().unwrap().bytes, probe.len());
    assert!(s.verdict().is_none(), "no HELO, no verdict: the judge hears it at the HELO");
}

#[test]
fn who_takes_the_pregreet_test() {
    let off = rules("[checks]\npregreet = \"off\"");
    assert!(!session(&off).takes_pregreet_test(), "the check is off");
    let on = rules("[allowlist]\nnetworks = [\"203.0.113.0/24\"]");
    assert!(!session(&on).takes_pregreet_test(), "allowlisted");
    let on = rules("");
    let submission = Client::new("203.0.113.9".parse().unwrap(), None, true);
    let s = Session::new(law(&on), submission, "x", "mx".into());
    assert!(!s.takes_pregreet_test(), "a listener that judges no HELO (submission)");
}

#[test]
fn exempt_listener_passes_anything() {
    let rules = rules("");
    let client = Client::new("203.0.113.9".parse().unwrap(), None, true);
    let mut s = Session::new(law(&rules), client, "x", "mx".into());
    assert_eq!(text(s.on_line(b"HELO localhost")), "pass");
    assert_eq!(s.verdict().unwrap().rule, "exempt_listener");
}
