//! What a finished session was, as a door tells the judge: who, which HELOs, the verdict, and,
//! for a door that carries the connection (the proxy), how it ended and which side ended it.
//! One log line per session is written from it here, the same for every door.

use super::Client;
use crate::rules::Verdict;

/// Which door heard the session (the `door` of its log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    Proxy,
    /// Postfix's policy service (`check_policy_service`).
    Policy,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Proxy => "proxy",
            Door::Policy => "policy",
        }
    }
}

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
    /// The relay of an opaque session failed, on the side the relay names: a socket error on
    /// that side's connection, or silence past `proxy.idle_timeout` where the relay can tell
    /// whose turn it was ([`Side::Agent`] where it cannot, inside TLS or a spliced message).
    RelayError(Side),
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
            End::RelayError(_) => "relay_error",
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
            End::RelayError(side) => side,
            End::Closed | End::Relayed | End::Shutdown => Side::Agent,
        }
    }
}

/// A finished session, as a door tells it.
#[derive(Debug)]
pub struct Record<'a> {
    pub door: Door,
    pub client: &'a Client,
    /// The HELO the verdict is about.
    pub helo: Option<&'a str>,
    /// Every HELO the door saw, when there was more than one.
    pub helos: &'a [String],
    pub verdict: Option<&'a Verdict>,
    /// Rules that matched in `log` mode, over every HELO.
    pub logged: &'a [&'static str],
    /// What DNS said of the HELO judged last, in a few words (`helo=none client=no_ptr`;
    /// `not_finished`: lookups for the log had not answered by the session's end).
    pub dns: Option<&'a str>,
    pub ms: u64,
    /// What the proxy adds about the connection; `None` for a door that carries no bytes.
    pub transport: Option<Transport<'a>>,
}

/// The proxy's facts about a session's connection, for its log line.
#[derive(Debug)]
pub struct Transport<'a> {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub spliced: bool,
    pub copied: u64,
    pub tls: bool,
    /// The MTA accepted a recipient (a 2xx to RCPT TO, or 354 to DATA).
    pub accepted: bool,
    /// How it ended, and so which side ended it ([`End::side`]).
    pub end: End,
    pub error: &'a str,
    /// What the client sent before the greeting was complete, and when (the pregreet test).
    pub pregreet: Option<&'a str>,
}

/// Whether a session showed its client an honest sender, the rule that earns a steering pass
/// (its next connections go straight to the MTA, unjudged by the proxy):
/// - the proxy heard it (the policy service cannot tell a pregreeter, and never sees the
///   client's first bytes);
/// - its verdict is a pass that no check doubted: no rule matched (an `OK` table entry, an
///   allowlisted or exempt client included) and no `log` check fired, for any of its HELOs
///   (a session whose later HELO failed is rejected, and stays so);
/// - it did not speak before its turn (pregreet);
/// - it came straight, not through a trusted front proxy (the kernel sees the proxy's
///   address, not the client's);
/// - the MTA accepted a recipient: a real transaction, not a probe that said EHLO and left.
///
/// Safe because a pass only skips the proxy: XDP still drops the client if it is ever banned
/// (and every ban takes its pass away), and the policy door on the MTA's port-25 smtpd still
/// judges every HELO it sends with the same rules, banning it if one turns bad.
pub fn honest(record: &Record<'_>) -> bool {
    let Some(transport) = &record.transport else { return false };
    let Some(verdict) = record.verdict else { return false };
    verdict.action == crate::rules::Action::Pass
        && verdict.rule == "pass"
        && verdict.logged.is_empty()
        && record.logged.is_empty()
        && transport.pregreet.is_none()
        && transport.accepted
        && record.client.via.is_none()
        && !record.client.exempt
}

pub(super) fn action(verdict: Option<&Verdict>) -> &'static str {
    verdict.map_or("none", |v| v.action.as_str())
}

/// One line per session: the client, the HELO, the verdict and why, and how it went.
pub(super) fn log_line(record: &Record<'_>) {
    let verdict = record.verdict;
    let via = record.client.via.map(|v| v.to_string()).unwrap_or_default();
    let helo = record.helo.unwrap_or("");
    let helos = record.helos.join(" ");
    let rule = verdict.map_or("", |v| v.rule);
    let reason = verdict.map_or("", |v| v.reason.as_str());
    let logged = record.logged.join(",");
    let ttl = verdict.and_then(|v| v.ttl).map(crate::duration::format).unwrap_or_default();
    let door = record.door.as_str();
    // A door without a connection of its own (the policy service) has no transport fields:
    // `None` values are left out of the line.
    let t = record.transport.as_ref();
    tracing::info!(
        door,
        client = %record.client.ip,
        via,
        helo,
        helos,
        verdict = action(verdict),
        rule,
        reason,
        logged,
        dns = record.dns,
        ttl,
        bytes_in = t.map(|t| t.bytes_in),
        bytes_out = t.map(|t| t.bytes_out),
        spliced = t.map(|t| t.spliced),
        copied = t.map(|t| t.copied),
        tls = t.map(|t| t.tls),
        ms = record.ms,
        end = t.map(|t| t.end.as_str()),
        side = t.map(|t| t.end.side().as_str()),
        error = t.map(|t| t.error),
        pregreet = t.and_then(|t| t.pregreet),
        "session"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every end names its side; a relay's failure names the side the relay found, which was
    /// always `agent` before the relay could tell (a client stalling mid-DATA among them).
    #[test]
    fn every_end_names_its_side_and_a_relay_error_the_side_that_failed() {
        assert_eq!(End::Timeout.side(), Side::Client);
        assert_eq!(End::UpstreamLost.side(), Side::Mta);
        assert_eq!(End::Shutdown.side(), Side::Agent);
        for side in [Side::Client, Side::Mta, Side::Agent] {
            assert_eq!(End::RelayError(side).as_str(), "relay_error", "one end, one label");
            assert_eq!(End::RelayError(side).side(), side);
        }
    }
}
