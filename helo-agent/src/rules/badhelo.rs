//! qmail `badhelo` semantics: case-insensitive extended regular expressions matched anywhere in
//! the HELO argument as the client sent it; a leading `!` denies when the pattern does NOT
//! match. The first rule in file order that fires decides, so the verdict names one line.
//!
//! Evaluation does not loop over the rules. Each pattern's required literal (a prefix or suffix
//! every match must contain) goes into one Aho-Corasick automaton; a HELO is scanned once, and
//! only the patterns whose literal occurs are run, each compiled on its first use. Patterns
//! without a usable literal run as one small `RegexSet`; negated ones run one by one. This
//! keeps both loading (a single `RegexSet` of 10k lines takes minutes to build: the literal
//! optimizer is superlinear) and matching (flat from 10 to 100k lines) cheap.

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_syntax::hir::literal::{ExtractKind, Extractor};

use super::EntryRef;

#[derive(Clone, Debug)]
pub struct RegexRule {
    pub negated: bool,
    /// The line as written (without the `!`).
    pub pattern: String,
    pub entry: EntryRef,
}

/// Literals shorter than this would make nearly every HELO a candidate.
const MIN_LITERAL_LEN: usize = 3;

#[derive(Debug, Default)]
pub struct BadheloSet {
    rules: Vec<RegexRule>,
    /// The translated pattern of each rule, compiled on first use.
    compiled: Vec<OnceLock<Option<Regex>>>,
    translated: Vec<String>,
    /// Required literals of the prefiltered rules, and the rule each belongs to.
    literals: Option<AhoCorasick>,
    literal_rule: Vec<usize>,
    /// Positive rules without a usable literal, in order, and their set.
    unfiltered: Vec<usize>,
    unfiltered_set: Option<RegexSet>,
    /// Negated rules, in order, compiled at load.
    negated: Vec<(usize, Regex)>,
}

impl Clone for BadheloSet {
    fn clone(&self) -> Self {
        Self::new(self.rules.clone()).expect("rules that compiled once compile again")
    }
}

fn builder(pattern: &str) -> RegexBuilder {
    // Bytes and ASCII case folding, as qmail's regcomp in the C locale.
    let mut builder = RegexBuilder::new(pattern);
    builder.case_insensitive(true).unicode(false);
    builder
}

impl BadheloSet {
    /// Checks and indexes `rules` (pattern text is POSIX ERE as qmail reads it). Patterns that
    /// do not parse are refused, every one of them, each as one line: its file and line, the
    /// pattern, and what is wrong with it.
    pub fn new(rules: Vec<RegexRule>) -> Result<Self, Vec<String>> {
        let mut set = BadheloSet::default();
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut bad = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            let pattern = posix_to_rust(&rule.pattern);
            let refuse =
                |why: String| format!("{}: bad regex {:?}: {why}", rule.entry, rule.pattern);
            let hir = match regex_syntax::ParserBuilder::new()
                .case_insensitive(false)
                .unicode(false)
                .utf8(false)
                .build()
                .parse(&pattern)
            {
                Ok(hir) => hir,
                Err(error) => {
                    bad.push(refuse(syntax_error(&error)));
                    continue;
                }
            };
            if rule.negated {
                match builder(&pattern).build() {
                    Ok(regex) => set.negated.push((index, regex)),
                    Err(error) => {
                        bad.push(refuse(one_line(&error.to_string())));
                        continue;
                    }
                }
            } else {
                match required_literals(&hir) {
                    Some(found) => {
                        set.literal_rule.extend(std::iter::repeat_n(index, found.len()));
                        literals.extend(found);
                    }
                    None => set.unfiltered.push(index),
                }
            }
            set.translated.push(pattern);
            set.compiled.push(OnceLock::new());
        }
        if !bad.is_empty() {
            return Err(bad);
        }
        if !literals.is_empty() {
            let automaton = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(&literals)
                .map_err(|e| vec![format!("the regex rules' literals do not index: {e}")])?;
            set.literals = Some(automaton);
        }
        if !set.unfiltered.is_empty() {
            let patterns = set.unfiltered.iter().map(|i| &set.translated[*i]);
            let compiled = RegexSetBuilder::new(patterns)
                .case_insensitive(true)
                .unicode(false)
                .build()
                .map_err(|e| {
                    vec![format!(
                        "the regex rules without literals do not compile together: {}",
                        one_line(&e.to_string())
                    )]
                })?;
            set.unfiltered_set = Some(compiled);
        }
        set.rules = rules;
        Ok(set)
    }

    /// The first rule (in order) that fires for `argument`.
    pub fn first_match(&self, argument: &str) -> Option<&RegexRule> {
        let haystack = argument.as_bytes();
        let mut best = usize::MAX;
        if let Some(automaton) = &self.literals {
            for found in automaton.find_overlapping_iter(haystack) {
                let rule = self.literal_rule[found.pattern().as_usize()];
                if rule < best && self.regex(rule).is_some_and(|re| re.is_match(haystack)) {
                    best = rule;
                }
            }
        }
        if let Some(unfiltered) = &self.unfiltered_set
            && unfiltered.is_match(haystack)
            && let Some(k) = unfiltered.matches(haystack).iter().next()
        {
            best = best.min(self.unfiltered[k]);
        }
        if let Some((rule, _)) = self
            .negated
            .iter()
            .take_while(|(rule, _)| *rule < best)
            .find(|(_, re)| !re.is_match(haystack))
        {
            best = *rule;
        }
        self.rules.get(best)
    }

    fn regex(&self, rule: usize) -> Option<&Regex> {
        self.compiled[rule]
            .get_or_init(|| match builder(&self.translated[rule]).build() {
                Ok(regex) => Some(regex),
                Err(error) => {
                    let rule = &self.rules[rule];
                    tracing::error!(entry = %rule.entry, pattern = rule.pattern, %error, "regex rule does not compile; it never matches");
                    None
                }
            })
            .as_ref()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// What is wrong with a pattern, in one line (the parser's own message spans three, with the
/// pattern and a caret).
fn syntax_error(error: &regex_syntax::Error) -> String {
    match error {
        regex_syntax::Error::Parse(e) => e.kind().to_string(),
        regex_syntax::Error::Translate(e) => e.kind().to_string(),
        other => one_line(&other.to_string()),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Literals one of which every match of `hir` contains (its possible prefixes, else suffixes),
/// or `None` when there is no such set of useful length.
fn required_literals(hir: &regex_syntax::hir::Hir) -> Option<Vec<Vec<u8>>> {
    for prefix in [true, false] {
        let mut extractor = Extractor::new();
        extractor.kind(if prefix { ExtractKind::Prefix } else { ExtractKind::Suffix });
        let mut seq = extractor.extract(hir);
        if prefix {
            seq.optimize_for_prefix_by_preference();
        } else {
            seq.optimize_for_suffix_by_preference();
        }
        if let Some(literals) = seq.literals()
            && !literals.is_empty()
            && literals.iter().all(|l| l.as_bytes().len() >= MIN_LITERAL_LEN)
        {
            return Some(literals.iter().map(|l| l.as_bytes().to_vec()).collect());
        }
    }
    None
}

/// Rewrites a POSIX extended regex so Rust's `regex` reads it the same. The difference is inside
/// bracket expressions: there POSIX takes `\` literally and has no set operators, while Rust
/// treats `\` as an escape and `[`, `&&`, `--`, `~~` as class syntax. Outside brackets the two
/// agree for what badhelo files use.
pub fn posix_to_rust(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' if i + 1 < chars.len() => {
                out.push('\\');
                out.push(chars[i + 1]);
                i += 2;
            }
            '[' => {
                i = bracket(&chars, i, &mut out);
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Copies the bracket expression starting at `chars[start] == '['`; returns the index after it.
fn bracket(chars: &[char], start: usize, out: &mut String) -> usize {
    let mut i = start + 1;
    out.push('[');
    if chars.get(i) == Some(&'^') {
        out.push('^');
        i += 1;
    }
    // A `]` first in the list is a literal.
    if chars.get(i) == Some(&']') {
        out.push_str("\\]");
        i += 1;
    }
    while i < chars.len() {
        let c = chars[i];
        match c {
            ']' => {
                out.push(']');
                return i + 1;
            }
            // POSIX classes such as [:alpha:] are understood by both.
            '[' if chars.get(i + 1) == Some(&':') => {
                let end = (i + 2..chars.len().saturating_sub(1))
                    .find(|&j| chars[j] == ':' && chars[j + 1] == ']');
                match end {
                    Some(end) => {
                        out.extend(&chars[i..end + 2]);
                        i = end + 2;
                    }
                    None => {
                        out.push_str("\\[");
                        i += 1;
                    }
                }
            }
            '\\' | '[' | '&' | '~' | '^' => {
                out.push('\\');
                out.push(c);
                i += 1;
            }
            // `-` is a range between two characters; escape it where Rust could read `--`.
            '-' if chars.get(i + 1) == Some(&'-') || out.ends_with('-') => {
                out.push_str("\\-");
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    // No closing bracket: leave it to the regex compiler to report.
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(lines: &[&str]) -> BadheloSet {
        let rules = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let (negated, pattern) = match line.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, *line),
                };
                RegexRule {
                    negated,
                    pattern: pattern.to_owned(),
                    entry: EntryRef { source: "badhelo".into(), line: i + 1, text: (*line).into() },
                }
            })
            .collect();
        BadheloSet::new(rules).unwrap()
    }

    fn line_of(s: &BadheloSet, helo: &str) -> Option<usize> {
        s.first_match(helo).map(|r| r.entry.line)
    }

    #[test]
    fn qmail_documentation_examples() {
        let s = set(&[
            r"^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}",
            r"!\.",
            "localhost",
            r#"[~!@#$%^&*()_+`={}|\;':"<>?,/]"#,
        ]);
        assert_eq!(line_of(&s, "dsl-1.2.3.4.isp.example"), Some(1));
        assert_eq!(line_of(&s, "ADSL.10.0.0.1"), Some(1));
        assert_eq!(line_of(&s, "dynamic-10-0-0-1.isp.example"), Some(1));
        assert_eq!(line_of(&s, "nodot"), Some(2), "no dot: the negated rule fires");
        assert_eq!(line_of(&s, "localhost.localdomain"), Some(3));
        assert_eq!(line_of(&s, "host_1.example"), Some(4));
        assert_eq!(line_of(&s, r"back\slash.example"), Some(4), "POSIX: \\ in brackets is literal");
        assert_eq!(line_of(&s, "semi;colon.example"), Some(4));
        assert_eq!(line_of(&s, "mail.example.com"), None);
        assert_eq!(line_of(&s, "mail-wr1-f41.google.com"), None);
    }

    #[test]
    fn matching_is_unanchored_and_case_insensitive() {
        let s = set(&["mail"]);
        // The qmail trap: unanchored `mail` matches a big sender's name too.
        assert_eq!(line_of(&s, "MAIL.bigcompany.com"), Some(1));
        assert_eq!(line_of(&s, "smtp.bigcompany.com"), None);
    }

    #[test]
    fn the_first_line_in_order_decides() {
        let s = set(&["example", "^mail", "!nomatch"]);
        assert_eq!(line_of(&s, "mail.example.com"), Some(1));
        assert_eq!(line_of(&s, "mail.other.net"), Some(2));
        assert_eq!(line_of(&s, "other.net"), Some(3));
        assert_eq!(line_of(&s, "nomatch.net"), None);
    }

    #[test]
    fn posix_brackets_translate() {
        assert_eq!(posix_to_rust(r"[\;]"), r"[\\;]");
        assert_eq!(posix_to_rust("[]a]"), r"[\]a]");
        assert_eq!(posix_to_rust("[^]a]"), r"[^\]a]");
        assert_eq!(posix_to_rust("[a-z0-9]"), "[a-z0-9]");
        assert_eq!(
            posix_to_rust("[[:digit:]-]"),
            "[[:digit:]-]",
            "a trailing - is literal in both"
        );
        assert_eq!(posix_to_rust("[a--]"), r"[a\-\-]", "an invalid POSIX range becomes literals");
        assert_eq!(posix_to_rust("[&&~~]"), r"[\&\&\~\~]");
        assert_eq!(posix_to_rust(r"\.[0-9]+\."), r"\.[0-9]+\.");
        for p in [
            r#"[~!@#$%^&*()_+`={}|\;':"<>?,/]"#,
            "[[:alpha:]]",
            "[a^b]",
            "[[]",
            "[[:digit:]-]",
            "[a--]",
        ] {
            regex::Regex::new(&posix_to_rust(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        assert!(regex::Regex::new(&posix_to_rust("[[]")).unwrap().is_match("["));
        assert!(regex::Regex::new(&posix_to_rust("[a^b]")).unwrap().is_match("^"));
    }

    #[test]
    fn a_bad_pattern_names_its_line() {
        let rules = vec![
            RegexRule {
                negated: false,
                pattern: "ok".into(),
                entry: EntryRef { source: "/etc/badhelo".into(), line: 1, text: "ok".into() },
            },
            RegexRule {
                negated: false,
                pattern: "(unclosed".into(),
                entry: EntryRef {
                    source: "/etc/badhelo".into(),
                    line: 2,
                    text: "(unclosed".into(),
                },
            },
        ];
        let err = BadheloSet::new(rules).unwrap_err();
        assert_eq!(err, ["/etc/badhelo:2: bad regex \"(unclosed\": unclosed group"]);
    }

    /// `check-config` stopped at the first bad regex: an admin fixing an imported file met its
    /// mistakes one run at a time.
    #[test]
    fn every_bad_pattern_is_reported_one_line_each() {
        let rules: Vec<RegexRule> = ["(open", "fine", "!x{2,1}", "[unclosed", "also.fine", "*a"]
            .iter()
            .enumerate()
            .map(|(i, line)| RegexRule {
                negated: line.starts_with('!'),
                pattern: line.trim_start_matches('!').into(),
                entry: EntryRef { source: "badhelo".into(), line: i + 1, text: (*line).into() },
            })
            .collect();
        let err = BadheloSet::new(rules).unwrap_err();
        let lines: Vec<&str> = err.iter().map(|e| e.split(": bad regex").next().unwrap()).collect();
        assert_eq!(lines, ["badhelo:1", "badhelo:3", "badhelo:4", "badhelo:6"], "{err:#?}");
        assert!(err.iter().all(|e| !e.contains('\n')), "{err:#?}");
        assert!(err[0].ends_with("unclosed group"), "{err:#?}");
    }

    /// The indexed matcher must agree with the naive in-order loop on every input.
    #[test]
    fn agrees_with_a_naive_loop_over_the_same_patterns() {
        let lines = [
            r"^(a?dsl|dhcp|dyn(amic)?|ppp)([.-][0-9]{1,3}){4}",
            r"^Mail\.SPAM[0-9]+\.example$",
            r"pool[.-]",
            r"\.dyn\.",
            r"(cable|cpe|fiber)-",
            r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+",
            r"example\.net$",
            r"^[a-z]{2}$",
            r"x",
            r#"[~!@#$%^&*()_+`={}|\;'"<>?,/]"#,
            r"!\.",
            r"!^[a-z0-9.-]+$",
            r"(?:^|\.)local(domain)?$",
            r"HOST[0-9]*\.BAD",
            r"ab|cd|ef",
        ];
        let rules = set(&lines);
        let naive: Vec<(bool, regex::bytes::Regex)> = lines
            .iter()
            .map(|line| {
                let (negated, pattern) = match line.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, *line),
                };
                (negated, builder(&posix_to_rust(pattern)).build().unwrap())
            })
            .collect();
        let parts = [
            "dsl",
            "adsl",
            "dhcp",
            "dynamic",
            "ppp",
            "mail",
            "MAIL",
            "spam12",
            "pool",
            "dyn",
            "cable",
            "CPE",
            "fiber",
            "10",
            "1",
            "255",
            "example",
            "net",
            "local",
            "localdomain",
            "host7",
            "bad",
            "ab",
            "xy",
            "q_q",
            "zz",
            "",
        ];
        let seps = [".", "-", ""];
        let mut checked = 0;
        for a in parts {
            for b in parts {
                for c in ["", ".example.net", ".1.2.3.4", ".local", "-x"] {
                    for sep in seps {
                        let helo = format!("{a}{sep}{b}{c}");
                        let expected = naive
                            .iter()
                            .position(|(negated, re)| re.is_match(helo.as_bytes()) != *negated)
                            .map(|i| i + 1);
                        assert_eq!(line_of(&rules, &helo), expected, "HELO {helo:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000);
    }
}
