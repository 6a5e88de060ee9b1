//! The data plane: what moves a tunnel's bytes once the control plane has
//! answered `200`. One interface ([`DataPlane`]), three implementations:
//!
//! * [`sockmap::SockmapDataPlane`] — both sockets in an eBPF sockhash; the kernel
//!   redirects every skb to the peer socket, user space never sees the bytes;
//! * [`splice::SpliceDataPlane`] — splice(2) through a pipe per direction;
//! * [`copy::CopyDataPlane`] — read/write through a user-space buffer;
//!
//! and [`auto::AutoDataPlane`], which hands each tunnel to one of them by where
//! its ends are. The control plane only ever holds an `Arc<dyn DataPlane>`.

pub mod auto;
pub mod copy;
pub mod packet;
mod pump;
pub mod sockmap;
pub mod splice;

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    ops::{Index, IndexMut},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::ValueEnum;
use tokio::net::TcpStream;

use crate::config::Config;

/// The eBPF object built by build.rs from proxy-ebpf: the sockmap plane's
/// programs and the packet plane's, loaded by whichever plane runs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Which data plane `--dataplane` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataPlaneChoice {
    /// One per tunnel by its path (`--auto-local`, `--auto-network`); splice in
    /// place of sockmap when the eBPF programs do not load.
    Auto,
    /// eBPF sockmap; fails to start if the programs do not load.
    Sockmap,
    /// splice(2) through pipes.
    Splice,
    /// User-space copy.
    Copy,
    /// Segment translation by a tc program after a splice start
    /// (`--promote-after`, `--packet-interfaces`).
    Packet,
}

impl DataPlaneChoice {
    /// The name `--dataplane` takes and the start-up line shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Sockmap => PlaneKind::Sockmap.as_str(),
            Self::Splice => PlaneKind::Splice.as_str(),
            Self::Copy => PlaneKind::Copy.as_str(),
            Self::Packet => PlaneKind::Packet.as_str(),
        }
    }
}

impl From<PlaneKind> for DataPlaneChoice {
    fn from(kind: PlaneKind) -> Self {
        match kind {
            PlaneKind::Sockmap => Self::Sockmap,
            PlaneKind::Splice => Self::Splice,
            PlaneKind::Copy => Self::Copy,
            PlaneKind::Packet => Self::Packet,
        }
    }
}

impl fmt::Display for DataPlaneChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the data planes that move bytes: what logs, metrics and
/// `--auto-local`/`--auto-network` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum PlaneKind {
    /// eBPF sockmap (splice when the programs do not load).
    Sockmap,
    /// splice(2) through pipes.
    Splice,
    /// User-space copy.
    Copy,
    /// Segment translation by a tc program, after a splice start.
    Packet,
}

impl PlaneKind {
    /// Every plane, in the order metrics list them.
    pub const ALL: [Self; 4] = [Self::Sockmap, Self::Splice, Self::Copy, Self::Packet];

    /// The plane's name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sockmap => "sockmap",
            Self::Splice => "splice",
            Self::Copy => "copy",
            Self::Packet => "packet",
        }
    }
}

impl fmt::Display for PlaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for PlaneKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One socket of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The socket accepted from the client.
    Client,
    /// The socket connected to the upstream.
    Upstream,
}

impl Side {
    /// The other socket.
    pub fn peer(self) -> Self {
        match self {
            Self::Client => Self::Upstream,
            Self::Upstream => Self::Client,
        }
    }

    /// The direction whose bytes arrive on this socket.
    pub fn outbound(self) -> Direction {
        match self {
            Self::Client => Direction::ClientToUpstream,
            Self::Upstream => Direction::UpstreamToClient,
        }
    }

    /// `client` or `upstream`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
        }
    }
}

/// One direction of a tunnel, named by where its bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → upstream: bytes arrive on the client socket.
    ClientToUpstream,
    /// Upstream → client: bytes arrive on the upstream socket.
    UpstreamToClient,
}

impl Direction {
    /// Both directions, client → upstream first.
    pub const BOTH: [Self; 2] = [Self::ClientToUpstream, Self::UpstreamToClient];

    /// The socket the direction's bytes arrive on.
    pub fn source(self) -> Side {
        match self {
            Self::ClientToUpstream => Side::Client,
            Self::UpstreamToClient => Side::Upstream,
        }
    }

    /// The socket the direction's bytes leave through.
    pub fn destination(self) -> Side {
        self.source().peer()
    }

    /// The label of metrics and logs: `client_to_upstream`, `upstream_to_client`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToUpstream => "client_to_upstream",
            Self::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// A value per direction, indexed by [`Direction`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerDirection<T>(pub [T; 2]);

impl<T> PerDirection<T> {
    /// `f` of each direction.
    pub fn from_fn(mut f: impl FnMut(Direction) -> T) -> Self {
        Self(Direction::BOTH.map(&mut f))
    }

    /// `f` of each direction's value.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerDirection<U> {
        PerDirection(self.0.map(f))
    }

    /// Each direction with its value.
    pub fn iter(&self) -> impl Iterator<Item = (Direction, &T)> {
        Direction::BOTH.into_iter().zip(self.0.iter())
    }
}

impl<T> Index<Direction> for PerDirection<T> {
    type Output = T;
    fn index(&self, direction: Direction) -> &T {
        &self.0[direction as usize]
    }
}

impl<T> IndexMut<Direction> for PerDirection<T> {
    fn index_mut(&mut self, direction: Direction) -> &mut T {
        &mut self.0[direction as usize]
    }
}

/// A value per socket, indexed by [`Side`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerSide<T>(pub [T; 2]);

impl<T> PerSide<T> {
    /// The client's and the upstream's.
    pub fn new(client: T, upstream: T) -> Self {
        Self([client, upstream])
    }

    /// `f` of each side's value.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerSide<U> {
        PerSide(self.0.map(f))
    }

    /// Each side with its value.
    pub fn iter(&self) -> impl Iterator<Item = (Side, &T)> {
        [Side::Client, Side::Upstream]
            .into_iter()
            .zip(self.0.iter())
    }
}

impl<T> Index<Side> for PerSide<T> {
    type Output = T;
    fn index(&self, side: Side) -> &T {
        &self.0[side as usize]
    }
}

/// An established tunnel handed from the control plane to a data plane.
#[derive(Debug)]
pub struct Tunnel {
    /// The client socket; the `200` has been written to it.
    pub client: TcpStream,
    /// The upstream socket; the client's pipelined bytes have been written to it.
    pub upstream: TcpStream,
    /// Bytes user space has read from the client socket (request head and
    /// pipelined bytes): the kernel-side accounting starts after them.
    pub client_bytes_consumed: u64,
    /// Bytes user space has read from the upstream socket (the `101` of an
    /// upgraded HTTP exchange; a parent proxy's answer to its CONNECT and what
    /// followed it): the kernel-side accounting starts after them. 0 for a
    /// direct CONNECT.
    pub upstream_bytes_consumed: u64,
    /// Whether the client socket's receive queue holds no segment that user space
    /// has read only part of (the sockmap plane cannot take over such a socket).
    pub client_queue_clean: bool,
    /// When the data plane must close the tunnel on its own.
    pub limits: TunnelLimits,
    /// Becomes `true` when the proxy shuts down: the tunnel must end at once
    /// (reset) and report what it moved, with [`TunnelEnd::Shutdown`].
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Where the data plane reports bytes as it moves them, so that an open
    /// tunnel's traffic shows in the metrics before it ends.
    pub progress: Progress,
    /// Becomes `true` when the proxy starts draining (SIGTERM): a plane that
    /// can hand a tunnel to the next process (the packet plane with
    /// `--packet-state-dir`) does so then, and reports [`TunnelEnd::HandedOver`].
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// What the next process needs to log the tunnel if it is handed over:
    /// an opaque record from the control plane (see [`AdoptedTunnel`]);
    /// empty unless the plane [`DataPlane::hands_over`].
    pub handover: Arc<[u8]>,
}

/// A tunnel that a previous spliced process promoted and handed over (the
/// packet plane with `--packet-state-dir`); this process follows it to its end.
pub struct AdoptedTunnel {
    /// What the previous process's control plane gave the tunnel as
    /// [`Tunnel::handover`]; empty if the previous process stopped before it
    /// was stored.
    pub handover: Vec<u8>,
    /// The client's address and the proxy address it connected to.
    pub client: (SocketAddr, SocketAddr),
    /// The upstream's address.
    pub upstream: SocketAddr,
    /// Bytes the previous process's socket plane moved before promotion
    /// (client → upstream, upstream → client).
    pub before_promotion: [u64; 2],
    /// Follows the tunnel to its end.
    pub run: Box<dyn FnOnce(AdoptedContext) -> TunnelFuture + Send>,
}

impl fmt::Debug for AdoptedTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdoptedTunnel")
            .field("client", &self.client)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// What an adopted tunnel gets from the control plane, as a [`Tunnel`] does.
pub struct AdoptedContext {
    /// See [`Tunnel::limits`].
    pub limits: TunnelLimits,
    /// See [`Tunnel::shutdown`].
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// See [`Tunnel::draining`].
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// See [`Tunnel::progress`].
    pub progress: Progress,
}

/// Receives the bytes tunnels move while they are open (the metrics).
pub trait ByteSink: Send + Sync {
    /// `dataplane` moved `bytes` more in `direction`.
    fn moved(&self, dataplane: PlaneKind, direction: Direction, bytes: u64);
}

/// One tunnel's progress report: the bytes its data plane has reported so far in
/// each direction, passed on to a [`ByteSink`] as deltas. Data planes that see
/// every chunk call [`Progress::add`]; sockmap, which only reads the kernel's
/// cumulative counters now and then, calls [`Progress::advance_to`]. At the end
/// the control plane calls [`Progress::finish`] with the outcome, which adds only
/// what was not reported yet. Cloning shares the counts.
#[derive(Clone, Default)]
pub struct Progress(Arc<ProgressInner>);

#[derive(Default)]
struct ProgressInner {
    reported: [AtomicU64; 2],
    sink: Option<Arc<dyn ByteSink>>,
    /// The packet plane: what the pump moved before promotion, once promoted.
    before_promotion: std::sync::OnceLock<[u64; 2]>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("reported", &self.reported())
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// A report that goes to `sink`.
    pub fn new(sink: Arc<dyn ByteSink>) -> Self {
        Self(Arc::new(ProgressInner {
            reported: Default::default(),
            sink: Some(sink),
            before_promotion: std::sync::OnceLock::new(),
        }))
    }

    /// `dataplane` moved `bytes` more in `direction`.
    pub fn add(&self, dataplane: PlaneKind, direction: Direction, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.0.reported[direction as usize].fetch_add(bytes, Ordering::Relaxed);
        if let Some(sink) = &self.0.sink {
            sink.moved(dataplane, direction, bytes);
        }
    }

    /// `dataplane` has moved `totals` (client → upstream, upstream → client) in
    /// all: reports the part of each not reported yet (never goes back).
    pub fn advance_to(&self, dataplane: PlaneKind, totals: PerDirection<u64>) {
        for (direction, &total) in totals.iter() {
            let before = self.0.reported[direction as usize].fetch_max(total, Ordering::Relaxed);
            if total > before {
                if let Some(sink) = &self.0.sink {
                    sink.moved(dataplane, direction, total - before);
                }
            }
        }
    }

    /// Reports what `outcome` says was moved beyond what was reported already.
    pub fn finish(&self, outcome: &TunnelOutcome) {
        self.advance_to(
            outcome.dataplane,
            PerDirection([outcome.client_to_upstream, outcome.upstream_to_client]),
        );
    }

    /// The packet plane promoted the tunnel after moving `bytes` (client →
    /// upstream, upstream → client) on its socket pump.
    pub fn note_promotion(&self, bytes: [u64; 2]) {
        let _ = self.0.before_promotion.set(bytes);
    }

    /// What [`Progress::note_promotion`] noted, if the tunnel was promoted.
    pub fn bytes_before_promotion(&self) -> Option<[u64; 2]> {
        self.0.before_promotion.get().copied()
    }

    /// Bytes reported so far (client → upstream, upstream → client).
    pub fn reported(&self) -> [u64; 2] {
        self.0
            .reported
            .each_ref()
            .map(|count| count.load(Ordering::Relaxed))
    }
}

/// Limits a data plane enforces on a tunnel.
#[derive(Clone, Copy, Debug)]
pub struct TunnelLimits {
    /// Close the tunnel when no byte moved in either direction for this long
    /// (Squid's `read_timeout`).
    pub idle: Duration,
    /// Close the tunnel this long after the data plane got it (what is left of
    /// Squid's `client_lifetime`).
    pub lifetime: Duration,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            idle: Duration::MAX,
            lifetime: Duration::MAX,
        }
    }
}

/// Tracks a tunnel's progress against its [`TunnelLimits`].
#[derive(Debug)]
pub struct LimitClock {
    limits: TunnelLimits,
    started: tokio::time::Instant,
    last_progress: tokio::time::Instant,
    last_total: u64,
}

impl LimitClock {
    /// Starts the clock now.
    pub fn start(limits: TunnelLimits) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            limits,
            started: now,
            last_progress: now,
            last_total: 0,
        }
    }

    /// Given the bytes moved so far (both directions), says whether a limit is
    /// exceeded.
    pub fn check(&mut self, total_moved: u64) -> Option<TunnelEnd> {
        let now = tokio::time::Instant::now();
        if total_moved != self.last_total {
            self.last_total = total_moved;
            self.last_progress = now;
        }
        if now.duration_since(self.started) >= self.limits.lifetime {
            Some(TunnelEnd::LifetimeExceeded)
        } else if now.duration_since(self.last_progress) >= self.limits.idle {
            Some(TunnelEnd::IdleTimeout)
        } else {
            None
        }
    }

    /// How long until a limit could next be exceeded (at most `cap`).
    pub fn next_check(&self, cap: Duration) -> Duration {
        let now = tokio::time::Instant::now();
        let to_lifetime = self
            .limits
            .lifetime
            .saturating_sub(now.duration_since(self.started));
        let to_idle = self
            .limits
            .idle
            .saturating_sub(now.duration_since(self.last_progress));
        to_lifetime
            .min(to_idle)
            .min(cap)
            .max(Duration::from_millis(10))
    }
}

/// How a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their write side and every byte was delivered.
    Closed,
    /// The client reset the connection or an I/O error hit its socket.
    ClientError,
    /// The upstream reset the connection or an I/O error hit its socket.
    UpstreamError,
    /// No byte moved for `read_timeout`.
    IdleTimeout,
    /// The tunnel reached `client_lifetime`.
    LifetimeExceeded,
    /// The proxy shut down before the tunnel ended.
    Shutdown,
    /// The proxy shut down and left the tunnel, still open, to the next
    /// process (which logs it when it ends).
    HandedOver,
}

impl TunnelEnd {
    /// Name used in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::ClientError => "client_error",
            Self::UpstreamError => "upstream_error",
            Self::IdleTimeout => "idle_timeout",
            Self::LifetimeExceeded => "lifetime_exceeded",
            Self::Shutdown => "shutdown",
            Self::HandedOver => "handed_over",
        }
    }
}

/// What a data plane reports when a tunnel is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelOutcome {
    /// Bytes moved from the client to the upstream by the data plane.
    pub client_to_upstream: u64,
    /// Bytes moved from the upstream to the client by the data plane.
    pub upstream_to_client: u64,
    /// The plane that actually moved them (a sockmap tunnel that could not be
    /// spliced reports its fallback).
    pub dataplane: PlaneKind,
    /// How it ended.
    pub end: TunnelEnd,
}

/// A boxed tunnel future.
pub type TunnelFuture = Pin<Box<dyn Future<Output = TunnelOutcome> + Send + 'static>>;

/// What [`DataPlane::pick`] says about a tunnel: the plane that will run it.
pub type Picked<'a> = (PlaneKind, &'a dyn DataPlane);

/// Moves the bytes of established tunnels until both sides are done.
pub trait DataPlane: Send + Sync {
    /// What runs: one plane, or `auto`.
    fn name(&self) -> DataPlaneChoice;

    /// The plane that will run `tunnel`: itself, except for `auto`, which
    /// names the one its path gets (so metrics and logs carry a real plane).
    fn pick(&self, tunnel: &Tunnel) -> Picked<'_>;

    /// The planes this one may run a tunnel on.
    fn planes(&self) -> Vec<PlaneKind>;

    /// Runs `tunnel` to its end. The sockets are closed when the future completes.
    fn run(&self, tunnel: Tunnel) -> TunnelFuture;

    /// Counters kept beside the bytes (SIGUSR1, `/metrics`); only sockmap has any.
    fn stats(&self) -> PlaneStats {
        PlaneStats::default()
    }

    /// Tunnels a previous process handed over, taken once after start-up.
    fn adopted(&self) -> Vec<AdoptedTunnel> {
        Vec::new()
    }

    /// Whether tunnels may be handed to the next process, so that
    /// [`Tunnel::handover`] must carry the control plane's record (else it
    /// may be empty).
    fn hands_over(&self) -> bool {
        false
    }
}

/// Counters the data planes keep beside the bytes they move.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlaneStats {
    /// The sockmap plane's kernel and flow-control counters, when it runs.
    pub sockmap: Option<sockmap::SockmapStats>,
    /// The packet plane's promotion and translation counters, when it runs.
    pub packet: Option<packet::PacketStats>,
}

impl PlaneStats {
    /// The counters of `self` and `other` (at most one of them has each kind).
    pub fn or(self, other: Self) -> Self {
        Self {
            sockmap: self.sockmap.or(other.sockmap),
            packet: self.packet.or(other.packet),
        }
    }
}

impl fmt::Display for PlaneStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sockmap = self.sockmap.as_ref().map(ToString::to_string);
        let packet = self.packet.as_ref().map(ToString::to_string);
        let parts: Vec<String> = [sockmap, packet].into_iter().flatten().collect();
        f.write_str(&parts.join(" "))
    }
}

/// Builds the data plane `config` asks for and says why it was chosen.
pub fn select(config: &Config) -> anyhow::Result<(Arc<dyn DataPlane>, String)> {
    // A data plane is chosen once per process; a reload does not change it.
    let splice: Arc<dyn DataPlane> = Arc::new(splice::SpliceDataPlane);
    if config.dataplane != DataPlaneChoice::Auto {
        if let Some(flag) = [
            config.auto_local.map(|_| "--auto-local"),
            config.auto_network.map(|_| "--auto-network"),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            anyhow::bail!("{flag} applies only to --dataplane auto");
        }
    }
    let packet_wanted = config.dataplane == DataPlaneChoice::Packet
        || (config.dataplane == DataPlaneChoice::Auto
            && [config.auto_local, config.auto_network]
                .map(|plane| plane.unwrap_or(auto::DEFAULT_PLANE))
                .contains(&PlaneKind::Packet));
    if !packet_wanted {
        if let Some(flag) = [
            config.promote_after.map(|_| "--promote-after"),
            (!config.packet_interfaces.is_empty()).then_some("--packet-interfaces"),
            config
                .packet_state_dir
                .as_ref()
                .map(|_| "--packet-state-dir"),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            anyhow::bail!("{flag} applies only where the packet plane runs (--dataplane packet, or auto where a path gets packet)");
        }
    }
    match config.dataplane {
        DataPlaneChoice::Copy => Ok((
            Arc::new(copy::CopyDataPlane),
            "requested with --dataplane copy".into(),
        )),
        DataPlaneChoice::Splice => Ok((splice, "requested with --dataplane splice".into())),
        DataPlaneChoice::Sockmap => {
            let plane = sockmap::SockmapDataPlane::load(config, splice)
                .map_err(|err| anyhow::anyhow!("--dataplane sockmap: {err}"))?;
            Ok((Arc::new(plane), "requested with --dataplane sockmap".into()))
        }
        DataPlaneChoice::Packet => {
            let plane = packet::PacketDataPlane::load(config)?;
            Ok((Arc::new(plane), "requested with --dataplane packet".into()))
        }
        DataPlaneChoice::Auto => Ok(select_auto(config, splice)),
    }
}

/// `--dataplane auto`: the planes its two path kinds ask for (packet on both by
/// default), each loaded only if a path wants it; a single plane when both
/// kinds end up on the same one.
fn select_auto(config: &Config, splice: Arc<dyn DataPlane>) -> (Arc<dyn DataPlane>, String) {
    let mut why = Vec::new();
    let local = config.auto_local.unwrap_or(auto::DEFAULT_PLANE);
    let network = config.auto_network.unwrap_or(auto::DEFAULT_PLANE);
    let wanted = |kind| [local, network].contains(&kind);
    let sockmap: Option<Arc<dyn DataPlane>> = if wanted(PlaneKind::Sockmap) {
        match sockmap::SockmapDataPlane::load(config, splice.clone()) {
            Ok(plane) => {
                why.push("eBPF programs loaded and attached".to_string());
                Some(Arc::new(plane))
            }
            Err(err) => {
                why.push(format!("{err}; falling back"));
                None
            }
        }
    } else {
        None
    };
    let packet: Option<Arc<dyn DataPlane>> = if wanted(PlaneKind::Packet) {
        match packet::PacketDataPlane::load(config) {
            Ok(plane) => {
                why.push("tc programs attached for the packet plane".to_string());
                Some(Arc::new(plane))
            }
            Err(err) => {
                why.push(format!(
                    "packet plane unavailable ({err:#}); splice instead"
                ));
                None
            }
        }
    } else {
        None
    };
    let copy: Arc<dyn DataPlane> = Arc::new(copy::CopyDataPlane);
    let build = |kind| match kind {
        PlaneKind::Sockmap => sockmap.clone().unwrap_or_else(|| splice.clone()),
        PlaneKind::Splice => splice.clone(),
        PlaneKind::Copy => copy.clone(),
        PlaneKind::Packet => packet.clone().unwrap_or_else(|| splice.clone()),
    };
    let (local, network) = (build(local), build(network));
    if local.name() == network.name() {
        why.push(format!(
            "--dataplane auto with {} on every path",
            local.name()
        ));
        return (local, why.join("; "));
    }
    why.push(format!(
        "per tunnel: both ends on this host → {}, an end across the network → {}",
        local.name(),
        network.name()
    ));
    (
        Arc::new(auto::AutoDataPlane::new(local, network)),
        why.join("; "),
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn selected(args: &[&str]) -> anyhow::Result<(&'static str, String)> {
        let config = Config::parse_from(std::iter::once("spliced").chain(args.iter().copied()));
        select(&config).map(|(plane, why)| (plane.name().as_str(), why))
    }

    #[test]
    fn auto_without_an_ebpf_plane_on_any_path_loads_no_ebpf() {
        assert_eq!(
            selected(&["--auto-local", "copy", "--auto-network", "copy"]).unwrap(),
            (
                "copy",
                "--dataplane auto with copy on every path".to_owned()
            )
        );
        let (name, why) = selected(&["--auto-local", "copy", "--auto-network", "splice"]).unwrap();
        assert_eq!(name, "auto");
        assert_eq!(
            why,
            "per tunnel: both ends on this host → copy, an end across the network → splice"
        );
    }

    #[test]
    fn auto_flags_with_another_plane_are_refused() {
        let err = selected(&["--dataplane", "copy", "--auto-network", "sockmap"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--auto-network applies only to --dataplane auto"
        );
    }
}
