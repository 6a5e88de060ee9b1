//! The CONNECT exchange with a parent proxy: `CONNECT host:port HTTP/1.1`
//! (with `Proxy-Authorization: Basic` for `login=`), then the parent's answer
//! head, read with `httparse`. A `2xx` makes the connection the tunnel's
//! upstream; what the parent sent behind its head is tunnel payload and is
//! handed back so the client gets it first.

use std::{io, time::Duration};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::connect_request::Target;

/// The longest answer head read from a parent.
const MAX_HEAD: usize = 64 * 1024;

/// Why a parent did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The parent answered with a status other than `2xx`: relayed to the client.
    #[error("parent answered {status} {reason}")]
    Refused {
        /// The parent's status code.
        status: u16,
        /// Its reason phrase.
        reason: String,
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
                if !(200..300).contains(&answer.status) {
                    return Err(HandshakeError::Refused {
                        status: answer.status,
                        reason: answer.reason,
                    });
                }
                return Ok(Opened {
                    head_len: answer.head_len as u64,
                    early: buf.split_off(answer.head_len),
                });
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
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
