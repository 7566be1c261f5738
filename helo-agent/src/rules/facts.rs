//! What the engine is told of a session ([`Facts`]) and what DNS said of it ([`DnsFacts`]):
//! plain data, filled by the doors and the judge's hearing, read by [`super::RuleSet`].

use std::net::IpAddr;

use serde::Serialize;

/// What the engine knows of a session at HELO time.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The client's address; `None` when unknown (client-dependent checks then do not fire).
    pub client: Option<IpAddr>,
    /// The HELO/EHLO argument as sent.
    pub argument: &'a str,
    /// Earlier HELO/EHLO arguments of this session, oldest first.
    pub previous: &'a [String],
    /// The listener is exempt from HELO checks (a submission port: the `NOBADHELO` idea).
    pub exempt_listener: bool,
    /// What DNS said of the HELO name and the client; `None`: no lookups were made (the DNS
    /// checks are off, or the door could not make them), and the DNS checks do not fire.
    pub dns: Option<&'a DnsFacts>,
    /// The client spoke before the proxy's greeting was complete (the pregreet test; only the
    /// proxy greeting itself runs it, so other doors say `false`).
    pub pregreeted: bool,
    /// How many distinct client networks (/24, /64) used this HELO name within
    /// `reuse.window`, this client's included, as the judge's memory counts them (see
    /// `judge::Hearing`); `None`: not counted, and `helo_reuse` does not fire.
    pub reuse: Option<usize>,
    /// The door can look names up: what DNS has not said yet is asked for
    /// ([`super::Verdict::wants`]) rather than judged without.
    pub looks: bool,
}

/// What DNS said about a session: the HELO name's records and the client's reverse name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DnsFacts {
    pub helo: HeloDns,
    pub client: ClientDns,
}

/// The HELO name in DNS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeloDns {
    /// Not looked up: not a domain name, or not needed.
    #[default]
    NotLooked,
    /// Its A and AAAA addresses, and whether it has an MX record.
    Found { addresses: Vec<IpAddr>, mx: bool },
    /// NXDOMAIN, or no A, AAAA or MX record.
    Missing,
    /// No answer to trust: a timeout or SERVFAIL (why).
    TempFail(String),
}

/// The client's address in reverse DNS, forward-confirmed (FCrDNS): its PTR names, and the one
/// whose A or AAAA records include the address (the proxy looks both up, `dns::Dns::client`;
/// the policy service takes Postfix's `client_name`, which Postfix confirmed the same way).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientDns {
    #[default]
    NotLooked,
    /// A PTR name whose A or AAAA records include the client (lower case, no final dot): the
    /// HELO where it is one of them, else the first.
    Confirmed(String),
    /// PTR names (maybe none), none of them known to point back at the client.
    Unconfirmed(Vec<String>),
    TempFail(String),
}

impl DnsFacts {
    /// Whether `name` is the client's forward-confirmed reverse name: a client telling the
    /// truth, never `helo_not_client`, never forging (`forged_identity`: only we publish our
    /// zone's addresses), never counted as HELO reuse.
    pub fn confirms(&self, name: &str) -> bool {
        matches!(&self.client, ClientDns::Confirmed(confirmed) if confirmed.eq_ignore_ascii_case(name.trim_end_matches('.')))
    }

    /// What DNS said, in a few words for a session's log line (`dns` field): the HELO name's
    /// records and the client's reverse name, each left out where not looked up.
    pub fn summary(&self) -> String {
        let helo = match &self.helo {
            HeloDns::NotLooked => None,
            HeloDns::Found { .. } => Some("helo=found".to_owned()),
            HeloDns::Missing => Some("helo=none".to_owned()),
            HeloDns::TempFail(_) => Some("helo=tempfail".to_owned()),
        };
        let client = match &self.client {
            ClientDns::NotLooked => None,
            ClientDns::Confirmed(name) => Some(format!("client=confirmed:{name}")),
            ClientDns::Unconfirmed(names) if names.is_empty() => Some("client=no_ptr".to_owned()),
            ClientDns::Unconfirmed(_) => Some("client=unconfirmed".to_owned()),
            ClientDns::TempFail(_) => Some("client=tempfail".to_owned()),
        };
        [helo, client].into_iter().flatten().collect::<Vec<_>>().join(" ")
    }
}
