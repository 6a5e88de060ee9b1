//! Whether a tunnel can be promoted: a pure function of what the two sockets
//! (`TCP_INFO`) and the tc program's sightings say, with the reason when not.

use std::{fmt, net::SocketAddr};

use proxy_common::{packet_flags, tcp_state, PacketEntry};

use super::{
    sockets::{tcpi_opt, ConnInfo},
    translate::is_ipv4,
};

/// One of the proxy's two connections, as qualification sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    /// "client" or "upstream", for the reason of a refusal.
    pub name: &'static str,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub info: ConnInfo,
    /// The entry of the segments that arrive on this connection.
    pub entry: PacketEntry,
}

/// Why a tunnel is not promoted, as a metric label: a bounded set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A connection left ESTABLISHED (a FIN or RST came first).
    NotEstablished,
    /// A connection without TCP timestamps (or a segment without them).
    NoTimestamps,
    /// Microsecond TCP timestamps, which the translation does not shift.
    UsecTimestamps,
    /// A connection without SACK.
    NoSack,
    /// ECN negotiated on one connection only.
    EcnOnOneSide,
    /// TCP Fast Open on a connection.
    FastOpen,
    /// Multipath TCP on a socket.
    Mptcp,
    /// A window scale above 14.
    WindowScale,
    /// The two connections use different IP versions.
    AddressFamily,
    /// A sender's segments would not fit the other connection.
    Mss,
    /// No segment of a connection arrived on an interface the programs are
    /// attached to.
    NotAttached,
    /// The proxy's own segments did not leave with their own addresses (NAT
    /// on this host), or not by an attached interface.
    Nat,
    /// The two connections use different kinds of path (one on lo), or a
    /// connection arrives and leaves by different interfaces.
    MixedPaths,
    /// The proxy's sockets did not drain within the hold's deadline.
    HoldTimeout,
    /// A map update or a socket call failed.
    Internal,
}

impl Reason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Self; 15] = [
        Self::NotEstablished,
        Self::NoTimestamps,
        Self::UsecTimestamps,
        Self::NoSack,
        Self::EcnOnOneSide,
        Self::FastOpen,
        Self::Mptcp,
        Self::WindowScale,
        Self::AddressFamily,
        Self::Mss,
        Self::NotAttached,
        Self::Nat,
        Self::MixedPaths,
        Self::HoldTimeout,
        Self::Internal,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotEstablished => "not_established",
            Self::NoTimestamps => "no_timestamps",
            Self::UsecTimestamps => "usec_timestamps",
            Self::NoSack => "no_sack",
            Self::EcnOnOneSide => "ecn_on_one_side",
            Self::FastOpen => "fast_open",
            Self::Mptcp => "mptcp",
            Self::WindowScale => "window_scale",
            Self::AddressFamily => "address_family",
            Self::Mss => "mss",
            Self::NotAttached => "not_attached",
            Self::Nat => "nat",
            Self::MixedPaths => "mixed_paths",
            Self::HoldTimeout => "hold_timeout",
            Self::Internal => "internal",
        }
    }
}

/// Why a tunnel is not promoted: the kind, and what exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The kind (a metric label).
    pub reason: Reason,
    /// The details, for the debug log.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason.as_str())
    }
}

impl Refusal {
    /// A refusal of kind `reason`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The bytes the timestamp option takes in every segment
/// (`TCPOLEN_TSTAMP_ALIGNED`).
const TIMESTAMP_OPTION: u32 = 12;

fn refuse<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(reason, detail))
}

/// The devices the two connections use, when the tunnel qualifies:
/// `(client's, upstream's)`.
#[cfg(test)]
pub fn qualify(
    client: &Connection,
    upstream: &Connection,
    loopback: u32,
) -> Result<(u32, u32), Refusal> {
    sockets(client, upstream)?;
    path(client, upstream, loopback, false)
}

/// What the sockets say (`TCP_INFO`, addresses): checked before the hold.
pub fn sockets(client: &Connection, upstream: &Connection) -> Result<(), Refusal> {
    for conn in [client, upstream] {
        if u32::from(conn.info.state) != tcp_state::ESTABLISHED {
            return refuse(
                Reason::NotEstablished,
                format!(
                    "the {} connection is not established (TCP state {})",
                    conn.name, conn.info.state
                ),
            );
        }
        if conn.info.mptcp {
            return refuse(
                Reason::Mptcp,
                format!("Multipath TCP on the {} socket", conn.name),
            );
        }
        let options = conn.info.options;
        if options & tcpi_opt::TIMESTAMPS == 0 {
            return refuse(
                Reason::NoTimestamps,
                format!("no TCP timestamps on the {} connection", conn.name),
            );
        }
        if options & tcpi_opt::USEC_TS != 0 {
            return refuse(
                Reason::UsecTimestamps,
                format!("microsecond TCP timestamps on the {} connection", conn.name),
            );
        }
        if options & tcpi_opt::SACK == 0 {
            return refuse(
                Reason::NoSack,
                format!("no SACK on the {} connection", conn.name),
            );
        }
        if options & (tcpi_opt::SYN_DATA | tcpi_opt::TFO_CHILD) != 0 {
            return refuse(
                Reason::FastOpen,
                format!("TCP Fast Open on the {} connection", conn.name),
            );
        }
        if conn.info.snd_wscale > 14 || conn.info.rcv_wscale > 14 {
            return refuse(
                Reason::WindowScale,
                format!("window scale above 14 on the {} connection", conn.name),
            );
        }
    }
    if (client.info.options & tcpi_opt::ECN) != (upstream.info.options & tcpi_opt::ECN) {
        return refuse(
            Reason::EcnOnOneSide,
            "ECN negotiated on one connection only",
        );
    }
    if is_ipv4(&client.peer) != is_ipv4(&upstream.peer)
        || is_ipv4(&client.local) != is_ipv4(&client.peer)
        || is_ipv4(&upstream.local) != is_ipv4(&upstream.peer)
    {
        return refuse(
            Reason::AddressFamily,
            "the two connections use different IP versions",
        );
    }
    // The largest segment a sender may send must fit the other connection:
    // the MSS its receiver announced, and its path MTU. `advmss` is the
    // payload: the MSS the proxy announced to the sender less the timestamp
    // option every segment carries (both connections have timestamps, checked
    // above), so the option is taken off what the other connection carries
    // too. (Compared as they were, a 1448-byte payload "fit" an MSS of up to
    // 1460 and a 1490-byte MTU: its 1500-byte packets were dropped.)
    let headers = if is_ipv4(&client.peer) { 40 } else { 60 };
    for (from, to) in [(client, upstream), (upstream, client)] {
        let fits = to
            .info
            .peer_mss
            .min(to.info.pmtu.saturating_sub(headers))
            .saturating_sub(TIMESTAMP_OPTION);
        if from.info.advmss > fits {
            return refuse(
                Reason::Mss,
                format!(
                    "the {} may send {}-byte segments, the {} connection carries {fits}",
                    from.name, from.info.advmss, to.name
                ),
            );
        }
    }
    Ok(())
}

/// What the tc program saw (sightings): checked once the window probes have
/// had their answers. `every_interface_attached`: every interface that is up
/// has the programs ([`super::kernel::Kernel::every_interface_attached`]).
pub fn path(
    client: &Connection,
    upstream: &Connection,
    loopback: u32,
    every_interface_attached: bool,
) -> Result<(u32, u32), Refusal> {
    let mut devices = [0; 2];
    for (device, conn) in devices.iter_mut().zip([client, upstream]) {
        let flags = conn.entry.flags;
        if flags & packet_flags::SEEN_INGRESS == 0 {
            // With NAT on this host the peer's segments arrive, on an
            // attached interface, for the translated addresses (tc ingress
            // runs before conntrack turns them back), and the proxy's leave
            // with them: no sighting either way, as on an interface without
            // the programs. Only when there is no such interface is it NAT.
            if every_interface_attached {
                return refuse(
                    Reason::Nat,
                    format!(
                        "no segment of the {} connection carried its socket's addresses on any interface, all of them attached (NAT on this host)",
                        conn.name
                    ),
                );
            }
            return refuse(
                Reason::NotAttached,
                format!(
                    "no segment of the {} connection arrived on an attached interface",
                    conn.name
                ),
            );
        }
        if flags & packet_flags::SEEN_EGRESS == 0 {
            return refuse(Reason::Nat, format!(
                "no segment of the proxy's {} socket left by an attached interface with its own addresses (NAT on this host, or not attached there)",
                conn.name
            ));
        }
        if flags & packet_flags::TS_SEEN == 0 || flags & packet_flags::NO_TS_SEEN != 0 {
            return refuse(
                Reason::NoTimestamps,
                format!(
                    "a segment of the {} connection without timestamps",
                    conn.name
                ),
            );
        }
        if conn.entry.in_ifindex != conn.entry.out_seen_ifindex {
            return refuse(
                Reason::MixedPaths,
                format!(
                    "the {} connection arrives on interface {} and leaves by {}",
                    conn.name, conn.entry.in_ifindex, conn.entry.out_seen_ifindex
                ),
            );
        }
        *device = conn.entry.in_ifindex;
    }
    if (devices[0] == loopback) != (devices[1] == loopback) {
        return refuse(
            Reason::MixedPaths,
            "one connection is on lo and the other on a network device",
        );
    }
    Ok((devices[0], devices[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(name: &'static str, local: &str, peer: &str, ifindex: u32) -> Connection {
        Connection {
            name,
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            info: ConnInfo {
                state: tcp_state::ESTABLISHED as u8,
                options: tcpi_opt::TIMESTAMPS | tcpi_opt::SACK | tcpi_opt::WSCALE,
                snd_wscale: 7,
                rcv_wscale: 7,
                // A 1500-byte MTU: an MSS of 1460, 1448 bytes beside the
                // timestamp option.
                advmss: 1448,
                pmtu: 1500,
                peer_mss: 1460,
                mptcp: false,
                rtt_us: 50,
            },
            entry: PacketEntry {
                flags: packet_flags::SEEN_INGRESS
                    | packet_flags::SEEN_EGRESS
                    | packet_flags::TS_SEEN,
                in_ifindex: ifindex,
                out_seen_ifindex: ifindex,
                ..PacketEntry::default()
            },
        }
    }

    fn pair() -> (Connection, Connection) {
        (
            connection("client", "10.77.1.1:3128", "10.77.1.2:40000", 5),
            connection("upstream", "10.77.2.1:41000", "10.77.2.2:8443", 6),
        )
    }

    fn reason(client: &Connection, upstream: &Connection) -> String {
        qualify(client, upstream, 1).unwrap_err().detail
    }

    fn kind(client: &Connection, upstream: &Connection) -> Reason {
        qualify(client, upstream, 1).unwrap_err().reason
    }

    #[test]
    fn a_plain_pair_qualifies_with_its_devices() {
        let (client, upstream) = pair();
        assert_eq!(qualify(&client, &upstream, 1), Ok((5, 6)));
    }

    #[test]
    fn each_missing_feature_is_named() {
        let (mut client, mut upstream) = pair();
        client.info.options &= !tcpi_opt::TIMESTAMPS;
        assert_eq!(
            reason(&client, &upstream),
            "no TCP timestamps on the client connection"
        );
        let (client, _) = pair();
        upstream.info.options &= !tcpi_opt::SACK;
        assert_eq!(
            reason(&client, &upstream),
            "no SACK on the upstream connection"
        );
        let (mut client, upstream) = pair();
        client.info.options |= tcpi_opt::ECN;
        assert_eq!(
            reason(&client, &upstream),
            "ECN negotiated on one connection only"
        );
        let (mut client, mut upstream) = pair();
        client.info.options |= tcpi_opt::ECN;
        upstream.info.options |= tcpi_opt::ECN;
        assert!(qualify(&client, &upstream, 1).is_ok());
        let (mut client, upstream) = pair();
        client.info.options |= tcpi_opt::TFO_CHILD;
        assert_eq!(
            reason(&client, &upstream),
            "TCP Fast Open on the client connection"
        );
        let (mut client, upstream) = pair();
        client.info.state = tcp_state::CLOSE_WAIT as u8;
        assert!(reason(&client, &upstream).contains("not established"));
        assert_eq!(kind(&client, &upstream), Reason::NotEstablished);
        let (client, mut upstream) = pair();
        upstream.info.mptcp = true;
        assert_eq!(kind(&client, &upstream), Reason::Mptcp);
        let (mut client, upstream) = pair();
        client.entry.flags &= !packet_flags::SEEN_EGRESS;
        assert_eq!(kind(&client, &upstream), Reason::Nat);
        let (client, mut upstream) = pair();
        upstream.entry.flags &= !packet_flags::SEEN_INGRESS;
        assert_eq!(kind(&client, &upstream), Reason::NotAttached);
        // No sighting at all where every interface has the programs: the
        // segments did not carry the socket's addresses.
        upstream.entry.flags &= !packet_flags::SEEN_EGRESS;
        let refusal = path(&client, &upstream, 1, true).unwrap_err();
        assert_eq!(refusal.reason, Reason::Nat);
        assert!(refusal.detail.contains("NAT on this host"), "{refusal}");
        let (mut client, upstream) = pair();
        client.entry.in_ifindex = 1;
        client.entry.out_seen_ifindex = 1;
        assert_eq!(kind(&client, &upstream), Reason::MixedPaths);
    }

    #[test]
    fn segments_must_fit_the_other_connection() {
        let (mut client, upstream) = pair();
        client.info.advmss = 65_483;
        assert_eq!(
            reason(&client, &upstream),
            "the client may send 65483-byte segments, the upstream connection carries 1448"
        );
        let (client, mut upstream) = pair();
        upstream.info.pmtu = 1400;
        assert_eq!(
            reason(&client, &upstream),
            "the client may send 1448-byte segments, the upstream connection carries 1348"
        );
        // 1448 bytes and a timestamp option make a 1500-byte packet.
        let (client, mut upstream) = pair();
        upstream.info.pmtu = 1490;
        assert_eq!(
            reason(&client, &upstream),
            "the client may send 1448-byte segments, the upstream connection carries 1438"
        );
        let (client, mut upstream) = pair();
        upstream.info.peer_mss = 1459;
        assert_eq!(kind(&client, &upstream), Reason::Mss);
        let (mut client, upstream) = pair();
        client.info.peer_mss = 536;
        assert_eq!(
            reason(&client, &upstream),
            "the upstream may send 1448-byte segments, the client connection carries 524"
        );
        // Loopback (MTU 65536): the same on both sides fits.
        let (mut client, mut upstream) = pair();
        for conn in [&mut client, &mut upstream] {
            conn.info.advmss = 65_483;
            conn.info.peer_mss = 65_495;
            conn.info.pmtu = 65_536;
        }
        assert!(qualify(&client, &upstream, 1).is_ok());
    }

    #[test]
    fn mixed_ip_versions_are_refused_but_v4_mapped_clients_are_ipv4() {
        let (mut client, upstream) = pair();
        client.local = "[::ffff:10.77.1.1]:3128".parse().unwrap();
        client.peer = "[::ffff:10.77.1.2]:40000".parse().unwrap();
        assert!(qualify(&client, &upstream, 1).is_ok());
        client.peer = "[fd00::2]:40000".parse().unwrap();
        client.local = "[fd00::1]:3128".parse().unwrap();
        assert_eq!(
            reason(&client, &upstream),
            "the two connections use different IP versions"
        );
    }

    #[test]
    fn sightings_prove_the_path() {
        let (mut client, upstream) = pair();
        client.entry.flags &= !packet_flags::SEEN_EGRESS;
        assert!(reason(&client, &upstream).contains("NAT on this host"));
        let (mut client, upstream) = pair();
        client.entry.flags &= !packet_flags::SEEN_INGRESS;
        assert!(reason(&client, &upstream).contains("attached interface"));
        let (mut client, upstream) = pair();
        client.entry.out_seen_ifindex = 9;
        assert_eq!(
            reason(&client, &upstream),
            "the client connection arrives on interface 5 and leaves by 9"
        );
        let (mut client, upstream) = pair();
        client.entry.in_ifindex = 1;
        client.entry.out_seen_ifindex = 1;
        assert_eq!(
            reason(&client, &upstream),
            "one connection is on lo and the other on a network device"
        );
        let (mut client, upstream) = pair();
        client.entry.flags |= packet_flags::NO_TS_SEEN;
        assert!(reason(&client, &upstream).contains("without timestamps"));
    }
}
