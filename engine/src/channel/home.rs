//! A channel at its home shard: offsets, the epoch, bounded history, presence, and which shards listen.
//!
//! Every channel has one home shard ([`super::home_of`]). The home assigns offsets, so every subscriber
//! anywhere sees one order; it keeps the history used for recovery and `history` — bounded by count, age
//! and bytes per channel here, and in bytes per shard by [`super::history::HistoryBudget`] — the presence
//! table (user -> connections, over all shards), and the set of shards that have subscribers. A publish is
//! encoded **once** here into a complete WebSocket frame that every delivery shares.
//!
//! Plain data: no IO, time passed in as shard ticks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use throng_protocol::frame::{frame_with, OpCode};
use throng_protocol::message;

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

/// History bounds of a channel, from its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most messages kept.
    pub size: usize,
    /// Longest a message is kept, in ticks.
    pub ttl_ticks: u64,
    /// Most bytes (of frames) kept.
    pub bytes: usize,
}

/// A channel at its home shard.
#[derive(Debug)]
pub struct HomeChannel {
    /// The channel name, shared with the messages sent to other shards.
    pub name: Arc<str>,
    /// Offset of the last published message (0: none yet).
    pub offset: u64,
    /// A random 64-bit value naming this incarnation of the channel's offsets: a new one whenever the
    /// channel is created again (after being forgotten, on a restart, on another node).
    pub epoch: u64,
    /// Recent messages, oldest first, within `limits`.
    pub history: VecDeque<HistoryEntry>,
    /// Bytes of the frames in `history`.
    pub history_bytes: usize,
    /// Bit `i` set: shard `i` (other than the home) has subscribers and gets every message.
    pub interested: u64,
    /// user -> number of its subscribed connections, over all shards. Ordered, so that a presence reply
    /// lists the first users without sorting the whole table per request.
    pub presence: Presence,
    /// History bounds: an index in the shard's table of distinct bounds (`Channels::limits`, one entry
    /// per namespace at most), 4 B here rather than the 24 B of the bounds, which every method that
    /// applies them is given.
    pub limits: u32,
    /// Subscribed connections over all shards (at most one per connection: a node holds fewer than 2^32).
    pub connections: u32,
}

/// Size budget of a [`HomeChannel`] (the slab entry of every channel homed on a shard), checked at compile
/// time. Its heap: the name (shared with the local channel on the home shard), the presence table (none
/// for one user, 24 B a user up to [`Presence::SMALL`]; the names are the connections' own), the history.
pub const HOME_CHANNEL_BUDGET: usize = 112;
/// Size budget of a [`HistoryEntry`].
pub const HISTORY_ENTRY_BUDGET: usize = 56;
const _: () = assert!(std::mem::size_of::<HomeChannel>() <= HOME_CHANNEL_BUDGET);
const _: () = assert!(std::mem::size_of::<Presence>() == 24);
const _: () = assert!(std::mem::size_of::<HistoryEntry>() <= HISTORY_ENTRY_BUDGET);

/// A channel's presence table: user -> its subscribed connections, in name order. One user (a personal
/// channel's whole table) is held in place, no allocation; small tables (a chat group has a handful) are a
/// sorted boxed slice of exactly their users (24 B a user, one allocation, against 240 B for a B-tree's
/// first leaf); past [`Presence::SMALL`] users it becomes a B-tree, and stays one. The names are the
/// connections' own ([`crate::auth::Identity::user`]), shared. 24 B, like the vector it was.
#[derive(Debug)]
pub enum Presence {
    /// Exactly one user and its connections.
    One(Arc<str>, u32),
    /// Sorted by user, no duplicates; empty or at least two users (one is `One`).
    Small(Box<[(Arc<str>, u32)]>),
    /// More than [`Presence::SMALL`] users at some point (boxed: the enum stays 24 B).
    Large(Box<BTreeMap<Arc<str>, u32>>),
}

impl Default for Presence {
    fn default() -> Self {
        Presence::Small(Box::default())
    }
}

impl Presence {
    /// Most users kept in the sorted slice (a join is a binary search and a copy of at most this many).
    pub const SMALL: usize = 16;

    /// Counts one more connection of `user` (the connection's own name, shared: no copy is made).
    pub fn join(&mut self, user: &Arc<str>) {
        match self {
            Presence::One(u, n) if **u == **user => *n += 1,
            Presence::One(u, n) => {
                let (first, second) = ((u.clone(), *n), (user.clone(), 1));
                let pair = if *first.0 < **user { [first, second] } else { [second, first] };
                *self = Presence::Small(Box::new(pair));
            }
            Presence::Small(v) if v.is_empty() => *self = Presence::One(user.clone(), 1),
            Presence::Small(v) => match v.binary_search_by(|(u, _)| (**u).cmp(&**user)) {
                Ok(i) => v[i].1 += 1,
                Err(_) if v.len() >= Self::SMALL => {
                    let mut m: BTreeMap<Arc<str>, u32> = std::mem::take(v).into_vec().into_iter().collect();
                    m.insert(user.clone(), 1);
                    *self = Presence::Large(Box::new(m));
                }
                Err(i) => {
                    // Exactly one more: presence tables are many and mostly tiny.
                    let mut w = std::mem::take(v).into_vec();
                    w.reserve_exact(1);
                    w.insert(i, (user.clone(), 1));
                    *v = w.into_boxed_slice();
                }
            },
            Presence::Large(m) => match m.get_mut(&**user) {
                Some(n) => *n += 1,
                None => {
                    m.insert(user.clone(), 1);
                }
            },
        }
    }

    /// Counts one connection of `user` less (a user with none left is removed).
    pub fn leave(&mut self, user: &str) {
        match self {
            Presence::One(u, n) => {
                if **u == *user {
                    *n -= 1;
                    if *n == 0 {
                        *self = Presence::default();
                    }
                }
            }
            Presence::Small(v) => {
                if let Ok(i) = v.binary_search_by(|(u, _)| (**u).cmp(user)) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        let mut w = std::mem::take(v).into_vec();
                        w.remove(i);
                        match w.pop() {
                            Some((u, n)) if w.is_empty() => *self = Presence::One(u, n),
                            Some(last) => {
                                w.push(last);
                                *v = w.into_boxed_slice();
                            }
                            None => {}
                        }
                    }
                }
            }
            Presence::Large(m) => {
                if let Some(n) = m.get_mut(user) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(user);
                    }
                }
            }
        }
    }

    /// The connections of `user` (0: none).
    pub fn get(&self, user: &str) -> u32 {
        match self {
            Presence::One(u, n) => {
                if **u == *user {
                    *n
                } else {
                    0
                }
            }
            Presence::Small(v) => v.binary_search_by(|(u, _)| (**u).cmp(user)).map_or(0, |i| v[i].1),
            Presence::Large(m) => m.get(user).copied().unwrap_or(0),
        }
    }

    /// Users with at least one connection.
    pub fn len(&self) -> usize {
        match self {
            Presence::One(..) => 1,
            Presence::Small(v) => v.len(),
            Presence::Large(m) => m.len(),
        }
    }

    /// True when nobody is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users and their connections, in name order.
    pub fn iter(&self) -> PresenceIter<'_> {
        match self {
            Presence::One(u, n) => PresenceIter::One(Some((u, *n))),
            Presence::Small(v) => PresenceIter::Small(v.iter()),
            Presence::Large(m) => PresenceIter::Large(m.iter()),
        }
    }
}

/// [`Presence::iter`].
#[derive(Clone, Debug)]
pub enum PresenceIter<'a> {
    /// The one user, until taken.
    One(Option<(&'a str, u32)>),
    /// Over the sorted slice.
    Small(std::slice::Iter<'a, (Arc<str>, u32)>),
    /// Over the B-tree.
    Large(std::collections::btree_map::Iter<'a, Arc<str>, u32>),
}

impl<'a> Iterator for PresenceIter<'a> {
    type Item = (&'a str, u32);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            PresenceIter::One(one) => one.take(),
            PresenceIter::Small(i) => i.next().map(|(u, n)| (&**u, *n)),
            PresenceIter::Large(i) => i.next().map(|(u, n)| (&**u, *n)),
        }
    }
}

/// What a history change did, for the shard-wide byte budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freed {
    /// Entries removed.
    pub entries: usize,
    /// Their bytes.
    pub bytes: usize,
}

impl Freed {
    fn add(&mut self, e: &HistoryEntry) {
        self.entries += 1;
        self.bytes += e.frame.len();
    }
}

impl HomeChannel {
    /// A new, empty channel; `limits`: its history bounds' index in the shard's table.
    pub fn new(name: &str, epoch: u64, limits: u32) -> Self {
        Self::named(Arc::from(name), epoch, limits)
    }

    /// A new, empty channel whose name shares an existing allocation (the local channel's, when this
    /// shard also has subscribers of it).
    pub fn named(name: Arc<str>, epoch: u64, limits: u32) -> Self {
        Self {
            name,
            offset: 0,
            epoch,
            history: VecDeque::new(),
            history_bytes: 0,
            limits,
            interested: 0,
            presence: Presence::default(),
            connections: 0,
        }
    }

    /// The epoch as the wire shows it: 16 lowercase hex digits.
    pub fn epoch_str(&self) -> EpochStr {
        EpochStr::new(self.epoch)
    }

    /// Assigns the next offset to `data` and encodes the message frame once; keeps it in history when the
    /// bounds (`limits`, the channel's) allow. Returns the entry, whether it was kept, and what the bounds
    /// dropped to make room.
    pub fn publish(&mut self, data: &[u8], now: u64, limits: &HistoryLimits) -> (HistoryEntry, bool, Freed) {
        self.offset += 1;
        let offset = self.offset;
        let frame = message_frame(&self.name, offset, data);
        let data_start = (frame.len() - 1 - data.len()) as u32;
        let entry = HistoryEntry { offset, at: now, frame, data_start };
        let keep = limits.size > 0 && entry.frame.len() <= limits.bytes;
        let mut freed = Freed::default();
        if keep {
            self.history_bytes += entry.frame.len();
            self.history.push_back(entry.clone());
        } else {
            // History must stay contiguous: no client that missed this message can be recovered any more,
            // so what came before it is of no use.
            while let Some(e) = self.pop_oldest() {
                freed.add(&e);
            }
        }
        let trimmed = self.trim(now, limits);
        freed.entries += trimmed.entries;
        freed.bytes += trimmed.bytes;
        (entry, keep, freed)
    }

    /// Drops history past its count, byte and age bounds (`limits`, the channel's).
    pub fn trim(&mut self, now: u64, limits: &HistoryLimits) -> Freed {
        let mut freed = Freed::default();
        while self.history.len() > limits.size
            || self.history_bytes > limits.bytes
            || self.history.front().is_some_and(|e| now.saturating_sub(e.at) > limits.ttl_ticks)
        {
            let Some(e) = self.pop_oldest() else { break };
            freed.add(&e);
        }
        freed
    }

    /// Removes the oldest history entry (the shard's byte budget evicts through this).
    pub fn pop_oldest(&mut self) -> Option<HistoryEntry> {
        let e = self.history.pop_front()?;
        self.history_bytes -= e.frame.len();
        if self.history.is_empty() && self.history.capacity() > 16 {
            self.history = VecDeque::new();
        }
        Some(e)
    }

    /// Where in `history` the messages after `since` (offset, epoch) start, if every one of them is still
    /// there (history is contiguous: [`HomeChannel::publish`] keeps it so). `None` when they cannot all be
    /// given: another epoch, a position from the future, or messages already dropped.
    pub fn after(&self, (seen, epoch): (u64, &str)) -> Option<usize> {
        if epoch != self.epoch_str().as_str() || seen > self.offset {
            return None;
        }
        if seen == self.offset {
            return Some(self.history.len());
        }
        let first = self.history.front()?.offset;
        (first <= seen + 1).then(|| (seen + 1 - first) as usize)
    }

    /// What a client that last saw `since` (offset, epoch) missed. `None` means no position was given.
    /// `max_bytes` bounds the replay: when the missed frames would take more, nothing is replayed and the
    /// client is told it was not recovered (a replay is never cut short silently). `limits`: the channel's.
    pub fn recover(
        &mut self,
        since: Option<(u64, &str)>,
        now: u64,
        max_bytes: usize,
        limits: &HistoryLimits,
    ) -> (Recovery, Freed) {
        let freed = self.trim(now, limits);
        let not = Recovery { recovered: false, missed: Vec::new() };
        let Some(start) = since.and_then(|s| self.after(s)) else {
            return (not, freed);
        };
        let missed = self.history.range(start..);
        if missed.clone().map(|e| e.frame.len()).sum::<usize>() > max_bytes {
            return (not, freed);
        }
        (Recovery { recovered: true, missed: missed.cloned().collect() }, freed)
    }

    /// Counts a subscribed connection of `user` (presence).
    pub fn join(&mut self, user: &Arc<str>) {
        self.connections += 1;
        self.presence.join(user);
    }

    /// Forgets a subscribed connection of `user`.
    pub fn leave(&mut self, user: &str) {
        self.connections = self.connections.saturating_sub(1);
        self.presence.leave(user);
    }

    /// True when nothing keeps the channel alive: no subscribers anywhere and no history.
    pub fn is_idle(&self) -> bool {
        self.interested == 0 && self.connections == 0 && self.history.is_empty()
    }
}

/// The `message` frame of `data` at `offset` in `name`: encoded once, shared by every delivery.
pub fn message_frame(name: &str, offset: u64, data: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(message::message_len(name, offset, data) + 10);
    let start = frame_with(&mut buf, OpCode::Text, |o| message::encode_message(o, name, offset, data));
    Bytes::from(buf).slice(start..)
}

/// An epoch rendered as 16 lowercase hex digits, without allocating.
#[derive(Clone, Copy, Debug)]
pub struct EpochStr([u8; 16]);

impl EpochStr {
    /// Renders `epoch`.
    pub fn new(epoch: u64) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut b = [0u8; 16];
        for (i, d) in b.iter_mut().enumerate() {
            *d = HEX[(epoch >> (60 - 4 * i) & 0xf) as usize];
        }
        Self(b)
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size: usize, ttl: u64, bytes: usize) -> HistoryLimits {
        HistoryLimits { size, ttl_ticks: ttl, bytes }
    }

    #[test]
    fn publish_encodes_once_and_keeps_history() {
        let l = limits(3, 100, 1 << 20);
        let mut h = HomeChannel::new("chat:1", 1, 0);
        for i in 0..5 {
            let (e, kept, _) = h.publish(format!("{{\"n\":{i}}}").as_bytes(), 10, &l);
            assert!(kept);
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
        assert_eq!(h.history_bytes, h.history.iter().map(|e| e.frame.len()).sum::<usize>());
    }

    #[test]
    fn history_bytes_bound_drops_oldest_first() {
        let l = limits(100, 1000, 300);
        let mut h = HomeChannel::new("c", 1, 0);
        let data = vec![b'1'; 90];
        let mut freed = Freed::default();
        for _ in 0..5 {
            let (_, kept, f) = h.publish(&data, 0, &l);
            assert!(kept);
            freed.entries += f.entries;
            freed.bytes += f.bytes;
        }
        // Frames are ~120 bytes: two fit in 300.
        assert_eq!(h.history.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![4, 5]);
        assert!(h.history_bytes <= 300);
        assert_eq!(freed.entries, 3);
        // A message larger than the whole bound is not kept, and what came before it is dropped: nobody
        // who missed it can be recovered, and history stays contiguous.
        let (_, kept, f) = h.publish(&[b'2'; 400], 0, &l);
        assert!(!kept);
        assert_eq!(f.entries, 2);
        assert!(h.history.is_empty() && h.history_bytes == 0);
        let epoch = h.epoch_str();
        let (r, _) = h.recover(Some((5, epoch.as_str())), 0, usize::MAX, &l);
        assert!(!r.recovered, "offset 6 is not in history");
        let (r, _) = h.recover(Some((6, epoch.as_str())), 0, usize::MAX, &l);
        assert!(r.recovered && r.missed.is_empty(), "nothing was missed after 6");
        h.publish(&data, 0, &l);
        let (r, _) = h.recover(Some((6, epoch.as_str())), 0, usize::MAX, &l);
        assert_eq!(r.missed.iter().map(|e| e.offset).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn recovery_rules() {
        let l = limits(3, 100, 1 << 20);
        let mut h = HomeChannel::new("c", 0xe1, 0);
        let e = h.epoch_str();
        let e = e.as_str();
        assert_eq!(e, "00000000000000e1");
        for _ in 0..5 {
            h.publish(b"1", 0, &l);
        }
        // History holds 3..=5.
        let (r, _) = h.recover(Some((2, e)), 0, usize::MAX, &l);
        assert!(r.recovered);
        assert_eq!(r.missed.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
        let (r, _) = h.recover(Some((4, e)), 0, usize::MAX, &l);
        assert_eq!(r.missed.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![5]);
        assert!(h.recover(Some((5, e)), 0, usize::MAX, &l).0.recovered);
        assert!(!h.recover(Some((1, e)), 0, usize::MAX, &l).0.recovered, "offset 2 was evicted");
        assert!(!h.recover(Some((4, "other")), 0, usize::MAX, &l).0.recovered, "epoch changed");
        assert!(!h.recover(Some((9, e)), 0, usize::MAX, &l).0.recovered, "position from the future");
        assert!(!h.recover(None, 0, usize::MAX, &l).0.recovered);
        // A replay larger than the reply bound is refused whole, not cut.
        let one = h.history[0].frame.len();
        let (r, _) = h.recover(Some((2, e)), 0, 3 * one - 1, &l);
        assert!(!r.recovered && r.missed.is_empty());
        // Age bound: everything older than 100 ticks is gone.
        let (r, freed) = h.recover(Some((4, e)), 1000, usize::MAX, &l);
        assert!(!r.recovered);
        assert_eq!(freed.entries, 3);
        assert!(h.history.is_empty());
        assert_eq!(h.history_bytes, 0);
    }

    #[test]
    fn presence_counts_and_is_ordered() {
        let mut h = HomeChannel::new("c", 1, 0);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        h.join(&b);
        h.join(&a);
        h.join(&a);
        assert_eq!((h.connections, h.presence.len(), h.presence.get("a")), (3, 2, 2));
        assert_eq!(h.presence.iter().map(|(u, _)| u).collect::<Vec<_>>(), ["a", "b"]);
        h.leave("a");
        h.leave("b");
        assert_eq!((h.connections, h.presence.len(), h.presence.get("a")), (1, 1, 1));
    }

    /// The sorted vector and the B-tree it turns into past `SMALL` users give the same answers, in name
    /// order; a vector holds exactly its users.
    #[test]
    fn presence_small_then_large() {
        let mut p = Presence::default();
        let users: Vec<Arc<str>> = (0..40).rev().map(|i| Arc::from(format!("u{i:02}"))).collect();
        for (k, u) in users.iter().enumerate() {
            p.join(u);
            p.join(u);
            assert_eq!(p.len(), k + 1);
            assert_eq!(matches!(p, Presence::One(..)), k == 0, "after {} users", k + 1);
            assert_eq!(matches!(p, Presence::Small(_)), (1..Presence::SMALL).contains(&k), "after {} users", k + 1);
            let names: Vec<&str> = p.iter().map(|(u, _)| u).collect();
            assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        }
        for u in &users[..30] {
            p.leave(u);
            assert_eq!(p.get(u), 1);
            p.leave(u);
            assert_eq!(p.get(u), 0);
            p.leave(u);
        }
        assert_eq!(p.iter().map(|(u, n)| (u.to_string(), n)).collect::<Vec<_>>().len(), 10);
        let mut q = Presence::default();
        q.join(&"x".into());
        q.join(&"y".into());
        q.leave("x");
        assert!(matches!(&q, Presence::One(u, 1) if &**u == "y"), "one user left is held in place");
        q.join(&"a".into());
        q.join(&"a".into());
        assert_eq!(q.iter().collect::<Vec<_>>(), [("a", 2), ("y", 1)]);
        q.leave("a");
        q.leave("a");
        q.leave("y");
        assert!(q.is_empty());
        assert!(matches!(&q, Presence::Small(v) if v.is_empty()), "an empty table holds no allocation");
    }
}
