//! The splice pump a tunnel runs on until it is promoted: splice.rs's loop,
//! plus what the cut-over needs of it — a flag per direction that is clear
//! only while no byte is between its two sockets (so stopping it there loses
//! nothing), a notification when the tunnel has moved `--promote-after`
//! bytes, and a pause: a paused direction reads nothing more from its source
//! (whose receive window then fills and stops the sender without a loss)
//! until it is resumed.

use std::{
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::{
    io::Interest,
    net::TcpStream,
    sync::{watch, Notify},
};

use crate::dataplane::{
    pump::{self, DirectionError, Moved},
    splice::{splice, Pipe, PIPE_BYTES},
    Side,
};

/// Whether the directions may read: the cut-over pauses them.
#[derive(Debug)]
pub struct Pause {
    paused: watch::Sender<bool>,
}

impl Default for Pause {
    fn default() -> Self {
        Self {
            paused: watch::Sender::new(false),
        }
    }
}

impl Pause {
    /// Stops both directions from reading (each finishes the bytes in its pipe).
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Lets both directions read again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Returns once the directions may read.
    async fn wait(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|paused| !*paused).await;
    }

    fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }
}

/// Both directions' progress toward `--promote-after`.
#[derive(Debug)]
pub struct Threshold {
    moved: AtomicU64,
    at: u64,
    reached: Notify,
}

impl Threshold {
    /// Reached once the directions have moved `at` bytes together.
    pub fn new(at: u64) -> Self {
        Self {
            moved: AtomicU64::new(0),
            at,
            reached: Notify::new(),
        }
    }

    fn add(&self, bytes: u64) {
        let before = self.moved.fetch_add(bytes, Ordering::Relaxed);
        if before < self.at && before + bytes >= self.at {
            self.reached.notify_one();
        }
    }

    /// Returns once the threshold is reached.
    pub async fn reached(&self) {
        if self.at == 0 {
            return;
        }
        loop {
            let notified = self.reached.notified();
            if self.moved.load(Ordering::Relaxed) >= self.at {
                return;
            }
            notified.await;
        }
    }
}

/// Moves `src` → `dst` until `src`'s EOF, then half-closes `dst`, like
/// `splice::splice_one_way`. `busy` is set while bytes are in the pipe (or
/// the direction fell back to copying, which keeps bytes in user space).
/// While `pause` says so it reads nothing.
pub async fn relay_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Moved,
    src_side: Side,
    busy: &AtomicBool,
    threshold: &Threshold,
    pause: &Pause,
) -> Result<(), DirectionError> {
    loop {
        busy.store(false, Ordering::Relaxed);
        pause.wait().await;
        src.readable()
            .await
            .map_err(|e| pump::error_on(src_side, e))?;
        if pause.is_paused() {
            continue;
        }
        busy.store(true, Ordering::Relaxed);
        let pipe = match Pipe::take() {
            Ok(pipe) => pipe,
            Err(err) => {
                log::debug!("packet: no pipe ({err}); copying this direction instead");
                return crate::dataplane::copy::copy_one_way(src, dst, moved, src_side).await;
            }
        };
        loop {
            if pause.is_paused() {
                break;
            }
            let in_pipe = match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_BYTES as usize)
            }) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
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
                        threshold.add(n as u64);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(pump::error_on(src_side.peer(), err)),
                }
            }
        }
        // Empty: every byte spliced in went out (errors returned above).
        pipe.give_back();
    }
}
