//! The hold and the drain of a cut-over: HOLD installed, the proxy sockets
//! watched until nothing is in flight through them, then the cut.

use super::{cut::CutError, *};

impl Promotion<'_> {
    /// HOLD at each socket's `rcv_nxt`: the peers are stopped, so only a
    /// segment sent meanwhile (by a peer that was idle) is held.
    pub(super) fn hold_at_rcv_nxt(&self) -> Result<(), String> {
        for conn in self.conns() {
            let rcv_nxt = rcv_nxt(conn.socket)
                .map_err(|err| format!("the {} socket's rcv_nxt: {err}", conn.name))?;
            let entry = self
                .kernel
                .get(&conn.key)
                .ok_or("the tunnel's entries are gone")?;
            if let Err(err) = self
                .kernel
                .insert(&conn.key, translate::hold(&entry, rcv_nxt))
            {
                self.release();
                return Err(format!("{err:#}"));
            }
        }
        Ok(())
    }

    /// HOLD at each socket's edge (the old order: the pump keeps running).
    pub(super) fn hold_at_edges(&self) -> Result<(), NotPromoted> {
        let entries = self.entries()?;
        for (conn, entry) in self.conns().into_iter().zip(&entries) {
            let rcv_nxt = rcv_nxt(conn.socket).map_err(|err| {
                NotPromoted::new(
                    Reason::Internal,
                    format!("reading the {} socket in repair mode: {err}", conn.name),
                )
            })?;
            let edge = translate::hold_edge(entry, rcv_nxt);
            if let Err(err) = self.kernel.insert(&conn.key, translate::hold(entry, edge)) {
                self.release();
                return Err(NotPromoted::new(Reason::Internal, format!("{err:#}")));
            }
        }
        Ok(())
    }

    /// Waits until the sockets have drained — nothing in the pump, receive
    /// queues holding only the bytes forwarded from them, send queues
    /// acknowledged — and cuts. On the stop-and-forward path (`forwarded`),
    /// what the other socket could not take yet, and bytes that reached a
    /// socket before the hold took effect, are forwarded here.
    pub(super) async fn drain_and_cut(
        &self,
        infos: [ConnInfo; 2],
        devices: (u32, u32),
        mut forwarded: Option<&mut [u64; 2]>,
        held_at: Instant,
        probed: &mut [Option<Instant>; 2],
    ) -> Result<[Direction; 2], NotPromoted> {
        let limit = held_at + HOLD_LIMIT;
        let (mut progress, mut progressed_at) = (None, held_at);
        loop {
            if let Some(forwarded) = forwarded.as_deref_mut() {
                if let Err(err) = self.forward_new(forwarded) {
                    self.release();
                    return Err(NotPromoted::new(Reason::Internal, err));
                }
            }
            let forwarded = forwarded.as_deref().copied().unwrap_or([0, 0]);
            if !self.conns().iter().all(|conn| established(conn.socket)) {
                self.release();
                return Err(NotPromoted::new(
                    Reason::NotEstablished,
                    "a connection left ESTABLISHED during the hold",
                ));
            }
            let idle = self.pump_idle();
            let drains = self.drains(forwarded);
            let mark = Some((forwarded, drains.map(|drain| drain.unacknowledged)));
            if mark != progress {
                (progress, progressed_at) = (mark, Instant::now());
            }
            let quiet = drains.iter().all(Drain::quiet);
            if idle && !quiet {
                self.ask_for_acks(held_at, probed, drains);
            }
            if idle && quiet {
                match self.cut(infos, devices, forwarded) {
                    Ok(directions) => return Ok(directions),
                    Err(CutError::Retry(reason)) => {
                        log::debug!("packet: cut-over retried: {reason}")
                    }
                    Err(CutError::Abort(reason)) => {
                        self.release();
                        return Err(NotPromoted::new(Reason::Internal, reason));
                    }
                }
            }
            let now = Instant::now();
            if now >= progressed_at + HOLD_DEADLINE || now >= limit {
                self.release();
                let state: Vec<String> = self
                    .conns()
                    .into_iter()
                    .zip(forwarded)
                    .map(|(conn, bytes)| {
                        let fd = conn.socket.as_fd();
                        format!(
                            "{}: {} to read ({bytes} forwarded), {} unacknowledged, busy {}",
                            conn.name,
                            crate::sockopt::readable_bytes(fd).unwrap_or(u64::MAX),
                            crate::sockopt::send_queue_len(fd).unwrap_or(u64::MAX),
                            conn.busy.load(Ordering::Relaxed)
                        )
                    })
                    .collect();
                return Err(NotPromoted::new(
                    Reason::HoldTimeout,
                    format!(
                        "the proxy sockets did not drain within {:?} of the hold, the last {:?} without progress ({})",
                        now - held_at,
                        now - progressed_at,
                        state.join("; ")
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// During the drain: a socket whose receive side is quiet but whose send
    /// queue waits for an ACK gets a window probe, which its peer answers at
    /// once, instead of waiting for the peer's delayed ACK (up to 40 ms
    /// measured). The peer rate-limits answers to out-of-window segments (one
    /// per `tcp_invalid_ratelimit`, 500 ms), so each socket is probed at most
    /// once per that time, and not within [`PROBE_AFTER`] of the hold.
    pub(super) fn ask_for_acks(
        &self,
        held_at: Instant,
        probed: &mut [Option<Instant>; 2],
        drains: [Drain; 2],
    ) {
        for (index, conn) in self.conns().into_iter().enumerate() {
            let due = probed[index].is_none_or(|at| at.elapsed() >= PROBE_AGAIN);
            if drains[index].waits_for_ack() && due && held_at.elapsed() >= PROBE_AFTER {
                probed[index] = Some(Instant::now());
                let fd = conn.socket.as_fd();
                if let Err(err) =
                    sockets::repair_on(fd).and_then(|()| sockets::repair_off(fd, true))
                {
                    log::debug!("packet: probing the {} socket: {err}", conn.name);
                }
            }
        }
    }

    /// Where each proxy socket's drain stands; `forwarded`: the bytes the
    /// cut-over forwarded from it, still in its receive queue.
    pub(super) fn drains(&self, forwarded: [u64; 2]) -> [Drain; 2] {
        [0, 1].map(|index| Drain::read(self.conns()[index].socket.as_fd(), forwarded[index]))
    }

    /// Whether nothing is in flight through the proxy sockets (see [`Drain`]).
    pub(super) fn quiet(&self, forwarded: [u64; 2]) -> bool {
        self.drains(forwarded).iter().all(Drain::quiet)
    }

    /// Turns the egress drop of both proxy sockets' segments on or off.
    pub(super) fn silence(&self, on: bool) -> anyhow::Result<()> {
        for conn in self.conns() {
            if let Some(entry) = self.kernel.get(&conn.key) {
                self.kernel
                    .insert(&conn.key, translate::silent(&entry, on))?;
            }
        }
        Ok(())
    }
}

/// One proxy socket during the drain.
#[derive(Clone, Copy, Debug)]
pub(super) struct Drain {
    /// Its receive queue holds only the bytes forwarded from it (with none
    /// forwarded, no memory either: nothing out of order).
    receive_side_done: bool,
    /// Bytes sent and not acknowledged (`None`: unreadable).
    unacknowledged: Option<u64>,
}

impl Drain {
    fn read(fd: BorrowedFd<'_>, forwarded: u64) -> Self {
        let readable = crate::sockopt::readable_bytes(fd);
        let receive_side_done = if forwarded == 0 {
            readable.is_ok_and(|n| n == 0) && sockets::receive_memory(fd).is_ok_and(|n| n == 0)
        } else {
            readable.is_ok_and(|n| n == forwarded)
        };
        Self {
            receive_side_done,
            unacknowledged: crate::sockopt::send_queue_len(fd).ok(),
        }
    }

    /// Nothing in flight: the receive side done, the send queue acknowledged.
    fn quiet(&self) -> bool {
        self.receive_side_done && self.unacknowledged == Some(0)
    }

    /// Only an acknowledgement is missing.
    fn waits_for_ack(&self) -> bool {
        self.receive_side_done && self.unacknowledged.is_some_and(|n| n > 0)
    }
}
