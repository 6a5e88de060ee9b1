//! The eBPF sockmap data plane: after the `200`, both sockets of a tunnel go into
//! a sockhash and the `splice_verdict` program (proxy-ebpf) redirects every skb
//! that arrives on one socket out of the other. User space never reads the bytes;
//! it only drives the tunnel's lifecycle from the `flow_state` program's events.
//!
//! One module per concern:
//! * [`kernel`] loads the programs and owns every map access; [`cgroup`] finds
//!   where sock_ops attaches;
//! * [`probe`] checks at start-up, on a private loopback pair, that the kernel
//!   behaves as the verdict assumes;
//! * [`events`] carries the kernel's flow events to the tunnel tasks;
//! * [`machine`] is the per-tunnel state machine (pure, unit-tested);
//! * [`tunnel`] is the thin adapter that inserts a tunnel's sockets, feeds the
//!   machine and carries out its actions;
//! * [`hold`] copies the bytes of a direction flow control held back.
//!
//! A socket that has already seen a FIN cannot be inserted; such a tunnel is
//! handed to the fallback data plane before anything is inserted.

mod cgroup;
mod events;
mod hold;
mod kernel;
mod machine;
mod probe;
mod tunnel;

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::anyhow;
use proxy_common::stat;
use tokio::io::unix::AsyncFd;

use super::{DataPlane, DataPlaneChoice, Picked, PlaneKind, PlaneStats, Tunnel, TunnelFuture};
use crate::config::{Config, TestHook, TestHooks};

pub use probe::ProbeError;

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

/// Why the sockmap plane cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The eBPF object did not load or a program did not attach.
    #[error("eBPF unavailable ({0:#})")]
    Ebpf(anyhow::Error),
    /// The programs loaded, but the kernel does not behave as the verdict
    /// assumes (see [`probe`]).
    #[error("the kernel failed sockmap's start-up check: {0}")]
    Probe(#[from] ProbeError),
}

/// User-space counters of the plane (the kernel's are in the `STATS` map).
#[derive(Debug, Default)]
struct Counters {
    /// Times a direction was held back by flow control.
    pauses: AtomicU64,
    /// Times the verdict took a held-back direction back (redirecting again).
    resumes: AtomicU64,
    /// Passed bytes user space copied for held-back directions.
    copied: Arc<AtomicU64>,
    /// Times a socket's send buffer was raised to `redirect_send_buffer`.
    send_buffer_raises: AtomicU64,
    /// Bytes the verdict redirected, of tunnels that have ended.
    redirected: AtomicU64,
    /// Bytes the verdict passed to a held-back source, of tunnels that have ended.
    passed: AtomicU64,
}

/// What every tunnel task of the plane shares.
struct Shared {
    kernel: Arc<kernel::Kernel>,
    waiters: Arc<events::Waiters>,
    fallback: Arc<dyn DataPlane>,
    hooks: TestHooks,
    limits: machine::Limits,
    counters: Counters,
}

/// The sockmap data plane. See the module documentation.
pub struct SockmapDataPlane {
    shared: Arc<Shared>,
}

impl SockmapDataPlane {
    /// Loads and attaches the eBPF programs and checks the kernel with a
    /// private loopback tunnel. Must run inside a tokio runtime.
    pub fn load(config: &Config, fallback: Arc<dyn DataPlane>) -> Result<Self, LoadError> {
        let hooks = config.hooks();
        let (kernel, ring) = kernel::Kernel::load(&hooks).map_err(LoadError::Ebpf)?;
        let kernel = Arc::new(kernel);
        probe::check(&kernel, &hooks)?;
        let waiters = Arc::new(events::Waiters::default());
        // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd
        // (which owns the RingBuf) is dropped; nothing else closes or replaces it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|err| {
                LoadError::Ebpf(anyhow!("registering the flow event ring buffer: {err}"))
            })?;
        tokio::spawn(events::dispatch(ring, waiters.clone()));
        let backlog_high = if hooks.has(TestHook::TinyBacklog) {
            TINY_BACKLOG_HIGH
        } else {
            BACKLOG_HIGH
        };
        Ok(Self {
            shared: Arc::new(Shared {
                kernel,
                waiters,
                fallback,
                limits: machine::Limits {
                    backlog_high,
                    raised_send_buffer: config.redirect_send_buffer,
                    wait_for_drain: !hooks.has(TestHook::NoDrainWait),
                },
                hooks,
                counters: Counters::default(),
            }),
        })
    }
}

impl DataPlane for SockmapDataPlane {
    fn name(&self) -> DataPlaneChoice {
        DataPlaneChoice::Sockmap
    }

    fn pick(&self, _tunnel: &Tunnel) -> Picked<'_> {
        (PlaneKind::Sockmap, self)
    }

    fn planes(&self) -> Vec<PlaneKind> {
        vec![PlaneKind::Sockmap]
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(tunnel::run(self.shared.clone(), tunnel))
    }

    fn stats(&self) -> PlaneStats {
        let shared = &self.shared;
        let kernel = &shared.kernel;
        let counters = &shared.counters;
        let sizes = kernel.sizes();
        PlaneStats {
            sockmap: Some(SockmapStats {
                zero_length_dropped: kernel.stat(stat::ZERO_LENGTH_DROPPED),
                redirect_failed: kernel.stat(stat::REDIRECT_FAILED),
                no_flow: kernel.stat(stat::NO_FLOW),
                events_lost: kernel.stat(stat::EVENTS_LOST),
                duplicate_bytes_trimmed: kernel.stat(stat::DUPLICATE_BYTES_TRIMMED),
                longest_overlap: kernel.stat(stat::LONGEST_OVERLAP),
                sequence_gaps: kernel.stat(stat::SEQUENCE_GAPS),
                trim_failed: kernel.stat(stat::TRIM_FAILED),
                bytes_redirected: counters.redirected.load(Ordering::Relaxed),
                bytes_passed: counters.passed.load(Ordering::Relaxed),
                events_received: shared.waiters.received(),
                flow_control_pauses: counters.pauses.load(Ordering::Relaxed),
                flow_control_resumes: counters.resumes.load(Ordering::Relaxed),
                flow_control_copied_bytes: counters.copied.load(Ordering::Relaxed),
                send_buffer_raises: counters.send_buffer_raises.load(Ordering::Relaxed),
                flows: sizes.flows,
                spliced_sockets: sizes.spliced_sockets,
                target_sockets: sizes.target_sockets,
            }),
            ..PlaneStats::default()
        }
    }
}

/// The sockmap plane's counters: the kernel's (`STATS`), flow control's, and
/// the maps' sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapStats {
    /// Empty FIN skbs the verdict dropped (redirecting one breaks the peer's send path).
    pub zero_length_dropped: u64,
    /// skbs whose redirect found no peer in `REDIRECT_TARGETS` (bytes lost).
    pub redirect_failed: u64,
    /// skbs on a spliced socket without a `FLOWS` entry (passed to the socket).
    pub no_flow: u64,
    /// Flow events lost to a full ring buffer.
    pub events_lost: u64,
    /// Bytes of retransmissions the verdict had handled already and trimmed off.
    pub duplicate_bytes_trimmed: u64,
    /// The longest overlap trimmed off one skb, in bytes.
    pub longest_overlap: u64,
    /// skbs that started after the byte the verdict expected (always 0 unless
    /// the kernel hands the verdict a stream out of order).
    pub sequence_gaps: u64,
    /// skbs with an overlap too long to trim (each reset its tunnel).
    pub trim_failed: u64,
    /// Bytes the verdict redirected, of tunnels that have ended.
    pub bytes_redirected: u64,
    /// Bytes the verdict passed to held-back sources, of tunnels that have ended.
    pub bytes_passed: u64,
    /// Flow events read from the ring buffer.
    pub events_received: u64,
    /// Times flow control held a direction back.
    pub flow_control_pauses: u64,
    /// Times a held-back direction went back to redirecting.
    pub flow_control_resumes: u64,
    /// Passed bytes user space copied for held-back directions.
    pub flow_control_copied_bytes: u64,
    /// Times a destination's send buffer was raised.
    pub send_buffer_raises: u64,
    /// `FLOWS` entries now (two per spliced tunnel).
    pub flows: u64,
    /// Sockets in `SPLICED` now.
    pub spliced_sockets: u64,
    /// Sockets in `REDIRECT_TARGETS` now.
    pub target_sockets: u64,
}

impl SockmapStats {
    /// Every counter with the name the SIGUSR1 line and the metrics use.
    pub fn fields(&self) -> [(&'static str, u64); 18] {
        [
            ("zero_length_dropped", self.zero_length_dropped),
            ("redirect_failed", self.redirect_failed),
            ("no_flow", self.no_flow),
            ("events_lost", self.events_lost),
            ("duplicate_bytes_trimmed", self.duplicate_bytes_trimmed),
            ("longest_overlap_bytes", self.longest_overlap),
            ("sequence_gaps", self.sequence_gaps),
            ("trim_failed", self.trim_failed),
            ("bytes_redirected", self.bytes_redirected),
            ("bytes_passed", self.bytes_passed),
            ("events_received", self.events_received),
            ("flow_control_pauses", self.flow_control_pauses),
            ("flow_control_resumes", self.flow_control_resumes),
            ("flow_control_copied_bytes", self.flow_control_copied_bytes),
            ("send_buffer_raises", self.send_buffer_raises),
            ("flows", self.flows),
            ("spliced_sockets", self.spliced_sockets),
            ("target_sockets", self.target_sockets),
        ]
    }
}

impl fmt::Display for SockmapStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (name, value)) in self.fields().into_iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}
