//! What the benchmark writes: terminal tables, the JSON of raw results,
//! docs/benchmarks.md and the hand-made SVG chart.

use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Duration};

use serde_json::{json, Value};

use super::{
    child::run_bounded,
    contenders::{Contender, DEFAULT_PROMOTE_AFTER},
    cpu, kmem,
    setup_rate::{SetupCase, SetupResult, Variant},
    stall::{StallResult, GOAL_P99_MS, WINDOW_AFTER, WINDOW_BEFORE},
    Env, Results, ScaleResult, Settings, TputResult,
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

pub(super) fn finite(value: f64) -> Value {
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
            "promotion": s.promotion.as_ref().map(|p| json!({
                "data_connections": p.data,
                "promoted": p.promoted,
                "other_tunnels_by_plane": p.others,
            })),
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
                "slowest_gbps": opt(r.slowest_gbps()),
                "slowest_ratio_to_direct": opt(ratio(r.slowest_gbps(), direct.and_then(TputResult::median_gbps))),
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
                "id": c.id(),
                "contender": c.contender.id(),
                "variant": c.variant.id(),
                "clients": r.clients,
                "secs": r.secs,
                "tunnels": r.tunnels,
                "per_sec": r.per_sec,
                "latency": if c.contender == Contender::Direct { "connect" } else { "connect_to_200" },
                "p50_ms": finite(r.p50_ms),
                "p99_ms": finite(r.p99_ms),
                "tunnel_p50_ms": finite(r.tunnel_p50_ms),
                "tunnel_p99_ms": finite(r.tunnel_p99_ms),
                "errors": r.errors,
                "first_error": r.first_error,
                "proxy_cpu_us_per_tunnel": r.proxy_cpu_per_tunnel_s.map(|s| s * 1e6),
                "load_cpu_us_per_tunnel": r.load_cpu_per_tunnel_s.map(|s| s * 1e6),
            }),
            Err(err) => json!({
                "id": c.id(),
                "contender": c.contender.id(),
                "variant": c.variant.id(),
                "error": err,
            }),
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
                "greeted": r.greeted,
                "promoted": r.promoted,
                "not_promoted": r.not_promoted,
                "promote_wait_s": r.promote_secs,
                "not_promoted_reasons": r.not_promoted_reasons.iter().cloned().collect::<BTreeMap<_, _>>(),
                "kernel_memory": {
                    "before": snapshot_json(&r.kmem_before),
                    "open": snapshot_json(&r.kmem_open),
                    "page_size": kmem::page_size(),
                    "per_tunnel": kmem_per_tunnel(r).map(|each| json!({
                        "tcp_sockets": each.tcp_sockets,
                        "tcp_mem_bytes": each.tcp_mem_bytes,
                        "slab_bytes": each.slab_bytes,
                        "slab_total_bytes": each.slab_total_bytes,
                    })),
                    "proxy_sockets": match &r.proxy_sockets {
                        Ok(b) => json!({
                            "sockets": b.sockets,
                            "receive_bytes": b.receive,
                            "send_bytes": b.send,
                            "forward_alloc_bytes": b.forward,
                            "other_bytes": b.other,
                            "holding_data": b.holding,
                        }),
                        Err(err) => json!({ "error": err }),
                    },
                },
                "busy": sample_json(&r.busy),
            }),
            Err(err) => json!({ "contender": c.id(), "error": err }),
        })
        .collect();
    let stall: Vec<Value> = results
        .stall
        .iter()
        .map(|(case, r)| {
            let mut entry = json!({
                "id": case.id(),
                "env": case.env.id(),
                "contender": case.contender.id(),
                "reverse": case.reverse,
            });
            let fields = match r {
                Ok(r) => json!({
                    "tunnels": r.tunnels,
                    "transfer_bytes": r.transfer_bytes,
                    "completed": r.completed,
                    "promoted_mid_transfer": r.promoted,
                    "window_bytes_before_cut": WINDOW_BEFORE,
                    "window_bytes_after_cut": WINDOW_AFTER,
                    "stall_p50_ms": opt(r.p50_ms()),
                    "stall_p99_ms": opt(r.p99_ms()),
                    "stall_max_ms": opt(r.max_ms()),
                    "over_goal": r.over(GOAL_P99_MS),
                    "stalls_ms": r.stalls_ms,
                    "stall_began_bytes_after_cut": r.stall_at,
                    "cut_offsets": r.cut_offsets,
                    "errors": r.errors,
                    "first_error": r.first_error,
                    "secs": r.secs,
                    "plane_stats_delta": r.plane_stats,
                }),
                Err(err) => json!({ "error": err }),
            };
            if let (Some(entry), Value::Object(fields)) = (entry.as_object_mut(), fields) {
                entry.extend(fields);
            }
            entry
        })
        .collect();
    let packet_cpu: Vec<Value> = packet_cpu_rows(results)
        .iter()
        .map(|row| {
            json!({
                "env": row.env.id(),
                "direct_cpu_s_per_gib": row.direct,
                "splice_extra_cpu_s_per_gib": row.splice_extra,
                "packet_extra_cpu_s_per_gib": row.packet_extra,
                "packet_extra_over_splice_extra": opt(row.ratio()),
                "own_splice_extra_cpu_s_per_gib": row.own_splice_extra,
                "own_packet_extra_cpu_s_per_gib": row.own_packet_extra,
                "own_packet_extra_over_splice_extra": opt(row.own_ratio()),
            })
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
            "stall_tunnels": s.stall_tunnels,
            "promote_after_default": DEFAULT_PROMOTE_AFTER,
        },
        "throughput": tput,
        "cpu_packet_against_splice": packet_cpu,
        "setup": setup,
        "http": super::http_report::to_json(&results.http),
        "scale": scale,
        "stall": stall,
    })
}

fn snapshot_json(snapshot: &kmem::Snapshot) -> Value {
    json!({
        "sockets_used": snapshot.sockets_used,
        "tcp_inuse": snapshot.tcp_inuse,
        "tcp_alloc": snapshot.tcp_alloc,
        "tcp_mem_pages": snapshot.tcp_mem_pages,
        "slab_bytes": snapshot.slab_bytes,
        "slab_total_kib": snapshot.slab_total_kib,
    })
}

fn kmem_per_tunnel(r: &ScaleResult) -> Option<kmem::PerTunnel> {
    kmem::PerTunnel::of(&r.kmem_before, &r.kmem_open, r.opened, kmem::page_size())
}

/// The extra CPU per GiB over direct of the packet plane and of splice, at
/// the fixed rate, in one environment.
struct PacketCpu {
    env: Env,
    direct: f64,
    splice_extra: f64,
    packet_extra: f64,
    own_splice_extra: Option<f64>,
    own_packet_extra: Option<f64>,
}

impl PacketCpu {
    /// packet's extra / splice's extra (`None` when splice cost nothing).
    fn ratio(&self) -> Option<f64> {
        ratio(Some(self.packet_extra), Some(self.splice_extra))
    }

    /// The same without other processes' CPU time.
    fn own_ratio(&self) -> Option<f64> {
        ratio(self.own_packet_extra, self.own_splice_extra)
    }
}

/// The goal: packet's extra CPU per GiB at most this share of splice's.
const PACKET_CPU_GOAL: f64 = 1.0 / 3.0;

fn packet_cpu_rows(results: &Results) -> Vec<PacketCpu> {
    let kind = Kind::at_rate(false, 1, results.settings.rate);
    Env::ALL
        .into_iter()
        .filter_map(|env| {
            let of = |c| results.tput_of(env, kind, c);
            let (direct, splice, packet) = (
                of(Contender::Direct)?,
                of(Contender::Splice)?,
                of(Contender::Packet)?,
            );
            let base = direct.median_cpu_per_gib()?;
            let own_base = direct.median_own_cpu_per_gib();
            Some(PacketCpu {
                env,
                direct: base,
                splice_extra: splice.median_cpu_per_gib()? - base,
                packet_extra: packet.median_cpu_per_gib()? - base,
                own_splice_extra: difference(splice.median_own_cpu_per_gib(), own_base),
                own_packet_extra: difference(packet.median_own_cpu_per_gib(), own_base),
            })
        })
        .collect()
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

type SetupResults = [(SetupCase, Result<SetupResult, String>)];

/// A setup case's tunnels/s, if it ran without errors.
fn setup_rate(setup: &SetupResults, contender: Contender, variant: Variant) -> Option<f64> {
    setup.iter().find_map(|(c, r)| {
        (c.contender == contender && c.variant == variant)
            .then(|| r.as_ref().ok().filter(|r| r.errors == 0).map(|r| r.per_sec))
            .flatten()
    })
}

/// spliced's default plane against Squid: by address (goal 2×), asking for
/// a name and with Basic credentials (goal: ahead).
fn setup_goal_note(setup: &SetupResults) -> Option<String> {
    let mut parts = Vec::new();
    for (variant, goal, what) in [
        (Variant::Ip, 2.0, "by address"),
        (Variant::Name, 1.0, "name target, resolver cache warm"),
        (Variant::BasicAuth, 1.0, "Basic auth, credentials cached"),
    ] {
        let (Some(spliced), Some(squid)) = (
            setup_rate(setup, Contender::Packet, variant),
            setup_rate(setup, Contender::Squid, variant),
        ) else {
            continue;
        };
        let ratio = spliced / squid;
        let verdict = match (goal > 1.0, ratio >= goal, ratio > goal) {
            (true, true, _) => format!("goal ≥ {goal:.0}×, met"),
            (true, false, _) => format!("goal ≥ {goal:.0}×, not met"),
            (false, _, true) => "goal: ahead, met".to_owned(),
            (false, _, false) => "goal: ahead, not met".to_owned(),
        };
        parts.push(format!("{what} {ratio:.2}× ({verdict})"));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "spliced packet (the default plane) against Squid in tunnels/s: {}.",
            parts.join("; ")
        )
    })
}

/// What a tunnel by address costs spliced's default plane, Squid and the
/// load generator in CPU, and the ratio of tunnels/s those costs allow on
/// `cpus` CPUs: Squid runs on one thread, so at most 1/its cost; spliced
/// shares every CPU with the load generator, so at most cpus/(both costs).
fn setup_cpu_note(setup: &SetupResults, cpus: u32) -> Option<String> {
    let costs = |wanted| {
        setup.iter().find_map(|(c, r)| {
            let r = r.as_ref().ok()?;
            (c.contender == wanted && c.variant == Variant::Ip)
                .then_some((r.proxy_cpu_per_tunnel_s?, r.load_cpu_per_tunnel_s?))
        })
    };
    let (spliced, load) = costs(Contender::Packet)?;
    let (squid, _) = costs(Contender::Squid)?;
    let us = |s: f64| s * 1e6;
    let bound = f64::from(cpus) * squid / (spliced + load);
    Some(format!(
        "CPU per tunnel by address: spliced packet {:.0} µs, Squid {:.0} µs ({:.2}× spliced's), the benchmark's clients and echo server {:.0} µs. Squid runs on one thread, so at most 1/{:.0} µs tunnels/s; spliced shares the {cpus} CPUs with the clients, so at most {cpus}/({:.0} + {:.0} µs): the best ratio these costs allow here is {bound:.2}×.",
        us(spliced),
        us(squid),
        squid / spliced,
        us(load),
        us(squid),
        us(spliced),
        us(load),
    ))
}

/// What a TLS name rule costs: `ssl_bump peek`'s tunnels/s against plain
/// splice's, when both ran.
fn peek_cost_note(setup: &SetupResults) -> Option<String> {
    let rate = |wanted| setup_rate(setup, wanted, Variant::Ip);
    let (splice, peek) = (rate(Contender::Splice)?, rate(Contender::SplicePeek)?);
    let cost = (1.0 - peek / splice) * 100.0;
    Some(format!(
        "A peek rule (`ssl_bump peek step1`, the ClientHello read and its SNI judged before splicing) costs {cost:.1} % of splice's tunnels/s in this run (goal: under 10 %{}).",
        if cost < 10.0 { ", met" } else { ", not met" }
    ))
}

/// Contenders present among `results`, in the canonical order.
fn contenders_in(results: &[&TputResult]) -> Vec<Contender> {
    Contender::ALL
        .into_iter()
        .filter(|c| results.iter().any(|r| r.case.contender == *c))
        .collect()
}

pub(super) fn short(text: &str, max: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= max {
        text
    } else {
        text.chars().take(max).collect::<String>() + "…"
    }
}

/// A run this much slower than its case's median marks the case as
/// bimodal: the cell lists every run.
const BIMODAL: f64 = 0.8;

/// Errors that say a packet contender's run measured the splice pump.
fn is_fallback(error: &str) -> bool {
    error.starts_with("FALLBACK")
}

/// The cell of one throughput case: "20.3 (0.91×, slowest 0.85×)": the
/// median, its ratio to direct's median and the slowest run's (for direct
/// itself, the slowest run against its median).
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
    let several = r.ok().count() > 1;
    let slowest = r.slowest_gbps().filter(|_| several);
    if r.case.contender == Contender::Direct {
        if let Some(slow) = ratio(slowest, Some(gbps)) {
            let _ = write!(cell, " (slowest {slow:.2}×)");
        }
    } else {
        let direct = direct_of(results, r).and_then(TputResult::median_gbps);
        match (ratio(Some(gbps), direct), ratio(slowest, direct)) {
            (Some(median), Some(slow)) => {
                let _ = write!(cell, " ({median:.2}×, slowest {slow:.2}×)");
            }
            (Some(median), None) => {
                let _ = write!(cell, " ({median:.2}×)");
            }
            _ => {}
        }
    }
    if slowest.is_some_and(|slow| slow < BIMODAL * gbps) {
        let runs: Vec<String> = r.ok().map(|s| format!("{:.1}", s.gbps)).collect();
        let _ = write!(cell, " ⚠ bimodal: runs {}", runs.join("/"));
    }
    let fallbacks = errors.iter().filter(|e| is_fallback(e)).count();
    if fallbacks > 0 {
        let _ = write!(
            cell,
            " [{fallbacks}/{} runs FELL BACK to splice, not counted]",
            r.samples.len()
        );
    }
    if errors.len() > fallbacks {
        let _ = write!(
            cell,
            " [{}/{} runs failed]",
            errors.len() - fallbacks,
            r.samples.len()
        );
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

/// Whether the packet contenders' data connections were promoted (each
/// run's access-log records), and where iperf3's control connections ran.
fn promotion_note(rows: &[&TputResult]) -> Option<String> {
    let mut parts = Vec::new();
    for contender in [Contender::Packet, Contender::PacketEager] {
        let mine: Vec<&&TputResult> = rows
            .iter()
            .filter(|r| r.case.contender == contender)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (mut data, mut promoted) = (0, 0);
        let mut others: BTreeMap<&str, u64> = BTreeMap::new();
        for check in mine
            .iter()
            .flat_map(|r| r.ok())
            .filter_map(|s| s.promotion.as_ref())
        {
            data += check.data;
            promoted += check.promoted;
            for (plane, count) in &check.others {
                *others.entry(plane).or_default() += count;
            }
        }
        let fallbacks = mine
            .iter()
            .flat_map(|r| r.errors())
            .filter(|e| is_fallback(e))
            .count();
        let mut part = format!(
            "{}: {promoted} of {data} data connections of the runs above were promoted",
            contender.label()
        );
        if fallbacks > 0 {
            let _ = write!(
                part,
                ", and {fallbacks} run(s) FELL BACK to the splice pump (not counted)"
            );
        }
        if !others.is_empty() {
            let planes: Vec<String> = others
                .iter()
                .map(|(plane, count)| format!("{count} on {plane}"))
                .collect();
            let _ = write!(
                part,
                "; iperf3's control connections ran {}",
                planes.join(", ")
            );
        }
        parts.push(part + ".");
    }
    (!parts.is_empty()).then(|| parts.join(" "))
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
                "Throughput, {}: Gbit/s ({}), ratio to direct in parentheses{}",
                env.title(),
                runs_phrase(settings),
                if settings.runs > 1 {
                    " (the median's, then the slowest run's)"
                } else {
                    ""
                }
            ),
            header,
            rows: body,
            note: join_notes([
                user_copy_note(&rows),
                auto_note(&rows),
                promotion_note(&rows),
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
    tables.extend(packet_cpu_table(results));

    if !results.setup.is_empty() {
        let body = results
            .setup
            .iter()
            .map(|(c, r)| {
                let mut row = vec![c.label()];
                match r {
                    Ok(r) => {
                        row.push(format!("{:.0}", r.per_sec));
                        row.push(fmt_ms(r.p50_ms));
                        row.push(fmt_ms(r.p99_ms));
                        row.push(fmt_ms(r.tunnel_p50_ms));
                        row.push(fmt_ms(r.tunnel_p99_ms));
                        row.push(
                            r.proxy_cpu_per_tunnel_s
                                .map_or_else(String::new, |s| format!("{:.0}", s * 1e6)),
                        );
                        row.push(match &r.first_error {
                            Some(err) => format!("{} ({})", r.errors, short(err, 60)),
                            None => r.errors.to_string(),
                        });
                    }
                    Err(err) => {
                        row.push(short(err, 80));
                        row.extend(std::iter::repeat_n(String::new(), 6));
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
                "whole tunnel p50 ms",
                "p99 ms",
                "proxy CPU µs/tunnel",
                "errors",
            ]
            .map(str::to_owned)
            .to_vec(),
            rows: body,
            note: join_notes([
                setup_goal_note(&results.setup),
                setup_cpu_note(&results.setup, results.meta.nproc),
                peek_cost_note(&results.setup),
            ]),
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
    tables.extend(super::http_report::table(&results.http, settings));
    tables.extend(kmem_table(results));
    tables.extend(stall_table(results));
    tables.extend(auto_check(results));
    tables
}

/// A short name of an environment's path, for the packet tables.
fn path_label(env: Env) -> &'static str {
    match env {
        Env::Unpinned => "loopback",
        Env::Cubic => "loopback, cubic endpoints",
        Env::SameCpu => "loopback, all on one CPU",
        Env::Apart => "loopback, CPUs apart",
        Env::Netns => "veth between namespaces",
    }
}

/// The packet plane's extra CPU per GiB over direct against splice's.
fn packet_cpu_table(results: &Results) -> Option<Table> {
    let rows: Vec<Vec<String>> = packet_cpu_rows(results)
        .iter()
        .map(|row| {
            let ratio_cell = |ratio: Option<f64>| {
                ratio.map_or("–".to_owned(), |ratio| {
                    format!(
                        "{ratio:.2} ({})",
                        if ratio <= PACKET_CPU_GOAL {
                            "goal met"
                        } else {
                            "goal missed"
                        }
                    )
                })
            };
            vec![
                path_label(row.env).to_owned(),
                format!("{:.3}", row.direct),
                format!("{:+.3}", row.splice_extra),
                format!("{:+.3}", row.packet_extra),
                ratio_cell(row.ratio()),
                ratio_cell(row.own_ratio()),
            ]
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        title: format!(
            "CPU per GiB at -b {}: the packet plane's extra over direct against splice's \
             (whole machine, {})",
            results.settings.rate,
            runs_phrase(&results.settings)
        ),
        header: [
            "path",
            "direct CPU-s/GiB",
            "splice extra",
            "packet extra",
            "packet / splice",
            "the same without other processes",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        note: Some(
            "Goal: the packet plane's extra CPU per GiB at most a third of splice's. The \
             extras are differences of medians of a few runs on a shared VM: a ratio of two \
             small differences moves a lot between runs."
                .to_owned(),
        ),
    })
}

/// Kernel memory of the scale test's idle tunnels, per tunnel.
fn kmem_table(results: &Results) -> Option<Table> {
    let scale: Vec<(Contender, &ScaleResult)> = results
        .scale
        .iter()
        .filter_map(|(c, r)| Some((*c, r.as_ref().ok()?)))
        .collect();
    let first = scale.first()?.1;
    let bytes = |value: f64| format!("{value:.0}");
    let rows = scale
        .iter()
        .map(|(c, r)| {
            let each = kmem_per_tunnel(r);
            let mut row = vec![
                c.label().to_owned(),
                match (r.promoted, r.not_promoted) {
                    (Some(yes), Some(no)) => {
                        let mut cell = format!("{yes}/{}", r.opened);
                        if no > 0 {
                            let reasons: Vec<String> = r
                                .not_promoted_reasons
                                .iter()
                                .map(|(reason, n)| {
                                    format!(
                                        "{} {n}",
                                        reason.trim_start_matches("packet_not_promoted_")
                                    )
                                })
                                .collect();
                            let _ = write!(cell, " ({no} refused: {})", reasons.join(", "));
                        }
                        cell
                    }
                    _ if c.promote_after() == Some(0) => "unknown (no stats)".to_owned(),
                    _ => "–".to_owned(),
                },
                format!("{}/{}", r.greeted, r.opened),
            ];
            match &each {
                Some(each) => {
                    row.push(format!("{:.2}", each.tcp_sockets));
                    row.push(bytes(each.tcp_mem_bytes));
                }
                None => row.extend(["–".to_owned(), "–".to_owned()]),
            }
            row.push(match &r.proxy_sockets {
                Ok(b) if r.opened > 0 => format!(
                    "{} ({} of {} sockets hold data)",
                    bytes(b.total() as f64 / r.opened as f64),
                    b.holding,
                    b.sockets
                ),
                Ok(_) => "–".to_owned(),
                Err(err) => format!("error: {}", short(err, 40)),
            });
            for (group, _) in kmem::SLAB_GROUPS {
                row.push(
                    each.as_ref()
                        .and_then(|each| each.slab_bytes.get(group))
                        .map_or("–".to_owned(), |&b| bytes(b)),
                );
            }
            row.push(
                each.and_then(|each| each.slab_total_bytes)
                    .map_or("–".to_owned(), bytes),
            );
            row
        })
        .collect();
    let mut header: Vec<String> = [
        "plane",
        "promoted",
        "greeting arrived",
        "TCP sockets",
        "TCP buffer pages, B",
        "proxy's socket buffers, B",
    ]
    .map(str::to_owned)
    .to_vec();
    header.extend(
        kmem::SLAB_GROUPS
            .iter()
            .map(|(group, _)| format!("slab {group}, B")),
    );
    header.push("Slab total, B".to_owned());
    Some(Table {
        title: format!(
            "Kernel memory per idle tunnel: {} tunnels on loopback (the upstream sent each one \
             byte), open minus before, divided by the tunnels",
            first.target
        ),
        header,
        rows,
        note: Some(
            "Machine-wide counters: each tunnel also has its client's and its upstream's \
             socket (4 TCP sockets in all), and the rest of the machine moves them too; compare \
             the rows. TCP buffer pages is /proc/net/sockstat's `TCP: mem` (charged in per-CPU \
             batches, exact to ~1 MiB per CPU); the proxy's socket buffers are its own sockets' \
             skmem (r + t + w + f + o + bl, from `ss -tm`); slab columns are active objects × \
             size from /proc/slabinfo. A promoted tunnel's sockets sit in repair mode: the goal \
             is that they hold no buffers."
                .to_owned(),
        ),
    })
}

/// The promotion stall of the packet plane against splice's gaps.
fn stall_table(results: &Results) -> Option<Table> {
    if results.stall.is_empty() {
        return None;
    }
    let rows = results
        .stall
        .iter()
        .map(|(case, r)| {
            let mut row = vec![
                path_label(case.env).to_owned(),
                if case.reverse { "-R" } else { "fwd" }.to_owned(),
                case.contender.label().to_owned(),
            ];
            match r {
                Err(err) => {
                    row.push(short(err, 80));
                    row.extend(std::iter::repeat_n(String::new(), 5));
                }
                Ok(r) => row.extend(stall_cells(case.contender, r)),
            }
            row
        })
        .collect();
    Some(Table {
        title: format!(
            "Promotion stall: the longest gap between the receiver's reads from {} MiB before \
             to {} MiB after the cut, over {} bulk tunnels of {} MiB, one at a time",
            WINDOW_BEFORE >> 20,
            WINDOW_AFTER >> 20,
            results.settings.stall_tunnels,
            results
                .stall
                .iter()
                .find_map(|(_, r)| r.as_ref().ok())
                .map_or(0, |r| r.transfer_bytes >> 20)
        ),
        header: [
            "path",
            "direction",
            "plane",
            "tunnels counted",
            "p50 ms",
            "p99 ms",
            "max ms",
            format!("over {GOAL_P99_MS:.0} ms").as_str(),
            "stall began (median, KiB after the cut)",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        note: Some(format!(
            "The cut is where the pump stopped (the access log's bytes_before_promotion); on \
             splice, which never cuts, the window is around the byte where promotion would \
             have happened ({} MiB). Goal: the packet plane's p99 at most {GOAL_P99_MS:.0} ms.",
            DEFAULT_PROMOTE_AFTER >> 20
        )),
    })
}

fn stall_cells(contender: Contender, r: &StallResult) -> Vec<String> {
    let mut counted = match r.promoted {
        Some(promoted) => format!("{promoted}/{} promoted mid-transfer", r.tunnels),
        None => format!("{}/{}", r.stalls_ms.len(), r.tunnels),
    };
    if r.errors > 0 {
        let _ = write!(
            counted,
            " ({} failed: {})",
            r.errors,
            short(r.first_error.as_deref().unwrap_or("?"), 50)
        );
    }
    let ms = |value: Option<f64>| value.map_or("–".to_owned(), |v| format!("{v:.1}"));
    let mut p99 = ms(r.p99_ms());
    if contender.promotes() {
        if let Some(value) = r.p99_ms() {
            p99 += if value <= GOAL_P99_MS {
                " (goal met)"
            } else {
                " (goal missed)"
            };
        }
    }
    let began: Vec<f64> = r.stall_at.iter().map(|&at| at as f64 / 1024.0).collect();
    vec![
        counted,
        ms(r.p50_ms()),
        p99,
        ms(r.max_ms()),
        r.over(GOAL_P99_MS).to_string(),
        if contender.promotes() {
            super::median(began).map_or("–".to_owned(), |kib| format!("{kib:+.0}"))
        } else {
            "–".to_owned()
        },
    ]
}

/// `auto`'s defaults against the fastest spliced plane of this run on each
/// kind of path (single-stream medians, forward and reverse averaged), so a
/// node's own bench says which flags to set. `auto` puts both kinds of path on
/// the packet plane (proxy-userspace's `dataplane::auto::DEFAULT_PLANE`),
/// whatever the endpoints' congestion control; both loopback tables are
/// checked because the winner there has depended on it before.
fn auto_check(results: &Results) -> Option<Table> {
    let host = results.meta.congestion.as_str();
    let paths = [
        (
            Env::Unpinned,
            format!("both ends on this host (loopback), endpoints on {host}"),
            "--auto-local",
        ),
        (
            Env::Cubic,
            "both ends on this host (loopback), endpoints on cubic".to_owned(),
            "--auto-local",
        ),
        (
            Env::Netns,
            "an end across the network (veth)".to_owned(),
            "--auto-network",
        ),
    ];
    let default = Contender::Packet;
    let single = [Kind::new(false, 1), Kind::new(true, 1)];
    let mut rows = Vec::new();
    for (env, path, flag) in paths {
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
        let Some(best) = measured
            .iter()
            .max_by(|a, b| (a.1[0] + a.1[1]).total_cmp(&(b.1[0] + b.1[1])))
            .map(|&(plane, _)| plane)
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
            "auto chooses per tunnel by its path; where a row says no, the flag named there \
             makes auto follow this run (CPU per byte is in the tables above)."
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
         promotion stall {} tunnels per case; fixed rate {} per stream",
        if s.runs == 1 {
            "1 run per case".to_owned()
        } else {
            format!("{} runs per case (medians)", s.runs)
        },
        s.secs,
        s.setup_clients,
        s.setup_secs,
        s.scale_tunnels,
        s.stall_tunnels,
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
         `target/release/spliced --dataplane sockmap|splice|copy|packet|auto`, the packet plane \
         twice: with its default `--promote-after` ({} MiB) and with `--promote-after 0` \
         (promoted right after the `200`); *Squid* is Debian's squid \
         run as `squid -N -f squid.conf` with a minimal configuration (CONNECT from the client \
         network to the benchmark's ports, `cache deny all`, `access_log none`); *tinyproxy* \
         runs as `tinyproxy -d -c tinyproxy.conf` (Port, Listen, Allow, ConnectPort, \
         MaxClients 1024). Each listens on a port of its own; no system service is touched. \
         While the sockmap instance runs, its sock_ops program (attached to its cgroup) also \
         sees the other contenders' sockets; it only asks for TCP state callbacks, which \
         return at once for sockets outside a tunnel. Likewise each packet instance's tc \
         programs (on `lo`, or on the proxy namespace's veths) see every packet of the other \
         contenders: one hash lookup each, passed on to the next program when it misses.",
        DEFAULT_PROMOTE_AFTER >> 20
    );
    let _ = writeln!(
        md,
        "- **Throughput**: an unmodified `iperf3 -c … -J` runs under `proxychains4` (strict_chain, \
         quiet_mode, `http PROXY PORT`), so its control connection and every data connection \
         is a CONNECT tunnel. Forward sends client → server, `-R` server → client; `P4` is \
         `-P 4`. The number is `end.sum_received.bits_per_second`. A one-off `iperf3 -s -1` is \
         started per run. All proxies of an environment run at once and the contenders take \
         turns run by run. With several runs a cell shows the median's ratio to direct's median \
         and the slowest run's; a case whose slowest run is under {:.0} % of its median is \
         marked bimodal and lists its runs. For the packet contenders, every run's data \
         connections (its `-P` largest tunnels in spliced's JSON access log) must have been \
         promoted (`\"dataplane\":\"packet\"`); a run where one stayed on the splice pump is \
         reported as a fallback, not counted. iperf3's control connection moves a few KiB and \
         stays on the pump under the default `--promote-after`.",
        BIMODAL * 100.0
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
         the last column subtracts it, a correction for a shared machine. The packet table \
         divides the packet plane's Δ by splice's, in each environment.",
        s.rate,
        m.cpu_source.describe()
    );
    let _ = writeln!(
        md,
        "- **Connection setup**: {} client threads, each in a loop: connect to the proxy, \
         `CONNECT 127.0.0.1:PORT` to an echo server inside the benchmark, read the 200 (latency \
         measured from connect() to here), send 4 bytes, read them back, wait for the close the \
         echo server starts (the whole tunnel's time ends here). Direct connects to the echo \
         server itself. `spliced splice, ssl_bump peek` runs splice with a squid.conf of Squid's \
         peek-and-splice lines (`ssl_bump peek step1`, `ssl_bump splice` on an \
         `ssl::server_name`), and its clients send an 83-byte TLS ClientHello naming that \
         server instead of the 4 bytes: the proxy answers 200, reads and judges the ClientHello, \
         then splices. *Proxy CPU µs/tunnel* is the user + system time of the proxy's \
         processes (helpers included) over the case, from /proc/PID/stat, divided by the \
         tunnels; on loopback a sender also pays for its segments' receive path, so it includes \
         kernel TCP work the proxy causes. The benchmark's own clients and echo server are \
         measured the same way (JSON `load_cpu_us_per_tunnel`), which gives the note's bound on \
         the ratio to Squid.",
        s.setup_clients
    );
    let _ = writeln!(
        md,
        "- **Plain HTTP**: {} client threads, each with one keep-alive connection (reopened \
         only when the proxy closes it), sending `GET http://127.0.0.1:PORT/SIZE HTTP/1.1` one \
         after another to an origin inside the benchmark (HTTP/1.1, `Content-Length`, a thread \
         per connection, keeps connections open) for a 1 KiB and a 1 MiB body; the latency runs \
         from the request written to the body's last byte read, and every body byte is checked \
         against the origin's pattern. The table counts the connections the clients opened \
         and the ones the origin accepted (a proxy that keeps upstream connections alive opens \
         about one per client). spliced serves plain HTTP in its control plane (hyper, its \
         own upstream pool), on no data plane; Squid runs with `cache deny all` (nothing \
         cached, like spliced); tinyproxy with its defaults.",
        s.http_clients
    );
    let _ = writeln!(
        md,
        "- **Scale**: 32 threads open {} tunnels (fewer if the hard RLIMIT_NOFILE caps them) \
         through one spliced to a server inside the benchmark (a forked child) that accepts and \
         holds every connection; the proxy's VmRSS is read before and with them all open \
         (RLIMIT_NOFILE raised for the benchmark and the proxy), then one iperf3 tunnel runs \
         among them. The server sends one byte on every connection as it accepts it, which \
         the client reads once all are open: every tunnel has carried data, and the packet \
         plane with `--promote-after 0` promotes each (the bench waits until its SIGUSR1 \
         stats count every tunnel promoted or refused). Kernel memory (socket buffers, \
         psocks) is not in RSS: /proc/net/sockstat, /proc/slabinfo, /proc/meminfo's Slab and \
         `ss -tm` for the proxy's own sockets are read before the tunnels open and with them \
         open.",
        s.scale_tunnels
    );
    let _ = writeln!(
        md,
        "- **Promotion stall**: {} tunnels per case, one at a time, each carrying {} MiB + 64 \
         MiB one way as fast as TCP goes (forward: the bench's client sends; `-R`: the bench's \
         upstream sends), through the packet plane (default `--promote-after`) and through \
         splice. The receiver timestamps every read; a tunnel's stall is its longest gap \
         between consecutive reads that brought bytes from {} MiB before to {} MiB after the \
         cut (the access log's `bytes_before_promotion`; on splice, the byte where promotion \
         would have happened). Only tunnels promoted before their last byte count for the \
         packet plane. Across veth the client and the upstream run in their namespaces.",
        s.stall_tunnels,
        DEFAULT_PROMOTE_AFTER >> 20,
        WINDOW_BEFORE >> 20,
        WINDOW_AFTER >> 20
    );
    let _ = writeln!(
        md,
        "- `cargo xtask bench --quick` runs a reduced matrix (1 run of 3 s, 2,000 tunnels, 20 \
         stall tunnels) in about 3 minutes; `--filter SUBSTRING` (repeatable), `--runs N`, `--secs N` and \
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
            Err(err) => notes.push(format!("{}: {err}", c.id())),
            Ok(r) if r.errors > 0 => notes.push(format!(
                "{}: {} errors, first: {}",
                c.id(),
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            )),
            Ok(_) => {}
        }
    }
    notes.extend(super::http_report::notes(&results.http));
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
                if r.promoted.is_some_and(|n| n < r.opened as u64) {
                    notes.push(format!(
                        "scale {}: {} of {} idle tunnels promoted ({} refused: {:?})",
                        c.id(),
                        r.promoted.unwrap_or(0),
                        r.opened,
                        r.not_promoted.unwrap_or(0),
                        r.not_promoted_reasons
                    ));
                }
                if r.greeted < r.opened {
                    notes.push(format!(
                        "scale {}: the upstream's byte reached {} of {} tunnels",
                        c.id(),
                        r.greeted,
                        r.opened
                    ));
                }
            }
        }
    }
    for (case, r) in &results.stall {
        match r {
            Err(err) => notes.push(format!("{}: {err}", case.id())),
            Ok(r) => {
                if let Some(err) = &r.first_error {
                    notes.push(format!(
                        "{}: {} transfers failed, first: {err}",
                        case.id(),
                        r.errors
                    ));
                }
                if let Some(promoted) = r.promoted.filter(|&n| n < r.completed) {
                    notes.push(format!(
                        "{}: {} of {} tunnels were not promoted before their last byte (not \
                         counted)",
                        case.id(),
                        r.completed - promoted,
                        r.completed
                    ));
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
    const WIDTH: f64 = 860.0;
    const LABEL: f64 = 210.0;
    const BAR_MAX: f64 = 540.0;
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
    use crate::bench::{
        http_rate::{HttpCase, HttpResult},
        iperf::PromotionCheck,
        setup_rate::SetupResult,
        stall::{StallCase, StallResult},
    };

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
            promotion: None,
        })
    }

    fn promoted(gbps: f64) -> Result<Sample, String> {
        let mut sample = sample(gbps)?;
        sample.promotion = Some(PromotionCheck {
            data: 1,
            promoted: 1,
            others: [("splice".to_owned(), 1)].into(),
        });
        Ok(sample)
    }

    #[test]
    fn auto_check_names_the_flag_where_another_plane_won() {
        let mut results = results();
        results.tput.clear();
        for (env, plane, gbps) in [
            (Env::Unpinned, Contender::Sockmap, 30.0),
            (Env::Unpinned, Contender::Packet, 33.0),
            (Env::Netns, Contender::Sockmap, 12.0),
            (Env::Netns, Contender::Splice, 9.0),
            (Env::Netns, Contender::Packet, 10.0),
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
        assert_eq!(table.rows[0][1], "packet");
        assert_eq!(table.rows[0][3], "yes");
        assert_eq!(table.rows[1][3], "no: set --auto-network sockmap");
        assert_eq!(
            table.rows[1][2],
            "sockmap 12.0/12.0, splice 9.0/9.0, packet 10.0/10.0"
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
            http_clients: 16,
            scale_tunnels: 10_000,
            stall_tunnels: 100,
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
            TputResult {
                case: case(Env::Unpinned, fwd, Contender::Packet),
                samples: vec![
                    promoted(21.0),
                    promoted(10.0),
                    promoted(22.0),
                    Err("FALLBACK: 1 of 1 data connection(s) not promoted".into()),
                ],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, cpu_kind, Contender::Splice),
                samples: vec![Ok(Sample {
                    busy_cpu_s: 6.0,
                    ..sample(5.0).unwrap()
                })],
                start_failure: None,
            },
            TputResult {
                case: case(Env::Unpinned, cpu_kind, Contender::Packet),
                samples: vec![Ok(Sample {
                    busy_cpu_s: 4.0,
                    ..sample(5.0).unwrap()
                })],
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
                    SetupCase {
                        contender: Contender::Direct,
                        variant: Variant::Ip,
                    },
                    Ok(SetupResult {
                        clients: 64,
                        secs: 3.0,
                        tunnels: 100,
                        per_sec: 33.3,
                        p50_ms: 0.1,
                        p99_ms: f64::NAN,
                        tunnel_p50_ms: 0.2,
                        tunnel_p99_ms: 0.5,
                        errors: 1,
                        first_error: Some("refused".into()),
                        proxy_cpu_per_tunnel_s: None,
                        load_cpu_per_tunnel_s: None,
                    }),
                ),
                (
                    SetupCase {
                        contender: Contender::Squid,
                        variant: Variant::Ip,
                    },
                    Err("failed to start: no".into()),
                ),
            ]
            .into_iter()
            .chain(
                [
                    (Contender::Packet, Variant::Ip, 5000.0),
                    (Contender::Squid, Variant::Name, 2000.0),
                    (Contender::Packet, Variant::Name, 4500.0),
                    (Contender::Squid, Variant::BasicAuth, 2500.0),
                    (Contender::Packet, Variant::BasicAuth, 2400.0),
                ]
                .map(|(contender, variant, per_sec)| {
                    (
                        SetupCase { contender, variant },
                        Ok(SetupResult {
                            clients: 64,
                            secs: 3.0,
                            tunnels: 100,
                            per_sec,
                            p50_ms: 1.0,
                            p99_ms: 2.0,
                            tunnel_p50_ms: 2.0,
                            tunnel_p99_ms: 3.0,
                            errors: 0,
                            first_error: None,
                            proxy_cpu_per_tunnel_s: Some(150e-6),
                            load_cpu_per_tunnel_s: Some(100e-6),
                        }),
                    )
                }),
            )
            .collect(),
            http: [
                (Contender::Splice, 3000.0),
                (Contender::Squid, 1500.0),
                (Contender::Tinyproxy, 2000.0),
            ]
            .into_iter()
            .map(|(contender, per_sec)| {
                (
                    HttpCase {
                        contender,
                        body: 1024,
                    },
                    Ok(HttpResult {
                        clients: 16,
                        body: 1024,
                        secs: 3.0,
                        requests: (per_sec * 3.0) as u64,
                        per_sec,
                        p50_ms: 0.5,
                        p99_ms: 2.0,
                        client_connections: 16,
                        origin_connections: 16,
                        errors: 0,
                        first_error: None,
                    }),
                )
            })
            .chain([(
                HttpCase {
                    contender: Contender::Tinyproxy,
                    body: 1 << 20,
                },
                Err("failed to start: gone".into()),
            )])
            .collect(),
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
                        greeted: 3_341,
                        promoted: None,
                        not_promoted: None,
                        promote_secs: None,
                        not_promoted_reasons: Vec::new(),
                        kmem_before: kmem::Snapshot::default(),
                        kmem_open: kmem::Snapshot {
                            tcp_alloc: 4 * 3_341,
                            ..kmem::Snapshot::default()
                        },
                        proxy_sockets: Err("ss: not found".into()),
                        busy: Err("refused".into()),
                    }),
                ),
                (
                    Contender::PacketEager,
                    Ok(ScaleResult {
                        wanted: 100,
                        nofile: 20_000,
                        target: 100,
                        opened: 100,
                        open_secs: 0.1,
                        open_errors: 0,
                        first_error: None,
                        rss_idle_kib: Some(5_000),
                        rss_open_kib: Some(6_000),
                        fds_open: Some(210),
                        greeted: 100,
                        promoted: Some(98),
                        not_promoted: Some(2),
                        promote_secs: Some(1.5),
                        not_promoted_reasons: vec![("packet_not_promoted_hold_timeout".into(), 2)],
                        kmem_before: kmem::Snapshot::default(),
                        kmem_open: kmem::Snapshot {
                            tcp_mem_pages: 25,
                            ..kmem::Snapshot::default()
                        },
                        proxy_sockets: Ok(kmem::SocketBuffers {
                            sockets: 200,
                            forward: 409_600,
                            holding: 0,
                            ..kmem::SocketBuffers::default()
                        }),
                        busy: promoted(20.0),
                    }),
                ),
                (Contender::Copy, Err("failed to start: x".into())),
            ],
            stall: vec![
                (
                    StallCase {
                        env: Env::Unpinned,
                        contender: Contender::Packet,
                        reverse: false,
                    },
                    Ok(StallResult {
                        tunnels: 3,
                        transfer_bytes: 65 << 20,
                        completed: 3,
                        promoted: Some(2),
                        cut_offsets: vec![1 << 20, 2 << 20],
                        stalls_ms: vec![210.0, 3.0],
                        stall_at: vec![-4096, 0],
                        errors: 0,
                        first_error: None,
                        secs: 1.0,
                        plane_stats: [("packet_held".to_owned(), 40)].into(),
                    }),
                ),
                (
                    StallCase {
                        env: Env::Netns,
                        contender: Contender::Splice,
                        reverse: true,
                    },
                    Err("skipped: network namespaces need root".into()),
                ),
            ],
        }
    }

    #[test]
    fn every_table_row_fits_its_header_and_everything_renders() {
        let results = results();
        let tables = tables(&results);
        let titles: Vec<&str> = tables.iter().map(|t| t.title.as_str()).collect();
        assert_eq!(tables.len(), 8, "{titles:#?}");
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
        // The packet row: median 21 of 21, slowest 10: bimodal; one fallback.
        assert!(
            tput.contains(
                "21.0 (1.00×, slowest 0.48×) ⚠ bimodal: runs 21.0/10.0/22.0 [1/4 runs FELL \
                 BACK to splice, not counted]"
            ),
            "{tput}"
        );
        assert!(tput.contains("21.0 (slowest 0.95×)"), "{tput}");
        assert!(
            tput.contains(
                "3 of 3 data connections of the runs above were promoted, and 1 run(s) FELL BACK"
            ),
            "{tput}"
        );
        let cpu = tables
            .iter()
            .find(|t| t.title.contains("against splice's"))
            .unwrap();
        // direct 0.6 CPU-s/GiB, splice 1.2, packet 0.8: extras 0.6 and 0.2.
        assert_eq!(cpu.rows[0][4], "0.33 (goal met)");
        let kmem = tables
            .iter()
            .find(|t| t.title.starts_with("Kernel memory"))
            .unwrap();
        assert_eq!(kmem.rows[0][3], "4.00");
        assert_eq!(kmem.rows[1][1], "98/100 (2 refused: hold_timeout 2)");
        assert_eq!(kmem.rows[1][4], "1024");
        assert_eq!(kmem.rows[1][5], "4096 (0 of 200 sockets hold data)");
        let stall = tables
            .iter()
            .find(|t| t.title.starts_with("Promotion stall"))
            .unwrap();
        assert_eq!(stall.rows[0][3], "2/3 promoted mid-transfer");
        assert_eq!(stall.rows[0][5], "210.0 (goal missed)");
        assert_eq!(stall.rows[0][7], "1");
        assert_eq!(stall.rows[0][8], "-2");
        assert!(stall.rows[1][3].starts_with("skipped"));
        let setup = tables
            .iter()
            .find(|t| t.title.starts_with("Connection setup"))
            .unwrap();
        assert_eq!(setup.rows[4][0], "spliced packet, name target");
        let note = setup.note.as_deref().unwrap();
        assert!(
            note.contains(
                "name target, resolver cache warm 2.25× (goal: ahead, met); Basic auth, \
                 credentials cached 0.96× (goal: ahead, not met)."
            ),
            "{note}"
        );
        assert!(!note.contains("by address"), "Squid failed: {note}");
        let http = tables
            .iter()
            .find(|t| t.title.starts_with("Plain HTTP"))
            .unwrap();
        assert_eq!(http.rows[0][..4], ["spliced", "1k", "3000", "3"]);
        let note = http.note.as_deref().unwrap();
        assert!(
            note.contains("1k: 2.00× Squid, 1.50× tinyproxy (goal: ahead of both, met)"),
            "{note}"
        );
        let md = markdown(&results, &tables);
        assert!(
            md.contains("http/loopback/tinyproxy/1m: failed to start: gone"),
            "{md}"
        );
        assert!(md.contains("RLIMIT_NOFILE of 20000"), "{md}");
        assert!(
            md.contains("stall/loopback-unpinned/packet/fwd: 1 of 3 tunnels were not promoted"),
            "{md}"
        );
        assert!(
            md.contains("scale packet-0: 98 of 100 idle tunnels promoted"),
            "{md}"
        );
        let svg = svg(&results);
        assert!(
            svg.starts_with("<svg") && svg.contains("&lt;&amp;&gt;"),
            "{svg}"
        );
        let json = to_json(&results);
        assert_eq!(json["throughput"][0]["median_gbps"], 21.0);
        assert_eq!(json["throughput"][1]["ratio_to_direct"], 10.0 / 21.0);
        assert_eq!(
            json["throughput"][6]["slowest_ratio_to_direct"],
            10.0 / 21.0
        );
        assert_eq!(json["throughput"][6]["runs"][0]["promotion"]["promoted"], 1);
        assert!(json["setup"][0]["p99_ms"].is_null());
        assert_eq!(json["http"][1]["per_sec"], 1500.0);
        assert_eq!(json["http"][3]["error"], "failed to start: gone");
        assert_eq!(
            json["scale"][1]["kernel_memory"]["per_tunnel"]["tcp_mem_bytes"],
            25.0 * kmem::page_size() as f64 / 100.0
        );
        assert_eq!(json["stall"][0]["stall_p99_ms"], 210.0);
        assert_eq!(
            json["stall"][1]["error"],
            "skipped: network namespaces need root"
        );
        let cpu = &json["cpu_packet_against_splice"][0];
        assert!((cpu["packet_extra_over_splice_extra"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    }
}
