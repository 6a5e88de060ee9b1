//! The control plane: accepts clients, reads and checks the `CONNECT` request,
//! applies the policy, resolves and connects upstream, answers `200`, and hands
//! the socket pair to the data plane. It never touches tunnel bytes itself,
//! except the few the client sent before the 200.
//!
//! The settings in force live behind an [`ArcSwap`]: a reload swaps them, and
//! every connection keeps the snapshot it started with.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::{
    access_log::{AccessLog, AccessRecord, BytesBeforePromotion},
    auth_check::Authenticator,
    config::{TestHook, TestHooks},
    connect_request::{self, HeadError, Host, RequestHead, Target},
    dataplane::{DataPlane, Picked, Progress, Tunnel, TunnelEnd, TunnelLimits, TunnelOutcome},
    handover::HandoverRecord,
    http_forward,
    metrics::Metrics,
    parents, peek,
    policy::Denial,
    proxy_protocol::{self, ProxyHeaderError},
    settings::{Policy, Settings},
    sockopt,
    squid::{BasicAuth, Decision, LocalTime, RequestFacts, SquidConfig, Step1},
    upstream,
};

mod connection;
mod judge;
mod open;
mod replies;

use self::{judge::basic_auth, open::Opened, replies::answer_error};
pub(crate) use self::{
    judge::Judge,
    open::forward_queued_bytes,
    replies::{error_body, reason_phrase},
};

/// The answer that opens a tunnel.
pub const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// Descriptors held back to answer clients when the process runs out.
const FD_RESERVE: usize = 4;
/// Listen backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 4096;
/// After an error answer, how long to keep reading what the client still sends, so
/// that closing does not reset the connection and destroy the answer in flight.
pub(crate) const LINGER_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Settings in force and the access log they opened.
pub struct Active {
    /// The settings.
    pub settings: Settings,
    /// The access log destinations of these settings.
    pub access_log: AccessLog,
}

/// Everything a connection handler needs.
pub struct ControlPlane {
    active: ArcSwap<Active>,
    dataplane: Arc<dyn DataPlane>,
    hooks: TestHooks,
    metrics: Arc<Metrics>,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    open_connections: AtomicUsize,
    all_closed: Notify,
    /// Set once shutdown_lifetime is over: open tunnels end at once.
    closing: tokio::sync::watch::Sender<bool>,
    /// Set when the drain starts (SIGTERM).
    draining: tokio::sync::watch::Sender<bool>,
    /// The proxy's own listening sockets (proxy and admin): never a target.
    own_addrs: Mutex<Vec<SocketAddr>>,
    /// A descriptor held in reserve, given back to refuse clients cleanly when
    /// the process runs out of descriptors.
    fd_reserve: tokio::sync::Mutex<Vec<std::fs::File>>,
    /// Idle upstream connections of plain-HTTP forwarding.
    http_pool: Arc<http_forward::Pool>,
    /// Basic credentials: their cache and the hash verifiers (kept across
    /// reloads).
    authenticator: Authenticator,
    /// Liveness of the parent proxies (`cache_peer`), kept across reloads.
    parents: Arc<parents::Health>,
}

/// An error answer to a request.
pub(crate) struct Refusal {
    /// The HTTP status (0: none is sent).
    pub(crate) status: u16,
    /// The Squid result code logged (`NONE_NONE`, `TCP_DENIED`).
    pub(crate) result: &'static str,
    /// Why, for the log (and the body, unless it is a denial).
    pub(crate) reason: String,
    /// Extra header lines, each ending in CRLF.
    pub(crate) headers: String,
    /// The access rule that denied the request, for metrics: `FILE:LINE`,
    /// `implicit` or `builtin:REASON`.
    pub(crate) rule: Option<String>,
    /// The `200` was sent before the refusal (the TLS name policy closes a
    /// tunnel after it): nothing more is answered.
    pub(crate) answered: bool,
    /// A parent's own error answer, relayed instead of spliced's.
    pub(crate) relayed: Option<Box<parents::handshake::RelayedAnswer>>,
}

impl Refusal {
    /// A refusal with `status`, logged as `NONE_NONE`.
    pub(crate) fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            result: "NONE_NONE",
            reason: reason.into(),
            headers: String::new(),
            rule: None,
            answered: false,
            relayed: None,
        }
    }

    /// A refusal by the policy, logged as `TCP_DENIED`.
    pub(crate) fn denied(status: u16, reason: impl Into<String>) -> Self {
        Self {
            result: "TCP_DENIED",
            ..Self::new(status, reason)
        }
    }
}

/// Binds a listening socket; IPv6 sockets are v6-only so `0.0.0.0` and `[::]` can
/// share a port.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Counts a connection as open until dropped.
pub(crate) struct ConnectionGuard<'a> {
    control: &'a ControlPlane,
    /// The client it counts for in `per_client`, once known (behind a PROXY
    /// header, only once the header is read).
    client: Option<IpAddr>,
}

impl ConnectionGuard<'_> {
    /// Counts the connection for `client`; says whether it is within `limit`
    /// connections from that address.
    fn count_client(&mut self, client: IpAddr, limit: Option<u32>) -> bool {
        debug_assert!(self.client.is_none());
        let mut per_client = self
            .control
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let count = per_client.entry(client).or_insert(0);
        *count += 1;
        self.client = Some(client);
        limit.is_none_or(|limit| *count <= limit)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut per_client = self
            .control
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(client) = self.client {
            if let Some(count) = per_client.get_mut(&client) {
                *count -= 1;
                if *count == 0 {
                    per_client.remove(&client);
                }
            }
        }
        drop(per_client);
        if self.control.open_connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.control.all_closed.notify_waiters();
        }
    }
}

impl ControlPlane {
    /// A control plane that hands tunnels to `dataplane` and counts in `metrics`.
    pub fn new(
        active: Active,
        dataplane: Arc<dyn DataPlane>,
        hooks: TestHooks,
        metrics: Arc<Metrics>,
    ) -> Self {
        let authenticator = Authenticator::new(metrics.clone());
        authenticator.configure(basic_auth(&active.settings));
        Self {
            active: ArcSwap::from_pointee(active),
            dataplane,
            hooks,
            metrics,
            per_client: Mutex::default(),
            open_connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
            closing: tokio::sync::watch::Sender::new(false),
            draining: tokio::sync::watch::Sender::new(false),
            own_addrs: Mutex::default(),
            fd_reserve: tokio::sync::Mutex::new(
                (0..FD_RESERVE)
                    .filter_map(|_| std::fs::File::open("/dev/null").ok())
                    .collect(),
            ),
            http_pool: Arc::default(),
            authenticator,
            parents: Arc::default(),
        }
    }

    /// The credentials cache and hash verifiers.
    pub(crate) fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    /// Liveness of the parent proxies.
    pub(crate) fn parents(&self) -> &Arc<parents::Health> {
        &self.parents
    }

    /// Idle upstream connections of plain-HTTP forwarding.
    pub(crate) fn http_pool(&self) -> &Arc<http_forward::Pool> {
        &self.http_pool
    }

    /// Notes a socket the proxy listens on, so no tunnel may lead back to it.
    pub fn add_own_addr(&self, addr: SocketAddr) {
        self.own_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr);
    }

    /// Forgets a socket the proxy no longer listens on.
    pub fn remove_own_addr(&self, addr: SocketAddr) {
        self.own_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a| *a != addr);
    }

    /// Whether connecting to `target` would reach one of the proxy's own
    /// listening sockets (a forwarding loop).
    pub(crate) fn is_own(&self, target: SocketAddr) -> bool {
        let own = self.own_addrs.lock().unwrap_or_else(|p| p.into_inner());
        // Judge the address connect(2) really reaches: it takes 0.0.0.0 for
        // 127.0.0.1 and :: for ::1, so `0.0.0.0:PORT` (a literal, or what a name
        // resolved to) must count as a socket bound to loopback, not only as one
        // bound to the unspecified address.
        let ip = match canonical(target.ip()) {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        own.iter().any(|addr| {
            addr.port() == target.port()
                && if addr.ip().is_unspecified() {
                    is_local_ip(ip)
                } else {
                    canonical(addr.ip()) == ip
                }
        })
    }

    /// Ends every open connection now (after shutdown_lifetime): each still
    /// writes its access log line, with the end `shutdown`.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// The drain begins: tunnels a data plane can hand to the next process
    /// are handed over now.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Becomes `true` when open connections must end at once.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Becomes `true` when the drain begins.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings in force.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Puts new settings in force for connections accepted from now on.
    pub fn replace(&self, active: Active) {
        self.authenticator.configure(basic_auth(&active.settings));
        self.active.store(Arc::new(active));
    }

    /// Client connections open now (reading a request, or tunnelling).
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Acquire)
    }

    /// Waits until no client connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Accepts clients on `listener`, the configured address `listen`, until
    /// the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, listen: SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    tokio::spawn(self.clone().handle(client, peer, listen));
                }
                Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.refuse_for_lack_of_descriptors(&listener).await;
                }
                Err(err) => {
                    // Transient accept errors (ECONNABORTED, ENOBUFS): back off a
                    // little instead of spinning.
                    log::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Out of file descriptors: give back the ones held in reserve, accept the
    /// waiting clients one by one, answer each 503 and close it, then take the
    /// reserve again. Open tunnels are untouched; new clients get a clear
    /// refusal instead of waiting in the backlog, until load drops.
    async fn refuse_for_lack_of_descriptors(&self, listener: &TcpListener) {
        const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 45\r\nConnection: close\r\n\r\nspliced: 503 Service Unavailable: overloaded\n";
        let mut reserve = self.fd_reserve.lock().await;
        let released = reserve.len();
        reserve.clear();
        let mut refused = 0;
        // Until nothing is waiting, or there is still no descriptor for it.
        while let Ok(Ok((client, _peer))) =
            tokio::time::timeout(Duration::from_millis(20), listener.accept()).await
        {
            let _ = client.try_write(ANSWER);
            drop(client);
            self.metrics.request_answered(503);
            refused += 1;
        }
        while reserve.len() < FD_RESERVE {
            match std::fs::File::open("/dev/null") {
                Ok(file) => reserve.push(file),
                Err(_) => break,
            }
        }
        log::warn!(
            "out of file descriptors: refused {refused} clients with 503 (reserve {released} → {})",
            reserve.len()
        );
        if refused == 0 {
            // Let tunnels close before trying again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Counts a connection from `client` as open until the guard is dropped;
    /// says whether it is within `limit` connections from that address.
    pub(crate) fn admit(&self, client: IpAddr, limit: Option<u32>) -> (ConnectionGuard<'_>, bool) {
        let mut guard = self.open_connection();
        let within = guard.count_client(client, limit);
        (guard, within)
    }

    /// Counts a connection as open until the guard is dropped, before its
    /// client is known.
    fn open_connection(&self) -> ConnectionGuard<'_> {
        self.open_connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            control: self,
            client: None,
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connection to `ip` stays on this host: loopback, the unspecified
/// address (which connect(2) treats as loopback), or an address of one of its
/// interfaces.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || if_addrs::get_if_addrs()
            .is_ok_and(|ifaces| ifaces.iter().any(|iface| canonical(iface.ip()) == ip))
}
