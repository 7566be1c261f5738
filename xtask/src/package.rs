//! `cargo xtask package`: the Debian package, by cargo-deb from helo-agent's
//! `[package.metadata.deb]`.
//!
//! cargo-deb does what debhelper does for a Debian source package: the control file from the
//! Cargo metadata, `Depends` from dpkg-shlibdeps, stripping, conffiles, md5sums, the compressed
//! changelog, and dh_installsystemd's snippets (deb-systemd-helper, deb-systemd-invoke) put into
//! packaging/debian's maintainer scripts at `#DEBHELPER#`. What it cannot do is run the binary
//! it packages, so xtask builds the agent (release: its build script embeds the XDP object),
//! asks it for its man pages and shell completions (`helo-agent generate`, from the clap
//! definitions and the example config: xtask cannot depend on the agent crate, whose build
//! needs bpf-linker), leaves them where the metadata's assets name them, and runs
//! `cargo deb --no-build`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{cargo, run, step, workspace};

/// The cargo-deb release `cargo xtask setup` installs (`cargo install --locked`); 3.8 builds with
/// rustc 1.85 and later.
pub const CARGO_DEB_VERSION: &str = "3.8.0";
/// Where the metadata's assets look for `helo-agent generate`'s output (cargo-deb reads
/// `target/release/` as the target directory).
const GENERATED: &str = "target/release/generated";
/// Where the .deb goes.
const OUT: &str = "target/package";

/// Builds the package; returns the path of the .deb.
pub fn package() -> anyhow::Result<PathBuf> {
    let root = workspace();
    step("building helo-agent (release, with the embedded XDP object)");
    cargo(&["build", "--release", "--package", "helo-agent"])?;
    let agent = root.join("target/release/helo-agent");

    step("man pages and shell completions, from the binary just built");
    let generated = root.join(GENERATED);
    if generated.exists() {
        std::fs::remove_dir_all(&generated)
            .with_context(|| format!("cannot remove the old {}", generated.display()))?;
    }
    for what in ["man", "completions"] {
        run(Command::new(&agent)
            .args(["generate", what, "--out"])
            .arg(generated.join(what))
            .stdout(Stdio::null()))?;
    }
    // Debian policy: pages compressed with gzip -9n (no name, no time stamp). cargo-deb
    // compresses only the pages it does not count as build products.
    for page in sorted_files(&generated.join("man"))? {
        run(Command::new("gzip").args(["-9n", "--force"]).arg(&page))?;
    }

    step("cargo deb");
    let out = root.join(OUT);
    std::fs::create_dir_all(&out)?;
    // cargo-deb prints the .deb's path on stdout, its progress and warnings on stderr.
    let deb = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--package", "helo-agent", "--no-build", "--output"])
        .arg(&out)
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run `cargo deb`: `cargo xtask setup` installs cargo-deb")?;
    if !deb.status.success() {
        bail!("cargo deb failed with {}", deb.status);
    }
    let deb = String::from_utf8(deb.stdout)?;
    let deb = PathBuf::from(deb.lines().last().context("cargo deb named no .deb")?.trim());
    if !deb.is_file() {
        bail!("cargo deb named {}, which is not a file", deb.display());
    }
    step(&format!("package: {}", deb.display()));
    Ok(deb)
}

fn sorted_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the package puts the agent; the systemd unit must start this one.
    const BINARY: &str = "/usr/sbin/helo-agent";
    /// The conffile, from helo-agent/helo-filter.example.toml.
    const CONFFILE: &str = "/etc/helo-filter/helo-filter.toml";

    fn read(path: &str) -> String {
        std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// helo-agent's `[package.metadata.deb]`, which cargo-deb reads.
    fn metadata() -> toml::Table {
        let manifest: toml::Table =
            read("helo-agent/Cargo.toml").parse().expect("helo-agent/Cargo.toml parses");
        manifest["package"]["metadata"]["deb"].as_table().expect("[package.metadata.deb]").clone()
    }

    fn field(name: &str) -> String {
        metadata()[name].as_str().unwrap_or_else(|| panic!("metadata.deb.{name}")).to_owned()
    }

    /// The absolute path the package installs the asset `source` at (cargo-deb: a destination
    /// ending in `/` is a directory).
    fn installed(source: &str) -> String {
        let metadata = metadata();
        let asset = metadata["assets"]
            .as_array()
            .expect("metadata.deb.assets")
            .iter()
            .map(|a| a.as_array().expect("[source, destination, mode]"))
            .find(|a| a[0].as_str() == Some(source))
            .unwrap_or_else(|| panic!("no asset from {source}"));
        let to = asset[1].as_str().expect("a destination");
        match to.strip_suffix('/') {
            Some(dir) => format!("/{dir}/{}", Path::new(source).file_name().unwrap().display()),
            None => format!("/{to}"),
        }
    }

    /// The unit starts the binary where the package puts it, on the package's config.
    #[test]
    fn the_unit_names_the_installed_paths() {
        assert_eq!(installed("target/release/helo-agent"), BINARY);
        assert_eq!(installed("helo-filter.example.toml"), CONFFILE);
        let unit = read("packaging/helo-agent.service");
        for line in unit.lines().filter(|l| l.starts_with("Exec") && l.contains("helo-agent ")) {
            assert!(line.contains(&format!("={BINARY} --config {CONFFILE} ")), "{line}");
        }
        assert!(unit.contains(&format!("ExecStart={BINARY} ")), "{unit}");
    }

    /// The config the package installs points at the directories the package and its unit
    /// make: the snapshot in the state directory, the control socket in the runtime one.
    #[test]
    fn the_conffile_paths_suit_an_installed_system() {
        let config = read("helo-agent/helo-filter.example.toml");
        let unit = read("packaging/helo-agent.service");
        assert!(config.contains("\nsnapshot = \"/var/lib/helo-filter/"), "bans.snapshot");
        assert!(unit.contains("\nStateDirectory=helo-filter\n"), "{unit}");
        assert!(config.contains("\ncontrol_socket = \"/run/helo-filter/"), "agent.control_socket");
        assert!(unit.contains("\nRuntimeDirectory=helo-filter\n"), "{unit}");
        assert!(config.contains("\nuser = \"helo-filter\"\n"), "agent.user is the postinst's user");
        let postinst = read("packaging/debian/postinst");
        assert!(postinst.contains("AGENT_USER=helo-filter\n"), "{postinst}");
    }

    /// lintian checks the changelog's form; this checks that its latest entry is this version's,
    /// signed by the package's maintainer, whom the copyright file names too.
    #[test]
    fn the_changelog_is_this_versions_by_the_maintainer() {
        let changelog = read("packaging/debian/changelog");
        let version = format!("{}-{}", env!("CARGO_PKG_VERSION"), field("revision"));
        let first = changelog.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("{} ({version}) ", field("name"))),
            "{first:?}: packaging/debian/changelog needs an entry for {version} on top (dch -v {version})"
        );
        let maintainer = field("maintainer");
        let signed = changelog.lines().find(|l| l.starts_with(" -- ")).unwrap_or_default();
        assert!(signed.starts_with(&format!(" -- {maintainer}  ")), "{signed:?}");
        let copyright = read("packaging/debian/copyright");
        assert!(copyright.contains(&format!("\nUpstream-Contact: {maintainer}\n")), "{copyright}");
    }
}
