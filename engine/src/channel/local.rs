//! A channel on a shard with local subscribers: a log of the frames to deliver (shared `Bytes`, never
//! copied) and one cursor per local subscriber. A subscriber's unsent messages are the log entries from its
//! cursor on; the flush pass ([`super::delivery`]) writes them with one `writev` per connection, so
//! deliveries to one socket coalesce, and delivering costs no allocation, no copy and no reference-count
//! traffic per recipient.
//!
//! Besides messages the log carries markers (a `gap` frame after deliveries were lost on their way here):
//! in the log they reach every subscriber after the frames before them, in order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;

use crate::config::SlowConsumerPolicy;
use crate::conn::ConnKey;

/// One frame in a shard's channel log.
#[derive(Debug)]
pub struct LogEntry {
    /// The shared frame.
    pub frame: Bytes,
    /// Its channel offset (for gap markers); 0 for a marker, which is not a message.
    pub offset: u64,
    /// Bytes of all earlier entries ever appended: lag is `end_bytes - start` in O(1).
    pub start: u64,
    /// When its publish arrived ([`crate::metrics::stamp`]; 0 for a marker), for the delivery latency.
    pub born: u64,
    /// The same message as a Server-Sent Event (`crate::http::sse::event_of`), made once, by the first
    /// SSE subscriber the flush pass writes it to, and shared by every other.
    pub sse: std::cell::OnceCell<Bytes>,
}

impl LogEntry {
    /// The bytes a subscriber gets: the WebSocket frame, or (`sse`) its Server-Sent Event.
    pub fn wire(&self, sse: bool) -> &[u8] {
        if sse {
            self.sse.get_or_init(|| crate::http::sse::event_of(&self.frame))
        } else {
            &self.frame
        }
    }
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

/// Size budget of a [`LocalChannel`] (the slab entry of every channel with local subscribers), checked at
/// compile time. Its heap: the name (shared with the home when it is on this shard), the subscriber slab
/// (24 B a slot), the log (88 B a slot, kept once allocated unless it grew past 64 slots).
pub const LOCAL_CHANNEL_BUDGET: usize = 120;
/// Subscribers up to which a channel's subscriber slab grows by exactly one slot.
pub const EXACT_SUBS: usize = 16;
/// Size budget of a [`Sub`] (a slot of a channel's subscriber slab holds one, 24 B with the slab's tag).
pub const SUB_BUDGET: usize = 16;
/// Size budget of a [`LogEntry`].
pub const LOG_ENTRY_BUDGET: usize = 88;
const _: () = assert!(std::mem::size_of::<LocalChannel>() <= LOCAL_CHANNEL_BUDGET);
const _: () = assert!(std::mem::size_of::<Sub>() <= SUB_BUDGET);
const _: () = assert!(std::mem::size_of::<LogEntry>() <= LOG_ENTRY_BUDGET);

impl LocalChannel {
    /// A new channel with no subscribers.
    pub fn new(name: Arc<str>, policy: SlowConsumerPolicy) -> Self {
        Self {
            name,
            policy,
            log: VecDeque::new(),
            base: 0,
            end_bytes: 0,
            // Room for one subscriber (24 B) rather than the four a first insert would reserve: most channels
            // of a chat-shaped load (a personal channel) have exactly one.
            subs: Slab::with_capacity(1),
            accept_after: u64::MAX,
            pending: 0,
            dirty: false,
        }
    }

    /// Sequence number the next appended entry gets.
    pub fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// Appends a message frame if it is newer than what subscribers were positioned at; returns whether it
    /// was (and there is someone to send it to). `born`: when its publish arrived.
    pub fn append(&mut self, offset: u64, frame: &Bytes, born: u64) -> bool {
        // Offsets at or below the position subscribers were given are already covered: deliveries that
        // raced a (re-)subscription on their way from the home.
        if self.accept_after == u64::MAX || offset <= self.accept_after {
            return false;
        }
        self.push(offset, frame.clone(), born);
        self.accept_after = offset;
        !self.subs.is_empty()
    }

    /// Appends a marker frame (not a message: it has no offset) behind everything logged so far.
    pub fn append_marker(&mut self, frame: Bytes) -> bool {
        if self.subs.is_empty() {
            return false;
        }
        self.push(0, frame, 0);
        true
    }

    fn push(&mut self, offset: u64, frame: Bytes, born: u64) {
        let start = self.end_bytes;
        self.end_bytes += frame.len() as u64;
        self.log.push_back(LogEntry { frame, offset, start, born, sse: std::cell::OnceCell::new() });
    }

    /// Adds a subscriber positioned at the end of the log, after `offset` (the position it was told).
    pub fn subscribe(&mut self, conn: ConnKey, offset: u64) -> usize {
        if self.accept_after == u64::MAX || offset > self.accept_after {
            self.accept_after = offset;
        }
        // A small channel's slab grows one slot at a time (a group of 10: 240 B, not the 384 of 16 slots);
        // past `EXACT_SUBS` it doubles as usual.
        if self.subs.len() == self.subs.capacity() && self.subs.len() < EXACT_SUBS {
            self.subs.reserve_exact(1);
        }
        self.subs.insert(Sub { conn, cursor: self.end() })
    }

    /// The subscriber in `slot`, if it is `conn`'s.
    pub fn sub_of(&self, slot: usize, conn: ConnKey) -> Option<&Sub> {
        self.subs.get(slot).filter(|s| s.conn == conn)
    }

    /// Unsent bytes for a subscriber at `cursor`.
    pub fn lag(&self, cursor: u64) -> u64 {
        match self.log.get((cursor - self.base) as usize) {
            Some(e) => self.end_bytes - e.start,
            None => 0,
        }
    }

    /// For drop-oldest: the cursor that leaves at most `keep` bytes unsent, and the message offsets skipped
    /// (markers skipped with them carry none).
    pub fn skip_to_fit(&self, cursor: u64, keep: u64) -> (u64, Option<(u64, u64)>) {
        let mut c = cursor;
        let mut skipped: Option<(u64, u64)> = None;
        while let Some(e) = self.log.get((c - self.base) as usize) {
            if self.end_bytes - e.start <= keep {
                break;
            }
            if e.offset != 0 {
                skipped = Some(skipped.map_or((e.offset, e.offset), |(from, _)| (from, e.offset)));
            }
            c += 1;
        }
        (c, skipped)
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
    fn log_cursors_lag_trim_and_skip() {
        let mut c = LocalChannel::new(Arc::from("c"), SlowConsumerPolicy::Close);
        let f = Bytes::from_static(b"0123456789");
        assert!(!c.append(1, &f, 0), "nothing is accepted before the first subscription");
        let a = c.subscribe(key(1), 0);
        for off in 1..=5 {
            assert!(c.append(off, &f, 0));
        }
        assert!(!c.append(3, &f, 0), "old offsets are ignored");
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
        assert!(c.sub_of(a, key(1)).is_some());
        assert!(c.sub_of(a, key(2)).is_none(), "a slot names one connection");
    }

    /// A marker goes behind the frames logged before it, for every subscriber, and skipping over it
    /// reports only message offsets.
    #[test]
    fn markers_keep_their_place() {
        let mut c = LocalChannel::new(Arc::from("c"), SlowConsumerPolicy::DropOldest);
        let f = Bytes::from_static(b"0123456789");
        let a = c.subscribe(key(1), 0);
        assert!(c.append(1, &f, 0));
        assert!(c.append_marker(Bytes::from_static(b"gap")));
        assert!(c.append(4, &f, 0));
        let order: Vec<u64> = c.log.range((c.subs[a].cursor - c.base) as usize..).map(|e| e.offset).collect();
        assert_eq!(order, [1, 0, 4]);
        let (cur, gap) = c.skip_to_fit(c.subs[a].cursor, 10);
        assert_eq!((cur - c.base, gap), (2, Some((1, 1))));
    }
}
