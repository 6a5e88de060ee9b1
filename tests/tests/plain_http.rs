//! Plain-HTTP forwarding (issue 14, first part), end to end: the real spliced
//! as `HTTP_PROXY` for curl, wget and Python's urllib, in front of an HTTP/1.1
//! origin written here (threads of the test process, on loopback) that counts
//! the connections it accepts and echoes what it saw: method, origin-form
//! path, header fields, the body's size and SHA-256.
//!
//! Every wait is bounded: sockets by [`IO_TIMEOUT`], curl by `--max-time`,
//! other commands by `timeout(1)`.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Output},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sha2::{Digest, Sha256};
use spliced_tests::{raw_request, status_of, wait_until, Proxy, IO_TIMEOUT};

const MIB: u64 = 1 << 20;
/// The large bodies: at least 100 MiB each way.
const LARGE: u64 = 256 * MIB;

// ---------------------------------------------------------------------------
// The origin.
// ---------------------------------------------------------------------------

/// One request as the origin received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
    body_len: u64,
    body_sha256: String,
}

impl Seen {
    /// Every value of the field `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// A threaded HTTP/1.1 origin on 127.0.0.1.
///
/// * `/size/N`: N bytes of [`pattern`] with a Content-Length;
/// * `/chunked/N`: the same, chunked;
/// * `/close/N`: the same, delimited by the end of the connection;
/// * anything else: a text echo of the request (`method`, `path`, fields,
///   `body-bytes`, `body-sha256`).
///
/// `Expect: 100-continue` gets a `100 Continue` before the body is read.
struct Origin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &log);
                });
            }
        });
        Self {
            addr,
            accepted,
            seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request the origin saw.
    fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the origin saw no request")
    }
}

/// The bytes of every generated body: not periodic within a buffer size.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let i = offset + i as u64;
        *byte = ((i % 251) as u8) ^ ((i >> 12) as u8);
    }
}

/// SHA-256 of `len` bytes of [`pattern`].
fn pattern_sha256(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        pattern(done, &mut buf[..n]);
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> String {
    let mut file = fs::File::open(path).expect("open file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).expect("read file");
        if n == 0 {
            return hex(&hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

fn write_pattern_file(path: &Path, len: u64) {
    let mut file = fs::File::create(path).expect("create file");
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        // Shifted, so an upload is not the same bytes as a download.
        pattern(done + 7, &mut buf[..n]);
        file.write_all(&buf[..n]).expect("write file");
        done += n as u64;
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path, version) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let mut headers = Vec::new();
        loop {
            let mut field = String::new();
            reader.read_line(&mut field)?;
            let field = field.trim_end();
            if field.is_empty() {
                break;
            }
            if let Some((name, value)) = field.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let mut seen = Seen {
            method,
            path,
            version,
            headers,
            body_len: 0,
            body_sha256: String::new(),
        };
        if seen
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut hasher = Sha256::new();
        let chunked = seen
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size)?;
                let size = u64::from_str_radix(size.trim().split(';').next().unwrap(), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    let mut end = String::new();
                    while reader.read_line(&mut end)? > 2 {
                        end.clear();
                    }
                    break;
                }
                seen.body_len += copy_to_hasher(&mut reader, size, &mut hasher)?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(len) = seen.header("content-length") {
            let len: u64 = len.parse().unwrap_or(0);
            seen.body_len = copy_to_hasher(&mut reader, len, &mut hasher)?;
        }
        seen.body_sha256 = hex(&hasher.finalize());
        log.lock().unwrap().push(seen.clone());
        let close = seen.version == "HTTP/1.0"
            || seen
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let head_only = seen.method == "HEAD";
        let number = |prefix: &str| {
            seen.path
                .strip_prefix(prefix)
                .and_then(|n| n.parse::<u64>().ok())
        };
        let connection = if close { "Connection: close\r\n" } else { "" };
        if let Some(len) = number("/size/") {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n{connection}\r\n")?;
            if !head_only {
                send_pattern(&mut out, len, false)?;
            }
        } else if let Some(len) = number("/chunked/") {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n{connection}\r\n")?;
            if !head_only {
                send_pattern(&mut out, len, true)?;
            }
        } else if let Some(len) = number("/close/") {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            )?;
            if !head_only {
                send_pattern(&mut out, len, false)?;
            }
            return Ok(());
        } else {
            let mut body = format!(
                "method {}\npath {}\nversion {}\n",
                seen.method, seen.path, seen.version
            );
            for (name, value) in &seen.headers {
                body.push_str(&format!("{}: {value}\n", name.to_ascii_lowercase()));
            }
            body.push_str(&format!(
                "body-bytes {}\nbody-sha256 {}\n",
                seen.body_len, seen.body_sha256
            ));
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=30\r\nX-Origin-Hop: secret\r\n{connection}\r\n",
                body.len()
            )?;
            if !head_only {
                out.write_all(body.as_bytes())?;
            }
        }
        if close {
            return Ok(());
        }
    }
}

fn copy_to_hasher(reader: &mut impl Read, len: u64, hasher: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = reader.read(&mut buf[..left.min(65536) as usize])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(len)
}

fn send_pattern(out: &mut TcpStream, len: u64, chunked: bool) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        pattern(done, &mut buf[..n]);
        if chunked {
            write!(out, "{n:x}\r\n")?;
        }
        out.write_all(&buf[..n])?;
        if chunked {
            out.write_all(b"\r\n")?;
        }
        done += n as u64;
    }
    if chunked {
        out.write_all(b"0\r\n\r\n")?;
    }
    out.flush()
}

// ---------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------

/// Runs curl through `proxy` with `args`, bounded by `--max-time`.
fn curl(proxy: &Proxy, args: &[&str]) -> Output {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-x"])
        .arg(format!("http://{}", proxy.addr))
        .args(args)
        .output()
        .expect("run curl");
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// curl's `-w '%{http_code}'` after the body, which goes to `/dev/null`.
fn curl_status(proxy: &Proxy, args: &[&str]) -> u16 {
    let mut full = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    full.extend_from_slice(args);
    let out = curl(proxy, &full);
    stdout(&out).trim().parse().unwrap_or(0)
}

/// The `body-sha256` line of an echo.
fn echoed(echo: &str, key: &str) -> String {
    echo.lines()
        .find_map(|line| line.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in the echo:\n{echo}"))
        .to_owned()
}

fn start_proxy(extra: &[&str]) -> Proxy {
    let mut args = vec!["--dataplane", "copy"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// A proxy with the squid.conf `conf` (written to a temporary file).
fn start_with_conf(dir: &Path, conf: &str) -> Proxy {
    let path = dir.join("squid.conf");
    fs::write(&path, conf).unwrap();
    start_proxy(&["-f", path.to_str().unwrap()])
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[test]
fn every_method_is_forwarded_in_origin_form_with_its_host() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let out = curl(
            &proxy,
            &["-X", method, "-d", "x=1", &origin.url("/echo/a?b=c")],
        );
        assert!(out.status.success(), "{method}: {}", stderr(&out));
        let echo = stdout(&out);
        assert_eq!(echoed(&echo, "method"), method, "{echo}");
        assert_eq!(echoed(&echo, "path"), "/echo/a?b=c", "{echo}");
        let seen = origin.last();
        assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
        assert_eq!(seen.body_len, 3, "{method}");
    }
    let out = curl(&proxy, &["-I", &origin.url("/size/1234")]);
    assert!(out.status.success(), "HEAD: {}", stderr(&out));
    let head = stdout(&out).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 1234"), "{head}");
    assert_eq!(origin.last().method, "HEAD");
    let lines = proxy.wait_access_lines(7);
    assert!(
        lines.iter().all(|l| l.contains(" TCP_MISS/200 ")),
        "{lines:#?}"
    );
}

#[test]
fn squid_log_line_of_a_forwarded_request() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let out = curl(&proxy, &["-o", "/dev/null", &origin.url("/size/1234")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = proxy.wait_access_lines(1).remove(0);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[2], "127.0.0.1", "{line}");
    assert_eq!(fields[3], "TCP_MISS/200", "{line}");
    let bytes: u64 = fields[4].parse().unwrap();
    assert!(
        (1234 + 60..1234 + 400).contains(&bytes),
        "%<st {bytes} should be the body and the head: {line}"
    );
    assert_eq!(
        fields[5..].join(" "),
        format!(
            "GET {} - HIER_DIRECT/127.0.0.1 application/octet-stream",
            origin.url("/size/1234")
        ),
        "{line}"
    );
    // JSON: the method, the URL in `target`, no data plane.
    let json_proxy = start_proxy(&["--log-format", "json"]);
    let out = curl(&json_proxy, &["-o", "/dev/null", &origin.url("/echo")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record = &json_proxy.wait_json_records(1)[0];
    assert_eq!(record["method"], "GET", "{record}");
    assert_eq!(record["target"], origin.url("/echo"), "{record}");
    assert_eq!(record["result"], "TCP_MISS", "{record}");
    assert!(record["dataplane"].is_null(), "{record}");
    assert_eq!(record["mime_type"], "text/plain", "{record}");
}

#[test]
fn small_and_large_bodies_stream_both_ways() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let dir = tempfile::tempdir().unwrap();
    for len in [0, 1024, LARGE] {
        // Download.
        let file = dir.path().join(format!("down-{len}"));
        let out = curl(
            &proxy,
            &[
                "-o",
                file.to_str().unwrap(),
                &origin.url(&format!("/size/{len}")),
            ],
        );
        assert!(out.status.success(), "download {len}: {}", stderr(&out));
        assert_eq!(fs::metadata(&file).unwrap().len(), len);
        assert_eq!(file_sha256(&file), pattern_sha256(len), "download {len}");
        // Upload, with -T (PUT) and --data-binary (POST).
        let up = dir.path().join(format!("up-{len}"));
        write_pattern_file(&up, len);
        let want = file_sha256(&up);
        for how in ["-T", "--data-binary"] {
            let arg = if how == "-T" {
                up.to_str().unwrap().to_owned()
            } else {
                format!("@{}", up.display())
            };
            let out = curl(&proxy, &[how, &arg, &origin.url("/upload")]);
            assert!(out.status.success(), "upload {len} {how}: {}", stderr(&out));
            let echo = stdout(&out);
            assert_eq!(echoed(&echo, "body-bytes"), len.to_string(), "{how}");
            assert_eq!(echoed(&echo, "body-sha256"), want, "{how} {len}");
        }
    }
}

#[test]
fn chunked_and_until_close_bodies() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    write_pattern_file(&up, 3 * MIB + 17);
    let out = curl(
        &proxy,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", up.display()),
            &origin.url("/upload"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = origin.last();
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.body_sha256, file_sha256(&up));
    for path in ["/chunked/", "/close/"] {
        let len = 5 * MIB + 3;
        let file = dir.path().join("down");
        let out = curl(
            &proxy,
            &[
                "-D",
                "-",
                "-o",
                file.to_str().unwrap(),
                &origin.url(&format!("{path}{len}")),
            ],
        );
        assert!(out.status.success(), "{path}: {}", stderr(&out));
        assert_eq!(file_sha256(&file), pattern_sha256(len), "{path}");
    }
    // An HTTP/1.0 client cannot take chunks: the chunked answer reaches it
    // delimited by the end of the connection.
    let len = 2 * MIB + 5;
    let file = dir.path().join("down-1.0");
    let out = curl(
        &proxy,
        &[
            "-0",
            "-D",
            "-",
            "-o",
            file.to_str().unwrap(),
            &origin.url(&format!("/chunked/{len}")),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out)
            .to_ascii_lowercase()
            .contains("transfer-encoding"),
        "{}",
        stdout(&out)
    );
    assert_eq!(file_sha256(&file), pattern_sha256(len));
}

#[test]
fn expect_100_continue_upload() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    write_pattern_file(&up, 2 * MIB);
    let out = curl(
        &proxy,
        &[
            "-v",
            "-H",
            "Expect: 100-continue",
            // Without a 100 curl would wait this long, then send anyway.
            "--expect100-timeout",
            "30",
            "-T",
            up.to_str().unwrap(),
            &origin.url("/upload"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let verbose = stderr(&out);
    assert!(verbose.contains("HTTP/1.1 100 Continue"), "{verbose}");
    assert_eq!(echoed(&stdout(&out), "body-sha256"), file_sha256(&up));
}

#[test]
fn keep_alive_reuses_the_client_and_the_upstream_connection() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let out = curl(
        &proxy,
        &[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects}\n",
            &origin.url("/size/100"),
            &origin.url("/echo"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n0\n", "one client connection for both");
    assert_eq!(origin.accepted(), 1, "one upstream connection for both");
    assert_eq!(origin.seen().len(), 2);
    proxy.wait_access_lines(2);
}

#[test]
fn via_added_and_hop_by_hop_fields_removed() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let out = curl(
        &proxy,
        &[
            "-D",
            "-",
            "-H",
            "Connection: X-Secret, keep-alive",
            "-H",
            "X-Secret: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "TE: trailers",
            "-H",
            "Trailer: X-T",
            "-H",
            "Upgrade: h2c",
            "-H",
            "Proxy-Authorization: Basic dTpw",
            "-H",
            "X-End-To-End: kept",
            &origin.url("/echo"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = origin.last();
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            seen.all(gone).is_empty(),
            "{gone} reached the origin: {seen:?}"
        );
    }
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.all("via"), ["1.1 spliced"]);
    // The answer: the origin's hop-by-hop fields are not passed on either.
    let answer = stdout(&out).to_ascii_lowercase();
    assert!(answer.contains("via: 1.1 spliced"), "{answer}");
    assert!(!answer.contains("keep-alive: timeout=30"), "{answer}");
    // HTTP/1.0 clients.
    let out = curl(&proxy, &["-0", "-D", "-", &origin.url("/echo")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(origin.last().all("via"), ["1.0 spliced"]);
    assert!(stdout(&out).contains("body-bytes 0"));
}

#[test]
fn via_and_forwarded_for_directives() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", Some("192.0.2.9, 127.0.0.1"), true),
        ("forwarded_for on\n", Some("192.0.2.9, 127.0.0.1"), true),
        (
            "forwarded_for off\nvia on\n",
            Some("192.0.2.9, unknown"),
            true,
        ),
        ("forwarded_for delete\nvia off\n", None, false),
        ("forwarded_for transparent\n", Some("192.0.2.9"), true),
    ];
    for (directives, xff, via) in cases {
        let proxy = start_with_conf(
            dir.path(),
            &format!("http_access allow localhost\nhttp_access deny all\n{directives}"),
        );
        let out = curl(
            &proxy,
            &["-H", "X-Forwarded-For: 192.0.2.9", &origin.url("/echo")],
        );
        assert!(out.status.success(), "{directives}: {}", stderr(&out));
        let seen = origin.last();
        assert_eq!(seen.header("x-forwarded-for"), xff, "{directives:?}");
        assert_eq!(!seen.all("via").is_empty(), via, "{directives:?}");
    }
}

#[test]
fn https_in_absolute_form_is_501() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let url = format!("https://{}/x", origin.addr);
    let answer = raw_request(
        proxy.addr,
        format!("GET {url} HTTP/1.1\r\nHost: {}\r\n\r\n", origin.addr).as_bytes(),
    );
    assert_eq!(status_of(&answer), 501, "{answer}");
    assert!(answer.contains("send CONNECT"), "{answer}");
    assert_eq!(origin.accepted(), 0);
    let line = proxy.wait_access_lines(1).remove(0);
    assert!(
        line.contains(" NONE_NONE/501 ") && line.contains(&format!(" GET {url} ")),
        "{line}"
    );
}

#[test]
fn acl_denial_is_403_with_a_squid_line() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_with_conf(
        dir.path(),
        &format!(
            "acl blocked port {}\nhttp_access deny blocked\nhttp_access allow localhost\nhttp_access deny all\n",
            origin.addr.port()
        ),
    );
    let out = curl(&proxy, &["-D", "-", &origin.url("/secret")]);
    let answer = stdout(&out);
    assert_eq!(status_of(&answer), 403, "{answer}");
    assert!(
        answer.ends_with("spliced: 403 Forbidden: ERR_ACCESS_DENIED\n"),
        "{answer}"
    );
    assert_eq!(origin.accepted(), 0);
    let line = proxy.wait_access_lines(1).remove(0);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], "TCP_DENIED/403", "{line}");
    assert_eq!(
        fields[5..].join(" "),
        format!("GET {} - HIER_NONE/- text/plain", origin.url("/secret")),
        "{line}"
    );
    // Every request on a kept-alive connection is judged, not only the first.
    let other = Origin::start();
    let out = curl(
        &proxy,
        &[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &other.url("/ok"),
            &origin.url("/secret"),
        ],
    );
    assert_eq!(stdout(&out), "200\n403\n", "{}", stderr(&out));
    assert_eq!(origin.accepted(), 0);
}

#[test]
fn origin_down_is_502_and_unknown_name_503() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = start_proxy(&["--dns-timeout", "5"]);
    assert_eq!(curl_status(&proxy, &[&format!("http://{addr}/x")]), 502);
    assert_eq!(curl_status(&proxy, &["http://no-such-host.invalid/x"]), 503);
    let lines = proxy.wait_access_lines(2);
    assert!(lines[0].contains("/502 "), "{lines:#?}");
    assert!(lines[1].contains("/503 "), "{lines:#?}");
}

#[test]
fn proxy_never_forwards_to_itself() {
    let proxy = start_proxy(&[]);
    let status = curl_status(&proxy, &[&format!("http://{}/loop", proxy.addr)]);
    assert_eq!(status, 403);
    assert!(wait_until(Duration::from_secs(5), || proxy
        .access_lines()
        .iter()
        .any(|l| l.contains("TCP_DENIED/403"))));
}

#[test]
fn wget_and_python_urllib_as_clients() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let proxy_url = format!("http://{}", proxy.addr);
    let out = Command::new("timeout")
        .args(["60", "wget", "-q", "-O", "-"])
        .env("http_proxy", &proxy_url)
        .arg(origin.url("/echo/wget"))
        .output()
        .expect("run wget");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(echoed(&stdout(&out), "path"), "/echo/wget");
    assert_eq!(origin.last().all("via"), ["1.1 spliced"]);
    let script = format!(
        "import urllib.request as u\n\
         o = u.build_opener(u.ProxyHandler({{'http': '{proxy_url}'}}))\n\
         r = o.open(u.Request('{}', data=b'abc', method='PUT'), timeout=30)\n\
         print(r.status)\nprint(r.read().decode())\n",
        origin.url("/echo/py")
    );
    let out = Command::new("timeout")
        .args(["60", "python3", "-c", &script])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("200\n"), "{text}");
    assert_eq!(echoed(&text, "method"), "PUT");
    assert_eq!(echoed(&text, "body-bytes"), "3");
}

#[test]
fn requests_are_counted_by_status() {
    let origin = Origin::start();
    let proxy = start_proxy(&["--admin", "127.0.0.1:0"]);
    assert_eq!(curl_status(&proxy, &[&origin.url("/echo")]), 200);
    assert_eq!(curl_status(&proxy, &[&origin.url("/echo")]), 200);
    let https = format!("https://{}/", origin.addr);
    let answer = raw_request(
        proxy.addr,
        format!("GET {https} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&answer), 501);
    let admin = proxy.admin_addr().expect("admin listener");
    let metrics = spliced_tests::proxy::http_get(admin, "/metrics").expect("scrape");
    let count = |status: u16| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("spliced_requests_total{{status=\"{status}\"}}")))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_owned)
    };
    assert_eq!(count(200).as_deref(), Some("2"), "{metrics}");
    assert_eq!(count(501).as_deref(), Some("1"), "{metrics}");
}

#[test]
fn proxy_authentication_is_asked_for_and_checked() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("secret", 4).unwrap();
    fs::write(dir.path().join("passwd"), format!("alice:{hash}\n")).unwrap();
    let proxy = start_with_conf(
        dir.path(),
        &format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
             auth_param basic realm test\n\
             acl users proxy_auth REQUIRED\nhttp_access allow users\nhttp_access deny all\n",
            dir.path().join("passwd").display()
        ),
    );
    let out = curl(
        &proxy,
        &["-D", "-", "-o", "/dev/null", &origin.url("/echo")],
    );
    let head = stdout(&out);
    assert_eq!(status_of(&head), 407, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"test\""),
        "{head}"
    );
    let out = curl(
        &proxy,
        &["--proxy-user", "alice:secret", &origin.url("/echo")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let echo = stdout(&out);
    assert!(echo.starts_with("method GET"), "{echo}");
    assert!(
        origin.last().all("proxy-authorization").is_empty(),
        "credentials reached the origin"
    );
    let lines = proxy.wait_access_lines(2);
    assert!(lines[0].contains(" TCP_DENIED/407 "), "{lines:#?}");
    assert!(
        lines[1].contains(" TCP_MISS/200 ") && lines[1].contains(" alice "),
        "{lines:#?}"
    );
    assert_eq!(origin.accepted(), 1);
}

/// An origin that answers an `Upgrade: websocket` request with `101` and then
/// echoes every byte back, upper-cased.
fn websocket_origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let seen = seen.clone();
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut out = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                seen.lock().unwrap().push(head);
                out.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if out.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// Sends a WebSocket upgrade for `/chat` through `proxy` (with `early`
/// pipelined behind the head, in the same write), checks the `101`, and
/// returns the stream and a reader positioned after the `101`'s head.
fn upgrade_through(
    proxy: &Proxy,
    origin: SocketAddr,
    early: &[u8],
) -> (TcpStream, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut request = format!(
        "GET http://{origin}/chat HTTP/1.1\r\nHost: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(early);
    stream.write_all(&request).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "closed: {head}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert_eq!(status_of(&head), 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    (stream, reader)
}

#[test]
fn websocket_upgrade_is_relayed() {
    let (origin, heads) = websocket_origin();
    let proxy = start_proxy(&[]);
    let (mut stream, mut reader) = upgrade_through(&proxy, origin, b"");
    let seen = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(seen.starts_with("get /chat http/1.1"), "{seen}");
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(seen.contains("connection: upgrade"), "{seen}");
    for message in ["hello", "over the upgraded connection"] {
        stream.write_all(message.as_bytes()).unwrap();
        let mut echo = vec![0u8; message.len()];
        reader.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message.to_ascii_uppercase().as_bytes());
    }
    // The exchange is logged when its tunnel ends.
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let line = proxy.wait_access_lines(1).remove(0);
    assert!(line.contains(" TCP_MISS/101 "), "{line}");
}

/// After the `101` the exchange is a tunnel on the data plane, with the bytes
/// the client pipelined behind its head going first; its one record names
/// the plane and counts every byte.
#[test]
fn a_websocket_runs_on_each_data_plane_byte_exact() {
    const LEN: usize = 1 << 20;
    let (origin, _) = websocket_origin();
    for plane in ["copy", "splice", "sockmap", "packet"] {
        let mut args = vec!["--dataplane", plane, "--log-format", "json"];
        if plane == "packet" {
            args.extend(["--promote-after", "0"]);
        }
        let proxy = Proxy::start(&args);
        let (stream, mut reader) = upgrade_through(&proxy, origin, b"early|");
        let mut early = [0u8; 6];
        reader.read_exact(&mut early).unwrap();
        assert_eq!(&early, b"EARLY|", "{plane}");
        let sent: Vec<u8> = (0..LEN).map(|i| b'a' + (i % 26) as u8).collect();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let sent = sent.clone();
            std::thread::spawn(move || {
                for chunk in sent.chunks(64 << 10) {
                    stream.write_all(chunk).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let mut echoed = vec![0u8; LEN];
        reader.read_exact(&mut echoed).unwrap();
        writer.join().unwrap();
        assert!(echoed == sent.to_ascii_uppercase(), "{plane}: bytes differ");
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        reader
            .read_to_end(&mut rest)
            .unwrap_or_else(|err| panic!("{plane}: no close after the client's: {err}"));
        assert!(rest.is_empty(), "{plane}: {rest:?}");
        let record = proxy.wait_json_records(1).remove(0);
        assert_eq!(record["status"], 101, "{record}");
        assert_eq!(record["dataplane"], plane, "{plane}: {record}");
        assert_eq!(record["bytes_from_client"], 6 + LEN as u64, "{record}");
        let to_client = record["bytes_to_client"].as_u64().unwrap();
        assert!(
            (6 + LEN as u64 + 100..6 + LEN as u64 + 400).contains(&to_client),
            "the 101's head and every echoed byte: {record}"
        );
        if plane == "packet" {
            assert!(record["bytes_before_promotion"].is_object(), "{record}");
        }
    }
}

#[test]
fn a_client_that_leaves_before_the_answer_is_logged() {
    // An origin that accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(stream);
        }
    });
    let proxy = start_proxy(&["--log-format", "json"]);
    let out = curl(
        &proxy,
        &["--max-time", "1", &format!("http://{addr}/stall")],
    );
    assert!(!out.status.success(), "the origin answered?");
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(record["end"], "client_closed_before_answer", "{record}");
    assert_eq!(record["status"], 0, "{record}");
    assert_eq!(record["upstream"], addr.to_string(), "{record}");
    assert_eq!(held.lock().unwrap().len(), 1);
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let url = origin.url("/size/10");
    write!(
        stream,
        "GET {url} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.addr
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the head and the 10-byte body are in.
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if text
            .split_once("\r\n\r\n")
            .is_some_and(|(_, body)| body.len() >= 10)
        {
            break;
        }
    }
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
    // The connection is idle and kept alive; the drain (shutdown_lifetime 30 s
    // by default) must not wait for it.
    // SAFETY: kill(2) on the proxy's own pid.
    assert_eq!(unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) }, 0);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = stream.read(&mut buf);
    assert!(matches!(n, Ok(0)), "the idle connection stayed open: {n:?}");
}

#[test]
fn a_pooled_connection_is_judged_again_by_dst() {
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    // GET may reach loopback, POST may not: `to_localhost` judges the address
    // of the connection the request would go on, a pooled one included.
    let proxy = start_with_conf(
        dir.path(),
        "acl post method POST\nhttp_access deny post to_localhost\n\
         http_access allow localhost\nhttp_access deny all\n",
    );
    let out = curl(
        &proxy,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &origin.url("/echo"),
            // A second transfer with its own options, on the same connections.
            "--next",
            "-x",
            &format!("http://{}", proxy.addr),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
            "-d",
            "x",
            &origin.url("/echo"),
        ],
    );
    assert_eq!(stdout(&out), "200\n403 0\n", "{}", stderr(&out));
    assert_eq!(origin.seen().len(), 1, "the POST reached the origin");
    let lines = proxy.wait_access_lines(2);
    assert!(
        lines[1].contains(" TCP_DENIED/403 ") && lines[1].contains(" POST "),
        "{lines:#?}"
    );
}

#[test]
fn an_answer_that_stalls_ends_after_read_timeout() {
    // An origin that promises 100 bytes, sends 10, then nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789",
            );
            keep.lock().unwrap().push(stream);
        }
    });
    let proxy = start_proxy(&["--read-timeout", "1", "--log-format", "json"]);
    let started = std::time::Instant::now();
    let out = curl(
        &proxy,
        &["--max-time", "30", &format!("http://{addr}/stall")],
    );
    let took = started.elapsed();
    assert!(!out.status.success(), "a 10-byte body passed for 100");
    assert!(
        took < Duration::from_secs(10),
        "the stalled answer held the client {took:?}"
    );
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(record["end"], "idle_timeout", "{record}");
    assert_eq!(record["status"], 200, "{record}");
}

#[test]
fn an_origin_that_never_answers_gets_504_after_read_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(stream);
        }
    });
    let proxy = start_proxy(&["--read-timeout", "1"]);
    let started = std::time::Instant::now();
    assert_eq!(
        curl_status(&proxy, &[&format!("http://{addr}/silent")]),
        504
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let line = proxy.wait_access_lines(1).remove(0);
    assert!(line.contains(" NONE_NONE/504 "), "{line}");
}

#[test]
fn pipelined_requests_and_a_body_in_the_first_segment() {
    let origin = Origin::start();
    let proxy = start_proxy(&[]);
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let host = origin.addr;
    // One write: a POST with its body, then a GET that closes; the proxy read
    // all of it before it knew this was plain HTTP.
    let requests = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello\
         GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        origin.url("/echo/first"),
        origin.url("/echo/second"),
    );
    stream.write_all(requests.as_bytes()).unwrap();
    let mut answers = String::new();
    stream.read_to_string(&mut answers).unwrap();
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    assert!(answers.contains("path /echo/first"), "{answers}");
    assert!(answers.contains("body-bytes 5"), "{answers}");
    assert!(answers.contains("path /echo/second"), "{answers}");
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body_sha256, hex(&Sha256::digest(b"hello")));
}

#[test]
fn builtin_policy_allows_only_safe_ports() {
    let origin = Origin::start();
    let proxy = start_proxy(&["--admin", "127.0.0.1:0"]);
    // Squid's stock Safe_ports: 1025-65535 (the origin's port) but not 25.
    assert_eq!(curl_status(&proxy, &[&origin.url("/echo")]), 200);
    assert_eq!(curl_status(&proxy, &["http://127.0.0.1:25/"]), 403);
    let lines = proxy.wait_access_lines(2);
    assert!(
        lines[1].contains(" TCP_DENIED/403 ") && lines[1].contains(" GET http://127.0.0.1:25/ "),
        "{lines:#?}"
    );
    let admin = proxy.admin_addr().expect("admin listener");
    let metrics = spliced_tests::proxy::http_get(admin, "/metrics").expect("scrape");
    assert!(
        metrics.contains("builtin:unsafe_port"),
        "no denial by rule builtin:unsafe_port:\n{metrics}"
    );
}
