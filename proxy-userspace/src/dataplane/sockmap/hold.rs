//! The copy of a held-back direction: while flow control holds a direction,
//! the verdict passes its skbs to the source socket's own queue; once the
//! bytes redirected before the pause have reached the destination, this task
//! reads the passed bytes and writes them to the destination, publishing its
//! count so the verdict knows when to redirect again (see
//! `proxy_common::FlowControl`).

use std::{
    io,
    net::TcpStream,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use proxy_common::flow_mode;
use tokio::io::AsyncWriteExt as _;

use super::kernel::Kernel;

/// Read size of a held-back direction's copy.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
/// First and longest wait of a copy with nothing to read before it re-checks
/// whether the verdict has resumed or the stream has ended.
const COPY_IDLE_MIN: Duration = Duration::from_millis(1);
const COPY_IDLE_MAX: Duration = Duration::from_millis(64);

/// How a copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyEnd {
    /// Passed bytes copied, over all holds of the direction.
    pub copied: u64,
    /// Whether the verdict redirects again (otherwise the stream ended).
    pub resumed: bool,
}

/// Copies the bytes the verdict passed to `src`'s own queue into `dst`,
/// publishing the count in `FLOW_CONTROL` (mode `RESUMING`) after each write,
/// until the verdict has switched back to redirecting or the stream has ended
/// with every passed byte copied. `copied` is the direction's count so far;
/// `total_copied` counts every copied byte of the plane.
///
/// Reads go through tcp_bpf_recvmsg, which returns the passed skbs. Its 0 is
/// not trusted as the end: it returns 0 once the FIN is in while passed skbs
/// can still wait on the psock's backlog to reach the queue it reads.
pub async fn copy_passed(
    kernel: Arc<Kernel>,
    cookie: u64,
    src: TcpStream,
    dst: TcpStream,
    mut copied: u64,
    total_copied: Arc<AtomicU64>,
) -> anyhow::Result<CopyEnd> {
    // Duplicates, registered with tokio for this copy only; the originals stay
    // out of the reactor.
    let src = tokio::net::TcpStream::from_std(src)?;
    let mut dst = tokio::net::TcpStream::from_std(dst)?;
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut idle = COPY_IDLE_MIN;
    loop {
        // Wait for passed bytes, or a tick to see whether the verdict has
        // taken the direction back (or the stream ended). The tick backs off
        // while nothing arrives.
        let read = tokio::select! {
            ready = src.readable() => {
                ready?;
                match src.try_read(&mut buf) {
                    Ok(n) => Some(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            () = tokio::time::sleep(idle) => None,
        };
        let Some(read @ 1..) = read else {
            let (entry, control) = kernel.flow_and_control(cookie);
            if copied > entry.bytes_passed {
                // Bytes that never went through the verdict: the hand-back
                // could reorder the stream, so the tunnel ends instead.
                anyhow::bail!(
                    "copied {copied} bytes but the verdict passed {}",
                    entry.bytes_passed
                );
            }
            let ended = entry.eof_target_plus_one != 0
                && entry.bytes_redirected + entry.bytes_passed + 1 >= entry.eof_target_plus_one;
            let resumed = control.mode == flow_mode::REDIRECT;
            if copied == entry.bytes_passed && (resumed || ended) {
                return Ok(CopyEnd { copied, resumed });
            }
            if read == Some(0) {
                // At EOF the socket stays readable; do not spin on it.
                tokio::time::sleep(idle).await;
            }
            idle = (idle * 2).min(COPY_IDLE_MAX);
            continue;
        };
        log::trace!("flow control: copy {cookie:x} read {read} at copied {copied}");
        idle = COPY_IDLE_MIN;
        dst.write_all(&buf[..read]).await?;
        copied += read as u64;
        total_copied.fetch_add(read as u64, Ordering::Relaxed);
        kernel.set_flow_control(cookie, flow_mode::RESUMING, copied)?;
    }
}
