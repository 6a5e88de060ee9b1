//! Reading and parsing the request head of a client: `CONNECT host:port HTTP/1.1`.
//!
//! The head is parsed with `httparse`; the authority-form target is checked here
//! strictly (RFC 9110 §9.3.6, RFC 3986 §3.2), because whatever passes goes to the
//! resolver and to the access policy.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tokio::net::TcpStream;

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest number of header fields accepted.
const MAX_HEADERS: usize = 128;

/// The host part of a CONNECT target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower-cased, without a trailing dot.
    Name(String),
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
}

/// A parsed CONNECT target (`host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Where to connect.
    pub host: Host,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Why a CONNECT target was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// No `:port` after the host.
    #[error("missing port")]
    MissingPort,
    /// The port is not a decimal number in 1..=65535.
    #[error("invalid port")]
    InvalidPort,
    /// The host is empty.
    #[error("empty host")]
    EmptyHost,
    /// `user@host` forms are not allowed in a CONNECT target.
    #[error("userinfo not allowed")]
    Userinfo,
    /// A bracketed IPv6 literal did not parse.
    #[error("invalid IPv6 literal")]
    InvalidIpv6,
    /// The host is neither an IPv4 literal nor a valid DNS name (this covers the
    /// inet_aton spellings like `127.1` and `0x7f.0.0.1`, which are not names).
    #[error("invalid host name")]
    InvalidHost,
}

/// Parses an authority-form request target.
pub fn parse_target(authority: &str) -> Result<Target, TargetError> {
    if authority.contains('@') {
        return Err(TargetError::Userinfo);
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']').ok_or(TargetError::InvalidIpv6)?;
        let ip: Ipv6Addr = literal.parse().map_err(|_| TargetError::InvalidIpv6)?;
        let port = after.strip_prefix(':').ok_or(TargetError::MissingPort)?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = authority.rsplit_once(':').ok_or(TargetError::MissingPort)?;
        if host.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        (parse_host(host)?, port)
    };
    Ok(Target {
        host,
        port: parse_port(port)?,
    })
}

fn parse_port(text: &str) -> Result<u16, TargetError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::InvalidPort);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::InvalidPort),
        Ok(port) => Ok(port),
    }
}

fn parse_host(host: &str) -> Result<Host, TargetError> {
    // std's parser accepts only four decimal octets without leading zeros.
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    // RFC 1123 §2.1: a top-level label is never all-numeric, so `127.1` or
    // `1.2.3.04` are malformed addresses, not names for the resolver to guess at.
    let tld_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    // Byte-wise, so non-ASCII input cannot split a character.
    let hex_spelling = name.split('.').any(|label| {
        let label = label.as_bytes();
        label.len() > 2
            && label[..2].eq_ignore_ascii_case(b"0x")
            && label[2..].iter().all(u8::is_ascii_hexdigit)
    });
    if !labels_ok || tld_numeric || hex_spelling {
        return Err(TargetError::InvalidHost);
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

/// A request head, read and parsed.
#[derive(Debug)]
pub struct RequestHead {
    /// The method token, exactly as sent.
    pub method: String,
    /// The request target, exactly as sent.
    pub target: String,
    /// The `Proxy-Authorization` header (field names are case-insensitive).
    pub proxy_authorization: Option<String>,
    /// The head itself, as received (plain HTTP hands it to hyper).
    pub raw: Vec<u8>,
    /// Bytes the client sent after the head: the start of the tunnel payload.
    pub pipelined: Vec<u8>,
    /// Size of the head itself.
    pub head_len: usize,
}

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The client did not send a complete head within the deadline.
    #[error("request head not received within {0:?}")]
    Timeout(Duration),
    /// The head exceeds [`MAX_HEAD_BYTES`] or has too many header fields.
    #[error("request head too large")]
    TooLarge,
    /// The bytes are not an HTTP/1.x request head.
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    /// The client closed the connection before the head was complete.
    #[error("connection closed before the request head was complete ({0} bytes received)")]
    ClosedEarly(usize),
    /// Reading from the client failed.
    #[error("reading the request head: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the request head from `client` within `deadline`. Bytes after the head
/// are returned in [`RequestHead::pipelined`]; nothing is read past what the
/// client had sent when the head became complete.
pub async fn read_head(
    client: &mut TcpStream,
    deadline: Duration,
) -> Result<RequestHead, HeadError> {
    read_head_after(client, deadline, Duration::ZERO, Vec::new()).await
}

/// [`read_head`] when the first bytes of the head were read already (behind
/// a PROXY protocol header, which took `spent` of the same `deadline`):
/// `read` is parsed before anything else is read.
pub async fn read_head_after(
    client: &mut TcpStream,
    deadline: Duration,
    spent: Duration,
    read: Vec<u8>,
) -> Result<RequestHead, HeadError> {
    let left = deadline.saturating_sub(spent);
    match tokio::time::timeout(left, read_head_inner(client, read)).await {
        Ok(result) => result,
        Err(_) => Err(HeadError::Timeout(deadline)),
    }
}

async fn read_head_inner(
    client: &mut TcpStream,
    mut buf: Vec<u8>,
) -> Result<RequestHead, HeadError> {
    if !buf.is_empty() {
        if let Some(head) = parse_head(&buf)? {
            return Ok(head);
        }
    }
    // Grown only as bytes arrive and never zeroed first: a client that sends a
    // byte a second costs a few KiB while it waits, not a 16 KiB buffer.
    buf.reserve(1024);
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        client.readable().await?;
        buf.reserve((MAX_HEAD_BYTES - buf.len()).min(16 * 1024));
        let n = match client.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        };
        if n == 0 {
            return Err(HeadError::ClosedEarly(buf.len()));
        }
        if let Some(head) = parse_head(&buf)? {
            return Ok(head);
        }
    }
}

/// Parses a complete head out of `buf`, or returns `None` if more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => Ok(Some(RequestHead {
            method: request.method.unwrap_or_default().to_owned(),
            target: request.path.unwrap_or_default().to_owned(),
            proxy_authorization: request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| v.trim().to_owned()),
            raw: buf[..head_len].to_vec(),
            pipelined: buf[head_len..].to_vec(),
            head_len,
        })),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(err) => Err(HeadError::Malformed(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_authority_form() {
        let ok = |s: &str| parse_target(s).unwrap().to_string();
        assert_eq!(ok("Example.COM:443"), "example.com:443");
        assert_eq!(ok("example.com.:443"), "example.com:443");
        assert_eq!(ok("10.0.0.1:8443"), "10.0.0.1:8443");
        assert_eq!(ok("[::1]:443"), "[::1]:443");
        assert_eq!(ok("[2001:DB8::1]:1"), "[2001:db8::1]:1");
        assert_eq!(ok("a_b-c.example:65535"), "a_b-c.example:65535");
    }

    #[test]
    fn malformed_targets() {
        use TargetError::*;
        let cases = [
            ("example.com", MissingPort),
            ("example.com:", InvalidPort),
            ("example.com:0", InvalidPort),
            ("example.com:65536", InvalidPort),
            ("example.com:+443", InvalidPort),
            (":443", EmptyHost),
            ("user@example.com:443", Userinfo),
            ("[::1:443", InvalidIpv6),
            ("[::1]", MissingPort),
            ("[zz::1]:443", InvalidIpv6),
            ("::1:443", InvalidHost),
            ("127.1:443", InvalidHost),
            ("0x7f.0.0.1:443", InvalidHost),
            ("127.000.0.1:443", InvalidHost),
            ("exa mple.com:443", InvalidHost),
            ("-bad.com:443", InvalidHost),
            ("bücher.de:443", InvalidHost),
            ("a..b:443", InvalidHost),
            ("/path:443", InvalidHost),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_target(input), Err(expected.clone()), "{input}");
        }
    }

    #[test]
    fn head_with_pipelined_bytes() {
        let head =
            parse_head(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\nhello")
                .unwrap()
                .unwrap();
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.target, "a.example:443");
        assert_eq!(head.pipelined, b"hello");
        assert!(parse_head(b"CONNECT a.example:443 HTTP/1.1\r\nHost")
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(b"CONNECT a b c\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let many = format!(
            "CONNECT a:1 HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            parse_head(many.as_bytes()),
            Err(HeadError::TooLarge)
        ));
    }
}
