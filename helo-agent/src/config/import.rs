//! Importers for the rule files admins already have, read as they are:
//! - a qmail `badhelo` control file (one POSIX extended regex per line, `!` negates);
//! - a Postfix HELO access table source (`pattern  ACTION [text]`), with Postfix's parent-domain
//!   semantics stated by a flag, so migrating changes nothing unless asked.
//!
//! Pure: text in, entries (and warnings) out; the caller reads the files.

use std::sync::Arc;

use crate::rules::badhelo::RegexRule;
use crate::rules::table::{DomainPattern, Scope};
use crate::rules::{EntryRef, EntryReply, TableAction, TableEntry};

/// The lines of a qmail badhelo file: blank lines and lines starting with `#` are skipped;
/// trailing white space (and a CR from a CRLF file) is not part of the pattern.
pub fn badhelo(text: &str, source: &str) -> Vec<RegexRule> {
    text.lines()
        .enumerate()
        .filter_map(|(index, raw)| {
            let line = raw.trim_end();
            if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                return None;
            }
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            Some(RegexRule {
                negated,
                pattern: pattern.to_owned(),
                entry: EntryRef {
                    source: source.to_owned(),
                    line: index + 1,
                    text: line.to_owned(),
                },
            })
        })
        .collect()
}

/// A parsed access table: entries to add to the domain table, and warnings for entries that
/// Postfix itself would never match in a HELO lookup.
#[derive(Debug, Default)]
pub struct AccessTable {
    pub entries: Vec<(DomainPattern, TableEntry)>,
    pub warnings: Vec<String>,
}

/// Parses a Postfix access table source (the text `postmap` reads).
///
/// `parent_matches_subdomains` is Postfix's `parent_domain_matches_subdomains` containing
/// `smtpd_access_maps` (the default): then `example.com` also covers its subdomains, and
/// `.example.com` entries are never looked up. Without it, `example.com` is that name only and
/// `.example.com` covers the subdomains.
///
/// Lines that cannot be used are refused, every one of them, each as `file:line: why`.
pub fn access_table(
    text: &str,
    source: &str,
    parent_matches_subdomains: bool,
) -> Result<AccessTable, Vec<String>> {
    let mut table = AccessTable::default();
    let mut bad = Vec::new();
    for (line_no, logical) in logical_lines(text) {
        let at = || format!("{source}:{line_no}");
        let (key, value) = match logical.split_once(char::is_whitespace) {
            Some((key, value)) => (key, value.trim()),
            None => {
                bad.push(format!("{}: {logical:?} has a pattern but no action", at()));
                continue;
            }
        };
        if key.starts_with('/') {
            bad.push(format!(
                "{}: {key:?} is a regexp table pattern; put regexes in rules.regexes or a \
                 badhelo file instead",
                at()
            ));
            continue;
        }
        if key.contains('@') {
            table.warnings.push(format!(
                "{}: {key:?} is an e-mail address pattern, never a HELO: skipped",
                at()
            ));
            continue;
        }
        let action = match parse_action(value) {
            Ok(action) => action,
            Err(why) => {
                bad.push(format!("{}: {why}", at()));
                continue;
            }
        };
        let scope = match (key.starts_with('.'), parent_matches_subdomains) {
            (true, true) => {
                table.warnings.push(format!(
                    "{}: {key:?} never matches with parent-domain matching on (Postfix ignores \
                     it too): skipped; set rules.access_parent_matches_subdomains = false to \
                     use .domain entries",
                    at()
                ));
                continue;
            }
            (true, false) => Scope::Subdomains,
            (false, true) => Scope::Both,
            (false, false) => Scope::Exact,
        };
        let name = key.strip_prefix('.').unwrap_or(key);
        let pattern = match DomainPattern::parse(name) {
            Ok(pattern) => DomainPattern { scope, ..pattern },
            Err(why) => {
                bad.push(format!("{}: {why}", at()));
                continue;
            }
        };
        let entry = Arc::new(EntryRef {
            source: source.to_owned(),
            line: line_no,
            text: format!("{key} {value}"),
        });
        table.entries.push((pattern, TableEntry { action, entry }));
    }
    if bad.is_empty() { Ok(table) } else { Err(bad) }
}

/// Postfix access actions that make sense for a HELO. Case-insensitive, as in Postfix.
fn parse_action(value: &str) -> Result<TableAction, String> {
    let (word, text) = match value.split_once(char::is_whitespace) {
        Some((word, text)) => (word, text.trim()),
        None => (value, ""),
    };
    let upper = word.to_ascii_uppercase();
    let text_reply =
        |code: u16| (!text.is_empty()).then(|| EntryReply { code, text: text.to_owned() });
    Ok(match upper.as_str() {
        "OK" | "PERMIT" => TableAction::Permit,
        _ if word.bytes().all(|b| b.is_ascii_digit()) && word.len() != 3 => TableAction::Permit,
        "DUNNO" => TableAction::Dunno,
        "REJECT" => TableAction::Deny(text_reply(554)),
        "DEFER" | "DEFER_IF_PERMIT" | "DEFER_IF_REJECT" => TableAction::Deny(Some(EntryReply {
            code: 450,
            text: if text.is_empty() { "try again later".into() } else { text.to_owned() },
        })),
        "WARN" | "INFO" => TableAction::Warn,
        code if code.len() == 3 && (code.starts_with('4') || code.starts_with('5')) => {
            let code: u16 = code.parse().map_err(|_| format!("{word:?} is not a reply code"))?;
            if text.is_empty() {
                return Err(format!("reply code {code} needs a text after it"));
            }
            TableAction::Deny(Some(EntryReply { code, text: text.to_owned() }))
        }
        _ => {
            return Err(format!(
                "action {word:?} is not supported for HELO checks; use OK, DUNNO, REJECT [text], \
                 DEFER [text], WARN [text], or a 4xx/5xx reply with text"
            ));
        }
    })
}

/// Joins continuation lines (starting with white space) to the line before, skips blank and
/// comment lines, and yields each logical line with the number of its first line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if raw.starts_with(char::is_whitespace)
            && let Some((_, last)) = lines.last_mut()
        {
            last.push(' ');
            last.push_str(trimmed);
            continue;
        }
        lines.push((index + 1, trimmed.to_owned()));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badhelo_reads_lines_as_they_are() {
        let text = "# qmail badhelo\n\n^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}\n!\\.\r\nlocalhost  \n  # indented comment\n";
        let rules = badhelo(text, "/var/qmail/control/badhelo");
        let summary: Vec<(bool, &str, usize)> =
            rules.iter().map(|r| (r.negated, r.pattern.as_str(), r.entry.line)).collect();
        assert_eq!(
            summary,
            vec![
                (false, "^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}", 3),
                (true, "\\.", 4),
                (false, "localhost", 5),
            ]
        );
        assert_eq!(rules[1].entry.text, "!\\.");
    }

    const POSTFIX: &str = "\
# /etc/postfix/helo_access
example.com        REJECT You are not example.com
.example.net       REJECT
mail.example.org   OK
friend.example     DUNNO
bad.example        550 5.7.1 Go away
slow.example       450 4.7.1 Try later
watch.example      WARN suspicious
spam.example       reject
user@example.com   REJECT
multi.example      REJECT this text
    goes on here
";

    #[test]
    fn postfix_default_parent_matching_is_kept() {
        let table = access_table(POSTFIX, "helo_access", true).unwrap();
        let first = &table.entries[0];
        assert_eq!(first.0, DomainPattern { name: "example.com".into(), scope: Scope::Both });
        assert_eq!(
            first.1.action,
            TableAction::Deny(Some(EntryReply {
                code: 554,
                text: "You are not example.com".into()
            }))
        );
        assert_eq!(first.1.entry.line, 2);
        assert_eq!(table.warnings.len(), 2, "{:?}", table.warnings);
        assert!(
            table.warnings[0].contains("helo_access:3")
                && table.warnings[0].contains(".example.net")
        );
        assert!(table.warnings[1].contains("user@example.com"));
        let actions: Vec<(String, TableAction)> =
            table.entries.iter().map(|(p, e)| (p.to_string(), e.action.clone())).collect();
        assert_eq!(
            actions,
            vec![
                (
                    "example.com".into(),
                    TableAction::Deny(Some(EntryReply {
                        code: 554,
                        text: "You are not example.com".into()
                    }))
                ),
                ("mail.example.org".into(), TableAction::Permit),
                ("friend.example".into(), TableAction::Dunno),
                (
                    "bad.example".into(),
                    TableAction::Deny(Some(EntryReply { code: 550, text: "5.7.1 Go away".into() }))
                ),
                (
                    "slow.example".into(),
                    TableAction::Deny(Some(EntryReply {
                        code: 450,
                        text: "4.7.1 Try later".into()
                    }))
                ),
                ("watch.example".into(), TableAction::Warn),
                ("spam.example".into(), TableAction::Deny(None)),
                (
                    "multi.example".into(),
                    TableAction::Deny(Some(EntryReply {
                        code: 554,
                        text: "this text goes on here".into()
                    }))
                ),
            ]
        );
    }

    #[test]
    fn without_parent_matching_plain_is_exact_and_dot_is_subdomains() {
        let text = "example.com REJECT\n.example.net REJECT\n";
        let table = access_table(text, "t", false).unwrap();
        assert!(table.warnings.is_empty());
        assert_eq!(table.entries[0].0.to_string(), "=example.com");
        assert_eq!(table.entries[1].0.to_string(), ".example.net");
    }

    #[test]
    fn unsupported_or_broken_lines_name_file_and_line() {
        let cases = [
            ("example.com HOLD\n", "t:1: action \"HOLD\" is not supported"),
            ("ok.example OK\nexample.com\n", "t:2: \"example.com\" has a pattern but no action"),
            ("/^mail/ REJECT\n", "t:1: \"/^mail/\" is a regexp table pattern"),
            ("bad_name.example REJECT\n", "t:1:"),
            ("x.example 550\n", "t:1: reply code 550 needs a text"),
        ];
        for (text, expected) in cases {
            let err = access_table(text, "t", true).unwrap_err();
            assert!(err.len() == 1 && err[0].starts_with(expected), "{text:?}: {err:?}");
        }
        // Every broken line, not only the first.
        let all: String = cases.iter().map(|(text, _)| *text).collect();
        let err = access_table(&all, "t", true).unwrap_err();
        let lines: Vec<&str> = err.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(lines, ["t:1", "t:3", "t:4", "t:5", "t:6"], "{err:#?}");
    }

    #[test]
    fn numeric_results_other_than_codes_mean_ok() {
        let table = access_table("a.example 1234\nb.example OK\n", "t", true).unwrap();
        assert!(table.entries.iter().all(|(_, e)| e.action == TableAction::Permit));
    }
}
