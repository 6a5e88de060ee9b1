//! The cache of verified Basic credentials (`auth_param basic
//! credentialsttl`): a user whose password was verified less than the TTL ago
//! is let in again without hashing.
//!
//! An entry is the user name and a tag: HMAC-SHA-256, under a key drawn at
//! start and never shown, of the user, the hash the password file holds for
//! them and the password. The password itself is never kept. A wrong
//! password, or the same password after the file changed the user's hash,
//! gives another tag, so it is never a hit: it is verified (and fails) like
//! any uncached check. One entry per user (the latest success), at most
//! [`MAX_ENTRIES`], least recently used evicted first. Failures are not
//! cached (as in Squid): the bounded verification pool is what limits a flood
//! of wrong passwords.

use std::{
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use hmac::{Hmac, KeyInit as _, Mac as _};
use lru::LruCache;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

/// Users whose success is remembered at once; beyond it the least recently
/// used is forgotten (and verified again on its next request).
pub const MAX_ENTRIES: usize = 65_536;

/// Squid's default `credentialsttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2 * 3600);

/// A keyed digest of one user's credentials and the hash they were checked
/// against.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag([u8; 32]);

struct Cached {
    tag: Tag,
    verified: Instant,
}

/// Verified credentials, by user.
pub struct CredentialCache {
    key: [u8; 32],
    entries: LruCache<String, Cached>,
    ttl: Duration,
    /// The digest of the password file the entries were verified against.
    file_digest: Option<[u8; 32]>,
}

impl CredentialCache {
    /// An empty cache with a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        // Without the OS's random source the key is unpredictable enough for
        // nothing: refuse to run rather than tag with a guessable key.
        getrandom::fill(&mut key).expect("the OS random source works");
        Self::with_key(key, MAX_ENTRIES)
    }

    fn with_key(key: [u8; 32], capacity: usize) -> Self {
        Self {
            key,
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            ttl: DEFAULT_TTL,
            file_digest: None,
        }
    }

    /// Takes the settings of a (re)loaded configuration: `ttl` from then on,
    /// and every entry forgotten when the password file's digest changed.
    /// Returns whether entries were dropped.
    pub fn configure(&mut self, ttl: Duration, file_digest: Option<[u8; 32]>) -> bool {
        self.ttl = ttl;
        if self.file_digest == file_digest {
            return false;
        }
        self.file_digest = file_digest;
        let dropped = !self.entries.is_empty();
        self.entries.clear();
        dropped
    }

    /// The tag of `password` for `user`, whose file entry is `hash_text`.
    pub fn tag(&self, user: &str, hash_text: &str, password: &str) -> Tag {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        // Length prefixes: no two different triples feed the same bytes.
        for part in [user, hash_text, password] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        Tag(mac.finalize().into_bytes().into())
    }

    /// Whether `user` was verified with these credentials less than the TTL
    /// before `now`. An expired entry is dropped.
    pub fn hit(&mut self, user: &str, tag: &Tag, now: Instant) -> bool {
        let ttl = self.ttl;
        let Some(entry) = self.entries.get(user) else {
            return false;
        };
        if now.saturating_duration_since(entry.verified) >= ttl {
            self.entries.pop(user);
            return false;
        }
        entry.tag.0.ct_eq(&tag.0).into()
    }

    /// Remembers that `user`'s credentials with `tag` were verified at
    /// `now` (nothing with `credentialsttl 0`).
    pub fn insert(&mut self, user: String, tag: Tag, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        self.entries.put(user, Cached { tag, verified: now });
    }

    /// The number of users remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no user is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Default for CredentialCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_verified_password_hits() {
        let mut cache = CredentialCache::new();
        let now = Instant::now();
        let right = cache.tag("alice", "$2y$10$x", "secret");
        cache.insert("alice".into(), right, now);
        assert!(cache.hit("alice", &right, now));
        assert!(!cache.hit("alice", &cache.tag("alice", "$2y$10$x", "secreT"), now));
        assert!(!cache.hit("alice", &cache.tag("alice", "$2y$10$x", ""), now));
        // The same password against a changed hash line is another tag.
        assert!(!cache.hit("alice", &cache.tag("alice", "$2y$10$y", "secret"), now));
        // No confusion between where one field ends and the next starts.
        assert!(cache.tag("ab", "c", "d") != cache.tag("a", "bc", "d"));
        assert!(!cache.hit("bob", &right, now));
        // A second key gives other tags.
        assert!(CredentialCache::new().tag("alice", "$2y$10$x", "secret") != right);
    }

    #[test]
    fn entries_expire_and_reloads_clear_them() {
        let mut cache = CredentialCache::with_key([7; 32], 16);
        let t0 = Instant::now();
        assert!(!cache.configure(Duration::from_secs(60), Some([1; 32])));
        let tag = cache.tag("alice", "h", "pw");
        cache.insert("alice".into(), tag, t0);
        assert!(cache.hit("alice", &tag, t0 + Duration::from_secs(59)));
        assert!(!cache.hit("alice", &tag, t0 + Duration::from_secs(60)));
        assert!(cache.is_empty(), "an expired entry is dropped");

        cache.insert("alice".into(), tag, t0);
        // Same file, shorter TTL: the entry stays but the new TTL applies.
        assert!(!cache.configure(Duration::from_secs(10), Some([1; 32])));
        assert!(!cache.hit("alice", &tag, t0 + Duration::from_secs(11)));
        cache.insert("alice".into(), tag, t0);
        assert!(cache.configure(Duration::from_secs(10), Some([2; 32])));
        assert!(!cache.hit("alice", &tag, t0));

        assert!(!cache.configure(Duration::ZERO, Some([2; 32])));
        cache.insert("alice".into(), tag, t0);
        assert!(cache.is_empty(), "credentialsttl 0 caches nothing");
    }

    #[test]
    fn bounded_by_least_recent_use() {
        let mut cache = CredentialCache::with_key([7; 32], 2);
        let now = Instant::now();
        let tags: Vec<Tag> = ["a", "b", "c"]
            .iter()
            .map(|user| cache.tag(user, "h", "pw"))
            .collect();
        cache.insert("a".into(), tags[0], now);
        cache.insert("b".into(), tags[1], now);
        assert!(cache.hit("a", &tags[0], now));
        cache.insert("c".into(), tags[2], now);
        assert_eq!(cache.len(), 2);
        assert!(!cache.hit("b", &tags[1], now), "b was least recently used");
        assert!(cache.hit("a", &tags[0], now) && cache.hit("c", &tags[2], now));
    }
}
