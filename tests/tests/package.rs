//! The Debian package on this very machine, as an admin meets it: `dpkg -i` (files in place,
//! the user, the state directory, nothing started), the installed binary, its man pages, config
//! and systemd unit (`systemd-analyze verify`); a reinstall that keeps the edited config;
//! `dpkg -r` (config and state stay, binary goes); `dpkg -P` (config, state and the admin's
//! `systemctl enable` go). A guard purges the package, and puts back what it set aside, also
//! when the test fails. And the package as Debian's lintian judges it: no error, no warning,
//! every override still needed and explained.
//!
//! `cargo xtask test` builds the package and names it in HELO_DEB.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::{require_root, unique};

const PACKAGE: &str = "helo-filter";
const CONFFILE: &str = "/etc/helo-filter/helo-filter.toml";
const STATE_DIR: &str = "/var/lib/helo-filter";
const USER: &str = "helo-filter";
const BINARY: &str = "/usr/sbin/helo-agent";
const UNIT: &str = "/usr/lib/systemd/system/helo-agent.service";
/// The link `systemctl enable helo-agent` makes (the unit's WantedBy).
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/helo-agent.service";
/// The package's lintian overrides, as installed under /usr/share/lintian/overrides.
const OVERRIDES: &str = include_str!("../../packaging/debian/lintian-overrides");
/// Paths the package owns or makes that may already exist here (a hand install from the README,
/// `cargo xtask run`'s snapshot): set aside for the test, put back after.
const SET_ASIDE: &[&str] = &["/etc/helo-filter", STATE_DIR];

/// Runs a command to completion, never reading stdin (dpkg must not prompt).
fn command(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dpkg, waiting (up to 2 minutes) while another dpkg or apt holds its lock.
fn dpkg(args: &[&str]) -> Output {
    let started = Instant::now();
    loop {
        let out = command("dpkg", args);
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if out.status.success() || !locked || started.elapsed() > Duration::from_secs(120) {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn must(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's status of the package: `install ok installed`, `deinstall ok config-files`, or `None`
/// when dpkg knows nothing of it.
fn status() -> Option<String> {
    let out = command("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !status.is_empty() && !status.ends_with("not-installed"))
        .then_some(status)
}

fn user_exists() -> bool {
    command("getent", &["passwd", USER]).status.success()
}

/// Purges the package when dropped, then puts back what was set aside.
struct Installed {
    aside: Vec<(PathBuf, PathBuf)>,
}

impl Installed {
    fn set_aside() -> Self {
        let mut aside = Vec::new();
        for path in SET_ASIDE {
            let path = Path::new(path);
            if path.exists() {
                let to = path.with_file_name(format!(
                    "{}.{}",
                    path.file_name().unwrap().to_string_lossy(),
                    unique("pkgtest-aside-")
                ));
                std::fs::rename(path, &to).expect("set aside");
                aside.push((path.to_owned(), to));
            }
        }
        Installed { aside }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if status().is_some() {
            let out = dpkg(&["--purge", PACKAGE]);
            if !out.status.success() {
                eprintln!("cleanup: dpkg --purge {PACKAGE} failed:\n{}", text(&out));
            }
        }
        for (path, aside) in &self.aside {
            let _ = std::fs::remove_dir_all(path);
            if let Err(e) = std::fs::rename(aside, path) {
                eprintln!(
                    "cleanup: cannot put {} back from {}: {e}",
                    path.display(),
                    aside.display()
                );
            }
        }
    }
}

fn assert_file(path: &str) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path} is installed: {e}"));
    assert!(meta.is_file(), "{path} is a file");
}

fn gone(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

fn deb() -> String {
    std::env::var("HELO_DEB").expect(
        "HELO_DEB names the .deb to test: `cargo xtask test` builds it (`cargo xtask package` \
         alone prints its path)",
    )
}

/// lintian, as Debian judges a package: no error and no warning (`--fail-on`), and no override
/// that lintian no longer needs (reported at the info level), each override with its reason.
#[test]
fn lintian_finds_nothing_to_fix() {
    let deb = deb();
    let out = command(
        "lintian",
        &["--fail-on", "error,warning", "--display-info", "--no-tag-display-limit", &deb],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let complaints: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.starts_with("E: ")
                || l.starts_with("W: ")
                || l.contains(" unused-override ")
                || l.contains(" mismatched-override ")
        })
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "lintian on {deb}:\n{}\nfix these, or override one with its reason in \
         packaging/debian/lintian-overrides:\n{}",
        text(&out),
        complaints.join("\n")
    );
    // Each override follows a comment that says why.
    let mut explained = false;
    for line in OVERRIDES.lines() {
        if line.starts_with('#') {
            explained = line.len() > 2;
        } else if !line.trim().is_empty() {
            assert!(explained, "the override {line:?} needs a comment above it saying why");
            explained = false;
        }
    }
}

#[test]
fn the_package_installs_keeps_the_edited_config_and_purges() {
    require_root();
    let deb = deb();
    assert!(
        status().is_none(),
        "{PACKAGE} is installed on this machine ({:?}): the test would remove it; `dpkg -P \
         {PACKAGE}` first",
        status()
    );
    let user_before = user_exists();
    let _installed = Installed::set_aside();

    // Install.
    let out = must(dpkg(&["--install", &deb]), "dpkg -i");
    assert!(
        out.contains("nothing was enabled or started") && out.contains("systemctl enable --now"),
        "the first install says the admin starts it:\n{out}"
    );
    assert_eq!(status().as_deref(), Some("install ok installed"));
    for path in [
        BINARY,
        CONFFILE,
        UNIT,
        "/usr/share/man/man8/helo-agent.8.gz",
        "/usr/share/man/man8/helo-agent-run.8.gz",
        "/usr/share/man/man8/helo-agent-check-config.8.gz",
        "/usr/share/man/man5/helo-filter.toml.5.gz",
        "/usr/share/bash-completion/completions/helo-agent",
        "/usr/share/zsh/vendor-completions/_helo-agent",
        "/usr/share/fish/vendor_completions.d/helo-agent.fish",
        "/usr/share/doc/helo-filter/copyright",
        "/usr/share/doc/helo-filter/changelog.Debian.gz",
        "/usr/share/lintian/overrides/helo-filter",
        "/usr/share/doc/helo-filter/examples/grafana-dashboard.json",
    ] {
        assert_file(path);
    }
    let mode = std::fs::metadata(BINARY).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755, "{BINARY} mode");
    let config = std::fs::metadata(CONFFILE).unwrap();
    let group = must(command("id", &["-g", USER]), "id -g");
    assert_eq!(
        (config.uid(), config.gid().to_string(), config.mode() & 0o7777),
        (0, group.trim().to_owned(), 0o640),
        "{CONFFILE}: root, the agent's group, 0640 (it may hold a Redis password)"
    );
    let conffiles = must(command("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]), "conffiles");
    assert!(conffiles.contains(CONFFILE), "{CONFFILE} is a conffile: {conffiles}");
    let shipped = include_str!("../../helo-agent/helo-filter.example.toml");
    assert_eq!(
        std::fs::read_to_string(CONFFILE).unwrap(),
        shipped,
        "the example, comments and all"
    );
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains(&format!("ExecStart={BINARY} --config {CONFFILE} run")), "{unit}");
    // cargo-deb ships no md5sums; dpkg computes them at unpack, so --verify has them to check.
    let sums = std::fs::read_to_string(format!("/var/lib/dpkg/info/{PACKAGE}.md5sums"))
        .expect("dpkg recorded the package's md5sums");
    assert!(sums.contains("  usr/sbin/helo-agent\n"), "{sums}");
    must(command("dpkg", &["--verify", PACKAGE]), "dpkg --verify");

    // The installed unit as systemd reads it (no running systemd needed): its directives, the
    // commands it runs and the man pages it names. A directive systemd does not know is only a
    // message on stderr, so silence is the pass.
    let out = command("systemd-analyze", &["verify", UNIT]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {UNIT}:\n{}",
        text(&out)
    );

    // The binary, its pages and the installed config.
    let version = must(command(BINARY, &["--version"]), "helo-agent --version");
    assert_eq!(version.trim(), format!("helo-agent {}", env!("CARGO_PKG_VERSION")));
    let page = must(command("man", &["-w", "helo-agent"]), "man -w helo-agent");
    assert_eq!(page.trim(), "/usr/share/man/man8/helo-agent.8.gz");
    let page = must(command("man", &["-w", "helo-agent-run"]), "man -w helo-agent-run");
    assert_eq!(page.trim(), "/usr/share/man/man8/helo-agent-run.8.gz");
    let page = must(command("man", &["-w", "5", "helo-filter.toml"]), "man -w 5 helo-filter.toml");
    assert_eq!(page.trim(), "/usr/share/man/man5/helo-filter.toml.5.gz");
    let out = Command::new("man")
        .args(["5", "helo-filter.toml"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man runs");
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains("bans.default_ttl") && rendered.contains("xdp.interface"),
        "helo-filter.toml(5) renders the keys:\n{}",
        text(&out)
    );
    let checked = must(command(BINARY, &["check-config", CONFFILE]), "check-config");
    assert!(checked.starts_with(&format!("config ok: {CONFFILE}")), "{checked}");

    // The user and the state directory.
    let passwd = must(command("getent", &["passwd", USER]), "getent passwd");
    assert!(
        passwd.trim_end().ends_with(":/usr/sbin/nologin"),
        "a system user with no shell: {passwd}"
    );
    assert!(gone(ENABLED), "the install enables nothing");
    let uid: u32 = passwd.split(':').nth(2).unwrap().parse().unwrap();
    let state = std::fs::metadata(STATE_DIR).expect("the state directory");
    assert!(state.is_dir());
    assert_eq!((state.uid(), state.mode() & 0o7777), (uid, 0o750), "{STATE_DIR}: owner, mode");

    // The admin edits the config (and points it at a pin directory of this test's own, so the
    // prerm's detach cannot touch a real agent's maps); the state directory fills.
    let pin_dir = format!("/sys/fs/bpf/{}", unique("helo-pkgtest-"));
    let edited = shipped.replace(
        "pin_dir = \"/sys/fs/bpf/helo-filter\"",
        &format!("pin_dir = \"{pin_dir}\" # edited by the package test"),
    );
    assert_ne!(edited, shipped, "the example sets xdp.pin_dir");
    std::fs::write(CONFFILE, &edited).unwrap();

    // Issue 30: the installed config is every command's default: `check-config` with no
    // argument checks it, and `list` looks for the maps in the pin directory it names (no
    // agent runs: the error names it); --no-config reads the embedded defaults instead.
    let checked = must(command(BINARY, &["check-config"]), "check-config with no argument");
    assert!(checked.starts_with(&format!("config ok: {CONFFILE}")), "{checked}");
    let listed = text(&command(BINARY, &["list"]));
    assert!(listed.contains(&pin_dir), "list reads the installed config: {listed}");
    let listed = text(&command(BINARY, &["--no-config", "list"]));
    assert!(!listed.contains(&pin_dir), "--no-config: the embedded defaults: {listed}");
    std::fs::write(Path::new(STATE_DIR).join("bans.json"), "{}").unwrap();

    // The admin enables the agent (systemctl works on the files with no systemd running).
    must(command("systemctl", &["enable", "helo-agent.service"]), "systemctl enable");
    assert!(!gone(ENABLED), "systemctl enable made {ENABLED}");

    // A reinstall (as an upgrade runs the scripts) keeps the edit, without a prompt.
    must(dpkg(&["--install", &deb]), "dpkg -i again");
    assert_eq!(std::fs::read_to_string(CONFFILE).unwrap(), edited, "the edit survives");
    assert_eq!(std::fs::metadata(CONFFILE).unwrap().mode() & 0o7777, 0o640, "and its mode");

    // Remove: the binary and pages go; the edited config, the state and the user stay.
    let out = dpkg(&["--remove", PACKAGE]);
    must(out, "dpkg -r");
    assert_eq!(status().as_deref(), Some("deinstall ok config-files"));
    for path in [BINARY, "/usr/share/man/man8/helo-agent.8.gz", UNIT] {
        assert!(gone(path), "{path} is removed");
    }
    assert_eq!(std::fs::read_to_string(CONFFILE).unwrap(), edited, "remove keeps the config");
    assert!(Path::new(STATE_DIR).join("bans.json").exists(), "remove keeps the ban snapshot");
    assert!(!Path::new(&pin_dir).exists(), "nothing pinned in {pin_dir}");

    // Purge: config, state and the admin's enable go; the system user stays (Debian policy;
    // see postrm).
    must(dpkg(&["--purge", PACKAGE]), "dpkg -P");
    assert_eq!(status(), None);
    for path in [CONFFILE, "/etc/helo-filter", STATE_DIR, ENABLED] {
        assert!(gone(path), "{path} is purged");
    }
    assert!(gone("/etc/systemd/system/helo-agent.service"), "no mask left behind");
    assert!(user_exists(), "the system user is kept at purge");
    assert!(
        !command("dpkg-statoverride", &["--list", CONFFILE]).status.success(),
        "the config's statoverride is gone"
    );
    if !user_before {
        // Made by this test's install: not ours to keep on a machine that had none.
        let _ = command("userdel", &[USER]);
    }
}
