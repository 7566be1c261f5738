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
//! 2xx: the rest is TLS the proxy cannot read) or DATA accepted (354: message data up to a
//! lone dot, which only a scan of every byte could find, and the relay splices it unread).
//! Commands whose reply decides what the next client line is are waited for: STARTTLS, DATA,
//! AUTH (a 334 makes the next line a SASL response, relayed unparsed) and a BDAT whose size
//! the proxy cannot read. A BDAT chunk is length-delimited (RFC 3030): its bytes follow the
//! command whatever the MTA answers (Postfix reads and discards a refused chunk), so the proxy
//! relays exactly that many bytes, spliced when they are many, and reads commands again
//! after them, judging a HELO after a chunk, refused or not, and after a message sent with
//! `BDAT n LAST`. A HELO that fails, first or later, ends the MTA's part (QUIT, after the
//! replies it still owes the client) and the proxy finishes the transcript alone, qmail style:
//! `553` at every RCPT TO (or at the HELO itself), DATA and BDAT refused (a chunk read and
//! dropped). A rejected session stays rejected, whatever HELO comes next.
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
use crate::smtp::{
    LineScan, MAX_COMMAND_LINE, MAX_RELAYED_LINE, SmtpCommand, bdat_size, reply, scan_line,
};

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
    /// Bytes of a BDAT chunk that were buffered: send them to the MTA as they are.
    Chunk(Vec<u8>),
    /// This many bytes of a BDAT chunk are still to come from the client and nothing is
    /// buffered: move them to the MTA as they arrive (spliced when they are many), tell
    /// [`Session::streamed`] how many moved, and ask again.
    Stream(u64),
    /// The verdict is reject or ban: tell the MTA QUIT and let it go, write this to the
    /// client, and read on.
    Reject(Vec<u8>),
    /// A later HELO failed while the MTA still owes replies to earlier commands: relay those
    /// first. The rejection comes from [`Session::on_reply`] once they are in.
    Defer,
    /// The HELO's verdict rests on DNS: look up the HELO name's records (`helo`) and the
    /// client's forward-confirmed reverse name (`client`), and give the answer to
    /// [`Session::on_dns`], which decides (or asks again).
    Lookup { helo: Option<String>, client: bool, need: Need },
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
    /// A BDAT whose size the proxy could not read, which the MTA accepted: message data in a
    /// chunk of a size the proxy does not know. The replies are watched as with DATA; where
    /// the client's data ends, the relay cannot tell.
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
    /// AUTH, or a SASL response: a 334 makes the next line another response.
    Auth,
    /// A BDAT whose size the proxy could not read: Postfix answers 521 and hangs up; an MTA
    /// that accepts it leaves the proxy unable to find where its chunk ends.
    BadBdat,
    /// A RCPT TO: a 2xx says the MTA took a recipient (what a pass is given for).
    Rcpt,
}

/// Bytes of refused BDAT chunks the proxy reads and drops in a session it answers itself;
/// beyond, the session is closed (Postfix stops skipping past 1.5 times its
/// `message_size_limit`, 10 MB by default, and drops the connection).
pub const MAX_DISCARDED: u64 = 16 * 1024 * 1024;

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
    /// hears what it heard from the MTA before, or what the MTA answers others (learned from
    /// earlier sessions, [`Session::learned`]).
    mta_helo_reply: Option<Vec<u8>>,
    mta_ehlo_reply: Option<Vec<u8>>,
    /// The MTA just answered this session's passed EHLO (`true`) or HELO: for the proxy to
    /// learn ([`Session::take_learned`]).
    fresh_reply: Option<bool>,
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
    /// A HELO judged whose `log` checks would read DNS: the I/O loop looks it up in the
    /// background ([`Session::take_late`]) and hands the answer to [`Session::on_late_dns`].
    late: Option<String>,
    /// Bytes of a BDAT chunk still to relay to the MTA.
    chunk: u64,
    /// Bytes of a refused BDAT chunk still to read and drop (the proxy answered it).
    discard: u64,
    /// Bytes dropped so far (bounded by [`MAX_DISCARDED`]).
    discarded: u64,
    /// The MTA answered AUTH with 334: the next line is a SASL response, not a command.
    sasl: bool,
    /// A mail transaction may be open at the MTA: a MAIL went to it, and no RSET, HELO/EHLO
    /// or last BDAT chunk since.
    in_mail: bool,
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
            fresh_reply: None,
            rejected_commands: 0,
            commands_before_helo: 0,
            buf: Vec::new(),
            consumed: 0,
            greeting: Greeting::Done,
            pregreet: None,
            lookup: None,
            late: None,
            chunk: 0,
            discard: 0,
            discarded: 0,
            sasl: false,
            in_mail: false,
        }
    }

    /// The door has a resolver: a HELO that DNS can still decide is judged after
    /// [`Step::Lookup`] and [`Session::on_dns`].
    pub fn enable_dns(&mut self) {
        self.hearing.look();
    }

    /// What the MTA answered the EHLO (`ehlo`) and HELO of earlier sessions: a session
    /// rejected before the MTA answered its own is answered with that.
    pub fn learned(&mut self, ehlo: Option<&[u8]>, helo: Option<&[u8]>) {
        self.mta_ehlo_reply = ehlo.map(<[u8]>::to_vec);
        self.mta_helo_reply = helo.map(<[u8]>::to_vec);
    }

    /// The MTA's answer to this session's passed EHLO (`true`) or HELO, once, when it came
    /// in with the last [`Session::on_reply`].
    pub fn take_learned(&mut self) -> Option<(bool, &[u8])> {
        let ehlo = self.fresh_reply.take()?;
        let reply = if ehlo { &self.mta_ehlo_reply } else { &self.mta_helo_reply };
        reply.as_deref().map(|reply| (ehlo, reply))
    }

    /// The MTA greeted (`proxy.greeting = "mta"`): `host` is the name from its banner, which a
    /// rejected session's EHLO is answered with.
    pub fn set_host(&mut self, host: String) {
        self.host = host;
    }

    /// What DNS said for the HELO of the last [`Step::Lookup`] (a part left `NotLooked`: no
    /// slot was free): its verdict now, or another lookup.
    pub fn on_dns(&mut self, facts: DnsFacts) -> Step {
        let line = self.lookup.take().expect("on_dns answers a Step::Lookup");
        let heard = self.hearing.on_dns(&self.law, facts);
        self.heard(heard, line)
    }

    /// A HELO judged whose `log` checks would read DNS: its name, to look up in the
    /// background (once).
    pub fn take_late(&mut self) -> Option<String> {
        self.late.take()
    }

    /// What the background lookups found for `helo` (the HELO named by
    /// [`Session::take_late`]): joins the session's log.
    pub fn on_late_dns(&mut self, helo: &str, facts: DnsFacts) {
        self.hearing.on_late_dns(&self.law, helo, facts);
    }

    /// What DNS said of the HELO judged last, for the log line.
    pub fn dns(&self) -> Option<String> {
        self.hearing.dns()
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

    /// Client bytes handled so far (lines taken by [`Session::next_step`], chunk bytes
    /// relayed or dropped).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// `moved` bytes of the chunk a [`Step::Stream`] asked for went to the MTA.
    pub fn streamed(&mut self, moved: u64) {
        debug_assert!(moved <= self.chunk, "no more than the chunk");
        self.chunk -= moved.min(self.chunk);
        self.consumed += moved;
    }

    /// The longest line the session takes now: where the proxy only relays, what the MTA
    /// may take; where it answers itself, its own bound.
    fn line_limit(&self) -> usize {
        if self.phase == Phase::Passed { MAX_RELAYED_LINE } else { MAX_COMMAND_LINE }
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
        if self.chunk > 0 {
            if self.buf.is_empty() {
                return Some(Step::Stream(self.chunk));
            }
            let take = self.buf.len().min(usize::try_from(self.chunk).unwrap_or(usize::MAX));
            let bytes: Vec<u8> = self.buf.drain(..take).collect();
            self.chunk -= take as u64;
            self.consumed += take as u64;
            return Some(Step::Chunk(bytes));
        }
        if self.discard > 0 {
            let take = self.buf.len().min(usize::try_from(self.discard).unwrap_or(usize::MAX));
            self.buf.drain(..take);
            self.discard -= take as u64;
            self.consumed += take as u64;
            if self.discard > 0 {
                return None;
            }
        }
        let (len, content) = match scan_line(&self.buf, self.line_limit()) {
            LineScan::Line { len, content } => (len, content),
            LineScan::NeedMore => return None,
            LineScan::TooLong => {
                let too_long = reply::line(500, "5.5.2", "Error: line too long");
                return Some(Step::Close(too_long, End::LineTooLong));
            }
        };
        let line: Vec<u8> = self.buf.drain(..len).collect();
        self.consumed += len as u64;
        Some(self.take_line(line, content))
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

    /// Whether a relaying session is idle between transactions: no mail transaction open, no
    /// reply owed, nothing buffered. At shutdown such a session is ended at once (421), as
    /// Postfix's smtpd is on a stop; one with mail in flight gets the grace.
    pub fn between_transactions(&self) -> bool {
        self.phase == Phase::Passed
            && !self.in_mail
            && self.owed.is_empty()
            && self.chunk == 0
            && self.buf.is_empty()
    }

    /// Whether the MTA's replies are read: lines go to it, or a rejection waits for the
    /// replies it still owes.
    pub fn hears_mta(&self) -> bool {
        self.phase == Phase::Passed || self.deferred.is_some()
    }

    /// Whether the next client line must wait for the MTA: its reply to STARTTLS, DATA or a
    /// BDAT of unreadable size decides whether what follows is commands at all, its reply
    /// to AUTH whether the next line is a SASL response, and a deferred rejection waits for
    /// the replies the MTA still owes.
    pub fn waiting(&self) -> bool {
        self.deferred.is_some()
            || matches!(
                self.owed.back(),
                Some(Owed::StartTls | Owed::Data | Owed::Auth | Owed::BadBdat)
            )
    }

    /// One command line (without its terminator).
    pub fn on_line(&mut self, line: &[u8]) -> Step {
        self.take_line(line.to_vec(), line.len())
    }

    /// One line, its terminator after `content` bytes; a line bound for the MTA comes back in
    /// the step.
    fn take_line(&mut self, line: Vec<u8>, content: usize) -> Step {
        if self.phase == Phase::Passed && std::mem::take(&mut self.sasl) {
            // A SASL response (base64, or `*`): relayed unparsed, whatever it looks like.
            self.owed.push_back(Owed::Auth);
            return Step::Forward(line);
        }
        let command = SmtpCommand::parse(&line[..content]);
        if command == SmtpCommand::Bdat && self.phase != Phase::Passed {
            return self.refuse_bdat(command, &line[..content]);
        }
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
            self.fresh_reply = Some(ehlo);
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
            Some(Owed::BadBdat) if (200..300).contains(&code) => {
                AfterReply::Opaque(Opacity::Chunks)
            }
            Some(Owed::Auth) if code == 334 && self.phase == Phase::Passed => {
                self.sasl = true;
                AfterReply::Continue
            }
            _ => AfterReply::Continue,
        }
    }

    fn before_helo(&mut self, command: SmtpCommand, line: Vec<u8>) -> Step {
        let named =
            matches!(&command, SmtpCommand::Helo(a) | SmtpCommand::Ehlo(a) if !a.is_empty());
        if !named && command != SmtpCommand::Quit {
            self.commands_before_helo += 1;
            if self.commands_before_helo > MAX_COMMANDS_BEFORE_HELO {
                let limit = reply::line(421, "4.7.0", "Error: too many commands");
                return Step::Close(limit, End::Closed);
            }
        }
        match command {
            SmtpCommand::Helo(argument) | SmtpCommand::Ehlo(argument) if argument.is_empty() => {
                Step::Reply(bare_helo(&line))
            }
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
            // A bare HELO/EHLO names nothing to judge: the MTA answers it with 501, and the
            // client may try again.
            SmtpCommand::Helo(argument) | SmtpCommand::Ehlo(argument) if argument.is_empty() => {
                Owed::Reply
            }
            SmtpCommand::Helo(argument) | SmtpCommand::Ehlo(argument) => {
                return self.judge(argument, line);
            }
            SmtpCommand::Bdat => match bdat_size(trim_line_end(&line)) {
                Some(size) => {
                    self.chunk = size;
                    let last = trim_line_end(&line).to_ascii_uppercase().ends_with(b"LAST");
                    self.in_mail &= !last;
                    Owed::Reply
                }
                None => Owed::BadBdat,
            },
            SmtpCommand::Mail => {
                self.in_mail = true;
                Owed::Reply
            }
            SmtpCommand::Rset => {
                self.in_mail = false;
                Owed::Reply
            }
            SmtpCommand::StartTls => Owed::StartTls,
            SmtpCommand::Data => Owed::Data,
            SmtpCommand::Auth => Owed::Auth,
            SmtpCommand::Rcpt => Owed::Rcpt,
            _ => Owed::Reply,
        };
        self.owed.push_back(owed);
        Step::Forward(line)
    }

    /// A HELO/EHLO: heard, then the session goes on or is rejected (once DNS has answered,
    /// where it can still decide).
    fn judge(&mut self, argument: String, line: Vec<u8>) -> Step {
        let heard = self.hearing.hear(&self.law, &argument, None);
        self.heard(heard, line)
    }

    /// What the hearing of `line`'s HELO said: a lookup to make first, or the verdict.
    fn heard(&mut self, heard: Heard, line: Vec<u8>) -> Step {
        match heard {
            Heard::Judged => self.decided(line),
            Heard::Later { helo } => {
                self.late = Some(helo);
                self.decided(line)
            }
            Heard::Lookup { helo, client, need } => {
                self.lookup = Some(line);
                Step::Lookup { helo, client, need }
            }
        }
    }

    /// A HELO's verdict is in: the session goes on or is rejected.
    fn decided(&mut self, line: Vec<u8>) -> Step {
        let ehlo = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EHLO");
        if !self.hearing.rejected() {
            // A HELO/EHLO resets the MTA's transaction, as RSET does.
            self.in_mail = false;
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
                .or_else(|| self.mta_ehlo_reply.as_deref().and_then(helo_from_ehlo))
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

    /// A BDAT where the proxy answers itself (before HELO, or rejected): refused as Postfix
    /// refuses one without recipients, its chunk read and dropped, so the client's next
    /// command is found where it starts; a BDAT whose size cannot be read is answered as
    /// Postfix does, with 521 and a close.
    fn refuse_bdat(&mut self, command: SmtpCommand, line: &[u8]) -> Step {
        let Some(size) = bdat_size(line) else {
            let syntax = reply::line(521, "5.5.4", "Syntax: BDAT count [LAST]");
            return Step::Close(syntax, End::Closed);
        };
        if self.discarded.saturating_add(size) > MAX_DISCARDED {
            let closing = reply::line(421, "4.7.0", "Error: too much BDAT content");
            return Step::Close(closing, End::Closed);
        }
        self.discarded += size;
        self.discard = size;
        match self.phase {
            Phase::Rejected => self.after_rejection(command),
            _ => self.before_helo(command, Vec::new()),
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
            SmtpCommand::Helo(argument) if argument.is_empty() => bare_helo(b"HELO"),
            SmtpCommand::Ehlo(argument) if argument.is_empty() => bare_helo(b"EHLO"),
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

/// Postfix's answer to a HELO or EHLO without a name (`line` starts with the verb): a syntax
/// error, after which the client may say it again, properly.
fn bare_helo(line: &[u8]) -> Vec<u8> {
    let verb =
        if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EHLO") { "EHLO" } else { "HELO" };
    format!("501 Syntax: {verb} hostname\r\n").into_bytes()
}

/// The MTA's answer to HELO, from its answer to EHLO: the first line's greeting alone
/// (`250-mx.example.com` gives `250 mx.example.com`), as Postfix answers both.
fn helo_from_ehlo(ehlo: &[u8]) -> Option<Vec<u8>> {
    let first = ehlo.split(|b| *b == b'\n').next()?;
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let greeting = first.strip_prefix(b"250-").or_else(|| first.strip_prefix(b"250 "))?;
    Some([b"250 ", greeting, b"\r\n"].concat())
}

/// A line without its terminator (CRLF or a bare LF).
fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Whether the first bytes of a session are a PROXY header (complete enough to tell).
fn refuses_header(buf: &[u8]) -> bool {
    buf.starts_with(b"PROXY ") || buf.starts_with(&header::V2_SIGNATURE)
}

#[cfg(test)]
mod tests;
