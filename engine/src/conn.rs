//! Connections: the per-connection state in the shard's slab, the task that waits for readability, the read
//! path (pooled buffer, frames parsed and unmasked in place), the bounded write queue, and timers.
//!
//! Read path: a connection waits for readiness in the shard's epoll set ([`crate::poller`]) holding no
//! buffer and no task, then reads into the shard's scratch buffer and parses frames there. Only an unfinished frame's bytes are kept, in `Conn::pending`,
//! and the next read appends to them directly. An idle connection therefore holds no read buffer.
//!
//! Write path: replies produced while handling one read are gathered in the shard's `out` buffer and written
//! straight from it; only what the socket does not take is copied into the connection's queue of `Bytes`.
//! The queue is bounded in bytes; past the bound the client is a slow consumer and is closed with 4008.
//! While the socket is full the connection is marked as waiting to write ([`Conn::writer_active`]) and the
//! next output edge from the epoll set flushes it.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use monoio::net::TcpStream;
use throng_protocol::conn::{Event, MessageData, MessageKind, Step, WsConn};
use throng_protocol::frame::{close, OpCode};
use throng_protocol::handshake::{self, Request, Status};

use crate::flush::{self, Flushed};
use crate::http;
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Inner, Shard};
use crate::sys::{self, Recv};
use crate::timer::TimerKey;

/// A connection's address: slab index plus generation, so a stale key (a timer or task outliving its
/// connection, the slot reused by a newer one) is recognised instead of acting on the wrong client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request.
    Handshake,
    /// Upgraded to the `/echo` endpoint.
    Echo,
    /// Upgraded to `/ws`: wire protocol v1.
    V1,
    /// Sending a plain HTTP response, then closing.
    HttpResponse,
    /// We sent a close frame (or decided to close) and wait for the peer or the close timeout.
    Closing,
}

/// Bits of [`Conn::flags`].
mod flag {
    /// The socket is full: the next output edge flushes the connection; nothing else writes to it meanwhile.
    pub const WRITER: u8 = 1;
    /// Shut the socket down once the queue is flushed.
    pub const CLOSE_AFTER_FLUSH: u8 = 2;
    /// Accepted over `max_connections`: the request is answered with 503.
    pub const OVER_CAPACITY: u8 = 4;
    /// Our side is shut down for writing; reading goes on (discarding) until the peer's EOF.
    pub const WR_SHUT: u8 = 8;
    /// The peer's close frame arrived: it sends nothing more, so the socket can be closed outright.
    pub const PEER_CLOSED: u8 = 16;
}

/// One of a connection's subscriptions: the local channel, and the subscriber's slot in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnSub {
    /// Index of the channel in the shard's `channels`.
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
    pub outq: VecDeque<Bytes>,
    /// Bytes in `outq`, for the slow-consumer bound.
    pub queued: u32,
    /// Generation (see [`ConnKey`]).
    pub gen: u32,
    /// Tick of the last inbound read: ordinary traffic only stores this, it never touches the timer wheel.
    pub last_rx: u32,
    /// The connection's one timer: handshake deadline, next ping, or close deadline.
    pub timer: Option<TimerKey>,
    /// What the connection is doing.
    pub phase: Phase,
    /// See [`flag`].
    pub flags: u8,
    /// Refused commands, net of accepted ones: abuse past a bound closes with 1008.
    pub strikes: u8,
    /// The last flush pass that wrote this connection (one write per connection per pass).
    pub flush_mark: u32,
    /// Channels subscribed to (`/ws` only); empty, unallocated, otherwise.
    pub subs: Vec<ConnSub>,
    /// The user (`sub`) this connection belongs to; empty for `/echo`.
    pub user: Box<str>,
}

impl Conn {
    /// Per-connection size budget in bytes.
    pub const SIZE_BUDGET: usize = 176;

    /// True while the socket is full and the connection waits for an output edge: nothing else writes to it
    /// meanwhile.
    pub fn writer_active(&self) -> bool {
        self.flags & flag::WRITER != 0
    }

    /// The socket's fd, for the direct syscalls.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const _: () = assert!(std::mem::size_of::<Conn>() <= Conn::SIZE_BUDGET);

/// How long a connection we are closing may take to answer before its socket is shut down.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Outcome of handling a readiness event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    /// Drained: wait for the next edge.
    Continue,
    /// Stopped early (fairness bound) with input possibly left: resume without waiting for an edge.
    More,
    /// The socket is finished with (EOF, error or shut down): remove the connection.
    End,
}

/// Registers an accepted connection: a slab entry with its handshake deadline, and its socket in the
/// shard's epoll set. No task is spawned: the shard's event loop ([`crate::poller::run`]) calls
/// [`on_event`].
pub fn register(shard: &Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // SAFETY: `into_raw_fd` hands over sole ownership of the accepted socket (the runtime forgets it).
    let sock = unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) };
    let fd = sock.as_raw_fd();
    let open = shard.shared.open_connections.fetch_add(1, Ordering::Relaxed) + 1;
    ShardMetrics::inc(&shard.metrics.connections);
    let key = {
        let mut inner = shard.inner.borrow_mut();
        let gen = inner.next_gen;
        inner.next_gen = inner.next_gen.wrapping_add(1).max(1);
        let over = open > shard.shared.config.max_connections.unwrap_or(usize::MAX);
        let idx = inner.conns.insert(Conn {
            sock,
            ws: WsConn::server(),
            pending: Vec::new(),
            outq: VecDeque::new(),
            queued: 0,
            gen,
            last_rx: shard.now.get() as u32,
            timer: None,
            phase: Phase::Handshake,
            flags: if over { flag::OVER_CAPACITY } else { 0 },
            strikes: 0,
            flush_mark: 0,
            subs: Vec::new(),
            user: Box::from(""),
        });
        let key = ConnKey { idx: idx as u32, gen };
        let deadline = shard.now.get() + Shard::ticks(shard.shared.config.handshake_timeout);
        let t = inner.ctx.wheel.insert(deadline, key);
        inner.conns[idx].timer = Some(t);
        key
    };
    if let Err(e) = shard.poller.add(fd, key) {
        ShardMetrics::inc(&shard.metrics.io_errors_total);
        tracing::warn!(shard = shard.id, error = %e, "adding a connection to the epoll set failed; closing it");
        remove(shard, key);
    }
}

/// Handles one readiness event of a connection (or a resumption). Returns true when the connection stopped
/// reading early and must be resumed.
pub fn on_event(shard: &Rc<Shard>, key: ConnKey, ready: crate::poller::Ready) -> bool {
    if ready.write {
        on_writable(shard, key);
    }
    if ready.read {
        match on_readable(shard, key) {
            Flow::Continue => {}
            Flow::More => return true,
            Flow::End => remove(shard, key),
        }
    }
    false
}

/// Room to write: flushes a connection that waits for it (queue and channel frames).
fn on_writable(shard: &Rc<Shard>, key: ConnKey) {
    let mut guard = shard.inner.borrow_mut();
    let Inner { conns, ctx, .. } = &mut *guard;
    let Some(conn) = get(conns, key) else { return };
    if !conn.writer_active() {
        return;
    }
    match flush::flush_conn(conn, &mut ctx.channels, &shard.metrics) {
        Flushed::Blocked => {}
        Flushed::Done => {
            conn.flags &= !flag::WRITER;
            if conn.flags & flag::CLOSE_AFTER_FLUSH != 0 {
                finish_close(shard, key, conn, ctx);
            }
        }
        Flushed::Failed => {
            conn.flags &= !flag::WRITER;
            sys::shutdown(conn.fd());
        }
    }
}

fn remove(shard: &Shard, key: ConnKey) {
    let mut guard = shard.inner.borrow_mut();
    let inner = &mut *guard;
    if inner.conns.get(key.idx as usize).is_some_and(|c| c.gen == key.gen) {
        let mut c = inner.conns.remove(key.idx as usize);
        leave_all(shard, &mut c, &mut inner.ctx);
        if let Some(t) = c.timer {
            inner.ctx.wheel.cancel(t);
        }
        shard.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        ShardMetrics::dec(&shard.metrics.connections);
    }
}

/// Drops every subscription of a connection (it is closing or gone): no channel data follows.
pub fn leave_all(shard: &Shard, conn: &mut Conn, ctx: &mut Ctx) {
    for sub in std::mem::take(&mut conn.subs) {
        crate::v1::leave(shard, ctx, &conn.user, sub);
    }
}

fn get(conns: &mut slab::Slab<Conn>, key: ConnKey) -> Option<&mut Conn> {
    conns.get_mut(key.idx as usize).filter(|c| c.gen == key.gen)
}

/// Reads everything available, handles it, writes the replies.
fn on_readable(shard: &Rc<Shard>, key: ConnKey) -> Flow {
    let mut guard = shard.inner.borrow_mut();
    let Inner { conns, scratch, ctx, .. } = &mut *guard;
    let Some(conn) = get(conns, key) else {
        return Flow::End;
    };
    conn.last_rx = shard.now.get() as u32;
    // Bounded so one busy connection cannot starve the others on this shard; past the bound it is resumed
    // after the others (edge-triggered: no new event would come for what is left in the socket).
    for _ in 0..16 {
        let res = if conn.pending.is_empty() {
            match sys::recv(conn.fd(), scratch) {
                Ok(Recv::Data(n)) => {
                    ShardMetrics::add(&shard.metrics.bytes_in_total, n as u64);
                    let used = process(shard, key, conn, &mut scratch[..n], ctx);
                    if let Some(used) = used {
                        conn.pending.extend_from_slice(&scratch[used..n]);
                    }
                    used.map(|_| n)
                }
                Ok(Recv::WouldBlock) => return Flow::Continue,
                Ok(Recv::Eof) | Err(_) => None,
            }
        } else {
            // Append to the unfinished frame's bytes (reading straight into them, not via scratch).
            let old = conn.pending.len();
            let want = (conn.pending.capacity() - old).max(scratch.len());
            conn.pending.resize(old + want, 0);
            match sys::recv(conn.fd(), &mut conn.pending[old..]) {
                Ok(Recv::Data(n)) => {
                    ShardMetrics::add(&shard.metrics.bytes_in_total, n as u64);
                    conn.pending.truncate(old + n);
                    let mut pending = std::mem::take(&mut conn.pending);
                    let used = process(shard, key, conn, &mut pending, ctx);
                    if let Some(used) = used {
                        pending.drain(..used);
                        // An idle connection keeps no buffer.
                        if pending.is_empty() {
                            pending = Vec::new();
                        }
                        conn.pending = pending;
                    }
                    used.map(|_| scratch.len().min(n))
                }
                Ok(Recv::WouldBlock) => {
                    conn.pending.truncate(old);
                    return Flow::Continue;
                }
                Ok(Recv::Eof) | Err(_) => None,
            }
        };
        if !ctx.out.is_empty() {
            send(shard, key, conn, ctx);
        } else if conn.outq.is_empty() && conn.flags & flag::CLOSE_AFTER_FLUSH != 0 {
            finish_close(shard, key, conn, ctx);
        }
        match res {
            None => return Flow::End,
            // A short read means the socket is drained for now.
            Some(n) if n < scratch.len() => return Flow::Continue,
            Some(_) => {}
        }
    }
    Flow::More
}

/// Handles the bytes in `buf`. Returns how many were consumed (the rest is an unfinished request or frame
/// to keep), or `None` when the connection must end now.
fn process(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, buf: &mut [u8], ctx: &mut Ctx) -> Option<usize> {
    let mut off = 0;
    if conn.phase == Phase::Handshake {
        match handshake::parse_request(buf, handshake::DEFAULT_MAX_HEADER_BYTES) {
            Ok(None) => return Some(0),
            Ok(Some(req)) => {
                off = req.header_len;
                let phase = on_request(shard, key, conn, &req, ctx);
                conn.phase = phase;
                if phase != Phase::Echo && phase != Phase::V1 {
                    return Some(buf.len());
                }
                ShardMetrics::inc(&shard.metrics.upgrades_total);
            }
            Err(e) => {
                ShardMetrics::inc(&shard.metrics.http_rejected_total);
                handshake::write_rejection(&mut ctx.out, e.status(), &e.to_string());
                conn.phase = Phase::HttpResponse;
                conn.flags |= flag::CLOSE_AFTER_FLUSH;
                return Some(buf.len());
            }
        }
    }
    match conn.phase {
        Phase::Echo | Phase::V1 | Phase::Closing => {}
        // Anything after a plain HTTP request is ignored: the response is sent and the socket closed.
        Phase::HttpResponse | Phase::Handshake => return Some(buf.len()),
    }
    while off < buf.len() {
        match conn.ws.handle_read(&mut buf[off..], &shard.limits, &mut ctx.out) {
            Ok(Step::NeedMore) => {
                // Reserve room for the whole frame so the next reads land in one buffer without regrowth.
                if let Ok(Some(h)) = throng_protocol::frame::parse_header(&buf[off..]) {
                    let frame = h.frame_len() as usize;
                    if frame > buf.len() - off && conn.pending.capacity() < frame {
                        conn.pending.reserve_exact(frame);
                    }
                }
                break;
            }
            Ok(Step::Consumed(n)) => off += n,
            Ok(Step::Event(n, ev)) => {
                let base = off;
                off += n;
                match ev {
                    Event::Message { kind, data } if conn.phase == Phase::V1 => {
                        ShardMetrics::inc(&shard.metrics.messages_in_total);
                        let payload = match &data {
                            MessageData::InPlace(r) => &buf[base + r.start..base + r.end],
                            MessageData::Assembled(v) => &v[..],
                        };
                        if kind == MessageKind::Text {
                            crate::v1::on_command(shard, key, conn, payload, ctx);
                        } else {
                            crate::v1::text_frame(&mut ctx.out, |o| {
                                throng_protocol::message::encode_error(
                                    o,
                                    None,
                                    "bad_request",
                                    "binary messages are not part of protocol v1; send JSON text",
                                )
                            });
                        }
                        if conn.phase == Phase::Closing {
                            return Some(buf.len());
                        }
                        if ctx.out.len() >= 256 * 1024 {
                            send(shard, key, conn, ctx);
                        }
                    }
                    Event::Message { kind, data } => {
                        ShardMetrics::inc(&shard.metrics.messages_in_total);
                        let op = match kind {
                            MessageKind::Text => OpCode::Text,
                            MessageKind::Binary => OpCode::Binary,
                        };
                        match data {
                            MessageData::InPlace(r) => {
                                conn.ws.encode_frame(&mut ctx.out, true, op, &buf[base + r.start..base + r.end])
                            }
                            MessageData::Assembled(v) => conn.ws.encode_frame(&mut ctx.out, true, op, &v),
                        }
                        ShardMetrics::inc(&shard.metrics.frames_out_total);
                        // Keep replies to a burst of input bounded before writing them.
                        if ctx.out.len() >= 256 * 1024 {
                            send(shard, key, conn, ctx);
                        }
                    }
                    Event::Ping(_) | Event::Pong(_) => {}
                    Event::Closed { .. } => {
                        conn.flags |= flag::CLOSE_AFTER_FLUSH | flag::PEER_CLOSED;
                        conn.phase = Phase::Closing;
                        return Some(buf.len());
                    }
                }
            }
            Err(e) => {
                let m = &shard.metrics;
                ShardMetrics::inc(match e.close_code() {
                    close::INVALID_PAYLOAD => &m.invalid_utf8_total,
                    close::TOO_BIG => &m.too_big_total,
                    _ => &m.protocol_errors_total,
                });
                conn.flags |= flag::CLOSE_AFTER_FLUSH;
                conn.phase = Phase::Closing;
                return Some(buf.len());
            }
        }
    }
    Some(off)
}

/// Decides what to do with a complete HTTP request: upgrade, plain response, or rejection.
fn on_request(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, req: &Request<'_>, ctx: &mut Ctx) -> Phase {
    let out = &mut ctx.out;
    let reject = |out: &mut Vec<u8>, status: Status, reason: &str| {
        ShardMetrics::inc(&shard.metrics.http_rejected_total);
        handshake::write_rejection(out, status, reason);
    };
    if req.is_websocket_upgrade() || req.path == "/echo" || req.path == "/ws" {
        if let Err(e) = req.validate_upgrade() {
            reject(out, e.status(), e.reason());
        } else if req.path != "/ws" && (req.path != "/echo" || !shard.shared.config.echo) {
            reject(out, Status::NotFound, "no WebSocket endpoint at this path");
        } else if shard.shared.draining.load(Ordering::Relaxed) {
            reject(out, Status::ServiceUnavailable, "server is shutting down");
        } else if conn.flags & flag::OVER_CAPACITY != 0 {
            ShardMetrics::inc(&shard.metrics.over_capacity_total);
            reject(out, Status::ServiceUnavailable, "server at max_connections");
        } else if req.path == "/ws" {
            let user = match req.query_param("user") {
                None => Box::from("anonymous"),
                Some(u) if valid_user(&u) => Box::from(&*u),
                Some(_) => {
                    reject(out, Status::BadRequest, "user must be 1-128 characters of [A-Za-z0-9_.@=/-]");
                    conn.flags |= flag::CLOSE_AFTER_FLUSH;
                    return Phase::HttpResponse;
                }
            };
            let protocol = req.offers_subprotocol("throng.v1").then_some("throng.v1");
            handshake::write_switching_protocols(out, req.ws_key.unwrap_or_default().as_bytes(), protocol);
            let client = format!("{:x}-{:x}-{:x}", shard.id, conn.gen, key.idx);
            let ping = shard.shared.config.ping_interval.as_secs() as u32;
            crate::v1::text_frame(out, |o| throng_protocol::message::encode_welcome(o, &client, &user, ping));
            conn.user = user;
            arm_heartbeat(shard, conn, ctx);
            return Phase::V1;
        } else {
            let key = req.ws_key.unwrap_or_default();
            handshake::write_switching_protocols(out, key.as_bytes(), None);
            arm_heartbeat(shard, conn, ctx);
            return Phase::Echo;
        }
    } else {
        http::respond(shard, req, out);
    }
    conn.flags |= flag::CLOSE_AFTER_FLUSH;
    Phase::HttpResponse
}

/// Dev-mode user names (from `?user=`): the channel-name charset, so `user:<name>` is a valid channel.
fn valid_user(u: &str) -> bool {
    (1..=128).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@=/-".contains(&b))
}

/// Replaces the handshake deadline with the first heartbeat.
fn arm_heartbeat(shard: &Shard, conn: &mut Conn, ctx: &mut Ctx) {
    if let Some(t) = conn.timer {
        let deadline = next_heartbeat(ctx, shard.now.get(), conn.last_rx, &shard.shared.config);
        ctx.wheel.reset(t, deadline);
    }
}

/// When a connection's next heartbeat check is due: when it will have been silent for `ping_interval`
/// (jittered down by up to 10%, so connections opened together do not ping together), or its idle
/// deadline if sooner. Traffic never moves the timer; the check looks at `last_rx` when it fires.
fn next_heartbeat(ctx: &mut Ctx, now: u64, last_rx: u32, cfg: &crate::config::Config) -> u64 {
    let ping = Shard::ticks(cfg.ping_interval);
    let mut x = ctx.rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    ctx.rng = x;
    let jitter = u64::from(x) % (ping / 10).max(1);
    let last = u64::from(last_rx);
    let ping_at = if now.saturating_sub(last) >= ping - jitter { now + ping - jitter } else { last + ping - jitter };
    ping_at.min(last + Shard::ticks(cfg.idle_timeout)).max(now + 1)
}

/// Writes `ctx.out` to the connection and clears it. Written directly when nothing is queued ahead of it;
/// what the socket does not take is queued and waits for the socket's next output edge.
pub fn send(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx) {
    if ctx.out.is_empty() {
        return;
    }
    if conn.outq.is_empty() && !conn.writer_active() {
        match sys::send_vectored(conn.fd(), &[IoSlice::new(&ctx.out)]) {
            Ok(n) => {
                ShardMetrics::add(&shard.metrics.bytes_out_total, n as u64);
                if n < ctx.out.len() {
                    let rest = Bytes::copy_from_slice(&ctx.out[n..]);
                    enqueue(shard, key, conn, rest, ctx);
                }
            }
            Err(_) => {
                ShardMetrics::inc(&shard.metrics.io_errors_total);
                sys::shutdown(conn.fd());
            }
        }
    } else {
        let all = Bytes::copy_from_slice(&ctx.out);
        enqueue(shard, key, conn, all, ctx);
    }
    ctx.out.clear();
    if conn.outq.is_empty() && !conn.writer_active() && conn.flags & flag::CLOSE_AFTER_FLUSH != 0 {
        finish_close(shard, key, conn, ctx);
    }
}

/// Queues bytes behind what is already queued; closes the connection as a slow consumer when its backlog
/// would pass the bound.
fn enqueue(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, b: Bytes, ctx: &mut Ctx) {
    let open = matches!(conn.phase, Phase::Echo | Phase::V1);
    if open && conn.queued as usize + b.len() > shard.shared.config.max_backlog_bytes {
        slow_consumer(shard, key, conn, ctx);
        return;
    }
    conn.queued += b.len() as u32;
    conn.outq.push_back(b);
    start_writer(shard, key, conn, ctx);
}

/// Flushes what is queued now, or, if the socket does not take all of it, leaves the rest for the next
/// output edge. For callers that do not know whether the socket is full.
pub fn start_writer(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx) {
    if conn.writer_active() {
        return;
    }
    match flush::flush_conn(conn, &mut ctx.channels, &shard.metrics) {
        Flushed::Blocked => wait_writable(shard, conn),
        Flushed::Done => {
            if conn.flags & flag::CLOSE_AFTER_FLUSH != 0 {
                finish_close(shard, key, conn, ctx);
            }
        }
        Flushed::Failed => sys::shutdown(conn.fd()),
    }
}

/// The socket is full: the connection waits for its next output edge (see `on_writable`), and nothing
/// else writes to it meanwhile.
pub fn wait_writable(shard: &Shard, conn: &mut Conn) {
    if !conn.writer_active() {
        conn.flags |= flag::WRITER;
        ShardMetrics::inc(&shard.metrics.write_waits_total);
    }
}

/// Everything up to and including the close frame (or HTTP response) is with the kernel: half-close.
///
/// Shutting the read side down too while the peer is still sending would make the kernel answer its data
/// with a reset, which throws away our unsent bytes — the very close frame. So only the write side is shut;
/// the connection keeps reading and discarding until the peer's EOF, or until [`CLOSE_GRACE`] runs
/// out and the timer shuts the socket down completely.
fn finish_close(shard: &Shard, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx) {
    if conn.flags & flag::PEER_CLOSED != 0 {
        // Close handshake complete: nothing more will arrive, nothing can be lost.
        sys::shutdown(conn.fd());
        return;
    }
    if conn.flags & flag::WR_SHUT != 0 {
        return;
    }
    conn.flags |= flag::WR_SHUT;
    sys::shutdown_write(conn.fd());
    let deadline = shard.now.get() + Shard::ticks(CLOSE_GRACE);
    match conn.timer {
        Some(t) if ctx.wheel.reset(t, deadline) => {}
        _ => conn.timer = Some(ctx.wheel.insert(deadline, key)),
    }
}

/// Closes a client that does not read fast enough (4008): its subscriptions end, everything queued that
/// has not started going out is dropped, a close frame is queued behind what has, and the socket is shut
/// down once that is sent (or after [`CLOSE_GRACE`]).
pub fn slow_consumer(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx) {
    ShardMetrics::inc(&shard.metrics.slow_consumers_total);
    leave_all(shard, conn, ctx);
    // The front buffer may be partly written: keep it whole so the stream stays frame-aligned.
    conn.outq.truncate(1);
    conn.queued = conn.outq.front().map_or(0, |b| b.len() as u32);
    let mut frame = Vec::with_capacity(64);
    conn.ws.close(close::SLOW_CONSUMER, "slow consumer: backlog over max_backlog_bytes", &mut frame);
    conn.queued += frame.len() as u32;
    conn.outq.push_back(Bytes::from(frame));
    conn.phase = Phase::Closing;
    conn.flags |= flag::CLOSE_AFTER_FLUSH;
    if let Some(t) = conn.timer {
        ctx.wheel.reset(t, shard.now.get() + Shard::ticks(CLOSE_GRACE));
    }
    start_writer(shard, key, conn, ctx);
}

/// Closes a connection from inside its own read path (e.g. abuse, 1008): subscriptions end, the close
/// frame goes to `ctx.out`, and the socket is shut down once that is written.
pub fn close_now(shard: &Shard, conn: &mut Conn, ctx: &mut Ctx, code: u16, reason: &str) {
    leave_all(shard, conn, ctx);
    conn.ws.close(code, reason, &mut ctx.out);
    conn.phase = Phase::Closing;
    conn.flags |= flag::CLOSE_AFTER_FLUSH;
}

/// Sends a close frame from the shard's side (idle timeout, drain) and arms the close deadline.
fn close_from_server(shard: &Rc<Shard>, inner: &mut Inner, key: ConnKey, code: u16, reason: &str) {
    let Inner { conns, ctx, .. } = inner;
    let Some(conn) = get(conns, key) else { return };
    match conn.phase {
        Phase::Echo | Phase::V1 => {
            leave_all(shard, conn, ctx);
            conn.ws.close(code, reason, &mut ctx.out);
            conn.phase = Phase::Closing;
            let deadline = shard.now.get() + Shard::ticks(CLOSE_GRACE);
            match conn.timer {
                Some(t) => {
                    ctx.wheel.reset(t, deadline);
                }
                None => conn.timer = Some(ctx.wheel.insert(deadline, key)),
            }
            send(shard, key, conn, ctx);
        }
        Phase::Handshake | Phase::HttpResponse => sys::shutdown(conn.fd()),
        Phase::Closing => {}
    }
}

/// Runs every timer due at `now`: handshake timeouts, pings, idle timeouts and close deadlines.
pub fn fire_timers(shard: &Rc<Shard>, now: u64) {
    let mut guard = shard.inner.borrow_mut();
    let inner = &mut *guard;
    while let Some((t, key)) = inner.ctx.wheel.poll(now) {
        let Some(conn) = get(&mut inner.conns, key) else { continue };
        if conn.timer != Some(t) {
            continue;
        }
        conn.timer = None;
        match conn.phase {
            Phase::Handshake => {
                ShardMetrics::inc(&shard.metrics.handshake_timeouts_total);
                sys::shutdown(conn.fd());
            }
            Phase::HttpResponse | Phase::Closing => sys::shutdown(conn.fd()),
            Phase::Echo | Phase::V1 => {
                let idle = Shard::ticks(shard.shared.config.idle_timeout);
                if now.saturating_sub(u64::from(conn.last_rx)) >= idle {
                    ShardMetrics::inc(&shard.metrics.idle_timeouts_total);
                    close_from_server(shard, inner, key, close::NORMAL, "idle timeout");
                } else {
                    let Inner { conns, ctx, .. } = &mut *inner;
                    let conn = &mut conns[key.idx as usize];
                    // Only a connection silent for (about) a ping interval is pinged.
                    let ping = Shard::ticks(shard.shared.config.ping_interval);
                    if now.saturating_sub(u64::from(conn.last_rx)) >= ping - ping / 10 {
                        ShardMetrics::inc(&shard.metrics.pings_sent_total);
                        conn.ws.encode_frame(&mut ctx.out, true, OpCode::Ping, b"");
                        send(shard, key, conn, ctx);
                    }
                    let deadline = next_heartbeat(ctx, now, conn.last_rx, &shard.shared.config);
                    conn.timer = Some(ctx.wheel.insert(deadline, key));
                }
            }
        }
    }
}

/// Begins a graceful drain on this shard: stops accepting; every upgraded connection gets a 1001 close,
/// the others are shut down.
pub fn start_drain(shard: &Rc<Shard>) {
    sys::shutdown(shard.listener_fd.get());
    let mut guard = shard.inner.borrow_mut();
    let inner = &mut *guard;
    let keys: Vec<ConnKey> = inner.conns.iter().map(|(i, c)| ConnKey { idx: i as u32, gen: c.gen }).collect();
    for key in keys {
        close_from_server(shard, inner, key, close::GOING_AWAY, "server shutting down");
    }
}

/// Shuts every remaining socket down (the drain timeout passed).
pub fn abort_all(shard: &Shard) {
    for (_, c) in shard.inner.borrow().conns.iter() {
        sys::shutdown(c.fd());
    }
}
