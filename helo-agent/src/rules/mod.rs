//! The HELO rules engine: pure code, no I/O. Given a session's facts (client address, the
//! HELO/EHLO argument, earlier HELOs of the session, whether the listener checks HELO at all) it
//! returns a [`Verdict`]: pass, reject or ban, the rule that decided, a reason a person can
//! read, and for a table or regex match the exact entry (file and line).
//!
//! Order: exemptions (allowlisted client, submission listener), the pregreet test (the client
//! spoke before the proxy's greeting was complete: a fact about the connection, judged before
//! any HELO check as postscreen judges it before smtpd sees a HELO), the domain table (whose
//! `OK` entries permit outright, as in Postfix), forged identity, the badhelo regexes, then the
//! built-in checks, the DNS checks, and last HELO reuse (`helo_reuse`: the name was used by many
//! client networks lately, a count the judge keeps and hands in as a fact, [`Facts::reuse`]).
//! Each check has its own action: `off`, `log` (dry run: noted, never enforced), `reject` or
//! `ban`. The first enforcing match decides.

pub mod badhelo;
pub mod builtin;
pub mod helo;
pub mod table;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use self::badhelo::BadheloSet;
use self::helo::Helo;
use self::table::DomainTable;
use crate::addr::canonical;

/// The checks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The client sent something before the proxy's greeting was complete (postscreen's
    /// pregreet test; only the proxy, greeting itself, can tell).
    Pregreet,
    /// Domain table entries (`rules.domains`, `rules.access_file`).
    Table,
    /// The HELO claims one of our names or addresses.
    ForgedIdentity,
    /// qmail badhelo regexes (`rules.regexes`, `rules.badhelo_file`).
    Badhelo,
    /// Not a host name or address at all: empty, bad characters, bad literal, too long.
    Invalid,
    /// `localhost`, `localhost.localdomain`.
    Localhost,
    /// An IP address without brackets.
    BareIp,
    /// An address literal that is not the client's address.
    LiteralMismatch,
    /// A name without a dot.
    NoDot,
    /// `.local`, `.lan`, `.localdomain`, `.internal`, `.home`, `.home.arpa`, `.invalid`.
    PrivateSuffix,
    /// A name that embeds the client's IPv4 address.
    Dynamic,
    /// A second HELO/EHLO in the session with another name.
    Changed,
    /// The HELO name has no A, AAAA or MX record (Postfix's `reject_unknown_helo_hostname`).
    UnknownHelo,
    /// The HELO name's addresses do not include the client's.
    HeloNotClient,
    /// The HELO name was used by `reuse.clients` or more client networks within
    /// `reuse.window`, and this client's reverse DNS does not confirm it.
    HeloReuse,
}

pub const CHECK_COUNT: usize = 15;

impl Check {
    pub const ALL: [Check; CHECK_COUNT] = [
        Check::Pregreet,
        Check::Table,
        Check::ForgedIdentity,
        Check::Badhelo,
        Check::Invalid,
        Check::Localhost,
        Check::BareIp,
        Check::LiteralMismatch,
        Check::NoDot,
        Check::PrivateSuffix,
        Check::Dynamic,
        Check::Changed,
        Check::UnknownHelo,
        Check::HeloNotClient,
        Check::HeloReuse,
    ];

    /// The rule id: stable snake_case, used in logs, metrics and `check --json`.
    pub const fn name(self) -> &'static str {
        match self {
            Check::Pregreet => "pregreet",
            Check::Table => "table",
            Check::ForgedIdentity => "forged_identity",
            Check::Badhelo => "badhelo",
            Check::Invalid => "invalid",
            Check::Localhost => "localhost",
            Check::BareIp => "bare_ip",
            Check::LiteralMismatch => "literal_mismatch",
            Check::NoDot => "no_dot",
            Check::PrivateSuffix => "private_suffix",
            Check::Dynamic => "dynamic",
            Check::Changed => "changed",
            Check::UnknownHelo => "unknown_helo",
            Check::HeloNotClient => "helo_not_client",
            Check::HeloReuse => "helo_reuse",
        }
    }
}

/// What a check does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckAction {
    Off,
    /// Dry run: the match is logged and reported, the session passes.
    Log,
    Reject,
    /// Reject, and ban the client address in the kernel for the ban TTL.
    Ban,
}

/// The outcome for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pass,
    Reject,
    Ban,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Reject => "reject",
            Action::Ban => "ban",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a rejection is delivered: at the HELO itself, or (qmail style) at every RCPT TO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectAt {
    Helo,
    Rcpt,
}

/// Where a table or regex rule was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryRef {
    /// A file path, or `config` for entries written in the TOML itself.
    pub source: String,
    /// 1-based line in the file (for `config`, the 1-based position in its list); 0 for
    /// entries detected from the host.
    pub line: usize,
    /// The entry as written.
    pub text: String,
}

impl fmt::Display for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}", self.source),
            line => write!(f, "{}:{line}", self.source),
        }
    }
}

/// A reply an access-table entry asks for (`550 text`, `REJECT text`, `450 text`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryReply {
    pub code: u16,
    pub text: String,
}

/// What a rejected pregreeter hears (at RCPT TO, or at HELO with `reject.at = "helo"`):
/// postscreen's reply for a pregreet with `postscreen_greet_action = enforce`
/// (postscreen_early.c).
pub fn pregreet_reply() -> EntryReply {
    EntryReply { code: 550, text: "5.5.1 Protocol error".into() }
}

/// What a domain-table entry says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableAction {
    /// Reject (or ban, per `checks.table`), with the entry's own reply if it gives one; a 4xx
    /// reply is a temporary refusal and never bans.
    Deny(Option<EntryReply>),
    /// `OK`: pass, skipping every later check.
    Permit,
    /// `DUNNO`: as if the entry were not there.
    Dunno,
    /// `WARN`: log only.
    Warn,
}

#[derive(Clone, Debug)]
pub struct TableEntry {
    pub action: TableAction,
    pub entry: Arc<EntryRef>,
}

/// Our own names and addresses: a HELO claiming one of them is forged.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub names: DomainTable<Arc<EntryRef>>,
    pub addresses: FxHashSet<IpAddr>,
}

/// One check that matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    pub rule: &'static str,
    pub reason: String,
    pub entry: Option<Arc<EntryRef>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    #[serde(rename = "verdict")]
    pub action: Action,
    /// The rule id that decided (`pass` when nothing matched).
    pub rule: &'static str,
    pub reason: String,
    /// The table line or regex line that matched, if any.
    pub entry: Option<Arc<EntryRef>>,
    /// A reply the matching entry asks for, instead of the standard one.
    pub reply: Option<EntryReply>,
    pub reject_at: RejectAt,
    /// For `ban`: how long.
    #[serde(serialize_with = "serialize_ttl")]
    pub ttl: Option<Duration>,
    /// Matches of `log` (dry-run) checks on the way, in order.
    pub logged: Vec<Match>,
}

fn serialize_ttl<S: serde::Serializer>(ttl: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match ttl {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

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

/// The client's address in reverse DNS, forward-confirmed: its PTR names, and whether one of
/// them resolves back to the address. The rules ask only whether the HELO name is such a name
/// ([`DnsFacts::confirms`]), so the proxy confirms only the HELO name (`dns::confirm`, from the
/// HELO lookup's own records); Postfix's `client_name` (the policy service) may be another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientDns {
    #[default]
    NotLooked,
    /// A PTR name whose A or AAAA records include the client (lower case, no final dot).
    Confirmed(String),
    /// PTR names (maybe none), none of them known to point back at the client.
    Unconfirmed(Vec<String>),
    TempFail(String),
}

impl DnsFacts {
    /// Whether `name` is the client's forward-confirmed reverse name: a client telling the
    /// truth, never judged dynamic (nor counted as HELO reuse).
    pub fn confirms(&self, name: &str) -> bool {
        matches!(&self.client, ClientDns::Confirmed(confirmed) if confirmed.eq_ignore_ascii_case(name.trim_end_matches('.')))
    }
}

/// `[reuse]`: when a HELO name counts as reused (`checks.helo_reuse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReuseLimits {
    /// Distinct client networks (/24, /64) that make a name reused.
    pub clients: usize,
    /// How far back they are counted.
    pub window: Duration,
}

/// The compiled rules: built once from the config, shared by every session.
#[derive(Clone, Debug)]
pub struct RuleSet {
    pub actions: [CheckAction; CHECK_COUNT],
    pub identity: Identity,
    pub allowlist: Vec<IpNet>,
    pub table: DomainTable<TableEntry>,
    pub badhelo: BadheloSet,
    pub reject_at: RejectAt,
    pub ban_ttl: Duration,
    pub reuse: ReuseLimits,
}

impl RuleSet {
    pub fn action(&self, check: Check) -> CheckAction {
        self.actions[check as usize]
    }

    pub fn classify(&self, facts: &Facts<'_>) -> Verdict {
        if let Some(client) = facts.client {
            let client = canonical(client);
            if let Some(net) = self.allowlist.iter().find(|net| net.contains(&client)) {
                return self.pass("allowlist", format!("client {client} is in allowlisted {net}"));
            }
        }
        if facts.exempt_listener {
            return self.pass("exempt_listener", "the listener does not check HELO".into());
        }
        let helo = helo::parse(facts.argument);
        let mut logged = Vec::new();

        if facts.pregreeted
            && let Some(v) = self.hit(
                Check::Pregreet,
                "the client spoke before the greeting was complete".into(),
                None,
                Some(pregreet_reply()),
                &mut logged,
            )
        {
            return v;
        }

        if let Some(v) = self.table_check(&helo, facts, &mut logged) {
            return v;
        }
        if self.action(Check::ForgedIdentity) != CheckAction::Off
            && let Some((reason, entry)) = self.forged(&helo, facts.client)
            && let Some(v) = self.hit(Check::ForgedIdentity, reason, entry, None, &mut logged)
        {
            return v;
        }

        if let Some(v) = self.badhelo_check(facts.argument, &mut logged) {
            return v;
        }
        if let Some(v) = self.builtin_checks(&helo, facts, &mut logged) {
            return v;
        }
        let client = facts.client;
        if let (Helo::Name(name), Some(dns)) = (&helo, facts.dns)
            && let Some(v) = self.dns_checks(name, client, dns, &mut logged)
        {
            return v;
        }
        let verdict = Verdict { logged, ..self.pass("pass", "no rule matched".into()) };
        match facts.reuse {
            Some(networks) => self.with_reuse(verdict, facts.argument, facts.dns, networks),
            None => verdict,
        }
    }

    /// The domain table (`checks.table`): an entry for the HELO as Postfix's
    /// check_helo_access looks it up (a name, a bare address, an [address literal]; see
    /// helo::table_key). `Some`: it decided (an `OK` entry too).
    fn table_check(
        &self,
        helo: &Helo,
        facts: &Facts<'_>,
        logged: &mut Vec<Match>,
    ) -> Option<Verdict> {
        let argument = facts.argument;
        if self.action(Check::Table) == CheckAction::Off || self.table.is_empty() {
            return None;
        }
        let key = helo::table_key(helo, argument)?;
        let found = self.table.lookup(&key)?;
        let reason = || format!("HELO {key} is listed: {}", found.entry.text);
        let entry = Some(found.entry.clone());
        match &found.action {
            TableAction::Permit => {
                let mut verdict = self.pass("table", reason());
                verdict.entry = entry;
                Some(verdict)
            }
            TableAction::Dunno => None,
            TableAction::Warn => {
                logged.push(Match { rule: Check::Table.name(), reason: reason(), entry });
                None
            }
            TableAction::Deny(reply) => self
                .hit(Check::Table, reason(), entry, reply.clone(), logged)
                .map(|v| self.stronger_of_forged(v, helo, facts.client)),
        }
    }

    /// The regex rules (`checks.badhelo`): the first that matches (or, negated, does not).
    fn badhelo_check(&self, argument: &str, logged: &mut Vec<Match>) -> Option<Verdict> {
        if self.action(Check::Badhelo) == CheckAction::Off {
            return None;
        }
        let rule = self.badhelo.first_match(argument.trim())?;
        let reason = if rule.negated {
            format!("HELO does not match required pattern {:?}", rule.pattern)
        } else {
            format!("HELO matches pattern {:?}", rule.pattern)
        };
        let entry = Some(Arc::new(rule.entry.clone()));
        self.hit(Check::Badhelo, reason, entry, None, logged)
    }

    /// The built-in checks, in order; the first that decides.
    fn builtin_checks(
        &self,
        helo: &Helo,
        facts: &Facts<'_>,
        logged: &mut Vec<Match>,
    ) -> Option<Verdict> {
        let client = facts.client;
        let builtins: [(Check, &dyn Fn() -> Option<String>); 8] = [
            (Check::Invalid, &|| builtin::invalid(helo)),
            (Check::Localhost, &|| builtin::localhost(helo)),
            (Check::BareIp, &|| builtin::bare_ip(helo)),
            (Check::LiteralMismatch, &|| builtin::literal_mismatch(helo, client)),
            (Check::NoDot, &|| builtin::no_dot(helo)),
            (Check::PrivateSuffix, &|| builtin::private_suffix(helo)),
            (Check::Dynamic, &|| {
                let confirmed = matches!((helo, facts.dns), (Helo::Name(name), Some(dns)) if dns.confirms(name));
                if confirmed { None } else { builtin::dynamic(helo, client) }
            }),
            (Check::Changed, &|| builtin::changed(helo, facts.previous)),
        ];
        for (check, test) in builtins {
            if self.action(check) == CheckAction::Off {
                continue;
            }
            if let Some(reason) = test()
                && let Some(v) = self.hit(check, reason, None, None, logged)
            {
                return Some(v);
            }
        }
        None
    }

    /// What [`RuleSet::classify`] says of `facts` (with `facts.dns`), given `verdict`, its
    /// verdict on the same facts without DNS, which no rule decided (the only verdict the
    /// doors look DNS up for, see `judge::hearing`): only what DNS can change is judged
    /// again, the DNS checks over the logged matches so far. `dynamic` is the one earlier
    /// check DNS can undo (a forward-confirmed name is never dynamic): when it logged and DNS
    /// confirms the name, everything is judged again. Reuse is judged after, as ever.
    pub fn with_dns(&self, verdict: Verdict, facts: &Facts<'_>) -> Verdict {
        let (Helo::Name(name), Some(dns)) = (helo::parse(facts.argument), facts.dns) else {
            return verdict;
        };
        let dynamic_undone =
            dns.confirms(&name) && verdict.logged.iter().any(|m| m.rule == Check::Dynamic.name());
        if verdict.rule != "pass" || dynamic_undone {
            return self.classify(&Facts { reuse: None, ..*facts });
        }
        let mut logged = verdict.logged;
        match self.dns_checks(&name, facts.client, dns, &mut logged) {
            Some(decided) => decided,
            None => Verdict { logged, ..verdict },
        }
    }

    /// The name `helo_reuse` counts and judges, given `verdict`, the verdict of every check
    /// before it: the HELO as a domain name (lower case), when the check is on and no rule
    /// decided. `None`, and the client is neither counted nor judged, for an address literal
    /// or a bare IP (they name an address, not a host others could share; `literal_mismatch`
    /// and `bare_ip` judge them), an invalid HELO, a HELO a rule decided (allowlisted and
    /// exempt clients, `OK` table entries included), and a client whose forward-confirmed
    /// reverse name is this HELO: a client telling the truth.
    pub fn reuse_name(
        &self,
        verdict: &Verdict,
        argument: &str,
        dns: Option<&DnsFacts>,
    ) -> Option<String> {
        if self.action(Check::HeloReuse) == CheckAction::Off || verdict.rule != "pass" {
            return None;
        }
        match helo::parse(argument) {
            Helo::Name(name) if !dns.is_some_and(|dns| dns.confirms(&name)) => Some(name),
            _ => None,
        }
    }

    /// `helo_reuse` over `verdict`, the verdict of every check before it on the same HELO:
    /// `networks` client networks used the name within `reuse.window` (this client's
    /// included). Where [`RuleSet::reuse_name`] says the HELO is not judged, `verdict` as it
    /// is. A client whose reverse lookup failed temporarily could not be cleared by the guard:
    /// where the check enforces it hears 450 (never a 5xx, never a ban) and tries again.
    pub fn with_reuse(
        &self,
        verdict: Verdict,
        argument: &str,
        dns: Option<&DnsFacts>,
        networks: usize,
    ) -> Verdict {
        let ReuseLimits { clients, window } = self.reuse;
        let Some(name) = self.reuse_name(&verdict, argument, dns) else { return verdict };
        if networks < clients {
            return verdict;
        }
        let used = format!(
            "HELO {name} used by {networks} client networks in the last {}",
            crate::duration::format(window)
        );
        let (reason, reply) = match dns.map(|dns| &dns.client) {
            Some(ClientDns::TempFail(why)) => (
                format!("{used}; the client's reverse name could not be checked ({why})"),
                Some(EntryReply {
                    code: 450,
                    text: format!(
                        "4.7.1 <{name}>: Helo command rejected: cannot check your reverse \
                         name, try again later"
                    ),
                }),
            ),
            _ => (used, None),
        };
        let mut logged = verdict.logged;
        match self.hit(Check::HeloReuse, reason, None, reply, &mut logged) {
            Some(decided) => decided,
            None => Verdict { logged, ..verdict },
        }
    }

    /// `unknown_helo` and `helo_not_client` over what DNS said. A lookup that got no answer
    /// to trust is a temporary failure: where a check enforces, a 450 (never a 5xx, never a
    /// ban); the sender retries.
    fn dns_checks(
        &self,
        name: &str,
        client: Option<IpAddr>,
        dns: &DnsFacts,
        logged: &mut Vec<Match>,
    ) -> Option<Verdict> {
        let checks = [Check::UnknownHelo, Check::HeloNotClient];
        for check in checks {
            if self.action(check) == CheckAction::Off {
                continue;
            }
            let (reason, reply) = match (&dns.helo, check) {
                (HeloDns::NotLooked, _) => continue,
                (HeloDns::TempFail(why), _) => (
                    format!("HELO {name}: DNS lookup failed temporarily ({why})"),
                    Some(EntryReply {
                        code: 450,
                        text: format!(
                            "4.7.1 <{name}>: Helo command rejected: Host not found, try again later"
                        ),
                    }),
                ),
                (HeloDns::Missing, Check::UnknownHelo) => {
                    (format!("HELO {name} has no A, AAAA or MX record"), None)
                }
                (HeloDns::Found { addresses, .. }, Check::HeloNotClient) => {
                    let Some(client) = client.map(canonical) else { continue };
                    if addresses.iter().any(|a| canonical(*a) == client) || dns.confirms(name) {
                        continue;
                    }
                    (format!("HELO {name} does not resolve to the client {client}"), None)
                }
                _ => continue,
            };
            if let Some(v) = self.hit(check, reason, None, reply, logged) {
                return Some(v);
            }
        }
        None
    }

    /// A HELO naming one of our names or addresses. A literal or bare address equal to the
    /// client's own address is the client telling the truth, not a forgery.
    fn forged(
        &self,
        helo: &Helo,
        client: Option<IpAddr>,
    ) -> Option<(String, Option<Arc<EntryRef>>)> {
        match helo {
            Helo::Name(name) => self.identity.names.lookup(name).map(|entry| {
                (format!("HELO {name} claims our own name ({})", entry.text), Some(entry.clone()))
            }),
            Helo::BareIp(ip) | Helo::Literal(ip) => {
                let ip = canonical(*ip);
                (self.identity.addresses.contains(&ip) && client.map(canonical) != Some(ip))
                    .then(|| (format!("HELO claims our own address {ip}"), None))
            }
            Helo::Invalid(_) => None,
        }
    }

    /// A check matched: a verdict if its action enforces, else noted in `logged`.
    fn hit(
        &self,
        check: Check,
        reason: String,
        entry: Option<Arc<EntryRef>>,
        reply: Option<EntryReply>,
        logged: &mut Vec<Match>,
    ) -> Option<Verdict> {
        let action = match self.action(check) {
            CheckAction::Off => return None,
            CheckAction::Log => {
                logged.push(Match { rule: check.name(), reason, entry });
                return None;
            }
            // A temporary (4xx) refusal asked for by an entry never bans.
            CheckAction::Ban if reply.as_ref().is_none_or(|r| r.code >= 500) => Action::Ban,
            CheckAction::Ban | CheckAction::Reject => Action::Reject,
        };
        Some(Verdict {
            action,
            rule: check.name(),
            reason,
            entry,
            reply,
            reject_at: self.reject_at,
            ttl: (action == Action::Ban).then_some(self.ban_ttl),
            logged: std::mem::take(logged),
        })
    }

    /// A table entry that denies a HELO our own identity check also catches (an imported
    /// `192.0.2.10 REJECT` for one of our addresses): the stronger action wins, so the entry
    /// cannot turn the built-in `forged_identity` ban into a plain reject; on a tie the entry
    /// decides, with its own reply. (A table `OK` still passes outright: the admin's word.)
    fn stronger_of_forged(&self, table: Verdict, helo: &Helo, client: Option<IpAddr>) -> Verdict {
        if table.action == Action::Ban || self.action(Check::ForgedIdentity) == CheckAction::Off {
            return table;
        }
        let Some((reason, entry)) = self.forged(helo, client) else { return table };
        let mut logged = table.logged.clone();
        match self.hit(Check::ForgedIdentity, reason, entry, None, &mut logged) {
            Some(forged) if forged.action == Action::Ban => forged,
            _ => table,
        }
    }

    fn pass(&self, rule: &'static str, reason: String) -> Verdict {
        Verdict {
            action: Action::Pass,
            rule,
            reason,
            entry: None,
            reply: None,
            reject_at: self.reject_at,
            ttl: None,
            logged: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
