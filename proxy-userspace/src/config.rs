//! Command-line configuration of the `spliced` binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    dataplane::{DataPlaneChoice, PlaneKind},
    policy::PortSet,
};

/// Format of access log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Squid's native `logformat squid` line.
    Squid,
    /// One JSON object per line.
    Json,
}

/// Deliberate misbehaviours for tests that prove each kernel workaround is
/// needed. Only a build with the `test-hooks` feature (the test suite's) accepts
/// `--test-hook`; each one loses or stalls data on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "test-hooks", derive(ValueEnum))]
pub enum TestHook {
    /// Skip the `SO_RCVLOWAT` kick after insertion (bytes queued before insertion stall).
    NoRcvlowatKick,
    /// Redirect zero-length FIN skbs in the verdict instead of dropping them.
    RedirectEmptySkbs,
    /// Shut the peer down as soon as EOF is seen, without waiting for the redirected
    /// bytes to drain.
    NoDrainWait,
    /// Insert into the verdict map before the redirect-target map, with a pause between.
    VerdictBeforeTargets,
    /// Wait 200 ms between reading the request head and splicing the tunnel.
    DelayBeforeSplice,
    /// Do not read the client's queued bytes before the 200, so a segment the head
    /// reader read only part of can reach the data plane.
    NoQueueDrain,
    /// Wait 2 s before binding the listeners, so tests can probe `/readyz`
    /// while the proxy is starting.
    DelayStartup,
    /// Hold a sockmap direction back at a 256 KiB redirect backlog instead of
    /// 16 MiB, so a bulk transfer is held back and resumed many times.
    TinyBacklog,
    /// Let the verdict forward skbs whole even when they repeat bytes it has
    /// handled already (a retransmission overlapping received data).
    NoOverlapTrim,
    /// Let the verdict trim at most 4095 repeated bytes per skb, so a longer
    /// overlap takes the reset path.
    ShortTrim,
    /// Fail the upstream socket's insertion into `SPLICED` after the client's
    /// succeeded, as if its FIN had arrived in between.
    FailSecondInsert,
    /// Fail the `SO_RCVLOWAT` kick after both sockets are spliced.
    FailKick,
    /// Make the sockmap start-up check see a wrong sequence number.
    FailProbe,
}

/// The test hooks in force: always none without the `test-hooks` feature, so
/// the release build compiles every hook's branch away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestHooks {
    #[cfg(feature = "test-hooks")]
    hooks: Vec<TestHook>,
}

impl TestHooks {
    /// Whether `hook` is in force.
    #[cfg(feature = "test-hooks")]
    pub fn has(&self, hook: TestHook) -> bool {
        self.hooks.contains(&hook)
    }

    /// Whether `hook` is in force: never, in a build without test hooks.
    #[cfg(not(feature = "test-hooks"))]
    pub const fn has(&self, _hook: TestHook) -> bool {
        false
    }
}

/// `spliced` command line. Flags given here override the configuration file.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "spliced",
    version,
    about = "HTTP CONNECT forward proxy with tunnels spliced in the kernel by eBPF"
)]
pub struct Config {
    /// A squid.conf (subset) to read; without it the built-in policy applies.
    #[arg(short = 'f', long = "config", value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Check the configuration, print the effective rules and exit (like
    /// `squid -k parse`); same as the `check` subcommand.
    #[arg(long)]
    pub check: bool,

    /// Address to listen on; repeat for several. Default: the file's `http_port`
    /// lines, else 0.0.0.0:3128 and [::]:3128.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Ports that CONNECT may reach under the built-in policy: a comma-separated
    /// list of ports and ranges (default 443). Not allowed with `-f`.
    #[arg(long, value_name = "PORTS")]
    pub connect_ports: Option<PortSet>,

    /// Data plane that moves tunnel bytes: `auto` picks one per tunnel by where
    /// its two ends are (`--auto-local`, `--auto-network`; packet on both by
    /// default); splice stands in for sockmap or packet when their eBPF
    /// programs do not load.
    #[arg(long, value_enum, default_value_t = DataPlaneChoice::Auto)]
    pub dataplane: DataPlaneChoice,

    /// With `--dataplane auto`: the data plane of a tunnel whose client and
    /// upstream are both on this host (loopback or one of its own addresses).
    /// Default packet: on loopback it was the fastest and cheapest plane with
    /// BBR and with cubic endpoints (docs/benchmarks.md).
    #[arg(long, value_enum, value_name = "PLANE")]
    pub auto_local: Option<PlaneKind>,

    /// With `--dataplane auto`: the data plane of every other tunnel (an end
    /// reached through a network device). Default packet: across veth it
    /// moved as much as a direct connection, at the least CPU per byte
    /// (docs/benchmarks.md).
    #[arg(long, value_enum, value_name = "PLANE")]
    pub auto_network: Option<PlaneKind>,

    /// Access log destination: a file path, or `-` for standard output. Default:
    /// the file's `access_log` lines, else `-`.
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,

    /// Access log record format. Default: the file's, else `squid`.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Deadline for a client to send its whole request head, in seconds
    /// (`request_timeout`; default 30).
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<f64>,

    /// Timeout of one upstream connect attempt (per resolved address), in seconds
    /// (`connect_timeout`; default 10).
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,

    /// Timeout of a name resolution, in seconds (`dns_timeout`; default 5).
    #[arg(long, value_name = "SECS")]
    pub dns_timeout: Option<f64>,

    /// Close a tunnel that moved no byte in either direction for this long, in
    /// seconds (`read_timeout`; default 900, Squid's).
    #[arg(long, value_name = "SECS")]
    pub read_timeout: Option<f64>,

    /// Close a tunnel this long after it opened, in seconds (`client_lifetime`;
    /// default 86400, Squid's).
    #[arg(long, value_name = "SECS")]
    pub client_lifetime: Option<f64>,

    /// After SIGTERM, how long open tunnels may go on, in seconds
    /// (`shutdown_lifetime`; default 30, Squid's).
    #[arg(long, value_name = "SECS")]
    pub shutdown_lifetime: Option<f64>,

    /// TCP congestion control set on the proxy's own tunnel sockets (`""` keeps the
    /// system default). Cubic avoids BBR's pacing, the biggest lever measured for
    /// spliced tunnels.
    #[arg(long, value_name = "NAME", default_value = "cubic")]
    pub tcp_congestion: String,

    /// Send buffer, in bytes, given to a spliced (sockmap) socket whose send
    /// queue fills up; 0 keeps the kernel's autotuning. The kernel's redirect
    /// worker, on a full send buffer, sleeps a whole timer tick (4 ms at HZ=250)
    /// and ignores the wake-up in between, so the buffer must hold that long a
    /// stretch of traffic: the default, 16 MiB, covers ~30 Gbit/s. Set with
    /// `SO_SNDBUFFORCE` (needs `CAP_NET_ADMIN`), else `SO_SNDBUF` (capped by
    /// `net.core.wmem_max`). Memory is only used while a receiver lags.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub redirect_send_buffer: u32,

    /// Where the packet plane runs: promote a tunnel to segment translation once
    /// the splice pump has moved this many bytes (both directions together;
    /// 0: right after the `200`; default 1 MiB). Promotion costs the peers one
    /// retransmission of what they send during the cut-over, so short
    /// exchanges are better left on the pump.
    #[arg(long, value_name = "BYTES")]
    pub promote_after: Option<u64>,

    /// Where the packet plane runs: the interfaces to attach the tc programs to
    /// (comma-separated). Default: every Ethernet-like interface and `lo`,
    /// and those that appear later (looked for before each promotion).
    #[arg(long, value_name = "IFACE,...", value_delimiter = ',')]
    pub packet_interfaces: Vec<String>,

    /// Where the packet plane runs: a directory on a bpffs (e.g.
    /// `/sys/fs/bpf/spliced`) where its maps and tc links are pinned, so that
    /// promoted tunnels outlive the process. On SIGTERM they are handed over
    /// at once instead of drained, and the next spliced started with the same
    /// directory adopts them (and logs them when they end). Off by default:
    /// the programs then detach when the process exits and its promoted
    /// tunnels are reset. `rm -r DIR` detaches pinned programs.
    #[arg(long, value_name = "DIR")]
    pub packet_state_dir: Option<std::path::PathBuf>,

    /// Serve `/healthz`, `/readyz` and `/metrics` (Prometheus) over HTTP on this
    /// address (port 0 picks one; the log says which). Off by default; keep it on
    /// loopback or a management network.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<SocketAddr>,

    /// Also write an access log record (`TCP_TUNNEL`, end `periodic`, bytes so
    /// far) every SECS seconds for each tunnel open that long.
    #[arg(long, value_name = "SECS")]
    pub access_log_periodic: Option<f64>,

    /// Test-only misbehaviour (repeatable); see the test suite. Only in a
    /// build with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[arg(long = "test-hook", value_enum, hide = true)]
    pub test_hooks: Vec<TestHook>,

    /// A subcommand instead of running the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Check a configuration file, print the effective rules and exit.
    Check {
        /// The file to check.
        #[arg(short = 'f', long = "config", value_name = "FILE")]
        file: PathBuf,
    },
}

impl Config {
    /// The test hooks given on the command line (none without the
    /// `test-hooks` feature).
    pub fn hooks(&self) -> TestHooks {
        TestHooks {
            #[cfg(feature = "test-hooks")]
            hooks: self.test_hooks.clone(),
        }
    }
}

/// Seconds from the command line as a duration (negative or NaN → zero, huge → MAX).
pub fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}
