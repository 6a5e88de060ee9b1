//! Flow events from the kernel (`FLOW_EVENTS` ring buffer) to the tunnel
//! tasks: one dispatcher reads the ring and sends each event to the task that
//! registered the socket's cookie.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use aya::maps::{MapData, RingBuf};
use proxy_common::{FlowEvent, FlowEventKind};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::super::Side;

/// What a tunnel task learns from one [`FlowEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// A socket of the tunnel changed TCP state (`old` → `new`).
    StateChange { side: Side, old: u32, new: u32 },
    /// The source's FIN arrived and the verdict handled every byte before it:
    /// `bytes` is the direction's final count.
    Drained { side: Side, bytes: u64 },
    /// The verdict's redirected count crossed a progress mark.
    Progress { side: Side, redirected: u64 },
    /// The verdict met an overlap too long to trim; the direction is broken.
    OverlapNotTrimmed { side: Side },
}

impl KernelEvent {
    /// The event of `raw`, which is about `side`'s socket; `None` for a kind
    /// this build does not know.
    pub fn from_raw(raw: &FlowEvent, side: Side) -> Option<Self> {
        Some(match raw.kind {
            kind if kind == FlowEventKind::StateChange as u32 => Self::StateChange {
                side,
                old: raw.old_state,
                new: raw.new_state,
            },
            kind if kind == FlowEventKind::Drained as u32 => Self::Drained {
                side,
                bytes: raw.bytes_redirected,
            },
            kind if kind == FlowEventKind::Progress as u32 => Self::Progress {
                side,
                redirected: raw.bytes_redirected,
            },
            kind if kind == FlowEventKind::OverlapNotTrimmed as u32 => {
                Self::OverlapNotTrimmed { side }
            }
            _ => return None,
        })
    }
}

/// The tunnel tasks waiting for events, by socket cookie.
#[derive(Default)]
pub struct Waiters {
    by_cookie: Mutex<HashMap<u64, mpsc::UnboundedSender<FlowEvent>>>,
    /// Flow events read from the ring buffer since start.
    received: AtomicU64,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<FlowEvent>>> {
        self.by_cookie
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends the events of sockets `cookies` to the returned receiver until
    /// the registration is dropped.
    pub fn register(self: &Arc<Self>, cookies: [u64; 2]) -> Registration {
        let (sender, receiver) = mpsc::unbounded_channel();
        {
            let mut waiters = self.lock();
            for cookie in cookies {
                waiters.insert(cookie, sender.clone());
            }
        }
        Registration {
            waiters: self.clone(),
            cookies,
            receiver,
        }
    }

    /// Flow events read from the ring buffer since start.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A tunnel's subscription to its sockets' events.
pub struct Registration {
    waiters: Arc<Waiters>,
    cookies: [u64; 2],
    /// The events, in the order the kernel wrote them.
    pub receiver: mpsc::UnboundedReceiver<FlowEvent>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut waiters = self.waiters.lock();
        for cookie in self.cookies {
            waiters.remove(&cookie);
        }
    }
}

/// Reads the ring buffer for as long as the data plane lives.
pub async fn dispatch(mut events: AsyncFd<RingBuf<MapData>>, waiters: Arc<Waiters>) {
    loop {
        let mut guard = match events.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                log::error!("flow event ring buffer failed: {err}; tunnels fall back to polling");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<FlowEvent>() {
                continue;
            }
            let event: FlowEvent = bytemuck::pod_read_unaligned(&item[..size_of::<FlowEvent>()]);
            waiters.received.fetch_add(1, Ordering::Relaxed);
            if let Some(waiter) = waiters.lock().get(&event.cookie) {
                let _ = waiter.send(event);
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u32, bytes: u64) -> FlowEvent {
        FlowEvent {
            cookie: 7,
            bytes_redirected: bytes,
            kind,
            old_state: 1,
            new_state: 8,
            _pad: 0,
        }
    }

    #[test]
    fn raw_events_become_typed_ones() {
        assert_eq!(
            KernelEvent::from_raw(&raw(FlowEventKind::Drained as u32, 5), Side::Upstream),
            Some(KernelEvent::Drained {
                side: Side::Upstream,
                bytes: 5
            })
        );
        assert_eq!(
            KernelEvent::from_raw(&raw(FlowEventKind::StateChange as u32, 0), Side::Client),
            Some(KernelEvent::StateChange {
                side: Side::Client,
                old: 1,
                new: 8
            })
        );
        assert_eq!(KernelEvent::from_raw(&raw(99, 0), Side::Client), None);
    }

    #[test]
    fn a_dropped_registration_stops_delivery() {
        let waiters = Arc::new(Waiters::default());
        let registration = waiters.register([1, 2]);
        assert_eq!(waiters.lock().len(), 2);
        drop(registration);
        assert!(waiters.lock().is_empty());
    }
}
