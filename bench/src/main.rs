//! `cargo xtask bench`: every benchmark of helo-filter against the peer an admin would pick
//! instead, measured side by side in the same run, written to `bench/RESULTS.md` with PNG plots
//! beside it. Needs root (XDP, namespaces). Each section says what it measures and how; a
//! target that is missed is said so, with what limits it.

mod bots;
mod client;
mod dns;
mod fleet;
mod flood;
mod gateway;
mod kcounters;
mod livegen;
mod machine;
mod placement;
mod plot;
mod policy;
mod procfs;
mod proxy;
mod report;
mod rules;
mod steer;
mod storm;
mod xdp;

use std::path::PathBuf;
use std::time::Instant;

use report::Report;

/// A benchmark section: adds its tables and targets to the report, its plots to the directory.
type Section = fn(&mut Report, &std::path::Path) -> anyhow::Result<()>;

/// Every section, in the order they run and appear in RESULTS.md. A new one is a line here.
const SECTIONS: &[(&str, Section)] = &[
    ("xdp", xdp::run),
    ("flood", flood::run),
    ("proxy", proxy::run),
    ("steer", steer::run),
    ("rules", rules::run),
    ("policy", policy::run),
    ("bots", bots::run),
    ("storm", storm::run),
    ("fleet", fleet::run),
    ("dns", dns::run),
];

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from("bench");
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--help" | "-h" => {
                let names: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
                println!(
                    "bench [--out DIR] [SECTION...]\nsections: {} (default: all)\n\
                     A subset replaces only its own sections in DIR/RESULTS.md.",
                    names.join(" ")
                );
                return Ok(());
            }
            section if SECTIONS.iter().any(|(n, _)| *n == section) => only.push(section.to_owned()),
            other => {
                let names: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
                anyhow::bail!("no bench section {other:?}: the sections are {}", names.join(" "));
            }
        }
    }
    tests::require_root();
    std::fs::create_dir_all(&out)?;
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let started = Instant::now();
    let mut report = Report::new(machine::describe());
    for &(name, section) in SECTIONS {
        if !run(name) {
            continue;
        }
        let t = Instant::now();
        progress(&format!("section {name}"));
        report.begin(name);
        if let Err(error) = section(&mut report, &out) {
            report.failed(name, &format!("{error:#}"));
            progress(&format!("section {name} FAILED: {error:#}"));
        }
        progress(&format!("section {name} done in {:.0} s", t.elapsed().as_secs_f64()));
    }
    report.finish(started.elapsed());
    let path = out.join("RESULTS.md");
    let order: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
    // A subset keeps the other sections of the file there is; a full run writes it anew.
    let existing = if only.is_empty() {
        String::new()
    } else {
        std::fs::read_to_string(&path).unwrap_or_default()
    };
    std::fs::write(&path, report.merge(&existing, &order))?;
    progress(&format!(
        "wrote {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// One progress line on stderr, with the time since start of the process.
pub fn progress(what: &str) {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A child process killed when dropped.
pub struct Guard(pub std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads one SMTP reply (its last line starts with `code` and a space; at most 100 lines).
pub fn reply(
    reader: &mut std::io::BufReader<std::net::TcpStream>,
    code: &str,
) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        anyhow::ensure!(reader.read_line(&mut line)? > 0, "connection closed waiting for {code}");
        anyhow::ensure!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            return Ok(());
        }
    }
    anyhow::bail!("a reply of over 100 lines")
}
