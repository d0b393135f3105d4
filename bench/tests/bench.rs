//! The bench against a small in-test server: it counts exactly what it was sent, detects a lost and a
//! reordered message, counts echoes exactly, reports connection counts and refusals, splits work over
//! worker processes, and drives churn.

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
    assert_eq!(m.received, m.expected, "{r:#?}");
    assert_eq!((m.lost, m.reordered, m.gaps, m.unparsed), (0, 0, 0, 0), "{r:#?}");
    assert_eq!(m.latency_us.count, m.received);
    assert!(m.latency_us.p50 > 0.0 && m.latency_us.max < 1e6, "{:?}", m.latency_us);
}

#[test]
fn broadcast_detects_a_lost_message() {
    let server = TestServer::start(Options { fault: Fault::Drop(10), ..Options::default() });
    let r = raw_broadcast(&server, &["--publishers", "2"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(server.relayed(), m.sent);
    assert_eq!(m.received, m.sent * 20 - 20, "{r:#?}");
    assert_eq!((m.lost, m.gaps, m.reordered), (20, 20, 0), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("not received")));
}

#[test]
fn broadcast_detects_a_reordered_message() {
    let server = TestServer::start(Options { fault: Fault::Swap(10), ..Options::default() });
    let r = raw_broadcast(&server, &["--publishers", "1"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(m.received, m.sent * 20, "{r:#?}");
    assert_eq!((m.lost, m.reordered), (0, 20), "{r:#?}");
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
    assert_eq!(m.received, m.sent * 10, "{r:#?}");
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
    assert_eq!((m.received, m.lost), (m.sent, 0), "{r:#?}");
    let fixed = ["echo", "--url", &url, "--connections", "5", "--rate", "300", "--duration", "1", "--grace", "2"];
    let r = bench(&fixed);
    let m = r.messages.as_ref().unwrap();
    // A descheduled bench sends fewer, never more.
    assert!((150..=301).contains(&m.sent), "{r:#?}");
    assert_eq!((m.received, m.lost), (m.sent, 0), "{r:#?}");
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
    assert_eq!(m.received, m.sent * 30, "{r:#?}");
    assert_eq!((m.lost, m.reordered), (0, 0), "{r:#?}");
    assert!(r.client.cpu_s > 0.0);
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
    assert_eq!((m.received, m.lost), (m.sent * 10, 0), "{r:#?}");
}

#[test]
fn echo_of_messages_larger_than_a_read() {
    let server = TestServer::start(Options::default());
    let url = server.url();
    let args = ["echo", "--url", &url, "--connections", "3", "--size", "300000", "--duration", "0.5", "--grace", "2"];
    let r = bench(&args);
    let m = r.messages.as_ref().unwrap();
    assert!(m.sent >= 3, "{r:#?}");
    assert_eq!((m.received, m.lost, m.unparsed), (m.sent, 0, 0), "{r:#?}");
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
    assert_eq!((m.received, m.lost), (m.sent * 600, 0), "{r:#?}");
}
