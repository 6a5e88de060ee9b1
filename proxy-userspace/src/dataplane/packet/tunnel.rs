//! One tunnel on the packet plane: the splice pump with promotion running
//! beside it, then the translated flow until it ends, then the linger.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use proxy_common::{PacketEntry, PacketEvent, PacketKey};
use tokio::{net::TcpStream, sync::mpsc};

use super::{
    cutover::{Conn, NotPromoted, Promoted, Promotion},
    handover::{HandoverValue, Tunnels},
    kernel::Kernel,
    qualify::Reason,
    relay::{relay_one_way, Pause, Threshold},
    reset,
    translate::{self, entry_end, EntryEnd},
};
use crate::dataplane::{
    pump::{self, DirectionError, Moved},
    LimitClock, PerDirection, PlaneKind, Side, Tunnel, TunnelEnd, TunnelOutcome,
};

/// How long a translated flow's entries stay after its end (both FINs
/// acknowledged, or a RST), for late retransmissions and the last ACKs.
pub const LINGER: Duration = Duration::from_secs(3);
/// How often a translated flow's entries are read (events normally come first).
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// Longest sleep between two checks of the tunnel limits while pumping.
const LIMIT_CHECK_CAP: Duration = Duration::from_secs(1);

/// What every tunnel of the plane shares.
pub struct Shared {
    pub kernel: Kernel,
    /// The `tunnels` map of `--packet-state-dir`: promoted tunnels are handed
    /// to the next process on SIGTERM.
    pub tunnels: Option<Tunnels>,
    /// `--promote-after`.
    pub promote_after: u64,
    pub next_flow: AtomicU64,
    pub promoted: AtomicU64,
    /// Tunnels of a previous process adopted at start-up.
    pub adopted: AtomicU64,
    /// Tunnels that stayed on the pump, by [`Reason`] (in `Reason::ALL` order).
    pub not_promoted: [AtomicU64; Reason::ALL.len()],
    pub lingering: AtomicU64,
}

/// A tunnel's two entries, its `tunnels` value and its event subscription;
/// removed on drop unless handed over.
pub struct Registration {
    shared: Arc<Shared>,
    keys: [PacketKey; 2],
    flow_id: u64,
    /// Left in the maps for the next process.
    handed_over: bool,
}

impl Registration {
    fn new(
        shared: &Arc<Shared>,
        addrs: &Addrs,
        handover: &[u8],
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<PacketEvent>)> {
        let flow_id = shared.next_flow.fetch_add(1, Ordering::Relaxed);
        let keys = [
            translate::key(addrs.client_peer, addrs.client_local),
            translate::key(addrs.upstream_peer, addrs.upstream_local),
        ];
        let (registration, events) = Self::adopt(shared, keys, flow_id);
        if let Some(tunnels) = &shared.tunnels {
            tunnels.insert(flow_id, &HandoverValue::new(keys[0], handover))?;
        }
        let ipv6 = !translate::is_ipv4(&addrs.client_peer);
        shared.kernel.insert(
            &keys[0],
            translate::monitor_entry(flow_id, addrs.cookies[0], keys[1], ipv6),
        )?;
        shared.kernel.insert(
            &keys[1],
            translate::monitor_entry(flow_id, addrs.cookies[1], keys[0], ipv6),
        )?;
        Ok((registration, events))
    }

    /// The registration of a flow whose entries are (or are about to be) in
    /// the maps, e.g. left by a previous process (`keys`: the client
    /// connection's entry first).
    pub fn adopt(
        shared: &Arc<Shared>,
        keys: [PacketKey; 2],
        flow_id: u64,
    ) -> (Self, mpsc::UnboundedReceiver<PacketEvent>) {
        let events = shared.kernel.subscribe(flow_id);
        let registration = Self {
            shared: shared.clone(),
            keys,
            flow_id,
            handed_over: false,
        };
        (registration, events)
    }

    /// Whether the next process can take this tunnel over.
    fn can_hand_over(&self) -> bool {
        self.shared
            .tunnels
            .as_ref()
            .is_some_and(|tunnels| tunnels.get(self.flow_id).is_some())
    }

    fn entries(&self) -> Option<[PacketEntry; 2]> {
        match (
            self.shared.kernel.get(&self.keys[0]),
            self.shared.kernel.get(&self.keys[1]),
        ) {
            (Some(a), Some(b)) => Some([a, b]),
            _ => None,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.kernel.unsubscribe(self.flow_id);
        if self.handed_over {
            return;
        }
        for key in &self.keys {
            // Only this tunnel's: a client that reused its port during the
            // linger has a new tunnel, whose entry replaced this one's.
            self.shared.kernel.remove_own(key, self.flow_id);
        }
        if let Some(tunnels) = &self.shared.tunnels {
            tunnels.remove(self.flow_id);
        }
    }
}

/// The four addresses of a tunnel and its two sockets' cookies.
pub struct Addrs {
    pub cookies: [u64; 2],
    pub client_local: SocketAddr,
    pub client_peer: SocketAddr,
    pub upstream_local: SocketAddr,
    pub upstream_peer: SocketAddr,
}

fn addrs(client: &TcpStream, upstream: &TcpStream) -> std::io::Result<Addrs> {
    Ok(Addrs {
        cookies: [
            crate::sockopt::cookie(client.as_fd())?,
            crate::sockopt::cookie(upstream.as_fd())?,
        ],
        client_local: client.local_addr()?,
        client_peer: client.peer_addr()?,
        upstream_local: upstream.local_addr()?,
        upstream_peer: upstream.peer_addr()?,
    })
}

/// Runs `tunnel` to its end (see the module documentation).
pub async fn run_tunnel(shared: Arc<Shared>, tunnel: Tunnel) -> TunnelOutcome {
    let Tunnel {
        client,
        upstream,
        limits,
        mut shutdown,
        draining,
        progress,
        handover,
        ..
    } = tunnel;
    let registered = match addrs(&client, &upstream) {
        Ok(addrs) => Registration::new(&shared, &addrs, &handover).map(|r| (r, addrs)),
        Err(err) => Err(err.into()),
    };
    let (registration, events, addrs) = match registered {
        Ok(((registration, events), addrs)) => (Some(registration), Some(events), Some(addrs)),
        Err(err) => {
            log::warn!("packet: tunnel not registered ({err:#}); it stays on the splice pump");
            (None, None, None)
        }
    };
    let (up, down) = Moved::pair(&progress, PlaneKind::Splice);
    let busy = [AtomicBool::new(false), AtomicBool::new(false)];
    let threshold = Threshold::new(shared.promote_after);
    let pause = Pause::default();
    let mut clock = LimitClock::start(limits);
    let (promoted, end) = {
        let promotion = registration
            .as_ref()
            .zip(addrs.as_ref())
            .map(|(registration, addrs)| Promotion {
                kernel: &shared.kernel,
                client: Conn {
                    name: "client",
                    socket: &client,
                    local: addrs.client_local,
                    peer: addrs.client_peer,
                    key: registration.keys[0],
                    busy: &busy[0],
                    moved: &up,
                    unsent: std::sync::Mutex::default(),
                },
                upstream: Conn {
                    name: "upstream",
                    socket: &upstream,
                    local: addrs.upstream_local,
                    peer: addrs.upstream_peer,
                    key: registration.keys[1],
                    busy: &busy[1],
                    moved: &down,
                    unsent: std::sync::Mutex::default(),
                },
                threshold: &threshold,
                pause: &pause,
            });
        let promoting = async {
            match &promotion {
                Some(promotion) => promotion.run().await,
                None => std::future::pending().await,
            }
        };
        let c2u = relay_one_way(
            &client,
            &upstream,
            &up,
            Side::Client,
            &busy[0],
            &threshold,
            &pause,
        );
        let u2c = relay_one_way(
            &upstream,
            &client,
            &down,
            Side::Upstream,
            &busy[1],
            &threshold,
            &pause,
        );
        tokio::pin!(c2u, u2c, promoting);
        let (mut up_done, mut down_done, mut trying) = (false, false, promotion.is_some());
        let mut end = TunnelEnd::Closed;
        let mut promoted: Option<Promoted> = None;
        while !(up_done && down_done) {
            let result = tokio::select! {
                result = &mut c2u, if !up_done => { up_done = true; result }
                result = &mut u2c, if !down_done => { down_done = true; result }
                outcome = &mut promoting, if trying => {
                    trying = false;
                    match outcome {
                        Ok(done) => {
                            promoted = Some(done);
                            break;
                        }
                        Err(NotPromoted(refusal)) => {
                            let kind = Reason::ALL.iter().position(|&r| r == refusal.reason);
                            shared.not_promoted[kind.unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
                            log::debug!("packet: tunnel not promoted: {refusal}");
                            continue;
                        }
                    }
                }
                _ = shutdown.wait_for(|closing| *closing) => Err(DirectionError::Limit(TunnelEnd::Shutdown)),
                () = tokio::time::sleep(clock.next_check(LIMIT_CHECK_CAP)) => {
                    match clock.check(up.get() + down.get()) {
                        Some(exceeded) => Err(DirectionError::Limit(exceeded)),
                        None => continue,
                    }
                }
            };
            if let Err(err) = result {
                end = err.end();
                log::debug!("packet: tunnel aborted before promotion: {err}");
                pump::reset(&client);
                pump::reset(&upstream);
                break;
            }
        }
        (promoted, end)
    };
    let Some(promoted) = promoted else {
        return TunnelOutcome {
            client_to_upstream: up.get(),
            upstream_to_client: down.get(),
            dataplane: PlaneKind::Splice,
            end,
        };
    };
    let registration = registration.expect("a promoted tunnel is registered");
    let before = [up.get(), down.get()];
    shared.promoted.fetch_add(1, Ordering::Relaxed);
    progress.note_promotion(before);
    if let Some(tunnels) = &shared.tunnels {
        tunnels.promoted(registration.flow_id, before);
    }
    log::debug!(
        "packet: tunnel promoted after {} + {} bytes ({} + {} of them forwarded by the cut-over; {}; from the threshold: qualified {:?}, held {:?}, translating {:?}): {:?}",
        before[0],
        before[1],
        promoted.forwarded[0],
        promoted.forwarded[1],
        if promoted.stopped {
            "peers stopped by their windows"
        } else {
            "peers' segments held"
        },
        promoted.qualified,
        promoted.held,
        promoted.took,
        promoted.directions
    );
    let addrs = addrs.expect("a registered tunnel has its addresses");
    translated(Translated {
        shared,
        registration,
        events,
        shutdown,
        draining,
        clock,
        progress,
        before,
        addrs,
        sockets: [Box::new(client), Box::new(upstream)],
    })
    .await
}

/// A promoted tunnel, from the cut (or its adoption) to its end.
pub struct Translated {
    pub shared: Arc<Shared>,
    pub registration: Registration,
    pub events: Option<mpsc::UnboundedReceiver<PacketEvent>>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub clock: LimitClock,
    pub progress: crate::dataplane::Progress,
    /// Bytes the socket plane moved before promotion.
    pub before: [u64; 2],
    pub addrs: Addrs,
    /// The proxy's two sockets (client's, upstream's), in repair mode: they
    /// hold the 4-tuples until the entries are gone, the client's only until
    /// the flow ends (then its 4-tuple is the client's to reuse).
    pub sockets: [Box<dyn Send>; 2],
}

/// Follows a translated tunnel to its end, then lingers (or resets both
/// endpoints, or hands the tunnel over).
pub async fn translated(tunnel: Translated) -> TunnelOutcome {
    let Translated {
        shared,
        mut registration,
        mut events,
        mut shutdown,
        mut draining,
        mut clock,
        progress,
        before,
        addrs,
        sockets,
    } = tunnel;
    let handover = registration.can_hand_over();
    let end = follow(
        &registration,
        events.as_mut(),
        &mut shutdown,
        handover.then_some(&mut draining),
        &mut clock,
        &progress,
        before,
    )
    .await;
    let last = registration.entries();
    let after = last.map_or([0, 0], |[a, b]| [a.bytes, b.bytes]);
    // Whether each endpoint opened a new connection on its tuple (see
    // `flow_end`).
    let reused = last.map_or([false; 2], |entries| entries.map(|e| entry_end(&e).reused));
    let outcome = TunnelOutcome {
        client_to_upstream: before[0] + after[0],
        upstream_to_client: before[1] + after[1],
        dataplane: PlaneKind::Packet,
        end,
    };
    match end {
        TunnelEnd::HandedOver => {
            // The entries, the `tunnels` value and the pinned programs stay;
            // the sockets go with the process (a repair-mode close sends
            // nothing), which is exiting.
            registration.handed_over = true;
            std::mem::forget(sockets);
        }
        TunnelEnd::Closed | TunnelEnd::ClientError | TunnelEnd::UpstreamError
            if reused == [false; 2] || end == TunnelEnd::Closed =>
        {
            // Logged now: the next process must not log it again if this one
            // stops during the linger.
            if let Some(tunnels) = &shared.tunnels {
                tunnels.remove(registration.flow_id);
            }
            // The client's 4-tuple is free at once: the client may reuse its
            // port now (its entry translates late segments of the old
            // connection and passes a new one's SYN, which the listener
            // gets, and what follows it). Nothing else could take that tuple,
            // whose local end is the listening port.
            let [client, upstream] = sockets;
            drop(client);
            // The endpoints may still retransmit a FIN or send a last ACK:
            // keep translating a while; the upstream socket stays in repair
            // mode until then, so no new connection of this host takes its
            // port.
            shared.lingering.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                tokio::time::sleep(LINGER).await;
                drop(registration);
                drop(upstream);
                registration_gone(&shared);
            });
        }
        _ => {
            // A limit or shutdown: both endpoints get a RST now (see
            // reset.rs), sent once the translation is gone so nothing it
            // forwards can overtake it; with the entries and the repair-mode
            // sockets gone, a segment either endpoint sends later gets one
            // from this host too. An endpoint that opened a new connection
            // on its tuple gets none: the old connection is gone there.
            drop(registration);
            drop(sockets);
            if let Some([client_in, upstream_in]) = last {
                reset_endpoints(&addrs, &client_in, &upstream_in, reused.map(|r| !r));
            }
        }
    }
    outcome
}

/// Sends each endpoint of an ended translated flow a RST it accepts: the
/// client's from the proxy's listening address, the upstream's from the
/// proxy's upstream socket's address, at what each was sent last.
/// `wanted`: whether each (client, upstream) gets one.
fn reset_endpoints(
    addrs: &Addrs,
    client_in: &PacketEntry,
    upstream_in: &PacketEntry,
    wanted: [bool; 2],
) {
    for (from, to, seq) in [
        (
            addrs.client_local,
            addrs.client_peer,
            reset::reset_seq(upstream_in),
        ),
        (
            addrs.upstream_local,
            addrs.upstream_peer,
            reset::reset_seq(client_in),
        ),
    ]
    .into_iter()
    .zip(wanted)
    .filter_map(|(reset, wanted)| wanted.then_some(reset))
    {
        if let Err(err) = reset::send(from, to, seq) {
            // Without CAP_NET_RAW the endpoint learns of the end from this
            // host's own RST, the next time it sends.
            log::debug!("packet: RST to {to}: {err}");
        }
    }
}

fn registration_gone(shared: &Shared) {
    shared.lingering.fetch_sub(1, Ordering::Relaxed);
}

/// How a translated flow ended, if it has, from its two entries' ends.
///
/// Both FINs acknowledged is a close in order even if a RST was seen too:
/// an endpoint that has reset its connection acknowledges nothing after, so
/// that RST came after the close — typically the answer of a host whose
/// socket is gone to a late segment (a retransmission, a duplicate the
/// network made), which the programs translate during the linger like any
/// other. The RST and the last acknowledgement can reach user space in the
/// same read of the entries; checked first, the RST made a complete tunnel
/// look broken.
///
/// An endpoint that opens a new connection on its 4-tuple (a SYN) has
/// dropped the old one, whether or not its close was seen: the tunnel ends
/// as that side's error unless it had closed in order.
pub(super) fn flow_end(client: EntryEnd, upstream: EntryEnd) -> Option<TunnelEnd> {
    if client.peer_fin_acked && upstream.peer_fin_acked {
        Some(TunnelEnd::Closed)
    } else if client.reset || client.reused {
        Some(TunnelEnd::ClientError)
    } else if upstream.reset || upstream.reused {
        Some(TunnelEnd::UpstreamError)
    } else {
        None
    }
}

/// Follows a translated flow until it ends: both FINs acknowledged, a RST, a
/// limit or shutdown, or (with `draining`) the proxy starts draining and the
/// flow is handed over. Reports its bytes to `progress` as it goes.
async fn follow(
    registration: &Registration,
    mut events: Option<&mut mpsc::UnboundedReceiver<PacketEvent>>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    mut draining: Option<&mut tokio::sync::watch::Receiver<bool>>,
    clock: &mut LimitClock,
    progress: &crate::dataplane::Progress,
    before: [u64; 2],
) -> TunnelEnd {
    loop {
        let Some([client_in, upstream_in]) = registration.entries() else {
            log::error!("packet: a translated tunnel's entries disappeared");
            return TunnelEnd::ClientError;
        };
        let totals = [before[0] + client_in.bytes, before[1] + upstream_in.bytes];
        progress.advance_to(PlaneKind::Packet, PerDirection(totals));
        if let Some(end) = flow_end(entry_end(&client_in), entry_end(&upstream_in)) {
            return end;
        }
        if let Some(exceeded) = clock.check(totals[0] + totals[1]) {
            return exceeded;
        }
        let wait = clock.next_check(FOLLOW_POLL);
        tokio::select! {
            event = async {
                match events.as_deref_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if event.is_none() {
                    events = None;
                }
            }
            _ = shutdown.wait_for(|closing| *closing) => return TunnelEnd::Shutdown,
            _ = async {
                let drained = match draining.as_deref_mut() {
                    Some(draining) => draining.wait_for(|draining| *draining).await.is_ok(),
                    None => false,
                };
                // Without a sender (the control plane is gone) nothing drains.
                if !drained {
                    std::future::pending::<()>().await;
                }
            } => return TunnelEnd::HandedOver,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(peer_fin_acked: bool, reset: bool) -> EntryEnd {
        EntryEnd {
            peer_fin_acked,
            reset,
            reused: false,
        }
    }

    #[test]
    fn a_new_connection_on_a_tuple_ends_the_tunnel() {
        let (open, acked) = (end(false, false), end(true, false));
        let reused = |end: EntryEnd| EntryEnd {
            reused: true,
            ..end
        };
        assert_eq!(flow_end(reused(open), open), Some(TunnelEnd::ClientError));
        assert_eq!(
            flow_end(acked, reused(open)),
            Some(TunnelEnd::UpstreamError)
        );
        // Closed in order first (the port reused during the linger).
        assert_eq!(flow_end(reused(acked), acked), Some(TunnelEnd::Closed));
    }

    #[test]
    fn a_reset_after_both_fins_are_acknowledged_is_a_close() {
        let (open, acked) = (end(false, false), end(true, false));
        assert_eq!(flow_end(open, open), None);
        assert_eq!(flow_end(acked, open), None);
        assert_eq!(flow_end(acked, acked), Some(TunnelEnd::Closed));
        // A RST before the close is an error of the side that sent it.
        assert_eq!(
            flow_end(end(false, true), open),
            Some(TunnelEnd::ClientError)
        );
        assert_eq!(
            flow_end(acked, end(false, true)),
            Some(TunnelEnd::UpstreamError)
        );
        // Both FINs acknowledged: a RST seen as well came after the close.
        assert_eq!(flow_end(acked, end(true, true)), Some(TunnelEnd::Closed));
        assert_eq!(flow_end(end(true, true), acked), Some(TunnelEnd::Closed));
    }
}
