//! The bounded cache of name lookups (Squid's ipcache): an answer is kept for
//! its records' TTL but never longer than `positive_dns_ttl`, a failure for
//! `negative_dns_ttl`. `ipcache_size` bounds the number of names; moka evicts
//! the least useful entries beyond it.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use moka::{sync::Cache as Moka, Expiry};

use super::DnsError;

/// What a lookup of one name gave: its addresses, or why there are none.
pub type Answer = Result<Arc<[IpAddr]>, DnsError>;

#[derive(Clone)]
struct Entry {
    answer: Answer,
    ttl: Duration,
}

/// Each entry lives as long as the TTL it was stored with.
struct EntryTtl;

impl Expiry<String, Entry> for EntryTtl {
    fn expire_after_create(
        &self,
        _name: &String,
        entry: &Entry,
        _now: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// Answers and failures by name (lower case, no trailing dot); clones share
/// the entries.
#[derive(Clone)]
pub struct Cache {
    entries: Moka<String, Entry>,
    positive_ttl: Duration,
    negative_ttl: Duration,
}

impl Cache {
    /// A cache of at most `capacity` names (0: nothing is cached).
    pub fn new(capacity: u64, positive_ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            entries: Moka::builder()
                .max_capacity(capacity)
                .expire_after(EntryTtl)
                .build(),
            positive_ttl,
            negative_ttl,
        }
    }

    /// The key of `name`: lower case, no trailing dot.
    pub(super) fn key(name: &str) -> String {
        name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
    }

    /// The cached answer for `name`, if one is still valid.
    pub fn get(&self, name: &str) -> Option<Answer> {
        self.entries.get(&Self::key(name)).map(|entry| entry.answer)
    }

    /// Keeps `answer` for `name`. `record_ttl` is what the records allow (their
    /// smallest TTL); it caps `positive_dns_ttl`. Failures that say nothing
    /// about the name (the server could not be reached) are not kept.
    pub fn insert(&self, name: &str, answer: Answer, record_ttl: Duration) {
        let ttl = match &answer {
            Ok(_) => record_ttl.min(self.positive_ttl),
            Err(err) if err.is_cacheable() => self.negative_ttl,
            Err(_) => Duration::ZERO,
        };
        if !ttl.is_zero() {
            self.entries.insert(Self::key(name), Entry { answer, ttl });
        }
    }

    /// How many names are cached (approximate until moka's housekeeping ran).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Answer {
        Ok(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn record_ttl_caps_positive_ttl_and_names_ignore_case() {
        let cache = Cache::new(16, Duration::from_millis(300), LONG);
        cache.insert("Short.Example.", addrs(&["192.0.2.1"]), LONG);
        cache.insert("zero.example", addrs(&["192.0.2.2"]), Duration::ZERO);
        cache.insert(
            "record.example",
            addrs(&["192.0.2.3"]),
            Duration::from_millis(100),
        );
        assert_eq!(cache.get("short.example"), Some(addrs(&["192.0.2.1"])));
        assert_eq!(cache.get("zero.example"), None, "TTL 0 is never cached");
        assert!(cache.get("record.example").is_some());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            cache.get("record.example"),
            None,
            "the record's TTL ended it"
        );
        assert!(
            cache.get("SHORT.example").is_some(),
            "positive_dns_ttl not over yet"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            cache.get("short.example"),
            None,
            "positive_dns_ttl ended it"
        );
    }

    #[test]
    fn failures_last_negative_ttl_unless_they_say_nothing_about_the_name() {
        let cache = Cache::new(16, LONG, Duration::from_millis(200));
        cache.insert("nx.example", Err(DnsError::NxDomain), LONG);
        cache.insert("servfail.example", Err(DnsError::ServFail), LONG);
        cache.insert("down.example", Err(DnsError::Other("refused".into())), LONG);
        assert_eq!(cache.get("nx.example"), Some(Err(DnsError::NxDomain)));
        assert_eq!(cache.get("servfail.example"), Some(Err(DnsError::ServFail)));
        assert_eq!(cache.get("down.example"), None);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(cache.get("nx.example"), None);
    }

    #[test]
    fn size_is_bounded() {
        let cache = Cache::new(8, LONG, LONG);
        for n in 0..100 {
            cache.insert(&format!("n{n}.example"), addrs(&["192.0.2.1"]), LONG);
        }
        assert!(cache.len() <= 8, "{} names cached", cache.len());
        let none = Cache::new(0, LONG, LONG);
        none.insert("a.example", addrs(&["192.0.2.1"]), LONG);
        assert_eq!(none.get("a.example"), None);
    }
}
