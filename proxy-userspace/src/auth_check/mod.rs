//! Basic authentication at a bounded cost: a cache of verified credentials
//! (`credentialsttl`, see [`cache`]) in front of a small pool that verifies
//! password hashes (`children`).
//!
//! A bcrypt check costs milliseconds of CPU, and anyone can send a
//! `Proxy-Authorization` header. So a check first looks in the cache (a hit
//! costs one HMAC); a miss waits for one of the pool's verifiers, which hash
//! on tokio's blocking threads, at most [`HelperChildren::workers`] at once.
//! At most [`HelperChildren::queue_limit`] checks wait; one more is refused
//! with [`AuthError::Overloaded`] (503) instead of queueing. Requests without
//! credentials and cache hits never wait for the pool, and concurrent checks
//! of the same credentials share one verification (see [`flight`]): a herd
//! of clients with one password costs one hash and one place in the queue.
//!
//! The [`Authenticator`] lives as long as the process: a reload resizes the
//! pool (checks running on the old one finish there) and empties the cache
//! when the password file changed.

pub mod cache;
mod flight;
pub mod metrics;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    metrics::Metrics,
    squid::{BasicAuth, Credentials, HelperChildren, Verifier},
};
use cache::{CredentialCache, DEFAULT_TTL};
use flight::{Flight, Ledger, Role};

/// Why credentials could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Every verifier is busy and the wait queue is full.
    #[error("authentication overloaded: {waiting} checks already wait for {workers} verifiers")]
    Overloaded {
        /// Checks waiting when this one was refused.
        waiting: usize,
        /// Hashes verified at once.
        workers: usize,
    },
}

/// The verifiers and their wait queue, sized by `children`.
struct Pool {
    permits: Arc<Semaphore>,
    workers: usize,
    queue_limit: usize,
    waiting: AtomicUsize,
}

impl Pool {
    fn new(children: &HelperChildren) -> Self {
        let workers = children.workers();
        Self {
            permits: Arc::new(Semaphore::new(workers)),
            workers,
            queue_limit: children.queue_limit(),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// A place in the wait queue, given back when dropped (also when the client
/// goes away while waiting).
struct Queued<'a> {
    pool: &'a Pool,
    metrics: &'a Metrics,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::AcqRel);
        self.metrics.auth().queue_changed(-1);
    }
}

/// A verifier held for one hash.
struct Busy {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.metrics.auth().busy_changed(-1);
    }
}

/// The credentials cache and the verification pool of one process.
pub struct Authenticator {
    /// The cache and the verifications in flight.
    ledger: Arc<Ledger>,
    pool: ArcSwap<Pool>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    /// An empty cache and a pool of Squid's default size.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            ledger: Arc::new(Ledger::new()),
            pool: ArcSwap::from_pointee(Pool::new(&HelperChildren::default())),
            metrics,
        }
    }

    /// Takes the `auth_param basic` settings of a (re)loaded configuration
    /// (`None`: no authentication).
    pub fn configure(&self, auth: Option<&BasicAuth>) {
        let children = auth
            .and_then(|auth| auth.children.clone())
            .unwrap_or_default();
        let current = self.pool.load();
        if (current.workers, current.queue_limit) != (children.workers(), children.queue_limit()) {
            self.pool.store(Arc::new(Pool::new(&children)));
        }
        let ttl = auth
            .and_then(|auth| auth.credentials_ttl)
            .unwrap_or(DEFAULT_TTL);
        let mut cache = self.cache();
        if cache.configure(ttl, auth.map(BasicAuth::file_digest)) {
            log::info!("the password file changed: cached credentials forgotten");
        }
        self.metrics.auth().cached(cache.len());
    }

    /// Checks a `Proxy-Authorization` value against `auth`: the user name
    /// when the credentials are valid, `None` when they are not, an error
    /// when the pool is overloaded.
    pub async fn check(
        &self,
        auth: &BasicAuth,
        header_value: &str,
    ) -> Result<Option<String>, AuthError> {
        let Some(Credentials { user, password }) = auth.credentials(header_value) else {
            self.metrics.auth().checked("rejected");
            return Ok(None);
        };
        let verifier = auth.verifier(&user);
        // Unknown users have no hash line: nothing to cache or share.
        let Some(tag) = verifier
            .hash_text()
            .map(|hash| self.cache().tag(&user, hash, &password))
        else {
            return self.verify(None, verifier, user, password).await;
        };
        loop {
            match self.ledger.join(&user, tag, Instant::now()) {
                Role::Cached => {
                    self.metrics.auth().checked("cache_hit");
                    return Ok(Some(user));
                }
                Role::Lead(flight) => {
                    return self.verify(Some(flight), verifier, user, password).await;
                }
                Role::Follow(follower) => match follower.result().await {
                    Some(true) => {
                        self.metrics.auth().checked("coalesced");
                        return Ok(Some(user));
                    }
                    Some(false) => {
                        self.metrics.auth().checked("rejected");
                        return Ok(None);
                    }
                    // The leader went away before verifying: check again
                    // (the cache, another flight, or lead one).
                    None => {}
                },
            }
        }
    }

    /// Hashes `password` on a verifier of the pool; with `flight`, publishes
    /// the verdict to the checks that wait for it (also when this check is
    /// dropped once hashing started) and caches a success.
    async fn verify(
        &self,
        flight: Option<Flight>,
        verifier: Verifier,
        user: String,
        password: String,
    ) -> Result<Option<String>, AuthError> {
        // Refused: `flight` is dropped, its followers check again.
        let busy = self.acquire().await.inspect_err(|_| {
            self.metrics.auth().checked("overloaded");
        })?;
        let metrics = self.metrics.clone();
        // The password moves into the verifying thread and ends there.
        let valid = tokio::task::spawn_blocking(move || {
            let valid = verifier.verify(password.as_bytes());
            drop(busy);
            metrics.auth().hashed();
            if let Some(flight) = flight {
                flight.finish(valid, &metrics);
            }
            valid
        })
        .await
        .unwrap_or(false);
        if !valid {
            self.metrics.auth().checked("rejected");
            return Ok(None);
        }
        self.metrics.auth().checked("verified");
        Ok(Some(user))
    }

    /// A verifier: at once if one is free, after a wait in the bounded
    /// queue otherwise.
    async fn acquire(&self) -> Result<Busy, AuthError> {
        let pool = self.pool.load_full();
        let busy = |permit| {
            self.metrics.auth().busy_changed(1);
            Busy {
                _permit: permit,
                metrics: self.metrics.clone(),
            }
        };
        if let Ok(permit) = pool.permits.clone().try_acquire_owned() {
            self.metrics.auth().waited(std::time::Duration::ZERO);
            return Ok(busy(permit));
        }
        let joined = pool
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < pool.queue_limit).then_some(waiting + 1)
            });
        if let Err(waiting) = joined {
            return Err(AuthError::Overloaded {
                waiting,
                workers: pool.workers,
            });
        }
        self.metrics.auth().queue_changed(1);
        let queued = Queued {
            pool: &pool,
            metrics: &self.metrics,
        };
        let started = Instant::now();
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        drop(queued);
        self.metrics.auth().waited(started.elapsed());
        Ok(busy(permit))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, CredentialCache> {
        self.ledger.cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use cache::Tag;

    fn basic(credentials: &str) -> String {
        format!("Basic {}", STANDARD.encode(credentials))
    }

    fn with_children(children: &str, text: &str) -> BasicAuth {
        let (mut auth, _) = BasicAuth::parse_htpasswd(text, "passwd").unwrap();
        let words: Vec<&str> = children.split_whitespace().collect();
        auth.children = Some(HelperChildren::parse(&words).unwrap());
        auth
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_hits_and_wrong_passwords() {
        let metrics = Arc::new(Metrics::new());
        let authenticator = Authenticator::new(metrics.clone());
        let hash = bcrypt::hash("right", 4).unwrap();
        let auth = with_children("1", &format!("alice:{hash}\n"));
        authenticator.configure(Some(&auth));
        for (credentials, user) in [
            ("alice:right", Some("alice")),
            ("alice:right", Some("alice")),
            ("alice:wrong", None),
            ("nobody:right", None),
        ] {
            let checked = authenticator.check(&auth, &basic(credentials)).await;
            assert_eq!(checked.unwrap().as_deref(), user, "{credentials}");
        }
        assert_eq!(authenticator.check(&auth, "Basic !!").await.unwrap(), None);
        let text = metrics.encode();
        for (result, count) in [("cache_hit", 1), ("verified", 1), ("rejected", 3)] {
            let series = format!("spliced_auth_checks_total{{result=\"{result}\"}} {count}\n");
            assert!(text.contains(&series), "{series}\n{text}");
        }
        // A changed file forgets the success.
        let other = with_children("1", &format!("alice:{hash}\nbob:{hash}\n"));
        authenticator.configure(Some(&other));
        assert!(authenticator.cache().is_empty());
    }

    #[test]
    fn a_reload_resizes_the_pool_and_keeps_the_cache_of_an_unchanged_file() {
        let authenticator = Authenticator::new(Arc::new(Metrics::new()));
        assert_eq!(
            authenticator.pool.load().queue_limit,
            40,
            "Squid's default 2 × 20"
        );
        let text = "alice:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\n";
        authenticator.configure(Some(&with_children("1 queue-size=3", text)));
        let pool = authenticator.pool.load_full();
        assert_eq!((pool.workers, pool.queue_limit), (1, 3));
        let tag = authenticator.cache().tag("alice", "h", "pw");
        authenticator
            .cache()
            .insert("alice".into(), tag, Instant::now());
        // The same settings keep the pool; the same file keeps the cache.
        authenticator.configure(Some(&with_children("1 queue-size=3", text)));
        assert!(Arc::ptr_eq(&pool, &authenticator.pool.load_full()));
        assert_eq!(authenticator.cache().len(), 1);
        authenticator.configure(Some(&with_children("1 queue-size=0", text)));
        assert_eq!(authenticator.pool.load().queue_limit, 0);
        assert_eq!(authenticator.cache().len(), 1);
        // No authentication any more: nothing cached survives.
        authenticator.configure(None);
        assert!(authenticator.cache().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses() {
        let metrics = Arc::new(Metrics::new());
        let authenticator = Arc::new(Authenticator::new(metrics.clone()));
        authenticator.configure(Some(&with_children(
            "1 queue-size=1",
            "alice:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\n",
        )));
        // Hold the only verifier, then fill the queue.
        let held = authenticator.acquire().await.unwrap();
        let waiter = {
            let authenticator = authenticator.clone();
            tokio::spawn(async move { authenticator.acquire().await.map(drop) })
        };
        until("the waiter queues", || {
            authenticator.pool.load().waiting.load(Ordering::Acquire) > 0
        })
        .await;
        let refused = authenticator.acquire().await.map(drop);
        assert!(matches!(
            refused,
            Err(AuthError::Overloaded {
                waiting: 1,
                workers: 1
            })
        ));
        drop(held);
        waiter.await.unwrap().unwrap();
        assert_eq!(authenticator.pool.load().waiting.load(Ordering::Acquire), 0);
        assert!(metrics.encode().contains("spliced_auth_queue_depth 0\n"));
    }

    /// Waits (up to 10 s) until `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    fn assert_series(metrics: &Metrics, series: &[(&str, u64)]) {
        let text = metrics.encode();
        for (name, value) in series {
            let line = format!("{name} {value}\n");
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }

    /// An authenticator for alice (password "right", bcrypt at `cost`) with
    /// `children`, and the tag of her right password.
    fn alice(cost: u32, children: &str) -> (Arc<Metrics>, Arc<Authenticator>, Arc<BasicAuth>, Tag) {
        let metrics = Arc::new(Metrics::new());
        let authenticator = Arc::new(Authenticator::new(metrics.clone()));
        let hash = bcrypt::hash("right", cost).unwrap();
        let auth = Arc::new(with_children(children, &format!("alice:{hash}\n")));
        authenticator.configure(Some(&auth));
        let tag = authenticator.cache().tag("alice", &hash, "right");
        (metrics, authenticator, auth, tag)
    }

    type CheckHandle = tokio::task::JoinHandle<Result<Option<String>, AuthError>>;

    fn spawn_check(
        authenticator: &Arc<Authenticator>,
        auth: &Arc<BasicAuth>,
        credentials: &str,
    ) -> CheckHandle {
        let (authenticator, auth) = (authenticator.clone(), auth.clone());
        let header = basic(credentials);
        tokio::spawn(async move { authenticator.check(&auth, &header).await })
    }

    /// With the only verifier held: a check of alice's right password that
    /// leads a flight from the queue, and `count` checks that follow it.
    async fn leader_queued_with_followers(
        authenticator: &Arc<Authenticator>,
        auth: &Arc<BasicAuth>,
        tag: &Tag,
        count: usize,
    ) -> (Busy, CheckHandle, Vec<CheckHandle>) {
        let held = authenticator.acquire().await.unwrap();
        let leader = spawn_check(authenticator, auth, "alice:right");
        until("the leader queues", || {
            authenticator.ledger.followers(tag) == Some(0)
        })
        .await;
        let followers: Vec<_> = (0..count)
            .map(|_| spawn_check(authenticator, auth, "alice:right"))
            .collect();
        until("the followers wait", || {
            authenticator.ledger.followers(tag) == Some(count)
        })
        .await;
        (held, leader, followers)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_herd_of_the_same_credentials_costs_one_hash_and_no_refusal() {
        const HERD: usize = 16;
        let (metrics, authenticator, auth, tag) = alice(4, "1 queue-size=1");
        // With the only verifier busy, the herd's leader queues and the
        // others follow it: none takes the queue's one place.
        let held = authenticator.acquire().await.unwrap();
        let herd: Vec<_> = (0..HERD)
            .map(|_| spawn_check(&authenticator, &auth, "alice:right"))
            .collect();
        until("the herd follows one leader", || {
            authenticator.ledger.followers(&tag) == Some(HERD - 1)
        })
        .await;
        drop(held);
        for check in herd {
            assert_eq!(check.await.unwrap().unwrap().as_deref(), Some("alice"));
        }
        assert_series(
            &metrics,
            &[
                ("spliced_auth_hashes_total", 1),
                ("spliced_auth_checks_total{result=\"verified\"}", 1),
                (
                    "spliced_auth_checks_total{result=\"coalesced\"}",
                    HERD as u64 - 1,
                ),
                ("spliced_auth_checks_total{result=\"overloaded\"}", 0),
                ("spliced_auth_cached_users", 1),
                ("spliced_auth_queue_depth", 0),
            ],
        );
        assert_eq!(authenticator.ledger.followers(&tag), None);
        // The success was cached once: the next check hashes nothing.
        let again = authenticator.check(&auth, &basic("alice:right")).await;
        assert_eq!(again.unwrap().as_deref(), Some("alice"));
        assert_series(&metrics, &[("spliced_auth_hashes_total", 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_right_and_a_wrong_password_are_not_merged() {
        let (metrics, authenticator, auth, right) = alice(4, "1 queue-size=2");
        let wrong = authenticator.cache().tag(
            "alice",
            auth.verifier("alice").hash_text().unwrap(),
            "wrong",
        );
        let held = authenticator.acquire().await.unwrap();
        let checks: Vec<_> = ["alice:right", "alice:wrong", "alice:right", "alice:wrong"]
            .into_iter()
            .map(|credentials| (credentials, spawn_check(&authenticator, &auth, credentials)))
            .collect();
        until("one flight per password, each followed once", || {
            authenticator.ledger.followers(&right) == Some(1)
                && authenticator.ledger.followers(&wrong) == Some(1)
        })
        .await;
        drop(held);
        for (credentials, check) in checks {
            let expected = (credentials == "alice:right").then_some("alice");
            let checked = check.await.unwrap().unwrap();
            assert_eq!(checked.as_deref(), expected, "{credentials}");
        }
        assert_series(
            &metrics,
            &[
                ("spliced_auth_hashes_total", 2),
                ("spliced_auth_checks_total{result=\"verified\"}", 1),
                ("spliced_auth_checks_total{result=\"coalesced\"}", 1),
                ("spliced_auth_checks_total{result=\"rejected\"}", 2),
            ],
        );
        // The failure was not cached: the wrong password is hashed again.
        let again = authenticator.check(&auth, &basic("alice:wrong")).await;
        assert_eq!(again.unwrap(), None);
        assert_series(&metrics, &[("spliced_auth_hashes_total", 3)]);
        assert_eq!(authenticator.cache().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_of_a_leader_dropped_while_queued_check_again() {
        const FOLLOWERS: usize = 3;
        let (metrics, authenticator, auth, tag) = alice(4, "1 queue-size=1");
        let (held, leader, followers) =
            leader_queued_with_followers(&authenticator, &auth, &tag, FOLLOWERS).await;
        // The client of the leader goes away: its place in the queue is
        // given back, and one follower leads a new flight in it.
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        until("a follower leads", || {
            authenticator.ledger.followers(&tag) == Some(FOLLOWERS - 1)
        })
        .await;
        drop(held);
        for check in followers {
            assert_eq!(check.await.unwrap().unwrap().as_deref(), Some("alice"));
        }
        assert_series(
            &metrics,
            &[
                ("spliced_auth_hashes_total", 1),
                (
                    "spliced_auth_checks_total{result=\"coalesced\"}",
                    FOLLOWERS as u64 - 1,
                ),
                ("spliced_auth_checks_total{result=\"overloaded\"}", 0),
                ("spliced_auth_queue_depth", 0),
            ],
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_of_a_leader_dropped_while_hashing_get_its_verdict() {
        // A slow hash, so that the leader is dropped while it runs.
        let (metrics, authenticator, auth, tag) = alice(12, "1 queue-size=1");
        let (held, leader, followers) =
            leader_queued_with_followers(&authenticator, &auth, &tag, 2).await;
        drop(held);
        // The poll that takes the verifier also starts the hash: once it is
        // taken, the hash runs whatever becomes of the leader.
        until("the leader hashes", || {
            metrics.encode().contains("spliced_auth_verifying 1\n")
        })
        .await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled(), "hashed too fast");
        for check in followers {
            assert_eq!(check.await.unwrap().unwrap().as_deref(), Some("alice"));
        }
        assert_series(
            &metrics,
            &[
                ("spliced_auth_hashes_total", 1),
                ("spliced_auth_checks_total{result=\"coalesced\"}", 2),
                ("spliced_auth_cached_users", 1),
            ],
        );
    }
}
