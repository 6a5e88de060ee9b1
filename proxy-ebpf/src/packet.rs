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
/// `BPF_F_IPV6` for `bpf_l4_csum_replace` (kernel ≥ 6.16): the rewritten
/// addresses are in an IPv6 header, which no header checksum covers, so the
/// kernel must not fold the pseudo-header change into a CHECKSUM_COMPLETE
/// `skb->csum`. Missing from aya-ebpf 0.2.1's bindings.
const BPF_F_IPV6: u64 = 1 << 7;

/// What a program returns for a segment it leaves alone: `TC_ACT_UNSPEC`,
/// which tcx runs the next program attached to the device on (`TCX_NEXT`)
/// and treats as a pass when there is none. `TC_ACT_OK` would end the chain
/// there: a second spliced (or any tcx program attached after this one)
/// would never see the segment.
const NEXT: i32 = TC_ACT_UNSPEC;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// TCP header without options.
const TCP_BASE: u32 = TcpHdr::LEN as u32;
/// Offset of the TCP checksum in the TCP header.
const TCP_CHECK: u32 = offset_of!(TcpHdr, check) as u32;
/// Offset of the IPv4 header checksum.
const IPV4_CHECK: u32 = offset_of!(Ipv4Hdr, check) as u32;
/// Offset of the IPv4 source address (the destination follows).
const IPV4_ADDRS: u32 = offset_of!(Ipv4Hdr, src_addr) as u32;
/// Offset of the IPv6 source address (the destination follows).
const IPV6_ADDRS: u32 = offset_of!(Ipv6Hdr, src_addr) as u32;

const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
const OPT_TIMESTAMP_LEN: u32 = 10;
/// Most options one header can hold (40 option bytes, one NOP each).
const MAX_OPTION_STEPS: u32 = 40;
/// Size of a header buffer: the verifier must see every length a helper may
/// be given fit, and [`helper_len`] is 20..=80 as far as it can tell.
const HEADER_BUF: usize = 80;
/// Most SACK blocks that fit in the option space.
const MAX_SACK_BLOCKS: u32 = 4;

/// The tunnels' segments by the 4-tuple they arrive with; see `PacketEntry`.
#[map]
static PACKET_FLOWS: HashMap<PacketKey, PacketEntry> =
    HashMap::with_max_entries(MAX_PACKET_FLOWS, NO_PREALLOC);

/// End-of-flow events for user space (FIN acknowledged, RST).
#[map]
static PACKET_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

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

/// What the programs need of one TCP segment.
struct Segment {
    /// Offset of the IP header.
    l3: u32,
    /// Offset of the TCP header.
    l4: u32,
    ipv6: bool,
    key: PacketKey,
    /// TCP header length with options (20..=60).
    header_len: u32,
    payload_len: u32,
    seq: u32,
    ack: u32,
    window: u16,
    fin: bool,
    syn: bool,
    rst: bool,
    has_ack: bool,
}

/// Parses Ethernet + IPv4/IPv6 (no extension headers, no fragments) + TCP.
///
/// network-types 0.0.8 gives the layouts (sizes and field offsets) and the TCP
/// header, but its `EtherType` and `IpProto` are Rust enums that do not cover
/// every value the wire can carry: loading a header that holds one is undefined
/// behaviour for an unknown value. Those two fields (and the other IP fields)
/// are therefore read as plain integers at their offsets.
///
/// Every `ctx.load` is a bpf_skb_load_bytes: the kernel copies that many bytes
/// at that offset out of the skb (linear or not) onto the stack, or fails if
/// the skb is shorter.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Segment> {
    let ether_type = u16::from_be(ctx.load::<u16>(offset_of!(EthHdr, ether_type)).ok()?);
    let l3 = EthHdr::LEN as u32;
    let mut key = PacketKey::default();
    let (l4, ip_payload, ipv6) = match ether_type {
        ETH_P_IP => {
            let version_ihl = ctx.load::<u8>(l3 as usize).ok()?;
            let ihl = u32::from(version_ihl & 0x0f) * 4;
            let proto = ctx
                .load::<u8>((l3 as usize) + offset_of!(Ipv4Hdr, proto))
                .ok()?;
            let frag = u16::from_be(
                ctx.load::<u16>((l3 as usize) + offset_of!(Ipv4Hdr, frag_off))
                    .ok()?,
            );
            if ihl < 20 || proto != IPPROTO_TCP || frag & 0x3fff != 0 {
                return None;
            }
            let total = u32::from(u16::from_be(
                ctx.load::<u16>((l3 as usize) + offset_of!(Ipv4Hdr, tot_len))
                    .ok()?,
            ));
            let addrs = ctx.load::<[u8; 8]>((l3 + IPV4_ADDRS) as usize).ok()?;
            key.saddr[..12].copy_from_slice(&V4_MAPPED_PREFIX);
            key.saddr[12..].copy_from_slice(&addrs[..4]);
            key.daddr[..12].copy_from_slice(&V4_MAPPED_PREFIX);
            key.daddr[12..].copy_from_slice(&addrs[4..]);
            // A BIG TCP packet has tot_len 0: its length is the skb's.
            let ip_payload = if total == 0 {
                ctx.len().checked_sub(l3 + ihl)?
            } else {
                total.checked_sub(ihl)?
            };
            (l3 + ihl, ip_payload, false)
        }
        ETH_P_IPV6 => {
            let next = ctx
                .load::<u8>((l3 as usize) + offset_of!(Ipv6Hdr, next_hdr))
                .ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            let len = u32::from(u16::from_be(
                ctx.load::<u16>((l3 as usize) + offset_of!(Ipv6Hdr, payload_len))
                    .ok()?,
            ));
            let addrs = ctx.load::<[u8; 32]>((l3 + IPV6_ADDRS) as usize).ok()?;
            key.saddr.copy_from_slice(&addrs[..16]);
            key.daddr.copy_from_slice(&addrs[16..]);
            let ip_payload = if len == 0 {
                ctx.len().checked_sub(l3 + Ipv6Hdr::LEN as u32)?
            } else {
                len
            };
            (l3 + Ipv6Hdr::LEN as u32, ip_payload, true)
        }
        _ => return None,
    };
    let tcp = ctx.load::<TcpHdr>(l4 as usize).ok()?;
    let header_len = u32::from(tcp.doff() & 0x0f) * 4;
    if header_len < TCP_BASE {
        return None;
    }
    key.sport = tcp.source.to_ne_bytes();
    key.dport = tcp.dest.to_ne_bytes();
    Some(Segment {
        l3,
        l4,
        ipv6,
        key,
        header_len,
        payload_len: ip_payload.checked_sub(header_len)?,
        seq: u32::from_be(tcp.seq),
        ack: u32::from_be(tcp.ack_seq),
        window: u16::from_be(tcp.window),
        fin: tcp.fin() != 0,
        syn: tcp.syn() != 0,
        rst: tcp.rst() != 0,
        has_ack: tcp.ack() != 0,
    })
}

/// Where the options the translation touches are, in a header buffer.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Options {
    /// Offset of TSval (TSecr follows), 0 when there is no timestamp option.
    ts_at: u32,
    /// Offset of the first SACK block, and the number of blocks.
    sack_at: u32,
    sack_blocks: u32,
}

#[inline(always)]
fn byte(buf: &[u8; HEADER_BUF], at: u32) -> u8 {
    buf[(at & 63) as usize]
}

#[inline(always)]
fn read32(buf: &[u8; HEADER_BUF], at: u32) -> u32 {
    u32::from_be_bytes([
        byte(buf, at),
        byte(buf, at + 1),
        byte(buf, at + 2),
        byte(buf, at + 3),
    ])
}

#[inline(always)]
fn write32(buf: &mut [u8; HEADER_BUF], at: u32, value: u32) {
    for (i, b) in value.to_be_bytes().into_iter().enumerate() {
        buf[((at + i as u32) & 63) as usize] = b;
    }
}

/// The state of an options walk, on the stack of the program that runs it.
#[repr(C)]
struct OptionWalk {
    /// Offset of the next option in the header buffer.
    pos: u32,
    /// The header length.
    header_len: u32,
    found: Options,
}

/// Walks the options of the TCP header in the scratch buffer `old`
/// (`header_len` bytes). Stops at the end of the list or at a malformed
/// option.
///
/// The walk is a `bpf_loop` callback: as a bounded loop in the program the
/// verifier walks every path through every iteration and gave up at its
/// 1,000,000-instruction budget; a callback is verified once.
#[inline(always)]
fn find_options(header_len: u32) -> Options {
    let mut walk = OptionWalk {
        pos: TCP_BASE,
        header_len,
        found: Options::default(),
    };
    // SAFETY: `option_step` has the callback signature bpf_loop expects and
    // only touches the `OptionWalk` passed as its context, which lives on this
    // stack for the whole call. bpf_loop calls it up to MAX_OPTION_STEPS
    // times, stopping early when it returns 1.
    unsafe {
        bpf_loop(
            MAX_OPTION_STEPS,
            option_step as *const () as *mut core::ffi::c_void,
            (&raw mut walk).cast(),
            0,
        );
    }
    walk.found
}

/// One step of [`find_options`]: handles the option at `walk.pos`; returns 1
/// to stop.
extern "C" fn option_step(_index: u64, context: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `find_options` gave it: a live,
    // exclusively used OptionWalk.
    let walk = unsafe { &mut *context.cast::<OptionWalk>() };
    // bpf_map_lookup_elem on a per-CPU array: this CPU's copy of element 0.
    let Some(scratch) = PACKET_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU value: only this program run, on this CPU, uses it.
    let buf = unsafe { &(*scratch).old };
    let (pos, header_len) = (walk.pos & 63, walk.header_len & 63);
    if pos >= header_len {
        return 1;
    }
    let kind = byte(buf, pos);
    if kind == OPT_EOL {
        return 1;
    }
    if kind == OPT_NOP {
        walk.pos = pos + 1;
        return 0;
    }
    if pos + 1 >= header_len {
        return 1;
    }
    let len = u32::from(byte(buf, pos + 1));
    if len < 2 || pos + len > header_len {
        return 1;
    }
    if kind == OPT_TIMESTAMP && len == OPT_TIMESTAMP_LEN {
        walk.found.ts_at = pos + 2;
    } else if kind == OPT_SACK && (len - 2) % 8 == 0 {
        walk.found.sack_at = pos + 2;
        walk.found.sack_blocks = (len - 2) / 8;
    }
    walk.pos = pos + len;
    0
}

/// The TCP header length as helpers get it: the same value (20 plus a
/// multiple of 4 up to 40), written so that the verifier sees it is non-zero
/// and within a header buffer.
#[inline(always)]
fn helper_len(segment: &Segment) -> u32 {
    TCP_BASE + (segment.header_len.wrapping_sub(TCP_BASE) & 0x3c)
}

/// Loads the TCP header with its options into `buf`.
#[inline(always)]
fn load_header(ctx: &TcContext, segment: &Segment, buf: &mut [u8; HEADER_BUF]) -> Option<()> {
    let len = helper_len(segment);
    // SAFETY: `buf` is HEADER_BUF writable bytes, at least `len`.
    // bpf_skb_load_bytes copies `len` bytes at `l4` out of the (possibly
    // non-linear) skb into `buf`; it fails if the skb is shorter.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), segment.l4, buf.as_mut_ptr().cast(), len) };
    (rc == 0).then_some(())
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

/// HOLD: turns a held segment into a duplicate of bytes the proxy socket has
/// acknowledged already — sequence number moved so its payload ends at the
/// last acknowledgement the socket sent (its `rcv_wup`), FIN cleared — so the
/// socket drops the payload but still processes the ACK, window, SACK blocks
/// and timestamp the segment carries. In a transfer both ways the peers' ACKs
/// ride on their data segments; dropped whole, they would leave the proxy's
/// send queues unacknowledged (the drain) until a retransmission timeout.
/// The socket answers with a duplicate ACK (D-SACK), which also speeds the
/// peer's retransmission of what was held.
#[inline(always)]
fn as_duplicate(ctx: &TcContext, segment: &Segment, entry: *mut PacketEntry) -> Option<()> {
    if !segment.has_ack || get!(entry, flags) & packet_flags::PROXY_ACK_SEEN == 0 {
        return None;
    }
    let skb = ctx.skb.skb.cast();
    let check = segment.l4 + TCP_CHECK;
    let old_seq = segment.seq.to_be();
    let new_seq = get!(entry, proxy_ack)
        .wrapping_sub(segment.payload_len)
        .to_be();
    // The 16-bit word with the data offset and the flags (FIN is its lowest
    // bit); ctx.load: bpf_skb_load_bytes copies it out of the skb.
    let flags_at = segment.l4 + 12;
    let old_word = ctx.load::<u16>(flags_at as usize).ok()?;
    let new_word = (u16::from_be(old_word) & !1).to_be();
    // SAFETY: `new_seq` is on this stack for the call. bpf_skb_store_bytes
    // writes the 4 bytes into the skb's TCP header (flags 0: skb->csum alone).
    if unsafe { bpf_skb_store_bytes(skb, segment.l4 + 4, (&raw const new_seq).cast(), 4, 0) } != 0 {
        return None;
    }
    // SAFETY: as above, for the flags word.
    if unsafe { bpf_skb_store_bytes(skb, flags_at, (&raw const new_word).cast(), 2, 0) } != 0 {
        return None;
    }
    // SAFETY: no memory argument. bpf_l4_csum_replace folds the change of a
    // 4-byte field from `from` to `to` into the TCP checksum at `check`; not
    // a pseudo-header field, so a CHECKSUM_PARTIAL skb's field is left alone.
    if unsafe { bpf_l4_csum_replace(skb, check, u64::from(old_seq), u64::from(new_seq), 4) } != 0 {
        return None;
    }
    // SAFETY: as above, for the 2-byte flags word.
    if unsafe { bpf_l4_csum_replace(skb, check, u64::from(old_word), u64::from(new_word), 2) } != 0
    {
        return None;
    }
    Some(())
}

/// TRANSLATE: rewrites the segment into the other connection's and forwards it.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
    scratch: &mut Scratch,
    options: Options,
) -> i32 {
    if segment.syn {
        // Not part of the translated connection (a new handshake reusing the
        // tuple): leave it alone.
        return NEXT;
    }
    if load_header(ctx, segment, &mut scratch.new).is_none() {
        count(packet_stat::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    let seq_delta = get!(entry, seq_delta);
    let ack_delta = get!(entry, ack_delta);
    let new = &mut scratch.new;
    let ports = [get!(entry, new_sport), get!(entry, new_dport)];
    new[0] = ports[0][0];
    new[1] = ports[0][1];
    new[2] = ports[1][0];
    new[3] = ports[1][1];
    write32(new, 4, segment.seq.wrapping_add(seq_delta));
    if segment.has_ack {
        write32(new, 8, segment.ack.wrapping_add(ack_delta));
    }
    let window = (u32::from(segment.window) << (get!(entry, win_shift_in) & 15))
        >> (get!(entry, win_shift_out) & 15);
    let window = window.min(0xffff).to_be_bytes();
    new[14] = window[2];
    new[15] = window[3];
    if options.ts_at != 0 {
        let at = options.ts_at;
        write32(
            new,
            at,
            read32(new, at).wrapping_add(get!(entry, tsval_delta)),
        );
        let tsecr = read32(new, at + 4);
        if tsecr != 0 {
            write32(new, at + 4, tsecr.wrapping_add(get!(entry, tsecr_delta)));
        }
    }
    for block in 0..MAX_SACK_BLOCKS {
        if block >= options.sack_blocks {
            break;
        }
        let at = options.sack_at + block * 8;
        write32(new, at, read32(new, at).wrapping_add(ack_delta));
        write32(new, at + 4, read32(new, at + 4).wrapping_add(ack_delta));
    }
    if rewrite(ctx, segment, entry, scratch).is_none() {
        count(packet_stat::REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    account(segment, entry);
    add(field!(entry, translated), 1);
    count(packet_stat::TRANSLATED);
    if get!(entry, forward) == packet_forward::REDIRECT_NEIGH {
        // bpf_redirect_neigh looks the new destination up in the FIB, fills in
        // the next hop's L2 header from the neighbour table and queues the skb
        // for transmission on `out_ifindex` (TC_ACT_REDIRECT), skipping this
        // host's netfilter; TC_ACT_SHOT on failure.
        // SAFETY: a null parameter block with length 0 is the documented way
        // to ask for the FIB lookup.
        let out_ifindex = get!(entry, out_ifindex);
        let action = unsafe { bpf_redirect_neigh(out_ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        if action == TC_ACT_SHOT {
            count(packet_stat::REDIRECT_FAILED);
        }
        return action;
    }
    // The stack takes the rewritten segment as if it had arrived so: on lo,
    // delivered to the other local endpoint's socket.
    TC_ACT_OK
}

/// Stores the rewritten header and the new addresses, and fixes the checksums.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
    scratch: &mut Scratch,
) -> Option<()> {
    let skb = ctx.skb.skb.cast();
    let len = helper_len(segment);
    let check = segment.l4 + TCP_CHECK;
    // SAFETY: both buffers are HEADER_BUF bytes, at least `len`. bpf_skb_store_bytes writes `len` bytes at `l4` into the skb (flags
    // 0: skb->csum is left alone, the checksum updates below keep it right).
    if unsafe { bpf_skb_store_bytes(skb, segment.l4, scratch.new.as_ptr().cast(), len, 0) } != 0 {
        return None;
    }
    // SAFETY: as above. bpf_csum_diff returns the one's complement sum of
    // `new` minus that of `old` (both `len` bytes): the change the rewrite
    // made to the TCP header, its checksum field unchanged in both.
    let diff = unsafe {
        bpf_csum_diff(
            scratch.old.as_mut_ptr().cast(),
            len,
            scratch.new.as_mut_ptr().cast(),
            len,
            0,
        )
    };
    if diff < 0 {
        return None;
    }
    // SAFETY: bpf_l4_csum_replace adds the difference (size 0: `to` is a
    // difference) to the TCP checksum at `check`; not a pseudo-header change,
    // so a CHECKSUM_PARTIAL skb's field (pseudo-header sum only) is left alone.
    if unsafe { bpf_l4_csum_replace(skb, check, 0, diff as u64, 0) } != 0 {
        return None;
    }
    let (at, addr_len, l4_flags) = if segment.ipv6 {
        scratch.addrs_old[..16].copy_from_slice(&segment.key.saddr);
        scratch.addrs_old[16..].copy_from_slice(&segment.key.daddr);
        scratch.addrs_new[..16].copy_from_slice(&get!(entry, new_saddr));
        scratch.addrs_new[16..].copy_from_slice(&get!(entry, new_daddr));
        (segment.l3 + IPV6_ADDRS, 32, BPF_F_IPV6)
    } else {
        scratch.addrs_old[..4].copy_from_slice(&segment.key.saddr[12..]);
        scratch.addrs_old[4..8].copy_from_slice(&segment.key.daddr[12..]);
        scratch.addrs_new[..4].copy_from_slice(&get!(entry, new_saddr)[12..]);
        scratch.addrs_new[4..8].copy_from_slice(&get!(entry, new_daddr)[12..]);
        (segment.l3 + IPV4_ADDRS, 8, 0)
    };
    // SAFETY: both address buffers are 32 bytes, `addr_len` is 8 or 32.
    // bpf_skb_store_bytes writes the new source and destination addresses.
    if unsafe { bpf_skb_store_bytes(skb, at, scratch.addrs_new.as_ptr().cast(), addr_len, 0) } != 0
    {
        return None;
    }
    // SAFETY: as above; the checksum change of the address rewrite.
    let diff = unsafe {
        bpf_csum_diff(
            scratch.addrs_old.as_mut_ptr().cast(),
            addr_len,
            scratch.addrs_new.as_mut_ptr().cast(),
            addr_len,
            0,
        )
    };
    if diff < 0 {
        return None;
    }
    if !segment.ipv6 {
        // SAFETY: bpf_l3_csum_replace adds the difference to the IPv4 header
        // checksum (the header sum, hence skb->csum, stays the same).
        if unsafe { bpf_l3_csum_replace(skb, segment.l3 + IPV4_CHECK, 0, diff as u64, 0) } != 0 {
            return None;
        }
    }
    // SAFETY: bpf_l4_csum_replace with BPF_F_PSEUDO_HDR: the addresses are in
    // the pseudo-header, so the kernel updates the TCP checksum for every
    // ip_summed (a CHECKSUM_PARTIAL field holds the pseudo-header sum) and,
    // for IPv4 CHECKSUM_COMPLETE, skb->csum too.
    if unsafe {
        bpf_l4_csum_replace(
            skb,
            check,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags,
        )
    } != 0
    {
        return None;
    }
    Some(())
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

#[inline(always)]
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
    if get!(entry, state) == packet_state::TRANSLATE
        || get!(entry, config) & packet_config::SILENT != 0
    {
        // SAFETY: the context is the program's valid __sk_buff.
        // bpf_get_socket_cookie returns the cookie of the skb's socket (0 when
        // it has none). A segment translated at ingress and redirected here
        // carries the sending endpoint's socket or none (veth does not
        // orphan skbs); only one from the proxy's own socket is dropped.
        if unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) } == get!(entry, socket_cookie) {
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
