//! `proxy_protocol_access allow|deny ACL…`: which TCP peers (load balancers)
//! may send a PROXY protocol header on an `http_port … require-proxy-header`.
//!
//! As in Squid, the ACLs see the TCP connection only (the peer's address,
//! the proxy address and port it reached, the time): the lines are
//! evaluated like `http_access` (first match decides, the implicit answer is
//! the opposite of the last line), and with no line every peer is refused.

use std::{fmt, net::SocketAddr};

use super::{
    access::{AclRef, Prepared, RequestFacts},
    acl::AclKind,
    reader::Loc,
    LocalTime, SquidConfig,
};

/// One `proxy_protocol_access` line.
#[derive(Clone, Debug)]
pub(super) struct ProxyProtocolRule {
    /// `allow` (true) or `deny`.
    pub allow: bool,
    /// The ACLs, ANDed.
    pub acls: Vec<AclRef>,
    /// Where the line is.
    pub loc: Loc,
}

impl fmt::Display for ProxyProtocolRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allow {
            "proxy_protocol_access allow"
        } else {
            "proxy_protocol_access deny"
        })?;
        for acl in &self.acls {
            write!(f, " {}{}", if acl.negated { "!" } else { "" }, acl.name)?;
        }
        Ok(())
    }
}

/// Whether an ACL type can be judged from the TCP connection alone (what
/// Squid's `proxy_protocol_access` sees before any request).
pub(super) fn usable(kind: &AclKind) -> bool {
    matches!(
        kind,
        AclKind::Src(_) | AclKind::LocalIp(_) | AclKind::LocalPort(_) | AclKind::Time(_)
    )
}

impl SquidConfig {
    /// Whether the TCP peer `peer`, connected to `local`, may send a PROXY
    /// protocol header. `Err` names the line (or the implicit rule) that
    /// refused it.
    pub fn proxy_protocol_allowed(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<(), String> {
        let facts = RequestFacts {
            client: peer.ip(),
            local_ip: local.map(|l| l.ip()),
            local_port: local.map_or(0, |l| l.port()),
            method: "",
            host: "",
            port: 0,
            dst: None,
            user: None,
            now: LocalTime::now(),
            step: 0,
            sni: None,
        };
        let request = Prepared::new(&facts);
        for rule in &self.proxy_protocol {
            // Only connection-level ACLs are allowed on these lines, so no
            // `proxy_auth` can ask for credentials: `None` cannot happen.
            if self.acls_match(&rule.acls, &request) == Some(true) {
                return if rule.allow {
                    Ok(())
                } else {
                    Err(format!("{}:{}: {rule}", rule.loc.file, rule.loc.line))
                };
            }
        }
        match self.proxy_protocol.last() {
            None => Err(
                "implicit rule: no proxy_protocol_access lines, so every peer is refused".into(),
            ),
            Some(last) if last.allow => Err(format!(
                "implicit rule: no line matched; the opposite of the last line ({}:{}: {last})",
                last.loc.file, last.loc.line
            )),
            Some(_) => Ok(()),
        }
    }

    /// The `proxy_protocol_access` lines, as written back by `render`.
    pub(super) fn proxy_protocol_rules(&self) -> impl Iterator<Item = String> + '_ {
        self.proxy_protocol.iter().map(ToString::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse_str;

    fn addr(text: &str) -> std::net::SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn require_proxy_header_and_rules() {
        let text = "http_port 127.0.0.1:3128 require-proxy-header name=lb\n\
                    http_port 3129\n\
                    acl lb src 10.0.0.0/8\nacl bad src 10.9.0.0/16\n\
                    proxy_protocol_access deny bad\nproxy_protocol_access allow lb\n";
        let config = parse_str(text, "squid.conf").unwrap().config;
        assert!(config.http_ports[0].require_proxy_header);
        assert!(!config.http_ports[1].require_proxy_header);
        let local = Some(addr("127.0.0.1:3128"));
        assert_eq!(
            config.proxy_protocol_allowed(addr("10.1.2.3:5"), local),
            Ok(())
        );
        let denied = config
            .proxy_protocol_allowed(addr("10.9.2.3:5"), local)
            .unwrap_err();
        assert_eq!(denied, "squid.conf:5: proxy_protocol_access deny bad");
        let implicit = config
            .proxy_protocol_allowed(addr("192.0.2.1:5"), local)
            .unwrap_err();
        assert!(implicit.starts_with("implicit rule"), "{implicit}");
        // The rules survive `check`'s rendering.
        let rendered = config.render_effective();
        assert!(rendered.contains("require-proxy-header"), "{rendered}");
        let again = parse_str(&rendered, "squid.conf").unwrap().config;
        assert_eq!(again.render_effective(), rendered);
    }

    #[test]
    fn no_lines_refuse_every_peer() {
        let config = parse_str("http_port 3128 require-proxy-header\n", "squid.conf")
            .unwrap()
            .config;
        assert!(config
            .proxy_protocol_allowed(addr("127.0.0.1:1"), None)
            .is_err());
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, line, offending) in [
            (
                "acl s dstdomain .a\nproxy_protocol_access allow s\n",
                2,
                "s",
            ),
            ("proxy_protocol_access allow nosuch\n", 1, "nosuch"),
            ("proxy_protocol_access maybe all\n", 1, "maybe"),
            (
                "proxy_protocol_access allow\n",
                1,
                "proxy_protocol_access allow",
            ),
        ] {
            let err = parse_str(text, "squid.conf").unwrap_err();
            let diagnostic = err.diagnostic().unwrap();
            assert_eq!(diagnostic.line, line, "{err}");
            assert!(err.to_string().contains(offending), "{err}");
        }
    }
}
