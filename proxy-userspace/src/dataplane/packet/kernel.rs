//! Loading the tc programs, attaching them, and the maps user space works
//! with.
//!
//! The object is the one the sockmap plane loads (proxy-ebpf builds one ELF).
//! The planes are chosen once per process and `--dataplane packet` never loads
//! the sockmap plane, so there is no `Ebpf` to share: this loads the object on
//! its own, shrinks the sockmap plane's maps to one entry (they are created
//! with the object but unused here) and loads only the two classifiers.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use proxy_common::{PacketEntry, PacketEvent, PacketKey};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::handover::{StateDir, PINNED_MAPS};
use crate::dataplane::EBPF_OBJECT;

/// `ARPHRD_ETHER` and `ARPHRD_LOOPBACK`: devices whose skbs start with an
/// Ethernet header at tc, which the programs expect.
const ETHERNET_TYPES: [u32; 2] = [1, 772];

type Waiters = Mutex<HashMap<u64, mpsc::UnboundedSender<PacketEvent>>>;

/// The classifiers and where each attaches.
const PROGRAMS: [(&str, TcAttachType); 2] = [
    ("packet_ingress", TcAttachType::Ingress),
    ("packet_egress", TcAttachType::Egress),
];

/// The loaded programs and the maps of the packet plane.
pub struct Kernel {
    flows: Mutex<BpfHashMap<MapData, PacketKey, PacketEntry>>,
    stats: Mutex<Array<MapData, u64>>,
    /// `PACKET_WAKE`: proxy sockets whose segments egress lets out although
    /// their entry translates.
    wake: Mutex<BpfHashMap<MapData, u64, u32>>,
    waiters: Arc<Waiters>,
    /// `lo`'s interface index in this network namespace.
    pub loopback: u32,
    /// Whether the programs go on every interface (no `--packet-interfaces`),
    /// including those that appear later.
    attach_all: bool,
    /// The interfaces (name, index) the programs are attached to, and those
    /// they could not attach to (not tried again).
    interfaces: Mutex<Interfaces>,
    /// Keeps the programs loaded and attached; attaches them to new
    /// interfaces.
    ebpf: Mutex<Ebpf>,
    /// Where the links are pinned (`--packet-state-dir`).
    state: Option<StateDir>,
}

#[derive(Default)]
struct Interfaces {
    attached: Vec<(String, u32)>,
    failed: Vec<(String, u32)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_number(path: &str) -> anyhow::Result<u32> {
    fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {path}"))
}

/// The interfaces to attach to: `wanted`, or every Ethernet-like interface of
/// this network namespace (saying which others it leaves out if `log_skipped`).
fn interfaces(wanted: &[String], log_skipped: bool) -> anyhow::Result<Vec<(String, u32)>> {
    let names: Vec<String> = if wanted.is_empty() {
        let mut all: Vec<String> = fs::read_dir("/sys/class/net")
            .context("listing /sys/class/net")?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        all.sort();
        all
    } else {
        wanted.to_vec()
    };
    let mut chosen = Vec::new();
    for name in names {
        let kind = read_number(&format!("/sys/class/net/{name}/type"))
            .with_context(|| format!("interface {name}"))?;
        if !ETHERNET_TYPES.contains(&kind) {
            if wanted.is_empty() {
                if log_skipped {
                    log::info!(
                        "packet plane: not attaching to {name} (link type {kind}, no Ethernet header)"
                    );
                }
                continue;
            }
            bail!("interface {name} has link type {kind}; the packet plane needs Ethernet or loopback");
        }
        let index = read_number(&format!("/sys/class/net/{name}/ifindex"))?;
        chosen.push((name, index));
    }
    Ok(chosen)
}

impl Kernel {
    /// Loads the object, attaches both programs to `wanted` (every interface
    /// when empty) and starts reading events. Must run inside a tokio runtime.
    pub fn load(wanted: &[String], state: Option<&StateDir>) -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        for unused in ["REDIRECT_TARGETS", "SPLICED", "FLOWS", "FLOW_CONTROL"] {
            loader.map_max_entries(unused, 1);
        }
        if let Some(state) = state {
            // A pinned map is opened instead of created: the programs of the
            // previous process (still attached through their pinned links)
            // and these share it.
            for (map, file) in PINNED_MAPS {
                loader.map_pin_path(map, state.map_pin(file));
            }
        }
        // A ring buffer's size is a power-of-two number of pages.
        loader.map_max_entries("FLOW_EVENTS", 4096);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing"))
        };
        let flows = BpfHashMap::try_from(take(&mut ebpf, "PACKET_FLOWS")?)?;
        let stats = Array::try_from(take(&mut ebpf, "PACKET_STATS")?)?;
        let wake = BpfHashMap::try_from(take(&mut ebpf, "PACKET_WAKE")?)?;
        let events = RingBuf::try_from(take(&mut ebpf, "PACKET_EVENTS")?)?;
        let attached = interfaces(wanted, true)?;
        if attached.is_empty() {
            bail!("no interface to attach the packet plane's programs to");
        }
        for (program, _) in PROGRAMS {
            classifier(&mut ebpf, program)?
                .load()
                .with_context(|| format!("loading {program} (tc classifier)"))?;
        }
        let mut pins = Vec::new();
        for (name, index) in &attached {
            pins.extend(attach(&mut ebpf, name, *index, state)?);
        }
        if let Some(state) = state {
            state.prune_links(&pins);
        }
        let loopback = read_number("/sys/class/net/lo/ifindex").unwrap_or(1);
        let waiters: Arc<Waiters> = Arc::default();
        // SAFETY: the RingBuf owns its map fd and keeps it open until the
        // AsyncFd (which owns the RingBuf) is dropped; nothing else closes it.
        let events =
            unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
                .map_err(|err| anyhow!("registering the packet event ring buffer: {err}"))?;
        tokio::spawn(dispatch_events(events, waiters.clone()));
        Ok(Self {
            flows: Mutex::new(flows),
            stats: Mutex::new(stats),
            wake: Mutex::new(wake),
            waiters,
            loopback,
            attach_all: wanted.is_empty(),
            state: state.cloned(),
            interfaces: Mutex::new(Interfaces {
                attached,
                failed: Vec::new(),
            }),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The interfaces (name, index) the programs are attached to.
    pub fn attached(&self) -> Vec<(String, u32)> {
        lock(&self.interfaces).attached.clone()
    }

    /// With every interface wanted: attaches the programs to the interfaces
    /// that appeared since the last look (a pod's veth created after the
    /// start) and forgets those that are gone (the kernel drops a tcx link
    /// with its device). Runs before each promotion, so that a tunnel through
    /// a new interface can qualify.
    pub fn attach_new_interfaces(&self) {
        if !self.attach_all {
            return;
        }
        // An interface can vanish while it is read; the next promotion looks again.
        let Ok(present) = interfaces(&[], false) else {
            return;
        };
        let mut known = lock(&self.interfaces);
        known
            .attached
            .retain(|interface| present.contains(interface));
        known.failed.retain(|interface| present.contains(interface));
        let new: Vec<(String, u32)> = present
            .into_iter()
            .filter(|interface| {
                !known.attached.contains(interface) && !known.failed.contains(interface)
            })
            .collect();
        if new.is_empty() {
            return;
        }
        let mut ebpf = lock(&self.ebpf);
        for (name, index) in new {
            match attach(&mut ebpf, &name, index, self.state.as_ref()) {
                Ok(_pins) => {
                    log::info!("packet plane: tc programs attached to {name} ({index}), which appeared after the start");
                    known.attached.push((name, index));
                }
                Err(err) => {
                    log::warn!("packet plane: {err:#}; tunnels through {name} stay on splice");
                    known.failed.push((name, index));
                }
            }
        }
    }

    /// Whether every interface that is up now has the programs: none added
    /// since the start, and none of a kind they cannot attach to. Then a
    /// connection whose segments passed no program was not missed by them:
    /// its segments do not carry its socket's addresses.
    pub fn every_interface_attached(&self) -> bool {
        const IFF_UP: u32 = 1;
        let attached = self.attached();
        let Ok(dir) = fs::read_dir("/sys/class/net") else {
            return false;
        };
        dir.filter_map(Result::ok).all(|entry| {
            let Ok(name) = entry.file_name().into_string() else {
                return false;
            };
            let up = fs::read_to_string(entry.path().join("flags"))
                .ok()
                .and_then(|flags| {
                    u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()
                })
                .is_none_or(|flags| flags & IFF_UP != 0);
            !up || attached.iter().any(|(attached, _)| *attached == name)
        })
    }

    /// The entry of `key`, if there is one.
    pub fn get(&self, key: &PacketKey) -> Option<PacketEntry> {
        lock(&self.flows).get(key, 0).ok()
    }

    /// Adds or replaces the entry of `key`.
    pub fn insert(&self, key: &PacketKey, entry: PacketEntry) -> anyhow::Result<()> {
        lock(&self.flows)
            .insert(key, entry, 0)
            .context("updating PACKET_FLOWS")
    }

    /// Lets the segments of the proxy socket `cookie` out at egress although
    /// its entry translates (`on`), or not.
    pub fn wake(&self, cookie: u64, on: bool) -> anyhow::Result<()> {
        let mut wake = lock(&self.wake);
        if on {
            wake.insert(cookie, 1, 0).context("updating PACKET_WAKE")
        } else {
            // An error is a key already gone.
            let _ = wake.remove(&cookie);
            Ok(())
        }
    }

    /// Removes the entry of `key` (if any).
    pub fn remove(&self, key: &PacketKey) {
        let _ = lock(&self.flows).remove(key);
    }

    /// Removes the entry of `key` if it is flow `flow_id`'s (one lock held
    /// from the look-up to the removal, so no [`Kernel::insert`] comes
    /// between).
    pub fn remove_own(&self, key: &PacketKey, flow_id: u64) {
        let mut flows = lock(&self.flows);
        if flows
            .get(key, 0)
            .is_ok_and(|entry| entry.flow_id == flow_id)
        {
            let _ = flows.remove(key);
        }
    }

    /// Entries in the map now.
    pub fn entries(&self) -> usize {
        lock(&self.flows).keys().count()
    }

    /// Every entry in the map now.
    pub fn all_entries(&self) -> Vec<(PacketKey, PacketEntry)> {
        lock(&self.flows).iter().filter_map(Result::ok).collect()
    }

    /// Counter `index` of `PACKET_STATS`.
    pub fn stat(&self, index: u32) -> u64 {
        lock(&self.stats).get(&index, 0).unwrap_or(0)
    }

    /// Events of tunnel `flow_id` from now on.
    pub fn subscribe(&self, flow_id: u64) -> mpsc::UnboundedReceiver<PacketEvent> {
        let (sender, receiver) = mpsc::unbounded_channel();
        lock(&self.waiters).insert(flow_id, sender);
        receiver
    }

    /// Stops delivering events of `flow_id`.
    pub fn unsubscribe(&self, flow_id: u64) {
        lock(&self.waiters).remove(&flow_id);
    }
}

/// The loaded classifier `program` of `ebpf`.
fn classifier<'a>(ebpf: &'a mut Ebpf, program: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing"))?
        .try_into()?)
}

/// Attaches both classifiers to interface `name` (index `index`); returns
/// the links' pins.
///
/// tcx on kernels ≥ 6.6: a link owned by this process, gone when it exits or
/// the device goes, unless it is pinned in the state directory: then it stays
/// until its pin is removed, and the next process swaps its own program into
/// it (`BPF_LINK_UPDATE`, atomic) instead of adding a second one, which would
/// translate segments twice.
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    index: u32,
    state: Option<&StateDir>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut pins = Vec::new();
    for (program, attach_type) in PROGRAMS {
        let classifier = classifier(ebpf, program)?;
        let Some(state) = state else {
            classifier
                .attach(name, attach_type)
                .with_context(|| format!("attaching {program} to {name}"))?;
            continue;
        };
        let pin = state.link_pin(index, program);
        let replaced = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                // The pin goes: the link lives on in `old` until it is
                // updated (or dropped, which detaches it).
                let _ = fs::remove_file(&pin);
                SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(anyhow::Error::from)
                    .and_then(|link| Ok(classifier.attach_to_link(link)?))
                    .inspect_err(|err| {
                        log::warn!("packet plane: {program} on {name}: the pinned link cannot be reused ({err:#}); attaching anew");
                    })
                    .ok()
            }
            Err(_) => None,
        };
        let id = match replaced {
            Some(id) => id,
            None => classifier
                .attach(name, attach_type)
                .with_context(|| format!("attaching {program} to {name}"))?,
        };
        let link = classifier.take_link(id)?;
        FdLink::try_from(link)
            .map_err(anyhow::Error::from)
            .and_then(|link| Ok(link.pin(&pin)?))
            .with_context(|| format!("pinning the link of {program} on {name}"))?;
        pins.push(pin);
    }
    Ok(pins)
}

async fn dispatch_events(mut events: AsyncFd<RingBuf<MapData>>, waiters: Arc<Waiters>) {
    loop {
        let mut guard = match events.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                log::error!("packet event ring buffer failed: {err}; tunnels fall back to polling");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<PacketEvent>() {
                continue;
            }
            let event: PacketEvent =
                bytemuck::pod_read_unaligned(&item[..size_of::<PacketEvent>()]);
            if let Some(waiter) = lock(&waiters).get(&event.flow_id) {
                let _ = waiter.send(event);
            }
        }
        guard.clear_ready();
    }
}
