//! Every error answer of spliced: 400, 403, 405, 408, 431, 502, 503 and 504, and
//! clients that leave without a request. Each refusal must be a short
//! `Connection: close` text answer, leave one access-log line that says what
//! happened, and leave the proxy serving: after each one a real tunnel moves bytes.
//!
//! Every proxy runs in a network namespace made for its test, whose resolver is a
//! dead (or test-owned) address, so no name lookup ever leaves the namespace.

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use spliced_tests::{
    dns::Reply,
    expect_connect_ok,
    netns::Netns,
    open_tunnel, raw_request,
    sockets::black_hole,
    status_of,
    upstream::{exchange, Header},
    wait_until, DnsStub, Mode, Proxy, Upstream, IO_TIMEOUT,
};

/// 127.0.0.1, where every test's proxy, upstream and clients live.
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Target logged when no request line could be read.
const NO_REQUEST: &str = "error:invalid-request";

/// Access-log format of a test's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Squid,
    Json,
}

/// An answer as the client received it.
struct Answer {
    raw: Vec<u8>,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    /// Splits `raw` into status, headers and body.
    fn parse(raw: Vec<u8>) -> Self {
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        Self {
            status: status_of(&text),
            headers,
            body: body.to_owned(),
            raw,
        }
    }

    /// The value of header `name` (case-insensitive), if present once.
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(n, _)| n == name);
        let value = values.next().map(|(_, v)| v.as_str());
        assert!(values.next().is_none(), "header {name} repeated");
        value
    }

    /// The whole answer, for messages.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// Fails the test unless `answer` is spliced's error answer with `status`: an
/// HTTP/1.1 status line, a short one-line text body whose length matches
/// `Content-Length`, and `Connection: close`.
fn assert_error_answer(answer: &Answer, status: u16) {
    let text = answer.text();
    assert_eq!(answer.status, status, "answer: {text:?}");
    assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{text:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain"),
        "{text:?}"
    );
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str()),
        "{text:?}"
    );
    assert!(
        !answer.body.is_empty() && answer.body.len() <= 512,
        "body not short: {text:?}"
    );
    assert!(
        answer.body.ends_with('\n') && answer.body.lines().count() == 1,
        "body not one line of text: {text:?}"
    );
    assert!(
        answer.body.starts_with(&format!("spliced: {status} ")),
        "{text:?}"
    );
    assert!(
        answer.body.chars().all(|c| !c.is_control() || c == '\n'),
        "{text:?}"
    );
    if status == 405 {
        assert_eq!(answer.header("allow"), Some("CONNECT"), "{text:?}");
    }
}

/// One access-log record, from either format.
#[derive(Debug)]
struct Record {
    line: String,
    client: IpAddr,
    result: String,
    status: u16,
    bytes_to_client: u64,
    method: String,
    target: String,
    hierarchy: String,
    upstream: Option<IpAddr>,
    /// Squid's `%mt` (None in JSON).
    mime: Option<String>,
    /// JSON's `end` and `dataplane` (None in Squid lines).
    end: Option<String>,
    dataplane: Option<serde_json::Value>,
}

impl Record {
    /// Parses one line of the access log written in `format`.
    fn parse(line: &str, format: Format) -> Self {
        match format {
            Format::Squid => Self::parse_squid(line),
            Format::Json => Self::parse_json(line),
        }
    }

    /// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
    fn parse_squid(line: &str) -> Self {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 10, "squid line {line:?}");
        let (result, status) = fields[3].split_once('/').expect("%Ss/%>Hs");
        assert_eq!(status.len(), 3, "status not 3 digits: {line:?}");
        let (hierarchy, upstream) = fields[8].split_once('/').expect("%Sh/%<a");
        assert_eq!(fields[7], "-", "user of {line:?}");
        Self {
            line: line.to_owned(),
            client: fields[2].parse().expect("client IP"),
            result: result.to_owned(),
            status: status.parse().expect("status"),
            bytes_to_client: fields[4].parse().expect("bytes"),
            method: fields[5].to_owned(),
            target: fields[6].to_owned(),
            hierarchy: hierarchy.to_owned(),
            upstream: (upstream != "-").then(|| upstream.parse().expect("upstream IP")),
            mime: Some(fields[9].to_owned()),
            end: None,
            dataplane: None,
        }
    }

    /// Spliced's JSON record.
    fn parse_json(line: &str) -> Self {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("bad JSON {line:?}: {err}"));
        let text = |key: &str| {
            json[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} in {line}"))
                .to_owned()
        };
        let socket = |text: &str| -> SocketAddr { text.parse().expect("socket address") };
        Self {
            line: line.to_owned(),
            client: socket(&text("client")).ip(),
            result: text("result"),
            status: json["status"].as_u64().expect("status") as u16,
            bytes_to_client: json["bytes_to_client"].as_u64().expect("bytes_to_client"),
            method: text("method"),
            target: text("target"),
            hierarchy: text("hierarchy"),
            upstream: json["upstream"].as_str().map(|s| socket(s).ip()),
            mime: None,
            end: Some(text("end")),
            dataplane: Some(json["dataplane"].clone()),
        }
    }

    /// Fails the test unless this is the record of a refusal.
    fn assert_refusal(&self, expected: &Refusal, client: IpAddr, answer_len: usize) {
        let line = &self.line;
        assert_eq!(self.client, client, "client of {line}");
        assert_eq!(self.status, expected.status, "status of {line}");
        assert_eq!(self.result, expected.result, "result of {line}");
        assert_eq!(self.method, expected.method, "method of {line}");
        assert_eq!(self.target, expected.target, "target of {line}");
        assert_eq!(self.hierarchy, "HIER_NONE", "hierarchy of {line}");
        assert_eq!(self.upstream, None, "upstream of {line}");
        assert_eq!(
            self.bytes_to_client, answer_len as u64,
            "bytes to client of {line}"
        );
        if let Some(mime) = &self.mime {
            let expected_mime = if expected.status == 0 {
                "-"
            } else {
                "text/plain"
            };
            assert_eq!(mime, expected_mime, "mime type of {line}");
        }
        if let Some(end) = &self.end {
            assert!(!end.is_empty(), "no reason in {line}");
            assert!(
                end.contains(expected.reason),
                "reason of {line} lacks {:?}",
                expected.reason
            );
        }
        if let Some(dataplane) = &self.dataplane {
            assert!(dataplane.is_null(), "dataplane of {line}");
        }
    }
}

/// What a refused request must look like in the answer and the access log.
struct Refusal<'a> {
    status: u16,
    result: &'a str,
    method: &'a str,
    target: &'a str,
    /// A piece of JSON's `end` (the proxy's reason); "" for any.
    reason: &'a str,
}

impl<'a> Refusal<'a> {
    /// A `NONE_NONE` refusal of a request whose line was read.
    fn new(status: u16, method: &'a str, target: &'a str) -> Self {
        Self {
            status,
            result: "NONE_NONE",
            method,
            target,
            reason: "",
        }
    }

    /// A `NONE_NONE` refusal before any request line was read.
    fn unread(status: u16) -> Self {
        Self::new(status, "NONE", NO_REQUEST)
    }

    /// Requires JSON's `end` to contain `reason`.
    fn because(mut self, reason: &'a str) -> Self {
        self.reason = reason;
        self
    }
}

/// A proxy in its own namespace, an exchange upstream beside it, and the count of
/// access-log lines checked so far. Clients run in `client` when given, else in
/// the proxy's namespace.
struct Bench {
    proxy: Proxy,
    upstream: Upstream,
    format: Format,
    client_ip: IpAddr,
    checked: usize,
    next_seed: u64,
    client: Option<Netns>,
    host: Netns,
}

impl Bench {
    /// A proxy and upstream on 127.0.0.1 of a new namespace; CONNECT may reach the
    /// upstream's port and `ports`.
    fn start(format: Format, ports: &[u16], args: &[&str]) -> Self {
        Self::start_in(Netns::new(), None, LOCALHOST, format, ports, args)
    }

    /// A proxy and upstream on 127.0.0.1 of `host`, with clients in `client` (whose
    /// address is `client_ip`) or in `host`.
    fn start_in(
        host: Netns,
        client: Option<Netns>,
        client_ip: IpAddr,
        format: Format,
        ports: &[u16],
        args: &[&str],
    ) -> Self {
        let upstream = Upstream::start_in(&host, "127.0.0.1:0".parse().unwrap());
        let ports: Vec<String> = std::iter::once(upstream.addr.port())
            .chain(ports.iter().copied())
            .map(|port| port.to_string())
            .collect();
        let ports = ports.join(",");
        let format_name = match format {
            Format::Squid => "squid",
            Format::Json => "json",
        };
        let mut all = vec!["--connect-ports", &ports, "--log-format", format_name];
        all.extend_from_slice(args);
        let proxy = Proxy::start_in(&host, &all);
        Self {
            proxy,
            upstream,
            format,
            client_ip,
            checked: 0,
            next_seed: 1000,
            client,
            host,
        }
    }

    /// Runs `f` where the clients are.
    fn as_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.client.as_ref().unwrap_or(&self.host).enter(f)
    }

    /// Sends `raw` as a client and returns the whole answer.
    fn send(&self, raw: impl Into<Vec<u8>>) -> Answer {
        let (proxy, raw) = (self.proxy.addr, raw.into());
        Answer::parse(self.as_client(move || raw_request(proxy, &raw).into_bytes()))
    }

    /// The next access-log record (waits for it).
    fn next_record(&mut self) -> Record {
        let lines = self.proxy.wait_access_lines(self.checked + 1);
        self.checked += 1;
        Record::parse(&lines[self.checked - 1], self.format)
    }

    /// Fails the test unless no access-log line beyond the checked ones appears.
    fn assert_no_more_records(&self) {
        let lines = self.proxy.access_lines();
        assert_eq!(lines.len(), self.checked, "unexpected lines: {lines:#?}");
    }

    /// Sends `raw` and checks the error answer and its access-log line.
    fn refused(&mut self, raw: impl Into<Vec<u8>>, expected: Refusal) -> Answer {
        let answer = self.send(raw);
        assert_error_answer(&answer, expected.status);
        self.assert_logged(&expected, answer.raw.len());
        answer
    }

    /// Checks that the next access-log record is `expected`.
    fn assert_logged(&mut self, expected: &Refusal, answer_len: usize) {
        let record = self.next_record();
        record.assert_refusal(expected, self.client_ip, answer_len);
    }

    /// [`Bench::refused`], then proves the proxy still serves.
    fn refused_then_serves(&mut self, raw: impl Into<Vec<u8>>, expected: Refusal) -> Answer {
        let answer = self.refused(raw, expected);
        self.assert_serves();
        answer
    }

    /// Opens a tunnel to the upstream, moves a few KiB each way, and checks the
    /// tunnel's access-log line.
    fn assert_serves(&mut self) {
        let (proxy, target) = (self.proxy.addr, self.upstream.addr.to_string());
        self.assert_serves_with(move || open_tunnel(proxy, &target));
    }

    /// Like [`Bench::assert_serves`], with the tunnel opened by `open`.
    fn assert_serves_with(&mut self, open: impl FnOnce() -> TcpStream + Send + 'static) {
        let header = Header {
            up: 3000,
            down: 5000,
            seed: self.next_seed,
            mode: Mode::Concurrent,
        };
        self.next_seed += 2;
        let client = self.as_client(move || exchange(open(), header, false));
        let server = self.upstream.result();
        assert_eq!(client.received, Ok(header.down), "client side");
        assert_eq!(server.received, Ok(header.up), "upstream side");
        let record = self.next_record();
        let line = &record.line;
        assert_eq!(record.status, 200, "{line}");
        assert_eq!(record.result, "TCP_TUNNEL", "{line}");
        assert_eq!(record.hierarchy, "HIER_DIRECT", "{line}");
        assert_eq!(record.target, self.upstream.addr.to_string(), "{line}");
        assert_eq!(record.upstream, Some(LOCALHOST), "{line}");
        assert_eq!(record.bytes_to_client, 39 + header.down, "{line}");
    }
}

/// A CONNECT request head for `target`.
fn connect(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// A listener that must never get a connection; checked with [`assert_untouched`].
fn sentinel(ns: &Netns) -> TcpListener {
    ns.enter(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sentinel");
        listener.set_nonblocking(true).unwrap();
        listener
    })
}

/// Fails the test if anything connected to `sentinel`.
fn assert_untouched(sentinel: &TcpListener) {
    match sentinel.accept() {
        Err(err) if err.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the proxy connected where it must not: {other:?}"),
    }
}

/// A port on 127.0.0.1 of `ns` where nothing listens (bound, then released).
fn closed_port(ns: &Netns) -> u16 {
    ns.enter(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind")
            .port()
    })
}

#[test]
fn malformed_request_heads_get_400() {
    let mut bench = Bench::start(Format::Squid, &[], &[]);
    let target = bench.upstream.addr.to_string();
    let heads: Vec<Vec<u8>> = vec![
        b"CONNECT\r\n\r\n".to_vec(),
        // The start of a TLS ClientHello: a client that took the proxy for an origin.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
        b"\x00\x00\x00\x00\r\n\r\n".to_vec(),
        b"\xff\xfe garbage \x80\r\n\r\n".to_vec(),
        format!("CONNECT {target}\r\n\r\n").into_bytes(),
        format!("CONNECT {target} extra HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT {target} HTTP/1.1\r\nNo colon here\r\n\r\n").into_bytes(),
        format!("CONNECT {target} HTTP/1.1\r\nBad Name: x\r\n\r\n").into_bytes(),
    ];
    for head in heads {
        bench.refused_then_serves(head, Refusal::unread(400).because("malformed"));
    }
    bench.assert_no_more_records();
}

#[test]
fn bad_connect_targets_get_400() {
    let mut bench = Bench::start(Format::Json, &[443], &[]);
    let port = bench.upstream.addr.port();
    let targets = [
        "no-port.invalid".to_owned(),
        "no-port.invalid:".to_owned(),
        "example.invalid:0".to_owned(),
        "example.invalid:70000".to_owned(),
        "example.invalid:+443".to_owned(),
        "user@localhost:443".to_owned(),
        format!("user:pw@127.0.0.1:{port}"),
        format!("127.1:{port}"),
        format!("0x7f.0.0.1:{port}"),
        format!("127.000.0.1:{port}"),
        "[::1:443".to_owned(),
        "[::1]".to_owned(),
        "::1:443".to_owned(),
        ":443".to_owned(),
        "-bad.invalid:443".to_owned(),
        "a..b.invalid:443".to_owned(),
        "/path:443".to_owned(),
    ];
    for target in &targets {
        bench.refused_then_serves(
            connect(target),
            Refusal::new(400, "CONNECT", target).because("bad CONNECT target"),
        );
    }
    bench.assert_no_more_records();
}

#[test]
fn other_methods_get_405_with_allow_connect() {
    let mut bench = Bench::start(Format::Squid, &[], &[]);
    let sentinel = sentinel(&bench.host);
    let guarded = sentinel.local_addr().unwrap().to_string();
    // An absolute `http://` URI is forwarded (tests/plain_http.rs); other
    // schemes are not.
    let absolute = format!("ftp://{guarded}/");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "GET / HTTP/1.1\r\nHost: a.invalid\r\n\r\n".into(),
            "GET",
            "/",
        ),
        (
            format!("GET {absolute} HTTP/1.1\r\nHost: {guarded}\r\n\r\n"),
            "GET",
            &absolute,
        ),
        (
            "POST /submit HTTP/1.1\r\nHost: a.invalid\r\nContent-Length: 5\r\n\r\nhello".into(),
            "POST",
            "/submit",
        ),
        ("PUT /x HTTP/1.1\r\n\r\n".into(), "PUT", "/x"),
        ("DELETE /x HTTP/1.0\r\n\r\n".into(), "DELETE", "/x"),
        ("OPTIONS * HTTP/1.1\r\n\r\n".into(), "OPTIONS", "*"),
        // RFC 9110 §9.1: method names are case-sensitive; these are not CONNECT.
        (
            connect(&guarded).replacen("CONNECT", "connect", 1),
            "connect",
            &guarded,
        ),
        (
            connect(&guarded).replacen("CONNECT", "Connect", 1),
            "Connect",
            &guarded,
        ),
    ];
    for (head, method, target) in &cases {
        bench.refused_then_serves(
            head.as_str(),
            Refusal::new(405, method, target).because("not supported"),
        );
    }
    assert_untouched(&sentinel);
    bench.assert_no_more_records();
}

/// RFC 9110 §9.3.2: a response to HEAD never has content, error answers included.
#[test]
fn head_gets_405_without_content() {
    let mut bench = Bench::start(Format::Squid, &[], &[]);
    let answer = bench.send("HEAD / HTTP/1.1\r\nHost: a.invalid\r\n\r\n");
    assert_eq!(answer.status, 405, "{}", answer.text());
    assert_eq!(answer.header("allow"), Some("CONNECT"));
    assert_eq!(answer.header("connection"), Some("close"));
    let record = bench.next_record();
    assert_eq!((record.status, record.method.as_str()), (405, "HEAD"));
    bench.assert_serves();
    assert_eq!(
        answer.body,
        "",
        "405 to HEAD carries content: {:?}",
        answer.text()
    );
}

#[test]
fn ports_outside_connect_ports_get_403() {
    let mut bench = Bench::start(Format::Squid, &[], &[]);
    let sentinel = sentinel(&bench.host);
    let guarded = sentinel.local_addr().unwrap().to_string();
    for target in [
        guarded.as_str(),
        "localhost:25",
        "[::1]:22",
        "127.0.0.1:443",
    ] {
        bench.refused_then_serves(
            connect(target),
            Refusal {
                status: 403,
                result: "TCP_DENIED",
                method: "CONNECT",
                target,
                reason: "",
            },
        );
    }
    assert_untouched(&sentinel);
    bench.assert_no_more_records();
}

#[test]
fn clients_outside_localnet_get_403() {
    // A public client (documentation range) and a private (RFC 1918) one, each on
    // its own link to the proxy's host.
    let host = Netns::new();
    let public = Netns::new();
    let private = Netns::new();
    let proxy_public = Ipv4Addr::new(198, 51, 100, 1);
    let public_ip = Ipv4Addr::new(198, 51, 100, 2);
    let proxy_private = Ipv4Addr::new(10, 9, 0, 1);
    let private_ip = Ipv4Addr::new(10, 9, 0, 2);
    host.link(&public, proxy_public, public_ip);
    host.link(&private, proxy_private, private_ip);
    let listen_private = format!("{proxy_private}:3128");
    let listen_public = format!("{proxy_public}:3128");
    let mut bench = Bench::start_in(
        host,
        Some(private),
        IpAddr::V4(private_ip),
        Format::Json,
        &[],
        &["--listen", &listen_private, "--listen", &listen_public],
    );
    assert_eq!(bench.proxy.addr.to_string(), listen_private);
    // The private client is served.
    bench.assert_serves();
    let public_proxy = SocketAddr::from((proxy_public, 3128));
    let target = bench.upstream.addr.to_string();
    for _ in 0..2 {
        let request = connect(&target);
        let answer = Answer::parse(
            public.enter(move || raw_request(public_proxy, request.as_bytes()).into_bytes()),
        );
        assert_error_answer(&answer, 403);
        let record = bench.next_record();
        record.assert_refusal(
            &Refusal {
                status: 403,
                result: "TCP_DENIED",
                method: "CONNECT",
                target: &target,
                reason: "localnet",
            },
            IpAddr::V4(public_ip),
            answer.raw.len(),
        );
        // The private client still is.
        bench.assert_serves();
    }
    bench.assert_no_more_records();
}

#[test]
fn oversized_heads_get_431() {
    let mut bench = Bench::start(Format::Json, &[], &[]);
    let target = bench.upstream.addr.to_string();
    let many_headers: String = (0..200).map(|i| format!("X-Header-{i}: v\r\n")).collect();
    let heads = [
        format!("CONNECT {target} HTTP/1.1\r\n{many_headers}\r\n"),
        format!(
            "CONNECT {target} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        ),
        // Never complete: 200 KiB without an end of head.
        format!(
            "CONNECT {target} HTTP/1.1\r\nX-Big: {}",
            "a".repeat(200 * 1024)
        ),
    ];
    for head in heads {
        bench.refused_then_serves(head, Refusal::unread(431).because("too large"));
    }
    // A head just under the limit opens a tunnel.
    let (proxy, big) = (bench.proxy.addr, target.clone());
    bench.assert_serves_with(move || {
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let head = format!(
            "CONNECT {big} HTTP/1.1\r\nHost: {big}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(60 * 1024)
        );
        stream.write_all(head.as_bytes()).unwrap();
        expect_connect_ok(&mut stream);
        stream
    });
    bench.assert_no_more_records();
}

/// Reads until the peer closes (or resets) and returns what arrived and when.
fn read_until_closed(stream: &mut TcpStream, started: Instant) -> (Vec<u8>, Duration) {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(err)
                if err.kind() == ErrorKind::WouldBlock || err.kind() == ErrorKind::TimedOut =>
            {
                panic!("the proxy did not close within {IO_TIMEOUT:?}")
            }
            Err(_) => break,
        }
    }
    (answer, started.elapsed())
}

#[test]
fn incomplete_heads_get_408_after_request_timeout() {
    let mut bench = Bench::start(Format::Squid, &[], &["--request-timeout", "1"]);
    let proxy = bench.proxy.addr;
    let target = bench.upstream.addr.to_string();

    // A client that connects and sends nothing, and one whose head stops half-way.
    for first_bytes in [
        String::new(),
        format!("CONNECT {target} HTTP/1.1\r\nHost: "),
    ] {
        let (answer, waited) = bench.as_client(move || {
            let mut stream = TcpStream::connect(proxy).unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream.write_all(first_bytes.as_bytes()).unwrap();
            read_until_closed(&mut stream, Instant::now())
        });
        let answer = Answer::parse(answer);
        assert_error_answer(&answer, 408);
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "408 after {waited:?}"
        );
        bench.assert_logged(&Refusal::unread(408), answer.raw.len());
        bench.assert_serves();
    }

    // A client that keeps sending a byte every 100 ms never completes its head;
    // the proxy answers 408 and closes the connection instead of waiting for ever.
    let fds_before = bench.proxy.fd_count();
    let (answer, waited, writer_stopped_by_error) = bench.as_client(move || {
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let started = Instant::now();
        let trickle = std::thread::spawn(move || {
            writer.write_all(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-Slow: ")?;
            // At most 20 s of trickling; the proxy must cut it much earlier.
            for _ in 0..200 {
                writer.write_all(b"a")?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok::<(), std::io::Error>(())
        });
        let (answer, waited) = read_until_closed(&mut stream, started);
        (answer, waited, trickle.join().unwrap().is_err())
    });
    let answer = Answer::parse(answer);
    assert_error_answer(&answer, 408);
    assert!(
        waited < Duration::from_secs(5),
        "slow client held for {waited:?}"
    );
    assert!(
        writer_stopped_by_error,
        "the proxy kept the slow client's connection open"
    );
    bench.assert_logged(&Refusal::unread(408), answer.raw.len());
    assert!(
        wait_until(Duration::from_secs(5), || bench.proxy.fd_count()
            <= fds_before),
        "the proxy holds {} fds, {fds_before} before the slow client",
        bench.proxy.fd_count()
    );
    bench.assert_serves();
    bench.assert_no_more_records();
}

#[test]
fn refused_upstream_gets_502() {
    let host = Netns::new();
    let closed = closed_port(&host);
    let mut bench = Bench::start_in(host, None, LOCALHOST, Format::Json, &[closed], &[]);
    let target = format!("127.0.0.1:{closed}");
    for _ in 0..3 {
        bench.refused_then_serves(
            connect(&target),
            Refusal::new(502, "CONNECT", &target).because("refused"),
        );
    }
    bench.assert_no_more_records();
}

#[test]
fn unresolvable_names_get_503() {
    let host = Netns::new();
    // A patient resolver configuration, so the proxy's --dns-timeout is what ends
    // a lookup that gets no answer.
    fs::write(
        format!("/etc/netns/{}/resolv.conf", host.name),
        "nameserver 127.0.0.1\noptions timeout:5 attempts:2\n",
    )
    .expect("write resolv.conf");
    let mut bench = Bench::start_in(
        host,
        None,
        LOCALHOST,
        Format::Json,
        &[443],
        &["--dns-timeout", "1"],
    );
    // Each step asks for a name of its own: the proxy caches failures for
    // negative_dns_ttl, and resolves `.invalid` itself (RFC 6761) without asking.
    let quickly = |bench: &mut Bench, target: &str, reason: &str| {
        let started = Instant::now();
        bench.refused(
            connect(target),
            Refusal::new(503, "CONNECT", target).because(reason),
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "503 after {took:?}");
        bench.assert_serves();
        took
    };

    // Nothing listens where the namespace's resolver points: the resolver's
    // UDP sockets are not connected, so the port's ICMP errors do not reach it
    // and --dns-timeout ends the lookup.
    quickly(&mut bench, "no-server.test:443", "timed out");

    // A resolver that says NXDOMAIN; it proves the lookup stayed in the namespace.
    let answer = Arc::new(AtomicBool::new(true));
    let answers = answer.clone();
    let stub = DnsStub::start(&bench.host, move |_query| {
        if answers.load(Ordering::SeqCst) {
            Reply::NxDomain
        } else {
            Reply::Silence
        }
    });
    quickly(&mut bench, "no-such-host.test:443", "did not resolve");
    let asked = stub.queries();
    assert!(
        asked.iter().any(|query| query.name == "no-such-host.test"),
        "the namespace's resolver was not asked: {asked:?}"
    );

    // A resolver that never answers: --dns-timeout ends the lookup.
    answer.store(false, Ordering::SeqCst);
    let took = quickly(&mut bench, "silent.test:443", "timed out");
    assert!(took >= Duration::from_millis(900), "503 after {took:?}");
    bench.assert_no_more_records();
}

#[test]
fn connect_timeout_gets_504() {
    let host = Netns::new();
    let (listener, _fillers) = black_hole(&host);
    let port = listener.local_addr().unwrap().as_socket().unwrap().port();
    let mut bench = Bench::start_in(
        host,
        None,
        LOCALHOST,
        Format::Squid,
        &[port],
        &["--connect-timeout", "1"],
    );
    let target = format!("127.0.0.1:{port}");
    for _ in 0..2 {
        let started = Instant::now();
        bench.refused(connect(&target), Refusal::new(504, "CONNECT", &target));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "504 after {took:?}"
        );
        bench.assert_serves();
    }
    bench.assert_no_more_records();
}

/// The addresses the resolver of `ns` gives for `name`, in its order.
fn resolver_order(ns: &Netns, name: &str) -> Vec<IpAddr> {
    let output = ns
        .command("getent")
        .args(["ahosts", name])
        .output()
        .expect("run getent");
    assert!(output.status.success(), "getent ahosts {name} failed");
    let mut order: Vec<IpAddr> = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let ip = line.split_whitespace().next().unwrap().parse().unwrap();
        if !order.contains(&ip) {
            order.push(ip);
        }
    }
    order
}

#[test]
fn names_with_several_addresses_are_tried_in_order() {
    let host = Netns::new();
    // `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts.
    fs::write(
        format!("/etc/netns/{}/hosts", host.name),
        "127.0.0.1 localhost\n::1 both.test\n127.0.0.1 both.test\n",
    )
    .expect("write hosts");
    assert_eq!(
        resolver_order(&host, "both.test"),
        [IpAddr::V6(Ipv6Addr::LOCALHOST), LOCALHOST],
        "the namespace's resolver must give ::1 first for this test"
    );
    // Port P: only 127.0.0.1 listens, so ::1 refuses and the proxy goes on.
    // Port Q: both listen, so the first address is the one used.
    let (v4, v6) = {
        let v4 = Upstream::start_in(&host, "127.0.0.1:0".parse().unwrap());
        let v6_addr = SocketAddr::from((Ipv6Addr::LOCALHOST, v4.addr.port()));
        (v4, Upstream::start_in(&host, v6_addr))
    };
    let mut bench = Bench::start_in(host, None, LOCALHOST, Format::Squid, &[v4.addr.port()], &[]);
    let proxy = bench.proxy.addr;
    let v6_loopback = IpAddr::V6(Ipv6Addr::LOCALHOST);

    // (port, the upstream that must get the tunnel (None: the bench's), its address)
    for (port, reached, via) in [
        (bench.upstream.addr.port(), None, LOCALHOST),
        (v4.addr.port(), Some(&v6), v6_loopback),
    ] {
        let target = format!("both.test:{port}");
        let header = Header {
            up: 2000,
            down: 4000,
            seed: 7 + u64::from(port) * 2,
            mode: Mode::Concurrent,
        };
        let tunnel_target = target.clone();
        let client = bench
            .host
            .enter(move || exchange(open_tunnel(proxy, &tunnel_target), header, false));
        assert_eq!(client.received, Ok(header.down));
        let server = reached.unwrap_or(&bench.upstream).result();
        assert_eq!(server.received, Ok(header.up));
        let record = bench.next_record();
        let line = &record.line;
        assert_eq!(record.status, 200, "{line}");
        assert_eq!(record.result, "TCP_TUNNEL", "{line}");
        assert_eq!(record.target, target, "{line}");
        assert_eq!(record.hierarchy, "HIER_DIRECT", "{line}");
        assert_eq!(record.upstream, Some(via), "{line}");
    }
    // The IPv4 listener of port Q, second in order, was never needed.
    assert!(v4.result_within(Duration::from_millis(100)).is_none());
    bench.assert_no_more_records();
}

#[test]
fn clients_that_leave_without_a_request_are_logged_with_status_000() {
    let mut bench = Bench::start(Format::Squid, &[], &[]);
    let proxy = bench.proxy.addr;
    let target = bench.upstream.addr.to_string();
    let leave: [Box<dyn FnOnce(TcpStream) + Send>; 3] = [
        // Connect and close at once.
        Box::new(drop),
        // Half a head, then close.
        Box::new(move |mut stream| {
            stream
                .write_all(format!("CONNECT {target} HTTP/1.1\r\n").as_bytes())
                .unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            assert!(rest.is_empty(), "answer to half a head: {rest:?}");
        }),
        // Reset.
        Box::new(|stream| {
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }),
    ];
    for how in leave {
        bench.as_client(move || {
            let stream = TcpStream::connect(proxy).unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            how(stream);
        });
        bench.assert_logged(&Refusal::unread(0), 0);
        bench.assert_serves();
    }
    bench.assert_no_more_records();
}
