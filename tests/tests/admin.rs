//! The admin listener (`--admin`): `/healthz` and `/readyz` through startup,
//! service and drain; `/metrics` parses as Prometheus text and its counters
//! follow real tunnels on every data plane (bytes equal to the access log's,
//! long tunnels visible before they end), denials by rule, upstream errors by
//! kind and reloads; `--access-log-periodic` records of long tunnels. A test
//! aimed at one data plane checks that every tunnel ran on it.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use spliced_tests::{
    daemon::Spliced,
    netns::Netns,
    open_tunnel,
    paused::PausedExchange,
    raw_request, status_of,
    upstream::{exchange, exchange_with, Header, SPLICE_GRACE},
    wait_until, Mode, Proxy, Upstream, CONNECT_OK, DATA_PLANES, IO_TIMEOUT,
};

const MIB: u64 = 1 << 20;

/// What the proxy logs once its admin listener is bound.
const ADMIN_LINE: &str = "admin endpoint on http://";

/// The admin address a proxy logged.
fn admin_addr(stderr: &str) -> SocketAddr {
    stderr
        .lines()
        .find_map(|line| {
            let rest = line.split(ADMIN_LINE).nth(1)?;
            rest.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no admin address logged:\n{stderr}"))
}

/// A proxy on 127.0.0.1 with an admin listener on a port of its choice.
struct Admin {
    proxy: Proxy,
    addr: SocketAddr,
}

impl Admin {
    fn start(args: &[&str]) -> Self {
        let mut all = vec!["--admin", "127.0.0.1:0", "--log-format", "json"];
        all.extend_from_slice(args);
        let proxy = Proxy::start(&all);
        let addr = admin_addr(&proxy.stderr());
        Self { proxy, addr }
    }

    fn start_in(ns: &Netns, args: &[&str]) -> Self {
        let mut all = vec!["--admin", "127.0.0.1:0", "--log-format", "json"];
        all.extend_from_slice(args);
        let proxy = Proxy::start_in(ns, &all);
        let addr = admin_addr(&proxy.stderr());
        Self { proxy, addr }
    }

    fn get(&self, path: &str) -> (u16, String) {
        get(self.addr, path)
    }

    fn scrape(&self) -> Scrape {
        scrape(self.addr)
    }
}

/// `GET path` on the admin listener at `addr`: the status and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path).unwrap_or_else(|err| panic!("GET {path} from {addr}: {err}"))
}

fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Ok((status_of(head), body.to_owned()))
}

/// A parsed `/metrics` answer.
struct Scrape {
    text: String,
    parsed: prometheus_parse::Scrape,
}

/// Fetches `/metrics` and checks that every line is valid exposition text.
fn scrape(addr: SocketAddr) -> Scrape {
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    check_exposition(&text);
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|err| panic!("unparsable metrics: {err}\n{text}"));
    Scrape { text, parsed }
}

/// Checks the text line by line: comments are `HELP`, `TYPE`, `UNIT` or the final
/// `EOF`; every sample has a valid name, well-formed labels, a number, and a
/// family with a `TYPE`.
fn check_exposition(text: &str) {
    let mut typed: Vec<(String, String)> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    let valid_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            assert!(
                matches!(kind, Some("HELP" | "TYPE" | "UNIT")) && name.is_some_and(valid_name),
                "bad comment line {line:?}"
            );
            if kind == Some("TYPE") {
                let rest = rest.unwrap_or_default();
                assert!(
                    [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "unknown"
                    ]
                    .contains(&rest),
                    "bad type in {line:?}"
                );
                typed.push((name.unwrap().to_owned(), rest.to_owned()));
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for label in split_labels(labels) {
                    let (key, quoted) = label
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {label:?} in {line:?}"));
                    assert!(valid_name(key), "bad label name in {line:?}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = typed.iter().find(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(family.as_str()))
        });
        assert!(family.is_some(), "sample {line:?} has no TYPE before it");
    }
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(labels: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        parts.push(&labels[start..]);
    }
    parts
}

impl Scrape {
    /// The sum of the samples of `metric` whose labels include `labels`.
    fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.parsed
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{metric} is not a number: {other:?}"),
            })
            .sum()
    }

    /// `sum` as an integer.
    fn count(&self, metric: &str, labels: &[(&str, &str)]) -> u64 {
        self.sum(metric, labels) as u64
    }

    /// How many observations histogram `metric` has.
    fn observations(&self, metric: &str) -> u64 {
        self.count(&format!("{metric}_count"), &[])
    }

    /// The histogram `metric`'s buckets are cumulative and end with `+Inf` = count.
    fn assert_histogram(&self, metric: &str) {
        let sample = self
            .parsed
            .samples
            .iter()
            .find(|s| s.metric == metric)
            .unwrap_or_else(|| panic!("no histogram {metric}:\n{}", self.text));
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            panic!("{metric} is not a histogram: {sample:?}");
        };
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "{buckets:?}"
        );
        let last = buckets.last().expect("buckets");
        assert!(last.less_than.is_infinite(), "{buckets:?}");
        assert_eq!(last.count as u64, self.observations(metric));
    }
}

fn header(up: u64, down: u64, seed: u64) -> Header {
    Header {
        up,
        down,
        seed,
        mode: Mode::Concurrent,
    }
}

/// Runs one exchange through a new tunnel and checks both sides got every byte.
fn exchange_through(proxy: &Proxy, upstream: &Upstream, h: Header) {
    let client = exchange(
        open_tunnel(proxy.addr, &upstream.addr.to_string()),
        h,
        false,
    );
    assert_eq!(client.received, Ok(h.down), "client side of {h:?}");
    assert_eq!(
        upstream.result().received,
        Ok(h.up),
        "upstream side of {h:?}"
    );
}

const C2U: (&str, &str) = ("direction", "client_to_upstream");
const U2C: (&str, &str) = ("direction", "upstream_to_client");

#[test]
fn probes_through_startup_service_and_drain() {
    // A namespace of its own, so fixed ports are free and the test can probe the
    // admin listener before the proxy says where it listens.
    let ns = Netns::new();
    let upstream = Upstream::start_in(&ns, "127.0.0.1:0".parse().unwrap());
    let port = upstream.addr.port().to_string();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let proxy_addr: SocketAddr = "127.0.0.1:3128".parse().unwrap();
    let mut spliced = Spliced::spawn_in(
        &ns,
        &[
            "--admin",
            "127.0.0.1:9901",
            "--listen",
            "127.0.0.1:3128",
            "--connect-ports",
            &port,
            "--access-log",
            "/dev/null",
            "--test-hook",
            "delay-startup",
        ],
    );
    // Starting (the hook holds the listeners back for 2 s): alive, not ready.
    let first = ns.enter(move || {
        let mut answer = None;
        wait_until(Duration::from_secs(10), || {
            answer = try_get(admin, "/readyz").ok();
            answer.is_some()
        });
        answer.map(|readyz| (readyz, get(admin, "/healthz")))
    });
    let (readyz, healthz) =
        first.unwrap_or_else(|| panic!("no admin answer:\n{}", spliced.stderr()));
    assert_eq!(readyz.0, 503, "{readyz:?}");
    assert!(readyz.1.starts_with("starting"), "{readyz:?}");
    assert_eq!(healthz, (200, "ok\n".to_owned()));
    assert!(spliced.listening().is_empty(), "{}", spliced.stderr());

    // Listening: ready.
    spliced.wait_log(0, "listening on");
    let readyz = ns.enter(move || get(admin, "/readyz"));
    assert_eq!(readyz, (200, "ready\n".to_owned()));

    // SIGTERM with a tunnel open in the middle of a transfer: draining, not ready,
    // still alive; the tunnel finishes.
    let h = header(8 * MIB, 8 * MIB, 5);
    let target = upstream.addr.to_string();
    let paused = ns.enter(move || PausedExchange::start(open_tunnel(proxy_addr, &target), h));
    let mark = spliced.mark();
    spliced.signal(libc::SIGTERM);
    spliced.wait_log(mark, "shutting down: waiting");
    let (readyz, healthz, metrics) = ns.enter(move || {
        (
            get(admin, "/readyz"),
            get(admin, "/healthz"),
            scrape(admin).count("spliced_tunnels_active", &[]),
        )
    });
    assert_eq!(readyz.0, 503, "{readyz:?}");
    assert!(readyz.1.starts_with("draining"), "{readyz:?}");
    assert_eq!(healthz, (200, "ok\n".to_owned()));
    assert_eq!(metrics, 1);
    let refused = ns.enter(move || TcpStream::connect(proxy_addr).is_err());
    assert!(refused, "still accepting after SIGTERM");
    let client = paused.finish();
    assert_eq!(client.received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up));
    let exit = spliced.wait_exit(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|(status, _)| status.success()),
        "{exit:?}\n{}",
        spliced.stderr()
    );
}

#[test]
fn unknown_paths_and_methods() {
    let admin = Admin::start(&[]);
    assert_eq!(admin.get("/nothing").0, 404);
    let mut stream = TcpStream::connect(admin.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(status_of(&answer), 405, "{answer}");
    // Keep-alive: two requests on one connection.
    let mut stream = TcpStream::connect(admin.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
}

/// Tunnels of known sizes: the counters equal what moved and what the access
/// log says, and every tunnel ran on `plane` (the clients' FINs wait for
/// sockmap to splice: one that came first would send its tunnel to splice).
fn counters_follow_tunnels(plane: &str) {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let admin = Admin::start(&["--dataplane", plane, "--connect-ports", &port]);
    let before = admin.scrape();
    assert_eq!(
        before.count(
            "spliced_build_info",
            &[("dataplane", plane), ("version", env!("CARGO_PKG_VERSION"))]
        ),
        1,
        "{}",
        before.text
    );
    assert_eq!(before.count("spliced_bytes_total", &[]), 0);
    assert_eq!(before.count("spliced_tunnels_active", &[]), 0);

    let headers = [
        header(0, 1, 10),
        header(100_000, 250_000, 12),
        header(3 * MIB + 5, MIB, 14),
    ];
    let threads: Vec<_> = headers
        .iter()
        .map(|&h| {
            let (addr, target) = (admin.proxy.addr, upstream.addr.to_string());
            std::thread::spawn(move || {
                exchange_with(open_tunnel(addr, &target), h, false, SPLICE_GRACE)
            })
        })
        .collect();
    for (thread, h) in threads.into_iter().zip(&headers) {
        assert_eq!(thread.join().unwrap().received, Ok(h.down));
    }
    for _ in &headers {
        assert!(upstream.result().received.is_ok());
    }
    admin.proxy.assert_tunnels_ran_on(plane, headers.len());
    let records = admin.proxy.wait_json_records(headers.len());
    let metrics = admin.scrape();
    let n = headers.len() as u64;
    let up: u64 = headers.iter().map(|h| 32 + h.up).sum();
    let down: u64 = headers.iter().map(|h| h.down).sum();
    let logged_up: u64 = records
        .iter()
        .map(|r| r["bytes_from_client"].as_u64().unwrap())
        .sum();
    let logged_down: u64 = records
        .iter()
        .map(|r| r["bytes_to_client"].as_u64().unwrap())
        .sum();
    let text = &metrics.text;
    assert_eq!(metrics.count("spliced_bytes_total", &[C2U]), up, "{text}");
    assert_eq!(metrics.count("spliced_bytes_total", &[U2C]), down, "{text}");
    // The access log counts the same bytes, plus the 200 answer of each tunnel.
    assert_eq!(logged_up, up);
    assert_eq!(logged_down, down + n * CONNECT_OK.len() as u64);
    // By data plane, as the access log says which moved each tunnel.
    for moved_by in DATA_PLANES {
        let of_plane: Vec<_> = records
            .iter()
            .filter(|r| r["dataplane"] == moved_by)
            .collect();
        let tunnels = metrics.count(
            "spliced_tunnels_total",
            &[("dataplane", moved_by), ("result", "closed")],
        );
        assert_eq!(tunnels, of_plane.len() as u64, "{moved_by}: {text}");
        let down_of_plane: u64 = of_plane
            .iter()
            .map(|r| r["bytes_to_client"].as_u64().unwrap() - CONNECT_OK.len() as u64)
            .sum();
        assert_eq!(
            metrics.count("spliced_bytes_total", &[U2C, ("dataplane", moved_by)]),
            down_of_plane,
            "{moved_by}: {text}"
        );
    }
    assert_eq!(metrics.count("spliced_tunnels_total", &[]), n, "{text}");
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "200")]),
        n,
        "{text}"
    );
    assert_eq!(metrics.count("spliced_tunnels_active", &[]), 0, "{text}");
    assert_eq!(metrics.observations("spliced_connect_duration_seconds"), n);
    metrics.assert_histogram("spliced_connect_duration_seconds");
    // IP literals need no resolver.
    assert_eq!(metrics.observations("spliced_dns_duration_seconds"), 0);
}

#[test]
fn counters_follow_tunnels_sockmap() {
    counters_follow_tunnels("sockmap");
}

#[test]
fn counters_follow_tunnels_splice() {
    counters_follow_tunnels("splice");
}

#[test]
fn counters_follow_tunnels_copy() {
    counters_follow_tunnels("copy");
}

/// A tunnel paused in the middle of a transfer: its bytes show in `/metrics`
/// and in periodic access log records before it ends, and are not counted twice
/// when it does.
fn long_tunnel_is_visible_before_it_ends(plane: &str) {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let admin = Admin::start(&[
        "--dataplane",
        plane,
        "--connect-ports",
        &port,
        "--access-log-periodic",
        "0.5",
    ]);
    let h = header(8 * MIB, 6 * MIB, 20);
    let paused =
        PausedExchange::start(open_tunnel(admin.proxy.addr, &upstream.addr.to_string()), h);
    // The client has sent half its bytes and read half the server's.
    let (half_up, half_down) = (32 + h.up / 2, h.down / 2);
    let mut last = None;
    let visible = wait_until(Duration::from_secs(3), || {
        let metrics = admin.scrape();
        let moved = (
            metrics.count("spliced_bytes_total", &[C2U]),
            metrics.count("spliced_bytes_total", &[U2C]),
        );
        last = Some(moved);
        moved.0 >= half_up && moved.1 >= half_down
    });
    assert!(
        visible,
        "bytes of the open tunnel: {last:?}, want ≥ {half_up}, {half_down}"
    );
    let metrics = admin.scrape();
    assert_eq!(metrics.count("spliced_tunnels_active", &[]), 1);
    assert_eq!(metrics.count("spliced_tunnels_total", &[]), 0);

    // Periodic records while it is open.
    let periodic = wait_until(Duration::from_secs(5), || {
        admin.proxy.access_lines().iter().any(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["end"] == "periodic"
                && record["bytes_from_client"].as_u64() >= Some(half_up)
                && record["bytes_to_client"].as_u64() >= Some(half_down + CONNECT_OK.len() as u64)
        })
    });
    assert!(
        periodic,
        "no periodic record: {:#?}",
        admin.proxy.access_lines()
    );

    let client = paused.finish();
    assert_eq!(client.received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up));
    let closed = wait_until(Duration::from_secs(10), || {
        admin
            .proxy
            .access_lines()
            .iter()
            .any(|line| !line.contains("\"periodic\""))
    });
    assert!(closed, "no final record");
    let records = admin.proxy.wait_json_records(1);
    let (periodic, last): (Vec<_>, Vec<_>) = records.iter().partition(|r| r["end"] == "periodic");
    assert_eq!(last.len(), 1, "{records:#?}");
    let last = last[0];
    assert_eq!(last["end"], "closed", "{last}");
    for record in &periodic {
        assert_eq!(record["result"], "TCP_TUNNEL", "{record}");
        assert_eq!(record["status"], 200, "{record}");
        assert!(record["bytes_from_client"].as_u64() <= last["bytes_from_client"].as_u64());
        assert!(record["bytes_to_client"].as_u64() <= last["bytes_to_client"].as_u64());
    }
    let metrics = admin.scrape();
    let text = &metrics.text;
    assert_eq!(
        metrics.count("spliced_bytes_total", &[C2U]),
        32 + h.up,
        "{text}"
    );
    assert_eq!(
        metrics.count("spliced_bytes_total", &[U2C]),
        h.down,
        "{text}"
    );
    assert_eq!(last["bytes_from_client"].as_u64(), Some(32 + h.up));
    assert_eq!(metrics.count("spliced_tunnels_active", &[]), 0, "{text}");
    assert_eq!(metrics.count("spliced_tunnels_total", &[]), 1, "{text}");
    admin.proxy.assert_tunnels_ran_on(plane, 1);
}

#[test]
fn long_tunnel_is_visible_before_it_ends_sockmap() {
    long_tunnel_is_visible_before_it_ends("sockmap");
}

#[test]
fn long_tunnel_is_visible_before_it_ends_splice() {
    long_tunnel_is_visible_before_it_ends("splice");
}

#[test]
fn long_tunnel_is_visible_before_it_ends_copy() {
    long_tunnel_is_visible_before_it_ends("copy");
}

fn connect_request(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

#[test]
fn denials_are_counted_by_rule() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    let write_conf = |conf: &Path| {
        fs::write(
            conf,
            format!(
                "acl SSL_ports port 443\n\
                 acl up port {}\n\
                 http_access deny CONNECT SSL_ports\n\
                 http_access allow localhost up\n",
                upstream.addr.port()
            ),
        )
        .unwrap();
    };
    write_conf(&conf);
    let admin = Admin::start(&["-f", conf.to_str().unwrap()]);
    let ask = |target: &str| status_of(&raw_request(admin.proxy.addr, &connect_request(target)));
    for _ in 0..2 {
        assert_eq!(ask("127.0.0.1:443"), 403);
    }
    assert_eq!(ask("127.0.0.1:444"), 403);
    exchange_through(&admin.proxy, &upstream, header(10, 10, 30));
    admin.proxy.wait_access_lines(4);
    let metrics = admin.scrape();
    let text = &metrics.text;
    let line3 = format!("{}:3", conf.display());
    assert_eq!(
        metrics.count("spliced_acl_denials_total", &[("rule", &line3)]),
        2,
        "{text}"
    );
    assert_eq!(
        metrics.count("spliced_acl_denials_total", &[("rule", "implicit")]),
        1,
        "{text}"
    );
    assert_eq!(metrics.count("spliced_acl_denials_total", &[]), 3, "{text}");
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "403")]),
        3
    );
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "200")]),
        1
    );
    assert_eq!(metrics.count("spliced_requests_total", &[]), 4);

    // Reloads, both ways; a failed one keeps the proxy ready.
    let reload = |needle: &str| {
        let since = admin.proxy.stderr().matches(needle).count();
        // SAFETY: kill(2) with the pid of our own child and a valid signal.
        unsafe { libc::kill(admin.proxy.pid() as i32, libc::SIGHUP) };
        let logged = wait_until(Duration::from_secs(20), || {
            admin.proxy.stderr().matches(needle).count() > since
        });
        assert!(logged, "no {needle:?}:\n{}", admin.proxy.stderr());
    };
    reload("configuration reloaded");
    fs::write(&conf, "http_access allow nonexistent_acl\n").unwrap();
    reload("reload failed");
    write_conf(&conf);
    reload("configuration reloaded");
    let metrics = admin.scrape();
    let text = &metrics.text;
    assert_eq!(
        metrics.count("spliced_config_reloads_total", &[("result", "success")]),
        2,
        "{text}"
    );
    assert_eq!(
        metrics.count("spliced_config_reloads_total", &[("result", "failure")]),
        1,
        "{text}"
    );
    assert_eq!(admin.get("/readyz"), (200, "ready\n".to_owned()));
}

#[test]
fn builtin_policy_denials_are_counted() {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let admin = Admin::start(&["--connect-ports", &port]);
    let answer = raw_request(admin.proxy.addr, &connect_request("127.0.0.1:443"));
    assert_eq!(status_of(&answer), 403, "{answer}");
    let answer = raw_request(admin.proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(status_of(&answer), 405, "{answer}");
    admin.proxy.wait_access_lines(2);
    let metrics = admin.scrape();
    let text = &metrics.text;
    assert_eq!(
        metrics.count(
            "spliced_acl_denials_total",
            &[("rule", "builtin:port_not_allowed")]
        ),
        1,
        "{text}"
    );
    assert_eq!(metrics.count("spliced_acl_denials_total", &[]), 1, "{text}");
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "405")]),
        1
    );
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "403")]),
        1
    );
}

#[test]
fn upstream_connect_errors_are_counted_by_kind() {
    let ns = Netns::new();
    // A patient resolver, so --dns-timeout ends a lookup nobody answers.
    fs::write(
        format!("/etc/netns/{}/resolv.conf", ns.name),
        "nameserver 127.0.0.1\noptions timeout:5 attempts:2\n",
    )
    .unwrap();
    // A port where nothing listens, and one whose accept queue is full.
    let closed = ns.enter(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let (black_hole, _fillers) = spliced_tests::sockets::black_hole(&ns);
    let full = black_hole.local_addr().unwrap().as_socket().unwrap().port();
    let ports = format!("443,{closed},{full}");
    let admin = Admin::start_in(
        &ns,
        &[
            "--connect-ports",
            &ports,
            "--connect-timeout",
            "1",
            "--dns-timeout",
            "1",
        ],
    );
    let ask = |target: String| {
        let proxy = admin.proxy.addr;
        ns.enter(move || status_of(&raw_request(proxy, &connect_request(&target))))
    };
    assert_eq!(ask(format!("127.0.0.1:{closed}")), 502);
    assert_eq!(ask(format!("127.0.0.1:{closed}")), 502);
    assert_eq!(ask(format!("127.0.0.1:{full}")), 504);
    // A name that cannot exist: the resolver says NXDOMAIN without asking (RFC 6761).
    assert_eq!(ask("no-such-host.invalid:443".into()), 503);
    // A resolver that never answers (another name: failures are cached).
    let _silent = ns.enter(|| UdpSocket::bind("127.0.0.1:53").expect("bind DNS"));
    assert_eq!(ask("no-answer.test:443".into()), 503);
    admin.proxy.wait_access_lines(5);
    let admin_addr = admin.addr;
    let metrics = ns.enter(move || scrape(admin_addr));
    let text = &metrics.text;
    for (kind, count) in [
        ("refused", 2),
        ("timeout", 1),
        ("resolve", 1),
        ("resolve_timeout", 1),
    ] {
        assert_eq!(
            metrics.count("spliced_upstream_connect_errors_total", &[("kind", kind)]),
            count,
            "{kind}: {text}"
        );
    }
    assert_eq!(
        metrics.count("spliced_upstream_connect_errors_total", &[]),
        5
    );
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "502")]),
        2
    );
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "504")]),
        1
    );
    assert_eq!(
        metrics.count("spliced_requests_total", &[("status", "503")]),
        2
    );
    assert_eq!(
        metrics.observations("spliced_dns_duration_seconds"),
        2,
        "{text}"
    );
    metrics.assert_histogram("spliced_dns_duration_seconds");
    // The lookup that timed out took about --dns-timeout.
    assert!(
        metrics.sum("spliced_dns_duration_seconds_sum", &[]) >= 0.9,
        "{text}"
    );
}
