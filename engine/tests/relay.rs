//! The Redis relay (`--redis`): several `throng` processes against a real `redis-server` (and a real
//! 3-master Redis Cluster) started by the harness on free ports, behaving as one engine. Nodes alternate
//! between the io_uring and epoll drivers, two shards each.
//!
//! - every subscriber on every node gets every message from publishers on every node, in one offset order;
//! - a node with no subscriber of a channel is not subscribed to it in Redis (`PUBSUB NUMSUB`) and receives
//!   nothing for it (its relay counters);
//! - recovery, history and presence from any node; a killed node's presence vanishes within its ttl;
//!   `/api/disconnect` of a user closes its connections on every node;
//! - Redis killed and restarted, and stopped with SIGSTOP, mid-run: `unavailable` answers instead of
//!   hangs, `/health` degraded, reconnection, and no message lost that history covers;
//! - the same delivery test on a Redis Cluster (sharded pub/sub, channels over several slots).

#[allow(unused_macros)]
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::{Redis, RedisCluster};
use support::v1::{poll_until, Ws};
use support::{Driver, Server};

const KEY: &str = "relay-test-api-key-0123";

/// A node on `redis` (one URL, or a Cluster's comma-separated seeds): two shards, the API on, presence
/// entries living 3 s past their last refresh, 600 ms to declare Redis lost.
fn node(driver: Driver, redis: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--shards",
        "2",
        "--redis",
        redis,
        "--api-key",
        KEY,
        "--redis-presence-ttl",
        "3",
        "--redis-timeout",
        "0.6",
    ];
    args.extend_from_slice(extra);
    let srv = Server::start(driver, &args);
    poll_until(Duration::from_secs(10), || match relay_stats(&srv)["up"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(format!("relay not connected: {}", srv.stats())),
    });
    srv
}

fn nodes(redis: &str, n: usize) -> Vec<Server> {
    (0..n).map(|i| node(if i % 2 == 0 { Driver::Uring } else { Driver::Epoll }, redis, &[])).collect()
}

fn relay_stats(srv: &Server) -> Value {
    srv.stats()["relay"].clone()
}

/// One HTTP request on its own connection: (status, JSON body).
fn http(srv: &Server, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: apikey {KEY}\r\n");
    match body {
        Some(b) => req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Reads `channel`'s messages until `n` arrived: (offset, data) in arrival order. Other channels' messages
/// are kept for later reads, in order; other traffic is skipped.
fn take(ws: &mut Ws, channel: &str, n: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    let mut others = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        assert!(Instant::now() < deadline, "{}: {} of {n} messages of {channel}: {got:?}", ws.client, got.len());
        let Some(v) = ws.recv_within(Duration::from_millis(200)) else { continue };
        if v["type"] == "message" && v["channel"] == channel {
            got.push((v["offset"].as_u64().expect("offset"), v["data"].clone()));
        } else if v["type"] == "message" {
            others.push(v);
        }
    }
    for v in others.into_iter().rev() {
        ws.stash.push_front(v);
    }
    got
}

/// Every subscriber on every node receives every message from publishers on every node (clients' v1
/// publishes and `/api/publish`), offsets 1..=N with no hole, and all of them in the same order. Returns
/// the subscribers, still connected.
fn deliver_everywhere(servers: &[Server], channels: &[&str]) -> Vec<Ws> {
    let mut subs: Vec<Ws> = Vec::new();
    for (i, srv) in servers.iter().enumerate() {
        for j in 0..2 {
            let mut ws = Ws::connect(srv, &format!("sub{i}{j}"));
            for ch in channels {
                ws.subscribe(ch, None);
            }
            subs.push(ws);
        }
    }
    let mut pubs: Vec<Ws> = servers.iter().enumerate().map(|(i, s)| Ws::connect(s, &format!("pub{i}"))).collect();
    const EACH: u64 = 40;
    for k in 0..EACH {
        for (i, p) in pubs.iter_mut().enumerate() {
            for ch in channels {
                p.send(json!({"type": "publish", "channel": ch, "data": {"node": i, "k": k}}));
            }
        }
        if k % 10 == 0 {
            for ch in channels {
                let body = json!({"channel": ch, "data": {"api": k}}).to_string();
                let (status, r) = http(&servers[k as usize % servers.len()], "POST", "/api/publish", Some(&body));
                assert_eq!(status, 200, "{r}");
            }
        }
    }
    let total = (EACH as usize) * servers.len() + (EACH as usize).div_ceil(10);
    for ch in channels {
        let mut reference: Option<Vec<(u64, Value)>> = None;
        for ws in subs.iter_mut() {
            let got = take(ws, ch, total);
            let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
            assert_eq!(
                offsets,
                (1..=total as u64).collect::<Vec<_>>(),
                "{}: {ch}: offsets in order, no hole",
                ws.client
            );
            // Each publisher's messages in the order it sent them.
            for i in 0..servers.len() {
                let ks: Vec<u64> =
                    got.iter().filter(|(_, d)| d["node"] == i).map(|(_, d)| d["k"].as_u64().unwrap()).collect();
                assert_eq!(ks, (0..EACH).collect::<Vec<_>>(), "{}: publisher {i}'s order", ws.client);
            }
            match &reference {
                None => reference = Some(got),
                Some(r) => assert_eq!(&got, r, "{}: the same order as every other subscriber", ws.client),
            }
            if let Some(v) = ws.recv_within(Duration::from_millis(50)) {
                assert_ne!(v["channel"], *ch, "{}: no duplicate", ws.client);
                ws.stash.push_front(v);
            }
        }
    }
    subs
}

#[test]
fn three_nodes_deliver_every_message_in_one_order() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 3);
    let _subs = deliver_everywhere(&servers, &["room:all"]);
    for s in &servers {
        let r = relay_stats(s);
        assert_eq!(r["cluster"], false, "{r}");
        assert_eq!(r["received_total"], 124, "each node received the channel's messages once: {r}");
    }
}

#[test]
fn a_node_without_subscribers_gets_no_traffic_for_the_channel() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 3);
    let numsub = |ch: &str| -> i64 {
        let r = redis.cmd(&["PUBSUB", "NUMSUB", &format!("throng:{{{ch}}}")]);
        r.as_array().expect("NUMSUB answer")[1].as_int().expect("count")
    };
    let mut a = Ws::connect(&servers[0], "a");
    let mut b = Ws::connect(&servers[1], "b");
    let mut b2 = Ws::connect(&servers[1], "b2");
    a.subscribe("quiet:x", None);
    b.subscribe("quiet:x", None);
    b2.subscribe("quiet:x", None);
    // Two nodes want it, each subscribed once whatever its number of subscribers; the third is not.
    assert_eq!(numsub("quiet:x"), 2);
    let mut p = Ws::connect(&servers[2], "p");
    for k in 0..20 {
        p.publish("quiet:x", json!(k));
    }
    assert_eq!(take(&mut a, "quiet:x", 20).len(), 20);
    assert_eq!(take(&mut b, "quiet:x", 20).len(), 20);
    assert_eq!(take(&mut b2, "quiet:x", 20).len(), 20);
    let r = relay_stats(&servers[2]);
    assert_eq!((r["received_total"].as_u64(), r["channels"].as_u64()), (Some(0), Some(0)), "{r}");
    assert_eq!(relay_stats(&servers[0])["received_total"], 20);
    assert_eq!(relay_stats(&servers[1])["received_total"], 20, "one message per node, not per subscriber");
    // The last subscriber of a node leaving unsubscribes the node.
    b.call(json!({"type": "unsubscribe", "channel": "quiet:x"}));
    assert_eq!(numsub("quiet:x"), 2, "b2 is still there");
    b2.call(json!({"type": "unsubscribe", "channel": "quiet:x"}));
    poll_until(Duration::from_secs(5), || match numsub("quiet:x") {
        1 => Ok(()),
        n => Err(format!("{n} subscribers")),
    });
    drop(a);
    poll_until(Duration::from_secs(5), || match numsub("quiet:x") {
        0 => Ok(()),
        n => Err(format!("{n} subscribers after the last connection closed")),
    });
}

#[test]
fn recovery_history_and_presence_from_any_node() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 3);
    let mut a = Ws::connect(&servers[0], "alice");
    let sub = a.subscribe("chat:r", None);
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    let mut b = Ws::connect(&servers[1], "bob");
    b.subscribe("chat:r", None);
    for k in 1..=5 {
        b.publish("chat:r", json!({"k": k}));
    }
    let seen = take(&mut a, "chat:r", 5);
    drop(a);
    // Missed while away: published on node 1, recovered on node 2.
    for k in 6..=9 {
        b.publish("chat:r", json!({"k": k}));
    }
    let mut again = Ws::connect(&servers[2], "alice");
    let since = json!({"offset": seen.last().unwrap().0, "epoch": epoch});
    let r = again.subscribe("chat:r", Some(since));
    assert_eq!(
        (r["recovered"].as_bool(), r["offset"].as_u64(), r["epoch"].as_str()),
        (Some(true), Some(9), Some(&*epoch)),
        "{r}"
    );
    let missed = take(&mut again, "chat:r", 4);
    assert_eq!(
        missed.iter().map(|(o, d)| (*o, d["k"].as_u64().unwrap())).collect::<Vec<_>>(),
        [(6, 6), (7, 7), (8, 8), (9, 9)]
    );
    b.publish("chat:r", json!({"k": 10}));
    assert_eq!(take(&mut again, "chat:r", 1)[0].0, 10, "live after the replay");
    // A position from another epoch cannot be recovered.
    let mut other = Ws::connect(&servers[0], "carol");
    let r = other.subscribe("chat:r", Some(json!({"offset": 3, "epoch": "0000000000000001"})));
    assert_eq!(r["recovered"], false, "{r}");
    // History, through the API of a node that has no subscriber of the channel.
    let quiet = node(Driver::Epoll, &redis.url(), &[]);
    let (status, h) = http(&quiet, "GET", "/api/history?channel=chat:r&limit=3", None);
    assert_eq!(status, 200, "{h}");
    let offsets: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!((offsets, h["offset"].as_u64(), h["epoch"].as_str()), (vec![8, 9, 10], Some(10), Some(&*epoch)), "{h}");
    let (_, h) = http(&quiet, "GET", &format!("/api/history?channel=chat:r&since=7&epoch={epoch}"), None);
    assert_eq!(h["recovered"], true, "{h}");
    assert_eq!(h["messages"].as_array().unwrap().len(), 3, "{h}");
    let h = again.call(json!({"type": "history", "channel": "chat:r", "limit": 2}));
    assert_eq!(h["messages"][1]["data"]["k"], 10, "{h}");
    // Presence over every node: alice (node 2), bob (node 1), carol (node 0).
    let presence = |srv: &Server| -> BTreeMap<String, u64> {
        let (status, p) = http(srv, "GET", "/api/presence?channel=chat:r", None);
        assert_eq!(status, 200, "{p}");
        p["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["user"].as_str().unwrap().to_string(), u["connections"].as_u64().unwrap()))
            .collect()
    };
    let want: BTreeMap<String, u64> = [("alice", 1), ("bob", 1), ("carol", 1)].map(|(u, n)| (u.to_string(), n)).into();
    poll_until(Duration::from_secs(5), || {
        let p = presence(&quiet);
        if p == want {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    });
    let p = other.call(json!({"type": "presence", "channel": "chat:r"}));
    assert_eq!(p["count"], 3, "{p}");
    // A node killed without a goodbye: its users vanish once its entries expire (3 s).
    let mut servers = servers;
    let dead = servers.remove(1);
    drop(dead);
    drop(b);
    let gone_at = Instant::now();
    poll_until(Duration::from_secs(8), || {
        let p = presence(&quiet);
        if p.contains_key("bob") {
            Err(format!("{p:?}"))
        } else {
            Ok(())
        }
    });
    assert!(
        gone_at.elapsed() <= Duration::from_secs(5),
        "vanished within the ttl and a query: {:?}",
        gone_at.elapsed()
    );
    assert_eq!(presence(&quiet).len(), 2);
}

#[test]
fn disconnect_reaches_every_node() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 3);
    let mut conns: Vec<Ws> = servers.iter().take(2).map(|s| Ws::connect(s, "mallory")).collect();
    let mut bystander = Ws::connect(&servers[0], "trent");
    let (status, r) =
        http(&servers[2], "POST", "/api/disconnect", Some(r#"{"user":"mallory","code":4403,"reason":"banned"}"#));
    assert_eq!(status, 200, "{r}");
    for c in conns.iter_mut() {
        let (_, close) = c.read_until_close();
        let close = close.expect("a close frame");
        assert_eq!((u16::from(close.code), close.reason.as_str()), (4403, "banned"));
    }
    assert_eq!(bystander.call(json!({"type": "ping"}))["type"], "pong");
    assert!(relay_stats(&servers[0])["control_total"].as_u64() >= Some(1));
    // One connection by its client id, through another node: the id names its node, and only that node
    // closes it (node 2's connections, whose shard-generation-slot may well be the same, stay open).
    let mut victim = Ws::connect(&servers[0], "victim");
    let node0 = relay_stats(&servers[0])["node"].as_str().unwrap().to_string();
    assert!(victim.client.ends_with(&format!("-{node0}")), "{} names node {node0}", victim.client);
    let mut others: Vec<Ws> = (0..4).map(|i| Ws::connect(&servers[2], &format!("other{i}"))).collect();
    let body = json!({"client": victim.client, "code": 4408, "reason": "bye"}).to_string();
    let (status, r) = http(&servers[2], "POST", "/api/disconnect", Some(&body));
    assert_eq!(status, 200, "{r}");
    let (_, close) = victim.read_until_close();
    assert_eq!(close.map(|c| u16::from(c.code)), Some(4408));
    for o in others.iter_mut() {
        assert_eq!(o.call(json!({"type": "ping"}))["type"], "pong", "{} stays", o.client);
    }
}

/// Publishes `n` messages from `ws`, each retried until published; returns how many answers were
/// `unavailable` on the way.
fn publish_through(ws: &mut Ws, channel: &str, from: u64, n: u64) -> u64 {
    let mut refused = 0;
    for k in from..from + n {
        loop {
            let r = ws.call(json!({"type": "publish", "channel": channel, "data": {"k": k}}));
            if r["type"] == "published" {
                break;
            }
            assert_eq!(r["code"], "unavailable", "{r}");
            refused += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    refused
}

fn health(srv: &Server) -> Value {
    let (_, h) = http(srv, "GET", "/health", None);
    h
}

#[test]
fn redis_stopped_then_continued_loses_nothing_history_covers() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 2);
    let mut sub = Ws::connect(&servers[0], "s");
    sub.subscribe("fault:stop", None);
    let mut publisher = Ws::connect(&servers[1], "p");
    let mut local = Ws::connect(&servers[0], "l");
    publish_through(&mut publisher, "fault:stop", 0, 10);
    redis.pause();
    let stopped = Instant::now();
    // A stalled Redis (no answer, connection open) is noticed by the liveness pings: 0.6 s timeout, a ping
    // every 0.2 s.
    poll_until(Duration::from_secs(5), || match health(&servers[0])["status"].as_str() {
        Some("degraded") => Ok(()),
        s => Err(format!("{s:?}")),
    });
    assert!(stopped.elapsed() < Duration::from_millis(1500), "detected in {:?}", stopped.elapsed());
    // Node 1 may not have noticed yet: its publish waits at most the 0.6 s timeout. Redis may still apply
    // it when it resumes (the command was in its socket), as the docs say.
    let asked = Instant::now();
    let r = publisher.call(json!({"type": "publish", "channel": "fault:stop", "data": {"k": "probe"}}));
    assert_eq!(r["code"], "unavailable", "answered, not hung: {r}");
    assert!(asked.elapsed() < Duration::from_millis(1000), "answered within the timeout: {:?}", asked.elapsed());
    poll_until(Duration::from_secs(5), || {
        let h = health(&servers[1]);
        match h["reason"].as_str() {
            Some(r) if r.contains("Redis unreachable") => Ok(()),
            _ => Err(format!("{h}")),
        }
    });
    // Connections and node-local work go on: a ping, an echo of the socket.
    assert_eq!(local.call(json!({"type": "ping"}))["type"], "pong");
    redis.resume();
    // Published while node 0 may still be reconnecting: node 0 fills them from the stream.
    publish_through(&mut publisher, "fault:stop", 10, 30);
    // Every message published before, and every one published after, arrives: offsets without a hole, each
    // publisher's messages in order. A publish answered `unavailable` and retried may appear twice.
    let mut got = Vec::new();
    while got.last().is_none_or(|(_, d): &(u64, Value)| d["k"] != 39) {
        got.extend(take(&mut sub, "fault:stop", 1));
    }
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=got.len() as u64).collect::<Vec<_>>(), "no hole");
    let mut ks: Vec<u64> = got.iter().filter_map(|(_, d)| d["k"].as_u64()).collect();
    ks.dedup();
    assert_eq!(ks, (0..40).collect::<Vec<_>>(), "all, in order");
    // Back: /health no longer names Redis (it may name a shard that ran late on a busy test machine).
    poll_until(Duration::from_secs(5), || {
        let h = health(&servers[0]);
        match h["reason"].as_str() {
            Some(r) if r.contains("Redis") => Err(format!("{h}")),
            _ => Ok(()),
        }
    });
    let r = relay_stats(&servers[0]);
    assert!(r["disconnects_total"].as_u64() >= Some(1) && r["connects_total"].as_u64() >= Some(2), "{r}");
    let metrics = servers[1].get("/metrics").text();
    assert!(metrics.contains("throng_relay_publish_failed_total"), "counted in /metrics");
}

#[test]
fn a_node_that_missed_messages_fills_them_from_history() {
    // Node 0's subscription is cut (CLIENT KILL of its connection) while node 1 keeps publishing: node 0
    // reconnects, subscribes again and reads the stream from where its delivery stopped.
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 2);
    let mut sub = Ws::connect(&servers[0], "s");
    sub.subscribe("fault:fill", None);
    let mut publisher = Ws::connect(&servers[1], "p");
    publish_through(&mut publisher, "fault:fill", 0, 5);
    assert_eq!(take(&mut sub, "fault:fill", 5).len(), 5);
    let before = relay_stats(&servers[0])["filled_total"].as_u64().unwrap();
    // Kill every connection subscribed to the channel's pub/sub (only node 0's), then publish at once.
    let clients = redis.cmd(&["CLIENT", "LIST"]);
    let text = clients.as_str().expect("CLIENT LIST text").to_string();
    let name = format!("name=throng-{}", relay_stats(&servers[0])["node"].as_str().unwrap());
    let mut killed = 0;
    for line in text.lines().filter(|l| l.split(' ').any(|f| f == name)) {
        let id = line.split(' ').find_map(|f| f.strip_prefix("id=")).expect("id=");
        assert_eq!(redis.cmd(&["CLIENT", "KILL", "ID", id]).as_int(), Some(1), "{line}");
        killed += 1;
    }
    assert_eq!(killed, 1, "node 0's connection: {text}");
    publish_through(&mut publisher, "fault:fill", 5, 20);
    let got = take(&mut sub, "fault:fill", 20);
    assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (6..=25).collect::<Vec<_>>());
    let r = relay_stats(&servers[0]);
    assert!(r["disconnects_total"].as_u64() >= Some(1), "{r}");
    assert!(
        r["filled_total"].as_u64().unwrap() > before,
        "published while node 0 reconnected, read from the stream: {r}"
    );
    assert_eq!(r["lost_total"], 0, "{r}");
}

#[test]
fn redis_killed_and_restarted() {
    let mut redis = Redis::start();
    let servers = nodes(&redis.url(), 2);
    let mut sub = Ws::connect(&servers[0], "s");
    let first = sub.subscribe("fault:kill", None);
    let mut publisher = Ws::connect(&servers[1], "p");
    publish_through(&mut publisher, "fault:kill", 0, 5);
    assert_eq!(take(&mut sub, "fault:kill", 5).len(), 5);
    redis.kill();
    // Lost at once (the connection closes): unavailable, not a hang; subscribing too.
    poll_until(Duration::from_secs(5), || {
        let r = publisher.call(json!({"type": "publish", "channel": "fault:kill", "data": 0}));
        if r["code"] == "unavailable" {
            Ok(())
        } else {
            Err(format!("{r}"))
        }
    });
    let mut late = Ws::connect(&servers[1], "late");
    let r = late.call(json!({"type": "subscribe", "channel": "fault:kill"}));
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("unavailable")), "{r}");
    assert_eq!(health(&servers[0])["status"], "degraded");
    redis.restart();
    // A restarted Redis without persistence lost the channel: a new epoch. Subscribers get a gap, then
    // every message of the new epoch (those published before node 0 was back come from history).
    let refused = publish_through(&mut publisher, "fault:kill", 100, 5);
    let mut gap = None;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 5 {
        assert!(Instant::now() < deadline, "{got:?}");
        let Some(v) = sub.recv_within(Duration::from_millis(200)) else { continue };
        match v["type"].as_str() {
            Some("gap") => gap = Some(v),
            Some("message") => got.push(v["data"]["k"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert!(gap.is_some(), "a gap before the new epoch's messages");
    assert_eq!(got, (100..105).collect::<Vec<_>>());
    let r = sub.subscribe("again:fault", None);
    assert_ne!(r["epoch"], first["epoch"]);
    let again = late.subscribe("fault:kill", Some(json!({"offset": 5, "epoch": first["epoch"]})));
    assert_eq!(again["recovered"], false, "{again}");
    let _ = refused;
}

#[test]
fn node_local_namespaces_work_without_redis() {
    let redis = Redis::start();
    let cfg = support::v1::config_file(
        &LOCAL_CFG,
        "relay-local",
        "[namespace.local]\nrelay = false\n[namespace.default]\n[namespace.user]\n",
    );
    let srv = node(Driver::Uring, &redis.url(), &["--config", cfg]);
    let mut redis = redis;
    redis.kill();
    poll_until(Duration::from_secs(5), || match relay_stats(&srv)["up"].as_bool() {
        Some(false) => Ok(()),
        _ => Err("still up".into()),
    });
    let mut a = Ws::connect(&srv, "a");
    a.subscribe("local:room", None);
    let mut b = Ws::connect(&srv, "b");
    assert_eq!(b.publish("local:room", json!(1)), 1);
    assert_eq!(take(&mut a, "local:room", 1)[0].0, 1);
    let r = b.call(json!({"type": "publish", "channel": "global", "data": 1}));
    assert_eq!(r["code"], "unavailable", "{r}");
}

static LOCAL_CFG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[test]
fn redis_cluster_delivers_every_message_in_one_order() {
    let cluster = RedisCluster::start(3);
    let seeds = cluster.urls().join(",");
    let servers = nodes(&seeds, 3);
    for s in &servers {
        assert_eq!(relay_stats(s)["cluster"], true);
    }
    // Channels on slots of every master.
    let names = ["c:1", "c:2", "c:3", "c:4", "c:5", "c:6"];
    let masters: std::collections::BTreeSet<usize> =
        names.iter().map(|n| cluster.node_for_slot(cluster.slot_of(&format!("throng:{{{n}}}")))).collect();
    assert_eq!(masters.len(), 3, "the channels spread over the three masters");
    let _subs = deliver_everywhere(&servers, &names);
    // Sharded pub/sub: each channel's subscription lives on the master of its slot.
    for n in names {
        let ch = format!("throng:{{{n}}}");
        let owner = cluster.node_for_slot(cluster.slot_of(&ch));
        let r = cluster.nodes()[owner].cmd(&["PUBSUB", "SHARDNUMSUB", &ch]);
        assert_eq!(r.as_array().unwrap()[1].as_int(), Some(3), "{n}: one subscription per node on its master");
    }
}

/// The HTTP fallback rides the relay too: a `GET /sse` stream on one node receives what a WebSocket client
/// publishes on another, and a `POST /publish` on a third reaches both.
#[test]
fn sse_streams_on_another_node() {
    let redis = Redis::start();
    let servers = nodes(&redis.url(), 3);
    let mut sse = TcpStream::connect(servers[1].addr).expect("connect");
    sse.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    sse.write_all(b"GET /sse?channel=sse:x&user=reader HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
        .expect("write");
    let mut seen = String::new();
    let mut read_until = |what: &dyn Fn(&str) -> bool, seen: &mut String| {
        let mut chunk = [0u8; 8192];
        while !what(seen) {
            let n = sse.read(&mut chunk).expect("reading the stream");
            assert!(n > 0, "EOF: {seen}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    };
    read_until(&|s| s.contains("\"type\":\"subscribed\""), &mut seen);
    let mut ws = Ws::connect(&servers[0], "writer");
    for k in 1..=3 {
        ws.publish("sse:x", json!({"k": k}));
    }
    let body = r#"{"channel":"sse:x","data":{"k":4}}"#;
    let (status, r) = http(&servers[2], "POST", "/api/publish", Some(body));
    assert_eq!(status, 200, "{r}");
    read_until(&|s| s.contains("\"offset\":4"), &mut seen);
    let offsets: Vec<u64> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4], "{seen}");
}
