//! HS256 JSON Web Tokens, minted once per connection for servers that check them (`--jwt-secret`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `{"alg":"HS256","typ":"JWT"}`, base64url-encoded.
const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// Mints an HS256 token for user `sub`, valid for an hour from `now_unix`, allowed to subscribe and
/// publish to every channel (`"channels":["*"]`, `"publish":["*"]`).
pub fn mint_hs256(secret: &[u8], sub: &str, now_unix: u64) -> String {
    let claims = format!(
        "{{\"sub\":\"{sub}\",\"iat\":{now_unix},\"exp\":{},\"channels\":[\"*\"],\"publish\":[\"*\"]}}",
        now_unix + 3600
    );
    let mut token = String::with_capacity(256);
    token.push_str(HEADER_B64);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims.as_bytes(), &mut token);
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(token.as_bytes());
    let sig = mac.finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(sig, &mut token);
    token
}

/// Seconds since the Unix epoch (JWT times are wall-clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constant_matches() {
        assert_eq!(URL_SAFE_NO_PAD.decode(HEADER_B64).unwrap(), br#"{"alg":"HS256","typ":"JWT"}"#);
    }

    #[test]
    fn rfc7515_style_signature() {
        // Signature checked independently: HMAC-SHA256 over "header.claims" with the same key.
        let t = mint_hs256(b"secret", "u1", 1_700_000_000);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(claims["sub"], "u1");
        assert_eq!(claims["exp"], 1_700_003_600u64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    }
}
