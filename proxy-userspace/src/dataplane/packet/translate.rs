//! The translation arithmetic, as pure functions: from what the two proxy
//! sockets and the tc program know at the cut-over to what goes into the two
//! `PACKET_FLOWS` entries. No kernel here, so it is unit-tested.
//!
//! Names: connection A is client ↔ proxy (the proxy's `client` socket),
//! connection B is proxy ↔ upstream (its `upstream` socket). The entry of A's
//! arriving segments (client → proxy) rewrites them into B's segments (proxy →
//! upstream), and the other way round.
//!
//! With both send queues acknowledged and both receive queues empty at the
//! cut, client byte `rcv_nxt(A) + i` is upstream byte `snd_nxt(B) + i`, and
//! upstream byte `rcv_nxt(B) + j` is client byte `snd_nxt(A) + j`. So:
//!
//! | entry | seq += | ack += (and SACK edges) |
//! |---|---|---|
//! | client → upstream | `snd_nxt(B) − rcv_nxt(A)` | `rcv_nxt(B) − snd_nxt(A)` |
//! | upstream → client | `snd_nxt(A) − rcv_nxt(B)` | `rcv_nxt(A) − snd_nxt(B)` |
//!
//! Timestamps: the client's TSvals must continue the proxy socket B's clock for
//! the upstream (PAWS there compares with the last TSval B sent), so they are
//! shifted by `TSclock(B) − last client TSval + margin`; the upstream's by
//! `TSclock(A) − last upstream TSval + margin`. A TSecr echoes a TSval that went
//! the other way, so it is shifted back by the other entry's TSval shift.
//!
//! Window: each sender scaled its window by the shift it announced to the
//! proxy; the receiver of the translated segment unscales with the shift the
//! proxy's socket announced to it.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{
    packet_config, packet_flags, packet_forward, packet_state, PacketEntry, PacketKey,
};

use super::sockets::QueueSeqs;

/// Added to the TSval shifts (timestamp clock units, milliseconds here): the
/// translated TSvals run this far ahead of the proxy socket's clock, so they
/// are never below the last TSval that socket sent, even if the peer's last
/// TSval was read a little late.
pub const TS_MARGIN: u32 = 2;

/// `a` comes after `b` in sequence space.
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// An address as the key stores it: IPv6, IPv4 mapped.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether `addr` is IPv4 on the wire (IPv4, or IPv4-mapped IPv6).
pub fn is_ipv4(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

/// The key of segments from `src` to `dst`.
pub fn key(src: SocketAddr, dst: SocketAddr) -> PacketKey {
    PacketKey {
        saddr: mapped(src.ip()),
        daddr: mapped(dst.ip()),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
    }
}

/// One proxy socket at the cut-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAtCut {
    /// The socket's own address.
    pub local: SocketAddr,
    /// Its peer's.
    pub peer: SocketAddr,
    /// Its sequence state (repair mode, queues empty).
    pub seqs: QueueSeqs,
    /// Its TSval clock now.
    pub ts_now: u32,
    /// The shift its peer applies to its window fields.
    pub snd_wscale: u8,
    /// The shift it applies to its own window fields.
    pub rcv_wscale: u8,
    /// The peer's last TSval the tc program saw.
    pub peer_tsval: u32,
    /// The device its segments arrive and leave by.
    pub ifindex: u32,
}

/// Both sockets at the cut-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The socket toward the client (connection A).
    pub client: SocketAtCut,
    /// The socket toward the upstream (connection B).
    pub upstream: SocketAtCut,
    /// `lo`'s index: segments between two local endpoints are passed on, not
    /// redirected.
    pub loopback: u32,
}

/// What the translation of one entry writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Direction {
    /// The key of the segments it rewrites.
    pub key: PacketKey,
    /// The key of the other entry.
    pub peer_key: PacketKey,
    pub seq_delta: u32,
    pub ack_delta: u32,
    pub tsval_delta: u32,
    pub tsecr_delta: u32,
    pub win_shift_in: u8,
    pub win_shift_out: u8,
    /// The rewritten segment's source and destination.
    pub new_src: SocketAddr,
    pub new_dst: SocketAddr,
    /// `rcv_nxt` of the socket these segments used to reach.
    pub count_base: u32,
    pub forward: u8,
    pub out_ifindex: u32,
}

/// The two entries' translations: `[client → upstream, upstream → client]`.
pub fn directions(cut: &Cut) -> [Direction; 2] {
    let (a, b) = (&cut.client, &cut.upstream);
    let a_key = key(a.peer, a.local);
    let b_key = key(b.peer, b.local);
    // The client's TSvals continue B's clock, the upstream's A's.
    let to_upstream_ts = b.ts_now.wrapping_sub(a.peer_tsval).wrapping_add(TS_MARGIN);
    let to_client_ts = a.ts_now.wrapping_sub(b.peer_tsval).wrapping_add(TS_MARGIN);
    let local = a.ifindex == cut.loopback && b.ifindex == cut.loopback;
    let forward = |out_ifindex| {
        if local {
            (packet_forward::PASS, 0)
        } else {
            (packet_forward::REDIRECT_NEIGH, out_ifindex)
        }
    };
    let (a_forward, a_out) = forward(b.ifindex);
    let (b_forward, b_out) = forward(a.ifindex);
    [
        Direction {
            key: a_key,
            peer_key: b_key,
            seq_delta: b.seqs.send.wrapping_sub(a.seqs.recv),
            ack_delta: b.seqs.recv.wrapping_sub(a.seqs.send),
            tsval_delta: to_upstream_ts,
            tsecr_delta: to_client_ts.wrapping_neg(),
            win_shift_in: a.snd_wscale,
            win_shift_out: b.rcv_wscale,
            new_src: b.local,
            new_dst: b.peer,
            count_base: a.seqs.recv,
            forward: a_forward,
            out_ifindex: a_out,
        },
        Direction {
            key: b_key,
            peer_key: a_key,
            seq_delta: a.seqs.send.wrapping_sub(b.seqs.recv),
            ack_delta: a.seqs.recv.wrapping_sub(b.seqs.send),
            tsval_delta: to_client_ts,
            tsecr_delta: to_upstream_ts.wrapping_neg(),
            win_shift_in: b.snd_wscale,
            win_shift_out: a.rcv_wscale,
            new_src: a.local,
            new_dst: a.peer,
            count_base: b.seqs.recv,
            forward: b_forward,
            out_ifindex: b_out,
        },
    ]
}

/// A new MONITOR entry for the segments arriving at the proxy socket whose
/// cookie is `socket_cookie`.
pub fn monitor_entry(
    flow_id: u64,
    socket_cookie: u64,
    peer_key: PacketKey,
    ipv6: bool,
) -> PacketEntry {
    PacketEntry {
        flow_id,
        socket_cookie,
        state: packet_state::MONITOR,
        config: if ipv6 { packet_config::IPV6 } else { 0 },
        peer_key,
        ..PacketEntry::default()
    }
}

/// Where to hold: past everything the proxy socket has of these segments'
/// stream — its `rcv_nxt` (read in repair mode) or, if the program passed it
/// more (out of order, beyond a hole), the highest end it passed.
pub fn hold_edge(entry: &PacketEntry, rcv_nxt: u32) -> u32 {
    if entry.flags & packet_flags::SEQ_SEEN != 0 && after(entry.max_end_seq, rcv_nxt) {
        entry.max_end_seq
    } else {
        rcv_nxt
    }
}

/// `current` (as last read) put in HOLD at `edge`.
pub fn hold(current: &PacketEntry, edge: u32) -> PacketEntry {
    PacketEntry {
        state: packet_state::HOLD,
        hold_edge: edge,
        ..*current
    }
}

/// `current` put back to MONITOR (an aborted cut-over).
pub fn monitor(current: &PacketEntry) -> PacketEntry {
    PacketEntry {
        state: packet_state::MONITOR,
        hold_edge: 0,
        config: current.config & !packet_config::SILENT,
        ..*current
    }
}

/// `current` with its proxy socket's segments dropped at egress (`on`) or
/// not.
pub fn silent(current: &PacketEntry, on: bool) -> PacketEntry {
    with_config(current, packet_config::SILENT, on)
}

/// `current` with the `packet_config` bit `bit` set (`on`) or clear.
fn with_config(current: &PacketEntry, bit: u32, on: bool) -> PacketEntry {
    let config = if on {
        current.config | bit
    } else {
        current.config & !bit
    };
    PacketEntry { config, ..*current }
}

/// `current` (as last read) translating as `direction` says.
pub fn translating(current: &PacketEntry, direction: &Direction) -> PacketEntry {
    let (new_src, new_dst) = (
        mapped(direction.new_src.ip()),
        mapped(direction.new_dst.ip()),
    );
    PacketEntry {
        state: packet_state::TRANSLATE,
        seq_delta: direction.seq_delta,
        ack_delta: direction.ack_delta,
        tsval_delta: direction.tsval_delta,
        tsecr_delta: direction.tsecr_delta,
        win_shift_in: direction.win_shift_in,
        win_shift_out: direction.win_shift_out,
        forward: direction.forward,
        out_ifindex: direction.out_ifindex,
        new_saddr: new_src,
        new_daddr: new_dst,
        new_sport: direction.new_src.port().to_be_bytes(),
        new_dport: direction.new_dst.port().to_be_bytes(),
        count_base: direction.count_base,
        max_end_seq: direction.count_base,
        bytes: 0,
        flags: current.flags
            & !(packet_flags::FIN_SEEN
                | packet_flags::PEER_FIN
                | packet_flags::PEER_FIN_ACKED
                | packet_flags::RST_SEEN)
            | packet_flags::SEQ_SEEN,
        ..*current
    }
}

/// The translation's FIN and RST state of one entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryEnd {
    /// The entry's sender acknowledged the FIN from the other side.
    pub peer_fin_acked: bool,
    /// A RST from this entry's sender was forwarded.
    pub reset: bool,
    /// This entry's sender opened a new connection on the 4-tuple
    /// ([`packet_flags::REUSED`]).
    pub reused: bool,
}

/// Reads [`EntryEnd`] from an entry's flags.
pub fn entry_end(entry: &PacketEntry) -> EntryEnd {
    EntryEnd {
        peer_fin_acked: entry.flags & packet_flags::PEER_FIN_ACKED != 0,
        reset: entry.flags & packet_flags::RST_SEEN != 0,
        reused: entry.flags & packet_flags::REUSED != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(local: &str, peer: &str, recv: u32, send: u32, ts_now: u32) -> SocketAtCut {
        SocketAtCut {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            seqs: QueueSeqs { recv, send },
            ts_now,
            snd_wscale: 7,
            rcv_wscale: 9,
            peer_tsval: 0,
            ifindex: 1,
        }
    }

    fn cut() -> Cut {
        let mut client = socket("127.0.0.1:3128", "127.0.0.1:40000", 1_000, 5_000_000, 700);
        client.peer_tsval = 9_000;
        let mut upstream = socket(
            "127.0.0.1:41000",
            "127.0.0.1:443",
            u32::MAX - 10,
            77,
            123_456,
        );
        upstream.peer_tsval = 4_000_000_000;
        upstream.snd_wscale = 2;
        upstream.rcv_wscale = 14;
        Cut {
            client,
            upstream,
            loopback: 1,
        }
    }

    /// Applies an entry's deltas as the tc program does.
    fn seq(direction: &Direction, seq: u32) -> u32 {
        seq.wrapping_add(direction.seq_delta)
    }
    fn ack(direction: &Direction, ack: u32) -> u32 {
        ack.wrapping_add(direction.ack_delta)
    }

    #[test]
    fn bytes_map_one_to_one_across_the_cut() {
        let c = cut();
        let [up, down] = directions(&c);
        // Client byte rcv_nxt(A) + i is upstream byte snd_nxt(B) + i.
        for i in [0u32, 1, 1460, 1 << 31, u32::MAX] {
            assert_eq!(
                seq(&up, c.client.seqs.recv.wrapping_add(i)),
                c.upstream.seqs.send.wrapping_add(i)
            );
            assert_eq!(
                seq(&down, c.upstream.seqs.recv.wrapping_add(i)),
                c.client.seqs.send.wrapping_add(i)
            );
        }
        // An ACK from the client of upstream byte j (as it reached the client)
        // acknowledges the upstream's own byte j.
        for j in [0u32, 10, 65_535, u32::MAX] {
            let client_ack = c.client.seqs.send.wrapping_add(j);
            assert_eq!(ack(&up, client_ack), c.upstream.seqs.recv.wrapping_add(j));
            let upstream_ack = c.upstream.seqs.send.wrapping_add(j);
            assert_eq!(ack(&down, upstream_ack), c.client.seqs.recv.wrapping_add(j));
        }
        // Each direction's ACK translation undoes the other's sequence translation.
        assert_eq!(up.ack_delta, down.seq_delta.wrapping_neg());
        assert_eq!(down.ack_delta, up.seq_delta.wrapping_neg());
    }

    #[test]
    fn timestamps_continue_the_proxy_clocks_and_echoes_come_back_exact() {
        let c = cut();
        let [up, down] = directions(&c);
        // The client's last TSval becomes B's clock now plus the margin, so the
        // upstream's PAWS sees it after every TSval B sent.
        assert_eq!(
            c.client.peer_tsval.wrapping_add(up.tsval_delta),
            c.upstream.ts_now.wrapping_add(TS_MARGIN)
        );
        // The upstream's TSvals across the 2^32 wrap land on A's clock.
        assert_eq!(
            c.upstream.peer_tsval.wrapping_add(down.tsval_delta),
            c.client.ts_now.wrapping_add(TS_MARGIN)
        );
        let later = c.upstream.peer_tsval.wrapping_add(500);
        assert!(after(later.wrapping_add(down.tsval_delta), c.client.ts_now));
        // An upstream TSval echoed by the client reaches the upstream unchanged.
        for tsval in [c.upstream.peer_tsval, later, 3] {
            let seen_by_client = tsval.wrapping_add(down.tsval_delta);
            assert_eq!(seen_by_client.wrapping_add(up.tsecr_delta), tsval);
            let seen_by_upstream = tsval.wrapping_add(up.tsval_delta);
            assert_eq!(seen_by_upstream.wrapping_add(down.tsecr_delta), tsval);
        }
    }

    #[test]
    fn windows_are_rescaled_between_the_shifts() {
        let [up, down] = directions(&cut());
        // The client scaled by 7 (what it announced to A); the upstream reads
        // B's window fields with B's own shift, 14.
        assert_eq!((up.win_shift_in, up.win_shift_out), (7, 14));
        assert_eq!((down.win_shift_in, down.win_shift_out), (2, 9));
    }

    #[test]
    fn addresses_ports_and_forwarding() {
        let mut c = cut();
        let [up, down] = directions(&c);
        assert_eq!(up.key, key(c.client.peer, c.client.local));
        assert_eq!(up.peer_key, down.key);
        assert_eq!(
            (up.new_src, up.new_dst),
            (c.upstream.local, c.upstream.peer)
        );
        assert_eq!(
            (down.new_src, down.new_dst),
            (c.client.local, c.client.peer)
        );
        assert_eq!(
            (up.forward, down.forward),
            (packet_forward::PASS, packet_forward::PASS)
        );
        c.client.ifindex = 5;
        c.upstream.ifindex = 6;
        let [up, down] = directions(&c);
        assert_eq!(
            (up.forward, up.out_ifindex),
            (packet_forward::REDIRECT_NEIGH, 6)
        );
        assert_eq!(
            (down.forward, down.out_ifindex),
            (packet_forward::REDIRECT_NEIGH, 5)
        );
    }

    #[test]
    fn v4_mapped_socket_addresses_key_like_ipv4_on_the_wire() {
        let v4: SocketAddr = "10.77.1.2:5000".parse().unwrap();
        let mapped_v6: SocketAddr = "[::ffff:10.77.1.2]:5000".parse().unwrap();
        let proxy: SocketAddr = "10.77.1.1:3128".parse().unwrap();
        assert_eq!(key(v4, proxy), key(mapped_v6, proxy));
        assert!(is_ipv4(&mapped_v6));
        assert!(!is_ipv4(&"[fd00::1]:1".parse().unwrap()));
        assert_eq!(key(v4, proxy).sport, [0x13, 0x88]);
        assert_eq!(key(v4, proxy).reversed(), key(proxy, v4));
    }

    #[test]
    fn the_hold_edge_is_past_everything_the_proxy_received() {
        let mut entry = PacketEntry::default();
        assert_eq!(hold_edge(&entry, 100), 100);
        entry.max_end_seq = 150;
        assert_eq!(hold_edge(&entry, 100), 100, "max_end_seq not valid yet");
        entry.flags = packet_flags::SEQ_SEEN;
        assert_eq!(hold_edge(&entry, 100), 150);
        assert_eq!(hold_edge(&entry, 200), 200);
        // Across the wrap, "after" is sequence order, not integer order.
        entry.max_end_seq = 10;
        assert_eq!(hold_edge(&entry, u32::MAX - 5), 10);
    }

    #[test]
    fn translating_keeps_sightings_and_restarts_the_counts() {
        let c = cut();
        let [up, _] = directions(&c);
        let current = PacketEntry {
            flow_id: 9,
            flags: packet_flags::SEEN_INGRESS | packet_flags::FIN_SEEN,
            last_tsval: 42,
            bytes: 1234,
            ..PacketEntry::default()
        };
        let entry = translating(&hold(&current, 7), &up);
        assert_eq!(entry.state, packet_state::TRANSLATE);
        assert_eq!(entry.flow_id, 9);
        assert_eq!(entry.last_tsval, 42);
        assert_eq!(entry.bytes, 0);
        assert_eq!(entry.max_end_seq, c.client.seqs.recv);
        assert_eq!(
            entry.flags,
            packet_flags::SEEN_INGRESS | packet_flags::SEQ_SEEN
        );
        assert_eq!(entry.new_sport, 41000u16.to_be_bytes());
        assert_eq!(entry.new_daddr, mapped("127.0.0.1".parse().unwrap()));
        assert_eq!(monitor(&entry).state, packet_state::MONITOR);
        let silenced = silent(&hold(&current, 7), true);
        assert_eq!(
            silenced.config & packet_config::SILENT,
            packet_config::SILENT
        );
        assert_eq!(silenced.state, packet_state::HOLD);
        assert_eq!(monitor(&silenced).config & packet_config::SILENT, 0);
        assert_eq!(silent(&silenced, false).config, current.config);
    }
}
