//! Three network namespaces (client — proxy — server) joined by veth pairs,
//! deleted when dropped (also on panic and ctrl-c).

use std::{fs, net::Ipv4Addr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use super::child::{run_bounded, run_cleanup};

/// Every namespace the benchmark makes is called `spb<PID><role>`.
const PREFIX: &str = "spb";
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<()> {
    run_bounded(Command::new("ip").args(args), IP_TIMEOUT).map(drop)
}

/// A network namespace that exists for the life of this value.
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// `ip netns add NAME`, loopback up, and a resolv.conf that points at
    /// nothing (`ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf), so
    /// nothing inside asks the machine's real DNS server.
    fn add(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        // From here on Drop deletes it, whatever fails next.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        let etc = format!("/etc/netns/{}", ns.name);
        fs::create_dir_all(&etc).with_context(|| format!("creating {etc}"))?;
        fs::write(
            format!("{etc}/resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .with_context(|| format!("writing {etc}/resolv.conf"))?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a shell command inside the namespace.
    fn sh(&self, script: &str) -> Result<()> {
        run_bounded(
            Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]),
            IP_TIMEOUT,
        )
        .map(drop)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

fn delete(name: &str) {
    // Not interruptible: this is the cleanup that ctrl-c must still do.
    if let Err(err) = run_cleanup(Command::new("ip").args(["netns", "del", name]), IP_TIMEOUT) {
        eprintln!("bench: could not delete network namespace {name}: {err:#}");
    }
    let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
}

/// client (10.77.1.2) — proxy (10.77.1.1 | 10.77.2.1) — server (10.77.2.2).
/// The proxy namespace also forwards IP between its two links, so that the
/// "direct" contender can reach the server through the same veth hops,
/// routed by the kernel instead of proxied.
pub struct Topology {
    pub client: Ns,
    pub proxy: Ns,
    pub server: Ns,
}

impl Topology {
    pub const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
    pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
    /// The client side network, for the proxies' access rules.
    pub const CLIENT_NET: &'static str = "10.77.1.0/24";

    pub fn new() -> Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let client = Ns::add(format!("{PREFIX}{pid}c"))?;
        let proxy = Ns::add(format!("{PREFIX}{pid}p"))?;
        let server = Ns::add(format!("{PREFIX}{pid}s"))?;
        link(
            (&client, &format!("{PREFIX}{pid}c1"), "10.77.1.2/24"),
            (&proxy, &format!("{PREFIX}{pid}p1"), "10.77.1.1/24"),
        )?;
        link(
            (&proxy, &format!("{PREFIX}{pid}p2"), "10.77.2.1/24"),
            (&server, &format!("{PREFIX}{pid}s2"), "10.77.2.2/24"),
        )?;
        proxy.sh("echo 1 > /proc/sys/net/ipv4/ip_forward")?;
        client.ip(&["route", "add", "10.77.2.0/24", "via", "10.77.1.1"])?;
        server.ip(&["route", "add", "10.77.1.0/24", "via", "10.77.2.1"])?;
        Ok(Self {
            client,
            proxy,
            server,
        })
    }
}

/// Creates a veth pair with one end in each namespace, addressed and up.
fn link(a: (&Ns, &str, &str), b: (&Ns, &str, &str)) -> Result<()> {
    ip(&[
        "link", "add", a.1, "netns", &a.0.name, "type", "veth", "peer", "name", b.1, "netns",
        &b.0.name,
    ])?;
    for (ns, dev, addr) in [a, b] {
        ns.ip(&["addr", "add", addr, "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Deletes namespaces left behind by a benchmark process that no longer
/// exists (killed with SIGKILL, say). Only names of our own pattern.
fn remove_stale() {
    let Ok(list) = run_bounded(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.strip_suffix(['c', 'p', 's']) else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: deleting stale network namespace {name} (process {pid} is gone)");
            delete(name);
        }
    }
}
