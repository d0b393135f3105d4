//! Channels: homes, local logs, the shard-wide history budget, the inter-shard bus, and delivery.
//!
//! - [`home`]: a channel at its home shard (offsets, epoch, bounded history, presence);
//! - [`local`]: a channel's log of frames and cursors on a shard with subscribers;
//! - [`history`]: `max_history_bytes` over all of a shard's channels, oldest first;
//! - [`bus`]: the rings between shards, bounded in messages and bytes, and the full-ring policy;
//! - [`delivery`]: the flush pass that writes logs to subscribers, and the slow-consumer policy.
//!
//! [`Channels`] holds a shard's channel state and the operations on it that do not involve a connection:
//! publishing at the home, positioning subscribers, presence and history replies, joining and leaving.
//! Connection-facing commands are in `crate::v1`; this module never touches a connection, which is what
//! lets the connection layer end subscriptions when it closes without depending on the command layer.

pub mod api;
pub mod bus;
pub mod delivery;
pub mod history;
pub mod home;
pub mod local;

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;
use slab::Slab;
use throng_protocol::frame::{frame_with, OpCode};
use throng_protocol::message;

pub use home::{HistoryEntry, HomeChannel};
pub use local::LocalChannel;

use crate::config::Namespace;
use crate::conn::{ConnKey, ConnSub};
use crate::metrics::ShardMetrics;
use crate::shard::Env;
use bus::{Outbox, ReplyTo, ShardMsg};
use history::HistoryBudget;
use home::HistoryLimits;

/// The home shard of a channel: a fixed hash of its name (FNV-1a), the same on every shard.
pub fn home_of(name: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// The shards named by the set bits of an interest mask ([`HomeChannel::interested`]), lowest first.
pub fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            i
        })
    })
}

/// A request refused by a bound: the `error` reply's code and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable reason.
    pub reason: &'static str,
}

/// A publish or subscribe that would create a channel past `max_channels`.
pub const CHANNEL_LIMIT: Refusal =
    Refusal { code: "channel_limit", reason: "this shard holds max_channels channels; retry later" };

/// Appends one unmasked text frame whose payload `body` writes, with the header right before it.
pub fn text_frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let base = out.len();
    let start = frame_with(out, OpCode::Text, body);
    out.drain(base..start);
}

/// A text frame as shared bytes (for replies crossing shards).
pub fn frame_bytes(body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut v = Vec::with_capacity(128);
    text_frame(&mut v, body);
    Bytes::from(v)
}

/// A `presence` reply: users in name order (as `users` gives them), as many as fit in `max_reply` bytes (at
/// most 1000), `truncated` when some were left out; `count` (connections) stays exact.
pub fn presence_frame<'u>(
    max_reply: usize,
    name: &str,
    id: Option<u64>,
    connections: u64,
    users: impl Iterator<Item = (&'u str, u32)> + Clone,
    total_users: usize,
) -> Bytes {
    const MAX_USERS: usize = 1000;
    // A user costs at most 6 bytes per byte of its name (JSON escapes) plus the object around it.
    let mut room = max_reply.saturating_sub(256);
    let listed = users
        .clone()
        .take(MAX_USERS)
        .take_while(|(u, _)| {
            let cost = 6 * u.len() + 40;
            let fits = cost <= room;
            room = room.saturating_sub(cost);
            fits
        })
        .count();
    let truncated = listed < total_users;
    frame_bytes(|o| message::encode_presence(o, id, name, connections, users.take(listed), truncated))
}

/// A `history` reply from `newest`: the `wanted` candidate messages, newest first. As many as fit in
/// `max_reply` are sent, oldest first; `truncated` says the bound left some out. `complete` (when the client
/// gave `since`) says whether the candidates are every message after it; `recovered` is then true only if
/// all of them fit. `(offset, epoch)`: the channel's current position.
pub fn history_frame<'m>(
    max_reply: usize,
    name: &str,
    id: Option<u64>,
    (offset, epoch): (u64, &str),
    newest: impl Iterator<Item = (u64, &'m [u8])>,
    wanted: usize,
    complete: Option<bool>,
) -> Bytes {
    let mut room = max_reply.saturating_sub(256 + 6 * name.len());
    let mut fit: Vec<(u64, &[u8])> = newest
        .take(wanted)
        .take_while(|(_, data)| {
            let cost = data.len() + 48;
            let fits = cost <= room;
            room = room.saturating_sub(cost);
            fits
        })
        .collect();
    fit.reverse();
    let recovered = complete.map(|c| c && fit.len() == wanted);
    let truncated = fit.len() < wanted;
    frame_bytes(|o| message::encode_history(o, id, name, offset, epoch, fit.iter().copied(), recovered, truncated))
}

/// A channel's entries on this shard, [`Ix::NONE`] for either it lacks: a bucket of [`Channels`]' index.
#[derive(Clone, Copy, Debug)]
struct Ix {
    /// Index in `homes`.
    home: u32,
    /// Index in `locals`.
    local: u32,
}

impl Ix {
    const NONE: u32 = u32::MAX;
}

/// A shard's channel state.
#[derive(Debug)]
pub struct Channels {
    /// Channels with local subscribers, and their delivery logs.
    pub locals: Slab<LocalChannel>,
    /// Channels whose home is this shard.
    pub homes: Slab<HomeChannel>,
    /// Channel name -> its home and its local channel on this shard ([`Channels::home_idx`],
    /// [`Channels::local_idx`]): one table for both, 8 B a bucket, the names compared and hashed where the
    /// slabs hold them (a channel with both shares one name).
    index: HashTable<Ix>,
    /// Hashes `index`'s names (seeded per process: client-chosen names cannot aim at one bucket chain).
    hasher: RandomState,
    /// The distinct history bounds of the homes here ([`HomeChannel::limits`] indexes it): one entry per
    /// namespace at most, never shrinks.
    pub limits: Vec<HistoryLimits>,
    /// History bytes over all homes, oldest first.
    pub budget: HistoryBudget,
    /// Local channels with frames appended since their last flush.
    pub dirty: Vec<usize>,
    /// Messages to other shards, with the full-ring policy.
    pub outbox: Outbox,
    /// `unsubscribe` ids of subscriptions cancelled before their home confirmed them, answered (after the
    /// `subscribed`) when the confirmation arrives. Rarely non-empty.
    pub cancelled: Vec<(ConnKey, usize, Option<u64>)>,
    /// SplitMix64 state for epochs, seeded from the kernel: epochs differ across shards, restarts, nodes.
    epoch_state: u64,
    /// The tick history was last aged at.
    aged_at: u64,
}

impl Channels {
    /// Empty state around the shard's outbox.
    pub fn new(outbox: Outbox, max_history_bytes: usize) -> Self {
        Self {
            locals: Slab::new(),
            homes: Slab::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
            limits: Vec::new(),
            budget: HistoryBudget::new(max_history_bytes),
            dirty: Vec::new(),
            outbox,
            cancelled: Vec::new(),
            epoch_state: crate::sys::random_u64(),
            aged_at: 0,
        }
    }

    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The name an index entry stands for: its local channel's, else its home's (one allocation when both).
    fn name_of<'a>(homes: &'a Slab<HomeChannel>, locals: &'a Slab<LocalChannel>, ix: Ix) -> &'a str {
        if ix.local == Ix::NONE {
            &homes[ix.home as usize].name
        } else {
            &locals[ix.local as usize].name
        }
    }

    fn ix(&self, name: &str) -> Option<Ix> {
        let (homes, locals) = (&self.homes, &self.locals);
        self.index.find(self.hash(name), |&ix| Self::name_of(homes, locals, ix) == name).copied()
    }

    /// The home of `name` in `homes`, if this shard holds it.
    pub fn home_idx(&self, name: &str) -> Option<usize> {
        self.ix(name).map(|ix| ix.home).filter(|&h| h != Ix::NONE).map(|h| h as usize)
    }

    /// The local channel `name` in `locals`, if this shard has one.
    pub fn local_idx(&self, name: &str) -> Option<usize> {
        self.ix(name).map(|ix| ix.local).filter(|&l| l != Ix::NONE).map(|l| l as usize)
    }

    /// Records a home or local channel of `name` just put in its slab (`set` fills in its index).
    fn set_ix(&mut self, name: &str, set: impl FnOnce(&mut Ix)) {
        let hash = self.hash(name);
        let (homes, locals, hasher) = (&self.homes, &self.locals, &self.hasher);
        let eq = |ix: &Ix| Self::name_of(homes, locals, *ix) == name;
        let rehash = |ix: &Ix| hasher.hash_one(Self::name_of(homes, locals, *ix));
        let mut e = self.index.entry(hash, eq, rehash).or_insert(Ix { home: Ix::NONE, local: Ix::NONE });
        set(e.get_mut());
    }

    /// Forgets a home or local channel of `name` (`clear` sets its index to [`Ix::NONE`]) while it is still
    /// in its slab: the index compares names where the slabs hold them. The entry goes with the last of the two.
    fn clear_ix(&mut self, name: &str, clear: impl FnOnce(&mut Ix)) {
        let hash = self.hash(name);
        let (homes, locals) = (&self.homes, &self.locals);
        if let Ok(mut e) = self.index.find_entry(hash, |ix| Self::name_of(homes, locals, *ix) == name) {
            clear(e.get_mut());
            if e.get().home == Ix::NONE && e.get().local == Ix::NONE {
                e.remove();
            }
        }
    }

    /// Removes the local channel `idx` and its index.
    fn remove_local(&mut self, idx: usize) {
        let name = self.locals[idx].name.clone();
        self.clear_ix(&name, |ix| ix.local = Ix::NONE);
        self.locals.remove(idx);
    }

    /// A fresh random epoch (SplitMix64: distinct outputs for every step of one shard's sequence).
    fn next_epoch(&mut self) -> u64 {
        self.epoch_state = self.epoch_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.epoch_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The home of `name` on this shard, created if needed (within `max_channels`).
    fn home_entry(&mut self, env: &Env, name: &str) -> Result<usize, Refusal> {
        if let Some(i) = self.home_idx(name) {
            return Ok(i);
        }
        if self.homes.len() >= env.cfg().max_channels {
            ShardMetrics::inc(&env.metrics.channel_limit_total);
            return Err(CHANNEL_LIMIT);
        }
        let limits =
            env.cfg().namespaces.of_channel(name).map_or(HistoryLimits { size: 0, ttl_ticks: 1, bytes: 0 }, |ns| {
                HistoryLimits { size: ns.history_size, ttl_ticks: Env::ticks(ns.history_ttl), bytes: ns.history_bytes }
            });
        let limits = match self.limits.iter().position(|l| *l == limits) {
            Some(at) => at,
            None => {
                self.limits.push(limits);
                self.limits.len() - 1
            }
        } as u32;
        let epoch = self.next_epoch();
        // One allocation of the name for the home and the local channel on this shard.
        let local = self.local_idx(name);
        let shared = local.map_or_else(|| Arc::from(name), |l| self.locals[l].name.clone());
        let i = self.homes.insert(HomeChannel::named(shared, epoch, limits));
        self.set_ix(name, |ix| ix.home = i as u32);
        Ok(i)
    }

    /// The local channel `name`, created if needed (within `max_channels`).
    pub fn local_entry(&mut self, env: &Env, name: &str, ns: &Namespace) -> Result<usize, Refusal> {
        if let Some(i) = self.local_idx(name) {
            return Ok(i);
        }
        if self.locals.len() >= env.cfg().max_channels {
            ShardMetrics::inc(&env.metrics.channel_limit_total);
            return Err(CHANNEL_LIMIT);
        }
        // One allocation of the name for the local channel and its home, when the home is this shard.
        let shared = self.home_idx(name).map_or_else(|| Arc::from(name), |h| self.homes[h].name.clone());
        let i = self.locals.insert(LocalChannel::new(shared, ns.slow_consumer));
        self.set_ix(name, |ix| ix.local = i as u32);
        Ok(i)
    }

    /// Removes a local channel that ended up with nobody on it (a subscription refused or undone before
    /// it started).
    pub fn drop_local_if_unused(&mut self, idx: usize) {
        let ch = &self.locals[idx];
        if ch.subs.is_empty() && ch.pending == 0 {
            self.remove_local(idx);
        }
    }

    /// Queues a local channel for the next flush pass.
    pub fn mark_dirty(&mut self, idx: usize) {
        let ch = &mut self.locals[idx];
        if !ch.dirty {
            ch.dirty = true;
            self.dirty.push(idx);
        }
    }

    /// Publishes at the home: assigns the offset, encodes the frame once, keeps it in history within the
    /// channel's and the shard's bounds, appends it to the local log and sends one pointer to every other
    /// interested shard. Returns the offset.
    pub fn publish(&mut self, env: &Env, name: &str, data: &[u8]) -> Result<u64, Refusal> {
        self.publish_at(env, name, data, crate::metrics::stamp(env.shared.started))
    }

    /// [`Channels::publish`] of a publish that arrived at `born` ([`crate::metrics::stamp`]), the origin of
    /// its deliveries' latency.
    pub fn publish_at(&mut self, env: &Env, name: &str, data: &[u8], born: u64) -> Result<u64, Refusal> {
        let i = self.home_entry(env, name)?;
        let home = &mut self.homes[i];
        let (entry, kept, freed) = home.publish(data, env.now, &self.limits[home.limits as usize]);
        self.budget.freed(freed);
        if kept {
            self.budget.kept(i, home, entry.offset, entry.frame.len());
        }
        let (channel, interested) = (home.name.clone(), home.interested);
        let evicted = self.budget.enforce(&mut self.homes);
        ShardMetrics::add(&env.metrics.history_evicted_total, evicted as u64);
        if let Some(idx) = self.local_idx(name) {
            if self.locals[idx].append(entry.offset, &entry.frame, born) {
                self.mark_dirty(idx);
            }
        }
        for dest in bits(interested) {
            let (offset, frame) = (entry.offset, entry.frame.clone());
            let msg = ShardMsg::Deliver { channel: channel.clone(), offset, frame, born };
            let _ = self.outbox.send(dest, msg);
        }
        ShardMetrics::inc(&env.metrics.publishes_total);
        Ok(entry.offset)
    }

    /// Subscribes at the home: presence, interest, recovery. Returns the `subscribed` reply frame, the
    /// missed frames (bounded by the reply bound), and the offset the subscriber is positioned at.
    pub fn subscribe_at_home(
        &mut self,
        env: &Env,
        name: &str,
        reply: ReplyTo,
        since: Option<(u64, &str)>,
        user: Option<&Arc<str>>,
    ) -> Result<(Bytes, Vec<Bytes>, u64), Refusal> {
        let i = self.home_entry(env, name)?;
        let home = &mut self.homes[i];
        if let Some(u) = user {
            home.join(u);
        }
        if usize::from(reply.shard) != env.id {
            home.interested |= 1 << reply.shard;
        }
        let limits = &self.limits[home.limits as usize];
        let (rec, freed) = home.recover(since, env.now, env.cfg().max_reply_bytes(), limits);
        self.budget.freed(freed);
        let recovered = since.is_some() && rec.recovered;
        let (offset, epoch) = (home.offset, home.epoch_str());
        let frame = frame_bytes(|o| message::encode_subscribed(o, reply.id, name, offset, epoch.as_str(), recovered));
        Ok((frame, rec.missed.into_iter().map(|e| e.frame).collect(), offset))
    }

    /// A subscriber left (`last`: the shard `from` has no subscribers of the channel any more).
    pub fn unsubscribe_at_home(&mut self, name: &str, from: usize, user: Option<&str>, last: bool, me: usize) {
        if let Some(i) = self.home_idx(name) {
            let home = &mut self.homes[i];
            if let Some(u) = user {
                home.leave(u);
            }
            if last && from != me {
                home.interested &= !(1u64 << from);
            }
        }
    }

    /// The `presence` reply ([`presence_frame`]). A channel with no state is not created: it has no
    /// subscribers.
    pub fn presence_reply(&self, env: &Env, name: &str, id: Option<u64>) -> Bytes {
        let Some(home) = self.home_idx(name).map(|i| &self.homes[i]) else {
            return presence_frame(env.cfg().max_reply_bytes(), name, id, 0, std::iter::empty(), 0);
        };
        let users = home.presence.iter();
        let connections = u64::from(home.connections);
        presence_frame(env.cfg().max_reply_bytes(), name, id, connections, users, home.presence.len())
    }

    /// The `history` reply: the newest messages (after `since`, when given), at most `limit`, as many as fit
    /// in the reply bound ([`history_frame`]). A channel with no state is not created.
    pub fn history_reply(
        &mut self,
        env: &Env,
        name: &str,
        id: Option<u64>,
        since: Option<(u64, &str)>,
        limit: u32,
    ) -> Bytes {
        let max = env.cfg().max_reply_bytes();
        let Some(i) = self.home_idx(name) else {
            return history_frame(max, name, id, (0, ""), std::iter::empty(), 0, since.map(|_| false));
        };
        let home = &mut self.homes[i];
        self.budget.freed(home.trim(env.now, &self.limits[home.limits as usize]));
        let (start, recovered) = match since {
            Some(s) => match home.after(s) {
                Some(start) => (start, Some(true)),
                None => (home.history.len(), Some(false)),
            },
            None => (0, None),
        };
        let candidates = home.history.len() - start;
        let wanted = candidates.min(limit as usize);
        let complete = recovered.map(|r| r && wanted == candidates);
        let epoch = home.epoch_str();
        let newest = home.history.iter().rev().take(wanted).map(|e| (e.offset, e.data()));
        history_frame(max, name, id, (home.offset, epoch.as_str()), newest, wanted, complete)
    }

    /// Removes one subscription of a connection (unsubscribe, or the connection closing). Tells the home
    /// when presence is tracked or this was the shard's last subscriber of the channel. `user`: the
    /// connection's ([`crate::conn::Conn::presence_user`]).
    pub fn leave(&mut self, env: &Env, user: &Arc<str>, sub: ConnSub) {
        let idx = sub.chan as usize;
        let Some(ch) = self.locals.get_mut(idx) else { return };
        // A pending subscription is undone when its confirmation arrives (see `v1::on_subscribed`).
        if !sub.is_active() {
            return;
        }
        if ch.subs.try_remove(sub.slot as usize).is_some() {
            ShardMetrics::dec(&env.metrics.active_subscriptions);
        }
        let name = ch.name.clone();
        let last = ch.subs.is_empty() && ch.pending == 0;
        let presence = env.cfg().namespaces.of_channel(&name).is_some_and(|n| n.presence);
        if last {
            self.remove_local(idx);
        }
        let user = presence.then(|| user.clone());
        let home = env.home(&name);
        if home == env.id {
            self.unsubscribe_at_home(&name, env.id, user.as_deref(), last, env.id);
        } else if user.is_some() || last {
            let msg = ShardMsg::Unsubscribe { channel: name.as_ref().into(), shard: env.id as u16, user, last };
            let _ = self.outbox.send(home, msg);
        }
    }

    /// Takes back at the home what it counted for a subscription that ended before it was confirmed.
    pub fn undo_subscription(&mut self, env: &Env, idx: usize, channel: &Arc<str>, user: Option<Arc<str>>) {
        let ch = &self.locals[idx];
        let last = ch.subs.is_empty() && ch.pending == 0;
        if last {
            self.remove_local(idx);
        }
        let home = env.home(channel);
        if home == env.id {
            self.unsubscribe_at_home(channel, env.id, user.as_deref(), last, env.id);
        } else {
            let msg = ShardMsg::Unsubscribe { channel: channel.as_ref().into(), shard: env.id as u16, user, last };
            let _ = self.outbox.send(home, msg);
        }
    }

    /// A message published at another shard, for the local subscribers.
    pub fn deliver(&mut self, name: &str, offset: u64, frame: &Bytes, born: u64) {
        if let Some(idx) = self.local_idx(name) {
            if self.locals[idx].append(offset, frame, born) {
                self.mark_dirty(idx);
            }
        }
    }

    /// Deliveries `from..=to` were dropped on their way here: every local subscriber gets a `gap` marker,
    /// in the log, behind the frames before it.
    pub fn lost(&mut self, env: &Env, name: &str, from: u64, to: u64) {
        let Some(idx) = self.local_idx(name) else { return };
        let gap = frame_bytes(|o| message::encode_gap(o, name, from, to));
        if self.locals[idx].append_marker(gap) {
            ShardMetrics::inc(&env.metrics.gaps_total);
            self.mark_dirty(idx);
        }
    }

    /// The channel's offsets started again under a new epoch (the relay saw Redis lose its state): every
    /// local subscriber gets a `gap` marker (their positions belong to the old epoch), and messages are
    /// accepted again from `offset` on.
    pub fn reset(&mut self, env: &Env, name: &str, offset: u64) {
        let Some(idx) = self.local_idx(name) else { return };
        let ch = &mut self.locals[idx];
        let after = if ch.accept_after == u64::MAX { 0 } else { ch.accept_after + 1 };
        let gap = frame_bytes(|o| message::encode_gap(o, name, after, after));
        if ch.append_marker(gap) {
            ShardMetrics::inc(&env.metrics.gaps_total);
            self.mark_dirty(idx);
        }
        self.locals[idx].accept_after = offset;
    }

    /// Once per tick: retry overflowed ring messages; every few seconds, age history and forget idle
    /// channels. A channel is forgotten (its next incarnation gets a new epoch) only when nothing refers
    /// to it: no subscribers on any shard, this one included, and no history left.
    pub fn housekeeping(&mut self, env: &Env) {
        self.outbox.drain();
        // Every 2 s of shard time (a long turn may skip ticks, so not "on ticks divisible by 40").
        if env.now >= self.aged_at + Env::ticks(std::time::Duration::from_secs(2)) {
            self.aged_at = env.now;
            let mut forget = Vec::new();
            for (i, h) in self.homes.iter_mut() {
                let freed = h.trim(env.now, &self.limits[h.limits as usize]);
                self.budget.freed(freed);
                if h.is_idle() {
                    forget.push(i);
                }
            }
            for i in forget {
                let name = self.homes[i].name.clone();
                if self.local_idx(&name).is_none() {
                    self.clear_ix(&name, |ix| ix.home = Ix::NONE);
                    self.homes.remove(i);
                }
            }
        }
        ShardMetrics::set(&env.metrics.history_bytes, self.budget.total() as u64);
        ShardMetrics::set(&env.metrics.channels, (self.homes.len() + self.locals.len()) as u64);
    }
}
