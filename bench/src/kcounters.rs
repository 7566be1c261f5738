//! What the kernel counted on a packet's way, by name, to find where packets went: an
//! interface's `ethtool -S` and link drops (a veth's ring overflows show there), the softnet
//! backlog's drops and squeezes, and a namespace's TCP counters (`nstat`). A snapshot before and
//! after a run, and their difference, name the counter that moved.

use std::collections::BTreeMap;
use std::process::Command;

/// Named counters; a name is prefixed by where it was read (`gw:`, `softnet:`, ...).
pub type Counters = BTreeMap<String, u64>;

/// `ethtool -S IFNAME` and `ip -s link` rx/tx drops of `ifname` in namespace `ns`, each name
/// prefixed with `label:`. Empty where ethtool is missing (`cargo xtask setup` installs it).
pub fn link(ns: &str, ifname: &str, label: &str) -> Counters {
    let mut out = Counters::new();
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in run(&["ethtool", "-S", ifname]).lines() {
        if let Some((name, value)) = line.trim().split_once(": ")
            && let Ok(value) = value.trim().parse()
        {
            out.insert(format!("{label}:{name}"), value);
        }
    }
    // `ip -s link`: the line after "RX: bytes packets errors dropped ..." holds the values.
    let text = run(&["ip", "-s", "link", "show", "dev", ifname]);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        for side in ["RX", "TX"] {
            if line.starts_with(&format!("{side}:")) {
                let names: Vec<&str> = line.split_whitespace().skip(1).collect();
                let values: Vec<&str> =
                    lines.get(i + 1).map_or(Vec::new(), |l| l.split_whitespace().collect());
                for (name, value) in names.iter().zip(values) {
                    if let Ok(value) = value.parse() {
                        out.insert(format!("{label}:link_{}_{name}", side.to_lowercase()), value);
                    }
                }
            }
        }
    }
    out
}

/// /proc/net/softnet_stat summed over the CPUs: packets processed, dropped (a CPU's backlog
/// full: `netdev_max_backlog`), time squeezed (net_rx_action out of budget or time).
pub fn softnet() -> Counters {
    let text = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    let mut out = Counters::new();
    for line in text.lines() {
        let fields: Vec<u64> =
            line.split_whitespace().filter_map(|v| u64::from_str_radix(v, 16).ok()).collect();
        for (i, name) in ["processed", "dropped", "time_squeeze"].iter().enumerate() {
            *out.entry(format!("softnet:{name}")).or_default() +=
                fields.get(i).copied().unwrap_or(0);
        }
    }
    // Where the softirq work ran: /proc/stat's softirq ticks per CPU.
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    for line in stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some(ticks) = fields.get(7).and_then(|v| v.parse().ok()) {
            out.insert(format!("{}:softirq_ticks", fields[0]), ticks);
        }
    }
    out
}

/// The TCP and IP counters of namespace `ns` that a lost connection moves (`nstat -asz`,
/// absolute values, history left alone), prefixed with `label:`.
pub fn tcp(ns: &str, label: &str) -> Counters {
    const WANTED: [&str; 9] = [
        "TcpActiveOpens",
        "TcpPassiveOpens",
        "TcpRetransSegs",
        "TcpExtListenOverflows",
        "TcpExtListenDrops",
        "TcpExtTCPSynRetrans",
        "TcpExtTCPTimeouts",
        "IpExtInNoRoutes",
        "IpInDiscards",
    ];
    let text = Command::new("ip")
        .args(["netns", "exec", ns, "nstat", "-asz"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, value) = (it.next()?, it.next()?.parse().ok()?);
            WANTED.contains(&name).then(|| (format!("{label}:{name}"), value))
        })
        .collect()
}

/// `after - before`, the counters that moved only.
pub fn moved(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// The counters whose name contains one of `words`, as `name=value` joined by spaces.
pub fn show(counters: &Counters, words: &[&str]) -> String {
    counters
        .iter()
        .filter(|(k, _)| words.is_empty() || words.iter().any(|w| k.contains(w)))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn moved_keeps_what_grew() {
        let before: Counters = [("a".into(), 5), ("b".into(), 7)].into();
        let after: Counters = [("a".into(), 9), ("b".into(), 7), ("c".into(), 2)].into();
        let m = moved(&before, &after);
        assert_eq!(m, [("a".into(), 4), ("c".into(), 2)].into());
        assert_eq!(show(&m, &["a"]), "a=4");
    }
}
