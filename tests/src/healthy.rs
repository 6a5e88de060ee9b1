//! Healthy tunnels running in the background beside a fault or a flood: every
//! exchange is checked byte-exact on both ends when they are joined.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    open_tunnel,
    upstream::{exchange, ClientResult, Header},
    Mode, Upstream,
};

const MIB: u64 = 1 << 20;
/// Exchanges running at once.
const WORKERS: u64 = 3;
/// Exchanges per worker of [`Healthy::start`].
const ROUNDS: u64 = 4;
/// Most exchanges per worker of [`Healthy::until_checked`] (every loop of a
/// test is bounded).
const MAX_ROUNDS: u64 = 10_000;
/// Pause between two exchanges of a worker of [`Healthy::until_checked`], so
/// that healthy traffic does not take the CPUs from what runs beside it.
const PAUSE: Duration = Duration::from_millis(50);

/// Three workers exchanging 4 MiB up and 3 MiB down at once, tunnel after
/// tunnel, through a proxy to their own upstream.
pub struct Healthy {
    workers: Vec<JoinHandle<Vec<(Header, ClientResult)>>>,
    upstream: Upstream,
    stop: Arc<AtomicBool>,
}

impl Healthy {
    /// Four exchanges per worker, then the workers end.
    pub fn start(proxy: SocketAddr, upstream: Upstream) -> Self {
        Self::spawn(proxy, upstream, false)
    }

    /// Exchanges until [`Self::assert_exact`] is called (at least one per worker,
    /// at most 10,000), pausing 50 ms between two: healthy traffic for the whole
    /// length of a flood, without taking the machine from it.
    pub fn until_checked(proxy: SocketAddr, upstream: Upstream) -> Self {
        Self::spawn(proxy, upstream, true)
    }

    fn spawn(proxy: SocketAddr, upstream: Upstream, until_checked: bool) -> Self {
        let target = upstream.addr.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = if until_checked { MAX_ROUNDS } else { ROUNDS };
        let workers = (0..WORKERS)
            .map(|worker| {
                let (target, stop) = (target.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut done = Vec::new();
                    for i in 0..rounds {
                        if until_checked && i > 0 {
                            std::thread::sleep(PAUSE);
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                        let h = Header {
                            up: 4 * MIB + i,
                            down: 3 * MIB + i,
                            // Unique per exchange: the server's results are matched by it.
                            seed: 10_000 + (worker << 32) + i * 2,
                            mode: Mode::Concurrent,
                        };
                        done.push((h, exchange(open_tunnel(proxy, &target), h, false)));
                    }
                    done
                })
            })
            .collect();
        Self {
            workers,
            upstream,
            stop,
        }
    }

    /// Stops the workers, waits for them and checks that every exchange moved
    /// exactly its bytes, uncorrupted, both ways. Returns how many there were.
    pub fn assert_exact(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut expected_up = HashMap::new();
        for worker in self.workers {
            for (h, result) in worker.join().expect("healthy worker") {
                assert_eq!(
                    result.received,
                    Ok(h.down),
                    "healthy tunnel {h:?} broke on the client side"
                );
                expected_up.insert(h.seed, h.up);
            }
        }
        let exchanges = expected_up.len();
        for _ in 0..exchanges {
            let server = self.upstream.result();
            let up = expected_up.remove(&server.seed);
            assert!(
                up.is_some() && server.received == Ok(up.unwrap()),
                "healthy upstream got {server:?}, expected Ok({up:?})"
            );
        }
        exchanges
    }
}
