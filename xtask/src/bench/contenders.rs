//! The contenders: no proxy, spliced's data planes, Squid and tinyproxy; how
//! each proxy is configured, started and reached (proxychains4), and what
//! spliced says about its tunnels (JSON access log, SIGUSR1 stats).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::child::{self, placed, set_mode, tail, wait_listening, Guarded};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Contender {
    /// No proxy: iperf3 straight to the server (the ceiling).
    Direct,
    Sockmap,
    Splice,
    /// `--dataplane splice` with a squid.conf whose `ssl_bump peek` reads
    /// every tunnel's ClientHello before splicing it: the cost of a TLS name
    /// rule (connection setup only).
    SplicePeek,
    Copy,
    /// `--dataplane packet`: the splice pump, then segment translation by a
    /// tc program once a tunnel has moved `--promote-after` (default 1 MiB).
    Packet,
    /// `--dataplane packet --promote-after 0`: promoted right after the `200`.
    PacketEager,
    /// spliced's default, `--dataplane auto`: a plane per tunnel by its path.
    Auto,
    Squid,
    Tinyproxy,
}

impl Contender {
    pub const ALL: [Self; 10] = [
        Self::Direct,
        Self::Sockmap,
        Self::Splice,
        Self::SplicePeek,
        Self::Copy,
        Self::Packet,
        Self::PacketEager,
        Self::Auto,
        Self::Squid,
        Self::Tinyproxy,
    ];
    /// spliced's data planes, each with its defaults.
    pub const PLANES: [Self; 4] = [Self::Sockmap, Self::Splice, Self::Copy, Self::Packet];

    /// Short name, used in case ids and JSON.
    pub fn id(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sockmap => "sockmap",
            Self::Splice => "splice",
            Self::SplicePeek => "splice-peek",
            Self::Copy => "copy",
            Self::Packet => "packet",
            Self::PacketEager => "packet-0",
            Self::Auto => "auto",
            Self::Squid => "squid",
            Self::Tinyproxy => "tinyproxy",
        }
    }

    /// Name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Sockmap => "spliced sockmap",
            Self::Splice => "spliced splice",
            Self::SplicePeek => "spliced splice, ssl_bump peek",
            Self::Copy => "spliced copy",
            Self::Packet => "spliced packet",
            Self::PacketEager => "spliced packet, --promote-after 0",
            Self::Auto => "spliced auto",
            Self::Squid => "Squid",
            Self::Tinyproxy => "tinyproxy",
        }
    }

    /// spliced's `--dataplane` value, for the spliced contenders.
    pub fn plane(self) -> Option<&'static str> {
        match self {
            Self::Sockmap => Some("sockmap"),
            Self::Splice | Self::SplicePeek => Some("splice"),
            Self::Copy => Some("copy"),
            Self::Packet | Self::PacketEager => Some("packet"),
            Self::Auto => Some("auto"),
            _ => None,
        }
    }

    /// Whether its tunnels should end up on the packet plane (promoted).
    pub fn promotes(self) -> bool {
        matches!(self, Self::Packet | Self::PacketEager)
    }

    /// The `--promote-after` it runs with (spliced's default when `None`).
    pub fn promote_after(self) -> Option<u64> {
        (self == Self::PacketEager).then_some(0)
    }

    /// Whether its JSON access log is kept (to see which plane ran each
    /// tunnel); the others log to /dev/null.
    fn keeps_access_log(self) -> bool {
        matches!(self, Self::Auto | Self::Packet | Self::PacketEager)
    }
}

/// spliced's `--promote-after` default (proxy-userspace
/// `dataplane::packet::DEFAULT_PROMOTE_AFTER`).
pub const DEFAULT_PROMOTE_AFTER: u64 = 1 << 20;

/// One tunnel's record in spliced's JSON access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelRecord {
    /// The client's address as spliced saw it (`ip:port`).
    pub client: String,
    /// The data plane that ran it at the end (`packet` once promoted).
    pub dataplane: String,
    /// Bytes both ways (the `200` head included).
    pub bytes: u64,
    /// Packet plane: what the pump moved before promotion, (client →
    /// upstream, upstream → client); `None` when not promoted.
    pub before_promotion: Option<(u64, u64)>,
}

impl TunnelRecord {
    /// Parses one line of the JSON access log; `None` for other records
    /// (errors, no data plane).
    pub fn parse(line: &str) -> Option<Self> {
        let record: serde_json::Value = serde_json::from_str(line).ok()?;
        let dataplane = record["dataplane"].as_str()?.to_owned();
        let before = &record["bytes_before_promotion"];
        Some(Self {
            client: record["client"].as_str().unwrap_or_default().to_owned(),
            dataplane,
            bytes: record["bytes_to_client"].as_u64().unwrap_or(0)
                + record["bytes_from_client"].as_u64().unwrap_or(0),
            before_promotion: before["client_to_upstream"]
                .as_u64()
                .zip(before["upstream_to_client"].as_u64()),
        })
    }

    pub fn promoted(&self) -> bool {
        self.dataplane == "packet"
    }
}

/// Where and how a proxy runs.
pub struct Launch<'a> {
    /// target/release/spliced.
    pub spliced: &'a Path,
    /// Scratch directory for configs and logs.
    pub dir: &'a Path,
    /// Network namespace, or `None` for the host's.
    pub netns: Option<&'a str>,
    /// CPU to pin the proxy to.
    pub cpu: Option<u32>,
    /// Listen address.
    pub listen: SocketAddr,
    /// Who may use the proxy (CIDR), e.g. 127.0.0.1/32.
    pub clients: &'a str,
    /// Ports CONNECT may reach.
    pub connect_ports: &'a [u16],
    /// Label for file names: environment id.
    pub tag: &'a str,
    /// What the proxy's policy adds to the plain one (both Squid and spliced
    /// then read the same squid.conf lines).
    pub policy: &'a Policy,
}

/// Policy beyond "our clients to our ports".
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `dns_nameservers`: the resolver names are asked of.
    pub dns: Option<std::net::IpAddr>,
    /// Basic authentication against this htpasswd file (Squid's
    /// `basic_ncsa_auth` helper; spliced reads the file itself), required of
    /// every request.
    pub basic_auth: Option<PathBuf>,
}

impl Policy {
    fn is_plain(&self) -> bool {
        self.dns.is_none() && self.basic_auth.is_none()
    }

    /// The squid.conf lines both proxies read: the resolver, the
    /// authentication scheme, and the access rules.
    fn lines(&self, launch: &Launch<'_>) -> String {
        let ports: Vec<String> = launch.connect_ports.iter().map(u16::to_string).collect();
        let mut text = format!(
            "acl bench_clients src {}\nacl bench_ports port {}\n",
            launch.clients,
            ports.join(" ")
        );
        if let Some(ip) = self.dns {
            let _ = writeln!(text, "dns_nameservers {ip}");
        }
        let mut allow = "http_access allow bench_clients bench_ports".to_owned();
        if let Some(file) = &self.basic_auth {
            let _ = writeln!(
                text,
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
                 auth_param basic credentialsttl 2 hours\n\
                 acl bench_users proxy_auth REQUIRED",
                file.display()
            );
            allow += " bench_users";
        }
        let _ = writeln!(text, "{allow}\nhttp_access deny all");
        text
    }
}

/// A running proxy, stopped when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    /// proxychains4 configuration that sends every connection through it.
    pub proxychains_conf: PathBuf,
    child: Guarded,
    /// Its stderr, where spliced prints its stats on SIGUSR1.
    log: PathBuf,
    /// spliced's JSON access log, which names each tunnel's plane (auto and
    /// packet only).
    access_log: Option<PathBuf>,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// For spliced auto and packet: every tunnel logged so far, in order,
    /// from the complete records of its JSON access log.
    pub fn tunnel_records(&self) -> Option<Vec<TunnelRecord>> {
        let text = fs::read_to_string(self.access_log.as_ref()?).ok()?;
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        Some(complete.lines().filter_map(TunnelRecord::parse).collect())
    }

    /// Waits (up to `limit`) until the access log holds at least `count`
    /// tunnel records, and returns them all; fewer when time ran out.
    /// spliced writes a record when a tunnel ends, a promoted one when the
    /// tc program has seen both FINs acknowledged (it looks once a second).
    pub fn wait_records(&self, count: usize, limit: Duration) -> Option<Vec<TunnelRecord>> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let records = self.tunnel_records()?;
            if records.len() >= count
                || std::time::Instant::now() >= deadline
                || child::interrupted()
            {
                return Some(records);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// spliced's counters now, from the line it logs on SIGUSR1
    /// (`stats: dataplane=… key=value …`); `None` for other proxies or when
    /// it does not answer within half a second.
    pub fn stats(&self) -> Option<BTreeMap<String, u64>> {
        const KEY: &str = "stats: dataplane=";
        let count = |text: &str| text.matches(KEY).count();
        let before = count(&fs::read_to_string(&self.log).unwrap_or_default());
        // SAFETY: kill(2) on our own child, which handles SIGUSR1.
        if unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGUSR1) } != 0 {
            return None;
        }
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(10));
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if count(&text) > before {
                let last = &text[text.rfind(KEY)?..];
                return Some(parse_stats(last.lines().next().unwrap_or_default()));
            }
        }
        None
    }

    /// spliced's `flow_control_copied_bytes` stat so far (asked for with
    /// SIGUSR1); `None` for other proxies or when it does not answer.
    pub fn flow_control_copied(&self) -> Option<u64> {
        self.stats()?.get("flow_control_copied_bytes").copied()
    }

    /// Stops it now.
    pub fn stop(mut self) {
        self.child.stop();
    }
}

/// The numeric `key=value` pairs of a stats line (JSON-escaped or not).
fn parse_stats(line: &str) -> BTreeMap<String, u64> {
    line.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Starts a proxy contender; the error is a one-line reason for the tables.
pub fn start(contender: Contender, launch: &Launch<'_>) -> Result<Proxy, String> {
    let name = format!("{}-{}", contender.id(), launch.tag);
    let dir = launch.dir.join(&name);
    fs::create_dir_all(&dir).map_err(|err| format!("creating {}: {err}", dir.display()))?;
    let log = dir.join("stderr.log");
    let access_log = contender.keeps_access_log().then(|| dir.join("access.log"));
    let (mut cmd, extra_log) = match contender {
        Contender::Direct => return Err("direct has no proxy".to_owned()),
        Contender::SplicePeek => {
            let conf = peek_conf(&dir, launch).map_err(|err| format!("{err:#}"))?;
            (spliced_peek_command(launch, &conf), None)
        }
        Contender::Sockmap
        | Contender::Splice
        | Contender::Copy
        | Contender::Packet
        | Contender::PacketEager
        | Contender::Auto
            if !launch.policy.is_plain() =>
        {
            let conf = policy_conf(&dir, launch).map_err(|err| format!("{err:#}"))?;
            (spliced_conf_command(contender, launch, &conf), None)
        }
        Contender::Sockmap
        | Contender::Splice
        | Contender::Copy
        | Contender::Packet
        | Contender::PacketEager
        | Contender::Auto => (spliced_command(contender, launch, &access_log), None),
        Contender::Squid => {
            if !child::on_path("squid") {
                return Err("squid is not installed (Debian package squid)".to_owned());
            }
            let conf = squid_conf(&dir, launch).map_err(|err| format!("{err:#}"))?;
            let conf = conf.to_string_lossy().into_owned();
            (
                placed(launch.netns, launch.cpu, &["squid", "-N", "-f", &conf]),
                Some(dir.join("cache.log")),
            )
        }
        Contender::Tinyproxy => {
            if !child::on_path("tinyproxy") {
                return Err("tinyproxy is not installed (Debian package tinyproxy)".to_owned());
            }
            let conf = tinyproxy_conf(&dir, launch).map_err(|err| format!("{err:#}"))?;
            let conf = conf.to_string_lossy().into_owned();
            (
                placed(launch.netns, launch.cpu, &["tinyproxy", "-d", "-c", &conf]),
                None,
            )
        }
    };
    let stderr =
        fs::File::create(&log).map_err(|err| format!("creating {}: {err}", log.display()))?;
    cmd.stdout(Stdio::null()).stderr(stderr);
    let mut child = Guarded::spawn(&mut cmd, name.clone()).map_err(|err| format!("{err:#}"))?;
    // Loading eBPF programs can take the verifier many seconds on a busy
    // machine; give them time to either listen or say why not.
    let limit = Duration::from_secs(match contender {
        Contender::Sockmap | Contender::Auto | Contender::Packet | Contender::PacketEager => 40,
        _ => 15,
    });
    if let Err(reason) = wait_listening(&mut child, launch.listen.port(), limit) {
        child.stop();
        let mut why = reason;
        for file in extra_log.iter().chain(std::iter::once(&log)) {
            let text = tail(file, 3);
            if !text.is_empty() {
                let _ = write!(why, ": {text}");
            }
        }
        return Err(why);
    }
    let proxychains_conf = dir.join("proxychains.conf");
    fs::write(&proxychains_conf, proxychains(launch.listen))
        .map_err(|err| format!("writing {}: {err}", proxychains_conf.display()))?;
    Ok(Proxy {
        addr: launch.listen,
        proxychains_conf,
        child,
        log,
        access_log,
    })
}

/// spliced with `contender`'s data plane; its access log goes to `access_log`
/// (JSON) if given, else nowhere.
fn spliced_command(
    contender: Contender,
    launch: &Launch<'_>,
    access_log: &Option<PathBuf>,
) -> std::process::Command {
    let spliced = launch.spliced.to_string_lossy();
    let listen = launch.listen.to_string();
    let ports = ports_list(launch.connect_ports);
    let plane = contender.plane().expect("a spliced contender");
    let log = access_log
        .as_ref()
        .map_or("/dev/null".into(), |path| path.to_string_lossy());
    let promote_after = contender.promote_after().map(|bytes| bytes.to_string());
    let mut argv: Vec<&str> = vec![
        &spliced,
        "--listen",
        &listen,
        "--connect-ports",
        &ports,
        "--dataplane",
        plane,
        "--access-log",
        &log,
        "--log-format",
        "json",
    ];
    if let Some(bytes) = &promote_after {
        argv.extend(["--promote-after", bytes]);
    }
    placed(launch.netns, launch.cpu, &argv)
}

/// The name in the ClientHello the setup benchmark sends through
/// [`Contender::SplicePeek`], which its rules splice.
pub const PEEK_SNI: &str = "echo.bench.test";

/// [`Contender::SplicePeek`]'s squid.conf: the built-in policy's clients
/// and ports, and Squid's peek-and-splice lines.
fn peek_conf(dir: &Path, launch: &Launch<'_>) -> Result<PathBuf> {
    let ports: Vec<String> = launch.connect_ports.iter().map(u16::to_string).collect();
    let text = format!(
        "http_port {listen}
         acl clients src {clients}
         acl ports port {ports}
         http_access allow clients ports
         http_access deny all
         acl step1 at_step SslBump1
         acl bench ssl::server_name {PEEK_SNI}
         ssl_bump peek step1
         ssl_bump splice bench
         ssl_bump terminate all
",
        listen = launch.listen,
        clients = launch.clients,
        ports = ports.join(" "),
    );
    let path = dir.join("squid.conf");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn spliced_peek_command(launch: &Launch<'_>, conf: &Path) -> std::process::Command {
    spliced_conf_command(Contender::Splice, launch, conf)
}

/// A spliced contender's squid.conf when its [`Policy`] is not the plain one.
fn policy_conf(dir: &Path, launch: &Launch<'_>) -> Result<PathBuf> {
    let text = format!(
        "http_port {}\n{}",
        launch.listen,
        launch.policy.lines(launch)
    );
    let path = dir.join("squid.conf");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// spliced with `contender`'s data plane and the squid.conf `conf`.
fn spliced_conf_command(
    contender: Contender,
    launch: &Launch<'_>,
    conf: &Path,
) -> std::process::Command {
    let spliced = launch.spliced.to_string_lossy();
    let conf = conf.to_string_lossy();
    let plane = contender.plane().expect("a spliced contender");
    let argv = [
        &*spliced,
        "-f",
        &conf,
        "--dataplane",
        plane,
        "--access-log",
        "/dev/null",
    ];
    placed(launch.netns, launch.cpu, &argv)
}

fn ports_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// proxychains4: strict chain through one HTTP proxy, quiet.
pub fn proxychains(proxy: SocketAddr) -> String {
    format!(
        "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n\
         [ProxyList]\nhttp {} {}\n",
        proxy.ip(),
        proxy.port()
    )
}

/// A minimal Squid 5 configuration: CONNECT and plain requests to our ports
/// from our clients, no cache, no access log, everything else in `dir`. Squid runs as root and
/// drops to the Debian `proxy` user, so `dir` is made world-writable.
fn squid_conf(dir: &Path, launch: &Launch<'_>) -> Result<PathBuf> {
    set_mode(dir, 0o777)?;
    let d = dir.display();
    let text = format!(
        "http_port {listen}\n\
         {policy}\
         cache deny all\n\
         access_log none\n\
         cache_log {d}/cache.log\n\
         pid_filename {d}/squid.pid\n\
         coredump_dir {d}\n\
         cache_effective_user proxy\n\
         visible_hostname spliced-bench\n\
         pinger_enable off\n\
         shutdown_lifetime 0 seconds\n",
        listen = launch.listen,
        policy = launch.policy.lines(launch),
    );
    let path = dir.join("squid.conf");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A minimal tinyproxy 1.11 configuration, foreground (`-d`).
fn tinyproxy_conf(dir: &Path, launch: &Launch<'_>) -> Result<PathBuf> {
    let mut text = format!(
        "Port {port}\nListen {ip}\nTimeout 600\nMaxClients 1024\nAllow {clients}\nLogLevel Error\n",
        port = launch.listen.port(),
        ip = launch.listen.ip(),
        clients = launch.clients,
    );
    for port in launch.connect_ports {
        let _ = writeln!(text, "ConnectPort {port}");
    }
    let path = dir.join("tinyproxy.conf");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_records_name_the_plane_and_the_promotion() {
        let promoted = TunnelRecord::parse(
            r#"{"ts":"2026-11-27T01:20:00.000Z","client":"127.0.0.1:40000","bytes_to_client":1039,"bytes_from_client":5000000,"dataplane":"packet","bytes_before_promotion":{"client_to_upstream":1100000,"upstream_to_client":0},"end":"closed"}"#,
        )
        .expect("a tunnel record");
        assert!(promoted.promoted());
        assert_eq!(promoted.bytes, 5_001_039);
        assert_eq!(promoted.before_promotion, Some((1_100_000, 0)));
        assert_eq!(promoted.client, "127.0.0.1:40000");
        let pumped = TunnelRecord::parse(
            r#"{"client":"127.0.0.1:40001","bytes_to_client":39,"bytes_from_client":37,"dataplane":"splice"}"#,
        )
        .expect("a tunnel record");
        assert!(!pumped.promoted());
        assert_eq!(pumped.before_promotion, None);
        assert!(TunnelRecord::parse(r#"{"client":"x","dataplane":null}"#).is_none());
        assert!(TunnelRecord::parse("not json").is_none());
    }

    #[test]
    fn stats_lines_parse_plain_and_json_escaped() {
        let stats = parse_stats(
            "[INFO] stats: dataplane=packet packet_promoted=12 packet_not_promoted=1 \
             packet_not_promoted_no_timestamps=1",
        );
        assert_eq!(stats["packet_promoted"], 12);
        assert_eq!(stats["packet_not_promoted_no_timestamps"], 1);
        assert!(!stats.contains_key("dataplane"));
        let json = parse_stats(r#"{"msg":"stats: dataplane=sockmap flow_control_copied_bytes=7"}"#);
        assert_eq!(json["flow_control_copied_bytes"], 7);
    }
}
