//! Importers for the rule files admins already have, read as they are:
//! - a qmail `badhelo` control file (one POSIX extended regex per line, `!` negates);
//! - a Postfix access table source (`key  ACTION [text]`), read as `check_helo_access` reads
//!   it, with Postfix's parent-domain semantics stated by a flag, so migrating changes nothing
//!   unless asked. Such tables are often shared with the client, sender and recipient checks:
//!   entries no HELO lookup can find (a regexp pattern among them, which postmap reads as a
//!   literal key), and actions that do not act on a HELO, are skipped with a warning each (file
//!   and line); a line that is not `key value` at all, or an action that looks like a misspelt
//!   one (`REJCT`), refuses the file.
//!
//! Pure: text in, entries (and warnings) out; the caller reads the files.

use std::sync::Arc;

use crate::rules::badhelo::RegexRule;
use crate::rules::helo::{self, Helo};
use crate::rules::table::{DomainPattern, Scope};
use crate::rules::{EntryRef, EntryReply, TableAction, TableEntry};

/// The lines of a qmail badhelo file: blank lines and lines starting with `#` are skipped;
/// trailing white space (and a CR from a CRLF file) is not part of the pattern, nor is a
/// byte-order mark a Windows editor put at the start.
pub fn badhelo(text: &str, source: &str) -> Vec<RegexRule> {
    without_bom(text)
        .lines()
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

/// A rule file's bytes as text. Files written long ago carry Latin-1 in comments: such a file
/// still loads, its bytes that are not UTF-8 read as U+FFFD (an entry holding one matches no
/// HELO, which is ASCII), with a warning naming the first such line.
pub fn decode(bytes: Vec<u8>, source: &str) -> (String, Option<String>) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, None),
        Err(error) => {
            let valid = error.utf8_error().valid_up_to();
            let bytes = error.into_bytes();
            let line = bytes[..valid].iter().filter(|b| **b == b'\n').count() + 1;
            let warning = format!(
                "{source}:{line}: the file is not UTF-8 (Latin-1?); bytes that are not UTF-8 \
                 are read as U+FFFD, and entries holding them match nothing"
            );
            (String::from_utf8_lossy(&bytes).into_owned(), Some(warning))
        }
    }
}

fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// A parsed access table: entries to add to the domain table, a warning (`file:line: why`) for
/// each entry skipped because no HELO lookup can use it, and an error for each line that
/// refuses the file (when there is one, the caller uses no entry of it; the warnings still
/// stand, so that an admin sees them all at once).
#[derive(Debug, Default)]
pub struct AccessTable {
    pub entries: Vec<(DomainPattern, TableEntry)>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

/// Parses a Postfix access table source (the text `postmap` reads) as `check_helo_access`
/// looks a HELO up in it.
///
/// Keys: a host name (a `_` allowed, as Postfix allows it), a bare address (`192.0.2.1`,
/// `2001:db8::1`) or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), each matching a
/// HELO of the same text (addresses never cover anything else: Postfix applies no parent-domain
/// matching to them). Skipped with a warning: e-mail address keys (`user@domain`, `user@`,
/// `@domain`), the null sender `<>`, partial addresses (`192.0.2`: networks, which a HELO
/// lookup never tries), CIDR keys, keys that are no host name, and actions that are not for a
/// HELO (`HOLD`, `FILTER`, restriction lists...).
///
/// `parent_matches_subdomains` is Postfix's `parent_domain_matches_subdomains` containing
/// `smtpd_access_maps` (the default): then `example.com` also covers its subdomains, and
/// `.example.com` entries are never looked up. Without it, `example.com` is that name only and
/// `.example.com` covers the subdomains.
///
/// A regexp table pattern (`/^localhost$/ REJECT`) is skipped too: postmap reads it as a
/// literal key, which no HELO equals.
///
/// Lines that cannot be read at all (a key without a value) and actions that look like a
/// misspelt action (`REJCT`, `Dunno_`: Postfix would answer `451 4.3.5 Server configuration
/// error` to the HELO they match) refuse the file, every one of them, each as `file:line: why`
/// in [`AccessTable::errors`].
pub fn access_table(text: &str, source: &str, parent_matches_subdomains: bool) -> AccessTable {
    let mut table = AccessTable::default();
    let (lines, orphans) = logical_lines(without_bom(text));
    for line_no in orphans {
        table.warnings.push(format!(
            "{source}:{line_no}: an indented line continues an entry, but no entry comes before \
             it (postmap skips it too): skipped"
        ));
    }
    for (line_no, logical) in lines {
        let at = || format!("{source}:{line_no}");
        let (key, value) = match logical.split_once(char::is_whitespace) {
            Some((key, value)) => (key, value.trim()),
            None => {
                table.errors.push(format!("{}: {logical:?} has a pattern but no action", at()));
                continue;
            }
        };
        let pattern = match access_key(key, parent_matches_subdomains) {
            Read::Use(pattern) => pattern,
            Read::Skip(why) => {
                table.warnings.push(format!("{}: {key:?} {why}: skipped", at()));
                continue;
            }
            Read::Refuse(why) => {
                table.errors.push(format!("{}: {key:?} {why}", at()));
                continue;
            }
        };
        let action = match parse_action(value) {
            Read::Use(action) => action,
            Read::Skip(why) => {
                table.warnings.push(format!("{}: {key:?}: {why}: skipped", at()));
                continue;
            }
            Read::Refuse(why) => {
                table.errors.push(format!("{}: {key:?}: {why}", at()));
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
    table
}

/// What an access-table key or action is to a HELO lookup.
enum Read<T> {
    /// A HELO lookup uses it: the pattern to put in the domain table, or the action.
    Use(T),
    /// A key or action of another check, or one no HELO lookup uses: why.
    Skip(String),
    /// A line no admin meant, which Postfix would not take either: why.
    Refuse(String),
}

fn access_key(key: &str, parent_matches_subdomains: bool) -> Read<DomainPattern> {
    if key == "<>" {
        return Read::Skip(
            "is the null sender key of check_sender_access (smtpd_null_access_lookup_key), \
             never a HELO"
                .into(),
        );
    }
    if key.contains('@') {
        return Read::Skip(
            "is an e-mail address key (user@domain, user@, @domain) of the sender and \
             recipient checks, never a HELO"
                .into(),
        );
    }
    if key.starts_with('/') {
        return Read::Skip(
            "is a regexp table pattern, which postmap reads as a literal key that no HELO \
             equals; move it to a badhelo file (rules.badhelo_file) or rules.regexes"
                .into(),
        );
    }
    if key.contains('/') {
        return Read::Skip(
            "is a CIDR network, which only a cidr: table matches (in this table it matches \
             nothing)"
                .into(),
        );
    }
    if let Some(name) = key.strip_prefix('.') {
        if parent_matches_subdomains {
            return Read::Skip(
                "never matches with parent-domain matching on (Postfix ignores it too); set \
                 rules.access_parent_matches_subdomains = false to use .domain entries"
                    .into(),
            );
        }
        return match helo::table_name(name) {
            Ok(name) => Read::Use(DomainPattern { name, scope: Scope::Subdomains }),
            Err(why) => Read::Skip(format!("is not a domain ({})", why.describe())),
        };
    }
    // The key is looked up as the HELO text it equals: parse it as one.
    let parsed = helo::parse(key);
    let scope = match parsed {
        // Postfix tries no parent domains for an address, and a literal has none.
        Helo::BareIp(_) | Helo::Literal(_) => Scope::Exact,
        Helo::Name(_) | Helo::Invalid(_) if parent_matches_subdomains => Scope::Both,
        Helo::Name(_) | Helo::Invalid(_) => Scope::Exact,
    };
    match (helo::table_key(&parsed, key), &parsed) {
        (Some(name), _) => Read::Use(DomainPattern { name: name.into_owned(), scope }),
        (None, _) if is_partial_address(key) => Read::Skip(
            "is a network (a partial address) for check_client_access; a HELO lookup tries an \
             address whole, never its networks"
                .into(),
        ),
        (None, Helo::Invalid(why)) => Read::Skip(format!(
            "is neither a host name nor an address ({}), so no HELO is looked up by it",
            why.describe()
        )),
        (None, _) => Read::Skip("is no HELO lookup key".into()),
    }
}

/// `192.0.2`, `192.0`, `192` or an IPv6 prefix such as `2001:db8`: the network forms of
/// access(5), which Postfix tries for client addresses only.
fn is_partial_address(key: &str) -> bool {
    let v4 = {
        let octets: Vec<&str> = key.split('.').collect();
        octets.len() <= 3
            && octets
                .iter()
                .all(|o| !o.is_empty() && o.len() <= 3 && o.bytes().all(|b| b.is_ascii_digit()))
    };
    let v6 = key.contains(':') && key.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    v4 || v6
}

/// Postfix access actions that make sense for a HELO, case-insensitive as in Postfix.
/// `Skip` says why an action is left out: Postfix takes it, but it does nothing helo-filter can
/// do at HELO (a restriction list or class among them). `Refuse` is for a word that looks like
/// a misspelt action: Postfix would look it up as a restriction, find none, and answer `451
/// 4.3.5 Server configuration error` to every HELO it matches; skipping it would leave the
/// entry doing nothing without a word.
fn parse_action(value: &str) -> Read<TableAction> {
    let (word, text) = match value.split_once(char::is_whitespace) {
        Some((word, text)) => (word, text.trim()),
        None => (value, ""),
    };
    let is_code = |w: &str| {
        w.len() == 3
            && w.bytes().all(|b| b.is_ascii_digit())
            && matches!(w.as_bytes()[0], b'4' | b'5')
    };
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Postfix: an all-numeric value means OK (a time stamp from POP-before-SMTP), so a bare
        // reply code permits. Surely not what its writer meant: skipped, not followed.
        if is_code(value) {
            return Read::Skip(format!(
                "reply code {value} has no text, and Postfix reads an all-numeric value as OK; \
                 write {value} and a text to reject"
            ));
        }
        return Read::Use(TableAction::Permit);
    }
    let upper = word.to_ascii_uppercase();
    let text_reply = |code: u16| (!text.is_empty()).then(|| entry_reply(code, text));
    Read::Use(match upper.as_str() {
        "OK" | "RELAY" | "PERMIT" => TableAction::Permit,
        "DUNNO" => TableAction::Dunno,
        "REJECT" => TableAction::Deny(text_reply(554)),
        "DEFER" | "DEFER_IF_PERMIT" | "DEFER_IF_REJECT" => TableAction::Deny(Some(entry_reply(
            450,
            if text.is_empty() { "try again later" } else { text },
        ))),
        "WARN" | "INFO" => TableAction::Warn,
        code if is_code(code) => {
            TableAction::Deny(Some(entry_reply(code.parse().expect("three digits"), text)))
        }
        "HOLD" | "DISCARD" | "FILTER" | "REDIRECT" | "BCC" | "PREPEND" | "DELAY" => {
            return Read::Skip(format!(
                "action {word} acts on the message, which the HELO judge never holds"
            ));
        }
        "HANGUP" => {
            return Read::Skip("action HANGUP is not supported; use REJECT or a 5xx reply".into());
        }
        _ if value.contains(':') => {
            return Read::Skip(format!(
                "{value:?} names a lookup table, which an access table may not (Postfix answers \
                 451 for it)"
            ));
        }
        _ => {
            if let Some(meant) = misspelt_action(word) {
                return Read::Refuse(format!(
                    "{word:?} is no access action; did you mean {meant}? (Postfix would answer \
                     451 4.3.5 Server configuration error to every HELO it matches)"
                ));
            }
            return Read::Skip(format!(
                "{word:?} is not an access action helo-filter applies (OK, DUNNO, REJECT [text], \
                 DEFER [text], WARN [text], or a 4xx/5xx reply with text); restriction lists and \
                 classes are not evaluated"
            ));
        }
    })
}

/// An entry's reply as Postfix sends it: with the enhanced status code the text starts with,
/// or `5.7.1` (`4.7.1` for a 4xx reply) in front where it has none (smtpd_check.c), as every
/// other rejection of ours carries one.
fn entry_reply(code: u16, text: &str) -> EntryReply {
    let first = text.split(' ').next().unwrap_or_default();
    let text = if is_enhanced_code(first) {
        text.to_owned()
    } else {
        format!("{}.7.1 {text}", code / 100)
    };
    EntryReply { code, text: text.trim_end().to_owned() }
}

/// `5.7.1`, `4.2.0`: an RFC 3463 enhanced status code (class, subject, detail).
fn is_enhanced_code(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|part| (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()))
}

/// Every action word of access(5).
const ACTIONS: &[&str] = &[
    "OK",
    "RELAY",
    "PERMIT",
    "DUNNO",
    "REJECT",
    "DEFER",
    "DEFER_IF_PERMIT",
    "DEFER_IF_REJECT",
    "WARN",
    "INFO",
    "HOLD",
    "DISCARD",
    "FILTER",
    "REDIRECT",
    "BCC",
    "PREPEND",
    "DELAY",
    "HANGUP",
];

/// The action `word` most likely misspells, if it looks like one: within two edits of an
/// action word (case-insensitive), or written in capitals as actions are and restriction names
/// never are (those are lower case: `permit_mynetworks`, `reject_unauth_destination`, and the
/// restriction classes admins name in `smtpd_restriction_classes`).
fn misspelt_action(word: &str) -> Option<&'static str> {
    let upper = word.to_ascii_uppercase();
    let nearest = ACTIONS
        .iter()
        .map(|action| (edit_distance(&upper, action), *action))
        .min()
        .expect("ACTIONS is not empty");
    let capitals = word.bytes().any(|b| b.is_ascii_uppercase())
        && !word.bytes().any(|b| b.is_ascii_lowercase());
    (nearest.0 <= 2 || capitals).then_some(nearest.1)
}

/// Levenshtein distance over bytes (the words are ASCII; anything else only adds distance).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb)).min(row[j] + 1).min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Joins continuation lines (starting with white space) to the line before, skips blank and
/// comment lines (also between an entry and its continuation), and yields each logical line
/// with the number of its first line, as postmap reads them (Postfix's readllines). Indented
/// text before the first entry continues nothing: postmap skips it with a warning, and so do
/// we (the second list: the line numbers where such text starts).
fn logical_lines(text: &str) -> (Vec<(usize, String)>, Vec<usize>) {
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut orphans = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if raw.starts_with(char::is_whitespace) {
            match lines.last_mut() {
                Some((_, last)) => {
                    last.push(' ');
                    last.push_str(trimmed);
                }
                // Further indented lines continue the same orphan.
                None if orphans.is_empty() => orphans.push(index + 1),
                None => {}
            }
            continue;
        }
        lines.push((index + 1, trimmed.to_owned()));
    }
    (lines, orphans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of a text no line of which refuses it.
    fn usable(text: &str, parent_matches_subdomains: bool) -> AccessTable {
        let table = access_table(text, "t", parent_matches_subdomains);
        assert!(table.errors.is_empty(), "{text:?} must load: {:#?}", table.errors);
        table
    }

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
        let table = access_table(POSTFIX, "helo_access", true);
        assert!(table.errors.is_empty(), "{:?}", table.errors);
        let first = &table.entries[0];
        assert_eq!(first.0, DomainPattern { name: "example.com".into(), scope: Scope::Both });
        assert_eq!(
            first.1.action,
            TableAction::Deny(Some(EntryReply {
                code: 554,
                text: "5.7.1 You are not example.com".into()
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
                        text: "5.7.1 You are not example.com".into()
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
                        text: "5.7.1 this text goes on here".into()
                    }))
                ),
            ]
        );
    }

    #[test]
    fn without_parent_matching_plain_is_exact_and_dot_is_subdomains() {
        let text = "example.com REJECT\n.example.net REJECT\n";
        let table = usable(text, false);
        assert!(table.warnings.is_empty());
        assert_eq!(table.entries[0].0.to_string(), "=example.com");
        assert_eq!(table.entries[1].0.to_string(), ".example.net");
    }

    #[test]
    fn only_lines_that_cannot_be_read_refuse_the_file() {
        let cases = [
            ("ok.example OK\nexample.com\n", "t:2: \"example.com\" has a pattern but no action"),
            (
                "typo.example REJCT\n",
                "t:1: \"typo.example\": \"REJCT\" is no access action; did you mean REJECT?",
            ),
        ];
        for (text, expected) in cases {
            let errors = access_table(text, "t", true).errors;
            assert!(errors.len() == 1 && errors[0].starts_with(expected), "{text:?}: {errors:?}");
        }
        // Every broken line, not only the first; usable and skipped lines in between do not
        // count, and their warnings are kept beside the errors.
        let all =
            "a.example OK\nb.example\nc.example HOLD\n/x/ REJECT\nd.example\ne.example DUNO\n";
        let table = access_table(all, "t", true);
        let lines: Vec<&str> = table.errors.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(lines, ["t:2", "t:5", "t:6"], "{:#?}", table.errors);
        assert!(table.errors[2].contains("did you mean DUNNO?"), "{:?}", table.errors);
        let warned: Vec<&str> =
            table.warnings.iter().map(|w| w.split(": ").next().unwrap()).collect();
        assert_eq!(warned, ["t:3", "t:4"], "{:#?}", table.warnings);
    }

    /// Regression: `/^localhost$/ REJECT` in a hash-style helo_access file refused the whole
    /// file, so check-config failed, a reload was refused and the agent could not start.
    /// postmap reads the line as a literal key (which no HELO equals): skipped, with a warning
    /// that says where regexes go.
    #[test]
    fn a_regexp_line_in_a_hash_table_is_skipped_not_refused() {
        let table = usable("/^localhost$/ REJECT\nexample.com REJECT\n", true);
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.warnings.len(), 1, "{:?}", table.warnings);
        let warning = &table.warnings[0];
        assert!(
            warning.starts_with("t:1: \"/^localhost$/\" is a regexp table pattern"),
            "{warning}"
        );
        assert!(warning.contains("move it to a badhelo file"), "{warning}");
        assert!(warning.ends_with(": skipped"), "{warning}");
    }

    /// Regression: an action typo (`REJCT`) was a warning with exit 0, so the entry did nothing
    /// without anyone noticing. Restriction lists and classes (lower case, as Postfix names
    /// them) are still skipped with a warning: a shared table holds them legitimately.
    #[test]
    fn a_misspelt_action_refuses_the_file_and_restriction_names_are_skipped() {
        for (value, meant) in [
            ("REJCT", "REJECT"),
            ("rejct", "REJECT"),
            ("Dunno_", "DUNNO"),
            ("OKAY", "OK"),
            ("DEFFER", "DEFER"),
        ] {
            let errors = access_table(&format!("x.example {value}\n"), "t", true).errors;
            assert_eq!(errors.len(), 1, "{value}: {errors:?}");
            assert!(errors[0].contains(&format!("did you mean {meant}?")), "{value}: {errors:?}");
        }
        // Capitals far from every action: still an action's spelling, never a restriction's.
        let errors = access_table("x.example BLOCKED\n", "t", true).errors;
        assert!(errors.len() == 1 && errors[0].contains("did you mean"), "{errors:?}");
        for value in
            ["permit_mynetworks, reject", "my_restriction_class", "reject_unknown_client_hostname"]
        {
            let table = usable(&format!("x.example {value}\n"), true);
            assert!(table.entries.is_empty() && table.warnings.len() == 1, "{value}: {table:?}");
        }
    }

    /// The shape of a real /etc/postfix/access shared by check_client_access,
    /// check_sender_access, check_recipient_access and check_helo_access, written by several
    /// admins over the years, with CRLF endings from a Windows editor in part of it.
    const SHARED: &str = "\
# /etc/postfix/access -- shared by smtpd_{client,sender,recipient,helo}_restrictions
# client addresses
192.0.2.1                 OK
192.0.2                   REJECT bad network
198.51.100.0/24           REJECT cidr in a hash table
2001:db8::25              OK
2001:db8:bad              REJECT v6 network
# HELO literals
[203.0.113.5]             REJECT literal
[IPv6:2001:DB8::BAD]      554 5.7.1 forged v6 literal
[foo]                     REJECT nonsense literal
# names
spammer.example           reject\r
my_host.partner.example   ok\r
xn--bcher-kva.example     REJECT idn\r
mail.müller.example       DUNNO
Legacy.Example.COM.       defer_if_permit please retry
\tlater
# sender and recipient keys
<>                        550 5.1.0 null sender
postmaster@               OK
user@example.org          REJECT
@spam.example             REJECT
# actions for other stages
hold.example              HOLD
filter.example            FILTER smtp:[127.0.0.1]:10025
restricted.example        permit_mynetworks, reject
typo.example              reject_unknown_client_hostname
class.example             my_restriction_class
bare.example              550
numeric.example           1700000000
bad!name.example          REJECT
host.123                  REJECT
";

    #[test]
    fn a_shared_table_loads_with_one_warning_per_skipped_entry() {
        let table = access_table(SHARED, "/etc/postfix/access", true);
        assert!(table.errors.is_empty(), "a real table must load: {:#?}", table.errors);
        let used: Vec<(String, usize, TableAction)> = table
            .entries
            .iter()
            .map(|(p, e)| (p.to_string(), e.entry.line, e.action.clone()))
            .collect();
        let deny =
            |code, text: &str| TableAction::Deny(Some(EntryReply { code, text: text.into() }));
        assert_eq!(
            used,
            vec![
                ("=192.0.2.1".into(), 3, TableAction::Permit),
                ("=2001:db8::25".into(), 6, TableAction::Permit),
                ("=[203.0.113.5]".into(), 9, deny(554, "5.7.1 literal")),
                ("=[ipv6:2001:db8::bad]".into(), 10, deny(554, "5.7.1 forged v6 literal")),
                ("spammer.example".into(), 13, TableAction::Deny(None)),
                ("my_host.partner.example".into(), 14, TableAction::Permit),
                ("xn--bcher-kva.example".into(), 15, deny(554, "5.7.1 idn")),
                ("mail.xn--mller-kva.example".into(), 16, TableAction::Dunno),
                ("legacy.example.com".into(), 17, deny(450, "4.7.1 please retry later")),
                ("numeric.example".into(), 31, TableAction::Permit),
                ("host.123".into(), 33, TableAction::Deny(None)),
            ]
        );
        let skipped: Vec<(&str, &str)> = table
            .warnings
            .iter()
            .map(|w| {
                let (at, rest) = w.split_once(": ").unwrap();
                assert!(w.ends_with(": skipped"), "{w}");
                (at, rest)
            })
            .map(|(at, rest)| (at.rsplit(':').next().unwrap(), rest))
            .collect();
        let lines: Vec<&str> = skipped.iter().map(|(line, _)| *line).collect();
        assert_eq!(
            lines,
            ["4", "5", "7", "11", "20", "21", "22", "23", "25", "26", "27", "28", "29", "30", "32"],
            "{:#?}",
            table.warnings
        );
        let why = |line: &str| skipped.iter().find(|(l, _)| *l == line).unwrap().1;
        for (line, says) in [
            ("4", "is a network"),
            ("5", "CIDR"),
            ("7", "is a network"),
            ("11", "does not hold an IP address"),
            ("20", "null sender"),
            ("21", "e-mail address"),
            ("22", "e-mail address"),
            ("23", "e-mail address"),
            ("25", "action HOLD acts on the message"),
            ("26", "action FILTER acts on the message"),
            ("27", "\"permit_mynetworks,\" is not an access action"),
            ("28", "\"reject_unknown_client_hostname\" is not an access action"),
            ("29", "\"my_restriction_class\" is not an access action"),
            ("30", "reply code 550 has no text"),
            ("32", "contains '!'"),
        ] {
            assert!(why(line).contains(says), "line {line}: {}", why(line));
        }
        assert!(table.warnings[0].starts_with("/etc/postfix/access:4: \"192.0.2\" "));
    }

    /// Regression: an indented line before the first entry (a pasted table, an indented
    /// comment block's tail) became an entry of its own and refused the whole file; postmap
    /// skips it with a warning.
    #[test]
    fn access_table_indented_text_before_the_first_entry_is_skipped() {
        let text = "# header\n   stray text\n\n   more stray\nexample.com REJECT\n  go away\n";
        let table = usable(text, true);
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.entries[0].1.entry.line, 5);
        assert_eq!(table.entries[0].1.entry.text, "example.com REJECT go away");
        assert_eq!(table.warnings.len(), 1, "{:?}", table.warnings);
        assert!(table.warnings[0].starts_with("t:2: an indented line"), "{:?}", table.warnings);
    }

    #[test]
    fn continuation_lines_join_across_comments_and_blank_lines() {
        let text = "example.com\n  # the action:\n\n    REJECT\n    go away\nnext.example OK\n";
        let table = usable(text, true);
        let texts: Vec<(usize, &str)> =
            table.entries.iter().map(|(_, e)| (e.entry.line, e.entry.text.as_str())).collect();
        assert_eq!(texts, [(1, "example.com REJECT go away"), (6, "next.example OK")]);
    }

    #[test]
    fn crlf_and_a_byte_order_mark_load() {
        let postfix = "\u{feff}example.com REJECT\r\n\r\n# c\r\nb.example 550 5.7.1 no\r\n";
        let table = usable(postfix, true);
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        assert_eq!(table.entries[0].0.to_string(), "example.com");
        assert_eq!(
            table.entries[1].1.action,
            TableAction::Deny(Some(EntryReply { code: 550, text: "5.7.1 no".into() }))
        );
        let qmail = "\u{feff}^dsl-\r\n# comment\r\n\r\n!\\.\r\nlocalhost\r";
        let rules = badhelo(qmail, "badhelo");
        let summary: Vec<(bool, &str, usize)> =
            rules.iter().map(|r| (r.negated, r.pattern.as_str(), r.entry.line)).collect();
        assert_eq!(summary, [(false, "^dsl-", 1), (true, "\\.", 4), (false, "localhost", 5)]);
    }

    /// Regression: a rule file with one Latin-1 byte (a comment naming an admin) did not load
    /// at all ("stream did not contain valid UTF-8").
    #[test]
    fn rule_file_with_latin1_comment_loads() {
        let bytes = b"# M\xfcller, 2009\nexample.com REJECT\nb\xe4d.example REJECT\n".to_vec();
        let (text, warning) = decode(bytes, "t");
        assert!(warning.unwrap().starts_with("t:1: the file is not UTF-8"));
        let table = usable(&text, true);
        assert_eq!(table.entries.len(), 1);
        assert!(table.warnings[0].starts_with("t:3: "), "{:?}", table.warnings);
        assert_eq!(decode(b"ok.example OK\n".to_vec(), "t"), ("ok.example OK\n".into(), None));
    }

    #[test]
    fn without_parent_matching_addresses_stay_exact_and_dot_names_are_subdomains() {
        let text = "192.0.2.1 OK\n[192.0.2.2] REJECT\n.my_sub.example REJECT\n.192.0 REJECT\n";
        let table = usable(text, false);
        let patterns: Vec<String> = table.entries.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(patterns, ["=192.0.2.1", "=[192.0.2.2]", ".my_sub.example"]);
        assert_eq!(table.warnings.len(), 1);
        assert!(table.warnings[0].starts_with("t:4: \".192.0\" is not a domain"));
    }

    /// Regression: table rejections answered `554 forged` without an enhanced status code,
    /// while every other rejection answers `553 5.7.1 ...`. Postfix puts 5.7.1 (4.7.1) in front
    /// of an access entry's text that has none, and keeps one that the text gives.
    #[test]
    fn table_rejections_carry_an_enhanced_code_as_postfix_sends_them() {
        let text = "a.example REJECT forged\nb.example 550 no\nc.example 451 later\n\
                    d.example 550 5.7.26 dmarc\ne.example DEFER\nf.example REJECT 5.7.1x not a code\n";
        let replies: Vec<(u16, String)> = usable(text, true)
            .entries
            .iter()
            .map(|(_, e)| match &e.action {
                TableAction::Deny(Some(reply)) => (reply.code, reply.text.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected = [
            (554, "5.7.1 forged"),
            (550, "5.7.1 no"),
            (451, "4.7.1 later"),
            (550, "5.7.26 dmarc"),
            (450, "4.7.1 try again later"),
            (554, "5.7.1 5.7.1x not a code"),
        ];
        let expected: Vec<(u16, String)> =
            expected.iter().map(|(c, t)| (*c, t.to_string())).collect();
        assert_eq!(replies, expected);
    }

    #[test]
    fn numeric_results_other_than_codes_mean_ok() {
        let table = usable("a.example 1234\nb.example OK\n", true);
        assert!(table.entries.iter().all(|(_, e)| e.action == TableAction::Permit));
    }
}
