//! The api-publish scenario against a real `throng` (the debug build next to this test's executable,
//! `target/debug/throng`, or `THRONG_BIN`): subscribers on every channel lose nothing, a batch of 100 gives
//! 100 messages per request, and a wrong key is counted as 401s, warned about, and fails the binary's exit.

use std::process::Command;

use clap::Parser;
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

mod real_throng;

use real_throng::{Throng, KEY};

fn bench(args: &[&str]) -> Report {
    let mut v = vec!["throng-bench", "api-publish"];
    v.extend_from_slice(args);
    let plan = Plan::from_args(&Args::parse_from(v)).expect("valid arguments");
    run(&plan, &WorkerCommand::default()).expect("run completes")
}

#[test]
fn subscribers_get_every_published_message() {
    let srv = Throng::start(&[]);
    let url = srv.url();
    let pid = srv.pid().to_string();
    let r = bench(&[
        "--url",
        &url,
        "--api-key",
        KEY,
        "--connections",
        "3",
        "--pipeline",
        "2",
        "--channels",
        "8",
        "--subscribers",
        "3",
        "--duration",
        "1",
        "--grace",
        "2",
        "--server-pid",
        &pid,
    ]);
    let a = r.api.as_ref().expect("api figures");
    let m = r.messages.as_ref().expect("subscriber figures");
    assert_eq!((r.connect.ready, r.connect.failed), (6, 0), "{r:#?}");
    assert!(a.ok >= 50, "{r:#?}");
    assert_eq!((a.failed, a.message_errors), (0, 0), "{r:#?}");
    // Batch 1: one message per request, every one published; every request sent was answered.
    assert_eq!((a.published, a.published_late), (a.ok, a.ok_late), "{r:#?}");
    assert_eq!(a.requests_sent, a.ok + a.ok_late, "{r:#?}");
    assert_eq!(a.messages_sent, a.requests_sent);
    assert_eq!(a.latency_us.count, a.ok);
    // Every subscriber got every message once.
    assert_eq!(m.expected, (a.published + a.published_late) * 3, "{r:#?}");
    assert_eq!((m.delivered, m.lost, m.duplicates, m.gaps, m.unparsed), (m.expected, 0, 0, 0, 0), "{r:#?}");
    assert!(a.server_cpu_us_per_request.is_some_and(|c| c > 0.0), "{r:#?}");
    assert!(!r.warnings.iter().any(|w| w.contains("failed") || w.contains("not received")), "{:?}", r.warnings);
}

#[test]
fn a_batch_of_100_publishes_100_messages_per_request() {
    let srv = Throng::start(&[]);
    let url = srv.url();
    let r = bench(&[
        "--url",
        &url,
        "--api-key",
        KEY,
        "--connections",
        "2",
        "--batch",
        "100",
        "--size",
        "64",
        "--subscribers",
        "1",
        "--duration",
        "1",
        "--grace",
        "2",
    ]);
    let a = r.api.as_ref().expect("api figures");
    assert!(a.ok >= 5, "{r:#?}");
    assert_eq!((a.failed, a.message_errors), (0, 0), "{r:#?}");
    assert_eq!((a.published, a.published_late), (a.ok * 100, a.ok_late * 100), "{r:#?}");
    assert_eq!(a.messages_sent, a.requests_sent * 100);
    let m = r.messages.as_ref().expect("subscriber figures");
    assert_eq!((m.delivered, m.lost, m.duplicates), (m.expected, 0, 0), "{r:#?}");
}

#[test]
fn a_wrong_key_is_counted_as_401s_and_fails_the_run() {
    let srv = Throng::start(&[]);
    let url = srv.url();
    let wrong = "not-the-key-0123456789";
    let r = bench(&["--url", &url, "--api-key", wrong, "--connections", "4", "--duration", "0.5", "--grace", "1"]);
    let a = r.api.as_ref().expect("api figures");
    // Each connection's request is refused on its head and the connection closed after the 401.
    assert_eq!(a.errors.get("401"), Some(&4), "{r:#?}");
    assert_eq!((a.ok, a.ok_late, a.published, a.failed), (0, 0, 0, 4), "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("no API request succeeded")), "{:?}", r.warnings);
    assert!(r.warnings.iter().any(|w| w.contains("401") && w.contains("--api-key")), "{:?}", r.warnings);
    // The binary exits non-zero, saying why, and never shows the key.
    let out = Command::new(env!("CARGO_BIN_EXE_throng-bench"))
        .args(["api-publish", "--url", &url, "--connections", "2", "--duration", "0.3", "--grace", "0.5"])
        .env("THRONG_BENCH_API_KEY", wrong)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run throng-bench");
    assert!(!out.status.success());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("no API request succeeded") && stderr.contains("401 2"), "{stderr}");
    assert!(!stdout.contains(wrong) && !stderr.contains(wrong), "{stdout}{stderr}");
}
