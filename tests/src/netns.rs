//! Network namespaces made by a test, as separate hosts joined by veth pairs.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// A network namespace that exists for the life of this value.
pub struct Netns {
    /// The name under /var/run/netns.
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command and fails the test if it fails.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Netns {
    /// Creates a namespace with loopback up and a resolver that answers nothing
    /// (`ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf), so programs in it
    /// never query the machine's real DNS server. The resolver is 127.0.0.1:53 of
    /// the namespace, where a test may start a [`crate::DnsStub`].
    pub fn new() -> Self {
        Self::with_prefix("spl")
    }

    /// [`Netns::new`] with a name that starts with `prefix`.
    pub fn with_prefix(prefix: &str) -> Self {
        let name = format!(
            "{prefix}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        let etc = format!("/etc/netns/{}", ns.name);
        fs::create_dir_all(&etc).expect("create /etc/netns dir");
        fs::write(
            format!("{etc}/resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("write resolv.conf");
        ns
    }

    /// Sets the namespace's default congestion control
    /// (`net.ipv4.tcp_congestion_control`), so a test never depends on the
    /// host's. A namespace may only pick from the host's
    /// `tcp_allowed_congestion_control` (reno and the host's default are always
    /// there): `name` is added to it first (see [`allow_congestion_control`]);
    /// the test fails, saying so, if it cannot be.
    pub fn set_default_congestion(&self, name: &str) {
        allow_congestion_control(name);
        let sysctl = format!("net.ipv4.tcp_congestion_control={name}");
        let output = self
            .command("sysctl")
            .args(["-q", "-w", &sysctl])
            .output()
            .expect("sysctl (Debian procps) must be installed");
        let allowed = fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default();
        assert!(
            output.status.success(),
            "sysctl -w {sysctl} in namespace {}: {} (this host allows namespaces only: {})",
            self.name,
            String::from_utf8_lossy(&output.stderr).trim(),
            allowed.trim()
        );
    }

    /// Sets the namespace's TCP buffer limits (`net.ipv4.tcp_rmem` and
    /// `tcp_wmem`) to the kernel's own defaults: a new namespace copies the
    /// host's, and how much a window can hold decides what a test sees.
    pub fn set_default_tcp_buffers(&self) {
        self.sysctl("net.ipv4.tcp_rmem=4096 131072 6291456");
        self.sysctl("net.ipv4.tcp_wmem=4096 16384 4194304");
    }

    /// Sets `setting` (`name=value`) with sysctl inside the namespace; fails
    /// the test if it cannot.
    pub fn sysctl(&self, setting: &str) {
        let output = self
            .command("sysctl")
            .args(["-q", "-w", setting])
            .output()
            .expect("sysctl (Debian procps) must be installed");
        assert!(
            output.status.success(),
            "sysctl -w {setting} in namespace {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Joins `self` and `other` with a veth pair: `self` gets `my_ip/24`, `other`
    /// gets `their_ip/24`; routes are the connected /24. Returns the names of
    /// the two ends (`self`'s, `other`'s).
    pub fn link(&self, other: &Netns, my_ip: Ipv4Addr, their_ip: Ipv4Addr) -> (String, String) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (mine, theirs) = (
            format!("va{}x{n}", std::process::id() % 100_000),
            format!("vb{}x{n}", std::process::id() % 100_000),
        );
        run(
            "ip",
            &[
                "link",
                "add",
                &mine,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                &theirs,
                "netns",
                &other.name,
            ],
        );
        self.ip(&["addr", "add", &format!("{my_ip}/24"), "dev", &mine]);
        self.ip(&["link", "set", &mine, "up"]);
        other.ip(&["addr", "add", &format!("{their_ip}/24"), "dev", &theirs]);
        other.ip(&["link", "set", &theirs, "up"]);
        (mine, theirs)
    }

    /// Adds a route in this namespace.
    pub fn route(&self, destination: &str, via: Ipv4Addr) {
        self.ip(&["route", "add", destination, "via", &via.to_string()]);
    }

    /// `nstat -az` counters of this namespace (a new namespace starts at 0).
    pub fn nstat(&self) -> std::collections::HashMap<String, u64> {
        let output = self
            .command("nstat")
            .args(["-az", "--json"])
            .env("NSTAT_HISTORY", "/dev/null")
            .output()
            .expect("nstat");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nstat JSON");
        json["kernel"]
            .as_object()
            .expect("nstat kernel counters")
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates
    /// stay in the namespace whichever thread uses them later.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter_named(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the namespace named `name`.
pub fn enter_named<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// Three hosts in a row: client — proxy — server, as on an egress node.
pub struct Topology {
    /// The client host, 10.77.1.2.
    pub client: Netns,
    /// The proxy host, 10.77.1.1 towards the client and 10.77.2.1 towards the server.
    pub proxy: Netns,
    /// The server host, 10.77.2.2.
    pub server: Netns,
    /// The veth ends between client and proxy: (client's, proxy's).
    pub client_link: (String, String),
    /// The veth ends between proxy and server: (proxy's, server's).
    pub server_link: (String, String),
}

impl Topology {
    /// Client address.
    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
    /// Proxy address as the client sees it.
    pub const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
    /// Proxy address as the server sees it.
    pub const PROXY_SERVER_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
    /// Server address.
    pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);

    /// Builds the three namespaces and the two veth links.
    pub fn new() -> Self {
        Self::with_prefix("spl")
    }

    /// [`Topology::new`] with namespace names that start with `prefix`.
    pub fn with_prefix(prefix: &str) -> Self {
        let (client, proxy, server) = (
            Netns::with_prefix(prefix),
            Netns::with_prefix(prefix),
            Netns::with_prefix(prefix),
        );
        let client_link = client.link(&proxy, Self::CLIENT_IP, Self::PROXY_IP);
        let server_link = proxy.link(&server, Self::PROXY_SERVER_SIDE_IP, Self::SERVER_IP);
        Self {
            client,
            proxy,
            server,
            client_link,
            server_link,
        }
    }

    /// Client address, IPv6 (after [`Topology::add_ipv6`]).
    pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 2);
    /// Proxy address as the client sees it, IPv6.
    pub const PROXY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1);
    /// Proxy address as the server sees it, IPv6.
    pub const PROXY_SERVER_SIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 1);
    /// Server address, IPv6.
    pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 2);

    /// Gives the four veth ends the `*_IP6` addresses (/64, no duplicate
    /// address detection, so they are usable at once).
    pub fn add_ipv6(&self) {
        let add = |ns: &Netns, ip: Ipv6Addr, dev: &str| {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        };
        add(&self.client, Self::CLIENT_IP6, &self.client_link.0);
        add(&self.proxy, Self::PROXY_IP6, &self.client_link.1);
        add(
            &self.proxy,
            Self::PROXY_SERVER_SIDE_IP6,
            &self.server_link.0,
        );
        add(&self.server, Self::SERVER_IP6, &self.server_link.1);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes `name` one a namespace may choose: only the initial namespace may
/// make a restricted algorithm its default (net/ipv4/tcp_cong.c,
/// `tcp_set_default_congestion_control`), and what is not in the host's
/// `tcp_allowed_congestion_control` is restricted — a stock host allows only
/// its own default (and reno). Widening the list changes no default and no
/// socket of the host; the algorithm's module is loaded first if it is one.
fn allow_congestion_control(name: &str) {
    const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    let allowed = fs::read_to_string(ALLOWED).unwrap_or_default();
    if allowed.split_whitespace().any(|a| a == name) {
        return;
    }
    // Built in, or already loaded, is fine: modprobe's failure is not ours.
    let _ = Command::new("modprobe").arg(format!("tcp_{name}")).output();
    let widened = format!("{} {name}", allowed.trim());
    if let Err(err) = fs::write(ALLOWED, &widened) {
        panic!("allowing congestion control {name} ({ALLOWED} ← {widened:?}): {err}");
    }
}
