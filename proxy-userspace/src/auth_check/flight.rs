//! Single flight: concurrent checks of the same credentials share one
//! verification.
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
//! A flight ends when its verdict is published, or when its leader goes away
//! first (dropped while queued, or refused by a full queue): followers then
//! see the channel close without a verdict and check again, one of them
//! leading a new flight. A leader that got a verifier hands its flight to
//! the hashing thread, which publishes even if the leader is gone.
//!
//! The in-flight map and the cache are locked in that order, so that a check
//! either finds the cached success or the flight, never neither between a
//! flight's end and its success being cached.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use tokio::sync::watch;

use super::cache::{CredentialCache, Tag};
use crate::metrics::Metrics;

/// A flight's verdict: `None` while verifying, then whether the password
/// matched.
type Verdict = Option<bool>;

/// The verified credentials and the verifications in flight.
pub(super) struct Ledger {
    /// Locked before `cache` when both are.
    flights: Mutex<HashMap<Tag, watch::Sender<Verdict>>>,
    cache: Mutex<CredentialCache>,
}

/// What a check of cacheable credentials does.
pub(super) enum Role {
    /// They were verified less than `credentialsttl` ago.
    Cached,
    /// Another check is verifying them: wait for its verdict.
    Follow(Follower),
    /// Nobody is: verify them and publish the verdict.
    Lead(Flight),
}

/// A check waiting for another one's verification.
pub(super) struct Follower(watch::Receiver<Verdict>);

impl Follower {
    /// The verdict, or `None` when the flight ended without one (its leader
    /// went away): check again.
    pub(super) async fn verdict(mut self) -> Option<bool> {
        self.0.wait_for(Option::is_some).await.ok().and_then(|v| *v)
    }
}

/// The lead of one verification: publishes its verdict with
/// [`Flight::finish`], or, dropped before, ends it without one.
pub(super) struct Flight {
    ledger: Arc<Ledger>,
    tag: Tag,
    user: String,
    finished: bool,
}

impl Ledger {
    /// An empty cache with a fresh key, nothing in flight.
    pub(super) fn new() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
            cache: Mutex::new(CredentialCache::new()),
        }
    }

    /// The cache of verified credentials.
    pub(super) fn cache(&self) -> MutexGuard<'_, CredentialCache> {
        // Neither map holds an invariant a panicking holder could break.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<Tag, watch::Sender<Verdict>>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a check of `user`'s credentials with `tag` does at `now`.
    pub(super) fn join(self: &Arc<Self>, user: &str, tag: Tag, now: Instant) -> Role {
        let mut flights = self.flights();
        if self.cache().hit(user, &tag, now) {
            return Role::Cached;
        }
        if let Some(flight) = flights.get(&tag) {
            return Role::Follow(Follower(flight.subscribe()));
        }
        flights.insert(tag, watch::Sender::new(None));
        Role::Lead(Flight {
            ledger: self.clone(),
            tag,
            user: user.to_owned(),
            finished: false,
        })
    }

    /// The checks waiting for the flight of `tag`; `None` when none is in
    /// flight (tests).
    #[cfg(test)]
    pub(super) fn followers(&self, tag: &Tag) -> Option<usize> {
        self.flights().get(tag).map(watch::Sender::receiver_count)
    }
}

impl Flight {
    /// Ends the flight with `valid`: a success is cached (and the cache's
    /// size shown in `metrics`) first, so that a check arriving after the
    /// flight ends finds it there; then the followers are told.
    pub(super) fn finish(mut self, valid: bool, metrics: &Metrics) {
        self.finished = true;
        let mut flights = self.ledger.flights();
        if valid {
            let mut cache = self.ledger.cache();
            cache.insert(std::mem::take(&mut self.user), self.tag, Instant::now());
            metrics.auth().cached(cache.len());
        }
        if let Some(sender) = flights.remove(&self.tag) {
            sender.send_replace(Some(valid));
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.finished {
            // Dropping the sender closes the channel without a verdict: the
            // followers check again. While this flight is unfinished, the
            // map's entry for its tag is its own.
            self.ledger.flights().remove(&self.tag);
        }
    }
}
