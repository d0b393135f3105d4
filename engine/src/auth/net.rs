//! Client addresses and origins: who is on the other end of a connection, as far as can be trusted.
//!
//! - The TCP peer is the client unless it is one of `trusted_proxies`; then the client is the right-most
//!   address of `X-Forwarded-For` that is not itself a trusted proxy (every proxy appends the address it
//!   got the request from, so the addresses right of the first untrusted one were written by our proxies,
//!   and everything left of it by whoever sent the request: never believed), or `X-Real-IP` when there is
//!   no `X-Forwarded-For`. With `--proxy-protocol` the address comes from the PROXY header instead.
//! - Limits count IPv6 clients per /64 (one subscriber's network), IPv4 per address.
//! - Origins: exact (`https://app.example.com`) or one leading wildcard label (`https://*.example.com`,
//!   which matches `https://a.example.com` and `https://a.b.example.com`, not `https://example.com`).

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// A network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `::1/128`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("bad prefix length {p:?}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; other addresses as they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the limits count a client under: its IPv4 address, or its IPv6 /64.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, proxies: &[Cidr]) -> bool {
    proxies.iter().any(|c| c.contains(ip))
}

/// The client's address, from the TCP peer and, when the peer is a trusted proxy, the forwarding headers
/// (`X-Forwarded-For` values in order of appearance, then `X-Real-IP`). An unparsable forwarded address ends
/// the walk: the peer's own address is used.
pub fn client_addr<'a>(
    peer: IpAddr,
    proxies: &[Cidr],
    forwarded_for: impl Iterator<Item = &'a str>,
    real_ip: Option<&str>,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted(peer, proxies) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).map(str::trim).filter(|h| !h.is_empty()).collect();
    if hops.is_empty() {
        return real_ip.and_then(|r| r.trim().parse().ok()).map_or(peer, canonical);
    }
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>().map(canonical) else { return peer };
        if !trusted(ip, proxies) {
            return ip;
        }
    }
    // Every hop is a trusted proxy: the left-most is as close to the client as we can tell.
    hops[0].parse().map_or(peer, canonical)
}

/// Checks an `allowed_origins` entry: `scheme://host[:port]`, the host optionally starting with `*.`.
pub fn check_origin_pattern(p: &str) -> Result<(), String> {
    let (scheme, host) = p.split_once("://").ok_or("an origin is scheme://host[:port]")?;
    if scheme.is_empty() || host.is_empty() || host.contains('/') {
        return Err("an origin is scheme://host[:port], without a path".into());
    }
    if host[host.find('*').map_or(0, |i| i + 1)..].contains('*') || (host.contains('*') && !host.starts_with("*.")) {
        return Err("a wildcard may only be the first label (https://*.example.com)".into());
    }
    Ok(())
}

/// Whether `origin` is allowed by `allowed` (empty: everything). Compared case-insensitively.
pub fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|p| {
            let (Some((ps, ph)), Some((os, oh))) = (p.split_once("://"), origin.split_once("://")) else {
                return false;
            };
            if !ps.eq_ignore_ascii_case(os) {
                return false;
            }
            match ph.strip_prefix("*.") {
                Some(suffix) => {
                    oh.len() > suffix.len() + 1
                        && oh[oh.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                        && oh.as_bytes()[oh.len() - suffix.len() - 1] == b'.'
                }
                None => ph.eq_ignore_ascii_case(oh),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")) && !c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped addresses are IPv4");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(ip("2001:db8:1::5")) && !c.contains(ip("2001:db9::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!("1.2.3.4".parse::<Cidr>().unwrap().contains(ip("1.2.3.4")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = |v: &'static str| std::iter::once(v);
        // An untrusted peer's headers are ignored.
        assert_eq!(client_addr(ip("203.0.113.9"), &proxies, xff("1.1.1.1"), Some("2.2.2.2")), ip("203.0.113.9"));
        // The right-most untrusted hop, never the client-written first one.
        assert_eq!(
            client_addr(ip("10.0.0.2"), &proxies, xff("6.6.6.6, 198.51.100.7, 10.0.0.1"), None),
            ip("198.51.100.7")
        );
        // Several headers are one list, in order.
        let two = ["6.6.6.6", "198.51.100.7, 10.0.0.5"];
        assert_eq!(client_addr(ip("10.0.0.2"), &proxies, two.into_iter(), None), ip("198.51.100.7"));
        // Garbage stops the walk at the peer.
        assert_eq!(client_addr(ip("10.0.0.2"), &proxies, xff("1.1.1.1, nonsense"), None), ip("10.0.0.2"));
        // X-Real-IP when there is no X-Forwarded-For.
        assert_eq!(client_addr(ip("10.0.0.2"), &proxies, std::iter::empty(), Some(" 192.0.2.4 ")), ip("192.0.2.4"));
        assert_eq!(client_addr(ip("10.0.0.2"), &proxies, std::iter::empty(), None), ip("10.0.0.2"));
    }

    #[test]
    fn limit_keys() {
        assert_eq!(limit_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_string(), "https://*.example.org".to_string()];
        assert!(origin_allowed("https://app.example.com", &allowed));
        assert!(origin_allowed("HTTPS://APP.EXAMPLE.COM", &allowed));
        assert!(!origin_allowed("http://app.example.com", &allowed), "scheme counts");
        assert!(!origin_allowed("https://app.example.com.evil.net", &allowed));
        assert!(
            origin_allowed("https://a.example.org", &allowed) && origin_allowed("https://a.b.example.org", &allowed)
        );
        assert!(!origin_allowed("https://example.org", &allowed), "the wildcard needs a label");
        assert!(!origin_allowed("https://badexample.org", &allowed), "a label, not a suffix");
        assert!(origin_allowed("anything", &[]));
        assert!(check_origin_pattern("https://*.example.com").is_ok());
        assert!(check_origin_pattern("https://a.*.com").is_err() && check_origin_pattern("example.com").is_err());
        assert!(check_origin_pattern("https://example.com/path").is_err());
    }
}
