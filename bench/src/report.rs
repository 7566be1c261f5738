//! RESULTS.md: sections of tables and notes, target verdicts, and the plots' file names.
//!
//! Everything a bench section writes is filed under its name (`xdp`, `bots`, ...): its blocks
//! sit between `<!-- bench:NAME ... -->` and `<!-- /bench:NAME -->` markers, its targets carry
//! the name in their first column. A run of some sections replaces only theirs in the existing
//! RESULTS.md ([`Report::merge`]) and keeps the others, each with the date of its own run.

use std::fmt::Write as _;
use std::time::Duration;

pub struct Report {
    machine: Vec<(String, String)>,
    /// The section running now: what is written is filed under it.
    current: String,
    /// (section, markdown) in the order written.
    blocks: Vec<(String, String)>,
    /// (section, target, met, measured).
    targets: Vec<(String, String, bool, String)>,
    total: Option<Duration>,
}

const OPEN: &str = "<!-- bench:";
const CLOSE: &str = "<!-- /bench:";

impl Report {
    /// `machine`: key/value lines; `date` and `commit` among them stamp each section.
    pub fn new(machine: Vec<(String, String)>) -> Self {
        Report {
            machine,
            current: String::new(),
            blocks: Vec::new(),
            targets: Vec::new(),
            total: None,
        }
    }

    /// From now on, what is written belongs to section `name`.
    pub fn begin(&mut self, name: &str) {
        self.current = name.to_owned();
    }

    /// A section: a title, a paragraph on method, a table, notes.
    pub fn section(
        &mut self,
        title: &str,
        method: &str,
        header: &[&str],
        rows: &[Vec<String>],
        notes: &[String],
    ) {
        let mut s = format!("## {title}\n\n{method}\n\n");
        s.push_str(&table(header, rows, notes));
        self.blocks.push((self.current.clone(), s));
    }

    /// Another table (and notes) under the section written last.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>], notes: &[String]) {
        let text = table(header, rows, notes);
        match self.blocks.last_mut() {
            Some((name, block)) if *name == self.current => block.push_str(&text),
            _ => self.blocks.push((self.current.clone(), text)),
        }
    }

    /// A target from the issue and whether this run met it.
    pub fn target(&mut self, what: &str, met: bool, measured: String) {
        self.targets.push((self.current.clone(), what.to_owned(), met, measured));
    }

    pub fn failed(&mut self, section: &str, error: &str) {
        self.blocks
            .push((section.to_owned(), format!("## {section}: FAILED\n\n```\n{error}\n```\n\n")));
    }

    pub fn finish(&mut self, total: Duration) {
        self.total = Some(total);
    }

    fn stamp(&self) -> String {
        let get =
            |k: &str| self.machine.iter().find(|(key, _)| key == k).map_or("", |(_, v)| v.as_str());
        format!("{} {}", get("date"), get("commit"))
    }

    /// The file from `existing` (the RESULTS.md there was, maybe empty) with every section this
    /// run wrote replaced; the others kept as they were. Sections come in `order`; sections
    /// the existing file has and `order` does not name (a newer bench's) come last.
    pub fn merge(&self, existing: &str, order: &[&str]) -> String {
        let old = parse(existing);
        let ran: Vec<&str> = {
            // Each section once, in the order it ran (its blocks and targets interleave).
            let mut ran: Vec<&str> = Vec::new();
            let names = self.blocks.iter().map(|(n, _)| n.as_str());
            for name in names.chain(self.targets.iter().map(|(n, ..)| n.as_str())) {
                if !ran.contains(&name) {
                    ran.push(name);
                }
            }
            ran
        };
        let ours = |name: &str| ran.contains(&name);
        let mut names: Vec<String> = order.iter().map(|s| (*s).to_owned()).collect();
        let others = old
            .blocks
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(old.targets.iter().map(|(n, _)| n.as_str()));
        for name in ran.iter().copied().chain(others) {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }

        let mut s = String::from(
            "# helo-filter benchmarks\n\nWritten by `cargo xtask bench` (bench/src): every figure is measured \
             in the same run as the peer it is compared with, so ratios hold on a noisy machine. \
             `cargo xtask bench SECTION...` reruns some sections and keeps the others; each \
             section says which run it comes from.\n\n",
        );
        for (k, v) in self.machine.iter().filter(|(k, _)| k != "date" && k != "commit") {
            let _ = writeln!(s, "- {k}: {v}");
        }
        let _ = write!(s, "- last run: {} (sections: {})", self.stamp(), ran.join(", "));
        if let Some(total) = self.total {
            let _ = write!(s, ", {:.0} s", total.as_secs_f64());
        }
        s.push_str("\n\n## Targets\n\n| section | target | met | measured |\n|---|---|---|---|\n");
        for name in &names {
            if ours(name) {
                for (_, what, met, measured) in self.targets.iter().filter(|t| &t.0 == name) {
                    let met = if *met { "yes" } else { "**no**" };
                    let _ = writeln!(s, "| {name} | {what} | {met} | {measured} |");
                }
            } else {
                for (_, row) in old.targets.iter().filter(|t| &t.0 == name) {
                    let _ = writeln!(s, "{row}");
                }
            }
        }
        s.push('\n');
        for name in &names {
            if ours(name) {
                let body: String = self
                    .blocks
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, b)| b.as_str())
                    .collect();
                let stamp = self.stamp();
                let _ = write!(
                    s,
                    "{OPEN}{name} {stamp} -->\n_From the run of {stamp}._\n\n{body}{CLOSE}{name} -->\n\n"
                );
            } else if let Some((_, block)) = old.blocks.iter().find(|(n, _)| n == name) {
                s.push_str(block);
                s.push_str("\n\n");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    }
}

/// A markdown table (none when `header` is empty: notes only) and its notes.
fn table(header: &[&str], rows: &[Vec<String>], notes: &[String]) -> String {
    let mut s = String::new();
    if !header.is_empty() {
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
        for row in rows {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        s.push('\n');
    }
    for note in notes {
        let _ = writeln!(s, "{note}\n");
    }
    s
}

/// What an existing RESULTS.md holds, by section: its marked blocks (markers included) and its
/// target rows.
struct Parsed {
    blocks: Vec<(String, String)>,
    targets: Vec<(String, String)>,
}

fn parse(text: &str) -> Parsed {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let name: String = after.chars().take_while(|c| !c.is_whitespace()).collect();
        let close = format!("{CLOSE}{name} -->");
        let Some(end) = rest[start..].find(&close) else { break };
        let end = start + end + close.len();
        blocks.push((name, rest[start..end].to_owned()));
        rest = &rest[end..];
    }
    let targets = text
        .split("## Targets")
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            (cells.len() == 4).then(|| (cells[0].trim().to_owned(), l.to_owned()))
        })
        .collect();
    Parsed { blocks, targets }
}

pub fn f(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod unit {
    use super::*;

    fn run(date: &str, sections: &[(&str, &str, bool)]) -> Report {
        let mut report =
            Report::new(vec![("date".into(), date.into()), ("commit".into(), "abc".into())]);
        for (name, figure, met) in sections {
            report.begin(name);
            report.section(
                &format!("{name} title"),
                "method",
                &["a"],
                &[vec![(*figure).into()]],
                &[],
            );
            report.target(&format!("{name} target"), *met, (*figure).into());
        }
        report
    }

    #[test]
    fn a_subset_run_replaces_its_sections_and_keeps_the_others() {
        let order = ["xdp", "flood", "bots"];
        let full =
            run("day 1", &[("xdp", "x1", true), ("flood", "f1", false), ("fleet", "r1", true)])
                .merge("", &order);
        let again = run("day 2", &[("flood", "f2", true)]).merge(&full, &order);
        assert!(again.contains("x1") && again.contains("r1"), "others kept:\n{again}");
        assert!(again.contains("f2") && !again.contains("f1"), "flood replaced:\n{again}");
        assert!(again.contains("_From the run of day 1 abc._"), "xdp keeps its date");
        assert!(again.contains("| flood | flood target | yes | f2 |"));
        assert!(again.contains("| xdp | xdp target | yes | x1 |"));
        assert!(again.find("xdp title") < again.find("flood title"), "in order");
        assert!(again.find("flood title") < again.find("fleet title"), "unknown ones last");
        assert_eq!(again, run("day 2", &[("flood", "f2", true)]).merge(&again, &order), "stable");
    }
}
