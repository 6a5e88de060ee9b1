//! Many idle tunnels at once: a hold server that accepts every connection,
//! greets it with one byte and keeps it, and client threads that open
//! tunnels to it through a proxy.

use std::{
    io::Read as _,
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
    contenders::Proxy,
    setup_rate::{connect_through, listen, IO_TIMEOUT},
};

/// Accepts connections, sends each one byte (so that every tunnel has
/// carried data, and the packet plane's `--promote-after 0` promotes it) and
/// keeps them open, idle, until dropped. It is a forked child process, so
/// that its fds do not count against this process's RLIMIT_NOFILE, which
/// already holds the client ends.
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
        // calls (prctl, getppid, accept, send, nanosleep, _exit) and never
        // returns into Rust code, so locks held by other threads cannot bite it.
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

/// The hold server's child: accept for ever, greet, never close; die with
/// the parent.
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
        let greeting = b"g";
        loop {
            let fd = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
            if fd < 0 {
                // EMFILE and the like: wait instead of spinning.
                libc::nanosleep(&pause, std::ptr::null_mut());
                continue;
            }
            // An empty send buffer takes one byte without blocking.
            libc::send(
                fd,
                greeting.as_ptr().cast(),
                greeting.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
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
    /// Per stream: whether the greeting came with the `200` already.
    pub greeted: Vec<bool>,
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
                let mut greeted = Vec::with_capacity(share);
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
                            let early = connect_through(&mut s, target)?;
                            Ok((s, !early.is_empty()))
                        });
                    match opened {
                        Ok((stream, early)) => {
                            streams.push(stream);
                            greeted.push(early);
                        }
                        Err(err) => {
                            errors += 1;
                            all_errors.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| err.to_string());
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                (streams, greeted, errors, first_error)
            })
        })
        .collect();
    let mut all = OpenTunnels {
        streams: Vec::with_capacity(count),
        greeted: Vec::with_capacity(count),
        secs: 0.0,
        errors: 0,
        first_error: None,
    };
    for handle in handles {
        if let Ok((streams, greeted, errors, first_error)) = handle.join() {
            all.streams.extend(streams);
            all.greeted.extend(greeted);
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

/// Reads the hold server's one-byte greeting from every tunnel that has not
/// delivered it with the `200`; returns how many delivered it, within
/// `limit`.
pub fn read_greetings(tunnels: &OpenTunnels, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut greeted = tunnels.greeted.iter().filter(|&&early| early).count();
    let mut pending: Vec<&TcpStream> = tunnels
        .streams
        .iter()
        .zip(&tunnels.greeted)
        .filter(|(stream, &early)| !early && stream.set_nonblocking(true).is_ok())
        .map(|(stream, _)| stream)
        .collect();
    loop {
        pending.retain(|&stream| {
            let mut byte = [0u8; 1];
            match (&mut &*stream).read(&mut byte) {
                Ok(1) => {
                    greeted += 1;
                    false
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => true,
                // Closed or failed: it will not greet.
                _ => false,
            }
        });
        if pending.is_empty() || Instant::now() >= deadline || interrupted() {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    for stream in &tunnels.streams {
        let _ = stream.set_nonblocking(false);
    }
    greeted
}

/// How the packet plane's promotions of the idle tunnels went.
#[derive(Clone, Debug, Default)]
pub struct Promotions {
    pub promoted: Option<u64>,
    pub not_promoted: Option<u64>,
    /// Time waited.
    pub secs: f64,
    /// Refusals by reason (stat name, count).
    pub reasons: Vec<(String, u64)>,
}

/// Waits until the packet plane has promoted or refused `count` tunnels (its
/// SIGUSR1 stats), for at most `limit`, giving up after 10 s without
/// progress.
pub fn wait_promotions(proxy: &Proxy, count: usize, limit: Duration) -> Promotions {
    let start = Instant::now();
    let mut last_progress = (start, 0);
    let mut seen = Promotions::default();
    loop {
        if let Some(stats) = proxy.stats() {
            let promoted = stats.get("packet_promoted").copied().unwrap_or(0);
            let refused = stats.get("packet_not_promoted").copied().unwrap_or(0);
            seen.promoted = Some(promoted);
            seen.not_promoted = Some(refused);
            seen.reasons = stats
                .into_iter()
                .filter(|(key, n)| key.starts_with("packet_not_promoted_") && *n > 0)
                .collect();
            let decided = promoted + refused;
            if decided >= count as u64 {
                break;
            }
            if decided > last_progress.1 {
                last_progress = (Instant::now(), decided);
            }
        }
        let now = Instant::now();
        if now >= start + limit || now >= last_progress.0 + Duration::from_secs(10) || interrupted()
        {
            break;
        }
        sleep(Duration::from_millis(250));
    }
    seen.secs = start.elapsed().as_secs_f64();
    seen
}
