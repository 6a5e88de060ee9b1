//! What a forward proxy does to the header fields it passes on: hop-by-hop
//! fields removed (RFC 9110 §7.6.1), `Via` added (Squid's `via`), and
//! `X-Forwarded-For` written the way Squid's `forwarded_for` says. Pure
//! functions over a [`HeaderMap`], unit-tested here.

use std::{net::IpAddr, str::FromStr};

use hyper::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Version,
};

/// The name this proxy gives itself in `Via`.
pub const VIA_NAME: &str = "spliced";

/// Squid's `forwarded_for`: what happens to `X-Forwarded-For` on the way to
/// the origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedFor {
    /// Append the client's address (Squid's default).
    #[default]
    On,
    /// Append `unknown`.
    Off,
    /// Remove the field.
    Delete,
    /// Leave the field as the client sent it.
    Transparent,
}

/// A `forwarded_for` value that is none of `on`, `off`, `delete`, `transparent`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected on, off, delete or transparent, not {0:?}")]
pub struct BadForwardedFor(
    /// The value given.
    pub String,
);

impl ForwardedFor {
    /// The squid.conf spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Delete => "delete",
            Self::Transparent => "transparent",
        }
    }
}

impl FromStr for ForwardedFor {
    type Err = BadForwardedFor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            "delete" => Ok(Self::Delete),
            "transparent" => Ok(Self::Transparent),
            other => Err(BadForwardedFor(other.to_owned())),
        }
    }
}

/// Squid's header directives that apply to forwarded requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderPolicy {
    /// `via on|off`: whether `Via` is added (default on).
    pub via: bool,
    /// `forwarded_for`.
    pub forwarded_for: ForwardedFor,
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        Self {
            via: true,
            forwarded_for: ForwardedFor::On,
        }
    }
}

/// Fields that only concern one hop, whatever `Connection` says.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Whether `headers` ask for a WebSocket upgrade (`Upgrade: websocket` and
/// `Connection: upgrade`).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("websocket"));
    upgrade && connection_tokens(headers).any(|token| token == "upgrade")
}

/// The lower-cased tokens of every `Connection` field.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
}

/// Removes the hop-by-hop fields: the fixed list, `Upgrade`, and every field
/// `Connection` names. With `keep_upgrade` (a WebSocket handshake) `Upgrade`
/// stays and `Connection: upgrade` is put back.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in named {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The `Via` entry for a message received as `version`.
fn via_entry(version: Version) -> HeaderValue {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    HeaderValue::from_str(&format!("{protocol} {VIA_NAME}"))
        .expect("a version and a token are a valid header value")
}

/// Rewrites a request's fields for the origin: hop-by-hop fields removed,
/// `Host` set to `authority` (the absolute URI's, RFC 9112 §3.2.2), `Via` and
/// `X-Forwarded-For` as `policy` says. `version` is the client's.
pub fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    authority: &str,
    client: IpAddr,
    policy: HeaderPolicy,
) {
    let websocket = is_websocket_upgrade(headers);
    remove_hop_by_hop(headers, websocket);
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    if policy.via {
        headers.append(header::VIA, via_entry(version));
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    let appended = match policy.forwarded_for {
        ForwardedFor::Transparent => return,
        ForwardedFor::Delete => {
            headers.remove(&xff);
            return;
        }
        ForwardedFor::On => canonical(client).to_string(),
        ForwardedFor::Off => "unknown".to_owned(),
    };
    let mut values: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    values.push(appended);
    if let Ok(value) = HeaderValue::from_str(&values.join(", ")) {
        headers.insert(xff, value);
    }
}

/// Rewrites a response's fields for the client: hop-by-hop fields removed
/// (`Upgrade` kept on a `101`), `Via` added when `via` is on. `version` is the
/// origin's.
pub fn prepare_response(headers: &mut HeaderMap, version: Version, via: bool, switching: bool) {
    remove_hop_by_hop(headers, switching);
    if via {
        headers.append(header::VIA, via_entry(version));
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn hop_by_hop_fields_go() {
        let mut headers = map(&[
            ("Connection", "keep-alive, X-Secret"),
            ("Connection", "Foo"),
            ("X-Secret", "1"),
            ("Foo", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Upgrade", "h2c"),
            ("Transfer-Encoding", "chunked"),
            ("Accept", "*/*"),
        ]);
        prepare_request(
            &mut headers,
            Version::HTTP_11,
            "example.test:8080",
            "127.0.0.1".parse().unwrap(),
            HeaderPolicy::default(),
        );
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "host", "via", "x-forwarded-for"]);
        assert_eq!(all(&headers, "host"), ["example.test:8080"]);
        assert_eq!(all(&headers, "via"), ["1.1 spliced"]);
        assert_eq!(all(&headers, "x-forwarded-for"), ["127.0.0.1"]);
    }

    #[test]
    fn websocket_upgrade_stays() {
        let mut headers = map(&[
            ("Connection", "Upgrade, keep-alive"),
            ("Upgrade", "websocket"),
        ]);
        assert!(is_websocket_upgrade(&headers));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(all(&headers, "upgrade"), ["websocket"]);
        assert_eq!(all(&headers, "connection"), ["upgrade"]);
        assert!(!is_websocket_upgrade(&map(&[("Upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_for_modes() {
        let client: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let run = |mode: ForwardedFor, via: bool| {
            let mut headers = map(&[("X-Forwarded-For", "192.0.2.1"), ("Via", "1.0 other")]);
            prepare_request(
                &mut headers,
                Version::HTTP_10,
                "h",
                client,
                HeaderPolicy {
                    via,
                    forwarded_for: mode,
                },
            );
            (all(&headers, "x-forwarded-for"), all(&headers, "via"))
        };
        assert_eq!(
            run(ForwardedFor::On, true),
            (
                vec!["192.0.2.1, 10.1.2.3".to_owned()],
                vec!["1.0 other".to_owned(), "1.0 spliced".to_owned()]
            )
        );
        assert_eq!(run(ForwardedFor::Off, false).0, ["192.0.2.1, unknown"]);
        assert_eq!(run(ForwardedFor::Off, false).1, ["1.0 other"]);
        assert!(run(ForwardedFor::Delete, true).0.is_empty());
        assert_eq!(run(ForwardedFor::Transparent, true).0, ["192.0.2.1"]);
        assert_eq!("delete".parse(), Ok(ForwardedFor::Delete));
        assert!("yes".parse::<ForwardedFor>().is_err());
    }
}
