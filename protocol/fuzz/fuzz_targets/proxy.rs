//! Fuzz the PROXY protocol parser: arbitrary bytes through `proxy::parse`. Nothing may panic; a complete
//! header's `len` lies within the input and the header alone parses the same; every prefix (all of them up
//! to 128 bytes, and a split point picked from the input) gives `Ok(None)` or the whole input's result; a
//! smaller v2 bound only turns results into `TooLong`; re-encoding a proxied header as v1 and as v2 parses
//! back to the same addresses.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use throng_protocol::proxy::{
    parse, parse_with_limit, Parsed, ProxyError, ProxyHeader, DEFAULT_MAX_V2_LEN, V1_MAX_LEN, V2_HEADER_LEN,
    V2_SIGNATURE,
};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Some(p)) = whole {
        assert!(p.len <= data.len());
        assert_eq!(parse(&data[..p.len]), whole);
        if data.starts_with(b"PROXY ") {
            assert!(p.len <= V1_MAX_LEN && data[..p.len].ends_with(b"\r\n"));
        } else {
            assert!(data.starts_with(&V2_SIGNATURE) && p.len >= V2_HEADER_LEN && p.len <= DEFAULT_MAX_V2_LEN);
            assert_eq!(p.len, V2_HEADER_LEN + usize::from(u16::from_be_bytes([data[14], data[15]])));
        }
        if let ProxyHeader::Proxied { source, destination } = p.header {
            assert_eq!(source.is_ipv4(), destination.is_ipv4());
            for encoded in [encode_v1(source, destination), encode_v2(source, destination)] {
                let again = parse(&encoded);
                assert_eq!(again, Ok(Some(Parsed { header: p.header, len: encoded.len() })));
            }
        }
    }

    // Prefixes: every one up to 128 bytes (a v1 line and a v2 fixed header decide within them), the byte
    // before the end of a complete header, and one split point taken from the input.
    let seed = data.iter().fold(0usize, |h, &b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
    let split = if data.is_empty() { 0 } else { seed % (data.len() + 1) };
    let before_end = match whole {
        Ok(Some(p)) => p.len.saturating_sub(1),
        _ => 0,
    };
    for k in (0..=data.len().min(128)).chain([split, before_end]) {
        let r = parse(&data[..k]);
        assert!(r == Ok(None) || r == whole, "prefix {k}: {r:?}, whole: {whole:?}");
    }

    // A smaller v2 bound gives the same result or TooLong at that bound.
    let limit = seed % (DEFAULT_MAX_V2_LEN + 1);
    let bounded = parse_with_limit(data, limit);
    match whole {
        Ok(Some(p)) if p.len <= limit => assert_eq!(bounded, whole),
        _ => assert!(bounded == whole || bounded == Err(ProxyError::TooLong { limit })),
    }
});

fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
        .into_bytes()
}

fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("mixed families"),
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}
