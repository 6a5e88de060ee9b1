//! `http_access` rules and their evaluation for one request.

use std::{
    fmt,
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    acl::{canonical_ip, Acl, AclKind, CONNECT_PROTOCOLS},
    reader::Loc,
    SquidConfig,
};

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Weekday {
    /// `S` in a `time` ACL.
    Sunday,
    /// `M`.
    Monday,
    /// `T`.
    Tuesday,
    /// `W`.
    Wednesday,
    /// `H`.
    Thursday,
    /// `F`.
    Friday,
    /// `A`.
    Saturday,
}

impl Weekday {
    const ALL: [Self; 7] = [
        Self::Sunday,
        Self::Monday,
        Self::Tuesday,
        Self::Wednesday,
        Self::Thursday,
        Self::Friday,
        Self::Saturday,
    ];

    /// Days since Sunday (0 to 6).
    pub fn days_from_sunday(self) -> u8 {
        self as u8
    }

    fn from_days_from_sunday(days: u8) -> Self {
        Self::ALL[usize::from(days % 7)]
    }
}

/// The local wall-clock time a `time` ACL is evaluated at: a weekday and a
/// minute of the day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    weekday: Weekday,
    minute_of_day: u16,
}

impl LocalTime {
    /// A given weekday and time; `None` if `hour` > 23 or `minute` > 59.
    pub fn new(weekday: Weekday, hour: u8, minute: u8) -> Option<Self> {
        (hour < 24 && minute < 60).then(|| Self {
            weekday,
            minute_of_day: u16::from(hour) * 60 + u16::from(minute),
        })
    }

    /// The current time in the system's time zone (`TZ`, else `/etc/localtime`,
    /// read through the zoneinfo database; UTC when neither is available).
    pub fn now() -> Self {
        let now = jiff::ZonedDateTime::now();
        let weekday = now.weekday().to_sunday_zero_offset();
        Self {
            weekday: Weekday::from_days_from_sunday(u8::try_from(weekday).unwrap_or(0)),
            minute_of_day: u16::try_from(i32::from(now.hour()) * 60 + i32::from(now.minute()))
                .unwrap_or(0),
        }
    }

    /// `time` at a fixed offset from UTC, in seconds (east positive).
    pub fn at(time: SystemTime, utc_offset_seconds: i32) -> Self {
        let seconds = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        }
        .saturating_add(i64::from(utc_offset_seconds));
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400);
        // 1970-01-01 was a Thursday.
        let weekday = (days + 4).rem_euclid(7);
        Self {
            weekday: Weekday::from_days_from_sunday(u8::try_from(weekday).unwrap_or(0)),
            minute_of_day: u16::try_from(second_of_day / 60).unwrap_or(0),
        }
    }

    /// The weekday.
    pub fn weekday(&self) -> Weekday {
        self.weekday
    }

    /// Minutes since midnight.
    pub fn minute_of_day(&self) -> u16 {
        self.minute_of_day
    }
}

/// What the access rules look at for one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The client's address (`src`).
    pub client: IpAddr,
    /// The proxy address the client connected to (`localip`), if known.
    pub local_ip: Option<IpAddr>,
    /// The proxy port the client connected to (`localport`).
    pub local_port: u16,
    /// The request method (`method`), `CONNECT` for a tunnel.
    pub method: &'a str,
    /// The CONNECT host (`dstdomain`, `dstdom_regex`, `url_regex`): a name, or an
    /// IP literal (IPv6 with or without brackets). Case and a trailing dot do not
    /// matter.
    pub host: &'a str,
    /// The CONNECT port (`port`).
    pub port: u16,
    /// The address about to be connected to (`dst`, `to_localhost`,
    /// `to_linklocal`). `None` makes every `dst` ACL mismatch, as Squid does when
    /// a name does not resolve: give the resolved address whenever
    /// [`SquidConfig::needs_destination`] is true.
    pub dst: Option<IpAddr>,
    /// The authenticated user, from [`SquidConfig::verify_basic`]; `None` when
    /// the request had no credentials or wrong ones.
    pub user: Option<&'a str>,
    /// The local time (`time`).
    pub now: LocalTime,
    /// The SslBump step being decided (`at_step`): 1 before the tunnel's
    /// first byte, 2 with its ClientHello read; 0 for `http_access`.
    pub step: u8,
    /// The ClientHello's SNI, once read (`ssl::server_name` matches it, and
    /// the CONNECT host before).
    pub sni: Option<&'a str>,
}

/// The answer of the `http_access` rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Allow,
    /// Refuse it (403).
    Deny {
        /// The file of the `http_access` line that matched; empty for the
        /// implicit rule.
        file: String,
        /// Its line number; 0 for the implicit rule (no line matched, or there
        /// are no `http_access` lines).
        line: usize,
        /// The rule, normalized (`http_access deny CONNECT !SSL_ports`), or a
        /// description of the implicit rule.
        rule_text: String,
    },
    /// Ask for credentials (407 with `Proxy-Authenticate: Basic realm="…"`): a
    /// `proxy_auth` ACL was reached without valid credentials, or a matching
    /// `deny` line ends in a `proxy_auth` ACL.
    AuthRequired,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allow => f.write_str("allowed"),
            Self::Deny {
                file,
                line: 0,
                rule_text,
            } if file.is_empty() => write!(f, "denied by {rule_text}"),
            Self::Deny {
                file,
                line,
                rule_text,
            } => write!(f, "denied by {file}:{line}: {rule_text}"),
            Self::AuthRequired => f.write_str("proxy authentication required"),
        }
    }
}

/// One `http_access` line.
#[derive(Clone, Debug)]
pub(super) struct AccessRule {
    /// `allow` (true) or `deny`.
    pub allow: bool,
    /// The ACLs, ANDed.
    pub acls: Vec<AclRef>,
    /// Where the line is.
    pub loc: Loc,
}

/// An ACL named on an `http_access` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AclRef {
    /// `!NAME`.
    pub negated: bool,
    /// Index into the ACL table.
    pub index: usize,
    /// The name as written on the line.
    pub name: String,
}

impl fmt::Display for AccessRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allow {
            "http_access allow"
        } else {
            "http_access deny"
        })?;
        for acl in &self.acls {
            write!(f, " {}{}", if acl.negated { "!" } else { "" }, acl.name)?;
        }
        Ok(())
    }
}

/// The result of one ACL.
enum Verdict {
    Match,
    Mismatch,
    /// A `proxy_auth` ACL without an authenticated user.
    NeedAuth,
}

/// Request facts prepared once for all rules.
pub(super) struct Prepared<'a> {
    facts: &'a RequestFacts<'a>,
    client: IpAddr,
    dst: Option<IpAddr>,
    /// Every address the target resolved to, for peer selection: a `dst`
    /// ACL matches if one of them is in it (Squid's `ACLDestinationIP`).
    destinations: Vec<IpAddr>,
    local_ip: Option<IpAddr>,
    /// Lower case, no brackets, no trailing dot.
    host: String,
    host_is_ip: bool,
    /// `host:port`, IPv6 hosts in brackets.
    url: String,
    /// What `ssl::server_name` matches: the SNI, else the host (lower case,
    /// no trailing dot).
    server_name: String,
}

impl<'a> Prepared<'a> {
    pub(super) fn new(facts: &'a RequestFacts<'a>) -> Self {
        let bare = facts.host.trim_start_matches('[').trim_end_matches(']');
        let host = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
        let literal = host.parse::<IpAddr>().ok();
        let url = match literal {
            Some(IpAddr::V6(_)) => format!("[{host}]:{}", facts.port),
            _ => format!("{host}:{}", facts.port),
        };
        let server_name = match facts.sni {
            Some(sni) => sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase(),
            None => host.clone(),
        };
        Self {
            facts,
            server_name,
            client: canonical_ip(facts.client),
            dst: facts.dst.map(canonical_ip),
            destinations: Vec::new(),
            local_ip: facts.local_ip.map(canonical_ip),
            host_is_ip: literal.is_some(),
            host,
            url,
        }
    }
}

impl Prepared<'_> {
    /// With every address the target resolved to (see `destinations`).
    pub(super) fn with_destinations(mut self, destinations: &[IpAddr]) -> Self {
        self.destinations = destinations.iter().copied().map(canonical_ip).collect();
        self
    }
}

fn verdict(matched: bool) -> Verdict {
    if matched {
        Verdict::Match
    } else {
        Verdict::Mismatch
    }
}

fn evaluate(acl: &Acl, request: &Prepared<'_>) -> Verdict {
    let facts = request.facts;
    let in_ranges = |ranges: &[super::acl::IpRange], ip: Option<IpAddr>| {
        ip.is_some_and(|ip| ranges.iter().any(|range| range.contains(ip)))
    };
    let in_ports = |ports: &[(u16, u16)], port: u16| {
        ports
            .iter()
            .any(|&(low, high)| (low..=high).contains(&port))
    };
    match &acl.kind {
        AclKind::Src(ranges) => verdict(in_ranges(ranges, Some(request.client))),
        AclKind::Dst { ranges, no_lookup } => {
            let mut addresses = request.dst.iter().chain(&request.destinations);
            verdict(
                (!*no_lookup || request.host_is_ip)
                    && addresses.any(|&ip| in_ranges(ranges, Some(ip))),
            )
        }
        AclKind::LocalIp(ranges) => verdict(in_ranges(ranges, request.local_ip)),
        AclKind::DstDomain(set) => verdict(set.matches(&request.host)),
        AclKind::DstDomRegex(patterns) => verdict(
            patterns
                .iter()
                .any(|pattern| pattern.regex.is_match(&request.host)),
        ),
        AclKind::UrlRegex(patterns) => verdict(
            patterns
                .iter()
                .any(|pattern| pattern.regex.is_match(&request.url)),
        ),
        AclKind::Port(ports) => verdict(in_ports(ports, facts.port)),
        AclKind::LocalPort(ports) => verdict(in_ports(ports, facts.local_port)),
        AclKind::Method(methods) => verdict(
            methods
                .iter()
                .any(|method| method.eq_ignore_ascii_case(facts.method)),
        ),
        AclKind::Proto(protos) => verdict(
            protos
                .iter()
                .any(|proto| CONNECT_PROTOCOLS.contains(&proto.as_str())),
        ),
        AclKind::Time(specs) => {
            let day_bit = 1u8 << facts.now.weekday().days_from_sunday();
            let minute = facts.now.minute_of_day();
            verdict(
                specs.iter().any(|spec| {
                    spec.days & day_bit != 0 && (spec.start..=spec.end).contains(&minute)
                }),
            )
        }
        AclKind::ProxyAuth(list) => match facts.user {
            None => Verdict::NeedAuth,
            Some(user) => verdict(
                list.required
                    || list.users.iter().any(|name| {
                        if list.ignore_case {
                            name.eq_ignore_ascii_case(user)
                        } else {
                            name == user
                        }
                    }),
            ),
        },
        AclKind::ProxyAuthRegex(patterns) => match facts.user {
            None => Verdict::NeedAuth,
            Some(user) => verdict(patterns.iter().any(|pattern| pattern.regex.is_match(user))),
        },
        AclKind::AtStep(steps) => verdict(steps.contains(&facts.step)),
        AclKind::ServerName(set) => verdict(set.matches(&request.server_name)),
        AclKind::ServerNameRegex(patterns) => verdict(
            patterns
                .iter()
                .any(|pattern| pattern.regex.is_match(&request.server_name)),
        ),
        // Cache manager requests are never CONNECT requests; unsupported types
        // cannot be on an http_access line (the parser refuses them).
        AclKind::Manager | AclKind::Unsupported { .. } => Verdict::Mismatch,
    }
}

impl SquidConfig {
    /// Applies the `http_access` rules to one request, as Squid does: the ACLs of
    /// a line are ANDed left to right, the first matching line decides, and when
    /// none matches the answer is the opposite of the last line's (deny with no
    /// lines at all).
    pub fn decide(&self, facts: &RequestFacts<'_>) -> Decision {
        let request = Prepared::new(facts);
        for rule in &self.rules {
            match self.acls_match(&rule.acls, &request) {
                None => return Decision::AuthRequired,
                Some(false) => continue,
                Some(true) => {}
            }
            if rule.allow {
                return Decision::Allow;
            }
            // Squid re-challenges when the deciding deny line ends in an
            // authentication ACL, so the user can try other credentials.
            if rule
                .acls
                .last()
                .is_some_and(|last| self.acls[last.index].kind.is_auth())
            {
                return Decision::AuthRequired;
            }
            return Decision::Deny {
                file: rule.loc.file.to_string(),
                line: rule.loc.line,
                rule_text: rule.to_string(),
            };
        }
        match self.rules.last() {
            None => Decision::Deny {
                file: String::new(),
                line: 0,
                rule_text: "implicit rule: no http_access lines, so everything is denied".into(),
            },
            Some(last) if last.allow => Decision::Deny {
                file: String::new(),
                line: 0,
                rule_text: format!(
                    "implicit rule: no line matched; the opposite of the last line ({}:{}: {last})",
                    last.loc.file, last.loc.line
                ),
            },
            Some(_) => Decision::Allow,
        }
    }

    /// Whether every ACL of a line matches, left to right; `None` when a
    /// `proxy_auth` ACL is reached without an authenticated user.
    pub(super) fn acls_match(&self, acls: &[AclRef], request: &Prepared<'_>) -> Option<bool> {
        for acl_ref in acls {
            let hit = match evaluate(&self.acls[acl_ref.index], request) {
                Verdict::NeedAuth => return None,
                Verdict::Match => !acl_ref.negated,
                Verdict::Mismatch => acl_ref.negated,
            };
            if !hit {
                return Some(false);
            }
        }
        Some(true)
    }

    /// Whether any `http_access` line uses a `dst`-type ACL (`dst`,
    /// `to_localhost`, `to_linklocal`): then [`SquidConfig::decide`] must be
    /// asked once per candidate address, with [`RequestFacts::dst`] set. When
    /// false, the answer does not depend on `dst`.
    pub fn needs_destination(&self) -> bool {
        self.rules.iter().any(|rule| self.uses_dst(&rule.acls))
    }

    /// Whether one of `acls` is a `dst`-type ACL.
    pub(super) fn uses_dst(&self, acls: &[AclRef]) -> bool {
        acls.iter()
            .any(|acl| matches!(self.acls[acl.index].kind, AclKind::Dst { .. }))
    }

    /// Whether any `http_access` line uses a `proxy_auth` ACL: only then are
    /// credentials worth checking.
    pub fn uses_authentication(&self) -> bool {
        self.rules.iter().any(|rule| {
            rule.acls
                .iter()
                .any(|acl| self.acls[acl.index].kind.is_auth())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn local_time_from_system_time() {
        // 2018-12-07T05:21:05Z was a Friday.
        let t = UNIX_EPOCH + Duration::from_secs(1_544_160_065);
        let utc = LocalTime::at(t, 0);
        assert_eq!(utc.weekday(), Weekday::Friday);
        assert_eq!(utc.minute_of_day(), 5 * 60 + 21);
        // Eight hours west it was still Thursday evening.
        let west = LocalTime::at(t, -8 * 3600);
        assert_eq!(west.weekday(), Weekday::Thursday);
        assert_eq!(west.minute_of_day(), 21 * 60 + 21);
        assert_eq!(LocalTime::at(UNIX_EPOCH, 0).weekday(), Weekday::Thursday);
        let before = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(LocalTime::at(before, 0).weekday(), Weekday::Wednesday);
        assert!(LocalTime::new(Weekday::Monday, 24, 0).is_none());
        assert!(LocalTime::new(Weekday::Monday, 23, 60).is_none());
        let _ = LocalTime::now();
    }
}
