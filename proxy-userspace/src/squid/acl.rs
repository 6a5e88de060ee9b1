//! ACL elements: the value types Squid's `acl` lines define, how their values
//! parse, how they match a request, and how they print back.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use regex::{Regex, RegexBuilder};

use super::reader::Loc;

/// An ACL: a name, a type with its values, and where it was defined.
#[derive(Clone, Debug)]
pub(super) struct Acl {
    /// The name as first written.
    pub name: String,
    /// The type and values.
    pub kind: AclKind,
    /// Values that come with a predefined ACL (not printed back).
    pub builtin_values: usize,
    /// The first line of the file that defined or extended it.
    pub loc: Option<Loc>,
}

/// The type of an ACL and its values.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum AclKind {
    /// `src`: the client address.
    Src(Vec<IpRange>),
    /// `dst`: the address connected to; `-n` restricts it to IP-literal targets.
    Dst {
        /// The address ranges.
        ranges: Vec<IpRange>,
        /// `-n`: never match a target given by name.
        no_lookup: bool,
    },
    /// `localip` (`myip`): the proxy address the client connected to.
    LocalIp(Vec<IpRange>),
    /// `dstdomain`.
    DstDomain(DomainSet),
    /// `dstdom_regex`.
    DstDomRegex(Vec<Pattern>),
    /// `url_regex`, matched against `host:port`.
    UrlRegex(Vec<Pattern>),
    /// `port`: the CONNECT port.
    Port(Vec<(u16, u16)>),
    /// `localport` (`myport`): the proxy port the client connected to.
    LocalPort(Vec<(u16, u16)>),
    /// `method`.
    Method(Vec<String>),
    /// `proto`: upper-cased scheme names.
    Proto(Vec<String>),
    /// `time`.
    Time(Vec<TimeSpec>),
    /// `proxy_auth`.
    ProxyAuth(UserList),
    /// `proxy_auth_regex`.
    ProxyAuthRegex(Vec<Pattern>),
    /// `at_step`: the SslBump step being decided (1: the CONNECT, 2: the
    /// client's ClientHello peeked); spliced has no step 3.
    AtStep(Vec<u8>),
    /// `ssl::server_name`: the ClientHello's SNI once peeked, else the
    /// CONNECT host; `dstdomain` syntax.
    ServerName(DomainSet),
    /// `ssl::server_name_regex`: the same name, by regular expression.
    ServerNameRegex(Vec<Pattern>),
    /// The predefined `manager`: cache manager URLs, never a CONNECT request.
    Manager,
    /// A Squid type spliced does not evaluate.
    Unsupported {
        /// The type name as written.
        type_name: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
}

/// What `proxy_auth` accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UserList {
    /// `REQUIRED`: any authenticated user.
    pub required: bool,
    /// Accepted user names.
    pub users: Vec<String>,
    /// `-i`: compare names case-insensitively.
    pub ignore_case: bool,
}

/// A regular expression with its source and case flag.
#[derive(Clone, Debug)]
pub(super) struct Pattern {
    pub regex: Regex,
    pub source: String,
    pub ignore_case: bool,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.ignore_case == other.ignore_case
    }
}

/// A `dstdomain` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Domain {
    /// Lower-case, without leading or trailing dot.
    pub name: String,
    /// Written with a leading dot: the domain and its subdomains.
    pub subdomains: bool,
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains {
            f.write_str(".")?;
        }
        f.write_str(&self.name)
    }
}

/// `dstdomain` values in order, indexed so that a match costs one hash lookup
/// per label of the host, however long the list.
#[derive(Clone, Debug, Default)]
pub(super) struct DomainSet {
    /// The entries, in order.
    pub list: Vec<Domain>,
    /// Names written without a leading dot.
    exact: HashSet<String>,
    /// Names written with a leading dot.
    subtree: HashSet<String>,
}

impl PartialEq for DomainSet {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl DomainSet {
    /// Adds an entry; returns an entry it overlaps (Squid refuses overlaps).
    fn insert(&mut self, domain: Domain) -> Option<String> {
        let overlap = match self.covering(&domain.name) {
            Some(parent) => Some(format!(".{parent}")),
            None => self
                .exact
                .contains(&domain.name)
                .then(|| domain.name.clone()),
        };
        if domain.subdomains {
            self.subtree.insert(domain.name.clone());
        } else {
            self.exact.insert(domain.name.clone());
        }
        self.list.push(domain);
        overlap
    }

    /// Whether `host` (lower case, without a trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        self.exact.contains(host) || self.covering(host).is_some()
    }

    /// Whether one entry matches both `a` and `b` (lower case, without
    /// trailing dots): `a` itself written without a dot and `b == a`, or a
    /// `.domain` entry that is a parent of (or equal to) both.
    pub fn covers_both(&self, a: &str, b: &str) -> bool {
        if a == b && self.exact.contains(a) {
            return true;
        }
        std::iter::once(a)
            .chain(a.match_indices('.').map(|(at, _)| &a[at + 1..]))
            .filter(|suffix| self.subtree.contains(*suffix))
            .any(|suffix| b == suffix || b.ends_with(&format!(".{suffix}")))
    }

    /// The `.domain` entry that covers `name`: the name itself or a parent.
    fn covering<'a>(&self, name: &'a str) -> Option<&'a str> {
        std::iter::once(name)
            .chain(name.match_indices('.').map(|(at, _)| &name[at + 1..]))
            .find(|suffix| self.subtree.contains(*suffix))
    }
}

/// An inclusive range of addresses of one family; IPv4-mapped IPv6 ranges are
/// stored as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IpRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

/// One `time` entry: days (bit 0 = Sunday) and minutes of the day, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TimeSpec {
    pub days: u8,
    pub start: u16,
    pub end: u16,
}

/// Letters of the `time` ACL, bit 0 = Sunday.
const DAY_LETTERS: [char; 7] = ['S', 'M', 'T', 'W', 'H', 'F', 'A'];
const ALL_DAYS: u8 = 0x7f;

/// How a type name is handled.
pub(super) enum TypeInfo {
    /// Supported, with its canonical name.
    Supported(&'static str),
    /// A Squid type that cannot be used here, and why.
    Unsupported(&'static str),
}

const WHY_NO_PATH: &str = "a CONNECT request has no URL path or query; its URL is only host:port";
const WHY_NO_REPLY: &str = "a tunnel has no HTTP reply to inspect";
const WHY_NO_TLS: &str =
    "spliced never decrypts and never sees a certificate (it peeks at the ClientHello only), so there is no TLS state to match";
const WHY_NO_PEERS: &str = "spliced always connects directly; there are no cache peers";
const WHY_NO_HEADERS: &str =
    "spliced does not keep request headers for access checks; use dstdomain, port, src and proxy_auth";
const WHY_NO_RDNS: &str = "it needs reverse DNS of the client, which spliced never does";
const WHY_NO_HELPERS: &str = "spliced runs no helper programs";
const WHY_NO_COUNTERS: &str =
    "spliced keeps no per-client connection or user counters for ACLs (see client_ip_max_connections)";
const WHY_NO_ANNOTATIONS: &str = "spliced has no transaction annotations or tags";
const WHY_NO_LINK: &str = "spliced does not look up link-layer addresses";
const WHY_NOT_YET: &str = "this ACL type is not implemented by spliced";

/// Looks a type name up.
pub(super) fn type_info(name: &str) -> Option<TypeInfo> {
    use TypeInfo::{Supported as S, Unsupported as U};
    Some(match name {
        "src" => S("src"),
        "dst" => S("dst"),
        "localip" | "myip" => S("localip"),
        "dstdomain" => S("dstdomain"),
        "dstdom_regex" => S("dstdom_regex"),
        "url_regex" => S("url_regex"),
        "port" => S("port"),
        "localport" | "myport" => S("localport"),
        "method" => S("method"),
        "proto" => S("proto"),
        "time" => S("time"),
        "proxy_auth" => S("proxy_auth"),
        "proxy_auth_regex" => S("proxy_auth_regex"),
        "urlpath_regex" | "urllogin" => U(WHY_NO_PATH),
        "rep_header" | "rep_mime_type" | "http_status" => U(WHY_NO_REPLY),
        "at_step" => S("at_step"),
        "ssl::server_name" => S("ssl::server_name"),
        "ssl::server_name_regex" => S("ssl::server_name_regex"),
        "ssl_error"
        | "server_cert_fingerprint"
        | "user_cert"
        | "ca_cert"
        | "ssl::certHasExpired"
        | "connections_encrypted" => U(WHY_NO_TLS),
        "peername" | "peername_regex" | "hier_code" => U(WHY_NO_PEERS),
        "browser" | "req_header" | "referer_regex" | "req_mime_type" => U(WHY_NO_HEADERS),
        "srcdomain" | "srcdom_regex" => U(WHY_NO_RDNS),
        "external" | "ident" | "ident_regex" | "adaptation_service" => U(WHY_NO_HELPERS),
        "maxconn" | "max_user_ip" => U(WHY_NO_COUNTERS),
        "note" | "tag" | "has" | "annotate_transaction" | "annotate_client" => {
            U(WHY_NO_ANNOTATIONS)
        }
        "arp" | "eui64" => U(WHY_NO_LINK),
        "myportname"
        | "random"
        | "squid_error"
        | "transaction_initiator"
        | "any-of"
        | "all-of"
        | "client_connection_mark"
        | "clientside_mark"
        | "dst_as"
        | "src_as" => U(WHY_NOT_YET),
        _ => return None,
    })
}

impl AclKind {
    /// An empty value set of a supported type.
    pub fn empty(type_name: &str) -> Self {
        match type_name {
            "src" => Self::Src(Vec::new()),
            "dst" => Self::Dst {
                ranges: Vec::new(),
                no_lookup: false,
            },
            "localip" => Self::LocalIp(Vec::new()),
            "dstdomain" => Self::DstDomain(DomainSet::default()),
            "dstdom_regex" => Self::DstDomRegex(Vec::new()),
            "url_regex" => Self::UrlRegex(Vec::new()),
            "port" => Self::Port(Vec::new()),
            "localport" => Self::LocalPort(Vec::new()),
            "method" => Self::Method(Vec::new()),
            "proto" => Self::Proto(Vec::new()),
            "time" => Self::Time(Vec::new()),
            "proxy_auth" => Self::ProxyAuth(UserList {
                required: false,
                users: Vec::new(),
                ignore_case: false,
            }),
            "proxy_auth_regex" => Self::ProxyAuthRegex(Vec::new()),
            "at_step" => Self::AtStep(Vec::new()),
            "ssl::server_name" => Self::ServerName(DomainSet::default()),
            "ssl::server_name_regex" => Self::ServerNameRegex(Vec::new()),
            other => Self::Unsupported {
                type_name: other.to_owned(),
                reason: WHY_NOT_YET,
            },
        }
    }

    /// The canonical type name.
    pub fn type_name(&self) -> &str {
        match self {
            Self::Src(_) => "src",
            Self::Dst { .. } => "dst",
            Self::LocalIp(_) => "localip",
            Self::DstDomain(_) => "dstdomain",
            Self::DstDomRegex(_) => "dstdom_regex",
            Self::UrlRegex(_) => "url_regex",
            Self::Port(_) => "port",
            Self::LocalPort(_) => "localport",
            Self::Method(_) => "method",
            Self::Proto(_) => "proto",
            Self::Time(_) => "time",
            Self::ProxyAuth(_) => "proxy_auth",
            Self::ProxyAuthRegex(_) => "proxy_auth_regex",
            Self::AtStep(_) => "at_step",
            Self::ServerName(_) => "ssl::server_name",
            Self::ServerNameRegex(_) => "ssl::server_name_regex",
            Self::Manager => "manager",
            Self::Unsupported { type_name, .. } => type_name,
        }
    }

    /// Whether matching needs an authenticated user.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::ProxyAuth(_) | Self::ProxyAuthRegex(_))
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Src(v) | Self::LocalIp(v) | Self::Dst { ranges: v, .. } => v.len(),
            Self::DstDomain(set) | Self::ServerName(set) => set.list.len(),
            Self::DstDomRegex(v)
            | Self::UrlRegex(v)
            | Self::ProxyAuthRegex(v)
            | Self::ServerNameRegex(v) => v.len(),
            Self::AtStep(v) => v.len(),
            Self::Port(v) | Self::LocalPort(v) => v.len(),
            Self::Method(v) | Self::Proto(v) => v.len(),
            Self::Time(v) => v.len(),
            Self::ProxyAuth(list) => list.users.len() + usize::from(list.required),
            Self::Manager | Self::Unsupported { .. } => 0,
        }
    }

    /// Which leading flags the type takes.
    fn accepts_flag(&self, flag: &str) -> bool {
        matches!(
            (self, flag),
            (Self::Dst { .. } | Self::DstDomain(_), "-n")
                | (Self::ProxyAuth(_), "-i")
                | (Self::ServerName(_), "--client-requested")
        )
    }

    /// Whether `-i`/`+i` may appear anywhere among the values.
    fn is_regex(&self) -> bool {
        matches!(
            self,
            Self::DstDomRegex(_)
                | Self::UrlRegex(_)
                | Self::ProxyAuthRegex(_)
                | Self::ServerNameRegex(_)
        )
    }

    /// Adds the values of one `acl` line. `words` are the tokens after the type
    /// (files already expanded), each with its location; warnings are pushed.
    /// Returns how many values (not flags) there were.
    pub fn add_values(
        &mut self,
        words: &[(String, Loc)],
        warnings: &mut Vec<super::Diagnostic>,
    ) -> Result<usize, super::Diagnostic> {
        let mut values = words;
        if !self.is_regex() {
            while let Some(((word, loc), rest)) = values.split_first() {
                if word == "--" {
                    values = rest;
                    break;
                }
                if !looks_like_flag(word) {
                    break;
                }
                if !self.accepts_flag(word) {
                    if matches!(self, Self::ServerName(_))
                        && ["--server-provided", "--consensus"].contains(&word.as_str())
                    {
                        return Err(loc.diag(
                            "spliced never sees the server's certificate: only the name the client requested (--client-requested) can be matched",
                            word,
                        ));
                    }
                    return Err(loc.diag(
                        format!("unknown flag for ACL type {}", self.type_name()),
                        word,
                    ));
                }
                match (&mut *self, word.as_str()) {
                    (Self::Dst { no_lookup, .. }, "-n") => *no_lookup = true,
                    (Self::ProxyAuth(list), "-i") => list.ignore_case = true,
                    _ => {} // dstdomain -n: reverse DNS is never done anyway.
                }
                values = rest;
            }
        }
        let mut ignore_case = false;
        let mut pending_days: Option<u8> = None;
        let mut count = 0;
        for (word, loc) in values {
            count += 1;
            let bad = |message: String| loc.diag(message, word);
            match self {
                Self::Src(ranges) | Self::LocalIp(ranges) | Self::Dst { ranges, .. } => {
                    let (parsed, warning) = parse_ip_entry(word).map_err(bad)?;
                    if let Some(warning) = warning {
                        warnings.push(loc.diag(warning, word));
                    }
                    ranges.extend(parsed);
                }
                Self::AtStep(steps) => {
                    let step = match word.as_str() {
                        "SslBump1" => 1,
                        "SslBump2" => 2,
                        "SslBump3" => {
                            return Err(bad(
                                "spliced decides at SslBump1 and SslBump2 only: it never peeks at the server's TLS"
                                    .into(),
                            ))
                        }
                        "GeneratingCONNECT" => {
                            return Err(bad("spliced never generates CONNECT requests".into()))
                        }
                        _ => return Err(bad("expected SslBump1 or SslBump2".into())),
                    };
                    steps.push(step);
                }
                Self::DstDomain(set) | Self::ServerName(set) => {
                    if let Some(other) = set.insert(parse_domain(word).map_err(bad)?) {
                        warnings.push(loc.diag(
                            format!(
                                "overlaps '{other}' in the same ACL (Squid refuses this; \
                                 spliced keeps both)"
                            ),
                            word,
                        ));
                    }
                }
                Self::DstDomRegex(patterns)
                | Self::UrlRegex(patterns)
                | Self::ProxyAuthRegex(patterns)
                | Self::ServerNameRegex(patterns) => match word.as_str() {
                    "-i" => {
                        ignore_case = true;
                        count -= 1;
                    }
                    "+i" => {
                        ignore_case = false;
                        count -= 1;
                    }
                    _ => patterns.push(parse_pattern(word, ignore_case).map_err(bad)?),
                },
                Self::Port(ports) | Self::LocalPort(ports) => {
                    ports.push(parse_port_range(word).map_err(bad)?)
                }
                Self::Method(methods) => {
                    if word.is_empty() || !word.bytes().all(is_tchar) {
                        return Err(bad("not an HTTP method token".into()));
                    }
                    methods.push(word.clone());
                }
                Self::Proto(protos) => {
                    let upper = word.to_ascii_uppercase();
                    if !KNOWN_PROTOCOLS.contains(&upper.as_str()) {
                        return Err(bad(format!(
                            "unknown protocol (known: {})",
                            KNOWN_PROTOCOLS.join(" ")
                        )));
                    }
                    protos.push(upper);
                }
                Self::Time(specs) => {
                    if word.starts_with(|c: char| c.is_ascii_digit()) {
                        let (start, end) = parse_time_range(word).map_err(bad)?;
                        let days = pending_days.take().unwrap_or(ALL_DAYS);
                        specs.push(TimeSpec { days, start, end });
                    } else {
                        let days = parse_days(word).map_err(bad)?;
                        pending_days = Some(pending_days.unwrap_or(0) | days);
                    }
                }
                Self::ProxyAuth(list) => {
                    if word == "REQUIRED" {
                        list.required = true;
                    } else {
                        list.users.push(word.clone());
                    }
                    if list.required && !list.users.is_empty() {
                        return Err(bad("REQUIRED cannot be combined with user names".into()));
                    }
                }
                Self::Manager | Self::Unsupported { .. } => {}
            }
        }
        if let (Self::Time(specs), Some(days)) = (&mut *self, pending_days) {
            specs.push(TimeSpec {
                days,
                start: 0,
                end: 23 * 60 + 59,
            });
        }
        Ok(count)
    }

    /// The values after the first `skip` (the built-in ones), as `acl` line
    /// arguments (flags included).
    pub fn render_values(&self, skip: usize) -> Vec<String> {
        let mut out = Vec::new();
        // How many of `out` are flags; the values follow them.
        let mut flags = 0;
        match self {
            Self::Src(ranges) | Self::LocalIp(ranges) => {
                out.extend(ranges.iter().skip(skip).map(IpRange::to_string))
            }
            Self::Dst { ranges, no_lookup } => {
                if *no_lookup {
                    out.push("-n".into());
                    flags = 1;
                }
                out.extend(ranges.iter().skip(skip).map(IpRange::to_string));
            }
            Self::DstDomain(set) | Self::ServerName(set) => {
                out.extend(set.list.iter().skip(skip).map(Domain::to_string))
            }
            Self::AtStep(steps) => {
                out.extend(steps.iter().skip(skip).map(|step| format!("SslBump{step}")))
            }
            Self::DstDomRegex(patterns)
            | Self::UrlRegex(patterns)
            | Self::ProxyAuthRegex(patterns)
            | Self::ServerNameRegex(patterns) => {
                let mut ignore_case = false;
                for pattern in patterns.iter().skip(skip) {
                    if pattern.ignore_case != ignore_case {
                        ignore_case = pattern.ignore_case;
                        out.push(if ignore_case { "-i" } else { "+i" }.into());
                    }
                    out.push(pattern.source.clone());
                }
            }
            Self::Port(ports) | Self::LocalPort(ports) => {
                out.extend(ports.iter().skip(skip).map(|&(low, high)| {
                    if low == high {
                        low.to_string()
                    } else {
                        format!("{low}-{high}")
                    }
                }))
            }
            Self::Method(values) | Self::Proto(values) => {
                out.extend(values.iter().skip(skip).cloned())
            }
            Self::Time(specs) => out.extend(specs.iter().skip(skip).flat_map(|spec| {
                let days: String = DAY_LETTERS
                    .iter()
                    .enumerate()
                    .filter(|(bit, _)| spec.days & (1 << bit) != 0)
                    .map(|(_, letter)| letter)
                    .collect();
                [days, format!("{}-{}", hh_mm(spec.start), hh_mm(spec.end))]
            })),
            Self::ProxyAuth(list) => {
                if list.ignore_case {
                    out.push("-i".into());
                    flags = 1;
                }
                if list.required {
                    out.push("REQUIRED".into());
                }
                out.extend(list.users.iter().skip(skip).cloned());
            }
            Self::Manager | Self::Unsupported { .. } => {}
        }
        // A first value that reads as a flag (a `dstdomain` named `-x`, given
        // after `--`) needs the `--` again.
        if !self.is_regex() && out.get(flags).is_some_and(|first| looks_like_flag(first)) {
            out.insert(flags, "--".into());
        }
        out
    }
}

/// Whether a word at the start of the values of a non-regex ACL is taken for
/// a flag (`-n`, `-i`, or `--`, which ends the flags), not a value.
fn looks_like_flag(word: &str) -> bool {
    word.starts_with('-') && word.len() > 1 && !word[1..].starts_with(|c: char| c.is_ascii_digit())
}

fn hh_mm(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Scheme names accepted by `proto` (Squid's list, upper-cased).
const KNOWN_PROTOCOLS: &[&str] = &[
    "NONE",
    "AUTHORITY_FORM",
    "HTTP",
    "HTTPS",
    "FTP",
    "GOPHER",
    "WAIS",
    "CACHE_OBJECT",
    "ICP",
    "HTCP",
    "URN",
    "WHOIS",
    "ICY",
    "COAP",
    "COAPS",
];

/// What a CONNECT request's protocol is called (see the module docs).
pub(super) const CONNECT_PROTOCOLS: &[&str] = &["NONE"];

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl IpRange {
    fn single(ip: IpAddr) -> Self {
        let ip = canonical_ip(ip);
        Self {
            first: ip,
            last: ip,
        }
    }

    /// Whether `ip` (already canonical) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.first, self.last, ip) {
            (IpAddr::V4(first), IpAddr::V4(last), IpAddr::V4(ip)) => {
                (u32::from(first)..=u32::from(last)).contains(&u32::from(ip))
            }
            (IpAddr::V6(first), IpAddr::V6(last), IpAddr::V6(ip)) => {
                (u128::from(first)..=u128::from(last)).contains(&u128::from(ip))
            }
            _ => false,
        }
    }

    /// The CIDR prefix length when the range is exactly one prefix.
    fn prefix_len(&self) -> Option<u32> {
        let (first, last, bits) = match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return None,
        };
        let span = first ^ last;
        let host_bits = 128 - span.leading_zeros();
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (span == host_mask && first & host_mask == 0).then(|| bits - host_bits)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.first.is_ipv4() { 32 } else { 128 };
        match self.prefix_len() {
            Some(len) if len == full => write!(f, "{}", self.first),
            Some(len) => write!(f, "{}/{len}", self.first),
            None => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub(super) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, String> {
    text.parse::<IpAddr>().map_err(|_| {
        "not an IP address (host names in address ACLs are not resolved by spliced)".to_owned()
    })
}

/// Parses one address entry; the second value is a warning (host bits set).
pub(super) fn parse_ip_entry(text: &str) -> Result<(Vec<IpRange>, Option<String>), String> {
    let all_v4 = IpRange {
        first: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        last: IpAddr::V4(Ipv4Addr::BROADCAST),
    };
    let all_v6 = IpRange {
        first: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        last: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
    };
    match text {
        "all" => return Ok((vec![all_v4, all_v6], None)),
        "ipv4" => return Ok((vec![all_v4], None)),
        "ipv6" => return Ok((vec![all_v6], None)),
        _ => {}
    }
    if let Some((low, high)) = text.split_once('-') {
        let (low, high) = (parse_addr(low)?, parse_addr(high)?);
        let (low, high) = (canonical_ip(low), canonical_ip(high));
        let ordered = match (low, high) {
            (IpAddr::V4(a), IpAddr::V4(b)) => a <= b,
            (IpAddr::V6(a), IpAddr::V6(b)) => a <= b,
            _ => return Err("range ends are of different address families".into()),
        };
        if !ordered {
            return Err("range start is above its end".into());
        }
        return Ok((
            vec![IpRange {
                first: low,
                last: high,
            }],
            None,
        ));
    }
    let Some((addr, mask)) = text.split_once('/') else {
        return Ok((vec![IpRange::single(parse_addr(text)?)], None));
    };
    let addr = parse_addr(addr)?;
    let bits: u32 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if let Ok(len) = mask.parse::<u32>() {
        if len > bits || !mask.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("prefix length above {bits}"));
        }
        len
    } else {
        match (addr, mask.parse::<Ipv4Addr>()) {
            (IpAddr::V4(_), Ok(mask)) => {
                let mask = u32::from(mask);
                if mask.leading_ones() + mask.trailing_zeros() != 32 {
                    return Err("netmask is not contiguous".into());
                }
                mask.leading_ones()
            }
            _ => return Err("bad netmask".into()),
        }
    };
    let (first, last, masked_away) = match addr {
        IpAddr::V4(ip) => {
            let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
            let value = u32::from(ip);
            (
                IpAddr::V4(Ipv4Addr::from(value & !host)),
                IpAddr::V4(Ipv4Addr::from(value | host)),
                value & host != 0,
            )
        }
        IpAddr::V6(ip) => {
            let host = u128::MAX.checked_shr(prefix).unwrap_or(0);
            let value = u128::from(ip);
            (
                IpAddr::V6(Ipv6Addr::from(value & !host)),
                IpAddr::V6(Ipv6Addr::from(value | host)),
                value & host != 0,
            )
        }
    };
    let warning = masked_away
        .then(|| format!("the netmask masks away part of the address; using {first}/{prefix}"));
    // An IPv4-mapped IPv6 prefix covers IPv4 addresses: store it as IPv4.
    let (first, last) = match (canonical_ip(first), canonical_ip(last)) {
        (a @ IpAddr::V4(_), b @ IpAddr::V4(_)) => (a, b),
        _ => (first, last),
    };
    Ok((vec![IpRange { first, last }], warning))
}

/// Parses a `dstdomain` value.
pub(super) fn parse_domain(text: &str) -> Result<Domain, String> {
    if let Some(rest) = text.strip_prefix("*.") {
        return Err(format!(
            "wildcards are not Squid syntax; write .{rest} for the domain and its subdomains"
        ));
    }
    let (subdomains, rest) = match text.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !valid {
        return Err("not a domain name".into());
    }
    Ok(Domain { name, subdomains })
}

fn parse_pattern(source: &str, ignore_case: bool) -> Result<Pattern, String> {
    let regex = RegexBuilder::new(source)
        .case_insensitive(ignore_case)
        .build()
        .map_err(|err| format!("bad regular expression: {}", first_line(&err.to_string())))?;
    Ok(Pattern {
        regex,
        source: source.to_owned(),
        ignore_case,
    })
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `PORT` or `LOW-HIGH`.
pub(super) fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let port = |part: &str| {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err("not a port number or range".to_owned());
        }
        part.parse::<u16>()
            .map_err(|_| "port number above 65535".to_owned())
    };
    let range = match text.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => {
            let single = port(text)?;
            (single, single)
        }
    };
    if range.0 > range.1 {
        return Err("port range start is above its end".into());
    }
    Ok(range)
}

fn parse_days(text: &str) -> Result<u8, String> {
    let mut days = 0;
    for letter in text.chars() {
        days |= match letter {
            'D' => 0b011_1110,
            _ => match DAY_LETTERS.iter().position(|&day| day == letter) {
                Some(bit) => 1 << bit,
                None => {
                    return Err(format!(
                        "bad day letter {letter:?} (use S M T W H F A, or D for Monday to Friday)"
                    ))
                }
            },
        };
    }
    Ok(days)
}

fn parse_time_range(text: &str) -> Result<(u16, u16), String> {
    let clock = |part: &str| -> Result<u16, String> {
        let (hours, minutes) = part
            .split_once(':')
            .ok_or_else(|| "expected HH:MM-HH:MM".to_owned())?;
        let number = |digits: &str| {
            if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err("expected HH:MM-HH:MM".to_owned());
            }
            digits
                .parse::<u16>()
                .map_err(|_| "expected HH:MM-HH:MM".to_owned())
        };
        let (hours, minutes) = (number(hours)?, number(minutes)?);
        if minutes > 59 || hours > 24 || (hours == 24 && minutes != 0) {
            return Err("time of day out of range".into());
        }
        Ok(hours * 60 + minutes)
    };
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| "expected HH:MM-HH:MM".to_owned())?;
    let (start, end) = (clock(start)?, clock(end)?);
    if start >= end {
        return Err("the start time must be before the end time".into());
    }
    Ok((start, end))
}

/// The predefined ACLs, in Squid's order.
pub(super) fn predefined() -> Vec<Acl> {
    let ranges = |values: &[&str]| -> Vec<IpRange> {
        values
            .iter()
            .flat_map(|value| {
                parse_ip_entry(value)
                    .map(|(ranges, _)| ranges)
                    .unwrap_or_default()
            })
            .collect()
    };
    let acl = |name: &str, kind: AclKind| Acl {
        name: name.to_owned(),
        builtin_values: kind.len(),
        kind,
        loc: None,
    };
    vec![
        acl("all", AclKind::Src(ranges(&["all"]))),
        acl("manager", AclKind::Manager),
        acl("localhost", AclKind::Src(ranges(&["127.0.0.1/32", "::1"]))),
        acl(
            "to_localhost",
            AclKind::Dst {
                ranges: ranges(&["127.0.0.0/8", "0.0.0.0/32", "::/128", "::1/128"]),
                no_lookup: false,
            },
        ),
        acl(
            "to_linklocal",
            AclKind::Dst {
                ranges: ranges(&["169.254.0.0/16", "fe80::/10"]),
                no_lookup: false,
            },
        ),
        acl("CONNECT", AclKind::Method(vec!["CONNECT".into()])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(text: &str) -> Vec<String> {
        parse_ip_entry(text)
            .unwrap()
            .0
            .iter()
            .map(IpRange::to_string)
            .collect()
    }

    #[test]
    fn address_entries_normalize() {
        let cases: &[(&str, &[&str])] = &[
            ("10.0.0.0/8", &["10.0.0.0/8"]),
            ("10.0.0.0/255.0.0.0", &["10.0.0.0/8"]),
            ("10.1.2.3/8", &["10.0.0.0/8"]),
            ("192.168.1.1", &["192.168.1.1"]),
            ("192.168.1.1/32", &["192.168.1.1"]),
            ("0.0.0.0/32", &["0.0.0.0"]),
            ("::/128", &["::"]),
            ("::1/128", &["::1"]),
            ("2001:db8::/127", &["2001:db8::/127"]),
            ("10.0.0.1-10.0.0.9", &["10.0.0.1-10.0.0.9"]),
            ("10.0.0.0-10.0.0.255", &["10.0.0.0/24"]),
            ("::1", &["::1"]),
            ("fe80::/10", &["fe80::/10"]),
            ("2001:db8::1-2001:db8::9", &["2001:db8::1-2001:db8::9"]),
            ("::ffff:10.0.0.0/104", &["10.0.0.0/8"]),
            ("::ffff:10.0.0.1", &["10.0.0.1"]),
            ("all", &["0.0.0.0/0", "::/0"]),
            ("ipv6", &["::/0"]),
            ("0.0.0.0/0", &["0.0.0.0/0"]),
        ];
        for (input, expected) in cases {
            assert_eq!(ranges(input), *expected, "{input}");
        }
        assert!(parse_ip_entry("10.1.2.3/8").unwrap().1.is_some());
        for bad in [
            "example.com",
            "10.0.0.0/33",
            "10.0.0.0/255.0.255.0",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-::1",
            "::1/255.0.0.0",
            "10.0.0.0/+8",
            "",
        ] {
            assert!(parse_ip_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains_ports_times() {
        assert_eq!(
            parse_domain(".Example.COM.").unwrap(),
            Domain {
                name: "example.com".into(),
                subdomains: true
            }
        );
        assert!(parse_domain("*.example.com").is_err());
        assert!(parse_domain(".").is_err());
        assert!(parse_domain("a/b").is_err());
        assert_eq!(parse_port_range("1025-65535"), Ok((1025, 65535)));
        assert_eq!(parse_port_range("443"), Ok((443, 443)));
        for bad in ["", "65536", "9-1", "-1", "a", "1-"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_time_range("08:00-17:30"), Ok((480, 1050)));
        assert_eq!(parse_time_range("0:00-24:00"), Ok((0, 1440)));
        for bad in [
            "17:00-08:00",
            "08:00",
            "8-9",
            "25:00-26:00",
            "08:60-09:00",
            "08:00-08:00",
        ] {
            assert!(parse_time_range(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_days("MTWHF"), Ok(0b011_1110));
        assert_eq!(parse_days("D"), Ok(0b011_1110));
        assert_eq!(parse_days("SA"), Ok(0b100_0001));
        assert!(parse_days("X").is_err());
        assert!(parse_days("m").is_err());
    }
}
