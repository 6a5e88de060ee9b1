//! Many idle tunnels at once: a hold server that accepts and keeps every
//! connection, and client threads that open tunnels to it through a proxy.

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    child::{fd_count, interrupted, sleep},
    setup_rate::{connect_through, listen, IO_TIMEOUT},
};

/// Accepts connections and keeps them open, idle, until dropped. It is a
/// forked child process, so that its fds do not count against this
/// process's RLIMIT_NOFILE, which already holds the client ends.
pub struct HoldServer {
    pub addr: SocketAddr,
    pid: libc::pid_t,
    base_fds: usize,
}

impl HoldServer {
    pub fn start(port: u16) -> Result<Self> {
        let listener = listen(port)?;
        let addr = listener.local_addr()?;
        let fd = listener.as_raw_fd();
        let parent = std::process::id();
        // SAFETY: after fork the child makes only async-signal-safe system
        // calls (prctl, getppid, accept, nanosleep, _exit) and never returns
        // into Rust code, so locks held by other threads cannot bite it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above.
            unsafe { hold_forever(fd, parent) }
        }
        drop(listener);
        let mut server = Self {
            addr,
            pid,
            base_fds: 0,
        };
        // The child's fds before any connection: inherited ones and the listener.
        thread::sleep(Duration::from_millis(20));
        server.base_fds = fd_count(server.pid()).unwrap_or(0);
        Ok(server)
    }

    fn pid(&self) -> u32 {
        u32::try_from(self.pid).unwrap_or(0)
    }

    /// Connections accepted so far (the child's open fds beyond its start).
    pub fn accepted(&self) -> usize {
        fd_count(self.pid()).map_or(0, |n| n.saturating_sub(self.base_fds))
    }
}

/// The hold server's child: accept for ever, never close; die with the parent.
///
/// # Safety
/// Only to be called in a freshly forked child.
unsafe fn hold_forever(listener: libc::c_int, parent: u32) -> ! {
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if u32::try_from(libc::getppid()).ok() != Some(parent) {
            libc::_exit(0);
        }
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        loop {
            if libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) < 0 {
                // EMFILE and the like: wait instead of spinning.
                libc::nanosleep(&pause, std::ptr::null_mut());
            }
        }
    }
}

impl Drop for HoldServer {
    fn drop(&mut self) {
        // SAFETY: our own child; reaped right after.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Tunnels opened through a proxy, closed when dropped.
pub struct OpenTunnels {
    pub streams: Vec<TcpStream>,
    pub secs: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// All openers together give up after this many errors (the proxy is out of
/// some resource by then; waiting for more only costs time).
const ERROR_BUDGET: u64 = 64;

/// Opens up to `count` tunnels through `proxy` to `target` with `threads`
/// concurrent openers, giving up at `limit` or after [`ERROR_BUDGET`] errors.
pub fn open_tunnels(
    proxy: SocketAddr,
    target: SocketAddr,
    count: usize,
    threads: usize,
    limit: Duration,
) -> OpenTunnels {
    let start = Instant::now();
    let deadline = start + limit;
    let all_errors = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let share = count / threads + usize::from(i < count % threads);
            let all_errors = all_errors.clone();
            thread::spawn(move || {
                let mut streams = Vec::with_capacity(share);
                let mut errors = 0u64;
                let mut first_error = None;
                while streams.len() < share
                    && all_errors.load(Ordering::Relaxed) < ERROR_BUDGET
                    && !interrupted()
                {
                    if Instant::now() >= deadline {
                        first_error.get_or_insert_with(|| "time limit reached".to_owned());
                        break;
                    }
                    let opened =
                        TcpStream::connect_timeout(&proxy, IO_TIMEOUT).and_then(|mut s| {
                            s.set_read_timeout(Some(IO_TIMEOUT))?;
                            s.set_write_timeout(Some(IO_TIMEOUT))?;
                            connect_through(&mut s, target)?;
                            Ok(s)
                        });
                    match opened {
                        Ok(stream) => streams.push(stream),
                        Err(err) => {
                            errors += 1;
                            all_errors.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| err.to_string());
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                (streams, errors, first_error)
            })
        })
        .collect();
    let mut all = OpenTunnels {
        streams: Vec::with_capacity(count),
        secs: 0.0,
        errors: 0,
        first_error: None,
    };
    for handle in handles {
        if let Ok((streams, errors, first_error)) = handle.join() {
            all.streams.extend(streams);
            all.errors += errors;
            if all.first_error.is_none() {
                all.first_error = first_error;
            }
        }
    }
    all.secs = start.elapsed().as_secs_f64();
    all
}

/// Waits (bounded) until the hold server has accepted `count` connections.
pub fn wait_accepted(server: &HoldServer, count: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while server.accepted() < count {
        if Instant::now() >= deadline || interrupted() {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
    true
}
