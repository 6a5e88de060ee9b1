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

use std::{
    fmt::Write as _,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::{Registry, Unit},
};

use crate::{
    auth_check::metrics::AuthMetrics,
    dataplane::{ByteSink, DataPlane, Direction, PlaneKind, TunnelOutcome},
    dns::DnsMetrics,
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

/// A parent proxy (its `cache_peer` name: the file bounds them) and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParentLabels {
    peer: String,
    result: &'static str,
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
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    dataplane: &'static str,
}

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    tunnels_active: Family<DataplaneLabels, Gauge>,
    tunnels: Family<TunnelLabels, Counter>,
    requests: Family<StatusLabels, Counter>,
    /// `bytes` by plane ([`PlaneKind::ALL`]) and direction, resolved once: a
    /// data plane reports every chunk, and this keeps that to one atomic add.
    plane_bytes: [[Counter; 2]; 4],
    connect_duration: Histogram,
    acl_denials: Family<RuleLabels, Counter>,
    tls_refusals: Family<ReasonLabels, Counter>,
    proxy_protocol_refusals: Family<ReasonLabels, Counter>,
    proxy_protocol_headers: Family<VersionLabels, Counter>,
    upstream_connect_errors: Family<KindLabels, Counter>,
    parent_connections: Family<ParentLabels, Counter>,
    dns_duration: Histogram,
    /// The resolver's counters (`spliced_dns_…`).
    pub dns: DnsMetrics,
    config_reloads: Family<ResultLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    auth: AuthMetrics,
    /// The data plane whose kernel counters `/metrics` shows.
    plane: Arc<OnceLock<Arc<dyn DataPlane>>>,
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
        let plane_bytes = PlaneKind::ALL.map(|dataplane| {
            Direction::BOTH.map(|direction| {
                bytes
                    .get_or_create(&BytesLabels {
                        direction: direction.as_str(),
                        dataplane: dataplane.as_str(),
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
        let tls_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_refusals",
            "Tunnels closed by the TLS name policy after peeking at their first bytes, by reason: terminate (an ssl_bump rule), sni_mismatch (sni_must_match_connect), not_tls, timeout, too_large, malformed, closed_early, io",
            tls_refusals.clone(),
        );
        let proxy_protocol_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "proxy_protocol_refusals",
            "Connections to a require-proxy-header port closed before any request, by reason: not_allowed (proxy_protocol_access), missing, malformed, too_long, timeout, closed_early, io, shutdown",
            proxy_protocol_refusals.clone(),
        );
        for reason in crate::proxy_protocol::ProxyHeaderError::REASONS {
            let _ = proxy_protocol_refusals.get_or_create(&ReasonLabels { reason });
        }
        let proxy_protocol_headers = Family::<VersionLabels, Counter>::default();
        registry.register(
            "proxy_protocol_headers",
            "PROXY protocol headers accepted, by version (v1, v2)",
            proxy_protocol_headers.clone(),
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
        let parent_connections = Family::<ParentLabels, Counter>::default();
        registry.register(
            "parent_connections",
            "Connections to parent proxies (cache_peer), by peer and result: connected, failed (no connection, or no answer to CONNECT), refused (a CONNECT answered with another status than 2xx)",
            parent_connections.clone(),
        );
        let dns_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "dns_duration",
            "Name resolutions of CONNECT targets, successful or not",
            Unit::Seconds,
            dns_duration.clone(),
        );
        let dns = DnsMetrics::register(&mut registry);
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
        let auth = AuthMetrics::register(&mut registry);
        let plane = Arc::default();
        registry.register_collector(Box::new(KernelCounters {
            plane: Arc::clone(&plane),
        }));
        Self {
            registry,
            tunnels_active,
            tunnels,
            requests,
            plane_bytes,
            connect_duration,
            acl_denials,
            tls_refusals,
            proxy_protocol_refusals,
            proxy_protocol_headers,
            upstream_connect_errors,
            parent_connections,
            dns_duration,
            dns,
            config_reloads,
            build_info,
            auth,
            plane,
        }
    }

    /// The `spliced_auth_…` metrics.
    pub fn auth(&self) -> &AuthMetrics {
        &self.auth
    }

    /// The data plane is chosen (`auto`, or the one plane): sets `build_info`,
    /// shows the active tunnels of each plane it may run them on, and from now
    /// on exports its kernel counters.
    pub fn dataplane_chosen(&self, plane: Arc<dyn DataPlane>) {
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                dataplane: plane.name().as_str(),
            })
            .set(1);
        for kind in plane.planes() {
            let _ = self.tunnels_active.get_or_create(&DataplaneLabels {
                dataplane: kind.as_str(),
            });
        }
        let _ = self.plane.set(plane);
    }

    /// A request got an answer with `status` (200 when a tunnel opened).
    pub fn request_answered(&self, status: u16) {
        self.requests.get_or_create(&StatusLabels { status }).inc();
    }

    /// A tunnel opened `latency` after its client was accepted; `dataplane` gets
    /// it. The control plane already forwarded `pipelined` bytes of it upstream
    /// (sent with or right after the request head): they count as the tunnel's.
    pub fn tunnel_opened(&self, dataplane: PlaneKind, latency: Duration, pipelined: u64) {
        self.connect_duration.observe(latency.as_secs_f64());
        self.moved(dataplane, Direction::ClientToUpstream, pipelined);
        self.tunnels_active
            .get_or_create(&DataplaneLabels {
                dataplane: dataplane.as_str(),
            })
            .inc();
    }

    /// A tunnel a previous process opened is followed here from now on.
    pub fn tunnel_adopted(&self, dataplane: PlaneKind) {
        self.tunnels_active
            .get_or_create(&DataplaneLabels {
                dataplane: dataplane.as_str(),
            })
            .inc();
    }

    /// A tunnel that [`Metrics::tunnel_opened`] counted for `dataplane` ended.
    /// Its bytes are not counted here: see [`crate::dataplane::Progress::finish`].
    pub fn tunnel_closed(&self, dataplane: PlaneKind, outcome: &TunnelOutcome) {
        self.tunnels_active
            .get_or_create(&DataplaneLabels {
                dataplane: dataplane.as_str(),
            })
            .dec();
        self.tunnels
            .get_or_create(&TunnelLabels {
                dataplane: outcome.dataplane.as_str(),
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

    /// The TLS name policy closed a tunnel for `reason`.
    pub fn tls_refused(&self, reason: &'static str) {
        self.tls_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A connection on a `require-proxy-header` port was closed for `reason`.
    pub fn proxy_protocol_refused(&self, reason: &'static str) {
        self.proxy_protocol_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A PROXY header of `version` was accepted.
    pub fn proxy_protocol_accepted(&self, version: &'static str) {
        self.proxy_protocol_headers
            .get_or_create(&VersionLabels { version })
            .inc();
    }

    /// A connection to the parent proxy `peer` ended as `result`
    /// (`connected`, `failed`, `refused`).
    pub fn parent_connection(&self, peer: &str, result: &'static str) {
        self.parent_connections
            .get_or_create(&ParentLabels {
                peer: peer.to_owned(),
                result,
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
    fn moved(&self, dataplane: PlaneKind, direction: Direction, bytes: u64) {
        self.plane_bytes[dataplane as usize][direction as usize].inc_by(bytes);
    }
}

/// Exports the kernel plane's counters (`spliced_kernel_…`) at every scrape,
/// read from the chosen data plane; nothing before it is chosen, nothing when
/// no sockmap plane runs.
struct KernelCounters {
    plane: Arc<OnceLock<Arc<dyn DataPlane>>>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").finish_non_exhaustive()
    }
}

/// Help text and kind of each kernel-plane metric, by its `SockmapStats`
/// name; the metric is `spliced_kernel_NAME` (`_total` for counters).
fn kernel_metric(name: &str) -> (&'static str, MetricType) {
    use MetricType::{Counter, Gauge};
    match name {
        "zero_length_dropped" => (
            "Empty FIN skbs the verdict dropped instead of redirecting",
            Counter,
        ),
        "redirect_failed" => (
            "skbs whose redirect found no peer socket (their bytes were lost)",
            Counter,
        ),
        "no_flow" => (
            "skbs on a spliced socket without a FLOWS entry (passed to the socket)",
            Counter,
        ),
        "events_lost" => (
            "Flow events lost to a full ring buffer (tunnels then rely on polling)",
            Counter,
        ),
        "duplicate_bytes_trimmed" => (
            "Retransmitted bytes the verdict had handled already and trimmed off",
            Counter,
        ),
        "longest_overlap_bytes" => ("The longest overlap the verdict trimmed off one skb", Gauge),
        "sequence_gaps" => (
            "skbs that started past the byte the verdict expected (always 0 on a sound kernel)",
            Counter,
        ),
        "trim_failed" => (
            "skbs with an overlap too long to trim (each reset its tunnel)",
            Counter,
        ),
        "bytes_redirected" => (
            "Bytes the verdict redirected, of tunnels that have ended",
            Counter,
        ),
        "bytes_passed" => (
            "Bytes the verdict passed to held-back sources, of tunnels that have ended",
            Counter,
        ),
        "events_received" => ("Flow events read from the ring buffer", Counter),
        "flow_control_pauses" => ("Times flow control held a direction back", Counter),
        "flow_control_resumes" => (
            "Times a held-back direction went back to redirecting",
            Counter,
        ),
        "flow_control_copied_bytes" => (
            "Passed bytes user space copied for held-back directions",
            Counter,
        ),
        "send_buffer_raises" => ("Times a destination's send buffer was raised", Counter),
        "flows" => ("FLOWS entries (two per spliced tunnel)", Gauge),
        "spliced_sockets" => ("Sockets in the SPLICED sockhash", Gauge),
        "target_sockets" => ("Sockets in the REDIRECT_TARGETS sockhash", Gauge),
        _ => ("", Gauge),
    }
}

/// Help text and kind of each packet-plane metric, by its `PacketStats`
/// name; the metric is `spliced_packet_NAME` (`_total` for counters).
fn packet_metric(name: &str) -> (&'static str, MetricType) {
    use MetricType::{Counter, Gauge};
    match name {
        "promoted" => ("Tunnels promoted to segment translation", Counter),
        "adopted" => (
            "Promoted tunnels of a previous process taken over at start-up",
            Counter,
        ),
        "lingering" => (
            "Promoted tunnels that ended and still translate late segments",
            Gauge,
        ),
        "entries" => (
            "PACKET_FLOWS entries (two per tunnel of the packet plane)",
            Gauge,
        ),
        "matched" => (
            "Segments whose addresses and ports matched a tunnel's entry",
            Counter,
        ),
        "translated" => ("Segments the tc program rewrote and forwarded", Counter),
        "held" => (
            "Segments a cut-over held back (their senders send them again)",
            Counter,
        ),
        "held_as_duplicate" => (
            "Held segments passed on as duplicates so their ACK reaches the proxy socket",
            Counter,
        ),
        "wake_stamped" => (
            "Cut-over window updates whose TSval was raised to the newest translated one",
            Counter,
        ),
        "fin_deferred" => (
            "FINs dropped while a cut had translated one direction only (sent again)",
            Counter,
        ),
        "silenced" => (
            "Segments of the proxy's silent (repair-mode) sockets dropped at egress",
            Counter,
        ),
        "rewrite_failed" => (
            "Segments a rewrite helper failed on (dropped; the sender retransmits)",
            Counter,
        ),
        "redirect_failed" => (
            "Translated segments bpf_redirect_neigh could not send",
            Counter,
        ),
        "unparsed" => (
            "Matched segments whose headers could not be parsed (passed)",
            Counter,
        ),
        "events_lost" => (
            "End-of-flow events lost to a full ring buffer (tunnels then poll)",
            Counter,
        ),
        _ => ("", Gauge),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = self.plane.get().map(|plane| plane.stats()) else {
            return Ok(());
        };
        if let Some(packet) = stats.packet {
            for (field, value) in packet.fields() {
                let (help, kind) = packet_metric(field);
                let name = format!("packet_{field}");
                let metric = encoder.encode_descriptor(&name, help, None, kind)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value).encode(metric)?,
                    _ => ConstGauge::new(value as i64).encode(metric)?,
                }
            }
            let mut family = encoder.encode_descriptor(
                "packet_not_promoted",
                "Tunnels that stayed on the splice pump, by why promotion was refused or aborted",
                None,
                MetricType::Counter,
            )?;
            for (reason, count) in packet.not_promoted_by_reason() {
                let labels = ReasonLabels { reason };
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let Some(stats) = stats.sockmap else {
            return Ok(());
        };
        for (field, value) in stats.fields() {
            let (help, kind) = kernel_metric(field);
            let name = format!("kernel_{field}");
            let metric = encoder.encode_descriptor(&name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(value).encode(metric)?,
                _ => ConstGauge::new(value as i64).encode(metric)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::dataplane::{copy::CopyDataPlane, PerDirection, Progress, TunnelEnd};

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
        progress.advance_to(PlaneKind::Sockmap, PerDirection([100, 50]));
        progress.advance_to(PlaneKind::Sockmap, PerDirection([80, 60]));
        progress.add(PlaneKind::Splice, Direction::ClientToUpstream, 1000);
        progress.finish(&TunnelOutcome {
            client_to_upstream: 1200,
            upstream_to_client: 70,
            dataplane: PlaneKind::Splice,
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
        metrics.dataplane_chosen(Arc::new(CopyDataPlane));
        metrics.request_answered(403);
        metrics.acl_denied("/etc/squid/squid.conf:12");
        metrics.tunnel_opened(PlaneKind::Copy, Duration::from_millis(3), 5);
        metrics.tunnel_closed(
            PlaneKind::Copy,
            &TunnelOutcome {
                client_to_upstream: 0,
                upstream_to_client: 0,
                dataplane: PlaneKind::Copy,
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

    /// A sockmap plane that only has counters.
    struct CountingPlane;

    impl DataPlane for CountingPlane {
        fn name(&self) -> crate::dataplane::DataPlaneChoice {
            crate::dataplane::DataPlaneChoice::Sockmap
        }
        fn pick(&self, _tunnel: &crate::dataplane::Tunnel) -> crate::dataplane::Picked<'_> {
            (PlaneKind::Sockmap, self)
        }
        fn planes(&self) -> Vec<PlaneKind> {
            vec![PlaneKind::Sockmap]
        }
        fn run(&self, _tunnel: crate::dataplane::Tunnel) -> crate::dataplane::TunnelFuture {
            unreachable!("no tunnels here")
        }
        fn stats(&self) -> crate::dataplane::PlaneStats {
            crate::dataplane::PlaneStats {
                sockmap: Some(crate::dataplane::sockmap::SockmapStats {
                    zero_length_dropped: 3,
                    longest_overlap: 9,
                    flows: 2,
                    bytes_redirected: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }

    #[test]
    fn kernel_counters_are_exported_at_every_scrape() {
        let metrics = Metrics::new();
        assert!(!metrics.encode().contains("spliced_kernel_"));
        metrics.dataplane_chosen(Arc::new(CountingPlane));
        let text = metrics.encode();
        for series in [
            "# TYPE spliced_kernel_zero_length_dropped counter",
            "spliced_kernel_zero_length_dropped_total 3",
            "spliced_kernel_bytes_redirected_total 1000",
            "spliced_kernel_trim_failed_total 0",
            "# TYPE spliced_kernel_longest_overlap_bytes gauge",
            "spliced_kernel_longest_overlap_bytes 9",
            "spliced_kernel_flows 2",
        ] {
            assert!(text.contains(series), "no {series} in\n{text}");
        }
        assert_eq!(text.matches("# TYPE spliced_kernel_").count(), 18, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
