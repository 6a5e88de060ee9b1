//! Opening a tunnel: the request head read, judged and answered, the
//! upstream (direct or through a parent) connected, and the bytes the client
//! or a parent sent early forwarded.

use super::*;

impl ControlPlane {
    pub(super) async fn open_tunnel(
        &self,
        settings: &Settings,
        client: &mut TcpStream,
        record: &mut AccessRecord,
        started: Instant,
        read: Vec<u8>,
    ) -> Result<Opened, Refusal> {
        // `request_timeout` covers a PROXY header and the head together.
        let spent = started.elapsed();
        let head = connect_request::read_head_after(client, settings.request_timeout, spent, read)
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
        let opened = OpenedTunnel::new(upstream, &head, pipelined, queued.clean);
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
pub(super) async fn relay_from_parent(
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
    pub(super) async fn peek_then_open(
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
        Ok(OpenedTunnel::new(upstream, head, pipelined, queued.clean))
    }
}

/// What the request head leads to.
pub(super) enum Opened {
    /// A CONNECT tunnel, ready for the data plane.
    Tunnel(OpenedTunnel),
    /// A plain-HTTP request in absolute form: the connection is served by
    /// `http_forward` from the head on.
    PlainHttp(RequestHead),
}

/// An upstream connection ready to become a tunnel.
pub(super) struct OpenedTunnel {
    pub(super) upstream: TcpStream,
    /// Bytes the client sent behind its request head, already written upstream.
    pub(super) pipelined: u64,
    /// All bytes read from the client so far (head and pipelined bytes).
    pub(super) client_bytes_consumed: u64,
    /// Whether the client socket's receive queue holds no half-read segment.
    pub(super) client_queue_clean: bool,
    /// Bytes a parent proxy sent behind its answer, already written to the client.
    pub(super) from_upstream: u64,
    /// All bytes read from the upstream socket (a parent's answer head and
    /// what followed it).
    pub(super) upstream_bytes_consumed: u64,
}

impl OpenedTunnel {
    /// Connected and answered; `pipelined` bytes of the client's (behind
    /// `head`) went upstream. A parent's bytes are added by
    /// [`relay_from_parent`].
    fn new(
        upstream: TcpStream,
        head: &RequestHead,
        pipelined: u64,
        client_queue_clean: bool,
    ) -> Self {
        Self {
            upstream,
            pipelined,
            client_bytes_consumed: head.head_len as u64 + pipelined,
            client_queue_clean,
            from_upstream: 0,
            upstream_bytes_consumed: 0,
        }
    }
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
