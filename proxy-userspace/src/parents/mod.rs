//! Parent proxies at run time: the routes a request may take (Squid's peer
//! selection, `squid/peers.rs`), each parent's liveness (`connect-fail-limit`
//! and the probes that revive a dead one), and connecting along the routes in
//! order. A CONNECT through a parent is opened with the parent's own CONNECT
//! ([`handshake`]); the socket that comes back is the tunnel's upstream, and
//! the data planes never know it leads to a parent.
//!
//! Failover is Squid's (`tunnel.cc`, `FwdState`): a route that cannot be
//! connected to (refused, timed out, name not resolved) makes way for the next
//! one; a parent that connected but answered the CONNECT with a non-`2xx`
//! status has its answer's status relayed to the client, with no further
//! route tried (Squid relays the parent's error; it only counts a failure
//! towards `connect-fail-limit` for a connection that failed). With no route
//! at all (`never_direct` and no parent up and allowed) the client gets 503
//! (Squid's `ERR_CANNOT_FORWARD`).

pub mod handshake;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::{
    access_log::AccessRecord,
    connect_request::{Host, Target},
    control::{ControlPlane, Judge, Refusal},
    settings::{Policy, Settings},
    squid::{CachePeer, HierCode, Route, SquidConfig},
    upstream,
};

/// Liveness of every parent, kept across reloads (by name, host and port).
#[derive(Debug, Default)]
pub struct Health {
    peers: Mutex<HashMap<String, PeerState>>,
}

/// One parent's liveness: Squid's `tcp_up` counter.
#[derive(Debug)]
struct PeerState {
    /// Failed connections still allowed before the parent counts as dead.
    fails_left: u32,
    /// When the last probe of a dead parent started.
    last_probe: Option<Instant>,
}

fn key(peer: &CachePeer) -> String {
    format!("{}@{}:{}", peer.name, peer.host, peer.port)
}

impl Health {
    fn with<T>(&self, peer: &CachePeer, f: impl FnOnce(&mut PeerState) -> T) -> T {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(key(peer)).or_insert(PeerState {
            fails_left: peer.connect_fail_limit,
            last_probe: None,
        });
        f(state)
    }

    /// Whether `peer` is alive (fewer than `connect-fail-limit` failures in a row).
    pub fn is_up(&self, peer: &CachePeer) -> bool {
        self.with(peer, |state| state.fails_left > 0)
    }

    /// A connection to `peer` failed.
    fn failed(&self, peer: &CachePeer) {
        let died = self.with(peer, |state| {
            state.fails_left = state.fails_left.saturating_sub(1);
            state.fails_left == 0
        });
        if died {
            log::warn!(
                "parent {} ({}:{}) is dead after {} failed connections in a row",
                peer.name,
                peer.host,
                peer.port,
                peer.connect_fail_limit
            );
        }
    }

    /// A connection to `peer` succeeded.
    fn succeeded(&self, peer: &CachePeer) {
        let revived = self.with(peer, |state| {
            let was_dead = state.fails_left == 0;
            state.fails_left = peer.connect_fail_limit;
            was_dead
        });
        if revived {
            log::warn!(
                "parent {} ({}:{}) is alive again",
                peer.name,
                peer.host,
                peer.port
            );
        }
    }

    /// Whether a dead `peer` should be probed now (at most once per `every`).
    fn probe_due(&self, peer: &CachePeer, every: Duration) -> bool {
        self.with(peer, |state| {
            let due = state.fails_left == 0
                && state.last_probe.is_none_or(|last| last.elapsed() >= every);
            if due {
                state.last_probe = Some(Instant::now());
            }
            due
        })
    }
}

/// The squid.conf in force when it has `cache_peer` lines.
fn with_peers(settings: &Settings) -> Option<&SquidConfig> {
    match &settings.policy {
        Policy::Squid(squid) if squid.peers().select_routes() => Some(squid),
        _ => None,
    }
}

/// The routes for a request to `target`, in order; probes the dead parents
/// that are due. Resolves the target first when a peer-selection rule has a
/// `dst` ACL (a cache hit for the DIRECT connection after).
pub(crate) async fn routes(
    control: &ControlPlane,
    settings: &Settings,
    judge: &Judge<'_>,
    target: &Target,
    hierarchical: bool,
) -> Vec<Route> {
    let Some(squid) = with_peers(settings) else {
        return vec![Route {
            peer: None,
            code: HierCode::Direct,
        }];
    };
    let health = control.parents();
    let peers = &squid.peers().peers;
    let up: Vec<bool> = peers.iter().map(|peer| health.is_up(peer)).collect();
    for (peer, _) in peers.iter().zip(&up).filter(|(_, up)| !**up) {
        let timeout = peer.connect_timeout.unwrap_or(settings.connect_timeout);
        if health.probe_due(peer, timeout.max(Duration::from_secs(1))) {
            let (peer, health) = (peer.clone(), health.clone());
            let (resolver, metrics) = (settings.resolver.clone(), control.metrics().clone());
            let delay = settings.happy_eyeballs_delay;
            tokio::spawn(async move {
                let resolved =
                    upstream::resolve(&resolver, &peer_target(&peer), &metrics.dns).await;
                if let Ok(addrs) = resolved {
                    if upstream::connect(&addrs, timeout, delay).await.is_ok() {
                        health.succeeded(&peer);
                    }
                }
            });
        }
    }
    let destinations = if squid.routes_need_destinations() {
        upstream::resolve(&settings.resolver, target, &control.metrics().dns)
            .await
            .map(|addrs| addrs.iter().map(SocketAddr::ip).collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    squid.routes(
        &judge.facts(None, 0),
        hierarchical,
        |index| up[index],
        &destinations,
    )
}

/// Where a parent listens, as a target to resolve and connect to.
fn peer_target(peer: &CachePeer) -> Target {
    let host = match peer.host.parse() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(peer.host.to_ascii_lowercase()),
    };
    Target {
        host,
        port: peer.port,
    }
}

/// The parent of `route`, if it leads to one.
pub(crate) fn peer_of<'a>(settings: &'a Settings, route: &Route) -> Option<&'a CachePeer> {
    let index = route.peer?;
    with_peers(settings).and_then(|squid| squid.peers().peers.get(index))
}

/// Before a parent route: `dst` ACLs judge the target's own addresses, as in
/// Squid (which resolves the target to evaluate them): the request may go on
/// if one of them is allowed, and is denied if the name does not resolve and
/// the rules deny it without a destination.
pub(crate) async fn check_destination(
    control: &ControlPlane,
    settings: &Settings,
    judge: &Judge<'_>,
    target: &Target,
) -> Result<(), Refusal> {
    if !judge.needs_destination() {
        return Ok(());
    }
    let Ok(addrs) = upstream::resolve(&settings.resolver, target, &control.metrics().dns).await
    else {
        return judge.decide_final(None);
    };
    let mut last = Ok(());
    for addr in addrs {
        last = judge.decide_final(Some(addr.ip()));
        if last.is_ok() {
            return last;
        }
    }
    last
}

/// Connects to the parent `peer` (never to one of the proxy's own sockets),
/// counting the outcome towards its liveness.
pub(crate) async fn connect_parent(
    control: &ControlPlane,
    settings: &Settings,
    peer: &CachePeer,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let fail = |err: upstream::UpstreamError| {
        control.metrics().upstream_failed(&err);
        control.metrics().parent_connection(&peer.name, "failed");
        control.parents().failed(peer);
        Refusal::new(err.status(), format!("parent {}: {err}", peer.name))
    };
    let mut addrs = upstream::resolve(
        &settings.resolver,
        &peer_target(peer),
        &control.metrics().dns,
    )
    .await
    .map_err(fail)?;
    let before = addrs.len();
    addrs.retain(|addr| !control.is_own(*addr));
    if addrs.is_empty() && before > 0 {
        return Err(Refusal::denied(
            403,
            format!("forwarding loop: parent {} is this proxy", peer.name),
        ));
    }
    let timeout = peer.connect_timeout.unwrap_or(settings.connect_timeout);
    let connected = upstream::connect(&addrs, timeout, settings.happy_eyeballs_delay)
        .await
        .map_err(fail)?;
    control.parents().succeeded(peer);
    control.metrics().parent_connection(&peer.name, "connected");
    Ok(connected)
}

/// The tunnel's upstream: connected along the routes in order, through a
/// parent's CONNECT when the route leads to one. Fills in the record's
/// upstream, hierarchy code and peer as soon as a route connects. Returns
/// the upstream and what was read from a parent (nothing when direct).
pub(crate) async fn open_tunnel(
    control: &ControlPlane,
    settings: &Settings,
    judge: &Judge<'_>,
    target: &Target,
    record: &mut AccessRecord,
) -> Result<(TcpStream, handshake::Opened), Refusal> {
    let routes = routes(control, settings, judge, target, false).await;
    if routes.is_empty() {
        return Err(no_route());
    }
    if routes.iter().any(|route| route.peer.is_some()) {
        check_destination(control, settings, judge, target).await?;
    }
    let mut last = None;
    for route in &routes {
        let Some(peer) = peer_of(settings, route) else {
            match control.connect_upstream(settings, judge, target).await {
                Ok((stream, addr)) => {
                    record.upstream = Some(addr);
                    record.hierarchy = HierCode::Direct.as_str();
                    return Ok((stream, handshake::Opened::default()));
                }
                Err(refusal) if refusal.result == "TCP_DENIED" => return Err(refusal),
                Err(refusal) => last = Some(refusal),
            }
            continue;
        };
        let (mut stream, addr) = match connect_parent(control, settings, peer).await {
            Ok(connected) => connected,
            Err(refusal) => {
                last = Some(refusal);
                continue;
            }
        };
        record.upstream = Some(addr);
        record.hierarchy = route.code.as_str();
        record.peer = Some(peer.name.clone());
        return handshake::open(
            &mut stream,
            target,
            peer.login.as_deref(),
            settings.read_timeout,
        )
        .await
        .map(|opened| (stream, opened))
        .map_err(|err| {
            if matches!(
                err,
                handshake::HandshakeError::Closed | handshake::HandshakeError::Timeout(_)
            ) {
                control.parents().failed(peer);
                control.metrics().parent_connection(&peer.name, "failed");
            } else if matches!(err, handshake::HandshakeError::Refused { .. }) {
                control.metrics().parent_connection(&peer.name, "refused");
            }
            let mut refusal = Refusal::new(err.status(), format!("parent {}: {err}", peer.name));
            if let handshake::HandshakeError::Refused { answer, .. } = err {
                refusal.relayed = Some(Box::new(answer));
            }
            refusal.result = "TCP_TUNNEL";
            refusal
        });
    }
    Err(last.unwrap_or_else(no_route))
}

/// No route may be tried: Squid's `ERR_CANNOT_FORWARD`.
pub(crate) fn no_route() -> Refusal {
    Refusal::new(
        503,
        "cannot forward: no parent is up and allowed, and never_direct forbids going direct",
    )
}

/// The pool key of connections along `route`'s hop: the parent's, shared by
/// every target, or the origin's `host:port`.
pub(crate) fn pool_key(peer: Option<&CachePeer>, target: &Target) -> String {
    match peer {
        Some(peer) => format!("parent {}", key(peer)),
        None => target.to_string(),
    }
}
