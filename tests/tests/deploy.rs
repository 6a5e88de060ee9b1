//! The deployment (deploy/kubernetes, the Dockerfile, docs/istio.md), checked
//! offline with the pinned tools `cargo xtask setup` installs:
//!
//! * every YAML file is yamllint-clean and belongs to a kustomization;
//! * every manifest, and what kustomize renders of each layout, validates
//!   against the strict Kubernetes schemas of every version from
//!   [`MIN_KUBERNETES_MINOR`] on; the one kind Kubernetes has no schema for
//!   (Istio's ServiceEntry) is on an explicit list and validates against a
//!   JSON Schema of our own instead;
//! * the rendered layouts agree with themselves and with squid.conf (ports,
//!   probes, paths, grace period vs `shutdown_lifetime`, capabilities, ...);
//! * the Dockerfile installs what xtask/src/prereq.rs installs and runs the
//!   build command xtask runs; that command, run on a copy of the build context,
//!   builds a spliced that works;
//! * spliced run the way each layout's pod spec says (capabilities,
//!   no_new_privs, read-only root, the runtime's cgroup2 mount, host network,
//!   `$(POD_IP)`) gets the eBPF data plane, serves the policy of squid.conf and
//!   answers its probes.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use spliced_tests::{
    bpffs::Bpffs,
    deploy::{self, CgroupMount, Outcome, PodRun},
    netns::Topology,
    open_tunnel,
    proxy::spliced_bin,
    raw_request, sockets, status_of,
    upstream::{exchange, Header},
    Mode, Upstream, IO_TIMEOUT,
};

/// The oldest Kubernetes minor version the manifests must validate against.
const MIN_KUBERNETES_MINOR: u32 = 30;

/// Kinds without a Kubernetes schema, each with the JSON Schema that stands in.
/// Any other kind kubernetes-validate has no schema for fails the tests.
const NO_KUBERNETES_SCHEMA: [(&str, &str, &str); 1] = [(
    "networking.istio.io/v1",
    "ServiceEntry",
    deploy::SERVICE_ENTRY_SCHEMA,
)];

/// Every kustomization that renders a layout one can apply (relative to
/// deploy/kubernetes); `.` must render exactly what `daemonset` renders.
const LAYOUTS: [&str; 4] = [".", "daemonset", "variants/privileged", "egress-fleet"];

/// What the non-privileged containers may do, and nothing else.
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

/// Seconds the kubelet must leave after `shutdown_lifetime` (and a preStop
/// pause) before its SIGKILL.
const GRACE_MARGIN_SECS: u64 = 10;

fn root() -> PathBuf {
    deploy::workspace_root()
}

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn squid_conf_path() -> PathBuf {
    kube_dir().join("base/squid.conf")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// The strings of a JSON array (empty if absent).
fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What kustomize renders for a layout, as documents.
fn rendered(layout: &str) -> Vec<Value> {
    deploy::yaml_documents(&deploy::kustomize(&kube_dir().join(layout)))
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn only<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(documents, kind);
    assert_eq!(found.len(), 1, "exactly one {kind} expected");
    found[0]
}

/// The workload running spliced (a DaemonSet or a Deployment).
fn workload(documents: &[Value]) -> &Value {
    let found: Vec<&Value> = documents
        .iter()
        .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
        .collect();
    assert_eq!(found.len(), 1, "exactly one workload expected");
    found[0]
}

fn spliced_container(workload: &Value) -> &Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "spliced")
        .expect("a container named spliced")
}

// ---------------------------------------------------------------------------
// squid.conf facts the manifests depend on

/// `http_port`'s port and `shutdown_lifetime` in seconds (Squid's default 30).
struct SquidFacts {
    http_port: u16,
    shutdown_lifetime_secs: u64,
}

fn squid_facts(text: &str) -> SquidFacts {
    let mut http_port = None;
    let mut shutdown_lifetime_secs = 30;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["http_port", addr, ..] => {
                let port = addr.rsplit(':').next().unwrap();
                assert!(http_port.is_none(), "one http_port expected");
                http_port = Some(port.parse().expect("http_port port"));
            }
            ["shutdown_lifetime", value, unit @ ..] => {
                let value: u64 = value.parse().expect("shutdown_lifetime value");
                shutdown_lifetime_secs = match unit.first().copied() {
                    None | Some("second" | "seconds") => value,
                    Some("minute" | "minutes") => value * 60,
                    Some(other) => panic!("unexpected shutdown_lifetime unit {other}"),
                };
            }
            _ => {}
        }
    }
    SquidFacts {
        http_port: http_port.expect("squid.conf has an http_port"),
        shutdown_lifetime_secs,
    }
}

// ---------------------------------------------------------------------------
// Lint and inventory

#[test]
fn yaml_is_yamllint_clean() {
    let mut paths: Vec<PathBuf> = files_under(&root().join("deploy"))
        .into_iter()
        .filter(|p| is_yaml(p))
        .collect();
    let config = root().join(".yamllint.yaml");
    paths.push(config.clone());
    assert!(paths.len() > 10, "too few YAML files found: {paths:?}");
    let output = deploy::yamllint(&config, &paths);
    assert!(
        output.status.success(),
        "yamllint found problems:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the kustomizations under deploy/kubernetes reference.
#[derive(Default)]
struct Inventory {
    /// Manifest files listed under `resources:`.
    resources: BTreeSet<PathBuf>,
    /// Directories listed under `resources:` (kustomizations themselves).
    bases: BTreeSet<PathBuf>,
    /// Patch files.
    patches: BTreeSet<PathBuf>,
    /// configMapGenerator files.
    generated_from: BTreeSet<PathBuf>,
    /// Every kustomization file.
    kustomizations: BTreeSet<PathBuf>,
}

fn inventory() -> Inventory {
    let mut inventory = Inventory::default();
    for file in files_under(&kube_dir()) {
        if file.file_name().unwrap() != "kustomization.yaml" {
            continue;
        }
        let dir = file.parent().unwrap().to_owned();
        let documents = deploy::yaml_file(&file);
        assert_eq!(documents.len(), 1, "{}: one document", file.display());
        let kustomization = &documents[0];
        assert_eq!(kustomization["kind"], "Kustomization", "{}", file.display());
        let resolve = |relative: &str| {
            let path = dir.join(relative);
            assert!(path.exists(), "{} lists missing {relative}", file.display());
            path.canonicalize().unwrap()
        };
        for resource in strings(&kustomization["resources"]) {
            let path = resolve(&resource);
            if path.is_dir() {
                assert!(
                    path.join("kustomization.yaml").is_file(),
                    "{}: directory {resource} is no kustomization",
                    file.display()
                );
                inventory.bases.insert(path);
            } else {
                inventory.resources.insert(path);
            }
        }
        for patch in kustomization["patches"].as_array().into_iter().flatten() {
            let path = patch["path"].as_str().expect("patches are files");
            inventory.patches.insert(resolve(path));
        }
        for generator in kustomization["configMapGenerator"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for source in strings(&generator["files"]) {
                let source = source.rsplit('=').next().unwrap().to_owned();
                inventory.generated_from.insert(resolve(&source));
            }
        }
        inventory
            .kustomizations
            .insert(file.canonicalize().unwrap());
    }
    inventory
}

#[test]
fn every_file_belongs_to_a_kustomization_and_every_kustomization_is_tested() {
    let inventory = inventory();
    for file in files_under(&kube_dir()) {
        let file = file.canonicalize().unwrap();
        assert!(
            inventory.kustomizations.contains(&file)
                || inventory.resources.contains(&file)
                || inventory.patches.contains(&file)
                || inventory.generated_from.contains(&file),
            "{} is in deploy/kubernetes but no kustomization uses it",
            file.display()
        );
    }
    // Each kustomization is a layout the tests render, or a base one includes.
    let layouts: BTreeSet<PathBuf> = LAYOUTS
        .iter()
        .map(|layout| kube_dir().join(layout).canonicalize().unwrap())
        .collect();
    for kustomization in &inventory.kustomizations {
        let dir = kustomization.parent().unwrap();
        assert!(
            layouts.contains(dir) || inventory.bases.contains(dir),
            "{} is neither in LAYOUTS nor included by another kustomization",
            kustomization.display()
        );
    }
}

// ---------------------------------------------------------------------------
// Schemas

/// The Kubernetes versions to validate against: every bundled one from
/// `MIN_KUBERNETES_MINOR` on.
fn versions() -> Vec<String> {
    let versions: Vec<String> = deploy::kubernetes_versions()
        .into_iter()
        .filter(|version| {
            let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
            minor >= MIN_KUBERNETES_MINOR
        })
        .collect();
    assert!(versions.len() >= 5, "too few schema versions: {versions:?}");
    versions
}

/// Validates `documents`: each passes the strict Kubernetes schema of every
/// version, or is of a kind in `NO_KUBERNETES_SCHEMA` (for every version) and
/// passes the stand-in schema. Returns every failure.
fn schema_failures(label: &str, documents: &[Value], versions: &[String]) -> Vec<String> {
    let mut failures = Vec::new();
    let outcomes = deploy::validate_kubernetes(documents, versions);
    for (document, per_version) in documents.iter().zip(outcomes) {
        let name = format!(
            "{label}: {} {}/{}",
            document["apiVersion"].as_str().unwrap_or("?"),
            document["kind"].as_str().unwrap_or("?"),
            document["metadata"]["name"].as_str().unwrap_or("?")
        );
        let stand_in = NO_KUBERNETES_SCHEMA
            .iter()
            .find(|(api, kind, _)| document["apiVersion"] == *api && document["kind"] == *kind);
        for (version, outcome) in per_version {
            match (outcome, stand_in) {
                (Outcome::Passed, None) => {}
                (Outcome::Invalid(error), _) => failures.push(format!(
                    "{name} is invalid for Kubernetes {version}: {error}"
                )),
                (Outcome::NoSchema, None) => failures.push(format!(
                    "{name}: Kubernetes {version} has no schema for it and it is not in \
                     NO_KUBERNETES_SCHEMA"
                )),
                (Outcome::Passed, Some(_)) => failures.push(format!(
                    "{name} is in NO_KUBERNETES_SCHEMA but Kubernetes {version} has a schema"
                )),
                (Outcome::NoSchema, Some(_)) => {}
            }
        }
        if let Some((_, _, schema)) = stand_in {
            let schema: Value = serde_json::from_str(schema).expect("stand-in schema is JSON");
            let errors = deploy::validate_schema(&schema, std::slice::from_ref(document));
            failures.extend(
                errors[0]
                    .iter()
                    .map(|error| format!("{name} fails its stand-in schema: {error}")),
            );
        }
    }
    failures
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let versions = versions();
    let inventory = inventory();
    let mut failures = Vec::new();
    let mut validated = 0;
    for file in &inventory.resources {
        let documents = deploy::yaml_file(file);
        assert!(!documents.is_empty(), "{} is empty", file.display());
        validated += documents.len();
        failures.extend(schema_failures(
            &file.display().to_string(),
            &documents,
            &versions,
        ));
    }
    assert!(validated >= 6, "only {validated} manifests found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rendered_layouts_validate_against_the_kubernetes_schemas() {
    let versions = versions();
    let mut failures = Vec::new();
    for layout in LAYOUTS {
        let documents = rendered(layout);
        assert!(documents.len() >= 4, "{layout} renders too little");
        failures.extend(schema_failures(
            &format!("kustomize {layout}"),
            &documents,
            &versions,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The validation above must be able to fail: broken copies of the real
/// manifests are caught, and so is a kind that has no schema anywhere.
#[test]
fn schema_validation_catches_broken_manifests() {
    let versions = versions();
    let documents = rendered("daemonset");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut documents = documents.clone();
        for document in &mut documents {
            edit(document);
        }
        schema_failures("broken", &documents, &versions)
    };
    let misspelled = broken(&|d| {
        if d["kind"] == "DaemonSet" {
            let container = &mut d["spec"]["template"]["spec"]["containers"][0];
            let probe = container["readinessProbe"].take();
            container["readinesProbe"] = probe;
        }
    });
    assert!(
        misspelled.iter().any(|f| f.contains("readinesProbe")),
        "{misspelled:?}"
    );
    let wrong_type = broken(&|d| {
        if d["kind"] == "DaemonSet" {
            d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45".into();
        }
    });
    assert!(
        wrong_type
            .iter()
            .any(|f| f.contains("terminationGracePeriodSeconds")),
        "{wrong_type:?}"
    );
    let bad_resolution = broken(&|d| {
        if d["kind"] == "ServiceEntry" {
            d["spec"]["resolution"] = "NON".into();
        }
    });
    assert!(
        bad_resolution
            .iter()
            .any(|f| f.contains("stand-in schema") && f.contains("NON")),
        "{bad_resolution:?}"
    );
    let no_hosts = broken(&|d| {
        if d["kind"] == "ServiceEntry" {
            d["spec"].as_object_mut().unwrap().remove("hosts");
        }
    });
    assert!(
        no_hosts
            .iter()
            .any(|f| f.contains("'hosts' is a required property")),
        "{no_hosts:?}"
    );
    let unknown_kind = broken(&|d| {
        if d["kind"] == "ServiceEntry" {
            d["kind"] = "Sidecar".into();
        }
    });
    assert!(
        unknown_kind
            .iter()
            .any(|f| f.contains("not in NO_KUBERNETES_SCHEMA")),
        "{unknown_kind:?}"
    );
}

// ---------------------------------------------------------------------------
// The layouts agree with themselves, with squid.conf and with the image

#[test]
fn the_root_kustomization_renders_the_daemonset_layout() {
    assert_eq!(
        deploy::kustomize(&kube_dir()),
        deploy::kustomize(&kube_dir().join("daemonset"))
    );
}

#[test]
fn configmap_squid_conf_loads_without_warnings() {
    let output = spliced_tests::daemon::check_config(&squid_conf_path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stderr.to_lowercase().contains("warn"),
        "squid.conf loads with warnings:\n{stderr}"
    );
    let rules: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("http_access"))
        .collect();
    assert_eq!(
        rules,
        [
            "http_access deny CONNECT !SSL_ports",
            "http_access allow localhost manager",
            "http_access deny manager",
            "http_access allow localnet",
            "http_access deny all",
        ],
        "the policy is the Istio task's, restricted to private clients"
    );
}

/// Resolves a probe's or Service's port (a number or a container port name).
fn container_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().expect("a port number or name");
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

/// Checks one rendered layout: every cross-reference and every number that
/// must agree with squid.conf or the image.
fn check_layout(layout: &str, documents: &[Value]) {
    let squid_conf = read(&squid_conf_path());
    let facts = squid_facts(&squid_conf);

    // One namespace, outside the mesh, for everything.
    let namespace = only(documents, "Namespace");
    let ns_name = namespace["metadata"]["name"].as_str().unwrap();
    let labels = &namespace["metadata"]["labels"];
    assert_eq!(labels["istio-injection"], "disabled", "{layout}");
    assert_eq!(
        labels["pod-security.kubernetes.io/enforce"], "privileged",
        "{layout}: hostNetwork/capabilities need the privileged Pod Security level"
    );
    for document in documents.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(
            document["metadata"]["namespace"], ns_name,
            "{layout}: {} outside {ns_name}",
            document["kind"]
        );
    }

    // The ConfigMap holds squid.conf as it is in the repository.
    let config_map = only(documents, "ConfigMap");
    assert_eq!(config_map["data"]["squid.conf"], squid_conf.as_str());

    let workload = workload(documents);
    let pod = &workload["spec"]["template"];
    let pod_spec = &pod["spec"];
    let container = spliced_container(workload);
    let selector = workload["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (key, value) in selector {
        assert_eq!(&pod["metadata"]["labels"][key], value, "{layout}: selector");
    }

    // The image: spliced at the workspace's version.
    assert_eq!(
        container["image"],
        format!("spliced:{}", env!("CARGO_PKG_VERSION")),
        "{layout}"
    );

    // -f names squid.conf where the ConfigMap is mounted.
    let args = strings(&container["args"]);
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "-f")
        .map(|w| w[1].clone())
        .expect("-f FILE");
    let config_volume = pod_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .expect("the ConfigMap is mounted");
    assert_eq!(
        config_path,
        format!("{}/squid.conf", mount["mountPath"].as_str().unwrap()),
        "{layout}"
    );
    assert_eq!(mount["readOnly"], true, "{layout}");
    assert_eq!(
        config_path,
        image_config_path(),
        "{layout}: the image's CMD"
    );

    // Only ConfigMaps, emptyDirs and the host's /sys/fs/bpf: no other hostPath
    // (spliced uses the runtime's cgroup2 mount, not the host's).
    for volume in pod_spec["volumes"].as_array().unwrap() {
        assert!(
            volume.get("configMap").is_some()
                || volume.get("emptyDir").is_some()
                || volume["hostPath"]["path"] == "/sys/fs/bpf",
            "{layout}: unexpected volume {volume}"
        );
    }

    // The proxy port is squid.conf's http_port.
    assert_eq!(
        container_port(container, &"proxy".into()),
        u64::from(facts.http_port),
        "{layout}"
    );

    // --admin $(POD_IP):PORT, the admin port named, both probes on it.
    let admin = args
        .windows(2)
        .find(|w| w[0] == "--admin")
        .map(|w| w[1].clone())
        .expect("--admin ADDR:PORT");
    let admin_port: u64 = admin
        .strip_prefix("$(POD_IP):")
        .expect("--admin binds $(POD_IP)")
        .parse()
        .unwrap();
    let pod_ip = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_IP")
        .expect("POD_IP in env");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(container_port(container, &"admin".into()), admin_port);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{layout} {probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            admin_port,
            "{layout} {probe}"
        );
        assert!(get.get("host").is_none(), "{layout} {probe}: the pod IP");
    }

    // The grace period covers the drain, any preStop pause and a margin.
    let pre_stop: u64 = match container["lifecycle"]["preStop"]["exec"]["command"].as_array() {
        Some(command) => {
            assert_eq!(command[0], "sleep", "{layout}: preStop");
            command[1].as_str().unwrap().parse().unwrap()
        }
        None => 0,
    };
    let grace = pod_spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= facts.shutdown_lifetime_secs + pre_stop + GRACE_MARGIN_SECS,
        "{layout}: terminationGracePeriodSeconds {grace} < shutdown_lifetime {} + preStop \
         {pre_stop} + {GRACE_MARGIN_SECS}",
        facts.shutdown_lifetime_secs
    );

    // Security: exactly the capabilities spliced needs, or privileged.
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true, "{layout}");
    if security["privileged"] == true {
        assert_ne!(
            security["allowPrivilegeEscalation"], false,
            "{layout}: refused together with privileged"
        );
    } else {
        assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(strings(&security["capabilities"]["add"]), CAPABILITIES);
        assert_eq!(security["allowPrivilegeEscalation"], false, "{layout}");
        assert_eq!(security["runAsUser"], 0, "{layout}: capabilities need root");
    }
    assert_eq!(
        pod_spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{layout}"
    );
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    match workload["kind"].as_str().unwrap() {
        "DaemonSet" => {
            assert_eq!(pod_spec["hostNetwork"], true, "{layout}");
            assert_eq!(pod_spec["dnsPolicy"], "ClusterFirstWithHostNet", "{layout}");
            let update = &workload["spec"]["updateStrategy"];
            assert_eq!(update["type"], "RollingUpdate");
            assert_eq!(update["rollingUpdate"]["maxUnavailable"], 1);
            assert_eq!(
                update["rollingUpdate"]["maxSurge"], 0,
                "{layout}: two pods cannot hold the node's port 3128"
            );
            check_service_entry(layout, documents, &facts);
        }
        "Deployment" => {
            assert_ne!(pod_spec["hostNetwork"], true, "{layout}");
            let service = only(documents, "Service");
            for (key, value) in service["spec"]["selector"].as_object().unwrap() {
                assert_eq!(&pod["metadata"]["labels"][key], value, "{layout}: Service");
            }
            let port = &service["spec"]["ports"][0];
            assert_eq!(port["port"], u64::from(facts.http_port));
            assert_eq!(
                container_port(container, &port["targetPort"]),
                u64::from(facts.http_port)
            );
            assert_eq!(port["appProtocol"], "tcp", "{layout}: opaque TCP to Istio");
            let budget = only(documents, "PodDisruptionBudget");
            assert_eq!(
                budget["spec"]["selector"]["matchLabels"],
                workload["spec"]["selector"]["matchLabels"]
            );
        }
        other => panic!("{layout}: unexpected workload {other}"),
    }
}

/// An IP address or a CIDR without host bits.
fn is_ip_or_cidr(text: &str) -> bool {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    let Some(prefix) = prefix else { return true };
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let Ok(prefix) = prefix.parse::<u32>() else {
        return false;
    };
    if prefix > bits {
        return false;
    }
    let value = match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    prefix == 128 || value << prefix == 0
}

/// The Istio task's ServiceEntry, with Istio's own validation rules that a
/// JSON Schema cannot say.
fn check_service_entry(layout: &str, documents: &[Value], facts: &SquidFacts) {
    let entry = only(documents, "ServiceEntry");
    let spec = &entry["spec"];
    assert_eq!(spec["location"], "MESH_EXTERNAL", "{layout}");
    assert_eq!(spec["resolution"], "NONE", "{layout}");
    let ports = spec["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["number"], u64::from(facts.http_port));
    assert_eq!(ports[0]["protocol"], "TCP", "{layout}: TCP, not HTTP");
    let addresses = strings(&spec["addresses"]);
    assert!(
        !addresses.is_empty(),
        "{layout}: resolution NONE needs addresses"
    );
    for address in addresses {
        assert!(is_ip_or_cidr(&address), "{layout}: bad address {address}");
    }
    for host in strings(&spec["hosts"]) {
        assert!(
            host.parse::<IpAddr>().is_err(),
            "{layout}: host {host} is an IP"
        );
    }
}

#[test]
fn rendered_layouts_are_coherent() {
    for layout in LAYOUTS {
        check_layout(layout, &rendered(layout));
    }
}

#[test]
fn cidr_check_works() {
    for good in [
        "192.0.2.0/24",
        "10.0.0.1",
        "10.0.0.1/32",
        "fd00::/8",
        "0.0.0.0/0",
    ] {
        assert!(is_ip_or_cidr(good), "{good}");
    }
    for bad in [
        "192.0.2.1/24",
        "10.0.0.0/33",
        "example.com",
        "fd00::1/8",
        "10.0.0.0/",
    ] {
        assert!(!is_ip_or_cidr(bad), "{bad}");
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile

fn dockerfile() -> Vec<deploy::Instruction> {
    deploy::dockerfile_instructions(&read(&root().join("Dockerfile")))
}

/// The instructions of each stage, split at FROM.
fn stages() -> Vec<Vec<deploy::Instruction>> {
    let mut stages: Vec<Vec<deploy::Instruction>> = Vec::new();
    for instruction in dockerfile() {
        if instruction.cmd == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM (or ARG)")
            .push(instruction);
    }
    stages
}

fn instructions<'a>(
    stage: &'a [deploy::Instruction],
    cmd: &'a str,
) -> impl Iterator<Item = &'a deploy::Instruction> + 'a {
    stage.iter().filter(move |i| i.cmd == cmd)
}

/// The shell-form RUN commands of a stage.
fn runs(stage: &[deploy::Instruction]) -> Vec<String> {
    instructions(stage, "RUN")
        .map(|run| {
            assert!(!run.json, "line {}: RUN in shell form expected", run.line);
            run.value.join(" ")
        })
        .collect()
}

/// The build stage's WORKDIR.
fn build_workdir(stage: &[deploy::Instruction]) -> String {
    let workdirs: Vec<&deploy::Instruction> = instructions(stage, "WORKDIR").collect();
    assert_eq!(workdirs.len(), 1, "one WORKDIR in the build stage");
    workdirs[0].value[0].clone()
}

/// The configuration file the image's CMD names.
fn image_config_path() -> String {
    let stages = stages();
    let cmd: Vec<&deploy::Instruction> = instructions(stages.last().unwrap(), "CMD").collect();
    assert_eq!(cmd.len(), 1);
    assert!(cmd[0].json, "CMD in exec form");
    assert_eq!(cmd[0].value.len(), 2, "CMD [\"-f\", FILE]");
    assert_eq!(cmd[0].value[0], "-f");
    cmd[0].value[1].clone()
}

/// A `const NAME: &str = "…";` of a Rust source.
fn rust_str_const(source: &str, name: &str) -> String {
    let start = source
        .find(&format!("const {name}: &str = \""))
        .unwrap_or_else(|| panic!("no `const {name}: &str`"));
    let rest = &source[start..];
    let value = &rest[rest.find('"').unwrap() + 1..];
    value[..value.find('"').unwrap()].to_owned()
}

/// The strings of a `const NAME: [&str; N] = [...];` of a Rust source.
fn rust_str_array_const(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("const {name}: [&str; "))
        .unwrap_or_else(|| panic!("no `const {name}: [&str; N]`"));
    string_literals(&source[start..], "= [", "];")
}

/// The string literals between `from` and the next `end` in a Rust source.
fn string_literals(source: &str, from: &str, end: &str) -> Vec<String> {
    let start = source
        .find(from)
        .unwrap_or_else(|| panic!("{from:?} not found"));
    let rest = &source[start + from.len()..];
    let body = &rest[..rest.find(end).expect("end")];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The `major.minor` of `rustc --version` (+toolchain optional).
fn rustc_version(toolchain: Option<&str>) -> String {
    let mut rustc = Command::new("rustc");
    if let Some(toolchain) = toolchain {
        rustc.arg(format!("+{toolchain}"));
    }
    let output = rustc.arg("--version").output().expect("rustc");
    let text = String::from_utf8(output.stdout).unwrap();
    let version = text.split_whitespace().nth(1).expect("rustc X.Y.Z");
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// The date of the installed nightly toolchain's channel (its dist manifest).
fn nightly_date() -> String {
    let output = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .expect("rustc +nightly");
    let sysroot = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    let manifest = read(&sysroot.join("lib/rustlib/multirust-channel-manifest.toml"));
    manifest
        .lines()
        .find_map(|line| line.strip_prefix("date = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("date in the channel manifest")
        .to_owned()
}

#[test]
fn dockerfile_installs_and_builds_what_xtask_does() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);

    // The build stage: Rust of the toolchain the project builds with, on the
    // Debian release of the runtime stage (so glibc matches).
    let stable = rustc_version(None);
    assert_eq!(
        build[0].value,
        [
            format!("rust:{stable}-bookworm"),
            "AS".into(),
            "build".into()
        ],
        "the build stage's image must be the Rust the project builds with ({stable})"
    );
    assert_eq!(runtime[0].value, ["debian:bookworm-slim"]);

    let prereq = read(&root().join("xtask/src/prereq.rs"));
    let build_runs = runs(build);
    let script = build_runs.join("\n");

    // Debian packages: everything xtask installs to build bpf-linker.
    let packages = rust_str_array_const(&prereq, "BPF_LINKER_BUILD_PACKAGES");
    assert!(!packages.is_empty());
    let install = build_runs
        .iter()
        .find(|run| run.contains("apt-get install"))
        .expect("an apt-get install step");
    let installed: BTreeSet<&str> = install
        .split("apt-get install")
        .nth(1)
        .unwrap()
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|word| !word.starts_with('-'))
        .collect();
    for package in &packages {
        assert!(
            installed.contains(package.as_str()),
            "{package} not installed"
        );
    }

    // The nightly toolchain with rust-src, pinned to the one of the machines.
    assert!(prereq.contains("(\"rust-src\", \"lib/rustlib/src/rust/library\")"));
    let nightly_arg: Vec<&deploy::Instruction> = instructions(build, "ARG")
        .filter(|arg| arg.value[0].starts_with("NIGHTLY="))
        .collect();
    assert_eq!(nightly_arg.len(), 1, "ARG NIGHTLY=nightly-DATE");
    assert_eq!(
        nightly_arg[0].value[0],
        format!("NIGHTLY=nightly-{}", nightly_date()),
        "the image's nightly must be the one the machines build the eBPF object with"
    );
    assert!(script
        .contains("rustup toolchain install \"$NIGHTLY\" --profile minimal --component rust-src"));
    assert!(script.contains("\"$RUSTUP_HOME/toolchains/nightly-$host\""));

    // bpf-linker exactly as xtask installs it.
    let version = rust_str_const(&prereq, "BPF_LINKER_VERSION");
    let feature = rust_str_const(&prereq, "BPF_LINKER_LLVM_FEATURE");
    let prefix = rust_str_const(&prereq, "LLVM_PREFIX");
    let bpf_linker = build_runs
        .iter()
        .find(|run| run.contains("cargo install bpf-linker"))
        .expect("a bpf-linker install step");
    let words: Vec<&str> = bpf_linker.split_whitespace().collect();
    for expected in [
        vec![format!("LLVM_PREFIX={prefix}")],
        vec!["--version".into(), version],
        vec!["--no-default-features".into()],
        vec!["--features".into(), feature],
    ] {
        assert!(
            words
                .windows(expected.len())
                .any(|w| w == expected.as_slice()),
            "{expected:?} missing from {bpf_linker}"
        );
    }

    // The build command is xtask's product build (plus --locked), and the
    // only cargo build: the image never carries the test build's hooks.
    let main = read(&root().join("xtask/src/main.rs"));
    let body = &main[main.find("fn build_spliced()").expect("fn build_spliced()")..];
    let mut xtask_args = string_literals(body, "cargo().args([", "])");
    xtask_args.insert(0, "cargo".into());
    let builds: Vec<&String> = build_runs
        .iter()
        .filter(|run| run.contains("cargo build"))
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build step");
    let mut docker_args: Vec<String> = builds[0].split_whitespace().map(str::to_owned).collect();
    let locked = docker_args.iter().position(|a| a == "--locked");
    assert!(locked.is_some(), "the image builds with --locked");
    docker_args.remove(locked.unwrap());
    assert_eq!(docker_args, xtask_args, "the Dockerfile's build vs xtask's");
    assert!(
        !builds[0].contains("test-hooks"),
        "the image must not enable the test-hooks feature: {}",
        builds[0]
    );

    // The build context comes in whole, at WORKDIR, before the build.
    let workdir = build_workdir(build);
    let copies: Vec<&deploy::Instruction> = instructions(build, "COPY").collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].value, [".", "."]);

    // The runtime stage: the binary as ENTRYPOINT, and CA certificates as the
    // only package layer.
    let runtime_runs = runs(runtime);
    assert_eq!(
        runtime_runs.len(),
        1,
        "one RUN in the image: {runtime_runs:?}"
    );
    assert!(
        runtime_runs[0].contains("apt-get install -y --no-install-recommends ca-certificates"),
        "{runtime_runs:?}"
    );
    let binary: Vec<&deploy::Instruction> = instructions(runtime, "COPY").collect();
    assert_eq!(binary.len(), 1);
    assert_eq!(binary[0].flags, ["--from=build"]);
    assert_eq!(
        binary[0].value,
        [
            format!("{workdir}/target/release/spliced"),
            "/usr/local/bin/spliced".into()
        ]
    );
    let entrypoint: Vec<&deploy::Instruction> = instructions(runtime, "ENTRYPOINT").collect();
    assert_eq!(entrypoint.len(), 1);
    assert!(entrypoint[0].json);
    assert_eq!(entrypoint[0].value, ["/usr/local/bin/spliced"]);
    let users: Vec<&deploy::Instruction> = instructions(runtime, "USER").collect();
    assert!(
        users.iter().all(|u| u.value == ["root"]),
        "root with the pod's capabilities (see the Dockerfile)"
    );
    assert_eq!(
        instructions(runtime, "EXPOSE")
            .next()
            .map(|e| e.value.clone()),
        Some(vec![squid_facts(&read(&squid_conf_path()))
            .http_port
            .to_string()])
    );
}

#[test]
fn dockerfile_run_steps_pass_shellcheck() {
    let mut checked = 0;
    for stage in stages() {
        for run in runs(&stage) {
            let mut child = Command::new("shellcheck")
                .args(["--shell=sh", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("shellcheck (Debian shellcheck, installed by cargo xtask setup)");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{run}\n").as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "shellcheck on `{run}`:\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} RUN steps");
}

/// The `.dockerignore` patterns: `NAME` (a path from the context root) or
/// `**/NAME` (that name at any depth); nothing fancier, so this emulation of
/// Docker's matching stays exact.
fn dockerignore() -> Vec<String> {
    read(&root().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let pattern = line.trim_end_matches('/').to_owned();
            let plain = pattern.strip_prefix("**/").unwrap_or(&pattern);
            assert!(
                !plain.contains(['*', '?', '[', '!']),
                ".dockerignore pattern {line:?} is beyond this test's emulation"
            );
            pattern
        })
        .collect()
}

fn ignored(relative: &Path, patterns: &[String]) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_prefix("**/") {
            Some(name) => relative.components().any(|c| c.as_os_str() == name),
            None => relative.starts_with(pattern),
        })
}

/// Copies the build context (the repository less .dockerignore) to `to`.
fn copy_context(to: &Path) -> usize {
    let patterns = dockerignore();
    let context = root();
    let mut copied = 0;
    let mut pending = vec![context.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(&context).unwrap();
            if ignored(relative, &patterns) {
                continue;
            }
            // A file another process deletes meanwhile (a running fuzzer's
            // corpus, say) is left out, as `docker build` would leave it.
            let vanished = |err: &std::io::Error| err.kind() == std::io::ErrorKind::NotFound;
            let file_type = match std::fs::symlink_metadata(&path) {
                Ok(metadata) => metadata.file_type(),
                Err(err) if vanished(&err) => continue,
                Err(err) => panic!("{}: {err}", path.display()),
            };
            if file_type.is_dir() {
                std::fs::create_dir_all(to.join(relative)).unwrap();
                pending.push(path);
            } else if file_type.is_file() {
                match std::fs::copy(&path, to.join(relative)) {
                    Ok(_) => copied += 1,
                    Err(err) if vanished(&err) => {}
                    Err(err) => panic!("{}: {err}", path.display()),
                }
            }
        }
    }
    copied
}

/// Runs `cmd` to completion within `timeout`; fails the test otherwise.
fn run_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} took longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The build stage's commands, as far as they can run here: the packages,
/// toolchains and bpf-linker they install are the machine's own (the test
/// above checks they are the same), so the COPY and the `cargo build` step
/// run for real, on a copy of the build context with a target directory of
/// its own (seeded with the dependencies already built for `SPLICED_BIN`, as
/// a Docker layer cache would be), and the binary the runtime stage copies
/// must be a working spliced.
#[test]
fn dockerfile_build_step_builds_a_working_spliced() {
    let stages = stages();
    let build = &stages[0];
    let workdir = build_workdir(build);
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let files = copy_context(scratch.path());
    assert!(files > 20, "the build context has only {files} files");
    assert!(!scratch.path().join("target").exists());
    assert!(!scratch.path().join(".git").exists());

    // Seed target/release from the profile directory SPLICED_BIN was built in.
    let spliced = spliced_bin();
    let profile_dir = spliced.parent().unwrap();
    let seeded = profile_dir.join(".fingerprint").is_dir();
    if seeded {
        let release = scratch.path().join("target/release");
        std::fs::create_dir_all(&release).unwrap();
        for part in [".fingerprint", "build", "deps"] {
            // Only a cache: if a concurrent build changes the directory under
            // cp's feet, cargo rebuilds whatever is incomplete.
            let status = Command::new("cp")
                .arg("-a")
                .arg(profile_dir.join(part))
                .arg(&release)
                .status()
                .unwrap();
            if !status.success() {
                eprintln!("seeding {part} from {} failed", profile_dir.display());
            }
        }
    }

    let build_run = runs(build)
        .into_iter()
        .find(|run| run.starts_with("cargo build"))
        .expect("the cargo build step");
    let mut command = Command::new("sh");
    command
        .args(["-c", &build_run])
        .current_dir(scratch.path())
        .env_clear();
    for kept in ["PATH", "HOME", "RUSTUP_HOME", "CARGO_HOME"] {
        if let Some(value) = std::env::var_os(kept) {
            command.env(kept, value);
        }
    }
    let started = Instant::now();
    let output = run_within(&mut command, Duration::from_secs(20 * 60));
    assert!(
        output.status.success(),
        "`{build_run}` failed in the copied context:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let compiled: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Compiling "))
        .collect();
    eprintln!(
        "`{build_run}` took {:?} ({}); compiled: {}",
        started.elapsed(),
        if seeded {
            "dependencies seeded"
        } else {
            "from scratch"
        },
        compiled.join(", ")
    );

    // What the runtime stage copies, mapped from WORKDIR to the copy.
    let source = &instructions(&stages[1], "COPY").next().unwrap().value[0];
    let built = scratch
        .path()
        .join(source.strip_prefix(&format!("{workdir}/")).unwrap());
    assert!(built.is_file(), "{} was not built", built.display());

    let version = |binary: &Path| {
        let output = Command::new(binary).arg("--version").output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(version(&built), version(&spliced));

    // Only libraries debian:bookworm-slim has (glibc's and libgcc_s).
    let ldd = Command::new("ldd").arg(&built).output().expect("ldd");
    let allowed = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    for line in String::from_utf8(ldd.stdout).unwrap().lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        let name = Path::new(first).file_name().unwrap().to_str().unwrap();
        assert!(allowed.contains(&name), "the image lacks {name} ({line})");
    }

    let check = Command::new(&built)
        .arg("check")
        .arg("-f")
        .arg(squid_conf_path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

// ---------------------------------------------------------------------------
// spliced run as each layout's pod spec says

/// Whether the binary under test has the admin listener (`--admin`).
fn has_admin_listener() -> bool {
    let output = Command::new(spliced_bin()).arg("--help").output().unwrap();
    String::from_utf8_lossy(&output.stdout).contains("--admin")
}

/// Kubernetes' `$(VAR)` expansion of an argument (`$$` escapes).
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|inner| inner.split_once(')'))
            .and_then(|(name, after)| {
                env.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, value)| (value, after))
            })
        {
            out.push_str(name);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The node the pod lands on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    /// cgroup v2: the runtime mounts the container's cgroup2 hierarchy.
    CgroupV2,
    /// cgroup v1: no cgroup2 hierarchy in the container.
    CgroupV1,
}

/// An emulated container of a rendered layout, ready to start.
struct Container {
    run_args: Vec<String>,
    env: Vec<(String, String)>,
    capabilities: Option<Vec<String>>,
    no_new_privs: bool,
    read_only_root: bool,
    empty_dirs: Vec<PathBuf>,
    privileged: bool,
    /// The admin port from `--admin`, if the binary has the listener.
    admin_port: Option<u16>,
    /// Holds the ConfigMap files.
    _config_dir: tempfile::TempDir,
    /// The bpffs of the hostPath `/sys/fs/bpf` volume.
    bpffs: Option<Bpffs>,
}

impl Container {
    /// Translates the spliced container of `layout` into an emulation: the
    /// ConfigMap's files in a directory the arguments are pointed at,
    /// `$(VAR)`s from the downward API with `pod_ip`, the security context.
    fn of(layout: &str, pod_ip: Ipv4Addr) -> Self {
        let documents = rendered(layout);
        let workload = workload(&documents);
        let pod_spec = &workload["spec"]["template"]["spec"];
        let container = spliced_container(workload);

        let mut env = deploy::container_env(container, pod_ip);

        // Volumes: ConfigMaps become a directory here, emptyDirs a tmpfs
        // mounted on one; arguments are pointed there.
        let config_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut mapped: Vec<(String, PathBuf)> = Vec::new();
        let mut empty_dirs = Vec::new();
        let mut bpffs = None;
        for mount in container["volumeMounts"].as_array().unwrap() {
            let mount_path = mount["mountPath"].as_str().unwrap();
            let volume = pod_spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            if let Some(name) = volume["configMap"]["name"].as_str() {
                let config_map = of_kind(&documents, "ConfigMap")
                    .into_iter()
                    .find(|c| c["metadata"]["name"] == name)
                    .expect("the mounted ConfigMap is rendered");
                let dir = config_dir.path().join(volume["name"].as_str().unwrap());
                std::fs::create_dir_all(&dir).unwrap();
                for (key, value) in config_map["data"].as_object().unwrap() {
                    std::fs::write(dir.join(key), value.as_str().unwrap()).unwrap();
                }
                mapped.push((mount_path.to_owned(), dir));
            } else if volume.get("emptyDir").is_some() {
                // A tmpfs on a directory of ours, not over the real path
                // (the binary under test may live below /tmp); spliced's one
                // use of /tmp follows TMPDIR.
                let dir = config_dir.path().join(volume["name"].as_str().unwrap());
                std::fs::create_dir_all(&dir).unwrap();
                if mount_path == "/tmp" {
                    env.push(("TMPDIR".into(), dir.to_str().unwrap().to_owned()));
                }
                empty_dirs.push(dir.clone());
                mapped.push((mount_path.to_owned(), dir));
            } else if volume["hostPath"]["path"] == "/sys/fs/bpf" {
                // The host's bpffs: one of the test's own (the pod's pins
                // must not land in the host's), bound onto the container's
                // /sys/fs/bpf; paths under it stay as they are.
                assert_eq!(mount_path, "/sys/fs/bpf", "{layout}");
                bpffs = Some(Bpffs::mount());
            } else {
                panic!("{layout}: volume {volume} is not emulated");
            }
        }

        let admin = has_admin_listener();
        let mut run_args = Vec::new();
        let mut admin_port = None;
        let mut args = strings(&container["args"]).into_iter();
        while let Some(arg) = args.next() {
            if arg == "--admin" {
                let value = expand(&args.next().expect("--admin ADDR"), &env);
                let addr: SocketAddr = value.parse().expect("--admin ADDR:PORT");
                if admin {
                    admin_port = Some(addr.port());
                    run_args.extend([arg, value]);
                } else {
                    eprintln!(
                        "NOTE: {} has no --admin yet: running without `--admin {value}`, \
                         probes not exercised",
                        spliced_bin().display()
                    );
                }
                continue;
            }
            let mut arg = expand(&arg, &env);
            // The mount the path is under (the longest mount path wins).
            let under = mapped
                .iter()
                .filter_map(|(mount_path, dir)| {
                    let rest = arg.strip_prefix(&format!("{mount_path}/"))?;
                    Some((mount_path.len(), dir.join(rest)))
                })
                .max_by_key(|(len, _)| *len);
            if let Some((_, path)) = under {
                arg = path.to_str().unwrap().to_owned();
            }
            run_args.push(arg);
        }

        let security = &container["securityContext"];
        let privileged = security["privileged"] == true;
        let capabilities = (!privileged).then(|| {
            assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
            assert!(security["runAsUser"].as_u64().unwrap_or(0) == 0);
            strings(&security["capabilities"]["add"])
        });
        Container {
            run_args,
            env,
            capabilities,
            no_new_privs: security["allowPrivilegeEscalation"] == false,
            read_only_root: security["readOnlyRootFilesystem"] == true,
            empty_dirs,
            privileged,
            admin_port,
            _config_dir: config_dir,
            bpffs,
        }
    }

    fn run<'a>(&self, netns: &'a spliced_tests::Netns, node: Node) -> PodRun<'a> {
        PodRun {
            netns,
            args: self.run_args.clone(),
            env: self.env.clone(),
            capabilities: self.capabilities.clone(),
            no_new_privs: self.no_new_privs,
            read_only_root: self.read_only_root,
            empty_dirs: self.empty_dirs.clone(),
            bpffs: self.bpffs.as_ref().map(|bpffs| bpffs.path().to_owned()),
            cgroup: match node {
                Node::CgroupV2 => CgroupMount::V2 {
                    read_only: !self.privileged,
                },
                Node::CgroupV1 => CgroupMount::None,
            },
        }
    }
}

/// `GET path` on the admin listener from inside `ns`; the status code (0 if
/// no connection).
fn http_get(ns: &spliced_tests::Netns, addr: SocketAddr, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    ns.enter(
        move || match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                status_of(&answer)
            }
            Err(_) => 0,
        },
    )
}

/// A source address outside every private range, on the client host.
const PUBLIC_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Runs the spliced container of `layout` on a cgroup v2 node and uses it
/// like the Istio task does: a tunnel to port 443 from a pod address, refusals
/// for another port and for a public source, Squid lines on stdout, the
/// probes, then SIGTERM and an exit within the grace period.
fn pod_serves_as_specified(layout: &str) {
    let topology = Topology::new();
    let pod_ip = Topology::PROXY_IP;
    let container = Container::of(layout, pod_ip);
    let mut pod = container.run(&topology.proxy, Node::CgroupV2).start();
    assert!(
        pod.stderr()
            .contains("data plane: packet (tc programs attached for the packet plane"),
        "{layout}: the pod's capabilities must be enough for the eBPF data plane:\n{}",
        pod.stderr()
    );
    if let Some(bpffs) = &container.bpffs {
        // --packet-state-dir under the hostPath volume: the packet plane's
        // maps are pinned on the node's bpffs.
        let pinned = std::fs::read_dir(bpffs.path().join("spliced"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|part| part.path().join("flows").exists());
        assert!(pinned, "{layout}: nothing pinned on the node's bpffs");
    }

    let http_port = squid_facts(&read(&squid_conf_path())).http_port;
    let proxy = SocketAddr::from((pod_ip, http_port));
    let server = SocketAddr::from((Topology::SERVER_IP, 443));
    let upstream = Upstream::start_in(&topology.server, server);

    // A tunnel to 443 from a pod address: allowed, and exact both ways.
    let stream = topology
        .client
        .enter(move || open_tunnel(proxy, &server.to_string()));
    let header = Header {
        up: 1 << 20,
        down: 2 << 20,
        seed: 7,
        mode: Mode::Concurrent,
    };
    assert_eq!(exchange(stream, header, false).received, Ok(header.down));
    assert_eq!(upstream.result().received, Ok(header.up));

    // Another port: denied (CONNECT only to 443).
    let other_port = format!("CONNECT {}:8443 HTTP/1.1\r\n\r\n", Topology::SERVER_IP);
    let answer = topology
        .client
        .enter(move || raw_request(proxy, other_port.as_bytes()));
    assert_eq!(status_of(&answer), 403, "{answer}");

    // A public source address: denied (the node must not be an open proxy).
    topology
        .client
        .ip(&["addr", "add", &format!("{PUBLIC_CLIENT}/32"), "dev", "lo"]);
    topology
        .proxy
        .route(&format!("{PUBLIC_CLIENT}/32"), Topology::CLIENT_IP);
    let answer = topology.client.enter(move || {
        let mut stream = sockets::connect_from(PUBLIC_CLIENT.into(), proxy).unwrap();
        write!(stream, "CONNECT {server} HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    assert_eq!(status_of(&answer), 403, "{answer}");

    // The access log on stdout, in Squid's format.
    let lines = pod.wait_stdout_lines(3);
    let tunnel = format!(" {} TCP_TUNNEL/200 ", Topology::CLIENT_IP);
    let hierarchy = format!(" CONNECT {server} - HIER_DIRECT/{} -", Topology::SERVER_IP);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&tunnel) && l.ends_with(&hierarchy)),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!(" {} TCP_DENIED/403 ", Topology::CLIENT_IP))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!(" {PUBLIC_CLIENT} TCP_DENIED/403 "))),
        "{lines:#?}"
    );

    // The probes, where the kubelet sends them: the pod IP (the node's).
    if let Some(port) = container.admin_port {
        let admin = SocketAddr::from((pod_ip, port));
        assert_eq!(http_get(&topology.proxy, admin, "/healthz"), 200);
        assert_eq!(http_get(&topology.proxy, admin, "/readyz"), 200);
        // Bound to that address only, not to the node's others.
        let other = SocketAddr::from((Topology::PROXY_SERVER_SIDE_IP, port));
        assert_eq!(http_get(&topology.proxy, other, "/healthz"), 0);
    }

    // SIGTERM: out within the grace period.
    let documents = rendered(layout);
    let grace = workload(&documents)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    pod.signal(libc::SIGTERM);
    let (status, took) = pod
        .wait_exit(Duration::from_secs(grace))
        .unwrap_or_else(|| panic!("{layout}: still running {grace} s after SIGTERM"));
    assert!(status.success(), "{layout}: {status}\n{}", pod.stderr());
    eprintln!("{layout}: exited {took:?} after SIGTERM");
}

#[test]
fn daemonset_pod_runs_as_specified() {
    pod_serves_as_specified("daemonset");
}

#[test]
fn egress_fleet_pod_runs_as_specified() {
    pod_serves_as_specified("egress-fleet");
}

/// The claims of the DaemonSet's comments: without CAP_BPF or CAP_NET_ADMIN
/// spliced falls back to splice(2) and says so; with them the packet plane
/// runs, on a node without a cgroup2 hierarchy too (tc needs none), and so
/// does the privileged variant; sockmap, asked for, needs cgroup2.
#[test]
fn data_plane_per_capability_set_and_node() {
    let topology = Topology::new();
    let data_plane = |container: &Container, node: Node| {
        let pod = container.run(&topology.proxy, node).start();
        let stderr = pod.stderr();
        let line = stderr
            .lines()
            .find(|l| l.contains("data plane:"))
            .unwrap()
            .to_owned();
        drop(pod);
        line
    };
    let daemonset = Container::of("daemonset", Topology::PROXY_IP);
    for needed in ["BPF", "NET_ADMIN"] {
        let mut fewer = Container::of("daemonset", Topology::PROXY_IP);
        fewer
            .capabilities
            .as_mut()
            .unwrap()
            .retain(|cap| cap != needed);
        let line = data_plane(&fewer, Node::CgroupV2);
        assert!(
            line.contains("data plane: splice (packet plane unavailable"),
            "without {needed}: {line}"
        );
    }
    let packet = "data plane: packet (tc programs attached for the packet plane";
    let line = data_plane(&daemonset, Node::CgroupV1);
    assert!(line.contains(packet), "cgroup v1 node: {line}");
    let privileged = Container::of("variants/privileged", Topology::PROXY_IP);
    for node in [Node::CgroupV2, Node::CgroupV1] {
        let line = data_plane(&privileged, node);
        assert!(line.contains(packet), "privileged: {line}");
    }
    let mut sockmap = Container::of("daemonset", Topology::PROXY_IP);
    sockmap
        .run_args
        .extend(["--auto-local".into(), "sockmap".into()]);
    let line = data_plane(&sockmap, Node::CgroupV1);
    assert!(
        line.contains("eBPF unavailable") && line.contains("this host → splice"),
        "sockmap on a cgroup v1 node: {line}"
    );
}

// ---------------------------------------------------------------------------
// docs/istio.md

#[test]
fn istio_doc_names_what_the_repository_has() {
    let doc = read(&root().join("docs/istio.md"));
    // Every kustomization it applies exists.
    let mut applied = 0;
    for line in doc.lines() {
        if let Some(rest) = line.split("kubectl apply -k ").nth(1) {
            let dir = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !(c.is_alphanumeric() || "/-_".contains(c)));
            assert!(
                root().join(dir).join("kustomization.yaml").is_file(),
                "docs/istio.md applies {dir}, which is no kustomization"
            );
            applied += 1;
        }
    }
    assert!(applied >= 2, "docs/istio.md applies no kustomization");
    // The labels, namespace and port it uses are the manifests'.
    let documents = rendered("daemonset");
    let namespace = only(&documents, "Namespace")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(doc.contains(&format!("-n {namespace}")));
    let labels = workload(&documents)["spec"]["template"]["metadata"]["labels"].clone();
    let mut selectors = 0;
    for (at, _) in doc.match_indices("-l ") {
        let selector = doc[at + 3..].split_whitespace().next().unwrap();
        let Some((key, value)) = selector.split_once('=') else {
            continue;
        };
        if key.starts_with("app.kubernetes.io/") {
            assert_eq!(labels[key], value, "docs/istio.md selects {selector}");
            selectors += 1;
        }
    }
    assert!(selectors >= 1, "docs/istio.md selects no spliced pod");
    let port = squid_facts(&read(&squid_conf_path())).http_port;
    assert!(doc.contains(&format!("PROXY_PORT={port}")));
    // Every file it names exists.
    let mut named: BTreeMap<String, bool> = BTreeMap::new();
    for word in doc.split(|c: char| c.is_whitespace() || "`()[],".contains(c)) {
        let word = word.trim_end_matches([':', '.']);
        if word.starts_with("deploy/") || word == "Dockerfile" {
            named.insert(word.to_owned(), root().join(word).exists());
        }
    }
    let missing: Vec<&String> = named.iter().filter(|(_, e)| !**e).map(|(w, _)| w).collect();
    assert!(
        missing.is_empty(),
        "docs/istio.md names missing {missing:?}"
    );
}
