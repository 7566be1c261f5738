//! Developer tasks for helo-filter: `cargo xtask setup | build-ebpf | run | test | clippy | fuzz |
//! bench | package`.
//!
//! Build logic lives in helo-agent's build.rs (the eBPF object is built and embedded there);
//! this crate installs what a fresh Debian machine lacks and runs the suites.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod package;

const APT_PACKAGES: &[&str] = &[
    // bpf-linker, built against LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // The root suites: ip, nsenter, mount; a real MTA and a real client; nft for transparent mode.
    "iproute2",
    "util-linux",
    "mount",
    "postfix",
    "swaks",
    "nftables",
    // STARTTLS end to end: swaks --tls, and openssl to make the test MTA's certificate.
    "libio-socket-ssl-perl",
    "libnet-ssleay-perl",
    "openssl",
    // `helo-agent top` under a terminal: the root suite reads its screen.
    "tmux",
    // The DNS checks against a real resolver serving a test zone.
    "dnsmasq-base",
    // Fleet bans shared through a real Redis (the fleet suite and bench).
    "redis-server",
    // cargo xtask bench: the peers and the load tools, and a font for the plots.
    "haproxy",
    "hping3",
    "ipset",
    "iptables",
    "fonts-dejavu-core",
    // bench bots: Postfix + fail2ban as admins run it; bench flood: xdp-trafficgen (live frames)
    // and ethtool -S (where the frames a filter never saw were lost).
    "fail2ban",
    "xdp-tools",
    "ethtool",
    // cargo xtask package: dpkg-shlibdeps for cargo-deb's $auto Depends (and strip, through
    // binutils). Its root test: man, lintian on the .deb, systemd-analyze verify on the unit
    // (which needs no running systemd).
    "dpkg-dev",
    "man-db",
    "lintian",
    "systemd",
];
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "helo-filter developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (idempotent): LLVM 22 packages, rust-src for nightly,
    /// bpf-linker 0.13, cargo-fuzz, cargo-deb, postfix/swaks/nftables for the suites, lintian
    /// and systemd-analyze for the package's, and a bpffs at /sys/fs/bpf.
    Setup,
    /// Build the XDP object alone into target/bpfel-unknown-none/release/helo-ebpf.
    BuildEbpf,
    /// Build the agent (release) and run it as root on embedded defaults (`--no-config`, even
    /// where the package installed /etc/helo-filter/helo-filter.toml; not when `--config`
    /// follows `--` or HELO_FILTER_CONFIG is set); arguments after `--` go to `helo-agent run`
    /// (for example `-- --iface eth1`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every test: unit tests, then the Debian package, then the root suites in tests/ (XDP
    /// verdicts, network namespaces, the package installed with dpkg), then the fuzz targets.
    Test {
        /// Passed to the test binaries (for example a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Clippy with -D warnings on the user crates and on the eBPF crate (BPF target).
    Clippy,
    /// Every benchmark against its peers (HAProxy, nftables, iptables+ipset, a naive regex
    /// loop, direct connections) in one run, as root; writes bench/RESULTS.md and PNG plots.
    /// Section names (xdp, flood, proxy, rules, policy, bots, storm, fleet, dns) run only those.
    Bench {
        /// Where RESULTS.md and the plots go.
        #[arg(long, default_value = "bench")]
        out: String,
        sections: Vec<String>,
    },
    /// Run the cargo-fuzz targets (fuzz/), each for --seconds, from the seed corpora in
    /// fuzz/corpus; new inputs go to a temporary directory, crashes to fuzz/artifacts.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// One target only (smtp_session, helo_rules, config, importers, proxy_header).
        target: Option<String>,
    },
    /// Build the Debian package (target/package/helo-filter_<version>_<arch>.deb) with
    /// cargo-deb: the agent (release), its config as a conffile, the systemd unit, man pages,
    /// shell completions.
    Package,
}

const FUZZ_TARGETS: &[&str] = &[
    "smtp_session",
    "helo_rules",
    "config",
    "importers",
    "proxy_header",
    "policy_request",
    "fleet_message",
];
/// Seconds each fuzz target runs inside `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u32 = 10;

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => {
            ensure_setup()?;
            build_ebpf()
        }
        Task::Run { args } => {
            ensure_setup()?;
            step("building helo-agent (release)");
            cargo(&["build", "--release", "--package", "helo-agent"])?;
            let bin = workspace().join("target/release/helo-agent");
            // The embedded defaults, as promised, even where the package installed
            // /etc/helo-filter/helo-filter.toml (the agent's default then): unless a config is
            // asked for (--config after --, or HELO_FILTER_CONFIG).
            let chosen = args.iter().any(|a| a == "--config" || a.starts_with("--config="))
                || std::env::var_os("HELO_FILTER_CONFIG").is_some_and(|v| !v.is_empty());
            let defaults: &[&str] = if chosen { &[] } else { &["--no-config"] };
            step(&format!(
                "running {} {}run {}",
                bin.display(),
                defaults.iter().map(|d| format!("{d} ")).collect::<String>(),
                args.join(" ")
            ));
            let status = Command::new(&bin).args(defaults).arg("run").args(&args).status()?;
            if !status.success() {
                bail!("helo-agent exited with {status}");
            }
            Ok(())
        }
        Task::Test { args } => test(&args),
        Task::Bench { out, sections } => {
            ensure_setup()?;
            if !is_root() {
                bail!(
                    "the benchmarks load XDP programs and create namespaces: run `sudo -E cargo xtask bench`"
                );
            }
            step("building helo-agent and the bench runner (release)");
            cargo(&["build", "--release", "--package", "helo-agent", "--package", "bench"])?;
            let root = workspace();
            step("running the benchmarks (about 12 minutes; progress below)");
            let status = Command::new(root.join("target/release/bench"))
                .arg("--out")
                .arg(root.join(&out))
                .args(&sections)
                .env("HELO_AGENT_BIN", root.join("target/release/helo-agent"))
                .current_dir(&root)
                .status()?;
            if !status.success() {
                bail!("the benchmarks failed ({status})");
            }
            Ok(())
        }
        Task::Package => {
            ensure_setup()?;
            package::package().map(drop)
        }
        Task::Clippy => {
            ensure_setup()?;
            clippy()
        }
        Task::Fuzz { seconds, target } => {
            ensure_setup()?;
            let targets: Vec<&str> = match &target {
                Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t.as_str()],
                Some(t) => bail!("no fuzz target {t:?}: choose one of {FUZZ_TARGETS:?}"),
                None => FUZZ_TARGETS.to_vec(),
            };
            fuzz(&targets, seconds)
        }
    }
}

fn cargo_fuzz_ok() -> bool {
    output("cargo", &["fuzz", "--version"]).is_some()
}

fn cargo_deb_ok() -> bool {
    output("cargo", &["deb", "--version"])
        .is_some_and(|v| v.split_whitespace().any(|w| w == package::CARGO_DEB_VERSION))
}

/// Runs each target for `seconds` from its committed seeds; fails on any crash.
fn fuzz(targets: &[&str], seconds: u32) -> anyhow::Result<()> {
    step("building the fuzz targets (nightly, AddressSanitizer)");
    run(Command::new("cargo").args(["+nightly", "fuzz", "build", "-O"]))?;
    for target in targets {
        step(&format!("fuzzing {target} for {seconds} s"));
        let scratch =
            std::env::temp_dir().join(format!("helo-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let seeds = workspace().join("fuzz/corpus").join(target);
        let result = run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "-O", target])
            .arg(&scratch)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
                "-print_funcs=0",
            ]));
        let _ = std::fs::remove_dir_all(&scratch);
        result.with_context(|| {
            format!("fuzz target {target} found a crash: the input is in fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn step(message: &str) {
    eprintln!("==> {message}");
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs a command from the workspace root, with its output streaming through.
fn run(command: &mut Command) -> anyhow::Result<()> {
    command.current_dir(workspace());
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output("dpkg-query", &["-W", "-f=${Status}", pkg])
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect()
}

fn has_rust_src() -> bool {
    output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])
        .is_some_and(|list| list.lines().any(|l| l.starts_with("rust-src")))
}

fn bpf_linker_ok() -> bool {
    output("bpf-linker", &["--version"])
        .is_some_and(|v| v.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")))
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    })
}

/// The unprivileged user the agent drops to (agent.user's default).
const AGENT_USER: &str = "helo-filter";

fn agent_user_exists() -> bool {
    std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.split(':').next() == Some(AGENT_USER)))
}

fn setup_complete() -> bool {
    agent_user_exists()
        && missing_packages().is_empty()
        && has_rust_src()
        && bpf_linker_ok()
        && bpffs_mounted()
        && cargo_fuzz_ok()
        && cargo_deb_ok()
}

/// Runs `setup` when anything is missing; other tasks call this first.
fn ensure_setup() -> anyhow::Result<()> {
    if setup_complete() { Ok(()) } else { setup() }
}

fn setup() -> anyhow::Result<()> {
    let packages = missing_packages();
    if packages.is_empty() {
        step("apt packages: all present");
    } else {
        if !is_root() {
            bail!(
                "missing apt packages {packages:?}; install them as root: \
                 `sudo apt-get update && sudo apt-get install -y {}`, or run `sudo -E cargo xtask setup`",
                packages.join(" ")
            );
        }
        step(&format!("installing apt packages: {}", packages.join(" ")));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    if output("rustup", &["toolchain", "list"]).is_none_or(|l| !l.contains("nightly")) {
        bail!(
            "no nightly toolchain: the eBPF crate needs one (`rustup toolchain install nightly \
             --component rust-src`)"
        );
    }
    if has_rust_src() {
        step("rust-src for nightly: present");
    } else {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if bpf_linker_ok() {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 4 minutes the first time)"
        ));
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", &format!("^{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
        if !bpf_linker_ok() {
            bail!(
                "bpf-linker was installed but `bpf-linker --version` does not answer: is ~/.cargo/bin on PATH?"
            );
        }
    }

    if cargo_fuzz_ok() {
        step("cargo-fuzz: present");
    } else {
        step("installing cargo-fuzz (about 1 minute the first time)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }

    if cargo_deb_ok() {
        step(&format!("cargo-deb {}: present", package::CARGO_DEB_VERSION));
    } else {
        step(&format!(
            "installing cargo-deb {} (about 2 minutes the first time)",
            package::CARGO_DEB_VERSION
        ));
        run(Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            &format!("={}", package::CARGO_DEB_VERSION),
        ]))?;
        if !cargo_deb_ok() {
            bail!(
                "cargo-deb was installed but `cargo deb --version` does not name {}: is \
                 ~/.cargo/bin on PATH?",
                package::CARGO_DEB_VERSION
            );
        }
    }

    if agent_user_exists() {
        step(&format!("system user {AGENT_USER}: present"));
    } else if is_root() {
        step(&format!(
            "creating the system user {AGENT_USER} (the agent drops to it after start-up)"
        ));
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            AGENT_USER,
        ]))?;
    } else {
        bail!(
            "no user {AGENT_USER}: create it as root with `sudo useradd --system --no-create-home \
             --shell /usr/sbin/nologin {AGENT_USER}`"
        );
    }

    if bpffs_mounted() {
        step(&format!("bpffs at {BPFFS}: mounted"));
    } else if is_root() {
        step(&format!("mounting bpffs at {BPFFS}"));
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    } else {
        bail!("no bpffs at {BPFFS}: mount it as root with `sudo mount -t bpf bpf {BPFFS}`");
    }
    step("setup complete");
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    step("building helo-ebpf for bpfel-unknown-none");
    run(Command::new("cargo").args([
        "+nightly",
        "build",
        "--package",
        "helo-ebpf",
        "--bin",
        "helo-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]))?;
    step("object: target/bpfel-unknown-none/release/helo-ebpf");
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ensure_setup()?;
    step("unit tests (helo-common, helo-agent, xtask)");
    let mut unit = vec!["test", "--workspace", "--exclude", "tests", "--exclude", "helo-ebpf"];
    if !args.is_empty() {
        unit.push("--");
        unit.extend(&args);
    }
    cargo(&unit)?;
    if !is_root() {
        bail!(
            "unit tests passed; the root suites (XDP in the kernel, network namespaces) need root: \
             run `sudo -E cargo xtask test`"
        );
    }
    step("building the agent for the root suites");
    cargo(&["build", "--package", "helo-agent"])?;
    step("building the Debian package for the root suite that installs it");
    let deb = package::package()?;
    step("root suites: XDP verdicts (BPF_PROG_TEST_RUN) and end to end in network namespaces");
    let bin = workspace().join("target/debug/helo-agent");
    let mut root = vec!["test", "--package", "tests", "--no-fail-fast", "--"];
    root.extend(&args);
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&root)
        .env("HELO_AGENT_BIN", bin)
        .env("HELO_DEB", deb))?;
    step(&format!("fuzzing, {FUZZ_SECONDS_IN_TEST} s a target (longer: cargo xtask fuzz)"));
    fuzz(FUZZ_TARGETS, FUZZ_SECONDS_IN_TEST)
}

fn clippy() -> anyhow::Result<()> {
    step("clippy: user crates and tests");
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "helo-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("clippy: helo-ebpf for the BPF target");
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "--package",
        "helo-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))
}
