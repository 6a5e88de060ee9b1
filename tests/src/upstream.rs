//! Upstream servers that exchange reproducible byte streams with a client and
//! report what they received.
//!
//! The client starts every connection with a [`Header`]: how many bytes each side
//! sends, the seed of the streams, and the [`Mode`] that orders the two directions.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::Duration,
};

use crate::{netns::Netns, pattern, IO_TIMEOUT};

/// How the two directions of an exchange are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Mode {
    /// Both sides send at once; each shuts down its write side when done.
    Concurrent = 0,
    /// The server answers only after the client's EOF (client half-close).
    AnswerAfterEof = 1,
    /// The server sends and shuts down first; the client sends after the server's
    /// EOF (server half-close).
    ServerFirst = 2,
    /// The server reads `up` bytes, then resets the connection.
    ResetAfterRead = 3,
}

/// The 32 bytes a client sends first.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    /// Bytes the client sends after the header.
    pub up: u64,
    /// Bytes the server sends.
    pub down: u64,
    /// Seed of the client's stream; the server's is `seed + 1`.
    pub seed: u64,
    /// Ordering of the directions.
    pub mode: Mode,
}

/// A [`Header`] from its four fields, in order.
pub fn header(up: u64, down: u64, seed: u64, mode: Mode) -> Header {
    Header {
        up,
        down,
        seed,
        mode,
    }
}

impl Header {
    /// Wire form.
    pub fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..8].copy_from_slice(&self.up.to_le_bytes());
        out[8..16].copy_from_slice(&self.down.to_le_bytes());
        out[16..24].copy_from_slice(&self.seed.to_le_bytes());
        out[24..].copy_from_slice(&(self.mode as u64).to_le_bytes());
        out
    }

    /// `head` (a request head), then this header, then all `up` payload bytes:
    /// what a client sends when it pipelines its whole request with the CONNECT.
    pub fn after_head_with_payload(&self, head: &str) -> Vec<u8> {
        let mut all = head.as_bytes().to_vec();
        all.extend_from_slice(&self.encode());
        let start = all.len();
        all.resize(start + self.up as usize, 0);
        crate::pattern::fill_fast(self.seed, 0, &mut all[start..]);
        all
    }

    fn decode(raw: &[u8; 32]) -> Self {
        let field = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
        let mode = match field(3) {
            0 => Mode::Concurrent,
            1 => Mode::AnswerAfterEof,
            2 => Mode::ServerFirst,
            _ => Mode::ResetAfterRead,
        };
        Self {
            up: field(0),
            down: field(1),
            seed: field(2),
            mode,
        }
    }
}

/// What the server saw on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerResult {
    /// The header it received.
    pub seed: u64,
    /// Bytes received after the header before EOF, or the error.
    pub received: Result<u64, String>,
    /// Bytes it sent.
    pub sent: u64,
}

/// An exchange server; runs until the test process ends.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    results: mpsc::Receiver<ServerResult>,
}

impl Upstream {
    /// Listens on 127.0.0.1.
    pub fn start() -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind upstream"))
    }

    /// Listens on `addr` inside `ns`.
    pub fn start_in(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.enter(move || TcpListener::bind(addr).expect("bind upstream in netns"));
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (sender, results) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let sender = sender.clone();
                std::thread::spawn(move || {
                    if let Some(result) = serve_one(stream) {
                        let _ = sender.send(result);
                    }
                });
            }
        });
        Self { addr, results }
    }

    /// The next connection's result (waits up to `IO_TIMEOUT`).
    pub fn result(&self) -> ServerResult {
        self.results
            .recv_timeout(IO_TIMEOUT)
            .expect("upstream reported no result in time")
    }

    /// The next result, if one arrives within `timeout`.
    pub fn result_within(&self, timeout: Duration) -> Option<ServerResult> {
        self.results.recv_timeout(timeout).ok()
    }
}

fn serve_one(mut stream: TcpStream) -> Option<ServerResult> {
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let mut raw = [0u8; 32];
    stream.read_exact(&mut raw).ok()?;
    let header = Header::decode(&raw);
    let receive = |stream: &mut TcpStream| pattern::receive_checked(stream, header.seed);
    let send = move |stream: &mut TcpStream| -> u64 {
        let ok = pattern::send(stream, header.seed + 1, header.down).is_ok();
        let _ = stream.shutdown(Shutdown::Write);
        if ok {
            header.down
        } else {
            0
        }
    };
    let (received, sent) = match header.mode {
        Mode::Concurrent => {
            let mut writer = stream.try_clone().ok()?;
            let sending = std::thread::spawn(move || send(&mut writer));
            let received = receive(&mut stream);
            (received, sending.join().unwrap_or(0))
        }
        Mode::AnswerAfterEof => {
            let received = receive(&mut stream);
            (received, send(&mut stream))
        }
        Mode::ServerFirst => {
            let sent = send(&mut stream);
            (receive(&mut stream), sent)
        }
        Mode::ResetAfterRead => {
            // Read `up` bytes in bounded chunks (a garbage header must not make the
            // server allocate its announced size).
            let mut remaining = header.up;
            let mut buf = vec![0u8; 64 * 1024];
            let mut received = Ok(header.up);
            while remaining > 0 {
                let want = remaining.min(buf.len() as u64) as usize;
                if let Err(err) = stream.read_exact(&mut buf[..want]) {
                    received = Err(err.to_string());
                    break;
                }
                remaining -= want as u64;
            }
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .ok()?;
            drop(stream);
            return Some(ServerResult {
                seed: header.seed,
                received,
                sent: 0,
            });
        }
    };
    Some(ServerResult {
        seed: header.seed,
        received,
        sent,
    })
}

/// What the client saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResult {
    /// Bytes received from the server before EOF, or the error.
    pub received: Result<u64, String>,
}

/// Runs the client side of an exchange over an open tunnel `stream` (the 200 has
/// been read, unless `header_sent` says the header went out with the CONNECT).
pub fn exchange(stream: TcpStream, header: Header, header_sent: bool) -> ClientResult {
    exchange_with(stream, header, header_sent, Duration::ZERO)
}

/// How long after the `200` a test aimed at the sockmap plane waits before its
/// client's FIN, unless the answer has started: a socket that has seen its
/// peer's FIN cannot go into a sockhash, so a FIN that beats the insertion
/// sends the tunnel to splice by design. Insertion takes well under a
/// millisecond after the `200`; an answer byte proves it happened (the
/// upstream answers the exchange header, which a sockmap tunnel forwards only
/// once spliced).
pub const SPLICE_GRACE: Duration = Duration::from_millis(100);

/// [`exchange`], with the client's FIN sent only once the answer has started
/// or `fin_not_before` has passed since the start (see [`SPLICE_GRACE`]).
pub fn exchange_with(
    mut stream: TcpStream,
    header: Header,
    header_sent: bool,
    fin_not_before: Duration,
) -> ClientResult {
    let started = std::time::Instant::now();
    let received_before = crate::sockets::bytes_received(&stream).unwrap_or(0);
    if !header_sent {
        stream.write_all(&header.encode()).expect("send header");
    }
    let receive = |stream: &mut TcpStream| pattern::receive_checked(stream, header.seed + 1);
    let send = move |stream: &mut TcpStream| {
        pattern::send(stream, header.seed, header.up).expect("client send");
        while started.elapsed() < fin_not_before
            && crate::sockets::bytes_received(stream).unwrap_or(u64::MAX) <= received_before
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        stream.shutdown(Shutdown::Write).expect("client shutdown");
    };
    let received = match header.mode {
        Mode::Concurrent => {
            let mut writer = stream.try_clone().unwrap();
            let sending = std::thread::spawn(move || send(&mut writer));
            let received = receive(&mut stream);
            sending.join().expect("client sender");
            received
        }
        Mode::AnswerAfterEof => {
            send(&mut stream);
            receive(&mut stream)
        }
        Mode::ServerFirst => {
            let received = receive(&mut stream);
            send(&mut stream);
            // Wait for the proxy to close after the server saw our EOF.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            received
        }
        Mode::ResetAfterRead => {
            let _ = pattern::send(&mut stream, header.seed, header.up);
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .map(|_| rest.len() as u64)
                .map_err(|e| e.to_string())
        }
    };
    ClientResult { received }
}
