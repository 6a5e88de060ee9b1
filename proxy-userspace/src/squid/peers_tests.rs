//! Unit tests of `peers.rs`: Squid's peer selection over parsed lines.

use std::net::IpAddr;

use super::*;

fn config(text: &str) -> SquidConfig {
    parse_str(text, "peers.conf")
        .unwrap_or_else(|err| panic!("{err}"))
        .config
}

/// The routes of a request, as `CODE/NAME` (`HIER_DIRECT` alone for DIRECT),
/// with the parents named in `down` dead.
fn routes(config: &SquidConfig, method: &str, host: &str, down: &[&str]) -> Vec<String> {
    routes_to(config, method, host, down, &[])
}

/// [`routes`] with the target's resolved addresses.
fn routes_to(
    config: &SquidConfig,
    method: &str,
    host: &str,
    down: &[&str],
    destinations: &[IpAddr],
) -> Vec<String> {
    let facts = RequestFacts {
        client: "10.0.0.1".parse::<IpAddr>().unwrap(),
        local_ip: None,
        local_port: 3128,
        method,
        host,
        port: 443,
        dst: None,
        user: None,
        now: LocalTime::new(Weekday::Monday, 12, 0).unwrap(),
        step: 0,
        sni: None,
    };
    let peers = &config.peers().peers;
    let hierarchical = is_hierarchical(method, false);
    config
        .routes(
            &facts,
            hierarchical,
            |i| !down.contains(&peers[i].name.as_str()),
            destinations,
        )
        .iter()
        .map(|route| match route.peer {
            None => route.code.as_str().to_owned(),
            Some(i) => format!("{}/{}", route.code.as_str(), peers[i].name),
        })
        .collect()
}

const PEERS: &str = "cache_peer a.test parent 3128 0 no-query name=a\n\
                     cache_peer b.test parent 3128 0 no-query name=b default\n\
                     cache_peer c.test parent 3128 0 no-query name=c\n";

#[test]
fn connect_is_not_hierarchical() {
    // Squid's defaults: a CONNECT goes direct; a GET tries the parents first.
    let defaults = config(PEERS);
    assert_eq!(routes(&defaults, "CONNECT", "x.test", &[]), ["HIER_DIRECT"]);
    assert_eq!(
        routes(&defaults, "GET", "x.test", &[]),
        [
            "FIRSTUP_PARENT/a",
            "ANY_OLD_PARENT/c",
            "DEFAULT_PARENT/b",
            "HIER_DIRECT"
        ]
    );
    let nonhier = config(&format!(
        "{PEERS}nonhierarchical_direct off\nprefer_direct on\n"
    ));
    assert_eq!(
        routes(&nonhier, "CONNECT", "x.test", &["a"]),
        ["HIER_DIRECT", "FIRSTUP_PARENT/c", "DEFAULT_PARENT/b"]
    );
}

#[test]
fn never_always_and_peer_access() {
    let conf = config(&format!(
        "{PEERS}acl inside dstdomain .corp.test\nacl blocked dstdomain .blocked.test\n\
         cache_peer_access a deny blocked\n\
         always_direct allow inside\nnever_direct allow all\n"
    ));
    assert_eq!(
        routes(&conf, "CONNECT", "www.corp.test", &[]),
        ["HIER_DIRECT"]
    );
    assert_eq!(
        routes(&conf, "CONNECT", "x.test", &[]),
        ["FIRSTUP_PARENT/a", "ANY_OLD_PARENT/c", "DEFAULT_PARENT/b"]
    );
    // `deny blocked` alone: everything else is allowed (the opposite of the last line).
    assert_eq!(
        routes(&conf, "CONNECT", "a.blocked.test", &["c"]),
        ["DEFAULT_PARENT/b"]
    );
    assert!(routes(&conf, "CONNECT", "x.test", &["a", "b", "c"]).is_empty());
    let rendered = conf.render_effective();
    assert!(rendered.contains("cache_peer b.test parent 3128 0 no-query name=b default\n"));
    assert_eq!(config(&rendered).render_effective(), rendered);
}

#[test]
fn without_peers_never_direct_leaves_no_route() {
    // As Squid: what never_direct matches cannot be forwarded (503).
    let text = "acl corp dstdomain .corp.test\nnever_direct allow !corp\nalways_direct deny all\n";
    let loaded = parse_str(text, "p.conf").unwrap();
    let none: [&str; 0] = [];
    assert_eq!(routes(&loaded.config, "CONNECT", "x.test", &[]), none);
    assert_eq!(
        routes(&loaded.config, "CONNECT", "www.corp.test", &[]),
        ["HIER_DIRECT"]
    );
    let lines: Vec<usize> = loaded.warnings.iter().map(|w| w.line).collect();
    assert_eq!(lines, [2, 3], "{:#?}", loaded.warnings);
    assert!(
        loaded.warnings[0].to_string().contains("503"),
        "{}",
        loaded.warnings[0]
    );
    // Neither line: DIRECT without looking at anything.
    let plain = parse_str("http_access allow all\n", "p.conf").unwrap();
    assert_eq!(routes(&plain.config, "GET", "x.test", &[]), ["HIER_DIRECT"]);
}

#[test]
fn dst_acls_judge_the_resolved_addresses() {
    let conf = config(&format!(
        "{PEERS}acl internal dst 10.0.0.0/8\nacl lab dst 192.0.2.0/24\n\
         cache_peer_access a deny lab\n\
         always_direct allow internal\nnever_direct allow all\n"
    ));
    assert!(conf.routes_need_destinations());
    assert!(!config(PEERS).routes_need_destinations());
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    // An internal address goes direct; a name that did not resolve (no
    // addresses) matches no dst ACL, so it goes through the parents.
    assert_eq!(
        routes_to(&conf, "CONNECT", "intranet.test", &[], &[ip("10.1.2.3")]),
        ["HIER_DIRECT"]
    );
    assert_eq!(
        routes_to(&conf, "CONNECT", "gone.test", &[], &[]),
        ["FIRSTUP_PARENT/a", "ANY_OLD_PARENT/c", "DEFAULT_PARENT/b"]
    );
    // One address of several in the ACL is enough (Squid's ACLDestinationIP),
    // IPv4-mapped IPv6 included.
    assert_eq!(
        routes_to(
            &conf,
            "CONNECT",
            "dual.test",
            &[],
            &[ip("2001:db8::1"), ip("::ffff:10.9.9.9")]
        ),
        ["HIER_DIRECT"]
    );
    // cache_peer_access: parent a is not for the lab network.
    assert_eq!(
        routes_to(&conf, "CONNECT", "lab.test", &[], &[ip("192.0.2.7")]),
        ["FIRSTUP_PARENT/c", "DEFAULT_PARENT/b"]
    );
}
