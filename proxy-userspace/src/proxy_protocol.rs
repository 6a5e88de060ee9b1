//! Reading the PROXY protocol header (v1 text, v2 binary) that a load
//! balancer puts in front of each connection on an `http_port …
//! require-proxy-header`. Parsing is the `ppp` crate's; this module reads
//! the header across as many segments as it comes in, within a deadline and
//! a size cap, and says which address is the client.
//!
//! Only the header is consumed: the bytes read behind it are handed back to
//! the request-head reader unchanged.
//!
//! Which address is the client:
//! * v1 `TCP4`/`TCP6`, v2 `PROXY` over IPv4/IPv6 (stream): the header's
//!   source address and port.
//! * v1 `UNKNOWN`, v2 `LOCAL` (health checks), v2 `PROXY` with the `UNSPEC`
//!   or `UNIX` family: the TCP peer, as the specification asks for the first
//!   three (a UNIX-socket client has no IP address to judge).
//! * v2 TLVs are skipped; a v2 `PROXY` header for datagrams is refused.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ppp::{v1, v2};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::settings::{Policy, Settings};

/// The v2 signature (12 bytes), then version/command, family/protocol and
/// a 16-bit length.
const V2_FIXED: usize = 16;
/// The v1 header's signature.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The longest v1 header (the specification's 107 bytes, CRLF included).
const V1_MAX: usize = 107;
/// The most address and TLV bytes accepted behind a v2 header's fixed part.
/// The protocol allows 65535; load balancers send addresses and a few small
/// TLVs, so a header past this is refused rather than buffered.
pub const V2_MAX_PAYLOAD: usize = 4096;

/// A PROXY header, read and consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client the header names; `None` when the TCP peer stays the
    /// client (v1 `UNKNOWN`, v2 `LOCAL`, `UNSPEC` or `UNIX`).
    pub source: Option<SocketAddr>,
    /// The header's size in bytes.
    pub len: usize,
    /// `v1` or `v2`.
    pub version: &'static str,
}

/// Why a connection on a `require-proxy-header` port was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// `proxy_protocol_access` does not allow the TCP peer.
    #[error("PROXY header not accepted from {peer}: {rule}")]
    NotAllowed {
        /// The TCP peer.
        peer: SocketAddr,
        /// The line (or implicit rule) that refused it.
        rule: String,
    },
    /// The first bytes are neither PROXY signature (a plain request, or a
    /// corrupted signature).
    #[error("no PROXY protocol header (first bytes {0:?})")]
    Missing(String),
    /// A signature was there, the rest is not a valid header.
    #[error("malformed PROXY {version} header: {detail}")]
    Malformed {
        /// `v1` or `v2`.
        version: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A v1 line without its CRLF in 107 bytes, or a v2 header longer than
    /// [`V2_MAX_PAYLOAD`] allows.
    #[error("PROXY header too long ({0} bytes)")]
    TooLong(usize),
    /// The header was not complete within the deadline.
    #[error("PROXY header not received within {0:?}")]
    Timeout(Duration),
    /// The peer closed before the header was complete.
    #[error("connection closed before the PROXY header was complete ({0} bytes received)")]
    ClosedEarly(usize),
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// The proxy shut down while the header was awaited.
    #[error("proxy shut down before the PROXY header was complete")]
    Shutdown,
}

impl ProxyHeaderError {
    /// The `reason` label of `spliced_proxy_protocol_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAllowed { .. } => "not_allowed",
            Self::Missing(_) => "missing",
            Self::Malformed { .. } => "malformed",
            Self::TooLong(_) => "too_long",
            Self::Timeout(_) => "timeout",
            Self::ClosedEarly(_) => "closed_early",
            Self::Io(_) => "io",
            Self::Shutdown => "shutdown",
        }
    }

    /// Every `reason`, so each series exists from the start.
    pub const REASONS: [&'static str; 8] = [
        "not_allowed",
        "missing",
        "malformed",
        "too_long",
        "timeout",
        "closed_early",
        "io",
        "shutdown",
    ];
}

/// What the bytes read so far are.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A complete header; the rest of the buffer is the client's.
    Header(ProxyHeader),
    /// More bytes are needed.
    Incomplete,
}

/// Takes a connection on a `require-proxy-header` port: refuses a peer
/// `proxy_protocol_access` does not allow before reading a byte, then reads
/// the header within `request_timeout`.
pub async fn accept(
    settings: &Settings,
    client: &mut TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<(ProxyHeader, Vec<u8>), ProxyHeaderError> {
    // Only a squid.conf has http_port lines, so the built-in policy never
    // gets here.
    if let Policy::Squid(squid) = &settings.policy {
        squid
            .proxy_protocol_allowed(peer, local)
            .map_err(|rule| ProxyHeaderError::NotAllowed { peer, rule })?;
    }
    read(client, settings.request_timeout).await
}

/// Closes a refused connection without an answer, as Squid does: a FIN,
/// then what the peer still sends is read and dropped for at most `linger`
/// (closing with unread bytes would reset the connection instead).
pub async fn close(client: &mut TcpStream, linger: Duration) {
    let _ = client.shutdown().await;
    let _ = tokio::time::timeout(linger, async {
        let mut sink = [0u8; 4096];
        let mut budget: usize = 1 << 20;
        while budget > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget -= n.min(budget),
            }
        }
    })
    .await;
}

/// Reads the PROXY header from `client` within `deadline`. Returns it and the
/// bytes read behind it (the start of the request head).
pub async fn read(
    client: &mut TcpStream,
    deadline: Duration,
) -> Result<(ProxyHeader, Vec<u8>), ProxyHeaderError> {
    match tokio::time::timeout(deadline, read_inner(client)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyHeaderError::Timeout(deadline)),
    }
}

async fn read_inner(client: &mut TcpStream) -> Result<(ProxyHeader, Vec<u8>), ProxyHeaderError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        client.readable().await?;
        buf.reserve(4096);
        match client.try_read_buf(&mut buf) {
            Ok(0) => return Err(ProxyHeaderError::ClosedEarly(buf.len())),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        }
        if let Parsed::Header(header) = parse(&buf)? {
            let rest = buf.split_off(header.len);
            return Ok((header, rest));
        }
    }
}

/// Parses a header at the start of `buf`.
fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let prefix_of = |signature: &[u8]| {
        let n = buf.len().min(signature.len());
        buf[..n] == signature[..n]
    };
    if prefix_of(v2::PROTOCOL_PREFIX) {
        parse_v2(buf)
    } else if prefix_of(V1_SIGNATURE) {
        parse_v1(buf)
    } else {
        let shown = &buf[..buf.len().min(16)];
        Err(ProxyHeaderError::Missing(
            String::from_utf8_lossy(shown).into_owned(),
        ))
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::TooLong(V2_FIXED + payload));
    }
    let malformed = |detail: String| ProxyHeaderError::Malformed {
        version: "v2",
        detail,
    };
    let header = match v2::Header::try_from(buf) {
        Ok(header) => header,
        Err(v2::ParseError::Partial(..) | v2::ParseError::Incomplete(_)) => {
            return Ok(Parsed::Incomplete)
        }
        Err(err) => return Err(malformed(err.to_string())),
    };
    let source = match (header.command, header.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
        (v2::Command::Proxy, _) if header.protocol != v2::Protocol::Stream => {
            return Err(malformed(format!(
                "{:?} over a TCP connection",
                header.protocol
            )))
        }
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
    };
    Ok(Parsed::Header(ProxyHeader {
        source,
        len: header.len(),
        version: "v2",
    }))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // A lone CR, or no CR yet.
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::TooLong(buf.len()))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(ProxyHeaderError::TooLong(len));
    }
    let header = v1::Header::try_from(&buf[..len]).map_err(|err| ProxyHeaderError::Malformed {
        version: "v1",
        detail: err.to_string(),
    })?;
    let source = match header.addresses {
        v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => None,
    };
    Ok(Parsed::Header(ProxyHeader {
        source,
        len,
        version: "v1",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = v2::PROTOCOL_PREFIX.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend((payload.len() as u16).to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    fn header(buf: &[u8]) -> ProxyHeader {
        match parse(buf) {
            Ok(Parsed::Header(header)) => header,
            other => panic!("{buf:?}: {other:?}"),
        }
    }

    #[test]
    fn v1_headers() {
        let text = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 3128\r\nCONNECT";
        let h = header(text);
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(h.len, text.len() - b"CONNECT".len());
        let h = header(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n");
        assert_eq!(h.source, Some("[2001:db8::7]:1".parse().unwrap()));
        assert_eq!(header(b"PROXY UNKNOWN\r\n").source, None);
        // Every prefix of a header asks for more.
        for n in 0..text.len() - 9 {
            assert_eq!(parse(&text[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
    }

    #[test]
    fn v2_headers() {
        let mut payload = vec![192, 0, 2, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x0c, 0x38];
        // A TLV (PP2_TYPE_AUTHORITY) is skipped.
        payload.extend([0x02, 0, 3, b'a', b'.', b'b']);
        let bytes = v2(1, 0x11, &payload);
        let h = header(&bytes);
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(h.len, bytes.len());
        for n in 0..bytes.len() {
            assert_eq!(parse(&bytes[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
        let mut v6 = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        v6.extend([0u8; 16]);
        v6.extend([0, 80, 0, 81]);
        assert_eq!(
            header(&v2(1, 0x21, &v6)).source,
            Some("[2001:db8::7]:80".parse().unwrap())
        );
        assert_eq!(header(&v2(0, 0x00, &[])).source, None);
        assert_eq!(header(&v2(1, 0x00, &[])).source, None);
        assert_eq!(header(&v2(1, 0x31, &[0; 216])).source, None);
    }

    #[test]
    fn mutations_do_not_panic_and_never_overrun() {
        let mut v6 = vec![0x20; 36];
        v6.extend([0x02, 0, 1, b'x']);
        let headers = [
            b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 3128\r\nCONNECT".to_vec(),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n".to_vec(),
            v2(1, 0x11, &[192, 0, 2, 7, 10, 0, 0, 1, 0, 1, 0, 2]),
            v2(1, 0x21, &v6),
            v2(1, 0x31, &[0; 216]),
        ];
        for bytes in headers {
            for i in 0..bytes.len() {
                for value in [0, 1, b'\r', b'\n', b' ', 0x11, 0x21, 0x7f, 0xff] {
                    let mut mutated = bytes.clone();
                    mutated[i] = value;
                    for input in [&mutated[..], &mutated[..i]] {
                        if let Ok(Parsed::Header(header)) = parse(input) {
                            assert!(header.len <= input.len());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn refusals() {
        let reason = |buf: &[u8]| parse(buf).unwrap_err().reason();
        assert_eq!(reason(b"CONNECT a:443 HTTP/1.1\r\n"), "missing");
        assert_eq!(reason(b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\x0c"), "missing");
        assert_eq!(reason(b"PROXY garbage\r\n"), "malformed");
        assert_eq!(
            reason(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"),
            "malformed"
        );
        assert_eq!(
            reason(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat()),
            "too_long"
        );
        assert_eq!(reason(&v2(1, 0x11, &[0; 4])), "malformed");
        assert_eq!(reason(&v2(1, 0x12, &[0; 12])), "malformed");
        assert_eq!(reason(&v2(2, 0x11, &[0; 12])), "malformed");
        let mut long = v2(1, 0x11, &[0; 12]);
        long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(reason(&long[..V2_FIXED]), "too_long");
    }
}
