//! Benchmark 5, rules: classifications per second with 10, 1k and 10k rules against a naive regex loop,
//! from the criterion benchmark `helo-agent/benches/rules.rs` (shortened measurement times),
//! read back through its bencher-format output.

use std::path::Path;
use std::process::Command;

use crate::progress;
use crate::report::{Report, f};

/// HELOs per iteration in the criterion bench.
const PER_ITER: f64 = 64.0;

pub fn run(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    progress("rules: cargo bench -p helo-agent --bench rules (about 2 minutes)");
    let output = Command::new("cargo")
        .args(["bench", "-q", "-p", "helo-agent", "--bench", "rules", "--"])
        .args(["--output-format", "bencher"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "cargo bench failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    // "test helo_classify/engine_regex_rules/1000 ... bench:      13,244 ns/iter (+/- 120)"
    let mut results: Vec<(String, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("test ")) {
        let name = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let ns = line
            .split("bench:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(|n| n.replace(',', ""))
            .and_then(|n| n.parse::<f64>().ok());
        if let Some(ns) = ns {
            results.push((name, PER_ITER * 1e9 / ns));
        }
    }
    anyhow::ensure!(!results.is_empty(), "no results in the bench output:\n{text}");
    let get = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let mut rows = Vec::new();
    let mut engine = Vec::new();
    let mut naive = Vec::new();
    for size in ["10", "1000", "10000"] {
        let e = get(&format!("helo_classify/engine_regex_rules/{size}")).unwrap_or(0.0);
        let n = get(&format!("helo_classify/naive_regex_loop/{size}")).unwrap_or(0.0);
        let t = get(&format!("helo_classify/engine_table_rules/{size}")).unwrap_or(0.0);
        engine.push(e);
        naive.push(n);
        rows.push(vec![size.to_owned(), f(e, 0), f(n, 0), f(e / n, 1), f(t, 0)]);
    }
    report.section(
        "5. Rules",
        "HELO classifications per second on one core (criterion, `cargo bench -p helo-agent --bench \
         rules`, 1 s warm-up and 3 s measurement each): the engine with badhelo-style regex \
         rules, a naive loop over the same regexes (what qmail's qregex does), and the engine with \
         domain-table rules. 64 HELOs per iteration: big senders, ordinary senders, some matches. \
         Plot: `rules.png` (log scale would flatter; the table has the ratios).",
        &["rules", "engine (regex) /s", "naive loop /s", "ratio", "engine (table) /s"],
        &rows,
        &[format!("Raw criterion names: {}", results.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "))],
    );
    // One count per iteration: back from HELOs/s to ns a count.
    let reuse: Vec<Vec<String>> = ["1", "100", "1000"]
        .iter()
        .filter_map(|n| {
            let per_second = get(&format!("helo_reuse/observe/{n}"))? / PER_ITER;
            Some(vec![(*n).to_owned(), f(1e9 / per_second, 0)])
        })
        .collect();
    report.table(
        &["networks that used the name", "ns a session"],
        &reuse,
        &["The HELO reuse count each judged session makes (`reuse::Memory::observe`, criterion \
           `helo_reuse/observe/N`) for a name that N client networks already use, as a big \
           provider's pool name is. It runs under one lock shared by every session thread."
            .into()],
    );
    crate::plot::bars(
        &out.join("rules.png"),
        "HELO classifications per second",
        "classifications/s",
        &["10 rules".into(), "1k rules".into(), "10k rules".into()],
        &[("engine".into(), engine), ("naive regex loop".into(), naive)],
    )?;
    Ok(())
}
