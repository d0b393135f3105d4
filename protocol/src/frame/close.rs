//! Close codes (RFC 6455 section 7.4) and Throng's own 4xxx codes, and close-frame payload validation.

use super::ProtocolError;

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// Going away: the server is shutting down; reconnect elsewhere.
pub const GOING_AWAY: u16 = 1001;
/// Protocol error.
pub const PROTOCOL_ERROR: u16 = 1002;
/// Unsupported data type.
pub const UNSUPPORTED: u16 = 1003;
/// Invalid payload data (e.g. invalid UTF-8 in a text message).
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation.
pub const POLICY: u16 = 1008;
/// Message too big.
pub const TOO_BIG: u16 = 1009;
/// Internal error.
pub const INTERNAL: u16 = 1011;
/// Try again later: the server is overloaded.
pub const OVERLOADED: u16 = 1013;
/// Throng: the token expired.
pub const TOKEN_EXPIRED: u16 = 4001;
/// Throng: forbidden.
pub const FORBIDDEN: u16 = 4003;
/// Throng: the client read too slowly and its backlog overflowed.
pub const SLOW_CONSUMER: u16 = 4008;
/// Throng: rate limited.
pub const RATE_LIMITED: u16 = 4029;

/// Whether a peer may send `code` in a close frame. 1004-1006 and 1015 are reserved for local use and
/// never sent; other codes below 3000 are unassigned; 3000-4999 are for libraries and applications.
#[inline]
pub const fn is_valid_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Validates a received close frame's (unmasked) payload and returns its code, if any.
///
/// An empty payload is a close without a code; a 1-byte payload is malformed; otherwise the code must be
/// one a peer may send and the reason valid UTF-8.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::BadClosePayload),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !is_valid_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1013, 3000, 3999, 4000, 4008, 4999] {
            assert!(is_valid_code(ok), "{ok}");
        }
        // Autobahn 7.9.x: codes a peer must never send.
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!is_valid_code(bad), "{bad}");
        }
    }

    #[test]
    fn payloads() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(parse_close_payload(&[0x03]), Err(ProtocolError::BadClosePayload));
        assert_eq!(parse_close_payload(&[0x03, 0xE8]), Ok(Some(1000)));
        assert_eq!(parse_close_payload(b"\x03\xe8bye"), Ok(Some(1000)));
        assert_eq!(parse_close_payload(&[0x03, 0xED]), Err(ProtocolError::InvalidCloseCode(1005)));
        assert_eq!(parse_close_payload(&[0x03, 0xE8, 0xFF]), Err(ProtocolError::InvalidUtf8));
    }
}
