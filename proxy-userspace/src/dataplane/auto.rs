//! `--dataplane auto`: a data plane per tunnel, by where the tunnel's two ends
//! are. The bench (`cargo xtask bench`, docs/benchmarks.md) measured each plane
//! on both kinds of path on this machine:
//!
//! * both ends on this host (loopback): the winner depends on the endpoints'
//!   congestion control. With BBR (this machine's default) sockmap moved
//!   28–37 Gbit/s against splice's 19–20 and cost the least CPU per byte; with
//!   cubic endpoints splice moved ~46 against sockmap's 28–35. So sockmap when
//!   the host's default is BBR, splice otherwise ([`local_default`]);
//! * an end behind a network device (veth between namespaces): splice moves the
//!   most (0.7× direct), sockmap and copy about 0.5×, because the kernel worker
//!   that sends a redirected skb also runs the receiving host's TCP input inline
//!   and has no backpressure, so splice.
//!
//! Both choices are flags (`--auto-local`, `--auto-network`): a host whose
//! bench says otherwise, or that values CPU per byte over peak throughput
//! (across veth sockmap cost less in two of three full bench runs), sets its
//! own.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{DataPlane, DataPlaneChoice, Picked, PlaneKind, PlaneStats, Tunnel, TunnelFuture};

/// The plane for local paths when `--auto-local` is not given, with a note for
/// the start-up line. Local applications use the host's default congestion
/// control unless they set their own, and the bench's winner on loopback
/// depends on it: with BBR endpoints (whose model sees a microsecond RTT and
/// keeps a tiny window) sockmap moved 28–37 Gbit/s against splice's 19–20;
/// with cubic endpoints splice moved ~46 against sockmap's 28–35.
pub fn local_default(host_congestion_control: &str) -> (PlaneKind, String) {
    let plane = if host_congestion_control == "bbr" {
        PlaneKind::Sockmap
    } else {
        PlaneKind::Splice
    };
    let name = if host_congestion_control.is_empty() {
        "unknown"
    } else {
        host_congestion_control
    };
    (plane, format!(" (default congestion control {name})"))
}

/// `net.ipv4.tcp_congestion_control` of the proxy's network namespace, or ""
/// when it cannot be read.
pub fn host_congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_follow_the_hosts_congestion_control() {
        assert_eq!(local_default("bbr").0, PlaneKind::Sockmap);
        assert_eq!(local_default("cubic").0, PlaneKind::Splice);
        assert_eq!(local_default("").1, " (default congestion control unknown)");
    }
}
