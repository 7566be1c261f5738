//! Arbitrary qmail badhelo and Postfix access-table text through the importers, and what the
//! badhelo importer yields through the regex index and a match: no panic; errors name the file
//! and line.
#![no_main]

use helo_agent::config::import;
use helo_agent::rules::badhelo::BadheloSet;
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
        if let Err(errors) = import::access_table(&text, "helo_access", parent) {
            assert!(!errors.is_empty());
            for error in errors {
                assert!(error.starts_with("helo_access:"), "{error}");
            }
        }
    }
});
