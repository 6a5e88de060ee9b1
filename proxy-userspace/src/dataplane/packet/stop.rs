//! When a peer has stopped sending: the stop-and-forward cut-over pauses the
//! pump and samples each proxy socket until its peer has sent all its window
//! allows, or nothing for a while. A plain state machine over samples, so
//! the rule is tested without a kernel.
//!
//! A peer judged stopped too early costs time, not bytes: a segment it sends
//! after the hold is dropped and sent again (a loss-recovery episode). One
//! judged too late costs the wait.

use std::time::{Duration, Instant};

/// How long the receive side must not move, with less than one segment of
/// window left, before its peer counts as stopped by the window (a tail
/// segment smaller than the MSS may still come).
pub const WINDOW_SETTLE: Duration = Duration::from_millis(1);
/// How long the receive side must not move, with window left, before its
/// peer counts as idle (plus the connection's round-trip time: a sender
/// waiting for ACKs pauses about that long).
pub const IDLE_SETTLE: Duration = Duration::from_millis(3);
/// Upper bound of the round-trip time added to [`IDLE_SETTLE`].
const RTT_CAP: Duration = Duration::from_millis(100);

/// One look at a proxy socket's receive side (read in repair mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The socket's `rcv_nxt`.
    pub rcv_nxt: u32,
    /// Bytes the peer may still send under the window the socket offered.
    pub room: u32,
    /// Whether the tc program saw a segment of this connection end past
    /// `rcv_nxt` (one the socket has not taken in yet: in flight, or out of
    /// order).
    pub beyond: bool,
}

/// Why a peer counts as stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It sent all the offered window allows (less than a segment is left).
    Window,
    /// It sent nothing for its settle time with window left.
    Idle,
}

/// Watches one connection's receive side.
#[derive(Debug)]
pub struct StopWatch {
    /// The largest segment the peer sends (the socket's announced MSS).
    mss: u32,
    /// How long an idle peer must stay idle.
    settle: Duration,
    /// The last `rcv_nxt` and since when it has not moved.
    still: Option<(u32, Instant)>,
}

impl StopWatch {
    /// A watch for a connection whose peer sends segments of up to `mss`
    /// bytes and whose round-trip time is about `rtt`.
    pub fn new(mss: u32, rtt: Duration) -> Self {
        Self {
            mss: mss.max(1),
            settle: IDLE_SETTLE + rtt.min(RTT_CAP),
            still: None,
        }
    }

    /// Takes a sample at `now`; whether, and why, the peer has stopped.
    pub fn sample(&mut self, sample: Sample, now: Instant) -> Option<Stopped> {
        if sample.beyond {
            self.still = None;
            return None;
        }
        let since = match self.still {
            Some((rcv_nxt, since)) if rcv_nxt == sample.rcv_nxt => since,
            _ => {
                self.still = Some((sample.rcv_nxt, now));
                return None;
            }
        };
        let still_for = now.saturating_duration_since(since);
        if sample.room < self.mss && still_for >= WINDOW_SETTLE {
            Some(Stopped::Window)
        } else if still_for >= self.settle {
            Some(Stopped::Idle)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1448;

    fn sample(rcv_nxt: u32, room: u32) -> Sample {
        Sample {
            rcv_nxt,
            room,
            beyond: false,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_peer_that_used_its_window_stops_after_the_window_settle() {
        let t0 = Instant::now();
        let mut watch = StopWatch::new(MSS, ms(0));
        assert_eq!(watch.sample(sample(100, 500), t0), None);
        assert_eq!(watch.sample(sample(100, 500), t0 + ms(0)), None);
        assert_eq!(
            watch.sample(sample(100, 500), t0 + WINDOW_SETTLE),
            Some(Stopped::Window)
        );
    }

    #[test]
    fn a_moving_stream_never_counts_as_stopped() {
        let t0 = Instant::now();
        let mut watch = StopWatch::new(MSS, ms(0));
        for step in 0..50u32 {
            let at = t0 + ms(u64::from(step));
            assert_eq!(watch.sample(sample(step * 10, 0), at), None, "step {step}");
        }
    }

    #[test]
    fn an_idle_peer_with_window_left_stops_after_its_settle_time() {
        let t0 = Instant::now();
        let rtt = ms(4);
        let mut watch = StopWatch::new(MSS, rtt);
        assert_eq!(watch.sample(sample(7, 1 << 20), t0), None);
        let settle = IDLE_SETTLE + rtt;
        assert_eq!(watch.sample(sample(7, 1 << 20), t0 + settle - ms(1)), None);
        assert_eq!(
            watch.sample(sample(7, 1 << 20), t0 + settle),
            Some(Stopped::Idle)
        );
    }

    #[test]
    fn a_segment_past_rcv_nxt_restarts_the_wait() {
        let t0 = Instant::now();
        let mut watch = StopWatch::new(MSS, ms(0));
        watch.sample(sample(100, 0), t0);
        let beyond = Sample {
            beyond: true,
            ..sample(100, 0)
        };
        assert_eq!(watch.sample(beyond, t0 + ms(5)), None);
        assert_eq!(watch.sample(sample(100, 0), t0 + ms(6)), None);
        assert_eq!(
            watch.sample(sample(100, 0), t0 + ms(7)),
            Some(Stopped::Window)
        );
    }

    #[test]
    fn the_round_trip_time_added_is_capped() {
        let t0 = Instant::now();
        let mut watch = StopWatch::new(MSS, Duration::from_secs(5));
        watch.sample(sample(1, 1 << 20), t0);
        assert_eq!(
            watch.sample(sample(1, 1 << 20), t0 + IDLE_SETTLE + RTT_CAP),
            Some(Stopped::Idle)
        );
    }
}
