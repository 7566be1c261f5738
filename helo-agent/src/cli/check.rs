//! `helo-agent check`: what the judge decides for a HELO, driven exactly as a door drives its
//! hearing (the lookups the agent would make, where DNS can still change the verdict; HELO
//! reuse last, on the count given), with why; the exit status says the verdict.

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
    let mut looked = None;
    if let Heard::Lookup { name, .. } = hearing.hear(&law, helo, None) {
        looked = Some(lookups(config, &name, client)?);
        hearing.on_dns(&law, looked.as_ref());
    }
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
            writeln!(out, "dns: {}", describe_dns(dns))?;
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

/// The DNS facts for `helo` (and `client`'s reverse name), from the config's resolvers.
fn lookups(
    config: &Config,
    helo: &str,
    client: Option<std::net::IpAddr>,
) -> anyhow::Result<crate::rules::DnsFacts> {
    use crate::dns::{Dns, Need};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let dns = Dns::new(&config.dns)?;
        // Waiting for a slot (Need::Required), the lookups always answer.
        let facts = match client {
            Some(ip) => dns.facts(helo, ip, Need::Required).await,
            None => dns
                .helo(helo, Need::Required)
                .await
                .map(|helo| crate::rules::DnsFacts { helo, client: Default::default() }),
        };
        Ok(facts.unwrap_or_default())
    })
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
fn describe_dns(dns: &crate::rules::DnsFacts) -> String {
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
    let client = match &dns.client {
        ClientDns::NotLooked => "client not looked up (give --client)".to_owned(),
        ClientDns::Confirmed(name) => format!("client's reverse name {name} (forward-confirmed)"),
        ClientDns::Unconfirmed(names) if names.is_empty() => "client has no reverse name".into(),
        ClientDns::Unconfirmed(names) => {
            format!("client's reverse names {} do not point back at it", names.join(" "))
        }
        ClientDns::TempFail(why) => format!("client's reverse lookup failed temporarily ({why})"),
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
