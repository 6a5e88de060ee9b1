//! Plain-HTTP forwarding: keep-alive clients sending absolute-form `GET`s
//! through a proxy to an origin inside the benchmark, for a 1 KiB and a
//! 1 MiB body. Reports requests per second, request latency (request written
//! to last body byte read) and how many connections the clients and the
//! origin saw (keep-alive reuse on both sides of the proxy).

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    child::interrupted,
    contenders::Contender,
    setup_rate::{listen, IO_TIMEOUT},
};

/// One plain-HTTP case: a proxy (or none) and a body size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpCase {
    pub contender: Contender,
    pub body: usize,
}

impl HttpCase {
    /// Who is measured: no proxy, spliced (plain HTTP runs on no data plane:
    /// any of its planes serves; splice's instance does) and the other two.
    pub const CONTENDERS: [Contender; 4] = [
        Contender::Direct,
        Contender::Splice,
        Contender::Squid,
        Contender::Tinyproxy,
    ];

    /// Every case, each body size's contenders together.
    pub fn all() -> Vec<Self> {
        BODY_SIZES
            .into_iter()
            .flat_map(|body| {
                Self::CONTENDERS
                    .into_iter()
                    .map(move |contender| Self { contender, body })
            })
            .collect()
    }

    /// `http/loopback/squid/1k`.
    pub fn id(&self) -> String {
        format!(
            "http/loopback/{}/{}",
            self.contender.id(),
            size_id(self.body)
        )
    }

    /// The contender's name in the plain-HTTP table.
    pub fn label(&self) -> &'static str {
        match self.contender {
            Contender::Splice => "spliced",
            other => other.label(),
        }
    }
}

/// The response body sizes measured.
pub const BODY_SIZES: [usize; 2] = [1 << 10, 1 << 20];

/// A short name of a body size, for case ids and tables.
pub fn size_id(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}m", size >> 20)
    } else {
        format!("{}k", size >> 10)
    }
}

/// The byte at `offset` of every body: a pattern a short read or a shifted
/// stream would not reproduce.
fn body_byte(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// Every body's bytes (the largest; a smaller one is its start), made once.
fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| (0..BODY_SIZES[1]).map(body_byte).collect())
}

/// Whether `bytes` are the body's bytes from `offset` on (a memcmp: the
/// client must stay cheaper than what it measures).
fn is_body_at(offset: usize, bytes: &[u8]) -> bool {
    pattern().get(offset..offset + bytes.len()) == Some(bytes)
}

/// An HTTP/1.1 origin on loopback: `GET /SIZE` answers `SIZE` bytes with a
/// `Content-Length`, keeping the connection open until the client closes it.
pub struct Origin {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Origin {
    /// Starts the origin on 127.0.0.1:`port`: one thread accepts, one
    /// thread serves each connection.
    pub fn start(port: u16) -> Result<Self> {
        let listener = listen(port)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let body = pattern();
        let acceptor = {
            let (accepted, stop, connections) =
                (accepted.clone(), stop.clone(), connections.clone());
            thread::spawn(move || accept_loop(&listener, &accepted, &stop, &connections, body))
        };
        Ok(Self {
            addr,
            accepted,
            stop,
            acceptor: Some(acceptor),
            connections,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn accept_loop(
    listener: &TcpListener,
    accepted: &AtomicU64,
    stop: &Arc<AtomicBool>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
    body: &'static [u8],
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        if stop.load(Ordering::Relaxed) {
            break;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        let stop = stop.clone();
        let handle = thread::spawn(move || {
            let _ = serve(stream, &stop, body);
        });
        let mut connections = connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|c| !c.is_finished());
        connections.push(handle);
    }
}

/// Answers requests on one connection until the client closes it (or asks
/// to), the benchmark stops, or it is idle for [`IO_TIMEOUT`].
fn serve(stream: TcpStream, stop: &AtomicBool, body: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut words = line.split_whitespace();
        let (method, path, version) = (words.next(), words.next(), words.next());
        let mut close = version != Some("HTTP/1.1");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("connection") {
                    close |= value.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let size = path
            .and_then(|p| p.rsplit('/').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n <= body.len() && method == Some("GET"));
        let Some(size) = size else {
            writer.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: \
             {size}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        writer.write_all(head.as_bytes())?;
        writer.write_all(&body[..size])?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor blocked in accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // Connection threads end at their client's close or their read
        // timeout; the proxies are stopped before the origin is dropped.
        let connections =
            std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for connection in connections {
            let _ = connection.join();
        }
    }
}

/// The outcome of one plain-HTTP measurement.
#[derive(Clone, Debug)]
pub struct HttpResult {
    pub clients: usize,
    pub body: usize,
    pub secs: f64,
    pub requests: u64,
    pub per_sec: f64,
    /// Request written to the last byte of the body read, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Connections the clients opened (to the proxy, or to the origin
    /// direct): `clients` when every one was kept alive throughout.
    pub client_connections: u64,
    /// Connections the origin accepted meanwhile.
    pub origin_connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl HttpResult {
    /// Body bytes received per second, in MiB.
    pub fn mib_per_sec(&self) -> f64 {
        self.per_sec * self.body as f64 / f64::from(1 << 20)
    }
}

/// Runs `clients` keep-alive client threads for `duration`, each sending
/// `GET /body` one after another: through `proxy` in absolute form
/// (`GET http://origin/SIZE`), else straight to the origin.
pub fn measure(
    proxy: Option<SocketAddr>,
    origin: &Origin,
    body: usize,
    clients: usize,
    duration: Duration,
) -> HttpResult {
    let accepted_before = origin.accepted();
    let target = origin.addr;
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || {
                let mut client = Client {
                    proxy,
                    target,
                    body,
                    stream: None,
                    connections: 0,
                    buf: vec![0; 64 << 10],
                };
                let mut latencies = Vec::new();
                let (mut errors, mut first_error) = (0u64, None);
                while Instant::now() < deadline && !interrupted() {
                    match client.request() {
                        Ok(ms) => latencies.push(ms),
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| err.to_string());
                            client.stream = None;
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                (latencies, client.connections, errors, first_error)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut connections, mut errors, mut first_error) = (0, 0, None);
    for handle in handles {
        if let Ok((mine, my_connections, my_errors, my_first)) = handle.join() {
            latencies.extend(mine);
            connections += my_connections;
            errors += my_errors;
            if first_error.is_none() {
                first_error = my_first;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p| super::percentile(&latencies, p).unwrap_or(f64::NAN);
    HttpResult {
        clients,
        body,
        secs,
        requests: latencies.len() as u64,
        per_sec: latencies.len() as f64 / secs,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        client_connections: connections,
        origin_connections: origin.accepted() - accepted_before,
        errors,
        first_error,
    }
}

/// One benchmark client: a keep-alive connection, reopened when the other
/// end closes it.
struct Client {
    proxy: Option<SocketAddr>,
    target: SocketAddr,
    body: usize,
    stream: Option<TcpStream>,
    connections: u64,
    buf: Vec<u8>,
}

impl Client {
    /// One request; returns its latency in milliseconds. A kept-alive
    /// connection the proxy closed before answering is reopened and the
    /// request sent again, as HTTP clients do for idempotent requests (RFC
    /// 9112 §9.3.1): a proxy that does not keep client connections alive
    /// pays for the reconnect in its latency, not in errors.
    fn request(&mut self) -> std::io::Result<f64> {
        let started = Instant::now();
        let reused = self.stream.is_some();
        match self.send_and_read() {
            Err(err) if reused && err.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.stream = None;
                self.send_and_read()?;
            }
            other => other?,
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }

    fn send_and_read(&mut self) -> std::io::Result<()> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let to = self.proxy.unwrap_or(self.target);
                let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                stream.set_nodelay(true)?;
                self.connections += 1;
                self.stream.insert(stream)
            }
        };
        let (target, body) = (self.target, self.body);
        let request = if self.proxy.is_some() {
            format!("GET http://{target}/{body} HTTP/1.1\r\nHost: {target}\r\n\r\n")
        } else {
            format!("GET /{body} HTTP/1.1\r\nHost: {target}\r\n\r\n")
        };
        stream.write_all(request.as_bytes())?;
        let response = read_response(stream, &mut self.buf, body)?;
        if response.close {
            self.stream = None;
        }
        Ok(())
    }
}

/// What a response said about its connection.
struct Response {
    /// The server will close (or closed) the connection after it.
    close: bool,
}

/// Reads one response to a `GET` of `body` bytes: a `200` whose body
/// (`Content-Length`, chunked, or until close) is exactly the origin's.
fn read_response(stream: &mut TcpStream, buf: &mut [u8], body: usize) -> std::io::Result<Response> {
    let mut have = 0;
    let (head_len, framing, close) = loop {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 && have == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        if n == 0 {
            return Err(std::io::Error::other("closed inside a response head"));
        }
        have += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..have]) {
            Ok(httparse::Status::Complete(len)) => {
                if response.code != Some(200) {
                    return Err(std::io::Error::other(format!(
                        "answered {} {}",
                        response.code.unwrap_or(0),
                        response.reason.unwrap_or_default()
                    )));
                }
                break (len, framing_of(&response)?, closes(&response));
            }
            Ok(httparse::Status::Partial) if have < buf.len() => {}
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::other("response head over 64 KiB"))
            }
            Err(err) => return Err(std::io::Error::other(format!("bad response: {err}"))),
        }
    };
    let mut reader = Prefixed {
        prefix: buf[head_len..have].to_vec(),
        at: 0,
        stream,
    };
    let received = match framing {
        Framing::Length(length) => {
            if length != body as u64 {
                return Err(std::io::Error::other(format!(
                    "Content-Length {length}, expected {body}"
                )));
            }
            check_body(&mut reader.by_ref().take(length), buf)?
        }
        Framing::Chunked => read_chunked(&mut reader, buf)?,
        Framing::UntilClose => check_body(&mut reader, buf)?,
    };
    if received != body {
        return Err(std::io::Error::other(format!(
            "{received} body bytes, expected {body}"
        )));
    }
    if reader.at < reader.prefix.len() {
        return Err(std::io::Error::other("bytes after the response"));
    }
    Ok(Response {
        close: close || matches!(framing, Framing::UntilClose),
    })
}

/// How a response's body ends.
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

fn header<'a>(response: &'a httparse::Response<'_, '_>, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn framing_of(response: &httparse::Response<'_, '_>) -> std::io::Result<Framing> {
    if header(response, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return Ok(Framing::Chunked);
    }
    match header(response, "content-length") {
        Some(length) => length
            .trim()
            .parse()
            .map(Framing::Length)
            .map_err(|_| std::io::Error::other(format!("bad Content-Length {length:?}"))),
        None => Ok(Framing::UntilClose),
    }
}

fn closes(response: &httparse::Response<'_, '_>) -> bool {
    let connection = header(response, "connection")
        .or_else(|| header(response, "proxy-connection"))
        .map(str::to_ascii_lowercase);
    match response.version {
        Some(1) => connection.is_some_and(|c| c.contains("close")),
        _ => !connection.is_some_and(|c| c.contains("keep-alive")),
    }
}

/// Reads `reader` to its end, checking every byte against the origin's
/// pattern; returns how many there were.
fn check_body(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut offset = 0;
    loop {
        let n = reader.read(buf)?;
        if n == 0 {
            return Ok(offset);
        }
        if !is_body_at(offset, &buf[..n]) {
            return Err(std::io::Error::other(format!(
                "body differs near byte {offset}"
            )));
        }
        offset += n;
    }
}

/// Reads a chunked body (no trailers expected), checking it as
/// [`check_body`] does.
fn read_chunked(reader: &mut Prefixed<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut offset = 0;
    loop {
        let line = reader.line()?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            while !reader.line()?.is_empty() {}
            return Ok(offset);
        }
        let mut chunk = reader.by_ref().take(size as u64);
        let mut got = 0;
        loop {
            let n = chunk.read(buf)?;
            if n == 0 {
                break;
            }
            if !is_body_at(offset + got, &buf[..n]) {
                return Err(std::io::Error::other("chunked body differs"));
            }
            got += n;
        }
        if got != size {
            return Err(std::io::Error::other("closed inside a chunk"));
        }
        offset += size;
        if !reader.line()?.is_empty() {
            return Err(std::io::Error::other("no CRLF after a chunk"));
        }
    }
}

/// The bytes read past a response head, then the stream.
struct Prefixed<'a> {
    prefix: Vec<u8>,
    at: usize,
    stream: &'a mut TcpStream,
}

impl Prefixed<'_> {
    /// One CRLF-terminated line, without its CRLF.
    fn line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if self.read(&mut byte)? == 0 {
                return Err(std::io::Error::other("closed inside a chunked body"));
            }
            line.push(byte[0]);
            if line.len() > 1024 {
                return Err(std::io::Error::other("chunk line over 1 KiB"));
            }
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}

impl Read for Prefixed<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.prefix.len() {
            let n = out.len().min(self.prefix.len() - self.at);
            out[..n].copy_from_slice(&self.prefix[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.stream.read(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_requests_reuse_one_connection_per_client() {
        let origin = Origin::start(0).expect("origin");
        for body in BODY_SIZES {
            let result = measure(None, &origin, body, 2, Duration::from_millis(300));
            assert_eq!(result.errors, 0, "{:?}", result.first_error);
            assert!(result.requests > 2, "{result:?}");
            assert_eq!(result.client_connections, 2);
        }
        assert_eq!(origin.accepted(), 4);
    }

    /// A proxy that answers every request with a chunked body, then closes.
    #[test]
    fn chunked_and_closing_responses_are_read_whole() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let proxy = listener.local_addr().expect("addr");
        let origin = Origin::start(0).expect("origin");
        let server = thread::spawn(move || {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().expect("accept");
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).expect("request");
                assert!(request[..n].starts_with(b"GET http://"));
                let body: Vec<u8> = (0..1024).map(body_byte).collect();
                let mut answer =
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                        .to_vec();
                for chunk in body.chunks(300) {
                    answer.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
                    answer.extend(chunk);
                    answer.extend(b"\r\n");
                }
                answer.extend(b"0\r\n\r\n");
                stream.write_all(&answer).expect("answer");
            }
        });
        let mut client = Client {
            proxy: Some(proxy),
            target: origin.addr,
            body: 1024,
            stream: None,
            connections: 0,
            buf: vec![0; 64 << 10],
        };
        for _ in 0..2 {
            client.request().expect("a whole response");
            assert!(client.stream.is_none(), "Connection: close is honoured");
        }
        server.join().expect("server");
        assert_eq!(client.connections, 2);
    }

    #[test]
    fn a_short_or_wrong_body_is_an_error() {
        let origin = Origin::start(0).expect("origin");
        let mut stream = TcpStream::connect(origin.addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream
            .write_all(b"GET /1024 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut buf = vec![0; 64 << 10];
        let err = read_response(&mut stream, &mut buf, 2048)
            .err()
            .expect("an error");
        assert!(err.to_string().contains("Content-Length 1024"), "{err}");
    }
}
