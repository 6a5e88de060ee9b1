//! Connection setup: many concurrent clients, each repeatedly opening a
//! tunnel (CONNECT → 200), exchanging a few bytes with an echo server and
//! closing. Reports tunnels per second, CONNECT→200 latency and the whole
//! tunnel's time (connect to close, which a promotion lengthens).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::child::interrupted;

/// What the setup clients' CONNECT names, and what the proxy must do first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// `CONNECT 127.0.0.1:PORT`, no credentials.
    Ip,
    /// `CONNECT echo.bench.test:PORT`: the proxy resolves the name (through
    /// `dns_nameservers`; warm after the first tunnel).
    Name,
    /// `CONNECT 127.0.0.1:PORT` with `Proxy-Authorization: Basic`, which
    /// every request must carry (credentials cached after the first).
    BasicAuth,
}

impl Variant {
    /// Its part of a case id (none for [`Variant::Ip`]).
    pub fn id(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Name => "name",
            Self::BasicAuth => "basic-auth",
        }
    }

    /// How the table names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ip => "",
            Self::Name => ", name target",
            Self::BasicAuth => ", Basic auth",
        }
    }
}

/// One connection-setup case: a contender and what its clients ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupCase {
    pub contender: super::contenders::Contender,
    pub variant: Variant,
}

impl SetupCase {
    /// `setup/loopback/squid`, `setup/loopback/packet/name`.
    pub fn id(&self) -> String {
        match self.variant {
            Variant::Ip => format!("setup/loopback/{}", self.contender.id()),
            other => format!("setup/loopback/{}/{}", self.contender.id(), other.id()),
        }
    }

    /// The row's name in the setup table.
    pub fn label(&self) -> String {
        format!("{}{}", self.contender.label(), self.variant.label())
    }
}

/// The name [`Variant::Name`] asks for (the bench's resolver answers
/// 127.0.0.1), also the SNI of the peek cases.
pub const BENCH_NAME: &str = super::contenders::PEEK_SNI;
/// The user of [`Variant::BasicAuth`]: `bench`, password `secret`.
pub const BENCH_USER: &str = "bench";
/// `base64("bench:secret")`.
const BENCH_CREDENTIALS: &str = "YmVuY2g6c2VjcmV0";
/// `openssl passwd -apr1 -salt abcdefgh secret`: a hash both Squid's
/// `basic_ncsa_auth` and spliced verify.
pub const BENCH_PASSWORD_HASH: &str = "$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/";

/// Every socket operation of the benchmark's own clients and servers gives
/// up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// What a client sends after the `200` and gets its first 4 bytes back of.
pub const PING: &[u8] = b"ping";
/// Bytes echoed back.
const ECHOED: usize = 4;

/// A TLS ClientHello naming [`super::contenders::PEEK_SNI`] (TLS 1.3 only,
/// one cipher suite, SNI and supported_versions), what a peek rule reads.
pub fn client_hello() -> &'static [u8] {
    static HELLO: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HELLO.get_or_init(|| {
        let name = super::contenders::PEEK_SNI.as_bytes();
        let u16_be = |n: usize| (n as u16).to_be_bytes();
        let mut sni = vec![0];
        sni.extend(u16_be(name.len()));
        sni.extend(name);
        let mut extensions = vec![0, 0];
        extensions.extend(u16_be(sni.len() + 2));
        extensions.extend(u16_be(sni.len()));
        extensions.extend(&sni);
        extensions.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![0x03, 0x03];
        body.extend([0x5a; 32]);
        body.push(0); // no session id
        body.extend([0x00, 0x02, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        body.extend([0x01, 0x00]); // null compression
        body.extend(u16_be(extensions.len()));
        body.extend(&extensions);
        let mut handshake = vec![0x01, 0];
        handshake.extend(u16_be(body.len()));
        handshake.extend(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend(u16_be(handshake.len()));
        record.extend(&handshake);
        record
    })
}

/// Binds a loopback listener with a deep accept queue.
pub fn listen(port: u16) -> Result<TcpListener> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    // listen(2) again only changes the backlog; std uses 128.
    // SAFETY: a valid listening socket fd we own.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    Ok(listener)
}

/// Accepts connections, reads up to 4 bytes, writes them back, closes.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Starts `threads` accept-and-echo threads on 127.0.0.1:`port`.
    pub fn start(port: u16, threads: usize) -> Result<Self> {
        let listener = Arc::new(listen(port)?);
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let listener = listener.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((stream, _)) = listener.accept() {
                            let _ = echo(stream);
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            addr,
            stop,
            threads,
        })
    }
}

/// Reads the client's message — [`PING`], or a TLS record as long as its
/// header says — and sends its first 4 bytes back. Reading all of it first
/// keeps the close from turning into a RST over unread bytes.
fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 5];
    let mut have = 0;
    let mut want = ECHOED;
    while have < want {
        let n = stream.read(&mut buf[have..want.max(have + 1)])?;
        if n == 0 {
            break;
        }
        have += n;
        if have >= 1 && buf[0] == 0x16 && want == ECHOED {
            want = 5;
        }
        if want == 5 && have >= 5 {
            want = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            buf.resize(want, 0);
        }
    }
    stream.write_all(&buf[..have.min(ECHOED)])
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake every thread blocked in accept.
        for _ in 0..self.threads.len() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The outcome of one connection-setup measurement.
#[derive(Clone, Debug)]
pub struct SetupResult {
    pub clients: usize,
    pub secs: f64,
    pub tunnels: u64,
    pub per_sec: f64,
    /// CONNECT→200 (through a proxy) or connect() (direct), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The whole tunnel: connect to the echo server's close, milliseconds.
    pub tunnel_p50_ms: f64,
    pub tunnel_p99_ms: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU-seconds the proxy's processes used per tunnel during the
    /// measurement (see [`super::cpu::process_tree_cpu_secs`]).
    pub proxy_cpu_per_tunnel_s: Option<f64>,
    /// CPU-seconds the benchmark's own clients and echo server used per
    /// tunnel: the load generator shares the machine's CPUs with the proxy.
    pub load_cpu_per_tunnel_s: Option<f64>,
}

impl SetupResult {
    /// Adds the CPU cost per tunnel of the proxy and of the load generator,
    /// each from a reading before and after.
    pub fn with_cpu(mut self, proxy: [Option<f64>; 2], load: [Option<f64>; 2]) -> Self {
        let per_tunnel = |[before, after]: [Option<f64>; 2]| match (before, after) {
            (Some(before), Some(after)) if self.tunnels > 0 => {
                Some((after - before) / self.tunnels as f64)
            }
            _ => None,
        };
        self.proxy_cpu_per_tunnel_s = per_tunnel(proxy);
        self.load_cpu_per_tunnel_s = per_tunnel(load);
        self
    }
}

/// Runs `clients` concurrent client threads for `duration`. Through `proxy`
/// each iteration is: connect, CONNECT to `echo`, read the 200 (latency
/// measured up to here), send 4 bytes, read them back, wait for the close.
/// Without a proxy the latency is that of connect().
pub fn measure(
    proxy: Option<SocketAddr>,
    echo: SocketAddr,
    clients: usize,
    duration: Duration,
    payload: &'static [u8],
    variant: Variant,
) -> SetupResult {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < deadline && !interrupted() {
                    match one_tunnel(proxy, echo, payload, variant) {
                        Ok(latency) => latencies.push(latency),
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| err.to_string());
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut latencies: Vec<(f64, f64)> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for handle in handles {
        if let Ok((mine, my_errors, my_first)) = handle.join() {
            latencies.extend(mine);
            errors += my_errors;
            if first_error.is_none() {
                first_error = my_first;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut connect: Vec<f64> = latencies.iter().map(|l| l.0).collect();
    let mut whole: Vec<f64> = latencies.iter().map(|l| l.1).collect();
    connect.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    SetupResult {
        clients,
        secs,
        tunnels: latencies.len() as u64,
        per_sec: latencies.len() as f64 / secs,
        p50_ms: percentile(&connect, 0.50),
        p99_ms: percentile(&connect, 0.99),
        tunnel_p50_ms: percentile(&whole, 0.50),
        tunnel_p99_ms: percentile(&whole, 0.99),
        errors,
        first_error,
        proxy_cpu_per_tunnel_s: None,
        load_cpu_per_tunnel_s: None,
    }
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    super::percentile(sorted, p).unwrap_or(f64::NAN)
}

/// One tunnel; returns the latency up to the 200 and to the close, in
/// milliseconds.
fn one_tunnel(
    proxy: Option<SocketAddr>,
    echo: SocketAddr,
    payload: &[u8],
    variant: Variant,
) -> std::io::Result<(f64, f64)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&proxy.unwrap_or(echo), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    if proxy.is_some() && !connect_as(&mut stream, echo, variant)?.is_empty() {
        return Err(std::io::Error::other("bytes before the echo request"));
    }
    let latency = started.elapsed().as_secs_f64() * 1e3;
    stream.write_all(payload)?;
    let mut back = [0u8; ECHOED];
    stream.read_exact(&mut back)?;
    if back[..] != payload[..ECHOED] {
        return Err(std::io::Error::other("echo returned other bytes"));
    }
    // The echo server closes after answering; the tunnel must pass that on.
    let mut rest = [0u8; 16];
    if stream.read(&mut rest)? != 0 {
        return Err(std::io::Error::other("bytes after the echo"));
    }
    Ok((latency, started.elapsed().as_secs_f64() * 1e3))
}

/// Sends `CONNECT target` on `stream` and reads the response head; fails
/// unless it is a 200. Returns what the target sent after the head, if it
/// came in the same reads.
pub fn connect_through(stream: &mut TcpStream, target: SocketAddr) -> std::io::Result<Vec<u8>> {
    connect_as(stream, target, Variant::Ip)
}

/// [`connect_through`] as `variant` asks: to the target's address or to
/// [`BENCH_NAME`] on its port, with or without credentials.
fn connect_as(
    stream: &mut TcpStream,
    target: SocketAddr,
    variant: Variant,
) -> std::io::Result<Vec<u8>> {
    const END: &[u8] = b"\r\n\r\n";
    let authority = match variant {
        Variant::Name => format!("{BENCH_NAME}:{}", target.port()),
        Variant::Ip | Variant::BasicAuth => target.to_string(),
    };
    let credentials = match variant {
        Variant::BasicAuth => format!("Proxy-Authorization: Basic {BENCH_CREDENTIALS}\r\n"),
        Variant::Ip | Variant::Name => String::new(),
    };
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{credentials}\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 256];
    let end = loop {
        if let Some(at) = head.windows(END.len()).position(|w| w == END) {
            break at + END.len();
        }
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "proxy closed after {:?}",
                String::from_utf8_lossy(&head)
            )));
        }
        head.extend_from_slice(&byte[..n]);
        if head.len() > 8192 {
            return Err(std::io::Error::other("response head over 8 KiB"));
        }
    };
    let after = head.split_off(end);
    let status_ok = head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        let line = String::from_utf8_lossy(&head);
        return Err(std::io::Error::other(format!(
            "proxy answered {:?}",
            line.lines().next().unwrap_or_default()
        )));
    }
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_hello_is_one_record_the_echo_reads_whole() {
        let hello = client_hello();
        assert_eq!(hello[0], 0x16);
        let record = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), 5 + record);
        let handshake = usize::from(u16::from_be_bytes([hello[7], hello[8]]));
        assert_eq!((hello[5], hello[6], record), (1, 0, 4 + handshake));
        let name = super::super::contenders::PEEK_SNI.as_bytes();
        assert!(hello.windows(name.len()).any(|w| w == name));

        let echo = EchoServer::start(0, 1).expect("echo");
        for payload in [PING, hello] {
            let mut stream = TcpStream::connect(echo.addr).expect("connect");
            stream.write_all(payload).expect("write");
            let mut back = Vec::new();
            stream.read_to_end(&mut back).expect("read");
            assert_eq!(back, payload[..ECHOED]);
        }
    }

    #[test]
    fn connect_through_returns_what_came_after_the_head() {
        let proxy = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addr = proxy.local_addr().expect("addr");
        let server = thread::spawn(move || {
            let (mut stream, _) = proxy.accept().expect("accept");
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request).expect("request");
            stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\ng")
                .expect("answer");
        });
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let after = connect_through(&mut stream, addr).expect("a 200");
        server.join().expect("server");
        // The byte came in the head's read, or is still in the socket.
        if after.is_empty() {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).expect("greeting");
            assert_eq!(&byte, b"g");
        } else {
            assert_eq!(after, b"g");
        }
    }
}
