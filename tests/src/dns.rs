//! A scripted DNS server for a network namespace made by a test.
//!
//! [`Netns::new`] points the namespace's resolver at 127.0.0.1:53, where nothing
//! listens; a [`DnsStub`] listens there (UDP) and answers every query as its
//! script says: addresses (A and AAAA records), NXDOMAIN, nothing at all, or any
//! of these late. Scripts see how many earlier queries had the same name and
//! type ([`Query::nth`]), so one name can answer differently from one lookup to
//! the next (DNS rebinding). The stub records every query it got.
//!
//! It serves until dropped, and never longer than [`DnsStub::LIFETIME`].

use std::{
    collections::HashMap,
    net::{IpAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Query type of an IPv4 address record.
pub const A: u16 = 1;
/// Query type of an IPv6 address record.
pub const AAAA: u16 = 28;

/// One question the stub received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The name asked for, dotted, as it was sent (no trailing dot).
    pub name: String,
    /// The query type: [`A`], [`AAAA`] or another.
    pub qtype: u16,
    /// How many queries with the same name (case-insensitive) and type came
    /// before this one: 0 for the first lookup, 1 for the second, …
    pub nth: usize,
}

impl Query {
    /// Whether this query asks for `name` (case and a trailing dot do not matter).
    pub fn is_for(&self, name: &str) -> bool {
        self.name
            .eq_ignore_ascii_case(name.strip_suffix('.').unwrap_or(name))
    }
}

/// What the stub does with one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// NOERROR with those of the addresses that match the query's type (IPv4
    /// for A, IPv6 for AAAA, in the order given); none match: an empty answer.
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// SERVFAIL: the server failed.
    ServFail,
    /// [`Reply::Addresses`] with this TTL (seconds) instead of 0.
    Ttl(u32, Vec<IpAddr>),
    /// No answer at all: the resolver waits until it gives up.
    Silence,
    /// The reply, sent only after the delay (other queries are served meanwhile).
    After(Duration, Box<Reply>),
}

/// A script that answers lookups of `name` from `lookups` in turn: the n-th
/// query of each type gets `lookups[n]` (the last entry once the list is used
/// up), so one lookup — an A and an AAAA query — gets one entry. Every other
/// name gets NXDOMAIN.
pub fn in_turn(name: &str, lookups: Vec<Vec<IpAddr>>) -> impl FnMut(&Query) -> Reply + Send {
    assert!(!lookups.is_empty(), "in_turn needs at least one lookup");
    let name = name.to_owned();
    move |query| {
        if query.is_for(&name) {
            Reply::Addresses(lookups[query.nth.min(lookups.len() - 1)].clone())
        } else {
            Reply::NxDomain
        }
    }
}

/// A DNS server on 127.0.0.1:53 inside a namespace; stops when dropped.
pub struct DnsStub {
    queries: Arc<Mutex<Vec<Query>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsStub {
    /// The longest a stub serves, so a test that forgets it does not leave a
    /// thread behind for long.
    pub const LIFETIME: Duration = Duration::from_secs(300);

    /// Serves 127.0.0.1:53 (UDP) inside `ns`, answering each query as `script`
    /// says. Fails the test if the port cannot be bound.
    pub fn start(ns: &Netns, script: impl FnMut(&Query) -> Reply + Send + 'static) -> Self {
        Self::start_on(ns, IpAddr::from([127, 0, 0, 1]), script)
    }

    /// [`DnsStub::start`] on port 53 of `ip` (an address `ns` has, e.g. any
    /// 127.x.y.z), for a proxy pointed there by `dns_nameservers`.
    pub fn start_on(
        ns: &Netns,
        ip: IpAddr,
        mut script: impl FnMut(&Query) -> Reply + Send + 'static,
    ) -> Self {
        let socket = ns.enter(move || UdpSocket::bind((ip, 53)).expect("bind the DNS stub"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Self::LIFETIME;
            let mut seen: HashMap<(String, u16), usize> = HashMap::new();
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Some(question) = Question::parse(&buf[..len]) else {
                    continue;
                };
                let count = seen
                    .entry((question.name.to_ascii_lowercase(), question.qtype))
                    .or_default();
                let query = Query {
                    name: question.name.clone(),
                    qtype: question.qtype,
                    nth: *count,
                };
                *count += 1;
                log.lock().unwrap().push(query.clone());
                let mut reply = script(&query);
                let mut delay = Duration::ZERO;
                while let Reply::After(more, then) = reply {
                    delay += more;
                    reply = *then;
                }
                let Some(packet) = question.answer(&reply) else {
                    continue;
                };
                if delay.is_zero() {
                    let _ = socket.send_to(&packet, peer);
                } else if let Ok(socket) = socket.try_clone() {
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let _ = socket.send_to(&packet, peer);
                    });
                }
            }
        });
        Self {
            queries,
            stop,
            thread: Some(thread),
        }
    }

    /// Every query received so far, in order.
    pub fn queries(&self) -> Vec<Query> {
        self.queries.lock().unwrap().clone()
    }

    /// How many queries of type `qtype` for `name` were received so far.
    pub fn asked(&self, name: &str, qtype: u16) -> usize {
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|query| query.qtype == qtype && query.is_for(name))
            .count()
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The parts of a query an answer repeats.
struct Question {
    /// The query's 12-byte header.
    header: [u8; 12],
    /// The question section as sent (name, type, class).
    raw: Vec<u8>,
    name: String,
    qtype: u16,
}

impl Question {
    /// The first question of `packet`, if it is a well-formed standard query.
    fn parse(packet: &[u8]) -> Option<Self> {
        let header: [u8; 12] = packet.get(..12)?.try_into().ok()?;
        let is_query = header[2] & 0x80 == 0;
        let questions = u16::from_be_bytes([header[4], header[5]]);
        if !is_query || questions == 0 {
            return None;
        }
        let mut labels = Vec::new();
        let mut at = 12;
        loop {
            let len = usize::from(*packet.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            // Queries carry no compression pointers; longer labels do not exist.
            if len > 63 {
                return None;
            }
            labels.push(String::from_utf8_lossy(packet.get(at..at + len)?).into_owned());
            at += len;
        }
        let fixed = packet.get(at..at + 4)?;
        Some(Self {
            header,
            raw: packet[12..at + 4].to_vec(),
            name: labels.join("."),
            qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        })
    }

    /// The answer packet for `reply`, or `None` to stay silent.
    fn answer(&self, reply: &Reply) -> Option<Vec<u8>> {
        let ttl = match reply {
            Reply::Ttl(seconds, _) => *seconds,
            _ => 0,
        };
        let (rcode, records): (u8, Vec<Vec<u8>>) = match reply {
            Reply::Silence | Reply::After(..) => return None,
            Reply::NxDomain => (3, Vec::new()),
            Reply::ServFail => (2, Vec::new()),
            Reply::Addresses(addrs) | Reply::Ttl(_, addrs) => (
                0,
                addrs
                    .iter()
                    .filter_map(|addr| match (addr, self.qtype) {
                        (IpAddr::V4(v4), A) => Some(v4.octets().to_vec()),
                        (IpAddr::V6(v6), AAAA) => Some(v6.octets().to_vec()),
                        _ => None,
                    })
                    .collect(),
            ),
        };
        let mut packet = Vec::with_capacity(512);
        packet.extend_from_slice(&self.header[..2]); // ID
        packet.push(0x80 | (self.header[2] & 0x79)); // QR, opcode and RD kept; AA, TC clear
        packet.push(0x80 | rcode); // RA
        packet.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
        packet.extend_from_slice(&(records.len() as u16).to_be_bytes()); // ANCOUNT
        packet.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
        packet.extend_from_slice(&self.raw);
        for rdata in records {
            packet.extend_from_slice(&[0xc0, 12]); // the question's name
            packet.extend_from_slice(&self.qtype.to_be_bytes());
            packet.extend_from_slice(&1u16.to_be_bytes()); // class IN
                                                           // TTL 0 unless the script says: nothing may cache it.
            packet.extend_from_slice(&ttl.to_be_bytes());
            packet.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            packet.extend_from_slice(&rdata);
        }
        Some(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of type `qtype` with id `id`, as a stub resolver sends it.
    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut packet = id.to_be_bytes().to_vec();
        packet.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, QDCOUNT 1
        for label in name.split('.') {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label.as_bytes());
        }
        packet.push(0);
        packet.extend_from_slice(&qtype.to_be_bytes());
        packet.extend_from_slice(&1u16.to_be_bytes());
        packet
    }

    /// Asks the stub in `ns`; returns the RCODE and the addresses answered, or
    /// `None` when no answer came within `wait`.
    fn ask(
        ns: &Netns,
        id: u16,
        name: &str,
        qtype: u16,
        wait: Duration,
    ) -> Option<(u8, Vec<IpAddr>)> {
        let packet = query(id, name, qtype);
        let name_len = packet.len() - 12 - 4;
        ns.enter(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_read_timeout(Some(wait)).unwrap();
            socket.send_to(&packet, "127.0.0.1:53").unwrap();
            let mut buf = [0u8; 1500];
            let len = socket.recv(&mut buf).ok()?;
            let reply = &buf[..len];
            assert_eq!(reply[..2], packet[..2], "id");
            assert_eq!(reply[2] & 0x81, 0x81, "QR and RD");
            assert_eq!(reply[12..12 + name_len + 4], packet[12..], "question");
            let answers = u16::from_be_bytes([reply[6], reply[7]]);
            let mut at = 12 + name_len + 4;
            let mut addrs = Vec::new();
            for _ in 0..answers {
                assert_eq!(reply[at..at + 2], [0xc0, 12], "name pointer");
                assert_eq!(reply[at + 2..at + 4], qtype.to_be_bytes(), "type");
                let rdlen = usize::from(u16::from_be_bytes([reply[at + 10], reply[at + 11]]));
                let rdata = &reply[at + 12..at + 12 + rdlen];
                addrs.push(match rdlen {
                    4 => IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap()),
                    _ => IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap()),
                });
                at += 12 + rdlen;
            }
            assert_eq!(at, len, "nothing after the answers");
            Some((reply[3] & 0x0f, addrs))
        })
    }

    #[test]
    fn scripts_answer_in_turn_late_or_not_at_all() {
        let ns = Netns::new();
        let (v4, v6): (IpAddr, IpAddr) = ("10.1.2.3".parse().unwrap(), "fd00::1".parse().unwrap());
        let mut turns = in_turn("Turns.Test", vec![vec![v4], vec![v4, v6, v4]]);
        let stub = DnsStub::start(&ns, move |query| match query.name.as_str() {
            "late.test" => Reply::After(
                Duration::from_millis(500),
                Box::new(Reply::Addresses(vec![v4])),
            ),
            "silent.test" => Reply::Silence,
            _ => turns(query),
        });
        let quick = Duration::from_secs(5);
        assert_eq!(ask(&ns, 1, "turns.test", A, quick), Some((0, vec![v4])));
        assert_eq!(ask(&ns, 2, "turns.test", AAAA, quick), Some((0, vec![])));
        assert_eq!(ask(&ns, 3, "TURNS.test", A, quick), Some((0, vec![v4, v4])));
        assert_eq!(ask(&ns, 4, "turns.test", AAAA, quick), Some((0, vec![v6])));
        assert_eq!(ask(&ns, 5, "turns.test", A, quick), Some((0, vec![v4, v4])));
        assert_eq!(ask(&ns, 6, "other.test", A, quick), Some((3, vec![])));
        assert_eq!(
            ask(&ns, 7, "silent.test", A, Duration::from_millis(700)),
            None
        );
        let started = Instant::now();
        assert_eq!(ask(&ns, 8, "late.test", A, quick), Some((0, vec![v4])));
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(stub.asked("turns.test", A), 3);
        assert_eq!(stub.asked("turns.test.", AAAA), 2);
        let nth: Vec<usize> = stub.queries().iter().map(|query| query.nth).collect();
        assert_eq!(nth, [0, 0, 1, 1, 2, 0, 0, 0]);
    }
}
