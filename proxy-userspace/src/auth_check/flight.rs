//! Single flight for credentials: concurrent checks of the same credentials
//! share one verification ([`crate::single_flight`]).
//!
//! A herd of clients starting at once with the same uncached credentials
//! would otherwise each queue a hash, and all but the queue's size would be
//! refused although one hash answers them all. So the first check of a
//! [`Tag`] (user, file hash line, password, under the cache's HMAC key)
//! leads a flight: it queues and hashes. Checks of the same tag that arrive
//! meanwhile follow it: they take no place in the queue, hash nothing and
//! get its verdict. Another password, or the same one against another hash
//! line, is another tag: it is never merged with this one.
//!
//! A leader that goes away before hashing (dropped while queued, or refused
//! by a full queue) ends its flight without a verdict: the followers check
//! again, one of them leading a new flight. A leader that got a verifier
//! hands its flight to the hashing thread, which finishes it even if the
//! leader is gone.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use super::cache::{CredentialCache, Tag};
use crate::{
    metrics::Metrics,
    single_flight::{Flights, Follower, Joined, Lead},
};

/// The verified credentials and the verifications in flight.
pub(super) struct Ledger {
    flights: Arc<Flights<Tag, bool>>,
    cache: Mutex<CredentialCache>,
}

/// What a check of cacheable credentials does.
pub(super) enum Role {
    /// They were verified less than `credentialsttl` ago.
    Cached,
    /// Another check is verifying them: wait for its verdict (`None`: its
    /// leader went away, check again).
    Follow(Follower<bool>),
    /// Nobody is: verify them and publish the verdict.
    Lead(Flight),
}

/// The lead of one verification: publishes its verdict with
/// [`Flight::finish`], or, dropped before, ends it without one.
pub(super) struct Flight {
    ledger: Arc<Ledger>,
    lead: Lead<Tag, bool>,
    tag: Tag,
    user: String,
}

impl Ledger {
    /// An empty cache with a fresh key, nothing in flight.
    pub(super) fn new() -> Self {
        Self {
            flights: Arc::default(),
            cache: Mutex::new(CredentialCache::new()),
        }
    }

    /// The cache of verified credentials.
    pub(super) fn cache(&self) -> MutexGuard<'_, CredentialCache> {
        // The cache holds no invariant a panicking holder could break.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a check of `user`'s credentials with `tag` does at `now`.
    pub(super) fn join(self: &Arc<Self>, user: &str, tag: Tag, now: Instant) -> Role {
        let cached = || self.cache().hit(user, &tag, now).then_some(());
        match self.flights.join(tag, cached) {
            Ok(()) => Role::Cached,
            Err(Joined::Follow(follower)) => Role::Follow(follower),
            Err(Joined::Lead(lead)) => Role::Lead(Flight {
                ledger: self.clone(),
                lead,
                tag,
                user: user.to_owned(),
            }),
        }
    }

    /// The checks waiting for the flight of `tag`; `None` when none is in
    /// flight (tests).
    #[cfg(test)]
    pub(super) fn followers(&self, tag: &Tag) -> Option<usize> {
        self.flights.followers(tag)
    }
}

impl Flight {
    /// Ends the flight with `valid`: a success is cached (and the cache's
    /// size shown in `metrics`) first, so that a check arriving after the
    /// flight ends finds it there; then the followers are told.
    pub(super) fn finish(self, valid: bool, metrics: &Metrics) {
        if valid {
            let mut cache = self.ledger.cache();
            cache.insert(self.user, self.tag, Instant::now());
            metrics.auth().cached(cache.len());
        }
        self.lead.finish(valid);
    }
}
