//! Channels, in two roles.
//!
//! - [`HomeChannel`]: every channel has one home shard (a hash of its name). The home assigns offsets, so
//!   every subscriber anywhere sees one order; it keeps the bounded history (count and age) used for
//!   recovery and `history`, the presence table (user -> connections, over all shards), and the set of
//!   shards that have subscribers. A publish is encoded **once** there into a complete WebSocket frame.
//! - [`LocalChannel`]: on every shard with subscribers, a log of those frames (shared `Bytes`, never copied)
//!   and one cursor per local subscriber. A subscriber's unsent messages are the log entries from its cursor
//!   on; the shard's flush task writes them with one `writev` per connection per pass, so deliveries to one
//!   socket coalesce, and delivering costs no allocation, no copy and no reference-count traffic per
//!   recipient.
//!
//! Both are plain data structures: no IO, time passed in as shard ticks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;
use throng_protocol::frame::{frame_with, OpCode};
use throng_protocol::message;

use crate::config::SlowConsumerPolicy;
use crate::conn::ConnKey;

/// The home shard of a channel: a fixed hash of its name (FNV-1a), the same on every shard.
pub fn home_of(name: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// One published message kept in history.
#[derive(Clone, Debug)]
pub struct HistoryEntry {
    /// Its offset.
    pub offset: u64,
    /// Tick it was published at, for the age bound.
    pub at: u64,
    /// The complete frame, shared with every delivery.
    pub frame: Bytes,
    /// Where the raw `data` starts in `frame` (it ends one byte before the frame's end, at the final `}`).
    pub data_start: u32,
}

impl HistoryEntry {
    /// The raw JSON `data` of the message.
    pub fn data(&self) -> &[u8] {
        &self.frame[self.data_start as usize..self.frame.len() - 1]
    }
}

/// The result of positioning a subscriber against history.
#[derive(Debug)]
pub struct Recovery {
    /// Whether every message after the client's position follows (false when it cannot be recovered).
    pub recovered: bool,
    /// The missed messages, oldest first (empty when not recovered).
    pub missed: Vec<HistoryEntry>,
}

/// A channel at its home shard.
#[derive(Debug)]
pub struct HomeChannel {
    /// The channel name, shared with the messages sent to other shards.
    pub name: Arc<str>,
    /// Offset of the last published message (0: none yet).
    pub offset: u64,
    /// Changes whenever the channel's offsets restart (a new incarnation of the channel on this node).
    pub epoch: Box<str>,
    /// Recent messages, oldest first, bounded by `history_size` and `history_ttl_ticks`.
    pub history: VecDeque<HistoryEntry>,
    /// Most messages kept.
    pub history_size: usize,
    /// Longest a message is kept, in ticks.
    pub history_ttl_ticks: u64,
    /// Bit `i` set: shard `i` (other than the home) has subscribers and gets every message.
    pub interested: u64,
    /// user -> number of its subscribed connections, over all shards.
    pub presence: HashMap<Box<str>, u32>,
    /// Subscribed connections over all shards.
    pub connections: u64,
}

impl HomeChannel {
    /// A new, empty channel.
    pub fn new(name: &str, epoch: Box<str>, history_size: usize, history_ttl_ticks: u64) -> Self {
        Self {
            name: Arc::from(name),
            offset: 0,
            epoch,
            history: VecDeque::new(),
            history_size,
            history_ttl_ticks,
            interested: 0,
            presence: HashMap::new(),
            connections: 0,
        }
    }

    /// Assigns the next offset to `data` and encodes the message frame once; keeps it in history.
    pub fn publish(&mut self, data: &[u8], now: u64) -> HistoryEntry {
        self.offset += 1;
        let offset = self.offset;
        let mut buf = Vec::with_capacity(message::message_len(&self.name, offset, data) + 10);
        let start = frame_with(&mut buf, OpCode::Text, |o| message::encode_message(o, &self.name, offset, data));
        let frame = Bytes::from(buf).slice(start..);
        let data_start = (frame.len() - 1 - data.len()) as u32;
        let entry = HistoryEntry { offset, at: now, frame, data_start };
        if self.history_size > 0 {
            self.history.push_back(entry.clone());
        }
        self.trim(now);
        entry
    }

    /// Drops history past its count and age bounds.
    pub fn trim(&mut self, now: u64) {
        while self.history.len() > self.history_size {
            self.history.pop_front();
        }
        while self.history.front().is_some_and(|e| now.saturating_sub(e.at) > self.history_ttl_ticks) {
            self.history.pop_front();
        }
    }

    /// What a client that last saw `since` (offset, epoch) missed. `None` means no position was given.
    pub fn recover(&mut self, since: Option<(u64, &str)>, now: u64) -> Recovery {
        self.trim(now);
        let Some((seen, epoch)) = since else {
            return Recovery { recovered: false, missed: Vec::new() };
        };
        if epoch != &*self.epoch || seen > self.offset {
            return Recovery { recovered: false, missed: Vec::new() };
        }
        if seen == self.offset {
            return Recovery { recovered: true, missed: Vec::new() };
        }
        // Every offset in seen+1..=self.offset must still be in history.
        match self.history.front() {
            Some(first) if first.offset <= seen + 1 => {
                Recovery { recovered: true, missed: self.history.iter().filter(|e| e.offset > seen).cloned().collect() }
            }
            _ => Recovery { recovered: false, missed: Vec::new() },
        }
    }

    /// Counts a subscribed connection of `user` (presence).
    pub fn join(&mut self, user: &str) {
        self.connections += 1;
        match self.presence.get_mut(user) {
            Some(n) => *n += 1,
            None => {
                self.presence.insert(user.into(), 1);
            }
        }
    }

    /// Forgets a subscribed connection of `user`.
    pub fn leave(&mut self, user: &str) {
        self.connections = self.connections.saturating_sub(1);
        if let Some(n) = self.presence.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.presence.remove(user);
            }
        }
    }

    /// True when nothing keeps the channel alive: no subscribers anywhere and no history.
    pub fn is_idle(&self) -> bool {
        self.interested == 0 && self.connections == 0 && self.history.is_empty()
    }
}

/// One frame in a shard's channel log.
#[derive(Debug)]
pub struct LogEntry {
    /// The shared frame.
    pub frame: Bytes,
    /// Its channel offset (for gap markers).
    pub offset: u64,
    /// Bytes of all earlier entries ever appended: lag is `end_bytes - start` in O(1).
    pub start: u64,
}

/// A local subscriber: which connection, and the sequence number of the next log entry it has not been sent.
#[derive(Clone, Copy, Debug)]
pub struct Sub {
    /// The subscriber.
    pub conn: ConnKey,
    /// Next log sequence number to send.
    pub cursor: u64,
}

/// A channel on a shard that has local subscribers (or is about to).
#[derive(Debug)]
pub struct LocalChannel {
    /// The channel name.
    pub name: Arc<str>,
    /// What to do with subscribers that fall behind.
    pub policy: SlowConsumerPolicy,
    /// Frames not yet sent to every local subscriber.
    pub log: VecDeque<LogEntry>,
    /// Sequence number of `log[0]`.
    pub base: u64,
    /// Bytes ever appended (the `start` the next entry will get).
    pub end_bytes: u64,
    /// Local subscribers.
    pub subs: Slab<Sub>,
    /// Messages with offsets up to this were already covered when subscribers joined; older deliveries
    /// still in flight from the home are ignored. `u64::MAX` until the first subscription is confirmed.
    pub accept_after: u64,
    /// Subscribe requests sent to the home and not answered yet.
    pub pending: u32,
    /// Queued for the next flush pass.
    pub dirty: bool,
}

impl LocalChannel {
    /// A new channel with no subscribers.
    pub fn new(name: Arc<str>, policy: SlowConsumerPolicy) -> Self {
        Self {
            name,
            policy,
            log: VecDeque::new(),
            base: 0,
            end_bytes: 0,
            subs: Slab::new(),
            accept_after: u64::MAX,
            pending: 0,
            dirty: false,
        }
    }

    /// Sequence number the next appended entry gets.
    pub fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// Appends a frame if it is newer than what subscribers were positioned at; returns whether it was.
    pub fn append(&mut self, offset: u64, frame: &Bytes) -> bool {
        // Offsets at or below the position subscribers were given are already covered: deliveries that
        // raced a (re-)subscription on their way from the home.
        if self.accept_after == u64::MAX || offset <= self.accept_after {
            return false;
        }
        let start = self.end_bytes;
        self.end_bytes += frame.len() as u64;
        self.log.push_back(LogEntry { frame: frame.clone(), offset, start });
        self.accept_after = offset;
        !self.subs.is_empty()
    }

    /// Adds a subscriber positioned at the end of the log, after `offset` (the position it was told).
    pub fn subscribe(&mut self, conn: ConnKey, offset: u64) -> usize {
        if self.accept_after == u64::MAX || offset > self.accept_after {
            self.accept_after = offset;
        }
        self.subs.insert(Sub { conn, cursor: self.end() })
    }

    /// Unsent bytes for a subscriber at `cursor`.
    pub fn lag(&self, cursor: u64) -> u64 {
        match self.log.get((cursor - self.base) as usize) {
            Some(e) => self.end_bytes - e.start,
            None => 0,
        }
    }

    /// For drop-oldest: the cursor that leaves at most `keep` bytes unsent, and the offsets skipped.
    pub fn skip_to_fit(&self, cursor: u64, keep: u64) -> (u64, Option<(u64, u64)>) {
        let mut c = cursor;
        while let Some(e) = self.log.get((c - self.base) as usize) {
            if self.end_bytes - e.start <= keep {
                break;
            }
            c += 1;
        }
        if c == cursor {
            return (c, None);
        }
        let from = self.log[(cursor - self.base) as usize].offset;
        let to = self.log[(c - 1 - self.base) as usize].offset;
        (c, Some((from, to)))
    }

    /// Drops log entries every subscriber has been sent.
    pub fn trim(&mut self) {
        let min = self.subs.iter().map(|(_, s)| s.cursor).min().unwrap_or(self.end());
        while self.base < min && !self.log.is_empty() {
            self.log.pop_front();
            self.base += 1;
        }
        if self.log.is_empty() && self.log.capacity() > 64 {
            self.log = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> ConnKey {
        ConnKey { idx: i, gen: 1 }
    }

    #[test]
    fn publish_encodes_once_and_keeps_history() {
        let mut h = HomeChannel::new("chat:1", "e1".into(), 3, 100);
        for i in 0..5 {
            let e = h.publish(format!("{{\"n\":{i}}}").as_bytes(), 10);
            assert_eq!(e.offset, i + 1);
            assert_eq!(e.data(), format!("{{\"n\":{i}}}").as_bytes());
            // A complete unmasked text frame with the message JSON.
            assert_eq!(e.frame[0], 0x81);
            let body = &e.frame[2..];
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["type"], "message");
            assert_eq!(v["channel"], "chat:1");
            assert_eq!(v["offset"], i + 1);
        }
        assert_eq!(h.history.len(), 3);
        assert_eq!(h.history.front().unwrap().offset, 3);
    }

    #[test]
    fn recovery_rules() {
        let mut h = HomeChannel::new("c", "e1".into(), 3, 100);
        for _ in 0..5 {
            h.publish(b"1", 0);
        }
        // History holds 3..=5.
        let r = h.recover(Some((2, "e1")), 0);
        assert!(r.recovered);
        assert_eq!(r.missed.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
        let r = h.recover(Some((4, "e1")), 0);
        assert_eq!(r.missed.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![5]);
        assert!(h.recover(Some((5, "e1")), 0).recovered);
        assert!(!h.recover(Some((1, "e1")), 0).recovered, "offset 2 was evicted");
        assert!(!h.recover(Some((4, "other")), 0).recovered, "epoch changed");
        assert!(!h.recover(Some((9, "e1")), 0).recovered, "position from the future");
        assert!(!h.recover(None, 0).recovered);
        // Age bound: everything older than 100 ticks is gone.
        let r = h.recover(Some((4, "e1")), 1000);
        assert!(!r.recovered);
        assert!(h.history.is_empty());
    }

    #[test]
    fn presence_counts() {
        let mut h = HomeChannel::new("c", "e".into(), 0, 1);
        h.join("a");
        h.join("a");
        h.join("b");
        assert_eq!((h.connections, h.presence.len(), h.presence["a"]), (3, 2, 2));
        h.leave("a");
        h.leave("b");
        assert_eq!((h.connections, h.presence.len(), h.presence["a"]), (1, 1, 1));
    }

    #[test]
    fn log_cursors_lag_trim_and_skip() {
        let mut c = LocalChannel::new(Arc::from("c"), SlowConsumerPolicy::Close);
        let f = Bytes::from_static(b"0123456789");
        assert!(!c.append(1, &f), "nothing is accepted before the first subscription");
        let a = c.subscribe(key(1), 0);
        for off in 1..=5 {
            assert!(c.append(off, &f));
        }
        assert!(!c.append(3, &f), "old offsets are ignored");
        let b = c.subscribe(key(2), 5);
        assert_eq!(c.lag(c.subs[a].cursor), 50);
        assert_eq!(c.lag(c.subs[b].cursor), 0);
        let (cur, gap) = c.skip_to_fit(c.subs[a].cursor, 20);
        assert_eq!(gap, Some((1, 3)));
        assert_eq!(c.lag(cur), 20);
        c.subs[a].cursor = cur;
        c.trim();
        assert_eq!((c.base, c.log.len()), (3, 2));
        c.subs[a].cursor = c.end();
        c.trim();
        assert!(c.log.is_empty());
    }

    #[test]
    fn home_is_stable() {
        assert_eq!(home_of("chat:1", 1), 0);
        let h = home_of("chat:1", 7);
        assert_eq!(h, home_of("chat:1", 7));
        assert!(h < 7);
    }
}
