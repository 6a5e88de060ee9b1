//! Thin, safe wrappers over the socket options and ioctls spliced needs beyond
//! what `socket2` offers: socket cookies, `TCP_INFO`, `SIOCOUTQ`, `SIOCINQ`,
//! `SO_RCVLOWAT`, `TCP_CONGESTION`, `SO_SNDBUFFORCE`, `TCP_REPAIR` and the
//! sequence numbers it unlocks (`TCP_QUEUE_SEQ`).

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd, BorrowedFd},
};

pub(crate) fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes that lives across the call,
    // and the kernel writes at most `len` bytes; T is plain old data.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and (partly) filled by the kernel; any bytes are a valid T.
    Ok(unsafe { value.assume_init() })
}

pub(crate) fn setsockopt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is a readable buffer of the given length for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The socket's cookie (`SO_COOKIE`): the key `bpf_get_socket_cookie` returns.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The fields of `struct tcp_info` spliced reads.
#[derive(Clone, Copy, Debug)]
pub struct TcpInfo {
    /// TCP state (`tcp_state` numbers).
    pub state: u8,
    /// Bytes acknowledged by the peer (RFC 4898 tcpEStatsAppHCThruOctetsAcked);
    /// an active open counts its SYN here too.
    pub bytes_acked: u64,
    /// Sequence space received: payload bytes, plus one for a received FIN.
    pub bytes_received: u64,
}

/// Reads `TCP_INFO`.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    // libc's tcp_info stops before the 64-bit counters, so read the raw struct.
    // Offsets from include/uapi/linux/tcp.h (stable ABI): tcpi_state at 0,
    // tcpi_bytes_acked at 120, tcpi_bytes_received at 128.
    let raw = getsockopt::<[u8; 232]>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let u64_at =
        |offset: usize| u64::from_ne_bytes(raw[offset..offset + 8].try_into().expect("8 bytes"));
    Ok(TcpInfo {
        state: raw[0],
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
    })
}

/// Bytes in the send queue not yet acknowledged (`SIOCOUTQ`), FIN included.
pub fn send_queue_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Everything ever written into the socket's send path: acknowledged bytes plus
/// the send queue, i.e. `write_seq` minus a constant (the SYN for active opens).
///
/// `bytes_acked` is read before the queue: an ACK landing between the two reads
/// then makes the sum smaller, never larger, so callers may wait a little longer
/// but never shut a socket down before its bytes are queued.
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_info(fd)?.bytes_acked;
    Ok(acked + send_queue_len(fd)?)
}

/// Sets `SO_RCVLOWAT`. For a socket in a sockmap the kernel also runs the
/// socket's data-ready callback (tcp_set_rcvlowat → tcp_data_ready), which makes
/// the verdict process bytes that were queued before insertion.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        &bytes.to_ne_bytes(),
    )
}

/// Sets the socket's congestion control algorithm (`TCP_CONGESTION`).
pub fn set_congestion(fd: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_bytes())
}

/// Sets the send buffer to `bytes` (the kernel's accounting size, i.e. what
/// `SO_SNDBUF` reads back): `SO_SNDBUFFORCE` where the process has
/// `CAP_NET_ADMIN`, else `SO_SNDBUF`, which `net.core.wmem_max` caps. Either
/// locks the size (no more autotuning). Returns the size now in force.
pub fn force_send_buffer(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<u32> {
    // The kernel doubles the value it is given to leave room for its overhead
    // (sock_setsockopt → __sock_set_sndbuf).
    let requested = i32::try_from(bytes / 2).unwrap_or(i32::MAX).to_ne_bytes();
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &requested).is_err() {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &requested)?;
    }
    let size: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok(u32::try_from(size).unwrap_or(0))
}

/// Takes the socket's pending error (`SO_ERROR`), if any.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let errno = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((errno != 0).then(|| io::Error::from_raw_os_error(errno)))
}

/// Bytes in the receive queue ready to read (`SIOCINQ`/`FIONREAD`).
pub fn readable_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

// `TCP_REPAIR` values (include/uapi/linux/tcp.h), not in libc for Linux.
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
/// Leave repair mode without the window probe `TCP_REPAIR_OFF` sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// Puts the socket in repair mode (`TCP_REPAIR`; needs `CAP_NET_ADMIN`).
/// Measured on 6.18: `send` fails (EINVAL), `recv` too unless `MSG_PEEK`
/// (EPERM), and closing sends neither FIN nor RST (the peer learns nothing;
/// its next segment gets a RST from this host). But it is not silent by
/// itself: it still processes incoming segments and ACKs them, and its
/// retransmission and loss-probe timers still fire and send.
pub fn repair_on(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_ON)
}

/// Leaves repair mode; with `probe`, the kernel sends a window probe (an ACK
/// with sequence number `snd_una - 1`, which the peer answers with an ACK).
///
/// Then sets `SO_REUSEADDR` again: leaving repair mode sets `sk_reuse` to
/// `SK_NO_REUSE` whatever it was (net/ipv4/tcp.c, `do_tcp_setsockopt`,
/// `TCP_REPAIR`), so an accepted socket loses the `SO_REUSEADDR` it
/// inherited from the listener, and its `TIME_WAIT` then keeps the listening
/// address from being bound for 60 s: a restarted spliced failed with
/// `EADDRINUSE`. On an upstream socket it only lets a later bind to that exact
/// address and port succeed against the `TIME_WAIT`, as `SO_REUSEADDR` does.
pub fn repair_off(fd: BorrowedFd<'_>, probe: bool) -> io::Result<()> {
    let value = if probe {
        TCP_REPAIR_OFF
    } else {
        TCP_REPAIR_OFF_NO_WP
    };
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, value)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
}

/// The sequence state of a socket in repair mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSeqs {
    /// `rcv_nxt`: the next sequence number expected from the peer.
    pub recv: u32,
    /// `write_seq`: the sequence number after the last byte queued for sending
    /// (`snd_nxt` when the send queue is empty).
    pub send: u32,
}

/// Reads both queue sequence numbers (`TCP_REPAIR_QUEUE`, `TCP_QUEUE_SEQ`;
/// the socket must be in repair mode).
pub fn queue_seqs(fd: BorrowedFd<'_>) -> io::Result<QueueSeqs> {
    const TCP_NO_QUEUE: libc::c_int = 0;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let read = |queue| -> io::Result<u32> {
        set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
        getsockopt::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)
    };
    let seqs = QueueSeqs {
        recv: read(TCP_RECV_QUEUE)?,
        send: read(TCP_SEND_QUEUE)?,
    };
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE)?;
    Ok(seqs)
}

pub(crate) fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &value.to_ne_bytes())
}
