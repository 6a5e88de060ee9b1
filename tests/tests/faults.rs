//! Faults on every data plane, each with healthy tunnels running alongside whose
//! bytes are checked exactly: peers that stop reading (memory must stay bounded:
//! the sockmap redirect path has no backpressure of its own beyond what the
//! kernel charges to the sockets), a stopped upstream process, resets, and a
//! burst of connects to a closed port. Every test ends by checking from the
//! access log that each of its tunnels ran on the data plane it is aimed at.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use spliced_tests::{
    healthy::Healthy,
    open_tunnel, raw_request, status_of,
    upstream::{exchange, Header},
    Mode, Proxy, Upstream,
};

const MIB: u64 = 1 << 20;

fn proxy_for(plane: &str, ports: &[u16]) -> Proxy {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    Proxy::start(&[
        "--dataplane",
        plane,
        "--connect-ports",
        &ports.join(","),
        "--log-format",
        "json",
    ])
}

/// Kernel memory charged to TCP sockets (pages), from /proc/net/sockstat.
fn tcp_mem_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "mem")
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap()
}

/// Pushes bytes into `stream` until told to stop; returns how many the kernel took.
fn pusher(mut stream: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let buf = vec![7u8; 256 * 1024];
        let mut pushed = 0;
        while !stop.load(Ordering::Relaxed) {
            match stream.write(&buf) {
                Ok(n) => pushed += n as u64,
                Err(err)
                    if err.kind() == std::io::ErrorKind::WouldBlock
                        || err.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        pushed
    })
}

/// A peer that never reads: the sender gets stuck after a bounded amount, and
/// neither the proxy's memory nor the kernel's grows with what it tries to send.
fn peer_that_never_reads(plane: &str, upstream_reads: bool) {
    let idle_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let idle_port = idle_listener.local_addr().unwrap().port();
    let healthy_upstream = Upstream::start();
    let proxy = proxy_for(plane, &[idle_port, healthy_upstream.addr.port()]);
    let tcp_before = tcp_mem_pages();
    let rss_before = proxy.rss_kib();
    let client = open_tunnel(proxy.addr, &format!("127.0.0.1:{idle_port}"));
    let (upstream_side, _) = idle_listener.accept().unwrap();
    // Either the upstream never reads what the client sends, or the client never
    // reads what the upstream sends.
    let (sender, silent) = if upstream_reads {
        (upstream_side, client)
    } else {
        (client, upstream_side)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pushing = pusher(sender, stop.clone());
    let healthy = Healthy::start(proxy.addr, healthy_upstream);
    std::thread::sleep(Duration::from_secs(3));
    let tcp_peak = tcp_mem_pages();
    let rss_peak = proxy.rss_kib();
    stop.store(true, Ordering::Relaxed);
    let pushed = pushing.join().unwrap();
    let exchanges = healthy.assert_exact();
    // Flow control holds a direction back beyond a 16 MiB redirect backlog;
    // the rest is socket buffers on three hops (the proxy's raised 16 MiB send
    // buffer, the peer's receive buffer of up to tcp_rmem's 32 MiB). Without it
    // a loopback sender pushes gigabytes in 3 s.
    eprintln!("{plane}: a peer that never reads took {} MiB", pushed / MIB);
    assert!(
        pushed < 160 * MIB,
        "{plane}: a peer that never reads let {} MiB in; {:?}",
        pushed / MIB,
        if plane == "sockmap" {
            Some(proxy.stats())
        } else {
            None
        }
    );
    let _ = std::fs::write("/tmp/faults-stderr.log", proxy.stderr());
    let tcp_growth_mib = tcp_peak.saturating_sub(tcp_before) * 4096 / MIB;
    assert!(
        tcp_growth_mib < 256,
        "{plane}: kernel TCP memory grew by {tcp_growth_mib} MiB"
    );
    let rss_growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    assert!(
        rss_growth_mib < 64,
        "{plane}: proxy RSS grew by {rss_growth_mib} MiB"
    );
    // The sender's end closed when its thread ended; closing the silent end
    // ends the stuck tunnel, which then logs its record.
    drop(silent);
    proxy.assert_tunnels_ran_on(plane, exchanges + 1);
}

fn upstream_that_never_reads(plane: &str) {
    peer_that_never_reads(plane, false);
}

fn client_that_never_reads(plane: &str) {
    peer_that_never_reads(plane, true);
}

/// An upstream process frozen with SIGSTOP mid-transfer: its tunnel stalls, the
/// others go on, and it resumes intact after SIGCONT.
fn stopped_upstream_process(plane: &str) {
    // socat: a separate process we can freeze; it echoes what it gets.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut socat = std::process::Command::new("socat")
        .args([
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
            "EXEC:cat".into(),
        ])
        .spawn()
        .expect("socat (Debian package socat) must be installed");
    assert!(spliced_tests::wait_until(Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    // That probe connection used socat's single accept: start a fresh one.
    let _ = socat.kill();
    let _ = socat.wait();
    let mut socat = std::process::Command::new("socat")
        .args([
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
            "EXEC:cat".into(),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let healthy_upstream = Upstream::start();
    let proxy = proxy_for(plane, &[port, healthy_upstream.addr.port()]);
    let mut echo = open_tunnel(proxy.addr, &format!("127.0.0.1:{port}"));
    let total = 8 * MIB;
    let mut writer = echo.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        spliced_tests::pattern::send(&mut writer, 77, total).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(socat.id() as i32, libc::SIGSTOP) };
    let healthy = Healthy::start(proxy.addr, healthy_upstream);
    let exchanges = healthy.assert_exact();
    // SAFETY: as above.
    unsafe { libc::kill(socat.id() as i32, libc::SIGCONT) };
    let echoed = spliced_tests::pattern::receive(&mut echo, 77).unwrap();
    sending.join().unwrap();
    let _ = socat.kill();
    let _ = socat.wait();
    assert_eq!(
        echoed,
        Ok(total),
        "{plane}: echo through a stopped-then-resumed upstream"
    );
    proxy.assert_tunnels_ran_on(plane, exchanges + 1);
}

/// A burst of connects to a closed port: every one gets a 502, the proxy keeps
/// serving, and nothing leaks.
fn burst_to_a_closed_port(plane: &str) {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let healthy_upstream = Upstream::start();
    let proxy = proxy_for(plane, &[closed, healthy_upstream.addr.port()]);
    let fds_before = proxy.fd_count();
    let addr = proxy.addr;
    let refused = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let refused = refused.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let answer = raw_request(
                        addr,
                        format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n").as_bytes(),
                    );
                    if status_of(&answer) == 502 {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let healthy = Healthy::start(proxy.addr, healthy_upstream);
    for worker in workers {
        worker.join().unwrap();
    }
    let exchanges = healthy.assert_exact();
    assert_eq!(refused.load(Ordering::Relaxed), 800);
    assert!(
        spliced_tests::wait_until(Duration::from_secs(10), || proxy.fd_count() <= fds_before),
        "{plane}: fds grew from {fds_before} to {}",
        proxy.fd_count()
    );
    // The refusals are not tunnels (status 502): only the healthy ones count.
    proxy.assert_tunnels_ran_on(plane, exchanges);
}

/// Tunnels of [`resets_alongside_healthy_tunnels`] that end in a reset.
const RESET_TUNNELS: usize = 20;

/// Resets from both sides while other tunnels run. Each reset comes after
/// bytes went through the tunnel, so after sockmap spliced it.
fn resets_alongside_healthy_tunnels(plane: &str) {
    let upstream = Upstream::start();
    let healthy_upstream = Upstream::start();
    let proxy = proxy_for(plane, &[upstream.addr.port(), healthy_upstream.addr.port()]);
    let healthy = Healthy::start(proxy.addr, healthy_upstream);
    for i in 0..RESET_TUNNELS as u64 / 2 {
        // Upstream resets after 256 KiB.
        let h = Header {
            up: 256 * 1024,
            down: 0,
            seed: 20_000 + i,
            mode: Mode::ResetAfterRead,
        };
        let mut stream = open_tunnel(proxy.addr, &upstream.addr.to_string());
        stream.write_all(&h.encode()).unwrap();
        let _ = spliced_tests::pattern::send(&mut stream, h.seed, 4 * MIB);
        let _ = upstream.result();
        // Client resets mid-transfer.
        let mut stream = open_tunnel(proxy.addr, &upstream.addr.to_string());
        let h = Header {
            up: 64 * MIB,
            down: 64 * MIB,
            seed: 30_000 + i,
            mode: Mode::Concurrent,
        };
        stream.write_all(&h.encode()).unwrap();
        spliced_tests::pattern::send(&mut stream, h.seed, MIB).unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
        let _ = upstream.result();
    }
    let exchanges = healthy.assert_exact();
    proxy.assert_tunnels_ran_on(plane, exchanges + RESET_TUNNELS);
}

spliced_tests::on_every_data_plane!(
    upstream_that_never_reads,
    client_that_never_reads,
    stopped_upstream_process,
    burst_to_a_closed_port,
    resets_alongside_healthy_tunnels,
);

/// At the descriptor limit new clients get an HTTP refusal (503 when even the
/// accept fails, 502 when the upstream socket cannot be made), open tunnels
/// keep working, and the proxy serves again once load drops.
#[test]
fn descriptor_limit_gives_clean_refusals() {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let proxy = Proxy::start_wrapped(
        &["prlimit", "--nofile=96:96", "sh"],
        &[
            "--dataplane",
            "splice",
            "--connect-ports",
            &port,
            "--log-format",
            "json",
        ],
    );
    let target = upstream.addr.to_string();
    let mut open = Vec::new();
    let mut refusals = 0;
    for _ in 0..200 {
        let mut stream = TcpStream::connect(proxy.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap_or_else(|err| {
            panic!(
                "no HTTP answer at the descriptor limit: {err}\n{}",
                proxy.stderr()
            )
        });
        match &head[9..12] {
            b"200" => {
                let mut rest = vec![0u8; spliced_tests::CONNECT_OK.len() - 12];
                stream.read_exact(&mut rest).unwrap();
                open.push(stream);
            }
            b"502" | b"503" => {
                refusals += 1;
                if refusals >= 5 {
                    break;
                }
            }
            other => panic!("unexpected answer {:?}", String::from_utf8_lossy(other)),
        }
    }
    assert!(
        refusals >= 5,
        "never reached the limit with {} tunnels",
        open.len()
    );
    assert!(
        open.len() >= 5,
        "only {} tunnels before the limit",
        open.len()
    );
    let opened = open.len();
    // The first open tunnel still carries bytes.
    let first = open.remove(0);
    let h = Header {
        up: MIB,
        down: MIB,
        seed: 40_000,
        mode: Mode::Concurrent,
    };
    assert_eq!(exchange(first, h, false).received, Ok(MIB));
    // Drop the rest: new tunnels work again.
    drop(open);
    let ok = spliced_tests::wait_until(Duration::from_secs(10), || {
        status_of(&raw_request(
            proxy.addr,
            b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n",
        )) == 403
    });
    assert!(ok, "proxy did not recover:\n{}", proxy.stderr());
    let h = Header {
        up: MIB,
        down: MIB,
        seed: 40_002,
        mode: Mode::Concurrent,
    };
    assert_eq!(
        exchange(open_tunnel(proxy.addr, &target), h, false).received,
        Ok(MIB)
    );
    // Every tunnel, those opened at the limit included, ran on splice.
    proxy.assert_tunnels_ran_on("splice", opened + 1);
}
