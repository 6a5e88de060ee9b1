//! An echo upstream in a process of its own (this package's `echo_server`
//! binary), so that thousands of tunnels can have both their ends on this host
//! without the test process's RLIMIT_NOFILE holding both.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use crate::wait_until;

/// A running `echo_server`; killed when dropped (and it exits by itself when
/// the test process goes away, as its stdin closes).
pub struct EchoProcess {
    child: Child,
    _stdin: ChildStdin,
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    base_fds: usize,
}

impl EchoProcess {
    /// Starts the binary at `path`: pass `env!("CARGO_BIN_EXE_echo_server")`.
    pub fn start(path: &str) -> Self {
        let mut child = Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {path}: {err}"));
        let stdin = child.stdin.take().expect("stdin pipe");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout pipe"))
            .read_line(&mut line)
            .expect("read the echo server's address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("echo server said {line:?}"));
        let mut echo = Self {
            child,
            _stdin: stdin,
            addr,
            base_fds: 0,
        };
        echo.base_fds = echo.fd_count();
        echo
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|dir| dir.count())
            .unwrap_or_else(|err| panic!("echo server gone: {err}"))
    }

    /// Connections it holds now.
    pub fn connections(&self) -> usize {
        self.fd_count().saturating_sub(self.base_fds)
    }

    /// Waits up to `timeout` until it holds no connection; returns whether it did.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.connections() == 0)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
