//! How a proxy session ended: the facts its log line, metrics and ban are made of. Pure data.

use crate::rules::Verdict;

/// Which side ended a session, as pingora's error sources say it: operators alert on the MTA
/// side, never on clients that go away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Mta,
    Agent,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Mta => "mta",
            Side::Agent => "agent",
        }
    }
}

/// How a session ended (the `end` of its log line and of `helo_filter_session_ends_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum End {
    /// The proxy answered the last command (QUIT, or a limit) and closed.
    #[default]
    Closed,
    /// The session was relayed to its end.
    Relayed,
    ClientClosed,
    /// The client stopped reading or reset while the proxy wrote to it.
    ClientGone,
    ClientError,
    /// Silent past `proxy.helo_timeout` (before a verdict) or `proxy.idle_timeout`.
    Timeout,
    LineTooLong,
    UntrustedProxyHeader,
    /// The agent is shutting down.
    Shutdown,
    /// The MTA's connection ended mid-session without its goodbye; the client was told 421.
    UpstreamLost,
    UpstreamUnreachable,
    /// The MTA greeted with something other than 220.
    UpstreamRefused,
    UpstreamError,
    RelayError,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Relayed => "relayed",
            End::ClientClosed => "client_closed",
            End::ClientGone => "client_gone",
            End::ClientError => "client_error",
            End::Timeout => "timeout",
            End::LineTooLong => "line_too_long",
            End::UntrustedProxyHeader => "untrusted_proxy_header",
            End::Shutdown => "shutdown",
            End::UpstreamLost => "upstream_lost",
            End::UpstreamUnreachable => "upstream_unreachable",
            End::UpstreamRefused => "upstream_refused",
            End::UpstreamError => "upstream_error",
            End::RelayError => "relay_error",
        }
    }

    pub fn side(self) -> Side {
        match self {
            End::ClientClosed
            | End::ClientGone
            | End::ClientError
            | End::Timeout
            | End::LineTooLong
            | End::UntrustedProxyHeader => Side::Client,
            End::UpstreamLost
            | End::UpstreamUnreachable
            | End::UpstreamRefused
            | End::UpstreamError => Side::Mta,
            End::Closed | End::Relayed | End::Shutdown | End::RelayError => Side::Agent,
        }
    }
}

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
    pub end: End,
    pub error: Option<String>,
}
