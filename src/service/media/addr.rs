//! Which IP addresses outgoing requests for users and other servers may connect to (URL
//! previews, push gateways, federation): public unicast addresses only, unless an operator
//! allowed a range. Everything else (loopback, private, link-local, unique-local,
//! CGNAT, multicast, documentation, benchmarking, reserved, and IPv6 forms that embed such an
//! IPv4 address) is refused, so a preview cannot be used to probe the server's own network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::{net::SocketAddr, sync::Arc};

use ipnet::IpNet;

/// Ranges from the config (invalid entries were refused when the config was loaded).
pub fn parse_ranges(ranges: &[String]) -> Vec<IpNet> {
    ranges.iter().filter_map(|r| r.parse().ok()).collect()
}

/// A DNS resolver for `reqwest` that keeps only addresses [`may_connect`] accepts, so a name
/// cannot lead a request into the server's own network (checked at every resolution).
pub struct GuardedResolver {
    allow: Arc<Vec<IpNet>>,
}

impl GuardedResolver {
    pub fn new(allow: Arc<Vec<IpNet>>) -> GuardedResolver {
        GuardedResolver { allow }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| may_connect(a.ip(), &allow))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address that may be reached").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// May a URL be requested? Host names are checked when they resolve (see [`GuardedResolver`]);
/// IP literals here.
pub fn url_allowed(url: &str, allow: &[IpNet]) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => may_connect(IpAddr::V4(ip), allow),
        Some(url::Host::Ipv6(ip)) => may_connect(IpAddr::V6(ip), allow),
        Some(url::Host::Domain(_)) => true,
        None => false,
    }
}

/// Whether `ip` is a public address a preview may reach, or inside one of `allow`.
pub fn may_connect(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = canonical(ip);
    allow.iter().any(|net| net.contains(&ip)) || is_public(ip)
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    const NOT_PUBLIC: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),       // "this network", unspecified
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // shared address space (CGNAT)
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local (and cloud metadata services)
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // documentation
        ([192, 88, 99, 0], 24),  // 6to4 relay anycast
        ([192, 168, 0, 0], 16),  // private
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // documentation
        ([203, 0, 113, 0], 24),  // documentation
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, and broadcast
    ];
    !NOT_PUBLIC
        .iter()
        .any(|&(net, prefix)| in_v4(ip, net, prefix))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    // IPv4-compatible (deprecated ::a.b.c.d) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48) carry an
    // IPv4 address that decides.
    let embedded = Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    );
    if seg[0..6] == [0, 0, 0, 0, 0, 0] {
        return is_public_v4(embedded);
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && (seg[2..6] == [0, 0, 0, 0] || seg[2] == 1) {
        return is_public_v4(embedded);
    }
    // 6to4 (2002::/16) carries the IPv4 address in bits 16-48.
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        return is_public_v4(v4);
    }
    let not_public = (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (seg[0] & 0xff00) == 0xff00 // multicast
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]) // discard-only 100::/64
        || (seg[0] == 0x2001 && seg[1] < 0x0200) // IETF protocol assignments 2001::/23 (Teredo, ...)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x3fff && seg[1] < 0x1000) // documentation 3fff::/20
        || (seg[0] == 0x5f00); // segment routing 5f00::/16
    !not_public
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(ok(a), "{a} should be public");
        }
    }

    #[test]
    fn internal_addresses_are_refused() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "2001::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "3fff::1",
        ] {
            assert!(!ok(a), "{a} should be refused");
        }
    }

    #[test]
    fn the_allowlist_opens_ranges() {
        let allow: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(may_connect("127.0.0.1".parse().unwrap(), &allow));
        assert!(may_connect("::ffff:127.0.0.1".parse().unwrap(), &allow));
        assert!(!may_connect("127.0.0.2".parse().unwrap(), &allow));
        assert!(!may_connect("::1".parse().unwrap(), &allow));
        assert!(may_connect("fd00::5".parse().unwrap(), &allow));
        assert!(may_connect("8.8.8.8".parse().unwrap(), &allow));
        assert!(!may_connect("10.0.0.1".parse().unwrap(), &[]));
    }
}
