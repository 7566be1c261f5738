//! What the agent reads of its host at start: the open-file limit it raises for its sessions,
//! and the interface of the default route, where XDP goes when `xdp.interface` is not set.

/// File descriptors a session may hold: client and MTA sockets, and one pipe (two ends) for
/// splice.
const FDS_PER_SESSION: u64 = 4;

/// Sessions the proxy holds at once under any open-file limit worth no warning: a busy MX
/// peaks in the hundreds. Below, a start says what to raise.
const FEW_SESSIONS: u64 = 1000;

/// Raises RLIMIT_NOFILE to what `max_sessions` needs (as root past the hard limit, up to
/// fs.nr_open, where CAP_SYS_RESOURCE allows). Returns the limit in force.
pub fn raise_fd_limit(max_sessions: usize) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let need = max_sessions as u64 * FDS_PER_SESSION + 256;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1_048_576);
    let current = getrlimit(Resource::Nofile);
    let (soft, hard) = (current.current.unwrap_or(u64::MAX), current.maximum.unwrap_or(u64::MAX));
    let wanted = need.min(nr_open).max(soft);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit { current: Some(wanted), maximum: Some(hard.max(wanted)) },
    )
    .or_else(|_| {
        setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(wanted)), maximum: Some(hard) })
    });
    let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let default = max_sessions == crate::config::raw::RawProxy::default().max_sessions;
    if let Some(level) = fd_limit_notice(limit, need, default) {
        let holds = limit.saturating_sub(256) / FDS_PER_SESSION;
        let fix = format!(
            "raise it (systemd: LimitNOFILE={need}, as the unit sets; shell: ulimit -Hn {need} \
             as root) or lower proxy.max_sessions"
        );
        match level {
            tracing::Level::WARN => tracing::warn!(
                limit,
                holds,
                max_sessions,
                "open-file limit too low for proxy.max_sessions: {fix}"
            ),
            _ => tracing::info!(
                limit,
                holds,
                max_sessions,
                "the open-file limit holds fewer sessions at once than proxy.max_sessions (its \
                 default): enough for a busy MX; for a flood, {fix}"
            ),
        }
    }
    limit
}

/// How loudly to say that `limit` open files fall short of the `need` of proxy.max_sessions
/// (`default`: the admin left it at its default): not at all when they do not; a warning when
/// the limit holds fewer than [`FEW_SESSIONS`] sessions, or fewer than the admin asked for;
/// else a note (a hard limit a shell inherited without CAP_SYS_RESOURCE to raise it, which
/// every start by hand met, is no fault of the admin's).
fn fd_limit_notice(limit: u64, need: u64, default: bool) -> Option<tracing::Level> {
    let holds = limit.saturating_sub(256) / FDS_PER_SESSION;
    if limit >= need {
        None
    } else if holds < FEW_SESSIONS || !default {
        Some(tracing::Level::WARN)
    } else {
        Some(tracing::Level::INFO)
    }
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

    /// Regression (issue 27): every start by hand warned about the open-file limit (a shell's
    /// hard limit, 20000 here, which root cannot raise without CAP_SYS_RESOURCE, holds 4936
    /// sessions, short of the default proxy.max_sessions' 10000). A warning only when it
    /// matters: fewer than 1000 sessions, or fewer than the admin asked for.
    #[test]
    fn the_open_file_limit_is_warned_about_only_when_it_matters() {
        let need = 10_000 * FDS_PER_SESSION + 256;
        assert_eq!(fd_limit_notice(65_536, need, true), None, "the unit's LimitNOFILE holds it");
        assert_eq!(fd_limit_notice(20_000, need, true), Some(tracing::Level::INFO));
        assert_eq!(fd_limit_notice(20_000, need, false), Some(tracing::Level::WARN), "asked for");
        assert_eq!(fd_limit_notice(1024, need, true), Some(tracing::Level::WARN), "192 sessions");
        assert_eq!(fd_limit_notice(1024, 1024, false), None);
    }

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
