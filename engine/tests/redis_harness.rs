//! The Redis test harness itself (`support/redis.rs`), against real `redis-server` binaries: a standalone
//! server answers commands (simple, error, integer, bulk, null and nested array replies through the RESP2
//! client), carries shard pub/sub between two connections, comes back on the same port after a SIGKILL,
//! and, frozen with SIGSTOP, makes a command time out until SIGCONT; MONITOR sees commands; a 3-master
//! Redis Cluster starts with every slot served, keys land on different masters (a wrong one answers MOVED),
//! the harness's slot function agrees with CLUSTER KEYSLOT, and a killed node rejoins after a restart.
//!
//! It also pins what the relay's design relies on: a Lua script (EVAL) may call SPUBLISH, on a standalone
//! Redis 7 and in a cluster when the shard channel is in the slot of the script's key (`{c}:x` and `{c}`);
//! in a cluster, a channel served by another node fails the call inside the script, and what the script
//! wrote before that call stays written (scripts are not rolled back).
//!
//! `redis-server` and `redis-cli` come from the Debian packages `redis-server` and `redis-tools`, which
//! `tools/test` installs; without them these tests fail (they do not skip).

// Only the Redis harness of support/ is used here, not its macros.
#[allow(unused_macros)]
mod support;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use support::redis::{crc16_xmodem, key_slot, Redis, RedisCluster, Resp};

/// The relay-style script: bump a sequence key, then publish on a shard channel, returning both results.
const INCR_THEN_SPUBLISH: &str =
    "local n = redis.call('INCR', KEYS[1]); return {n, redis.call('SPUBLISH', KEYS[2], ARGV[1])}";
/// The same with the channel passed as an argument (not declared as a key).
const INCR_THEN_SPUBLISH_ARGV: &str =
    "local n = redis.call('INCR', KEYS[1]); return {n, redis.call('SPUBLISH', ARGV[2], ARGV[1])}";

fn bulk(s: &str) -> Resp {
    Resp::Bulk(Some(s.as_bytes().to_vec()))
}

fn array(items: Vec<Resp>) -> Resp {
    Resp::Array(Some(items))
}

/// The `smessage` a shard subscriber receives.
fn smessage(channel: &str, payload: &str) -> Resp {
    array(vec![bulk("smessage"), bulk(channel), bulk(payload)])
}

#[test]
fn standalone_replies_of_every_kind() {
    let r = Redis::start();
    assert_eq!(r.url(), format!("redis://127.0.0.1:{}/", r.port()));
    assert!(r.pid() > 0);
    assert_eq!(r.cmd(&["PING"]), Resp::Simple("PONG".into()));
    assert!(r.cmd(&["SET", "k", "v"]).is_ok());
    assert_eq!(r.cmd(&["GET", "k"]).as_str(), Some("v"));
    assert!(r.cmd(&["GET", "missing"]).is_null());
    assert_eq!(r.cmd(&["INCR", "n"]).as_int(), Some(1));
    assert_eq!(r.cmd(&["INCRBY", "n", "-5"]).as_int(), Some(-4));
    let err = r.cmd(&["INCR", "k"]);
    assert!(err.as_error().is_some_and(|e| e.starts_with("ERR")), "{err:?}");
    // Binary-safe bulk strings: CRLF and a zero byte inside a value.
    assert!(r.cmd(&["SET", "bin", "a\r\nb\0c"]).is_ok());
    assert_eq!(r.cmd(&["GET", "bin"]).as_bytes(), Some(&b"a\r\nb\0c"[..]));
    assert_eq!(r.cmd(&["MGET", "k", "missing"]), array(vec![bulk("v"), Resp::Bulk(None)]));
    assert_eq!(r.cmd(&["LRANGE", "nolist", "0", "-1"]), array(vec![]));
    // Nested arrays, through Lua's table conversion.
    let nested = r.cmd(&["EVAL", "return {1, {2, 'x', {}}, 'y'}", "0"]);
    assert_eq!(nested, array(vec![Resp::Int(1), array(vec![Resp::Int(2), bulk("x"), array(vec![])]), bulk("y")]));
    // A BLPOP that times out answers the null array.
    assert!(r.cmd(&["BLPOP", "nolist", "0.05"]).is_null());
    let version = r.cmd(&["INFO", "server"]);
    assert!(version.as_str().is_some_and(|s| s.contains("redis_version:")), "{version:?}");
}

#[test]
fn shard_pubsub_between_two_connections() {
    let r = Redis::start();
    let mut sub = r.connect();
    assert_eq!(sub.call(&["SSUBSCRIBE", "{c}"]), array(vec![bulk("ssubscribe"), bulk("{c}"), Resp::Int(1)]));
    let mut publ = r.connect();
    assert_eq!(publ.call(&["SPUBLISH", "{c}", "hello"]).as_int(), Some(1));
    assert_eq!(publ.call(&["SPUBLISH", "{other}", "nobody"]).as_int(), Some(0));
    assert_eq!(sub.read().expect("smessage"), smessage("{c}", "hello"));
    assert_eq!(sub.read_within(Duration::from_millis(100)).expect("read"), None, "only one message was for {{c}}");
    assert_eq!(publ.call(&["SPUBLISH", "{c}", "again"]).as_int(), Some(1));
    assert_eq!(sub.read_within(Duration::from_secs(5)).expect("read"), Some(smessage("{c}", "again")));
}

#[test]
fn kill_and_restart_on_the_same_port() {
    let mut r = Redis::start();
    let (port, pid) = (r.port(), r.pid());
    assert!(r.cmd(&["SET", "k", "v"]).is_ok());
    let mut held = r.connect();
    r.kill();
    assert!(!r.is_running());
    let refused = r.try_cmd(&["PING"]).expect_err("a killed server answered");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(held.try_call(&["PING"]).is_err(), "a connection to the killed server still answers");
    r.restart();
    assert!(r.is_running());
    assert_eq!(r.port(), port);
    assert_ne!(r.pid(), pid);
    assert_eq!(r.cmd(&["PING"]).as_str(), Some("PONG"));
    assert!(r.cmd(&["GET", "k"]).is_null(), "no persistence: the data went with the process");
    // A second round, and a restart of a running server.
    r.restart();
    assert_eq!(r.cmd(&["DBSIZE"]).as_int(), Some(0));
}

#[test]
fn pause_makes_commands_time_out_until_resume() {
    let r = Redis::start();
    let mut before = r.connect();
    assert_eq!(before.call(&["PING"]).as_str(), Some("PONG"));
    r.pause();
    let t0 = Instant::now();
    let e = r.try_cmd_within(Duration::from_millis(300), &["PING"]).expect_err("a paused server answered");
    assert!(matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(300), "gave up after {:?}", t0.elapsed());
    // A command sent while paused is answered once resumed.
    before.send(&["INCR", "while-paused"]).expect("send");
    assert_eq!(before.read_within(Duration::from_millis(200)).expect("read"), None);
    r.resume();
    assert_eq!(before.read_within(Duration::from_secs(5)).expect("read"), Some(Resp::Int(1)));
    assert_eq!(r.cmd(&["PING"]).as_str(), Some("PONG"));
}

#[test]
fn monitor_sees_commands() {
    let r = Redis::start();
    let m = r.monitor();
    r.cmd(&["SET", "watched", "1"]);
    r.cmd(&["SPUBLISH", "{c}", "seen"]);
    let line = m.wait_for(Duration::from_secs(5), |l| l.contains(r#""SPUBLISH" "{c}" "seen""#));
    assert!(line.is_some(), "MONITOR lines: {:?}", m.lines());
    assert!(m.lines().iter().any(|l| l.contains(r#""SET" "watched" "1""#)), "{:?}", m.lines());
    assert_eq!(m.commands("spublish").len(), 1, "{:?}", m.lines());
}

/// Lua may call SPUBLISH on a standalone Redis: the INCR and the publish both happen, the subscriber gets
/// the message, and the script returns `{seq, receivers}`.
#[test]
fn lua_spublish_standalone() {
    let r = Redis::start();
    let mut sub = r.connect();
    sub.call(&["SSUBSCRIBE", "{c}"]);
    let reply = r.cmd(&["EVAL", INCR_THEN_SPUBLISH, "2", "{c}:x", "{c}", "hello"]);
    assert_eq!(reply, array(vec![Resp::Int(1), Resp::Int(1)]));
    assert_eq!(sub.read().expect("smessage"), smessage("{c}", "hello"));
    // The channel as an argument, not a declared key, works too (standalone has no slots to check).
    let reply = r.cmd(&["EVAL", INCR_THEN_SPUBLISH_ARGV, "1", "{c}:x", "again", "{c}"]);
    assert_eq!(reply, array(vec![Resp::Int(2), Resp::Int(1)]));
    assert_eq!(sub.read().expect("smessage"), smessage("{c}", "again"));
}

#[test]
fn crc16_and_hash_tags() {
    // The CRC-16/XMODEM check value, and the slot examples of the Redis Cluster specification.
    assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
    assert_eq!(key_slot(b"123456789"), 12739); // 0x31c3, below 16384
    assert_eq!(key_slot(b"foo"), 12182); // CLUSTER KEYSLOT foo
    assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384, "an empty tag: the whole key");
    assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
}

#[test]
fn cluster_of_three_masters() {
    let c = RedisCluster::start(3);
    assert_eq!(c.urls().len(), 3);
    for (url, node) in c.urls().iter().zip(c.nodes()) {
        assert_eq!(url, &node.url());
        let info = node.cmd(&["CLUSTER", "INFO"]);
        assert!(info.as_str().is_some_and(|s| s.contains("cluster_state:ok")), "{info:?}");
    }
    // slot_of agrees with CLUSTER KEYSLOT, hash tags included.
    let keys = [
        "",
        "a",
        "k0",
        "user:1",
        "{c}",
        "{c}:x",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{",
        "}",
        "{}",
        "a{b",
        "a}b{c}",
        "émoji-ключ",
    ];
    for key in keys {
        let want = c.nodes()[0].cmd(&["CLUSTER", "KEYSLOT", key]).as_int();
        assert_eq!(Some(i64::from(c.slot_of(key))), want, "slot of {key:?}");
    }
    assert_eq!(c.slot_of("{c}:x"), c.slot_of("{c}"));
    // Keys land on every master; the owner stores one, another node answers MOVED to the owner.
    let mut owners = [0usize; 3];
    for i in 0..30 {
        let key = format!("key:{i}");
        let owner = c.node_for_slot(c.slot_of(&key));
        owners[owner] += 1;
        assert!(c.nodes()[owner].cmd(&["SET", &key, "v"]).is_ok());
        assert_eq!(c.node_for_key(&key).cmd(&["GET", &key]).as_str(), Some("v"));
        let other = &c.nodes()[(owner + 1) % 3];
        let moved = other.cmd(&["GET", &key]);
        let want = format!("MOVED {} 127.0.0.1:{}", c.slot_of(&key), c.nodes()[owner].port());
        assert_eq!(moved.as_error(), Some(want.as_str()), "{key}");
    }
    assert!(owners.iter().all(|&n| n > 0), "keys per master: {owners:?}");
    // Every slot is served, by one of ours.
    for slot in [0, 5460, 5461, 10922, 10923, 16383] {
        assert!(c.node_for_slot(slot) < 3);
    }
}

/// Lua may call SPUBLISH in a cluster when the script runs on the node serving the channel's slot: with the
/// key `{c}:x` and the shard channel `{c}` (same slot) the script returns `{seq, receivers}` and the
/// subscriber of that node gets the message. On another node the EVAL is refused with MOVED before it runs.
/// A channel served by another node fails the SPUBLISH inside the script, and the INCR before it stays.
#[test]
fn lua_spublish_in_cluster() {
    let c = RedisCluster::start(3);
    let owner_idx = c.node_for_slot(c.slot_of("{c}"));
    let owner = &c.nodes()[owner_idx];
    let mut sub = owner.connect();
    sub.call(&["SSUBSCRIBE", "{c}"]);

    let reply = owner.cmd(&["EVAL", INCR_THEN_SPUBLISH, "2", "{c}:x", "{c}", "hello"]);
    assert_eq!(reply, array(vec![Resp::Int(1), Resp::Int(1)]));
    assert_eq!(sub.read().expect("smessage"), smessage("{c}", "hello"));
    // The channel as an undeclared argument, same slot: also accepted.
    let reply = owner.cmd(&["EVAL", INCR_THEN_SPUBLISH_ARGV, "1", "{c}:x", "again", "{c}"]);
    assert_eq!(reply, array(vec![Resp::Int(2), Resp::Int(1)]));
    assert_eq!(sub.read().expect("smessage"), smessage("{c}", "again"));

    // On a node not serving the slot: MOVED, nothing run.
    let other = &c.nodes()[(owner_idx + 1) % 3];
    let moved = other.cmd(&["EVAL", INCR_THEN_SPUBLISH, "2", "{c}:x", "{c}", "lost"]);
    let want = format!("MOVED {} 127.0.0.1:{}", c.slot_of("{c}"), owner.port());
    assert_eq!(moved.as_error(), Some(want.as_str()));

    // Key and channel declared in different slots: CROSSSLOT, nothing run.
    let far = (0..).map(|i| format!("{{far{i}}}")).find(|ch| c.node_for_slot(c.slot_of(ch)) != owner_idx).unwrap();
    let cross = owner.cmd(&["EVAL", INCR_THEN_SPUBLISH, "2", "{c}:x", &far, "x"]);
    assert!(cross.as_error().is_some_and(|e| e.starts_with("CROSSSLOT")), "{cross:?}");

    // A channel served by another node, passed as an argument: the SPUBLISH fails inside the script...
    let err = owner.cmd(&["EVAL", INCR_THEN_SPUBLISH_ARGV, "1", "{c}:x", "x", &far]);
    assert!(
        err.as_error().is_some_and(|e| e.contains("Script attempted to access a non local key in a cluster node")),
        "{err:?}"
    );
    // ...after the INCR, which stays (no rollback).
    assert_eq!(owner.cmd(&["GET", "{c}:x"]).as_str(), Some("3"));

    // A channel of another slot that the same node serves: accepted (Redis 7.0 checks that the node serves
    // the channel's slot, not that the script stays in one slot).
    let near = (0..)
        .map(|i| format!("{{near{i}}}"))
        .find(|ch| c.slot_of(ch) != c.slot_of("{c}") && c.node_for_slot(c.slot_of(ch)) == owner_idx)
        .unwrap();
    let reply = owner.cmd(&["EVAL", INCR_THEN_SPUBLISH_ARGV, "1", "{c}:x", "x", &near]);
    assert_eq!(reply, array(vec![Resp::Int(4), Resp::Int(0)]));
    assert_eq!(sub.read_within(Duration::from_millis(100)).expect("read"), None);
}

#[test]
fn cluster_node_restarts_and_rejoins() {
    let mut c = RedisCluster::start(3);
    let key = "{c}:x";
    let idx = c.node_for_slot(c.slot_of(key));
    assert!(c.nodes()[idx].cmd(&["SET", key, "v"]).is_ok());
    let port = c.nodes()[idx].port();
    c.nodes_mut()[idx].kill();
    assert!(c.nodes()[idx].try_cmd(&["PING"]).is_err());
    c.nodes_mut()[idx].restart();
    assert_eq!(c.nodes()[idx].port(), port);
    c.wait_ok(Duration::from_secs(30));
    assert_eq!(c.node_for_slot(c.slot_of(key)), idx, "the restarted node serves its slots again");
    assert!(c.nodes()[idx].cmd(&["GET", key]).is_null(), "no persistence");
    assert!(c.nodes()[idx].cmd(&["SET", key, "w"]).is_ok());
}
