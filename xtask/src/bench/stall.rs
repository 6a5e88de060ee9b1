//! Promotion stall: how long a bulk transfer stops when the packet plane
//! promotes its tunnel mid-stream.
//!
//! Many tunnels, one after the other, each carrying `--promote-after` plus
//! 64 MiB one way as fast as TCP goes, from a sender of the bench's to a
//! receiver of the bench's that timestamps every read. A tunnel's stall is
//! its longest gap between two consecutive reads whose bytes lie in a window
//! around the cut (from 1 MiB before to 8 MiB after the byte where the pump
//! stopped, which the access log's `bytes_before_promotion` gives). The same
//! transfers through `--dataplane splice`, with the window around the byte
//! where promotion would have happened, give the same statistic without a
//! cut: scheduling and loss-free TCP's own gaps.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use super::{
    child::interrupted,
    contenders::{Contender, Proxy, DEFAULT_PROMOTE_AFTER},
    setup_rate::{connect_through, IO_TIMEOUT},
    Env,
};

/// Bytes each transfer carries after the promotion threshold.
const AFTER_THRESHOLD: u64 = 64 << 20;
/// The window around the cut: bytes before it …
pub const WINDOW_BEFORE: u64 = 1 << 20;
/// … and after it.
pub const WINDOW_AFTER: u64 = 8 << 20;
/// The goal for the p99 stall, in milliseconds.
pub const GOAL_P99_MS: f64 = 50.0;
/// A case gives up after this many failed transfers.
const ERROR_BUDGET: u64 = 5;
/// Header of a transfer: direction (`F`: the client sends, `R`: the
/// upstream sends) and the payload's length (u64, little-endian).
const HEADER: usize = 9;
const CHUNK: usize = 256 << 10;

/// One stall case: a plane, a path, a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallCase {
    pub env: Env,
    pub contender: Contender,
    /// The upstream sends (the client receives).
    pub reverse: bool,
}

impl StallCase {
    pub fn id(&self) -> String {
        format!(
            "stall/{}/{}/{}",
            self.env.id(),
            self.contender.id(),
            if self.reverse { "rev" } else { "fwd" }
        )
    }
}

/// The outcome of one stall case.
#[derive(Clone, Debug, Default)]
pub struct StallResult {
    /// Transfers asked for.
    pub tunnels: usize,
    /// Payload bytes per transfer.
    pub transfer_bytes: u64,
    /// Transfers that completed.
    pub completed: usize,
    /// Packet plane: completed transfers whose tunnel was promoted before
    /// its last byte (only these count); `None` on other planes.
    pub promoted: Option<usize>,
    /// Packet plane: the byte (of the payload) where each counted tunnel was
    /// cut.
    pub cut_offsets: Vec<u64>,
    /// Each counted tunnel's stall, milliseconds, in the order of the
    /// transfers.
    pub stalls_ms: Vec<f64>,
    /// Where each counted tunnel's stall began, in bytes after its cut
    /// (negative: before it).
    pub stall_at: Vec<i64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Packet plane: how its counters (SIGUSR1 stats, `packet_*`) moved
    /// during the case: promotions, held segments, …
    pub plane_stats: BTreeMap<String, i64>,
}

impl StallResult {
    fn sorted(&self) -> Vec<f64> {
        let mut sorted = self.stalls_ms.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
    }

    pub fn p50_ms(&self) -> Option<f64> {
        super::percentile(&self.sorted(), 0.50)
    }

    pub fn p99_ms(&self) -> Option<f64> {
        super::percentile(&self.sorted(), 0.99)
    }

    pub fn max_ms(&self) -> Option<f64> {
        self.sorted().last().copied()
    }

    /// Counted tunnels whose stall exceeded `ms`.
    pub fn over(&self, ms: f64) -> usize {
        self.stalls_ms.iter().filter(|&&stall| stall > ms).count()
    }
}

/// The longest time between two consecutive reads among those that
/// delivered a byte of `[lo, hi)`, and the bytes received before it.
/// `reads` are (seconds, bytes received in all after the read), in order;
/// the gap before read i waited for bytes `[reads[i-1].1, reads[i].1)`.
pub fn longest_gap(reads: &[(f64, u64)], lo: u64, hi: u64) -> Option<(f64, u64)> {
    reads
        .windows(2)
        .filter(|pair| pair[1].1 > lo && pair[0].1 < hi)
        .map(|pair| (pair[1].0 - pair[0].0, pair[0].1))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Runs `f` on a new thread in network namespace `netns` (the caller's when
/// `None`): sockets made there belong to it.
fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T>> {
    let netns = netns.map(str::to_owned);
    thread::spawn(move || {
        if let Some(name) = &netns {
            enter_netns(name)?;
        }
        Ok(f())
    })
}

/// Moves this thread into network namespace `name` (made by `ip netns add`).
fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/var/run/netns/{name}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(anyhow!("setns({path}): {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// What the receiver saw of one transfer: (seconds since its first read,
/// bytes so far) per read.
type Reads = Vec<(f64, u64)>;

/// The upstream end: accepts one tunnel at a time, receives (timestamping
/// reads) or sends as the client's header asks. Stops when dropped.
pub struct StallServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Each forward transfer's reads, in the order they end.
    received: Arc<Mutex<mpsc::Receiver<io::Result<Reads>>>>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl StallServer {
    /// Listens on `bind` in network namespace `netns`.
    pub fn start(bind: SocketAddr, netns: Option<&str>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = mpsc::channel();
        let (received_tx, received_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = in_netns(netns, move || -> Result<()> {
            let listener = TcpListener::bind(bind)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("binding {bind}"));
            let listener = match listener {
                Ok(listener) => {
                    let _ = bound_tx.send(Ok(()));
                    listener
                }
                Err(err) => {
                    let _ = bound_tx.send(Err(format!("{err:#}")));
                    return Err(err);
                }
            };
            while !flag.load(Ordering::Relaxed) && !interrupted() {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(reads) = serve(stream) {
                            let _ = received_tx.send(reads);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            Ok(())
        });
        let mut server = Self {
            addr: bind,
            stop,
            received: Arc::new(Mutex::new(received_rx)),
            thread: Some(thread),
        };
        match bound_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(err)) => Err(anyhow!("stall server: {err}")),
            Err(_) => {
                server.stop_now();
                Err(anyhow!("stall server: did not start"))
            }
        }
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StallServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Serves one tunnel; returns the reads of a forward transfer (`None` for
/// a reverse one, whose reads the client has).
fn serve(mut stream: TcpStream) -> Option<io::Result<Reads>> {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    let mut header = [0u8; HEADER];
    if let Err(err) = setup.and_then(|()| stream.read_exact(&mut header)) {
        return Some(Err(err));
    }
    let total = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    if header[0] == b'R' {
        // Errors show on the client's side.
        let _ = send(&mut stream, total).and_then(|()| wait_eof(&mut stream));
        return None;
    }
    Some(receive(&mut stream, total).and_then(|reads| {
        wait_eof(&mut stream)?;
        Ok(reads)
    }))
}

/// Writes `total` bytes, then half-closes.
fn send(stream: &mut TcpStream, total: u64) -> io::Result<()> {
    let chunk = vec![0u8; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)
}

/// Reads `total` bytes, timestamping each read.
fn receive(stream: &mut TcpStream, total: u64) -> io::Result<Reads> {
    let mut buf = vec![0u8; CHUNK];
    let mut reads = Vec::with_capacity(4096);
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    while got < total {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other(format!(
                "closed after {got} of {total} bytes"
            )));
        }
        let now = Instant::now();
        let start = *first.get_or_insert(now);
        got += n as u64;
        reads.push((now.duration_since(start).as_secs_f64(), got));
    }
    Ok(reads)
}

/// Reads until the peer's FIN (nothing more is expected).
fn wait_eof(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf)? {
        0 => Ok(()),
        _ => Err(io::Error::other("bytes after the transfer")),
    }
}

/// One transfer through the proxy; returns the client's address (as the
/// proxy logs it) and the receiver's reads.
fn transfer(
    proxy: SocketAddr,
    target: SocketAddr,
    reverse: bool,
    total: u64,
    received: &Mutex<mpsc::Receiver<io::Result<Reads>>>,
) -> io::Result<(SocketAddr, Reads)> {
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    while received.try_recv().is_ok() {}
    let mut stream = TcpStream::connect_timeout(&proxy, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    if !connect_through(&mut stream, target)?.is_empty() {
        return Err(io::Error::other("bytes before the transfer's header"));
    }
    let client = stream.local_addr()?;
    let mut header = [0u8; HEADER];
    header[0] = if reverse { b'R' } else { b'F' };
    header[1..].copy_from_slice(&total.to_le_bytes());
    stream.write_all(&header)?;
    if reverse {
        let reads = receive(&mut stream, total)?;
        wait_eof(&mut stream)?;
        return Ok((client, reads));
    }
    send(&mut stream, total)?;
    wait_eof(&mut stream)?;
    let reads = received
        .recv_timeout(IO_TIMEOUT)
        .map_err(|_| io::Error::other("the receiver reported nothing"))??;
    Ok((client, reads))
}

/// Where a case's ends are.
pub struct Ends<'a> {
    pub client_netns: Option<&'a str>,
    pub server: &'a StallServer,
}

/// Runs `tunnels` transfers of `case` through `proxy`, one at a time.
pub fn measure(case: StallCase, proxy: &Proxy, ends: &Ends<'_>, tunnels: usize) -> StallResult {
    let started = Instant::now();
    let total = DEFAULT_PROMOTE_AFTER + AFTER_THRESHOLD;
    let logged_before = proxy.tunnel_records().map(|records| records.len());
    let stats_before = proxy.stats().filter(|_| case.contender.promotes());
    let (proxy_addr, target, received) =
        (proxy.addr, ends.server.addr, ends.server.received.clone());
    let client = in_netns(ends.client_netns, move || {
        let mut done = Vec::with_capacity(tunnels);
        let (mut errors, mut first_error) = (0u64, None);
        for _ in 0..tunnels {
            if errors >= ERROR_BUDGET || interrupted() {
                break;
            }
            match transfer(proxy_addr, target, case.reverse, total, &received) {
                Ok(one) => done.push(one),
                Err(err) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| err.to_string());
                }
            }
        }
        (done, errors, first_error)
    });
    let (done, errors, first_error) = match client.join() {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(err)) => (Vec::new(), 1, Some(format!("{err:#}"))),
        Err(_) => (Vec::new(), 1, Some("the client thread panicked".to_owned())),
    };
    let mut result = StallResult {
        tunnels,
        transfer_bytes: total,
        completed: done.len(),
        errors,
        first_error,
        ..StallResult::default()
    };
    if case.contender.promotes() {
        // Each transfer's cut, from its access-log record.
        let before = logged_before.unwrap_or(0);
        let records = proxy
            .wait_records(before + done.len(), Duration::from_secs(8))
            .unwrap_or_default();
        let by_client: HashMap<&str, _> = records
            .iter()
            .skip(before)
            .map(|record| (record.client.as_str(), record))
            .collect();
        let mut promoted = 0;
        for (client, reads) in &done {
            let cut = by_client
                .get(client.to_string().as_str())
                .filter(|record| record.promoted())
                .and_then(|record| record.before_promotion)
                .map(|(up, down)| {
                    if case.reverse {
                        down
                    } else {
                        up.saturating_sub(HEADER as u64)
                    }
                })
                .filter(|&cut| cut < total);
            if let Some(cut) = cut {
                promoted += 1;
                result.cut_offsets.push(cut);
                result.add(reads, cut);
            }
        }
        result.promoted = Some(promoted);
        if let (Some(before), Some(after)) = (stats_before, proxy.stats()) {
            result.plane_stats = counter_deltas(&before, &after, "packet_");
        }
    } else {
        for (_, reads) in &done {
            result.add(reads, DEFAULT_PROMOTE_AFTER);
        }
    }
    result.secs = started.elapsed().as_secs_f64();
    result
}

/// `after − before` of the counters whose name starts with `prefix`.
fn counter_deltas(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    prefix: &str,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .filter(|(key, _)| key.starts_with(prefix))
        .map(|(key, &now)| {
            let was = before.get(key).copied().unwrap_or(0);
            (key.clone(), now as i64 - was as i64)
        })
        .collect()
}

impl StallResult {
    /// Adds the stall of a transfer cut at byte `cut`.
    fn add(&mut self, reads: &[(f64, u64)], cut: u64) {
        let window = (cut.saturating_sub(WINDOW_BEFORE), cut + WINDOW_AFTER);
        if let Some((secs, at)) = longest_gap(reads, window.0, window.1) {
            self.stalls_ms.push(secs * 1e3);
            self.stall_at.push(at as i64 - cut as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_counts_only_reads_in_the_window() {
        // Reads at 0, 1, 2 ms … of 100 bytes each, with a 50 ms gap before
        // the read that brought bytes 500..600 and a 90 ms one before 900..1000.
        let mut reads = Vec::new();
        let mut t = 0.0;
        for i in 1..=10u64 {
            t += match i {
                6 => 0.050,
                10 => 0.090,
                _ => 0.001,
            };
            reads.push((t, i * 100));
        }
        assert_eq!(longest_gap(&reads, 0, 2000), Some((0.090, 900)));
        let (around, at) = longest_gap(&reads, 450, 800).unwrap();
        assert!((around - 0.050).abs() < 1e-9, "{around}");
        assert_eq!(at, 500);
        // Bytes 600..700 came 1 ms after the previous read.
        let (after, _) = longest_gap(&reads, 600, 700).unwrap();
        assert!((after - 0.001).abs() < 1e-9, "{after}");
        assert_eq!(longest_gap(&reads, 5000, 6000), None);
        assert_eq!(longest_gap(&reads[..1], 0, 100), None);
    }

    #[test]
    fn stalls_are_taken_around_the_cut() {
        let reads = [(0.0, 100), (0.001, 200), (0.201, 300), (0.202, 400)];
        let mut result = StallResult::default();
        result.add(&reads, 250);
        assert_eq!(result.stall_at, [-50]);
        assert!((result.stalls_ms[0] - 200.0).abs() < 1e-6);
    }

    #[test]
    fn counter_deltas_keep_the_prefix_only() {
        let before: BTreeMap<String, u64> =
            [("packet_held".into(), 10), ("packet_entries".into(), 8)].into();
        let after: BTreeMap<String, u64> = [
            ("packet_held".into(), 15),
            ("packet_entries".into(), 2),
            ("packet_promoted".into(), 3),
            ("flow_control_copied_bytes".into(), 9),
        ]
        .into();
        let deltas = counter_deltas(&before, &after, "packet_");
        assert_eq!(deltas.len(), 3);
        assert_eq!(deltas["packet_held"], 5);
        assert_eq!(deltas["packet_entries"], -6);
        assert_eq!(deltas["packet_promoted"], 3);
    }

    #[test]
    fn stall_percentiles() {
        let result = StallResult {
            stalls_ms: (1..=100).rev().map(f64::from).collect(),
            ..StallResult::default()
        };
        assert_eq!(result.p50_ms(), Some(50.0));
        assert_eq!(result.p99_ms(), Some(99.0));
        assert_eq!(result.max_ms(), Some(100.0));
        assert_eq!(result.over(GOAL_P99_MS), 50);
        assert_eq!(StallResult::default().p99_ms(), None);
    }

    #[test]
    fn stall_case_ids() {
        let case = StallCase {
            env: Env::Netns,
            contender: Contender::Packet,
            reverse: true,
        };
        assert_eq!(case.id(), "stall/netns/packet/rev");
    }
}
