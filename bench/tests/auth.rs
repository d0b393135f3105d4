//! Tokens: minted with jsonwebtoken for HS256, RS256 and ES256 (RSA and EC test keys made here with the
//! `openssl` tool), verifying with the matching public key (jsonwebtoken's decoder, and `openssl dgst` apart
//! from it), carrying the bench's claims; keys and algorithms that do not fit are refused before anything
//! connects; the in-test server finds each connection's token where `--token-in` put it, and only there;
//! every scenario runs with tokens (worker processes and churn included), all minted before the ramp.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser;
use common::{Head, Options, TestServer};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use throng_bench::jwt::unix_now;
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

const SECRET: &str = "s3cret";

/// Runs `openssl` with `args`, feeding it `input`; its standard output. Fails the test, saying what to
/// install, when there is no `openssl` on PATH.
fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "these tests make RSA and EC keys with the `openssl` command-line tool, which could not be run \
                 ({e}): install it (Debian/Ubuntu: apt-get install openssl)"
            )
        });
    if let Some(data) = input {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Test keys in a temporary directory (removed on drop).
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("throng-bench-keys-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = Keys { dir };
        let rsa = openssl(&["genrsa", "2048"], None);
        k.write("rsa.pem", &rsa);
        k.write("rsa-pkcs1.pem", &openssl(&["rsa", "-traditional"], Some(&rsa)));
        k.write("rsa.pub.pem", &openssl(&["rsa", "-pubout"], Some(&rsa)));
        let sec1 = openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout"], None);
        k.write("ec-sec1.pem", &sec1);
        let ec = openssl(&["pkcs8", "-topk8", "-nocrypt"], Some(&sec1));
        k.write("ec.pem", &ec);
        k.write("ec.pub.pem", &openssl(&["ec", "-pubout"], Some(&ec)));
        let p384 = openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout"], None);
        k.write("p384.pem", &openssl(&["pkcs8", "-topk8", "-nocrypt"], Some(&p384)));
        k
    }

    fn write(&self, name: &str, data: &[u8]) {
        std::fs::write(self.path(name), data).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn decoding_key(&self, alg: Algorithm) -> DecodingKey {
        match alg {
            Algorithm::HS256 => DecodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&std::fs::read(self.path("rsa.pub.pem")).unwrap()).unwrap(),
            Algorithm::ES256 => DecodingKey::from_ec_pem(&std::fs::read(self.path("ec.pub.pem")).unwrap()).unwrap(),
            a => panic!("no test key for {a:?}"),
        }
    }

    /// The bench options that sign with `alg`.
    fn key_args(&self, alg: Algorithm) -> Vec<String> {
        match alg {
            Algorithm::HS256 => vec!["--jwt-secret".into(), SECRET.into()],
            Algorithm::RS256 => vec!["--jwt-private-key".into(), self.arg("rsa.pem")],
            Algorithm::ES256 => vec!["--jwt-private-key".into(), self.arg("ec.pem")],
            a => panic!("no test key for {a:?}"),
        }
    }

    /// Verifies `token` as an `alg` token (with `iss`/`aud` when given) and returns its claims.
    fn verify(&self, token: &str, alg: Algorithm, iss: Option<&str>, aud: Option<&str>) -> Value {
        assert_eq!(decode_header(token).unwrap().alg, alg, "{token}");
        let mut v = Validation::new(alg);
        if let Some(iss) = iss {
            v.set_issuer(&[iss]);
        }
        match aud {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        decode::<Value>(token, &self.decoding_key(alg), &v).unwrap_or_else(|e| panic!("{alg:?} {token}: {e}")).claims
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn plan(args: &[&str]) -> Result<Plan, String> {
    let mut v = vec!["throng-bench"];
    v.extend_from_slice(args);
    Plan::from_args(&Args::try_parse_from(v).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

fn bench(args: &[String], worker: bool) -> Report {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = plan(&args).expect("valid arguments");
    let w = if worker {
        WorkerCommand { exe: env!("CARGO_BIN_EXE_throng-bench").into(), args: args.iter().map(Into::into).collect() }
    } else {
        WorkerCommand::default()
    };
    run(&p, &w).expect("run completes")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` of a JWS ES256 signature (`r || s`, 32 bytes each), as openssl
/// wants it.
fn ecdsa_der(sig: &[u8]) -> Vec<u8> {
    let int = |x: &[u8]| {
        let mut v: Vec<u8> = x.iter().copied().skip_while(|&b| b == 0).collect();
        if v.first().is_none_or(|&b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut o = vec![0x02, v.len() as u8];
        o.extend(v);
        o
    };
    let body = [int(&sig[..32]), int(&sig[32..])].concat();
    [vec![0x30, body.len() as u8], body].concat()
}

/// Checks `token`'s signature with `openssl dgst` and the public key file: independent of jsonwebtoken and
/// ring.
fn openssl_verifies(keys: &Keys, token: &str, public: &Path, es256: bool) {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    if es256 {
        assert_eq!(sig.len(), 64);
        sig = ecdsa_der(&sig);
    }
    keys.write("input.bin", input.as_bytes());
    keys.write("sig.bin", &sig);
    let out = openssl(
        &[
            "dgst",
            "-sha256",
            "-verify",
            public.to_str().unwrap(),
            "-signature",
            keys.path("sig.bin").to_str().unwrap(),
            keys.path("input.bin").to_str().unwrap(),
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out).contains("Verified OK"));
}

#[test]
fn tokens_of_each_algorithm_verify_with_the_public_key_and_carry_the_claims() {
    let keys = Keys::new();
    let url = ["connect", "--url", "ws://127.0.0.1:1"];
    let (rsa, rsa1, ec) = (keys.arg("rsa.pem"), keys.arg("rsa-pkcs1.pem"), keys.arg("ec.pem"));
    let cases = [
        (Algorithm::HS256, vec!["--jwt-secret", SECRET]),
        (Algorithm::HS256, vec!["--jwt-secret", SECRET, "--jwt-alg", "HS256"]),
        // The algorithm follows from the key, or is given and fits it.
        (Algorithm::RS256, vec!["--jwt-private-key", &rsa]),
        (Algorithm::RS256, vec!["--jwt-private-key", &rsa1, "--jwt-alg", "RS256"]),
        (Algorithm::ES256, vec!["--jwt-private-key", &ec]),
        (Algorithm::ES256, vec!["--jwt-private-key", &ec, "--jwt-alg", "ES256"]),
    ];
    for (alg, key) in &cases {
        let extra = ["--jwt-ttl", "120", "--jwt-issuer", "bench-iss", "--jwt-audience", "throng", "--jwt-kid", "k7"];
        let p = plan(&[&url[..], key, &extra].concat()).unwrap();
        let auth = p.auth.as_ref().expect("auth");
        let now = unix_now();
        let token = auth.minter.mint("bench-3", now).unwrap();
        assert_eq!(decode_header(&token).unwrap().kid.as_deref(), Some("k7"));
        let c = keys.verify(&token, *alg, Some("bench-iss"), Some("throng"));
        assert_eq!(c["sub"], "bench-3");
        assert_eq!((c["iat"].as_u64(), c["exp"].as_u64()), (Some(now), Some(now + 120)), "{c}");
        assert_eq!((&c["channels"], &c["publish"]), (&serde_json::json!(["*"]), &serde_json::json!(["*"])));
        assert_eq!((&c["iss"], &c["aud"]), (&Value::from("bench-iss"), &Value::from("throng")));
        // The other keys do not verify it.
        for other in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256].into_iter().filter(|a| a != alg) {
            let mut v = Validation::new(*alg);
            v.validate_aud = false;
            assert!(decode::<Value>(&token, &keys.decoding_key(other), &v).is_err(), "{alg:?} with {other:?}'s key");
        }
        match alg {
            Algorithm::RS256 => openssl_verifies(&keys, &token, &keys.path("rsa.pub.pem"), false),
            Algorithm::ES256 => openssl_verifies(&keys, &token, &keys.path("ec.pub.pem"), true),
            _ => {}
        }
    }
    // Defaults: one hour, no iss/aud; extra claims merged in.
    let p =
        plan(&[&url[..], &["--jwt-private-key", &ec, "--jwt-claims", r#"{"publish":[],"tier":2}"#]].concat()).unwrap();
    let now = unix_now();
    let c = keys.verify(&p.auth.unwrap().minter.mint("bench-0", now).unwrap(), Algorithm::ES256, None, None);
    assert_eq!(c["exp"].as_u64(), Some(now + 3600));
    assert!(c.get("iss").is_none() && c.get("aud").is_none(), "{c}");
    assert_eq!(
        (&c["publish"], &c["tier"], &c["channels"]),
        (&serde_json::json!([]), &Value::from(2), &serde_json::json!(["*"]))
    );
}

#[test]
fn keys_and_algorithms_that_do_not_fit_are_refused() {
    let keys = Keys::new();
    let err = |extra: &[&str]| plan(&[&["connect", "--url", "ws://127.0.0.1:1"][..], extra].concat()).unwrap_err();
    let (rsa, ec) = (keys.arg("rsa.pem"), keys.arg("ec.pem"));
    assert!(err(&["--jwt-private-key", &rsa, "--jwt-alg", "ES256"]).contains("RSA key"));
    assert!(err(&["--jwt-private-key", &ec, "--jwt-alg", "RS256"]).contains("EC key"));
    assert!(err(&["--jwt-private-key", &ec, "--jwt-alg", "HS256"]).contains("--jwt-secret"));
    assert!(err(&["--jwt-secret", SECRET, "--jwt-alg", "RS256"]).contains("private key"));
    assert!(err(&["--jwt-secret", SECRET, "--jwt-private-key", &rsa]).contains("exclude each other"));
    let sec1 = err(&["--jwt-private-key", &keys.arg("ec-sec1.pem")]);
    assert!(sec1.contains("SEC1") && sec1.contains("openssl pkcs8 -topk8 -nocrypt"), "{sec1}");
    assert!(err(&["--jwt-private-key", &keys.arg("p384.pem")]).contains("P-256"));
    keys.write("rsa1024.pem", &openssl(&["genrsa", "1024"], None));
    assert!(err(&["--jwt-private-key", &keys.arg("rsa1024.pem")]).contains("2048 to 4096 bits"));
    assert!(err(&["--jwt-private-key", &keys.arg("rsa.pub.pem")]).contains("needs the private key"));
    assert!(err(&["--jwt-private-key", &keys.arg("missing.pem")]).contains("missing.pem"));
    assert!(err(&["--token-in", "header"]).contains("needs --jwt-secret or --jwt-private-key"));
    assert!(err(&["--jwt-ttl", "60"]).contains("needs --jwt-secret or --jwt-private-key"));
    assert!(err(&["--jwt-secret", SECRET, "--jwt-ttl", "0"]).contains("at least 1"));
    assert!(err(&["--jwt-secret", SECRET, "--jwt-claims", r#"{"sub":"x"}"#]).contains("`sub`"));
    assert!(err(&["--jwt-secret", SECRET, "--token-in", "cookie"]).contains("cookie"));
}

/// Every head carries its token in `token_in` and nowhere else; the tokens verify, with one `sub` per
/// connection. Returns the subjects.
fn check_heads(keys: &Keys, heads: &[Head], alg: Algorithm, token_in: &str) -> BTreeSet<String> {
    let mut subs = BTreeSet::new();
    for h in heads {
        let token = match token_in {
            "query" => {
                assert!(h.bearer.is_none() && h.subprotocols.is_empty(), "{h:?}");
                h.query_token.clone()
            }
            "header" => {
                assert!(h.query_token.is_none() && h.subprotocols.is_empty(), "{h:?}");
                h.bearer.clone()
            }
            "subprotocol" => {
                assert!(h.query_token.is_none() && h.bearer.is_none(), "{h:?}");
                let t = h.subprotocol_token.clone().unwrap();
                assert_eq!(h.subprotocols, vec!["throng.v1".to_string(), format!("bearer.{t}")], "{h:?}");
                Some(t)
            }
            other => panic!("{other}"),
        };
        let token = token.unwrap_or_else(|| panic!("no token in the {token_in}: {h:?}"));
        let c = keys.verify(&token, alg, None, None);
        assert!(subs.insert(c["sub"].as_str().unwrap().to_string()), "one token per connection: {c}");
    }
    subs
}

fn bench_subs(range: std::ops::Range<u64>) -> BTreeSet<String> {
    range.map(|i| format!("bench-{i}")).collect()
}

#[test]
fn the_server_finds_the_token_where_token_in_says() {
    let keys = Keys::new();
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        for token_in in ["query", "header", "subprotocol"] {
            let server = TestServer::start(Options::default());
            let url = server.url();
            let mut args = strings(&["connect", "--url", &url, "--connections", "6", "--threads", "2"]);
            args.extend(strings(&["--hold", "0.2", "--grace", "0", "--token-in", token_in]));
            args.extend(keys.key_args(alg));
            let r = bench(&args, false);
            assert_eq!((r.connect.ready, r.connect.failed), (6, 0), "{alg:?} {token_in}: {r:#?}");
            let heads = server.heads();
            assert_eq!(heads.len(), 6);
            assert_eq!(check_heads(&keys, &heads, alg, token_in), bench_subs(0..6));
            if token_in == "query" {
                assert!(heads.iter().all(|h| h.target.starts_with("/ws?token=")), "{heads:?}");
            }
            if token_in == "subprotocol" {
                assert!(heads.iter().all(|h| h.selected.as_deref() == Some("throng.v1")));
            }
            let (a, c) = (r.auth.as_ref().unwrap(), &r.client);
            assert_eq!((a.alg, a.token_in, a.ttl_s), (format!("{alg:?}").as_str(), token_in, 3600));
            assert_eq!((c.tokens_minted, c.tokens_minted_in_window), (6, 0), "{c:#?}");
            assert!(c.token_mint_ms > 0.0 && c.token_mint_us.unwrap() > 0.0, "{c:#?}");
            assert!(!r.warnings.iter().any(|w| w.contains("token")), "{:?}", r.warnings);
        }
    }
    // A path with a query of its own: the token is appended.
    let server = TestServer::start(Options::default());
    let url = server.url();
    let mut args = strings(&["connect", "--url", &url, "--connections", "2", "--hold", "0.1", "--grace", "0"]);
    args.extend(strings(&["--path", "/ws?room=1", "--jwt-secret", SECRET]));
    let r = bench(&args, false);
    assert_eq!(r.connect.ready, 2, "{r:#?}");
    assert!(server.heads().iter().all(|h| h.target.starts_with("/ws?room=1&token=")), "{:?}", server.heads());
    assert_eq!(check_heads(&keys, &server.heads(), Algorithm::HS256, "query"), bench_subs(0..2));
}

#[test]
fn a_server_that_does_not_select_the_subprotocol_fails_the_upgrade() {
    let server = TestServer::start(Options { no_subprotocol: true, ..Options::default() });
    let url = server.url();
    let mut args = strings(&["connect", "--url", &url, "--connections", "3", "--hold", "0.1", "--grace", "0"]);
    args.extend(strings(&["--jwt-secret", SECRET, "--token-in", "subprotocol"]));
    let r = bench(&args, false);
    assert_eq!((r.connect.ready, r.connect.failed), (0, 3), "{r:#?}");
    assert_eq!(r.connect.errors.get("no_subprotocol"), Some(&3), "{r:#?}");
    // Without the subprotocol the same server is fine.
    args.truncate(args.len() - 2);
    assert_eq!(bench(&args, false).connect.ready, 3);
}

#[test]
fn every_scenario_runs_with_tokens() {
    let keys = Keys::new();
    // Echo, HS256 in the Authorization header.
    let server = TestServer::start(Options::default());
    let url = server.url();
    let mut args = strings(&["echo", "--url", &url, "--connections", "4", "--duration", "0.5", "--grace", "1"]);
    args.extend(strings(&["--jwt-secret", SECRET, "--token-in", "header"]));
    let r = bench(&args, false);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent > 10 && m.lost == 0, "{r:#?}");
    assert_eq!(check_heads(&keys, &server.heads(), Algorithm::HS256, "header"), bench_subs(0..4));
    assert_eq!(r.client.tokens_minted, 4);

    // Throng broadcast over two worker processes, ES256 in the subprotocol: 8 subscribers + 2 publishers.
    let server = TestServer::start(Options::default());
    let url = server.url();
    let mut args = strings(&["broadcast", "--url", &url, "--connections", "8", "--publishers", "2", "--rate", "100"]);
    args.extend(strings(&["--duration", "0.5", "--grace", "1", "--procs", "2", "--token-in", "subprotocol"]));
    args.extend(keys.key_args(Algorithm::ES256));
    let r = bench(&args, true);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(r.connect.ready, 10, "{r:#?}");
    assert!(m.sent >= 25 && m.lost == 0 && m.delivered == m.sent * 8, "{r:#?}");
    assert_eq!(check_heads(&keys, &server.heads(), Algorithm::ES256, "subprotocol"), bench_subs(0..10));
    assert_eq!(r.client.tokens_minted, 10, "{:#?}", r.client);

    // Churn, RS256 in the query: the churn connections' tokens were minted before the ramp too.
    let server = TestServer::start(Options::default());
    let url = server.url();
    let mut args = strings(&["churn", "--target", "raw", "--url", &url, "--connections", "5", "--churn-rate", "40"]);
    args.extend(strings(&["--rate", "20", "--duration", "0.5", "--grace", "1"]));
    args.extend(keys.key_args(Algorithm::RS256));
    let r = bench(&args, false);
    let ch = r.churn.as_ref().unwrap();
    assert!(ch.opened >= 15 && ch.failed == 0, "{r:#?}");
    let heads = server.heads();
    // The last churn connections may still have been connecting at the end.
    assert!((5 + ch.completed..=5 + ch.opened).contains(&(heads.len() as u64)), "{r:#?} {heads:?}");
    let subs = check_heads(&keys, &heads, Algorithm::RS256, "query");
    // Steady connections 0..5, then the churn connections from index 5 on (one thread: consecutive).
    assert!(subs.is_superset(&bench_subs(0..5)) && subs.is_subset(&bench_subs(0..5 + ch.opened)), "{subs:?}");
    // 5 + the churn connections foreseen (0.5 s × 40/s, + 2).
    assert_eq!((r.client.tokens_minted, r.client.tokens_minted_in_window), (5 + 22, 0), "{:#?}", r.client);
}

#[test]
fn a_ttl_shorter_than_the_run_is_reported() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let mut args = strings(&["connect", "--url", &url, "--connections", "2", "--hold", "1.2", "--grace", "0"]);
    args.extend(strings(&["--jwt-secret", SECRET, "--jwt-ttl", "1"]));
    let r = bench(&args, false);
    assert!(r.warnings.iter().any(|w| w.contains("--jwt-ttl")), "{:?}", r.warnings);
}

/// What minting costs on this machine: `cargo nextest run -p throng-bench --run-ignored only mint_cost`
/// (`--cargo-profile release` for optimized figures). Prints per-token figures for 10,000 tokens.
#[test]
#[ignore = "timing, run by hand"]
fn mint_cost() {
    let keys = Keys::new();
    let n = 10_000u64;
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        let args: Vec<String> = [strings(&["connect", "--url", "ws://127.0.0.1:1"]), keys.key_args(alg)].concat();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = plan(&args).unwrap();
        let m = &p.auth.as_ref().unwrap().minter;
        let now = unix_now();
        let t0 = std::time::Instant::now();
        let mut bytes = 0;
        for i in 0..n {
            bytes += m.mint(&format!("bench-{i}"), now).unwrap().len();
        }
        let el = t0.elapsed();
        println!(
            "{alg:?}: {n} tokens in {:.0} ms, {:.1} us each, {} bytes each",
            el.as_secs_f64() * 1e3,
            el.as_secs_f64() * 1e6 / n as f64,
            bytes as u64 / n
        );
    }
}
