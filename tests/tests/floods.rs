//! Floods on every data plane, each with healthy tunnels running alongside
//! whose bytes are checked exactly, and each followed by a check that the proxy
//! is back where it started (no more descriptors than before and, on sockmap,
//! no map entry left) with its memory within bounds:
//!
//! - slowloris: 2,000 clients sending a request head one byte a second, all cut
//!   by the request deadline;
//! - header floods: concurrent clients sending heads over 64 KiB and heads of
//!   thousands of lines, each answered 431 without an upstream connection;
//! - as many open tunnels as RLIMIT_NOFILE allows, one of them busy;
//! - connection churn as fast as the machine goes, bounded in count and time.
//!
//! The tests take turns: each measures one proxy's memory, descriptors or rate,
//! and side by side they would share two CPUs and this process's descriptors.
//!
//! Each test ends by checking that every tunnel it opened ran on the data plane
//! it is aimed at: from the JSON access log, or, where the access log goes to
//! /dev/null, from `/metrics` (`--admin`).

use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    ops::Range,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use spliced_tests::{
    echo::EchoProcess,
    healthy::Healthy,
    open_tunnel,
    proxy::Peaks,
    status_of,
    upstream::{exchange, Header},
    wait_until, Mode, Proxy, Upstream, CONNECT_OK,
};

const MIB: u64 = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test of this file at a time (a failed one does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Samples `proxy` every `every` until all `workers` have finished.
fn peaks_until_done<T>(proxy: &Proxy, workers: &[JoinHandle<T>], every: Duration) -> Peaks {
    let mut peaks = Peaks::default();
    while !workers.iter().all(JoinHandle::is_finished) {
        peaks.sample(proxy);
        std::thread::sleep(every);
    }
    peaks
}

/// A proxy on `plane` allowing `ports`, with `extra` arguments; its access
/// log is JSON (which names each tunnel's data plane).
fn proxy_for(plane: &str, ports: &[u16], extra: &[&str]) -> Proxy {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let ports = ports.join(",");
    let mut args = vec![
        "--dataplane",
        plane,
        "--connect-ports",
        &ports,
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// Arguments of a proxy whose access log goes to /dev/null: the planes of its
/// tunnels are read from `/metrics` (see [`Proxy::assert_tunnels_ran_on_by_metrics`]).
const NO_ACCESS_LOG: [&str; 4] = ["--access-log", "/dev/null", "--admin", "127.0.0.1:0"];

/// What the proxy held before a flood.
struct Baseline {
    fds: usize,
    rss_kib: u64,
}

impl Baseline {
    fn take(proxy: &Proxy) -> Self {
        Self {
            fds: proxy.fd_count(),
            rss_kib: proxy.rss_kib(),
        }
    }

    /// Waits (at most 20 s) until the proxy holds no more descriptors than
    /// before and, on sockmap, no entry in FLOWS or either sockhash; fails the
    /// test otherwise. Returns how long it took.
    fn assert_recovered(&self, proxy: &mut Proxy, plane: &str) -> Duration {
        proxy.assert_alive();
        let started = Instant::now();
        let map_entries = |proxy: &Proxy| {
            let stats = proxy.stats();
            ["flows", "spliced_sockets", "target_sockets"].map(|key| {
                *stats
                    .get(key)
                    .unwrap_or_else(|| panic!("no {key} in the stats {stats:?}"))
            })
        };
        let back = wait_until(Duration::from_secs(20), || {
            proxy.fd_count() <= self.fds && (plane != "sockmap" || map_entries(proxy) == [0; 3])
        });
        assert!(
            back,
            "{plane}: not back to the baseline 20 s after the flood: {} fds (baseline {}){}\n{}",
            proxy.fd_count(),
            self.fds,
            if plane == "sockmap" {
                format!(", map entries {:?}", map_entries(proxy))
            } else {
                String::new()
            },
            proxy.stderr()
        );
        proxy.assert_alive();
        started.elapsed()
    }
}

/// A listener the flooding requests name as their target: none of them may
/// get as far as connecting to it. It never accepts, so a connection made
/// would wait in its queue.
struct Unreachable(TcpListener);

impl Unreachable {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).unwrap();
        Self(listener)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    fn assert_untouched(&self, plane: &str) {
        match self.0.accept() {
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("{plane}: the proxy connected upstream (from {peer})"),
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Slow clients of the slowloris test.
const SLOW_CLIENTS: usize = 2_000;
/// The request deadline they run into (`--request-timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A client sending its request head one byte a second.
struct SlowClient {
    stream: TcpStream,
    connected: Instant,
    sent: usize,
    answer: Vec<u8>,
}

/// 2,000 clients send a request head one byte a second: every one is cut by
/// the 2 s request deadline with a 408 (or at least a close) within 1.5 s of
/// it, no upstream connection is made, the healthy tunnels keep working, and
/// the proxy returns to its baseline.
fn slowloris(plane: &str) {
    let _serial = serial();
    let target = Unreachable::new();
    let healthy_upstream = Upstream::start();
    let mut proxy = proxy_for(
        plane,
        &[target.port(), healthy_upstream.addr.port()],
        &["--request-timeout", &REQUEST_TIMEOUT.as_secs().to_string()],
    );
    let baseline = Baseline::take(&proxy);
    let healthy = Healthy::until_checked(proxy.addr, healthy_upstream);
    let port = target.port();
    let head = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: {}\r\n\r\n",
        "z".repeat(64)
    )
    .into_bytes();
    let started = Instant::now();
    let mut clients: Vec<SlowClient> = (0..SLOW_CLIENTS)
        .map(|_| {
            let stream = TcpStream::connect(proxy.addr).expect("connect to proxy");
            let connected = Instant::now();
            stream.set_nonblocking(true).unwrap();
            SlowClient {
                stream,
                connected,
                sent: 0,
                answer: Vec::new(),
            }
        })
        .collect();
    let opened_in = started.elapsed();
    // (time from connect to the proxy's close, what it answered), or an error.
    let mut cut: Vec<Result<(Duration, Vec<u8>), String>> = Vec::with_capacity(SLOW_CLIENTS);
    let mut peaks = Peaks::default();
    let mut next_byte = Instant::now();
    let give_up = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(5);
    let mut buf = [0u8; 1024];
    while !clients.is_empty() && Instant::now() < give_up {
        let send = Instant::now() >= next_byte;
        if send {
            next_byte += Duration::from_secs(1);
        }
        clients.retain_mut(|client| match client.stream.read(&mut buf) {
            Ok(0) => {
                let answer = std::mem::take(&mut client.answer);
                cut.push(Ok((client.connected.elapsed(), answer)));
                false
            }
            Ok(n) => {
                client.answer.extend_from_slice(&buf[..n]);
                true
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                if send && client.answer.is_empty() && client.sent < head.len() {
                    match client.stream.write(&head[client.sent..=client.sent]) {
                        Ok(n) => client.sent += n,
                        Err(err) => {
                            cut.push(Err(format!("write: {err}")));
                            return false;
                        }
                    }
                }
                true
            }
            Err(err) => {
                cut.push(Err(format!(
                    "read {:?} after connecting, {} answer bytes before: {err}",
                    client.connected.elapsed(),
                    client.answer.len()
                )));
                false
            }
        });
        peaks.sample(&proxy);
        std::thread::sleep(Duration::from_millis(50));
    }
    let Peaks {
        rss_kib: peak_rss,
        fds: peak_fds,
    } = peaks;
    let all_cut_in = started.elapsed();
    let exchanges = healthy.assert_exact();
    assert!(
        clients.is_empty(),
        "{plane}: {} of {SLOW_CLIENTS} slow clients still connected {all_cut_in:?} after the first \
         connect (request deadline {REQUEST_TIMEOUT:?})",
        clients.len()
    );
    let errors: Vec<&String> = cut.iter().filter_map(|c| c.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{plane}: {} slow clients cut uncleanly, first: {}",
        errors.len(),
        errors[0]
    );
    let cut: Vec<(Duration, Vec<u8>)> = cut.into_iter().map(Result::unwrap).collect();
    let answered_408 = cut
        .iter()
        .filter(|(_, answer)| status_of(&String::from_utf8_lossy(answer)) == 408)
        .count();
    let closed_silently = cut.iter().filter(|(_, answer)| answer.is_empty()).count();
    assert_eq!(
        answered_408 + closed_silently,
        SLOW_CLIENTS,
        "{plane}: answers other than 408: {:?}",
        cut.iter()
            .map(|(_, answer)| String::from_utf8_lossy(answer))
            .find(|answer| !answer.is_empty() && status_of(answer) != 408)
    );
    let earliest = cut.iter().map(|(t, _)| *t).min().unwrap();
    let latest = cut.iter().map(|(t, _)| *t).max().unwrap();
    // Measured from the client's connect, which precedes the proxy's accept.
    assert!(
        earliest >= REQUEST_TIMEOUT,
        "{plane}: a slow client was cut after {earliest:?}, before the deadline"
    );
    assert!(
        latest <= REQUEST_TIMEOUT + Duration::from_millis(1500),
        "{plane}: a slow client was cut only {latest:?} after connecting"
    );
    target.assert_untouched(plane);
    let recovered_in = baseline.assert_recovered(&mut proxy, plane);
    let growth_kib = peak_rss.saturating_sub(baseline.rss_kib);
    eprintln!(
        "{plane} slowloris: {SLOW_CLIENTS} clients connected in {opened_in:.2?}, {answered_408} \
         answered 408 and {closed_silently} closed without one, between {earliest:.2?} and \
         {latest:.2?} after connecting; proxy fds {} → peak {peak_fds}, RSS {} KiB → peak \
         {peak_rss} KiB ({} KiB per slow client); {exchanges} healthy exchanges; back to the \
         baseline in {recovered_in:.2?}",
        baseline.fds,
        baseline.rss_kib,
        growth_kib / SLOW_CLIENTS as u64,
    );
    assert!(
        growth_kib < SLOW_CLIENTS as u64 * 64,
        "{plane}: RSS grew by {growth_kib} KiB for {SLOW_CLIENTS} slow clients"
    );
    // The slow clients never got a tunnel: only the healthy ones count.
    proxy.assert_tunnels_ran_on(plane, exchanges);
}

/// Threads of the header floods, and requests each sends one after the other.
const FLOOD_THREADS: usize = 64;
const FLOOD_REQUESTS_PER_THREAD: usize = 8;

/// Request heads that break the limits of 64 KiB and 128 fields, each with
/// what it is.
fn oversized_heads(port: u16) -> Vec<(&'static str, Vec<u8>)> {
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    let fields = |count: usize| -> String {
        (0..count)
            .map(|i| format!("X-F{i:05}: v\r\n"))
            .collect::<String>()
    };
    vec![
        (
            "one 96 KiB field",
            format!("{request}X-Big: {}\r\n\r\n", "b".repeat(96 * 1024)).into_bytes(),
        ),
        (
            "256 KiB that never end",
            format!("{request}X-Endless: {}", "e".repeat(256 * 1024)).into_bytes(),
        ),
        (
            "3,000 fields in 39 KiB",
            format!("{request}{}\r\n", fields(3_000)).into_bytes(),
        ),
        (
            "20,000 fields in 254 KiB",
            format!("{request}{}\r\n", fields(20_000)).into_bytes(),
        ),
    ]
}

/// 64 clients at a time send heads over 64 KiB and heads of thousands of
/// fields, as a client does: all of it, then it reads the answer. Every one
/// gets a 431, none makes an upstream connection, the proxy's memory grows by
/// no more than the heads in flight, the healthy tunnels keep working, and the
/// proxy returns to its baseline.
fn header_floods(plane: &str) {
    let _serial = serial();
    let target = Unreachable::new();
    let healthy_upstream = Upstream::start();
    let mut proxy = proxy_for(plane, &[target.port(), healthy_upstream.addr.port()], &[]);
    let baseline = Baseline::take(&proxy);
    let healthy = Healthy::until_checked(proxy.addr, healthy_upstream);
    let heads = Arc::new(oversized_heads(target.port()));
    let addr = proxy.addr;
    let started = Instant::now();
    let workers: Vec<_> = (0..FLOOD_THREADS)
        .map(|worker| {
            let heads = heads.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for i in 0..FLOOD_REQUESTS_PER_THREAD {
                    let (kind, head) = &heads[(worker + i) % heads.len()];
                    let mut stream = TcpStream::connect(addr).expect("connect to proxy");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    stream
                        .set_write_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    // The proxy answers before it has read everything; what it
                    // does not read is drained before it closes.
                    let written = stream.write_all(head);
                    let mut answer = Vec::new();
                    let read = stream.read_to_end(&mut answer);
                    answers.push((*kind, written.err(), read.err(), answer));
                }
                answers
            })
        })
        .collect();
    let Peaks {
        rss_kib: peak_rss,
        fds: peak_fds,
    } = peaks_until_done(&proxy, &workers, Duration::from_millis(10));
    let flood_secs = started.elapsed().as_secs_f64();
    let exchanges = healthy.assert_exact();
    let mut per_kind: HashMap<&str, usize> = HashMap::new();
    for worker in workers {
        for (kind, written, read, answer) in worker.join().expect("flood worker") {
            let answer = String::from_utf8_lossy(&answer);
            assert_eq!(
                status_of(&answer),
                431,
                "{plane}: {kind}: answer {answer:?} (write error {written:?}, read error {read:?})"
            );
            assert!(
                answer.ends_with("request head too large\n"),
                "{plane}: {kind}: incomplete answer {answer:?}"
            );
            *per_kind.entry(kind).or_default() += 1;
        }
    }
    target.assert_untouched(plane);
    let recovered_in = baseline.assert_recovered(&mut proxy, plane);
    let requests = FLOOD_THREADS * FLOOD_REQUESTS_PER_THREAD;
    let growth_kib = peak_rss.saturating_sub(baseline.rss_kib);
    eprintln!(
        "{plane} header floods: {requests} oversized heads from {FLOOD_THREADS} concurrent \
         clients ({per_kind:?}) all answered 431 in {flood_secs:.2} s ({:.0}/s); proxy fds {} → \
         peak {peak_fds}, RSS {} KiB → peak {peak_rss} KiB (+{growth_kib} KiB); {exchanges} \
         healthy exchanges; back to the baseline in {recovered_in:.2?}",
        requests as f64 / flood_secs,
        baseline.fds,
        baseline.rss_kib,
    );
    // Each client in flight may hold a 64 KiB head and a read buffer in the
    // proxy; everything beyond that is a leak.
    assert!(
        growth_kib < FLOOD_THREADS as u64 * 256 + 16 * 1024,
        "{plane}: RSS grew by {growth_kib} KiB during the header floods"
    );
    // The floods got 431s, not tunnels: only the healthy ones count.
    proxy.assert_tunnels_ran_on(plane, exchanges);
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children, the
/// proxy among them, inherit it) and returns it.
fn raise_nofile_to_hard_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Descriptors of this process.
fn own_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Most RSS an idle tunnel may cost on any plane, in KiB. Measured: ~8 on
/// sockmap and splice, ~16 on copy, whose 256 KiB buffers are mappings that
/// become resident only as far as bytes went (from the heap, zeroed, they cost
/// ~273).
const RSS_BOUND_KIB_PER_TUNNEL: u64 = 64;

/// Opens tunnels `numbers` to the echo server from 32 threads; each echoes its
/// 8-byte number before it counts as open.
fn open_echo_tunnels(proxy: SocketAddr, echo: SocketAddr, numbers: Range<usize>) -> Vec<TcpStream> {
    const THREADS: usize = 32;
    let target = echo.to_string();
    let workers: Vec<_> = (0..THREADS)
        .map(|worker| {
            let target = target.clone();
            std::thread::spawn(move || {
                (numbers.start + worker..numbers.end)
                    .step_by(THREADS)
                    .map(|i| {
                        let mut stream = open_tunnel(proxy, &target);
                        echo_tag(&mut stream, i as u64);
                        stream
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("tunnel opener"))
        .collect()
}

/// Sends `tag` through an open tunnel to the echo server and checks it comes back.
fn echo_tag(stream: &mut TcpStream, tag: u64) {
    stream.write_all(&tag.to_le_bytes()).expect("send tag");
    let mut back = [0u8; 8];
    stream.read_exact(&mut back).expect("read echoed tag");
    assert_eq!(u64::from_le_bytes(back), tag, "echo of tunnel {tag}");
}

/// As many open tunnels as the descriptor limit allows (target 10,000), with
/// their upstream ends in a separate echo process so that this process holds
/// only the client ends. The hard RLIMIT_NOFILE here is 20,000 and cannot be
/// raised (no CAP_SYS_RESOURCE), and the proxy needs 2 descriptors per idle
/// tunnel (splice: 6 while it held two pipes for good, 2 since pipes live only
/// while bytes are in flight): the count is the largest multiple of 100 that
/// fits next to the proxy's baseline descriptors, the busy and healthy tunnels
/// and a margin of 64, with the descriptors per idle tunnel measured on the
/// first 100 tunnels (9,900 tunnels at 2 descriptors each, 3,300 at 6). Each tunnel echoes a few
/// bytes; RSS per tunnel is bounded; one busy tunnel among them moves 64 MiB
/// each way byte-exact; all is released when they close. A second round of as
/// many tunnels must fit in the memory the first left behind (an allocator may
/// keep freed memory, but must reuse it).
fn many_open_tunnels(plane: &str) {
    let _serial = serial();
    let limit = raise_nofile_to_hard_limit();
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let busy_upstream = Upstream::start();
    let mut healthy_upstream = Some(Upstream::start());
    let healthy_port = healthy_upstream.as_ref().unwrap().addr.port();
    let mut proxy = proxy_for(
        plane,
        &[echo.addr.port(), busy_upstream.addr.port(), healthy_port],
        &NO_ACCESS_LOG,
    );
    let baseline = Baseline::take(&proxy);
    const PROBE: usize = 100;
    let probe = open_echo_tunnels(proxy.addr, echo.addr, 0..PROBE);
    // Once idle: splice closes a direction's pipe when its bytes have gone out.
    let mut fds = proxy.fd_count();
    wait_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(100));
        let last = std::mem::replace(&mut fds, proxy.fd_count());
        last == fds
    });
    let per_tunnel = (fds - baseline.fds).div_ceil(PROBE);
    drop(probe);
    baseline.assert_recovered(&mut proxy, plane);
    assert!(
        echo.wait_idle(Duration::from_secs(10)),
        "{plane}: the echo server still holds {} connections",
        echo.connections()
    );
    // Room for the busy tunnel and up to 7 healthy ones (3 open, some closing),
    // at up to 6 descriptors each (two sockets, two pipes in flight on splice).
    let room = limit.saturating_sub(baseline.fds + 8 * 6 + 64) / per_tunnel;
    let count = room.min(10_000) / 100 * 100;
    assert!(
        count >= 1_000,
        "{plane}: RLIMIT_NOFILE {limit} leaves room for only {count} tunnels"
    );
    assert!(
        own_fd_count() + count + 256 < limit,
        "this process has {} descriptors open: no room for {count} client ends under {limit}",
        own_fd_count()
    );

    // Tunnels opened so far, each of which must have run on `plane`.
    let mut tunnels_opened = PROBE;
    let mut rss_open = Vec::new();
    for round in 1..=2 {
        let started = Instant::now();
        let mut tunnels = open_echo_tunnels(proxy.addr, echo.addr, 0..count);
        let opened_in = started.elapsed();
        tunnels_opened += count;
        rss_open.push(proxy.rss_kib());
        assert_eq!(
            echo.connections(),
            count,
            "{plane}: the echo server does not hold one connection per tunnel"
        );
        // The last ones may still hold a pipe for a moment on splice.
        let expected_fds = baseline.fds + count * per_tunnel + 8;
        assert!(
            wait_until(Duration::from_secs(5), || proxy.fd_count() <= expected_fds),
            "{plane}: {} proxy fds for {count} tunnels (baseline {})",
            proxy.fd_count(),
            baseline.fds
        );
        let fds_open = proxy.fd_count();
        eprintln!(
            "{plane} open tunnels, round {round}: {count} (fd limit {limit}, {per_tunnel} fds \
             each) opened and echoing in {opened_in:.2?}; proxy fds {} → {fds_open}, RSS {} KiB → \
             {} KiB",
            baseline.fds,
            baseline.rss_kib,
            rss_open[round - 1]
        );
        if round == 1 {
            // Among them, a busy tunnel and the healthy ones.
            let healthy = Healthy::start(proxy.addr, healthy_upstream.take().unwrap());
            let busy_started = Instant::now();
            let h = Header {
                up: 64 * MIB,
                down: 64 * MIB,
                seed: 50_000,
                mode: Mode::Concurrent,
            };
            let target = busy_upstream.addr.to_string();
            let busy = exchange(open_tunnel(proxy.addr, &target), h, false);
            let busy_secs = busy_started.elapsed().as_secs_f64();
            assert_eq!(
                busy.received,
                Ok(64 * MIB),
                "{plane}: busy tunnel, client side"
            );
            assert_eq!(
                busy_upstream.result().received,
                Ok(64 * MIB),
                "{plane}: busy tunnel, upstream side"
            );
            let exchanges = healthy.assert_exact();
            tunnels_opened += 1 + exchanges;
            // The idle ones still carry bytes.
            for (i, stream) in tunnels.iter_mut().enumerate().step_by(97) {
                echo_tag(stream, (i as u64) << 32);
            }
            eprintln!(
                "{plane} open tunnels: busy tunnel 64 MiB each way in {busy_secs:.2} s ({:.1} \
                 Gbit/s) beside {exchanges} healthy exchanges; RSS {} KiB",
                2.0 * 64.0 * 8.0 * 1.048_576 / 1000.0 / busy_secs,
                proxy.rss_kib()
            );
        }
        let closing = Instant::now();
        drop(tunnels);
        let recovered_in = baseline.assert_recovered(&mut proxy, plane);
        assert!(
            echo.wait_idle(Duration::from_secs(10)),
            "{plane}: the echo server still holds {} connections",
            echo.connections()
        );
        eprintln!(
            "{plane} open tunnels, round {round}: closed and back to the baseline in {:.2?} \
             ({recovered_in:.2?} of waiting); RSS after {} KiB",
            closing.elapsed(),
            proxy.rss_kib()
        );
    }
    let kib_per_tunnel = rss_open[0].saturating_sub(baseline.rss_kib) as f64 / count as f64;
    eprintln!("{plane} open tunnels: {kib_per_tunnel:.1} KiB of RSS per tunnel");
    assert!(
        kib_per_tunnel < RSS_BOUND_KIB_PER_TUNNEL as f64,
        "{plane}: {kib_per_tunnel:.1} KiB of RSS per open tunnel (bound \
         {RSS_BOUND_KIB_PER_TUNNEL})"
    );
    let first_growth = rss_open[0].saturating_sub(baseline.rss_kib);
    assert!(
        rss_open[1] <= rss_open[0] + first_growth / 10 + 8 * 1024,
        "{plane}: the second round of {count} tunnels took RSS to {} KiB, the first to {} KiB: \
         memory of closed tunnels is not reused",
        rss_open[1],
        rss_open[0]
    );
    proxy.assert_tunnels_ran_on_by_metrics(plane, tunnels_opened as u64);
}

/// How long churn runs at most, and how many tunnels it opens at most.
const CHURN_TIME: Duration = Duration::from_secs(8);
const CHURN_MAX: u64 = 50_000;
const CHURN_THREADS: usize = 16;

/// What one churned tunnel came to.
enum Churned {
    Exchanged,
    /// A clean refusal: an HTTP 5xx answer and a close.
    Refused(u16),
    Failed(String),
}

/// Opens a tunnel to the echo server, exchanges 8 bytes, half-closes, and
/// waits for the proxy's close.
fn churn_one(proxy: SocketAddr, target: &str, tag: u64) -> Churned {
    let step = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");
    let run = || -> Result<Churned, String> {
        let mut stream = TcpStream::connect(proxy).map_err(step("connect"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(step("timeout"))?;
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .map_err(step("send CONNECT"))?;
        let mut head = vec![0u8; CONNECT_OK.len()];
        let mut got = 0;
        while got < head.len() {
            match stream.read(&mut head[got..]).map_err(step("read answer"))? {
                0 => break,
                n => got += n,
            }
        }
        if head != CONNECT_OK {
            let mut answer = head[..got].to_vec();
            let _ = stream.read_to_end(&mut answer);
            let answer = String::from_utf8_lossy(&answer).into_owned();
            return match status_of(&answer) {
                status @ 500.. => Ok(Churned::Refused(status)),
                _ => Err(format!("answer {answer:?}")),
            };
        }
        stream.write_all(&tag.to_le_bytes()).map_err(step("send"))?;
        let mut back = [0u8; 8];
        stream.read_exact(&mut back).map_err(step("read echo"))?;
        if u64::from_le_bytes(back) != tag {
            return Err(format!("echo {back:?} of {tag}"));
        }
        stream.shutdown(Shutdown::Write).map_err(step("shutdown"))?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).map_err(step("read close"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the echo", rest.len()));
        }
        Ok(Churned::Exchanged)
    };
    run().unwrap_or_else(Churned::Failed)
}

/// 16 threads open a tunnel, exchange 8 bytes and close, as fast as they go,
/// for 8 s or 50,000 tunnels: nothing fails but for clean refusals, the
/// healthy tunnels keep working, and descriptors and map entries return to
/// the baseline.
fn churn(plane: &str) {
    let _serial = serial();
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let healthy_upstream = Upstream::start();
    let mut proxy = proxy_for(
        plane,
        &[echo.addr.port(), healthy_upstream.addr.port()],
        &NO_ACCESS_LOG,
    );
    let baseline = Baseline::take(&proxy);
    let healthy = Healthy::until_checked(proxy.addr, healthy_upstream);
    let (addr, target) = (proxy.addr, echo.addr.to_string());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + CHURN_TIME;
    let workers: Vec<_> = (0..CHURN_THREADS)
        .map(|_| {
            let (next, target) = (next.clone(), target.clone());
            std::thread::spawn(move || {
                let (mut exchanged, mut refused, mut failed) = (0u64, Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    let tag = next.fetch_add(1, Ordering::Relaxed);
                    if tag >= CHURN_MAX {
                        break;
                    }
                    match churn_one(addr, &target, tag) {
                        Churned::Exchanged => exchanged += 1,
                        Churned::Refused(status) => refused.push(status),
                        Churned::Failed(why) => failed.push(why),
                    }
                }
                (exchanged, refused, failed)
            })
        })
        .collect();
    let Peaks {
        rss_kib: peak_rss,
        fds: peak_fds,
    } = peaks_until_done(&proxy, &workers, Duration::from_millis(100));
    let (mut exchanged, mut refused, mut failed) = (0, Vec::new(), Vec::new());
    for worker in workers {
        let (e, r, f) = worker.join().expect("churn worker");
        exchanged += e;
        refused.extend(r);
        failed.extend(f);
    }
    let secs = started.elapsed().as_secs_f64();
    let exchanges = healthy.assert_exact();
    assert!(
        failed.is_empty(),
        "{plane}: {} of {} churned tunnels failed, first: {}",
        failed.len(),
        exchanged as usize + refused.len() + failed.len(),
        failed[0]
    );
    let recovered_in = baseline.assert_recovered(&mut proxy, plane);
    assert!(
        echo.wait_idle(Duration::from_secs(10)),
        "{plane}: the echo server still holds {} connections",
        echo.connections()
    );
    let rss_end = proxy.rss_kib();
    eprintln!(
        "{plane} churn: {exchanged} tunnels opened, echoed and closed in {secs:.2} s by \
         {CHURN_THREADS} threads ({:.0}/s), {} refused cleanly {refused:?}; proxy fds {} → peak \
         {peak_fds}, RSS {} KiB → peak {peak_rss} KiB → {rss_end} KiB; {exchanges} healthy \
         exchanges; back to the baseline in {recovered_in:.2?}",
        exchanged as f64 / secs,
        refused.len(),
        baseline.fds,
        baseline.rss_kib,
    );
    assert!(exchanged > 0, "{plane}: no tunnel churned");
    assert!(
        rss_end < baseline.rss_kib + 64 * 1024,
        "{plane}: RSS grew from {} to {rss_end} KiB over the churn",
        baseline.rss_kib
    );
    // Refused requests got no tunnel; every exchanged one and every healthy
    // one did.
    proxy.assert_tunnels_ran_on_by_metrics(plane, exchanged + exchanges as u64);
}

spliced_tests::on_every_data_plane!(slowloris, header_floods, many_open_tunnels, churn);
