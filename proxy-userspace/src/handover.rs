//! The control plane's side of tunnels handed from one spliced process to the
//! next (the packet plane with `--packet-state-dir`): what a tunnel carries so
//! that another process can log it ([`HandoverRecord`]), and following an
//! adopted tunnel to its access-log record ([`follow_adopted`]).
//!
//! The data plane stores the record opaquely beside the tunnel's flow and
//! gives it back at the next start as an [`AdoptedTunnel`]; the control plane
//! treats it as one of its own tunnels from then on: it counts as an open
//! connection, is subject to `read_timeout`, `client_lifetime` and the
//! shutdown, and ends in the same access-log record.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    access_log::{AccessRecord, BytesBeforePromotion},
    control::{ControlPlane, CONNECT_OK},
    dataplane::{AdoptedContext, AdoptedTunnel, PlaneKind, Progress, TunnelEnd, TunnelLimits},
};

/// A tunnel's request, as the next process needs it to log the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRecord {
    /// When the client connected, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// See [`AccessRecord::client`].
    pub client: SocketAddr,
    /// See [`AccessRecord::local`].
    pub local: Option<SocketAddr>,
    /// See [`AccessRecord::target`].
    pub target: String,
    /// See [`AccessRecord::hierarchy`].
    pub hierarchy: String,
    /// See [`AccessRecord::upstream`].
    pub upstream: Option<SocketAddr>,
    /// See [`AccessRecord::user`].
    pub user: Option<String>,
    /// Bytes received from the client after the head, before the data plane
    /// took the tunnel (pipelined).
    pub pipelined: u64,
    /// See [`AccessRecord::sni`].
    #[serde(default)]
    pub sni: Option<String>,
    /// See [`AccessRecord::peer`].
    #[serde(default)]
    pub peer: Option<String>,
}

/// Hierarchy codes as the access record spells them.
const HIERARCHY_CODES: [&str; 5] = [
    "HIER_DIRECT",
    "HIER_NONE",
    "FIRSTUP_PARENT",
    "ANY_OLD_PARENT",
    "DEFAULT_PARENT",
];

impl HandoverRecord {
    /// The record of a tunnel about to be handed to the data plane.
    pub fn of(record: &AccessRecord, pipelined: u64) -> Self {
        Self {
            started_ms: millis(record.ts),
            client: record.client,
            local: record.local,
            target: record.target.clone(),
            hierarchy: record.hierarchy.to_owned(),
            upstream: record.upstream,
            user: record.user.clone(),
            pipelined,
            sni: record.sni.clone(),
            peer: record.peer.clone(),
        }
    }

    /// As bytes for [`crate::dataplane::Tunnel::handover`].
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The record of an adopted tunnel: the stored one, or one made of the
    /// flow's addresses if none was stored (or it does not parse).
    fn of_adopted(adopted: &AdoptedTunnel) -> Self {
        serde_json::from_slice(&adopted.handover).unwrap_or_else(|_| Self {
            started_ms: millis(SystemTime::now()),
            client: adopted.client.0,
            local: Some(adopted.client.1),
            target: adopted.upstream.to_string(),
            hierarchy: "HIER_DIRECT".into(),
            upstream: Some(adopted.upstream),
            user: None,
            pipelined: 0,
            sni: None,
            peer: None,
        })
    }

    fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_ms)
    }

    /// The access record of the tunnel, before its end is known.
    fn access_record(&self) -> AccessRecord {
        AccessRecord {
            ts: SystemTime::now(),
            duration_ms: 0,
            client: self.client,
            local: self.local,
            method: "CONNECT".into(),
            target: self.target.clone(),
            status: 200,
            result: "TCP_TUNNEL",
            hierarchy: HIERARCHY_CODES
                .into_iter()
                .find(|code| *code == self.hierarchy)
                .unwrap_or("HIER_DIRECT"),
            upstream: self.upstream,
            user: self.user.clone(),
            bytes_to_client: CONNECT_OK.len() as u64,
            bytes_from_client: self.pipelined,
            dataplane: Some(PlaneKind::Packet),
            bytes_before_promotion: None,
            sni: self.sni.clone(),
            peer: self.peer.clone(),
            mime_type: None,
            end: String::new(),
        }
    }
}

fn millis(ts: SystemTime) -> u64 {
    ts.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Follows a tunnel a previous process handed over to its end and writes its
/// access-log record (duration and bytes from the start of the tunnel, in the
/// previous process).
pub async fn follow_adopted(control: Arc<ControlPlane>, adopted: AdoptedTunnel) {
    let request = HandoverRecord::of_adopted(&adopted);
    let mut record = request.access_record();
    let settings = control.active().settings.clone();
    let (_guard, _within_limit) = control.admit(request.client.ip(), None);
    let age = SystemTime::now()
        .duration_since(request.started())
        .unwrap_or_default();
    let progress = Progress::new(control.metrics().clone());
    let context = AdoptedContext {
        limits: TunnelLimits {
            idle: settings.read_timeout,
            lifetime: settings.client_lifetime.saturating_sub(age),
        },
        shutdown: control.closing(),
        draining: control.draining(),
        progress: progress.clone(),
    };
    control.metrics().tunnel_adopted(PlaneKind::Packet);
    let run = adopted.run;
    let outcome = run(context).await;
    progress.finish(&outcome);
    control.metrics().tunnel_closed(PlaneKind::Packet, &outcome);
    if outcome.end == TunnelEnd::HandedOver {
        return;
    }
    record.bytes_to_client += outcome.upstream_to_client;
    record.bytes_from_client += outcome.client_to_upstream;
    record.bytes_before_promotion = progress
        .bytes_before_promotion()
        .map(BytesBeforePromotion::from);
    record.end = outcome.end.as_str().into();
    record.ts = SystemTime::now();
    record.duration_ms = SystemTime::now()
        .duration_since(request.started())
        .map_or(0, |d| d.as_millis() as u64);
    control.active().access_log.write(&record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_and_a_missing_one_is_made_from_addresses() {
        let stored = HandoverRecord {
            started_ms: 1_700_000_000_123,
            client: "10.0.0.2:40000".parse().unwrap(),
            local: Some("10.0.0.1:3128".parse().unwrap()),
            target: "example.com:443".into(),
            hierarchy: "FIRSTUP_PARENT".into(),
            upstream: Some("203.0.113.5:3128".parse().unwrap()),
            user: Some("alice".into()),
            pipelined: 517,
            sni: Some("example.com".into()),
            peer: Some("corp".into()),
        };
        let adopted = |handover: Vec<u8>| AdoptedTunnel {
            handover,
            client: (
                "10.0.0.2:40000".parse().unwrap(),
                "10.0.0.1:3128".parse().unwrap(),
            ),
            upstream: "203.0.113.5:443".parse().unwrap(),
            before_promotion: [0, 0],
            run: Box::new(|_| unreachable!()),
        };
        assert_eq!(
            HandoverRecord::of_adopted(&adopted(stored.to_bytes())),
            stored
        );
        // A parent's route survives the hand-over.
        let record = stored.access_record();
        assert_eq!(
            (record.hierarchy, record.peer.as_deref()),
            ("FIRSTUP_PARENT", Some("corp"))
        );
        let made = HandoverRecord::of_adopted(&adopted(Vec::new()));
        assert_eq!(made.target, "203.0.113.5:443");
        let record = made.access_record();
        assert_eq!(
            (record.method.as_str(), record.status, record.result),
            ("CONNECT", 200, "TCP_TUNNEL")
        );
        assert_eq!(record.bytes_to_client, CONNECT_OK.len() as u64);
    }
}
