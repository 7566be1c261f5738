//! `cargo xtask bench`: every benchmark of helo-filter against the peer an admin would pick
//! instead, measured side by side in the same run, written to `bench/RESULTS.md` with PNG plots
//! beside it. Needs root (XDP, namespaces). Each section says what it measures and how; a
//! target that is missed is said so, with what limits it.

mod flood;
mod machine;
mod plot;
mod policy;
mod procfs;
mod proxy;
mod report;
mod rules;
mod xdp;

use std::path::PathBuf;
use std::time::Instant;

use report::Report;

/// A benchmark section: adds its tables and targets to the report, its plots to the directory.
type Section = fn(&mut Report, &std::path::Path) -> anyhow::Result<()>;

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from("bench");
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--help" | "-h" => {
                println!(
                    "bench [--out DIR] [SECTION...]\nsections: xdp flood proxy rules policy (default: all)"
                );
                return Ok(());
            }
            section => only.push(section.to_owned()),
        }
    }
    tests::require_root();
    std::fs::create_dir_all(&out)?;
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let started = Instant::now();
    let mut report = Report::new(machine::describe());
    let sections: [(&str, Section); 5] = [
        ("xdp", xdp::run),
        ("flood", flood::run),
        ("proxy", proxy::run),
        ("rules", rules::run),
        ("policy", policy::run),
    ];
    for (name, section) in sections {
        if !run(name) {
            continue;
        }
        let t = Instant::now();
        progress(&format!("section {name}"));
        if let Err(error) = section(&mut report, &out) {
            report.failed(name, &format!("{error:#}"));
            progress(&format!("section {name} FAILED: {error:#}"));
        }
        progress(&format!("section {name} done in {:.0} s", t.elapsed().as_secs_f64()));
    }
    report.finish(started.elapsed());
    let path = out.join("RESULTS.md");
    std::fs::write(&path, report.markdown())?;
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
