//! The resolver's Prometheus series (`spliced_dns_…`), registered by
//! [`crate::metrics::Metrics`] and counted by [`super::Resolver`].

use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
    registry::Registry,
};

use super::DnsError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Counters of name lookups (IP-literal targets are not lookups).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    lookups: Counter,
    cache_hits: Counter,
    queries: Counter,
    shared: Counter,
    failures: Family<KindLabels, Counter>,
}

impl DnsMetrics {
    /// Registers the series in `registry`, at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "dns_lookups",
            "Names resolved for upstream connections (from hosts_file, the cache or DNS)",
            metrics.lookups.clone(),
        );
        registry.register(
            "dns_cache_hits",
            "Lookups answered from the DNS cache (positive or negative entries)",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "dns_queries",
            "Names asked of the DNS servers (one query in flight per name)",
            metrics.queries.clone(),
        );
        registry.register(
            "dns_shared",
            "Lookups answered by a query another lookup of the name had started",
            metrics.shared.clone(),
        );
        registry.register(
            "dns_failures",
            "Lookups that gave no address, by kind: nxdomain, no_records, servfail, timeout, other",
            metrics.failures.clone(),
        );
        for kind in DnsError::KINDS {
            let _ = metrics.failures.get_or_create(&KindLabels { kind });
        }
        metrics
    }

    /// A query was sent (it runs to its end even if the lookup that started
    /// it is dropped).
    pub(super) fn queried(&self) {
        self.queries.inc();
    }

    /// A lookup got the answer of a query another lookup had started.
    pub(super) fn shared(&self) {
        self.shared.inc();
    }

    /// One name is looked up; `cached` when the cache answered.
    pub(super) fn looked_up(&self, cached: bool, failure: Option<&DnsError>) {
        self.lookups.inc();
        if cached {
            self.cache_hits.inc();
        }
        if let Some(err) = failure {
            self.failures
                .get_or_create(&KindLabels { kind: err.kind() })
                .inc();
        }
    }
}
