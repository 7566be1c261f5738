//! `helo-agent generate`: the man pages and shell completions the Debian package installs, made
//! from the definitions they describe so they cannot drift from them. helo-agent(8) and one page
//! per subcommand come from the clap definitions in `cli`; helo-filter.toml(5) comes from the
//! comments of the example config (`helo-filter.example.toml`, embedded here), which document
//! every key beside its default. Hidden from `--help`: `cargo xtask package` calls it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

use super::args::{Cli, Generated};

/// The example config: the source of helo-filter.toml(5) and of the package's conffile.
pub const EXAMPLE_CONFIG: &str = include_str!("../../helo-filter.example.toml");

use super::args::INSTALLED_CONFIG;

/// The manual the pages belong to (the centre footer of `man`).
const MANUAL: &str = "helo-filter";

/// Writes `what` into the directory `out` (created if missing); returns the files written.
pub fn write(what: Generated, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    match what {
        Generated::Man => write_man(out),
        Generated::Completions => write_completions(out),
    }
}

fn command() -> clap::Command {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    command
}

/// The command without its hidden subcommands: clap_complete would offer them.
fn visible_command() -> clap::Command {
    let full = command();
    let mut visible = clap::Command::new("helo-agent")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .disable_help_subcommand(true)
        // The built command's own --help and --version come with its arguments below.
        .disable_help_flag(true)
        .disable_version_flag(true);
    for arg in full.get_arguments() {
        visible = visible.arg(arg.clone());
    }
    for sub in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        visible = visible.subcommand(sub.clone());
    }
    visible
}

fn write_man(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let command = command();
    let mut written = Vec::new();
    let mut pages = vec![(command.clone(), true)];
    pages
        .extend(command.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| (s.clone(), false)));
    for (page, main) in pages {
        let man = clap_mangen::Man::new(page.clone()).section("8").date(page_date()).manual(MANUAL);
        let path = out.join(man.get_filename());
        let mut roff = Vec::new();
        man.render_title(&mut roff)?;
        man.render_name_section(&mut roff)?;
        man.render_synopsis_section(&mut roff)?;
        man.render_description_section(&mut roff)?;
        man.render_options_section(&mut roff)?;
        if main {
            man.render_subcommands_section(&mut roff)?;
        }
        if page.get_after_help().is_some() || page.get_after_long_help().is_some() {
            man.render_extra_section(&mut roff)?;
        }
        roff.extend_from_slice(see_also(&command, main).as_bytes());
        if main {
            man.render_version_section(&mut roff)?;
        }
        std::fs::write(&path, roff)?;
        written.push(path);
    }
    let path = out.join("helo-filter.toml.5");
    std::fs::write(&path, config_man(EXAMPLE_CONFIG, &version()))?;
    written.push(path);
    Ok(written)
}

/// The pages' date: SOURCE_DATE_EPOCH's day when set (reproducible builds), else today (UTC).
fn page_date() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let (year, month, day) = civil_date(seconds / 86_400);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn version() -> String {
    format!("helo-agent {}", env!("CARGO_PKG_VERSION"))
}

/// FILES and SEE ALSO: the config, the other pages, the unit.
fn see_also(command: &clap::Command, main: bool) -> String {
    let mut text = String::new();
    if main {
        text.push_str(".SH FILES\n");
        for (path, what) in [
            (INSTALLED_CONFIG, "the configuration, see helo-filter.toml(5)"),
            ("/run/helo-filter/control.sock", "the control socket (agent.control_socket)"),
            ("/var/lib/helo-filter/bans.json", "the ban snapshot (bans.snapshot)"),
            (
                "/sys/fs/bpf/helo-filter/",
                "the pinned ban maps, counters and XDP link (xdp.pin_dir)",
            ),
        ] {
            let _ = writeln!(text, ".TP\n\\fI{}\\fR\n{}", roff_text(path), roff_text(what));
        }
    }
    text.push_str(".SH \"SEE ALSO\"\n");
    let mut refs = vec!["\\fBhelo\\-filter.toml\\fR(5)".to_owned()];
    if !main {
        refs.insert(0, "\\fBhelo\\-agent\\fR(8)".to_owned());
    }
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && main) {
        refs.push(format!("\\fBhelo\\-agent\\-{}\\fR(8)", sub.get_name().replace('-', "\\-")));
    }
    refs.push("\\fBsystemctl\\fR(1)".to_owned());
    text.push_str(&refs.join(",\n"));
    text.push('\n');
    text
}

fn write_completions(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    let mut written = Vec::new();
    for (shell, name) in [
        (Shell::Bash, "helo-agent.bash"),
        (Shell::Zsh, "_helo-agent"),
        (Shell::Fish, "helo-agent.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut visible_command(), "helo-agent", &mut script);
        let path = out.join(name);
        std::fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

/// One documented thing in the example config, in file order.
#[derive(Debug, PartialEq)]
enum Item {
    /// Comment lines standing alone (between blank lines): the file's or a section's prose.
    Prose(String),
    /// `[section]` or `[[array]]`, with the comment above it; an array's entries as written.
    Table { name: String, array: bool, text: String, example: Vec<String> },
    /// Keys written one under another below one comment (`keys` share `text`); a key may carry
    /// its own trailing comment.
    Keys { text: String, keys: Vec<Key> },
}

#[derive(Debug, PartialEq)]
struct Key {
    name: String,
    value: String,
    /// Commented out in the example (`# interface = "eth0"`): unset by default.
    unset: bool,
    note: Option<String>,
}

/// Reads the example config's layout: every comment lands on the key, section or paragraph it
/// stands above.
fn parse_example(text: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut pending: Vec<&str> = Vec::new();
    // The last item is a Keys group still taking keys (no comment line since its last key).
    let mut open = false;
    let mut array: Option<usize> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            if !pending.is_empty() {
                items.push(Item::Prose(pending.join(" ")));
                pending.clear();
            }
            open = false;
        } else if let Some(header) = line.strip_prefix('[') {
            let is_array = header.starts_with('[');
            let name = header.trim_matches(['[', ']']).to_owned();
            let same_array = array.and_then(|i| match &items[i] {
                Item::Table { name: n, .. } if is_array && pending.is_empty() && *n == name => {
                    Some(i)
                }
                _ => None,
            });
            if let Some(i) = same_array {
                if let Item::Table { example, .. } = &mut items[i] {
                    example.push(String::new());
                    example.push(line.to_owned());
                }
            } else {
                let example = if is_array { vec![line.to_owned()] } else { Vec::new() };
                items.push(Item::Table { name, array: is_array, text: pending.join(" "), example });
                pending.clear();
                array = is_array.then_some(items.len() - 1);
            }
            open = false;
        } else if let Some(key) = parse_key(line) {
            if let Some(Item::Table { example, .. }) = array.map(|i| &mut items[i]) {
                example.push(line.to_owned());
            } else if open && pending.is_empty() {
                if let Some(Item::Keys { keys, .. }) = items.last_mut() {
                    keys.push(key);
                }
            } else {
                items.push(Item::Keys { text: pending.join(" "), keys: vec![key] });
                pending.clear();
                open = true;
            }
        } else if let Some(comment) = line.strip_prefix('#') {
            pending.push(comment.trim());
            open = false;
        } else {
            // Not TOML this reader knows: keep it visible rather than lose it.
            pending.push(line);
        }
    }
    if !pending.is_empty() {
        items.push(Item::Prose(pending.join(" ")));
    }
    items
}

/// `key = value  # note`, or a commented-out `# key = value`.
fn parse_key(line: &str) -> Option<Key> {
    let (unset, line) = match line.strip_prefix('#') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, line),
    };
    let (name, rest) = line.split_once('=')?;
    let name = name.trim();
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    // The value ends at a `#` outside a string.
    let rest = rest.trim();
    let mut in_string = false;
    let mut end = rest.len();
    for (i, c) in rest.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let value = rest[..end].trim().to_owned();
    // Prose that happens to hold an `=` has no TOML value after it.
    if format!("v = {value}").parse::<toml::Table>().is_err() {
        return None;
    }
    let note = rest[end..].strip_prefix('#').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    Some(Key { name: name.to_owned(), value, unset, note })
}

/// Text for a roff line: backslashes and hyphens escaped, `code` in bold, and a leading `.` or
/// `'` made literal.
fn roff_text(text: &str) -> String {
    let mut out = String::new();
    let mut bold = false;
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '`' => {
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            c => out.push(c),
        }
    }
    if bold {
        out.push_str("\\fR");
    }
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

/// helo-filter.toml(5), from the example config's comments.
fn config_man(example: &str, version: &str) -> String {
    let mut page = String::new();
    let _ =
        writeln!(page, ".TH HELO\\-FILTER.TOML 5 \"{}\" \"{version}\" \"{MANUAL}\"", page_date());
    // Keys and paths read better unbroken, and left-aligned.
    page.push_str(".nh\n.ad l\n");
    page.push_str(".SH NAME\nhelo\\-filter.toml \\- configuration of helo\\-agent(8)\n");
    let _ = writeln!(
        page,
        ".SH SYNOPSIS\n\\fI{}\\fR (the package's, which every command reads by default where it \
         exists), or the file given to \\fBhelo\\-agent \\-\\-config\\fR \\fIFILE\\fR or in \
         \\fBHELO_FILTER_CONFIG\\fR; \\fB\\-\\-no\\-config\\fR reads none (the embedded defaults)",
        roff_text(INSTALLED_CONFIG)
    );
    page.push_str(".SH DESCRIPTION\n");
    let mut first = true;
    let mut section = String::new();
    for item in parse_example(example) {
        match item {
            Item::Prose(text) => {
                if !first {
                    page.push_str(".PP\n");
                }
                let _ = writeln!(page, "{}", roff_text(&text));
            }
            Item::Table { name, array, text, example } => {
                let header = if array { format!("[[{name}]]") } else { format!("[{name}]") };
                section = if array { String::new() } else { format!("{name}.") };
                let _ = writeln!(page, ".SH \"{}\"", roff_text(&header));
                if !text.is_empty() {
                    let _ = writeln!(page, "{}", roff_text(&text));
                }
                if !example.is_empty() {
                    page.push_str(".PP\nAs shipped:\n.PP\n.RS\n.nf\n");
                    for line in example {
                        let _ = writeln!(page, "{}", roff_text(&line));
                    }
                    page.push_str(".fi\n.RE\n");
                }
            }
            Item::Keys { text, keys } => {
                let notes = keys.iter().all(|k| k.note.is_some());
                if notes && !text.is_empty() {
                    let _ = writeln!(page, ".PP\n{}", roff_text(&text));
                }
                for (i, key) in keys.iter().enumerate() {
                    let tag = if i == 0 || notes { ".TP" } else { ".TQ" };
                    let value = if key.unset {
                        format!("(unset; for example {})", key.value)
                    } else {
                        format!("= {}", key.value)
                    };
                    let _ = writeln!(
                        page,
                        "{tag}\n\\fB{}\\fR {}",
                        roff_text(&format!("{section}{}", key.name)),
                        roff_text(&value)
                    );
                    if let Some(note) = &key.note {
                        let _ = writeln!(page, "{}", roff_text(note));
                    }
                }
                if !notes && !text.is_empty() {
                    let _ = writeln!(page, "{}", roff_text(&text));
                }
            }
        }
        first = false;
    }
    let _ = writeln!(
        page,
        ".SH FILES\n.TP\n\\fI{}\\fR\nthe configuration the package installs (a conffile: upgrades \
         keep your edits)\n.SH \"SEE ALSO\"\n\\fBhelo\\-agent\\fR(8), \
         \\fBhelo\\-agent\\-check\\-config\\fR(8), \\fBhelo\\-agent\\-reload\\fR(8)",
        roff_text(INSTALLED_CONFIG)
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the example sets, as `section.key` (array tables left out).
    fn example_keys() -> Vec<String> {
        let table: toml::Table = EXAMPLE_CONFIG.parse().expect("the example parses");
        let mut keys = Vec::new();
        for (section, value) in &table {
            if let toml::Value::Table(inner) = value {
                for (key, value) in inner {
                    if !matches!(value, toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty())
                    {
                        keys.push(format!("{section}.{key}"));
                    }
                }
            }
        }
        keys
    }

    #[test]
    fn every_key_of_the_example_is_documented_in_the_config_page() {
        let mut documented = Vec::new();
        let mut section = String::new();
        for item in parse_example(EXAMPLE_CONFIG) {
            match item {
                Item::Table { name, .. } => section = name,
                Item::Keys { text, keys } => {
                    for key in keys {
                        assert!(
                            !text.is_empty() || key.note.is_some(),
                            "{section}.{}: no comment above it or beside it in \
                             helo-filter.example.toml",
                            key.name
                        );
                        if !key.unset {
                            documented.push(format!("{section}.{}", key.name));
                        }
                    }
                }
                Item::Prose(_) => {}
            }
        }
        documented.sort();
        let count = documented.len();
        documented.dedup();
        assert_eq!(documented.len(), count, "each key once");
        assert_eq!(documented, example_keys());
        let page = config_man(EXAMPLE_CONFIG, "helo-agent 0");
        for key in example_keys() {
            assert!(page.contains(&format!("\\fB{}\\fR", roff_text(&key))), "{key} in the page");
        }
        // Commented-out keys (unset by default) are documented too.
        assert!(page.contains("\\fBxdp.interface\\fR (unset; for example \"eth0\")"), "{page}");
        assert!(page.contains("\\fBrules.access_file\\fR (unset"), "{page}");
        assert!(page.contains(".SH \"[[proxy.listeners]]\""), "{page}");
    }

    #[test]
    fn keys_and_trailing_comments() {
        let key = parse_key(r##"table = "reject"   # rules.domains and "#" here"##).unwrap();
        assert_eq!((key.name.as_str(), key.value.as_str()), ("table", "\"reject\""));
        assert_eq!(key.note.as_deref(), Some("rules.domains and \"#\" here"));
        let key = parse_key(r##"hostname = "a # b""##).unwrap();
        assert_eq!((key.value.as_str(), key.note), ("\"a # b\"", None));
        let key = parse_key("# badhelo_file = \"/var/qmail/control/badhelo\"").unwrap();
        assert!(key.unset);
        // Prose that happens to hold an `=` is not a key.
        assert_eq!(parse_key("# Postfix's default (x = y)"), None);
        assert_eq!(parse_key("# A = B"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_454), (2026, 1, 1));
    }

    #[test]
    fn roff_text_is_escaped() {
        assert_eq!(roff_text("...up to this"), "\\&...up to this");
        assert_eq!(roff_text("`a-b` \\d"), "\\fBa\\-b\\fR \\ed");
    }

    #[test]
    fn one_page_per_visible_subcommand_and_the_config_page() {
        let dir = std::env::temp_dir().join(format!("helo-generate-{}", std::process::id()));
        let written = write(Generated::Man, &dir).expect("pages written");
        let mut names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut expected: Vec<String> = command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| format!("helo-agent-{}.8", s.get_name()))
            .chain(["helo-agent.8".to_owned(), "helo-filter.toml.5".to_owned()])
            .collect();
        expected.sort();
        assert_eq!(names, expected);
        assert!(names.contains(&"helo-agent-run.8".to_owned()));
        assert!(!names.iter().any(|n| n.contains("generate") || n.contains("help")), "{names:?}");
        let main = std::fs::read_to_string(dir.join("helo-agent.8")).unwrap();
        assert!(main.contains("\n.TH helo-agent 8 "), "{main}");
        assert!(main.contains("helo\\-agent\\-run\\fR(8)"), "SEE ALSO names the pages:\n{main}");
        let written = write(Generated::Completions, &dir).expect("completions written");
        assert_eq!(written.len(), 3);
        let bash = std::fs::read_to_string(dir.join("helo-agent.bash")).unwrap();
        assert!(bash.contains("check-config") && bash.contains("--xdp-mode"), "{bash}");
        for name in ["helo-agent.bash", "_helo-agent", "helo-agent.fish"] {
            let script = std::fs::read_to_string(dir.join(name)).unwrap();
            assert!(!script.contains("generate"), "{name} offers the hidden subcommand");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
