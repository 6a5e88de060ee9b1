//! The packet data plane (`--dataplane packet`): segment translation.
//!
//! A tunnel starts on the splice pump. Once it has moved `--promote-after`
//! bytes it is promoted: a tc program (proxy-ebpf `packet.rs`) rewrites every
//! later segment of the client's connection into a segment of the proxy's
//! upstream connection and back — addresses, ports, sequence and
//! acknowledgement numbers, timestamps, SACK blocks, window, checksums — so
//! the client and the upstream run one end-to-end TCP, and the proxy's two
//! sockets sit silent in repair mode, holding their 4-tuples, until the flow
//! has ended. See `cutover.rs` for the order of the cut and `translate.rs` for
//! the arithmetic.
//!
//! * [`kernel`] — loading and attaching the programs, the maps, events;
//! * [`sockets`] — repair mode and the socket state the cut reads;
//! * [`qualify`] — whether a tunnel can be promoted, and why not;
//! * [`translate`] — the translation arithmetic (pure, unit-tested);
//! * [`relay`] — the splice pump before promotion;
//! * [`cutover`] — hold, drain, repair, translate (or abort);
//! * [`tunnel`] — one tunnel from hand-over to the end of its linger.

mod cutover;
mod kernel;
mod qualify;
mod relay;
mod sockets;
mod translate;
mod tunnel;

use std::sync::{atomic::Ordering, Arc};

use proxy_common::packet_stat;

use super::{DataPlane, Tunnel, TunnelFuture};
use crate::config::Config;

/// The packet data plane. See the module documentation.
pub struct PacketDataPlane {
    shared: Arc<tunnel::Shared>,
}

impl PacketDataPlane {
    /// Loads and attaches the tc programs. Must run inside a tokio runtime.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let kernel = kernel::Kernel::load(&config.packet_interfaces)?;
        log::info!(
            "packet plane: tc programs attached to {}",
            kernel
                .attached
                .iter()
                .map(|(name, index)| format!("{name} ({index})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Self {
            shared: Arc::new(tunnel::Shared {
                kernel,
                promote_after: config.promote_after,
                next_flow: 1.into(),
                promoted: 0.into(),
                not_promoted: 0.into(),
                lingering: 0.into(),
            }),
        })
    }
}

impl DataPlane for PacketDataPlane {
    fn name(&self) -> &'static str {
        "packet"
    }

    fn pick(&self, _tunnel: &Tunnel) -> &dyn DataPlane {
        self
    }

    fn planes(&self) -> Vec<&'static str> {
        vec!["packet", "splice"]
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(tunnel::run_tunnel(self.shared.clone(), tunnel))
    }

    fn stats(&self) -> String {
        let shared = &self.shared;
        let stat = |index| shared.kernel.stat(index);
        format!(
            "promoted={} not_promoted={} lingering={} packet_entries={} matched={} translated={} held={} held_as_duplicate={} silenced={} rewrite_failed={} redirect_failed={} unparsed={} packet_events_lost={}",
            shared.promoted.load(Ordering::Relaxed),
            shared.not_promoted.load(Ordering::Relaxed),
            shared.lingering.load(Ordering::Relaxed),
            shared.kernel.entries(),
            stat(packet_stat::MATCHED),
            stat(packet_stat::TRANSLATED),
            stat(packet_stat::HELD),
            stat(packet_stat::HELD_AS_DUPLICATE),
            stat(packet_stat::SILENCED),
            stat(packet_stat::REWRITE_FAILED),
            stat(packet_stat::REDIRECT_FAILED),
            stat(packet_stat::UNPARSED),
            stat(packet_stat::EVENTS_LOST),
        )
    }
}
