//! Builds `proxy-ebpf` for the BPF target and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! This is aya-build's `build_ebpf` with one difference: it passes
//! `-C target-cpu=v3`. aya-build 0.2.0 sets CARGO_ENCODED_RUSTFLAGS itself and
//! offers no way to add to them, and the programs need ISA v3 for atomic
//! fetch-and-add (BPF_ATOMIC | BPF_FETCH, kernel ≥ 5.12), which the drain
//! hand-off between the verdict and sock_ops relies on.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

const EBPF_PACKAGE: &str = "proxy-ebpf";
const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("workspace root")?;
    for watched in ["proxy-ebpf", "proxy-common"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;

    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");
    // The test build's eBPF object carries the test-only globals; cargo gives
    // each feature set its own OUT_DIR, so the two objects never mix.
    let test_hooks = env::var_os("CARGO_FEATURE_TEST_HOOKS").is_some();
    let status = Command::new("rustup")
        .args([
            "run",
            TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            EBPF_PACKAGE,
            "--bins",
            "--release",
        ])
        .args(
            test_hooks
                .then_some(["--features", "test-hooks"])
                .into_iter()
                .flatten(),
        )
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(workspace)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer cargo's compiler settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .status()
        .context(
            "running `rustup run nightly cargo build` for proxy-ebpf (run `cargo xtask setup`)",
        )?;
    if !status.success() {
        bail!("building proxy-ebpf failed ({status}); run `cargo xtask setup` if a prerequisite is missing");
    }
    let built = target_dir.join(TARGET).join("release").join(EBPF_PACKAGE);
    copy(&built, &out_dir.join(EBPF_PACKAGE))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
