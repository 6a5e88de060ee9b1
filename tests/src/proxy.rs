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

/// The spliced binary under test: `$SPLICED_BIN`, which `cargo xtask test` sets.
pub fn spliced_bin() -> PathBuf {
    let path = std::env::var_os("SPLICED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/spliced")
        });
    assert!(
        path.exists(),
        "spliced binary not found at {}; run the suite with `cargo xtask test`",
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
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts spliced on 127.0.0.1 with `args` (plus `--listen` and `--access-log`
    /// unless given).
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(None, args)
    }

    /// Starts spliced inside `ns`.
    pub fn start_in(ns: &Netns, args: &[&str]) -> Self {
        Self::spawn(Some(ns), args)
    }

    fn spawn(ns: Option<&Netns>, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let access_log = dir.path().join("access.log");
        let mut command = match ns {
            Some(ns) => {
                let mut command = ns.command(spliced_bin().to_str().expect("utf-8 path"));
                command.env("RUST_LOG", "info");
                command
            }
            None => Command::new(spliced_bin()),
        };
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--access-log") {
            command.arg("--access-log").arg(&access_log);
        }
        command
            .args(args)
            .env("RUST_LOG", "info,spliced=debug")
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

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Access log lines written so far.
    pub fn access_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
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

    /// Asks for the kernel-side counters (SIGUSR1) and returns them.
    pub fn stats(&self) -> HashMap<String, u64> {
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

    /// Bytes the process has read with read-like syscalls (`rchar` of /proc/PID/io).
    pub fn bytes_read_by_process(&self) -> u64 {
        let io =
            fs::read_to_string(format!("/proc/{}/io", self.child.id())).expect("read /proc/PID/io");
        io.lines()
            .find_map(|line| line.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("rchar in /proc/PID/io")
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
