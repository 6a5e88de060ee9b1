//! The policy cannot be dodged by spelling: numeric shorthands, hex, IPv4-mapped
//! IPv6, trailing dots, mixed case, non-ASCII names and userinfo either get a 400
//! or are judged on what they really mean.

use std::io::Write as _;

use spliced_tests::{netns::Netns, raw_request, status_of, Proxy, Upstream};

/// A proxy in a namespace of its own whose policy denies loopback destinations
/// and one domain, with an upstream on 127.0.0.1:443 inside the namespace.
struct Site {
    ns: Netns,
    proxy: Proxy,
    _upstream: Upstream,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let ns = Netns::new();
    // Names the namespace's resolver knows, all pointing at loopback.
    std::fs::write(
        format!("/etc/netns/{}/hosts", ns.name),
        "127.0.0.1 localhost\n127.0.0.1 blocked.test www.blocked.test\n",
    )
    .unwrap();
    let upstream = Upstream::start_in(&ns, "127.0.0.1:443".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    let mut file = std::fs::File::create(&conf).unwrap();
    write!(
        file,
        "acl SSL_ports port 443\n\
         acl blocked dstdomain .blocked.test\n\
         http_access deny !SSL_ports\n\
         http_access deny blocked\n\
         http_access deny to_localhost\n\
         http_access allow all\n"
    )
    .unwrap();
    let proxy = Proxy::start_in(&ns, &["-f", conf.to_str().unwrap(), "--log-format", "json"]);
    Site {
        ns,
        proxy,
        _upstream: upstream,
        _dir: dir,
    }
}

impl Site {
    fn status(&self, target: &str) -> u16 {
        let proxy = self.proxy.addr;
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let answer = self
            .ns
            .enter(move || raw_request(proxy, request.as_bytes()));
        status_of(&answer)
    }
}

#[test]
fn spellings_of_loopback_and_denied_names_do_not_get_through() {
    let site = site();
    let cases = [
        // Not an address and not a name: rejected before any lookup.
        ("127.1:443", 400),
        ("0x7f.0.0.1:443", 400),
        ("0177.0.0.1:443", 400),
        ("2130706433:443", 400),
        ("127.000.000.001:443", 400),
        ("user@127.0.0.1:443", 400),
        ("user:pass@blocked.test:443", 400),
        ("bl\u{f6}cked.test:443", 400),
        ("blocked.test%2e:443", 400),
        // Real addresses and names, judged by the policy on what they mean.
        ("127.0.0.1:443", 403),
        ("127.0.0.2:443", 403),
        ("[::1]:443", 403),
        ("[::ffff:127.0.0.1]:443", 403),
        ("[0:0:0:0:0:ffff:7f00:1]:443", 403),
        ("localhost:443", 403),
        ("LOCALHOST.:443", 403),
        ("blocked.test:443", 403),
        ("BLOCKED.test.:443", 403),
        ("www.Blocked.TEST:443", 403),
        ("0.0.0.0:443", 403),
    ];
    let mut wrong = Vec::new();
    for (target, expected) in cases {
        let got = site.status(target);
        if got != expected {
            wrong.push(format!("{target}: {got}, expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", site.proxy.stderr());
}

#[test]
fn only_connect_reaches_an_upstream() {
    let site = site();
    for method in ["GET", "POST", "PUT", "OPTIONS", "connect", "TRACE"] {
        let proxy = site.proxy.addr;
        let request =
            format!("{method} http://127.0.0.1:443/ HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n");
        let answer = site
            .ns
            .enter(move || raw_request(proxy, request.as_bytes()));
        assert_eq!(status_of(&answer), 405, "{method}: {answer}");
    }
    // None of them opened a connection: every record has no upstream.
    let records = site.proxy.wait_json_records(6);
    assert!(
        records.iter().all(|r| r["upstream"].is_null()),
        "{records:#?}"
    );
}

/// The proxy cannot be made to connect to its own listening or admin sockets,
/// however the target is spelled.
#[test]
fn tunnels_never_lead_back_into_the_proxy() {
    let ns = Netns::new();
    std::fs::write(
        format!("/etc/netns/{}/hosts", ns.name),
        "127.0.0.1 localhost me.test\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    std::fs::write(&conf, "http_access allow all\n").unwrap();
    let proxy = Proxy::start_in(
        &ns,
        &[
            "-f",
            conf.to_str().unwrap(),
            "--listen",
            "0.0.0.0:3128",
            "--admin",
            "127.0.0.1:9090",
            "--log-format",
            "json",
        ],
    );
    let status = |target: String| {
        let request = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let proxy = proxy.addr;
        status_of(&ns.enter(move || raw_request(proxy, request.as_bytes())))
    };
    for target in [
        "127.0.0.1:3128",
        "127.0.0.5:3128",
        "[::ffff:127.0.0.1]:3128",
        "0.0.0.0:3128",
        "localhost:3128",
        "me.test:3128",
        "127.0.0.1:9090",
        "me.test:9090",
    ] {
        assert_eq!(status(target.into()), 403, "{target}\n{}", proxy.stderr());
    }
    let records = proxy.wait_json_records(8);
    assert!(
        records
            .iter()
            .all(|r| r["end"].as_str().unwrap().contains("forwarding loop")),
        "{records:#?}"
    );
}
