//! Wire protocol v1 on `GET /ws`: the commands of clients, and (in [`inbox`]) the messages from other
//! shards that answer them.
//!
//! A command about a channel is handled on the spot when this shard is the channel's home, and otherwise
//! sent to the home through the inter-shard ring; the answer comes back the same way and is written to the
//! connection if it is still there. Offsets are assigned only at the home, so all subscribers of a channel,
//! on every shard, see its messages in one order.
//!
//! Every refused command — malformed, forbidden, over a bound, over the rate limit — gets an `error` reply
//! and counts as a strike against the connection ([`close::strike`]): no command is free to repeat. Only
//! `overloaded` (the server's fault, not the client's) is not counted.

pub mod inbox;

use bytes::Bytes;
use throng_protocol::message::{self, Command};

use std::sync::Arc;

use crate::auth::{Action, Denied};
use crate::channel::bus::{ReplyTo, Sent, ShardMsg};
use crate::channel::{text_frame, Refusal};
use crate::config::Namespace;
use crate::conn::close;
use crate::conn::{timers, Conn, ConnKey, ConnSub};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

fn error_reply(out: &mut Vec<u8>, id: Option<u64>, code: &str, reason: &str) {
    text_frame(out, |o| message::encode_error(o, id, code, reason));
}

/// Refuses a command: a strike, and the `error` reply unless the strike closed the connection.
pub fn refuse(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, id: Option<u64>, code: &str, reason: &str) {
    let rate = code == "rate_limited";
    if !close::strike(env, ctx, key, conn, rate) {
        error_reply(&mut ctx.out, id, code, reason);
    }
}

/// Sends a request to a channel's home; when the ring refuses it, answers the client `overloaded` now.
fn to_home(env: &Env, ctx: &mut Ctx, home: usize, msg: ShardMsg, id: Option<u64>) -> bool {
    match ctx.chans.outbox.send(home, msg) {
        Sent::Queued => true,
        Sent::Refused(_) => {
            ShardMetrics::inc(&env.metrics.overloaded_total);
            error_reply(&mut ctx.out, id, "overloaded", "the channel's shard is overloaded, retry later");
            false
        }
    }
}

/// A decoded command with what it borrowed from the decoder copied out (the channel name, positions),
/// so the decoder's borrow ends before the command runs; `data` stays a range of the payload.
enum Owned {
    Ping(Option<u64>),
    Refresh(Option<u64>, Box<str>),
    Subscribe(Option<u64>, Box<str>, Option<(u64, Box<str>)>),
    Unsubscribe(Option<u64>, Box<str>),
    Publish(Option<u64>, Box<str>, std::ops::Range<usize>),
    Presence(Option<u64>, Box<str>),
    History(Option<u64>, Box<str>, Option<(u64, Box<str>)>, u32),
}

/// Where `inner` lies within `outer`, if it does.
fn range_in(outer: &[u8], inner: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (start + inner.len() <= outer.len()).then_some(start..start + inner.len())
}

/// A binary message on `/ws`: not part of the protocol.
pub fn on_binary(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    ShardMetrics::inc(&env.metrics.commands_total);
    refuse(env, ctx, key, conn, None, "bad_request", "binary messages are not part of protocol v1; send JSON text");
}

/// A message over the connection's rate limit: refused without being run. It is still decoded, for its
/// `id`, so the client can tell which command was refused; that costs at most [`close::MAX_STRIKES`]
/// decodes before a client that keeps on is closed.
pub fn on_rate_limited(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, payload: &[u8]) {
    ShardMetrics::inc(&env.metrics.commands_total);
    let id = match ctx.decoder.decode(payload) {
        Ok(cmd) => cmd.id(),
        Err(f) => f.id,
    };
    let reason = "over max_messages_per_second or max_bytes_per_second; slow down";
    refuse(env, ctx, key, conn, id, "rate_limited", reason);
}

/// Handles one text message of a `/ws` connection. Replies go to `ctx.out`.
pub fn on_command(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, payload: &[u8]) {
    ShardMetrics::inc(&env.metrics.commands_total);
    let since = |s: Option<message::Since<'_>>| s.map(|s| (s.offset, Box::<str>::from(s.epoch)));
    let owned = match ctx.decoder.decode(payload) {
        Ok(Command::Ping { id }) => Owned::Ping(id),
        Ok(Command::Refresh { id, token }) => Owned::Refresh(id, token.into()),
        Ok(Command::Subscribe { id, channel, since: s }) => Owned::Subscribe(id, channel.into(), since(s)),
        Ok(Command::Unsubscribe { id, channel }) => Owned::Unsubscribe(id, channel.into()),
        Ok(Command::Publish { id, channel, data }) => match range_in(payload, data) {
            Some(r) => Owned::Publish(id, channel.into(), r),
            None => {
                error_reply(&mut ctx.out, id, "internal", "publish data was not found in the message");
                return;
            }
        },
        Ok(Command::Presence { id, channel }) => Owned::Presence(id, channel.into()),
        Ok(Command::History { id, channel, since: s, limit }) => {
            Owned::History(id, channel.into(), since(s), limit.unwrap_or(100))
        }
        Err(f) => {
            let (reason, code, id) = (f.error.to_string(), f.code(), f.id);
            refuse(env, ctx, key, conn, id, code, &reason);
            return;
        }
    };
    match owned {
        Owned::Ping(id) => {
            close::forgive(conn);
            text_frame(&mut ctx.out, |o| message::encode_pong(o, id));
        }
        Owned::Refresh(id, token) => refresh(env, ctx, key, conn, id, &token),
        Owned::Subscribe(id, channel, since) => subscribe(env, ctx, key, conn, id, &channel, since),
        Owned::Unsubscribe(id, channel) => unsubscribe(env, ctx, key, conn, id, &channel),
        Owned::Publish(id, channel, data) => publish(env, ctx, key, conn, id, channel, &payload[data]),
        Owned::Presence(id, channel) => {
            let Some(ns) = check_channel(env, ctx, key, conn, id, &channel, Action::Presence) else { return };
            if !ns.presence {
                refuse(env, ctx, key, conn, id, "not_available", "presence is disabled in this namespace");
                return;
            }
            close::forgive(conn);
            let home = env.home(&channel);
            if home == env.id {
                let f = ctx.chans.presence_reply(env, &channel, id);
                ctx.out.extend_from_slice(&f);
            } else {
                let reply = ReplyTo { shard: env.id as u16, conn: key, id };
                to_home(env, ctx, home, ShardMsg::Presence { channel, reply }, id);
            }
        }
        Owned::History(id, channel, since, limit) => {
            if check_channel(env, ctx, key, conn, id, &channel, Action::History).is_none() {
                return;
            }
            close::forgive(conn);
            let home = env.home(&channel);
            if home == env.id {
                let since = since.as_ref().map(|(o, e)| (*o, &**e));
                let f = ctx.chans.history_reply(env, &channel, id, since, limit);
                ctx.out.extend_from_slice(&f);
            } else {
                let reply = ReplyTo { shard: env.id as u16, conn: key, id };
                to_home(env, ctx, home, ShardMsg::History { channel, reply, since, limit }, id);
            }
        }
    }
}

/// Namespace and permission checks ([`crate::auth::Identity::may`]); on refusal answers (a strike) and
/// returns `None`.
fn check_channel<'e>(
    env: &'e Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    id: Option<u64>,
    channel: &str,
    action: Action,
) -> Option<&'e Namespace> {
    let Some(ns) = env.cfg().namespaces.of_channel(channel) else {
        refuse(env, ctx, key, conn, id, "unknown_namespace", "no such namespace is configured");
        return None;
    };
    let verdict = match &conn.id {
        Some(identity) => identity.may(action, channel, ns),
        None => Err(Denied::NotGranted),
    };
    if let Err(denied) = verdict {
        ShardMetrics::inc(&env.metrics.forbidden_total);
        refuse(env, ctx, key, conn, id, "forbidden", denied.reason());
        return None;
    }
    Some(ns)
}

/// `refresh`: a new token for the same user replaces the connection's identity (new claims, new expiry).
fn refresh(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, id: Option<u64>, token: &str) {
    let Some(verifier) = &env.shared.auth else {
        let reason = "this server runs without JWT auth (no key configured), so there is no token to refresh";
        refuse(env, ctx, key, conn, id, "not_supported", reason);
        return;
    };
    let mut fresh = match verifier.verify(token) {
        Ok(i) => i,
        Err(e) => {
            refuse(env, ctx, key, conn, id, "bad_token", &e.to_string());
            return;
        }
    };
    let Some((user, ip)) = conn.id.as_ref().map(|old| (old.user.clone(), old.ip)) else { return };
    if fresh.user != user {
        ShardMetrics::inc(&env.metrics.forbidden_total);
        refuse(env, ctx, key, conn, id, "forbidden", "the new token is for another user");
        return;
    }
    close::forgive(conn);
    // Counted under the same user and address as before.
    fresh.ip = ip;
    let expires = fresh.exp();
    conn.expires_at = timers::expiry_tick(env, expires);
    conn.id = Some(Arc::new(fresh));
    timers::expiry_moved(ctx, conn);
    ShardMetrics::inc(&env.metrics.refreshes_total);
    text_frame(&mut ctx.out, |o| message::encode_refreshed(o, id, expires));
}

fn subscribe(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    id: Option<u64>,
    channel: &str,
    since: Option<(u64, Box<str>)>,
) {
    let Some(ns) = check_channel(env, ctx, key, conn, id, channel, Action::Subscribe) else { return };
    let existing = ctx.chans.local_idx(channel);
    if existing.is_some_and(|i| conn.subs.iter().any(|s| s.chan as usize == i)) {
        refuse(env, ctx, key, conn, id, "already_subscribed", "already subscribed to this channel");
        return;
    }
    if conn.subs.len() >= env.cfg().max_subscriptions {
        ShardMetrics::inc(&env.metrics.subscription_limit_total);
        let reason = "max_subscriptions per connection reached";
        refuse(env, ctx, key, conn, id, "too_many_subscriptions", reason);
        return;
    }
    let idx = match ctx.chans.local_entry(env, channel, ns) {
        Ok(i) => i,
        Err(Refusal { code, reason }) => {
            refuse(env, ctx, key, conn, id, code, reason);
            return;
        }
    };
    let user = ns.presence.then(|| conn.presence_user());
    let home = env.home(channel);
    let reply = ReplyTo { shard: env.id as u16, conn: key, id };
    if home == env.id {
        let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
        match ctx.chans.subscribe_at_home(env, channel, reply, since_ref, user.as_ref()) {
            Ok((frame, missed, offset)) => {
                close::forgive(conn);
                let slot = ctx.chans.locals[idx].subscribe(key, offset);
                conn.subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
                ctx.out.extend_from_slice(&frame);
                for f in &missed {
                    ctx.out.extend_from_slice(f);
                }
                ShardMetrics::inc(&env.metrics.subscriptions_total);
                ShardMetrics::inc(&env.metrics.active_subscriptions);
            }
            Err(Refusal { code, reason }) => {
                ctx.chans.drop_local_if_unused(idx);
                refuse(env, ctx, key, conn, id, code, reason);
            }
        }
    } else {
        let msg = ShardMsg::Subscribe { channel: channel.into(), reply, since, user };
        if to_home(env, ctx, home, msg, id) {
            close::forgive(conn);
            ctx.chans.locals[idx].pending += 1;
            conn.subs.push(ConnSub { chan: idx as u32, slot: ConnSub::PENDING });
        } else {
            ctx.chans.drop_local_if_unused(idx);
        }
    }
}

fn unsubscribe(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, id: Option<u64>, channel: &str) {
    let found = ctx.chans.local_idx(channel).and_then(|idx| {
        conn.subs.iter().position(|s| s.chan as usize == idx && s.slot != ConnSub::CANCELLED).map(|p| (idx, p))
    });
    let Some((idx, pos)) = found else {
        refuse(env, ctx, key, conn, id, "not_subscribed", "not subscribed to this channel");
        return;
    };
    close::forgive(conn);
    if conn.subs[pos].slot == ConnSub::PENDING {
        // Its `subscribed` is still on the way: answer both, in order, when it arrives.
        conn.subs[pos].slot = ConnSub::CANCELLED;
        ctx.chans.cancelled.push((key, idx, id));
        return;
    }
    let sub = conn.subs.swap_remove(pos);
    ctx.chans.leave(env, &conn.presence_user(), sub);
    text_frame(&mut ctx.out, |o| message::encode_unsubscribed(o, id, channel));
}

fn publish(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, id: Option<u64>, channel: Box<str>, data: &[u8]) {
    if check_channel(env, ctx, key, conn, id, &channel, Action::Publish).is_none() {
        return;
    }
    let home = env.home(&channel);
    let born = crate::metrics::stamp(env.shared.started);
    if home == env.id {
        match ctx.chans.publish_at(env, &channel, data, born) {
            Ok(offset) => {
                close::forgive(conn);
                text_frame(&mut ctx.out, |o| message::encode_published(o, id, offset));
            }
            Err(Refusal { code, reason }) => refuse(env, ctx, key, conn, id, code, reason),
        }
    } else {
        close::forgive(conn);
        let reply = Some(ReplyTo { shard: env.id as u16, conn: key, id });
        let msg = ShardMsg::Publish { channel, data: Bytes::copy_from_slice(data), reply, born };
        to_home(env, ctx, home, msg, id);
    }
}
