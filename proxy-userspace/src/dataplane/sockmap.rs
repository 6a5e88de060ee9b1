//! The eBPF sockmap data plane: after the `200`, both sockets of a tunnel go into
//! a sockhash and the `splice_verdict` program (proxy-ebpf) redirects every skb
//! that arrives on one socket out of the other. User space never reads the bytes;
//! it only drives the tunnel's lifecycle from the `flow_state` program's events:
//!
//! 1. snapshot each socket's write position, register for events, insert the
//!    `FLOWS` entries, then both sockets into `REDIRECT_TARGETS` (no program),
//!    then into `SPLICED` (verdict attached) — in that order a redirect can never
//!    find its peer missing — then kick both with `SO_RCVLOWAT` so bytes queued
//!    before insertion are processed now and not when the next segment arrives;
//! 2. when one side's FIN has arrived and the verdict has redirected every byte
//!    before it, the `flow_state`/`splice_verdict` programs send a `Drained` event
//!    with that direction's final count (from `bytes_received` at the FIN); the
//!    task waits until the bytes reached the peer's send queue, and only then
//!    `shutdown(SHUT_WR)`s the peer: shutting down earlier cuts off bytes still in
//!    the redirect path. A slow `TCP_INFO` poll covers events lost to a full ring;
//! 3. when both directions are shut down, the access log gets the counts of the
//!    `Drained` events and the sockets are closed (which removes them from both
//!    sockhashes).
//!
//! A socket that has already seen a FIN (CLOSE_WAIT) cannot be inserted; such a
//! tunnel is handed to the fallback data plane.

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf, SockHash},
    programs::{links::CgroupAttachMode, SkSkb, SockOps},
    Ebpf, EbpfLoader,
};
use proxy_common::{flow_mode, stat, tcp_state, FlowControl, FlowEntry, FlowEvent, FlowEventKind};
use std::net::TcpStream;

use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt as _},
    sync::mpsc,
};

use super::{
    pump, DataPlane, LimitClock, Progress, Tunnel, TunnelEnd, TunnelFuture, TunnelLimits,
    TunnelOutcome,
};
use crate::{
    config::{Config, TestHook},
    sockopt,
};

/// The eBPF object built by build.rs from proxy-ebpf.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// How often an open tunnel re-reads its sockets' TCP state, in case a flow event
/// was lost (ring buffer full); events normally make this unnecessary.
const SAFETY_POLL: Duration = Duration::from_secs(1);
/// Flow control: a direction whose redirected-but-unsent bytes exceed this is
/// held back: the verdict passes its skbs to the source socket's own queue
/// (charged to it, so TCP's window stops the sender) until the redirected
/// backlog has gone out; then user space copies the few passed bytes and the
/// verdict resumes redirecting (see `proxy_common::FlowControl`). The kernel
/// queues redirected skbs without charging them to either socket
/// (tcp_read_skb → skb_set_owner_sk_safe), so without this a peer that stops
/// reading lets the other side push gigabytes into kernel memory — and even a
/// healthy bulk transfer builds a backlog of hundreds of MiB when the redirect
/// worker shares a CPU with the sender.
const BACKLOG_HIGH: u64 = 16 * 1024 * 1024;
/// `BACKLOG_HIGH` under `--test-hook tiny-backlog`.
const TINY_BACKLOG_HIGH: u64 = 256 * 1024;
/// How often a held-back direction's backlog is checked before its copy starts.
const PAUSED_POLL: Duration = Duration::from_millis(1);
/// Read size of a held-back direction's copy.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
/// First and longest wait of a copy with nothing to read before it re-checks
/// whether the verdict has resumed or the stream has ended.
const COPY_IDLE_MIN: Duration = Duration::from_millis(1);
const COPY_IDLE_MAX: Duration = Duration::from_millis(64);
/// First and longest wait between drain checks after an EOF.
const DRAIN_POLL_MIN: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(64);

/// The maps user space works with.
struct Maps {
    targets: SockHash<MapData, u64>,
    spliced: SockHash<MapData, u64>,
    flows: BpfHashMap<MapData, u64, FlowEntry>,
    flow_control: BpfHashMap<MapData, u64, FlowControl>,
    stats: Array<MapData, u64>,
}

/// Which misbehaviours tests asked for.
#[derive(Clone, Copy, Debug, Default)]
struct Hooks {
    no_kick: bool,
    no_drain_wait: bool,
    verdict_before_targets: bool,
    delay_before_splice: bool,
    tiny_backlog: bool,
}

type Waiters = Mutex<HashMap<u64, mpsc::UnboundedSender<FlowEvent>>>;

/// Flow events read from the ring buffer since start.
static EVENTS_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// Times a direction was held back by flow control.
static PAUSES: AtomicU64 = AtomicU64::new(0);
/// Times the verdict took a held-back direction back (redirecting again).
static RESUMES: AtomicU64 = AtomicU64::new(0);
/// Passed bytes user space copied for held-back directions.
static BYTES_COPIED: AtomicU64 = AtomicU64::new(0);
/// Times a socket's send buffer was raised to `redirect_send_buffer`.
static SEND_BUFFER_RAISES: AtomicU64 = AtomicU64::new(0);

struct Shared {
    maps: Mutex<Maps>,
    waiters: Arc<Waiters>,
    fallback: Arc<dyn DataPlane>,
    hooks: Hooks,
    /// `--redirect-send-buffer`: the send buffer a destination gets once its
    /// send queue fills (0: never raised).
    redirect_send_buffer: u32,
    /// Keeps the programs loaded and attached for the life of the data plane.
    _ebpf: Ebpf,
}

impl Shared {
    /// Replaces a socket's `FLOW_CONTROL` value.
    fn set_flow_control(&self, cookie: u64, mode: u64, copied: u64) -> anyhow::Result<()> {
        let control = FlowControl {
            mode,
            bytes_copied: copied,
        };
        lock(&self.maps)
            .flow_control
            .insert(cookie, control, 0)
            .context("updating FLOW_CONTROL")
    }
}

/// The sockmap data plane. See the module documentation.
pub struct SockmapDataPlane {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SockmapDataPlane {
    /// Loads and attaches the eBPF programs. Must run inside a tokio runtime.
    pub fn load(config: &Config, fallback: Arc<dyn DataPlane>) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let redirect_empty_skbs = u8::from(config.hook(TestHook::RedirectEmptySkbs));
        let trim_overlaps = u8::from(!config.hook(TestHook::NoOverlapTrim));
        // One step of bpf_skb_adjust_room (at most 4095 bytes).
        let one_trim_step: u32 = 1;
        let mut loader = EbpfLoader::new();
        loader
            .override_global("REDIRECT_EMPTY_SKBS", &redirect_empty_skbs, true)
            .override_global("TRIM_OVERLAPS", &trim_overlaps, true);
        if config.hook(TestHook::ShortTrim) {
            loader.override_global("TRIM_STEPS", &one_trim_step, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing"))
        };
        let targets = SockHash::try_from(take(&mut ebpf, "REDIRECT_TARGETS")?)?;
        let spliced: SockHash<MapData, u64> = SockHash::try_from(take(&mut ebpf, "SPLICED")?)?;
        let flows = BpfHashMap::try_from(take(&mut ebpf, "FLOWS")?)?;
        let flow_control = BpfHashMap::try_from(take(&mut ebpf, "FLOW_CONTROL")?)?;
        let stats = Array::try_from(take(&mut ebpf, "STATS")?)?;
        let events = RingBuf::try_from(take(&mut ebpf, "FLOW_EVENTS")?)?;

        let verdict: &mut SkSkb = ebpf
            .program_mut("splice_verdict")
            .context("program splice_verdict missing")?
            .try_into()?;
        verdict.load().context("loading splice_verdict (sk_skb)")?;
        verdict
            .attach(spliced.fd())
            .context("attaching splice_verdict to SPLICED")?;

        let (cgroup, cgroup_path) = open_own_cgroup_v2()?;
        let flow_state: &mut SockOps = ebpf
            .program_mut("flow_state")
            .context("program flow_state missing")?
            .try_into()?;
        flow_state.load().context("loading flow_state (sock_ops)")?;
        flow_state
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching flow_state to cgroup {}", cgroup_path.display()))?;

        let waiters: Arc<Waiters> = Arc::default();
        // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd
        // (which owns the RingBuf) is dropped; nothing else closes or replaces it.
        let events =
            unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
                .map_err(|err| anyhow!("registering the flow event ring buffer: {err}"))?;
        tokio::spawn(dispatch_events(events, waiters.clone()));

        Ok(Self {
            shared: Arc::new(Shared {
                maps: Mutex::new(Maps {
                    targets,
                    spliced,
                    flows,
                    flow_control,
                    stats,
                }),
                waiters,
                fallback,
                hooks: Hooks {
                    no_kick: config.hook(TestHook::NoRcvlowatKick),
                    no_drain_wait: config.hook(TestHook::NoDrainWait),
                    verdict_before_targets: config.hook(TestHook::VerdictBeforeTargets),
                    delay_before_splice: config.hook(TestHook::DelayBeforeSplice),
                    tiny_backlog: config.hook(TestHook::TinyBacklog),
                },
                redirect_send_buffer: config.redirect_send_buffer,
                _ebpf: ebpf,
            }),
        })
    }
}

impl DataPlane for SockmapDataPlane {
    fn name(&self) -> &'static str {
        "sockmap"
    }

    fn pick(&self, _tunnel: &Tunnel) -> &dyn DataPlane {
        self
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(run_tunnel(self.shared.clone(), tunnel))
    }

    fn stats(&self) -> String {
        let maps = lock(&self.shared.maps);
        let stat = |index| maps.stats.get(&index, 0).unwrap_or(0);
        format!(
            "zero_length_dropped={} redirect_failed={} no_flow={} events_lost={} duplicate_bytes_trimmed={} longest_overlap={} sequence_gaps={} trim_failed={} events_received={} flow_control_pauses={} flow_control_resumes={} flow_control_copied_bytes={} send_buffer_raises={} flows={} spliced_sockets={} target_sockets={}",
            stat(stat::ZERO_LENGTH_DROPPED),
            stat(stat::REDIRECT_FAILED),
            stat(stat::NO_FLOW),
            stat(stat::EVENTS_LOST),
            stat(stat::DUPLICATE_BYTES_TRIMMED),
            stat(stat::LONGEST_OVERLAP),
            stat(stat::SEQUENCE_GAPS),
            stat(stat::TRIM_FAILED),
            EVENTS_RECEIVED.load(Ordering::Relaxed),
            PAUSES.load(Ordering::Relaxed),
            RESUMES.load(Ordering::Relaxed),
            BYTES_COPIED.load(Ordering::Relaxed),
            SEND_BUFFER_RAISES.load(Ordering::Relaxed),
            maps.flows.keys().count(),
            maps.spliced.keys().count(),
            maps.targets.keys().count(),
        )
    }
}

/// Memory for maps is charged to the cgroup on kernels ≥ 5.11; older kernels
/// need RLIMIT_MEMLOCK raised. Failure only matters on those.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct, which is valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// Opens the cgroup v2 directory this process belongs to: the sock_ops program
/// is attached there, so it sees the proxy's sockets and no one else's outside it.
///
/// `ip netns exec` and some containers give the process a mount namespace without
/// the cgroup2 hierarchy; then it is mounted on a private temporary directory just
/// long enough to open the directory (the attachment outlives the mount).
fn open_own_cgroup_v2() -> anyhow::Result<(fs::File, PathBuf)> {
    let membership =
        fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("process is in no cgroup v2 group")?
        .trim_start_matches('/')
        .to_owned();
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounted = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next() == Some("cgroup2"))
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
    });
    if let Some(mount_point) = mounted {
        let path = PathBuf::from(mount_point).join(&relative);
        let dir =
            fs::File::open(&path).with_context(|| format!("opening cgroup {}", path.display()))?;
        return Ok((dir, path));
    }
    let temp = std::env::temp_dir().join(format!("spliced-cgroup2-{}", std::process::id()));
    fs::create_dir_all(&temp).with_context(|| format!("creating {}", temp.display()))?;
    let result = with_temporary_cgroup2_mount(&temp, |root| {
        let path = root.join(&relative);
        fs::File::open(&path).with_context(|| format!("opening cgroup {}", path.display()))
    });
    let _ = fs::remove_dir(&temp);
    Ok((result?, PathBuf::from("cgroup2:/").join(relative)))
}

fn with_temporary_cgroup2_mount<T>(
    dir: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("temporary path")?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .context("no cgroup v2 hierarchy is mounted and mounting one failed");
    }
    let result = f(dir);
    // SAFETY: as above; MNT_DETACH so an open directory fd does not block it.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    result
}

async fn dispatch_events(mut events: AsyncFd<RingBuf<MapData>>, waiters: Arc<Waiters>) {
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
            EVENTS_RECEIVED.fetch_add(1, Ordering::Relaxed);
            if let Some(waiter) = lock(&waiters).get(&event.cookie) {
                let _ = waiter.send(event);
            }
        }
        guard.clear_ready();
    }
}

/// One direction of a spliced tunnel, named by the socket the bytes come from.
#[derive(Debug, Default)]
struct Direction {
    /// Whether the source sent its FIN.
    eof: bool,
    /// Bytes the kernel must still deliver from the source, known at EOF.
    expected: u64,
    /// The final count from the kernel's `Drained` event, once it arrived.
    drained: Option<u64>,
    /// Whether the destination has been shut down.
    shut: bool,
    /// Whether flow control holds the direction back (its `FLOW_CONTROL` mode
    /// is not `REDIRECT` as far as this task knows).
    paused: bool,
    /// Whether user space copies the passed bytes (started once the bytes the
    /// kernel had redirected are all in the destination's send queue).
    copying: bool,
    /// Passed bytes user space has copied to the destination, over all pauses.
    copied: u64,
    /// Whether the destination's send buffer was raised already.
    send_buffer_raised: bool,
}

impl Direction {
    /// Notes a `Drained` event: the direction's final count, from the kernel.
    fn note_drained(&mut self, bytes_redirected: u64) {
        self.eof = true;
        self.expected = bytes_redirected;
        self.drained = Some(bytes_redirected);
    }
}

/// The user-space copy of a held-back direction's passed bytes; returns the
/// direction's copied total.
type CopyTask = tokio::task::JoinHandle<anyhow::Result<u64>>;

/// Both sockets of a tunnel while they are spliced.
struct SplicedPair<'a> {
    shared: &'a Arc<Shared>,
    sockets: [&'a TcpStream; 2],
    cookies: [u64; 2],
    /// Bytes written into each socket before insertion (its write position then).
    written_before: [u64; 2],
    /// Bytes user space read from each socket before insertion.
    consumed: [u64; 2],
    /// Idle and lifetime limits.
    limits: TunnelLimits,
}

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

async fn run_tunnel(shared: Arc<Shared>, tunnel: Tunnel) -> TunnelOutcome {
    if shared.hooks.delay_before_splice {
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
        client_queue_clean,
        limits,
        shutdown,
        progress,
    } = tunnel;
    // Spliced sockets are taken out of tokio's reactor: the kernel's write-space
    // wakeups on them would otherwise wake the process for every ACK.
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(err), _) | (_, Err(err)) => {
            log::error!("sockmap: cannot take the sockets out of the reactor: {err}");
            return TunnelOutcome {
                client_to_upstream: 0,
                upstream_to_client: 0,
                dataplane: "sockmap",
                end: TunnelEnd::ClientError,
            };
        }
    };
    let fallback_shutdown = shutdown.clone();
    let fallback_progress = progress.clone();
    let fallback = |client: TcpStream, upstream: TcpStream| {
        let shared = shared.clone();
        let shutdown = fallback_shutdown.clone();
        let progress = fallback_progress.clone();
        async move {
            match (
                tokio::net::TcpStream::from_std(client),
                tokio::net::TcpStream::from_std(upstream),
            ) {
                (Ok(client), Ok(upstream)) => {
                    let tunnel = Tunnel {
                        client,
                        upstream,
                        client_bytes_consumed,
                        client_queue_clean,
                        limits,
                        shutdown,
                        progress,
                    };
                    shared.fallback.run(tunnel).await
                }
                (Err(err), _) | (_, Err(err)) => {
                    log::error!("sockmap: cannot hand the sockets to the fallback: {err}");
                    TunnelOutcome {
                        client_to_upstream: 0,
                        upstream_to_client: 0,
                        dataplane: "sockmap",
                        end: TunnelEnd::ClientError,
                    }
                }
            }
        }
    };
    let sockets = [&client, &upstream];
    let cookies = match (
        sockopt::cookie(sockets[0].as_fd()),
        sockopt::cookie(sockets[1].as_fd()),
    ) {
        (Ok(a), Ok(b)) => [a, b],
        (Err(err), _) | (_, Err(err)) => {
            log::warn!("sockmap: no socket cookie ({err}); using the fallback data plane");
            return fallback(client, upstream).await;
        }
    };
    let written_before = match (
        stable_bytes_written(sockets[0].as_fd()),
        stable_bytes_written(sockets[1].as_fd()),
    ) {
        (Ok(a), Ok(b)) => [a, b],
        (Err(err), _) | (_, Err(err)) => {
            log::warn!("sockmap: TCP_INFO failed ({err}); using the fallback data plane");
            return fallback(client, upstream).await;
        }
    };
    let pair = SplicedPair {
        shared: &shared,
        sockets,
        cookies,
        written_before,
        consumed: [client_bytes_consumed, 0],
        limits,
    };
    let (sender, mut events) = mpsc::unbounded_channel();
    {
        let mut waiters = lock(&shared.waiters);
        waiters.insert(cookies[CLIENT], sender.clone());
        waiters.insert(cookies[UPSTREAM], sender);
    }
    let outcome = match pair.insert().await {
        Ok(()) => Some(pair.run(&mut events, shutdown.clone(), &progress).await),
        Err(err) => {
            log::debug!("sockmap: tunnel not spliced ({err}); using the fallback data plane");
            None
        }
    };
    let redirected = pair.remove_flows();
    {
        let mut waiters = lock(&shared.waiters);
        waiters.remove(&cookies[CLIENT]);
        waiters.remove(&cookies[UPSTREAM]);
    }
    match outcome {
        Some(outcome) => outcome,
        None => {
            // Bytes the kernel moved before insertion failed count as moved too.
            let mut outcome = fallback(client, upstream).await;
            outcome.client_to_upstream += redirected[CLIENT];
            outcome.upstream_to_client += redirected[UPSTREAM];
            outcome
        }
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

impl SplicedPair<'_> {
    /// Inserts both sockets (see the module documentation for the order).
    async fn insert(&self) -> anyhow::Result<()> {
        let [client, upstream] = self.cookies;
        {
            let mut maps = lock(&self.shared.maps);
            for (index, (cookie, peer)) in [(client, upstream), (upstream, client)]
                .into_iter()
                .enumerate()
            {
                let entry = FlowEntry {
                    peer_cookie: peer,
                    consumed_by_user: self.consumed[index],
                    ..FlowEntry::default()
                };
                maps.flows.insert(cookie, entry, 0)?;
            }
        }
        if self.shared.hooks.verdict_before_targets {
            self.insert_into(Map::Spliced)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.insert_into(Map::Targets)?;
        } else {
            self.insert_into(Map::Targets)?;
            if let Err(err) = self.insert_into(Map::Spliced) {
                self.undo_partial_splice().await;
                return Err(err);
            }
        }
        if !self.shared.hooks.no_kick {
            for socket in self.sockets {
                sockopt::set_rcvlowat(socket.as_fd(), 1).context("SO_RCVLOWAT kick")?;
            }
        }
        Ok(())
    }

    fn insert_into(&self, which: Map) -> anyhow::Result<()> {
        let mut maps = lock(&self.shared.maps);
        let map = match which {
            Map::Targets => &mut maps.targets,
            Map::Spliced => &mut maps.spliced,
        };
        for (cookie, socket) in self.cookies.iter().zip(self.sockets) {
            map.insert(cookie, socket.as_fd(), 0).with_context(|| {
                format!(
                    "inserting socket into {which:?} (TCP state {})",
                    tcp_state_of(socket)
                )
            })?;
        }
        Ok(())
    }

    /// One socket made it into SPLICED, the other did not (it saw a FIN in
    /// between). Stop the verdict, let what it already redirected drain, and
    /// leave both maps so the fallback gets plain sockets.
    async fn undo_partial_splice(&self) {
        {
            let mut maps = lock(&self.shared.maps);
            for cookie in self.cookies {
                let _ = maps.spliced.remove(&cookie);
            }
        }
        let mut wait = DRAIN_POLL_MIN;
        for _ in 0..100 {
            let redirected = self.handled();
            let drained = (0..2).all(|src| {
                self.written_since_insert(1 - src)
                    .is_ok_and(|w| w >= redirected[src])
            });
            if drained {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(DRAIN_POLL_MAX);
        }
        let mut maps = lock(&self.shared.maps);
        for cookie in self.cookies {
            let _ = maps.targets.remove(&cookie);
        }
    }

    /// Socket `index`'s `FLOWS` entry (zeroes if it is gone).
    fn flow_entry(&self, index: usize) -> FlowEntry {
        lock(&self.shared.maps)
            .flows
            .get(&self.cookies[index], 0)
            .unwrap_or_default()
    }

    /// Each socket's `FLOWS` entry (zeroes if it is gone).
    fn flow_entries(&self) -> [FlowEntry; 2] {
        let maps = lock(&self.shared.maps);
        self.cookies
            .map(|cookie| maps.flows.get(&cookie, 0).unwrap_or_default())
    }

    /// Bytes the verdict handled (redirected or passed) from each socket so far.
    fn handled(&self) -> [u64; 2] {
        self.flow_entries()
            .map(|entry| entry.bytes_redirected + entry.bytes_passed)
    }

    /// Reads the final counters and deletes the FLOWS entries.
    fn remove_flows(&self) -> [u64; 2] {
        let handled = self.handled();
        let mut maps = lock(&self.shared.maps);
        for cookie in self.cookies {
            let _ = maps.flows.remove(&cookie);
            let _ = maps.flow_control.remove(&cookie);
        }
        handled
    }

    fn written_since_insert(&self, index: usize) -> io::Result<u64> {
        Ok(sockopt::bytes_written(self.sockets[index].as_fd())?
            .saturating_sub(self.written_before[index]))
    }

    /// Drives the spliced tunnel to its end.
    ///
    /// Each direction ends with the kernel's `Drained` event, sent when the
    /// verdict has redirected every byte the peer sent before its FIN; it carries
    /// the direction's final count. (A plain state-change event cannot: the state
    /// changes inside tcp_fin(), before tcp_data_ready() runs the verdict over the
    /// segment that carried the FIN.) Then the task waits until those bytes are in
    /// the peer socket's send queue and shuts it down.
    async fn run(
        &self,
        events: &mut mpsc::UnboundedReceiver<FlowEvent>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        progress: &Progress,
    ) -> TunnelOutcome {
        let mut directions = [Direction::default(), Direction::default()];
        let mut drain_wait = DRAIN_POLL_MIN;
        let mut last_poll = tokio::time::Instant::now();
        let mut clock = LimitClock::start(self.limits);
        let mut copies: [Option<CopyTask>; 2] = [None, None];
        let end = loop {
            if let Some(end) = self.check_errors() {
                break end;
            }
            for (src, direction) in directions.iter_mut().enumerate() {
                self.try_shutdown_peer(src, direction);
            }
            if directions.iter().all(|d| d.shut) {
                break TunnelEnd::Closed;
            }
            if let Err(err) = self.start_copies(&mut directions, &mut copies) {
                log::debug!("sockmap tunnel: {err:#}");
                break TunnelEnd::ClientError;
            }
            let draining = directions.iter().any(|d| (d.eof && !d.shut) || d.paused);
            let wait = if directions.iter().any(|d| d.paused && !d.copying) {
                PAUSED_POLL
            } else if draining {
                drain_wait
            } else {
                clock.next_check(SAFETY_POLL)
            };
            let [client_copy, upstream_copy] = &mut copies;
            tokio::select! {
                event = events.recv() => {
                    if let Some(first) = event {
                        // Take every queued event at once; flow control looks at
                        // the newest progress only, so a busy task cannot fall
                        // behind the kernel event by event.
                        let mut newest_progress: [Option<FlowEvent>; 2] = [None, None];
                        let mut broken = None;
                        let mut next = Some(first);
                        while let Some(event) = next {
                            log::trace!("flow event {event:?}");
                            if let Some(src) = self.cookies.iter().position(|&c| c == event.cookie) {
                                match event.kind {
                                    kind if kind == FlowEventKind::Drained as u32 => {
                                        directions[src].note_drained(event.bytes_redirected);
                                    }
                                    kind if kind == FlowEventKind::Progress as u32 => {
                                        newest_progress[src] = Some(event);
                                    }
                                    kind if kind == FlowEventKind::OverlapNotTrimmed as u32 => {
                                        broken = Some(src);
                                    }
                                    _ => {}
                                }
                            }
                            next = events.try_recv().ok();
                        }
                        for (src, event) in newest_progress.iter().enumerate() {
                            if let Some(event) = event {
                                self.note_progress(src, event, &mut directions);
                            }
                        }
                        if let Some(src) = broken {
                            log::warn!(
                                "sockmap tunnel reset: a retransmission from the {} repeated more bytes than the verdict can trim",
                                if src == CLIENT { "client" } else { "upstream" }
                            );
                            break if src == CLIENT { TunnelEnd::ClientError } else { TunnelEnd::UpstreamError };
                        }
                    }
                    drain_wait = DRAIN_POLL_MIN;
                }
                () = tokio::time::sleep(wait) => {
                    drain_wait = (drain_wait * 2).min(DRAIN_POLL_MAX);
                }
                _ = shutdown.wait_for(|closing| *closing) => break TunnelEnd::Shutdown,
                result = join_copy(client_copy), if client_copy.is_some() => {
                    *client_copy = None;
                    if let Err(err) = self.copy_finished(CLIENT, result, &mut directions) {
                        log::debug!("sockmap tunnel: client copy: {err:#}");
                        break TunnelEnd::ClientError;
                    }
                }
                result = join_copy(upstream_copy), if upstream_copy.is_some() => {
                    *upstream_copy = None;
                    if let Err(err) = self.copy_finished(UPSTREAM, result, &mut directions) {
                        log::debug!("sockmap tunnel: upstream copy: {err:#}");
                        break TunnelEnd::UpstreamError;
                    }
                }
            }
            // Events drive the tunnel; a TCP_INFO poll now and then covers any that
            // a full ring buffer lost.
            if last_poll.elapsed() >= SAFETY_POLL.min(clock.next_check(SAFETY_POLL)) {
                last_poll = tokio::time::Instant::now();
                for (src, direction) in directions.iter_mut().enumerate() {
                    self.observe(src, direction);
                }
                let redirected = self.handled();
                progress.advance_to("sockmap", redirected);
                if let Some(exceeded) = clock.check(redirected.iter().sum()) {
                    break exceeded;
                }
            }
        };
        for copy in copies.iter().flatten() {
            copy.abort();
        }
        if end != TunnelEnd::Closed {
            for socket in self.sockets {
                pump::reset(socket);
            }
        }
        // The kernel's Drained events carry each direction's final count; the map
        // is read only when a direction never drained (reset) or its event was lost.
        let live = self.handled();
        let moved = [0, 1].map(|i| directions[i].drained.unwrap_or(live[i]));
        log::debug!(
            "sockmap tunnel ended ({end:?}): moved {moved:?}, map {live:?}, from events {:?}",
            directions.each_ref().map(|d| d.drained)
        );
        TunnelOutcome {
            client_to_upstream: moved[CLIENT],
            upstream_to_client: moved[UPSTREAM],
            dataplane: "sockmap",
            end,
        }
    }

    /// Notes a `Progress` event: holds its direction back if the redirect
    /// backlog (redirected bytes not yet in the destination's send queue) is
    /// past the mark.
    fn note_progress(&self, src: usize, event: &FlowEvent, directions: &mut [Direction; 2]) {
        let direction = &mut directions[src];
        if direction.paused || direction.eof {
            return;
        }
        let dst = self.sockets[1 - src];
        // What the destination took in: redirected and copied bytes alike.
        let written = self.written_since_insert(1 - src).unwrap_or(0);
        let backlog = (event.bytes_redirected + direction.copied).saturating_sub(written);
        let send_queue = sockopt::send_queue_len(dst.as_fd()).unwrap_or(0);
        let send_buffer = socket2::SockRef::from(dst).send_buffer_size().unwrap_or(0) as u64;
        self.raise_send_buffer(dst, send_queue, send_buffer, direction);
        log::trace!(
            "flow control: direction {src} backlog {backlog} send queue {send_queue}/{send_buffer}"
        );
        let high = if self.shared.hooks.tiny_backlog {
            TINY_BACKLOG_HIGH
        } else {
            BACKLOG_HIGH
        };
        if backlog > high
            && self
                .set_flow_mode(src, flow_mode::PAUSED, direction.copied)
                .is_ok()
        {
            log::debug!(
                "flow control: direction {src} paused at redirected {}, copied {}, written {written}",
                event.bytes_redirected,
                direction.copied
            );
            direction.paused = true;
            PAUSES.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the source socket's `FLOW_CONTROL` value.
    fn set_flow_mode(&self, src: usize, mode: u64, copied: u64) -> anyhow::Result<()> {
        self.shared
            .set_flow_control(self.cookies[src], mode, copied)
    }

    /// Gives the destination a `redirect_send_buffer`-sized send buffer once its
    /// send queue is ¾ full. On a full send buffer the kernel's redirect worker
    /// (sk_psock_backlog() in net/core/skmsg.c, 6.18) gets -EAGAIN and retries
    /// with schedule_delayed_work(&psock->work, 1); the write-space callback's
    /// schedule_delayed_work(.., 0) is a no-op while that timer is pending, so
    /// the direction sleeps a whole tick even after the receiver freed space.
    /// Traced here (workqueue/timer tracepoints) with client, proxy and server
    /// on one CPU: the worker ran only from delayed_work_timer_fn, every 8 ms,
    /// the CPU 96 % idle, 4.3 Gbit/s. A queue that outlasts the tick hides it
    /// (14–17 Gbit/s). Only senders that outrun their receiver get the memory.
    fn raise_send_buffer(
        &self,
        dst: &TcpStream,
        send_queue: u64,
        send_buffer: u64,
        direction: &mut Direction,
    ) {
        let target = self.shared.redirect_send_buffer;
        if direction.send_buffer_raised
            || target == 0
            || send_buffer >= u64::from(target)
            || send_queue * 4 < send_buffer * 3
        {
            return;
        }
        direction.send_buffer_raised = true;
        match sockopt::force_send_buffer(dst.as_fd(), target) {
            Ok(size) => {
                SEND_BUFFER_RAISES.fetch_add(1, Ordering::Relaxed);
                log::debug!("send buffer raised from {send_buffer} to {size} bytes");
            }
            Err(err) => log::debug!("raising the send buffer: {err}"),
        }
    }

    /// Starts user space copying each held-back direction's passed bytes once
    /// everything the kernel redirected before the pause is in the
    /// destination's send queue (user space must not write before it), and
    /// asks the verdict to resume once the copy has caught up.
    fn start_copies(
        &self,
        directions: &mut [Direction; 2],
        copies: &mut [Option<CopyTask>; 2],
    ) -> anyhow::Result<()> {
        for src in [CLIENT, UPSTREAM] {
            let direction = &mut directions[src];
            if !direction.paused || direction.copying || direction.shut {
                continue;
            }
            let entry = self.flow_entry(src);
            if self.written_since_insert(1 - src)? < entry.bytes_redirected + direction.copied {
                continue;
            }
            let (from, to) = (
                self.sockets[src].try_clone()?,
                self.sockets[1 - src].try_clone()?,
            );
            self.set_flow_mode(src, flow_mode::RESUMING, direction.copied)?;
            log::debug!(
                "flow control: direction {src} copy starts: redirected {}, copied {}, passed {}",
                entry.bytes_redirected,
                direction.copied,
                entry.bytes_passed
            );
            direction.copying = true;
            copies[src] = Some(tokio::spawn(copy_passed(
                Arc::clone(self.shared),
                self.cookies[src],
                from,
                to,
                direction.copied,
            )));
        }
        Ok(())
    }

    /// A finished copy: the verdict redirects again, or the stream has ended.
    fn copy_finished(
        &self,
        src: usize,
        result: anyhow::Result<u64>,
        directions: &mut [Direction; 2],
    ) -> anyhow::Result<()> {
        let direction = &mut directions[src];
        direction.copied = result?;
        direction.copying = false;
        let mode = lock(&self.shared.maps)
            .flow_control
            .get(&self.cookies[src], 0)
            .map_or(flow_mode::REDIRECT, |control| control.mode);
        log::debug!(
            "flow control: direction {src} copy ended at copied {}, mode {mode}, entry {:?}",
            direction.copied,
            self.flow_entry(src)
        );
        if mode == flow_mode::REDIRECT {
            direction.paused = false;
            RESUMES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Notes an EOF on socket `src` and how many bytes it sent in all, from
    /// `TCP_INFO`: the fallback for a `Drained` event lost to a full ring buffer.
    fn observe(&self, src: usize, direction: &mut Direction) {
        if direction.eof {
            return;
        }
        let Ok(info) = sockopt::tcp_info(self.sockets[src].as_fd()) else {
            return;
        };
        if is_fin_received(info.state) {
            direction.eof = true;
            // bytes_received counts the FIN's sequence number too.
            direction.expected = info
                .bytes_received
                .saturating_sub(1)
                .saturating_sub(self.consumed[src]);
        }
    }

    /// A reset or error on either socket ends the tunnel.
    fn check_errors(&self) -> Option<TunnelEnd> {
        for (index, socket) in self.sockets.iter().enumerate() {
            if let Ok(Some(err)) = sockopt::take_error(socket.as_fd()) {
                log::debug!(
                    "sockmap tunnel: {} socket error: {err}",
                    if index == CLIENT {
                        "client"
                    } else {
                        "upstream"
                    }
                );
                return Some(if index == CLIENT {
                    TunnelEnd::ClientError
                } else {
                    TunnelEnd::UpstreamError
                });
            }
        }
        None
    }

    /// Shuts the peer of `src` down once everything `src` sent has reached it.
    fn try_shutdown_peer(&self, src: usize, direction: &mut Direction) {
        if !direction.eof || direction.shut {
            return;
        }
        let dst = 1 - src;
        let drained = self.shared.hooks.no_drain_wait
            || self
                .written_since_insert(dst)
                .is_ok_and(|written| written >= direction.expected);
        if drained {
            if let Err(err) = pump::shutdown_write(self.sockets[dst]) {
                log::debug!("sockmap tunnel: shutdown: {err}");
            }
            direction.shut = true;
        }
    }
}

/// Waits for a copy task (the caller guarantees there is one).
async fn join_copy(task: &mut Option<CopyTask>) -> anyhow::Result<u64> {
    match task.as_mut() {
        Some(task) => task.await.unwrap_or_else(|err| Err(err.into())),
        None => std::future::pending().await,
    }
}

/// Copies the bytes the verdict passed to `src`'s own queue into `dst`,
/// publishing the count in `FLOW_CONTROL` (mode `RESUMING`) after each write,
/// until the verdict has switched back to redirecting or the stream has ended
/// with every passed byte copied. Returns the direction's copied total.
///
/// Reads go through tcp_bpf_recvmsg, which returns the passed skbs. Its 0 is
/// not trusted as the end: it returns 0 once the FIN is in while passed skbs
/// can still wait on the psock's backlog to reach the queue it reads.
async fn copy_passed(
    shared: Arc<Shared>,
    cookie: u64,
    src: TcpStream,
    dst: TcpStream,
    mut copied: u64,
) -> anyhow::Result<u64> {
    // Duplicates, registered with tokio for this copy only; the originals stay
    // out of the reactor.
    let src = tokio::net::TcpStream::from_std(src)?;
    let mut dst = tokio::net::TcpStream::from_std(dst)?;
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut idle = COPY_IDLE_MIN;
    loop {
        // Wait for passed bytes, or a tick to see whether the verdict has
        // taken the direction back (or the stream ended). The tick backs off
        // while nothing arrives.
        let read = tokio::select! {
            ready = src.readable() => {
                ready?;
                match src.try_read(&mut buf) {
                    Ok(n) => Some(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            () = tokio::time::sleep(idle) => None,
        };
        if matches!(read, None | Some(0)) {
            let (entry, control) = {
                let maps = lock(&shared.maps);
                (
                    maps.flows.get(&cookie, 0).unwrap_or_default(),
                    maps.flow_control.get(&cookie, 0).unwrap_or_default(),
                )
            };
            if copied > entry.bytes_passed {
                // Bytes that never went through the verdict: the hand-back
                // could reorder the stream, so the tunnel ends instead.
                anyhow::bail!(
                    "copied {copied} bytes but the verdict passed {}",
                    entry.bytes_passed
                );
            }
            let ended = entry.eof_target_plus_one != 0
                && entry.bytes_redirected + entry.bytes_passed + 1 >= entry.eof_target_plus_one;
            if copied == entry.bytes_passed && (control.mode == flow_mode::REDIRECT || ended) {
                return Ok(copied);
            }
            if read == Some(0) {
                // At EOF the socket stays readable; do not spin on it.
                tokio::time::sleep(idle).await;
            }
            idle = (idle * 2).min(COPY_IDLE_MAX);
            continue;
        }
        let read = read.unwrap_or(0);
        log::trace!("flow control: copy {cookie:x} read {read} at copied {copied}");
        idle = COPY_IDLE_MIN;
        dst.write_all(&buf[..read]).await?;
        copied += read as u64;
        BYTES_COPIED.fetch_add(read as u64, Ordering::Relaxed);
        shared.set_flow_control(cookie, flow_mode::RESUMING, copied)?;
    }
}

#[derive(Clone, Copy, Debug)]
enum Map {
    Targets,
    Spliced,
}

fn tcp_state_of(socket: &TcpStream) -> String {
    sockopt::tcp_info(socket.as_fd())
        .map_or_else(|err| err.to_string(), |info| info.state.to_string())
}
