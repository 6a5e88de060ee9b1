//! Name resolution through the configured resolver: spliced in a namespace of
//! the test's, pointed by `dns_nameservers` at a scripted [`DnsStub`] on
//! 127.0.0.2:53 (the namespace's resolv.conf names 127.0.0.1, where nothing
//! listens, so an answer proves `dns_nameservers` was used). Names answer A
//! only, AAAA only, both with the IPv6 address black-holed (an nftables rule
//! drops its SYNs: Happy Eyeballs must connect over IPv4 long before the
//! connect timeout), NXDOMAIN, SERVFAIL, no records, or nothing at all; each
//! outcome is checked in the answer, the access log and `/metrics`. A herd of
//! tunnels to one name sends one query.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use spliced_tests::{
    dns::{Reply, A, AAAA},
    netns::{enter_named, Netns},
    proxy::http_get,
    status_of, wait_until, DnsStub, Proxy,
};

/// Where the stub listens (all of 127/8 is the namespace's own); `dns_nameservers` names it.
const DNS_SERVER: &str = "127.0.0.2";
/// An address of the namespace whose TCP SYNs are dropped.
const BLACK_HOLE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xbeef, 0, 0, 0, 0, 0, 2);
/// Every per-attempt connect timeout of these tests: far above what a tunnel
/// that Happy Eyeballs opens should take.
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// The stub's answers.
fn script(query: &spliced_tests::dns::Query) -> Reply {
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    let name = query.name.to_ascii_lowercase();
    match name.as_str() {
        "a4.test" => Reply::Addresses(vec![v4]),
        "a6.test" => Reply::Addresses(vec![v6]),
        "dual.test" => Reply::Addresses(vec![v4, IpAddr::V6(BLACK_HOLE)]),
        "servfail.test" => Reply::ServFail,
        "empty.test" => Reply::Addresses(Vec::new()),
        "long.test" => Reply::Ttl(3600, vec![v4]),
        "short.test" => Reply::Ttl(2, vec![v4]),
        name if name.starts_with("silent") => Reply::Silence,
        _ => Reply::NxDomain,
    }
}

/// A namespace with the stub, two upstreams (127.0.0.1 and ::1) and the black hole.
struct Host {
    ns: Netns,
    stub: DnsStub,
    port4: u16,
    port6: u16,
    dir: tempfile::TempDir,
}

/// The longest an upstream of these tests accepts connections.
const UPSTREAM_LIFETIME: Duration = Duration::from_secs(180);

/// Accepts on `listener` and closes each connection at once (so each tunnel
/// ends and is logged), for [`UPSTREAM_LIFETIME`]; returns its port.
fn closing_upstream(listener: TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + UPSTREAM_LIFETIME;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => drop(stream),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    port
}

impl Host {
    fn new() -> Self {
        let ns = Netns::with_prefix("dns");
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{BLACK_HOLE}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        let nft = |args: &[&str]| {
            let output = ns
                .command("nft")
                .args(args)
                .output()
                .expect("nft (Debian nftables) must be installed: cargo xtask prereq");
            assert!(
                output.status.success(),
                "nft {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        nft(&["add", "table", "ip6", "blackhole"]);
        nft(&[
            "add",
            "chain",
            "ip6",
            "blackhole",
            "input",
            "{ type filter hook input priority 0; }",
        ]);
        nft(&[
            "add",
            "rule",
            "ip6",
            "blackhole",
            "input",
            "ip6",
            "daddr",
            &BLACK_HOLE.to_string(),
            "tcp",
            "flags",
            "syn",
            "drop",
        ]);
        let stub = DnsStub::start_on(&ns, DNS_SERVER.parse().unwrap(), script);
        let v4 = ns.enter(|| TcpListener::bind("127.0.0.1:0").expect("bind v4 upstream"));
        let v6 = ns.enter(|| TcpListener::bind("[::1]:0").expect("bind v6 upstream"));
        Self {
            ns,
            stub,
            port4: closing_upstream(v4),
            port6: closing_upstream(v6),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes the squid.conf: `conf` after `http_access allow all`, the stub
    /// as `dns_nameservers` and the connect timeout.
    fn proxy_conf(&self, conf: &str) -> PathBuf {
        self.file(
            "squid.conf",
            &format!(
                "http_access allow all\ndns_nameservers {DNS_SERVER}\n\
                 connect_timeout {CONNECT_TIMEOUT_SECS} seconds\n{conf}"
            ),
        )
    }

    /// Starts spliced in the namespace with [`Host::proxy_conf`]`(conf)`.
    fn proxy(&self, conf: &str, args: &[&str]) -> Proxy {
        let file = self.proxy_conf(conf);
        let mut all = vec!["-f", file.to_str().unwrap(), "--admin", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Proxy::start_in(&self.ns, &all)
    }

    /// A file in the test's directory with `text`.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

/// Sends `CONNECT target` from inside the proxy's namespace; returns the
/// status and how long the answer took. The tunnel is closed at once.
fn connect(host: &Host, proxy: &Proxy, target: &str) -> (u16, Duration) {
    let (addr, target) = (proxy.addr, target.to_owned());
    enter_named(&host.ns.name, move || {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).expect("connect to proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            stream,
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        (
            status_of(&String::from_utf8_lossy(&head)),
            started.elapsed(),
        )
    })
}

/// The value of the `/metrics` series `series` (name with labels), 0 if absent.
fn metric(host: &Host, proxy: &Proxy, series: &str) -> u64 {
    let admin = proxy.admin_addr().expect("admin listener");
    let text = enter_named(&host.ns.name, move || http_get(admin, "/metrics"))
        .unwrap_or_else(|err| panic!("GET /metrics: {err}"));
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .map_or(0, |value| value as u64)
}

fn failures(host: &Host, proxy: &Proxy, kind: &str) -> u64 {
    metric(
        host,
        proxy,
        &format!("spliced_dns_failures_total{{kind=\"{kind}\"}}"),
    )
}

#[test]
fn names_resolve_through_dns_nameservers_with_happy_eyeballs() {
    let host = Host::new();
    let hosts_file = host.file("hosts", "127.0.0.1 static.test\n");
    let proxy = host.proxy(
        &format!("hosts_file {}\n", hosts_file.display()),
        &["--log-format", "json"],
    );
    let (p4, p6) = (host.port4, host.port6);
    let mut records = 0;
    let mut next_record = || {
        records += 1;
        proxy.wait_json_records(records).pop().unwrap()
    };

    // A only, AAAA only: the one family there is.
    for (target, upstream) in [
        (format!("a4.test:{p4}"), format!("127.0.0.1:{p4}")),
        (format!("a6.test:{p6}"), format!("[::1]:{p6}")),
    ] {
        assert_eq!(connect(&host, &proxy, &target).0, 200, "{target}");
        let record = next_record();
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["upstream"], upstream.as_str(), "{record}");
    }

    // Both, the IPv6 address black-holed: IPv6 is tried first, IPv4 one
    // happy_eyeballs_connect_timeout (250 ms) later, far under the connect timeout.
    let target = format!("dual.test:{p4}");
    let (status, took) = connect(&host, &proxy, &target);
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_millis(240) && took < Duration::from_secs(CONNECT_TIMEOUT_SECS / 4),
        "the tunnel took {took:?}: IPv6 first, then IPv4 after 250 ms"
    );
    let record = next_record();
    assert_eq!(record["upstream"], format!("127.0.0.1:{p4}").as_str());
    assert_eq!(host.stub.asked("dual.test", AAAA), 1);
    assert_eq!(host.stub.asked("dual.test", A), 1);

    // Names that give no address: 503, and the log says why.
    for (name, reason, kind) in [
        ("nx.test", "NXDOMAIN", "nxdomain"),
        ("servfail.test", "SERVFAIL", "servfail"),
        ("empty.test", "no address records", "no_records"),
    ] {
        let before = failures(&host, &proxy, kind);
        let target = format!("{name}:{p4}");
        assert_eq!(connect(&host, &proxy, &target).0, 503, "{target}");
        let record = next_record();
        assert_eq!(record["status"], 503, "{record}");
        assert!(record["upstream"].is_null(), "{record}");
        let end = record["end"].as_str().unwrap_or_default();
        assert!(end.contains(reason), "{name}: {record}");
        assert_eq!(failures(&host, &proxy, kind), before + 1, "{kind}");
    }

    // hosts_file names and IP literals never reach the DNS server.
    let asked = host.stub.queries().len();
    for target in [format!("static.test:{p4}"), format!("127.0.0.1:{p4}")] {
        assert_eq!(connect(&host, &proxy, &target).0, 200, "{target}");
        let record = next_record();
        assert_eq!(record["upstream"], format!("127.0.0.1:{p4}").as_str());
    }
    assert_eq!(
        host.stub.queries().len(),
        asked,
        "{:?}",
        host.stub.queries()
    );
    // a4, a6, dual, nx, servfail, empty, static.test: lookups; the literal is not.
    assert_eq!(metric(&host, &proxy, "spliced_dns_lookups_total"), 7);
}

#[test]
fn answers_are_cached_for_their_ttl_and_failures_for_negative_dns_ttl() {
    let host = Host::new();
    let proxy = host.proxy(
        "positive_dns_ttl 6 seconds\nnegative_dns_ttl 3 seconds\n",
        &[],
    );
    let p4 = host.port4;
    let ask_all = |expect: &[(&str, usize)]| {
        for (name, _) in expect {
            let status = if *name == "nx.test" { 503 } else { 200 };
            let target = format!("{name}:{p4}");
            assert_eq!(connect(&host, &proxy, &target).0, status, "{target}");
        }
        for (name, queries) in expect {
            assert_eq!(host.stub.asked(name, A), *queries, "A queries for {name}");
        }
    };
    let started = Instant::now();
    let names = ["long.test", "short.test", "nx.test"];
    ask_all(&names.map(|name| (name, 1)));
    // At once again: all three from the cache.
    ask_all(&names.map(|name| (name, 1)));
    assert_eq!(metric(&host, &proxy, "spliced_dns_cache_hits_total"), 3);
    assert_eq!(metric(&host, &proxy, "spliced_dns_lookups_total"), 6);
    let first_round = started.elapsed();
    assert!(
        first_round < Duration::from_secs(2),
        "the first two rounds took {first_round:?}: too slow to judge 2 s TTLs"
    );

    // After 3.5 s: short.test's record TTL (2 s) and negative_dns_ttl (3 s)
    // are over; long.test's TTL of an hour is capped by positive_dns_ttl (6 s).
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed()));
    ask_all(&[("long.test", 1), ("short.test", 2), ("nx.test", 2)]);
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(metric(&host, &proxy, "spliced_dns_cache_hits_total"), 4);

    // After 6.5 s positive_dns_ttl ended long.test's entry too.
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(started.elapsed()));
    ask_all(&[("long.test", 2)]);
    assert_eq!(failures(&host, &proxy, "nxdomain"), 3);

    // The Squid log line names the address connected to.
    let lines = proxy.wait_access_lines(10);
    let tunnel = lines
        .iter()
        .find(|line| line.contains("long.test"))
        .expect("a long.test line");
    assert!(
        tunnel.contains("/200 ") && tunnel.contains("HIER_DIRECT/127.0.0.1"),
        "{tunnel}"
    );
}

#[test]
fn a_dead_dns_server_fails_within_dns_timeout_while_ip_targets_open() {
    let host = Host::new();
    let proxy = host.proxy("dns_timeout 2 seconds\n", &[]);
    let p4 = host.port4;
    let dns_timeout = Duration::from_secs(2);
    // Several lookups wait on the dead server at once.
    let waiting: Vec<_> = (0..4)
        .map(|n| {
            let (ns, addr) = (host.ns.name.clone(), proxy.addr);
            std::thread::spawn(move || {
                enter_named(&ns, move || {
                    let started = Instant::now();
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    let target = format!("silent{n}.test:{p4}");
                    write!(stream, "CONNECT {target} HTTP/1.1\r\n\r\n").unwrap();
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer);
                    (status_of(&answer), started.elapsed(), answer)
                })
            })
        })
        .collect();
    // Meanwhile tunnels to an IP target open as fast as ever.
    let started = Instant::now();
    let mut opened = 0;
    while started.elapsed() < dns_timeout - Duration::from_millis(500) && opened < 50 {
        let (status, took) = connect(&host, &proxy, &format!("127.0.0.1:{p4}"));
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "a tunnel took {took:?}");
        opened += 1;
    }
    assert!(opened >= 3, "only {opened} tunnels opened");
    for thread in waiting {
        let (status, took, answer) = thread.join().unwrap();
        assert_eq!(status, 503, "{answer}");
        assert!(
            took >= dns_timeout - Duration::from_millis(200)
                && took < dns_timeout + Duration::from_secs(3),
            "503 after {took:?}"
        );
    }
    assert!(host.stub.asked("silent0.test", A) >= 1);
    assert_eq!(failures(&host, &proxy, "timeout"), 4);
    let lines = proxy.wait_access_lines(opened + 4);
    let timed_out = lines
        .iter()
        .filter(|line| line.contains("/503 ") && line.contains("silent"))
        .count();
    assert_eq!(timed_out, 4, "{lines:#?}");
}

#[test]
fn a_reload_rebuilds_the_resolver_and_its_cache() {
    let host = Host::new();
    let hosts_file = host.file("hosts", "127.0.0.1 moved.test\n");
    let proxy = host.proxy(&format!("hosts_file {}\n", hosts_file.display()), &[]);
    let p4 = host.port4;
    let long = format!("long.test:{p4}");
    assert_eq!(connect(&host, &proxy, &format!("moved.test:{p4}")).0, 200);
    assert_eq!(connect(&host, &proxy, &long).0, 200);
    assert_eq!(connect(&host, &proxy, &long).0, 200);
    assert_eq!(
        host.stub.asked("long.test", A),
        1,
        "cached before the reload"
    );

    // The same file, without the hosts_file line.
    host.proxy_conf("");
    // SAFETY: kill(2) with the pid of our own child and a valid signal.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    let reloaded = wait_until(Duration::from_secs(20), || {
        proxy.logged("configuration reloaded")
    });
    assert!(reloaded, "{}", proxy.stderr());
    assert_eq!(connect(&host, &proxy, &format!("moved.test:{p4}")).0, 503);
    assert_eq!(
        host.stub.asked("moved.test", A),
        1,
        "asked once hosts_file was gone"
    );
    assert_eq!(connect(&host, &proxy, &long).0, 200);
    assert_eq!(
        host.stub.asked("long.test", A),
        2,
        "the new resolver's cache is empty"
    );
}

/// Sends `CONNECT target` from `herd` threads at once; their statuses.
fn herd(host: &Host, proxy: &Proxy, target: &str, herd: usize) -> Vec<u16> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(herd));
    let threads: Vec<_> = (0..herd)
        .map(|_| {
            let (ns, addr, target) = (host.ns.name.clone(), proxy.addr, target.to_owned());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                enter_named(&ns, move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    barrier.wait();
                    write!(stream, "CONNECT {target} HTTP/1.1\r\n\r\n").unwrap();
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer);
                    status_of(&answer)
                })
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn concurrent_lookups_of_one_name_send_one_query() {
    const HERD: usize = 16;
    let host = Host::new();
    let proxy = host.proxy("dns_timeout 2 seconds\n", &[]);
    let p4 = host.port4;
    // A server that never answers: every lookup of the herd overlaps the
    // first one's query, and all share its timeout.
    let started = Instant::now();
    let statuses = herd(&host, &proxy, &format!("silent-herd.test:{p4}"), HERD);
    let took = started.elapsed();
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    assert!(took < Duration::from_secs(5), "the herd took {took:?}");
    assert_eq!(metric(&host, &proxy, "spliced_dns_queries_total"), 1);
    assert_eq!(
        metric(&host, &proxy, "spliced_dns_shared_total"),
        HERD as u64 - 1
    );
    assert_eq!(failures(&host, &proxy, "timeout"), HERD as u64);
    // An answer with a long TTL: asked once, whether the herd shared the
    // query or found the answer cached after it. (An answer without a TTL is
    // not cached: a herd shares only the queries that overlap it.)
    let statuses = herd(&host, &proxy, &format!("long.test:{p4}"), HERD);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(
        host.stub.asked("long.test", A),
        1,
        "{:?}",
        host.stub.queries()
    );
    assert_eq!(metric(&host, &proxy, "spliced_dns_queries_total"), 2);
    assert_eq!(
        metric(&host, &proxy, "spliced_dns_lookups_total"),
        2 * HERD as u64
    );
}
