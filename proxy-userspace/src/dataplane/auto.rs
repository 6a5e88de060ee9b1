//! `--dataplane auto`: a data plane per tunnel, by where the tunnel's two ends
//! are. By default both kinds of path get the packet plane ([`DEFAULT_PLANE`]):
//! in the bench (`cargo xtask bench`, docs/benchmarks.md, 2026-12-03 run) it
//! moved 0.93–1.00× direct on loopback with BBR or cubic endpoints and
//! 0.99–1.02× across veth, against splice's 0.67–0.88× and sockmap's
//! 0.38–0.55×, at 0.07–0.17 of splice's extra CPU per GiB. Tunnels that never
//! reach `--promote-after`, or do not qualify, stay on splice, which is what
//! the packet plane starts every tunnel on; where its tc programs do not load,
//! splice runs every tunnel.
//!
//! Both choices are flags (`--auto-local`, `--auto-network`): a host whose
//! bench says otherwise sets its own.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{
    AdoptedTunnel, DataPlane, DataPlaneChoice, Picked, PlaneKind, PlaneStats, Tunnel, TunnelFuture,
};

/// The plane of both kinds of path when `--auto-local`/`--auto-network` are
/// not given.
pub const DEFAULT_PLANE: PlaneKind = PlaneKind::Packet;

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
}

impl AutoDataPlane {
    /// Tunnels on local paths go to `local`, the others to `network` (two
    /// different planes: with one, use it directly).
    pub fn new(local: Arc<dyn DataPlane>, network: Arc<dyn DataPlane>) -> Self {
        Self { local, network }
    }
}

impl DataPlane for AutoDataPlane {
    fn name(&self) -> DataPlaneChoice {
        DataPlaneChoice::Auto
    }

    fn pick(&self, tunnel: &Tunnel) -> Picked<'_> {
        match PathKind::of(tunnel) {
            PathKind::Local => self.local.pick(tunnel),
            PathKind::Network => self.network.pick(tunnel),
        }
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        self.pick(&tunnel).1.run(tunnel)
    }

    fn planes(&self) -> Vec<PlaneKind> {
        let (local, network) = (self.local.planes(), self.network.planes());
        PlaneKind::ALL
            .into_iter()
            .filter(|plane| local.contains(plane) || network.contains(plane))
            .collect()
    }

    fn stats(&self) -> PlaneStats {
        self.local.stats().or(self.network.stats())
    }

    fn hands_over(&self) -> bool {
        self.local.hands_over() || self.network.hands_over()
    }

    fn adopted(&self) -> Vec<AdoptedTunnel> {
        let mut adopted = self.local.adopted();
        adopted.extend(self.network.adopted());
        adopted
    }
}
