//! Squid's peek-and-splice subset — the TLS name policy, without decryption:
//! `ssl_bump peek|splice|terminate`, `on_unsupported_protocol`, and
//! spliced's own `sni_must_match_connect`.
//!
//! Squid decides at steps: SslBump1 with the CONNECT request only, SslBump2
//! with the client's ClientHello peeked, SslBump3 with the server's hello.
//! spliced has the first two. At each step the `ssl_bump` lines are tried in
//! order and the first whose ACLs all match decides:
//! * step 1: `peek` reads the ClientHello (the tunnel's first bytes) and goes
//!   to step 2; `splice` hands the tunnel to the data plane now; `terminate`
//!   closes it before a byte reaches the upstream. No line matching: splice.
//! * step 2 (`ssl::server_name` now matches the SNI): `splice` or `terminate`;
//!   `peek` would go on to the server's hello, which spliced never reads, so
//!   it splices. No line matching: splice (Squid splices a peeked connection
//!   that no later rule bumps).
//!
//! `bump` and `stare` (and Squid 3's `client-first`, `server-first`, `none`)
//! are configuration errors: spliced never decrypts.
//!
//! Tunnel bytes that are not a TLS ClientHello under a peek go by
//! `on_unsupported_protocol tunnel|respond ACL…`: `tunnel` splices them,
//! `respond` (the default) closes the tunnel — spliced writes no error page
//! inside a tunnel.
//!
//! `sni_must_match_connect exact|same_dstdomain|off` (spliced's, default off)
//! refuses a ClientHello whose SNI is not the CONNECT host (`exact`), or is not
//! covered by one `dstdomain` entry that also covers the CONNECT host
//! (`same_dstdomain`): a `CONNECT allowed-name` tunnel carrying another name's
//! TLS. A ClientHello without SNI passes (it names no other host). With the
//! check on, every tunnel is peeked, whatever `ssl_bump` says.

use std::fmt;

use super::{
    access::{AclRef, Prepared},
    acl::AclKind,
    reader::Loc,
    RequestFacts, SquidConfig,
};

/// An `ssl_bump` action spliced can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BumpAction {
    /// Read the ClientHello, then decide again (step 2).
    Peek,
    /// Hand the tunnel to the data plane.
    Splice,
    /// Close the tunnel; nothing reaches the upstream.
    Terminate,
}

impl BumpAction {
    /// Parses an `ssl_bump` action; the error says why spliced refuses it.
    pub(super) fn parse(word: &str) -> Result<Self, String> {
        match word {
            "peek" => Ok(Self::Peek),
            "splice" => Ok(Self::Splice),
            "terminate" => Ok(Self::Terminate),
            "bump" | "stare" | "client-first" | "server-first" | "none" => Err(format!(
                "ssl_bump {word} needs decryption, which spliced never does: use peek, splice or terminate"
            )),
            _ => Err("expected peek, splice or terminate".into()),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Peek => "peek",
            Self::Splice => "splice",
            Self::Terminate => "terminate",
        }
    }
}

/// `sni_must_match_connect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SniCheck {
    /// No check (the default).
    #[default]
    Off,
    /// The SNI must be the CONNECT host.
    Exact,
    /// The SNI and the CONNECT host must be covered by one `dstdomain` entry.
    SameDstdomain,
}

impl SniCheck {
    pub(super) fn parse(word: &str) -> Result<Self, String> {
        match word {
            "off" => Ok(Self::Off),
            "exact" => Ok(Self::Exact),
            "same_dstdomain" => Ok(Self::SameDstdomain),
            _ => Err("expected exact, same_dstdomain or off".into()),
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Exact => "exact",
            Self::SameDstdomain => "same_dstdomain",
        }
    }
}

/// One `ssl_bump` or `on_unsupported_protocol` line.
#[derive(Clone, Debug)]
pub(super) struct TlsRule<A> {
    pub action: A,
    pub acls: Vec<AclRef>,
    pub loc: Loc,
}

impl<A> TlsRule<A>
where
    Self: fmt::Display,
{
    /// `FILE:LINE: the rule`.
    fn located(&self) -> String {
        format!("{}:{}: {self}", self.loc.file, self.loc.line)
    }
}

impl fmt::Display for TlsRule<BumpAction> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ssl_bump {}", self.action.as_str())?;
        for acl in &self.acls {
            write!(f, " {}{}", if acl.negated { "!" } else { "" }, acl.name)?;
        }
        Ok(())
    }
}

impl fmt::Display for TlsRule<bool> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = if self.action { "tunnel" } else { "respond" };
        write!(f, "on_unsupported_protocol {action}")?;
        for acl in &self.acls {
            write!(f, " {}{}", if acl.negated { "!" } else { "" }, acl.name)?;
        }
        Ok(())
    }
}

/// The TLS name policy of a configuration.
#[derive(Clone, Debug, Default)]
pub(super) struct TlsPolicy {
    /// `ssl_bump` lines, in order.
    pub bump: Vec<TlsRule<BumpAction>>,
    /// `on_unsupported_protocol` lines (`tunnel` is true), in order.
    pub unsupported: Vec<TlsRule<bool>>,
    /// `sni_must_match_connect`.
    pub sni_check: SniCheck,
}

/// What to do with a tunnel before its first byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step1 {
    /// Hand it to the data plane (no peek).
    Splice,
    /// Read its ClientHello, then ask [`SquidConfig::tls_step2`].
    Peek,
    /// Close it; the rule that said so.
    Terminate(String),
}

/// What to do with a tunnel whose ClientHello (or other first bytes) was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step2 {
    /// Hand it to the data plane, the bytes read included.
    Splice,
    /// Close it: why, as a metric label, and for the log.
    Terminate {
        /// `terminate`, `sni_mismatch` or `not_tls`.
        reason: &'static str,
        /// The rule or check that refused it.
        detail: String,
    },
}

impl SquidConfig {
    /// The first `ssl_bump` line whose ACLs match `facts`, with its text.
    fn bump_rule(&self, facts: &RequestFacts<'_>) -> Option<&TlsRule<BumpAction>> {
        let request = Prepared::new(facts);
        self.tls
            .bump
            .iter()
            .find(|rule| self.acls_match(&rule.acls, &request) == Some(true))
    }

    /// Whether the configuration looks at tunnels' first bytes at all.
    pub fn peeks(&self) -> bool {
        !self.tls.bump.is_empty() || self.tls.sni_check != SniCheck::Off
    }

    /// Step 1 for a tunnel (`facts.step` 1, no SNI).
    pub fn tls_step1(&self, facts: &RequestFacts<'_>) -> Step1 {
        let action = self.bump_rule(facts).map(|rule| (rule.action, rule));
        match action {
            Some((BumpAction::Terminate, rule)) => Step1::Terminate(rule.located()),
            Some((BumpAction::Peek, _)) => Step1::Peek,
            _ if self.tls.sni_check != SniCheck::Off => Step1::Peek,
            _ => Step1::Splice,
        }
    }

    /// Step 2 for a tunnel whose ClientHello was read: `facts.step` 2 and
    /// `facts.sni` its SNI. `peeked` says whether step 1 peeked (else only
    /// the SNI check runs).
    pub fn tls_step2(&self, facts: &RequestFacts<'_>, peeked: bool) -> Step2 {
        if peeked {
            if let Some(rule) = self
                .bump_rule(facts)
                .filter(|rule| rule.action == BumpAction::Terminate)
            {
                return Step2::Terminate {
                    reason: "terminate",
                    detail: rule.located(),
                };
            }
        }
        let Some(sni) = facts.sni else {
            return Step2::Splice;
        };
        let sni = normalize(sni);
        let host = normalize(facts.host.trim_start_matches('[').trim_end_matches(']'));
        let matches = match self.tls.sni_check {
            SniCheck::Off => true,
            SniCheck::Exact => sni == host,
            SniCheck::SameDstdomain => {
                sni == host
                    || self.acls.iter().any(|acl| match &acl.kind {
                        AclKind::DstDomain(set) => set.covers_both(&host, &sni),
                        _ => false,
                    })
            }
        };
        if matches {
            Step2::Splice
        } else {
            Step2::Terminate {
                reason: "sni_mismatch",
                detail: format!(
                    "sni_must_match_connect {}: the ClientHello names {sni}, the CONNECT {host}",
                    self.tls.sni_check.as_str()
                ),
            }
        }
    }

    /// Whether first bytes that are not a TLS ClientHello are spliced
    /// (`on_unsupported_protocol tunnel`); else the tunnel is closed.
    pub fn tunnels_unsupported(&self, facts: &RequestFacts<'_>) -> bool {
        let request = Prepared::new(facts);
        self.tls
            .unsupported
            .iter()
            .find(|rule| self.acls_match(&rule.acls, &request) == Some(true))
            .is_some_and(|rule| rule.action)
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::squid::{parse_str, LocalTime, Weekday};

    const PEEK_AND_SPLICE: &str = "\
acl step1 at_step SslBump1
acl allowed ssl::server_name .example.com
acl allowed_re ssl::server_name_regex -i ^api[0-9]+\\.example\\.net$
ssl_bump peek step1
ssl_bump splice allowed
ssl_bump splice allowed_re
ssl_bump terminate all
";

    fn config(text: &str) -> SquidConfig {
        parse_str(text, "squid.conf").expect("config").config
    }

    fn facts<'a>(host: &'a str, step: u8, sni: Option<&'a str>) -> RequestFacts<'a> {
        RequestFacts {
            client: IpAddr::from([127, 0, 0, 1]),
            local_ip: None,
            local_port: 3128,
            method: "CONNECT",
            host,
            port: 443,
            dst: None,
            user: None,
            now: LocalTime::new(Weekday::Monday, 12, 0).unwrap(),
            step,
            sni,
        }
    }

    fn step2(config: &SquidConfig, host: &str, sni: Option<&str>) -> Step2 {
        config.tls_step2(&facts(host, 2, sni), true)
    }

    #[test]
    fn squids_peek_and_splice_example_peeks_then_splices_allowed_names() {
        let config = config(PEEK_AND_SPLICE);
        assert!(config.peeks());
        assert_eq!(config.tls_step1(&facts("x.org", 1, None)), Step1::Peek);
        assert_eq!(
            step2(&config, "1.2.3.4", Some("www.example.com")),
            Step2::Splice
        );
        assert_eq!(step2(&config, "x", Some("API7.example.net")), Step2::Splice);
        match step2(&config, "www.example.com", Some("other.org")) {
            Step2::Terminate { reason, detail } => {
                assert_eq!(reason, "terminate");
                assert_eq!(detail, "squid.conf:7: ssl_bump terminate all");
            }
            other => panic!("{other:?}"),
        }
        // Without SNI, ssl::server_name matches the CONNECT host.
        assert_eq!(step2(&config, "example.com", None), Step2::Splice);
    }

    #[test]
    fn no_rules_no_peek_and_unmatched_steps_splice() {
        assert!(!config("http_access allow all").peeks());
        let config = config("acl step1 at_step SslBump1\nssl_bump peek step1");
        assert_eq!(config.tls_step1(&facts("a", 1, None)), Step1::Peek);
        // At step 2 nothing matches: splice.
        assert_eq!(step2(&config, "a", Some("b")), Step2::Splice);
        let terminate = config_text_step1("acl bad dstdomain .bad.example\nssl_bump terminate bad");
        assert_eq!(
            terminate,
            Step1::Terminate("squid.conf:2: ssl_bump terminate bad".into())
        );
    }

    fn config_text_step1(text: &str) -> Step1 {
        config(text).tls_step1(&facts("www.bad.example", 1, None))
    }

    #[test]
    fn a_peek_at_step_two_splices() {
        let config = config("ssl_bump peek all");
        assert_eq!(config.tls_step1(&facts("a", 1, None)), Step1::Peek);
        assert_eq!(step2(&config, "a", Some("a")), Step2::Splice);
    }

    #[test]
    fn the_sni_check_refuses_another_names_tls() {
        let exact = config("sni_must_match_connect exact");
        assert_eq!(
            exact.tls_step1(&facts("a.example.com", 1, None)),
            Step1::Peek
        );
        assert_eq!(
            step2(&exact, "A.example.com.", Some("a.example.com")),
            Step2::Splice
        );
        assert_eq!(step2(&exact, "a.example.com", None), Step2::Splice);
        assert!(matches!(
            step2(&exact, "a.example.com", Some("b.example.com")),
            Step2::Terminate {
                reason: "sni_mismatch",
                ..
            }
        ));
        let same = config(
            "acl ok dstdomain .example.com other.org\nhttp_access allow ok\nsni_must_match_connect same_dstdomain",
        );
        assert_eq!(
            step2(&same, "a.example.com", Some("b.example.com")),
            Step2::Splice
        );
        assert_eq!(
            step2(&same, "example.com", Some("x.a.example.com")),
            Step2::Splice
        );
        for (host, sni) in [
            ("a.example.com", "other.org"),
            ("other.org", "www.other.org"),
            ("a.example.com", "example.com.evil"),
        ] {
            assert!(
                matches!(
                    step2(&same, host, Some(sni)),
                    Step2::Terminate {
                        reason: "sni_mismatch",
                        ..
                    }
                ),
                "{host} {sni}"
            );
        }
        // An explicit splice at step 1 is still checked.
        let spliced = config("ssl_bump splice all\nsni_must_match_connect exact");
        assert_eq!(spliced.tls_step1(&facts("a", 1, None)), Step1::Peek);
        assert!(matches!(
            step2(&spliced, "a", Some("b")),
            Step2::Terminate {
                reason: "sni_mismatch",
                ..
            }
        ));
    }

    #[test]
    fn on_unsupported_protocol_tunnels_or_responds() {
        let config = config(
            "acl inside src 10.0.0.0/8\nssl_bump peek all\non_unsupported_protocol tunnel inside\non_unsupported_protocol respond all",
        );
        let mut inside = facts("a", 2, None);
        inside.client = IpAddr::from([10, 1, 2, 3]);
        assert!(config.tunnels_unsupported(&inside));
        assert!(!config.tunnels_unsupported(&facts("a", 2, None)));
    }

    #[test]
    fn the_rules_print_back() {
        let config = config(PEEK_AND_SPLICE);
        let text = config.render_effective();
        for line in [
            "acl step1 at_step SslBump1",
            "acl allowed ssl::server_name .example.com",
            "ssl_bump peek step1",
            "ssl_bump terminate all",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
