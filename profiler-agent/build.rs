//! Builds the eBPF object (`profiler-ebpf`) for `bpfel-unknown-none` with
//! aya-build and bpf-linker, so `cargo build` is the only build command.
//!
//! The object is compiled by the pinned stable toolchain with
//! `RUSTC_BOOTSTRAP=1` (needed for `-Z build-std=core`), so no nightly is
//! required. `cargo xtask setup` installs `rust-src` and `bpf-linker`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // cargo-fuzz builds (`--cfg fuzzing`) need no eBPF object: see kernel/load.rs.
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        return Ok(());
    }
    if linting() {
        // Clippy only checks the agent's code, never the object's bytes, and
        // `cargo xtask test` lints the eBPF crate on its own target: an
        // empty object spares a second build of it (~50 s on 2 cores), as
        // clippy's run of this script is a unit apart from a build's.
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("profiler"), b"").context("writing the empty object")?;
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=PROFILER_EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("PROFILER_EBPF_TOOLCHAIN") {
        Ok(toolchain) => toolchain,
        Err(_) => pinned_toolchain()?,
    };
    // SAFETY: build scripts are single-threaded; the variable is only read by
    // the nested cargo invocation aya-build spawns.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    which_bpf_linker()?;
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiler-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "profiler-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF object (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

/// Whether this is `cargo clippy`: cargo tells build scripts of workspace
/// members the wrapper it compiles them through, clippy's driver here.
fn linting() -> bool {
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    std::env::var_os("RUSTC_WORKSPACE_WRAPPER")
        .and_then(|w| {
            std::path::Path::new(&w)
                .file_stem()
                .map(|s| s.to_string_lossy().starts_with("clippy-driver"))
        })
        .unwrap_or(false)
}

/// The `channel` of the workspace's `rust-toolchain.toml`, the one place
/// the toolchain version is stated.
fn pinned_toolchain() -> anyhow::Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../rust-toolchain.toml");
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_string())
        })
        .ok_or_else(|| anyhow!("{path} names no channel"))
}

fn which_bpf_linker() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if std::env::var_os("AYA_BUILD_SKIP").is_some() || found {
        Ok(())
    } else {
        Err(anyhow!(
            "bpf-linker is not on PATH; run `cargo xtask setup` (installs bpf-linker 0.13 with LLVM 22)"
        ))
    }
}
