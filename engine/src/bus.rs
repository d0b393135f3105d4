//! The inter-shard bus: one bounded crossbeam ring into each shard, and the stated policy for a full ring.
//!
//! A published frame crosses to another shard as one message holding one `Bytes` pointer, whatever the
//! number of subscribers there. The receiving shard's inbox task is woken through its waker only when it is
//! actually waiting (a flag checked after the push), so a busy shard is never signalled.
//!
//! # When a ring is full
//! 1. The message goes to the sender's overflow queue for that destination (same capacity as the ring) and
//!    is retried, in order, on the sender's next turns. Nothing is lost; order per destination is kept.
//! 2. When the overflow queue is full too, the destination is not keeping up: a `Deliver` is dropped and
//!    counted (`throng_ring_dropped_total`), and the dropped offset range is remembered per channel; as soon
//!    as there is room again the destination gets a `Lost` message, and every local subscriber of the
//!    channel a `gap` marker telling it to recover from history. Requests from clients (publish, subscribe,
//!    presence, history) are refused at once with an `overloaded` error reply instead. Bookkeeping messages
//!    (unsubscribe, presence changes) are always queued, so presence never drifts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::conn::ConnKey;

/// Who to answer: a connection on a shard, and the command's `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The shard the connection lives on.
    pub shard: u16,
    /// The connection.
    pub conn: ConnKey,
    /// The command's `id`, echoed in the reply.
    pub id: Option<u64>,
}

/// A message between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// Home -> a shard with subscribers: a published message, already a complete frame.
    Deliver {
        /// Channel name.
        channel: Arc<str>,
        /// Its offset.
        offset: u64,
        /// The frame, shared.
        frame: Bytes,
    },
    /// Home -> a shard: deliveries with offsets `from..=to` were dropped for it (ring overflow).
    Lost {
        /// Channel name.
        channel: Arc<str>,
        /// First dropped offset.
        from: u64,
        /// Last dropped offset.
        to: u64,
    },
    /// A shard -> the home: publish `data` (raw JSON) to `channel`.
    Publish {
        /// Channel name.
        channel: Box<str>,
        /// Raw JSON data.
        data: Bytes,
        /// Whom to send `published` to, if anyone.
        reply: Option<ReplyTo>,
    },
    /// A shard -> the home: a connection subscribes (and maybe recovers from `since`).
    Subscribe {
        /// Channel name.
        channel: Box<str>,
        /// The subscriber.
        reply: ReplyTo,
        /// The client's last seen position (offset, epoch).
        since: Option<(u64, Box<str>)>,
        /// The user, when the namespace tracks presence.
        user: Option<Box<str>>,
    },
    /// Home -> the subscriber's shard: the subscription is in place from `offset` on.
    Subscribed {
        /// Channel name.
        channel: Arc<str>,
        /// The subscriber.
        reply: ReplyTo,
        /// The channel's current offset.
        offset: u64,
        /// The encoded `subscribed` reply frame.
        frame: Bytes,
        /// Missed messages to replay after it.
        missed: Vec<Bytes>,
        /// The user counted in presence (echoed from the request), to take back if the subscriber left.
        user: Option<Box<str>>,
    },
    /// A shard -> the home: a connection left the channel (unsubscribe or disconnect).
    Unsubscribe {
        /// Channel name.
        channel: Box<str>,
        /// The shard it left from.
        shard: u16,
        /// The user, when the namespace tracks presence.
        user: Option<Box<str>>,
        /// The shard has no subscribers left: stop sending it messages.
        last: bool,
    },
    /// A shard -> the home: presence query.
    Presence {
        /// Channel name.
        channel: Box<str>,
        /// Whom to answer.
        reply: ReplyTo,
    },
    /// A shard -> the home: history query.
    History {
        /// Channel name.
        channel: Box<str>,
        /// Whom to answer.
        reply: ReplyTo,
        /// The client's position, to say whether the returned messages cover everything since.
        since: Option<(u64, Box<str>)>,
        /// Most messages to return.
        limit: u32,
    },
    /// Any shard -> a connection's shard: an encoded frame for that connection.
    Reply {
        /// The connection.
        conn: ConnKey,
        /// The frame.
        frame: Bytes,
    },
}

/// A shard's inbound ring and the means to wake its inbox task.
#[derive(Debug)]
pub struct Inbox {
    /// Producers: every other shard.
    pub tx: Sender<ShardMsg>,
    /// The consumer: this shard's inbox task.
    pub rx: Receiver<ShardMsg>,
    /// The inbox task's waker, registered before it waits.
    pub waker: AtomicWaker,
    /// True while the inbox task waits: senders wake it only then.
    pub waiting: AtomicBool,
    /// Deliveries dropped on their way to this shard (ring and overflow full).
    pub dropped: AtomicU64,
}

impl Inbox {
    /// A ring of `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Self { tx, rx, waker: AtomicWaker::new(), waiting: AtomicBool::new(false), dropped: AtomicU64::new(0) }
    }

    /// Wakes the inbox task if it is waiting; costs one load when it is not.
    pub fn notify(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

/// What became of a message handed to [`Outbox::send`].
#[derive(Debug)]
pub enum Sent {
    /// In the ring or the overflow queue.
    Queued,
    /// Refused: the destination is overloaded. Holds the request so the caller can answer its client.
    Refused(ShardMsg),
}

/// A shard's sending side: overflow queues and dropped ranges per destination.
#[derive(Debug)]
pub struct Outbox {
    /// Every shard's inbox, indexed by shard id.
    pub inboxes: Arc<[Inbox]>,
    /// Messages waiting for room in each destination's ring, in order.
    overflow: Vec<VecDeque<ShardMsg>>,
    /// Per destination: channel -> dropped offset range not yet reported.
    lost: Vec<HashMap<Arc<str>, (u64, u64)>>,
    /// Bound of each overflow queue.
    cap: usize,
}

impl Outbox {
    /// The outbox of one shard; `cap` bounds each overflow queue.
    pub fn new(inboxes: Arc<[Inbox]>, cap: usize) -> Self {
        let n = inboxes.len();
        Self {
            inboxes,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            lost: (0..n).map(|_| HashMap::new()).collect(),
            cap,
        }
    }

    /// True when nothing waits in any overflow queue.
    pub fn is_idle(&self) -> bool {
        self.overflow.iter().all(VecDeque::is_empty) && self.lost.iter().all(HashMap::is_empty)
    }

    /// Sends `msg` to shard `dest` following the full-ring policy of the module docs.
    pub fn send(&mut self, dest: usize, msg: ShardMsg) -> Sent {
        if self.overflow[dest].is_empty() {
            match self.inboxes[dest].tx.try_send(msg) {
                Ok(()) => {
                    self.inboxes[dest].notify();
                    return Sent::Queued;
                }
                Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => return self.overflow(dest, m),
            }
        }
        self.overflow(dest, msg)
    }

    fn overflow(&mut self, dest: usize, msg: ShardMsg) -> Sent {
        if self.overflow[dest].len() < self.cap {
            self.overflow[dest].push_back(msg);
            return Sent::Queued;
        }
        match msg {
            ShardMsg::Deliver { channel, offset, .. } => {
                self.inboxes[dest].dropped.fetch_add(1, Ordering::Relaxed);
                let r = self.lost[dest].entry(channel).or_insert((offset, offset));
                r.0 = r.0.min(offset);
                r.1 = r.1.max(offset);
                Sent::Queued
            }
            m @ (ShardMsg::Publish { .. }
            | ShardMsg::Subscribe { .. }
            | ShardMsg::Presence { .. }
            | ShardMsg::History { .. }) => Sent::Refused(m),
            other => {
                self.overflow[dest].push_back(other);
                Sent::Queued
            }
        }
    }

    /// Moves overflowed messages into the rings while there is room, then reports dropped ranges.
    pub fn drain(&mut self) {
        for dest in 0..self.overflow.len() {
            let mut sent = false;
            for round in 0..2 {
                while let Some(m) = self.overflow[dest].pop_front() {
                    match self.inboxes[dest].tx.try_send(m) {
                        Ok(()) => sent = true,
                        Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => {
                            self.overflow[dest].push_front(m);
                            break;
                        }
                    }
                }
                // Once the backlog is down to half, report what was dropped (behind what was queued).
                if round == 0 && self.overflow[dest].len() < self.cap / 2 && !self.lost[dest].is_empty() {
                    for (channel, (from, to)) in self.lost[dest].drain() {
                        self.overflow[dest].push_back(ShardMsg::Lost { channel, from, to });
                    }
                } else {
                    break;
                }
            }
            if sent {
                self.inboxes[dest].notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(offset: u64) -> ShardMsg {
        ShardMsg::Deliver { channel: Arc::from("c"), offset, frame: Bytes::from_static(b"x") }
    }

    fn offsets(rx: &Receiver<ShardMsg>) -> Vec<String> {
        rx.try_iter()
            .map(|m| match m {
                ShardMsg::Deliver { offset, .. } => offset.to_string(),
                ShardMsg::Lost { from, to, .. } => format!("lost {from}-{to}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn full_ring_overflows_in_order_then_drops_with_a_lost_report() {
        let inboxes: Arc<[Inbox]> = vec![Inbox::new(2), Inbox::new(2)].into();
        let mut out = Outbox::new(inboxes.clone(), 3);
        for off in 1..=8 {
            assert!(matches!(out.send(1, deliver(off)), Sent::Queued));
        }
        // Ring holds 1,2; overflow 3,4,5; 6..8 dropped.
        assert_eq!(inboxes[1].dropped.load(Ordering::Relaxed), 3);
        let refused = out.send(1, ShardMsg::Presence { channel: "c".into(), reply: reply() });
        assert!(matches!(refused, Sent::Refused(ShardMsg::Presence { .. })), "requests are refused, not dropped");
        assert_eq!(offsets(&inboxes[1].rx), ["1", "2"]);
        out.drain();
        assert_eq!(offsets(&inboxes[1].rx), ["3", "4"]);
        out.drain();
        // Overflow now below half: the lost range is reported, in order after what was queued.
        assert_eq!(offsets(&inboxes[1].rx), ["5", "lost 6-8"]);
        out.drain();
        assert!(out.is_idle());
        assert!(matches!(out.send(1, deliver(9)), Sent::Queued));
        assert_eq!(offsets(&inboxes[1].rx), ["9"]);
    }

    #[test]
    fn bookkeeping_is_never_dropped() {
        let inboxes: Arc<[Inbox]> = vec![Inbox::new(2)].into();
        let mut out = Outbox::new(inboxes.clone(), 1);
        for _ in 0..5 {
            let m = ShardMsg::Unsubscribe { channel: "c".into(), shard: 0, user: None, last: false };
            assert!(matches!(out.send(0, m), Sent::Queued));
        }
        let mut n = 0;
        for _ in 0..5 {
            n += inboxes[0].rx.try_iter().count();
            out.drain();
        }
        assert_eq!(n, 5);
    }

    fn reply() -> ReplyTo {
        ReplyTo { shard: 0, conn: ConnKey { idx: 0, gen: 1 }, id: None }
    }
}
