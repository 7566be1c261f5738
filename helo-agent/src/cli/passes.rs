//! `helo-agent passes`: the steering door's passes (clients the kernel sends straight to the
//! MTA), listed or removed, through the running agent when one answers, else straight on the
//! pinned pass maps (and the snapshot, for a removal).

use std::io::Write as _;

use super::link::{AgentLink, unexpected};
use crate::blocklist::passes::{self, PassEntry};
use crate::config::Config;
use crate::control::{Answer, Request};
use crate::ebpf::PassMaps;

/// `passes [--json]`: the passes in force, by address.
pub(super) fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let entries: Vec<PassEntry> = match AgentLink::of(config).ask(Request::Passes)? {
        Some(Answer::Passes(entries)) => entries,
        Some(other) => return Err(unexpected(other)),
        None => {
            let maps = PassMaps::open(&config.xdp.pin_dir)?;
            passes::list(&maps.entries()?, crate::clock::boot_ns())
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "{:<42} {:>10} {:>10}", "CLIENT", "REMAINING", "HITS")?;
    for e in &entries {
        let remaining = crate::duration::format(std::time::Duration::from_secs(e.remaining_secs));
        writeln!(out, "{:<42} {:>10} {:>10}", e.client, remaining, e.hits)?;
    }
    Ok(())
}

/// `passes --remove TARGET`: the client's pass (every pass inside a network) goes; its next
/// connection is judged again.
pub(super) fn remove(config: &Config, target: &str) -> anyhow::Result<()> {
    let net = passes::parse_net(target).map_err(anyhow::Error::msg)?;
    let request = Request::RemovePasses { target: net.to_string() };
    let removed = match AgentLink::of(config).ask(request)? {
        Some(Answer::PassesRemoved(answer)) => answer.removed,
        Some(other) => return Err(unexpected(other)),
        None => {
            let mut maps = PassMaps::open(&config.xdp.pin_dir)?;
            let in_maps = maps.remove_within(&net)?;
            let in_snapshot = match &config.snapshot.path {
                Some(path) => crate::blocklist::snapshot::forget_steer_passes(path, &net)?,
                None => 0,
            };
            in_maps.max(in_snapshot)
        }
    };
    anyhow::ensure!(removed > 0, "no pass for {net} (see `helo-agent passes`)");
    println!(
        "removed {removed} pass{}: judged again at the next connection",
        if removed == 1 { "" } else { "es" }
    );
    Ok(())
}
