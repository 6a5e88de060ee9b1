//! A `101 Switching Protocols` (a WebSocket upgrade) turns the client's
//! connection and the origin's into a tunnel on the data plane, as a
//! CONNECT's `200` does: hyper gives both sockets back once the `101` is
//! written, the bytes it had already read past the heads are written on, and
//! the data plane moves the rest. The exchange is logged once, when the
//! tunnel ends, with every byte both ways and the plane that ran it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::Rewind;
use crate::{
    access_log::AccessRecord,
    control::{forward_queued_bytes, Active, ControlPlane},
    dataplane::TunnelEnd,
    handover::HandoverRecord,
};

/// The two halves of an upgrade, resolved once hyper lets go of each side.
pub(crate) struct Upgrade {
    /// The client's connection, once the `101` has been written to it.
    pub client: OnUpgrade,
    /// The origin's connection, once its `101` has been read.
    pub upstream: OnUpgrade,
}

/// The exchange's record and its counts so far.
pub(crate) struct Exchange {
    /// The record, complete but for the byte counts, duration, plane and end.
    pub record: AccessRecord,
    /// Bytes of the `101`'s head, as counted for `%<st`.
    pub head_len: u64,
    /// Request body bytes read from the client (none for a WebSocket `GET`).
    pub from_client: Arc<AtomicU64>,
    /// When the request began.
    pub started: Instant,
    /// Bytes of the client's socket that the control plane read before hyper
    /// served the connection (the first request's head and what followed it).
    pub consumed_before: u64,
}

/// The sockets of an upgraded exchange and the bytes hyper read past the heads.
struct Sockets {
    client: TcpStream,
    /// Client bytes read but not yet sent upstream.
    client_leftover: Bytes,
    /// Bytes read from the client's socket in all.
    client_consumed: u64,
    upstream: TcpStream,
    /// Origin bytes read but not yet sent to the client.
    upstream_leftover: Bytes,
    /// Bytes read from the origin's socket in all.
    upstream_consumed: u64,
}

/// Takes the sockets back from hyper's upgraded connections.
fn sockets(client: Upgraded, upstream: Upgraded, consumed_before: u64) -> Result<Sockets, String> {
    let client = client
        .downcast::<TokioIo<Rewind<TcpStream>>>()
        .map_err(|_| "the client's upgraded connection is not its socket".to_owned())?;
    let upstream = upstream
        .downcast::<TokioIo<Rewind<TcpStream>>>()
        .map_err(|_| "the origin's upgraded connection is not its socket".to_owned())?;
    let (client_stream, prefix, read) = client.io.into_inner().into_parts();
    let client_leftover = if prefix.is_empty() {
        client.read_buf
    } else {
        [prefix, client.read_buf].concat().into()
    };
    let (upstream_stream, _, upstream_read) = upstream.io.into_inner().into_parts();
    Ok(Sockets {
        client: client_stream,
        client_leftover,
        client_consumed: consumed_before + read,
        upstream: upstream_stream,
        upstream_leftover: upstream.read_buf,
        upstream_consumed: upstream_read,
    })
}

/// Runs the upgraded exchange on the data plane and logs it when it ends.
pub(crate) async fn run(
    control: Arc<ControlPlane>,
    active: Arc<Active>,
    upgrade: Upgrade,
    exchange: Exchange,
) {
    let Exchange {
        mut record,
        head_len,
        from_client,
        started,
        consumed_before,
    } = exchange;
    record.bytes_to_client = head_len;
    record.bytes_from_client = from_client.load(Ordering::Relaxed);
    let upgraded = tokio::try_join!(upgrade.client, upgrade.upstream)
        .map_err(|err| format!("upgrade failed: {err}"))
        .and_then(|(client, upstream)| sockets(client, upstream, consumed_before));
    let mut sockets = match upgraded {
        Ok(sockets) => sockets,
        Err(reason) => return log_end(&control, record, started, reason),
    };
    // What hyper read past the heads goes on first, then whatever the client
    // has queued (so that no half-read segment is left for the data plane).
    let (to_upstream, to_client) = (
        sockets.client_leftover.len(),
        sockets.upstream_leftover.len(),
    );
    let written = async {
        sockets.upstream.write_all(&sockets.client_leftover).await?;
        sockets.client.write_all(&sockets.upstream_leftover).await?;
        forward_queued_bytes(&sockets.client, &mut sockets.upstream).await
    };
    let queued = match written.await {
        Ok(queued) => queued,
        Err(err) => {
            return log_end(
                &control,
                record,
                started,
                format!("relaying the upgrade: {err}"),
            )
        }
    };
    record.bytes_to_client += to_client as u64;
    record.bytes_from_client += (to_upstream as u64) + queued.bytes;
    let pipelined = record.bytes_from_client;
    let tunnel = control.tunnel(
        (sockets.client, sockets.upstream),
        [
            sockets.client_consumed + queued.bytes,
            sockets.upstream_consumed,
        ],
        queued.clean,
        &active.settings,
        started,
        || HandoverRecord::of(&record, pipelined),
    );
    let ran = control.run_on_plane(tunnel, started, pipelined, None).await;
    let outcome = ran.outcome;
    if outcome.end == TunnelEnd::HandedOver {
        log::info!(
            "upgraded connection {} → {} handed over to the next process",
            record.client,
            record.target
        );
        return;
    }
    record.bytes_to_client += outcome.upstream_to_client;
    record.bytes_from_client += outcome.client_to_upstream;
    record.dataplane = Some(outcome.dataplane);
    record.bytes_before_promotion = ran.before_promotion;
    log_end(&control, record, started, outcome.end.as_str().into());
}

fn log_end(control: &ControlPlane, mut record: AccessRecord, started: Instant, end: String) {
    record.ts = SystemTime::now();
    record.duration_ms = started.elapsed().as_millis() as u64;
    record.end = end;
    control.active().access_log.write(&record);
}
