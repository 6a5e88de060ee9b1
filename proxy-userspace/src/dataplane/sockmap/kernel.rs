//! The sockmap plane's kernel objects: loading `proxy-ebpf`, attaching its
//! programs, and every read and write of its maps. Each map has its own lock,
//! so a tunnel reading its `FLOWS` entries does not wait for another one
//! inserting sockets.

use std::{
    io,
    os::fd::BorrowedFd,
    sync::{Mutex, MutexGuard, RwLock},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf, SockHash},
    programs::{links::CgroupAttachMode, SkSkb, SockOps},
    Ebpf, EbpfLoader,
};
use proxy_common::{FlowControl, FlowEntry};
use tokio::io::unix::AsyncFd;

use super::cgroup;
#[cfg(feature = "test-hooks")]
use crate::config::TestHook;
use crate::config::TestHooks;
use crate::dataplane::EBPF_OBJECT;

/// The two sockhashes a tunnel's sockets go into, in the order they must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockMap {
    /// `REDIRECT_TARGETS`: no program, only where redirects find their peer.
    Targets,
    /// `SPLICED`: the verdict runs for every skb of the sockets in it.
    Spliced,
}

/// The loaded programs and the maps user space works with.
pub struct Kernel {
    targets: Mutex<SockHash<MapData, u64>>,
    spliced: Mutex<SockHash<MapData, u64>>,
    flows: RwLock<BpfHashMap<MapData, u64, FlowEntry>>,
    flow_control: RwLock<BpfHashMap<MapData, u64, FlowControl>>,
    stats: Array<MapData, u64>,
    /// Keeps the programs loaded and attached for the life of the data plane.
    _ebpf: Ebpf,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Kernel {
    /// Loads the object, attaches `splice_verdict` to `SPLICED` and `flow_state`
    /// to this process's cgroup, and returns the flow event ring buffer.
    pub fn load(hooks: &TestHooks) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        set_test_globals(&mut loader, hooks);
        let log_level = ebpf_log_level();
        loader.override_global("AYA_LOG_LEVEL", &log_level, true);
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

        let (cgroup, cgroup_path) = cgroup::open_own_cgroup_v2()?;
        let flow_state: &mut SockOps = ebpf
            .program_mut("flow_state")
            .context("program flow_state missing")?
            .try_into()?;
        flow_state.load().context("loading flow_state (sock_ops)")?;
        flow_state
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching flow_state to cgroup {}", cgroup_path.display()))?;

        forward_ebpf_logs(&mut ebpf)?;
        let kernel = Self {
            targets: Mutex::new(targets),
            spliced: Mutex::new(spliced),
            flows: RwLock::new(flows),
            flow_control: RwLock::new(flow_control),
            stats,
            _ebpf: ebpf,
        };
        Ok((kernel, events))
    }

    /// Inserts the `FLOWS` entry of socket `cookie`.
    pub fn insert_flow(&self, cookie: u64, entry: FlowEntry) -> anyhow::Result<()> {
        write(&self.flows)
            .insert(cookie, entry, 0)
            .context("inserting into FLOWS")
    }

    /// Socket `cookie`'s `FLOWS` entry (zeroes if it is gone).
    pub fn flow(&self, cookie: u64) -> FlowEntry {
        read(&self.flows).get(&cookie, 0).unwrap_or_default()
    }

    /// Reads and deletes socket `cookie`'s `FLOWS` and `FLOW_CONTROL` entries.
    pub fn remove_flow(&self, cookie: u64) -> FlowEntry {
        let entry = {
            let mut flows = write(&self.flows);
            let entry = flows.get(&cookie, 0).unwrap_or_default();
            let _ = flows.remove(&cookie);
            entry
        };
        let _ = write(&self.flow_control).remove(&cookie);
        entry
    }

    /// Replaces socket `cookie`'s `FLOW_CONTROL` value.
    pub fn set_flow_control(&self, cookie: u64, mode: u64, copied: u64) -> anyhow::Result<()> {
        let control = FlowControl {
            mode,
            bytes_copied: copied,
        };
        write(&self.flow_control)
            .insert(cookie, control, 0)
            .context("updating FLOW_CONTROL")
    }

    /// Socket `cookie`'s `FLOWS` entry and `FLOW_CONTROL` value, read together.
    pub fn flow_and_control(&self, cookie: u64) -> (FlowEntry, FlowControl) {
        (
            self.flow(cookie),
            read(&self.flow_control).get(&cookie, 0).unwrap_or_default(),
        )
    }

    /// Inserts `socket` under `cookie` into `map`.
    pub fn insert_socket(
        &self,
        map: SockMap,
        cookie: u64,
        socket: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let result = match map {
            SockMap::Targets => lock(&self.targets).insert(cookie, socket, 0),
            SockMap::Spliced => lock(&self.spliced).insert(cookie, socket, 0),
        };
        result.map_err(|err| match err {
            aya::maps::MapError::SyscallError(syscall) => syscall.io_error,
            other => io::Error::other(other),
        })
    }

    /// Removes socket `cookie` from `map` (probe sockets only: a tunnel's
    /// sockets leave both maps when they close).
    pub fn remove_socket(&self, map: SockMap, cookie: u64) {
        let _ = match map {
            SockMap::Targets => lock(&self.targets).remove(&cookie),
            SockMap::Spliced => lock(&self.spliced).remove(&cookie),
        };
    }

    /// The kernel-side counter at `index` (see `proxy_common::stat`).
    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).unwrap_or(0)
    }

    /// How many entries `FLOWS` and each sockhash hold now.
    pub fn sizes(&self) -> MapSizes {
        MapSizes {
            flows: read(&self.flows).keys().count() as u64,
            spliced_sockets: lock(&self.spliced).keys().count() as u64,
            target_sockets: lock(&self.targets).keys().count() as u64,
        }
    }
}

/// Entries in the sockmap plane's maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// `FLOWS` entries (two per spliced tunnel).
    pub flows: u64,
    /// Sockets in `SPLICED`.
    pub spliced_sockets: u64,
    /// Sockets in `REDIRECT_TARGETS`.
    pub target_sockets: u64,
}

/// Sets the verdict's test-only globals (`--test-hook`): they exist only in
/// the eBPF object of a `test-hooks` build.
#[cfg(feature = "test-hooks")]
fn set_test_globals(loader: &mut EbpfLoader<'_>, hooks: &TestHooks) {
    static YES: u8 = 1;
    static NO: u8 = 0;
    // One step of bpf_skb_adjust_room (at most 4095 bytes).
    static ONE_TRIM_STEP: u32 = 1;
    let flag = |on: bool| if on { &YES } else { &NO };
    loader
        .override_global(
            "REDIRECT_EMPTY_SKBS",
            flag(hooks.has(TestHook::RedirectEmptySkbs)),
            true,
        )
        .override_global(
            "TRIM_OVERLAPS",
            flag(!hooks.has(TestHook::NoOverlapTrim)),
            true,
        );
    if hooks.has(TestHook::ShortTrim) {
        loader.override_global("TRIM_STEPS", &ONE_TRIM_STEP, true);
    }
}

#[cfg(not(feature = "test-hooks"))]
fn set_test_globals(_loader: &mut EbpfLoader<'_>, _hooks: &TestHooks) {}

/// The module path the eBPF programs' log records carry as their target.
const EBPF_LOG_TARGET: &str = "proxy_ebpf";

/// The most verbose level the process logs for the eBPF programs' target, in
/// aya-log's numbering (1 error … 5 trace, 0 off): the programs skip every
/// record above it, so a quiet process pays nothing for their debug lines.
fn ebpf_log_level() -> u8 {
    let logger = log::logger();
    [
        log::Level::Trace,
        log::Level::Debug,
        log::Level::Info,
        log::Level::Warn,
        log::Level::Error,
    ]
    .into_iter()
    .find(|&level| {
        logger.enabled(
            &log::Metadata::builder()
                .level(level)
                .target(EBPF_LOG_TARGET)
                .build(),
        )
    })
    .map_or(0, |level| level as u8)
}

/// Sends the eBPF programs' aya-log records (`AYA_LOGS` ring buffer) to this
/// process's logger, from a task that wakes when records arrive.
fn forward_ebpf_logs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("starting the eBPF log reader")?;
    // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd and
    // keeps it open until the AsyncFd is dropped; nothing else closes it.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|err| anyhow!("registering the eBPF log ring buffer: {err}"))?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(err) => {
                    log::warn!("eBPF log ring buffer failed: {err}");
                    return;
                }
            }
        }
    });
    Ok(())
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
