//! The packet data plane (`--dataplane packet`): segment translation.
//!
//! A tunnel starts on the splice pump. Once it has moved `--promote-after`
//! bytes it is promoted: a tc program (proxy-ebpf `packet.rs`) rewrites every
//! later segment of the client's connection into a segment of the proxy's
//! upstream connection and back — addresses, ports, sequence and
//! acknowledgement numbers, timestamps, SACK blocks, window, checksums — so
//! the client and the upstream run one end-to-end TCP, and the proxy's two
//! sockets sit silent in repair mode, holding their 4-tuples, until the flow
//! has ended. See `cutover/mod.rs` for the order of the cut and `translate.rs`
//! for the arithmetic.
//!
//! * [`kernel`] — loading and attaching the programs, the maps, events;
//! * [`sockets`] — repair mode and the socket state the cut reads;
//! * [`qualify`] — whether a tunnel can be promoted, and why not;
//! * [`translate`] — the translation arithmetic (pure, unit-tested);
//! * [`relay`] — the splice pump before promotion, and its pause;
//! * [`stop`] — when a peer has stopped sending (pure, unit-tested);
//! * [`forward`] — the cut-over's own forwarding: peek, write, drop;
//! * [`cutover`] — stop, forward, hold, drain, repair, translate, wake (or
//!   abort);
//! * [`reset`] — the RSTs that end a translated flow on a limit or shutdown;
//! * [`tunnel`] — one tunnel from hand-over to the end of its linger;
//! * [`handover`] — `--packet-state-dir`: pinned maps and links, so that
//!   promoted tunnels outlive the process; [`adopt`] — taking them over at
//!   start-up.

mod adopt;
mod cutover;
mod forward;
mod handover;
mod kernel;
pub mod qualify;
mod relay;
mod reset;
mod sockets;
mod stop;
mod translate;
mod tunnel;

use std::{
    fmt,
    sync::{atomic::Ordering, Arc, Mutex},
};

use proxy_common::packet_stat;

use super::{
    AdoptedTunnel, DataPlane, DataPlaneChoice, Picked, PlaneKind, PlaneStats, Tunnel, TunnelFuture,
};
use crate::config::Config;

/// `--promote-after` when not given: a tunnel is promoted once it has moved
/// this much through the splice pump. A cut-over costs the peers one
/// retransmission of what they send during it, and one with a single segment
/// in flight waits for a loss probe (~200 ms); a tunnel past 1 MiB has shown
/// it is a bulk transfer with a window of segments in flight, where recovery
/// takes a few round trips. Short HTTPS exchanges never pay it.
pub const DEFAULT_PROMOTE_AFTER: u64 = 1 << 20;

/// The packet data plane. See the module documentation.
pub struct PacketDataPlane {
    shared: Arc<tunnel::Shared>,
    /// Tunnels of a previous process, until the control plane takes them.
    adopted: Mutex<Vec<AdoptedTunnel>>,
}

impl PacketDataPlane {
    /// Loads and attaches the tc programs (with `--packet-state-dir`, takes
    /// over those a previous process left, and its tunnels). Must run inside
    /// a tokio runtime.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let state = config
            .packet_state_dir
            .as_deref()
            .map(handover::StateDir::open)
            .transpose()?;
        let kernel = kernel::Kernel::load(&config.packet_interfaces, state.as_ref())?;
        let tunnels = state
            .as_ref()
            .map(handover::StateDir::tunnels)
            .transpose()?;
        log::info!(
            "packet plane: tc programs attached to {}",
            kernel
                .attached()
                .iter()
                .map(|(name, index)| format!("{name} ({index})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let shared = Arc::new(tunnel::Shared {
            kernel,
            tunnels,
            promote_after: config.promote_after.unwrap_or(DEFAULT_PROMOTE_AFTER),
            next_flow: 1.into(),
            promoted: 0.into(),
            adopted: 0.into(),
            not_promoted: Default::default(),
            lingering: 0.into(),
        });
        let adopted = adopt::adopt(&shared);
        Ok(Self {
            shared,
            adopted: Mutex::new(adopted),
        })
    }
}

impl DataPlane for PacketDataPlane {
    fn name(&self) -> DataPlaneChoice {
        DataPlaneChoice::Packet
    }

    fn pick(&self, _tunnel: &Tunnel) -> Picked<'_> {
        (PlaneKind::Packet, self)
    }

    fn planes(&self) -> Vec<PlaneKind> {
        vec![PlaneKind::Splice, PlaneKind::Packet]
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(tunnel::run_tunnel(self.shared.clone(), tunnel))
    }

    fn hands_over(&self) -> bool {
        self.shared.tunnels.is_some()
    }

    fn adopted(&self) -> Vec<AdoptedTunnel> {
        std::mem::take(&mut *self.adopted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn stats(&self) -> PlaneStats {
        let shared = &self.shared;
        let stat = |index| shared.kernel.stat(index);
        PlaneStats {
            packet: Some(PacketStats {
                promoted: shared.promoted.load(Ordering::Relaxed),
                adopted: shared.adopted.load(Ordering::Relaxed),
                not_promoted: shared
                    .not_promoted
                    .each_ref()
                    .map(|count| count.load(Ordering::Relaxed)),
                lingering: shared.lingering.load(Ordering::Relaxed),
                entries: shared.kernel.entries() as u64,
                matched: stat(packet_stat::MATCHED),
                translated: stat(packet_stat::TRANSLATED),
                held: stat(packet_stat::HELD),
                held_as_duplicate: stat(packet_stat::HELD_AS_DUPLICATE),
                wake_stamped: stat(packet_stat::WAKE_STAMPED),
                fin_deferred: stat(packet_stat::FIN_DEFERRED),
                silenced: stat(packet_stat::SILENCED),
                rewrite_failed: stat(packet_stat::REWRITE_FAILED),
                redirect_failed: stat(packet_stat::REDIRECT_FAILED),
                unparsed: stat(packet_stat::UNPARSED),
                events_lost: stat(packet_stat::EVENTS_LOST),
            }),
            ..PlaneStats::default()
        }
    }
}

/// The packet plane's counters: promotions (user space) and what the tc
/// programs did (`PACKET_STATS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Tunnels promoted to segment translation.
    pub promoted: u64,
    /// Promoted tunnels of a previous process taken over at start-up
    /// (`--packet-state-dir`).
    pub adopted: u64,
    /// Tunnels that stayed on the splice pump (refused or aborted
    /// promotion), by reason (`qualify::Reason::ALL` order).
    pub not_promoted: [u64; qualify::Reason::ALL.len()],
    /// Promoted tunnels that ended and still translate late segments.
    pub lingering: u64,
    /// `PACKET_FLOWS` entries now (two per registered tunnel).
    pub entries: u64,
    /// Segments whose 4-tuple matched an entry.
    pub matched: u64,
    /// Segments rewritten and forwarded.
    pub translated: u64,
    /// Segments dropped by a cut-over's hold (their senders retransmit them).
    pub held: u64,
    /// Held segments passed on as duplicates, so their ACK reaches the proxy.
    pub held_as_duplicate: u64,
    /// Wake-up window updates of a cut-over whose TSval the program raised
    /// to the newest one translated toward the same peer.
    pub wake_stamped: u64,
    /// FINs dropped while the cut had installed one entry of the tunnel and
    /// not yet the other (their senders send them again).
    pub fin_deferred: u64,
    /// Segments of the proxy's own silent sockets dropped at egress.
    pub silenced: u64,
    /// Segments a rewrite helper failed on (dropped).
    pub rewrite_failed: u64,
    /// Translated segments `bpf_redirect_neigh` could not send.
    pub redirect_failed: u64,
    /// Matched segments whose headers could not be parsed (passed).
    pub unparsed: u64,
    /// End-of-flow events lost to a full ring buffer.
    pub events_lost: u64,
}

impl PacketStats {
    /// Tunnels not promoted, with each reason's label.
    pub fn not_promoted_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        qualify::Reason::ALL
            .iter()
            .zip(self.not_promoted)
            .map(|(reason, count)| (reason.as_str(), count))
    }

    /// Every counter but the per-reason ones, with the name the SIGUSR1 line
    /// and the metrics use.
    pub fn fields(&self) -> [(&'static str, u64); 15] {
        [
            ("promoted", self.promoted),
            ("adopted", self.adopted),
            ("lingering", self.lingering),
            ("entries", self.entries),
            ("matched", self.matched),
            ("translated", self.translated),
            ("held", self.held),
            ("held_as_duplicate", self.held_as_duplicate),
            ("wake_stamped", self.wake_stamped),
            ("fin_deferred", self.fin_deferred),
            ("silenced", self.silenced),
            ("rewrite_failed", self.rewrite_failed),
            ("redirect_failed", self.redirect_failed),
            ("unparsed", self.unparsed),
            ("events_lost", self.events_lost),
        ]
    }
}

impl fmt::Display for PacketStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (name, value)) in self.fields().into_iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "packet_{name}={value}")?;
        }
        let not_promoted: u64 = self.not_promoted.iter().sum();
        write!(f, " packet_not_promoted={not_promoted}")?;
        for (reason, count) in self
            .not_promoted_by_reason()
            .filter(|(_, count)| *count > 0)
        {
            write!(f, " packet_not_promoted_{reason}={count}")?;
        }
        Ok(())
    }
}
