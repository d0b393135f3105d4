//! `rooms` against a real `throng` (the debug build next to this test's executable, `target/debug/throng`,
//! or `THRONG_BIN`), two shards: 200 connections, each its own user on its personal channel and in a group
//! of 10, one publisher at a modest rate: nothing lost, every delivery counted once, the expected
//! deliveries the members of each message's channel, and the server's CPU per delivery and RSS per
//! connection reported.

use clap::Parser;
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

const SECRET: &str = "a bench test secret of at least thirty-two bytes";

mod real_throng;

use real_throng::Throng;

fn bench(args: &[&str]) -> Report {
    let mut v = vec!["throng-bench", "rooms", "--connections", "200", "--group-size", "10", "--duration", "1"];
    v.extend_from_slice(&["--grace", "2", "--size", "120"]);
    v.extend_from_slice(args);
    let plan = Plan::from_args(&Args::parse_from(v)).expect("valid arguments");
    run(&plan, &WorkerCommand::default()).expect("run completes")
}

/// Everything delivered exactly once, every connection ready with both subscriptions.
fn lossless(r: &Report, publishers: u64) {
    let m = r.messages.as_ref().expect("message figures");
    let c = &r.connect;
    assert_eq!((c.ready, c.established, c.failed, c.dropped), (200 + publishers, 200 + publishers, 0, 0), "{r:#?}");
    assert_eq!((m.receivers, m.receivers_ready), (200, 200), "{r:#?}");
    assert!(m.sent >= 50, "{r:#?}");
    assert_eq!((m.delivered, m.lost, m.duplicates, m.gaps, m.reordered), (m.expected, 0, 0, 0, 0), "{r:#?}");
    assert_eq!((m.unparsed, m.v1_errors, m.skipped, m.stale), (0, 0, 0, 0), "{r:#?}");
    assert_eq!(m.latency_us.count, m.received);
    assert!(m.received > 0 && m.latency_us.p50 > 0.0 && m.latency_us.max < 2e6, "{:?}", m.latency_us);
    let s = r.server.as_ref().expect("server figures");
    assert!(s.cpu_us_per_msg.is_some_and(|c| c > 0.0), "{s:?}");
    assert!(s.rss_per_conn_bytes.is_some(), "{s:?}");
    assert!(!r.warnings.iter().any(|w| w.contains("failed") || w.contains("not received")), "{:?}", r.warnings);
}

#[test]
fn groups_of_ten_on_personal_channels_lose_nothing() {
    let srv = Throng::start(&[]);
    let (url, pid) = (srv.url(), srv.pid().to_string());
    // Open mode, `user:` channels (`?user=bench-<i>`): clients publish to the groups only.
    let r = bench(&["--url", &url, "--rate", "100", "--server-pid", &pid]);
    assert_eq!((r.scenario, r.connections, r.publishers), ("rooms", 200, 1));
    lossless(&r, 1);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(m.expected, m.sent * 10, "{r:#?}");

    // A namespace clients may publish to: half the publishes to one member's personal channel.
    let r = bench(&["--url", &url, "--rate", "200", "--personal-prefix", "inbox:", "--server-pid", &pid]);
    lossless(&r, 1);
    let m = r.messages.as_ref().unwrap();
    // personal × 1 + group × 10, with both kinds present.
    let personal = (m.sent * 10 - m.expected) / 9;
    assert_eq!((m.sent * 10 - m.expected) % 9, 0, "{r:#?}");
    assert!(personal > m.sent / 5 && personal < m.sent * 4 / 5, "{personal} of {}", m.sent);
}

#[test]
fn tokens_name_each_user_and_its_personal_channel() {
    let srv = Throng::start(&["--jwt-secret", SECRET]);
    let (url, pid) = (srv.url(), srv.pid().to_string());
    // `user:bench-<i>` is only for the token whose `sub` is `bench-<i>`: a wrong one is refused.
    let r = bench(&["--url", &url, "--rate", "100", "--publishers", "2", "--jwt-secret", SECRET, "--server-pid", &pid]);
    lossless(&r, 2);
    let m = r.messages.as_ref().unwrap();
    assert_eq!(m.expected, m.sent * 10, "{r:#?}");
    assert!(r.auth.is_some());
}

#[test]
fn rooms_options_are_checked() {
    let err = |args: &[&str]| {
        let mut v = vec!["throng-bench", "rooms", "--url", "ws://127.0.0.1:1"];
        v.extend_from_slice(args);
        Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
    };
    assert!(err(&["--personal-share", "0.5"]).contains("user:"));
    assert!(err(&["--target", "raw"]).contains("throng"));
    assert!(err(&["--group-size", "0"]).contains("--group-size"));
    assert!(err(&["--personal-prefix", "a:b:"]).contains("--personal-prefix"));
    let v = ["throng-bench", "rooms", "--url", "ws://127.0.0.1:1", "--connections", "25", "--publishers", "2"];
    let p = Plan::from_args(&Args::parse_from(v)).unwrap();
    let r = p.rooms.as_ref().unwrap();
    assert_eq!((p.total, r.groups, r.personal_share, p.senders()), (27, 3, 0.0, 4));
    assert_eq!((p.group_members(0), p.group_members(2)), (10, 5));
    assert_eq!((p.publisher_id(24), p.publisher_id(25), p.publisher_id(26)), (None, Some(0), Some(1)));
}
