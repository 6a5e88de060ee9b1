//! Basic authentication at a bounded cost (`auth_param basic children`,
//! `credentialsttl`): floods of right and wrong passwords against real bcrypt
//! hashes while tunnels keep opening, the verification pool's bound in the
//! metrics and as 503s, cached credentials expiring and being forgotten when a
//! reload changes the password file, a wrong password never accepted
//! after the right one was cached, and a herd of the same credentials
//! verified once.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use spliced_tests::{echo::EchoProcess, proxy::http_get, status_of, wait_until, Proxy, IO_TIMEOUT};

/// A proxy with `conf` (a squid.conf in `dir`), an admin listener and splice.
fn start(conf: &Path) -> Proxy {
    let conf = conf.to_str().expect("utf-8 path");
    Proxy::start(&[
        "-f",
        conf,
        "--admin",
        "127.0.0.1:0",
        "--dataplane",
        "splice",
    ])
}

/// The squid.conf of these tests: tunnels to `open_port` need no
/// credentials, every other one needs a user of `passwd`.
fn conf_text(passwd: &Path, open_port: u16, extra: &str) -> String {
    format!(
        "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
         auth_param basic realm test\n{extra}\
         acl open port {open_port}\nacl users proxy_auth REQUIRED\n\
         http_access allow open\nhttp_access allow users\nhttp_access deny all\n",
        passwd.display()
    )
}

/// One CONNECT to `target` with `credentials` (`USER:PASSWORD`); on a 200,
/// one echo round trip through the tunnel. Returns the status and how long
/// it all took.
fn connect(proxy: SocketAddr, target: &str, credentials: Option<&str>) -> (u16, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy).expect("connect to the proxy");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let authorization = credentials
        .map(|c| format!("Proxy-Authorization: Basic {}\r\n", STANDARD.encode(c)))
        .unwrap_or_default();
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{authorization}\r\n"
    )
    .expect("send CONNECT");
    let head = read_head(&mut stream);
    let status = status_of(&head);
    if status == 200 {
        stream.write_all(b"ping").expect("write through the tunnel");
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).expect("read the echo");
        assert_eq!(&echo, b"ping");
    }
    (status, started.elapsed())
}

fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The value of the `/metrics` series `series` (exact text before the value).
fn metric(proxy: &Proxy, series: &str) -> f64 {
    let admin = proxy.admin_addr().expect("the proxy has an admin listener");
    let text = http_get(admin, "/metrics").expect("GET /metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn checks(proxy: &Proxy, result: &str) -> u64 {
    metric(
        proxy,
        &format!("spliced_auth_checks_total{{result=\"{result}\"}}"),
    ) as u64
}

/// An htpasswd line with a bcrypt hash of `password` at `cost`, written as
/// `htpasswd -B` does (`$2y$`).
fn bcrypt_line(user: &str, password: &str, cost: u32) -> String {
    let hash = bcrypt::hash(password, cost).expect("bcrypt");
    format!("{user}:{}\n", hash.replacen("$2b$", "$2y$", 1))
}

/// Sends SIGHUP and waits for the reload to be logged for the `nth` time.
fn reload(proxy: &Proxy, nth: usize) {
    // SAFETY: kill(2) with the pid of our own child and a valid signal.
    let sent = unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0, "SIGHUP");
    assert!(
        proxy.logged_times("configuration reloaded", nth),
        "no reload logged:\n{}",
        proxy.stderr()
    );
}

#[test]
fn a_password_flood_waits_in_a_bounded_queue_while_tunnels_keep_opening() {
    const COST: u32 = 12;
    const FLOODERS: usize = 8;
    const FLOOD: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    // Tunnels to `open` need no credentials, tunnels to `echo` do.
    let open = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let passwd = dir.path().join("passwd");
    std::fs::write(
        &passwd,
        bcrypt_line("alice", "alice-pass", COST) + &bcrypt_line("bob", "bob-pass", COST),
    )
    .unwrap();
    // One verifier, two waiting checks: the rest of a flood gets 503.
    let conf = dir.path().join("squid.conf");
    std::fs::write(
        &conf,
        conf_text(
            &passwd,
            open.addr.port(),
            "auth_param basic children 1 startup=0 idle=1 queue-size=2\n",
        ),
    )
    .unwrap();
    let proxy = start(&conf);
    let target = echo.addr.to_string();

    // How long one hash takes here, now.
    let hash = bcrypt::hash("x", COST).unwrap();
    let timed = Instant::now();
    assert!(bcrypt::verify("x", &hash).unwrap());
    let one_hash = timed.elapsed();

    // alice's credentials are verified once and cached.
    assert_eq!(
        connect(proxy.addr, &target, Some("alice:alice-pass")).0,
        200
    );
    assert_eq!(checks(&proxy, "verified"), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| {
            let (stop, statuses, target) = (stop.clone(), statuses.clone(), target.clone());
            let addr = proxy.addr;
            thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) && round < 10_000 {
                    round += 1;
                    // Mostly wrong passwords for a cached user, some right
                    // ones for a user not cached yet.
                    let credentials = if (i + round as usize).is_multiple_of(4) {
                        "bob:bob-pass".to_owned()
                    } else {
                        format!("alice:wrong-{i}-{round}")
                    };
                    let (status, _) = connect(addr, &target, Some(&credentials));
                    statuses.lock().unwrap().push((credentials, status));
                }
            })
        })
        .collect();

    // Meanwhile: tunnels that need no credentials, and a cached user's.
    let peaks = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampler = {
        let (stop, peaks) = (stop.clone(), peaks.clone());
        let admin = proxy.admin_addr().unwrap();
        thread::spawn(move || {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) && samples < 10_000 {
                samples += 1;
                let text = http_get(admin, "/metrics").unwrap_or_default();
                for (name, peak) in [
                    ("spliced_auth_verifying ", &peaks.0),
                    ("spliced_auth_queue_depth ", &peaks.1),
                ] {
                    if let Some(value) = text
                        .lines()
                        .find_map(|l| l.strip_prefix(name)?.parse::<f64>().ok())
                    {
                        peak.fetch_max(value as u64, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let flood_started = Instant::now();
    let mut open_latencies = Vec::new();
    let mut cached_latencies = Vec::new();
    while flood_started.elapsed() < FLOOD && open_latencies.len() < 2_000 {
        let (status, took) = connect(proxy.addr, &open.addr.to_string(), None);
        assert_eq!(status, 200, "a tunnel needing no credentials");
        open_latencies.push(took);
        let (status, took) = connect(proxy.addr, &target, Some("alice:alice-pass"));
        assert_eq!(status, 200, "a cached user");
        cached_latencies.push(took);
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().expect("flooder");
    }
    sampler.join().unwrap();

    let statuses = statuses.lock().unwrap();
    let count = |credentials: &str, status: u16| {
        statuses
            .iter()
            .filter(|(c, s)| c.starts_with(credentials) && *s == status)
            .count()
    };
    let wrong = statuses
        .iter()
        .filter(|(c, _)| c.starts_with("alice:wrong"))
        .count();
    eprintln!(
        "one hash {one_hash:?}; flood: {} requests, wrong 407 {} 503 {}, right 200 {} 503 {}; \
         peaks verifying {} queued {}",
        statuses.len(),
        count("alice:wrong", 407),
        count("alice:wrong", 503),
        count("bob:", 200),
        count("bob:", 503),
        peaks.0.load(Ordering::Relaxed),
        peaks.1.load(Ordering::Relaxed)
    );
    assert_eq!(
        count("alice:wrong", 407) + count("alice:wrong", 503),
        wrong,
        "a wrong password got something else than 407 or 503"
    );
    assert_eq!(
        count("bob:", 200) + count("bob:", 503),
        statuses.len() - wrong,
        "a right password got something else than 200 or 503"
    );
    assert!(count("alice:wrong", 503) > 0, "the queue never overflowed");
    assert!(count("bob:", 200) > 0, "bob never got in");
    assert!(
        peaks.0.load(Ordering::Relaxed) <= 1,
        "more than 1 hash at once"
    );
    assert!(
        peaks.1.load(Ordering::Relaxed) <= 2,
        "more than 2 checks queued"
    );

    // Hashing is serialized: the flood cannot have verified more than the
    // flood's duration allows (generous: a hash may be 3× faster than here).
    let verified = metric(&proxy, "spliced_auth_hashes_total") as u64;
    let bound = (flood_started.elapsed().as_secs_f64() / (one_hash.as_secs_f64() / 3.0)) as u64 + 3;
    assert!(
        verified <= bound,
        "{verified} hashes in the flood, bound {bound}"
    );
    assert!(checks(&proxy, "overloaded") as usize >= count("alice:wrong", 503));
    assert!(checks(&proxy, "cache_hit") as usize >= cached_latencies.len());

    // No tunnel that needs no hash waited for one: the slowest of them stays
    // under 2 s (the queue holds ~3 hashes of work), the median under one hash.
    for (what, latencies) in [
        ("open", &mut open_latencies),
        ("cached", &mut cached_latencies),
    ] {
        latencies.sort();
        let median = latencies[latencies.len() / 2];
        let max = *latencies.last().unwrap();
        eprintln!(
            "{what}: {} tunnels, median {median:?}, max {max:?}",
            latencies.len()
        );
        assert!(
            latencies.len() >= 10,
            "too few {what} tunnels: the flood starved the loop"
        );
        assert!(
            median < one_hash,
            "{what}: median {median:?} vs one hash {one_hash:?}"
        );
        assert!(max < Duration::from_secs(2), "{what}: max {max:?}");
    }

    // Every 503 left an access-log line.
    assert!(
        wait_until(Duration::from_secs(10), || proxy
            .access_lines()
            .iter()
            .any(|line| line.contains("/503 "))),
        "no 503 in the access log"
    );
    assert!(metric(&proxy, "spliced_auth_queue_depth") == 0.0);
    assert!(metric(&proxy, "spliced_auth_verifying") == 0.0);
}

#[test]
fn a_herd_of_the_same_credentials_is_hashed_once_and_never_refused() {
    const COST: u32 = 12;
    const HERD: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, bcrypt_line("alice", "alice-pass", COST)).unwrap();
    // One verifier and one place in its queue, far fewer than the herd:
    // without sharing the hash, most of the herd would get 503.
    let conf = dir.path().join("squid.conf");
    std::fs::write(
        &conf,
        conf_text(
            &passwd,
            1,
            "auth_param basic children 1 queue-size=1
",
        ),
    )
    .unwrap();
    let proxy = start(&conf);
    let target = echo.addr.to_string();
    let barrier = Arc::new(std::sync::Barrier::new(HERD));
    let herd: Vec<_> = (0..HERD)
        .map(|_| {
            let (barrier, target, addr) = (barrier.clone(), target.clone(), proxy.addr);
            thread::spawn(move || {
                barrier.wait();
                connect(addr, &target, Some("alice:alice-pass")).0
            })
        })
        .collect();
    let statuses: Vec<u16> = herd.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    // One hash; the rest of the herd shared it, or came after it ended and
    // found the success cached.
    assert_eq!(metric(&proxy, "spliced_auth_hashes_total"), 1.0);
    assert_eq!(checks(&proxy, "verified"), 1);
    assert_eq!(checks(&proxy, "overloaded"), 0);
    let coalesced = checks(&proxy, "coalesced");
    eprintln!(
        "herd of {HERD}: coalesced {coalesced}, cache_hit {}",
        checks(&proxy, "cache_hit")
    );
    assert!(coalesced > 0, "no check of the herd overlapped the hash");
    assert_eq!(coalesced + checks(&proxy, "cache_hit"), HERD as u64 - 1);
}

#[test]
fn cached_credentials_expire_and_a_changed_password_file_forgets_them() {
    const COST: u32 = 10;
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let target = echo.addr.to_string();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, bcrypt_line("alice", "first", COST)).unwrap();
    let conf = dir.path().join("squid.conf");
    let write_conf = |ttl: &str| {
        let extra = format!("auth_param basic credentialsttl {ttl}\n");
        // Port 1 is open; the echo server needs credentials.
        let text = conf_text(&passwd, 1, &extra);
        std::fs::write(&conf, text).unwrap();
    };
    write_conf("3 seconds");
    let proxy = start(&conf);
    let ask = |credentials: &str| connect(proxy.addr, &target, Some(credentials)).0;

    assert_eq!(ask("alice:first"), 200);
    assert_eq!(ask("alice:first"), 200);
    assert_eq!(
        (checks(&proxy, "verified"), checks(&proxy, "cache_hit")),
        (1, 1)
    );
    // A wrong password right after the right one was cached: hashed, refused.
    assert_eq!(ask("alice:First"), 407);
    assert_eq!(ask("alice:"), 407);
    assert_eq!(checks(&proxy, "rejected"), 2);
    assert_eq!(ask("alice:first"), 200);
    assert_eq!(
        checks(&proxy, "cache_hit"),
        2,
        "a refusal does not evict the success"
    );

    // After credentialsttl the same credentials are verified again.
    thread::sleep(Duration::from_millis(3_500));
    assert_eq!(ask("alice:first"), 200);
    assert_eq!(
        (checks(&proxy, "verified"), checks(&proxy, "cache_hit")),
        (2, 2)
    );

    // A reload with the same password file keeps the cache.
    write_conf("1 hour");
    reload(&proxy, 1);
    assert_eq!(ask("alice:first"), 200);
    assert_eq!(
        (checks(&proxy, "verified"), checks(&proxy, "cache_hit")),
        (2, 3)
    );
    assert_eq!(metric(&proxy, "spliced_auth_cached_users"), 1.0);

    // A new password in the file: the cached one no longer opens anything.
    std::fs::write(&passwd, bcrypt_line("alice", "second", COST)).unwrap();
    reload(&proxy, 2);
    assert!(
        proxy.logged("cached credentials forgotten"),
        "{}",
        proxy.stderr()
    );
    assert_eq!(metric(&proxy, "spliced_auth_cached_users"), 0.0);
    assert_eq!(ask("alice:first"), 407);
    assert_eq!(ask("alice:second"), 200);
    assert_eq!(ask("alice:second"), 200);
    assert_eq!(
        (checks(&proxy, "verified"), checks(&proxy, "cache_hit")),
        (3, 4)
    );

    // credentialsttl 0: every request is hashed.
    write_conf("0 seconds");
    reload(&proxy, 3);
    assert_eq!(ask("alice:second"), 200);
    assert_eq!(ask("alice:second"), 200);
    assert_eq!(
        (checks(&proxy, "verified"), checks(&proxy, "cache_hit")),
        (5, 4)
    );
}

#[test]
fn credentials_are_not_hashed_when_no_rule_asks_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoProcess::start(env!("CARGO_BIN_EXE_echo_server"));
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, bcrypt_line("alice", "pw", 10)).unwrap();
    let conf = dir.path().join("squid.conf");
    // The open port is allowed before any proxy_auth ACL is reached.
    std::fs::write(&conf, conf_text(&passwd, echo.addr.port(), "")).unwrap();
    let proxy = start(&conf);
    let (status, _) = connect(proxy.addr, &echo.addr.to_string(), Some("alice:wrong"));
    assert_eq!(status, 200, "the open port needs no credentials");
    let total: u64 = [
        "cache_hit",
        "verified",
        "coalesced",
        "rejected",
        "overloaded",
    ]
    .iter()
    .map(|result| checks(&proxy, result))
    .sum();
    assert_eq!(
        total, 0,
        "credentials were checked for a rule that needs none"
    );
    // Another port reaches the proxy_auth ACL: now they are checked.
    let (status, _) = connect(proxy.addr, "127.0.0.1:1", Some("alice:wrong"));
    assert_eq!(status, 407);
    assert_eq!(checks(&proxy, "rejected"), 1);
}
