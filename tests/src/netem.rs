//! Impaired paths without netem (this kernel has no `sch_netem`): random
//! loss, duplication and reordering of TCP packets on a link between two of
//! a test's namespaces, switched on and off while connections run.
//!
//! A [`Wire`] is a namespace of its own standing in for the cable between
//! two namespaces: a veth pair to each, and an nftables `netdev` table that
//! forwards every frame arriving on one of its ends out of the other (`fwd
//! to` on the `ingress` hook): an L2 patch cable. An [`Impairment`] acts
//! there, on the TCP packets of one direction or both:
//!
//! * loss: `numgen random mod 10000 < N drop`;
//! * duplication: `dup to <out>`: a copy is sent right before the packet;
//! * reordering: `fwd to` a device inside the wire where a thread of the
//!   test process picks the packet up (an `AF_PACKET` socket sees what the
//!   device transmits, at once; the device itself leads nowhere) and sends
//!   it out of the wire's outgoing end up to [`REORDER_DELAY`] later, while
//!   the packets after it pass. Only segments with data are picked (frames
//!   over [`REORDER_MIN_FRAME`] bytes). The sockets pass the checksum state
//!   along (`PACKET_VNET_HDR`): a packet whose checksum was left to offload
//!   stays so, one whose checksum is final is checked by its receiver.
//!
//! Reordering is kept from making a receiver drop a held segment for its
//! timestamp, which a test could not tell from a timestamp-translation
//! error: PAWS drops a segment whose TSval is 2 or more below `ts_recent`,
//! and any segment at or below the next expected byte sets `ts_recent`, the
//! duplicates of spurious retransmissions included (which holding provokes:
//! the RTT here is far below the delay). So a held segment goes on before
//! the millisecond its TSval names is over (`hold_back` explains how that is
//! known; one already past it when it reaches the wire goes at once,
//! [`Counts::not_delayed`]; one the thread cannot send in time is dropped,
//! [`Counts::late_dropped`]), so every segment sent after it went on is
//! stamped at most 1 above it; and a retransmission of a segment being held
//! (same ports and sequence number, within [`FOLLOW_FOR`]) is dropped rather
//! than let overtake it ([`Counts::superseded`]), since the held one, re-sent
//! from another CPU, can still wait in a backlog after it went on. (On a busy
//! machine a sender's backlog or ksoftirqd delays some segments by
//! milliseconds anyway; then a receiver can drop one for its timestamp with
//! no impairment at all.)
//!
//! Why a wire and not the endpoints' own interfaces: a packet dropped by a
//! sender's own egress hook or qdisc is reported to its TCP stack (the
//! transmit fails, the segment is sent again as if new, and TCP backs off as
//! for local congestion), so it is not lost on the path; and on the proxy's
//! interfaces the netdev ingress hook runs after tc's, so the proxy's tc
//! program would see, or translate and redirect, what is then dropped. On
//! the wire the sender's transmit has succeeded and the receiver's programs
//! never see the packet. Every rule counts what it did ([`Counts`]).
//!
//! Only TCP is impaired: ARP, neighbour discovery and everything else pass.
//!
//! A veth sender hands its TCP stack's GSO packets (up to 64 KiB) to the
//! peer unsegmented, so one impaired packet would be 40 segments;
//! [`one_segment_per_packet`] makes a stack send one segment per packet, as on
//! a wire. It must be set before the connections open.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{run, Netns};

/// How long a reordered packet is held back at most.
pub const REORDER_DELAY: Duration = Duration::from_micros(300);
/// A held packet not sent on within this long of reaching the wire is
/// dropped instead (a backstop: the end of its millisecond comes first).
pub const LATE_LIMIT: Duration = Duration::from_micros(1000);
/// Only frames longer than this (segments with data) are held back.
pub const REORDER_MIN_FRAME: u32 = 200;
/// How long the wire remembers the sequence number of a held segment (set
/// timeouts count in jiffies, 4 ms here: this is 4 to 8 ms).
pub const FOLLOW_FOR: &str = "8ms";

/// What happens to the TCP packets of one direction, in percent (resolution
/// 0.01 %). Each rule draws its own random number: a packet is dropped with
/// probability `loss`; one not dropped is duplicated with probability
/// `duplicate`, and held back behind later ones with probability `reorder`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

impl Impairment {
    /// Random loss only.
    pub const fn loss(percent: f64) -> Self {
        Self {
            loss: percent,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }

    /// Random duplication only.
    pub const fn duplicate(percent: f64) -> Self {
        Self {
            loss: 0.0,
            duplicate: percent,
            reorder: 0.0,
        }
    }

    /// Random reordering only.
    pub const fn reorder(percent: f64) -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            reorder: percent,
        }
    }

    /// In ten-thousandths, for `numgen random mod 10000`.
    fn per_10k(percent: f64) -> u32 {
        assert!(
            (0.0..=100.0).contains(&percent),
            "an impairment is a percentage: {percent}"
        );
        (percent * 100.0).round() as u32
    }
}

/// What the rules of one direction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// TCP packets that reached the rules.
    pub seen: u64,
    /// Dropped by the loss rule.
    pub dropped: u64,
    /// Duplicated (each sent one extra copy).
    pub duplicated: u64,
    /// Held back by the reordering rule.
    pub delayed: u64,
    /// Dropped: they retransmitted a segment being held back.
    pub superseded: u64,
    /// Held back, then sent on.
    pub delayed_sent: u64,
    /// Held back, then dropped: not sent on in time.
    pub late_dropped: u64,
    /// Picked to be held back but sent on at once: its millisecond was over
    /// when it reached the wire.
    pub not_delayed: u64,
}

impl std::ops::Add for Counts {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            seen: self.seen + o.seen,
            dropped: self.dropped + o.dropped,
            duplicated: self.duplicated + o.duplicated,
            delayed: self.delayed + o.delayed,
            superseded: self.superseded + o.superseded,
            delayed_sent: self.delayed_sent + o.delayed_sent,
            late_dropped: self.late_dropped + o.late_dropped,
            not_delayed: self.not_delayed + o.not_delayed,
        }
    }
}

/// A direction across a [`Wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the first namespace given to [`Wire::join`] to the second.
    AToB = 0,
    /// The other way.
    BToA = 1,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Self; 2] = [Self::AToB, Self::BToA];

    /// The names of the direction's chain and counters.
    fn tag(self) -> &'static str {
        match self {
            Self::AToB => "ab",
            Self::BToA => "ba",
        }
    }
}

/// Runs `program args` in namespace `ns`, with `stdin`; fails the test if it
/// fails; returns its output.
fn run_in(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{program} {args:?} in {ns} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stdin.unwrap_or_default()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The table of a wire's namespace.
const TABLE: &str = "wire";

/// What the holding thread did, per direction.
#[derive(Default)]
struct HeldCounts {
    sent: AtomicU64,
    late: AtomicU64,
    at_once: AtomicU64,
}

/// A namespace standing in for the cable between two namespaces (see the
/// module documentation); deleted, with its devices, on drop.
pub struct Wire {
    /// The wire's own ends: toward a, toward b.
    ends: [String; 2],
    /// Whether impairments leave the three-way handshakes alone.
    spare_handshakes: AtomicBool,
    held: Arc<[HeldCounts; 2]>,
    stop: Arc<AtomicBool>,
    holder: Option<JoinHandle<()>>,
    /// The wire's namespace (dropped after the holding thread stopped).
    pub ns: Netns,
}

impl Wire {
    /// Joins `a` and `b` through a new wire: `a` gets `a_ip/24` on its end,
    /// `b` gets `b_ip/24`, routes are the connected /24. Returns the wire and
    /// the names of `a`'s and `b`'s devices.
    pub fn join(
        prefix: &str,
        a: &Netns,
        a_ip: Ipv4Addr,
        b: &Netns,
        b_ip: Ipv4Addr,
    ) -> (Self, String, String) {
        let ns = Netns::with_prefix(prefix);
        // The wire's own devices say nothing (no IPv6 autoconfiguration).
        let status = ns
            .command("sysctl")
            .args([
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .status()
            .expect("sysctl");
        assert!(status.success(), "sysctl in {}", ns.name);
        // Device names: unique on the machine while they are being created
        // and at most 15 bytes.
        let id = ns.name.trim_start_matches(prefix).replace('x', "w");
        let name = |kind: &str| {
            let name = format!("{kind}{id}");
            assert!(name.len() <= 15, "device name {name} too long");
            name
        };
        let (a_dev, wire_a, b_dev, wire_b) = (name("wa"), name("xa"), name("wb"), name("xb"));
        for (end, peer, peer_ns) in [(&a_dev, &wire_a, a), (&b_dev, &wire_b, b)] {
            run(
                "ip",
                &[
                    "link",
                    "add",
                    end,
                    "netns",
                    &peer_ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    &ns.name,
                ],
            );
            ns.ip(&["link", "set", peer, "up"]);
            peer_ns.ip(&["link", "set", end, "up"]);
        }
        a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", &a_dev]);
        b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", &b_dev]);
        // Per direction, a veth pair inside the wire for held packets: the
        // rules send them out of `d*`, where the thread's socket sees them;
        // `e*` drops them.
        let hold = [(name("da"), name("ea")), (name("db"), name("eb"))];
        for (d, e) in &hold {
            ns.ip(&["link", "add", d, "type", "veth", "peer", "name", e]);
            ns.ip(&["link", "set", d, "up"]);
            ns.ip(&["link", "set", e, "up"]);
        }
        let (wa, wb) = (&wire_a, &wire_b);
        let [(_, eab), (_, eba)] = &hold;
        run_in(
            &ns.name,
            "nft",
            &["-f", "-"],
            Some(&format!(
                "table netdev {TABLE} {{
  counter ab_seen {{}}
  counter ab_dropped {{}}
  counter ab_duplicated {{}}
  counter ab_delayed {{}}
  counter ab_superseded {{}}
  set held_ab {{ typeof tcp sport . tcp dport . tcp sequence; flags dynamic,timeout; timeout {FOLLOW_FOR}; }}
  counter ba_seen {{}}
  counter ba_dropped {{}}
  counter ba_duplicated {{}}
  counter ba_delayed {{}}
  counter ba_superseded {{}}
  set held_ba {{ typeof tcp sport . tcp dport . tcp sequence; flags dynamic,timeout; timeout {FOLLOW_FOR}; }}
  set acked_ab {{ typeof tcp sport . tcp dport; flags dynamic,timeout; timeout 10m; }}
  set acked_ba {{ typeof tcp sport . tcp dport; flags dynamic,timeout; timeout 10m; }}
  chain ab {{}}
  chain ba {{}}
  chain from_a {{
    type filter hook ingress device \"{wa}\" priority 0; policy accept;
    meta l4proto tcp jump ab
    fwd to \"{wb}\"
  }}
  chain from_b {{
    type filter hook ingress device \"{wb}\" priority 0; policy accept;
    meta l4proto tcp jump ba
    fwd to \"{wa}\"
  }}
  chain sink_ab {{
    type filter hook ingress device \"{eab}\" priority 0; policy drop;
  }}
  chain sink_ba {{
    type filter hook ingress device \"{eba}\" priority 0; policy drop;
  }}
}}
"
            )),
        );
        let sockets = {
            let names = [
                (hold[0].0.clone(), wire_b.clone()),
                (hold[1].0.clone(), wire_a.clone()),
            ];
            ns.enter(move || names.map(|(from, to)| (hold_socket(&from), send_socket(&to))))
        };
        let held: Arc<[HeldCounts; 2]> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let (held, stop) = (held.clone(), stop.clone());
            std::thread::spawn(move || hold_back(&sockets, &held, &stop))
        };
        let wire = Self {
            ends: [wire_a, wire_b],
            spare_handshakes: AtomicBool::new(false),
            held,
            stop,
            holder: Some(holder),
            ns,
        };
        (wire, a_dev, b_dev)
    }

    /// The wire's devices packets of `direction` go to when held back.
    fn hold_device(&self, direction: Direction) -> String {
        let id = self.ends[0].trim_start_matches("xa");
        match direction {
            Direction::AToB => format!("da{id}"),
            Direction::BToA => format!("db{id}"),
        }
    }

    /// The wire's end packets of `direction` leave by.
    fn out_end(&self, direction: Direction) -> &str {
        &self.ends[1 - direction as usize]
    }

    /// Makes the impairments installed from now on leave every connection's
    /// three-way handshake alone: SYNs, and the first pure ACK each way of
    /// each pair of ports (the handshake's last segment; the first pure
    /// ACK of the other direction is spared too).
    pub fn spare_handshakes(&self) {
        self.spare_handshakes.store(true, Ordering::Relaxed);
    }

    /// Impairs both directions alike until the returned guard is dropped;
    /// the counters start from 0.
    pub fn impair(&self, impairment: Impairment) -> Impaired {
        self.impair_each(&Direction::BOTH.map(|d| (d, impairment)))
    }

    /// Impairs each listed direction as given (the others not) until the
    /// returned guard is dropped; the counters start from 0.
    pub fn impair_each(&self, impairments: &[(Direction, Impairment)]) -> Impaired {
        let mut script = format!("reset counters table netdev {TABLE}\n");
        for direction in Direction::BOTH {
            let tag = direction.tag();
            script +=
                &format!("flush chain netdev {TABLE} {tag}\nflush set netdev {TABLE} held_{tag}\n");
            let Some((_, impairment)) = impairments.iter().find(|(d, _)| *d == direction) else {
                continue;
            };
            let rule = |text: String| format!("add rule netdev {TABLE} {tag} {text}\n");
            if self.spare_handshakes.load(Ordering::Relaxed) {
                script += &rule("tcp flags & (syn | rst) != 0 return".into());
                script += &rule(format!(
                    "tcp flags & (syn | ack | fin | rst | psh) == ack \
                     tcp sport . tcp dport != @acked_{tag} \
                     add @acked_{tag} {{ tcp sport . tcp dport }} return"
                ));
            }
            // A random share, or every packet.
            let share = |per_10k: u32| {
                if per_10k >= 10_000 {
                    String::new()
                } else {
                    format!("numgen random mod 10000 < {per_10k}")
                }
            };
            script += &rule(format!("counter name \"{tag}_seen\""));
            let loss = Impairment::per_10k(impairment.loss);
            if loss > 0 {
                script += &rule(format!(
                    "{} counter name \"{tag}_dropped\" drop",
                    share(loss)
                ));
            }
            let reorder = Impairment::per_10k(impairment.reorder);
            let hold = self.hold_device(direction);
            if reorder > 0 {
                script += &rule(format!(
                    "tcp sport . tcp dport . tcp sequence @held_{tag} \
                     counter name \"{tag}_superseded\" drop"
                ));
            }
            let duplicate = Impairment::per_10k(impairment.duplicate);
            if duplicate > 0 {
                script += &rule(format!(
                    "{} counter name \"{tag}_duplicated\" dup to \"{}\"",
                    share(duplicate),
                    self.out_end(direction)
                ));
            }
            if reorder > 0 {
                script += &rule(format!(
                    "meta length > {REORDER_MIN_FRAME} {} \
                     counter name \"{tag}_delayed\" \
                     add @held_{tag} {{ tcp sport . tcp dport . tcp sequence }} fwd to \"{hold}\"",
                    share(reorder)
                ));
            }
        }
        let base = held_counts(&self.held);
        run_in(&self.ns.name, "nft", &["-f", "-"], Some(&script));
        Impaired {
            ns: self.ns.name.clone(),
            held: self.held.clone(),
            base,
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

fn held_counts(held: &[HeldCounts; 2]) -> [(u64, u64, u64); 2] {
    [0, 1].map(|i| {
        (
            held[i].sent.load(Ordering::Relaxed),
            held[i].late.load(Ordering::Relaxed),
            held[i].at_once.load(Ordering::Relaxed),
        )
    })
}

/// An active impairment of a [`Wire`]: its counters, and the rules until it
/// is dropped (the wire then forwards everything again).
pub struct Impaired {
    ns: String,
    held: Arc<[HeldCounts; 2]>,
    /// The holding thread's counts when the rules were installed.
    base: [(u64, u64, u64); 2],
}

impl Impaired {
    /// What the rules of `direction` have done so far.
    pub fn counts(&self, direction: Direction) -> Counts {
        let json = run_in(
            &self.ns,
            "nft",
            &["-j", "list", "counters", "table", "netdev", TABLE],
            None,
        );
        let json: serde_json::Value = serde_json::from_str(&json).expect("nft JSON");
        let counter = |name: &str| {
            let name = format!("{}_{name}", direction.tag());
            json["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|item| item["counter"]["name"] == name.as_str())
                .and_then(|item| item["counter"]["packets"].as_u64())
                .unwrap_or(0)
        };
        let i = direction as usize;
        let (sent, late, at_once) = held_counts(&self.held)[i];
        Counts {
            seen: counter("seen"),
            dropped: counter("dropped"),
            duplicated: counter("duplicated"),
            delayed: counter("delayed"),
            superseded: counter("superseded"),
            delayed_sent: sent - self.base[i].0,
            late_dropped: late - self.base[i].1,
            not_delayed: at_once - self.base[i].2,
        }
    }

    /// Both directions' counts added.
    pub fn total(&self) -> Counts {
        self.counts(Direction::AToB) + self.counts(Direction::BToA)
    }
}

impl Drop for Impaired {
    fn drop(&mut self) {
        let script = Direction::BOTH
            .map(|d| format!("flush chain netdev {TABLE} {}\n", d.tag()))
            .concat();
        let Ok(mut child) = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return;
        };
        if let Some(mut input) = child.stdin.take() {
            let _ = std::io::Write::write_all(&mut input, script.as_bytes());
        }
        let _ = child.wait();
    }
}

const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_OUTGOING: u8 = 4;
const SO_TIMESTAMPNS: libc::c_int = 35;
const ETH_P_ALL: u16 = 0x0003;

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn set_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads an int from the pointer, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, "setsockopt");
}

fn ifindex(dev: &str) -> i32 {
    let name = std::ffi::CString::new(dev).expect("device name");
    // SAFETY: a NUL-terminated name, valid for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no device {dev}");
    ifindex as i32
}

/// A non-blocking packet socket of protocol `protocol` (network order),
/// bound to `dev` (of the calling thread's namespace), with a
/// `virtio_net_hdr` before each frame it receives or sends.
fn packet_socket(dev: &str, protocol: u16) -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    check(fd, "packet socket");
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(fd, libc::SOL_PACKET, PACKET_VNET_HDR, 1);
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex(dev);
    // SAFETY: bind reads a sockaddr_ll of the given size from the pointer.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "bind packet socket");
    socket
}

/// A socket that gets every frame `dev` transmits, with the time it did.
fn hold_socket(dev: &str) -> OwnedFd {
    let socket = packet_socket(dev, ETH_P_ALL.to_be());
    set_int(socket.as_raw_fd(), libc::SOL_SOCKET, SO_TIMESTAMPNS, 1);
    socket
}

/// A socket that sends frames out of `dev` and receives nothing.
fn send_socket(dev: &str) -> OwnedFd {
    packet_socket(dev, 0)
}

/// CLOCK_REALTIME (the clock of `SO_TIMESTAMPNS`) in nanoseconds.
fn realtime_ns() -> i128 {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec)
}

/// A held frame: when it is due and the latest it may go (CLOCK_REALTIME
/// ns), the frame.
struct Held {
    due: i128,
    last: i128,
    frame: Vec<u8>,
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
fn realtime_offset() -> i128 {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut mono: libc::timespec = unsafe { std::mem::zeroed() };
    let real = realtime_ns();
    // SAFETY: a valid clock and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
    real - (i128::from(mono.tv_sec) * 1_000_000_000 + i128::from(mono.tv_nsec))
}

/// The connection (addresses and ports) and the TSval of a TCP segment in a
/// frame read with its virtio header (10 bytes).
fn tcp_tsval(frame: &[u8]) -> Option<([u8; 36], u32)> {
    let at = |i: usize| frame.get(i).copied();
    let l3 = 10 + 14;
    let mut tuple = [0u8; 36];
    let l4 = match u16::from_be_bytes([at(l3 - 2)?, at(l3 - 1)?]) {
        0x0800 if at(l3 + 9)? == 6 => {
            tuple[..8].copy_from_slice(frame.get(l3 + 12..l3 + 20)?);
            l3 + usize::from(at(l3)? & 0x0f) * 4
        }
        0x86dd if at(l3 + 6)? == 6 => {
            tuple[..32].copy_from_slice(frame.get(l3 + 8..l3 + 40)?);
            l3 + 40
        }
        _ => return None,
    };
    tuple[32..].copy_from_slice(frame.get(l4..l4 + 4)?);
    let end = l4 + usize::from(at(l4 + 12)? >> 4) * 4;
    let mut i = l4 + 20;
    while i < end {
        match at(i)? {
            0 => return None,
            1 => i += 1,
            8 => {
                return Some((
                    tuple,
                    u32::from_be_bytes(frame.get(i + 2..i + 6)?.try_into().ok()?),
                ))
            }
            _ => i += usize::from(at(i + 1)?.max(2)),
        }
    }
    None
}

/// One frame `fd`'s device transmitted (with its virtio header) and the time
/// it did, or `None` when there is none now. (`Some` with an empty frame:
/// one to skip.)
fn receive(fd: libc::c_int, buf: &mut [u8]) -> Option<(Vec<u8>, i128)> {
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points to the buffer and the control space above, both
    // alive and writable for the call.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_TRUNC) };
    if n < 0 {
        return None;
    }
    // A frame longer than the buffer (never with one segment per packet) is
    // skipped, as is one the device received.
    let len = if n as usize > buf.len() || from.sll_pkttype != PACKET_OUTGOING {
        0
    } else {
        n as usize
    };
    let mut at = None;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within
    // `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == SO_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                at = Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Some((buf[..len].to_vec(), at.unwrap_or_else(realtime_ns)))
}

/// The holding thread: reads what each direction's rules held back and
/// sends it on [`REORDER_DELAY`] after it reached the wire, but never after
/// the millisecond its TSval names has ended (it goes earlier then; at once
/// if that millisecond was over when it reached the wire), and drops it if
/// it cannot go by then ([`Counts::late_dropped`]). Runs until `stop`.
///
/// Why the millisecond: a receiver drops a segment whose TSval is 2 or more
/// below its `ts_recent`, which any segment at or before its next expected
/// byte sets, old duplicates included (the sender's spurious
/// retransmissions, which this impairment provokes). A held segment that
/// goes within the millisecond of its TSval is at most 1 below any TSval
/// sent before it goes. The segment's millisecond on the monotonic clock
/// (every TCP socket's timestamp clock, plus a per-connection offset) is
/// its TSval minus that offset, learnt from the held segments themselves:
/// the largest TSval minus the millisecond it reached the wire. Time spent
/// before the wire (a sender's softirq backlog on a busy machine) counts.
fn hold_back(sockets: &[(OwnedFd, OwnedFd); 2], held: &[HeldCounts; 2], stop: &AtomicBool) {
    // Wake-ups as exact as the timers allow (the default slack is 50 µs),
    // and ahead of the ordinary threads of a busy machine: a real-time
    // priority. The thread sleeps in ppoll between packets, so it takes
    // little of a CPU. (Softirq work still delays it now and then.)
    // SAFETY: prctl with an integer argument, for this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_u64) };
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler reads the parameter, for this thread (0).
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) };
    const MS: i128 = 1_000_000;
    /// Margin before the end of the millisecond (the send takes a while).
    const MARGIN: i128 = 50_000;
    /// How late after its due time a held frame may still go (wake-ups are
    /// late now and then).
    const SLACK: i128 = 300_000;
    let delay = REORDER_DELAY.as_nanos() as i128;
    let late = LATE_LIMIT.as_nanos() as i128;
    let mut queues: [Vec<Held>; 2] = Default::default();
    // Per connection: TSval minus the monotonic millisecond.
    let mut offsets: std::collections::HashMap<[u8; 36], u32> = Default::default();
    let mut buf = vec![0u8; 65_536 + 64];
    while !stop.load(Ordering::Relaxed) {
        let now = realtime_ns();
        let wait = queues
            .iter()
            .flatten()
            .map(|held| held.due - now)
            .min()
            .unwrap_or(20_000_000)
            .clamp(0, 20_000_000);
        let mut fds = sockets.each_ref().map(|(hold, _)| libc::pollfd {
            fd: hold.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait as libc::c_long,
        };
        // SAFETY: two pollfds and a timespec, alive for the call.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &raw const timeout, std::ptr::null()) };
        let to_real = realtime_offset();
        for (dir, ((hold, _), queue)) in sockets.iter().zip(&mut queues).enumerate() {
            let at_once = held.each_ref().map(|h| &h.at_once);
            // Bounded: at most what arrived since the last pass.
            for _ in 0..10_000 {
                let Some((frame, at)) = receive(hold.as_raw_fd(), &mut buf) else {
                    break;
                };
                if frame.is_empty() {
                    continue;
                }
                let mut last = at + late;
                if let Some((tuple, tsval)) = tcp_tsval(&frame) {
                    let tick = ((at - to_real) / MS) as u32;
                    let offset = tsval.wrapping_sub(tick);
                    let known = offsets.entry(tuple).or_insert(offset);
                    if (offset.wrapping_sub(*known) as i32) > 0 {
                        *known = offset;
                    }
                    let sent_tick = tsval.wrapping_sub(*known);
                    // The end of that millisecond, on the realtime clock.
                    let ahead = i128::from(sent_tick.wrapping_sub(tick) as i32);
                    last = last.min((i128::from(tick) + ahead + 1) * MS + to_real - MARGIN);
                }
                // One already too old when it reached the wire (it waited in
                // its sender's backlog) goes on at once, as it would have
                // without the impairment.
                // Due early enough to be sent before the last moment.
                let due = (at + delay).min(last - SLACK);
                let due = if due < at {
                    last = last.max(at + SLACK);
                    at_once[dir].fetch_add(1, Ordering::Relaxed);
                    at
                } else {
                    due
                };
                queue.push(Held { due, last, frame });
            }
        }
        let now = realtime_ns();
        for (((_, socket), queue), counts) in sockets.iter().zip(&mut queues).zip(held) {
            // In arrival order among those due.
            let mut i = 0;
            while i < queue.len() {
                if queue[i].due > now {
                    i += 1;
                    continue;
                }
                let held = queue.remove(i);
                let sent = now <= held.last && {
                    // SAFETY: the frame is alive for the call; send(2) on the
                    // bound packet socket transmits it out of its device.
                    let n = unsafe {
                        libc::send(
                            socket.as_raw_fd(),
                            held.frame.as_ptr().cast(),
                            held.frame.len(),
                            0,
                        )
                    };
                    n == held.frame.len() as isize
                };
                if sent {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.late.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Makes the TCP stacks sending through `dev` (in `ns`) send one segment per
/// packet (`gso_max_segs 1`), as they would on a wire, so an impairment hits
/// segments rather than 64 KiB GSO packets. Sockets read it when they
/// connect.
pub fn one_segment_per_packet(ns: &Netns, dev: &str) {
    ns.ip(&["link", "set", "dev", dev, "gso_max_segs", "1"]);
}
