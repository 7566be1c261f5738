//! The ban commands: `ban`, `unban`, `list`, `stats` and `detach`, through the running agent
//! when one answers, else straight on the pinned maps (and the snapshot).

use std::io::Write as _;

use helo_common::REASON_TEXT_LEN;

use super::link::{AgentLink, unexpected};
use crate::addr::BanTarget;
use crate::blocklist::{BanEntry, Blocklist, MAX_TTL, Ttl};
use crate::config::Config;
use crate::control::{Answer, Request, XdpStats};
use crate::ebpf::PinnedMaps;

/// `ban`: through the agent when one runs, else straight into the pinned maps.
pub(super) fn ban(
    config: &Config,
    target: &str,
    ttl: Option<&str>,
    reason: &str,
    prefix: bool,
) -> anyhow::Result<()> {
    let target = parse_target(target, prefix)?;
    let ttl = match ttl {
        None => Ttl::For(config.rules.ban_ttl),
        Some(text) => parse_ttl(text)?,
    };
    let reason = reason.trim();
    anyhow::ensure!(
        reason.len() <= REASON_TEXT_LEN,
        "--reason is {} bytes long; a ban keeps at most {REASON_TEXT_LEN}: shorten it",
        reason.len()
    );
    if let Some(net) = config.rules.allowlist.iter().find(|net| target.within(net)) {
        anyhow::bail!(
            "{target} is in the allowlisted network {net} and would never be dropped: remove it \
             from allowlist.networks first"
        );
    }
    for net in config.rules.allowlist.iter().filter(|net| target.overlaps(net)) {
        println!("note: {net} is allowlisted: its addresses inside {target} still pass");
    }
    let ttl_secs = match ttl {
        Ttl::For(d) => Some(d.as_secs().max(1)),
        Ttl::Forever => None,
    };
    let request = Request::Ban { target: target.to_string(), ttl_secs, reason: reason.to_owned() };
    let through_agent = AgentLink::of(config).ask(request)?.is_some();
    if !through_agent {
        let mut list = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?);
        list.ban(&target, ttl, reason, crate::clock::boot_ns())?;
    }
    let how_long = match ttl {
        Ttl::For(d) => format!("for {}", crate::duration::format(d)),
        Ttl::Forever => "forever".into(),
    };
    match (config.fleet.redis.is_some(), through_agent) {
        (true, true) => println!(
            "banned {target} {how_long}, here and, through the fleet, on the other gateways"
        ),
        (true, false) => println!(
            "banned {target} {how_long} on this gateway only: the agent is not running, so the \
             fleet is not told"
        ),
        (false, _) => println!("banned {target} {how_long}"),
    }
    Ok(())
}

/// `ban --ttl`: a duration up to [`MAX_TTL`], or `forever`.
pub(super) fn parse_ttl(text: &str) -> anyhow::Result<Ttl> {
    if text == "forever" {
        return Ok(Ttl::Forever);
    }
    let ttl = crate::duration::parse(text)?;
    anyhow::ensure!(!ttl.is_zero(), "--ttl must be longer than 0s");
    anyhow::ensure!(
        ttl <= MAX_TTL,
        "--ttl {text} is longer than the longest ban, {} (about ten years): use --ttl forever \
         for a ban that never ends",
        crate::duration::format(MAX_TTL)
    );
    Ok(Ttl::For(ttl))
}

/// `unban`: through the agent (which also forgets the offences) when one runs, else in the
/// pinned maps.
pub(super) fn unban(config: &Config, target: &str, prefix: bool) -> anyhow::Result<()> {
    let target = parse_target(target, prefix)?;
    let request = Request::Unban { target: target.to_string() };
    let fleet = config.fleet.redis.is_some();
    let (was_banned, through_agent) = match AgentLink::of(config).ask(request)? {
        Some(Answer::Unbanned(answer)) if fleet && !answer.was_banned => {
            println!(
                "{target} was not banned here; the other gateways are told to lift it (through \
                 Redis: at once, or when it is reachable again)"
            );
            return Ok(());
        }
        Some(Answer::Unbanned(answer)) => (answer.was_banned, true),
        Some(other) => return Err(unexpected(other)),
        None => {
            // No agent: the pinned maps, and the snapshot the next start would restore from.
            let in_maps = Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?).unban(&target)?;
            let in_snapshot = match &config.snapshot.path {
                Some(path) => crate::blocklist::snapshot::forget(path, &target.to_string())?,
                None => false,
            };
            (in_maps || in_snapshot, false)
        }
    };
    if !was_banned && let Some(prefix) = covering(config, &target) {
        anyhow::bail!(
            "{target} is not banned itself, the ban of {prefix} covers it (a rule's ban covers \
             the client's IPv6 /64 by default, bans.prefix_v6): to lift it, unban {prefix}"
        );
    }
    anyhow::ensure!(was_banned, "{target} is not banned (see `helo-agent list`)");
    match (fleet, through_agent) {
        (true, true) => println!(
            "unbanned {target} here; the other gateways are told to lift it (through Redis: at \
             once, or when it is reachable again)"
        ),
        (true, false) => println!(
            "unbanned {target} on this gateway only: the agent is not running, so the fleet still \
             holds the ban, and this gateway takes it back at its next start; unban through a \
             running agent to lift it everywhere"
        ),
        (false, _) => println!("unbanned {target}"),
    }
    Ok(())
}

/// A ban of a prefix that covers `target`, from the agent or the pinned maps, for an admin
/// who unbans an address that a prefix ban holds.
fn covering(config: &Config, target: &BanTarget) -> Option<BanTarget> {
    let entries = match AgentLink::of(config).ask(Request::List) {
        Ok(Some(Answer::Listed(entries))) => entries,
        _ => Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir).ok()?)
            .list(crate::clock::boot_ns())
            .ok()?,
    };
    entries
        .iter()
        .filter_map(|entry| entry.target.parse::<BanTarget>().ok())
        .find(|ban| ban.is_prefix() && ban != target && ban.network().contains(&target.network()))
}

/// `list`: the bans in force, from the agent or the pinned maps.
pub(super) fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let entries: Vec<BanEntry> = match AgentLink::of(config).ask(Request::List)? {
        Some(Answer::Listed(entries)) => entries,
        Some(other) => return Err(unexpected(other)),
        None => {
            Blocklist::new(PinnedMaps::open(&config.xdp.pin_dir)?).list(crate::clock::boot_ns())?
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
        return Ok(());
    }
    // With a fleet, where each ban was made: `here`, or the other gateway's node name.
    let from = config.fleet.redis.is_some() || entries.iter().any(|e| e.origin.is_some());
    let header = if from { "FROM          REASON" } else { "REASON" };
    writeln!(out, "{:<42} {:>10} {:>10}  {header}", "ADDRESS", "REMAINING", "HITS")?;
    for e in &entries {
        let remaining = e.remaining_secs.map_or("forever".into(), |s| {
            crate::duration::format(std::time::Duration::from_secs(s))
        });
        let origin = match (from, &e.origin) {
            (false, _) => String::new(),
            (true, origin) => format!("{:<13} ", origin.as_deref().unwrap_or("here")),
        };
        // A reason may come from another gateway, or anyone who can write to its Redis: no
        // control characters reach the terminal.
        let reason: String =
            e.reason.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        writeln!(out, "{:<42} {:>10} {:>10}  {origin}{reason}", e.target, remaining, e.hits)?;
    }
    Ok(())
}

/// `stats`: the XDP counters, from the agent or the pinned maps.
pub(super) fn stats(config: &Config, json: bool) -> anyhow::Result<()> {
    let stats = match AgentLink::of(config).ask(Request::Stats)? {
        Some(Answer::Stats(stats)) => stats,
        Some(other) => return Err(unexpected(other)),
        None => XdpStats(PinnedMaps::open(&config.xdp.pin_dir)?.stats()?),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &stats)?;
        writeln!(out)?;
        return Ok(());
    }
    for stat in helo_common::Stat::ALL {
        writeln!(out, "{:<14} {}", stat.name(), stats.get(stat))?;
    }
    Ok(())
}

/// `detach`: removes the pinned links (and with `maps` the pinned maps).
pub(super) fn detach(config: &Config, maps: bool) -> anyhow::Result<()> {
    let removed = crate::ebpf::detach(&config.xdp.pin_dir, maps)?;
    if removed.is_empty() {
        println!("nothing pinned in {}", config.xdp.pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    if AgentLink::of(config).ask(Request::Stats).is_ok_and(|answer| answer.is_some()) {
        println!(
            "note: an agent is still running and holds the program until it exits; stop it to \
             detach now"
        );
    }
    Ok(())
}

fn parse_target(text: &str, prefix: bool) -> anyhow::Result<BanTarget> {
    let target: BanTarget = text.parse()?;
    Ok(match (prefix, target) {
        (false, t) | (true, t @ (BanTarget::V6Net64(_) | BanTarget::V6Net(..))) => t,
        (true, BanTarget::V6(o)) => BanTarget::prefix(std::net::Ipv6Addr::from(o).into()),
        (true, BanTarget::V4(_) | BanTarget::V4Net(..)) => anyhow::bail!(
            "--prefix widens an IPv6 address to its /64; for an IPv4 prefix, write it: \
             192.0.2.0/24"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_flag_widens_ipv6_only() {
        assert_eq!(parse_target("2001:db8:1:2::9", true).unwrap().to_string(), "2001:db8:1:2::/64");
        assert_eq!(parse_target("2001:db8:1:2::9", false).unwrap().to_string(), "2001:db8:1:2::9");
        assert!(parse_target("192.0.2.1", true).is_err());
        assert_eq!(parse_target("192.0.2.1/24", false).unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(parse_target("2001:db8:1::/48", true).unwrap().to_string(), "2001:db8:1::/48");
    }
}
