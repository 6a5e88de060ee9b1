//! The image `cargo xtask image` built, run by podman the way the DaemonSet
//! runs it (see `spliced_tests::image`): host network (a namespace of the
//! test stands for the node), the ConfigMap's squid.conf and a bpffs as
//! volumes, `drop: [ALL]` plus the manifest's capabilities, no_new_privs, a
//! read-only root, the admin port for the probes. Through it: the seed
//! scenario (the real curl with `HTTPS_PROXY` to a TLS origin, the Squid line
//! on the container's stdout), `/readyz`, SIGTERM with a tunnel open, the data
//! plane of the start-up line, and the data plane with fewer capabilities.
//!
//! Where the host cannot give a capability the manifest adds (this machine's
//! root has no CAP_SYS_RESOURCE), it is left out and the test says BLOCKED for it.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};
use spliced_tests::{
    bpffs::Bpffs,
    image::{self, podman_ok, DaemonSetContainer, RunAs, RunningContainer},
    netns::Topology,
    open_tunnel,
    planes::{assert_closed_on, closed_by_plane},
    proxy::{http_get, release_bin},
    tls::{curl, TlsOrigin},
    upstream::{exchange, Header},
    wait_until, Mode, Upstream,
};

const MIB: usize = 1 << 20;
/// The TLS origin's address (port 443: squid.conf allows CONNECT only there).
const ORIGIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Topology::SERVER_IP), 443);
/// A second server address for plain tunnels, beside the TLS origin.
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 3);
/// squid.conf's `http_port`.
const HTTP_PORT: u16 = 3128;
/// The DaemonSet's terminationGracePeriodSeconds.
const GRACE: Duration = Duration::from_secs(45);
/// How long podman may take to start the container (a loaded machine).
const START: Duration = Duration::from_secs(60);
/// The start-up line of the packet plane.
const PACKET: &str = "data plane: packet (tc programs attached for the packet plane";
/// The start-up line of the fallback.
const SPLICE: &str = "data plane: splice (packet plane unavailable (";

fn proxy_addr() -> SocketAddr {
    SocketAddr::from((Topology::PROXY_IP, HTTP_PORT))
}

/// `GET path` on the admin listener from the node's namespace (the kubelet's
/// view): the body, or the error.
fn admin_get(topology: &Topology, port: u16, path: &'static str) -> Result<String, String> {
    let admin = SocketAddr::from((Topology::PROXY_IP, port));
    topology
        .proxy
        .enter(move || http_get(admin, path).map_err(|err| err.to_string()))
}

/// Says BLOCKED for what the manifest adds and this host cannot give.
fn report_unavailable(container: &DaemonSetContainer) {
    if !container.unavailable.is_empty() {
        eprintln!(
            "BLOCKED: the DaemonSet adds {:?}, which this host's bounding set lacks \
             (podman cannot give it); run without it (SYS_RESOURCE only raises \
             RLIMIT_MEMLOCK on kernels < 5.11)",
            container.unavailable
        );
    }
}

/// Another address `ip` on the server host with an [`Upstream`] on port 443.
fn echo_upstream(topology: &Topology, ip: Ipv4Addr) -> Upstream {
    topology.server.ip(&[
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        &topology.server_link.1,
    ]);
    Upstream::start_in(&topology.server, SocketAddr::from((ip, 443)))
}

/// A tunnel from the client host through the container to `ip`, exact both ways.
fn tunnel_works(
    topology: &Topology,
    ip: Ipv4Addr,
    upstream: &Upstream,
    container: &RunningContainer,
) {
    let stream = topology
        .client
        .enter(move || open_tunnel(proxy_addr(), &format!("{ip}:443")));
    let header = Header {
        up: MIB as u64,
        down: 2 * MIB as u64,
        seed: 11,
        mode: Mode::Concurrent,
    };
    assert_eq!(
        exchange(stream, header, false).received,
        Ok(header.down),
        "{}",
        container.stderr()
    );
    assert_eq!(upstream.result().received, Ok(header.up));
}

#[test]
fn image_holds_the_product_build_and_the_runtime_only() {
    let image = image::image();
    // The binary is the product build (cargo xtask test passes it as
    // SPLICED_RELEASE_BIN), byte for byte.
    let output = image::run_once("/usr/bin/sha256sum", &["/usr/local/bin/spliced"]);
    let in_image = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let release = std::fs::read(release_bin()).expect("SPLICED_RELEASE_BIN");
    let expected: String = Sha256::digest(&release)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        in_image,
        expected,
        "the image's spliced is not {}",
        release_bin().display()
    );

    // Entrypoint and command of the Dockerfile; the size.
    let inspect = podman_ok(&["image", "inspect", &image]);
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/spliced"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["-f", "/etc/spliced/squid.conf"])
    );
    let size = inspect[0]["Size"].as_u64().unwrap();
    eprintln!("image {image}: {size} bytes");
    // debian:bookworm-slim is ~75 MB, ca-certificates and spliced add ~10 MB.
    assert!(size < 150_000_000, "the image is {size} bytes");

    // Only Debian's minimal base (perl-base is Essential, as in
    // bookworm-slim) and ca-certificates: no build tools, no perl.
    let output = image::run_once(
        "/usr/bin/dpkg-query",
        &["--show", "--showformat=${Package}\\n"],
    );
    let packages = String::from_utf8_lossy(&output.stdout).into_owned();
    let packages: Vec<&str> = packages.lines().collect();
    eprintln!("{} Debian packages in the image", packages.len());
    assert!(packages.contains(&"ca-certificates"), "{packages:?}");
    for absent in [
        "perl",
        "gcc",
        "gcc-12",
        "cpp",
        "make",
        "cargo",
        "rustc",
        "curl",
        "llvm-22-dev",
    ] {
        assert!(
            !packages.contains(&absent),
            "{absent} in the image: {packages:?}"
        );
    }
}

/// The seed scenario through the DaemonSet's container, its probes, its data
/// plane, and SIGTERM with a tunnel open.
#[test]
fn daemonset_container_serves_the_seed_and_drains_on_sigterm() {
    let topology = Topology::new();
    let bpffs = Bpffs::mount();
    let dir = tempfile::tempdir().unwrap();
    let seccomp = image::runtime_default_seccomp(dir.path());
    let spec = DaemonSetContainer::render(Topology::PROXY_IP, bpffs.path());
    report_unavailable(&spec);
    let origin = TlsOrigin::start_in(&topology.server, ORIGIN, "IP:10.77.2.2");
    let body = origin.serve_random_file("body.bin", 3 * MIB);
    let upstream = echo_upstream(&topology, ECHO_IP);

    let mut pod = spec.run(&topology.proxy, &image::unique_name("seed"), &seccomp, None);
    let mut readyz = Err(String::new());
    let ready = wait_until(START, || {
        readyz = admin_get(&topology, spec.admin_port, "/readyz");
        readyz.as_deref() == Ok("ready\n") || pod.has_exited()
    });
    assert!(
        ready && !pod.has_exited(),
        "/readyz: {readyz:?}\n{}",
        pod.stderr()
    );
    eprintln!(
        "ready {:.2} s after `podman run`",
        pod.started.elapsed().as_secs_f64()
    );
    pod.wait_started(START);
    assert_eq!(
        admin_get(&topology, spec.admin_port, "/healthz").as_deref(),
        Ok("ok\n")
    );

    // The data plane of the start-up line: the packet plane, its maps pinned
    // under --packet-state-dir on the node's bpffs.
    let line = pod.data_plane_line();
    eprintln!("capabilities {:?}: {line}", spec.capabilities);
    assert!(line.contains(PACKET), "{line}");
    let pinned = std::fs::read_dir(bpffs.path().join("spliced"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .any(|part| part.path().join("flows").exists());
    assert!(pinned, "nothing pinned under the bpffs volume");

    // The seed: curl with HTTPS_PROXY (both spellings) fetches the file.
    let downloads = tempfile::tempdir().unwrap();
    for (i, https_proxy) in [format!("http://{}", proxy_addr()), proxy_addr().to_string()]
        .iter()
        .enumerate()
    {
        let out = downloads.path().join(format!("out{i}.bin"));
        let output = curl(
            topology.client.command("curl"),
            https_proxy,
            &origin.certificate(),
            &format!("https://{}/body.bin", Topology::SERVER_IP),
            &out,
        );
        assert!(
            output.status.success(),
            "curl: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            pod.stderr()
        );
        assert!(
            std::fs::read(&out).unwrap() == body,
            "the fetched file differs"
        );
    }
    // The Squid lines on the container's stdout.
    let lines = pod.wait_stdout_lines(2);
    let tunnel = format!(" {} TCP_TUNNEL/200 ", Topology::CLIENT_IP);
    let rest = format!(" CONNECT {ORIGIN} - HIER_DIRECT/{} -", Topology::SERVER_IP);
    let seed_lines = lines
        .iter()
        .filter(|l| l.contains(&tunnel) && l.ends_with(&rest))
        .count();
    assert_eq!(seed_lines, 2, "{lines:#?}");
    // Which plane they ran on: /metrics.
    let admin = SocketAddr::from((Topology::PROXY_IP, spec.admin_port));
    let by_plane = closed_by_plane(admin, Some(&topology.proxy.name));
    eprintln!("tunnels closed by plane: {by_plane:?}");
    assert!(
        by_plane.get("packet").copied().unwrap_or(0) >= 2,
        "{by_plane:?}"
    );

    // SIGTERM with a tunnel open: not ready any more, no new clients, the
    // open tunnel still carries its bytes, and out within the grace period.
    let stream = topology
        .client
        .enter(|| open_tunnel(proxy_addr(), &format!("{ECHO_IP}:443")));
    pod.signal("TERM");
    let draining = wait_until(Duration::from_secs(20), || {
        admin_get(&topology, spec.admin_port, "/readyz").as_deref() != Ok("ready\n")
    });
    assert!(draining, "/readyz still ready after SIGTERM");
    let refused = wait_until(Duration::from_secs(20), || {
        topology
            .client
            .enter(|| TcpStream::connect_timeout(&proxy_addr(), Duration::from_secs(2)).is_err())
    });
    assert!(refused, "the listener still accepts after SIGTERM");
    let header = Header {
        up: MIB as u64,
        down: 2 * MIB as u64,
        seed: 5,
        mode: Mode::Concurrent,
    };
    assert_eq!(exchange(stream, header, false).received, Ok(header.down));
    assert_eq!(upstream.result().received, Ok(header.up));
    let (status, took) = pod
        .wait_exit(GRACE)
        .unwrap_or_else(|| panic!("still running {GRACE:?} after SIGTERM:\n{}", pod.stderr()));
    assert!(status.success(), "{status}\n{}", pod.stderr());
    eprintln!(
        "exited {:.2} s after the drained tunnel ended; last lines:\n{}",
        took.as_secs_f64(),
        pod.stdout_lines().join("\n")
    );
}

/// The data plane each capability set gets, from the start-up line; every
/// container serves a tunnel. Without BPF, NET_ADMIN or PERFMON it runs on
/// splice and says why.
#[test]
fn data_plane_per_capability_set() {
    let topology = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let seccomp = image::runtime_default_seccomp(dir.path());
    let manifest: Vec<String> = {
        let bpffs = Bpffs::mount();
        let spec = DaemonSetContainer::render(Topology::PROXY_IP, bpffs.path());
        report_unavailable(&spec);
        spec.capabilities.clone()
    };
    let without =
        |cap: &str| -> Vec<String> { manifest.iter().filter(|c| *c != cap).cloned().collect() };
    let matrix: [(String, Vec<String>, &str); 5] = [
        ("the manifest's".into(), manifest.clone(), PACKET),
        ("without BPF".into(), without("BPF"), SPLICE),
        ("without NET_ADMIN".into(), without("NET_ADMIN"), SPLICE),
        // The verifier refuses the tc programs without PERFMON (Linux 6.18).
        ("without PERFMON".into(), without("PERFMON"), SPLICE),
        ("none".into(), Vec::new(), SPLICE),
    ];
    let mut report = Vec::new();
    for (i, (label, caps, expected)) in matrix.into_iter().enumerate() {
        let ip = Ipv4Addr::new(10, 77, 2, 10 + i as u8);
        let upstream = echo_upstream(&topology, ip);
        let bpffs = Bpffs::mount();
        let spec = DaemonSetContainer::render(Topology::PROXY_IP, bpffs.path());
        let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut pod = spec.run(
            &topology.proxy,
            &image::unique_name("caps"),
            &seccomp,
            Some(&caps),
        );
        pod.wait_started(START);
        let line = pod.data_plane_line();
        assert!(line.contains(expected), "{label} {caps:?}: {line}");
        tunnel_works(&topology, ip, &upstream, &pod);
        // A splice row's tunnel ran on splice, from /metrics (the seed's log
        // format has no plane). A packet row's 3 MiB tunnel may end before
        // promotion, on the packet plane's own splice pump, so only the seed
        // test (which sees `packet`) speaks for that plane.
        if expected == SPLICE {
            assert_closed_on(
                SocketAddr::from((Topology::PROXY_IP, spec.admin_port)),
                Some(&topology.proxy.name),
                "splice",
                1,
                || format!("{label}: {}", pod.stderr()),
            );
        }
        report.push(format!(
            "{label} {caps:?} (started in {:.2} s): {}",
            started.elapsed().as_secs_f64(),
            line.split("] ").nth(1).unwrap_or(&line)
        ));
        pod.signal("TERM");
        let exited = pod.wait_exit(GRACE);
        assert!(
            exited.is_some_and(|(status, _)| status.success()),
            "{label}: {exited:?}\n{}",
            pod.stderr()
        );
    }
    // The manifest's capabilities under podman 4.3's own seccomp profile,
    // which allows bpf only with CAP_SYS_ADMIN: splice, and why.
    let bpffs = Bpffs::mount();
    let spec = DaemonSetContainer::render(Topology::PROXY_IP, bpffs.path());
    for (label, how, expected) in [
        (
            "the manifest's, podman's default seccomp profile",
            RunAs {
                capabilities: None,
                seccomp: None,
                privileged: false,
            },
            SPLICE,
        ),
        (
            "--privileged (variants/privileged)",
            RunAs {
                capabilities: None,
                seccomp: None,
                privileged: true,
            },
            PACKET,
        ),
    ] {
        let mut pod = spec.run_as(&topology.proxy, &image::unique_name("caps"), how);
        pod.wait_started(START);
        let line = pod.data_plane_line();
        assert!(line.contains(expected), "{label}: {line}");
        report.push(format!(
            "{label}: {}",
            line.split("] ").nth(1).unwrap_or(&line)
        ));
    }
    eprintln!("capability matrix:\n{}", report.join("\n"));
}

/// Removes a `podman kube play` pod when dropped, whatever happened.
struct PlayedPod(String);

impl Drop for PlayedPod {
    fn drop(&mut self) {
        let _ = image::podman()
            .args(["pod", "rm", "--force", "--time", "0", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `podman kube play` of the pod the DaemonSet renders, with what a kubelet
/// would fill in: the downward API's pod IP as a value, the image, the
/// RuntimeDefault seccomp profile as a Localhost one, the node's bpffs as the
/// test's own, the ConfigMap given alongside.
#[test]
fn kube_play_runs_the_daemonset_pod() {
    let image = image::image();
    let topology = Topology::new();
    let bpffs = Bpffs::mount();
    let dir = tempfile::tempdir().unwrap();
    let seccomp = image::runtime_default_seccomp(dir.path());
    let profile = seccomp.file_name().unwrap().to_str().unwrap().to_owned();
    let spec = DaemonSetContainer::render(Topology::PROXY_IP, bpffs.path());
    report_unavailable(&spec);

    let name = image::unique_name("kube");
    let mut pod_spec = spec.pod_spec.clone();
    for container in pod_spec["containers"].as_array_mut().unwrap() {
        if container["name"] != "spliced" {
            continue;
        }
        container["image"] = image.clone().into();
        container["imagePullPolicy"] = "Never".into();
        container["env"] = spec
            .env
            .iter()
            .map(|(name, value)| serde_json::json!({ "name": name, "value": value }))
            .collect();
        container["securityContext"]["capabilities"]["add"] = spec.capabilities.clone().into();
        // podman 4.3 does not expand `$(POD_IP)` in args (a kubelet does).
        container["args"] = spec.args.clone().into();
        // podman 4.3 refuses port mappings on the host network ("PortMappings
        // can only be used with Bridge or slirp4netns networking"); there they
        // only tell the scheduler, so they go, and the probes name the number.
        let object = container.as_object_mut().unwrap();
        object.remove("ports");
        for probe in ["readinessProbe", "livenessProbe"] {
            if let Some(get) = object.get_mut(probe).and_then(|p| p.get_mut("httpGet")) {
                get["port"] = spec.admin_port.into();
            }
        }
    }
    for volume in pod_spec["volumes"].as_array_mut().unwrap() {
        if volume["hostPath"]["path"] == "/sys/fs/bpf" {
            volume["hostPath"]["path"] = bpffs.path().to_str().unwrap().into();
        }
    }
    pod_spec["securityContext"]["seccompProfile"] =
        serde_json::json!({ "type": "Localhost", "localhostProfile": profile });
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "annotations": {
                "seccomp.security.alpha.kubernetes.io/pod": format!("localhost/{profile}"),
            },
        },
        "spec": pod_spec,
    });
    let pod_file = dir.path().join("pod.json");
    std::fs::write(&pod_file, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
    let config_map = dir.path().join("configmap.json");
    assert_eq!(spec.config_maps.len(), 1);
    std::fs::write(
        &config_map,
        serde_json::to_vec(&spec.config_maps[0]).unwrap(),
    )
    .unwrap();
    // kube play has no --ulimit: the same limits as podman run, from a
    // containers.conf of the test's own.
    let ulimits: Vec<String> = image::ulimits()
        .chunks(2)
        .map(|flag| format!("{:?}", flag[1]))
        .collect();
    let containers_conf = dir.path().join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!("[containers]\ndefault_ulimits = [{}]\n", ulimits.join(", ")),
    )
    .unwrap();

    let _played = PlayedPod(name.clone());
    let started = Instant::now();
    let output = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topology.proxy.name))
        .arg("--")
        .arg("podman")
        .args(image::PODMAN_FLAGS)
        .args(["kube", "play", "--configmap"])
        .arg(&config_map)
        .arg("--seccomp-profile-root")
        .arg(dir.path())
        .arg(&pod_file)
        .env("CONTAINERS_CONF", &containers_conf)
        .output()
        .expect("podman kube play");
    assert!(
        output.status.success(),
        "podman kube play: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let container = format!("{name}-spliced");
    let logs = || {
        let output = image::podman()
            .args(["logs", &container])
            .output()
            .expect("podman logs");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let ready = wait_until(START, || {
        admin_get(&topology, spec.admin_port, "/readyz").as_deref() == Ok("ready\n")
    });
    assert!(ready, "the played pod is not ready:\n{}", logs().1);
    eprintln!(
        "kube play: ready {:.2} s after `podman kube play`",
        started.elapsed().as_secs_f64()
    );
    let line = logs()
        .1
        .lines()
        .find(|l| l.contains("data plane:"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("kube play: {line}");
    assert!(line.contains(PACKET), "{line}\n{}", logs().1);

    // The seed through it, and its Squid line in the container's log.
    let origin = TlsOrigin::start_in(&topology.server, ORIGIN, "IP:10.77.2.2");
    let body = origin.serve_random_file("body.bin", MIB);
    let out = dir.path().join("out.bin");
    let output = curl(
        topology.client.command("curl"),
        &proxy_addr().to_string(),
        &origin.certificate(),
        &format!("https://{}/body.bin", Topology::SERVER_IP),
        &out,
    );
    assert!(
        output.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        logs().1
    );
    assert!(std::fs::read(&out).unwrap() == body);
    let logged = wait_until(Duration::from_secs(20), || {
        logs()
            .0
            .contains(&format!(" {} TCP_TUNNEL/200 ", Topology::CLIENT_IP))
    });
    assert!(logged, "no Squid line in the pod's log:\n{}", logs().0);

    // Stopped as the kubelet stops it: SIGTERM, then the grace period.
    let stopping = Instant::now();
    podman_ok(&["pod", "stop", "--time", "45", &name]);
    let exit = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &container]);
    assert_eq!(
        String::from_utf8_lossy(&exit.stdout).trim(),
        "0",
        "{}",
        logs().1
    );
    eprintln!(
        "kube play: stopped in {:.2} s",
        stopping.elapsed().as_secs_f64()
    );
}
