//! What the benchmark writes: terminal tables, the JSON of raw results,
//! docs/benchmarks.md and the hand-made SVG chart.

use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Duration};

use serde_json::{json, Value};

use super::{
    child::run_bounded, contenders::Contender, cpu, Env, Results, ScaleResult, Settings, TputResult,
};
use crate::bench::iperf::{Kind, Sample};

/// The machine and the run.
pub struct Meta {
    pub command: String,
    pub date: String,
    pub nproc: u32,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total_gib: f64,
    pub congestion: String,
    pub cpu_source: cpu::Source,
    pub background_busy_cpus: f64,
    pub loadavg: String,
    pub tools: Vec<(String, String)>,
    pub elapsed_s: f64,
}

impl Meta {
    /// Reads the machine's description and samples its background load for
    /// a moment (the machine is shared: other work skews the numbers).
    pub fn collect(settings: &Settings) -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or_else(
                || "unknown CPU".to_owned(),
                |(_, name)| name.trim().to_owned(),
            );
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_gib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let read = |path: &str| {
            fs::read_to_string(path)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let date = run_bounded(
            Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]),
            Duration::from_secs(5),
        )
        .map(|d| d.trim().to_owned())
        .unwrap_or_default();
        let tools = run_bounded(
            Command::new("dpkg-query").args([
                "--show",
                "--showformat=${Package} ${Version}\n",
                "iperf3",
                "squid",
                "tinyproxy-bin",
                "proxychains4",
            ]),
            Duration::from_secs(10),
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(p, v)| (p.to_owned(), v.to_owned()))
        .collect();
        let before = cpu::sample();
        super::child::sleep(Duration::from_millis(if settings.quick {
            500
        } else {
            1000
        }));
        let after = cpu::sample();
        let (wall, busy) = before.busy_until(&after);
        Self {
            command: format!("cargo xtask {}", args.join(" ")),
            date,
            nproc: cpu::online_cpus(),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease"),
            mem_total_gib,
            congestion: read("/proc/sys/net/ipv4/tcp_congestion_control"),
            cpu_source: after.source,
            background_busy_cpus: if wall > 0.0 { busy / wall } else { 0.0 },
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            tools,
            elapsed_s: 0.0,
        }
    }
}

fn opt<T: Into<Value>>(value: Option<T>) -> Value {
    value.map_or(Value::Null, Into::into)
}

fn finite(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

fn sample_json(sample: &Result<Sample, String>) -> Value {
    match sample {
        Ok(s) => json!({
            "gbps": s.gbps,
            "bytes": s.bytes,
            "wall_s": s.wall_s,
            "busy_cpu_s": s.busy_cpu_s,
            "others_cpu_s": s.others_cpu_s,
            "user_copied_bytes": s.user_copied_bytes,
            "planes_used": s.planes_used,
            "cpu_s_per_gib": opt(s.cpu_s_per_gib()),
            "own_cpu_s_per_gib": opt(s.own_cpu_s_per_gib()),
        }),
        Err(err) => json!({ "error": err }),
    }
}

/// The raw results.
pub fn to_json(results: &Results) -> Value {
    let m = &results.meta;
    let s = &results.settings;
    let tput: Vec<Value> = results
        .tput
        .iter()
        .map(|r| {
            let direct = direct_of(results, r);
            json!({
                "id": r.case.id(),
                "env": r.case.env.id(),
                "contender": r.case.contender.id(),
                "reverse": r.case.kind.reverse,
                "streams": r.case.kind.streams,
                "rate": r.case.kind.rate,
                "start_failure": r.start_failure,
                "runs": r.samples.iter().map(sample_json).collect::<Vec<_>>(),
                "median_gbps": opt(r.median_gbps()),
                "ratio_to_direct": opt(ratio(r.median_gbps(), direct.and_then(TputResult::median_gbps))),
                "median_cpu_s_per_gib": opt(r.median_cpu_per_gib()),
                "cpu_s_per_gib_minus_direct": opt(difference(
                    r.median_cpu_per_gib(),
                    direct.and_then(TputResult::median_cpu_per_gib),
                )),
                "median_busy_cpus": opt(r.median_busy_cpus()),
                "median_others_cpus": opt(r.median_others_cpus()),
                "median_own_cpu_s_per_gib": opt(r.median_own_cpu_per_gib()),
            })
        })
        .collect();
    let setup: Vec<Value> = results
        .setup
        .iter()
        .map(|(c, r)| match r {
            Ok(r) => json!({
                "contender": c.id(),
                "clients": r.clients,
                "secs": r.secs,
                "tunnels": r.tunnels,
                "per_sec": r.per_sec,
                "latency": if *c == Contender::Direct { "connect" } else { "connect_to_200" },
                "p50_ms": finite(r.p50_ms),
                "p99_ms": finite(r.p99_ms),
                "errors": r.errors,
                "first_error": r.first_error,
            }),
            Err(err) => json!({ "contender": c.id(), "error": err }),
        })
        .collect();
    let scale: Vec<Value> = results
        .scale
        .iter()
        .map(|(c, r)| match r {
            Ok(r) => json!({
                "contender": c.id(),
                "wanted": r.wanted,
                "rlimit_nofile": r.nofile,
                "target": r.target,
                "opened": r.opened,
                "open_secs": r.open_secs,
                "open_errors": r.open_errors,
                "first_error": r.first_error,
                "rss_idle_kib": r.rss_idle_kib,
                "rss_open_kib": r.rss_open_kib,
                "fds_open": r.fds_open,
                "busy": sample_json(&r.busy),
            }),
            Err(err) => json!({ "contender": c.id(), "error": err }),
        })
        .collect();
    json!({
        "meta": {
            "command": m.command,
            "date": m.date,
            "nproc": m.nproc,
            "cpu_model": m.cpu_model,
            "kernel": m.kernel,
            "mem_total_gib": m.mem_total_gib,
            "default_congestion_control": m.congestion,
            "cpu_busy_source": m.cpu_source.describe(),
            "background_busy_cpus": m.background_busy_cpus,
            "loadavg_at_start": m.loadavg,
            "tools": m.tools.iter().map(|(p, v)| json!({"package": p, "version": v})).collect::<Vec<_>>(),
            "elapsed_s": m.elapsed_s,
        },
        "settings": {
            "quick": s.quick,
            "runs": s.runs,
            "secs": s.secs,
            "rate_per_stream": s.rate,
            "setup_clients": s.setup_clients,
            "setup_secs": s.setup_secs,
            "scale_tunnels": s.scale_tunnels,
        },
        "throughput": tput,
        "setup": setup,
        "scale": scale,
    })
}

/// The direct (no proxy) case of the same environment and kind.
fn direct_of<'a>(results: &'a Results, r: &TputResult) -> Option<&'a TputResult> {
    results.tput_of(r.case.env, r.case.kind, Contender::Direct)
}

fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

fn difference(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    Some(value? - base?)
}

/// A table for the terminal and for Markdown.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// A line under the table.
    pub note: Option<String>,
}

impl Table {
    pub fn to_text(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate().take(columns) {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i == 0 {
                    let _ = write!(text, "{cell}{}", " ".repeat(pad));
                } else {
                    let _ = write!(text, "  {}{cell}", " ".repeat(pad));
                }
            }
            text.trim_end().to_owned() + "\n"
        };
        let mut text = format!("{}\n", self.title);
        text += &line(&self.header);
        text += &format!(
            "{}\n",
            "-".repeat(widths.iter().sum::<usize>() + 2 * (columns - 1))
        );
        for row in &self.rows {
            text += &line(row);
        }
        if let Some(note) = &self.note {
            text += &format!("({note})\n");
        }
        text
    }

    pub fn to_markdown(&self) -> String {
        let mut text = format!("### {}\n\n", self.title);
        let _ = writeln!(text, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            text,
            "|{}",
            (0..self.header.len())
                .map(|i| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(text, "| {} |", cells.join(" | "));
        }
        if let Some(note) = &self.note {
            let _ = writeln!(text, "\n{note}");
        }
        text
    }
}

/// Contenders present among `results`, in the canonical order.
fn contenders_in(results: &[&TputResult]) -> Vec<Contender> {
    Contender::ALL
        .into_iter()
        .filter(|c| results.iter().any(|r| r.case.contender == *c))
        .collect()
}

fn short(text: &str, max: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= max {
        text
    } else {
        text.chars().take(max).collect::<String>() + "…"
    }
}

/// The cell of one throughput case: "20.3 (0.91×)".
fn tput_cell(results: &Results, r: &TputResult) -> String {
    if let Some(reason) = &r.start_failure {
        return format!("failed to start: {}", short(reason, 70));
    }
    let errors = r.errors();
    let Some(gbps) = r.median_gbps() else {
        return match errors.first() {
            Some(err) => format!("error: {}", short(err, 70)),
            None => "–".to_owned(),
        };
    };
    let mut cell = format!("{gbps:.1}");
    if r.case.contender != Contender::Direct {
        if let Some(ratio) = ratio(
            Some(gbps),
            direct_of(results, r).and_then(TputResult::median_gbps),
        ) {
            let _ = write!(cell, " ({ratio:.2}×)");
        }
    }
    if !errors.is_empty() {
        let _ = write!(cell, " [{}/{} runs failed]", errors.len(), r.samples.len());
    }
    cell
}

fn runs_phrase(settings: &Settings) -> String {
    if settings.runs == 1 {
        format!("1 run of {} s", settings.secs)
    } else {
        format!("median of {} runs of {} s", settings.runs, settings.secs)
    }
}

/// How much of the sockmap plane's traffic flow control copied in user space.
fn user_copy_note(rows: &[&TputResult]) -> Option<String> {
    let shares: Vec<f64> = rows
        .iter()
        .filter(|r| r.case.contender == Contender::Sockmap)
        .flat_map(|r| r.samples.iter().filter_map(|s| s.as_ref().ok()))
        .filter_map(|s| Some(s.user_copied_bytes? as f64 / s.bytes.max(1) as f64))
        .collect();
    let max = shares.iter().copied().fold(0.0f64, f64::max);
    let med = super::median(shares)?;
    Some(format!(
        "spliced sockmap: flow control's hand-over copied {:.0} % of the bytes through \
         user space (median of the runs above, up to {:.0} %); the kernel moved the rest.",
        med * 100.0,
        max * 100.0
    ))
}

/// Which planes `spliced auto` ran its tunnels on (iperf3's control and data
/// connections), so the table says what its number measured.
fn auto_note(rows: &[&TputResult]) -> Option<String> {
    let mut used: BTreeMap<&str, u64> = BTreeMap::new();
    for sample in rows
        .iter()
        .filter(|r| r.case.contender == Contender::Auto)
        .flat_map(|r| r.samples.iter().filter_map(|s| s.as_ref().ok()))
    {
        for (plane, count) in sample.planes_used.iter().flatten() {
            *used.entry(plane).or_default() += count;
        }
    }
    if used.is_empty() {
        return None;
    }
    let total: u64 = used.values().sum();
    let parts: Vec<String> = used
        .iter()
        .map(|(plane, count)| format!("{count} on {plane}"))
        .collect();
    Some(format!(
        "spliced auto ran its {total} tunnels (iperf3's control and data connections, \
         all runs) {}.",
        parts.join(", ")
    ))
}

fn join_notes<const N: usize>(notes: [Option<String>; N]) -> Option<String> {
    let notes: Vec<String> = notes.into_iter().flatten().collect();
    (!notes.is_empty()).then(|| notes.join(" "))
}

/// How much CPU other processes took during these runs, when notable.
fn background_note(rows: &[&TputResult]) -> Option<String> {
    let shares: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.samples.iter().filter_map(|s| s.as_ref().ok()))
        .filter(|s| s.wall_s > 0.0)
        .map(|s| s.others_cpu_s / s.wall_s)
        .collect();
    let max = shares.iter().copied().fold(0.0f64, f64::max);
    (max >= 0.05).then(|| {
        format!(
            "Other processes on the machine used {:.2} CPUs on average during these runs (up to \
             {max:.2}).",
            shares.iter().sum::<f64>() / shares.len() as f64
        )
    })
}

/// Every table of the report.
pub fn tables(results: &Results) -> Vec<Table> {
    let mut tables = Vec::new();
    let settings = &results.settings;
    for env in Env::ALL {
        let rows: Vec<&TputResult> = results
            .tput
            .iter()
            .filter(|r| r.case.env == env && r.case.kind.rate.is_none())
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut kinds: Vec<Kind> = Vec::new();
        for r in &rows {
            if !kinds.contains(&r.case.kind) {
                kinds.push(r.case.kind);
            }
        }
        let mut header = vec!["contender".to_owned()];
        header.extend(kinds.iter().map(Kind::label));
        let body = contenders_in(&rows)
            .into_iter()
            .map(|c| {
                let mut row = vec![c.label().to_owned()];
                for kind in &kinds {
                    row.push(
                        rows.iter()
                            .find(|r| r.case.contender == c && r.case.kind == *kind)
                            .map_or_else(|| "not run".to_owned(), |r| tput_cell(results, r)),
                    );
                }
                row
            })
            .collect();
        tables.push(Table {
            title: format!(
                "Throughput, {}: Gbit/s ({}), ratio to direct in parentheses",
                env.title(),
                runs_phrase(settings)
            ),
            header,
            rows: body,
            note: join_notes([
                user_copy_note(&rows),
                auto_note(&rows),
                background_note(&rows),
            ]),
        });
    }

    for env in Env::ALL {
        let cpu_rows: Vec<&TputResult> = results
            .tput
            .iter()
            .filter(|r| r.case.kind.rate.is_some() && r.case.env == env)
            .collect();
        if cpu_rows.is_empty() {
            continue;
        }
        let body = cpu_rows
            .iter()
            .map(|r| {
                let direct = direct_of(results, r);
                let mut row = vec![r.case.contender.label().to_owned(), r.case.kind.label()];
                if let Some(reason) = &r.start_failure {
                    row.push(format!("failed to start: {}", short(reason, 70)));
                    row.extend(std::iter::repeat_n(String::new(), 5));
                    return row;
                }
                if r.median_gbps().is_none() {
                    let err = r.errors().first().map_or("–".to_owned(), |e| short(e, 70));
                    row.push(format!("error: {err}"));
                    row.extend(std::iter::repeat_n(String::new(), 5));
                    return row;
                }
                row.push(fmt_opt(r.median_gbps(), 2));
                row.push(fmt_opt(r.median_busy_cpus(), 2));
                row.push(fmt_opt(r.median_cpu_per_gib(), 3));
                row.push(if r.case.contender == Contender::Direct {
                    "–".to_owned()
                } else {
                    difference(
                        r.median_cpu_per_gib(),
                        direct.and_then(TputResult::median_cpu_per_gib),
                    )
                    .map_or_else(|| "–".to_owned(), |d| format!("{d:+.3}"))
                });
                row.push(fmt_opt(r.median_others_cpus(), 2));
                row.push(fmt_opt(r.median_own_cpu_per_gib(), 3));
                row
            })
            .collect();
        tables.push(Table {
            title: format!(
                "CPU cost at a fixed rate ({}; whole machine incl. kernel, {}), {}",
                env.title(),
                if results.meta.cpu_source == cpu::Source::Cpuidle {
                    "from cpuidle residency"
                } else {
                    "from /proc/stat because cpuidle is absent"
                },
                runs_phrase(settings)
            ),
            header: [
                "contender",
                "iperf3",
                "Gbit/s",
                "busy CPUs",
                "CPU-s per GiB",
                "Δ to direct",
                "other processes, CPUs",
                "CPU-s per GiB without them",
            ]
            .map(str::to_owned)
            .to_vec(),
            rows: body,
            note: None,
        });
    }

    if !results.setup.is_empty() {
        let body = results
            .setup
            .iter()
            .map(|(c, r)| {
                let mut row = vec![c.label().to_owned()];
                match r {
                    Ok(r) => {
                        row.push(format!("{:.0}", r.per_sec));
                        row.push(fmt_ms(r.p50_ms));
                        row.push(fmt_ms(r.p99_ms));
                        row.push(match &r.first_error {
                            Some(err) => format!("{} ({})", r.errors, short(err, 60)),
                            None => r.errors.to_string(),
                        });
                    }
                    Err(err) => {
                        row.push(short(err, 80));
                        row.extend(["".to_owned(), "".to_owned(), "".to_owned()]);
                    }
                }
                row
            })
            .collect();
        tables.push(Table {
            title: format!(
                "Connection setup: {} concurrent clients for {:.0} s on loopback (direct: plain \
                 connect() latency)",
                settings.setup_clients, settings.setup_secs
            ),
            header: [
                "contender",
                "tunnels/s",
                "CONNECT→200 p50 ms",
                "p99 ms",
                "errors",
            ]
            .map(str::to_owned)
            .to_vec(),
            rows: body,
            note: None,
        });
    }

    if !results.scale.is_empty() {
        let direct = results
            .tput_of(Env::Unpinned, Kind::new(false, 1), Contender::Direct)
            .and_then(TputResult::median_gbps);
        let body = results
            .scale
            .iter()
            .map(|(c, r)| scale_row(*c, r, direct))
            .collect();
        tables.push(Table {
            title: format!(
                "Scale: {} idle tunnels open through spliced on loopback, plus one busy iperf3 \
                 tunnel (fwd P1, {} s)",
                match results.scale.iter().find_map(|(_, r)| r.as_ref().ok()) {
                    Some(r) if r.target < r.wanted => format!(
                        "{} ({} capped by the hard RLIMIT_NOFILE of {})",
                        r.target, r.wanted, r.nofile
                    ),
                    Some(r) => r.target.to_string(),
                    None => settings.scale_tunnels.to_string(),
                },
                settings.secs
            ),
            header: [
                "plane",
                "tunnels open",
                "opened in s",
                "RSS idle MiB",
                "RSS open MiB",
                "KiB/tunnel",
                "proxy fds",
                "busy tunnel Gbit/s",
            ]
            .map(str::to_owned)
            .to_vec(),
            rows: body,
            note: None,
        });
    }
    tables.extend(auto_check(results));
    tables
}

/// What `auto` picks on a local path when the endpoints use `congestion`
/// (proxy-userspace's `dataplane::auto::local_default`: sockmap under BBR,
/// splice otherwise).
fn auto_local_choice(congestion: &str) -> Contender {
    if congestion == "bbr" {
        Contender::Sockmap
    } else {
        Contender::Splice
    }
}

/// `auto`'s defaults against the fastest spliced plane of this run on each
/// kind of path (single-stream medians, forward and reverse averaged), so a
/// node's own bench says which flags to set. The local default follows the
/// endpoints' congestion control: the system default in the unpinned
/// loopback table, cubic in the `-C cubic` one (what a host whose default is
/// cubic gets).
fn auto_check(results: &Results) -> Option<Table> {
    let host = results.meta.congestion.as_str();
    let paths = [
        (
            Env::Unpinned,
            format!("both ends on this host (loopback), endpoints on {host}"),
            "--auto-local",
            auto_local_choice(host),
        ),
        (
            Env::Cubic,
            "both ends on this host (loopback), endpoints on cubic".to_owned(),
            "--auto-local",
            auto_local_choice("cubic"),
        ),
        (
            Env::Netns,
            "an end across the network (veth)".to_owned(),
            "--auto-network",
            Contender::Splice,
        ),
    ];
    let single = [Kind::new(false, 1), Kind::new(true, 1)];
    let mut rows = Vec::new();
    for (env, path, flag, default) in paths {
        let of = |plane: Contender| -> Option<[f64; 2]> {
            let mut medians = [0.0; 2];
            for (slot, kind) in medians.iter_mut().zip(single) {
                *slot = results.tput_of(env, kind, plane)?.median_gbps()?;
            }
            Some(medians)
        };
        let measured: Vec<(Contender, [f64; 2])> = Contender::PLANES
            .into_iter()
            .filter_map(|plane| Some((plane, of(plane)?)))
            .collect();
        let Some(&(best, _)) = measured
            .iter()
            .max_by(|a, b| (a.1[0] + a.1[1]).total_cmp(&(b.1[0] + b.1[1])))
        else {
            continue;
        };
        let each: Vec<String> = measured
            .iter()
            .map(|(plane, [fwd, rev])| format!("{} {fwd:.1}/{rev:.1}", plane.id()))
            .collect();
        rows.push(vec![
            path,
            default.id().to_owned(),
            each.join(", "),
            if best == default {
                "yes".to_owned()
            } else {
                format!("no: set {flag} {}", best.id())
            },
        ]);
    }
    (!rows.is_empty()).then(|| Table {
        title: "What `auto` picks, against this run (fastest spliced plane, fwd/-R P1 Gbit/s)"
            .to_owned(),
        header: [
            "path",
            "auto picks",
            "planes in this run",
            "default is the fastest",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        note: Some(
            "auto chooses per tunnel by its path (and, on a local path, the host's default \
             congestion control); where a row says no, the flag named there makes auto \
             follow this run (CPU per byte is in the tables above)."
                .to_owned(),
        ),
    })
}

fn scale_row(
    contender: Contender,
    result: &Result<ScaleResult, String>,
    direct: Option<f64>,
) -> Vec<String> {
    let mut row = vec![contender.label().to_owned()];
    match result {
        Err(err) => {
            row.push(short(err, 80));
            row.extend(std::iter::repeat_n(String::new(), 6));
        }
        Ok(r) => {
            let mut opened = format!("{}/{}", r.opened, r.target);
            if r.first_error.is_some() {
                let _ = write!(opened, " ({} errors, see below)", r.open_errors);
            }
            row.push(opened);
            row.push(format!("{:.1}", r.open_secs));
            let mib = |kib: Option<u64>| {
                kib.map_or("–".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
            };
            row.push(mib(r.rss_idle_kib));
            row.push(mib(r.rss_open_kib));
            row.push(match (r.rss_idle_kib, r.rss_open_kib) {
                (Some(idle), Some(open)) if r.opened > 0 => {
                    format!("{:.1}", open.saturating_sub(idle) as f64 / r.opened as f64)
                }
                _ => "–".to_owned(),
            });
            row.push(r.fds_open.map_or("–".to_owned(), |n| n.to_string()));
            row.push(match &r.busy {
                Ok(s) => match ratio(Some(s.gbps), direct) {
                    Some(ratio) => format!("{:.1} ({ratio:.2}× direct)", s.gbps),
                    None => format!("{:.1}", s.gbps),
                },
                Err(err) => format!("error: {}", short(err, 60)),
            });
        }
    }
    row
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn fmt_ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "–".to_owned()
    }
}

/// docs/benchmarks.md.
pub fn markdown(results: &Results, tables: &[Table]) -> String {
    let m = &results.meta;
    let s = &results.settings;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench` (xtask/src/bench.rs); do not edit by hand, rerun it. \
         Raw results of the run: `target/bench/results.json` (not committed).\n"
    );
    let _ = writeln!(md, "- command: `{}`", m.command);
    let _ = writeln!(md, "- date: {}", m.date);
    let _ = writeln!(
        md,
        "- settings: {}, {} s each; connection setup {} clients × {:.0} s; scale {} tunnels; \
         fixed rate {} per stream",
        if s.runs == 1 {
            "1 run per case".to_owned()
        } else {
            format!("{} runs per case (medians)", s.runs)
        },
        s.secs,
        s.setup_clients,
        s.setup_secs,
        s.scale_tunnels,
        s.rate
    );
    let _ = writeln!(md, "- total time of the benchmark: {:.0} s\n", m.elapsed_s);

    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| CPUs (nproc) | {} × {} |", m.nproc, m.cpu_model);
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.mem_total_gib);
    let _ = writeln!(
        md,
        "| default TCP congestion control | {} (spliced sets cubic on its own sockets; \
         iperf3, Squid and tinyproxy keep the default, except in the `iperf3 with -C cubic` \
         table) |",
        m.congestion
    );
    let tools: Vec<String> = m.tools.iter().map(|(p, v)| format!("{p} {v}")).collect();
    let _ = writeln!(md, "| tools | {} |", tools.join(", "));
    let _ = writeln!(
        md,
        "| background load at start | {:.2} busy CPUs (loadavg {}) |\n",
        m.background_busy_cpus, m.loadavg
    );
    let _ = writeln!(
        md,
        "This is a shared 2-vCPU VM on which other engineers compile at times: absolute numbers \
         move by tens of percent between runs. Compare ratios within one run (contenders are \
         interleaved run by run, so they see the same background), not absolutes across runs.\n"
    );
    let _ = writeln!(
        md,
        "![throughput and CPU per GiB per contender](benchmarks.svg)\n"
    );

    let _ = writeln!(md, "## Results\n");
    for table in tables {
        let _ = writeln!(md, "{}", table.to_markdown());
    }
    let notes = notes(results);
    if !notes.is_empty() {
        let _ = writeln!(md, "### Failures and warnings in this run\n");
        for note in notes {
            let _ = writeln!(md, "- {note}");
        }
        md.push('\n');
    }

    let _ = writeln!(md, "## How it is measured\n");
    let _ = writeln!(
        md,
        "- **Contenders**: *direct* is iperf3 with no proxy (the ceiling); *spliced* runs \
         `target/release/spliced --dataplane sockmap|splice|copy`; *Squid* is Debian's squid \
         run as `squid -N -f squid.conf` with a minimal configuration (CONNECT from the client \
         network to the benchmark's ports, `cache deny all`, `access_log none`); *tinyproxy* \
         runs as `tinyproxy -d -c tinyproxy.conf` (Port, Listen, Allow, ConnectPort, \
         MaxClients 1024). Each listens on a port of its own; no system service is touched. \
         While the sockmap instance runs, its sock_ops program (attached to its cgroup) also \
         sees the other contenders' sockets; it only asks for TCP state callbacks, which \
         return at once for sockets outside a tunnel."
    );
    let _ = writeln!(
        md,
        "- **Throughput**: an unmodified `iperf3 -c … -J` runs under `proxychains4` (strict_chain, \
         quiet_mode, `http PROXY PORT`), so its control connection and every data connection \
         is a CONNECT tunnel. Forward sends client → server, `-R` server → client; `P4` is \
         `-P 4`. The number is `end.sum_received.bits_per_second`. A one-off `iperf3 -s -1` is \
         started per run. All proxies of an environment run at once and the contenders take \
         turns run by run."
    );
    let _ = writeln!(
        md,
        "- **Placement** (loopback): *unpinned*; *same CPU*: `taskset -c 0` for the iperf3 \
         client, the proxy and the iperf3 server; *apart*: client and proxy on CPU 0, server on \
         CPU 1. The sockmap plane's redirected skbs are sent by a kernel worker on the CPU where \
         the verdict ran; when both endpoints and that worker share a CPU the splice is known \
         to collapse (see shared/notes/sockmap.md)."
    );
    let _ = writeln!(
        md,
        "- **Endpoints' congestion control**: iperf3 uses the system's default (BBR here) \
         except in the *iperf3 with `-C cubic`* table. On loopback BBR keeps a tiny congestion \
         window (its model sees a microsecond RTT) and holds a direct connection far below \
         what cubic reaches, so ratios to direct depend on it: read both tables."
    );
    let _ = writeln!(
        md,
        "- **Network namespaces**: client, proxy and server namespaces joined by two veth pairs \
         (10.77.1.0/24 and 10.77.2.0/24); the proxy runs in the middle namespace with `ip netns \
         exec`. For *direct* the middle namespace forwards IP, so the packets cross the same \
         two veth hops, routed instead of proxied. The namespaces are deleted on exit, error, \
         panic and ctrl-c."
    );
    let _ = writeln!(
        md,
        "- **CPU cost**: iperf3 at a fixed rate (`-b {}`), the whole machine's busy time — the \
         kernel's share included, which is where a sockmap splice does its work — divided by \
         the GiB received. busy = wall × CPUs − Σ idle residency, from {}. Background work on \
         the machine counts too; it is reported above. \"Δ to direct\" is the proxy's extra \
         CPU-seconds per GiB. \"Other processes\" is the CPU time that user processes outside \
         the benchmark's process tree used meanwhile (utime + stime from /proc/PID/stat, \
         scanned ten times a second; a process's last < 100 ms are missed, so it errs low); \
         the last column subtracts it, a correction for a shared machine.",
        s.rate,
        m.cpu_source.describe()
    );
    let _ = writeln!(
        md,
        "- **Connection setup**: {} client threads, each in a loop: connect to the proxy, \
         `CONNECT 127.0.0.1:PORT` to an echo server inside the benchmark, read the 200 (latency \
         measured from connect() to here), send 4 bytes, read them back, wait for the close the \
         echo server starts. Direct connects to the echo server itself.",
        s.setup_clients
    );
    let _ = writeln!(
        md,
        "- **Scale**: 32 threads open {} tunnels (fewer if the hard RLIMIT_NOFILE caps them) \
         through one spliced to a server inside the benchmark (a forked child) that accepts and \
         holds every connection; the proxy's VmRSS is read before and with them all open \
         (RLIMIT_NOFILE raised for the benchmark and the proxy), then one iperf3 tunnel runs \
         among them. Kernel memory (socket buffers, psocks) is not in RSS.",
        s.scale_tunnels
    );
    let _ = writeln!(
        md,
        "- `cargo xtask bench --quick` runs a reduced matrix (1 run of 3 s, 2,000 tunnels) in \
         under 2 minutes; `--filter SUBSTRING` (repeatable), `--runs N`, `--secs N` and \
         `--list` help speed work; `--filter` never rewrites this file. When anything fails, the \
         proxies' logs and configurations and the iperf3 outputs are kept in \
         `target/bench/logs/`."
    );
    md
}

/// True if anything failed to start or a measurement failed.
pub fn has_failures(results: &Results) -> bool {
    !notes(results).is_empty()
}

/// Start failures and errors worth listing under the tables.
fn notes(results: &Results) -> Vec<String> {
    let mut notes = Vec::new();
    let mut seen = Vec::new();
    for r in &results.tput {
        if let Some(reason) = &r.start_failure {
            let key = (r.case.env, r.case.contender);
            if !seen.contains(&key) {
                seen.push(key);
                notes.push(format!(
                    "{} in {}: failed to start: {reason}",
                    r.case.contender.label(),
                    r.case.env.id()
                ));
            }
        }
        for err in r.errors() {
            notes.push(format!("{}: {err}", r.case.id()));
        }
    }
    for (c, r) in &results.setup {
        match r {
            Err(err) => notes.push(format!("setup {}: {err}", c.id())),
            Ok(r) if r.errors > 0 => notes.push(format!(
                "setup {}: {} errors, first: {}",
                c.id(),
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            )),
            Ok(_) => {}
        }
    }
    for (c, r) in &results.scale {
        match r {
            Err(err) => notes.push(format!("scale {}: {err}", c.id())),
            Ok(r) => {
                if let Some(err) = &r.first_error {
                    let mut note = format!(
                        "scale {}: {} errors opening tunnels, first: {err}",
                        c.id(),
                        r.open_errors
                    );
                    if let Some(fds) = r.fds_open.filter(|&n| n as u64 + 16 >= r.nofile) {
                        let _ = write!(
                            note,
                            " — the proxy had {fds} fds open, at its RLIMIT_NOFILE of {} \
                             ({:.1} fds per open tunnel)",
                            r.nofile,
                            fds as f64 / r.opened.max(1) as f64
                        );
                    }
                    notes.push(note);
                }
                if let Err(err) = &r.busy {
                    notes.push(format!("scale {} busy tunnel: {err}", c.id()));
                }
            }
        }
    }
    notes
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One label of a bar chart and its bars: (series, value, text at the bar's end).
type ChartRow = (String, Vec<(usize, f64, String)>);

/// docs/benchmarks.svg: horizontal bars of loopback throughput (1 stream,
/// both directions) and of CPU-s per GiB at the fixed rate, per contender.
pub fn svg(results: &Results) -> String {
    const WIDTH: f64 = 820.0;
    const LABEL: f64 = 150.0;
    const BAR_MAX: f64 = 560.0;
    const BAR_H: f64 = 13.0;
    let find = |env, kind, c| results.tput_of(env, kind, c);
    let fwd = Kind::new(false, 1);
    let rev = Kind::new(true, 1);
    let rate_kind = Kind::at_rate(false, 1, results.settings.rate);

    let mut tput_rows: Vec<ChartRow> = Vec::new();
    for c in Contender::ALL {
        let mut bars = Vec::new();
        for (series, kind) in [(0, fwd), (1, rev)] {
            if let Some(r) = find(Env::Unpinned, kind, c) {
                bars.push(match (r.median_gbps(), &r.start_failure) {
                    (Some(g), _) => (series, g, format!("{g:.1}")),
                    (None, Some(_)) => (series, 0.0, "failed to start".to_owned()),
                    (None, None) => (series, 0.0, "error".to_owned()),
                });
            }
        }
        if !bars.is_empty() {
            tput_rows.push((c.label().to_owned(), bars));
        }
    }
    let mut cpu_rows: Vec<ChartRow> = Vec::new();
    for c in Contender::ALL {
        if let Some(r) = find(Env::Unpinned, rate_kind, c) {
            let bars = [(2, r.median_cpu_per_gib()), (3, r.median_own_cpu_per_gib())]
                .into_iter()
                .map(|(series, value)| match (value, &r.start_failure) {
                    (Some(v), _) => (series, v, format!("{v:.3}")),
                    (None, Some(_)) => (series, 0.0, "failed to start".to_owned()),
                    (None, None) => (series, 0.0, "error".to_owned()),
                })
                .collect();
            cpu_rows.push((c.label().to_owned(), bars));
        }
    }

    let colors = ["#3b7dd8", "#e07b39", "#5a9e4b", "#a9d39e"];
    let mut body = String::new();
    let mut y = 20.0;
    let mut panel = |title: &str, legend: &[(usize, &str)], rows: &[ChartRow], y: &mut f64| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-weight="bold">{}</text>"#,
            *y + 12.0,
            escape(title)
        );
        let mut lx = LABEL + 10.0;
        for (series, name) in legend {
            let _ = writeln!(
                body,
                r#"<rect x="{lx:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
                *y + 20.0,
                colors[*series],
                lx + 16.0,
                *y + 30.0,
                escape(name)
            );
            lx += 200.0;
        }
        *y += 44.0;
        let max = rows
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|b| b.1))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        for (label, bars) in rows {
            let row_h = bars.len() as f64 * (BAR_H + 2.0);
            let _ = writeln!(
                body,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                LABEL,
                *y + row_h / 2.0 + 4.0,
                escape(label)
            );
            for (i, (series, value, text)) in bars.iter().enumerate() {
                let by = *y + i as f64 * (BAR_H + 2.0);
                let w = (value / max * BAR_MAX).max(0.0);
                let _ = writeln!(
                    body,
                    r#"<rect x="{:.0}" y="{by:.0}" width="{w:.1}" height="{BAR_H}" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
                    LABEL + 10.0,
                    colors[*series],
                    LABEL + 14.0 + w,
                    by + BAR_H - 2.0,
                    escape(text)
                );
            }
            *y += row_h + 8.0;
        }
        *y += 16.0;
    };
    panel(
        "Throughput, loopback unpinned, 1 stream (Gbit/s, higher is better)",
        &[(0, "forward"), (1, "reverse (-R)")],
        &tput_rows,
        &mut y,
    );
    panel(
        &format!(
            "CPU-seconds per GiB at -b {}, kernel included (lower is better)",
            results.settings.rate
        ),
        &[
            (2, "whole machine"),
            (3, "without other processes' CPU time"),
        ],
        &cpu_rows,
        &mut y,
    );
    let _ = writeln!(
        body,
        r##"<text x="10" y="{:.0}" font-size="11" fill="#555">{} — {} × {}, kernel {} — {}</text>"##,
        y + 4.0,
        escape(&results.meta.command),
        results.meta.nproc,
        escape(&results.meta.cpu_model),
        escape(&results.meta.kernel),
        escape(&results.meta.date)
    );
    y += 14.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH:.0}\" height=\"{y:.0}\" \
         viewBox=\"0 0 {WIDTH:.0} {y:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::setup_rate::SetupResult;

    #[test]
    fn markdown_table_escapes_pipes() {
        let table = Table {
            title: "t".into(),
            header: vec!["a".into(), "b".into()],
            rows: vec![vec!["x|y".into(), "1".into()]],
            note: None,
        };
        let md = table.to_markdown();
        assert!(md.contains("x\\|y"));
        assert!(table.to_text().contains("x|y"));
    }

    fn sample(gbps: f64) -> Result<Sample, String> {
        Ok(Sample {
            gbps,
            bytes: 3 << 30,
            wall_s: 5.0,
            busy_cpu_s: 3.0,
            others_cpu_s: 1.0,
            user_copied_bytes: None,
            planes_used: None,
        })
    }

    #[test]
    fn auto_check_names_the_flag_where_another_plane_won() {
        let mut results = results();
        results.tput.clear();
        for (env, plane, gbps) in [
            (Env::Unpinned, Contender::Sockmap, 30.0),
            (Env::Unpinned, Contender::Splice, 20.0),
            (Env::Netns, Contender::Sockmap, 12.0),
            (Env::Netns, Contender::Splice, 9.0),
            (Env::Netns, Contender::Copy, 10.0),
        ] {
            for reverse in [false, true] {
                results.tput.push(TputResult {
                    case: crate::bench::Case {
                        env,
                        kind: Kind::new(reverse, 1),
                        contender: plane,
                    },
                    samples: vec![sample(gbps), sample(gbps)],
                    start_failure: None,
                });
            }
        }
        let table = auto_check(&results).expect("both paths measured");
        assert_eq!(table.rows[0][3], "yes");
        assert_eq!(table.rows[1][3], "no: set --auto-network sockmap");
        assert_eq!(
            table.rows[1][2],
            "sockmap 12.0/12.0, splice 9.0/9.0, copy 10.0/10.0"
        );
        results.tput.retain(|r| r.case.env == Env::Unpinned);
        assert_eq!(auto_check(&results).unwrap().rows.len(), 1);
    }

    fn results() -> Results {
        let settings = Settings {
            quick: false,
            runs: 2,
            secs: 5,
            setup_secs: 3.0,
            setup_clients: 64,
            scale_tunnels: 10_000,
            rate: "5G",
        };
        let case = |env, kind, contender| crate::bench::Case {
            env,
            kind,
            contender,
        };
        let fwd = Kind::new(false, 1);
        let cpu_kind = Kind::at_rate(false, 1, "5G");
        let tput = vec![
            TputResult {
                case: case(Env::Unpinned, fwd, Contender::Direct),
                samples: vec![sample(20.0), sample(22.0)],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, fwd, Contender::Sockmap),
                samples: vec![sample(10.0), Err("iperf3: boom".into())],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, fwd, Contender::Squid),
                samples: Vec::new(),
                start_failure: Some("exited (exit status: 1): FATAL: no".into()),
            },
            TputResult {
                case: case(Env::Unpinned, Kind::new(true, 4), Contender::Copy),
                samples: vec![sample(15.0)],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, cpu_kind, Contender::Direct),
                samples: vec![sample(5.0)],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, cpu_kind, Contender::Tinyproxy),
                samples: vec![Err("no JSON".into())],
                start_failure: None,
            },
        ];
        Results {
            meta: Meta {
                command: "cargo xtask bench".into(),
                date: "2026-11-26 12:00 UTC".into(),
                nproc: 2,
                cpu_model: "Test CPU <&>".into(),
                kernel: "6.18".into(),
                mem_total_gib: 23.5,
                congestion: "bbr".into(),
                cpu_source: cpu::Source::Cpuidle,
                background_busy_cpus: 0.1,
                loadavg: "0.1 0.2 0.3".into(),
                tools: vec![("iperf3".into(), "3.12".into())],
                elapsed_s: 1.0,
            },
            settings,
            tput,
            setup: vec![
                (
                    Contender::Direct,
                    Ok(SetupResult {
                        clients: 64,
                        secs: 3.0,
                        tunnels: 100,
                        per_sec: 33.3,
                        p50_ms: 0.1,
                        p99_ms: f64::NAN,
                        errors: 1,
                        first_error: Some("refused".into()),
                    }),
                ),
                (Contender::Squid, Err("failed to start: no".into())),
            ],
            scale: vec![
                (
                    Contender::Splice,
                    Ok(ScaleResult {
                        wanted: 10_000,
                        nofile: 20_000,
                        target: 9_936,
                        opened: 3_341,
                        open_secs: 9.4,
                        open_errors: 95,
                        first_error: Some("502".into()),
                        rss_idle_kib: Some(5_000),
                        rss_open_kib: Some(35_000),
                        fds_open: Some(19_999),
                        busy: Err("refused".into()),
                    }),
                ),
                (Contender::Copy, Err("failed to start: x".into())),
            ],
        }
    }

    #[test]
    fn every_table_row_fits_its_header_and_everything_renders() {
        let results = results();
        let tables = tables(&results);
        assert_eq!(tables.len(), 4, "throughput, CPU, setup, scale");
        for table in &tables {
            for row in &table.rows {
                assert_eq!(row.len(), table.header.len(), "{}: {row:?}", table.title);
            }
            table.to_text();
        }
        let tput = tables[0].to_text();
        assert!(tput.contains("10.0 (0.48×) [1/2 runs failed]"), "{tput}");
        assert!(tput.contains("failed to start: exited"), "{tput}");
        assert!(tput.contains("not run"), "{tput}");
        let md = markdown(&results, &tables);
        assert!(md.contains("RLIMIT_NOFILE of 20000"), "{md}");
        let svg = svg(&results);
        assert!(
            svg.starts_with("<svg") && svg.contains("&lt;&amp;&gt;"),
            "{svg}"
        );
        let json = to_json(&results);
        assert_eq!(json["throughput"][0]["median_gbps"], 21.0);
        assert_eq!(json["throughput"][1]["ratio_to_direct"], 10.0 / 21.0);
        assert!(json["setup"][0]["p99_ms"].is_null());
    }
}
