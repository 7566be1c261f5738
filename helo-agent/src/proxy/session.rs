//! One client session up to the verdict, and after a rejection: pure, no I/O. The caller feeds
//! it one command line at a time and carries out the [`Step`] it returns.
//!
//! Before HELO the proxy answers the client itself (the MTA has only sent its greeting). At
//! HELO/EHLO the rules decide: a pass hands the HELO line, and whatever the client pipelined
//! after it, to the MTA and the proxy steps aside; a rejection ends the MTA's part (it gets a
//! QUIT) and the proxy finishes the transcript alone, qmail style: `553` at every RCPT TO (or at
//! the HELO itself), DATA refused. A rejected session stays rejected, whatever HELO comes next.

use std::net::IpAddr;

use crate::rules::{Facts, RejectAt, RuleSet, Verdict};
use crate::smtp::{Command, reply};

/// Commands a rejected session may send before it is closed.
pub const MAX_REJECTED_COMMANDS: u32 = 50;
/// Commands a client may send before its HELO/EHLO (NOOP floods, HTTP probes).
pub const MAX_COMMANDS_BEFORE_HELO: u32 = 20;

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this to the client and read on.
    Reply(Vec<u8>),
    /// Write this to the client and close the session.
    Close(Vec<u8>),
    /// The verdict is pass: send the HELO line and everything buffered after it to the MTA,
    /// then relay both directions untouched.
    Pass,
    /// The verdict is reject or ban: tell the MTA QUIT and let it go, write this to the client,
    /// and read on.
    Reject(Vec<u8>),
}

pub struct Session<'a> {
    rules: &'a RuleSet,
    client: IpAddr,
    exempt_listener: bool,
    reject_message: &'a str,
    /// The name to answer EHLO with in a rejected session: the MTA's, from its greeting.
    host: String,
    helos: Vec<String>,
    verdict: Option<Verdict>,
    rejected: bool,
    rejected_commands: u32,
    commands_before_helo: u32,
}

impl<'a> Session<'a> {
    pub fn new(
        rules: &'a RuleSet,
        client: IpAddr,
        exempt_listener: bool,
        reject_message: &'a str,
        host: String,
    ) -> Self {
        Session {
            rules,
            client,
            exempt_listener,
            reject_message,
            host,
            helos: Vec::new(),
            verdict: None,
            rejected: false,
            rejected_commands: 0,
            commands_before_helo: 0,
        }
    }

    /// The verdict, once a HELO/EHLO was judged.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// The first HELO/EHLO argument the client sent.
    pub fn helo(&self) -> Option<&str> {
        self.helos.first().map(String::as_str)
    }

    /// One command line (without its terminator).
    pub fn on_line(&mut self, line: &[u8]) -> Step {
        let command = Command::parse(line);
        if self.rejected {
            return self.after_rejection(command);
        }
        if !matches!(command, Command::Helo(_) | Command::Ehlo(_) | Command::Quit) {
            self.commands_before_helo += 1;
            if self.commands_before_helo > MAX_COMMANDS_BEFORE_HELO {
                return Step::Close(reply::line(421, "4.7.0", "Error: too many commands"));
            }
        }
        match command {
            Command::Helo(argument) | Command::Ehlo(argument) => self.judge(argument, line),
            Command::Quit => Step::Close(reply::line(221, "2.0.0", "Bye")),
            Command::Noop => Step::Reply(reply::line(250, "2.0.0", "Ok")),
            Command::Rset => Step::Reply(reply::line(250, "2.0.0", "Ok")),
            Command::Other(verb) if verb.is_empty() => {
                Step::Reply(reply::line(500, "5.5.2", "Error: bad syntax"))
            }
            Command::Other(_) => {
                Step::Reply(reply::line(502, "5.5.2", "Error: command not recognized"))
            }
            _ => Step::Reply(reply::line(503, "5.5.1", "Error: send HELO/EHLO first")),
        }
    }

    fn judge(&mut self, argument: String, line: &[u8]) -> Step {
        let verdict = self.rules.classify(&Facts {
            client: Some(self.client),
            argument: &argument,
            previous: &self.helos,
            exempt_listener: self.exempt_listener,
        });
        self.helos.push(argument);
        if verdict.action == crate::rules::Action::Pass {
            self.verdict = Some(verdict);
            return Step::Pass;
        }
        let ehlo = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EHLO");
        let answer = match verdict.reject_at {
            RejectAt::Helo => self.denial(&verdict),
            RejectAt::Rcpt if ehlo => reply::ehlo(&self.host, &["PIPELINING", "8BITMIME"]),
            RejectAt::Rcpt => format!("250 {}\r\n", self.host).into_bytes(),
        };
        self.verdict = Some(verdict);
        self.rejected = true;
        Step::Reject(answer)
    }

    /// The reply that says no: the matching entry's own reply, or 553 with the configured text.
    fn denial(&self, verdict: &Verdict) -> Vec<u8> {
        match &verdict.reply {
            Some(custom) => format!("{} {}\r\n", custom.code, custom.text).into_bytes(),
            None => reply::line(553, "5.7.1", self.reject_message),
        }
    }

    /// Commands after a rejection, answered here; the MTA is gone.
    fn after_rejection(&mut self, command: Command) -> Step {
        self.rejected_commands += 1;
        if self.rejected_commands > MAX_REJECTED_COMMANDS {
            return Step::Close(reply::line(421, "4.7.0", "Error: too many errors"));
        }
        let verdict = self.verdict.as_ref().expect("rejected sessions have a verdict");
        let at_helo = verdict.reject_at == RejectAt::Helo;
        Step::Reply(match command {
            Command::Quit => return Step::Close(reply::line(221, "2.0.0", "Bye")),
            Command::Helo(_) | Command::Ehlo(_) if at_helo => self.denial(verdict),
            Command::Helo(_) => format!("250 {}\r\n", self.host).into_bytes(),
            Command::Ehlo(_) => reply::ehlo(&self.host, &["PIPELINING", "8BITMIME"]),
            Command::Mail if at_helo => reply::line(503, "5.5.1", "Error: send HELO/EHLO first"),
            Command::Mail => reply::line(250, "2.1.0", "Ok"),
            Command::Rcpt if at_helo => reply::line(503, "5.5.1", "Error: need MAIL command"),
            Command::Rcpt => self.denial(verdict),
            Command::Data | Command::Bdat => {
                reply::line(554, "5.5.1", "Error: no valid recipients")
            }
            Command::Rset | Command::Noop => reply::line(250, "2.0.0", "Ok"),
            Command::StartTls => reply::line(454, "4.7.0", "TLS not available"),
            Command::Auth => reply::line(503, "5.5.1", "Error: authentication not enabled"),
            Command::Vrfy => reply::line(502, "5.5.1", "VRFY command is disabled"),
            Command::Help | Command::Other(_) => {
                reply::line(502, "5.5.2", "Error: command not recognized")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, HostFacts};

    fn rules(extra: &str) -> std::sync::Arc<RuleSet> {
        let text = format!("[identity]\ndetect = false\ndomains = [\"example.com\"]\n{extra}");
        Config::parse(&text, Path::new("t"), &HostFacts::default()).unwrap().rules
    }

    fn session(rules: &RuleSet) -> Session<'_> {
        Session::new(
            rules,
            "203.0.113.9".parse().unwrap(),
            false,
            "sorry, your HELO host name has been denied",
            "mx.example.com".into(),
        )
    }

    fn text(step: Step) -> String {
        match step {
            Step::Reply(b) => format!("reply {}", String::from_utf8(b).unwrap()),
            Step::Close(b) => format!("close {}", String::from_utf8(b).unwrap()),
            Step::Reject(b) => format!("reject {}", String::from_utf8(b).unwrap()),
            Step::Pass => "pass".into(),
        }
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
        assert_eq!(s.on_line(b"EHLO mail.sender.example"), Step::Pass);
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

    #[test]
    fn exempt_listener_passes_anything() {
        let rules = rules("");
        let mut s = Session::new(&rules, "203.0.113.9".parse().unwrap(), true, "x", "mx".into());
        assert_eq!(s.on_line(b"HELO localhost"), Step::Pass);
        assert_eq!(s.verdict().unwrap().rule, "exempt_listener");
    }
}
