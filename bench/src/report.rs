//! RESULTS.md: sections of tables and notes, target verdicts, and the plots' file names.

use std::fmt::Write as _;
use std::time::Duration;

pub struct Report {
    machine: Vec<(String, String)>,
    sections: Vec<String>,
    targets: Vec<(String, bool, String)>,
    total: Option<Duration>,
}

impl Report {
    pub fn new(machine: Vec<(String, String)>) -> Self {
        Report { machine, sections: Vec::new(), targets: Vec::new(), total: None }
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
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
        for row in rows {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        s.push('\n');
        for note in notes {
            let _ = writeln!(s, "{note}\n");
        }
        self.sections.push(s);
    }

    /// A target from the issue and whether this run met it.
    pub fn target(&mut self, what: &str, met: bool, measured: String) {
        self.targets.push((what.to_owned(), met, measured));
    }

    pub fn failed(&mut self, section: &str, error: &str) {
        self.sections.push(format!("## {section}: FAILED\n\n```\n{error}\n```\n"));
    }

    pub fn finish(&mut self, total: Duration) {
        self.total = Some(total);
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "# helo-filter benchmarks\n\nWritten by `cargo xtask bench` (bench/src): every figure is measured \
             in the same run as the peer it is compared with, so ratios hold on a noisy machine.\n\n",
        );
        for (k, v) in &self.machine {
            let _ = writeln!(s, "- {k}: {v}");
        }
        if let Some(total) = self.total {
            let _ = writeln!(s, "- run time: {:.0} s", total.as_secs_f64());
        }
        s.push_str("\n## Targets\n\n| target | met | measured |\n|---|---|---|\n");
        for (what, met, measured) in &self.targets {
            let _ =
                writeln!(s, "| {what} | {} | {measured} |", if *met { "yes" } else { "**no**" });
        }
        s.push('\n');
        for section in &self.sections {
            s.push_str(section);
        }
        s
    }
}

pub fn f(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}
