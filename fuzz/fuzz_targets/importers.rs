//! Arbitrary qmail badhelo and Postfix access-table text through the importers, and what the
//! badhelo importer yields through the regex index and a match: no panic; errors and warnings
//! name the file and line; every access entry is found again by the HELO its key spells.
#![no_main]

use helo_agent::config::import;
use helo_agent::rules::badhelo::BadheloSet;
use helo_agent::rules::helo;
use helo_agent::rules::table::Scope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let rules = import::badhelo(&text, "badhelo");
    if rules.len() <= 64
        && let Ok(set) = BadheloSet::new(rules)
    {
        let _ = set.first_match("mail.example.com");
        let _ = set.first_match(&text);
    }
    for parent in [true, false] {
        let table = import::access_table(&text, "helo_access", parent);
        for line in table.errors.iter().chain(&table.warnings) {
            assert!(line.starts_with("helo_access:"), "{line}");
        }
        for (pattern, entry) in &table.entries {
            if pattern.scope == Scope::Subdomains {
                continue;
            }
            // The key, sent as a HELO, is looked up by the pattern's own text.
            let key = entry.entry.text.split(' ').next().unwrap();
            let parsed = helo::parse(key);
            let looked_up = helo::table_key(&parsed, key);
            assert_eq!(looked_up.as_deref(), Some(pattern.name.as_str()), "{key:?}");
        }
    }
});
