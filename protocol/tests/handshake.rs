//! Handshake tests across the public API: interop with tungstenite's client and property tests.

use std::io::{self, Read, Write};

use proptest::prelude::*;
use throng_protocol::handshake::{
    accept_key, parse_request, write_rejection, write_response, write_switching_protocols, HandshakeError, Request,
    Status, DEFAULT_MAX_HEADER_BYTES,
};
use tungstenite::client::IntoClientRequest;

/// Calls every accessor and writer on a parsed request; used to check nothing panics on odd input.
fn exercise(req: &Request<'_>) {
    let _ = (req.method, req.target, req.path, req.query, req.version, req.header_len);
    let _ = (req.host, req.origin, req.upgrade, req.connection_upgrade, req.ws_key, req.ws_version);
    let _ = (req.ws_protocol, req.ws_extensions, req.authorization, req.forwarded_for, req.real_ip);
    let _ = (req.content_length, req.header_count(), req.keep_alive(), req.is_websocket_upgrade());
    let _ = req.header("host");
    let _ = req.header("x-unknown");
    let _ = req.headers().count();
    let _ = req.subprotocols().count();
    let _ = req.subprotocol_bearer();
    let _ = req.offers_subprotocol("throng.v1");
    let _ = req.query_param("token");
    let _ = req.query_param("");
    let _ = req.bearer_token();
    let _ = format!("{req:?}");
    let mut out = Vec::new();
    match req.validate_upgrade() {
        Ok(()) => {
            let key = req.ws_key.unwrap_or_default();
            write_switching_protocols(&mut out, key.as_bytes(), req.subprotocols().next());
        }
        Err(e) => e.write_rejection(&mut out),
    }
    write_rejection(&mut out, Status::Unauthorized, req.path);
    write_response(&mut out, Status::Ok, req.path, &[("X-Path", req.target)], req.target.as_bytes(), false);
}

/// An in-memory stream that plays the server side of the handshake with this crate.
struct Loopback {
    request: Vec<u8>,
    response: Vec<u8>,
    read_pos: usize,
    protocol: Option<&'static str>,
}

impl Write for Loopback {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.request.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Loopback {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.response.is_empty() {
            let req = parse_request(&self.request, DEFAULT_MAX_HEADER_BYTES)
                .expect("tungstenite's request parses")
                .expect("tungstenite sent the whole request before reading");
            assert_eq!(req.header_len, self.request.len());
            match req.validate_upgrade() {
                Ok(()) => {
                    let protocol = self.protocol.filter(|p| req.offers_subprotocol(p));
                    write_switching_protocols(&mut self.response, req.ws_key.unwrap_or_default().as_bytes(), protocol);
                }
                Err(e) => e.write_rejection(&mut self.response),
            }
        }
        let rest = &self.response[self.read_pos..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_pos += n;
        Ok(n)
    }
}

fn loopback(protocol: Option<&'static str>) -> Loopback {
    Loopback { request: Vec::new(), response: Vec::new(), read_pos: 0, protocol }
}

#[test]
fn tungstenite_client_completes_handshake() {
    let (_ws, response) = tungstenite::client("ws://localhost:8080/ws?token=abc", loopback(None)).expect("handshake");
    assert_eq!(response.status().as_u16(), 101);
}

#[test]
fn tungstenite_client_with_subprotocol_token() {
    let mut request = "ws://localhost:8080/ws".into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "throng.v1, bearer.aaa.bbb.ccc".parse().unwrap());
    let (ws, response) = tungstenite::client(request, loopback(Some("throng.v1"))).expect("handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "throng.v1");
    let sent = &ws.get_ref().request;
    let req = parse_request(sent, DEFAULT_MAX_HEADER_BYTES).unwrap().unwrap();
    assert_eq!(req.subprotocol_bearer(), Some("aaa.bbb.ccc"));
    assert_eq!(req.host, Some("localhost:8080"));
    assert_eq!(req.validate_upgrade(), Ok(()));
}

#[test]
fn tungstenite_key_accept_agrees() {
    for _ in 0..32 {
        let key = tungstenite::handshake::client::generate_key();
        assert_eq!(
            &accept_key(key.as_bytes())[..],
            tungstenite::handshake::derive_accept_key(key.as_bytes()).as_bytes()
        );
    }
}

/// Where the generated request carries its token.
#[derive(Clone, Copy, Debug)]
enum TokenAt {
    Query,
    Bearer,
    Subprotocol,
}

/// A valid upgrade request with randomised header case, order and extra headers.
#[derive(Clone, Debug)]
struct Generated {
    bytes: Vec<u8>,
    token: String,
    token_at: TokenAt,
    extras: Vec<(String, String)>,
}

fn recase(name: &str, bits: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| if bits >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
        .collect()
}

fn valid_request() -> impl Strategy<Value = Generated> {
    (
        "[A-Za-z0-9_-]{1,30}\\.[A-Za-z0-9_-]{1,30}\\.[A-Za-z0-9_-]{0,30}",
        prop_oneof![Just(TokenAt::Query), Just(TokenAt::Bearer), Just(TokenAt::Subprotocol)],
        prop::collection::vec(("[A-Za-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..6),
        any::<u64>(),
        any::<[u8; 16]>(),
        Just((0..32usize).collect::<Vec<_>>()).prop_shuffle(),
        prop_oneof![Just("\r\n"), Just("\n")],
    )
        .prop_map(|(token, token_at, extras, case_bits, key_bytes, order, eol)| {
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
            let mut extras: Vec<(String, String)> =
                extras.into_iter().map(|(n, v)| (format!("X-Extra-{n}"), v)).collect();
            let mut seen = std::collections::HashSet::new();
            extras.retain(|(n, _)| seen.insert(n.to_ascii_lowercase()));
            let mut headers: Vec<(String, String)> = vec![
                ("Host".into(), "example.com".into()),
                ("Upgrade".into(), "websocket".into()),
                ("Connection".into(), "keep-alive, Upgrade".into()),
                ("Sec-WebSocket-Version".into(), "13".into()),
                ("Sec-WebSocket-Key".into(), key),
            ];
            match token_at {
                TokenAt::Query => {}
                TokenAt::Bearer => headers.push(("Authorization".into(), format!("Bearer {token}"))),
                TokenAt::Subprotocol => {
                    headers.push(("Sec-WebSocket-Protocol".into(), format!("throng.v1, bearer.{token}")))
                }
            }
            headers.extend(extras.iter().cloned());
            // Shuffle by the generated permutation (restricted to the indices that exist).
            let mut shuffled: Vec<(String, String)> = order.iter().filter_map(|&i| headers.get(i).cloned()).collect();
            for (i, (name, _)) in shuffled.iter_mut().enumerate() {
                *name = recase(name, case_bits.rotate_left(i as u32 * 7));
            }
            let target = match token_at {
                TokenAt::Query => format!("/ws?v=1&token={}", token.replace('-', "%2D")),
                _ => "/ws".to_string(),
            };
            let mut s = format!("GET {target} HTTP/1.1{eol}");
            for (name, value) in &shuffled {
                s.push_str(&format!("{name}: {value}{eol}"));
            }
            s.push_str(eol);
            Generated { bytes: s.into_bytes(), token, token_at, extras }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), max in 0usize..4096) {
        if let Ok(Some(req)) = parse_request(&bytes, max) {
            prop_assert!(req.header_len <= max && req.header_len <= bytes.len());
            exercise(&req);
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        generated in valid_request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = generated.bytes.clone();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        match parse_request(&bytes, DEFAULT_MAX_HEADER_BYTES) {
            Ok(Some(req)) => exercise(&req),
            Ok(None) => {}
            Err(e) => {
                let mut out = Vec::new();
                e.write_rejection(&mut out);
                prop_assert!(out.starts_with(b"HTTP/1.1 4") || out.starts_with(b"HTTP/1.1 5"));
            }
        }
    }

    #[test]
    fn random_splits_give_the_same_request(
        generated in valid_request(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let head = &generated.bytes;
        let full = parse_request(head, DEFAULT_MAX_HEADER_BYTES).unwrap().unwrap();
        prop_assert_eq!(full.header_len, head.len());
        prop_assert_eq!(full.validate_upgrade(), Ok(()));
        exercise(&full);

        let token = match generated.token_at {
            TokenAt::Query => full.query_param("token").map(|t| t.into_owned()),
            TokenAt::Bearer => full.bearer_token().map(str::to_owned),
            TokenAt::Subprotocol => full.subprotocol_bearer().map(str::to_owned),
        };
        prop_assert_eq!(token.as_deref(), Some(generated.token.as_str()));
        for (name, value) in &generated.extras {
            prop_assert_eq!(full.header(name), Some(value.trim()));
        }

        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(head.len())).collect();
        cuts.sort_unstable();
        for cut in cuts {
            prop_assert_eq!(parse_request(&head[..cut], DEFAULT_MAX_HEADER_BYTES), Ok(None));
        }
        let mut with_body = head.clone();
        with_body.extend_from_slice(&body);
        prop_assert_eq!(parse_request(&with_body, DEFAULT_MAX_HEADER_BYTES), Ok(Some(full.clone())));
        // A bound below the head size turns every long-enough prefix into 431, never a different request.
        let bound = head.len() - 1;
        prop_assert_eq!(
            parse_request(&with_body, bound),
            Err(HandshakeError::HeadersTooLarge { limit: bound })
        );
    }
}

/// The fuzz seeds double as a corpus with known outcomes, named by prefix.
#[test]
fn fuzz_seeds_have_their_expected_outcomes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/handshake");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("seed directory") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = parse_request(&bytes, DEFAULT_MAX_HEADER_BYTES);
        if name.starts_with("valid_") {
            let req = parsed.unwrap().unwrap_or_else(|| panic!("{name}: incomplete"));
            assert_eq!(req.validate_upgrade(), Ok(()), "{name}");
            exercise(&req);
        } else if name.starts_with("http_") {
            let req = parsed.unwrap().unwrap_or_else(|| panic!("{name}: incomplete"));
            assert!(!req.is_websocket_upgrade(), "{name}");
            assert_eq!(Some(bytes.len() - req.header_len), req.content_length.or(Some(0)), "{name}");
        } else if name.starts_with("bad_") {
            let status = match parsed {
                Err(e) => e.status(),
                Ok(Some(req)) => req.validate_upgrade().unwrap_err().status(),
                Ok(None) => panic!("{name}: incomplete"),
            };
            assert!((400..500).contains(&status.code()) || status == Status::NotImplemented, "{name}");
        } else if name.starts_with("partial_") {
            assert_eq!(parsed, Ok(None), "{name}");
        } else if name.starts_with("huge_") || name.starts_with("too_many_") {
            assert_eq!(parsed.unwrap_err().status(), Status::HeaderFieldsTooLarge, "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 12, "only {seen} seeds");
}

/// An upgrade request announcing a body is refused (400): its body would be read as WebSocket frames.
/// `Content-Length: 0` is harmless and accepted.
#[test]
fn upgrade_with_a_body_is_refused() {
    let base = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let with = |cl: &str| format!("{base}Content-Length: {cl}\r\n\r\n");
    let body = with("5");
    let req = parse_request(body.as_bytes(), DEFAULT_MAX_HEADER_BYTES).unwrap().unwrap();
    let err = req.validate_upgrade().unwrap_err();
    assert_eq!(err, throng_protocol::handshake::UpgradeError::HasBody);
    assert_eq!(err.status().code(), 400);
    let empty = with("0");
    let req = parse_request(empty.as_bytes(), DEFAULT_MAX_HEADER_BYTES).unwrap().unwrap();
    assert_eq!(req.validate_upgrade(), Ok(()));
}
