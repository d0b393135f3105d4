//! Channel churn against the real binary: 100,000 channels created and dropped through `subscribe` /
//! `unsubscribe`, and the server's memory and channel gauges back where they started.
//!
//! A few `/ws` connections each cycle through many channels, their commands pipelined: a batch of
//! subscribes to fresh channel names written at once, every `subscribed` read, the same batch of
//! unsubscribes, every `unsubscribed` read. Channel names are never reused, so every subscribe creates a
//! channel at its home (offset, epoch, presence table) and a local channel with its log and subscriber slab,
//! and every unsubscribe drops the local channel at once and leaves the home idle, forgotten by the home
//! shard's housekeeping (every 2 s).
//!
//! What is compared: the server's RSS (`/proc/<pid>/statm`, the resident pages) after a warm-up round of
//! 20,000 channels, once the channel gauges are back at their start (so the allocator's high-water marks and
//! the index tables' capacity for one batch are already paid), against its RSS after the 100,000-channel
//! round, once the gauges are back again: within 5%. The gauges (`throng_channels`: homes plus local
//! channels; `throng_active_subscriptions`) must return to their values before any churn. `/stats`
//! `rss_bytes` is the same reading as statm; it is printed alongside.

#[macro_use]
mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::{client_frame, Client, Driver, Server};
use throng_protocol::frame::{parse_header, OpCode};

/// `/ws` connections churning at once (spread over the shards by SO_REUSEPORT).
const CONNS: usize = 4;
/// Subscriptions a connection holds at once: one batch of pipelined subscribes.
const BATCH: usize = 250;
/// Channels created and dropped by the measured round.
const CHANNELS: usize = 100_000;
/// Channels created and dropped by the warm-up round.
const WARMUP: usize = 2 * CHUNK;
/// Channels created before waiting for the homes to be forgotten: idle homes live until their shard's next
/// housekeeping pass (every 2 s), so without the wait the peak number of homes held at once (and with it
/// the capacity of the home slab and index, which never shrink) would depend on how fast the round ran.
const CHUNK: usize = 25_000;

/// A `/ws` connection that writes pipelined commands and reads replies in bulk.
struct Churner {
    c: Client,
    /// Received bytes not yet parsed, from `at`.
    buf: Vec<u8>,
    at: usize,
}

impl Churner {
    fn connect(srv: &Server, user: &str) -> Churner {
        let mut c = Client::connect(srv.addr);
        c.upgrade(&format!("/ws?user={user}"));
        // The welcome may have come with the 101: the client's own buffer has it. Nothing else is sent
        // before the first command, so later bytes are all read here.
        let welcome = String::from_utf8(c.read_frame().payload).expect("UTF-8");
        assert!(welcome.contains("\"type\":\"welcome\""), "{welcome}");
        Churner { c, buf: Vec::with_capacity(1 << 20), at: 0 }
    }

    /// The next text frame's payload (pings are not expected within a test this short; any other frame
    /// fails it).
    fn next_text(&mut self) -> String {
        loop {
            let h = parse_header(&self.buf[self.at..]).unwrap_or_else(|e| panic!("bad frame header: {e:?}"));
            if let Some(h) = h {
                let total = h.frame_len() as usize;
                if self.buf.len() - self.at >= total {
                    assert_eq!(h.opcode, OpCode::Text, "unexpected frame");
                    let p = &self.buf[self.at + usize::from(h.header_len)..self.at + total];
                    let s = String::from_utf8(p.to_vec()).expect("UTF-8");
                    self.at += total;
                    return s;
                }
            }
            // Compact, then read more.
            self.buf.drain(..self.at);
            self.at = 0;
            let mut tmp = [0u8; 64 * 1024];
            let n = self.c.stream.read(&mut tmp).unwrap_or_else(|e| panic!("reading replies: {e}"));
            assert!(n > 0, "EOF while reading replies");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Writes one command frame per channel (`{"type":<cmd>,"id":i,"channel":<name>}`) in one write.
    fn send_all(&mut self, cmd: &str, names: &[String]) {
        let mut out = Vec::with_capacity(names.len() * 80);
        for (i, n) in names.iter().enumerate() {
            let text = format!(r#"{{"type":"{cmd}","id":{i},"channel":"{n}"}}"#);
            out.extend_from_slice(&client_frame(true, OpCode::Text, text.as_bytes()));
        }
        self.c.write(&out);
    }

    /// Reads one reply per channel, each of type `want` and naming its channel (in any order: a channel
    /// homed on another shard is confirmed after the shard's round trip).
    fn expect_all(&mut self, want: &str, names: &[String]) {
        let mut seen = vec![false; names.len()];
        for _ in names {
            let r = self.next_text();
            let id: usize = r
                .strip_prefix(&format!(r#"{{"type":"{want}","id":"#))
                .and_then(|rest| rest.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("expected a {want} reply, got {r}"));
            assert!(r.contains(&format!(r#""channel":"{}""#, names[id])), "{r} names another channel");
            assert!(!std::mem::replace(&mut seen[id], true), "two replies for id {id}: {r}");
        }
    }
}

/// Creates and drops `total` fresh channels named `<tag>-<conn>-<n>`: every connection subscribes to a
/// batch of them (pipelined), reads the confirmations, unsubscribes from all of them (pipelined), reads
/// those; connections take turns writing and then reading, so the batches of all connections are live at
/// once.
fn churn(conns: &mut [Churner], tag: &str, total: usize) {
    let per_conn = total / conns.len();
    let mut done = 0;
    while done < per_conn {
        let n = BATCH.min(per_conn - done);
        let names: Vec<Vec<String>> =
            (0..conns.len()).map(|c| (done..done + n).map(|k| format!("{tag}-{c}-{k}")).collect()).collect();
        for (c, ns) in conns.iter_mut().zip(&names) {
            c.send_all("subscribe", ns);
        }
        for (c, ns) in conns.iter_mut().zip(&names) {
            c.expect_all("subscribed", ns);
        }
        for (c, ns) in conns.iter_mut().zip(&names) {
            c.send_all("unsubscribe", ns);
        }
        for (c, ns) in conns.iter_mut().zip(&names) {
            c.expect_all("unsubscribed", ns);
        }
        done += n;
    }
}

/// Waits until the gauges are back at `start` (homes are forgotten by housekeeping, every 2 s).
fn gauges_back(srv: &Server, start: (u64, u64)) -> Duration {
    let t0 = Instant::now();
    loop {
        let now = (srv.metric("throng_channels"), srv.metric("throng_active_subscriptions"));
        if now == start {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "gauges (channels, subscriptions) at {now:?}, not {start:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

on_both_drivers! {
    hundred_thousand_channels_come_and_go => churn_uring, churn_epoll;
}

fn hundred_thousand_channels_come_and_go(driver: Driver) {
    let srv = Server::start(
        driver,
        &["--shards", "2", "--max-messages-per-second", "1000000", "--max-subscriptions", "1024"],
    );
    let mut conns: Vec<Churner> = (0..CONNS).map(|i| Churner::connect(&srv, &format!("churner{i}"))).collect();
    let start = (srv.metric("throng_channels"), srv.metric("throng_active_subscriptions"));
    assert_eq!(start, (0, 0), "a fresh server holds no channels");

    let mut peak = 0;
    let mut round = |conns: &mut [Churner], tag: &str, total: usize| {
        let t = Instant::now();
        let mut waited = Duration::ZERO;
        for chunk in 0..total / CHUNK {
            churn(conns, &format!("{tag}{chunk}"), CHUNK);
            peak = peak.max(srv.metric("throng_channels"));
            waited += gauges_back(&srv, start);
        }
        (t.elapsed() - waited, waited)
    };
    let (warm_churn, warm_wait) = round(&mut conns, "warm", WARMUP);
    let before = srv.rss_bytes();
    let before_stats = srv.stats()["rss_bytes"].as_u64().unwrap_or(0);
    let (churn_t, churn_wait) = round(&mut conns, "churn", CHANNELS);
    let after = srv.rss_bytes();
    let after_stats = srv.stats()["rss_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "warm-up {WARMUP} channels: {:.2} s churning + {:.1} s waiting for the gauges; {CHANNELS} channels: \
         {:.2} s + {:.1} s; most channels held at a chunk's end {peak}; RSS {before} -> {after} bytes \
         ({:+.2}%), /stats rss_bytes {before_stats} -> {after_stats}",
        warm_churn.as_secs_f64(),
        warm_wait.as_secs_f64(),
        churn_t.as_secs_f64(),
        churn_wait.as_secs_f64(),
        (after as f64 / before as f64 - 1.0) * 100.0
    );
    let subs_total = srv.metric("throng_subscriptions_total");
    assert_eq!(subs_total, (WARMUP + CHANNELS) as u64, "every subscribe counted once");
    assert!(after as f64 <= before as f64 * 1.05, "RSS grew from {before} to {after} bytes over {CHANNELS} channels");
    // The connections are still fine: one more channel round-trips.
    churn(&mut conns[..1], "last", 1);
}
