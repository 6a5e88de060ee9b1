//! The bodies a forwarded exchange streams: the client's request body on its
//! way upstream, counted ([`CountingBody`]), and the answer on its way to the
//! client ([`LoggedBody`]), counted and logged when it ends — one access-log
//! record per request, written when the client has had the whole answer or
//! the exchange was cut short. Frames pass one by one; nothing is buffered
//! whole. A body whose source sends nothing for `read_timeout` ends with
//! [`BodyError::Idle`], like an idle tunnel.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use crate::{access_log::AccessRecord, control::ControlPlane};

/// Why a forwarded body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Its source sent nothing for this long (`read_timeout`).
    #[error("no body bytes for {0:?} (read_timeout)")]
    Idle(Duration),
    /// Reading it failed (the peer reset, closed early, or broke the framing).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// Measures how long a body has been waiting for its source: only while a
/// poll found nothing, so time spent waiting for the other side to take a
/// frame (backpressure) does not count.
#[derive(Debug)]
struct IdleTimer {
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
}

impl IdleTimer {
    fn new(idle: Duration) -> Self {
        Self {
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }

    /// After `polled`: an idle error instead of `Pending` once the source has
    /// been silent for the whole timeout.
    fn check(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match polled {
            Poll::Ready(ready) => {
                self.waiting = false;
                Poll::Ready(ready.map(|frame| frame.map_err(BodyError::from)))
            }
            Poll::Pending => {
                if !self.waiting {
                    let deadline = tokio::time::Instant::now() + self.idle;
                    self.sleep.as_mut().reset(deadline);
                    self.waiting = true;
                }
                match self.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(self.idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// The client's request body, counting the bytes that pass.
#[derive(Debug)]
pub struct CountingBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
    timer: IdleTimer,
}

impl CountingBody {
    /// `inner`, adding the length of every data frame to `count`; an error
    /// after `idle` without a frame.
    pub fn new(inner: Incoming, count: Arc<AtomicU64>, idle: Duration) -> Self {
        Self {
            inner,
            count,
            timer: IdleTimer::new(idle),
        }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        this.timer.check(cx, polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where an answer's bytes come from.
#[derive(Debug)]
enum Source {
    /// The origin's body.
    Upstream(Incoming),
    /// A body made here (an error answer), sent in one frame.
    Fixed(Option<Bytes>),
}

/// The record to write when the answer ends.
pub struct Pending {
    /// The record, complete but for the byte counts, duration and end.
    pub record: AccessRecord,
    /// Bytes of the answer's head, as counted for `%<st`.
    pub head_len: u64,
    /// Request body bytes read from the client so far.
    pub from_client: Arc<AtomicU64>,
    /// When the request began.
    pub started: Instant,
    /// Where the record goes (the access log in force when it is written).
    pub control: Arc<ControlPlane>,
    /// How long the origin may send nothing (`read_timeout`).
    pub idle: Duration,
}

/// An answer's body, counted; logs its transaction when dropped.
pub struct LoggedBody {
    source: Source,
    timer: IdleTimer,
    sent: u64,
    finished: bool,
    failed: Option<String>,
    pending: Option<Pending>,
}

impl std::fmt::Debug for LoggedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedBody")
            .field("source", &self.source)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl LoggedBody {
    /// The origin's body.
    pub fn upstream(body: Incoming, pending: Pending) -> Self {
        Self::with(Source::Upstream(body), pending)
    }

    /// The body of a `101` whose exchange goes on as a tunnel: logged by
    /// the tunnel when it ends, not here.
    pub fn unlogged(body: Incoming, idle: Duration) -> Self {
        Self {
            source: Source::Upstream(body),
            timer: IdleTimer::new(idle),
            sent: 0,
            finished: false,
            failed: None,
            pending: None,
        }
    }

    /// A body made here.
    pub fn fixed(body: Bytes, pending: Pending) -> Self {
        Self::with(Source::Fixed((!body.is_empty()).then_some(body)), pending)
    }

    fn with(source: Source, pending: Pending) -> Self {
        Self {
            source,
            timer: IdleTimer::new(pending.idle),
            sent: 0,
            finished: false,
            failed: None,
            pending: Some(pending),
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Upstream(body) => Pin::new(body).poll_frame(cx),
            Source::Fixed(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        };
        let polled = this.timer.check(cx, polled);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finished = true,
            Poll::Ready(Some(Err(BodyError::Idle(_)))) => this.failed = Some("idle_timeout".into()),
            Poll::Ready(Some(Err(err))) => this.failed = Some(format!("upstream_error: {err}")),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream(body) => body.is_end_stream(),
            Source::Fixed(body) => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream(body) => body.size_hint(),
            Source::Fixed(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len()) as u64)
            }
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let mut record = pending.record;
        record.bytes_to_client = pending.head_len + self.sent;
        record.bytes_from_client = pending.from_client.load(Ordering::Relaxed);
        record.ts = SystemTime::now();
        record.duration_ms = pending.started.elapsed().as_millis() as u64;
        if record.end.is_empty() {
            record.end = match (&self.failed, self.finished || self.is_end_stream()) {
                (Some(failed), _) => failed.clone(),
                (None, true) => "closed".into(),
                (None, false) => "client_closed".into(),
            };
        }
        pending.control.active().access_log.write(&record);
    }
}
