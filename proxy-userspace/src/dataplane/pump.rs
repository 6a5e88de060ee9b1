//! The bidirectional driver shared by the user-space data planes (splice, copy):
//! run both directions, propagate each EOF as a half-close, and on an error
//! reset both sides.

use std::{
    future::Future,
    io,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::{
    Direction, LimitClock, PlaneKind, Progress, Side, TunnelEnd, TunnelLimits, TunnelOutcome,
};

/// Byte counter a direction updates as it goes, so the count survives an error;
/// every chunk is also reported to the tunnel's [`Progress`].
#[derive(Debug)]
pub struct Moved {
    count: AtomicU64,
    progress: Progress,
    dataplane: PlaneKind,
    direction: Direction,
}

impl Moved {
    /// A counter of `direction` moved by `dataplane`, reporting to `progress`.
    pub fn new(progress: &Progress, dataplane: PlaneKind, direction: Direction) -> Self {
        Self {
            count: AtomicU64::new(0),
            progress: progress.clone(),
            dataplane,
            direction,
        }
    }

    /// Both directions of a tunnel.
    pub fn pair(progress: &Progress, dataplane: PlaneKind) -> (Self, Self) {
        (
            Self::new(progress, dataplane, Direction::ClientToUpstream),
            Self::new(progress, dataplane, Direction::UpstreamToClient),
        )
    }

    /// Counts `bytes` more.
    pub fn add(&self, bytes: usize) {
        self.count.fetch_add(bytes as u64, Ordering::Relaxed);
        self.progress
            .add(self.dataplane, self.direction, bytes as u64);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Longest sleep between two checks of the tunnel limits.
const LIMIT_CHECK_CAP: Duration = Duration::from_secs(1);

/// The two sockets of a tunnel being driven, and what it has moved.
pub struct Driven<'a> {
    /// The client socket.
    pub client: &'a TcpStream,
    /// The upstream socket.
    pub upstream: &'a TcpStream,
    /// Bytes moved client → upstream and upstream → client.
    pub moved: (&'a Moved, &'a Moved),
    /// The plane, for the outcome.
    pub name: PlaneKind,
    /// Idle and lifetime limits.
    pub limits: TunnelLimits,
    /// Shutdown signal (see [`super::Tunnel::shutdown`]).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Runs `client_to_upstream` and `upstream_to_client` until both end. Each must
/// shut down its destination's write side after its source's EOF. The first
/// error, or an exceeded limit, aborts the tunnel: both sockets are closed with
/// a reset.
pub async fn drive<A, B>(
    tunnel: Driven<'_>,
    client_to_upstream: A,
    upstream_to_client: B,
) -> TunnelOutcome
where
    A: Future<Output = Result<(), DirectionError>>,
    B: Future<Output = Result<(), DirectionError>>,
{
    let Driven {
        client,
        upstream,
        moved,
        name,
        limits,
        mut shutdown,
    } = tunnel;
    tokio::pin!(client_to_upstream, upstream_to_client);
    let (mut up_done, mut down_done) = (false, false);
    let mut end = TunnelEnd::Closed;
    let mut clock = LimitClock::start(limits);
    while !(up_done && down_done) {
        let result = tokio::select! {
            result = &mut client_to_upstream, if !up_done => { up_done = true; result }
            result = &mut upstream_to_client, if !down_done => { down_done = true; result }
            _ = shutdown.wait_for(|closing| *closing) => Err(DirectionError::Limit(TunnelEnd::Shutdown)),
            () = tokio::time::sleep(clock.next_check(LIMIT_CHECK_CAP)) => {
                match clock.check(moved.0.get() + moved.1.get()) {
                    Some(exceeded) => Err(exceeded),
                    None => continue,
                }
                .map_err(DirectionError::Limit)
            }
        };
        if let Err(err) = result {
            end = err.end();
            log::debug!("{name} tunnel aborted: {err}");
            reset(client);
            reset(upstream);
            break;
        }
    }
    TunnelOutcome {
        client_to_upstream: moved.0.get(),
        upstream_to_client: moved.1.get(),
        dataplane: name,
        end,
    }
}

/// Wraps an I/O error on `side`'s socket.
pub fn error_on(side: Side, err: io::Error) -> DirectionError {
    match side {
        Side::Client => DirectionError::Client(err),
        Side::Upstream => DirectionError::Upstream(err),
    }
}

/// An I/O error on one socket of a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum DirectionError {
    /// The client socket failed.
    #[error("client socket: {0}")]
    Client(io::Error),
    /// The upstream socket failed.
    #[error("upstream socket: {0}")]
    Upstream(io::Error),
    /// A tunnel limit was exceeded.
    #[error("limit exceeded: {}", .0.as_str())]
    Limit(TunnelEnd),
}

impl DirectionError {
    pub(super) fn end(&self) -> TunnelEnd {
        match self {
            Self::Client(_) => TunnelEnd::ClientError,
            Self::Upstream(_) => TunnelEnd::UpstreamError,
            Self::Limit(end) => *end,
        }
    }
}

/// Makes the next close of `stream` send a RST, so the other side learns that the
/// tunnel broke instead of seeing a clean EOF.
pub fn reset(stream: &impl AsFd) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Half-closes `stream` (FIN after everything queued).
pub fn shutdown_write(stream: &impl AsFd) -> io::Result<()> {
    match SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; the tunnel's other direction reports that.
        Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
