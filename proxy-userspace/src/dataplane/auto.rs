//! `--dataplane auto`: a data plane per tunnel, by where the tunnel's two ends
//! are. The bench (`cargo xtask bench`, docs/benchmarks.md) measured each plane
//! on both kinds of path on this machine:
//!
//! * both ends on this host (loopback): sockmap costs the least CPU per byte
//!   and moves up to 1.5× what a direct connection does (its forward rate is
//!   bimodal, by where the kernel runs its redirect worker), splice and copy
//!   about 0.9×, so sockmap;
//! * an end behind a network device (veth between namespaces): splice moves the
//!   most (0.7× direct), sockmap and copy about 0.5×, because the kernel worker
//!   that sends a redirected skb also runs the receiving host's TCP input inline
//!   and has no backpressure, so splice.
//!
//! Both choices are flags (`--auto-local`, `--auto-network`): a host whose
//! bench says otherwise, or that values CPU per byte over peak throughput
//! (sockmap costs ~25 % less there across veth), sets its own.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{DataPlane, Tunnel, TunnelFuture};

/// Where a tunnel's ends are, as far as choosing its data plane goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// The client and the upstream are both on this host.
    Local,
    /// At least one end is reached through a network device.
    Network,
}

impl PathKind {
    /// The kind of `tunnel`'s path.
    pub fn of(tunnel: &Tunnel) -> Self {
        if on_this_host(&tunnel.client) && on_this_host(&tunnel.upstream) {
            Self::Local
        } else {
            Self::Network
        }
    }
}

/// Whether `socket`'s peer is on this host: a loopback address, or the socket's
/// own address (the kernel routes a connection to one of the host's addresses
/// over `lo` and picks that address as the source).
fn on_this_host(socket: &TcpStream) -> bool {
    let (Ok(local), Ok(peer)) = (socket.local_addr(), socket.peer_addr()) else {
        return false;
    };
    let (local, peer) = (canonical(local), canonical(peer));
    peer.is_loopback() || peer == local
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(addr: SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// Runs each tunnel on the data plane configured for its [`PathKind`].
pub struct AutoDataPlane {
    local: Arc<dyn DataPlane>,
    network: Arc<dyn DataPlane>,
    /// The plane whose kernel counters `stats` reports (sockmap when loaded).
    stats_from: Arc<dyn DataPlane>,
}

impl AutoDataPlane {
    /// Tunnels on local paths go to `local`, the others to `network`;
    /// `stats_from` answers [`DataPlane::stats`].
    pub fn new(
        local: Arc<dyn DataPlane>,
        network: Arc<dyn DataPlane>,
        stats_from: Arc<dyn DataPlane>,
    ) -> Self {
        Self {
            local,
            network,
            stats_from,
        }
    }
}

impl DataPlane for AutoDataPlane {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn pick(&self, tunnel: &Tunnel) -> &dyn DataPlane {
        match PathKind::of(tunnel) {
            PathKind::Local => self.local.pick(tunnel),
            PathKind::Network => self.network.pick(tunnel),
        }
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        self.pick(&tunnel).run(tunnel)
    }

    fn planes(&self) -> Vec<&'static str> {
        let mut planes = self.local.planes();
        planes.extend(self.network.planes());
        planes.sort_unstable();
        planes.dedup();
        planes
    }

    fn stats(&self) -> String {
        self.stats_from.stats()
    }
}
