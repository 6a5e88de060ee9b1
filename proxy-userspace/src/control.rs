//! The control plane: accepts clients, reads and checks the `CONNECT` request,
//! applies the policy, resolves and connects upstream, answers `200`, and hands
//! the socket pair to the data plane. It never touches tunnel bytes itself,
//! except the few the client pipelined behind its request head.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    access_log::{AccessLog, AccessRecord},
    config::{Config, TestHook},
    connect_request::{self, HeadError},
    dataplane::{DataPlane, Tunnel},
    policy::BuiltinPolicy,
    sockopt, upstream,
};

/// The answer that opens a tunnel.
pub const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// Listen backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 4096;
/// After an error answer, how long to keep reading what the client still sends, so
/// that closing does not reset the connection and destroy the answer in flight.
const LINGER_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Everything a connection handler needs.
pub struct ControlPlane {
    config: Config,
    policy: BuiltinPolicy,
    dataplane: Arc<dyn DataPlane>,
    access_log: AccessLog,
}

/// An error answer to a request.
struct Refusal {
    status: u16,
    result: &'static str,
    reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            result: "NONE_NONE",
            reason: reason.into(),
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

impl ControlPlane {
    /// A control plane that hands tunnels to `dataplane`.
    pub fn new(config: Config, dataplane: Arc<dyn DataPlane>, access_log: AccessLog) -> Self {
        let policy = BuiltinPolicy {
            connect_ports: config.connect_ports.clone(),
        };
        Self {
            config,
            policy,
            dataplane,
            access_log,
        }
    }

    /// Accepts clients on `listener` for ever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    tokio::spawn(self.clone().handle(client, peer));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; clients wait
                    // in the backlog meanwhile.
                    log::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let mut record = AccessRecord {
            ts: SystemTime::now(),
            duration_ms: 0,
            client: peer,
            method: "NONE".into(),
            target: "error:invalid-request".into(),
            status: 0,
            result: "NONE_NONE",
            hierarchy: "HIER_NONE",
            upstream: None,
            bytes_to_client: 0,
            bytes_from_client: 0,
            dataplane: None,
            end: String::new(),
        };
        match self.open_tunnel(&mut client, &mut record).await {
            Ok(opened) => {
                let pipelined = opened.pipelined;
                let tunnel = Tunnel {
                    client,
                    upstream: opened.upstream,
                    client_bytes_consumed: opened.client_bytes_consumed,
                    client_queue_clean: opened.client_queue_clean,
                };
                let outcome = self.dataplane.run(tunnel).await;
                record.status = 200;
                record.result = "TCP_TUNNEL";
                record.bytes_to_client = CONNECT_OK.len() as u64 + outcome.upstream_to_client;
                record.bytes_from_client = pipelined + outcome.client_to_upstream;
                record.dataplane = Some(outcome.dataplane);
                record.end = outcome.end.as_str().into();
            }
            Err(refusal) => {
                record.result = refusal.result;
                record.end = refusal.reason.clone();
                if refusal.status != 0 {
                    record.status = refusal.status;
                    // RFC 9110 §9.3.2: an answer to HEAD carries no content.
                    let with_body = record.method != "HEAD";
                    record.bytes_to_client = answer_error(&mut client, &refusal, with_body).await;
                }
            }
        }
        record.ts = SystemTime::now();
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.access_log.write(&record);
    }

    async fn open_tunnel(
        &self,
        client: &mut TcpStream,
        record: &mut AccessRecord,
    ) -> Result<OpenedTunnel, Refusal> {
        let head = connect_request::read_head(client, self.config.request_timeout())
            .await
            .map_err(|err| match err {
                HeadError::Timeout(_) => Refusal::new(408, err.to_string()),
                HeadError::TooLarge => Refusal::new(431, err.to_string()),
                HeadError::Malformed(_) => Refusal::new(400, err.to_string()),
                HeadError::ClosedEarly(_) | HeadError::Io(_) => Refusal::new(0, err.to_string()),
            })?;
        record.method.clone_from(&head.method);
        record.target.clone_from(&head.target);
        if head.method != "CONNECT" {
            return Err(Refusal::new(
                405,
                format!("method {} not supported", head.method),
            ));
        }
        let target = connect_request::parse_target(&head.target)
            .map_err(|err| Refusal::new(400, format!("bad CONNECT target: {err}")))?;
        record.target = target.to_string();
        self.policy
            .check(record.client.ip(), target.port)
            .map_err(|denial| Refusal {
                status: 403,
                result: "TCP_DENIED",
                reason: denial.to_string(),
            })?;
        let refuse_upstream =
            |err: upstream::UpstreamError| Refusal::new(err.status(), err.to_string());
        let addrs = upstream::resolve(&target, self.config.dns_timeout())
            .await
            .map_err(refuse_upstream)?;
        let (mut upstream, upstream_addr) =
            upstream::connect(&addrs, self.config.connect_timeout())
                .await
                .map_err(refuse_upstream)?;
        record.upstream = Some(upstream_addr);
        record.hierarchy = "HIER_DIRECT";
        for socket in [&*client, &upstream] {
            let _ = socket.set_nodelay(true);
            if !self.config.tcp_congestion.is_empty() {
                if let Err(err) =
                    sockopt::set_congestion(socket.as_fd(), &self.config.tcp_congestion)
                {
                    log::debug!("TCP_CONGESTION {}: {err}", self.config.tcp_congestion);
                }
            }
        }
        let write_upstream =
            |err: io::Error| Refusal::new(502, format!("writing pipelined bytes upstream: {err}"));
        if !head.pipelined.is_empty() {
            upstream
                .write_all(&head.pipelined)
                .await
                .map_err(write_upstream)?;
        }
        let queued = if self.config.hook(TestHook::NoQueueDrain) {
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
        Ok(OpenedTunnel {
            upstream,
            pipelined,
            client_bytes_consumed: head.head_len as u64 + pipelined,
            client_queue_clean: queued.clean,
        })
    }
}

/// What [`forward_queued_bytes`] did.
struct QueuedBytes {
    /// Bytes read from the client and written upstream.
    bytes: u64,
    /// Whether the client's receive queue was seen empty, i.e. no segment is left
    /// half-read.
    clean: bool,
}

/// Forwards what the client has already sent beyond the part of the stream the
/// head reader consumed, until its receive queue is seen empty.
///
/// The head is read in chunks, which can stop in the middle of a queued skb. A
/// data plane that takes over the socket must not start there: the sockmap verdict
/// is handed whole skbs (tcp_read_skb() does not skip what recvmsg() already
/// copied out), so a half-read skb would be sent upstream twice. A read that
/// returns less than the buffer, or would block, proves the queue was empty.
async fn forward_queued_bytes(
    client: &TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<QueuedBytes> {
    const CHUNK: usize = 256 * 1024;
    const LIMIT: u64 = 4 * 1024 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0;
    while bytes < LIMIT {
        match client.try_read(&mut buf) {
            Ok(n) => {
                upstream.write_all(&buf[..n]).await?;
                bytes += n as u64;
                if n < CHUNK {
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

/// An upstream connection ready to become a tunnel.
struct OpenedTunnel {
    upstream: TcpStream,
    /// Bytes the client sent behind its request head, already written upstream.
    pipelined: u64,
    /// All bytes read from the client so far (head and pipelined bytes).
    client_bytes_consumed: u64,
    /// Whether the client socket's receive queue holds no half-read segment.
    client_queue_clean: bool,
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes an error answer, then closes gracefully. Returns the bytes written.
async fn answer_error(client: &mut TcpStream, refusal: &Refusal, with_body: bool) -> u64 {
    let body = format!(
        "spliced: {} {}: {}\n",
        refusal.status,
        reason_phrase(refusal.status),
        refusal.reason
    );
    let allow = if refusal.status == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    let answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
        refusal.status,
        reason_phrase(refusal.status),
        body.len(),
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
