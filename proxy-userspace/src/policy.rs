//! The built-in access policy: CONNECT only to allowed ports, clients only from
//! loopback and private ranges (Squid's stock `localnet`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A set of TCP ports given as `443,8000-8999`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

/// Why a port list did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid port list item {0:?}: expected a port 1-65535 or a range LOW-HIGH")]
pub struct PortSetError(String);

impl FromStr for PortSet {
    type Err = PortSetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse_port = |item: &str, text: &str| match text.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(PortSetError(item.to_owned())),
            Ok(port) => Ok(port),
        };
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let range = match item.split_once('-') {
                Some((low, high)) => (parse_port(item, low)?, parse_port(item, high)?),
                None => {
                    let port = parse_port(item, item)?;
                    (port, port)
                }
            };
            if range.0 > range.1 {
                return Err(PortSetError(item.to_owned()));
            }
            ranges.push(range);
        }
        Ok(Self(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (low, high)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if low == high {
                write!(f, "{low}")?;
            } else {
                write!(f, "{low}-{high}")?;
            }
        }
        Ok(())
    }
}

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0
            .iter()
            .any(|&(low, high)| (low..=high).contains(&port))
    }
}

/// Why the policy refused a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denial {
    /// The client address is outside loopback and the private ranges.
    #[error("client address not in localnet")]
    ClientNotLocal,
    /// The CONNECT port is not in `--connect-ports`.
    #[error("CONNECT to port {0} not allowed")]
    PortNotAllowed(u16),
    /// A plain-HTTP request to a port outside Squid's stock `Safe_ports`.
    #[error("port {0} not in Safe_ports")]
    UnsafePort(u16),
}

/// Squid's stock `Safe_ports`: where its default configuration lets plain
/// (non-CONNECT) requests go.
pub const SAFE_PORTS: [(u16, u16); 9] = [
    (80, 80),
    (21, 21),
    (443, 443),
    (70, 70),
    (210, 210),
    (1025, 65535),
    (280, 280),
    (488, 488),
    (591, 591),
];

/// The built-in policy of part 1.
#[derive(Clone, Debug)]
pub struct BuiltinPolicy {
    /// Ports CONNECT may reach.
    pub connect_ports: PortSet,
}

impl BuiltinPolicy {
    /// Decides whether `client` may send a plain-HTTP request to `port`: as
    /// Squid's stock configuration, localnet clients to `Safe_ports` (and 777).
    pub fn check_plain(&self, client: IpAddr, port: u16) -> Result<(), Denial> {
        if !is_localnet(client) {
            return Err(Denial::ClientNotLocal);
        }
        let safe = port == 777
            || SAFE_PORTS
                .iter()
                .any(|&(low, high)| (low..=high).contains(&port));
        if !safe {
            return Err(Denial::UnsafePort(port));
        }
        Ok(())
    }

    /// Decides whether `client` may open a tunnel to `port`.
    pub fn check(&self, client: IpAddr, port: u16) -> Result<(), Denial> {
        if !is_localnet(client) {
            return Err(Denial::ClientNotLocal);
        }
        if !self.connect_ports.contains(port) {
            return Err(Denial::PortNotAllowed(port));
        }
        Ok(())
    }
}

/// Squid's stock `localnet` ACL plus loopback: RFC 1122 "this" network, RFC 1918,
/// RFC 6598 shared space, link-local, RFC 4193 unique-local, IPv6 link-local.
pub fn is_localnet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_localnet_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_localnet_v4(v4),
            None => is_localnet_v6(v6),
        },
    }
}

fn is_localnet_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 0 && !ip.is_unspecified())
        || (a == 100 && (64..128).contains(&b))
}

fn is_localnet_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets_parse_lists_and_ranges() {
        let set: PortSet = "443, 8000-8002".parse().unwrap();
        assert!(set.contains(443) && set.contains(8001) && !set.contains(8003));
        assert_eq!(set.to_string(), "443,8000-8002");
        for bad in ["", "0", "70000", "5-3", "a", "1,,2", "-5"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn plain_requests_go_to_safe_ports() {
        let policy = BuiltinPolicy {
            connect_ports: "443".parse().unwrap(),
        };
        let local = "10.0.0.1".parse().unwrap();
        for port in [80, 21, 443, 777, 1025, 8080, 65535] {
            assert_eq!(policy.check_plain(local, port), Ok(()), "{port}");
        }
        for port in [25, 22, 1024, 6] {
            assert_eq!(
                policy.check_plain(local, port),
                Err(Denial::UnsafePort(port))
            );
        }
        assert_eq!(
            policy.check_plain("8.8.8.8".parse().unwrap(), 80),
            Err(Denial::ClientNotLocal)
        );
    }

    #[test]
    fn localnet_matches_squid_stock_ranges() {
        for ok in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.0.5",
            "100.64.0.1",
            "0.1.2.3",
            "::1",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_localnet(ok.parse().unwrap()), "{ok}");
        }
        for denied in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "198.51.100.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "0.0.0.0",
        ] {
            assert!(!is_localnet(denied.parse().unwrap()), "{denied}");
        }
    }
}
