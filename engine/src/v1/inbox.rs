//! Messages from other shards: deliveries for local subscribers, requests for channels homed here, and the
//! answers to this shard's own requests (written to their connections if those are still there and open).

use std::sync::Arc;

use bytes::Bytes;
use throng_protocol::message;

use super::refuse;
use crate::channel::bus::{ReplyTo, ShardMsg};
use crate::channel::{frame_bytes, text_frame, Refusal};
use crate::conn::{write, ConnKey, ConnSub, Conns, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

/// Handles one message from another shard.
pub fn handle(env: &Env, ctx: &mut Ctx, conns: &mut Conns, msg: ShardMsg) {
    match msg {
        ShardMsg::Deliver { channel, offset, frame, born } => ctx.chans.deliver(&channel, offset, &frame, born),
        ShardMsg::Lost { channel, from, to } => ctx.chans.lost(env, &channel, from, to),
        ShardMsg::Publish { channel, data, reply, born } => {
            let res = ctx.chans.publish_at(env, &channel, &data, born);
            let Some(r) = reply else { return };
            match res {
                Ok(offset) => {
                    send_reply(env, ctx, conns, r, frame_bytes(|o| message::encode_published(o, r.id, offset)))
                }
                Err(Refusal { code, reason }) => {
                    let channel: Arc<str> = Arc::from(&*channel);
                    answer_refused(
                        env,
                        ctx,
                        conns,
                        r,
                        ShardMsg::Refused { channel, reply: r, subscribe: false, code, reason },
                    )
                }
            }
        }
        ShardMsg::Subscribe { channel, reply, since, user } => {
            let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
            let name: Arc<str> = Arc::from(&*channel);
            let msg = match ctx.chans.subscribe_at_home(env, &channel, reply, since_ref, user.as_ref()) {
                Ok((frame, missed, offset)) => {
                    ShardMsg::Subscribed { channel: name, reply, offset, frame, missed, user }
                }
                Err(Refusal { code, reason }) => {
                    ShardMsg::Refused { channel: name, reply, subscribe: true, code, reason }
                }
            };
            let _ = ctx.chans.outbox.send(usize::from(reply.shard), msg);
        }
        ShardMsg::Subscribed { channel, reply, offset, frame, missed, user } => {
            on_subscribed(env, ctx, conns, &channel, reply, offset, (&frame, &missed), user);
        }
        ShardMsg::Unsubscribe { channel, shard: from, user, last } => {
            ctx.chans.unsubscribe_at_home(&channel, usize::from(from), user.as_deref(), last, env.id);
        }
        ShardMsg::Presence { channel, reply } => {
            let f = ctx.chans.presence_reply(env, &channel, reply.id);
            send_reply(env, ctx, conns, reply, f);
        }
        ShardMsg::History { channel, reply, since, limit } => {
            let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
            let f = ctx.chans.history_reply(env, &channel, reply.id, since_ref, limit);
            send_reply(env, ctx, conns, reply, f);
        }
        ShardMsg::Reply { conn, frame } => reply_to_conn(env, ctx, conns, conn, &frame),
        ShardMsg::Api(m) => crate::http::api::on_shard_msg(env, ctx, conns, m),
        ShardMsg::Reset { channel, offset } => ctx.chans.reset(env, &channel, offset),
        ShardMsg::Kick { user, client, code, reason } => {
            let n = crate::http::api::close_matching(env, ctx, conns, user.as_deref(), client, code, &reason);
            ShardMetrics::add(&env.metrics.api_disconnected_total, n);
        }
        ShardMsg::Refused { channel, reply, subscribe, code, reason } => {
            on_refused(env, ctx, conns, &channel, reply, subscribe, code, reason)
        }
    }
}

fn send_reply(env: &Env, ctx: &mut Ctx, conns: &mut Conns, to: ReplyTo, frame: Bytes) {
    if usize::from(to.shard) == env.id {
        reply_to_conn(env, ctx, conns, to.conn, &frame);
    } else {
        let _ = ctx.chans.outbox.send(usize::from(to.shard), ShardMsg::Reply { conn: to.conn, frame });
    }
}

fn answer_refused(env: &Env, ctx: &mut Ctx, conns: &mut Conns, to: ReplyTo, msg: ShardMsg) {
    if usize::from(to.shard) == env.id {
        handle(env, ctx, conns, msg);
    } else {
        let _ = ctx.chans.outbox.send(usize::from(to.shard), msg);
    }
}

/// Writes a frame that arrived for a connection of this shard, if it is still connected and open.
fn reply_to_conn(env: &Env, ctx: &mut Ctx, conns: &mut Conns, key: ConnKey, frame: &[u8]) {
    if let Some(conn) = conns.get_mut(key).filter(|c| crate::http::sse::awaits_publish(ctx, key, c)) {
        return crate::http::sse::published(env, ctx, key, conn, Ok(frame));
    }
    let Some(conn) = conns.get_mut(key).filter(|c| c.phase.is_open()) else { return };
    ctx.out.extend_from_slice(frame);
    write::send_out(env, ctx, key, conn);
}

/// A request refused at the home: the connection gets the error and a strike; a refused subscription's
/// pending entry is undone.
#[allow(clippy::too_many_arguments)]
fn on_refused(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    channel: &Arc<str>,
    reply: ReplyTo,
    subscribe: bool,
    code: &'static str,
    reason: &'static str,
) {
    if subscribe {
        if let Some(idx) = ctx.chans.local_idx(channel) {
            ctx.chans.locals[idx].pending = ctx.chans.locals[idx].pending.saturating_sub(1);
            if let Some(conn) = conns.get_mut(reply.conn) {
                if let Some(pos) = conn.subs.iter().position(|s| s.chan as usize == idx && !s.is_active()) {
                    if conn.subs.swap_remove(pos).slot == ConnSub::CANCELLED {
                        // It was unsubscribed meanwhile: that unsubscribe is answered too, after the error.
                        let at = ctx.chans.cancelled.iter().position(|&(k, c, _)| k == reply.conn && c == idx);
                        if let Some(i) = at {
                            let id = ctx.chans.cancelled.swap_remove(i).2;
                            if conn.phase.is_open() {
                                text_frame(&mut ctx.out, |o| message::encode_error(o, reply.id, code, reason));
                                text_frame(&mut ctx.out, |o| message::encode_unsubscribed(o, id, channel));
                                write::send_out(env, ctx, reply.conn, conn);
                            }
                            drop_refused_local(env, ctx, idx, channel);
                            return;
                        }
                    }
                }
            }
            drop_refused_local(env, ctx, idx, channel);
        }
    }
    if let Some(conn) = conns.get_mut(reply.conn).filter(|c| crate::http::sse::awaits_publish(ctx, reply.conn, c)) {
        return crate::http::sse::published(env, ctx, reply.conn, conn, Err((code, reason)));
    }
    let Some(conn) = conns.get_mut(reply.conn).filter(|c| c.phase.is_open()) else { return };
    if conn.phase == Phase::Sse {
        crate::http::sse::refused(env, ctx, reply.conn, conn, channel, code, reason);
        return;
    }
    refuse(env, ctx, reply.conn, conn, reply.id, code, reason);
    write::send_out(env, ctx, reply.conn, conn);
}

/// Drops a local channel a refused subscription leaves empty, and then tells the home this shard has no
/// subscriber left: a home that counted the shard before refusing (the relay, whose subscribers waiting
/// when Redis went away are refused) stops sending it the channel.
fn drop_refused_local(env: &Env, ctx: &mut Ctx, idx: usize, channel: &Arc<str>) {
    ctx.chans.drop_local_if_unused(idx);
    if ctx.chans.local_idx(channel).is_none() {
        let home = env.home(channel);
        if home != env.id {
            let msg = ShardMsg::Unsubscribe {
                channel: channel.as_ref().into(),
                shard: env.id as u16,
                user: None,
                last: true,
            };
            let _ = ctx.chans.outbox.send(home, msg);
        }
    }
}

/// A subscription confirmed by the home: position the subscriber, send `subscribed` and the missed
/// messages. If the connection left or unsubscribed in the meantime, undo it at the home (after answering
/// both commands, in order, when the connection is still there).
#[allow(clippy::too_many_arguments)]
fn on_subscribed(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    channel: &Arc<str>,
    reply: ReplyTo,
    offset: u64,
    (frame, missed): (&Bytes, &[Bytes]),
    user: Option<Arc<str>>,
) {
    let Some(idx) = ctx.chans.local_idx(channel) else { return };
    ctx.chans.locals[idx].pending = ctx.chans.locals[idx].pending.saturating_sub(1);
    let Some(conn) = conns.get_mut(reply.conn).filter(|c| c.phase.is_open()) else {
        ctx.chans.cancelled.retain(|&(k, c, _)| !(k == reply.conn && c == idx));
        ctx.chans.undo_subscription(env, idx, channel, user);
        return;
    };
    let Some(pos) = conn.subs.iter().position(|s| s.chan as usize == idx && !s.is_active()) else {
        ctx.chans.undo_subscription(env, idx, channel, user);
        return;
    };
    if conn.phase == Phase::Sse {
        let slot = ctx.chans.locals[idx].subscribe(reply.conn, offset);
        conn.subs[pos].slot = slot as u32;
        crate::http::sse::confirmed(env, ctx, reply.conn, conn, idx, offset, frame, missed);
        return;
    }
    ctx.out.extend_from_slice(frame);
    if conn.subs[pos].slot == ConnSub::CANCELLED {
        conn.subs.swap_remove(pos);
        let at = ctx.chans.cancelled.iter().position(|&(k, c, _)| k == reply.conn && c == idx);
        let id = at.and_then(|i| ctx.chans.cancelled.swap_remove(i).2);
        text_frame(&mut ctx.out, |o| message::encode_unsubscribed(o, id, channel));
        write::send_out(env, ctx, reply.conn, conn);
        ctx.chans.undo_subscription(env, idx, channel, user);
        return;
    }
    let slot = ctx.chans.locals[idx].subscribe(reply.conn, offset);
    conn.subs[pos].slot = slot as u32;
    for f in missed {
        ctx.out.extend_from_slice(f);
    }
    ShardMetrics::inc(&env.metrics.subscriptions_total);
    ShardMetrics::inc(&env.metrics.active_subscriptions);
    write::send_out(env, ctx, reply.conn, conn);
}
