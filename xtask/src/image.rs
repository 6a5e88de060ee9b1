//! `cargo xtask image`: spliced's runtime image, built by podman on this
//! machine from Debian packages only (no container registry is needed).
//!
//! The Dockerfile stays the one recipe: its last stage (the runtime) is taken
//! as it is written, with two substitutions. `FROM debian:bookworm-slim`
//! becomes a base made here by `mmdebstrap` (minbase, slimmed the way
//! bookworm-slim is) and imported with `podman import`; the binary comes from
//! the product build (`target/release/spliced`, never the test build) instead
//! of the build stage. Everything is cached:
//!
//! * the base tarball as `target/image/base-KEY.tar`, KEY a hash of the
//!   mmdebstrap command (suite, variant, mirrors, options): delete it to pick
//!   up newer Debian packages;
//! * the base image as `localhost/spliced-base:KEY`;
//! * the image as `localhost/spliced:HASH`, HASH over the generated
//!   Containerfile and the binary, also tagged `localhost/spliced:latest`;
//!   the build is skipped when that tag exists.
//!
//! podman runs with [`PODMAN_FLAGS`] and the rlimits of [`ulimits`]; README
//! ("Container image") says why each is needed on some machines.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::proc::{run_checked, stdout_of, succeeds};

/// The repository of the image `cargo xtask image` builds.
pub const IMAGE: &str = "localhost/spliced";
/// The repository of the imported Debian base.
const BASE_IMAGE: &str = "localhost/spliced-base";
/// The image the Dockerfile's runtime stage starts from, which the local base replaces.
const DOCKERFILE_BASE: &str = "debian:bookworm-slim";
/// The Dockerfile's build stage: its `COPY --from=` becomes a copy of the local binary.
const BUILD_STAGE: &str = "build";

/// Debian's mirror (the one /etc/apt/sources.list of these machines names).
const MIRROR: &str = "http://deb.debian.org/debian";
/// Debian's security mirror.
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// The Debian release of the Dockerfile's build and runtime stages.
const SUITE: &str = "bookworm";

/// podman's global flags. Debian's podman defaults to crun, which refuses a
/// host with hybrid cgroups ("cgroups in hybrid mode not supported"); runc
/// does not. cgroupfs and a file event log: no systemd needed.
pub const PODMAN_FLAGS: [&str; 6] = [
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
    "--events-backend",
    "file",
];

/// The highest nproc limit given to containers.
const NPROC_CAP: libc::rlim_t = 4096;

/// The image built (or found cached).
pub struct Built {
    /// `localhost/spliced:HASH`.
    pub reference: String,
}

/// Builds (or finds) the image holding `spliced`, which must be the product build.
pub fn build(spliced: &Path) -> Result<Built> {
    let started = Instant::now();
    let dir = work_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let base = ensure_base(&dir)?;
    let dockerfile_path = crate::workspace_root().join("Dockerfile");
    let dockerfile = std::fs::read_to_string(&dockerfile_path)
        .with_context(|| format!("reading {}", dockerfile_path.display()))?;
    let containerfile = runtime_containerfile(&dockerfile, &base)?;
    let binary =
        std::fs::read(spliced).with_context(|| format!("reading {}", spliced.display()))?;
    let hash = short_hash(&[containerfile.as_bytes(), &binary]);
    let reference = format!("{IMAGE}:{hash}");

    if succeeds(podman().args(["image", "exists", &reference])) {
        println!("xtask image: {reference} is up to date (binary and Dockerfile unchanged)");
    } else {
        let context = dir.join("context");
        let _ = std::fs::remove_dir_all(&context);
        std::fs::create_dir_all(&context)?;
        std::fs::write(context.join("Containerfile"), &containerfile)?;
        std::fs::write(context.join("spliced"), &binary)?;
        set_executable(&context.join("spliced"))?;
        let build_started = Instant::now();
        run_checked(
            podman()
                .args(["build", "--pull=never", "--network", "host"])
                .args(ulimits()?)
                .args(["--file"])
                .arg(context.join("Containerfile"))
                .args(["--tag", &reference])
                .arg(&context),
        )
        .context("podman build of the runtime image")?;
        println!(
            "xtask image: built {reference} in {:.1} s",
            build_started.elapsed().as_secs_f64()
        );
    }
    run_checked(podman().args(["tag", &reference, &format!("{IMAGE}:latest")]))?;
    let size = stdout_of(podman().args(["image", "inspect", "--format", "{{.Size}}", &reference]))?;
    println!(
        "xtask image: {reference} (also {IMAGE}:latest), {} bytes, ready after {:.1} s",
        size.trim(),
        started.elapsed().as_secs_f64()
    );
    Ok(Built { reference })
}

/// A `podman` command with [`PODMAN_FLAGS`].
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(PODMAN_FLAGS);
    cmd
}

/// `--ulimit` flags no higher than the caller's hard limits: podman's
/// defaults (nofile 1048576, ...) are above them where root lacks
/// CAP_SYS_RESOURCE, and runc then fails to set them ("error setting rlimit
/// type 7: operation not permitted"). nproc is capped at [`NPROC_CAP`]: runc
/// was refused nproc at this machine's hard limit (96363) and took 4096.
pub fn ulimits() -> Result<Vec<String>> {
    let mut flags = Vec::new();
    for (name, resource, cap) in [
        ("nofile", libc::RLIMIT_NOFILE, libc::rlim_t::MAX),
        ("nproc", libc::RLIMIT_NPROC, NPROC_CAP),
    ] {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
            bail!("getrlimit({name}): {}", std::io::Error::last_os_error());
        }
        let hard = limit.rlim_max.min(cap);
        flags.push("--ulimit".to_owned());
        flags.push(format!("{name}={hard}:{hard}"));
    }
    Ok(flags)
}

/// The mmdebstrap arguments (without the output path, which follows the suite).
fn mmdebstrap_args() -> Vec<String> {
    let mut args: Vec<String> = [
        "--variant=minbase",
        // usr-is-merged instead of the usrmerge package (and the perl it pulls in).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--format=tar",
    ]
    .map(str::to_owned)
    .to_vec();
    // What bookworm-slim leaves out.
    for filter in [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/info/*",
    ] {
        args.push(format!("--dpkgopt={filter}"));
    }
    // What bookworm-slim's /etc/apt/apt.conf.d/docker-clean does: no package
    // caches left in a layer by `apt-get install` (80 MB without this).
    for option in [
        "Dir::Cache::pkgcache \"\"",
        "Dir::Cache::srcpkgcache \"\"",
        "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb \
         /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; }",
    ] {
        args.push(format!("--aptopt={option}"));
    }
    args
}

/// The sources.list lines of the base (those of debian:bookworm-slim).
fn sources() -> [String; 3] {
    [
        format!("deb {MIRROR} {SUITE} main"),
        format!("deb {MIRROR} {SUITE}-updates main"),
        format!("deb {SECURITY_MIRROR} {SUITE}-security main"),
    ]
}

/// Makes the base tarball and imports it, unless done before; returns its reference.
fn ensure_base(dir: &Path) -> Result<String> {
    let args = mmdebstrap_args();
    let sources = sources();
    let mut key_input = args.join("\n");
    key_input.push('\n');
    key_input.push_str(SUITE);
    key_input.push('\n');
    key_input.push_str(&sources.join("\n"));
    let key = short_hash(&[key_input.as_bytes()]);
    let reference = format!("{BASE_IMAGE}:{key}");
    if succeeds(podman().args(["image", "exists", &reference])) {
        return Ok(reference);
    }
    let tarball = dir.join(format!("base-{key}.tar"));
    if !tarball.is_file() {
        println!(
            "xtask image: making the Debian base {} with mmdebstrap (once; about a minute)",
            tarball.display()
        );
        let partial = tarball.with_extension("tar.partial");
        let started = Instant::now();
        run_checked(
            Command::new("mmdebstrap")
                .args(&args)
                .arg(SUITE)
                .arg(&partial)
                .args(&sources),
        )
        .context("mmdebstrap of the base image")?;
        std::fs::rename(&partial, &tarball)?;
        println!(
            "xtask image: base made in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    run_checked(podman().arg("import").arg(&tarball).arg(&reference))
        .context("podman import of the base")?;
    Ok(reference)
}

/// The Dockerfile's last stage, from `base` instead of [`DOCKERFILE_BASE`]
/// and with the binary copied from the build context (file `spliced`)
/// instead of the build stage.
pub fn runtime_containerfile(dockerfile: &str, base: &str) -> Result<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let from = lines
        .iter()
        .rposition(|line| line.trim_start().starts_with("FROM "))
        .context("the Dockerfile has no FROM")?;
    let expected_from = format!("FROM {DOCKERFILE_BASE}");
    if lines[from].trim() != expected_from {
        bail!(
            "Dockerfile line {}: the runtime stage must be `{expected_from}`, not `{}`",
            from + 1,
            lines[from].trim()
        );
    }
    let mut out = format!(
        "# Generated by `cargo xtask image` from the Dockerfile's runtime stage.\nFROM {base}\n"
    );
    let copy_from = format!("COPY --from={BUILD_STAGE} ");
    let mut copies = 0;
    for (index, line) in lines.iter().enumerate().skip(from + 1) {
        if let Some(rest) = line.strip_prefix(&copy_from) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [_, destination] = words.as_slice() else {
                bail!(
                    "Dockerfile line {}: expected `{copy_from}SOURCE DESTINATION`",
                    index + 1
                );
            };
            out.push_str(&format!("COPY spliced {destination}\n"));
            copies += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if copies != 1 {
        bail!(
            "the Dockerfile's runtime stage must copy one file from the build stage, not {copies}"
        );
    }
    Ok(out)
}

/// The first 12 hex digits of the SHA-256 of the parts, in order.
fn short_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize()[..6]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// chmod 755.
fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Where the base tarballs and the build context live.
pub fn work_dir() -> PathBuf {
    crate::target_dir().join("image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_stage_is_taken_from_the_dockerfile() {
        let dockerfile =
            std::fs::read_to_string(crate::workspace_root().join("Dockerfile")).unwrap();
        let containerfile = runtime_containerfile(&dockerfile, "localhost/base:x").unwrap();
        assert!(containerfile.contains("\nFROM localhost/base:x\n"));
        assert!(containerfile.contains("\nCOPY spliced /usr/local/bin/spliced\n"));
        assert!(!containerfile.contains("--from="));
        assert!(!containerfile.contains(DOCKERFILE_BASE));
        assert!(containerfile.contains("ENTRYPOINT [\"/usr/local/bin/spliced\"]"));
    }

    #[test]
    fn another_base_is_refused() {
        let err = runtime_containerfile("FROM x AS build\nFROM alpine\n", "b").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
