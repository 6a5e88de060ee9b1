//! Test harness for spliced's end-to-end tests: starts the real `spliced`
//! binary, real upstream servers (threads of the test process, optionally inside
//! network namespaces made for the test), and real clients.
//!
//! Everything here talks only to loopback or to namespaces the test created.

pub mod bpffs;
pub mod daemon;
pub mod deploy;
pub mod dns;
pub mod echo;
pub mod healthy;
pub mod image;
pub mod netem;
pub mod netns;
pub mod pattern;
pub mod paused;
pub mod planes;
pub mod proxy;
pub mod retransmit;
pub mod sockets;
pub mod tls;
pub mod upstream;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Declares `mod sockmap`, `mod splice` and `mod copy`, each with one `#[test]`
/// per named function, calling it with that data plane's name.
#[macro_export]
macro_rules! on_every_data_plane {
    ($($test:ident),* $(,)?) => {
        mod sockmap { $( #[test] fn $test() { super::$test("sockmap") } )* }
        mod splice { $( #[test] fn $test() { super::$test("splice") } )* }
        mod copy { $( #[test] fn $test() { super::$test("copy") } )* }
    };
}

/// The complete lines of a file another process is appending to. A line that
/// crosses a page boundary reaches the file in two steps, and a read between
/// them sees half of it; that half is left out.
pub fn complete_lines(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

pub use dns::DnsStub;
pub use netns::Netns;
pub use proxy::Proxy;
pub use upstream::{Mode, ServerResult, Upstream};

/// The `RUST_LOG` of the proxies tests start: `$SPLICED_TEST_RUST_LOG`, for
/// a closer look at a failure, else `info,spliced=debug`.
pub fn proxy_log_filter() -> String {
    std::env::var("SPLICED_TEST_RUST_LOG").unwrap_or_else(|_| "info,spliced=debug".into())
}

/// The answer spliced sends when a tunnel opens.
pub const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Every blocking socket operation of a test is bounded by this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `raw` to the proxy and reads the whole answer (until the proxy closes).
pub fn raw_request(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).expect("connect to proxy");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(raw).expect("send request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of an HTTP answer, or 0.
pub fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Opens a tunnel through `proxy` to `target` and returns the socket after the 200.
pub fn open_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).expect("connect to proxy");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )
    .unwrap();
    expect_connect_ok(&mut stream);
    stream
}

/// Reads exactly the `200` answer from `stream` and fails the test on anything else.
pub fn expect_connect_ok(stream: &mut TcpStream) {
    let mut head = vec![0u8; CONNECT_OK.len()];
    stream
        .read_exact(&mut head)
        .expect("read the CONNECT answer");
    assert_eq!(
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(CONNECT_OK)
    );
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The data planes every byte-moving test runs on.
pub const DATA_PLANES: [&str; 3] = ["sockmap", "splice", "copy"];
