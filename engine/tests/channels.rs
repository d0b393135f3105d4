//! Black-box tests of channels over wire protocol v1 (`/ws`): fan-out across shards, unsubscribe, recovery
//! with `since`, history eviction, presence, slow consumers and refused commands. Each test starts the real
//! `throng` binary with `--shards 4` and a namespace config on a fresh loopback port, speaks to it with
//! tungstenite over real sockets (every read has a timeout), and runs once per I/O driver
//! (`<name>_uring`, `<name>_epoll`).
//!
//! Channel names are picked by their home shard (`throng::channel::home_of`) and the shard a connection
//! landed on is read from its `welcome` (`client` is `"{shard:x}-{gen:x}-{idx:x}"`), so that every test
//! covers channels homed on the client's own shard and on another one.

#[macro_use]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::v1::{poll_until, Ws};
use support::{v1, Driver, Server};
use throng::channel::home_of;
use tungstenite::Message;

/// Shards every server in this file runs with.
const SHARDS: usize = 4;
/// Longest any single read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The namespaces of every server in this file. Since namespaces are configured, others do not exist.
const CONFIG: &str = r#"
[namespace.chat]
presence = true
history_size = 1000

[namespace.small]
history_size = 3

[namespace.slowc]
slow_consumer = "close"

[namespace.lossy]
slow_consumer = "drop_oldest"

[namespace.nopub]
client_publish = false

[namespace.quiet]
presence = false
"#;

on_both_drivers! {
    fanout_every_message_once => fanout_every_message_once_uring, fanout_every_message_once_epoll;
    unsubscribe_stops_delivery => unsubscribe_stops_delivery_uring, unsubscribe_stops_delivery_epoll;
    recovery_after_reconnect => recovery_after_reconnect_uring, recovery_after_reconnect_epoll;
    recovery_while_publishing => recovery_while_publishing_uring, recovery_while_publishing_epoll;
    pipelined_subscribe_publish => pipelined_subscribe_publish_uring, pipelined_subscribe_publish_epoll;
    unsubscribe_before_confirmation =>
        unsubscribe_before_confirmation_uring, unsubscribe_before_confirmation_epoll;
    not_recovered_after_eviction => not_recovered_after_eviction_uring, not_recovered_after_eviction_epoll;
    presence_agrees_across_shards => presence_agrees_across_shards_uring, presence_agrees_across_shards_epoll;
    slow_subscriber_closed_4008 => slow_subscriber_closed_4008_uring, slow_subscriber_closed_4008_epoll;
    slow_subscriber_drop_oldest_gap =>
        slow_subscriber_drop_oldest_gap_uring, slow_subscriber_drop_oldest_gap_epoll;
    burst_does_not_close_a_reading_subscriber =>
        burst_does_not_close_a_reading_subscriber_uring, burst_does_not_close_a_reading_subscriber_epoll;
    errors_keep_connection_open => errors_keep_connection_open_uring, errors_keep_connection_open_epoll;
    malformed_flood_closes_1008 => malformed_flood_closes_1008_uring, malformed_flood_closes_1008_epoll;
    malformed_overflow_closes_1008 => malformed_overflow_closes_1008_uring, malformed_overflow_closes_1008_epoll;
}

// ---------------------------------------------------------------------------------------------------------
// Support

/// The config file (written once per test process).
fn config_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    v1::config_file(&PATH, "channels", CONFIG)
}

/// Starts `throng --shards 4 --config <CONFIG> <extra>`, without per-connection rate limits: these tests
/// publish as fast as they can, and `hostile.rs` covers the limits.
fn start(driver: Driver, extra: &[&str]) -> Server {
    let shards = SHARDS.to_string();
    let mut args = vec!["--shards", &shards, "--config", config_path()];
    args.extend(["--max-messages-per-second", "0", "--max-bytes-per-second", "0"]);
    args.extend_from_slice(extra);
    Server::start(driver, &args)
}

/// The first name `<prefix>-<i>` homed on shard `home`.
fn with_home(prefix: &str, home: usize) -> String {
    v1::homed(prefix, home, SHARDS)
}

/// The first name `<prefix>-<i>` whose home shard is not `shard`.
fn not_homed_on(prefix: &str, shard: usize) -> String {
    (0..).map(|i| format!("{prefix}-{i}")).find(|n| home_of(n, SHARDS) != shard).expect("some name fits")
}

/// Checks `m` is a `message` of `channel` with `offset`; returns its data.
fn expect_message<'a>(m: &'a Value, channel: &str, offset: u64) -> &'a Value {
    assert_eq!(m["type"], "message", "expected message {offset} of {channel}, got {m}");
    assert_eq!(m["channel"], channel, "expected message {offset} of {channel}, got {m}");
    assert_eq!(m["offset"], offset, "expected message {offset} of {channel}, got {m}");
    &m["data"]
}

// ---------------------------------------------------------------------------------------------------------
// 1. Fan-out: every subscriber on every shard gets every message exactly once, in order

const FAN_SUBSCRIBERS: usize = 40;
const FAN_PUBLISHERS: usize = 3;
const FAN_PER_CHANNEL: u64 = 200;

fn fanout_every_message_once(driver: Driver) {
    let srv = start(driver, &[]);
    // Three channels homed on three different shards.
    let channels: Vec<String> = (0..3).map(|h| with_home("chat:fan", h)).collect();
    let mut subs: Vec<Ws> = Vec::new();
    let mut shards = [0usize; SHARDS];
    while subs.len() < FAN_SUBSCRIBERS || shards.contains(&0) {
        assert!(subs.len() < 200, "connections never spread over all shards: {shards:?}");
        let c = Ws::connect(&srv, &format!("s{}", subs.len()));
        shards[c.shard] += 1;
        subs.push(c);
    }
    for s in &mut subs {
        for ch in &channels {
            let r = s.subscribe(ch, None);
            assert_eq!((r["offset"].as_u64(), r["recovered"].as_bool()), (Some(0), Some(false)), "{r}");
        }
    }
    // Publishers on distinct shards.
    let mut pubs: Vec<Ws> = Vec::new();
    for i in 0..FAN_PUBLISHERS {
        let used: Vec<usize> = pubs.iter().map(|p| p.shard).collect();
        pubs.push(Ws::connect_where(&srv, &format!("p{i}"), |s| !used.contains(&s)));
    }
    let total = channels.len() * FAN_PUBLISHERS * FAN_PER_CHANNEL as usize;

    let (received, acks) = std::thread::scope(|scope| {
        let readers: Vec<_> = subs
            .into_iter()
            .map(|mut s| {
                let channels = &channels;
                scope.spawn(move || {
                    let mut got = Vec::with_capacity(total);
                    while got.len() < total {
                        let m = s.recv();
                        let ch = channels.iter().position(|c| m["channel"] == c.as_str());
                        let ch = ch.unwrap_or_else(|| panic!("{}: unexpected {m}", s.client));
                        let (off, p, seq) = (m["offset"].as_u64(), m["data"]["p"].as_u64(), m["data"]["seq"].as_u64());
                        assert_eq!(m["type"], "message", "{m}");
                        match (off, p, seq) {
                            (Some(off), Some(p), Some(seq)) => got.push((ch, off, p, seq)),
                            _ => panic!("{}: malformed message {m}", s.client),
                        }
                    }
                    let extra = s.barrier();
                    assert!(extra.is_empty(), "{}: more than {total} messages: {extra:?}", s.client);
                    (s.client.clone(), s.shard, got)
                })
            })
            .collect();
        let writers: Vec<_> = pubs
            .into_iter()
            .enumerate()
            .map(|(p, mut c)| {
                let channels = &channels;
                scope.spawn(move || {
                    // (channel, seq) -> offset acknowledged, sent in pipelined batches of 30.
                    let mut acked = HashMap::new();
                    let mut pending = HashMap::new();
                    for seq in 0..FAN_PER_CHANNEL {
                        for (ch, name) in channels.iter().enumerate() {
                            let data = json!({"p": p, "seq": seq});
                            let id = c.send(json!({"type": "publish", "channel": name, "data": data}));
                            pending.insert(id, (ch, seq));
                        }
                        if pending.len() >= 30 || seq + 1 == FAN_PER_CHANNEL {
                            while !pending.is_empty() {
                                let r = c.recv();
                                assert_eq!(r["type"], "published", "{}: {r}", c.client);
                                let id = r["id"].as_u64().expect("id");
                                let key = pending.remove(&id).unwrap_or_else(|| panic!("unexpected ack {r}"));
                                acked.insert(key, r["offset"].as_u64().expect("offset"));
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        let acks: Vec<HashMap<(usize, u64), u64>> =
            writers.into_iter().map(|w| w.join().expect("publisher thread")).collect();
        let received: Vec<_> = readers.into_iter().map(|r| r.join().expect("subscriber thread")).collect();
        (received, acks)
    });

    // The acks: per channel the offsets 1..=600 each exactly once, increasing with each publisher's seq.
    let mut by_offset: BTreeMap<(usize, u64), (u64, u64)> = BTreeMap::new();
    for (p, acked) in acks.iter().enumerate() {
        for (ch, name) in channels.iter().enumerate() {
            let offsets: Vec<u64> = (0..FAN_PER_CHANNEL).map(|seq| acked[&(ch, seq)]).collect();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "publisher {p} on {name}: offsets {offsets:?}");
            for (seq, off) in offsets.into_iter().enumerate() {
                let prev = by_offset.insert((ch, off), (p as u64, seq as u64));
                assert!(prev.is_none(), "offset {off} of {name} acknowledged twice");
            }
        }
    }
    let per_channel = FAN_PUBLISHERS as u64 * FAN_PER_CHANNEL;
    for (ch, name) in channels.iter().enumerate() {
        let offs: Vec<u64> = by_offset.range((ch, 0)..(ch + 1, 0)).map(|(k, _)| k.1).collect();
        assert_eq!(offs, (1..=per_channel).collect::<Vec<_>>(), "acked offsets of {name}");
    }
    // Every subscriber: per channel offsets 1, 2, 3, ... and each message is the one acked at its offset.
    for (client, shard, got) in &received {
        let mut next = vec![1u64; channels.len()];
        let mut next_seq: HashMap<(usize, u64), u64> = HashMap::new();
        for &(ch, off, p, seq) in got {
            let want = next_seq.entry((ch, p)).or_insert(0);
            assert_eq!(seq, *want, "{client} on {}: publisher {p}'s messages out of order", channels[ch]);
            *want += 1;
            assert_eq!(
                off,
                next[ch],
                "{client} (shard {shard}) on {}: offset {off} after {}",
                channels[ch],
                next[ch] - 1
            );
            next[ch] += 1;
            assert_eq!(by_offset[&(ch, off)], (p, seq), "{client} on {}: message at offset {off}", channels[ch]);
        }
        assert!(next.iter().all(|&n| n == per_channel + 1), "{client}: {next:?}");
    }
    // The io_uring driver sends the flush passes' writes in batches (one io_uring_enter for many sockets);
    // epoll writes each with its own sendmsg.
    let (batches, batched) =
        (srv.metric("throng_uring_send_batches_total"), srv.metric("throng_uring_batched_writes_total"));
    match driver {
        Driver::Uring => assert!(batches > 0 && batched >= batches, "{batches} batches, {batched} writes"),
        Driver::Epoll => assert_eq!((batches, batched), (0, 0)),
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. Unsubscribe stops delivery

/// For a channel homed on each shard: a subscriber gets a message, unsubscribes, and then gets a later
/// message of a sentinel channel but nothing more of the channel it left. Another connection on the same
/// shard stays subscribed, so both "last local subscriber left" and "one of several left" are covered.
fn unsubscribe_stops_delivery(driver: Driver) {
    let srv = start(driver, &[]);
    let mut sub = Ws::connect(&srv, "leaver");
    let mut stay = Ws::connect_where(&srv, "stayer", |s| s == sub.shard);
    let mut publ = Ws::connect(&srv, "publisher");
    let sentinel = not_homed_on("chat:sentinel", sub.shard);
    sub.subscribe(&sentinel, None);
    for (h, shared) in (0..SHARDS).flat_map(|h| [(h, false), (h, true)]) {
        let a = with_home(&format!("chat:unsub{}", u8::from(shared)), h);
        sub.subscribe(&a, None);
        if shared {
            stay.subscribe(&a, None);
        }
        let off = publ.publish(&a, json!({"n": 1}));
        assert_eq!(expect_message(&sub.recv(), &a, off)["n"], 1);
        let r = sub.call(json!({"type": "unsubscribe", "channel": a}));
        assert_eq!((r["type"].as_str(), r["channel"].as_str()), (Some("unsubscribed"), Some(a.as_str())), "{r}");
        let after = publ.publish(&a, json!({"n": 2}));
        let s_off = publ.publish(&sentinel, json!({"after": a}));
        let m = sub.recv();
        assert_eq!(
            expect_message(&m, &sentinel, s_off)["after"],
            a.as_str(),
            "after leaving {a} (home {h}, shard {}) the next message must be the sentinel",
            sub.shard
        );
        let rest = sub.barrier();
        assert!(rest.is_empty(), "delivered after unsubscribing from {a} (home {h}): {rest:?}");
        if shared {
            assert_eq!(expect_message(&stay.recv(), &a, off)["n"], 1);
            assert_eq!(expect_message(&stay.recv(), &a, after)["n"], 2, "the other subscriber lost {a}");
            let r = stay.call(json!({"type": "unsubscribe", "channel": a}));
            assert_eq!(r["type"], "unsubscribed", "{r}");
        }
        // Unsubscribing again is refused.
        let r = sub.call(json!({"type": "unsubscribe", "channel": a}));
        assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("not_subscribed")), "{r}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 3. Recovery after a reconnect

fn recovery_after_reconnect(driver: Driver) {
    let srv = start(driver, &[]);
    let mut publ = Ws::connect(&srv, "publisher");
    for (case, local) in [(0, true), (1, false)] {
        // The channel's home is shard `case + 1`; the client that recovers is on it (`local`) or not.
        let home = case + 1;
        let ch = with_home(&format!("chat:recover{case}"), home);
        let mut first = Ws::connect(&srv, "reader");
        let r = first.subscribe(&ch, None);
        let epoch = r["epoch"].as_str().expect("epoch").to_string();
        for n in 1..=5u64 {
            assert_eq!(publ.publish(&ch, json!({"n": n})), n);
        }
        for n in 1..=5u64 {
            assert_eq!(expect_message(&first.recv(), &ch, n)["n"], n);
        }
        drop(first);
        for n in 6..=12u64 {
            assert_eq!(publ.publish(&ch, json!({"n": n})), n);
        }
        let mut again = Ws::connect_where(&srv, "reader", |s| (s == home) == local);
        assert_eq!(home_of(&ch, SHARDS) == again.shard, local, "{ch} home vs client {}", again.client);
        let r = again.subscribe(&ch, Some(json!({"offset": 5, "epoch": epoch})));
        assert_eq!(r["recovered"], true, "local home {local}: {r}");
        assert_eq!((r["offset"].as_u64(), r["epoch"].as_str()), (Some(12), Some(epoch.as_str())), "{r}");
        for n in 6..=12u64 {
            assert_eq!(expect_message(&again.recv(), &ch, n)["n"], n, "replay, local home {local}");
        }
        assert_eq!(publ.publish(&ch, json!({"n": 13})), 13);
        assert_eq!(expect_message(&again.recv(), &ch, 13)["n"], 13, "live after replay, local home {local}");
        let rest = again.barrier();
        assert!(rest.is_empty(), "duplicates after recovery (local home {local}): {rest:?}");
        // Already up to date: recovered, nothing replayed.
        let mut third = Ws::connect(&srv, "reader");
        let r = third.subscribe(&ch, Some(json!({"offset": 13, "epoch": epoch})));
        assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64()), (Some(true), Some(13)), "{r}");
        assert!(third.barrier().is_empty());
    }
}

/// Recovery racing live publishing: while a publisher keeps publishing, clients subscribe with a `since` a
/// little behind the current offset, alternately on the channel's home shard and elsewhere, next to live
/// subscribers on every shard (so the shards' logs hold frames in flight). Each must then see every later
/// offset exactly once, in order: the replay and the live deliveries must meet without gap or overlap.
fn recovery_while_publishing(driver: Driver) {
    const TOTAL: u64 = 600;
    let srv = start(driver, &[]);
    let home = 0;
    let ch = with_home("chat:race", home);
    let mut live: BTreeMap<usize, Ws> = BTreeMap::new();
    for _ in 0..200 {
        if live.len() == SHARDS {
            break;
        }
        let c = Ws::connect(&srv, "live");
        live.entry(c.shard).or_insert(c);
    }
    assert_eq!(live.len(), SHARDS, "live subscribers on every shard");
    let mut epoch = String::new();
    for c in live.values_mut() {
        epoch = c.subscribe(&ch, None)["epoch"].as_str().expect("epoch").to_string();
    }
    let mut publ = Ws::connect(&srv, "publisher");
    let acked = AtomicU64::new(0);
    let recoverers = std::thread::scope(|s| {
        let publisher = s.spawn(|| {
            let mut n = 0;
            while n < TOTAL {
                let ids: Vec<u64> = (n + 1..=n + 5)
                    .map(|k| publ.send(json!({"type": "publish", "channel": ch, "data": {"n": k}})))
                    .collect();
                for id in ids {
                    let r = publ.recv();
                    assert_eq!((r["type"].as_str(), r["id"].as_u64()), (Some("published"), Some(id)), "{r}");
                    n += 1;
                    assert_eq!(r["offset"], n, "{r}");
                    acked.store(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut recoverers = Vec::new();
        for i in 0..8u64 {
            let deadline = Instant::now() + IO_TIMEOUT;
            while acked.load(Ordering::Relaxed) < (i + 1) * 50 {
                assert!(Instant::now() < deadline, "publishing stalled at {acked:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
            let on_home = i % 2 == 0;
            let mut c = Ws::connect_where(&srv, "recoverer", |s| (s == home) == on_home);
            let since = acked.load(Ordering::Relaxed) - 10;
            let r = c.subscribe(&ch, Some(json!({"offset": since, "epoch": epoch})));
            assert_eq!(r["recovered"], true, "{r}");
            recoverers.push((c, since));
        }
        publisher.join().expect("publisher");
        recoverers
    });
    for (mut c, since) in recoverers {
        for n in since + 1..=TOTAL {
            let m = c.recv();
            let data = expect_message(&m, &ch, n);
            assert_eq!(data["n"], n, "{} (shard {}, home {home}) recovering from {since}", c.client, c.shard);
        }
        let rest = c.barrier();
        assert!(rest.is_empty(), "{} (shard {}) recovering from {since}: extra {rest:?}", c.client, c.shard);
    }
    for c in live.values_mut() {
        for n in 1..=TOTAL {
            assert_eq!(expect_message(&c.recv(), &ch, n)["n"], n, "live subscriber on shard {}", c.shard);
        }
        assert!(c.barrier().is_empty());
    }
}

/// Subscribe and publish pipelined (no waiting for the reply) on a channel homed on another shard: both
/// are answered, and the connection's own message follows its `subscribed`.
fn pipelined_subscribe_publish(driver: Driver) {
    let srv = start(driver, &[]);
    let mut c = Ws::connect(&srv, "pipeliner");
    let ch = not_homed_on("chat:pipe", c.shard);
    c.send(json!({"type": "subscribe", "id": 1, "channel": ch}));
    c.send(json!({"type": "publish", "id": 2, "channel": ch, "data": {"n": 1}}));
    let seen: Vec<Value> = (0..3).map(|_| c.recv()).collect();
    let pos = |t: &str| seen.iter().position(|v| v["type"] == t).unwrap_or_else(|| panic!("no {t} in {seen:?}"));
    let (sub, publ) = (&seen[pos("subscribed")], &seen[pos("published")]);
    assert_eq!((sub["id"].as_u64(), sub["offset"].as_u64()), (Some(1), Some(0)), "{sub}");
    assert_eq!((publ["id"].as_u64(), publ["offset"].as_u64()), (Some(2), Some(1)), "{publ}");
    assert!(pos("subscribed") < pos("message"), "message before subscribed: {seen:?}");
    expect_message(&seen[pos("message")], &ch, 1);
    assert!(c.barrier().is_empty());
}

/// Subscribe and unsubscribe pipelined on a channel homed on another shard (the subscription is still
/// pending at the home when the unsubscribe is read): nothing is left behind (no deliveries, no presence),
/// and both commands are answered.
fn unsubscribe_before_confirmation(driver: Driver) {
    let srv = start(driver, &[]);
    let mut c = Ws::connect(&srv, "pipeliner");
    let ch = not_homed_on("chat:pipe", c.shard);
    let sentinel = not_homed_on("chat:sentinel", c.shard);
    c.subscribe(&sentinel, None);
    c.send(json!({"type": "subscribe", "id": 3, "channel": ch}));
    c.send(json!({"type": "unsubscribe", "id": 4, "channel": ch}));
    let mut replies = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while replies.len() < 2 && Instant::now() < deadline {
        if let Some(v) = c.recv_within(Duration::from_millis(100)) {
            let id = v["id"].as_u64().unwrap_or_else(|| panic!("unexpected {v}"));
            replies.insert(id, v);
        }
    }
    assert_eq!(replies.get(&4).map(|r| r["type"].clone()), Some(json!("unsubscribed")), "{replies:?}");
    poll_until(Duration::from_secs(2), || match presence(&mut c, &ch) {
        (0, users) if users.is_empty() => Ok(()),
        p => Err(format!("presence of {ch} after subscribe+unsubscribe: {p:?}")),
    });
    let mut other = Ws::connect(&srv, "other");
    other.publish(&ch, json!({"n": 1}));
    let off = other.publish(&sentinel, json!({"n": 2}));
    expect_message(&c.recv(), &sentinel, off);
    assert!(c.barrier().is_empty(), "delivered from {ch} after unsubscribing");
    assert!(replies.contains_key(&3), "the subscribe (id 3) was never answered: {replies:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 4. recovered:false once history no longer covers the position

fn not_recovered_after_eviction(driver: Driver) {
    let srv = start(driver, &[]);
    let mut c = Ws::connect(&srv, "reader");
    for local in [true, false] {
        let ch = if local { with_home("small:evict", c.shard) } else { not_homed_on("small:evict", c.shard) };
        for n in 1..=10u64 {
            assert_eq!(c.publish(&ch, json!({"n": n})), n);
        }
        let h = c.call(json!({"type": "history", "channel": ch}));
        assert_eq!((h["type"].as_str(), h["offset"].as_u64()), (Some("history"), Some(10)), "{h}");
        assert!(h.get("recovered").is_none(), "history without since has no recovered: {h}");
        let epoch = h["epoch"].as_str().expect("epoch").to_string();
        let msgs: Vec<(u64, u64)> = h["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| (m["offset"].as_u64().expect("offset"), m["data"]["n"].as_u64().expect("n")))
            .collect();
        assert_eq!(msgs, [(8, 8), (9, 9), (10, 10)], "history of {ch} (local home {local})");

        let r = c.subscribe(&ch, Some(json!({"offset": 2, "epoch": epoch})));
        assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64()), (Some(false), Some(10)), "{r}");
        let rest = c.barrier();
        assert!(rest.is_empty(), "replayed although not recoverable (local home {local}): {rest:?}");

        let h = c.call(json!({"type": "history", "channel": ch, "since": {"offset": 2, "epoch": epoch}}));
        assert_eq!((h["type"].as_str(), h["recovered"].as_bool()), (Some("history"), Some(false)), "{h}");
        let h = c.call(json!({"type": "history", "channel": ch, "since": {"offset": 7, "epoch": epoch}}));
        assert_eq!(h["recovered"], true, "offsets 8..10 are all kept: {h}");
        let offs: Vec<u64> =
            h["messages"].as_array().expect("messages").iter().filter_map(|m| m["offset"].as_u64()).collect();
        assert_eq!(offs, [8, 9, 10], "{h}");

        // `limit` keeps the newest; a cut-off answer to `since` is not complete.
        let h = c.call(json!({"type": "history", "channel": ch, "limit": 2}));
        let offs: Vec<u64> =
            h["messages"].as_array().expect("messages").iter().filter_map(|m| m["offset"].as_u64()).collect();
        assert_eq!(offs, [9, 10], "{h}");
        let h = c.call(json!({"type": "history", "channel": ch, "limit": 2, "since": {"offset": 7, "epoch": epoch}}));
        assert_eq!(h["recovered"], false, "3 messages missed, 2 returned: {h}");
        // A position from the future is not recoverable either.
        let h = c.call(json!({"type": "history", "channel": ch, "since": {"offset": 99, "epoch": epoch}}));
        assert_eq!(h["recovered"], false, "{h}");

        let r = c.call(json!({"type": "unsubscribe", "channel": ch}));
        assert_eq!(r["type"], "unsubscribed", "{r}");
        let r = c.subscribe(&ch, Some(json!({"offset": 99, "epoch": epoch})));
        assert_eq!(r["recovered"], false, "position from the future (local home {local}): {r}");
        assert!(c.barrier().is_empty());
        let r = c.call(json!({"type": "unsubscribe", "channel": ch}));
        assert_eq!(r["type"], "unsubscribed", "{r}");
        let r = c.subscribe(&ch, Some(json!({"offset": 9, "epoch": "no-such-epoch"})));
        assert_eq!(r["recovered"], false, "wrong epoch (local home {local}): {r}");
        assert_eq!(r["epoch"], epoch.as_str(), "{r}");
        let rest = c.barrier();
        assert!(rest.is_empty(), "replayed for a wrong epoch (local home {local}): {rest:?}");
        let h = c.call(json!({"type": "history", "channel": ch, "since": {"offset": 9, "epoch": "no-such-epoch"}}));
        assert_eq!(h["recovered"], false, "{h}");
        let r = c.call(json!({"type": "unsubscribe", "channel": ch}));
        assert_eq!(r["type"], "unsubscribed", "{r}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 5. Presence agrees on every shard while clients join and leave

/// Asks `presence` and returns (count, user -> connections).
fn presence(c: &mut Ws, channel: &str) -> (u64, BTreeMap<String, u64>) {
    let r = c.call(json!({"type": "presence", "channel": channel}));
    assert_eq!((r["type"].as_str(), r["channel"].as_str()), (Some("presence"), Some(channel)), "{r}");
    let users = r["users"].as_array().unwrap_or_else(|| panic!("presence without users: {r}"));
    let users = users
        .iter()
        .map(|u| (u["user"].as_str().expect("user").to_string(), u["connections"].as_u64().expect("connections")))
        .collect();
    (r["count"].as_u64().expect("count"), users)
}

fn presence_agrees_across_shards(driver: Driver) {
    let srv = start(driver, &[]);
    let ch = "chat:lobby";
    let mut members: Vec<Ws> = (0..12).map(|i| Ws::connect(&srv, &format!("u{}", i / 2))).collect();
    for m in &mut members {
        m.subscribe(ch, None);
    }
    let mut observers: BTreeMap<usize, Ws> = BTreeMap::new();
    for _ in 0..200 {
        if observers.len() == SHARDS {
            break;
        }
        let c = Ws::connect(&srv, "observer");
        observers.entry(c.shard).or_insert(c);
    }
    assert_eq!(observers.len(), SHARDS, "observers on every shard");

    let expect_all: BTreeMap<String, u64> = (0..6).map(|u| (format!("u{u}"), 2)).collect();
    for (shard, o) in &mut observers {
        let got = poll_until(Duration::from_secs(2), || {
            let p = presence(o, ch);
            if p == (12, expect_all.clone()) {
                Ok(p)
            } else {
                Err(format!("shard {shard} (home {}): {p:?}", home_of(ch, SHARDS)))
            }
        });
        assert_eq!(got.0, 12);
    }

    // u0 and u1 unsubscribe one connection each; both connections of u2 disconnect.
    for i in [0, 2] {
        let r = members[i].call(json!({"type": "unsubscribe", "channel": ch}));
        assert_eq!(r["type"], "unsubscribed", "{r}");
    }
    let gone: Vec<Ws> = members.drain(4..6).collect();
    drop(gone);
    let mut expect_left = expect_all.clone();
    expect_left.insert("u0".into(), 1);
    expect_left.insert("u1".into(), 1);
    expect_left.remove("u2");
    for (shard, o) in &mut observers {
        poll_until(Duration::from_secs(2), || {
            let p = presence(o, ch);
            if p == (8, expect_left.clone()) {
                Ok(())
            } else {
                Err(format!("shard {shard} (home {}): {p:?}, want 8 and {expect_left:?}", home_of(ch, SHARDS)))
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// 6. Slow consumers

const FLOOD: u64 = 5000;
/// Most messages the publisher runs ahead of the reading subscriber: 50 KiB, under the 64 KiB backlog bound
/// even when all of it is in the channel log at once (see `burst_does_not_close_a_reading_subscriber`).
const FLOOD_WINDOW: u64 = 50;
/// Publishes sent before reading their acks.
const FLOOD_BATCH: u64 = 25;

/// A connection with a 4 KiB receive buffer (so the server's writes back up quickly).
fn small_buffer_client(srv: &Server, user: &str) -> Ws {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&srv.addr.into(), IO_TIMEOUT).expect("connect");
    Ws::over(sock.into(), srv, user)
}

/// Publishes [`FLOOD`] messages of about 1 KiB to `channel`, in pipelined batches, never more than
/// [`FLOOD_WINDOW`] ahead of what `progress` says the reading subscriber has.
fn flood(publ: &mut Ws, channel: &str, progress: &AtomicU64) {
    let pad = "x".repeat(1000);
    let mut sent = 0;
    while sent < FLOOD {
        let deadline = Instant::now() + IO_TIMEOUT;
        while progress.load(Ordering::Relaxed) + FLOOD_WINDOW < sent + FLOOD_BATCH {
            assert!(Instant::now() < deadline, "the reading subscriber stalled at {progress:?} of {sent}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let ids: Vec<u64> = (sent..sent + FLOOD_BATCH)
            .map(|n| publ.send(json!({"type": "publish", "channel": channel, "data": {"n": n + 1, "pad": pad}})))
            .collect();
        for id in ids {
            let r = publ.recv();
            assert_eq!((r["type"].as_str(), r["id"].as_u64()), (Some("published"), Some(id)), "{r}");
        }
        sent += FLOOD_BATCH;
    }
}

/// Reads all [`FLOOD`] messages in order, counting them in `progress`.
fn read_flood(c: &mut Ws, channel: &str, progress: &AtomicU64) {
    for n in 1..=FLOOD {
        let m = c.recv();
        assert_eq!(expect_message(&m, channel, n)["n"], n);
        progress.store(n, Ordering::Relaxed);
    }
    assert!(c.barrier().is_empty());
}

fn slow_subscriber_closed_4008(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let ch = "slowc:flood";
    let mut slow = small_buffer_client(&srv, "slow");
    slow.subscribe(ch, None);
    let mut normal = Ws::connect(&srv, "normal");
    normal.subscribe(ch, None);
    let mut publ = Ws::connect(&srv, "publisher");
    let progress = AtomicU64::new(0);
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_flood(&mut normal, ch, &progress));
        flood(&mut publ, ch, &progress);
        reader.join().expect("normal subscriber");
    });
    // Now the slow one reads: whole messages in order, then the 4008 close.
    let (msgs, close) = slow.read_until_close();
    for (i, m) in msgs.iter().enumerate() {
        expect_message(m, ch, i as u64 + 1);
    }
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 4008, "close {close:?} after {} messages", msgs.len());
    assert!((msgs.len() as u64) < FLOOD, "the slow subscriber got everything: not slow");
    eprintln!("slow subscriber: {} whole messages, then {close:?}", msgs.len());
    assert!(srv.metric("throng_slow_consumers_total") >= 1);
    // The closed subscriber left the channel's presence.
    let want: BTreeMap<String, u64> = [("normal".to_string(), 1)].into();
    poll_until(Duration::from_secs(2), || match presence(&mut publ, ch) {
        p if p == (1, want.clone()) => Ok(()),
        p => Err(format!("presence after the slow consumer was closed: {p:?}")),
    });
    // The publisher and the normal subscriber are still served.
    let off = publ.publish(ch, json!({"n": FLOOD + 1}));
    assert_eq!(expect_message(&normal.recv(), ch, off)["n"], FLOOD + 1);
}

fn slow_subscriber_drop_oldest_gap(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let ch = "lossy:flood";
    let mut slow = small_buffer_client(&srv, "slow");
    slow.subscribe(ch, None);
    let mut normal = Ws::connect(&srv, "normal");
    normal.subscribe(ch, None);
    let mut publ = Ws::connect(&srv, "publisher");
    let progress = AtomicU64::new(0);
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_flood(&mut normal, ch, &progress));
        flood(&mut publ, ch, &progress);
        reader.join().expect("normal subscriber");
    });
    // The slow one reads: messages, gap markers, and messages again, covering 1..=FLOOD exactly.
    let mut next = 1u64;
    let mut gaps = Vec::new();
    let mut got = 0u64;
    while next <= FLOOD {
        let m = slow.recv();
        match m["type"].as_str() {
            Some("message") => {
                let data = expect_message(&m, ch, next);
                assert_eq!(data["n"], next);
                got += 1;
                next += 1;
            }
            Some("gap") => {
                assert_eq!(m["channel"], ch, "{m}");
                let (from, to) = (m["from"].as_u64().expect("from"), m["to"].as_u64().expect("to"));
                assert_eq!(from, next, "gap {m} does not start at the next missing offset {next}");
                assert!(to >= from && to <= FLOOD, "{m}");
                gaps.push((from, to));
                next = to + 1;
            }
            _ => panic!("unexpected {m} while expecting offset {next}"),
        }
    }
    assert!(!gaps.is_empty(), "no gap although the subscriber read nothing during the flood");
    let skipped: u64 = gaps.iter().map(|(f, t)| t - f + 1).sum();
    assert_eq!(got + skipped, FLOOD);
    eprintln!("slow subscriber: {got} messages and {} gaps covering {skipped}", gaps.len());
    // Not closed: it still answers, nothing more is queued, and live messages continue.
    assert!(slow.barrier().is_empty());
    let off = publ.publish(ch, json!({"n": FLOOD + 1}));
    assert_eq!(expect_message(&slow.recv(), ch, off)["n"], FLOOD + 1);
    assert_eq!(srv.metric("throng_slow_consumers_total"), 0, "drop_oldest closed someone");
}

/// A subscriber with an empty socket buffer that reads everything is not a slow consumer, even when one
/// burst of publishes (here 100 messages of 1 KiB arriving in one TCP write, 105 KB against a 64 KiB bound)
/// is appended to the channel log before the shard's flush pass runs.
fn burst_does_not_close_a_reading_subscriber(driver: Driver) {
    let srv = start(driver, &["--max-backlog-bytes", "65536", "--max-message-size", "16384"]);
    let pad = "x".repeat(1000);
    for policy in ["lossy", "slowc"] {
        // Reader, publisher and the channel's home all on one shard: the whole burst is appended to the log
        // while the publisher's bytes are handled, before the flush pass runs.
        let mut reader = Ws::connect(&srv, "reader");
        let mut publ = Ws::connect_where(&srv, "publisher", |s| s == reader.shard);
        let ch = with_home(&format!("{policy}:burst"), reader.shard);
        reader.subscribe(&ch, None);
        for n in 1..=100u64 {
            let cmd = json!({"type": "publish", "id": n, "channel": ch, "data": {"n": n, "pad": pad}});
            publ.ws.write(Message::text(cmd.to_string())).expect("buffering a publish");
        }
        publ.ws.flush().expect("writing the burst");
        for n in 1..=100u64 {
            let m = reader.recv();
            assert_eq!(expect_message(&m, &ch, n)["n"], n, "reader on shard {}, home of {ch}", reader.shard);
        }
        assert!(reader.barrier().is_empty());
        assert_eq!(srv.metric("throng_slow_consumers_total"), 0, "{ch}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 7. Refused commands keep the connection open; a flood of malformed ones closes it

fn expect_error(r: &Value, id: Option<u64>, code: &str) {
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some(code)), "{r}");
    assert_eq!(r.get("id").and_then(Value::as_u64), id, "{r}");
    assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty()), "error without a reason: {r}");
}

fn errors_keep_connection_open(driver: Driver) {
    let srv = start(driver, &[]);
    let mut c = Ws::connect(&srv, "me");
    let other_home = not_homed_on("nopub:news", c.shard);
    let own_home = with_home("nopub:news", c.shard);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"type": "frobnicate", "id": 11}), "unknown_command"),
        (json!({"type": "subscribe", "id": 12, "channel": "nope:x"}), "unknown_namespace"),
        (json!({"type": "publish", "id": 13, "channel": "nope:x", "data": 1}), "unknown_namespace"),
        (json!({"type": "publish", "id": 14, "channel": own_home, "data": {"a": 1}}), "forbidden"),
        (json!({"type": "publish", "id": 15, "channel": other_home, "data": {"a": 1}}), "forbidden"),
        (json!({"type": "subscribe", "id": 16, "channel": "user:someoneelse"}), "forbidden"),
        (json!({"type": "publish", "id": 17, "channel": "user:me", "data": 1}), "forbidden"),
        (json!({"type": "subscribe", "id": 18}), "bad_request"),
        (json!({"type": "subscribe", "id": 19, "channel": "chat:bad channel!"}), "bad_channel"),
        (json!({"type": "presence", "id": 20, "channel": "quiet:x"}), "not_available"),
        (json!({"type": "unsubscribe", "id": 21, "channel": "chat:never"}), "not_subscribed"),
    ];
    for (cmd, code) in &cases {
        let id = cmd["id"].as_u64();
        let r = c.call(cmd.clone());
        expect_error(&r, id, code);
        let pong = c.call(json!({"type": "ping", "id": 1000}));
        assert_eq!(pong["type"], "pong", "after {cmd}: {pong}");
    }
    // Subscribing twice (to a channel homed here and to one homed elsewhere) is refused the second time.
    for ch in [with_home("chat:twice", c.shard), not_homed_on("chat:twice", c.shard)] {
        c.subscribe(&ch, None);
        let r = c.call(json!({"type": "subscribe", "id": 30, "channel": ch}));
        expect_error(&r, Some(30), "already_subscribed");
    }
    // Not JSON at all: no id can be read.
    c.send_text("{\"type\":\"ping\",\"id\":23");
    let r = c.recv();
    expect_error(&r, None, "bad_json");
    // The owner may subscribe to its own channel, and everything still works.
    let r = c.subscribe("user:me", None);
    assert_eq!(r["offset"], 0, "{r}");
    let pong = c.call(json!({"type": "ping", "id": 22}));
    assert_eq!((pong["type"].as_str(), pong["id"].as_u64()), (Some("pong"), Some(22)), "{pong}");
    assert!(c.barrier().is_empty());
}

fn malformed_flood_closes_1008(driver: Driver) {
    malformed_flood(driver, 16);
}

/// More malformed messages than it takes: the client is still writing when the server closes.
fn malformed_overflow_closes_1008(driver: Driver) {
    malformed_flood(driver, 40);
}

/// Sends `n` (at least 16) malformed messages back to back: 15 `bad_json` errors, then a 1008 close.
fn malformed_flood(driver: Driver, n: usize) {
    let srv = start(driver, &[]);
    let mut c = Ws::connect(&srv, "abuser");
    for _ in 0..n {
        if let Err(e) = c.ws.send(Message::text("{not json")) {
            // The server may have closed already (after the 16th).
            eprintln!("send failed after the close: {e}");
            break;
        }
    }
    let (msgs, close) = c.read_until_close();
    assert_eq!(msgs.len(), 15, "errors before the close: {msgs:?}");
    for m in &msgs {
        expect_error(m, None, "bad_json");
    }
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(!close.reason.is_empty());
    // Others are unaffected.
    let mut d = Ws::connect(&srv, "fine");
    assert_eq!(d.call(json!({"type": "ping"}))["type"], "pong");
}

/// io_uring only: with `--uring-zerocopy-threshold`, deliveries of large frames go out zero-copy
/// (IORING_OP_SENDMSG_ZC, their buffers held until the kernel's notification), and every subscriber gets
/// every message whole and in order; small ones keep the ordinary path.
#[test]
fn zero_copy_deliveries_arrive_whole() {
    let srv = Server::start(
        Driver::Uring,
        &[
            "--shards",
            "1",
            "--uring-zerocopy-threshold",
            "8192",
            "--max-messages-per-second",
            "0",
            "--max-bytes-per-second",
            "0",
        ],
    );
    let mut subs: Vec<Ws> = (0..5).map(|i| Ws::connect(&srv, &format!("zc{i}"))).collect();
    for s in &mut subs {
        let r = s.subscribe("zc:big", None);
        assert_eq!(r["type"], "subscribed", "{r}");
    }
    let mut publisher = Ws::connect(&srv, "zcpub");
    let body = |m: usize| format!("{m:03}{}", "z".repeat(if m.is_multiple_of(2) { 30_000 } else { 100 }));
    for m in 0..20 {
        publisher.send(json!({"type": "publish", "channel": "zc:big", "data": body(m)}));
        let r = publisher.recv();
        assert_eq!(r["type"], "published", "{r}");
    }
    for s in &mut subs {
        for m in 0..20 {
            let msg = s.recv();
            assert_eq!(msg["type"], "message", "{msg}");
            assert_eq!(msg["offset"], m as u64 + 1);
            assert_eq!(msg["data"].as_str(), Some(body(m).as_str()), "{}: message {m}", s.client);
        }
    }
    let sent = srv.metric("throng_uring_zerocopy_sends_total");
    assert!(sent > 0, "no delivery went zero-copy");
    // Only the 30 KB messages qualify: at most one zero-copy write per large message and subscriber.
    assert!(sent <= 10 * 5, "{sent} zero-copy writes for 50 large deliveries");
}
