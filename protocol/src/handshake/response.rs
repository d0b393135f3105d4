//! HTTP responses written into a caller-owned buffer: the `101 Switching Protocols` that completes an upgrade,
//! JSON-bodied rejections, and plain responses for the engine's HTTP endpoints.
//!
//! Every writer only appends to `out`; nothing else is allocated. Header values handed in by the caller have
//! any CR and LF bytes dropped so that a stray value can never split a response.

use super::accept::accept_key;

/// The HTTP status codes Throng sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// 400: the request is malformed or the upgrade is not a valid WebSocket handshake.
    BadRequest = 400,
    /// 401: missing or invalid credentials (token).
    Unauthorized = 401,
    /// 403: authenticated but not allowed (origin, limits, permissions).
    Forbidden = 403,
    /// 404: no such endpoint.
    NotFound = 404,
    /// 405: the endpoint exists but not for this method (e.g. a `POST /ws`).
    MethodNotAllowed = 405,
    /// 411: a request body without a `Content-Length` (chunked transfer coding is not accepted).
    LengthRequired = 411,
    /// 413: the request body is larger than the engine accepts.
    PayloadTooLarge = 413,
    /// 426: a WebSocket endpoint reached without a usable upgrade (carries `Sec-WebSocket-Version: 13`).
    UpgradeRequired = 426,
    /// 429: rate or connection limit reached for this client.
    TooManyRequests = 429,
    /// 431: the header block is too large or has too many fields.
    HeaderFieldsTooLarge = 431,
    /// 500: a bug or an unexpected failure in the engine.
    InternalServerError = 500,
    /// 501: a feature of HTTP the engine does not implement (e.g. chunked request bodies).
    NotImplemented = 501,
    /// 503: draining or overloaded; try another node or later.
    ServiceUnavailable = 503,
    /// 200: success.
    Ok = 200,
    /// 204: success without a body.
    NoContent = 204,
}

impl Status {
    /// Every status, for tests and tables.
    pub const ALL: [Status; 15] = [
        Status::BadRequest,
        Status::Unauthorized,
        Status::Forbidden,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::LengthRequired,
        Status::PayloadTooLarge,
        Status::UpgradeRequired,
        Status::TooManyRequests,
        Status::HeaderFieldsTooLarge,
        Status::InternalServerError,
        Status::NotImplemented,
        Status::ServiceUnavailable,
        Status::Ok,
        Status::NoContent,
    ];

    /// The numeric status code, e.g. `426`.
    #[must_use]
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The status for a numeric code, if it is one Throng uses.
    #[must_use]
    pub fn from_code(code: u16) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The standard reason phrase for the status line, e.g. `"Upgrade Required"`.
    #[must_use]
    pub const fn reason_phrase(self) -> &'static str {
        match self {
            Status::BadRequest => "Bad Request",
            Status::Unauthorized => "Unauthorized",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::LengthRequired => "Length Required",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::UpgradeRequired => "Upgrade Required",
            Status::TooManyRequests => "Too Many Requests",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::Ok => "OK",
            Status::NoContent => "No Content",
        }
    }

    /// The `snake_case` machine code used in JSON error bodies (`{"error":"<code>",...}`), e.g.
    /// `"upgrade_required"`. The success statuses give `"ok"` and `"no_content"`.
    #[must_use]
    pub const fn error_code(self) -> &'static str {
        match self {
            Status::BadRequest => "bad_request",
            Status::Unauthorized => "unauthorized",
            Status::Forbidden => "forbidden",
            Status::NotFound => "not_found",
            Status::MethodNotAllowed => "method_not_allowed",
            Status::LengthRequired => "length_required",
            Status::PayloadTooLarge => "payload_too_large",
            Status::UpgradeRequired => "upgrade_required",
            Status::TooManyRequests => "too_many_requests",
            Status::HeaderFieldsTooLarge => "header_fields_too_large",
            Status::InternalServerError => "internal_error",
            Status::NotImplemented => "not_implemented",
            Status::ServiceUnavailable => "unavailable",
            Status::Ok => "ok",
            Status::NoContent => "no_content",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.reason_phrase())
    }
}

/// Writes the `101 Switching Protocols` response that accepts a WebSocket upgrade.
///
/// `key` is the client's `Sec-WebSocket-Key` (see [`Request::ws_key`](super::Request::ws_key)); `protocol`
/// is the selected subprotocol, which must be one the client offered. (Browsers fail the connection when
/// they offered subprotocols and the response selects none, so echo e.g. `throng.v1`.) The bytes are
/// exactly:
///
/// ```text
/// HTTP/1.1 101 Switching Protocols\r\n
/// Upgrade: websocket\r\n
/// Connection: Upgrade\r\n
/// Sec-WebSocket-Accept: <accept>\r\n
/// [Sec-WebSocket-Protocol: <protocol>\r\n]
/// \r\n
/// ```
pub fn write_switching_protocols(out: &mut Vec<u8>, key: &[u8], protocol: Option<&str>) {
    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: ";
    let accept = accept_key(key);
    out.reserve(HEAD.len() + accept.len() + 4 + protocol.map_or(0, |p| p.len() + 26));
    out.extend_from_slice(HEAD);
    out.extend_from_slice(&accept);
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        write_header_value(out, p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a rejection of a request: a JSON body naming the error, and `Connection: close`.
///
/// The bytes are exactly:
///
/// ```text
/// HTTP/1.1 <code> <phrase>\r\n
/// Content-Type: application/json\r\n
/// Content-Length: <n>\r\n
/// Connection: close\r\n
/// [Sec-WebSocket-Version: 13\r\n]          (only for 426 Upgrade Required)
/// \r\n
/// {"error":"<status.error_code()>","reason":"<reason, JSON-escaped>"}
/// ```
pub fn write_rejection(out: &mut Vec<u8>, status: Status, reason: &str) {
    write_rejection_with(out, status, reason, &[]);
}

/// [`write_rejection`] with extra header fields (`Retry-After` on a 429, say), written after
/// `Connection: close`. Names and values must not contain CR or LF (they are the caller's constants).
pub fn write_rejection_with(out: &mut Vec<u8>, status: Status, reason: &str, extra_headers: &[(&str, &str)]) {
    const BODY_OPEN: &[u8] = b"{\"error\":\"";
    const BODY_MID: &[u8] = b"\",\"reason\":";
    let code = status.error_code();
    let body_len = BODY_OPEN.len() + code.len() + BODY_MID.len() + json_str_len(reason) + 1;
    out.reserve(160 + body_len);
    write_status_line(out, status);
    out.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
    write_decimal(out, body_len);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    if status == Status::UpgradeRequired {
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    }
    for (name, value) in extra_headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(BODY_OPEN);
    out.extend_from_slice(code.as_bytes());
    out.extend_from_slice(BODY_MID);
    write_json_str(out, reason);
    out.push(b'}');
}

/// Writes a plain HTTP/1.1 response for the engine's HTTP endpoints (`/health`, `/metrics`, `/stats`, the API).
///
/// Layout: the status line, `Content-Type: <content_type>` (omitted when `content_type` is empty),
/// `Content-Length: <body.len()>`, each of `extra_headers` as `name: value`, `Connection: close` when
/// `!keep_alive`, the blank line, then `body`.
///
/// `204 No Content` is the one exception to "Content-Length always": RFC 9110 forbids the header on a 204,
/// so for [`Status::NoContent`] neither `Content-Length` nor the body is written.
pub fn write_response(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    let no_body = status == Status::NoContent;
    let extra: usize = extra_headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    out.reserve(128 + content_type.len() + extra + if no_body { 0 } else { body.len() });
    write_status_line(out, status);
    if !content_type.is_empty() {
        out.extend_from_slice(b"Content-Type: ");
        write_header_value(out, content_type);
        out.extend_from_slice(b"\r\n");
    }
    if !no_body {
        out.extend_from_slice(b"Content-Length: ");
        write_decimal(out, body.len());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra_headers {
        write_header_value(out, name);
        out.extend_from_slice(b": ");
        write_header_value(out, value);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !no_body {
        out.extend_from_slice(body);
    }
}

/// Writes `s` as a JSON string literal: surrounding double quotes, `"` and `\` backslash-escaped, and every
/// control character (U+0000..=U+001F) as `\u00XX`. Everything else, including non-ASCII UTF-8, is copied.
///
/// ```
/// let mut out = Vec::new();
/// throng_protocol::handshake::write_json_str(&mut out, "a\"b\\c\n");
/// assert_eq!(out, br#""a\"b\\c\u000a""#);
/// ```
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The number of bytes [`write_json_str`] writes for `s`, quotes included.
#[must_use]
pub fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn write_status_line(out: &mut Vec<u8>, status: Status) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write_decimal(out, usize::from(status.code()));
    out.push(b' ');
    out.extend_from_slice(status.reason_phrase().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a header name or value, dropping CR and LF so it can never end the header line early.
fn write_header_value(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(bytes.iter().copied().filter(|&b| b != b'\r' && b != b'\n'));
    } else {
        out.extend_from_slice(bytes);
    }
}

/// Appends `n` in decimal without going through `fmt`.
fn write_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789"[n % 10];
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {

    #[test]
    fn rejection_with_extra_headers() {
        let mut out = Vec::new();
        write_rejection_with(&mut out, Status::TooManyRequests, "slow down", &[("Retry-After", "2")]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{text}");
        assert!(
            text.contains("\r\nConnection: close\r\nRetry-After: 2\r\n\r\n{\"error\":\"too_many_requests\""),
            "{text}"
        );
    }

    use super::*;

    fn s(v: &[u8]) -> &str {
        std::str::from_utf8(v).unwrap()
    }

    #[test]
    fn switching_protocols_exact_bytes() {
        let mut out = Vec::new();
        write_switching_protocols(&mut out, b"dGhlIHNhbXBsZSBub25jZQ==", None);
        assert_eq!(
            s(&out),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn switching_protocols_with_protocol_exact_bytes() {
        let mut out = b"prefix".to_vec();
        write_switching_protocols(&mut out, b"dGhlIHNhbXBsZSBub25jZQ==", Some("throng.v1"));
        assert_eq!(
            s(&out),
            "prefixHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: throng.v1\r\n\r\n"
        );
    }

    #[test]
    fn switching_protocols_strips_crlf_from_protocol() {
        let mut out = Vec::new();
        write_switching_protocols(&mut out, b"k", Some("a\r\nSet-Cookie: x"));
        assert!(s(&out).contains("Sec-WebSocket-Protocol: aSet-Cookie: x\r\n\r\n"));
        assert_eq!(s(&out).matches("\r\n").count(), 6);
    }

    #[test]
    fn rejection_exact_bytes() {
        let mut out = Vec::new();
        write_rejection(&mut out, Status::Unauthorized, "token expired");
        assert_eq!(
            s(&out),
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 49\r\n\
             Connection: close\r\n\r\n{\"error\":\"unauthorized\",\"reason\":\"token expired\"}"
        );
    }

    #[test]
    fn rejection_426_carries_version() {
        let mut out = Vec::new();
        write_rejection(&mut out, Status::UpgradeRequired, "Sec-WebSocket-Version must be 13");
        let body = r#"{"error":"upgrade_required","reason":"Sec-WebSocket-Version must be 13"}"#;
        assert_eq!(
            s(&out),
            format!(
                "HTTP/1.1 426 Upgrade Required\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\nSec-WebSocket-Version: 13\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[test]
    fn rejection_for_every_status_has_valid_json_and_length() {
        for status in Status::ALL {
            let reason = "quote \" backslash \\ newline \n nul \0 tab \t unicode é ✓";
            let mut out = Vec::new();
            write_rejection(&mut out, status, reason);
            let text = s(&out);
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason_phrase())));
            assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
            assert_eq!(head.contains("Sec-WebSocket-Version: 13"), status == Status::UpgradeRequired);
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"], status.error_code());
            assert_eq!(v["reason"], reason);
        }
    }

    #[test]
    fn status_tables() {
        assert_eq!(Status::HeaderFieldsTooLarge.code(), 431);
        assert_eq!(Status::InternalServerError.error_code(), "internal_error");
        assert_eq!(Status::ServiceUnavailable.error_code(), "unavailable");
        assert_eq!(Status::UpgradeRequired.to_string(), "426 Upgrade Required");
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Some(status));
            assert!(status.error_code().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(Status::from_code(418), None);
    }

    #[test]
    fn json_str_escaping() {
        let cases: &[(&str, &str)] = &[
            ("", r#""""#),
            ("plain", r#""plain""#),
            ("\"", r#""\"""#),
            ("\\", r#""\\""#),
            ("\u{1}\u{1f}", r#""\u0001\u001f""#),
            ("\r\n", r#""\u000d\u000a""#),
            ("\u{7f}é", "\"\u{7f}é\""),
        ];
        for (input, expected) in cases {
            let mut out = Vec::new();
            write_json_str(&mut out, input);
            assert_eq!(s(&out), *expected);
            assert_eq!(json_str_len(input), out.len());
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, *input);
        }
    }

    #[test]
    fn plain_response_exact_bytes() {
        let mut out = Vec::new();
        write_response(&mut out, Status::Ok, "text/plain", &[("Cache-Control", "no-store")], b"ok\n", false);
        assert_eq!(
            s(&out),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nCache-Control: no-store\r\n\
             Connection: close\r\n\r\nok\n"
        );
        out.clear();
        write_response(&mut out, Status::NotFound, "application/json", &[], b"", true);
        assert_eq!(s(&out), "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn no_content_has_no_length_or_body() {
        let mut out = Vec::new();
        write_response(&mut out, Status::NoContent, "", &[], b"ignored", true);
        assert_eq!(s(&out), "HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn decimal() {
        for n in [0usize, 7, 10, 99, 100, 8192, usize::MAX] {
            let mut out = Vec::new();
            write_decimal(&mut out, n);
            assert_eq!(s(&out), n.to_string());
        }
    }
}
