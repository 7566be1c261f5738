//! Arbitrary TOML through config validation: an error or a config, never a panic.
#![no_main]

use std::path::Path;

use helo_agent::config::{Config, HostFacts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Rule files named in the config must not be read from the fuzzer's disk.
    if text.contains("_file") {
        return;
    }
    if let Err(error) = Config::parse(text, Path::new("fuzz.toml"), &HostFacts::default()) {
        assert!(
            error.to_string().starts_with("config file fuzz.toml")
                || error.to_string().contains("rules.")
        );
    }
});
