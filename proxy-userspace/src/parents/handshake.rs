//! The CONNECT exchange with a parent proxy: `CONNECT host:port HTTP/1.1`
//! (with `Proxy-Authorization: Basic` for `login=`), then the parent's answer
//! head, read with `httparse`. A `2xx` makes the connection the tunnel's
//! upstream; what the parent sent behind its head is tunnel payload and is
//! handed back so the client gets it first. Any other answer is relayed to
//! the client, as Squid does (`Http::Tunneler::bailOnResponseError`): its
//! status, reason, end-to-end fields and body.

use std::{io, time::Duration};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::connect_request::Target;

/// The longest answer head read from a parent.
const MAX_HEAD: usize = 64 * 1024;
/// The longest error body relayed from a parent; a longer one is left out.
const MAX_RELAYED_BODY: usize = 64 * 1024;
/// How long a parent's error body may take after its head.
const MAX_ERROR_BODY_WAIT: Duration = Duration::from_secs(2);
/// Fields of a parent's error answer that are about its connection or the
/// body's framing, not for the client (RFC 9110 §7.6.1); spliced frames the
/// relayed body itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Why a parent did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The parent answered with a status other than `2xx`: relayed to the client.
    #[error("parent answered {status} {}", answer.reason)]
    Refused {
        /// The parent's status code.
        status: u16,
        /// The rest of its answer, as the client gets it.
        answer: RelayedAnswer,
    },
    /// The parent's answer was not an HTTP response head.
    #[error("parent sent a malformed answer: {0}")]
    Malformed(String),
    /// The parent closed before its answer head was complete.
    #[error("parent closed the connection before answering")]
    Closed,
    /// The parent did not answer in time.
    #[error("parent did not answer within {0:?}")]
    Timeout(Duration),
    /// Writing the request or reading the answer failed.
    #[error("parent connection: {0}")]
    Io(#[from] io::Error),
}

impl HandshakeError {
    /// The status the client gets: the parent's own, else 502 (504 for a
    /// parent that did not answer in time).
    pub fn status(&self) -> u16 {
        match self {
            Self::Refused { status, .. } => *status,
            Self::Timeout(_) => 504,
            _ => 502,
        }
    }
}

/// The `CONNECT` request for `target`, with Basic credentials for `login`
/// (`USER:PASSWORD`).
pub fn request(target: &Target, login: Option<&str>) -> String {
    let authority = target.to_string();
    let mut text = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(login) = login {
        text.push_str(&proxy_authorization(login));
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

/// A `Proxy-Authorization` field for `login` (`USER:PASSWORD`), without CRLF.
pub fn proxy_authorization(login: &str) -> String {
    format!("Proxy-Authorization: {}", basic_credentials(login))
}

/// The `Basic` credentials of `login` (`USER:PASSWORD`), a field value.
pub fn basic_credentials(login: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(login)
    )
}

/// A parent's error answer as it is relayed to the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayedAnswer {
    /// Its reason phrase.
    pub reason: String,
    /// Its end-to-end header fields (not [`HOP_BY_HOP`] ones, nor those its
    /// `Connection` field names), name and value.
    pub fields: Vec<(String, String)>,
    /// Its body, de-chunked; empty when it had none, or one longer than
    /// [`MAX_RELAYED_BODY`] or not complete in time (then without its
    /// `Content-Type`).
    pub body: Vec<u8>,
}

/// How a parent's error answer delimits its body.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// The relayed fields of the answer head `head` and how its body is framed.
fn relayed_fields(
    head: &[u8],
    status: u16,
) -> Result<(Vec<(String, String)>, Framing), HandshakeError> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut fields);
    response
        .parse(head)
        .map_err(|err| HandshakeError::Malformed(err.to_string()))?;
    let named_by_connection: Vec<String> = response
        .headers
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("connection"))
        .flat_map(|field| {
            String::from_utf8_lossy(field.value)
                .split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut framing = if status == 204 || status == 304 || status < 200 {
        Framing::None
    } else {
        Framing::UntilClose
    };
    let mut fields = Vec::new();
    for field in response.headers.iter() {
        let name = field.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(field.value);
        if framing != Framing::None {
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked;
            } else if name == "content-length" && framing != Framing::Chunked {
                let length = value
                    .trim()
                    .parse()
                    .map_err(|_| HandshakeError::Malformed(format!("Content-Length {value:?}")))?;
                framing = Framing::Length(length);
            }
        }
        if HOP_BY_HOP.contains(&name.as_str()) || named_by_connection.contains(&name) {
            continue;
        }
        fields.push((field.name.to_owned(), value.into_owned()));
    }
    Ok((fields, framing))
}

/// Reads the body behind an error head: `read` holds what came after the
/// head already. `None` when it is longer than [`MAX_RELAYED_BODY`],
/// malformed, or the parent fails before it is complete.
async fn read_error_body(
    stream: &mut TcpStream,
    framing: Framing,
    mut read: Vec<u8>,
) -> Option<Vec<u8>> {
    let mut more = async |read: &mut Vec<u8>| -> Option<bool> {
        if read.len() > MAX_RELAYED_BODY + 4096 {
            return None;
        }
        read.reserve(4096);
        Some(stream.read_buf(read).await.ok()? > 0)
    };
    match framing {
        Framing::None => Some(Vec::new()),
        Framing::Length(length) if length > MAX_RELAYED_BODY => None,
        Framing::Length(length) => {
            while read.len() < length {
                if !more(&mut read).await? {
                    return None;
                }
            }
            read.truncate(length);
            Some(read)
        }
        Framing::UntilClose => {
            while more(&mut read).await? {}
            (read.len() <= MAX_RELAYED_BODY).then_some(read)
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            let mut at = 0;
            loop {
                match httparse::parse_chunk_size(&read[at..]) {
                    Ok(httparse::Status::Complete((_, 0))) => return Some(body),
                    Ok(httparse::Status::Complete((size_len, size))) => {
                        let size = usize::try_from(size).ok()?;
                        if body.len() + size > MAX_RELAYED_BODY {
                            return None;
                        }
                        // The chunk and its CRLF.
                        let end = at + size_len + size + 2;
                        while read.len() < end {
                            if !more(&mut read).await? {
                                return None;
                            }
                        }
                        body.extend_from_slice(&read[at + size_len..at + size_len + size]);
                        at = end;
                    }
                    Ok(httparse::Status::Partial) => {
                        if !more(&mut read).await? {
                            return None;
                        }
                    }
                    Err(_) => return None,
                }
            }
        }
    }
}

/// What a complete answer head says.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// The head's length in bytes.
    pub head_len: usize,
}

/// Parses an answer head at the start of `buf`; `Ok(None)` while incomplete.
pub fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, HandshakeError> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => Ok(Some(Answer {
            status: response.code.unwrap_or(0),
            reason: response.reason.unwrap_or_default().to_owned(),
            head_len,
        })),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HandshakeError::Malformed(
            format!("answer head longer than {MAX_HEAD} bytes"),
        )),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(err) => Err(HandshakeError::Malformed(err.to_string())),
    }
}

/// What was read from a parent that opened a tunnel.
#[derive(Debug, Default)]
pub struct Opened {
    /// The length of its answer head.
    pub head_len: u64,
    /// The bytes it sent behind the head: tunnel payload for the client.
    pub early: Vec<u8>,
}

/// Asks the parent on `stream` to open a tunnel to `target`, within `timeout`.
pub async fn open(
    stream: &mut TcpStream,
    target: &Target,
    login: Option<&str>,
    timeout: Duration,
) -> Result<Opened, HandshakeError> {
    let exchange = async {
        stream.write_all(request(target, login).as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        loop {
            if buf.len() == buf.capacity() {
                buf.reserve(4096);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
            if let Some(answer) = parse_answer(&buf)? {
                let rest = buf.split_off(answer.head_len);
                return Ok((answer, buf, rest));
            }
        }
    };
    let (answer, head, rest) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))??;
    if (200..300).contains(&answer.status) {
        return Ok(Opened {
            head_len: answer.head_len as u64,
            early: rest,
        });
    }
    let (mut fields, framing) = relayed_fields(&head, answer.status)?;
    // A body that does not come in time (a parent that frames it by closing
    // but keeps the connection open) is left out; the status and fields
    // still go to the client.
    let wait = timeout.min(MAX_ERROR_BODY_WAIT);
    let body = tokio::time::timeout(wait, read_error_body(stream, framing, rest))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            fields.retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
            Vec::new()
        });
    Err(HandshakeError::Refused {
        status: answer.status,
        answer: RelayedAnswer {
            reason: answer.reason,
            fields,
            body,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect_request::Host;

    #[test]
    fn request_with_login() {
        let target = Target {
            host: Host::Name("example.test".into()),
            port: 443,
        };
        assert_eq!(
            request(&target, Some("alice:s3cret")),
            "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\
             Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n"
        );
        let v6 = Target {
            host: Host::Ip("::1".parse().unwrap()),
            port: 8443,
        };
        assert!(request(&v6, None).starts_with("CONNECT [::1]:8443 HTTP/1.1\r\n"));
    }

    #[test]
    fn relayed_fields_leave_out_hop_by_hop_ones() {
        let head = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nConnection: close, X-Private\r\n\
                     X-Private: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 7\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n\r\n";
        let (fields, framing) = relayed_fields(head, 403).unwrap();
        assert_eq!(
            fields,
            [
                ("Content-Type".to_owned(), "text/html".to_owned()),
                ("X-Squid-Error".to_owned(), "ERR_ACCESS_DENIED 0".to_owned()),
            ]
        );
        assert_eq!(framing, Framing::Length(7));
        let chunked =
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(relayed_fields(chunked, 503).unwrap().1, Framing::Chunked);
        let bare = b"HTTP/1.0 502 Bad Gateway\r\n\r\n";
        assert_eq!(relayed_fields(bare, 502).unwrap().1, Framing::UntilClose);
        let empty = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(relayed_fields(empty, 304).unwrap().1, Framing::None);
        assert!(relayed_fields(b"HTTP/1.1 500 X\r\nContent-Length: x\r\n\r\n", 500).is_err());
    }

    /// The body `framing` frames in `sent`, written in pieces by a peer that
    /// then closes.
    async fn body_of(
        framing: Framing,
        read: &[u8],
        sent: &'static [&'static [u8]],
    ) -> Option<Vec<u8>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            for piece in sent {
                peer.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = read_error_body(&mut stream, framing, read.to_vec()).await;
        writer.await.unwrap();
        body
    }

    #[tokio::test]
    async fn error_bodies_by_their_framing() {
        assert_eq!(
            body_of(Framing::Length(4), b"bu", &[b"s", b"y-and-more"])
                .await
                .as_deref(),
            Some(&b"busy"[..])
        );
        assert_eq!(
            body_of(
                Framing::Chunked,
                b"4\r\nbu",
                &[b"sy\r\n3\r", b"\n!!!\r\n0\r\n\r\n"]
            )
            .await
            .as_deref(),
            Some(&b"busy!!!"[..])
        );
        assert_eq!(
            body_of(Framing::UntilClose, b"", &[b"all ", b"of it"])
                .await
                .as_deref(),
            Some(&b"all of it"[..])
        );
        assert_eq!(
            body_of(Framing::None, b"", &[b"ignored"]).await,
            Some(Vec::new())
        );
        // Cut short, too long, or malformed: left out.
        assert_eq!(body_of(Framing::Length(10), b"", &[b"short"]).await, None);
        assert_eq!(
            body_of(Framing::Length(MAX_RELAYED_BODY + 1), b"", &[]).await,
            None
        );
        assert_eq!(body_of(Framing::Chunked, b"zz\r\n", &[]).await, None);
        let big: &'static [u8] = Box::leak(vec![b'x'; MAX_RELAYED_BODY + 10].into_boxed_slice());
        let pieces: &'static [&'static [u8]] = Box::leak(Box::new([big]));
        assert_eq!(body_of(Framing::UntilClose, b"", pieces).await, None);
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer(b"HTTP/1.1 200 Conn").unwrap(), None);
        let head = b"HTTP/1.1 200 Connection established\r\n\r\nearly";
        let answer = parse_answer(head).unwrap().unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(&head[answer.head_len..], b"early");
        let refused = parse_answer(b"HTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (refused.status, refused.reason.as_str()),
            (503, "Service Unavailable")
        );
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_answer(&vec![b'a'; MAX_HEAD]).is_err());
    }
}
