//! The Grafana dashboard (packaging/grafana-dashboard.json) asks only for what the agent exports:
//! every metric name in its queries is a sample name of the agent's own exposition (the text
//! `GET /metrics` serves), and every label a query filters or groups by is one that metric has.
//! A renamed metric or label fails here instead of leaving an empty panel.

use std::collections::{BTreeMap, BTreeSet};

use helo_agent::metrics::{
    EndLabels, Metrics, NameLabels, PathLabels, ResultLabels, VerdictLabels,
};

/// Labels Prometheus adds at scrape time, not the agent.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// The agent's exposition with a sample in every labelled family, so their labels show.
fn scrape() -> String {
    let metrics = Metrics::default();
    metrics.sessions.get_or_create(&VerdictLabels { verdict: "reject", rule: "no_dot" }).inc();
    metrics.session_ends.get_or_create(&EndLabels { end: "relayed" }).inc();
    metrics.map_entries.get_or_create(&NameLabels { name: "bans_v4" }).set(1);
    metrics.relay_bytes.get_or_create(&PathLabels { path: "splice" }).inc();
    metrics.reloads.get_or_create(&ResultLabels { result: "ok" }).inc();
    metrics.snapshots.get_or_create(&ResultLabels { result: "ok" }).inc();
    metrics.update_xdp(&[1; helo_common::STAT_COUNT as usize]);
    metrics.encode()
}

/// Sample names the exposition offers (a counter `x` is scraped as `x_total`), each with the
/// label names its samples carry.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut names = BTreeMap::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').expect("# TYPE name kind");
            let samples: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")).into(),
                "info" => vec![format!("{name}_info")],
                _ => vec![name.to_owned()],
            };
            for sample in samples {
                names.entry(sample).or_insert_with(BTreeSet::new);
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).expect("a sample line");
            let labels = names.entry(line[..end].to_owned()).or_default();
            if let Some(set) = line[end..].strip_prefix('{') {
                let set = &set[..set.find('}').expect("labels end")];
                for pair in set.split(',') {
                    labels.insert(pair.split_once('=').expect("label=value").0.to_owned());
                }
            }
        }
    }
    names
}

/// Every PromQL text in the dashboard: panel targets and template variable queries.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(text)) => {
                        out.push(text.clone())
                    }
                    ("query", serde_json::Value::String(text)) if text.contains('(') => {
                        out.push(text.clone())
                    }
                    _ => queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_and_labels_the_agent_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard"))
            .expect("the dashboard is JSON");
    let mut texts = Vec::new();
    queries(&dashboard, &mut texts);
    assert!(texts.len() >= 10, "the dashboard's queries: {texts:?}");

    let text = scrape();
    let exported = exported(&text);
    let metric = regex::Regex::new(r"\b(helo_filter_[a-z0-9_]+)(\{([^}]*)\})?").unwrap();
    let matcher = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*""#).unwrap();
    let grouping = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let mut used = BTreeSet::new();
    for query in &texts {
        let mut labels_here = BTreeSet::new();
        let mut found = false;
        for m in metric.captures_iter(query) {
            found = true;
            let name = &m[1];
            let Some(labels) = exported.get(name) else {
                panic!(
                    "the dashboard asks for {name}, which the agent does not export:\n{query}\n\n{text}"
                )
            };
            used.insert(name.to_owned());
            labels_here.extend(labels.iter().cloned());
            for l in m.get(3).map(|s| matcher.captures_iter(s.as_str())).into_iter().flatten() {
                let label = &l[1];
                assert!(
                    TARGET_LABELS.contains(&label) || labels.contains(label),
                    "{name} has no label {label:?} (it has {labels:?}):\n{query}"
                );
            }
        }
        assert!(found, "a query without a helo_filter_ metric: {query}");
        for g in grouping.captures_iter(query) {
            for label in g[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
                assert!(
                    TARGET_LABELS.contains(&label) || labels_here.contains(label),
                    "grouped by {label:?}, which none of its metrics has:\n{query}"
                );
            }
        }
    }
    // What the issue asks the dashboard to show.
    for name in [
        "helo_filter_sessions_total",
        "helo_filter_bans_active",
        "helo_filter_bans_added_total",
        "helo_filter_bans_expired_total",
        "helo_filter_xdp_packets_total",
        "helo_filter_relay_bytes_total",
    ] {
        assert!(used.contains(name), "the dashboard shows {name}");
    }
}

#[test]
fn a_misspelt_metric_would_be_caught() {
    let exported = exported(&scrape());
    assert!(exported.contains_key("helo_filter_sessions_total"));
    assert!(!exported.contains_key("helo_filter_sessions"), "a counter is scraped as _total");
    assert!(exported["helo_filter_sessions_total"].contains("rule"));
    assert!(exported["helo_filter_xdp_packets_total"].contains("name"));
}
