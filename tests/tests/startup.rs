//! How spliced starts: default listeners, data plane selection and the fallback
//! when eBPF cannot load.

use std::time::Duration;

use spliced_tests::{
    netns::Netns,
    open_tunnel,
    upstream::{exchange, Header},
    wait_until, Mode, Proxy, Upstream,
};

/// The capabilities eBPF needs, dropped from the bounding set so even root lacks them.
const WITHOUT_BPF: &[&str] = &[
    "capsh",
    "--drop=cap_bpf,cap_perfmon,cap_net_admin,cap_sys_admin",
    "--",
];

fn exchange_once(proxy: &Proxy, upstream: &Upstream) {
    let h = Header {
        up: 3_000_000,
        down: 2_000_000,
        seed: 1,
        mode: Mode::Concurrent,
    };
    let client = exchange(
        open_tunnel(proxy.addr, &upstream.addr.to_string()),
        h,
        false,
    );
    assert_eq!(client.received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up));
}

/// The start-up line names sockmap, and a tunnel's record says it moved the bytes.
fn assert_sockmap_chosen_and_used(proxy: &Proxy, upstream: &Upstream) {
    assert!(
        proxy
            .stderr()
            .contains("data plane: sockmap (eBPF programs loaded"),
        "{}",
        proxy.stderr()
    );
    exchange_once(proxy, upstream);
    assert_eq!(proxy.wait_json_records(1)[0]["dataplane"], "sockmap");
}

#[test]
fn auto_picks_sockmap_and_says_so() {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let proxy = Proxy::start(&["--connect-ports", &port, "--log-format", "json"]);
    assert_sockmap_chosen_and_used(&proxy, &upstream);
}

#[test]
fn auto_falls_back_to_splice_without_bpf_privileges() {
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let proxy = Proxy::start_wrapped(
        WITHOUT_BPF,
        &["--connect-ports", &port, "--log-format", "json"],
    );
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("data plane: splice (eBPF unavailable"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("data plane:").count(),
        1,
        "said more than once: {stderr}"
    );
    exchange_once(&proxy, &upstream);
    assert_eq!(proxy.wait_json_records(1)[0]["dataplane"], "splice");
}

/// The capabilities the DaemonSet grants (deploy/kubernetes): with exactly these,
/// and no others, the eBPF programs load and tunnels are spliced.
const DAEMONSET_CAPS: &[&str] = &[
    "cap_bpf",
    "cap_net_admin",
    "cap_perfmon",
    "cap_sys_resource",
];

#[test]
fn the_daemonset_capabilities_are_enough_for_sockmap() {
    let all_caps = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").unwrap();
    let last: u32 = all_caps.trim().parse().unwrap();
    // Drop every capability from the bounding set except the DaemonSet's.
    let keep: Vec<u32> = DAEMONSET_CAPS
        .iter()
        .map(|name| {
            let output = std::process::Command::new("capsh")
                .arg(format!("--explain={name}"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.split(|c: char| !c.is_ascii_digit())
                .find_map(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("capsh --explain={name}: {text}"))
        })
        .collect();
    let drop: Vec<String> = (0..=last)
        .filter(|c| !keep.contains(c))
        .map(|c| c.to_string())
        .collect();
    let drop_arg = format!("--drop={}", drop.join(","));
    let upstream = Upstream::start();
    let port = upstream.addr.port().to_string();
    let proxy = Proxy::start_wrapped(
        &["capsh", &drop_arg, "--"],
        &["--connect-ports", &port, "--log-format", "json"],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let effective = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap()
        .to_owned();
    let mask = u64::from_str_radix(effective.split_whitespace().nth(1).unwrap(), 16).unwrap();
    // This machine's root has no CAP_SYS_RESOURCE (only needed on kernels older
    // than 5.11, for RLIMIT_MEMLOCK): expect what the bounding set allows.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = own
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let bounding = u64::from_str_radix(&bounding, 16).unwrap();
    let expected: u64 = keep.iter().map(|c| 1u64 << c).sum::<u64>() & bounding;
    assert_eq!(
        mask, expected,
        "spliced runs with other capabilities than the DaemonSet's: {effective}"
    );
    assert_sockmap_chosen_and_used(&proxy, &upstream);
}

#[test]
fn explicit_sockmap_without_privileges_refuses_to_start() {
    let script = format!(
        "exec '{}' --dataplane sockmap --listen 127.0.0.1:0",
        spliced_tests::proxy::spliced_bin().display()
    );
    let output = std::process::Command::new(WITHOUT_BPF[0])
        .args(&WITHOUT_BPF[1..])
        .args(["-c", &script])
        .output()
        .expect("capsh (Debian libcap2-bin) must be installed");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("eBPF") || stderr.contains("loading"),
        "{stderr}"
    );
}

#[test]
fn default_listeners_are_ipv4_and_ipv6_on_3128() {
    // In a namespace of its own, so port 3128 is free whatever else runs.
    let ns = Netns::new();
    let mut child = ns
        .command(spliced_tests::proxy::spliced_bin().to_str().unwrap())
        .args(["--access-log", "/dev/null"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ok = wait_until(Duration::from_secs(10), || {
        ns.enter(|| {
            std::net::TcpStream::connect("127.0.0.1:3128").is_ok()
                && std::net::TcpStream::connect("[::1]:3128").is_ok()
        })
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "spliced did not listen on 0.0.0.0:3128 and [::]:3128");
}
