//! How a proxy session ended: the facts its log line, metrics and ban are made of. Pure data.

use crate::judge::End;
use crate::rules::Verdict;

/// What a finished proxy session reports.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The HELO the verdict is about.
    pub helo: Option<String>,
    /// Every HELO/EHLO the proxy saw, when there was more than one.
    pub helos: Vec<String>,
    pub verdict: Option<Verdict>,
    /// Rules that matched in `log` mode.
    pub logged: Vec<&'static str>,
    /// What the client sent before the greeting was complete (the pregreet test), and when.
    pub pregreet: Option<String>,
    /// Client to MTA (or to the proxy), bytes.
    pub up: u64,
    /// To the client, bytes.
    pub down: u64,
    pub spliced: bool,
    /// Bytes of the relayed session's client side that passed through user space: the command
    /// lines up to the point the session became opaque (message data and TLS are spliced).
    /// The MTA's replies are copied (to watch them) and counted in `down`.
    pub copied: u64,
    /// The session went opaque at STARTTLS: the rest was TLS.
    pub tls: bool,
    /// The MTA accepted a recipient (a 2xx to RCPT TO, or 354 to DATA).
    pub accepted: bool,
    pub end: End,
    pub error: Option<String>,
    /// What DNS said of the HELO judged last (`not_finished`: the lookups for the log had not
    /// answered by the session's end); `None`: nothing was looked up.
    pub dns: Option<String>,
}
