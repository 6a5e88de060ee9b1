//! Parent proxies in `squid.conf`: `cache_peer` (type `parent` only),
//! `cache_peer_access`, `never_direct`, `always_direct`, `prefer_direct` and
//! `nonhierarchical_direct`, and Squid's peer selection over them
//! ([`SquidConfig::routes`], pure: the caller says which parents are up).
//!
//! Selection follows Squid's `peer_select.cc` for a request without a cache
//! entry (a CONNECT, or a plain request spliced never caches):
//! * `always_direct` allows → DIRECT only;
//! * else `never_direct` allows → parents only;
//! * else DIRECT, and the parents only for a *hierarchical* request (a `GET`
//!   or `TRACE` without `Authorization`; CONNECT never is) or with
//!   `nonhierarchical_direct off`; DIRECT first with `prefer_direct on`, last
//!   otherwise.
//!
//! The parents, when used: the first one up that `cache_peer_access` allows
//! (`FIRSTUP_PARENT`), then every other allowed one that is up in
//! configuration order (`ANY_OLD_PARENT`), then the first allowed `default`
//! one that is up (`DEFAULT_PARENT`): the last resort, as Squid's
//! documentation describes it. (Squid's own code lets a `default` parent be
//! picked in its configuration place, as `FIRSTUP_PARENT` or
//! `ANY_OLD_PARENT`, so that `DEFAULT_PARENT` hardly ever shows; spliced
//! keeps it for last.)

use std::{fmt, time::Duration};

use super::{
    access::{AclRef, Prepared},
    parse::parse_time_value,
    reader::{Loc, SourceLine, Token},
    Diagnostic, RequestFacts, SquidConfig,
};

/// Squid's default `connect-fail-limit`.
pub const DEFAULT_CONNECT_FAIL_LIMIT: u32 = 10;

/// `cache_peer` options accepted without effect, and why they have none.
const HARMLESS_OPTIONS: &[(&str, &str)] = &[
    ("no-query", "spliced sends no ICP queries"),
    ("no-digest", "spliced fetches no cache digests"),
    ("no-netdb-exchange", "spliced keeps no network database"),
    ("proxy-only", "spliced caches nothing"),
    ("no-delay", "spliced has no delay pools"),
    (
        "weight=",
        "weights only rank ICP answers and round-robin parents",
    ),
    ("basetime=", "spliced sends no ICP queries"),
    ("ttl=", "spliced sends no ICP queries"),
];

/// `cache_peer` options refused, and why.
const REFUSED_OPTIONS: &[(&str, &str)] = &[
    (
        "round-robin",
        "round-robin parent selection is not implemented: list parents in order (FIRSTUP_PARENT)",
    ),
    (
        "weighted-round-robin",
        "round-robin parent selection is not implemented",
    ),
    ("carp", "CARP parent selection is not implemented"),
    (
        "sourcehash",
        "source-hash parent selection is not implemented",
    ),
    ("userhash", "user-hash parent selection is not implemented"),
    ("originserver", "spliced is not a reverse proxy"),
    ("ssl", "TLS to a parent is not supported"),
    ("tls", "TLS to a parent is not supported"),
    (
        "max-conn=",
        "connection limits per parent are not implemented",
    ),
    ("standby=", "standby connections are not implemented"),
    (
        "connection-auth=",
        "connection-based authentication is not relayed",
    ),
    ("forceddomain=", "spliced is not a reverse proxy"),
    ("htcp", "spliced speaks no HTCP"),
    ("multicast-responder", "spliced speaks no ICP"),
    ("closest-only", "spliced speaks no ICP"),
    ("background-ping", "spliced speaks no ICP"),
    ("monitorurl=", "peer monitoring URLs are not fetched"),
    ("allow-miss", "spliced speaks no ICP"),
];

/// One `cache_peer HOST parent PORT ICP-PORT [OPTION…]` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePeer {
    /// The parent's host: a name (resolved like any target) or an IP literal.
    pub host: String,
    /// Its HTTP port.
    pub port: u16,
    /// `name=`, else the host, as Squid names peers.
    pub name: String,
    /// `login=USER:PASS`: sent as `Proxy-Authorization: Basic`.
    pub login: Option<String>,
    /// `default`: the parent of last resort.
    pub default: bool,
    /// `connect-timeout=`: instead of `connect_timeout` for this parent.
    pub connect_timeout: Option<Duration>,
    /// `connect-fail-limit=`: failed connections in a row after which the
    /// parent counts as dead until a probe connects.
    pub connect_fail_limit: u32,
    /// Where the line is.
    loc: Loc,
}

impl fmt::Display for CachePeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cache_peer {} parent {} 0 no-query name={}",
            self.host, self.port, self.name
        )?;
        if self.default {
            f.write_str(" default")?;
        }
        if let Some(login) = &self.login {
            write!(f, " login={login}")?;
        }
        if let Some(timeout) = self.connect_timeout {
            write!(f, " connect-timeout={}", timeout.as_secs_f64())?;
        }
        if self.connect_fail_limit != DEFAULT_CONNECT_FAIL_LIMIT {
            write!(f, " connect-fail-limit={}", self.connect_fail_limit)?;
        }
        Ok(())
    }
}

/// An `allow|deny ACL…` line of `cache_peer_access`, `never_direct` or
/// `always_direct`.
#[derive(Clone, Debug)]
pub(super) struct PeerRule {
    /// `allow` (true) or `deny`.
    allow: bool,
    /// The ACLs, ANDed.
    acls: Vec<AclRef>,
    /// The directive and its first argument, for rendering.
    prefix: String,
    /// Where the line is.
    loc: Loc,
    /// The line, for diagnostics.
    text: String,
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.prefix,
            if self.allow { "allow" } else { "deny" }
        )?;
        for acl in &self.acls {
            write!(f, " {}{}", if acl.negated { "!" } else { "" }, acl.name)?;
        }
        Ok(())
    }
}

/// The parent-proxy directives of one configuration.
#[derive(Clone, Debug)]
pub struct Peers {
    /// `cache_peer` lines, in order.
    pub peers: Vec<CachePeer>,
    /// `cache_peer_access` lines, per peer (same index as `peers`).
    access: Vec<Vec<PeerRule>>,
    /// `never_direct` lines.
    never_direct: Vec<PeerRule>,
    /// `always_direct` lines.
    always_direct: Vec<PeerRule>,
    /// `prefer_direct` (Squid's default: off).
    pub prefer_direct: bool,
    /// `nonhierarchical_direct` (Squid's default: on).
    pub nonhierarchical_direct: bool,
}

impl Peers {
    /// Whether peer selection can give anything but DIRECT: there are
    /// parents, or `never_direct` lines (which leave no route without them).
    pub fn select_routes(&self) -> bool {
        !self.peers.is_empty() || !self.never_direct.is_empty()
    }
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            access: Vec::new(),
            never_direct: Vec::new(),
            always_direct: Vec::new(),
            prefer_direct: false,
            nonhierarchical_direct: true,
        }
    }
}

/// Squid's hierarchy code of a route (`%Sh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HierCode {
    /// Straight to the origin.
    Direct,
    /// The first parent up that the request may use.
    FirstUpParent,
    /// Another parent up that the request may use.
    AnyOldParent,
    /// The `default` parent.
    DefaultParent,
}

impl HierCode {
    /// Squid's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "HIER_DIRECT",
            Self::FirstUpParent => "FIRSTUP_PARENT",
            Self::AnyOldParent => "ANY_OLD_PARENT",
            Self::DefaultParent => "DEFAULT_PARENT",
        }
    }
}

/// One way to try, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The parent (index into [`Peers::peers`]); `None` for DIRECT.
    pub peer: Option<usize>,
    /// How it was chosen.
    pub code: HierCode,
}

impl SquidConfig {
    /// The parent-proxy directives.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Whether `cache_peer_access`, `never_direct` or `always_direct` use a
    /// `dst`-type ACL: then [`SquidConfig::routes`] wants the target's
    /// addresses (Squid resolves the name to evaluate them).
    pub fn routes_need_destinations(&self) -> bool {
        let peers = &self.peers;
        peers
            .access
            .iter()
            .flatten()
            .chain(&peers.never_direct)
            .chain(&peers.always_direct)
            .any(|rule| self.uses_dst(&rule.acls))
    }

    /// The routes to try for a request, in order (empty: nothing may be
    /// tried, Squid's `ERR_CANNOT_FORWARD`). `hierarchical`: whether Squid
    /// would send the request up the hierarchy (see the module doc); `up`:
    /// whether a parent is alive (not past its `connect-fail-limit`);
    /// `destinations`: the target's addresses when
    /// [`SquidConfig::routes_need_destinations`] (a `dst` ACL matches if one
    /// of them is in it; none, as for a name that does not resolve, matches
    /// no `dst` ACL).
    pub fn routes(
        &self,
        facts: &RequestFacts<'_>,
        hierarchical: bool,
        up: impl Fn(usize) -> bool,
        destinations: &[std::net::IpAddr],
    ) -> Vec<Route> {
        let peers = &self.peers;
        if !peers.select_routes() {
            return vec![Route {
                peer: None,
                code: HierCode::Direct,
            }];
        }
        let request = Prepared::new(facts).with_destinations(destinations);
        let direct = Route {
            peer: None,
            code: HierCode::Direct,
        };
        if self.rules_allow(&peers.always_direct, &request) {
            return vec![direct];
        }
        let never_direct = self.rules_allow(&peers.never_direct, &request);
        let use_parents = never_direct || hierarchical || !peers.nonhierarchical_direct;
        let mut routes = Vec::new();
        if !never_direct && peers.prefer_direct {
            routes.push(direct);
        }
        if use_parents {
            let usable: Vec<usize> = (0..peers.peers.len())
                .filter(|&index| up(index) && self.peer_allowed(index, &request))
                .collect();
            let (defaults, others): (Vec<usize>, Vec<usize>) = usable
                .iter()
                .partition(|&&index| peers.peers[index].default);
            let mut add = |peer: usize, code| {
                if !routes.iter().any(|r| r.peer == Some(peer)) {
                    routes.push(Route {
                        peer: Some(peer),
                        code,
                    });
                }
            };
            if let Some(&first) = others.first() {
                add(first, HierCode::FirstUpParent);
            }
            for &index in others.iter().skip(1) {
                add(index, HierCode::AnyOldParent);
            }
            if let Some(&default) = defaults.first() {
                add(default, HierCode::DefaultParent);
            }
        }
        if !never_direct && !peers.prefer_direct {
            routes.push(direct);
        }
        routes
    }

    /// `cache_peer_access` of parent `index`: allowed without lines.
    fn peer_allowed(&self, index: usize, request: &Prepared<'_>) -> bool {
        let rules = &self.peers.access[index];
        rules.is_empty() || self.rules_allow(rules, request)
    }

    /// Squid's fast check of an `allow|deny` list: the first matching line
    /// decides, none matching means the opposite of the last line, no lines
    /// means no. A `proxy_auth` ACL without a user does not match.
    fn rules_allow(&self, rules: &[PeerRule], request: &Prepared<'_>) -> bool {
        for rule in rules {
            if self.acls_match(&rule.acls, request) == Some(true) {
                return rule.allow;
            }
        }
        rules.last().is_some_and(|last| !last.allow)
    }

    /// The parent-proxy lines in normalized form, for `render_effective`.
    pub(super) fn render_peers(&self, line: &mut impl FnMut(String)) {
        let peers = &self.peers;
        for (peer, rules) in peers.peers.iter().zip(&peers.access) {
            line(peer.to_string());
            for rule in rules {
                line(rule.to_string());
            }
        }
        for rule in peers.never_direct.iter().chain(&peers.always_direct) {
            line(rule.to_string());
        }
        if peers.prefer_direct {
            line("prefer_direct on".into());
        }
        if !peers.nonhierarchical_direct {
            line("nonhierarchical_direct off".into());
        }
    }
}

/// Parses `cache_peer HOST TYPE HTTP-PORT ICP-PORT [OPTION…]`; `warnings`
/// collects the options that have no effect.
pub(super) fn cache_peer(
    peers: &mut Peers,
    line: &SourceLine,
    args: &[Token],
    warnings: &mut Vec<Diagnostic>,
) -> Result<(), Diagnostic> {
    let loc = &line.loc;
    let [host, kind, port, icp_port, options @ ..] = args else {
        return Err(loc.diag(
            "expected: cache_peer HOST parent HTTP-PORT ICP-PORT [OPTION…]",
            &line.text,
        ));
    };
    match kind.text() {
        "parent" => {}
        "sibling" => {
            return Err(loc.diag(
                "cache_peer type sibling not supported: a sibling serves only its cache hits, and spliced has no cache (use parent)",
                kind.text(),
            ))
        }
        "multicast" => {
            return Err(loc.diag(
                "cache_peer type multicast not supported: spliced speaks no ICP",
                kind.text(),
            ))
        }
        other => return Err(loc.diag("unknown cache_peer type (expected parent)", other)),
    }
    let host = host.text().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@']) {
        return Err(loc.diag("bad cache_peer host", host));
    }
    let port = match port.text().parse::<u16>() {
        Ok(number) if number != 0 => number,
        _ => return Err(loc.diag("expected an HTTP port number 1-65535", port.text())),
    };
    let icp_port = icp_port
        .text()
        .parse::<u16>()
        .map_err(|_| loc.diag("expected an ICP port number (0 for none)", icp_port.text()))?;
    let mut peer = CachePeer {
        host: host.to_owned(),
        port,
        name: host.to_owned(),
        login: None,
        default: false,
        connect_timeout: None,
        connect_fail_limit: DEFAULT_CONNECT_FAIL_LIMIT,
        loc: loc.clone(),
    };
    let mut no_query = false;
    for option in options {
        let option = option.text();
        if let Some(name) = option.strip_prefix("name=") {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return Err(loc.diag("bad peer name (letters, digits, - _ . : only)", option));
            }
            peer.name = name.to_owned();
        } else if let Some(login) = option.strip_prefix("login=") {
            match login.split_once(':') {
                Some((user, _)) if !user.is_empty() && !user.starts_with('*') => {
                    peer.login = Some(login.to_owned());
                }
                _ => {
                    return Err(loc.diag(
                        "only login=USER:PASSWORD is supported (PASS, PASSTHRU, PROXYPASS, NEGOTIATE and *:PASSWORD relay client credentials, which spliced does not)",
                        option,
                    ))
                }
            }
        } else if option == "default" {
            peer.default = true;
        } else if let Some(value) = option.strip_prefix("connect-timeout=") {
            let time = parse_time_value(&[Token::Word(value.to_owned())])
                .map_err(|why| loc.diag(why, option))?;
            peer.connect_timeout = Some(time);
        } else if let Some(value) = option.strip_prefix("connect-fail-limit=") {
            peer.connect_fail_limit = match value.parse::<u32>() {
                Ok(limit) if limit > 0 => limit,
                _ => return Err(loc.diag("expected a positive number", option)),
            };
        } else if let Some((known, why)) = HARMLESS_OPTIONS.iter().find(|(known, _)| {
            option == *known || (known.ends_with('=') && option.starts_with(known))
        }) {
            if *known == "no-query" {
                no_query = true;
            } else {
                warnings.push(loc.diag(
                    format!("cache_peer option has no effect in spliced ({why}); ignored"),
                    option,
                ));
            }
        } else if let Some((_, why)) = REFUSED_OPTIONS.iter().find(|(known, _)| {
            option == *known || (known.ends_with('=') && option.starts_with(known))
        }) {
            return Err(loc.diag(format!("cache_peer option not supported: {why}"), option));
        } else {
            return Err(loc.diag("unknown or unsupported cache_peer option", option));
        }
    }
    if icp_port != 0 && !no_query {
        warnings.push(loc.diag(
            "spliced sends no ICP queries: the ICP port is ignored (write 0 no-query)",
            &line.text,
        ));
    }
    if let Some(other) = peers
        .peers
        .iter()
        .find(|other| other.name.eq_ignore_ascii_case(&peer.name))
    {
        return Err(loc.diag(
            format!(
                "cache_peer name already used at {}:{} (give each parent its own name=)",
                other.loc.file, other.loc.line
            ),
            &peer.name,
        ));
    }
    peers.peers.push(peer);
    peers.access.push(Vec::new());
    Ok(())
}

/// Where an `allow|deny ACL…` line goes.
pub(super) enum RuleList {
    /// `cache_peer_access NAME …`.
    PeerAccess,
    /// `never_direct …`.
    NeverDirect,
    /// `always_direct …`.
    AlwaysDirect,
}

/// Adds one `cache_peer_access`, `never_direct` or `always_direct` line, whose
/// ACLs `acl_refs` resolves.
pub(super) fn rule(
    peers: &mut Peers,
    line: &SourceLine,
    args: &[Token],
    list: RuleList,
    acl_refs: impl FnOnce(&[Token]) -> Result<Vec<AclRef>, Diagnostic>,
) -> Result<(), Diagnostic> {
    let loc = &line.loc;
    let (target, args) = match list {
        RuleList::PeerAccess => {
            let Some((name, rest)) = args.split_first() else {
                return Err(loc.diag(
                    "expected: cache_peer_access PEER allow|deny ACL…",
                    &line.text,
                ));
            };
            let index = peers
                .peers
                .iter()
                .position(|peer| peer.name.eq_ignore_ascii_case(name.text()))
                .ok_or_else(|| {
                    loc.diag(
                        "no cache_peer with this name (a cache_peer line must define it before this line)",
                        name.text(),
                    )
                })?;
            (Some(index), rest)
        }
        _ => (None, args),
    };
    let Some((action, names)) = args.split_first() else {
        return Err(loc.diag("expected allow|deny ACL…", &line.text));
    };
    let allow = match action.text() {
        "allow" => true,
        "deny" => false,
        other => return Err(loc.diag("expected allow or deny", other)),
    };
    let acls = acl_refs(names)?;
    if acls.is_empty() {
        return Err(loc.diag(
            "at least one ACL is needed (use 'all' to match every request)",
            &line.text,
        ));
    }
    let prefix = match (&list, target) {
        (RuleList::PeerAccess, Some(index)) => {
            format!("cache_peer_access {}", peers.peers[index].name)
        }
        (RuleList::NeverDirect, _) => "never_direct".into(),
        _ => "always_direct".into(),
    };
    let rule = PeerRule {
        allow,
        acls,
        prefix,
        loc: loc.clone(),
        text: line.text.clone(),
    };
    match (list, target) {
        (RuleList::PeerAccess, Some(index)) => peers.access[index].push(rule),
        (RuleList::NeverDirect, _) => peers.never_direct.push(rule),
        _ => peers.always_direct.push(rule),
    }
    Ok(())
}

/// At the end of the file, without any `cache_peer`: a warning for each
/// `never_direct` line (what it matches cannot be forwarded at all: 503, as
/// in Squid) and each `always_direct` line (no effect: everything goes
/// DIRECT anyway).
pub(super) fn finish(peers: &Peers, warnings: &mut Vec<Diagnostic>) {
    if !peers.peers.is_empty() {
        return;
    }
    for rule in &peers.never_direct {
        warnings.push(rule.loc.diag(
            "without cache_peer lines, the requests it matches have no route and get 503 (as in Squid)",
            &rule.text,
        ));
    }
    for rule in &peers.always_direct {
        warnings.push(rule.loc.diag(
            "no effect without cache_peer lines (every request goes DIRECT)",
            &rule.text,
        ));
    }
}

/// Parses `on|off` for `prefer_direct` and `nonhierarchical_direct`.
pub(super) fn on_off(line: &SourceLine, args: &[Token]) -> Result<bool, Diagnostic> {
    match args {
        [value] if value.text() == "on" => Ok(true),
        [value] if value.text() == "off" => Ok(false),
        _ => Err(line.loc.diag("expected on or off", &line.text)),
    }
}

/// Whether Squid sends a request up the hierarchy (`clientHierarchical`):
/// `GET` and `TRACE` without `Authorization`; CONNECT and every other method
/// go to parents only under `never_direct` or `nonhierarchical_direct off`.
pub fn is_hierarchical(method: &str, has_authorization: bool) -> bool {
    !has_authorization && matches!(method, "GET" | "TRACE")
}
