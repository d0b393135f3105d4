//! Incremental parsing of an HTTP/1.1 request head (the WebSocket upgrade or a plain HTTP request) and
//! validation of the WebSocket upgrade (RFC 6455 §4.2.1).

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;

use super::response::{write_rejection, Status};

/// Default bound on the size of a request head (request line, headers and the blank line), in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8192;

/// Most header fields a request may carry; one more is [`HandshakeError::TooManyHeaders`].
pub const MAX_HEADERS: usize = 64;

/// Why a request head could not be parsed. Each maps to an HTTP status via [`HandshakeError::status`]; the
/// connection should be answered with [`HandshakeError::write_rejection`] and closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes are not an HTTP/1.x request head; the payload names the part that is invalid. (400)
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is not complete within `limit` bytes. (431)
    #[error("request head exceeds {limit} bytes")]
    HeadersTooLarge {
        /// The `max_header_bytes` bound that was exceeded.
        limit: usize,
    },
    /// More than [`MAX_HEADERS`] header fields. (431)
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// `Content-Length` is not a plain decimal number that fits in `usize`. (400)
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// `Content-Length` appears more than once. (400)
    #[error("duplicate Content-Length")]
    DuplicateContentLength,
    /// A `Transfer-Encoding` header is present; request bodies must use `Content-Length`. (501)
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    UnsupportedTransferEncoding,
    /// A header that must appear at most once appears more than once; the payload is its name. (400)
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// A header the engine reads has a value that is not UTF-8; the payload is its name. (400)
    #[error("{0} header is not valid UTF-8")]
    NonUtf8Header(&'static str),
}

impl HandshakeError {
    /// The HTTP status to answer with.
    #[must_use]
    pub const fn status(&self) -> Status {
        match self {
            HandshakeError::HeadersTooLarge { .. } | HandshakeError::TooManyHeaders => Status::HeaderFieldsTooLarge,
            HandshakeError::UnsupportedTransferEncoding => Status::NotImplemented,
            HandshakeError::Malformed(_)
            | HandshakeError::InvalidContentLength
            | HandshakeError::DuplicateContentLength
            | HandshakeError::DuplicateHeader(_)
            | HandshakeError::NonUtf8Header(_) => Status::BadRequest,
        }
    }

    /// A short human-readable reason for the JSON body of the rejection.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Malformed(what) => what,
            HandshakeError::HeadersTooLarge { .. } => "request head too large",
            HandshakeError::TooManyHeaders => "too many header fields",
            HandshakeError::InvalidContentLength => "invalid Content-Length",
            HandshakeError::DuplicateContentLength => "duplicate Content-Length",
            HandshakeError::UnsupportedTransferEncoding => "Transfer-Encoding is not supported; send a Content-Length",
            HandshakeError::DuplicateHeader(name) => match *name {
                HOST => "duplicate Host header",
                ORIGIN => "duplicate Origin header",
                AUTHORIZATION => "duplicate Authorization header",
                SEC_WEBSOCKET_KEY => "duplicate Sec-WebSocket-Key header",
                SEC_WEBSOCKET_VERSION => "duplicate Sec-WebSocket-Version header",
                _ => "duplicate header",
            },
            HandshakeError::NonUtf8Header(_) => "header value is not valid UTF-8",
        }
    }

    /// Appends the complete rejection response (`Connection: close`, JSON body) to `out`.
    pub fn write_rejection(&self, out: &mut Vec<u8>) {
        write_rejection(out, self.status(), self.reason());
    }
}

/// Why a parsed request is not an acceptable WebSocket upgrade. Each maps to an HTTP status via
/// [`UpgradeError::status`] and a reason via [`UpgradeError::reason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// The method is not `GET`. (405)
    #[error("WebSocket upgrade requires GET")]
    MethodNotAllowed,
    /// The request is not HTTP/1.1. (400)
    #[error("WebSocket upgrade requires HTTP/1.1")]
    HttpVersion,
    /// No `Upgrade` header with a `websocket` token. (426)
    #[error("missing Upgrade: websocket")]
    MissingUpgrade,
    /// No `Connection` header with an `upgrade` token. (426)
    #[error("missing Connection: Upgrade")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` is missing or not `13`. (426, with `Sec-WebSocket-Version: 13`)
    #[error("Sec-WebSocket-Version must be 13")]
    UnsupportedVersion,
    /// No `Host` header (required by HTTP/1.1 and RFC 6455). (400)
    #[error("missing Host header")]
    MissingHost,
    /// No `Sec-WebSocket-Key` header. (400)
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    /// `Sec-WebSocket-Key` is not the base64 encoding of exactly 16 bytes. (400)
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    InvalidKey,
    /// The request announces a body (`Content-Length` above 0): the bytes after the head would be read as
    /// WebSocket frames. (400)
    #[error("a WebSocket upgrade request must not have a body")]
    HasBody,
}

impl UpgradeError {
    /// The HTTP status to answer with.
    #[must_use]
    pub const fn status(&self) -> Status {
        match self {
            UpgradeError::MethodNotAllowed => Status::MethodNotAllowed,
            UpgradeError::MissingUpgrade
            | UpgradeError::MissingConnectionUpgrade
            | UpgradeError::UnsupportedVersion => Status::UpgradeRequired,
            UpgradeError::HttpVersion
            | UpgradeError::MissingHost
            | UpgradeError::MissingKey
            | UpgradeError::InvalidKey
            | UpgradeError::HasBody => Status::BadRequest,
        }
    }

    /// A short human-readable reason for the JSON body of the rejection.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            UpgradeError::MethodNotAllowed => "WebSocket upgrade requires GET",
            UpgradeError::HttpVersion => "WebSocket upgrade requires HTTP/1.1",
            UpgradeError::MissingUpgrade => "missing Upgrade: websocket",
            UpgradeError::MissingConnectionUpgrade => "missing Connection: Upgrade",
            UpgradeError::UnsupportedVersion => "Sec-WebSocket-Version must be 13",
            UpgradeError::MissingHost => "missing Host header",
            UpgradeError::MissingKey => "missing Sec-WebSocket-Key",
            UpgradeError::InvalidKey => "Sec-WebSocket-Key must be base64 of 16 bytes",
            UpgradeError::HasBody => "a WebSocket upgrade request must not have a body",
        }
    }

    /// Appends the complete rejection response (`Connection: close`, JSON body, and
    /// `Sec-WebSocket-Version: 13` for a 426) to `out`.
    pub fn write_rejection(&self, out: &mut Vec<u8>) {
        write_rejection(out, self.status(), self.reason());
    }
}

const HOST: &str = "Host";
const ORIGIN: &str = "Origin";
const AUTHORIZATION: &str = "Authorization";
const SEC_WEBSOCKET_KEY: &str = "Sec-WebSocket-Key";
const SEC_WEBSOCKET_VERSION: &str = "Sec-WebSocket-Version";

/// A parsed request head. Every string borrows from the buffer handed to [`parse_request`].
///
/// The well-known headers are extracted into fields while parsing; any other header is available through
/// [`Request::header`] and [`Request::headers`]. Header values have surrounding spaces and tabs removed.
/// Headers that may appear only once (`Host`, `Origin`, `Authorization`, `Sec-WebSocket-Key`,
/// `Sec-WebSocket-Version`, `Content-Length`) are rejected when repeated; for the other extracted headers
/// the first occurrence wins (`Upgrade` and `Connection` tokens are collected from all occurrences, and
/// [`Request::subprotocols`] reads every `Sec-WebSocket-Protocol`).
#[derive(Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method, e.g. `GET` (case-sensitive, as sent).
    pub method: &'a str,
    /// The raw request-target, e.g. `/ws?token=abc`.
    pub target: &'a str,
    /// The path without query or fragment, e.g. `/ws`. An absolute-form target
    /// (`http://host/ws?x`) is reduced to its path (`/ws`, or `/` when it has none).
    pub path: &'a str,
    /// The raw (still percent-encoded) query string after `?`, if any; see [`Request::query_param`].
    pub query: Option<&'a str>,
    /// The HTTP minor version: `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub version: u8,
    /// Bytes of the request head, including the blank line; any body starts at this offset.
    pub header_len: usize,
    /// `Host`.
    pub host: Option<&'a str>,
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// An `Upgrade` header carries the token `websocket` (case-insensitive).
    pub upgrade: bool,
    /// A `Connection` header carries the token `upgrade` (case-insensitive), e.g. `keep-alive, Upgrade`.
    pub connection_upgrade: bool,
    /// A `Connection` header carries the token `close`.
    pub connection_close: bool,
    /// A `Connection` header carries the token `keep-alive`.
    pub connection_keep_alive: bool,
    /// `Sec-WebSocket-Key`, unvalidated; see [`Request::validate_upgrade`].
    pub ws_key: Option<&'a str>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<&'a str>,
    /// The first `Sec-WebSocket-Protocol` header, raw; see [`Request::subprotocols`] for all offers.
    pub ws_protocol: Option<&'a str>,
    /// The first `Sec-WebSocket-Extensions` header, raw.
    pub ws_extensions: Option<&'a str>,
    /// `Authorization`, raw; see [`Request::bearer_token`].
    pub authorization: Option<&'a str>,
    /// The first `X-Forwarded-For` header, raw (a comma-separated list of addresses).
    pub forwarded_for: Option<&'a str>,
    /// The first `X-Real-IP` header.
    pub real_ip: Option<&'a str>,
    /// `Content-Length`, validated as a decimal number.
    pub content_length: Option<usize>,
    headers: [httparse::Header<'a>; MAX_HEADERS],
    header_count: usize,
}

/// Parses a request head from the start of `buf`.
///
/// Call again with the grown buffer whenever more bytes arrive (parsing restarts from the beginning, which is
/// cheap for heads of a few hundred bytes). Returns:
/// - `Ok(Some(request))` once the head is complete; the body, if any, starts at `request.header_len`;
/// - `Ok(None)` while the head is incomplete and `buf.len() <= max_header_bytes`;
/// - `Err(HandshakeError::HeadersTooLarge)` when the head is not complete within `max_header_bytes` bytes
///   (whether or not more bytes are buffered, so the result does not depend on how the bytes arrived);
/// - another error for a malformed head, more than [`MAX_HEADERS`] headers, a repeated or invalid
///   `Content-Length`, any `Transfer-Encoding`, a repeated single-valued header, or a non-UTF-8 value in a
///   header this parser extracts.
///
/// Does not allocate.
///
/// # Errors
///
/// A [`HandshakeError`] as listed above; answer it with [`HandshakeError::write_rejection`] and close.
pub fn parse_request(buf: &[u8], max_header_bytes: usize) -> Result<Option<Request<'_>>, HandshakeError> {
    let window = buf.get(..max_header_bytes).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let header_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_header_bytes {
                Err(HandshakeError::HeadersTooLarge { limit: max_header_bytes })
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(describe(e))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HandshakeError::Malformed("incomplete request line"));
    };
    let header_count = req.headers.len();
    Request::build(method, target, version, header_len, headers, header_count).map(Some)
}

fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid request line",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The headers [`Request`] extracts into fields.
#[derive(Clone, Copy)]
enum Known {
    Host,
    Origin,
    Upgrade,
    Connection,
    WsKey,
    WsVersion,
    WsProtocol,
    WsExtensions,
    Authorization,
    ForwardedFor,
    RealIp,
    ContentLength,
    TransferEncoding,
}

impl Known {
    fn classify(name: &str) -> Option<Known> {
        let is = |lower: &str| name.eq_ignore_ascii_case(lower);
        let known = match name.len() {
            4 if is("host") => Known::Host,
            6 if is("origin") => Known::Origin,
            7 if is("upgrade") => Known::Upgrade,
            9 if is("x-real-ip") => Known::RealIp,
            10 if is("connection") => Known::Connection,
            13 if is("authorization") => Known::Authorization,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::ForwardedFor,
            17 if is("sec-websocket-key") => Known::WsKey,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            21 if is("sec-websocket-version") => Known::WsVersion,
            22 if is("sec-websocket-protocol") => Known::WsProtocol,
            24 if is("sec-websocket-extensions") => Known::WsExtensions,
            _ => return None,
        };
        Some(known)
    }

    const fn name(self) -> &'static str {
        match self {
            Known::Host => HOST,
            Known::Origin => ORIGIN,
            Known::Upgrade => "Upgrade",
            Known::Connection => "Connection",
            Known::WsKey => SEC_WEBSOCKET_KEY,
            Known::WsVersion => SEC_WEBSOCKET_VERSION,
            Known::WsProtocol => "Sec-WebSocket-Protocol",
            Known::WsExtensions => "Sec-WebSocket-Extensions",
            Known::Authorization => AUTHORIZATION,
            Known::ForwardedFor => "X-Forwarded-For",
            Known::RealIp => "X-Real-IP",
            Known::ContentLength => "Content-Length",
            Known::TransferEncoding => "Transfer-Encoding",
        }
    }
}

fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// The comma-separated tokens of a header value, trimmed, empty elements skipped.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(trim_ows).filter(|t| !t.is_empty())
}

/// Stores `value` in a single-valued slot, rejecting a second occurrence.
fn set_once<'a>(slot: &mut Option<&'a str>, value: &'a str, name: &'static str) -> Result<(), HandshakeError> {
    if slot.is_some() {
        return Err(HandshakeError::DuplicateHeader(name));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_content_length(value: &str) -> Result<usize, HandshakeError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HandshakeError::InvalidContentLength);
    }
    value.bytes().try_fold(0usize, |acc, b| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(usize::from(b - b'0')))
            .ok_or(HandshakeError::InvalidContentLength)
    })
}

/// Splits a request-target into path and query, dropping any fragment and reducing absolute-form.
fn split_target(target: &str) -> (&str, Option<&str>) {
    let target = target.split('#').next().unwrap_or(target);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let authority_and_path = strip_prefix_ci(path, "http://").or_else(|| strip_prefix_ci(path, "https://"));
    let path = match authority_and_path {
        Some(rest) => rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"),
        None => path,
    };
    (path, query)
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

impl<'a> Request<'a> {
    fn build(
        method: &'a str,
        target: &'a str,
        version: u8,
        header_len: usize,
        headers: [httparse::Header<'a>; MAX_HEADERS],
        header_count: usize,
    ) -> Result<Self, HandshakeError> {
        let (path, query) = split_target(target);
        let mut req = Request {
            method,
            target,
            path,
            query,
            version,
            header_len,
            host: None,
            origin: None,
            upgrade: false,
            connection_upgrade: false,
            connection_close: false,
            connection_keep_alive: false,
            ws_key: None,
            ws_version: None,
            ws_protocol: None,
            ws_extensions: None,
            authorization: None,
            forwarded_for: None,
            real_ip: None,
            content_length: None,
            headers,
            header_count: header_count.min(MAX_HEADERS),
        };
        for header in req.headers.iter().take(req.header_count) {
            let Some(known) = Known::classify(header.name) else {
                continue;
            };
            let value = std::str::from_utf8(header.value).map_err(|_| HandshakeError::NonUtf8Header(known.name()))?;
            let value = trim_ows(value);
            match known {
                Known::Host => set_once(&mut req.host, value, HOST)?,
                Known::Origin => set_once(&mut req.origin, value, ORIGIN)?,
                Known::Authorization => set_once(&mut req.authorization, value, AUTHORIZATION)?,
                Known::WsKey => set_once(&mut req.ws_key, value, SEC_WEBSOCKET_KEY)?,
                Known::WsVersion => set_once(&mut req.ws_version, value, SEC_WEBSOCKET_VERSION)?,
                Known::WsProtocol => {
                    req.ws_protocol.get_or_insert(value);
                }
                Known::WsExtensions => {
                    req.ws_extensions.get_or_insert(value);
                }
                Known::ForwardedFor => {
                    req.forwarded_for.get_or_insert(value);
                }
                Known::RealIp => {
                    req.real_ip.get_or_insert(value);
                }
                Known::Upgrade => {
                    req.upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
                }
                Known::Connection => {
                    for token in tokens(value) {
                        req.connection_upgrade |= token.eq_ignore_ascii_case("upgrade");
                        req.connection_close |= token.eq_ignore_ascii_case("close");
                        req.connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                    }
                }
                Known::ContentLength => {
                    if req.content_length.is_some() {
                        return Err(HandshakeError::DuplicateContentLength);
                    }
                    req.content_length = Some(parse_content_length(value)?);
                }
                Known::TransferEncoding => return Err(HandshakeError::UnsupportedTransferEncoding),
            }
        }
        Ok(req)
    }

    /// The value of the first header named `name` (case-insensitive), trimmed; `None` when absent or when
    /// the value is not UTF-8.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(trim_ows)
    }

    /// Every header as `(name, raw value)`, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.headers.iter().take(self.header_count).map(|h| (h.name, h.value))
    }

    /// The number of header fields.
    #[must_use]
    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// Every subprotocol offered, across all `Sec-WebSocket-Protocol` headers, split on commas and trimmed,
    /// in order. For `Sec-WebSocket-Protocol: throng.v1, bearer.<jwt>` this yields `throng.v1`, `bearer.<jwt>`.
    pub fn subprotocols(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(tokens)
    }

    /// The token carried as a `bearer.<token>` subprotocol, if one was offered.
    #[must_use]
    pub fn subprotocol_bearer(&self) -> Option<&'a str> {
        self.subprotocols().find_map(|p| p.strip_prefix("bearer.")).filter(|t| !t.is_empty())
    }

    /// Whether the client offered the subprotocol `name` (exact match, as RFC 6455 subprotocol names are
    /// case-sensitive).
    #[must_use]
    pub fn offers_subprotocol(&self, name: &str) -> bool {
        self.subprotocols().any(|p| p == name)
    }

    /// The value of the first query parameter named `name`, percent-decoded with `+` as space.
    ///
    /// Parameter names are decoded the same way before comparing. A parameter without `=` has the empty
    /// value. Invalid `%` escapes are kept literally; decoded bytes that are not UTF-8 are replaced with
    /// U+FFFD. Borrows from the buffer when the value needs no decoding, allocates otherwise.
    #[must_use]
    pub fn query_param(&self, name: &str) -> Option<Cow<'a, str>> {
        self.query?
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| PercentDecoded::new(key.as_bytes()).eq(name.bytes()))
            .map(|(_, value)| percent_decode(value))
    }

    /// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), trimmed;
    /// `None` for another scheme or an empty token.
    #[must_use]
    pub fn bearer_token(&self) -> Option<&'a str> {
        let auth = self.authorization?;
        let split = auth.find([' ', '\t'])?;
        let (scheme, rest) = auth.split_at(split);
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(trim_ows(rest)).filter(|t| !t.is_empty())
    }

    /// `Upgrade: websocket` and `Connection: upgrade` are both present: the client asks for a WebSocket,
    /// whether or not the rest of the handshake is valid (see [`Request::validate_upgrade`]).
    #[must_use]
    pub fn is_websocket_upgrade(&self) -> bool {
        self.upgrade && self.connection_upgrade
    }

    /// Whether the connection may be kept open after the response: HTTP/1.1 unless `Connection: close`,
    /// HTTP/1.0 only with `Connection: keep-alive`.
    #[must_use]
    pub fn keep_alive(&self) -> bool {
        !self.connection_close && (self.version >= 1 || self.connection_keep_alive)
    }

    /// Checks the request is a valid WebSocket opening handshake (RFC 6455 §4.2.1), in this order: method
    /// `GET` (else 405), HTTP/1.1 (else 400), `Upgrade: websocket` and `Connection: upgrade` (else 426),
    /// `Sec-WebSocket-Version: 13` (else 426), `Host` present (else 400), `Sec-WebSocket-Key` present and the
    /// base64 of exactly 16 bytes (else 400). Authentication, origin and path checks are the engine's.
    ///
    /// # Errors
    ///
    /// The first [`UpgradeError`] found; answer it with [`UpgradeError::write_rejection`] and close.
    pub fn validate_upgrade(&self) -> Result<(), UpgradeError> {
        if self.method != "GET" {
            return Err(UpgradeError::MethodNotAllowed);
        }
        if self.version != 1 {
            return Err(UpgradeError::HttpVersion);
        }
        if !self.upgrade {
            return Err(UpgradeError::MissingUpgrade);
        }
        if !self.connection_upgrade {
            return Err(UpgradeError::MissingConnectionUpgrade);
        }
        if self.ws_version != Some("13") {
            return Err(UpgradeError::UnsupportedVersion);
        }
        if self.host.is_none() {
            return Err(UpgradeError::MissingHost);
        }
        let key = self.ws_key.ok_or(UpgradeError::MissingKey)?;
        if !is_valid_key(key) {
            return Err(UpgradeError::InvalidKey);
        }
        if self.content_length.is_some_and(|n| n > 0) {
            return Err(UpgradeError::HasBody);
        }
        Ok(())
    }
}

/// `key` is the canonical padded base64 of exactly 16 bytes (24 characters ending in `==`).
fn is_valid_key(key: &str) -> bool {
    if key.len() != 24 {
        return false;
    }
    let mut decoded = [0u8; 18];
    matches!(base64::engine::general_purpose::STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// Decodes `%XX` escapes and `+` (as space) byte by byte; invalid escapes pass through literally.
struct PercentDecoded<'s> {
    bytes: &'s [u8],
}

impl<'s> PercentDecoded<'s> {
    fn new(bytes: &'s [u8]) -> Self {
        PercentDecoded { bytes }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl Iterator for PercentDecoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let (&first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        match first {
            b'+' => Some(b' '),
            b'%' => {
                if let [hi, lo, tail @ ..] = rest {
                    if let (Some(hi), Some(lo)) = (hex_value(*hi), hex_value(*lo)) {
                        self.bytes = tail;
                        return Some(hi << 4 | lo);
                    }
                }
                Some(b'%')
            }
            b => Some(b),
        }
    }
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes: Vec<u8> = PercentDecoded::new(s.as_bytes()).collect();
    match String::from_utf8(bytes) {
        Ok(decoded) => Cow::Owned(decoded),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'r, 'a>(&'r Request<'a>);
        impl fmt::Debug for Headers<'_, '_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.headers().map(|(n, v)| (n, String::from_utf8_lossy(v)))).finish()
            }
        }
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("version", &self.version)
            .field("header_len", &self.header_len)
            .field("host", &self.host)
            .field("origin", &self.origin)
            .field("upgrade", &self.upgrade)
            .field("connection_upgrade", &self.connection_upgrade)
            .field("connection_close", &self.connection_close)
            .field("connection_keep_alive", &self.connection_keep_alive)
            .field("ws_key", &self.ws_key)
            .field("ws_version", &self.ws_version)
            .field("ws_protocol", &self.ws_protocol)
            .field("ws_extensions", &self.ws_extensions)
            .field("authorization", &self.authorization)
            .field("forwarded_for", &self.forwarded_for)
            .field("real_ip", &self.real_ip)
            .field("content_length", &self.content_length)
            .field("headers", &Headers(self))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client handshake of RFC 6455 §1.3, plus the headers Throng reads.
    const RFC_REQUEST: &[u8] = b"GET /chat?token=abc%2Edef&room=a+b HTTP/1.1\r\n\
Host: server.example.com\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig\r\n\
X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n\
X-Real-IP: 203.0.113.7\r\n\
User-Agent: test/1.0\r\n\
\r\n";

    fn parse(buf: &[u8]) -> Result<Option<Request<'_>>, HandshakeError> {
        parse_request(buf, DEFAULT_MAX_HEADER_BYTES)
    }

    fn parse_ok(buf: &[u8]) -> Request<'_> {
        parse(buf).expect("parses").expect("complete")
    }

    fn upgrade_with(extra: &str) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    #[test]
    fn rfc_request_every_field() {
        let mut buf = RFC_REQUEST.to_vec();
        buf.extend_from_slice(b"trailing frame bytes");
        let req = parse_ok(&buf);
        assert_eq!(req.method, "GET");
        assert_eq!(req.target, "/chat?token=abc%2Edef&room=a+b");
        assert_eq!(req.path, "/chat");
        assert_eq!(req.query, Some("token=abc%2Edef&room=a+b"));
        assert_eq!(req.version, 1);
        assert_eq!(req.header_len, RFC_REQUEST.len());
        assert_eq!(req.host, Some("server.example.com"));
        assert_eq!(req.origin, Some("http://example.com"));
        assert!(req.upgrade);
        assert!(req.connection_upgrade);
        assert!(!req.connection_close);
        assert!(!req.connection_keep_alive);
        assert!(req.is_websocket_upgrade());
        assert!(req.keep_alive());
        assert_eq!(req.ws_key, Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(req.ws_version, Some("13"));
        assert_eq!(req.ws_protocol, Some("chat, superchat"));
        assert_eq!(req.subprotocols().collect::<Vec<_>>(), ["chat", "superchat"]);
        assert!(req.offers_subprotocol("chat"));
        assert!(!req.offers_subprotocol("Chat"));
        assert_eq!(req.subprotocol_bearer(), None);
        assert_eq!(req.ws_extensions, Some("permessage-deflate; client_max_window_bits"));
        assert_eq!(req.authorization, Some("Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert_eq!(req.bearer_token(), Some("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert_eq!(req.forwarded_for, Some("203.0.113.7, 10.0.0.1"));
        assert_eq!(req.real_ip, Some("203.0.113.7"));
        assert_eq!(req.content_length, None);
        assert_eq!(req.header("user-agent"), Some("test/1.0"));
        assert_eq!(req.header("HOST"), Some("server.example.com"));
        assert_eq!(req.header("x-missing"), None);
        assert_eq!(req.header_count(), 12);
        assert_eq!(req.query_param("token").as_deref(), Some("abc.def"));
        assert_eq!(req.query_param("room").as_deref(), Some("a b"));
        assert_eq!(req.query_param("nope"), None);
        assert_eq!(req.validate_upgrade(), Ok(()));
        assert!(format!("{req:?}").contains("User-Agent"));
    }

    #[test]
    fn every_split_point_is_partial_then_same_request() {
        let full = parse_ok(RFC_REQUEST);
        for end in 0..RFC_REQUEST.len() {
            assert_eq!(parse(&RFC_REQUEST[..end]), Ok(None), "prefix of {end} bytes");
        }
        assert_eq!(parse(RFC_REQUEST), Ok(Some(full)));
    }

    #[test]
    fn oversize_head_is_431() {
        let mut buf = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        buf.resize(DEFAULT_MAX_HEADER_BYTES, b'a');
        assert_eq!(parse(&buf), Ok(None));
        buf.push(b'a');
        let err = parse(&buf).unwrap_err();
        assert_eq!(err, HandshakeError::HeadersTooLarge { limit: DEFAULT_MAX_HEADER_BYTES });
        assert_eq!(err.status(), Status::HeaderFieldsTooLarge);
        // Complete, but larger than the bound: still rejected, whatever the arrival pattern.
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&buf).unwrap_err().status(), Status::HeaderFieldsTooLarge);
        // A head exactly at the bound is fine, and body bytes after it do not count.
        let head = b"GET / HTTP/1.1\r\n\r\n";
        let mut buf = head.to_vec();
        buf.extend_from_slice(&[b'x'; 64]);
        assert_eq!(parse_request(&buf, head.len()).unwrap().unwrap().header_len, head.len());
        assert_eq!(parse_request(&buf, head.len() - 1), Err(HandshakeError::HeadersTooLarge { limit: head.len() - 1 }));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut s = String::from("GET / HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            s.push_str(&format!("X-H{i}: v\r\n"));
        }
        let ok = format!("{s}\r\n");
        assert_eq!(parse_ok(ok.as_bytes()).header_count(), MAX_HEADERS);
        s.push_str("X-One-More: v\r\n\r\n");
        let err = parse(s.as_bytes()).unwrap_err();
        assert_eq!(err, HandshakeError::TooManyHeaders);
        assert_eq!(err.status(), Status::HeaderFieldsTooLarge);
    }

    #[test]
    fn header_names_any_case() {
        let lower = b"GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: WebSocket\r\nconnection: upgrade\r\n\
sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\norigin: o\r\n\
sec-websocket-protocol: p\r\nx-forwarded-for: f\r\nx-real-ip: r\r\nauthorization: bearer t\r\n\r\n";
        let upper = b"GET /ws HTTP/1.1\r\nHOST: h\r\nUPGRADE: WEBSOCKET\r\nCONNECTION: UPGRADE\r\n\
SEC-WEBSOCKET-VERSION: 13\r\nSEC-WEBSOCKET-KEY: dGhlIHNhbXBsZSBub25jZQ==\r\nORIGIN: o\r\n\
SEC-WEBSOCKET-PROTOCOL: p\r\nX-FORWARDED-FOR: f\r\nX-REAL-IP: r\r\nAUTHORIZATION: BEARER t\r\n\r\n";
        for buf in [&lower[..], &upper[..]] {
            let req = parse_ok(buf);
            assert_eq!(req.validate_upgrade(), Ok(()));
            assert_eq!(req.host, Some("h"));
            assert_eq!(req.origin, Some("o"));
            assert_eq!(req.ws_protocol, Some("p"));
            assert_eq!(req.forwarded_for, Some("f"));
            assert_eq!(req.real_ip, Some("r"));
            assert_eq!(req.bearer_token(), Some("t"));
            assert_eq!(req.header("Sec-WebSocket-Key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        }
    }

    #[test]
    fn connection_token_lists() {
        for conn in [
            "Connection: keep-alive, Upgrade\r\n",
            "Connection: Upgrade,keep-alive\r\n",
            "Connection: keep-alive\r\nConnection: upgrade\r\n",
            "Connection: ,  upGRade ,\r\n",
        ] {
            let s = format!(
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n{conn}Sec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            let req = parse_ok(s.as_bytes());
            assert!(req.connection_upgrade, "{conn:?}");
            assert_eq!(req.validate_upgrade(), Ok(()), "{conn:?}");
        }
        for conn in ["Connection: keep-alive\r\n", "Connection: upgrades\r\n", "Connection: up grade\r\n", ""] {
            let s = format!("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n{conn}\r\n");
            let req = parse_ok(s.as_bytes());
            assert!(!req.connection_upgrade, "{conn:?}");
            assert_eq!(req.validate_upgrade(), Err(UpgradeError::MissingConnectionUpgrade));
        }
        let req = parse_ok(b"GET / HTTP/1.1\r\nUpgrade: h2c, WebSocket\r\n\r\n");
        assert!(req.upgrade);
        let req = parse_ok(b"GET / HTTP/1.1\r\nUpgrade: websocket/13\r\n\r\n");
        assert!(!req.upgrade);
    }

    #[test]
    fn keep_alive_rules() {
        assert!(parse_ok(b"GET / HTTP/1.1\r\n\r\n").keep_alive());
        assert!(!parse_ok(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
        assert!(!parse_ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(parse_ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
    }

    #[test]
    fn token_in_query_percent_encoded() {
        let req = parse_ok(b"GET /ws?x=1&token=a%2Bb%3Dc%25d+e&token=second HTTP/1.1\r\n\r\n");
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query_param("token").as_deref(), Some("a+b=c%d e"));
        assert_eq!(req.query_param("x"), Some(Cow::Borrowed("1")));
        let req = parse_ok(b"GET /ws?t%6Fken=x&flag&bad=%zz%4&utf=%C3%A9&inv=%FF HTTP/1.1\r\n\r\n");
        assert_eq!(req.query_param("token").as_deref(), Some("x"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("bad").as_deref(), Some("%zz%4"));
        assert_eq!(req.query_param("utf").as_deref(), Some("é"));
        assert_eq!(req.query_param("inv").as_deref(), Some("\u{fffd}"));
        assert_eq!(parse_ok(b"GET /ws HTTP/1.1\r\n\r\n").query_param("token"), None);
        assert_eq!(parse_ok(b"GET /ws? HTTP/1.1\r\n\r\n").query_param("token"), None);
    }

    #[test]
    fn token_in_authorization() {
        let cases: &[(&str, Option<&str>)] = &[
            ("Bearer abc.def", Some("abc.def")),
            ("bearer   abc.def  ", Some("abc.def")),
            ("BEARER\tabc", Some("abc")),
            ("Basic dXNlcjpwYXNz", None),
            ("Bearer", None),
            ("Bearer   ", None),
            ("Bearerabc", None),
        ];
        for (value, expected) in cases {
            let s = format!("GET /ws HTTP/1.1\r\nAuthorization: {value}\r\n\r\n");
            assert_eq!(parse_ok(s.as_bytes()).bearer_token(), *expected, "{value:?}");
        }
        assert_eq!(parse_ok(b"GET / HTTP/1.1\r\n\r\n").bearer_token(), None);
    }

    #[test]
    fn token_in_subprotocols() {
        let s = upgrade_with("Sec-WebSocket-Protocol: throng.v1, bearer.eyJ0.eyJzdWIiOiJ1In0.c2ln\r\n");
        let req = parse_ok(s.as_bytes());
        assert_eq!(req.subprotocols().collect::<Vec<_>>(), ["throng.v1", "bearer.eyJ0.eyJzdWIiOiJ1In0.c2ln"]);
        assert_eq!(req.subprotocol_bearer(), Some("eyJ0.eyJzdWIiOiJ1In0.c2ln"));
        assert!(req.offers_subprotocol("throng.v1"));
        // Repeated headers: ws_protocol keeps the first, the iterator sees all.
        let s = upgrade_with("Sec-WebSocket-Protocol: throng.v1\r\nSec-WebSocket-Protocol: ,bearer.t ,\r\n");
        let req = parse_ok(s.as_bytes());
        assert_eq!(req.ws_protocol, Some("throng.v1"));
        assert_eq!(req.subprotocols().collect::<Vec<_>>(), ["throng.v1", "bearer.t"]);
        assert_eq!(req.subprotocol_bearer(), Some("t"));
    }

    #[test]
    fn upgrade_rejections() {
        let cases: &[(&str, UpgradeError, u16)] = &[
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                UpgradeError::UnsupportedVersion,
                426,
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                UpgradeError::UnsupportedVersion,
                426,
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n",
                UpgradeError::MissingKey,
                400,
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n\r\n",
                UpgradeError::InvalidKey,
                400,
            ),
            (
                // 17 bytes
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
                UpgradeError::InvalidKey,
                400,
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n\r\n",
                UpgradeError::InvalidKey,
                400,
            ),
            (
                "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: not base64 at all!!!!!!\r\n\r\n",
                UpgradeError::InvalidKey,
                400,
            ),
            (
                "POST /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                UpgradeError::MethodNotAllowed,
                405,
            ),
            (
                "GET /ws HTTP/1.0\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                UpgradeError::HttpVersion,
                400,
            ),
            ("GET /ws HTTP/1.1\r\nHost: h\r\n\r\n", UpgradeError::MissingUpgrade, 426),
            (
                "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                UpgradeError::MissingHost,
                400,
            ),
        ];
        for (raw, expected, code) in cases {
            let req = parse_ok(raw.as_bytes());
            let err = req.validate_upgrade().unwrap_err();
            assert_eq!(err, *expected, "{raw:?}");
            assert_eq!(err.status().code(), *code, "{raw:?}");
            assert_eq!(err.to_string(), err.reason());
            let mut out = Vec::new();
            err.write_rejection(&mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {code} ")));
            assert_eq!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), *code == 426);
            assert!(text.contains(err.reason()));
        }
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        let req = parse_ok(b"POST /api/publish HTTP/1.1\r\nContent-Length: 42\r\n\r\n");
        assert_eq!(req.content_length, Some(42));
        assert_eq!(req.validate_upgrade(), Err(UpgradeError::MethodNotAllowed));
        assert_eq!(parse_ok(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").content_length, Some(0));
        for bad in ["", "-1", "+1", "1 2", "0x10", "1,1", "99999999999999999999999999"] {
            let s = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            let err = parse(s.as_bytes()).unwrap_err();
            assert_eq!(err, HandshakeError::InvalidContentLength, "{bad:?}");
            assert_eq!(err.status(), Status::BadRequest);
        }
        let err = parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n").unwrap_err();
        assert_eq!(err, HandshakeError::DuplicateContentLength);
        for te in ["chunked", "identity", "gzip, chunked"] {
            let s = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\nContent-Length: 1\r\n\r\n");
            let err = parse(s.as_bytes()).unwrap_err();
            assert_eq!(err, HandshakeError::UnsupportedTransferEncoding);
            assert_eq!(err.status(), Status::NotImplemented);
        }
    }

    #[test]
    fn duplicate_and_non_utf8_headers() {
        for name in ["Host", "Origin", "Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version"] {
            let s = format!("GET / HTTP/1.1\r\n{name}: a\r\n{}: b\r\n\r\n", name.to_ascii_lowercase());
            let err = parse(s.as_bytes()).unwrap_err();
            assert_eq!(err, HandshakeError::DuplicateHeader(name));
            assert_eq!(err.status(), Status::BadRequest);
            assert!(err.reason().contains(name));
        }
        let err = parse(b"GET / HTTP/1.1\r\nOrigin: \xff\r\n\r\n").unwrap_err();
        assert_eq!(err, HandshakeError::NonUtf8Header("Origin"));
        // Unknown headers may carry obs-text; `header` just does not return them.
        let req = parse_ok(b"GET / HTTP/1.1\r\nX-Odd: \xff\r\n\r\n");
        assert_eq!(req.header("x-odd"), None);
        assert_eq!(req.headers().next(), Some(("X-Odd", &b"\xff"[..])));
    }

    #[test]
    fn malformed_is_400() {
        for raw in [
            &b"GET /ws HTTP/1.1\r\nBad Header: x\r\n\r\n"[..],
            b"GET /ws HTTP/2.0\r\n\r\n",
            b"GET\x00 / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            let err = parse(raw).unwrap_err();
            assert!(matches!(err, HandshakeError::Malformed(_)), "{raw:?}: {err:?}");
            assert_eq!(err.status(), Status::BadRequest);
            let mut out = Vec::new();
            err.write_rejection(&mut out);
            assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        }
    }

    #[test]
    fn target_forms() {
        let req = parse_ok(b"GET http://example.com:8080/ws?token=t HTTP/1.1\r\n\r\n");
        assert_eq!((req.path, req.query), ("/ws", Some("token=t")));
        let req = parse_ok(b"GET HTTPS://example.com HTTP/1.1\r\n\r\n");
        assert_eq!((req.path, req.query), ("/", None));
        let req = parse_ok(b"GET /a/b#frag HTTP/1.1\r\n\r\n");
        assert_eq!((req.path, req.query), ("/a/b", None));
        let req = parse_ok(b"OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!(req.path, "*");
        let req = parse_ok(b"\r\nGET /x HTTP/1.1\r\n\r\n");
        assert_eq!((req.path, req.header_len), ("/x", 21));
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let req = parse_ok(
            b"GET /ws HTTP/1.1\nHost: h\nUpgrade: websocket\nConnection: upgrade\n\
Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n\n",
        );
        assert_eq!(req.validate_upgrade(), Ok(()));
    }

    #[test]
    fn error_tables() {
        assert_eq!(HandshakeError::HeadersTooLarge { limit: 10 }.to_string(), "request head exceeds 10 bytes");
        assert_eq!(HandshakeError::TooManyHeaders.to_string(), "more than 64 header fields");
        assert_eq!(HandshakeError::DuplicateHeader("X").reason(), "duplicate header");
        assert_eq!(HandshakeError::Malformed("invalid token").reason(), "invalid token");
    }
}
