//! A soak: normal traffic mixed with faults and floods against one spliced
//! (sockmap data plane) for `SPLICED_SOAK_SECONDS` (default 30; `cargo xtask
//! soak --minutes N` sets it), with a byte-exact check of every healthy tunnel
//! and the proxy's RSS, descriptors and map entries compared with the baseline
//! at the end, and every tunnel checked to have run on the sockmap plane (from
//! `/metrics`, as the access log goes to /dev/null). Prints a report.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use spliced_tests::{
    open_tunnel,
    paused::PausedExchange,
    proxy::Peaks,
    raw_request, status_of,
    upstream::{exchange_with, Header, SPLICE_GRACE},
    wait_until, Mode, Proxy, Upstream,
};

#[derive(Default)]
struct Counters {
    tunnels: AtomicU64,
    bytes: AtomicU64,
    corrupt: AtomicU64,
    resets: AtomicU64,
    refused: AtomicU64,
    slow_clients_cut: AtomicU64,
    never_read: AtomicU64,
    paused_readers: AtomicU64,
    unexpected: AtomicU64,
}

impl Counters {
    /// Counts one healthy exchange: its bytes if both ends got exactly theirs,
    /// else a corrupt tunnel (and says which).
    fn record_exchange(
        &self,
        what: &str,
        h: Header,
        client: &Result<u64, String>,
        server: &Result<u64, String>,
    ) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        if *client == Ok(h.down) && *server == Ok(h.up) {
            self.bytes.fetch_add(h.up + h.down, Ordering::Relaxed);
        } else {
            eprintln!("corrupt {what} {h:?}: client {client:?} server {server:?}");
            self.corrupt.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A tiny xorshift, so runs differ in sizes but need no crate.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn soak() {
    let seconds: u64 = std::env::var("SPLICED_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let upstreams: Vec<Upstream> = (0..5).map(|_| Upstream::start()).collect();
    let paused_upstream = Upstream::start();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ports: Vec<String> = upstreams
        .iter()
        .map(|u| u.addr.port())
        .chain([paused_upstream.addr.port(), silent_port, closed_port])
        .map(|p| p.to_string())
        .collect();
    let proxy = Proxy::start(&[
        "--dataplane",
        "sockmap",
        "--connect-ports",
        &ports.join(","),
        "--request-timeout",
        "3",
        "--access-log",
        "/dev/null",
        // Each tunnel's data plane, for the check at the end.
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = proxy.addr;
    let baseline = (proxy.rss_kib(), proxy.fd_count(), proxy.stats());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut workers = Vec::new();

    // Healthy tunnels, byte-exact, 0 B to 3 MiB each way.
    for (worker, upstream) in upstreams.into_iter().enumerate() {
        let (stop, counters) = (stop.clone(), counters.clone());
        let reset_worker = worker == 4;
        workers.push(std::thread::spawn(move || {
            let target = upstream.addr.to_string();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (worker as u64 + 1);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let seed = (worker as u64) << 40 | i << 1;
                if reset_worker {
                    // Resets from both sides, alternately.
                    let mut stream = open_tunnel(addr, &target);
                    let opened = Instant::now();
                    if i.is_multiple_of(2) {
                        let h = Header {
                            up: 64 * 1024,
                            down: 0,
                            seed,
                            mode: Mode::ResetAfterRead,
                        };
                        stream.write_all(&h.encode()).unwrap();
                        let _ = spliced_tests::pattern::send(&mut stream, seed, 1 << 20);
                    } else {
                        let h = Header {
                            up: 8 << 20,
                            down: 8 << 20,
                            seed,
                            mode: Mode::Concurrent,
                        };
                        stream.write_all(&h.encode()).unwrap();
                        let _ = spliced_tests::pattern::send(&mut stream, seed, 256 * 1024);
                        // A reset the proxy's socket gets before sockmap spliced
                        // it sends the tunnel to splice (as a FIN would): reset
                        // mid-transfer, not before.
                        std::thread::sleep(SPLICE_GRACE.saturating_sub(opened.elapsed()));
                        socket2::SockRef::from(&stream)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                    }
                    drop(stream);
                    // A reset can beat the header to the upstream, which then has
                    // nothing to report.
                    let _ = upstream.result_within(Duration::from_secs(2));
                    counters.resets.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let up = next(&mut rng) % (3 << 20);
                let down = next(&mut rng) % (3 << 20);
                let mode = [Mode::Concurrent, Mode::AnswerAfterEof, Mode::ServerFirst]
                    [(next(&mut rng) % 3) as usize];
                let h = Header {
                    up,
                    down,
                    seed,
                    mode,
                };
                // A FIN of the client before sockmap spliced the tunnel would
                // send it to splice (a small upload ends that soon): the FIN
                // waits for the splice.
                let client = exchange_with(open_tunnel(addr, &target), h, false, SPLICE_GRACE);
                let server = upstream.result();
                counters.record_exchange("tunnel", h, &client.received, &server.received);
            }
        }));
    }

    // Healthy bulk tunnels whose client stops reading (and sending) half-way
    // for a moment: the sockmap plane holds the direction back and hands it
    // back to the kernel; byte-exact like the others.
    {
        let (stop, counters) = (stop.clone(), counters.clone());
        workers.push(std::thread::spawn(move || {
            let target = paused_upstream.addr.to_string();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let h = Header {
                    up: 48 << 20,
                    down: 48 << 20,
                    seed: 7 << 40 | i << 1,
                    mode: Mode::Concurrent,
                };
                let paused = PausedExchange::start(open_tunnel(addr, &target), h);
                std::thread::sleep(Duration::from_millis(300));
                let client = paused.finish();
                let server = paused_upstream.result();
                counters.paused_readers.fetch_add(1, Ordering::Relaxed);
                counters.record_exchange("paused tunnel", h, &client.received, &server.received);
            }
        }));
    }

    // Connect bursts to a closed port: every one must get a 502.
    {
        let (stop, counters) = (stop.clone(), counters.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let answer = raw_request(
                    addr,
                    format!("CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n").as_bytes(),
                );
                if status_of(&answer) == 502 {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.unexpected.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }

    // Slowloris: 50 clients sending one byte of a head a second; each is cut
    // off by the request deadline and comes back.
    {
        let (stop, counters) = (stop.clone(), counters.clone());
        workers.push(std::thread::spawn(move || {
            let head = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nX: ";
            let mut clients: Vec<(TcpStream, usize)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while clients.len() < 50 {
                    let stream = TcpStream::connect(addr).unwrap();
                    stream.set_nonblocking(true).unwrap();
                    clients.push((stream, 0));
                }
                clients.retain_mut(|(stream, sent)| {
                    let byte = [head[*sent % head.len()]];
                    *sent += 1;
                    let mut buf = [0u8; 512];
                    match stream.read(&mut buf) {
                        // The proxy answered (408) or closed: one slow client cut.
                        Ok(_) => {
                            counters.slow_clients_cut.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            stream.write(&byte).is_ok()
                        }
                        Err(_) => {
                            counters.slow_clients_cut.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    }
                });
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }

    // An upstream that never reads: push for a second, then give up.
    {
        let (stop, counters) = (stop.clone(), counters.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut stream = open_tunnel(addr, &format!("127.0.0.1:{silent_port}"));
                let (held, _) = silent.accept().unwrap();
                stream
                    .set_write_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let started = Instant::now();
                let chunk = vec![1u8; 256 * 1024];
                while started.elapsed() < Duration::from_secs(1) {
                    let _ = stream.write(&chunk);
                }
                let _ = stream.shutdown(Shutdown::Both);
                drop(stream);
                drop(held);
                counters.never_read.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Samples while it runs.
    let mut peaks = Peaks::default();
    while Instant::now() < deadline {
        std::thread::sleep(
            Duration::from_secs(5).min(deadline.saturating_duration_since(Instant::now())),
        );
        peaks.sample(&proxy);
    }
    let Peaks {
        rss_kib: peak_rss,
        fds: peak_fds,
    } = peaks;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("soak worker");
    }

    // Everything returns to the baseline once the load is gone.
    let settled = wait_until(Duration::from_secs(20), || {
        let stats = proxy.stats();
        proxy.fd_count() <= baseline.1 + 2
            && stats["flows"] == 0
            && stats["spliced_sockets"] == 0
            && stats["target_sockets"] == 0
    });
    let end = (proxy.rss_kib(), proxy.fd_count(), proxy.stats());
    let c = &counters;
    eprintln!(
        "soak {seconds} s: {} healthy tunnels ({} with a paused reader), {} MiB moved byte-exact, {} corrupt; {} resets, {} closed-port refusals, {} slow clients cut, {} never-read tunnels, {} unexpected answers",
        c.tunnels.load(Ordering::Relaxed),
        c.paused_readers.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed) >> 20,
        c.corrupt.load(Ordering::Relaxed),
        c.resets.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.slow_clients_cut.load(Ordering::Relaxed),
        c.never_read.load(Ordering::Relaxed),
        c.unexpected.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak RSS KiB start {} peak {peak_rss} end {}; fds start {} peak {peak_fds} end {}; map entries end flows={} spliced={} targets={}; flow-control pauses {} resumes {} copied {} MiB; retransmitted bytes trimmed {}, untrimmable {}",
        baseline.0, end.0, baseline.1, end.1, end.2["flows"], end.2["spliced_sockets"], end.2["target_sockets"], end.2["flow_control_pauses"],
        end.2["flow_control_resumes"], end.2["flow_control_copied_bytes"] >> 20, end.2["duplicate_bytes_trimmed"], end.2["trim_failed"],
    );
    assert_eq!(c.corrupt.load(Ordering::Relaxed), 0, "corrupt tunnels");
    assert_eq!(
        c.unexpected.load(Ordering::Relaxed),
        0,
        "unexpected answers"
    );
    assert!(c.tunnels.load(Ordering::Relaxed) > 0 && c.refused.load(Ordering::Relaxed) > 0);
    assert!(
        settled,
        "did not return to the baseline: fds {} → {}, stats {:?}",
        baseline.1, end.1, end.2
    );
    assert!(
        end.0 < baseline.0 + 64 * 1024,
        "RSS grew from {} to {} KiB",
        baseline.0,
        end.0
    );
    // Every tunnel ran on sockmap: the healthy and paused ones, the reset ones
    // and the never-read ones (refusals and slow clients got none).
    let opened = c.tunnels.load(Ordering::Relaxed)
        + c.resets.load(Ordering::Relaxed)
        + c.never_read.load(Ordering::Relaxed);
    proxy.assert_tunnels_ran_on_by_metrics("sockmap", opened);
}
