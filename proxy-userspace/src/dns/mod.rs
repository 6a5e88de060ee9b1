//! Name resolution for upstream connections: hickory's async resolver (the
//! `dns_nameservers` of squid.conf, else `/etc/resolv.conf` with its search
//! rules), Squid's `hosts_file` consulted first, and a bounded cache of
//! answers and failures (`positive_dns_ttl`, `negative_dns_ttl`,
//! `ipcache_size`). Concurrent lookups of one name share one query (see
//! [`flight`]). Every lookup is bounded by `dns_timeout`; nothing here
//! blocks a tokio worker. Built from the configuration at start and on every
//! reload (it lives in [`crate::settings::Settings`]).

mod cache;
mod flight;
mod metrics;

use std::{
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{runtime::TokioRuntimeProvider, DnsError as WireError, NetError},
    proto::{
        op::{Query, ResponseCode},
        rr::{Name, RecordType},
    },
    Hosts, TokioResolver,
};

pub use cache::{Answer, Cache};
pub use metrics::DnsMetrics;

use flight::{Flights, Source};

use crate::squid::{HostsFile, SquidConfig};

/// Why a name gave no address; cached failures are cloned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN).
    #[error("NXDOMAIN")]
    NxDomain,
    /// The name exists but has no A or AAAA record.
    #[error("no address records")]
    NoRecords,
    /// The server failed (SERVFAIL).
    #[error("SERVFAIL")]
    ServFail,
    /// No answer within `dns_timeout`.
    #[error("timed out")]
    Timeout,
    /// Anything else: the server refused or could not be reached, a bad name.
    #[error("{0}")]
    Other(String),
}

impl DnsError {
    /// Every value of [`DnsError::kind`].
    pub const KINDS: [&'static str; 5] = ["nxdomain", "no_records", "servfail", "timeout", "other"];

    /// A short name of the kind, for metrics: one of [`Self::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NxDomain => "nxdomain",
            Self::NoRecords => "no_records",
            Self::ServFail => "servfail",
            Self::Timeout => "timeout",
            Self::Other(_) => "other",
        }
    }

    /// Whether the failure is an answer about the name (kept for
    /// `negative_dns_ttl`); a server that could not be reached is not.
    pub fn is_cacheable(&self) -> bool {
        !matches!(self, Self::Other(_))
    }

    fn from_net(err: &NetError) -> Self {
        if err.is_nx_domain() {
            return Self::NxDomain;
        }
        if err.is_no_records_found() {
            return Self::NoRecords;
        }
        match err {
            NetError::Timeout => Self::Timeout,
            NetError::Dns(WireError::ResponseCode(ResponseCode::ServFail)) => Self::ServFail,
            other => Self::Other(other.to_string()),
        }
    }
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The `hosts_file` could not be read.
    #[error("hosts_file {path}: {source}")]
    HostsFile {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// hickory refused the configuration.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] NetError),
}

/// The resolver's effective settings: the file's directives with Squid's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// `dns_nameservers`; empty: `/etc/resolv.conf` (servers, `search`, `ndots`).
    pub nameservers: Vec<IpAddr>,
    /// `hosts_file`, `None` for `hosts_file none`.
    pub hosts_file: Option<PathBuf>,
    /// `dns_timeout`: the longest one lookup takes.
    pub timeout: Duration,
    /// `positive_dns_ttl`: the longest an answer is cached.
    pub positive_ttl: Duration,
    /// `negative_dns_ttl`: how long a failure is cached.
    pub negative_ttl: Duration,
    /// `ipcache_size`: the most names cached.
    pub cache_size: u64,
}

/// Squid's `hosts_file` default.
const DEFAULT_HOSTS: &str = "/etc/hosts";

impl DnsSettings {
    /// The settings of `file` (Squid's defaults without one), with `timeout`.
    pub fn new(file: Option<&SquidConfig>, timeout: Duration) -> Self {
        let dns = file.map(|f| f.dns.clone()).unwrap_or_default();
        Self {
            nameservers: file.map(|f| f.dns_nameservers.clone()).unwrap_or_default(),
            hosts_file: match dns.hosts_file {
                None => Some(PathBuf::from(DEFAULT_HOSTS)),
                Some(HostsFile::None) => None,
                Some(HostsFile::Path(path)) => Some(path),
            },
            timeout,
            positive_ttl: dns.positive_ttl.unwrap_or(Duration::from_secs(6 * 3600)),
            negative_ttl: dns.negative_ttl.unwrap_or(Duration::from_secs(60)),
            cache_size: dns.ipcache_size.unwrap_or(1024),
        }
    }
}

/// Resolves names to addresses; one per configuration in force.
pub struct Resolver {
    dns: TokioResolver,
    hosts: Hosts,
    cache: Cache,
    /// The names being asked of DNS now.
    flights: Flights,
    timeout: Duration,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver; the strings are warnings for the log.
    pub fn new(settings: &DnsSettings) -> Result<(Self, Vec<String>), BuildError> {
        let mut warnings = Vec::new();
        let (config, mut opts) = if settings.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|err| {
                // What the C library does without a usable resolv.conf.
                warnings.push(format!(
                    "/etc/resolv.conf: {err}; resolving with the name server on 127.0.0.1"
                ));
                (
                    servers(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]),
                    ResolverOpts::default(),
                )
            })
        } else {
            let mut opts = ResolverOpts::default();
            opts.timeout = settings.timeout;
            (servers(&settings.nameservers), opts)
        };
        // The cache below counts hits and applies Squid's TTL rules instead.
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let dns = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()?;
        let mut hosts = Hosts::default();
        if let Some(path) = &settings.hosts_file {
            let read = File::open(path).and_then(|file| hosts.read_hosts_conf(file));
            match read {
                Ok(()) => {}
                // Squid's default file may be absent; a named one must be there.
                Err(err)
                    if err.kind() == std::io::ErrorKind::NotFound
                        && path.as_os_str() == DEFAULT_HOSTS => {}
                Err(source) => {
                    return Err(BuildError::HostsFile {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        let resolver = Self {
            dns,
            hosts,
            cache: Cache::new(
                settings.cache_size,
                settings.positive_ttl,
                settings.negative_ttl,
            ),
            flights: Flights::default(),
            timeout: settings.timeout,
        };
        Ok((resolver, warnings))
    }

    /// `dns_timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The addresses of `name`: from `hosts_file`, the cache, or DNS (A and
    /// AAAA asked together, one query in flight per name), within
    /// `dns_timeout`.
    pub async fn lookup(&self, name: &str, metrics: &DnsMetrics) -> Answer {
        if let Some(addrs) = self.static_host(name) {
            metrics.looked_up(false, None);
            return Ok(addrs);
        }
        let ask = || {
            metrics.queried();
            Self::ask(
                self.dns.clone(),
                self.cache.clone(),
                name.to_owned(),
                self.timeout,
            )
        };
        let (answer, source) = self
            .flights
            .answer(Cache::key(name), || self.cache.get(name), ask)
            .await;
        if source == Source::Shared {
            metrics.shared();
        }
        metrics.looked_up(source == Source::Cached, answer.as_ref().err());
        answer
    }

    /// Asks DNS for `name` within `timeout` and caches the answer; runs in
    /// its own task, shared by the lookups of `name` meanwhile.
    async fn ask(dns: TokioResolver, cache: Cache, name: String, timeout: Duration) -> Answer {
        let (answer, ttl) = match tokio::time::timeout(timeout, dns.lookup_ip(name.as_str())).await
        {
            Err(_) => (Err(DnsError::Timeout), Duration::ZERO),
            Ok(Err(err)) => (Err(DnsError::from_net(&err)), Duration::ZERO),
            Ok(Ok(lookup)) => {
                let addrs: Arc<[IpAddr]> = lookup.iter().collect();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                if addrs.is_empty() {
                    (Err(DnsError::NoRecords), ttl)
                } else {
                    (Ok(addrs), ttl)
                }
            }
        };
        cache.insert(&name, answer.clone(), ttl);
        answer
    }

    /// The `hosts_file` addresses of `name`, if it is listed.
    fn static_host(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        let mut name = Name::from_str(name).ok()?;
        name.set_fqdn(true);
        let addrs: Arc<[IpAddr]> = [RecordType::AAAA, RecordType::A]
            .into_iter()
            .filter_map(|kind| {
                self.hosts
                    .lookup_static_host(&Query::query(name.clone(), kind))
            })
            .flat_map(|lookup| {
                lookup
                    .answers()
                    .iter()
                    .filter_map(|record| record.data.ip_addr())
                    .collect::<Vec<_>>()
            })
            .collect();
        (!addrs.is_empty()).then_some(addrs)
    }
}

/// A resolver configuration with `ips` as its servers (UDP, TCP for long answers).
fn servers(ips: &[IpAddr]) -> ResolverConfig {
    ResolverConfig::from_name_servers(
        ips.iter()
            .copied()
            .map(NameServerConfig::udp_and_tcp)
            .collect(),
    )
}
