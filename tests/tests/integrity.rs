//! Byte-exact integrity of tunnels on every data plane: concurrency, sizes from
//! 0 B to hundreds of MiB, both directions at once, pipelined bytes, a payload and
//! FIN sent before the 200, half-close each way, resets from either side, and
//! access-log byte counts that match what moved.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use spliced_tests::{
    expect_connect_ok,
    netns::Topology,
    open_tunnel,
    upstream::{exchange_with, ClientResult, Header, SPLICE_GRACE},
    Mode, Proxy, ServerResult, Upstream, IO_TIMEOUT,
};

const MIB: u64 = 1 << 20;

fn start(plane: &str, upstream: &Upstream) -> Proxy {
    let port = upstream.addr.port().to_string();
    // --admin: the sockmap plane's kernel counters are read from /metrics.
    Proxy::start(&[
        "--dataplane",
        plane,
        "--connect-ports",
        &port,
        "--log-format",
        "json",
        "--admin",
        "127.0.0.1:0",
    ])
}

/// One exchange through a tunnel opened the ordinary way; the client's FIN
/// waits for the tunnel to be spliced (see `SPLICE_GRACE`).
fn run(proxy: SocketAddr, upstream: &Upstream, header: Header) -> (ClientResult, ServerResult) {
    let stream = open_tunnel(proxy, &upstream.addr.to_string());
    let client = exchange_with(stream, header, false, SPLICE_GRACE);
    (client, upstream.result())
}

fn assert_exact(header: Header, client: &ClientResult, server: &ServerResult) {
    assert_eq!(
        server.received,
        Ok(header.up),
        "upstream side of {header:?}"
    );
    assert_eq!(
        client.received,
        Ok(header.down),
        "client side of {header:?}"
    );
}

fn header(up: u64, down: u64, seed: u64, mode: Mode) -> Header {
    Header {
        up,
        down,
        seed,
        mode,
    }
}

/// Every JSON record says the tunnel ran on `ran_on` and its byte counts equal
/// the bytes the exchange moved. On sockmap the kernel's counters account for
/// every byte the data plane moved: redirected by the verdict plus copied by
/// flow control's holds equals what was sent, less the `pipelined` bytes the
/// control plane forwarded itself before the `200`.
fn assert_logged(proxy: &Proxy, headers: &[Header], ran_on: &str, pipelined: u64) {
    let records = proxy.wait_json_records(headers.len());
    let mut logged: Vec<(u64, u64)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200, "{r}");
            assert_eq!(r["result"], "TCP_TUNNEL", "{r}");
            assert_eq!(r["end"], "closed", "{r}");
            assert_eq!(r["dataplane"], ran_on, "{r}");
            (
                r["bytes_from_client"].as_u64().unwrap(),
                r["bytes_to_client"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected: Vec<(u64, u64)> = headers.iter().map(|h| (32 + h.up, 39 + h.down)).collect();
    logged.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        logged,
        expected,
        "access log byte counts (from_client, to_client)\n{}",
        proxy.stderr()
    );
    if ran_on == "sockmap" {
        let sent: u64 = headers.iter().map(|h| 32 + h.up + h.down).sum();
        let stats = proxy.stats();
        assert_eq!(
            stats["bytes_redirected"] + stats["flow_control_copied_bytes"],
            sent - pipelined,
            "kernel counters against {sent} bytes sent, {pipelined} of them pipelined: {stats:?}"
        );
        assert_eq!(
            stats["bytes_passed"], stats["flow_control_copied_bytes"],
            "{stats:?}"
        );
    }
}

fn concurrent_tunnels_of_many_sizes(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let sizes = [0, 1, 7, 1000, 65_536 + 3, MIB, 3 * MIB + 5, 16 * MIB];
    let headers: Vec<Header> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            header(
                size,
                sizes[sizes.len() - 1 - i],
                100 + i as u64 * 2,
                Mode::Concurrent,
            )
        })
        .collect();
    let threads: Vec<_> = headers
        .iter()
        .map(|&h| {
            let (addr, target) = (proxy.addr, upstream.addr.to_string());
            std::thread::spawn(move || {
                exchange_with(open_tunnel(addr, &target), h, false, SPLICE_GRACE)
            })
        })
        .collect();
    let clients: Vec<ClientResult> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut servers: Vec<ServerResult> = (0..headers.len()).map(|_| upstream.result()).collect();
    servers.sort_by_key(|s| s.seed);
    for ((h, client), server) in headers.iter().zip(&clients).zip(&servers) {
        assert_exact(*h, client, server);
    }
    assert_logged(&proxy, &headers, plane, 0);
}

fn hundreds_of_mib_both_ways(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let h = header(300 * MIB, 300 * MIB + 1, 7, Mode::Concurrent);
    let (client, server) = run(proxy.addr, &upstream, h);
    assert_exact(h, &client, &server);
    assert_logged(&proxy, &[h], plane, 0);
}

fn bytes_pipelined_with_the_connect(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let h = header(200_000, 300_000, 11, Mode::Concurrent);
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // Request head, exchange header and the first 1000 payload bytes in one write.
    let mut first =
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", upstream.addr).into_bytes();
    first.extend_from_slice(&h.encode());
    let mut payload = vec![0u8; h.up as usize];
    spliced_tests::pattern::fill_fast(h.seed, 0, &mut payload);
    first.extend_from_slice(&payload[..1000]);
    stream.write_all(&first).unwrap();
    expect_connect_ok(&mut stream);
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload[1000..]).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let received = spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap();
    sender.join().unwrap();
    assert_eq!(received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up));
    // The exchange header and the first 1000 bytes came with the request
    // head; the rest waits for the 200, so nothing more was queued before it.
    assert_logged(&proxy, &[h], plane, 32 + 1000);
}

fn payload_and_fin_before_the_200(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let h = header(30_000, 2 * MIB, 13, Mode::AnswerAfterEof);
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let all = h.after_head_with_payload(&format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n",
        upstream.addr
    ));
    stream.write_all(&all).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    expect_connect_ok(&mut stream);
    let received = spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap();
    assert_eq!(received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up), "{}", proxy.stderr());
    // A client socket past its FIN cannot go into a sockhash: by design
    // sockmap hands such a tunnel to splice, before inserting anything.
    let ran_on = if plane == "sockmap" { "splice" } else { plane };
    assert_logged(&proxy, &[h], ran_on, 32 + 30_000);
}

fn client_half_close_then_whole_answer(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let headers = [
        header(0, 5 * MIB, 21, Mode::AnswerAfterEof),
        header(20 * MIB, 20 * MIB, 23, Mode::AnswerAfterEof),
        header(1, 1, 25, Mode::AnswerAfterEof),
    ];
    for h in headers {
        let (client, server) = run(proxy.addr, &upstream, h);
        assert_exact(h, &client, &server);
    }
    assert_logged(&proxy, &headers, plane, 0);
}

fn server_half_close_then_client_sends(plane: &str) {
    let upstream = Upstream::start();
    let proxy = start(plane, &upstream);
    let headers = [
        header(5 * MIB, 0, 31, Mode::ServerFirst),
        header(20 * MIB, 20 * MIB, 33, Mode::ServerFirst),
    ];
    for h in headers {
        let (client, server) = run(proxy.addr, &upstream, h);
        assert_exact(h, &client, &server);
    }
    assert_logged(&proxy, &headers, plane, 0);
}

fn upstream_reset_mid_transfer(plane: &str) {
    let upstream = Upstream::start();
    let mut proxy = start(plane, &upstream);
    // The upstream reads 1 MiB, then resets while the client is still sending.
    let h = header(MIB, 0, 41, Mode::ResetAfterRead);
    let mut stream = open_tunnel(proxy.addr, &upstream.addr.to_string());
    stream.write_all(&h.encode()).unwrap();
    let mut sender = stream.try_clone().unwrap();
    let sending =
        std::thread::spawn(move || spliced_tests::pattern::send(&mut sender, h.seed, 64 * MIB));
    let server = upstream.result();
    assert_eq!(server.received, Ok(MIB));
    // The client must learn that the tunnel broke, not hang.
    assert!(
        sending.join().unwrap().is_err(),
        "the client could send 64 MiB into a reset tunnel"
    );
    let mut rest = Vec::new();
    let outcome = stream.read_to_end(&mut rest);
    assert!(
        outcome.is_err() || rest.is_empty(),
        "client read {outcome:?} after upstream reset"
    );
    let records = proxy.wait_json_records(1);
    assert_eq!(records[0]["status"], 200);
    assert_eq!(records[0]["dataplane"], plane, "{}", records[0]);
    assert_ne!(records[0]["end"], "closed", "{}", records[0]);
    proxy.assert_alive();
    // And the proxy keeps serving.
    let h = header(1000, 1000, 43, Mode::Concurrent);
    let (client, server) = run(proxy.addr, &upstream, h);
    assert_exact(h, &client, &server);
}

fn client_reset_mid_transfer(plane: &str) {
    let upstream = Upstream::start();
    let mut proxy = start(plane, &upstream);
    let h = header(64 * MIB, 64 * MIB, 51, Mode::Concurrent);
    let mut stream = open_tunnel(proxy.addr, &upstream.addr.to_string());
    stream.write_all(&h.encode()).unwrap();
    spliced_tests::pattern::send(&mut stream, h.seed, MIB).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    stream.read_exact(&mut buf).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    // The upstream learns of it (error or short stream) instead of hanging.
    let server = upstream.result();
    assert_ne!(
        server.received,
        Ok(h.up),
        "upstream got everything from a reset client?"
    );
    let records = proxy.wait_json_records(1);
    assert_eq!(records[0]["dataplane"], plane, "{}", records[0]);
    assert_ne!(records[0]["end"], "closed", "{}", records[0]);
    proxy.assert_alive();
    let h = header(1000, 1000, 53, Mode::Concurrent);
    let (client, server) = run(proxy.addr, &upstream, h);
    assert_exact(h, &client, &server);
}

/// Client, proxy and server on three hosts joined by veth pairs.
fn across_network_namespaces(plane: &str) {
    let topology = Topology::new();
    let server_addr = SocketAddr::from((Topology::SERVER_IP, 8443));
    let upstream = Upstream::start_in(&topology.server, server_addr);
    let proxy = Proxy::start_in(
        &topology.proxy,
        &[
            "--dataplane",
            plane,
            "--connect-ports",
            "8443",
            "--listen",
            "10.77.1.1:3128",
            "--log-format",
            "json",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let headers = [
        header(40 * MIB, 40 * MIB, 61, Mode::Concurrent),
        header(10 * MIB, 10 * MIB, 63, Mode::AnswerAfterEof),
        header(10 * MIB, 10 * MIB, 65, Mode::ServerFirst),
        header(0, 0, 67, Mode::Concurrent),
    ];
    for h in headers {
        let proxy_addr = proxy.addr;
        let client = topology.client.enter(move || {
            exchange_with(
                open_tunnel(proxy_addr, "10.77.2.2:8443"),
                h,
                false,
                SPLICE_GRACE,
            )
        });
        let server = upstream.result();
        assert_exact(h, &client, &server);
    }
    assert_logged(&proxy, &headers, plane, 0);
    let records = proxy.wait_json_records(headers.len());
    assert!(records
        .iter()
        .all(|r| r["client"].as_str().unwrap().starts_with("10.77.1.2:")));
}

spliced_tests::on_every_data_plane!(
    concurrent_tunnels_of_many_sizes,
    hundreds_of_mib_both_ways,
    bytes_pipelined_with_the_connect,
    payload_and_fin_before_the_200,
    client_half_close_then_whole_answer,
    server_half_close_then_client_sends,
    upstream_reset_mid_transfer,
    client_reset_mid_transfer,
    across_network_namespaces,
);
