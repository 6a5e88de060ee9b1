//! Promotion: from a tunnel the splice pump runs to one the tc program
//! translates.
//!
//! 1. The tunnel's two entries are in MONITOR from the hand-over on.
//! 2. Once `--promote-after` bytes have passed, the sightings are completed
//!    (a window probe from each proxy socket makes both the proxy socket and
//!    the peer send a segment) and the tunnel is qualified.
//! 3. HOLD on both entries: the peers' new payload and FINs are dropped at tc
//!    (they retransmit them later), so the proxy sockets' queues only drain.
//! 4. The pump keeps running until no byte is in its pipes, both receive
//!    queues are empty (nothing out of order either) and both send queues are
//!    acknowledged.
//! 5. Delayed ACKs are sent (`TCP_QUICKACK`), both sockets enter repair mode,
//!    the queues are checked once more, the sequence numbers and timestamp
//!    clocks read, and TRANSLATE installed on both entries.
//!
//! A hold that does not drain within [`HOLD_DEADLINE`], or a socket that
//! leaves ESTABLISHED, aborts: the entries go back to MONITOR, the peers
//! retransmit what was dropped, and the pump goes on.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use proxy_common::{packet_flags, tcp_state, PacketEntry, PacketKey};
use tokio::net::TcpStream;

use super::{
    kernel::Kernel,
    qualify::{self, Connection, Reason, Refusal},
    relay::Threshold,
    sockets::{self, ConnInfo},
    translate::{self, Cut, Direction, SocketAtCut},
};

/// The longest a hold may wait for the proxy sockets to drain.
pub const HOLD_DEADLINE: Duration = Duration::from_secs(2);
/// How long to wait for the segments a window probe provokes.
const SIGHTING_WAIT: Duration = Duration::from_millis(200);
/// Poll interval while waiting for sightings or a drain.
const POLL: Duration = Duration::from_millis(1);
/// How long a drain waits for an ACK before it asks for one (a window probe).
const PROBE_AFTER: Duration = Duration::from_millis(3);
/// A peer answers one out-of-window segment per this long (the default
/// `net.ipv4.tcp_invalid_ratelimit`).
const PROBE_AGAIN: Duration = Duration::from_millis(500);

/// One side of a tunnel being promoted.
pub struct Conn<'a> {
    pub name: &'static str,
    pub socket: &'a TcpStream,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The key of the segments that arrive on this connection.
    pub key: PacketKey,
    /// Set while the pump direction reading this socket has bytes in flight.
    pub busy: &'a AtomicBool,
}

/// What promotion needs.
pub struct Promotion<'a> {
    pub kernel: &'a Kernel,
    pub client: Conn<'a>,
    pub upstream: Conn<'a>,
    pub threshold: &'a Threshold,
}

/// A tunnel that was promoted.
#[derive(Debug)]
pub struct Promoted {
    /// What was installed: `[client → upstream, upstream → client]`.
    pub directions: [Direction; 2],
    /// Time from HOLD to TRANSLATE.
    pub hold: Duration,
}

/// Why a tunnel was not promoted (it stays on the pump).
#[derive(Debug)]
pub struct NotPromoted(pub Refusal);

impl NotPromoted {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self(Refusal::new(reason, detail))
    }
}

fn sighted(entry: &PacketEntry) -> bool {
    let needed = packet_flags::SEEN_INGRESS | packet_flags::SEEN_EGRESS | packet_flags::TS_SEEN;
    entry.flags & needed == needed
}

fn established(socket: &TcpStream) -> bool {
    sockets::conn_info(socket.as_fd())
        .is_ok_and(|info| u32::from(info.state) == tcp_state::ESTABLISHED)
}

impl Promotion<'_> {
    fn entries(&self) -> Result<[PacketEntry; 2], NotPromoted> {
        match (
            self.kernel.get(&self.client.key),
            self.kernel.get(&self.upstream.key),
        ) {
            (Some(a), Some(b)) => Ok([a, b]),
            _ => Err(NotPromoted::new(
                Reason::Internal,
                "the tunnel's entries are gone",
            )),
        }
    }

    fn conns(&self) -> [&Conn<'_>; 2] {
        [&self.client, &self.upstream]
    }

    /// Runs the promotion; returns when the tunnel translates or why it does
    /// not. Between its awaits the pump runs; the cut itself has none.
    pub async fn run(&self) -> Result<Promoted, NotPromoted> {
        self.threshold.reached().await;
        let mut infos = self.infos()?;
        // Each socket's rcv_nxt and its peer's MSS, read in repair mode. If
        // the program has not seen the connection both ways yet, leaving
        // repair mode sends a window probe, which the peer answers: a segment
        // each way (device, no NAT, the peer's TSval).
        let mut rcv_nxt = [0; 2];
        let mut probed = [None; 2];
        let entries = self.entries()?;
        for (index, conn) in self.conns().into_iter().enumerate() {
            let probe = !sighted(&entries[index]);
            probed[index] = probe.then(Instant::now);
            (rcv_nxt[index], infos[index].peer_mss) = peek(conn.socket, probe).map_err(|err| {
                NotPromoted::new(
                    Reason::Internal,
                    format!("reading the {} socket in repair mode: {err}", conn.name),
                )
            })?;
        }
        let entries = self.entries()?;
        qualify::sockets(
            &self.connection(0, infos, entries),
            &self.connection(1, infos, entries),
        )
        .map_err(NotPromoted)?;
        let held_at = Instant::now();
        let entries = self.entries()?;
        for ((conn, entry), next) in self.conns().into_iter().zip(&entries).zip(rcv_nxt) {
            let edge = translate::hold_edge(entry, next);
            if let Err(err) = self.kernel.insert(&conn.key, translate::hold(entry, edge)) {
                self.release();
                return Err(NotPromoted::new(Reason::Internal, format!("{err:#}")));
            }
        }
        let mut entries = self.entries()?;
        let deadline = held_at + SIGHTING_WAIT;
        while !entries.iter().all(sighted) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            entries = self.entries()?;
        }
        let devices = qualify::path(
            &self.connection(0, infos, entries),
            &self.connection(1, infos, entries),
            self.kernel.loopback,
            self.kernel.every_interface_attached(),
        )
        .map_err(|refusal| {
            self.release();
            NotPromoted(refusal)
        })?;
        let deadline = held_at + HOLD_DEADLINE;
        loop {
            if !self.conns().iter().all(|conn| established(conn.socket)) {
                self.release();
                return Err(NotPromoted::new(
                    Reason::NotEstablished,
                    "a connection left ESTABLISHED during the hold",
                ));
            }
            let idle = self
                .conns()
                .iter()
                .all(|conn| !conn.busy.load(Ordering::Relaxed));
            let quiet = self.quiet();
            if idle && !quiet {
                self.ask_for_acks(held_at, &mut probed);
            }
            if idle && quiet {
                match self.cut(infos, devices) {
                    Ok(directions) => {
                        return Ok(Promoted {
                            directions,
                            hold: held_at.elapsed(),
                        })
                    }
                    Err(CutError::Retry(reason)) => {
                        log::debug!("packet: cut-over retried: {reason}")
                    }
                    Err(CutError::Abort(reason)) => {
                        self.release();
                        return Err(NotPromoted::new(Reason::Internal, reason));
                    }
                }
            }
            if Instant::now() >= deadline {
                self.release();
                return Err(NotPromoted::new(
                    Reason::HoldTimeout,
                    format!("the proxy sockets did not drain within {HOLD_DEADLINE:?} of the hold"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn connection(
        &self,
        index: usize,
        infos: [ConnInfo; 2],
        entries: [PacketEntry; 2],
    ) -> Connection {
        let conn = self.conns()[index];
        Connection {
            name: conn.name,
            local: conn.local,
            peer: conn.peer,
            info: infos[index],
            entry: entries[index],
        }
    }

    /// Turns the egress drop of both proxy sockets' segments on or off.
    fn silence(&self, on: bool) -> anyhow::Result<()> {
        for conn in self.conns() {
            if let Some(entry) = self.kernel.get(&conn.key) {
                self.kernel
                    .insert(&conn.key, translate::silent(&entry, on))?;
            }
        }
        Ok(())
    }

    /// During the drain: a socket whose receive side is quiet but whose send
    /// queue waits for an ACK gets a window probe, which its peer answers at
    /// once, instead of waiting for the peer's delayed ACK (up to 40 ms
    /// measured). The peer rate-limits answers to out-of-window segments (one
    /// per `tcp_invalid_ratelimit`, 500 ms), so each socket is probed at most
    /// once per that time, and not within [`PROBE_AFTER`] of the hold.
    fn ask_for_acks(&self, held_at: Instant, probed: &mut [Option<Instant>; 2]) {
        for (index, conn) in self.conns().into_iter().enumerate() {
            let fd = conn.socket.as_fd();
            let waits_for_ack = sockets::recv_queue_len(fd).is_ok_and(|n| n == 0)
                && sockets::receive_memory(fd).is_ok_and(|n| n == 0)
                && crate::sockopt::send_queue_len(fd).is_ok_and(|n| n > 0);
            let due = probed[index].is_none_or(|at| at.elapsed() >= PROBE_AGAIN);
            if waits_for_ack && due && held_at.elapsed() >= PROBE_AFTER {
                probed[index] = Some(Instant::now());
                if let Err(err) =
                    sockets::repair_on(fd).and_then(|()| sockets::repair_off(fd, true))
                {
                    log::debug!("packet: probing the {} socket: {err}", conn.name);
                }
            }
        }
    }

    fn infos(&self) -> Result<[ConnInfo; 2], NotPromoted> {
        let read = |conn: &Conn<'_>| {
            sockets::conn_info(conn.socket.as_fd()).map_err(|err| {
                NotPromoted::new(
                    Reason::Internal,
                    format!("TCP_INFO of the {} socket: {err}", conn.name),
                )
            })
        };
        Ok([read(&self.client)?, read(&self.upstream)?])
    }

    fn quiet(&self) -> bool {
        self.conns()
            .iter()
            .all(|conn| sockets::quiet(conn.socket.as_fd()).unwrap_or(false))
    }

    /// Puts both entries back to MONITOR (an aborted hold; the peers
    /// retransmit what was dropped).
    pub fn release(&self) {
        for conn in self.conns() {
            if let Some(entry) = self.kernel.get(&conn.key) {
                if let Err(err) = self.kernel.insert(&conn.key, translate::monitor(&entry)) {
                    log::error!(
                        "packet: cannot release the hold of the {} connection: {err:#}",
                        conn.name
                    );
                }
            }
        }
    }

    /// The cut: no await from the first repair-mode switch to TRANSLATE.
    fn cut(&self, infos: [ConnInfo; 2], devices: (u32, u32)) -> Result<[Direction; 2], CutError> {
        for conn in self.conns() {
            // A socket in repair mode still runs its timers: keepalive off
            // (spliced never turns it on; this makes sure), and a delayed ACK
            // sent now rather than from repair mode.
            let socket = socket2::SockRef::from(conn.socket);
            let _ = socket.set_keepalive(false);
            sockets::quickack(conn.socket.as_fd()).map_err(|err| {
                CutError::Abort(format!("TCP_QUICKACK on the {} socket: {err}", conn.name))
            })?;
        }
        // From here until TRANSLATE the proxy sockets say nothing: anything
        // they send now would carry an older TSval than the translated
        // segments the peers are about to get.
        self.silence(true)
            .map_err(|err| CutError::Abort(format!("silencing the proxy sockets: {err:#}")))?;
        let mut repaired = Vec::with_capacity(2);
        for conn in self.conns() {
            if let Err(err) = sockets::repair_on(conn.socket.as_fd()) {
                leave_repair(&repaired);
                let _ = self.silence(false);
                return Err(CutError::Abort(format!(
                    "TCP_REPAIR on the {} socket: {err}",
                    conn.name
                )));
            }
            repaired.push(conn.socket);
        }
        // A segment may have reached a socket between the drain check and
        // repair mode (a retransmission below the hold edge).
        if !self.quiet() || !self.conns().iter().all(|conn| established(conn.socket)) {
            leave_repair(&repaired);
            let _ = self.silence(false);
            return Err(CutError::Retry(
                "a socket was not quiet in repair mode".into(),
            ));
        }
        let read = |conn: &Conn<'_>| -> std::io::Result<(sockets::QueueSeqs, u32)> {
            Ok((
                sockets::queue_seqs(conn.socket.as_fd())?,
                sockets::timestamp_now(conn.socket.as_fd())?,
            ))
        };
        let (client_state, upstream_state) = match (read(&self.client), read(&self.upstream)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(err), _) | (_, Err(err)) => {
                leave_repair(&repaired);
                return Err(CutError::Abort(format!(
                    "reading the sequence state: {err}"
                )));
            }
        };
        let entries = match self.entries() {
            Ok(entries) => entries,
            Err(NotPromoted(refusal)) => {
                leave_repair(&repaired);
                return Err(CutError::Abort(refusal.detail));
            }
        };
        let at_cut = |conn: &Conn<'_>,
                      (seqs, ts_now): (sockets::QueueSeqs, u32),
                      info: ConnInfo,
                      entry: &PacketEntry,
                      ifindex| {
            SocketAtCut {
                local: conn.local,
                peer: conn.peer,
                seqs,
                ts_now,
                snd_wscale: info.snd_wscale,
                rcv_wscale: info.rcv_wscale,
                peer_tsval: entry.last_tsval,
                ifindex,
            }
        };
        let cut = Cut {
            client: at_cut(&self.client, client_state, infos[0], &entries[0], devices.0),
            upstream: at_cut(
                &self.upstream,
                upstream_state,
                infos[1],
                &entries[1],
                devices.1,
            ),
            loopback: self.kernel.loopback,
        };
        let directions = translate::directions(&cut);
        for (index, (conn, direction)) in self.conns().into_iter().zip(&directions).enumerate() {
            if let Err(err) = self.kernel.insert(
                &conn.key,
                translate::translating(&entries[index], direction),
            ) {
                // The first entry may translate already: hold it again (its
                // sockets are still in repair, nothing was sent meanwhile).
                if index == 1 {
                    let _ = self
                        .kernel
                        .insert(&self.client.key, translate::monitor(&entries[0]));
                }
                leave_repair(&repaired);
                return Err(CutError::Abort(format!(
                    "installing the translation: {err:#}"
                )));
            }
        }
        for (conn, (seqs, _)) in self.conns().into_iter().zip([client_state, upstream_state]) {
            if sockets::queue_seqs(conn.socket.as_fd()).ok() != Some(seqs) {
                log::error!(
                    "packet: the {} socket's sequence state moved during the cut-over; the tunnel may lose bytes",
                    conn.name
                );
            }
        }
        Ok(directions)
    }
}

/// Why a cut did not happen.
enum CutError {
    /// Not now; the hold goes on.
    Retry(String),
    /// Not at all.
    Abort(String),
}

/// Reads the socket's `rcv_nxt` and its peer's MSS in repair mode, then
/// leaves it, with `probe` sending a window probe (`TCP_REPAIR_OFF` sends
/// one: an ACK with sequence number `snd_una - 1`, which the peer answers
/// with an ACK).
fn peek(socket: &TcpStream, probe: bool) -> std::io::Result<(u32, u32)> {
    sockets::repair_on(socket.as_fd())?;
    let read = sockets::queue_seqs(socket.as_fd())
        .and_then(|seqs| Ok((seqs.recv, sockets::peer_mss(socket.as_fd())?)));
    sockets::repair_off(socket.as_fd(), probe)?;
    read
}

fn leave_repair(sockets_in_repair: &[&TcpStream]) {
    for socket in sockets_in_repair {
        if let Err(err) = sockets::repair_off(socket.as_fd(), false) {
            log::error!("packet: cannot leave repair mode: {err}");
        }
    }
}
