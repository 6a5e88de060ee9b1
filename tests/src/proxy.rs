//! Starting and observing a real `spliced` process.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{netns::Netns, wait_until};

/// The spliced binary under test: `$SPLICED_BIN`, which `cargo xtask test`
/// sets to its test build (the `test-hooks` feature: `--test-hook` works).
pub fn spliced_bin() -> PathBuf {
    binary("SPLICED_BIN", "spliced-test-hooks")
}

/// The release build of spliced, the product (no test hooks):
/// `$SPLICED_RELEASE_BIN`, which `cargo xtask test` sets.
pub fn release_bin() -> PathBuf {
    binary("SPLICED_RELEASE_BIN", "spliced")
}

fn binary(variable: &str, default_name: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/release")
                .join(default_name)
        });
    assert!(
        path.exists(),
        "spliced binary not found at {} (${variable}); run the suite with `cargo xtask test`",
        path.display()
    );
    path
}

/// A running spliced; killed when dropped.
pub struct Proxy {
    child: Child,
    /// The first address it listens on.
    pub addr: SocketAddr,
    /// Where its access log goes.
    pub access_log: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The network namespace it runs in, when not the test's own.
    netns: Option<String>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts spliced on 127.0.0.1 with `args` (plus `--listen` and `--access-log`
    /// unless given).
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(args, |full_args| {
            let mut command = Command::new(spliced_bin());
            command.args(full_args);
            command
        })
    }

    /// Starts the spliced at `binary` (e.g. [`release_bin`]) on 127.0.0.1.
    pub fn start_with_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn(args, |full_args| {
            let mut command = Command::new(binary);
            command.args(full_args);
            command
        })
    }

    /// Starts spliced listening on its squid.conf's `http_port`s only (no
    /// `--listen`): `args` must name the file with `-f`. [`Proxy::addr`] is
    /// the first port it reports.
    pub fn start_on_config_ports(args: &[&str]) -> Self {
        Self::spawn_with(args, false, |full_args| {
            let mut command = Command::new(spliced_bin());
            command.args(full_args);
            command
        })
    }

    /// Starts spliced inside `ns`.
    pub fn start_in(ns: &Netns, args: &[&str]) -> Self {
        let mut proxy = Self::spawn(args, |full_args| {
            let mut command = ns.command(spliced_bin().to_str().expect("utf-8 path"));
            command.args(full_args);
            command
        });
        proxy.netns = Some(ns.name.clone());
        proxy
    }

    /// Starts spliced on 127.0.0.1 through `wrapper`, a shell-like program that
    /// runs `-c SCRIPT` (e.g. `capsh --drop=cap_bpf --`).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        Self::spawn(args, |full_args| {
            let quoted: Vec<String> = full_args.iter().map(|a| format!("'{a}'")).collect();
            let script = format!("exec '{}' {}", spliced_bin().display(), quoted.join(" "));
            let mut command = Command::new(wrapper[0]);
            command.args(&wrapper[1..]).arg("-c").arg(script);
            command
        })
    }

    /// Starts spliced with `args`, plus `--listen 127.0.0.1:0` and a temporary
    /// `--access-log` unless given, using `build` to make the command.
    fn spawn(args: &[&str], build: impl FnOnce(&[String]) -> Command) -> Self {
        Self::spawn_with(args, true, build)
    }

    /// [`Proxy::spawn`], adding `--listen` only if `listen` is set.
    fn spawn_with(args: &[&str], listen: bool, build: impl FnOnce(&[String]) -> Command) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let access_log = dir.path().join("access.log");
        let mut full_args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if listen && !args.contains(&"--listen") {
            full_args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !args.contains(&"--access-log") {
            full_args.extend([
                "--access-log".into(),
                access_log.to_str().expect("utf-8 path").to_owned(),
            ]);
        }
        let mut command = build(&full_args);
        command
            .env("RUST_LOG", crate::proxy_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn spliced");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut proxy = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            access_log,
            stderr,
            netns: None,
            _dir: dir,
        };
        let started = wait_until(Duration::from_secs(20), || {
            proxy.listening_addr().is_some() || proxy.child.try_wait().ok().flatten().is_some()
        });
        let addr = proxy.listening_addr();
        assert!(
            started && addr.is_some(),
            "spliced did not start:\n{}",
            proxy.stderr()
        );
        proxy.addr = addr.unwrap();
        proxy
    }

    fn listening_addr(&self) -> Option<SocketAddr> {
        self.stderr.lock().unwrap().iter().find_map(|line| {
            line.split("listening on ")
                .nth(1)
                .and_then(|a| a.trim().parse().ok())
        })
    }

    /// Everything spliced logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Whether spliced logs a line containing `needle` within 10 s. The log
    /// arrives through a pipe read by another thread, so a line written
    /// before the access log record may still be on its way when the record
    /// is seen.
    pub fn logged(&self, needle: &str) -> bool {
        self.logged_times(needle, 1)
    }

    /// Whether spliced logs `needle` at least `count` times within 10 s (see
    /// [`Proxy::logged`]).
    pub fn logged_times(&self, needle: &str, count: usize) -> bool {
        wait_until(Duration::from_secs(10), || {
            self.stderr
                .lock()
                .unwrap()
                .iter()
                .map(|line| line.matches(needle).count())
                .sum::<usize>()
                >= count
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Access log lines written so far.
    pub fn access_lines(&self) -> Vec<String> {
        crate::complete_lines(&self.access_log)
    }

    /// Waits until at least `count` access log lines exist and returns them all.
    pub fn wait_access_lines(&self, count: usize) -> Vec<String> {
        let ok = wait_until(Duration::from_secs(30), || {
            self.access_lines().len() >= count
        });
        let lines = self.access_lines();
        assert!(
            ok,
            "expected {count} access log lines, have {}: {lines:#?}\n{}",
            lines.len(),
            self.stderr()
        );
        lines
    }

    /// Waits for `count` JSON access records (needs `--log-format json`).
    pub fn wait_json_records(&self, count: usize) -> Vec<serde_json::Value> {
        self.wait_access_lines(count)
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("bad JSON line {line:?}: {err}"))
            })
            .collect()
    }

    /// Waits for at least `at_least` tunnel records (status 200) in the JSON
    /// access log and asserts that every tunnel record says it ran on `plane`:
    /// a test aimed at one data plane fails when a tunnel fell back to another.
    pub fn assert_tunnels_ran_on(&self, plane: &str, at_least: usize) {
        crate::planes::assert_records(&self.access_log, plane, at_least, || self.stderr());
    }

    /// [`Proxy::assert_tunnels_ran_on`] for a proxy without a JSON access log:
    /// from its `/metrics` (it must run with `--admin`).
    pub fn assert_tunnels_ran_on_by_metrics(&self, plane: &str, at_least: u64) {
        let admin = self
            .admin_addr()
            .unwrap_or_else(|| panic!("no --admin listener:\n{}", self.stderr()));
        crate::planes::assert_closed_on(admin, self.netns.as_deref(), plane, at_least, || {
            self.stderr()
        });
    }

    /// The kernel planes' counters: from `/metrics` (`spliced_kernel_NAME`
    /// under NAME, `spliced_packet_NAME` under `packet_NAME`, a labelled
    /// series under `packet_NAME_LABEL`) when the proxy runs with `--admin`,
    /// else from the SIGUSR1 log line.
    pub fn stats(&self) -> HashMap<String, u64> {
        match self.admin_addr() {
            Some(addr) => self.kernel_metrics(addr),
            None => self.stats_from_signal(),
        }
    }

    /// The address of the `--admin` listener, if it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.stderr.lock().unwrap().iter().find_map(|line| {
            line.split("admin endpoint on http://")
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
    }

    /// Every `spliced_kernel_*` series of `/metrics`, by the name after the
    /// prefix (without `_total`).
    fn kernel_metrics(&self, admin: SocketAddr) -> HashMap<String, u64> {
        let text = match &self.netns {
            Some(name) => crate::netns::enter_named(name, move || http_get(admin, "/metrics")),
            None => http_get(admin, "/metrics"),
        }
        .unwrap_or_else(|err| panic!("GET /metrics: {err}\n{}", self.stderr()));
        let counters: HashMap<String, u64> = text
            .lines()
            .filter_map(|line| {
                line.strip_prefix("spliced_kernel_")
                    .map(str::to_owned)
                    .or_else(|| {
                        line.strip_prefix("spliced_")
                            .filter(|l| l.starts_with("packet_"))
                            .map(str::to_owned)
                    })
            })
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, label) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.split('"').nth(1)),
                    None => (series, None),
                };
                let name = name.strip_suffix("_total").unwrap_or(name);
                let key = match label {
                    Some(label) => format!("{name}_{label}"),
                    None => name.to_owned(),
                };
                Some((key, value.parse().ok()?))
            })
            .collect();
        assert!(
            !counters.is_empty(),
            "no spliced_kernel_ or spliced_packet_ metrics in\n{text}"
        );
        counters
    }

    /// Asks for the kernel-side counters (SIGUSR1) and returns them.
    fn stats_from_signal(&self) -> HashMap<String, u64> {
        let before = self.stderr.lock().unwrap().len();
        // SAFETY: kill(2) with a pid we own and a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = self.stderr.lock().unwrap()[before..]
                .iter()
                .find(|l| l.contains("stats:"))
                .cloned();
            found.is_some()
        });
        let line = found.unwrap_or_else(|| panic!("no stats line:\n{}", self.stderr()));
        line.split_whitespace()
            .filter_map(|field| field.split_once('='))
            .filter_map(|(key, value)| Some((key.to_owned(), value.parse().ok()?)))
            .collect()
    }

    /// Number of open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// Resident memory of the process in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or_else(|| panic!("no VmRSS for spliced:\n{}", self.stderr()))
    }

    /// Starts counting the bytes that pass through the process's hands:
    /// read-like syscalls on its sockets, and `splice`, `sendfile`,
    /// `copy_file_range`, `tee` and `vmsplice` (`strace` attached to every
    /// thread; /proc/PID/io's rchar misses recv* and splice).
    pub fn trace_syscalls(&self) -> SyscallTrace {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("strace.out");
        let pid = self.child.id().to_string();
        let child = Command::new("strace")
            .args([
                // One output file per thread (OUTPUT.TID), so no call is split
                // into "unfinished" and "resumed" lines.
                "-ff",
                "-qq",
                "-y",
                "-e",
                "trace=read,readv,recvfrom,recvmsg,recvmmsg,splice,sendfile,copy_file_range,tee,vmsplice",
                "-e",
                "signal=none",
                "-o",
            ])
            .arg(&output)
            .args(["-p", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace (Debian package strace) must be installed");
        let traced = wait_until(Duration::from_secs(10), || {
            fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
                tasks.filter_map(Result::ok).all(|task| {
                    fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                        status.lines().any(|l| {
                            l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                        })
                    })
                })
            })
        });
        assert!(traced, "strace did not attach to spliced");
        SyscallTrace {
            child,
            output,
            _dir: dir,
        }
    }

    /// Fails the test if the process has exited.
    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "spliced exited:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `strace` of the syscalls that can move bytes through the proxy.
pub struct SyscallTrace {
    child: Child,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a [`SyscallTrace`] saw.
#[derive(Clone, Debug, Default)]
pub struct Traced {
    /// Bytes returned by read-like syscalls on sockets (copied out and
    /// consumed; `MSG_PEEK` and `MSG_TRUNC` reads are counted apart).
    pub socket_reads: u64,
    /// Bytes copied out by `MSG_PEEK` reads (left in the queue).
    pub peeked: u64,
    /// Bytes dropped by `MSG_TRUNC` reads (consumed, not copied).
    pub dropped: u64,
    /// Bytes moved by splice, sendfile, copy_file_range, tee and vmsplice.
    pub spliced: u64,
    /// Calls of each traced syscall.
    pub calls: HashMap<String, u64>,
}

impl SyscallTrace {
    /// Stops tracing and sums what it saw.
    pub fn finish(mut self) -> Traced {
        // SAFETY: kill(2) with the pid of our strace child and SIGINT, which makes it
        // detach and flush its output.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let prefix = self
            .output
            .file_name()
            .and_then(|name| name.to_str())
            .map(|name| format!("{name}."))
            .expect("utf-8 file name");
        let mut text = String::new();
        for entry in fs::read_dir(self._dir.path()).expect("strace output dir") {
            let path = entry.expect("strace output").path();
            if path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix))
            {
                text.push_str(&fs::read_to_string(&path).expect("strace output"));
            }
        }
        let mut traced = Traced::default();
        for line in text.lines() {
            // "NAME(FD<TYPE:[...]>, ...) = N"
            let Some((call, rest)) = line.trim_start().split_once('(') else {
                continue;
            };
            *traced.calls.entry(call.to_owned()).or_default() += 1;
            let Some(bytes) = line
                .rsplit_once(") = ")
                .and_then(|(_, result)| result.split_whitespace().next()?.parse::<i64>().ok())
                .filter(|&n| n > 0)
            else {
                continue;
            };
            if call.starts_with("read") || call.starts_with("recv") {
                let on_socket = rest.split(',').next().is_some_and(|fd| {
                    fd.contains("<socket:") || fd.contains("<TCP") || fd.contains("<UDP")
                });
                if on_socket {
                    let counter = if rest.contains("MSG_PEEK") {
                        &mut traced.peeked
                    } else if rest.contains("MSG_TRUNC") {
                        &mut traced.dropped
                    } else {
                        &mut traced.socket_reads
                    };
                    *counter += bytes as u64;
                }
            } else {
                traced.spliced += bytes as u64;
            }
        }
        traced
    }
}

/// The highest RSS and descriptor count sampled from a proxy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peaks {
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open descriptors.
    pub fds: usize,
}

impl Peaks {
    /// Takes one sample of `proxy`.
    pub fn sample(&mut self, proxy: &Proxy) {
        self.rss_kib = self.rss_kib.max(proxy.rss_kib());
        self.fds = self.fds.max(proxy.fd_count());
    }
}

/// The body of `GET path` from an HTTP/1.1 server at `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, crate::IO_TIMEOUT)?;
    stream.set_read_timeout(Some(crate::IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map_or(answer.clone(), |(_, body)| body.to_owned()))
}

/// spliced's arguments for the packet plane tests: `--dataplane packet`,
/// `--promote-after`, the upstream's port, the listening address, JSON
/// access log.
pub fn packet_args(promote_after: u64, upstream_port: u16, listen: SocketAddr) -> Vec<String> {
    [
        "--dataplane",
        "packet",
        "--promote-after",
        &promote_after.to_string(),
        "--connect-ports",
        &upstream_port.to_string(),
        "--listen",
        &listen.to_string(),
        "--log-format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec()
}
