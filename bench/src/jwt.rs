//! JSON Web Tokens for servers that check them, minted with `jsonwebtoken`: HS256 with a shared secret
//! (`--jwt-secret`), RS256 or ES256 with a PEM private key (`--jwt-private-key`).
//!
//! The key is parsed once, into a [`Minter`], when the arguments are validated; a probe token is signed
//! then, so a key that cannot sign (an EC key on another curve than P-256, an RSA key outside 2048-4096 bits) is
//! refused before anything connects. Every connection gets its own token (`sub` = `bench-<index>`), minted
//! by its thread before the connect ramp starts (see `client`), never on the message path.
//!
//! Claims: `sub`, `iat` (now), `exp` (now + `--jwt-ttl`), `channels` and `publish` (`["*"]`: every
//! channel), `iss` and `aud` when given, and `--jwt-claims` merged over them (it may replace `channels`,
//! `publish`, `iss`, `aud` or add claims; `sub`, `iat` and `exp` are the bench's).

use std::fmt;

use clap::ValueEnum;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;

/// Token lifetime when `--jwt-ttl` is not given, seconds.
pub const DEFAULT_TTL_S: u64 = 3600;

/// The signing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Alg {
    /// HMAC-SHA256 with a shared secret.
    #[value(name = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, with an RSA private key (2048 to 4096 bits).
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA with P-256 and SHA-256, with an EC P-256 (`prime256v1`) private key.
    #[value(name = "ES256")]
    Es256,
}

impl Alg {
    /// The name in the JWT header (`HS256`, `RS256`, `ES256`).
    pub fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Alg::Hs256 => Algorithm::HS256,
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }
}

/// Where the upgrade request carries the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenIn {
    /// `?token=<t>` on the request path (`&token=` when the path has a query).
    Query,
    /// `Authorization: Bearer <t>`.
    Header,
    /// `Sec-WebSocket-Protocol: throng.v1, bearer.<t>`; the server must select `throng.v1`.
    Subprotocol,
}

impl TokenIn {
    /// The name as typed.
    pub fn name(self) -> &'static str {
        match self {
            TokenIn::Query => "query",
            TokenIn::Header => "header",
            TokenIn::Subprotocol => "subprotocol",
        }
    }
}

/// The subprotocol offered next to the token with `--token-in subprotocol`, and the one the server must
/// select.
pub const SUBPROTOCOL: &str = "throng.v1";

/// What goes into every token besides the key.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    /// Lifetime: `exp` = `iat` + this many seconds (0: [`DEFAULT_TTL_S`]).
    pub ttl_s: u64,
    /// `iss`, when set.
    pub issuer: Option<String>,
    /// `aud`: one value as a string, several as an array; none leaves it out.
    pub audience: Vec<String>,
    /// `kid` in the header, when set.
    pub kid: Option<String>,
    /// Extra claims, a JSON object merged over the defaults.
    pub extra: Option<String>,
}

/// Signs tokens for one key and one set of claims.
#[derive(Clone)]
pub struct Minter {
    alg: Alg,
    key: EncodingKey,
    header: Header,
    ttl_s: u64,
    /// Every claim but `sub`, `iat` and `exp`.
    fixed: Map<String, Value>,
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Minter")
            .field("alg", &self.alg)
            .field("ttl_s", &self.ttl_s)
            .field("claims", &self.fixed)
            .finish()
    }
}

/// The claims of one token, in this order: `sub`, `iat`, `exp`, then the fixed ones.
#[derive(Serialize)]
struct TokenClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(flatten)]
    fixed: &'a Map<String, Value>,
}

fn config(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

impl Minter {
    /// HS256 with `secret`.
    pub fn hs256(secret: &[u8], claims: &Claims) -> Result<Minter, Error> {
        if secret.is_empty() {
            return Err(config("--jwt-secret is empty"));
        }
        Minter::new(Alg::Hs256, EncodingKey::from_secret(secret), claims)
    }

    /// RS256 or ES256 with the PEM private key `pem`: an RSA key (PKCS#1 `RSA PRIVATE KEY` or PKCS#8
    /// `PRIVATE KEY`) for RS256, an EC P-256 key in PKCS#8 (`PRIVATE KEY`) for ES256. Without `alg` the
    /// algorithm follows from the key's type; with it, the key must be of that type. `source` names the key
    /// in errors.
    pub fn from_pem(pem: &[u8], alg: Option<Alg>, claims: &Claims, source: &str) -> Result<Minter, Error> {
        let text = String::from_utf8_lossy(pem);
        if text.contains("-----BEGIN EC PRIVATE KEY-----") {
            return Err(config(format!(
                "{source}: an EC key in SEC1 form (`EC PRIVATE KEY`); ES256 needs PKCS#8 (`PRIVATE KEY`): convert it \
                 with `openssl pkcs8 -topk8 -nocrypt -in {source} -out key.pem`"
            )));
        }
        if text.contains("PUBLIC KEY-----") || text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(config(format!(
                "{source}: a public key or certificate; the bench signs tokens, so it needs the private key"
            )));
        }
        let (found, key) = match (EncodingKey::from_rsa_pem(pem), EncodingKey::from_ec_pem(pem)) {
            (Ok(k), _) => (Alg::Rs256, k),
            (_, Ok(k)) => (Alg::Es256, k),
            (Err(e), _) => {
                return Err(config(format!(
                    "{source}: not an RSA or EC private key in PEM (PKCS#1 `RSA PRIVATE KEY`, or PKCS#8 `PRIVATE \
                     KEY` holding an RSA or EC P-256 key): {e}"
                )))
            }
        };
        match alg {
            None => {}
            Some(Alg::Hs256) => {
                return Err(config("--jwt-alg HS256 takes --jwt-secret, not a private key file"));
            }
            Some(a) if a != found => {
                let kind = if found == Alg::Rs256 { "an RSA" } else { "an EC" };
                return Err(config(format!(
                    "--jwt-alg {} does not fit {source}: it holds {kind} key, which signs {}",
                    a.name(),
                    found.name()
                )));
            }
            Some(_) => {}
        }
        let m = Minter::new(found, key, claims)?;
        // ring checks the key when it signs (size, curve): find out now, not per connection.
        m.mint("bench-probe", unix_now()).map_err(|e| {
            let need = if found == Alg::Rs256 { "an RSA key of 2048 to 4096 bits" } else { "a P-256 (prime256v1) key" };
            config(format!("{source}: cannot sign {} with this key ({} needs {need}): {e}", found.name(), found.name()))
        })?;
        Ok(m)
    }

    fn new(alg: Alg, key: EncodingKey, c: &Claims) -> Result<Minter, Error> {
        let mut fixed = Map::new();
        fixed.insert("channels".into(), Value::from(vec!["*"]));
        fixed.insert("publish".into(), Value::from(vec!["*"]));
        if let Some(iss) = &c.issuer {
            fixed.insert("iss".into(), Value::from(iss.as_str()));
        }
        match c.audience.as_slice() {
            [] => {}
            [one] => {
                fixed.insert("aud".into(), Value::from(one.as_str()));
            }
            many => {
                fixed.insert("aud".into(), Value::from(many.to_vec()));
            }
        }
        if let Some(extra) = &c.extra {
            let v: Value =
                serde_json::from_str(extra).map_err(|e| config(format!("--jwt-claims is not valid JSON: {e}")))?;
            let Value::Object(extra) = v else { return Err(config("--jwt-claims must be a JSON object")) };
            for k in ["sub", "iat", "exp"] {
                if extra.contains_key(k) {
                    return Err(config(format!(
                        "--jwt-claims may not set `{k}`: the bench sets sub (bench-<n>), iat and exp (--jwt-ttl)"
                    )));
                }
            }
            fixed.extend(extra);
        }
        let mut header = Header::new(alg.jwt());
        header.kid = c.kid.clone();
        let ttl_s = if c.ttl_s == 0 { DEFAULT_TTL_S } else { c.ttl_s };
        Ok(Minter { alg, key, header, ttl_s, fixed })
    }

    /// The algorithm.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Token lifetime, seconds.
    pub fn ttl_s(&self) -> u64 {
        self.ttl_s
    }

    /// A token for user `sub`, issued at `now_unix` (seconds since the Unix epoch).
    pub fn mint(&self, sub: &str, now_unix: u64) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = TokenClaims { sub, iat: now_unix, exp: now_unix + self.ttl_s, fixed: &self.fixed };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
    }
}

/// The `sub` of connection `gidx`.
pub fn subject(gidx: u64) -> String {
    format!("bench-{gidx}")
}

/// Seconds since the Unix epoch (JWT times are wall-clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
    use sha2::Sha256;

    use super::*;

    fn claims_of(token: &str, secret: &[u8], v: &Validation) -> Value {
        decode::<Value>(token, &DecodingKey::from_secret(secret), v).unwrap().claims
    }

    #[test]
    fn hs256_round_trip_carries_the_claims() {
        let m = Minter::hs256(b"secret", &Claims::default()).unwrap();
        let now = unix_now();
        let t = m.mint("bench-7", now).unwrap();
        let h = decode_header(&t).unwrap();
        assert_eq!((h.alg, h.typ.as_deref(), h.kid), (Algorithm::HS256, Some("JWT"), None));
        let c = claims_of(&t, b"secret", &Validation::new(Algorithm::HS256));
        assert_eq!(c["sub"], "bench-7");
        assert_eq!((c["iat"].as_u64(), c["exp"].as_u64()), (Some(now), Some(now + 3600)));
        assert_eq!((c["channels"].clone(), c["publish"].clone()), (serde_json::json!(["*"]), serde_json::json!(["*"])));
        assert!(c.get("iss").is_none() && c.get("aud").is_none());
        // The wrong secret does not verify.
        assert!(decode::<Value>(&t, &DecodingKey::from_secret(b"other"), &Validation::new(Algorithm::HS256)).is_err());
        // Characters that go into a query, a header and a subprotocol token unescaped.
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{t}");
    }

    #[test]
    fn hs256_signature_checked_independently() {
        // The old hand-written signer's check, kept: HMAC-SHA256 over "header.claims" (base64url, no padding)
        // with the same key, computed apart from jsonwebtoken.
        let t = Minter::hs256(b"secret", &Claims::default()).unwrap().mint("u1", 1_700_000_000).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"typ": "JWT", "alg": "HS256"}));
        let claims = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();
        assert_eq!(
            std::str::from_utf8(&claims).unwrap(),
            r#"{"sub":"u1","iat":1700000000,"exp":1700003600,"channels":["*"],"publish":["*"]}"#
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    }

    #[test]
    fn issuer_audience_kid_ttl_and_extra_claims() {
        let c = Claims {
            ttl_s: 60,
            issuer: Some("bench-iss".into()),
            audience: vec!["throng".into()],
            kid: Some("k1".into()),
            extra: Some(r#"{"channels":["bench:*"],"role":"load"}"#.into()),
        };
        let m = Minter::hs256(b"s", &c).unwrap();
        let now = unix_now();
        let t = m.mint("bench-0", now).unwrap();
        assert_eq!(decode_header(&t).unwrap().kid.as_deref(), Some("k1"));
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["bench-iss"]);
        v.set_audience(&["throng"]);
        let got = claims_of(&t, b"s", &v);
        assert_eq!(got["exp"].as_u64(), Some(now + 60));
        assert_eq!(got["channels"], serde_json::json!(["bench:*"]));
        assert_eq!((got["publish"].clone(), got["role"].clone()), (serde_json::json!(["*"]), "load".into()));
        // Several audiences: an array.
        let c = Claims { audience: vec!["a".into(), "b".into()], ..Claims::default() };
        let t = Minter::hs256(b"s", &c).unwrap().mint("x", now).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["b"]);
        assert_eq!(claims_of(&t, b"s", &v)["aud"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn bad_claims_and_keys_are_refused() {
        let bad = |extra: &str| {
            let c = Claims { extra: Some(extra.into()), ..Claims::default() };
            Minter::hs256(b"s", &c).unwrap_err().to_string()
        };
        assert!(bad("[1]").contains("object"));
        assert!(bad("{").contains("valid JSON"));
        assert!(bad(r#"{"exp":1}"#).contains("`exp`"));
        assert!(Minter::hs256(b"", &Claims::default()).is_err());
        let pem = |s: &str| Minter::from_pem(s.as_bytes(), None, &Claims::default(), "k.pem").unwrap_err().to_string();
        assert!(pem("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").contains("pkcs8"));
        assert!(pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").contains("private key"));
        assert!(pem("not a key").contains("not an RSA or EC private key"));
    }
}
