//! The Istio egress seed scenario on every data plane: the real curl fetches a
//! file over HTTPS from a real TLS origin (`openssl s_server`) through spliced, with
//! `HTTPS_PROXY` spelled both ways the Istio task uses, and the access log shows
//! the Squid line the task expects, field by field.
//! Every tunnel must have run on the data plane the test is aimed at: the JSON
//! record names it; with Squid lines, which do not, `/metrics` (`--admin`) does.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::{SystemTime, UNIX_EPOCH},
};

use spliced_tests::{
    netns::Topology,
    tls::{curl, TlsOrigin},
    Proxy,
};

const MIB: u64 = 1 << 20;
/// Size of the file the origin serves in the seed scenario.
const BODY_LEN: u64 = 3 * MIB;
/// Length of the proxy's `200 Connection established` answer.
const CONNECT_OK_LEN: u64 = 39;
/// Room for the TLS handshake, record overhead and the origin's response head.
const TLS_OVERHEAD: u64 = 100 * 1024;

/// Fails the test unless curl succeeded and `out` holds exactly `body`.
fn assert_fetched(output: &Output, out: &Path, body: &[u8], proxy: &Proxy) {
    assert!(
        output.status.success(),
        "curl failed ({}): {}\nproxy:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        proxy.stderr()
    );
    let fetched = std::fs::read(out).expect("read curl output");
    assert_eq!(fetched.len(), body.len(), "size of the fetched file");
    let first_difference = fetched.iter().zip(body).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "fetched file differs from the origin's"
    );
}

/// What a tunnel's Squid line must say, besides the time fields.
struct Expected<'a> {
    client: &'a str,
    target: &'a str,
    upstream: &'a str,
    min_bytes: u64,
    max_bytes: u64,
}

/// Checks one `logformat squid` line field by field:
/// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
fn assert_squid_line(line: &str, expected: &Expected) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 10, "field count of {line:?}");

    // %ts.%03tu: seconds, a dot, exactly three digits of milliseconds; recent.
    let (secs, millis) = fields[0]
        .split_once('.')
        .unwrap_or_else(|| panic!("timestamp without millis: {line:?}"));
    assert!(
        millis.len() == 3 && millis.bytes().all(|b| b.is_ascii_digit()),
        "millis of {line:?}"
    );
    let logged = secs.parse::<f64>().expect("seconds") + millis.parse::<f64>().unwrap() / 1000.0;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        logged <= now + 1.0 && logged > now - 60.0,
        "timestamp {logged} is not within the last minute of {now}: {line:?}"
    );

    // %6tr: milliseconds, right-aligned in six columns after one space.
    let duration: u64 = fields[1].parse().expect("duration");
    assert!(duration < 60_000, "duration of {line:?}");
    assert!(
        line[fields[0].len()..].starts_with(&format!(" {duration:>6} ")),
        "duration not right-aligned in 6 columns: {line:?}"
    );

    assert_eq!(fields[2], expected.client, "client of {line:?}");
    assert_eq!(fields[3], "TCP_TUNNEL/200", "result of {line:?}");
    let bytes: u64 = fields[4].parse().expect("bytes");
    assert!(
        (expected.min_bytes..expected.max_bytes).contains(&bytes),
        "bytes {bytes} not in {}..{}: {line:?}",
        expected.min_bytes,
        expected.max_bytes
    );
    assert_eq!(fields[5], "CONNECT", "method of {line:?}");
    assert_eq!(fields[6], expected.target, "target of {line:?}");
    assert_eq!(fields[7], "-", "user of {line:?}");
    assert_eq!(
        fields[8],
        format!("HIER_DIRECT/{}", expected.upstream),
        "hierarchy of {line:?}"
    );
    assert_eq!(fields[9], "-", "mime type of {line:?}");
}

/// Starts spliced on loopback with the seed's policy. With Squid lines it has
/// an admin listener, for [`Proxy::assert_tunnels_ran_on_by_metrics`].
fn start_proxy(plane: &str, origin: &TlsOrigin, json: bool) -> Proxy {
    let port = origin.addr.port().to_string();
    let mut args = vec!["--dataplane", plane, "--connect-ports", &port];
    if json {
        args.extend(["--log-format", "json"]);
    } else {
        args.extend(["--admin", "127.0.0.1:0"]);
    }
    Proxy::start(&args)
}

/// The seed: curl → spliced → `s_server`, all on loopback, 3 MiB over TLS.
fn istio_seed(plane: &str) {
    let origin = TlsOrigin::start("DNS:localhost");
    let body = origin.serve_random_file("body.bin", BODY_LEN as usize);
    let url = format!("https://localhost:{}/body.bin", origin.addr.port());
    let target = format!("localhost:{}", origin.addr.port());
    let downloads = tempfile::tempdir().expect("tempdir");
    let expected = Expected {
        client: "127.0.0.1",
        target: &target,
        upstream: "127.0.0.1",
        min_bytes: BODY_LEN + CONNECT_OK_LEN,
        max_bytes: BODY_LEN + TLS_OVERHEAD,
    };

    // The default Squid format, with both spellings of HTTPS_PROXY.
    let proxy = start_proxy(plane, &origin, false);
    let spellings = [
        format!("http://{}", proxy.addr),
        // As the Istio task writes it: no scheme.
        proxy.addr.to_string(),
    ];
    for (i, https_proxy) in spellings.iter().enumerate() {
        let out = downloads.path().join(format!("out{i}.bin"));
        let output = curl(
            Command::new("curl"),
            https_proxy,
            &origin.certificate(),
            &url,
            &out,
        );
        assert_fetched(&output, &out, &body, &proxy);
        let lines = proxy.wait_access_lines(i + 1);
        assert_eq!(lines.len(), i + 1, "one line per tunnel: {lines:#?}");
        assert_squid_line(&lines[i], &expected);
    }
    proxy.assert_tunnels_ran_on_by_metrics(plane, spellings.len() as u64);

    // The JSON format names the data plane that moved the bytes.
    let proxy = start_proxy(plane, &origin, true);
    let out = downloads.path().join("out-json.bin");
    let https_proxy = format!("http://{}", proxy.addr);
    let output = curl(
        Command::new("curl"),
        &https_proxy,
        &origin.certificate(),
        &url,
        &out,
    );
    assert_fetched(&output, &out, &body, &proxy);
    proxy.assert_tunnels_ran_on(plane, 1);
    let records = proxy.wait_json_records(1);
    let record = &records[0];
    assert_eq!(record["dataplane"], plane, "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["result"], "TCP_TUNNEL", "{record}");
    assert_eq!(record["method"], "CONNECT", "{record}");
    assert_eq!(record["target"], target.as_str(), "{record}");
    assert_eq!(record["hierarchy"], "HIER_DIRECT", "{record}");
    assert_eq!(record["upstream"], origin.addr.to_string(), "{record}");
    assert_eq!(record["end"], "closed", "{record}");
    let to_client = record["bytes_to_client"].as_u64().expect("bytes_to_client");
    assert!(
        (expected.min_bytes..expected.max_bytes).contains(&to_client),
        "{record}"
    );
    // The client sent a TLS handshake and a GET: more than nothing, far less than
    // the body.
    let from_client = record["bytes_from_client"]
        .as_u64()
        .expect("bytes_from_client");
    assert!((100..16 * 1024).contains(&from_client), "{record}");
}

/// The seed across hosts: curl in the client namespace, spliced in the proxy
/// namespace, the origin in the server namespace with a certificate for its IP.
fn origin_in_another_namespace(plane: &str) {
    let topology = Topology::new();
    let origin_addr = SocketAddr::from((Topology::SERVER_IP, 8443));
    let origin = TlsOrigin::start_in(
        &topology.server,
        origin_addr,
        &format!("IP:{}", Topology::SERVER_IP),
    );
    let body = origin.serve_random_file("body.bin", MIB as usize);
    let proxy = Proxy::start_in(
        &topology.proxy,
        &[
            "--dataplane",
            plane,
            "--connect-ports",
            "8443",
            "--listen",
            &format!("{}:3128", Topology::PROXY_IP),
            // Squid lines do not name the data plane; /metrics counts by it.
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let downloads = tempfile::tempdir().expect("tempdir");
    let out = downloads.path().join("out.bin");
    let output = curl(
        topology.client.command("curl"),
        &format!("http://{}", proxy.addr),
        &origin.certificate(),
        &format!("https://{origin_addr}/body.bin"),
        &out,
    );
    assert_fetched(&output, &out, &body, &proxy);
    let lines = proxy.wait_access_lines(1);
    assert_squid_line(
        &lines[0],
        &Expected {
            client: &Topology::CLIENT_IP.to_string(),
            target: &origin_addr.to_string(),
            upstream: &Topology::SERVER_IP.to_string(),
            min_bytes: MIB + CONNECT_OK_LEN,
            max_bytes: MIB + TLS_OVERHEAD,
        },
    );
    proxy.assert_tunnels_ran_on_by_metrics(plane, 1);
}

spliced_tests::on_every_data_plane!(istio_seed, origin_in_another_namespace);
