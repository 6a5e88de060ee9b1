//! Parent proxies (`cache_peer`, issue 15), end to end: spliced chained to a
//! real Squid (Debian's `/usr/sbin/squid`, started here on loopback with its
//! own minimal squid.conf) and to a second spliced (which can require Basic
//! credentials, for `login=`). curl fetches a TLS origin byte-exact through
//! spliced → parent → origin; plain HTTP goes to the parent in absolute form;
//! the hierarchy codes, failover (to the next parent, to DIRECT), `never_direct`
//! and `connect-fail-limit` are checked in the JSON access log; every data
//! plane (copy, splice, sockmap, packet with promotion) runs tunnels whose
//! upstream socket is the parent's; bad `cache_peer` lines are refused with
//! FILE:LINE.
//!
//! Every wait is bounded: sockets by [`IO_TIMEOUT`], curl by `--max-time`,
//! start-ups by [`START`].

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use spliced_tests::{
    expect_connect_ok, open_tunnel, pattern,
    proxy::spliced_bin,
    raw_request, status_of,
    tls::{curl, TlsOrigin},
    upstream::{exchange, header},
    wait_until, Mode, Netns, Proxy, Upstream, IO_TIMEOUT,
};

/// How long a parent may take to start accepting.
const START: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Parents.
// ---------------------------------------------------------------------------

/// A free port of 127.0.0.1 (nothing listens on it once this returns).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// A real Squid on 127.0.0.1, in the foreground (`-N`), with its own
/// configuration, logs and pid file in a temporary directory; killed when
/// dropped.
struct Squid {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Squid {
    fn start() -> Self {
        let squid = Path::new("/usr/sbin/squid");
        assert!(
            squid.exists(),
            "/usr/sbin/squid is missing: run `cargo xtask setup` (it installs Debian's squid)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // Squid drops root for its cache_effective_user, which must write here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             http_access allow all\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             access_log stdio:{d}/access.log squid\n\
             cache_log {d}/cache.log\n\
             pid_filename {d}/squid.pid\n\
             coredump_dir {d}\n\
             shutdown_lifetime 0 seconds\n"
        );
        let conf_path = dir.path().join("squid.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new(squid)
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn squid");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut squid = Self { child, addr, dir };
        let up = wait_until(START, || {
            TcpStream::connect(addr).is_ok() || squid.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            up && squid.child.try_wait().ok().flatten().is_none(),
            "squid did not start on {addr}:\n{}",
            fs::read_to_string(squid.dir.path().join("cache.log")).unwrap_or_default()
        );
        squid
    }

    /// Squid's access log lines so far.
    fn access_lines(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake parent: answers every CONNECT with `answer` (in one write), then
/// echoes what it receives.
fn fake_parent(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
                let mut reader = BufReader::new(stream.try_clone().ok()?);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
                        break;
                    }
                }
                let mut out = stream;
                out.write_all(answer).ok()?;
                let mut buf = [0u8; 4096];
                loop {
                    let n = reader.read(&mut buf).ok()?;
                    if n == 0 {
                        return Some(());
                    }
                    out.write_all(&buf[..n]).ok()?;
                }
            });
        }
    });
    addr
}

/// A directory with squid.conf files and their JSON-logging spliced.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// spliced with `conf` (written as `name`), a JSON access log and `extra`.
    fn spliced(&self, name: &str, conf: &str, extra: &[&str]) -> Proxy {
        let path = self.write(name, conf);
        let mut args = vec!["-f", path.to_str().unwrap(), "--log-format", "json"];
        args.extend_from_slice(extra);
        Proxy::start(&args)
    }
}

/// A record's `hierarchy`, `upstream` and `peer`, for assertions.
fn route_of(record: &serde_json::Value) -> (String, String, String) {
    let text = |key: &str| record[key].as_str().unwrap_or("-").to_owned();
    (text("hierarchy"), text("upstream"), text("peer"))
}

/// curl through `proxy` to `https://localhost:PORT/blob`: the body must be
/// byte-exact.
fn fetch_blob(proxy: &Proxy, origin: &TlsOrigin, expected: &[u8]) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let url = format!("https://localhost:{}/blob", origin.addr.port());
    let output = curl(
        Command::new("curl"),
        &format!("http://{}", proxy.addr),
        &origin.certificate(),
        &url,
        out.path(),
    );
    assert!(
        output.status.success(),
        "curl failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        proxy.stderr()
    );
    let got = fs::read(out.path()).unwrap();
    assert!(
        got == expected,
        "body differs ({} of {} bytes)",
        got.len(),
        expected.len()
    );
}

/// A plain-HTTP origin on 127.0.0.1 answering every request with the
/// request's line and header fields as its body.
fn echo_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
                let mut reader = BufReader::new(stream.try_clone().ok()?);
                let mut out = stream;
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).ok()? == 0 {
                            return Some(());
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{head}",
                        head.len()
                    );
                    out.write_all(answer.as_bytes()).ok()?;
                }
            });
        }
    });
    addr
}

/// `GET url` through `proxy` as a plain-HTTP proxy request.
fn plain_get(proxy: SocketAddr, url: &str) -> String {
    raw_request(
        proxy,
        format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// curl → spliced → Squid → TLS origin, byte-exact; a plain GET goes to
/// Squid in absolute form (Squid's `Via` reaches the origin). Both logs
/// agree: spliced `FIRSTUP_PARENT` with Squid's address, Squid `HIER_DIRECT`.
#[test]
fn through_squid() {
    let squid = Squid::start();
    let origin = TlsOrigin::start("DNS:localhost");
    let blob = origin.serve_random_file("blob", (3 * MIB) as usize);
    let http = echo_origin();
    let site = Site::new();
    let proxy = site.spliced(
        "child.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {} 0 no-query no-digest name=squid\n\
             never_direct allow CONNECT\n\
             http_access allow all\n",
            squid.addr.port()
        ),
        &["--dataplane", "splice"],
    );
    fetch_blob(&proxy, &origin, &blob);
    let answer = plain_get(proxy.addr, &format!("http://{http}/plain?x=1"));
    assert_eq!(status_of(&answer), 200, "{answer}\n{}", proxy.stderr());
    assert!(answer.contains("GET /plain?x=1 HTTP/1.1"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("squid"),
        "no Squid Via: {answer}"
    );

    let records = proxy.wait_json_records(2);
    let squid_addr = squid.addr.to_string();
    for record in &records {
        assert_eq!(
            route_of(record),
            ("FIRSTUP_PARENT".into(), squid_addr.clone(), "squid".into()),
            "{record}"
        );
        assert_eq!(record["status"], 200, "{record}");
    }
    assert_eq!(records[0]["method"], "CONNECT");
    assert_eq!(records[0]["dataplane"], "splice");
    assert_eq!(records[1]["method"], "GET");
    // Squid logs the start-up probe's empty connection too.
    let mut lines = Vec::new();
    wait_until(START, || {
        lines = squid.access_lines();
        lines.retain(|line| !line.contains("error:transaction-end-before-headers"));
        lines.len() >= 2
    });
    assert!(
        lines[0].contains("CONNECT localhost:") && lines[0].contains("HIER_DIRECT/"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains(&format!("GET http://{http}/plain")),
        "{lines:#?}"
    );
}

/// A parent spliced requiring Basic credentials: `login=` opens tunnels and
/// plain requests; a wrong password gets the parent's 407 relayed (no
/// failover), logged with the parent's route.
#[test]
fn login_to_a_parent_that_requires_credentials() {
    let site = Site::new();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let passwd = site.write("passwd", &format!("alice:{hash}\n"));
    let origin = TlsOrigin::start("DNS:localhost");
    let blob = origin.serve_random_file("blob", MIB as usize);
    let http = echo_origin();
    let parent = site.spliced(
        "parent.conf",
        &format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
             acl users proxy_auth REQUIRED\n\
             http_access allow users\n\
             http_access deny all\n",
            passwd.display()
        ),
        // Not the packet plane: two packet planes on one host must not both
        // promote a tunnel chained through loopback (README, "Known
        // limitations"); the child's runs on it.
        &["--dataplane", "splice"],
    );
    let child_conf = |login: &str| {
        format!(
            "cache_peer 127.0.0.1 parent {} 0 no-query name=up login={login}\n\
             never_direct allow all\n\
             http_access allow all\n",
            parent.addr.port()
        )
    };
    let good = site.spliced("good.conf", &child_conf("alice:s3cret"), &[]);
    fetch_blob(&good, &origin, &blob);
    let answer = plain_get(good.addr, &format!("http://{http}/with-login"));
    assert_eq!(status_of(&answer), 200, "{answer}\n{}", good.stderr());
    // The parent used the credentials and did not pass them on.
    assert!(
        !answer.to_ascii_lowercase().contains("proxy-authorization"),
        "{answer}"
    );
    let records = good.wait_json_records(2);
    for record in &records {
        assert_eq!(record["hierarchy"], "FIRSTUP_PARENT", "{record}");
        assert_eq!(record["status"], 200, "{record}");
    }
    let parent_records = parent.wait_json_records(2);
    for record in &parent_records {
        assert_eq!(record["user"], "alice", "{record}");
    }

    let bad = site.spliced("bad.conf", &child_conf("alice:wrong"), &[]);
    let answer = raw_request(
        bad.addr,
        format!(
            "CONNECT localhost:{0} HTTP/1.1\r\nHost: localhost:{0}\r\n\r\n",
            origin.addr.port()
        )
        .as_bytes(),
    );
    assert_eq!(status_of(&answer), 407, "{answer}\n{}", bad.stderr());
    let record = &bad.wait_json_records(1)[0];
    assert_eq!(record["status"], 407, "{record}");
    assert_eq!(record["hierarchy"], "FIRSTUP_PARENT", "{record}");
    assert_eq!(record["peer"], "up", "{record}");
}

/// A dead first parent: the next one serves (`ANY_OLD_PARENT`); both dead:
/// DIRECT (with `nonhierarchical_direct off`, after the parents); both dead
/// and `never_direct`: 502 while they are tried, 503 once
/// `connect-fail-limit=1` marked them dead (no route left); the `default`
/// parent is the last resort, and `cache_peer_access` can deny it.
#[test]
fn failover_to_the_next_parent_and_to_direct() {
    let site = Site::new();
    let upstream = Upstream::start();
    let target = upstream.addr.to_string();
    let live = Proxy::start(&["--connect-ports", &upstream.addr.port().to_string()]);
    let (dead1, dead2) = (free_port(), free_port());
    let check_to = |proxy: &Proxy, to: &str, seed: u64| {
        let stream = open_tunnel(proxy.addr, to);
        let h = header(64 * 1024, 64 * 1024, seed, Mode::Concurrent);
        let result = exchange(stream, h, false);
        assert_eq!(result.received, Ok(h.down), "{}", proxy.stderr());
        assert_eq!(upstream.result().received, Ok(h.up));
    };
    let check = |proxy: &Proxy, seed: u64| check_to(proxy, &target, seed);

    let next = site.spliced(
        "next.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {dead1} 0 no-query name=dead\n\
             cache_peer localhost parent {} 0 no-query name=live\n\
             never_direct allow all\n\
             http_access allow all\n",
            live.addr.port()
        ),
        &[],
    );
    check(&next, 1);
    let record = &next.wait_json_records(1)[0];
    assert_eq!(
        route_of(record),
        (
            "ANY_OLD_PARENT".into(),
            live.addr.to_string(),
            "live".into()
        ),
        "{record}"
    );

    let direct = site.spliced(
        "direct.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {dead1} 0 no-query name=a\n\
             cache_peer 127.0.0.1 parent {dead2} 0 no-query name=b\n\
             nonhierarchical_direct off\n\
             http_access allow all\n"
        ),
        &[],
    );
    check(&direct, 2);
    let record = &direct.wait_json_records(1)[0];
    assert_eq!(
        route_of(record),
        ("HIER_DIRECT".into(), target.clone(), "-".into()),
        "{record}"
    );

    let never = site.spliced(
        "never.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {dead1} 0 no-query name=a connect-fail-limit=1\n\
             cache_peer 127.0.0.1 parent {dead2} 0 no-query name=b connect-fail-limit=1\n\
             never_direct allow all\n\
             http_access allow all\n"
        ),
        &[],
    );
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let first = raw_request(never.addr, connect.as_bytes());
    assert_eq!(status_of(&first), 502, "{first}\n{}", never.stderr());
    let second = raw_request(never.addr, connect.as_bytes());
    assert_eq!(status_of(&second), 503, "{second}\n{}", never.stderr());
    assert!(
        never.logged("is dead after 1 failed connections"),
        "{}",
        never.stderr()
    );
    let records = never.wait_json_records(2);
    assert_eq!(records[1]["hierarchy"], "HIER_NONE", "{}", records[1]);

    // never_direct without any parent: no route, 503 (as Squid), nothing
    // connected upstream.
    let nowhere = site.spliced(
        "nowhere.conf",
        "never_direct allow all\nhttp_access allow all\n",
        &[],
    );
    let answer = raw_request(nowhere.addr, connect.as_bytes());
    assert_eq!(status_of(&answer), 503, "{answer}\n{}", nowhere.stderr());
    assert!(
        nowhere.logged("have no route and get 503"),
        "{}",
        nowhere.stderr()
    );

    // dst ACLs in always_direct judge the target's resolved addresses, as
    // Squid's: a name (from hosts_file) on loopback goes direct although
    // never_direct sends everything else to the (dead) parent.
    let hosts = site.write("hosts", "127.0.0.1 inside.test\n");
    let inside = site.spliced(
        "inside.conf",
        &format!(
            "hosts_file {}\n\
             acl loopback_dst dst 127.0.0.0/8\n\
             cache_peer 127.0.0.1 parent {dead1} 0 no-query name=a\n\
             always_direct allow loopback_dst\n\
             never_direct allow all\n\
             http_access allow all\n",
            hosts.display()
        ),
        &[],
    );
    check_to(&inside, &format!("inside.test:{}", upstream.addr.port()), 9);
    let record = &inside.wait_json_records(1)[0];
    assert_eq!(
        route_of(record),
        ("HIER_DIRECT".into(), target.clone(), "-".into()),
        "{record}"
    );

    // The default parent is the last resort, wherever it is listed; and
    // cache_peer_access can take it away.
    let conf = |access: &str| {
        format!(
            "cache_peer 127.0.0.1 parent {} 0 no-query name=fallback default\n\
             cache_peer 127.0.0.1 parent {dead1} 0 no-query name=first\n\
             {access}\
             never_direct allow all\n\
             http_access allow all\n",
            live.addr.port()
        )
    };
    let default = site.spliced("default.conf", &conf(""), &[]);
    check(&default, 3);
    let record = &default.wait_json_records(1)[0];
    assert_eq!(
        route_of(record),
        (
            "DEFAULT_PARENT".into(),
            live.addr.to_string(),
            "fallback".into()
        ),
        "{record}"
    );
    let denied = site.spliced(
        "denied.conf",
        &conf("cache_peer_access fallback deny all\n"),
        &[],
    );
    let answer = raw_request(denied.addr, connect.as_bytes());
    assert_eq!(status_of(&answer), 502, "{answer}");
    // The last route tried was the dead parent (no route connected: no
    // hierarchy code, as in Squid's `HIER_NONE/-`).
    let record = &denied.wait_json_records(1)[0];
    assert!(
        record["end"]
            .as_str()
            .is_some_and(|end| end.starts_with("parent first: connect to")),
        "{record}"
    );
    assert_eq!(record["hierarchy"], "HIER_NONE", "{record}");
}

/// A parent's `2xx` with bytes behind it: the client gets spliced's own
/// `200`, then those bytes, then the tunnel; a parent's `503` is relayed.
#[test]
fn bytes_behind_the_parents_answer_and_its_errors() {
    let site = Site::new();
    let early =
        fake_parent(b"HTTP/1.1 200 Connection established\r\nX-Parent: fake\r\n\r\nHELLO-EARLY");
    let busy = fake_parent(
        b"HTTP/1.1 503 Parent Busy\r\nContent-Type: text/html\r\nX-Squid-Error: ERR_BUSY 0\r\n\
          Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          4\r\nbusy\r\n6\r\n, try \r\n5\r\nlater\r\n0\r\n\r\n",
    );
    for (name, parent, status) in [("early", early, 200), ("busy", busy, 503)] {
        let proxy = site.spliced(
            &format!("{name}.conf"),
            &format!(
                "cache_peer 127.0.0.1 parent {} 0 no-query name={name}\n\
                 never_direct allow all\n\
                 http_access allow all\n",
                parent.port()
            ),
            &["--dataplane", "copy", "--admin", "127.0.0.1:0"],
        );
        let mut stream = TcpStream::connect(proxy.addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
            .write_all(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
            .unwrap();
        if status == 200 {
            expect_connect_ok(&mut stream);
            let mut hello = [0u8; 11];
            stream.read_exact(&mut hello).unwrap();
            assert_eq!(&hello, b"HELLO-EARLY");
            stream.write_all(b"ping").unwrap();
            let mut pong = [0u8; 4];
            stream.read_exact(&mut pong).unwrap();
            assert_eq!(&pong, b"ping");
            drop(stream);
        } else {
            // The parent's answer, relayed as Squid does: its status line,
            // its end-to-end fields, its body (framed by spliced).
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            assert_eq!(
                answer,
                "HTTP/1.1 503 Parent Busy\r\nContent-Type: text/html\r\n\
                 X-Squid-Error: ERR_BUSY 0\r\nContent-Length: 15\r\nConnection: close\r\n\r\n\
                 busy, try later"
            );
            let record = &proxy.wait_json_records(1)[0];
            assert_eq!(record["bytes_to_client"], answer.len(), "{record}");
            assert!(
                record["end"]
                    .as_str()
                    .is_some_and(|end| end.contains("parent answered 503 Parent Busy")),
                "{record}"
            );
        }
        let record = &proxy.wait_json_records(1)[0];
        assert_eq!(record["status"], status, "{record}");
        assert_eq!(record["hierarchy"], "FIRSTUP_PARENT", "{record}");
        assert_eq!(record["result"], "TCP_TUNNEL", "{record}");
        if status == 200 {
            // The head, the early bytes and the echoed ping.
            assert_eq!(record["bytes_to_client"], 39 + 11 + 4, "{record}");
        }
        let admin = proxy.admin_addr().expect("admin listener");
        let metrics = spliced_tests::proxy::http_get(admin, "/metrics").unwrap();
        let result = if status == 200 {
            "connected"
        } else {
            "refused"
        };
        let series =
            format!("spliced_parent_connections_total{{peer=\"{name}\",result=\"{result}\"}} 1");
        assert!(metrics.contains(&series), "no {series}:\n{metrics}");
    }
}

/// Every data plane runs tunnels whose upstream is a parent's socket:
/// byte-exact both ways, `dataplane` in each record.
#[test]
fn data_planes_through_a_parent() {
    let site = Site::new();
    let upstream = Upstream::start();
    let target = upstream.addr.to_string();
    let parent = Proxy::start(&[
        "--connect-ports",
        &upstream.addr.port().to_string(),
        "--dataplane",
        "copy",
    ]);
    let conf = format!(
        "cache_peer 127.0.0.1 parent {} 0 no-query name=up\n\
         never_direct allow all\n\
         http_access allow all\n",
        parent.addr.port()
    );
    for (index, plane) in ["copy", "splice", "sockmap"].into_iter().enumerate() {
        let proxy = site.spliced(&format!("{plane}.conf"), &conf, &["--dataplane", plane]);
        for (n, mode) in [Mode::Concurrent, Mode::ServerFirst]
            .into_iter()
            .enumerate()
        {
            let seed = 10 * index as u64 + n as u64;
            let h = header(4 * MIB, 4 * MIB, seed, mode);
            let result = exchange(open_tunnel(proxy.addr, &target), h, false);
            assert_eq!(result.received, Ok(h.down), "{plane}: {}", proxy.stderr());
            assert_eq!(upstream.result().received, Ok(h.up), "{plane}");
        }
        proxy.assert_tunnels_ran_on(plane, 2);
        for record in proxy.wait_json_records(2) {
            assert_eq!(record["hierarchy"], "FIRSTUP_PARENT", "{record}");
            assert_eq!(record["upstream"], parent.addr.to_string(), "{record}");
        }
    }
}

/// The packet plane promotes a tunnel whose upstream is a parent's socket
/// (`--promote-after`), in a namespace of its own: the client's and the
/// parent's connections become one TCP end to end.
#[test]
fn packet_plane_promotes_through_a_parent() {
    let ns = Netns::with_prefix("par");
    ns.set_default_tcp_buffers();
    let upstream = Upstream::start_in(&ns, "127.0.0.1:0".parse().unwrap());
    let parent = Proxy::start_in(
        &ns,
        &[
            "--connect-ports",
            &upstream.addr.port().to_string(),
            "--dataplane",
            "copy",
        ],
    );
    let site = Site::new();
    let conf = site.write(
        "packet.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {} 0 no-query name=up\n\
             never_direct allow all\n\
             http_access allow all\n",
            parent.addr.port()
        ),
    );
    for promote_after in [0u64, 256 * 1024] {
        let proxy = Proxy::start_in(
            &ns,
            &[
                "-f",
                conf.to_str().unwrap(),
                "--dataplane",
                "packet",
                "--promote-after",
                &promote_after.to_string(),
                "--log-format",
                "json",
            ],
        );
        let target = upstream.addr.to_string();
        let addr = proxy.addr;
        let h = header(4 * MIB, MIB, 40 + promote_after, Mode::AnswerAfterEof);
        let result = ns.enter(move || {
            let mut stream = open_tunnel(addr, &target);
            if promote_after == 0 {
                // Promoted before the first byte (as in tests/tests/packet.rs).
                std::thread::sleep(Duration::from_millis(300));
            }
            // Paced (64 KiB per 20 ms): still sending when a cut-over slowed
            // by a loaded machine ends, so the client's FIN never comes
            // during the hold.
            stream.write_all(&h.encode()).expect("send header");
            let mut at = 0;
            while at < h.up {
                let to = (at + 64 * 1024).min(h.up);
                pattern::send_range(&mut stream, h.seed, at, to).expect("client send");
                at = to;
                std::thread::sleep(Duration::from_millis(20));
            }
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            pattern::receive_checked(&mut stream, h.seed + 1)
        });
        assert_eq!(result, Ok(h.down), "{}", proxy.stderr());
        assert_eq!(upstream.result().received, Ok(h.up));
        assert!(
            wait_until(Duration::from_secs(30), || proxy
                .logged("packet: tunnel promoted after")),
            "not promoted:\n{}",
            proxy.stderr()
        );
        let record = &proxy.wait_json_records(1)[0];
        assert_eq!(
            record["dataplane"],
            "packet",
            "{record}\n{}",
            proxy.stderr()
        );
        assert!(record["bytes_before_promotion"].is_object(), "{record}");
        assert_eq!(record["hierarchy"], "FIRSTUP_PARENT", "{record}");
    }
}

/// Bad parent lines are refused by `spliced check` with FILE:LINE.
#[test]
fn cache_peer_config_errors() {
    let site = Site::new();
    let cases: &[(&str, &str)] = &[
        (
            "cache_peer proxy.test sibling 3128 0 no-query",
            "cache_peer type sibling not supported",
        ),
        (
            "cache_peer proxy.test multicast 3128 0",
            "type multicast not supported",
        ),
        (
            "cache_peer proxy.test parent 3128 0 round-robin",
            "round-robin parent selection is not implemented",
        ),
        (
            "cache_peer proxy.test parent 3128 0 login=PASSTHRU",
            "only login=USER:PASSWORD",
        ),
        (
            "cache_peer proxy.test parent 0 0",
            "expected an HTTP port number",
        ),
        (
            "cache_peer proxy.test parent 3128",
            "expected: cache_peer HOST parent",
        ),
        (
            "cache_peer proxy.test parent 3128 0 frobnicate",
            "unknown or unsupported cache_peer option",
        ),
        (
            "cache_peer_access nosuch allow all",
            "no cache_peer with this name",
        ),
        ("never_direct allow nosuchacl", "ACL is not defined"),
        ("prefer_direct maybe", "expected on or off"),
        (
            "cache_peer_domain proxy.test .example.com",
            "cache_peer_domain is not supported",
        ),
    ];
    for (index, (line, message)) in cases.iter().enumerate() {
        let path = site.write(
            &format!("bad{index}.conf"),
            &format!("acl a src 127.0.0.1\ncache_peer ok.test parent 3128 0 no-query name=ok\n{line}\nhttp_access allow all\n"),
        );
        let output = Command::new(spliced_bin())
            .arg("check")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run spliced check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{line}: accepted");
        let at = format!("{}:3: ", path.display());
        assert!(
            stderr.contains(&at) && stderr.contains(message),
            "{line}: expected {at}…{message}…, got: {stderr}"
        );
    }
    // The harmless options load, with a warning each; the duplicate name does not.
    let path = site.write(
        "ok.conf",
        "cache_peer p.test parent 3128 3130 no-digest proxy-only no-netdb-exchange weight=2 name=p\n\
         cache_peer_access p allow all\nnever_direct allow all\nhttp_access allow all\n",
    );
    let output = Command::new(spliced_bin())
        .arg("check")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains("cache_peer p.test parent 3128 0 no-query name=p"),
        "{stdout}"
    );
    assert!(stdout.contains("cache_peer_access p allow all"), "{stdout}");
    assert!(
        stderr.contains("no-digest") && stderr.contains("ICP port is ignored"),
        "{stderr}"
    );
    let path = site.write(
        "dup.conf",
        "cache_peer p.test parent 3128 0 no-query\ncache_peer p.test parent 3129 0 no-query\n",
    );
    let output = Command::new(spliced_bin())
        .arg("check")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:2: cache_peer name already used",
            path.display()
        )),
        "{stderr}"
    );
}

/// A plain GET (hierarchical: parents first, then DIRECT under Squid's
/// defaults) whose parent is down goes DIRECT; a parent dead after
/// `connect-fail-limit=1` failures is probed again and used once it listens.
#[test]
fn plain_http_fails_over_and_a_dead_parent_comes_back() {
    let site = Site::new();
    let http = echo_origin();
    let port = free_port();
    let proxy = site.spliced(
        "plain.conf",
        &format!(
            "cache_peer 127.0.0.1 parent {port} 0 no-query name=back connect-fail-limit=1\n\
             http_access allow all\n"
        ),
        &[],
    );
    let answer = plain_get(proxy.addr, &format!("http://{http}/direct"));
    assert_eq!(status_of(&answer), 200, "{answer}\n{}", proxy.stderr());
    let record = &proxy.wait_json_records(1)[0];
    assert_eq!(
        route_of(record),
        ("HIER_DIRECT".into(), http.to_string(), "-".into()),
        "{record}"
    );
    assert!(
        proxy.logged("parent back (127.0.0.1:"),
        "{}",
        proxy.stderr()
    );

    // Dead now: skipped, DIRECT at once. Then the parent starts listening:
    // a probe (at most one per connect timeout, started by a request)
    // finds it, and the next requests use it.
    let parent = Proxy::start(&["--listen", &format!("127.0.0.1:{port}")]);
    let mut through_parent = false;
    for attempt in 0..60 {
        let answer = plain_get(proxy.addr, &format!("http://{http}/attempt{attempt}"));
        assert_eq!(status_of(&answer), 200, "{answer}\n{}", proxy.stderr());
        let records = proxy.wait_json_records(attempt + 2);
        if records[attempt + 1]["hierarchy"] == "FIRSTUP_PARENT" {
            through_parent = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        through_parent,
        "the parent never came back:\n{}",
        proxy.stderr()
    );
    assert!(
        proxy.logged("parent back (127.0.0.1:"),
        "{}",
        proxy.stderr()
    );
    assert!(proxy.logged("is alive again"), "{}", proxy.stderr());
    // The parent logged the GET (and the probe's empty connection).
    assert!(
        wait_until(START, || parent
            .access_lines()
            .iter()
            .any(|line| line.contains(" GET http://"))),
        "{:#?}",
        parent.access_lines()
    );
}
