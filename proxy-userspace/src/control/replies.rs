//! Error answers: the status line, the body and the write.

use super::*;

/// The reason phrase of an error status.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// The plain-text body of an error answer.
pub(crate) fn error_body(refusal: &Refusal) -> String {
    // Like Squid's error pages, a denial names its kind but not the rule: which
    // line of the policy matched is for the access log, not for clients.
    let detail = match refusal.result {
        "TCP_DENIED" if refusal.status == 403 => "ERR_ACCESS_DENIED",
        "TCP_DENIED" if refusal.status == 407 => {
            "ERR_CACHE_ACCESS_DENIED (proxy authentication required)"
        }
        _ => refusal.reason.as_str(),
    };
    format!(
        "spliced: {} {}: {detail}\n",
        refusal.status,
        reason_phrase(refusal.status)
    )
}

/// Writes an error answer, then closes gracefully. Returns the bytes written.
pub(super) async fn answer_error(
    client: &mut TcpStream,
    refusal: &Refusal,
    with_body: bool,
) -> u64 {
    let answer = match &refusal.relayed {
        Some(relayed) => {
            let mut head = format!("HTTP/1.1 {} {}\r\n", refusal.status, relayed.reason);
            for (name, value) in &relayed.fields {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                relayed.body.len()
            ));
            let mut answer = head.into_bytes();
            if with_body {
                answer.extend_from_slice(&relayed.body);
            }
            answer
        }
        None => {
            let body = error_body(refusal);
            let allow = if refusal.status == 405 {
                "Allow: CONNECT\r\n"
            } else {
                ""
            };
            format!(
                "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{allow}{}Connection: close\r\n\r\n{}",
                refusal.status,
                reason_phrase(refusal.status),
                body.len(),
                refusal.headers,
                if with_body { body.as_str() } else { "" },
            )
            .into_bytes()
        }
    };
    if client.write_all(&answer).await.is_err() {
        return 0;
    }
    let _ = client.shutdown().await;
    // Read (and drop) what the client still sends until it closes, for a bounded
    // time: closing with unread bytes would send a RST that can destroy the answer.
    let _ = tokio::time::timeout(LINGER_AFTER_ERROR, async {
        let mut sink = [0u8; 4096];
        let mut budget = 1 << 20;
        while budget > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget -= n.min(budget),
            }
        }
    })
    .await;
    answer.len() as u64
}
