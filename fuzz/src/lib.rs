//! What each fuzz target does with one input, and the properties it checks.
//!
//! The `fuzz_targets/*.rs` binaries call these functions, and so does
//! `proxy-userspace/tests/fuzz_regressions.rs` (which includes this file as a
//! module) when it replays the inputs that once crashed a target: a fix is
//! checked through the very code path that found the bug. Every function
//! panics when a property fails; it must not panic otherwise.
//!
//! Only `std` and `spliced` are used here, because the regression test
//! compiles this file inside proxy-userspace.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use spliced::{
    connect_request::{parse_head, parse_target, Target},
    policy::PortSet,
    squid::{
        self, BasicAuth, Decision, LocalTime, LogFields, LogFormat, RequestFacts, Step1, Step2,
        Weekday,
    },
};

/// What a fuzz target does with one input.
pub type Run = fn(&[u8]);

/// Every target: its name (the directory of its corpus and regression inputs)
/// and the function that runs one input.
pub const TARGETS: &[(&str, Run)] = &[
    ("connect_head", connect_head),
    ("connect_target", connect_target),
    ("squid_conf", squid_conf),
    ("squid_conf_include", squid_conf_include),
    ("htpasswd", htpasswd),
    ("basic_auth", basic_auth),
    ("logformat", logformat),
    ("port_set", port_set),
    ("client_hello", client_hello),
    ("absolute_uri", absolute_uri),
];

/// `connect_request::parse_head` on raw client bytes; then `parse_target` on
/// the request target of a complete head.
pub fn connect_head(data: &[u8]) {
    let Ok(Some(head)) = parse_head(data) else {
        return;
    };
    assert!(head.head_len <= data.len(), "head longer than the input");
    assert_eq!(
        head.pipelined,
        &data[head.head_len..],
        "pipelined bytes are not what follows the head"
    );
    target_round_trip(&head.target);
}

/// `connect_request::parse_target` on any text.
pub fn connect_target(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        target_round_trip(text);
    }
}

/// A target that parses prints as text that parses to the same target.
fn target_round_trip(authority: &str) {
    let Ok(target) = parse_target(authority) else {
        return;
    };
    assert_ne!(target.port, 0, "{authority:?}: port 0 accepted");
    let printed = target.to_string();
    let again: Target = parse_target(&printed)
        .unwrap_or_else(|err| panic!("{authority:?} printed as {printed:?}, which fails: {err}"));
    assert_eq!(target, again, "{authority:?} printed as {printed:?}");
}

/// The files every squid.conf target finds beside its input: the reader's
/// test data (includes, an ACL value file, a password file).
const FIXTURES: &[(&str, &str)] = &[
    (
        "blocked_domains.txt",
        include_str!("../../proxy-userspace/src/squid/testdata/blocked_domains.txt"),
    ),
    (
        "passwd",
        include_str!("../../proxy-userspace/src/squid/testdata/passwd"),
    ),
    (
        "istio.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/istio.conf"),
    ),
    (
        "includes/main.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/main.conf"),
    ),
    (
        "includes/rules.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/rules.conf"),
    ),
    (
        "includes/loop_a.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/loop_a.conf"),
    ),
    (
        "includes/loop_b.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/loop_b.conf"),
    ),
    (
        "includes/loop_self.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/loop_self.conf"),
    ),
    (
        "includes/acls/10-office.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/acls/10-office.conf"),
    ),
    (
        "includes/acls/20-ports.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/includes/acls/20-ports.conf"),
    ),
    (
        "debian/conf.d/debian.conf",
        include_str!("../../proxy-userspace/src/squid/testdata/debian/conf.d/debian.conf"),
    ),
];

/// A directory of this process holding [`FIXTURES`], one per `kind` (so that
/// what one target writes there is never seen by another).
fn fixture_dir(kind: &'static str) -> PathBuf {
    static DIRS: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, dir)) = dirs.iter().find(|(known, _)| *known == kind) {
        return dir.clone();
    }
    let dir = std::env::temp_dir()
        .join(format!("spliced-fuzz-{}", std::process::id()))
        .join(kind);
    let _ = std::fs::remove_dir_all(&dir);
    for (name, text) in FIXTURES {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("fixture paths have a parent"))
            .expect("creating the fixture directory");
        std::fs::write(&path, text).expect("writing a fixture");
    }
    dirs.push((kind, dir.clone()));
    dir
}

/// Removes the fixture directories of this process (for the regression test;
/// a fuzzing process leaves them).
pub fn remove_fixtures() {
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("spliced-fuzz-{}", std::process::id())),
    );
}

/// The logical lines of configuration text, as the squid reader makes them:
/// comment lines dropped, a line ending in `\` joined with the next.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim_end();
        if line.trim_start().starts_with('#') {
            continue;
        }
        let (content, continues) = match line.strip_suffix('\\') {
            Some(content) => (content, true),
            None => (line, false),
        };
        let mut buffer = pending.take().unwrap_or_default();
        buffer.push_str(content);
        if continues {
            pending = Some(buffer);
        } else {
            out.push(buffer);
        }
    }
    out.extend(pending);
    out
}

/// Whether configuration text could make the reader open a file outside the
/// fixture directory: `..` anywhere, or an absolute name where a file is read
/// (`include`, a quoted ACL value file, `auth_param`'s password file). Such
/// inputs are skipped: `/dev/zero` or a FIFO would hang the fuzzer, and any
/// other file would make it depend on the machine.
fn may_leave_fixtures(text: &str) -> bool {
    if text.contains("..") {
        return true;
    }
    let absolute_in = |line: &str| {
        if line.contains("\"/") {
            return true;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("include") => words.any(|word| word.trim_matches('"').starts_with('/')),
            Some("auth_param") => words.skip(3).any(|word| word.starts_with('/')),
            _ => false,
        }
    };
    // The raw lines too, in case the joining above ever differs from the reader's.
    logical_lines(text).iter().any(|line| absolute_in(line)) || text.lines().any(absolute_in)
}

/// `squid::parse_str` on the input, as a file beside the fixtures.
pub fn squid_conf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if may_leave_fixtures(text) {
        return;
    }
    let name = fixture_dir("squid_conf").join("fuzz.conf");
    check_config(text, &name);
}

/// The input split at its first NUL byte into two files: the first (parsed
/// with `parse_str`) includes the second (`second.conf`, written beside it).
/// Without a NUL byte the second file is empty.
pub fn squid_conf_include(data: &[u8]) {
    static WRITING: Mutex<()> = Mutex::new(());
    let (first, second) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(first), Ok(second)) = (std::str::from_utf8(first), std::str::from_utf8(second)) else {
        return;
    };
    if may_leave_fixtures(first) || may_leave_fixtures(second) {
        return;
    }
    let dir = fixture_dir("squid_conf_include");
    let _writing = WRITING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    std::fs::write(dir.join("second.conf"), second).expect("writing second.conf");
    let text = if first.contains("second.conf") {
        first.to_owned()
    } else {
        format!("{first}\ninclude second.conf\n")
    };
    check_config(&text, &dir.join("fuzz.conf"));
}

/// Parses configuration text; when it loads, its `render_effective` output
/// must load again, render identically, and decide a few requests the same way.
fn check_config(text: &str, name: &Path) {
    let name = name.to_str().expect("temporary paths are UTF-8");
    let Ok(loaded) = squid::parse_str(text, name) else {
        return;
    };
    let config = &loaded.config;
    let rendered = config.render_effective();
    let again = squid::parse_str(&rendered, name).unwrap_or_else(|err| {
        panic!("the rendered configuration does not load: {err}\n--- rendered ---\n{rendered}")
    });
    let rendered_again = again.config.render_effective();
    assert_eq!(
        rendered, rendered_again,
        "rendering the rendered configuration changes it"
    );
    for facts in sample_requests() {
        assert_eq!(
            outcome(&config.decide(&facts)),
            outcome(&again.config.decide(&facts)),
            "the rendered configuration decides {facts:?} differently\n--- rendered ---\n{rendered}"
        );
    }
    // The TLS name policy: the rendered file peeks and judges alike (the
    // rule locations in terminate details differ, so only the kinds count).
    for facts in sample_requests() {
        let step1 = RequestFacts { step: 1, ..facts };
        let kind1 = |step: Step1| std::mem::discriminant(&step);
        assert_eq!(
            kind1(config.tls_step1(&step1)),
            kind1(again.config.tls_step1(&step1)),
            "the rendered configuration peeks {facts:?} differently\n--- rendered ---\n{rendered}"
        );
        for sni in [None, Some("www.example.com"), Some("other.example.org")] {
            let step2 = RequestFacts {
                step: 2,
                sni,
                ..facts
            };
            let kind2 = |step: Step2| match step {
                Step2::Splice => "splice",
                Step2::Terminate { reason, .. } => reason,
            };
            assert_eq!(
                kind2(config.tls_step2(&step2, true)),
                kind2(again.config.tls_step2(&step2, true)),
                "the rendered configuration judges {facts:?} with SNI {sni:?} differently\n--- rendered ---\n{rendered}"
            );
            let _ = config.tunnels_unsupported(&step2);
        }
    }
    let _ = config.needs_destination();
    let _ = config.verify_basic(&basic("bob:password"));
}

/// A decision without the places in files, which rendering changes: the
/// line of a deny rule, and the rule an implicit deny names.
fn outcome(decision: &Decision) -> String {
    match decision {
        Decision::Allow => "allow".to_owned(),
        Decision::AuthRequired => "authentication required".to_owned(),
        Decision::Deny { file, line: 0, .. } if file.is_empty() => "implicit deny".to_owned(),
        Decision::Deny { rule_text, .. } => format!("deny by {rule_text}"),
    }
}

fn sample_requests() -> [RequestFacts<'static>; 4] {
    let ip = |text: &str| text.parse::<IpAddr>().expect("a sample address");
    let at = |weekday, hour, minute| LocalTime::new(weekday, hour, minute).expect("a sample time");
    [
        RequestFacts {
            client: ip("10.0.0.5"),
            local_ip: Some(ip("10.0.0.1")),
            local_port: 3128,
            method: "CONNECT",
            host: "www.example.com",
            port: 443,
            dst: Some(ip("93.184.216.34")),
            user: None,
            now: at(Weekday::Monday, 12, 30),
            step: 0,
            sni: None,
        },
        RequestFacts {
            client: ip("127.0.0.1"),
            local_ip: None,
            local_port: 3129,
            method: "CONNECT",
            host: "ads.example.net.",
            port: 80,
            dst: Some(ip("::1")),
            user: Some("alice"),
            now: at(Weekday::Saturday, 3, 0),
            step: 0,
            sni: None,
        },
        RequestFacts {
            client: ip("2001:db8::1"),
            local_ip: Some(ip("::1")),
            local_port: 8080,
            method: "GET",
            host: "192.0.2.7",
            port: 8443,
            dst: Some(ip("192.0.2.7")),
            user: Some("Bob"),
            now: at(Weekday::Wednesday, 18, 0),
            step: 0,
            sni: None,
        },
        RequestFacts {
            client: ip("::ffff:192.168.1.20"),
            local_ip: Some(ip("192.168.1.1")),
            local_port: 3128,
            method: "CONNECT",
            host: "[2001:db8::5]",
            port: 22,
            dst: None,
            user: Some(""),
            now: at(Weekday::Sunday, 23, 59),
            step: 0,
            sni: None,
        },
    ]
}

/// `BasicAuth::parse_htpasswd` on any text. (Only parsed: a bcrypt hash with a
/// high cost would make a check take minutes.)
pub fn htpasswd(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((auth, warnings)) = BasicAuth::parse_htpasswd(text, "fuzz-passwd") {
        assert!(auth.user_count() <= text.lines().count());
        assert!(warnings.len() <= text.lines().count());
    }
}

/// The users of the fixed password file of [`basic_auth`], with their passwords.
const USERS: &[(&str, &str, &str)] = &[
    (
        "alice",
        "$2a$04$UuTkLRZZ6QofpDOlMz32MuuxEHA43WOemOYHPz6.SjsVsyO1tDU96",
        "password",
    ),
    ("bob", "$apr1$lZL6V/ci$eIMz/iKDkbtys/uU7LEK00", "password"),
    ("carol", "{SHA}87u9ZqY9S/F0eUBXjsPQEDUw4h0=", "hunter2"),
    ("Dave", "$1$abcdefgh$vhxKZ/s1ygZHyCEDPyqtQ/", "hunter2"),
];

/// A `Basic` `Proxy-Authorization` value.
fn basic(credentials: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("Basic ");
    for chunk in credentials.as_bytes().chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The fixed password file, with `casesensitive` off and on.
fn fixed_auth(case_sensitive: bool) -> &'static BasicAuth {
    static AUTH: OnceLock<[BasicAuth; 2]> = OnceLock::new();
    let both = AUTH.get_or_init(|| {
        let text: String = USERS
            .iter()
            .map(|(user, hash, _)| format!("{user}:{hash}\n"))
            .collect();
        let (auth, warnings) =
            BasicAuth::parse_htpasswd(&text, "fixed-passwd").expect("the fixed file parses");
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut sensitive = auth.clone();
        sensitive.case_sensitive = true;
        for (user, _, password) in USERS {
            let header = basic(&format!("{user}:{password}"));
            assert_eq!(sensitive.verify_basic(&header).as_deref(), Some(*user));
        }
        [auth, sensitive]
    });
    &both[usize::from(case_sensitive)]
}

/// `BasicAuth::verify_basic` on any header value against a fixed password
/// file; the first byte chooses `casesensitive`. A user name comes back only
/// for a listed user (lower-cased unless `casesensitive`) and its password.
pub fn basic_auth(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(header) = std::str::from_utf8(rest) else {
        return;
    };
    let case_sensitive = mode & 1 == 1;
    let Some(user) = fixed_auth(case_sensitive).verify_basic(header) else {
        return;
    };
    let listed = USERS.iter().find(|(name, _, _)| {
        if case_sensitive {
            *name == user
        } else {
            name.to_ascii_lowercase() == user
        }
    });
    let Some((_, _, password)) = listed else {
        panic!("{header:?} authenticated unknown user {user:?}");
    };
    // verify_basic accepted the base64, so a plain decoder reads it the same.
    let credentials = header
        .trim()
        .split_once(char::is_whitespace)
        .and_then(|(_, encoded)| decode_base64(encoded.trim()))
        .expect("accepted credentials decode");
    let sent = credentials
        .iter()
        .position(|&b| b == b':')
        .map(|at| &credentials[at + 1..]);
    assert_eq!(
        sent,
        Some(password.as_bytes()),
        "{header:?} authenticated {user:?} with another password"
    );
}

/// Standard base64 with padding, without checks beyond the alphabet.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(out)
}

/// The access record [`logformat`] formats: values with control characters
/// and every kind of address.
struct Record;

impl LogFields for Record {
    fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_544_160_065_248)
    }
    fn duration_ms(&self) -> u64 {
        228
    }
    fn client(&self) -> SocketAddr {
        "[::ffff:172.30.109.89]:50000".parse().expect("an address")
    }
    fn upstream(&self) -> Option<SocketAddr> {
        Some("[2001:db8::1]:443".parse().expect("an address"))
    }
    fn local(&self) -> Option<SocketAddr> {
        None
    }
    fn result_code(&self) -> &str {
        "TCP_TUNNEL"
    }
    fn status(&self) -> u16 {
        200
    }
    fn bytes_to_client(&self) -> u64 {
        87633
    }
    fn bytes_from_client(&self) -> u64 {
        u64::MAX
    }
    fn method(&self) -> &str {
        "CONNECT"
    }
    fn url(&self) -> &str {
        "en.wikipedia.org:443"
    }
    fn user(&self) -> Option<&str> {
        Some("eve\nforged \"line\" é\u{7f}")
    }
    fn hierarchy(&self) -> &str {
        "HIER_DIRECT"
    }
    fn mime_type(&self) -> Option<&str> {
        Some("")
    }
    fn request_header(&self, name: &str) -> Option<&str> {
        (!name.is_empty()).then_some("a\r\nb\tc%[]\\")
    }
}

/// `LogFormat::parse` on any specification, then formatting a fixed record
/// with it. Unless the specification asks for raw values (`%'`) or holds
/// control characters itself, the line has none: no value can forge a line.
pub fn logformat(data: &[u8]) {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(format) = LogFormat::parse("fuzz", spec) else {
        return;
    };
    let lines = [
        format.format_with_offset(&Record, 0),
        format.format_with_offset(&Record, -(13 * 3600 + 45 * 60)),
    ];
    if !spec.contains('\'') && !spec.chars().any(char::is_control) {
        for line in &lines {
            assert!(
                !line.chars().any(char::is_control),
                "{spec:?} printed a control character: {line:?}"
            );
        }
    }
}

/// `PortSet::from_str` on any text: a set that parses prints as text that
/// parses to the same set.
pub fn port_set(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = text.parse::<PortSet>() else {
        return;
    };
    let printed = set.to_string();
    let again: PortSet = printed
        .parse()
        .unwrap_or_else(|err| panic!("{text:?} printed as {printed:?}, which fails: {err}"));
    assert_eq!(set, again, "{text:?} printed as {printed:?}");
    assert!(!set.contains(0), "{text:?} contains port 0");
}

/// `tls_peek::parse` on raw tunnel bytes: any server name it returns is
/// lower-case ASCII, and a decision made on a prefix stands whatever follows
/// (the proxy acts on it before the rest arrives).
pub fn client_hello(data: &[u8]) {
    use spliced::tls_peek::{parse, Peeked, MAX_CLIENT_HELLO};

    let full = parse(data, MAX_CLIENT_HELLO);
    if let Ok(Some(Peeked::Hello { sni: Some(sni) })) = &full {
        assert!(
            !sni.is_empty() && sni.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()),
            "server name {sni:?} is not lower-case ASCII"
        );
    }
    match parse(&data[..data.len() / 2], MAX_CLIENT_HELLO) {
        Ok(None) => {}
        Ok(Some(early)) => assert!(
            matches!(&full, Ok(Some(late)) if *late == early),
            "prefix decided {early:?}, the whole input {full:?}"
        ),
        Err(early) => assert!(
            full.as_ref()
                .is_err_and(|late| std::mem::discriminant(late) == std::mem::discriminant(&early)),
            "prefix failed with {early:?}, the whole input gave {full:?}"
        ),
    }
}

/// `http_forward::target::parse_text` on any text: a target that parses
/// sends an origin-form target starting with `/`, logs an `http://` URL, and
/// that URL parses to the same destination, Host and origin form.
pub fn absolute_uri(data: &[u8]) {
    use spliced::http_forward::target::parse_text;

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_text(text) else {
        return;
    };
    assert!(parsed.origin_form.starts_with('/'), "{text:?} → {parsed:?}");
    assert!(parsed.url.starts_with("http://"), "{text:?} → {parsed:?}");
    assert_ne!(parsed.target.port, 0, "{text:?} → {parsed:?}");
    let again = parse_text(&parsed.url).unwrap_or_else(|err| {
        panic!(
            "{text:?} logs {:?}, which does not parse: {err}",
            parsed.url
        )
    });
    assert_eq!(
        (&again.target, &again.authority, &again.origin_form),
        (&parsed.target, &parsed.authority, &parsed.origin_form),
        "{text:?}"
    );
}
