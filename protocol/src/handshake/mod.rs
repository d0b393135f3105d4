//! The HTTP/1.1 side of a connection: parsing the request head, validating a WebSocket upgrade, computing
//! `Sec-WebSocket-Accept`, and writing the `101 Switching Protocols` or an error response.
//!
//! Sans-IO: the engine appends received bytes to a buffer and calls [`parse_request`] until it returns
//! `Ok(Some(request))` (or an error, answered with [`HandshakeError::write_rejection`] and a close). A
//! WebSocket request is then checked with [`Request::validate_upgrade`]; authentication (the token from
//! [`Request::query_param`]`("token")`, [`Request::bearer_token`] or [`Request::subprotocol_bearer`]) and
//! origin checks are the engine's, answered with [`write_rejection`]. Acceptance is
//! [`write_switching_protocols`]; everything after `request.header_len` is already WebSocket frames.
//! Plain HTTP endpoints answer with [`write_response`].
//!
//! ```
//! use throng_protocol::handshake::{parse_request, write_switching_protocols, DEFAULT_MAX_HEADER_BYTES};
//!
//! let buf = b"GET /ws?token=abc HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
//! Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
//! let req = parse_request(buf, DEFAULT_MAX_HEADER_BYTES).unwrap().expect("complete");
//! assert_eq!(req.path, "/ws");
//! assert_eq!(req.query_param("token").as_deref(), Some("abc"));
//! req.validate_upgrade().unwrap();
//!
//! let mut out = Vec::new();
//! write_switching_protocols(&mut out, req.ws_key.unwrap_or_default().as_bytes(), None);
//! assert!(out.ends_with(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
//! ```

mod accept;
mod request;
mod response;

pub use accept::{accept_key, ACCEPT_KEY_LEN, WEBSOCKET_GUID};
pub use request::{parse_request, HandshakeError, Request, UpgradeError, DEFAULT_MAX_HEADER_BYTES, MAX_HEADERS};
pub use response::{
    json_str_len, write_json_str, write_rejection, write_rejection_with, write_response, write_switching_protocols,
    Status,
};
