//! One session's hearing, sans-IO: the one place the judging sequence is written. Every door
//! (the proxy session, the policy session) and `helo-agent check` drive it the same way, so
//! `check` explains exactly what a door would decide.
//!
//! For each HELO: the verdict by every check but DNS and reuse ([`RuleSet::classify`]); then,
//! where DNS can still change it and the door can look, "look these names up"
//! ([`Heard::Lookup`]) and the door's answer ([`Hearing::on_dns`]), which judges again only what
//! DNS can change ([`RuleSet::with_dns`]); last, HELO reuse, counted where the [`Law`] says
//! (the judge's memory, or the count `check` is given) after the lookups, so a client its
//! reverse name confirms is never counted. The hearing keeps the session's HELOs (each later
//! one is judged with those before it), its verdict (the latest), the rules that matched in
//! `log` mode over every HELO, and whether the client pregreeted.

use std::net::IpAddr;

use super::Client;
use crate::dns::Need;
use crate::reuse::Memory;
use crate::rules::{Action, Check, CheckAction, DnsFacts, Facts, RuleSet, Verdict};

/// What a hearing judges by: the rules in force for the session, and where HELO reuse is
/// counted.
#[derive(Clone, Copy)]
pub struct Law<'a> {
    rules: &'a RuleSet,
    count: Count<'a>,
}

/// Where HELO reuse is counted.
#[derive(Clone, Copy)]
enum Count<'a> {
    /// The judge's memory, which every door counts in.
    Memory(&'a Memory),
    /// A count given (`check --networks`); `None`: reuse is not judged.
    Given(Option<usize>),
}

impl<'a> Law<'a> {
    /// The doors' law: `rules`, and reuse counted in the judge's `memory`.
    pub fn new(rules: &'a RuleSet, memory: &'a Memory) -> Self {
        Law { rules, count: Count::Memory(memory) }
    }

    /// `check`'s law: `rules`, and reuse judged on the count given (none: not judged).
    pub fn given(rules: &'a RuleSet, networks: Option<usize>) -> Self {
        Law { rules, count: Count::Given(networks) }
    }

    pub fn rules(&self) -> &'a RuleSet {
        self.rules
    }

    /// The client networks that used `name` lately, `client`'s counted now.
    fn count(&self, name: &str, client: Option<IpAddr>) -> Option<usize> {
        match self.count {
            Count::Memory(memory) => {
                let window = self.rules.reuse.window;
                Some(memory.observe(name, client?, super::reuse_now(), window).networks)
            }
            Count::Given(networks) => networks,
        }
    }
}

/// What a HELO heard needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Judged: the verdict is [`Hearing::verdict`].
    Judged,
    /// DNS can still change the verdict: look `name` up (and the client's reverse name) and
    /// give the answer to [`Hearing::on_dns`], which judges.
    Lookup { name: String, need: Need },
}

/// How HELO reuse met the HELO judged last, for `check` to explain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReuseSeen {
    /// Nothing judged yet.
    #[default]
    Nothing,
    /// Another rule decided first (this one): never counted.
    Decided(&'static str),
    /// Not counted: the check is off, the HELO is no domain name, or the client's
    /// forward-confirmed reverse name is the HELO.
    NotCounted,
    /// Counted, and judged on the count (where the law has one).
    Counted,
}

pub struct Hearing {
    /// The client (`None`: `check` without `--client`).
    ip: Option<IpAddr>,
    /// The listener judges no HELO (submission).
    exempt: bool,
    /// The HELOs judged, in order (and those `check` is told came before).
    helos: Vec<String>,
    /// The verdict on the latest HELO judged.
    verdict: Option<Verdict>,
    /// Rules that matched in `log` mode, over every HELO.
    logged: Vec<&'static str>,
    /// The client spoke before the greeting was complete (only the proxy greeting itself can
    /// tell).
    pregreeted: bool,
    /// The door can look names up.
    looks: bool,
    /// A HELO waiting for DNS, with its verdict without DNS (boxed: a proxy session holds a
    /// hearing for its whole life, and this is rare).
    waiting: Option<Box<(String, Verdict)>>,
    reuse: ReuseSeen,
}

impl Hearing {
    /// A hearing of `client`'s session at a door.
    pub fn new(client: &Client) -> Self {
        Hearing::of(Some(client.ip), client.exempt)
    }

    /// A hearing of a client `check` may not know (`ip`), on a listener that judges no HELO
    /// (`exempt`) or one that does.
    pub fn of(ip: Option<IpAddr>, exempt: bool) -> Self {
        Hearing {
            ip,
            exempt,
            helos: Vec::new(),
            verdict: None,
            logged: Vec::new(),
            pregreeted: false,
            looks: false,
            waiting: None,
            reuse: ReuseSeen::Nothing,
        }
    }

    /// The door has a resolver: a HELO that DNS can still decide is judged after
    /// [`Heard::Lookup`] and [`Hearing::on_dns`].
    pub fn look(&mut self) {
        self.looks = true;
    }

    /// HELOs said earlier in the session (`check --previous`), oldest first.
    pub fn after(mut self, previous: Vec<String>) -> Self {
        self.helos = previous;
        self
    }

    /// The client spoke before the greeting was complete: a fact every later HELO is judged
    /// with (`checks.pregreet`).
    pub fn pregreeted(&mut self) {
        self.pregreeted = true;
    }

    /// Judges `helo`, said after the HELOs heard so far. `at_hand`: what the door knows of DNS
    /// without looking (the client's names Postfix sends the policy service), judged with
    /// where no lookup is asked for.
    pub fn hear(&mut self, law: &Law<'_>, helo: &str, at_hand: Option<&DnsFacts>) -> Heard {
        let verdict = law.rules.classify(&self.facts(helo, None));
        // DNS comes last: asked for only when no other rule decided.
        if self.looks
            && let Some((name, need)) = dns_need(law.rules, &verdict, helo)
        {
            self.waiting = Some(Box::new((helo.to_owned(), verdict)));
            return Heard::Lookup { name, need };
        }
        self.decide(law, helo.to_owned(), verdict, at_hand);
        Heard::Judged
    }

    /// What DNS said (`None`: nothing, no slot free) for the HELO of the last
    /// [`Heard::Lookup`]: its verdict now.
    pub fn on_dns(&mut self, law: &Law<'_>, facts: Option<&DnsFacts>) {
        let (helo, verdict) = *self.waiting.take().expect("on_dns answers a Heard::Lookup");
        self.decide(law, helo, verdict, facts);
    }

    /// Whether a HELO waits for [`Hearing::on_dns`].
    pub fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// The verdict on the HELO judged last.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// Whether a HELO failed: the session is rejected, whatever comes next.
    pub fn rejected(&self) -> bool {
        self.verdict.as_ref().is_some_and(|v| v.action != Action::Pass)
    }

    /// The HELO the verdict is about: the one judged last.
    pub fn helo(&self) -> Option<&str> {
        self.helos.last().map(String::as_str)
    }

    /// Every HELO judged, in order.
    pub fn helos(&self) -> &[String] {
        &self.helos
    }

    /// Rules that matched in `log` (dry-run) mode, over every HELO.
    pub fn logged(&self) -> &[&'static str] {
        &self.logged
    }

    /// How HELO reuse met the HELO judged last.
    pub fn reuse(&self) -> ReuseSeen {
        self.reuse
    }

    fn facts<'f>(&'f self, helo: &'f str, dns: Option<&'f DnsFacts>) -> Facts<'f> {
        Facts {
            client: self.ip,
            argument: helo,
            previous: &self.helos,
            exempt_listener: self.exempt,
            dns,
            pregreeted: self.pregreeted,
            reuse: None,
        }
    }

    /// `verdict`, the verdict on `helo` without DNS, completed: what DNS changes (with `dns`),
    /// then HELO reuse, judged last.
    fn decide(&mut self, law: &Law<'_>, helo: String, verdict: Verdict, dns: Option<&DnsFacts>) {
        let verdict = match dns {
            // Only what DNS can change is judged again (the rest was, before the lookup).
            Some(dns) => law.rules.with_dns(verdict, &self.facts(&helo, Some(dns))),
            None => verdict,
        };
        let verdict = self.count_reuse(law, &helo, dns, verdict);
        self.helos.push(helo);
        for logged in &verdict.logged {
            if !self.logged.contains(&logged.rule) {
                self.logged.push(logged.rule);
            }
        }
        self.verdict = Some(verdict);
    }

    /// The last check, HELO reuse (`checks.helo_reuse`, `[reuse]`): the client's network is
    /// counted for the name where the law counts, and the count judged. Nothing is counted
    /// where [`RuleSet::reuse_name`] says so: a rule decided, the HELO is no domain name, or
    /// the client's forward-confirmed reverse name is the HELO (so this comes after the
    /// lookups, never before). Once per judged HELO.
    fn count_reuse(
        &mut self,
        law: &Law<'_>,
        helo: &str,
        dns: Option<&DnsFacts>,
        v: Verdict,
    ) -> Verdict {
        let rules = law.rules;
        let Some(name) = rules.reuse_name(&v, helo, dns) else {
            let on = rules.action(Check::HeloReuse) != CheckAction::Off;
            self.reuse = if on && v.rule != "pass" {
                ReuseSeen::Decided(v.rule)
            } else {
                ReuseSeen::NotCounted
            };
            return v;
        };
        self.reuse = ReuseSeen::Counted;
        match law.count(&name, self.ip) {
            Some(networks) => rules.with_reuse(v, helo, dns, networks),
            None => v,
        }
    }
}

/// Whether DNS can still change `verdict`, the verdict on `helo` without DNS, and so whether
/// the door should look: `None` when the DNS checks are off, the HELO is not a domain name, or
/// a rule already decided (DNS checks come last). [`Need::Required`] when a DNS check enforces
/// (the session waits for the answers), or `helo_reuse` does (its guard, the client's
/// forward-confirmed reverse name, must be known before a name is judged reused);
/// [`Need::Optional`] when they only log (the lookups are skipped when every lookup slot is
/// taken). `helo_reuse` in `log` asks for no lookup of its own: it reads what the DNS checks'
/// lookups found.
fn dns_need(rules: &RuleSet, verdict: &Verdict, helo: &str) -> Option<(String, Need)> {
    let enforces = |a: &CheckAction| matches!(a, CheckAction::Reject | CheckAction::Ban);
    let actions = [rules.action(Check::UnknownHelo), rules.action(Check::HeloNotClient)];
    let need = if actions.iter().any(enforces) || enforces(&rules.action(Check::HeloReuse)) {
        Need::Required
    } else if actions.contains(&CheckAction::Log) {
        Need::Optional
    } else {
        return None;
    };
    match crate::rules::helo::parse(helo) {
        crate::rules::helo::Helo::Name(name) if name.contains('.') && verdict.rule == "pass" => {
            Some((name, need))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn rules(extra: &str) -> Arc<RuleSet> {
        let text = format!("[identity]\ndetect = false\n{extra}");
        crate::config::Config::parse(&text, std::path::Path::new("t"), &Default::default())
            .unwrap()
            .rules
    }

    /// HELO reuse asks for DNS only where it enforces (its guard must be known first); in
    /// `log` it reads what the DNS checks looked up, and asks nothing with them off.
    #[test]
    fn helo_reuse_asks_for_dns_only_where_it_enforces() {
        let off = "[checks]\nunknown_helo = \"off\"\nhelo_not_client = \"off\"\n";
        let need = |extra: &str, helo: &str| {
            let rules = rules(&format!("{off}{extra}"));
            let client = Client::new("198.51.100.7".parse().unwrap(), None, false);
            let mut hearing = Hearing::new(&client);
            hearing.look();
            match hearing.hear(&Law::given(&rules, None), helo, None) {
                Heard::Lookup { need, .. } => Some(need),
                Heard::Judged => None,
            }
        };
        assert_eq!(need("helo_reuse = \"log\"", "bulk.example"), None);
        assert_eq!(need("helo_reuse = \"reject\"", "bulk.example"), Some(Need::Required));
        assert_eq!(need("helo_reuse = \"ban\"", "localhost"), None, "a rule decided");
    }

    /// What a door knows of DNS without looking (Postfix's forward-confirmed client name) is
    /// judged with where no lookup is asked for, exactly as judging everything with it: a
    /// confirmed name is never dynamic.
    #[test]
    fn dns_at_hand_is_judged_with_where_nothing_is_looked_up() {
        use crate::rules::{ClientDns, HeloDns};
        let rules = rules("[checks]\ndynamic = \"reject\"\n");
        let helo = "host-203-0-113-9.isp.example";
        let client = Client::new("203.0.113.9".parse().unwrap(), None, false);
        let confirmed = DnsFacts {
            helo: HeloDns::NotLooked,
            client: ClientDns::Confirmed(helo.to_uppercase()),
        };
        let law = Law::given(&rules, None);
        let mut hearing = Hearing::new(&client);
        assert_eq!(hearing.hear(&law, helo, None), Heard::Judged);
        assert_eq!(hearing.verdict().unwrap().rule, "dynamic");
        let mut hearing = Hearing::new(&client);
        assert_eq!(hearing.hear(&law, helo, Some(&confirmed)), Heard::Judged);
        assert_eq!(hearing.verdict().unwrap().rule, "pass");
        assert_eq!(hearing.reuse(), ReuseSeen::NotCounted, "helo_reuse is off here");
    }
}
