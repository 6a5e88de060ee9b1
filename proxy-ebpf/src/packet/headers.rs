//! Parsing a segment: Ethernet, IPv4/IPv6 and TCP headers, and the walk over
//! the TCP options (timestamps, SACK blocks) the translation rewrites.

use super::*;

pub(super) const ETH_P_IP: u16 = 0x0800;

pub(super) const ETH_P_IPV6: u16 = 0x86dd;

pub(super) const IPPROTO_TCP: u8 = 6;

/// TCP header without options.
pub(super) const TCP_BASE: u32 = TcpHdr::LEN as u32;

/// Offset of the TCP checksum in the TCP header.
pub(super) const TCP_CHECK: u32 = offset_of!(TcpHdr, check) as u32;

/// Offset of the IPv4 header checksum.
pub(super) const IPV4_CHECK: u32 = offset_of!(Ipv4Hdr, check) as u32;

/// Offset of the IPv4 source address (the destination follows).
pub(super) const IPV4_ADDRS: u32 = offset_of!(Ipv4Hdr, src_addr) as u32;

/// Offset of the IPv6 source address (the destination follows).
pub(super) const IPV6_ADDRS: u32 = offset_of!(Ipv6Hdr, src_addr) as u32;

pub(super) const OPT_EOL: u8 = 0;

pub(super) const OPT_NOP: u8 = 1;

pub(super) const OPT_SACK: u8 = 5;

pub(super) const OPT_TIMESTAMP: u8 = 8;

pub(super) const OPT_TIMESTAMP_LEN: u32 = 10;

/// Most options one header can hold (40 option bytes, one NOP each).
pub(super) const MAX_OPTION_STEPS: u32 = 40;

/// Size of a header buffer: the verifier must see every length a helper may
/// be given fit, and [`helper_len`] is 20..=80 as far as it can tell.
pub(super) const HEADER_BUF: usize = 80;

/// Most SACK blocks that fit in the option space.
pub(super) const MAX_SACK_BLOCKS: u32 = 4;

/// What the programs need of one TCP segment.
pub(super) struct Segment {
    /// Offset of the IP header.
    pub(super) l3: u32,
    /// Offset of the TCP header.
    pub(super) l4: u32,
    pub(super) ipv6: bool,
    pub(super) key: PacketKey,
    /// TCP header length with options (20..=60).
    pub(super) header_len: u32,
    pub(super) payload_len: u32,
    pub(super) seq: u32,
    pub(super) ack: u32,
    pub(super) window: u16,
    pub(super) fin: bool,
    pub(super) syn: bool,
    pub(super) rst: bool,
    pub(super) has_ack: bool,
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
pub(super) fn parse(ctx: &TcContext) -> Option<Segment> {
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
pub(super) struct Options {
    /// Offset of TSval (TSecr follows), 0 when there is no timestamp option.
    pub(super) ts_at: u32,
    /// Offset of the first SACK block, and the number of blocks.
    pub(super) sack_at: u32,
    pub(super) sack_blocks: u32,
}

#[inline(always)]
pub(super) fn byte(buf: &[u8; HEADER_BUF], at: u32) -> u8 {
    buf[(at & 63) as usize]
}

#[inline(always)]
pub(super) fn read32(buf: &[u8; HEADER_BUF], at: u32) -> u32 {
    u32::from_be_bytes([
        byte(buf, at),
        byte(buf, at + 1),
        byte(buf, at + 2),
        byte(buf, at + 3),
    ])
}

#[inline(always)]
pub(super) fn write32(buf: &mut [u8; HEADER_BUF], at: u32, value: u32) {
    for (i, b) in value.to_be_bytes().into_iter().enumerate() {
        buf[((at + i as u32) & 63) as usize] = b;
    }
}

/// The state of an options walk, on the stack of the program that runs it.
#[repr(C)]
pub(super) struct OptionWalk {
    /// Offset of the next option in the header buffer.
    pub(super) pos: u32,
    /// The header length.
    pub(super) header_len: u32,
    pub(super) found: Options,
}

/// Walks the options of the TCP header in the scratch buffer `old`
/// (`header_len` bytes). Stops at the end of the list or at a malformed
/// option.
///
/// The walk is a `bpf_loop` callback: as a bounded loop in the program the
/// verifier walks every path through every iteration and gave up at its
/// 1,000,000-instruction budget; a callback is verified once.
#[inline(always)]
pub(super) fn find_options(header_len: u32) -> Options {
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
pub(super) extern "C" fn option_step(_index: u64, context: *mut core::ffi::c_void) -> i64 {
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
pub(super) fn helper_len(segment: &Segment) -> u32 {
    TCP_BASE + (segment.header_len.wrapping_sub(TCP_BASE) & 0x3c)
}

/// Loads the TCP header with its options into `buf`.
#[inline(always)]
pub(super) fn load_header(
    ctx: &TcContext,
    segment: &Segment,
    buf: &mut [u8; HEADER_BUF],
) -> Option<()> {
    let len = helper_len(segment);
    // SAFETY: `buf` is HEADER_BUF writable bytes, at least `len`.
    // bpf_skb_load_bytes copies `len` bytes at `l4` out of the (possibly
    // non-linear) skb into `buf`; it fails if the skb is shorter.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), segment.l4, buf.as_mut_ptr().cast(), len) };
    (rc == 0).then_some(())
}
