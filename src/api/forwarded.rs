//! The client's real address behind reverse proxies (`trusted_proxies`).
//!
//! A request's TCP peer is the client unless the peer is a trusted proxy. Only then are
//! `X-Forwarded-For` (or, when the request has none, `Forwarded`) read, from the right: each
//! proxy appends the address it got the request from, so the right-most address that is not
//! itself a trusted proxy is the first one no trusted party vouches beyond, the client.
//! Everything left of it was written by the client and is ignored. A client that talks to us
//! directly cannot move its address at all.
//!
//! `X-Forwarded-For` wins when both headers are there because it is what common proxies
//! (nginx, Caddy, Traefik, HAProxy, Apache) append to; a proxy that writes only `Forwarded`
//! must drop an incoming `X-Forwarded-For` (docs/deploy.md).

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Most addresses of a forwarding chain looked at (from the right): a chain longer than any
/// real proxy setup is someone's invention.
const MAX_HOPS: usize = 32;

/// A `trusted_proxies` entry: an address (a /32 or /128) or a CIDR range.
pub fn parse_range(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The parsed `trusted_proxies`.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From the config (entries are checked when the config is loaded; a bad one is skipped).
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies(entries.iter().filter_map(|e| parse_range(e)).collect())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address of a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let chain = if headers.contains_key("x-forwarded-for") {
            x_forwarded_for(headers)
        } else {
            forwarded(headers)
        };
        // From the right: skip the trusted proxies; the first other address is the client. An
        // entry that is not an address (`unknown`, an obfuscated name) ends the walk at the
        // proxy that wrote it, which is as far as anybody trusted vouches.
        let mut client = peer;
        for entry in chain.iter().rev().take(MAX_HOPS) {
            let Some(ip) = entry.map(|ip| ip.to_canonical()) else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// The addresses of every `X-Forwarded-For` line, in order (None for an entry that is not one).
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| {
            // A line that is not text is one entry nobody can read.
            let text = v.to_str().unwrap_or("\u{0}");
            text.split(',').map(parse_node).collect::<Vec<_>>()
        })
        .collect()
}

/// The `for=` addresses of every `Forwarded` line (RFC 7239), in order.
fn forwarded(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .flat_map(|v| {
            let text = v.to_str().unwrap_or("\u{0}");
            text.split(',')
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, v)| parse_node(v))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One node of a chain: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`,
/// optionally in double quotes.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"').trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, _) = rest.split_once(']')?;
        return inner.parse().ok();
    }
    // IPv4 with a port (an IPv6 address without brackets never has one).
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_cannot_move_their_address() {
        let none = TrustedProxies::new(&[]);
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(none.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        let some = TrustedProxies::new(&["10.0.0.0/8".into()]);
        assert_eq!(some.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
    }

    #[test]
    fn rightmost_untrusted_address_is_the_client() {
        let t = TrustedProxies::new(&["10.0.0.0/8".into(), "::1".into()]);
        // The client forged the first entry; the proxies appended the rest.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(t.client_ip(ip("::1"), &h), ip("203.0.113.9"));
        // Only proxies: the left-most of them.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.2")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the proxy that wrote it.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, unknown")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // IPv4-mapped peers are matched as IPv4.
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(t.client_ip(ip("::ffff:10.0.0.1"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn forwarded_header_is_read_without_x_forwarded_for() {
        let t = TrustedProxies::new(&["127.0.0.1".into()]);
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(t.client_ip(ip("127.0.0.1"), &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=\"192.0.2.60:8080\"")]);
        assert_eq!(t.client_ip(ip("127.0.0.1"), &h), ip("192.0.2.60"));
        // X-Forwarded-For wins: a client cannot add a Forwarded header the proxy passes on.
        let h = headers(&[
            ("forwarded", "for=1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(t.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn ranges_parse() {
        assert!(parse_range("10.0.0.0/8").is_some());
        assert!(parse_range("192.0.2.1").is_some());
        assert!(parse_range("::1").is_some());
        assert!(parse_range("fd00::/8").is_some());
        assert!(parse_range("proxy.local").is_none());
        assert!(parse_range("10.0.0.0/33").is_none());
    }
}
