//! The packet data plane (`--dataplane packet`): tc programs that turn every
//! segment of a promoted tunnel into the matching segment of the proxy's other
//! connection, so the client and the upstream run one end-to-end TCP.
//!
//! * `packet_ingress` (tcx ingress) looks every TCP segment up in
//!   `PACKET_FLOWS` by its 4-tuple. A miss costs that lookup and passes. A hit
//!   is handled by the entry's state: MONITOR records sightings (device,
//!   TSval, highest sequence, acks) and passes; HOLD drops new payload and FINs
//!   at or after the hold edge and passes the rest; TRANSLATE rewrites
//!   addresses, ports, sequence and acknowledgement numbers, timestamps, SACK
//!   blocks and the window, fixes the checksums and forwards.
//! * `packet_egress` (tcx egress) looks the *reverse* tuple up, so it sees the
//!   proxy's own segments of a registered connection: before the cut it records
//!   that they left unchanged (no NAT on this host) and by which device; once
//!   translating, it drops what the repair-mode sockets still try to send.
//!
//! User space owns the entries (`proxy-userspace/src/dataplane/packet/`); the
//! programs only read its configuration and update the fields it leaves to them.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{
        bpf_csum_diff, bpf_get_socket_cookie, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_loop,
        bpf_redirect_neigh, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use proxy_common::{
    packet_config, packet_flags, packet_forward, packet_stat, packet_state, PacketEntry,
    PacketEvent, PacketEventKind, PacketKey, V4_MAPPED_PREFIX,
};

/// Upper bound on entries (two per promoted or registered tunnel).
const MAX_PACKET_FLOWS: u32 = 131_072;

/// `BPF_F_NO_PREALLOC`: entries are allocated when user space adds them, so an
/// idle plane costs no memory for the 131,072 slots.
const NO_PREALLOC: u32 = 1;

/// What a program returns for a segment it leaves alone: `TC_ACT_UNSPEC`,
/// which tcx runs the next program attached to the device on (`TCX_NEXT`)
/// and treats as a pass when there is none. `TC_ACT_OK` would end the chain
/// there: a second spliced (or any tcx program attached after this one)
/// would never see the segment.
const NEXT: i32 = TC_ACT_UNSPEC;

/// The tunnels' segments by the 4-tuple they arrive with; see `PacketEntry`.
#[map]
static PACKET_FLOWS: HashMap<PacketKey, PacketEntry> =
    HashMap::with_max_entries(MAX_PACKET_FLOWS, NO_PREALLOC);

/// End-of-flow events for user space (FIN acknowledged, RST).
#[map]
static PACKET_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// The proxy sockets (by `SO_COOKIE`) whose segments egress lets out
/// although their entry translates: each only while the cut-over has it send
/// its one window update, which wakes the peer its zero window stopped. A map
/// of its own because user space replaces `PACKET_FLOWS` values whole: a
/// flag toggled there would undo what the programs wrote meanwhile.
#[map]
static PACKET_WAKE: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// Counters, indexed by `proxy_common::packet_stat`.
#[map]
static PACKET_STATS: Array<u64> = Array::with_max_entries(packet_stat::COUNT, 0);

/// Per-CPU working space: the TCP header before and after the rewrite, and the
/// addresses before and after (helpers read them from memory).
#[repr(C)]
pub struct Scratch {
    old: [u8; HEADER_BUF],
    new: [u8; HEADER_BUF],
    addrs_old: [u8; 32],
    addrs_new: [u8; 32],
}

#[map]
static PACKET_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Reads field `$field` of the live `PACKET_FLOWS` value `$entry`.
macro_rules! get {
    ($entry:expr, $field:ident) => {
        // SAFETY: `$entry` is a PACKET_FLOWS value, which the kernel keeps alive
        // (RCU) for the whole program run; the field is plain data that other
        // CPUs may write meanwhile, hence a volatile read.
        unsafe { core::ptr::read_volatile(&raw const (*$entry).$field) }
    };
}

/// Writes field `$field` of the live `PACKET_FLOWS` value `$entry`.
macro_rules! set {
    ($entry:expr, $field:ident, $value:expr) => {
        // SAFETY: as in `get!`; a racing writer on another CPU may win, which
        // the users of these fields tolerate (diagnostics, monotonic maxima
        // re-established by the next segment).
        unsafe { core::ptr::write_volatile(&raw mut (*$entry).$field, $value) }
    };
}

/// The address of field `$field` of the `PACKET_FLOWS` value `$entry`.
macro_rules! field {
    ($entry:expr, $field:ident) => {
        // SAFETY: only computes the field's address inside the live value
        // `$entry` (see `get!`); nothing is read or written here.
        unsafe { &raw mut (*$entry).$field }
    };
}

mod headers;
mod rewrite;

use self::{headers::*, rewrite::*};

/// Atomically ORs `bits` into `*flags` and returns the previous value.
#[inline(always)]
fn fetch_or(flags: *mut u32, bits: u32) -> u32 {
    // SAFETY: `flags` points into a live map value (see `get!`); the OR is
    // atomic (BPF_ATOMIC | BPF_OR | BPF_FETCH, ISA v3) because user space and
    // other CPUs read and set the same word.
    unsafe {
        core::intrinsics::atomic_or::<u32, u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
            flags, bits,
        )
    }
}

/// Atomically adds `value` to `*counter`.
#[inline(always)]
fn add(counter: *mut u64, value: u64) {
    // SAFETY: as in `fetch_or`, for a u64 counter.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            counter, value,
        );
    }
}

#[inline(always)]
fn count(index: u32) {
    // bpf_map_lookup_elem on an array: a pointer to element `index`.
    if let Some(counter) = PACKET_STATS.get_ptr_mut(index) {
        add(counter, 1);
    }
}

/// `a` comes after `b` in sequence space.
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[classifier]
pub fn packet_ingress(ctx: TcContext) -> i32 {
    let Some(segment) = parse(&ctx) else {
        return NEXT;
    };
    // bpf_map_lookup_elem: a hash lookup of the 4-tuple; a pointer into the
    // element, which stays valid (RCU) for this run even if user space
    // replaces it meanwhile.
    let Some(entry) = PACKET_FLOWS.get_ptr_mut(segment.key) else {
        return NEXT;
    };
    count(packet_stat::MATCHED);
    add(field!(entry, packets), 1);
    // bpf_map_lookup_elem on a per-CPU array: this CPU's copy of element 0.
    let Some(scratch) = PACKET_SCRATCH.get_ptr_mut(0) else {
        return NEXT;
    };
    // SAFETY: a per-CPU value: only this program run, on this CPU, uses it.
    let scratch = unsafe { &mut *scratch };
    if load_header(&ctx, &segment, &mut scratch.old).is_none() {
        count(packet_stat::UNPARSED);
        return NEXT;
    }
    let options = find_options(segment.header_len);
    match get!(entry, state) {
        packet_state::TRANSLATE => translate(&ctx, &segment, entry, scratch, options),
        state => {
            observe(&ctx, &segment, entry, &scratch.old, options);
            if state == packet_state::HOLD && holds(&segment, entry) {
                add(field!(entry, held), 1);
                fetch_or(field!(entry, flags), packet_flags::HELD);
                count(packet_stat::HELD);
                if as_duplicate(&ctx, &segment, entry).is_some() {
                    count(packet_stat::HELD_AS_DUPLICATE);
                    return NEXT;
                }
                return TC_ACT_SHOT;
            }
            note_passed(&segment, entry);
            NEXT
        }
    }
}

/// MONITOR and HOLD: records what user space needs for the cut-over.
#[inline(always)]
fn observe(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
    header: &[u8; HEADER_BUF],
    options: Options,
) {
    // SAFETY: the context is the program's valid __sk_buff.
    // (A context field read, rewritten by the verifier into skb->dev->ifindex.)
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    set!(entry, in_ifindex, ifindex);
    let flags = get!(entry, flags);
    let mut bits = packet_flags::SEEN_INGRESS;
    if options.ts_at != 0 {
        let tsval = read32(header, options.ts_at);
        if flags & packet_flags::TS_SEEN == 0 || after(tsval, get!(entry, last_tsval)) {
            set!(entry, last_tsval, tsval);
        }
        bits |= packet_flags::TS_SEEN;
    } else {
        bits |= packet_flags::NO_TS_SEEN;
    }
    if segment.has_ack {
        set!(entry, last_ack, segment.ack);
    }
    fetch_or(field!(entry, flags), bits);
}

/// MONITOR and HOLD: a passed segment's payload moves the highest end
/// sequence (the hold edge user space picks).
#[inline(always)]
fn note_passed(segment: &Segment, entry: *mut PacketEntry) {
    if segment.payload_len == 0 {
        return;
    }
    let end = segment.seq.wrapping_add(segment.payload_len);
    if get!(entry, flags) & packet_flags::SEQ_SEEN == 0 || after(end, get!(entry, max_end_seq)) {
        set!(entry, max_end_seq, end);
    }
    fetch_or(field!(entry, flags), packet_flags::SEQ_SEEN);
}

/// HOLD: whether the segment carries payload or a FIN past the hold edge.
/// Pure ACKs, RSTs and retransmissions that end at or before the edge (the
/// proxy socket may need them to fill a hole) pass; a segment with any new
/// byte is dropped whole, so the socket's `rcv_nxt` cannot pass the edge.
#[inline(always)]
fn holds(segment: &Segment, entry: *mut PacketEntry) -> bool {
    if segment.rst || segment.syn || (segment.payload_len == 0 && !segment.fin) {
        return false;
    }
    let end = segment
        .seq
        .wrapping_add(segment.payload_len)
        .wrapping_add(u32::from(segment.fin));
    after(end, get!(entry, hold_edge))
}

/// TRANSLATE bookkeeping: the highest payload end (byte counts), FINs and
/// their acknowledgement, RSTs.
#[inline(always)]
fn account(segment: &Segment, entry: *mut PacketEntry) {
    let end = segment.seq.wrapping_add(segment.payload_len);
    if segment.payload_len != 0 {
        advance(entry, end);
    }
    let flags_ptr = field!(entry, flags);
    if segment.fin {
        set!(entry, fin_seq, end);
        let before = fetch_or(flags_ptr, packet_flags::FIN_SEEN);
        if before & packet_flags::FIN_SEEN == 0 {
            let peer_key = get!(entry, peer_key);
            // bpf_map_lookup_elem: the other entry of the tunnel, once per FIN.
            if let Some(peer) = PACKET_FLOWS.get_ptr_mut(peer_key) {
                // The peer's acknowledgement of this FIN, in the peer's
                // (arriving) sequence space: one past the FIN, translated.
                let fin_ack = end.wrapping_add(1).wrapping_add(get!(entry, seq_delta));
                set!(peer, peer_fin_ack, fin_ack);
                fetch_or(field!(peer, flags), packet_flags::PEER_FIN);
            }
        }
    }
    if segment.rst {
        let before = fetch_or(flags_ptr, packet_flags::RST_SEEN);
        if before & packet_flags::RST_SEEN == 0 {
            report(
                entry,
                PacketEventKind::Reset,
                before | packet_flags::RST_SEEN,
            );
        }
        return;
    }
    let flags = get!(entry, flags);
    if segment.has_ack
        && flags & packet_flags::PEER_FIN != 0
        && flags & packet_flags::PEER_FIN_ACKED == 0
        && !after(get!(entry, peer_fin_ack), segment.ack)
    {
        let before = fetch_or(flags_ptr, packet_flags::PEER_FIN_ACKED);
        if before & packet_flags::PEER_FIN_ACKED == 0 {
            report(
                entry,
                PacketEventKind::FinAcked,
                before | packet_flags::PEER_FIN_ACKED,
            );
        }
    }
}

/// Moves `max_end_seq` up to `end` and adds the bytes it moved by to `bytes`.
/// A compare-and-exchange, so two CPUs forwarding segments of the same
/// connection never count the same bytes twice.
#[inline(always)]
fn advance(entry: *mut PacketEntry, end: u32) {
    let max_end = field!(entry, max_end_seq);
    for _ in 0..4 {
        let old = get!(entry, max_end_seq);
        if !after(end, old) {
            return;
        }
        // SAFETY: `max_end` points into the live map value (see `get!`);
        // BPF_ATOMIC | BPF_CMPXCHG (ISA v3) replaces `old` by `end` only if no
        // other CPU changed it meanwhile.
        let (_, exchanged) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u32,
                { core::intrinsics::AtomicOrdering::SeqCst },
                { core::intrinsics::AtomicOrdering::SeqCst },
            >(max_end, old, end)
        };
        if exchanged {
            add(field!(entry, bytes), u64::from(end.wrapping_sub(old)));
            return;
        }
    }
}

/// A function of its own (a BPF-to-BPF call): inlined at each of its three
/// callers, the events' copies overflowed the 512-byte stack of
/// `packet_ingress`.
#[inline(never)]
fn report(entry: *mut PacketEntry, kind: PacketEventKind, flags: u32) {
    let event = PacketEvent {
        flow_id: get!(entry, flow_id),
        kind: kind as u32,
        flags,
    };
    // bpf_ringbuf_output copies the event into the ring buffer and wakes the
    // user-space reader; it fails only when the buffer is full.
    if PACKET_EVENTS.output::<PacketEvent>(&event, 0).is_err() {
        count(packet_stat::EVENTS_LOST);
    }
}

#[classifier]
pub fn packet_egress(ctx: TcContext) -> i32 {
    let Some(segment) = parse(&ctx) else {
        return NEXT;
    };
    // bpf_map_lookup_elem: is the segment's reverse tuple a registered
    // connection (then the segment is the proxy socket's, or a translated one)?
    let Some(entry) = PACKET_FLOWS.get_ptr_mut(segment.key.reversed()) else {
        return NEXT;
    };
    let config = get!(entry, config);
    let translating = get!(entry, state) == packet_state::TRANSLATE;
    // bpf_map_lookup_elem: is the connection's proxy socket sending its
    // wake-up window update (see PACKET_WAKE)? Meanwhile every segment of
    // the connection leaving here gets the raised TSval, translated ones
    // too, so none arrives after the update with an older one.
    let cookie = get!(entry, socket_cookie);
    // SAFETY: the value is only tested for presence, never read; user space
    // inserts and removes the keys.
    if translating && unsafe { PACKET_WAKE.get(cookie) }.is_some() {
        if wake_timestamp(&ctx, &segment, entry).is_some() {
            count(packet_stat::WAKE_STAMPED);
        }
        return NEXT;
    }
    if translating || config & packet_config::SILENT != 0 {
        // SAFETY: the context is the program's valid __sk_buff.
        // bpf_get_socket_cookie returns the cookie of the skb's socket (0 when
        // it has none). A segment translated at ingress and redirected here
        // carries the sending endpoint's socket or none (veth does not
        // orphan skbs); only one from the proxy's own socket is dropped.
        if unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) } == cookie {
            add(field!(entry, silenced), 1);
            count(packet_stat::SILENCED);
            return TC_ACT_SHOT;
        }
        return NEXT;
    }
    // SAFETY: the context is the program's valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    set!(entry, out_seen_ifindex, ifindex);
    if segment.has_ack {
        let flags = get!(entry, flags);
        if flags & packet_flags::PROXY_ACK_SEEN == 0 || after(segment.ack, get!(entry, proxy_ack)) {
            set!(entry, proxy_ack, segment.ack);
        }
        fetch_or(
            field!(entry, flags),
            packet_flags::PROXY_ACK_SEEN | packet_flags::SEEN_EGRESS,
        );
        return NEXT;
    }
    fetch_or(field!(entry, flags), packet_flags::SEEN_EGRESS);
    NEXT
}
