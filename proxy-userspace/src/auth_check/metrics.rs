//! The `spliced_auth_…` metrics: checks by result, the hashes verified, the
//! verification pool's queue and busy verifiers, the wait for a verifier,
//! the cached users.
//! Registered by `metrics::Metrics::new`, fed by [`super::Authenticator`].

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

/// The results a check is counted under.
pub const RESULTS: [&str; 5] = [
    "cache_hit",
    "verified",
    "coalesced",
    "rejected",
    "overloaded",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The authentication metrics.
pub struct AuthMetrics {
    checks: Family<ResultLabels, Counter>,
    hashes: Counter,
    queue_depth: Gauge,
    busy: Gauge,
    wait: Histogram,
    cached: Gauge,
}

impl AuthMetrics {
    /// Registers them in `registry`, at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "auth_checks",
            "Proxy-Authorization checks, by result (cache_hit, verified, coalesced: valid \
             on a concurrent check's hash, rejected, overloaded)",
            checks.clone(),
        );
        for result in RESULTS {
            let _ = checks.get_or_create(&ResultLabels { result });
        }
        let hashes = Counter::default();
        registry.register(
            "auth_hashes",
            "Password hashes verified (one per verification, shared by concurrent checks of \
             the same credentials)",
            hashes.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "auth_queue_depth",
            "Checks waiting for a password verifier now",
            queue_depth.clone(),
        );
        let busy = Gauge::default();
        registry.register(
            "auth_verifying",
            "Password hashes being verified now",
            busy.clone(),
        );
        let wait = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register_with_unit(
            "auth_wait",
            "Time checks spent waiting for a password verifier (0 when one was free)",
            Unit::Seconds,
            wait.clone(),
        );
        let cached = Gauge::default();
        registry.register(
            "auth_cached_users",
            "Users whose verified credentials are cached",
            cached.clone(),
        );
        Self {
            checks,
            hashes,
            queue_depth,
            busy,
            wait,
            cached,
        }
    }

    /// A check ended with `result`, one of [`RESULTS`].
    pub fn checked(&self, result: &'static str) {
        self.checks.get_or_create(&ResultLabels { result }).inc();
    }

    /// A password hash was verified.
    pub fn hashed(&self) {
        self.hashes.inc();
    }

    /// A check joined (+1) or left (-1) the wait queue.
    pub fn queue_changed(&self, by: i64) {
        self.queue_depth.inc_by(by);
    }

    /// A verifier was taken (+1) or given back (-1).
    pub fn busy_changed(&self, by: i64) {
        self.busy.inc_by(by);
    }

    /// A check got a verifier after waiting `took`.
    pub fn waited(&self, took: Duration) {
        self.wait.observe(took.as_secs_f64());
    }

    /// The cache now holds `users`.
    pub fn cached(&self, users: usize) {
        self.cached.set(i64::try_from(users).unwrap_or(i64::MAX));
    }
}
