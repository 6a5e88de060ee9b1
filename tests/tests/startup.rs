//! How spliced starts: default listeners, data plane selection and the fallback
//! when eBPF cannot load.

use std::{net::SocketAddr, time::Duration};

use spliced_tests::{
    netns::{Netns, Topology},
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

/// The start-up line says sockmap runs, and a loopback tunnel's record says
/// sockmap moved the bytes.
fn assert_sockmap_chosen_and_used(proxy: &Proxy, upstream: &Upstream) {
    assert!(
        proxy
            .stderr()
            .contains("data plane: sockmap (requested with --dataplane sockmap)"),
        "{}",
        proxy.stderr()
    );
    exchange_once(proxy, upstream);
    assert_eq!(proxy.wait_json_records(1)[0]["dataplane"], "sockmap");
}

/// `auto` attaches the packet plane's tc programs, says so, and promotes a
/// loopback tunnel past its default `--promote-after`, whatever the host's
/// congestion control (the namespaces' defaults differ).
#[test]
fn auto_picks_packet_and_says_so() {
    for congestion in ["bbr", "cubic"] {
        let ns = Netns::new();
        ns.set_default_congestion(congestion);
        let target: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let upstream = Upstream::start_in(&ns, target);
        let proxy = Proxy::start_in(&ns, &["--connect-ports", "8443", "--log-format", "json"]);
        assert!(
            proxy.stderr().contains(
                "data plane: packet (tc programs attached for the packet plane; --dataplane \
                 auto with packet on every path)"
            ),
            "{congestion}: {}",
            proxy.stderr()
        );
        assert_eq!(
            plane_of_tunnel(&proxy, Some(&ns), &upstream, target, 0),
            "packet",
            "{congestion}: {}",
            proxy.stderr()
        );
    }
}

/// The kernel check that runs before sockmap is used: where it fails, `auto`
/// says why and runs on splice, and `--dataplane sockmap` refuses to start.
#[test]
fn a_failed_kernel_check_keeps_sockmap_out() {
    let ns = Netns::new();
    ns.set_default_congestion("bbr");
    let target: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let upstream = Upstream::start_in(&ns, target);
    let proxy = Proxy::start_in(
        &ns,
        &[
            "--connect-ports",
            "8443",
            "--log-format",
            "json",
            "--auto-local",
            "sockmap",
            "--auto-network",
            "splice",
            "--test-hook",
            "fail-probe",
        ],
    );
    let stderr = proxy.stderr();
    assert!(
        stderr.contains(
            "data plane: splice (the kernel failed sockmap's start-up check: cb[0] is not \
             the skb's sequence number: after the client's last byte"
        ),
        "{stderr}"
    );
    assert_eq!(
        plane_of_tunnel(&proxy, Some(&ns), &upstream, target, 0),
        "splice"
    );
    let output = std::process::Command::new(spliced_tests::proxy::spliced_bin())
        .args(["--dataplane", "sockmap", "--listen", "127.0.0.1:0"])
        .args(["--test-hook", "fail-probe"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--dataplane sockmap: the kernel failed sockmap's start-up check"),
        "{stderr}"
    );
    // Without the hook the same build passes the check.
    let plain = Proxy::start(&["--dataplane", "sockmap"]);
    assert!(
        plain.stderr().contains("data plane: sockmap (requested"),
        "{}",
        plain.stderr()
    );
}

/// The release build, the product and the image's binary, carries no test
/// hook: `--test-hook` is an unknown argument and its eBPF object has none of
/// the test-only globals, which the test build's has.
#[test]
fn the_release_build_has_no_test_hooks() {
    let release = spliced_tests::proxy::release_bin();
    let output = std::process::Command::new(&release)
        .args(["--test-hook", "no-rcvlowat-kick", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unexpected argument '--test-hook'"),
        "{stderr}"
    );
    let globals = ["REDIRECT_EMPTY_SKBS", "TRIM_OVERLAPS", "TRIM_STEPS"];
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    };
    let release_bytes = std::fs::read(&release).unwrap();
    let test_bytes = std::fs::read(spliced_tests::proxy::spliced_bin()).unwrap();
    for global in globals {
        assert!(
            !contains(&release_bytes, global),
            "{global} is in {}",
            release.display()
        );
        assert!(
            contains(&test_bytes, global),
            "{global} is not in the test build: the check above sees nothing"
        );
    }
    assert!(!contains(&release_bytes, "no-rcvlowat-kick"));
    // And its eBPF object is the one that has to pass the verifier: a
    // release build's code can differ from the test build's.
    let proxy = Proxy::start_with_binary(
        &release,
        &["--dataplane", "sockmap", "--access-log", "/dev/null"],
    );
    assert!(
        proxy
            .stderr()
            .contains("data plane: sockmap (requested with --dataplane sockmap)"),
        "{}",
        proxy.stderr()
    );
}

/// Runs one tunnel from `client` (a namespace, or this process's own one) through
/// `proxy` to `upstream` and returns the data plane its record names.
fn plane_of_tunnel(
    proxy: &Proxy,
    client: Option<&Netns>,
    upstream: &Upstream,
    target: SocketAddr,
    records_before: usize,
) -> String {
    // Long enough to pass the packet plane's default `--promote-after` (1 MiB)
    // with most of its bytes still to come when the cut-over ends (on
    // loopback a few MiB pass in a millisecond).
    let h = Header {
        up: 64 << 20,
        down: 48 << 20,
        seed: 3,
        mode: Mode::Concurrent,
    };
    let proxy_addr = proxy.addr;
    let run = move || exchange(open_tunnel(proxy_addr, &target.to_string()), h, false);
    let received = match client {
        Some(ns) => ns.enter(run),
        None => run(),
    };
    assert_eq!(received.received, Ok(h.down));
    assert_eq!(upstream.result().received, Ok(h.up));
    let records = proxy.wait_json_records(records_before + 1);
    records[records_before]["dataplane"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `auto` picks per tunnel by its path: packet on both kinds by default (a
/// tunnel past `--promote-after` that qualifies is promoted), whatever the proxy's
/// namespace's congestion control; `--auto-local` / `--auto-network` change
/// each choice on its own.
#[test]
fn auto_picks_each_tunnels_plane_by_its_path() {
    let topology = Topology::new();
    let remote_target = SocketAddr::from((Topology::SERVER_IP, 8443));
    let local_target: SocketAddr = "127.0.0.1:8444".parse().unwrap();
    let remote = Upstream::start_in(&topology.server, remote_target);
    let local = Upstream::start_in(&topology.proxy, local_target);
    // A client across veth (MSS 1448) to an upstream on the proxy's `lo`
    // (MSS 65483) does not qualify for promotion and stays on splice.
    let cases: [(&str, &[&str], [&str; 3]); 4] = [
        ("bbr", &[], ["packet", "packet", "splice"]),
        ("reno", &[], ["packet", "packet", "splice"]),
        (
            "bbr",
            &["--auto-local", "copy", "--auto-network", "sockmap"],
            ["copy", "sockmap", "sockmap"],
        ),
        (
            "bbr",
            &["--auto-local", "splice", "--auto-network", "copy"],
            ["splice", "copy", "copy"],
        ),
    ];
    for (congestion, flags, [local_to_local, remote_to_remote, remote_to_local]) in cases {
        // A namespace may only pick from `tcp_allowed_congestion_control`,
        // which has reno where cubic is built as a module.
        topology.proxy.set_default_congestion(congestion);
        let mut args = vec![
            "--connect-ports",
            "8443,8444",
            "--listen",
            "10.77.1.1:3128",
            "--log-format",
            "json",
        ];
        args.extend(flags);
        let proxy = Proxy::start_in(&topology.proxy, &args);
        // The proxy listens on the client-side address; a client on the
        // proxy's own host reaches it there over `lo`.
        let seen = [
            plane_of_tunnel(&proxy, Some(&topology.proxy), &local, local_target, 0),
            plane_of_tunnel(&proxy, Some(&topology.client), &remote, remote_target, 1),
            plane_of_tunnel(&proxy, Some(&topology.client), &local, local_target, 2),
        ];
        assert_eq!(
            seen,
            [local_to_local, remote_to_remote, remote_to_local],
            "{congestion} {flags:?}: local → local, client → server, client → the proxy's host\n{}",
            proxy.stderr()
        );
    }
}

#[test]
fn auto_flags_need_auto() {
    let output = std::process::Command::new(spliced_tests::proxy::spliced_bin())
        .args(["--dataplane", "splice", "--auto-local", "copy"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--auto-local applies only to --dataplane auto"),
        "{stderr}"
    );
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
        stderr.contains("data plane: splice (packet plane unavailable"),
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
        &[
            "--dataplane",
            "sockmap",
            "--connect-ports",
            &port,
            "--log-format",
            "json",
        ],
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
