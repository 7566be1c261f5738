//! What `helo-agent tophelos` shows: the HELO names seen, by sessions and by distinct client
//! addresses, and which rules rejected them — the qmail `tophelos` script and the "who got the
//! badhelo message" log one-liners, kept in memory by the agent.
//!
//! Sessions are counted in one-minute buckets over `agent.report_window`. Memory is bounded: at
//! most [`MAX_HELOS_PER_MINUTE`] names per bucket (the rest are counted under `(other)`) and
//! [`MAX_CLIENTS_PER_HELO`] distinct addresses per name per bucket (beyond, the count is a lower
//! bound, marked in the answer). Pure: time is passed in.
//!
//! The rows also say how many client networks used each name lately and whether that makes it
//! reused (`networks`, `reused`): the judge fills them in from its reuse memory
//! (`Judge::mark_reuse`), which counts over `reuse.window`, not over the rows' `--since`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const MAX_HELOS_PER_MINUTE: usize = 10_000;
pub const MAX_CLIENTS_PER_HELO: usize = 1_000;
/// The name under which HELOs beyond the per-minute cap are counted.
pub const OTHER: &str = "(other)";

#[derive(Default)]
struct Counts {
    sessions: u64,
    clients: HashSet<IpAddr>,
    clients_capped: bool,
    /// Sessions rejected or banned, by rule.
    rejected: HashMap<&'static str, u64>,
}

struct Bucket {
    minute: u64,
    helos: HashMap<String, Counts>,
}

pub struct Report {
    window_minutes: u64,
    buckets: VecDeque<Bucket>,
}

/// One line of `tophelos`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeloRow {
    pub helo: String,
    pub sessions: u64,
    /// Distinct client addresses.
    pub clients: u64,
    /// `clients` is a lower bound (the per-minute cap was reached).
    pub clients_capped: bool,
    pub rejected: u64,
    /// Rules that rejected it, most sessions first.
    pub rules: Vec<RuleCount>,
    /// Distinct client networks (/24, /64) that used it within `reuse.window` up to now, as the
    /// reuse memory counts them (clients whose reverse DNS confirms the name are not counted,
    /// nor sessions another rule decided).
    #[serde(default)]
    pub networks: u64,
    /// `networks` is a lower bound (the memory's per-name cap was reached).
    #[serde(default)]
    pub networks_capped: bool,
    /// `networks` is `reuse.clients` or more: the name is reused (`helo_reuse`).
    #[serde(default)]
    pub reused: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub rule: String,
    pub sessions: u64,
}

impl Report {
    pub fn new(window: Duration) -> Self {
        Report { window_minutes: (window.as_secs() / 60).max(1), buckets: VecDeque::new() }
    }

    /// Counts one session that gave `helo` (normalised to lower case). `rejected_by` is the
    /// rule of a reject or ban verdict.
    pub fn record(
        &mut self,
        now_unix: u64,
        helo: &str,
        client: IpAddr,
        rejected_by: Option<&'static str>,
    ) {
        let minute = now_unix / 60;
        if self.buckets.back().is_none_or(|b| b.minute != minute) {
            self.buckets.push_back(Bucket { minute, helos: HashMap::new() });
        }
        while self.buckets.front().is_some_and(|b| b.minute + self.window_minutes <= minute) {
            self.buckets.pop_front();
        }
        let bucket = self.buckets.back_mut().expect("pushed above");
        let mut name = helo.to_ascii_lowercase();
        if !bucket.helos.contains_key(&name) && bucket.helos.len() >= MAX_HELOS_PER_MINUTE {
            name = OTHER.to_owned();
        }
        let counts = bucket.helos.entry(name).or_default();
        counts.sessions += 1;
        if counts.clients.len() < MAX_CLIENTS_PER_HELO {
            counts.clients.insert(client);
        } else if !counts.clients.contains(&client) {
            counts.clients_capped = true;
        }
        if let Some(rule) = rejected_by {
            *counts.rejected.entry(rule).or_default() += 1;
        }
    }

    /// The `limit` rules that rejected most sessions in the last `since`, over every HELO,
    /// ties by name (for `helo-agent top`).
    pub fn top_rules(&self, now_unix: u64, since: Duration, limit: usize) -> Vec<RuleCount> {
        let first = (now_unix.saturating_sub(since.as_secs())) / 60;
        let mut merged: HashMap<&'static str, u64> = HashMap::new();
        for bucket in self.buckets.iter().filter(|b| b.minute >= first) {
            for counts in bucket.helos.values() {
                for (rule, n) in &counts.rejected {
                    *merged.entry(rule).or_default() += n;
                }
            }
        }
        let mut rules: Vec<RuleCount> = merged
            .into_iter()
            .map(|(rule, sessions)| RuleCount { rule: rule.to_owned(), sessions })
            .collect();
        rules.sort_by(|a, b| b.sessions.cmp(&a.sessions).then_with(|| a.rule.cmp(&b.rule)));
        rules.truncate(limit);
        rules
    }

    /// The `limit` HELOs with most sessions in the last `since`, ties by name.
    pub fn top(&self, now_unix: u64, since: Duration, limit: usize) -> Vec<HeloRow> {
        let first = (now_unix.saturating_sub(since.as_secs())) / 60;
        let mut merged: HashMap<&str, Counts> = HashMap::new();
        for bucket in self.buckets.iter().filter(|b| b.minute >= first) {
            for (helo, counts) in &bucket.helos {
                let into = merged.entry(helo).or_default();
                into.sessions += counts.sessions;
                into.clients.extend(counts.clients.iter().copied());
                into.clients_capped |= counts.clients_capped;
                for (rule, n) in &counts.rejected {
                    *into.rejected.entry(rule).or_default() += n;
                }
            }
        }
        let mut rows: Vec<HeloRow> = merged
            .into_iter()
            .map(|(helo, counts)| {
                let mut rules: Vec<RuleCount> = counts
                    .rejected
                    .iter()
                    .map(|(r, n)| RuleCount { rule: (*r).to_owned(), sessions: *n })
                    .collect();
                rules.sort_by(|a, b| b.sessions.cmp(&a.sessions).then_with(|| a.rule.cmp(&b.rule)));
                HeloRow {
                    helo: helo.to_owned(),
                    sessions: counts.sessions,
                    clients: counts.clients.len() as u64,
                    clients_capped: counts.clients_capped,
                    rejected: counts.rejected.values().sum(),
                    rules,
                    networks: 0,
                    networks_capped: false,
                    reused: false,
                }
            })
            .collect();
        rows.sort_by(|a, b| b.sessions.cmp(&a.sessions).then_with(|| a.helo.cmp(&b.helo)));
        rows.truncate(limit);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_sessions_distinct_clients_and_rules() {
        let mut report = Report::new(Duration::from_secs(3600));
        let t = 1_700_000_000;
        report.record(t, "Friend", ip("192.0.2.1"), Some("badhelo"));
        report.record(t + 1, "friend", ip("192.0.2.1"), Some("badhelo"));
        report.record(t + 61, "friend", ip("192.0.2.2"), Some("no_dot"));
        report.record(t + 62, "mail.example.com", ip("192.0.2.9"), None);
        let rows = report.top(t + 70, Duration::from_secs(3600), 10);
        assert_eq!(
            rows[0],
            HeloRow {
                helo: "friend".into(),
                sessions: 3,
                clients: 2,
                clients_capped: false,
                rejected: 3,
                rules: vec![
                    RuleCount { rule: "badhelo".into(), sessions: 2 },
                    RuleCount { rule: "no_dot".into(), sessions: 1 }
                ],
                networks: 0,
                networks_capped: false,
                reused: false,
            }
        );
        assert_eq!(rows[1].helo, "mail.example.com");
        assert_eq!(rows[1].rejected, 0);
        assert_eq!(report.top(t + 70, Duration::from_secs(3600), 1).len(), 1, "limit");
    }

    #[test]
    fn top_rules_sum_every_helo_in_the_window() {
        let mut report = Report::new(Duration::from_secs(3600));
        let t = 1_700_000_000 / 60 * 60;
        report.record(t, "old", ip("192.0.2.1"), Some("localhost"));
        report.record(t + 600, "friend", ip("192.0.2.1"), Some("no_dot"));
        report.record(t + 601, "buddy", ip("192.0.2.2"), Some("no_dot"));
        report.record(t + 602, "[1.2.3.4]", ip("192.0.2.3"), Some("literal_mismatch"));
        report.record(t + 603, "mail.example.com", ip("192.0.2.4"), None);
        let rule = |rule: &str, sessions| RuleCount { rule: rule.into(), sessions };
        assert_eq!(
            report.top_rules(t + 610, Duration::from_secs(300), 10),
            [rule("no_dot", 2), rule("literal_mismatch", 1)]
        );
        assert_eq!(report.top_rules(t + 610, Duration::from_secs(3600), 10).len(), 3);
        assert_eq!(report.top_rules(t + 610, Duration::from_secs(3600), 1), [rule("no_dot", 2)]);
    }

    #[test]
    fn since_looks_back_only_that_far_and_the_window_forgets() {
        let mut report = Report::new(Duration::from_secs(600));
        let t = 1_700_000_000 / 60 * 60;
        report.record(t, "old", ip("192.0.2.1"), None);
        report.record(t + 300, "new", ip("192.0.2.1"), None);
        let names = |rows: Vec<HeloRow>| rows.into_iter().map(|r| r.helo).collect::<Vec<_>>();
        assert_eq!(names(report.top(t + 300, Duration::from_secs(60), 10)), ["new"]);
        assert_eq!(names(report.top(t + 300, Duration::from_secs(600), 10)), ["new", "old"]);
        report.record(t + 660, "later", ip("192.0.2.1"), None);
        assert_eq!(
            names(report.top(t + 660, Duration::from_secs(3600), 10)),
            ["later", "new"],
            "the bucket older than the 10 min window is gone"
        );
    }

    #[test]
    fn memory_is_bounded_per_minute() {
        let mut report = Report::new(Duration::from_secs(3600));
        let t = 1_700_000_000;
        for i in 0..MAX_HELOS_PER_MINUTE + 5 {
            report.record(t, &format!("bot{i}"), ip("192.0.2.1"), None);
        }
        let rows = report.top(t, Duration::from_secs(60), usize::MAX);
        assert_eq!(rows.len(), MAX_HELOS_PER_MINUTE + 1);
        assert!(rows.iter().any(|r| r.helo == OTHER && r.sessions == 5));
        for i in 0..MAX_CLIENTS_PER_HELO as u32 + 3 {
            report.record(t + 60, "busy", IpAddr::from(i.to_be_bytes()), None);
        }
        let busy = report.top(t + 60, Duration::from_secs(60), 1).remove(0);
        assert_eq!((busy.clients, busy.clients_capped), (MAX_CLIENTS_PER_HELO as u64, true));
    }
}
