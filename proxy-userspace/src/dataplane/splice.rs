//! splice(2) data plane: each direction moves bytes socket → pipe → socket
//! inside the kernel; user space only waits for readiness.
//!
//! A direction holds a pipe only while bytes are in flight: it takes one when
//! its source turns readable and gives it back, empty, when the source has
//! nothing more for now. An idle tunnel costs its two sockets' descriptors and
//! no pipes (a pipe per direction for good made 6 descriptors per tunnel and
//! ran out of them at ~3,300 tunnels). Empty pipes given back are kept for the
//! next burst, at most [`PIPE_POOL`] of them and for at most [`PIPE_IDLE`]: a
//! short tunnel takes three bursts (its request, its answer, its EOF), and
//! making each pipe (`pipe2`, `F_SETPIPE_SZ`, two `close`s) was 12 of its ~41
//! system calls; once the load has gone, so have the pooled descriptors.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    pump::{self, DirectionError, Moved},
    DataPlane, DataPlaneChoice, Picked, PlaneKind, Side, Tunnel, TunnelFuture,
};

/// Pipe capacity requested with F_SETPIPE_SZ (the default is 64 KiB).
pub(super) const PIPE_BYTES: libc::c_int = 1 << 20;
/// Empty pipes kept for reuse (two descriptors each), process-wide.
pub(super) const PIPE_POOL: usize = 64;
/// How long a pooled pipe may wait for a burst before it is closed.
pub(super) const PIPE_IDLE: Duration = Duration::from_secs(1);

/// Empty pipes waiting for a burst, each with when it was given back.
static IDLE_PIPES: Mutex<Vec<(Pipe, Instant)>> = Mutex::new(Vec::new());
/// Whether the task that closes pipes idle for [`PIPE_IDLE`] runs.
static SWEEPING: AtomicBool = AtomicBool::new(false);

/// splice(2) data plane.
#[derive(Debug, Default)]
pub struct SpliceDataPlane;

impl DataPlane for SpliceDataPlane {
    fn name(&self) -> DataPlaneChoice {
        DataPlaneChoice::Splice
    }

    fn pick(&self, _tunnel: &Tunnel) -> Picked<'_> {
        (PlaneKind::Splice, self)
    }

    fn planes(&self) -> Vec<PlaneKind> {
        vec![PlaneKind::Splice]
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(async move {
            let Tunnel {
                client,
                upstream,
                limits,
                shutdown,
                progress,
                ..
            } = tunnel;
            let (up, down) = Moved::pair(&progress, PlaneKind::Splice);
            let driven = pump::Driven {
                client: &client,
                upstream: &upstream,
                moved: (&up, &down),
                name: PlaneKind::Splice,
                limits,
                shutdown,
            };
            pump::drive(
                driven,
                splice_one_way(&client, &upstream, &up, Side::Client),
                splice_one_way(&upstream, &client, &down, Side::Upstream),
            )
            .await
        })
    }
}

/// A pipe used as the in-kernel buffer of one direction; closed on drop.
pub(super) struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
}

impl Pipe {
    /// An empty pipe: a pooled one, else a new one.
    pub(super) fn take() -> io::Result<Self> {
        let pooled = IDLE_PIPES.lock().unwrap_or_else(|p| p.into_inner()).pop();
        pooled.map_or_else(Self::new, |(pipe, _)| Ok(pipe))
    }

    /// Keeps this pipe for the next burst; the caller has spliced out every
    /// byte it spliced in. Closed instead when the pool is full.
    pub(super) fn give_back(self) {
        {
            let mut idle = IDLE_PIPES.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= PIPE_POOL {
                return;
            }
            idle.push((self, Instant::now()));
        }
        if !SWEEPING.swap(true, Ordering::Relaxed) {
            tokio::spawn(close_idle_pipes());
        }
    }

    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array, which is valid for the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let pipe = unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A bigger pipe means fewer wakeups; failure (pipe-max-size) is harmless.
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        Ok(pipe)
    }
}

/// Closes pooled pipes that waited [`PIPE_IDLE`] for a burst; ends (to be
/// started again by the next [`Pipe::give_back`]) when none is left.
async fn close_idle_pipes() {
    loop {
        tokio::time::sleep(PIPE_IDLE / 2).await;
        let mut idle = IDLE_PIPES.lock().unwrap_or_else(|p| p.into_inner());
        // Given back in order: the oldest are first.
        let expired = idle.partition_point(|(_, since)| since.elapsed() >= PIPE_IDLE);
        idle.drain(..expired);
        if idle.is_empty() {
            SWEEPING.store(false, Ordering::Relaxed);
            return;
        }
    }
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets mean
    // "use the file position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Moves `src` → `dst` until `src`'s EOF, then half-closes `dst`. Bytes go
/// through a pipe made for each burst; when no pipe can be had (descriptor
/// limit), the rest of the direction is copied through a buffer (copy plane),
/// so the tunnel goes on.
pub(super) async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Moved,
    src_side: Side,
) -> Result<(), DirectionError> {
    loop {
        src.readable()
            .await
            .map_err(|e| pump::error_on(src_side, e))?;
        let pipe = match Pipe::take() {
            Ok(pipe) => pipe,
            Err(err) => {
                log::debug!("splice: no pipe ({err}); copying this direction instead");
                return super::copy::copy_one_way(src, dst, moved, src_side).await;
            }
        };
        // Keep the pipe while the source has more; close it before waiting.
        loop {
            let in_pipe = match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_BYTES as usize)
            }) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(pump::error_on(src_side, err)),
            };
            if in_pipe == 0 {
                pipe.give_back();
                return pump::shutdown_write(dst).map_err(|e| pump::error_on(src_side.peer(), e));
            }
            let mut left = in_pipe;
            while left > 0 {
                dst.writable()
                    .await
                    .map_err(|e| pump::error_on(src_side.peer(), e))?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
                }) {
                    Ok(n) => {
                        left -= n;
                        moved.add(n);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(pump::error_on(src_side.peer(), err)),
                }
            }
        }
        // Every byte spliced in went out (an error returned above, and the
        // pipe, possibly holding bytes, was closed).
        pipe.give_back();
    }
}
