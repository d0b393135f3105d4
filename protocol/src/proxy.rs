//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header a load balancer writes
//! at the start of a connection to pass on the client's address, parsed from the front of a buffer.
//!
//! [`parse`] tells the version from the first bytes (`PROXY ` for the v1 text line, the 12-byte
//! [`V2_SIGNATURE`] for the v2 binary header) and returns `Ok(None)` while the bytes seen so far can still
//! be the start of a valid header. Once the header is complete, [`Parsed::len`] is how many bytes it took:
//! the application data (the HTTP request) follows. Anything else is an error as soon as it can be told,
//! so a listener that requires the PROXY protocol refuses a client that connects to it directly.
//!
//! Every decision is made left to right on bytes already seen, so the result for a prefix of an input is
//! either `Ok(None)` or the input's own result: feeding a header in pieces gives what feeding it whole
//! gives. Parsing looks at no more than [`V1_MAX_LEN`] bytes of a v1 line and only the 16-byte header and
//! the address block of a v2 header; it allocates nothing.
//!
//! What the parser accepts:
//! - v1: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (dotted-quad IPv4 addresses), the same with `TCP6`
//!   (IPv6 addresses as `std` parses them), and `PROXY UNKNOWN\r\n` or `PROXY UNKNOWN <anything>\r\n`. Single
//!   spaces, decimal ports 0-65535 without leading zeros, at most [`V1_MAX_LEN`] bytes with the CRLF.
//! - v2: version 2, command LOCAL or PROXY. A PROXY header over TCP (`STREAM`) on IPv4 or IPv6 carries the
//!   client's addresses; LOCAL (whatever its family byte), the `UNSPEC` family or protocol, `AF_UNIX` and
//!   `DGRAM` give [`ProxyHeader::Local`]. The address block may be longer than the family needs (TLVs
//!   follow it); the whole header counts in [`Parsed::len`], and its size is bounded (see
//!   [`parse_with_limit`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// How a v1 header starts.
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Longest v1 line, CRLF included (the spec's bound: `PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;

/// How a v2 header starts.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Size of the fixed part of a v2 header: signature, version and command, family and protocol, length.
pub const V2_HEADER_LEN: usize = 16;

/// Default bound on a whole v2 header ([`V2_HEADER_LEN`] plus the address block and TLVs), in bytes. The
/// spec allows up to 65535 + 16; 1024 bytes of addresses and TLVs is plenty for what proxies send.
pub const DEFAULT_MAX_V2_LEN: usize = V2_HEADER_LEN + 1024;

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection was proxied for a client: a v1 `TCP4` or `TCP6` line, or a v2 PROXY command over TCP
    /// on IPv4 or IPv6.
    Proxied {
        /// The client's address, as the proxy saw it.
        source: SocketAddr,
        /// The address the client connected to (the proxy's listening address).
        destination: SocketAddr,
    },
    /// No client address to use: v1 `PROXY UNKNOWN`, the v2 LOCAL command (health checks from the proxy
    /// itself), or a v2 family or protocol this parser does not carry (`UNSPEC`, `AF_UNIX`, `DGRAM`). Use
    /// the connection's own addresses.
    Local,
}

/// A complete PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// What the header says.
    pub header: ProxyHeader,
    /// How many bytes the header took, v1 CRLF and v2 TLVs included; the application data follows.
    pub len: usize,
}

/// Why the front of a connection is not an acceptable PROXY header. The connection should be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are neither `PROXY ` (v1) nor the v2 signature: the peer does not speak the PROXY
    /// protocol (a plain HTTP request, a TLS ClientHello, ...).
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 line is malformed; the payload names what is wrong.
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    /// The v2 version (high nibble of byte 12) is not 2; the payload is the version found.
    #[error("unsupported PROXY v2 version {0}")]
    BadV2Version(u8),
    /// The v2 command (low nibble of byte 12) is neither LOCAL (0) nor PROXY (1); the payload is the command.
    #[error("unknown PROXY v2 command {0}")]
    BadV2Command(u8),
    /// A v2 PROXY command's family and protocol byte (byte 13) has a family above `AF_UNIX` (3) or a
    /// protocol above `DGRAM` (2); the payload is the byte.
    #[error("invalid PROXY v2 family and protocol byte {0:#04x}")]
    BadV2Family(u8),
    /// The header is longer than allowed: a v1 line without CRLF within [`V1_MAX_LEN`] bytes, or a v2
    /// header whose length field announces more than the bound.
    #[error("PROXY header exceeds {limit} bytes")]
    TooLong {
        /// The bound that was exceeded: [`V1_MAX_LEN`] or the v2 bound.
        limit: usize,
    },
    /// A v2 PROXY command's address block is shorter than its family's addresses (12 bytes for IPv4, 36
    /// for IPv6, 216 for `AF_UNIX`).
    #[error("PROXY v2 address block of {got} bytes, the family needs {needed}")]
    ShortAddress {
        /// Bytes the family's addresses take.
        needed: usize,
        /// Bytes the header's length field announces.
        got: usize,
    },
}

/// Parses a PROXY header (v1 or v2) from the front of `buf`, with v2 headers bounded by
/// [`DEFAULT_MAX_V2_LEN`]. `Ok(None)`: the bytes so far are the start of a possible header, read more.
///
/// # Errors
/// See [`ProxyError`]; the connection should be closed.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    parse_with_limit(buf, DEFAULT_MAX_V2_LEN)
}

/// [`parse`] with a bound on the size of a v2 header (16-byte fixed part, addresses and TLVs), at most
/// `max_v2_len` bytes; a header announcing more is [`ProxyError::TooLong`] as soon as its length field has
/// arrived. v1 lines are always bounded by [`V1_MAX_LEN`].
///
/// # Errors
/// See [`ProxyError`]; the connection should be closed.
pub fn parse_with_limit(buf: &[u8], max_v2_len: usize) -> Result<Option<Parsed>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => match starts_with_partial(buf, V1_PREFIX) {
            None => Err(ProxyError::NotProxy),
            Some(false) => Ok(None),
            Some(true) => parse_v1(buf),
        },
        Some(b'\r') => match starts_with_partial(buf, &V2_SIGNATURE) {
            None => Err(ProxyError::NotProxy),
            Some(false) => Ok(None),
            Some(true) => parse_v2(buf, max_v2_len),
        },
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Compares the front of `buf` with `lit`: `Some(true)` if `buf` starts with `lit`, `Some(false)` if `buf`
/// is a proper prefix of `lit`, `None` if they differ.
fn starts_with_partial(buf: &[u8], lit: &[u8]) -> Option<bool> {
    let n = buf.len().min(lit.len());
    (buf.get(..n) == lit.get(..n)).then_some(n == lit.len())
}

/// Unwraps a step of the v1 scanner: returns `Ok(None)` from the enclosing function when the line ran out.
macro_rules! ready {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// `buf` starts with `PROXY `.
fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    // Only the first V1_MAX_LEN bytes matter: a line not done by then is too long, whatever follows.
    let line = buf.get(..V1_MAX_LEN).unwrap_or(buf);
    let mut cur = Cursor { line, pos: V1_PREFIX.len() };
    match cur.v1_line() {
        Ok(Some(header)) => Ok(Some(Parsed { header, len: cur.pos })),
        Ok(None) if line.len() == V1_MAX_LEN => Err(ProxyError::TooLong { limit: V1_MAX_LEN }),
        other => other.map(|_| None),
    }
}

/// The v1 protocol names.
#[derive(Clone, Copy)]
enum V1Proto {
    Tcp4,
    Tcp6,
    Unknown,
}

/// Error messages for one side's address and port.
struct Side {
    missing_addr: &'static str,
    addr_too_long: &'static str,
    bad_addr: [&'static str; 2],
    space_after_addr: &'static str,
    missing_port: &'static str,
    port_too_long: &'static str,
    port_leading_zero: &'static str,
    port_range: &'static str,
}

const SOURCE: Side = Side {
    missing_addr: "missing source address (or not a single space before it)",
    addr_too_long: "source address too long",
    bad_addr: ["source address is not an IPv4 address", "source address is not an IPv6 address"],
    space_after_addr: "expected a single space after the source address",
    missing_port: "missing source port (or not a single space before it)",
    port_too_long: "source port too long",
    port_leading_zero: "source port has a leading zero",
    port_range: "source port above 65535",
};

const DESTINATION: Side = Side {
    missing_addr: "missing destination address (or not a single space before it)",
    addr_too_long: "destination address too long",
    bad_addr: ["destination address is not an IPv4 address", "destination address is not an IPv6 address"],
    space_after_addr: "expected a single space after the destination address",
    missing_port: "missing destination port (or not a single space before it)",
    port_too_long: "destination port too long",
    port_leading_zero: "destination port has a leading zero",
    port_range: "destination port above 65535",
};

/// Longest textual IPv4 address (`255.255.255.255`).
const MAX_IPV4_TEXT: usize = 15;
/// Longest textual IPv6 address (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const MAX_IPV6_TEXT: usize = 45;

/// A position in a v1 line; every step returns `Ok(None)` when the line ends before it can decide.
struct Cursor<'a> {
    line: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a [u8] {
        self.line.get(self.pos..).unwrap_or_default()
    }

    /// Everything after `PROXY `, up to and including the CRLF.
    fn v1_line(&mut self) -> Result<Option<ProxyHeader>, ProxyError> {
        let proto = ready!(self.proto());
        let v6 = match proto {
            V1Proto::Unknown => return self.unknown_tail().map(|done| done.map(|()| ProxyHeader::Local)),
            V1Proto::Tcp4 => false,
            V1Proto::Tcp6 => true,
        };
        ready!(self.literal(b" ", "expected a single space after the protocol"));
        let src = ready!(self.address(v6, &SOURCE));
        ready!(self.literal(b" ", SOURCE.space_after_addr));
        let dst = ready!(self.address(v6, &DESTINATION));
        ready!(self.literal(b" ", DESTINATION.space_after_addr));
        let sport = ready!(self.port(&SOURCE));
        ready!(self.literal(b" ", "expected a single space after the source port"));
        let dport = ready!(self.port(&DESTINATION));
        ready!(self.literal(b"\r\n", "expected CRLF after the destination port"));
        Ok(Some(ProxyHeader::Proxied { source: SocketAddr::new(src, sport), destination: SocketAddr::new(dst, dport) }))
    }

    /// `TCP4`, `TCP6` or `UNKNOWN`.
    fn proto(&mut self) -> Result<Option<V1Proto>, ProxyError> {
        const PROTOS: [(&[u8], V1Proto); 3] =
            [(b"TCP4", V1Proto::Tcp4), (b"TCP6", V1Proto::Tcp6), (b"UNKNOWN", V1Proto::Unknown)];
        let rest = self.rest();
        let mut partial = false;
        for (name, proto) in PROTOS {
            match starts_with_partial(rest, name) {
                Some(true) => {
                    self.pos += name.len();
                    return Ok(Some(proto));
                }
                Some(false) => partial = true,
                None => {}
            }
        }
        if partial {
            Ok(None)
        } else {
            Err(ProxyError::BadV1("protocol is not TCP4, TCP6 or UNKNOWN"))
        }
    }

    /// After `UNKNOWN`: CRLF, or a space and anything up to the first CRLF (which the receiver ignores).
    fn unknown_tail(&mut self) -> Result<Option<()>, ProxyError> {
        match self.rest().first() {
            None => Ok(None),
            Some(b'\r') => self.literal(b"\r\n", "expected CRLF after UNKNOWN"),
            Some(b' ') => match self.rest().windows(2).position(|w| w == b"\r\n") {
                Some(at) => {
                    self.pos += at + 2;
                    Ok(Some(()))
                }
                None => Ok(None),
            },
            Some(_) => Err(ProxyError::BadV1("expected a space or CRLF after UNKNOWN")),
        }
    }

    /// Consumes `lit`, or fails with `what` at the first byte that differs.
    fn literal(&mut self, lit: &[u8], what: &'static str) -> Result<Option<()>, ProxyError> {
        match starts_with_partial(self.rest(), lit) {
            None => Err(ProxyError::BadV1(what)),
            Some(false) => Ok(None),
            Some(true) => {
                self.pos += lit.len();
                Ok(Some(()))
            }
        }
    }

    /// A non-empty run of bytes in `allowed`, at most `max` long; what ends it is left for the next step.
    fn field(
        &mut self,
        allowed: fn(u8) -> bool,
        max: usize,
        missing: &'static str,
        too_long: &'static str,
    ) -> Result<Option<&'a [u8]>, ProxyError> {
        let start = self.pos;
        loop {
            match self.line.get(self.pos) {
                None => return Ok(None),
                Some(&b) if allowed(b) => {
                    self.pos += 1;
                    if self.pos - start > max {
                        return Err(ProxyError::BadV1(too_long));
                    }
                }
                Some(_) => break,
            }
        }
        match self.line.get(start..self.pos) {
            Some(field) if !field.is_empty() => Ok(Some(field)),
            _ => Err(ProxyError::BadV1(missing)),
        }
    }

    /// An IPv4 (`v6` false) or IPv6 address.
    fn address(&mut self, v6: bool, side: &Side) -> Result<Option<IpAddr>, ProxyError> {
        let (allowed, max): (fn(u8) -> bool, usize) = if v6 {
            (|b| b.is_ascii_hexdigit() || b == b':' || b == b'.', MAX_IPV6_TEXT)
        } else {
            (|b| b.is_ascii_digit() || b == b'.', MAX_IPV4_TEXT)
        };
        let text = ready!(self.field(allowed, max, side.missing_addr, side.addr_too_long));
        let text = std::str::from_utf8(text).ok();
        let ip = if v6 {
            text.and_then(|t| t.parse::<Ipv6Addr>().ok()).map(IpAddr::V6)
        } else {
            text.and_then(|t| t.parse::<Ipv4Addr>().ok()).map(IpAddr::V4)
        };
        ip.map(Some).ok_or(ProxyError::BadV1(side.bad_addr[usize::from(v6)]))
    }

    /// A decimal port, 0-65535, no leading zero.
    fn port(&mut self, side: &Side) -> Result<Option<u16>, ProxyError> {
        let digits = ready!(self.field(|b| b.is_ascii_digit(), 5, side.missing_port, side.port_too_long));
        if digits.len() > 1 && digits.first() == Some(&b'0') {
            return Err(ProxyError::BadV1(side.port_leading_zero));
        }
        let value = digits.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
        u16::try_from(value).map(Some).map_err(|_| ProxyError::BadV1(side.port_range))
    }
}

/// v2 family (high nibble of byte 13).
const AF_INET: u8 = 1;
const AF_INET6: u8 = 2;
const AF_UNIX: u8 = 3;
/// v2 transport protocol (low nibble of byte 13).
const STREAM: u8 = 1;
const DGRAM: u8 = 2;

/// `buf` starts with the v2 signature.
fn parse_v2(buf: &[u8], max_len: usize) -> Result<Option<Parsed>, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else { return Ok(None) };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2Version(ver_cmd >> 4));
    }
    let proxy = match ver_cmd & 0x0f {
        0 => false,
        1 => true,
        command => return Err(ProxyError::BadV2Command(command)),
    };
    let Some(&fam) = buf.get(13) else { return Ok(None) };
    let (family, protocol) = (fam >> 4, fam & 0x0f);
    // LOCAL: the family is ignored, whatever it is.
    if proxy && (family > AF_UNIX || protocol > DGRAM) {
        return Err(ProxyError::BadV2Family(fam));
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else { return Ok(None) };
    let block_len = usize::from(u16::from_be_bytes([hi, lo]));
    let len = V2_HEADER_LEN + block_len;
    if len > max_len {
        return Err(ProxyError::TooLong { limit: max_len });
    }
    let needed = match family {
        _ if !proxy => 0,
        AF_INET => 12,
        AF_INET6 => 36,
        AF_UNIX => 216,
        _ => 0,
    };
    if block_len < needed {
        return Err(ProxyError::ShortAddress { needed, got: block_len });
    }
    let Some(block) = buf.get(V2_HEADER_LEN..len) else { return Ok(None) };
    let short = ProxyError::ShortAddress { needed, got: block_len };
    let header = match (proxy, family, protocol) {
        (true, AF_INET, STREAM) => {
            let src = Ipv4Addr::from(array::<4>(block, 0).ok_or(short)?);
            let dst = Ipv4Addr::from(array::<4>(block, 4).ok_or(short)?);
            let sport = u16::from_be_bytes(array(block, 8).ok_or(short)?);
            let dport = u16::from_be_bytes(array(block, 10).ok_or(short)?);
            ProxyHeader::Proxied {
                source: SocketAddr::V4(SocketAddrV4::new(src, sport)),
                destination: SocketAddr::V4(SocketAddrV4::new(dst, dport)),
            }
        }
        (true, AF_INET6, STREAM) => {
            let src = Ipv6Addr::from(array::<16>(block, 0).ok_or(short)?);
            let dst = Ipv6Addr::from(array::<16>(block, 16).ok_or(short)?);
            let sport = u16::from_be_bytes(array(block, 32).ok_or(short)?);
            let dport = u16::from_be_bytes(array(block, 34).ok_or(short)?);
            ProxyHeader::Proxied {
                source: SocketAddr::V6(SocketAddrV6::new(src, sport, 0, 0)),
                destination: SocketAddr::V6(SocketAddrV6::new(dst, dport, 0, 0)),
            }
        }
        // LOCAL, UNSPEC family or protocol, AF_UNIX, DGRAM: use the connection's own addresses.
        _ => ProxyHeader::Local,
    };
    Ok(Some(Parsed { header, len }))
}

/// `N` bytes of `block` from `at`, if there are that many.
fn array<const N: usize>(block: &[u8], at: usize) -> Option<[u8; N]> {
    block.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_partial_cases() {
        assert_eq!(starts_with_partial(b"", b"PROXY "), Some(false));
        assert_eq!(starts_with_partial(b"PRO", b"PROXY "), Some(false));
        assert_eq!(starts_with_partial(b"PROXY ", b"PROXY "), Some(true));
        assert_eq!(starts_with_partial(b"PROXY TCP4", b"PROXY "), Some(true));
        assert_eq!(starts_with_partial(b"PROXZ", b"PROXY "), None);
    }

    #[test]
    fn ports() {
        let port = |s: &str| Cursor { line: s.as_bytes(), pos: 0 }.port(&SOURCE);
        assert_eq!(port("0 "), Ok(Some(0)));
        assert_eq!(port("65535 "), Ok(Some(65535)));
        assert_eq!(port("65535"), Ok(None));
        assert_eq!(port("65536 "), Err(ProxyError::BadV1(SOURCE.port_range)));
        assert_eq!(port("99999 "), Err(ProxyError::BadV1(SOURCE.port_range)));
        assert_eq!(port("080 "), Err(ProxyError::BadV1(SOURCE.port_leading_zero)));
        assert_eq!(port("00 "), Err(ProxyError::BadV1(SOURCE.port_leading_zero)));
        assert_eq!(port("123456"), Err(ProxyError::BadV1(SOURCE.port_too_long)));
        assert_eq!(port(" "), Err(ProxyError::BadV1(SOURCE.missing_port)));
        assert_eq!(port("-1 "), Err(ProxyError::BadV1(SOURCE.missing_port)));
    }

    #[test]
    fn addresses() {
        let addr = |s: &str, v6| Cursor { line: s.as_bytes(), pos: 0 }.address(v6, &DESTINATION);
        assert_eq!(addr("10.0.0.1 ", false), Ok(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))));
        assert_eq!(addr("10.0.0.1", false), Ok(None));
        assert_eq!(addr("010.0.0.1 ", false), Err(ProxyError::BadV1(DESTINATION.bad_addr[0])));
        assert_eq!(addr("1.2.3.256 ", false), Err(ProxyError::BadV1(DESTINATION.bad_addr[0])));
        assert_eq!(addr("1.2.3 ", false), Err(ProxyError::BadV1(DESTINATION.bad_addr[0])));
        assert_eq!(addr("::1 ", false), Err(ProxyError::BadV1(DESTINATION.missing_addr)));
        assert_eq!(addr("1111.2222.3333.4444", false), Err(ProxyError::BadV1(DESTINATION.addr_too_long)));
        assert_eq!(addr("::1 ", true), Ok(Some(IpAddr::V6(Ipv6Addr::LOCALHOST))));
        assert_eq!(addr("::ffff:1.2.3.4 ", true), Ok(Some(IpAddr::V6(Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped()))));
        assert_eq!(addr("1.2.3.4 ", true), Err(ProxyError::BadV1(DESTINATION.bad_addr[1])));
        assert_eq!(addr(":::1 ", true), Err(ProxyError::BadV1(DESTINATION.bad_addr[1])));
        // A zone index is not part of the field: the address ends at `%`, and the line fails on the next step.
        assert_eq!(addr("fe80::1%eth0 ", true), Ok(Some(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)))));
    }

    #[test]
    fn array_bounds() {
        assert_eq!(array::<2>(&[1, 2, 3], 1), Some([2, 3]));
        assert_eq!(array::<2>(&[1, 2, 3], 2), None);
        assert_eq!(array::<2>(&[1, 2, 3], usize::MAX), None);
    }
}
