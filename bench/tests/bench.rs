//! The bench against a small in-test server: it counts exactly what it was sent, detects a lost and a
//! reordered message, counts echoes exactly, reports connection counts and refusals, splits work over
//! worker processes, and drives churn. And the window accounting, against a server that stalls, drops,
//! duplicates or stops reading: latency from the scheduled send time (a slow bench loop shows), skipped
//! sends and never-ready receivers as lost, late messages apart from the window's, duplicates apart from
//! losses (broadcast and echo), and a bench thread saturated in bursts flagged as the limit.

mod common;

use clap::Parser;
use common::{Fault, Options, TestServer};
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

fn bench(args: &[&str]) -> Report {
    bench_with(args, &WorkerCommand::default())
}

fn bench_with(args: &[&str], worker: &WorkerCommand) -> Report {
    let mut v = vec!["throng-bench"];
    v.extend_from_slice(args);
    let plan = Plan::from_args(&Args::parse_from(v)).expect("valid arguments");
    run(&plan, worker).expect("run completes")
}

fn raw_broadcast(server: &TestServer, extra: &[&str]) -> Report {
    let url = server.url();
    let mut args = vec!["broadcast", "--target", "raw", "--url", &url, "--connections", "20"];
    args.extend_from_slice(&["--rate", "200", "--duration", "1", "--grace", "2"]);
    args.extend_from_slice(extra);
    bench(&args)
}

#[test]
fn broadcast_counts_exactly_what_it_was_sent() {
    let server = TestServer::start(Options::default());
    let r = raw_broadcast(&server, &["--publishers", "2"]);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 100, "{r:#?}");
    assert_eq!(server.relayed(), m.sent);
    assert_eq!(r.connect.ready, 20);
    assert_eq!(m.expected, m.sent * 20);
    assert_eq!((m.delivered, m.received + m.late), (m.expected, m.expected), "{r:#?}");
    assert_eq!((m.lost, m.reordered, m.gaps, m.unparsed, m.duplicates, m.skipped), (0, 0, 0, 0, 0, 0), "{r:#?}");
    assert_eq!(m.receivers_ready, 20);
    // Every send is a scheduled one, and the loop keeps its schedule.
    assert_eq!(m.send_lag_us.count, m.sent);
    assert!(m.send_lag_us.p50 < 5_000.0, "{:?}", m.send_lag_us);
    assert_eq!(m.latency_us.count, m.received);
    assert!(m.latency_us.p50 > 0.0 && m.latency_us.max < 1e6, "{:?}", m.latency_us);
}

#[test]
fn broadcast_detects_a_lost_message() {
    let server = TestServer::start(Options { faults: vec![Fault::Drop(10)], ..Options::default() });
    let r = raw_broadcast(&server, &["--publishers", "2"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(server.relayed(), m.sent);
    assert_eq!(m.delivered, m.sent * 20 - 20, "{r:#?}");
    assert_eq!((m.lost, m.gaps, m.reordered), (20, 20, 0), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("not received")));
}

#[test]
fn broadcast_detects_a_reordered_message() {
    let server = TestServer::start(Options { faults: vec![Fault::Swap(10)], ..Options::default() });
    let r = raw_broadcast(&server, &["--publishers", "1"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(m.delivered, m.sent * 20, "{r:#?}");
    // The late message filled its gap: reordered, not lost, no gap left.
    assert_eq!((m.lost, m.reordered, m.gaps, m.duplicates), (0, 20, 0, 0), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("out of order")));
}

#[test]
fn throng_v1_broadcast_subscribes_then_counts() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let r = bench(&[
        "broadcast",
        "--url",
        &url,
        "--connections",
        "10",
        "--publishers",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
        "--grace",
        "2",
        "--jwt-secret",
        "s3cret",
    ]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((r.connect.ready, r.connect.established), (12, 12), "{r:#?}");
    assert_eq!(r.path, "/ws");
    assert!(m.sent >= 50, "{r:#?}");
    assert_eq!(m.delivered, m.sent * 10, "{r:#?}");
    assert_eq!((m.lost, m.reordered, m.unparsed, m.v1_errors), (0, 0, 0, 0), "{r:#?}");
}

#[test]
fn echo_counts_exactly_closed_loop_and_fixed_rate() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let closed = ["echo", "--url", &url, "--connections", "10", "--inflight", "2", "--duration", "1", "--grace", "2"];
    let r = bench(&closed);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(r.path, "/echo");
    assert!(m.sent > 100, "{r:#?}");
    // Echoes of the last messages sent may come back after the window: late, not lost.
    assert_eq!((m.received + m.late, m.lost, m.duplicates, m.gaps), (m.sent, 0, 0, 0), "{r:#?}");
    assert!(m.late <= 20, "{r:#?}");
    let fixed = ["echo", "--url", &url, "--connections", "5", "--rate", "300", "--duration", "1", "--grace", "2"];
    let r = bench(&fixed);
    let m = r.messages.as_ref().unwrap();
    // A descheduled bench sends fewer, never more.
    assert!((150..=301).contains(&m.sent), "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent, 0), "{r:#?}");
}

#[test]
fn connect_reports_the_right_count_and_errors() {
    let server = TestServer::start(Options { reject_every: 5, ..Options::default() });
    let url = server.url();
    let r =
        bench(&["connect", "--target", "raw", "--url", &url, "--connections", "50", "--hold", "0.5", "--grace", "0"]);
    let c = &r.connect;
    assert_eq!((c.attempted, c.ready, c.held, c.failed), (50, 40, 40, 10), "{r:#?}");
    assert_eq!(c.errors.get("status_503"), Some(&10));
    assert_eq!(c.latency_us.count, 40);
    assert!(r.messages.is_none());

    // Nothing listens on a port just released: every attempt is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}");
    let r = bench(&["connect", "--url", &url, "--connections", "5", "--hold", "0.2", "--grace", "0"]);
    assert_eq!((r.connect.ready, r.connect.failed), (0, 5));
    assert_eq!(r.connect.errors.get("refused"), Some(&5), "{r:#?}");
    assert!(r.warnings[0].contains("skipped"), "{r:#?}");

    // The same through worker processes, which are told to stop without a window.
    let args = ["echo", "--url", &url, "--connections", "6", "--procs", "2", "--duration", "30"];
    let worker =
        WorkerCommand { exe: env!("CARGO_BIN_EXE_throng-bench").into(), args: args.iter().map(Into::into).collect() };
    let t0 = std::time::Instant::now();
    let r = bench_with(&args, &worker);
    assert!(t0.elapsed().as_secs() < 10, "the 30 s window was not skipped");
    assert_eq!(r.connect.errors.get("refused"), Some(&6), "{r:#?}");
}

#[test]
fn source_addresses_are_spread() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let r = bench(&[
        "connect",
        "--url",
        &url,
        "--target",
        "raw",
        "--connections",
        "30",
        "--hold",
        "0.3",
        "--grace",
        "0",
        "--source-ips",
        "127.0.0.2-127.0.0.4",
        "--threads",
        "2",
    ]);
    assert_eq!((r.connect.ready, r.connect.held), (30, 30), "{r:#?}");
}

#[test]
fn worker_processes_split_and_merge() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let args = [
        "broadcast",
        "--target",
        "raw",
        "--url",
        &url,
        "--connections",
        "30",
        "--publishers",
        "3",
        "--rate",
        "150",
        "--duration",
        "1",
        "--grace",
        "2",
        "--procs",
        "2",
    ];
    let worker =
        WorkerCommand { exe: env!("CARGO_BIN_EXE_throng-bench").into(), args: args.iter().map(Into::into).collect() };
    let r = bench_with(&args, &worker);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(r.connect.ready, 30, "{r:#?}");
    assert!(m.sent >= 75, "{r:#?}");
    assert_eq!(server.relayed(), m.sent);
    assert_eq!(m.delivered, m.sent * 30, "{r:#?}");
    assert_eq!((m.lost, m.reordered), (0, 0), "{r:#?}");
    assert!(r.client.cpu_s > 0.0);
    // Both workers' threads were sampled and their figures merged.
    assert_eq!(r.client.threads_sampled, 2, "{r:#?}");
    assert_eq!(m.send_lag_us.count, m.sent, "{r:#?}");
    assert_eq!(m.latency_us.count + m.late_latency_us.count, m.delivered, "{r:#?}");
}

#[test]
fn churn_opens_and_closes_while_steady_connections_receive() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let r = bench(&[
        "churn",
        "--target",
        "raw",
        "--url",
        &url,
        "--connections",
        "10",
        "--churn-rate",
        "50",
        "--rate",
        "50",
        "--duration",
        "1",
        "--grace",
        "2",
    ]);
    let ch = r.churn.as_ref().unwrap();
    let m = r.messages.as_ref().unwrap();
    assert!(ch.opened >= 45 && ch.completed + 2 >= ch.opened, "{r:#?}");
    assert_eq!(ch.failed, 0, "{r:#?}");
    assert!(ch.handshake_us.count >= 45);
    assert_eq!((m.delivered, m.lost), (m.sent * 10, 0), "{r:#?}");
}

#[test]
fn echo_of_messages_larger_than_a_read() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let args = ["echo", "--url", &url, "--connections", "3", "--size", "300000", "--duration", "0.5", "--grace", "2"];
    let r = bench(&args);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 3, "{r:#?}");
    assert_eq!((m.delivered, m.lost, m.unparsed), (m.sent, 0, 0), "{r:#?}");
    assert_eq!(r.connect.dropped, 0, "{r:#?}");
}

#[test]
fn many_subscribers_lose_nothing() {
    // More sockets become ready at once than one epoll wait returns: none may be forgotten.
    let server = TestServer::start(Options::default());
    let url = server.url();
    let r = bench(&[
        "broadcast",
        "--target",
        "raw",
        "--url",
        &url,
        "--connections",
        "600",
        "--rate",
        "100",
        "--duration",
        "1",
        "--grace",
        "2",
    ]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(r.connect.ready, 600, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent * 600, 0), "{r:#?}");
}

// ---- window accounting ----

/// The raw broadcast of `raw_broadcast` with one publisher, 10 subscribers, 100 msg/s.
fn raw_broadcast_10(server: &TestServer, duration: &str, grace: &str, extra: &[&str]) -> Report {
    let url = server.url();
    let mut args = vec!["broadcast", "--target", "raw", "--url", &url, "--connections", "10", "--publishers", "1"];
    args.extend_from_slice(&["--rate", "100", "--duration", duration, "--grace", grace]);
    args.extend_from_slice(extra);
    bench(&args)
}

#[test]
fn latency_counts_from_the_scheduled_send_time() {
    // (a) The bench's own loop is stuck for 200 ms at 0.4 s, 0.8 s and 1.2 s of the window: the messages
    // scheduled meanwhile go out late. Stamped with their scheduled time, their wait shows as latency (with
    // the actual send time it would vanish: coordinated omission), and the lag is reported.
    let server = TestServer::start(Options::default());
    let r = raw_broadcast_10(&server, "1.5", "1", &["--test-busy", "400:200"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.delivered, m.lost), (m.sent * 10, 0), "{r:#?}");
    // 60 of 150 messages were due during a stall, waiting 0-200 ms: a third of them over 100 ms.
    assert!(m.send_lag_us.max >= 190_000.0, "{:?}", m.send_lag_us);
    assert!(m.send_lag_us.p90 >= 100_000.0, "{:?}", m.send_lag_us);
    assert!(m.latency_us.max >= 190_000.0, "{:?}", m.latency_us);
    assert!(m.latency_us.p90 >= 100_000.0, "{:?}", m.latency_us);
    assert!(r.warnings.iter().any(|w| w.contains("behind schedule")), "{:?}", r.warnings);

    // The server stalls delivery of message 20 (due at 0.2 s) for 300 ms while the bench is slow as well:
    // p99 and max show the stall, from the scheduled times.
    let server = TestServer::start(Options { faults: vec![Fault::Stall(20, 300)], ..Options::default() });
    let r = raw_broadcast_10(&server, "1.5", "1", &["--test-busy", "400:200"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.delivered, m.lost), (m.sent * 10, 0), "{r:#?}");
    assert!(m.latency_us.max >= 300_000.0, "{:?}", m.latency_us);
    assert!(m.latency_us.p99 >= 250_000.0, "{:?}", m.latency_us);
    assert!(m.latency_us.p90 >= 100_000.0, "{:?}", m.latency_us);
}

#[test]
fn dropped_messages_skipped_sends_and_refused_subscribers_are_lost() {
    // (b) A server that never reads: sends pile up past the 4 MiB backlog and are skipped. Skipped sends
    // are lost messages: in expected and in lost.
    let server = TestServer::start(Options { no_read: true, ..Options::default() });
    let url = server.url();
    let args = ["echo", "--url", &url, "--connections", "1", "--rate", "100", "--size", "500000", "--duration", "1.5"];
    let r = bench(&[&args[..], &["--grace", "0.5"]].concat());
    let m = r.messages.as_ref().unwrap();
    assert!(m.skipped > 0 && m.backpressured == m.skipped, "{r:#?}");
    assert_eq!(m.expected, m.sent + m.skipped, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (0, m.expected), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("sends skipped")), "{:?}", r.warnings);

    // A v1 server that refuses 2 of 10 subscribers: they fail, and every message they should have had is
    // lost (expected counts every subscriber requested, not only those that became ready).
    let server = TestServer::start(Options { reject_subscribe_every: 5, ..Options::default() });
    let url = server.url();
    let r =
        bench(&["broadcast", "--url", &url, "--connections", "10", "--rate", "100", "--duration", "1", "--grace", "1"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((r.connect.failed, r.connect.errors.get("subscribe_rejected")), (2, Some(&2)), "{r:#?}");
    assert_eq!((m.receivers, m.receivers_ready), (10, 8), "{r:#?}");
    assert_eq!(m.expected, m.sent * 10, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent * 8, m.sent * 2), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("never ready")), "{:?}", r.warnings);

    // A dropped message is lost for every subscriber (and a gap for each).
    let server = TestServer::start(Options { faults: vec![Fault::Drop(30)], ..Options::default() });
    let r = raw_broadcast_10(&server, "1", "1", &[]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.delivered, m.lost, m.gaps), (m.sent * 10 - 10, 10, 10), "{r:#?}");
}

#[test]
fn messages_after_the_window_are_late_not_in_the_rate() {
    // (c) The server holds message 50 (due at 0.5 s of a 1 s window) for 800 ms, and everything behind it:
    // half the messages arrive in the grace period. They are late, not deliveries of the window, and the
    // rate counts only the window's.
    let server = TestServer::start(Options { faults: vec![Fault::Stall(50, 800)], ..Options::default() });
    let r = raw_broadcast_10(&server, "1", "2", &[]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(m.sent, 100, "{r:#?}");
    assert_eq!((m.received + m.late, m.lost, m.expected), (1000, 0, 1000), "{r:#?}");
    assert!((450..=550).contains(&m.late), "{r:#?}");
    assert_eq!(m.late_latency_us.count, m.late);
    assert_eq!(m.latency_us.count, m.received);
    // The held message waited 800 ms; the window's own deliveries did not.
    assert!(m.late_latency_us.max >= 790_000.0, "{:?}", m.late_latency_us);
    assert!(m.latency_us.max < 400_000.0, "{:?}", m.latency_us);
    assert_eq!(m.received_per_s, m.received as f64 / r.duration_s, "{r:#?}");
    assert!(m.received_per_s <= 0.6 * m.expected_per_s, "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("late")), "{:?}", r.warnings);
}

#[test]
fn duplicates_never_hide_losses() {
    // (d) Broadcast: message 10 comes twice, message 20 never: 10 duplicates and 10 losses, not "all
    // received".
    let server = TestServer::start(Options { faults: vec![Fault::Dup(10), Fault::Drop(20)], ..Options::default() });
    let r = raw_broadcast_10(&server, "1", "1", &[]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.delivered, m.duplicates, m.lost, m.gaps, m.reordered), (m.sent * 10 - 10, 10, 10, 10, 0), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("duplicate")), "{:?}", r.warnings);

    // Echo at a fixed rate: on each of 5 connections echo 10 is dropped, echo 20 doubled, echoes 30 and 31
    // swapped.
    let echo = Options { echo_faults: vec![Fault::Drop(10), Fault::Dup(20), Fault::Swap(30)], ..Options::default() };
    let server = TestServer::start(echo);
    let url = server.url();
    let r = bench(&["echo", "--url", &url, "--connections", "5", "--rate", "250", "--duration", "1", "--grace", "1"]);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 200, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent - 5, 5), "{r:#?}");
    assert_eq!((m.duplicates, m.reordered, m.gaps, m.unparsed), (5, 5, 5, 0), "{r:#?}");

    // Closed loop, two in flight each (swap first: after the drop only one is left in flight): the dropped
    // echo leaves a gap, the copy releases no extra send.
    let server = TestServer::start(Options {
        echo_faults: vec![Fault::Swap(10), Fault::Dup(20), Fault::Drop(30)],
        ..Options::default()
    });
    let url = server.url();
    let r = bench(&["echo", "--url", &url, "--connections", "4", "--inflight", "2", "--duration", "1", "--grace", "1"]);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 200, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent - 4, 4), "{r:#?}");
    assert_eq!((m.duplicates, m.reordered, m.gaps), (4, 4, 4), "{r:#?}");
}

#[test]
fn a_thread_saturated_in_bursts_is_flagged() {
    // (e) The bench loop is stuck 80 ms in every 200 ms: about 40% busy on average, far below the 90%
    // average that used to flag a run, but saturated in every burst.
    let server = TestServer::start(Options::default());
    let r = raw_broadcast_10(&server, "1.5", "0.5", &["--test-busy", "200:80"]);
    let c = &r.client;
    assert_eq!(c.threads_sampled, 1, "{r:#?}");
    assert!(c.saturated_share >= 0.15, "{c:#?}");
    assert!(c.utilization < 0.9, "{c:#?}");
    assert!(c.limited, "{c:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("client was the limit")), "{:?}", r.warnings);

    // The same load without the stalls is not flagged.
    let r = raw_broadcast_10(&server, "1", "0.5", &[]);
    assert!(!r.client.limited && r.client.saturated_share < 0.1, "{:#?}", r.client);
}

/// A helper process for `--proxy-pid`, killed on drop.
struct Helper(std::process::Child);

impl Helper {
    fn start(script: &str) -> Helper {
        Helper(std::process::Command::new("sh").args(["-c", script]).spawn().expect("spawning sh"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("helper's status");
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
        kb.trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmRSS in kB") * 1024
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn proxy_processes_are_sampled_beside_the_server() {
    // Two helper processes stand for a proxy's master and worker: one forks a `sleep` every 10 ms (so it
    // uses some CPU), one sleeps. Their figures are summed, on the server's sample points.
    let busy = Helper::start("while :; do sleep 0.01; done");
    let idle = Helper::start("exec sleep 600");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let idle_rss = idle.rss_bytes();
    let server = TestServer::start(Options::default());
    let url = server.url();
    let me = std::process::id().to_string();
    let pids = format!("{},{}", busy.pid(), idle.pid());
    let r = bench(&[
        "echo",
        "--url",
        &url,
        "--connections",
        "5",
        "--rate",
        "500",
        "--duration",
        "1",
        "--grace",
        "0.5",
        "--server-pid",
        &me,
        "--proxy-pid",
        &pids,
    ]);
    let m = r.messages.as_ref().unwrap();
    let p = r.proxy.as_ref().expect("a proxy object");
    let s = r.server.as_ref().expect("a server object");
    assert_eq!(p.pids, vec![busy.pid(), idle.pid()], "{p:#?}");
    let cpu = p.cpu_s.expect("proxy CPU");
    // Some CPU (forks), well under a core: the helper sleeps most of the time.
    assert!(cpu > 0.0 && p.cpu_cores.unwrap() < 0.5, "{p:#?}");
    // Per message with the server's denominator: the messages received in the window.
    let us = p.cpu_us_per_msg.expect("proxy us/msg");
    assert!(m.received > 0 && s.cpu_us_per_msg.is_some(), "{r:#?}");
    // (cpu_s is rounded to the ms.)
    assert!((us * m.received as f64 / 1e6 - cpu).abs() <= 0.000_6, "{p:#?} {m:#?}");
    // Summed: more than the idle helper alone.
    let (before, held) = (p.rss_before_bytes.unwrap(), p.rss_held_bytes.unwrap());
    assert!(before > idle_rss && held > idle_rss, "{p:#?}, idle helper alone {idle_rss}");
    assert!(r.connect.proxy_cpu_s.is_some() && r.connect.proxy_cpu_us_per_conn.is_some(), "{:#?}", r.connect);
    assert!(!r.warnings.iter().any(|w| w.contains("--proxy-pid")), "{:?}", r.warnings);

    // The binary, --json, connect with the flag repeated: the proxy object, and its RSS per connection.
    let busy_pid = busy.pid().to_string();
    let idle_pid = idle.pid().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_throng-bench"))
        .args(["connect", "--url", &url, "--connections", "20", "--hold", "0.5", "--grace", "0", "--json"])
        .args(["--proxy-pid", &busy_pid, "--proxy-pid", &idle_pid])
        .output()
        .expect("running throng-bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let p = &v["proxy"];
    assert_eq!(p["pids"], serde_json::json!([busy.pid(), idle.pid()]), "{v:#}");
    assert!(p["cpu_s"].as_f64().is_some_and(|c| c >= 0.0), "{v:#}");
    assert!(p["cpu_us_per_msg"].is_null(), "connect has no messages: {v:#}");
    // The helpers hold no connections: their RSS barely moves, far less than a MiB per connection.
    assert!(p["rss_per_conn_bytes"].as_f64().is_some_and(|b| b.abs() < 1e6), "{v:#}");
    assert!(v["connect"]["proxy_cpu_us_per_conn"].as_f64().is_some_and(|c| c >= 0.0), "{v:#}");

    // A PID with no process is refused before anything connects.
    drop(idle);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_throng-bench"))
        .args(["connect", "--url", &url, "--connections", "2", "--hold", "0.2", "--proxy-pid", &idle_pid])
        .output()
        .expect("running throng-bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such process"), "{out:?}");
}

#[test]
fn several_nodes_each_get_their_share_and_are_sampled_apart() {
    // Two servers stand for two nodes that do not relay to each other, so a subscriber sees only the
    // publishes of its own node: the publishers are all on the first, and so are the deliveries.
    let (one, two) = (TestServer::start(Options::default()), TestServer::start(Options::default()));
    let urls = format!("{},{}", one.url(), two.url());
    // Node 1 is this process, with a thread named like Throng's relay that keeps a little busy (1 ms of
    // every 5); node 2 and Redis are helper processes (no such thread).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::Builder::new()
            .name("throng-relay".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t0 = std::time::Instant::now();
                    while t0.elapsed() < std::time::Duration::from_millis(1) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(4));
                }
            })
            .unwrap()
    };
    let node2 = Helper::start("while :; do sleep 0.01; done");
    let redis = Helper::start("while :; do sleep 0.01; done");
    let pids = format!("{},{}", std::process::id(), node2.pid());
    let redis_pid = redis.pid().to_string();
    // 10 subscribers + 2 publishers (connections 0 and 6) over 2 processes x 2 threads: connection i on URL
    // i mod 2, the publishers on the first.
    let args = [
        "broadcast",
        "--url",
        &urls,
        "--connections",
        "10",
        "--publishers",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
        "--grace",
        "1",
        "--procs",
        "2",
        "--threads",
        "2",
        "--server-pid",
        &pids,
        "--redis-pid",
        &redis_pid,
    ];
    let worker =
        WorkerCommand { exe: env!("CARGO_BIN_EXE_throng-bench").into(), args: args.iter().map(Into::into).collect() };
    let r = bench_with(&args, &worker);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    relay.join().unwrap();
    let urls: Vec<_> = r.urls.iter().map(|u| (u.url.clone(), u.connections, u.ready)).collect();
    assert_eq!(urls, vec![(one.url(), 6, 6), (two.url(), 6, 6)], "{r:#?}");
    assert_eq!((one.heads().len(), two.heads().len()), (6, 6));
    // The first node's 4 subscribers get everything; the second's 6 nothing.
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 50, "{r:#?}");
    assert_eq!((m.delivered, m.lost), (m.sent * 4, m.sent * 6), "{r:#?}");

    let s = r.server.as_ref().expect("server figures");
    assert_eq!((s.pid, s.pids.clone()), (Some(std::process::id()), vec![std::process::id(), node2.pid()]));
    let (n1, n2) = (&s.nodes[0], &s.nodes[1]);
    assert_eq!((n1.pid, n2.pid), (std::process::id(), node2.pid()));
    // The server figures are the nodes' sums (each rounded to the ms).
    let (sum, parts) = (s.cpu_s.unwrap(), n1.cpu_s.unwrap() + n2.cpu_s.unwrap());
    assert!((sum - parts).abs() <= 0.0011, "sum {sum} vs {parts}: {s:#?}");
    let rss = n1.rss_held_bytes.unwrap() + n2.rss_held_bytes.unwrap();
    assert_eq!((s.rss_held_bytes, s.rss_before_bytes.is_some()), (Some(rss), true), "{s:#?}");
    // The relay thread: found on node 1 only, busy about a fifth of the 2 s of window and grace.
    assert_eq!((n1.relay_threads, n2.relay_threads, n2.relay_cpu_s), (1, 0, None), "{s:#?}");
    let relay_s = n1.relay_cpu_s.expect("relay CPU on node 1");
    assert!(relay_s > 0.05 && relay_s < 2.0, "{s:#?}");
    let per_publish = n1.relay_cpu_us_per_publish.expect("per publish");
    assert!((per_publish * m.sent as f64 / 1e6 - relay_s).abs() <= 0.001, "{s:#?}");
    assert_eq!(s.relay_cpu_s, Some(relay_s));
    let redis_r = r.redis.as_ref().expect("redis figures");
    assert_eq!(redis_r.pids, vec![redis.pid()]);
    assert!(redis_r.cpu_s.is_some() && redis_r.cpu_us_per_publish.is_some(), "{redis_r:#?}");
    assert!(redis_r.rss_before_bytes.is_some_and(|b| b > 0), "{redis_r:#?}");
    let human = r.human();
    assert!(
        human.contains("nodes     2 URLs") && human.contains("relay CPU") && human.contains("redis     pid"),
        "{human}"
    );
}
