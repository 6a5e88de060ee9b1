//! The effective settings of a running proxy: the command line laid over the
//! configuration file, with defaults. Rebuilt from scratch on every reload.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    access_log::{AccessLog, RecordFormat},
    config::{secs, Config, LogFormat},
    dns::{self, DnsSettings, Resolver},
    policy::{BuiltinPolicy, PortSet},
    squid::{self, AccessLogTarget, SquidConfig},
};

/// Where requests are judged.
#[derive(Clone, Debug)]
pub enum Policy {
    /// No configuration file: `--connect-ports` and Squid's stock `localnet`.
    Builtin(BuiltinPolicy),
    /// The `http_access` rules of a squid.conf.
    Squid(Arc<SquidConfig>),
}

/// One access log destination.
#[derive(Clone, Debug)]
pub struct AccessLogSpec {
    /// A file, or `-` for standard output.
    pub path: PathBuf,
    /// How records are written.
    pub format: RecordFormat,
}

/// Everything a running proxy is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// The addresses of `listen` whose `http_port` has `require-proxy-header`
    /// (none when `--listen` replaces the file's ports).
    pub proxy_header_listen: Vec<SocketAddr>,
    /// Whether `listen` is the built-in default (an unavailable `[::]` is then
    /// only a warning).
    pub listen_is_default: bool,
    /// The access policy.
    pub policy: Policy,
    /// Access log destinations; empty for `access_log none`.
    pub access_logs: Vec<AccessLogSpec>,
    /// Deadline for the request head.
    pub request_timeout: Duration,
    /// One upstream connect attempt.
    pub connect_timeout: Duration,
    /// One name resolution.
    pub dns_timeout: Duration,
    /// The resolver built from the `dns_*` directives (rebuilt on reload).
    pub resolver: Arc<Resolver>,
    /// `happy_eyeballs_connect_timeout`: the delay before the next address is
    /// tried while the previous attempt is pending.
    pub happy_eyeballs_delay: Duration,
    /// A tunnel idle this long in both directions is closed.
    pub read_timeout: Duration,
    /// A tunnel is closed this long after it opened.
    pub client_lifetime: Duration,
    /// How long tunnels may go on after SIGTERM.
    pub shutdown_lifetime: Duration,
    /// Most concurrent connections from one client address.
    pub client_ip_max_connections: Option<u32>,
    /// Congestion control for the proxy's sockets (empty: the system's).
    pub tcp_congestion: String,
    /// Interval of the periodic access log records of open tunnels, if any.
    pub access_log_periodic: Option<Duration>,
}

/// Settings, and the warnings the configuration file produced.
pub struct Resolved {
    /// The settings.
    pub settings: Settings,
    /// One line per ignored directive, `FILE:LINE: …`.
    pub warnings: Vec<String>,
}

/// Why settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The configuration file is wrong.
    #[error(transparent)]
    Config(#[from] squid::ConfigError),
    /// `--connect-ports` and `-f` were both given.
    #[error(
        "--connect-ports applies to the built-in policy only; with -f write acl/http_access lines"
    )]
    ConnectPortsWithConfig,
    /// The resolver could not be built.
    #[error(transparent)]
    Dns(#[from] dns::BuildError),
}

const DEFAULT_LISTEN: [&str; 2] = ["0.0.0.0:3128", "[::]:3128"];

impl Settings {
    /// Builds the settings from the command line and, with `-f`, the file.
    pub fn resolve(cli: &Config) -> Result<Resolved, SettingsError> {
        let loaded = cli.config_file.as_deref().map(squid::load).transpose()?;
        let (file, mut warnings) = match loaded {
            Some(loaded) => (
                Some(loaded.config),
                loaded.warnings.iter().map(ToString::to_string).collect(),
            ),
            None => (None, Vec::new()),
        };
        let timeouts = file
            .as_ref()
            .map(|f| f.timeouts.clone())
            .unwrap_or_default();
        let pick = |flag: Option<f64>, from_file: Option<Duration>, default: u64| {
            flag.map(secs)
                .or(from_file)
                .unwrap_or(Duration::from_secs(default))
        };

        let file_listen: Vec<SocketAddr> = file
            .as_ref()
            .map(|f| {
                f.http_ports
                    .iter()
                    .flat_map(squid::HttpPort::listen_addrs)
                    .collect()
            })
            .unwrap_or_default();
        let proxy_header_listen: Vec<SocketAddr> = file
            .as_ref()
            .map(|f| {
                f.http_ports
                    .iter()
                    .filter(|port| port.require_proxy_header)
                    .flat_map(squid::HttpPort::listen_addrs)
                    .collect()
            })
            .unwrap_or_default();
        if !cli.listen.is_empty() && !proxy_header_listen.is_empty() {
            warnings.push(
                "http_port require-proxy-header is ignored: --listen replaces the file's http_port lines".into(),
            );
        }
        let proxy_header_listen = if cli.listen.is_empty() {
            proxy_header_listen
        } else {
            Vec::new()
        };
        let (listen, listen_is_default) = if !cli.listen.is_empty() {
            (cli.listen.clone(), false)
        } else if !file_listen.is_empty() {
            // `http_port 3128` means every address, like the default pair.
            let all_addresses = file
                .as_ref()
                .is_some_and(|f| f.http_ports.iter().all(|p| p.addr.is_none()));
            (file_listen, all_addresses)
        } else {
            (
                DEFAULT_LISTEN
                    .iter()
                    .map(|a| a.parse().expect("valid literal"))
                    .collect(),
                true,
            )
        };

        let cli_format = cli.log_format.map(|format| match format {
            LogFormat::Squid => RecordFormat::squid(),
            LogFormat::Json => RecordFormat::Json,
        });
        let access_logs = match (&cli.access_log, &file) {
            (Some(path), _) => vec![AccessLogSpec {
                path: path.clone(),
                format: cli_format.clone().unwrap_or_else(RecordFormat::squid),
            }],
            (None, Some(file)) if !file.access_logs.is_empty() => file
                .access_logs
                .iter()
                .filter_map(|target| match target {
                    AccessLogTarget::None => None,
                    AccessLogTarget::File { path, format } => Some(AccessLogSpec {
                        path: path.clone(),
                        format: cli_format
                            .clone()
                            .unwrap_or_else(|| RecordFormat::Format(format.clone())),
                    }),
                })
                .collect(),
            _ => vec![AccessLogSpec {
                path: PathBuf::from("-"),
                format: cli_format.clone().unwrap_or_else(RecordFormat::squid),
            }],
        };

        let policy = match (file.clone(), &cli.connect_ports) {
            (Some(_), Some(_)) => return Err(SettingsError::ConnectPortsWithConfig),
            (Some(file), None) => Policy::Squid(Arc::new(file)),
            (None, ports) => Policy::Builtin(BuiltinPolicy {
                connect_ports: ports
                    .clone()
                    .unwrap_or_else(|| "443".parse::<PortSet>().expect("valid literal")),
            }),
        };

        let dns_timeout = pick(cli.dns_timeout, timeouts.dns, 5);
        let (resolver, dns_warnings) =
            Resolver::new(&DnsSettings::new(file.as_ref(), dns_timeout))?;
        warnings.extend(dns_warnings);
        let happy_eyeballs_delay = file
            .as_ref()
            .and_then(|f| f.dns.happy_eyeballs_delay)
            .unwrap_or(Duration::from_millis(250));

        let settings = Settings {
            listen,
            proxy_header_listen,
            listen_is_default,
            policy,
            access_logs,
            request_timeout: pick(cli.request_timeout, timeouts.request, 30),
            connect_timeout: pick(cli.connect_timeout, timeouts.connect, 10),
            dns_timeout,
            resolver: Arc::new(resolver),
            happy_eyeballs_delay,
            read_timeout: pick(cli.read_timeout, timeouts.read, 900),
            client_lifetime: pick(cli.client_lifetime, timeouts.client_lifetime, 86_400),
            shutdown_lifetime: pick(cli.shutdown_lifetime, timeouts.shutdown_lifetime, 30),
            client_ip_max_connections: file.as_ref().and_then(|f| f.client_ip_max_connections),
            tcp_congestion: cli.tcp_congestion.clone(),
            access_log_periodic: cli
                .access_log_periodic
                .map(secs)
                .filter(|every| !every.is_zero()),
        };
        Ok(Resolved { settings, warnings })
    }

    /// Opens the access log destinations.
    pub fn open_access_log(&self) -> std::io::Result<AccessLog> {
        AccessLog::open(&self.access_logs)
    }
}
