//! Reads the TLS ClientHello at the start of a tunnel and extracts its SNI,
//! without terminating or decrypting anything.
//!
//! After the proxy has answered `200` to a `CONNECT`, the first bytes a TLS
//! client sends are a plaintext ClientHello, and its `server_name` extension
//! says which host the client means to talk to. That name is what a policy on
//! the *real* destination needs (the `CONNECT` target can say one thing and
//! the handshake another), so this module looks at those bytes before the
//! tunnel is handed to the data plane. The bytes are only looked at: whatever
//! was read stays in the caller's buffer, to be forwarded upstream unchanged.
//!
//! The input comes from an untrusted client, so the rules are strict and
//! decisions are early:
//! * a first byte other than `0x16` (handshake), or a first record whose
//!   version major is not 3, is [`Peeked::NotTls`] as soon as that byte is
//!   there: the tunnel carries something else, and waiting would only stall it;
//! * a ClientHello may arrive a byte at a time and may be fragmented over
//!   several handshake records; fragments of consecutive records are
//!   concatenated until the handshake message (`type 1`, 24-bit length) is
//!   complete. Anything else before that point (another content type, another
//!   handshake type, an empty record) is [`PeekError::Malformed`];
//! * lengths are checked against the cap before bytes are awaited: a record or
//!   handshake length that cannot fit is [`PeekError::TooLarge`] at once, so a
//!   client cannot make the proxy buffer (or wait for) more than the cap;
//! * the ClientHello must parse completely (tls-parser, no leftover bytes in
//!   the message or its extension block); a `server_name` extension, if any,
//!   must be the only one and hold exactly one `host_name`, a plausible DNS
//!   name: the name the proxy decides on must be the one a server would act
//!   on, never one of several readings of ambiguous bytes.

use std::time::Duration;

use tls_parser::{parse_tls_client_hello_extensions, parse_tls_handshake_client_hello};
use tls_parser::{SNIType, TlsExtension};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest a ClientHello may be, records and headers included (bytes).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Content type of a TLS handshake record.
const CONTENT_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// TLS record header: content type, version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake message header: type, 24-bit length.
const HANDSHAKE_HEADER: usize = 4;
/// Largest plaintext record fragment TLS allows (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Longest DNS name in text form, without the trailing dot.
const MAX_NAME: usize = 253;
/// Longest DNS label.
const MAX_LABEL: usize = 63;
/// Most bytes read from the client at a time.
const READ_CHUNK: usize = 4096;

/// What the first bytes of a tunnel turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// A TLS ClientHello; `sni` is the host_name of the server_name extension
    /// (a second one is malformed), lower-cased, trailing dot removed (None if
    /// absent).
    Hello {
        /// The server name the client asked for, if it sent one.
        sni: Option<String>,
    },
    /// The first byte(s) cannot start a TLS handshake record (not 0x16, or a
    /// record version major != 3).
    NotTls,
}

/// Why no decision could be made about the first bytes of a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// The deadline passed before a whole ClientHello arrived.
    #[error("no complete TLS ClientHello within the deadline")]
    Timeout,
    /// The ClientHello would be longer than [`MAX_CLIENT_HELLO`] or the cap passed.
    #[error("TLS ClientHello too large")]
    TooLarge,
    /// The bytes are TLS records but not a parsable ClientHello.
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(String),
    /// The client closed the connection before a whole ClientHello arrived.
    #[error("connection closed before the TLS ClientHello was complete")]
    ClosedEarly,
    /// Reading from the client failed.
    #[error("reading the TLS ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// Where [`scan`] got to.
enum Scan {
    /// Decided.
    Done(Peeked),
    /// Undecided until the buffer holds at least this many bytes (never more
    /// than the cap), so a reader fed a byte at a time scans once per record
    /// or header rather than once per byte.
    Need(usize),
}

/// Pure, incremental: looks at `buf` (all bytes received so far) and says
/// whether it holds a whole ClientHello. `Ok(None)` means more bytes are
/// needed; bytes after the ClientHello are ignored. `cap` (at most
/// [`MAX_CLIENT_HELLO`]) bounds the ClientHello, records and headers included.
pub fn parse(buf: &[u8], cap: usize) -> Result<Option<Peeked>, PeekError> {
    Ok(match scan(buf, cap)? {
        Scan::Done(peeked) => Some(peeked),
        Scan::Need(_) => None,
    })
}

/// Reads from `reader`, appending to `buf` (which may already hold bytes the
/// client sent earlier, e.g. pipelined behind the `CONNECT` head), until
/// [`parse`] decides, `deadline` passes, or the client closes.
///
/// It may read past the ClientHello, but `buf` never grows beyond `cap` (at
/// most [`MAX_CLIENT_HELLO`]) by reading. Whatever the outcome, `buf` holds
/// every byte read, in order: the caller forwards them upstream.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    deadline: Duration,
    cap: usize,
) -> Result<Peeked, PeekError> {
    // Bytes already there may decide on their own, even with no time left.
    let need = match scan(buf, cap)? {
        Scan::Done(peeked) => return Ok(peeked),
        Scan::Need(need) => need,
    };
    // A timed-out read is dropped at an await where no byte has been taken
    // from the reader, so `buf` stays exactly what the client sent.
    tokio::time::timeout(deadline, read_until_decided(reader, buf, need, cap))
        .await
        .unwrap_or(Err(PeekError::Timeout))
}

async fn read_until_decided<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    mut need: usize,
    cap: usize,
) -> Result<Peeked, PeekError> {
    let cap = cap.min(MAX_CLIENT_HELLO);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        // `scan` never asks for more than the cap, so there is room to read.
        let room = cap.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Err(PeekError::TooLarge);
        }
        let n = reader.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(PeekError::ClosedEarly);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() < need {
            continue;
        }
        match scan(buf, cap)? {
            Scan::Done(peeked) => return Ok(peeked),
            Scan::Need(more) => need = more,
        }
    }
}

/// Walks the records at the start of `buf` as far as they go.
fn scan(buf: &[u8], cap: usize) -> Result<Scan, PeekError> {
    let cap = cap.min(MAX_CLIENT_HELLO);
    // Not TLS as early as possible: a plaintext protocol must not wait for a
    // timeout just because its first line is short.
    match buf {
        [] => return need(1, cap),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Ok(Scan::Done(Peeked::NotTls)),
        [_] => return need(2, cap),
        [_, major, ..] if *major != 3 => return Ok(Scan::Done(Peeked::NotTls)),
        _ => {}
    }

    let mut hello = Reassembly::default();
    let mut pos = 0;
    loop {
        let header = &buf[pos..buf.len().min(pos + RECORD_HEADER)];
        if let Some(&content_type) = header.first() {
            if content_type != CONTENT_HANDSHAKE {
                return malformed(format!(
                    "record of content type {content_type} before the ClientHello is complete"
                ));
            }
        }
        if let Some(&major) = header.get(1) {
            if major != 3 {
                return malformed(format!("record version major {major}"));
            }
        }
        if header.len() < RECORD_HEADER {
            // The type and version bytes decide on their own; the length
            // needs both of its bytes.
            let next = if header.len() < 2 {
                header.len() + 1
            } else {
                RECORD_HEADER
            };
            return need(pos + next, cap);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let end = pos + RECORD_HEADER + len;
        if end > cap {
            return Err(PeekError::TooLarge);
        }
        if len == 0 {
            return malformed("empty handshake record".to_owned());
        }
        if len > MAX_FRAGMENT {
            return malformed(format!("record of {len} bytes"));
        }
        let fragment = &buf[pos + RECORD_HEADER..buf.len().min(end)];
        let seen = pos + RECORD_HEADER + fragment.len();
        hello.add(fragment)?;
        if let Some(total) = hello.total() {
            if hello.have >= total {
                return client_hello(&gather(buf, seen, total)).map(Scan::Done);
            }
            // The bytes so far plus the handshake bytes still missing: no way
            // to fit the message in fewer than that.
            if seen + (total - hello.have) > cap {
                return Err(PeekError::TooLarge);
            }
        }
        if buf.len() < end {
            // The message may end before the record does (the client then
            // waits for the server), so ask for no more than the message
            // needs; within the header, for the next byte that decides.
            let missing = match hello.total() {
                Some(total) => total - hello.have,
                None if hello.have == 0 => 1,
                None => HANDSHAKE_HEADER - hello.have,
            };
            return need((seen + missing).min(end), cap);
        }
        pos = end;
    }
}

/// The handshake message so far: how many of its bytes have been seen, and its
/// header, which may itself be split over records.
#[derive(Default)]
struct Reassembly {
    header: [u8; HANDSHAKE_HEADER],
    have: usize,
}

impl Reassembly {
    /// Counts the next fragment in, checking the message type once it is there.
    fn add(&mut self, fragment: &[u8]) -> Result<(), PeekError> {
        let header_missing = HANDSHAKE_HEADER.saturating_sub(self.have);
        for &byte in &fragment[..header_missing.min(fragment.len())] {
            if self.have == 0 && byte != HANDSHAKE_CLIENT_HELLO {
                return malformed(format!("handshake message of type {byte}, not ClientHello"));
            }
            self.header[self.have] = byte;
            self.have += 1;
        }
        self.have += fragment.len().saturating_sub(header_missing);
        Ok(())
    }

    /// The whole message's length, header included, once the header is known.
    fn total(&self) -> Option<usize> {
        let [_, a, b, c] = self.header;
        (self.have >= HANDSHAKE_HEADER).then(|| {
            HANDSHAKE_HEADER + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
        })
    }
}

/// The handshake message's first `len` bytes, gathered from the record
/// fragments in `buf[..upto]` (whose headers [`scan`] has already checked).
fn gather(buf: &[u8], upto: usize, len: usize) -> Vec<u8> {
    let mut message = Vec::with_capacity(len);
    let mut pos = 0;
    while pos < upto && message.len() < len {
        let record_len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        let start = pos + RECORD_HEADER;
        let end = (start + record_len).min(upto);
        let take = (end - start).min(len - message.len());
        message.extend_from_slice(&buf[start..start + take]);
        pos = start + record_len;
    }
    message
}

/// Parses a whole ClientHello handshake message (header included).
fn client_hello(message: &[u8]) -> Result<Peeked, PeekError> {
    let body = &message[HANDSHAKE_HEADER..];
    let hello = match parse_tls_handshake_client_hello(body) {
        Ok(([], hello)) => hello,
        Ok((rest, _)) => {
            return malformed(format!("{} bytes after the ClientHello fields", rest.len()))
        }
        Err(err) => return malformed(format!("ClientHello: {}", nom_why(&err))),
    };
    let Some(ext) = hello.ext else {
        return Ok(Peeked::Hello { sni: None });
    };
    let extensions = match parse_tls_client_hello_extensions(ext) {
        Ok(([], extensions)) => extensions,
        // An extension tls-parser cannot read would hide the ones after it,
        // the server_name among them: refuse rather than see no name.
        Ok((rest, _)) => {
            return malformed(format!(
                "extension block has {} unparsable bytes",
                rest.len()
            ))
        }
        Err(err) => return malformed(format!("extensions: {}", nom_why(&err))),
    };
    let mut names = extensions.iter().filter_map(|ext| match ext {
        TlsExtension::SNI(names) => Some(names),
        _ => None,
    });
    let Some(server_names) = names.next() else {
        return Ok(Peeked::Hello { sni: None });
    };
    // TLS servers reject a second server_name extension, or a second
    // host_name, so a name picked from either would not be the one served.
    if names.next().is_some() {
        return malformed("two server_name extensions".to_owned());
    }
    let mut host_names = server_names
        .iter()
        .filter(|(kind, _)| *kind == SNIType::HostName);
    let Some((_, name)) = host_names.next() else {
        return malformed("server_name extension without a host_name".to_owned());
    };
    if host_names.next().is_some() {
        return malformed("two host_name entries in server_name".to_owned());
    }
    Ok(Peeked::Hello {
        sni: Some(dns_name(name)?),
    })
}

/// A host_name as policy compares it: lower case, no trailing dot. Only
/// plausible DNS names pass, so the text is safe to log and match on.
fn dns_name(raw: &[u8]) -> Result<String, PeekError> {
    let bad = || {
        let shown = raw.iter().take(64).copied().collect::<Vec<u8>>();
        PeekError::Malformed(format!(
            "server name \"{}\" is not a DNS name",
            shown.escape_ascii()
        ))
    };
    let name = std::str::from_utf8(raw).map_err(|_| bad())?;
    let name = name.strip_suffix('.').unwrap_or(name);
    let plausible = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !plausible {
        return Err(bad());
    }
    Ok(name.to_ascii_lowercase())
}

/// `Need(n)`, or too large when `n` bytes would not fit under the cap.
fn need(n: usize, cap: usize) -> Result<Scan, PeekError> {
    if n > cap {
        Err(PeekError::TooLarge)
    } else {
        Ok(Scan::Need(n))
    }
}

/// What went wrong in a tls-parser parser, without the input it carries (up
/// to a whole ClientHello, which has no place in a log line).
fn nom_why(err: &tls_parser::Err<tls_parser::nom::error::Error<&[u8]>>) -> String {
    match err {
        tls_parser::Err::Incomplete(_) => "truncated".to_owned(),
        tls_parser::Err::Error(err) | tls_parser::Err::Failure(err) => {
            format!("{:?} at {} bytes from the end", err.code, err.input.len())
        }
    }
}

fn malformed<T>(why: String) -> Result<T, PeekError> {
    Err(PeekError::Malformed(why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// `u16` length prefix, then `data`.
    fn vec16(data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    /// One extension: type, length, data.
    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(vec16(data));
        out
    }

    /// A server_name extension holding these host_names.
    fn server_name(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(0); // host_name
            list.extend(vec16(name));
        }
        ext(0, &vec16(&list))
    }

    /// A ClientHello handshake message (header included) with these extensions,
    /// shaped like a TLS 1.3 client's.
    fn handshake_with(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
        body.extend([0x42; 32]); // random
        body.push(32); // legacy_session_id
        body.extend([0x17; 32]);
        body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f])); // cipher suites
        body.extend([1, 0]); // compression: null
        body.extend(vec16(&extensions.concat()));
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    /// The usual extensions around a server_name (if any).
    fn handshake(sni: Option<&[u8]>) -> Vec<u8> {
        let mut extensions = vec![ext(0x0a0a, &[])]; // GREASE
        extensions.extend(sni.map(|name| server_name(&[name])));
        extensions.push(ext(10, &vec16(&[0x00, 0x1d, 0x00, 0x17]))); // supported_groups
        extensions.push(ext(13, &vec16(&[0x04, 0x03, 0x08, 0x04]))); // signature_algorithms
        extensions.push(ext(43, &[4, 0x03, 0x04, 0x03, 0x03])); // supported_versions
        let mut key_share = vec![0x00, 0x1d];
        key_share.extend(vec16(&[0x55; 32]));
        extensions.push(ext(51, &vec16(&key_share)));
        handshake_with(&extensions)
    }

    /// `message` cut into handshake records of these fragment sizes (the last
    /// one takes the rest).
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        for (i, &size) in sizes.iter().enumerate() {
            let size = if i + 1 == sizes.len() {
                rest.len()
            } else {
                size
            };
            let (fragment, after) = rest.split_at(size);
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend(vec16(fragment));
            rest = after;
        }
        out
    }

    /// A whole ClientHello in one record.
    fn client_hello_bytes(sni: Option<&[u8]>) -> Vec<u8> {
        records(&handshake(sni), &[usize::MAX])
    }

    fn hello(sni: &str) -> Peeked {
        Peeked::Hello {
            sni: Some(sni.to_owned()),
        }
    }

    fn is_malformed(result: Result<Option<Peeked>, PeekError>) -> bool {
        matches!(result, Err(PeekError::Malformed(_)))
    }

    #[test]
    fn sni_present() {
        let bytes = client_hello_bytes(Some(b"Www.Example.COM."));
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("www.example.com"))
        );
        let bytes = client_hello_bytes(Some(b"a_b-c.example"));
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("a_b-c.example"))
        );
    }

    #[test]
    fn sni_absent() {
        let bytes = client_hello_bytes(None);
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::Hello { sni: None })
        );
        // An SSL 3.0-style hello with no extension block at all.
        let mut message = handshake_with(&[]);
        message.truncate(message.len() - 2);
        message[3] -= 2;
        let bytes = records(&message, &[usize::MAX]);
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::Hello { sni: None })
        );
    }

    #[test]
    fn bytes_after_the_hello_are_left_alone() {
        let mut bytes = client_hello_bytes(Some(b"example.com"));
        bytes.extend([0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("example.com"))
        );
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let bytes = client_hello_bytes(Some(b"example.com"));
        for k in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..k], MAX_CLIENT_HELLO).unwrap(),
                None,
                "prefix {k}"
            );
        }
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("example.com"))
        );
    }

    #[test]
    fn fragmented_over_three_records() {
        // The handshake header itself is split over the first two records.
        let bytes = records(&handshake(Some(b"frag.example")), &[2, 40, usize::MAX]);
        let starts = [0, RECORD_HEADER + 2, 2 * RECORD_HEADER + 42];
        assert!(starts.iter().all(|&i| bytes[i] == CONTENT_HANDSHAKE));
        for k in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..k], MAX_CLIENT_HELLO).unwrap(),
                None,
                "prefix {k}"
            );
        }
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("frag.example"))
        );
    }

    #[test]
    fn hello_ending_inside_a_longer_record() {
        // A record that claims more than the hello: decided once the hello is
        // there, without waiting for the rest of the record.
        let message = handshake(Some(b"early.example"));
        let mut bytes = vec![CONTENT_HANDSHAKE, 3, 1];
        bytes.extend(((message.len() + 100) as u16).to_be_bytes());
        bytes.extend(&message);
        assert_eq!(
            parse(&bytes, MAX_CLIENT_HELLO).unwrap(),
            Some(hello("early.example"))
        );
    }

    /// Whenever `scan` asks for `n` bytes, no shorter prefix decides.
    #[test]
    fn need_is_a_lower_bound() {
        let message = handshake(Some(b"example.com"));
        let mut long_record = vec![CONTENT_HANDSHAKE, 3, 1];
        long_record.extend(((message.len() + 100) as u16).to_be_bytes());
        long_record.extend(&message);
        let mut bad_type = records(&message, &[1, 3, usize::MAX]);
        bad_type[5] = 2;
        let inputs = [
            client_hello_bytes(Some(b"example.com")),
            records(&message, &[1, 1, 1, 1, 1, usize::MAX]),
            records(&message, &[3, 50, usize::MAX]),
            long_record,
            bad_type,
        ];
        for bytes in inputs {
            let decided_at = (0..=bytes.len())
                .find(|&k| !matches!(parse(&bytes[..k], MAX_CLIENT_HELLO), Ok(None)))
                .expect("decided");
            for k in 0..decided_at {
                match scan(&bytes[..k], MAX_CLIENT_HELLO) {
                    Ok(Scan::Need(n)) => assert!(n > k && n <= decided_at, "{k}: {n}"),
                    _ => panic!("prefix {k} decided"),
                }
            }
        }
    }

    #[test]
    fn garbage_is_not_tls() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n", MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::NotTls)
        );
        assert_eq!(parse(b"G", MAX_CLIENT_HELLO).unwrap(), Some(Peeked::NotTls));
        assert_eq!(
            parse(b"SSH-2.0-OpenSSH", MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::NotTls)
        );
        // Handshake content type, but version major 2.
        assert_eq!(
            parse(&[0x16, 2], MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::NotTls)
        );
        assert_eq!(parse(&[0x16], MAX_CLIENT_HELLO).unwrap(), None);
        assert_eq!(parse(&[], MAX_CLIENT_HELLO).unwrap(), None);
    }

    #[test]
    fn other_record_types() {
        // Application data first: not a TLS handshake start at all.
        assert_eq!(
            parse(&[0x17, 3, 3, 0, 1, 0], MAX_CLIENT_HELLO).unwrap(),
            Some(Peeked::NotTls)
        );
        // Application data after the first fragment of a hello.
        let mut bytes = records(&handshake(Some(b"example.com")), &[10, usize::MAX]);
        bytes.truncate(15);
        assert_eq!(parse(&bytes, MAX_CLIENT_HELLO).unwrap(), None);
        bytes.push(0x17);
        assert!(is_malformed(parse(&bytes, MAX_CLIENT_HELLO)));
        // A later record with version major 2.
        bytes.truncate(15);
        bytes.extend([0x16, 2]);
        assert!(is_malformed(parse(&bytes, MAX_CLIENT_HELLO)));
    }

    #[test]
    fn zero_length_record() {
        assert!(is_malformed(parse(&[0x16, 3, 1, 0, 0], MAX_CLIENT_HELLO)));
        let mut bytes = records(&handshake(None), &[10, usize::MAX]);
        bytes.truncate(15);
        bytes.extend([0x16, 3, 1, 0, 0]);
        assert!(is_malformed(parse(&bytes, MAX_CLIENT_HELLO)));
    }

    #[test]
    fn huge_lengths_are_too_large_at_once() {
        // A record length beyond the cap, with nothing after the header.
        assert!(matches!(
            parse(&[0x16, 3, 1, 0xff, 0xff], MAX_CLIENT_HELLO),
            Err(PeekError::TooLarge)
        ));
        // A handshake length beyond the cap, in a small first record.
        assert!(matches!(
            parse(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff], MAX_CLIENT_HELLO),
            Err(PeekError::TooLarge)
        ));
        // A cap smaller than this hello.
        let bytes = client_hello_bytes(Some(b"example.com"));
        let cap = bytes.len() - 1;
        assert!(matches!(parse(&bytes[..9], cap), Err(PeekError::TooLarge)));
        assert!(parse(&bytes, bytes.len()).unwrap().is_some());
        // A cap above the maximum is the maximum.
        assert!(matches!(
            parse(&[0x16, 3, 1, 0, 4, 1, 1, 0, 0], usize::MAX),
            Err(PeekError::TooLarge)
        ));
        // A legal length for the cap, but over TLS's record limit.
        assert!(is_malformed(parse(
            &[0x16, 3, 1, 0x40, 0x01],
            MAX_CLIENT_HELLO
        )));
    }

    #[test]
    fn not_a_client_hello() {
        let mut message = handshake(Some(b"example.com"));
        message[0] = 2; // ServerHello
        let bytes = records(&message, &[usize::MAX]);
        assert!(is_malformed(parse(&bytes, MAX_CLIENT_HELLO)));
        // Decided on the type byte, without the rest.
        assert!(is_malformed(parse(&bytes[..6], MAX_CLIENT_HELLO)));
        // A ClientHello whose fields do not fill its length.
        let mut message = handshake(None);
        message.extend([0, 0]);
        message[3] += 2;
        assert!(is_malformed(parse(
            &records(&message, &[usize::MAX]),
            MAX_CLIENT_HELLO
        )));
    }

    #[test]
    fn bad_server_names() {
        let names: [&[u8]; 8] = [
            b"exa mple.com",
            b"example.com/",
            b"b\xc3\xbccher.de",
            b"\xff\xfe",
            b"",
            b".",
            b"a..b",
            &[b'a'; 254],
        ];
        for name in names {
            let bytes = client_hello_bytes(Some(name));
            assert!(is_malformed(parse(&bytes, MAX_CLIENT_HELLO)), "{name:?}");
        }
        let long_label = [b'a'; 64];
        assert!(is_malformed(parse(
            &client_hello_bytes(Some(&long_label)),
            MAX_CLIENT_HELLO
        )));
    }

    #[test]
    fn ambiguous_server_names() {
        let twice = handshake_with(&[server_name(&[b"a.example"]), server_name(&[b"b.example"])]);
        assert!(is_malformed(parse(
            &records(&twice, &[usize::MAX]),
            MAX_CLIENT_HELLO
        )));
        let two_names = handshake_with(&[server_name(&[b"a.example", b"b.example"])]);
        assert!(is_malformed(parse(
            &records(&two_names, &[usize::MAX]),
            MAX_CLIENT_HELLO
        )));
        // An extension block that ends in the middle of an extension.
        let cut = handshake_with(&[server_name(&[b"a.example"]), vec![0x00, 0x2b, 0x00]]);
        assert!(is_malformed(parse(
            &records(&cut, &[usize::MAX]),
            MAX_CLIENT_HELLO
        )));
    }

    /// Every single-byte change and every truncation of a hello is decided
    /// somehow, without a panic.
    #[test]
    fn mutations_do_not_panic() {
        let bytes = records(&handshake(Some(b"example.com")), &[7, 60, usize::MAX]);
        for i in 0..bytes.len() {
            for value in [0, 1, 0x16, 0x7f, 0xff] {
                let mut mutated = bytes.clone();
                mutated[i] = value;
                let _ = parse(&mutated, MAX_CLIENT_HELLO);
                let _ = parse(&mutated[..i], MAX_CLIENT_HELLO);
            }
        }
    }

    #[tokio::test]
    async fn byte_at_a_time() {
        let bytes = records(&handshake(Some(b"Slow.Example")), &[30, usize::MAX]);
        let (mut client, mut proxy) = tokio::io::duplex(64);
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            for byte in sent {
                client.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = Vec::new();
        let peeked = read_client_hello(
            &mut proxy,
            &mut buf,
            Duration::from_secs(10),
            MAX_CLIENT_HELLO,
        )
        .await
        .unwrap();
        assert_eq!(peeked, hello("slow.example"));
        assert_eq!(buf, bytes);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn bytes_already_read_count() {
        let bytes = client_hello_bytes(Some(b"example.com"));
        let (mut client, mut proxy) = tokio::io::duplex(4096);
        // The first 20 bytes came pipelined behind the CONNECT head.
        let mut buf = bytes[..20].to_vec();
        client.write_all(&bytes[20..]).await.unwrap();
        client.write_all(b"more").await.unwrap();
        let peeked = read_client_hello(
            &mut proxy,
            &mut buf,
            Duration::from_secs(10),
            MAX_CLIENT_HELLO,
        )
        .await
        .unwrap();
        assert_eq!(peeked, hello("example.com"));
        assert!(buf.starts_with(&bytes));
        // Decided from the buffer alone, even with no time left.
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        let peeked = read_client_hello(&mut proxy, &mut buf, Duration::ZERO, MAX_CLIENT_HELLO)
            .await
            .unwrap();
        assert_eq!(peeked, Peeked::NotTls);
    }

    #[tokio::test]
    async fn slow_writer_times_out() {
        let bytes = client_hello_bytes(Some(b"example.com"));
        let (mut client, mut proxy) = tokio::io::duplex(4096);
        client.write_all(&bytes[..10]).await.unwrap();
        let mut buf = Vec::new();
        let result = read_client_hello(
            &mut proxy,
            &mut buf,
            Duration::from_millis(100),
            MAX_CLIENT_HELLO,
        )
        .await;
        assert!(matches!(result, Err(PeekError::Timeout)), "{result:?}");
        assert_eq!(buf, &bytes[..10]);
        drop(client);
    }

    #[tokio::test]
    async fn eof_midway() {
        let bytes = client_hello_bytes(Some(b"example.com"));
        let (mut client, mut proxy) = tokio::io::duplex(4096);
        client.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        drop(client);
        let mut buf = Vec::new();
        let result = read_client_hello(
            &mut proxy,
            &mut buf,
            Duration::from_secs(10),
            MAX_CLIENT_HELLO,
        )
        .await;
        assert!(matches!(result, Err(PeekError::ClosedEarly)), "{result:?}");
        assert_eq!(buf, &bytes[..bytes.len() / 2]);
    }

    #[tokio::test]
    async fn reads_stay_under_the_cap() {
        // A record that fits the cap exactly but a hello that does not: the
        // reader stops at the cap although the client sends more.
        let mut bytes = vec![0x16, 3, 1, 0x03, 0xfb, 1, 0, 0x10, 0];
        bytes.resize(5000, 0x41);
        let (mut client, mut proxy) = tokio::io::duplex(8192);
        client.write_all(&bytes).await.unwrap();
        let mut buf = Vec::new();
        let result = read_client_hello(&mut proxy, &mut buf, Duration::from_secs(10), 1024).await;
        assert!(matches!(result, Err(PeekError::TooLarge)), "{result:?}");
        assert!(buf.len() <= 1024, "{}", buf.len());
        // The hello itself is capped: the same bytes with a record of 1019
        // bytes and a handshake message that fills it.
        let mut bytes = vec![0x16, 3, 1, 0x03, 0xfb, 1, 0, 0x03, 0xf7];
        bytes.resize(5000, 0x41);
        let (mut client, mut proxy) = tokio::io::duplex(8192);
        client.write_all(&bytes).await.unwrap();
        let mut buf = Vec::new();
        let result = read_client_hello(&mut proxy, &mut buf, Duration::from_secs(10), 1024).await;
        assert!(matches!(result, Err(PeekError::Malformed(_))), "{result:?}");
        assert!(buf.len() <= 1024, "{}", buf.len());
    }
}
