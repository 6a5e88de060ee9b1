//! Rewriting a segment: a held one into a duplicate that only carries its
//! ACK, and a translated one into the other connection's segment
//! (addresses, ports, sequence and acknowledgement numbers, timestamps, SACK
//! blocks, window), with the checksums the kernel's helpers fix up.

use super::*;

/// `BPF_F_IPV6` for `bpf_l4_csum_replace` (kernel ≥ 6.16): the rewritten
/// addresses are in an IPv6 header, which no header checksum covers, so the
/// kernel must not fold the pseudo-header change into a CHECKSUM_COMPLETE
/// `skb->csum`. Missing from aya-ebpf 0.2.1's bindings.
pub(super) const BPF_F_IPV6: u64 = 1 << 7;

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
pub(super) fn as_duplicate(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
) -> Option<()> {
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
    replace_field(skb, check, segment.l4 + 4, old_seq, new_seq)?;
    replace_field(skb, check, flags_at, old_word, new_word)?;
    Some(())
}

/// TRANSLATE: rewrites the segment into the other connection's and forwards it.
#[inline(always)]
pub(super) fn translate(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
    scratch: &mut Scratch,
    options: Options,
) -> i32 {
    let flags = get!(entry, flags);
    if flags & packet_flags::REUSED != 0 {
        // The tuple is a new connection's (below): not the tunnel's.
        return NEXT;
    }
    if segment.syn {
        // Not part of the translated connection: leave it alone. A SYN
        // without ACK opens a new connection on the tuple (the sender's old
        // one is gone: a client port reused after the tunnel's end); its
        // later segments are the new connection's, so the entry stops
        // translating, and user space ends the tunnel (or its linger) and
        // frees the tuple.
        if !segment.has_ack {
            let before = fetch_or(field!(entry, flags), packet_flags::REUSED);
            if before & packet_flags::REUSED == 0 {
                report(
                    entry,
                    PacketEventKind::Reused,
                    before | packet_flags::REUSED,
                );
            }
        }
        return NEXT;
    }
    if segment.fin && flags & packet_flags::FIN_SEEN == 0 {
        // bpf_map_lookup_elem: the tunnel's other entry, where `account`
        // notes the FIN. Until user space has installed its translation too
        // (the cut installs one entry, then the other), that note would be
        // lost under the value it installs: the FIN is dropped, and its
        // sender sends it again.
        // The key is read where it lies in the entry, not copied to the
        // stack (the program's stack is nearly full).
        let peer_key = field!(entry, peer_key);
        // SAFETY: `peer_key` is plain data in the live map value (see `get!`).
        let peer_key = unsafe { &*peer_key };
        let peer_translates = PACKET_FLOWS
            .get_ptr_mut(peer_key)
            .is_some_and(|peer| get!(peer, state) == packet_state::TRANSLATE);
        if !peer_translates {
            count(packet_stat::FIN_DEFERRED);
            return TC_ACT_SHOT;
        }
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
        let tsval = read32(new, at);
        // The sender's newest TSval: a wake-up segment of the proxy socket
        // the translated segments go to must not carry an older one.
        if after(tsval, get!(entry, last_tsval)) {
            set!(entry, last_tsval, tsval);
        }
        write32(new, at, tsval.wrapping_add(get!(entry, tsval_delta)));
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
pub(super) fn rewrite(
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

/// TRANSLATE, the socket in `PACKET_WAKE`: the proxy socket's window update to its peer
/// carries, as TSval, at least the newest one translated toward that peer
/// (the other entry's sender's newest, shifted). The peer may have taken a
/// translated segment already; one with an older TSval than it has seen by
/// more than a tick, it drops as an old duplicate (PAWS, RFC 7323 §5).
#[inline(always)]
pub(super) fn wake_timestamp(
    ctx: &TcContext,
    segment: &Segment,
    entry: *mut PacketEntry,
) -> Option<()> {
    // bpf_map_lookup_elem: the tunnel's other entry, whose translated
    // segments go to this socket's peer.
    let other = PACKET_FLOWS.get_ptr_mut(get!(entry, peer_key))?;
    if get!(other, state) != packet_state::TRANSLATE
        || get!(other, flags) & packet_flags::TS_SEEN == 0
    {
        return None;
    }
    let floor = get!(other, last_tsval).wrapping_add(get!(other, tsval_delta));
    // bpf_map_lookup_elem on a per-CPU array: this CPU's copy of element 0.
    let scratch = PACKET_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU value: only this program run, on this CPU, uses it.
    let scratch = unsafe { &mut *scratch };
    load_header(ctx, segment, &mut scratch.old)?;
    let options = find_options(segment.header_len);
    if options.ts_at == 0 {
        return None;
    }
    let own = read32(&scratch.old, options.ts_at);
    if !after(floor, own) {
        return None;
    }
    replace_field(
        ctx.skb.skb.cast(),
        segment.l4 + TCP_CHECK,
        segment.l4 + options.ts_at,
        own.to_be(),
        floor.to_be(),
    )
}

/// Overwrites the TCP header field at `at` (from the packet's start) with
/// `new` and folds its change from `old` into the TCP checksum at `check`
/// (both values in network order, `size_of::<T>()` bytes). Not a
/// pseudo-header field, so a CHECKSUM_PARTIAL skb's checksum field (the
/// pseudo-header sum) is left alone, as it must be.
#[inline(always)]
fn replace_field<T: Copy + Into<u64>>(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    check: u32,
    at: u32,
    old: T,
    new: T,
) -> Option<()> {
    let size = core::mem::size_of::<T>() as u32;
    // SAFETY: `new` is on this stack for the call. bpf_skb_store_bytes writes
    // its `size` bytes into the skb at `at` (flags 0: skb->csum alone).
    if unsafe { bpf_skb_store_bytes(skb, at, (&raw const new).cast(), size, 0) } != 0 {
        return None;
    }
    // SAFETY: no memory argument. bpf_l4_csum_replace folds the change of a
    // `size`-byte field from `old` to `new` into the TCP checksum at `check`.
    if unsafe { bpf_l4_csum_replace(skb, check, old.into(), new.into(), u64::from(size)) } != 0 {
        return None;
    }
    Some(())
}
