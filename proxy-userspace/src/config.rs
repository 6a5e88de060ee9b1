//! Command-line configuration of the `spliced` binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{dataplane::DataPlaneChoice, policy::PortSet};

/// Format of access log records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Squid's native `logformat squid` line.
    Squid,
    /// One JSON object per line.
    Json,
}

/// Deliberate misbehaviours for tests that prove each kernel workaround is needed.
/// Never use them in production: each one loses or stalls data on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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
}

/// `spliced` command line.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "spliced",
    version,
    about = "HTTP CONNECT forward proxy with tunnels spliced in the kernel by eBPF"
)]
pub struct Config {
    /// Address to listen on; repeat for several. Default: 0.0.0.0:3128 and [::]:3128.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Ports that CONNECT may reach: a comma-separated list of ports and ranges.
    #[arg(long, value_name = "PORTS", default_value = "443")]
    pub connect_ports: PortSet,

    /// Data plane that moves tunnel bytes: `auto` picks sockmap when the eBPF
    /// programs load and splice otherwise.
    #[arg(long, value_enum, default_value_t = DataPlaneChoice::Auto)]
    pub dataplane: DataPlaneChoice,

    /// Access log destination: a file path, or `-` for standard output.
    #[arg(long, value_name = "PATH", default_value = "-")]
    pub access_log: PathBuf,

    /// Access log record format.
    #[arg(long, value_enum, default_value_t = LogFormat::Squid)]
    pub log_format: LogFormat,

    /// Deadline for a client to send its whole request head, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub request_timeout: f64,

    /// Timeout of one upstream connect attempt (per resolved address), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Timeout of a name resolution, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub dns_timeout: f64,

    /// TCP congestion control set on the proxy's own tunnel sockets (`""` keeps the
    /// system default). Cubic avoids BBR's pacing, the biggest lever measured for
    /// spliced tunnels.
    #[arg(long, value_name = "NAME", default_value = "cubic")]
    pub tcp_congestion: String,

    /// Test-only misbehaviour (repeatable); see the test suite.
    #[arg(long = "test-hook", value_enum, hide = true)]
    pub test_hooks: Vec<TestHook>,
}

impl Config {
    /// Listen addresses with the defaults applied.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        if self.listen.is_empty() {
            vec![
                "0.0.0.0:3128".parse().expect("valid literal"),
                "[::]:3128".parse().expect("valid literal"),
            ]
        } else {
            self.listen.clone()
        }
    }

    /// Whether a test hook is enabled.
    pub fn hook(&self, hook: TestHook) -> bool {
        self.test_hooks.contains(&hook)
    }

    /// [`Config::request_timeout`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        secs(self.request_timeout)
    }

    /// [`Config::connect_timeout`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        secs(self.connect_timeout)
    }

    /// [`Config::dns_timeout`] as a duration.
    pub fn dns_timeout(&self) -> Duration {
        secs(self.dns_timeout)
    }
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
}
