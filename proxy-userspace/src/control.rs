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

    async fn handle(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr, listen: SocketAddr) {
        let started = Instant::now();
        let active = self.active();
        let settings = &active.settings;
        let mut guard = self.open_connection();
        let mut record = AccessRecord {
            ts: SystemTime::now(),
            duration_ms: 0,
            client: peer,
            local: client.local_addr().ok(),
            method: "NONE".into(),
            target: "error:invalid-request".into(),
            status: 0,
            result: "NONE_NONE",
            hierarchy: "HIER_NONE",
            upstream: None,
            user: None,
            bytes_to_client: 0,
            bytes_from_client: 0,
            dataplane: None,
            bytes_before_promotion: None,
            sni: None,
            mime_type: None,
            peer: None,
            end: String::new(),
        };
        let mut closing = self.closing.subscribe();
        // Behind a load balancer's PROXY header, the header names the client.
        let (proxy_header_len, read) = if settings.proxy_header_listen.contains(&listen) {
            let accepted = tokio::select! {
                accepted = proxy_protocol::accept(settings, &mut client, peer, record.local) => accepted,
                _ = closing.wait_for(|closing| *closing) => Err(ProxyHeaderError::Shutdown),
            };
            match accepted {
                Ok((header, read)) => {
                    self.metrics.proxy_protocol_accepted(header.version);
                    record.client = header.source.unwrap_or(peer);
                    (header.len as u64, read)
                }
                Err(err) => {
                    self.metrics.proxy_protocol_refused(err.reason());
                    record.target = "error:proxy-protocol".into();
                    record.end = err.to_string();
                    proxy_protocol::close(&mut client, LINGER_AFTER_ERROR).await;
                    record.ts = SystemTime::now();
                    record.duration_ms = started.elapsed().as_millis() as u64;
                    self.active().access_log.write(&record);
                    return;
                }
            }
        } else {
            (0, Vec::new())
        };
        let within_limit =
            guard.count_client(record.client.ip(), settings.client_ip_max_connections);
        let opened = if !within_limit {
            Err(Refusal::denied(429, "client_ip_max_connections reached"))
        } else {
            tokio::select! {
                opened = self.open_tunnel(settings, &mut client, &mut record, read) => opened,
                _ = closing.wait_for(|closing| *closing) => Err(Refusal::new(0, "proxy shut down")),
            }
        };
        match opened {
            Ok(Opened::PlainHttp(head)) => {
                // Plain HTTP: every request on the connection is forwarded and
                // logged on its own (`http_forward`).
                let base = record.clone();
                http_forward::serve(
                    self.clone(),
                    active.clone(),
                    (client, proxy_header_len),
                    head,
                    base,
                )
                .await;
                return;
            }
            Ok(Opened::Tunnel(opened)) => {
                let tunnel = self.tunnel(
                    (client, opened.upstream),
                    [
                        proxy_header_len + opened.client_bytes_consumed,
                        opened.upstream_bytes_consumed,
                    ],
                    opened.client_queue_clean,
                    settings,
                    started,
                    || HandoverRecord::of(&record, opened.pipelined),
                );
                let progress = tunnel.progress.clone();
                let (plane_kind, plane) = self.dataplane.pick(&tunnel);
                self.metrics.request_answered(200);
                self.metrics
                    .tunnel_opened(plane_kind, started.elapsed(), opened.pipelined);
                record.status = 200;
                record.result = "TCP_TUNNEL";
                let outcome = self
                    .run_tunnel(
                        (plane_kind, plane),
                        tunnel,
                        settings,
                        &record,
                        opened.pipelined,
                        started,
                    )
                    .await;
                progress.finish(&outcome);
                self.metrics.tunnel_closed(plane_kind, &outcome);
                if outcome.end == TunnelEnd::HandedOver {
                    // The next process writes the record when the tunnel ends.
                    log::info!(
                        "tunnel {} → {} handed over to the next process after {} + {} bytes",
                        record.client,
                        record.target,
                        outcome.client_to_upstream,
                        outcome.upstream_to_client
                    );
                    return;
                }
                record.bytes_to_client =
                    CONNECT_OK.len() as u64 + opened.from_upstream + outcome.upstream_to_client;
                record.bytes_from_client = opened.pipelined + outcome.client_to_upstream;
                record.dataplane = Some(outcome.dataplane);
                record.bytes_before_promotion = progress.bytes_before_promotion().map(
                    |[client_to_upstream, upstream_to_client]| BytesBeforePromotion {
                        client_to_upstream,
                        upstream_to_client,
                    },
                );
                record.end = outcome.end.as_str().into();
            }
            Err(refusal) => {
                record.result = refusal.result;
                record.end = refusal.reason.clone();
                if refusal.answered {
                    record.status = 200;
                    record.bytes_to_client = CONNECT_OK.len() as u64;
                }
                if let Some(rule) = &refusal.rule {
                    self.metrics.acl_denied(rule);
                }
                if refusal.status != 0 {
                    self.metrics.request_answered(refusal.status);
                    record.status = refusal.status;
                    // RFC 9110 §9.3.2: an answer to HEAD carries no content.
                    let with_body = record.method != "HEAD";
                    record.bytes_to_client = answer_error(&mut client, &refusal, with_body).await;
                }
            }
        }
        record.ts = SystemTime::now();
        record.duration_ms = started.elapsed().as_millis() as u64;
        // The log in force when the transaction ends: a reload reopens it.
        self.active().access_log.write(&record);
    }

    /// A tunnel over `client` and `upstream` (of which user space has read
    /// `consumed` bytes, client's first) for the data plane, under
    /// `settings`' limits counted from `started`; `handover` is built only
    /// for a plane that may hand the tunnel to the next process (the others
    /// never read it).
    pub(crate) fn tunnel(
        &self,
        (client, upstream): (TcpStream, TcpStream),
        [client_bytes_consumed, upstream_bytes_consumed]: [u64; 2],
        client_queue_clean: bool,
        settings: &Settings,
        started: Instant,
        handover: impl FnOnce() -> HandoverRecord,
    ) -> Tunnel {
        Tunnel {
            client,
            upstream,
            client_bytes_consumed,
            upstream_bytes_consumed,
            client_queue_clean,
            limits: TunnelLimits {
                idle: settings.read_timeout,
                lifetime: settings.client_lifetime.saturating_sub(started.elapsed()),
            },
            shutdown: self.closing.subscribe(),
            progress: Progress::new(self.metrics.clone()),
            draining: self.draining.subscribe(),
            handover: if self.dataplane.hands_over() {
                handover().to_bytes().into()
            } else {
                Arc::from([])
            },
        }
    }

    /// The data plane tunnels run on.
    pub(crate) fn dataplane(&self) -> &dyn DataPlane {
        &*self.dataplane
    }

    /// Runs `tunnel` on the data plane; with `access_log_periodic`, writes a
    /// record of the bytes moved so far at every interval while it is open.
    async fn run_tunnel(
        &self,
        (plane_kind, plane): Picked<'_>,
        tunnel: Tunnel,
        settings: &Settings,
        record: &AccessRecord,
        pipelined: u64,
        started: Instant,
    ) -> TunnelOutcome {
        let progress = tunnel.progress.clone();
        let run = plane.run(tunnel);
        let Some(every) = settings.access_log_periodic else {
            return run.await;
        };
        tokio::pin!(run);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                outcome = &mut run => return outcome,
                _ = ticks.tick() => {
                    let [up, down] = progress.reported();
                    let periodic = AccessRecord {
                        ts: SystemTime::now(),
                        duration_ms: started.elapsed().as_millis() as u64,
                        bytes_to_client: CONNECT_OK.len() as u64 + down,
                        bytes_from_client: pipelined + up,
                        dataplane: Some(plane_kind),
                        end: "periodic".into(),
                        ..record.clone()
                    };
                    self.active().access_log.write(&periodic);
                }
            }
        }
    }

    async fn open_tunnel(
        &self,
        settings: &Settings,
        client: &mut TcpStream,
        record: &mut AccessRecord,
        read: Vec<u8>,
    ) -> Result<Opened, Refusal> {
        let head = connect_request::read_head_after(client, settings.request_timeout, read)
            .await
            .map_err(|err| match err {
                HeadError::Timeout(_) => Refusal::new(408, err.to_string()),
                HeadError::TooLarge => Refusal::new(431, err.to_string()),
                HeadError::Malformed(_) => Refusal::new(400, err.to_string()),
                HeadError::ClosedEarly(_) | HeadError::Io(_) => Refusal::new(0, err.to_string()),
            })?;
        record.method.clone_from(&head.method);
        record.target.clone_from(&head.target);
        if head.method != "CONNECT" && http_forward::is_absolute(&head.target) {
            return Ok(Opened::PlainHttp(head));
        }
        if head.method != "CONNECT" {
            return Err(Refusal::new(
                405,
                format!("method {} not supported", head.method),
            ));
        }
        let target = connect_request::parse_target(&head.target)
            .map_err(|err| Refusal::new(400, format!("bad CONNECT target: {err}")))?;
        record.target = target.to_string();

        let judge = Judge::new(settings, &self.authenticator, record, &head, &target).await?;
        record.user.clone_from(&judge.user);
        judge.decide(None)?;
        // Straight to the origin, or through a parent (`parents`).
        let (mut upstream, from_parent) =
            parents::open_tunnel(self, settings, &judge, &target, record).await?;
        // `dst` is the origin's address; through a parent it is not known.
        let origin_ip = record
            .upstream
            .filter(|_| record.peer.is_none())
            .map(|a| a.ip());
        for socket in [&*client, &upstream] {
            let _ = socket.set_nodelay(true);
            if !settings.tcp_congestion.is_empty() {
                if let Err(err) = sockopt::set_congestion(socket.as_fd(), &settings.tcp_congestion)
                {
                    log::debug!("TCP_CONGESTION {}: {err}", settings.tcp_congestion);
                }
            }
        }
        let write_upstream =
            |err: io::Error| Refusal::new(502, format!("writing pipelined bytes upstream: {err}"));
        if let Some(squid) = judge.tls_policy() {
            let facts = judge.facts(origin_ip, 1);
            match squid.tls_step1(&facts) {
                Step1::Splice => {}
                Step1::Terminate(rule) => {
                    self.metrics.tls_refused("terminate");
                    return Err(Refusal::denied(403, format!("terminated by {rule}")));
                }
                Step1::Peek => {
                    let opened = self
                        .peek_then_open(settings, squid, &facts, client, upstream, &head, record)
                        .await?;
                    return relay_from_parent(
                        client,
                        opened,
                        (from_parent.head_len, &from_parent.early),
                        record,
                    )
                    .await
                    .map(Opened::Tunnel);
                }
            }
        }
        if !head.pipelined.is_empty() {
            upstream
                .write_all(&head.pipelined)
                .await
                .map_err(write_upstream)?;
        }
        let queued = if self.hooks.has(TestHook::NoQueueDrain) {
            QueuedBytes {
                bytes: 0,
                clean: true,
            }
        } else {
            forward_queued_bytes(client, &mut upstream)
                .await
                .map_err(write_upstream)?
        };
        if let Err(err) = client.write_all(CONNECT_OK).await {
            return Err(Refusal::new(0, format!("client gone before 200: {err}")));
        }
        let pipelined = head.pipelined.len() as u64 + queued.bytes;
        let opened = OpenedTunnel {
            upstream,
            pipelined,
            client_bytes_consumed: head.head_len as u64 + pipelined,
            client_queue_clean: queued.clean,
            from_upstream: 0,
            upstream_bytes_consumed: 0,
        };
        relay_from_parent(
            client,
            opened,
            (from_parent.head_len, &from_parent.early),
            record,
        )
        .await
        .map(Opened::Tunnel)
    }
}

/// After the `200`: what a parent sent behind its own `2xx` head goes to the
/// client first, then whatever else its socket already holds, so that no
/// data plane starts in the middle of a half-read segment (the same reason as
/// [`forward_queued_bytes`] on the client side).
async fn relay_from_parent(
    client: &mut TcpStream,
    mut opened: OpenedTunnel,
    (parent_head_len, early): (u64, &[u8]),
    record: &AccessRecord,
) -> Result<OpenedTunnel, Refusal> {
    if record.peer.is_none() {
        return Ok(opened);
    }
    let refuse = |err: io::Error| Refusal {
        answered: true,
        ..Refusal::new(0, format!("relaying the parent's first bytes: {err}"))
    };
    client.write_all(early).await.map_err(refuse)?;
    let queued = forward_queued_bytes(&opened.upstream, client)
        .await
        .map_err(refuse)?;
    opened.from_upstream = early.len() as u64 + queued.bytes;
    opened.upstream_bytes_consumed = parent_head_len + opened.from_upstream;
    // Like a half-read client segment, a half-read upstream one keeps the
    // tunnel off the sockmap plane.
    opened.client_queue_clean &= queued.clean;
    Ok(opened)
}

impl ControlPlane {
    /// Resolves `target`, keeps the addresses the policy allows (`dst` ACLs
    /// judge each) that are not the proxy's own, and connects to them with
    /// Happy Eyeballs. Every upstream connection (CONNECT, plain HTTP) comes
    /// from here.
    pub(crate) async fn connect_upstream(
        &self,
        settings: &Settings,
        judge: &Judge<'_>,
        target: &Target,
    ) -> Result<(TcpStream, SocketAddr), Refusal> {
        let refuse_upstream = |err: upstream::UpstreamError| {
            self.metrics.upstream_failed(&err);
            Refusal::new(err.status(), err.to_string())
        };
        let resolving = Instant::now();
        let resolved = upstream::resolve(&settings.resolver, target, &self.metrics.dns).await;
        if matches!(target.host, Host::Name(_)) {
            self.metrics.dns_resolved(resolving.elapsed());
        }
        let mut addrs = resolved.map_err(refuse_upstream)?;
        if judge.needs_destination() {
            // `dst` and `to_localhost` judge the address actually connected to.
            let mut last_denial = None;
            addrs.retain(|addr| match judge.decide(Some(addr.ip())) {
                Ok(()) => true,
                Err(refusal) => {
                    last_denial = Some(refusal);
                    false
                }
            });
            if addrs.is_empty() {
                return Err(
                    last_denial.unwrap_or_else(|| Refusal::denied(403, "no allowed address"))
                );
            }
        }
        let before = addrs.len();
        addrs.retain(|addr| !self.is_own(*addr));
        if addrs.is_empty() && before > 0 {
            return Err(Refusal::denied(
                403,
                "forwarding loop: the target is this proxy",
            ));
        }
        upstream::connect(
            &addrs,
            settings.connect_timeout,
            settings.happy_eyeballs_delay,
        )
        .await
        .map_err(refuse_upstream)
    }
}

impl ControlPlane {
    /// A tunnel under a peek rule: the `200` first (a TLS client sends its
    /// ClientHello only then), the ClientHello read (with what the client
    /// pipelined behind its head), step 2 decided; on `splice` every byte read
    /// goes upstream and the tunnel is open, on `terminate` nothing has.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, all borrowed from it"
    )]
    async fn peek_then_open(
        &self,
        settings: &Settings,
        squid: &SquidConfig,
        facts: &RequestFacts<'_>,
        client: &mut TcpStream,
        mut upstream: TcpStream,
        head: &RequestHead,
        record: &mut AccessRecord,
    ) -> Result<OpenedTunnel, Refusal> {
        if let Err(err) = client.write_all(CONNECT_OK).await {
            return Err(Refusal::new(0, format!("client gone before 200: {err}")));
        }
        let mut read = head.pipelined.clone();
        let peeked = peek::run(squid, facts, client, &mut read, settings.request_timeout).await;
        record.sni.clone_from(&peeked.sni);
        if let peek::Verdict::Terminate { reason, detail } = peeked.verdict {
            self.metrics.tls_refused(reason);
            return Err(Refusal {
                answered: true,
                ..Refusal::denied(0, format!("{reason}: {detail}"))
            });
        }
        let write_upstream =
            |err: io::Error| Refusal::new(0, format!("writing the ClientHello upstream: {err}"));
        upstream.write_all(&read).await.map_err(write_upstream)?;
        let queued = forward_queued_bytes(client, &mut upstream)
            .await
            .map_err(write_upstream)?;
        let pipelined = read.len() as u64 + queued.bytes;
        Ok(OpenedTunnel {
            upstream,
            pipelined,
            client_bytes_consumed: head.head_len as u64 + pipelined,
            client_queue_clean: queued.clean,
            from_upstream: 0,
            upstream_bytes_consumed: 0,
        })
    }
}

/// The `auth_param basic` settings in force, if any.
fn basic_auth(settings: &Settings) -> Option<&BasicAuth> {
    match &settings.policy {
        Policy::Squid(squid) => squid.auth.as_ref(),
        Policy::Builtin(_) => None,
    }
}

/// Applies the policy in force to one request.
pub(crate) struct Judge<'a> {
    policy: &'a Policy,
    client: IpAddr,
    local: Option<SocketAddr>,
    method: &'a str,
    host: String,
    port: u16,
    /// The user `Proxy-Authorization` authenticated, if any.
    pub(crate) user: Option<String>,
}

impl<'a> Judge<'a> {
    async fn new(
        settings: &'a Settings,
        authenticator: &Authenticator,
        record: &AccessRecord,
        head: &'a RequestHead,
        target: &Target,
    ) -> Result<Self, Refusal> {
        Self::for_request(
            settings,
            authenticator,
            (record.client.ip(), record.local),
            &head.method,
            target,
            head.proxy_authorization.as_deref(),
        )
        .await
    }

    /// The judge of a request for `method` to `target` from `client` (its
    /// address and the proxy address it reached), with its
    /// `Proxy-Authorization` value; 503 when the credentials had to be
    /// verified and every verifier is busy with a full queue.
    pub(crate) async fn for_request(
        settings: &'a Settings,
        authenticator: &Authenticator,
        (client, local): (IpAddr, Option<SocketAddr>),
        method: &'a str,
        target: &Target,
        proxy_authorization: Option<&str>,
    ) -> Result<Self, Refusal> {
        let host = match &target.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        let mut judge = Self {
            policy: &settings.policy,
            client,
            local,
            method,
            host,
            port: target.port,
            user: None,
        };
        if let (Policy::Squid(squid), Some(credentials)) = (&settings.policy, proxy_authorization) {
            if let Some(auth) = squid.auth.as_ref().filter(|_| judge.wants_user(squid)) {
                judge.user = authenticator
                    .check(auth, credentials)
                    .await
                    .map_err(|err| Refusal::new(503, err.to_string()))?;
            }
        }
        Ok(judge)
    }

    /// Whether the rules may look at the user: Squid checks credentials only
    /// when a `proxy_auth` ACL is reached. When no `dst` ACL or TLS name
    /// policy can make a later decision take another path, a decision
    /// without a user that does not ask for one stands (a request another
    /// rule allows or denies first costs no hashing).
    fn wants_user(&self, squid: &SquidConfig) -> bool {
        squid.uses_authentication()
            && (squid.needs_destination()
                || squid.peeks()
                || squid.decide(&self.facts(None, 0)) == Decision::AuthRequired)
    }

    /// Whether a `dst`-like ACL makes the answer depend on the address.
    pub(crate) fn needs_destination(&self) -> bool {
        matches!(self.policy, Policy::Squid(squid) if squid.needs_destination())
    }

    /// What the squid.conf rules look at, at SslBump `step` (0 for
    /// `http_access`).
    pub(crate) fn facts(&self, dst: Option<IpAddr>, step: u8) -> RequestFacts<'_> {
        RequestFacts {
            client: self.client,
            local_ip: self.local.map(|l| l.ip()),
            local_port: self.local.map_or(0, |l| l.port()),
            method: self.method,
            host: &self.host,
            port: self.port,
            dst,
            user: self.user.as_deref(),
            now: LocalTime::now(),
            step,
            sni: None,
        }
    }

    /// The squid.conf in force if it has a TLS name policy.
    fn tls_policy(&self) -> Option<&SquidConfig> {
        match self.policy {
            Policy::Squid(squid) if squid.peeks() => Some(squid),
            _ => None,
        }
    }

    /// Decides with `dst` the address about to be connected to (`None` before
    /// resolution: `dst` ACLs then do not match, as in Squid).
    pub(crate) fn decide(&self, dst: Option<IpAddr>) -> Result<(), Refusal> {
        self.decide_as(dst, dst.is_some())
    }

    /// Decides with `dst` as the last word: a denial without a destination
    /// (a name that did not resolve) is final too.
    pub(crate) fn decide_final(&self, dst: Option<IpAddr>) -> Result<(), Refusal> {
        self.decide_as(dst, true)
    }

    fn decide_as(&self, dst: Option<IpAddr>, last_word: bool) -> Result<(), Refusal> {
        match self.policy {
            Policy::Builtin(builtin) => if self.method == "CONNECT" {
                builtin.check(self.client, self.port)
            } else {
                builtin.check_plain(self.client, self.port)
            }
            .map_err(|denial| {
                let rule = match denial {
                    Denial::ClientNotLocal => "builtin:client_not_local",
                    Denial::PortNotAllowed(_) => "builtin:port_not_allowed",
                    Denial::UnsafePort(_) => "builtin:unsafe_port",
                };
                Refusal {
                    rule: Some(rule.into()),
                    ..Refusal::denied(403, denial.to_string())
                }
            }),
            Policy::Squid(squid) => {
                let decision = squid.decide(&self.facts(dst, 0));
                match decision {
                    Decision::Allow => Ok(()),
                    // Before resolution a denial that a destination could lift is
                    // not final; after it, it is.
                    Decision::Deny { ref file, line, .. }
                        if last_word || !squid.needs_destination() =>
                    {
                        let rule = if line == 0 {
                            "implicit".to_owned()
                        } else {
                            format!("{file}:{line}")
                        };
                        Err(Refusal {
                            rule: Some(rule),
                            ..Refusal::denied(403, decision.to_string())
                        })
                    }
                    Decision::Deny { .. } => Ok(()),
                    Decision::AuthRequired => {
                        let realm = squid.auth_realm().unwrap_or("spliced").replace('"', "'");
                        Err(Refusal {
                            headers: format!("Proxy-Authenticate: Basic realm=\"{realm}\"\r\n"),
                            ..Refusal::denied(407, "proxy authentication required")
                        })
                    }
                }
            }
        }
    }
}

/// What the request head leads to.
enum Opened {
    /// A CONNECT tunnel, ready for the data plane.
    Tunnel(OpenedTunnel),
    /// A plain-HTTP request in absolute form: the connection is served by
    /// `http_forward` from the head on.
    PlainHttp(RequestHead),
}

/// An upstream connection ready to become a tunnel.
struct OpenedTunnel {
    upstream: TcpStream,
    /// Bytes the client sent behind its request head, already written upstream.
    pipelined: u64,
    /// All bytes read from the client so far (head and pipelined bytes).
    client_bytes_consumed: u64,
    /// Whether the client socket's receive queue holds no half-read segment.
    client_queue_clean: bool,
    /// Bytes a parent proxy sent behind its answer, already written to the client.
    from_upstream: u64,
    /// All bytes read from the upstream socket (a parent's answer head and
    /// what followed it).
    upstream_bytes_consumed: u64,
}

/// What [`forward_queued_bytes`] did.
pub(crate) struct QueuedBytes {
    /// Bytes read from the client and written upstream.
    pub(crate) bytes: u64,
    /// Whether the client's receive queue was seen empty, i.e. no segment is left
    /// half-read.
    pub(crate) clean: bool,
}

/// Forwards what the client has already sent beyond the part of the stream the
/// head reader consumed, until its receive queue is seen empty.
///
/// The head is read in chunks, which can stop in the middle of a queued skb. A
/// data plane that takes over the socket must not start there: the sockmap verdict
/// is handed whole skbs (tcp_read_skb() does not skip what recvmsg() already
/// copied out), so a half-read skb would be sent upstream twice. A read that
/// returns less than the buffer, or would block, proves the queue was empty.
pub(crate) async fn forward_queued_bytes(
    client: &TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<QueuedBytes> {
    const CHUNK: usize = 256 * 1024;
    const LIMIT: u64 = 4 * 1024 * 1024;
    // Usually nothing is queued: a small first read, no zeroing, and the big
    // buffer only once the first read came back full.
    let mut buf = Vec::new();
    let mut bytes = 0;
    while bytes < LIMIT {
        buf.clear();
        buf.reserve(if bytes == 0 { 4096 } else { CHUNK });
        let room = buf.capacity();
        match client.try_read_buf(&mut buf) {
            Ok(n) => {
                upstream.write_all(&buf[..n]).await?;
                bytes += n as u64;
                if n < room {
                    return Ok(QueuedBytes { bytes, clean: true });
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                return Ok(QueuedBytes { bytes, clean: true })
            }
            // The client's own error surfaces again in the data plane.
            Err(_) => return Ok(QueuedBytes { bytes, clean: true }),
        }
    }
    Ok(QueuedBytes {
        bytes,
        clean: false,
    })
}

/// The reason phrase of an error status.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// The plain-text body of an error answer.
pub(crate) fn error_body(refusal: &Refusal) -> String {
    // Like Squid's error pages, a denial names its kind but not the rule: which
    // line of the policy matched is for the access log, not for clients.
    let detail = match refusal.result {
        "TCP_DENIED" if refusal.status == 403 => "ERR_ACCESS_DENIED",
        "TCP_DENIED" if refusal.status == 407 => {
            "ERR_CACHE_ACCESS_DENIED (proxy authentication required)"
        }
        _ => refusal.reason.as_str(),
    };
    format!(
        "spliced: {} {}: {detail}\n",
        refusal.status,
        reason_phrase(refusal.status)
    )
}

/// Writes an error answer, then closes gracefully. Returns the bytes written.
async fn answer_error(client: &mut TcpStream, refusal: &Refusal, with_body: bool) -> u64 {
    let body = error_body(refusal);
    let allow = if refusal.status == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    let answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{allow}{}Connection: close\r\n\r\n{}",
        refusal.status,
        reason_phrase(refusal.status),
        body.len(),
        refusal.headers,
        if with_body { body.as_str() } else { "" },
    );
    if client.write_all(answer.as_bytes()).await.is_err() {
        return 0;
    }
    let _ = client.shutdown().await;
    // Read (and drop) what the client still sends until it closes, for a bounded
    // time: closing with unread bytes would send a RST that can destroy the answer.
    let _ = tokio::time::timeout(LINGER_AFTER_ERROR, async {
        let mut sink = [0u8; 4096];
        let mut budget = 1 << 20;
        while budget > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget -= n.min(budget),
            }
        }
    })
    .await;
    answer.len() as u64
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
