//! The inter-shard bus: one bounded crossbeam ring into each shard, and the stated policy for a full ring.
//!
//! A published frame crosses to another shard as one message holding one `Bytes` pointer, whatever the
//! number of subscribers there. The receiving shard is woken through its doorbell (an eventfd in its epoll
//! set) only when it is parked (a flag checked after the push), so a busy shard is never signalled.
//!
//! # Bounds
//! Toward each destination, at most `ring_capacity` messages sit in its ring, at most as many in the
//! sender's overflow queue, and at most `max_queue_bytes` bytes in the two together (each message weighs
//! its payload, names and frames plus its own size, [`ShardMsg::weight`]). Replays and replies carrying
//! history are bounded by the reply bound, so one message cannot take the whole budget.
//!
//! # When a ring is full
//! 1. The message goes to the sender's overflow queue for that destination and is retried, in order, on the
//!    sender's next turns. Nothing is lost; order per destination is kept.
//! 2. When the overflow queue is full too (in messages or bytes), the destination is not keeping up: a
//!    `Deliver` is dropped and counted (`throng_ring_dropped_total`), and the dropped offset range is
//!    remembered per channel; as soon as there is room again the destination gets a `Lost` message, and
//!    every local subscriber of the channel a `gap` marker (in the channel's log, after the frames before
//!    it) telling it to recover from history. Requests from clients (publish, subscribe, presence,
//!    history) are refused at once with an `overloaded` error reply instead, and so are the backend API's
//!    requests ([`super::api::ApiMsg::is_request`]: answered 503 or, in a batch, per message). Bookkeeping messages
//!    (unsubscribe, presence changes, answers) are always queued: they are small and their number is bounded
//!    by the connections and subscriptions that cause them, so presence never drifts.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

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
        /// When the publish arrived ([`crate::metrics::stamp`]), for the delivery latency.
        born: u64,
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
        /// When the publish arrived ([`crate::metrics::stamp`]): the origin of its deliveries' latency.
        born: u64,
    },
    /// A shard -> the home: a connection subscribes (and maybe recovers from `since`).
    Subscribe {
        /// Channel name.
        channel: Box<str>,
        /// The subscriber.
        reply: ReplyTo,
        /// The client's last seen position (offset, epoch).
        since: Option<(u64, Box<str>)>,
        /// The user, when the namespace tracks presence (the connection's identity's, shared).
        user: Option<Arc<str>>,
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
        user: Option<Arc<str>>,
    },
    /// A shard -> the home: a connection left the channel (unsubscribe or disconnect).
    Unsubscribe {
        /// Channel name.
        channel: Box<str>,
        /// The shard it left from.
        shard: u16,
        /// The user, when the namespace tracks presence (the connection's identity's, shared).
        user: Option<Arc<str>>,
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
    /// Home -> a connection's shard: a request was refused by a bound at the home (a publish or subscribe
    /// that would create a channel past `max_channels`). The connection gets an `error` reply and a strike;
    /// a refused subscription is undone.
    Refused {
        /// Channel name.
        channel: Arc<str>,
        /// Whom to answer.
        reply: ReplyTo,
        /// Whether the request was a subscribe (its pending local subscription must be undone).
        subscribe: bool,
        /// The error code.
        code: &'static str,
        /// The reason.
        reason: &'static str,
    },
    /// The backend HTTP API's requests and answers ([`super::api`]).
    Api(super::api::ApiMsg),
    /// The relay -> a shard with subscribers: the channel's offsets started again under a new epoch (Redis
    /// lost its state); subscribers get a `gap` and offsets after `offset` are accepted again.
    Reset {
        /// Channel name.
        channel: Arc<str>,
        /// The new position.
        offset: u64,
    },
    /// The relay -> shards: another node's `/api/disconnect` of a user (every shard) or of one connection
    /// (its shard).
    Kick {
        /// Every connection of this user...
        user: Option<Box<str>>,
        /// ... or this one.
        client: Option<ConnKey>,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: Box<str>,
    },
}

impl ShardMsg {
    /// What the message weighs against the destination's `max_queue_bytes`: its own size plus the bytes it
    /// carries (names, data, frames).
    pub fn weight(&self) -> usize {
        let carried = match self {
            ShardMsg::Deliver { channel, frame, .. } => channel.len() + frame.len(),
            ShardMsg::Lost { channel, .. } | ShardMsg::Refused { channel, .. } => channel.len(),
            ShardMsg::Publish { channel, data, .. } => channel.len() + data.len(),
            ShardMsg::Subscribe { channel, since, user, .. } => {
                channel.len() + since.as_ref().map_or(0, |(_, e)| e.len()) + user.as_ref().map_or(0, |u| u.len())
            }
            ShardMsg::Subscribed { channel, frame, missed, user, .. } => {
                channel.len()
                    + frame.len()
                    + missed.iter().map(Bytes::len).sum::<usize>()
                    + user.as_ref().map_or(0, |u| u.len())
            }
            ShardMsg::Unsubscribe { channel, user, .. } => channel.len() + user.as_ref().map_or(0, |u| u.len()),
            ShardMsg::Presence { channel, .. } => channel.len(),
            ShardMsg::History { channel, since, .. } => channel.len() + since.as_ref().map_or(0, |(_, e)| e.len()),
            ShardMsg::Reply { frame, .. } => frame.len(),
            ShardMsg::Api(m) => m.carried(),
            ShardMsg::Reset { channel, .. } => channel.len(),
            ShardMsg::Kick { user, reason, .. } => user.as_ref().map_or(0, |u| u.len()) + reason.len(),
        };
        std::mem::size_of::<Self>() + carried
    }
}

/// A shard's inbound ring and its doorbell.
#[derive(Debug)]
pub struct Inbox {
    /// Producers: every other shard.
    pub tx: Sender<ShardMsg>,
    /// The consumer: this shard's loop.
    pub rx: Receiver<ShardMsg>,
    /// Rung (an eventfd in the shard's epoll set) when a message arrives while the shard is parked.
    pub doorbell: OwnedFd,
    /// True while the shard is parked (or about to): senders ring the doorbell only then.
    pub parked: AtomicBool,
    /// Weight ([`ShardMsg::weight`]) of the messages in the ring.
    pub bytes: AtomicUsize,
    /// Deliveries dropped on their way to this shard (ring and overflow full).
    pub dropped: AtomicU64,
}

impl Inbox {
    /// A ring of `capacity` messages.
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Ok(Self {
            tx,
            rx,
            doorbell: crate::sys::eventfd()?,
            parked: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Rings the doorbell if the shard is parked; costs one load when it is not.
    pub fn notify(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::SeqCst) {
            crate::sys::eventfd_signal(self.doorbell.as_fd());
        }
    }

    /// Takes the next message (the consumer side), releasing its weight.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        let m = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(m.weight(), Ordering::Relaxed);
        Some(m)
    }

    /// Pushes into the ring if it has room in messages and bytes (`max_bytes` in flight); hands the
    /// message back otherwise (by value: it goes to the overflow queue, and boxing would allocate).
    #[allow(clippy::result_large_err)]
    fn try_push(&self, msg: ShardMsg, max_bytes: usize) -> Result<(), ShardMsg> {
        let w = msg.weight();
        if self.bytes.fetch_add(w, Ordering::Relaxed) + w > max_bytes {
            self.bytes.fetch_sub(w, Ordering::Relaxed);
            return Err(msg);
        }
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => {
                self.bytes.fetch_sub(w, Ordering::Relaxed);
                Err(m)
            }
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
    /// Weight of each overflow queue.
    overflow_bytes: Vec<usize>,
    /// Per destination: channel -> dropped offset range not yet reported.
    lost: Vec<HashMap<Arc<str>, (u64, u64)>>,
    /// Bound of each overflow queue, in messages.
    cap: usize,
    /// Bound of ring plus overflow queue toward one destination, in bytes (half each).
    max_bytes: usize,
}

impl Outbox {
    /// The outbox of one shard; `cap` bounds each overflow queue in messages, `max_bytes` what is in flight
    /// toward one destination (ring and overflow queue) in bytes.
    pub fn new(inboxes: Arc<[Inbox]>, cap: usize, max_bytes: usize) -> Self {
        let n = inboxes.len();
        Self {
            inboxes,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            overflow_bytes: vec![0; n],
            lost: (0..n).map(|_| HashMap::new()).collect(),
            cap,
            max_bytes,
        }
    }

    /// True when nothing waits in any overflow queue.
    pub fn is_idle(&self) -> bool {
        self.overflow.iter().all(VecDeque::is_empty) && self.lost.iter().all(HashMap::is_empty)
    }

    /// Sends `msg` to shard `dest` following the full-ring policy of the module docs.
    pub fn send(&mut self, dest: usize, msg: ShardMsg) -> Sent {
        if self.overflow[dest].is_empty() {
            match self.inboxes[dest].try_push(msg, self.max_bytes / 2) {
                Ok(()) => {
                    self.inboxes[dest].notify();
                    return Sent::Queued;
                }
                Err(m) => return self.overflow(dest, m),
            }
        }
        self.overflow(dest, msg)
    }

    fn push_overflow(&mut self, dest: usize, msg: ShardMsg) {
        self.overflow_bytes[dest] += msg.weight();
        self.overflow[dest].push_back(msg);
    }

    fn overflow(&mut self, dest: usize, msg: ShardMsg) -> Sent {
        if self.overflow[dest].len() < self.cap && self.overflow_bytes[dest] + msg.weight() <= self.max_bytes / 2 {
            self.push_overflow(dest, msg);
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
            ShardMsg::Api(m) if m.is_request() => Sent::Refused(ShardMsg::Api(m)),
            other => {
                self.push_overflow(dest, other);
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
                    let w = m.weight();
                    match self.inboxes[dest].try_push(m, self.max_bytes / 2) {
                        Ok(()) => {
                            self.overflow_bytes[dest] -= w;
                            sent = true;
                        }
                        Err(m) => {
                            self.overflow[dest].push_front(m);
                            break;
                        }
                    }
                }
                // Once the backlog is down to half, report what was dropped (behind what was queued).
                if round == 0 && self.overflow[dest].len() < self.cap / 2 && !self.lost[dest].is_empty() {
                    let lost: Vec<_> = self.lost[dest].drain().collect();
                    for (channel, (from, to)) in lost {
                        self.push_overflow(dest, ShardMsg::Lost { channel, from, to });
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
        ShardMsg::Deliver { channel: Arc::from("c"), offset, frame: Bytes::from_static(b"x"), born: 0 }
    }

    fn offsets(inbox: &Inbox) -> Vec<String> {
        std::iter::from_fn(|| inbox.try_recv())
            .map(|m| match m {
                ShardMsg::Deliver { offset, .. } => offset.to_string(),
                ShardMsg::Lost { from, to, .. } => format!("lost {from}-{to}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn full_ring_overflows_in_order_then_drops_with_a_lost_report() {
        let inboxes: Arc<[Inbox]> = vec![Inbox::new(2).unwrap(), Inbox::new(2).unwrap()].into();
        let mut out = Outbox::new(inboxes.clone(), 3, 1 << 30);
        for off in 1..=8 {
            assert!(matches!(out.send(1, deliver(off)), Sent::Queued));
        }
        // Ring holds 1,2; overflow 3,4,5; 6..8 dropped.
        assert_eq!(inboxes[1].dropped.load(Ordering::Relaxed), 3);
        let refused = out.send(1, ShardMsg::Presence { channel: "c".into(), reply: reply() });
        assert!(matches!(refused, Sent::Refused(ShardMsg::Presence { .. })), "requests are refused, not dropped");
        assert_eq!(offsets(&inboxes[1]), ["1", "2"]);
        out.drain();
        assert_eq!(offsets(&inboxes[1]), ["3", "4"]);
        out.drain();
        // Overflow now below half: the lost range is reported, in order after what was queued.
        assert_eq!(offsets(&inboxes[1]), ["5", "lost 6-8"]);
        out.drain();
        assert!(out.is_idle());
        assert!(matches!(out.send(1, deliver(9)), Sent::Queued));
        assert_eq!(offsets(&inboxes[1]), ["9"]);
    }

    #[test]
    fn bookkeeping_is_never_dropped() {
        let inboxes: Arc<[Inbox]> = vec![Inbox::new(2).unwrap()].into();
        let mut out = Outbox::new(inboxes.clone(), 1, 1 << 30);
        for _ in 0..5 {
            let m = ShardMsg::Unsubscribe { channel: "c".into(), shard: 0, user: None, last: false };
            assert!(matches!(out.send(0, m), Sent::Queued));
        }
        let mut n = 0;
        for _ in 0..5 {
            n += std::iter::from_fn(|| inboxes[0].try_recv()).count();
            out.drain();
        }
        assert_eq!(n, 5);
    }

    /// The overflow queue is bounded in bytes as well as in messages: large publishes are refused once
    /// half of `max_queue_bytes` waits in it, and the ring holds at most the other half.
    #[test]
    fn bytes_in_flight_are_bounded() {
        let inboxes: Arc<[Inbox]> = vec![Inbox::new(1000).unwrap()].into();
        let mut out = Outbox::new(inboxes.clone(), 1000, 1 << 20);
        let publish = || ShardMsg::Publish {
            channel: "c".into(),
            data: Bytes::from(vec![b'1'; 64 * 1024]),
            reply: None,
            born: 0,
        };
        let mut queued = 0;
        while let Sent::Queued = out.send(0, publish()) {
            queued += 1;
            assert!(queued < 100, "never refused");
        }
        let ring = inboxes[0].bytes.load(Ordering::Relaxed);
        assert!(ring <= 512 * 1024 && ring > 400 * 1024, "{ring} bytes in the ring");
        assert!(out.overflow_bytes[0] <= 512 * 1024, "{} bytes in the overflow queue", out.overflow_bytes[0]);
        assert_eq!(queued, 14, "7 of 64 KiB in each half of 1 MiB");
        // The consumer releases what it takes.
        let taken = std::iter::from_fn(|| inboxes[0].try_recv()).count();
        assert_eq!((taken, inboxes[0].bytes.load(Ordering::Relaxed)), (7, 0));
        out.drain();
        assert_eq!(std::iter::from_fn(|| inboxes[0].try_recv()).count(), 7);
        assert!(out.is_idle() && out.overflow_bytes[0] == 0);
    }

    fn reply() -> ReplyTo {
        ReplyTo { shard: 0, conn: ConnKey { idx: 0, gen: 1 }, id: None }
    }
}
