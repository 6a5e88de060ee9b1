//! A `spliced` started with exactly the arguments a test gives — nothing added,
//! so the configuration file decides where it listens and logs — that the test
//! can signal (SIGHUP, SIGTERM) and whose exit it can await.
//!
//! [`crate::Proxy`] always adds `--listen` and `--access-log`; tests of
//! `squid.conf` files need the file's `http_port` and `access_log` lines to apply.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{netns::Netns, proxy::spliced_bin, wait_until};

/// How long spliced may take to start listening, or to log an expected line.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(20);

/// The lines a child wrote to one of its pipes so far.
pub(crate) type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the lines of `pipe` on a thread of their own.
pub(crate) fn collect_lines(pipe: impl Read + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A running spliced inside a namespace; killed when dropped.
pub struct Spliced {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Spliced {
    /// Starts `spliced ARGS` inside `ns` without waiting for anything.
    pub fn spawn_in(ns: &Netns, args: &[&str]) -> Self {
        let mut command = ns.command(spliced_bin().to_str().expect("utf-8 path"));
        let mut child = command
            .args(args)
            .env("RUST_LOG", crate::proxy_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spliced");
        let stdout = collect_lines(child.stdout.take().expect("stdout pipe"));
        let stderr = collect_lines(child.stderr.take().expect("stderr pipe"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Starts `spliced ARGS` inside `ns` and waits until it has logged
    /// `listening on` for `listeners` addresses.
    pub fn start_in(ns: &Netns, args: &[&str], listeners: usize) -> Self {
        let mut spliced = Self::spawn_in(ns, args);
        let started = wait_until(LOG_TIMEOUT, || {
            spliced.listening().len() >= listeners || spliced.has_exited()
        });
        assert!(
            started && !spliced.has_exited(),
            "spliced {args:?} did not start listening on {listeners} addresses:\n{}",
            spliced.stderr()
        );
        spliced
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every address spliced has logged `listening on` for, in order.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.stderr_lines()
            .iter()
            .filter_map(|line| line.split("listening on ").nth(1)?.trim().parse().ok())
            .collect()
    }

    /// What spliced logged (standard error), line by line.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// What spliced logged, as one text for failure messages.
    pub fn stderr(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// What spliced wrote to standard output (the access log of `access_log -`).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The number of log lines so far: pass it to [`Spliced::wait_log`] to look
    /// only at what comes after an action.
    pub fn mark(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    /// Waits for a log line after line `since` that contains `needle`; returns it.
    pub fn wait_log(&self, since: usize, needle: &str) -> String {
        let mut found = None;
        wait_until(LOG_TIMEOUT, || {
            found = self.stderr.lock().unwrap()[since..]
                .iter()
                .find(|line| line.contains(needle))
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "spliced did not log {needle:?} within {LOG_TIMEOUT:?}:\n{}",
                self.stderr()
            )
        })
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of our own child and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Sends SIGHUP and returns the line saying how the reload went
    /// (`configuration reloaded`, or the error of `reload failed`).
    pub fn reload(&self) -> String {
        let since = self.mark();
        self.signal(libc::SIGHUP);
        let mut outcome = None;
        wait_until(LOG_TIMEOUT, || {
            outcome = self.stderr.lock().unwrap()[since..]
                .iter()
                .find(|line| {
                    line.contains("configuration reloaded") || line.contains("reload failed")
                })
                .cloned();
            outcome.is_some()
        });
        outcome.unwrap_or_else(|| panic!("no reload outcome logged:\n{}", self.stderr()))
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Fails the test if the process has exited.
    pub fn assert_running(&mut self) {
        assert!(!self.has_exited(), "spliced exited:\n{}", self.stderr());
    }

    /// Waits up to `timeout` for the process to exit; returns its status and
    /// how long the wait took, or `None` if it is still running.
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

impl Drop for Spliced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `spliced check -f FILE` (it reads the file only; no network) and
/// returns its exit status and output.
pub fn check_config(file: &Path) -> Output {
    let mut child = Command::new(spliced_bin())
        .arg("check")
        .arg("-f")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spliced check");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout pipe")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr pipe")));
    let mut status = None;
    wait_until(LOG_TIMEOUT, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("spliced check -f {} hung", file.display());
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}
