//! The policy cannot be dodged by spelling: numeric shorthands, hex, IPv4-mapped
//! IPv6, trailing dots, mixed case, non-ASCII names and userinfo either get a 400
//! or are judged on what they really mean.
//!
//! Nor by DNS: with the proxy's resolver a scripted [`DnsStub`], names that
//! answer an allowed upstream on one lookup and loopback, a denied `dst` range
//! or the proxy's own sockets on the next (DNS rebinding), or all of these in one
//! answer, are judged on the address actually connected to — each request costs
//! one lookup — and never reach the denied address.

use std::{
    io::{ErrorKind, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use spliced_tests::{
    dns::{self, Query, Reply, A, AAAA},
    netns::Netns,
    open_tunnel, raw_request, status_of,
    upstream::{exchange, Header},
    DnsStub, Mode, Proxy, Upstream,
};

/// A proxy in a namespace of its own whose policy denies loopback destinations
/// and one domain, with an upstream on 127.0.0.1:443 inside the namespace.
struct Site {
    ns: Netns,
    proxy: Proxy,
    _upstream: Upstream,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let ns = Netns::new();
    // Names the namespace's resolver knows, all pointing at loopback.
    std::fs::write(
        format!("/etc/netns/{}/hosts", ns.name),
        "127.0.0.1 localhost\n127.0.0.1 blocked.test www.blocked.test\n",
    )
    .unwrap();
    let upstream = Upstream::start_in(&ns, "127.0.0.1:443".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    let mut file = std::fs::File::create(&conf).unwrap();
    write!(
        file,
        "acl SSL_ports port 443\n\
         acl blocked dstdomain .blocked.test\n\
         http_access deny !SSL_ports\n\
         http_access deny blocked\n\
         http_access deny to_localhost\n\
         http_access allow all\n"
    )
    .unwrap();
    let proxy = Proxy::start_in(&ns, &["-f", conf.to_str().unwrap(), "--log-format", "json"]);
    Site {
        ns,
        proxy,
        _upstream: upstream,
        _dir: dir,
    }
}

impl Site {
    fn status(&self, target: &str) -> u16 {
        let proxy = self.proxy.addr;
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let answer = self
            .ns
            .enter(move || raw_request(proxy, request.as_bytes()));
        status_of(&answer)
    }
}

#[test]
fn spellings_of_loopback_and_denied_names_do_not_get_through() {
    let site = site();
    let cases = [
        // Not an address and not a name: rejected before any lookup.
        ("127.1:443", 400),
        ("0x7f.0.0.1:443", 400),
        ("0177.0.0.1:443", 400),
        ("2130706433:443", 400),
        ("127.000.000.001:443", 400),
        ("user@127.0.0.1:443", 400),
        ("user:pass@blocked.test:443", 400),
        ("bl\u{f6}cked.test:443", 400),
        ("blocked.test%2e:443", 400),
        // Real addresses and names, judged by the policy on what they mean.
        ("127.0.0.1:443", 403),
        ("127.0.0.2:443", 403),
        ("[::1]:443", 403),
        ("[::ffff:127.0.0.1]:443", 403),
        ("[0:0:0:0:0:ffff:7f00:1]:443", 403),
        ("localhost:443", 403),
        ("LOCALHOST.:443", 403),
        ("blocked.test:443", 403),
        ("BLOCKED.test.:443", 403),
        ("www.Blocked.TEST:443", 403),
        ("0.0.0.0:443", 403),
    ];
    let mut wrong = Vec::new();
    for (target, expected) in cases {
        let got = site.status(target);
        if got != expected {
            wrong.push(format!("{target}: {got}, expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", site.proxy.stderr());
}

/// Plain-HTTP requests (forwarded since issue 14) are judged like CONNECT:
/// `to_localhost` denies `http://127.0.0.1:443/` whatever the method, and
/// nothing reaches the upstream.
#[test]
fn plain_requests_are_judged_like_connect() {
    let site = site();
    for method in ["GET", "POST", "PUT", "OPTIONS", "connect", "TRACE"] {
        let proxy = site.proxy.addr;
        let request =
            format!("{method} http://127.0.0.1:443/ HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n");
        let answer = site
            .ns
            .enter(move || raw_request(proxy, request.as_bytes()));
        assert_eq!(status_of(&answer), 403, "{method}: {answer}");
    }
    // None of them opened a connection: every record has no upstream.
    let records = site.proxy.wait_json_records(6);
    assert!(
        records.iter().all(|r| r["upstream"].is_null()),
        "{records:#?}"
    );
}

/// The proxy cannot be made to connect to its own listening or admin sockets,
/// however the target is spelled.
#[test]
fn tunnels_never_lead_back_into_the_proxy() {
    let ns = Netns::new();
    std::fs::write(
        format!("/etc/netns/{}/hosts", ns.name),
        "127.0.0.1 localhost me.test\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    std::fs::write(&conf, "http_access allow all\n").unwrap();
    let proxy = Proxy::start_in(
        &ns,
        &[
            "-f",
            conf.to_str().unwrap(),
            "--listen",
            "0.0.0.0:3128",
            "--admin",
            "127.0.0.1:9090",
            "--log-format",
            "json",
        ],
    );
    let status = |target: String| {
        let request = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let proxy = proxy.addr;
        status_of(&ns.enter(move || raw_request(proxy, request.as_bytes())))
    };
    for target in [
        "127.0.0.1:3128",
        "127.0.0.5:3128",
        "[::ffff:127.0.0.1]:3128",
        "0.0.0.0:3128",
        "localhost:3128",
        "me.test:3128",
        "127.0.0.1:9090",
        "me.test:9090",
        // connect(2) takes the unspecified address for loopback, where the admin
        // socket listens.
        "0.0.0.0:9090",
        "[::ffff:0.0.0.0]:9090",
    ] {
        assert_eq!(status(target.into()), 403, "{target}\n{}", proxy.stderr());
    }
    let records = proxy.wait_json_records(10);
    assert!(
        records
            .iter()
            .all(|r| r["end"].as_str().unwrap().contains("forwarding loop")),
        "{records:#?}"
    );
}

/// The proxy's side of the link to the upstream host.
const PROXY_SIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
/// The upstream host's address on the link: the address every policy here allows.
const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 200);
/// A second address of the upstream host (on its loopback), inside
/// [`INTERNAL_RANGE`].
const INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
/// The range the `dst` policy denies (it holds [`PROXY_SIDE`] too).
const INTERNAL_RANGE: &str = "10.77.2.0/25";
/// 127.0.0.1 as an [`IpAddr`].
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// ::1 as an [`IpAddr`].
const LOOPBACK6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// `v4` as an IPv4-mapped IPv6 address (what an AAAA record can hold).
fn mapped(v4: Ipv4Addr) -> IpAddr {
    IpAddr::V6(v4.to_ipv6_mapped())
}

/// A listener where no connection may ever arrive.
struct Sentinel {
    at: String,
    listener: TcpListener,
}

impl Sentinel {
    /// Listens on `addr` inside `ns`; an IPv6 unspecified address takes IPv4
    /// too, so `[::]:PORT` catches every local address of the namespace.
    fn bind(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.enter(move || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            if addr.is_ipv6() {
                socket.set_only_v6(false).unwrap();
            }
            socket.bind(&addr.into()).expect("bind sentinel");
            socket.listen(128).unwrap();
            socket.set_nonblocking(true).unwrap();
            TcpListener::from(socket)
        });
        Self {
            at: format!("{addr} in {}", ns.name),
            listener,
        }
    }

    /// Fails the test if anything connected (even if it left again: a finished
    /// handshake waits in the accept queue).
    fn assert_untouched(&self) {
        match self.listener.accept() {
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the proxy connected to {}: {other:?}", self.at),
        }
    }
}

/// A proxy host joined to an upstream host, the proxy's resolver a scripted
/// [`DnsStub`]: names can answer the upstream on one lookup and anything else
/// on the next. Clients run in the proxy host.
struct Rebinding {
    proxy_host: Netns,
    _upstream_host: Netns,
    /// The exchange server on [`ALLOWED`].
    upstream: Upstream,
    stub: DnsStub,
    proxy: Proxy,
    /// Where clients connect to the proxy.
    proxy_addr: SocketAddr,
    sentinels: Vec<Sentinel>,
    next_seed: u64,
    _dir: tempfile::TempDir,
}

impl Rebinding {
    /// The two hosts, the upstream on [`ALLOWED`]:`port` (0: any), the DNS
    /// stub running `script`, then (when `sentinels`) listeners on every local
    /// address of the proxy host and on [`INTERNAL`] at the upstream's port,
    /// then the proxy with `conf` as its squid.conf and `args`.
    fn start(
        port: u16,
        sentinels: bool,
        conf: &str,
        args: &[&str],
        script: impl FnMut(&Query) -> Reply + Send + 'static,
    ) -> Self {
        let (proxy_host, upstream_host) = (Netns::new(), Netns::new());
        proxy_host.link(&upstream_host, PROXY_SIDE, ALLOWED);
        upstream_host.ip(&["addr", "add", &format!("{INTERNAL}/32"), "dev", "lo"]);
        // One query of each type per lookup, and time enough for a busy machine.
        std::fs::write(
            format!("/etc/netns/{}/resolv.conf", proxy_host.name),
            "nameserver 127.0.0.1\noptions timeout:5 attempts:1\n",
        )
        .unwrap();
        let upstream = Upstream::start_in(&upstream_host, SocketAddr::from((ALLOWED, port)));
        let port = upstream.addr.port();
        let sentinels = if sentinels {
            // Bound before the proxy starts, so that it cannot take the port.
            vec![
                Sentinel::bind(&proxy_host, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
                Sentinel::bind(&upstream_host, SocketAddr::from((INTERNAL, port))),
            ]
        } else {
            Vec::new()
        };
        let stub = DnsStub::start(&proxy_host, script);
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut all = vec!["-f", conf_path.to_str().unwrap(), "--log-format", "json"];
        all.extend_from_slice(args);
        let proxy = Proxy::start_in(&proxy_host, &all);
        let proxy_addr = if proxy.addr.ip().is_unspecified() {
            SocketAddr::new(LOOPBACK, proxy.addr.port())
        } else {
            proxy.addr
        };
        Self {
            proxy_host,
            _upstream_host: upstream_host,
            upstream,
            stub,
            proxy,
            proxy_addr,
            sentinels,
            next_seed: 1,
            _dir: dir,
        }
    }

    /// The port the upstream listens on.
    fn port(&self) -> u16 {
        self.upstream.addr.port()
    }

    /// Sends `CONNECT target` from the proxy host; returns the whole answer.
    fn connect(&self, target: &str) -> String {
        let (proxy, request) = (
            self.proxy_addr,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        );
        self.proxy_host
            .enter(move || raw_request(proxy, request.as_bytes()))
    }

    /// The A and AAAA queries for `name` the stub has had so far.
    fn lookups(&self, name: &str) -> (usize, usize) {
        (self.stub.asked(name, A), self.stub.asked(name, AAAA))
    }

    /// Fails the test unless the stub had exactly one more lookup of `name`
    /// (one A and one AAAA query) than `before`.
    fn assert_one_lookup(&self, name: &str, before: (usize, usize), what: &str) {
        assert_eq!(
            self.lookups(name),
            (before.0 + 1, before.1 + 1),
            "{what} was not decided and connected on exactly one lookup of {name}: {:#?}",
            self.stub.queries()
        );
    }

    /// Opens a tunnel to `name` at the upstream's port and checks that it cost
    /// one lookup, reached the upstream and moves a few KiB each way byte-exact.
    fn tunnel(&mut self, name: &str) {
        let header = Header {
            up: 40_000,
            down: 70_000,
            seed: self.next_seed,
            mode: Mode::Concurrent,
        };
        self.next_seed += 2;
        let target = format!("{name}:{}", self.port());
        let before = self.lookups(name);
        let proxy = self.proxy_addr;
        let tunnel = self.proxy_host.enter(move || open_tunnel(proxy, &target));
        // The 200 comes after the upstream connection: all lookups and connects
        // of this request are done.
        self.assert_one_lookup(name, before, "the tunnel");
        self.assert_sentinels_untouched();
        let client = exchange(tunnel, header, false);
        let server = self.upstream.result();
        assert_eq!(client.received, Ok(header.down), "client side");
        assert_eq!(
            server.seed, header.seed,
            "another tunnel reached the upstream"
        );
        assert_eq!(server.received, Ok(header.up), "upstream side");
    }

    /// The addresses the proxy host's resolver gives for `name`, in the order
    /// the proxy tries them: getaddrinfo with the same hints as Rust's standard
    /// library (any family, SOCK_STREAM, no flags), run inside the namespace so
    /// that it asks the stub.
    fn resolver_order(&self, name: &str) -> Vec<IpAddr> {
        let script = "import socket, sys\n\
                      for ai in socket.getaddrinfo(sys.argv[1], 443, 0, socket.SOCK_STREAM):\n    \
                      print(ai[4][0])\n";
        let output = self
            .proxy_host
            .command("python3")
            .args(["-c", script, name])
            .output()
            .expect("python3 (Debian package python3) must be installed");
        assert!(
            output.status.success(),
            "getaddrinfo({name}) failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.parse().expect("an address"))
            .collect()
    }

    /// Fails the test if any sentinel got a connection.
    fn assert_sentinels_untouched(&self) {
        for sentinel in &self.sentinels {
            sentinel.assert_untouched();
        }
    }

    /// Checks the access log: exactly `tunnels` tunnels, each to the upstream,
    /// and `refusals` 403s that name `why` and connected nowhere. Records are
    /// written when a transaction ends, so a tunnel's may come after later
    /// refusals; a connection into the proxy would add a record of its own.
    fn assert_records(&self, tunnels: usize, refusals: usize, why: &str) {
        let records = self.proxy.wait_json_records(tunnels + refusals);
        std::thread::sleep(Duration::from_millis(300));
        let lines = self.proxy.access_lines();
        assert_eq!(lines.len(), tunnels + refusals, "records: {lines:#?}");
        let upstream = format!("{ALLOWED}:{}", self.port());
        let (opened, refused): (Vec<_>, Vec<_>) =
            records.iter().partition(|record| record["status"] == 200);
        assert_eq!(opened.len(), tunnels, "records: {lines:#?}");
        for record in opened {
            assert_eq!(record["upstream"], upstream.as_str(), "{record}");
        }
        for record in refused {
            assert_eq!(record["status"], 403, "{record}");
            assert!(record["upstream"].is_null(), "{record}");
            assert!(record["end"].as_str().unwrap().contains(why), "{record}");
        }
    }
}

/// Asks `site` for `CONNECT name:port` once per entry of `lookups` after the
/// first (which the caller tunnels through), each answered by the next lookup:
/// every one must get 403 and cost exactly one lookup.
fn assert_each_lookup_denied(site: &Rebinding, name: &str, lookups: &[Vec<IpAddr>]) {
    let target = format!("{name}:{}", site.port());
    for (n, answer) in lookups.iter().enumerate().skip(1) {
        let before = site.lookups(name);
        let reply = site.connect(&target);
        assert_eq!(
            status_of(&reply),
            403,
            "lookup {n} answered {answer:?}: {reply}\n{}",
            site.proxy.stderr()
        );
        site.assert_one_lookup(name, before, &format!("request {n}"));
    }
}

/// A name answers an allowed upstream on its first lookup, then loopback in
/// every spelling: the tunnel opened on the first answer moves bytes, every
/// later CONNECT gets 403, and nothing ever connects to the loopback listener.
/// Each request costs exactly one lookup, so the address judged is the address
/// connected to (a second lookup for the connection would get loopback).
#[test]
fn dns_rebinding_to_loopback_is_judged_on_the_address_connected_to() {
    let lookups: Vec<Vec<IpAddr>> = vec![
        vec![ALLOWED.into()],
        vec![LOOPBACK],
        vec![LOOPBACK6],
        vec![LOOPBACK, LOOPBACK6],
        vec![mapped(Ipv4Addr::LOCALHOST)],
        vec![Ipv4Addr::new(127, 0, 0, 2).into()],
        vec![Ipv4Addr::UNSPECIFIED.into()],
        vec![Ipv6Addr::UNSPECIFIED.into()],
    ];
    let mixed = vec![LOOPBACK, LOOPBACK6, ALLOWED.into()];
    let mut rebind = dns::in_turn("rebind.test", lookups.clone());
    let answer_mixed = mixed.clone();
    let mut site = Rebinding::start(
        0,
        true,
        "http_access deny to_localhost\nhttp_access allow all\n",
        &[],
        move |query| {
            if query.is_for("mixed.test") {
                Reply::Addresses(answer_mixed.clone())
            } else {
                rebind(query)
            }
        },
    );

    // The first lookup answers the upstream: a tunnel, on one lookup.
    site.tunnel("rebind.test");
    // Every later lookup answers loopback.
    assert_each_lookup_denied(&site, "rebind.test", &lookups);
    site.assert_sentinels_untouched();

    // One answer with loopback first and the upstream last: only the upstream.
    let order = site.resolver_order("mixed.test");
    assert!(
        order.len() == mixed.len() && order[0] != IpAddr::from(ALLOWED),
        "the resolver must put a loopback address first for this test: {order:?}"
    );
    site.tunnel("mixed.test");
    site.assert_sentinels_untouched();

    site.assert_records(2, lookups.len() - 1, "http_access deny to_localhost");
}

/// The same with a policy that denies a `dst` range the upstream host also
/// has an address in: later lookups answer that address (or the proxy's own,
/// also in the range) and must be refused without a connection attempt.
#[test]
fn dns_rebinding_into_a_denied_dst_range_is_judged_on_the_address_connected_to() {
    let lookups: Vec<Vec<IpAddr>> = vec![
        vec![ALLOWED.into()],
        vec![INTERNAL.into()],
        vec![mapped(INTERNAL)],
        vec![INTERNAL.into(), mapped(INTERNAL)],
        // Nobody has this one: a connection attempt would end in 502 or 504.
        vec![Ipv4Addr::new(10, 77, 2, 5).into()],
        vec![PROXY_SIDE.into()],
    ];
    let mixed = vec![INTERNAL.into(), ALLOWED.into()];
    let mut rebind = dns::in_turn("rebind.test", lookups.clone());
    let answer_mixed = mixed.clone();
    let mut site = Rebinding::start(
        0,
        true,
        &format!(
            "acl internal dst {INTERNAL_RANGE}\nhttp_access deny internal\nhttp_access allow all\n"
        ),
        &[],
        move |query| {
            if query.is_for("mixed.test") {
                Reply::Addresses(answer_mixed.clone())
            } else {
                rebind(query)
            }
        },
    );

    site.tunnel("rebind.test");
    assert_each_lookup_denied(&site, "rebind.test", &lookups);
    site.assert_sentinels_untouched();

    let order = site.resolver_order("mixed.test");
    assert_eq!(
        order, mixed,
        "the resolver must put the denied address first for this test"
    );
    site.tunnel("mixed.test");
    site.assert_sentinels_untouched();

    site.assert_records(2, lookups.len() - 1, "http_access deny internal");
}

/// Names whose lookups answer the proxy's own addresses — after a first
/// answer that was a real upstream, in a mixed answer, or as the unspecified
/// address (which connect(2) takes for loopback) — never lead into the proxy's
/// listening or admin sockets, bound here to specific addresses. The policy
/// allows everything: only the loop guard stands in the way.
#[test]
fn dns_answers_naming_the_proxy_itself_are_refused() {
    const PORT: u16 = 3128;
    const ADMIN: u16 = 9090;
    // (port asked for, what that request's lookup answers)
    let requests: Vec<(u16, Vec<IpAddr>)> = vec![
        (PORT, vec![ALLOWED.into()]),
        (PORT, vec![LOOPBACK]),
        (PORT, vec![LOOPBACK6]),
        (PORT, vec![PROXY_SIDE.into()]),
        (PORT, vec![mapped(PROXY_SIDE)]),
        (PORT, vec![Ipv4Addr::UNSPECIFIED.into()]),
        (PORT, vec![Ipv6Addr::UNSPECIFIED.into()]),
        (PORT, vec![mapped(Ipv4Addr::UNSPECIFIED)]),
        (ADMIN, vec![LOOPBACK]),
        (ADMIN, vec![mapped(Ipv4Addr::LOCALHOST)]),
        (ADMIN, vec![Ipv4Addr::UNSPECIFIED.into()]),
        (ADMIN, vec![mapped(Ipv4Addr::UNSPECIFIED)]),
    ];
    let lookups: Vec<Vec<IpAddr>> = requests.iter().map(|(_, answer)| answer.clone()).collect();
    let mixed = vec![PROXY_SIDE.into(), ALLOWED.into()];
    let mut rebind = dns::in_turn("loop.test", lookups);
    let answer_mixed = mixed.clone();
    let listen = [
        format!("127.0.0.1:{PORT}"),
        format!("[::1]:{PORT}"),
        format!("{PROXY_SIDE}:{PORT}"),
    ];
    let admin = format!("127.0.0.1:{ADMIN}");
    let mut site = Rebinding::start(
        PORT,
        false,
        "http_access allow all\n",
        &[
            "--listen", &listen[0], "--listen", &listen[1], "--listen", &listen[2], "--admin",
            &admin,
        ],
        move |query| {
            if query.is_for("mixed.test") {
                Reply::Addresses(answer_mixed.clone())
            } else {
                rebind(query)
            }
        },
    );

    site.tunnel("loop.test");
    for (n, (port, answer)) in requests.iter().enumerate().skip(1) {
        let before = site.lookups("loop.test");
        let reply = site.connect(&format!("loop.test:{port}"));
        assert_eq!(
            status_of(&reply),
            403,
            "lookup {n} answered {answer:?} for port {port}: {reply}\n{}",
            site.proxy.stderr()
        );
        site.assert_one_lookup("loop.test", before, &format!("request {n}"));
    }

    // The proxy's own address first, the upstream second: only the upstream.
    assert_eq!(
        site.resolver_order("mixed.test"),
        mixed,
        "the resolver must put the proxy's address first for this test"
    );
    site.tunnel("mixed.test");

    site.assert_records(2, requests.len() - 1, "forwarding loop");
}
