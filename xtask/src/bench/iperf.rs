//! One iperf3 measurement: a one-off server, an unmodified iperf3 client
//! (through proxychains4 when a proxy is measured), the machine's busy time
//! around it, and the numbers from `iperf3 -J`.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::Path,
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use serde_json::Value;

use super::{
    child::{placed, tail, wait_listening, Guarded},
    contenders::TunnelRecord,
    cpu,
};

/// Numbers the runs' output files.
static RUN: AtomicUsize = AtomicUsize::new(1);

/// What a measurement asks iperf3 for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Kind {
    /// `-R`: the server sends.
    pub reverse: bool,
    /// `-P N`.
    pub streams: u32,
    /// `-b RATE` (per stream), for the CPU cost at a fixed rate.
    pub rate: Option<&'static str>,
}

impl Kind {
    pub const fn new(reverse: bool, streams: u32) -> Self {
        Self {
            reverse,
            streams,
            rate: None,
        }
    }

    pub const fn at_rate(reverse: bool, streams: u32, rate: &'static str) -> Self {
        Self {
            reverse,
            streams,
            rate: Some(rate),
        }
    }

    /// `fwd/P1`, `rev/P4`, `fwd/P1/5G` (for case ids).
    pub fn id(&self) -> String {
        let dir = if self.reverse { "rev" } else { "fwd" };
        match self.rate {
            Some(rate) => format!("{dir}/P{}/{rate}", self.streams),
            None => format!("{dir}/P{}", self.streams),
        }
    }

    /// `fwd P1`, `-R P4`, `fwd P1 -b 5G` (for humans).
    pub fn label(&self) -> String {
        let dir = if self.reverse { "-R" } else { "fwd" };
        match self.rate {
            Some(rate) => format!("{dir} P{} -b {rate}", self.streams),
            None => format!("{dir} P{}", self.streams),
        }
    }
}

/// Where the two iperf3 ends run.
pub struct Ends<'a> {
    pub server_netns: Option<&'a str>,
    pub server_cpu: Option<u32>,
    pub client_netns: Option<&'a str>,
    pub client_cpu: Option<u32>,
    /// The server's address (it binds to it; the client connects to it).
    pub server_ip: IpAddr,
    pub port: u16,
    /// iperf3's `-C`: congestion control on its sockets (both ends), if not
    /// the system's default.
    pub congestion: Option<&'a str>,
    /// Scratch directory for the client's output.
    pub dir: &'a Path,
}

/// The result of one iperf3 run.
#[derive(Clone, Debug)]
pub struct Sample {
    /// end.sum_received.bits_per_second / 1e9.
    pub gbps: f64,
    /// end.sum_received.bytes.
    pub bytes: u64,
    /// Wall time around the client process.
    pub wall_s: f64,
    /// Busy CPU-seconds of the whole machine during that time.
    pub busy_cpu_s: f64,
    /// CPU-seconds of user processes outside the benchmark during that time
    /// (other work on a shared machine).
    pub others_cpu_s: f64,
    /// Bytes spliced's sockmap flow control copied through user space during
    /// the run (its `flow_control_copied_bytes` stat); `None` for others.
    pub user_copied_bytes: Option<u64>,
    /// For `spliced auto`: how many of the run's tunnels each data plane ran
    /// (from its JSON access log); `None` for others.
    pub planes_used: Option<BTreeMap<String, u64>>,
    /// For the packet contenders: whether the run's data connections were
    /// promoted (from the JSON access log); `None` for others.
    pub promotion: Option<PromotionCheck>,
}

/// What the access log says about a run's tunnels on the packet plane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromotionCheck {
    /// iperf3's data connections: the run's `-P` largest tunnels (its
    /// control connection moves a few KiB).
    pub data: u64,
    /// Of them, promoted (their record says `packet`).
    pub promoted: u64,
    /// The run's other tunnels (iperf3's control connection), by plane.
    pub others: BTreeMap<String, u64>,
}

impl PromotionCheck {
    /// Sorts the run's tunnel records into data and control connections.
    pub fn of(records: &[TunnelRecord], streams: u32) -> Self {
        let mut by_size: Vec<&TunnelRecord> = records.iter().collect();
        by_size.sort_by_key(|record| std::cmp::Reverse(record.bytes));
        let split = by_size.len().min(streams as usize);
        let (data, others) = by_size.split_at(split);
        let mut check = Self {
            data: data.len() as u64,
            promoted: data.iter().filter(|r| r.promoted()).count() as u64,
            others: BTreeMap::new(),
        };
        for record in others {
            *check.others.entry(record.dataplane.clone()).or_default() += 1;
        }
        check
    }

    /// Why the run does not measure the packet plane, if it does not.
    pub fn fallback(&self, streams: u32) -> Option<String> {
        if self.data < u64::from(streams) {
            return Some(format!(
                "the access log has {} of the run's {streams} data connection(s) (and {} \
                 other tunnels): promotion not confirmed",
                self.data,
                self.others.values().sum::<u64>()
            ));
        }
        (self.promoted < self.data).then(|| {
            format!(
                "FALLBACK: {} of {} data connection(s) not promoted (stayed on the splice pump)",
                self.data - self.promoted,
                self.data
            )
        })
    }
}

impl Sample {
    /// CPU-seconds per GiB received.
    pub fn cpu_s_per_gib(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.busy_cpu_s / self.gib())
    }

    /// CPU-seconds per GiB received, without other processes' CPU time.
    pub fn own_cpu_s_per_gib(&self) -> Option<f64> {
        (self.bytes > 0).then(|| (self.busy_cpu_s - self.others_cpu_s).max(0.0) / self.gib())
    }

    fn gib(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 30)
    }
}

/// Runs iperf3 once for `secs` seconds, through the proxy whose proxychains4
/// configuration is given, or directly.
pub fn run(
    ends: &Ends<'_>,
    kind: Kind,
    secs: u32,
    proxychains: Option<&Path>,
) -> Result<Sample, String> {
    let ip = ends.server_ip.to_string();
    let port = ends.port.to_string();
    let mut server_cmd = placed(
        ends.server_netns,
        ends.server_cpu,
        &["iperf3", "-s", "-1", "-B", &ip, "-p", &port],
    );
    server_cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut server =
        Guarded::spawn(&mut server_cmd, "iperf3 server").map_err(|err| format!("{err:#}"))?;
    wait_listening(&mut server, ends.port, Duration::from_secs(10))
        .map_err(|reason| format!("iperf3 server: {reason}"))?;

    let secs_arg = secs.to_string();
    let streams = kind.streams.to_string();
    let mut argv: Vec<&str> = Vec::new();
    let conf;
    if let Some(path) = proxychains {
        conf = path.to_string_lossy().into_owned();
        argv.extend(["proxychains4", "-q", "-f", &conf]);
    }
    argv.extend([
        "iperf3",
        "-c",
        &ip,
        "-p",
        &port,
        "-t",
        &secs_arg,
        "-J",
        "--connect-timeout",
        "5000",
        "-P",
        &streams,
    ]);
    if kind.reverse {
        argv.push("-R");
    }
    if let Some(rate) = kind.rate {
        argv.extend(["-b", rate]);
    }
    if let Some(congestion) = ends.congestion {
        argv.extend(["-C", congestion]);
    }
    // One pair of files per run, kept for a post-mortem when a run fails.
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let out_path = ends.dir.join(format!("iperf3-{n:03}.json"));
    let err_path = ends.dir.join(format!("iperf3-{n:03}.err"));
    let out = fs::File::create(&out_path).map_err(|err| err.to_string())?;
    let err = fs::File::create(&err_path).map_err(|err| err.to_string())?;
    let mut client_cmd = placed(ends.client_netns, ends.client_cpu, &argv);
    client_cmd.stdout(out).stderr(err);

    let others = cpu::OthersMeter::start();
    let before = cpu::sample();
    let mut client =
        Guarded::spawn(&mut client_cmd, "iperf3 client").map_err(|err| format!("{err:#}"))?;
    let limit = Duration::from_secs(u64::from(secs) + 20);
    let status = client.wait_for(limit).map_err(|err| format!("{err:#}"))?;
    let after = cpu::sample();
    let others_cpu_s = others.finish();
    let Some(status) = status else {
        return Err(format!(
            "iperf3 client did not finish within {limit:?} (run {n:03})"
        ));
    };
    // The one-off server exits by itself after the test; give it a moment.
    let _ = server.wait_for(Duration::from_secs(2));
    let (wall_s, busy_cpu_s) = before.busy_until(&after);
    let others_cpu_s = others_cpu_s.min(busy_cpu_s);

    let text = fs::read_to_string(&out_path).unwrap_or_default();
    let json: Value = serde_json::from_str(&text).map_err(|parse| {
        let stderr = tail(&err_path, 2);
        format!(
            "iperf3 {status}, no JSON ({parse}){}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {stderr}")
            }
        )
    })?;
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {error} (run {n:03})"));
    }
    let received = &json["end"]["sum_received"];
    let bits = received["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON has no end.sum_received.bits_per_second")?;
    let bytes = received["bytes"].as_f64().unwrap_or(0.0) as u64;
    Ok(Sample {
        gbps: bits / 1e9,
        bytes,
        wall_s,
        busy_cpu_s,
        others_cpu_s,
        user_copied_bytes: None,
        planes_used: None,
        promotion: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(bytes: u64, plane: &str) -> TunnelRecord {
        TunnelRecord {
            client: "127.0.0.1:1".into(),
            dataplane: plane.into(),
            bytes,
            before_promotion: None,
        }
    }

    #[test]
    fn promotion_check_counts_only_data_connections() {
        let run = [
            record(900, "splice"),
            record(3 << 30, "packet"),
            record(2 << 30, "splice"),
        ];
        let one = PromotionCheck::of(&run[..2], 1);
        assert_eq!((one.data, one.promoted), (1, 1));
        assert_eq!(one.others["splice"], 1);
        assert_eq!(one.fallback(1), None);
        let two = PromotionCheck::of(&run, 2);
        assert_eq!((two.data, two.promoted), (2, 1));
        assert!(two.fallback(2).unwrap().starts_with("FALLBACK: 1 of 2"));
        let missing = PromotionCheck::of(&run[..1], 2);
        assert!(missing.fallback(2).unwrap().contains("not confirmed"));
    }
}
