//! `helo-agent run`: bind the SMTP listeners, load and attach the XDP program, start the ban
//! worker on the pinned maps (it also sweeps expired bans), serve sessions, and detach on
//! shutdown.
//! Everything is validated and bound before the first session is accepted.

use std::future::Future;

use crate::config::Config;
use crate::ebpf::{self, AttachMode, EbpfError, LoadOptions, PinnedMaps};

/// File descriptors a session may hold: client and MTA sockets, two pipes for splice.
const FDS_PER_SESSION: u64 = 6;

/// Raises RLIMIT_NOFILE to what `max_sessions` needs (as root past the hard limit, up to
/// fs.nr_open); warns with the fix when that is not enough. Returns the limit in force.
fn raise_fd_limit(max_sessions: usize) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let need = max_sessions as u64 * FDS_PER_SESSION + 256;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1_048_576);
    let current = getrlimit(Resource::Nofile);
    let (soft, hard) = (current.current.unwrap_or(u64::MAX), current.maximum.unwrap_or(u64::MAX));
    let wanted = need.min(nr_open).max(soft);
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit { current: Some(wanted), maximum: Some(hard.max(wanted)) },
    )
    .or_else(|_| {
        setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(wanted)), maximum: Some(hard) })
    });
    let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if raised.is_err() || limit < need {
        tracing::warn!(
            limit,
            need,
            max_sessions,
            "open-file limit too low for proxy.max_sessions: raise it (systemd: LimitNOFILE={need}; \
             shell: ulimit -n {need}) or lower proxy.max_sessions"
        );
    }
    limit
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(
        "no default route to take the interface from: pass --iface or set xdp.interface in the \
         config"
    )]
    NoDefaultInterface,
    #[error(transparent)]
    Bind(#[from] crate::proxy::BindError),
}

/// Overrides from the command line.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub interface: Option<String>,
    pub mode: Option<AttachMode>,
}

/// Runs until `shutdown` completes, then detaches the program (the pinned maps stay).
pub async fn run(
    config: &Config,
    options: &RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let iface = match options.interface.clone().or_else(|| config.xdp.interface.clone()) {
        Some(iface) => iface,
        None => default_route_interface().ok_or(AgentError::NoDefaultInterface)?,
    };
    let mode = options.mode.unwrap_or(config.xdp.mode);
    let fd_limit = raise_fd_limit(config.proxy.max_sessions);
    tracing::debug!(fd_limit, "open-file limit");
    let listeners = crate::proxy::bind(&config.proxy.listeners)?;
    let mut program = ebpf::load(&LoadOptions {
        pin_dir: &config.xdp.pin_dir,
        sizes: config.xdp.sizes,
        ports: &config.xdp.ports,
        allow: &config.rules.allowlist,
    })?;
    // An attach the kernel refuses (no XDP on this driver in this mode, another program there)
    // must not fail open silently: say so, and enforce the bans at accept instead. Other
    // errors (no such interface) are configuration errors and stop the agent.
    let attached = match program.attach(&iface, mode) {
        Ok(used) => Some(used),
        Err(error @ EbpfError::Attach { .. }) => {
            tracing::error!(
                %error,
                iface,
                "XDP NOT ATTACHED: bans are enforced in user space at accept instead (banned \
                 clients are closed before the greeting; ports not proxied are not protected)"
            );
            None
        }
        Err(error) => return Err(error.into()),
    };
    if let Some(used) = attached {
        tracing::info!(
            iface,
            mode = used,
            ports = ?config.xdp.ports,
            pin_dir = %config.xdp.pin_dir.display(),
            allowlist = config.rules.allowlist.len(),
            config = %config.source.as_deref().map_or("<embedded defaults>".into(), |p| p.display().to_string()),
            "XDP ban filter attached"
        );
    }

    let maps = PinnedMaps::open(&config.xdp.pin_dir)?;
    let (bans, _worker) =
        crate::blocklist::worker::spawn(maps, config.escalation, crate::clock::boot_ns);
    let enforce: Option<std::sync::Arc<dyn crate::blocklist::BanCheck>> = match attached {
        Some(_) => None,
        None => Some(std::sync::Arc::new(PinnedMaps::open(&config.xdp.pin_dir)?)),
    };
    let shared = crate::proxy::Shared::new(
        config.proxy.clone(),
        config.rules.clone(),
        config.reject_message.clone(),
        Some(bans),
        enforce,
    );
    for bound in &listeners {
        if let Ok(address) = bound.listener.local_addr() {
            tracing::info!(%address, check_helo = bound.check_helo, upstream = %config.proxy.upstream, "SMTP listener ready");
        }
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serve = crate::proxy::serve(listeners, shared, async move {
        let mut stopped = stopped;
        let _ = stopped.changed().await;
    });
    tokio::pin!(serve);

    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {
            let _ = stop.send(true);
            serve.await;
        }
        () = &mut serve => {}
    }
    drop(program);
    let what = if attached.is_some() { "XDP program detached" } else { "stopped" };
    tracing::info!(iface, "{what}; bans stay pinned in {}", config.xdp.pin_dir.display());
    Ok(())
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_v4(&v4).or_else(|| default_v6(&v6))
}

/// From /proc/net/route: `Iface Destination Gateway Flags ... Mask ...`, all hex.
fn default_v4(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then(|| fields[0].to_owned())
    })
}

/// From /proc/net/ipv6_route: `dest plen src splen next-hop metric refcnt use flags iface`.
fn default_v6(table: &str) -> Option<String> {
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() == 10
            && fields[0].bytes().all(|b| b == b'0')
            && fields[1] == "00"
            && fields[9] != "lo")
            .then(|| fields[9].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth1\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_v4(table).as_deref(), Some("eth0"));
        assert_eq!(default_v4("Iface\tDestination\n"), None);
    }

    #[test]
    fn default_route_from_proc_net_ipv6_route() {
        let table = "00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00200001       lo\n\
                     00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8000000000000000000000001 00000400 00000001 00000000 00000003     ens3\n";
        assert_eq!(default_v6(table).as_deref(), Some("ens3"));
    }
}
