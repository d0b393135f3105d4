//! Black-box tests of the `throng` binary: each starts the real server on a fresh loopback port and talks to
//! it over real sockets, checking replies byte for byte where they are deterministic. Every test runs once per
//! I/O driver (`<name>_uring`, `<name>_epoll`).

#[macro_use]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{client_close, client_frame, expected_101, upgrade_request, Client, Driver, Server, SAMPLE_KEY};
use throng_protocol::frame::OpCode;

on_both_drivers! {
    upgrade_then_echo_hello => upgrade_then_echo_hello_uring, upgrade_then_echo_hello_epoll;
    echo_binary => echo_binary_uring, echo_binary_epoll;
    echo_large_message => echo_large_message_uring, echo_large_message_epoll;
    echo_one_byte_per_write => echo_one_byte_per_write_uring, echo_one_byte_per_write_epoll;
    burst_past_the_read_bound => burst_past_the_read_bound_uring, burst_past_the_read_bound_epoll;
    input_left_after_a_read_turn_is_resumed =>
        input_left_after_a_read_turn_is_resumed_uring, input_left_after_a_read_turn_is_resumed_epoll;
    rejected_upgrades => rejected_upgrades_uring, rejected_upgrades_epoll;
    http_endpoints => http_endpoints_uring, http_endpoints_epoll;
    ping_answered_with_exact_pong => ping_answered_with_exact_pong_uring, ping_answered_with_exact_pong_epoll;
    server_pings_silent_client => server_pings_silent_client_uring, server_pings_silent_client_epoll;
    close_handshake_from_client => close_handshake_from_client_uring, close_handshake_from_client_epoll;
    fragmented_message_with_interleaved_ping =>
        fragmented_message_with_interleaved_ping_uring, fragmented_message_with_interleaved_ping_epoll;
    oversize_message_closes_1009 => oversize_message_closes_1009_uring, oversize_message_closes_1009_epoll;
    invalid_utf8_closes_1007 => invalid_utf8_closes_1007_uring, invalid_utf8_closes_1007_epoll;
    protocol_errors_close_1002 => protocol_errors_close_1002_uring, protocol_errors_close_1002_epoll;
    idle_timeout => idle_timeout_uring, idle_timeout_epoll;
    handshake_timeout => handshake_timeout_uring, handshake_timeout_epoll;
    slow_consumer_closed_4008 => slow_consumer_closed_4008_uring, slow_consumer_closed_4008_epoll;
    slow_consumer_quiet_closed_4008 => slow_consumer_quiet_closed_4008_uring, slow_consumer_quiet_closed_4008_epoll;
    drain_on_sigterm => drain_on_sigterm_uring, drain_on_sigterm_epoll;
    drain_delay_keeps_connections_while_health_fails =>
        drain_delay_keeps_connections_while_health_fails_uring, drain_delay_keeps_connections_while_health_fails_epoll;
    many_connections_echo => many_connections_echo_uring, many_connections_echo_epoll;
}

// ---------------------------------------------------------------------------------------------------------
// 1. Upgrade and echo

fn upgrade_then_echo_hello(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.connect();
    c.write(upgrade_request("/echo", SAMPLE_KEY).as_bytes());
    let head = c.read_head();
    assert_eq!(
        String::from_utf8_lossy(&head),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    assert_eq!(head, expected_101().as_bytes());
    // RFC 6455 section 5.7: a masked "Hello".
    c.write(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    assert_eq!(c.read_exact(7), [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    // Twice more in one write: two echoes, in order.
    let mut two = client_frame(true, OpCode::Text, b"one");
    two.extend(client_frame(true, OpCode::Text, b"two"));
    c.write(&two);
    assert_eq!(c.read_exact(10), b"\x81\x03one\x81\x03two");
    assert_eq!(srv.metric("throng_upgrades_total"), 1);
}

fn echo_binary(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    // 7-bit length.
    c.write(&client_frame(true, OpCode::Binary, &[0x00, 0xff, 0x80, 0x7f]));
    assert_eq!(c.read_exact(6), [0x82, 0x04, 0x00, 0xff, 0x80, 0x7f]);
    // 16-bit length form (200 bytes).
    let payload: Vec<u8> = (0..200u8).collect();
    c.write(&client_frame(true, OpCode::Binary, &payload));
    let mut want = vec![0x82, 0x7e, 0x00, 0xc8];
    want.extend_from_slice(&payload);
    assert_eq!(c.read_exact(want.len()), want);
    // Empty binary message.
    c.write(&client_frame(true, OpCode::Binary, &[]));
    assert_eq!(c.read_exact(2), [0x82, 0x00]);
}

fn echo_large_message(driver: Driver) {
    let srv = Server::start(driver, &["--max-message-size", "100000"]);
    let mut c = srv.ws();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write(&client_frame(true, OpCode::Binary, &payload));
    // 64-bit length form: 70000 = 0x11170.
    assert_eq!(c.read_exact(10), [0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x11, 0x70]);
    let echoed = c.read_exact(payload.len());
    assert!(echoed == payload, "70000-byte echo differs");
    // And a text one of the same size, right after.
    let text = "é".repeat(35_000);
    c.echo_text(&text);
}

/// A pipelined burst of several MiB (more than one turn of 16 reads of 64 KiB, after which a connection yields
/// to the others) while echoes flow back: with edge-triggered readiness nothing may be left unread, so every
/// frame is echoed, in order. (Whether the burst is still queued in full when a turn ends depends on
/// timing, so this does not pin the resume path down on its own; it guards the read loop as a whole.)
fn burst_past_the_read_bound(driver: Driver) {
    const FRAMES: u32 = 4000;
    const SIZE: usize = 1000;
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    let mut burst = Vec::with_capacity(FRAMES as usize * (SIZE + 8));
    for i in 0..FRAMES {
        let mut payload = vec![(i % 251) as u8; SIZE];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        burst.extend(client_frame(true, OpCode::Binary, &payload));
    }
    assert!(burst.len() > 16 * 64 * 1024 * 3, "the burst must exceed several read turns");
    let mut writer = c.stream.try_clone().expect("try_clone");
    let sender = std::thread::spawn(move || writer.write_all(&burst).map(|()| burst.len()));
    for i in 0..FRAMES {
        let f = c.read_frame();
        assert_eq!((f.opcode, f.payload.len()), (OpCode::Binary, SIZE), "frame {i}");
        assert_eq!(f.payload[..4], i.to_be_bytes(), "frame {i} out of order");
        assert!(f.payload[4..].iter().all(|&b| b == (i % 251) as u8), "frame {i} corrupted");
    }
    sender.join().expect("sender thread").expect("writing the burst");
    c.echo_text("still served after the burst");
}

/// The sharp form of the case above. The server is frozen (SIGSTOP) while the client queues 2 MiB of
/// frames, all of it in the server's receive buffer before it runs again; on SIGCONT there is one input edge
/// for the socket, and one turn reads at most 16 x 64 KiB. No further edge comes (the client sends nothing
/// more), so the rest is echoed only if the shard resumes the connection by itself.
///
/// The server's receive buffer must hold the burst. TCP autotuning grows it only as far as the server's
/// reads per round trip suggest (often to about 1 MiB here), so the test sets it to 8 MiB itself, on a copy
/// of the server's socket descriptor (`pidfd_getfd`, `SO_RCVBUFFORCE`: needs root), and fails, saying why,
/// when it cannot.
fn input_left_after_a_read_turn_is_resumed(driver: Driver) {
    const SIZE: usize = 1000;
    const BURST: usize = 2 << 20;
    let srv = Server::start(driver, &["--max-message-size", "16777216", "--max-backlog-bytes", "67108864"]);
    let mut c = srv.ws();
    support::force_server_rcvbuf(&srv, &c.stream, 8 << 20)
        .unwrap_or_else(|e| panic!("cannot make the server's receive buffer hold the burst (run as root): {e}"));
    // A small echo, so that the server advertises the window of its new buffer.
    c.echo_text("window?");
    let frames = BURST / (SIZE + 8);
    let mut burst = Vec::new();
    for i in 0..frames as u32 {
        let mut payload = vec![(i % 251) as u8; SIZE];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        burst.extend(client_frame(true, OpCode::Binary, &payload));
    }
    srv.signal(libc::SIGSTOP);
    let mut writer = c.stream.try_clone().expect("try_clone");
    let sender = std::thread::spawn(move || writer.write_all(&burst));
    // Wait until the kernel holds the whole burst on the server's side (nothing left unacknowledged).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(sender.is_finished() && support::unsent_bytes(&c.stream) == 0) {
        if Instant::now() > deadline {
            srv.signal(libc::SIGCONT);
            panic!(
                "the frozen server's receive buffer did not take the whole burst (window {})",
                support::peer_window(&c.stream)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.signal(libc::SIGCONT);
    sender.join().expect("sender thread").expect("writing the burst");
    for i in 0..frames as u32 {
        let f = c.read_frame();
        assert_eq!((f.opcode, f.payload.len()), (OpCode::Binary, SIZE), "frame {i}");
        assert_eq!(f.payload[..4], i.to_be_bytes(), "frame {i} out of order");
    }
    c.echo_text("still served");
}

fn echo_one_byte_per_write(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.connect();
    // The upgrade request in two halves, split inside a header line.
    let req = upgrade_request("/echo", SAMPLE_KEY);
    let (a, b) = req.as_bytes().split_at(40);
    c.write(a);
    std::thread::sleep(Duration::from_millis(5));
    c.write(b);
    assert_eq!(c.read_head(), expected_101().as_bytes());
    let msg = "sent one byte per write() call";
    for byte in client_frame(true, OpCode::Text, msg.as_bytes()) {
        c.write(&[byte]);
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut want = vec![0x81, msg.len() as u8];
    want.extend_from_slice(msg.as_bytes());
    assert_eq!(c.read_exact(want.len()), want);
    assert_eq!(c.buffered(), 0);
}

// ---------------------------------------------------------------------------------------------------------
// 2. Rejected upgrades and the HTTP endpoints

/// The exact bytes of a JSON rejection.
fn rejection(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\
         {extra_headers}\r\n{body}",
        body.len()
    )
}

/// Sends `request` on a new connection and reads the response to EOF.
fn exchange(srv: &Server, request: &str) -> support::HttpResponse {
    let mut c = srv.connect();
    c.write(request.as_bytes());
    support::HttpResponse::parse(c.read_to_end())
}

fn assert_json_error(resp: &support::HttpResponse, code: &str) {
    let v: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("rejection body is not JSON ({e}): {}", resp.text()));
    assert_eq!(v["error"], code, "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "no reason in {v}");
    assert_eq!(resp.header("Content-Length"), Some(resp.body.len().to_string().as_str()));
}

fn rejected_upgrades(driver: Driver) {
    let srv = Server::start(driver, &[]);

    let v8 = upgrade_request("/echo", SAMPLE_KEY).replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let resp = exchange(&srv, &v8);
    assert_eq!(
        resp.text(),
        rejection(
            "426 Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            r#"{"error":"upgrade_required","reason":"Sec-WebSocket-Version must be 13"}"#
        )
    );
    assert_eq!(resp.header("Sec-WebSocket-Version"), Some("13"));
    assert_json_error(&resp, "upgrade_required");

    let no_key = upgrade_request("/echo", SAMPLE_KEY).replace(&format!("Sec-WebSocket-Key: {SAMPLE_KEY}\r\n"), "");
    let resp = exchange(&srv, &no_key);
    assert_eq!(
        resp.text(),
        rejection("400 Bad Request", "", r#"{"error":"bad_request","reason":"missing Sec-WebSocket-Key"}"#)
    );
    assert_json_error(&resp, "bad_request");

    let bad_key = upgrade_request("/echo", "dG9vIHNob3J0");
    let resp = exchange(&srv, &bad_key);
    assert_eq!(resp.status, 400);
    assert_json_error(&resp, "bad_request");

    let post = upgrade_request("/echo", SAMPLE_KEY).replacen("GET", "POST", 1);
    let resp = exchange(&srv, &post);
    assert_eq!(
        resp.text(),
        rejection(
            "405 Method Not Allowed",
            "",
            r#"{"error":"method_not_allowed","reason":"WebSocket upgrade requires GET"}"#
        )
    );
    assert_json_error(&resp, "method_not_allowed");

    let resp = exchange(&srv, &upgrade_request("/nope", SAMPLE_KEY));
    assert_eq!(
        resp.text(),
        rejection("404 Not Found", "", r#"{"error":"not_found","reason":"no WebSocket endpoint at this path"}"#)
    );
    assert_json_error(&resp, "not_found");

    // Plain requests that are not served.
    let resp = exchange(&srv, "POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(resp.status, 405);
    assert_json_error(&resp, "method_not_allowed");
    let resp = exchange(&srv, "GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(resp.status, 404);
    assert_json_error(&resp, "not_found");

    assert_eq!(srv.metric("throng_upgrades_total"), 0);
    assert!(srv.metric("throng_http_rejected_total") >= 7);
}

fn http_endpoints(driver: Driver) {
    let srv = Server::start(driver, &[]);
    // Connection: close, so that `exchange` reads to the end (a plain request's connection is kept alive).
    let resp = exchange(&srv, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("Content-Type"), Some("application/json"), "{}", resp.text());
    assert_eq!(resp.header("Cache-Control"), Some("no-store"), "{}", resp.text());
    let health: serde_json::Value = serde_json::from_slice(&resp.body).expect("/health is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!((health["shards"].as_u64(), health["shards_listening"].as_u64()), (Some(1), Some(1)), "{health}");

    let resp = srv.get("/metrics");
    assert_eq!(resp.status, 200);
    let text = String::from_utf8(resp.body.clone()).expect("metrics are UTF-8");
    assert!(text.contains("# TYPE throng_upgrades_total counter"), "{text}");
    assert_eq!(support::sum_metric(&text, "throng_upgrades_total"), Some(0));

    // A WebSocket that is open shows up in the counters and in /stats.
    let mut ws = srv.ws();
    ws.echo_text("counted");
    assert_eq!(srv.metric("throng_upgrades_total"), 1);
    let stats = srv.stats();
    let connections = stats["connections"].as_u64().unwrap_or_else(|| panic!("no connections in {stats}"));
    // The WebSocket, plus the connection this /stats request came in on.
    assert!((1..=2).contains(&connections), "{stats}");
    assert_eq!(stats["driver"], driver.stats_name());
    assert_eq!(stats["draining"], false);
}

// ---------------------------------------------------------------------------------------------------------
// 3. Ping and pong

fn ping_answered_with_exact_pong(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    c.write(&client_frame(true, OpCode::Ping, b"abc"));
    assert_eq!(c.read_exact(5), [0x8a, 0x03, 0x61, 0x62, 0x63]);
    // Empty ping, and a ping of the largest control size.
    c.write(&client_frame(true, OpCode::Ping, b""));
    assert_eq!(c.read_exact(2), [0x8a, 0x00]);
    let big = [b'z'; 125];
    c.write(&client_frame(true, OpCode::Ping, &big));
    let mut want = vec![0x8a, 125];
    want.extend_from_slice(&big);
    assert_eq!(c.read_exact(want.len()), want);
    // An unsolicited pong is ignored; the connection keeps working.
    c.write(&client_frame(true, OpCode::Pong, b"unsolicited"));
    c.echo_text("after pong");
}

fn server_pings_silent_client(driver: Driver) {
    let srv = Server::start(driver, &["--ping-interval", "0.3", "--idle-timeout", "5"]);
    let mut c = srv.ws();
    c.set_read_timeout(Duration::from_secs(3));
    let t0 = Instant::now();
    let ping = c.read_frame();
    let waited = t0.elapsed();
    assert_eq!((ping.fin, ping.opcode, ping.masked), (true, OpCode::Ping, false), "{ping:?}");
    assert!(waited < Duration::from_millis(1200), "first ping after {waited:?}");
    assert!(waited > Duration::from_millis(150), "first ping too early: {waited:?}");
    // Answered with a pong, the connection stays up and keeps being pinged.
    c.write(&client_frame(true, OpCode::Pong, &ping.payload));
    let again = c.read_frame();
    assert_eq!(again.opcode, OpCode::Ping, "{again:?}");
    c.write(&client_frame(true, OpCode::Pong, &again.payload));
    c.echo_text("still open");
    assert!(srv.metric("throng_pings_sent_total") >= 2);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Close handshake started by the client (server-started closes: idle_timeout, drain_on_sigterm)

fn close_handshake_from_client(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    c.echo_text("before close");
    c.write(&client_close(1000, "bye"));
    let f = c.expect_close(1000);
    assert!(f.fin);
    c.expect_eof();

    // A close without a payload is answered with an empty close.
    let mut c = srv.ws();
    c.write(&client_frame(true, OpCode::Close, &[]));
    let f = c.read_frame();
    assert_eq!((f.opcode, f.payload.len()), (OpCode::Close, 0), "{f:?}");
    c.expect_eof();

    // A close with an invalid code (1005 must never be sent) fails with 1002.
    let mut c = srv.ws();
    c.write(&client_close(1005, ""));
    c.expect_close(1002);
    c.expect_eof();
}

// ---------------------------------------------------------------------------------------------------------
// 5. Fragmentation

fn fragmented_message_with_interleaved_ping(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    c.write(&client_frame(false, OpCode::Text, b"Hel"));
    c.write(&client_frame(true, OpCode::Ping, b"p!"));
    // The pong comes before the message is complete.
    assert_eq!(c.read_exact(4), b"\x8a\x02p!");
    c.write(&client_frame(false, OpCode::Continuation, b"lo, "));
    c.write(&client_frame(true, OpCode::Continuation, b"world"));
    assert_eq!(c.read_exact(14), b"\x81\x0cHello, world");

    // The same shape in a single write: pong first, then the whole message as one frame.
    let mut all = client_frame(false, OpCode::Binary, &[1, 2, 3]);
    all.extend(client_frame(true, OpCode::Ping, b"x"));
    all.extend(client_frame(false, OpCode::Continuation, &[4]));
    all.extend(client_frame(true, OpCode::Continuation, &[5, 6]));
    c.write(&all);
    assert_eq!(c.read_exact(3 + 8), [0x8a, 0x01, b'x', 0x82, 0x06, 1, 2, 3, 4, 5, 6]);

    // A continuation with nothing to continue is a protocol error.
    c.write(&client_frame(true, OpCode::Continuation, b"?"));
    c.expect_close(1002);
    c.expect_eof();
}

// ---------------------------------------------------------------------------------------------------------
// 6. Message size limit

fn oversize_message_closes_1009(driver: Driver) {
    let srv = Server::start(driver, &["--max-message-size", "1000"]);
    // Exactly the limit is fine.
    let mut c = srv.ws();
    let limit = vec![b'a'; 1000];
    c.write(&client_frame(true, OpCode::Binary, &limit));
    let f = c.read_frame();
    assert_eq!((f.opcode, f.payload.len()), (OpCode::Binary, 1000));

    let mut c = srv.ws();
    c.write(&client_frame(true, OpCode::Binary, &[b'a'; 1001]));
    let f = c.expect_close(1009);
    assert!(!f.close_reason().is_empty());
    c.expect_eof();

    let mut c = srv.ws();
    c.write(&client_frame(false, OpCode::Text, &[b'a'; 600]));
    c.write(&client_frame(true, OpCode::Continuation, &[b'b'; 600]));
    c.expect_close(1009);
    c.expect_eof();

    assert_eq!(srv.metric("throng_too_big_total"), 2);
}

// ---------------------------------------------------------------------------------------------------------
// 7. UTF-8 validation

fn invalid_utf8_closes_1007(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let mut c = srv.ws();
    c.write(&client_frame(true, OpCode::Text, b"H\xff\xfe"));
    let f = c.expect_close(1007);
    assert!(!f.close_reason().is_empty());
    c.expect_eof();

    // A code point split across fragments is fine...
    let mut c = srv.ws();
    c.write(&client_frame(false, OpCode::Text, b"a\xe2\x82"));
    c.write(&client_frame(true, OpCode::Continuation, b"\xacb"));
    assert_eq!(c.read_exact(7), b"\x81\x05a\xe2\x82\xacb");

    // ...but a bad continuation byte after a valid first fragment is not.
    let mut c = srv.ws();
    c.write(&client_frame(false, OpCode::Text, b"a\xe2\x82"));
    c.write(&client_frame(true, OpCode::Continuation, b"\x28b"));
    c.expect_close(1007);
    c.expect_eof();

    // Nor is a message ending in the middle of a code point.
    let mut c = srv.ws();
    c.write(&client_frame(true, OpCode::Text, b"ok\xe2\x82"));
    c.expect_close(1007);
    c.expect_eof();

    assert_eq!(srv.metric("throng_invalid_utf8_total"), 3);
}

// ---------------------------------------------------------------------------------------------------------
// 8. Protocol errors

fn protocol_errors_close_1002(driver: Driver) {
    let srv = Server::start(driver, &[]);
    let unmasked = vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    let mut reserved_opcode = client_frame(true, OpCode::Text, b"x");
    reserved_opcode[0] = 0x80 | 0x3;
    let mut reserved_control = client_frame(true, OpCode::Ping, b"x");
    reserved_control[0] = 0x80 | 0xb;
    let mut rsv1 = client_frame(true, OpCode::Text, b"x");
    rsv1[0] |= 0x40;
    let mut fragmented_ping = client_frame(true, OpCode::Ping, b"x");
    fragmented_ping[0] &= 0x7f;
    let cases = [
        ("unmasked frame", unmasked),
        ("reserved opcode 0x3", reserved_opcode),
        ("reserved opcode 0xB", reserved_control),
        ("RSV1 set", rsv1),
        ("fragmented ping", fragmented_ping),
        ("ping payload over 125 bytes", client_frame(true, OpCode::Ping, &[0u8; 126])),
    ];
    for (what, bytes) in &cases {
        let mut c = srv.ws();
        c.write(bytes);
        let f = c.read_frame();
        assert_eq!(f.opcode, OpCode::Close, "{what}: {f:?}");
        assert_eq!(f.close_code(), Some(1002), "{what}: {f:?}");
        assert!(!f.close_reason().is_empty(), "{what}: empty reason");
        c.expect_eof();
    }
    assert_eq!(srv.metric("throng_protocol_errors_total"), cases.len() as u64);
}

// ---------------------------------------------------------------------------------------------------------
// 9. Idle timeout (also the server-started close handshake)

fn idle_timeout(driver: Driver) {
    // A ping interval shorter than the idle timeout (the configuration requires it): the silent client gets
    // a ping, does not answer it, and is closed at the idle timeout.
    let srv = Server::start(driver, &["--ping-interval", "0.4", "--idle-timeout", "0.5"]);
    assert_eq!(srv.metric("throng_idle_timeouts_total"), 0);

    let mut silent = srv.ws();
    silent.set_read_timeout(Duration::from_secs(4));
    let t0 = Instant::now();
    let f = loop {
        let f = silent.read_frame();
        if f.opcode != OpCode::Ping {
            break f;
        }
    };
    assert_eq!(f.close_code(), Some(1000), "{f:?}");
    let waited = t0.elapsed();
    assert!(f.close_reason().contains("idle"), "reason {:?}", f.close_reason());
    assert!(waited < Duration::from_secs(2), "idle close after {waited:?}");
    assert!(waited > Duration::from_millis(300), "idle close too early: {waited:?}");
    // The client answers the close; the server then closes the TCP connection.
    silent.write(&client_close(1000, ""));
    silent.expect_eof();
    assert!(srv.wait_metric_at_least("throng_idle_timeouts_total", 1, Duration::from_secs(1)) >= 1);

    // A client sending every 200 ms for 1.5 s is never closed (server pings, if any, are answered).
    let mut active = srv.ws();
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        active.echo_text(&format!("message {n}"));
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    active.echo_text("last");
    assert_eq!(srv.metric("throng_idle_timeouts_total"), 1);
}

// ---------------------------------------------------------------------------------------------------------
// 10. Handshake timeout

fn handshake_timeout(driver: Driver) {
    let srv = Server::start(driver, &["--handshake-timeout", "0.5"]);
    let t0 = Instant::now();
    let mut silent = srv.connect();
    let mut half = srv.connect();
    half.write(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webso");
    let mut prompt = srv.ws();
    for (what, c) in [("silent", &mut silent), ("half request", &mut half)] {
        let rest = c.read_to_end();
        let waited = t0.elapsed();
        assert!(rest.is_empty(), "{what}: got {:?}", String::from_utf8_lossy(&rest));
        assert!(waited < Duration::from_secs(2), "{what}: disconnected after {waited:?}");
        assert!(waited > Duration::from_millis(300), "{what}: disconnected too early: {waited:?}");
    }
    // The upgraded connection, older than the handshake timeout by now, is unaffected.
    prompt.echo_text("upgraded in time");
    assert_eq!(srv.wait_metric_at_least("throng_handshake_timeouts_total", 2, Duration::from_secs(1)), 2);
}

// ---------------------------------------------------------------------------------------------------------
// 11. Slow consumer

fn slow_consumer_closed_4008(driver: Driver) {
    slow_consumer(driver, false);
}

fn slow_consumer_quiet_closed_4008(driver: Driver) {
    slow_consumer(driver, true);
}

/// A client with a small receive buffer sends 16 KiB echo requests without reading the echoes (until the
/// writes stop being taken or 16 MiB went out: far more than the socket buffers plus the 64 KiB backlog),
/// then reads: whole echoes, the 4008 close, EOF. With `quiet`, it first waits until the server has taken
/// every byte it sent (its send queue is empty), so nothing of its is in flight when the server closes.
fn slow_consumer(driver: Driver, quiet: bool) {
    let srv = Server::start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "32768"]);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&srv.addr.into(), Duration::from_secs(5)).expect("connect");
    let mut c = Client::from_stream(sock.into());
    c.upgrade("/echo");

    let payload = vec![0x5a; 16 * 1024];
    let frame = client_frame(true, OpCode::Binary, &payload);
    let mut w = c.stream.try_clone().expect("try_clone");
    w.set_write_timeout(Some(Duration::from_millis(500))).expect("set_write_timeout");
    let writer = std::thread::spawn(move || {
        let mut sent = 0usize;
        while sent < 1024 && w.write_all(&frame).is_ok() {
            sent += 1;
        }
        sent
    });
    let sent = writer.join().expect("writer thread");
    if quiet {
        let deadline = Instant::now() + Duration::from_secs(5);
        while support::unsent_bytes(&c.stream) > 0 {
            assert!(Instant::now() < deadline, "the server stopped reading");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    let mut echoes = 0;
    let close = loop {
        let f = c.read_frame();
        match f.opcode {
            OpCode::Binary => {
                assert!(f.payload == payload, "echo {echoes} corrupted");
                echoes += 1;
            }
            OpCode::Close => break f,
            _ => panic!("unexpected frame {f:?}"),
        }
    };
    assert_eq!(close.close_code(), Some(4008), "close {:?} after {echoes} echoes", close.close_reason());
    assert!(!close.close_reason().is_empty());
    assert!(echoes < sent, "{echoes} echoes of {sent} requests");
    let rest = c.read_to_end();
    assert!(rest.is_empty(), "{} bytes after the close frame", rest.len());
    assert!(srv.metric("throng_slow_consumers_total") >= 1);

    // The server and its other clients are fine.
    let mut other = srv.ws();
    other.echo_text("unaffected");
    other.write(&client_frame(true, OpCode::Binary, &payload));
    assert_eq!(other.read_frame().payload, payload);
}

// ---------------------------------------------------------------------------------------------------------
// 12. Drain on SIGTERM

/// Checks a new connection is refused: connect fails, or it is dropped unanswered, or answered with 503.
fn assert_refused(srv: &Server) {
    let Ok(mut s) = TcpStream::connect_timeout(&srv.addr, Duration::from_secs(2)) else { return };
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("set_read_timeout");
    s.set_write_timeout(Some(Duration::from_secs(3))).expect("set_write_timeout");
    let _ = s.write_all(upgrade_request("/echo", SAMPLE_KEY).as_bytes());
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Err(e) => panic!("new connection during drain neither refused nor answered: {e}; got {got:?}"),
    }
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 503 "), "new connection during drain got {text:?}");
}

/// With `--drain-delay 0` (the old behaviour) SIGTERM closes at once: listeners shut, every client 1001.
fn drain_on_sigterm(driver: Driver) {
    let drain = Duration::from_secs(5);
    let mut srv = Server::start(driver, &["--shards", "2", "--drain-delay", "0", "--drain-timeout", "5"]);
    let mut clients: Vec<Client> = (0..50).map(|_| srv.ws()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo_text(&format!("client {i}"));
    }
    let stats = srv.stats();
    let per_shard: Vec<u64> =
        stats["per_shard"].as_array().expect("per_shard").iter().map(|s| s["connections"].as_u64().unwrap()).collect();
    assert_eq!(per_shard.len(), 2, "{stats}");
    assert!(per_shard.iter().all(|&n| n >= 1), "connections not spread over both shards: {per_shard:?}");

    let t0 = Instant::now();
    srv.sigterm();
    for (i, c) in clients.iter_mut().enumerate() {
        let f = c.expect_close(1001);
        assert!(!f.close_reason().is_empty(), "client {i}: empty close reason");
        if i == 0 {
            // Draining has begun: new connections are refused.
            assert_refused(&srv);
        }
        c.write(&client_close(1001, ""));
    }
    for c in &mut clients {
        c.expect_eof();
    }
    let status = srv.wait_exit(drain.saturating_sub(t0.elapsed()) + Duration::from_millis(500));
    let waited = t0.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running {waited:?} after SIGTERM"));
    assert!(status.success(), "exit status {status}");
    // Every client answered at once, so the drain did not have to wait out its timeout.
    assert!(waited < drain, "drain took {waited:?}");
}

/// The drain's first phase, on two shards: from SIGTERM on `/health` answers 503 `{"status":"draining"}` and
/// new upgrades get 503 with a JSON reason, while connections already open keep working and `/metrics` and
/// `/stats` are still served; only after `--drain-delay` does every connection get 1001, and the process
/// exits 0.
fn drain_delay_keeps_connections_while_health_fails(driver: Driver) {
    let delay = Duration::from_secs(4);
    let mut srv = Server::start(driver, &["--shards", "2", "--drain-delay", "4", "--drain-timeout", "5"]);
    let mut clients: Vec<Client> = (0..8).map(|_| srv.ws()).collect();
    for c in &mut clients {
        c.echo_text("before");
        // Long enough for the delay and the close after it.
        c.set_read_timeout(Duration::from_secs(15));
    }
    assert_eq!(srv.metric("throng_drain_phase"), 0);

    let t0 = Instant::now();
    srv.sigterm();
    // /health fails at once (within a few polls), with the reason in JSON.
    let health = loop {
        let r = srv.get("/health");
        if r.status != 200 || t0.elapsed() > delay {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.header("Content-Type"), Some("application/json"), "{}", health.text());
    let body: serde_json::Value = serde_json::from_slice(&health.body).expect("/health 503 body is JSON");
    assert_eq!(body["status"], "draining", "{body}");
    let noticed = t0.elapsed();

    // Every open connection still echoes.
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo_text(&format!("during the delay {i}"));
    }
    // A new upgrade is refused with 503 and a JSON reason (a proxy retries another node)...
    let refused = exchange(&srv, &upgrade_request("/echo", SAMPLE_KEY));
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_json_error(&refused, "unavailable");
    assert!(refused.text().contains("shutting down"), "{}", refused.text());
    // ...while the other endpoints answer.
    let stats = srv.stats();
    assert_eq!((stats["draining"].as_bool(), stats["closing"].as_bool()), (Some(true), Some(false)), "{stats}");
    assert_eq!(srv.metric("throng_drain_phase"), 1);
    assert!(srv.metric("throng_drain_refused_total") >= 1);
    let during = t0.elapsed();
    assert!(during < delay, "the checks of the delay phase took {during:?}, past the {delay:?} delay");

    // After the delay: 1001 for everyone, then exit 0.
    for (i, c) in clients.iter_mut().enumerate() {
        let f = c.expect_close(1001);
        assert!(!f.close_reason().is_empty(), "client {i}: empty close reason");
        c.write(&client_close(1001, ""));
    }
    let closed = t0.elapsed();
    assert!(closed >= delay - Duration::from_millis(100), "1001 after {closed:?}, before the {delay:?} delay");
    for c in &mut clients {
        c.expect_eof();
    }
    let status = srv
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running {:?} after SIGTERM", t0.elapsed()));
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "health 503 after {noticed:?}; delay checks done at {during:?}; 1001 at {closed:?}; exit at {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------------------
// 13. Many connections (tungstenite as an independent client implementation)

fn many_connections_echo(driver: Driver) {
    const N: usize = 2000;
    support::raise_nofile_limit();
    // 2,000 upgrades from 127.0.0.1 as fast as they go: past the default 1,000 per second per address.
    let srv = Server::start(driver, &["--shards", "2", "--max-upgrades-per-second-per-ip", "0"]);
    let url = format!("ws://{}/echo", srv.addr);
    let t0 = Instant::now();
    let mut sockets = Vec::with_capacity(N);
    for i in 0..N {
        let s = TcpStream::connect(srv.addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        s.set_read_timeout(Some(support::IO_TIMEOUT)).expect("set_read_timeout");
        s.set_write_timeout(Some(support::IO_TIMEOUT)).expect("set_write_timeout");
        s.set_nodelay(true).expect("set_nodelay");
        let (ws, resp) = tungstenite::client(url.as_str(), s).unwrap_or_else(|e| panic!("handshake {i}: {e}"));
        assert_eq!(resp.status(), 101);
        sockets.push(ws);
    }
    let connected = t0.elapsed();
    let stats = srv.stats();
    assert!(stats["connections"].as_u64().is_some_and(|n| n >= N as u64), "{stats}");
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send(tungstenite::Message::text(format!("hello from {i}"))).unwrap_or_else(|e| panic!("send {i}: {e}"));
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        match ws.read().unwrap_or_else(|e| panic!("read {i}: {e}")) {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), format!("hello from {i}")),
            other => panic!("client {i}: unexpected {other:?}"),
        }
    }
    let total = t0.elapsed();
    assert_eq!(srv.metric("throng_upgrades_total"), N as u64);
    eprintln!("{N} connections: upgraded in {connected:?}, all echoed in {total:?}");
}

/// io_uring only: a buffer ring far smaller than what arrives at once (2 buffers of 512 B, 64 connections
/// each sending ~8 KiB of frames in one write) runs dry: the receives that find it empty end with ENOBUFS
/// and are re-armed once buffers are back, and every message is echoed whole and in order.
#[test]
fn a_dry_buffer_ring_delays_but_loses_nothing() {
    const CONNS: usize = 64;
    const MSGS: usize = 20;
    let srv = Server::start(
        Driver::Uring,
        &["--uring-buffers", "2", "--uring-buffer-size", "512", "--max-upgrades-per-second-per-ip", "0"],
    );
    let url = format!("ws://{}/echo", srv.addr);
    let mut sockets: Vec<_> = (0..CONNS)
        .map(|i| {
            let s = TcpStream::connect(srv.addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
            s.set_read_timeout(Some(support::IO_TIMEOUT)).expect("set_read_timeout");
            let (ws, _) = tungstenite::client(url.as_str(), s).unwrap_or_else(|e| panic!("handshake {i}: {e}"));
            ws
        })
        .collect();
    let text = |i: usize, m: usize| format!("{i:03}-{m:03}-{}", "x".repeat(400));
    // Every connection's burst in one write, all of them before any echo is read.
    for (i, ws) in sockets.iter_mut().enumerate() {
        for m in 0..MSGS {
            ws.write(tungstenite::Message::text(text(i, m))).expect("queue");
        }
        ws.flush().expect("flush");
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        for m in 0..MSGS {
            match ws.read().unwrap_or_else(|e| panic!("read {i}/{m}: {e}")) {
                tungstenite::Message::Text(t) => assert_eq!(t.as_str(), text(i, m), "connection {i}, message {m}"),
                other => panic!("connection {i}: unexpected {other:?}"),
            }
        }
    }
    assert!(srv.metric("throng_uring_buffers_empty_total") > 0, "the ring never ran dry: the test proves nothing");
    assert_eq!(srv.metric("throng_messages_in_total"), (CONNS * MSGS) as u64);
}
