//! The close state machine: every way a connection ends goes through [`close`], which moves it
//! `Open -> Closing -> Draining -> (EOF) removed`, or straight to `Aborted`.
//!
//! - **Closing**: the connection's subscriptions are ended first (so no channel frame can follow), then the
//!   last bytes — our close frame, the protocol state machine's failing close or close echo, or an HTTP
//!   response — go into `ctx.out` and are written behind whatever was queued before. Nothing is queued
//!   after them: replies and deliveries check [`super::Phase::is_open`], and the WebSocket state machine
//!   sends nothing once it has sent a close.
//! - **Draining** ([`drained`]): once those bytes are with the kernel, only the write side is shut down
//!   (FIN). Shutting the read side too while the peer still sends would make the kernel answer its data
//!   with a reset, which throws away our unsent bytes — the very close frame. So reading goes on, and
//!   discards, until the peer's EOF or until [`CLOSE_GRACE`] runs out. After a complete close handshake
//!   (the peer's close frame arrived) there is nothing to wait for and the socket is shut down at once.
//! - **Aborted**: shut down both ways (handshake timeout, grace over, socket error); the EOF that the shard's
//!   epoll set then reports removes the connection.
//!
//! Abuse accounting lives here too ([`strike`]): refused commands and rate-limited messages add up to a
//! close with 1008 or 4029.
//!
//! So do the close accounting and logs: every WebSocket close is counted by code
//! (`throng_closes_total{code}`; 1006 for one that ended without a close handshake) and logged at debug, one
//! line per connection with its client address, user, duration, code and reason. Refused connections and
//! upgrades are counted by reason ([`refused`]) and logged at info, at most one line per reason per second
//! per shard, with the number of refusals left out since the last line.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use throng_protocol::frame::close as code;

use super::{flag, read, write, Conn, ConnKey, Conns, Phase};
use crate::metrics::{Refused, ShardMetrics};
use crate::shard::{Ctx, Env};
use crate::sys;

/// How long a connection we are closing may take to answer before its socket is shut down.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Refused commands a connection may send (net of accepted ones) before it is closed.
pub const MAX_STRIKES: u8 = 16;

/// How a connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close<'a> {
    /// A WebSocket close frame with this code and reason, from the server.
    Ws(u16, &'a str),
    /// A slow consumer (4008): what was queued but has not started going out is dropped first.
    SlowConsumer,
    /// The WebSocket state machine failed the connection and has written its close frame (this code and
    /// reason) to `ctx.out`.
    Failed(u16, &'static str),
    /// The peer's close frame arrived, with this code (the echo, if one was due, is in `ctx.out`).
    PeerClosed(Option<u16>),
    /// An HTTP response is in `ctx.out`: send it, then close.
    AfterResponse,
    /// No goodbye: shut the socket down now.
    Abort,
}

/// Closes a connection (see the module docs). Idempotent: a connection already closing only moves on
/// (a peer's close completes the handshake; an abort ends the wait).
pub fn close(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, how: Close<'_>) {
    // An HTTP request waiting for other shards is abandoned: its answer finds the connection closing.
    conn.flags &= !flag::HTTP_WAITING;
    if conn.phase.is_closing() {
        match how {
            Close::Abort => abort(conn),
            Close::PeerClosed(_) => {
                conn.flags |= flag::PEER_CLOSED;
                if conn.phase == Phase::Draining {
                    abort(conn);
                }
                // Closing: `drained` shuts the socket once our close frame is out.
            }
            _ => {}
        }
        ctx.out.clear();
        return;
    }
    if conn.phase.is_open() {
        closed(env, conn, how);
    }
    // No channel data after this point.
    let user = conn.presence_user();
    for sub in std::mem::take(&mut conn.subs) {
        ctx.chans.leave(env, &user, sub);
    }
    // An SSE stream says goodbye with an event, not a close frame.
    let sse = if conn.phase == Phase::Sse { ctx.sse.remove(&key) } else { None };
    match how {
        Close::Ws(code, reason) if sse.is_some() => crate::http::sse::goodbye(&mut ctx.out, sse.as_ref(), code, reason),
        Close::Ws(code, reason) => {
            conn.ws.close(code, reason, &mut ctx.out);
        }
        Close::SlowConsumer => {
            ShardMetrics::inc(&env.metrics.slow_consumers_total);
            // Keep a partly written front buffer whole, so the stream stays frame-aligned; drop the rest.
            let keep = usize::from(conn.flags & flag::HEAD_STARTED != 0);
            conn.outq.truncate(keep, &mut ctx.queues);
            let before = conn.queued;
            conn.queued = conn.outq.iter().map(|b| b.len() as u32).sum();
            ctx.queues.bytes = ctx.queues.bytes.saturating_sub(u64::from(before - conn.queued));
            ctx.out.clear();
            let reason = "slow consumer: backlog over max_backlog_bytes";
            if sse.is_some() {
                crate::http::sse::goodbye(&mut ctx.out, sse.as_ref(), code::SLOW_CONSUMER, reason);
            } else {
                conn.ws.close(code::SLOW_CONSUMER, reason, &mut ctx.out);
            }
        }
        Close::Failed(..) | Close::AfterResponse => {}
        Close::PeerClosed(_) => conn.flags |= flag::PEER_CLOSED,
        Close::Abort => {
            ctx.out.clear();
            abort(conn);
            return;
        }
    }
    conn.phase = Phase::Closing;
    let deadline = env.now + Env::ticks(CLOSE_GRACE);
    match conn.timer {
        Some(t) if ctx.wheel.reset(t, deadline) => {}
        _ => conn.timer = Some(ctx.wheel.insert(deadline, key)),
    }
    write::send_out(env, ctx, key, conn);
}

/// Counts (WebSockets, by code) and logs (every open connection, SSE streams too) a close; once: the
/// connection is not open afterwards.
fn closed(env: &Env, conn: &Conn, how: Close<'_>) {
    let (code, reason, by) = match how {
        Close::Ws(c, r) => (c, r, "server"),
        Close::SlowConsumer => (code::SLOW_CONSUMER, "slow consumer: backlog over max_backlog_bytes", "server"),
        Close::Failed(c, r) => (c, r, "server"),
        Close::PeerClosed(c) => (c.unwrap_or(1005), "closed by the client", "client"),
        // An open connection is aborted only when its socket failed (the peer reset it or went away).
        Close::AfterResponse | Close::Abort => (1006, "socket error: no close handshake", "client"),
    };
    // WebSocket closes only (an SSE stream, also open, has no close code; it is logged all the same).
    if conn.flags & flag::UPGRADED != 0 {
        env.metrics.obs.close(code);
    }
    log_close(env, conn, code, reason, by);
}

/// The debug line of a WebSocket connection's end: client address (the real one for `/ws`, behind trusted
/// proxies or the PROXY protocol; IPv6 as its /64, as the limits count it), user, duration, code, reason.
fn log_close(env: &Env, conn: &Conn, code: u16, reason: &str, by: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let duration_ms = (env.now.saturating_sub(u64::from(conn.opened))) * crate::shard::TICK.as_millis() as u64;
    let user = conn.user();
    match conn.id.as_ref().and_then(|i| i.ip) {
        Some(client_addr) => {
            tracing::debug!(shard = env.id, %client_addr, user, duration_ms, code, reason, by, "closed")
        }
        None => {
            let peer_addr = sys::peer_ip(conn.fd()).map_or_else(|| "-".to_string(), |a| a.to_string());
            tracing::debug!(shard = env.id, peer_addr, user, duration_ms, code, reason, by, "closed")
        }
    }
}

/// Counts a refused connection or upgrade under `why` and logs it at info: at most one line per reason per
/// second per shard ([`crate::metrics::RefusalLog`]), which says how many were left out since the last one.
/// `client_addr`: the client's real address when known (after the PROXY header and trusted proxies), else
/// the TCP peer's is looked up for the line.
pub fn refused(
    env: &Env,
    ctx: &mut Ctx,
    why: Refused,
    client_addr: Option<IpAddr>,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    detail: &str,
) {
    env.metrics.obs.refused(why);
    let Some(suppressed) = ctx.rec.refusals.admit(why, Instant::now()) else { return };
    let reason = why.name();
    match client_addr {
        Some(client_addr) => {
            tracing::info!(shard = env.id, reason, %client_addr, detail, suppressed, "upgrade refused")
        }
        None => {
            let peer_addr = fd.and_then(sys::peer_ip).map_or_else(|| "-".to_string(), |a| a.to_string());
            tracing::info!(shard = env.id, reason, peer_addr, detail, suppressed, "connection refused")
        }
    }
}

/// The last bytes of a closing connection are with the kernel: half-close, or close outright after a
/// complete close handshake.
pub fn drained(conn: &mut Conn) {
    if conn.phase != Phase::Closing {
        return;
    }
    if conn.flags & flag::PEER_CLOSED != 0 {
        abort(conn);
    } else {
        sys::shutdown_write(conn.fd());
        conn.phase = Phase::Draining;
    }
}

fn abort(conn: &mut Conn) {
    sys::shutdown(conn.fd());
    conn.phase = Phase::Aborted;
    conn.flags &= !flag::WRITER;
}

/// Counts a refused command (or a message over the rate limit) against the connection; at
/// [`MAX_STRIKES`] it is closed, with 4029 when the last refusal was the rate limit's and 1008 otherwise.
/// Returns true when it closed the connection (the caller then sends no error reply).
pub fn strike(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, rate_limited: bool) -> bool {
    ShardMetrics::inc(&env.metrics.bad_commands_total);
    if rate_limited {
        ShardMetrics::inc(&env.metrics.rate_limited_total);
        conn.flags |= flag::RATE_LIMITED;
    } else {
        conn.flags &= !flag::RATE_LIMITED;
    }
    conn.strikes = conn.strikes.saturating_add(1);
    if conn.strikes < MAX_STRIKES {
        return false;
    }
    ShardMetrics::inc(&env.metrics.abuse_closes_total);
    let how = if rate_limited {
        Close::Ws(code::RATE_LIMITED, "rate limit exceeded: too many messages or bytes per second")
    } else {
        Close::Ws(code::POLICY, "too many invalid commands")
    };
    close(env, ctx, key, conn, how);
    true
}

/// An accepted command: abuse is counted net of good behaviour.
pub fn forgive(conn: &mut Conn) {
    conn.strikes = conn.strikes.saturating_sub(1);
}

/// Removes a connection whose socket is finished with (EOF, error, or never registered): ends its
/// subscriptions (a peer that vanished never went through [`close`]), cancels its timer, and gives back
/// what it held. Dropping it closes the socket, which also takes it out of the epoll set. Returns false
/// when the key no longer names a connection.
pub fn remove(env: &Env, ctx: &mut Ctx, conns: &mut Conns, key: ConnKey) -> bool {
    let Some(mut c) = conns.remove(key) else { return false };
    if c.phase.is_open() {
        // The peer went away (EOF, reset) without a close handshake.
        if c.flags & flag::UPGRADED != 0 {
            env.metrics.obs.close(1006);
        }
        log_close(env, &c, 1006, "connection lost: no close handshake", "client");
    }
    if c.flags & flag::UPGRADED != 0 {
        ShardMetrics::dec(&env.metrics.ws_connections);
    } else {
        ShardMetrics::dec(&env.metrics.http_connections);
    }
    ctx.queues.bytes = ctx.queues.bytes.saturating_sub(u64::from(c.queued));
    let user = c.presence_user();
    for sub in std::mem::take(&mut c.subs) {
        ctx.chans.leave(env, &user, sub);
    }
    if let Some(id) = &c.id {
        env.shared.limits.release(&id.user, id.ip);
    }
    ctx.proxied.remove(&key);
    ctx.sse.remove(&key);
    if let Some(t) = c.timer {
        ctx.wheel.cancel(t);
    }
    read::forget(ctx, &c);
    if env.ring_reads {
        ctx.ring_cancels.push(key);
    }
    env.shared.open_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    ShardMetrics::dec(&env.metrics.connections);
    true
}
