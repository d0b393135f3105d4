//! `broadcast --transport sse` against a real `throng` (the debug build next to this test's executable,
//! `target/debug/throng`, or `THRONG_BIN`), two shards: `GET /sse` subscribers lose nothing and report
//! deliveries and latency; the WebSocket run of the same broadcast reports the same fields; a stream the
//! server closes (`/api/disconnect`) is counted as a closed connection with its code and warned about, and
//! with a token in `?token=` every stream is authenticated.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

const SECRET: &str = "a bench test secret of at least thirty-two bytes";

mod real_throng;

use real_throng::{Throng, KEY};

/// `POST /api/disconnect` for `user` with close code 4000; the number of connections closed.
fn disconnect(srv: &Throng, user: &str) -> u64 {
    let body = format!("{{\"user\":\"{user}\",\"code\":4000}}");
    let req = format!(
        "POST /api/disconnect HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let json = &text[text.find("\r\n\r\n").expect("a head") + 4..];
    serde_json::from_str::<Value>(json).expect("JSON")["disconnected"].as_u64().expect("a count")
}

fn bench(args: &[&str]) -> Report {
    let mut v = vec!["throng-bench", "broadcast"];
    v.extend_from_slice(args);
    let plan = Plan::from_args(&Args::parse_from(v)).expect("valid arguments");
    run(&plan, &WorkerCommand::default()).expect("run completes")
}

/// Every key path of a JSON value's objects (`a.b.c`), descending into objects only: the shape of a report.
fn shape(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let path = format!("{prefix}{k}");
            shape(v, &format!("{path}."), out);
            out.insert(path);
        }
    }
}

#[test]
fn sse_subscribers_lose_nothing_and_report_as_ws_ones() {
    let srv = Throng::start(&[]);
    let url = srv.url();
    let pid = srv.pid().to_string();
    let run = |transport: &str| {
        bench(&[
            "--url",
            &url,
            "--transport",
            transport,
            "--connections",
            "50",
            "--publishers",
            "2",
            "--rate",
            "100",
            "--size",
            "200",
            "--duration",
            "1",
            "--grace",
            "2",
            "--server-pid",
            &pid,
        ])
    };
    let sse = run("sse");
    let m = sse.messages.as_ref().expect("message figures");
    assert_eq!((sse.transport, sse.path.as_str()), ("sse", "/ws"));
    assert_eq!((sse.connect.ready, sse.connect.established, sse.connect.failed), (52, 52, 0), "{sse:#?}");
    assert_eq!((m.receivers, m.receivers_ready), (50, 50), "{sse:#?}");
    assert!(m.sent >= 50, "{sse:#?}");
    assert_eq!(m.expected, m.sent * 50, "{sse:#?}");
    assert_eq!((m.delivered, m.lost, m.duplicates, m.gaps, m.reordered), (m.expected, 0, 0, 0, 0), "{sse:#?}");
    assert_eq!((m.unparsed, m.v1_errors, m.skipped, sse.connect.dropped), (0, 0, 0, 0), "{sse:#?}");
    assert!(m.received > 0 && m.received_per_s > 0.0, "{sse:#?}");
    assert_eq!(m.latency_us.count, m.received);
    assert!(m.latency_us.p50 > 0.0 && m.latency_us.max < 2e6, "{:?}", m.latency_us);
    let server = sse.server.as_ref().expect("server figures");
    assert!(server.cpu_us_per_msg.is_some_and(|c| c > 0.0), "{server:?}");
    assert!(!sse.warnings.iter().any(|w| w.contains("failed") || w.contains("not received")), "{:?}", sse.warnings);

    let ws = run("ws");
    let w = ws.messages.as_ref().expect("message figures");
    assert_eq!(ws.transport, "ws");
    assert_eq!((w.delivered, w.lost), (w.expected, 0), "{ws:#?}");
    // The same report, field for field: the two runs compare directly.
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    shape(&serde_json::to_value(&sse).unwrap(), "", &mut a);
    shape(&serde_json::to_value(&ws).unwrap(), "", &mut b);
    assert_eq!(a, b);
    assert!(a.contains("messages.latency_us.p99") && a.contains("server.cpu_us_per_msg"), "{a:?}");
}

#[test]
fn a_stream_the_server_closes_is_a_failure() {
    let srv = Throng::start(&["--jwt-secret", SECRET]);
    let url = srv.url();
    let bench_run = std::thread::spawn(move || {
        bench(&[
            "--url",
            &url,
            "--transport",
            "sse",
            "--connections",
            "10",
            "--rate",
            "50",
            "--duration",
            "3",
            "--grace",
            "1",
            "--jwt-secret",
            SECRET,
        ])
    });
    // Connection 0 is the publisher; subscriber 5's token names `bench-5`. Closed as soon as it is open
    // (while subscribing or in the window: either way a failure).
    let deadline = Instant::now() + Duration::from_secs(20);
    while disconnect(&srv, "bench-5") == 0 {
        assert!(Instant::now() < deadline, "the stream of bench-5 never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = bench_run.join().expect("the bench thread");
    let c = &r.connect;
    let m = r.messages.as_ref().expect("message figures");
    // Every other stream was authenticated by its `?token=` and got everything.
    assert_eq!(c.established, 11, "{r:#?}");
    let closed =
        c.drop_reasons.get("close_4000").copied().unwrap_or(0) + c.errors.get("close_4000").copied().unwrap_or(0);
    assert_eq!((closed, c.dropped + c.failed), (1, 1), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("close_4000")), "{:?}", r.warnings);
    // Its messages after the close are lost (all of them if it never became ready), and reported.
    assert!(m.lost > 0 && m.lost <= m.sent + m.skipped, "{r:#?}");
    assert!(m.delivered >= (m.sent + m.skipped) * 9, "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("not received")), "{:?}", r.warnings);
}
