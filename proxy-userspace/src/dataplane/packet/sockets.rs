//! The socket options and calls of the cut-over beyond `sockopt.rs`'s
//! repair-mode basics: `TCP_REPAIR_WINDOW`, `TCP_TIMESTAMP`, `TCP_MAXSEG` in
//! repair mode, `TCP_QUICKACK`, `TCP_WINDOW_CLAMP`, `SO_MEMINFO`,
//! `SO_PEEK_OFF`, `MSG_PEEK` and `MSG_TRUNC`, and the `TCP_INFO` fields
//! qualification needs.

use std::{io, os::fd::AsRawFd, os::fd::BorrowedFd};

use crate::sockopt::{getsockopt, set_int};
pub use crate::sockopt::{queue_seqs, repair_off, repair_on, QueueSeqs};

const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_RMEM_ALLOC: usize = 0;
const SK_MEMINFO_BACKLOG: usize = 7;

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
    getsockopt::<RepairWindow>(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW)
}

/// In repair mode, `TCP_MAXSEG` reads the MSS the peer announced
/// (`rx_opt.mss_clamp`) instead of the current send MSS.
pub fn peer_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)
}

/// The socket's TSval clock now (`TCP_TIMESTAMP`: the kernel's timestamp
/// clock plus the socket's random offset).
pub fn timestamp_now(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)
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

/// Memory the socket holds on the receive side: the receive and out-of-order
/// queues (`SO_MEMINFO` rmem_alloc) plus the backlog of segments that arrived
/// while it was locked.
pub fn receive_memory(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = getsockopt::<[u32; 9]>(fd, libc::SOL_SOCKET, SO_MEMINFO)?;
    Ok(u64::from(info[SK_MEMINFO_RMEM_ALLOC]) + u64::from(info[SK_MEMINFO_BACKLOG]))
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
