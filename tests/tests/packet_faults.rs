//! The packet data plane on an impaired path: random loss, duplication and
//! reordering (`spliced_tests::netem`) on the veth links client — proxy and
//! proxy — server, from before the tunnel opens (so the cut-over itself runs
//! under them) or switched on once the tunnel translates.
//!
//! Every link end sends one segment per packet (as on a wire), so a loss or
//! a duplicate is one segment. Every tunnel's access-log record must say
//! `packet` (a tunnel that stayed on the splice pump fails the test) and
//! count exactly the bytes that were sent, every byte is checked at both
//! ends, and the endpoints' namespaces must show no PAWS, TSecr or checksum
//! rejection.
//!
//! The first test proves the impairments themselves on a plain TCP transfer
//! between two namespaces, with nftables, qdisc and `nstat` counters.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use spliced_tests::{
    netem::{one_segment_per_packet, Counts, Direction, Impaired, Impairment, Wire},
    netns::{Netns, Topology},
    open_tunnel, pattern,
    proxy::packet_args,
    upstream::{exchange, header, ClientResult, Header},
    Mode, Proxy, ServerResult, Upstream,
};

const MIB: u64 = 1 << 20;
const PREFIX: &str = "pkf";
/// How long a client waits after the `200` before it sends, so that a
/// tunnel with `--promote-after 0` is translating before its first byte.
const SETTLE: Duration = Duration::from_millis(100);

/// The levels the tests run at.
const LOSS: Impairment = Impairment::loss(2.0);
const DUPLICATION: Impairment = Impairment::duplicate(1.0);
const REORDERING: Impairment = Impairment::reorder(5.0);
const ALL: Impairment = Impairment {
    loss: 1.0,
    duplicate: 1.0,
    reorder: 5.0,
};

/// The tests of this file run one at a time: two 64 MiB transfers at once
/// on two busy cores delay softirq work by milliseconds (ksoftirqd), and a
/// segment that waits that long in a backlog while the others pass arrives
/// with a timestamp old enough for PAWS — without any proxy.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn get(counters: &HashMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The impairments themselves, without a proxy.

/// Two namespaces joined by a [`Wire`], one segment per packet.
struct Pair {
    wire: Wire,
    a: Netns,
    b: Netns,
}

impl Pair {
    const A: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

    fn new() -> Self {
        let (a, b) = (Netns::with_prefix(PREFIX), Netns::with_prefix(PREFIX));
        let (wire, a_dev, b_dev) = Wire::join(PREFIX, &a, Self::A, &b, Self::B);
        one_segment_per_packet(&a, &a_dev);
        one_segment_per_packet(&b, &b_dev);
        Self { wire, a, b }
    }

    /// Sends `len` pattern bytes from a to b over one plain TCP connection;
    /// returns what b received (checked byte by byte).
    fn transfer(&self, len: u64, seed: u64) -> Result<u64, String> {
        let listener = self
            .b
            .enter(|| TcpListener::bind(SocketAddr::new(Pair::B.into(), 0)).expect("bind in b"));
        let addr = listener.local_addr().unwrap();
        let receiver = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(spliced_tests::IO_TIMEOUT))
                .unwrap();
            pattern::receive_checked(&mut stream, seed)
        });
        self.a.enter(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_write_timeout(Some(spliced_tests::IO_TIMEOUT))
                .unwrap();
            pattern::send(&mut stream, seed, len).expect("send");
            stream.shutdown(Shutdown::Write).unwrap();
        });
        receiver.join().expect("receiver")
    }
}

fn share(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// Each impairment on its own, on a plain 32 MiB transfer a → b, shown by
/// the rules' counters and by what the two TCP stacks saw (`nstat`): loss
/// makes the sender retransmit, duplicates make the receiver send D-SACKs,
/// and delayed packets make the receiver queue segments out of order and
/// the sender detect reordering, with nothing lost.
#[test]
fn each_impairment_does_what_it_says() {
    let _serial = serial();
    const LEN: u64 = 32 * MIB;
    // Loss.
    let pair = Pair::new();
    let impaired = pair.wire.impair(Impairment::loss(3.0));
    assert_eq!(pair.transfer(LEN, 1), Ok(LEN));
    let data = impaired.counts(Direction::AToB);
    let (sender, receiver) = (pair.a.nstat(), pair.b.nstat());
    eprintln!(
        "loss 3 %: a→b {data:?} ({:.2} % dropped), b→a {:?}; sender retransmitted {}, receiver queued {} out of order, PAWS {}",
        share(data.dropped, data.seen),
        impaired.counts(Direction::BToA),
        get(&sender, "TcpRetransSegs"),
        get(&receiver, "TcpExtTCPOFOQueue"),
        get(&receiver, "TcpExtPAWSEstab"),
    );
    assert!(data.seen > 20_000, "one segment per packet: {data:?}");
    assert!(
        (2.5..3.5).contains(&share(data.dropped, data.seen)),
        "{data:?}"
    );
    // Every dropped data segment was sent again (a handful of a's packets are
    // not data: its handshake ACK and FIN).
    assert!(
        get(&sender, "TcpRetransSegs") + 3 >= data.dropped,
        "{data:?} {sender:?}"
    );
    drop((impaired, pair));

    // Duplication.
    let pair = Pair::new();
    let impaired = pair.wire.impair(Impairment::duplicate(2.0));
    assert_eq!(pair.transfer(LEN, 3), Ok(LEN));
    let data = impaired.counts(Direction::AToB);
    let (sender, receiver) = (pair.a.nstat(), pair.b.nstat());
    let dsacks = get(&receiver, "TcpExtTCPDSACKOldSent") + get(&receiver, "TcpExtTCPDSACKOfoSent");
    eprintln!(
        "duplication 2 %: a→b {data:?} ({:.2} % duplicated); receiver got {} segments for {} sent, sent {dsacks} D-SACKs, PAWS {}; sender retransmitted {}",
        share(data.duplicated, data.seen),
        get(&receiver, "TcpInSegs"),
        get(&sender, "TcpOutSegs"),
        get(&receiver, "TcpExtPAWSEstab"),
        get(&sender, "TcpRetransSegs"),
    );
    assert!(
        (1.6..2.4).contains(&share(data.duplicated, data.seen)),
        "{data:?}"
    );
    assert_eq!(data.dropped, 0);
    // Every duplicate reached the receiver as a second copy: it sent a D-SACK
    // for most (several duplicates may share one ACK), and took in one more
    // segment than was sent for each.
    assert!(
        get(&receiver, "TcpInSegs") >= get(&sender, "TcpOutSegs") + data.duplicated,
        "{sender:?} {receiver:?}"
    );
    assert!(dsacks * 10 >= data.duplicated * 8, "{receiver:?} {data:?}");
    drop((impaired, pair));

    // Reordering.
    let pair = Pair::new();
    let impaired = pair.wire.impair(Impairment::reorder(5.0));
    assert_eq!(pair.transfer(LEN, 5), Ok(LEN));
    let data = impaired.counts(Direction::AToB);
    let (sender, receiver) = (pair.a.nstat(), pair.b.nstat());
    let paws = |c: &HashMap<String, u64>| get(c, "TcpExtPAWSEstab") + get(c, "TcpExtPAWSOldAck");
    eprintln!(
        "reordering 5 %: a→b {data:?} ({:.2} % picked); receiver queued {} segments out of order, PAWS-dropped {}; sender saw reordering {} times (SACK) + {} (TS), retransmitted {} ({} undone), PAWS-dropped {}",
        share(data.delayed, data.seen - data.superseded),
        get(&receiver, "TcpExtTCPOFOQueue"),
        paws(&receiver),
        get(&sender, "TcpExtTCPSACKReorder"),
        get(&sender, "TcpExtTCPTSReorder"),
        get(&sender, "TcpRetransSegs"),
        get(&sender, "TcpExtTCPFullUndo") + get(&sender, "TcpExtTCPPartialUndo") + get(&sender, "TcpExtTCPDSACKUndo"),
        paws(&sender),
    );
    // Of a→b's packets less the retransmissions dropped for overtaking a
    // held segment (about 95 % of them segments with data).
    assert!(
        (4.0..6.0).contains(&share(data.delayed, data.seen - data.superseded)),
        "{data:?}"
    );
    assert_eq!(data.dropped, 0, "{data:?}");
    assert_eq!(
        data.delayed_sent + data.late_dropped,
        data.delayed,
        "{data:?}"
    );
    // Some were lost (the holding thread woke too late for them: softirq
    // work on a busy machine), some went on at once (their millisecond was
    // over when they reached the wire: their sender stamped them well before
    // it sent them), and at least a quarter were held; segments arrived out
    // of order, many behind each held one.
    assert!(data.late_dropped * 2 <= data.delayed, "{data:?}");
    assert!(
        (data.delayed_sent - data.not_delayed) * 4 >= data.delayed,
        "{data:?}"
    );
    assert!(
        get(&receiver, "TcpExtTCPOFOQueue") >= data.delayed,
        "{receiver:?} {data:?}"
    );
    // Next to no segment was too old for PAWS (see `Setup::assert_no_rejections`).
    for counters in [&sender, &receiver] {
        assert!(paws(counters) <= data.delayed_sent / 100, "{counters:?}");
    }
}

// ---------------------------------------------------------------------------
// Through the proxy.

/// Which link an impairment is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// client — proxy.
    Client,
    /// proxy — server.
    Server,
}

/// Client — wire — proxy — wire — server, one segment per packet, the
/// proxy on the packet plane. Fields drop in order: the proxy and the
/// impairments go before the namespaces.
struct Setup {
    proxy: Proxy,
    upstream: Upstream,
    impaired: Vec<(Side, Impaired)>,
    /// Held-back segments the removed impairments sent on.
    held_before: u64,
    /// Packets the removed impairments duplicated.
    duplicated_before: u64,
    /// The wires client — proxy and proxy — server.
    wires: [Wire; 2],
    topology: Topology,
    target: String,
}

impl Setup {
    fn start(ipv6: bool, promote_after: u64) -> Self {
        let (client, proxy_ns, server) = (
            Netns::with_prefix(PREFIX),
            Netns::with_prefix(PREFIX),
            Netns::with_prefix(PREFIX),
        );
        let (client_wire, client_dev, proxy_client_dev) = Wire::join(
            PREFIX,
            &client,
            Topology::CLIENT_IP,
            &proxy_ns,
            Topology::PROXY_IP,
        );
        let (server_wire, proxy_server_dev, server_dev) = Wire::join(
            PREFIX,
            &proxy_ns,
            Topology::PROXY_SERVER_SIDE_IP,
            &server,
            Topology::SERVER_IP,
        );
        let topology = Topology {
            client,
            proxy: proxy_ns,
            server,
            client_link: (client_dev, proxy_client_dev),
            server_link: (proxy_server_dev, server_dev),
        };
        one_segment_per_packet(&topology.client, &topology.client_link.0);
        one_segment_per_packet(&topology.proxy, &topology.client_link.1);
        one_segment_per_packet(&topology.proxy, &topology.server_link.0);
        one_segment_per_packet(&topology.server, &topology.server_link.1);
        let (listen_ip, server_ip): (IpAddr, IpAddr) = if ipv6 {
            topology.add_ipv6();
            (Topology::PROXY_IP6.into(), Topology::SERVER_IP6.into())
        } else {
            (Topology::PROXY_IP.into(), Topology::SERVER_IP.into())
        };
        let upstream = Upstream::start_in(&topology.server, SocketAddr::new(server_ip, 8443));
        let args = packet_args(promote_after, 8443, SocketAddr::new(listen_ip, 3128));
        let proxy = Proxy::start_in(
            &topology.proxy,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        Self {
            target: upstream.addr.to_string(),
            proxy,
            upstream,
            impaired: Vec::new(),
            held_before: 0,
            duplicated_before: 0,
            wires: [client_wire, server_wire],
            topology,
        }
    }

    /// Impairs both directions of the `side` link.
    fn impair(&mut self, side: Side, impairment: Impairment) {
        let wire = match side {
            Side::Client => &self.wires[0],
            Side::Server => &self.wires[1],
        };
        self.impaired.push((side, wire.impair(impairment)));
    }

    /// Removes every impairment; returns what they did.
    fn unimpair(&mut self) -> Vec<(Side, Counts)> {
        let counts = self.counts();
        self.held_before += counts.iter().map(|(_, c)| c.delayed_sent).sum::<u64>();
        self.duplicated_before += counts.iter().map(|(_, c)| c.duplicated).sum::<u64>();
        self.impaired.clear();
        counts
    }

    /// Held-back segments the impairments have sent on, so far.
    fn held(&self) -> u64 {
        self.held_before
            + self
                .counts()
                .iter()
                .map(|(_, c)| c.delayed_sent)
                .sum::<u64>()
    }

    /// What each impairment did, both directions added.
    fn counts(&self) -> Vec<(Side, Counts)> {
        self.impaired
            .iter()
            .map(|(side, impaired)| (*side, impaired.total()))
            .collect()
    }

    /// Runs the client side of `h` on a thread of its own (in the client's
    /// namespace), waiting `settle` after the `200`.
    fn start_exchange(&self, h: Header, settle: Duration) -> std::thread::JoinHandle<ClientResult> {
        let (proxy, target) = (self.proxy.addr, self.target.clone());
        let ns = self.topology.client.name.clone();
        std::thread::spawn(move || {
            spliced_tests::netns::enter_named(&ns, move || {
                let stream = open_tunnel(proxy, &target);
                std::thread::sleep(settle);
                exchange(stream, h, false)
            })
        })
    }

    fn exchange(&self, h: Header, settle: Duration) -> (ClientResult, ServerResult) {
        let client = self.start_exchange(h, settle).join().expect("client");
        (client, self.upstream.result())
    }

    /// Runs `h` through a tunnel whose client sends its first byte only once
    /// the proxy has logged the `promotions`-th promotion: qualification
    /// under loss can take longer than any fixed wait (a lost window probe
    /// or its answer costs the qualification a 200 ms sighting wait).
    fn exchange_once_promoted(&self, h: Header, promotions: usize) -> (ClientResult, ServerResult) {
        let (proxy, target) = (self.proxy.addr, self.target.clone());
        let ns = self.topology.client.name.clone();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            spliced_tests::netns::enter_named(&ns, move || {
                let stream = open_tunnel(proxy, &target);
                // Bounded: the sender is dropped when the wait below fails.
                let _ = wait.recv_timeout(Duration::from_secs(15));
                exchange(stream, h, false)
            })
        });
        self.wait_promoted(promotions);
        go.send(()).expect("the client waits for the promotion");
        (client.join().expect("client"), self.upstream.result())
    }

    /// Waits until `count` tunnels were promoted; fails with the refusals if
    /// not within 10 s.
    fn wait_promoted(&self, count: usize) {
        let ok = self
            .proxy
            .logged_times("packet: tunnel promoted after", count);
        assert!(ok, "{count} promotions expected\n{}", self.refusals());
    }

    /// The proxy's "not promoted" log lines.
    fn refusals(&self) -> String {
        self.proxy
            .stderr()
            .lines()
            .filter(|l| l.contains("not promoted") || l.contains("cut-over"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn assert_exact(&self, h: Header, client: &ClientResult, server: &ServerResult) {
        assert_eq!(
            server.received,
            Ok(h.up),
            "upstream side of {h:?}\n{}",
            self.diagnostics()
        );
        assert_eq!(
            client.received,
            Ok(h.down),
            "client side of {h:?}\n{}",
            self.diagnostics()
        );
    }

    fn diagnostics(&self) -> String {
        format!(
            "impairments: {:?}\nproxy log:\n{}",
            self.counts(),
            self.proxy.stderr()
        )
    }

    /// The records of `headers` (closed tunnels): each ran on `packet` and
    /// counted exactly what the exchange moved (32-byte exchange header,
    /// 39-byte `200`).
    fn assert_logged(&self, headers: &[Header]) -> Vec<serde_json::Value> {
        let records = self.proxy.wait_json_records(headers.len());
        let mut logged: Vec<(u64, u64)> = records
            .iter()
            .map(|r| {
                assert_eq!(r["status"], 200, "{r}");
                assert_eq!(
                    r["dataplane"],
                    "packet",
                    "a tunnel was not promoted: {r}\n{}\n{}",
                    self.refusals(),
                    self.diagnostics()
                );
                assert_eq!(r["end"], "closed", "{r}\n{}", self.diagnostics());
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
            self.diagnostics()
        );
        records
    }

    /// No endpoint rejected a translated segment: TSecr, checksum, PAWS.
    ///
    /// PAWS: none at all unless the path reordered. With reordering, the
    /// receiver may drop a segment that waited while newer ones passed (see
    /// `netem`: the impairment keeps its own holds within the timestamp's
    /// millisecond, but on this busy machine the held segments re-sent from
    /// another CPU, and some others, wait milliseconds in a backlog), and the
    /// plain TCP transfer of `each_impairment_does_what_it_says` shows the
    /// same without any proxy. So there a few are let pass: at most one per
    /// hundred segments held back. A timestamp-translation error would
    /// reject the translated segments wholesale, and the tests without
    /// reordering would show it at every cut-over.
    fn assert_no_rejections(&self) {
        let held = self.held();
        for ns in [&self.topology.client, &self.topology.server] {
            let counters = ns.nstat();
            for name in ["TcpExtTSEcrRejected", "TcpInCsumErrors"] {
                assert_eq!(
                    get(&counters, name),
                    0,
                    "{name} in {}: {counters:?}\n{}",
                    ns.name,
                    self.diagnostics()
                );
            }
            // A duplicated pure ACK that arrives after a newer segment carries
            // an older TSval: the receiver drops it as an old ACK, as it does
            // without a proxy. At most one per duplicate.
            let duplicated = self.duplicated_before
                + self.counts().iter().map(|(_, c)| c.duplicated).sum::<u64>();
            let old_acks = get(&counters, "TcpExtPAWSOldAck");
            assert!(
                old_acks <= duplicated + held / 100,
                "{old_acks} old ACKs dropped by PAWS in {} ({duplicated} packets duplicated): {counters:?}\n{}",
                ns.name,
                self.diagnostics()
            );
            let paws = get(&counters, "TcpExtPAWSEstab") + old_acks.saturating_sub(duplicated);
            assert!(
                paws <= held / 100,
                "{paws} PAWS rejections in {} ({held} segments held back): {counters:?}\n{}",
                ns.name,
                self.diagnostics()
            );
            if paws > 0 {
                eprintln!(
                    "{paws} PAWS rejections in {} ({held} segments held back)",
                    ns.name
                );
            }
        }
    }

    /// One line of what happened, for `--nocapture`.
    fn report(&self, what: &str, started: Instant) {
        let endpoints: Vec<String> = [&self.topology.client, &self.topology.server]
            .iter()
            .map(|ns| {
                let c = ns.nstat();
                format!(
                    "retrans {} ofo {} dsack-rx {} paws {}",
                    get(&c, "TcpRetransSegs"),
                    get(&c, "TcpExtTCPOFOQueue"),
                    get(&c, "TcpExtTCPDSACKRecv"),
                    get(&c, "TcpExtPAWSEstab")
                )
            })
            .collect();
        let log = self.proxy.stderr();
        let holds: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split("packet: tunnel promoted after ").nth(1))
            .filter_map(|l| l.split(": [").next())
            .map(str::trim)
            .collect();
        eprintln!(
            "{what}: {:.1} s; impairments {:?}; client [{}] server [{}]; promoted after {holds:?}",
            started.elapsed().as_secs_f64(),
            self.counts(),
            endpoints[0],
            endpoints[1],
        );
    }
}

/// With `impairment` on the `side` link from before the tunnels open, the
/// cut-over happens under it: `--promote-after 256 KiB` (the tunnel is held
/// with bytes in flight both ways) with 64 MiB each way at once; then, on the
/// same proxy and with the link clean until then, a tunnel that is impaired
/// only once it translates (every segment after that one is a translated
/// one).
fn impaired(side: Side, impairment: Impairment, ipv6: bool) {
    let started = Instant::now();
    let mut setup = Setup::start(ipv6, 256 * 1024);
    setup.impair(side, impairment);
    let during = header(64 * MIB + 3, 64 * MIB, 11, Mode::Concurrent);
    let (client, server) = setup.exchange(during, Duration::ZERO);
    setup.assert_exact(during, &client, &server);
    let records = setup.assert_logged(&[during]);
    let before = &records[0]["bytes_before_promotion"];
    let moved = before["client_to_upstream"].as_u64().unwrap()
        + before["upstream_to_client"].as_u64().unwrap();
    assert!(moved >= 256 * 1024, "{}", records[0]);
    setup.report(
        &format!("{side:?} {impairment:?} during the cut-over"),
        started,
    );
    let counts = setup.unimpair();
    assert!(
        counts.iter().all(|(_, c)| c.seen > 40_000),
        "the impairment saw the tunnel: {counts:?}"
    );

    let started = Instant::now();
    let after = header(48 * MIB, 48 * MIB + 1, 13, Mode::Concurrent);
    let client = setup.start_exchange(after, Duration::ZERO);
    setup.wait_promoted(2);
    setup.impair(side, impairment);
    let client = client.join().expect("client");
    let server = setup.upstream.result();
    setup.assert_exact(after, &client, &server);
    setup.assert_logged(&[during, after]);
    setup.report(&format!("{side:?} {impairment:?} after promotion"), started);
    let stats = setup.proxy.stats();
    assert!(stats["packet_translated"] > 20_000, "{stats:?}");
    setup.assert_no_rejections();
}

/// With `impairment` on both links from before the tunnels open and
/// `--promote-after 0`: every tunnel is cut over under it before its first
/// byte (the client waits after the `200` until the proxy logs the
/// promotion), then carries everything
/// translated: 0 B, small, 1 MiB each way, 64 MiB both ways at once.
fn impaired_at_once(impairment: Impairment, ipv6: bool) {
    let started = Instant::now();
    let mut setup = Setup::start(ipv6, 0);
    // See `upstream_handshake_ack_lost_then_promoted_at_once`.
    for wire in &setup.wires {
        wire.spare_handshakes();
    }
    setup.impair(Side::Client, impairment);
    setup.impair(Side::Server, impairment);
    let headers = [
        header(0, 0, 21, Mode::Concurrent),
        header(1000, 2000, 23, Mode::Concurrent),
        header(MIB, MIB, 25, Mode::AnswerAfterEof),
        header(64 * MIB, 64 * MIB + 7, 27, Mode::Concurrent),
    ];
    for (done, h) in headers.into_iter().enumerate() {
        let (client, server) = setup.exchange_once_promoted(h, done + 1);
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
    setup.report(&format!("both sides {impairment:?} at once"), started);
    setup.assert_no_rejections();
}

/// Every packet on the proxy — server link duplicated, both ways, with the
/// tunnels translating before their first byte: each segment the endpoints
/// exchange reaches them twice.
#[test]
fn every_packet_duplicated() {
    let _serial = serial();
    let mut setup = Setup::start(false, 0);
    setup.impair(Side::Server, Impairment::duplicate(100.0));
    let headers: Vec<Header> = (0..4)
        .map(|i| header(MIB + i, 2 * MIB + i, 31 + 2 * i, Mode::AnswerAfterEof))
        .collect();
    for &h in &headers {
        let (client, server) = setup.exchange(h, SETTLE);
        setup.assert_exact(h, &client, &server);
    }
    setup.assert_logged(&headers);
    let counts = setup.unimpair();
    assert!(
        counts
            .iter()
            .all(|(_, c)| c.duplicated == c.seen && c.seen > 1000),
        "{counts:?}"
    );
    setup.assert_no_rejections();
}

/// Known product issue, not fixed here (see the report): the upstream's
/// copy of the handshake's last ACK (proxy → upstream) is lost, so the
/// upstream is still in SYN-RECV when a tunnel with `--promote-after 0` is
/// cut over (the proxy's socket is established; nothing it sends later
/// completes the handshake, since the cut-over silences it). The client's
/// first translated segments echo the proxy's own pre-cut TSval, which maps
/// to a TSecr the upstream never sent: its SYN-RECV check drops them
/// (TcpExtTSEcrRejected, ~18 here) until its rate-limited answer, translated
/// back, gives the client a TSval to echo: about a second lost. Ignored
/// until fixed; run with `--ignored`.
#[test]
#[ignore = "known issue, --promote-after 0 only: promotion at once into a half-open upstream connection stalls ~1 s (any byte moved before the cut completes the handshake)"]
fn upstream_handshake_ack_lost_then_promoted_at_once() {
    let _serial = serial();
    let setup = Setup::start(false, 0);
    // The first pure ACK proxy → upstream of each connection: the
    // handshake's last segment.
    let script = "add set netdev wire first { typeof tcp sport . tcp dport; }\n\
        add rule netdev wire ab tcp flags & (syn | ack | fin | rst | psh) == ack \
        tcp sport . tcp dport != @first add @first { tcp sport . tcp dport } drop\n";
    let mut nft = setup.wires[1]
        .ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    std::io::Write::write_all(&mut nft.stdin.take().expect("stdin"), script.as_bytes())
        .expect("nft script");
    assert!(nft.wait().expect("nft").success());
    let started = Instant::now();
    let h = header(MIB, MIB, 41, Mode::Concurrent);
    let (client, server) = setup.exchange(h, SETTLE);
    setup.assert_exact(h, &client, &server);
    setup.assert_logged(&[h]);
    setup.assert_no_rejections();
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "1 MiB each way took {:?}",
        started.elapsed()
    );
}

#[test]
fn loss_on_the_client_side() {
    let _serial = serial();
    impaired(Side::Client, LOSS, false);
}

#[test]
fn loss_on_the_server_side() {
    let _serial = serial();
    impaired(Side::Server, LOSS, false);
}

#[test]
fn duplication_on_the_client_side() {
    let _serial = serial();
    impaired(Side::Client, DUPLICATION, false);
}

#[test]
fn duplication_on_the_server_side() {
    let _serial = serial();
    impaired(Side::Server, DUPLICATION, false);
}

#[test]
fn reordering_on_the_client_side() {
    let _serial = serial();
    impaired(Side::Client, REORDERING, false);
}

#[test]
fn reordering_on_the_server_side() {
    let _serial = serial();
    impaired(Side::Server, REORDERING, false);
}

#[test]
fn all_together_on_the_client_side() {
    let _serial = serial();
    impaired(Side::Client, ALL, false);
}

#[test]
fn all_together_on_the_server_side_ipv6() {
    let _serial = serial();
    impaired(Side::Server, ALL, true);
}

#[test]
fn all_together_on_both_sides_promoted_at_once_ipv4() {
    let _serial = serial();
    impaired_at_once(ALL, false);
}

#[test]
fn all_together_on_both_sides_promoted_at_once_ipv6() {
    let _serial = serial();
    impaired_at_once(ALL, true);
}
