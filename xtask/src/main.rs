//! `cargo xtask`: the one entry point for developers and CI of spliced.
//!
//! It installs whatever the build and the tests need on a Debian machine
//! (`setup`), builds the proxy with its eBPF object (`build`), runs it (`run`),
//! runs every check CI runs (`test`) and benchmarks it against direct
//! transfers, Squid and tinyproxy (`bench`). Each task installs only what is
//! missing, so on a prepared machine the setup part costs a fraction of a second.

mod bench;
mod fuzz;
mod image;
mod prereq;
mod proc;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    prereq::Needs,
    proc::{cargo, exec, run_checked},
};

/// Developer tasks of spliced: install prerequisites, build, run, test.
#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (Debian packages, nightly rust-src, bpf-linker, ...).
    Setup {
        /// Only the prerequisites of this task; all of them when omitted.
        #[arg(long, value_enum)]
        only: Option<Scope>,
    },
    /// Install the build prerequisites, then build target/release/spliced.
    Build,
    /// Build, then run target/release/spliced with the given arguments.
    Run {
        /// Arguments for spliced, after `--` (e.g. `-- --listen 127.0.0.1:3128`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every CI check: setup, fmt, clippy, release build, cargo test.
    Test {
        /// Extra arguments for `cargo test`, after `--` (e.g. `-- -p spliced-tests -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Benchmark spliced's data planes against direct, Squid and tinyproxy
    /// (iperf3 through CONNECT, CPU per GiB, connection setup, 10k tunnels);
    /// writes target/bench/results.json and docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Run each `cargo fuzz` target (fuzz/, nightly) for a while; failing
    /// inputs become regression tests in proxy-userspace/tests/fuzz_regressions/.
    Fuzz(fuzz::FuzzArgs),
    /// Soak spliced: normal traffic mixed with faults and floods for N minutes,
    /// every healthy byte checked, RSS/fds/map entries back to the baseline at
    /// the end (tests/tests/soak.rs; CI runs it for 30 s).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build the product binary, then the runtime image with podman from a
    /// Debian base made by mmdebstrap (no registry needed): localhost/spliced.
    Image,
}

/// Which group of prerequisites `setup --only` installs.
#[derive(Clone, Copy, ValueEnum)]
enum Scope {
    /// What building spliced needs.
    Build,
    /// What the tests need on top of the build.
    Test,
    /// What the benchmark needs on top of the build.
    Bench,
    /// What the container image needs on top of the build.
    Image,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proc::put_cargo_bin_on_path();
    match dispatch(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The error chain only: a backtrace of xtask itself helps nobody.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one task.
fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup { only } => setup(only),
        Task::Build => build().map(drop),
        Task::Run { args } => run(args),
        Task::Test { args } => test(args),
        Task::Bench(args) => bench(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Soak { minutes } => soak(minutes),
        Task::Image => image().map(drop),
    }
}

/// `cargo xtask setup`.
fn setup(only: Option<Scope>) -> Result<()> {
    let needs = match only {
        None => Needs {
            bench: true,
            ..Needs::ALL
        },
        Some(Scope::Build) => Needs::BUILD,
        Some(Scope::Test) => Needs::TEST,
        Some(Scope::Bench) => Needs::BENCH,
        Some(Scope::Image) => Needs::IMAGE,
    };
    prereq::ensure(needs)
}

/// `cargo xtask build`: returns the path of the built `spliced`.
fn build() -> Result<PathBuf> {
    prereq::ensure(Needs::BUILD)?;
    build_spliced()
}

/// `cargo xtask run`: replaces this process with spliced.
fn run(args: Vec<OsString>) -> Result<()> {
    let spliced = build()?;
    if !prereq::is_root()? {
        eprintln!(
            "warning: not root: spliced needs CAP_BPF and CAP_NET_ADMIN for the eBPF \
             sockmap and will fall back to splice(2)"
        );
    }
    let mut cmd = std::process::Command::new(&spliced);
    cmd.args(args);
    Err(exec(&mut cmd))
}

/// `cargo xtask bench`: after checking its arguments the benchmark installs
/// the build and benchmark prerequisites and builds spliced.
fn bench(args: bench::BenchArgs) -> Result<()> {
    bench::run(args, || {
        prereq::ensure(Needs {
            build: true,
            bench: true,
            ..Needs::NONE
        })?;
        build_spliced()
    })
}

/// `cargo xtask image`: the product build, then its image.
fn image() -> Result<image::Built> {
    prereq::ensure(Needs {
        build: true,
        image: true,
        ..Needs::NONE
    })?;
    let spliced = build_spliced()?;
    image::build(&spliced)
}

/// `cargo xtask soak --minutes N`.
fn soak(minutes: u64) -> Result<()> {
    prereq::ensure(Needs::ALL)?;
    let spliced = build_spliced()?;
    banner(&format!("soak for {minutes} minutes"));
    run_checked(
        cargo()
            .args([
                "test",
                "--release",
                "-p",
                "spliced-tests",
                "--test",
                "soak",
                "--",
                "--nocapture",
            ])
            .env("SPLICED_BIN", &spliced)
            .env("SPLICED_SOAK_SECONDS", (minutes * 60).to_string()),
    )
}

/// `cargo xtask test`: every check CI runs, stopping at the first failure.
fn test(args: Vec<OsString>) -> Result<()> {
    banner("setup");
    prereq::ensure(Needs::ALL)?;

    banner("cargo fmt --check");
    run_checked(cargo().args(["fmt", "--all", "--", "--check"]))?;

    for features in [&[][..], &["--features", "proxy-userspace/test-hooks"]] {
        banner(&format!(
            "cargo clippy (host crates) {}",
            features.join(" ")
        ));
        run_checked(
            cargo()
                .args(["clippy", "--workspace"])
                .args(HOST_ONLY)
                .args(features)
                .args(["--all-targets", "--", "-D", "warnings"]),
        )?;
    }

    for features in [&[][..], &["--features", "test-hooks"]] {
        banner(&format!(
            "cargo clippy (eBPF crate, nightly, bpfel-unknown-none) {}",
            features.join(" ")
        ));
        run_checked(
            cargo()
                .args(["+nightly", "clippy", "--package", "proxy-ebpf", "--release"])
                .args(features)
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"]),
        )?;
    }

    banner("cargo build --release -p proxy-userspace --features test-hooks");
    let hooked = build_spliced_with_test_hooks()?;
    banner("cargo build --release -p proxy-userspace");
    // `cargo test` below may build target/release/spliced again (its own
    // profile, other bytes): the tests and the image take a copy that stays.
    let spliced = {
        let built = build_spliced()?;
        let product = built.with_file_name("spliced-product");
        std::fs::copy(&built, &product).map_err(|err| {
            anyhow::anyhow!("copying the product build to {}: {err}", product.display())
        })?;
        product
    };
    banner("cargo xtask image");
    let image = image::build(&spliced)?;

    banner("cargo test --workspace --release");
    run_checked(
        cargo()
            .args(["test", "--workspace"])
            .args(HOST_ONLY)
            .args(["--release", "--no-fail-fast"])
            .args(args)
            .env("SPLICED_BIN", &hooked)
            .env("SPLICED_RELEASE_BIN", &spliced)
            .env("SPLICED_IMAGE", &image.reference),
    )?;

    banner("all checks passed");
    Ok(())
}

/// proxy-ebpf is `no_std`, nightly-only and builds only for the BPF target
/// (proxy-userspace's build.rs builds it), so host-side commands skip it.
const HOST_ONLY: [&str; 2] = ["--exclude", "proxy-ebpf"];

/// Builds the test suite's spliced: release mode with the `test-hooks`
/// feature (`--test-hook`, and the eBPF object's test globals), copied to
/// `target/release/spliced-test-hooks` so the release build beside it stays
/// the product. Cargo keeps both builds' artifacts, so switching between them
/// costs a copy, not a rebuild.
fn build_spliced_with_test_hooks() -> Result<PathBuf> {
    run_checked(cargo().args([
        "build",
        "--release",
        "--package",
        "proxy-userspace",
        "--features",
        "test-hooks",
    ]))?;
    let release = target_dir().join("release");
    let hooked = release.join("spliced-test-hooks");
    std::fs::copy(release.join("spliced"), &hooked)
        .map_err(|err| anyhow::anyhow!("copying the test build to {}: {err}", hooked.display()))?;
    Ok(hooked)
}

/// Builds spliced (and, through its build.rs, the eBPF object) in release mode.
fn build_spliced() -> Result<PathBuf> {
    run_checked(cargo().args(["build", "--release", "--package", "proxy-userspace"]))?;
    let spliced = target_dir().join("release").join("spliced");
    anyhow::ensure!(
        spliced.is_file(),
        "the build succeeded but {} does not exist",
        spliced.display()
    );
    Ok(spliced)
}

/// Prints a stage banner that stands out in long CI logs.
fn banner(stage: &str) {
    eprintln!("\n==> xtask: {stage}");
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace
/// root) if set, else `<root>/target`. Always absolute.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_hyphenated_args_through() {
        let cli = Cli::try_parse_from(["xtask", "run", "--", "--listen", "127.0.0.1:3128"])
            .expect("parses");
        let Task::Run { args } = cli.task else {
            panic!("not run")
        };
        assert_eq!(args, ["--listen", "127.0.0.1:3128"]);
    }

    #[test]
    fn test_passes_nested_separator_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "-p", "x", "--", "--nocapture"])
            .expect("parses");
        let Task::Test { args } = cli.task else {
            panic!("not test")
        };
        assert_eq!(args, ["-p", "x", "--", "--nocapture"]);
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
