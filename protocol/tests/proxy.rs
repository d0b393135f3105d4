//! PROXY protocol tests across the public API: the spec's v1 lines, v2 headers built byte by byte (and one
//! captured from HAProxy), incremental feeding, refusals, and property tests with a small encoder.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use throng_protocol::proxy::{
    parse, parse_with_limit, Parsed, ProxyError, ProxyHeader, DEFAULT_MAX_V2_LEN, V1_MAX_LEN, V2_SIGNATURE,
};

const REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: example.com\r\n\r\n";

fn proxied(source: &str, destination: &str) -> ProxyHeader {
    ProxyHeader::Proxied { source: source.parse().unwrap(), destination: destination.parse().unwrap() }
}

fn bad(what: &'static str) -> Result<Option<Parsed>, ProxyError> {
    Err(ProxyError::BadV1(what))
}

/// A v2 header: signature, version 2 with `command`, `fam`, the block's length, the block.
fn v2(command: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(fam);
    out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    out.extend_from_slice(block);
    out
}

/// The small encoder of the round trips: the v1 line for two addresses of the same family.
fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
        .into_bytes()
}

/// The small encoder of the round trips: a v2 PROXY header over TCP for two addresses of the same family,
/// with `tlvs` after the address block.
fn encode_v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    let fam = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    block.extend_from_slice(tlvs);
    v2(1, fam, &block)
}

/// Checks a complete header the incremental way: every proper prefix is `Ok(None)`, the header alone and
/// the header followed by an HTTP request both parse to `header` with `len` the header's size.
fn check_complete(bytes: &[u8], header: ProxyHeader) {
    for k in 0..bytes.len() {
        assert_eq!(parse(&bytes[..k]), Ok(None), "prefix of {k} bytes of {:?}", bytes.escape_ascii().to_string());
    }
    let expected = Ok(Some(Parsed { header, len: bytes.len() }));
    assert_eq!(parse(bytes), expected);
    let mut with_request = bytes.to_vec();
    with_request.extend_from_slice(REQUEST);
    assert_eq!(parse(&with_request), expected);
    assert_eq!(&with_request[bytes.len()..], REQUEST);
}

/// The spec's v1 examples (section 2.1): its example line, the worst cases for TCP4, TCP6 and UNKNOWN, and
/// the short UNKNOWN form.
#[test]
fn v1_spec_examples() {
    check_complete(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        proxied("192.168.0.1:56324", "192.168.0.11:443"),
    );
    let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    assert_eq!(tcp4.len(), 56);
    check_complete(tcp4, proxied("255.255.255.255:65535", "255.255.255.255:65535"));

    let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let tcp6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
    assert_eq!(tcp6.len(), 104);
    check_complete(tcp6.as_bytes(), proxied(&format!("[{f}]:65535"), &format!("[{f}]:65535")));

    let unknown = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
    assert_eq!(unknown.len(), V1_MAX_LEN);
    check_complete(unknown.as_bytes(), ProxyHeader::Local);
    check_complete(b"PROXY UNKNOWN\r\n", ProxyHeader::Local);
}

#[test]
fn v1_other_valid_lines() {
    check_complete(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n", proxied("0.0.0.0:0", "10.0.0.1:1"));
    check_complete(b"PROXY TCP6 ::1 2001:db8::2 1234 80\r\n", proxied("[::1]:1234", "[2001:db8::2]:80"));
    check_complete(b"PROXY TCP6 2001:DB8::A ::ffff:1.2.3.4 1 2\r\n", proxied("[2001:db8::a]:1", "[::ffff:1.2.3.4]:2"));
    // Anything between UNKNOWN's space and the first CRLF is ignored, a lone CR or LF included.
    check_complete(b"PROXY UNKNOWN whatever\r \n\x00\r\n", ProxyHeader::Local);
    check_complete(b"PROXY UNKNOWN \r\n", ProxyHeader::Local);
}

/// Two v2 headers, as HAProxy and the spec lay them out: LOCAL, and PROXY over TCP/IPv4 and TCP/IPv6.
#[test]
fn v2_local_ipv4_ipv6() {
    let local = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00];
    check_complete(&local, ProxyHeader::Local);

    #[rustfmt::skip]
    let ipv4 = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21, 0x11, 0x00, 0x0c, // v2 PROXY, AF_INET STREAM, 12 bytes
        192, 168, 0, 1, 192, 168, 0, 11, // source, destination
        0xdc, 0x04, 0x01, 0xbb, // 56324, 443
    ];
    check_complete(&ipv4, proxied("192.168.0.1:56324", "192.168.0.11:443"));

    #[rustfmt::skip]
    let ipv6 = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
        0x21, 0x21, 0x00, 0x24, // v2 PROXY, AF_INET6 STREAM, 36 bytes
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
        0xff, 0xff, 0x00, 0x50, // 65535, 80
    ];
    check_complete(&ipv6, proxied("[2001:db8::1]:65535", "[2001:db8::2]:80"));
}

/// A v2 header captured from HAProxy (`send-proxy-v2`) in front of curl, with the request that followed
/// (from the hex dump in seriousben/experiment-proxy-protocol's README).
#[test]
fn v2_haproxy_capture() {
    #[rustfmt::skip]
    let capture = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11, 0x00, 0x0c,
        0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50, 0x47, 0x45, 0x54, 0x20,
    ];
    assert_eq!(parse(&capture), Ok(Some(Parsed { header: proxied("172.19.0.1:42578", "172.19.0.3:80"), len: 28 })));
    assert_eq!(&capture[28..], b"GET ");
    check_complete(&capture[..28], proxied("172.19.0.1:42578", "172.19.0.3:80"));
}

/// TLVs after the address block are skipped and counted in `len`.
#[test]
fn v2_with_tlvs() {
    let mut block = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x00, 0x50]; // 10.0.0.1:12345 -> 10.0.0.2:80
    block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // PP2_TYPE_ALPN "h2"
    block.extend_from_slice(&[0x02, 0x00, 0x0b]); // PP2_TYPE_AUTHORITY "example.com"
    block.extend_from_slice(b"example.com");
    block.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP, 3 bytes
    let header = v2(1, 0x11, &block);
    assert_eq!(header.len(), 16 + 12 + 5 + 14 + 6);
    check_complete(&header, proxied("10.0.0.1:12345", "10.0.0.2:80"));

    // IPv6 with a PP2_TYPE_SSL TLV (client flags, verify, a PP2_SUBTYPE_SSL_VERSION sub-TLV).
    let mut block = Ipv6Addr::LOCALHOST.octets().to_vec();
    block.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    block.extend_from_slice(&[0x00, 0x01, 0x00, 0x02]);
    block.extend_from_slice(&[0x20, 0x00, 0x0f, 0x01, 0, 0, 0, 0, 0x21, 0x00, 0x07]);
    block.extend_from_slice(b"TLSv1.3");
    check_complete(&v2(1, 0x21, &block), proxied("[::1]:1", "[::]:2"));

    // A LOCAL header may carry a block too (addresses, TLVs): all of it is skipped.
    check_complete(&v2(0, 0x11, &[1; 40]), ProxyHeader::Local);
}

/// What the spec says to treat as "use the real connection's addresses".
#[test]
fn v2_local_cases() {
    // LOCAL ignores the family byte, whatever it is.
    check_complete(&v2(0, 0xff, &[]), ProxyHeader::Local);
    check_complete(&v2(0, 0x11, &[]), ProxyHeader::Local);
    // PROXY with AF_UNSPEC.
    check_complete(&v2(1, 0x00, &[]), ProxyHeader::Local);
    check_complete(&v2(1, 0x01, &[7; 3]), ProxyHeader::Local);
    // PROXY over UDP (DGRAM) or an unspecified protocol.
    check_complete(&v2(1, 0x12, &[1; 12]), ProxyHeader::Local);
    check_complete(&v2(1, 0x10, &[1; 12]), ProxyHeader::Local);
    check_complete(&v2(1, 0x22, &[1; 36]), ProxyHeader::Local);
    // AF_UNIX (two 108-byte paths).
    check_complete(&v2(1, 0x31, &[0; 216]), ProxyHeader::Local);
    check_complete(&v2(1, 0x32, &[0; 220]), ProxyHeader::Local);
}

/// Anything that is neither `PROXY ` nor the v2 signature is refused at the first byte that tells.
#[test]
fn not_proxy_refused_early() {
    for input in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"G",
        b"POST",
        b"PROXZ",
        b"PROXY\r\n",
        b"proxy tcp4",
        b"\x16\x03\x01\x02\x00\x01", // TLS ClientHello
        b"\r\n\r\n\0\r\nQUIT\r",
        b"\r\nGET",
        b"\n",
        b" PROXY TCP4",
        b"\0",
    ] {
        // The shortest prefix that differs from both headers decides.
        let decided = (1..=input.len()).find(|&k| parse(&input[..k]).is_err()).expect("refused");
        assert_eq!(parse(&input[..decided]), Err(ProxyError::NotProxy), "{input:?}");
        assert_eq!(parse(input), Err(ProxyError::NotProxy), "{input:?}");
        assert!(
            !b"PROXY ".starts_with(&input[..decided]) && !V2_SIGNATURE.starts_with(&input[..decided]),
            "{input:?} refused before it could be told"
        );
    }
    assert_eq!(parse(b""), Ok(None));
    assert_eq!(parse(b"PROX"), Ok(None));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUI"), Ok(None));
}

#[test]
fn v1_bad_lines() {
    let cases: &[(&[u8], &str)] = &[
        (b"PROXY  TCP4", "protocol is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 ", "protocol is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UDP4 ", "protocol is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP5", "protocol is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4\r\n", "expected a single space after the protocol"),
        (b"PROXY TCP4  1.2.3.4", "missing source address (or not a single space before it)"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8", "missing destination address (or not a single space before it)"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8", "expected a single space after the source address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "missing destination port (or not a single space before it)"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected CRLF after the destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "expected CRLF after the destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "expected CRLF after the destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "expected CRLF after the destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected a single space after the source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", "expected a single space after the destination address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n", "source port above 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "destination port above 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 1\r\n", "source port has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "destination port has a leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 123456", "source port too long"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "missing source port (or not a single space before it)"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address is not an IPv4 address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address is not an IPv4 address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address is not an IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "missing destination address (or not a single space before it)"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8.9 1 2\r\n", "destination address is not an IPv4 address"),
        (b"PROXY TCP4 1111.2222.3333.444", "source address too long"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "source address is not an IPv6 address"),
        (b"PROXY TCP6 ::1 ::g 1 2\r\n", "expected a single space after the destination address"),
        (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "destination address is not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "expected a single space after the source address"),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", "missing source address (or not a single space before it)"),
        (b"PROXY UNKNOWNX\r\n", "expected a space or CRLF after UNKNOWN"),
        (b"PROXY UNKNOWN\n", "expected a space or CRLF after UNKNOWN"),
        (b"PROXY UNKNOWN\rX", "expected CRLF after UNKNOWN"),
    ];
    for &(input, what) in cases {
        assert_eq!(parse(input), bad(what), "{:?}", input.escape_ascii().to_string());
        // The same error with any bytes after it, and no prefix gives another error.
        let mut longer = input.to_vec();
        longer.extend_from_slice(REQUEST);
        assert_eq!(parse(&longer), bad(what));
        for k in 0..input.len() {
            let r = parse(&input[..k]);
            assert!(r == Ok(None) || r == bad(what), "{:?}: {r:?}", input[..k].escape_ascii().to_string());
        }
    }
}

/// A v1 line is at most 107 bytes: 107 bytes without its CRLF are refused, whatever follows.
#[test]
fn v1_too_long() {
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 1, b'x');
    assert_eq!(parse(&line), Ok(None));
    line.push(b'\r');
    assert_eq!(parse(&line), Err(ProxyError::TooLong { limit: V1_MAX_LEN }));
    line.push(b'\n');
    assert_eq!(parse(&line), Err(ProxyError::TooLong { limit: V1_MAX_LEN }));
    // One byte shorter fits exactly.
    line.truncate(V1_MAX_LEN - 3);
    line.extend_from_slice(b"\r\n");
    assert_eq!(parse(&line), Ok(Some(Parsed { header: ProxyHeader::Local, len: V1_MAX_LEN - 1 })));

    // A TCP6 line with the longest textual addresses does not fit.
    let long = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255";
    let line = format!("PROXY TCP6 {long} {long} 65535 65535\r\n");
    assert!(line.len() > V1_MAX_LEN);
    assert_eq!(parse(line.as_bytes()), Err(ProxyError::TooLong { limit: V1_MAX_LEN }));
    let line = format!("PROXY TCP6 {long} ::1 65535 65535\r\n");
    assert_eq!(parse(line.as_bytes()).unwrap().unwrap().header, proxied(&format!("[{long}]:65535"), "[::1]:65535"));
}

#[test]
fn v2_bad_headers() {
    let sig = V2_SIGNATURE.to_vec();
    let with = |rest: &[u8]| [&sig[..], rest].concat();
    assert_eq!(parse(&with(&[0x11])), Err(ProxyError::BadV2Version(1)));
    assert_eq!(parse(&with(&[0x31, 0x11, 0, 12])), Err(ProxyError::BadV2Version(3)));
    assert_eq!(parse(&with(&[0x01])), Err(ProxyError::BadV2Version(0)));
    assert_eq!(parse(&with(&[0x22])), Err(ProxyError::BadV2Command(2)));
    assert_eq!(parse(&with(&[0x2f])), Err(ProxyError::BadV2Command(15)));
    assert_eq!(parse(&with(&[0x21, 0x41])), Err(ProxyError::BadV2Family(0x41)));
    assert_eq!(parse(&with(&[0x21, 0x13])), Err(ProxyError::BadV2Family(0x13)));
    assert_eq!(parse(&with(&[0x21, 0xff, 0, 0])), Err(ProxyError::BadV2Family(0xff)));
    // The address block is shorter than the family needs: refused from the length field alone.
    assert_eq!(parse(&with(&[0x21, 0x11, 0, 11])), Err(ProxyError::ShortAddress { needed: 12, got: 11 }));
    assert_eq!(parse(&with(&[0x21, 0x21, 0, 12])), Err(ProxyError::ShortAddress { needed: 36, got: 12 }));
    assert_eq!(parse(&with(&[0x21, 0x12, 0, 0])), Err(ProxyError::ShortAddress { needed: 12, got: 0 }));
    assert_eq!(parse(&with(&[0x21, 0x31, 0, 108])), Err(ProxyError::ShortAddress { needed: 216, got: 108 }));
    // Incomplete until the length field: nothing to tell yet.
    assert_eq!(parse(&with(&[0x21])), Ok(None));
    assert_eq!(parse(&with(&[0x21, 0x11])), Ok(None));
    assert_eq!(parse(&with(&[0x21, 0x11, 0])), Ok(None));
    assert_eq!(parse(&with(&[0x21, 0x11, 0, 12, 1, 2, 3])), Ok(None));
}

#[test]
fn v2_length_bound() {
    let at_bound = v2(1, 0x11, &vec![0; DEFAULT_MAX_V2_LEN - 16]);
    assert_eq!(at_bound.len(), DEFAULT_MAX_V2_LEN);
    assert_eq!(parse(&at_bound).unwrap().unwrap().len, DEFAULT_MAX_V2_LEN);
    let over = v2(1, 0x11, &vec![0; DEFAULT_MAX_V2_LEN - 15]);
    let too_long = Err(ProxyError::TooLong { limit: DEFAULT_MAX_V2_LEN });
    assert_eq!(parse(&over), too_long);
    // Refused as soon as the length field has arrived.
    assert_eq!(parse(&over[..16]), too_long);
    assert_eq!(parse(&over[..15]), Ok(None));
    // The largest length field the spec allows, with the largest bound.
    let max = v2(0, 0, &vec![0; 65535]);
    assert_eq!(parse(&max), Err(ProxyError::TooLong { limit: DEFAULT_MAX_V2_LEN }));
    assert_eq!(parse_with_limit(&max, 65535 + 16), Ok(Some(Parsed { header: ProxyHeader::Local, len: 65535 + 16 })));
    // A smaller bound, also for LOCAL; v1 lines are not affected.
    let ipv4 = v2(1, 0x11, &[0; 12]);
    assert_eq!(parse_with_limit(&ipv4, 28).unwrap().unwrap().len, 28);
    assert_eq!(parse_with_limit(&ipv4, 27), Err(ProxyError::TooLong { limit: 27 }));
    assert_eq!(parse_with_limit(&v2(0, 0, &[]), 15), Err(ProxyError::TooLong { limit: 15 }));
    assert_eq!(parse_with_limit(b"PROXY UNKNOWN\r\n", 0).unwrap().unwrap().len, 15);
}

fn socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>(), any::<u16>()).prop_map(|(s, d, sp, dp)| {
            (SocketAddr::new(Ipv4Addr::from(s).into(), sp), SocketAddr::new(Ipv4Addr::from(d).into(), dp))
        }),
        (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()).prop_map(|(s, d, sp, dp)| {
            (SocketAddr::new(Ipv6Addr::from(s).into(), sp), SocketAddr::new(Ipv6Addr::from(d).into(), dp))
        }),
        // Short IPv6 forms: mostly zero groups, IPv4-mapped.
        (any::<u16>(), 0..8usize, any::<[u8; 4]>(), any::<u16>()).prop_map(|(g, at, v4, port)| {
            let mut groups = [0u16; 8];
            groups[at] = g;
            let [a, b, c, d, e, f, gg, h] = groups;
            let s = Ipv6Addr::new(a, b, c, d, e, f, gg, h);
            (SocketAddr::new(s.into(), port), SocketAddr::new(Ipv4Addr::from(v4).to_ipv6_mapped().into(), port))
        }),
    ]
}

/// Every prefix of `input` gives `Ok(None)` or the input's own result.
fn check_prefixes(input: &[u8]) -> Result<(), TestCaseError> {
    let full = parse(input);
    if let Ok(Some(p)) = full {
        prop_assert!(p.len <= input.len());
    }
    for k in 0..input.len() {
        let r = parse(&input[..k]);
        prop_assert!(r == Ok(None) || r == full, "prefix {k}: {r:?}, whole: {full:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_prefixes(&data)?;
        let _ = parse_with_limit(&data, 0);
    }

    /// Random bytes after each possible start, so the fuzzing reaches past the first byte.
    #[test]
    fn random_tails_never_panic(start in 0..4usize, ver in any::<u8>(), fam in any::<u8>(),
                                tail in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut data = match start {
            0 => b"PROXY TCP4 ".to_vec(),
            1 => b"PROXY TCP6 ".to_vec(),
            2 => b"PROXY UNKNOWN".to_vec(),
            _ => [&V2_SIGNATURE[..], &[ver, fam]].concat(),
        };
        data.extend_from_slice(&tail);
        check_prefixes(&data)?;
    }

    /// Random v1 lines from a small alphabet of the characters that matter.
    #[test]
    fn v1_alphabet_never_panics(tail in proptest::collection::vec(
        prop::sample::select(&b"0123456789abcdef.: \r\nPROXYTCP46UNKW"[..]), 0..110)) {
        let mut data = b"PROXY ".to_vec();
        data.extend_from_slice(&tail);
        check_prefixes(&data)?;
    }

    #[test]
    fn v1_round_trip((source, destination) in socket_pair()) {
        let line = encode_v1(source, destination);
        let mut with_request = line.clone();
        with_request.extend_from_slice(REQUEST);
        prop_assert_eq!(
            parse(&with_request),
            Ok(Some(Parsed { header: ProxyHeader::Proxied { source, destination }, len: line.len() }))
        );
        check_prefixes(&with_request)?;
    }

    #[test]
    fn v2_round_trip((source, destination) in socket_pair(),
                     tlvs in proptest::collection::vec(any::<u8>(), 0..64),
                     trailer in proptest::collection::vec(any::<u8>(), 0..64)) {
        let header = encode_v2(source, destination, &tlvs);
        let mut with_trailer = header.clone();
        with_trailer.extend_from_slice(&trailer);
        prop_assert_eq!(
            parse(&with_trailer),
            Ok(Some(Parsed { header: ProxyHeader::Proxied { source, destination }, len: header.len() }))
        );
        check_prefixes(&with_trailer)?;
        // A bound one byte short refuses it.
        prop_assert_eq!(parse_with_limit(&with_trailer, header.len() - 1), Err(ProxyError::TooLong { limit: header.len() - 1 }));
    }
}
