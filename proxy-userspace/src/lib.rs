//! spliced: an HTTP CONNECT forward proxy whose tunnels are spliced in the kernel.
//!
//! The crate is split the way ARCHITECTURE.md describes:
//! * [`control`] — the tokio control plane: accept, parse `CONNECT`, apply the
//!   policy, resolve and connect upstream, answer `200`, hand the pair over;
//! * [`dataplane`] — the one interface that moves a tunnel's bytes, with the
//!   sockmap (eBPF), splice(2) and copy implementations;
//! * [`dns`] and [`happy_eyeballs`] — the configured resolver with its cache,
//!   and RFC 8305 connection racing;
//! * [`access_log`] — Squid-style and JSON access log records;
//! * [`http_forward`] — plain `http://` requests in absolute form, forwarded
//!   with hyper (no caching);
//! * [`parents`] — parent proxies (`cache_peer`): routes, liveness, their CONNECT;
//! * [`handover`] — tunnels handed from one process to the next (packet plane);
//! * [`proxy_protocol`] — the PROXY protocol header of `require-proxy-header` ports;
//! * [`peek`] — the TLS name policy's ClientHello step (`ssl_bump`);
//! * [`auth_check`] — Basic credentials checked through a cache and a bounded
//!   pool of hash verifiers (`credentialsttl`, `children`);
//! * [`squid`] — a `squid.conf` subset reader and Squid's `http_access` semantics;
//! * [`tls_peek`] — the SNI of a tunnel's TLS ClientHello, read without decrypting;
//! * [`single_flight`] — concurrent requests for one key sharing one piece of
//!   work (credential checks, DNS queries);
//! * [`admin`] and [`metrics`] — the `--admin` HTTP listener (health, readiness,
//!   Prometheus metrics).

pub mod access_log;
pub mod admin;
pub mod auth_check;
pub mod config;
pub mod connect_request;
pub mod control;
pub mod dataplane;
pub mod dns;
pub mod handover;
pub mod happy_eyeballs;
pub mod http_forward;
pub mod metrics;
pub mod parents;
pub mod peek;
pub mod policy;
pub mod proxy_protocol;
pub mod settings;
pub mod single_flight;
pub mod sockopt;
pub mod squid;
pub mod tls_peek;
pub mod upstream;
