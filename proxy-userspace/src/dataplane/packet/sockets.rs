//! The socket options and ioctls of the cut-over: `TCP_REPAIR` and what it
//! unlocks (`TCP_QUEUE_SEQ`), `TCP_TIMESTAMP`, `TCP_QUICKACK`, `SO_MEMINFO`,
//! `SO_PEEK_OFF`, `MSG_TRUNC`, `SIOCINQ`/`SIOCOUTQ` and the `TCP_INFO` fields
//! qualification needs.

use std::{io, os::fd::AsRawFd, os::fd::BorrowedFd};

use crate::sockopt::{getsockopt, send_queue_len, setsockopt};

const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_REPAIR_WINDOW: libc::c_int = 29;
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
/// Leave repair mode without the window probe `TCP_REPAIR_OFF` sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_RMEM_ALLOC: usize = 0;
const SK_MEMINFO_BACKLOG: usize = 7;

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &value.to_ne_bytes())
}

/// Puts the socket in repair mode. Measured on 6.18: `send` fails (EINVAL),
/// `recv` too unless `MSG_PEEK` (EPERM), and closing sends neither FIN nor
/// RST (the peer learns nothing; its next segment gets a RST from this host).
/// But it is not silent by itself: it still processes incoming segments and
/// ACKs them, and its retransmission and loss-probe timers still fire and
/// send. A promoted tunnel's sockets stay quiet because nothing reaches them
/// once the tc program translates, their send queues were acknowledged before
/// the cut, and the egress program drops whatever they send anyway.
pub fn repair_on(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
}

/// Leaves repair mode; with `probe`, the kernel sends a window probe (an ACK
/// with sequence number `snd_una - 1`, which the peer answers with an ACK).
pub fn repair_off(fd: BorrowedFd<'_>, probe: bool) -> io::Result<()> {
    let value = if probe {
        TCP_REPAIR_OFF
    } else {
        TCP_REPAIR_OFF_NO_WP
    };
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, value)
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

/// Reads both queue sequence numbers (the socket must be in repair mode).
pub fn queue_seqs(fd: BorrowedFd<'_>) -> io::Result<QueueSeqs> {
    let read = |queue| -> io::Result<u32> {
        set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)?;
        getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)
    };
    let seqs = QueueSeqs {
        recv: read(TCP_RECV_QUEUE)?,
        send: read(TCP_SEND_QUEUE)?,
    };
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)?;
    Ok(seqs)
}

/// The window state of a socket in repair mode (`struct tcp_repair_window`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The send window the peer offers, in bytes.
    pub snd_wnd: u32,
    /// The largest window the peer ever offered.
    pub max_window: u32,
    /// The receive window this socket last offered, in bytes.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when that window was offered: its right edge is
    /// `rcv_wup + rcv_wnd`.
    pub rcv_wup: u32,
}

impl RepairWindow {
    /// Bytes the peer may still send past `rcv_nxt` under the window this
    /// socket offered (0: the peer has sent all it may, and all of it came).
    pub fn receive_room(&self, rcv_nxt: u32) -> u32 {
        let edge = self.rcv_wup.wrapping_add(self.rcv_wnd);
        let room = edge.wrapping_sub(rcv_nxt);
        if (room as i32) < 0 {
            0
        } else {
            room
        }
    }
}

/// Reads the window state (`TCP_REPAIR_WINDOW`; the socket must be in repair
/// mode).
pub fn repair_window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    getsockopt::<RepairWindow>(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW)
}

/// In repair mode, `TCP_MAXSEG` reads the MSS the peer announced
/// (`rx_opt.mss_clamp`) instead of the current send MSS.
pub fn peer_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)
}

/// The socket's TSval clock now (`TCP_TIMESTAMP`: the kernel's timestamp
/// clock plus the socket's random offset).
pub fn timestamp_now(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP)
}

/// Caps the receive window the socket offers (`TCP_WINDOW_CLAMP`; the kernel
/// raises values below half its minimum receive buffer).
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    set_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX),
    )
}

/// Sets `SO_PEEK_OFF`: with an offset (`Some`), each `MSG_PEEK` read starts
/// where the last one ended, and reads move it back by what they consume;
/// `None` turns it off (every peek starts at the head of the queue). TCP
/// supports it since Linux 6.10 (commit 05ea491641d3).
pub fn set_peek_offset(fd: BorrowedFd<'_>, offset: Option<u32>) -> io::Result<()> {
    let value = offset.map_or(-1, |offset| {
        libc::c_int::try_from(offset).unwrap_or(libc::c_int::MAX)
    });
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, value)
}

/// Copies bytes from the receive queue without consuming them (`MSG_PEEK`,
/// from the peek offset when one is set). Never blocks.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Drops up to `len` bytes from the head of the receive queue without copying
/// them: TCP's `recvmsg` with `MSG_TRUNC` frees the data and returns its
/// length (`tcp_recvmsg_locked` skips the copy). Returns the bytes dropped;
/// `WouldBlock` when there are none.
pub fn drop_received(fd: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: with MSG_TRUNC TCP writes nothing through the buffer pointer; a
    // null one makes any write the kernel did attempt fail (EFAULT) instead
    // of touching memory.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Sends a pending delayed ACK now (`TCP_QUICKACK`).
pub fn quickack(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)
}

/// Bytes readable from the receive queue (`SIOCINQ`).
pub fn recv_queue_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one int through the pointer, which is
    // valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Memory the socket holds on the receive side: the receive and out-of-order
/// queues (`SO_MEMINFO` rmem_alloc) plus the backlog of segments that arrived
/// while it was locked.
pub fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = getsockopt::<[u32; 9]>(fd, libc::SOL_SOCKET, SO_MEMINFO)?;
    Ok(u64::from(info[SK_MEMINFO_RMEM_ALLOC]) + u64::from(info[SK_MEMINFO_BACKLOG]))
}

/// Whether nothing is in flight through the socket: nothing to read, nothing
/// held (out of order, backlog), nothing sent and not acknowledged.
pub fn quiet(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(recv_queue_len(fd)? == 0 && receive_memory(fd)? == 0 && send_queue_len(fd)? == 0)
}

/// `TCPI_OPT_*` bits of `tcpi_options`.
pub mod tcpi_opt {
    pub const TIMESTAMPS: u8 = 1;
    pub const SACK: u8 = 2;
    #[cfg(test)]
    pub const WSCALE: u8 = 4;
    pub const ECN: u8 = 8;
    pub const SYN_DATA: u8 = 32;
    pub const USEC_TS: u8 = 64;
    pub const TFO_CHILD: u8 = 128;
}

/// The `TCP_INFO` fields qualification reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// TCP state (`tcp_state` numbers).
    pub state: u8,
    /// `tcpi_options` ([`tcpi_opt`] bits).
    pub options: u8,
    /// The shift the peer applies to its window fields.
    pub snd_wscale: u8,
    /// The shift this socket applies to its window fields.
    pub rcv_wscale: u8,
    /// The MSS the socket announced (no options deducted).
    pub advmss: u32,
    /// The path MTU the socket uses.
    pub pmtu: u32,
    /// The MSS the peer announced (`TCP_MAXSEG` in repair mode; 0 until read).
    pub peer_mss: u32,
    /// Whether the socket is Multipath TCP (`SO_PROTOCOL` is `IPPROTO_MPTCP`).
    pub mptcp: bool,
    /// The larger of the socket's smoothed round-trip time and its
    /// receiver-side estimate, in microseconds.
    pub rtt_us: u32,
}

/// Reads [`ConnInfo`].
pub fn conn_info(fd: BorrowedFd<'_>) -> io::Result<ConnInfo> {
    // Offsets from include/uapi/linux/tcp.h (stable ABI): tcpi_state 0,
    // tcpi_options 5, tcpi_snd_wscale:4 / tcpi_rcv_wscale:4 6, tcpi_pmtu 60,
    // tcpi_rtt 68, tcpi_advmss 84, tcpi_rcv_rtt 92.
    let raw = getsockopt::<[u8; 104]>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let u32_at =
        |offset: usize| u32::from_ne_bytes(raw[offset..offset + 4].try_into().expect("4 bytes"));
    Ok(ConnInfo {
        state: raw[0],
        options: raw[5],
        snd_wscale: raw[6] & 0x0f,
        rcv_wscale: raw[6] >> 4,
        advmss: u32_at(84),
        pmtu: u32_at(60),
        peer_mss: 0,
        mptcp: getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?
            == libc::IPPROTO_MPTCP,
        rtt_us: u32_at(68).max(u32_at(92)),
    })
}
