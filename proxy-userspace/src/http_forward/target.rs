//! The absolute-form request target of a proxied request
//! (`http://host[:port]/path?query`, RFC 9112 §3.2.2): where to connect, the
//! `Host` to send, and the origin-form target to send upstream.

use hyper::Uri;

use crate::connect_request::{parse_target, Target};

/// A request target a forward proxy can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsoluteTarget {
    /// Where to connect (port 80 when the URI names none).
    pub target: Target,
    /// The URI's authority without user information: the `Host` field.
    pub authority: String,
    /// The origin-form target sent upstream (`/` when the URI has no path).
    pub origin_form: String,
    /// The URI as logged (`%ru`).
    pub url: String,
}

/// Why a request target cannot be forwarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Origin-form or asterisk-form: this is a proxy, not an origin.
    #[error("not an absolute http:// URI (spliced is a forward proxy)")]
    NotAbsolute,
    /// `https://` in absolute form: spliced never originates TLS.
    #[error("https:// in absolute form is not supported: send CONNECT host:443 (what HTTPS_PROXY clients do)")]
    Https,
    /// A scheme other than `http` and `https`.
    #[error("scheme {0} not supported")]
    Scheme(String),
    /// `user@host` in the authority.
    #[error("userinfo not allowed in the URI")]
    Userinfo,
    /// The host or port is not acceptable (see `connect_request::parse_target`).
    #[error("bad host in URI: {0}")]
    Host(#[from] crate::connect_request::TargetError),
}

/// Whether a request target read by `connect_request` is absolute-form with
/// a scheme (`http://` or `https://`, any case): the plain-HTTP path serves it.
pub fn is_absolute(target: &str) -> bool {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Parses a request target as text (what the fuzz target feeds).
pub fn parse_text(text: &str) -> Result<AbsoluteTarget, TargetError> {
    parse(&text.parse::<Uri>().map_err(|_| TargetError::NotAbsolute)?)
}

/// Parses the target of a proxied request.
pub fn parse(uri: &Uri) -> Result<AbsoluteTarget, TargetError> {
    let scheme = uri.scheme_str().ok_or(TargetError::NotAbsolute)?;
    if scheme.eq_ignore_ascii_case("https") {
        return Err(TargetError::Https);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(TargetError::Scheme(scheme.to_owned()));
    }
    let authority = uri.authority().ok_or(TargetError::NotAbsolute)?;
    if authority.as_str().contains('@') {
        return Err(TargetError::Userinfo);
    }
    // `host()` keeps the brackets of an IPv6 literal, as parse_target wants.
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(80);
    let target = parse_target(&format!("{host}:{port}"))?;
    let origin_form = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .map_or_else(
            || {
                let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                format!("/{query}")
            },
            str::to_owned,
        );
    Ok(AbsoluteTarget {
        target,
        authority: authority.as_str().to_owned(),
        url: format!("http://{}{origin_form}", authority.as_str()),
        origin_form,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(uri: &str) -> AbsoluteTarget {
        parse(&uri.parse().unwrap()).unwrap()
    }

    #[test]
    fn absolute_targets() {
        let t = ok("http://Example.test/a/b?c=d");
        assert_eq!(t.target.to_string(), "example.test:80");
        assert_eq!(t.authority, "Example.test");
        assert_eq!(t.origin_form, "/a/b?c=d");
        assert_eq!(t.url, "http://Example.test/a/b?c=d");
        let t = ok("http://127.0.0.1:8080");
        assert_eq!(t.target.to_string(), "127.0.0.1:8080");
        assert_eq!(t.origin_form, "/");
        assert_eq!(ok("http://[::1]:81/x").target.to_string(), "[::1]:81");
        assert_eq!(ok("HTTP://h.test/").target.port, 80);
    }

    #[test]
    fn refused_targets() {
        let err = |uri: &str| parse(&uri.parse().unwrap()).unwrap_err();
        assert_eq!(err("/path"), TargetError::NotAbsolute);
        assert_eq!(err("https://h.test/"), TargetError::Https);
        assert_eq!(err("ftp://h.test/"), TargetError::Scheme("ftp".into()));
        assert_eq!(err("http://u:p@h.test/"), TargetError::Userinfo);
        assert!(matches!(err("http://127.1/"), TargetError::Host(_)));
        assert!(is_absolute("HTTP://x/"));
        assert!(is_absolute("https://x/"));
        assert!(!is_absolute("x:443"));
        assert!(!is_absolute("/"));
    }
}
