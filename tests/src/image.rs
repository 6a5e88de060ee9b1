//! spliced's image run by podman the way the DaemonSet runs it: the rendered
//! pod spec translated into `podman run` flags (host network, the ConfigMap
//! and the bpffs as volumes, the security context), started inside a network
//! namespace of the test, which is the container's "host" network.
//!
//! The image is `$SPLICED_IMAGE` (`cargo xtask test` sets it to what
//! `cargo xtask image` built), else `localhost/spliced:latest`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    daemon::{collect_lines, Lines},
    deploy, wait_until, Netns,
};

/// podman's global flags, as `cargo xtask image` passes them (xtask/src/image.rs
/// says why: crun refuses hybrid cgroups; no systemd needed).
pub const PODMAN_FLAGS: [&str; 6] = [
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
    "--events-backend",
    "file",
];

/// The highest nproc limit given to containers (as xtask/src/image.rs).
const NPROC_CAP: libc::rlim_t = 4096;

/// The image under test; fails the test if podman does not have it.
pub fn image() -> String {
    let image =
        std::env::var("SPLICED_IMAGE").unwrap_or_else(|_| "localhost/spliced:latest".into());
    let exists = podman()
        .args(["image", "exists", &image])
        .status()
        .expect("podman (cargo xtask setup installs it)");
    assert!(
        exists.success(),
        "podman has no image {image}: build it with `cargo xtask image` (cargo xtask test does)"
    );
    image
}

/// A `podman` command with [`PODMAN_FLAGS`].
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(PODMAN_FLAGS).stdin(Stdio::null());
    cmd
}

/// Runs podman with `args`; fails the test unless it succeeds. Its output.
pub fn podman_ok(args: &[&str]) -> Output {
    let output = podman().args(args).output().expect("podman");
    assert!(
        output.status.success(),
        "podman {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `entrypoint args` in a new container of the image under test, without
/// a network; fails the test unless it succeeds. Its output.
pub fn run_once(entrypoint: &str, args: &[&str]) -> Output {
    let name = unique_name("once");
    let mut command = podman();
    command
        .args([
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--name",
            &name,
        ])
        .args(ulimits())
        .arg(format!("--entrypoint={entrypoint}"))
        .arg(image())
        .args(args);
    let output = command.output().expect("podman run");
    assert!(
        output.status.success(),
        "podman run {entrypoint} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `--ulimit` flags no higher than this process's hard limits (podman's
/// defaults are above them where root lacks CAP_SYS_RESOURCE).
pub fn ulimits() -> Vec<String> {
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
        let rc = unsafe { libc::getrlimit(resource, &mut limit) };
        assert_eq!(rc, 0, "getrlimit {name}");
        let hard = limit.rlim_max.min(cap);
        flags.extend(["--ulimit".to_owned(), format!("{name}={hard}:{hard}")]);
    }
    flags
}

/// Whether this process's capability bounding set holds `cap` (a name like
/// `SYS_RESOURCE`); a container cannot be given one its runtime lacks.
pub fn host_has_capability(cap: &str) -> bool {
    let bit = match cap {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not known to the test"),
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .expect("CapBnd in /proc/self/status");
    let mask = u64::from_str_radix(bounding.trim(), 16).unwrap();
    mask & (1 << bit) != 0
}

/// The seccomp profile standing for Kubernetes' `RuntimeDefault` under
/// containerd (>= 1.7) and CRI-O: podman's default profile
/// (/usr/share/containers/seccomp.json), plus `bpf` allowed with CAP_BPF and
/// `perf_event_open` with CAP_PERFMON, as those runtimes allow them. Older
/// containers-common (Debian bookworm's podman 4.3) allows both only with
/// CAP_SYS_ADMIN; README ("Container image") gives the same edit.
pub fn runtime_default_seccomp(dir: &Path) -> PathBuf {
    let source = "/usr/share/containers/seccomp.json";
    let text = std::fs::read_to_string(source).unwrap_or_else(|err| panic!("{source}: {err}"));
    let mut profile: Value = serde_json::from_str(&text).expect("seccomp JSON");
    let syscalls = profile["syscalls"].as_array_mut().expect("syscalls");
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        let allowed = syscalls.iter().any(|rule| {
            rule["action"] == "SCMP_ACT_ALLOW"
                && rule["names"].as_array().unwrap().iter().any(|n| n == name)
                && rule["includes"]["caps"]
                    .as_array()
                    .is_some_and(|caps| caps.iter().any(|c| c == cap))
        });
        if allowed {
            continue;
        }
        // The rules that deny it without CAP_SYS_ADMIN must not deny it with `cap`.
        for rule in syscalls.iter_mut() {
            let names = rule["names"].as_array().unwrap();
            if rule["action"] != "SCMP_ACT_ALLOW" && names.iter().any(|n| n == name) {
                if let Some(excludes) = rule["excludes"]["caps"].as_array_mut() {
                    excludes.push(cap.into());
                }
            }
        }
        syscalls.push(serde_json::json!({
            "names": [name],
            "action": "SCMP_ACT_ALLOW",
            "includes": { "caps": [cap] },
        }));
    }
    let path = dir.join("seccomp-runtime-default.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&profile).unwrap()).unwrap();
    path
}

/// The spliced container of the rendered DaemonSet, as `podman run` flags.
pub struct DaemonSetContainer {
    /// spliced's arguments, `$(POD_IP)` expanded.
    pub args: Vec<String>,
    /// The environment the pod spec gives it.
    pub env: Vec<(String, String)>,
    /// The capabilities added after `drop: [ALL]`, without those the host lacks.
    pub capabilities: Vec<String>,
    /// Capabilities the manifest adds that this host cannot give (not in its
    /// bounding set): left out, and said so.
    pub unavailable: Vec<String>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// `runAsUser`.
    pub user: u64,
    /// `--admin`'s port.
    pub admin_port: u16,
    /// Volumes: (host path, container path, read-only).
    pub volumes: Vec<(PathBuf, String, bool)>,
    /// The whole rendered pod template spec (for `podman kube play`).
    pub pod_spec: Value,
    /// The rendered ConfigMaps (for `podman kube play`).
    pub config_maps: Vec<Value>,
    /// The ConfigMap files.
    _config_dir: tempfile::TempDir,
}

impl DaemonSetContainer {
    /// Renders deploy/kubernetes/daemonset and translates its spliced
    /// container, with `pod_ip` for the downward API and `bpffs` for the
    /// hostPath `/sys/fs/bpf` (a bpffs of the test's own: the node's must not
    /// get the test's pins).
    pub fn render(pod_ip: Ipv4Addr, bpffs: &Path) -> Self {
        let kube = deploy::workspace_root().join("deploy/kubernetes/daemonset");
        let documents = deploy::yaml_documents(&deploy::kustomize(&kube));
        let daemonset = documents
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("a DaemonSet");
        let pod_spec = daemonset["spec"]["template"]["spec"].clone();
        assert_eq!(
            pod_spec["hostNetwork"], true,
            "the DaemonSet runs on the host network"
        );
        let container = pod_spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "spliced")
            .expect("a container named spliced")
            .clone();
        let config_maps: Vec<Value> = documents
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .cloned()
            .collect();

        let env = deploy::container_env(&container, pod_ip);

        let config_dir = tempfile::tempdir().unwrap();
        let mut volumes = Vec::new();
        for mount in container["volumeMounts"].as_array().unwrap() {
            let mount_path = mount["mountPath"].as_str().unwrap().to_owned();
            let read_only = mount["readOnly"] == true;
            let volume = pod_spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            if let Some(name) = volume["configMap"]["name"].as_str() {
                let config_map = config_maps
                    .iter()
                    .find(|c| c["metadata"]["name"] == name)
                    .expect("the mounted ConfigMap is rendered");
                let dir = config_dir.path().join(volume["name"].as_str().unwrap());
                std::fs::create_dir_all(&dir).unwrap();
                for (key, value) in config_map["data"].as_object().unwrap() {
                    std::fs::write(dir.join(key), value.as_str().unwrap()).unwrap();
                }
                volumes.push((dir, mount_path, read_only));
            } else if volume["hostPath"]["path"] == "/sys/fs/bpf" {
                volumes.push((bpffs.to_owned(), mount_path, read_only));
            } else {
                panic!("volume {volume} is not translated");
            }
        }

        let mut args = Vec::new();
        let mut admin_port = None;
        let mut raw = container["args"].as_array().unwrap().iter();
        while let Some(arg) = raw.next() {
            let arg = expand(arg.as_str().unwrap(), &env);
            if arg == "--admin" {
                let value = expand(raw.next().unwrap().as_str().unwrap(), &env);
                let addr: std::net::SocketAddr = value.parse().expect("--admin ADDR:PORT");
                admin_port = Some(addr.port());
                args.extend([arg, value]);
            } else {
                args.push(arg);
            }
        }

        let security = &container["securityContext"];
        let drop: Vec<&str> = security["capabilities"]["drop"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(drop, ["ALL"]);
        let (capabilities, unavailable) = security["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .partition(|cap| host_has_capability(cap));
        DaemonSetContainer {
            args,
            env,
            capabilities,
            unavailable,
            read_only_root: security["readOnlyRootFilesystem"] == true,
            no_new_privs: security["allowPrivilegeEscalation"] == false,
            user: security["runAsUser"].as_u64().unwrap_or(0),
            admin_port: admin_port.expect("--admin in the DaemonSet's args"),
            volumes,
            pod_spec,
            config_maps,
            _config_dir: config_dir,
        }
    }

    /// `podman run` of this container in `netns` (its host network) as
    /// `name`, with `capabilities` instead of the manifest's when given.
    pub fn run(
        &self,
        netns: &Netns,
        name: &str,
        seccomp: &Path,
        capabilities: Option<&[&str]>,
    ) -> RunningContainer {
        self.run_as(
            netns,
            name,
            RunAs {
                capabilities,
                seccomp: Some(seccomp),
                privileged: false,
            },
        )
    }

    /// `podman run` of this container in `netns` (its host network) as
    /// `name`, with the deviations from the manifest `how` asks for.
    pub fn run_as(&self, netns: &Netns, name: &str, how: RunAs) -> RunningContainer {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", netns.name))
            .arg("--")
            .arg("podman")
            .args(PODMAN_FLAGS)
            .args(["run", "--rm", "--pull=never", "--name", name])
            .args(["--network", "host"])
            .arg(format!("--user={}", self.user))
            .args(ulimits());
        if let Some(seccomp) = how.seccomp {
            command.arg(format!("--security-opt=seccomp={}", seccomp.display()));
        }
        if how.privileged {
            command.arg("--privileged");
        } else {
            command.args(["--cap-drop", "ALL"]);
            let capabilities: Vec<String> = match how.capabilities {
                Some(caps) => caps.iter().map(|c| (*c).to_owned()).collect(),
                None => self.capabilities.clone(),
            };
            if !capabilities.is_empty() {
                command.arg(format!("--cap-add={}", capabilities.join(",")));
            }
        }
        if self.no_new_privs {
            command.arg("--security-opt=no-new-privileges");
        }
        if self.read_only_root {
            command.arg("--read-only");
        }
        for (host, path, read_only) in &self.volumes {
            let mode = if *read_only { ":ro" } else { "" };
            command.arg(format!("--volume={}:{path}{mode}", host.display()));
        }
        for (name, value) in &self.env {
            command.arg(format!("--env={name}={value}"));
        }
        command.arg(image()).args(&self.args);
        RunningContainer::spawn(name, command)
    }
}

/// How a run deviates from the manifest.
pub struct RunAs<'a> {
    /// Capabilities instead of the manifest's (after `--cap-drop ALL`).
    pub capabilities: Option<&'a [&'a str]>,
    /// A seccomp profile; `None`: podman's default.
    pub seccomp: Option<&'a Path>,
    /// `--privileged` (as deploy/kubernetes/variants/privileged), instead of
    /// the capabilities.
    pub privileged: bool,
}

/// Kubernetes' `$(VAR)` expansion of an argument.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = arg.to_owned();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A container name of this test process (podman's names are global).
pub fn unique_name(what: &str) -> String {
    format!(
        "spliced-test-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An attached `podman run`: the container's stdout and stderr are its pipes.
/// Removed (`podman rm -f`) when dropped, whatever happened.
pub struct RunningContainer {
    /// podman's name of the container.
    pub name: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// When `podman run` was started.
    pub started: Instant,
}

impl RunningContainer {
    fn spawn(name: &str, mut command: Command) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().expect("nsenter podman run");
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(child.stderr.take().unwrap());
        RunningContainer {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            started,
        }
    }

    /// Waits until spliced has chosen its data plane and listens; fails the
    /// test if the container ends first or takes over `timeout`.
    pub fn wait_started(&mut self, timeout: Duration) {
        let mut exited = false;
        let started = wait_until(timeout, || {
            exited = self.has_exited();
            exited
                || (self.stderr().contains("data plane:") && self.stderr().contains("listening on"))
        });
        assert!(
            started && !exited,
            "spliced did not start in container {}:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// What the container (spliced, and podman) wrote to standard error.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The start-up line naming the data plane.
    pub fn data_plane_line(&self) -> String {
        self.stderr()
            .lines()
            .find(|l| l.contains("data plane:"))
            .unwrap_or_else(|| panic!("no data plane line:\n{}", self.stderr()))
            .to_owned()
    }

    /// The container's standard output so far (its access log).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until standard output has at least `count` lines; returns them.
    pub fn wait_stdout_lines(&self, count: usize) -> Vec<String> {
        let ok = wait_until(Duration::from_secs(30), || {
            self.stdout_lines().len() >= count
        });
        assert!(
            ok,
            "expected {count} lines on the container's stdout, have {:?}\n{}",
            self.stdout_lines(),
            self.stderr()
        );
        self.stdout_lines()
    }

    /// Whether `podman run` has returned.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// `podman kill --signal NAME`, as the kubelet signals a container.
    pub fn signal(&self, signal: &str) {
        podman_ok(&["kill", "--signal", signal, &self.name]);
    }

    /// Waits up to `timeout` for `podman run` to return (with the container's
    /// exit status); the status and how long it took from now.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.map(|status| (status, started.elapsed()))
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
