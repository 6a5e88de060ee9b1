//! PROXY protocol on input (issue 15), end to end: the real spliced with a
//! squid.conf whose first `http_port` has `require-proxy-header`, a client
//! written here that plays the load balancer (v1 and v2 headers it encodes
//! itself, whole or split across segments), and a counting echo upstream on
//! loopback, so every refusal can show that no upstream connection was made.
//!
//! Every wait is bounded: sockets by [`IO_TIMEOUT`] (shorter where a close is
//! expected), polls by [`wait_until`].

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use spliced_tests::{
    expect_connect_ok, proxy::http_get, sockets::connect_from, status_of, wait_until, Proxy,
    IO_TIMEOUT,
};

/// A threaded echo upstream on 127.0.0.1 that counts the connections it accepts.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Echo {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        Self { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A port on 127.0.0.1 that was free a moment ago (http_port takes no 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a port")
        .port()
}

/// A spliced listening on a `require-proxy-header` port and a plain one.
struct Site {
    proxy: Proxy,
    /// The `require-proxy-header` port.
    lb_port: SocketAddr,
    /// A port without it.
    plain_port: SocketAddr,
    echo: Echo,
    _conf: tempfile::TempDir,
}

/// Allows the load balancer (127.0.0.1) to send headers, and clients from
/// 192.0.2.0/24, 2001:db8::/32 and loopback (a v2 LOCAL connection) to tunnel.
const RULES: &str = "acl lb src 127.0.0.1\n\
    proxy_protocol_access allow lb\n\
    acl clients src 192.0.2.0/24 2001:db8::/32\n\
    http_access allow clients\n\
    http_access allow localhost\n\
    http_access deny all\n";

impl Site {
    fn start(extra_conf: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (lb, plain) = (free_port(), free_port());
        let conf = dir.path().join("squid.conf");
        std::fs::write(
            &conf,
            format!(
                "http_port 127.0.0.1:{lb} require-proxy-header\nhttp_port 127.0.0.1:{plain}\n\
                 {RULES}{extra_conf}"
            ),
        )
        .unwrap();
        let conf = conf.to_str().unwrap().to_owned();
        let mut all = vec!["-f", conf.as_str(), "--admin", "127.0.0.1:0"];
        all.extend(args);
        let proxy = Proxy::start_on_config_ports(&all);
        let plain_port: SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || proxy
                .logged(&format!("listening on {plain_port}"))),
            "{}",
            proxy.stderr()
        );
        Self {
            lb_port: format!("127.0.0.1:{lb}").parse().unwrap(),
            plain_port,
            proxy,
            echo: Echo::start(),
            _conf: dir,
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.lb_port).expect("connect to proxy");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    fn connect_head(&self) -> String {
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", self.echo.addr)
    }

    /// `spliced_proxy_protocol_refusals_total{reason}`.
    fn refusals(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "spliced_proxy_protocol_refusals_total{{reason=\"{reason}\"}}"
        ))
    }

    fn metric(&self, series: &str) -> u64 {
        let admin = self.proxy.admin_addr().expect("admin listener");
        let text = http_get(admin, "/metrics").expect("GET /metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The JSON records written so far.
    fn records(&self) -> Vec<Value> {
        self.proxy
            .access_lines()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
            .collect()
    }

    /// Waits for the `count`th record and returns it.
    fn record(&self, count: usize) -> Value {
        self.proxy.wait_json_records(count)[count - 1].clone()
    }
}

fn client_of(record: &Value) -> SocketAddr {
    record["client"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no client in {record}"))
}

/// A v1 header for a TCP connection from `src` to `dst`.
fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: `command` 0 LOCAL / 1 PROXY, `family` the family/protocol
/// byte, `payload` the addresses and TLVs.
fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.push(0x20 | command);
    bytes.push(family);
    bytes.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
    bytes.extend(payload);
    bytes
}

/// A v2 PROXY header for a TCP connection from `src` to `dst`, with `tlvs`.
fn v2_proxy(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let (family, mut payload) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (0x21, [s.octets(), d.octets()].concat()),
        _ => panic!("mixed families"),
    };
    payload.extend(src.port().to_be_bytes());
    payload.extend(dst.port().to_be_bytes());
    payload.extend(tlvs);
    v2(1, family, &payload)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Sends `chunks` as separate segments (a pause between them), then expects
/// the 200 and an echo of `payload` sent behind the last chunk.
fn tunnel_through(site: &Site, chunks: &[Vec<u8>], payload: &[u8]) -> TcpStream {
    let mut stream = site.connect();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        stream.write_all(chunk).unwrap();
    }
    expect_connect_ok(&mut stream);
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).expect("the echo");
    assert_eq!(echoed, payload);
    stream
}

/// Sends `bytes` (one write each, a pause between them), and expects the
/// proxy to close without a byte of answer within `within`.
fn expect_closed(mut stream: TcpStream, bytes: &[&[u8]], within: Duration) {
    stream.set_read_timeout(Some(within)).unwrap();
    for (i, chunk) in bytes.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The proxy may have closed already (a refused peer): that is fine.
        let _ = stream.write_all(chunk);
    }
    let mut answer = Vec::new();
    // A FIN, not a reset: the proxy reads what was sent before it closes.
    if let Err(err) = stream.read_to_end(&mut answer) {
        panic!("no clean close within {within:?}: {err}");
    }
    assert!(
        answer.is_empty(),
        "expected a close without an answer, got {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn headers_name_the_client_for_the_log_and_the_acls() {
    let site = Site::start("", &["--log-format", "json", "--dataplane", "splice"]);
    let lb = site.lb_port;
    let head = site.connect_head().into_bytes();

    // v1 TCP4, the header, the CONNECT head and tunnel bytes in one segment.
    let src = addr("192.0.2.10:40001");
    let one = [v1(src, lb), head.clone(), b"first".to_vec()].concat();
    drop(tunnel_through(&site, &[one], b"first"));
    let record = site.record(1);
    assert_eq!(client_of(&record), src, "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["bytes_from_client"], 5, "{record}");

    // v1 TCP6.
    let src6 = addr("[2001:db8::7]:40002");
    let dst6 = addr("[2001:db8::1]:3128");
    drop(tunnel_through(
        &site,
        &[[v1(src6, dst6), head.clone()].concat()],
        b"",
    ));
    assert_eq!(client_of(&site.record(2)), src6);

    // v2 over IPv4, split inside the signature and inside the addresses,
    // then the CONNECT head in a segment of its own.
    let src = addr("192.0.2.11:40003");
    let header = v2_proxy(src, lb, &[]);
    let chunks = [
        header[..5].to_vec(),
        header[5..20].to_vec(),
        header[20..].to_vec(),
        head.clone(),
    ];
    drop(tunnel_through(&site, &chunks, b""));
    assert_eq!(client_of(&site.record(3)), src);

    // v2 over IPv6 with a TLV (PP2_TYPE_AUTHORITY), which is ignored.
    let tlv = [&[0x02, 0, 9][..], b"a.example"].concat();
    let header = v2_proxy(src6, dst6, &tlv);
    drop(tunnel_through(
        &site,
        &[[header, head.clone()].concat()],
        b"",
    ));
    assert_eq!(client_of(&site.record(4)), src6);

    // v2 LOCAL (a health check): the TCP peer stays the client.
    let mut stream = tunnel_through(&site, &[[v2(0, 0, &[]), head.clone()].concat()], b"");
    let peer = stream.local_addr().unwrap();
    stream.write_all(b"x").unwrap();
    let mut x = [0u8; 1];
    stream.read_exact(&mut x).unwrap();
    drop(stream);
    assert_eq!(client_of(&site.record(5)), peer);

    // http_access judges the header's address: one outside `clients` is
    // denied although the load balancer (127.0.0.1) is allowed.
    let accepted = site.echo.accepted();
    let denied = addr("198.51.100.7:40004");
    let mut stream = site.connect();
    stream
        .write_all(&[v1(denied, lb), head.clone()].concat())
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert_eq!(status_of(&answer), 403, "{answer}");
    let record = site.record(6);
    assert_eq!(client_of(&record), denied, "{record}");
    assert_eq!(record["result"], "TCP_DENIED", "{record}");
    assert_eq!(
        site.echo.accepted(),
        accepted,
        "a denied request reached upstream"
    );
    assert_eq!(site.echo.accepted(), 5);
    assert_eq!(
        site.metric("spliced_proxy_protocol_headers_total{version=\"v1\"}"),
        3
    );
    assert_eq!(
        site.metric("spliced_proxy_protocol_headers_total{version=\"v2\"}"),
        3
    );
}

#[test]
fn the_squid_log_shows_the_header_client() {
    let site = Site::start("", &["--dataplane", "splice"]);
    let src = addr("192.0.2.20:40010");
    let head = site.connect_head().into_bytes();
    drop(tunnel_through(
        &site,
        &[[v2_proxy(src, site.lb_port, &[]), head].concat()],
        b"",
    ));
    let lines = site.proxy.wait_access_lines(1);
    // Squid's native format: time, elapsed, %>a, result/status, …
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields[2], "192.0.2.20", "{}", lines[0]);
    assert_eq!(fields[3], "TCP_TUNNEL/200", "{}", lines[0]);
    // A refusal: the TCP peer is the client, no status was sent.
    expect_closed(
        site.connect(),
        &[site.connect_head().as_bytes()],
        Duration::from_secs(10),
    );
    let lines = site.proxy.wait_access_lines(2);
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        fields[2..7],
        [
            "127.0.0.1",
            "NONE_NONE/000",
            "0",
            "NONE",
            "error:proxy-protocol"
        ],
        "{}",
        lines[1]
    );
}

#[test]
fn client_ip_max_connections_counts_the_header_client() {
    let site = Site::start(
        "client_ip_max_connections 1\n",
        &["--log-format", "json", "--dataplane", "splice"],
    );
    let head = site.connect_head().into_bytes();
    let (a, b) = (addr("192.0.2.30:1000"), addr("192.0.2.31:1000"));
    // Every connection comes from the load balancer, 127.0.0.1: only the
    // header's address is counted.
    let held = tunnel_through(&site, &[[v1(a, site.lb_port), head.clone()].concat()], b"");
    let other = tunnel_through(&site, &[[v1(b, site.lb_port), head.clone()].concat()], b"");
    let mut second = site.connect();
    second
        .write_all(&[v1(addr("192.0.2.30:1001"), site.lb_port), head.clone()].concat())
        .unwrap();
    let mut answer = String::new();
    let _ = second.read_to_string(&mut answer);
    assert_eq!(status_of(&answer), 429, "{answer}");
    let record = site.record(1);
    assert_eq!(record["status"], 429, "{record}");
    assert_eq!(client_of(&record), addr("192.0.2.30:1001"));
    assert_eq!(site.echo.accepted(), 2);
    drop((held, other));
    // Once A's tunnel is closed, A may connect again.
    site.proxy.wait_json_records(3);
    drop(tunnel_through(
        &site,
        &[[v1(a, site.lb_port), head].concat()],
        b"",
    ));
}

/// A connection the proxy must refuse.
struct Case {
    /// What it is, for failure messages.
    what: &'static str,
    /// The TCP peer's address.
    from: IpAddr,
    /// What it sends, one write each.
    bytes: Vec<Vec<u8>>,
    /// The refusal metric's label.
    reason: &'static str,
    /// Part of the record's `end`.
    detail: &'static str,
}

#[test]
fn refusals_close_log_and_count_without_going_upstream() {
    let site = Site::start(
        "request_timeout 2 seconds\n",
        &["--log-format", "json", "--dataplane", "splice"],
    );
    let lb = site.lb_port;
    let head = site.connect_head().into_bytes();
    let src = addr("192.0.2.40:5000");
    let good_v2 = v2_proxy(src, lb, &[]);
    let mut bad_signature = good_v2.clone();
    bad_signature[7] ^= 0x20;
    let mut short_length = v2(1, 0x11, &[0; 4]);
    short_length.extend(&head);
    let mut huge = good_v2[..16].to_vec();
    huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let too_long_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120], b"\r\n"].concat();
    let within = Duration::from_secs(10);

    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let cases = [
        Case {
            what: "forged header from a peer proxy_protocol_access does not allow",
            from: "127.0.0.2".parse().unwrap(),
            bytes: vec![[v1(src, lb), head.clone()].concat()],
            reason: "not_allowed",
            detail: "not accepted from 127.0.0.2",
        },
        Case {
            what: "missing header (a plain CONNECT)",
            from: lo,
            bytes: vec![head.clone()],
            reason: "missing",
            detail: "no PROXY protocol header",
        },
        Case {
            what: "bad v2 signature",
            from: lo,
            bytes: vec![[bad_signature, head.clone()].concat()],
            reason: "missing",
            detail: "no PROXY protocol header",
        },
        Case {
            what: "v2 length too short for its addresses",
            from: lo,
            bytes: vec![short_length],
            reason: "malformed",
            detail: "malformed PROXY v2",
        },
        Case {
            what: "v1 garbage",
            from: lo,
            bytes: vec![b"PROXY TCP4 not an address\r\n".to_vec(), head.clone()],
            reason: "malformed",
            detail: "malformed PROXY v1",
        },
        Case {
            what: "v1 line too long",
            from: lo,
            bytes: vec![too_long_v1],
            reason: "too_long",
            detail: "too long",
        },
        Case {
            what: "v2 length past the cap",
            from: lo,
            bytes: vec![huge],
            reason: "too_long",
            detail: "too long",
        },
    ];
    let mut count = 0;
    for Case {
        what,
        from,
        bytes,
        reason,
        detail,
    } in cases
    {
        let before = site.refusals(reason);
        let stream = connect_from(from, lb).expect("connect");
        let chunks: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        expect_closed(stream, &chunks, within);
        count += 1;
        let record = site.record(count);
        assert_eq!(record["target"], "error:proxy-protocol", "{what}: {record}");
        assert_eq!(record["status"], 0, "{what}: {record}");
        assert_eq!(client_of(&record).ip(), from, "{what}: {record}");
        let end = record["end"].as_str().unwrap_or_default();
        assert!(end.contains(detail), "{what}: {record}");
        assert_eq!(site.refusals(reason), before + 1, "{what}: metric");
    }

    // Truncated: half a v2 header, then the peer closes its side.
    let before = site.refusals("closed_early");
    let mut stream = site.connect();
    stream.write_all(&good_v2[..20]).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    expect_closed(stream, &[], within);
    count += 1;
    let record = site.record(count);
    assert!(
        record["end"]
            .as_str()
            .unwrap()
            .contains("20 bytes received"),
        "{record}"
    );
    assert_eq!(site.refusals("closed_early"), before + 1);

    // Slow: a header that never completes is cut at request_timeout.
    let before = site.refusals("timeout");
    let stream = site.connect();
    let started = Instant::now();
    expect_closed(stream, &[b"PROXY TCP4 192.0.2.1"], within);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < within,
        "closed after {took:?}"
    );
    count += 1;
    let record = site.record(count);
    assert!(
        record["end"]
            .as_str()
            .unwrap()
            .contains("not received within"),
        "{record}"
    );
    assert_eq!(site.refusals("timeout"), before + 1);

    // request_timeout covers the header and the request head together: a
    // header sent 1.5 s late leaves 0.5 s for the head, not another 2 s.
    let mut stream = site.connect();
    stream.set_read_timeout(Some(within)).unwrap();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    stream.write_all(&v1(src, lb)).unwrap();
    stream.write_all(b"CONNECT 127.0.0.1").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "408 after {took:?}, request_timeout 2 s"
    );
    count += 1;
    let record = site.record(count);
    assert_eq!(record["status"], 408, "{record}");
    assert_eq!(record["client"], "192.0.2.40:5000", "{record}");

    assert_eq!(
        site.echo.accepted(),
        0,
        "a refused connection reached upstream"
    );
    assert_eq!(site.records().len(), count);
    // The proxy holds none of them open.
    assert!(
        wait_until(Duration::from_secs(10), || site
            .metric("spliced_tunnels_active{dataplane=\"splice\"}")
            == 0),
        "tunnels left open"
    );
}

#[test]
fn ports_without_require_proxy_header_take_a_header_for_a_bad_request() {
    let site = Site::start("", &["--log-format", "json", "--dataplane", "splice"]);
    let head = site.connect_head().into_bytes();
    let src = addr("192.0.2.50:1");
    for header in [
        v1(src, site.plain_port),
        v2_proxy(src, site.plain_port, &[]),
    ] {
        let mut stream = TcpStream::connect(site.plain_port).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.write_all(&[header, head.clone()].concat()).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert_eq!(status_of(&answer), 400, "{answer}");
    }
    let records = site.proxy.wait_json_records(2);
    for record in &records {
        assert_eq!(record["status"], 400, "{record}");
        assert_eq!(client_of(record).ip(), IpAddr::from([127, 0, 0, 1]));
    }
    assert_eq!(site.refusals("missing"), 0);
    assert_eq!(site.echo.accepted(), 0);
}

/// A one-shot HTTP origin: answers each request with the `X-Forwarded-For`
/// it carried.
fn xff_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let text = String::from_utf8_lossy(&head);
            let xff = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("x-forwarded-for:")
                        .then(|| l["x-forwarded-for:".len()..].trim().to_owned())
                })
                .unwrap_or_default();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xff}",
                xff.len()
            );
        }
    });
    addr
}

#[test]
fn plain_http_behind_a_header_forwards_for_the_header_client() {
    let site = Site::start("", &["--log-format", "json", "--dataplane", "splice"]);
    let origin = xff_origin();
    let src = addr("192.0.2.60:7000");
    let mut stream = site.connect();
    stream
        .write_all(
            &[
                v1(src, site.lb_port),
                format!(
                    "GET http://{origin}/x HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
                )
                .into_bytes(),
            ]
            .concat(),
        )
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.ends_with("192.0.2.60"), "{answer}");
    let record = site.record(1);
    assert_eq!(client_of(&record), src, "{record}");
    assert_eq!(record["method"], "GET", "{record}");
}

/// A tunnel behind a v2 header moves 4 MiB each way on `plane`, with the
/// header, the head and the first tunnel bytes in one segment.
fn tunnel_runs_on(plane: &str) {
    let site = Site::start("", &["--log-format", "json", "--dataplane", plane]);
    let src = addr("192.0.2.70:7100");
    let first = b"behind the header".to_vec();
    let head = site.connect_head().into_bytes();
    let mut stream = tunnel_through(
        &site,
        &[[v2_proxy(src, site.lb_port, &[]), head, first.clone()].concat()],
        &first,
    );
    let block: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut reader = stream.try_clone().unwrap();
    let expected = block.clone();
    let check = std::thread::spawn(move || {
        let mut got = vec![0u8; expected.len()];
        for _ in 0..64 {
            reader.read_exact(&mut got).expect("echoed block");
            assert_eq!(got, expected);
        }
    });
    for _ in 0..64 {
        stream.write_all(&block).unwrap();
    }
    check.join().expect("echo checked");
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    site.proxy.assert_tunnels_ran_on(plane, 1);
    let record = site.record(1);
    assert_eq!(client_of(&record), src, "{record}");
    let moved = first.len() as u64 + 64 * block.len() as u64;
    assert_eq!(record["bytes_from_client"], moved, "{record}");
}

#[test]
fn tunnel_behind_a_header_runs_on_splice() {
    tunnel_runs_on("splice");
}

#[test]
fn tunnel_behind_a_header_runs_on_sockmap() {
    tunnel_runs_on("sockmap");
}

/// Sends SIGHUP and waits for the `count`th "configuration reloaded".
fn reload(site: &Site, count: usize) {
    // SAFETY: kill(2) with the pid of our own child and a valid signal.
    unsafe { libc::kill(site.proxy.pid() as i32, libc::SIGHUP) };
    assert!(
        site.proxy.logged_times("configuration reloaded", count),
        "{}",
        site.proxy.stderr()
    );
}

#[test]
fn a_reload_turns_require_proxy_header_off_and_on() {
    let site = Site::start("", &["--log-format", "json", "--dataplane", "splice"]);
    let conf = site._conf.path().join("squid.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let head = site.connect_head().into_bytes();

    // Off: a plain CONNECT on the same port opens a tunnel, from 127.0.0.1.
    std::fs::write(&conf, text.replace(" require-proxy-header", "")).unwrap();
    reload(&site, 1);
    drop(tunnel_through(&site, std::slice::from_ref(&head), b""));
    let record = site.record(1);
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(client_of(&record).ip(), IpAddr::from([127, 0, 0, 1]));

    // On again: the same request is refused, a header is needed.
    std::fs::write(&conf, &text).unwrap();
    reload(&site, 2);
    expect_closed(site.connect(), &[&head], Duration::from_secs(10));
    let record = site.record(2);
    assert_eq!(record["target"], "error:proxy-protocol", "{record}");
    let src = addr("192.0.2.80:8000");
    drop(tunnel_through(
        &site,
        &[[v1(src, site.lb_port), head].concat()],
        b"",
    ));
    assert_eq!(client_of(&site.record(3)), src);
    assert_eq!(site.refusals("missing"), 1);
}
