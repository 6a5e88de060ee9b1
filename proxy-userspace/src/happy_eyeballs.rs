//! Happy Eyeballs v2 (RFC 8305) connection racing: addresses ordered with the
//! two families interleaved (IPv6 first, as RFC 6724's default policy prefers
//! it), the next attempt started when the previous one fails or after
//! `happy_eyeballs_connect_timeout` while it is still pending, the first
//! connection that succeeds wins and every other attempt is dropped (its socket
//! closed). Each attempt is bounded by `connect_timeout`.
//!
//! The one maintained crate for this (`happy-eyeballs`) resolves by itself and
//! has a fixed delay, so this is written here, generic over the connect step so
//! its timing is unit-tested on tokio's paused clock.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::task::JoinSet;

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// connect(2) failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// No answer within the per-attempt timeout.
    #[error("timed out")]
    Timeout,
}

/// `addrs` without duplicates, families interleaved: IPv6, IPv4, IPv6, …, each
/// family in the order given; the rest of the longer family at the end.
pub fn order(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for addr in addrs {
        if !unique.contains(addr) {
            unique.push(*addr);
        }
    }
    let (v6, v4): (Vec<SocketAddr>, Vec<SocketAddr>) =
        unique.into_iter().partition(SocketAddr::is_ipv6);
    let mut ordered = Vec::with_capacity(v6.len() + v4.len());
    let (mut v6, mut v4) = (v6.into_iter(), v4.into_iter());
    loop {
        match (v6.next(), v4.next()) {
            (None, None) => return ordered,
            (six, four) => ordered.extend(six.into_iter().chain(four)),
        }
    }
}

/// Races connections to `addrs` (see the module doc) with `connect`. Returns
/// the winner and its address, or the address and error of the attempt that
/// failed last (`None` for an empty list).
pub async fn race<S, F, Fut>(
    addrs: &[SocketAddr],
    delay: Duration,
    timeout: Duration,
    connect: F,
) -> Result<(S, SocketAddr), Option<(SocketAddr, AttemptError)>>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<S>> + Send + 'static,
    S: Send + 'static,
{
    let mut queue = order(addrs).into_iter();
    // Dropping the set aborts the attempts still pending: their sockets close.
    let mut attempts = JoinSet::new();
    let mut last_error = None;
    let mut start_next = true;
    loop {
        if start_next {
            if let Some(addr) = queue.next() {
                let attempt = connect(addr);
                attempts.spawn(async move {
                    let result = match tokio::time::timeout(timeout, attempt).await {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(err)) => Err(AttemptError::Io(err)),
                        Err(_) => Err(AttemptError::Timeout),
                    };
                    (addr, result)
                });
            }
        }
        if attempts.is_empty() {
            return Err(last_error);
        }
        let more = queue.len() > 0;
        tokio::select! {
            joined = attempts.join_next() => match joined {
                Some(Ok((addr, Ok(stream)))) => return Ok((stream, addr)),
                Some(Ok((addr, Err(err)))) => {
                    last_error = Some((addr, err));
                    start_next = true;
                }
                // Attempts are never aborted while the set lives; a panic
                // counts as a failed attempt.
                Some(Err(_)) | None => start_next = true,
            },
            () = tokio::time::sleep(delay), if more => start_next = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use tokio::time::Instant;

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn order_interleaves_families_ipv6_first_and_drops_duplicates() {
        let given = [
            addr("192.0.2.1:443"),
            addr("192.0.2.2:443"),
            addr("192.0.2.1:443"),
            addr("192.0.2.3:443"),
            addr("[2001:db8::1]:443"),
        ];
        assert_eq!(
            order(&given),
            [
                addr("[2001:db8::1]:443"),
                addr("192.0.2.1:443"),
                addr("192.0.2.2:443"),
                addr("192.0.2.3:443"),
            ]
        );
        let v6_only = [addr("[2001:db8::1]:1"), addr("[2001:db8::2]:1")];
        assert_eq!(order(&v6_only), v6_only);
        assert!(order(&[]).is_empty());
    }

    /// What a scripted address does when connected to.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Connects after this long.
        Accept(u64),
        /// Refuses after this long.
        Refuse(u64),
        /// Never answers.
        BlackHole,
    }

    /// A connect step that follows `script` and records when each address
    /// was tried (ms since `start`) and which attempts were dropped unfinished.
    struct Scripted {
        script: HashMap<SocketAddr, Behaviour>,
        start: Instant,
        tried: Arc<Mutex<Vec<(SocketAddr, u64)>>>,
        dropped: Arc<Mutex<Vec<SocketAddr>>>,
    }

    /// Records its address in `dropped` unless disarmed.
    struct DropGuard(Option<(SocketAddr, Arc<Mutex<Vec<SocketAddr>>>)>);

    impl Drop for DropGuard {
        fn drop(&mut self) {
            if let Some((addr, dropped)) = self.0.take() {
                dropped.lock().unwrap().push(addr);
            }
        }
    }

    impl Scripted {
        fn new(script: &[(&str, Behaviour)]) -> Self {
            Self {
                script: script.iter().map(|(a, b)| (addr(a), *b)).collect(),
                start: Instant::now(),
                tried: Arc::default(),
                dropped: Arc::default(),
            }
        }

        fn connect(
            &self,
            addr: SocketAddr,
        ) -> impl Future<Output = io::Result<SocketAddr>> + Send + 'static {
            let behaviour = self.script[&addr];
            self.tried
                .lock()
                .unwrap()
                .push((addr, self.start.elapsed().as_millis() as u64));
            let dropped = self.dropped.clone();
            async move {
                let mut guard = DropGuard(Some((addr, dropped)));
                let result = match behaviour {
                    Behaviour::Accept(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(addr)
                    }
                    Behaviour::Refuse(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Err(io::ErrorKind::ConnectionRefused.into())
                    }
                    Behaviour::BlackHole => std::future::pending().await,
                };
                guard.0 = None;
                result
            }
        }

        fn tried(&self) -> Vec<(SocketAddr, u64)> {
            self.tried.lock().unwrap().clone()
        }
    }

    const DELAY: Duration = Duration::from_millis(250);
    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_black_holed_ipv6_address_costs_one_delay() {
        let net = Scripted::new(&[
            ("[2001:db8::1]:443", Behaviour::BlackHole),
            ("192.0.2.1:443", Behaviour::Accept(10)),
        ]);
        let addrs = [addr("192.0.2.1:443"), addr("[2001:db8::1]:443")];
        let (won, at) = race(&addrs, DELAY, TIMEOUT, |a| net.connect(a))
            .await
            .unwrap();
        assert_eq!(won, addr("192.0.2.1:443"));
        assert_eq!(at, won);
        assert_eq!(
            net.tried(),
            [(addr("[2001:db8::1]:443"), 0), (addr("192.0.2.1:443"), 250)]
        );
        assert_eq!(net.start.elapsed(), Duration::from_millis(260));
        // The pending IPv6 attempt was dropped when the race ended.
        tokio::task::yield_now().await;
        assert_eq!(*net.dropped.lock().unwrap(), [addr("[2001:db8::1]:443")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_starts_the_next_attempt_at_once() {
        let net = Scripted::new(&[
            ("[2001:db8::1]:443", Behaviour::Refuse(20)),
            ("192.0.2.1:443", Behaviour::Refuse(30)),
            ("[2001:db8::2]:443", Behaviour::Accept(5)),
        ]);
        let addrs = [
            addr("[2001:db8::1]:443"),
            addr("[2001:db8::2]:443"),
            addr("192.0.2.1:443"),
        ];
        let (won, _) = race(&addrs, DELAY, TIMEOUT, |a| net.connect(a))
            .await
            .unwrap();
        assert_eq!(won, addr("[2001:db8::2]:443"));
        assert_eq!(
            net.tried(),
            [
                (addr("[2001:db8::1]:443"), 0),
                (addr("192.0.2.1:443"), 20),
                (addr("[2001:db8::2]:443"), 50),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_to_connect_wins_even_if_started_later() {
        let net = Scripted::new(&[
            ("[2001:db8::1]:443", Behaviour::Accept(1000)),
            ("192.0.2.1:443", Behaviour::Accept(100)),
        ]);
        let addrs = [addr("[2001:db8::1]:443"), addr("192.0.2.1:443")];
        let (won, _) = race(&addrs, DELAY, TIMEOUT, |a| net.connect(a))
            .await
            .unwrap();
        assert_eq!(won, addr("192.0.2.1:443"));
        assert_eq!(net.start.elapsed(), Duration::from_millis(350));
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_fail_the_last_failure_is_reported() {
        let net = Scripted::new(&[
            ("[2001:db8::1]:443", Behaviour::BlackHole),
            ("192.0.2.1:443", Behaviour::Refuse(10)),
        ]);
        let addrs = [addr("[2001:db8::1]:443"), addr("192.0.2.1:443")];
        let timeout = Duration::from_secs(2);
        let failed = race(&addrs, DELAY, timeout, |a| net.connect(a))
            .await
            .unwrap_err()
            .unwrap();
        assert_eq!(failed.0, addr("[2001:db8::1]:443"));
        assert!(matches!(failed.1, AttemptError::Timeout));
        assert_eq!(net.start.elapsed(), timeout);
        let none = race(&[], DELAY, timeout, |a| net.connect(a)).await;
        assert!(matches!(none, Err(None)));
    }
}
