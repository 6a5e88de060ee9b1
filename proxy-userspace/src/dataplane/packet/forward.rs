//! The stop-and-forward cut-over's own byte moving: what a stopped peer left
//! in its proxy socket's receive queue is *peeked* and written to the other
//! proxy socket, so the window that stopped the peer stays shut until the
//! cut; after the cut (or when the cut-over gives up) the forwarded bytes are
//! dropped from the queue without being copied again.
//!
//! `SO_PEEK_OFF` makes each peek continue where the last one ended, so bytes
//! that arrive late are forwarded once, and `MSG_TRUNC` drops without a copy:
//! every byte crosses user space once, as it does through the splice pump.

use std::{io, os::fd::AsFd, sync::PoisonError};

use tokio::net::TcpStream;

use super::{cutover::Conn, sockets};

/// Writes to `to` what `from`'s receive queue holds beyond the `forwarded`
/// bytes already written, as far as `to` takes it now (its send buffer may
/// be full: the far end is not reading); the rest waits in `from.unsent` for
/// the next call, which writes it before it peeks again. The bytes are
/// peeked, so nothing is consumed and `from`'s window stays as it is.
/// `forwarded` and `from`'s byte count count every byte written.
pub fn forward_new(from: &Conn<'_>, to: &TcpStream, forwarded: &mut u64) -> io::Result<()> {
    let (moved, fd) = (from.moved, from.socket.as_fd());
    let mut unsent = from.unsent.lock().unwrap_or_else(PoisonError::into_inner);
    if unsent.is_empty() {
        let queued = crate::sockopt::readable_bytes(fd)?;
        if queued <= *forwarded {
            return Ok(());
        }
        unsent.resize(
            usize::try_from(queued - *forwarded).map_err(io::Error::other)?,
            0,
        );
        // The peek starts just past what was forwarded. With the pump paused
        // nothing else reads the queue.
        sockets::set_peek_offset(
            fd,
            Some(u32::try_from(*forwarded).map_err(io::Error::other)?),
        )?;
        let peeked = sockets::peek(fd, &mut unsent)?;
        if peeked != unsent.len() {
            let queued = unsent.len();
            unsent.clear();
            return Err(io::Error::other(format!(
                "peeked {peeked} of {queued} queued bytes"
            )));
        }
    }
    let mut written = 0;
    while written < unsent.len() {
        match to.try_write(&unsent[written..]) {
            Ok(n) => {
                written += n;
                *forwarded += n as u64;
                moved.add(n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => {
                unsent.drain(..written);
                return Err(err);
            }
        }
    }
    unsent.drain(..written);
    Ok(())
}

/// Forgets what was peeked from `from` and not written (the cut-over gave
/// up: the pump reads those bytes again).
pub fn forget_unsent(from: &Conn<'_>) {
    from.unsent
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// Drops the `forwarded` bytes from `from`'s receive queue (they are there:
/// peeked, not read) and turns the peek offset off again.
pub fn finish(from: &TcpStream, forwarded: u64) -> io::Result<()> {
    let fd = from.as_fd();
    let mut left = forwarded;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX);
        match sockets::drop_received(fd, want) {
            Ok(0) => {
                return Err(io::Error::other(format!(
                    "end of stream with {left} forwarded bytes still to drop"
                )))
            }
            Ok(n) => left -= n as u64,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::other(format!(
                    "{left} forwarded bytes not in the receive queue"
                )))
            }
            Err(err) => return Err(err),
        }
    }
    sockets::set_peek_offset(fd, None)
}
