//! A hand-made TCP retransmission: one segment, sent on a raw socket, that
//! repeats bytes a connected socket has already sent (and its peer received)
//! followed by new ones — what a real sender does after a loss when its
//! segments no longer line up with what the receiver queued. The receiving
//! kernel queues such a segment untrimmed; readers must skip the overlap.

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
};

use etherparse::TcpHeader;
use socket2::{Domain, Protocol, Socket, Type};

/// `TCP_REPAIR_QUEUE` values (include/uapi/linux/tcp.h).
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCP_REPAIR` value that leaves repair mode without a window probe.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

fn setsockopt_int(stream: &TcpStream, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one int through the pointer, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn queue_seq(stream: &TcpStream, queue: libc::c_int) -> io::Result<u32> {
    setsockopt_int(stream, libc::TCP_REPAIR_QUEUE, queue)?;
    let mut value: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The next sequence number `stream` will send and the next it expects, read
/// in TCP repair mode (needs CAP_NET_ADMIN), which is left at once without
/// touching the connection.
pub fn sequence_numbers(stream: &TcpStream) -> io::Result<(u32, u32)> {
    setsockopt_int(stream, libc::TCP_REPAIR, 1)?;
    let seqs = queue_seq(stream, TCP_SEND_QUEUE)
        .and_then(|send| Ok((send, queue_seq(stream, TCP_RECV_QUEUE)?)));
    setsockopt_int(stream, libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    seqs
}

/// Sends, as if from `stream`, one TCP segment (ACK|PSH, no options) with
/// sequence number `seq` carrying `payload`. The connection must not use TCP
/// timestamps (the segment carries none).
pub fn send_segment(stream: &TcpStream, seq: u32, ack: u32, payload: &[u8]) -> io::Result<()> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (stream.local_addr()?, stream.peer_addr()?)
    else {
        return Err(io::Error::other("IPv4 only"));
    };
    let segment = segment(local, peer, seq, ack, payload);
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    raw.bind(&SocketAddr::new(IpAddr::V4(*local.ip()), 0).into())?;
    let sent = raw.send_to(&segment, &SocketAddr::new(IpAddr::V4(*peer.ip()), 0).into())?;
    if sent == segment.len() {
        Ok(())
    } else {
        Err(io::Error::other("short raw send"))
    }
}

/// A TCP header (20 bytes, checksummed over the IPv4 pseudo-header) and `payload`.
fn segment(from: SocketAddrV4, to: SocketAddrV4, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut header = TcpHeader::new(from.port(), to.port(), seq, u16::MAX);
    header.ack = true;
    header.psh = true;
    header.acknowledgment_number = ack;
    header.checksum = header
        .calc_checksum_ipv4_raw(from.ip().octets(), to.ip().octets(), payload)
        .expect("a segment shorter than 64 KiB");
    let mut segment = header.to_bytes().to_vec();
    segment.extend_from_slice(payload);
    segment
}
