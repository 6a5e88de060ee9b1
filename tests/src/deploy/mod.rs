//! Harness of the deployment tests (tests/tests/deploy.rs).
//!
//! * The pinned Python tools that `cargo xtask setup` installs into
//!   `target/tools/python` (xtask/src/prereq.rs): kubernetes-validate with its
//!   bundled schemas, yamllint, kubectl (for `kubectl kustomize`) and BuildKit's
//!   Dockerfile parser. Everything runs offline; `tools.py` beside this file
//!   turns their answers into JSON.
//! * [`PodRun`]: runs the real spliced the way a pod spec says a container
//!   runs: in a network namespace standing for the node (host network) or the
//!   pod, with a private mount and cgroup namespace, the container runtime's
//!   cgroup2 mount (read-only) or none, a read-only root filesystem, tmpfs
//!   emptyDirs, exactly the capabilities the spec grants and no_new_privs.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    daemon::{collect_lines, Lines},
    netns::Netns,
    proxy::release_bin,
    wait_until,
};

/// The Python helper, run by the tools' interpreter.
const TOOLS_PY: &str = include_str!("tools.py");

/// The JSON Schema of Istio's ServiceEntry used in place of a Kubernetes schema.
pub const SERVICE_ENTRY_SCHEMA: &str = include_str!("serviceentry.schema.json");

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// A program of the pinned Python tools' environment (`python`, `yamllint`,
/// `kubectl`, ...); fails the test with the way to install them if missing.
pub fn tool(name: &str) -> PathBuf {
    let path = workspace_root().join("target/tools/python/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup --only test` (it installs the deployment \
         tests' Python tools into target/tools/python)",
        path.display()
    );
    path
}

/// Runs `tools.py COMMAND` with `request` on its standard input; returns its
/// JSON answer.
fn tools(command: &str, request: &Value) -> Value {
    let mut child = Command::new(tool("python"))
        .args(["-c", TOOLS_PY, command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the tools' python");
    let body = serde_json::to_vec(request).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output().expect("wait for python");
    writer.join().unwrap().expect("write the request");
    assert!(
        output.status.success(),
        "tools.py {command} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("tools.py answers JSON")
}

/// The documents of a YAML stream (empty documents left out).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    match tools("yaml", &json!({ "text": text })) {
        Value::Array(documents) => documents,
        other => panic!("not a list of documents: {other}"),
    }
}

/// The documents of a YAML file.
pub fn yaml_file(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    yaml_documents(&text)
}

/// The Kubernetes versions whose schemas kubernetes-validate bundles, oldest first.
pub fn kubernetes_versions() -> Vec<String> {
    serde_json::from_value(tools("versions", &json!({}))).expect("a list of versions")
}

/// What kubernetes-validate said about one document against one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It validated against the strict schema.
    Passed,
    /// It did not; the first error.
    Invalid(String),
    /// No schema exists for its apiVersion and kind.
    NoSchema,
}

/// Validates each document against the strict schema of each version; one
/// list of `(version, outcome)` per document.
pub fn validate_kubernetes(
    documents: &[Value],
    versions: &[String],
) -> Vec<Vec<(String, Outcome)>> {
    let answer = tools(
        "kubernetes",
        &json!({ "documents": documents, "versions": versions }),
    );
    answer
        .as_array()
        .expect("one answer per document")
        .iter()
        .map(|per_version| {
            versions
                .iter()
                .map(|version| {
                    let result = &per_version[version];
                    let message = result["message"].as_str().unwrap_or_default().to_owned();
                    let outcome = match result["outcome"].as_str() {
                        Some("passed") => Outcome::Passed,
                        Some("invalid") => Outcome::Invalid(message),
                        Some("no-schema") => Outcome::NoSchema,
                        other => panic!("unknown outcome {other:?}"),
                    };
                    (version.clone(), outcome)
                })
                .collect()
        })
        .collect()
}

/// The JSON Schema errors of each document (empty: valid).
pub fn validate_schema(schema: &Value, documents: &[Value]) -> Vec<Vec<String>> {
    serde_json::from_value(tools(
        "schema",
        &json!({ "schema": schema, "documents": documents }),
    ))
    .expect("one list of errors per document")
}

/// `kubectl kustomize DIR` with the pinned kubectl: the rendered YAML stream.
pub fn kustomize(dir: &Path) -> String {
    let output = Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 YAML")
}

/// `yamllint --strict -c CONFIG PATHS`.
pub fn yamllint(config: &Path, paths: &[PathBuf]) -> Output {
    Command::new(tool("yamllint"))
        .args(["--strict", "--format", "parsable", "-c"])
        .arg(config)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .expect("run yamllint")
}

/// One Dockerfile instruction as BuildKit's parser sees it.
#[derive(Clone, Debug)]
pub struct Instruction {
    /// `FROM`, `RUN`, ... (upper case).
    pub cmd: String,
    /// `--from=build` and the like.
    pub flags: Vec<String>,
    /// The arguments: words, or the whole command line of a shell-form `RUN`.
    pub value: Vec<String>,
    /// Whether the exec (JSON) form was used.
    pub json: bool,
    /// The first line of the instruction.
    pub line: u32,
}

/// The instructions of a Dockerfile, parsed by BuildKit's own parser.
pub fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let strings = |value: &Value| -> Vec<String> {
        serde_json::from_value(value.clone()).expect("a list of strings")
    };
    tools("dockerfile", &json!({ "text": text }))
        .as_array()
        .expect("a list of instructions")
        .iter()
        .map(|instruction| Instruction {
            cmd: instruction["cmd"].as_str().expect("cmd").to_owned(),
            flags: strings(&instruction["flags"]),
            value: strings(&instruction["value"]),
            json: instruction["json"].as_bool().expect("json"),
            line: instruction["line"].as_u64().expect("line") as u32,
        })
        .collect()
}

/// The cgroup filesystem a container sees at /sys/fs/cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMount {
    /// A cgroup v2 node: the runtime mounts the container's cgroup2 hierarchy
    /// (its own cgroup namespace), read-only unless the container is privileged.
    V2 { read_only: bool },
    /// No cgroup2 hierarchy in the container (a cgroup v1 node).
    None,
}

/// How to run spliced as a container: what the pod spec and the node decide.
pub struct PodRun<'a> {
    /// The network namespace: the node's (host network) or the pod's.
    pub netns: &'a Netns,
    /// spliced's arguments, `$(VAR)` already expanded and paths already mapped.
    pub args: Vec<String>,
    /// The container's environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// The capability bounding set (names without `CAP_`, any case); `None`
    /// for a privileged container (all of them).
    pub capabilities: Option<Vec<String>>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem: true`.
    pub read_only_root: bool,
    /// Directories standing for emptyDirs: each gets a tmpfs, so it stays
    /// writable under a read-only root.
    pub empty_dirs: Vec<PathBuf>,
    /// What the runtime mounts at /sys/fs/cgroup.
    pub cgroup: CgroupMount,
    /// The directory a bpffs (the host's `/sys/fs/bpf` of a hostPath volume)
    /// is mounted on, bound onto the container's `/sys/fs/bpf`.
    pub bpffs: Option<PathBuf>,
}

impl PodRun<'_> {
    /// The shell script that sets the container up and execs spliced
    /// (`"$@"`), run by `unshare --mount --cgroup` inside the namespace.
    fn script(&self) -> String {
        let mut script = String::from("set -e\n");
        // `ip netns exec` gave us a fresh sysfs without cgroup mounts.
        if let CgroupMount::V2 { read_only } = self.cgroup {
            let mode = if read_only { "ro" } else { "rw" };
            script.push_str(&format!(
                "mount -t cgroup2 -o {mode},nosuid,nodev,noexec cgroup2 /sys/fs/cgroup\n"
            ));
        }
        if let Some(bpffs) = &self.bpffs {
            script.push_str(&format!("mount --bind '{}' /sys/fs/bpf\n", bpffs.display()));
        }
        for dir in &self.empty_dirs {
            assert!(
                dir.is_dir(),
                "emptyDir directory {} must exist",
                dir.display()
            );
            script.push_str(&format!(
                "mount -t tmpfs -o size=16m,mode=1777 emptydir '{}'\n",
                dir.display()
            ));
        }
        if self.read_only_root {
            script.push_str("mount -o remount,bind,ro /\n");
        }
        match &self.capabilities {
            None => script.push_str("exec \"$@\"\n"),
            Some(capabilities) => {
                let bounding: Vec<String> = capabilities
                    .iter()
                    .map(|cap| format!("+{}", cap.to_ascii_lowercase()))
                    .collect();
                let no_new_privs = if self.no_new_privs {
                    "--no-new-privs "
                } else {
                    ""
                };
                script.push_str(&format!(
                    "exec setpriv {no_new_privs}--inh-caps=-all --ambient-caps=-all \
                     --bounding-set=-all,{} -- \"$@\"\n",
                    bounding.join(",")
                ));
            }
        }
        script
    }

    /// Starts the container; returns at once.
    pub fn spawn(&self) -> Pod {
        let mut command = self.netns.command("unshare");
        command
            .args(["--mount", "--cgroup", "--propagation", "private", "--"])
            .args(["sh", "-c", &self.script(), "container"])
            .arg(release_bin())
            .args(&self.args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the emulated container");
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(child.stderr.take().unwrap());
        Pod {
            child,
            stdout,
            stderr,
        }
    }

    /// Starts the container and waits until spliced has chosen its data plane
    /// and listens.
    pub fn start(&self) -> Pod {
        let mut pod = self.spawn();
        let started = wait_until(Duration::from_secs(20), || {
            (pod.stderr().contains("data plane:") && pod.stderr().contains("listening on"))
                || pod.has_exited()
        });
        assert!(
            started && !pod.has_exited(),
            "spliced did not start in the emulated container:\nscript:\n{}\nlog:\n{}",
            self.script(),
            pod.stderr()
        );
        pod
    }
}

/// A running emulated container (the child is spliced itself: every step
/// execs the next); killed when dropped.
pub struct Pod {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Pod {
    /// What spliced logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// What spliced wrote to standard output (its access log here).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until standard output has at least `count` lines; returns them.
    pub fn wait_stdout_lines(&self, count: usize) -> Vec<String> {
        let ok = wait_until(Duration::from_secs(20), || {
            self.stdout_lines().len() >= count
        });
        assert!(
            ok,
            "expected {count} access log lines on stdout, have {:?}\n{}",
            self.stdout_lines(),
            self.stderr()
        );
        self.stdout_lines()
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Sends `signal` to spliced.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of our own child and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `timeout` for the exit; its status and how long it took.
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

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container's environment as the kubelet would set it: literal values,
/// and the pod's (and host's) address from the downward API as `pod_ip`.
pub fn container_env(container: &Value, pod_ip: std::net::Ipv4Addr) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_owned();
            let value = match (
                var["value"].as_str(),
                var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(value), _) => value.to_owned(),
                (None, Some("status.podIP" | "status.hostIP")) => pod_ip.to_string(),
                other => panic!("env {name} from {other:?} is not emulated"),
            };
            (name, value)
        })
        .collect()
}
