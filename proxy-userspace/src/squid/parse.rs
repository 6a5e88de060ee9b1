//! Turning logical lines into a [`SquidConfig`]: one handler per directive, and
//! the tables of directives that are ignored (with a warning) or refused.

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Duration};

use super::{
    access::{AccessRule, AclRef},
    acl::{self, Acl, AclKind, TypeInfo},
    auth::{self, BasicAuth},
    auth_children::HelperChildren,
    peers::{self, RuleList},
    proxy_protocol::{self, ProxyProtocolRule},
    reader::{read_value_file, resolve, rest_after, tokenize, Loc, Reader, SourceLine, Token},
    ssl_bump::{BumpAction, SniCheck, TlsRule},
    AccessLogTarget, ConfigError, Diagnostic, HttpPort, LoadedConfig, LogFormat, SquidConfig,
    Timeouts,
};

const WHY_PROCESS: &str = "process and file housekeeping that spliced does not need";
const WHY_SQUID_LOGS: &str = "Squid's own logs; spliced logs diagnostics to standard error";
const WHY_CACHING: &str = "spliced tunnels and never caches";
const WHY_ICP: &str = "spliced speaks no ICP, HTCP or SNMP";
const WHY_PEERS: &str = "spliced caches nothing, so every request may go up the hierarchy";
const WHY_HEADERS: &str =
    "spliced rewrites no HTTP header fields beyond hop-by-hop ones, via and forwarded_for";
const WHY_REPLY: &str = "a tunnel has no HTTP reply to check";
const WHY_ERROR_PAGES: &str = "spliced's error answers are fixed plain text";
const WHY_DNS: &str = "spliced's resolver has no such setting";
const WHY_PCONN: &str = "spliced keeps no idle HTTP connections";
const WHY_LIMITS: &str = "spliced applies its own fixed limits";
const WHY_AUTH_CACHE: &str = "spliced checks credentials on every request and caches no result";
const WHY_FTP: &str = "spliced does not speak FTP";
const WHY_NO_TLS_ORIGIN: &str = "spliced never originates TLS; tunnels carry the client's TLS";
const WHY_HELPER_DEF: &str =
    "spliced runs no helper programs, so ACLs of type external cannot be used in http_access";
const WHY_NO_MGR: &str = "spliced has no cache manager";
const WHY_NO_CERTS: &str =
    "spliced never decrypts (ssl_bump peeks at the ClientHello only), so it makes and checks no certificates";

/// Directives accepted with a warning, and why they have no effect.
const IGNORED: &[(&str, &str)] = &[
    ("coredump_dir", WHY_PROCESS),
    ("pid_filename", WHY_PROCESS),
    ("cache_effective_user", WHY_PROCESS),
    ("cache_effective_group", WHY_PROCESS),
    ("workers", WHY_PROCESS),
    ("cpu_affinity_map", WHY_PROCESS),
    ("memory_pools", WHY_PROCESS),
    ("memory_pools_limit", WHY_PROCESS),
    ("pinger_enable", WHY_PROCESS),
    ("pinger_program", WHY_PROCESS),
    ("umask", WHY_PROCESS),
    ("max_filedescriptors", WHY_PROCESS),
    ("mime_table", WHY_PROCESS),
    ("icon_directory", WHY_PROCESS),
    ("netdb_filename", WHY_PROCESS),
    ("unlinkd_program", WHY_PROCESS),
    ("high_memory_warning", WHY_PROCESS),
    ("cache_log", WHY_SQUID_LOGS),
    ("cache_store_log", WHY_SQUID_LOGS),
    ("logfile_rotate", WHY_SQUID_LOGS),
    ("logfile_daemon", WHY_SQUID_LOGS),
    ("debug_options", WHY_SQUID_LOGS),
    ("buffered_logs", WHY_SQUID_LOGS),
    ("strip_query_terms", WHY_SQUID_LOGS),
    ("log_mime_hdrs", WHY_SQUID_LOGS),
    ("log_icp_queries", WHY_SQUID_LOGS),
    ("cache_dir", WHY_CACHING),
    ("cache_mem", WHY_CACHING),
    ("cache_swap_low", WHY_CACHING),
    ("cache_swap_high", WHY_CACHING),
    ("cache_replacement_policy", WHY_CACHING),
    ("memory_replacement_policy", WHY_CACHING),
    ("memory_cache_mode", WHY_CACHING),
    ("maximum_object_size", WHY_CACHING),
    ("minimum_object_size", WHY_CACHING),
    ("maximum_object_size_in_memory", WHY_CACHING),
    ("refresh_pattern", WHY_CACHING),
    ("cache", WHY_CACHING),
    ("send_hit", WHY_CACHING),
    ("store_miss", WHY_CACHING),
    ("collapsed_forwarding", WHY_CACHING),
    ("quick_abort_min", WHY_CACHING),
    ("quick_abort_max", WHY_CACHING),
    ("quick_abort_pct", WHY_CACHING),
    ("range_offset_limit", WHY_CACHING),
    ("negative_ttl", WHY_CACHING),
    ("reload_into_ims", WHY_CACHING),
    ("max_stale", WHY_CACHING),
    ("minimum_expiry_time", WHY_CACHING),
    ("offline_mode", WHY_CACHING),
    ("icp_port", WHY_ICP),
    ("htcp_port", WHY_ICP),
    ("snmp_port", WHY_ICP),
    ("icp_access", WHY_ICP),
    ("htcp_access", WHY_ICP),
    ("htcp_clr_access", WHY_ICP),
    ("snmp_access", WHY_ICP),
    ("snmp_incoming_address", WHY_ICP),
    ("snmp_outgoing_address", WHY_ICP),
    ("udp_incoming_address", WHY_ICP),
    ("udp_outgoing_address", WHY_ICP),
    ("icp_query_timeout", WHY_ICP),
    ("mcast_groups", WHY_ICP),
    ("hierarchy_stoplist", WHY_PEERS),
    ("request_header_access", WHY_HEADERS),
    ("reply_header_access", WHY_HEADERS),
    ("request_header_replace", WHY_HEADERS),
    ("reply_header_replace", WHY_HEADERS),
    ("header_replace", WHY_HEADERS),
    ("request_header_add", WHY_HEADERS),
    ("reply_header_add", WHY_HEADERS),
    ("http_reply_access", WHY_REPLY),
    ("reply_body_max_size", WHY_REPLY),
    ("reply_header_max_size", WHY_REPLY),
    ("visible_hostname", WHY_ERROR_PAGES),
    ("unique_hostname", WHY_ERROR_PAGES),
    ("cache_mgr", WHY_ERROR_PAGES),
    ("error_directory", WHY_ERROR_PAGES),
    ("error_default_language", WHY_ERROR_PAGES),
    ("err_page_stylesheet", WHY_ERROR_PAGES),
    ("err_html_text", WHY_ERROR_PAGES),
    ("deny_info", WHY_ERROR_PAGES),
    ("email_err_data", WHY_ERROR_PAGES),
    ("httpd_suppress_version_string", WHY_ERROR_PAGES),
    ("cachemgr_passwd", WHY_NO_MGR),
    ("dns_v4_first", WHY_DNS),
    ("ipcache_low", WHY_DNS),
    ("ipcache_high", WHY_DNS),
    ("fqdncache_size", WHY_DNS),
    ("dns_retransmit_interval", WHY_DNS),
    ("dns_defnames", WHY_DNS),
    ("append_domain", WHY_DNS),
    ("check_hostnames", WHY_DNS),
    ("allow_underscore", WHY_DNS),
    ("client_persistent_connections", WHY_PCONN),
    ("server_persistent_connections", WHY_PCONN),
    ("persistent_request_timeout", WHY_PCONN),
    ("pconn_timeout", WHY_PCONN),
    ("half_closed_clients", WHY_PCONN),
    ("detect_broken_pconn", WHY_PCONN),
    ("client_db", WHY_LIMITS),
    ("tcp_recv_bufsize", WHY_LIMITS),
    ("request_header_max_size", WHY_LIMITS),
    ("request_body_max_size", WHY_LIMITS),
    ("relaxed_header_parser", WHY_LIMITS),
    ("forward_max_tries", WHY_LIMITS),
    ("connect_retries", WHY_LIMITS),
    ("forward_timeout", WHY_LIMITS),
    ("authenticate_ttl", WHY_AUTH_CACHE),
    ("authenticate_ip_ttl", WHY_AUTH_CACHE),
    ("authenticate_cache_garbage_interval", WHY_AUTH_CACHE),
    ("ftp_user", WHY_FTP),
    ("ftp_passive", WHY_FTP),
    ("ftp_sanitycheck", WHY_FTP),
    ("tls_outgoing_options", WHY_NO_TLS_ORIGIN),
    ("sslcrtd_program", WHY_NO_CERTS),
    ("sslcrtd_children", WHY_NO_CERTS),
    ("external_acl_type", WHY_HELPER_DEF),
];

/// Directives refused, and why ignoring them would be wrong.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "https_port",
        "TLS towards clients is not supported; use http_port",
    ),
    (
        "cache_peer_domain",
        "cache_peer_domain is not supported; use cache_peer_access with a dstdomain ACL",
    ),
    (
        "tcp_outgoing_address",
        "choosing the outgoing address is not supported",
    ),
    (
        "tcp_outgoing_tos",
        "marking outgoing connections is not supported",
    ),
    (
        "tcp_outgoing_mark",
        "marking outgoing connections is not supported",
    ),
    (
        "follow_x_forwarded_for",
        "client addresses are never taken from X-Forwarded-For",
    ),
    (
        "miss_access",
        "miss_access is not evaluated; put the rule in http_access",
    ),
    (
        "delay_pools",
        "bandwidth limits (delay pools) are not supported",
    ),
    (
        "delay_class",
        "bandwidth limits (delay pools) are not supported",
    ),
    (
        "delay_parameters",
        "bandwidth limits (delay pools) are not supported",
    ),
    (
        "delay_access",
        "bandwidth limits (delay pools) are not supported",
    ),
    (
        "client_delay_pools",
        "bandwidth limits (delay pools) are not supported",
    ),
    ("url_rewrite_program", "URL rewriting helpers are not run"),
    ("url_rewrite_access", "URL rewriting helpers are not run"),
    ("url_rewrite_children", "URL rewriting helpers are not run"),
    ("store_id_program", "store ID helpers are not run"),
    ("icap_enable", "content adaptation (ICAP) is not supported"),
    ("icap_service", "content adaptation (ICAP) is not supported"),
    ("ecap_enable", "content adaptation (eCAP) is not supported"),
    ("ecap_service", "content adaptation (eCAP) is not supported"),
    ("adaptation_access", "content adaptation is not supported"),
    (
        "ident_lookup_access",
        "ident (RFC 931) lookups are not supported",
    ),
    (
        "if",
        "conditional configuration (if/else/endif) is not supported",
    ),
    (
        "else",
        "conditional configuration (if/else/endif) is not supported",
    ),
    (
        "endif",
        "conditional configuration (if/else/endif) is not supported",
    ),
];

/// `http_port` options that select a mode spliced does not have.
const PORT_MODES: &[&str] = &["intercept", "transparent", "tproxy", "accel"];

/// `http_port` options of SslBump's certificate generation: accepted with a
/// warning (peek and splice need no certificate).
const PORT_CERT_OPTIONS: &[&str] = &[
    "cert=",
    "key=",
    "tls-cert=",
    "tls-key=",
    "generate-host-certificates",
    "dynamic_cert_mem_cache_size=",
    "tls-dh=",
    "dhparams=",
    "cafile=",
    "tls-cafile=",
    "capath=",
    "options=",
    "tls-options=",
    "sslflags=",
    "tls-default-ca",
    "cipher=",
];

/// Parses what the reader collected.
pub(super) fn parse(reader: Reader) -> Result<LoadedConfig, ConfigError> {
    let mut parser = Parser::new(reader.warnings);
    for line in &reader.lines {
        parser.line(line)?;
    }
    Ok(parser.finish()?)
}

/// `auth_param basic` settings given before or after the `program` line.
#[derive(Default)]
struct AuthSettings {
    realm: Option<String>,
    case_sensitive: Option<bool>,
    children: Option<HelperChildren>,
    credentials_ttl: Option<Duration>,
    utf8: Option<bool>,
    /// The first `auth_param` line, for diagnostics.
    first: Option<Loc>,
}

struct Parser {
    config: SquidConfig,
    warnings: Vec<Diagnostic>,
    /// Lower-cased ACL name → index (Squid's ACL names are case-insensitive).
    acl_names: HashMap<String, usize>,
    /// `access_log` lines: path (`None` for `none`), format name, location.
    access_logs: Vec<(Option<PathBuf>, String, Loc)>,
    auth_settings: AuthSettings,
}

impl Parser {
    fn new(warnings: Vec<Diagnostic>) -> Self {
        let acls = acl::predefined();
        let acl_names = acls
            .iter()
            .enumerate()
            .map(|(index, acl)| (acl.name.to_ascii_lowercase(), index))
            .collect();
        Self {
            config: SquidConfig {
                http_ports: Vec::new(),
                access_logs: Vec::new(),
                logformats: Vec::new(),
                timeouts: Timeouts::default(),
                client_ip_max_connections: None,
                dns_nameservers: Vec::new(),
                dns: Default::default(),
                auth: None,
                acls,
                rules: Vec::new(),
                tls: Default::default(),
                headers: Default::default(),
                proxy_protocol: Vec::new(),
                peers: Default::default(),
            },
            warnings,
            acl_names,
            access_logs: Vec::new(),
            auth_settings: AuthSettings::default(),
        }
    }

    fn line(&mut self, line: &SourceLine) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let directive = line.text.split_whitespace().next().unwrap_or_default();
        // These take the rest of the line raw: `#` and quotes are theirs.
        match directive {
            "logformat" => return self.logformat(line),
            "auth_param" => return self.auth_param(line),
            _ => {}
        }
        let tokens = tokenize(&line.text).map_err(|message| loc.diag(message, &line.text))?;
        let args = tokens.get(1..).unwrap_or_default();
        match directive {
            "http_port" => self.http_port(line, args),
            "acl" => self.acl(line, args),
            "http_access" => self.http_access(line, args),
            "proxy_protocol_access" => self.proxy_protocol_access(line, args),
            "ssl_bump" | "on_unsupported_protocol" => self.tls_rule(line, args, directive),
            "sni_must_match_connect" => {
                let [value] = args else {
                    return Err(loc.diag("expected exact, same_dstdomain or off", &line.text));
                };
                self.config.tls.sni_check =
                    SniCheck::parse(value.text()).map_err(|why| loc.diag(why, value.text()))?;
                Ok(())
            }
            "access_log" => self.access_log(line, args),
            // Parent proxies (`peers.rs`).
            "cache_peer" => {
                peers::cache_peer(&mut self.config.peers, line, args, &mut self.warnings)
            }
            "cache_peer_access" | "never_direct" | "always_direct" => {
                let list = match directive {
                    "cache_peer_access" => RuleList::PeerAccess,
                    "never_direct" => RuleList::NeverDirect,
                    _ => RuleList::AlwaysDirect,
                };
                let mut peers = std::mem::take(&mut self.config.peers);
                let added = peers::rule(&mut peers, line, args, list, |names| {
                    self.acl_refs(line, names, directive)
                });
                self.config.peers = peers;
                added
            }
            "prefer_direct" => {
                self.config.peers.prefer_direct = peers::on_off(line, args)?;
                Ok(())
            }
            "nonhierarchical_direct" => {
                self.config.peers.nonhierarchical_direct = peers::on_off(line, args)?;
                Ok(())
            }
            // Plain-HTTP forwarding (`http_forward`).
            "via" => {
                self.config.headers.via = match args {
                    [value] if value.text() == "on" => true,
                    [value] if value.text() == "off" => false,
                    _ => return Err(loc.diag("expected on or off", &line.text)),
                };
                Ok(())
            }
            "forwarded_for" => {
                let [value] = args else {
                    return Err(loc.diag("expected on, off, delete or transparent", &line.text));
                };
                self.config.headers.forwarded_for = value.text().parse().map_err(
                    |err: crate::http_forward::headers::BadForwardedFor| {
                        loc.diag(err.to_string(), value.text())
                    },
                )?;
                Ok(())
            }
            "connect_timeout" | "read_timeout" | "client_lifetime" | "request_timeout"
            | "shutdown_lifetime" | "dns_timeout" => {
                let value =
                    parse_time_value(args).map_err(|message| loc.diag(message, &line.text))?;
                let timeouts = &mut self.config.timeouts;
                let slot = match directive {
                    "connect_timeout" => &mut timeouts.connect,
                    "read_timeout" => &mut timeouts.read,
                    "client_lifetime" => &mut timeouts.client_lifetime,
                    "request_timeout" => &mut timeouts.request,
                    "shutdown_lifetime" => &mut timeouts.shutdown_lifetime,
                    _ => &mut timeouts.dns,
                };
                *slot = Some(value);
                Ok(())
            }
            "client_ip_max_connections" => {
                let [value] = args else {
                    return Err(loc.diag("expected one number", &line.text));
                };
                self.config.client_ip_max_connections = match value.text() {
                    "-1" => None,
                    text => Some(text.parse::<u32>().map_err(|_| {
                        loc.diag("expected a connection count, or -1 for no limit", text)
                    })?),
                };
                Ok(())
            }
            "dns_nameservers" => {
                if args.is_empty() {
                    return Err(loc.diag("expected one or more IP addresses", &line.text));
                }
                for arg in args {
                    let ip = arg
                        .text()
                        .parse::<IpAddr>()
                        .map_err(|_| loc.diag("not an IP address", arg.text()))?;
                    self.config.dns_nameservers.push(ip);
                }
                Ok(())
            }
            _ if super::dns::DIRECTIVES.contains(&directive) => self
                .config
                .dns
                .apply(directive, args)
                .map_err(|message| loc.diag(message, &line.text)),
            _ => {
                if let Some((_, why)) = IGNORED.iter().find(|(name, _)| *name == directive) {
                    self.warnings.push(loc.diag(
                        format!("directive has no effect in spliced ({why}); ignored"),
                        &line.text,
                    ));
                    Ok(())
                } else if let Some((_, why)) =
                    UNSUPPORTED.iter().find(|(name, _)| *name == directive)
                {
                    Err(loc.diag(format!("directive not supported: {why}"), &line.text))
                } else if directive.starts_with("sslproxy_") {
                    self.warnings.push(loc.diag(
                        format!("directive has no effect in spliced ({WHY_NO_CERTS}); ignored"),
                        &line.text,
                    ));
                    Ok(())
                } else {
                    Err(loc.diag("unknown directive", &line.text))
                }
            }
        }
    }

    fn http_port(&mut self, line: &SourceLine, args: &[Token]) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let Some((first, options)) = args.split_first() else {
            return Err(loc.diag("expected [ADDRESS:]PORT", &line.text));
        };
        let text = first.text();
        let (addr, port) = if let Some(rest) = text.strip_prefix('[') {
            let (addr, port) = rest
                .split_once("]:")
                .ok_or_else(|| loc.diag("expected [IPV6]:PORT", text))?;
            let addr = addr
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| loc.diag("not an IPv6 address", text))?;
            (Some(IpAddr::V6(addr)), port)
        } else if let Some((addr, port)) = text.rsplit_once(':') {
            let addr = addr.parse::<std::net::Ipv4Addr>().map_err(|_| {
                loc.diag(
                    "not an IP address (host names are not resolved; bracket IPv6 addresses)",
                    text,
                )
            })?;
            (Some(IpAddr::V4(addr)), port)
        } else {
            (None, text)
        };
        let port = match port.parse::<u16>() {
            Ok(number) if number != 0 && port.bytes().all(|b| b.is_ascii_digit()) => number,
            _ => return Err(loc.diag("expected a port number 1-65535", text)),
        };
        let mut name = None;
        let mut require_proxy_header = false;
        for option in options {
            let option = option.text();
            if let Some(value) = option.strip_prefix("name=") {
                name = Some(value.to_owned());
            } else if option == "require-proxy-header" {
                require_proxy_header = true;
            } else if option == "ssl-bump"
                || PORT_CERT_OPTIONS
                    .iter()
                    .any(|prefix| option.starts_with(prefix))
            {
                self.warnings.push(loc.diag(
                    format!("http_port option has no effect in spliced ({WHY_NO_CERTS}); ssl_bump rules apply on every port"),
                    option,
                ));
            } else if PORT_MODES.contains(&option) {
                return Err(loc.diag(
                    "http_port mode not supported: spliced is a plain forward proxy",
                    option,
                ));
            } else {
                return Err(loc.diag(
                    "http_port option not supported (only name=NAME, require-proxy-header, and ssl-bump with its certificate options, are accepted)",
                    option,
                ));
            }
        }
        self.config.http_ports.push(HttpPort {
            addr,
            port,
            name,
            require_proxy_header,
        });
        Ok(())
    }

    fn acl(&mut self, line: &SourceLine, args: &[Token]) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let [name, type_token, values @ ..] = args else {
            return Err(loc.diag("expected: acl NAME TYPE VALUE…", &line.text));
        };
        let name = name.text();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(loc.diag("bad ACL name (letters, digits, - _ . : only)", name));
        }
        let type_name = type_token.text();
        let info =
            acl::type_info(type_name).ok_or_else(|| loc.diag("unknown ACL type", type_name))?;
        let key = name.to_ascii_lowercase();
        let existing = self.acl_names.get(&key).copied();
        let (canonical, reason) = match info {
            TypeInfo::Supported(canonical) => (canonical, None),
            TypeInfo::Unsupported(reason) => (type_name, Some(reason)),
        };
        if let Some(index) = existing {
            let acl = &self.config.acls[index];
            if acl.kind.type_name() != canonical {
                if matches!(acl.kind, AclKind::Manager) && is_legacy_manager(canonical, values) {
                    self.warnings.push(loc.diag(
                        "'manager' is built in (Squid 3.2 and later); this old definition is ignored",
                        &line.text,
                    ));
                    return Ok(());
                }
                let defined = match &acl.loc {
                    Some(at) => format!("at {}:{}", at.file, at.line),
                    None => "built in".to_owned(),
                };
                return Err(loc.diag(
                    format!(
                        "ACL '{}' is already defined with type {} ({defined})",
                        acl.name,
                        acl.kind.type_name()
                    ),
                    type_name,
                ));
            }
        }
        if let Some(reason) = reason {
            self.warnings.push(loc.diag(
                format!(
                    "ACL type {type_name} cannot be evaluated by spliced ({reason}); \
                     an http_access line using ACL '{name}' is an error"
                ),
                type_name,
            ));
            if existing.is_none() {
                self.add_acl(Acl {
                    name: name.to_owned(),
                    kind: AclKind::Unsupported {
                        type_name: type_name.to_owned(),
                        reason,
                    },
                    builtin_values: 0,
                    loc: Some(loc.clone()),
                });
            }
            return Ok(());
        }
        // Expand "FILE" tokens into the values they hold.
        let mut words = Vec::new();
        let mut from_file = false;
        for value in values {
            match value {
                Token::Word(word) => words.push((word.clone(), loc.clone())),
                Token::Quoted(file) => {
                    from_file = true;
                    words.extend(read_value_file(&resolve(&line.dir, file), loc)?);
                }
            }
        }
        let index = match existing {
            Some(index) => index,
            None => self.add_acl(Acl {
                name: name.to_owned(),
                kind: AclKind::empty(canonical),
                builtin_values: 0,
                loc: Some(loc.clone()),
            }),
        };
        let acl = &mut self.config.acls[index];
        if acl.loc.is_none() {
            acl.loc = Some(loc.clone());
        }
        let added = acl.kind.add_values(&words, &mut self.warnings)?;
        if added == 0 {
            if from_file {
                self.warnings
                    .push(loc.diag("the ACL value file holds no values", &line.text));
            } else {
                return Err(loc.diag("the acl line has no values", &line.text));
            }
        }
        Ok(())
    }

    fn add_acl(&mut self, acl: Acl) -> usize {
        let index = self.config.acls.len();
        self.acl_names.insert(acl.name.to_ascii_lowercase(), index);
        self.config.acls.push(acl);
        index
    }

    fn http_access(&mut self, line: &SourceLine, args: &[Token]) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let Some((action, names)) = args.split_first() else {
            return Err(loc.diag("expected: http_access allow|deny ACL…", &line.text));
        };
        let allow = match action.text() {
            "allow" => true,
            "deny" => false,
            other => return Err(loc.diag("expected allow or deny", other)),
        };
        let acls = self.acl_refs(line, names, "http_access")?;
        if acls.is_empty() {
            return Err(loc.diag(
                "http_access needs at least one ACL (use 'all' to match every request)",
                &line.text,
            ));
        }
        self.config.rules.push(AccessRule {
            allow,
            acls,
            loc: loc.clone(),
        });
        Ok(())
    }

    /// `proxy_protocol_access allow|deny ACL…`: connection-level ACLs only.
    fn proxy_protocol_access(
        &mut self,
        line: &SourceLine,
        args: &[Token],
    ) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let Some((action, names)) = args.split_first() else {
            return Err(loc.diag(
                "expected: proxy_protocol_access allow|deny ACL…",
                &line.text,
            ));
        };
        let allow = match action.text() {
            "allow" => true,
            "deny" => false,
            other => return Err(loc.diag("expected allow or deny", other)),
        };
        let acls = self.acl_refs(line, names, "proxy_protocol_access")?;
        if acls.is_empty() {
            return Err(loc.diag(
                "proxy_protocol_access needs at least one ACL (use 'all' to match every peer)",
                &line.text,
            ));
        }
        if let Some(acl) = acls
            .iter()
            .find(|acl| !proxy_protocol::usable(&self.config.acls[acl.index].kind))
        {
            return Err(loc.diag(
                "proxy_protocol_access sees the TCP connection only: use src, localip, localport or time ACLs",
                &acl.name,
            ));
        }
        self.config.proxy_protocol.push(ProxyProtocolRule {
            allow,
            acls,
            loc: loc.clone(),
        });
        Ok(())
    }

    /// The ACLs named on a rule line (`[!]NAME…`), each defined before it.
    fn acl_refs(
        &self,
        line: &SourceLine,
        names: &[Token],
        directive: &str,
    ) -> Result<Vec<AclRef>, Diagnostic> {
        let loc = &line.loc;
        let mut acls = Vec::new();
        let mut negate_next = false;
        for token in names {
            let text = token.text();
            if text == "!" {
                negate_next = true;
                continue;
            }
            let (negated, name) = match text.strip_prefix('!') {
                Some(name) => (true, name),
                None => (negate_next, text),
            };
            negate_next = false;
            let index = *self
                .acl_names
                .get(&name.to_ascii_lowercase())
                .ok_or_else(|| {
                    loc.diag(
                        "ACL is not defined (an acl line must define it before this line)",
                        name,
                    )
                })?;
            if let AclKind::Unsupported { type_name, reason } = &self.config.acls[index].kind {
                return Err(loc.diag(
                    format!("ACL type {type_name} cannot be used in {directive}: {reason}"),
                    name,
                ));
            }
            acls.push(AclRef {
                negated,
                index,
                name: name.to_owned(),
            });
        }
        if negate_next {
            return Err(loc.diag("'!' must be followed by an ACL name", &line.text));
        }
        Ok(acls)
    }

    /// `ssl_bump ACTION ACL…` and `on_unsupported_protocol tunnel|respond ACL…`.
    fn tls_rule(
        &mut self,
        line: &SourceLine,
        args: &[Token],
        directive: &str,
    ) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let Some((action, names)) = args.split_first() else {
            return Err(loc.diag(format!("expected: {directive} ACTION ACL…"), &line.text));
        };
        let acls = self.acl_refs(line, names, directive)?;
        if acls.is_empty() {
            return Err(loc.diag(
                format!("{directive} needs at least one ACL (use 'all' to match every tunnel)"),
                &line.text,
            ));
        }
        let tls = &mut self.config.tls;
        if directive == "ssl_bump" {
            let action =
                BumpAction::parse(action.text()).map_err(|why| loc.diag(why, action.text()))?;
            tls.bump.push(TlsRule {
                action,
                acls,
                loc: loc.clone(),
            });
        } else {
            let tunnel = match action.text() {
                "tunnel" => true,
                "respond" => false,
                other => return Err(loc.diag("expected tunnel or respond", other)),
            };
            tls.unsupported.push(TlsRule {
                action: tunnel,
                acls,
                loc: loc.clone(),
            });
        }
        Ok(())
    }

    fn access_log(&mut self, line: &SourceLine, args: &[Token]) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let Some((place, options)) = args.split_first() else {
            return Err(loc.diag(
                "expected: access_log PATH [FORMAT] or access_log none",
                &line.text,
            ));
        };
        let place = place.text();
        if place == "none" {
            if let Some(extra) = options.first() {
                return Err(loc.diag("access_log ACL filters are not supported", extra.text()));
            }
            self.access_logs.push((None, String::new(), loc.clone()));
            return Ok(());
        }
        let path = place
            .strip_prefix("stdio:")
            .or_else(|| place.strip_prefix("daemon:"))
            .unwrap_or(place);
        if let Some((module, _)) = path.split_once(':') {
            if !module.contains('/') {
                return Err(loc.diag(
                    "access_log module not supported (only files, stdio: and daemon:)",
                    place,
                ));
            }
        }
        if path.is_empty() {
            return Err(loc.diag("empty access_log path", place));
        }
        let mut format = None;
        for option in options {
            let option = option.text();
            if let Some(name) = option.strip_prefix("logformat=") {
                format = Some(name.to_owned());
            } else if let Some((key, _)) = option.split_once('=') {
                if ["buffer-size", "on-error", "rotate"].contains(&key) {
                    self.warnings.push(loc.diag(
                        "access_log option has no effect in spliced; ignored",
                        option,
                    ));
                } else {
                    return Err(loc.diag("unknown access_log option", option));
                }
            } else if format.is_none() {
                format = Some(option.to_owned());
            } else {
                return Err(loc.diag("access_log ACL filters are not supported", option));
            }
        }
        self.access_logs.push((
            Some(PathBuf::from(path)),
            format.unwrap_or_else(|| "squid".to_owned()),
            loc.clone(),
        ));
        Ok(())
    }

    fn logformat(&mut self, line: &SourceLine) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let name = line.text.split_whitespace().nth(1).unwrap_or_default();
        let spec = rest_after(&line.text, 2);
        if name.is_empty() || spec.is_empty() {
            return Err(loc.diag("expected: logformat NAME SPECIFICATION", &line.text));
        }
        if LogFormat::is_builtin(name) {
            return Err(loc.diag("a built-in logformat cannot be redefined", name));
        }
        if self
            .config
            .logformats
            .iter()
            .any(|format| format.name == name)
        {
            return Err(loc.diag("logformat defined twice", name));
        }
        let format = LogFormat::parse(name, spec).map_err(|message| {
            let (message, text) = match message.rsplit_once(": ") {
                Some((message, code)) => (message.to_owned(), code.to_owned()),
                None => (message, spec.to_owned()),
            };
            loc.diag(message, text)
        })?;
        self.config.logformats.push(format);
        Ok(())
    }

    fn auth_param(&mut self, line: &SourceLine) -> Result<(), Diagnostic> {
        let loc = &line.loc;
        let words: Vec<&str> = line.text.split_whitespace().collect();
        let (scheme, parameter) = match words.as_slice() {
            [_, scheme, parameter, _, ..] => (*scheme, *parameter),
            _ => return Err(loc.diag("expected: auth_param SCHEME PARAMETER VALUE", &line.text)),
        };
        if scheme != "basic" {
            return Err(loc.diag("authentication scheme not supported (only basic)", scheme));
        }
        let value = rest_after(&line.text, 3);
        let settings = &mut self.auth_settings;
        settings.first.get_or_insert_with(|| loc.clone());
        let on_off = |text: &str| match text {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(loc.diag("expected on or off", text)),
        };
        match parameter {
            "program" => {
                let program = PathBuf::from(words[3]);
                if !auth::is_ncsa_helper(&program) {
                    return Err(loc.diag(
                        "authentication helper not supported: spliced runs no helpers and \
                         reads only basic_ncsa_auth password files itself",
                        words[3],
                    ));
                }
                let [file] = &words[4..] else {
                    return Err(loc.diag(
                        "basic_ncsa_auth takes exactly one argument, the password file",
                        &line.text,
                    ));
                };
                let password_file = resolve(&line.dir, file);
                self.config.auth = Some(BasicAuth::load(
                    program,
                    password_file,
                    &mut self.warnings,
                    loc,
                )?);
            }
            "realm" => {
                let realm = value
                    .strip_prefix('"')
                    .and_then(|inner| inner.strip_suffix('"'))
                    .unwrap_or(value);
                if realm.is_empty()
                    || realm.contains(['"', '\\'])
                    || realm.chars().any(char::is_control)
                {
                    return Err(loc.diag(
                        "bad realm (no quotes, backslashes or control characters)",
                        value,
                    ));
                }
                settings.realm = Some(realm.to_owned());
            }
            "children" => {
                let children = HelperChildren::parse(&words[3..])
                    .map_err(|(message, word)| loc.diag(message, word))?;
                if !children.ignored.is_empty() {
                    self.warnings.push(loc.diag(
                        "no effect: no helper processes run (children N sizes the pool \
                         that verifies password hashes)",
                        children.ignored.join(" "),
                    ));
                }
                settings.children = Some(children);
            }
            "credentialsttl" => {
                let tokens: Vec<Token> = words[3..]
                    .iter()
                    .map(|w| Token::Word((*w).to_owned()))
                    .collect();
                settings.credentials_ttl =
                    Some(parse_time_value(&tokens).map_err(|message| loc.diag(message, value))?);
            }
            "casesensitive" => settings.case_sensitive = Some(on_off(value)?),
            "utf8" => {
                settings.utf8 = Some(on_off(value)?);
                self.warnings
                    .push(loc.diag("no effect: credentials must be UTF-8", &line.text));
            }
            other => return Err(loc.diag("unknown auth_param basic parameter", other)),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<LoadedConfig, Diagnostic> {
        peers::finish(&self.config.peers, &mut self.warnings);
        for (path, format_name, loc) in std::mem::take(&mut self.access_logs) {
            let target = match path {
                None => AccessLogTarget::None,
                Some(path) => AccessLogTarget::File {
                    path,
                    format: self
                        .config
                        .logformat(&format_name)
                        .ok_or_else(|| loc.diag("unknown logformat", &format_name))?,
                },
            };
            self.config.access_logs.push(target);
        }
        let settings = std::mem::take(&mut self.auth_settings);
        match &mut self.config.auth {
            Some(auth) => {
                if let Some(realm) = settings.realm {
                    auth.realm = realm;
                }
                auth.case_sensitive = settings.case_sensitive.unwrap_or(false);
                auth.children = settings.children;
                auth.credentials_ttl = settings.credentials_ttl;
                auth.utf8 = settings.utf8;
                self.warnings.extend(auth.case_warnings());
            }
            None => {
                if let Some(acl) = self.config.acls.iter().find(|acl| acl.kind.is_auth()) {
                    let loc = acl.loc.clone().unwrap_or_else(|| Loc {
                        file: "".into(),
                        line: 0,
                    });
                    return Err(loc.diag(
                        "proxy_auth ACLs need 'auth_param basic program …/basic_ncsa_auth FILE'",
                        &acl.name,
                    ));
                }
                if let Some(loc) = settings.first {
                    self.warnings.push(loc.diag(
                        "auth_param basic settings have no effect without 'auth_param basic program'",
                        "auth_param",
                    ));
                }
            }
        }
        Ok(LoadedConfig {
            config: self.config,
            warnings: self.warnings,
        })
    }
}

/// The old `acl manager proto cache_object` or `url_regex … cache_object …`
/// definitions that Squid 3.2 made built in.
fn is_legacy_manager(type_name: &str, values: &[Token]) -> bool {
    match type_name {
        "proto" => values
            .iter()
            .all(|value| value.text().eq_ignore_ascii_case("cache_object")),
        "url_regex" => values.iter().any(|value| {
            value.text().contains("cache_object") || value.text().contains("squid-internal-mgr")
        }),
        _ => false,
    }
}

/// Parses a Squid time value: `NUMBER [UNIT]`, seconds when no unit is given;
/// kept to millisecond precision.
pub(super) fn parse_time_value(args: &[Token]) -> Result<Duration, String> {
    let (number, unit) = match args {
        [number] => (number.text(), "seconds"),
        [number, unit] => (number.text(), unit.text()),
        _ => return Err("expected a time: NUMBER [UNIT]".into()),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|value: &f64| value.is_finite() && *value >= 0.0 && !number.starts_with('+'))
        .ok_or_else(|| "expected a non-negative number".to_owned())?;
    let seconds = match unit {
        "millisecond" | "milliseconds" => 0.001,
        "second" | "seconds" => 1.0,
        "minute" | "minutes" => 60.0,
        "hour" | "hours" => 3600.0,
        "day" | "days" => 86_400.0,
        "week" | "weeks" => 604_800.0,
        _ => {
            return Err(
                "unknown time unit (milliseconds, seconds, minutes, hours, days, weeks)".into(),
            )
        }
    };
    let millis = (value * seconds * 1000.0).round();
    if millis > 1e15 {
        return Err("time value too large".into());
    }
    Ok(Duration::from_millis(millis as u64))
}
