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
use smallvec::SmallVec;

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
    pub fn wire(&self, sse: bool) -> &Bytes {
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

/// Subscribers up to which a channel's [`Subs`] grows by exactly one slot.
pub const EXACT_SUBS: usize = 16;

/// A channel's local subscribers: a slab (a subscriber keeps its slot number, which its connection's
/// `ConnSub` holds, until it leaves; freed slots are reused, last freed first) whose first slot is held in
/// place: a channel with one subscriber (a personal channel) has no heap block for it, in the 40 B the
/// `slab::Slab` this replaces took. Past one the slots go to the heap, growing by exactly one slot up to
/// [`EXACT_SUBS`] (a group of 10: 240 B, not the 384 of 16 slots), doubling after that.
#[derive(Debug, Default)]
pub struct Subs {
    slots: SmallVec<[Slot; 1]>,
    /// Occupied slots.
    len: u32,
    /// The first free slot (`slots.len()` when none is free).
    next: u32,
}

/// A slot of [`Subs`].
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// Free; the next free slot.
    Vacant(u32),
    /// A subscriber.
    Occupied(Sub),
}

impl Subs {
    /// Adds a subscriber; returns its slot.
    pub fn insert(&mut self, sub: Sub) -> usize {
        let at = self.next as usize;
        match self.slots.get(at).copied() {
            Some(Slot::Vacant(next)) => {
                self.slots[at] = Slot::Occupied(sub);
                self.next = next;
            }
            _ => {
                if self.slots.len() == self.slots.capacity() && self.slots.len() < EXACT_SUBS {
                    self.slots.reserve_exact(1);
                }
                self.slots.push(Slot::Occupied(sub));
                self.next = self.slots.len() as u32;
            }
        }
        self.len += 1;
        at
    }

    /// Removes the subscriber in slot `at`, if there is one.
    pub fn try_remove(&mut self, at: usize) -> Option<Sub> {
        let Some(&Slot::Occupied(sub)) = self.slots.get(at) else { return None };
        self.slots[at] = Slot::Vacant(self.next);
        self.next = at as u32;
        self.len -= 1;
        Some(sub)
    }

    /// The subscriber in slot `at`.
    pub fn get(&self, at: usize) -> Option<&Sub> {
        match self.slots.get(at) {
            Some(Slot::Occupied(s)) => Some(s),
            _ => None,
        }
    }

    /// The subscriber in slot `at`, to move its cursor.
    pub fn get_mut(&mut self, at: usize) -> Option<&mut Sub> {
        match self.slots.get_mut(at) {
            Some(Slot::Occupied(s)) => Some(s),
            _ => None,
        }
    }

    /// The subscribers and their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Sub)> {
        self.slots.iter().enumerate().filter_map(|(at, s)| match s {
            Slot::Occupied(s) => Some((at, s)),
            Slot::Vacant(_) => None,
        })
    }

    /// Subscribers.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True with no subscriber.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots held (occupied or free), in place or on the heap.
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

impl std::ops::Index<usize> for Subs {
    type Output = Sub;

    fn index(&self, at: usize) -> &Sub {
        self.get(at).expect("no subscriber in this slot")
    }
}

impl std::ops::IndexMut<usize> for Subs {
    fn index_mut(&mut self, at: usize) -> &mut Sub {
        self.get_mut(at).expect("no subscriber in this slot")
    }
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
    pub subs: Subs,
    /// Messages with offsets up to this were already covered when subscribers joined; older deliveries
    /// still in flight from the home are ignored. `u64::MAX` until the first subscription is confirmed.
    pub accept_after: u64,
    /// Subscribe requests sent to the home and not answered yet.
    pub pending: u32,
    /// Queued for the next flush pass.
    pub dirty: bool,
}

/// Size budget of a [`LocalChannel`] (the slab entry of every channel with local subscribers), checked at
/// compile time. Its heap: the name (shared with the home when it is on this shard), the subscribers past
/// the first (24 B a slot, [`Subs`]), the log (88 B a slot, kept once allocated unless it grew past 64 slots).
pub const LOCAL_CHANNEL_BUDGET: usize = 120;
/// Size budget of a [`Sub`] (a slot of a channel's [`Subs`] holds one, 24 B with the slot's tag).
pub const SUB_BUDGET: usize = 16;
/// Size budget of a [`LogEntry`].
pub const LOG_ENTRY_BUDGET: usize = 88;
const _: () = assert!(std::mem::size_of::<LocalChannel>() <= LOCAL_CHANNEL_BUDGET);
const _: () = assert!(std::mem::size_of::<Sub>() <= SUB_BUDGET);
const _: () = assert!(std::mem::size_of::<Subs>() <= 40);
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
            subs: Subs::default(),
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

    /// Subscriber slots: the first in place, then exactly one more slot at a time up to `EXACT_SUBS`; a
    /// slot number stays its subscriber's; freed slots are reused, the last freed first (as `slab::Slab`).
    #[test]
    fn subs_keep_their_slots() {
        let mut s = Subs::default();
        let sub = |i: u32| Sub { conn: key(i), cursor: u64::from(i) };
        assert_eq!((s.insert(sub(0)), s.capacity(), s.len()), (0, 1, 1), "one subscriber, in place");
        for i in 1..10 {
            assert_eq!(s.insert(sub(i)), i as usize);
            assert_eq!(s.capacity(), i as usize + 1, "exact growth");
        }
        assert_eq!(s.try_remove(3).map(|x| x.cursor), Some(3));
        assert_eq!(s.try_remove(7).map(|x| x.cursor), Some(7));
        assert!(s.try_remove(7).is_none() && s.try_remove(99).is_none() && s.get(3).is_none());
        assert_eq!(s.len(), 8);
        assert_eq!(s.iter().map(|(at, x)| (at, x.cursor)).filter(|&(at, c)| at as u64 == c).count(), 8);
        assert_eq!(s.insert(sub(70)), 7, "the last freed slot first");
        assert_eq!(s.insert(sub(30)), 3);
        assert_eq!(s.insert(sub(10)), 10);
        assert_eq!((s[7].cursor, s[3].cursor, s[10].cursor), (70, 30, 10));
        s[10].cursor = 11;
        assert_eq!(s.get(10).map(|x| x.cursor), Some(11));
        for at in 0..11 {
            assert!(s.try_remove(at).is_some());
        }
        assert!(s.is_empty() && s.iter().next().is_none());
        for i in 11..40 {
            s.insert(sub(i));
        }
        assert_eq!((s.len(), s.capacity()), (29, 32), "past EXACT_SUBS the slots double");
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
