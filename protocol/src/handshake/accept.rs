//! `Sec-WebSocket-Accept`: the server's proof that it read the client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key before hashing.
pub const WEBSOCKET_GUID: &[u8; 36] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Length of a `Sec-WebSocket-Accept` value: base64 (with padding) of a 20-byte SHA-1 digest.
pub const ACCEPT_KEY_LEN: usize = 28;

/// Computes the `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
///
/// The result is `base64(SHA-1(key ++ "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))`, standard alphabet with
/// padding: always 28 ASCII bytes. `key` is used exactly as sent (already trimmed of surrounding
/// whitespace by the parser); it is not validated here, see
/// [`Request::validate_upgrade`](super::Request::validate_upgrade).
///
/// ```
/// use throng_protocol::handshake::accept_key;
/// assert_eq!(&accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
/// ```
#[must_use]
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_KEY_LEN] {
    let mut hasher = Sha1::new();
    hasher.update(key);
    hasher.update(WEBSOCKET_GUID);
    let digest = hasher.finalize();
    let mut out = [0u8; ACCEPT_KEY_LEN];
    // 20 bytes always encode to exactly 28 padded base64 bytes, so this cannot fail; fall back to the
    // zeroed buffer rather than panic.
    let written = base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut out).unwrap_or(0);
    debug_assert_eq!(written, ACCEPT_KEY_LEN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_section_1_3_vector() {
        assert_eq!(&accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn matches_tungstenite() {
        for key in [
            &b"dGhlIHNhbXBsZSBub25jZQ=="[..],
            b"x3JJHMbDL1EzLkh9GBhXDw==",
            b"AQIDBAUGBwgJCgsMDQ4PEC==",
            b"",
            b"not even base64 \xff\x00",
        ] {
            let ours = accept_key(key);
            let theirs = tungstenite::handshake::derive_accept_key(key);
            assert_eq!(&ours[..], theirs.as_bytes(), "key {key:?}");
        }
    }
}
