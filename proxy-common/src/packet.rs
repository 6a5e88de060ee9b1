//! Types shared by the packet data plane's tc programs (`proxy-ebpf/src/packet.rs`)
//! and user space (`proxy-userspace/src/dataplane/packet/`).
//!
//! A promoted tunnel is two TCP connections, client ↔ proxy (A) and proxy ↔
//! upstream (B). The tc program keys `PACKET_FLOWS` by the 4-tuple of the
//! segments that *arrive* at the proxy: one entry for the client's segments on A
//! and one for the upstream's segments on B. Each entry says how to turn such a
//! segment into the matching segment of the other connection.

/// Key of `PACKET_FLOWS`: a segment's addresses and ports as they are on the wire
/// when it arrives at the proxy. IPv4 addresses are IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`), so a client of a `[::]` listener whose socket address is
/// v4-mapped has the same key as its IPv4 segments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PacketKey {
    /// Source address (IPv4-mapped for IPv4).
    pub saddr: [u8; 16],
    /// Destination address (IPv4-mapped for IPv4).
    pub daddr: [u8; 16],
    /// Source port, network byte order (the wire bytes).
    pub sport: [u8; 2],
    /// Destination port, network byte order (the wire bytes).
    pub dport: [u8; 2],
}

impl PacketKey {
    /// The key of segments going the other way on the same connection.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// The first 12 bytes of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Value of `PACKET_FLOWS`: one direction of one connection of a tunnel.
///
/// User space creates and replaces whole values (a hash map update installs a
/// new element; a program already running keeps the old one for that packet).
/// Fields under "written by the program" are updated in place by the tc
/// programs; user space copies them over when it replaces a value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketEntry {
    // --- written by user space ---
    /// The tunnel's id (both entries of a tunnel share it); events carry it.
    pub flow_id: u64,
    /// `SO_COOKIE` of the proxy's own socket on this connection: at egress,
    /// a segment of the reverse tuple from this socket is the proxy's own.
    pub socket_cookie: u64,
    /// One of [`packet_state`].
    pub state: u32,
    /// [`packet_config`] bits.
    pub config: u32,
    /// HOLD: segments whose payload or FIN starts at or after this sequence
    /// number are dropped (the sender retransmits them after the cut-over).
    pub hold_edge: u32,
    /// TRANSLATE: added to the sequence number.
    pub seq_delta: u32,
    /// TRANSLATE: added to the acknowledgement number and to SACK block edges.
    pub ack_delta: u32,
    /// TRANSLATE: added to TSval.
    pub tsval_delta: u32,
    /// TRANSLATE: added to a non-zero TSecr.
    pub tsecr_delta: u32,
    /// TRANSLATE: the window field is `(window << win_shift_in) >> win_shift_out`,
    /// at most 65535.
    pub win_shift_in: u8,
    /// See `win_shift_in`.
    pub win_shift_out: u8,
    /// One of [`packet_forward`].
    pub forward: u8,
    /// Explicit padding.
    pub _pad0: u8,
    /// TRANSLATE with [`packet_forward::REDIRECT_NEIGH`]: the device the
    /// translated segment leaves by.
    pub out_ifindex: u32,
    /// TRANSLATE: the segment's new source address (IPv4-mapped for IPv4).
    pub new_saddr: [u8; 16],
    /// TRANSLATE: the segment's new destination address.
    pub new_daddr: [u8; 16],
    /// TRANSLATE: new source port, network byte order.
    pub new_sport: [u8; 2],
    /// TRANSLATE: new destination port, network byte order.
    pub new_dport: [u8; 2],
    /// TRANSLATE: the sequence number of the first byte the translation
    /// forwards (user space also sets `max_end_seq` to it).
    pub count_base: u32,
    /// The key of the tunnel's other entry (the other connection's arriving
    /// segments), where the program notes a FIN it forwarded.
    pub peer_key: PacketKey,
    // --- written by the program ---
    /// [`packet_flags`] bits (set with atomic ORs).
    pub flags: u32,
    /// The device the last segment of this key arrived on (ingress).
    pub in_ifindex: u32,
    /// The device the proxy's own last segment of this connection left by
    /// (egress, the reverse tuple), while not translating.
    pub out_seen_ifindex: u32,
    /// The last TSval of the sender of these segments (valid with
    /// [`packet_flags::TS_SEEN`]).
    pub last_tsval: u32,
    /// Sequence number just past the highest payload byte passed (FIN excluded;
    /// valid with [`packet_flags::SEQ_SEEN`]).
    pub max_end_seq: u32,
    /// The last acknowledgement number passed (as it arrived).
    pub last_ack: u32,
    /// Sequence number of the sender's FIN (valid with [`packet_flags::FIN_SEEN`]).
    pub fin_seq: u32,
    /// Set by the other entry's program when it forwarded a FIN toward this
    /// entry's sender: an acknowledgement number at or after this (as it
    /// arrives here) acknowledges that FIN.
    pub peer_fin_ack: u32,
    /// The last acknowledgement number the proxy's own socket sent on this
    /// connection (egress, before TRANSLATE; valid with
    /// [`packet_flags::PROXY_ACK_SEEN`]). Every segment a socket sends sets
    /// its `rcv_wup` to this value.
    pub proxy_ack: u32,
    /// TRANSLATE: payload bytes forwarded, counted as `max_end_seq` advances
    /// (retransmissions and the FIN excluded).
    pub bytes: u64,
    /// Segments of this key the program saw.
    pub packets: u64,
    /// Segments held: dropped, or passed on as a duplicate that carries only
    /// their acknowledgement (see `packet_stat::HELD_AS_DUPLICATE`).
    pub held: u64,
    /// Segments translated.
    pub translated: u64,
    /// Segments the proxy's own (repair-mode) socket tried to send on this
    /// connection while translating, dropped at egress.
    pub silenced: u64,
}

/// Values of [`PacketEntry::state`].
pub mod packet_state {
    /// Registered, not promoted: the program records sightings and passes.
    pub const MONITOR: u32 = 0;
    /// Cut-over in progress: new payload and FINs are dropped, ACKs,
    /// retransmissions below the hold edge and RSTs pass.
    pub const HOLD: u32 = 1;
    /// Promoted: every segment is rewritten into the other connection's.
    pub const TRANSLATE: u32 = 2;
}

/// Bits of [`PacketEntry::config`].
pub mod packet_config {
    /// The connection is IPv6 on the wire (else IPv4).
    pub const IPV6: u32 = 1;
    /// The proxy socket is in (or entering) repair mode: at egress its
    /// segments are dropped, as in TRANSLATE. Set for the few microseconds
    /// between the two sockets entering repair mode and TRANSLATE, so
    /// neither answers (with its own, older TSval) a segment the first
    /// translated entry provoked.
    pub const SILENT: u32 = 2;
    // 4 was `WAKE`, now the `PACKET_WAKE` map: user space must not replace
    // a translating entry, whose fields the programs update in place.
}

/// Values of [`PacketEntry::forward`].
pub mod packet_forward {
    /// Pass the rewritten segment on (`TC_ACT_OK`): on `lo` the stack delivers
    /// it to the other local endpoint.
    pub const PASS: u8 = 0;
    /// `bpf_redirect_neigh` to `out_ifindex`.
    pub const REDIRECT_NEIGH: u8 = 1;
}

/// Bits of [`PacketEntry::flags`].
pub mod packet_flags {
    /// A segment of this key arrived on an attached device.
    pub const SEEN_INGRESS: u32 = 1;
    /// A segment of the proxy's own socket with the reverse tuple left by an
    /// attached device.
    pub const SEEN_EGRESS: u32 = 2;
    /// `last_tsval` is valid.
    pub const TS_SEEN: u32 = 4;
    /// `max_end_seq` is valid.
    pub const SEQ_SEEN: u32 = 8;
    /// A segment arrived without the timestamp option.
    pub const NO_TS_SEEN: u32 = 16;
    /// TRANSLATE: the sender's FIN was forwarded (`fin_seq`).
    pub const FIN_SEEN: u32 = 32;
    /// `peer_fin_ack` is valid.
    pub const PEER_FIN: u32 = 64;
    /// This entry's sender acknowledged the FIN that came from the other side.
    pub const PEER_FIN_ACKED: u32 = 128;
    /// TRANSLATE: a RST of this key was forwarded.
    pub const RST_SEEN: u32 = 256;
    /// A segment was dropped at the hold edge at least once.
    pub const HELD: u32 = 512;
    /// `proxy_ack` is valid.
    pub const PROXY_ACK_SEEN: u32 = 1024;
    /// TRANSLATE: a SYN without ACK arrived, so the sender has a new
    /// connection on this 4-tuple (its old one is gone, e.g. a client port
    /// reused after the tunnel's end): from then on the entry passes the
    /// key's segments untouched, to the socket that accepts the new one.
    pub const REUSED: u32 = 2048;
}

/// What a [`PacketEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketEventKind {
    /// The entry's sender acknowledged the other side's FIN.
    FinAcked = 1,
    /// A RST was forwarded.
    Reset = 2,
    /// A new connection took the entry's 4-tuple ([`packet_flags::REUSED`]).
    Reused = 3,
}

/// One record of the `PACKET_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketEvent {
    /// [`PacketEntry::flow_id`].
    pub flow_id: u64,
    /// [`PacketEventKind`] as a number.
    pub kind: u32,
    /// The entry's flags after the change.
    pub flags: u32,
}

/// Indexes into `PACKET_STATS`.
pub mod packet_stat {
    /// Segments whose tuple was in `PACKET_FLOWS` (ingress).
    pub const MATCHED: u32 = 0;
    /// Segments translated.
    pub const TRANSLATED: u32 = 1;
    /// Segments dropped while holding.
    pub const HELD: u32 = 2;
    /// Segments of a proxy socket dropped at egress while translating.
    pub const SILENCED: u32 = 3;
    /// A helper failed while rewriting (segment dropped).
    pub const REWRITE_FAILED: u32 = 4;
    /// `bpf_redirect_neigh` returned something other than a redirect.
    pub const REDIRECT_FAILED: u32 = 5;
    /// Events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 6;
    /// Matched segments the program could not parse (passed untouched).
    pub const UNPARSED: u32 = 7;
    /// Held segments passed on as duplicates (their payload moved below the
    /// proxy socket's `rcv_wup`, their FIN cleared), so the socket still gets
    /// the acknowledgement they carry.
    pub const HELD_AS_DUPLICATE: u32 = 8;
    /// Wake-up window updates whose TSval was raised to the newest one
    /// translated toward the same peer.
    pub const WAKE_STAMPED: u32 = 9;
    /// FINs dropped because the tunnel's other entry did not translate yet
    /// (the cut installs one entry, then the other); their senders send them
    /// again.
    pub const FIN_DEFERRED: u32 = 10;
    /// Number of counters.
    pub const COUNT: u32 = 11;
}

#[cfg(feature = "user")]
mod user {
    use super::{PacketEntry, PacketEvent, PacketKey};

    // SAFETY: #[repr(C)], only integers and byte arrays, and no implicit padding
    // (PacketKey is 36 bytes of u8 arrays; PacketEntry's padding is explicit and
    // its size a multiple of 8, checked below), so every bit pattern is valid.
    unsafe impl aya::Pod for PacketKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PacketEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PacketEvent {}
    // SAFETY: see above.
    unsafe impl bytemuck::Zeroable for PacketEvent {}
    // SAFETY: see above.
    unsafe impl bytemuck::Pod for PacketEvent {}

    const _: () = assert!(size_of::<PacketKey>() == 36);
    const _: () = assert!(size_of::<PacketEntry>() == 208);
    const _: () = assert!(size_of::<PacketEvent>() == 16);
}
