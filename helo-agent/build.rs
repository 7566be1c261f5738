//! Builds the XDP program (crate `helo-ebpf`) for the BPF target and leaves the object in
//! OUT_DIR, where `src/ebpf.rs` embeds it. Needs the nightly toolchain with `rust-src` and
//! `bpf-linker` on PATH: `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    if which("bpf-linker").is_none() {
        anyhow::bail!(
            "bpf-linker is not on PATH, so the XDP program cannot be built: run `cargo xtask setup` \
             (it installs bpf-linker, LLVM 22 and rust-src for nightly), then build again"
        );
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest).join("../helo-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package { name: "helo-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}
