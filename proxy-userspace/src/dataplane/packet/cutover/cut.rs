//! The cut: with both proxy sockets quiet, repair mode, their sequence and
//! timestamp state read, and TRANSLATE installed, with no await between.

use super::*;

impl Promotion<'_> {
    /// The cut: no await from the first repair-mode switch to TRANSLATE.
    pub(super) fn cut(
        &self,
        infos: [ConnInfo; 2],
        devices: (u32, u32),
        forwarded: [u64; 2],
    ) -> Result<[Direction; 2], CutError> {
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
        if !self.quiet(forwarded) || !self.conns().iter().all(|conn| established(conn.socket)) {
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
pub(super) enum CutError {
    /// Not now; the hold goes on.
    Retry(String),
    /// Not at all.
    Abort(String),
}

fn leave_repair(sockets_in_repair: &[&TcpStream]) {
    for socket in sockets_in_repair {
        if let Err(err) = sockets::repair_off(socket.as_fd(), false) {
            log::error!("packet: cannot leave repair mode: {err}");
        }
    }
}
