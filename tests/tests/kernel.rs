//! The kernel behaviours of the sockmap data plane that lose or stall data
//! (see shared notes/sockmap.md and proxy-userspace/src/dataplane/sockmap.rs),
//! each shown twice: handled, the tunnel is exact; with the handling switched
//! off by a `--test-hook`, the same traffic breaks. Also: user space reads none
//! of a spliced tunnel's bytes, and nothing is left behind after thousands of
//! tunnels.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use spliced_tests::{
    open_tunnel, pattern, retransmit,
    upstream::{exchange, Header},
    wait_until, Mode, Netns, Proxy, Upstream, DATA_PLANES, IO_TIMEOUT,
};

const MIB: u64 = 1 << 20;

fn sockmap_proxy(upstream_port: u16, hooks: &[&str]) -> Proxy {
    sockmap_proxy_with(upstream_port, hooks, &[])
}

fn sockmap_proxy_with(upstream_port: u16, hooks: &[&str], extra: &[&str]) -> Proxy {
    let port = upstream_port.to_string();
    // The counters the tests read come from /metrics.
    let mut args = vec![
        "--dataplane",
        "sockmap",
        "--connect-ports",
        &port,
        "--log-format",
        "json",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    for hook in hooks {
        args.extend_from_slice(&["--test-hook", hook]);
    }
    Proxy::start(&args)
}

/// Bytes that reached a socket's receive queue before the socket was inserted
/// are only forwarded when the next segment arrives; if none comes, the tunnel
/// stalls. The SO_RCVLOWAT kick after insertion forwards them at once.
fn queued_before_insertion(hooks: &[&str]) -> (usize, usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_port = listener.local_addr().unwrap().port();
    // DelayBeforeSplice: 200 ms between the 200 and the insertion, so both
    // directions' first bytes are certainly queued before it.
    let mut all_hooks = vec!["delay-before-splice"];
    all_hooks.extend_from_slice(hooks);
    let proxy = sockmap_proxy(upstream_port, &all_hooks);
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(&[b's'; 40_000]).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut got = 0;
        let mut buf = [0u8; 65536];
        while got < 40_000 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let mut client = open_tunnel(proxy.addr, &format!("127.0.0.1:{upstream_port}"));
    client.write_all(&[b'c'; 40_000]).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut got = 0;
    let mut buf = [0u8; 65536];
    while got < 40_000 {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (got, server.join().unwrap())
}

#[test]
fn bytes_queued_before_insertion_are_forwarded() {
    assert_eq!(queued_before_insertion(&[]), (40_000, 40_000));
}

#[test]
fn without_the_rcvlowat_kick_queued_bytes_stall() {
    let (to_client, to_server) = queued_before_insertion(&["no-rcvlowat-kick"]);
    assert!(
        to_client < 40_000 || to_server < 40_000,
        "no stall without the kick: {to_client} {to_server}"
    );
}

fn half_close_exchange(
    hooks: &[&str],
    extra: &[&str],
) -> Vec<(Result<u64, String>, Result<u64, String>)> {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy_with(upstream.addr.port(), hooks, extra);
    (0..4)
        .map(|i| {
            let h = Header {
                up: 32 * MIB,
                down: 8 * MIB,
                seed: 300 + i * 2,
                mode: Mode::AnswerAfterEof,
            };
            let client = exchange(
                open_tunnel(proxy.addr, &upstream.addr.to_string()),
                h,
                false,
            );
            let server = upstream
                .result_within(Duration::from_secs(10))
                .map_or(Err("no result".to_owned()), |r| r.received);
            (server, client.received)
        })
        .collect()
}

/// EOF is propagated with shutdown(2) only after every byte redirected from the
/// closing side has reached the peer's send queue.
#[test]
fn half_close_waits_for_the_redirected_bytes() {
    for (server, client) in half_close_exchange(&[], &[]) {
        assert_eq!(server, Ok(32 * MIB));
        assert_eq!(client, Ok(8 * MIB));
    }
}

#[test]
fn without_the_drain_wait_half_close_cuts_data() {
    // Without the send-buffer raise the redirect backlog drains slowly enough
    // that an early shutdown reliably cuts it.
    let results = half_close_exchange(&["no-drain-wait"], &["--redirect-send-buffer", "0"]);
    assert!(
        results
            .iter()
            .any(|(server, client)| *server != Ok(32 * MIB) || *client != Ok(8 * MIB)),
        "shutting down at once lost nothing: {results:?}"
    );
}

/// A FIN without data reaches the verdict as an empty skb; redirecting it breaks
/// the peer's send path, so the verdict drops it.
#[test]
fn empty_fin_skbs_are_dropped_not_redirected() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &[]);
    let h = Header {
        up: 4 * MIB,
        down: 4 * MIB,
        seed: 400,
        mode: Mode::Concurrent,
    };
    let client = exchange(
        open_tunnel(proxy.addr, &upstream.addr.to_string()),
        h,
        false,
    );
    assert_eq!(upstream.result().received, Ok(h.up));
    assert_eq!(client.received, Ok(h.down));
    proxy.wait_json_records(1);
    let stats = proxy.stats();
    assert!(stats["zero_length_dropped"] >= 1, "{stats:?}");
    assert_eq!(stats["redirect_failed"], 0, "{stats:?}");
}

#[test]
fn redirecting_empty_fin_skbs_breaks_tunnels() {
    let results = half_close_exchange(&["redirect-empty-skbs"], &[]);
    assert!(
        results
            .iter()
            .any(|(server, client)| *server != Ok(32 * MIB) || *client != Ok(8 * MIB)),
        "redirecting empty skbs broke nothing: {results:?}"
    );
}

/// Both sockets go into the program-less redirect-target map before either goes
/// into the verdict map, so a redirect never finds its peer missing.
#[test]
fn insertion_order_leaves_no_window_for_failed_redirects() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &[]);
    for i in 0..50 {
        let h = Header {
            up: 100_000,
            down: 100_000,
            seed: 500 + i * 2,
            mode: Mode::Concurrent,
        };
        let client = exchange(
            open_tunnel(proxy.addr, &upstream.addr.to_string()),
            h,
            false,
        );
        assert_eq!(client.received, Ok(h.down));
        assert_eq!(upstream.result().received, Ok(h.up));
    }
    assert_eq!(proxy.stats()["redirect_failed"], 0);
}

#[test]
fn verdict_before_targets_loses_bytes() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // Accept and hold the connection; what arrives does not matter here.
    let _holder = std::thread::spawn(move || {
        upstream.accept().map(|(stream, _)| {
            std::thread::sleep(Duration::from_secs(2));
            drop(stream);
        })
    });
    let proxy = sockmap_proxy(upstream_addr.port(), &["verdict-before-targets"]);
    // The hook leaves 50 ms between the verdict map and the target map. Bytes that
    // arrive then are handed to a verdict whose peer is not yet a redirect target:
    // they are dropped. The client trickles bytes for 300 ms so some land there.
    let mut stream = open_tunnel(proxy.addr, &upstream_addr.to_string());
    for _ in 0..150 {
        stream.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let stats = proxy.stats();
    assert!(stats["redirect_failed"] > 0, "nothing lost: {stats:?}");
}

/// The request head is read in chunks that can end inside a queued segment; the
/// verdict gets whole segments (tcp_read_skb ignores what recvmsg copied out), so
/// the control plane empties the queue before the socket is spliced.
fn pipelined_segment(hooks: &[&str]) -> Result<u64, String> {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), hooks);
    let h = Header {
        up: 60_000,
        down: 1000,
        seed: 1100,
        mode: Mode::AnswerAfterEof,
    };
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let all = h.after_head_with_payload(&format!("CONNECT {0} HTTP/1.1\r\n\r\n", upstream.addr));
    // One write: on loopback the head and 60 kB arrive as one segment.
    stream.write_all(&all).unwrap();
    spliced_tests::expect_connect_ok(&mut stream);
    std::thread::sleep(Duration::from_millis(100));
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = spliced_tests::pattern::receive(&mut stream, h.seed + 1);
    upstream
        .result_within(Duration::from_secs(10))
        .map_or(Err("no result".into()), |r| r.received)
}

#[test]
fn half_read_segments_are_never_spliced() {
    for _ in 0..5 {
        assert_eq!(pipelined_segment(&[]), Ok(60_000));
    }
}

#[test]
fn without_the_queue_drain_half_read_segments_are_sent_twice() {
    let results: Vec<_> = (0..5)
        .map(|_| pipelined_segment(&["no-queue-drain"]))
        .collect();
    assert!(
        results.iter().any(|r| *r != Ok(60_000)),
        "nothing duplicated: {results:?}"
    );
}

/// A client that sent its payload and FIN before the 200 has a CLOSE_WAIT
/// socket, which a sockhash refuses; the tunnel goes to the fallback intact.
#[test]
fn close_wait_sockets_take_the_fallback() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &["delay-before-splice"]);
    let h = Header {
        up: 50_000,
        down: 3 * MIB,
        seed: 700,
        mode: Mode::AnswerAfterEof,
    };
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let all = h.after_head_with_payload(&format!("CONNECT {0} HTTP/1.1\r\n\r\n", upstream.addr));
    stream.write_all(&all).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    spliced_tests::expect_connect_ok(&mut stream);
    assert_eq!(
        spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap(),
        Ok(h.down)
    );
    assert_eq!(upstream.result().received, Ok(h.up));
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(record["dataplane"], "splice", "{record}");
    assert_eq!(record["bytes_to_client"], 39 + h.down);
}

/// EOF and close are learnt from sock_ops events over the ring buffer.
#[test]
fn flow_events_drive_the_tunnel_lifecycle() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &[]);
    for i in 0..20 {
        let h = Header {
            up: 1000,
            down: 1000,
            seed: 800 + i * 2,
            mode: Mode::AnswerAfterEof,
        };
        let mut stream = open_tunnel(proxy.addr, &upstream.addr.to_string());
        stream.write_all(&h.encode()).unwrap();
        spliced_tests::pattern::send(&mut stream, h.seed, h.up).unwrap();
        // Give the proxy time to splice before the FIN: a socket that has seen
        // its peer's FIN cannot be inserted and takes the fallback instead.
        std::thread::sleep(Duration::from_millis(100));
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap(),
            Ok(h.down)
        );
        upstream.result();
    }
    proxy.wait_json_records(20);
    let stats = proxy.stats();
    // At least one EOF-carrying state change per socket.
    assert!(stats["events_received"] >= 40, "{stats:?}");
    assert_eq!(stats["events_lost"], 0, "{stats:?}");
    // Every direction of every tunnel ended with the kernel's Drained event, whose
    // count is the one logged. The log comes through a pipe another thread
    // reads: the last lines may still be on their way.
    spliced_tests::wait_until(Duration::from_secs(10), || {
        let stderr = proxy.stderr();
        stderr.matches("sockmap tunnel ended").count()
            + stderr.matches("tunnel not spliced").count()
            >= 20
    });
    let stderr = proxy.stderr();
    let ends: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sockmap tunnel ended"))
        .collect();
    // A client that sends its last bytes and FIN before the proxy inserts its
    // socket (CLOSE_WAIT) takes the fallback instead.
    let fallbacks = stderr.matches("tunnel not spliced").count();
    assert_eq!(ends.len() + fallbacks, 20, "{stderr}");
    assert!(ends.len() >= 15, "{stderr}");
    for end in ends {
        assert!(
            end.contains("from events [Some(1032), Some(1000)]"),
            "{end}\n{stderr}"
        );
    }
}

/// The sockmap tunnel's bytes never reach the process, except those flow
/// control holds back: every syscall that can move bytes through it (reads on
/// its sockets, splice, sendfile, …) sees only the request head and exactly
/// the bytes the holds copied, and the kernel counters account for the rest.
/// Held back at a 256 KiB backlog (`tiny-backlog`), the 64 MiB each way pass
/// the pause threshold. (How often a direction resumes is timing: it resumes
/// only once its copy has caught up with a sender that may never pause, so
/// `held_back_directions_resume_in_order` tests resumption, not this test.) The same trace sees every byte on the copy
/// and splice planes, so it can see them.
#[test]
fn spliced_bytes_bypass_user_space() {
    const SIZE: u64 = 64 * MIB;
    for plane in ["sockmap", "copy", "splice"] {
        // How often the sockmap plane holds a direction back depends on how
        // the senders pace: the namespace fixes the congestion control the
        // runs were measured with instead of taking the host's.
        let ns = Netns::new();
        ns.set_default_congestion("bbr");
        let upstream = Upstream::start_in(&ns, "127.0.0.1:8443".parse().unwrap());
        let mut args = vec![
            "--dataplane",
            plane,
            "--connect-ports",
            "8443",
            "--listen",
            "127.0.0.1:3128",
            "--log-format",
            "json",
            "--admin",
            "127.0.0.1:0",
        ];
        if plane == "sockmap" {
            args.extend(["--test-hook", "tiny-backlog"]);
        }
        let proxy = Proxy::start_in(&ns, &args);
        let trace = proxy.trace_syscalls();
        let h = Header {
            up: SIZE,
            down: SIZE,
            seed: 900,
            mode: Mode::Concurrent,
        };
        let target = upstream.addr.to_string();
        let proxy_addr = proxy.addr;
        let tunnel_target = target.clone();
        let client = ns.enter(move || exchange(open_tunnel(proxy_addr, &tunnel_target), h, false));
        assert_eq!(client.received, Ok(h.down), "{}", proxy.stderr());
        assert_eq!(upstream.result().received, Ok(h.up));
        let record = &proxy.wait_json_records(1)[0];
        let traced = trace.finish();
        eprintln!("{plane}: {traced:?}");
        assert_eq!(record["dataplane"], plane, "{record}");
        assert_eq!(record["bytes_from_client"], 32 + h.up);
        assert_eq!(record["bytes_to_client"], 39 + h.down);
        let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").len() as u64;
        let payload = 32 + h.up + h.down;
        match plane {
            "sockmap" => {
                let stats = proxy.stats();
                let copied = stats["flow_control_copied_bytes"];
                assert!(stats["flow_control_pauses"] >= 1, "{stats:?}");
                assert_eq!(traced.spliced, 0, "{traced:?}");
                assert_eq!(
                    traced.socket_reads,
                    head + copied,
                    "the proxy read other bytes than the head and the held-back ones: {stats:?}"
                );
                assert_eq!(stats["bytes_redirected"] + copied, payload, "{stats:?}");
                assert_eq!(stats["bytes_passed"], copied, "{stats:?}");
            }
            "copy" => {
                assert!(traced.socket_reads >= payload, "{traced:?}");
                assert_eq!(traced.spliced, 0, "{traced:?}");
            }
            _ => {
                // Each byte is spliced twice: socket → pipe → socket.
                assert!(traced.spliced >= 2 * payload, "{traced:?}");
                assert_eq!(traced.socket_reads, head, "{traced:?}");
            }
        }
    }
}

/// Map entries, pipes and descriptors are released: nothing grows after
/// thousands of tunnels.
#[test]
fn nothing_grows_after_thousands_of_tunnels() {
    for plane in DATA_PLANES {
        let upstream = Upstream::start();
        let port = upstream.addr.port().to_string();
        let proxy = Proxy::start(&[
            "--dataplane",
            plane,
            "--connect-ports",
            &port,
            "--access-log",
            "/dev/null",
            "--admin",
            "127.0.0.1:0",
        ]);
        let fds_before = proxy.fd_count();
        let (addr, target) = (proxy.addr, upstream.addr.to_string());
        let workers: Vec<_> = (0..16u64)
            .map(|worker| {
                let target = target.clone();
                std::thread::spawn(move || {
                    for i in 0..125u64 {
                        let h = Header {
                            up: 3000,
                            down: 5000,
                            seed: worker * 1_000_000 + i * 2,
                            mode: Mode::Concurrent,
                        };
                        let client = exchange(open_tunnel(addr, &target), h, false);
                        assert_eq!(client.received, Ok(h.down));
                    }
                })
            })
            .collect();
        for worker in workers {
            if worker.join().is_err() {
                for line in proxy
                    .stderr()
                    .lines()
                    .filter(|l| !l.contains("ended (Closed)"))
                {
                    eprintln!("{line}");
                }
                panic!("worker failed");
            }
        }
        for _ in 0..2000 {
            assert_eq!(upstream.result().received, Ok(3000));
        }
        let settled =
            spliced_tests::wait_until(Duration::from_secs(10), || proxy.fd_count() <= fds_before);
        assert!(
            settled,
            "{plane}: fds grew from {fds_before} to {}",
            proxy.fd_count()
        );
        if plane == "sockmap" {
            let stats = proxy.stats();
            for key in [
                "flows",
                "spliced_sockets",
                "target_sockets",
                "redirect_failed",
            ] {
                assert_eq!(stats[key], 0, "{key} after 2000 tunnels: {stats:?}");
            }
        }
    }
}

/// Sends 48 MiB through a sockmap tunnel to an upstream that reads in small
/// sips, so the proxy's upstream socket's send queue fills; returns the
/// upstream's byte-exact count and the proxy's stats afterwards.
fn into_a_slow_reader(
    extra_args: &[&str],
) -> (Result<u64, u64>, std::collections::HashMap<String, u64>) {
    const LEN: u64 = 48 * MIB;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_port = listener.local_addr().unwrap().port();
    let port = upstream_port.to_string();
    let mut args = vec![
        "--dataplane",
        "sockmap",
        "--connect-ports",
        &port,
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra_args);
    let proxy = Proxy::start(&args);
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0u64;
        // At most 256 KiB per millisecond: the sender is faster. Bounded by
        // the read timeout and the byte count.
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return Ok(received);
            }
            spliced_tests::pattern::check(7, received, &buf[..n])?;
            received += n as u64;
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let mut client = open_tunnel(proxy.addr, &format!("127.0.0.1:{upstream_port}"));
    spliced_tests::pattern::send(&mut client, 7, LEN).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let received = reader.join().unwrap();
    proxy.wait_access_lines(1);
    (received, proxy.stats())
}

/// A full destination send buffer makes the kernel's redirect worker sleep a
/// whole tick; the sockmap plane raises that socket's send buffer
/// (`--redirect-send-buffer`) so its queue outlasts the tick. Bytes stay exact.
#[test]
fn a_filling_send_queue_gets_a_bigger_send_buffer() {
    let (received, stats) = into_a_slow_reader(&[]);
    assert_eq!(received, Ok(48 * MIB));
    assert!(stats["send_buffer_raises"] >= 1, "{stats:?}");
    let (received, stats) = into_a_slow_reader(&["--redirect-send-buffer", "0"]);
    assert_eq!(received, Ok(48 * MIB));
    assert_eq!(stats["send_buffer_raises"], 0, "{stats:?}");
}

/// Flow control holds a direction back (the verdict passes to the socket's own
/// queue) and hands it back to the kernel once user space has copied every
/// passed byte. With a 256 KiB backlog mark a bulk transfer each way goes
/// through that hand-over many times; not one byte may move or repeat.
///
/// Found here: about one run in eight delivered two skbs' worth of bytes
/// twice — a held-back socket's full receive buffer makes loopback drop and
/// retransmit, and the retransmission overlapped received bytes (see
/// `overlapping_retransmissions_are_forwarded_once`).
#[test]
fn held_back_directions_resume_in_order() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &["tiny-backlog"]);
    for (i, mode) in [Mode::Concurrent, Mode::AnswerAfterEof]
        .into_iter()
        .enumerate()
    {
        let h = Header {
            up: 192 * MIB,
            down: 192 * MIB,
            seed: 900 + i as u64,
            mode,
        };
        let client = exchange(
            open_tunnel(proxy.addr, &upstream.addr.to_string()),
            h,
            false,
        );
        let received = upstream.result().received;
        if received != Ok(h.up) || client.received != Ok(h.down) {
            eprintln!("spliced's log:\n{}", proxy.stderr());
        }
        assert_eq!(
            (&received, &client.received),
            (&Ok(h.up), &Ok(h.down)),
            "{mode:?}: (upstream, client)"
        );
    }
    // The header is 32 bytes up and 39 down (see the upstream harness).
    for record in proxy.wait_json_records(2) {
        assert_eq!(record["end"], "closed", "{record}");
        assert_eq!(record["bytes_from_client"], 32 + 192 * MIB, "{record}");
        assert_eq!(record["bytes_to_client"], 39 + 192 * MIB, "{record}");
    }
    let stats = proxy.stats();
    eprintln!("flow control: {stats:?}");
    assert!(stats["flow_control_pauses"] >= 1, "{stats:?}");
    assert!(stats["flow_control_resumes"] >= 1, "{stats:?}");
    assert_eq!(stats["redirect_failed"], 0, "{stats:?}");
}

/// Bytes each way of [`held_back_at_both_ends`].
const HELD: u64 = 8 * MIB;

/// Receive buffer of both endpoints of [`held_back_at_both_ends`]: small, so
/// neither direction's redirected bytes can go out while its receiver does
/// not read, and both build a backlog.
const SMALL_RECEIVE_BUFFER: usize = 64 * 1024;

/// Whether everything written into `stream`, its FIN included, was
/// acknowledged (`SIOCOUTQ` is 0).
fn all_acknowledged(stream: &TcpStream) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    rc == 0 && queued == 0
}

/// Writes the first half of stream `seed`, waits until the proxy has held
/// `direction` back, then writes the rest and the FIN, and waits until the
/// proxy has taken all of it.
fn send_held_back(stream: &mut TcpStream, seed: u64, proxy: &Proxy, direction: &str) {
    pattern::send_range(stream, seed, 0, HELD / 2).expect("first half");
    assert!(
        wait_until(IO_TIMEOUT, || proxy
            .stderr()
            .contains(&format!("flow control: {direction} paused"))),
        "{direction} was not held back:\n{}",
        proxy.stderr()
    );
    pattern::send_range(stream, seed, HELD / 2, HELD).expect("second half");
    stream.shutdown(std::net::Shutdown::Write).expect("FIN");
    assert!(
        wait_until(IO_TIMEOUT, || all_acknowledged(stream)),
        "the proxy did not take the {direction} bytes"
    );
}

/// A sockmap tunnel whose directions are both held back with both FINs in.
/// The upstream sends [`HELD`] bytes and its FIN first, then the client, each
/// half before the proxy holds its direction back and half after, and
/// nothing is read until the proxy has taken both. (The upstream goes first
/// so that the bytes passed on the proxy's upstream socket reach its queue
/// directly: sk_psock_verdict_apply queues a passed skb behind the socket's
/// own redirected backlog when there is one.) Then the client reads, so the
/// direction to it ends with a copy that reaches its source's EOF and the
/// proxy shuts the client's socket down (its FIN was in: the socket is shut
/// both ways); only after the client's EOF does the upstream read, so its
/// direction's copy starts after that. Returns what the upstream and the
/// client received, and the proxy's log.
fn held_back_at_both_ends() -> (Result<u64, String>, Result<u64, String>, String) {
    let ns = Netns::new();
    // The proxy's sockets take a held-back direction's passed bytes whole (the
    // verdict charges them to the source socket); small send buffers keep
    // each direction's redirected bytes in the kernel's redirect backlog.
    ns.enter(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_rmem", "4096 33554432 33554432")?;
        std::fs::write("/proc/sys/net/ipv4/tcp_wmem", "4096 65536 65536")
    })
    .expect("set the TCP buffers of the test's namespace");
    let small_buffer = || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_recv_buffer_size(SMALL_RECEIVE_BUFFER)?;
        Ok(socket)
    };
    let listener = ns
        .enter(move || -> std::io::Result<TcpListener> {
            let socket = small_buffer()?;
            socket.bind(&SocketAddr::from(([127, 0, 0, 1], 8443)).into())?;
            socket.listen(1)?;
            Ok(socket.into())
        })
        .expect("upstream listener");
    let proxy = Proxy::start_in(
        &ns,
        &[
            "--dataplane",
            "sockmap",
            "--connect-ports",
            "8443",
            "--listen",
            "127.0.0.1:3128",
            "--admin",
            "127.0.0.1:0",
            // A raised send buffer would take a whole direction's bytes.
            "--redirect-send-buffer",
            "0",
            "--test-hook",
            "tiny-backlog",
        ],
    );
    let proxy_addr = proxy.addr;
    let mut client = ns
        .enter(move || -> std::io::Result<TcpStream> {
            let socket = small_buffer()?;
            socket.connect(&proxy_addr.into())?;
            let mut stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            write!(stream, "CONNECT 127.0.0.1:8443 HTTP/1.1\r\n\r\n")?;
            spliced_tests::expect_connect_ok(&mut stream);
            Ok(stream)
        })
        .expect("open the tunnel");
    let (mut upstream, _) = listener.accept().expect("accept the tunnel");
    // Far shorter than the test's I/O bound: a stalled direction fails the
    // test, not the suite's patience.
    upstream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    send_held_back(&mut upstream, 12, &proxy, "upstream_to_client");
    send_held_back(&mut client, 11, &proxy, "client_to_upstream");
    let client = pattern::receive_checked(&mut client, 12);
    let upstream = pattern::receive_checked(&mut upstream, 11);
    (upstream, client, proxy.stderr())
}

/// Once a direction's last copy reached its source's EOF and its destination
/// is shut down, the direction no longer waits for that destination: a socket
/// shut both ways stays "write closed" for good (EPOLLHUP, and tokio keeps
/// closed readiness across `clear_ready`), and waiting on it made the tunnel
/// task loop without ever yielding. A copy it then started sat in its
/// worker's LIFO slot, which no other worker steals, and never ran: the other
/// direction's passed bytes never left. Seen about one run in 12 of a paused
/// 200 MiB exchange under CPU load (squid_conf's reload and SIGTERM tests);
/// here it happens every time without the fix.
#[test]
fn a_copy_started_after_the_other_direction_shut_down_runs() {
    let (upstream, client, log) = held_back_at_both_ends();
    if upstream != Ok(HELD) || client != Ok(HELD) {
        eprintln!("spliced's log:\n{log}");
    }
    assert_eq!(
        (&upstream, &client),
        (&Ok(HELD), &Ok(HELD)),
        "(upstream, client)"
    );
}

/// Pattern bytes the client has sent before it retransmits by hand.
const BEFORE_RETRANSMIT: u64 = MIB;
/// Already-received bytes the hand-made retransmission repeats.
const REPEATED: u64 = 5000;
/// New bytes it carries after them (the client's socket sends them again).
const NEW_IN_RETRANSMIT: u64 = 100;

/// A tunnel whose client retransmits by hand, after everything it sent has
/// been received, one segment of [`REPEATED`] received bytes and
/// [`NEW_IN_RETRANSMIT`] new ones; its own socket then sends the new bytes
/// again with the rest. Runs in a namespace of its own without TCP timestamps
/// (the hand-made segment carries none).
fn overlapping_retransmission(hooks: &[&str]) -> RetransmissionOutcome {
    let ns = Netns::new();
    // /proc/sys/net shows the network namespace of the thread that opens it.
    ns.enter(|| std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0"))
        .expect("turn TCP timestamps off in the test's namespace");
    let upstream = Upstream::start_in(&ns, "127.0.0.1:8443".parse().unwrap());
    let mut args = vec![
        "--dataplane",
        "sockmap",
        "--connect-ports",
        "8443",
        "--listen",
        "127.0.0.1:3128",
        "--admin",
        "127.0.0.1:0",
    ];
    for hook in hooks {
        args.extend_from_slice(&["--test-hook", hook]);
    }
    let proxy = Proxy::start_in(&ns, &args);
    let h = Header {
        up: 4 * MIB,
        down: 1000,
        seed: 950,
        mode: Mode::AnswerAfterEof,
    };
    let proxy_addr = proxy.addr;
    let client = ns.enter(move || -> Result<u64, String> {
        let mut stream = open_tunnel(proxy_addr, "127.0.0.1:8443");
        stream.write_all(&h.encode()).map_err(|e| e.to_string())?;
        pattern::send_range(&mut stream, h.seed, 0, BEFORE_RETRANSMIT)
            .map_err(|e| e.to_string())?;
        let acknowledged = wait_until(IO_TIMEOUT, || {
            let mut queued: libc::c_int = 0;
            // SAFETY: SIOCOUTQ writes one int through the pointer.
            let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
            rc == 0 && queued == 0
        });
        assert!(
            acknowledged,
            "the proxy did not acknowledge the first bytes"
        );
        let (next_seq, ack) = retransmit::sequence_numbers(&stream).expect("TCP_REPAIR");
        let mut payload = vec![0u8; (REPEATED + NEW_IN_RETRANSMIT) as usize];
        pattern::fill(h.seed, BEFORE_RETRANSMIT - REPEATED, &mut payload);
        retransmit::send_segment(
            &stream,
            next_seq.wrapping_sub(REPEATED as u32),
            ack,
            &payload,
        )
        .expect("send the hand-made retransmission");
        pattern::send_range(&mut stream, h.seed, BEFORE_RETRANSMIT, h.up)
            .map_err(|e| e.to_string())?;
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        pattern::receive_checked(&mut stream, h.seed + 1)
    });
    RetransmissionOutcome {
        client,
        upstream: upstream.result().received,
        stats: proxy.stats(),
        log: proxy.stderr(),
    }
}

/// What [`overlapping_retransmission`] saw.
struct RetransmissionOutcome {
    /// The answer the client read.
    client: Result<u64, String>,
    /// What the upstream received.
    upstream: Result<u64, String>,
    stats: std::collections::HashMap<String, u64>,
    log: String,
}

/// TCP queues a retransmission that overlaps received bytes without trimming
/// it, and tcp_read_skb hands the verdict the whole skb: the verdict trims
/// the bytes it has handled already, so the upstream gets each byte once.
/// Found in a 200 MiB transfer whose receiver paused: 130,966 bytes arrived
/// twice, about one run in ten under load (loopback drops and retransmits
/// when the held-back socket's receive buffer is full).
#[test]
fn overlapping_retransmissions_are_forwarded_once() {
    let outcome = overlapping_retransmission(&[]);
    let stats = &outcome.stats;
    assert_eq!(outcome.upstream, Ok(4 * MIB), "{stats:?}");
    assert_eq!(outcome.client, Ok(1000), "{stats:?}");
    assert_eq!(
        stats["duplicate_bytes_trimmed"],
        REPEATED + NEW_IN_RETRANSMIT,
        "{stats:?}"
    );
    // The longest overlap is the retransmission's repeat; its 100 new bytes
    // were cut off the later segment that carried them again.
    assert_eq!(stats["longest_overlap_bytes"], REPEATED, "{stats:?}");
    assert_eq!(stats["sequence_gaps"], 0, "{stats:?}");
    assert_eq!(stats["trim_failed"], 0, "{stats:?}");
}

#[test]
fn without_the_trim_overlapping_retransmissions_repeat_bytes() {
    let outcome = overlapping_retransmission(&["no-overlap-trim"]);
    let err = outcome
        .upstream
        .expect_err("the upstream got an exact stream without the trim");
    assert!(
        err.contains("a duplicate of earlier bytes"),
        "{err} {:?}",
        outcome.stats
    );
}

/// An overlap longer than the verdict can trim (here: one 4095-byte step
/// under `short-trim`, against 5,000 repeated bytes) resets the tunnel
/// instead of forwarding repeated bytes or losing new ones.
#[test]
fn untrimmable_overlaps_reset_the_tunnel() {
    let outcome = overlapping_retransmission(&["short-trim"]);
    let stats = &outcome.stats;
    let err = outcome
        .upstream
        .expect_err("the upstream got an exact stream through a broken tunnel");
    assert!(!err.contains("corrupt"), "{err} {stats:?}");
    assert!(outcome.client.is_err(), "{:?}", outcome.client);
    assert_eq!(stats["trim_failed"], 1, "{stats:?}");
    assert!(
        outcome
            .log
            .contains("repeated more bytes than the verdict can trim"),
        "{}",
        outcome.log
    );
    // The verdict's own warning, through aya-log's ring buffer.
    assert!(
        outcome
            .log
            .contains("a retransmission repeats more bytes than can be trimmed"),
        "{}",
        outcome.log
    );
}

/// The upstream socket's insertion fails after the client's succeeded (as
/// when its FIN arrives in between): the client's bytes stay spliced, the
/// upstream's are copied in user space, and both directions are exact.
#[test]
fn a_half_spliced_tunnel_is_exact() {
    let upstream = Upstream::start();
    let proxy = sockmap_proxy(upstream.addr.port(), &["fail-second-insert"]);
    let h = Header {
        up: 3 * MIB + 7,
        down: 2 * MIB + 3,
        seed: 9100,
        mode: Mode::Concurrent,
    };
    let client = exchange(
        open_tunnel(proxy.addr, &upstream.addr.to_string()),
        h,
        false,
    );
    assert_eq!(client.received, Ok(h.down), "{}", proxy.stderr());
    assert_eq!(upstream.result().received, Ok(h.up), "{}", proxy.stderr());
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(record["dataplane"], "sockmap", "{record}");
    assert_eq!(record["end"], "closed", "{record}");
    assert_eq!(record["bytes_from_client"], 32 + h.up, "{record}");
    assert_eq!(record["bytes_to_client"], 39 + h.down, "{record}");
    assert!(proxy.logged("copied in user space"), "{}", proxy.stderr());
}

/// A failure after both sockets are spliced (here the `SO_RCVLOWAT` kick)
/// cannot hand the sockets to another plane without risking a hole: both are
/// reset, and neither end sees a corrupt or silently cut stream.
#[test]
fn a_failure_after_splicing_resets_both_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_port = listener.local_addr().unwrap().port();
    let proxy = sockmap_proxy(upstream_port, &["fail-kick"]);
    // The upstream sends and reads until the end of its stream: a reset must
    // reach it as an error, not as a clean EOF.
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let sent = pattern::send(&mut stream, 9201, MIB);
        let mut rest = Vec::new();
        (sent, stream.read_to_end(&mut rest).map(|_| rest.len()))
    });
    let mut stream = open_tunnel(proxy.addr, &format!("127.0.0.1:{upstream_port}"));
    // Linux reports a reset once: to the send if it comes during one, else
    // to the next read.
    let sent = pattern::send(&mut stream, 9200, MIB);
    let client = pattern::receive_checked(&mut stream, 9201);
    match sent {
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
        Ok(()) => {
            let err = client.expect_err("an exact stream through a tunnel that failed half-way");
            assert!(err.contains("reset"), "{err}");
        }
    }
    let (sent, read) = server.join().unwrap();
    let err = sent
        .err()
        .or(read.err())
        .expect("the upstream saw a clean end of a broken tunnel");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(record["dataplane"], "sockmap", "{record}");
    assert_ne!(record["end"], "closed", "{record}");
    assert!(proxy.logged("resetting both sockets"), "{}", proxy.stderr());
}
