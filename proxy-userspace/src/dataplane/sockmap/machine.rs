//! The per-tunnel state machine of the sockmap plane: given the kernel's flow
//! events and what the sockets say, what to do next. It touches no map and no
//! socket, so every transition is unit-tested without a kernel; `tunnel.rs`
//! feeds it and carries out its [`Action`]s.
//!
//! A direction is named by where its bytes go ([`Direction`]); its source is
//! the socket they arrive on. Each direction:
//!
//! * flows (the verdict redirects) until the redirect backlog — bytes the
//!   verdict redirected or user space copied that have not reached the
//!   destination's send queue — passes [`Limits::backlog_high`]: then it is
//!   **paused** (the verdict passes skbs to the source's own queue, charged to
//!   it, so TCP's window stops the sender);
//! * once everything redirected before the pause has reached the destination's
//!   send queue, user space **copies** the passed bytes, and the verdict
//!   resumes redirecting when the copy has caught up;
//! * ends when the source's FIN is known (the kernel's `Drained` event, or a
//!   `TCP_INFO` poll when the event was lost) and every byte before it has
//!   reached the destination's send queue: then the destination is shut down.
//!
//! The tunnel ends `Closed` when both destinations are shut down, and at once
//! on a socket error, an overlap the verdict could not trim, a limit or a
//! shutdown.

use std::time::Duration;

use super::super::{Direction, PerDirection, Side, TunnelEnd};

/// First wait between two checks of a direction that waits for its bytes to
/// reach the destination (paused, or draining after EOF).
pub const CHECK_WAIT_MIN: Duration = Duration::from_millis(1);
/// Longest such wait. A check costs ~8 syscalls (TCP_INFO twice, SIOCOUTQ,
/// map lookups, the wake-up and its epoll), so a direction that never moves —
/// a client that never reads — costs ~32 syscalls/s (`strace -c -f` over 10 s
/// of one such tunnel: 322 and 332 calls); the destination's write-space
/// wake-ups make one that does move react at once.
pub const CHECK_WAIT_MAX: Duration = Duration::from_millis(256);

/// Where a direction stands with flow control.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hold {
    /// The verdict redirects.
    #[default]
    Flowing,
    /// The verdict passes; waiting for the redirected backlog to reach the
    /// destination's send queue before copying.
    Paused,
    /// User space copies the passed bytes.
    Copying,
}

/// The thresholds a tunnel runs with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A direction whose redirect backlog passes this is paused.
    pub backlog_high: u64,
    /// The send buffer a destination gets once its send queue is ¾ full
    /// (0: never raised).
    pub raised_send_buffer: u32,
    /// Whether shutting a destination down waits until every byte reached it
    /// (always, except under `--test-hook no-drain-wait`).
    pub wait_for_drain: bool,
}

/// One direction's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirectionState {
    /// Bytes the source sent in all (after what user space consumed before
    /// insertion), once its FIN is known.
    eof_target: Option<u64>,
    /// The final count of the kernel's `Drained` event.
    drained: Option<u64>,
    /// Whether the destination has been shut down.
    shut: bool,
    hold: Hold,
    /// Passed bytes user space copied to the destination, over all holds.
    copied: u64,
    /// Whether the destination's send buffer was raised already.
    send_buffer_raised: bool,
    /// Whether a user-space copy moves this direction (its source could not
    /// be spliced): the kernel's events about it mean nothing then.
    by_user: bool,
}

impl DirectionState {
    /// Whether the direction waits for bytes to reach its destination. Once
    /// the destination is shut down nothing more goes there, whatever the
    /// hold says: a copy that ends with the stream leaves the direction
    /// `Paused`. (Waiting on it anyway kept its write-space wake-up armed on a
    /// socket shut both ways, which tokio reports ready for good: see
    /// `tunnel.rs::writable`.)
    fn waits_for_destination(&self) -> bool {
        !self.by_user && !self.shut && (self.eof_target.is_some() || self.hold == Hold::Paused)
    }
}

/// What the tunnel task tells the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The kernel's `Drained`: the source's FIN arrived and the verdict handled
    /// `bytes` in all.
    Drained { direction: Direction, bytes: u64 },
    /// A `TCP_INFO` poll found the source past its FIN, having sent `bytes`
    /// (the fallback for a `Drained` event a full ring buffer lost).
    FinObserved { direction: Direction, bytes: u64 },
    /// The kernel's `Progress`, with the destination's state read on arrival.
    Progress {
        /// The direction.
        direction: Direction,
        /// Bytes the verdict has redirected.
        redirected: u64,
        /// Bytes that reached the destination's send queue since insertion.
        reached: u64,
        /// The destination's send queue (`SIOCOUTQ`).
        send_queue: u64,
        /// The destination's send buffer (`SO_SNDBUF`).
        send_buffer: u64,
    },
    /// The verdict met an overlap it could not trim: the direction is broken.
    OverlapNotTrimmed { direction: Direction },
    /// A socket reported an error or a reset.
    SocketError { side: Side },
    /// The copy of a held-back direction ended with `copied` passed bytes
    /// copied in all; `resumed`: the verdict redirects again.
    CopyEnded {
        /// The direction.
        direction: Direction,
        /// Passed bytes copied, over all holds.
        copied: u64,
        /// Whether the verdict switched back to redirecting.
        resumed: bool,
    },
    /// The copy of a held-back direction, or the user-space copy of a
    /// direction that was never spliced, failed.
    CopyFailed { direction: Direction },
    /// The user-space copy of a direction that was never spliced reached its
    /// source's EOF, shut the destination down, and moved `bytes` in all.
    UserCopyEnded { direction: Direction, bytes: u64 },
    /// A limit was exceeded or the proxy shuts down.
    Stop(TunnelEnd),
}

/// What the sockets and maps say now, read when the machine asks
/// ([`Machine::needs_observation`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Bytes that reached each direction's destination send queue since insertion.
    pub reached: PerDirection<u64>,
    /// Bytes the verdict redirected in each direction.
    pub redirected: PerDirection<u64>,
}

/// What the tunnel task must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `shutdown(SHUT_WR)` the direction's destination: every byte reached it.
    ShutDown(Direction),
    /// Set the source's `FLOW_CONTROL` to `PAUSED` (`copied` so far).
    Pause { direction: Direction, copied: u64 },
    /// Give the direction's destination the bigger send buffer.
    RaiseSendBuffer(Direction),
    /// Set the source's `FLOW_CONTROL` to `RESUMING` and copy its passed bytes.
    StartCopy { direction: Direction, copied: u64 },
    /// The tunnel is over: reset both sockets unless it is `Closed`.
    End(TunnelEnd),
}

/// How long the task may sleep before the next [`Machine::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// At most this long (`None`: only events and limits wake the task).
    pub timer: Option<Duration>,
    /// Wake when this direction's destination socket turns writable (its send
    /// queue drained): the directions that wait for their bytes to reach it.
    pub writable: PerDirection<bool>,
}

/// One tunnel's state. See the module documentation.
#[derive(Debug)]
pub struct Machine {
    limits: Limits,
    directions: PerDirection<DirectionState>,
    /// The wait before the next check while a direction waits on its destination.
    check_wait: Duration,
    ended: Option<TunnelEnd>,
}

impl Machine {
    /// A tunnel just spliced.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            directions: PerDirection::default(),
            check_wait: CHECK_WAIT_MIN,
            ended: None,
        }
    }

    /// Hands `direction` to a user-space copy: its source socket could not be
    /// spliced (it saw a FIN just before its insertion), so the verdict never
    /// runs for it; [`Event::UserCopyEnded`] ends it.
    pub fn copy_in_user_space(&mut self, direction: Direction) {
        self.directions[direction].by_user = true;
    }

    /// How the tunnel ended, once it has.
    pub fn ended(&self) -> Option<TunnelEnd> {
        self.ended
    }

    /// Where `direction` stands with flow control.
    #[cfg(test)]
    pub fn hold(&self, direction: Direction) -> Hold {
        self.directions[direction].hold
    }

    /// Each direction's count: the `Drained` event's where it came, else `live`
    /// (the `FLOWS` counters read at the end).
    pub fn moved(&self, live: PerDirection<u64>) -> PerDirection<u64> {
        PerDirection::from_fn(|direction| {
            self.directions[direction]
                .drained
                .unwrap_or(live[direction])
        })
    }

    /// Each direction's count from the kernel's `Drained` event (or the end of
    /// its user-space copy), where one came.
    pub fn drained(&self) -> PerDirection<Option<u64>> {
        self.directions.map(|state| state.drained)
    }

    /// Takes in one event; returns what to do at once.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        if self.ended.is_some() {
            return Vec::new();
        }
        let by_user = |direction: Direction| self.directions[direction].by_user;
        match event {
            Event::Drained { direction, .. }
            | Event::FinObserved { direction, .. }
            | Event::Progress { direction, .. }
            | Event::OverlapNotTrimmed { direction }
                if by_user(direction) =>
            {
                Vec::new()
            }
            Event::UserCopyEnded { direction, bytes } => {
                let state = &mut self.directions[direction];
                state.shut = true;
                state.drained = Some(bytes);
                if self.directions.iter().all(|(_, state)| state.shut) {
                    self.end(TunnelEnd::Closed)
                } else {
                    Vec::new()
                }
            }
            Event::Drained { direction, bytes } => {
                let state = &mut self.directions[direction];
                state.eof_target = Some(bytes);
                state.drained = Some(bytes);
                self.check_wait = CHECK_WAIT_MIN;
                Vec::new()
            }
            Event::FinObserved { direction, bytes } => {
                let state = &mut self.directions[direction];
                if state.eof_target.is_none() {
                    state.eof_target = Some(bytes);
                }
                Vec::new()
            }
            Event::Progress {
                direction,
                redirected,
                reached,
                send_queue,
                send_buffer,
            } => self.progress(direction, redirected, reached, send_queue, send_buffer),
            Event::OverlapNotTrimmed { direction } => self.end(error_of(direction.source())),
            Event::SocketError { side } => self.end(error_of(side)),
            Event::CopyEnded {
                direction,
                copied,
                resumed,
            } => {
                let state = &mut self.directions[direction];
                state.copied = copied;
                state.hold = if resumed { Hold::Flowing } else { Hold::Paused };
                Vec::new()
            }
            Event::CopyFailed { direction } => self.end(error_of(direction.source())),
            Event::Stop(end) => self.end(end),
        }
    }

    /// A `Progress` event: raise the destination's send buffer when its queue
    /// fills, pause the direction when its redirect backlog is too long.
    fn progress(
        &mut self,
        direction: Direction,
        redirected: u64,
        reached: u64,
        send_queue: u64,
        send_buffer: u64,
    ) -> Vec<Action> {
        let limits = self.limits;
        let state = &mut self.directions[direction];
        if state.hold != Hold::Flowing || state.eof_target.is_some() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let target = u64::from(limits.raised_send_buffer);
        if !state.send_buffer_raised
            && target != 0
            && send_buffer < target
            && send_queue * 4 >= send_buffer * 3
        {
            state.send_buffer_raised = true;
            actions.push(Action::RaiseSendBuffer(direction));
        }
        let backlog = (redirected + state.copied).saturating_sub(reached);
        if backlog > limits.backlog_high {
            state.hold = Hold::Paused;
            self.check_wait = CHECK_WAIT_MIN;
            actions.push(Action::Pause {
                direction,
                copied: state.copied,
            });
        }
        actions
    }

    /// Whether [`Machine::check`] needs an [`Observation`]: some direction waits
    /// for its bytes to reach the destination.
    pub fn needs_observation(&self) -> bool {
        self.ended.is_none()
            && self
                .directions
                .iter()
                .any(|(_, state)| state.waits_for_destination())
    }

    /// Decides what the sockets' state allows now: shut down the destinations
    /// every byte reached, start the copies whose backlog went out, end the
    /// tunnel when both directions are shut down.
    pub fn check(&mut self, observed: &Observation) -> Vec<Action> {
        if self.ended.is_some() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        for direction in Direction::BOTH {
            let wait_for_drain = self.limits.wait_for_drain;
            let state = &mut self.directions[direction];
            if state.by_user {
                continue;
            }
            if let Some(target) = state.eof_target {
                if !state.shut && (!wait_for_drain || observed.reached[direction] >= target) {
                    state.shut = true;
                    actions.push(Action::ShutDown(direction));
                }
            }
            if state.hold == Hold::Paused
                && !state.shut
                && observed.reached[direction] >= observed.redirected[direction] + state.copied
            {
                state.hold = Hold::Copying;
                actions.push(Action::StartCopy {
                    direction,
                    copied: state.copied,
                });
            }
        }
        if self.directions.iter().all(|(_, state)| state.shut) {
            actions.extend(self.end(TunnelEnd::Closed));
        }
        self.check_wait = if actions.is_empty() {
            (self.check_wait * 2).min(CHECK_WAIT_MAX)
        } else {
            CHECK_WAIT_MIN
        };
        actions
    }

    /// A destination turned writable: its receiver made progress, so look
    /// again soon.
    pub fn destination_writable(&mut self) {
        self.check_wait = CHECK_WAIT_MIN;
    }

    /// How long the task may sleep: while a direction waits on its
    /// destination, the back-off of [`Machine::check`] and write-space
    /// wake-ups; otherwise only events and limits wake it.
    pub fn wait(&self) -> Wait {
        let writable = self
            .directions
            .map(|state| self.ended.is_none() && state.waits_for_destination());
        Wait {
            timer: writable.0.contains(&true).then_some(self.check_wait),
            writable,
        }
    }

    fn end(&mut self, end: TunnelEnd) -> Vec<Action> {
        if self.ended.is_some() {
            return Vec::new();
        }
        self.ended = Some(end);
        vec![Action::End(end)]
    }
}

/// The end a failure of `side`'s socket or stream means.
fn error_of(side: Side) -> TunnelEnd {
    match side {
        Side::Client => TunnelEnd::ClientError,
        Side::Upstream => TunnelEnd::UpstreamError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Direction = Direction::ClientToUpstream;
    const DOWN: Direction = Direction::UpstreamToClient;

    fn machine() -> Machine {
        Machine::new(Limits {
            backlog_high: 100,
            raised_send_buffer: 1000,
            wait_for_drain: true,
        })
    }

    fn observed(reached: [u64; 2], redirected: [u64; 2]) -> Observation {
        Observation {
            reached: PerDirection(reached),
            redirected: PerDirection(redirected),
        }
    }

    fn progress(direction: Direction, redirected: u64, reached: u64) -> Event {
        Event::Progress {
            direction,
            redirected,
            reached,
            send_queue: 0,
            send_buffer: 4000,
        }
    }

    #[test]
    fn a_quiet_tunnel_waits_only_for_events() {
        let machine = machine();
        assert!(!machine.needs_observation());
        assert_eq!(
            machine.wait(),
            Wait {
                timer: None,
                writable: PerDirection([false, false])
            }
        );
    }

    #[test]
    fn each_direction_shuts_its_destination_once_every_byte_reached_it() {
        let mut machine = machine();
        assert!(machine
            .handle(Event::Drained {
                direction: UP,
                bytes: 50
            })
            .is_empty());
        assert!(machine.needs_observation());
        assert_eq!(machine.wait().writable, PerDirection([true, false]));
        assert!(machine.check(&observed([49, 0], [50, 0])).is_empty());
        assert_eq!(
            machine.check(&observed([50, 0], [50, 0])),
            [Action::ShutDown(UP)]
        );
        assert!(!machine.needs_observation());
        assert!(machine.check(&observed([50, 0], [50, 0])).is_empty());
        machine.handle(Event::Drained {
            direction: DOWN,
            bytes: 0,
        });
        assert_eq!(
            machine.check(&observed([50, 0], [50, 0])),
            [Action::ShutDown(DOWN), Action::End(TunnelEnd::Closed)]
        );
        assert_eq!(machine.ended(), Some(TunnelEnd::Closed));
        assert_eq!(machine.moved(PerDirection([1, 1])), PerDirection([50, 0]));
    }

    #[test]
    fn without_the_drain_wait_the_destination_is_shut_at_once() {
        let mut machine = Machine::new(Limits {
            wait_for_drain: false,
            ..machine().limits
        });
        machine.handle(Event::Drained {
            direction: UP,
            bytes: 50,
        });
        assert_eq!(
            machine.check(&observed([0, 0], [0, 0])),
            [Action::ShutDown(UP)]
        );
    }

    #[test]
    fn a_polled_fin_stands_in_for_a_lost_drained_event_but_not_over_one() {
        let mut machine = machine();
        machine.handle(Event::FinObserved {
            direction: DOWN,
            bytes: 10,
        });
        machine.handle(Event::Drained {
            direction: DOWN,
            bytes: 12,
        });
        machine.handle(Event::FinObserved {
            direction: DOWN,
            bytes: 11,
        });
        assert!(machine.check(&observed([0, 11], [0, 12])).is_empty());
        assert_eq!(
            machine.check(&observed([0, 12], [0, 12])),
            [Action::ShutDown(DOWN)]
        );
        // Without any Drained event the live count stands.
        assert_eq!(machine.moved(PerDirection([3, 9])), PerDirection([3, 12]));
    }

    #[test]
    fn a_long_backlog_pauses_then_copies_then_resumes() {
        let mut machine = machine();
        assert!(machine.handle(progress(UP, 100, 0)).is_empty());
        assert_eq!(
            machine.handle(progress(UP, 201, 100)),
            [Action::Pause {
                direction: UP,
                copied: 0
            }]
        );
        assert_eq!(machine.hold(UP), Hold::Paused);
        // Further progress while paused changes nothing.
        assert!(machine.handle(progress(UP, 400, 100)).is_empty());
        assert!(machine.check(&observed([200, 0], [201, 0])).is_empty());
        assert_eq!(
            machine.check(&observed([201, 0], [201, 0])),
            [Action::StartCopy {
                direction: UP,
                copied: 0
            }]
        );
        assert_eq!(machine.hold(UP), Hold::Copying);
        assert!(!machine.needs_observation());
        machine.handle(Event::CopyEnded {
            direction: UP,
            copied: 30,
            resumed: true,
        });
        assert_eq!(machine.hold(UP), Hold::Flowing);
        // The copied bytes count in the next backlog.
        assert_eq!(
            machine.handle(progress(UP, 300, 220)),
            [Action::Pause {
                direction: UP,
                copied: 30
            }]
        );
        assert!(machine.check(&observed([330, 0], [301, 0])).is_empty());
        assert_eq!(
            machine.check(&observed([331, 0], [301, 0])),
            [Action::StartCopy {
                direction: UP,
                copied: 30
            }]
        );
    }

    #[test]
    fn a_copy_that_ends_with_the_stream_leaves_the_direction_paused() {
        let mut machine = machine();
        machine.handle(progress(DOWN, 500, 0));
        machine.check(&observed([0, 500], [0, 500]));
        machine.handle(Event::CopyEnded {
            direction: DOWN,
            copied: 7,
            resumed: false,
        });
        assert_eq!(machine.hold(DOWN), Hold::Paused);
        machine.handle(Event::Drained {
            direction: DOWN,
            bytes: 507,
        });
        assert_eq!(
            machine.check(&observed([0, 507], [0, 500])),
            [Action::ShutDown(DOWN)]
        );
    }

    #[test]
    fn a_direction_shut_after_its_last_copy_waits_no_more() {
        let mut machine = machine();
        machine.handle(progress(UP, 500, 0));
        machine.check(&observed([500, 0], [500, 0]));
        machine.handle(Event::Drained {
            direction: UP,
            bytes: 507,
        });
        machine.handle(Event::CopyEnded {
            direction: UP,
            copied: 7,
            resumed: false,
        });
        assert_eq!(machine.hold(UP), Hold::Paused);
        assert_eq!(
            machine.check(&observed([507, 0], [500, 0])),
            [Action::ShutDown(UP)]
        );
        // Paused still, but shut: neither checks nor write-space wake-ups.
        assert!(!machine.needs_observation());
        assert_eq!(
            machine.wait(),
            Wait {
                timer: None,
                writable: PerDirection([false, false])
            }
        );
        // The other direction's copy still starts and ends the tunnel.
        machine.handle(progress(DOWN, 300, 0));
        assert_eq!(machine.wait().writable, PerDirection([false, true]));
        assert_eq!(
            machine.check(&observed([507, 300], [500, 300])),
            [Action::StartCopy {
                direction: DOWN,
                copied: 0
            }]
        );
        machine.handle(Event::Drained {
            direction: DOWN,
            bytes: 310,
        });
        machine.handle(Event::CopyEnded {
            direction: DOWN,
            copied: 10,
            resumed: false,
        });
        assert_eq!(
            machine.check(&observed([507, 310], [500, 300])),
            [Action::ShutDown(DOWN), Action::End(TunnelEnd::Closed)]
        );
    }

    #[test]
    fn progress_after_eof_does_not_pause() {
        let mut machine = machine();
        machine.handle(Event::Drained {
            direction: UP,
            bytes: 900,
        });
        assert!(machine.handle(progress(UP, 900, 0)).is_empty());
    }

    #[test]
    fn a_filling_send_queue_raises_the_buffer_once() {
        let mut machine = machine();
        let full = |queue| Event::Progress {
            direction: DOWN,
            redirected: 10,
            reached: 10,
            send_queue: queue,
            send_buffer: 400,
        };
        assert!(machine.handle(full(299)).is_empty());
        assert_eq!(machine.handle(full(300)), [Action::RaiseSendBuffer(DOWN)]);
        assert!(machine.handle(full(400)).is_empty());
    }

    #[test]
    fn errors_and_stops_end_the_tunnel_once() {
        let mut machine = machine();
        assert_eq!(
            machine.handle(Event::SocketError {
                side: Side::Upstream
            }),
            [Action::End(TunnelEnd::UpstreamError)]
        );
        assert!(machine.handle(Event::Stop(TunnelEnd::Shutdown)).is_empty());
        assert!(machine.check(&observed([9, 9], [9, 9])).is_empty());
        assert_eq!(machine.ended(), Some(TunnelEnd::UpstreamError));

        let mut machine = super::tests::machine();
        assert_eq!(
            machine.handle(Event::OverlapNotTrimmed { direction: DOWN }),
            [Action::End(TunnelEnd::UpstreamError)]
        );
        let mut machine = super::tests::machine();
        assert_eq!(
            machine.handle(Event::CopyFailed { direction: UP }),
            [Action::End(TunnelEnd::ClientError)]
        );
        let mut machine = super::tests::machine();
        assert_eq!(
            machine.handle(Event::Stop(TunnelEnd::IdleTimeout)),
            [Action::End(TunnelEnd::IdleTimeout)]
        );
    }

    #[test]
    fn a_direction_copied_in_user_space_ignores_the_kernel_and_ends_with_its_copy() {
        let mut machine = machine();
        machine.copy_in_user_space(DOWN);
        for event in [
            Event::Drained {
                direction: DOWN,
                bytes: 0,
            },
            Event::FinObserved {
                direction: DOWN,
                bytes: 5,
            },
            progress(DOWN, 1000, 0),
            Event::OverlapNotTrimmed { direction: DOWN },
        ] {
            assert!(machine.handle(event).is_empty(), "{event:?}");
        }
        assert!(!machine.needs_observation());
        machine.handle(Event::Drained {
            direction: UP,
            bytes: 9,
        });
        assert_eq!(
            machine.check(&observed([9, 0], [9, 0])),
            [Action::ShutDown(UP)]
        );
        assert_eq!(
            machine.handle(Event::UserCopyEnded {
                direction: DOWN,
                bytes: 77
            }),
            [Action::End(TunnelEnd::Closed)]
        );
        assert_eq!(machine.moved(PerDirection([0, 0])), PerDirection([9, 77]));
    }

    #[test]
    fn waiting_backs_off_and_writable_wakes_reset_it() {
        let mut machine = machine();
        machine.handle(progress(UP, 1000, 0));
        let mut waits = Vec::new();
        for _ in 0..12 {
            machine.check(&observed([0, 0], [1000, 0]));
            waits.push(machine.wait().timer.unwrap());
        }
        assert_eq!(waits[0], Duration::from_millis(2));
        assert_eq!(waits[1], Duration::from_millis(4));
        assert_eq!(*waits.last().unwrap(), CHECK_WAIT_MAX);
        assert_eq!(machine.wait().writable, PerDirection([true, false]));
        machine.destination_writable();
        assert_eq!(machine.wait().timer, Some(CHECK_WAIT_MIN));
    }
}
