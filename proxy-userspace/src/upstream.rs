//! Resolving a CONNECT target and connecting to it: the one entry point is
//! [`resolve`] (the configured [`Resolver`]) then [`connect`] (Happy Eyeballs);
//! `ControlPlane::connect_upstream` puts the policy's `dst` check and the
//! forwarding-loop check between the two.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::{
    connect_request::{Host, Target},
    dns::{DnsError, DnsMetrics, Resolver},
    happy_eyeballs::{self, AttemptError},
};

/// Why no upstream connection was made; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The name did not resolve (NXDOMAIN, no address, resolver failure).
    #[error("name did not resolve: {0}")]
    Resolve(String),
    /// The resolver did not answer in time.
    #[error("name resolution timed out after {0:?}")]
    ResolveTimeout(Duration),
    /// The last address tried refused or reset the connection.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// What connect(2) said.
        source: io::Error,
    },
    /// The last address tried did not answer within the connect timeout.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The address tried last.
        addr: SocketAddr,
        /// The per-address timeout.
        timeout: Duration,
    },
}

impl UpstreamError {
    /// The HTTP status the client gets: 503 for names, 504 for timeouts, 502 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::Resolve(_) | Self::ResolveTimeout(_) => 503,
            Self::Timeout { .. } => 504,
            Self::Connect { .. } => 502,
        }
    }

    /// Every value of [`UpstreamError::kind`].
    pub const KINDS: [&'static str; 7] = [
        "resolve",
        "resolve_timeout",
        "timeout",
        "refused",
        "reset",
        "unreachable",
        "error",
    ];

    /// A short name of the kind of failure, for metrics: one of [`Self::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resolve(_) => "resolve",
            Self::ResolveTimeout(_) => "resolve_timeout",
            Self::Timeout { .. } => "timeout",
            Self::Connect { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionRefused => "refused",
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
                _ => "error",
            },
        }
    }
}

/// Resolves `target` with the configured resolver (all addresses; an IP
/// literal is its own answer and never touches DNS).
pub async fn resolve(
    resolver: &Resolver,
    target: &Target,
    metrics: &DnsMetrics,
) -> Result<Vec<SocketAddr>, UpstreamError> {
    let name = match &target.host {
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => name.as_str(),
    };
    match resolver.lookup(name, metrics).await {
        Ok(addrs) => Ok(addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, target.port))
            .collect()),
        Err(DnsError::Timeout) => Err(UpstreamError::ResolveTimeout(resolver.timeout())),
        Err(err) => Err(UpstreamError::Resolve(err.to_string())),
    }
}

/// Connects to one of `addrs` with Happy Eyeballs (`happy_eyeballs`): the
/// first that accepts wins; each attempt has `timeout`, the next one starts
/// after `delay` (`happy_eyeballs_connect_timeout`) or when one fails.
pub async fn connect(
    addrs: &[SocketAddr],
    timeout: Duration,
    delay: Duration,
) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    match happy_eyeballs::race(addrs, delay, timeout, TcpStream::connect).await {
        Ok(won) => Ok(won),
        Err(Some((addr, AttemptError::Io(source)))) => Err(UpstreamError::Connect { addr, source }),
        Err(Some((addr, AttemptError::Timeout))) => Err(UpstreamError::Timeout { addr, timeout }),
        Err(None) => Err(UpstreamError::Resolve("no addresses".into())),
    }
}
