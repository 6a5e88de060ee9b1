//! `cargo xtask bench`: spliced's data planes against no proxy, Squid and
//! tinyproxy, measured with unmodified tools.
//!
//! - Throughput: `iperf3` through the proxy via `proxychains4` (forward and
//!   `-R`, 1 and 4 streams), on loopback with three CPU placements and across
//!   three network namespaces joined by veth pairs.
//! - CPU cost: whole-machine busy time (kernel included, from cpuidle
//!   residency) per GiB at a fixed rate.
//! - Connection setup: tunnels per second and CONNECT→200 latency with many
//!   concurrent clients.
//! - Plain HTTP: keep-alive `GET http://…` requests per second and latency
//!   through spliced, Squid and tinyproxy, for a 1 KiB and a 1 MiB body.
//! - Scale: spliced's RSS and the kernel's memory with thousands of idle
//!   tunnels open (promoted ones on the packet plane), and the throughput of
//!   one busy tunnel among them.
//! - Promotion stall: the longest pause in a bulk transfer while the packet
//!   plane promotes its tunnel, against the same transfer on splice.
//!
//! Every child process, namespace and temporary file is owned by a guard, so
//! an error, a panic or ctrl-c leaves nothing behind. Results go to a JSON
//! file, a terminal table, and docs/benchmarks.md with docs/benchmarks.svg.

mod child;
mod contenders;
mod cpu;
mod http_rate;
mod http_report;
mod iperf;
mod kmem;
mod netns;
mod report;
mod resolver;
mod scale;
mod setup_rate;
mod stall;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    child::{check_interrupt, Ports, TempDir},
    contenders::{Contender, Launch, Policy, Proxy},
    http_rate::{HttpCase, HttpResult, Origin},
    iperf::{Ends, Kind, PromotionCheck, Sample},
    netns::Topology,
    setup_rate::{EchoServer, SetupCase, SetupResult, Variant},
    stall::{StallCase, StallResult, StallServer},
};

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Short run (about 3 minutes): fewer cases, 1 run of 3 s each, 2,000
    /// tunnels in the scale test, 20 in the stall test. The full run takes
    /// about 20 minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the raw results [default: target/bench/results.json].
    #[arg(long, value_name = "FILE.json")]
    out: Option<PathBuf>,
    /// Run only the cases whose id contains SUBSTRING (repeatable: any of
    /// them). Ids look like `tput/loopback-unpinned/sockmap/rev/P1`,
    /// `cpu/loopback-unpinned/copy/fwd/P1/5G`, `setup/loopback/squid`,
    /// `scale/loopback/packet-0` (with kernel memory),
    /// `stall/netns/packet/rev`; `--list` prints them. docs/ is not
    /// rewritten.
    #[arg(long, value_name = "SUBSTRING")]
    filter: Vec<String>,
    /// iperf3 runs per case (the tables show medians).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: Option<u32>,
    /// Seconds per iperf3 run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=60))]
    secs: Option<u32>,
    /// Do not rewrite docs/benchmarks.md and docs/benchmarks.svg.
    #[arg(long)]
    no_docs: bool,
    /// Print the case ids that would run, then exit.
    #[arg(long)]
    list: bool,
}

/// Where a throughput case runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Env {
    /// Loopback, no pinning.
    Unpinned,
    /// Loopback, no pinning, iperf3's sockets on cubic instead of the system's
    /// default congestion control (BBR here, which holds a direct loopback
    /// connection to a fraction of what cubic reaches).
    Cubic,
    /// Loopback; iperf3 client, proxy and iperf3 server all on CPU 0.
    SameCpu,
    /// Loopback; iperf3 client and proxy on CPU 0, iperf3 server on CPU 1.
    Apart,
    /// client | proxy | server namespaces joined by veth pairs, no pinning.
    Netns,
}

impl Env {
    pub const ALL: [Self; 5] = [
        Self::Unpinned,
        Self::Cubic,
        Self::SameCpu,
        Self::Apart,
        Self::Netns,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Self::Unpinned => "loopback-unpinned",
            Self::Cubic => "loopback-cubic",
            Self::SameCpu => "loopback-pinned-same",
            Self::Apart => "loopback-pinned-apart",
            Self::Netns => "netns",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Unpinned => "loopback, unpinned",
            Self::Cubic => "loopback, unpinned, iperf3 with `-C cubic`",
            Self::SameCpu => "loopback, iperf3 client + proxy + iperf3 server all on CPU 0",
            Self::Apart => "loopback, iperf3 client + proxy on CPU 0, iperf3 server on CPU 1",
            Self::Netns => "client | proxy | server network namespaces joined by veth, unpinned",
        }
    }

    /// CPUs of (iperf3 client, proxy, iperf3 server).
    fn cpus(self) -> (Option<u32>, Option<u32>, Option<u32>) {
        match self {
            Self::Unpinned | Self::Cubic | Self::Netns => (None, None, None),
            Self::SameCpu => (Some(0), Some(0), Some(0)),
            Self::Apart => (Some(0), Some(0), Some(1)),
        }
    }

    /// Congestion control iperf3 asks for on its sockets (`-C`), if not the
    /// system's default.
    fn congestion(self) -> Option<&'static str> {
        (self == Self::Cubic).then_some("cubic")
    }
}

/// Parameters of one benchmark run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub runs: u32,
    pub secs: u32,
    pub setup_secs: f64,
    pub setup_clients: usize,
    /// Keep-alive clients of the plain-HTTP cases.
    pub http_clients: usize,
    pub scale_tunnels: usize,
    /// Transfers per promotion-stall case.
    pub stall_tunnels: usize,
    pub rate: &'static str,
}

/// The fixed rate of the CPU-cost cases (per stream).
const RATE: &str = "5G";

/// One throughput (or CPU-cost) case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub env: Env,
    pub kind: Kind,
    pub contender: Contender,
}

impl Case {
    pub fn id(&self) -> String {
        let section = if self.kind.rate.is_some() {
            "cpu"
        } else {
            "tput"
        };
        format!(
            "{section}/{}/{}/{}",
            self.env.id(),
            self.contender.id(),
            self.kind.id()
        )
    }
}

/// What runs: kinds × contenders per environment. Contenders are interleaved
/// run by run, so background noise spreads evenly over them.
fn matrix(quick: bool) -> Vec<(Env, Vec<Kind>, Vec<Contender>)> {
    use Contender::{Auto, Copy, Direct, Packet, PacketEager, Sockmap, Splice, SplicePeek};
    // `auto` runs where its choice differs from plain sockmap: across veth.
    // A peek rule only costs at connection setup.
    let all: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|&c| c != Auto && c != SplicePeek)
        .collect();
    let with_auto: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|&c| c != SplicePeek)
        .collect();
    // At a fixed rate the promotion point does not matter: one packet contender.
    let cpu_all: Vec<Contender> = all.iter().copied().filter(|&c| c != PacketEager).collect();
    let (fwd, rev) = (Kind::new(false, 1), Kind::new(true, 1));
    let cpu = Kind::at_rate(false, 1, RATE);
    if quick {
        vec![
            (Env::Unpinned, vec![fwd, rev], all),
            (Env::Unpinned, vec![cpu], cpu_all),
            (Env::SameCpu, vec![rev], vec![Direct, Sockmap]),
            (Env::Netns, vec![fwd], vec![Direct, Sockmap, Packet, Auto]),
        ]
    } else {
        // 68 cases × 3 runs × 5 s: about 18 minutes with setup and scale,
        // 20 with the stall cases (about a minute).
        let p4 = Kind::new(false, 4);
        vec![
            (Env::Unpinned, vec![fwd, rev], all.clone()),
            (Env::Unpinned, vec![p4], vec![Direct, Sockmap, Copy, Packet]),
            (Env::Unpinned, vec![cpu], cpu_all),
            (
                Env::Cubic,
                vec![fwd, rev],
                vec![Direct, Sockmap, Splice, Copy, Packet],
            ),
            (Env::SameCpu, vec![rev], vec![Direct, Sockmap, Copy, Packet]),
            (Env::Apart, vec![rev], vec![Direct, Sockmap, Copy, Packet]),
            (Env::Netns, vec![fwd, rev], with_auto),
            (
                Env::Netns,
                vec![cpu],
                vec![Direct, Sockmap, Splice, Copy, Packet],
            ),
        ]
    }
}

/// The promotion-stall cases: the packet plane and splice (the same
/// transfers without a cut), on loopback and across veth, both directions.
fn stall_matrix(quick: bool) -> Vec<StallCase> {
    let envs: &[Env] = if quick {
        &[Env::Unpinned]
    } else {
        &[Env::Unpinned, Env::Netns]
    };
    let directions: &[bool] = if quick { &[false] } else { &[false, true] };
    let mut cases = Vec::new();
    for &env in envs {
        for &reverse in directions {
            for contender in [Contender::Splice, Contender::Packet] {
                cases.push(StallCase {
                    env,
                    contender,
                    reverse,
                });
            }
        }
    }
    cases
}

/// The selected work.
struct Plan {
    cases: Vec<Case>,
    setup: Vec<SetupCase>,
    http: Vec<HttpCase>,
    scale: Vec<Contender>,
    stall: Vec<StallCase>,
}

/// Every connection-setup case: each contender asking for an address, then
/// spliced's default plane and Squid asking for a name and with credentials.
fn setup_cases() -> Vec<SetupCase> {
    let by_address = Contender::ALL
        .into_iter()
        .filter(|&c| c != Contender::Auto)
        .map(|contender| SetupCase {
            contender,
            variant: Variant::Ip,
        });
    let others = [Variant::Name, Variant::BasicAuth]
        .into_iter()
        .flat_map(|variant| {
            [Contender::Packet, Contender::Squid]
                .into_iter()
                .map(move |contender| SetupCase { contender, variant })
        });
    by_address.chain(others).collect()
}

fn scale_id(contender: Contender) -> String {
    format!("scale/loopback/{}", contender.id())
}

fn plan(quick: bool, filters: &[String]) -> Plan {
    let keep = |id: &str| filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()));
    let mut cases = Vec::new();
    for (env, kinds, contenders) in matrix(quick) {
        if env == Env::Apart && cpu::online_cpus() < 2 {
            continue;
        }
        for kind in kinds {
            for &contender in &contenders {
                let case = Case {
                    env,
                    kind,
                    contender,
                };
                if keep(&case.id()) {
                    cases.push(case);
                }
            }
        }
    }
    Plan {
        cases,
        setup: setup_cases()
            .into_iter()
            .filter(|case| keep(&case.id()))
            .collect(),
        http: HttpCase::all()
            .into_iter()
            .filter(|case| keep(&case.id()))
            .collect(),
        scale: Contender::PLANES
            .into_iter()
            .chain([Contender::PacketEager])
            .filter(|c| keep(&scale_id(*c)))
            .collect(),
        stall: stall_matrix(quick)
            .into_iter()
            .filter(|case| keep(&case.id()))
            .collect(),
    }
}

/// The measurements of one throughput case.
#[derive(Clone, Debug)]
pub struct TputResult {
    pub case: Case,
    pub samples: Vec<Result<Sample, String>>,
    pub start_failure: Option<String>,
}

impl TputResult {
    fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter_map(|s| s.as_ref().ok())
    }

    pub fn median_gbps(&self) -> Option<f64> {
        median(self.ok().map(|s| s.gbps).collect())
    }

    /// The slowest successful run.
    pub fn slowest_gbps(&self) -> Option<f64> {
        self.ok().map(|s| s.gbps).min_by(f64::total_cmp)
    }

    pub fn median_cpu_per_gib(&self) -> Option<f64> {
        median(self.ok().filter_map(Sample::cpu_s_per_gib).collect())
    }

    pub fn median_own_cpu_per_gib(&self) -> Option<f64> {
        median(self.ok().filter_map(Sample::own_cpu_s_per_gib).collect())
    }

    /// Other processes' CPU use during the runs, in CPUs.
    pub fn median_others_cpus(&self) -> Option<f64> {
        median(
            self.ok()
                .filter(|s| s.wall_s > 0.0)
                .map(|s| s.others_cpu_s / s.wall_s)
                .collect(),
        )
    }

    pub fn median_busy_cpus(&self) -> Option<f64> {
        median(
            self.ok()
                .filter(|s| s.wall_s > 0.0)
                .map(|s| s.busy_cpu_s / s.wall_s)
                .collect(),
        )
    }

    pub fn errors(&self) -> Vec<&str> {
        self.samples
            .iter()
            .filter_map(|s| s.as_ref().err().map(String::as_str))
            .collect()
    }
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Median (mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Scale test outcome for one data plane.
#[derive(Clone, Debug)]
pub struct ScaleResult {
    /// Tunnels asked for.
    pub wanted: usize,
    /// RLIMIT_NOFILE of the proxy.
    pub nofile: u64,
    /// Tunnels tried: `wanted`, capped by `nofile`.
    pub target: usize,
    pub opened: usize,
    pub open_secs: f64,
    pub open_errors: u64,
    pub first_error: Option<String>,
    pub rss_idle_kib: Option<u64>,
    pub rss_open_kib: Option<u64>,
    pub fds_open: Option<usize>,
    /// Tunnels through which the upstream's one-byte greeting arrived.
    pub greeted: usize,
    /// Packet plane: tunnels promoted and tunnels refused (SIGUSR1 stats)
    /// when the wait for promotions ended, and how long it took.
    pub promoted: Option<u64>,
    pub not_promoted: Option<u64>,
    pub promote_secs: Option<f64>,
    /// Packet plane: the reasons tunnels were not promoted (stat name, count).
    pub not_promoted_reasons: Vec<(String, u64)>,
    /// Kernel memory before the tunnels were opened and with them open.
    pub kmem_before: kmem::Snapshot,
    pub kmem_open: kmem::Snapshot,
    /// The proxy's own sockets' buffers with the tunnels open.
    pub proxy_sockets: Result<kmem::SocketBuffers, String>,
    pub busy: Result<Sample, String>,
}

/// Everything measured, plus what describes the run.
pub struct Results {
    pub meta: report::Meta,
    pub settings: Settings,
    pub tput: Vec<TputResult>,
    pub setup: Vec<(SetupCase, Result<SetupResult, String>)>,
    pub http: Vec<(HttpCase, Result<HttpResult, String>)>,
    pub scale: Vec<(Contender, Result<ScaleResult, String>)>,
    pub stall: Vec<(StallCase, Result<StallResult, String>)>,
}

impl Results {
    /// The throughput (or CPU-cost) case of `contender` in `env` with `kind`.
    pub fn tput_of(&self, env: Env, kind: Kind, contender: Contender) -> Option<&TputResult> {
        self.tput
            .iter()
            .find(|r| r.case.env == env && r.case.kind == kind && r.case.contender == contender)
    }
}

/// Progress line: `[12/40] loopback-unpinned spliced sockmap -R P1 run 2/3 … 20.3 Gbit/s`.
struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn start(&mut self, what: &str) {
        self.done += 1;
        eprint!(
            "[{}/{} {:>3.0}s] {what} … ",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self, outcome: &str) {
        eprintln!("{outcome}");
    }
}

/// Runs the benchmark; `build` installs the prerequisites and returns the
/// path of the spliced it built.
pub fn run(args: BenchArgs, build: impl FnOnce() -> Result<PathBuf>) -> Result<()> {
    let settings = Settings {
        quick: args.quick,
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }),
        secs: args.secs.unwrap_or(if args.quick { 3 } else { 5 }),
        setup_secs: if args.quick { 1.0 } else { 3.0 },
        setup_clients: 64,
        http_clients: 16,
        scale_tunnels: if args.quick { 2_000 } else { 10_000 },
        stall_tunnels: if args.quick { 20 } else { 100 },
        rate: RATE,
    };
    let plan = plan(args.quick, &args.filter);
    if args.list {
        for case in &plan.cases {
            println!("{}", case.id());
        }
        for case in &plan.setup {
            println!("{}", case.id());
        }
        for case in &plan.http {
            println!("{}", case.id());
        }
        for contender in &plan.scale {
            println!("{}", scale_id(*contender));
        }
        for case in &plan.stall {
            println!("{}", case.id());
        }
        return Ok(());
    }
    if plan.cases.is_empty()
        && plan.setup.is_empty()
        && plan.http.is_empty()
        && plan.scale.is_empty()
        && plan.stall.is_empty()
    {
        bail!(
            "--filter {:?} matches no case; `cargo xtask bench --list` prints the ids",
            args.filter
        );
    }
    let build_started = Instant::now();
    let spliced = build()?;
    let spliced = spliced.as_path();
    let build_s = build_started.elapsed().as_secs_f64();
    let started = Instant::now();
    for tool in ["iperf3", "proxychains4", "ip", "taskset"] {
        if !child::on_path(tool) {
            bail!(
                "`{tool}` is not on PATH; `cargo xtask setup --only bench` installs the \
                 benchmark's tools"
            );
        }
    }
    let root = crate::prereq::is_root()?;
    if !root {
        eprintln!(
            "bench: warning: not root: the network namespace cases are skipped and the \
             sockmap plane will fail to start (it needs CAP_BPF and CAP_NET_ADMIN)"
        );
    }
    child::install_interrupt_handler();
    let tmp = TempDir::new()?;
    let meta = report::Meta::collect(&settings);
    eprintln!(
        "bench: {} on {} × {}, kernel {}; {} iperf3 cases × {} run(s) of {} s, {} setup, {} \
         plain HTTP, {} scale, {} stall",
        if settings.quick { "quick" } else { "full" },
        meta.nproc,
        meta.cpu_model,
        meta.kernel,
        plan.cases.len(),
        settings.runs,
        settings.secs,
        plan.setup.len(),
        plan.http.len(),
        plan.scale.len(),
        plan.stall.len()
    );
    eprintln!(
        "bench: background load before starting: {:.2} busy CPUs of {} (loadavg {})",
        meta.background_busy_cpus, meta.nproc, meta.loadavg
    );

    let mut results = Results {
        meta,
        settings: settings.clone(),
        tput: plan
            .cases
            .iter()
            .map(|&case| TputResult {
                case,
                samples: Vec::new(),
                start_failure: None,
            })
            .collect(),
        setup: Vec::new(),
        http: Vec::new(),
        scale: Vec::new(),
        stall: Vec::new(),
    };
    let mut progress = Progress {
        done: 0,
        total: plan.cases.len() * settings.runs as usize
            + plan.setup.len()
            + plan.http.len()
            + plan.scale.len()
            + plan.stall.len(),
        started,
    };
    let mut ports = Ports::default();
    let outcome = (|| -> Result<()> {
        for env in Env::ALL {
            let (setup, http) = if env == Env::Unpinned {
                (plan.setup.as_slice(), plan.http.as_slice())
            } else {
                (&[][..], &[][..])
            };
            let stall: Vec<StallCase> = plan
                .stall
                .iter()
                .copied()
                .filter(|case| case.env == env)
                .collect();
            let has_cases = results.tput.iter().any(|r| r.case.env == env);
            if !has_cases && setup.is_empty() && http.is_empty() && stall.is_empty() {
                continue;
            }
            if env == Env::Netns && !root {
                let skipped = "skipped: network namespaces need root";
                for result in results.tput.iter_mut().filter(|r| r.case.env == env) {
                    result.start_failure = Some(skipped.into());
                    progress.done += settings.runs as usize;
                }
                for case in stall {
                    results.stall.push((case, Err(skipped.into())));
                    progress.done += 1;
                }
                continue;
            }
            run_env(
                env,
                spliced,
                tmp.path(),
                &settings,
                &mut ports,
                &mut results,
                Extras {
                    setup,
                    http,
                    stall: &stall,
                },
                &mut progress,
            )?;
        }
        if !plan.scale.is_empty() {
            run_scale(
                spliced,
                tmp.path(),
                &settings,
                &mut ports,
                &mut results,
                &plan.scale,
                &mut progress,
            )?;
        }
        Ok(())
    })();
    results.meta.elapsed_s = started.elapsed().as_secs_f64();
    let logs = crate::target_dir().join("bench").join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    if outcome.is_err() || report::has_failures(&results) {
        // The scratch directory goes away with `tmp`: keep its logs, configs
        // and iperf3 outputs for a post-mortem.
        match copy_dir(tmp.path(), &logs) {
            Ok(()) => eprintln!(
                "bench: something failed; proxy logs, configs and iperf3 outputs are in {}",
                logs.display()
            ),
            Err(err) => eprintln!("bench: could not keep the logs: {err:#}"),
        }
    }
    if let Err(err) = outcome {
        if child::interrupted() {
            bail!("interrupted; every child process and namespace was cleaned up");
        }
        return Err(err);
    }

    let out = args
        .out
        .unwrap_or_else(|| crate::target_dir().join("bench").join("results.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = report::to_json(&results);
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;

    let tables = report::tables(&results);
    println!();
    for table in &tables {
        println!("{}", table.to_text());
    }
    println!("raw results: {}", out.display());
    if args.filter.is_empty() && !args.no_docs {
        let docs = crate::workspace_root().join("docs");
        std::fs::create_dir_all(&docs)?;
        let svg = report::svg(&results);
        std::fs::write(docs.join("benchmarks.svg"), svg)?;
        std::fs::write(
            docs.join("benchmarks.md"),
            report::markdown(&results, &tables),
        )?;
        println!("rewrote docs/benchmarks.md and docs/benchmarks.svg");
    } else {
        println!("docs/benchmarks.md left alone (--filter or --no-docs)");
    }
    println!(
        "total elapsed: {:.0} s ({build_s:.0} s prerequisites and build, {:.0} s benchmark)",
        build_s + results.meta.elapsed_s,
        results.meta.elapsed_s
    );
    Ok(())
}

/// Copies a directory tree (regular files only).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The cases of an environment besides its iperf3 ones.
struct Extras<'a> {
    setup: &'a [SetupCase],
    http: &'a [HttpCase],
    stall: &'a [StallCase],
}

/// Runs every throughput case of `env` (and, on loopback, the connection
/// setup and plain-HTTP cases), then its promotion-stall cases, with all its
/// proxies up at once.
#[allow(clippy::too_many_arguments)]
fn run_env(
    env: Env,
    spliced: &Path,
    tmp: &Path,
    settings: &Settings,
    ports: &mut Ports,
    results: &mut Results,
    extras: Extras<'_>,
    progress: &mut Progress,
) -> Result<()> {
    let Extras { setup, http, stall } = extras;
    let topology = if env == Env::Netns {
        eprintln!("bench: creating network namespaces");
        Some(Topology::new().context("creating the network namespaces")?)
    } else {
        None
    };
    let (client_cpu, proxy_cpu, server_cpu) = env.cpus();
    let loopback = Ipv4Addr::LOCALHOST;
    let (server_ip, proxy_ip, clients) = match &topology {
        Some(_) => (
            Topology::SERVER_IP,
            Topology::PROXY_IP,
            Topology::CLIENT_NET,
        ),
        None => (loopback, loopback, "127.0.0.1/32"),
    };
    let iperf_port = if topology.is_some() {
        5201
    } else {
        ports.take()?
    };
    let echo = if setup.is_empty() {
        None
    } else {
        Some(EchoServer::start(ports.take()?, settings.setup_clients)?)
    };
    let origin = if http.is_empty() {
        None
    } else {
        Some(Origin::start(ports.take()?)?)
    };
    let stall_server = if stall.is_empty() {
        None
    } else {
        let port = if topology.is_some() {
            5202
        } else {
            ports.take()?
        };
        Some(
            StallServer::start(
                SocketAddr::from((server_ip, port)),
                topology.as_ref().map(|t| t.server.name.as_str()),
            )
            .map_err(|err| format!("the stall test's upstream did not start: {err:#}")),
        )
    };
    let mut allowed = vec![iperf_port];
    allowed.extend(echo.as_ref().map(|e| e.addr.port()));
    allowed.extend(origin.as_ref().map(|o| o.addr.port()));
    allowed.extend(
        stall_server
            .as_ref()
            .and_then(|s| s.as_ref().ok())
            .map(|s| s.addr.port()),
    );

    // Start every proxy this environment needs.
    let wanted: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|&c| c != Contender::Direct)
        .filter(|&c| {
            setup
                .iter()
                .any(|case| case.contender == c && case.variant == Variant::Ip)
                || http.iter().any(|case| case.contender == c)
                || stall.iter().any(|case| case.contender == c)
                || results
                    .tput
                    .iter()
                    .any(|r| r.case.env == env && r.case.contender == c)
        })
        .collect();
    let mut proxies: BTreeMap<Contender, Result<Proxy, String>> = BTreeMap::new();
    for (i, contender) in wanted.into_iter().enumerate() {
        let port = if topology.is_some() {
            3128 + u16::try_from(i).expect("few contenders")
        } else {
            ports.take()?
        };
        let launch = Launch {
            spliced,
            dir: tmp,
            netns: topology.as_ref().map(|t| t.proxy.name.as_str()),
            cpu: proxy_cpu,
            listen: SocketAddr::from((proxy_ip, port)),
            clients,
            connect_ports: &allowed,
            tag: env.id(),
            policy: &Policy::default(),
        };
        let started = contenders::start(contender, &launch);
        if let Err(reason) = &started {
            eprintln!(
                "bench: {} ({}) failed to start: {reason}",
                contender.label(),
                env.id()
            );
        }
        proxies.insert(contender, started);
        check_interrupt()?;
    }

    let ends = Ends {
        server_netns: topology.as_ref().map(|t| t.server.name.as_str()),
        server_cpu,
        client_netns: topology.as_ref().map(|t| t.client.name.as_str()),
        client_cpu,
        server_ip: IpAddr::V4(server_ip),
        port: iperf_port,
        congestion: env.congestion(),
        dir: tmp,
    };
    let indexes: Vec<usize> = (0..results.tput.len())
        .filter(|&i| results.tput[i].case.env == env)
        .collect();
    let mut kinds: Vec<Kind> = Vec::new();
    for &i in &indexes {
        let kind = results.tput[i].case.kind;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    for kind in kinds {
        let of_kind: Vec<usize> = indexes
            .iter()
            .copied()
            .filter(|&i| results.tput[i].case.kind == kind)
            .collect();
        for run in 1..=settings.runs {
            for &i in &of_kind {
                let case = results.tput[i].case;
                progress.start(&format!(
                    "{} {} {} run {run}/{}",
                    env.id(),
                    case.contender.id(),
                    kind.label(),
                    settings.runs
                ));
                let proxy = match proxies.get(&case.contender) {
                    None => None,
                    Some(Ok(proxy)) => Some(proxy),
                    Some(Err(reason)) => {
                        results.tput[i].start_failure = Some(reason.clone());
                        progress.finish("skipped (failed to start)");
                        continue;
                    }
                };
                let conf = proxy.map(|proxy| proxy.proxychains_conf.as_path());
                let sockmap = proxy.filter(|_| case.contender == Contender::Sockmap);
                let auto = proxy.filter(|_| case.contender == Contender::Auto);
                let packet = proxy.filter(|_| case.contender.promotes());
                let copied_before = sockmap.and_then(Proxy::flow_control_copied);
                let logged_before = auto.and_then(Proxy::tunnel_records).map(|r| r.len());
                let packet_before = packet.and_then(Proxy::tunnel_records).map(|r| r.len());
                let mut sample = iperf::run(&ends, kind, settings.secs, conf);
                if let (Ok(sample), Some(before)) = (&mut sample, copied_before) {
                    sample.user_copied_bytes = sockmap
                        .and_then(Proxy::flow_control_copied)
                        .map(|after| after.saturating_sub(before));
                }
                if let (Ok(sample), Some(before)) = (&mut sample, logged_before) {
                    sample.planes_used = auto.and_then(Proxy::tunnel_records).map(|records| {
                        let mut used = BTreeMap::new();
                        for record in records.into_iter().skip(before) {
                            *used.entry(record.dataplane).or_default() += 1;
                        }
                        used
                    });
                }
                if let Some(proxy) = packet {
                    sample = check_promotion(proxy, packet_before, kind, sample);
                }
                check_interrupt()?;
                progress.finish(&match &sample {
                    Ok(s) => match (kind.rate, s.cpu_s_per_gib()) {
                        (Some(_), Some(cpu)) => {
                            format!("{:.2} Gbit/s, {cpu:.3} CPU-s/GiB", s.gbps)
                        }
                        _ => format!("{:.2} Gbit/s", s.gbps),
                    },
                    Err(err) => format!("error: {err}"),
                });
                results.tput[i].samples.push(sample);
            }
        }
    }

    if let Some(echo) = &echo {
        // The name cases' resolver and the Basic cases' password file.
        let resolver = setup
            .iter()
            .any(|case| case.variant == Variant::Name)
            .then(|| resolver::Resolver::start(tmp));
        let passwords = tmp.join("bench.htpasswd");
        std::fs::write(
            &passwords,
            format!(
                "{}:{}\n",
                setup_rate::BENCH_USER,
                setup_rate::BENCH_PASSWORD_HASH
            ),
        )?;
        for &case in setup {
            let contender = case.contender;
            progress.start(&format!(
                "{} ({} clients, {:.0} s)",
                case.id(),
                settings.setup_clients,
                settings.setup_secs
            ));
            // A case asking for a name or credentials has a proxy of its own.
            let policy = Policy {
                dns: (case.variant == Variant::Name).then_some(IpAddr::V4(resolver::RESOLVER_IP)),
                basic_auth: (case.variant == Variant::BasicAuth).then(|| passwords.clone()),
            };
            let own = match (case.variant, &resolver) {
                (Variant::Ip, _) => None,
                (Variant::Name, Some(Err(err))) => Some(Err(err.clone())),
                _ => {
                    let tag = format!("{}-{}", env.id(), case.variant.id());
                    let launch = Launch {
                        spliced,
                        dir: tmp,
                        netns: None,
                        cpu: proxy_cpu,
                        listen: SocketAddr::from((proxy_ip, ports.take()?)),
                        clients,
                        connect_ports: &allowed,
                        tag: &tag,
                        policy: &policy,
                    };
                    Some(contenders::start(contender, &launch))
                }
            };
            let running = own.as_ref().or(proxies.get(&contender));
            let pid = match running {
                Some(Ok(proxy)) => Some(proxy.pid()),
                _ => None,
            };
            let proxy = match running {
                None => Ok(None),
                Some(Ok(proxy)) => Ok(Some(proxy.addr)),
                Some(Err(reason)) => Err(format!("failed to start: {reason}")),
            };
            let cpu_before = pid.and_then(cpu::process_tree_cpu_secs);
            let load_before = cpu::own_cpu_secs();
            let result = proxy.map(|proxy| {
                let payload = if contender == Contender::SplicePeek {
                    setup_rate::client_hello()
                } else {
                    setup_rate::PING
                };
                setup_rate::measure(
                    proxy,
                    echo.addr,
                    settings.setup_clients,
                    Duration::from_secs_f64(settings.setup_secs),
                    payload,
                    case.variant,
                )
                .with_cpu(
                    [cpu_before, pid.and_then(cpu::process_tree_cpu_secs)],
                    [load_before, cpu::own_cpu_secs()],
                )
            });
            if let Some(Ok(proxy)) = own {
                proxy.stop();
            }
            check_interrupt()?;
            progress.finish(&match &result {
                Ok(r) => format!(
                    "{:.0} tunnels/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                    r.per_sec, r.p50_ms, r.p99_ms, r.errors
                ),
                Err(err) => err.clone(),
            });
            results.setup.push((case, result));
        }
    }
    if let Some(origin) = &origin {
        for &case in http {
            progress.start(&format!(
                "plain HTTP {} {} ({} clients, {:.0} s)",
                case.contender.id(),
                http_rate::size_id(case.body),
                settings.http_clients,
                settings.setup_secs
            ));
            let proxy = match proxies.get(&case.contender) {
                None => Ok(None),
                Some(Ok(proxy)) => Ok(Some(proxy.addr)),
                Some(Err(reason)) => Err(format!("failed to start: {reason}")),
            };
            let result = proxy.map(|proxy| {
                http_rate::measure(
                    proxy,
                    origin,
                    case.body,
                    settings.http_clients,
                    Duration::from_secs_f64(settings.setup_secs),
                )
            });
            check_interrupt()?;
            progress.finish(&match &result {
                Ok(r) => format!(
                    "{:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, {} client / {} origin \
                     connections, {} errors",
                    r.per_sec,
                    r.p50_ms,
                    r.p99_ms,
                    r.client_connections,
                    r.origin_connections,
                    r.errors
                ),
                Err(err) => err.clone(),
            });
            results.http.push((case, result));
        }
    }
    if let Some(server) = &stall_server {
        for &case in stall {
            progress.start(&format!(
                "stall {} {} {} ({} bulk tunnels)",
                env.id(),
                case.contender.id(),
                if case.reverse { "-R" } else { "fwd" },
                settings.stall_tunnels
            ));
            let result = match (server, proxies.get(&case.contender)) {
                (Err(err), _) => Err(err.clone()),
                (Ok(server), Some(Ok(proxy))) => {
                    let ends = stall::Ends {
                        client_netns: topology.as_ref().map(|t| t.client.name.as_str()),
                        server,
                    };
                    Ok(stall::measure(case, proxy, &ends, settings.stall_tunnels))
                }
                (Ok(_), Some(Err(reason))) => Err(format!("failed to start: {reason}")),
                (Ok(_), None) => Err("no proxy".to_owned()),
            };
            check_interrupt()?;
            progress.finish(&match &result {
                Ok(r) => format!(
                    "{}/{} done{}, stall p50 {} ms, p99 {} ms, max {} ms{}",
                    r.completed,
                    r.tunnels,
                    r.promoted
                        .map(|n| format!(", {n} promoted mid-transfer"))
                        .unwrap_or_default(),
                    fmt_ms(r.p50_ms()),
                    fmt_ms(r.p99_ms()),
                    fmt_ms(r.max_ms()),
                    r.first_error
                        .as_ref()
                        .map(|err| format!(", {} errors, first: {err}", r.errors))
                        .unwrap_or_default()
                ),
                Err(err) => err.clone(),
            });
            results.stall.push((case, result));
        }
    }
    drop(stall_server);
    for (_, proxy) in proxies {
        if let Ok(proxy) = proxy {
            proxy.stop();
        }
    }
    drop(echo);
    drop(origin);
    drop(topology);
    Ok(())
}

fn fmt_ms(value: Option<f64>) -> String {
    value.map_or("–".to_owned(), |ms| format!("{ms:.1}"))
}

/// For the packet contenders: whether the run's data connections were
/// promoted, from the access log (`logged_before`: its records before the
/// run). A run whose data connection stayed on the splice pump measured the
/// wrong plane: it becomes an error, loudly, instead of a number.
fn check_promotion(
    proxy: &Proxy,
    logged_before: Option<usize>,
    kind: Kind,
    sample: Result<Sample, String>,
) -> Result<Sample, String> {
    let mut sample = sample?;
    let before = logged_before.ok_or("cannot read spliced's access log")?;
    // iperf3's control connection and its data connections.
    let wanted = before + kind.streams as usize + 1;
    let records = proxy
        .wait_records(wanted, Duration::from_secs(6))
        .unwrap_or_default();
    let check = PromotionCheck::of(records.get(before..).unwrap_or_default(), kind.streams);
    if let Some(why) = check.fallback(kind.streams) {
        let reasons = not_promoted_reasons(proxy);
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = reasons.iter().map(|(k, n)| format!("{k}={n}")).collect();
            format!(" (spliced so far: {})", parts.join(" "))
        };
        return Err(format!(
            "{why}{reasons}; its {:.2} Gbit/s are not counted",
            sample.gbps
        ));
    }
    sample.promotion = Some(check);
    Ok(sample)
}

/// The packet plane's refusals so far, by reason (SIGUSR1 stats).
fn not_promoted_reasons(proxy: &Proxy) -> Vec<(String, u64)> {
    proxy
        .stats()
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, count)| key.starts_with("packet_not_promoted_") && *count > 0)
        .collect()
}

/// Opens many idle tunnels through each spliced plane (the upstream greets
/// each with one byte; `packet-0` promotes them all), reads its RSS and the
/// kernel's memory, and measures one busy tunnel among them.
fn run_scale(
    spliced: &Path,
    tmp: &Path,
    settings: &Settings,
    ports: &mut Ports,
    results: &mut Results,
    planes: &[Contender],
    progress: &mut Progress,
) -> Result<()> {
    // This process holds the client end of every tunnel (the hold server is a
    // child of its own) and the proxy both ends: 2 fds per tunnel. Children
    // inherit the limit; without CAP_SYS_RESOURCE the hard limit caps it.
    let wanted = settings.scale_tunnels;
    let nofile = child::raise_nofile((2 * wanted + 4096) as u64)?;
    let count = wanted.min(
        usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(128)
            / 2,
    );
    if count < wanted {
        eprintln!(
            "bench: RLIMIT_NOFILE cannot go above {nofile} here (hard limit; raising it needs \
             CAP_SYS_RESOURCE): the scale test opens {count} tunnels instead of {wanted}"
        );
    }
    let iperf_port = ports.take()?;
    for &plane in planes {
        progress.start(&format!(
            "scale {} ({count} idle tunnels + 1 busy)",
            plane.id()
        ));
        let hold = scale::HoldServer::start(ports.take()?)?;
        let hold_addr = hold.addr;
        let launch = Launch {
            spliced,
            dir: tmp,
            netns: None,
            cpu: None,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, ports.take()?)),
            clients: "127.0.0.1/32",
            connect_ports: &[iperf_port, hold_addr.port()],
            tag: "scale",
            policy: &Policy::default(),
        };
        let result = match contenders::start(plane, &launch) {
            Err(reason) => Err(format!("failed to start: {reason}")),
            Ok(proxy) => {
                child::sleep(Duration::from_millis(300));
                let rss_idle_kib = child::rss_kib(proxy.pid());
                let kmem_before = kmem::Snapshot::read();
                let open_limit = Duration::from_secs(if settings.quick { 30 } else { 90 });
                let tunnels = scale::open_tunnels(proxy.addr, hold_addr, count, 32, open_limit);
                scale::wait_accepted(&hold, tunnels.streams.len(), Duration::from_secs(10));
                let promotions = (plane.promote_after() == Some(0)).then(|| {
                    let limit = Duration::from_secs(if settings.quick { 30 } else { 90 });
                    scale::wait_promotions(&proxy, tunnels.streams.len(), limit)
                });
                let greeted = scale::read_greetings(&tunnels, Duration::from_secs(10));
                child::sleep(Duration::from_millis(if settings.quick {
                    300
                } else {
                    700
                }));
                let rss_open_kib = child::rss_kib(proxy.pid());
                let fds_open = child::fd_count(proxy.pid());
                let kmem_open = kmem::Snapshot::read();
                let proxy_sockets = kmem::socket_buffers(&format!(
                    "( sport = :{} or dport = :{} )",
                    proxy.addr.port(),
                    hold_addr.port()
                ));
                check_interrupt()?;
                let ends = Ends {
                    server_netns: None,
                    server_cpu: None,
                    client_netns: None,
                    client_cpu: None,
                    server_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: iperf_port,
                    congestion: None,
                    dir: tmp,
                };
                let kind = Kind::new(false, 1);
                let logged_before = proxy.tunnel_records().map(|r| r.len());
                let mut busy =
                    iperf::run(&ends, kind, settings.secs, Some(&proxy.proxychains_conf));
                if plane.promotes() {
                    busy = check_promotion(&proxy, logged_before, kind, busy);
                }
                let promote_secs = promotions.as_ref().map(|p| p.secs);
                let promotion = promotions.unwrap_or_default();
                let result = ScaleResult {
                    wanted,
                    nofile,
                    target: count,
                    opened: tunnels.streams.len(),
                    open_secs: tunnels.secs,
                    open_errors: tunnels.errors,
                    first_error: tunnels.first_error.clone(),
                    rss_idle_kib,
                    rss_open_kib,
                    fds_open,
                    greeted,
                    promoted: promotion.promoted,
                    not_promoted: promotion.not_promoted,
                    promote_secs,
                    not_promoted_reasons: promotion.reasons,
                    kmem_before,
                    kmem_open,
                    proxy_sockets,
                    busy,
                };
                // Close both ends of every idle tunnel, then the proxy.
                drop(tunnels);
                drop(hold);
                proxy.stop();
                Ok(result)
            }
        };
        check_interrupt()?;
        progress.finish(&match &result {
            Ok(r) => format!(
                "{}/{} open in {:.1} s, {} greeted{}, RSS {} → {} KiB, TCP mem {} → {} pages, \
                 busy tunnel {}",
                r.opened,
                r.target,
                r.open_secs,
                r.greeted,
                match (r.promoted, r.not_promoted, r.promote_secs) {
                    (Some(yes), Some(no), Some(secs)) => {
                        format!(", {yes} promoted and {no} refused in {secs:.1} s")
                    }
                    (_, _, Some(_)) => ", promotions unknown (no stats)".to_owned(),
                    _ => String::new(),
                },
                r.rss_idle_kib.unwrap_or(0),
                r.rss_open_kib.unwrap_or(0),
                r.kmem_before.tcp_mem_pages,
                r.kmem_open.tcp_mem_pages,
                match &r.busy {
                    Ok(s) => format!("{:.2} Gbit/s", s.gbps),
                    Err(err) => format!("error: {err}"),
                }
            ),
            Err(err) => err.clone(),
        });
        results.scale.push((plane, result));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn filters_select_by_id_substring() {
        let all = plan(false, &[]);
        let sockmap = plan(false, &["sockmap".to_owned()]);
        assert!(sockmap.cases.len() < all.cases.len());
        assert!(sockmap
            .cases
            .iter()
            .all(|c| c.contender == Contender::Sockmap));
        let contenders = |plan: &Plan| -> Vec<Contender> {
            plan.setup.iter().map(|case| case.contender).collect()
        };
        assert_eq!(contenders(&sockmap), [Contender::Sockmap]);
        assert_eq!(sockmap.scale, [Contender::Sockmap]);
        let cpu = plan(true, &["cpu/".to_owned()]);
        assert!(cpu.cases.iter().all(|c| c.kind.rate.is_some()));
        assert!(cpu.setup.is_empty() && cpu.scale.is_empty() && cpu.http.is_empty());
        let http = plan(true, &["http/".to_owned()]);
        assert!(http.cases.is_empty() && http.setup.is_empty() && http.stall.is_empty());
        assert_eq!(http.http.len(), 8);
        assert_eq!(
            plan(false, &["http/loopback/squid/1m".to_owned()]).http,
            [HttpCase {
                contender: Contender::Squid,
                body: 1 << 20
            }]
        );
    }

    #[test]
    fn packet_contenders_run_wherever_spliced_planes_do() {
        let all = plan(false, &[]);
        let packet = plan(false, &["packet".to_owned()]);
        // Every environment and kind with a spliced plane has the packet plane.
        for case in all
            .cases
            .iter()
            .filter(|c| c.contender == Contender::Splice || c.contender == Contender::Copy)
        {
            assert!(
                packet
                    .cases
                    .iter()
                    .any(|p| p.env == case.env && p.kind == case.kind),
                "no packet case beside {}",
                case.id()
            );
        }
        let setup: Vec<String> = packet.setup.iter().map(SetupCase::id).collect();
        assert_eq!(
            setup,
            [
                "setup/loopback/packet",
                "setup/loopback/packet-0",
                "setup/loopback/packet/name",
                "setup/loopback/packet/basic-auth"
            ]
        );
        assert_eq!(packet.scale, [Contender::Packet, Contender::PacketEager]);
        assert!(packet
            .stall
            .iter()
            .all(|case| case.contender == Contender::Packet));
        let stall = plan(false, &["stall/".to_owned()]);
        assert!(stall.cases.is_empty() && stall.setup.is_empty() && stall.scale.is_empty());
        assert_eq!(stall.stall.len(), 8);
        assert_eq!(plan(true, &["stall/".to_owned()]).stall.len(), 2);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let sorted: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), Some(5.0));
        assert_eq!(percentile(&sorted, 0.99), Some(10.0));
        assert_eq!(percentile(&sorted, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn case_ids_are_unique() {
        for quick in [false, true] {
            let cases = plan(quick, &[]).cases;
            let mut ids: Vec<String> = cases.iter().map(Case::id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), cases.len());
        }
    }
}
