//! Plain-HTTP forwarding: a client that uses spliced as `HTTP_PROXY` sends
//! `GET http://host/path HTTP/1.1`; the connection is then served by hyper's
//! HTTP/1 server (keep-alive, HTTP/1.0 and 1.1 clients) from its first byte
//! (the head the control plane already read is replayed through [`Rewind`]).
//!
//! Every request on the connection is judged by the policy CONNECT uses
//! (`control::Judge`), sent upstream in origin form on a pooled connection
//! ([`Pool`]) with its hop-by-hop fields removed and `Via` /
//! `X-Forwarded-For` written ([`headers`]), and its answer streamed back and
//! logged as `TCP_MISS` ([`body`]). Nothing is cached. `https://` in absolute
//! form is answered 501: spliced never originates TLS.

pub mod body;
pub mod headers;
pub mod pool;
pub mod rewind;
pub mod target;
mod upgrade;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
    HeaderMap, Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use self::{
    body::{CountingBody, LoggedBody},
    headers::{ForwardedFor, HeaderPolicy},
    pool::Pool,
    rewind::Rewind,
    target::{is_absolute, AbsoluteTarget, TargetError},
};
use crate::{
    access_log::AccessRecord,
    connect_request::RequestHead,
    control::{error_body, reason_phrase, Active, ControlPlane, Judge, Refusal},
    parents::{self, handshake},
    settings::Policy,
    squid::{self, Route},
};

/// How long a connection being closed (shutdown, `client_lifetime`) may take
/// to finish the answer in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One client connection.
struct Connection {
    control: Arc<ControlPlane>,
    active: Arc<Active>,
    /// The client's and proxy's addresses, as each record logs them.
    base: AccessRecord,
    /// Bytes of the client's socket the control plane read before hyper
    /// served the connection.
    consumed_before: u64,
    /// Upgraded exchanges running as tunnels: the connection lasts (and is
    /// counted, for `client_ip_max_connections` and the drain) until they end.
    upgrades: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Serves the client connection whose first request head is `head` (already
/// read from `client`) until the client closes, the proxy drains (SIGTERM: the
/// answer in flight is finished, an idle connection closed at once) or shuts
/// down, or `client_lifetime` is over. `base` is the connection's record so far
/// (addresses); each request gets its own record. `read_before_head` is
/// what was read from `client` before the head (a PROXY protocol header).
pub(crate) async fn serve(
    control: Arc<ControlPlane>,
    active: Arc<Active>,
    (client, read_before_head): (TcpStream, u64),
    head: RequestHead,
    base: AccessRecord,
) {
    let _ = client.set_nodelay(true);
    let mut prefix = head.raw;
    prefix.extend_from_slice(&head.pipelined);
    let request_timeout = active.settings.request_timeout;
    let lifetime = active.settings.client_lifetime;
    let connection = Arc::new(Connection {
        control,
        active,
        base,
        consumed_before: read_before_head + prefix.len() as u64,
        upgrades: Mutex::default(),
    });
    serve_requests(
        connection.clone(),
        client,
        prefix,
        request_timeout,
        lifetime,
    )
    .await;
    let upgrades = std::mem::take(
        &mut *connection
            .upgrades
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for upgrade in upgrades {
        let _ = upgrade.await;
    }
}

/// Serves requests on the connection with hyper until it ends.
async fn serve_requests(
    connection: Arc<Connection>,
    client: TcpStream,
    prefix: Vec<u8>,
    request_timeout: Duration,
    lifetime: Duration,
) {
    let mut closing = connection.control.closing();
    let mut draining = connection.control.draining();
    let service = service_fn(move |request| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.forward(request).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(Rewind::new(prefix, client)), service)
        .with_upgrades();
    tokio::pin!(served);
    let drain = tokio::select! {
        result = served.as_mut() => {
            if let Err(err) = result {
                log::debug!("plain-HTTP client connection: {err}");
            }
            return;
        }
        _ = draining.wait_for(|draining| *draining) => true,
        _ = closing.wait_for(|closing| *closing) => false,
        () = tokio::time::sleep(lifetime) => false,
    };
    // Idle now: closed at once; answering: closed after the answer.
    served.as_mut().graceful_shutdown();
    if drain {
        // SIGTERM: the answer in flight may take until shutdown_lifetime.
        tokio::select! {
            _ = served.as_mut() => return,
            _ = closing.wait_for(|closing| *closing) => {}
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
}

impl Connection {
    /// The header directives in force.
    fn header_policy(&self) -> HeaderPolicy {
        match &self.active.settings.policy {
            Policy::Squid(squid) => squid.headers,
            Policy::Builtin(_) => HeaderPolicy::default(),
        }
    }

    /// Forwards one request and answers it (an error answer if it could not
    /// be forwarded). The record is written when the answer's body ends.
    async fn forward(self: Arc<Self>, request: Request<Incoming>) -> Response<LoggedBody> {
        let started = Instant::now();
        let record = AccessRecord {
            ts: SystemTime::now(),
            method: request.method().as_str().to_owned(),
            target: request.uri().to_string(),
            status: 0,
            result: "NONE_NONE",
            hierarchy: "HIER_NONE",
            upstream: None,
            user: None,
            end: String::new(),
            mime_type: None,
            peer: None,
            ..self.base.clone()
        };
        let from_client = Arc::new(AtomicU64::new(0));
        let mut unanswered = Unanswered {
            record: Some(record),
            control: self.control.clone(),
            started,
        };
        let exchanged = {
            let record = unanswered.record.as_mut().expect("taken only below");
            self.exchange(request, record, &from_client).await
        };
        let mut record = unanswered.record.take().expect("taken only here");
        let pending = |record, head_len| body::Pending {
            record,
            head_len,
            from_client: from_client.clone(),
            started,
            control: self.control.clone(),
            idle: self.active.settings.read_timeout,
        };
        match exchanged {
            Ok((response, upgrade)) => {
                let (mut parts, incoming) = response.into_parts();
                let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
                headers::prepare_response(
                    &mut parts.headers,
                    parts.version,
                    self.header_policy().via,
                    switching,
                );
                parts.version = Version::HTTP_11;
                record.status = parts.status.as_u16();
                record.result = "TCP_MISS";
                record.mime_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(';').next())
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty());
                self.control.metrics().request_answered(record.status);
                let head_len = head_length(parts.status, &parts.headers);
                let body = match upgrade {
                    Some(upgrade) if switching => {
                        let exchange = upgrade::Exchange {
                            record,
                            head_len,
                            from_client: from_client.clone(),
                            started,
                            consumed_before: self.consumed_before,
                        };
                        let task = tokio::spawn(upgrade::run(
                            self.control.clone(),
                            self.active.clone(),
                            upgrade,
                            exchange,
                        ));
                        self.upgrades
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(task);
                        LoggedBody::unlogged(incoming, self.active.settings.read_timeout)
                    }
                    _ => LoggedBody::upstream(incoming, pending(record, head_len)),
                };
                Response::from_parts(parts, body)
            }
            Err(refusal) => {
                record.result = refusal.result;
                record.status = refusal.status;
                record.end.clone_from(&refusal.reason);
                record.mime_type = Some("text/plain".into());
                if let Some(rule) = &refusal.rule {
                    self.control.metrics().acl_denied(rule);
                }
                self.control.metrics().request_answered(refusal.status);
                let body = Bytes::from(error_body(&refusal));
                let mut fields = HeaderMap::new();
                fields.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                fields.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                // Like CONNECT's error answers: the connection ends after it.
                fields.insert(header::CONNECTION, HeaderValue::from_static("close"));
                for line in refusal.headers.split("\r\n") {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.trim().as_bytes()),
                        HeaderValue::from_str(value.trim()),
                    ) {
                        fields.append(name, value);
                    }
                }
                let status = StatusCode::from_u16(refusal.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let head_len = head_length(status, &fields);
                let mut answer = Response::new(LoggedBody::fixed(body, pending(record, head_len)));
                *answer.status_mut() = status;
                *answer.headers_mut() = fields;
                answer
            }
        }
    }

    /// Judges `request`, connects (or reuses a connection) and sends it
    /// upstream; returns the origin's answer.
    async fn exchange(
        &self,
        mut request: Request<Incoming>,
        record: &mut AccessRecord,
        from_client: &Arc<AtomicU64>,
    ) -> Result<(Response<Incoming>, Option<upgrade::Upgrade>), Refusal> {
        let settings = &self.active.settings;
        let target = target::parse(request.uri()).map_err(|err| match err {
            TargetError::Https => Refusal::new(501, err.to_string()),
            _ => Refusal::new(400, err.to_string()),
        })?;
        record.target.clone_from(&target.url);
        let method = request.method().as_str().to_owned();
        let credentials = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let client = (self.base.client.ip(), self.base.local);
        let judge = Judge::for_request(
            settings,
            self.control.authenticator(),
            client,
            &method,
            &target.target,
            credentials.as_deref(),
        )
        .await?;
        record.user.clone_from(&judge.user);
        judge.decide(None)?;
        // Straight to the origin, or through parents (`parents`).
        let hierarchical = squid::is_hierarchical(
            &method,
            request.headers().contains_key(header::AUTHORIZATION),
        );
        let routes = parents::routes(
            &self.control,
            settings,
            &judge,
            &target.target,
            hierarchical,
        )
        .await;
        if routes.iter().any(|route| route.peer.is_some()) {
            parents::check_destination(&self.control, settings, &judge, &target.target).await?;
        }
        let mut routes = routes.iter();
        let mut route = routes.next().ok_or_else(parents::no_route)?;

        let client_upgrade = headers::is_websocket_upgrade(request.headers())
            .then(|| hyper::upgrade::on(&mut request));
        let (mut parts, incoming) = request.into_parts();
        headers::prepare_request(
            &mut parts.headers,
            parts.version,
            &target.authority,
            self.base.client.ip(),
            self.header_policy(),
        );
        let bad_target = |err: hyper::http::uri::InvalidUri| {
            Refusal::new(400, format!("bad request target: {err}"))
        };
        let origin_form: hyper::Uri = target.origin_form.parse().map_err(bad_target)?;
        // A parent gets the request in absolute form.
        let absolute_form: hyper::Uri = target.url.parse().map_err(bad_target)?;
        parts.uri = origin_form.clone();
        parts.version = Version::HTTP_11;
        let mut outgoing = Request::from_parts(
            parts,
            CountingBody::new(incoming, from_client.clone(), settings.read_timeout),
        );

        let pool = self.control.http_pool();
        let take = |route: &Route| {
            let peer = parents::peer_of(settings, route);
            // A parent's address is not the destination `dst` judges.
            pool.take(&parents::pool_key(peer, &target.target), |addr| {
                !self.control.is_own(addr)
                    && (peer.is_some()
                        || !judge.needs_destination()
                        || judge.decide(Some(addr.ip())).is_ok())
            })
        };
        let mut pooled = take(route);
        loop {
            let reused = pooled.is_some();
            let peer = parents::peer_of(settings, route);
            let (addr, mut sender) = match pooled.take() {
                Some(conn) => conn,
                None => {
                    let connected = match peer {
                        Some(peer) => parents::connect_parent(&self.control, settings, peer).await,
                        None => {
                            self.control
                                .connect_upstream(settings, &judge, &target.target)
                                .await
                        }
                    };
                    let (stream, addr) = match connected {
                        Ok(connected) => connected,
                        // Squid's failover: the next route, unless denied.
                        Err(refusal) => match routes.next() {
                            Some(next) if refusal.result != "TCP_DENIED" => {
                                route = next;
                                pooled = take(route);
                                continue;
                            }
                            _ => return Err(refusal),
                        },
                    };
                    let _ = stream.set_nodelay(true);
                    let sender = pool::handshake(stream)
                        .await
                        .map_err(|err| Refusal::new(502, format!("upstream handshake: {err}")))?;
                    (addr, sender)
                }
            };
            record.upstream = Some(addr);
            record.hierarchy = route.code.as_str();
            record.peer = peer.map(|peer| peer.name.clone());
            *outgoing.uri_mut() = if peer.is_some() {
                absolute_form.clone()
            } else {
                origin_form.clone()
            };
            outgoing.headers_mut().remove(header::PROXY_AUTHORIZATION);
            if let Some(login) = peer.and_then(|peer| peer.login.as_deref()) {
                if let Ok(value) = HeaderValue::from_str(&handshake::basic_credentials(login)) {
                    outgoing
                        .headers_mut()
                        .insert(header::PROXY_AUTHORIZATION, value);
                }
            }
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(Refusal::new(502, "upstream connection closed"));
            }
            let sent = without_progress(
                settings.read_timeout,
                from_client,
                sender.try_send_request(outgoing),
            )
            .await;
            match sent {
                Err(_) => {
                    return Err(Refusal::new(
                        504,
                        format!(
                            "no answer from upstream for {:?} (read_timeout)",
                            settings.read_timeout
                        ),
                    ))
                }
                Ok(Ok(mut response)) => {
                    let mut upgrade = None;
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        upgrade = client_upgrade.map(|client| upgrade::Upgrade {
                            client,
                            upstream: hyper::upgrade::on(&mut response),
                        });
                    } else {
                        pool.put_when_ready(parents::pool_key(peer, &target.target), addr, sender);
                    }
                    return Ok((response, upgrade));
                }
                Ok(Err(mut err)) => match err.take_message() {
                    // A reused connection the origin had closed: the request was
                    // not sent, so it goes on a new connection.
                    Some(unsent) if reused => outgoing = unsent,
                    _ => return Err(Refusal::new(502, format!("upstream: {}", err.error()))),
                },
            }
        }
    }
}

/// `sending`, or `Err` once `idle` passed with neither an answer nor a
/// request body byte going upstream (a long upload is not a stalled origin).
async fn without_progress<T>(
    idle: Duration,
    from_client: &AtomicU64,
    sending: impl std::future::Future<Output = T>,
) -> Result<T, ()> {
    tokio::pin!(sending);
    let mut seen = from_client.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(idle, &mut sending).await {
            Ok(done) => return Ok(done),
            Err(_) => {
                let now = from_client.load(Ordering::Relaxed);
                if now == seen {
                    return Err(());
                }
                seen = now;
            }
        }
    }
}

/// A request's record while it has no answer yet: written (end
/// `client_closed_before_answer`) if hyper drops the request because the
/// client went away.
struct Unanswered {
    record: Option<AccessRecord>,
    control: Arc<ControlPlane>,
    started: Instant,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.status = 0;
            record.ts = SystemTime::now();
            record.duration_ms = self.started.elapsed().as_millis() as u64;
            record.end = "client_closed_before_answer".into();
            self.control.active().access_log.write(&record);
        }
    }
}

/// The size of a response head as hyper writes it: status line, fields, the
/// `date` field hyper adds when there is none, and the empty line.
fn head_length(status: StatusCode, fields: &hyper::HeaderMap) -> u64 {
    let status_line = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status
            .canonical_reason()
            .unwrap_or_else(|| reason_phrase(status.as_u16()))
    );
    let fields_len: usize = fields
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    let date = if fields.contains_key(header::DATE) {
        0
    } else {
        "date: Thu, 01 Jan 1970 00:00:00 GMT\r\n".len()
    };
    (status_line.len() + fields_len + date + 2) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_length_counts_what_hyper_writes() {
        let mut fields = HeaderMap::new();
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from(5usize));
        // "HTTP/1.1 200 OK\r\n" + "content-length: 5\r\n" + date line + "\r\n"
        assert_eq!(head_length(StatusCode::OK, &fields), 17 + 19 + 37 + 2);
        fields.insert(header::DATE, HeaderValue::from_static("x"));
        assert_eq!(head_length(StatusCode::OK, &fields), 17 + 19 + 9 + 2);
    }

    #[tokio::test]
    async fn only_a_wait_without_progress_times_out() {
        let idle = Duration::from_millis(50);
        let still = AtomicU64::new(0);
        assert!(without_progress(idle, &still, std::future::pending::<()>())
            .await
            .is_err());
        let moving = Arc::new(AtomicU64::new(0));
        let ticks = moving.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        });
        let slow_answer = tokio::time::sleep(Duration::from_millis(200));
        assert!(without_progress(idle, &moving, slow_answer).await.is_ok());
        ticker.abort();
    }
}
