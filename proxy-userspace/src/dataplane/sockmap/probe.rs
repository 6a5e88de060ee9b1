//! The start-up check of the kernel behaviours the verdict relies on, which
//! no UAPI promises:
//!
//! * for an sk_skb program, `__sk_buff.cb[0]` is `TCP_SKB_CB(skb)->seq`, the
//!   sequence number of the skb's first payload byte (the verdict trims
//!   retransmitted overlaps with it);
//! * the skb the verdict gets starts at that sequence number: `tcp_read_skb`
//!   hands over whole skbs (commit 9b7177b1df64, 6.6), or, if a later kernel
//!   handed over the unread part only, it would have to move `seq` with it.
//!
//! It runs one private tunnel over loopback through the real maps and
//! programs: the client sends 1,000 bytes, the "proxy" reads 10 of them (so
//! the verdict meets a partly read skb, as it would if the control plane ever
//! left one), the pair is spliced, the client sends 3,000 more. Then the bytes
//! the "server" got must be exactly the verdict's count and the tail of what
//! was sent, the verdict's next expected sequence number must be the client's
//! `write_seq` (read in `TCP_REPAIR` mode), and the verdict must have seen no
//! gap and trimmed nothing. Where any of that fails, sockmap is not used.
//! (Under `--test-hook no-overlap-trim` the verdict keeps no sequence numbers,
//! so only the bytes are checked.)

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use proxy_common::{flow_flags, stat, FlowEntry};

use super::kernel::{Kernel, SockMap};
use crate::{
    config::{TestHook, TestHooks},
    sockopt,
};

/// Bytes queued before splicing, of which user space reads [`READ_BEFORE`].
const QUEUED_BEFORE: usize = 1000;
/// Bytes user space reads of the queued skb before splicing.
const READ_BEFORE: usize = 10;
/// Bytes sent after splicing.
const SENT_AFTER: usize = 3000;
/// How long the whole check may take.
const DEADLINE: Duration = Duration::from_secs(3);

/// Why the kernel failed the check.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The loopback sockets of the check could not be set up or read.
    #[error("setting up its loopback tunnel: {0}")]
    Setup(#[from] io::Error),
    /// A map update failed.
    #[error("updating the maps: {0:#}")]
    Maps(anyhow::Error),
    /// The bytes that came out are not what went in.
    #[error("the spliced bytes are wrong: {0}")]
    Bytes(String),
    /// The verdict's sequence bookkeeping disagrees with the socket's.
    #[error("cb[0] is not the skb's sequence number: {0}")]
    Sequence(String),
}

/// Runs the check (see the module documentation).
pub fn check(kernel: &Kernel, hooks: &TestHooks) -> Result<(), ProbeError> {
    let started = Instant::now();
    let pair = Pair::connect()?;
    let result = pair.run(kernel, hooks);
    pair.remove(kernel);
    log::debug!(
        "sockmap start-up check took {:?}: {result:?}",
        started.elapsed()
    );
    result
}

/// The check's two loopback connections: client ↔ proxy-in, proxy-out ↔ server.
struct Pair {
    client: TcpStream,
    proxy_in: TcpStream,
    proxy_out: TcpStream,
    server: TcpStream,
    cookies: [u64; 2],
}

impl Pair {
    fn connect() -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let client = TcpStream::connect_timeout(&addr, DEADLINE)?;
        let (proxy_in, _) = listener.accept()?;
        let proxy_out = TcpStream::connect_timeout(&addr, DEADLINE)?;
        let (server, _) = listener.accept()?;
        for socket in [&client, &proxy_in, &proxy_out, &server] {
            socket.set_read_timeout(Some(DEADLINE))?;
            socket.set_write_timeout(Some(DEADLINE))?;
            socket.set_nodelay(true)?;
        }
        let cookies = [
            sockopt::cookie(proxy_in.as_fd())?,
            sockopt::cookie(proxy_out.as_fd())?,
        ];
        Ok(Self {
            client,
            proxy_in,
            proxy_out,
            server,
            cookies,
        })
    }

    fn run(&self, kernel: &Kernel, hooks: &TestHooks) -> Result<(), ProbeError> {
        let sent: Vec<u8> = (0..QUEUED_BEFORE + SENT_AFTER)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let stats_before =
            [stat::SEQUENCE_GAPS, stat::DUPLICATE_BYTES_TRIMMED].map(|i| kernel.stat(i));

        (&self.client).write_all(&sent[..QUEUED_BEFORE])?;
        wait_until_queued(&self.proxy_in, QUEUED_BEFORE)?;
        let mut head = [0u8; READ_BEFORE];
        (&self.proxy_in).read_exact(&mut head)?;

        for (index, (cookie, peer)) in [
            (self.cookies[0], self.cookies[1]),
            (self.cookies[1], self.cookies[0]),
        ]
        .into_iter()
        .enumerate()
        {
            let entry = FlowEntry {
                peer_cookie: peer,
                consumed_by_user: if index == 0 { READ_BEFORE as u64 } else { 0 },
                ..FlowEntry::default()
            };
            kernel
                .insert_flow(cookie, entry)
                .map_err(ProbeError::Maps)?;
        }
        for map in [SockMap::Targets, SockMap::Spliced] {
            for (cookie, socket) in self.cookies.iter().zip([&self.proxy_in, &self.proxy_out]) {
                kernel
                    .insert_socket(map, *cookie, socket.as_fd())
                    .map_err(|err| ProbeError::Maps(anyhow::Error::new(err)))?;
            }
        }
        sockopt::set_rcvlowat(self.proxy_in.as_fd(), 1)?;
        for chunk in sent[QUEUED_BEFORE..].chunks(SENT_AFTER / 3) {
            (&self.client).write_all(chunk)?;
        }

        let entry = wait_for_verdict(kernel, self.cookies[0], sent.len())?;
        let received = read_available(&self.server, entry.bytes_redirected as usize)?;
        let expected_tail = sent.len().saturating_sub(received.len());
        if entry.bytes_redirected != received.len() as u64 || received != sent[expected_tail..] {
            return Err(ProbeError::Bytes(format!(
                "the verdict counted {} bytes, the far end got {} and they are {}the tail of the {} sent",
                entry.bytes_redirected,
                received.len(),
                if received == sent[expected_tail..] { "" } else { "not " },
                sent.len()
            )));
        }

        let mut write_seq = client_write_seq(&self.client)?;
        if hooks.has(TestHook::FailProbe) {
            write_seq = write_seq.wrapping_add(1);
        }
        let [gaps, trimmed] = [stat::SEQUENCE_GAPS, stat::DUPLICATE_BYTES_TRIMMED]
            .map(|i| kernel.stat(i))
            .into_iter()
            .zip(stats_before)
            .map(|(after, before)| after - before)
            .collect::<Vec<_>>()[..]
        else {
            unreachable!("two counters")
        };
        if !hooks.has(TestHook::NoOverlapTrim)
            && (entry.flags & flow_flags::SEQ_KNOWN == 0 || entry.next_seq != write_seq)
        {
            return Err(ProbeError::Sequence(format!(
                "after the client's last byte (write_seq {write_seq}) the verdict expects {} (flags {:#x})",
                entry.next_seq, entry.flags
            )));
        }
        if gaps != 0 || trimmed != 0 {
            return Err(ProbeError::Sequence(format!(
                "an in-order stream showed {gaps} gaps and {trimmed} repeated bytes"
            )));
        }
        Ok(())
    }

    /// Deletes the check's `FLOWS` entries and takes its sockets out of the
    /// maps, so that closing them sends no flow events.
    fn remove(&self, kernel: &Kernel) {
        for cookie in self.cookies {
            kernel.remove_flow(cookie);
            kernel.remove_socket(SockMap::Spliced, cookie);
            kernel.remove_socket(SockMap::Targets, cookie);
        }
    }
}

/// Waits until `socket` has `bytes` queued to read.
fn wait_until_queued(socket: &TcpStream, bytes: usize) -> io::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while sockopt::readable_bytes(socket.as_fd())? < bytes as u64 {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "loopback bytes never arrived",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Waits until the verdict has seen the client's last byte (its count covers
/// the bytes sent after splicing) and returns the proxy-in socket's entry.
fn wait_for_verdict(kernel: &Kernel, cookie: u64, sent: usize) -> io::Result<FlowEntry> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let entry = kernel.flow(cookie);
        if entry.bytes_redirected >= (sent - READ_BEFORE) as u64 {
            // Whole skbs may have been counted already; a partly read one
            // leaves the count 10 lower.
            std::thread::sleep(Duration::from_millis(5));
            return Ok(kernel.flow(cookie));
        }
        if Instant::now() > deadline {
            return Ok(entry);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads `bytes` from `socket`, or what arrives before the deadline.
fn read_available(mut socket: &TcpStream, bytes: usize) -> io::Result<Vec<u8>> {
    let mut received = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        match socket.read(&mut received[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::TimedOut => break,
            Err(err) => return Err(err),
        }
    }
    received.truncate(filled);
    Ok(received)
}

/// The client's `write_seq` (the sequence number after its last byte), read in
/// `TCP_REPAIR` mode, which the client stays in: closing it then sends nothing.
fn client_write_seq(client: &TcpStream) -> io::Result<u32> {
    sockopt::repair_on(client.as_fd())?;
    Ok(sockopt::queue_seqs(client.as_fd())?.send)
}
