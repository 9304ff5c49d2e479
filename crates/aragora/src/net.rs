//! Client addresses and networks. An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`)
//! is its IPv4 address: a dual-stack listener reports IPv4 peers that way and
//! proxies write either form, and one client must not count as two. An IPv6
//! client is identified by its /N network (ARAGORA_IPV6_PREFIX_LEN, default
//! 64): a subscriber is routinely given a whole /64 and can rotate through its
//! 2^64 addresses, so per-address limits and blocks would not hold it.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The default IPv6 prefix that identifies one client.
pub const DEFAULT_IPV6_PREFIX_LEN: u8 = 64;

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is unchanged.
pub fn normalize(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A network with host bits cleared; an IPv4-mapped IPv6 network
/// (`::ffff:10.0.0.0/104`) becomes the IPv4 network it covers (`10.0.0.0/8`).
pub fn normalize_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Some(v4) = n.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, n.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// Parses an address (`1.2.3.4`, `2001:db8::1`) as its single-address network
/// or a CIDR network (`10.0.0.0/24`, `2001:db8::/48`), normalized.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().ok()?
    } else {
        IpNet::from(normalize(text.parse::<IpAddr>().ok()?))
    };
    Some(normalize_net(net))
}

/// How client addresses are grouped for rate limits and blocks: IPv4 per
/// address, IPv6 per /`ipv6_prefix_len` network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNets {
    pub ipv6_prefix_len: u8,
}

impl Default for ClientNets {
    fn default() -> Self {
        Self {
            ipv6_prefix_len: DEFAULT_IPV6_PREFIX_LEN,
        }
    }
}

impl ClientNets {
    /// The network that identifies the client at `ip`.
    pub fn of(&self, ip: IpAddr) -> IpNet {
        match normalize(ip) {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::from(a)),
            IpAddr::V6(a) => Ipv6Net::new(a, self.ipv6_prefix_len.min(128))
                .map(|n| IpNet::V6(n.trunc()))
                .unwrap_or(IpNet::V6(Ipv6Net::from(a))),
        }
    }

    /// What an operator's block of `text` (an address or a CIDR network)
    /// covers: an address stands for its client network, and an IPv6 network
    /// narrower than the client prefix is widened to it (a narrower block would
    /// be escaped by moving to a neighbouring address of the same subscriber).
    pub fn block_target(&self, text: &str) -> Result<IpNet, String> {
        let net = parse_net(text).ok_or_else(|| {
            format!(
                "ip: {text:?} is not an IPv4 or IPv6 address or a CIDR network (like 10.0.0.0/24 or 2001:db8::/48)"
            )
        })?;
        Ok(match net {
            IpNet::V6(n) if n.prefix_len() > self.ipv6_prefix_len => self.of(IpAddr::V6(n.addr())),
            other => other,
        })
    }
}

/// The text form of a network, used as the block's `ip` and its store key: a
/// single address is written without a prefix (`1.2.3.4`, as blocks were
/// always keyed), anything wider in CIDR form (`10.0.0.0/24`).
pub fn net_key(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        assert_eq!(normalize(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("::FFFF:c000:0201")), ip("192.0.2.1"));
        assert_eq!(normalize(ip("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("2001:db8::1")), ip("2001:db8::1"));
        // Only the mapped form: ::1 stays the IPv6 loopback.
        assert_eq!(normalize(ip("::1")), ip("::1"));
        let nets = ClientNets::default();
        assert_eq!(nets.of(ip("::ffff:1.2.3.4")), nets.of(ip("1.2.3.4")));
        assert_eq!(parse_net("::ffff:1.2.3.4"), Some(net("1.2.3.4/32")));
        assert_eq!(parse_net("::ffff:10.0.0.0/104"), Some(net("10.0.0.0/8")));
        assert_eq!(
            nets.block_target("::ffff:1.2.3.4").map(|n| net_key(&n)),
            Ok("1.2.3.4".to_string())
        );
    }

    #[test]
    fn ipv6_clients_are_their_network() {
        let nets = ClientNets::default();
        assert_eq!(
            nets.of(ip("2001:db8:1:2:aaaa::1")),
            nets.of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            nets.of(ip("2001:db8:1:2::1")),
            nets.of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(nets.of(ip("10.0.0.1")), net("10.0.0.1/32"));
        let exact = ClientNets {
            ipv6_prefix_len: 128,
        };
        assert_ne!(exact.of(ip("2001:db8::1")), exact.of(ip("2001:db8::2")));
    }

    #[test]
    fn block_targets_and_their_keys() {
        let nets = ClientNets::default();
        let key = |s: &str| nets.block_target(s).map(|n| net_key(&n));
        assert_eq!(key("1.2.3.4"), Ok("1.2.3.4".into()));
        assert_eq!(key(" 10.0.0.0/24 "), Ok("10.0.0.0/24".into()));
        // Host bits are cleared, so the same network has one key.
        assert_eq!(key("10.0.0.77/24"), Ok("10.0.0.0/24".into()));
        assert_eq!(key("2001:db8::/48"), Ok("2001:db8::/48".into()));
        assert_eq!(key("2001:db8::1"), Ok("2001:db8::/64".into()));
        assert_eq!(key("2001:db8::1/128"), Ok("2001:db8::/64".into()));
        for bad in [
            "",
            "999.1.1.1",
            "1.2.3.4:80",
            "10.0.0.0/33",
            "host/24",
            "1.2.3.4/",
        ] {
            let e = key(bad).expect_err(bad);
            assert!(e.contains("IPv4"), "{e}");
        }
    }
}
