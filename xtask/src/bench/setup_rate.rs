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

/// Every socket operation of the benchmark's own clients and servers gives
/// up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const PAYLOAD: &[u8; 4] = b"ping";

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

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; PAYLOAD.len()];
    let mut have = 0;
    while have < buf.len() {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            break;
        }
        have += n;
    }
    stream.write_all(&buf[..have])
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
                    match one_tunnel(proxy, echo) {
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
    }
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    super::percentile(sorted, p).unwrap_or(f64::NAN)
}

/// One tunnel; returns the latency up to the 200 and to the close, in
/// milliseconds.
fn one_tunnel(proxy: Option<SocketAddr>, echo: SocketAddr) -> std::io::Result<(f64, f64)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&proxy.unwrap_or(echo), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    if proxy.is_some() && !connect_through(&mut stream, echo)?.is_empty() {
        return Err(std::io::Error::other("bytes before the echo request"));
    }
    let latency = started.elapsed().as_secs_f64() * 1e3;
    stream.write_all(PAYLOAD)?;
    let mut back = [0u8; PAYLOAD.len()];
    stream.read_exact(&mut back)?;
    if &back != PAYLOAD {
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
    const END: &[u8] = b"\r\n\r\n";
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
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
