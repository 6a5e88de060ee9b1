//! Resolving a CONNECT target and connecting to it.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::connect_request::{Host, Target};

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

/// Resolves `target` (all addresses, in the resolver's order).
pub async fn resolve(target: &Target, timeout: Duration) -> Result<Vec<SocketAddr>, UpstreamError> {
    let name = match &target.host {
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => name.as_str(),
    };
    let lookup = tokio::net::lookup_host((name, target.port));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
        Err(_) => return Err(UpstreamError::ResolveTimeout(timeout)),
        Ok(Err(err)) => return Err(UpstreamError::Resolve(err.to_string())),
        Ok(Ok(addrs)) => addrs.collect(),
    };
    if addrs.is_empty() {
        return Err(UpstreamError::Resolve("no addresses".into()));
    }
    Ok(addrs)
}

/// Connects to the first address of `addrs` that accepts within `timeout`.
pub async fn connect(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let mut last_error = None;
    for &addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, addr)),
            Ok(Err(source)) => last_error = Some(UpstreamError::Connect { addr, source }),
            Err(_) => last_error = Some(UpstreamError::Timeout { addr, timeout }),
        }
    }
    Err(last_error.unwrap_or_else(|| UpstreamError::Resolve("no addresses".into())))
}
