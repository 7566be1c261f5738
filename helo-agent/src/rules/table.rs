//! Domain tables with per-entry scope, so no entry silently covers more than it says:
//! `=host.example` matches that name only, `.example.com` only its subdomains, and
//! `example.com` both. Lookups try the full name, then each parent for subdomain entries, so
//! the most specific entry wins (as in Postfix's access tables).

use rustc_hash::FxHashMap;

use super::helo::normalize_name;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The name itself only (`=name`).
    Exact,
    /// Subdomains only (`.name`).
    Subdomains,
    /// The name and its subdomains (`name`).
    Both,
}

impl Scope {
    pub fn describe(self) -> &'static str {
        match self {
            Scope::Exact => "exactly",
            Scope::Subdomains => "subdomains of",
            Scope::Both => "or a subdomain of",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPattern {
    pub name: String,
    pub scope: Scope,
}

impl DomainPattern {
    /// Parses `=name`, `.name` or `name`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (scope, name) = if let Some(rest) = text.strip_prefix('=') {
            (Scope::Exact, rest)
        } else if let Some(rest) = text.strip_prefix('.') {
            (Scope::Subdomains, rest)
        } else {
            (Scope::Both, text)
        };
        let name = normalize_name(name).map_err(|why| {
            format!(
                "{text:?} is not a domain pattern ({}); write =host.example (that name only), \
                 .example.com (subdomains only) or example.com (both)",
                why.describe()
            )
        })?;
        Ok(DomainPattern { name, scope })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scope {
            Scope::Exact => write!(f, "={}", self.name),
            Scope::Subdomains => write!(f, ".{}", self.name),
            Scope::Both => write!(f, "{}", self.name),
        }
    }
}

/// A table of domain patterns to values of type `V`.
#[derive(Clone, Debug)]
pub struct DomainTable<V> {
    exact: FxHashMap<String, usize>,
    subtree: FxHashMap<String, usize>,
    values: Vec<V>,
}

impl<V> Default for DomainTable<V> {
    fn default() -> Self {
        Self { exact: FxHashMap::default(), subtree: FxHashMap::default(), values: Vec::new() }
    }
}

/// The outcome of [`DomainTable::insert`] when a pattern overlaps one already there.
#[derive(Debug, PartialEq, Eq)]
pub struct Duplicate<'a, V> {
    pub existing: &'a V,
}

impl<V> DomainTable<V> {
    /// Adds `pattern`. A name/scope already covered keeps its first value (as `postmap` does),
    /// and the first value is returned so the caller can warn.
    pub fn insert(&mut self, pattern: &DomainPattern, value: V) -> Option<Duplicate<'_, V>> {
        let index = self.values.len();
        let mut duplicate = None;
        if matches!(pattern.scope, Scope::Exact | Scope::Both) {
            if let Some(first) = self.exact.get(&pattern.name) {
                duplicate = Some(*first);
            } else {
                self.exact.insert(pattern.name.clone(), index);
            }
        }
        if matches!(pattern.scope, Scope::Subdomains | Scope::Both) {
            if let Some(first) = self.subtree.get(&pattern.name) {
                duplicate = duplicate.or(Some(*first));
            } else {
                self.subtree.insert(pattern.name.clone(), index);
            }
        }
        self.values.push(value);
        duplicate.map(|first| Duplicate { existing: &self.values[first] })
    }

    /// The most specific entry covering `name` (normalized): the exact name first, then the
    /// nearest parent with a subdomain entry.
    pub fn lookup(&self, name: &str) -> Option<&V> {
        if let Some(index) = self.exact.get(name) {
            return Some(&self.values[*index]);
        }
        if self.subtree.is_empty() {
            return None;
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(index) = self.subtree.get(rest) {
                return Some(&self.values[*index]);
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> DomainTable<String> {
        let mut t = DomainTable::default();
        for p in patterns {
            t.insert(&DomainPattern::parse(p).unwrap(), (*p).to_owned());
        }
        t
    }

    #[test]
    fn scopes_cover_what_they_say_and_no_more() {
        let t = table(&["=host.example", ".sub.example", "both.example"]);
        let cases = [
            ("host.example", Some("=host.example")),
            ("a.host.example", None),
            ("sub.example", None),
            ("a.sub.example", Some(".sub.example")),
            ("a.b.sub.example", Some(".sub.example")),
            ("both.example", Some("both.example")),
            ("x.both.example", Some("both.example")),
            ("notboth.example", None),
            ("example", None),
        ];
        for (name, expected) in cases {
            assert_eq!(t.lookup(name).map(String::as_str), expected, "{name}");
        }
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let t = table(&["example.com", "=mail.example.com", ".dyn.example.com"]);
        assert_eq!(t.lookup("mail.example.com").unwrap(), "=mail.example.com");
        assert_eq!(t.lookup("x.dyn.example.com").unwrap(), ".dyn.example.com");
        assert_eq!(t.lookup("www.example.com").unwrap(), "example.com");
    }

    #[test]
    fn patterns_are_normalized_and_validated() {
        assert_eq!(
            DomainPattern::parse("=Mail.Example.COM.").unwrap(),
            DomainPattern { name: "mail.example.com".into(), scope: Scope::Exact }
        );
        assert_eq!(DomainPattern::parse(".bücher.example").unwrap().name, "xn--bcher-kva.example");
        for bad in ["", "=", ".", "..example", "a b.example", "under_score.example"] {
            let err = DomainPattern::parse(bad).unwrap_err();
            assert!(err.contains("=host.example"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn duplicates_keep_the_first_value() {
        let mut t = DomainTable::default();
        assert!(t.insert(&DomainPattern::parse("example.com").unwrap(), 1).is_none());
        let dup = t.insert(&DomainPattern::parse("=example.com").unwrap(), 2);
        assert_eq!(dup, Some(Duplicate { existing: &1 }));
        assert_eq!(t.lookup("example.com"), Some(&1));
        // A new scope for the same name is not a duplicate.
        let mut t = DomainTable::default();
        t.insert(&DomainPattern::parse("=example.com").unwrap(), 1);
        assert!(t.insert(&DomainPattern::parse(".example.com").unwrap(), 2).is_none());
        assert_eq!(t.lookup("example.com"), Some(&1));
        assert_eq!(t.lookup("a.example.com"), Some(&2));
    }
}
