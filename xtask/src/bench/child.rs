//! Child processes that cannot outlive the benchmark, bounded waits, ctrl-c,
//! free ports and the benchmark's temporary directory.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::Read as _,
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Set by SIGINT, SIGTERM or SIGHUP: every wait checks it and gives up, so the
/// guards run and the namespaces and children go away.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns ctrl-c (and SIGTERM, SIGHUP) into [`interrupted`] instead of death.
pub fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

/// True once the user asked the benchmark to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once the user asked the benchmark to stop.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps up to `duration`, waking early when interrupted.
pub fn sleep(duration: Duration) {
    let deadline = Instant::now() + duration;
    while !interrupted() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Guarded {
    child: Option<Child>,
    name: String,
}

impl Guarded {
    /// Starts `cmd`; `name` is used in messages.
    pub fn spawn(cmd: &mut Command, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", describe(cmd)))?;
        Ok(Self {
            child: Some(child),
            name,
        })
    }

    /// The process id (after `ip netns exec`, `taskset` and `proxychains4`,
    /// which all exec, it is the program's own).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit: `Ok(None)` on timeout
    /// (the process keeps running), an error when interrupted.
    pub fn wait_for(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        self.wait(limit, true)
    }

    fn wait(&mut self, limit: Duration, interruptible: bool) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Ok(Some(status));
            }
            if interruptible {
                check_interrupt()?;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the process: SIGTERM; after 1 s a second SIGTERM (which ends a
    /// graceful shutdown of spliced at once); after 3 s in all, SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let signal = |child: &Child, signal| {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(pid, signal) };
            }
        };
        let exited = |child: &mut Child, within: Duration| {
            let deadline = Instant::now() + within;
            loop {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(5));
            }
        };
        if exited(&mut child, Duration::ZERO) {
            return;
        }
        signal(&child, libc::SIGTERM);
        if exited(&mut child, Duration::from_secs(1)) {
            return;
        }
        signal(&child, libc::SIGTERM);
        if exited(&mut child, Duration::from_secs(2)) {
            return;
        }
        eprintln!(
            "bench: {} ignored SIGTERM twice in 3 s; killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short command with a deadline; returns its stdout, or an error with
/// its stderr when it fails. Gives up early when interrupted.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<String> {
    run_with_deadline(cmd, limit, true)
}

/// [`run_bounded`] that goes on when interrupted: for cleaning up.
pub fn run_cleanup(cmd: &mut Command, limit: Duration) -> Result<String> {
    run_with_deadline(cmd, limit, false)
}

fn run_with_deadline(cmd: &mut Command, limit: Duration, interruptible: bool) -> Result<String> {
    let line = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = Guarded::spawn(cmd, line.clone())?;
    let child = guard.child.as_mut().expect("just spawned");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = guard.wait(limit, interruptible)?;
    let Some(status) = status else {
        guard.stop();
        bail!("`{line}` did not finish within {limit:?}");
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("`{line}` failed ({status}): {}", err.trim());
    }
    Ok(out)
}

/// Prefixes `argv` with `ip netns exec NS` and `taskset -c CPU` as asked.
pub fn placed(netns: Option<&str>, cpu: Option<u32>, argv: &[&str]) -> Command {
    let mut full: Vec<String> = Vec::new();
    if let Some(netns) = netns {
        full.extend(["ip", "netns", "exec", netns].map(str::to_owned));
    }
    if let Some(cpu) = cpu {
        full.extend(["taskset".to_owned(), "-c".to_owned(), cpu.to_string()]);
    }
    full.extend(argv.iter().map(|arg| (*arg).to_owned()));
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..]).stdin(Stdio::null());
    // If the benchmark itself is killed (SIGKILL: no guard runs), its children
    // go too. Every child is spawned from the main thread, which lives as long
    // as the process.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// True if the network namespace of process `pid` has a TCP socket listening
/// on `port` (any address, IPv4 or IPv6).
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|table| {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            return false;
        };
        text.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[3] == "0A"
                && fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                    == Some(port)
        })
    })
}

/// Waits until `child` listens on `port`; the error says why not (exited,
/// timed out, interrupted).
pub fn wait_listening(child: &mut Guarded, port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if listening(child.pid(), port) {
            return Ok(());
        }
        if let Some(status) = child.exited() {
            return Err(format!("exited ({status})"));
        }
        if interrupted() {
            return Err("interrupted".to_owned());
        }
        if Instant::now() >= deadline {
            return Err(format!("not listening on port {port} after {limit:?}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Loopback ports the kernel reports free, never the same one twice.
#[derive(Default)]
pub struct Ports {
    handed_out: HashSet<u16>,
}

impl Ports {
    /// A port nothing is bound to on 127.0.0.1 (not even a TIME_WAIT socket).
    pub fn take(&mut self) -> Result<u16> {
        for _ in 0..100 {
            let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            if self.handed_out.insert(port) {
                return Ok(port);
            }
        }
        bail!("no free loopback port found")
    }
}

/// The benchmark's scratch directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/spliced-bench-PID`, world-writable so that Squid,
    /// which drops to the `proxy` user, can write its log and pid file there.
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("spliced-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        set_mode(&path, 0o777)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// The last `lines` non-empty lines of a file, joined with " | " (for reasons
/// a process failed).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    kept[kept.len().saturating_sub(lines)..].join(" | ")
}

/// Finds `program` on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(program);
            fs::metadata(&candidate).is_ok_and(|meta| {
                use std::os::unix::fs::PermissionsExt as _;
                meta.is_file() && meta.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// Raises this process's RLIMIT_NOFILE (children inherit it) to at least
/// `wanted`, raising the hard limit too if needed (root); returns the new
/// soft limit.
pub fn raise_nofile(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(limit.rlim_max)
}

/// Resident set size of a process in KiB (VmRSS), if it exists.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_its_own_listener_in_proc_net_tcp() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(listening(std::process::id(), port));
        drop(listener);
        assert!(!listening(std::process::id(), port));
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut ports = Ports::default();
        let a = ports.take().expect("port");
        let b = ports.take().expect("port");
        assert_ne!(a, b);
    }

    #[test]
    fn placed_prefixes_netns_and_taskset() {
        let cmd = placed(Some("ns1"), Some(1), &["iperf3", "-s"]);
        assert_eq!(describe(&cmd), "ip netns exec ns1 taskset -c 1 iperf3 -s");
    }
}
