//! The read path: a connection that waits for readiness holds no buffer; on an input event it reads with a
//! non-blocking `recv` straight into the shard's scratch buffer and lets the sans-IO `WsConn` parse frames
//! there, unmasking them in place. Only an unfinished request's or frame's bytes are kept, in
//! `Conn::pending`, and the next read appends to them directly.
//!
//! What a client can make this path spend or hold is bounded:
//! - **Reads per event**: [`READS_PER_EVENT`]; a connection with more input is resumed by the shard loop
//!   after the others (edge-triggered: no new event would come for what is left in the socket).
//! - **Unfinished bytes**: pending request/frame bytes and fragmented messages count against the shard's
//!   `max_unfinished_bytes`; a connection that grows past it is closed with 1013, and one that holds an
//!   unfinished message longer than `message_timeout` with 1008 (see [`super::timers`]).
//! - **Rate** (`/ws`): a token bucket per connection for messages (pings included) and one for bytes,
//!   refilled on every read from the ticks elapsed since the last; a message over either is refused
//!   (`rate_limited`, or a ping left unanswered) and counted as a strike ([`super::close::strike`]).
//! - **Pongs**: at most [`PONGS_PER_READ`] per read are answered in order; past that only the latest ping
//!   of the read gets its pong (RFC 6455 5.5.3 allows answering only the most recent one).
//! - **Request heads** are parsed only once their end has arrived, so a head trickled a byte at a time
//!   costs linear, not quadratic, time.
//! - **HTTP requests** (plain, not upgrades) may carry a `Content-Length` body of at most
//!   `max_api_body_bytes` (a larger one is refused with 413 before it is read; chunked bodies with 411), and
//!   only when the sink takes it on the head alone ([`Sink::takes_body`]: the backend API with the right
//!   key, `POST /publish` with a valid token; anything else is answered from its head and closed, the body
//!   unread, no `100 Continue` sent), held
//!   like an unfinished frame until it has all arrived (its length noted, so a trickled body is not parsed
//!   again per read) and dropped once the request is answered. Requests on a kept-alive connection are
//!   answered in order: one that waits for other shards stops the parsing of those behind it
//!   ([`super::flag::HTTP_WAITING`]) until [`resume`]. Responses the client does not read count against
//!   `max_backlog_bytes` (past it the connection is shut).

use std::ops::Range;
use std::os::fd::AsFd;

use throng_protocol::conn::{Event, MessageData, MessageKind, Step};
use throng_protocol::frame::{close as code, OpCode};
use throng_protocol::handshake::{self, HandshakeError, Request, Status};
use throng_protocol::proxy::{self, ProxyHeader};

use super::close::{self, Close};
use super::timers::{self, NOT_HOLDING};
use super::{flag, write, Conn, ConnKey, Conns, Phase};
use crate::metrics::{Refused, ShardMetrics};
use crate::shard::{Ctx, Env};
use crate::sys::{self, Recv};

/// Reads one connection may make per readiness event before the others get their turn.
pub const READS_PER_EVENT: usize = 16;
/// Pongs answered in order per read; later pings in the same read are coalesced into one pong.
pub const PONGS_PER_READ: usize = 16;
/// Replies gathered for one connection before they are written, even in the middle of a read.
const OUT_FLUSH: usize = 256 * 1024;
/// Message tokens are counted in twentieths, one tick's refill at one message per second.
const MSG_UNIT: u32 = 20;
/// Unfinished bytes held in a buffer of at most this size are carried through the scratch buffer (copied
/// in front of the next read), so a connection trickling a small message pins no more than it sent; a
/// larger frame is reserved whole and read into directly.
const SMALL_PENDING: usize = 16 * 1024;
/// Largest read straight into a reserved frame (bounds the zero-filling before each read).
const MAX_DIRECT_READ: usize = 256 * 1024;

/// What the application does with what a connection sends: the shard supplies it (`/ws` commands,
/// `/echo`, HTTP routing), so this layer knows nothing of them.
pub trait Sink {
    /// A complete HTTP request on a connection in the handshake phase: its head and (plain requests only)
    /// its `Content-Length` body. The sink writes the response (a 101 and what follows it, or a plain
    /// response) to `ctx.out` and either upgrades the connection (`conn.phase` `Echo` or `V1`), closes it,
    /// keeps it in the handshake phase for the next request, or sets [`super::flag::HTTP_WAITING`] when the
    /// response is written later (then nothing more is parsed until it is, and [`resume`] is called).
    fn request(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>, body: &[u8]);

    /// Whether the `Content-Length` body of a plain request whose head has arrived is to be read (checked
    /// before any of it is kept, and before a `100 Continue`). When not, the request is handed to
    /// [`Sink::request`] at once as if it had asked for `Connection: close`, with no body, and the
    /// connection is closed after the response, its body unread.
    fn takes_body(&mut self, env: &Env, conn: &Conn, req: &Request<'_>) -> bool;

    /// A complete, admitted message on an upgraded connection. Replies go to `ctx.out`.
    fn message(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, kind: MessageKind, data: &[u8]);

    /// A message refused by the rate limit, on `/ws`. The sink answers it (or not) and counts the strike.
    fn rate_limited(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, data: &[u8]);
}

/// Outcome of handling a readiness event.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Drained: wait for the next edge.
    Continue,
    /// Stopped early (fairness bound) with input possibly left: resume without waiting for an edge.
    More,
    /// The socket is finished with (EOF, error): remove the connection.
    End,
}

/// Fills a connection's token buckets for the ticks elapsed since its last read, and stamps the read.
fn refill(env: &Env, conn: &mut Conn) {
    let cfg = env.cfg();
    let elapsed = u64::from((env.now as u32).wrapping_sub(conn.last_rx));
    conn.last_rx = env.now as u32;
    if conn.phase != Phase::V1 {
        return;
    }
    let (msg_cap, byte_cap) = bucket_caps(env);
    // One tick is a twentieth of a second: a rate of R per second refills R twentieths per tick.
    let msgs = u64::from(conn.msg_credit) + elapsed * u64::from(cfg.max_messages_per_second);
    conn.msg_credit = msgs.min(u64::from(msg_cap)) as u32;
    let bytes = u64::from(conn.byte_credit) + elapsed * u64::from(cfg.max_bytes_per_second) / 20;
    conn.byte_credit = bytes.min(u64::from(byte_cap)) as u32;
}

/// Capacity of the message bucket (one second's worth, in twentieths) and of the byte bucket (one second's
/// worth, but at least one largest message).
pub fn bucket_caps(env: &Env) -> (u32, u32) {
    let cfg = env.cfg();
    let msgs = cfg.max_messages_per_second.saturating_mul(MSG_UNIT);
    let bytes = cfg.max_bytes_per_second.max((cfg.max_message_size + 16).min(u32::MAX as usize) as u32);
    (msgs, bytes)
}

/// Takes one message of `len` bytes from the buckets; false when either is short (the message is refused
/// and takes nothing). Unlimited when the configured rate is 0.
fn admit(env: &Env, conn: &mut Conn, len: usize) -> bool {
    let cfg = env.cfg();
    let msg_ok = cfg.max_messages_per_second == 0 || conn.msg_credit >= MSG_UNIT;
    let byte_ok = cfg.max_bytes_per_second == 0 || conn.byte_credit as usize >= len;
    if !(msg_ok && byte_ok) {
        return false;
    }
    if cfg.max_messages_per_second > 0 {
        conn.msg_credit -= MSG_UNIT;
    }
    if cfg.max_bytes_per_second > 0 {
        conn.byte_credit -= len as u32;
    }
    true
}

/// Reads everything available (within [`READS_PER_EVENT`]), hands what it completes to `sink`, writes the
/// replies.
pub fn on_readable(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    scratch: &mut [u8],
    key: ConnKey,
    sink: &mut impl Sink,
) -> Flow {
    let Some(conn) = conns.get_mut(key) else {
        return Flow::Continue;
    };
    refill(env, conn);
    let held_before = conn.held_bytes();
    let flow = read_loop(env, ctx, scratch, key, conn, sink);
    held_check(env, ctx, key, conn, held_before);
    flow
}

/// Input that arrived through the io_uring ring (`crate::shard::uring`): `data` is the provided buffer the
/// kernel filled, the shard's until this returns. Handled as one read of [`on_readable`]: parsed and
/// unmasked in place in `data` when nothing is pending, else behind the pending bytes; what is left
/// unfinished is copied into `Conn::pending`. While a request waits for other shards
/// ([`flag::HTTP_WAITING`]) the bytes are only kept, for [`resume`].
pub fn on_data(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    scratch: &mut [u8],
    key: ConnKey,
    data: &mut [u8],
    sink: &mut impl Sink,
) {
    let Some(conn) = conns.get_mut(key) else { return };
    ShardMetrics::add(&env.metrics.bytes_in_total, data.len() as u64);
    refill(env, conn);
    let held_before = conn.held_bytes();
    let n = data.len();
    let old = conn.pending.len();
    if conn.flags & flag::HTTP_WAITING != 0 {
        conn.pending.extend_from_slice(data);
    } else if old == 0 {
        let used = process(env, ctx, key, conn, data, 0, sink);
        conn.pending.extend_from_slice(&data[used..]);
    } else if conn.pending.capacity() <= SMALL_PENDING && old + n <= scratch.len() {
        // Behind the (small) unfinished bytes, in the scratch buffer, as a read would have put them.
        scratch[old..old + n].copy_from_slice(data);
        process_behind_pending(env, ctx, key, conn, &mut scratch[..old + n], sink);
    } else {
        // A large frame reserved whole: appended to it.
        conn.pending.extend_from_slice(data);
        process_pending(env, ctx, key, conn, old, sink);
    }
    write::send_out(env, ctx, key, conn);
    held_check(env, ctx, key, conn, held_before);
}

/// What the connection holds for unfinished input now (`held_before` before its read), against the shard's
/// budget and deadline.
fn held_check(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, held_before: usize) {
    let held = conn.held_bytes();
    ctx.unfinished = ctx.unfinished - held_before + held;
    if held == 0 {
        conn.held_since = NOT_HOLDING;
    } else if conn.phase.is_open() {
        if conn.held_since == NOT_HOLDING {
            timers::started_holding(env, ctx, conn);
        }
        if held > held_before && ctx.unfinished > env.cfg().max_unfinished_bytes {
            ShardMetrics::inc(&env.metrics.unfinished_limit_closes_total);
            let how = Close::Ws(code::OVERLOADED, "server busy: too many unfinished messages, retry later");
            close::close(env, ctx, key, conn, how);
        }
    } else if conn.phase == Phase::Handshake && held > held_before && ctx.unfinished > env.cfg().max_unfinished_bytes {
        ShardMetrics::inc(&env.metrics.unfinished_limit_closes_total);
        refuse_request(env, ctx, key, conn, Status::ServiceUnavailable, BUSY);
    }
}

const BUSY: &str = "server busy: too many unfinished requests, retry later";

/// Answers an HTTP request with an error status and a JSON reason, and closes the connection after it.
fn refuse_request(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, status: Status, reason: &str) {
    ShardMetrics::inc(&env.metrics.http_rejected_total);
    handshake::write_rejection(&mut ctx.out, status, reason);
    close::close(env, ctx, key, conn, Close::AfterResponse);
}

/// Picks up a kept-alive HTTP connection whose waiting request has just been answered (the sink cleared
/// [`super::flag::HTTP_WAITING`]): first the pipelined requests already read, then the socket (no edge
/// would come for what arrived meanwhile).
pub fn resume(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    scratch: &mut [u8],
    key: ConnKey,
    sink: &mut impl Sink,
) -> Flow {
    let Some(conn) = conns.get_mut(key) else {
        return Flow::Continue;
    };
    if conn.phase == Phase::Handshake && conn.flags & flag::HTTP_WAITING == 0 && !conn.pending.is_empty() {
        let held_before = conn.held_bytes();
        process_pending(env, ctx, key, conn, 0, sink);
        ctx.unfinished = ctx.unfinished - held_before + conn.held_bytes();
        write::send_out(env, ctx, key, conn);
    }
    if env.ring_reads {
        // Input that arrived meanwhile was kept in `pending` (handled above); the ring brings the rest.
        return Flow::Continue;
    }
    on_readable(env, ctx, conns, scratch, key, sink)
}

/// The connection was just upgraded (`/ws` or `/echo`): it moves from the HTTP to the WebSocket gauge, and
/// what follows the 101 in `ctx.out` (the welcome) is frames, counted when written.
fn upgraded(env: &Env, ctx: &mut Ctx, conn: &mut Conn) {
    conn.flags |= flag::UPGRADED;
    ShardMetrics::dec(&env.metrics.http_connections);
    ShardMetrics::inc(&env.metrics.ws_connections);
    ctx.frames_from = ctx.out.windows(4).rposition(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
}

/// Called when a connection is removed: gives back what it held for unfinished input.
pub fn forget(ctx: &mut Ctx, conn: &Conn) {
    ctx.unfinished -= conn.held_bytes();
}

fn read_loop(
    env: &Env,
    ctx: &mut Ctx,
    scratch: &mut [u8],
    key: ConnKey,
    conn: &mut Conn,
    sink: &mut impl Sink,
) -> Flow {
    for _ in 0..READS_PER_EVENT {
        if conn.flags & flag::HTTP_WAITING != 0 {
            // Nothing is read while a request waits for other shards: `resume` reads on once it is answered.
            return Flow::Continue;
        }
        let old = conn.pending.len();
        // (bytes read, or None at EOF or on an error; bytes the read could have taken)
        let (res, offered) = if conn.pending.capacity() <= SMALL_PENDING {
            // Through the scratch buffer, behind the (small) unfinished bytes, which are copied in front.
            let offered = scratch.len() - old;
            match sys::recv(conn.fd(), &mut scratch[old..]) {
                Ok(Recv::Data(n)) => {
                    ShardMetrics::add(&env.metrics.bytes_in_total, n as u64);
                    process_behind_pending(env, ctx, key, conn, &mut scratch[..old + n], sink);
                    (Some(n), offered)
                }
                Ok(Recv::WouldBlock) => return Flow::Continue,
                Ok(Recv::Eof) | Err(_) => (None, offered),
            }
        } else {
            // A large frame, reserved whole when its header arrived: read straight into its buffer, at most
            // MAX_DIRECT_READ at a time (the room is zero-filled before the read).
            let offered = (conn.pending.capacity() - old).clamp(SMALL_PENDING, MAX_DIRECT_READ);
            conn.pending.resize(old + offered, 0);
            match sys::recv(conn.sock.as_fd(), &mut conn.pending[old..]) {
                Ok(Recv::Data(n)) => {
                    ShardMetrics::add(&env.metrics.bytes_in_total, n as u64);
                    conn.pending.truncate(old + n);
                    process_pending(env, ctx, key, conn, old, sink);
                    (Some(n), offered)
                }
                Ok(Recv::WouldBlock) => {
                    conn.pending.truncate(old);
                    return Flow::Continue;
                }
                Ok(Recv::Eof) | Err(_) => (None, offered),
            }
        };
        write::send_out(env, ctx, key, conn);
        match res {
            None => return Flow::End,
            // A short read means the socket is drained for now.
            Some(n) if n < offered => return Flow::Continue,
            Some(_) => {}
        }
    }
    Flow::More
}

/// Handles `buf`, whose first `conn.pending.len()` bytes are free for the unfinished bytes (copied there
/// now) and whose rest just arrived; what is left unfinished goes back to `conn.pending` (no buffer kept when
/// nothing is).
fn process_behind_pending(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    buf: &mut [u8],
    sink: &mut impl Sink,
) {
    let old = conn.pending.len();
    buf[..old].copy_from_slice(&conn.pending);
    conn.pending.clear();
    let used = process(env, ctx, key, conn, buf, old, sink);
    conn.pending.extend_from_slice(&buf[used..]);
    if conn.pending.is_empty() {
        // An idle connection keeps no buffer.
        conn.pending = Vec::new();
    }
}

/// Handles `conn.pending` in place (`pending[fresh..]` just arrived) and keeps what is left unfinished.
fn process_pending(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, fresh: usize, sink: &mut impl Sink) {
    let mut pending = std::mem::take(&mut conn.pending);
    let used = process(env, ctx, key, conn, &mut pending, fresh, sink);
    pending.drain(..used);
    conn.pending = if pending.is_empty() { Vec::new() } else { pending };
}

/// Handles the bytes in `buf` (`buf[fresh..]` arrived with this read). Returns how many were consumed; the
/// rest is an unfinished request or frame to keep.
fn process(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    buf: &mut [u8],
    fresh: usize,
    sink: &mut impl Sink,
) -> usize {
    let mut off = 0;
    if conn.flags & flag::PROXY_PENDING != 0 {
        match proxy_header(env, ctx, key, conn, buf) {
            Some(0) => return 0,
            Some(len) => {
                // The header is consumed here and now (the request head may have come in the same read).
                conn.flags &= !flag::PROXY_PENDING;
                let rest = &mut buf[len..];
                let fresh = fresh.min(rest.len());
                return len + process(env, ctx, key, conn, rest, fresh, sink);
            }
            None => return buf.len(),
        }
    }
    if conn.phase == Phase::Handshake {
        match http_requests(env, ctx, key, conn, buf, fresh, sink) {
            // An SSE stream started (`crate::http::sse`): it reads nothing more. A held long-poll waits
            // (`HTTP_WAITING`): what follows its request is kept for when it is answered.
            Ok(at) if conn.phase == Phase::Sse => {
                return if conn.flags & flag::HTTP_WAITING != 0 { at } else { buf.len() };
            }
            Ok(frames_at) => {
                off = frames_at;
                ShardMetrics::inc(&env.metrics.upgrades_total);
                upgraded(env, ctx, conn);
            }
            Err(used) => return used,
        }
    }
    // An SSE stream's client has nothing to say: discarded.
    if conn.phase == Phase::Sse {
        return buf.len();
    }
    // Closing: only a WebSocket that sent its close still listens, for the peer's close frame.
    if conn.phase.is_closing() && conn.ws.state() != throng_protocol::conn::State::CloseSent {
        return buf.len();
    }
    let mut pongs = 0;
    let mut latest_ping: Option<Range<usize>> = None;
    while off < buf.len() {
        let out_before = ctx.out.len();
        match conn.ws.handle_read(&mut buf[off..], &env.limits, &mut ctx.out) {
            Ok(Step::NeedMore) => {
                // Reserve room for the whole frame so the next reads land in one buffer without regrowth,
                // when the shard's budget for unfinished bytes allows it.
                if let Ok(Some(h)) = throng_protocol::frame::parse_header(&buf[off..]) {
                    let frame = h.frame_len() as usize;
                    let room = env.cfg().max_unfinished_bytes.saturating_sub(ctx.unfinished);
                    if frame > buf.len() - off && conn.pending.capacity() < frame && frame <= room {
                        conn.pending.reserve_exact(frame);
                    }
                }
                break;
            }
            Ok(Step::Consumed(n)) => off += n,
            Ok(Step::Event(n, ev)) => {
                let base = off;
                off += n;
                if !matches!(ev, Event::Ping(_)) {
                    // A run of pings ended: its latest gets its pong now, before what follows it.
                    if let Some(r) = latest_ping.take() {
                        conn.ws.encode_frame(&mut ctx.out, true, OpCode::Pong, &buf[r]);
                    }
                }
                match ev {
                    Event::Message { kind, data } => {
                        ShardMetrics::inc(&env.metrics.messages_in_total);
                        let payload = match &data {
                            MessageData::InPlace(r) => &buf[base + r.start..base + r.end],
                            MessageData::Assembled(v) => &v[..],
                        };
                        if conn.phase == Phase::V1 && !admit(env, conn, payload.len()) {
                            sink.rate_limited(env, ctx, key, conn, payload);
                        } else {
                            sink.message(env, ctx, key, conn, kind, payload);
                        }
                        if conn.phase.is_closing() {
                            return buf.len();
                        }
                        if ctx.out.len() >= OUT_FLUSH {
                            write::send_out(env, ctx, key, conn);
                        }
                    }
                    Event::Ping(r) => {
                        if conn.phase == Phase::V1 && !admit(env, conn, n) {
                            // Over the rate: not answered, and counted.
                            ctx.out.truncate(out_before);
                            if close::strike(env, ctx, key, conn, true) {
                                return buf.len();
                            }
                            continue;
                        }
                        pongs += 1;
                        if pongs > PONGS_PER_READ {
                            // The pong just written is the last thing in `out`: take it back, and answer
                            // only the latest ping once this read is done.
                            ctx.out.truncate(out_before);
                            ShardMetrics::inc(&env.metrics.pongs_coalesced_total);
                            latest_ping = Some(base + r.start..base + r.end);
                        }
                    }
                    Event::Pong(_) => {}
                    Event::Closed { code } => {
                        close::close(env, ctx, key, conn, Close::PeerClosed(code));
                        return buf.len();
                    }
                }
            }
            Err(e) => {
                let m = &env.metrics;
                ShardMetrics::inc(match e.close_code() {
                    code::INVALID_PAYLOAD => &m.invalid_utf8_total,
                    code::TOO_BIG => &m.too_big_total,
                    _ => &m.protocol_errors_total,
                });
                close::close(env, ctx, key, conn, Close::Failed(e.close_code(), e.reason()));
                return buf.len();
            }
        }
    }
    if let Some(r) = latest_ping {
        if conn.phase.is_open() {
            conn.ws.encode_frame(&mut ctx.out, true, OpCode::Pong, &buf[r]);
        }
    }
    off
}

/// Handles the HTTP requests in `buf` (`buf[fresh..]` arrived with this read), in order. `Ok(at)`: the
/// connection was upgraded and its frames start at `at`; `Err(used)`: bytes consumed, the rest is an
/// unfinished request to keep (or everything, when the connection is closing).
fn http_requests(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    buf: &mut [u8],
    fresh: usize,
    sink: &mut impl Sink,
) -> Result<usize, usize> {
    let max = handshake::DEFAULT_MAX_HEADER_BYTES;
    let mut off = 0;
    loop {
        if conn.phase != Phase::Handshake {
            return Err(buf.len());
        }
        let rest = &buf[off..];
        if rest.is_empty() || conn.flags & flag::HTTP_WAITING != 0 {
            return Err(off);
        }
        let waiting_body = conn.http_request_len();
        if waiting_body > rest.len() {
            return Err(off);
        }
        // Parse only once the head's end has arrived: looking for it in the new bytes alone keeps a head
        // trickled a byte at a time linear.
        let from = fresh.saturating_sub(off).saturating_sub(3);
        if waiting_body == 0 && rest.len() < max && !rest[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Err(off);
        }
        let req = match handshake::parse_request(rest, max) {
            Ok(None) => return Err(off),
            Ok(Some(req)) => req,
            Err(e) => {
                let (status, reason) = match e {
                    // A chunked body on a plain request: ask for a length (an upgrade keeps its 501).
                    HandshakeError::UnsupportedTransferEncoding if !rest.starts_with(b"GET ") => {
                        ShardMetrics::inc(&env.metrics.api_too_large_total);
                        let reason = "chunked request bodies are not accepted: send a Content-Length";
                        (Status::LengthRequired, reason.to_string())
                    }
                    _ => (e.status(), e.to_string()),
                };
                let addr = ctx.proxied.get(&key).copied();
                close::refused(env, ctx, Refused::BadRequest, addr, Some(conn.fd()), &reason);
                refuse_request(env, ctx, key, conn, status, &reason);
                return Err(buf.len());
            }
        };
        let head = req.header_len;
        let body_len = if req.is_websocket_upgrade() { 0 } else { req.content_length.unwrap_or(0) };
        let max_body = env.cfg().max_api_body_bytes;
        if body_len > max_body {
            // Refused before a byte of it is read.
            ShardMetrics::inc(&env.metrics.api_too_large_total);
            let reason = format!("request body of {body_len} bytes is over max_api_body_bytes ({max_body})");
            refuse_request(env, ctx, key, conn, Status::PayloadTooLarge, &reason);
            return Err(buf.len());
        }
        if body_len > 0 && waiting_body == 0 && !sink.takes_body(env, conn, &req) {
            // Refused on its head (no or a wrong API key, the API off, an unknown path, the wrong method) or
            // sent where no body is taken: answered now, from the head, and closed; the body is not read
            // (what of it arrives while the response goes out is discarded by the close).
            let mut head_only = req.clone();
            head_only.connection_close = true;
            sink.request(env, ctx, key, conn, &head_only, &[]);
            if !conn.phase.is_closing() {
                close::close(env, ctx, key, conn, Close::AfterResponse);
            }
            return Err(buf.len());
        }
        let total = head + body_len;
        if rest.len() < total {
            // The body is still arriving: keep the request and note its length, so the next reads only
            // compare lengths. A body past the small carry is reserved whole, within the shard's budget.
            // (This runs once per request: the head is not parsed again until the body is complete.)
            if total > SMALL_PENDING && conn.pending.capacity() < total {
                if total > env.cfg().max_unfinished_bytes.saturating_sub(ctx.unfinished) {
                    ShardMetrics::inc(&env.metrics.unfinished_limit_closes_total);
                    refuse_request(env, ctx, key, conn, Status::ServiceUnavailable, BUSY);
                    return Err(buf.len());
                }
                conn.pending.reserve_exact(total);
            }
            conn.set_http_request_len(total);
            if req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
                // curl and libcurl wait a second for this before sending a body over 1 KiB.
                ctx.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            return Err(off);
        }
        conn.set_http_request_len(0);
        sink.request(env, ctx, key, conn, &req, &rest[head..total]);
        if conn.phase.is_open() {
            return Ok(off + head);
        }
        off += total;
        if ctx.out.len() >= OUT_FLUSH {
            write::send_out(env, ctx, key, conn);
        }
        if conn.phase == Phase::Handshake && conn.queued as usize > env.cfg().max_backlog_bytes {
            // Pipelined requests whose responses are not read: bounded like any backlog.
            ShardMetrics::inc(&env.metrics.slow_consumers_total);
            close::close(env, ctx, key, conn, Close::Abort);
            return Err(buf.len());
        }
    }
}

/// Reads the PROXY protocol header at the start of `buf`: `Some(0)` while it is incomplete, `Some(len)` once
/// it has been read (the client's address noted for the upgrade), `None` when the bytes are not a valid
/// header (counted, and the connection dropped without a word: the peer is not the proxy it should be).
fn proxy_header(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, buf: &[u8]) -> Option<usize> {
    match proxy::parse(buf) {
        Ok(None) => Some(0),
        Ok(Some(p)) => {
            if let ProxyHeader::Proxied { source, .. } = p.header {
                ctx.proxied.insert(key, source.ip());
            }
            Some(p.len)
        }
        Err(e) => {
            ShardMetrics::inc(&env.metrics.proxy_header_errors_total);
            close::refused(env, ctx, Refused::ProxyHeader, None, Some(conn.fd()), &e.to_string());
            close::close(env, ctx, key, conn, Close::Abort);
            None
        }
    }
}
