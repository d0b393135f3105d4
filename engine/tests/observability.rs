//! Observability against the real binary, on both drivers: `/metrics` parsed by a real Prometheus text
//! parser (Python `prometheus_client`, from the virtualenv `tools/test` makes in `target/obs-venv`), with
//! well-formed histograms after real traffic; closes by code; `frames_out_total` counting every frame;
//! `/health` in each status a running server can be in; the close log line and the rate-limited refusal
//! log.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::v1::{poll_until, Ws};
use support::{client_close, client_frame, Driver, Server};
use throng::channel::home_of;
use throng_protocol::frame::OpCode;

on_both_drivers! {
    metrics_parse_with_histograms_after_traffic => metrics_parse_uring, metrics_parse_epoll;
    frames_out_counts_welcomes_replies_and_closes => frames_out_uring, frames_out_epoll;
    health_reports_each_status => health_uring, health_epoll;
    close_lines_and_rate_limited_refusals => logs_uring, logs_epoll;
}

/// The virtualenv's Python, with `prometheus_client` installed.
fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join("target/obs-venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import prometheus_client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} with prometheus_client is missing: run tools/test (it makes the virtualenv before the tests), or \
         `python3 -m venv target/obs-venv && target/obs-venv/bin/pip install prometheus_client`",
        py.display()
    );
    py
}

/// The body of `GET /metrics`.
fn scrape(srv: &Server) -> String {
    let r = srv.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    String::from_utf8(r.body).expect("/metrics is UTF-8")
}

/// One sample: (name, labels, value).
type Sample = (String, BTreeMap<String, String>, f64);
/// Family name -> (type, samples).
type Families = BTreeMap<String, (String, Vec<Sample>)>;

/// Parses a `/metrics` body with `prometheus_client`'s `text_string_to_metric_families`: family name ->
/// (type, samples). A body the parser rejects fails the test with its error.
fn parse(text: &str) -> Families {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    if f.name in out:
        sys.exit("family declared twice: " + f.name)
    out[f.name] = [f.type, [[s.name, s.labels, s.value] for s in f.samples]]
json.dump(out, sys.stdout)
"#;
    let mut child = Command::new(venv_python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the venv's python");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing /metrics to the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "prometheus_client refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser JSON")
}

/// Sum of the samples named `sample` whose labels include `with`.
fn sum(f: &Families, family: &str, sample: &str, with: &[(&str, &str)]) -> f64 {
    let (_, samples) = f.get(family).unwrap_or_else(|| panic!("no family {family}: {:?}", f.keys()));
    samples
        .iter()
        .filter(|(n, l, _)| n == sample && with.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
        .sum()
}

/// Checks every series of histogram `family`: buckets cumulative (non-decreasing with `le`), `+Inf` equal
/// to `_count`, `_sum` within what the buckets allow. Returns the total count over shards.
fn check_histogram(f: &Families, family: &str) -> f64 {
    let (kind, samples) = f.get(family).unwrap_or_else(|| panic!("no family {family}"));
    assert_eq!(kind, "histogram", "{family}");
    let shards: std::collections::BTreeSet<&String> = samples.iter().filter_map(|s| s.1.get("shard")).collect();
    assert!(!shards.is_empty(), "{family}: no series");
    let mut total = 0.0;
    for shard in shards {
        let of = |suffix: &str| -> Vec<Sample> {
            let name = format!("{family}{suffix}");
            samples.iter().filter(|(n, l, _)| n == &name && l.get("shard") == Some(shard)).cloned().collect()
        };
        let mut buckets: Vec<(f64, f64)> = of("_bucket")
            .into_iter()
            .map(|(_, l, v)| {
                let le = l.get("le").expect("bucket without le");
                (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le is a number") }, v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() > 2 && buckets.last().unwrap().0.is_infinite(), "{family}{{shard={shard}}}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}{{shard={shard}}} not cumulative: {buckets:?}");
        let count: Vec<f64> = of("_count").iter().map(|s| s.2).collect();
        let sum: Vec<f64> = of("_sum").iter().map(|s| s.2).collect();
        assert_eq!((count.len(), sum.len()), (1, 1), "{family}{{shard={shard}}}: one _count and one _sum");
        let (count, sum) = (count[0], sum[0]);
        assert_eq!(buckets.last().unwrap().1, count, "{family}{{shard={shard}}}: +Inf is not _count");
        // Each value lies between its bucket's lower and upper bound (2 significant digits: 1% slack).
        let (mut lo, mut hi, mut prev) = (0.0, 0.0, (0.0, 0.0));
        for &(le, n) in &buckets {
            let k = n - prev.1;
            lo += k * prev.0;
            hi += k * if le.is_infinite() { f64::MAX / 1e6 } else { le };
            prev = (le, n);
        }
        assert!(
            sum >= lo * 0.99 && sum <= hi * 1.01 + 1e-6,
            "{family}{{shard={shard}}}: _sum {sum} outside [{lo}, {hi}]"
        );
        total += count;
    }
    total
}

/// A channel name homed on shard `home` of `shards`.
fn channel_on(home: usize, shards: usize, tag: &str) -> String {
    (0..).map(|i| format!("obs:{tag}-{i}")).find(|n| home_of(n, shards) == home).expect("some name")
}

/// Two shards, a subscriber on each, publishes homed on each: the delivery-latency histogram counts one
/// value per delivery and is well-formed, as are loop lag and flush passes; every family parses.
fn metrics_parse_with_histograms_after_traffic(driver: Driver) {
    let srv = Server::start(driver, &["--shards", "2"]);
    let mut subs: Vec<Ws> = (0..2).map(|s| Ws::connect_where(&srv, &format!("sub{s}"), |sh| sh == s)).collect();
    let mut publisher = Ws::connect(&srv, "pub");
    const N: usize = 10;
    let channels: Vec<String> = (0..2).map(|h| channel_on(h, 2, "lat")).collect();
    for ch in &channels {
        for s in &mut subs {
            s.subscribe(ch, None);
        }
    }
    for i in 0..N {
        for ch in &channels {
            publisher.publish(ch, json!({ "i": i }));
        }
    }
    for s in &mut subs {
        let got = (0..2 * N).map(|_| s.recv()).filter(|m| m["type"] == "message").count();
        assert_eq!(got, 2 * N, "{}", s.client);
    }
    // The histograms reach the scrape within a tick (50 ms).
    let deliveries = (2 * 2 * N) as f64;
    let f = poll_until(Duration::from_secs(3), || {
        let text = scrape(&srv);
        let f = parse(&text);
        let n = sum(&f, "throng_delivery_latency_seconds", "throng_delivery_latency_seconds_count", &[]);
        if n >= deliveries {
            Ok(f)
        } else {
            Err(format!("{n} deliveries timed of {deliveries}"))
        }
    });
    let timed = check_histogram(&f, "throng_delivery_latency_seconds");
    assert_eq!(timed, deliveries, "one latency per delivery");
    // Each shard delivered to its own subscriber: both shards recorded.
    for shard in ["0", "1"] {
        let n =
            sum(&f, "throng_delivery_latency_seconds", "throng_delivery_latency_seconds_count", &[("shard", shard)]);
        assert_eq!(n, (2 * N) as f64, "shard {shard}");
    }
    // On loopback with nothing else to do, most deliveries take well under 100 ms.
    let fast = sum(&f, "throng_delivery_latency_seconds", "throng_delivery_latency_seconds_bucket", &[("le", "0.1")]);
    assert!(fast >= deliveries * 0.9, "{fast} of {deliveries} under 100 ms");
    assert!(check_histogram(&f, "throng_loop_lag_seconds") > 0.0, "ticks ran");
    assert!(check_histogram(&f, "throng_flush_pass_seconds") > 0.0, "flush passes ran");
    // Types and the other new families.
    let kind = |name: &str| f.get(name).map(|x| x.0.clone()).unwrap_or_else(|| panic!("no {name}"));
    for (name, k) in [
        ("throng_closes", "counter"),
        ("throng_refusals", "counter"),
        ("throng_ring_dropped", "counter"),
        ("throng_frames_out", "counter"),
        ("throng_ws_connections", "gauge"),
        ("throng_http_connections", "gauge"),
        ("throng_active_subscriptions", "gauge"),
        ("throng_channels", "gauge"),
        ("throng_history_bytes", "gauge"),
        ("throng_queued_bytes", "gauge"),
    ] {
        assert_eq!(kind(name), k, "{name}");
    }
    // 3 WebSockets; 4 subscriptions (plus none for the publisher); this scrape is an HTTP connection.
    assert_eq!(sum(&f, "throng_ws_connections", "throng_ws_connections", &[]), 3.0);
    assert!(sum(&f, "throng_http_connections", "throng_http_connections", &[]) >= 1.0);
    assert_eq!(sum(&f, "throng_active_subscriptions", "throng_active_subscriptions", &[]), 4.0);
    assert!(sum(&f, "throng_history_bytes", "throng_history_bytes", &[]) > 0.0);
    assert_eq!(sum(&f, "throng_ring_dropped", "throng_ring_dropped_total", &[]), 0.0);
    drop(subs);
    // Gone subscribers are no longer counted.
    poll_until(Duration::from_secs(3), || {
        let f = parse(&scrape(&srv));
        let (ws, subs) = (
            sum(&f, "throng_ws_connections", "throng_ws_connections", &[]),
            sum(&f, "throng_active_subscriptions", "throng_active_subscriptions", &[]),
        );
        if ws == 1.0 && subs == 0.0 {
            Ok(())
        } else {
            Err(format!("{ws} websockets, {subs} subscriptions"))
        }
    });
}

/// One shard, so the counters are read after the writes they count: the welcome, each reply, an echo and
/// the close echo each count one frame; closes are counted by code (a client's 1000, a 1009 for a message
/// over max_message_size, 1006 for a connection dropped without a close).
fn frames_out_counts_welcomes_replies_and_closes(driver: Driver) {
    let srv = Server::start(driver, &["--max-message-size", "1024"]);
    assert_eq!(srv.metric("throng_frames_out_total"), 0);
    let mut c = Ws::connect(&srv, "alice");
    assert_eq!(srv.metric("throng_frames_out_total"), 1, "the welcome");
    assert_eq!(c.call(json!({"type": "ping"}))["type"], "pong");
    c.subscribe("obs:frames", None);
    assert_eq!(srv.metric("throng_frames_out_total"), 3, "welcome, pong, subscribed");
    c.publish("obs:frames", json!("x"));
    c.barrier();
    // published + the message + the barrier's own (1 subscribed, 1 published, 1 message)
    assert_eq!(srv.metric("throng_frames_out_total"), 8);
    c.ws.close(None).expect("close");
    let (_, frame) = c.read_until_close();
    assert_eq!(frame.map(|f| u16::from(f.code)), None, "an empty close is echoed empty");
    assert_eq!(srv.metric("throng_frames_out_total"), 9, "the close echo");

    // /echo: each echo is a frame; a client's 1000 echoed.
    let mut e = srv.ws();
    e.echo_text("hello");
    e.write(&client_close(1000, "bye"));
    assert_eq!(e.expect_close(1000).close_code(), Some(1000));
    // A message over max_message_size: 1009.
    let mut big = srv.ws();
    big.write(&client_frame(true, OpCode::Text, &[b'a'; 2000]));
    big.expect_close(1009);
    // A connection that just goes away: 1006.
    let gone = srv.ws();
    drop(gone);
    // (A connection we closed waits for its peer's EOF, up to the close grace, before it is gone.)
    drop((e, big));
    let f = poll_until(Duration::from_secs(3), || {
        let f = parse(&scrape(&srv));
        let code = |c: &str| sum(&f, "throng_closes", "throng_closes_total", &[("code", c)]);
        let got = (code("1005"), code("1000"), code("1009"), code("1006"));
        let ws = sum(&f, "throng_ws_connections", "throng_ws_connections", &[]);
        if got == (1.0, 1.0, 1.0, 1.0) && ws == 0.0 {
            Ok(f)
        } else {
            Err(format!("closes (1005, 1000, 1009, 1006): {got:?}; {ws} websockets"))
        }
    });
    assert_eq!(sum(&f, "throng_closes", "throng_closes_total", &[]), 4.0, "no other close counted");
    // 9 + the echo + two close frames (1000 echo, 1009).
    assert_eq!(sum(&f, "throng_frames_out", "throng_frames_out_total", &[]), 12.0);
}

/// `/health` as JSON in each status: `ok`; `degraded` near `max_connections` and after the shard ran its
/// timers late (the process stopped for 1.2 s), both 200 with a reason; `draining` 503. (`starting` is in
/// the unit tests of `http::endpoints`: a black-box test cannot hold a shard back from binding.)
fn health_reports_each_status(driver: Driver) {
    let mut srv = Server::start(driver, &["--shards", "2", "--max-connections", "10", "--drain-delay", "3"]);
    let health = |srv: &Server| {
        let r = srv.get("/health");
        assert_eq!(r.header("Content-Type"), Some("application/json"), "{}", r.text());
        let v: Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("/health not JSON ({e}): {}", r.text()));
        (r.status, v)
    };
    let (status, v) = health(&srv);
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")), "{v}");
    assert_eq!((v["shards"].as_u64(), v["shards_listening"].as_u64()), (Some(2), Some(2)), "{v}");
    assert_eq!(v["max_connections"], 10, "{v}");
    assert!(v.get("reason").is_none(), "{v}");

    // 9 of 10 connections open (this request not counted): degraded, still 200.
    let clients: Vec<_> = (0..9).map(|_| srv.ws()).collect();
    let (status, v) = health(&srv);
    assert_eq!((status, v["status"].as_str()), (200, Some("degraded")), "{v}");
    assert_eq!(v["websockets"], 9, "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("max_connections")), "{v}");
    drop(clients);
    poll_until(Duration::from_secs(3), || match health(&srv) {
        (200, v) if v["status"] == "ok" => Ok(()),
        (s, v) => Err(format!("{s} {v}")),
    });

    // Timers run 1.2 s late: degraded for the next 10 s.
    srv.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1200));
    srv.signal(libc::SIGCONT);
    let v = poll_until(Duration::from_secs(3), || match health(&srv) {
        (200, v) if v["status"] == "degraded" => Ok(v),
        (s, v) => Err(format!("{s} {v}")),
    });
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("late"), "{v}");
    let f = parse(&scrape(&srv));
    let under_1s = sum(&f, "throng_loop_lag_seconds", "throng_loop_lag_seconds_bucket", &[("le", "1")]);
    let total = sum(&f, "throng_loop_lag_seconds", "throng_loop_lag_seconds_count", &[]);
    assert!(under_1s < total, "a tick over 1 s late is in the histogram ({under_1s} of {total} under 1 s)");

    // Draining: 503, the same shape as before.
    srv.sigterm();
    let (status, v) = poll_until(Duration::from_secs(2), || match health(&srv) {
        (503, v) => Ok((503, v)),
        (s, v) => Err(format!("{s} {v}")),
    });
    assert_eq!((status, v["status"].as_str()), (503, Some("draining")), "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("shutting down")), "{v}");
    assert!(srv.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

/// The close of a WebSocket is one debug line with client address, user, duration, code and reason; a flood
/// of refused upgrades (a bad origin) gives at most one info line per second per reason, the next one
/// saying how many were left out, while every refusal is counted.
fn close_lines_and_rate_limited_refusals(driver: Driver) {
    let srv = Server::start_with_log(driver, &["--allowed-origins", "https://ok.example"], "throng=debug");
    let mut c = Ws::connect(&srv, "carol");
    std::thread::sleep(Duration::from_millis(120));
    c.ws.close(Some(tungstenite::protocol::CloseFrame { code: 1000.into(), reason: "done".into() })).expect("close");
    let _ = c.read_until_close();
    let line = poll_until(Duration::from_secs(3), || {
        let log = srv.log();
        log.lines().find(|l| l.contains(" closed") && l.contains("user=\"carol\"")).map(str::to_string).ok_or(log)
    });
    for field in ["client_addr=127.0.0.1", "code=1000", "by=\"client\"", "duration_ms="] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    let ms: u64 =
        line.split("duration_ms=").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()).expect("ms");
    assert!((100..5000).contains(&ms), "{line}");

    // The flood: 300 upgrades from a disallowed origin, as fast as they are answered.
    const FLOOD: usize = 300;
    let t0 = Instant::now();
    for _ in 0..FLOOD {
        let mut s = srv.connect();
        s.write(
            format!(
                "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\n\
                 Sec-WebSocket-Version: 13\r\nOrigin: https://evil.example\r\n\r\n",
                support::SAMPLE_KEY
            )
            .as_bytes(),
        );
        let head = String::from_utf8_lossy(&s.read_head()).into_owned();
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    }
    let flood_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1100));
    // One more after the interval: its line reports the refusals left out.
    let mut s = srv.connect();
    s.write(
        format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\n\
             Sec-WebSocket-Version: 13\r\nOrigin: https://evil.example\r\n\r\n",
            support::SAMPLE_KEY
        )
        .as_bytes(),
    );
    let _ = s.read_head();
    let lines = poll_until(Duration::from_secs(3), || {
        let log = srv.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("upgrade refused") && l.contains("reason=\"origin\""))
            .map(str::to_string)
            .collect();
        let reported: u64 =
            lines.iter().filter_map(|l| l.split("suppressed=").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
        // Every refusal is either a line or counted in a later line's `suppressed`.
        if lines.len() as u64 + reported == FLOOD as u64 + 1 {
            Ok(lines)
        } else {
            Err(format!("{} lines reporting {reported} left out:\n{log}", lines.len()))
        }
    });
    let bound = flood_secs.ceil() as usize + 2;
    assert!(
        lines.len() <= bound,
        "{} lines for {FLOOD} refusals in {flood_secs:.2} s:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(lines.iter().all(|l| l.contains(" INFO ") && l.contains("client_addr=127.0.0.1")), "{}", lines.join("\n"));
    // A request that is not HTTP: 400, counted as bad_request.
    let mut s = srv.connect();
    s.write(b"NOT HTTP AT ALL\r\n\r\n");
    assert!(String::from_utf8_lossy(&s.read_head()).starts_with("HTTP/1.1 400"));
    let f = parse(&scrape(&srv));
    assert_eq!(sum(&f, "throng_refusals", "throng_refusals_total", &[("reason", "bad_request")]), 1.0);
    assert_eq!(sum(&f, "throng_refusals", "throng_refusals_total", &[("reason", "origin")]), (FLOOD + 1) as f64);
    assert_eq!(srv.metric("throng_origin_refused_total"), FLOOD as u64 + 1, "the old counter too");
}
