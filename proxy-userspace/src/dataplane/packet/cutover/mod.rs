//! Promotion: from a tunnel the splice pump runs to one the tc program
//! translates, losing, duplicating and reordering nothing.
//!
//! 1. The tunnel's two entries are in MONITOR from the hand-over on.
//! 2. Once `--promote-after` bytes have passed, the sightings are completed
//!    (a window probe from each proxy socket makes both the proxy socket and
//!    the peer send a segment) and the tunnel is qualified.
//! 3. The pump stops reading (`forwarding`). Each proxy socket sends its
//!    pending ACK (`TCP_QUICKACK`), so its peer knows the whole window it
//!    offers; each peer keeps sending until that window is used up, or has
//!    nothing to send (`stop::StopWatch` decides which, from `rcv_nxt`, the
//!    window's right edge and what the tc program saw). Its bytes wait,
//!    acknowledged, in the proxy socket's receive queue; none is in flight.
//! 4. What each proxy socket holds is *peeked*, not read, and written to the
//!    other socket (`packet::forward`): its window stays shut, so its peer
//!    stays stopped.
//! 5. HOLD at each socket's `rcv_nxt` (`drain`): a stopped peer sends nothing
//!    new; one that was merely idle may, and that segment is dropped and sent
//!    again. Bytes that reached a socket before the hold are forwarded too.
//!    The cut waits until both send queues are acknowledged.
//! 6. The cut (`cut`): `TCP_QUICKACK`, egress silence, `TCP_REPAIR`, the
//!    sequence numbers and timestamp clocks read, TRANSLATE installed, with
//!    no await between.
//! 7. Each proxy socket, let out at egress for a moment, drops the bytes it
//!    forwarded without copying them: its window opens and it tells its peer
//!    so — one window update, clamped to the window the far end offers, whose
//!    TSval the egress program raises to the newest translated one — and the
//!    peer's next segments are translated.
//!
//! A peer that does not stop within [`STOP_DEADLINE`] (a slow, steady
//! sender) gets the old order instead: the pump goes on, HOLD drops the
//! peers' new segments while the sockets drain, and the peers retransmit them
//! after the cut (a loss-recovery episode: up to a retransmission timeout,
//! ~200 ms, when one segment was in flight). A hold whose drain makes no
//! progress for [`HOLD_DEADLINE`] or lasts [`HOLD_LIMIT`], or a socket that
//! leaves ESTABLISHED, aborts: the
//! forwarded bytes are dropped from the queues they were peeked from, the
//! entries go back to MONITOR, the peers retransmit what was dropped, and the
//! pump goes on.

mod cut;
mod drain;
mod forwarding;

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use proxy_common::{packet_flags, tcp_state, PacketEntry, PacketKey};
use tokio::net::TcpStream;

use crate::dataplane::pump::Moved;

use super::{
    forward,
    kernel::Kernel,
    qualify::{self, Connection, Reason, Refusal},
    relay::{Pause, Threshold},
    sockets::{self, ConnInfo},
    stop::{self, StopWatch},
    translate::{self, Cut, Direction, SocketAtCut},
};

/// The longest a hold may wait for the proxy sockets to drain without
/// progress (a byte forwarded or acknowledged).
pub const HOLD_DEADLINE: Duration = Duration::from_secs(2);
/// The longest a hold may last, progress or not. With loss on one link the
/// other peer can fill a proxy socket's whole receive window (23 MiB seen)
/// before it stops, and the cut-over forwards that at the lossy link's rate.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// The longest the paused pump waits for both peers to stop (see
/// [`stop::StopWatch`]).
pub const STOP_DEADLINE: Duration = Duration::from_millis(300);
/// How long to wait for the segments a window probe provokes.
const SIGHTING_WAIT: Duration = Duration::from_millis(200);
/// How many more window probes a socket whose connection was not sighted
/// gets, [`PROBE_AGAIN`] apart.
const SIGHTING_PROBES_AGAIN: u32 = 2;
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
    /// The byte count of the direction reading this socket, which the bytes
    /// the cut-over forwards itself join (moved before the cut, like the
    /// pump's, whether or not the cut happens).
    pub moved: &'a Moved,
    /// Bytes peeked from this socket that the other one has not taken yet
    /// (its send buffer was full): written before anything is peeked again,
    /// so each byte is copied out once.
    pub unsent: std::sync::Mutex<Vec<u8>>,
}

/// What promotion needs.
pub struct Promotion<'a> {
    pub kernel: &'a Kernel,
    pub client: Conn<'a>,
    pub upstream: Conn<'a>,
    pub threshold: &'a Threshold,
    /// Stops the pump's reads for the stop-and-forward cut.
    pub pause: &'a Pause,
}

/// A tunnel that was promoted.
#[derive(Debug)]
pub struct Promoted {
    /// What was installed: `[client → upstream, upstream → client]`.
    pub directions: [Direction; 2],
    /// Time from the threshold to qualification's end.
    pub qualified: Duration,
    /// Time from the threshold to HOLD (the peers stopped and what they left
    /// forwarded, on the stop-and-forward path).
    pub held: Duration,
    /// Time from the threshold to TRANSLATE.
    pub took: Duration,
    /// Whether the peers were stopped by their windows (nothing held), or
    /// the old order dropped what they sent meanwhile.
    pub stopped: bool,
    /// Bytes the cut-over forwarded itself (client's, upstream's), counted
    /// in the directions' byte counts like the pump's.
    pub forwarded: [u64; 2],
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
        self.kernel.attach_new_interfaces();
        let started = Instant::now();
        let (infos, devices, mut probed) = self.qualify().await?;
        let qualified = started.elapsed();
        self.pause.pause();
        let stopped = match self.stop_and_forward(&infos).await {
            Ok(forwarded) => {
                let held_at = Instant::now();
                match self.hold_at_rcv_nxt() {
                    Ok(()) => Some((forwarded, held_at)),
                    Err(reason) => {
                        self.undo_forward(forwarded, &reason);
                        None
                    }
                }
            }
            Err(reason) => {
                log::debug!("packet: the peers did not stop ({reason}); holding instead");
                None
            }
        };
        let stop_path = stopped.is_some();
        let (mut forwarded, held_at) = match stopped {
            Some(stopped) => stopped,
            None => {
                self.pause.resume();
                let held_at = Instant::now();
                self.hold_at_edges()?;
                ([0, 0], held_at)
            }
        };
        let cut = self
            .drain_and_cut(
                infos,
                devices,
                stop_path.then_some(&mut forwarded),
                held_at,
                &mut probed,
            )
            .await;
        let directions = match cut {
            Ok(directions) => directions,
            Err(err) => {
                if stop_path {
                    self.undo_forward(forwarded, "the cut did not happen");
                    self.pause.resume();
                }
                return Err(err);
            }
        };
        if stop_path {
            self.wake(forwarded);
        }
        Ok(Promoted {
            directions,
            qualified,
            held: held_at.duration_since(started),
            took: started.elapsed(),
            stopped: stop_path,
            forwarded,
        })
    }

    /// Qualification: what the sockets say, then what the tc program saw of
    /// both connections (waiting for the window probes' answers when it has
    /// not seen them yet). Returns the sockets' facts, the connections'
    /// devices, and when each socket was probed.
    async fn qualify(
        &self,
    ) -> Result<([ConnInfo; 2], (u32, u32), [Option<Instant>; 2]), NotPromoted> {
        let mut infos = self.infos()?;
        // Each socket's peer MSS, read in repair mode. If the program has not
        // seen the connection both ways yet, leaving repair mode sends a
        // window probe, which the peer answers: a segment each way (device,
        // no NAT, the peer's TSval).
        let mut probed = [None; 2];
        let entries = self.entries()?;
        for (index, conn) in self.conns().into_iter().enumerate() {
            let probe = !sighted(&entries[index]);
            probed[index] = probe.then(Instant::now);
            infos[index].peer_mss = peer_mss(conn, probe)?;
        }
        let entries = self.entries()?;
        qualify::sockets(
            &self.connection(0, infos, entries),
            &self.connection(1, infos, entries),
        )
        .map_err(NotPromoted)?;
        let mut entries = self.entries()?;
        let mut deadline = Instant::now() + SIGHTING_WAIT;
        let mut probes_left = SIGHTING_PROBES_AGAIN;
        loop {
            while !entries.iter().all(sighted) && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
                entries = self.entries()?;
            }
            if entries.iter().all(sighted) || probes_left == 0 {
                break;
            }
            // A lost probe or a lost answer (a lossy path): probe again once
            // the peer's rate limit on answers to out-of-window segments
            // (`tcp_invalid_ratelimit`) lets it answer, rather than refuse
            // the path for lack of a sighting.
            probes_left -= 1;
            let since = probed
                .iter()
                .flatten()
                .map(|at| at.elapsed())
                .min()
                .unwrap_or(PROBE_AGAIN);
            tokio::time::sleep(PROBE_AGAIN.saturating_sub(since)).await;
            entries = self.entries()?;
            for (index, conn) in self.conns().into_iter().enumerate() {
                if !sighted(&entries[index]) {
                    probed[index] = Some(Instant::now());
                    peer_mss(conn, true)?;
                }
            }
            deadline = Instant::now() + SIGHTING_WAIT;
        }
        let devices = qualify::path(
            &self.connection(0, infos, entries),
            &self.connection(1, infos, entries),
            self.kernel.loopback,
            self.kernel.every_interface_attached(),
        )
        .map_err(NotPromoted)?;
        Ok((infos, devices, probed))
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
}

/// Runs `read` on the socket in repair mode, then leaves it; with `probe`,
/// leaving sends a window probe (`TCP_REPAIR_OFF` sends one: an ACK with
/// sequence number `snd_una - 1`, which the peer answers with an ACK).
/// `conn`'s peer MSS, read in repair mode; with `probe`, leaving repair
/// mode sends a window probe.
fn peer_mss(conn: &Conn<'_>, probe: bool) -> Result<u32, NotPromoted> {
    in_repair(conn.socket, probe, sockets::peer_mss).map_err(|err| {
        NotPromoted::new(
            Reason::Internal,
            format!("reading the {} socket in repair mode: {err}", conn.name),
        )
    })
}

fn in_repair<T>(
    socket: &TcpStream,
    probe: bool,
    read: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let fd = socket.as_fd();
    sockets::repair_on(fd)?;
    let read = read(fd);
    sockets::repair_off(fd, probe)?;
    read
}

/// The socket's `rcv_nxt`, read in repair mode.
fn rcv_nxt(socket: &TcpStream) -> std::io::Result<u32> {
    in_repair(socket, false, |fd| Ok(sockets::queue_seqs(fd)?.recv))
}

/// The socket's `rcv_nxt` and window state, read in repair mode.
fn read_window(socket: &TcpStream) -> std::io::Result<(u32, sockets::RepairWindow)> {
    in_repair(socket, false, |fd| {
        Ok((sockets::queue_seqs(fd)?.recv, sockets::repair_window(fd)?))
    })
}
