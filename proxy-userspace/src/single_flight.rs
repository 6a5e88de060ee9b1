//! Single flight: concurrent requests for the same key share one piece of
//! work (a password hash, a DNS query) and its result.
//!
//! A request first looks for a result that is already there (a cache) and,
//! under the same lock, for a flight of its key: it follows that flight, or
//! leads a new one. The leader does the work, stores what should be cached,
//! then [`Lead::finish`]es, which ends the flight and tells the followers.
//! Storing before finishing leaves no moment where a request finds neither
//! the cached result nor the flight. A leader dropped unfinished ends the
//! flight without a result: its followers learn that and try again.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::watch;

/// The keys in flight and the channel each flight publishes on.
pub struct Flights<K, V> {
    keys: Mutex<HashMap<K, watch::Sender<Option<V>>>>,
}

/// What a request does when nothing was there already.
pub enum Joined<K: Hash + Eq + Clone, V: Clone> {
    /// Another request is doing the work: wait for its result.
    Follow(Follower<V>),
    /// Nobody is: do it and [`Lead::finish`].
    Lead(Lead<K, V>),
}

/// A request waiting for another one's result.
pub struct Follower<V>(watch::Receiver<Option<V>>);

/// The lead of one flight.
pub struct Lead<K: Hash + Eq + Clone, V: Clone> {
    flights: Arc<Flights<K, V>>,
    key: K,
    finished: bool,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    fn keys(&self) -> MutexGuard<'_, HashMap<K, watch::Sender<Option<V>>>> {
        // The map holds no invariant a panicking holder could break.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Ok` with what `there()` finds (a cache look-up, done under the
    /// flights' lock); else the flight of `key` to follow, or a new one to
    /// lead.
    pub fn join<T>(
        self: &Arc<Self>,
        key: K,
        there: impl FnOnce() -> Option<T>,
    ) -> Result<T, Joined<K, V>> {
        let mut keys = self.keys();
        if let Some(found) = there() {
            return Ok(found);
        }
        if let Some(flight) = keys.get(&key) {
            return Err(Joined::Follow(Follower(flight.subscribe())));
        }
        keys.insert(key.clone(), watch::Sender::new(None));
        Err(Joined::Lead(Lead {
            flights: self.clone(),
            key,
            finished: false,
        }))
    }

    /// The requests following the flight of `key`; `None` when none is in
    /// flight (tests).
    #[cfg(test)]
    pub fn followers(&self, key: &K) -> Option<usize> {
        self.keys().get(key).map(watch::Sender::receiver_count)
    }
}

impl<V: Clone> Follower<V> {
    /// The leader's result, or `None` when it went away without one.
    pub async fn result(mut self) -> Option<V> {
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|result| result.clone())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Lead<K, V> {
    /// A follower of this flight, for a leader that hands the work to
    /// another task and waits like the others.
    pub fn follower(&self) -> Follower<V> {
        let keys = self.flights.keys();
        let flight = keys
            .get(&self.key)
            .expect("an unfinished lead's key is in flight");
        Follower(flight.subscribe())
    }

    /// Ends the flight with `result` and tells the followers. Store what
    /// later requests should find before calling it.
    pub fn finish(mut self, result: V) {
        self.finished = true;
        if let Some(sender) = self.flights.keys().remove(&self.key) {
            sender.send_replace(Some(result));
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Lead<K, V> {
    fn drop(&mut self) {
        if !self.finished {
            // Dropping the sender closes the channel without a result. While
            // this flight is unfinished, the map's entry for its key is its own.
            self.flights.keys().remove(&self.key);
        }
    }
}
