//! Idle upstream HTTP/1.1 connections kept for reuse, per destination
//! (`host:port` as the client named it): at most [`MAX_IDLE_PER_HOST`] each
//! and [`MAX_IDLE`] in all, none older than [`IDLE_TIMEOUT`]. A connection is offered again only to a
//! request whose policy allows the address it is connected to, so `dst` ACLs
//! and the forwarding-loop check judge every request, reused or not.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::CountingBody;

/// Idle connections kept per destination: a busy destination (a package
/// mirror behind a build farm) has as many requests in flight as clients, and
/// each connection dropped here is a new handshake for the next request.
pub const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept in all.
pub const MAX_IDLE: usize = 1024;
/// How often idle connections are checked for expiry: one may outlive
/// [`IDLE_TIMEOUT`] by this much.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The sending half of an upstream connection.
pub type Sender = SendRequest<CountingBody>;

struct Idle {
    addr: SocketAddr,
    sender: Sender,
    since: Instant,
}

/// Idle upstream connections, shared by every client connection.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    /// Whether the sweeper task runs (started with the first idle connection).
    sweeping: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// An idle connection to `key` whose address `allowed` accepts, newest first.
    pub fn take(
        &self,
        key: &str,
        allowed: impl Fn(SocketAddr) -> bool,
    ) -> Option<(SocketAddr, Sender)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Only this destination's list: the sweeper task keeps the others.
        let list = idle.get_mut(key)?;
        list.retain(Idle::usable);
        let index = list.iter().rposition(|c| allowed(c.addr));
        let Some(index) = index else {
            if list.is_empty() {
                idle.remove(key);
            }
            return None;
        };
        let conn = list.remove(index);
        if list.is_empty() {
            idle.remove(key);
        }
        Some((conn.addr, conn.sender))
    }

    /// Keeps `sender` for reuse once its response has been read in full (it is
    /// dropped, closing the connection, if the connection ends instead).
    pub fn put_when_ready(self: &Arc<Self>, key: String, addr: SocketAddr, mut sender: Sender) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = idle.get_mut(&key) {
                list.retain(Idle::usable);
            }
            if idle.values().map(Vec::len).sum::<usize>() >= MAX_IDLE {
                return;
            }
            let list = idle.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_HOST {
                list.remove(0);
            }
            list.push(Idle {
                addr,
                sender,
                since: Instant::now(),
            });
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep_while_alive(Arc::downgrade(self)));
        }
    }
}

/// Closes expired connections even when no request comes to sweep them:
/// one task per pool (a timer per idle connection would be one per request
/// served), ending with the pool.
async fn sweep_while_alive(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        sweep(&mut pool.idle.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Idle {
    /// Neither expired nor closed by the origin.
    fn usable(&self) -> bool {
        self.since.elapsed() < IDLE_TIMEOUT && !self.sender.is_closed()
    }
}

/// Drops expired and closed connections.
fn sweep(idle: &mut HashMap<String, Vec<Idle>>) {
    idle.retain(|_, list| {
        list.retain(Idle::usable);
        !list.is_empty()
    });
}

/// Starts HTTP/1.1 on a new upstream connection; the connection runs on its
/// own task until the sender is dropped or the peer closes.
pub async fn handshake(stream: TcpStream) -> hyper::Result<Sender> {
    // Rewind (with nothing to replay) counts what hyper reads, which an
    // upgraded connection's data plane needs.
    let io = TokioIo::new(super::Rewind::new(bytes::Bytes::new(), stream));
    let (sender, connection) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            log::debug!("upstream HTTP connection: {err}");
        }
    });
    Ok(sender)
}
