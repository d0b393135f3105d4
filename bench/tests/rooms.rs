//! `rooms` against a real `throng` (the debug build next to this test's executable, `target/debug/throng`,
//! or `THRONG_BIN`), two shards: 200 connections, each its own user on its personal channel and in a group
//! of 10, one publisher at a modest rate: nothing lost, every delivery counted once, the expected
//! deliveries the members of each message's channel, and the server's CPU per delivery and RSS per
//! connection reported. With `--churn-rate`, members move between groups while messages flow: every leave
//! and join confirmed and timed, and the deliveries still exact (against Throng, and against the test server
//! in rooms mode, whose dropped and duplicated publishes are found).

use clap::Parser;
use throng_bench::{run, Args, Plan, Report, WorkerCommand};

const SECRET: &str = "a bench test secret of at least thirty-two bytes";

mod common;
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

/// `rooms --churn-rate`: the moves' figures, and the message figures still exact.
fn moved(r: &Report, rate: f64, secs: f64, per_message: (f64, f64)) -> &throng_bench::report::MovesReport {
    let mv = r.moves.as_ref().expect("moves figures");
    let m = r.messages.as_ref().expect("message figures");
    assert_eq!((mv.rate, mv.skipped, mv.refused, mv.strays), (rate, 0, 0, 0), "{mv:#?}");
    let due = rate * secs;
    assert!(mv.leaves as f64 >= due * 0.8 && mv.leaves as f64 <= due + 2.0, "{} leaves of {due}", mv.leaves);
    assert_eq!((mv.leaves_started, mv.joins), (mv.leaves, mv.leaves), "every move finished: {mv:#?}");
    assert_eq!((mv.leave_latency_us.count, mv.join_latency_us.count), (mv.leaves, mv.joins));
    assert!(mv.leave_latency_us.p50 > 0.0 && mv.join_latency_us.max < 2e6, "{mv:#?}");
    assert_eq!(mv.open_at_end, m.receivers, "every member ends in a group");
    // Members stay spread over the groups: on average 10 per group.
    let per = m.expected as f64 / m.sent as f64;
    assert!(per > per_message.0 && per < per_message.1, "{per} expected deliveries per message");
    mv
}

#[test]
fn members_moving_between_groups_lose_nothing() {
    let srv = Throng::start(&[]);
    let (url, pid) = (srv.url(), srv.pid().to_string());
    let r = bench(&["--url", &url, "--rate", "100", "--churn-rate", "40", "--server-pid", &pid]);
    eprintln!("{}", r.human());
    lossless(&r, 1);
    moved(&r, 40.0, 1.0, (7.0, 13.0));
    // With personal publishes too (their deliveries are accounted by the publishers, the groups' by the
    // memberships) and several publishers.
    let r = bench(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--publishers",
        "2",
        "--personal-prefix",
        "inbox:",
        "--churn-rate",
        "60",
        "--server-pid",
        &pid,
    ]);
    lossless(&r, 2);
    // Half the publishes to one member, half to a group of 10 on average.
    moved(&r, 60.0, 1.0, (4.0, 7.0));
    assert!(r.human().contains("moves     60/s asked"), "{}", r.human());
}

#[test]
fn moves_find_dropped_and_duplicated_group_messages() {
    use common::{Fault, Options, TestServer};
    // Publish 30 reaches none of its group's members, publish 60 reaches them twice.
    let srv =
        TestServer::start(Options { rooms: true, faults: vec![Fault::Drop(30), Fault::Dup(60)], ..Options::default() });
    let r = bench(&["--url", &srv.url(), "--rate", "100", "--churn-rate", "40"]);
    eprintln!("{}", r.human());
    let m = r.messages.as_ref().unwrap();
    assert!(m.lost >= 1 && m.lost <= 30, "the dropped message's members: {m:#?}");
    assert!(m.duplicates >= 1 && m.duplicates <= 30, "the duplicated message's members: {m:#?}");
    assert_eq!(m.delivered + m.lost, m.expected, "{m:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("not received")), "{:?}", r.warnings);
    moved(&r, 40.0, 1.0, (7.0, 13.0));
    // The same server without faults: nothing lost.
    let srv = TestServer::start(Options { rooms: true, ..Options::default() });
    let r = bench(&["--url", &srv.url(), "--rate", "100", "--churn-rate", "40"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.lost, m.duplicates, m.gaps, m.delivered), (0, 0, 0, m.expected), "{m:#?}");
    moved(&r, 40.0, 1.0, (7.0, 13.0));
}

/// `--reconnect-rate`: members drop their connection and come back, resubscribing; the deliveries stay exact
/// (a dropped connection's membership ends at the last message it read, the new one starts at its
/// `subscribed` offset), and the ramp's counts are not disturbed.
#[test]
fn reconnecting_members_lose_nothing() {
    let srv = Throng::start(&[]);
    let (url, pid) = (srv.url(), srv.pid().to_string());
    let r =
        bench(&["--url", &url, "--rate", "100", "--reconnect-rate", "30", "--churn-rate", "20", "--server-pid", &pid]);
    eprintln!("{}", r.human());
    lossless(&r, 1);
    let mv = r.moves.as_ref().unwrap();
    assert_eq!((mv.reconnect_rate, mv.reconnects_failed), (30.0, 0), "{mv:#?}");
    assert!(mv.reconnects >= 24 && mv.reconnects <= 32, "{mv:#?}");
    assert_eq!((mv.reconnects_started, mv.reconnect_latency_us.count), (mv.reconnects, mv.reconnects), "{mv:#?}");
    assert!(mv.leaves >= 16 && mv.joins == mv.leaves && mv.strays == 0, "{mv:#?}");
    assert!(r.human().contains("reconnect 30/s asked"), "{}", r.human());
    // The test server's rooms mode too (its `unsubscribed` carries the offset).
    let srv = common::TestServer::start(common::Options { rooms: true, ..common::Options::default() });
    let r = bench(&["--url", &srv.url(), "--rate", "100", "--reconnect-rate", "30"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.lost, m.duplicates, m.gaps, m.delivered), (0, 0, 0, m.expected), "{m:#?}");
    let mv = r.moves.as_ref().unwrap();
    assert!(mv.reconnects >= 24 && mv.reconnects == mv.reconnects_started && mv.leaves == 0, "{mv:#?}");
    // Many moves and reconnects at once: a member that moved reconnects to its new group, and moves on from
    // there (its `unsubscribe` names the group it is in: nothing refused, no strays).
    let r = bench(&["--url", &srv.url(), "--rate", "100", "--reconnect-rate", "100", "--churn-rate", "100"]);
    let m = r.messages.as_ref().unwrap();
    assert_eq!((m.lost, m.duplicates, m.gaps, m.delivered, m.v1_errors), (0, 0, 0, m.expected, 0), "{m:#?}");
    let mv = r.moves.as_ref().unwrap();
    assert_eq!((mv.refused, mv.strays, mv.reconnects_failed), (0, 0, 0), "{mv:#?}");
    assert!(mv.reconnects >= 80 && mv.leaves >= 80 && mv.joins == mv.leaves, "{mv:#?}");
}

#[test]
fn churn_rate_means_moves_in_rooms() {
    let plan = |args: &[&str]| {
        let mut v = vec!["throng-bench", "rooms", "--url", "ws://127.0.0.1:1", "--connections", "30"];
        v.extend_from_slice(args);
        Plan::from_args(&Args::parse_from(v))
    };
    assert_eq!(plan(&[]).unwrap().rooms.unwrap().moves_per_s, 0.0, "no moves unless asked");
    assert_eq!(plan(&[]).unwrap().churn_rate, 0.0, "no churn connections in rooms");
    let p = plan(&["--churn-rate", "12"]).unwrap();
    assert!(p.rooms.as_ref().unwrap().moving() && p.churn_rate == 0.0);
    assert!(plan(&["--churn-rate=-1"]).unwrap_err().to_string().contains("--churn-rate"));
    assert!(plan(&["--churn-rate", "5", "--group-size", "30"]).unwrap_err().to_string().contains("2 groups"));
    let p = plan(&["--reconnect-rate", "5", "--group-size", "30"]).unwrap();
    assert!(p.rooms.as_ref().unwrap().moving(), "reconnects alone need no second group");
    let e = plan(&["--reconnect-rate", "5", "--personal-prefix", "inbox:"]).unwrap_err().to_string();
    assert!(e.contains("--personal-share 0"), "{e}");
    assert!(plan(&["--reconnect-rate", "5", "--personal-prefix", "inbox:", "--personal-share", "0"]).is_ok());
    // The churn scenario keeps its default.
    let v = ["throng-bench", "churn", "--url", "ws://127.0.0.1:1"];
    assert_eq!(Plan::from_args(&Args::parse_from(v)).unwrap().churn_rate, 100.0);
}
