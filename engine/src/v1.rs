//! Wire protocol v1 on `GET /ws`: commands from clients, the home-shard side of channels, and the inbox
//! task that handles messages from other shards.
//!
//! A command about a channel is handled on the spot when this shard is the channel's home, and otherwise
//! sent to the home through the inter-shard ring; the answer comes back the same way and is written to the
//! connection if it is still there. Offsets are assigned only at the home, so all subscribers of a channel,
//! on every shard, see its messages in one order.

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use throng_protocol::frame::{frame_with, OpCode};
use throng_protocol::message::{self, Command};

use crate::bus::{ReplyTo, Sent, ShardMsg};
use crate::channel::{home_of, HomeChannel, LocalChannel};
use crate::config::Namespace;
use crate::conn::{self, Conn, ConnKey, ConnSub};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Inner, Shard};

/// Most channels one connection may be subscribed to.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Refused commands a connection may send (net of accepted ones) before it is closed with 1008.
pub const MAX_STRIKES: u8 = 16;
/// Most users listed in a presence reply (`count` stays exact).
const MAX_PRESENCE_USERS: usize = 1000;

/// Appends one unmasked text frame whose payload `body` writes, with the header right before it.
pub fn text_frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let base = out.len();
    let start = frame_with(out, OpCode::Text, body);
    out.drain(base..start);
}

/// A text frame as shared bytes (for replies crossing shards).
fn frame_bytes(body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut v = Vec::with_capacity(128);
    text_frame(&mut v, body);
    Bytes::from(v)
}

fn error_reply(out: &mut Vec<u8>, id: Option<u64>, code: &str, reason: &str) {
    text_frame(out, |o| message::encode_error(o, id, code, reason));
}

/// The namespace settings of a channel name, or `None` if its namespace does not exist.
fn namespace_of(shard: &Shard, channel: &str) -> Option<Namespace> {
    let ns = channel.split_once(':').map_or("", |(ns, _)| ns);
    shard.shared.config.namespaces.resolve(ns)
}

fn history_ttl_ticks(ns: &Namespace) -> u64 {
    Shard::ticks(ns.history_ttl)
}

/// The channel's home state on this shard, created on first use.
fn home_entry<'a>(shard: &Shard, ctx: &'a mut Ctx, channel: &str) -> &'a mut HomeChannel {
    if !ctx.homes.contains_key(channel) {
        let ns = namespace_of(shard, channel);
        let (size, ttl) = ns.as_ref().map_or((0, 1), |n| (n.history_size, history_ttl_ticks(n)));
        ctx.epochs += 1;
        let epoch = format!("{:x}-{:x}", shard.shared.boot_id, ctx.epochs * 64 + shard.id as u64);
        let h = HomeChannel::new(channel, epoch.into_boxed_str(), size, ttl);
        ctx.homes.insert(h.name.clone(), h);
    }
    ctx.homes.get_mut(channel).expect("inserted above")
}

/// Marks a local channel as having new frames and wakes the flush task.
fn mark_dirty(shard: &Shard, ctx: &mut Ctx, idx: usize) {
    let ch = &mut ctx.channels[idx];
    if !ch.dirty {
        ch.dirty = true;
        ctx.dirty.push(idx);
        shard.flush_wake.notify();
    }
}

/// Publishes at the home: assigns the offset, encodes the frame once, appends it to the local log and
/// sends one pointer to every other interested shard.
fn home_publish(shard: &Shard, ctx: &mut Ctx, channel: &str, data: &[u8]) -> u64 {
    let now = shard.now.get();
    let home = home_entry(shard, ctx, channel);
    let entry = home.publish(data, now);
    let name = home.name.clone();
    let mut interested = home.interested;
    if let Some(&idx) = ctx.channel_index.get(channel) {
        if ctx.channels[idx].append(entry.offset, &entry.frame) {
            mark_dirty(shard, ctx, idx);
        }
    }
    while interested != 0 {
        let dest = interested.trailing_zeros() as usize;
        interested &= interested - 1;
        let msg = ShardMsg::Deliver { channel: name.clone(), offset: entry.offset, frame: entry.frame.clone() };
        let _ = ctx.outbox.send(dest, msg);
    }
    ShardMetrics::inc(&shard.metrics.publishes_total);
    entry.offset
}

/// Subscribes at the home: presence, interest, recovery. Returns the `subscribed` reply frame, the
/// missed frames, and the offset the subscriber is positioned at.
fn home_subscribe(
    shard: &Shard,
    ctx: &mut Ctx,
    channel: &str,
    reply: ReplyTo,
    since: Option<(u64, &str)>,
    user: Option<&str>,
) -> (Bytes, Vec<Bytes>, u64) {
    let now = shard.now.get();
    let home = home_entry(shard, ctx, channel);
    if let Some(u) = user {
        home.join(u);
    }
    if usize::from(reply.shard) != shard.id {
        home.interested |= 1 << reply.shard;
    }
    let rec = home.recover(since, now);
    let (offset, epoch) = (home.offset, home.epoch.clone());
    let recovered = since.is_some() && rec.recovered;
    let frame = frame_bytes(|o| message::encode_subscribed(o, reply.id, channel, offset, &epoch, recovered));
    (frame, rec.missed.into_iter().map(|e| e.frame).collect(), offset)
}

fn home_unsubscribe(ctx: &mut Ctx, channel: &str, from: usize, user: Option<&str>, last: bool, home_id: usize) {
    if let Some(home) = ctx.homes.get_mut(channel) {
        if let Some(u) = user {
            home.leave(u);
        }
        if last && from != home_id {
            home.interested &= !(1u64 << from);
        }
    }
}

fn home_presence(shard: &Shard, ctx: &mut Ctx, channel: &str, id: Option<u64>) -> Bytes {
    let home = home_entry(shard, ctx, channel);
    let mut users: Vec<(&str, u32)> = home.presence.iter().map(|(u, n)| (&**u, *n)).collect();
    users.sort_unstable();
    users.truncate(MAX_PRESENCE_USERS);
    frame_bytes(|o| message::encode_presence(o, id, channel, home.connections, users))
}

fn home_history(
    shard: &Shard,
    ctx: &mut Ctx,
    channel: &str,
    id: Option<u64>,
    since: Option<(u64, &str)>,
    limit: u32,
) -> Bytes {
    let now = shard.now.get();
    let home = home_entry(shard, ctx, channel);
    home.trim(now);
    let (msgs, recovered) = match since {
        Some(_) => {
            let rec = home.recover(since, now);
            (rec.missed, Some(rec.recovered))
        }
        None => (home.history.iter().cloned().collect(), None),
    };
    let skip = msgs.len().saturating_sub(limit as usize);
    let recovered = recovered.map(|r| r && skip == 0);
    frame_bytes(|o| {
        message::encode_history(
            o,
            id,
            channel,
            home.offset,
            &home.epoch,
            msgs[skip..].iter().map(|e| (e.offset, e.data())),
            recovered,
        )
    })
}

/// Sends a request to a channel's home; when the ring refuses it, answers the client `overloaded` now.
fn to_home(shard: &Shard, ctx: &mut Ctx, home: usize, msg: ShardMsg, id: Option<u64>) -> bool {
    match ctx.outbox.send(home, msg) {
        Sent::Queued => true,
        Sent::Refused(_) => {
            ShardMetrics::inc(&shard.metrics.overloaded_total);
            error_reply(&mut ctx.out, id, "overloaded", "the channel's shard is overloaded, retry later");
            false
        }
    }
}

/// A decoded command with what it borrowed from the decoder copied out (the channel name, positions),
/// so the decoder's borrow ends before the command runs; `data` stays a range of the payload.
enum Owned {
    Ping(Option<u64>),
    Refresh(Option<u64>),
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

/// Handles one text message of a `/ws` connection. Replies go to `ctx.out`.
pub fn on_command(shard: &Rc<Shard>, key: ConnKey, conn: &mut Conn, payload: &[u8], ctx: &mut Ctx) {
    ShardMetrics::inc(&shard.metrics.commands_total);
    let since = |s: Option<message::Since<'_>>| s.map(|s| (s.offset, Box::<str>::from(s.epoch)));
    let owned = match ctx.decoder.decode(payload) {
        Ok(Command::Ping { id }) => Owned::Ping(id),
        Ok(Command::Refresh { id, .. }) => Owned::Refresh(id),
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
            strike(shard, conn, ctx, id, code, &reason);
            return;
        }
    };
    conn.strikes = conn.strikes.saturating_sub(1);
    match owned {
        Owned::Ping(id) => text_frame(&mut ctx.out, |o| message::encode_pong(o, id)),
        Owned::Refresh(id) => error_reply(
            &mut ctx.out,
            id,
            "not_supported",
            "this server runs without JWT auth (no key configured), so there is no token to refresh",
        ),
        Owned::Subscribe(id, channel, since) => subscribe(shard, key, conn, ctx, id, &channel, since),
        Owned::Unsubscribe(id, channel) => unsubscribe(shard, key, conn, ctx, id, &channel),
        Owned::Publish(id, channel, data) => publish(shard, key, conn, ctx, id, channel, &payload[data]),
        Owned::Presence(id, channel) => {
            let Some(ns) = check_channel(shard, conn, ctx, id, &channel, Access::Read) else { return };
            if !ns.presence {
                error_reply(&mut ctx.out, id, "not_available", "presence is disabled in this namespace");
                return;
            }
            let home = home_of(&channel, shard.shared.metrics.len());
            if home == shard.id {
                let f = home_presence(shard, ctx, &channel, id);
                ctx.out.extend_from_slice(&f);
            } else {
                let reply = ReplyTo { shard: shard.id as u16, conn: key, id };
                to_home(shard, ctx, home, ShardMsg::Presence { channel, reply }, id);
            }
        }
        Owned::History(id, channel, since, limit) => {
            if check_channel(shard, conn, ctx, id, &channel, Access::Read).is_none() {
                return;
            }
            let home = home_of(&channel, shard.shared.metrics.len());
            if home == shard.id {
                let f = home_history(shard, ctx, &channel, id, since.as_ref().map(|(o, e)| (*o, &**e)), limit);
                ctx.out.extend_from_slice(&f);
            } else {
                let reply = ReplyTo { shard: shard.id as u16, conn: key, id };
                to_home(shard, ctx, home, ShardMsg::History { channel, reply, since, limit }, id);
            }
        }
    }
}

/// Counts a refused command against the connection; past [`MAX_STRIKES`] it is closed with 1008.
fn strike(shard: &Shard, conn: &mut Conn, ctx: &mut Ctx, id: Option<u64>, code: &str, reason: &str) {
    ShardMetrics::inc(&shard.metrics.bad_commands_total);
    conn.strikes = conn.strikes.saturating_add(1);
    if conn.strikes >= MAX_STRIKES {
        ShardMetrics::inc(&shard.metrics.abuse_closes_total);
        conn::close_now(shard, conn, ctx, throng_protocol::frame::close::POLICY, "too many invalid commands");
        return;
    }
    error_reply(&mut ctx.out, id, code, reason);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Publish,
}

/// Namespace and permission checks; on refusal writes the error reply and returns `None`.
fn check_channel(
    shard: &Shard,
    conn: &mut Conn,
    ctx: &mut Ctx,
    id: Option<u64>,
    channel: &str,
    access: Access,
) -> Option<Namespace> {
    let Some(ns) = namespace_of(shard, channel) else {
        strike(shard, conn, ctx, id, "unknown_namespace", "no such namespace is configured");
        return None;
    };
    if ns.name == "user" {
        let owner = channel.split_once(':').map_or("", |(_, n)| n);
        if access == Access::Publish || owner != &*conn.user {
            ShardMetrics::inc(&shard.metrics.forbidden_total);
            error_reply(&mut ctx.out, id, "forbidden", "personal channels are only for their owner to subscribe to");
            return None;
        }
    }
    if access == Access::Publish && !ns.client_publish {
        ShardMetrics::inc(&shard.metrics.forbidden_total);
        error_reply(&mut ctx.out, id, "forbidden", "clients may not publish in this namespace");
        return None;
    }
    Some(ns)
}

fn local_channel(ctx: &mut Ctx, channel: &str, ns: &Namespace) -> usize {
    if let Some(&i) = ctx.channel_index.get(channel) {
        return i;
    }
    let name: Arc<str> = Arc::from(channel);
    let i = ctx.channels.insert(LocalChannel::new(name.clone(), ns.slow_consumer));
    ctx.channel_index.insert(name, i);
    i
}

fn subscribe(
    shard: &Rc<Shard>,
    key: ConnKey,
    conn: &mut Conn,
    ctx: &mut Ctx,
    id: Option<u64>,
    channel: &str,
    since: Option<(u64, Box<str>)>,
) {
    let Some(ns) = check_channel(shard, conn, ctx, id, channel, Access::Read) else { return };
    let existing = ctx.channel_index.get(channel).copied();
    if existing.is_some_and(|i| conn.subs.iter().any(|s| s.chan as usize == i)) {
        error_reply(&mut ctx.out, id, "already_subscribed", "already subscribed to this channel");
        return;
    }
    if conn.subs.len() >= MAX_SUBSCRIPTIONS {
        error_reply(&mut ctx.out, id, "too_many_subscriptions", "subscription limit per connection reached");
        return;
    }
    let user = ns.presence.then(|| conn.user.clone());
    let home = home_of(channel, shard.shared.metrics.len());
    let reply = ReplyTo { shard: shard.id as u16, conn: key, id };
    if home == shard.id {
        let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
        let (frame, missed, offset) = home_subscribe(shard, ctx, channel, reply, since_ref, user.as_deref());
        let idx = local_channel(ctx, channel, &ns);
        let slot = ctx.channels[idx].subscribe(key, offset);
        conn.subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
        ctx.out.extend_from_slice(&frame);
        for f in &missed {
            ctx.out.extend_from_slice(f);
        }
        ShardMetrics::inc(&shard.metrics.subscriptions_total);
    } else {
        let msg = ShardMsg::Subscribe { channel: channel.into(), reply, since, user };
        if to_home(shard, ctx, home, msg, id) {
            let idx = local_channel(ctx, channel, &ns);
            ctx.channels[idx].pending += 1;
            conn.subs.push(ConnSub { chan: idx as u32, slot: ConnSub::PENDING });
        }
    }
}

/// Removes one subscription of a connection (unsubscribe command or disconnect). Tells the home when
/// presence is tracked or this was the shard's last subscriber of the channel.
pub fn leave(shard: &Shard, ctx: &mut Ctx, user: &str, sub: ConnSub) {
    let idx = sub.chan as usize;
    let Some(ch) = ctx.channels.get_mut(idx) else { return };
    if sub.is_active() {
        ch.subs.try_remove(sub.slot as usize);
    }
    // A pending subscription is undone when its confirmation arrives (see `on_subscribed`).
    if !sub.is_active() {
        return;
    }
    let name = ch.name.clone();
    let last = ch.subs.is_empty() && ch.pending == 0;
    let presence = namespace_of(shard, &name).is_some_and(|n| n.presence);
    if last {
        ctx.channel_index.remove(&name);
        ctx.channels.remove(idx);
    }
    let user = presence.then(|| Box::<str>::from(user));
    let home = home_of(&name, shard.shared.metrics.len());
    if home == shard.id {
        home_unsubscribe(ctx, &name, shard.id, user.as_deref(), last, shard.id);
    } else if user.is_some() || last {
        let msg = ShardMsg::Unsubscribe { channel: name.as_ref().into(), shard: shard.id as u16, user, last };
        let _ = ctx.outbox.send(home, msg);
    }
}

fn unsubscribe(shard: &Shard, key: ConnKey, conn: &mut Conn, ctx: &mut Ctx, id: Option<u64>, channel: &str) {
    let Some(&idx) = ctx.channel_index.get(channel) else {
        error_reply(&mut ctx.out, id, "not_subscribed", "not subscribed to this channel");
        return;
    };
    let Some(pos) = conn.subs.iter().position(|s| s.chan as usize == idx && s.slot != ConnSub::CANCELLED) else {
        error_reply(&mut ctx.out, id, "not_subscribed", "not subscribed to this channel");
        return;
    };
    if conn.subs[pos].slot == ConnSub::PENDING {
        // Its `subscribed` is still on the way: answer both, in order, when it arrives.
        conn.subs[pos].slot = ConnSub::CANCELLED;
        ctx.cancelled.push((key, idx, id));
        return;
    }
    let sub = conn.subs.swap_remove(pos);
    leave(shard, ctx, &conn.user, sub);
    text_frame(&mut ctx.out, |o| message::encode_unsubscribed(o, id, channel));
}

fn publish(
    shard: &Shard,
    key: ConnKey,
    conn: &mut Conn,
    ctx: &mut Ctx,
    id: Option<u64>,
    channel: Box<str>,
    data: &[u8],
) {
    if check_channel(shard, conn, ctx, id, &channel, Access::Publish).is_none() {
        return;
    }
    let home = home_of(&channel, shard.shared.metrics.len());
    if home == shard.id {
        let offset = home_publish(shard, ctx, &channel, data);
        text_frame(&mut ctx.out, |o| message::encode_published(o, id, offset));
    } else {
        let reply = Some(ReplyTo { shard: shard.id as u16, conn: key, id });
        let msg = ShardMsg::Publish { channel, data: Bytes::copy_from_slice(data), reply };
        to_home(shard, ctx, home, msg, id);
    }
}

/// Writes a frame that arrived for a connection of this shard, if it is still connected.
fn reply_to_conn(shard: &Rc<Shard>, inner: &mut Inner, conn_key: ConnKey, frame: &[u8]) {
    let Inner { conns, ctx, .. } = inner;
    let Some(conn) = conns.get_mut(conn_key.idx as usize).filter(|c| c.gen == conn_key.gen) else { return };
    if conn.phase != conn::Phase::V1 {
        return;
    }
    ctx.out.extend_from_slice(frame);
    conn::send(shard, conn_key, conn, ctx);
}

/// A subscription confirmed by the home: position the subscriber, send `subscribed` and the missed
/// messages. If the connection left or unsubscribed in the meantime, undo it at the home (after answering
/// both commands, in order, when the connection is still there).
fn on_subscribed(
    shard: &Rc<Shard>,
    inner: &mut Inner,
    channel: &Arc<str>,
    reply: ReplyTo,
    offset: u64,
    (frame, missed): (&Bytes, &[Bytes]),
    user: Option<Box<str>>,
) {
    let Inner { conns, ctx, .. } = inner;
    let Some(&idx) = ctx.channel_index.get(channel) else { return };
    ctx.channels[idx].pending = ctx.channels[idx].pending.saturating_sub(1);
    let conn = conns.get_mut(reply.conn.idx as usize).filter(|c| c.gen == reply.conn.gen && c.phase == conn::Phase::V1);
    let Some(conn) = conn else {
        ctx.cancelled.retain(|&(k, c, _)| !(k == reply.conn && c == idx));
        undo_subscription(shard, ctx, idx, channel, user);
        return;
    };
    let Some(pos) = conn.subs.iter().position(|s| s.chan as usize == idx && !s.is_active()) else {
        undo_subscription(shard, ctx, idx, channel, user);
        return;
    };
    ctx.out.extend_from_slice(frame);
    if conn.subs[pos].slot == ConnSub::CANCELLED {
        conn.subs.swap_remove(pos);
        let at = ctx.cancelled.iter().position(|&(k, c, _)| k == reply.conn && c == idx);
        let id = at.and_then(|i| ctx.cancelled.swap_remove(i).2);
        text_frame(&mut ctx.out, |o| message::encode_unsubscribed(o, id, channel));
        conn::send(shard, reply.conn, conn, ctx);
        undo_subscription(shard, ctx, idx, channel, user);
        return;
    }
    let slot = ctx.channels[idx].subscribe(reply.conn, offset);
    conn.subs[pos].slot = slot as u32;
    for f in missed {
        ctx.out.extend_from_slice(f);
    }
    ShardMetrics::inc(&shard.metrics.subscriptions_total);
    conn::send(shard, reply.conn, conn, ctx);
}

/// Takes back at the home what it counted for a subscription that ended before it was confirmed.
fn undo_subscription(shard: &Shard, ctx: &mut Ctx, idx: usize, channel: &Arc<str>, user: Option<Box<str>>) {
    let ch = &ctx.channels[idx];
    let last = ch.subs.is_empty() && ch.pending == 0;
    if last {
        ctx.channel_index.remove(channel);
        ctx.channels.remove(idx);
    }
    let home = home_of(channel, shard.shared.metrics.len());
    let msg = ShardMsg::Unsubscribe { channel: channel.as_ref().into(), shard: shard.id as u16, user, last };
    let _ = ctx.outbox.send(home, msg);
}

/// Handles one message from another shard.
fn handle(shard: &Rc<Shard>, inner: &mut Inner, msg: ShardMsg) {
    let me = shard.id;
    match msg {
        ShardMsg::Deliver { channel, offset, frame } => {
            let ctx = &mut inner.ctx;
            if let Some(&idx) = ctx.channel_index.get(&channel) {
                if ctx.channels[idx].append(offset, &frame) {
                    mark_dirty(shard, ctx, idx);
                }
            }
        }
        ShardMsg::Lost { channel, from, to } => {
            let Inner { conns, ctx, .. } = inner;
            let Some(&idx) = ctx.channel_index.get(&channel) else { return };
            let gap = frame_bytes(|o| message::encode_gap(o, &channel, from, to));
            let keys: Vec<ConnKey> = ctx.channels[idx].subs.iter().map(|(_, s)| s.conn).collect();
            for k in keys {
                if let Some(c) = conns.get_mut(k.idx as usize).filter(|c| c.gen == k.gen) {
                    c.queued += gap.len() as u32;
                    c.outq.push_back(gap.clone());
                }
            }
            ShardMetrics::inc(&shard.metrics.gaps_total);
            mark_dirty(shard, ctx, idx);
        }
        ShardMsg::Publish { channel, data, reply } => {
            let ctx = &mut inner.ctx;
            let offset = home_publish(shard, ctx, &channel, &data);
            if let Some(r) = reply {
                let f = frame_bytes(|o| message::encode_published(o, r.id, offset));
                send_reply(shard, inner, r, f);
            }
        }
        ShardMsg::Subscribe { channel, reply, since, user } => {
            let ctx = &mut inner.ctx;
            let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
            let (frame, missed, offset) = home_subscribe(shard, ctx, &channel, reply, since_ref, user.as_deref());
            let name = ctx.homes.get(&*channel).map(|h| h.name.clone()).unwrap_or_else(|| Arc::from(&*channel));
            let msg = ShardMsg::Subscribed { channel: name, reply, offset, frame, missed, user };
            let _ = ctx.outbox.send(usize::from(reply.shard), msg);
        }
        ShardMsg::Subscribed { channel, reply, offset, frame, missed, user } => {
            on_subscribed(shard, inner, &channel, reply, offset, (&frame, &missed), user);
        }
        ShardMsg::Unsubscribe { channel, shard: from, user, last } => {
            home_unsubscribe(&mut inner.ctx, &channel, usize::from(from), user.as_deref(), last, me);
        }
        ShardMsg::Presence { channel, reply } => {
            let f = home_presence(shard, &mut inner.ctx, &channel, reply.id);
            send_reply(shard, inner, reply, f);
        }
        ShardMsg::History { channel, reply, since, limit } => {
            let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
            let f = home_history(shard, &mut inner.ctx, &channel, reply.id, since_ref, limit);
            send_reply(shard, inner, reply, f);
        }
        ShardMsg::Reply { conn, frame } => reply_to_conn(shard, inner, conn, &frame),
    }
}

fn send_reply(shard: &Rc<Shard>, inner: &mut Inner, to: ReplyTo, frame: Bytes) {
    if usize::from(to.shard) == shard.id {
        reply_to_conn(shard, inner, to.conn, &frame);
    } else {
        let _ = inner.ctx.outbox.send(usize::from(to.shard), ShardMsg::Reply { conn: to.conn, frame });
    }
}

/// Most messages handled per inbox turn before letting the shard's other tasks run.
const INBOX_BATCH: usize = 4096;

/// The inbox task: handles messages from other shards, sleeping (registered for a wake-up) when there are
/// none.
pub async fn inbox_task(shard: Rc<Shard>) {
    let inbox = &shard.shared.inboxes[shard.id];
    loop {
        let mut n = 0;
        {
            let mut guard = shard.inner.borrow_mut();
            while n < INBOX_BATCH {
                let Ok(msg) = inbox.rx.try_recv() else { break };
                handle(&shard, &mut guard, msg);
                n += 1;
            }
            guard.ctx.outbox.drain();
        }
        if n == INBOX_BATCH {
            // More is waiting: let connections run first (a task that wakes itself would run again at once).
            monoio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            inbox.waiting.store(true, Ordering::SeqCst);
            if inbox.rx.is_empty() {
                Poll::Pending
            } else {
                inbox.waiting.store(false, Ordering::SeqCst);
                Poll::Ready(())
            }
        })
        .await;
    }
}

/// Once per tick: retry overflowed ring messages; every few seconds, age history and forget idle channels.
pub fn housekeeping(shard: &Shard, now: u64) {
    let mut guard = shard.inner.borrow_mut();
    let Ctx { outbox, homes, channel_index, .. } = &mut guard.ctx;
    outbox.drain();
    if now.is_multiple_of(Shard::ticks(Duration::from_secs(2))) {
        // A channel is forgotten (its next incarnation gets a new epoch) only when nothing refers to it:
        // no subscribers on any shard, this one included, and no history left.
        homes.retain(|name, h| {
            h.trim(now);
            !h.is_idle() || channel_index.contains_key(name)
        });
    }
}
