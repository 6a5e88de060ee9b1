//! The packet data plane (`--dataplane packet`): tunnels promoted to segment
//! translation by the tc program, byte-exact, on loopback and across veth,
//! IPv4 and IPv6, with `--promote-after 0` and with a tunnel promoted in the
//! middle of a transfer.
//!
//! Every test runs in network namespaces of its own (names start with `pk`),
//! so the programs attach to the test's own `lo` and veth devices only. Every
//! tunnel's access-log record must say `packet` (a tunnel that ran on the
//! splice pump alone fails) and count exactly the bytes that were sent, and the
//! endpoints' namespaces must show no PAWS, TSecr or checksum rejection.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use spliced_tests::{
    netns::{Netns, Topology},
    open_tunnel,
    upstream::{exchange, ClientResult, Header},
    Mode, Proxy, ServerResult, Upstream,
};

const MIB: u64 = 1 << 20;
const PREFIX: &str = "pk";
/// How long a client waits after the `200` before it sends, so that a
/// tunnel with `--promote-after 0` is translating before its first byte.
const SETTLE: Duration = Duration::from_millis(100);

fn header(up: u64, down: u64, seed: u64, mode: Mode) -> Header {
    Header {
        up,
        down,
        seed,
        mode,
    }
}

/// Where the client, the proxy and the upstream are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    /// All three on the `lo` of one namespace.
    Loopback,
    /// Three namespaces, client — proxy — server, joined by veth pairs.
    Veth,
}

/// spliced's arguments: the packet plane, JSON access log.
fn proxy_args(promote_after: u64, upstream_port: u16, listen: SocketAddr) -> Vec<String> {
    [
        "--dataplane",
        "packet",
        "--promote-after",
        &promote_after.to_string(),
        "--connect-ports",
        &upstream_port.to_string(),
        "--listen",
        &listen.to_string(),
        "--log-format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A proxy on the packet plane, an upstream, and where clients run.
/// Fields drop in order: the proxy goes before its namespace.
struct Setup {
    proxy: Proxy,
    upstream: Upstream,
    net: Net,
    /// The client's namespace; the proxy's and the upstream's on loopback.
    client_ns: Netns,
    /// Veth only: the proxy's and the upstream's namespaces.
    others: Vec<Netns>,
    /// The CONNECT target.
    target: String,
}

impl Setup {
    fn start(net: Net, ipv6: bool, promote_after: u64) -> Self {
        match net {
            Net::Loopback => Self::local(ipv6, promote_after),
            Net::Veth => Self::on(Topology::with_prefix(PREFIX), ipv6, promote_after),
        }
    }

    /// Proxy, upstream and clients on the `lo` of one new namespace.
    fn local(ipv6: bool, promote_after: u64) -> Self {
        Self::local_with(ipv6, promote_after, &[])
    }

    /// [`Setup::local`] with more arguments for spliced.
    fn local_with(ipv6: bool, promote_after: u64, extra: &[&str]) -> Self {
        let ns = Netns::with_prefix(PREFIX);
        let ip: IpAddr = if ipv6 {
            Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        };
        let upstream = Upstream::start_in(&ns, SocketAddr::new(ip, 0));
        let mut args = proxy_args(
            promote_after,
            upstream.addr.port(),
            SocketAddr::new(ip, 3128),
        );
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let proxy = Proxy::start_in(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>());
        Self {
            net: Net::Loopback,
            client_ns: ns,
            others: Vec::new(),
            target: upstream.addr.to_string(),
            upstream,
            proxy,
        }
    }

    /// The proxy and the upstream on `topology`.
    fn on(topology: Topology, ipv6: bool, promote_after: u64) -> Self {
        Self::on_with(topology, ipv6, promote_after, &[])
    }

    /// [`Setup::on`] with more arguments for spliced.
    fn on_with(topology: Topology, ipv6: bool, promote_after: u64, extra: &[&str]) -> Self {
        let (listen_ip, server_ip): (IpAddr, IpAddr) = if ipv6 {
            topology.add_ipv6();
            (Topology::PROXY_IP6.into(), Topology::SERVER_IP6.into())
        } else {
            (Topology::PROXY_IP.into(), Topology::SERVER_IP.into())
        };
        let upstream = Upstream::start_in(&topology.server, SocketAddr::new(server_ip, 8443));
        let mut args = proxy_args(promote_after, 8443, SocketAddr::new(listen_ip, 3128));
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let proxy = Proxy::start_in(
            &topology.proxy,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let Topology {
            client,
            proxy: proxy_ns,
            server,
            ..
        } = topology;
        Self {
            net: Net::Veth,
            client_ns: client,
            others: vec![proxy_ns, server],
            target: upstream.addr.to_string(),
            upstream,
            proxy,
        }
    }

    /// Opens a tunnel from the client's namespace, waits `settle`, runs the
    /// exchange.
    fn exchange(&self, h: Header, settle: Duration) -> (ClientResult, ServerResult) {
        let (proxy, target) = (self.proxy.addr, self.target.clone());
        let client = self.client_ns.enter(move || {
            let stream = open_tunnel(proxy, &target);
            std::thread::sleep(settle);
            exchange(stream, h, false)
        });
        (client, self.upstream.result())
    }

    /// A tunnel socket opened from the client's namespace.
    fn tunnel(&self) -> TcpStream {
        let (proxy, target) = (self.proxy.addr, self.target.clone());
        self.client_ns.enter(move || open_tunnel(proxy, &target))
    }

    /// The namespaces the endpoints are in.
    fn endpoint_namespaces(&self) -> Vec<&Netns> {
        match self.net {
            Net::Loopback => vec![&self.client_ns],
            Net::Veth => vec![&self.client_ns, &self.others[1]],
        }
    }

    fn assert_exact(&self, h: Header, client: &ClientResult, server: &ServerResult) {
        assert_eq!(
            server.received,
            Ok(h.up),
            "upstream side of {h:?}\n{}",
            self.proxy.stderr()
        );
        assert_eq!(
            client.received,
            Ok(h.down),
            "client side of {h:?}\n{}",
            self.proxy.stderr()
        );
    }

    /// The records of `headers` (closed tunnels): each ran on `packet` and
    /// counted exactly what the exchange moved (32-byte exchange header, 39-byte
    /// `200`).
    fn assert_logged(&self, headers: &[Header]) -> Vec<serde_json::Value> {
        let records = self.proxy.wait_json_records(headers.len());
        let mut logged: Vec<(u64, u64)> = records
            .iter()
            .map(|r| {
                self.assert_promoted(r);
                assert_eq!(r["end"], "closed", "{r}\n{}", self.proxy.stderr());
                (
                    r["bytes_from_client"].as_u64().unwrap(),
                    r["bytes_to_client"].as_u64().unwrap(),
                )
            })
            .collect();
        let mut expected: Vec<(u64, u64)> =
            headers.iter().map(|h| (32 + h.up, 39 + h.down)).collect();
        logged.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            logged,
            expected,
            "access log byte counts (from_client, to_client)\n{}",
            self.proxy.stderr()
        );
        records
    }

    fn assert_promoted(&self, record: &serde_json::Value) {
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(
            record["dataplane"],
            "packet",
            "{record}\n{}",
            self.proxy.stderr()
        );
        let before = &record["bytes_before_promotion"];
        assert!(
            before["client_to_upstream"].is_u64() && before["upstream_to_client"].is_u64(),
            "{record}"
        );
    }

    /// No endpoint rejected a translated segment: PAWS, TSecr, checksum.
    fn assert_no_rejections(&self) {
        for ns in self.endpoint_namespaces() {
            let counters = nstat(ns);
            for name in [
                "TcpExtPAWSEstab",
                "TcpExtPAWSOldAck",
                "TcpExtTSEcrRejected",
                "TcpInCsumErrors",
            ] {
                assert_eq!(
                    counters.get(name).copied().unwrap_or(0),
                    0,
                    "{name} in {}: {counters:?}\n{}",
                    ns.name,
                    self.proxy.stderr()
                );
            }
        }
        self.verbose();
    }

    /// With `PK_VERBOSE` set: the proxy's log and counters and the
    /// namespaces' TCP counters that are not 0.
    fn verbose(&self) {
        if std::env::var_os("PK_VERBOSE").is_none() {
            return;
        }
        eprintln!("{}", self.proxy.stderr());
        for line in self.proxy.access_lines() {
            eprintln!("record: {line}");
        }
        eprintln!("stats: {:?}", self.proxy.stats());
        for ns in std::iter::once(&self.client_ns).chain(&self.others) {
            let mut counters: Vec<_> = nstat(ns).into_iter().filter(|(_, v)| *v != 0).collect();
            counters.sort();
            eprintln!("nstat {}: {counters:?}", ns.name);
        }
    }
}

/// `nstat -az` counters of a namespace.
fn nstat(ns: &Netns) -> HashMap<String, u64> {
    let output = ns
        .command("nstat")
        .args(["-az", "--json"])
        .env("NSTAT_HISTORY", "/dev/null")
        .output()
        .expect("nstat");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nstat JSON");
    json["kernel"]
        .as_object()
        .expect("nstat kernel counters")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .collect()
}

/// `--promote-after 0`: each tunnel is translating before its first byte
/// (the client waits a moment after the `200`), so every byte of it went
/// through the tc program: 0 B, small, 1 MiB each way, 64 MiB both ways at
/// once.
fn promoted_at_once(net: Net, ipv6: bool) {
    let setup = Setup::start(net, ipv6, 0);
    let headers = [
        header(0, 0, 1, Mode::Concurrent),
        header(1000, 2000, 3, Mode::Concurrent),
        header(MIB, MIB, 5, Mode::Concurrent),
        header(64 * MIB, 64 * MIB + 7, 7, Mode::Concurrent),
    ];
    for h in headers {
        let (client, server) = setup.exchange(h, SETTLE);
        setup.assert_exact(h, &client, &server);
    }
    let records = setup.assert_logged(&headers);
    for record in &records {
        assert_eq!(
            record["bytes_before_promotion"],
            serde_json::json!({"client_to_upstream": 0, "upstream_to_client": 0}),
            "{record}"
        );
    }
    setup.assert_no_rejections();
}

/// The client side of an `AnswerAfterEof` exchange whose upload goes in
/// `chunk`-byte writes with `pause` between them, so the tunnel is still
/// carrying it when `--promote-after` is reached.
fn paced_exchange(mut stream: TcpStream, h: Header, chunk: u64, pause: Duration) -> ClientResult {
    assert_eq!(h.mode, Mode::AnswerAfterEof);
    stream.write_all(&h.encode()).expect("send header");
    let mut at = 0;
    while at < h.up {
        let to = (at + chunk).min(h.up);
        spliced_tests::pattern::send_range(&mut stream, h.seed, at, to).expect("client send");
        at = to;
        std::thread::sleep(pause);
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("client shutdown");
    ClientResult {
        received: spliced_tests::pattern::receive_checked(&mut stream, h.seed + 1),
    }
}

/// `--promote-after 256 KiB`: the cut-over happens with bytes in flight (held,
/// then retransmitted and translated): a paced 4 MiB upload answered after
/// its EOF, and 64 MiB both ways at once.
fn promoted_mid_transfer(net: Net, ipv6: bool) {
    let setup = Setup::start(net, ipv6, 256 * 1024);
    let paced = header(4 * MIB, MIB, 11, Mode::AnswerAfterEof);
    let (proxy, target) = (setup.proxy.addr, setup.target.clone());
    let client = setup.client_ns.enter(move || {
        paced_exchange(
            open_tunnel(proxy, &target),
            paced,
            128 * 1024,
            Duration::from_millis(5),
        )
    });
    setup.assert_exact(paced, &client, &setup.upstream.result());
    let both_ways = header(64 * MIB + 3, 64 * MIB, 13, Mode::Concurrent);
    let (client, server) = setup.exchange(both_ways, Duration::ZERO);
    setup.assert_exact(both_ways, &client, &server);
    let records = setup.assert_logged(&[paced, both_ways]);
    for record in &records {
        let before = &record["bytes_before_promotion"];
        let moved = before["client_to_upstream"].as_u64().unwrap()
            + before["upstream_to_client"].as_u64().unwrap();
        assert!(moved >= 256 * 1024, "{record}");
    }
    setup.assert_no_rejections();
}

/// Half-close each way after promotion: the client's FIN first with the
/// answer after it, and the server's FIN first with the client sending after
/// it; promoted at once, and mid-transfer (the direction that closes first
/// sends 64 MiB, so it is still sending when the tunnel is held).
fn half_close_each_way(net: Net, ipv6: bool) {
    let at_once = [
        header(2 * MIB, 3 * MIB, 21, Mode::AnswerAfterEof),
        header(2 * MIB + 1, 3 * MIB, 23, Mode::ServerFirst),
    ];
    let mid_transfer = [
        header(64 * MIB, 3 * MIB, 25, Mode::AnswerAfterEof),
        header(2 * MIB, 64 * MIB + 1, 27, Mode::ServerFirst),
    ];
    for (promote_after, settle, headers) in [
        (0, SETTLE, at_once),
        (128 * 1024, Duration::ZERO, mid_transfer),
    ] {
        let setup = Setup::start(net, ipv6, promote_after);
        for h in headers {
            let (client, server) = setup.exchange(h, settle);
            setup.assert_exact(h, &client, &server);
        }
        setup.assert_logged(&headers);
        setup.assert_no_rejections();
    }
}

/// A reset from either side reaches the other end through the translation,
/// and the record says the tunnel broke.
fn reset_from_either_side(net: Net, ipv6: bool) {
    let setup = Setup::start(net, ipv6, 0);
    // The upstream reads 1 MiB, then resets while the client still sends.
    let h = header(MIB, 0, 41, Mode::ResetAfterRead);
    let mut stream = setup.tunnel();
    std::thread::sleep(SETTLE);
    stream.write_all(&h.encode()).unwrap();
    let mut sender = stream.try_clone().unwrap();
    let sending =
        std::thread::spawn(move || spliced_tests::pattern::send(&mut sender, h.seed, 256 * MIB));
    assert_eq!(setup.upstream.result().received, Ok(MIB));
    assert!(
        sending.join().unwrap().is_err(),
        "the client could send 256 MiB into a reset tunnel\n{}",
        setup.proxy.stderr()
    );
    let records = setup.proxy.wait_json_records(1);
    setup.assert_promoted(&records[0]);
    assert_eq!(records[0]["end"], "upstream_error", "{}", records[0]);

    // The client sends 1 MiB, reads some of the answer, then resets.
    let h = header(64 * MIB, 64 * MIB, 51, Mode::Concurrent);
    let mut stream = setup.tunnel();
    std::thread::sleep(SETTLE);
    stream.write_all(&h.encode()).unwrap();
    spliced_tests::pattern::send(&mut stream, h.seed, MIB).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    stream.read_exact(&mut buf).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    let server = setup.upstream.result();
    assert_ne!(
        server.received,
        Ok(h.up),
        "upstream got everything from a reset client?"
    );
    let records = setup.proxy.wait_json_records(2);
    setup.assert_promoted(&records[1]);
    assert_eq!(records[1]["end"], "client_error", "{}", records[1]);

    // The proxy goes on promoting tunnels.
    let h = header(1000, 1000, 53, Mode::Concurrent);
    let (client, server) = setup.exchange(h, SETTLE);
    setup.assert_exact(h, &client, &server);
    let records = setup.proxy.wait_json_records(3);
    setup.assert_promoted(&records[2]);
    setup.assert_no_rejections();
}

/// Turns transmit checksum offload off on `dev` in `ns` (`ethtool -K dev tx
/// off`, which also turns off TSO): the device's sender then checksums every
/// segment in software and the skb crosses veth as CHECKSUM_NONE, so the
/// receiver verifies the checksum. (Loopback and veth skbs are otherwise
/// CHECKSUM_PARTIAL, whose checksums no receiver checks.)
fn disable_tx_checksum(ns: &Netns, dev: &str) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let dev = dev.to_owned();
    ns.enter(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("ioctl socket");
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        request.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points
        // to, both alive for the call.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                SIOCETHTOOL,
                &mut request,
            )
        };
        assert_eq!(
            rc,
            0,
            "ETHTOOL_STXCSUM on {dev}: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// Across veth with the endpoints checksumming in software: every translated
/// segment is CHECKSUM_NONE at the proxy, so its checksums must come out of
/// the rewrite exactly right or the receiver drops it (TcpInCsumErrors).
fn checksums_verified_by_the_receivers(ipv6: bool) {
    let topology = Topology::with_prefix(PREFIX);
    disable_tx_checksum(&topology.client, &topology.client_link.0);
    disable_tx_checksum(&topology.server, &topology.server_link.1);
    let setup = Setup::on(topology, ipv6, 0);
    let headers = [
        header(1000, 2000, 71, Mode::Concurrent),
        header(8 * MIB, 8 * MIB + 5, 73, Mode::Concurrent),
    ];
    for h in headers {
        let (client, server) = setup.exchange(h, SETTLE);
        setup.assert_exact(h, &client, &server);
    }
    setup.assert_logged(&headers);
    setup.assert_no_rejections();
    let stats = setup.proxy.stats();
    assert!(stats["packet_translated"] > 1000, "{stats:?}");
}

#[test]
fn checksums_verified_by_the_receivers_ipv4() {
    checksums_verified_by_the_receivers(false);
}

#[test]
fn checksums_verified_by_the_receivers_ipv6() {
    checksums_verified_by_the_receivers(true);
}

macro_rules! on_every_path {
    ($($test:ident),* $(,)?) => {
        mod loopback_ipv4 { $( #[test] fn $test() { super::$test(super::Net::Loopback, false) } )* }
        mod loopback_ipv6 { $( #[test] fn $test() { super::$test(super::Net::Loopback, true) } )* }
        mod veth_ipv4 { $( #[test] fn $test() { super::$test(super::Net::Veth, false) } )* }
        mod veth_ipv6 { $( #[test] fn $test() { super::$test(super::Net::Veth, true) } )* }
    };
}

on_every_path!(
    promoted_at_once,
    promoted_mid_transfer,
    half_close_each_way,
    reset_from_either_side,
);

/// A promoted tunnel that moves nothing ends at `--read-timeout` like any
/// other: its entries and repair-mode sockets go, and the client learns it on
/// its next send (a RST from the proxy host, which no longer has the socket).
#[test]
fn idle_timeout_of_a_promoted_tunnel() {
    let setup = Setup::local_with(false, 0, &["--read-timeout", "1"]);
    let mut stream = setup.tunnel();
    let records = setup.proxy.wait_json_records(1);
    setup.assert_promoted(&records[0]);
    assert_eq!(records[0]["end"], "idle_timeout", "{}", records[0]);
    let stats = setup.proxy.stats();
    assert_eq!(stats["packet_entries"], 0, "{stats:?}");
    let sent = stream.write_all(b"anyone?");
    let mut buf = [0u8; 16];
    let read = stream.read(&mut buf);
    assert!(
        sent.is_err() || read.is_err(),
        "the client of a timed-out tunnel could write ({sent:?}) and read ({read:?})"
    );
}

/// After a closed tunnel's linger its two entries are gone: the map does not
/// grow with the tunnels a proxy has run.
#[test]
fn entries_go_after_the_linger() {
    let setup = Setup::local(false, 0);
    let headers = [
        header(1000, 1000, 81, Mode::Concurrent),
        header(MIB, MIB, 83, Mode::AnswerAfterEof),
    ];
    for h in headers {
        let (client, server) = setup.exchange(h, SETTLE);
        setup.assert_exact(h, &client, &server);
    }
    setup.assert_logged(&headers);
    let stats = setup.proxy.stats();
    assert_eq!(stats["packet_promoted"], 2, "{stats:?}");
    assert!(spliced_tests::wait_until(Duration::from_secs(10), || {
        setup.proxy.stats()["packet_entries"] == 0
    }));
    let stats = setup.proxy.stats();
    assert_eq!(stats["packet_lingering"], 0, "{stats:?}");
}

/// Eight tunnels of different sizes at once, each promoted before its first
/// byte: the entries, the events and the counts do not mix tunnels up.
fn concurrent_tunnels(net: Net) {
    let setup = Setup::start(net, false, 0);
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
            let (proxy, target) = (setup.proxy.addr, setup.target.clone());
            let path = format!("/var/run/netns/{}", setup.client_ns.name);
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns");
                let stream = open_tunnel(proxy, &target);
                std::thread::sleep(SETTLE);
                exchange(stream, h, false)
            })
        })
        .collect();
    let clients: Vec<ClientResult> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut servers: Vec<ServerResult> = (0..headers.len())
        .map(|_| setup.upstream.result())
        .collect();
    servers.sort_by_key(|s| s.seed);
    for ((h, client), server) in headers.iter().zip(&clients).zip(&servers) {
        setup.assert_exact(*h, client, server);
    }
    setup.assert_logged(&headers);
    setup.assert_no_rejections();
}

#[test]
fn concurrent_tunnels_on_loopback() {
    concurrent_tunnels(Net::Loopback);
}

#[test]
fn concurrent_tunnels_across_veth() {
    concurrent_tunnels(Net::Veth);
}

/// A tunnel that does not qualify (the client has TCP timestamps off) is not
/// promoted: the log says why, and the splice pump carries it to the end.
#[test]
fn a_refused_tunnel_stays_on_the_pump() {
    let topology = Topology::with_prefix(PREFIX);
    let status = topology
        .client
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_timestamps=0"])
        .status()
        .expect("sysctl");
    assert!(status.success());
    let setup = Setup::on(topology, false, 0);
    let h = header(MIB, 2 * MIB, 91, Mode::Concurrent);
    let (client, server) = setup.exchange(h, SETTLE);
    setup.assert_exact(h, &client, &server);
    let records = setup.proxy.wait_json_records(1);
    assert_eq!(records[0]["dataplane"], "splice", "{}", records[0]);
    assert!(
        records[0].get("bytes_before_promotion").is_none(),
        "{}",
        records[0]
    );
    assert_eq!(
        (
            records[0]["bytes_from_client"].as_u64(),
            records[0]["bytes_to_client"].as_u64()
        ),
        (Some(32 + h.up), Some(39 + h.down))
    );
    assert!(
        setup
            .proxy
            .stderr()
            .contains("not promoted: no TCP timestamps on the client connection"),
        "{}",
        setup.proxy.stderr()
    );
}

/// A hold that cannot drain (the client reads nothing, so the proxy's data
/// toward it is never acknowledged) is released at its deadline: the peers
/// retransmit what was held, the pump goes on, and every byte arrives.
#[test]
fn a_hold_that_does_not_drain_is_released() {
    let setup = Setup::local(false, 64 * 1024);
    let h = header(MIB, 64 * MIB, 95, Mode::ServerFirst);
    let (proxy, target) = (setup.proxy.addr, setup.target.clone());
    let client = setup.client_ns.enter(move || {
        let mut stream = open_tunnel(proxy, &target);
        stream.write_all(&h.encode()).unwrap();
        // Past the hold deadline (2 s) before the first read.
        std::thread::sleep(Duration::from_secs(3));
        let received = spliced_tests::pattern::receive_checked(&mut stream, h.seed + 1);
        spliced_tests::pattern::send(&mut stream, h.seed, h.up).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        ClientResult { received }
    });
    let server = setup.upstream.result();
    setup.assert_exact(h, &client, &server);
    let records = setup.proxy.wait_json_records(1);
    assert_eq!(records[0]["dataplane"], "splice", "{}", records[0]);
    assert!(
        setup.proxy.stderr().contains("did not drain within"),
        "{}",
        setup.proxy.stderr()
    );
    let stats = setup.proxy.stats();
    assert!(stats["packet_held"] > 0, "{stats:?}");
    setup.assert_no_rejections();
}

/// The proxy host announces a much smaller window scale than the endpoints
/// (its tcp_rmem, hence its sockets' shift, is small): every window field is
/// rescaled between the two shifts, and clamped to 16 bits where the larger
/// shift's window does not fit the smaller one. The transfers stay exact.
#[test]
fn windows_rescaled_between_different_scales() {
    let topology = Topology::with_prefix(PREFIX);
    let status = topology
        .proxy
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_rmem=4096 65536 65536"])
        .status()
        .expect("sysctl");
    assert!(status.success());
    let setup = Setup::on(topology, false, 0);
    let headers = [
        header(16 * MIB, 16 * MIB + 1, 97, Mode::Concurrent),
        header(4 * MIB, 8 * MIB, 99, Mode::AnswerAfterEof),
    ];
    for h in headers {
        let (client, server) = setup.exchange(h, SETTLE);
        setup.assert_exact(h, &client, &server);
    }
    setup.assert_logged(&headers);
    setup.assert_no_rejections();
    let log = setup.proxy.stderr();
    let shifts = log
        .lines()
        .find(|line| line.contains("promoted after"))
        .and_then(|line| line.split("win_shift_in: ").nth(1))
        .unwrap_or_default()
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    let shift_out = log
        .split("win_shift_out: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default();
    assert_ne!(shifts, shift_out, "the shifts should differ here:\n{log}");
}

/// An endpoint of a translated flow that waits in silence learns of the idle
/// timeout at once: the proxy sends each endpoint a RST at the sequence
/// number it expects (its repair-mode sockets cannot), on loopback and across
/// veth. Without it the client would wait for its read to time out.
#[test]
fn an_idle_promoted_tunnel_is_reset_at_both_ends() {
    for net in [Net::Loopback, Net::Veth] {
        let setup = match net {
            Net::Loopback => Setup::local_with(false, 0, &["--read-timeout", "1"]),
            Net::Veth => Setup::on_with(
                Topology::with_prefix(PREFIX),
                false,
                0,
                &["--read-timeout", "1"],
            ),
        };
        let mut stream = setup.tunnel();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let read = stream.read(&mut buf);
        let waited = started.elapsed();
        let records = setup.proxy.wait_json_records(1);
        setup.assert_promoted(&records[0]);
        assert_eq!(records[0]["end"], "idle_timeout", "{}", records[0]);
        let err = read.expect_err("a clean EOF, or bytes, from a timed-out tunnel");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{net:?}: after {waited:?}: {err}\n{}",
            setup.proxy.stderr()
        );
        assert!(
            waited < Duration::from_secs(5),
            "{net:?}: reset after {waited:?}"
        );
        // The upstream's socket was reset too: no connection to it is left.
        let upstream_ns = setup.others.last().unwrap_or(&setup.client_ns);
        let port = setup.upstream.addr.port();
        let left = || {
            let output = upstream_ns
                .command("ss")
                .args([
                    "-Htn",
                    "state",
                    "established",
                    &format!("( sport = :{port} )"),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        assert!(
            spliced_tests::wait_until(Duration::from_secs(3), || left().is_empty()),
            "{net:?}: the upstream still has {}",
            left()
        );
    }
}
