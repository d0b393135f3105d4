//! A connection's one timer in the shard's wheel: the handshake deadline, then the heartbeat (ping a silent
//! connection, close an idle one), the deadline for finishing a started message, and the close grace.
//!
//! Ordinary traffic never touches the wheel: reads store the current tick in `Conn::last_rx`, and the
//! heartbeat looks at it when it fires. Only a change in what a connection owes (starting to hold an
//! unfinished message) may pull its timer earlier.

use throng_protocol::frame::{close as code, OpCode};
use throng_protocol::handshake::{self, Status};

use super::close::{self, Close};
use super::write;
use super::{flag, Conn, ConnKey, Conns, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

/// `Conn::held_since` of a connection that holds no unfinished message.
pub const NOT_HOLDING: u32 = u32::MAX;
/// `Conn::expires_at` of a connection whose token does not expire.
pub const NO_EXPIRY: u32 = u32::MAX;

/// The tick at which a token with `exp` (Unix seconds) expires, counting `leeway` seconds of clock skew.
pub fn expiry_tick(env: &Env, exp: Option<u64>) -> u32 {
    let Some(exp) = exp else { return NO_EXPIRY };
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let left_ms = (exp + env.cfg().auth.leeway).saturating_mul(1000).saturating_sub(unix);
    let ticks = left_ms.div_ceil(crate::shard::TICK.as_millis() as u64);
    (env.now + ticks).min(u64::from(NO_EXPIRY - 1)) as u32
}

/// The token was replaced (`refresh`): make sure the timer fires by the new expiry.
pub fn expiry_moved(ctx: &mut Ctx, conn: &mut Conn) {
    if let Some(t) = conn.timer {
        if ctx.wheel.deadline(t).is_some_and(|d| d > u64::from(conn.expires_at)) {
            ctx.wheel.reset(t, u64::from(conn.expires_at));
        }
    }
}

/// Arms the handshake deadline of a connection just accepted.
pub fn arm_handshake(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    let deadline = env.now + Env::ticks(env.cfg().handshake_timeout);
    conn.timer = Some(ctx.wheel.insert(deadline, key));
}

/// Moves a plain HTTP connection's deadline to `handshake_timeout` from now: after a response on a kept-alive
/// connection (the next request must arrive whole by then, or the idle connection is closed), and when a
/// request starts waiting for other shards (its answer must come by then). One wheel reset; no allocation.
pub fn http_deadline(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    let deadline = env.now + Env::ticks(env.cfg().handshake_timeout);
    match conn.timer {
        Some(t) if ctx.wheel.reset(t, deadline) => {}
        _ => conn.timer = Some(ctx.wheel.insert(deadline, key)),
    }
}

/// Replaces the handshake deadline with the first heartbeat (the connection was just upgraded).
pub fn arm_heartbeat(env: &Env, ctx: &mut Ctx, conn: &mut Conn) {
    if let Some(t) = conn.timer {
        let deadline = next_deadline(env, ctx, conn);
        ctx.wheel.reset(t, deadline);
    }
}

/// The connection started holding an unfinished message at `env.now`: make sure its timer fires by the
/// message deadline.
pub fn started_holding(env: &Env, ctx: &mut Ctx, conn: &mut Conn) {
    conn.held_since = env.now as u32;
    let due = env.now + Env::ticks(env.cfg().message_timeout);
    if let Some(t) = conn.timer {
        if ctx.wheel.deadline(t).is_some_and(|d| d > due) {
            ctx.wheel.reset(t, due);
        }
    }
}

/// When an open connection's timer must next fire: when it will have been silent for `ping_interval`
/// (jittered down by up to 10%, so connections opened together do not ping together), its idle deadline,
/// or its message deadline, whichever is first.
fn next_deadline(env: &Env, ctx: &mut Ctx, conn: &Conn) -> u64 {
    let cfg = env.cfg();
    let now = env.now;
    let ping = Env::ticks(cfg.ping_interval);
    let mut x = ctx.rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    ctx.rng = x;
    let jitter = u64::from(x) % (ping / 10).max(1);
    let last = u64::from(conn.last_rx);
    let ping_at = if now.saturating_sub(last) >= ping - jitter { now + ping - jitter } else { last + ping - jitter };
    let mut at = ping_at.min(last + Env::ticks(cfg.idle_timeout));
    if conn.held_since != NOT_HOLDING {
        at = at.min(u64::from(conn.held_since) + Env::ticks(cfg.message_timeout));
    }
    if conn.expires_at != NO_EXPIRY {
        at = at.min(u64::from(conn.expires_at));
    }
    at.max(now + 1)
}

/// Handles a connection's timer, due now.
pub fn fire(env: &Env, ctx: &mut Ctx, conns: &mut Conns, key: ConnKey) {
    let Some(conn) = conns.get_mut(key) else { return };
    conn.timer = None;
    let now = env.now;
    let cfg = env.cfg();
    match conn.phase {
        Phase::Handshake if conn.flags & flag::HTTP_WAITING != 0 => {
            // A backend API request whose answers from other shards did not all come in time.
            ShardMetrics::inc(&env.metrics.api_overloaded_total);
            ShardMetrics::inc(&env.metrics.http_rejected_total);
            let reason = "the other shards did not answer within handshake_timeout; retry later";
            handshake::write_rejection(&mut ctx.out, Status::ServiceUnavailable, reason);
            close::close(env, ctx, key, conn, Close::AfterResponse);
        }
        Phase::Handshake if conn.flags & flag::HTTP_SERVED != 0 && conn.pending.is_empty() => {
            // A kept-alive HTTP connection left idle: closed quietly (FIN), not a handshake timeout.
            close::close(env, ctx, key, conn, Close::AfterResponse);
        }
        Phase::Handshake => {
            ShardMetrics::inc(&env.metrics.handshake_timeouts_total);
            let addr = ctx.proxied.get(&key).copied();
            let detail = "request not complete within handshake_timeout";
            close::refused(env, ctx, crate::metrics::Refused::HandshakeTimeout, addr, Some(conn.fd()), detail);
            close::close(env, ctx, key, conn, Close::Abort);
        }
        Phase::Closing | Phase::Draining | Phase::Aborted => close::close(env, ctx, key, conn, Close::Abort),
        Phase::Sse if ctx.sse.get(&key).is_some_and(|s| s.is_poll()) => {
            crate::http::sse::poll_expired(env, ctx, key, conn);
        }
        Phase::Sse => {
            // The client sends nothing: no idle deadline, a comment line every ping interval instead
            // (keeps proxies from timing the stream out; a dead peer fails the write), and the token's expiry.
            if conn.expires_at != NO_EXPIRY && now >= u64::from(conn.expires_at) {
                ShardMetrics::inc(&env.metrics.tokens_expired_total);
                let how = Close::Ws(code::TOKEN_EXPIRED, "token expired: reconnect with a new token");
                close::close(env, ctx, key, conn, how);
                return;
            }
            ShardMetrics::inc(&env.metrics.pings_sent_total);
            ctx.out.extend_from_slice(b":\n\n");
            write::send_out(env, ctx, key, conn);
            conn.last_rx = now as u32;
            if conn.phase.is_open() {
                let deadline = next_deadline(env, ctx, conn);
                conn.timer = Some(ctx.wheel.insert(deadline, key));
            }
        }
        Phase::Echo | Phase::V1 => {
            let silent = now.saturating_sub(u64::from(conn.last_rx));
            if conn.expires_at != NO_EXPIRY && now >= u64::from(conn.expires_at) {
                ShardMetrics::inc(&env.metrics.tokens_expired_total);
                let how =
                    Close::Ws(code::TOKEN_EXPIRED, "token expired: reconnect with a new token, or refresh in time");
                close::close(env, ctx, key, conn, how);
            } else if conn.held_since != NOT_HOLDING
                && now.saturating_sub(u64::from(conn.held_since)) >= Env::ticks(cfg.message_timeout)
            {
                ShardMetrics::inc(&env.metrics.message_timeouts_total);
                let how = Close::Ws(code::POLICY, "message not finished within message_timeout");
                close::close(env, ctx, key, conn, how);
            } else if silent >= Env::ticks(cfg.idle_timeout) {
                ShardMetrics::inc(&env.metrics.idle_timeouts_total);
                close::close(env, ctx, key, conn, Close::Ws(code::NORMAL, "idle timeout"));
            } else {
                // Only a connection silent for (about) a ping interval is pinged.
                let ping = Env::ticks(cfg.ping_interval);
                if silent >= ping - ping / 10 {
                    ShardMetrics::inc(&env.metrics.pings_sent_total);
                    conn.ws.encode_frame(&mut ctx.out, true, OpCode::Ping, b"");
                    write::send_out(env, ctx, key, conn);
                }
                if conn.phase.is_open() {
                    let deadline = next_deadline(env, ctx, conn);
                    conn.timer = Some(ctx.wheel.insert(deadline, key));
                }
            }
        }
    }
}
