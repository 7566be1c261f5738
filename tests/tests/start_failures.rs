//! The real binary's start-up failing before it attaches: it must say why, exit non-zero, and
//! leave the pin directory as it found it.

use std::process::Command;

use helo_agent::blocklist::{Blocklist, Ttl};
use helo_agent::clock::boot_ns;
use helo_agent::config::MapSizes;
use helo_agent::ebpf::{self, LoadOptions, PinnedMaps};
use tests::{PinDir, agent_bin, require_root, unique};

/// `helo-agent run --iface <missing>` with this test's config; the exit code and stderr.
fn run_on_missing_interface(pin_dir: &PinDir) -> (Option<i32>, String) {
    let config = pin_dir.config("");
    let iface = unique("hfnone");
    let out = Command::new(agent_bin())
        .arg("--config")
        .arg(&config)
        .arg("--pin-dir")
        .arg(pin_dir.path())
        .args(["run", "--iface", &iface, "--listen", "127.0.0.1:0"])
        .output()
        .expect("helo-agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&format!("no network interface named {iface:?}")),
        "the error names the missing interface:\n{stderr}"
    );
    (out.status.code(), stderr)
}

fn pins(pin_dir: &PinDir) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir.path()) else { return Vec::new() };
    let mut names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A start with a bad `--iface` left the ban and counter maps it had just created pinned: the
/// pin directory of an agent that never ran filled with empty maps.
#[test]
fn a_start_on_a_missing_interface_leaves_no_pins_behind() {
    require_root();
    let pin_dir = PinDir::new();
    assert!(!pin_dir.path().exists());
    let (code, stderr) = run_on_missing_interface(&pin_dir);
    assert_eq!(code, Some(1), "exits 1:\n{stderr}");
    assert_eq!(pins(&pin_dir), Vec::<String>::new(), "nothing pinned:\n{stderr}");
    assert!(!pin_dir.path().exists(), "the pin directory it created is gone too");
}

/// Maps pinned before the failed start, and the bans in them, are left alone.
#[test]
fn a_failed_start_never_touches_maps_pinned_before() {
    require_root();
    let pin_dir = PinDir::new();
    {
        let mut program = ebpf::load(&LoadOptions {
            pin_dir: pin_dir.path(),
            sizes: MapSizes::default(),
            ports: &helo_common::DEFAULT_PORTS,
            allow: &[],
            passes: helo_agent::config::PassSizes::UNUSED,
        })
        .expect("load");
        program.keep_pins();
        let mut bans = Blocklist::new(PinnedMaps::open(pin_dir.path()).expect("pinned maps"));
        bans.ban(&"203.0.113.9".parse().unwrap(), Ttl::Forever, "kept", boot_ns()).unwrap();
    }
    let before = pins(&pin_dir);
    assert!(before.contains(&helo_common::maps::BANS_V4.to_owned()), "{before:?}");
    let (code, stderr) = run_on_missing_interface(&pin_dir);
    assert_eq!(code, Some(1), "exits 1:\n{stderr}");
    assert_eq!(pins(&pin_dir), before, "the same pins:\n{stderr}");
    let bans = Blocklist::new(PinnedMaps::open(pin_dir.path()).expect("pinned maps"));
    let listed = bans.list(boot_ns()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].target.as_str(), listed[0].reason.as_str()), ("203.0.113.9", "kept"));
}
