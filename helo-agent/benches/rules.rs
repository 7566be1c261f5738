//! HELO classifications per second with 10, 1k and 10k rules, against the naive way: a loop
//! over the same regexes, one `is_match` after another (what qmail's qregex does).
//!
//! Two rule shapes: regex lines (the badhelo file) and domain-table entries (an access table).
//! The inputs are 64 HELOs: big senders' real names, ordinary senders, and some that match.
//! Beside them, the HELO reuse count a session makes for a name that many networks use.
//! `cargo bench -p helo-agent --bench rules`

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use helo_agent::config::{Config, HostFacts};
use helo_agent::rules::{Facts, RuleSet};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// Badhelo-style regex lines, deterministic, in the shapes real files have.
fn regex_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 5 {
            0 => format!(r"^mail\.spam{i}\.example$"),
            1 => format!(r"dsl[.-]pool{i}[.-]"),
            2 => format!(r"^host{i}-[0-9]{{1,3}}\.bad{i}\.example"),
            3 => format!(r"bulk{i}\.example\.net$"),
            _ => format!(r"^(ppp|dyn){i}[.-][0-9]+"),
        })
        .collect()
}

fn domain_entries(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("=mail.spam{i}.example"),
            1 => format!(".pool{i}.isp.example"),
            _ => format!("bulk{i}.example.net"),
        })
        .collect()
}

/// The HELO mix of `helo_mix.txt`: big senders' real names, ordinary senders, some that match
/// the rules, with the clients they come from (shared with the bench's `dns` section).
fn inputs() -> Vec<(String, IpAddr)> {
    include_str!("helo_mix.txt")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .map(|(helo, client)| (helo.to_owned(), client.parse().expect("a client address")))
        .collect()
}

fn ruleset(section: &str) -> RuleSet {
    let text = format!("[identity]\ndetect = false\n[rules]\n{section}\n");
    let config =
        Config::parse(&text, Path::new("bench.toml"), &HostFacts::default()).expect("bench config");
    (*config.rules).clone()
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// One classification per input, as a session would ask.
fn classify_all(rules: &RuleSet, inputs: &[(String, IpAddr)]) {
    for (helo, client) in inputs {
        let facts = Facts {
            client: Some(*client),
            argument: helo,
            previous: &[],
            exempt_listener: false,
            dns: None,
            pregreeted: false,
            reuse: None,
            looks: false,
        };
        black_box(rules.classify(&facts));
    }
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();
    let mut group = c.benchmark_group("helo_classify");
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(3));
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.throughput(Throughput::Elements(inputs.len() as u64));
    for n in SIZES {
        let lines = regex_lines(n);
        let engine = ruleset(&format!("regexes = {}", toml_list(&lines)));
        group.bench_with_input(BenchmarkId::new("engine_regex_rules", n), &inputs, |b, inputs| {
            b.iter(|| classify_all(&engine, inputs))
        });
        let naive: Vec<regex::Regex> = lines
            .iter()
            .map(|l| regex::RegexBuilder::new(l).case_insensitive(true).build().unwrap())
            .collect();
        group.bench_with_input(BenchmarkId::new("naive_regex_loop", n), &inputs, |b, inputs| {
            b.iter(|| {
                for (helo, _) in inputs {
                    black_box(naive.iter().position(|re| re.is_match(helo)));
                }
            })
        });
        let table = ruleset(&format!("domains = {}", toml_list(&domain_entries(n))));
        group.bench_with_input(BenchmarkId::new("engine_table_rules", n), &inputs, |b, inputs| {
            b.iter(|| classify_all(&table, inputs))
        });
    }
    group.finish();
}

/// The HELO reuse count a session makes (`reuse::Memory::observe`) for a name that `n`
/// networks already use, as a big provider's pool name is: the cost on every session that
/// sends it.
fn reuse(c: &mut Criterion) {
    let mut group = c.benchmark_group("helo_reuse");
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(2));
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let window = std::time::Duration::from_secs(3600);
    for n in [1u32, 100, 1000] {
        let memory = helo_agent::reuse::Memory::default();
        let client = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0001 + (i << 8)));
        for i in 0..n {
            memory.observe("pool.example.net", client(i), 1_000, window);
        }
        let mut i = 0;
        group.bench_function(BenchmarkId::new("observe", n), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(memory.observe("pool.example.net", client(i), 2_000, window))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, reuse);
criterion_main!(benches);
