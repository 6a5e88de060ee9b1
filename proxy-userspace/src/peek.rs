//! The TLS name policy's second step (Squid's SslBump2): the ClientHello a
//! tunnel starts with is read (`tls_peek`) and judged by squid.conf's
//! `ssl_bump`, `on_unsupported_protocol` and `sni_must_match_connect` (see
//! `squid/ssl_bump.rs`). Nothing is decrypted: the bytes read go upstream
//! unchanged when the tunnel is spliced.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::{
    squid::{RequestFacts, SquidConfig, Step2},
    tls_peek::{self, PeekError, Peeked},
};

/// What a peek decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the tunnel to the data plane, the bytes read first.
    Splice,
    /// Close it.
    Terminate {
        /// The metric label: `terminate`, `sni_mismatch`, `not_tls`, or why
        /// no ClientHello could be read (`timeout`, `too_large`,
        /// `malformed`, `closed_early`, `io`).
        reason: &'static str,
        /// For the log: the rule, or what was wrong.
        detail: String,
    },
}

/// What a peek found and decided.
#[derive(Debug)]
pub struct Peek {
    /// The ClientHello's SNI, if it had one.
    pub sni: Option<String>,
    /// What to do with the tunnel.
    pub verdict: Verdict,
}

/// The metric label of a failed read.
fn label(err: &PeekError) -> &'static str {
    match err {
        PeekError::Timeout => "timeout",
        PeekError::TooLarge => "too_large",
        PeekError::Malformed(_) => "malformed",
        PeekError::ClosedEarly => "closed_early",
        PeekError::Io(_) => "io",
    }
}

/// Reads the ClientHello from `client` into `read` (which holds what the
/// client pipelined already) within `deadline`, and judges it with `squid`;
/// `facts` are the tunnel's step-1 facts.
pub async fn run(
    squid: &SquidConfig,
    facts: &RequestFacts<'_>,
    client: &mut TcpStream,
    read: &mut Vec<u8>,
    deadline: Duration,
) -> Peek {
    match tls_peek::read_client_hello(client, read, deadline, tls_peek::MAX_CLIENT_HELLO).await {
        Ok(Peeked::Hello { sni }) => {
            let at_step2 = RequestFacts {
                step: 2,
                sni: sni.as_deref(),
                ..*facts
            };
            let verdict = match squid.tls_step2(&at_step2, true) {
                Step2::Splice => Verdict::Splice,
                Step2::Terminate { reason, detail } => Verdict::Terminate {
                    reason,
                    detail: match &sni {
                        Some(sni) => format!("{detail} (sni {sni})"),
                        None => format!("{detail} (no sni)"),
                    },
                },
            };
            Peek { sni, verdict }
        }
        Ok(Peeked::NotTls) => {
            let at_step2 = RequestFacts { step: 2, ..*facts };
            let verdict = if squid.tunnels_unsupported(&at_step2) {
                Verdict::Splice
            } else {
                Verdict::Terminate {
                    reason: "not_tls",
                    detail: "the tunnel does not start with a TLS ClientHello (on_unsupported_protocol respond)".into(),
                }
            };
            Peek { sni: None, verdict }
        }
        Err(err) => Peek {
            sni: None,
            verdict: Verdict::Terminate {
                reason: label(&err),
                detail: format!("no ClientHello: {err}"),
            },
        },
    }
}
