//! The bodies a forwarded exchange streams: the client's request body on its
//! way upstream, counted ([`CountingBody`]), and the answer on its way to the
//! client ([`LoggedBody`]), counted and logged when it ends — one access-log
//! record per request, written when the client has had the whole answer or
//! the exchange was cut short. Frames pass one by one; nothing is buffered
//! whole.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::{access_log::AccessRecord, control::ControlPlane};

/// The client's request body, counting the bytes that pass.
#[derive(Debug)]
pub struct CountingBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    /// `inner`, adding the length of every data frame to `count`.
    pub fn new(inner: Incoming, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
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
}

/// An answer's body, counted; logs its transaction when dropped.
pub struct LoggedBody {
    source: Source,
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

    /// A body made here.
    pub fn fixed(body: Bytes, pending: Pending) -> Self {
        Self::with(Source::Fixed((!body.is_empty()).then_some(body)), pending)
    }

    fn with(source: Source, pending: Pending) -> Self {
        Self {
            source,
            sent: 0,
            finished: false,
            failed: None,
            pending: Some(pending),
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Upstream(body) => Pin::new(body).poll_frame(cx),
            Source::Fixed(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finished = true,
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
