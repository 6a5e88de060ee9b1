//! spliced driven by squid.conf files (`-f FILE`), end to end: the Istio task's
//! file verbatim with the real curl, `http_access` rules and ACLs on real
//! requests (names resolved inside the test's namespace, IPv6, clients in other
//! namespaces, Basic authentication), real-world files, malformed files, reload
//! on SIGHUP, draining on SIGTERM, the file's timeouts and connection limit, and
//! its `logformat`/`access_log` lines. A test aimed at one data plane checks
//! that every tunnel ran on it: from JSON records, or, where it checks Squid
//! lines (which do not name the plane), from `/metrics` (`--admin`).
//!
//! Every proxy runs in a network namespace made for its test (so it can listen on
//! port 3128), whose resolver points at a dead address inside the namespace and
//! whose hosts file maps the names the tests use; no lookup leaves the namespace.

use std::{
    fmt, fs,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use spliced_tests::{
    complete_lines,
    daemon::{check_config, Spliced},
    netns::Netns,
    paused::PausedExchange,
    sockets::{black_hole, connect_from},
    tls::{curl, TlsOrigin},
    upstream::{exchange_with, Header, SPLICE_GRACE},
    wait_until, Mode, Upstream, DATA_PLANES, IO_TIMEOUT,
};

const MIB: u64 = 1 << 20;
/// Length of the proxy's `200 Connection established` answer.
const CONNECT_OK_LEN: u64 = 39;
/// The port the sites' files listen on, Squid's default.
const PROXY_PORT: u16 = 3128;
/// Names every site's hosts file maps (`ip netns exec` bind-mounts it over
/// /etc/hosts): loopback names for `dstdomain`, and one name on a non-loopback
/// address of the site, [`REMOTE_IP`], for `dst` and `to_localhost`.
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n\
    127.0.0.1 example.test www.example.test badexample.test\n\
    10.99.0.1 remote.test\n";
/// An address of the site's own loopback device that is not in 127.0.0.0/8.
const REMOTE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
const LOOPBACK4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LOOPBACK6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// The site's address on the link to its outside namespace.
const OUTSIDE_PROXY_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The outside namespace's address on the link.
const OUTSIDE_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// A second address of the outside namespace (on its loopback device).
const OUTSIDE_OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

// ---------------------------------------------------------------------------
// A site: a namespace with upstreams, configuration files, and clients.
// ---------------------------------------------------------------------------

/// Where a request comes from and which proxy address it goes to.
#[derive(Clone, Copy, Debug)]
struct Client {
    /// The source address, as the proxy logs it.
    source: IpAddr,
    /// The proxy address connected to.
    proxy: SocketAddr,
    /// Whether the client is in the site's outside namespace.
    outside: bool,
}

impl Client {
    /// A client on 127.0.0.1 of the site, to the proxy on 127.0.0.1:`port`.
    const fn local4(port: u16) -> Self {
        Self {
            source: LOOPBACK4,
            proxy: SocketAddr::new(LOOPBACK4, port),
            outside: false,
        }
    }

    /// A client on ::1 of the site, to the proxy on [::1]:`port`.
    const fn local6(port: u16) -> Self {
        Self {
            source: LOOPBACK6,
            proxy: SocketAddr::new(LOOPBACK6, port),
            outside: false,
        }
    }

    /// A client in the outside namespace with address `source`.
    const fn outside(source: Ipv4Addr) -> Self {
        Self {
            source: IpAddr::V4(source),
            proxy: SocketAddr::new(IpAddr::V4(OUTSIDE_PROXY_IP), PROXY_PORT),
            outside: true,
        }
    }
}

const LOCAL4: Client = Client::local4(PROXY_PORT);
const LOCAL6: Client = Client::local6(PROXY_PORT);

/// A namespace with exchange upstreams on fixed ports (dual-stack, so they answer
/// on 127.0.0.1, ::1 and [`REMOTE_IP`]), a directory for configuration files and
/// logs, and optionally an outside namespace linked to it.
struct Site {
    ns: Netns,
    outside: Option<Netns>,
    dir: tempfile::TempDir,
    upstreams: Vec<Upstream>,
    next_seed: AtomicU64,
}

impl Site {
    /// A site with exchange upstreams on `ports`.
    fn new(ports: &[u16]) -> Self {
        let ns = Netns::new();
        fs::write(format!("/etc/netns/{}/hosts", ns.name), HOSTS).expect("write hosts");
        ns.ip(&["addr", "add", &format!("{REMOTE_IP}/32"), "dev", "lo"]);
        let upstreams = ports
            .iter()
            .map(|&port| {
                Upstream::start_in(&ns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            })
            .collect();
        Self {
            ns,
            outside: None,
            dir: tempfile::tempdir().expect("tempdir"),
            upstreams,
            next_seed: AtomicU64::new(1),
        }
    }

    /// Adds an outside namespace linked to the site: the site is
    /// [`OUTSIDE_PROXY_IP`], the outside [`OUTSIDE_CLIENT_IP`] and
    /// [`OUTSIDE_OTHER_IP`].
    fn with_outside(mut self) -> Self {
        let outside = Netns::new();
        self.ns.link(&outside, OUTSIDE_PROXY_IP, OUTSIDE_CLIENT_IP);
        outside.ip(&[
            "addr",
            "add",
            &format!("{OUTSIDE_OTHER_IP}/32"),
            "dev",
            "lo",
        ]);
        self.outside = Some(outside);
        self
    }

    /// A path in the site's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to file `name` of the site's directory; returns its path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, text).expect("write file");
        path
    }

    /// Writes `text` as the site's `squid.conf`; returns its path.
    fn conf(&self, text: &str) -> PathBuf {
        self.write("squid.conf", text)
    }

    /// Starts `spliced -f CONF ARGS` in the site and waits for `listeners`
    /// listening addresses.
    fn start(&self, conf: &Path, args: &[&str], listeners: usize) -> Spliced {
        let mut all = vec!["-f", conf.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        Spliced::start_in(&self.ns, &all, listeners)
    }

    /// The upstream listening on `port`.
    fn upstream(&self, port: u16) -> &Upstream {
        self.upstreams
            .iter()
            .find(|upstream| upstream.addr.port() == port)
            .unwrap_or_else(|| panic!("no upstream on port {port}"))
    }

    /// A seed no other exchange of this site uses.
    fn seed(&self) -> u64 {
        self.next_seed.fetch_add(2, Ordering::Relaxed)
    }

    /// The namespace `client` lives in.
    fn client_ns(&self, client: Client) -> &Netns {
        if client.outside {
            self.outside
                .as_ref()
                .expect("the site has no outside namespace")
        } else {
            &self.ns
        }
    }

    /// Connects as `client` and runs `f` on the connection (inside the client's
    /// namespace).
    fn with_connection<T: Send + 'static>(
        &self,
        client: Client,
        f: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> T {
        self.client_ns(client).enter(move || {
            f(connect_from(client.source, client.proxy).expect("connect to the proxy"))
        })
    }

    /// Sends a CONNECT for `target` as `client`, with `credentials`
    /// (`USER:PASSWORD`) in `Proxy-Authorization` when given, and reads the answer.
    fn connect(&self, client: Client, target: &str, credentials: Option<&str>) -> Reply {
        let request = connect_request(target, credentials);
        self.with_connection(client, move |stream| Reply::read(stream, &request))
    }

    /// Opens a tunnel to `target` as `client` and returns its socket.
    fn tunnel(&self, client: Client, target: &str) -> TcpStream {
        self.connect(client, target, None).into_tunnel()
    }

    /// Whether connecting to `addr` from inside the site is refused.
    fn refuses(&self, addr: SocketAddr) -> bool {
        self.ns.enter(move || {
            matches!(
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
                Err(err) if err.kind() == ErrorKind::ConnectionRefused
            )
        })
    }

    /// Moves a few KiB each way through `tunnel` to the upstream on `port` and
    /// checks both ends; returns the bytes the upstream sent.
    fn check_tunnel(&self, tunnel: TcpStream, port: u16) -> u64 {
        self.check_exchange(tunnel, port, 3000, 5000)
    }

    /// Runs an exchange of `up` and `down` bytes through `tunnel` to the upstream
    /// on `port` and checks both ends; returns `down`. The client's FIN waits
    /// for the sockmap plane to splice the tunnel (a FIN that came first would
    /// send it to splice).
    fn check_exchange(&self, tunnel: TcpStream, port: u16, up: u64, down: u64) -> u64 {
        let header = Header {
            up,
            down,
            seed: self.seed(),
            mode: Mode::Concurrent,
        };
        let client = exchange_with(tunnel, header, false, SPLICE_GRACE);
        assert_eq!(client.received, Ok(down), "client side of {header:?}");
        self.assert_upstream_got(port, header);
        down
    }

    /// Fails the test unless the upstream on `port` finished `header`'s exchange.
    fn assert_upstream_got(&self, port: u16, header: Header) {
        let server = self.upstream(port).result();
        assert_eq!(server.seed, header.seed, "upstream on {port}");
        assert_eq!(
            server.received,
            Ok(header.up),
            "upstream side of {header:?}"
        );
        assert_eq!(server.sent, header.down, "upstream side of {header:?}");
    }

    /// Starts a [`PausedExchange`] of `size` bytes each way through `tunnel`.
    fn paused_exchange(&self, tunnel: TcpStream, size: u64) -> (PausedExchange, Header) {
        let header = Header {
            up: size,
            down: size + 1,
            seed: self.seed(),
            mode: Mode::Concurrent,
        };
        (PausedExchange::start(tunnel, header), header)
    }

    /// Lets a paused exchange finish and checks both ends against `header`.
    fn finish_paused(&self, paused: PausedExchange, header: Header, port: u16) {
        let client = paused.finish();
        assert_eq!(
            client.received,
            Ok(header.down),
            "client side of {header:?}"
        );
        self.assert_upstream_got(port, header);
    }
}

/// A CONNECT request for `target`, with Basic `credentials` when given.
fn connect_request(target: &str, credentials: Option<&str>) -> String {
    let authorization = credentials
        .map(|c| format!("Proxy-Authorization: Basic {}\r\n", STANDARD.encode(c)))
        .unwrap_or_default();
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{authorization}\r\n")
}

/// The port of a `host:port` target.
fn port_of(target: &str) -> u16 {
    target
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {target:?}"))
}

/// The proxy's answer to a request, and for a 200 the tunnel.
struct Reply {
    status: u16,
    head: String,
    body: String,
    stream: Option<TcpStream>,
}

impl Reply {
    /// Sends `request` on `stream` and reads the answer head; for anything but a
    /// 200 it also reads the body until the proxy closes.
    fn read(mut stream: TcpStream, request: &str) -> Self {
        stream.write_all(request.as_bytes()).expect("send request");
        let head = read_head(&mut stream);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        if status == 200 {
            return Self {
                status,
                head,
                body: String::new(),
                stream: Some(stream),
            };
        }
        let mut body = Vec::new();
        let _ = stream.read_to_end(&mut body);
        Self {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
            stream: None,
        }
    }

    /// The value of header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// Bytes the proxy sent (its `%<st`).
    fn len(&self) -> u64 {
        (self.head.len() + self.body.len()) as u64
    }

    /// The tunnel; fails the test unless the answer was the 200.
    fn into_tunnel(self) -> TcpStream {
        assert_eq!(
            self.head.as_bytes(),
            spliced_tests::CONNECT_OK,
            "not a tunnel: {self:?}"
        );
        self.stream.expect("a 200 has a stream")
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", format!("{}{}", self.head, self.body))
    }
}

/// Reads an answer head byte by byte (so no tunnel byte is consumed) up to and
/// including the blank line; what arrived if the proxy closed first.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads from `stream` until the proxy closes it (EOF or reset); returns when,
/// measured from `since`. Fails the test if it stays open for [`IO_TIMEOUT`].
fn wait_closed(stream: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => continue,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the proxy kept the connection open for {IO_TIMEOUT:?}")
            }
            Err(_) => return since.elapsed(),
        }
    }
}

// ---------------------------------------------------------------------------
// Access log lines.
// ---------------------------------------------------------------------------

/// Waits until the file at `path` has at least `count` lines; returns them all.
fn wait_lines(path: &Path, count: usize) -> Vec<String> {
    let read = || complete_lines(path);
    let ok = wait_until(Duration::from_secs(30), || read().len() >= count);
    let lines = read();
    assert!(
        ok,
        "expected {count} lines in {}, have {lines:#?}",
        path.display()
    );
    lines
}

/// Waits for `count` JSON records in the file at `path`.
fn wait_json(path: &Path, count: usize) -> Vec<serde_json::Value> {
    wait_lines(path, count)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line:?}: {err}")))
        .collect()
}

/// What a line of Squid's native format must say, besides the time fields.
#[derive(Debug)]
struct Logged<'a> {
    /// `%>a`.
    client: IpAddr,
    /// `%Ss/%03>Hs`.
    result: &'a str,
    /// `%<st` lies in this range.
    bytes: (u64, u64),
    /// `%rm`.
    method: &'a str,
    /// `%ru`.
    url: &'a str,
    /// `%[un`.
    user: &'a str,
    /// `%Sh/%<a`.
    hierarchy: String,
    /// `%mt`.
    mime: &'a str,
}

impl<'a> Logged<'a> {
    /// A tunnel of `client` to `url`, connected to `upstream`, that moved
    /// `bytes` from the upstream (the 200 not included).
    fn tunnel(client: IpAddr, url: &'a str, upstream: IpAddr, bytes: (u64, u64)) -> Self {
        Self {
            client,
            result: "TCP_TUNNEL/200",
            bytes: (bytes.0 + CONNECT_OK_LEN, bytes.1 + CONNECT_OK_LEN),
            method: "CONNECT",
            url,
            user: "-",
            hierarchy: format!("HIER_DIRECT/{upstream}"),
            mime: "-",
        }
    }

    /// An error answer `result` (`TCP_DENIED/403`) to a CONNECT for `url`.
    fn refusal(client: IpAddr, result: &'a str, url: &'a str, reply: &Reply) -> Self {
        Self {
            client,
            result,
            bytes: (reply.len(), reply.len()),
            method: "CONNECT",
            url,
            user: "-",
            hierarchy: "HIER_NONE/-".into(),
            mime: "text/plain",
        }
    }

    /// The same, with `%[un` `user`.
    fn by(self, user: &'a str) -> Self {
        Self { user, ..self }
    }
}

/// Checks one line of Squid's native format field by field:
/// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
fn assert_squid_line(line: &str, expected: &Logged) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 10, "field count of {line:?}");
    let (secs, millis) = fields[0]
        .split_once('.')
        .unwrap_or_else(|| panic!("%ts.%03tu of {line:?}"));
    assert!(
        millis.len() == 3 && millis.bytes().all(|b| b.is_ascii_digit()),
        "milliseconds of {line:?}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let logged: u64 = secs.parse().expect("seconds");
    assert!(
        logged <= now + 1 && logged + 120 > now,
        "timestamp of {line:?} is not recent"
    );
    let duration: u64 = fields[1].parse().expect("%tr");
    assert!(duration < 120_000, "duration of {line:?}");
    assert!(
        line[fields[0].len()..].starts_with(&format!(" {duration:>6} ")),
        "%6tr not right-aligned in 6 columns: {line:?}"
    );
    assert_eq!(fields[2], expected.client.to_string(), "%>a of {line:?}");
    assert_eq!(fields[3], expected.result, "%Ss/%03>Hs of {line:?}");
    let bytes: u64 = fields[4].parse().expect("%<st");
    assert!(
        (expected.bytes.0..=expected.bytes.1).contains(&bytes),
        "%<st {bytes} not in {:?}: {line:?}",
        expected.bytes
    );
    assert_eq!(fields[5], expected.method, "%rm of {line:?}");
    assert_eq!(fields[6], expected.url, "%ru of {line:?}");
    assert_eq!(fields[7], expected.user, "%[un of {line:?}");
    assert_eq!(fields[8], expected.hierarchy, "%Sh/%<a of {line:?}");
    assert_eq!(fields[9], expected.mime, "%mt of {line:?}");
}

/// Checks the lines of the access log at `path` against `expected`, in order,
/// and that there are no others.
fn assert_log(path: &Path, expected: &[Logged]) {
    let lines = wait_lines(path, expected.len());
    assert_eq!(lines.len(), expected.len(), "unexpected lines: {lines:#?}");
    for (line, expected) in lines.iter().zip(expected) {
        assert_squid_line(line, expected);
    }
}

// ---------------------------------------------------------------------------
// The data plane of every tunnel.
// ---------------------------------------------------------------------------

/// Waits for at least `at_least` tunnel records in the JSON access log at
/// `path` and fails the test unless every one says it ran on `plane`.
fn assert_tunnels_ran_on(proxy: &Spliced, path: &Path, plane: &str, at_least: usize) {
    spliced_tests::planes::assert_records(path, plane, at_least, || proxy.stderr());
}

/// The address of the admin listener `proxy` logged (it runs with `--admin`).
fn admin_of(proxy: &Spliced) -> SocketAddr {
    proxy
        .stderr_lines()
        .iter()
        .find_map(|line| {
            line.split("admin endpoint on http://")
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no admin listener logged:\n{}", proxy.stderr()))
}

fn assert_tunnels_ran_on_by_metrics(site: &Site, proxy: &Spliced, plane: &str, tunnels: u64) {
    spliced_tests::planes::assert_closed_on(
        admin_of(proxy),
        Some(&site.ns.name),
        plane,
        tunnels,
        || proxy.stderr(),
    );
}

// ---------------------------------------------------------------------------
// Policy tables.
// ---------------------------------------------------------------------------

/// What one request must get.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// A tunnel, connected to this upstream address.
    Tunnel(IpAddr),
    /// 403 from this `http_access` line of the file, as the proxy prints it
    /// (normalized); "" for the implicit rule.
    Denied(&'static str),
    /// 407 asking for credentials of this realm.
    AuthRequired(&'static str),
}

/// One request of a policy table.
#[derive(Debug)]
struct Case {
    client: Client,
    target: String,
    /// `%ru`: the target with its host lower-cased, as Squid logs it.
    url: String,
    /// `USER:PASSWORD` to send.
    credentials: Option<&'static str>,
    /// The `%[un` to log.
    user: &'static str,
    outcome: Outcome,
}

/// A request of `client` for `target` without credentials.
fn case(client: Client, target: impl Into<String>, outcome: Outcome) -> Case {
    let target = target.into();
    Case {
        client,
        url: target.to_ascii_lowercase(),
        target,
        credentials: None,
        user: "-",
        outcome,
    }
}

impl Case {
    /// Sends `credentials`, after which the log names `user`.
    fn with_credentials(self, credentials: &'static str, user: &'static str) -> Self {
        Self {
            credentials: Some(credentials),
            user,
            ..self
        }
    }
}

/// The 1-based number of the line of `conf` that reads `text`.
fn line_of(conf: &Path, text: &str) -> usize {
    let content = fs::read_to_string(conf).expect("read configuration");
    let mut numbers = content
        .lines()
        .enumerate()
        .filter(|(_, line)| line.trim() == text)
        .map(|(index, _)| index + 1);
    let number = numbers
        .next()
        .unwrap_or_else(|| panic!("no line {text:?} in {}", conf.display()));
    assert!(
        numbers.next().is_none(),
        "{text:?} is in {} twice",
        conf.display()
    );
    number
}

/// What the access log's `end` says about a 403 from `rule` of `conf` ("" for
/// the implicit rule). Error answers do not name the rule; only the log does.
fn denial_reason(conf: &Path, rule: &str) -> String {
    if rule.is_empty() {
        "denied by implicit rule".to_owned()
    } else {
        format!(
            "denied by {}:{}: {rule}",
            conf.display(),
            line_of(conf, rule)
        )
    }
}

/// Access log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Squid's native line.
    Squid,
    /// spliced's JSON record, which also says why a request was refused.
    Json,
}

/// Starts a proxy with `conf` in `site` (waiting for `listeners` addresses)
/// logging in `format`, sends every case, and checks each answer, tunnel and
/// access log record (with JSON, also the rule that decided).
fn check_policy(site: &Site, conf: &Path, listeners: usize, format: Format, cases: &[Case]) {
    let log = site.path("access.log");
    let _ = fs::remove_file(&log);
    let format_name = match format {
        Format::Squid => "squid",
        Format::Json => "json",
    };
    let args = [
        "--access-log",
        log.to_str().unwrap(),
        "--log-format",
        format_name,
    ];
    let proxy = site.start(conf, &args, listeners);
    let mut expected = Vec::new();
    for case in cases {
        let reply = site.connect(case.client, &case.target, case.credentials);
        let context = format!("{case:?} under {}", conf.display());
        let (logged, end) = match case.outcome {
            Outcome::Tunnel(upstream) => {
                assert_eq!(
                    reply.status,
                    200,
                    "{context}: {reply:?}\n{}",
                    proxy.stderr()
                );
                let down = site.check_tunnel(reply.into_tunnel(), port_of(&case.target));
                let logged = Logged::tunnel(case.client.source, &case.url, upstream, (down, down));
                (logged, "closed".to_owned())
            }
            Outcome::Denied(rule) => {
                assert_eq!(reply.status, 403, "{context}: {reply:?}");
                let logged =
                    Logged::refusal(case.client.source, "TCP_DENIED/403", &case.url, &reply);
                (logged, denial_reason(conf, rule))
            }
            Outcome::AuthRequired(realm) => {
                assert_eq!(reply.status, 407, "{context}: {reply:?}");
                assert_eq!(
                    reply.header("Proxy-Authenticate"),
                    Some(format!("Basic realm=\"{realm}\"").as_str()),
                    "{context}: {reply:?}"
                );
                let logged =
                    Logged::refusal(case.client.source, "TCP_DENIED/407", &case.url, &reply);
                (logged, "proxy authentication required".to_owned())
            }
        };
        expected.push((logged.by(case.user), end));
        // Keep the order of the log the order of the cases.
        wait_lines(&log, expected.len());
    }
    match format {
        Format::Squid => {
            let logged: Vec<Logged> = expected.into_iter().map(|(logged, _)| logged).collect();
            assert_log(&log, &logged);
        }
        Format::Json => {
            let records = wait_json(&log, expected.len());
            assert_eq!(
                records.len(),
                expected.len(),
                "unexpected records: {records:#?}"
            );
            for (record, (logged, end)) in records.iter().zip(&expected) {
                assert_json_record(record, logged, end);
            }
        }
    }
}

/// Checks a JSON record against what its Squid line would say, and that its
/// `end` contains `end`.
fn assert_json_record(record: &serde_json::Value, expected: &Logged, end: &str) {
    let text = |key: &str| {
        record[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} of {record}"))
    };
    let client: SocketAddr = text("client").parse().expect("client address");
    assert_eq!(client.ip(), expected.client, "client of {record}");
    let (result, status) = expected.result.split_once('/').unwrap();
    assert_eq!(text("result"), result, "result of {record}");
    assert_eq!(record["status"].to_string(), status, "status of {record}");
    let bytes = record["bytes_to_client"].as_u64().expect("bytes_to_client");
    assert!(
        (expected.bytes.0..=expected.bytes.1).contains(&bytes),
        "bytes_to_client of {record} not in {:?}",
        expected.bytes
    );
    assert_eq!(text("method"), expected.method, "method of {record}");
    assert_eq!(text("target"), expected.url, "target of {record}");
    let user = record["user"].as_str().unwrap_or("-");
    assert_eq!(user, expected.user, "user of {record}");
    let (hierarchy, upstream) = expected.hierarchy.split_once('/').unwrap();
    assert_eq!(text("hierarchy"), hierarchy, "hierarchy of {record}");
    let logged_upstream = record["upstream"].as_str().map(|addr| {
        addr.parse::<SocketAddr>()
            .expect("upstream address")
            .ip()
            .to_string()
    });
    assert_eq!(
        logged_upstream.as_deref().unwrap_or("-"),
        upstream,
        "upstream of {record}"
    );
    assert!(text("end").contains(end), "end of {record} lacks {end:?}");
}

// ---------------------------------------------------------------------------
// 1. The Istio task's file, verbatim.
// ---------------------------------------------------------------------------

/// The squid.conf of Istio's "Egress Gateways with TLS origination" task.
const ISTIO_CONF: &str = "http_port 3128

acl SSL_ports port 443
acl CONNECT method CONNECT

http_access deny CONNECT !SSL_ports
http_access allow localhost manager
http_access deny manager
http_access allow all

coredump_dir /var/spool/squid
";

#[test]
fn istio_task_config_verbatim() {
    const BODY_LEN: u64 = 2 * MIB;
    /// Room for the TLS handshake, record overhead and the origin's response head.
    const TLS_OVERHEAD: u64 = 100 * 1024;
    let site = Site::new(&[]);
    let conf = site.write("istio.conf", ISTIO_CONF);
    let origin = TlsOrigin::start_in(&site.ns, "127.0.0.1:443".parse().unwrap(), "IP:127.0.0.1");
    let body = origin.serve_random_file("body.bin", BODY_LEN as usize);
    let all_v4: SocketAddr = "0.0.0.0:3128".parse().unwrap();
    let all_v6: SocketAddr = "[::]:3128".parse().unwrap();
    for plane in DATA_PLANES {
        let log = site.path(&format!("access-{plane}.log"));
        let log_arg = log.to_str().unwrap();
        // Squid lines do not name the data plane: /metrics counts by it.
        let args = [
            "--access-log",
            log_arg,
            "--dataplane",
            plane,
            "--admin",
            "127.0.0.1:0",
        ];
        let proxy = site.start(&conf, &args, 2);
        let mut listening = proxy.listening();
        listening.sort();
        assert_eq!(listening, [all_v4, all_v6], "{}", proxy.stderr());

        // One warning, naming the file and line of coredump_dir.
        let warnings: Vec<String> = proxy
            .stderr_lines()
            .into_iter()
            .filter(|line| line.contains(" WARN "))
            .collect();
        assert_eq!(warnings.len(), 1, "warnings: {warnings:#?}");
        let place = format!("{}:11:", conf.display());
        assert!(
            warnings[0].contains(&place) && warnings[0].contains("coredump_dir /var/spool/squid"),
            "{warnings:?} does not name {place} and coredump_dir"
        );

        // The real curl through both listeners fetches the file intact.
        let mut expected = Vec::new();
        for (https_proxy, client) in [
            ("http://127.0.0.1:3128", LOOPBACK4),
            ("http://[::1]:3128", LOOPBACK6),
        ] {
            let out = site.path("fetched.bin");
            let _ = fs::remove_file(&out);
            let output = curl(
                site.ns.command("curl"),
                https_proxy,
                &origin.certificate(),
                "https://127.0.0.1/body.bin",
                &out,
            );
            assert!(
                output.status.success(),
                "curl via {https_proxy} on {plane}: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                proxy.stderr()
            );
            assert!(
                fs::read(&out).expect("fetched file") == body,
                "fetched file differs"
            );
            expected.push(Logged::tunnel(
                client,
                "127.0.0.1:443",
                LOOPBACK4,
                (BODY_LEN, BODY_LEN + TLS_OVERHEAD),
            ));
        }

        // CONNECT to any other port: 403 from `deny CONNECT !SSL_ports`.
        let targets = ["127.0.0.1:80", "127.0.0.1:8443", "localhost:22"];
        for (target, client) in targets.iter().zip([LOCAL4, LOCAL6, LOCAL4]) {
            let reply = site.connect(client, target, None);
            assert_eq!(reply.status, 403, "{reply:?}");
            assert_eq!(reply.header("Connection"), Some("close"));
            expected.push(Logged::refusal(
                client.source,
                "TCP_DENIED/403",
                target,
                &reply,
            ));
        }
        assert_log(&log, &expected);
        // The two curl tunnels.
        assert_tunnels_ran_on_by_metrics(&site, &proxy, plane, 2);
    }
    // The JSON record names the rule that refused: line 6.
    let deny = Outcome::Denied("http_access deny CONNECT !SSL_ports");
    check_policy(
        &site,
        &conf,
        2,
        Format::Json,
        &[
            case(LOCAL4, "127.0.0.1:8443", deny),
            case(LOCAL6, "localhost:80", deny),
        ],
    );
}

// ---------------------------------------------------------------------------
// 2. ACLs on real requests.
// ---------------------------------------------------------------------------

#[test]
fn dstdomain_matches_a_domain_and_its_subdomains_or_exactly() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]);
    let wide = site.write(
        "wide.conf",
        "http_port 3128\nacl sites dstdomain .example.test\n\
         http_access allow sites\nhttp_access deny all\n",
    );
    check_policy(
        &site,
        &wide,
        2,
        Format::Json,
        &[
            case(LOCAL4, "example.test:443", Tunnel(LOOPBACK4)),
            case(LOCAL4, "www.example.test:443", Tunnel(LOOPBACK4)),
            case(LOCAL6, "WWW.Example.TEST:443", Tunnel(LOOPBACK4)),
            case(
                LOCAL4,
                "badexample.test:443",
                Denied("http_access deny all"),
            ),
            // dstdomain never matches an IP literal (no reverse lookup).
            case(LOCAL4, "127.0.0.1:443", Denied("http_access deny all")),
        ],
    );
    let exact = site.write(
        "exact.conf",
        "http_port 3128\nacl sites dstdomain example.test\n\
         http_access allow sites\nhttp_access deny all\n",
    );
    check_policy(
        &site,
        &exact,
        2,
        Format::Json,
        &[
            case(LOCAL4, "example.test:443", Tunnel(LOOPBACK4)),
            case(
                LOCAL4,
                "www.example.test:443",
                Denied("http_access deny all"),
            ),
            case(
                LOCAL4,
                "badexample.test:443",
                Denied("http_access deny all"),
            ),
        ],
    );
    let regex = site.write(
        "regex.conf",
        "http_port 3128\nacl www dstdom_regex -i ^www\\.\n\
         http_access deny !www\nhttp_access allow all\n",
    );
    check_policy(
        &site,
        &regex,
        2,
        Format::Json,
        &[
            case(LOCAL4, "WWW.example.test:443", Tunnel(LOOPBACK4)),
            case(LOCAL4, "example.test:443", Denied("http_access deny !www")),
        ],
    );
}

#[test]
fn dst_and_to_localhost_judge_the_resolved_address() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]);
    let to_localhost = site.write(
        "to_localhost.conf",
        "http_port 3128\nhttp_access deny to_localhost\nhttp_access allow all\n",
    );
    let deny = Denied("http_access deny to_localhost");
    check_policy(
        &site,
        &to_localhost,
        2,
        Format::Json,
        &[
            // Names that resolve to loopback are blocked like the addresses.
            case(LOCAL4, "example.test:443", deny),
            case(LOCAL4, "localhost:443", deny),
            case(LOCAL4, "127.0.0.1:443", deny),
            case(LOCAL4, "[::1]:443", deny),
            // Other spellings of this host: all of 127.0.0.0/8, the unspecified
            // addresses and IPv4-mapped loopback.
            case(LOCAL4, "127.0.0.2:443", deny),
            case(LOCAL4, "0.0.0.0:443", deny),
            case(LOCAL4, "[::]:443", deny),
            case(LOCAL4, "[::ffff:127.0.0.1]:443", deny),
            case(LOCAL4, "remote.test:443", Tunnel(REMOTE_IP)),
            case(LOCAL4, "10.99.0.1:443", Tunnel(REMOTE_IP)),
        ],
    );
    let cidr = site.write(
        "dst.conf",
        "http_port 3128\nacl inside dst 10.99.0.0/24\n\
         http_access allow inside\nhttp_access deny all\n",
    );
    check_policy(
        &site,
        &cidr,
        2,
        Format::Json,
        &[
            case(LOCAL4, "remote.test:443", Tunnel(REMOTE_IP)),
            case(LOCAL4, "10.99.0.1:443", Tunnel(REMOTE_IP)),
            case(LOCAL4, "example.test:443", Denied("http_access deny all")),
            case(LOCAL4, "127.0.0.1:443", Denied("http_access deny all")),
        ],
    );
}

#[test]
fn ipv6_clients_and_targets() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]);
    let conf = site.conf(
        "http_port 3128\nacl v6client src ::1\nacl v6target dst ::1/128\n\
         http_access allow v6client v6target\nhttp_access deny all\n",
    );
    let deny = Denied("http_access deny all");
    check_policy(
        &site,
        &conf,
        2,
        Format::Json,
        &[
            case(LOCAL6, "[::1]:443", Tunnel(LOOPBACK6)),
            // localhost has both addresses; only ::1 is allowed, so it is used.
            case(LOCAL6, "localhost:443", Tunnel(LOOPBACK6)),
            case(LOCAL6, "127.0.0.1:443", deny),
            case(LOCAL4, "[::1]:443", deny),
            case(LOCAL4, "localhost:443", deny),
        ],
    );
}

#[test]
fn port_ranges_first_match_implicit_rule_and_negation() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[8000, 8050, 8099, 8100, 9000, 9500]);
    let target = |port: u16| format!("127.0.0.1:{port}");
    let tunnel = Tunnel(LOOPBACK4);
    // The last line denies, so requests no line matches are allowed.
    let first_match = site.write(
        "first_match.conf",
        "http_port 3128\nacl low port 8000-8099\nacl mid port 8050\nacl blocked port 9000\n\
         http_access deny mid\nhttp_access allow low\nhttp_access deny blocked\n",
    );
    check_policy(
        &site,
        &first_match,
        2,
        Format::Json,
        &[
            case(LOCAL4, target(8000), tunnel),
            case(LOCAL4, target(8099), tunnel),
            case(LOCAL4, target(8050), Denied("http_access deny mid")),
            case(LOCAL4, target(9000), Denied("http_access deny blocked")),
            case(LOCAL4, target(8100), tunnel),
            case(LOCAL4, target(9500), tunnel),
        ],
    );
    // The last line allows, so requests no line matches are denied.
    let last_allows = site.write(
        "last_allows.conf",
        "http_port 3128\nacl low port 8000-8099\nhttp_access allow low\n",
    );
    check_policy(
        &site,
        &last_allows,
        2,
        Format::Json,
        &[
            case(LOCAL4, target(8050), tunnel),
            case(LOCAL4, target(8100), Denied("")),
            case(LOCAL4, target(9500), Denied("")),
        ],
    );
    let negation = site.write(
        "negation.conf",
        "http_port 3128\nacl low port 8000-8099\nacl mid port 8050\n\
         http_access deny !low\nhttp_access allow !mid\nhttp_access deny all\n",
    );
    check_policy(
        &site,
        &negation,
        2,
        Format::Json,
        &[
            case(LOCAL4, target(9000), Denied("http_access deny !low")),
            case(LOCAL4, target(8050), Denied("http_access deny all")),
            case(LOCAL4, target(8000), tunnel),
        ],
    );
    // No http_access line at all: everything is denied.
    let empty = site.write("empty.conf", "http_port 3128\nacl low port 8000-8099\n");
    check_policy(
        &site,
        &empty,
        2,
        Format::Json,
        &[case(LOCAL4, target(8000), Denied(""))],
    );
    // localport: the proxy port the client connected to.
    let two_ports = site.write(
        "localport.conf",
        "http_port 3128\nhttp_port 127.0.0.1:3129\nacl second localport 3129\n\
         http_access deny second\nhttp_access allow all\n",
    );
    check_policy(
        &site,
        &two_ports,
        3,
        Format::Json,
        &[
            case(LOCAL4, target(8000), tunnel),
            case(
                Client::local4(3129),
                target(8000),
                Denied("http_access deny second"),
            ),
        ],
    );
}

#[test]
fn src_denies_one_client_address() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]).with_outside();
    let conf = site.conf(
        "http_port 3128\nacl outsider src 198.51.100.2\nacl lab src 198.51.100.0/24\n\
         http_access deny outsider\nhttp_access allow lab\nhttp_access allow localhost\n\
         http_access deny all\n",
    );
    check_policy(
        &site,
        &conf,
        2,
        Format::Json,
        &[
            case(
                Client::outside(OUTSIDE_CLIENT_IP),
                "10.99.0.1:443",
                Denied("http_access deny outsider"),
            ),
            case(
                Client::outside(OUTSIDE_OTHER_IP),
                "10.99.0.1:443",
                Tunnel(REMOTE_IP),
            ),
            case(LOCAL4, "127.0.0.1:443", Tunnel(LOOPBACK4)),
            case(LOCAL6, "127.0.0.1:443", Tunnel(LOOPBACK4)),
            case(
                Client::outside(OUTSIDE_CLIENT_IP),
                "127.0.0.1:443",
                Denied("http_access deny outsider"),
            ),
        ],
    );
}

/// An htpasswd line for `user` with an Apache MD5 hash of `password` made by
/// `openssl passwd -apr1`.
fn apr1_entry(user: &str, password: &str) -> String {
    let output = Command::new("openssl")
        .args(["passwd", "-apr1", password])
        .output()
        .expect("run openssl passwd");
    assert!(output.status.success(), "openssl passwd -apr1 failed");
    let hash = String::from_utf8(output.stdout).expect("utf-8 hash");
    assert!(hash.starts_with("$apr1$"), "not an apr1 hash: {hash}");
    format!("{user}:{}", hash.trim())
}

#[test]
fn proxy_auth_with_apr1_and_bcrypt_passwords() {
    use Outcome::{AuthRequired, Denied, Tunnel};
    const REALM: &str = "Egress proxy";
    let site = Site::new(&[443]);
    let bcrypt_hash = bcrypt::hash("hunter2", 4).expect("bcrypt");
    let passwd = site.write(
        "passwd",
        // htpasswd -B writes bcrypt as $2y$, the crate as $2b$: the same hash.
        &format!(
            "{}\nbob:{bcrypt_hash}\ncarol:{}\n",
            apr1_entry("alice", "secret"),
            bcrypt_hash.replacen("$2b$", "$2y$", 1)
        ),
    );
    let conf = site.conf(&format!(
        "http_port 3128\n\
         auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
         auth_param basic realm {REALM}\n\
         acl SSL_ports port 443\nacl users proxy_auth REQUIRED\n\
         http_access deny !SSL_ports\nhttp_access allow users\nhttp_access deny all\n",
        passwd.display()
    ));
    let ask = AuthRequired(REALM);
    let to = |target: &str, outcome| case(LOCAL4, target, outcome);
    let cases = [
        to("127.0.0.1:443", ask),
        to("127.0.0.1:443", ask).with_credentials("alice:wrong", "-"),
        to("127.0.0.1:443", ask).with_credentials("bob:secret", "-"),
        to("127.0.0.1:443", ask).with_credentials("mallory:secret", "-"),
        to("127.0.0.1:443", Tunnel(LOOPBACK4)).with_credentials("alice:secret", "alice"),
        to("127.0.0.1:443", Tunnel(LOOPBACK4)).with_credentials("bob:hunter2", "bob"),
        to("127.0.0.1:443", Tunnel(LOOPBACK4)).with_credentials("carol:hunter2", "carol"),
        // casesensitive is off: the name is looked up (and logged) lower-cased.
        to("127.0.0.1:443", Tunnel(LOOPBACK4)).with_credentials("ALICE:secret", "alice"),
        // Denied before a proxy_auth ACL is reached: as in Squid, the
        // credentials are not checked (no hashing), so no user is logged.
        to("127.0.0.1:8443", Denied("http_access deny !SSL_ports"))
            .with_credentials("alice:secret", "-"),
    ];
    // Squid's line shows the user in %[un; JSON also says which rule decided.
    check_policy(&site, &conf, 2, Format::Squid, &cases);
    check_policy(&site, &conf, 2, Format::Json, &cases);
}

// ---------------------------------------------------------------------------
// 3. Real-world files.
// ---------------------------------------------------------------------------

/// A file of tests/data.
fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

#[test]
fn real_world_configs_check_cleanly() {
    // (file, lines the effective rules must include)
    let files: [(&str, &[&str]); 3] = [
        (
            "debian/squid.conf",
            &[
                "http_port 3128",
                "http_access deny !Safe_ports",
                "http_access deny to_linklocal",
                "http_access deny all",
            ],
        ),
        (
            "squid31.conf",
            &[
                "http_port 3128",
                "http_access deny social !lunch",
                "http_access deny all",
            ],
        ),
        (
            "wiki_auth.conf",
            &[
                "http_port [::1]:3129 name=loopback6",
                "acl blocked dstdomain .facebook.com .tiktok.com ads.example.net",
                "http_access allow localnet authenticated work_hours",
                "shutdown_lifetime 3 seconds",
            ],
        ),
    ];
    for (name, rules) in files {
        let path = data(name);
        let output = check_config(&path);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "check {name}: {stderr}");
        for line in stderr.lines() {
            assert!(
                line.starts_with("WARNING: "),
                "not a warning in {name}: {line:?}"
            );
        }
        assert!(
            !stderr.is_empty(),
            "{name} has ignored directives to warn about"
        );
        for rule in rules {
            assert!(
                stdout.lines().any(|line| line == *rule),
                "effective rules of {name} lack {rule:?}:\n{stdout}"
            );
        }
        // The effective rules are a configuration that checks the same way.
        let rendered = tempfile::NamedTempFile::new().expect("tempfile");
        fs::write(rendered.path(), stdout.as_bytes()).expect("write rendered");
        let again = check_config(rendered.path());
        assert!(again.status.success(), "rendered {name} does not check");
        assert_eq!(
            String::from_utf8_lossy(&again.stdout),
            stdout,
            "rendered {name}"
        );
    }
}

#[test]
fn debian_default_config_serves_localhost_only() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]).with_outside();
    let conf = data("debian/squid.conf");
    check_policy(
        &site,
        &conf,
        2,
        Format::Json,
        &[
            case(LOCAL4, "127.0.0.1:443", Tunnel(LOOPBACK4)),
            case(LOCAL6, "remote.test:443", Tunnel(REMOTE_IP)),
            case(
                LOCAL4,
                "127.0.0.1:8443",
                Denied("http_access deny CONNECT !SSL_ports"),
            ),
            case(
                LOCAL4,
                "127.0.0.1:25",
                Denied("http_access deny !Safe_ports"),
            ),
            case(
                Client::outside(OUTSIDE_CLIENT_IP),
                "10.99.0.1:443",
                Denied("http_access deny all"),
            ),
        ],
    );
}

#[test]
fn squid31_config_blocks_loopback_targets() {
    use Outcome::{Denied, Tunnel};
    let site = Site::new(&[443]);
    let conf = data("squid31.conf");
    check_policy(
        &site,
        &conf,
        2,
        Format::Json,
        &[
            case(
                LOCAL4,
                "127.0.0.1:443",
                Denied("http_access deny to_localhost"),
            ),
            case(
                LOCAL4,
                "localhost:443",
                Denied("http_access deny to_localhost"),
            ),
            case(LOCAL4, "remote.test:443", Tunnel(REMOTE_IP)),
        ],
    );
}

#[test]
fn wiki_auth_config_asks_for_credentials() {
    use Outcome::{AuthRequired, Denied, Tunnel};
    let site = Site::new(&[443]);
    let conf = data("wiki_auth.conf");
    let ask = AuthRequired("Squid proxy-caching web server");
    let as_alice = |target: &str, outcome| {
        case(LOCAL4, target, outcome).with_credentials("alice:wonderland", "alice")
    };
    check_policy(
        &site,
        &conf,
        3,
        Format::Json,
        &[
            case(LOCAL4, "127.0.0.1:443", ask),
            as_alice("127.0.0.1:443", Tunnel(LOOPBACK4)),
            case(Client::local6(3129), "127.0.0.1:443", ask),
            // Denied before any proxy_auth ACL: not authenticated, as in Squid.
            case(
                LOCAL4,
                "www.facebook.com:443",
                Denied("http_access deny blocked"),
            )
            .with_credentials("alice:wonderland", "-"),
            // carol is no admin, and 127.0.0.1 is not in localnet.
            case(LOCAL4, "127.0.0.1:443", Denied("http_access deny all"))
                .with_credentials("carol:test", "carol"),
        ],
    );
}

// ---------------------------------------------------------------------------
// 4. Malformed files.
// ---------------------------------------------------------------------------

/// A configuration that must be refused.
struct Malformed {
    what: &'static str,
    /// Files to write, the first being the one named with `-f`.
    files: &'static [(&'static str, &'static str)],
    /// The file and line the error names.
    file: &'static str,
    line: usize,
    /// Part of the offending text the error quotes.
    text: &'static str,
}

const MALFORMED: &[Malformed] = &[
    Malformed {
        what: "unknown directive",
        files: &[("squid.conf", "http_port 3128\nfrobnicate on\n")],
        file: "squid.conf",
        line: 2,
        text: "frobnicate on",
    },
    Malformed {
        what: "bad port",
        files: &[("squid.conf", "http_port 3128\nhttp_port 70000\n")],
        file: "squid.conf",
        line: 2,
        text: "70000",
    },
    Malformed {
        what: "http_access with an undefined ACL",
        files: &[(
            "squid.conf",
            "http_port 3128\nacl SSL_ports port 443\nhttp_access deny !SSL_port\n",
        )],
        file: "squid.conf",
        line: 3,
        text: "SSL_port",
    },
    Malformed {
        what: "bad CIDR",
        files: &[("squid.conf", "http_port 3128\nacl net src 10.0.0.0/33\n")],
        file: "squid.conf",
        line: 2,
        text: "10.0.0.0/33",
    },
    Malformed {
        what: "bad time value",
        files: &[("squid.conf", "http_port 3128\nread_timeout 5 fortnights\n")],
        file: "squid.conf",
        line: 2,
        text: "read_timeout 5 fortnights",
    },
    Malformed {
        what: "include of a missing file",
        files: &[("squid.conf", "http_port 3128\n\ninclude missing.conf\n")],
        file: "squid.conf",
        line: 3,
        text: "missing.conf",
    },
    Malformed {
        what: "include loop",
        files: &[
            ("squid.conf", "http_port 3128\ninclude a.conf\n"),
            ("a.conf", "acl a port 1\ninclude b.conf\n"),
            ("b.conf", "acl b port 2\n\ninclude a.conf\n"),
        ],
        file: "b.conf",
        line: 3,
        text: "a.conf",
    },
    Malformed {
        what: "unknown ACL type",
        files: &[("squid.conf", "http_port 3128\nacl x colour blue\n")],
        file: "squid.conf",
        line: 2,
        text: "colour",
    },
    Malformed {
        what: "ACL redefined with another type",
        files: &[(
            "squid.conf",
            "http_port 3128\nacl office port 443\nacl office src 10.0.0.1\n",
        )],
        file: "squid.conf",
        line: 3,
        text: "src",
    },
    Malformed {
        what: "bad regex",
        files: &[(
            "squid.conf",
            "http_port 3128\nacl re dstdom_regex -i ^(unclosed\n",
        )],
        file: "squid.conf",
        line: 2,
        text: "^(unclosed",
    },
    Malformed {
        what: "missing htpasswd file",
        files: &[(
            "squid.conf",
            "http_port 3128\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth /nonexistent/passwd\n",
        )],
        file: "squid.conf",
        line: 2,
        text: "/nonexistent/passwd",
    },
    Malformed {
        what: "directive spliced refuses",
        files: &[(
            "squid.conf",
            "http_port 3128\ntcp_outgoing_address 10.0.0.1\n",
        )],
        file: "squid.conf",
        line: 2,
        text: "tcp_outgoing_address 10.0.0.1",
    },
    Malformed {
        what: "access_log with an undefined logformat",
        files: &[(
            "squid.conf",
            "http_port 3128\naccess_log /tmp/never.log nosuch\n",
        )],
        file: "squid.conf",
        line: 2,
        text: "nosuch",
    },
    Malformed {
        what: "http_port interception mode",
        files: &[("squid.conf", "http_port 3128 intercept\n")],
        file: "squid.conf",
        line: 1,
        text: "intercept",
    },
    Malformed {
        what: "proxy_auth without auth_param",
        files: &[(
            "squid.conf",
            "http_port 3128\nacl users proxy_auth REQUIRED\n",
        )],
        file: "squid.conf",
        line: 2,
        text: "users",
    },
];

/// Fails the test unless `output` (of spliced) names `bad`'s place and text.
fn assert_names_the_error(output: &str, bad: &Malformed, dir: &Path) {
    let place = format!("{}:{}: ", dir.join(bad.file).display(), bad.line);
    let line = output
        .lines()
        .find(|line| line.contains(&place))
        .unwrap_or_else(|| panic!("{}: no {place:?} in {output:?}", bad.what));
    let quoted = line
        .rsplit_once(": '")
        .and_then(|(_, rest)| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{}: no quoted text in {line:?}", bad.what));
    assert!(
        quoted.contains(bad.text),
        "{}: {quoted:?} does not quote {:?}",
        bad.what,
        bad.text
    );
}

#[test]
fn malformed_configs_are_refused_naming_file_and_line() {
    let ns = Netns::new();
    let proxy_addr: SocketAddr = "127.0.0.1:3128".parse().unwrap();
    for bad in MALFORMED {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in bad.files {
            fs::write(dir.path().join(name), text).expect("write file");
        }
        let conf = dir.path().join(bad.files[0].0);

        let output = check_config(&conf);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{}: check passed: {stderr}",
            bad.what
        );
        assert!(output.stdout.is_empty(), "{}: rules printed", bad.what);
        assert!(stderr.starts_with("ERROR: "), "{}: {stderr:?}", bad.what);
        assert_names_the_error(&stderr, bad, dir.path());

        let mut proxy = Spliced::spawn_in(&ns, &["-f", conf.to_str().unwrap()]);
        let (status, _) = proxy
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{}: spliced kept running:\n{}", bad.what, proxy.stderr()));
        assert!(!status.success(), "{}: exit status {status}", bad.what);
        let log = proxy.stderr();
        assert!(
            !log.contains("listening on"),
            "{}: listened:\n{log}",
            bad.what
        );
        assert_names_the_error(&log, bad, dir.path());
        let refused = ns.enter(move || TcpStream::connect(proxy_addr).is_err());
        assert!(refused, "{}: something listens on {proxy_addr}", bad.what);
    }
}

// ---------------------------------------------------------------------------
// 5. Reload (SIGHUP).
// ---------------------------------------------------------------------------

/// A file listening on `listen` that allows tunnels to `port` only.
fn only_port(listen: &str, port: u16) -> String {
    format!(
        "http_port {listen}\nacl allowed port {port}\n\
         http_access allow allowed\nhttp_access deny all\n"
    )
}

/// Size of each direction of the tunnels that a reload or a shutdown must not
/// disturb.
const BIG: u64 = 200 * MIB;

/// Runs `check`; if it fails, prints `proxy`'s log before failing the test, so
/// a tunnel that broke says why.
fn with_log_on_failure<T>(proxy: &Spliced, check: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("spliced's log:\n{}", proxy.stderr());
            std::panic::resume_unwind(panic)
        }
    }
}

fn reload_changes_policy_for_new_requests_only(plane: &str) {
    let site = Site::new(&[8001, 8002]);
    let conf = site.conf(&only_port("127.0.0.1:3128", 8001));
    let log = site.path("access.log");
    let proxy = site.start(
        &conf,
        &[
            "--dataplane",
            plane,
            "--access-log",
            log.to_str().unwrap(),
            // Squid lines do not name the data plane: /metrics counts by it.
            "--admin",
            "127.0.0.1:0",
        ],
        1,
    );
    let (paused, big) = site.paused_exchange(site.tunnel(LOCAL4, "127.0.0.1:8001"), BIG);
    let denied = site.connect(LOCAL4, "127.0.0.1:8002", None);
    assert_eq!(denied.status, 403, "{denied:?}");

    // The new file allows 8002 only: the running tunnel to 8001 stays.
    site.conf(&only_port("127.0.0.1:3128", 8002));
    let outcome = proxy.reload();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    let refused = site.connect(LOCAL4, "127.0.0.1:8001", None);
    assert_eq!(refused.status, 403, "{refused:?}");
    let down = site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8002"), 8002);
    with_log_on_failure(&proxy, || site.finish_paused(paused, big, 8001));

    assert_log(
        &log,
        &[
            Logged::refusal(LOOPBACK4, "TCP_DENIED/403", "127.0.0.1:8002", &denied),
            Logged::refusal(LOOPBACK4, "TCP_DENIED/403", "127.0.0.1:8001", &refused),
            Logged::tunnel(LOOPBACK4, "127.0.0.1:8002", LOOPBACK4, (down, down)),
            Logged::tunnel(LOOPBACK4, "127.0.0.1:8001", LOOPBACK4, (big.down, big.down)),
        ],
    );
    assert_tunnels_ran_on_by_metrics(&site, &proxy, plane, 2);
}

fn reload_moves_http_port(plane: &str) {
    let site = Site::new(&[8001]);
    let conf = site.conf(&only_port("127.0.0.1:3128", 8001));
    let log = site.path("access.log");
    let args = [
        "--dataplane",
        plane,
        "--access-log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
    ];
    let mut proxy = site.start(&conf, &args, 1);
    let (old, new) = (Client::local4(3128), Client::local4(3129));
    let (paused, big) = site.paused_exchange(site.tunnel(old, "127.0.0.1:8001"), BIG);

    site.conf(&only_port("127.0.0.1:3129", 8001));
    let since = proxy.mark();
    let outcome = proxy.reload();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    proxy.wait_log(since, "listening on 127.0.0.1:3129");
    proxy.wait_log(since, "no longer listening on 127.0.0.1:3128");
    site.check_tunnel(site.tunnel(new, "127.0.0.1:8001"), 8001);
    assert!(
        wait_until(Duration::from_secs(5), || site.refuses(old.proxy)),
        "the old port still accepts"
    );
    with_log_on_failure(&proxy, || site.finish_paused(paused, big, 8001));
    site.check_tunnel(site.tunnel(new, "127.0.0.1:8001"), 8001);
    proxy.assert_running();
    assert_tunnels_ran_on(&proxy, &log, plane, 3);
}

#[test]
fn reload_rebinds_a_port_on_another_address() {
    let site = Site::new(&[8001]);
    let conf = site.conf(&only_port("3128", 8001));
    let mut proxy = site.start(&conf, &[], 2);
    site.check_tunnel(site.tunnel(LOCAL6, "127.0.0.1:8001"), 8001);

    // From every address to 127.0.0.1 only, the same port: the wildcard
    // listeners must make way for the new one.
    site.conf(&only_port("127.0.0.1:3128", 8001));
    let since = proxy.mark();
    let outcome = proxy.reload();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    proxy.wait_log(since, "listening on 127.0.0.1:3128");
    assert!(
        wait_until(Duration::from_secs(5), || site.refuses(LOCAL6.proxy)),
        "[::]:3128 still accepts"
    );
    site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8001"), 8001);

    // And back to every address.
    site.conf(&only_port("3128", 8001));
    let outcome = proxy.reload();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    site.check_tunnel(site.tunnel(LOCAL6, "127.0.0.1:8001"), 8001);
    site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8001"), 8001);
    proxy.assert_running();
}

#[test]
fn reload_with_a_broken_file_keeps_the_old_configuration() {
    let site = Site::new(&[8001, 8002]);
    let good = only_port("127.0.0.1:3128", 8001);
    let conf = site.conf(&good);
    let mut proxy = site.start(&conf, &[], 1);
    let assert_old_policy = || {
        site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8001"), 8001);
        let reply = site.connect(LOCAL4, "127.0.0.1:8002", None);
        assert_eq!(reply.status, 403, "{reply:?}");
    };

    // A file with an error: the reload fails naming it, the old rules apply.
    site.conf("http_port 127.0.0.1:3128\nacl allowed port 8002\nhttp_access allow alowed\n");
    let outcome = proxy.reload();
    assert!(
        outcome.contains("reload failed")
            && outcome.contains(&format!("{}:3:", conf.display()))
            && outcome.contains("'alowed'"),
        "{outcome}"
    );
    site.conf(&good);
    assert_old_policy();

    // A port that cannot be bound: the same, and the old port keeps serving.
    let _taken = site
        .ns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:3130").unwrap());
    site.conf(&only_port("127.0.0.1:3130", 8002));
    let outcome = proxy.reload();
    assert!(
        outcome.contains("reload failed") && outcome.contains("127.0.0.1:3130"),
        "{outcome}"
    );
    site.conf(&good);
    assert_old_policy();

    // A good file again takes effect.
    site.conf(&only_port("127.0.0.1:3128", 8002));
    let outcome = proxy.reload();
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8002"), 8002);
    proxy.assert_running();
}

// ---------------------------------------------------------------------------
// 6. SIGTERM.
// ---------------------------------------------------------------------------

/// Starts a proxy on `plane` that drains for 3 seconds on SIGTERM, in a site
/// with an upstream on port 8001 (see [`timeout_site`]).
fn drain_site(plane: &str) -> (Site, Spliced) {
    timeout_site(plane, "shutdown_lifetime 3 seconds\n")
}

/// The JSON records of the site's `access.log`, read once the proxy has exited
/// (so no more can come).
fn final_records(site: &Site) -> Vec<serde_json::Value> {
    fs::read_to_string(site.path("access.log"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line:?}: {err}")))
        .collect()
}

/// Fails the test unless the records are exactly one tunnel that ended with
/// `end` (the transaction a shutdown interrupted is logged too, as every other).
fn assert_one_tunnel(records: &[serde_json::Value], end: &str, plane: &str) {
    assert_eq!(records.len(), 1, "access log records: {records:#?}");
    assert_tunnel_end(&records[0], end, plane);
}

/// Sends SIGTERM and waits until the proxy says it is draining.
fn terminate(proxy: &Spliced) {
    let since = proxy.mark();
    proxy.signal(libc::SIGTERM);
    proxy.wait_log(since, "shutting down");
}

/// Waits (bounded) for the proxy to exit; fails unless it exits with status 0.
/// Returns how long it took.
fn assert_clean_exit(proxy: &mut Spliced, within: Duration) -> Duration {
    let (status, took) = proxy
        .wait_exit(within)
        .unwrap_or_else(|| panic!("spliced still runs after {within:?}:\n{}", proxy.stderr()));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        proxy.stderr()
    );
    took
}

fn sigterm_lets_open_tunnels_finish(plane: &str) {
    let (site, mut proxy) = drain_site(plane);
    let (paused, big) = site.paused_exchange(site.tunnel(LOCAL4, "127.0.0.1:8001"), 64 * MIB);
    terminate(&proxy);
    assert!(
        wait_until(Duration::from_secs(2), || site.refuses(LOCAL4.proxy)),
        "new connections are still accepted while draining"
    );
    with_log_on_failure(&proxy, || site.finish_paused(paused, big, 8001));
    assert_clean_exit(&mut proxy, Duration::from_secs(10));
    proxy.wait_log(0, "all connections closed");
    let records = final_records(&site);
    assert_one_tunnel(&records, "closed", plane);
    assert_eq!(
        records[0]["bytes_to_client"],
        CONNECT_OK_LEN + big.down,
        "{}",
        records[0]
    );
    assert_eq!(
        records[0]["bytes_from_client"],
        32 + big.up,
        "{}",
        records[0]
    );
}

fn stalled_tunnel_ends_after_shutdown_lifetime(plane: &str) {
    let (site, mut proxy) = drain_site(plane);
    let mut stalled = site.tunnel(LOCAL4, "127.0.0.1:8001");
    let signalled = Instant::now();
    terminate(&proxy);
    assert_clean_exit(&mut proxy, Duration::from_secs(15));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_secs(10),
        "exited {took:?} after SIGTERM with shutdown_lifetime 3 seconds"
    );
    let closed = wait_closed(&mut stalled, Instant::now());
    assert!(
        closed < Duration::from_secs(5),
        "tunnel open {closed:?} after exit"
    );
    assert_one_tunnel(&final_records(&site), "shutdown", plane);
}

#[test]
fn second_sigterm_closes_at_once() {
    let (site, mut proxy) = drain_site("sockmap");
    let mut stalled = site.tunnel(LOCAL4, "127.0.0.1:8001");
    terminate(&proxy);
    let second = Instant::now();
    proxy.signal(libc::SIGTERM);
    assert_clean_exit(&mut proxy, Duration::from_secs(10));
    let took = second.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "exited {took:?} after the second SIGTERM"
    );
    let closed = wait_closed(&mut stalled, Instant::now());
    assert!(
        closed < Duration::from_secs(5),
        "tunnel open {closed:?} after exit"
    );
    assert_one_tunnel(&final_records(&site), "shutdown", "sockmap");
}

// ---------------------------------------------------------------------------
// 7. Timeouts and limits from the file.
// ---------------------------------------------------------------------------

/// Starts a proxy on `plane` with a file listening on 127.0.0.1:3128 that
/// allows everything, plus `extra` lines; JSON records go to the site's
/// `access.log`.
fn timeout_site(plane: &str, extra: &str) -> (Site, Spliced) {
    let site = Site::new(&[8001]);
    let conf = site.conf(&format!(
        "http_port 127.0.0.1:3128\n{extra}http_access allow all\n"
    ));
    let log = site.path("access.log");
    let proxy = site.start(
        &conf,
        &[
            "--dataplane",
            plane,
            "--access-log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        1,
    );
    (site, proxy)
}

/// Fails the test unless the JSON record is a tunnel that ended with `end`.
fn assert_tunnel_end(record: &serde_json::Value, end: &str, plane: &str) {
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["result"], "TCP_TUNNEL", "{record}");
    assert_eq!(record["end"], end, "{record}");
    assert_eq!(record["dataplane"], plane, "{record}");
}

fn read_timeout_closes_idle_tunnels(plane: &str) {
    let (site, _proxy) = timeout_site(plane, "read_timeout 1 second\n");
    let mut idle = site.tunnel(LOCAL4, "127.0.0.1:8001");
    let took = wait_closed(&mut idle, Instant::now());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "idle tunnel closed after {took:?} with read_timeout 1 second"
    );
    let records = wait_json(&site.path("access.log"), 1);
    assert_tunnel_end(&records[0], "idle_timeout", plane);
}

fn client_lifetime_closes_busy_tunnels(plane: &str) {
    let (site, _proxy) = timeout_site(plane, "read_timeout 1 second\nclient_lifetime 2 seconds\n");
    let opened = Instant::now();
    let mut busy = site.tunnel(LOCAL4, "127.0.0.1:8001");
    busy.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let header = Header {
        up: MIB,
        down: 0,
        seed: site.seed(),
        mode: Mode::AnswerAfterEof,
    };
    busy.write_all(&header.encode()).unwrap();
    // A few hundred bytes every 200 ms, more often than read_timeout, until the
    // proxy closes the tunnel (at most 10 s).
    let mut chunk = [0u8; 300];
    let mut sent = 0u64;
    let closed_after = loop {
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "the busy tunnel stays open"
        );
        spliced_tests::pattern::fill(header.seed, sent, &mut chunk);
        if busy.write_all(&chunk).is_err() {
            break opened.elapsed();
        }
        sent += chunk.len() as u64;
        match busy.read(&mut [0u8; 64]) {
            Ok(0) => break opened.elapsed(),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(_) => panic!("the upstream answered before EOF"),
            Err(_) => break opened.elapsed(),
        }
    };
    assert!(
        closed_after >= Duration::from_millis(1800) && closed_after < Duration::from_secs(6),
        "busy tunnel closed after {closed_after:?} with client_lifetime 2 seconds"
    );
    let records = wait_json(&site.path("access.log"), 1);
    assert_tunnel_end(&records[0], "lifetime_exceeded", plane);
}

#[test]
fn request_timeout_gets_408() {
    let (site, _proxy) = timeout_site("splice", "request_timeout 1 second\n");
    let (answer, took) = site.with_connection(LOCAL4, |mut stream| {
        let started = Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "408 after {took:?} with request_timeout 1 second"
    );
    let records = wait_json(&site.path("access.log"), 1);
    assert_eq!(records[0]["status"], 408, "{}", records[0]);
}

#[test]
fn connect_timeout_gets_504() {
    let site = Site::new(&[]);
    let (listener, _fillers) = black_hole(&site.ns);
    let port = listener.local_addr().unwrap().as_socket().unwrap().port();
    let conf =
        site.conf("http_port 127.0.0.1:3128\nconnect_timeout 1 second\nhttp_access allow all\n");
    let log = site.path("access.log");
    let _proxy = site.start(&conf, &["--access-log", log.to_str().unwrap()], 1);
    let target = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let reply = site.connect(LOCAL4, &target, None);
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "504 after {took:?} with connect_timeout 1 second"
    );
    assert_log(
        &log,
        &[Logged::refusal(LOOPBACK4, "NONE_NONE/504", &target, &reply)],
    );
}

#[test]
fn client_ip_max_connections_limits_each_address() {
    let site = Site::new(&[8001]);
    let conf =
        site.conf("http_port 127.0.0.1:3128\nclient_ip_max_connections 2\nhttp_access allow all\n");
    let log = site.path("access.log");
    let _proxy = site.start(&conf, &["--access-log", log.to_str().unwrap()], 1);
    let target = "127.0.0.1:8001";
    let held = [site.tunnel(LOCAL4, target), site.tunnel(LOCAL4, target)];

    let third = site.connect(LOCAL4, target, None);
    assert_eq!(third.status, 429, "{third:?}");
    // Another address is not limited by the first one's connections.
    let other = Client {
        source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ..LOCAL4
    };
    let other_down = site.check_tunnel(site.tunnel(other, target), 8001);

    // Closing one of the two makes room.
    let [first, second] = held;
    let first_down = site.check_tunnel(first, 8001);
    wait_lines(&log, 3);
    // The slot is released just after the access log line is written.
    std::thread::sleep(Duration::from_millis(200));
    let again_down = site.check_tunnel(site.tunnel(LOCAL4, target), 8001);
    let second_down = site.check_tunnel(second, 8001);

    let tunnel = |down: u64| Logged::tunnel(LOOPBACK4, target, LOOPBACK4, (down, down));
    let limited = Logged {
        method: "NONE",
        url: "error:invalid-request",
        ..Logged::refusal(LOOPBACK4, "TCP_DENIED/429", target, &third)
    };
    assert_log(
        &log,
        &[
            limited,
            Logged {
                client: other.source,
                ..tunnel(other_down)
            },
            tunnel(first_down),
            tunnel(again_down),
            tunnel(second_down),
        ],
    );
}

// ---------------------------------------------------------------------------
// 8. logformat and access_log.
// ---------------------------------------------------------------------------

/// A file that allows port 8001 only, with `log_lines` for logging.
fn logging_conf(log_lines: &str) -> String {
    format!(
        "http_port 127.0.0.1:3128\nlogformat mine %>a %rm %ru %>Hs %<st %Ss\n{log_lines}\
         acl allowed port 8001\nhttp_access allow allowed\nhttp_access deny all\n"
    )
}

/// Makes one tunnel (to 8001) and one denied request (to 8002); returns the
/// bytes the tunnel's upstream sent and the denial.
fn tunnel_and_denial(site: &Site) -> (u64, Reply) {
    let down = site.check_tunnel(site.tunnel(LOCAL4, "127.0.0.1:8001"), 8001);
    let denied = site.connect(LOCAL4, "127.0.0.1:8002", None);
    assert_eq!(denied.status, 403, "{denied:?}");
    (down, denied)
}

/// Time for the proxy to write a record it must not write.
const UNWRITTEN_RECORD_GRACE: Duration = Duration::from_millis(500);

#[test]
fn logformat_and_access_log_lines_of_the_file() {
    let site = Site::new(&[8001]);
    let (mine, native) = (site.path("mine.log"), site.path("native.log"));
    let conf = site.conf(&logging_conf(&format!(
        "access_log {} mine\naccess_log stdio:{} squid\n",
        mine.display(),
        native.display()
    )));
    let proxy = site.start(&conf, &[], 1);
    let (down, denied) = tunnel_and_denial(&site);
    assert_eq!(
        wait_lines(&mine, 2),
        [
            format!(
                "127.0.0.1 CONNECT 127.0.0.1:8001 200 {} TCP_TUNNEL",
                down + CONNECT_OK_LEN
            ),
            format!(
                "127.0.0.1 CONNECT 127.0.0.1:8002 403 {} TCP_DENIED",
                denied.len()
            ),
        ]
    );
    assert_log(
        &native,
        &[
            Logged::tunnel(LOOPBACK4, "127.0.0.1:8001", LOOPBACK4, (down, down)),
            Logged::refusal(LOOPBACK4, "TCP_DENIED/403", "127.0.0.1:8002", &denied),
        ],
    );
    std::thread::sleep(UNWRITTEN_RECORD_GRACE);
    assert_eq!(
        proxy.stdout_lines(),
        Vec::<String>::new(),
        "records on stdout"
    );
}

#[test]
fn access_log_none_writes_nothing() {
    let site = Site::new(&[8001]);
    let conf = site.conf(&logging_conf("access_log none\n"));
    let proxy = site.start(&conf, &[], 1);
    tunnel_and_denial(&site);
    std::thread::sleep(UNWRITTEN_RECORD_GRACE);
    assert_eq!(
        proxy.stdout_lines(),
        Vec::<String>::new(),
        "records on stdout"
    );
    let files: Vec<_> = fs::read_dir(site.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(files, ["squid.conf"], "files written besides squid.conf");
}

#[test]
fn command_line_access_log_overrides_the_file() {
    let site = Site::new(&[8001]);
    let (mine, cli) = (site.path("mine.log"), site.path("cli.log"));
    let cli_arg = cli.to_str().unwrap();
    for log_lines in [
        format!("access_log {} mine\n", mine.display()),
        "access_log none\n".into(),
    ] {
        let _ = fs::remove_file(&cli);
        let conf = site.conf(&logging_conf(&log_lines));
        let proxy = site.start(&conf, &["--access-log", cli_arg], 1);
        let (down, denied) = tunnel_and_denial(&site);
        // The command line's file, in the command line's (default) format.
        assert_log(
            &cli,
            &[
                Logged::tunnel(LOOPBACK4, "127.0.0.1:8001", LOOPBACK4, (down, down)),
                Logged::refusal(LOOPBACK4, "TCP_DENIED/403", "127.0.0.1:8002", &denied),
            ],
        );
        std::thread::sleep(UNWRITTEN_RECORD_GRACE);
        assert!(!mine.exists(), "the file's access_log was written");
        assert_eq!(
            proxy.stdout_lines(),
            Vec::<String>::new(),
            "records on stdout"
        );
    }

    // --log-format alone changes the format of the file's destinations.
    let conf = site.conf(&logging_conf(&format!(
        "access_log {} mine\n",
        mine.display()
    )));
    let _proxy = site.start(&conf, &["--log-format", "json"], 1);
    let (down, _) = tunnel_and_denial(&site);
    let records = wait_json(&mine, 2);
    assert_eq!(
        records[0]["bytes_to_client"],
        down + CONNECT_OK_LEN,
        "{}",
        records[0]
    );
    assert_eq!(records[1]["status"], 403, "{}", records[1]);
}

spliced_tests::on_every_data_plane!(
    reload_changes_policy_for_new_requests_only,
    reload_moves_http_port,
    sigterm_lets_open_tunnels_finish,
    stalled_tunnel_ends_after_shutdown_lifetime,
    read_timeout_closes_idle_tunnels,
    client_lifetime_closes_busy_tunnels,
);
