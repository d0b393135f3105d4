//! Connections: the per-connection state in the shard's slab and everything done to one connection.
//!
//! - [`read`]: the readiness-driven read path (pooled buffer, frames parsed and unmasked in place), the
//!   budget for unfinished messages, pong coalescing, and the per-connection rate limits; complete messages
//!   go to a [`read::Sink`] the shard supplies (`/ws` commands, `/echo`, HTTP requests).
//! - [`write`]: the bounded output queue and the direct write of a turn's replies.
//! - [`close`]: the one close state machine every path goes through.
//! - [`timers`]: the connection's single timer: handshake deadline, heartbeat, unfinished-message deadline,
//!   close grace.
//!
//! Nothing here knows about commands or delivery: those layers call down into this one, and the read path
//! reaches them only through the [`read::Sink`] it is handed.

pub mod close;
pub mod read;
pub mod timers;
pub mod write;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use slab::Slab;
use smallvec::SmallVec;
use throng_protocol::conn::WsConn;

use crate::auth::Identity;
use crate::shard::timer::TimerKey;

/// A connection's address: slab index plus generation, so a stale key (a timer or reply outliving its
/// connection, the slot reused by a newer one) is recognised instead of acting on the wrong client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Slab index.
    pub idx: u32,
    /// Generation of the connection stored there.
    pub gen: u32,
}

impl ConnKey {
    /// Packs the key into an epoll event's data.
    pub fn to_u64(self) -> u64 {
        u64::from(self.gen) << 32 | u64::from(self.idx)
    }

    /// Unpacks [`ConnKey::to_u64`].
    pub fn from_u64(v: u64) -> Self {
        Self { idx: v as u32, gen: (v >> 32) as u32 }
    }
}

/// What a connection is doing. The close state machine ([`close`]) moves it forward through the last three,
/// never back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request.
    Handshake,
    /// Upgraded to the `/echo` endpoint.
    Echo,
    /// Upgraded to `/ws`: wire protocol v1.
    V1,
    /// Streaming `/sse` (Server-Sent Events, `crate::http::sse`): a channel subscriber written in the SSE
    /// encoding; what the client sends is discarded.
    Sse,
    /// Our last bytes (a close frame or an HTTP response) are queued behind what was already queued; nothing
    /// else will be. Input is discarded (a WebSocket peer's close frame is still recognised).
    Closing,
    /// Everything is written and our side is shut for writing (FIN sent); input is read and discarded until
    /// the peer's EOF or the close grace runs out.
    Draining,
    /// Shut down both ways; the EOF event that follows removes the connection.
    Aborted,
}

impl Phase {
    /// True while the connection may be sent data (replies, channel frames, echoes).
    pub fn is_open(self) -> bool {
        matches!(self, Phase::Echo | Phase::V1 | Phase::Sse)
    }

    /// True once a close has begun.
    pub fn is_closing(self) -> bool {
        matches!(self, Phase::Closing | Phase::Draining | Phase::Aborted)
    }
}

/// Bits of [`Conn::flags`].
pub mod flag {
    /// The socket is full: the next output edge flushes the connection; nothing else writes to it meanwhile.
    pub const WRITER: u8 = 1;
    /// The front buffer of the queue has been partly written: it must go out whole, whatever happens.
    pub const HEAD_STARTED: u8 = 2;
    /// The peer's close frame arrived: it sends nothing more, so the socket can be closed outright.
    pub const PEER_CLOSED: u8 = 4;
    /// The last refused command was refused by the rate limit: if it closes the connection, with 4029.
    pub const RATE_LIMITED: u8 = 8;
    /// The listener speaks the PROXY protocol and this connection's header has not been read yet: the first
    /// bytes must be one (within the handshake deadline), or the connection is dropped.
    pub const PROXY_PENDING: u8 = 16;
    /// A plain HTTP connection that has been answered at least once and is kept alive: its timer is the
    /// keep-alive deadline (when it fires with no request started, the connection is closed quietly).
    pub const HTTP_SERVED: u8 = 32;
    /// A plain HTTP request waits for answers from other shards (the backend API): nothing more is read
    /// or parsed until its response is written, so pipelined requests are answered in order.
    pub const HTTP_WAITING: u8 = 64;
    /// Upgraded (`/ws` or `/echo`): counted in `ws_connections`, not `http_connections`.
    pub const UPGRADED: u8 = 128;
}

/// One of a connection's subscriptions: the local channel, and the subscriber's slot in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnSub {
    /// Index of the channel in the shard's local channels.
    pub chan: u32,
    /// Slot in the channel's subscribers; [`ConnSub::PENDING`] while the home has not confirmed it;
    /// [`ConnSub::CANCELLED`] when unsubscribed before that.
    pub slot: u32,
}

impl ConnSub {
    /// Slot value of a subscription waiting for its home shard.
    pub const PENDING: u32 = u32::MAX;
    /// Slot value of a pending subscription the client unsubscribed from before its confirmation.
    pub const CANCELLED: u32 = u32::MAX - 1;

    /// True once the subscription is confirmed and receiving.
    pub fn is_active(&self) -> bool {
        self.slot < Self::CANCELLED
    }
}

/// Per-connection state. Budget: [`Conn::SIZE_BUDGET`] bytes, checked at compile time.
#[derive(Debug)]
pub struct Conn {
    /// The socket (closed when the connection is dropped, which also takes it out of the epoll set).
    pub sock: OwnedFd,
    /// WebSocket protocol state (48 bytes).
    pub ws: WsConn,
    /// Bytes of an unfinished request or frame; empty (no allocation) between messages.
    pub pending: Vec<u8>,
    /// Frames the socket has not taken yet; empty (no allocation) unless the client reads slower than we write.
    pub outq: write::OutQueue,
    /// Bytes in `outq`, for the slow-consumer bound.
    pub queued: u32,
    /// Generation (see [`ConnKey`]).
    pub gen: u32,
    /// Tick of the last inbound read: ordinary traffic only stores this, it never touches the timer wheel.
    /// Also where the rate limits' token buckets were last refilled (they are refilled on every read).
    pub last_rx: u32,
    /// Tick since which the connection holds an unfinished message ([`timers::NOT_HOLDING`] when none):
    /// it must finish it within `message_timeout`.
    pub held_since: u32,
    /// Message tokens, in twentieths of a message (one tick's refill at one message per second is one
    /// twentieth): see [`read`].
    pub msg_credit: u32,
    /// Byte tokens (`/ws`). On a connection still reading HTTP requests (no bucket there): the length, head
    /// and body, of the request whose head has arrived and whose body has not yet all arrived (0: none);
    /// see [`Conn::http_request_len`].
    pub byte_credit: u32,
    /// The connection's one timer: handshake deadline, next heartbeat, message deadline, or close grace.
    pub timer: Option<TimerKey>,
    /// What the connection is doing.
    pub phase: Phase,
    /// See [`flag`].
    pub flags: u8,
    /// Refused commands, net of accepted ones: abuse past a bound closes the connection.
    pub strikes: u8,
    /// The last flush pass that wrote this connection (one write per connection per pass).
    pub flush_mark: u32,
    /// Channels subscribed to (`/ws` and SSE only; empty otherwise). The first two in place, in the 24 B a
    /// `Vec` takes anyway (a personal channel and a group: no heap block); more spill to the heap.
    pub subs: SmallVec<[ConnSub; 2]>,
    /// Who this `/ws` connection is and what it may do (`None` before the upgrade and for `/echo`).
    pub id: Option<Arc<Identity>>,
    /// Tick at which its token expires ([`timers::NO_EXPIRY`]: never): then it is closed with 4001 unless a
    /// `refresh` moved it.
    pub expires_at: u32,
    /// Tick it was accepted at (for the duration in its close log line).
    pub opened: u32,
}

impl Conn {
    /// Per-connection size budget in bytes.
    pub const SIZE_BUDGET: usize = 168;

    /// A connection just accepted, in the handshake phase.
    pub fn new(sock: OwnedFd, gen: u32, now: u64) -> Self {
        Conn {
            sock,
            ws: WsConn::server(),
            pending: Vec::new(),
            outq: write::OutQueue::default(),
            queued: 0,
            gen,
            last_rx: now as u32,
            held_since: timers::NOT_HOLDING,
            msg_credit: 0,
            byte_credit: 0,
            timer: None,
            phase: Phase::Handshake,
            flags: 0,
            strikes: 0,
            flush_mark: 0,
            subs: SmallVec::new(),
            id: None,
            expires_at: timers::NO_EXPIRY,
            opened: now as u32,
        }
    }

    /// The user this connection belongs to (empty before the upgrade and for `/echo`).
    pub fn user(&self) -> &str {
        self.id.as_ref().map_or("", |i| &i.user)
    }

    /// The user as presence tables hold it: the identity's own name, shared (an empty name before the
    /// upgrade and for `/echo`, which never subscribe).
    pub fn presence_user(&self) -> Arc<str> {
        self.id.as_ref().map_or_else(|| Arc::from(""), |i| i.user.clone())
    }

    /// The length (head and body) of the HTTP request whose body is still arriving; 0 when none is.
    /// (Stored in `byte_credit`, which only `/ws` connections use.)
    pub fn http_request_len(&self) -> usize {
        if self.phase == Phase::Handshake {
            self.byte_credit as usize
        } else {
            0
        }
    }

    /// Notes the length of the HTTP request whose body is arriving (0: none).
    pub fn set_http_request_len(&mut self, len: usize) {
        self.byte_credit = len as u32;
    }

    /// True while the socket is full and the connection waits for an output edge: nothing else writes to it
    /// meanwhile.
    pub fn writer_active(&self) -> bool {
        self.flags & flag::WRITER != 0
    }

    /// The socket, for the direct syscalls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Bytes this connection holds for an unfinished request, frame or fragmented message (what counts
    /// against the shard's `max_unfinished_bytes`).
    pub fn held_bytes(&self) -> usize {
        self.pending.capacity() + self.ws.assembled_capacity()
    }
}

const _: () = assert!(std::mem::size_of::<Conn>() <= Conn::SIZE_BUDGET);
const _: () = assert!(std::mem::size_of::<ConnSub>() <= 8);
const _: () = assert!(std::mem::size_of::<SmallVec<[ConnSub; 2]>>() == std::mem::size_of::<Vec<ConnSub>>());

/// The shard's connections: a slab addressed by [`ConnKey`], every lookup checking the generation.
#[derive(Debug)]
pub struct Conns {
    slab: Slab<Conn>,
    next_gen: u32,
}

impl Default for Conns {
    fn default() -> Self {
        Self { slab: Slab::with_capacity(1024), next_gen: 1 }
    }
}

impl Conns {
    /// The connection at `key`, if it is still the one the key names.
    pub fn get(&self, key: ConnKey) -> Option<&Conn> {
        self.slab.get(key.idx as usize).filter(|c| c.gen == key.gen)
    }

    /// The connection at `key`, mutably, if it is still the one the key names.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.slab.get_mut(key.idx as usize).filter(|c| c.gen == key.gen)
    }

    /// Stores a new connection built by `make` from its generation; returns its key.
    pub fn insert(&mut self, make: impl FnOnce(u32) -> Conn) -> ConnKey {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let idx = self.slab.insert(make(gen));
        ConnKey { idx: idx as u32, gen }
    }

    /// Takes the connection out, if the key still names it.
    pub fn remove(&mut self, key: ConnKey) -> Option<Conn> {
        self.get(key)?;
        Some(self.slab.remove(key.idx as usize))
    }

    /// Keys of every connection.
    pub fn keys(&self) -> Vec<ConnKey> {
        self.slab.iter().map(|(i, c)| ConnKey { idx: i as u32, gen: c.gen }).collect()
    }

    /// Every connection.
    pub fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.slab.iter().map(|(_, c)| c)
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}
