//! Types shared by the eBPF programs (`proxy-ebpf`) and the user-space process
//! (`proxy-userspace`). Every type here is `#[repr(C)]` and has the same layout on
//! both sides; with the `user` feature they implement `aya::Pod` and
//! `bytemuck::Pod` so user space can read them out of maps and the ring buffer.
#![no_std]

pub mod packet;
pub use packet::{
    packet_config, packet_flags, packet_forward, packet_stat, packet_state, PacketEntry,
    PacketEvent, PacketEventKind, PacketKey, V4_MAPPED_PREFIX,
};

/// Value of the `FLOWS` map, keyed by the socket cookie of one side of a tunnel.
///
/// One direction of the tunnel: bytes that arrive on this socket and leave
/// through the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// Socket cookie of the other side of the tunnel: the key under which the
    /// redirect target is found in `REDIRECT_TARGETS`.
    pub peer_cookie: u64,
    /// Payload bytes received on this socket that the verdict redirected to the peer.
    pub bytes_redirected: u64,
    /// Bytes of this socket's stream that user space read itself before the
    /// socket was spliced (request head and pipelined bytes); set at insertion.
    pub consumed_by_user: u64,
    /// Once the peer's FIN has arrived: 1 + the number of bytes the verdict must
    /// redirect in all (0 while the stream is still open).
    pub eof_target_plus_one: u64,
    /// Non-zero once the [`FlowEventKind::Drained`] event has been sent.
    pub drained_reported: u64,
    /// Payload bytes received on this socket that the verdict passed to the
    /// socket's own queue while flow control held the direction back; user
    /// space copies them (see [`FlowControl`]).
    pub bytes_passed: u64,
    /// TCP sequence number just past the last payload byte the verdict handled
    /// (valid once `flags` has [`flow_flags::SEQ_KNOWN`]); bytes of a later
    /// skb before it were handled already and are trimmed off.
    pub next_seq: u32,
    /// [`flow_flags`], set by the verdict.
    pub flags: u32,
}

/// Bits of [`FlowEntry::flags`].
pub mod flow_flags {
    /// The verdict has seen the socket's first skb: `next_seq` is valid.
    pub const SEQ_KNOWN: u32 = 1;
    /// An skb could not be trimmed and was dropped: the direction has a hole,
    /// so the verdict drops every later skb too until user space resets the
    /// tunnel.
    pub const BROKEN: u32 = 2;
}

/// Value of the `FLOW_CONTROL` map, keyed by socket cookie: present while user
/// space holds a direction back because the peer's redirect backlog is too long.
///
/// Written by user space (whole-value updates); the verdict only ever sets
/// `mode` from [`flow_mode::RESUMING`] to [`flow_mode::REDIRECT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// One of [`flow_mode`].
    pub mode: u64,
    /// Of `FlowEntry::bytes_passed`, how many user space has read and written
    /// to the peer socket so far.
    pub bytes_copied: u64,
}

/// Values of [`FlowControl::mode`].
pub mod flow_mode {
    /// The verdict redirects (as with no `FLOW_CONTROL` entry).
    pub const REDIRECT: u64 = 0;
    /// The verdict passes every skb to the socket's own queue, where it is
    /// charged to the socket's receive buffer, so TCP's window stops the sender.
    pub const PAUSED: u64 = 1;
    /// The verdict passes until user space has copied every passed byte
    /// (`bytes_copied == bytes_passed`), then switches to `REDIRECT` itself: only
    /// then can a redirected skb not overtake a passed one.
    pub const RESUMING: u64 = 2;
}

/// What a [`FlowEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEventKind {
    /// The socket changed TCP state (see `old_state` / `new_state`).
    StateChange = 1,
    /// The peer closed its side of this socket and the verdict has handled
    /// (redirected or passed) every byte it sent: `bytes_redirected` is this
    /// direction's final count, passed bytes included.
    Drained = 2,
    /// The verdict's count crossed a multiple of [`PROGRESS_EVERY_BYTES`]: user
    /// space checks that the peer keeps up (flow control) and feeds its counters.
    Progress = 3,
    /// The verdict met a retransmission that repeats more handled bytes than
    /// it can trim and dropped it: the direction can no longer be exact, so
    /// user space resets the tunnel.
    OverlapNotTrimmed = 4,
}

/// How many redirected bytes of one direction between two `Progress` events.
pub const PROGRESS_EVERY_BYTES: u64 = 2 * 1024 * 1024;

/// One record of the `FLOW_EVENTS` ring buffer, written by the `sock_ops` program
/// when a socket that belongs to a tunnel changes TCP state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Socket cookie (`SO_COOKIE`) of the socket whose state changed.
    pub cookie: u64,
    /// `FlowEntry::bytes_redirected` of that socket when the state changed.
    pub bytes_redirected: u64,
    /// [`FlowEventKind`] as a number.
    pub kind: u32,
    /// TCP state before the change (`TCP_ESTABLISHED` = 1 … `TCP_CLOSING` = 11).
    pub old_state: u32,
    /// TCP state after the change.
    pub new_state: u32,
    /// Explicit padding so the layout has no hidden bytes.
    pub _pad: u32,
}

/// Indexes into the `STATS` array: kernel-side counters that user space reports.
pub mod stat {
    /// Zero-length skbs (a FIN without data) that the verdict dropped instead of
    /// redirecting; redirecting one makes the peer's send path fail with EPIPE.
    pub const ZERO_LENGTH_DROPPED: u32 = 0;
    /// skbs whose redirect failed (peer not in `REDIRECT_TARGETS`).
    pub const REDIRECT_FAILED: u32 = 1;
    /// skbs on a socket in `SPLICED` that had no `FLOWS` entry (passed to the socket).
    pub const NO_FLOW: u32 = 2;
    /// Flow events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 3;
    /// Payload bytes the verdict trimmed off skbs because they repeated bytes it
    /// had handled already (a retransmission that overlapped received data).
    pub const DUPLICATE_BYTES_TRIMMED: u32 = 4;
    /// skbs that started after the byte the verdict expected next. TCP hands
    /// the verdict its stream in order, so this stays 0 unless the sequence
    /// numbers it reads are wrong.
    pub const SEQUENCE_GAPS: u32 = 5;
    /// skbs whose repeated bytes could not be trimmed (`bpf_skb_adjust_room`
    /// failed or the overlap was longer than the verdict trims); each was
    /// dropped and its tunnel reset.
    pub const TRIM_FAILED: u32 = 6;
    /// The longest overlap the verdict trimmed off one skb, in bytes.
    pub const LONGEST_OVERLAP: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
}

#[cfg(feature = "user")]
mod user {
    use super::{FlowControl, FlowEntry, FlowEvent};

    // SAFETY: all three are #[repr(C)], made only of integers, and have no padding
    // (FlowEvent's padding is an explicit field), so every bit pattern is valid.
    unsafe impl aya::Pod for FlowEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowControl {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: see above.
    unsafe impl bytemuck::Zeroable for FlowEvent {}
    // SAFETY: see above.
    unsafe impl bytemuck::Pod for FlowEvent {}
}
