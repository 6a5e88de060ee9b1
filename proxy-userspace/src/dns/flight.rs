//! Single flight for names: concurrent lookups of one name share one DNS
//! query ([`crate::single_flight`]).
//!
//! N tunnels opened at once to a name not cached yet would otherwise send N
//! queries. The first lookup of a name (by the cache's key: lower case, no
//! trailing dot) starts the query in its own task; lookups of the name that
//! arrive while it runs wait for its answer, positive or negative. The task
//! is bounded by `dns_timeout` and publishes whatever becomes of the lookup
//! that started it, so a follower waits at most that long. It stores its
//! answer in the cache before it publishes it.

use std::{future::Future, sync::Arc};

use super::{Answer, DnsError};
use crate::single_flight::{self, Joined};

/// Where a lookup's answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The cache.
    Cached,
    /// A query this lookup started.
    Asked,
    /// A query another lookup of the name had started.
    Shared,
}

/// The names being asked of DNS now.
#[derive(Clone, Default)]
pub(super) struct Flights(Arc<single_flight::Flights<String, Answer>>);

impl Flights {
    /// The answer for `key`: `cached()` if it has one, else that of the
    /// query in flight for `key`, else that of `ask()`, spawned now. The
    /// query must store what should be cached before it ends, and end by
    /// itself (within `dns_timeout`).
    pub(super) async fn answer<A>(
        &self,
        key: String,
        cached: impl FnOnce() -> Option<Answer>,
        ask: impl FnOnce() -> A,
    ) -> (Answer, Source)
    where
        A: Future<Output = Answer> + Send + 'static,
    {
        let (follower, source) = match self.0.join(key, cached) {
            Ok(answer) => return (answer, Source::Cached),
            Err(Joined::Follow(follower)) => (follower, Source::Shared),
            Err(Joined::Lead(lead)) => {
                // Followed by this lookup too, so that it gets the answer
                // even if it is dropped and the query goes on without it.
                let follower = lead.follower();
                let query = ask();
                tokio::spawn(async move { lead.finish(query.await) });
                (follower, Source::Asked)
            }
        };
        let answer = follower.result().await.unwrap_or_else(|| {
            // The task was dropped unfinished: only when the runtime stops.
            Err(DnsError::Other("the lookup was abandoned".to_owned()))
        });
        (answer, source)
    }

    /// The lookups waiting for the query of `key`; `None` when none is in
    /// flight (tests).
    #[cfg(test)]
    pub(super) fn waiting(&self, key: &str) -> Option<usize> {
        self.0.followers(&key.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::atomic::{AtomicUsize, Ordering},
        time::{Duration, Instant},
    };

    use tokio::sync::Semaphore;

    use super::*;

    /// A query that counts itself and answers `answer` once it takes one of
    /// `go`'s permits.
    fn query(
        count: &Arc<AtomicUsize>,
        go: &Arc<Semaphore>,
        answer: Answer,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let (count, go) = (count.clone(), go.clone());
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            go.acquire().await.expect("never closed").forget();
            answer
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_of_a_name_share_one_query() {
        const LOOKUPS: usize = 16;
        let flights = Flights::default();
        let go = Arc::new(Semaphore::new(0));
        let addrs: Arc<[IpAddr]> = Arc::from([IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]);
        for answer in [Ok(addrs), Err(DnsError::NxDomain)] {
            let count = Arc::new(AtomicUsize::new(0));
            let lookups: Vec<_> = (0..LOOKUPS)
                .map(|_| {
                    let (flights, ask) = (flights.clone(), query(&count, &go, answer.clone()));
                    tokio::spawn(async move {
                        flights.answer("example.com".into(), || None, || ask).await
                    })
                })
                .collect();
            until("every lookup waits for one query", || {
                flights.waiting("example.com") == Some(LOOKUPS)
            })
            .await;
            go.add_permits(1);
            let mut sources = Vec::new();
            for lookup in lookups {
                let (got, source) = lookup.await.unwrap();
                assert_eq!(got, answer);
                sources.push(source);
            }
            assert_eq!(count.load(Ordering::SeqCst), 1, "{answer:?}");
            let asked = sources.iter().filter(|s| **s == Source::Asked).count();
            assert_eq!(asked, 1, "{sources:?}");
            assert_eq!(flights.waiting("example.com"), None);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_names_are_asked_apart_and_the_cache_comes_first() {
        let flights = Flights::default();
        let (count, go) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
        let lookups: Vec<_> = ["a.example", "b.example"]
            .into_iter()
            .map(|name| {
                let (flights, ask) = (
                    flights.clone(),
                    query(&count, &go, Err(DnsError::NoRecords)),
                );
                tokio::spawn(async move { flights.answer(name.into(), || None, || ask).await })
            })
            .collect();
        until("two queries", || count.load(Ordering::SeqCst) == 2).await;
        go.add_permits(2);
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap().1, Source::Asked);
        }
        let (cached, source) = flights
            .answer(
                "a.example".into(),
                || Some(Err(DnsError::NxDomain)),
                || query(&count, &go, Err(DnsError::Timeout)),
            )
            .await;
        assert_eq!((cached, source), (Err(DnsError::NxDomain), Source::Cached));
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "a cached name is not asked"
        );
    }
}
