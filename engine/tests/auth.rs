//! Identity and policy against the real `throng` binary over real sockets, on both drivers: JWT at the
//! upgrade (every way a token can be wrong), the open development mode's rules, permissions from claims and
//! namespace roles, token expiry and `refresh`, connections per user and per address, upgrades per second,
//! origins, and the client address behind trusted proxies. Every refusal is checked for its exact status
//! or close code and JSON reason, with another connection on the same shard unaffected.
//!
//! Tokens are minted here with `jsonwebtoken`; RSA and EC keys are made with `openssl` at test time.

#[macro_use]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{client_frame, Client, Driver, Server, SAMPLE_KEY};
use throng_protocol::frame::OpCode;

on_both_drivers! {
    tokens_in_every_place => tokens_in_every_place_uring, tokens_in_every_place_epoll;
    bad_tokens_are_refused_401 => bad_tokens_are_refused_401_uring, bad_tokens_are_refused_401_epoll;
    rs256_and_es256 => rs256_and_es256_uring, rs256_and_es256_epoll;
    issuer_and_audience => issuer_and_audience_uring, issuer_and_audience_epoll;
    permissions_from_claims_and_roles => permissions_from_claims_and_roles_uring, permissions_from_claims_and_roles_epoll;
    expiry_and_refresh => expiry_and_refresh_uring, expiry_and_refresh_epoll;
    limits_per_user_and_address => limits_per_user_and_address_uring, limits_per_user_and_address_epoll;
    upgrades_per_second_per_address => upgrades_per_second_per_address_uring, upgrades_per_second_per_address_epoll;
    origins => origins_uring, origins_epoll;
    client_address_behind_trusted_proxies =>
        client_address_behind_trusted_proxies_uring, client_address_behind_trusted_proxies_epoll;
    proxy_protocol => proxy_protocol_uring, proxy_protocol_epoll;
    open_mode_only_on_loopback_or_insecure =>
        open_mode_only_on_loopback_or_insecure_uring, open_mode_only_on_loopback_or_insecure_epoll;
}

const SECRET: &str = "a test secret of at least thirty-two bytes!";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn hs256(claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

/// RSA and EC key pairs (PEM files), made once per test process with openssl.
struct Keys {
    rsa_private: Vec<u8>,
    rsa_public: PathBuf,
    ec_private: Vec<u8>,
    ec_public: PathBuf,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("throng-auth-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.pem"]);
        run(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"]);
        run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ec.pem"]);
        run(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"]);
        Keys {
            rsa_private: std::fs::read(dir.join("rsa.pem")).expect("rsa.pem"),
            rsa_public: dir.join("rsa.pub.pem"),
            ec_private: std::fs::read(dir.join("ec.pem")).expect("ec.pem"),
            ec_public: dir.join("ec.pub.pem"),
        }
    })
}

fn start(driver: Driver, extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

/// Sends an upgrade request and returns the response head, the JSON body of a refusal, and the client.
fn attempt(srv: &Server, path: &str, headers: &str) -> (u16, String, Option<Value>, Client) {
    let mut c = srv.connect();
    c.write(upgrade_request(path, headers).as_bytes());
    let head = String::from_utf8(c.read_head()).expect("UTF-8 head");
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let body = (status != 101).then(|| {
        let rest = c.read_to_end();
        serde_json::from_slice(&rest).unwrap_or_else(|e| panic!("{status} body not JSON ({e}): {head}"))
    });
    (status, head, body, c)
}

/// Upgrades with `token` in the query and reads the welcome.
fn connect(srv: &Server, token: &str) -> Client {
    let (status, head, body, mut c) = attempt(srv, &format!("/ws?token={token}"), "");
    assert_eq!(status, 101, "{head} {body:?}");
    let w = json_frame(&mut c);
    assert_eq!(w["type"], "welcome", "{w}");
    c
}

fn json_frame(c: &mut Client) -> Value {
    loop {
        let f = c.read_frame();
        match f.opcode {
            OpCode::Text => return serde_json::from_slice(&f.payload).expect("JSON"),
            OpCode::Ping | OpCode::Pong => continue,
            _ => panic!("unexpected {f:?}"),
        }
    }
}

fn call(c: &mut Client, mut cmd: Value, id: u64) -> Value {
    cmd["id"] = json!(id);
    c.send_frame(true, OpCode::Text, cmd.to_string().as_bytes());
    loop {
        let v = json_frame(c);
        if v["id"] == id {
            return v;
        }
    }
}

fn refused(status: u16, body: &Option<Value>, want: u16, reason_part: &str) {
    assert_eq!(status, want, "{body:?}");
    let reason = body.as_ref().and_then(|b| b["reason"].as_str()).unwrap_or("");
    assert!(reason.contains(reason_part), "status {status}: reason {reason:?} lacks {reason_part:?}");
}

/// A connection already on the shard keeps working.
fn bystander(c: &mut Client, tag: u64) {
    let r = call(c, json!({"type": "ping"}), 900 + tag);
    assert_eq!(r["type"], "pong", "{r}");
}

fn valid(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "channels": ["chat:*"], "publish": ["chat:*"]})
}

// ---------------------------------------------------------------------------------------------------------

fn tokens_in_every_place(driver: Driver) {
    let srv = start(driver, &[]);
    let t = hs256(valid("alice"));
    let mut q = connect(&srv, &t);
    let r = call(&mut q, json!({"type": "subscribe", "channel": "chat:1"}), 1);
    assert_eq!(r["type"], "subscribed", "{r}");
    let (status, _, _, mut h) = attempt(&srv, "/ws", &format!("Authorization: Bearer {t}\r\n"));
    assert_eq!(status, 101);
    assert_eq!(json_frame(&mut h)["user"], "alice");
    let (status, head, _, _) = attempt(&srv, "/ws", &format!("Sec-WebSocket-Protocol: throng.v1, bearer.{t}\r\n"));
    assert_eq!(status, 101, "{head}");
    assert!(head.contains("Sec-WebSocket-Protocol: throng.v1\r\n"), "the 101 selects throng.v1: {head}");
    assert!(!head.contains(&t), "the token is not echoed");
    // The bearer subprotocol alone is refused: the server could only select the token itself.
    let (status, _, body, _) = attempt(&srv, "/ws", &format!("Sec-WebSocket-Protocol: bearer.{t}\r\n"));
    refused(status, &body, 400, "throng.v1");
    // In two places at once: which one was meant?
    let (status, _, body, _) = attempt(&srv, &format!("/ws?token={t}"), &format!("Authorization: Bearer {t}\r\n"));
    refused(status, &body, 400, "more than one place");
    // None at all.
    let (status, _, body, _) = attempt(&srv, "/ws", "");
    refused(status, &body, 401, "missing token");
    // `?user=` means nothing once tokens are required.
    let (status, _, body, _) = attempt(&srv, "/ws?user=mallory", "");
    refused(status, &body, 401, "missing token");
    bystander(&mut q, 1);
    // /echo needs no token (a diagnostic endpoint: `echo = false` in production).
    let mut e = srv.ws();
    e.echo_text("no token here");
}

fn bad_tokens_are_refused_401(driver: Driver) {
    let srv = start(driver, &["--jwt-leeway", "0", "--max-token-bytes", "2048"]);
    let mut ok = connect(&srv, &hs256(valid("alice")));
    let other_secret = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!!"),
        )
        .expect("sign")
    };
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let valid_token = hs256(valid("alice"));
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&valid("alice")));
    let hs384 = encode(&Header::new(Algorithm::HS384), &valid("alice"), &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("sign");
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", hs256(json!({"sub": "a", "exp": now() - 10})), "expired"),
        ("not yet valid", hs256(json!({"sub": "a", "exp": now() + 3600, "nbf": now() + 600})), "not valid yet"),
        ("wrong signature", other_secret(valid("alice")), "signature"),
        ("another algorithm", hs384, "algorithm"),
        ("alg none", none, "algorithm"),
        ("no sub", hs256(json!({"exp": now() + 3600})), "sub"),
        ("sub not a user name", hs256(json!({"sub": "a b", "exp": now() + 3600})), "sub"),
        ("roles not a list", hs256(json!({"sub": "a", "roles": "admin"})), "claim"),
        ("garbage", "not.a.token".into(), "malformed"),
        ("truncated", valid_token[..valid_token.len() - 10].into(), "signature"),
        ("oversized", hs256(json!({"sub": "a", "pad": "x".repeat(3000)})), "larger than 2048"),
    ];
    for (what, token, reason) in cases {
        let (status, _, body, _) = attempt(&srv, &format!("/ws?token={token}"), "");
        assert_eq!(status, 401, "{what}: {body:?}");
        let got = body.as_ref().and_then(|b| b["reason"].as_str()).unwrap_or("");
        assert!(got.contains(reason), "{what}: reason {got:?} lacks {reason:?}");
        assert_eq!(body.as_ref().map(|b| b["error"].clone()), Some(json!("unauthorized")), "{what}");
    }
    assert!(srv.metric("throng_auth_refused_total") >= 11);
    bystander(&mut ok, 2);
}

fn rs256_and_es256(driver: Driver) {
    let k = keys();
    let rs = Server::start(driver, &["--jwt-public-key", k.rsa_public.to_str().unwrap(), "--jwt-alg", "RS256"]);
    let sign = |alg, key: &EncodingKey| encode(&Header::new(alg), &valid("carol"), key).expect("sign");
    let rsa = EncodingKey::from_rsa_pem(&k.rsa_private).expect("rsa key");
    let mut c = connect(&rs, &sign(Algorithm::RS256, &rsa));
    bystander(&mut c, 3);
    // HS/RS confusion: a token signed with HS256 using the public key as the secret.
    let public = std::fs::read(&k.rsa_public).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public));
    let (status, _, body, _) = attempt(&rs, &format!("/ws?token={confused}"), "");
    refused(status, &body, 401, "algorithm");
    let es = Server::start(driver, &["--jwt-public-key", k.ec_public.to_str().unwrap(), "--jwt-alg", "ES256"]);
    let ec = EncodingKey::from_ec_pem(&k.ec_private).expect("ec key");
    let mut c = connect(&es, &sign(Algorithm::ES256, &ec));
    bystander(&mut c, 4);
    let (status, _, body, _) = attempt(&es, &format!("/ws?token={}", sign(Algorithm::RS256, &rsa)), "");
    refused(status, &body, 401, "algorithm");
}

fn issuer_and_audience(driver: Driver) {
    let srv = start(driver, &["--jwt-issuer", "https://auth.example.com", "--jwt-audience", "throng"]);
    let with = |extra: Value| {
        let mut c = valid("dave");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        hs256(c)
    };
    let mut c = connect(&srv, &with(json!({"iss": "https://auth.example.com", "aud": "throng"})));
    for (claims, reason) in [
        (json!({"iss": "https://evil.example.com", "aud": "throng"}), "issuer"),
        (json!({"aud": "throng"}), "issuer"),
        (json!({"iss": "https://auth.example.com", "aud": "other"}), "audience"),
        (json!({"iss": "https://auth.example.com"}), "audience"),
    ] {
        let (status, _, body, _) = attempt(&srv, &format!("/ws?token={}", with(claims.clone())), "");
        refused(status, &body, 401, reason);
    }
    bystander(&mut c, 5);
}

/// The channels configuration of `permissions_from_claims_and_roles`.
const ROLES_CONFIG: &str = r#"
[namespace.chat]
[namespace.news]
subscribe_roles = ["*"]
publish_roles = ["editor"]
[namespace.staff]
subscribe_roles = ["staff"]
presence_roles = ["admin"]
history_roles = ["admin"]
[namespace.announcements]
subscribe_roles = ["*"]
client_publish = false
"#;

fn permissions_from_claims_and_roles(driver: Driver) {
    let path = std::env::temp_dir().join(format!("throng-auth-roles-{}.toml", std::process::id()));
    std::fs::write(&path, ROLES_CONFIG).expect("config");
    let srv = start(driver, &["--config", path.to_str().unwrap()]);
    let token = |sub: &str, roles: &[&str], channels: &[&str], publish: &[&str]| {
        hs256(json!({"sub": sub, "exp": now() + 3600, "roles": roles, "channels": channels, "publish": publish}))
    };
    let mut reader = connect(&srv, &token("reader", &[], &["chat:lobby"], &[]));
    let mut staff = connect(&srv, &token("sam", &["staff"], &[], &[]));
    let mut admin = connect(&srv, &token("ada", &["staff", "admin", "editor"], &[], &["chat:*"]));
    let forbidden = |c: &mut Client, cmd: Value, id: u64| {
        let r = call(c, cmd.clone(), id);
        assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("forbidden")), "{cmd}: {r}");
    };
    // Patterns in the token.
    assert_eq!(call(&mut reader, json!({"type": "subscribe", "channel": "chat:lobby"}), 1)["type"], "subscribed");
    forbidden(&mut reader, json!({"type": "subscribe", "channel": "chat:other"}), 2);
    forbidden(&mut reader, json!({"type": "publish", "channel": "chat:lobby", "data": 1}), 3);
    assert_eq!(
        call(&mut admin, json!({"type": "publish", "channel": "chat:lobby", "data": 1}), 4)["type"],
        "published"
    );
    // Roles in the namespace.
    assert_eq!(call(&mut reader, json!({"type": "subscribe", "channel": "news:1"}), 5)["type"], "subscribed");
    forbidden(&mut reader, json!({"type": "publish", "channel": "news:1", "data": 1}), 6);
    assert_eq!(call(&mut admin, json!({"type": "publish", "channel": "news:1", "data": 1}), 7)["type"], "published");
    forbidden(&mut reader, json!({"type": "subscribe", "channel": "staff:room"}), 8);
    assert_eq!(call(&mut staff, json!({"type": "subscribe", "channel": "staff:room"}), 9)["type"], "subscribed");
    // Presence and history by their own roles: staff may subscribe but not list who is there.
    forbidden(&mut staff, json!({"type": "presence", "channel": "staff:room"}), 10);
    forbidden(&mut staff, json!({"type": "history", "channel": "staff:room"}), 11);
    let p = call(&mut admin, json!({"type": "presence", "channel": "staff:room"}), 12);
    assert_eq!(p["type"], "presence", "{p}");
    assert!(p["users"].as_array().is_some_and(|u| u.iter().any(|u| u["user"] == "sam")), "{p}");
    forbidden(&mut admin, json!({"type": "publish", "channel": "announcements:1", "data": 1}), 13);
    // Personal channels: the owner only, whatever the token says.
    let mut greedy = connect(&srv, &token("greedy", &["admin"], &["*"], &["*"]));
    forbidden(&mut greedy, json!({"type": "subscribe", "channel": "user:ada"}), 14);
    forbidden(&mut greedy, json!({"type": "presence", "channel": "user:ada"}), 15);
    forbidden(&mut greedy, json!({"type": "publish", "channel": "user:greedy", "data": 1}), 16);
    assert_eq!(call(&mut greedy, json!({"type": "subscribe", "channel": "user:greedy"}), 17)["type"], "subscribed");
    // Forbidden commands count toward the abuse close.
    let mut pest = connect(&srv, &token("pest", &[], &[], &[]));
    let mut burst = Vec::new();
    for id in 0..20u64 {
        let cmd = json!({"type": "subscribe", "id": id, "channel": "staff:room"});
        burst.extend(client_frame(true, OpCode::Text, cmd.to_string().as_bytes()));
    }
    pest.write(&burst);
    let close = loop {
        let f = pest.read_frame();
        if f.opcode == OpCode::Close {
            break f;
        }
    };
    assert_eq!(close.close_code(), Some(1008));
    bystander(&mut reader, 6);
}

fn expiry_and_refresh(driver: Driver) {
    let srv = start(driver, &["--jwt-leeway", "0"]);
    let exp_in = |s: u64| hs256(json!({"sub": "erin", "exp": now() + s, "channels": ["chat:*"]}));
    // Expires in 2 s: closed with 4001 then.
    let t0 = Instant::now();
    let mut short = connect(&srv, &exp_in(2));
    short.set_read_timeout(Duration::from_secs(6));
    let f = loop {
        let f = short.read_frame();
        if f.opcode == OpCode::Close {
            break f;
        }
    };
    assert_eq!(f.close_code(), Some(4001), "{:?}", f.close_reason());
    let after = t0.elapsed();
    assert!(after > Duration::from_millis(900) && after < Duration::from_millis(3200), "closed after {after:?}");
    assert!(srv.metric("throng_tokens_expired_total") >= 1);
    // Refreshed in time: the new expiry counts.
    let t0 = Instant::now();
    let mut c = connect(&srv, &exp_in(2));
    c.set_read_timeout(Duration::from_secs(8));
    let r = call(&mut c, json!({"type": "refresh", "token": exp_in(4)}), 1);
    assert_eq!(r["type"], "refreshed", "{r}");
    assert!(r["expires"].as_u64().is_some_and(|e| e >= now() + 3), "{r}");
    // Another user's token, or a bad one, is refused and changes nothing.
    let r = call(&mut c, json!({"type": "refresh", "token": hs256(valid("mallory"))}), 2);
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("forbidden")), "{r}");
    let r = call(&mut c, json!({"type": "refresh", "token": "garbage"}), 3);
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("bad_token")), "{r}");
    std::thread::sleep(Duration::from_millis(2500));
    bystander(&mut c, 7);
    let f = loop {
        let f = c.read_frame();
        if f.opcode == OpCode::Close {
            break f;
        }
    };
    let after = t0.elapsed();
    assert_eq!(f.close_code(), Some(4001));
    assert!(after > Duration::from_millis(2900) && after < Duration::from_millis(5500), "closed after {after:?}");
}

fn limits_per_user_and_address(driver: Driver) {
    let srv = start(driver, &["--max-connections-per-user", "2", "--max-connections-per-ip", "3"]);
    let mut a1 = connect(&srv, &hs256(valid("frank")));
    let _a2 = connect(&srv, &hs256(valid("frank")));
    let (status, _, body, _) = attempt(&srv, &format!("/ws?token={}", hs256(valid("frank"))), "");
    refused(status, &body, 403, "max_connections_per_user");
    let _b1 = connect(&srv, &hs256(valid("gina")));
    let (status, _, body, _) = attempt(&srv, &format!("/ws?token={}", hs256(valid("hank"))), "");
    refused(status, &body, 403, "max_connections_per_ip");
    assert_eq!((srv.metric("throng_user_limit_total"), srv.metric("throng_ip_limit_total")), (1, 1));
    bystander(&mut a1, 8);
    // Room again once one leaves.
    drop(a1);
    support::v1::poll_until(Duration::from_secs(3), || {
        let (status, _, body, _) = attempt(&srv, &format!("/ws?token={}", hs256(valid("hank"))), "");
        if status == 101 {
            Ok(())
        } else {
            Err(format!("{status} {body:?}"))
        }
    });
    let stats = srv.stats();
    assert_eq!((stats["auth"].as_str(), stats["client_addresses"].as_u64()), (Some("jwt"), Some(1)), "{stats}");
}

fn upgrades_per_second_per_address(driver: Driver) {
    let srv = start(driver, &["--max-upgrades-per-second-per-ip", "5"]);
    let mut first = connect(&srv, &hs256(valid("ivan")));
    let mut refusal = None;
    for _ in 0..10 {
        let (status, head, body, _) = attempt(&srv, &format!("/ws?token={}", hs256(valid("ivan"))), "");
        if status == 429 {
            refusal = Some((head, body));
            break;
        }
    }
    let (head, body) = refusal.expect("no 429 in 11 upgrades at 5 per second");
    assert!(head.contains("\r\nRetry-After: 1\r\n"), "{head}");
    refused(429, &body, 429, "max_upgrades_per_second_per_ip");
    assert!(srv.metric("throng_upgrade_rate_limited_total") >= 1);
    bystander(&mut first, 9);
    std::thread::sleep(Duration::from_millis(1100));
    let _again = connect(&srv, &hs256(valid("ivan")));
}

fn origins(driver: Driver) {
    let srv = start(driver, &["--allowed-origins", "https://app.example.com,https://*.example.org"]);
    let t = hs256(valid("judy"));
    let path = format!("/ws?token={t}");
    for origin in ["https://app.example.com", "https://a.example.org"] {
        let (status, _, body, _) = attempt(&srv, &path, &format!("Origin: {origin}\r\n"));
        assert_eq!(status, 101, "{origin}: {body:?}");
    }
    for origin in ["https://evil.com", "http://app.example.com", "https://example.org", "null"] {
        let (status, _, body, _) = attempt(&srv, &path, &format!("Origin: {origin}\r\n"));
        refused(status, &body, 403, "origin");
    }
    // No Origin: not a browser; allowed (the stated rule).
    let mut c = connect(&srv, &t);
    bystander(&mut c, 10);
    assert_eq!(srv.metric("throng_origin_refused_total"), 4);
}

/// With 127.0.0.1 trusted, the client address is the right-most untrusted X-Forwarded-For hop: two
/// connections through the "proxy" from different clients are counted apart (per-address limit 1), two
/// from the same client are not. Without the trust, the headers are ignored.
fn client_address_behind_trusted_proxies(driver: Driver) {
    let srv = start(driver, &["--trusted-proxies", "127.0.0.0/8", "--max-connections-per-ip", "1"]);
    let with_xff = |xff: &str| {
        attempt(&srv, &format!("/ws?token={}", hs256(valid("kim"))), &format!("X-Forwarded-For: {xff}\r\n"))
    };
    let (s1, _, _, _c1) = with_xff("6.6.6.6, 198.51.100.7");
    let (s2, _, _, _c2) = with_xff("198.51.100.8");
    assert_eq!((s1, s2), (101, 101), "two clients behind the proxy");
    // The spoofable left-most hop does not make a new client.
    let (s3, _, body, _) = with_xff("1.2.3.4, 198.51.100.7");
    refused(s3, &body, 403, "max_connections_per_ip");
    assert_eq!(srv.stats()["client_addresses"], 2);
    let untrusted = start(driver, &["--max-connections-per-ip", "1"]);
    let h = |xff: &str| format!("X-Forwarded-For: {xff}\r\n");
    let (s1, _, _, _u1) = attempt(&untrusted, &format!("/ws?token={}", hs256(valid("kim"))), &h("198.51.100.1"));
    let (s2, _, body, _) = attempt(&untrusted, &format!("/ws?token={}", hs256(valid("kim"))), &h("198.51.100.2"));
    assert_eq!(s1, 101);
    refused(s2, &body, 403, "max_connections_per_ip");
}

fn open_mode_only_on_loopback_or_insecure(driver: Driver) {
    // Binding every address with no key is refused at start, saying what to configure.
    let out = Command::new(env!("CARGO_BIN_EXE_throng"))
        .args(["--listen", "0.0.0.0:0", "--driver", driver.flag(), "--shards", "1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run throng");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a key on 0.0.0.0: {stderr}");
    assert!(stderr.contains("jwt_secret") && stderr.contains("--insecure"), "{stderr}");
    // --insecure allows it, and says so.
    let srv = Server::start_on_any_address(driver, &["--insecure"]);
    assert!(srv.log().contains("OPEN DEVELOPMENT MODE"), "{}", srv.log());
    let mut c = srv.connect();
    c.write(upgrade_request("/ws?user=zoe", "").as_bytes());
    assert!(c.read_head().starts_with(b"HTTP/1.1 101"));
    // On loopback (what the tests use) the open mode runs without the flag; `user:<name>` is still its own.
    let srv = Server::start(driver, &[]);
    assert_eq!(srv.stats()["auth"], "open");
    let mut zoe = srv.connect();
    zoe.write(upgrade_request("/ws?user=zoe", "").as_bytes());
    zoe.read_head();
    let _welcome = json_frame(&mut zoe);
    let r = call(&mut zoe, json!({"type": "subscribe", "channel": "user:yan"}), 1);
    assert_eq!(r["code"], "forbidden", "{r}");
}

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4) from `src` to 127.0.0.1:8080.
fn proxy_v2(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

/// Reads until the server drops the connection (EOF or reset); returns what came before.
fn until_dropped(c: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("waiting for the server to drop the connection: {e}"),
        }
    }
}

/// Behind a load balancer speaking the PROXY protocol, the header names the client: per-address limits and
/// `/stats` count the addresses it gives (v1 and v2, whole or split over writes, followed by the request in
/// the same write or not); a connection without a valid header, or whose header does not come within the
/// handshake deadline, is dropped without a response and counted. A listener without `--proxy-protocol`
/// answers a PROXY line like any other bad request.
fn proxy_protocol(driver: Driver) {
    use std::io::Write;
    let args =
        ["--jwt-secret", SECRET, "--proxy-protocol", "--max-connections-per-ip", "1", "--handshake-timeout", "1"];
    let srv = Server::start_with_log(driver, &args, "throng=debug");
    let request = |who: &str| upgrade_request(&format!("/ws?token={}", hs256(valid(who))), "").into_bytes();
    let upgrade = |header: &[u8], split: usize, who: &str| {
        let mut c = srv.connect();
        let mut bytes = header.to_vec();
        bytes.extend(request(who));
        c.write(&bytes[..split]);
        std::thread::sleep(Duration::from_millis(30));
        c.write(&bytes[split..]);
        let head = String::from_utf8(c.read_head()).expect("UTF-8 head");
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
        let body = (status != 101).then(|| serde_json::from_slice::<Value>(&c.read_to_end()).expect("JSON body"));
        (status, body, c)
    };
    let v1 = b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 8080\r\n";
    // v1, header and request in one write.
    let (s1, _, mut c1) = upgrade(v1, v1.len() + 20, "lena");
    assert_eq!(s1, 101);
    assert_eq!(json_frame(&mut c1)["type"], "welcome");
    // v2, split inside the binary header.
    let (s2, _, _c2) = upgrade(&proxy_v2([198, 51, 100, 2], 40001), 7, "lena");
    assert_eq!(s2, 101);
    // v1 for IPv6, split after the header.
    let v6 = b"PROXY TCP6 2001:db8::1 ::1 40002 8080\r\n";
    let (s3, _, _c3) = upgrade(v6, v6.len(), "lena");
    assert_eq!(s3, 101);
    // The first client again (another source port): its address is at its limit of one.
    let (s4, body, _) = upgrade(b"PROXY TCP4 198.51.100.1 127.0.0.1 40003 8080\r\n", 5, "lena");
    refused(s4, &body, 403, "max_connections_per_ip");
    // The TCP peer (127.0.0.1) is not what is counted: three addresses, none of them loopback; the log
    // names the real ones.
    assert_eq!(srv.stats()["client_addresses"], 3);
    support::v1::poll_until(Duration::from_secs(3), || {
        // (stderr is read by another thread: the last lines may take a moment)
        let log = srv.log();
        let refused = log.lines().any(|l| l.contains("upgrade refused") && l.contains("client_addr=198.51.100.1"));
        let all = ["198.51.100.1", "198.51.100.2", "2001:db8::1"]
            .iter()
            .all(|a| log.lines().any(|l| l.contains("connected") && l.contains(&format!("client_addr={a} "))));
        assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal: {log:?}");
        if refused && all && !log.contains("client_addr=127.0.0.1") {
            Ok(())
        } else {
            Err(log)
        }
    });
    // No header: dropped without a word.
    let mut raw = std::net::TcpStream::connect(srv.addr).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&request("lena")).unwrap();
    assert_eq!(until_dropped(&mut raw), b"", "a connection without a PROXY header got a response");
    // A bad header: dropped.
    let mut raw = std::net::TcpStream::connect(srv.addr).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"PROXY TCP4 198.51.100.300 127.0.0.1 1 2\r\n").unwrap();
    assert_eq!(until_dropped(&mut raw), b"");
    assert_eq!(srv.metric("throng_proxy_header_errors_total"), 2);
    // Half a header, then nothing: dropped at the handshake deadline.
    let t0 = Instant::now();
    let mut raw = std::net::TcpStream::connect(srv.addr).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"PROXY TCP4 198.51").unwrap();
    assert_eq!(until_dropped(&mut raw), b"");
    let after = t0.elapsed();
    assert!(after > Duration::from_millis(800) && after < Duration::from_millis(3000), "dropped after {after:?}");
    bystander(&mut c1, 11);
    // Without --proxy-protocol the line is just a bad request.
    let plain = start(driver, &[]);
    let mut c = plain.connect();
    c.write(v1);
    c.write(&request("lena"));
    let head = String::from_utf8(c.read_head()).unwrap();
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
}
