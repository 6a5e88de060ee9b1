//! Ending a translated flow on the proxy's initiative (idle timeout,
//! lifetime, shutdown): a RST to each endpoint, as if from the proxy socket
//! it talks to. The proxy's sockets sit in repair mode and cannot send one,
//! so the segment is built here and sent through a raw socket.
//!
//! A RST is only accepted when its sequence number is exactly the receiver's
//! `rcv_nxt` (RFC 5961 §3; Linux: tcp_validate_incoming()), which for an
//! endpoint of a translated flow is just past the last byte (and FIN) the
//! translation delivered to it — exact for a flow at rest. An endpoint of a
//! busy flow may not have taken every byte yet and ignores it; the next
//! segment it sends then finds neither a translation nor a socket on this
//! host, and the host answers it with a RST the endpoint accepts.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use etherparse::TcpHeader;
use proxy_common::{packet_flags, PacketEntry};

/// The sequence number a RST to the receiver of `entry`'s translated
/// segments must carry: just past the last byte (and FIN) the translation
/// sent it, in the receiver's sequence space.
pub fn reset_seq(entry: &PacketEntry) -> u32 {
    let next = if entry.flags & packet_flags::FIN_SEEN != 0 {
        entry.fin_seq.wrapping_add(1)
    } else {
        entry.max_end_seq
    };
    next.wrapping_add(entry.seq_delta)
}

/// The TCP header of a RST from `from` to `to` with sequence number `seq`,
/// checksum included.
fn segment(from: SocketAddr, to: SocketAddr, seq: u32) -> io::Result<Vec<u8>> {
    let mut header = TcpHeader::new(from.port(), to.port(), seq, 0);
    header.rst = true;
    header.checksum = match (canonical(from.ip()), canonical(to.ip())) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.calc_checksum_ipv4_raw(src.octets(), dst.octets(), &[])
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            header.calc_checksum_ipv6_raw(src.octets(), dst.octets(), &[])
        }
        _ => return Err(io::Error::other("a RST between two IP versions")),
    }
    .map_err(io::Error::other)?;
    Ok(header.to_bytes().to_vec())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is on the wire.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Sends a RST from `from` to `to` with sequence number `seq` through a raw
/// socket bound to `from`'s address (the kernel adds the IP header). Needs
/// `CAP_NET_RAW`.
pub fn send(from: SocketAddr, to: SocketAddr, seq: u32) -> io::Result<()> {
    let bytes = segment(from, to, seq)?;
    let (src, dst) = (canonical(from.ip()), canonical(to.ip()));
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = socket2::SockRef::from(&socket);
    raw.bind(&SocketAddr::new(src, 0).into())?;
    raw.send_to(&bytes, &SocketAddr::new(dst, 0).into())?;
    log::trace!(
        "packet: RST {from} → {to} seq {seq} sent on fd {}",
        socket.as_raw_fd()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_lands_just_past_what_the_receiver_got() {
        let entry = PacketEntry {
            max_end_seq: 1_000,
            seq_delta: 5u32.wrapping_neg(),
            ..PacketEntry::default()
        };
        assert_eq!(reset_seq(&entry), 995);
        let finished = PacketEntry {
            flags: packet_flags::FIN_SEEN,
            fin_seq: 1_000,
            ..entry
        };
        assert_eq!(reset_seq(&finished), 996);
    }

    #[test]
    fn segments_carry_rst_and_a_valid_checksum() {
        for (from, to) in [
            ("10.0.0.1:3128", "10.0.0.2:40000"),
            ("[::ffff:10.0.0.1]:3128", "[::ffff:10.0.0.2]:40000"),
            ("[fd00::1]:3128", "[fd00::2]:40000"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            let bytes = segment(from, to, 77).unwrap();
            let (header, rest) = TcpHeader::from_slice(&bytes).unwrap();
            assert!(rest.is_empty());
            assert!(header.rst && !header.syn && !header.ack);
            assert_eq!(header.sequence_number, 77);
            assert_eq!((header.source_port, header.destination_port), (3128, 40000));
            let expected = match (canonical(from.ip()), canonical(to.ip())) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    header.calc_checksum_ipv4_raw(s.octets(), d.octets(), &[])
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    header.calc_checksum_ipv6_raw(s.octets(), d.octets(), &[])
                }
                _ => unreachable!(),
            };
            assert_eq!(header.checksum, expected.unwrap());
        }
        let mixed = segment(
            "10.0.0.1:1".parse().unwrap(),
            "[fd00::2]:2".parse().unwrap(),
            0,
        );
        assert!(mixed.is_err());
    }
}
