//! Tests of the whole module: loading files, every ACL type, Squid's
//! `http_access` semantics, authentication, errors and the round trip.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};

use super::*;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/squid/testdata")
        .join(name)
}

fn parse(text: &str) -> SquidConfig {
    match parse_str(text, "test.conf") {
        Ok(loaded) => loaded.config,
        Err(err) => panic!("{err}\n--- config ---\n{text}"),
    }
}

fn parse_err(text: &str) -> Diagnostic {
    match parse_str(text, "test.conf") {
        Ok(_) => panic!("parsed without error:\n{text}"),
        Err(ConfigError::Invalid(diagnostic)) => diagnostic,
        Err(err) => panic!("unexpected error {err}"),
    }
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "spliced-squid-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An owned request, turned into [`RequestFacts`] on demand.
#[derive(Clone, Debug)]
struct Req {
    client: &'static str,
    local_ip: Option<&'static str>,
    local_port: u16,
    method: &'static str,
    host: &'static str,
    port: u16,
    dst: Option<&'static str>,
    user: Option<&'static str>,
    now: LocalTime,
}

fn monday_noon() -> LocalTime {
    LocalTime::new(Weekday::Monday, 12, 0).unwrap()
}

fn req(host: &'static str, port: u16) -> Req {
    Req {
        client: "127.0.0.1",
        local_ip: None,
        local_port: 3128,
        method: "CONNECT",
        host,
        port,
        dst: None,
        user: None,
        now: monday_noon(),
    }
}

impl Req {
    fn from(mut self, client: &'static str) -> Self {
        self.client = client;
        self
    }
    fn to(mut self, dst: &'static str) -> Self {
        self.dst = Some(dst);
        self
    }
    fn user(mut self, user: &'static str) -> Self {
        self.user = Some(user);
        self
    }
    fn method(mut self, method: &'static str) -> Self {
        self.method = method;
        self
    }
    fn at(mut self, day: Weekday, hour: u8, minute: u8) -> Self {
        self.now = LocalTime::new(day, hour, minute).unwrap();
        self
    }
    fn local(mut self, ip: &'static str, port: u16) -> Self {
        self.local_ip = Some(ip);
        self.local_port = port;
        self
    }
    fn decide(&self, config: &SquidConfig) -> Decision {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        config.decide(&RequestFacts {
            client: ip(self.client),
            local_ip: self.local_ip.map(ip),
            local_port: self.local_port,
            method: self.method,
            host: self.host,
            port: self.port,
            dst: self.dst.map(ip),
            user: self.user,
            now: self.now,
            step: 0,
            sni: None,
        })
    }
}

fn allowed(config: &SquidConfig, request: &Req) -> bool {
    match request.decide(config) {
        Decision::Allow => true,
        Decision::Deny { .. } => false,
        Decision::AuthRequired => panic!("unexpected AuthRequired for {request:?}"),
    }
}

fn denied_at(config: &SquidConfig, request: &Req) -> usize {
    match request.decide(config) {
        Decision::Deny { line, .. } => line,
        other => panic!("expected a denial for {request:?}, got {other:?}"),
    }
}

#[test]
fn istio_file_verbatim() {
    let loaded = load(testdata("istio.conf")).unwrap();
    let config = &loaded.config;
    let file = testdata("istio.conf").display().to_string();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].file, file);
    assert_eq!(loaded.warnings[0].line, 11);
    assert_eq!(loaded.warnings[0].text, "coredump_dir /var/spool/squid");
    assert_eq!(
        config.http_ports,
        vec![HttpPort {
            addr: None,
            port: 3128,
            name: None,
            require_proxy_header: false,
        }]
    );
    assert_eq!(config.http_ports[0].listen_addrs().len(), 2);
    assert_eq!(config.http_access_len(), 4);
    assert!(!config.needs_destination());
    assert!(!config.uses_authentication());
    assert!(config.auth.is_none() && config.access_logs.is_empty());

    assert_eq!(req("en.wikipedia.org", 443).decide(config), Decision::Allow);
    assert_eq!(
        req("en.wikipedia.org", 8443).decide(config),
        Decision::Deny {
            file: file.clone(),
            line: 6,
            rule_text: "http_access deny CONNECT !SSL_ports".into()
        }
    );
    let cases = [
        (req("example.com", 443).from("203.0.113.9"), true),
        (req("example.com", 22).from("203.0.113.9"), false),
        (req("10.0.0.1", 443).from("::1"), true),
        (req("[2001:db8::1]", 443).from("2001:db8::2"), true),
        (req("example.com", 80).method("GET"), true),
        (req("example.com", 443).to("127.0.0.1"), true),
    ];
    for (request, expected) in cases {
        assert_eq!(allowed(config, &request), expected, "{request:?}");
    }
    let shown = req("x.org", 25).decide(config).to_string();
    assert_eq!(
        shown,
        format!("denied by {file}:6: http_access deny CONNECT !SSL_ports")
    );
}

/// One ACL definition and requests that must (true) or must not (false) match it.
fn acl_cases() -> Vec<(&'static str, Vec<(Req, bool)>)> {
    vec![
        (
            "acl x src 10.0.0.0/8 192.168.1.0/255.255.255.0 172.16.0.1-172.16.0.9 2001:db8::/32",
            vec![
                (req("a.org", 443).from("10.200.0.1"), true),
                (req("a.org", 443).from("::ffff:10.0.0.1"), true),
                (req("a.org", 443).from("192.168.1.77"), true),
                (req("a.org", 443).from("192.168.2.1"), false),
                (req("a.org", 443).from("172.16.0.5"), true),
                (req("a.org", 443).from("172.16.0.10"), false),
                (req("a.org", 443).from("2001:db8:ffff::1"), true),
                (req("a.org", 443).from("2001:db9::1"), false),
                (req("a.org", 443).from("11.0.0.1"), false),
            ],
        ),
        (
            "acl x src all",
            vec![
                (req("a.org", 443).from("203.0.113.1"), true),
                (req("a.org", 443).from("fe80::1"), true),
            ],
        ),
        (
            "acl x src ipv6",
            vec![
                (req("a.org", 443).from("2001:db8::1"), true),
                (req("a.org", 443).from("::ffff:192.0.2.1"), false),
                (req("a.org", 443).from("192.0.2.1"), false),
            ],
        ),
        (
            "acl x dst 93.184.216.0/24 2606:2800::/32",
            vec![
                (req("example.com", 443).to("93.184.216.34"), true),
                (req("example.com", 443).to("::ffff:93.184.216.34"), true),
                (req("example.com", 443).to("2606:2800:220:1::1"), true),
                (req("example.com", 443).to("1.1.1.1"), false),
                (req("example.com", 443), false),
            ],
        ),
        (
            "acl x dst -n 93.184.216.34",
            vec![
                (req("93.184.216.34", 443).to("93.184.216.34"), true),
                (req("example.com", 443).to("93.184.216.34"), false),
            ],
        ),
        (
            "acl x localip 10.0.0.2",
            vec![
                (req("a.org", 443).local("10.0.0.2", 3128), true),
                (req("a.org", 443).local("10.0.0.3", 3128), false),
                (req("a.org", 443), false),
            ],
        ),
        (
            "acl x myip ::1",
            vec![(req("a.org", 443).local("::1", 3128), true)],
        ),
        (
            "acl x dstdomain -n .example.com exact.org",
            vec![
                (req("example.com", 443), true),
                (req("www.example.com", 443), true),
                (req("a.b.example.com", 443), true),
                (req("WWW.Example.COM.", 443), true),
                (req("badexample.com", 443), false),
                (req("example.com.evil.net", 443), false),
                (req("exact.org", 443), true),
                (req("www.exact.org", 443), false),
            ],
        ),
        (
            "acl x dstdomain 192.0.2.1",
            vec![
                (req("192.0.2.1", 443), true),
                (req("192.0.2.10", 443), false),
            ],
        ),
        (
            "acl x dstdom_regex -i ^ads\\. tracker +i ^CASE",
            vec![
                (req("ads.example.com", 443), true),
                (req("ADS.example.com", 443), true),
                (req("my-tracker.net", 443), true),
                (req("case.org", 443), false),
                (req("noads.example.com", 443), false),
            ],
        ),
        (
            "acl x url_regex :8443$ ^intranet\\.",
            vec![
                (req("example.com", 8443), true),
                (req("intranet.corp", 443), true),
                (req("example.com", 443), false),
                (req("[2001:db8::1]", 8443), true),
            ],
        ),
        (
            "acl x port 80 443 1025-65535",
            vec![
                (req("a.org", 80), true),
                (req("a.org", 443), true),
                (req("a.org", 1025), true),
                (req("a.org", 65535), true),
                (req("a.org", 1024), false),
                (req("a.org", 22), false),
            ],
        ),
        (
            "acl x localport 3128 8080-8081",
            vec![
                (req("a.org", 443).local("10.0.0.1", 8081), true),
                (req("a.org", 443).local("10.0.0.1", 3129), false),
                (req("a.org", 443), true),
            ],
        ),
        (
            "acl x myport 3129",
            vec![(req("a.org", 443).local("10.0.0.1", 3129), true)],
        ),
        (
            "acl x method CONNECT PUT",
            vec![
                (req("a.org", 443), true),
                (req("a.org", 443).method("connect"), true),
                (req("a.org", 443).method("PUT"), true),
                (req("a.org", 443).method("GET"), false),
            ],
        ),
        ("acl x proto NONE", vec![(req("a.org", 443), true)]),
        (
            "acl x proto authority_form",
            vec![(req("a.org", 443), false)],
        ),
        ("acl x proto HTTP HTTPS", vec![(req("a.org", 443), false)]),
        (
            "acl x time MTWHF 08:00-17:30",
            vec![
                (req("a.org", 443).at(Weekday::Monday, 8, 0), true),
                (req("a.org", 443).at(Weekday::Friday, 17, 30), true),
                (req("a.org", 443).at(Weekday::Friday, 17, 31), false),
                (req("a.org", 443).at(Weekday::Wednesday, 7, 59), false),
                (req("a.org", 443).at(Weekday::Saturday, 12, 0), false),
                (req("a.org", 443).at(Weekday::Sunday, 12, 0), false),
            ],
        ),
        (
            "acl x time SA",
            vec![
                (req("a.org", 443).at(Weekday::Saturday, 0, 0), true),
                (req("a.org", 443).at(Weekday::Sunday, 23, 59), true),
                (req("a.org", 443).at(Weekday::Monday, 12, 0), false),
            ],
        ),
        (
            "acl x time 22:00-24:00 D 00:00-06:00",
            vec![
                (req("a.org", 443).at(Weekday::Sunday, 23, 0), true),
                (req("a.org", 443).at(Weekday::Tuesday, 5, 0), true),
                (req("a.org", 443).at(Weekday::Sunday, 5, 0), false),
                (req("a.org", 443).at(Weekday::Tuesday, 12, 0), false),
            ],
        ),
        (
            "acl x proxy_auth REQUIRED",
            vec![(req("a.org", 443).user("anyone"), true)],
        ),
        (
            "acl x proxy_auth alice Bob",
            vec![
                (req("a.org", 443).user("alice"), true),
                (req("a.org", 443).user("Bob"), true),
                (req("a.org", 443).user("bob"), false),
                (req("a.org", 443).user("carol"), false),
            ],
        ),
        (
            "acl x proxy_auth -i alice Bob",
            vec![
                (req("a.org", 443).user("ALICE"), true),
                (req("a.org", 443).user("bob"), true),
            ],
        ),
        (
            "acl x proxy_auth_regex -i ^adm",
            vec![
                (req("a.org", 443).user("Admin"), true),
                (req("a.org", 443).user("user"), false),
            ],
        ),
    ]
}

#[test]
fn every_acl_type() {
    let dir = TempDir::new();
    let passwd = dir.write("passwd", "alice:{SHA}FIOVHSnLL3QkTpKtwhYrQVvufT8=\n");
    for (definition, cases) in acl_cases() {
        let text = format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n{definition}\nhttp_access allow x\nhttp_access deny all\n",
            passwd.display()
        );
        let config = parse(&text);
        for (request, expected) in cases {
            assert_eq!(
                allowed(&config, &request),
                expected,
                "{definition}: {request:?}"
            );
        }
    }
}

#[test]
fn predefined_acls() {
    let config = parse(
        "http_access deny to_localhost\nhttp_access deny to_linklocal\n\
         http_access allow localhost\nhttp_access allow manager\nhttp_access deny all\n",
    );
    assert!(config.needs_destination());
    let cases = [
        (req("a.org", 443).to("127.0.0.1"), 1),
        (req("a.org", 443).to("127.255.0.1"), 1),
        (req("a.org", 443).to("0.0.0.0"), 1),
        (req("a.org", 443).to("::"), 1),
        (req("a.org", 443).to("::1"), 1),
        (req("a.org", 443).to("::ffff:127.0.0.1"), 1),
        (req("a.org", 443).to("169.254.169.254"), 2),
        (req("a.org", 443).to("fe80::1"), 2),
        (req("a.org", 443).to("93.184.216.34").from("10.0.0.1"), 5),
    ];
    for (request, line) in cases {
        assert_eq!(denied_at(&config, &request), line, "{request:?}");
    }
    for client in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        assert!(allowed(
            &config,
            &req("a.org", 443).to("93.184.216.34").from(client)
        ));
    }
    // 127.0.0.2 is not "localhost" (127.0.0.1/32 only); manager never matches CONNECT.
    assert_eq!(
        denied_at(
            &config,
            &req("a.org", 443).to("93.184.216.34").from("127.0.0.2")
        ),
        5
    );
    let connect = parse("http_access allow CONNECT\n");
    assert!(allowed(&connect, &req("a.org", 443)));
    assert!(!allowed(&connect, &req("a.org", 443).method("GET")));
    let all = parse("http_access allow ALL\n");
    assert!(allowed(&all, &req("a.org", 443).from("2001:db8::1")));
}

#[test]
fn and_negation_first_match_and_implicit_rules() {
    let rules = "acl net src 10.0.0.0/8\nacl web port 80 443\nacl bad dstdomain .bad.example\n";
    // First match wins, ACLs on a line are ANDed, `!` negates (also as a separate token).
    let config = parse(&format!(
        "{rules}http_access deny bad\nhttp_access allow net web\nhttp_access allow ! net !web\n"
    ));
    let cases: &[(Req, Decision)] = &[
        (
            req("x.bad.example", 443).from("10.0.0.1"),
            Decision::Deny {
                file: "test.conf".into(),
                line: 4,
                rule_text: "http_access deny bad".into(),
            },
        ),
        (req("good.example", 443).from("10.0.0.1"), Decision::Allow),
        (req("good.example", 22).from("192.0.2.1"), Decision::Allow),
        (
            req("good.example", 22).from("10.0.0.1"),
            Decision::Deny {
                file: String::new(),
                line: 0,
                rule_text: "implicit rule: no line matched; the opposite of the last line \
                            (test.conf:6: http_access allow !net !web)"
                    .into(),
            },
        ),
        (
            req("good.example", 443).from("192.0.2.1"),
            Decision::Deny {
                file: String::new(),
                line: 0,
                rule_text: "implicit rule: no line matched; the opposite of the last line \
                            (test.conf:6: http_access allow !net !web)"
                    .into(),
            },
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(&request.decide(&config), expected, "{request:?}");
    }

    // The last line denies: what matches nothing is allowed.
    let config = parse(&format!(
        "{rules}http_access deny bad\nhttp_access deny net !web\n"
    ));
    assert!(allowed(&config, &req("ok.example", 22).from("192.0.2.1")));
    assert!(allowed(&config, &req("ok.example", 443).from("10.0.0.1")));
    assert_eq!(
        denied_at(&config, &req("ok.example", 22).from("10.0.0.1")),
        5
    );
    assert_eq!(
        denied_at(&config, &req("bad.example", 22).from("192.0.2.1")),
        4
    );

    // No http_access lines: everything is denied.
    let config = parse(rules);
    let decision = req("ok.example", 443).decide(&config);
    assert!(
        matches!(&decision, Decision::Deny { line: 0, rule_text, .. } if rule_text.contains("no http_access lines")),
        "{decision:?}"
    );
    assert_eq!(
        decision.to_string(),
        "denied by implicit rule: no http_access lines, so everything is denied"
    );
}

#[test]
fn wildcard_domains() {
    let config = parse(
        "acl dot dstdomain .example.com\nacl exact dstdomain example.org.\nacl upper dstdomain WWW.Example.NET\n\
         http_access allow dot\nhttp_access allow exact\nhttp_access allow upper\n",
    );
    let cases = [
        ("example.com", true),
        ("www.example.com", true),
        ("deep.www.example.com", true),
        ("EXAMPLE.COM", true),
        ("example.com.", true),
        ("badexample.com", false),
        ("example.com.au", false),
        ("com", false),
        ("example.org", true),
        ("example.org.", true),
        ("www.example.org", false),
        ("badexample.org", false),
        ("www.example.net", true),
        ("example.net", false),
    ];
    for (host, expected) in cases {
        assert_eq!(allowed(&config, &req(host, 443)), expected, "{host}");
    }
}

#[test]
fn ipv6_clients_and_destinations() {
    let config = parse(
        "acl v6net src 2001:db8:1::/48 fd00::1-fd00::ff\nacl v4net src 192.0.2.0/24\n\
         acl metadata dst fd00:ec2::254 169.254.169.254\n\
         http_access deny metadata\nhttp_access allow v6net\nhttp_access allow v4net\nhttp_access deny all\n",
    );
    let cases = [
        (req("a.org", 443).from("2001:db8:1:ffff::1"), true),
        (req("a.org", 443).from("2001:db8:2::1"), false),
        (req("a.org", 443).from("fd00::80"), true),
        (req("a.org", 443).from("fd00::100"), false),
        (req("a.org", 443).from("::ffff:192.0.2.200"), true),
        (req("a.org", 443).from("192.0.2.200"), true),
        (
            req("a.org", 443).from("2001:db8:1::1").to("fd00:ec2::254"),
            false,
        ),
        (
            req("a.org", 443)
                .from("2001:db8:1::1")
                .to("::ffff:169.254.169.254"),
            false,
        ),
        (
            req("a.org", 443)
                .from("2001:db8:1::1")
                .to("2001:db8:ffff::1"),
            true,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(allowed(&config, &request), expected, "{request:?}");
    }
}

#[test]
fn port_ranges() {
    let config = parse(
        "acl Safe_ports port 80 443\nacl Safe_ports port 1025-65535\nacl low port 0-1024\n\
         http_access deny !Safe_ports\nhttp_access allow all\n",
    );
    for (port, expected) in [
        (80, true),
        (443, true),
        (444, false),
        (1024, false),
        (1025, true),
        (8080, true),
        (65535, true),
        (22, false),
    ] {
        assert_eq!(allowed(&config, &req("a.org", port)), expected, "{port}");
    }
}

#[test]
fn destination_is_checked_per_resolved_address() {
    // A name that resolves to an internal address must be refused for that
    // address, and allowed for a public one: the control plane asks once per
    // candidate address.
    let config = parse(
        "acl internal dst 10.0.0.0/8 fc00::/7\n\
         http_access deny to_localhost\nhttp_access deny internal\nhttp_access allow all\n",
    );
    assert!(config.needs_destination());
    let candidates = [
        "127.0.0.1",
        "10.1.1.1",
        "fd00::1",
        "93.184.216.34",
        "2606:2800::1",
    ];
    let verdicts: Vec<bool> = candidates
        .iter()
        .map(|&dst| allowed(&config, &req("rebinding.example", 443).to(dst)))
        .collect();
    assert_eq!(verdicts, [false, false, false, true, true]);
    assert_eq!(
        denied_at(&config, &req("rebinding.example", 443).to("127.0.0.1")),
        2
    );
    assert_eq!(
        denied_at(&config, &req("rebinding.example", 443).to("10.1.1.1")),
        3
    );
    // Without an address, dst ACLs do not match (as when Squid cannot resolve).
    assert!(allowed(&config, &req("rebinding.example", 443)));
    // Rules without dst ACLs do not need one.
    assert!(!parse("acl n src 10.0.0.0/8\nhttp_access allow n\n").needs_destination());
    // A dst ACL only in an ignored directive does not count.
    assert!(
        !parse("acl d dst 10.0.0.0/8\nalways_direct allow d\nhttp_access allow all\n")
            .needs_destination()
    );
}

#[test]
fn time_acl_with_local_time() {
    let config = parse(
        "acl office_hours time MTWHF 09:00-17:00\nacl lunch time 12:00-13:00\n\
         acl social dstdomain .facebook.com\n\
         http_access deny social !lunch\nhttp_access allow office_hours\nhttp_access deny all\n",
    );
    let cases = [
        (
            req("www.facebook.com", 443).at(Weekday::Tuesday, 12, 30),
            true,
        ),
        (
            req("www.facebook.com", 443).at(Weekday::Tuesday, 11, 0),
            false,
        ),
        (
            req("www.facebook.com", 443).at(Weekday::Sunday, 12, 30),
            false,
        ),
        (req("example.com", 443).at(Weekday::Thursday, 9, 0), true),
        (req("example.com", 443).at(Weekday::Thursday, 17, 1), false),
        (req("example.com", 443).at(Weekday::Saturday, 10, 0), false),
    ];
    for (request, expected) in cases {
        assert_eq!(allowed(&config, &request), expected, "{request:?}");
    }
    // LocalTime from a clock reading: 2024-01-01 was a Monday.
    let monday = std::time::UNIX_EPOCH + Duration::from_secs(1_704_103_200); // 10:00 UTC
    let now = LocalTime::at(monday, 0);
    assert_eq!((now.weekday(), now.minute_of_day()), (Weekday::Monday, 600));
    let mut request = req("example.com", 443);
    request.now = now;
    assert!(allowed(&config, &request));
    request.now = LocalTime::at(monday, -11 * 3600); // 23:00 on Sunday
    assert!(!allowed(&config, &request));
}

fn basic(credentials: &str) -> String {
    format!("Basic {}", STANDARD.encode(credentials))
}

#[test]
fn authentication() {
    let dir = TempDir::new();
    let alice = bcrypt::hash("wonderland", 4).unwrap();
    dir.write(
        "passwd",
        &format!(
            "# users\nalice:{alice}\nbob:$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00\n\n\
             carol:{{SHA}}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\ndave:$1$abcdefgh$vhxKZ/s1ygZHyCEDPyqtQ/\n"
        ),
    );
    let text = "auth_param basic program /usr/lib/squid/basic_ncsa_auth passwd\n\
                auth_param basic realm Example Proxy\n\
                acl auth proxy_auth REQUIRED\nacl admins proxy_auth alice\nacl office src 192.0.2.0/24\n\
                http_access allow office\nhttp_access deny !auth\nhttp_access allow admins\nhttp_access deny all\n";
    let name = dir.0.join("squid.conf").display().to_string();
    let loaded = parse_str(text, &name).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let config = loaded.config;
    assert!(config.uses_authentication());
    assert_eq!(config.auth_realm(), Some("Example Proxy"));
    assert_eq!(config.auth.as_ref().unwrap().user_count(), 4);

    let verify_cases: &[(&str, Option<&str>)] = &[
        (&basic("alice:wonderland"), Some("alice")),
        (&basic("ALICE:wonderland"), Some("alice")),
        (&basic("alice:Wonderland"), None),
        (&basic("alice:"), None),
        (&basic("bob:password"), Some("bob")),
        (&basic("bob:passwor"), None),
        (&basic("carol:hunter2"), Some("carol")),
        (&basic("dave:hunter2"), Some("dave")),
        (&basic("mallory:hunter2"), None),
        (&basic("nocolon"), None),
        (
            &format!("basic   {}", STANDARD.encode("carol:hunter2")),
            Some("carol"),
        ),
        ("Basic !!notbase64!!", None),
        ("Bearer abc", None),
        ("Basic", None),
        ("", None),
    ];
    for (header, expected) in verify_cases {
        assert_eq!(
            config.verify_basic(header).as_deref(),
            *expected,
            "{header}"
        );
    }

    let outside = || req("example.com", 443).from("203.0.113.5");
    // The office needs no credentials: proxy_auth is never reached.
    assert_eq!(
        req("example.com", 443).from("192.0.2.9").decide(&config),
        Decision::Allow
    );
    // Missing (or wrong, which verify_basic turns into None) credentials: 407.
    assert_eq!(outside().decide(&config), Decision::AuthRequired);
    assert_eq!(outside().user("alice").decide(&config), Decision::Allow);
    assert_eq!(denied_at(&config, &outside().user("bob")), 9);

    // A deny line ending in a proxy_auth ACL re-challenges (Squid's 407 rule).
    let config = parse_str(
        "auth_param basic program /usr/lib/squid/basic_ncsa_auth passwd\n\
         acl admins proxy_auth alice\nhttp_access deny !admins\nhttp_access allow all\n",
        &name,
    )
    .unwrap()
    .config;
    assert_eq!(config.auth_realm(), Some("Squid proxy-caching web server"));
    assert_eq!(outside().user("alice").decide(&config), Decision::Allow);
    assert_eq!(
        outside().user("bob").decide(&config),
        Decision::AuthRequired
    );
    assert_eq!(outside().decide(&config), Decision::AuthRequired);

    // casesensitive on: names are looked up as sent.
    let config = parse_str(
        "auth_param basic casesensitive on\nauth_param basic program /usr/lib/squid/basic_ncsa_auth passwd\n",
        &name,
    )
    .unwrap()
    .config;
    assert_eq!(config.verify_basic(&basic("ALICE:wonderland")), None);
    assert_eq!(
        config.verify_basic(&basic("alice:wonderland")).as_deref(),
        Some("alice")
    );
    // No auth configured: nothing verifies.
    assert_eq!(
        parse("http_access allow all\n").verify_basic(&basic("alice:wonderland")),
        None
    );
}

#[test]
fn password_file_problems_name_the_line() {
    let dir = TempDir::new();
    let name = dir.0.join("squid.conf").display().to_string();
    let program = "auth_param basic program /usr/lib/squid/basic_ncsa_auth passwd\n";
    let passwd = dir.0.join("passwd").display().to_string();
    let cases = [
        (
            "ok:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\ndes:abJnggxhB/yWI\n",
            2,
            "DES",
            "des",
        ),
        ("\n\nsha512:$6$salt$hash\n", 3, "SHA-crypt", "sha512"),
        ("no colon here\n", 1, "USER:HASH", "no"),
        (
            ":$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00\n",
            1,
            "empty user",
            ":$apr1$l",
        ),
        ("plain:secret\n", 1, "unrecognized", "plain"),
    ];
    for (content, line, message, text) in cases {
        dir.write("passwd", content);
        let err = match parse_str(program, &name) {
            Err(ConfigError::Invalid(err)) => err,
            other => panic!("{content:?}: {other:?}"),
        };
        assert_eq!(
            (err.file.as_str(), err.line),
            (passwd.as_str(), line),
            "{err}"
        );
        assert!(err.message.contains(message), "{err}");
        assert_eq!(err.text, text, "{err}");
    }
    // Upper-case names can never log in with casesensitive off: warn.
    dir.write("passwd", "alice:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\nBob:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\nalice:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\n");
    let loaded = parse_str(program, &name).unwrap();
    let shown: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(
        shown[0].starts_with(&format!("{passwd}:3: user listed twice")),
        "{shown:?}"
    );
    assert!(
        shown[1].starts_with(&format!("{passwd}:2: user name has upper-case")),
        "{shown:?}"
    );
    // A missing password file is an error at the auth_param line.
    fs::remove_file(dir.0.join("passwd")).unwrap();
    let err = parse_str(program, &name).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{name}:1: cannot read the password file")),
        "{err}"
    );
}

#[test]
fn malformed_configs_name_file_and_line() {
    // (configuration, line of the error, part of the message, offending text)
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "bogus_directive 1",
            1,
            "unknown directive",
            "bogus_directive 1",
        ),
        ("http_port", 1, "expected [ADDRESS:]PORT", "http_port"),
        ("http_port 0", 1, "port number", "0"),
        ("http_port 70000", 1, "port number", "70000"),
        ("http_port +3128", 1, "port number", "+3128"),
        (
            "http_port 3128 intercept",
            1,
            "mode not supported",
            "intercept",
        ),
        (
            "http_port 3128 ssl-bump cert=/x.pem tls-bogus=1",
            1,
            "option not supported",
            "tls-bogus=1",
        ),
        (
            "http_port 3128 tcpkeepalive",
            1,
            "option not supported",
            "tcpkeepalive",
        ),
        (
            "http_port localhost:3128",
            1,
            "not an IP address",
            "localhost:3128",
        ),
        (
            "http_port [::1:3128",
            1,
            "expected [IPV6]:PORT",
            "[::1:3128",
        ),
        ("acl x", 1, "expected: acl NAME TYPE", "acl x"),
        ("acl x src", 1, "no values", "acl x src"),
        (
            "acl x src example.com",
            1,
            "not an IP address",
            "example.com",
        ),
        ("acl x src 10.0.0.0/33", 1, "prefix length", "10.0.0.0/33"),
        ("acl x nosuchtype 1", 1, "unknown ACL type", "nosuchtype"),
        (
            "acl x port 443\nacl X src 10.0.0.1",
            2,
            "already defined with type port (at test.conf:3)",
            "src",
        ),
        (
            "acl localhost dst 127.0.0.1",
            1,
            "already defined with type src (built in)",
            "dst",
        ),
        ("acl x port 99999", 1, "above 65535", "99999"),
        ("acl x port 443 \\\n 99999", 1, "above 65535", "99999"),
        (
            "acl x time MTWHF 17:00-08:00",
            1,
            "before the end",
            "17:00-08:00",
        ),
        ("acl x time XYZ", 1, "bad day letter", "XYZ"),
        ("acl x dstdom_regex ([", 1, "bad regular expression", "(["),
        (
            "acl x dstdomain *.example.com",
            1,
            "write .example.com",
            "*.example.com",
        ),
        ("acl x proto FOO", 1, "unknown protocol", "FOO"),
        ("acl x method GE\u{1}T", 1, "method token", "GE\u{1}T"),
        (
            "acl x proxy_auth REQUIRED alice",
            1,
            "REQUIRED cannot be combined",
            "alice",
        ),
        ("acl x dst -z 1.2.3.4", 1, "unknown flag", "-z"),
        ("acl bad!name src all", 1, "bad ACL name", "bad!name"),
        (
            "acl x src \"unterminated",
            1,
            "unterminated quoted string",
            "acl x src \"unterminated",
        ),
        (
            "acl x dstdomain \"missing-file.txt\"",
            1,
            "cannot read ACL value file",
            "missing-file.txt",
        ),
        (
            "http_access allow nosuch",
            1,
            "ACL is not defined",
            "nosuch",
        ),
        (
            "http_access allow later\nacl later src all",
            1,
            "ACL is not defined",
            "later",
        ),
        (
            "http_access permit all",
            1,
            "expected allow or deny",
            "permit",
        ),
        (
            "http_access allow",
            1,
            "at least one ACL",
            "http_access allow",
        ),
        (
            "http_access allow all !",
            1,
            "'!' must be followed",
            "http_access allow all !",
        ),
        (
            "acl u urlpath_regex x\nhttp_access deny u",
            2,
            "a CONNECT request has no URL path",
            "u",
        ),
        (
            "acl b browser Mozilla\nhttp_access deny b",
            2,
            "does not keep request headers",
            "b",
        ),
        (
            "acl s ssl_error X509_V_ERR_CERT_HAS_EXPIRED\nhttp_access deny s",
            2,
            "never decrypts",
            "s",
        ),
        (
            "connect_timeout soon",
            1,
            "non-negative number",
            "connect_timeout soon",
        ),
        (
            "connect_timeout 5 fortnights",
            1,
            "unknown time unit",
            "connect_timeout 5 fortnights",
        ),
        ("read_timeout", 1, "expected a time", "read_timeout"),
        (
            "request_timeout -1 seconds",
            1,
            "non-negative",
            "request_timeout -1 seconds",
        ),
        (
            "client_ip_max_connections many",
            1,
            "connection count",
            "many",
        ),
        (
            "dns_nameservers ns1.example.com",
            1,
            "not an IP address",
            "ns1.example.com",
        ),
        (
            "access_log syslog:daemon.info squid",
            1,
            "module not supported",
            "syslog:daemon.info",
        ),
        (
            "access_log udp://192.0.2.1:514 squid",
            1,
            "module not supported",
            "udp://192.0.2.1:514",
        ),
        (
            "http_port 3128\naccess_log /var/log/x.log nosuchformat",
            2,
            "unknown logformat",
            "nosuchformat",
        ),
        ("access_log /x squid acl1", 1, "ACL filters", "acl1"),
        (
            "access_log /x squid tune=1",
            1,
            "unknown access_log option",
            "tune=1",
        ),
        ("access_log none all", 1, "ACL filters", "all"),
        ("logformat squid %ts", 1, "built-in logformat", "squid"),
        ("logformat x %ts\nlogformat x %tr", 2, "defined twice", "x"),
        (
            "logformat x %ts %zz",
            1,
            "unknown or unsupported logformat code",
            "%zz",
        ),
        ("logformat x", 1, "expected: logformat NAME", "logformat x"),
        (
            "auth_param digest program /x y",
            1,
            "scheme not supported",
            "digest",
        ),
        (
            "auth_param basic program /usr/lib/squid/basic_ldap_auth -b dc=x",
            1,
            "helper not supported",
            "/usr/lib/squid/basic_ldap_auth",
        ),
        (
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth",
            1,
            "takes exactly one argument",
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth",
        ),
        (
            "auth_param basic casesensitive maybe",
            1,
            "expected on or off",
            "maybe",
        ),
        (
            "auth_param basic nonsense 1",
            1,
            "unknown auth_param basic parameter",
            "nonsense",
        ),
        (
            "\nauth_param basic children 0",
            2,
            "expected a number of helpers above 0",
            "0",
        ),
        (
            "auth_param basic children 5 queue-size=lots",
            1,
            "expected a number",
            "queue-size=lots",
        ),
        (
            "auth_param basic children 5 on-persistent-overload=die",
            1,
            "only on-persistent-overload=ERR",
            "on-persistent-overload=die",
        ),
        (
            "\nacl a proxy_auth REQUIRED",
            2,
            "need 'auth_param basic program",
            "a",
        ),
        (
            "cache_peer parent.example sibling 3128 0",
            1,
            "type sibling not supported",
            "sibling",
        ),
        ("ssl_bump bump all", 1, "needs decryption", "bump"),
        ("ssl_bump stare all", 1, "spliced never does", "stare"),
        (
            "acl s at_step SslBump3",
            1,
            "never peeks at the server",
            "SslBump3",
        ),
        (
            "acl s ssl::server_name --server-provided .x.org",
            1,
            "only the name the client requested",
            "--server-provided",
        ),
        ("sni_must_match_connect maybe", 1, "expected exact", "maybe"),
        (
            "tcp_outgoing_address 192.0.2.1",
            1,
            "outgoing address",
            "tcp_outgoing_address 192.0.2.1",
        ),
        (
            "if ${process_number} = 1",
            1,
            "conditional",
            "if ${process_number} = 1",
        ),
        ("include", 1, "include needs a file name", "include"),
        (
            "include nonexistent.conf",
            1,
            "cannot read included file",
            "nonexistent.conf",
        ),
    ];
    assert!(cases.len() >= 25);
    for &(body, line, message, text) in cases {
        // Two lines of comments first: line numbers must count them.
        let config = format!("# a comment\n\n{body}\n");
        let err = parse_err(&config);
        assert_eq!(err.file, "test.conf", "{body}: {err}");
        assert_eq!(err.line, line + 2, "{body}: {err}");
        assert!(err.message.contains(message), "{body}: {err}");
        assert_eq!(err.text, text, "{body}: {err}");
        assert_eq!(
            err.to_string(),
            format!("test.conf:{}: {}: '{}'", line + 2, err.message, text)
        );
    }
}

#[test]
fn top_level_read_errors() {
    let err = load("/nonexistent/squid.conf").unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.diagnostic().is_none());
    assert!(
        err.to_string()
            .starts_with("/nonexistent/squid.conf: cannot read:"),
        "{err}"
    );
}

#[test]
fn ignored_directives_warn_once_each() {
    let text = "coredump_dir /var/spool/squid\ncache_dir ufs /var/spool/squid 100 16 256\ncache_mem 256 MB\n\
                maximum_object_size 4 MB\nminimum_object_size 0 KB\nmaximum_object_size_in_memory 512 KB\n\
                refresh_pattern . 0 20% 4320\ncache deny all\nvisible_hostname proxy\ncache_effective_user proxy\n\
                cache_effective_group proxy\npid_filename /run/squid.pid\ncache_log /var/log/squid/cache.log\n\
                cache_store_log none\nlogfile_rotate 0\ndns_v4_first on\nrequest_header_access Foo deny all\nreply_header_add X-A b\n\
                httpd_suppress_version_string on\nipcache_low 90\ncache_mgr root\nerror_directory /x\n\
                icp_port 0\nhtcp_port 0\nsnmp_port 0\n\
                hierarchy_stoplist cgi-bin ?\nmemory_pools off\nworkers 2\npinger_enable off\n\
                http_reply_access allow all\nexternal_acl_type x %SRC /bin/true\n\
                http_access allow all\n";
    let loaded = parse_str(text, "test.conf").unwrap();
    let expected = text.lines().count() - 1;
    assert_eq!(loaded.warnings.len(), expected, "{:#?}", loaded.warnings);
    for (index, warning) in loaded.warnings.iter().enumerate() {
        assert_eq!(warning.line, index + 1);
        assert!(warning.message.contains("ignored"), "{warning}");
        assert_eq!(warning.text, text.lines().nth(index).unwrap());
    }
    // shutdown_lifetime is supported, not ignored.
    let loaded = parse_str("shutdown_lifetime 3 seconds", "test.conf").unwrap();
    assert!(loaded.warnings.is_empty());
    assert_eq!(
        loaded.config.timeouts.shutdown_lifetime,
        Some(Duration::from_secs(3))
    );
}

#[test]
fn directive_values() {
    let text = "http_port 3128\nhttp_port 127.0.0.1:3129\nhttp_port [::1]:3130 name=v6\n\
                connect_timeout 30 seconds\nread_timeout 1 minute\nclient_lifetime 2 hours\n\
                request_timeout 1.5\nshutdown_lifetime 500 milliseconds\ndns_timeout 1 day\n\
                client_ip_max_connections 16\ndns_nameservers 192.0.2.53\ndns_nameservers 2001:db8::53 192.0.2.54\n\
                logformat mine %>a %un \"%rm %ru\"\naccess_log stdio:/var/log/squid/a.log\n\
                access_log daemon:/var/log/squid/b.log mine\naccess_log /var/log/squid/c.log logformat=common rotate=3\n\
                access_log none\n";
    let loaded = parse_str(text, "test.conf").unwrap();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(
        (loaded.warnings[0].line, loaded.warnings[0].text.as_str()),
        (16, "rotate=3")
    );
    let config = loaded.config;
    let ports: Vec<String> = config.http_ports.iter().map(ToString::to_string).collect();
    assert_eq!(ports, ["3128", "127.0.0.1:3129", "[::1]:3130 name=v6"]);
    assert_eq!(
        config.http_ports[2].listen_addrs(),
        vec!["[::1]:3130".parse().unwrap()]
    );
    let t = &config.timeouts;
    assert_eq!(t.connect, Some(Duration::from_secs(30)));
    assert_eq!(t.read, Some(Duration::from_secs(60)));
    assert_eq!(t.client_lifetime, Some(Duration::from_secs(7200)));
    assert_eq!(t.request, Some(Duration::from_millis(1500)));
    assert_eq!(t.shutdown_lifetime, Some(Duration::from_millis(500)));
    assert_eq!(t.dns, Some(Duration::from_secs(86_400)));
    assert_eq!(config.client_ip_max_connections, Some(16));
    assert_eq!(
        config.dns_nameservers,
        ["192.0.2.53", "2001:db8::53", "192.0.2.54"].map(|ip| ip.parse::<IpAddr>().unwrap())
    );
    let logs: Vec<(String, String)> = config
        .access_logs
        .iter()
        .map(|target| match target {
            AccessLogTarget::None => ("none".into(), String::new()),
            AccessLogTarget::File { path, format } => {
                (path.display().to_string(), format.name.clone())
            }
        })
        .collect();
    assert_eq!(
        logs,
        [
            ("/var/log/squid/a.log", "squid"),
            ("/var/log/squid/b.log", "mine"),
            ("/var/log/squid/c.log", "common"),
            ("none", ""),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert_eq!(
        config.logformat("mine").unwrap().spec,
        "%>a %un \"%rm %ru\""
    );
    assert!(config.logformat("squid").is_some() && config.logformat("nope").is_none());
    assert_eq!(
        parse("client_ip_max_connections -1").client_ip_max_connections,
        None
    );
    for (value, expected) in [
        ("30", 30_000),
        ("30 seconds", 30_000),
        ("1 second", 1_000),
        ("5 minutes", 300_000),
        ("2 hours", 7_200_000),
        ("1 hour", 3_600_000),
        ("2 days", 172_800_000),
        ("1 week", 604_800_000),
        ("250 milliseconds", 250),
        ("0", 0),
    ] {
        let config = parse(&format!("connect_timeout {value}"));
        assert_eq!(
            config.timeouts.connect,
            Some(Duration::from_millis(expected)),
            "{value}"
        );
    }
}

#[test]
fn acl_values_from_files() {
    let dir = TempDir::new();
    dir.write(
        "lists/domains.txt",
        "# blocked\n.ads.example\n\n  tracker.example  \n",
    );
    dir.write("lists/nets.txt", "10.0.0.0/8\nnot-an-address\n");
    dir.write("lists/empty.txt", "# nothing yet\n");
    let name = dir.0.join("squid.conf").display().to_string();
    let config = parse_str(
        "acl ads dstdomain \"lists/domains.txt\" extra.example\nacl none src \"lists/empty.txt\"\n\
         http_access deny ads\nhttp_access deny none\nhttp_access allow all\n",
        &name,
    )
    .unwrap();
    assert_eq!(config.warnings.len(), 1);
    assert_eq!(config.warnings[0].line, 2);
    let config = config.config;
    for (host, expected) in [
        ("x.ads.example", false),
        ("tracker.example", false),
        ("extra.example", false),
        ("www.tracker.example", true),
    ] {
        assert_eq!(allowed(&config, &req(host, 443)), expected, "{host}");
    }
    // A bad value names the value file and its line.
    let err = parse_str("acl n src \"lists/nets.txt\"\n", &name).unwrap_err();
    let diagnostic = err.diagnostic().unwrap();
    assert_eq!(
        (
            diagnostic.file.clone(),
            diagnostic.line,
            diagnostic.text.as_str()
        ),
        (
            dir.0.join("lists/nets.txt").display().to_string(),
            2,
            "not-an-address"
        )
    );
}

#[test]
fn redefining_predefined_acls() {
    let loaded = parse_str(
        "acl manager proto cache_object\n\
         acl manager url_regex -i ^cache_object:// +i ^[^:]+://[^/]+/squid-internal-mgr/\n\
         acl localhost src 10.9.9.9\nacl CONNECT method CONNECT\nacl all src 0.0.0.0/0.0.0.0\n\
         http_access allow localhost\nhttp_access allow manager\nhttp_access deny all\n",
        "test.conf",
    )
    .unwrap();
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    assert!(loaded
        .warnings
        .iter()
        .all(|w| w.message.contains("built in")));
    let config = loaded.config;
    // localhost grew by 10.9.9.9 and kept 127.0.0.1.
    assert!(allowed(&config, &req("a.org", 443).from("10.9.9.9")));
    assert!(allowed(&config, &req("a.org", 443).from("127.0.0.1")));
    assert!(!allowed(&config, &req("a.org", 443).from("10.9.9.8")));
    // Other type changes of built-in names are errors.
    let err = parse_err("acl manager src 10.0.0.0/8");
    assert!(
        err.message.contains("already defined with type manager"),
        "{err}"
    );
}

#[test]
fn unsupported_acl_types_warn_until_used() {
    let loaded = parse_str(
        "acl QUERY urlpath_regex cgi-bin \\?\ncache deny QUERY\nacl ua browser curl\nhttp_access allow all\n",
        "test.conf",
    )
    .unwrap();
    let lines: Vec<usize> = loaded.warnings.iter().map(|w| w.line).collect();
    assert_eq!(lines, [1, 2, 3]);
    assert!(loaded.warnings[0].message.contains("urlpath_regex"));
    // Redefining an unsupported ACL with another type is still a conflict.
    let err = parse_err("acl q urlpath_regex x\nacl q port 1");
    assert_eq!(err.line, 2);
}

#[test]
fn includes_relative_glob_and_loops() {
    let loaded = load(testdata("includes/main.conf")).unwrap();
    let main = testdata("includes/main.conf").display().to_string();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(
        (loaded.warnings[0].file.as_str(), loaded.warnings[0].line),
        (main.as_str(), 4)
    );
    assert!(loaded.warnings[0].message.contains("matches no file"));
    let config = loaded.config;
    assert_eq!(config.http_access_len(), 3);
    assert!(allowed(&config, &req("example.com", 443).from("192.0.2.1")));
    assert!(!allowed(&config, &req("example.com", 80).from("192.0.2.1")));
    assert!(!allowed(
        &config,
        &req("www.facebook.com", 443).from("192.0.2.1")
    ));
    assert!(!allowed(
        &config,
        &req("example.com", 443).from("198.51.100.1")
    ));
    // Denials name the included file.
    match req("example.com", 443).from("198.51.100.1").decide(&config) {
        Decision::Deny { file, line, .. } => {
            assert_eq!(file, testdata("includes/rules.conf").display().to_string());
            assert_eq!(line, 3);
        }
        other => panic!("{other:?}"),
    }

    for (name, including, line) in [
        ("includes/loop_a.conf", "includes/loop_b.conf", 2),
        ("includes/loop_self.conf", "includes/loop_self.conf", 1),
    ] {
        let err = load(testdata(name)).unwrap_err();
        let diagnostic = err.diagnostic().unwrap_or_else(|| panic!("{err}"));
        assert!(diagnostic.message.contains("include loop"), "{err}");
        assert_eq!(diagnostic.line, line, "{err}");
        assert!(Path::new(&diagnostic.file).ends_with(including), "{err}");
    }

    // Too deep (no loop): 20 files each including the next.
    let dir = TempDir::new();
    for i in 0..20 {
        dir.write(&format!("f{i}.conf"), &format!("include f{}.conf\n", i + 1));
    }
    dir.write("f20.conf", "http_access allow all\n");
    let err = load(dir.0.join("f0.conf")).unwrap_err();
    assert!(err.to_string().contains("nested deeper than 16"), "{err}");
    // Absolute include paths work from parse_str.
    let text = format!("include {}\n", dir.0.join("f20.conf").display());
    assert_eq!(parse(&text).http_access_len(), 1);
}

#[test]
fn real_world_files_load_with_warnings_only() {
    // Debian's default squid.conf (with its conf.d include).
    let loaded = load(testdata("debian/squid.conf")).unwrap();
    let messages: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    // coredump_dir, seven refresh_pattern lines, and conf.d's logfile_rotate.
    assert_eq!(messages.len(), 9, "{messages:#?}");
    assert!(messages
        .iter()
        .any(|m| m.contains("conf.d/debian.conf:6: directive has no effect")));
    let debian = loaded.config;
    assert!(debian.needs_destination());
    assert!(allowed(
        &debian,
        &req("example.com", 443).to("93.184.216.34")
    ));
    assert!(allowed(&debian, &req("localhost", 443).to("127.0.0.1")));
    assert!(!allowed(
        &debian,
        &req("example.com", 22).to("93.184.216.34")
    ));
    assert!(!allowed(
        &debian,
        &req("example.com", 8080).to("93.184.216.34")
    ));
    assert!(!allowed(
        &debian,
        &req("example.com", 443).from("10.1.2.3").to("93.184.216.34")
    ));

    // A Squid 3.1-era file that spells out today's built-in ACLs.
    let loaded = load(testdata("squid31.conf")).unwrap();
    let config = &loaded.config;
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.line == 4 && w.message.contains("built in")),
        "{:#?}",
        loaded.warnings
    );
    assert_eq!(config.timeouts.connect, Some(Duration::from_secs(30)));
    assert_eq!(
        config.timeouts.client_lifetime,
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(config.dns_nameservers.len(), 2);
    let lan = |host: &'static str| req(host, 443).from("192.168.7.7").to("93.184.216.34");
    assert!(allowed(config, &lan("example.com")));
    assert!(!allowed(
        config,
        &lan("www.facebook.com").at(Weekday::Monday, 9, 0)
    ));
    assert!(allowed(
        config,
        &lan("www.facebook.com").at(Weekday::Wednesday, 12, 15)
    ));
    assert!(!allowed(config, &lan("example.com").to("127.0.0.1")));
    assert!(!allowed(
        config,
        &req("example.com", 443)
            .from("203.0.113.1")
            .to("93.184.216.34")
    ));

    // The Squid wiki's NCSA authentication example.
    let loaded = load(testdata("wiki_auth.conf")).unwrap();
    let config = &loaded.config;
    assert!(!loaded.warnings.is_empty());
    let warned: Vec<(usize, &str)> = loaded
        .warnings
        .iter()
        .map(|w| (w.line, w.text.split_whitespace().next().unwrap_or_default()))
        .collect();
    assert_eq!(
        warned,
        [
            // children's helper-process options; credentialsttl now applies.
            (4, "startup=5"),
            (26, "cache_mem"),
            (27, "cache_dir"),
            (28, "visible_hostname"),
            (32, "cache_log"),
        ]
    );
    assert_eq!(config.http_ports.len(), 2);
    assert_eq!(config.auth_realm(), Some("Squid proxy-caching web server"));
    assert_eq!(
        config.timeouts.shutdown_lifetime,
        Some(Duration::from_secs(3))
    );
    assert_eq!(config.access_logs.len(), 2);
    let alice = config.verify_basic(&basic("alice:correctbatteryhorsestapler"));
    assert_eq!(alice.as_deref(), Some("alice"));
    assert_eq!(
        config.verify_basic(&basic("bob:b0b pass")).as_deref(),
        Some("bob")
    );
    assert_eq!(
        config.verify_basic(&basic("carol:c4rol")).as_deref(),
        Some("carol")
    );
    let lan = || req("example.com", 443).from("192.168.1.5");
    assert_eq!(lan().decide(config), Decision::AuthRequired);
    assert_eq!(lan().user("bob").decide(config), Decision::Allow);
    assert!(!allowed(
        config,
        &lan().user("bob").at(Weekday::Saturday, 10, 0)
    ));
    assert_eq!(
        lan()
            .user("alice")
            .at(Weekday::Saturday, 10, 0)
            .decide(config),
        Decision::Allow
    );
    assert!(!allowed(
        config,
        &req("ads.example.net", 443)
            .from("192.168.1.5")
            .user("alice")
    ));
    assert!(!allowed(config, &req("m.facebook.com", 443).user("alice")));
}

/// Requests covering every ACL type's inputs, for comparing two configurations.
fn request_grid() -> Vec<Req> {
    let mut grid = Vec::new();
    for client in [
        "127.0.0.1",
        "10.1.2.3",
        "192.0.2.7",
        "::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
    ] {
        for host in [
            "example.com",
            "www.example.com",
            "10.0.0.1",
            "::1",
            "other.org",
            "ads.tracker.net",
        ] {
            for port in [443, 80, 8443, 22] {
                for dst in [
                    None,
                    Some("127.0.0.1"),
                    Some("93.184.216.34"),
                    Some("fe80::1"),
                ] {
                    for user in [None, Some("alice"), Some("bob")] {
                        for (day, hour) in [(Weekday::Monday, 9), (Weekday::Saturday, 23)] {
                            let mut request = req(host, port).from(client).at(day, hour, 0);
                            request.dst = dst;
                            request.user = user;
                            request.local_port = if port == 22 { 3129 } else { 3128 };
                            grid.push(request);
                        }
                    }
                }
            }
        }
    }
    grid
}

#[test]
fn render_round_trip() {
    let dir = TempDir::new();
    dir.write(
        "passwd",
        "alice:{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\nbob:$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00\n",
    );
    dir.write("domains.txt", ".tracker.net\nexample.com\n");
    dir.write(
        "conf.d/extra.conf",
        "acl lan src 10.0.0.0/255.0.0.0 fe80::/10 192.0.2.1-192.0.2.9\n",
    );
    let text = "\
        http_port 3128\nhttp_port [::1]:3129 name=six\n\
        include conf.d/*.conf\n\
        logformat mine %ts.%03tu %>a %[un \"%rm %ru\" %{%H:%M}tl\n\
        access_log stdio:/var/log/a.log mine\naccess_log daemon:/var/log/b.log\naccess_log none\n\
        connect_timeout 1.5 seconds\nread_timeout 15 minutes\nclient_lifetime 1 day\nrequest_timeout 30\n\
        shutdown_lifetime 3 seconds\ndns_timeout 250 milliseconds\nclient_ip_max_connections 32\n\
        dns_nameservers 192.0.2.53 2001:db8::53\n\
        auth_param basic program /usr/lib/squid/basic_ncsa_auth passwd\n\
        auth_param basic realm \"My Proxy\"\nauth_param basic children 5 startup=1\n\
        auth_param basic credentialsttl 2 hours\nauth_param basic utf8 on\n\
        acl SSL_ports port 443 8443\nacl Safe_ports port 80 443 1025-65535\n\
        acl ads dstdomain \"domains.txt\" .Ads.Example.\nacl rx dstdom_regex -i ^www\\. +i Tracker\n\
        acl url url_regex :8443$\nacl meta dst -n 169.254.169.254\nacl here localip ::1 127.0.0.1\n\
        acl alt_port myport 3129\nacl verbs method CONNECT\nacl schemes proto NONE HTTP\n\
        acl hours time MTWHF 08:00-18:00 A 10:00-12:00\nacl admins proxy_auth -i alice\n\
        acl users proxy_auth_regex ^b\nacl authed proxy_auth REQUIRED\n\
        acl localhost src 10.255.255.255\nacl QUERY urlpath_regex cgi-bin\n\
        http_access deny !Safe_ports\nhttp_access deny CONNECT !SSL_ports\n\
        http_access deny to_localhost\nhttp_access deny to_linklocal\nhttp_access deny meta\n\
        http_access deny ads\nhttp_access allow localhost\nhttp_access allow alt_port lan\n\
        http_access allow lan !rx url\nhttp_access deny ! hours\nhttp_access allow admins\n\
        http_access allow users authed verbs schemes\nhttp_access allow here\n\
        cache_dir ufs /var/spool/squid 100 16 256\n";
    let name = dir.0.join("squid.conf").display().to_string();
    let original = parse_str(text, &name).unwrap().config;
    let rendered = original.render_effective();
    let reparsed = parse_str(&rendered, &name)
        .unwrap_or_else(|err| panic!("{err}\n{rendered}"))
        .config;
    assert_eq!(reparsed.render_effective(), rendered);
    assert!(
        rendered.contains("\nacl lan src 10.0.0.0/8 fe80::/10 192.0.2.1-192.0.2.9\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\nacl localhost src 10.255.255.255\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\nacl alt_port localport 3129\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\nacl rx dstdom_regex -i ^www\\. +i Tracker\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\nhttp_access deny !hours\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\naccess_log /var/log/a.log mine\n"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\nconnect_timeout 1500 milliseconds\n"),
        "{rendered}"
    );
    assert!(
        !rendered.contains("QUERY") && !rendered.contains("include"),
        "{rendered}"
    );

    assert_eq!(original.http_ports, reparsed.http_ports);
    assert_eq!(original.access_logs, reparsed.access_logs);
    assert_eq!(original.logformats, reparsed.logformats);
    assert_eq!(original.timeouts, reparsed.timeouts);
    assert_eq!(original.dns_nameservers, reparsed.dns_nameservers);
    assert_eq!(
        original.client_ip_max_connections,
        reparsed.client_ip_max_connections
    );
    assert_eq!(original.auth_realm(), reparsed.auth_realm());
    type Rule = (bool, Vec<(bool, String, acl::AclKind)>);
    let rules = |config: &SquidConfig| -> Vec<Rule> {
        config
            .rules
            .iter()
            .map(|rule| {
                (
                    rule.allow,
                    rule.acls
                        .iter()
                        .map(|r| {
                            let acl = &config.acls[r.index];
                            (r.negated, acl.name.clone(), acl.kind.clone())
                        })
                        .collect(),
                )
            })
            .collect()
    };
    assert_eq!(rules(&original), rules(&reparsed));
    let grid = request_grid();
    let mut outcomes = [0usize; 3];
    for request in &grid {
        let before = request.decide(&original);
        let after = request.decide(&reparsed);
        match (&before, &after) {
            (
                Decision::Deny {
                    line: a,
                    rule_text: text_a,
                    ..
                },
                Decision::Deny {
                    line: b,
                    rule_text: text_b,
                    ..
                },
            ) => {
                // Same rule, maybe on another line of the rendered text.
                assert_eq!(*a == 0, *b == 0, "{request:?}");
                if *a != 0 {
                    assert_eq!(text_a, text_b, "{request:?}");
                }
                outcomes[1] += 1;
            }
            _ => {
                assert_eq!(before, after, "{request:?}");
                outcomes[usize::from(before == Decision::AuthRequired) * 2] += 1;
            }
        }
    }
    // The grid exercises every kind of answer.
    assert!(outcomes.iter().all(|&count| count > 0), "{outcomes:?}");

    // The shipped files round-trip too.
    for file in [
        "istio.conf",
        "debian/squid.conf",
        "squid31.conf",
        "wiki_auth.conf",
        "includes/main.conf",
    ] {
        let path = testdata(file);
        let config = load(&path).unwrap().config;
        let rendered = config.render_effective();
        let again = parse_str(&rendered, &path.display().to_string())
            .unwrap_or_else(|err| panic!("{file}: {err}\n{rendered}"))
            .config;
        assert_eq!(again.render_effective(), rendered, "{file}");
        for request in &grid {
            let (a, b) = (request.decide(&config), request.decide(&again));
            assert_eq!(
                std::mem::discriminant(&a),
                std::mem::discriminant(&b),
                "{file}: {request:?}"
            );
        }
    }
    assert_eq!(
        load(testdata("istio.conf"))
            .unwrap()
            .config
            .render_effective(),
        "http_port 3128\nacl CONNECT method CONNECT\nacl SSL_ports port 443\n\
         http_access deny CONNECT !SSL_ports\nhttp_access allow localhost manager\n\
         http_access deny manager\nhttp_access allow all\n"
    );
}

#[test]
fn diagnostics_format() {
    let err = parse_err("http_access allow all\nbogus 1 2\n");
    assert_eq!(
        err.to_string(),
        "test.conf:2: unknown directive: 'bogus 1 2'"
    );
    let warning = &parse_str("reply_header_add X-A b\n", "squid.conf")
        .unwrap()
        .warnings[0];
    assert_eq!(
        warning.to_string(),
        "squid.conf:1: directive has no effect in spliced (spliced rewrites no HTTP header fields beyond hop-by-hop ones, via and forwarded_for); ignored: 'reply_header_add X-A b'"
    );
}

#[test]
fn truncated_inputs_never_panic() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SquidConfig>();
    for file in [
        "istio.conf",
        "debian/squid.conf",
        "squid31.conf",
        "wiki_auth.conf",
    ] {
        let path = testdata(file);
        let name = path.display().to_string();
        let text = fs::read_to_string(&path).unwrap();
        let mut cut = 0;
        while cut < text.len() {
            // Every prefix, and every prefix with a damaged last character.
            let _ = parse_str(&text[..cut], &name);
            let _ = parse_str(&format!("{}\"\\%[!-", &text[..cut]), &name);
            cut += text[cut..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let spec = "%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt [%{%d/%b}tl] %-8.3\"un %{X}>h é";
    for (cut, _) in spec.char_indices() {
        let _ = LogFormat::parse("t", &spec[..cut]);
    }
}

#[test]
fn dstdomain_overlaps_warn_and_long_lists_match_fast() {
    let loaded = parse_str(
        "acl d dstdomain .example.com www.example.com\nacl d dstdomain example.org .example.org\n\
         acl d dstdomain a.example.net a.example.net\nacl e dstdomain .x.org .y.x.org\nhttp_access deny d\n",
        "test.conf",
    )
    .unwrap();
    let warned: Vec<(usize, &str, &str)> = loaded
        .warnings
        .iter()
        .map(|w| {
            (
                w.line,
                w.text.as_str(),
                w.message.split('\'').nth(1).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        warned,
        [
            (1, "www.example.com", ".example.com"),
            (2, ".example.org", "example.org"),
            (3, "a.example.net", "a.example.net"),
            (4, ".y.x.org", ".x.org"),
        ]
    );

    let dir = TempDir::new();
    let list: String = (0..100_000)
        .map(|i| format!(".site{i}.example\n"))
        .collect();
    dir.write("big.txt", &list);
    let name = dir.0.join("squid.conf").display().to_string();
    let config = parse_str(
        "acl big dstdomain \"big.txt\"\nhttp_access deny big\nhttp_access allow all\n",
        &name,
    )
    .unwrap()
    .config;
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        assert!(!allowed(&config, &req("deep.www.site99999.example", 443)));
        assert!(allowed(&config, &req("www.site100000.example", 443)));
    }
    // A linear scan would take seconds here.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn via_and_forwarded_for_are_parsed() {
    use crate::http_forward::{ForwardedFor, HeaderPolicy};
    let loaded = parse_str("http_access allow all\n", "squid.conf").unwrap();
    assert_eq!(loaded.config.headers, HeaderPolicy::default());
    let loaded = parse_str(
        "via off\nforwarded_for transparent\nhttp_access allow all\n",
        "squid.conf",
    )
    .unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(!loaded.config.headers.via);
    assert_eq!(
        loaded.config.headers.forwarded_for,
        ForwardedFor::Transparent
    );
    let rendered = loaded.config.render_effective();
    let lines: Vec<&str> = rendered.lines().collect();
    assert!(lines.contains(&"via off"), "{rendered}");
    assert!(lines.contains(&"forwarded_for transparent"), "{rendered}");
    for bad in ["via maybe\n", "forwarded_for yes\n", "forwarded_for\n"] {
        assert!(parse_str(bad, "squid.conf").is_err(), "{bad}");
    }
}
