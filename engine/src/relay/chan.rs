//! A channel as the relay follows it: which shards of this node want it, how far its delivery has got
//! (offset and epoch), and what waits while a read from Redis is in flight. Plain data, no IO: the relay
//! loop feeds it pushes, subscribe requests and read results, and carries out the [`Action`]s it returns.
//!
//! # Order and gaps
//! Redis assigns offsets in a script, and the same script publishes, so pub/sub brings a channel's messages
//! in offset order. A message is delivered only when it is the next offset (`last + 1`); an older one is a
//! duplicate and dropped; a newer one means messages were missed (a reconnect, a subscription that started
//! late): the channel reads the stream from `last` and holds what arrives meanwhile. The read fills the gap
//! in order; what the stream no longer has (trimmed, expired) becomes a `Lost` range, which the shards turn
//! into `gap` markers so subscribers recover. A new epoch (Redis lost the channel) resets the shards to offset
//! 0 (a `gap` for every subscriber) and reads the new incarnation's history from its start.
//!
//! # Positioning subscribers
//! While the channel is live, a subscriber without a position (or already up to date) is answered at once
//! at `last`. One with an older position needs the stream: it waits for a read (pushes are held meanwhile,
//! so `last` cannot move under it), is positioned at `last` after the read, and gets the messages between.

use std::collections::VecDeque;

use bytes::Bytes;

use super::store::{Pushed, Read};
use crate::channel::bus::ReplyTo;
use crate::channel::home::EpochStr;

/// Most pushes held while a read is in flight; past it they are dropped and the read's fill covers them.
pub const MAX_HELD: usize = 10_000;

/// A subscribe request waiting for the channel's position.
#[derive(Debug)]
pub struct SubReq {
    /// The subscriber.
    pub reply: ReplyTo,
    /// Its last seen position (offset, epoch).
    pub since: Option<(u64, Box<str>)>,
    /// The user to count in presence (the connection's identity's, shared).
    pub user: Option<std::sync::Arc<str>>,
}

/// Where the channel stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Subscribed (or about to be) in Redis; the position is not known yet.
    Joining,
    /// Every pushed message is delivered in offset order.
    Live,
    /// A read from Redis is in flight: pushes are held.
    Reading,
}

/// What the relay loop must do.
#[derive(Debug)]
pub enum Action {
    /// Deliver a message to every interested shard.
    Deliver {
        /// Offset.
        offset: u64,
        /// Raw JSON data.
        data: Bytes,
        /// When it arrived ([`crate::metrics::stamp`]); 0 for messages read from the stream.
        born: u64,
    },
    /// Offsets `from..=to` can no longer be delivered: every interested shard marks a gap.
    Lost {
        /// First.
        from: u64,
        /// Last.
        to: u64,
    },
    /// The channel's offsets started again under a new epoch, now at `offset`.
    Reset {
        /// The new position.
        offset: u64,
    },
    /// Answer a subscriber.
    Answer {
        /// The request.
        req: SubReq,
        /// Where it is positioned.
        position: u64,
        /// The channel's epoch.
        epoch: u64,
        /// Whether every message after its `since` follows (`missed`).
        recovered: bool,
        /// The messages it missed, oldest first.
        missed: Vec<(u64, Bytes)>,
    },
    /// Read the channel from Redis: position and epoch, and the stream after `from` (`None`: none).
    Read {
        /// Entries after this offset.
        from: Option<u64>,
    },
}

/// Bounds a recovery works within.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryBounds {
    /// Age bound of history (ms).
    pub ttl_ms: u64,
    /// Most bytes of data one replay carries.
    pub max_bytes: usize,
}

/// A channel followed by the relay.
#[derive(Debug)]
pub struct Chan {
    /// Distinguishes this incarnation of the entry from a later one of the same name (an answer from Redis
    /// for an entry that was dropped meanwhile is ignored).
    pub id: u64,
    /// Bit `i`: shard `i` has subscribers (or pending ones).
    pub shards: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Offset of the last message delivered to the shards.
    pub last: u64,
    /// The epoch of `last`.
    pub epoch: u64,
    /// `last` and `epoch` come from Redis (false until the first read).
    pub known: bool,
    /// Pushes that arrived during a read (with their arrival stamps).
    pub held: VecDeque<(Pushed, u64)>,
    /// Subscribe requests waiting for a read.
    pub waiting: Vec<SubReq>,
    /// The offset the read in flight started after (`None`: position only).
    pub reading_from: Option<u64>,
}

impl Chan {
    /// A channel being joined.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            shards: 0,
            phase: Phase::Joining,
            last: 0,
            epoch: 0,
            known: false,
            held: VecDeque::new(),
            waiting: Vec::new(),
            reading_from: None,
        }
    }

    /// True when nothing on this node wants the channel any more.
    pub fn unused(&self) -> bool {
        self.shards == 0 && self.waiting.is_empty()
    }

    /// The oldest position a waiting subscriber of the current epoch needs, if any.
    fn wanted_from(&self) -> Option<u64> {
        let epoch = EpochStr::new(self.epoch);
        let mut from =
            self.waiting.iter().filter_map(|r| r.since.as_ref()).filter(|(_, e)| !self.known || **e == *epoch.as_str());
        let min = from.by_ref().map(|(o, _)| *o).min();
        match (min, self.known) {
            (Some(m), true) => Some(m.min(self.last)),
            (Some(m), false) => Some(m),
            (None, true) => Some(self.last),
            (None, false) => None,
        }
    }

    /// The subscription is in place in Redis: read the position (and what subscribers or a gap need).
    pub fn joined(&mut self, out: &mut Vec<Action>) {
        self.start_read(out);
    }

    fn start_read(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::Reading;
        self.reading_from = self.wanted_from();
        out.push(Action::Read { from: self.reading_from });
    }

    /// Forgets the position's source: after a reconnect the channel is joined again (its `last` kept, so
    /// the read fills what was missed).
    pub fn rejoin(&mut self) {
        self.phase = Phase::Joining;
    }

    /// A subscribe request.
    pub fn subscribe(&mut self, req: SubReq, out: &mut Vec<Action>) {
        if self.phase != Phase::Live {
            self.waiting.push(req);
            return;
        }
        let epoch = EpochStr::new(self.epoch);
        match &req.since {
            None => out.push(self.answer_now(req, false)),
            Some((o, e)) if *o == self.last && **e == *epoch.as_str() => out.push(self.answer_now(req, true)),
            // Another epoch, or a position from the future: nothing can be recovered.
            Some((o, e)) if **e != *epoch.as_str() || *o > self.last => out.push(self.answer_now(req, false)),
            Some(_) => {
                self.waiting.push(req);
                self.start_read(out);
            }
        }
    }

    fn answer_now(&self, req: SubReq, recovered: bool) -> Action {
        Action::Answer { req, position: self.last, epoch: self.epoch, recovered, missed: Vec::new() }
    }

    /// A message from pub/sub.
    pub fn push(&mut self, p: Pushed, born: u64, out: &mut Vec<Action>) {
        if self.phase != Phase::Live {
            if self.held.len() >= MAX_HELD {
                // The read in flight (or the one after it) covers them from the stream.
                self.held.clear();
            }
            self.held.push_back((p, born));
            return;
        }
        if p.epoch != self.epoch || p.offset > self.last + 1 {
            // Missed messages, or a new incarnation of the channel: read the stream first.
            self.held.push_back((p, born));
            self.start_read(out);
        } else if p.offset == self.last + 1 {
            self.last = p.offset;
            out.push(Action::Deliver { offset: p.offset, data: p.data, born });
        }
        // Older: a duplicate (a message the last read already delivered).
    }

    /// The read answered: fill what was missed, answer the subscribers it covers, then deliver what was
    /// held (which may start another read).
    pub fn read_done(&mut self, read: Read, bounds: RecoveryBounds, out: &mut Vec<Action>) {
        let epoch = read.epoch.unwrap_or(self.epoch);
        if !self.known {
            (self.last, self.epoch, self.known) = (read.offset, epoch, true);
        } else if epoch != self.epoch {
            // A new incarnation: the shards start it over at 0, and what its history holds follows, read
            // from its start (subscribers and pushes keep waiting for that read).
            (self.last, self.epoch) = (0, epoch);
            out.push(Action::Reset { offset: 0 });
            if read.offset > 0 {
                self.reading_from = Some(0);
                out.push(Action::Read { from: Some(0) });
                return;
            }
        } else if read.offset > self.last {
            let mut next = self.last + 1;
            let last = self.last;
            for e in read.entries.iter().filter(|e| e.offset > last && e.offset <= read.offset) {
                if e.offset < next {
                    continue;
                }
                if e.offset > next {
                    out.push(Action::Lost { from: next, to: e.offset - 1 });
                }
                out.push(Action::Deliver { offset: e.offset, data: e.data.clone(), born: 0 });
                next = e.offset + 1;
            }
            if next <= read.offset {
                out.push(Action::Lost { from: next, to: read.offset });
            }
            self.last = read.offset;
        }
        self.phase = Phase::Live;
        let from = self.reading_from.take();
        let epoch_str = EpochStr::new(self.epoch);
        let mut still = Vec::new();
        for req in std::mem::take(&mut self.waiting) {
            let Some((o, e)) = req.since.as_ref().map(|(o, e)| (*o, &**e)) else {
                out.push(self.answer_now(req, false));
                continue;
            };
            if e != epoch_str.as_str() || o > self.last {
                out.push(self.answer_now(req, false));
            } else if o == self.last {
                out.push(self.answer_now(req, true));
            } else if from.is_none_or(|f| o < f) {
                // Arrived during the read, from further back than it went: another read.
                still.push(req);
            } else {
                let missed = recover(&read, o, self.last, bounds);
                let recovered = missed.is_some();
                let (position, epoch) = (self.last, self.epoch);
                out.push(Action::Answer { req, position, epoch, recovered, missed: missed.unwrap_or_default() });
            }
        }
        self.waiting = still;
        let mut held = std::mem::take(&mut self.held);
        while let Some((p, born)) = held.pop_front() {
            self.push(p, born, out);
            if self.phase != Phase::Live {
                self.held.extend(held);
                return;
            }
        }
        if !self.waiting.is_empty() {
            self.start_read(out);
        }
    }
}

/// The messages after `since` up to `to` from a read, if the read has every one of them, within the age
/// and size bounds.
fn recover(read: &Read, since: u64, to: u64, b: RecoveryBounds) -> Option<Vec<(u64, Bytes)>> {
    let mut missed = Vec::new();
    let (mut next, mut bytes) = (since + 1, 0usize);
    for e in read.entries.iter().filter(|e| e.offset > since && e.offset <= to) {
        if e.offset != next || e.at_ms + b.ttl_ms < read.now_ms {
            return None;
        }
        bytes += e.data.len();
        if bytes > b.max_bytes {
            return None;
        }
        missed.push((e.offset, e.data.clone()));
        next += 1;
    }
    (next == to + 1).then_some(missed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::bus::ReplyTo;
    use crate::conn::ConnKey;
    use crate::relay::store::Entry;

    const E: u64 = 0xe;
    const B: RecoveryBounds = RecoveryBounds { ttl_ms: 1000, max_bytes: 1 << 20 };

    fn pushed(offset: u64) -> Pushed {
        Pushed { offset, epoch: E, data: Bytes::from(offset.to_string()) }
    }

    fn read(offset: u64, entries: &[u64]) -> Read {
        let entries =
            entries.iter().map(|&o| Entry { offset: o, at_ms: 5000, data: Bytes::from(o.to_string()) }).collect();
        Read { offset, epoch: Some(E), now_ms: 5000, entries }
    }

    fn req(since: Option<u64>) -> SubReq {
        let reply = ReplyTo { shard: 0, conn: ConnKey { idx: 1, gen: 1 }, id: None };
        let epoch = EpochStr::new(E);
        SubReq { reply, since: since.map(|o| (o, epoch.as_str().into())), user: None }
    }

    /// What the actions say, in order, as short strings.
    fn show(out: &mut Vec<Action>) -> Vec<String> {
        out.drain(..)
            .map(|a| match a {
                Action::Deliver { offset, .. } => format!("d{offset}"),
                Action::Lost { from, to } => format!("lost{from}-{to}"),
                Action::Reset { offset } => format!("reset{offset}"),
                Action::Read { from } => format!("read{from:?}"),
                Action::Answer { position, recovered, missed, .. } => {
                    let m: Vec<u64> = missed.iter().map(|(o, _)| *o).collect();
                    format!("at{position}{}{m:?}", if recovered { "+" } else { "-" })
                }
            })
            .collect()
    }

    fn live(last: u64) -> Chan {
        let mut c = Chan::new(1);
        let mut out = Vec::new();
        c.joined(&mut out);
        c.read_done(read(last, &[]), B, &mut out);
        c
    }

    #[test]
    fn joining_positions_waiting_subscribers_and_drops_duplicates_held_meanwhile() {
        let mut c = Chan::new(1);
        let mut out = Vec::new();
        c.subscribe(req(None), &mut out);
        c.subscribe(req(Some(3)), &mut out);
        assert!(out.is_empty(), "nothing is answered before the position is known");
        c.joined(&mut out);
        assert_eq!(show(&mut out), ["readSome(3)"]);
        // Pushes during the read: 5 is covered by the read, 6 is not.
        c.push(pushed(5), 0, &mut out);
        c.push(pushed(6), 0, &mut out);
        c.read_done(read(5, &[4, 5]), B, &mut out);
        assert_eq!(show(&mut out), ["at5-[]", "at5+[4, 5]", "d6"]);
        assert_eq!((c.phase, c.last), (Phase::Live, 6));
    }

    #[test]
    fn live_delivery_in_order_fills_gaps_from_the_stream() {
        let mut c = live(10);
        let mut out = Vec::new();
        c.push(pushed(11), 0, &mut out);
        c.push(pushed(11), 0, &mut out);
        assert_eq!(show(&mut out), ["d11"], "a duplicate is dropped");
        c.push(pushed(14), 0, &mut out);
        assert_eq!(show(&mut out), ["readSome(11)"]);
        c.push(pushed(15), 0, &mut out);
        // The stream no longer has 12 (trimmed) but has 13 and 14.
        c.read_done(read(14, &[13, 14]), B, &mut out);
        assert_eq!(show(&mut out), ["lost12-12", "d13", "d14", "d15"]);
        assert_eq!(c.last, 15);
    }

    #[test]
    fn a_stream_that_ends_early_reports_the_rest_lost() {
        let mut c = live(1);
        let mut out = Vec::new();
        c.push(pushed(9), 0, &mut out);
        c.read_done(read(9, &[2, 3]), B, &mut out);
        assert_eq!(show(&mut out), ["readSome(1)", "d2", "d3", "lost4-9"]);
        assert_eq!(c.last, 9);
    }

    #[test]
    fn a_new_epoch_resets() {
        let mut c = live(7);
        let mut out = Vec::new();
        c.push(Pushed { offset: 1, epoch: 0xf, data: Bytes::new() }, 0, &mut out);
        let r = Read { offset: 1, epoch: Some(0xf), now_ms: 0, entries: Vec::new() };
        c.read_done(r, B, &mut out);
        // Started over at 0, and the new incarnation's history is read from its start.
        assert_eq!(show(&mut out), ["readSome(7)", "reset0", "readSome(0)"]);
        assert_eq!((c.last, c.epoch, c.phase), (0, 0xf, Phase::Reading));
        c.push(Pushed { offset: 2, epoch: 0xf, data: Bytes::new() }, 0, &mut out);
        let entry = Entry { offset: 1, at_ms: 0, data: Bytes::new() };
        c.read_done(Read { offset: 1, epoch: Some(0xf), now_ms: 0, entries: vec![entry] }, B, &mut out);
        assert_eq!(show(&mut out), ["d1", "d2"]);
        assert_eq!(c.last, 2);
    }

    #[test]
    fn live_subscribers_are_answered_at_once_or_after_a_read() {
        let mut c = live(20);
        let mut out = Vec::new();
        c.subscribe(req(None), &mut out);
        c.subscribe(req(Some(20)), &mut out);
        c.subscribe(req(Some(25)), &mut out);
        let mut other = req(Some(3));
        other.since = Some((3, "0000000000000001".into()));
        c.subscribe(other, &mut out);
        assert_eq!(show(&mut out), ["at20-[]", "at20+[]", "at20-[]", "at20-[]"]);
        c.subscribe(req(Some(17)), &mut out);
        assert_eq!(show(&mut out), ["readSome(17)"]);
        // Meanwhile 21 is published and held; a subscriber from further back waits for another read.
        c.push(pushed(21), 0, &mut out);
        c.subscribe(req(Some(15)), &mut out);
        c.read_done(read(21, &[18, 19, 20, 21]), B, &mut out);
        assert_eq!(show(&mut out), ["d21", "at21+[18, 19, 20, 21]", "readSome(15)"]);
        c.read_done(read(21, &[16, 17, 18, 19, 20, 21]), B, &mut out);
        assert_eq!(show(&mut out), ["at21+[16, 17, 18, 19, 20, 21]"]);
    }

    #[test]
    fn recovery_needs_every_message_young_and_within_the_reply_bound() {
        let mut c = live(5);
        let mut out = Vec::new();
        c.subscribe(req(Some(2)), &mut out);
        c.read_done(read(5, &[3, 5]), B, &mut out);
        assert_eq!(show(&mut out), ["readSome(2)", "at5-[]"], "4 is missing");
        c.subscribe(req(Some(2)), &mut out);
        let mut r = read(5, &[3, 4, 5]);
        r.entries[0].at_ms = 1000;
        c.read_done(r, B, &mut out);
        assert_eq!(show(&mut out), ["readSome(2)", "at5-[]"], "3 is older than the ttl");
        c.subscribe(req(Some(2)), &mut out);
        c.read_done(read(5, &[3, 4, 5]), RecoveryBounds { ttl_ms: 1000, max_bytes: 2 }, &mut out);
        assert_eq!(show(&mut out), ["readSome(2)", "at5-[]"], "over the reply bound");
    }

    #[test]
    fn held_pushes_are_bounded() {
        let mut c = Chan::new(1);
        let mut out = Vec::new();
        for o in 1..=(MAX_HELD as u64 + 5) {
            c.push(pushed(o), 0, &mut out);
        }
        assert!(c.held.len() <= MAX_HELD);
        c.joined(&mut out);
        c.read_done(read(MAX_HELD as u64 + 5, &[]), B, &mut out);
        assert_eq!(show(&mut out), ["readNone"]);
        assert_eq!(c.last, MAX_HELD as u64 + 5);
    }
}
