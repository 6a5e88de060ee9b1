//! Prometheus metrics of the proxy, served on the admin listener's `/metrics`.
//!
//! The control plane and `main.rs` call the small methods of [`Metrics`]
//! (`request_answered`, `tunnel_opened`, …); nothing else touches the
//! Prometheus types. Data planes report bytes while tunnels are open through
//! [`crate::dataplane::Progress`], whose sink is [`Metrics`].
//!
//! Every label takes values from a finite set (statuses, data plane names,
//! tunnel ends, error kinds, the `http_access` lines of the file in force), so
//! the number of series stays bounded.

use std::{fmt::Write as _, time::Duration};

use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use crate::{
    dataplane::{ByteSink, Flow, TunnelOutcome},
    upstream::UpstreamError,
};

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DataplaneLabels {
    dataplane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    dataplane: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    dataplane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    dataplane: &'static str,
}

/// The data planes whose byte counters are looked up without a lock.
const PLANES: [&str; 3] = ["sockmap", "splice", "copy"];

fn direction_label(flow: Flow) -> &'static str {
    match flow {
        Flow::ClientToUpstream => "client_to_upstream",
        Flow::UpstreamToClient => "upstream_to_client",
    }
}

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    tunnels_active: Family<DataplaneLabels, Gauge>,
    tunnels: Family<TunnelLabels, Counter>,
    requests: Family<StatusLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    /// `bytes` of [`PLANES`] by direction, resolved once: a data plane reports
    /// every chunk, and this keeps that to one atomic add.
    plane_bytes: [[Counter; 2]; 3],
    connect_duration: Histogram,
    acl_denials: Family<RuleLabels, Counter>,
    upstream_connect_errors: Family<KindLabels, Counter>,
    dns_duration: Histogram,
    config_reloads: Family<ResultLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spliced");
        let tunnels_active = Family::<DataplaneLabels, Gauge>::default();
        registry.register(
            "tunnels_active",
            "Tunnels open now, by the data plane that was asked to move them",
            tunnels_active.clone(),
        );
        let tunnels = Family::<TunnelLabels, Counter>::default();
        registry.register(
            "tunnels",
            "Tunnels ended, by the data plane that moved them and how they ended",
            tunnels.clone(),
        );
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by HTTP status (200: a tunnel opened)",
            requests.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Tunnel bytes moved by the data planes (open tunnels included)",
            bytes.clone(),
        );
        let plane_bytes = PLANES.map(|dataplane| {
            [Flow::ClientToUpstream, Flow::UpstreamToClient].map(|flow| {
                bytes
                    .get_or_create(&BytesLabels {
                        direction: direction_label(flow),
                        dataplane,
                    })
                    .clone()
            })
        });
        // From 0.5 ms to about 33 s.
        let connect_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        registry.register_with_unit(
            "connect_duration",
            "From accepting a client to writing its 200 (CONNECT latency)",
            Unit::Seconds,
            connect_duration.clone(),
        );
        let acl_denials = Family::<RuleLabels, Counter>::default();
        registry.register(
            "acl_denials",
            "Requests denied (403), by the rule that denied them: FILE:LINE, implicit or builtin:REASON",
            acl_denials.clone(),
        );
        let upstream_connect_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_connect_errors",
            "Requests that got no upstream connection, by why",
            upstream_connect_errors.clone(),
        );
        for kind in UpstreamError::KINDS {
            let _ = upstream_connect_errors.get_or_create(&KindLabels { kind });
        }
        let dns_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "dns_duration",
            "Name resolutions of CONNECT targets, successful or not",
            Unit::Seconds,
            dns_duration.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            config_reloads.clone(),
        );
        for result in ["success", "failure"] {
            let _ = config_reloads.get_or_create(&ResultLabels { result });
        }
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1: the version and the data plane in use",
            build_info.clone(),
        );
        Self {
            registry,
            tunnels_active,
            tunnels,
            requests,
            bytes,
            plane_bytes,
            connect_duration,
            acl_denials,
            upstream_connect_errors,
            dns_duration,
            config_reloads,
            build_info,
        }
    }

    /// The data plane is chosen (`auto`, or the one plane) and may run tunnels
    /// on `planes`: sets `build_info` and shows each plane's active tunnels.
    pub fn dataplane_chosen(&self, dataplane: &'static str, planes: &[&'static str]) {
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                dataplane,
            })
            .set(1);
        for &dataplane in planes {
            let _ = self
                .tunnels_active
                .get_or_create(&DataplaneLabels { dataplane });
        }
    }

    /// A request got an answer with `status` (200 when a tunnel opened).
    pub fn request_answered(&self, status: u16) {
        self.requests.get_or_create(&StatusLabels { status }).inc();
    }

    /// A tunnel opened `latency` after its client was accepted; `dataplane` gets
    /// it. The control plane already forwarded `pipelined` bytes of it upstream
    /// (sent with or right after the request head): they count as the tunnel's.
    pub fn tunnel_opened(&self, dataplane: &'static str, latency: Duration, pipelined: u64) {
        self.connect_duration.observe(latency.as_secs_f64());
        self.moved(dataplane, Flow::ClientToUpstream, pipelined);
        self.tunnels_active
            .get_or_create(&DataplaneLabels { dataplane })
            .inc();
    }

    /// A tunnel that [`Metrics::tunnel_opened`] counted for `dataplane` ended.
    /// Its bytes are not counted here: see [`crate::dataplane::Progress::finish`].
    pub fn tunnel_closed(&self, dataplane: &'static str, outcome: &TunnelOutcome) {
        self.tunnels_active
            .get_or_create(&DataplaneLabels { dataplane })
            .dec();
        self.tunnels
            .get_or_create(&TunnelLabels {
                dataplane: outcome.dataplane,
                result: outcome.end.as_str(),
            })
            .inc();
    }

    /// The access policy denied a request by `rule`.
    pub fn acl_denied(&self, rule: &str) {
        self.acl_denials
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// No upstream connection was made.
    pub fn upstream_failed(&self, err: &UpstreamError) {
        self.upstream_connect_errors
            .get_or_create(&KindLabels { kind: err.kind() })
            .inc();
    }

    /// A name resolution took `took`.
    pub fn dns_resolved(&self, took: Duration) {
        self.dns_duration.observe(took.as_secs_f64());
    }

    /// A configuration reload succeeded or failed.
    pub fn config_reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Every metric in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = text::encode(&mut out, &self.registry) {
            let _ = writeln!(out, "# encoding failed: {err}");
        }
        out
    }
}

impl ByteSink for Metrics {
    fn moved(&self, dataplane: &'static str, flow: Flow, bytes: u64) {
        match PLANES.iter().position(|&plane| plane == dataplane) {
            Some(index) => {
                self.plane_bytes[index][flow as usize].inc_by(bytes);
            }
            None => {
                self.bytes
                    .get_or_create(&BytesLabels {
                        direction: direction_label(flow),
                        dataplane,
                    })
                    .inc_by(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dataplane::{Progress, TunnelEnd};

    fn sample(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn progress_then_outcome_counts_each_byte_once() {
        let metrics = Arc::new(Metrics::new());
        let progress = Progress::new(metrics.clone());
        // sockmap polls its cumulative counters, then falls back to splice, which
        // reports chunks; the outcome covers both.
        progress.advance_to("sockmap", [100, 50]);
        progress.advance_to("sockmap", [80, 60]);
        progress.add("splice", Flow::ClientToUpstream, 1000);
        progress.finish(&TunnelOutcome {
            client_to_upstream: 1200,
            upstream_to_client: 70,
            dataplane: "splice",
            end: TunnelEnd::Closed,
        });
        assert_eq!(progress.reported(), [1200, 70]);
        let text = metrics.encode();
        let bytes = |direction: &str, dataplane: &str| {
            sample(
                &text,
                &format!(
                    "spliced_bytes_total{{direction=\"{direction}\",dataplane=\"{dataplane}\"}}"
                ),
            )
        };
        assert_eq!(bytes("client_to_upstream", "sockmap"), 100);
        assert_eq!(bytes("upstream_to_client", "sockmap"), 60);
        assert_eq!(bytes("client_to_upstream", "splice"), 1100);
        assert_eq!(bytes("upstream_to_client", "splice"), 10);
    }

    #[test]
    fn every_metric_is_exposed() {
        let metrics = Metrics::new();
        metrics.dataplane_chosen("copy", &["copy"]);
        metrics.request_answered(403);
        metrics.acl_denied("/etc/squid/squid.conf:12");
        metrics.tunnel_opened("copy", Duration::from_millis(3), 5);
        metrics.tunnel_closed(
            "copy",
            &TunnelOutcome {
                client_to_upstream: 0,
                upstream_to_client: 0,
                dataplane: "copy",
                end: TunnelEnd::IdleTimeout,
            },
        );
        metrics.config_reloaded(false);
        let text = metrics.encode();
        for series in [
            "spliced_tunnels_active{dataplane=\"copy\"} 0",
            "spliced_tunnels_total{dataplane=\"copy\",result=\"idle_timeout\"} 1",
            "spliced_requests_total{status=\"403\"} 1",
            "spliced_bytes_total{direction=\"client_to_upstream\",dataplane=\"copy\"} 5",
            "spliced_connect_duration_seconds_count 1",
            "spliced_acl_denials_total{rule=\"/etc/squid/squid.conf:12\"} 1",
            "spliced_upstream_connect_errors_total{kind=\"refused\"} 0",
            "spliced_dns_duration_seconds_count 0",
            "spliced_config_reloads_total{result=\"failure\"} 1",
            concat!(
                "spliced_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\",dataplane=\"copy\"} 1"
            ),
        ] {
            assert!(text.contains(series), "no {series} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
