//! The documentation as an admin pastes it: every config snippet of the README and of the
//! guide under `docs/` validates as the agent would read it, every `helo-agent` command of the
//! README parses with the real command line, every key of the example config is documented in
//! the guide, and every link between the pages leads somewhere.

use std::path::{Path, PathBuf};

use clap::Parser;
use helo_agent::cli::Cli;
use helo_agent::config::{Config, HostFacts};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// The README and every page of the guide, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    let mut paths = vec![root().join("README.md")];
    let mut guide: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("a docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guide.sort();
    paths.extend(guide);
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// The fenced blocks of `text` whose info string is `lang`, with the line each starts on.
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut current, fence) {
            (None, true) if line.trim_start().trim_start_matches('`').trim() == lang => {
                current = Some((index + 2, String::new()));
            }
            (Some(_), true) => found.push(current.take().expect("in a block")),
            (Some((_, body)), false) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    found
}

/// Regression guard for the guide: a snippet an admin pastes must load. Each `toml` block is
/// validated as `check-config` validates a file, on a host with a name.
#[test]
fn every_config_snippet_validates() {
    let host = HostFacts { hostname: Some("mx.example.net".into()), ..HostFacts::default() };
    let mut checked = 0;
    for (path, text) in pages() {
        for (line, snippet) in blocks(&text, "toml") {
            let at = format!("{}:{line}", path.display());
            if let Err(error) = Config::parse(&snippet, Path::new(&at), &host) {
                panic!("the snippet at {at} does not validate: {error}\n{snippet}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} config snippets found: did the fences change?");
}

/// Every `helo-agent ...` line of the README's shell blocks parses as the binary would parse
/// it (comments after `#` and a leading `sudo` aside).
#[test]
fn every_readme_command_parses() {
    let text = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let mut checked = 0;
    for (line, block) in blocks(&text, "sh") {
        for (offset, command) in block.lines().enumerate() {
            let command = command.split(" #").next().unwrap_or_default().trim();
            let command = command.strip_prefix("sudo ").unwrap_or(command);
            if !command.starts_with("helo-agent ") {
                continue;
            }
            let words = shell_words(command);
            if let Err(error) = Cli::try_parse_from(&words) {
                panic!("README.md:{}: {command:?} does not parse:\n{error}", line + offset);
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} commands found in the README's sh blocks");
}

/// Splits a command line as a POSIX shell would for the simple quoting the README uses.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (_, c) => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// Every key of the example config (`section.key`) is named somewhere in the guide or the
/// README, so an admin who meets it in the file finds its chapter.
#[test]
fn every_key_of_the_example_config_is_documented() {
    let example = std::fs::read_to_string(root().join("helo-agent/helo-filter.example.toml"))
        .expect("the example config");
    let table: toml::Table = example.parse().expect("the example config parses");
    let pages = pages();
    let mut missing = Vec::new();
    let mut keys = Vec::new();
    collect_keys("", &table, &mut keys);
    // Keys the example leaves commented out are keys too.
    for line in example.lines() {
        if let Some(rest) = line.strip_prefix("# ")
            && let Some((key, _)) = rest.split_once(" = ")
            && !key.contains(' ')
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && rest.split_once(" = ").is_some_and(|(_, value)| looks_like_a_value(value))
        {
            let section = section_of(&example, line);
            keys.push(format!("{section}.{key}"));
        }
    }
    keys.sort();
    keys.dedup();
    for key in &keys {
        if !documented(&pages, key) {
            missing.push(key.clone());
        }
    }
    assert!(keys.len() > 40, "only {} keys read from the example", keys.len());
    assert!(missing.is_empty(), "keys of the example config no page names: {missing:#?}");
}

/// A key is documented where a page names it whole (`checks.dynamic`), or names its table
/// (`[checks]`) and the key in backticks (`` `dynamic` ``), as a table of the checks does, or
/// set in a snippet (`dynamic = `).
fn documented(pages: &[(PathBuf, String)], key: &str) -> bool {
    let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
    let table = format!("[{section}]");
    let quoted = format!("`{name}`");
    let set = format!("{name} = ");
    pages.iter().any(|(_, text)| {
        text.contains(key)
            || (text.contains(&table) && (text.contains(&quoted) || text.contains(&set)))
    })
}

/// The value of a commented-out `# key = value` line: a TOML value, not prose.
fn looks_like_a_value(value: &str) -> bool {
    format!("v = {}", value.trim()).parse::<toml::Table>().is_ok()
}

fn collect_keys(prefix: &str, table: &toml::Table, keys: &mut Vec<String>) {
    for (key, value) in table {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => collect_keys(&name, inner, keys),
            _ => keys.push(name),
        }
    }
}

/// The `[section]` a line of the example stands in.
fn section_of(text: &str, line: &str) -> String {
    let at = text.find(line).expect("the line is in the text");
    text[..at]
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix('[').and_then(|l| l.split(']').next()))
        .unwrap_or_default()
        .to_owned()
}

/// Every relative link of the README and the guide (`[text](path)`, `path#anchor` too) names
/// a file that exists.
#[test]
fn every_relative_link_leads_somewhere() {
    let mut broken = Vec::new();
    for (path, text) in pages() {
        let dir = path.parent().expect("a page is in a folder");
        for target in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            let file = target.split('#').next().unwrap_or_default();
            if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                continue;
            }
            if !dir.join(file).exists() {
                broken.push(format!("{}: {target}", path.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing: {broken:#?}");
}
