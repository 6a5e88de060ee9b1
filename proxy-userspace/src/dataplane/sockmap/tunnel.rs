//! One tunnel on the sockmap plane: inserting its sockets, then the thin
//! adapter between the kernel and [`Machine`]: it turns flow events, socket
//! readings and timers into machine events and carries out the actions.
//!
//! Insertion, in an order where a redirect can never find its peer missing:
//! snapshot each socket's write position, register for events, insert the
//! `FLOWS` entries, then both sockets into `REDIRECT_TARGETS` (no program), then
//! into `SPLICED` (verdict attached), then kick both with `SO_RCVLOWAT` so bytes
//! queued before insertion are processed now and not when the next segment
//! arrives. Every failure before the first socket is in `SPLICED` hands the
//! untouched tunnel to the fallback plane; a failure after it (the verdict may
//! have redirected bytes already) resets both sockets, so no stream can get a
//! hole.

use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use proxy_common::{flow_mode, tcp_state, FlowEntry};
use tokio::io::{unix::AsyncFd, Interest};

use super::{
    events::{KernelEvent, Registration},
    hold::{self, CopyEnd},
    kernel::SockMap,
    machine::{Action, Event, Machine, Observation},
    Shared,
};
use crate::{
    config::TestHook,
    dataplane::{
        copy,
        pump::{self, Moved},
        Direction, LimitClock, PerDirection, PerSide, PlaneKind, Progress, Side, Tunnel, TunnelEnd,
        TunnelLimits, TunnelOutcome,
    },
    sockopt,
};

/// How often an open tunnel re-reads its sockets' TCP state, in case a flow event
/// was lost (ring buffer full); events normally make this unnecessary.
const SAFETY_POLL: Duration = Duration::from_secs(1);

/// The user-space copy of a held-back direction.
type CopyTask = tokio::task::JoinHandle<anyhow::Result<CopyEnd>>;
/// The user-space copy of a direction whose source was never spliced; returns
/// the bytes it moved.
type UserCopyTask = tokio::task::JoinHandle<anyhow::Result<u64>>;

/// Runs `tunnel` on the sockmap plane, or on the fallback when its sockets
/// cannot be spliced.
pub async fn run(shared: Arc<Shared>, tunnel: Tunnel) -> TunnelOutcome {
    if shared.hooks.has(TestHook::DelayBeforeSplice) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !tunnel.client_queue_clean {
        log::debug!(
            "sockmap: client socket has a half-read segment; using the fallback data plane"
        );
        return shared.fallback.run(tunnel).await;
    }
    let Tunnel {
        client,
        upstream,
        client_bytes_consumed,
        upstream_bytes_consumed,
        client_queue_clean,
        limits,
        shutdown,
        progress,
        draining,
        handover,
    } = tunnel;
    let hand_back = |client, upstream| Tunnel {
        client,
        upstream,
        client_bytes_consumed,
        upstream_bytes_consumed,
        client_queue_clean,
        limits,
        shutdown: shutdown.clone(),
        progress: progress.clone(),
        draining: draining.clone(),
        handover: handover.clone(),
    };
    let sockets = match Sockets::read(&client, &upstream) {
        Ok(sockets) => sockets,
        Err(err) => {
            log::debug!("sockmap: {err:#}; using the fallback data plane");
            return shared.fallback.run(hand_back(client, upstream)).await;
        }
    };
    // Spliced sockets are taken out of tokio's reactor: the kernel's write-space
    // wake-ups on them would otherwise wake the process for every ACK.
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(err), _) | (_, Err(err)) => {
            log::error!("sockmap: cannot take the sockets out of the reactor: {err}");
            return outcome(PerDirection::default(), TunnelEnd::ClientError);
        }
    };
    let registration = shared.waiters.register(sockets.cookies.0);
    let pair = SplicedPair {
        shared: &shared,
        sockets: PerSide::new(&client, &upstream),
        cookies: sockets.cookies,
        written_before: sockets.written_before,
        consumed: PerSide::new(client_bytes_consumed, upstream_bytes_consumed),
    };
    let result = match pair.insert().await {
        Inserted::Spliced => Some(
            pair.run(registration, shutdown.clone(), &progress, limits, None)
                .await,
        ),
        Inserted::Partial(err) => {
            log::debug!(
                "sockmap: {err:#}; its bytes to the client are copied in user space, the client's spliced"
            );
            let by_user = Direction::UpstreamToClient;
            Some(
                pair.run(
                    registration,
                    shutdown.clone(),
                    &progress,
                    limits,
                    Some(by_user),
                )
                .await,
            )
        }
        Inserted::No(err) => {
            log::debug!("sockmap: tunnel not spliced ({err:#}); using the fallback data plane");
            drop(registration);
            None
        }
        Inserted::Broken(side, err) => {
            log::warn!(
                "sockmap: splicing failed half-way ({err:#}); resetting both sockets of the tunnel"
            );
            drop(registration);
            for socket in pair.sockets.0 {
                pump::reset(socket);
            }
            Some(outcome(pair.remove_flows(), error_of(side)))
        }
    };
    if let Some(result) = result {
        return result;
    }
    pair.remove_flows();
    match (
        tokio::net::TcpStream::from_std(client),
        tokio::net::TcpStream::from_std(upstream),
    ) {
        (Ok(client), Ok(upstream)) => shared.fallback.run(hand_back(client, upstream)).await,
        (Err(err), _) | (_, Err(err)) => {
            log::error!("sockmap: cannot hand the sockets to the fallback: {err}");
            outcome(PerDirection::default(), TunnelEnd::ClientError)
        }
    }
}

fn outcome(moved: PerDirection<u64>, end: TunnelEnd) -> TunnelOutcome {
    TunnelOutcome {
        client_to_upstream: moved[Direction::ClientToUpstream],
        upstream_to_client: moved[Direction::UpstreamToClient],
        dataplane: PlaneKind::Sockmap,
        end,
    }
}

/// The end a failure of `side`'s socket means.
fn error_of(side: Side) -> TunnelEnd {
    match side {
        Side::Client => TunnelEnd::ClientError,
        Side::Upstream => TunnelEnd::UpstreamError,
    }
}

/// What a tunnel's sockets say before insertion.
struct Sockets {
    cookies: PerSide<u64>,
    written_before: PerSide<u64>,
}

impl Sockets {
    /// Reads both sockets' cookies and write positions, and checks that both
    /// are still established: a socket past its FIN cannot be inserted, and
    /// finding that out half-way would leave one socket spliced.
    fn read(client: &impl AsFd, upstream: &impl AsFd) -> anyhow::Result<Self> {
        let sockets = [client.as_fd(), upstream.as_fd()];
        let mut cookies = [0; 2];
        let mut written_before = [0; 2];
        for (index, socket) in sockets.into_iter().enumerate() {
            let side = if index == 0 { "client" } else { "upstream" };
            cookies[index] = sockopt::cookie(socket).context("no socket cookie")?;
            let state = sockopt::tcp_info(socket).context("TCP_INFO")?.state;
            anyhow::ensure!(
                u32::from(state) == tcp_state::ESTABLISHED,
                "the {side} socket is no longer established (TCP state {state})"
            );
            written_before[index] = stable_bytes_written(socket)?;
        }
        Ok(Self {
            cookies: PerSide(cookies),
            written_before: PerSide(written_before),
        })
    }
}

/// `sockopt::bytes_written`, read until two reads agree (an ACK can land between
/// the two syscalls it makes).
fn stable_bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut last = sockopt::bytes_written(fd)?;
    for _ in 0..16 {
        let now = sockopt::bytes_written(fd)?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn is_fin_received(state: u8) -> bool {
    matches!(
        u32::from(state),
        tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING
            | tcp_state::TIME_WAIT
            | tcp_state::CLOSE
    )
}

/// How far insertion got.
enum Inserted {
    /// Both sockets are spliced and kicked.
    Spliced,
    /// The client's socket is spliced and kicked, the upstream's could not be
    /// (it saw a FIN after the check before insertion): the verdict moves the
    /// client's bytes, user space copies the upstream's last ones.
    Partial(anyhow::Error),
    /// Neither socket reached `SPLICED`: the fallback can take the tunnel as is.
    No(anyhow::Error),
    /// A socket is in `SPLICED` but the rest failed (this side's step): the
    /// verdict may have moved bytes, so the tunnel must be reset.
    Broken(Side, anyhow::Error),
}

/// Both sockets of a tunnel while they are spliced.
struct SplicedPair<'a> {
    shared: &'a Arc<Shared>,
    sockets: PerSide<&'a TcpStream>,
    cookies: PerSide<u64>,
    /// Bytes written into each socket before insertion (its write position then).
    written_before: PerSide<u64>,
    /// Bytes user space read from each socket before insertion.
    consumed: PerSide<u64>,
}

impl SplicedPair<'_> {
    /// Inserts both sockets (see the module documentation for the order).
    async fn insert(&self) -> Inserted {
        let kernel = &self.shared.kernel;
        let hooks = &self.shared.hooks;
        let mut partial = None;
        for (side, &cookie) in self.cookies.iter() {
            let entry = FlowEntry {
                peer_cookie: self.cookies[side.peer()],
                consumed_by_user: self.consumed[side],
                ..FlowEntry::default()
            };
            if let Err(err) = kernel.insert_flow(cookie, entry) {
                return Inserted::No(err);
            }
        }
        if hooks.has(TestHook::VerdictBeforeTargets) {
            if let Err((side, err)) = self.insert_into(SockMap::Spliced) {
                return Inserted::Broken(side, err);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Err((side, err)) = self.insert_into(SockMap::Targets) {
                return Inserted::Broken(side, err);
            }
        } else {
            if let Err((_, err)) = self.insert_into(SockMap::Targets) {
                return Inserted::No(err);
            }
            match self.insert_into(SockMap::Spliced) {
                Ok(()) => {}
                Err((Side::Client, err)) => return Inserted::No(err),
                Err((Side::Upstream, err)) => partial = Some(err),
            }
        }
        if !hooks.has(TestHook::NoRcvlowatKick) {
            for (side, socket) in self.sockets.iter() {
                if side == Side::Upstream && partial.is_some() {
                    continue;
                }
                let kicked = if hooks.has(TestHook::FailKick) {
                    Err(io::Error::other("--test-hook fail-kick"))
                } else {
                    sockopt::set_rcvlowat(socket.as_fd(), 1)
                };
                if let Err(err) = kicked {
                    return Inserted::Broken(
                        side,
                        anyhow::Error::new(err).context("SO_RCVLOWAT kick"),
                    );
                }
            }
        }
        match partial {
            Some(err) => Inserted::Partial(err),
            None => Inserted::Spliced,
        }
    }

    /// Inserts the client's socket, then the upstream's, into `map`; says
    /// which one failed.
    fn insert_into(&self, map: SockMap) -> Result<(), (Side, anyhow::Error)> {
        for (side, socket) in self.sockets.iter() {
            let inserted = if map == SockMap::Spliced
                && side == Side::Upstream
                && self.shared.hooks.has(TestHook::FailSecondInsert)
            {
                Err(io::Error::other("--test-hook fail-second-insert"))
            } else {
                self.shared
                    .kernel
                    .insert_socket(map, self.cookies[side], socket.as_fd())
            };
            inserted.map_err(|err| {
                let state = sockopt::tcp_info(socket.as_fd())
                    .map_or_else(|err| err.to_string(), |info| info.state.to_string());
                (
                    side,
                    anyhow::Error::new(err).context(format!(
                        "inserting the {} socket into {map:?} (TCP state {state})",
                        side.as_str()
                    )),
                )
            })?;
        }
        Ok(())
    }

    /// The `FLOWS` entry of the socket `direction`'s bytes arrive on.
    fn flow(&self, direction: Direction) -> FlowEntry {
        self.shared.kernel.flow(self.cookies[direction.source()])
    }

    /// Bytes the verdict handled (redirected or passed) in each direction so far.
    fn handled(&self) -> PerDirection<u64> {
        PerDirection::from_fn(|direction| {
            let entry = self.flow(direction);
            entry.bytes_redirected + entry.bytes_passed
        })
    }

    /// Reads the final counters, adds them to the plane's, and deletes the
    /// `FLOWS` entries.
    fn remove_flows(&self) -> PerDirection<u64> {
        let counters = &self.shared.counters;
        PerDirection::from_fn(|direction| {
            let entry = self
                .shared
                .kernel
                .remove_flow(self.cookies[direction.source()]);
            counters
                .redirected
                .fetch_add(entry.bytes_redirected, std::sync::atomic::Ordering::Relaxed);
            counters
                .passed
                .fetch_add(entry.bytes_passed, std::sync::atomic::Ordering::Relaxed);
            entry.bytes_redirected + entry.bytes_passed
        })
    }

    /// Bytes that reached `direction`'s destination send queue since insertion.
    fn reached(&self, direction: Direction) -> io::Result<u64> {
        let side = direction.destination();
        Ok(sockopt::bytes_written(self.sockets[side].as_fd())?
            .saturating_sub(self.written_before[side]))
    }

    /// What the machine needs to know now: only the directions that wait for
    /// their destination are read.
    fn observe(&self, machine: &Machine) -> Observation {
        let waiting = machine.wait().writable;
        let mut observed = Observation::default();
        for direction in Direction::BOTH {
            if waiting[direction] {
                observed.reached[direction] = self.reached(direction).unwrap_or(0);
                observed.redirected[direction] = self.flow(direction).bytes_redirected;
            }
        }
        observed
    }

    /// A reset or error on either socket.
    fn socket_error(&self) -> Option<Side> {
        self.sockets.iter().find_map(|(side, socket)| {
            let err = sockopt::take_error(socket.as_fd()).ok().flatten()?;
            log::debug!("sockmap tunnel: {} socket error: {err}", side.as_str());
            Some(side)
        })
    }

    /// The `TCP_INFO` fallback for `Drained` events a full ring buffer lost:
    /// a source past its FIN, with how many bytes it sent in all.
    fn fin_observed(&self, direction: Direction) -> Option<Event> {
        let side = direction.source();
        let info = sockopt::tcp_info(self.sockets[side].as_fd()).ok()?;
        is_fin_received(info.state).then(|| Event::FinObserved {
            direction,
            // bytes_received counts the FIN's sequence number too.
            bytes: info
                .bytes_received
                .saturating_sub(1)
                .saturating_sub(self.consumed[side]),
        })
    }

    /// A `Progress` event with the destination's state read now.
    fn progress_event(&self, direction: Direction, redirected: u64) -> Event {
        let destination = self.sockets[direction.destination()];
        Event::Progress {
            direction,
            redirected,
            reached: self.reached(direction).unwrap_or(0),
            send_queue: sockopt::send_queue_len(destination.as_fd()).unwrap_or(0),
            send_buffer: socket2::SockRef::from(destination)
                .send_buffer_size()
                .unwrap_or(0) as u64,
        }
    }

    /// Drives the spliced tunnel to its end.
    ///
    /// Each direction ends with the kernel's `Drained` event, sent when the
    /// verdict has redirected every byte the peer sent before its FIN; it carries
    /// the direction's final count. (A plain state-change event cannot: the state
    /// changes inside tcp_fin(), before tcp_data_ready() runs the verdict over the
    /// segment that carried the FIN.)
    async fn run(
        &self,
        mut registration: Registration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        progress: &Progress,
        limits: TunnelLimits,
        by_user: Option<Direction>,
    ) -> TunnelOutcome {
        let mut machine = Machine::new(self.shared.limits);
        let mut clock = LimitClock::start(limits);
        let mut copies: PerDirection<Option<CopyTask>> = PerDirection::default();
        let mut user_copy = None;
        if let Some(direction) = by_user {
            machine.copy_in_user_space(direction);
            match self.spawn_user_copy(direction, progress) {
                Ok(task) => user_copy = Some((direction, task)),
                Err(err) => {
                    log::debug!("sockmap tunnel: {err:#}");
                    machine.handle(Event::CopyFailed { direction });
                }
            }
        }
        let mut writable = Writable::default();
        let mut last_poll = tokio::time::Instant::now();
        let end = loop {
            if machine.needs_observation() {
                let actions = machine.check(&self.observe(&machine));
                self.perform(&mut machine, actions, &mut copies);
            }
            if let Some(end) = machine.ended() {
                break end;
            }
            let wait = machine.wait();
            writable.follow(wait.writable, &self.sockets);
            let timer = wait
                .timer
                .unwrap_or(SAFETY_POLL)
                .min(clock.next_check(SAFETY_POLL));
            let [client_copy, upstream_copy] = &mut copies.0;
            let mut events = Vec::new();
            tokio::select! {
                event = registration.receiver.recv() => {
                    // Take every queued event at once; flow control looks at
                    // the newest progress only, so a busy task cannot fall
                    // behind the kernel event by event.
                    let mut next = event;
                    while let Some(raw) = next {
                        log::trace!("flow event {raw:?}");
                        if let Some(side) = self.cookies.iter().find_map(|(side, &c)| (c == raw.cookie).then_some(side)) {
                            events.extend(KernelEvent::from_raw(&raw, side));
                        }
                        next = registration.receiver.try_recv().ok();
                    }
                }
                () = tokio::time::sleep(timer) => {}
                () = writable.ready() => machine.destination_writable(),
                _ = shutdown.wait_for(|closing| *closing) => {
                    events.clear();
                    let actions = machine.handle(Event::Stop(TunnelEnd::Shutdown));
                    self.perform(&mut machine, actions, &mut copies);
                }
                result = join_copy(client_copy), if client_copy.is_some() => {
                    *client_copy = None;
                    self.copy_ended(&mut machine, Direction::ClientToUpstream, result, &mut copies);
                }
                result = join_copy(upstream_copy), if upstream_copy.is_some() => {
                    *upstream_copy = None;
                    self.copy_ended(&mut machine, Direction::UpstreamToClient, result, &mut copies);
                }
                result = join_user_copy(&mut user_copy), if user_copy.is_some() => {
                    let (direction, _) = user_copy.take().expect("checked");
                    let event = match result {
                        Ok(bytes) => Event::UserCopyEnded { direction, bytes },
                        Err(err) => {
                            log::debug!("sockmap tunnel: {} copy: {err:#}", direction.as_str());
                            Event::CopyFailed { direction }
                        }
                    };
                    let actions = machine.handle(event);
                    self.perform(&mut machine, actions, &mut copies);
                }
            }
            self.kernel_events(&mut machine, &events, &mut copies);
            // Events drive the tunnel; a TCP_INFO poll now and then covers any that
            // a full ring buffer lost.
            if last_poll.elapsed() >= SAFETY_POLL.min(clock.next_check(SAFETY_POLL)) {
                last_poll = tokio::time::Instant::now();
                let mut polled: Vec<Event> = Direction::BOTH
                    .into_iter()
                    .filter_map(|direction| self.fin_observed(direction))
                    .collect();
                polled.extend(self.socket_error().map(|side| Event::SocketError { side }));
                let handled = self.handled();
                progress.advance_to(PlaneKind::Sockmap, handled);
                polled.extend(clock.check(handled.0.iter().sum()).map(Event::Stop));
                for event in polled {
                    let actions = machine.handle(event);
                    self.perform(&mut machine, actions, &mut copies);
                }
            }
        };
        for copy in copies.0.iter().flatten() {
            copy.abort();
        }
        if let Some((_, task)) = &user_copy {
            task.abort();
        }
        if end != TunnelEnd::Closed {
            for socket in self.sockets.0 {
                pump::reset(socket);
            }
        }
        // The kernel's Drained events carry each direction's final count; the map
        // is read only when a direction never drained (reset) or its event was lost.
        let live = self.remove_flows();
        let moved = machine.moved(live);
        log::debug!(
            "sockmap tunnel ended ({end:?}): moved {:?}, map {:?}, from events {:?}",
            moved.0,
            live.0,
            machine.drained().0
        );
        outcome(moved, end)
    }

    /// Copies `direction` in user space to its source's EOF, then shuts its
    /// destination down (the copy plane's loop, on duplicates of the sockets
    /// registered with tokio for this copy only).
    fn spawn_user_copy(
        &self,
        direction: Direction,
        progress: &Progress,
    ) -> anyhow::Result<UserCopyTask> {
        let source =
            tokio::net::TcpStream::from_std(self.sockets[direction.source()].try_clone()?)?;
        let destination =
            tokio::net::TcpStream::from_std(self.sockets[direction.destination()].try_clone()?)?;
        let moved = Moved::new(progress, PlaneKind::Sockmap, direction);
        Ok(tokio::spawn(async move {
            copy::copy_one_way(&source, &destination, &moved, direction.source())
                .await
                .map_err(anyhow::Error::new)?;
            Ok(moved.get())
        }))
    }

    /// Feeds a batch of kernel events to the machine.
    fn kernel_events(
        &self,
        machine: &mut Machine,
        events: &[KernelEvent],
        copies: &mut PerDirection<Option<CopyTask>>,
    ) {
        let mut newest_progress: PerDirection<Option<u64>> = PerDirection::default();
        let mut checked_errors = false;
        for &event in events {
            let event = match event {
                KernelEvent::Drained { side, bytes } => Event::Drained {
                    direction: side.outbound(),
                    bytes,
                },
                KernelEvent::Progress { side, redirected } => {
                    newest_progress[side.outbound()] = Some(redirected);
                    continue;
                }
                KernelEvent::OverlapNotTrimmed { side } => {
                    log::warn!(
                        "sockmap tunnel reset: a retransmission from the {} repeated more bytes than the verdict can trim",
                        side.as_str()
                    );
                    Event::OverlapNotTrimmed {
                        direction: side.outbound(),
                    }
                }
                // A reset or a timeout changes the TCP state: that is when
                // the sockets' errors are worth reading.
                KernelEvent::StateChange { .. } if !checked_errors => {
                    checked_errors = true;
                    match self.socket_error() {
                        Some(side) => Event::SocketError { side },
                        None => continue,
                    }
                }
                KernelEvent::StateChange { .. } => continue,
            };
            let actions = machine.handle(event);
            self.perform(machine, actions, copies);
        }
        for (direction, redirected) in newest_progress.iter() {
            if let Some(redirected) = *redirected {
                let actions = machine.handle(self.progress_event(direction, redirected));
                self.perform(machine, actions, copies);
            }
        }
    }

    /// A copy task ended.
    fn copy_ended(
        &self,
        machine: &mut Machine,
        direction: Direction,
        result: anyhow::Result<CopyEnd>,
        copies: &mut PerDirection<Option<CopyTask>>,
    ) {
        let event = match result {
            Ok(CopyEnd { copied, resumed }) => {
                log::debug!(
                    "flow control: {} copy ended at copied {copied}, resumed {resumed}, entry {:?}",
                    direction.as_str(),
                    self.flow(direction)
                );
                if resumed {
                    self.shared
                        .counters
                        .resumes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Event::CopyEnded {
                    direction,
                    copied,
                    resumed,
                }
            }
            Err(err) => {
                log::debug!("sockmap tunnel: {} copy: {err:#}", direction.as_str());
                Event::CopyFailed { direction }
            }
        };
        let actions = machine.handle(event);
        self.perform(machine, actions, copies);
    }

    /// Carries out the machine's actions; one that fails ends the tunnel.
    fn perform(
        &self,
        machine: &mut Machine,
        actions: Vec<Action>,
        copies: &mut PerDirection<Option<CopyTask>>,
    ) {
        let mut failures = Vec::new();
        for action in actions {
            if let Err(err) = self.perform_one(action, copies) {
                log::debug!("sockmap tunnel: {action:?}: {err:#}");
                let direction = match action {
                    Action::Pause { direction, .. } | Action::StartCopy { direction, .. } => {
                        direction
                    }
                    _ => continue,
                };
                failures.push(Event::CopyFailed { direction });
            }
        }
        for failure in failures {
            machine.handle(failure);
        }
    }

    fn perform_one(
        &self,
        action: Action,
        copies: &mut PerDirection<Option<CopyTask>>,
    ) -> anyhow::Result<()> {
        let shared = self.shared;
        let counters = &shared.counters;
        match action {
            Action::ShutDown(direction) => {
                if let Err(err) = pump::shutdown_write(self.sockets[direction.destination()]) {
                    log::debug!("sockmap tunnel: shutdown: {err}");
                }
            }
            Action::Pause { direction, copied } => {
                shared.kernel.set_flow_control(
                    self.cookies[direction.source()],
                    flow_mode::PAUSED,
                    copied,
                )?;
                counters
                    .pauses
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::debug!(
                    "flow control: {} paused at {:?}, copied {copied}",
                    direction.as_str(),
                    self.flow(direction)
                );
            }
            Action::RaiseSendBuffer(direction) => {
                let destination = self.sockets[direction.destination()];
                match sockopt::force_send_buffer(
                    destination.as_fd(),
                    shared.limits.raised_send_buffer,
                ) {
                    Ok(size) => {
                        counters
                            .send_buffer_raises
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::debug!("send buffer raised to {size} bytes");
                    }
                    Err(err) => log::debug!("raising the send buffer: {err}"),
                }
            }
            Action::StartCopy { direction, copied } => {
                let source = self.cookies[direction.source()];
                let (from, to) = (
                    self.sockets[direction.source()].try_clone()?,
                    self.sockets[direction.destination()].try_clone()?,
                );
                shared
                    .kernel
                    .set_flow_control(source, flow_mode::RESUMING, copied)?;
                log::debug!(
                    "flow control: {} copy starts at {:?}, copied {copied}",
                    direction.as_str(),
                    self.flow(direction)
                );
                copies[direction] = Some(tokio::spawn(hold::copy_passed(
                    shared.kernel.clone(),
                    source,
                    from,
                    to,
                    copied,
                    counters.copied.clone(),
                )));
            }
            Action::End(_) => {}
        }
        Ok(())
    }
}

/// Waits for the user-space copy of a direction that was never spliced.
async fn join_user_copy(task: &mut Option<(Direction, UserCopyTask)>) -> anyhow::Result<u64> {
    match task.as_mut() {
        Some((_, task)) => task.await.unwrap_or_else(|err| Err(err.into())),
        None => std::future::pending().await,
    }
}

/// Waits for a copy task (the caller guarantees there is one).
async fn join_copy(task: &mut Option<CopyTask>) -> anyhow::Result<CopyEnd> {
    match task.as_mut() {
        Some(task) => task.await.unwrap_or_else(|err| Err(err.into())),
        None => std::future::pending().await,
    }
}

/// Write-space wake-ups of the destinations the machine waits on: a
/// duplicate of each such socket registered with tokio for writability only,
/// while it waits (the sockets themselves stay out of the reactor).
#[derive(Default)]
struct Writable {
    destinations: PerDirection<Option<AsyncFd<TcpStream>>>,
}

impl Writable {
    /// Registers the destinations of the directions in `wanted`, drops the others.
    fn follow(&mut self, wanted: PerDirection<bool>, sockets: &PerSide<&TcpStream>) {
        for direction in Direction::BOTH {
            let registered = &mut self.destinations[direction];
            if !wanted[direction] {
                *registered = None;
            } else if registered.is_none() {
                *registered = sockets[direction.destination()]
                    .try_clone()
                    // SAFETY: the duplicate is owned by the AsyncFd, which
                    // deregisters it before closing it; nothing else uses it.
                    .and_then(|dup| {
                        unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
                            .map_err(io::Error::from)
                    })
                    .map_err(|err| log::debug!("sockmap: no write-space wake-ups: {err}"))
                    .ok();
            }
        }
    }

    /// Resolves when a registered destination turns writable.
    async fn ready(&self) {
        tokio::select! {
            () = writable(self.destinations[Direction::ClientToUpstream].as_ref()) => {}
            () = writable(self.destinations[Direction::UpstreamToClient].as_ref()) => {}
        }
    }
}

/// Resolves when `fd` turns writable (never without one), and clears the
/// readiness so the next wait needs a new write-space wake-up.
///
/// A socket that is closed for writing (EPOLLHUP, EPOLLERR: shut down both
/// ways, reset) never resolves: tokio keeps "write closed" readiness across
/// `clear_ready` (closed states are final, ScheduledIo::clear_readiness), so
/// it would resolve at once on every wait, and `AsyncFd::writable` takes no
/// coop budget: the tunnel task would loop without ever yielding its worker.
/// A copy task it spawned then never runs, as tokio puts a task spawned on a
/// worker into that worker's LIFO slot, which no other worker steals. The
/// timer still wakes the task.
async fn writable(fd: Option<&AsyncFd<TcpStream>>) {
    match fd {
        Some(fd) => match fd.writable().await {
            Ok(guard) if guard.ready().is_write_closed() => std::future::pending().await,
            Ok(mut guard) => guard.clear_ready(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
