//! One client session, pure, no I/O: every reply decision the proxy makes, and what the MTA's
//! replies mean for the session. The session owns the client's input buffer: the I/O loop
//! reads into [`Session::input`], asks [`Session::next_step`] what to do until it says "read more",
//! feeds the codes of the MTA's complete replies to [`Session::on_reply`], and carries out what
//! comes back. Timeouts and shutdown are decided here too ([`Session::on_timeout`],
//! [`Session::on_shutdown`]), so the fuzz target drives exactly what the agent runs.
//!
//! Before HELO the proxy answers the client itself. At HELO/EHLO the rules decide. A pass
//! connects the MTA and the proxy forwards the client's commands one line at a time, judging
//! every later HELO/EHLO the same way, until the session becomes opaque: STARTTLS accepted (a
//! 2xx: the rest is TLS the proxy cannot read), DATA accepted (354) or BDAT (message data
//! follows). A HELO that fails, first or later, ends the MTA's part (QUIT, after the replies
//! it still owes the client) and the proxy finishes the transcript alone, qmail style: `553`
//! at every RCPT TO (or at the HELO itself), DATA refused. A rejected session stays rejected,
//! whatever HELO comes next.
//!
//! Greeting itself, the proxy may run the pregreet test (postscreen's, see
//! [`Session::greet`]): a `220-` line first, the final `220 ` line once the wait is over
//! ([`Session::on_greet_wait`]). A client that sends anything before it is a pregreeter: its
//! bytes stay buffered and are handled in order as commands, and the judge hears of it at the
//! HELO (`checks.pregreet`). Where the check only logs, the final line goes out at once, so
//! an impatient client reads a whole greeting before the replies to what it sent; where it
//! rejects, the final line is never sent (postscreen sends no banner to a pregreeter it
//! enforces on), so a bot reading replies in lock step gets each answer in turn.

use std::collections::VecDeque;

use super::header;
use crate::dns::Need;
use crate::judge::{Client, End, Heard, Hearing, Law};
use crate::rules::{Check, CheckAction, DnsFacts, RejectAt, Verdict};
use crate::smtp::{LineScan, MAX_COMMAND_LINE, SmtpCommand, reply, scan_line};

/// Commands a rejected session may send before it is closed.
pub const MAX_REJECTED_COMMANDS: u32 = 50;
/// Commands a client may send before its HELO/EHLO (NOOP floods, HTTP probes).
pub const MAX_COMMANDS_BEFORE_HELO: u32 = 20;

/// What to do with one client line.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this to the client and read on.
    Reply(Vec<u8>),
    /// Write this to the client and close the session, which ended this way.
    Close(Vec<u8>, End),
    /// The first HELO passed: connect the MTA (unless it greeted), send it this line, and
    /// watch its replies.
    Pass(Vec<u8>),
    /// Send this line to the MTA; its reply comes back through [`Session::on_reply`].
    Forward(Vec<u8>),
    /// BDAT: send [`Session::take_input`] (the BDAT line and everything after it) to the MTA;
    /// the chunk follows at once, so the session is opaque from here (message data).
    Opaque,
    /// The verdict is reject or ban: tell the MTA QUIT and let it go, write this to the
    /// client, and read on.
    Reject(Vec<u8>),
    /// A later HELO failed while the MTA still owes replies to earlier commands: relay those
    /// first. The rejection comes from [`Session::on_reply`] once they are in.
    Defer,
    /// The HELO's verdict depends on DNS: look `name` up (and the client's reverse name) and
    /// give the answer to [`Session::on_dns`], which decides.
    Lookup { name: String, need: Need },
}

/// What a complete MTA reply means, after it was relayed to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterReply {
    /// Read on.
    Continue,
    /// The session is opaque from here: relay the rest untouched.
    Opaque(Opacity),
    /// The owed replies are in: tell the MTA QUIT, write this to the client, read on.
    Reject(Vec<u8>),
}

/// Why a session became opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opacity {
    /// STARTTLS was accepted: both directions are TLS from here. The proxy can read neither
    /// commands nor replies, and never writes into the stream again.
    Tls,
    /// Message data after DATA was accepted (354): the MTA's replies stay plaintext, so the
    /// relay still sees whether the MTA said goodbye, and the client's data is lines up to the
    /// lone dot that ends it.
    Data,
    /// BDAT: message data in chunks of a stated size, not lines. The replies are watched as
    /// with DATA; where the client's data ends, the relay cannot tell.
    Chunks,
}

/// What a forwarded line's reply will mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owed {
    Reply,
    /// A HELO (`false`) or EHLO (`true`) that passed: its reply is what the proxy answers a
    /// later one with, once the session is rejected.
    Helo(bool),
    StartTls,
    Data,
    /// A RCPT TO: a 2xx says the MTA took a recipient (what a pass is given for).
    Rcpt,
}

/// Where the greeting stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Greeting {
    /// Complete: the proxy's one line, its final line, or the MTA's banner.
    Done,
    /// The pregreet test: the `220-` line is out, the final line waits for the wait's end.
    Teaser,
}

/// What a pregreeter sent before its turn, for the session's log line (postscreen logs
/// `PREGREET <count> after <time> from [address]:port: <text>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pregreet {
    /// The bytes buffered when the pregreet was seen.
    pub bytes: usize,
    /// The first 100 of them, non-printable ones escaped (`\r\n`).
    pub text: String,
}

/// Bytes of a pregreet kept for the log, as postscreen keeps.
const PREGREET_SHOWN: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    BeforeHelo,
    /// A HELO passed: lines go to the MTA.
    Passed,
    Rejected,
}

pub struct Session<'a> {
    law: Law<'a>,
    client: Client,
    reject_message: &'a str,
    /// The name to greet with, and to answer EHLO with in a rejected session: ours, or the
    /// MTA's, from its greeting.
    host: String,
    /// The judging of every HELO: the verdict, the HELOs, the logged rules.
    hearing: Hearing,
    phase: Phase,
    /// Replies the MTA owes for forwarded lines, oldest first.
    owed: VecDeque<Owed>,
    /// A later HELO's rejection (`true`: an EHLO), held until the MTA's owed replies are
    /// relayed; the answer is made then, from what the MTA said by then.
    deferred: Option<bool>,
    /// The MTA accepted a recipient: a 2xx to RCPT TO, or 354 to DATA (which it gives only
    /// with a recipient accepted).
    accepted: bool,
    /// The MTA's own replies to HELO and EHLO, replayed to a rejected client's HELO/EHLO, so it
    /// hears what it heard from the MTA before.
    mta_helo_reply: Option<Vec<u8>>,
    mta_ehlo_reply: Option<Vec<u8>>,
    rejected_commands: u32,
    commands_before_helo: u32,
    /// Client bytes not handled yet.
    buf: Vec<u8>,
    /// Client bytes handled so far.
    consumed: u64,
    greeting: Greeting,
    /// The client spoke before the greeting was complete.
    pregreet: Option<Pregreet>,
    /// The line of a HELO whose verdict waits for DNS ([`Step::Lookup`]), which
    /// [`Session::on_dns`] completes.
    lookup: Option<Vec<u8>>,
}

impl<'a> Session<'a> {
    pub fn new(law: Law<'a>, client: Client, reject_message: &'a str, host: String) -> Self {
        Session {
            law,
            client,
            reject_message,
            host,
            hearing: Hearing::new(&client),
            phase: Phase::BeforeHelo,
            owed: VecDeque::new(),
            deferred: None,
            accepted: false,
            mta_helo_reply: None,
            mta_ehlo_reply: None,
            rejected_commands: 0,
            commands_before_helo: 0,
            buf: Vec::new(),
            consumed: 0,
            greeting: Greeting::Done,
            pregreet: None,
            lookup: None,
        }
    }

    /// The door has a resolver: a HELO that DNS can still decide is judged after
    /// [`Step::Lookup`] and [`Session::on_dns`].
    pub fn enable_dns(&mut self) {
        self.hearing.look();
    }

    /// The MTA greeted (`proxy.greeting = "mta"`): `host` is the name from its banner, which a
    /// rejected session's EHLO is answered with.
    pub fn set_host(&mut self, host: String) {
        self.host = host;
    }

    /// What DNS said (`None`: nothing, no slot free) for the HELO of the last
    /// [`Step::Lookup`]: its verdict now.
    pub fn on_dns(&mut self, facts: Option<DnsFacts>) -> Step {
        let line = self.lookup.take().expect("on_dns answers a Step::Lookup");
        self.hearing.on_dns(&self.law, facts.as_ref());
        self.decided(line)
    }

    /// Whether this client takes the pregreet test where the proxy greets itself: the check is
    /// on, and the client is not exempt (allowlisted, or on a listener that judges no HELO:
    /// submission clients never wait). A client with a pass in force skips it too; the pass
    /// cache is the caller's.
    pub fn takes_pregreet_test(&self) -> bool {
        let rules = self.law.rules();
        rules.action(Check::Pregreet) != CheckAction::Off
            && !self.client.exempt
            && !rules.allowlist.iter().any(|net| net.contains(&self.client.ip))
    }

    /// The proxy's own greeting: with `teaser`, the first line of a two-line greeting
    /// (`220-`), the final one following from [`Session::on_greet_wait`] or a pregreet;
    /// without, the whole greeting in one line.
    pub fn greet(&mut self, teaser: bool) -> Vec<u8> {
        if teaser {
            self.greeting = Greeting::Teaser;
            format!("220-{} ESMTP\r\n", self.host).into_bytes()
        } else {
            self.greeting = Greeting::Done;
            self.final_greeting()
        }
    }

    fn final_greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP\r\n", self.host).into_bytes()
    }

    /// Whether the greeting waits for the pregreet wait's end (the deadline to wait for).
    pub fn greeting_pending(&self) -> bool {
        self.greeting == Greeting::Teaser
    }

    /// The pregreet wait is over and the client said nothing: it passed. The final greeting
    /// line, to write; the session then reads commands.
    pub fn on_greet_wait(&mut self) -> Vec<u8> {
        debug_assert!(self.greeting == Greeting::Teaser, "only a waiting greeting ends");
        self.greeting = Greeting::Done;
        self.final_greeting()
    }

    /// What the client sent before the greeting was complete, if it did.
    pub fn pregreet(&self) -> Option<&Pregreet> {
        self.pregreet.as_ref()
    }

    /// Bytes arrived while the greeting waited: a pregreet. Noted for the judge and the log;
    /// the bytes stay buffered, to be handled as commands. The final greeting line to write
    /// now where the check does not enforce (an impatient client reads a whole greeting
    /// first); none where it does, as postscreen sends none.
    fn pregreeted(&mut self) -> Option<Vec<u8>> {
        self.greeting = Greeting::Done;
        let shown = &self.buf[..self.buf.len().min(PREGREET_SHOWN)];
        let text = shown.iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from);
        self.pregreet = Some(Pregreet { bytes: self.buf.len(), text: text.collect() });
        self.hearing.pregreeted();
        match self.law.rules().action(Check::Pregreet) {
            CheckAction::Reject | CheckAction::Ban => None,
            CheckAction::Off | CheckAction::Log => Some(self.final_greeting()),
        }
    }

    /// Where the I/O loop reads the client's bytes to (it reserves room first).
    pub fn input(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The bytes not handled yet, for the relay once the session is opaque.
    pub fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Client bytes handled so far (lines taken by [`Session::next_step`]).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// What to do with what is buffered; `None`: read more (or, while [`Session::waiting`],
    /// wait for the MTA). Lines are taken in order (PIPELINING).
    pub fn next_step(&mut self) -> Option<Step> {
        if self.waiting() {
            return None;
        }
        if self.greeting == Greeting::Teaser {
            if self.buf.is_empty() {
                return None;
            }
            if let Some(greeting) = self.pregreeted() {
                return Some(Step::Reply(greeting));
            }
        }
        // A PROXY header from a peer not in proxy.trusted_proxies: refused, never believed.
        if self.consumed == 0 && refuses_header(&self.buf) {
            let refusal =
                reply::line(554, "5.7.0", "Error: PROXY header from an untrusted address");
            return Some(Step::Close(refusal, End::UntrustedProxyHeader));
        }
        let (len, content) = match scan_line(&self.buf, MAX_COMMAND_LINE) {
            LineScan::Line { len, content } => (len, content),
            LineScan::NeedMore => return None,
            LineScan::TooLong => {
                let too_long = reply::line(500, "5.5.2", "Error: line too long");
                return Some(Step::Close(too_long, End::LineTooLong));
            }
        };
        let line: Vec<u8> = self.buf.drain(..len).collect();
        self.consumed += len as u64;
        Some(match self.take_line(line, content) {
            Step::Opaque => {
                // The BDAT line goes with its chunk: put it back.
                self.consumed -= len as u64;
                Step::Opaque
            }
            step => step,
        })
    }

    /// The client said nothing in time: before a verdict `proxy.helo_timeout`, after one
    /// `proxy.idle_timeout`.
    /// The last reply, and the session's end.
    pub fn on_timeout(&self) -> (Vec<u8>, End) {
        (reply::line(421, "4.4.2", "Error: timeout exceeded"), End::Timeout)
    }

    /// The agent is shutting down (for a session relaying mail: its grace is over).
    /// The last reply, and the session's end.
    pub fn on_shutdown(&self) -> (Vec<u8>, End) {
        let closing = reply::line(421, "4.3.2", "Error: service shutting down, try again later");
        (closing, End::Shutdown)
    }

    /// The verdict on the HELO that decided the session: the first failing one, else the
    /// latest one that passed.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.hearing.verdict()
    }

    /// The HELO/EHLO argument the verdict is about.
    pub fn helo(&self) -> Option<&str> {
        self.hearing.helo()
    }

    /// Every HELO/EHLO argument the proxy saw, in order.
    pub fn helos(&self) -> &[String] {
        self.hearing.helos()
    }

    /// Rules that matched in `log` (dry-run) mode, over every HELO of the session.
    pub fn logged(&self) -> &[&'static str] {
        self.hearing.logged()
    }

    /// Whether the session was rejected (by any of its HELOs).
    /// Whether the MTA accepted a recipient in this session (as far as the proxy could read:
    /// not inside TLS).
    pub fn accepted(&self) -> bool {
        self.accepted
    }

    pub fn rejected(&self) -> bool {
        self.phase == Phase::Rejected
    }

    /// Whether lines go to the MTA: a HELO passed and none failed since.
    pub fn relaying(&self) -> bool {
        self.phase == Phase::Passed
    }

    /// Whether the MTA's replies are read: lines go to it, or a rejection waits for the
    /// replies it still owes.
    pub fn hears_mta(&self) -> bool {
        self.phase == Phase::Passed || self.deferred.is_some()
    }

    /// Whether the next client line must wait for the MTA: its reply to STARTTLS or DATA
    /// decides whether what follows is commands at all, and a deferred rejection waits for
    /// the replies the MTA still owes.
    pub fn waiting(&self) -> bool {
        self.deferred.is_some() || matches!(self.owed.back(), Some(Owed::StartTls | Owed::Data))
    }

    /// One command line (without its terminator).
    pub fn on_line(&mut self, line: &[u8]) -> Step {
        self.take_line(line.to_vec(), line.len())
    }

    /// One line, its terminator after `content` bytes; a line bound for the MTA comes back in
    /// the step.
    fn take_line(&mut self, line: Vec<u8>, content: usize) -> Step {
        let command = SmtpCommand::parse(&line[..content]);
        match self.phase {
            Phase::Rejected => self.after_rejection(command),
            Phase::Passed => self.forward(command, line),
            Phase::BeforeHelo => self.before_helo(command, line),
        }
    }

    /// The MTA sent this complete reply, with this code (relayed to the client already).
    pub fn on_reply(&mut self, code: u16, reply: &[u8]) -> AfterReply {
        let owed = self.owed.pop_front();
        if let Some(Owed::Helo(ehlo)) = owed
            && code == 250
        {
            let kept = if ehlo { &mut self.mta_ehlo_reply } else { &mut self.mta_helo_reply };
            *kept = Some(reply.to_vec());
        }
        if self.owed.is_empty()
            && let Some(ehlo) = self.deferred.take()
        {
            let verdict = self.hearing.verdict().expect("a deferred rejection has its verdict");
            return AfterReply::Reject(self.helo_answer(ehlo, verdict));
        }
        match owed {
            Some(Owed::Rcpt) if (200..300).contains(&code) => {
                self.accepted = true;
                AfterReply::Continue
            }
            Some(Owed::StartTls) if (200..300).contains(&code) => AfterReply::Opaque(Opacity::Tls),
            Some(Owed::Data) if code == 354 => {
                self.accepted = true;
                AfterReply::Opaque(Opacity::Data)
            }
            _ => AfterReply::Continue,
        }
    }

    fn before_helo(&mut self, command: SmtpCommand, line: Vec<u8>) -> Step {
        if !matches!(command, SmtpCommand::Helo(_) | SmtpCommand::Ehlo(_) | SmtpCommand::Quit) {
            self.commands_before_helo += 1;
            if self.commands_before_helo > MAX_COMMANDS_BEFORE_HELO {
                let limit = reply::line(421, "4.7.0", "Error: too many commands");
                return Step::Close(limit, End::Closed);
            }
        }
        match command {
            SmtpCommand::Helo(argument) | SmtpCommand::Ehlo(argument) => self.judge(argument, line),
            SmtpCommand::Quit => Step::Close(reply::line(221, "2.0.0", "Bye"), End::Closed),
            SmtpCommand::Noop => Step::Reply(reply::line(250, "2.0.0", "Ok")),
            SmtpCommand::Rset => Step::Reply(reply::line(250, "2.0.0", "Ok")),
            SmtpCommand::Other(verb) if verb.is_empty() => {
                Step::Reply(reply::line(500, "5.5.2", "Error: bad syntax"))
            }
            SmtpCommand::Other(_) => {
                Step::Reply(reply::line(502, "5.5.2", "Error: command not recognized"))
            }
            _ => Step::Reply(reply::line(503, "5.5.1", "Error: send HELO/EHLO first")),
        }
    }

    /// A line after a pass: judged if it is a HELO, else bound for the MTA.
    fn forward(&mut self, command: SmtpCommand, line: Vec<u8>) -> Step {
        let owed = match command {
            SmtpCommand::Helo(argument) | SmtpCommand::Ehlo(argument) => {
                return self.judge(argument, line);
            }
            SmtpCommand::Bdat => {
                self.buf.splice(0..0, line);
                return Step::Opaque;
            }
            SmtpCommand::StartTls => Owed::StartTls,
            SmtpCommand::Data => Owed::Data,
            SmtpCommand::Rcpt => Owed::Rcpt,
            _ => Owed::Reply,
        };
        self.owed.push_back(owed);
        Step::Forward(line)
    }

    /// A HELO/EHLO: heard, then the session goes on or is rejected (once DNS has answered,
    /// where it can still decide).
    fn judge(&mut self, argument: String, line: Vec<u8>) -> Step {
        match self.hearing.hear(&self.law, &argument, None) {
            Heard::Judged => self.decided(line),
            Heard::Lookup { name, need } => {
                self.lookup = Some(line);
                Step::Lookup { name, need }
            }
        }
    }

    /// A HELO's verdict is in: the session goes on or is rejected.
    fn decided(&mut self, line: Vec<u8>) -> Step {
        let ehlo = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EHLO");
        if !self.hearing.rejected() {
            self.owed.push_back(Owed::Helo(ehlo));
            return if self.phase == Phase::Passed {
                Step::Forward(line)
            } else {
                self.phase = Phase::Passed;
                Step::Pass(line)
            };
        }
        self.phase = Phase::Rejected;
        if self.owed.is_empty() {
            let verdict = self.hearing.verdict().expect("a rejected session has its verdict");
            Step::Reject(self.helo_answer(ehlo, verdict))
        } else {
            self.deferred = Some(ehlo);
            Step::Defer
        }
    }

    /// The answer to a rejected session's HELO/EHLO: the denial (reject at HELO), else what the
    /// MTA answered the client's earlier one with, else the proxy's own in the MTA's name.
    fn helo_answer(&self, ehlo: bool, verdict: &Verdict) -> Vec<u8> {
        match verdict.reject_at {
            RejectAt::Helo => self.denial(verdict),
            RejectAt::Rcpt if ehlo => self
                .mta_ehlo_reply
                .clone()
                .unwrap_or_else(|| reply::ehlo(&self.host, &["PIPELINING", "8BITMIME"])),
            RejectAt::Rcpt => self
                .mta_helo_reply
                .clone()
                .unwrap_or_else(|| format!("250 {}\r\n", self.host).into_bytes()),
        }
    }

    /// The reply that says no: the matching entry's own reply, or 553 with the configured text.
    fn denial(&self, verdict: &Verdict) -> Vec<u8> {
        match &verdict.reply {
            Some(custom) => format!("{} {}\r\n", custom.code, custom.text).into_bytes(),
            None => reply::line(553, "5.7.1", self.reject_message),
        }
    }

    /// Commands after a rejection, answered here; the MTA is gone.
    fn after_rejection(&mut self, command: SmtpCommand) -> Step {
        self.rejected_commands += 1;
        if self.rejected_commands > MAX_REJECTED_COMMANDS {
            let limit = reply::line(421, "4.7.0", "Error: too many errors");
            return Step::Close(limit, End::Closed);
        }
        let verdict = self.hearing.verdict().expect("rejected sessions have a verdict");
        let at_helo = verdict.reject_at == RejectAt::Helo;
        Step::Reply(match command {
            SmtpCommand::Quit => return Step::Close(reply::line(221, "2.0.0", "Bye"), End::Closed),
            SmtpCommand::Helo(_) => self.helo_answer(false, verdict),
            SmtpCommand::Ehlo(_) => self.helo_answer(true, verdict),
            SmtpCommand::Mail if at_helo => {
                reply::line(503, "5.5.1", "Error: send HELO/EHLO first")
            }
            SmtpCommand::Mail => reply::line(250, "2.1.0", "Ok"),
            SmtpCommand::Rcpt if at_helo => reply::line(503, "5.5.1", "Error: need MAIL command"),
            SmtpCommand::Rcpt => self.denial(verdict),
            SmtpCommand::Data | SmtpCommand::Bdat => {
                reply::line(554, "5.5.1", "Error: no valid recipients")
            }
            SmtpCommand::Rset | SmtpCommand::Noop => reply::line(250, "2.0.0", "Ok"),
            SmtpCommand::StartTls => reply::line(454, "4.7.0", "TLS not available"),
            SmtpCommand::Auth => reply::line(503, "5.5.1", "Error: authentication not enabled"),
            SmtpCommand::Vrfy => reply::line(502, "5.5.1", "VRFY command is disabled"),
            SmtpCommand::Help | SmtpCommand::Other(_) => {
                reply::line(502, "5.5.2", "Error: command not recognized")
            }
        })
    }
}

/// Whether the first bytes of a session are a PROXY header (complete enough to tell).
fn refuses_header(buf: &[u8]) -> bool {
    buf.starts_with(b"PROXY ") || buf.starts_with(&header::V2_SIGNATURE)
}

#[cfg(test)]
mod tests;
