//! The stop-and-forward steps of a cut-over: wait for both peers to stop,
//! forward what they left in the proxy sockets, and wake them after the cut.

use super::*;

impl Promotion<'_> {
    /// With the pump paused: waits until no byte is in its pipes and each
    /// peer has stopped (its window used up, or idle: [`StopWatch`]), then
    /// writes what each proxy socket holds to the other one, peeked so the
    /// window stays shut. Returns the bytes forwarded from each (client's,
    /// upstream's); they are still in its receive queue.
    pub(super) async fn stop_and_forward(&self, infos: &[ConnInfo; 2]) -> Result<[u64; 2], String> {
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut watches = infos
            .map(|info| StopWatch::new(info.advmss, Duration::from_micros(u64::from(info.rtt_us))));
        let mut stopped = [None; 2];
        loop {
            if self.pump_idle() {
                let entries = self.entries().map_err(|err| err.0.detail)?;
                for (index, conn) in self.conns().into_iter().enumerate() {
                    // A delayed ACK still to send may open more window: the
                    // peer is stopped by the window it has been told of.
                    sockets::quickack(conn.socket.as_fd()).map_err(|err| {
                        format!("TCP_QUICKACK on the {} socket: {err}", conn.name)
                    })?;
                    let (rcv_nxt, window) = read_window(conn.socket)
                        .map_err(|err| format!("the {} socket's window: {err}", conn.name))?;
                    let entry = entries[index];
                    let sample = stop::Sample {
                        rcv_nxt,
                        room: window.receive_room(rcv_nxt),
                        beyond: entry.flags & packet_flags::SEQ_SEEN != 0
                            && translate::after(entry.max_end_seq, rcv_nxt),
                    };
                    stopped[index] = watches[index].sample(sample, Instant::now());
                }
                if stopped.iter().all(Option::is_some) {
                    log::trace!("packet: peers stopped: {stopped:?}");
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not stopped within {STOP_DEADLINE:?} ({stopped:?})"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let mut forwarded = [0; 2];
        if let Err(err) = self.forward_new(&mut forwarded) {
            self.undo_forward(forwarded, &err);
            return Err(err);
        }
        log::debug!(
            "packet: peers stopped; forwarded {forwarded:?} bytes (so far) held in the proxy sockets"
        );
        Ok(forwarded)
    }

    /// Drops from each socket's receive queue the bytes already forwarded
    /// from it, so that the pump, when it resumes, goes on after them.
    pub(super) fn undo_forward(&self, forwarded: [u64; 2], why: &str) {
        for (conn, bytes) in self.conns().into_iter().zip(forwarded) {
            forward::forget_unsent(conn);
            if let Err(err) = forward::finish(conn.socket, bytes) {
                log::error!(
                    "packet: dropping {bytes} forwarded bytes from the {} socket ({why}): {err}; the stream may repeat them",
                    conn.name
                );
            }
        }
    }

    /// Forwards, each way, what the proxy socket holds beyond the bytes
    /// already forwarded from it (`forwarded`: client's, upstream's), as far
    /// as the other socket takes it now.
    pub(super) fn forward_new(&self, forwarded: &mut [u64; 2]) -> Result<(), String> {
        let pairs = [
            (&self.client, &self.upstream),
            (&self.upstream, &self.client),
        ];
        for ((from, to), forwarded) in pairs.into_iter().zip(forwarded) {
            forward::forward_new(from, to.socket, forwarded)
                .map_err(|err| format!("forwarding what the {} socket holds: {err}", from.name))?;
        }
        Ok(())
    }

    /// Whether no pump direction has bytes in flight.
    pub(super) fn pump_idle(&self) -> bool {
        self.conns()
            .iter()
            .all(|conn| !conn.busy.load(Ordering::Relaxed))
    }

    /// Wakes the peers the stop-and-forward cut left at a shut window: each
    /// proxy socket reads and drops the bytes it forwarded, so its window
    /// opens and it sends its peer one window update (let out at egress for
    /// that moment), clamped to the window the far end offers, which the
    /// translated segments will keep up to date.
    pub(super) fn wake(&self, forwarded: [u64; 2]) {
        let windows = self.conns().map(|conn| {
            sockets::repair_window(conn.socket.as_fd())
                .map(|window| window.snd_wnd)
                .unwrap_or(0)
        });
        for (index, (conn, bytes)) in self.conns().into_iter().zip(forwarded).enumerate() {
            if bytes == 0 {
                continue;
            }
            // The far end of this socket's peer is the other connection's. A
            // far end that offers no window has its own window update to send
            // (translated) when its reader catches up: this peer waits for
            // it, and the socket's update is dropped at egress.
            let far_window = windows[1 - index];
            if let Err(err) = self.wake_one(conn, bytes, far_window) {
                log::debug!(
                    "packet: waking the {} connection's peer: {err:#}",
                    conn.name
                );
            }
        }
    }

    pub(super) fn wake_one(
        &self,
        conn: &Conn<'_>,
        forwarded: u64,
        far_window: u32,
    ) -> anyhow::Result<()> {
        let fd = conn.socket.as_fd();
        let wake = far_window > 0;
        if wake {
            sockets::set_window_clamp(fd, far_window)?;
            self.set_wake(conn, true)?;
        }
        let result = sockets::repair_off(fd, false)
            .and_then(|()| forward::finish(conn.socket, forwarded))
            .and_then(|()| sockets::repair_on(fd));
        if wake {
            self.set_wake(conn, false)?;
        }
        result.map_err(Into::into)
    }

    /// Lets `conn`'s proxy socket's segments out at egress, or not
    /// (`PACKET_WAKE`: its entry translates already and is not replaced).
    pub(super) fn set_wake(&self, conn: &Conn<'_>, on: bool) -> anyhow::Result<()> {
        let cookie = crate::sockopt::cookie(conn.socket.as_fd())?;
        self.kernel.wake(cookie, on)
    }
}
