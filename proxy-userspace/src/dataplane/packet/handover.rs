//! Promoted tunnels outlive the process (`--packet-state-dir DIR`).
//!
//! A promoted tunnel needs nothing from the process that promoted it but its
//! two `PACKET_FLOWS` entries and the tc programs: the endpoints' segments are
//! translated before any socket of this host sees them. With a state
//! directory on a bpffs (its part for this network namespace, `net-INODE`,
//! locked by the process that uses it):
//!
//! * the maps the programs use (`flows`, `events`, `stats`) are pinned there,
//!   and so are the tcx links (`link-IFINDEX-PROGRAM`), so the programs stay
//!   attached and keep translating after the process exits, crash included;
//! * `tunnels` (a map only user space uses) keeps, per registered tunnel, what
//!   the next process needs to log it: the control plane's record, the bytes
//!   moved before promotion, which entry is the client's;
//! * on SIGTERM a promoted tunnel is handed over at once (nothing is reset,
//!   no access-log record is written) instead of waiting for the drain;
//! * the next process, started with the same directory, reuses the pinned
//!   maps, swaps its programs into the pinned links (`BPF_LINK_UPDATE`,
//!   atomic: no segment goes untranslated), and adopts each translating flow
//!   ([`plan`]): it recreates the proxy's two sockets in repair mode to
//!   reserve their 4-tuples again, follows the flow to its end and logs it.
//!   Flows that were not translating (their sockets died with the process)
//!   are removed.
//!
//! Between the old process's exit and the new one's start the 4-tuples are
//! not reserved: a local `connect()` could pick the upstream side's address
//! and port in that gap (it would take an ephemeral port of this host toward
//! the same upstream address and port). `rm -r DIR` detaches the programs and
//! forgets every flow.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
use proxy_common::{packet_state, PacketEntry, PacketKey};
use socket2::{Domain, Protocol, Socket, Type};

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `BPF_F_NO_PREALLOC`: entries are allocated as tunnels register.
const BPF_F_NO_PREALLOC: u32 = 1;
/// Room for the control plane's record in a [`HandoverValue`].
pub const RECORD_CAP: usize = 968;
/// The most tunnels the `tunnels` map holds (`PACKET_FLOWS` holds two
/// entries per tunnel).
const MAX_TUNNELS: u32 = 65_536;

/// The maps the programs use that are pinned, with their file names.
pub const PINNED_MAPS: [(&str, &str); 3] = [
    ("PACKET_FLOWS", "flows"),
    ("PACKET_EVENTS", "events"),
    ("PACKET_STATS", "stats"),
];

/// Value of the `tunnels` map: what the next process needs to log a tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandoverValue {
    /// Bytes the socket plane moved before promotion (client → upstream,
    /// upstream → client); zero until the tunnel is promoted.
    pub before: [u64; 2],
    /// Bytes of `record` in use.
    pub len: u32,
    /// The key of the client connection's entry.
    pub client_key: PacketKey,
    /// The control plane's record ([`crate::dataplane::Tunnel::handover`]).
    pub record: [u8; RECORD_CAP],
}

const _: () = assert!(size_of::<HandoverValue>() == 1024);

// SAFETY: #[repr(C)], only integers and byte arrays, no implicit padding
// (16 + 4 + 36 + 968 = 1024 bytes, a multiple of the 8-byte alignment,
// checked above), so every bit pattern is a valid value.
unsafe impl aya::Pod for HandoverValue {}

impl HandoverValue {
    /// The value of a tunnel just registered. A `record` that does not fit is
    /// left out: the next process then logs the tunnel from its addresses.
    pub fn new(client_key: PacketKey, record: &[u8]) -> Self {
        let mut value = Self {
            before: [0, 0],
            len: 0,
            client_key,
            record: [0; RECORD_CAP],
        };
        if record.len() <= RECORD_CAP {
            value.len = record.len() as u32;
            value.record[..record.len()].copy_from_slice(record);
        }
        value
    }

    /// The control plane's record.
    pub fn record(&self) -> &[u8] {
        &self.record[..(self.len as usize).min(RECORD_CAP)]
    }
}

/// This process's part of the state directory: `DIR/net-INODE`, one per
/// network namespace (the flows and the interface indexes of one namespace
/// mean nothing in another), locked (`flock`) while a process uses it.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
    /// The open directory holding the lock, until the process exits.
    _lock: Arc<fs::File>,
}

/// The inode of this process's network namespace.
fn netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}

impl StateDir {
    /// Opens (creating it if needed) this network namespace's part of the
    /// state directory `dir`, which must be on a bpffs, and locks it. Pins
    /// left by a build whose entries have another layout are removed (their
    /// flows cannot be adopted), with a warning.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let shown = dir.display();
        // The directory, or where it is to be made.
        let probe = if dir.exists() {
            dir
        } else {
            dir.parent().unwrap_or(dir)
        };
        if !is_bpffs(probe).with_context(|| format!("--packet-state-dir {shown}"))? {
            bail!(
                "--packet-state-dir {shown}: {} is not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)",
                probe.display()
            );
        }
        let path = dir.join(format!("net-{}", netns_inode()?));
        fs::create_dir_all(&path)
            .with_context(|| format!("--packet-state-dir {shown}: creating {}", path.display()))?;
        let lock = fs::File::open(&path)
            .with_context(|| format!("--packet-state-dir {shown}: opening {}", path.display()))?;
        // SAFETY: flock(2) on a descriptor `lock` owns; the lock goes with it.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            bail!(
                "--packet-state-dir {shown}: {} is in use by another spliced in this network namespace ({err})",
                path.display()
            );
        }
        let dir = Self {
            path,
            _lock: Arc::new(lock),
        };
        if let Err(why) = dir.compatible() {
            log::warn!(
                "packet plane: the state in {} cannot be adopted ({why}); removing it, and the flows it held end",
                dir.path.display()
            );
            dir.clear()?;
        }
        Ok(dir)
    }

    /// Checks that pinned maps, if any, have this build's layout.
    fn compatible(&self) -> Result<(), String> {
        let expect = [
            ("flows", size_of::<PacketKey>(), size_of::<PacketEntry>()),
            ("tunnels", size_of::<u64>(), size_of::<HandoverValue>()),
        ];
        for (file, key, value) in expect {
            let path = self.path.join(file);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(|err| format!("{file}: {err}"))?;
            if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
                return Err(format!(
                    "{file} has {}-byte keys and {}-byte values, this build {key} and {value}",
                    info.key_size(),
                    info.value_size()
                ));
            }
        }
        Ok(())
    }

    /// Removes every pin of the directory: the links' programs detach.
    fn clear(&self) -> anyhow::Result<()> {
        for entry in fs::read_dir(&self.path)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// Where map `file` is pinned.
    pub fn map_pin(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }

    /// Where the link of `program` on interface `ifindex` is pinned.
    pub fn link_pin(&self, ifindex: u32, program: &str) -> PathBuf {
        self.path.join(format!("link-{ifindex}-{program}"))
    }

    /// Removes the pinned links not in `keep` (interfaces no longer chosen,
    /// or gone): their programs detach.
    pub fn prune_links(&self, keep: &[PathBuf]) {
        let Ok(dir) = fs::read_dir(&self.path) else {
            return;
        };
        for entry in dir.filter_map(Result::ok) {
            let path = entry.path();
            let is_link = entry.file_name().to_string_lossy().starts_with("link-");
            if is_link && !keep.contains(&path) {
                log::info!(
                    "packet plane: removing {} (not attached now)",
                    path.display()
                );
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// The `tunnels` map, created and pinned if it is not there yet.
    pub fn tunnels(&self) -> anyhow::Result<Tunnels> {
        let path = self.map_pin("tunnels");
        if !path.exists() {
            BpfHashMap::<MapData, u64, HandoverValue>::create(MAX_TUNNELS, BPF_F_NO_PREALLOC)
                .context("creating the tunnels map")?
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map = BpfHashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Tunnels(Mutex::new(map)))
    }
}

/// The `tunnels` map.
pub struct Tunnels(Mutex<BpfHashMap<MapData, u64, HandoverValue>>);

impl Tunnels {
    fn map(&self) -> std::sync::MutexGuard<'_, BpfHashMap<MapData, u64, HandoverValue>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores `value` for tunnel `flow_id`.
    pub fn insert(&self, flow_id: u64, value: &HandoverValue) -> anyhow::Result<()> {
        self.map()
            .insert(flow_id, value, 0)
            .context("updating the tunnels map")
    }

    /// Notes the bytes tunnel `flow_id` moved before promotion.
    pub fn promoted(&self, flow_id: u64, before: [u64; 2]) {
        let mut map = self.map();
        if let Ok(mut value) = map.get(&flow_id, 0) {
            value.before = before;
            let _ = map.insert(flow_id, value, 0);
        }
    }

    /// Tunnel `flow_id`'s value, if it has one.
    pub fn get(&self, flow_id: u64) -> Option<HandoverValue> {
        self.map().get(&flow_id, 0).ok()
    }

    /// Forgets tunnel `flow_id` (it was logged, or never promoted).
    pub fn remove(&self, flow_id: u64) {
        let _ = self.map().remove(&flow_id);
    }

    /// Every tunnel id in the map.
    pub fn ids(&self) -> Vec<u64> {
        self.map().keys().filter_map(Result::ok).collect()
    }
}

/// Whether `path` is on a bpffs.
fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("a path with a NUL byte")?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid C string and `stat` a valid out-pointer
    // for the call's duration.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("{}", path.display()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// What start-up does with one flow found in the pinned maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Both entries translate: follow the flow. `client` is the client
    /// connection's entry key when the tunnel's value says which it is.
    Adopt {
        flow_id: u64,
        keys: [PacketKey; 2],
        ended: bool,
        logged: bool,
    },
    /// Not translating (its process's sockets are gone) or half there:
    /// remove its entries.
    Remove { flow_id: u64, keys: Vec<PacketKey> },
}

/// Sorts the entries of the pinned flows map into flows to adopt and flows to
/// remove. `client_key(flow_id)` is the client entry's key from the tunnel's
/// value, `None` when the tunnel has none (it was already logged: it ended
/// and was lingering). `ended(entry, entry)` says whether a flow is over.
pub fn plan(
    entries: &[(PacketKey, PacketEntry)],
    client_key: impl Fn(u64) -> Option<PacketKey>,
    ended: impl Fn(&PacketEntry, &PacketEntry) -> bool,
) -> Vec<Found> {
    let mut flows: BTreeMap<u64, Vec<(PacketKey, PacketEntry)>> = BTreeMap::new();
    for (key, entry) in entries {
        flows.entry(entry.flow_id).or_default().push((*key, *entry));
    }
    flows
        .into_iter()
        .map(|(flow_id, flow)| {
            let translating = flow.len() == 2
                && flow.iter().all(|(_, e)| e.state == packet_state::TRANSLATE)
                && flow[0].1.peer_key == flow[1].0
                && flow[1].1.peer_key == flow[0].0;
            if !translating {
                return Found::Remove {
                    flow_id,
                    keys: flow.iter().map(|(key, _)| *key).collect(),
                };
            }
            let client = client_key(flow_id);
            let (a, b) = if client == Some(flow[1].0) {
                (flow[1], flow[0])
            } else {
                (flow[0], flow[1])
            };
            Found::Adopt {
                flow_id,
                keys: [a.0, b.0],
                ended: ended(&a.1, &b.1),
                logged: client.is_none(),
            }
        })
        .collect()
}

/// The address an entry key holds (IPv4-mapped addresses as IPv4).
fn addr(ip: [u8; 16], port: [u8; 2]) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::from(ip)).to_canonical(),
        u16::from_be_bytes(port),
    )
}

/// The proxy's address and the peer's on the connection whose arriving
/// segments have `key`.
pub fn ends(key: &PacketKey) -> (SocketAddr, SocketAddr) {
    (addr(key.daddr, key.dport), addr(key.saddr, key.sport))
}

/// A socket in repair mode bound and "connected" (no segment is sent in
/// repair mode) to the 4-tuple of the connection whose arriving segments have
/// `key`: it holds the 4-tuple as the previous process's socket did, so no
/// local `connect()` or `bind()` takes it. In repair mode `bind()` skips the
/// conflict check (`sk_reuse` is `SK_FORCE_REUSE`), so the listening port can
/// be bound; `connect()` fails with `EADDRNOTAVAIL` if another socket holds
/// the 4-tuple.
pub fn reserve(key: &PacketKey) -> io::Result<Socket> {
    let (local, peer) = ends(key);
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    crate::sockopt::repair_on(socket.as_fd())?;
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::packet::translate;

    fn entry(flow_id: u64, state: u32, peer_key: PacketKey) -> PacketEntry {
        PacketEntry {
            flow_id,
            state,
            peer_key,
            ..PacketEntry::default()
        }
    }

    fn keys(n: u16) -> [PacketKey; 2] {
        let client = translate::key(
            SocketAddr::from(([10, 0, 0, 2], 40_000 + n)),
            SocketAddr::from(([10, 0, 0, 1], 3128)),
        );
        let upstream = translate::key(
            SocketAddr::from(([10, 0, 1, 2], 443)),
            SocketAddr::from(([10, 0, 1, 1], 50_000 + n)),
        );
        [client, upstream]
    }

    #[test]
    fn translating_flows_are_adopted_the_others_removed() {
        let [c1, u1] = keys(1);
        let [c2, u2] = keys(2);
        let [c3, _] = keys(3);
        let [c4, u4] = keys(4);
        let entries = [
            // Upstream entry first: the value says which is the client's.
            (u1, entry(1, packet_state::TRANSLATE, c1)),
            (c1, entry(1, packet_state::TRANSLATE, u1)),
            // Still on the pump when its process died.
            (c2, entry(2, packet_state::MONITOR, u2)),
            (u2, entry(2, packet_state::MONITOR, c2)),
            // Half there.
            (c3, entry(3, packet_state::TRANSLATE, u2)),
            // Ended and already logged (no value): lingering.
            (c4, entry(4, packet_state::TRANSLATE, u4)),
            (u4, entry(4, packet_state::TRANSLATE, c4)),
        ];
        let found = plan(
            &entries,
            |id| {
                [(1, c1)]
                    .into_iter()
                    .find(|(f, _)| *f == id)
                    .map(|(_, k)| k)
            },
            |a, _| a.flow_id == 4,
        );
        assert_eq!(
            found,
            vec![
                Found::Adopt {
                    flow_id: 1,
                    keys: [c1, u1],
                    ended: false,
                    logged: false
                },
                Found::Remove {
                    flow_id: 2,
                    keys: vec![c2, u2]
                },
                Found::Remove {
                    flow_id: 3,
                    keys: vec![c3]
                },
                Found::Adopt {
                    flow_id: 4,
                    keys: [c4, u4],
                    ended: true,
                    logged: true
                },
            ]
        );
    }

    #[test]
    fn keys_give_back_the_proxy_and_peer_addresses() {
        let [client, _] = keys(7);
        assert_eq!(
            ends(&client),
            (
                SocketAddr::from(([10, 0, 0, 1], 3128)),
                SocketAddr::from(([10, 0, 0, 2], 40_007))
            )
        );
    }

    #[test]
    fn a_record_too_big_is_left_out() {
        let key = keys(1)[0];
        assert!(HandoverValue::new(key, &[b'x'; RECORD_CAP + 1])
            .record()
            .is_empty());
        let value = HandoverValue::new(key, b"{}");
        assert_eq!(value.record(), b"{}");
    }
}
