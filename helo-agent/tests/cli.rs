//! The binary as an admin meets it, no root needed: bad input gets a clear message and a
//! non-zero exit, never a panic; `check` and `check-config` answer.

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_helo-agent"))
        .args(["--pin-dir", "/nonexistent/helo-cli-test"])
        .args(args)
        .env_remove("HELO_FILTER_CONFIG")
        .output()
        .expect("helo-agent runs")
}

/// Runs `args`, expects failure with `message` on stderr, and no panic.
fn fails_with(args: &[&str], message: &str) {
    let out = agent(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} exits 1:\n{stderr}");
    assert!(stderr.starts_with("helo-agent: error: "), "{args:?}: {stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn bad_input_gets_a_clear_message_and_exit_1() {
    fails_with(&["ban", "not-an-ip"], "is not an IP address or CIDR");
    fails_with(&["ban", "192.0.2.1", "--ttl", "30"], "write it as 30s, 30m, 30h or 30d");
    fails_with(&["ban", "192.0.2.1", "--ttl", "0s"], "--ttl must be longer than 0s");
    fails_with(&["ban", "192.0.2.0/24"], "allowlist it instead");
    fails_with(&["ban", "127.0.0.1"], "is in the allowlisted network 127.0.0.0/8");
    fails_with(&["ban", "192.0.2.1", "--prefix"], "--prefix applies to IPv6 addresses only");
    fails_with(&["list"], "no pinned helo-filter maps in /nonexistent/helo-cli-test");
    fails_with(&["--config", "/nonexistent/helo.toml", "check", "x"], "cannot read config file");
}

#[test]
fn check_explains_a_verdict_as_json() {
    let out = agent(&["check", "localhost", "--client", "203.0.113.9", "--json"]);
    assert!(out.status.success());
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["verdict"], "ban");
    assert_eq!(verdict["rule"], "localhost");
    assert_eq!(verdict["helo"], "localhost");
    assert_eq!(verdict["ttl"], 3600);
}

#[test]
fn check_config_validates_without_running() {
    let dir = std::env::temp_dir().join(format!("helo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[rules]\ndomains = [\"=spam.example\"]\nregexes = ['^dsl-']\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[rules]\nregexes = ['(open']\n").unwrap();
    let out = agent(&["check-config", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("config ok:") && stdout.contains("1 domain table entries, 1 regex rules"),
        "{stdout}"
    );
    fails_with(&["check-config", bad.to_str().unwrap()], "config rules.regexes:1: bad regex");
    let defaults = agent(&["check-config"]);
    assert!(String::from_utf8_lossy(&defaults.stdout).contains("config ok: <embedded defaults>"));
    std::fs::remove_dir_all(&dir).unwrap();
}
