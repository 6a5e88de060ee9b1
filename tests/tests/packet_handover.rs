//! Promoted tunnels outlive the process (`--packet-state-dir`): the pinned tc
//! programs keep translating while no spliced runs, the next spliced adopts
//! the tunnels (their 4-tuples reserved again) and logs them when they end,
//! and SIGTERM hands them over at once instead of draining them.
//!
//! Each test has a network namespace of its own (names start with `ph`) and
//! a bpffs of its own for the state directory, unmounted at the end (which
//! detaches whatever programs are still pinned there).

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use spliced_tests::{
    bpffs::Bpffs,
    daemon::Spliced,
    netns::{Netns, Topology},
    open_tunnel, pattern,
    upstream::{header, Header},
    wait_until, Mode, Upstream,
};

const MIB: u64 = 1 << 20;
const LISTEN: &str = "127.0.0.1:3128";

/// The state directory, on a bpffs of the test's own (see
/// [`spliced_tests::bpffs`]).
struct StateDir {
    bpffs: Bpffs,
}

impl StateDir {
    fn new() -> Self {
        Self {
            bpffs: Bpffs::mount(),
        }
    }

    fn path(&self) -> String {
        self.bpffs
            .path()
            .join("spliced")
            .to_string_lossy()
            .into_owned()
    }

    /// The pins in the state directory's one namespace part (`net-INODE`).
    fn pins(&self) -> Vec<String> {
        let names = |dir: &std::path::Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .map(|dir| {
                    dir.filter_map(Result::ok)
                        .map(|entry| entry.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        };
        let root = PathBuf::from(self.path());
        let parts = names(&root);
        assert!(
            parts.len() == 1 && parts[0].starts_with("net-"),
            "{parts:?}"
        );
        names(&root.join(&parts[0]))
    }
}

/// An upstream, the state directory, and the spliced processes that take
/// turns between them: on the `lo` of one namespace, or across three joined
/// by veth (client — proxy — server).
struct Setup {
    upstream: Upstream,
    /// Where spliced listens.
    listen: SocketAddr,
    state: StateDir,
    dir: tempfile::TempDir,
    /// Client, proxy and server namespaces: one for all three on loopback.
    nets: Vec<Netns>,
}

impl Setup {
    fn new() -> Self {
        let ns = Netns::with_prefix("ph");
        ns.set_default_tcp_buffers();
        Self {
            upstream: Upstream::start_in(&ns, "127.0.0.1:0".parse().unwrap()),
            listen: LISTEN.parse().unwrap(),
            state: StateDir::new(),
            dir: tempfile::tempdir().unwrap(),
            nets: vec![ns],
        }
    }

    fn veth() -> Self {
        let topology = Topology::with_prefix("ph");
        for ns in [&topology.client, &topology.proxy, &topology.server] {
            ns.set_default_tcp_buffers();
        }
        let upstream = Upstream::start_in(
            &topology.server,
            SocketAddr::new(Topology::SERVER_IP.into(), 8443),
        );
        let Topology {
            client,
            proxy,
            server,
            ..
        } = topology;
        Self {
            upstream,
            listen: SocketAddr::new(Topology::PROXY_IP.into(), 3128),
            state: StateDir::new(),
            dir: tempfile::tempdir().unwrap(),
            nets: vec![client, proxy, server],
        }
    }

    fn client_ns(&self) -> &Netns {
        &self.nets[0]
    }

    fn proxy_ns(&self) -> &Netns {
        &self.nets[1.min(self.nets.len() - 1)]
    }

    fn server_ns(&self) -> &Netns {
        &self.nets[self.nets.len() - 1]
    }

    /// Starts spliced number `n` (its own access log) with the state
    /// directory and `extra` arguments.
    fn spliced(&self, n: usize, extra: &[&str]) -> Spliced {
        let log = self.log(n);
        let port = self.upstream.addr.port().to_string();
        let state = self.state.path();
        let listen = self.listen.to_string();
        let mut args = vec![
            "--dataplane",
            "packet",
            "--packet-state-dir",
            &state,
            "--listen",
            &listen,
            "--connect-ports",
            &port,
            "--access-log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
        ];
        args.extend_from_slice(extra);
        Spliced::start_in(self.proxy_ns(), &args, 1)
    }

    /// The `/metrics` text of `spliced` (started with `--admin`).
    fn metrics(&self, spliced: &Spliced) -> String {
        let admin = admin_addr(spliced);
        self.proxy_ns()
            .enter(move || spliced_tests::proxy::http_get(admin, "/metrics"))
            .expect("GET /metrics")
    }

    /// Waits until `spliced`'s flows map holds `count` entries.
    fn wait_entries(&self, spliced: &Spliced, count: usize) {
        let line = format!("spliced_packet_entries {count}");
        let mut metrics = String::new();
        let held = wait_until(Duration::from_secs(10), || {
            metrics = self.metrics(spliced);
            metrics.lines().any(|l| l == line)
        });
        assert!(held, "no {line}:\n{metrics}");
    }

    fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("access-{n}.log"))
    }

    /// The access-log records of spliced number `n`.
    fn records(&self, n: usize) -> Vec<serde_json::Value> {
        spliced_tests::complete_lines(&self.log(n))
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn tunnel(&self) -> TcpStream {
        let (proxy, target) = (self.listen, self.upstream.addr);
        self.client_ns()
            .enter(move || open_tunnel(proxy, &target.to_string()))
    }

    /// The sockets of this namespace from `local` to `peer`, with their
    /// owners (`ss -p`).
    fn sockets(&self, local: SocketAddr, peer: SocketAddr) -> String {
        let output = self
            .proxy_ns()
            .command("ss")
            .args([
                "-Htnp",
                "state",
                "established",
                "src",
                &local.to_string(),
                "dst",
                &peer.to_string(),
            ])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The one line of `spliced`'s log containing `needle`, waited for.
fn wait_line(spliced: &Spliced, needle: &str) -> String {
    spliced.wait_log(0, needle)
}

/// The admin listener's address, from the log.
fn admin_addr(spliced: &Spliced) -> SocketAddr {
    let line = spliced.wait_log(0, "admin endpoint on http://");
    line.split("admin endpoint on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no admin address in {line}"))
}

/// The bytes moved before promotion, from the proxy's debug line.
fn promoted_after(line: &str) -> [u64; 2] {
    let rest = line
        .split("promoted after ")
        .nth(1)
        .expect("promotion line");
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u64>().unwrap());
    [numbers.next().unwrap(), numbers.next().unwrap()]
}

/// Sends `range` of the client's pattern and checks the upstream is still
/// taking it (a send into a broken flow blocks, then times out).
fn send(stream: &mut TcpStream, h: &Header, from: u64, to: u64) {
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    pattern::send_range(stream, h.seed, from, to)
        .unwrap_or_else(|err| panic!("sending bytes {from}..{to}: {err}"));
}

/// The client's side of the end: its write side closed, the whole answer
/// received and checked, and the upstream's count checked.
fn finish(setup: &Setup, mut stream: TcpStream, h: &Header) {
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let received = pattern::receive_checked(&mut stream, h.seed + 1);
    assert_eq!(received, Ok(h.down));
    assert_eq!(setup.upstream.result().received, Ok(h.up));
}

/// The only tunnel record of spliced number `n`: adopted from the previous
/// process, it counts every byte of the tunnel, the previous process's too.
fn assert_adopted_record(setup: &Setup, n: usize, h: &Header, before: [u64; 2]) {
    assert!(
        wait_until(Duration::from_secs(15), || !setup.records(n).is_empty()),
        "spliced {n} logged no record"
    );
    let records = setup.records(n);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(record["dataplane"], "packet", "{record}");
    assert_eq!(record["end"], "closed", "{record}");
    assert_eq!(record["method"], "CONNECT", "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(
        record["target"],
        setup.upstream.addr.to_string(),
        "{record}"
    );
    assert_eq!(record["bytes_from_client"], 32 + h.up, "{record}");
    assert_eq!(record["bytes_to_client"], 39 + h.down, "{record}");
    assert_eq!(
        record["bytes_before_promotion"],
        serde_json::json!({"client_to_upstream": before[0], "upstream_to_client": before[1]}),
        "{record}"
    );
}

/// spliced is killed (SIGKILL) with one tunnel promoted in the middle of a
/// transfer and one still on the splice pump. With no spliced running, the
/// promoted tunnel keeps moving bytes (the pinned programs translate them);
/// the next spliced adopts it, holds its 4-tuples, removes the other
/// tunnel's entries, and logs the promoted one — with every byte, those of
/// the killed process included — when it ends.
#[test]
fn a_killed_proxys_promoted_tunnel_flows_on_and_the_next_one_adopts_it() {
    killed_then_adopted(Setup::new(), 601);
}

/// [`a_killed_proxys_promoted_tunnel_flows_on_and_the_next_one_adopts_it`]
/// across veth, where the programs redirect each translated segment to the
/// other device.
#[test]
fn a_killed_proxys_promoted_tunnel_flows_on_across_veth() {
    killed_then_adopted(Setup::veth(), 603);
}

fn killed_then_adopted(setup: Setup, seed: u64) {
    let mut first = setup.spliced(1, &["--admin", "127.0.0.1:0"]);
    let pins = setup.state.pins();
    let links = pins.iter().filter(|pin| pin.starts_with("link-")).count();
    // Both programs on `lo`, and on the proxy's two veth ends.
    assert_eq!(links, 2 * setup.nets.len(), "{pins:?}");
    for map in ["events", "flows", "stats", "tunnels"] {
        assert!(pins.iter().any(|pin| pin == map), "{pins:?}");
    }
    let h = header(24 * MIB, 8 * MIB + 3, seed, Mode::AnswerAfterEof);
    let mut stream = setup.tunnel();
    stream.write_all(&h.encode()).unwrap();
    send(&mut stream, &h, 0, 8 * MIB);
    let promotion = wait_line(&first, "packet: tunnel promoted after");
    let before = promoted_after(&promotion);
    assert!(before[0] >= MIB, "{promotion}");
    // A second tunnel, idle: it stays on the splice pump (default
    // --promote-after) and dies with the process.
    let mut idle = setup.tunnel();
    // Both tunnels registered (two entries each) before the kill.
    setup.wait_entries(&first, 4);

    first.signal(libc::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(10)).is_some());
    send(&mut stream, &h, 8 * MIB, 16 * MIB);
    // The idle tunnel's sockets were closed with the process.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(std::io::Read::read(&mut idle, &mut buf), Ok(0) | Err(_)),
        "the pump tunnel outlived its process"
    );

    let second = setup.spliced(2, &["--admin", "127.0.0.1:0"]);
    let adopted = wait_line(&second, "packet plane: adopted");
    let metrics = setup.metrics(&second);
    assert!(
        metrics.contains("spliced_packet_adopted_total 1"),
        "{metrics}"
    );
    assert!(
        adopted.contains("adopted 1 promoted tunnels") && adopted.contains("removed 1 flows"),
        "{adopted}"
    );
    // Both 4-tuples are held again, by sockets of the new process (in repair
    // mode they show as established).
    let upstream_local = upstream_side_local(&setup);
    let client = stream.local_addr().unwrap();
    for (local, peer) in [
        (upstream_local, setup.upstream.addr),
        (setup.listen, client),
    ] {
        let held = setup.sockets(local, peer);
        let pid = format!("pid={}", second.pid());
        assert!(
            held.contains(&pid),
            "{local} → {peer} not held by {pid}: {held:?}"
        );
    }

    send(&mut stream, &h, 16 * MIB, h.up);
    finish(&setup, stream, &h);
    assert_adopted_record(&setup, 2, &h, before);
    assert!(setup.records(1).iter().all(|r| r["status"] != 200));
}

/// The local address of the proxy's connection to the upstream, from the
/// upstream's side of it (`ss` in the namespace).
fn upstream_side_local(setup: &Setup) -> SocketAddr {
    let output = setup
        .server_ns()
        .command("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "src",
            &setup.upstream.addr.to_string(),
        ])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no upstream connection: {text}"));
    line.split_whitespace()
        .last()
        .and_then(|peer| peer.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line}"))
}

/// SIGTERM with a promoted tunnel in the middle of a transfer and a long
/// `shutdown_lifetime`: the tunnel is handed over at once and spliced exits
/// without waiting, writing no record for it; the tunnel goes on without a
/// process and the next spliced logs it when it ends.
#[test]
fn sigterm_hands_a_promoted_tunnel_over_and_exits_at_once() {
    let setup = Setup::new();
    let mut first = setup.spliced(1, &["--shutdown-lifetime", "60", "--promote-after", "0"]);
    let h = header(12 * MIB, 12 * MIB + 5, 611, Mode::AnswerAfterEof);
    let mut stream = setup.tunnel();
    wait_line(&first, "packet: tunnel promoted after");
    stream.write_all(&h.encode()).unwrap();
    send(&mut stream, &h, 0, 4 * MIB);

    let signalled = Instant::now();
    first.signal(libc::SIGTERM);
    let (status, _) = first
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still draining:\n{}", first.stderr()));
    assert!(status.success(), "{status}:\n{}", first.stderr());
    assert!(signalled.elapsed() < Duration::from_secs(5));
    first.wait_log(0, "handed over to the next process");
    assert!(setup.records(1).iter().all(|r| r["status"] != 200));

    send(&mut stream, &h, 4 * MIB, 8 * MIB);
    let second = setup.spliced(2, &[]);
    wait_line(&second, "adopted 1 promoted tunnels");
    send(&mut stream, &h, 8 * MIB, h.up);
    finish(&setup, stream, &h);
    assert_adopted_record(&setup, 2, &h, [0, 0]);
}

/// An adopted tunnel is subject to the new process's `read_timeout`: idle, it
/// ends `idle_timeout`, and both endpoints learn of it.
#[test]
fn an_adopted_idle_tunnel_ends_at_the_read_timeout() {
    let setup = Setup::new();
    let mut first = setup.spliced(1, &["--promote-after", "0"]);
    let h = header(MIB, MIB, 621, Mode::AnswerAfterEof);
    let mut stream = setup.tunnel();
    wait_line(&first, "packet: tunnel promoted after");
    stream.write_all(&h.encode()).unwrap();
    first.signal(libc::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(10)).is_some());

    let second = setup.spliced(2, &["--read-timeout", "2"]);
    wait_line(&second, "adopted 1 promoted tunnels");
    assert!(
        wait_until(Duration::from_secs(15), || !setup.records(2).is_empty()),
        "{}",
        second.stderr()
    );
    assert_eq!(setup.records(2)[0]["end"], "idle_timeout");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut stream, &mut buf);
    assert!(read.is_err(), "the client was not reset: {read:?}");
}

/// Two spliced processes cannot share a state directory in one network
/// namespace (each would adopt the other's tunnels); the second says why
/// and does not start. A path off the bpffs is refused as clearly.
#[test]
fn a_state_directory_serves_one_process_per_namespace() {
    let setup = Setup::new();
    let _first = setup.spliced(1, &[]);
    let state = setup.state.path();
    let port = setup.upstream.addr.port().to_string();
    for (dir, expected) in [
        (
            state.as_str(),
            "is in use by another spliced in this network namespace",
        ),
        ("/tmp/spliced-state", "is not on a bpffs"),
    ] {
        let mut second = Spliced::spawn_in(
            setup.proxy_ns(),
            &[
                "--dataplane",
                "packet",
                "--packet-state-dir",
                dir,
                "--listen",
                "127.0.0.1:3129",
                "--connect-ports",
                &port,
            ],
        );
        let (status, _) = second
            .wait_exit(Duration::from_secs(10))
            .expect("the second spliced should not start");
        assert!(!status.success());
        // The pipe's last lines may still be on their way.
        let said = wait_until(Duration::from_secs(5), || {
            second.stderr().contains(expected)
        });
        assert!(said, "{}", second.stderr());
    }
}
