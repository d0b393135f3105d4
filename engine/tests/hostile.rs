//! Hostile clients and overload, against the real `throng` binary over real sockets, on both drivers.
//!
//! Each test is an attack or an overload found in review (issue 9), with what the server must do about it:
//! bounded CPU per command, timers and `/health` on time while the shard is saturated, bounded memory,
//! every configured bound refused with its stated error or close code, and the other connections on the
//! shard unaffected. Saturation comes from a cgroup v1 CPU cap on the server (15% of a core) under a
//! closed-loop echo load when the `cpu` controller is writable, and from the load alone otherwise.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use std::net::TcpStream;

use serde_json::{json, Value};
use support::load::EchoLoad;
use support::v1::{poll_until, Ws};
use support::{client_frame, upgrade_request, Client, CpuCap, Driver, Server, SAMPLE_KEY};
use throng_protocol::frame::OpCode;

on_both_drivers! {
    quadratic_message_is_cheap => quadratic_message_is_cheap_uring, quadratic_message_is_cheap_epoll;
    timers_and_health_under_saturation =>
        timers_and_health_under_saturation_uring, timers_and_health_under_saturation_epoll;
    pings_are_coalesced => pings_are_coalesced_uring, pings_are_coalesced_epoll;
    upgrade_with_a_body_is_refused => upgrade_with_a_body_is_refused_uring, upgrade_with_a_body_is_refused_epoll;
    over_capacity_refused_at_accept =>
        over_capacity_refused_at_accept_uring, over_capacity_refused_at_accept_epoll;
    second_signal_exits_at_once => second_signal_exits_at_once_uring, second_signal_exits_at_once_epoll;
    long_history_reply_is_never_cut =>
        long_history_reply_is_never_cut_uring, long_history_reply_is_never_cut_epoll;
    epochs_are_random => epochs_are_random_uring, epochs_are_random_epoll;
    no_data_after_close => no_data_after_close_uring, no_data_after_close_epoll;
    history_memory_is_bounded => history_memory_is_bounded_uring, history_memory_is_bounded_epoll;
    channel_limit_is_refused => channel_limit_is_refused_uring, channel_limit_is_refused_epoll;
    message_rate_limit_then_4029 => message_rate_limit_then_4029_uring, message_rate_limit_then_4029_epoll;
    byte_rate_limit_then_4029 => byte_rate_limit_then_4029_uring, byte_rate_limit_then_4029_epoll;
    ping_flood_is_rate_limited => ping_flood_is_rate_limited_uring, ping_flood_is_rate_limited_epoll;
    subscription_limit_is_refused => subscription_limit_is_refused_uring, subscription_limit_is_refused_epoll;
    every_refusal_is_a_strike => every_refusal_is_a_strike_uring, every_refusal_is_a_strike_epoll;
    unfinished_budget_closes_1013 => unfinished_budget_closes_1013_uring, unfinished_budget_closes_1013_epoll;
    unfinished_message_deadline => unfinished_message_deadline_uring, unfinished_message_deadline_epoll;
    trickling_senders_pin_little => trickling_senders_pin_little_uring, trickling_senders_pin_little_epoll;
    presence_reply_is_bounded => presence_reply_is_bounded_uring, presence_reply_is_bounded_epoll;
    accept_pauses_out_of_fds => accept_pauses_out_of_fds_uring, accept_pauses_out_of_fds_epoll;
}

/// Per-connection rate limits off: for tests about other bounds that send fast.
const NO_RATE_LIMITS: [&str; 4] = ["--max-messages-per-second", "0", "--max-bytes-per-second", "0"];

fn start(driver: Driver, args: &[&str]) -> Server {
    Server::start(driver, args)
}

fn start_unlimited(driver: Driver, args: &[&str]) -> Server {
    Server::start(driver, &[args, &NO_RATE_LIMITS[..]].concat())
}

/// Sends `cmd` with `id` and reads until the reply with that id (skipping channel traffic).
fn call_raw(c: &mut Client, mut cmd: Value, id: u64) -> Value {
    cmd["id"] = json!(id);
    send_json(c, cmd);
    loop {
        let v = next_json(c);
        if v["id"] == id {
            return v;
        }
    }
}

/// Reads frames until the close frame; returns the text messages before it and the close.
fn until_close(c: &mut Client) -> (Vec<Value>, support::Frame) {
    let mut msgs = Vec::new();
    loop {
        let f = c.read_frame();
        match f.opcode {
            OpCode::Text => msgs.push(json_of(&f.payload)),
            OpCode::Close => return (msgs, f),
            OpCode::Ping | OpCode::Pong => {}
            _ => panic!("unexpected {f:?}"),
        }
    }
}

/// A bystander on the same (only) shard still works: ping, publish and subscribe.
fn bystander_works(srv: &Server, tag: &str) {
    let mut b = Ws::connect(srv, "bystander");
    let r = b.call(json!({"type": "ping"}));
    assert_eq!(r["type"], "pong", "{tag}: {r}");
    let ch = format!("by:{tag}");
    b.subscribe(&ch, None);
    let off = b.publish(&ch, json!("still here"));
    let m = b.recv();
    assert_eq!((&m["type"], &m["offset"]), (&json!("message"), &json!(off)), "{tag}: {m}");
}

/// An upgraded raw `/ws` client whose welcome has been read.
fn raw_v1(srv: &Server, user: &str) -> Client {
    let mut c = srv.connect();
    c.write(upgrade_request(&format!("/ws?user={user}"), SAMPLE_KEY).as_bytes());
    let head = c.read_head();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let welcome = json_of(&c.read_frame().payload);
    assert_eq!(welcome["type"], "welcome");
    c
}

fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(payload)))
}

fn send_json(c: &mut Client, v: Value) {
    c.send_frame(true, OpCode::Text, v.to_string().as_bytes());
}

/// Reads frames until a text frame arrives; returns it as JSON.
fn next_json(c: &mut Client) -> Value {
    loop {
        let f = c.read_frame_skip_pings();
        match f.opcode {
            OpCode::Text => return json_of(&f.payload),
            OpCode::Pong => continue,
            _ => panic!("unexpected frame {f:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// CPU per command

/// The message that cost the old decoder ~860 ms of CPU (a number retry that scanned from every number
/// start to the next delimiter) is refused with `bad_json` for well under 50 ms of server CPU, and the
/// connection goes on working.
fn quadratic_message_is_cheap(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = raw_v1(&srv, "bomber");
    let mut bomb = b"[-[".to_vec();
    while bomb.len() + 2 <= 60 * 1024 {
        bomb.extend_from_slice(b"1[");
    }
    // Warm up: one ordinary command, so the decoder's buffers and the code paths are in place.
    send_json(&mut c, json!({"type": "ping", "id": 1}));
    assert_eq!(next_json(&mut c)["type"], "pong");
    let before = srv.cpu_ns();
    c.send_frame(true, OpCode::Text, &bomb);
    let reply = next_json(&mut c);
    let spent = Duration::from_nanos(srv.cpu_ns() - before);
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "bad_json", "{reply}");
    assert!(spent < Duration::from_millis(50), "a 60 KiB message cost {spent:?} of server CPU");
    send_json(&mut c, json!({"type": "ping", "id": 2}));
    assert_eq!(next_json(&mut c)["id"], 2);
}

// ---------------------------------------------------------------------------------------------------------
// Timers and /health while the shard is saturated

/// With the server held to 15% of a core and 2,000 clients in a closed echo loop on `/echo`, a half-sent
/// upgrade is closed within its 2 s timeout + 1 s, and `GET /health` answers within 300 ms, every time, on
/// both drivers. The cap lets the server run 15 ms of every 100 ms period: a request that arrives just after
/// its slice waits out the period, and a turn under this load can run into the next one, so two periods
/// (~200 ms) is what the loop's bounds promise here, and the third period is room for the machine (measured
/// 99-205 ms on a 2-vCPU VM; on io_uring 189-206 ms once a ring step hands the listener's completions their
/// turn as the epoll driver's accept step does, where they had waited behind the whole backlog of
/// completions, 336-394 ms in CI, 2026-11-30).
fn timers_and_health_under_saturation(driver: Driver) {
    // The load's 2,000 connections all come from 127.0.0.1, faster than the per-address upgrade rate allows.
    let srv = Server::start(driver, &["--handshake-timeout", "2", "--max-upgrades-per-second-per-ip", "0"]);
    let load = EchoLoad::start(srv.addr, 2000, 8);
    let cap = CpuCap::new(15);
    if let Some(cap) = &cap {
        cap.add(srv.pid());
    } else {
        eprintln!("no writable cgroup cpu controller: saturating with the echo load alone");
    }
    // Let the load build up, then check it saturates the server: echoes keep flowing and the server uses
    // what the cap allows.
    std::thread::sleep(Duration::from_millis(1500));
    let (cpu0, echoes0, t0) = (srv.cpu_ns(), load.echoes.load(std::sync::atomic::Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_millis(1000));
    let used = (srv.cpu_ns() - cpu0) as f64 / t0.elapsed().as_nanos() as f64;
    let echoes = load.echoes.load(std::sync::atomic::Ordering::Relaxed) - echoes0;
    eprintln!("saturation: server at {:.0}% of a core, {echoes} echoes/s", used * 100.0);
    assert!(echoes > 0, "the load is not being served");
    if cap.is_some() {
        assert!(used > 0.10, "the capped server is not saturated ({:.0}% of a core)", used * 100.0);
    }

    // A half-sent upgrade.
    let started = Instant::now();
    let mut half = srv.connect();
    half.set_read_timeout(Duration::from_secs(15));
    half.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webso");
    // Meanwhile, /health.
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let resp = srv.get("/health");
        let took = t.elapsed();
        assert!(resp.status == 200 && support::health_ok(&resp.body), "{}", resp.text());
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = half.read_to_end();
    let closed_after = started.elapsed();
    let throttled = cap.as_ref().map_or(0, CpuCap::throttled_periods);
    drop(load);
    eprintln!("half-sent upgrade closed after {closed_after:?}; slowest /health {worst:?}; throttled {throttled}");
    assert!(rest.is_empty(), "the half-sent upgrade got {:?}", String::from_utf8_lossy(&rest));
    assert!(closed_after < Duration::from_secs(3), "handshake timeout 2 s fired after {closed_after:?}");
    assert!(closed_after > Duration::from_millis(1900), "handshake timeout fired early: {closed_after:?}");
    assert!(worst < Duration::from_millis(300), "/health took {worst:?} under load ({driver:?})");
    if cap.is_some() {
        assert!(throttled > 0, "the cap never throttled the server");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pings

/// A thousand pings in one write get at most 17 pongs (16 answered in order, then only the latest), and
/// the last pong carries the last ping's payload.
fn pings_are_coalesced(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    let mut burst = Vec::new();
    for i in 0..1000 {
        burst.extend(client_frame(true, OpCode::Ping, format!("p{i}").as_bytes()));
    }
    burst.extend(client_frame(true, OpCode::Text, b"after"));
    c.write(&burst);
    let mut pongs = Vec::new();
    loop {
        let f = c.read_frame();
        match f.opcode {
            OpCode::Pong => pongs.push(String::from_utf8(f.payload).expect("UTF-8 pong")),
            OpCode::Text => {
                assert_eq!(f.payload, b"after");
                break;
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    // At most 16 in order plus the latest per read: one read takes the whole burst on epoll (64 KiB), one
    // ring buffer (4 KiB by default) on io_uring.
    let reads = if driver == Driver::Uring { burst.len().div_ceil(4096) } else { 1 };
    assert!(
        !pongs.is_empty() && pongs.len() <= 17 * reads,
        "{} pongs for 1000 pings in one write ({} bytes, {reads} reads)",
        pongs.len(),
        burst.len()
    );
    assert_eq!(pongs.last().map(String::as_str), Some("p999"), "the latest ping must be answered");
    // Pings arriving one at a time are each answered.
    for i in 0..3 {
        c.send_frame(true, OpCode::Ping, format!("single {i}").as_bytes());
        let f = c.read_frame();
        assert_eq!((f.opcode, f.payload), (OpCode::Pong, format!("single {i}").into_bytes()));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Upgrade requests

/// An upgrade request with a body is refused with 400 (the body would otherwise be read as frames).
fn upgrade_with_a_body_is_refused(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.connect();
    let req = upgrade_request("/echo", SAMPLE_KEY).replace("\r\n\r\n", "\r\nContent-Length: 6\r\n\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(b"\x81\x80abcd");
    c.write(&bytes);
    let resp = support::HttpResponse::parse(c.read_to_end());
    assert_eq!(resp.status, 400, "{}", resp.text());
    let body = json_of(&resp.body);
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("body")), "{body}");
    // Content-Length: 0 is harmless.
    let mut ok = srv.connect();
    ok.write(upgrade_request("/echo", SAMPLE_KEY).replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n").as_bytes());
    assert!(ok.read_head().starts_with(b"HTTP/1.1 101"));
}

/// Over `--max-connections`, a new connection is answered 503 at once, before it sends anything; the
/// connections already held are unaffected.
fn over_capacity_refused_at_accept(driver: Driver) {
    let srv = Server::start(driver, &["--max-connections", "2"]);
    let mut a = srv.ws();
    let mut b = srv.ws();
    let t = Instant::now();
    let mut c = srv.connect();
    c.set_read_timeout(Duration::from_secs(3));
    let resp = support::HttpResponse::parse(c.read_to_end());
    assert!(t.elapsed() < Duration::from_secs(1), "the 503 took {:?}", t.elapsed());
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(json_of(&resp.body)["reason"].as_str().is_some_and(|r| r.contains("max_connections")));
    a.echo_text("a still works");
    b.echo_text("b still works");
    // Once one leaves, a newcomer gets in.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut n = srv.connect();
        n.write(upgrade_request("/echo", SAMPLE_KEY).as_bytes());
        let head = n.read_head();
        if head.starts_with(b"HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a client left: {}", String::from_utf8_lossy(&head));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(b);
    // `/metrics` itself needs one of the two slots: wait until the server has seen the others go.
    let deadline = Instant::now() + Duration::from_secs(3);
    let metrics = loop {
        let r = srv.get("/metrics");
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let refused = support::sum_metric(&metrics.text(), "throng_over_capacity_total");
    assert!(refused.is_some_and(|n| n >= 1), "{}", metrics.text());
}

// ---------------------------------------------------------------------------------------------------------
// Signals

/// A second SIGTERM during a drain exits at once instead of waiting for the drain timeout, and during the
/// drain delay instead of waiting for it.
fn second_signal_exits_at_once(driver: Driver) {
    let mut srv = Server::start(driver, &["--drain-delay", "30"]);
    let mut c = srv.ws();
    srv.sigterm();
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.get("/health").status == 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.echo_text("still open in the delay");
    let t = Instant::now();
    srv.sigterm();
    let status = srv.wait_exit(Duration::from_secs(2));
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {:?} after the second SIGTERM", t.elapsed());
    assert!(srv.log().contains("second signal"), "{}", srv.log());

    let mut srv = Server::start(driver, &["--drain-delay", "0", "--drain-timeout", "30"]);
    let mut c = srv.ws();
    srv.sigterm();
    c.expect_close(1001);
    // The client does not answer the close; the drain would wait 30 s.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    srv.sigterm();
    let status = srv.wait_exit(Duration::from_secs(2));
    assert!(status.is_some(), "still running {:?} after the second SIGTERM", t.elapsed());
    assert!(srv.log().contains("second signal"), "{}", srv.log());
}

// ---------------------------------------------------------------------------------------------------------
// Replies larger than the backlog bound

/// A `history` reply larger than the backlog bound to a client that is not reading is never cut mid-frame:
/// it is bounded below the backlog (fewer messages, `truncated`), and what the client reads is whole frames.
fn long_history_reply_is_never_cut(driver: Driver) {
    let srv = Server::start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let mut publisher = Ws::connect(&srv, "pub");
    let blob = "x".repeat(8000);
    for i in 0..100 {
        publisher.publish("hist:big", json!({"i": i, "blob": blob}));
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&srv.addr.into(), Duration::from_secs(5)).expect("connect");
    let mut c = Client::from_stream(sock.into());
    c.write(upgrade_request("/ws?user=reader", SAMPLE_KEY).as_bytes());
    c.read_head();
    let _welcome = c.read_frame();
    for id in 0..6 {
        send_json(&mut c, json!({"type": "history", "id": id, "channel": "hist:big", "limit": 100}));
    }
    // Do not read for a while: the replies meet a full socket.
    std::thread::sleep(Duration::from_millis(500));
    for id in 0..6 {
        let r = next_json(&mut c);
        assert_eq!((&r["type"], &r["id"]), (&json!("history"), &json!(id)), "{r}");
        let msgs = r["messages"].as_array().expect("messages");
        assert!(!msgs.is_empty() && msgs.len() < 100, "{} messages in a reply bounded by 64 KiB", msgs.len());
        assert_eq!(r["truncated"], true, "a shortened reply says so");
        assert_eq!(msgs.last().map(|m| &m["data"]["i"]), Some(&json!(99)), "the newest messages are kept");
    }
    send_json(&mut c, json!({"type": "ping", "id": 9}));
    assert_eq!(next_json(&mut c)["id"], 9);
}

// ---------------------------------------------------------------------------------------------------------
// Channel epochs

/// Epochs are random 64-bit values (16 hex digits), different across restarts.
fn epochs_are_random(driver: Driver) {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let srv = Server::start(driver, &[]);
        let mut c = Ws::connect(&srv, "e");
        let r = c.subscribe("ep:one", None);
        let epoch = r["epoch"].as_str().expect("epoch").to_string();
        assert!(epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit()), "epoch {epoch:?}");
        let r2 = c.subscribe("ep:two", None);
        assert_ne!(r2["epoch"], r["epoch"], "two channels share an epoch");
        seen.push(epoch);
    }
    assert_ne!(seen[0], seen[1], "the same channel got the same epoch after a restart");
}

// ---------------------------------------------------------------------------------------------------------
// The close state machine

/// A subscriber whose socket is full when it breaks the protocol gets its 1002 close after the frames
/// already queued, and nothing after it, though its channel keeps publishing.
fn no_data_after_close(driver: Driver) {
    let limits = ["--max-bytes-per-second", "0", "--max-messages-per-second", "0"];
    let srv = Server::start(driver, &[&["--max-backlog-bytes", "33554432"][..], &limits].concat());
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&srv.addr.into(), Duration::from_secs(5)).expect("connect");
    let mut sub = Client::from_stream(sock.into());
    sub.write(upgrade_request("/ws?user=sub", SAMPLE_KEY).as_bytes());
    sub.read_head();
    let _welcome = sub.read_frame();
    send_json(&mut sub, json!({"type": "subscribe", "id": 1, "channel": "flood:1"}));
    assert_eq!(next_json(&mut sub)["type"], "subscribed");

    let mut publisher = Ws::connect(&srv, "pub");
    let blob = "y".repeat(8000);
    let waits = srv.metric("throng_write_waits_total");
    let mut n = 0;
    while srv.metric("throng_write_waits_total") == waits {
        for _ in 0..50 {
            publisher.publish("flood:1", json!({"n": n, "blob": blob}));
            n += 1;
        }
        assert!(n < 20_000, "the subscriber's socket never filled");
    }
    // Break the protocol (an unmasked frame) while the socket is full, and keep publishing.
    sub.write(&[0x81, 0x02, b'h', b'i']);
    for _ in 0..200 {
        publisher.publish("flood:1", json!({"n": n, "blob": blob}));
        n += 1;
    }
    let mut frames = 0;
    loop {
        let f = sub.read_frame();
        match f.opcode {
            OpCode::Text => frames += 1,
            OpCode::Close => {
                assert_eq!(f.close_code(), Some(1002), "{:?}", f.close_reason());
                break;
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    let rest = sub.read_to_end();
    assert!(rest.is_empty(), "{} bytes after the close frame (after {frames} messages)", rest.len());
}

// ---------------------------------------------------------------------------------------------------------
// Memory a client can make the server keep

/// 3,000 publishes of 16 KB to fresh channels (48 MB of history under the old code, kept 300 s) leave the
/// server within its 4 MiB history budget plus the channels' bookkeeping; the oldest messages of the shard
/// went first, and recovery from them says so.
fn history_memory_is_bounded(driver: Driver) {
    let srv = start_unlimited(driver, &["--max-history-bytes", "4194304"]);
    let mut c = Ws::connect(&srv, "hoarder");
    let first = c.subscribe("hoard:0", None);
    let epoch0 = first["epoch"].clone();
    let before = srv.rss_bytes();
    let blob = "z".repeat(16_000);
    for i in 0..3000 {
        let off = c.publish(&format!("hoard:{i}"), json!({"blob": blob}));
        assert_eq!(off, 1);
    }
    let grown = srv.rss_bytes().saturating_sub(before);
    let held = srv.metric("throng_history_bytes");
    let evicted = srv.metric("throng_history_evicted_total");
    eprintln!("RSS grew {} KiB; history {} KiB; {evicted} messages evicted", grown / 1024, held / 1024);
    assert!(held <= 4 << 20, "history holds {held} bytes, over the 4 MiB budget");
    assert!(evicted >= 2700, "only {evicted} messages evicted");
    assert!(grown < 12 << 20, "RSS grew {} MiB for a 4 MiB history budget", grown >> 20);
    // The first channel's message was evicted: recovering it is refused; the last one is still there.
    let r = c.call(json!({"type": "history", "channel": "hoard:0", "since": {"offset": 0, "epoch": epoch0}}));
    assert_eq!((&r["recovered"], r["messages"].as_array().map(Vec::len)), (&json!(false), Some(0)), "{r}");
    let r = c.call(json!({"type": "history", "channel": "hoard:2999", "limit": 10}));
    assert_eq!(r["messages"].as_array().map(Vec::len), Some(1), "{r}");
    bystander_works(&srv, "history");
}

/// Past `max_channels`, a publish or subscribe that would create a channel gets `channel_limit`; channels
/// that exist go on working.
fn channel_limit_is_refused(driver: Driver) {
    let srv = start_unlimited(driver, &["--max-channels", "50"]);
    let mut c = Ws::connect(&srv, "creator");
    for i in 0..50 {
        c.publish(&format!("many:{i}"), json!(i));
    }
    let r = c.call(json!({"type": "publish", "channel": "many:50", "data": 1}));
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("channel_limit")), "{r}");
    let r = c.call(json!({"type": "subscribe", "channel": "many:51"}));
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("channel_limit")), "{r}");
    // Existing channels: publish works; subscribing needs a local channel (the shard holds 50 homes and
    // no local channel yet, so one more is fine).
    assert_eq!(c.publish("many:7", json!("again")), 2);
    c.subscribe("many:7", None);
    assert!(srv.metric("throng_channel_limit_total") >= 2);
    // Refused commands are strikes: the connection is still open after two.
    let r = c.call(json!({"type": "ping"}));
    assert_eq!(r["type"], "pong");
}

// ---------------------------------------------------------------------------------------------------------
// Rate limits

/// Over `max_messages_per_second`: `rate_limited` errors (carrying the command's id) first, then, as the
/// client keeps on, a close with 4029; the other connections on the shard are not affected.
fn message_rate_limit_then_4029(driver: Driver) {
    let srv = start(driver, &["--max-messages-per-second", "20"]);
    let mut c = raw_v1(&srv, "chatty");
    let mut burst = Vec::new();
    for id in 0..200u64 {
        burst.extend(client_frame(true, OpCode::Text, json!({"type": "ping", "id": id}).to_string().as_bytes()));
    }
    c.write(&burst);
    let (msgs, close) = until_close(&mut c);
    let pongs = msgs.iter().filter(|m| m["type"] == "pong").count();
    let limited: Vec<&Value> = msgs.iter().filter(|m| m["code"] == "rate_limited").collect();
    assert!((19..=21).contains(&pongs), "{pongs} pongs for a burst of 20 per second");
    assert!(!limited.is_empty() && limited.iter().all(|m| m["id"].is_u64()), "{msgs:?}");
    assert_eq!(close.close_code(), Some(4029), "{:?}", close.close_reason());
    assert!(srv.metric("throng_rate_limited_total") >= 16);
    bystander_works(&srv, "rate");
}

/// Over `max_bytes_per_second`: the same, counted in bytes (its burst is one largest message).
fn byte_rate_limit_then_4029(driver: Driver) {
    let srv = start(driver, &["--max-bytes-per-second", "40000", "--max-message-size", "32768"]);
    let mut c = raw_v1(&srv, "bulky");
    let blob = "b".repeat(20_000);
    let mut accepted = 0;
    let mut errors = 0;
    for id in 0..40u64 {
        let cmd = json!({"type": "publish", "id": id, "channel": "bulk:1", "data": blob});
        send_json(&mut c, cmd);
        let f = c.read_frame();
        if f.opcode == OpCode::Close {
            assert_eq!(f.close_code(), Some(4029), "{:?}", f.close_reason());
            assert!((1..=3).contains(&accepted), "{accepted} publishes of 20 KB within 40 KB/s");
            assert!(errors >= 15, "closed after {errors} errors");
            bystander_works(&srv, "bytes");
            return;
        }
        let r = json_of(&f.payload);
        match r["type"].as_str() {
            Some("published") => accepted += 1,
            Some("error") => {
                assert_eq!((&r["code"], &r["id"]), (&json!("rate_limited"), &json!(id)), "{r}");
                errors += 1;
            }
            _ => panic!("{r}"),
        }
    }
    panic!("never closed: {accepted} accepted, {errors} refused");
}

/// WebSocket pings count as messages: a ping flood past the rate is left unanswered and closes with 4029.
fn ping_flood_is_rate_limited(driver: Driver) {
    let srv = start(driver, &["--max-messages-per-second", "10"]);
    let mut c = raw_v1(&srv, "pinger");
    let mut burst = Vec::new();
    for i in 0..100 {
        burst.extend(client_frame(true, OpCode::Ping, format!("{i}").as_bytes()));
    }
    c.write(&burst);
    let mut pongs = 0;
    let close = loop {
        let f = c.read_frame();
        match f.opcode {
            OpCode::Pong => pongs += 1,
            OpCode::Close => break f,
            _ => panic!("unexpected {f:?}"),
        }
    };
    assert_eq!(close.close_code(), Some(4029));
    assert!((1..=11).contains(&pongs), "{pongs} pongs at 10 messages per second");
    bystander_works(&srv, "pings");
}

// ---------------------------------------------------------------------------------------------------------
// Subscriptions and strikes

fn subscription_limit_is_refused(driver: Driver) {
    let srv = start(driver, &["--max-subscriptions", "3"]);
    let mut c = Ws::connect(&srv, "collector");
    for i in 0..3 {
        c.subscribe(&format!("sub:{i}"), None);
    }
    let r = c.call(json!({"type": "subscribe", "channel": "sub:3"}));
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!("too_many_subscriptions")), "{r}");
    assert_eq!(srv.metric("throng_subscription_limit_total"), 1);
    let r = c.call(json!({"type": "unsubscribe", "channel": "sub:0"}));
    assert_eq!(r["type"], "unsubscribed");
    c.subscribe("sub:3", None);
    bystander_works(&srv, "subs");
}

/// Every kind of refused command counts toward the abuse close, not only malformed ones: a client that
/// repeats a forbidden, over-limit or pointless command is closed with 1008 after 16.
fn every_refusal_is_a_strike(driver: Driver) {
    let srv = start(driver, &["--max-subscriptions", "1"]);
    let kinds = [
        json!({"type": "subscribe", "channel": "user:someone-else"}),
        json!({"type": "publish", "channel": "user:me", "data": 1}),
        json!({"type": "unsubscribe", "channel": "never:subscribed"}),
        json!({"type": "refresh", "token": "x"}),
        json!({"type": "subscribe", "channel": "second:one"}),
    ];
    for (k, cmd) in kinds.iter().enumerate() {
        let mut c = raw_v1(&srv, "me");
        if k == 4 {
            assert_eq!(
                call_raw(&mut c, json!({"type": "subscribe", "channel": "first:one"}), 999)["type"],
                "subscribed"
            );
        }
        let mut burst = Vec::new();
        for id in 0..40u64 {
            let mut cmd = cmd.clone();
            cmd["id"] = json!(id);
            burst.extend(client_frame(true, OpCode::Text, cmd.to_string().as_bytes()));
        }
        c.write(&burst);
        let (msgs, close) = until_close(&mut c);
        assert_eq!(close.close_code(), Some(1008), "{cmd}: {:?}", close.close_reason());
        assert_eq!(msgs.len(), 15, "{cmd}: {} error replies before the close", msgs.len());
        assert!(msgs.iter().all(|m| m["type"] == "error"), "{cmd}: {msgs:?}");
    }
    // Binary messages on /ws too.
    let mut c = raw_v1(&srv, "binary");
    let mut burst = Vec::new();
    for _ in 0..20 {
        burst.extend(client_frame(true, OpCode::Binary, b"\x00\x01"));
    }
    c.write(&burst);
    let (_, close) = until_close(&mut c);
    assert_eq!(close.close_code(), Some(1008));
    bystander_works(&srv, "strikes");
}

// ---------------------------------------------------------------------------------------------------------
// Unfinished messages

/// Two connections each holding a 60 KB frame half-sent: the second would pass the shard's 64 KiB budget
/// for unfinished input and is closed with 1013; the first finishes its message and gets its echo.
fn unfinished_budget_closes_1013(driver: Driver) {
    let srv = start(driver, &["--max-unfinished-bytes", "65536", "--max-message-size", "61440"]);
    let payload = vec![0x61u8; 60_000];
    let frame = client_frame(true, OpCode::Binary, &payload);
    let mut a = srv.ws();
    a.write(&frame[..30_000]);
    std::thread::sleep(Duration::from_millis(200));
    let mut b = srv.ws();
    b.write(&frame[..30_000]);
    let close = b.read_frame();
    assert_eq!(close.close_code(), Some(1013), "{:?}", close.close_reason());
    // The scrape is an HTTP request like any other: while b's closing connection still counts against the
    // budget (a busy machine may not have freed it yet), it is refused 503 too, and counted as one more
    // refusal by the budget; it gets through once freed.
    let mut refused_scrapes = 0;
    let metrics = poll_until(Duration::from_secs(5), || match srv.get("/metrics") {
        r if r.status == 200 => Ok(r.text()),
        r => {
            refused_scrapes += 1;
            Err(format!("{} {}", r.status, r.text()))
        }
    });
    assert_eq!(support::sum_metric(&metrics, "throng_unfinished_limit_closes_total"), Some(1 + refused_scrapes));
    a.write(&frame[30_000..]);
    let echo = a.read_frame();
    assert!(echo.payload == payload, "the first connection's message was damaged");
    // With the budget free again, a newcomer's large message goes through.
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = srv.ws();
    c.write(&frame);
    assert!(c.read_frame().payload == payload);
}

/// A message started and not finished within `message_timeout` closes the connection with 1008 (a half
/// frame, or a fragmented message whose last fragment never comes); a connection sending slowly but
/// finishing in time is not affected.
fn unfinished_message_deadline(driver: Driver) {
    let srv = start(driver, &["--message-timeout", "1"]);
    let started = Instant::now();
    let mut half = srv.ws();
    half.write(&client_frame(true, OpCode::Text, &[b'x'; 1000])[..500]);
    let mut fragments = srv.ws();
    fragments.write(&client_frame(false, OpCode::Text, b"first part"));
    let mut slow = srv.ws();
    for (what, c) in [("half frame", &mut half), ("fragments", &mut fragments)] {
        let f = c.read_frame();
        let after = started.elapsed();
        assert_eq!(f.close_code(), Some(1008), "{what}: {:?}", f.close_reason());
        assert!(after >= Duration::from_millis(900) && after < Duration::from_millis(2500), "{what}: {after:?}");
    }
    assert_eq!(srv.metric("throng_message_timeouts_total"), 2);
    // 600 ms per message, a byte every 100 ms: within the deadline.
    let frame = client_frame(true, OpCode::Text, b"slow");
    for chunk in frame.chunks(2) {
        slow.write(chunk);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(slow.read_frame().payload, b"slow");
}

/// 200 connections trickling the start of a small message, a few bytes per read: the shard holds about
/// what they sent, not a read buffer each (a 64 KiB buffer per connection once its second read arrived,
/// before: 12.5 MiB for these 200).
fn trickling_senders_pin_little(driver: Driver) {
    let srv = start(driver, &[]);
    let frame = client_frame(true, OpCode::Text, &[b'x'; 100]);
    let mut conns: Vec<Client> = (0..200).map(|_| srv.ws()).collect();
    for (from, to) in [(0, 3), (3, 7), (7, 12)] {
        for c in &mut conns {
            c.write(&frame[from..to]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = srv.metric("throng_unfinished_bytes");
    assert!(held > 0 && held < 200 * 256, "{held} bytes held for 200 connections with 12 bytes sent each");
    for c in &mut conns {
        c.write(&frame[12..]);
        assert_eq!(c.read_frame().payload, vec![b'x'; 100]);
    }
    // The gauge is the shard's count when it answers the scrape, which may include the first bytes of the
    // scrape's own request on a busy machine (8 under CI load): a later scrape sees 0.
    poll_until(Duration::from_secs(5), || match srv.metric("throng_unfinished_bytes") {
        0 => Ok(()),
        n => Err(format!("{n} bytes held")),
    });
}

// ---------------------------------------------------------------------------------------------------------
// Presence

/// A presence reply on a channel with many users is bounded by the reply bound (half the backlog): users
/// listed in name order, `truncated`, `count` exact. Not sorted per request (the table is ordered).
fn presence_reply_is_bounded(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let names: Vec<String> = (0..120).map(|i| format!("{i:03}{}", "u".repeat(120))).collect();
    let mut conns: Vec<Ws> = names.iter().map(|n| Ws::connect(&srv, n)).collect();
    for c in &mut conns {
        c.subscribe("crowd:1", None);
    }
    let r = conns[0].call(json!({"type": "presence", "channel": "crowd:1"}));
    assert_eq!(r["count"], 120, "{r}");
    let users = r["users"].as_array().expect("users");
    assert!(users.len() < 120 && !users.is_empty(), "{} users listed", users.len());
    assert_eq!(r["truncated"], true);
    let listed: Vec<&str> = users.iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(listed, names[..listed.len()].iter().map(String::as_str).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------------------
// Out of file descriptors

/// With a 128-descriptor limit and `max_connections` set above it, the server runs out of descriptors:
/// it pauses accepting instead of spinning on the listener (little CPU while connections wait in the
/// kernel's queue), keeps serving the connections it has, and accepts the waiting ones once some close.
fn accept_pauses_out_of_fds(driver: Driver) {
    let srv = Server::start_with_nofile(driver, &["--max-connections", "1000"], Some(128));
    assert!(srv.log().contains("max_connections exceeds"), "{}", srv.log());
    let mut held: Vec<Client> = (0..40).map(|_| srv.ws()).collect();
    // Far more than the descriptors left: these wait in the listen queue.
    let waiting: Vec<TcpStream> = (0..150).map(|_| TcpStream::connect(srv.addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = srv.cpu_ns();
    std::thread::sleep(Duration::from_secs(1));
    let spent = Duration::from_nanos(srv.cpu_ns() - cpu0);
    assert!(spent < Duration::from_millis(100), "{spent:?} of CPU in 1 s while out of descriptors");
    held[0].echo_text("still served");
    drop(waiting);
    held.truncate(10);
    // Room again: a newcomer is served (possibly after the queued ones are accepted and dropped).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = srv.connect();
        c.set_read_timeout(Duration::from_secs(5));
        c.write(upgrade_request("/echo", SAMPLE_KEY).as_bytes());
        let mut buf = [0u8; 12];
        if std::io::Read::read(&mut c.stream, &mut buf).unwrap_or(0) == 12 && buf.starts_with(b"HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "no connection accepted again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let resp = srv.get("/metrics");
    let pauses = support::sum_metric(&resp.text(), "throng_accept_pauses_total").unwrap_or(0);
    assert!(pauses >= 1, "no accept pause counted");
}

// ---------------------------------------------------------------------------------------------------------
// Configuration

/// `throng --check-config` validates without starting: 0 and the resolved settings when valid, 1 and the
/// reason when not (values checked against each other and their bounds).
#[test]
fn check_config_reports_and_exits() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_throng"))
            .arg("--check-config")
            .args(args)
            .env_remove("THRONG_CONFIG")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running throng --check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = run(&["--listen", "127.0.0.1:1"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("configuration is valid") && stdout.contains("max_history_bytes"), "{stdout}");
    for (args, reason) in [
        (&["--ping-interval", "30", "--idle-timeout", "20"][..], "idle_timeout"),
        (&["--max-message-size", "2000000"][..], "max_backlog_bytes"),
        (&["--handshake-timeout", "1000"][..], "handshake_timeout must be at most 300"),
        (&["--max-channels", "0"][..], "max_channels"),
    ] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    let path = std::env::temp_dir().join(format!("throng-check-{}.toml", std::process::id()));
    std::fs::write(&path, "[namespace.chat]\nhistory_ttl = -1\n").expect("write");
    let (code, _, stderr) = run(&["--config", path.to_str().expect("UTF-8 path")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("namespace.chat.history_ttl"), "{stderr}");
    let _ = std::fs::remove_file(path);
    // Nothing is bound: checking a configuration whose port is taken still succeeds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, stdout, stderr) = run(&["--listen", &addr]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}
