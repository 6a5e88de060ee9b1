//! A client connection from accept to its record: admission, the request,
//! the tunnel on the data plane (or plain HTTP), and the access-log line.

use super::*;

impl ControlPlane {
    pub(super) async fn handle(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) {
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
                opened = self.open_tunnel(settings, &mut client, &mut record, started, read) => opened,
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
                self.metrics.request_answered(200);
                record.status = 200;
                record.result = "TCP_TUNNEL";
                let ran = self
                    .run_on_plane(tunnel, started, opened.pipelined, Some((settings, &record)))
                    .await;
                let outcome = ran.outcome;
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
                record.bytes_before_promotion = ran.before_promotion;
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

    /// Runs `tunnel` on the plane the data plane picks for it, counted in the
    /// metrics (opened after `pipelined` bytes, `started` ago; closed); with
    /// `periodic` (the settings and the record so far of a CONNECT tunnel),
    /// as [`Self::run_tunnel`] does.
    pub(crate) async fn run_on_plane(
        &self,
        tunnel: Tunnel,
        started: Instant,
        pipelined: u64,
        periodic: Option<(&Settings, &AccessRecord)>,
    ) -> Ran {
        let progress = tunnel.progress.clone();
        let (plane_kind, plane) = self.dataplane.pick(&tunnel);
        self.metrics
            .tunnel_opened(plane_kind, started.elapsed(), pipelined);
        let outcome = match periodic {
            Some((settings, record)) => {
                self.run_tunnel(
                    (plane_kind, plane),
                    tunnel,
                    settings,
                    record,
                    pipelined,
                    started,
                )
                .await
            }
            None => plane.run(tunnel).await,
        };
        progress.finish(&outcome);
        self.metrics.tunnel_closed(plane_kind, &outcome);
        Ran {
            outcome,
            before_promotion: progress
                .bytes_before_promotion()
                .map(BytesBeforePromotion::from),
        }
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
}

/// How a tunnel ended on its data plane, for its record.
pub(crate) struct Ran {
    /// What the plane moved and how the tunnel ended.
    pub(crate) outcome: TunnelOutcome,
    /// What the packet plane's pump moved before promotion, if promoted.
    pub(crate) before_promotion: Option<BytesBeforePromotion>,
}
