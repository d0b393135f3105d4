//! Fuzz JWT extraction and verification (`throng::auth`): `token_of` on parsed upgrade requests, and
//! `Auth::verify` with four verifiers built once: HS256 (leeway 5 s); HS256 with an issuer and an audience,
//! leeway 0 and a 1024-byte bound; RS256 and ES256 with the test-only public keys in `engine/fuzz/keys/`.
//! The first byte picks a mode (`byte % 4`, so the seeds can start with an ASCII digit):
//!
//! - `0`: the rest is an upgrade request: `parse_request`, `token_of`, then every verifier on the token.
//!   A borrowed token lies inside the input; a token in more than one place is an error, and in one place
//!   it is exactly that place's value.
//! - `1`: header JSON, a newline, payload JSON (arbitrary bytes), base64url-encoded and correctly signed
//!   with the HS256 secret. The same token with a signature character changed, signed with another secret,
//!   or signed with a public PEM as an HMAC secret (HS/RS and HS/ES confusion) is never accepted; placed in
//!   each of the three places of a valid upgrade request it is extracted exactly and verifies the same; in
//!   two places at once it is refused.
//! - `2`: claims built from the bytes (a `sub` near 128 bytes from a charset that sometimes has invalid
//!   characters, lists near 64 items, `exp`, `nbf`, `iss`, `aud` in the past, the leeway, the future, or of
//!   the wrong type) under a fixed HS256 header: the result must be what an independent rule says, the
//!   error's variant one of the rule's violations.
//! - `3`: the rest (UTF-8, lossily) is the token, for every verifier; then tokens just over each bound
//!   (a validly signed one, and the input padded) are `TooLarge` without being decoded, and a validly
//!   signed one at the bound verifies.
//!
//! Whenever a verifier accepts a token, in any mode, the token is decoded here independently and must
//! have three parts; a header naming the verifier's algorithm; for HS256, the signature of the first two
//! parts with the secret; a payload object whose `sub` is the identity's user and a valid user name, whose
//! `exp` has not passed and whose `nbf` has come (both within the leeway), whose lists are the identity's
//! and within bounds, and whose `iss` and `aud` match when the verifier requires them.
#![no_main]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};
use throng::auth::{token_of, valid_user, Auth, Identity, TokenError, MAX_CLAIM_ITEMS, MAX_CLAIM_ITEM_BYTES};
use throng::config::{AuthConfig, JwtAlg, JwtKey};
use throng_protocol::handshake::parse_request;

fuzz_target!(|data: &[u8]| {
    let _ = check(data);
});

/// The HS256 secret of both HMAC verifiers. Test only.
pub const SECRET: &str = "throng token fuzzing secret, test only, 32+ bytes";
/// A secret no verifier has.
pub const OTHER_SECRET: &str = "another secret of thirty-two bytes, not configured";
/// The issuer and audience the second verifier requires.
pub const ISSUER: &str = "https://issuer.example/throng";
/// See [`ISSUER`].
pub const AUDIENCE: &str = "throng-fuzz";
/// The test-only public keys (with an explanatory line before the PEM block, which the parser skips).
pub const RS256_PEM: &[u8] = include_bytes!("../keys/test_only_rs256_public.pem");
/// See [`RS256_PEM`].
pub const ES256_PEM: &[u8] = include_bytes!("../keys/test_only_es256_public.pem");
/// The default `max_token_bytes`.
pub const MAX_TOKEN: usize = 4096;
/// The second verifier's bound, so short inputs reach it too.
pub const MAX_TOKEN_SMALL: usize = 1024;

/// Indices into [`verifiers`].
pub const HS: usize = 0;
/// HS256 with issuer, audience, leeway 0.
pub const HS_ISS_AUD: usize = 1;
/// RS256.
pub const RS: usize = 2;
/// ES256.
pub const ES: usize = 3;

/// A verifier and what the oracle knows of its configuration.
#[derive(Debug)]
pub struct Verifier {
    pub name: &'static str,
    pub auth: Auth,
    pub alg: &'static str,
    pub leeway: u64,
    pub max: usize,
    pub iss_aud: bool,
}

/// The four verifiers, built once.
pub fn verifiers() -> &'static [Verifier; 4] {
    static V: OnceLock<[Verifier; 4]> = OnceLock::new();
    V.get_or_init(|| {
        let make = |name, key, alg: JwtAlg, alg_name, leeway, max, iss_aud: bool| {
            let cfg = AuthConfig {
                key: Some((key, alg)),
                leeway,
                issuer: iss_aud.then(|| ISSUER.to_string()),
                audience: iss_aud.then(|| AUDIENCE.to_string()),
                max_token_bytes: max,
            };
            let auth = Auth::new(&cfg).expect("valid key").expect("a key is configured");
            Verifier { name, auth, alg: alg_name, leeway, max, iss_aud }
        };
        let pem = |bytes: &[u8], path: &str| JwtKey::Pem(bytes.to_vec(), path.into());
        [
            make("HS256", JwtKey::Secret(SECRET.into()), JwtAlg::Hs256, "HS256", 5, MAX_TOKEN, false),
            make("HS256+iss+aud", JwtKey::Secret(SECRET.into()), JwtAlg::Hs256, "HS256", 0, MAX_TOKEN_SMALL, true),
            make(
                "RS256",
                pem(RS256_PEM, "keys/test_only_rs256_public.pem"),
                JwtAlg::Rs256,
                "RS256",
                5,
                MAX_TOKEN,
                false,
            ),
            make(
                "ES256",
                pem(ES256_PEM, "keys/test_only_es256_public.pem"),
                JwtAlg::Es256,
                "ES256",
                5,
                MAX_TOKEN,
                false,
            ),
        ]
    })
}

/// How `token_of` answered (mode 0 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extraction {
    /// Not mode 0, or the bytes are not a complete request.
    NotARequest,
    /// No token anywhere.
    NoToken,
    /// One token.
    Token,
    /// Tokens in more than one place.
    Conflict,
}

/// What an accepted token granted, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub user: String,
    pub roles: Vec<String>,
    pub channels: Vec<String>,
    pub publish: Vec<String>,
    pub exp: Option<u64>,
}

impl Granted {
    fn of(id: &Identity) -> Self {
        let list = |l: &[Box<str>]| l.iter().map(|s| s.to_string()).collect();
        Granted {
            user: id.user.to_string(),
            roles: list(id.roles()),
            channels: list(id.channels()),
            publish: list(id.publish()),
            exp: id.exp(),
        }
    }
}

/// A verifier's answer.
pub type Verdict = Result<Granted, TokenError>;

/// What an input did, for the seed test's name checks.
#[derive(Debug)]
pub struct Outcome {
    pub extraction: Extraction,
    /// The main verifications of the mode (mode 0 and 3: every verifier; 1: every verifier on the signed
    /// token; 2: the two HMAC verifiers), in [`verifiers`] order.
    pub results: Vec<Verdict>,
}

/// Runs one input (the fuzz target's body).
pub fn check(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome { extraction: Extraction::NotARequest, results: Vec::new() };
    };
    match mode % 4 {
        0 => request(rest),
        1 => signed_parts(rest),
        2 => built_claims(rest),
        _ => raw_token(rest),
    }
}

// ---- mode 0 ------------------------------------------------------------------------------------------

fn request(data: &[u8]) -> Outcome {
    let mut outcome = Outcome { extraction: Extraction::NotARequest, results: Vec::new() };
    let Ok(Some(req)) = parse_request(data, 16 * 1024) else { return outcome };
    let query = req.query_param("token");
    let header = req.bearer_token();
    let sub = req.subprotocol_bearer();
    let places = usize::from(query.is_some()) + usize::from(header.is_some()) + usize::from(sub.is_some());
    let token = match token_of(&req) {
        Err(_) => {
            assert!(places >= 2, "refused with the token in {places} place(s)");
            outcome.extraction = Extraction::Conflict;
            return outcome;
        }
        Ok(None) => {
            assert_eq!(places, 0, "no token found, but it is in {places} place(s)");
            outcome.extraction = Extraction::NoToken;
            return outcome;
        }
        Ok(Some(token)) => token,
    };
    assert_eq!(places, 1, "one token taken from {places} places");
    outcome.extraction = Extraction::Token;
    let expected = query.clone().or(header.map(Cow::Borrowed)).or(sub.map(Cow::Borrowed)).expect("one place");
    assert_eq!(token, expected);
    assert!(query.is_some() || matches!(token, Cow::Borrowed(_)), "a header token is borrowed");
    if let Cow::Borrowed(t) = &token {
        // An empty value (`?token` with no `=`) may be any empty slice.
        assert!(t.is_empty() || inside(t, data), "borrowed token {t:?} is not a slice of the input");
    }
    assert!(!token.is_empty() || query.is_some(), "only ?token= may be empty");
    outcome.results = verifiers().iter().map(|v| verify_checked(v, &token)).collect();
    outcome
}

/// Whether `s` is a slice of `data`, in place.
fn inside(s: &str, data: &[u8]) -> bool {
    let start = data.as_ptr() as usize;
    let at = s.as_ptr() as usize;
    at >= start && at - start + s.len() <= data.len() && data[at - start..at - start + s.len()] == *s.as_bytes()
}

// ---- mode 1 ------------------------------------------------------------------------------------------

fn signed_parts(data: &[u8]) -> Outcome {
    let (header, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let token = format!("{message}.{}", hmac(&message, SECRET.as_bytes()));
    let v = verifiers();
    let t0 = now();
    let results: Vec<Verdict> = v.iter().map(|v| verify_checked(v, &token)).collect();
    assert!(results[RS].is_err() && results[ES].is_err(), "an HMAC-signed token verified with a public key");

    // Tampered or wrongly keyed copies are never accepted; when the original was, they fail on the signature.
    let h = hash(data);
    let sig_at = message.len() + 1;
    let i = sig_at + h % (token.len() - sig_at);
    let mut tampered = token.clone().into_bytes();
    tampered[i] = other_b64_char(tampered[i], h >> 20);
    let tampered = String::from_utf8(tampered).expect("ASCII");
    let other = format!("{message}.{}", hmac(&message, OTHER_SECRET.as_bytes()));
    for k in [HS, HS_ISS_AUD] {
        for bad in [&tampered, &other] {
            let r = v[k].auth.verify(bad).map(|id| Granted::of(&id));
            assert!(r.is_err(), "{}: accepted a token with a wrong signature: {bad}", v[k].name);
            if results[k].is_ok() {
                assert_eq!(r, Err(TokenError::BadSignature), "{}", v[k].name);
            }
        }
    }
    // HS/RS and HS/ES confusion: HMAC with the public key file as the secret.
    for (k, pem) in [(RS, RS256_PEM), (ES, ES256_PEM)] {
        let confused = format!("{message}.{}", hmac(&message, pem));
        let r = v[k].auth.verify(&confused).map(|id| Granted::of(&id));
        assert!(r.is_err(), "{}: accepted an HMAC signed with its public key", v[k].name);
        if results[HS].is_ok() {
            assert_eq!(r, Err(TokenError::WrongAlgorithm), "{}", v[k].name);
        }
    }

    // In each of the three places of a valid upgrade request: extracted exactly, same verdict.
    let requests = [
        format!("GET /ws?token={token} HTTP/1.1\r\n{BASE}\r\n"),
        format!("GET /ws HTTP/1.1\r\n{BASE}Authorization: Bearer {token}\r\n\r\n"),
        format!("GET /ws HTTP/1.1\r\n{BASE}Sec-WebSocket-Protocol: throng.v1, bearer.{token}\r\n\r\n"),
    ];
    for r in &requests {
        let req = parse_request(r.as_bytes(), r.len()).expect("valid request").expect("complete request");
        assert_eq!(req.validate_upgrade(), Ok(()));
        let got = token_of(&req).expect("one place").expect("a token");
        assert!(matches!(got, Cow::Borrowed(_)) && got == token, "extracted {got:?}");
        let again = v[HS].auth.verify(&got).map(|id| Granted::of(&id));
        same_verdict(&again, &results[HS], t0, now());
    }
    // In two places at once: refused, whichever two.
    let two = [
        format!("GET /ws?token={token} HTTP/1.1\r\n{BASE}Authorization: Bearer {token}\r\n\r\n"),
        format!("GET /ws?token={token} HTTP/1.1\r\n{BASE}Sec-WebSocket-Protocol: bearer.{token}\r\n\r\n"),
        format!(
            "GET /ws HTTP/1.1\r\n{BASE}Authorization: Bearer {token}\r\nSec-WebSocket-Protocol: bearer.{token}\r\n\r\n"
        ),
    ];
    for r in &two {
        let req = parse_request(r.as_bytes(), r.len()).expect("valid request").expect("complete request");
        assert!(token_of(&req).is_err(), "a token in two places was taken: {r}");
    }
    Outcome { extraction: Extraction::NotARequest, results }
}

/// The rest of a valid upgrade request (after the request line), without the blank line.
const BASE: &str = "Host: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// Two verdicts on the same token are equal, unless the clock's second changed between them and the
/// difference is the time claims'.
fn same_verdict(a: &Verdict, b: &Verdict, t0: u64, t1: u64) {
    let timely = |r: &Verdict| matches!(r, Ok(_) | Err(TokenError::Expired | TokenError::NotYetValid));
    if a != b {
        assert!(t0 != t1 && timely(a) && timely(b), "same token, different verdicts: {a:?} and {b:?}");
    }
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn other_b64_char(c: u8, pick: usize) -> u8 {
    let n = B64URL[pick % 64];
    if n == c {
        B64URL[(pick + 1) % 64]
    } else {
        n
    }
}

// ---- mode 2 ------------------------------------------------------------------------------------------

/// The input bytes, then zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

const USER_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@=/-";
const OTHER_CHARS: [char; 10] = [' ', ':', '"', '\\', '\0', '*', '\u{e9}', '\u{1F600}', '+', '%'];

/// A string from the bytes: 1-8 characters, or 120-135 (so around the 128-byte bound); from the user
/// charset, or (when `any`) sometimes from characters outside it, some of them multi-byte.
fn text(b: &mut Bytes<'_>, any: bool) -> String {
    let k = b.next();
    let len = if k & 0x80 != 0 { 120 + usize::from(k & 15) } else { 1 + usize::from(k & 7) };
    let odd = any && k & 0x40 != 0;
    (0..len)
        .map(|_| {
            let c = usize::from(b.next());
            if odd && c % 5 == 0 {
                OTHER_CHARS[c / 5 % OTHER_CHARS.len()]
            } else {
                char::from(USER_CHARS.as_bytes()[c % USER_CHARS.len()])
            }
        })
        .collect()
}

/// What the claims built in mode 2 should do, by an independent rule.
#[derive(Default)]
struct Expect {
    /// A claim throng reads has the wrong JSON type, or `sub` is missing.
    wrong_type: bool,
    /// `sub` is not 1-128 bytes of the user charset, or a list has more than 64 items, an empty one or
    /// one over 128 bytes.
    bad_value: bool,
    exp: Option<u64>,
    nbf: Option<u64>,
    iss_ok: bool,
    aud_ok: bool,
}

impl Expect {
    /// The violations at time `now` for verifier `v` (empty: the token must be accepted).
    fn violations(&self, v: &Verifier, token: &str, now: u64) -> Vec<TokenError> {
        if token.len() > v.max {
            return vec![TokenError::TooLarge(v.max)];
        }
        let mut out = Vec::new();
        if self.wrong_type || self.bad_value {
            out.push(TokenError::BadClaim(""));
        }
        if self.exp.is_some_and(|exp| exp < now.saturating_sub(v.leeway)) {
            out.push(TokenError::Expired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now + v.leeway) {
            out.push(TokenError::NotYetValid);
        }
        if v.iss_aud && !self.iss_ok {
            out.push(TokenError::WrongIssuer);
        }
        if v.iss_aud && !self.aud_ok {
            out.push(TokenError::WrongAudience);
        }
        out
    }
}

fn user_rule(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.chars().all(|c| USER_CHARS.contains(c))
}

/// A list claim (`roles`, `channels`, `publish`): absent, of the wrong type, 60-67 items or 0-3.
fn list(b: &mut Bytes<'_>, name: &str, claims: &mut Map<String, Value>, e: &mut Expect) {
    let count = match b.next() % 8 {
        0 => return,
        1 => {
            claims.insert(name.into(), json!("admin"));
            e.wrong_type = true;
            return;
        }
        2 => {
            claims.insert(name.into(), json!(["ok", 7]));
            e.wrong_type = true;
            return;
        }
        3 | 4 => 60 + usize::from(b.next() % 8),
        _ => usize::from(b.next() % 4),
    };
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let k = b.next();
        // One byte an item, mostly short (1-4 characters, so 64 of them stay under the token bound); now
        // and then an empty one, or one of 120-135 bytes or more (`k >> 4` picks the length). Zeros, what
        // is read past the input's end, make valid items.
        let item = match k % 16 {
            15 => String::new(),
            1 => text(&mut Bytes(&[0x80 | (k >> 4), k, k.wrapping_mul(3)]), true),
            _ => text(&mut Bytes(&[k & 3, k, k >> 2, k >> 4]), false),
        };
        e.bad_value |= item.is_empty() || item.len() > 128;
        items.push(Value::String(item));
    }
    e.bad_value |= count > 64;
    claims.insert(name.into(), Value::Array(items));
}

fn built_claims(data: &[u8]) -> Outcome {
    let mut b = Bytes(data);
    let t0 = now();
    let mut claims = Map::new();
    let mut e = Expect::default();
    match b.next() % 8 {
        0 => e.wrong_type = true,
        1 => {
            claims.insert("sub".into(), json!(b.next()));
            e.wrong_type = true;
        }
        2 => {
            claims.insert("sub".into(), json!(""));
            e.bad_value = true;
        }
        _ => {
            let any = b.next() & 1 == 1;
            let sub = text(&mut b, any);
            e.bad_value |= !user_rule(&sub);
            claims.insert("sub".into(), Value::String(sub));
        }
    }
    for name in ["roles", "channels", "publish"] {
        list(&mut b, name, &mut claims, &mut e);
    }
    // Leeways: 5 s (HS256), 0 (HS256+iss+aud). Offsets stay 2 s or more from either boundary.
    let exp = match b.next() % 8 {
        0 | 1 => None,
        2 => Some(json!(t0 - 1000)),
        3 => Some(json!(t0 - 3)),
        4 => Some(json!(t0 + 3600)),
        5 => Some(json!(u64::MAX)),
        6 => Some(json!("tomorrow")),
        _ => Some(json!(t0 as f64 + 3600.5)),
    };
    if let Some(exp) = exp {
        match exp.as_u64() {
            Some(n) => e.exp = Some(n),
            None => e.wrong_type = true,
        }
        claims.insert("exp".into(), exp);
    }
    // A NumericDate that is not an unsigned integer is refused, for `nbf` as for `exp` (jsonwebtoken alone
    // would skip such an `nbf`).
    match b.next() % 7 {
        0 | 1 => {}
        2 => e.nbf = Some(t0 + 1000),
        3 => e.nbf = Some(t0 + 3),
        4 => e.nbf = Some(t0 - 100),
        5 => {
            claims.insert("nbf".into(), json!(t0 as f64 - 99.75));
            e.wrong_type = true;
        }
        _ => {
            claims.insert("nbf".into(), json!("yesterday"));
            e.wrong_type = true;
        }
    }
    if let (Some(nbf), false) = (e.nbf, claims.contains_key("nbf")) {
        claims.insert("nbf".into(), json!(nbf));
    }
    let (iss, iss_ok) = match b.next() % 6 {
        0 => (None, false),
        1 | 2 => (Some(json!(ISSUER)), true),
        3 => (Some(json!("https://issuer.example/other")), false),
        4 => (Some(json!(["x", ISSUER])), true),
        _ => (Some(json!(42)), false),
    };
    let (aud, aud_ok) = match b.next() % 6 {
        0 => (None, false),
        1 | 2 => (Some(json!(AUDIENCE)), true),
        3 => (Some(json!("someone-else")), false),
        4 => (Some(json!(["x", AUDIENCE])), true),
        _ => (Some(json!(["x"])), false),
    };
    (e.iss_ok, e.aud_ok) = (iss_ok, aud_ok);
    if let Some(iss) = iss {
        claims.insert("iss".into(), iss);
    }
    if let Some(aud) = aud {
        claims.insert("aud".into(), aud);
    }

    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Value::Object(claims)).expect("serializable"));
    let message = format!("{header}.{payload}");
    let token = format!("{message}.{}", hmac(&message, SECRET.as_bytes()));
    let v = verifiers();
    let mut results = Vec::new();
    for k in [HS, HS_ISS_AUD] {
        let r = verify_checked(&v[k], &token);
        let t1 = now();
        let mut allowed = e.violations(&v[k], &token, t0);
        let late = e.violations(&v[k], &token, t1);
        let flips = allowed.is_empty() != late.is_empty();
        allowed.extend(late);
        match &r {
            Ok(_) => assert!(allowed.is_empty() || flips, "{}: accepted, expected one of {allowed:?}", v[k].name),
            Err(err) => assert!(
                allowed.iter().any(|a| std::mem::discriminant(a) == std::mem::discriminant(err)),
                "{}: {err:?}, expected {}",
                v[k].name,
                if allowed.is_empty() { "acceptance".to_string() } else { format!("one of {allowed:?}") },
            ),
        }
        results.push(r);
    }
    Outcome { extraction: Extraction::NotARequest, results }
}

// ---- mode 3 ------------------------------------------------------------------------------------------

fn raw_token(data: &[u8]) -> Outcome {
    let token = String::from_utf8_lossy(data);
    let v = verifiers();
    let results: Vec<Verdict> = v.iter().map(|v| verify_checked(v, &token)).collect();

    // Just over each HMAC verifier's bound: refused as TooLarge though validly signed (so not decoded),
    // and the input padded past the bound too; at the bound, the valid token verifies.
    let h = hash(data);
    for k in [HS, HS_ISS_AUD] {
        let max = v[k].max;
        let over = padded_token(max + 1 + h % 300);
        assert!(over.len() > max);
        assert_eq!(v[k].auth.verify(&over).err(), Some(TokenError::TooLarge(max)), "{}", v[k].name);
        let under = padded_token(max - 1);
        assert!(under.len() <= max);
        let ok = verify_checked(&v[k], &under);
        assert!(ok.as_ref().is_ok_and(|g| g.user == "padded"), "{}: {ok:?}", v[k].name);
        let filler: &str = if token.is_empty() { "x" } else { &token };
        let long = filler.repeat(max / filler.len() + 1);
        assert_eq!(v[k].auth.verify(&long).err(), Some(TokenError::TooLarge(max)), "{}", v[k].name);
    }
    Outcome { extraction: Extraction::NotARequest, results }
}

/// The shortest valid HS256 token (for both HMAC verifiers) of at least `min_len` bytes.
fn padded_token(min_len: usize) -> String {
    let make = |pad: usize| {
        let claims = json!({"sub": "padded", "iss": ISSUER, "aud": AUDIENCE, "pad": "p".repeat(pad)});
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        format!("{message}.{}", hmac(&message, SECRET.as_bytes()))
    };
    let base = make(0).len();
    // Each pad byte adds 4/3 of a character; start a little short and step up.
    let mut pad = min_len.saturating_sub(base) * 3 / 4;
    pad = pad.saturating_sub(3);
    loop {
        let t = make(pad);
        if t.len() >= min_len {
            return t;
        }
        pad += 1;
    }
}

// ---- every mode: the acceptance oracle ---------------------------------------------------------------

/// `v` verifies `token`; TooLarge exactly when it is over the bound; an acceptance is checked.
fn verify_checked(v: &Verifier, token: &str) -> Verdict {
    let t0 = now();
    let r = v.auth.verify(token);
    let t1 = now();
    if token.len() > v.max {
        assert_eq!(r.as_ref().err(), Some(&TokenError::TooLarge(v.max)), "{}: {} bytes", v.name, token.len());
    } else {
        assert!(!matches!(r, Err(TokenError::TooLarge(_))), "{}: TooLarge at {} bytes", v.name, token.len());
    }
    let id = r?;
    accepted(v, token, &id, t0, t1);
    Ok(Granted::of(&id))
}

/// Checks an accepted token against its own decoding (see the module docs).
fn accepted(v: &Verifier, token: &str, id: &Identity, t0: u64, t1: u64) {
    let ctx = || format!("{} accepted {token:?} as {id:?}", v.name);
    assert!(token.len() <= v.max, "{}", ctx());
    // The identity alone.
    assert!(valid_user(&id.user) && user_rule(&id.user), "{}", ctx());
    assert!(!id.open && id.ip.is_none(), "{}", ctx());
    for l in [id.roles(), id.channels(), id.publish()] {
        assert!(l.len() <= MAX_CLAIM_ITEMS && MAX_CLAIM_ITEMS == 64, "{}", ctx());
        assert!(l.iter().all(|s| (1..=MAX_CLAIM_ITEM_BYTES).contains(&s.len())) && MAX_CLAIM_ITEM_BYTES == 128);
    }

    // The token, decoded here.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{}", ctx());
    if v.alg == "HS256" {
        let message = &token[..parts[0].len() + 1 + parts[1].len()];
        assert_eq!(parts[2], hmac(message, SECRET.as_bytes()), "{}: not signed with the secret", ctx());
    }
    let header = URL_SAFE_NO_PAD.decode(parts[0]).unwrap_or_else(|e| panic!("{}: header base64: {e}", ctx()));
    let header = parse_json(&header, HEADER_READ).unwrap_or_else(|e| panic!("{}: header {header:?}: {e}", ctx()));
    // jsonwebtoken also takes its Header struct in serde's sequence form: 10 elements, `alg` second.
    let alg_ok = match &header {
        Json::Object(m) => m.get("alg").is_some_and(|a| names_alg(a, v.alg)),
        Json::Array(a) => a.len() == 10 && names_alg(&a[1], v.alg),
    };
    assert!(alg_ok, "{}: header {header:?} does not name {}", ctx(), v.alg);
    let payload = URL_SAFE_NO_PAD.decode(parts[1]).unwrap_or_else(|e| panic!("{}: payload base64: {e}", ctx()));
    let read = if v.iss_aud { PAYLOAD_READ_ISS_AUD } else { PAYLOAD_READ };
    let claims = match parse_json(&payload, read) {
        Ok(Json::Object(m)) => m,
        other => panic!("{}: payload {:?} is not an object: {other:?}", ctx(), String::from_utf8_lossy(&payload)),
    };
    assert_eq!(claims.get("sub"), Some(&Value::String(id.user.to_string())), "{}", ctx());
    match claims.get("exp") {
        None | Some(Value::Null) => assert_eq!(id.exp(), None, "{}", ctx()),
        Some(exp) => {
            let n = exp.as_u64().unwrap_or_else(|| panic!("{}: exp {exp} is not a NumericDate", ctx()));
            assert_eq!(id.exp(), Some(n), "{}", ctx());
            assert!(n.saturating_add(v.leeway) >= t0, "{}: expired (now {t0})", ctx());
        }
    }
    match claims.get("nbf") {
        None | Some(Value::Null) => {}
        Some(nbf) => {
            let n = nbf.as_f64().unwrap_or_else(|| panic!("{}: nbf {nbf} is not a NumericDate", ctx()));
            assert!(n.is_finite() && n.round() <= (t1 + v.leeway) as f64, "{}: nbf {nbf} is in the future", ctx());
        }
    }
    for (name, got) in [("roles", id.roles()), ("channels", id.channels()), ("publish", id.publish())] {
        let want: Vec<Value> = got.iter().map(|s| Value::String(s.to_string())).collect();
        match claims.get(name) {
            None => assert!(got.is_empty(), "{}", ctx()),
            Some(Value::Array(a)) => assert_eq!(*a, want, "{}: {name}", ctx()),
            Some(other) => panic!("{}: {name} is {other}", ctx()),
        }
    }
    if v.iss_aud {
        let names = |c: Option<&Value>, want: &str| match c {
            Some(Value::String(s)) => s == want,
            // RFC 7519 lets `aud` be an array; jsonwebtoken takes an array `iss` the same way.
            Some(Value::Array(a)) => a.iter().all(Value::is_string) && a.iter().any(|s| s == want),
            _ => false,
        };
        assert!(names(claims.get("iss"), ISSUER), "{}: iss", ctx());
        assert!(names(claims.get("aud"), AUDIENCE), "{}: aud", ctx());
    }
}

/// `alg` as serde reads an `Algorithm`: the name, or the externally tagged `{"<name>": null}`.
fn names_alg(a: &Value, alg: &str) -> bool {
    match a {
        Value::String(s) => s == alg,
        Value::Object(m) => m.len() == 1 && m.get(alg) == Some(&Value::Null),
        _ => false,
    }
}

/// A header or payload as the oracle reads it: the members named in the [`Reader`] (and, for an array, its
/// second element) as JSON values, parsed strictly and at most once each; everything else skipped as
/// jsonwebtoken skips what it does not read (so a string that is not UTF-8 in an unknown member fails
/// neither).
#[derive(Debug)]
enum Json {
    Object(BTreeMap<String, Value>),
    Array(Vec<Value>),
}

/// Parses `bytes` (one JSON value, then only whitespace), reading the members `read`.
fn parse_json(bytes: &[u8], read: &'static [&'static str]) -> serde_json::Result<Json> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let json = Reader(read).deserialize(&mut de)?;
    de.end()?;
    Ok(json)
}

const HEADER_READ: &[&str] = &["alg"];
const PAYLOAD_READ: &[&str] = &["sub", "exp", "nbf", "roles", "channels", "publish"];
const PAYLOAD_READ_ISS_AUD: &[&str] = &["sub", "exp", "nbf", "roles", "channels", "publish", "iss", "aud"];

struct Reader(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Reader {
    type Value = Json;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Reader {
    type Value = Json;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or array")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.0.contains(&key.as_str()) {
                let value: Value = map.next_value()?;
                if out.insert(key, value).is_some() {
                    return Err(A::Error::custom("a member the oracle reads is repeated"));
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Json::Object(out))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut out = Vec::new();
        loop {
            let next = if out.len() == 1 {
                seq.next_element::<Value>()?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| Value::Null)
            };
            match next {
                Some(v) => out.push(v),
                None => return Ok(Json::Array(out)),
            }
        }
    }
}

// ---- helpers -----------------------------------------------------------------------------------------

fn hmac(message: &str, key: &[u8]) -> String {
    jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(key), Algorithm::HS256).expect("HS256")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn hash(data: &[u8]) -> usize {
    data.iter().fold(0usize, |h, &b| h.wrapping_mul(31).wrapping_add(usize::from(b)))
}
