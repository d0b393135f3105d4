//! The backend HTTP API (`/api/*`) against the real `throng` binary over real sockets, on both drivers:
//! every endpoint's success and refusals (missing or wrong key, API disabled, malformed body, oversized
//! body refused before it is sent, chunked body, wrong method, unknown path), keep-alive with pipelined
//! requests answered in order, `Connection: close`, idle and slow-body deadlines, publishes reaching
//! WebSocket subscribers on other shards with the offsets the API returned, batches, history, presence,
//! disconnecting a user's connections on two shards, channel paging, API connections that vanish while
//! their requests wait for other shards, and the admin listener.
//!
//! Servers run with `--shards 2`; channel names are picked by their home shard
//! (`throng::channel::home_of`), and a WebSocket's shard is read from its `welcome`.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::v1::{poll_until, Ws};
use support::{find, v1, Driver, Server};

on_both_drivers! {
    keep_alive_and_pipelining => keep_alive_and_pipelining_uring, keep_alive_and_pipelining_epoll;
    refusals_on_every_endpoint => refusals_on_every_endpoint_uring, refusals_on_every_endpoint_epoll;
    api_disabled_without_key => api_disabled_without_key_uring, api_disabled_without_key_epoll;
    bodies_are_bounded => bodies_are_bounded_uring, bodies_are_bounded_epoll;
    bodies_wait_for_the_key => bodies_wait_for_the_key_uring, bodies_wait_for_the_key_epoll;
    publish_reaches_subscribers_on_other_shards =>
        publish_reaches_subscribers_on_other_shards_uring, publish_reaches_subscribers_on_other_shards_epoll;
    presence_and_history => presence_and_history_uring, presence_and_history_epoll;
    disconnect_closes_a_users_connections_on_every_shard =>
        disconnect_closes_a_users_connections_on_every_shard_uring,
        disconnect_closes_a_users_connections_on_every_shard_epoll;
    channels_are_paged => channels_are_paged_uring, channels_are_paged_epoll;
    connections_gone_while_waiting => connections_gone_while_waiting_uring, connections_gone_while_waiting_epoll;
}

const SHARDS: usize = 2;
const KEY: &str = "test-api-key-0123456789";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn start(driver: Driver, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

/// The first name `<prefix>-<i>` homed on shard `home`.
fn homed(prefix: &str, home: usize) -> String {
    v1::homed(prefix, home, SHARDS)
}

/// One HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Checks the status, `Content-Type: application/json` and returns the body as JSON.
    fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}\n{}", self.head, String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("application/json"), "{}", self.head);
        self.json()
    }

    /// Checks an error response: status, JSON `error` code and a non-empty reason.
    fn expect_error(&self, status: u16, code: &str) -> Value {
        let v = self.expect(status);
        assert_eq!(v["error"], code, "{v}");
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        v
    }
}

/// A keep-alive HTTP client over one connection.
struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Http { stream, buf: Vec::new() }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one response (head, then `Content-Length` bytes of body).
    fn read(&mut self) -> Resp {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let len: usize = head
                    .split("\r\n")
                    .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
                    .map_or(0, |(_, v)| v.trim().parse().expect("Content-Length"));
                if self.buf.len() >= end + 4 + len {
                    let body = self.buf[end + 4..end + 4 + len].to_vec();
                    self.buf.drain(..end + 4 + len);
                    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
                    return Resp { status, head, body };
                }
            }
            let mut tmp = [0u8; 65536];
            let n = self.stream.read(&mut tmp).unwrap_or_else(|e| panic!("reading a response: {e}"));
            assert!(n > 0, "EOF before a whole response: {:?}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Checks the server closes the connection (EOF) with nothing more sent, within `within`.
    fn expect_eof(&mut self, within: Duration) {
        self.stream.set_read_timeout(Some(within)).expect("timeout");
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "expected EOF, got {:?}", String::from_utf8_lossy(&rest)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected EOF within {within:?}: {e}"),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.write(&request(method, path, body, Some(KEY), ""));
        self.read()
    }
}

/// A request's bytes: `key` as `Authorization: apikey`, `extra` headers (each ending in CRLF).
fn request(method: &str, path: &str, body: Option<&str>, key: Option<&str>, extra: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}");
    if let Some(k) = key {
        r.push_str(&format!("Authorization: apikey {k}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

fn publish_body(channel: &str, data: Value) -> String {
    json!({"channel": channel, "data": data}).to_string()
}

/// Requests on one connection one after another, then pipelined in one write and answered in order,
/// `Connection: close` honoured, an idle connection and a slow body closed after `handshake_timeout`.
fn keep_alive_and_pipelining(driver: Driver) {
    let srv = start(driver, &["--handshake-timeout", "1"]);
    let (a, b) = (homed("chat:ka", 0), homed("chat:ka", 1));
    let mut h = Http::connect(srv.addr);
    for i in 1..=3u64 {
        let v = h.call("POST", "/api/publish", Some(&publish_body(&a, json!({"n": i})))).expect(200);
        assert_eq!(v["offsets"][0]["offset"], i, "{v}");
        let v = h.call("GET", &format!("/api/history?channel={a}"), None).expect(200);
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(i as usize), "{v}");
    }
    // The plain endpoints keep the connection too.
    h.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(h.read().status, 200);
    // Pipelined: publishes to channels homed on both shards (one of them is another shard than this
    // connection's, so its answer comes through the rings), history, an error, a plain endpoint; answered
    // in the order asked.
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend(request("POST", "/api/publish", Some(&publish_body(&b, json!(i))), Some(KEY), ""));
        batch.extend(request("POST", "/api/publish", Some(&publish_body(&a, json!(i))), Some(KEY), ""));
    }
    batch.extend(request("GET", &format!("/api/history?channel={b}"), None, Some(KEY), ""));
    batch.extend(request("GET", "/api/nope", None, Some(KEY), ""));
    batch.extend(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    h.write(&batch);
    for i in 0..5u64 {
        let v = h.read().expect(200);
        assert_eq!((v["offsets"][0]["channel"].as_str(), v["offsets"][0]["offset"].as_u64()), (Some(&*b), Some(i + 1)));
        let v = h.read().expect(200);
        assert_eq!((v["offsets"][0]["channel"].as_str(), v["offsets"][0]["offset"].as_u64()), (Some(&*a), Some(i + 4)));
    }
    let v = h.read().expect(200);
    let offsets: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5], "{v}");
    h.read().expect_error(404, "not_found");
    assert_eq!(h.read().status, 200);
    // The same connection can still be upgraded after plain requests.
    let mut up = Http::connect(srv.addr);
    up.call("GET", &format!("/api/presence?channel={a}"), None).expect(200);
    up.write(support::upgrade_request("/echo", support::SAMPLE_KEY).as_bytes());
    let r = up.read();
    assert_eq!(r.status, 101, "{}", r.head);
    up.write(&support::client_frame(true, throng_protocol::frame::OpCode::Text, b"still here"));
    let mut echo = [0u8; 12];
    up.stream.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"\x81\x0astill here");
    // Connection: close: answered, then closed.
    h.write(&request("GET", &format!("/api/presence?channel={a}"), None, Some(KEY), "Connection: close\r\n"));
    let r = h.read();
    r.expect(200);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    h.expect_eof(IO_TIMEOUT);
    // A waiting (cross-shard) request with Connection: close is closed after its answer too.
    for ch in [&a, &b] {
        let mut h = Http::connect(srv.addr);
        h.write(&request(
            "POST",
            "/api/publish",
            Some(&publish_body(ch, json!(0))),
            Some(KEY),
            "Connection: close\r\n",
        ));
        h.read().expect(200);
        h.expect_eof(IO_TIMEOUT);
    }
    // HTTP/1.0 without keep-alive closes.
    let mut h = Http::connect(srv.addr);
    h.write(b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(h.read().status, 200);
    h.expect_eof(IO_TIMEOUT);
    // An idle kept-alive connection is closed after handshake_timeout (1 s), quietly.
    let mut h = Http::connect(srv.addr);
    h.call("GET", &format!("/api/presence?channel={a}"), None).expect(200);
    let t = Instant::now();
    h.expect_eof(Duration::from_secs(4));
    assert!(t.elapsed() >= Duration::from_millis(800), "closed after {:?}", t.elapsed());
    // A body that does not finish arriving is cut at the same deadline.
    let mut h = Http::connect(srv.addr);
    let head =
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nContent-Length: 100\r\n\r\n");
    h.write(head.as_bytes());
    h.write(b"{\"channel\"");
    let t = Instant::now();
    h.expect_eof(Duration::from_secs(4));
    assert!(t.elapsed() >= Duration::from_millis(800), "closed after {:?}", t.elapsed());
    // A body trickled in small pieces within the deadline is fine.
    let mut h = Http::connect(srv.addr);
    let req = request("POST", "/api/publish", Some(&publish_body(&b, json!("slow"))), Some(KEY), "");
    for piece in req.chunks(7) {
        h.write(piece);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(h.read().expect(200)["offsets"][0]["offset"], 7);
    assert_eq!(srv.metric("throng_handshake_timeouts_total"), 1, "only the slow body timed out");
}

/// Sends a request refused on its head with `status` and `code`. Without a body: on the kept connection
/// `h`, which stays open. With one: on a new connection, only the head sent; the answer comes without the
/// body, says `Connection: close`, and the connection is closed.
fn refused_on_head(
    h: &mut Http,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
    extra: &str,
    (status, code): (u16, &str),
) -> Resp {
    let bytes = request(method, path, body, key, extra);
    let Some(b) = body.filter(|b| !b.is_empty()) else {
        h.write(&bytes);
        let r = h.read();
        r.expect_error(status, code);
        return r;
    };
    let mut fresh = Http::connect(h.stream.peer_addr().expect("peer"));
    fresh.write(&bytes[..bytes.len() - b.len()]);
    let r = fresh.read();
    r.expect_error(status, code);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    fresh.expect_eof(IO_TIMEOUT);
    r
}

/// Every endpoint: no key, a wrong key (also one differing only in its last byte, and a longer one), a
/// wrong method (405 with Allow), a malformed body or query (400), an unknown path (404). A refused request
/// with a body is answered on its head and closed; one without keeps its connection.
fn refusals_on_every_endpoint(driver: Driver) {
    let srv = start(driver, &[]);
    let mut h = Http::connect(srv.addr);
    let ch = homed("chat:r", 1);
    let endpoints: [(&str, String, Option<String>); 5] = [
        ("POST", "/api/publish".into(), Some(publish_body(&ch, json!(1)))),
        ("POST", "/api/disconnect".into(), Some(json!({"user": "nobody"}).to_string())),
        ("GET", format!("/api/presence?channel={ch}"), None),
        ("GET", format!("/api/history?channel={ch}"), None),
        ("GET", "/api/channels".into(), None),
    ];
    let mut last = KEY.to_string();
    last.pop();
    last.push('X');
    let longer = format!("{KEY}0");
    for (method, path, body) in &endpoints {
        // Success first.
        h.write(&request(method, path, body.as_deref(), Some(KEY), ""));
        h.read().expect(200);
        for key in [None, Some("wrong"), Some(&*last), Some(&*longer), Some("")] {
            let r = refused_on_head(&mut h, method, path, body.as_deref(), key, "", (401, "unauthorized"));
            assert_eq!(r.header("www-authenticate"), Some("apikey"));
        }
        // Another scheme with the right key.
        let bearer = format!("Authorization: Bearer {KEY}\r\n");
        refused_on_head(&mut h, method, path, body.as_deref(), None, &bearer, (401, "unauthorized"));
        let other = if *method == "GET" { "POST" } else { "GET" };
        let r = refused_on_head(&mut h, other, path, body.as_deref(), Some(KEY), "", (405, "method_not_allowed"));
        assert_eq!(r.header("allow"), Some(*method), "{}", r.head);
    }
    // Malformed bodies.
    for body in [
        "",
        "{",
        "[1]",
        "not json",
        r#"{"channel":"chat:x"}"#,
        r#"{"data":1}"#,
        r#"{"channel":1,"data":1}"#,
        r#"{"channel":"chat:x","data":1,"extra":2}"#,
        r#"{"channel":"bad name!","data":1}"#,
        r#"{"batch":[]}"#,
        r#"{"channel":"chat:x","data":1,"batch":[]}"#,
        r#"{"channel":"chat:x","data":{"unclosed":1}"#,
    ] {
        h.write(&request("POST", "/api/publish", Some(body), Some(KEY), ""));
        h.read().expect_error(400, "bad_request");
    }
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"channel": "chat:x", "data": i})).collect();
    h.write(&request("POST", "/api/publish", Some(&json!({"batch": too_many}).to_string()), Some(KEY), ""));
    h.read().expect_error(400, "bad_request");
    for body in [
        "{}",
        r#"{"user":"a","client":"0-1-0"}"#,
        r#"{"user":"a","code":1000}"#,
        r#"{"user":"a","code":5000}"#,
        r#"{"user":"has space"}"#,
        r#"{"user":"a","reason":1}"#,
    ] {
        h.write(&request("POST", "/api/disconnect", Some(body), Some(KEY), ""));
        h.read().expect_error(400, "bad_request");
    }
    for path in [
        "/api/presence",
        "/api/presence?channel=bad%20name",
        "/api/history",
        "/api/history?channel=a&since=1",
        "/api/history?channel=a&since=x&epoch=e",
        "/api/history?channel=a&limit=0",
        "/api/history?channel=a&limit=1001",
        "/api/channels?limit=0",
        "/api/channels?limit=x",
    ] {
        h.write(&request("GET", path, None, Some(KEY), ""));
        h.read().expect_error(400, "bad_request");
    }
    for path in ["/api/nope", "/api", "/api/publish/x", "/api/Publish"] {
        h.write(&request("GET", path, None, Some(KEY), ""));
        h.read().expect_error(404, "not_found");
        refused_on_head(&mut h, "POST", path, Some("{}"), Some(KEY), "", (404, "not_found"));
    }
    // Every refusal kept the connection; a last request still works.
    h.call("GET", "/api/channels", None).expect(200);
    assert!(srv.metric("throng_api_unauthorized_total") >= 30);
    assert!(srv.metric("throng_api_method_not_allowed_total") >= 5);
    assert!(srv.metric("throng_api_bad_request_total") >= 20);
}

/// No key configured: every API path answers 404; a key under 16 bytes is refused at start.
fn api_disabled_without_key(driver: Driver) {
    let srv = Server::start(driver, &["--shards", "2"]);
    let mut h = Http::connect(srv.addr);
    for (method, path) in [
        ("POST", "/api/publish"),
        ("POST", "/api/disconnect"),
        ("GET", "/api/presence?channel=a"),
        ("GET", "/api/history?channel=a"),
        ("GET", "/api/channels"),
        ("GET", "/api/nope"),
    ] {
        let body = (method == "POST").then_some("{}");
        let v = refused_on_head(&mut h, method, path, body, Some(KEY), "", (404, "not_found")).json();
        assert_eq!(v["reason"], "api disabled: set api_key", "{v}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_throng"))
        .args(["--check-config", "--api-key", "fifteen-bytes!!"])
        .env_remove("THRONG_API_KEY")
        .output()
        .expect("run throng");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api_key must be at least 16 bytes"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_throng"))
        .args(["--check-config"])
        .env("THRONG_API_KEY", KEY)
        .output()
        .expect("run throng");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(KEY), "the key is never printed");
}

/// A body over max_api_body_bytes is refused with 413 before it is sent; a chunked body with 411; a body
/// at the bound is served.
fn bodies_are_bounded(driver: Driver) {
    let srv = start(driver, &["--max-api-body-bytes", "4096"]);
    // The head alone, announcing too much: the 413 comes without a byte of the body sent.
    let mut h = Http::connect(srv.addr);
    h.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: 4097\r\n\r\n");
    let r = h.read();
    let v = r.expect_error(413, "payload_too_large");
    assert!(v["reason"].as_str().unwrap().contains("max_api_body_bytes"), "{v}");
    h.expect_eof(IO_TIMEOUT);
    let mut h = Http::connect(srv.addr);
    h.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n");
    h.read().expect_error(413, "payload_too_large");
    h.expect_eof(IO_TIMEOUT);
    let mut h = Http::connect(srv.addr);
    h.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n");
    h.read().expect_error(411, "length_required");
    h.expect_eof(IO_TIMEOUT);
    // Exactly at the bound: served (the data is padded with spaces inside a string).
    let ch = homed("chat:big", 1);
    let shell = publish_body(&ch, json!(""));
    let data = "x".repeat(4096 - shell.len());
    let body = publish_body(&ch, json!(data));
    assert_eq!(body.len(), 4096);
    let mut h = Http::connect(srv.addr);
    h.call("POST", "/api/publish", Some(&body)).expect(200);
    // A large body (a batch of 1000 messages, ~900 KB under the default 1 MiB bound), sent in pieces: read
    // into one buffer reserved for it, then answered.
    let srv = start(driver, &[]);
    let (c0, c1) = (homed("chat:large", 0), homed("chat:large", 1));
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"channel": if i % 2 == 0 { &c0 } else { &c1 }, "data": format!("{i:0>880}")}))
        .collect();
    let body = json!({"batch": items}).to_string();
    assert!(body.len() > 900_000 && body.len() < 1 << 20, "{}", body.len());
    let mut h = Http::connect(srv.addr);
    let req = request("POST", "/api/publish", Some(&body), Some(KEY), "");
    for piece in req.chunks(100_000) {
        h.write(piece);
        std::thread::sleep(Duration::from_millis(5));
    }
    let v = h.read().expect(200);
    assert_eq!(v["offsets"].as_array().map(Vec::len), Some(1000));
    assert_eq!(v["offsets"][999]["offset"], 500);
    let v = h.call("GET", &format!("/api/history?channel={c1}&limit=1"), None).expect(200);
    assert_eq!(v["messages"][0]["data"], format!("{:0>880}", 999));
    // Expect: 100-continue (what curl sends with a body over 1 KiB): the 100 comes before the body is sent.
    let body = publish_body(&c0, json!("x".repeat(2000)));
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    h.write(head.as_bytes());
    let r = h.read();
    assert_eq!(r.status, 100, "{}", r.head);
    h.write(body.as_bytes());
    assert_eq!(h.read().expect(200)["offsets"][0]["offset"], 501);
    // A body the shard's budget for unfinished input cannot hold: 503, closed.
    let srv = start(driver, &["--max-unfinished-bytes", "65536"]);
    let mut h = Http::connect(srv.addr);
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nContent-Length: 100000\r\n\r\n"
    );
    h.write(head.as_bytes());
    h.write(b"{");
    h.read().expect_error(503, "unavailable");
    h.expect_eof(IO_TIMEOUT);
    // Data over max_message_size is refused (it could not be delivered to a client's backlog).
    let srv = start(driver, &["--max-message-size", "1000", "--max-backlog-bytes", "65536"]);
    let mut h = Http::connect(srv.addr);
    let r = h.call("POST", "/api/publish", Some(&publish_body(&ch, json!("y".repeat(1000)))));
    r.expect_error(400, "bad_request");
    h.call("POST", "/api/publish", Some(&publish_body(&ch, json!("y".repeat(990))))).expect(200);
    assert!(srv.metric("throng_api_requests_total") >= 2);
}

/// A request refused on its head (a wrong key here) is answered as soon as the head arrives, before any of
/// its body is read or even sent: `401`, `Connection: close`, closed; never a `100 Continue`. A body sent
/// to a plain endpoint is not read either. A hundred such connections kept open mid-body (1 MB announced,
/// 256 KB of it sent) make the server hold nothing for them; the right key still gets its body read, sent
/// in pieces after a `100 Continue`.
fn bodies_wait_for_the_key(driver: Driver) {
    const ANNOUNCED: usize = 1_000_000;
    let srv = start(driver, &[]);
    let head = |key: &str, extra: &str| {
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {key}\r\n{extra}\
             Content-Type: application/json\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
        )
    };
    let wrong = "wrong-key-0123456789";
    // The head alone: the 401 comes without a byte of the body sent (the server waited for none).
    let mut h = Http::connect(srv.addr);
    h.write(head(wrong, "").as_bytes());
    let r = h.read();
    r.expect_error(401, "unauthorized");
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    h.expect_eof(IO_TIMEOUT);
    // Expect: 100-continue with the wrong key: the first and only response is the 401.
    let mut h = Http::connect(srv.addr);
    h.write(head(wrong, "Expect: 100-continue\r\n").as_bytes());
    h.read().expect_error(401, "unauthorized");
    h.expect_eof(IO_TIMEOUT);
    // A body to a plain endpoint: answered from the head, closed.
    let mut h = Http::connect(srv.addr);
    h.write(format!("GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {ANNOUNCED}\r\n\r\n").as_bytes());
    let r = h.read();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")), "{}", r.head);
    h.expect_eof(IO_TIMEOUT);
    // A hundred connections announcing 1 MB each with the wrong key, each then sending 256 KB of it anyway
    // and staying open: nothing is held for them (before the key was checked on the head, each would have
    // had its body buffer reserved and filled: 100 MB announced, up to max_unfinished_bytes held).
    let rss_before = srv.rss_bytes();
    let piece = vec![b' '; 64 * 1024];
    let mut open = Vec::new();
    for _ in 0..100 {
        let mut h = Http::connect(srv.addr);
        h.write(head(wrong, "").as_bytes());
        h.read().expect_error(401, "unauthorized");
        // Discarded while the connection closes (or refused with a reset once it has): never kept.
        for _ in 0..4 {
            if h.stream.write_all(&piece).is_err() {
                break;
            }
        }
        open.push(h);
    }
    // At most a few bytes of some read in flight (a Vec's smallest capacity is 8): under load a gauge
    // sampled mid-turn once showed 8. A body kept would show hundreds of kilobytes here.
    let held = srv.metric("throng_unfinished_bytes");
    assert!(held <= 4096, "{held} unfinished bytes held for 100 refused bodies");
    let grown = srv.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 8 << 20, "RSS grew by {grown} bytes with 100 refused bodies open");
    assert!(srv.metric("throng_api_unauthorized_total") >= 102);
    // The right key: a 100 Continue, then a body of ~210 KB sent in pieces, read and served.
    let ch = homed("chat:pieces", 1);
    let items: Vec<Value> = (0..100).map(|i| json!({"channel": ch, "data": format!("{i:0>2000}")})).collect();
    let body = json!({"batch": items}).to_string();
    let mut h = Http::connect(srv.addr);
    h.write(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nExpect: 100-continue\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(h.read().status, 100);
    for part in body.as_bytes().chunks(20_000) {
        h.write(part);
        std::thread::sleep(Duration::from_millis(5));
    }
    let v = h.read().expect(200);
    assert_eq!(v["offsets"].as_array().map(Vec::len), Some(100), "{v}");
    assert_eq!(v["offsets"][99]["offset"], 100);
    // Kept alive after the success.
    h.call("GET", &format!("/api/history?channel={ch}&limit=1"), None).expect(200);
    drop(open);
    drop(h);
    // Nothing stays counted once the connections are gone.
    let deadline = Instant::now() + IO_TIMEOUT;
    while srv.metric("throng_unfinished_bytes") != 0 {
        assert!(Instant::now() < deadline, "unfinished bytes still counted with every connection closed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publishes through the API reach WebSocket subscribers on both shards with the offsets the API
/// returned; a batch of 100 over channels homed on both shards; client and API publishes share offsets.
fn publish_reaches_subscribers_on_other_shards(driver: Driver) {
    let srv = start(driver, &[]);
    let (c0, c1) = (homed("chat:p", 0), homed("chat:p", 1));
    let mut subs: Vec<Ws> = (0..SHARDS).map(|s| Ws::connect_where(&srv, &format!("sub{s}"), |x| x == s)).collect();
    for s in &mut subs {
        s.subscribe(&c0, None);
        s.subscribe(&c1, None);
    }
    let mut h = Http::connect(srv.addr);
    for (i, ch) in [&c0, &c1, &c0, &c1].into_iter().enumerate() {
        let v = h.call("POST", "/api/publish", Some(&publish_body(ch, json!({"i": i, "s": "é\"\\"})))).expect(200);
        let o = &v["offsets"][0];
        assert_eq!(o["channel"], **ch, "{v}");
        assert_eq!(o["epoch"].as_str().map(str::len), Some(16), "{v}");
        for s in &mut subs {
            let m = s.recv();
            assert_eq!((m["type"].as_str(), m["channel"].as_str()), (Some("message"), Some(ch.as_str())), "{m}");
            assert_eq!(m["offset"], o["offset"], "{m} vs {v}");
            assert_eq!(m["data"], json!({"i": i, "s": "é\"\\"}), "{m}");
        }
    }
    // The subscribed epoch is the one the API reports.
    let sub_epoch = subs[0].call(json!({"type": "history", "channel": c1, "limit": 1}))["epoch"].clone();
    let v = h.call("POST", "/api/publish", Some(&publish_body(&c1, json!("e")))).expect(200);
    assert_eq!(v["offsets"][0]["epoch"], sub_epoch);
    for s in &mut subs {
        s.recv();
    }
    // A client publish and an API publish share the channel's offsets.
    let client_offset = subs[1].publish(&c0, json!("from a client"));
    let v = h.call("POST", "/api/publish", Some(&publish_body(&c0, json!("from the api")))).expect(200);
    assert_eq!(v["offsets"][0]["offset"].as_u64(), Some(client_offset + 1));
    for s in &mut subs {
        assert_eq!(s.recv()["offset"].as_u64(), Some(client_offset));
        assert_eq!(s.recv()["offset"].as_u64(), Some(client_offset + 1));
    }
    // A batch of 100, alternating channels: offsets in request order, each subscriber gets all 100.
    let items: Vec<Value> =
        (0..100).map(|i| json!({"channel": if i % 2 == 0 { &c0 } else { &c1 }, "data": {"b": i}})).collect();
    let v = h.call("POST", "/api/publish", Some(&json!({"batch": items}).to_string())).expect(200);
    let offsets = v["offsets"].as_array().expect("offsets");
    assert_eq!(offsets.len(), 100);
    let mut expected: BTreeMap<(String, u64), i64> = BTreeMap::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (i, o) in offsets.iter().enumerate() {
        let (ch, off) = (o["channel"].as_str().unwrap().to_string(), o["offset"].as_u64().unwrap());
        assert_eq!(ch, items[i]["channel"].as_str().unwrap());
        if let Some(prev) = last.insert(ch.clone(), off) {
            assert_eq!(off, prev + 1, "consecutive offsets per channel: {v}");
        }
        expected.insert((ch, off), i as i64);
    }
    for s in &mut subs {
        let mut got = BTreeMap::new();
        for _ in 0..100 {
            let m = s.recv();
            got.insert(
                (m["channel"].as_str().unwrap().to_string(), m["offset"].as_u64().unwrap()),
                m["data"]["b"].as_i64().unwrap(),
            );
        }
        assert_eq!(got, expected);
        assert!(s.recv_within(Duration::from_millis(100)).is_none());
    }
    assert_eq!(srv.metric("throng_api_published_total"), 4 + 1 + 1 + 100);
}

/// History and presence through the API, on channels homed on either shard.
fn presence_and_history(driver: Driver) {
    let srv = start(driver, &[]);
    let mut h = Http::connect(srv.addr);
    for home in 0..SHARDS {
        let ch = homed(&format!("chat:ph{home}"), home);
        // A channel nobody used: empty, and nothing created.
        let v = h.call("GET", &format!("/api/presence?channel={ch}"), None).expect(200);
        assert_eq!((v["count"].as_u64(), v["users"].as_array().map(Vec::len)), (Some(0), Some(0)), "{v}");
        let mut alice = Ws::connect(&srv, "alice");
        alice.subscribe(&ch, None);
        let mut bob = Ws::connect(&srv, "bob");
        bob.subscribe(&ch, None);
        let v = h.call("GET", &format!("/api/presence?channel={ch}"), None).expect(200);
        assert_eq!(v["channel"], ch);
        assert_eq!(v["count"], 2, "{v}");
        let users: Vec<&str> = v["users"].as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
        assert_eq!(users, ["alice", "bob"], "{v}");
        for i in 0..5 {
            h.call("POST", "/api/publish", Some(&publish_body(&ch, json!({"h": i})))).expect(200);
        }
        let v = h.call("GET", &format!("/api/history?channel={ch}"), None).expect(200);
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 5, "{v}");
        assert_eq!(msgs[4]["data"], json!({"h": 4}));
        assert_eq!(v["offset"], 5);
        let epoch = v["epoch"].as_str().unwrap().to_string();
        let v = h.call("GET", &format!("/api/history?channel={ch}&since=3&epoch={epoch}&limit=10"), None).expect(200);
        let offs: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!((offs, v["recovered"].as_bool()), (vec![4, 5], Some(true)), "{v}");
        let v = h.call("GET", &format!("/api/history?channel={ch}&limit=2"), None).expect(200);
        let offs: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!(offs, [4, 5], "the newest: {v}");
        let v = h.call("GET", &format!("/api/history?channel={ch}&since=3&epoch=0000000000000000"), None).expect(200);
        assert_eq!(v["recovered"], false, "{v}");
        // Alice and bob got the five messages.
        for ws in [&mut alice, &mut bob] {
            for i in 0..5 {
                assert_eq!(ws.recv()["data"], json!({"h": i}));
            }
        }
        drop(alice);
        let v = poll_until(IO_TIMEOUT, || {
            let v = h.call("GET", &format!("/api/presence?channel={ch}"), None).expect(200);
            if v["count"] == 1 {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        });
        assert_eq!(v["users"][0]["user"], "bob");
    }
    // Presence off in a namespace: refused.
    let cfg = std::env::temp_dir().join(format!("throng-api-ns-{}-{driver:?}.toml", std::process::id()));
    std::fs::write(&cfg, "[namespace.quiet]\npresence = false\n").unwrap();
    let srv = start(driver, &["--config", cfg.to_str().unwrap()]);
    let mut h = Http::connect(srv.addr);
    h.call("GET", "/api/presence?channel=quiet:a", None).expect_error(400, "not_available");
    h.call("GET", "/api/presence?channel=nope:a", None).expect_error(400, "unknown_namespace");
    h.call("POST", "/api/publish", Some(&publish_body("nope:a", json!(1)))).expect_error(400, "unknown_namespace");
}

/// `POST /api/disconnect` closes every connection of a user on both shards with the code and reason, or
/// one client by its id; other users are untouched.
fn disconnect_closes_a_users_connections_on_every_shard(driver: Driver) {
    let srv = start(driver, &[]);
    let mut bobs: Vec<Ws> = (0..SHARDS).map(|s| Ws::connect_where(&srv, "bob", |x| x == s)).collect();
    let mut carol = Ws::connect(&srv, "carol");
    let mut dave = Ws::connect_where(&srv, "dave", |s| s != carol.shard);
    let mut h = Http::connect(srv.addr);
    let v = h
        .call("POST", "/api/disconnect", Some(&json!({"user": "bob", "code": 4321, "reason": "bye bob"}).to_string()))
        .expect(200);
    assert_eq!(v, json!({"disconnected": 2}));
    for b in &mut bobs {
        let (_, close) = b.read_until_close();
        let close = close.expect("a close frame");
        assert_eq!((u16::from(close.code), close.reason.as_str()), (4321, "bye bob"));
    }
    assert_eq!(carol.call(json!({"type": "ping"}))["type"], "pong");
    // Nobody left of that user.
    let v = h.call("POST", "/api/disconnect", Some(&json!({"user": "bob"}).to_string())).expect(200);
    assert_eq!(v, json!({"disconnected": 0}));
    // One client by id, the default code and reason; the same user's other connections stay.
    let mut carol2 = Ws::connect_where(&srv, "carol", |s| s != carol.shard);
    let v = h.call("POST", "/api/disconnect", Some(&json!({"client": carol.client}).to_string())).expect(200);
    assert_eq!(v, json!({"disconnected": 1}));
    let close = carol.read_until_close().1.expect("a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4000, "disconnected by the server"));
    assert_eq!(carol2.call(json!({"type": "ping"}))["type"], "pong");
    assert_eq!(dave.call(json!({"type": "ping"}))["type"], "pong");
    // A stale or malformed id closes nobody.
    for id in [carol.client.as_str(), "7-1-0", "zz", "0-0-0-0"] {
        let v = h.call("POST", "/api/disconnect", Some(&json!({"client": id}).to_string())).expect(200);
        assert_eq!(v, json!({"disconnected": 0}), "{id}");
    }
    assert_eq!(srv.metric("throng_api_disconnected_total"), 3);
}

/// `GET /api/channels`: every channel with subscribers, by name, subscribers summed over shards, in pages.
fn channels_are_paged(driver: Driver) {
    let srv = start(driver, &[]);
    let mut h = Http::connect(srv.addr);
    let v = h.call("GET", "/api/channels", None).expect(200);
    assert_eq!(v, json!({"channels": [], "next_cursor": null}));
    let mut conns: Vec<Ws> = (0..SHARDS).map(|s| Ws::connect_where(&srv, &format!("u{s}"), |x| x == s)).collect();
    let mut want = BTreeMap::new();
    for i in 0..7 {
        let name = format!("chat:room{i}");
        conns[0].subscribe(&name, None);
        let mut n = 1;
        // The first five on both shards: each shard alone has more than a page of the same names.
        if i < 5 {
            conns[1].subscribe(&name, None);
            n += 1;
        }
        want.insert(name, n);
    }
    let mut got = BTreeMap::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let v = h.call("GET", &format!("/api/channels?limit=3&cursor={cursor}"), None).expect(200);
        pages += 1;
        let list = v["channels"].as_array().unwrap();
        assert!(list.len() <= 3, "{v}");
        for c in list {
            got.insert(c["channel"].as_str().unwrap().to_string(), c["subscribers"].as_u64().unwrap());
        }
        match v["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(list.len(), 3);
                assert_eq!(list.last().unwrap()["channel"], next);
                cursor = next.to_string();
            }
            None => break,
        }
    }
    // The barrier channels of the helper are not subscribed here: exactly the rooms.
    assert_eq!(got, want);
    assert_eq!(pages, 3);
    let v = h.call("GET", "/api/channels?limit=1000", None).expect(200);
    assert_eq!(v["channels"].as_array().unwrap().len(), 7);
    assert_eq!(v["next_cursor"], Value::Null);
}

/// API connections that vanish (closed, or reset) while their requests wait for other shards disturb
/// neither the shard nor anyone else; the answers are dropped.
fn connections_gone_while_waiting(driver: Driver) {
    let srv = start(driver, &[]);
    let (c0, c1) = (homed("chat:g", 0), homed("chat:g", 1));
    let mut sub = Ws::connect(&srv, "watcher");
    sub.subscribe(&c0, None);
    sub.subscribe(&c1, None);
    let items: Vec<Value> =
        (0..20).map(|i| json!({"channel": if i % 2 == 0 { &c0 } else { &c1 }, "data": i})).collect();
    let batch = json!({"batch": items}).to_string();
    let mut sent = 0;
    for round in 0..40 {
        let h = Http::connect(srv.addr);
        let mut w = h.stream;
        let mut bytes = Vec::new();
        for _ in 0..3 {
            bytes.extend(request("POST", "/api/publish", Some(&batch), Some(KEY), ""));
            bytes.extend(request("POST", "/api/disconnect", Some(r#"{"user":"nobody"}"#), Some(KEY), ""));
            bytes.extend(request("GET", "/api/channels", None, Some(KEY), ""));
        }
        w.write_all(&bytes).expect("write");
        if round % 2 == 0 {
            // Reset at once: SO_LINGER 0.
            socket2::SockRef::from(&w).set_linger(Some(Duration::ZERO)).expect("linger");
        }
        drop(w);
        sent += 1;
    }
    assert_eq!(sent, 40);
    // The connections closed with a FIN had their requests read (and some waited for the other shard).
    poll_until(IO_TIMEOUT, || {
        let n = srv.metric("throng_api_requests_total");
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} API requests"))
        }
    });
    // The shard goes on: a new API connection is answered, the subscriber gets what it publishes.
    let mut h = Http::connect(srv.addr);
    let v = h.call("POST", "/api/publish", Some(&publish_body(&c1, json!("after")))).expect(200);
    let want = v["offsets"][0]["offset"].as_u64().unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    let m = loop {
        let m = sub.recv();
        if m["data"] == "after" {
            break m;
        }
        assert!(Instant::now() < deadline, "no \"after\" within {IO_TIMEOUT:?}");
    };
    assert_eq!(m["offset"].as_u64(), Some(want));
    // Nothing is left waiting, and the connections went away.
    poll_until(IO_TIMEOUT, || {
        let stats = srv.stats();
        let open: u64 = stats["connections"].as_u64().unwrap_or(u64::MAX);
        // The subscriber, the API connection above and this /stats request.
        if open <= 3 {
            Ok(())
        } else {
            Err(format!("{open} connections open: {stats}"))
        }
    });
    assert_eq!(sub.call(json!({"type": "ping"}))["type"], "pong");
    let health = srv.get("/health");
    assert_eq!(health.status, 200);
}

on_both_drivers! {
    admin_listener_serves_the_api_and_metrics => admin_listener_uring, admin_listener_epoll;
}

/// A `throng` started directly (the harness's `Server` reads `/stats` on the main port, which an admin
/// listener takes away). Killed on drop.
struct Raw(std::process::Child);

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("probe port").port()
}

/// With `--admin-listen`: `/metrics`, `/stats` and `/api/*` only there (404 on the main port, which keeps
/// `/health` and the WebSocket endpoints); no WebSocket on the admin port.
fn admin_listener_serves_the_api_and_metrics(driver: Driver) {
    let (main, admin): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{}", free_port()).parse().unwrap(), format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_throng"))
        .args(["--listen", &main.to_string(), "--admin-listen", &admin.to_string(), "--driver", driver.flag()])
        .args(["--shards", "2", "--api-key", KEY])
        .env_remove("THRONG_API_KEY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn throng");
    let _guard = Raw(child);
    poll_until(Duration::from_secs(10), || {
        let mut h = TcpStream::connect(main).map_err(|e| e.to_string())?;
        h.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let _ = h.read_to_end(&mut out);
        if out.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out).into_owned())
        }
    });
    let ch = homed("chat:adm", 1);
    let mut public = Http::connect(main);
    let body = publish_body(&ch, json!(1));
    let r = refused_on_head(&mut public, "POST", "/api/publish", Some(&body), Some(KEY), "", (404, "not_found"));
    assert_eq!(r.json()["reason"], "the API is served on admin_listen");
    public.call("GET", "/api/channels", None).expect_error(404, "not_found");
    for path in ["/metrics", "/stats"] {
        public.write(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        public.read().expect_error(404, "not_found");
    }
    public.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(public.read().status, 200);
    let stream = TcpStream::connect(main).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let (mut ws, _) = tungstenite::client(format!("ws://{main}/ws?user=viewer"), stream).expect("upgrade");
    assert_eq!(ws_text(&mut ws)["type"], "welcome");
    ws.send(tungstenite::Message::text(json!({"type": "subscribe", "channel": ch}).to_string())).expect("send");
    assert_eq!(ws_text(&mut ws)["type"], "subscribed");
    let mut private = Http::connect(admin);
    let v = private.call("POST", "/api/publish", Some(&publish_body(&ch, json!("admin")))).expect(200);
    let m = ws_text(&mut ws);
    assert_eq!((m["data"].as_str(), m["offset"].as_u64()), (Some("admin"), v["offsets"][0]["offset"].as_u64()));
    private.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = private.read();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("throng_api_requests_total"));
    private.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(private.read().expect(200)["shards"], 2);
    // No WebSocket on the admin port.
    let mut up = Http::connect(admin);
    up.write(support::upgrade_request("/ws", support::SAMPLE_KEY).as_bytes());
    up.read().expect_error(404, "not_found");
}

/// The next text message of a tungstenite client, as JSON.
fn ws_text(ws: &mut tungstenite::WebSocket<TcpStream>) -> Value {
    loop {
        if let tungstenite::Message::Text(t) = ws.read().expect("read") {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}
