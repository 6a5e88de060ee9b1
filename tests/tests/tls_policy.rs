//! The TLS name policy without decryption: Squid's peek-and-splice lines
//! (`ssl_bump peek step1`, `ssl_bump splice allowed`, `ssl_bump terminate
//! all`, `ssl::server_name`), spliced's `sni_must_match_connect`, and
//! `on_unsupported_protocol`, with real clients (curl, `openssl s_client`)
//! and real TLS origins (`openssl s_server`).
//!
//! Each test has a namespace of its own (names start with `tp`) whose
//! resolver is a DNS stub answering every `*.example.com` and `other.org`
//! name with 127.0.0.1, so CONNECT targets can be names.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Stdio,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use spliced_tests::{
    daemon::Spliced,
    dns::{DnsStub, Reply},
    netns::Netns,
    open_tunnel,
    tls::{self, TlsOrigin},
    wait_until,
};

const PROXY: &str = "127.0.0.1:3128";
/// The TLS origin (`openssl s_server`).
const ORIGIN_PORT: u16 = 8443;
/// The counting origin: records what reaches it, answers nothing.
const COUNTER_PORT: u16 = 8444;

/// Squid's peek-and-splice example, as an operator writes it.
const PEEK_AND_SPLICE: &str = "\
acl step1 at_step SslBump1
acl allowed ssl::server_name .example.com
ssl_bump peek step1
ssl_bump splice allowed
ssl_bump terminate all
";

/// A listener that records, per connection, every byte it receives until
/// the client closes (or 10 s pass).
struct Counter {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: mpsc::Receiver<()>,
}

impl Counter {
    fn start(ns: &Netns) -> Self {
        let listener = ns.enter(|| TcpListener::bind(("127.0.0.1", COUNTER_PORT)).unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let (sender, connections) = mpsc::channel();
        let sink = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { continue };
                let (sink, sender) = (sink.clone(), sender.clone());
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes);
                    sink.lock().unwrap().push(bytes);
                    let _ = sender.send(());
                });
            }
        });
        Self {
            received,
            connections,
        }
    }

    /// What the next connection that ended received.
    fn next(&self) -> Vec<u8> {
        self.connections
            .recv_timeout(Duration::from_secs(20))
            .expect("no connection reached the counting origin");
        self.received.lock().unwrap().remove(0)
    }
}

/// A namespace with the DNS stub, a TLS origin, a counting origin and
/// spliced with `conf` (plus `--dataplane plane` and `extra`).
struct Setup {
    proxy: Spliced,
    origin: TlsOrigin,
    counter: Counter,
    dir: tempfile::TempDir,
    _dns: DnsStub,
    ns: Netns,
}

impl Setup {
    fn start(conf: &str, plane: &str, extra: &[&str]) -> Self {
        let ns = Netns::with_prefix("tp");
        let dns = DnsStub::start(&ns, |query| {
            if query.name.ends_with(".example.com") || query.name == "other.org" {
                if query.qtype == spliced_tests::dns::A {
                    Reply::Addresses(vec!["127.0.0.1".parse().unwrap()])
                } else {
                    Reply::Addresses(Vec::new())
                }
            } else {
                Reply::NxDomain
            }
        });
        let origin = TlsOrigin::start_in(
            &ns,
            SocketAddr::from(([127, 0, 0, 1], ORIGIN_PORT)),
            "DNS:allowed.example.com",
        );
        let counter = Counter::start(&ns);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("squid.conf");
        let text = format!(
            "http_port {PROXY}\nacl ports port {ORIGIN_PORT} {COUNTER_PORT}\nhttp_access allow ports\nhttp_access deny all\n{conf}"
        );
        std::fs::write(&file, text).unwrap();
        let log = dir.path().join("access.log");
        let mut args = vec![
            "-f",
            file.to_str().unwrap(),
            "--dataplane",
            plane,
            "--access-log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "--admin",
            "127.0.0.1:9090",
        ];
        args.extend_from_slice(extra);
        let proxy = Spliced::start_in(&ns, &args, 1);
        Self {
            proxy,
            origin,
            counter,
            dir,
            _dns: dns,
            ns,
        }
    }

    /// The access-log records, once there are `count`.
    fn records(&self, count: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("access.log");
        let read = || -> Vec<serde_json::Value> {
            spliced_tests::complete_lines(&path)
                .iter()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        };
        assert!(
            wait_until(Duration::from_secs(20), || read().len() >= count),
            "{count} records expected:\n{}",
            self.proxy.stderr()
        );
        read()
    }

    fn metrics(&self) -> String {
        self.ns
            .enter(|| spliced_tests::proxy::http_get("127.0.0.1:9090".parse().unwrap(), "/metrics"))
            .expect("GET /metrics")
    }

    /// `openssl s_client` through the proxy to `target` with `sni`; its
    /// output (it sends nothing after the handshake).
    fn s_client(&self, target: &str, sni: &str) -> String {
        let output = self
            .ns
            .command("timeout")
            .args([
                "20", "openssl", "s_client", "-proxy", PROXY, "-connect", target,
            ])
            .args(["-servername", sni, "-brief"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// A raw tunnel to `target`, its `200` read.
    fn tunnel(&self, target: &str) -> TcpStream {
        let target = target.to_owned();
        self.ns.enter(move || {
            let stream = open_tunnel(PROXY.parse().unwrap(), &target);
            stream.set_nodelay(true).unwrap();
            stream
        })
    }

    /// A ClientHello as `openssl s_client` sends it for `sni`, captured.
    fn client_hello(&self, sni: &str) -> Vec<u8> {
        let listener = self.ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let addr = listener.local_addr().unwrap();
        let mut client = self
            .ns
            .command("timeout")
            .args(["5", "openssl", "s_client", "-connect", &addr.to_string()])
            .args(["-servername", sni])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut hello = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            hello.extend_from_slice(&buf[..n]);
        }
        let _ = client.kill();
        let _ = client.wait();
        assert!(hello.len() > 100 && hello[0] == 0x16, "{hello:?}");
        hello
    }
}

fn assert_refused(record: &serde_json::Value, sni: &str, reason: &str) {
    assert_eq!(record["result"], "TCP_DENIED", "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["sni"], sni, "{record}");
    assert!(
        record["end"].as_str().unwrap().starts_with(reason),
        "{record}"
    );
}

/// An allowed SNI is spliced, on every data plane (the packet plane
/// promoting right after the `200`): curl fetches a file through it exactly,
/// and the record names the SNI and the plane.
#[test]
fn an_allowed_name_is_spliced_on_every_plane() {
    for (plane, extra) in [
        ("splice", &[][..]),
        ("copy", &[]),
        ("sockmap", &[]),
        ("packet", &["--promote-after", "0"][..]),
    ] {
        let setup = Setup::start(PEEK_AND_SPLICE, plane, extra);
        let body = setup.origin.serve_random_file("file", 3 << 20);
        let out = setup.dir.path().join("out");
        let output = tls::curl(
            setup.ns.command("curl"),
            &format!("http://{PROXY}"),
            &setup.origin.certificate(),
            &format!("https://allowed.example.com:{ORIGIN_PORT}/file"),
            &out,
        );
        assert!(
            output.status.success(),
            "{plane}: {output:?}\n{}",
            setup.proxy.stderr()
        );
        assert!(
            std::fs::read(&out).unwrap() == body,
            "{plane}: body differs"
        );
        let record = &setup.records(1)[0];
        assert_eq!(record["sni"], "allowed.example.com", "{record}");
        assert_eq!(record["result"], "TCP_TUNNEL", "{record}");
        assert_eq!(record["dataplane"], plane, "{record}");
    }
}

/// A name the rules do not allow is terminated: the connection to the
/// origin carries no byte, the client's handshake fails, and the record and
/// the metric say why.
#[test]
fn a_disallowed_name_is_terminated_before_a_byte_reaches_the_origin() {
    let setup = Setup::start(PEEK_AND_SPLICE, "splice", &[]);
    let output = setup.s_client(&format!("127.0.0.1:{COUNTER_PORT}"), "other.org");
    assert!(!output.contains("Protocol version"), "{output}");
    assert_eq!(setup.counter.next(), b"");
    let record = &setup.records(1)[0];
    assert_refused(record, "other.org", "terminate");
    assert!(
        record["end"]
            .as_str()
            .unwrap()
            .contains("ssl_bump terminate all"),
        "{record}"
    );
    assert!(setup
        .metrics()
        .contains("spliced_tls_refusals_total{reason=\"terminate\"} 1"));
}

/// Domain fronting: `CONNECT allowed` carrying another (also allowed) name's
/// TLS is refused under `sni_must_match_connect exact`, while the same names
/// in agreement pass; `same_dstdomain` lets two names of one `dstdomain`
/// entry pass.
#[test]
fn another_names_tls_in_an_allowed_tunnel_is_refused() {
    let exact = format!("{PEEK_AND_SPLICE}sni_must_match_connect exact\n");
    let setup = Setup::start(&exact, "splice", &[]);
    let output = setup.s_client(
        &format!("allowed.example.com:{ORIGIN_PORT}"),
        "allowed.example.com",
    );
    assert!(output.contains("Protocol version"), "{output}");
    setup.s_client(
        &format!("allowed.example.com:{COUNTER_PORT}"),
        "www.example.com",
    );
    assert_eq!(setup.counter.next(), b"");
    let records = setup.records(2);
    assert_eq!(records[0]["result"], "TCP_TUNNEL", "{}", records[0]);
    assert_refused(&records[1], "www.example.com", "sni_mismatch");
    assert!(setup
        .metrics()
        .contains("spliced_tls_refusals_total{reason=\"sni_mismatch\"} 1"));
    drop(setup);

    let same = "acl ours dstdomain .example.com\nsni_must_match_connect same_dstdomain\n";
    let setup = Setup::start(same, "splice", &[]);
    let output = setup.s_client(
        &format!("www.example.com:{ORIGIN_PORT}"),
        "allowed.example.com",
    );
    assert!(output.contains("Protocol version"), "{output}");
    setup.s_client(&format!("www.example.com:{COUNTER_PORT}"), "other.org");
    assert_eq!(setup.counter.next(), b"");
    assert_refused(&setup.records(2)[1], "other.org", "sni_mismatch");
}

/// A ClientHello written one byte at a time (each its own segment) is read
/// whole, judged, and forwarded unchanged.
#[test]
fn a_client_hello_in_one_byte_segments_is_read_whole() {
    let setup = Setup::start(PEEK_AND_SPLICE, "splice", &[]);
    let hello = setup.client_hello("www.example.com");
    let mut stream = setup.tunnel(&format!("127.0.0.1:{COUNTER_PORT}"));
    for byte in &hello {
        stream.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(setup.counter.next(), hello);
    let record = &setup.records(1)[0];
    assert_eq!(record["sni"], "www.example.com", "{record}");
    assert_eq!(record["bytes_from_client"], hello.len(), "{record}");
}

/// Bytes that are not TLS under a peek rule: closed (`on_unsupported_protocol
/// respond`, the default), or spliced with `on_unsupported_protocol tunnel`.
#[test]
fn a_tunnel_that_does_not_start_with_tls_follows_on_unsupported_protocol() {
    const GARBAGE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let setup = Setup::start(PEEK_AND_SPLICE, "splice", &[]);
    let mut stream = setup.tunnel(&format!("127.0.0.1:{COUNTER_PORT}"));
    stream.write_all(GARBAGE).unwrap();
    let mut rest = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(setup.counter.next(), b"");
    let record = &setup.records(1)[0];
    assert_eq!(
        record["end"].as_str().unwrap().split(':').next(),
        Some("not_tls")
    );
    drop(setup);

    let tunnel = format!("{PEEK_AND_SPLICE}on_unsupported_protocol tunnel all\n");
    let setup = Setup::start(&tunnel, "splice", &[]);
    let mut stream = setup.tunnel(&format!("127.0.0.1:{COUNTER_PORT}"));
    stream.write_all(GARBAGE).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(setup.counter.next(), GARBAGE);
    assert_eq!(setup.records(1)[0]["result"], "TCP_TUNNEL");
}

/// A ClientHello that stops halfway is given `request_timeout` (2 s here),
/// then the tunnel is closed without a byte upstream.
#[test]
fn a_client_hello_that_stops_halfway_times_out() {
    let conf = format!("{PEEK_AND_SPLICE}request_timeout 2 seconds\n");
    let setup = Setup::start(&conf, "splice", &[]);
    let hello = setup.client_hello("www.example.com");
    let mut stream = setup.tunnel(&format!("127.0.0.1:{COUNTER_PORT}"));
    stream.write_all(&hello[..hello.len() / 2]).unwrap();
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    assert_eq!(setup.counter.next(), b"");
    let record = &setup.records(1)[0];
    assert_eq!(
        record["end"].as_str().unwrap().split(':').next(),
        Some("timeout")
    );
}

/// Without peek rules nothing is read: a tunnel carrying anything is spliced
/// at once and its record has no `sni`.
#[test]
fn without_peek_rules_tunnels_are_not_read() {
    let setup = Setup::start("", "splice", &[]);
    let mut stream = setup.tunnel(&format!("127.0.0.1:{COUNTER_PORT}"));
    stream.write_all(b"not tls").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(setup.counter.next(), b"not tls");
    let record = &setup.records(1)[0];
    assert!(record.get("sni").is_none(), "{record}");
}

/// `bump` is refused at start-up with the file and line, saying spliced never
/// decrypts.
#[test]
fn bump_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("squid.conf");
    std::fs::write(&file, "http_port 127.0.0.1:3128\nssl_bump bump all\n").unwrap();
    let output = spliced_tests::daemon::check_config(&file);
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("squid.conf:2"), "{text}");
    assert!(text.contains("needs decryption"), "{text}");
}
