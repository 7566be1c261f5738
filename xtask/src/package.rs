//! `cargo xtask package`: the Debian package, built with dpkg-deb (no cargo-deb to install).
//!
//! The agent is built in release (its build script embeds the XDP object), then asked for its
//! own man pages and shell completions (`helo-agent generate`: xtask cannot depend on the agent
//! crate, whose build needs bpf-linker, which `setup` installs). The files are laid out under
//! target/package/debian/helo-filter with the maintainer scripts of packaging/debian, `Depends`
//! comes from dpkg-shlibdeps, and dpkg-deb builds the .deb with root as every file's owner.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, output, run, step, workspace};

pub const PACKAGE: &str = "helo-filter";
/// The Debian revision after the upstream (workspace) version.
const REVISION: &str = "1";
/// Where the package puts the agent; the systemd unit must start this one.
pub const BINARY: &str = "/usr/sbin/helo-agent";
/// The conffile, from helo-agent/helo-filter.example.toml.
pub const CONFFILE: &str = "/etc/helo-filter/helo-filter.toml";
const UNIT: &str = "/usr/lib/systemd/system/helo-agent.service";
const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];
/// Installed because the postinst runs useradd; priority required, so always present anyway.
const SCRIPT_DEPENDS: &str = "passwd";

/// Builds the package; returns the path of the .deb.
pub fn package() -> anyhow::Result<PathBuf> {
    let root = workspace();
    step("building helo-agent (release, with the embedded XDP object)");
    cargo(&["build", "--release", "--package", "helo-agent"])?;
    let agent = root.join("target/release/helo-agent");

    let work = root.join("target/package");
    let tree = work.join("debian").join(PACKAGE);
    if tree.exists() {
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove the old tree {}", tree.display()))?;
    }
    step(&format!("laying out {}", tree.display()));
    let binary = install(&agent, &tree, BINARY, 0o755)?;
    if output("strip", &["--version"]).is_some() {
        run(Command::new("strip").arg("--strip-unneeded").arg(&binary))?;
    }
    // 0640: it may hold a password (fleet.redis); the postinst gives its group to the agent.
    install(&root.join("helo-agent/helo-filter.example.toml"), &tree, CONFFILE, 0o640)?;
    install(&root.join("packaging/helo-agent.service"), &tree, UNIT, 0o644)?;
    let doc = "/usr/share/doc/helo-filter";
    install(&root.join("README.md"), &tree, &format!("{doc}/README.md"), 0o644)?;
    install(
        &root.join("packaging/grafana-dashboard.json"),
        &tree,
        &format!("{doc}/examples/grafana-dashboard.json"),
        0o644,
    )?;
    write(&tree, &format!("{doc}/copyright"), &copyright(), 0o644)?;

    // Man pages and completions, from the binary just built.
    let generated = work.join("generated");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)?;
    }
    for what in ["man", "completions"] {
        run(Command::new(&agent)
            .args(["generate", what, "--out"])
            .arg(generated.join(what))
            .stdout(std::process::Stdio::null()))?;
    }
    for page in sorted_files(&generated.join("man"))? {
        let name = page.file_name().and_then(|n| n.to_str()).context("a page's name")?;
        let section = name.rsplit('.').next().context("a page's section")?;
        let target = install(&page, &tree, &format!("/usr/share/man/man{section}/{name}"), 0o644)?;
        // Debian policy: pages compressed with gzip -9n (no name, no time stamp).
        run(Command::new("gzip").args(["-9n", "--force"]).arg(&target))?;
    }
    let completions = generated.join("completions");
    for (file, target) in [
        ("helo-agent.bash", "/usr/share/bash-completion/completions/helo-agent"),
        ("_helo-agent", "/usr/share/zsh/vendor-completions/_helo-agent"),
        ("helo-agent.fish", "/usr/share/fish/vendor_completions.d/helo-agent.fish"),
    ] {
        install(&completions.join(file), &tree, target, 0o644)?;
    }

    step("control files (Depends from dpkg-shlibdeps)");
    for script in MAINTAINER_SCRIPTS {
        install(
            &root.join("packaging/debian").join(script),
            &tree,
            &format!("/DEBIAN/{script}"),
            0o755,
        )?;
    }
    write(&tree, "/DEBIAN/conffiles", &format!("{CONFFILE}\n"), 0o644)?;
    let md5sums = md5sums(&tree)?;
    write(&tree, "/DEBIAN/md5sums", &md5sums, 0o644)?;
    let depends = shlib_depends(&work, &binary)?;
    let control = control(&depends, installed_size_kib(&tree)?)?;
    write(&tree, "/DEBIAN/control", &control, 0o644)?;

    let deb = work.join(format!("{PACKAGE}_{}_{}.deb", version(), architecture()?));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(&deb))?;
    step(&format!("package: {}", deb.display()));
    Ok(deb)
}

fn version() -> String {
    format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"))
}

fn architecture() -> anyhow::Result<String> {
    output("dpkg", &["--print-architecture"])
        .map(|a| a.trim().to_owned())
        .context("`dpkg --print-architecture` does not answer: build the package on Debian")
}

/// Copies `from` to `tree` + `to` with `mode`; returns the new path.
fn install(from: &Path, tree: &Path, to: &str, mode: u32) -> anyhow::Result<PathBuf> {
    let target = tree.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("a file in a directory"))?;
    std::fs::copy(from, &target)
        .with_context(|| format!("cannot copy {} to {}", from.display(), target.display()))?;
    set_mode(&target, mode)?;
    Ok(target)
}

fn write(tree: &Path, to: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    let target = tree.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("a file in a directory"))?;
    std::fs::write(&target, text).with_context(|| format!("cannot write {}", target.display()))?;
    set_mode(&target, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn sorted_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    Ok(files)
}

/// Every file under `dir`, relative to `tree`, DEBIAN/ left out, sorted.
fn payload(tree: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for path in sorted_files(dir)? {
        if path == tree.join("DEBIAN") {
            continue;
        }
        if path.is_dir() {
            payload(tree, &path, files)?;
        } else {
            files.push(path.strip_prefix(tree).expect("under the tree").to_owned());
        }
    }
    Ok(())
}

/// DEBIAN/md5sums, for `dpkg --verify`.
fn md5sums(tree: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    payload(tree, tree, &mut files)?;
    let out = Command::new("md5sum")
        .args(&files)
        .current_dir(tree)
        .output()
        .context("cannot run md5sum")?;
    if !out.status.success() {
        bail!("md5sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let mut files = Vec::new();
    payload(tree, tree, &mut files)?;
    let mut kib = 0;
    for file in files {
        kib += std::fs::metadata(tree.join(file))?.len().div_ceil(1024);
    }
    Ok(kib)
}

/// `Depends` for the binary's shared libraries, with the versions their symbols need.
fn shlib_depends(work: &Path, binary: &Path) -> anyhow::Result<String> {
    // dpkg-shlibdeps reads debian/control for the package's name; this one is enough.
    std::fs::write(
        work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let out = Command::new("dpkg-shlibdeps")
        .arg("-O")
        .arg(format!("-e{}", binary.strip_prefix(work).expect("under target/package").display()))
        .current_dir(work)
        .output()
        .context("cannot run dpkg-shlibdeps (apt-get install dpkg-dev)")?;
    if !out.status.success() {
        bail!("dpkg-shlibdeps failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let libs = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;
    Ok(format!("{libs}, {SCRIPT_DEPENDS}"))
}

fn control(depends: &str, installed_kib: u64) -> anyhow::Result<String> {
    Ok(format!(
        "Package: {PACKAGE}
Version: {version}
Architecture: {arch}
Maintainer: helo-filter maintainers <root@localhost>
Installed-Size: {installed_kib}
Depends: {depends}
Suggests: postfix | mail-transport-agent
Section: mail
Priority: optional
Description: SMTP HELO filter with kernel (XDP) bans for mail gateways
 helo-agent is a transparent SMTP proxy in front of the MTA (or a Postfix policy
 service): it judges each client's HELO/EHLO name with qmail badhelo and Postfix
 access rules and built-in checks, rejects forged names qmail-style, and bans
 the sender. Bans live in pinned BPF maps; an XDP program on the ingress
 interface drops a banned source's new connections to the SMTP ports.
 .
 Nothing is started on installation: see helo-agent(8), then
 `systemctl enable --now helo-agent`.
",
        version = version(),
        arch = architecture()?,
    ))
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: helo-filter

Files: *
Copyright: the helo-filter authors
License: MIT or Apache-2.0
"
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit starts the binary where the package puts it, on the package's config.
    #[test]
    fn the_unit_names_the_installed_paths() {
        let unit = std::fs::read_to_string(workspace().join("packaging/helo-agent.service"))
            .expect("packaging/helo-agent.service");
        for line in unit.lines().filter(|l| l.starts_with("Exec") && l.contains("helo-agent ")) {
            assert!(line.contains(&format!("={BINARY} --config {CONFFILE} ")), "{line}");
        }
        assert!(unit.contains(&format!("ExecStart={BINARY} ")), "{unit}");
    }

    /// The config the package installs points at the directories the package and its unit
    /// make: the snapshot in the state directory, the control socket in the runtime one.
    #[test]
    fn the_conffile_paths_suit_an_installed_system() {
        let config =
            std::fs::read_to_string(workspace().join("helo-agent/helo-filter.example.toml"))
                .expect("the example config");
        let unit =
            std::fs::read_to_string(workspace().join("packaging/helo-agent.service")).unwrap();
        assert!(config.contains("\nsnapshot = \"/var/lib/helo-filter/"), "bans.snapshot");
        assert!(unit.contains("\nStateDirectory=helo-filter\n"), "{unit}");
        assert!(config.contains("\ncontrol_socket = \"/run/helo-filter/"), "agent.control_socket");
        assert!(unit.contains("\nRuntimeDirectory=helo-filter\n"), "{unit}");
        assert!(config.contains("\nuser = \"helo-filter\"\n"), "agent.user is the postinst's user");
        let postinst =
            std::fs::read_to_string(workspace().join("packaging/debian/postinst")).unwrap();
        assert!(postinst.contains("AGENT_USER=helo-filter\n"), "{postinst}");
    }
}
