//! `helo-agent check`: what the judge decides for a HELO, driven exactly as a door drives its
//! hearing (the lookups the agent would make where the verdict rests on DNS, and those a door
//! makes in the background for `log` checks, whose matches it shows; HELO reuse last, on the
//! count given), with why; the exit status says the verdict.

use std::io::Write as _;
use std::process::ExitCode;

use super::args::{EXIT_BAN, EXIT_REJECT};
use crate::config::{Config, GreetingMode};
use crate::judge::{Heard, Hearing, Law, ReuseSeen};
use crate::rules::{Action, RejectAt, Verdict};

/// What `check` knows of the session besides the HELO.
pub(super) struct Session<'a> {
    pub(super) client: Option<std::net::IpAddr>,
    pub(super) previous: &'a [String],
    pub(super) exempt_listener: bool,
    pub(super) pregreeted: bool,
    /// `--networks`: the reuse count to judge with.
    pub(super) networks: Option<usize>,
}

/// `check`: prints the verdict, and answers by the exit status.
pub(super) fn check(
    config: &Config,
    helo: &str,
    session: &Session,
    dns: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Session { client, previous, exempt_listener, pregreeted, networks } = *session;
    for warning in &config.warnings {
        eprintln!("helo-agent: warning: {warning}");
    }
    // As the agent would: where it does not greet itself, nobody is ever judged a pregreeter.
    let greets = config.proxy.greeting == GreetingMode::Own && !config.proxy.listeners.is_empty();
    if pregreeted && !greets {
        eprintln!(
            "helo-agent: note: --pregreeted ignored: the pregreet test runs only where the proxy \
             greets itself (proxy.greeting = \"own\", proxy.listeners not empty)"
        );
    }
    let pregreeted = pregreeted && greets;
    // The door's hearing, driven as a door drives it: the lookups the agent would make,
    // where DNS can still change the verdict; HELO reuse last, with the count given, since
    // `check` keeps none.
    let law = Law::given(&config.rules, networks);
    let mut hearing = Hearing::of(client, exempt_listener).after(previous.to_vec());
    if dns {
        hearing.look();
    }
    if pregreeted {
        hearing.pregreeted();
    }
    let mut heard = hearing.hear(&law, helo, None);
    let mut resolver = None;
    loop {
        match heard {
            Heard::Judged => break,
            Heard::Lookup { helo: name, client: asks_client, .. } => {
                let facts = lookups(config, &mut resolver, name.as_deref(), asks_client, client)?;
                heard = hearing.on_dns(&law, facts);
            }
            // What a door looks up in the background for `log` checks: `check` waits for it,
            // to show what the log would say.
            Heard::Later { helo: name } => {
                let facts = lookups(config, &mut resolver, Some(&name), true, client)?;
                hearing.on_late_dns(&law, &name, facts);
                break;
            }
        }
    }
    let looked = resolver.is_some().then(|| hearing.dns_facts().cloned()).flatten();
    let verdict = hearing.verdict().expect("judged").clone();
    let reuse = describe_reuse(&config.rules, hearing.reuse(), helo, networks);
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = serde_json::to_value(&verdict)?;
        value["helo"] = helo.into();
        value["dns"] = serde_json::to_value(&looked)?;
        value["networks"] = serde_json::to_value(networks)?;
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
    } else {
        write_verdict(&mut out, &verdict)?;
        if let Some(dns) = &looked {
            writeln!(out, "dns: {}", describe_dns(&config.rules, dns, client))?;
        }
        if let Some(reuse) = reuse {
            writeln!(out, "reuse: {reuse}")?;
        }
    }
    Ok(match verdict.action {
        Action::Pass => ExitCode::SUCCESS,
        Action::Reject => ExitCode::from(EXIT_REJECT),
        Action::Ban => ExitCode::from(EXIT_BAN),
    })
}

/// A resolver and its runtime, made at the first lookup `check` needs.
type Resolver = (tokio::runtime::Runtime, crate::dns::Dns);

/// What a lookup the hearing asks for says: `helo`'s records and `client`'s forward-confirmed
/// reverse name (with `asks_client` and a `--client`), from the config's resolvers.
fn lookups(
    config: &Config,
    resolver: &mut Option<Resolver>,
    helo: Option<&str>,
    asks_client: bool,
    client: Option<std::net::IpAddr>,
) -> anyhow::Result<crate::rules::DnsFacts> {
    use crate::dns::{Dns, Need};
    use crate::rules::{ClientDns, DnsFacts, HeloDns};
    if resolver.is_none() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let dns = runtime.block_on(async { Dns::new(&config.dns) })?;
        *resolver = Some((runtime, dns));
    }
    let (runtime, dns) = resolver.as_ref().expect("made above");
    // Waiting for a slot (Need::Required), the lookups always answer.
    Ok(runtime.block_on(async {
        let helo_dns = async {
            match helo {
                Some(name) => dns.helo(name, Need::Required).await.unwrap_or_default(),
                None => HeloDns::NotLooked,
            }
        };
        let client_dns = async {
            match client {
                Some(ip) if asks_client => dns.client(ip, Need::Required).await.unwrap_or_default(),
                _ => ClientDns::NotLooked,
            }
        };
        let (helo, client) = tokio::join!(helo_dns, client_dns);
        DnsFacts { helo, client }
    }))
}

/// One line on how `check` judged HELO reuse (`seen`), where the check is on and would look
/// at this HELO.
fn describe_reuse(
    rules: &crate::rules::RuleSet,
    seen: ReuseSeen,
    helo: &str,
    networks: Option<usize>,
) -> Option<String> {
    use crate::rules::helo::{self, Helo};
    use crate::rules::{Check, CheckAction};
    // Where the check cannot judge, a `--networks` the admin gave is answered, not ignored.
    if rules.action(Check::HeloReuse) == CheckAction::Off {
        return networks
            .map(|_| "not judged: checks.helo_reuse is \"off\" (--networks ignored)".into());
    }
    let limits = rules.reuse;
    let window = crate::duration::format(limits.window);
    Some(match (networks, seen) {
        (_, ReuseSeen::Decided(rule)) => {
            return networks
                .map(|_| format!("never counted: rule {rule} decided first (--networks ignored)"));
        }
        (_, ReuseSeen::NotCounted | ReuseSeen::Nothing)
            if matches!(helo::parse(helo), Helo::Name(_)) =>
        {
            "never counted: the client's forward-confirmed reverse name is this HELO".to_owned()
        }
        (_, ReuseSeen::NotCounted | ReuseSeen::Nothing) => {
            "never counted: not a domain name (a literal or an address)".to_owned()
        }
        (None, ReuseSeen::Counted) => format!(
            "not judged: check keeps no count of client networks; --networks N judges as if N \
             networks (this one's included) had used the name in the last {window} (reused from \
             reuse.clients = {}); `helo-agent tophelos` shows the running agent's counts",
            limits.clients
        ),
        (Some(n), ReuseSeen::Counted) => format!(
            "{n} client networks in the last {window} (reused from reuse.clients = {})",
            limits.clients
        ),
    })
}

/// One line on what DNS said.
fn describe_dns(
    rules: &crate::rules::RuleSet,
    dns: &crate::rules::DnsFacts,
    client: Option<std::net::IpAddr>,
) -> String {
    use crate::rules::{ClientDns, HeloDns};
    let helo = match &dns.helo {
        HeloDns::NotLooked => "HELO not looked up".to_owned(),
        HeloDns::Found { addresses, mx } => {
            let mut records: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            if *mx {
                records.push("MX".into());
            }
            format!("HELO name found ({})", records.join(" "))
        }
        HeloDns::Missing => "HELO name has no A, AAAA or MX record".to_owned(),
        HeloDns::TempFail(why) => format!("HELO lookup failed temporarily ({why})"),
    };
    let client = match (&dns.client, client) {
        (ClientDns::NotLooked, None) => "client not looked up (give --client)".to_owned(),
        (ClientDns::NotLooked, Some(_)) => "client not looked up (no rule needed it)".to_owned(),
        (ClientDns::Confirmed(name), ip) => {
            let generic = ip.and_then(|ip| crate::rules::builtin::generic(name, ip));
            match generic {
                Some(why) => format!("client forward-confirmed as {name}, a generic name ({why})"),
                None if rules.trust => format!(
                    "client forward-confirmed as {name}: the heuristic checks do not enforce \
                     against it"
                ),
                None => format!("client forward-confirmed as {name} (trust.forward_confirmed off)"),
            }
        }
        (ClientDns::Unconfirmed(names), _) if names.is_empty() => {
            "client has no reverse name".into()
        }
        (ClientDns::Unconfirmed(names), _) => {
            format!("client's reverse names {} do not point back at it", names.join(" "))
        }
        (ClientDns::TempFail(why), _) => {
            format!("client's reverse lookup failed temporarily ({why})")
        }
    };
    format!("{helo}; {client}")
}

fn write_verdict(out: &mut impl std::io::Write, verdict: &Verdict) -> std::io::Result<()> {
    let mut headline = verdict.action.to_string();
    if let Some(ttl) = verdict.ttl {
        headline.push_str(&format!(" for {}", crate::duration::format(ttl)));
    }
    if verdict.action != Action::Pass {
        let at = match verdict.reject_at {
            RejectAt::Helo => "at HELO",
            RejectAt::Rcpt => "at RCPT TO",
        };
        headline.push_str(&format!(" (rejected {at})"));
    }
    writeln!(out, "verdict: {headline}")?;
    writeln!(out, "rule:    {}", verdict.rule)?;
    writeln!(out, "reason:  {}", verdict.reason)?;
    if let Some(entry) = &verdict.entry {
        writeln!(out, "entry:   {entry}: {}", entry.text)?;
    }
    if let Some(reply) = &verdict.reply {
        writeln!(out, "reply:   {} {}", reply.code, reply.text)?;
    }
    for logged in &verdict.logged {
        let at = logged.entry.as_ref().map(|e| format!(" [{e}: {}]", e.text)).unwrap_or_default();
        writeln!(out, "log-only: {}: {}{at}", logged.rule, logged.reason)?;
    }
    Ok(())
}
