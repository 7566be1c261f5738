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
//!
//! The trust anchor (`trust.forward_confirmed`): the heuristic checks ([`Check::is_heuristic`])
//! enforce only against a client that cannot show a forward-confirmed reverse name that is
//! not generic ([`builtin::generic`]); for one that can, a match is logged with "not enforced:
//! the client is forward-confirmed as X". The identity checks, the admin's tables and regexes
//! and `invalid` always enforce. What DNS has not said yet is asked for in the verdict
//! ([`Verdict::wants`]): a verdict that rests on the client's reverse name, or a DNS check that
//! enforces, waits for the lookups the hearing asks the door for (`judge::Hearing`), and is
//! judged again with them; DNS checks that only log never make a session wait.

pub mod badhelo;
pub mod builtin;
mod facts;
pub mod helo;
pub mod providers;
pub mod table;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

pub use self::facts::{ClientDns, DnsFacts, Facts, HeloDns};

use self::badhelo::BadheloSet;
use self::helo::Helo;
use self::providers::Providers;
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
    /// A big provider's domain (`gmail.com`), or a name under one from a client whose
    /// forward-confirmed reverse name is not that provider's.
    Impersonation,
    /// A name without a dot.
    NoDot,
    /// `.local`, `.lan`, `.localdomain`, `.internal`, `.home`, `.home.arpa`, `.invalid`.
    PrivateSuffix,
    /// The last label is no top-level domain of the root zone (nor of `rules.extra_tlds`).
    UnknownTld,
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

pub const CHECK_COUNT: usize = 17;

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
        Check::Impersonation,
        Check::NoDot,
        Check::PrivateSuffix,
        Check::UnknownTld,
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
            Check::Impersonation => "impersonation",
            Check::NoDot => "no_dot",
            Check::PrivateSuffix => "private_suffix",
            Check::UnknownTld => "unknown_tld",
            Check::Dynamic => "dynamic",
            Check::Changed => "changed",
            Check::UnknownHelo => "unknown_helo",
            Check::HeloNotClient => "helo_not_client",
            Check::HeloReuse => "helo_reuse",
        }
    }

    /// The heuristics: checks an honest host with a sloppy HELO trips. They enforce only
    /// against a client without a forward-confirmed, non-generic reverse name (with
    /// `trust.forward_confirmed`, the default).
    pub const fn is_heuristic(self) -> bool {
        matches!(
            self,
            Check::NoDot
                | Check::PrivateSuffix
                | Check::UnknownTld
                | Check::Dynamic
                | Check::UnknownHelo
                | Check::HeloNotClient
        )
    }
}

/// The rule id of a verdict or log entry made when DNS could not answer (a timeout, SERVFAIL)
/// where a check needed it: kept apart from the check's own id, whose match means DNS
/// answered (`unknown_helo`: no records).
pub const DNS_TEMPFAIL: &str = "dns_tempfail";

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
    /// What DNS could still change of this verdict, not known yet.
    #[serde(skip)]
    pub wants: Wants,
    /// A [`DNS_TEMPFAIL`] verdict that stands in for a ban: this check, which bans, matched,
    /// and only the client's reverse name, which DNS could not give, could clear it. The
    /// judge remembers the client and this HELO (`judge::Deferrals`), so that it cannot come
    /// back with another HELO and go free before DNS has decided.
    #[serde(skip)]
    pub deferred_ban: Option<Check>,
}

/// What a verdict wants from DNS that its facts did not have (see `judge::Hearing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// It rests on the client's forward-confirmed reverse name: a heuristic, `forged_identity`
    /// or `impersonation` enforces, and the name would clear the client. It stands as it is
    /// where the door cannot look.
    pub client: bool,
    /// A DNS check that enforces needs the HELO name's records (the session waits).
    pub helo: bool,
    /// DNS checks in `log` mode would read the HELO name's records: for the log only, never
    /// worth a wait.
    pub later: bool,
}

fn serialize_ttl<S: serde::Serializer>(ttl: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match ttl {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
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
    /// `checks.impersonation`'s big providers.
    pub providers: Providers,
    /// `rules.extra_tlds`: top-level names taken as delegated besides the root zone's.
    pub extra_tlds: Vec<String>,
    /// `trust.forward_confirmed`: the heuristics spare a client with a forward-confirmed,
    /// non-generic reverse name.
    pub trust: bool,
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
        let mut j = Judging::default();

        if facts.pregreeted
            && let Some(v) = self.hit(
                Check::Pregreet,
                "the client spoke before the greeting was complete".into(),
                None,
                Some(pregreet_reply()),
                &mut j,
            )
        {
            return v;
        }

        if let Some(v) = self.table_check(&helo, facts, &mut j) {
            return v;
        }
        if let Some(v) = self.forged_check(&helo, facts, &mut j) {
            return v;
        }
        if let Some(v) = self.badhelo_check(facts.argument, &mut j) {
            return v;
        }
        if let Some(v) = self.builtin_checks(&helo, facts, &mut j) {
            return v;
        }
        if let Helo::Name(name) = &helo
            && let Some(v) = self.dns_checks(name, facts, &mut j)
        {
            return v;
        }
        let Judging { logged, wants } = j;
        let verdict = Verdict { logged, wants, ..self.pass("pass", "no rule matched".into()) };
        match facts.reuse {
            Some(networks) => self.with_reuse(verdict, facts.argument, facts.dns, networks),
            None => verdict,
        }
    }

    /// The domain table (`checks.table`): an entry for the HELO as Postfix's
    /// check_helo_access looks it up (a name, a bare address, an [address literal]; see
    /// helo::table_key). `Some`: it decided (an `OK` entry too).
    fn table_check(&self, helo: &Helo, facts: &Facts<'_>, j: &mut Judging) -> Option<Verdict> {
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
                j.logged.push(Match { rule: Check::Table.name(), reason: reason(), entry });
                None
            }
            TableAction::Deny(reply) => self
                .hit(Check::Table, reason(), entry, reply.clone(), j)
                .map(|v| self.stronger_of_forged(v, helo, facts.client)),
        }
    }

    /// `forged_identity`: the HELO claims one of our names or addresses. With the trust anchor
    /// on, a name is not forged where it is the client's forward-confirmed reverse name (issue
    /// 27: a company server sending through the MX under its own name; only we publish our
    /// zone's addresses, so no bot can show that), which DNS says.
    fn forged_check(&self, helo: &Helo, facts: &Facts<'_>, j: &mut Judging) -> Option<Verdict> {
        if self.action(Check::ForgedIdentity) == CheckAction::Off {
            return None;
        }
        let (reason, entry) = self.forged(helo, facts.client)?;
        match helo {
            Helo::Name(name) if self.trust => {
                let clears = |confirmed: &str| confirmed == name.as_str();
                self.hit_unless_client(Check::ForgedIdentity, reason, entry, facts, clears, j)
            }
            _ => self.hit(Check::ForgedIdentity, reason, entry, None, j),
        }
    }

    /// The regex rules (`checks.badhelo`): the first that matches (or, negated, does not).
    fn badhelo_check(&self, argument: &str, j: &mut Judging) -> Option<Verdict> {
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
        self.hit(Check::Badhelo, reason, entry, None, j)
    }

    /// The built-in checks, in order; the first that decides. The heuristics among them go
    /// through [`RuleSet::heuristic`].
    fn builtin_checks(&self, helo: &Helo, facts: &Facts<'_>, j: &mut Judging) -> Option<Verdict> {
        let client = facts.client;
        let builtins: [(Check, &dyn Fn() -> Option<String>); 10] = [
            (Check::Invalid, &|| builtin::invalid(helo)),
            (Check::Localhost, &|| builtin::localhost(helo)),
            (Check::BareIp, &|| builtin::bare_ip(helo)),
            (Check::LiteralMismatch, &|| builtin::literal_mismatch(helo, client)),
            (Check::Impersonation, &|| None),
            (Check::NoDot, &|| builtin::no_dot(helo)),
            (Check::PrivateSuffix, &|| builtin::private_suffix(helo)),
            (Check::UnknownTld, &|| builtin::unknown_tld(helo, &self.extra_tlds)),
            (Check::Dynamic, &|| builtin::dynamic(helo, client)),
            (Check::Changed, &|| builtin::changed(helo, facts.previous)),
        ];
        for (check, test) in builtins {
            if self.action(check) == CheckAction::Off {
                continue;
            }
            if check == Check::Impersonation {
                if let Some(v) = self.impersonation(helo, facts, j) {
                    return Some(v);
                }
                continue;
            }
            let Some(reason) = test() else { continue };
            let decided = if check.is_heuristic() {
                self.heuristic(check, reason, facts, j)
            } else {
                self.hit(check, reason, None, None, j)
            };
            if decided.is_some() {
                return decided;
            }
        }
        None
    }

    /// `impersonation`: a provider's bare domain is no real server's HELO (judged without
    /// DNS); a name under it is one only from a client whose forward-confirmed reverse name is
    /// that provider's. Without a resolver such a name is not judged (noted in the log).
    fn impersonation(&self, helo: &Helo, facts: &Facts<'_>, j: &mut Judging) -> Option<Verdict> {
        let Helo::Name(name) = helo else { return None };
        let named = self.providers.named(name)?;
        let (provider, domain) = (named.name, named.domain);
        if named.apex {
            let reason = format!(
                "HELO {name} is {provider}'s own domain, which none of its servers greets with"
            );
            return self.hit(Check::Impersonation, reason, None, None, j);
        }
        let reason = format!(
            "HELO {name} is under {provider}'s {domain}, but the client is not one of \
             {provider}'s servers"
        );
        let known = facts.dns.is_some_and(|dns| dns.client != ClientDns::NotLooked);
        if !known && !facts.looks {
            j.logged.push(Match {
                rule: Check::Impersonation.name(),
                reason: format!(
                    "HELO {name} is under {provider}'s {domain}: not judged without DNS"
                ),
                entry: None,
            });
            return None;
        }
        let clears = |confirmed: &str| self.providers.covers(&named, confirmed);
        self.hit_unless_client(Check::Impersonation, reason, None, facts, clears, j)
    }

    /// A heuristic matched: enforced unless the client shows a forward-confirmed reverse name
    /// that is not generic (the trust anchor, `trust.forward_confirmed`).
    fn heuristic(
        &self,
        check: Check,
        reason: String,
        facts: &Facts<'_>,
        j: &mut Judging,
    ) -> Option<Verdict> {
        if !self.trust {
            return self.hit(check, reason, None, None, j);
        }
        let Some(client) = facts.client else { return self.hit(check, reason, None, None, j) };
        let clears = |confirmed: &str| builtin::generic(confirmed, client).is_none();
        self.hit_unless_client(check, reason, None, facts, clears, j)
    }

    /// A match of `check` whose enforcement rests on the client's forward-confirmed reverse
    /// name: `clears` says whether that name clears the client (`Some`). Cleared, the match is
    /// logged, never enforced; not known yet, and the door can look, the verdict is made and
    /// wants the name ([`Wants::client`]); a lookup that failed for now answers 450.
    fn hit_unless_client(
        &self,
        check: Check,
        reason: String,
        entry: Option<Arc<EntryRef>>,
        facts: &Facts<'_>,
        clears: impl Fn(&str) -> bool,
        j: &mut Judging,
    ) -> Option<Verdict> {
        let client = facts.dns.map_or(&ClientDns::NotLooked, |dns| &dns.client);
        let enforces = matches!(self.action(check), CheckAction::Reject | CheckAction::Ban);
        match client {
            ClientDns::Confirmed(confirmed) if clears(confirmed) => {
                let reason = if enforces {
                    format!(
                        "{reason} (not enforced: the client is forward-confirmed as {confirmed})"
                    )
                } else {
                    reason
                };
                j.logged.push(Match { rule: check.name(), reason, entry });
                return None;
            }
            ClientDns::Confirmed(confirmed) if check.is_heuristic() && enforces => {
                let why = facts
                    .client
                    .and_then(|ip| builtin::generic(confirmed, ip))
                    .unwrap_or_else(|| confirmed.clone());
                let reason = format!("{reason} (the client's reverse name is generic: {why})");
                return self.hit(check, reason, entry, None, j);
            }
            ClientDns::TempFail(why) if enforces => {
                let helo = facts.argument.trim();
                let mut verdict = self.tempfail(
                    format!("{reason}; the client's reverse name could not be checked ({why})"),
                    format!(
                        "4.7.1 <{helo}>: Helo command rejected: cannot check your reverse name, \
                         try again later"
                    ),
                    j,
                );
                if self.action(check) == CheckAction::Ban {
                    verdict.deferred_ban = Some(check);
                }
                return Some(verdict);
            }
            ClientDns::NotLooked if enforces && facts.looks => j.wants.client = true,
            _ => {}
        }
        self.hit(check, reason, entry, None, j)
    }

    /// A verdict of "DNS could not say, try again later" ([`DNS_TEMPFAIL`]): 450, never a ban.
    fn tempfail(&self, reason: String, reply: String, j: &mut Judging) -> Verdict {
        Verdict {
            action: Action::Reject,
            rule: DNS_TEMPFAIL,
            reason,
            entry: None,
            reply: Some(EntryReply { code: 450, text: reply }),
            reject_at: self.reject_at,
            ttl: None,
            logged: std::mem::take(&mut j.logged),
            wants: std::mem::take(&mut j.wants),
            deferred_ban: None,
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
        let mut j = Judging { logged: verdict.logged, wants: verdict.wants };
        match self.hit(Check::HeloReuse, reason, None, reply, &mut j) {
            Some(decided) => decided,
            None => Verdict { logged: j.logged, wants: j.wants, ..verdict },
        }
    }

    /// `unknown_helo` and `helo_not_client` over what DNS said of the HELO name. Records not
    /// looked up yet are asked for ([`Wants::helo`] where a check enforces, else
    /// [`Wants::later`]: a dry run never waits). A lookup that got no answer to trust is a
    /// temporary failure, [`DNS_TEMPFAIL`]: where a check enforces, a 450 (never a 5xx, never
    /// a ban; the sender retries), else noted in the log under that id. Both are heuristics.
    fn dns_checks(&self, name: &str, facts: &Facts<'_>, j: &mut Judging) -> Option<Verdict> {
        let actions = [self.action(Check::UnknownHelo), self.action(Check::HeloNotClient)];
        if actions.iter().all(|a| *a == CheckAction::Off) || !name.contains('.') {
            return None;
        }
        let enforces = actions.iter().any(|a| matches!(a, CheckAction::Reject | CheckAction::Ban));
        let helo_dns = facts.dns.map_or(&HeloDns::NotLooked, |dns| &dns.helo);
        match helo_dns {
            HeloDns::NotLooked if facts.looks => {
                if enforces {
                    j.wants.helo = true;
                } else {
                    j.wants.later = true;
                }
                return None;
            }
            HeloDns::NotLooked => return None,
            HeloDns::TempFail(why) => {
                let reason = format!("HELO {name}: DNS lookup failed temporarily ({why})");
                if enforces {
                    let reply = format!(
                        "4.7.1 <{name}>: Helo command rejected: Host not found, try again later"
                    );
                    return Some(self.tempfail(reason, reply, j));
                }
                j.logged.push(Match { rule: DNS_TEMPFAIL, reason, entry: None });
                return None;
            }
            _ => {}
        }
        let dns = facts.dns.expect("records known");
        for check in [Check::UnknownHelo, Check::HeloNotClient] {
            if self.action(check) == CheckAction::Off {
                continue;
            }
            let reason = match (&dns.helo, check) {
                (HeloDns::Missing, Check::UnknownHelo) => {
                    format!("HELO {name} has no A, AAAA or MX record")
                }
                (HeloDns::Found { addresses, .. }, Check::HeloNotClient) => {
                    let Some(client) = facts.client.map(canonical) else { continue };
                    if addresses.iter().any(|a| canonical(*a) == client) || dns.confirms(name) {
                        continue;
                    }
                    format!("HELO {name} does not resolve to the client {client}")
                }
                _ => continue,
            };
            if let Some(v) = self.heuristic(check, reason, facts, j) {
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

    /// A check matched: a verdict if its action enforces, else noted in the log.
    fn hit(
        &self,
        check: Check,
        reason: String,
        entry: Option<Arc<EntryRef>>,
        reply: Option<EntryReply>,
        j: &mut Judging,
    ) -> Option<Verdict> {
        let action = match self.action(check) {
            CheckAction::Off => return None,
            CheckAction::Log => {
                j.logged.push(Match { rule: check.name(), reason, entry });
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
            logged: std::mem::take(&mut j.logged),
            wants: std::mem::take(&mut j.wants),
            deferred_ban: None,
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
        let mut j = Judging { logged: table.logged.clone(), wants: table.wants };
        match self.hit(Check::ForgedIdentity, reason, entry, None, &mut j) {
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
            wants: Wants::default(),
            deferred_ban: None,
        }
    }
}

/// What the checks gather on the way to a verdict: the `log` matches, and what DNS could
/// still tell.
#[derive(Default)]
struct Judging {
    logged: Vec<Match>,
    wants: Wants,
}

#[cfg(test)]
mod tests;
