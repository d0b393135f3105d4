//! Addresses: the `ws://` or `wss://` URL of the server and the source addresses connections are bound to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use crate::error::Error;

/// A parsed `ws://host:port/path` or `wss://host:port/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// True for `wss://` (TLS).
    pub tls: bool,
    /// The resolved server address (first of the resolver's answers).
    pub addr: SocketAddr,
    /// The `Host` header value (`host:port` as written).
    pub host: String,
    /// The host alone: no port, no brackets around an IPv6 address (the TLS server name).
    pub hostname: String,
    /// Path and query when the URL has one beyond `/`; `None` lets the scenario choose.
    pub path: Option<String>,
}

/// Parses and resolves a `ws://` or `wss://` URL (default ports 80 and 443); `http://` and `https://` are
/// taken as `ws://` and `wss://`.
pub fn parse_ws_url(url: &str) -> Result<WsUrl, Error> {
    // http:// and https:// name the same server (api-publish speaks plain HTTP to it).
    let plain = url.strip_prefix("ws://").or_else(|| url.strip_prefix("http://"));
    let tls = url.strip_prefix("wss://").or_else(|| url.strip_prefix("https://"));
    let (tls, rest) = match (plain, tls) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => {
            return Err(Error::Config(format!(
                "--url must start with ws://, wss://, http:// or https:// (got {url:?})"
            )))
        }
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(Error::Config(format!("no host in {url:?}")));
    }
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']');
    let with_port =
        if has_port { authority.to_string() } else { format!("{authority}:{}", if tls { 443 } else { 80 }) };
    let hostname = if has_port { authority.rsplit_once(':').map_or(authority, |(h, _)| h) } else { authority };
    let hostname = hostname.trim_start_matches('[').trim_end_matches(']').to_string();
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("cannot resolve {authority:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("{authority:?} resolved to nothing")))?;
    let path = match path {
        "" | "/" => None,
        p if p.starts_with('?') => Some(format!("/{p}")),
        p => Some(p.to_string()),
    };
    Ok(WsUrl { tls, addr, host: authority.to_string(), hostname, path })
}

/// Parses source addresses: `127.0.0.1-127.0.0.50` (inclusive range), `127.0.0.0/24` (the hosts of a
/// prefix), or a comma-separated list of addresses and ranges.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, Error> {
    let bad = |what: &str| Error::Config(format!("bad --source-ips {what:?}: expected A-B, A/N or A,B,..."));
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad(part))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad(part))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a >= 1 << 24 {
                return Err(bad(part));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else if let Some((a, n)) = part.split_once('/') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad(part))?;
            let n: u32 = n.trim().parse().map_err(|_| bad(part))?;
            if !(8..=32).contains(&n) {
                return Err(bad(part));
            }
            let size = 1u64 << (32 - n);
            let base = u64::from(u32::from(a)) & !(size - 1);
            // Skip the network and broadcast addresses of prefixes that have them.
            let (lo, hi) = if size > 2 { (base + 1, base + size - 2) } else { (base, base + size - 1) };
            out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v as u32))));
        } else {
            out.push(part.parse().map_err(|_| bad(part))?);
        }
    }
    if out.is_empty() {
        return Err(bad(s));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_ws_url("ws://127.0.0.1:9001").unwrap();
        assert_eq!(u.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(u.host, "127.0.0.1:9001");
        assert_eq!(u.path, None);
        let u = parse_ws_url("ws://127.0.0.1:9001/ws?x=1").unwrap();
        assert_eq!(u.path.as_deref(), Some("/ws?x=1"));
        let u = parse_ws_url("ws://[::1]:9001/").unwrap();
        assert_eq!(u.addr, "[::1]:9001".parse().unwrap());
        assert_eq!(u.path, None);
        assert_eq!(parse_ws_url("ws://127.0.0.1/echo").unwrap().addr.port(), 80);
        let u = parse_ws_url("wss://127.0.0.1:9443/ws").unwrap();
        assert_eq!((u.tls, u.addr.port(), u.hostname.as_str()), (true, 9443, "127.0.0.1"));
        assert_eq!(parse_ws_url("wss://127.0.0.1").unwrap().addr.port(), 443);
        assert_eq!(parse_ws_url("wss://[::1]:9443").unwrap().hostname, "::1");
        assert_eq!(parse_ws_url("wss://localhost:1").unwrap().hostname, "localhost");
        assert!(!parse_ws_url("ws://127.0.0.1:1").unwrap().tls);
        // http:// and https:// are aliases (api-publish speaks plain HTTP).
        assert!(!parse_ws_url("http://127.0.0.1:1").unwrap().tls);
        assert_eq!(parse_ws_url("https://127.0.0.1").unwrap().addr.port(), 443);
        assert!(parse_ws_url("ftp://127.0.0.1:1").is_err());
    }

    #[test]
    fn source_ips() {
        assert_eq!(parse_source_ips("127.0.0.1-127.0.0.3").unwrap().len(), 3);
        let v = parse_source_ips("127.0.0.0/30").unwrap();
        assert_eq!(v, vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])]);
        assert_eq!(parse_source_ips("127.0.0.5,127.0.1.1-127.0.1.2").unwrap().len(), 3);
        assert!(parse_source_ips("127.0.0.3-127.0.0.1").is_err());
        assert!(parse_source_ips("").is_err());
    }
}
