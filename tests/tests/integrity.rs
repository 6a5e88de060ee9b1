//! Byte-exact integrity of tunnels on every data plane: concurrency, sizes from
//! 0 B to hundreds of MiB, both directions at once, pipelined bytes, a payload and
//! FIN sent before the 200, half-close each way, resets from either side, and
//! access-log byte counts that match what moved.
//!
//! The packet plane runs every case twice: `packet` (`--promote-after 0`; each
//! client waits until its tunnel is promoted before its first byte, so every
//! byte after the `200` goes through the tc program) and `packet_default` (the
//! default `--promote-after`, 1 MiB: a tunnel is promoted in the middle of its
//! transfer, or never). Each record must name the plane its tunnel had to run
//! on, worked out from how the tunnel moves its bytes ([`Promotion`]); a case
//! never accepts either plane. The packet plane attaches its programs to every
//! interface of its network namespace, so its proxies, upstreams and clients
//! run in namespaces of the test's own: on their `lo`, or three joined by veth,
//! IPv4 and IPv6.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use spliced_tests::{
    expect_connect_ok,
    netns::{self, Netns, Topology},
    open_tunnel,
    upstream::{exchange_with, header, ClientResult, Header, SPLICE_GRACE},
    wait_until, Mode, Proxy, ServerResult, Upstream, IO_TIMEOUT,
};

const MIB: u64 = 1 << 20;
/// spliced's `DEFAULT_PROMOTE_AFTER`: `packet_default` promotes a tunnel once
/// it has moved this much (both directions together).
const DEFAULT_PROMOTE_AFTER: u64 = MIB;
/// A direction this long is still sending when a promotion at the default
/// threshold puts its hold in (after which a FIN is held, not taken): by then
/// the pump has moved about 1 MiB, plus what it moves before the promotion
/// future is polled again (it shares the tunnel's task) and what the hold's
/// drain delivers (at most 8.3 MiB in all, `bytes_before_promotion`, measured
/// here); the sender can be ahead of the pump only by its send buffer and the
/// proxy's receive buffer (4 + 32 MiB at most with this host's
/// `tcp_wmem`/`tcp_rmem`, far less in practice). Where a case needs a
/// half-closing or resetting tunnel promoted on `packet_default`, the
/// direction that must still be open is at least this long there.
const LONG: u64 = 64 * MIB;
/// Namespace names of the packet plane's cases start with this.
const PREFIX: &str = "pki";

/// The plane a case runs on, as its test module names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    /// sockmap, splice or copy.
    Socket(&'static str),
    /// `--dataplane packet --promote-after 0`.
    PacketAtOnce,
    /// `--dataplane packet` with the default `--promote-after`.
    PacketDefault,
}

/// How a tunnel moves its bytes, as far as promotion goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promotion {
    /// A direction still sending long after 1 MiB has moved ([`LONG`]), no FIN
    /// before: promoted at the default threshold too.
    Bulk,
    /// Moves less than 1 MiB, or a FIN reaches the proxy before 1 MiB has moved
    /// (the client's FIN before an answer that only comes after it, or the
    /// upstream's before the client sends): promoted only when promotion
    /// comes before the first byte (`--promote-after 0`).
    Short,
    /// Promoted with `--promote-after 0`; at the default threshold whether a
    /// FIN comes first is a matter of timing, so `packet_default` runs no such
    /// tunnel.
    AtOnce,
    /// A FIN before the `200`: the client connection is past ESTABLISHED when
    /// the tunnel starts, so it is never promoted (and sockmap hands it to
    /// splice, by design, before inserting anything).
    Never,
}

impl Plane {
    fn parse(name: &str) -> Self {
        match name {
            "packet" => Self::PacketAtOnce,
            "packet_default" => Self::PacketDefault,
            "sockmap" => Self::Socket("sockmap"),
            "splice" => Self::Socket("splice"),
            "copy" => Self::Socket("copy"),
            other => panic!("unknown plane {other}"),
        }
    }

    fn is_packet(self) -> bool {
        !matches!(self, Self::Socket(_))
    }

    /// spliced's arguments for this plane.
    fn args(self) -> Vec<String> {
        let mut args = vec!["--dataplane".to_owned()];
        match self {
            Self::Socket(name) => args.push(name.to_owned()),
            Self::PacketAtOnce => args.extend(["packet", "--promote-after", "0"].map(String::from)),
            Self::PacketDefault => args.push("packet".to_owned()),
        }
        args
    }

    /// The plane a tunnel that moves its bytes as `promotion` says must log.
    fn ran_on(self, promotion: Promotion) -> &'static str {
        match (self, promotion) {
            (Self::Socket("sockmap"), Promotion::Never) => "splice",
            (Self::Socket(name), _) => name,
            (_, Promotion::Never) => "splice",
            (Self::PacketAtOnce, _) => "packet",
            (Self::PacketDefault, Promotion::Bulk) => "packet",
            (Self::PacketDefault, Promotion::Short) => "splice",
            (Self::PacketDefault, Promotion::AtOnce) => {
                panic!("a tunnel whose promotion at the default threshold is a matter of timing")
            }
        }
    }

    /// `size`, or at least [`LONG`] on `packet_default`: for a direction that
    /// must still be sending when the tunnel is promoted there.
    fn long(self, size: u64) -> u64 {
        if self == Self::PacketDefault {
            size.max(LONG)
        } else {
            size
        }
    }
}

/// Where the client, the proxy and the upstream are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    /// On loopback: the test's own (sockmap, splice, copy) or, for the packet
    /// plane, the `lo` of a namespace of the test's own.
    Loopback { ipv6: bool },
    /// Three namespaces, client — proxy — server, joined by veth pairs.
    Veth { ipv6: bool },
}

/// A proxy on a plane, an upstream, and where the clients run. Fields drop in
/// order: the proxy before the namespaces.
struct Site {
    proxy: Proxy,
    upstream: Upstream,
    plane: Plane,
    /// The clients' namespace; `None`: the test's own.
    client_ns: Option<Netns>,
    /// The proxy's and the server's namespaces, when not the clients'.
    _others: Vec<Netns>,
    /// The CONNECT target.
    target: String,
}

impl Site {
    fn start(plane: &str, net: Net) -> Self {
        let plane = Plane::parse(plane);
        let mut args = plane.args();
        // JSON records name each tunnel's plane; --admin: the sockmap plane's
        // kernel counters and the packet plane's are read from /metrics.
        args.extend(["--log-format", "json", "--admin", "127.0.0.1:0"].map(String::from));
        let prefix = if plane.is_packet() { PREFIX } else { "spl" };
        match net {
            Net::Loopback { ipv6 } => {
                let ns = plane.is_packet().then(|| Netns::with_prefix(prefix));
                let ip: IpAddr = if ipv6 {
                    Ipv6Addr::LOCALHOST.into()
                } else {
                    Ipv4Addr::LOCALHOST.into()
                };
                let upstream = match &ns {
                    Some(ns) => Upstream::start_in(ns, SocketAddr::new(ip, 0)),
                    None if !ipv6 => Upstream::start(),
                    None => panic!("IPv6 on the test's own loopback is not a case"),
                };
                args.extend([
                    "--connect-ports".to_owned(),
                    upstream.addr.port().to_string(),
                    "--listen".to_owned(),
                    SocketAddr::new(ip, if ns.is_some() { 3128 } else { 0 }).to_string(),
                ]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let proxy = match &ns {
                    Some(ns) => Proxy::start_in(ns, &args),
                    None => Proxy::start(&args),
                };
                Self {
                    target: upstream.addr.to_string(),
                    proxy,
                    upstream,
                    plane,
                    client_ns: ns,
                    _others: Vec::new(),
                }
            }
            Net::Veth { ipv6 } => {
                let topology = Topology::with_prefix(prefix);
                let (listen, server): (IpAddr, IpAddr) = if ipv6 {
                    topology.add_ipv6();
                    (Topology::PROXY_IP6.into(), Topology::SERVER_IP6.into())
                } else {
                    (Topology::PROXY_IP.into(), Topology::SERVER_IP.into())
                };
                let upstream = Upstream::start_in(&topology.server, SocketAddr::new(server, 8443));
                args.extend([
                    "--connect-ports".to_owned(),
                    "8443".to_owned(),
                    "--listen".to_owned(),
                    SocketAddr::new(listen, 3128).to_string(),
                ]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let proxy = Proxy::start_in(&topology.proxy, &args);
                let Topology {
                    client,
                    proxy: proxy_ns,
                    server,
                    ..
                } = topology;
                Self {
                    target: upstream.addr.to_string(),
                    proxy,
                    upstream,
                    plane,
                    client_ns: Some(client),
                    _others: vec![proxy_ns, server],
                }
            }
        }
    }

    fn client_ns_name(&self) -> Option<String> {
        self.client_ns.as_ref().map(|ns| ns.name.clone())
    }

    /// A socket connected to the proxy from the clients' namespace.
    fn connect(&self) -> TcpStream {
        let proxy = self.proxy.addr;
        in_ns(self.client_ns_name(), move || {
            let stream = TcpStream::connect(proxy).expect("connect to proxy");
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            stream
        })
    }

    /// A tunnel opened the ordinary way; with `--promote-after 0`, once it is
    /// the `promoted`-th tunnel the proxy promoted.
    fn tunnel(&self, promoted: u64) -> TcpStream {
        let (proxy, target) = (self.proxy.addr, self.target.clone());
        let stream = in_ns(self.client_ns_name(), move || open_tunnel(proxy, &target));
        self.wait_promoted(promoted);
        stream
    }

    /// With `--promote-after 0`: waits (bounded) until the proxy has promoted
    /// `count` tunnels, so a client sends its first byte into a translated
    /// tunnel. A tunnel that is never promoted fails the test on its record.
    fn wait_promoted(&self, count: u64) {
        if self.plane == Plane::PacketAtOnce {
            wait_until(Duration::from_secs(10), || {
                self.proxy.stats()["packet_promoted"] >= count
            });
        }
    }

    /// One exchange through a tunnel opened the ordinary way (see
    /// [`Site::tunnel`]); the client's FIN waits for the tunnel to be spliced
    /// (see `SPLICE_GRACE`).
    fn run(&self, header: Header, promoted: u64) -> (ClientResult, ServerResult) {
        let stream = self.tunnel(promoted);
        let client = exchange_with(stream, header, false, SPLICE_GRACE);
        (client, self.upstream.result())
    }

    /// Every JSON record says the tunnel ran on the plane its [`Promotion`]
    /// gives and its byte counts equal the bytes the exchange moved. On sockmap
    /// the kernel's counters account for every byte the data plane moved:
    /// redirected by the verdict plus copied by flow control's holds equals
    /// what was sent, less the `pipelined` bytes the control plane forwarded
    /// itself before the `200`. On the packet plane the promoted tunnels are
    /// the ones `/metrics` counts, and each says what moved before promotion:
    /// nothing with `--promote-after 0` (unless the upstream answered bytes
    /// pipelined with the CONNECT), at least the threshold otherwise.
    fn assert_logged(&self, headers: &[(Header, Promotion)], pipelined: u64) {
        let proxy = &self.proxy;
        let records = proxy.wait_json_records(headers.len());
        let mut logged: Vec<(u64, u64, String)> = records
            .iter()
            .map(|r| {
                assert_eq!(r["status"], 200, "{r}");
                assert_eq!(r["result"], "TCP_TUNNEL", "{r}");
                assert_eq!(r["end"], "closed", "{r}\n{}", proxy.stderr());
                (
                    r["bytes_from_client"].as_u64().unwrap(),
                    r["bytes_to_client"].as_u64().unwrap(),
                    r["dataplane"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let mut expected: Vec<(u64, u64, String)> = headers
            .iter()
            .map(|(h, promotion)| {
                (
                    32 + h.up,
                    39 + h.down,
                    self.plane.ran_on(*promotion).to_owned(),
                )
            })
            .collect();
        logged.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            logged,
            expected,
            "access log (from_client, to_client, dataplane)\n{}",
            proxy.stderr()
        );
        if self.plane == Plane::Socket("sockmap") && logged.iter().all(|l| l.2 == "sockmap") {
            let sent: u64 = headers.iter().map(|(h, _)| 32 + h.up + h.down).sum();
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
        if self.plane.is_packet() {
            self.assert_promotions(&records, pipelined);
        }
    }

    /// The packet plane's records: promoted ones say what moved before, the
    /// others say nothing of it, and `/metrics` counts the promoted ones.
    fn assert_promotions(&self, records: &[serde_json::Value], pipelined: u64) {
        let mut promoted = 0;
        for record in records.iter().filter(|r| r["status"] == 200) {
            let before = &record["bytes_before_promotion"];
            if record["dataplane"] != "packet" {
                assert!(before.is_null(), "{record}");
                continue;
            }
            promoted += 1;
            let (up, down) = (
                before["client_to_upstream"].as_u64().expect("promoted"),
                before["upstream_to_client"].as_u64().expect("promoted"),
            );
            match self.plane {
                Plane::PacketAtOnce if pipelined == 0 => {
                    assert_eq!((up, down), (0, 0), "{record}")
                }
                Plane::PacketAtOnce => assert_eq!(up, 0, "{record}"),
                _ => assert!(up + down >= DEFAULT_PROMOTE_AFTER, "{record}"),
            }
        }
        let stats = self.proxy.stats();
        assert_eq!(stats["packet_promoted"], promoted, "{stats:?}");
    }
}

/// Runs `f` in the namespace named `ns`, or here.
fn in_ns<T: Send + 'static>(ns: Option<String>, f: impl FnOnce() -> T + Send + 'static) -> T {
    match ns {
        Some(name) => netns::enter_named(&name, f),
        None => f(),
    }
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

/// Eight tunnels at once, 0 B to 16 MiB each way. On `packet_default` they
/// are sizes each side of the threshold, both ways alike: under 1 MiB in all
/// (never promoted) or [`LONG`] each way (promoted mid-transfer), since
/// whether a tunnel that half-closes one way near the threshold is promoted
/// is a matter of timing.
fn concurrent_tunnels(plane: &str, net: Net) {
    let site = Site::start(plane, net);
    let headers: Vec<(Header, Promotion)> = if site.plane == Plane::PacketDefault {
        let sizes = [0, 1, 7, 1000, 65_536 + 3, 300_000, LONG, LONG + 5];
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let promotion = if size >= LONG {
                    Promotion::Bulk
                } else {
                    Promotion::Short
                };
                (
                    header(size, size + 1, 100 + i as u64 * 2, Mode::Concurrent),
                    promotion,
                )
            })
            .collect()
    } else {
        let sizes = [0, 1, 7, 1000, 65_536 + 3, MIB, 3 * MIB + 5, 16 * MIB];
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                (
                    header(
                        size,
                        sizes[sizes.len() - 1 - i],
                        100 + i as u64 * 2,
                        Mode::Concurrent,
                    ),
                    Promotion::AtOnce,
                )
            })
            .collect()
    };
    // Every client opens its tunnel, then waits until all are open (and,
    // with --promote-after 0, promoted) before its first byte.
    let start = Arc::new(Barrier::new(headers.len() + 1));
    let threads: Vec<_> = headers
        .iter()
        .map(|&(h, _)| {
            let (proxy, target) = (site.proxy.addr, site.target.clone());
            let (ns, start) = (site.client_ns_name(), start.clone());
            std::thread::spawn(move || {
                let stream = in_ns(ns, move || open_tunnel(proxy, &target));
                start.wait();
                exchange_with(stream, h, false, SPLICE_GRACE)
            })
        })
        .collect();
    site.wait_promoted(headers.len() as u64);
    start.wait();
    let clients: Vec<ClientResult> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut servers: Vec<ServerResult> =
        (0..headers.len()).map(|_| site.upstream.result()).collect();
    servers.sort_by_key(|s| s.seed);
    for (((h, _), client), server) in headers.iter().zip(&clients).zip(&servers) {
        assert_exact(*h, client, server);
    }
    site.assert_logged(&headers, 0);
}

fn concurrent_tunnels_of_many_sizes(plane: &str) {
    concurrent_tunnels(plane, Net::Loopback { ipv6: false });
}

fn concurrent_tunnels_over_ipv6_loopback(plane: &str) {
    concurrent_tunnels(plane, Net::Loopback { ipv6: true });
}

fn concurrent_tunnels_over_ipv6_veth(plane: &str) {
    concurrent_tunnels(plane, Net::Veth { ipv6: true });
}

fn bulk_both_ways(plane: &str, net: Net) {
    let site = Site::start(plane, net);
    let h = header(300 * MIB, 300 * MIB + 1, 7, Mode::Concurrent);
    let (client, server) = site.run(h, 1);
    assert_exact(h, &client, &server);
    site.assert_logged(&[(h, Promotion::Bulk)], 0);
}

fn hundreds_of_mib_both_ways(plane: &str) {
    bulk_both_ways(plane, Net::Loopback { ipv6: false });
}

fn hundreds_of_mib_over_ipv6_loopback(plane: &str) {
    bulk_both_ways(plane, Net::Loopback { ipv6: true });
}

fn hundreds_of_mib_over_ipv6_veth(plane: &str) {
    bulk_both_ways(plane, Net::Veth { ipv6: true });
}

/// The request head, the exchange header and the first 1000 payload bytes in
/// one write. With `--promote-after 0` the upstream, which has the header
/// before the `200`, answers [`LONG`] bytes (its FIN cannot come before the
/// promotion), and the client sends the rest once the tunnel is promoted; the
/// translation starts after bytes the control plane forwarded.
fn bytes_pipelined_with_the_connect(plane: &str) {
    let site = Site::start(plane, Net::Loopback { ipv6: false });
    let (down, promotion) = if site.plane == Plane::PacketAtOnce {
        (LONG, Promotion::AtOnce)
    } else {
        (300_000, Promotion::Short)
    };
    let h = header(200_000, down, 11, Mode::Concurrent);
    let mut stream = site.connect();
    let mut first = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", site.target).into_bytes();
    first.extend_from_slice(&h.encode());
    let mut payload = vec![0u8; h.up as usize];
    spliced_tests::pattern::fill_fast(h.seed, 0, &mut payload);
    first.extend_from_slice(&payload[..1000]);
    stream.write_all(&first).unwrap();
    expect_connect_ok(&mut stream);
    site.wait_promoted(1);
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload[1000..]).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let received = spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap();
    sender.join().unwrap();
    assert_eq!(received, Ok(h.down));
    assert_eq!(site.upstream.result().received, Ok(h.up));
    // The exchange header and the first 1000 bytes came with the request
    // head; the rest waits for the 200, so nothing more was queued before it.
    site.assert_logged(&[(h, promotion)], 32 + 1000);
}

/// The request head, the payload and the client's FIN in one segment, so the
/// FIN reaches the proxy with the payload, before the `200`. (Written and shut
/// down one after the other without TCP_CORK, the FIN is a segment of its
/// own, and a client thread descheduled between the two calls sends it after
/// the proxy has answered and handed the tunnel over: measured here, on the
/// packet plane, 5 tunnels in 6 promoted.) On `packet_default` the answer is
/// long enough that the pump yields to the promotion before it ends, so the
/// refusal is counted there too.
fn payload_and_fin_before_the_200(plane: &str) {
    let site = Site::start(plane, Net::Loopback { ipv6: false });
    let down = if site.plane == Plane::PacketDefault {
        4 * LONG
    } else {
        2 * MIB
    };
    let h = header(30_000, down, 13, Mode::AnswerAfterEof);
    let mut stream = site.connect();
    let all = h.after_head_with_payload(&format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n",
        site.target
    ));
    // Corked, the bytes wait for the FIN, which goes on their last segment.
    socket2::SockRef::from(&stream).set_cork(true).unwrap();
    stream.write_all(&all).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    expect_connect_ok(&mut stream);
    let received = spliced_tests::pattern::receive(&mut stream, h.seed + 1).unwrap();
    assert_eq!(received, Ok(h.down));
    assert_eq!(
        site.upstream.result().received,
        Ok(h.up),
        "{}",
        site.proxy.stderr()
    );
    site.assert_logged(&[(h, Promotion::Never)], 32 + 30_000);
    if site.plane.is_packet() {
        // Refused when the threshold was reached (at once, or once the answer
        // passed 1 MiB): the client connection was in CLOSE_WAIT.
        let stats = site.proxy.stats();
        assert_eq!(stats["packet_not_promoted_not_established"], 1, "{stats:?}");
    }
}

fn client_half_close_then_whole_answer(plane: &str) {
    let site = Site::start(plane, Net::Loopback { ipv6: false });
    let p = site.plane;
    let headers = [
        // The client's FIN (after SPLICE_GRACE, no answer before it) comes
        // before 1 MiB has moved.
        (
            header(0, 5 * MIB, 21, Mode::AnswerAfterEof),
            Promotion::Short,
        ),
        (
            header(p.long(20 * MIB), 20 * MIB, 23, Mode::AnswerAfterEof),
            Promotion::Bulk,
        ),
        (header(1, 1, 25, Mode::AnswerAfterEof), Promotion::Short),
    ];
    for (n, (h, _)) in (1..).zip(headers) {
        let (client, server) = site.run(h, n);
        assert_exact(h, &client, &server);
    }
    site.assert_logged(&headers, 0);
}

fn server_half_close_then_client_sends(plane: &str) {
    let site = Site::start(plane, Net::Loopback { ipv6: false });
    let p = site.plane;
    let headers = [
        // The upstream's FIN (nothing to send) comes before the client sends.
        (header(5 * MIB, 0, 31, Mode::ServerFirst), Promotion::Short),
        (
            header(20 * MIB, p.long(20 * MIB), 33, Mode::ServerFirst),
            Promotion::Bulk,
        ),
    ];
    for (n, (h, _)) in (1..).zip(headers) {
        let (client, server) = site.run(h, n);
        assert_exact(h, &client, &server);
    }
    site.assert_logged(&headers, 0);
}

/// The record of the only tunnel so far: on the plane `promotion` gives, not
/// closed.
fn assert_broken(site: &Site, promotion: Promotion) {
    let records = site.proxy.wait_json_records(1);
    assert_eq!(records[0]["status"], 200);
    assert_eq!(
        records[0]["dataplane"],
        site.plane.ran_on(promotion),
        "{}\n{}",
        records[0],
        site.proxy.stderr()
    );
    assert_ne!(records[0]["end"], "closed", "{}", records[0]);
}

fn upstream_reset_mid_transfer(plane: &str) {
    let mut site = Site::start(plane, Net::Loopback { ipv6: false });
    // The upstream reads 1 MiB (LONG on packet_default), then resets while the
    // client is still sending.
    let h = header(site.plane.long(MIB), 0, 41, Mode::ResetAfterRead);
    let mut stream = site.tunnel(1);
    stream.write_all(&h.encode()).unwrap();
    let mut sender = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        spliced_tests::pattern::send(&mut sender, h.seed, h.up + 64 * MIB)
    });
    let server = site.upstream.result();
    assert_eq!(server.received, Ok(h.up));
    // The client must learn that the tunnel broke, not hang.
    assert!(
        sending.join().unwrap().is_err(),
        "the client could send everything into a reset tunnel\n{}",
        site.proxy.stderr()
    );
    let mut rest = Vec::new();
    let outcome = stream.read_to_end(&mut rest);
    assert!(
        outcome.is_err() || rest.is_empty(),
        "client read {outcome:?} after upstream reset"
    );
    assert_broken(&site, Promotion::Bulk);
    site.proxy.assert_alive();
    // And the proxy keeps serving.
    let h = header(1000, 1000, 43, Mode::Concurrent);
    let (client, server) = site.run(h, 2);
    assert_exact(h, &client, &server);
    assert_eq!(
        site.proxy.wait_json_records(2)[1]["dataplane"],
        site.plane.ran_on(Promotion::Short)
    );
}

fn client_reset_mid_transfer(plane: &str) {
    let mut site = Site::start(plane, Net::Loopback { ipv6: false });
    // The client sends 1 MiB, reads 64 KiB of the answer (LONG of a longer one
    // on packet_default, so it reads translated bytes), then resets.
    let (down, read) = if site.plane == Plane::PacketDefault {
        (4 * LONG, LONG)
    } else {
        (64 * MIB, 64 * 1024)
    };
    let h = header(64 * MIB, down, 51, Mode::Concurrent);
    let mut stream = site.tunnel(1);
    stream.write_all(&h.encode()).unwrap();
    spliced_tests::pattern::send(&mut stream, h.seed, MIB).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = read;
    while left > 0 {
        let n = stream.read(&mut buf[..left.min(1 << 20) as usize]).unwrap();
        assert!(n > 0, "EOF before the client reset");
        left -= n as u64;
    }
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    // The upstream learns of it (error or short stream) instead of hanging.
    let server = site.upstream.result();
    assert_ne!(
        server.received,
        Ok(h.up),
        "upstream got everything from a reset client?"
    );
    assert_broken(&site, Promotion::Bulk);
    site.proxy.assert_alive();
    let h = header(1000, 1000, 53, Mode::Concurrent);
    let (client, server) = site.run(h, 2);
    assert_exact(h, &client, &server);
    assert_eq!(
        site.proxy.wait_json_records(2)[1]["dataplane"],
        site.plane.ran_on(Promotion::Short)
    );
}

/// Client, proxy and server on three hosts joined by veth pairs.
fn across_network_namespaces(plane: &str) {
    let site = Site::start(plane, Net::Veth { ipv6: false });
    let p = site.plane;
    let headers = [
        (
            header(p.long(40 * MIB), p.long(40 * MIB), 61, Mode::Concurrent),
            Promotion::Bulk,
        ),
        (
            header(p.long(10 * MIB), 10 * MIB, 63, Mode::AnswerAfterEof),
            Promotion::Bulk,
        ),
        (
            header(10 * MIB, p.long(10 * MIB), 65, Mode::ServerFirst),
            Promotion::Bulk,
        ),
        (header(0, 0, 67, Mode::Concurrent), Promotion::Short),
    ];
    for (n, (h, _)) in (1..).zip(headers) {
        let (client, server) = site.run(h, n);
        assert_exact(h, &client, &server);
    }
    site.assert_logged(&headers, 0);
    let records = site.proxy.wait_json_records(headers.len());
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

/// `mod packet` (`--promote-after 0`) and `mod packet_default` (the default
/// threshold), each with one `#[test]` per named function.
macro_rules! on_the_packet_plane {
    ($($test:ident),* $(,)?) => {
        mod packet { $( #[test] fn $test() { super::$test("packet") } )* }
        mod packet_default { $( #[test] fn $test() { super::$test("packet_default") } )* }
    };
}

on_the_packet_plane!(
    concurrent_tunnels_of_many_sizes,
    concurrent_tunnels_over_ipv6_loopback,
    concurrent_tunnels_over_ipv6_veth,
    hundreds_of_mib_both_ways,
    hundreds_of_mib_over_ipv6_loopback,
    hundreds_of_mib_over_ipv6_veth,
    bytes_pipelined_with_the_connect,
    payload_and_fin_before_the_200,
    client_half_close_then_whole_answer,
    server_half_close_then_client_sends,
    upstream_reset_mid_transfer,
    client_reset_mid_transfer,
    across_network_namespaces,
);
