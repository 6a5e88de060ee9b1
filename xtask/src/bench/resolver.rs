//! The DNS server of the name-target setup cases: dnsmasq on a loopback
//! address of its own, answering [`BENCH_NAME`] with 127.0.0.1 (TTL one hour,
//! so the proxies' caches stay warm) and nothing else.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    child::{self, Guarded},
    setup_rate::BENCH_NAME,
};

/// Where it listens (port 53: Squid's `dns_nameservers` takes no port).
pub const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);

/// A running dnsmasq, stopped when dropped.
pub struct Resolver {
    _child: Guarded,
}

impl Resolver {
    /// Starts it and waits (up to 5 s) until it answers.
    pub fn start(dir: &Path) -> Result<Self, String> {
        if !child::on_path("dnsmasq") {
            return Err("dnsmasq is not installed (Debian package dnsmasq-base)".to_owned());
        }
        let log = dir.join("dnsmasq.log");
        let stderr = std::fs::File::create(&log).map_err(|err| format!("{err}"))?;
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--local-ttl=3600",
        ])
        .arg(format!("--listen-address={RESOLVER_IP}"))
        .arg(format!("--address=/{BENCH_NAME}/127.0.0.1"))
        .stdout(Stdio::null())
        .stderr(stderr);
        let child = Guarded::spawn(&mut cmd, "dnsmasq").map_err(|err| format!("{err:#}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if answers() {
                return Ok(Self { _child: child });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "dnsmasq did not answer on {RESOLVER_IP}:53: {}",
            child::tail(&log, 3)
        ))
    }
}

/// Whether the resolver answers an A query for [`BENCH_NAME`] with 127.0.0.1.
fn answers() -> bool {
    let mut query = vec![0x5b, 0x01, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in BENCH_NAME.split('.') {
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    if socket
        .send_to(&query, SocketAddr::from((RESOLVER_IP, 53)))
        .is_err()
    {
        return false;
    }
    let mut answer = [0u8; 512];
    matches!(socket.recv(&mut answer), Ok(n) if n >= 4 && answer[n - 4..n] == [127, 0, 0, 1])
}
