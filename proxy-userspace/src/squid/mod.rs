//! Squid-compatible configuration: a reader for the part of `squid.conf` that
//! means something to a CONNECT-only tunnelling proxy, and Squid's `http_access`
//! semantics over it.
//!
//! The module is a pure library: [`load`] (or [`parse_str`]) turns a file into a
//! [`SquidConfig`] plus warnings; the control plane then asks
//! [`SquidConfig::decide`] about each request (once per candidate destination
//! address when [`SquidConfig::needs_destination`] says `dst` ACLs are in use),
//! [`SquidConfig::verify_basic`] about `Proxy-Authorization` credentials, and
//! [`LogFormat::format`] for access log lines.
//!
//! # File syntax
//! * `#` starts a comment when it begins a line or a token; blank lines are skipped.
//! * A line ending in `\` continues on the next line: the two are joined as they
//!   stand (the backslash removed), as Squid does.
//! * `include FILE…` reads other files in place. A relative name is taken from the
//!   directory of the file that includes it; glob patterns (`conf.d/*.conf`) read
//!   every match in name order, and a pattern that matches nothing only warns.
//!   Include loops and nesting deeper than 16 files are errors.
//! * `"FILE"` (a quoted token) in an `acl` line reads the ACL's values from FILE,
//!   one per line, `#` comments and blank lines skipped; as in Squid, a word
//!   starting with `#` ends a value. A value with whitespace inside, or starting
//!   with `"`, is an error.
//!
//! Every error and warning names the file, the line and the offending text:
//! `FILE:LINE: message: 'text'` (see [`Diagnostic`]).
//!
//! # Directives
//! Supported:
//! * `http_port [ADDR:]PORT [name=NAME]`, repeatable: `3128`, `127.0.0.1:3128`,
//!   `[::1]:3128`. `ssl-bump` and its certificate options (`cert=`,
//!   `generate-host-certificates`, …) are accepted with a warning (peeking
//!   needs no certificate); every other Squid option (`intercept`, `tproxy`,
//!   `accel`, `tcpkeepalive`, …) is an error.
//! * `http_port … require-proxy-header` and `proxy_protocol_access
//!   allow|deny ACL…` (`src`, `localip`, `localport`, `time` ACLs, judged on
//!   the TCP peer; no line refuses every peer): see `proxy_protocol.rs`.
//! * `ssl_bump peek|splice|terminate ACL…`, `on_unsupported_protocol
//!   tunnel|respond ACL…` and spliced's `sni_must_match_connect
//!   exact|same_dstdomain|off`: the TLS name policy (see `ssl_bump.rs`).
//!   `ssl_bump bump|stare` are errors: spliced never decrypts.
//! * `acl NAME TYPE [FLAGS] VALUE…` (repeated lines with one name and type
//!   append; see [ACL types](#acl-types)).
//! * `http_access allow|deny [!]ACL…`.
//! * `access_log PATH [FORMAT | logformat=FORMAT] [OPTION=VALUE…]` and
//!   `access_log none`; `stdio:` and `daemon:` prefixes name a file. The
//!   `buffer-size=`, `on-error=` and `rotate=` options are accepted and ignored
//!   with a warning; ACL filters, `syslog:`, `udp:` and `tcp:` modules are errors.
//! * `logformat NAME SPEC` (see [`LogFormat`]); built-in formats `squid`,
//!   `common` and `combined`.
//! * `connect_timeout`, `read_timeout`, `client_lifetime`, `request_timeout`,
//!   `shutdown_lifetime`, `dns_timeout`: Squid time values (`30 seconds`,
//!   `1 minute`, `2 hours`, `1.5 days`, `500 milliseconds`; a bare number is
//!   seconds).
//! * `client_ip_max_connections N` (`-1` disables the limit, as in Squid).
//! * `dns_nameservers IP…`, repeatable; `hosts_file`, `positive_dns_ttl`,
//!   `negative_dns_ttl`, `ipcache_size`, `happy_eyeballs_connect_timeout`
//!   (see [`DnsDirectives`]).
//! * `auth_param basic program|realm|children|credentialsttl|casesensitive|utf8`
//!   (see [`BasicAuth`]): only `basic_ncsa_auth`, whose password file is read
//!   here instead of running the helper; `children` sizes the pool that
//!   verifies hashes and `credentialsttl` the cache in front of it
//!   (`crate::auth_check`).
//!
//! Accepted with one warning each, because they have no meaning for a proxy that
//! neither caches nor rewrites HTTP messages: the caching directives (`cache_dir`,
//! `cache_mem`, `refresh_pattern`, `cache`, `maximum_object_size`, …), process
//! and file housekeeping (`coredump_dir`, `pid_filename`, `cache_effective_user`,
//! `workers`, `cache_log`, `logfile_rotate`, …), ICP/HTCP/SNMP, peer selection
//! (`hierarchy_stoplist`: nothing is cached, so no request is stopped), header
//! rewriting (`request_header_access`, `reply_header_add`, … — plain HTTP
//! rewrites only hop-by-hop fields, `Via` and `X-Forwarded-For`, the last two
//! per `via` and `forwarded_for`, which are parsed), `http_reply_access` (a tunnel has no HTTP reply
//! to check), error page look (`visible_hostname`, `error_directory`,
//! `deny_info`, …) and DNS cache tuning (`dns_v4_first`, `hosts_file`, …).
//! The full list, with the reason each is ignored, is in `parse.rs`.
//!
//! * `cache_peer HOST parent PORT ICP-PORT [OPTION…]`, `cache_peer_access`,
//!   `never_direct`, `always_direct`, `prefer_direct`,
//!   `nonhierarchical_direct`: parent proxies and Squid's choice between them
//!   and DIRECT (see `peers.rs`).
//!
//! Errors: unknown directives; directives whose loss would change what the proxy
//! lets through or where it connects (`https_port`, `cache_peer_domain`,
//! `tcp_outgoing_address`, `follow_x_forwarded_for`, `delay_pools`,
//! `url_rewrite_program`, ICAP/eCAP, `if` conditionals, …); bad values; ACL
//! names used by `http_access` before they are defined.
//!
//! # ACL types
//! * `src`, `dst`, `localip` (`myip`): IPv4/IPv6 addresses, `ADDR/LEN`,
//!   `ADDR/NETMASK`, `ADDR1-ADDR2`, `all`, `ipv4`, `ipv6`. IPv4-mapped IPv6
//!   addresses match IPv4 entries. Host names are errors (never resolved here).
//!   `dst` is matched against the address actually connected to; `dst -n` only
//!   matches CONNECT targets that are IP literals.
//! * `dstdomain [-n]`: `.example.com` matches the domain and its subdomains,
//!   `example.com` only itself; case-insensitive, trailing dots ignored. `-n` is
//!   accepted and has no effect (reverse DNS is never done). Overlapping entries
//!   (`.example.com` and `www.example.com`), which Squid refuses, only warn.
//!   Lookups cost one hash probe per label of the host, so long lists are fine.
//! * `dstdom_regex`, `url_regex`, `proxy_auth_regex` with `-i`/`+i` toggles
//!   (Rust `regex` syntax, a close superset of the POSIX EREs Squid uses). The
//!   URL of a CONNECT request is its authority, `host:port`, as in Squid.
//! * `port`, `localport` (`myport`): ports and ranges `1025-65535`.
//! * `method` (case-insensitive), `proto`: a CONNECT request has no URL scheme,
//!   and Squid (checked with 5.7) gives it the protocol `NONE`: only that name
//!   matches. The other names Squid knows (`HTTP`, `HTTPS`, `AUTHORITY_FORM`, …)
//!   are accepted and never match.
//! * `time [DAYS] [HH:MM-HH:MM]…`, days `SMTWHFA` (and `D` for Monday to
//!   Friday), both ends inclusive, evaluated in [`RequestFacts::now`].
//! * `proxy_auth [-i] REQUIRED|USER…`, `proxy_auth_regex`.
//! * `at_step SslBump1|SslBump2` (no `SslBump3`: the server's hello is never
//!   read), `ssl::server_name [--client-requested]` (`dstdomain` syntax) and
//!   `ssl::server_name_regex`: the ClientHello's SNI once an `ssl_bump peek`
//!   read it, else the CONNECT host.
//! * Predefined: `all`, `localhost` (127.0.0.1/32 ::1), `to_localhost`
//!   (127.0.0.0/8 0.0.0.0/32 ::/128 ::1/128), `to_linklocal` (169.254.0.0/16
//!   fe80::/10), `CONNECT` (method CONNECT) and `manager` (Squid's cache manager
//!   URLs, which a CONNECT request never is: it never matches). Lines with a
//!   predefined name and the same type add to it; the pre-3.2
//!   `acl manager proto cache_object` is ignored with a warning.
//!
//! Squid types that mean nothing for a tunnel (`urlpath_regex`, `rep_header`,
//! `ssl_error`, `peername`, …) or that spliced does not evaluate
//! (`browser`, `req_header`, `srcdomain`, `external`, `maxconn`, …) may be
//! defined — with a warning, so that Squid configurations that only use them in
//! ignored directives still load — but an `http_access` line that uses one is an
//! error explaining why.
//!
//! # Access semantics
//! Exactly Squid's: the ACLs of an `http_access` line are ANDed left to right
//! (stopping at the first mismatch), `!` negates, the first matching line
//! decides; when no line matches the answer is the opposite of the last line's
//! action, and with no `http_access` lines at all every request is denied. A
//! `proxy_auth` ACL reached without valid credentials answers
//! [`Decision::AuthRequired`], and so does a matching `deny` line whose last ACL
//! is a `proxy_auth` one (Squid re-challenges instead of answering 403).

mod access;
mod acl;
mod auth;
mod auth_children;
mod dns;
mod logformat;
mod parse;
mod peers;
#[cfg(test)]
mod peers_tests;
mod proxy_protocol;
mod reader;
mod render;
mod ssl_bump;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use access::{Decision, LocalTime, RequestFacts, Weekday};
pub use auth::{BasicAuth, Credentials, Verifier};
pub use auth_children::HelperChildren;
pub use dns::{DnsDirectives, HostsFile};
pub use logformat::{LogFields, LogFormat};
pub use peers::{is_hierarchical, CachePeer, HierCode, Peers, Route};
pub use ssl_bump::{BumpAction, SniCheck, Step1, Step2};

use access::AccessRule;
use acl::Acl;

/// One message about one line of configuration, shown as
/// `FILE:LINE: message: 'text'`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}: '{text}'")]
pub struct Diagnostic {
    /// The file, as it was named (the top-level path, or an include resolved
    /// against the directory of the file that includes it).
    pub file: String,
    /// 1-based line number; for a continued line, the line it starts on.
    pub line: usize,
    /// What is wrong (or, for a warning, what is ignored and why).
    pub message: String,
    /// The offending text: a token, or the whole directive.
    pub text: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The top-level configuration file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The path given to [`load`].
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the configuration, or of a file it names, is wrong.
    #[error(transparent)]
    Invalid(#[from] Diagnostic),
}

impl ConfigError {
    /// The diagnostic of an [`ConfigError::Invalid`] error.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            Self::Invalid(diagnostic) => Some(diagnostic),
            Self::Read { .. } => None,
        }
    }
}

/// A configuration that loaded, with what was accepted but ignored.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    /// The effective configuration.
    pub config: SquidConfig,
    /// One entry per ignored directive or doubtful value, in file order.
    pub warnings: Vec<Diagnostic>,
}

/// One `http_port` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpPort {
    /// The address to listen on; `None` means every address (IPv4 and IPv6).
    pub addr: Option<IpAddr>,
    /// The TCP port, never 0.
    pub port: u16,
    /// The `name=` option, if given.
    pub name: Option<String>,
    /// `require-proxy-header`: every connection starts with a PROXY protocol
    /// header from a peer `proxy_protocol_access` allows.
    pub require_proxy_header: bool,
}

impl HttpPort {
    /// The socket addresses to bind: `0.0.0.0:PORT` and `[::]:PORT` when no
    /// address was given.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        match self.addr {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), self.port),
            ],
        }
    }
}

impl fmt::Display for HttpPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, "{}", self.port)?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port)?,
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port)?,
        }
        if let Some(name) = &self.name {
            write!(f, " name={name}")?;
        }
        if self.require_proxy_header {
            f.write_str(" require-proxy-header")?;
        }
        Ok(())
    }
}

/// One `access_log` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// `access_log none`: transactions are not logged.
    None,
    /// Append one line per transaction to a file.
    File {
        /// The file, with any `stdio:`/`daemon:` prefix removed, as written.
        path: PathBuf,
        /// The record format (`squid` unless another was named).
        format: LogFormat,
    },
}

/// Timeouts set in the configuration; `None` where the file says nothing (the
/// control plane keeps its own default then).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// `connect_timeout`: one upstream connect attempt (Squid's default: 1 minute).
    pub connect: Option<Duration>,
    /// `read_timeout`: idle time on the upstream side (Squid: 15 minutes).
    pub read: Option<Duration>,
    /// `client_lifetime`: the longest a client connection may live (Squid: 1 day).
    pub client_lifetime: Option<Duration>,
    /// `request_timeout`: time for the client to send its request head (Squid:
    /// 5 minutes).
    pub request: Option<Duration>,
    /// `shutdown_lifetime`: how long open tunnels may go on after a shutdown
    /// signal (Squid: 30 seconds).
    pub shutdown_lifetime: Option<Duration>,
    /// `dns_timeout`: one name resolution (Squid: 30 seconds).
    pub dns: Option<Duration>,
}

/// An effective Squid configuration: listeners, logging, timeouts, ACLs and the
/// `http_access` rules.
#[derive(Clone, Debug)]
pub struct SquidConfig {
    /// `http_port` lines, in order. Empty when the file has none (Squid then
    /// listens on port 3128 of every address).
    pub http_ports: Vec<HttpPort>,
    /// `access_log` lines, in order. Empty when the file has none (Squid's own
    /// default is `daemon:/var/log/squid/access.log squid`).
    pub access_logs: Vec<AccessLogTarget>,
    /// `logformat` definitions, in order (the built-in ones are not listed).
    pub logformats: Vec<LogFormat>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// `client_ip_max_connections`: the most concurrent connections from one
    /// client address; `None` for no limit.
    pub client_ip_max_connections: Option<u32>,
    /// `dns_nameservers`: resolvers to use instead of the system's, in order.
    pub dns_nameservers: Vec<IpAddr>,
    /// The resolver's other directives (`hosts_file`, DNS cache TTLs and size,
    /// `happy_eyeballs_connect_timeout`).
    pub dns: DnsDirectives,
    /// Basic authentication, when `auth_param basic program` is configured.
    pub auth: Option<BasicAuth>,
    /// Every ACL: the predefined ones first, then the file's, in order.
    acls: Vec<Acl>,
    /// The `http_access` lines, in order.
    rules: Vec<AccessRule>,
    /// `ssl_bump`, `on_unsupported_protocol`, `sni_must_match_connect`.
    tls: ssl_bump::TlsPolicy,
    /// `via` and `forwarded_for`: what plain-HTTP forwarding writes.
    pub headers: crate::http_forward::HeaderPolicy,
    /// `proxy_protocol_access` lines, in order.
    proxy_protocol: Vec<proxy_protocol::ProxyProtocolRule>,
    /// `cache_peer` and the directives that choose between parents and DIRECT.
    peers: Peers,
}

/// Reads the configuration file at `path`, following its `include`s.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedConfig, ConfigError> {
    let path = path.as_ref();
    let mut reader = reader::Reader::default();
    reader.read_top_file(path)?;
    parse::parse(reader)
}

/// Parses configuration text. `name` is used in diagnostics; relative `include`
/// and ACL file names are taken from the directory part of `name` (the current
/// directory when it has none).
pub fn parse_str(text: &str, name: &str) -> Result<LoadedConfig, ConfigError> {
    let mut reader = reader::Reader::default();
    let dir = Path::new(name)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    reader.read_text(text, Arc::from(name), Arc::from(dir.as_path()))?;
    parse::parse(reader)
}

impl SquidConfig {
    /// The number of `http_access` lines.
    pub fn http_access_len(&self) -> usize {
        self.rules.len()
    }

    /// A log format by name: one the file defined, or a built-in one.
    pub fn logformat(&self, name: &str) -> Option<LogFormat> {
        self.logformats
            .iter()
            .find(|format| format.name == name)
            .cloned()
            .or_else(|| LogFormat::builtin(name))
    }

    /// The realm to announce in `Proxy-Authenticate`, when authentication is
    /// configured.
    pub fn auth_realm(&self) -> Option<&str> {
        self.auth.as_ref().map(|auth| auth.realm.as_str())
    }

    /// Checks a `Proxy-Authorization` header value (`Basic BASE64`) against the
    /// password file; returns the user name when the credentials are valid.
    /// Always `None` without `auth_param basic program`. A bcrypt check costs
    /// milliseconds of CPU: call it off the async executor.
    pub fn verify_basic(&self, header_value: &str) -> Option<String> {
        self.auth.as_ref()?.verify_basic(header_value)
    }
}
