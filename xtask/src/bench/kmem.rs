//! Kernel memory around idle tunnels: `/proc/net/sockstat` (TCP sockets and
//! the pages charged to TCP socket buffers), `/proc/slabinfo` (socket,
//! skb and kmalloc caches), `/proc/meminfo`'s `Slab`, and the proxy's own
//! sockets' buffers (`ss -tm`'s skmem).
//!
//! The machine-wide counters include every process's sockets, the bench's
//! client ends and the upstream's ends: compare planes, which open the same
//! tunnels the same way. TCP's page counter is charged in per-CPU batches of
//! up to 1 MiB, so it is exact only to that per CPU.

use std::{collections::BTreeMap, fs, process::Command, time::Duration};

use super::child::run_bounded;

/// The slab caches reported, each a group of `/proc/slabinfo` names.
pub const SLAB_GROUPS: [(&str, &[&str]); 3] = [
    ("TCP", &["TCP", "TCPv6"]),
    (
        "skbuff",
        &[
            "skbuff_head_cache",
            "skbuff_fclone_cache",
            "skbuff_small_head",
        ],
    ),
    ("kmalloc", &["kmalloc-*"]),
];

/// One reading of the machine's kernel memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// `sockets: used`.
    pub sockets_used: u64,
    /// `TCP: inuse` (this network namespace).
    pub tcp_inuse: u64,
    /// `TCP: alloc`.
    pub tcp_alloc: u64,
    /// `TCP: mem`: pages charged to TCP socket buffers (all namespaces).
    pub tcp_mem_pages: u64,
    /// Bytes of active objects per [`SLAB_GROUPS`] group; empty when
    /// /proc/slabinfo cannot be read (it needs root).
    pub slab_bytes: BTreeMap<String, u64>,
    /// `/proc/meminfo` `Slab`, KiB.
    pub slab_total_kib: Option<u64>,
}

impl Snapshot {
    /// Reads it now.
    pub fn read() -> Self {
        let mut snapshot =
            parse_sockstat(&fs::read_to_string("/proc/net/sockstat").unwrap_or_default());
        snapshot.slab_bytes =
            parse_slabinfo(&fs::read_to_string("/proc/slabinfo").unwrap_or_default());
        snapshot.slab_total_kib = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("Slab:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
        snapshot
    }
}

/// The page size, for `TCP: mem`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

fn parse_sockstat(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let field = |key: &str| {
            words
                .windows(2)
                .find(|pair| pair[0] == key)
                .and_then(|pair| pair[1].parse().ok())
                .unwrap_or(0)
        };
        match name {
            "sockets" => snapshot.sockets_used = field("used"),
            "TCP" => {
                snapshot.tcp_inuse = field("inuse");
                snapshot.tcp_alloc = field("alloc");
                snapshot.tcp_mem_pages = field("mem");
            }
            _ => {}
        }
    }
    snapshot
}

/// Whether slab cache `name` belongs to `pattern` (a name, or a prefix
/// ending in `*`).
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Active bytes (active objects × object size) per [`SLAB_GROUPS`] group.
fn parse_slabinfo(text: &str) -> BTreeMap<String, u64> {
    let mut bytes = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(active), Some(size)) = (
            fields.first(),
            fields.get(1).and_then(|n| n.parse::<u64>().ok()),
            fields.get(3).and_then(|n| n.parse::<u64>().ok()),
        ) else {
            continue;
        };
        for (group, patterns) in SLAB_GROUPS {
            if patterns.iter().any(|pattern| matches(pattern, name)) {
                *bytes.entry(group.to_owned()).or_default() += active * size;
            }
        }
    }
    bytes
}

/// What each open tunnel added, from the snapshots before and with them open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerTunnel {
    /// TCP sockets (`TCP: alloc`).
    pub tcp_sockets: f64,
    /// Bytes charged to TCP socket buffers (`TCP: mem` pages).
    pub tcp_mem_bytes: f64,
    /// Bytes per [`SLAB_GROUPS`] group.
    pub slab_bytes: BTreeMap<String, f64>,
    /// `Slab` in /proc/meminfo, bytes.
    pub slab_total_bytes: Option<f64>,
}

impl PerTunnel {
    /// `(open − before) / tunnels` of every counter; `None` without tunnels.
    pub fn of(before: &Snapshot, open: &Snapshot, tunnels: usize, page: u64) -> Option<Self> {
        if tunnels == 0 {
            return None;
        }
        let n = tunnels as f64;
        let delta = |b: u64, o: u64| (o as f64 - b as f64) / n;
        Some(Self {
            tcp_sockets: delta(before.tcp_alloc, open.tcp_alloc),
            tcp_mem_bytes: delta(before.tcp_mem_pages, open.tcp_mem_pages) * page as f64,
            slab_bytes: open
                .slab_bytes
                .iter()
                .map(|(group, &bytes)| {
                    let was = before.slab_bytes.get(group).copied().unwrap_or(0);
                    (group.clone(), delta(was, bytes))
                })
                .collect(),
            slab_total_bytes: before
                .slab_total_kib
                .zip(open.slab_total_kib)
                .map(|(b, o)| delta(b, o) * 1024.0),
        })
    }
}

/// The buffers of a set of sockets, from `ss -tm`'s skmem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketBuffers {
    pub sockets: u64,
    /// Σ rmem_alloc (r): bytes of skbs in receive queues.
    pub receive: u64,
    /// Σ wmem_alloc + wmem_queued (t + w): skbs in send queues.
    pub send: u64,
    /// Σ forward alloc (f): memory charged to the sockets but not in use.
    pub forward: u64,
    /// Σ option memory and backlog (o + bl).
    pub other: u64,
    /// Sockets with anything queued (r, t or w not 0).
    pub holding: u64,
}

impl SocketBuffers {
    pub fn total(&self) -> u64 {
        self.receive + self.send + self.forward + self.other
    }
}

/// The buffers of the TCP sockets `ss` selects with `filter` (its filter
/// syntax, e.g. `( sport = :3128 or dport = :5201 )`).
pub fn socket_buffers(filter: &str) -> Result<SocketBuffers, String> {
    let out = run_bounded(
        Command::new("ss").args(["-tmnH", "-O", filter]),
        Duration::from_secs(30),
    )
    .map_err(|err| format!("{err:#}"))?;
    Ok(parse_skmem(&out))
}

fn parse_skmem(text: &str) -> SocketBuffers {
    let mut buffers = SocketBuffers::default();
    const KEY: &str = "skmem:(";
    for (at, _) in text.match_indices(KEY) {
        let rest = &text[at + KEY.len()..];
        let inner = rest.split(')').next().unwrap_or_default();
        let mut fields: BTreeMap<&str, u64> = BTreeMap::new();
        for item in inner.split(',') {
            let split = item
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(item.len());
            let (key, value) = item.split_at(split);
            if let Ok(value) = value.parse() {
                fields.insert(key, value);
            }
        }
        let get = |key| fields.get(key).copied().unwrap_or(0);
        buffers.sockets += 1;
        buffers.receive += get("r");
        buffers.send += get("t") + get("w");
        buffers.forward += get("f");
        buffers.other += get("o") + get("bl");
        if get("r") + get("t") + get("w") > 0 {
            buffers.holding += 1;
        }
    }
    buffers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_fields() {
        let text = "sockets: used 20513\nTCP: inuse 20010 orphan 0 tw 12 alloc 20040 mem 347\n\
                    UDP: inuse 3 mem 2\n";
        let s = parse_sockstat(text);
        assert_eq!(
            (s.sockets_used, s.tcp_inuse, s.tcp_alloc, s.tcp_mem_pages),
            (20513, 20010, 20040, 347)
        );
    }

    #[test]
    fn slabinfo_groups_add_active_bytes() {
        let text = "slabinfo - version: 2.1\n\
            # name <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables\n\
            TCPv6 10 12 2560 12 8 : tunables 0 0 0 : slabdata 1 1 0\n\
            TCP 100 120 2368 13 8 : tunables 0 0 0 : slabdata 9 9 0\n\
            skbuff_head_cache 200 256 256 16 1 : tunables 0 0 0 : slabdata 16 16 0\n\
            skbuff_fclone_cache 3 32 512 16 2 : tunables 0 0 0 : slabdata 2 2 0\n\
            kmalloc-cg-1k 7 16 1024 16 4 : tunables 0 0 0 : slabdata 1 1 0\n\
            kmalloc-64 50 64 64 64 1 : tunables 0 0 0 : slabdata 1 1 0\n\
            dma-kmalloc-64 9 64 64 64 1 : tunables 0 0 0 : slabdata 1 1 0\n";
        let bytes = parse_slabinfo(text);
        assert_eq!(bytes["TCP"], 10 * 2560 + 100 * 2368);
        assert_eq!(bytes["skbuff"], 200 * 256 + 3 * 512);
        assert_eq!(bytes["kmalloc"], 7 * 1024 + 50 * 64);
    }

    #[test]
    fn per_tunnel_deltas() {
        let before = Snapshot {
            tcp_alloc: 10,
            tcp_mem_pages: 5,
            slab_bytes: [("TCP".to_owned(), 1000)].into(),
            slab_total_kib: Some(100),
            ..Snapshot::default()
        };
        let open = Snapshot {
            tcp_alloc: 410,
            tcp_mem_pages: 3,
            slab_bytes: [("TCP".to_owned(), 1_001_000), ("kmalloc".to_owned(), 500)].into(),
            slab_total_kib: Some(1100),
            ..Snapshot::default()
        };
        let each = PerTunnel::of(&before, &open, 100, 4096).unwrap();
        assert_eq!(each.tcp_sockets, 4.0);
        assert_eq!(each.tcp_mem_bytes, -2.0 * 4096.0 / 100.0);
        assert_eq!(each.slab_bytes["TCP"], 10_000.0);
        assert_eq!(each.slab_bytes["kmalloc"], 5.0);
        assert_eq!(each.slab_total_bytes, Some(10_240.0));
        assert!(PerTunnel::of(&before, &open, 0, 4096).is_none());
    }

    #[test]
    fn skmem_sums_per_socket() {
        let text = "ESTAB 0 0 127.0.0.1:3128 127.0.0.1:40000 skmem:(r0,rb131072,t0,tb2626560,f4096,w0,o0,bl0,d0)\n\
                    ESTAB 10 0 127.0.0.1:41000 127.0.0.1:5201 skmem:(r1280,rb131072,t768,tb46080,f0,w2304,o16,bl0,d3)\n";
        let b = parse_skmem(text);
        assert_eq!(b.sockets, 2);
        assert_eq!(b.receive, 1280);
        assert_eq!(b.send, 768 + 2304);
        assert_eq!(b.forward, 4096);
        assert_eq!(b.other, 16);
        assert_eq!(b.holding, 1);
        assert_eq!(b.total(), 1280 + 768 + 2304 + 4096 + 16);
    }
}
