//! The HTTP fallback transports against the real `throng` binary over real sockets, on both drivers:
//! `GET /sse` streams receiving what `POST /api/publish` publishes on channels homed on both shards,
//! resuming after a disconnect through `Last-Event-ID` without loss while history covers the gap and
//! saying `recovered:false` when it does not; the refusals before a stream starts (401 without a token,
//! 403 for a forbidden channel, 400 for a bad one); a slow SSE reader closed past `max_backlog_bytes` (or,
//! in a `drop_oldest` namespace, sent `gap` events) while another reader of the channel gets everything;
//! `POST /api/disconnect` ending a user's streams; CORS preflights and headers. `GET /poll`
//! long-polls answered at once from history or held until the next message (or `--poll-timeout`), resuming
//! from the positions they return, `recovered:false` past history, on kept-alive connections. `POST /publish`
//! with a client's token and publish permission, to channels homed on either shard, reaching SSE readers.
//!
//! Servers run with `--shards 2`; channel names are picked by their home shard.

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{v1, Driver, Server};

on_both_drivers! {
    sse_receives_and_resumes => sse_receives_and_resumes_uring, sse_receives_and_resumes_epoll;
    sse_not_recovered => sse_not_recovered_uring, sse_not_recovered_epoll;
    sse_refusals => sse_refusals_uring, sse_refusals_epoll;
    sse_slow_reader_closed => sse_slow_reader_closed_uring, sse_slow_reader_closed_epoll;
    sse_slow_reader_drop_oldest => sse_slow_reader_drop_oldest_uring, sse_slow_reader_drop_oldest_epoll;
    cors => cors_uring, cors_epoll;
    poll_receives_and_resumes => poll_receives_and_resumes_uring, poll_receives_and_resumes_epoll;
    poll_not_recovered_and_refusals => poll_not_recovered_and_refusals_uring, poll_not_recovered_and_refusals_epoll;
    publish_from_fallback_clients => publish_from_fallback_clients_uring, publish_from_fallback_clients_epoll;
}

const SHARDS: usize = 2;
const KEY: &str = "test-api-key-0123456789";
const SECRET: &str = "a test secret of at least thirty-two bytes!";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const CONFIG: &str = r#"
[namespace.chat]
history_size = 1000

[namespace.small]
history_size = 3

[namespace.slowc]
slow_consumer = "close"

[namespace.lossy]
slow_consumer = "drop_oldest"

[namespace.secret]
"#;

/// The config file (written once per test process).
fn config_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    v1::config_file(&PATH, "fallback", CONFIG)
}

fn start(driver: Driver, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--api-key", KEY, "--jwt-secret", SECRET, "--config", config_path()];
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

/// A token for `sub` that may subscribe to `chat:*`, `small:*`, `slowc:*` and `lossy:*` (not `secret:*`).
fn token(sub: &str) -> String {
    token_with(sub, &[])
}

/// [`token`] that may also publish to `publish` patterns.
fn token_with(sub: &str, publish: &[&str]) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let claims =
        json!({"sub": sub, "exp": exp, "channels": ["chat:*", "small:*", "slowc:*", "lossy:*"], "publish": publish});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

/// The first name `<prefix>-<i>` homed on shard `home`.
fn homed(prefix: &str, home: usize) -> String {
    v1::homed(prefix, home, SHARDS)
}

/// `POST /api/publish` of `data` to each channel in order (one batch); the offsets.
fn publish(srv: &Server, msgs: &[(&str, Value)]) -> Vec<u64> {
    let batch: Vec<Value> = msgs.iter().map(|(c, d)| json!({"channel": c, "data": d})).collect();
    let body = json!({ "batch": batch }).to_string();
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: apikey {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = http(srv, &req);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    v["offsets"].as_array().expect("offsets").iter().map(|o| o["offset"].as_u64().expect("offset")).collect()
}

/// One request on a fresh connection, read to its end: status, head, body.
fn http(srv: &Server, req: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(req.as_bytes()).expect("write");
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let end = support::find(&all, b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
    (status, head, all[end..].to_vec())
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Event {
    event: String,
    data: Value,
}

/// A raw EventSource: reads events and keeps the last event id as a browser does.
struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
    last_id: Option<String>,
    head: String,
}

impl Sse {
    /// Opens `/sse?<query>` with `extra` header lines; `Err((status, head, body))` when refused.
    fn open(srv: &Server, query: &str, extra: &str) -> Result<Sse, (u16, String, String)> {
        Self::open_on(TcpStream::connect(srv.addr).expect("connect"), query, extra)
    }

    fn open_on(mut stream: TcpStream, query: &str, extra: &str) -> Result<Sse, (u16, String, String)> {
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let req = format!("GET /sse?{query} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{extra}\r\n");
        stream.write_all(req.as_bytes()).expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = support::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).expect("reading the head");
            assert!(n > 0, "EOF before the response head: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
        if status != 200 {
            let mut rest = buf[end..].to_vec();
            let _ = stream.read_to_end(&mut rest);
            return Err((status, head, String::from_utf8_lossy(&rest).to_string()));
        }
        assert_eq!(header(&head, "content-type"), Some("text/event-stream"), "{head}");
        Ok(Sse { stream, buf: buf[end..].to_vec(), last_id: None, head })
    }

    /// The next event (id-only blocks and comments are taken in passing), or `None` at EOF or when none
    /// comes within `wait`.
    fn next_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = support::find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8(block).expect("UTF-8 events");
                let (mut event, mut data, mut has_data) = ("message".to_string(), String::new(), false);
                for line in text.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, value) = line.split_once(':').map_or((line, ""), |(f, v)| (f, v));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => self.last_id = Some(value.to_string()),
                        "event" => event = value.to_string(),
                        "data" => {
                            if has_data {
                                data.push('\n');
                            }
                            data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if has_data {
                    let data =
                        serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data not JSON ({e}): {data}"));
                    return Some(Event { event, data });
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.stream.set_read_timeout(Some(deadline - now)).expect("timeout");
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
                Err(_) => return None,
            }
        }
    }

    fn next(&mut self) -> Event {
        self.next_within(IO_TIMEOUT).expect("an event within the timeout")
    }

    /// Reads what is already on its way (the `id:` line behind the last messages).
    fn settle(&mut self) {
        if let Some(e) = self.next_within(Duration::from_millis(300)) {
            panic!("an unexpected event: {e:?}");
        }
    }
}

/// Reads the welcome and one `subscribed` per channel; returns the `subscribed` objects by channel.
fn expect_start(sse: &mut Sse, channels: &[&str]) -> Vec<Value> {
    let w = sse.next();
    assert_eq!((w.event.as_str(), w.data["type"].as_str()), ("welcome", Some("welcome")), "{w:?}");
    let mut subs = Vec::new();
    while subs.len() < channels.len() {
        let e = sse.next();
        assert_eq!(e.event, "subscribed", "{e:?}");
        subs.push(e.data);
    }
    channels
        .iter()
        .map(|c| subs.iter().find(|s| s["channel"] == *c).unwrap_or_else(|| panic!("no subscribed for {c}")).clone())
        .collect()
}

fn expect_message(e: &Event, channel: &str, offset: u64) -> Value {
    assert_eq!(e.event, "message", "{e:?}");
    assert_eq!((e.data["channel"].as_str(), e.data["offset"].as_u64()), (Some(channel), Some(offset)), "{e:?}");
    e.data["data"].clone()
}

fn sse_receives_and_resumes(driver: Driver) {
    let srv = start(driver, &[]);
    let (a, b) = (homed("chat:a", 0), homed("chat:b", 1));
    let q = format!("channel={}&channel={}&token={}", a.replace(':', "%3A"), b, token("alice"));
    let mut sse = Sse::open(&srv, &q, "").expect("stream");
    assert_eq!(header(&sse.head, "cache-control"), Some("no-store"));
    for s in expect_start(&mut sse, &[&a, &b]) {
        assert_eq!((s["offset"].as_u64(), s["recovered"].as_bool()), (Some(0), Some(false)), "{s}");
    }
    // Messages on both channels, pretty-printed data included, arrive in order with their offsets.
    let offs = publish(&srv, &[(&a, json!({"n": 1})), (&b, json!({"n": 1})), (&a, json!({"n": 2, "s": "x\ny"}))]);
    assert_eq!(offs, [1, 1, 2]);
    let mut got: Vec<(String, u64, Value)> = Vec::new();
    for _ in 0..3 {
        let e = sse.next();
        let ch = e.data["channel"].as_str().expect("channel").to_string();
        let off = e.data["offset"].as_u64().expect("offset");
        got.push((ch.clone(), off, expect_message(&e, &ch, off)));
    }
    got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    assert_eq!(got[0], (a.clone(), 1, json!({"n": 1})));
    assert_eq!(got[1], (a.clone(), 2, json!({"n": 2, "s": "x\ny"})));
    assert_eq!(got[2], (b.clone(), 1, json!({"n": 1})));
    // A pretty-printed body: one data line, the same JSON.
    let body = "{\"channel\": \"".to_string() + &b + "\",\n \"data\": {\n  \"pretty\": true\n }\n}";
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(http(&srv, &req).0, 200);
    assert_eq!(expect_message(&sse.next(), &b, 2), json!({"pretty": true}));
    sse.settle();
    let id = sse.last_id.clone().expect("an id line");
    assert_eq!(id.split(',').count(), 2, "one position per channel: {id}");
    assert!(id.split(',').all(|p| p.len() > 17 && p.as_bytes()[16] == b':'), "{id}");
    drop(sse);

    // Missed while disconnected: resumed through history on both channels, nothing lost or repeated.
    let offs = publish(&srv, &[(&a, json!({"n": 3})), (&b, json!({"n": 3})), (&a, json!({"n": 4}))]);
    assert_eq!(offs, [3, 3, 4]);
    let mut sse = Sse::open(&srv, &q, &format!("Last-Event-ID: {id}\r\n")).expect("stream");
    let w = sse.next();
    assert_eq!(w.event, "welcome");
    let mut seen = Vec::new();
    let mut subscribed = 0;
    while subscribed < 2 || seen.len() < 3 {
        let e = sse.next();
        if e.event == "subscribed" {
            assert_eq!(e.data["recovered"], true, "{e:?}");
            subscribed += 1;
        } else {
            let ch = e.data["channel"].as_str().expect("channel").to_string();
            let off = e.data["offset"].as_u64().expect("offset");
            seen.push((ch.clone(), off, expect_message(&e, &ch, off)["n"].as_u64()));
        }
    }
    seen.sort();
    let mut want = vec![(a.clone(), 3, Some(3)), (a.clone(), 4, Some(4)), (b.clone(), 3, Some(3))];
    want.sort();
    assert_eq!(seen, want);
    // And live again after the replay.
    publish(&srv, &[(&b, json!({"n": 4}))]);
    assert_eq!(expect_message(&sse.next(), &b, 4), json!({"n": 4}));
    sse.settle();
    // The id now names both new positions: a fresh stream from it gets nothing old.
    let id = sse.last_id.clone().expect("id");
    drop(sse);
    let mut sse = Sse::open(&srv, &q, &format!("Last-Event-ID: {id}\r\n")).expect("stream");
    for s in expect_start(&mut sse, &[&a, &b]) {
        assert_eq!(s["recovered"], true, "{s}");
    }
    sse.settle();
    // `since=` on the URL works like Last-Event-ID.
    let q2 = format!("{q}&since={}", id.replace(':', "%3A").replace(',', "%2C"));
    let mut sse = Sse::open(&srv, &q2, "").expect("stream");
    for s in expect_start(&mut sse, &[&a, &b]) {
        assert_eq!(s["recovered"], true, "{s}");
    }
    sse.settle();
    // The backend's disconnect ends the user's streams with a close event.
    let body = json!({"user": "alice", "code": 4000, "reason": "bye"}).to_string();
    let req = format!(
        "POST /api/disconnect HTTP/1.1\r\nHost: t\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _, resp) = http(&srv, &req);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let close = sse.next();
    assert_eq!((close.event.as_str(), close.data["code"].as_u64()), ("close", Some(4000)), "{close:?}");
    assert!(sse.next_within(IO_TIMEOUT).is_none(), "the stream ends after close");
}

fn sse_not_recovered(driver: Driver) {
    let srv = start(driver, &[]);
    let (s0, s1) = (homed("small:x", 0), homed("small:y", 1));
    let q = format!("channel={s0}&channel={s1}&token={}", token("bob"));
    let mut sse = Sse::open(&srv, &q, "").expect("stream");
    expect_start(&mut sse, &[&s0, &s1]);
    publish(&srv, &[(&s0, json!(1)), (&s1, json!(1))]);
    sse.next();
    sse.next();
    sse.settle();
    let id = sse.last_id.clone().expect("id");
    drop(sse);
    // Five more on s0 (history keeps 3): not recoverable; one more on s1: recovered.
    publish(
        &srv,
        &[(&s0, json!(2)), (&s0, json!(3)), (&s0, json!(4)), (&s0, json!(5)), (&s0, json!(6)), (&s1, json!(2))],
    );
    let mut sse = Sse::open(&srv, &q, &format!("Last-Event-ID: {id}\r\n")).expect("stream");
    assert_eq!(sse.next().event, "welcome");
    let mut events = Vec::new();
    while events.iter().filter(|e: &&Event| e.event == "subscribed").count() < 2 || events.len() < 3 {
        events.push(sse.next());
    }
    sse.settle();
    let sub = |c: &str| {
        events.iter().find(|e| e.event == "subscribed" && e.data["channel"] == c).expect("subscribed").data.clone()
    };
    assert_eq!((sub(&s0)["recovered"].as_bool(), sub(&s0)["offset"].as_u64()), (Some(false), Some(6)));
    assert_eq!(sub(&s1)["recovered"], true);
    let msgs: Vec<&Event> = events.iter().filter(|e| e.event == "message").collect();
    assert_eq!(msgs.len(), 1, "{events:?}");
    assert_eq!(expect_message(msgs[0], &s1, 2), json!(2));
    // A Last-Event-ID that does not fit these channels starts afresh.
    drop(sse);
    let mut sse = Sse::open(&srv, &q, "Last-Event-ID: nonsense\r\n").expect("stream");
    for s in expect_start(&mut sse, &[&s0, &s1]) {
        assert_eq!(s["recovered"], false, "{s}");
    }
}

fn sse_refusals(driver: Driver) {
    let srv = start(driver, &[]);
    let refused = |query: &str, extra: &str| match Sse::open(&srv, query, extra) {
        Ok(_) => panic!("{query} was not refused"),
        Err((status, head, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {head}{body}"));
            (status, v["reason"].as_str().unwrap_or_default().to_string())
        }
    };
    assert_eq!(refused("channel=chat:a", "").0, 401);
    assert_eq!(refused("channel=chat:a&token=garbage", "").0, 401);
    let t = token("carol");
    let (status, reason) = refused(&format!("channel=chat:a&channel=secret:x&token={t}"), "");
    assert_eq!(status, 403, "{reason}");
    assert!(reason.contains("secret:x"), "{reason}");
    assert_eq!(refused(&format!("token={t}"), "").0, 400);
    assert_eq!(refused(&format!("channel=nope:x&token={t}"), "").0, 400);
    assert_eq!(refused(&format!("channel=chat:a&channel=chat:a&token={t}"), "").0, 400);
    assert_eq!(refused(&format!("channel=chat:a&since=bad&token={t}"), "").0, 400);
    let many: String = (0..65).map(|i| format!("channel=chat:m{i}&")).collect();
    assert_eq!(refused(&format!("{many}token={t}"), "").0, 400);
    // The token may come as Authorization: Bearer too.
    let mut sse = Sse::open(&srv, "channel=chat:a", &format!("Authorization: Bearer {t}\r\n")).expect("stream");
    expect_start(&mut sse, &["chat:a"]);
    let (status, head, _) = http(&srv, "POST /sse?channel=chat:a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405, "{head}");
}

/// Messages of about 1 KiB published while a reader keeps up.
const FLOOD: u64 = 3000;
const BATCH: u64 = 25;

fn sse_slow_reader_closed(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let ch = homed("slowc:flood", 1);
    let (mut slow, mut normal) = slow_and_normal(&srv, &ch);
    flood(&srv, &ch, &mut normal);
    // The slow one reads: whole messages in order, then the close event (4008), then the end.
    let mut n = 0;
    let close = loop {
        let e = slow.next_within(IO_TIMEOUT).expect("the slow stream ends with a close event");
        if e.event == "close" {
            break e;
        }
        n += 1;
        expect_message(&e, &ch, n);
    };
    assert_eq!(close.data["code"], 4008, "{close:?}");
    assert!(n < FLOOD, "the slow reader got everything: not slow");
    assert!(slow.next_within(IO_TIMEOUT).is_none(), "the stream ends after close");
    assert!(srv.metric("throng_slow_consumers_total") >= 1);
    // The other reader is still served.
    publish(&srv, &[(&ch, json!({"n": FLOOD + 1}))]);
    assert_eq!(expect_message(&normal.next(), &ch, FLOOD + 1)["n"], FLOOD + 1);
}

fn cors(driver: Driver) {
    let srv = start(driver, &["--allowed-origins", "https://app.example"]);
    let preflight = |origin: &str| {
        http(
            &srv,
            &format!(
                "OPTIONS /sse HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let (status, head, _) = preflight("https://app.example");
    assert_eq!(status, 204, "{head}");
    assert_eq!(header(&head, "access-control-allow-origin"), Some("https://app.example"), "{head}");
    assert_eq!(header(&head, "access-control-allow-credentials"), Some("true"), "{head}");
    assert!(header(&head, "access-control-allow-headers").is_some_and(|h| h.contains("Authorization")), "{head}");
    assert!(header(&head, "access-control-allow-methods").is_some_and(|h| h.contains("GET")), "{head}");
    assert_eq!(preflight("https://evil.example").0, 403);
    // The stream itself carries the header; another origin is refused before it starts.
    let q = format!("channel=chat:c&token={}", token("erin"));
    let sse = Sse::open(&srv, &q, "Origin: https://app.example\r\n").expect("stream");
    assert_eq!(header(&sse.head, "access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(header(&sse.head, "vary"), Some("Origin"));
    assert!(matches!(Sse::open(&srv, &q, "Origin: https://evil.example\r\n"), Err((403, _, _))));
    // A refusal for an allowed origin is readable by it.
    let Err((status, head, _)) = Sse::open(&srv, "channel=chat:c", "Origin: https://app.example\r\n") else {
        panic!("no token, no stream")
    };
    assert_eq!(status, 401);
    assert_eq!(header(&head, "access-control-allow-origin"), Some("https://app.example"), "{head}");
    drop(srv);
    // Without allowed_origins every origin is allowed, as `*` and without credentials.
    let srv = start(driver, &[]);
    let sse = Sse::open(&srv, &q, "Origin: https://any.example\r\n").expect("stream");
    assert_eq!(header(&sse.head, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&sse.head, "access-control-allow-credentials"), None);
}

/// `GET /poll?<query>` on a fresh connection: status, JSON body, how long it took.
fn poll(srv: &Server, query: &str) -> (u16, Value, Duration) {
    let t0 = Instant::now();
    let (status, head, body) =
        http(srv, &format!("GET /poll?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"));
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {head}{}", String::from_utf8_lossy(&body)));
    (status, v, t0.elapsed())
}

/// The `since` parameters for the positions of a poll answer.
fn since_of(answer: &Value) -> String {
    answer["positions"]
        .as_object()
        .expect("positions")
        .iter()
        .filter_map(|(c, p)| Some(format!("&since={c}:{}", p.as_str()?)))
        .collect()
}

fn poll_receives_and_resumes(driver: Driver) {
    let srv = start(driver, &["--poll-timeout", "1"]);
    let (a, b) = (homed("chat:pa", 0), homed("chat:pb", 1));
    let q = format!("channel={a}&channel={b}&token={}", token("frank"));
    // Held until the next message on either channel.
    let (status, first, took) = std::thread::scope(|s| {
        let waiter = s.spawn(|| poll(&srv, &q));
        std::thread::sleep(Duration::from_millis(300));
        publish(&srv, &[(&b, json!({"n": 1}))]);
        waiter.join().expect("poll")
    });
    assert_eq!(status, 200, "{first}");
    assert!(took >= Duration::from_millis(250), "answered before the publish: {took:?} {first}");
    let msgs = first["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1, "{first}");
    assert_eq!((msgs[0]["channel"].as_str(), msgs[0]["offset"].as_u64()), (Some(b.as_str()), Some(1)));
    assert_eq!(msgs[0]["data"], json!({"n": 1}));
    assert_eq!(first["recovered"], true);
    assert!(first["positions"][&a].as_str().is_some_and(|p| p.ends_with(":0")), "{first}");
    assert!(first["positions"][&b].as_str().is_some_and(|p| p.ends_with(":1")), "{first}");
    // Missed between polls: answered at once from history, in order per channel.
    publish(&srv, &[(&a, json!({"n": 1})), (&b, json!({"n": 2})), (&a, json!({"n": 2}))]);
    let (status, second, took) = poll(&srv, &format!("{q}{}", since_of(&first)));
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(900), "{took:?}");
    let got: Vec<(String, u64)> = second["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["channel"].as_str().expect("channel").to_string(), m["offset"].as_u64().expect("offset")))
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, [(a.clone(), 1), (a.clone(), 2), (b.clone(), 2)], "{second}");
    assert_eq!(second["recovered"], true);
    // Nothing new: held for the poll timeout, then an empty answer with the same positions.
    let (status, third, took) = poll(&srv, &format!("{q}{}", since_of(&second)));
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(third["messages"], json!([]));
    assert_eq!(third["positions"], second["positions"]);
    // Kept alive: the connection serves the next request after a poll's answer.
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    publish(&srv, &[(&a, json!({"n": 3}))]);
    let req = format!(
        "GET /poll?{q}{} HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        since_of(&third)
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert!(text.contains("\"n\":3"), "{text}");
}

fn poll_not_recovered_and_refusals(driver: Driver) {
    let srv = start(driver, &["--poll-timeout", "1"]);
    let (s0, s1) = (homed("small:p", 0), homed("small:q", 1));
    let t = token("gina");
    let q = format!("channel={s0}&channel={s1}&token={t}");
    publish(&srv, &[(&s0, json!(1)), (&s1, json!(1))]);
    let (_, first, _) = poll(&srv, &format!("{q}&since={s0}:{}:0", "0".repeat(16)));
    // An old epoch: not recoverable, answered at once with the current position.
    assert_eq!(first["recovered"], false, "{first}");
    assert_eq!(first["not_recovered"], json!([s0]), "{first}");
    assert!(first["positions"][&s0].as_str().is_some_and(|p| p.ends_with(":1")), "{first}");
    let pos = since_of(&first);
    publish(&srv, &[(&s0, json!(2)), (&s0, json!(3)), (&s0, json!(4)), (&s0, json!(5)), (&s1, json!(2))]);
    let (_, second, _) = poll(&srv, &format!("{q}{pos}"));
    // s1 at its position 1 gets 2; s0 at 1 lost 2 (history keeps 3..=5): not recovered.
    assert_eq!(second["recovered"], false, "{second}");
    assert_eq!(second["not_recovered"], json!([s0]), "{second}");
    let msgs = second["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1, "{second}");
    assert_eq!((msgs[0]["channel"].as_str(), msgs[0]["data"].as_u64()), (Some(s1.as_str()), Some(2)));
    // Refusals before anything is held.
    assert_eq!(poll(&srv, &format!("channel={s0}")).0, 401);
    assert_eq!(poll(&srv, &format!("channel=secret:x&token={t}")).0, 403);
    assert_eq!(poll(&srv, &format!("channel={s0}&since=nonsense&token={t}")).0, 400);
}

fn publish_request(token: Option<&str>, body: &str, close: bool) -> String {
    format!(
        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}{}\r\n{body}",
        body.len(),
        token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n")),
        if close { "Connection: close\r\n" } else { "" },
    )
}

fn publish_from_fallback_clients(driver: Driver) {
    let srv = start(driver, &[]);
    let (a, b) = (homed("chat:fa", 0), homed("chat:fb", 1));
    let q = format!("channel={a}&channel={b}&token={}", token("hank"));
    let mut sse = Sse::open(&srv, &q, "").expect("stream");
    expect_start(&mut sse, &[&a, &b]);
    let t = token_with("ivy", &["chat:*"]);
    // Pipelined on one kept-alive connection, to both homes: answered in order with the offsets.
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut reqs = String::new();
    for (i, ch) in [&a, &b, &b, &a].iter().enumerate() {
        let body = json!({"channel": ch, "data": {"i": i}}).to_string();
        reqs += &publish_request(Some(&t), &body, i == 3);
    }
    s.write_all(reqs.as_bytes()).expect("write");
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all).to_string();
    let bodies: Vec<Value> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            assert!(r.starts_with("200"), "{text}");
            serde_json::from_str(&r[r.find("\r\n\r\n").expect("head") + 4..]).expect("JSON")
        })
        .collect();
    let got: Vec<(String, u64)> = bodies
        .iter()
        .map(|v| (v["channel"].as_str().expect("channel").into(), v["offset"].as_u64().expect("offset")))
        .collect();
    assert_eq!(got, [(a.clone(), 1), (b.clone(), 1), (b.clone(), 2), (a.clone(), 2)]);
    let mut seen: Vec<(String, u64, Value)> = (0..4)
        .map(|_| {
            let e = sse.next();
            let ch = e.data["channel"].as_str().expect("channel").to_string();
            let off = e.data["offset"].as_u64().expect("offset");
            (ch.clone(), off, expect_message(&e, &ch, off))
        })
        .collect();
    seen.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    assert_eq!(seen[0], (a.clone(), 1, json!({"i": 0})));
    assert_eq!(seen[3], (b.clone(), 2, json!({"i": 2})));
    // Refusals.
    let body = json!({"channel": a, "data": 1}).to_string();
    let status = |req: String| http(&srv, &req).0;
    assert_eq!(status(publish_request(None, &body, true)), 401);
    assert_eq!(status(publish_request(Some(&token("no-publish")), &body, true)), 403);
    assert_eq!(status(publish_request(Some(&t), &json!({"channel": "secret:x", "data": 1}).to_string(), true)), 403);
    assert_eq!(status(publish_request(Some(&t), "{\"channel\":", true)), 400);
    assert_eq!(status(publish_request(Some(&t), &json!({"channel": "nope:x", "data": 1}).to_string(), true)), 400);
    assert_eq!(status(format!("GET /publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {t}\r\n\r\n")), 405);
    // CORS on the other fallback endpoints too.
    for path in ["/poll", "/publish"] {
        let (status, head, _) = http(
            &srv,
            &format!("OPTIONS {path} HTTP/1.1\r\nHost: t\r\nOrigin: https://x.example\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 204, "{head}");
        assert_eq!(header(&head, "access-control-allow-origin"), Some("*"), "{head}");
    }
}

/// A stream on `ch` whose client reads nothing into a 4 KiB receive buffer, and one that reads.
fn slow_and_normal(srv: &Server, ch: &str) -> (Sse, Sse) {
    let q = format!("channel={ch}&token={}", token("dave"));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&srv.addr.into(), IO_TIMEOUT).expect("connect");
    let mut slow = Sse::open_on(sock.into(), &q, "").expect("slow stream");
    expect_start(&mut slow, &[ch]);
    let mut normal = Sse::open(srv, &q, "").expect("normal stream");
    expect_start(&mut normal, &[ch]);
    (slow, normal)
}

/// Publishes [`FLOOD`] messages of about 1 KiB to `ch` through the API, never far ahead of `normal`,
/// which must get every one in order.
fn flood(srv: &Server, ch: &str, normal: &mut Sse) {
    let progress = AtomicU64::new(0);
    let pad = "x".repeat(1000);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            for n in 1..=FLOOD {
                let e = normal.next();
                assert_eq!(expect_message(&e, ch, n)["n"], n);
                progress.store(n, Ordering::Relaxed);
            }
        });
        let mut sent = 0;
        while sent < FLOOD {
            let deadline = Instant::now() + IO_TIMEOUT;
            while progress.load(Ordering::Relaxed) + 2 * BATCH < sent + BATCH {
                assert!(Instant::now() < deadline, "the reader stalled at {progress:?} of {sent}");
                std::thread::sleep(Duration::from_millis(1));
            }
            let msgs: Vec<(&str, Value)> =
                (sent + 1..=sent + BATCH).map(|n| (ch, json!({"n": n, "pad": pad}))).collect();
            publish(srv, &msgs);
            sent += BATCH;
        }
        reader.join().expect("normal reader");
    });
}

fn sse_slow_reader_drop_oldest(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let ch = homed("lossy:flood", 0);
    let (mut slow, mut normal) = slow_and_normal(&srv, &ch);
    flood(&srv, &ch, &mut normal);
    // The slow one reads messages and gap events that cover 1..=FLOOD exactly, in order, and stays open.
    let (mut next, mut gaps) = (1u64, 0);
    while next <= FLOOD {
        let e = slow.next();
        match e.event.as_str() {
            "gap" => {
                assert_eq!(e.data["from"].as_u64(), Some(next), "{e:?}");
                next = e.data["to"].as_u64().expect("to") + 1;
                gaps += 1;
            }
            _ => {
                expect_message(&e, &ch, next);
                next += 1;
            }
        }
    }
    assert!(gaps > 0, "no gap: the reader was not slow");
    publish(&srv, &[(&ch, json!({"n": FLOOD + 1}))]);
    assert_eq!(expect_message(&slow.next(), &ch, FLOOD + 1)["n"], FLOOD + 1);
    assert_eq!(expect_message(&normal.next(), &ch, FLOOD + 1)["n"], FLOOD + 1);
}
