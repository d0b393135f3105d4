//! The relay thread: its loop over the inbox from the shards, the pushes from Redis, the answers of the
//! commands in flight, and a housekeeping tick (every 50 ms; every 1 ms while messages wait in the bus's
//! overflow queues): retrying those, presence writes and refreshes, liveness pings, reconnects.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use throng_protocol::message;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinSet;

use super::chan::{Action, Chan, RecoveryBounds, SubReq};
use super::store::{self, Keys, Read};
use super::RelayShared;
use crate::channel::api::{ApiMsg, Published, Ticket};
use crate::channel::bus::{Outbox, ReplyTo, ShardMsg};
use crate::channel::home::{message_frame, EpochStr};
use crate::channel::{bits, frame_bytes, history_frame, presence_frame, Refusal};
use crate::config::RedisConfig;
use crate::shard::Shared;

/// The answer to a request the relay could not take to Redis.
pub const UNAVAILABLE: Refusal = Refusal {
    code: "unavailable",
    reason: "Redis is unreachable: cluster-wide channels cannot publish or subscribe now; retry later",
};
/// Most publishes in one batch (one pipeline).
const MAX_BATCH: usize = 1000;
/// Most publishes waiting for the batch in flight; past it the relay leaves its inbox alone, so the shards'
/// rings fill and their publishes are refused `overloaded`.
const MAX_QUEUED: usize = 20_000;
/// The housekeeping tick when nothing waits for room on the bus.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// The housekeeping tick while messages wait for room in a shard's ring.
const BUSY_TICK: Duration = Duration::from_millis(1);
/// How often presence changes are written.
const PRESENCE_EVERY: Duration = Duration::from_millis(50);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// First wait before reconnecting.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Starts the relay thread.
pub fn spawn(shared: Arc<Shared>, rs: Arc<RelayShared>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let cfg = shared.config.redis.clone().ok_or_else(|| anyhow::anyhow!("the relay needs a Redis URL"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // rediss://: the provider of the TLS handshakes (the redis crate leaves it to the application).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t = std::thread::Builder::new().name("throng-relay".into()).spawn(move || {
        rt.block_on(async move {
            match Relay::new(shared, rs, cfg) {
                Ok(r) => r.run().await,
                Err(e) => tracing::error!(error = %e, "the Redis relay could not start"),
            }
        })
    })?;
    Ok(t)
}

/// A connection to Redis: one multiplexed RESP3 connection (commands and pushes), or a Cluster's.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn pipe(&mut self, p: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => p.query_async(c).await,
            Conn::Cluster(c) => p.query_async(c).await,
        }
    }

    async fn cmd(&mut self, c: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Single(m) => c.query_async(m).await,
            Conn::Cluster(m) => c.query_async(m).await,
        }
    }

    /// Subscribes (`on`) or unsubscribes pub/sub channels: classic pub/sub on a single Redis, sharded in a
    /// Cluster (one command per slot).
    async fn subscription(&mut self, names: Vec<String>, on: bool) -> redis::RedisResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        match self {
            Conn::Single(c) if on => c.subscribe(names).await,
            Conn::Single(c) => c.unsubscribe(names).await,
            Conn::Cluster(c) => {
                let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
                for n in names {
                    by_slot.entry(store::slot(n.as_bytes())).or_default().push(n);
                }
                for (_, group) in by_slot {
                    if on {
                        c.ssubscribe(group).await?;
                    } else {
                        c.sunsubscribe(group).await?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Where the answer of a publish goes.
#[derive(Clone, Copy, Debug)]
enum PubTo {
    /// A client's `publish` (or `POST /publish`), if it wants an answer.
    Client(Option<ReplyTo>),
    /// One message of a `/api/publish` request.
    Api(Ticket, u32),
}

#[derive(Debug)]
struct PubItem {
    name: Arc<str>,
    data: Bytes,
    to: PubTo,
}

/// Who gets a presence or history answer.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Client(ReplyTo),
    Api(Ticket),
}

#[derive(Debug)]
enum Query {
    Presence,
    History { since: Option<(u64, Box<str>)>, limit: u32 },
}

/// What a command in flight came back with.
enum Done {
    Connected(u64, Result<(Conn, UnboundedReceiver<PushInfo>, bool), String>),
    Subscribed { gen: u64, names: Vec<(Arc<str>, u64)>, result: Result<(), String> },
    Read { gen: u64, name: Arc<str>, id: u64, result: Result<Read, String> },
    Published { gen: u64, items: Vec<PubItem>, result: Result<Vec<(u64, u64)>, String> },
    Queried { gen: u64, name: Arc<str>, answer: Answer, query: Query, result: Result<Value, String> },
    Wrote { gen: u64, result: Result<(), String> },
    Pong { gen: u64, result: Result<(), String> },
    Controlled { gen: u64, ticket: Ticket, result: Result<(), String> },
}

struct Relay {
    shared: Arc<Shared>,
    rs: Arc<RelayShared>,
    cfg: RedisConfig,
    /// This relay's place on the bus (the last inbox).
    me: usize,
    outbox: Outbox,
    /// Generation of the connection: answers of an older one are about state already reset.
    gen: u64,
    conn: Option<Conn>,
    pushes: Option<UnboundedReceiver<PushInfo>>,
    connecting: bool,
    retry_at: Instant,
    backoff: Duration,
    chans: HashMap<Arc<str>, Chan>,
    next_id: u64,
    /// Pub/sub channels to subscribe / unsubscribe, sent one batch at a time so their order holds.
    to_subscribe: Vec<(Arc<str>, u64)>,
    to_unsubscribe: Vec<String>,
    subscribing: bool,
    control_pending: bool,
    publishes: VecDeque<PubItem>,
    publishing: bool,
    /// This node's subscribed connections per channel and user (presence), and what changed since the
    /// last write.
    present: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    changed: HashMap<Arc<str>, HashSet<Arc<str>>>,
    writing: bool,
    written_at: Instant,
    touched_at: Instant,
    pinging: bool,
    pinged_at: Instant,
    ops: JoinSet<Done>,
    epoch_state: u64,
    control: String,
}

impl Relay {
    fn new(shared: Arc<Shared>, rs: Arc<RelayShared>, cfg: RedisConfig) -> anyhow::Result<Self> {
        let me = shared.inboxes.len() - 1;
        let c = &shared.config;
        let outbox = Outbox::new(shared.inboxes.clone(), c.ring_capacity, c.max_queue_bytes);
        let control = store::control_name(&cfg.prefix);
        let now = Instant::now();
        Ok(Self {
            me,
            outbox,
            gen: 0,
            conn: None,
            pushes: None,
            connecting: false,
            retry_at: now,
            backoff: MIN_BACKOFF,
            chans: HashMap::new(),
            next_id: 0,
            to_subscribe: Vec::new(),
            to_unsubscribe: Vec::new(),
            subscribing: false,
            control_pending: false,
            publishes: VecDeque::new(),
            publishing: false,
            present: HashMap::new(),
            changed: HashMap::new(),
            writing: false,
            written_at: now,
            touched_at: now,
            pinging: false,
            pinged_at: now,
            ops: JoinSet::new(),
            epoch_state: crate::sys::random_u64(),
            control,
            shared,
            rs,
            cfg,
        })
    }

    async fn run(mut self) {
        let bell = match self.shared.inboxes[self.me].doorbell.try_clone() {
            // SAFETY: the AsyncFd owns the descriptor (a duplicate of the doorbell eventfd), so it stays open
            // and names the same file for the AsyncFd's whole life.
            Ok(fd) => unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) },
            Err(e) => {
                tracing::error!(error = %e, "the Redis relay cannot wait on its inbox");
                return;
            }
        };
        let bell = match bell {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e.into_parts().1, "the Redis relay cannot wait on its inbox");
                return;
            }
        };
        let mut next_tick = tokio::time::Instant::now();
        loop {
            self.drain_inbox();
            self.start_work();
            if !self.outbox.is_idle() {
                next_tick = next_tick.min(tokio::time::Instant::now() + BUSY_TICK);
            }
            let shared = self.shared.clone();
            let inbox = &shared.inboxes[self.me];
            inbox.parked.store(true, Ordering::SeqCst);
            if !inbox.rx.is_empty() {
                inbox.parked.store(false, Ordering::Relaxed);
                continue;
            }
            tokio::select! {
                biased;
                push = recv(&mut self.pushes), if self.pushes.is_some() => match push {
                    Some(p) => self.on_push(p),
                    None => self.lost("the connection to Redis closed"),
                },
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => match done {
                    Ok(d) => self.on_done(d),
                    Err(e) => tracing::error!(error = %e, "a Redis command task failed"),
                },
                ready = bell.readable() => {
                    if let Ok(mut guard) = ready {
                        crate::sys::eventfd_clear(inbox.doorbell.as_fd());
                        guard.clear_ready();
                    }
                }
                _ = tokio::time::sleep_until(next_tick) => {
                    self.housekeeping();
                    // 50 ms when idle (presence writes, pings, reconnects); 1 ms while messages wait for room
                    // in a shard's ring.
                    let period = if self.outbox.is_idle() { IDLE_TICK } else { BUSY_TICK };
                    next_tick = tokio::time::Instant::now() + period;
                }
            }
            inbox.parked.store(false, Ordering::Relaxed);
        }
    }

    fn stamp(&self) -> u64 {
        crate::metrics::stamp(self.shared.started)
    }

    fn next_epoch(&mut self) -> String {
        self.epoch_state = self.epoch_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.epoch_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        EpochStr::new(z ^ (z >> 31)).as_str().to_string()
    }

    fn send(&mut self, shard: usize, msg: ShardMsg) {
        let _ = self.outbox.send(shard, msg);
    }

    /// Takes requests from the shards while the publish queue has room.
    fn drain_inbox(&mut self) {
        let shared = self.shared.clone();
        let inbox = &shared.inboxes[self.me];
        for _ in 0..4096 {
            if self.publishes.len() >= MAX_QUEUED {
                break;
            }
            let Some(m) = inbox.try_recv() else { break };
            self.on_msg(m);
        }
    }

    fn on_msg(&mut self, m: ShardMsg) {
        let up = self.conn.is_some();
        match m {
            ShardMsg::Publish { channel, data, reply, born: _ } => {
                let item = PubItem { name: Arc::from(&*channel), data, to: PubTo::Client(reply) };
                if up {
                    self.publishes.push_back(item);
                } else {
                    self.publish_failed(item, UNAVAILABLE);
                }
            }
            ShardMsg::Api(ApiMsg::Publish { ticket, born: _, items }) => {
                let items: Vec<PubItem> = items
                    .into_iter()
                    .map(|(i, c, data)| PubItem { name: Arc::from(&*c), data, to: PubTo::Api(ticket, i) })
                    .collect();
                if up {
                    self.publishes.extend(items);
                } else {
                    let results = items.iter().map(|it| (index_of(it), Err(UNAVAILABLE))).collect();
                    self.rs.metrics.publish_failed_total.fetch_add(items.len() as u64, Ordering::Relaxed);
                    self.send(usize::from(ticket.shard), ShardMsg::Api(ApiMsg::Published { ticket, results }));
                }
            }
            ShardMsg::Subscribe { channel, reply, since, user } => {
                self.subscribe(&channel, SubReq { reply, since, user })
            }
            ShardMsg::Unsubscribe { channel, shard, user, last } => self.unsubscribe(&channel, shard, user, last),
            ShardMsg::Presence { channel, reply } => self.query(&channel, Answer::Client(reply), Query::Presence),
            ShardMsg::History { channel, reply, since, limit } => {
                self.query(&channel, Answer::Client(reply), Query::History { since, limit })
            }
            ShardMsg::Api(ApiMsg::Presence { ticket, channel }) => {
                self.query(&channel, Answer::Api(ticket), Query::Presence)
            }
            ShardMsg::Api(ApiMsg::History { ticket, channel, since, limit }) => {
                self.query(&channel, Answer::Api(ticket), Query::History { since, limit })
            }
            ShardMsg::Api(ApiMsg::Disconnect { ticket, user: Some(user), client: None, code, reason, .. }) => {
                let what = format!("d {} {code} {user} {reason}", self.rs.node);
                self.control(ticket, what)
            }
            ShardMsg::Api(ApiMsg::Disconnect {
                ticket,
                client: Some(k),
                remote: Some((node, shard)),
                code,
                reason,
                ..
            }) => {
                let what = format!("c {} {code} {node} {shard} {} {} {reason}", self.rs.node, k.gen, k.idx);
                self.control(ticket, what)
            }
            other => tracing::debug!(?other, "the relay ignores this message"),
        }
    }

    fn publish_failed(&mut self, item: PubItem, r: Refusal) {
        self.rs.metrics.publish_failed_total.fetch_add(1, Ordering::Relaxed);
        match item.to {
            PubTo::Client(Some(reply)) => {
                let (code, reason) = (r.code, r.reason);
                let msg = ShardMsg::Refused { channel: item.name, reply, subscribe: false, code, reason };
                self.send(usize::from(reply.shard), msg);
            }
            PubTo::Client(None) => {}
            PubTo::Api(ticket, i) => {
                let msg = ApiMsg::Published { ticket, results: vec![(i, Err(r))] };
                self.send(usize::from(ticket.shard), ShardMsg::Api(msg));
            }
        }
    }

    fn subscribe(&mut self, channel: &str, req: SubReq) {
        if self.conn.is_none() {
            self.rs.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
            let (code, reason) = (UNAVAILABLE.code, UNAVAILABLE.reason);
            let msg =
                ShardMsg::Refused { channel: Arc::from(channel), reply: req.reply, subscribe: true, code, reason };
            self.send(usize::from(req.reply.shard), msg);
            return;
        }
        let name = match self.chans.get_key_value(channel) {
            Some((k, _)) => k.clone(),
            None => {
                let name: Arc<str> = Arc::from(channel);
                self.next_id += 1;
                self.chans.insert(name.clone(), Chan::new(self.next_id));
                self.to_unsubscribe.retain(|n| store::channel_of(&self.cfg.prefix, n.as_bytes()) != Some(channel));
                self.to_subscribe.push((name.clone(), self.next_id));
                self.rs.metrics.channels.store(self.chans.len() as u64, Ordering::Relaxed);
                name
            }
        };
        let mut out = Vec::new();
        if let Some(c) = self.chans.get_mut(&name) {
            c.shards |= 1 << req.reply.shard;
            c.subscribe(req, &mut out);
        }
        self.act(&name, out);
    }

    fn unsubscribe(&mut self, channel: &str, shard: u16, user: Option<Arc<str>>, last: bool) {
        if let Some(u) = user {
            self.presence_change(channel, u, -1);
        }
        if !last {
            return;
        }
        let Some(c) = self.chans.get_mut(channel) else { return };
        c.shards &= !(1u64 << shard);
        if c.unused() {
            self.chans.remove(channel);
            self.to_subscribe.retain(|(n, _)| &**n != channel);
            self.to_unsubscribe.push(store::pubsub_name(&self.cfg.prefix, channel));
            self.rs.metrics.channels.store(self.chans.len() as u64, Ordering::Relaxed);
        }
    }

    fn presence_change(&mut self, channel: &str, user: Arc<str>, by: i32) {
        let name = match self.present.get_key_value(channel) {
            Some((k, _)) => k.clone(),
            None if by > 0 => Arc::from(channel),
            None => return,
        };
        let users = self.present.entry(name.clone()).or_default();
        let n = users.entry(user.clone()).or_default();
        *n = n.saturating_add_signed(by);
        if *n == 0 {
            users.remove(&user);
        }
        self.changed.entry(name).or_default().insert(user);
    }

    /// Carries out what a channel's state machine decided.
    fn act(&mut self, name: &Arc<str>, actions: Vec<Action>) {
        let shards = self.chans.get(name).map_or(0, |c| c.shards);
        for a in actions {
            match a {
                Action::Deliver { offset, data, born } => {
                    let m = &self.rs.metrics;
                    if born == 0 { &m.filled_total } else { &m.received_total }.fetch_add(1, Ordering::Relaxed);
                    let frame = message_frame(name, offset, &data);
                    let born = if born == 0 { self.stamp() } else { born };
                    for s in bits(shards) {
                        let (channel, frame) = (name.clone(), frame.clone());
                        self.send(s, ShardMsg::Deliver { channel, offset, frame, born });
                    }
                }
                Action::Lost { from, to } => {
                    self.rs.metrics.lost_total.fetch_add(to - from + 1, Ordering::Relaxed);
                    tracing::warn!(channel = %name, from, to, "messages missed and no longer in history: subscribers get a gap");
                    for s in bits(shards) {
                        self.send(s, ShardMsg::Lost { channel: name.clone(), from, to });
                    }
                }
                Action::Reset { offset } => {
                    tracing::warn!(channel = %name, "the channel has a new epoch in Redis (its state was lost): subscribers get a gap");
                    for s in bits(shards) {
                        self.send(s, ShardMsg::Reset { channel: name.clone(), offset });
                    }
                }
                Action::Answer { req, position, epoch, recovered, missed } => {
                    let e = EpochStr::new(epoch);
                    let id = req.reply.id;
                    let frame = frame_bytes(|o| {
                        message::encode_subscribed(o, id, name, position, e.as_str(), recovered && req.since.is_some())
                    });
                    let missed = missed.iter().map(|(o, d)| message_frame(name, *o, d)).collect();
                    if let Some(u) = &req.user {
                        self.presence_change(name, u.clone(), 1);
                    }
                    let (channel, reply, user) = (name.clone(), req.reply, req.user);
                    let msg = ShardMsg::Subscribed { channel, reply, offset: position, frame, missed, user };
                    self.send(usize::from(reply.shard), msg);
                }
                Action::Read { from } => self.read(name, from),
            }
        }
    }

    fn namespace_bounds(&self, name: &str) -> (u64, u64, RecoveryBounds) {
        let ns = self.shared.config.namespaces.of_channel(name);
        let size = ns.map_or(0, |n| n.history_size as u64);
        let ttl = ns.map_or(Duration::from_secs(1), |n| n.history_ttl);
        let max_bytes = self.shared.config.max_reply_bytes();
        (size, ttl.as_secs().max(1), RecoveryBounds { ttl_ms: ttl.as_millis() as u64, max_bytes })
    }

    fn read(&mut self, name: &Arc<str>, from: Option<u64>) {
        let (Some(mut conn), Some(id)) = (self.conn.clone(), self.chans.get(name).map(|c| c.id)) else { return };
        let (size, _, _) = self.namespace_bounds(name);
        let keys = Keys::of(&self.cfg.prefix, name);
        let from_arg = match from {
            Some(f) if size > 0 => f as i64,
            _ => -1,
        };
        let mut cmd = evalsha(store::POSITION, &[&keys.meta, &keys.stream]);
        cmd.arg(self.next_epoch()).arg(store::META_TTL_SECS).arg(from_arg).arg(size.max(1));
        let (gen, name) = (self.gen, name.clone());
        self.ops.spawn(async move {
            let result = match run_cmd(&mut conn, &cmd).await {
                Ok(v) => store::parse_read(&v).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            Done::Read { gen, name, id, result }
        });
    }

    fn query(&mut self, channel: &str, answer: Answer, query: Query) {
        let Some(mut conn) = self.conn.clone() else {
            self.rs.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
            self.answer(answer, Err(UNAVAILABLE));
            return;
        };
        let keys = Keys::of(&self.cfg.prefix, channel);
        let cmd = match &query {
            Query::Presence => evalsha(store::PRESENCE_GET, &[&keys.presence, &keys.live]),
            Query::History { since, limit } => {
                let mut c = evalsha(store::HISTORY, &[&keys.meta, &keys.stream]);
                c.arg(since.as_ref().map_or(-1, |(o, _)| *o as i64)).arg(*limit);
                c
            }
        };
        let (gen, name) = (self.gen, Arc::from(channel));
        self.ops.spawn(async move {
            let result = run_cmd(&mut conn, &cmd).await.map_err(|e| e.to_string());
            Done::Queried { gen, name, answer, query, result }
        });
    }

    /// Sends a presence or history answer (a v1 frame; its JSON object for the API) or a refusal.
    fn answer(&mut self, to: Answer, frame: Result<Bytes, Refusal>) {
        match (to, frame) {
            (Answer::Client(r), Ok(frame)) => self.send(usize::from(r.shard), ShardMsg::Reply { conn: r.conn, frame }),
            (Answer::Client(r), Err(e)) => {
                let frame = frame_bytes(|o| message::encode_error(o, r.id, e.code, e.reason));
                self.send(usize::from(r.shard), ShardMsg::Reply { conn: r.conn, frame });
            }
            (Answer::Api(ticket), Ok(frame)) => {
                let body = crate::http::api::frame_json(frame);
                self.send(usize::from(ticket.shard), ShardMsg::Api(ApiMsg::Json { ticket, body }));
            }
            (Answer::Api(ticket), Err(refusal)) => {
                self.send(usize::from(ticket.shard), ShardMsg::Api(ApiMsg::Failed { ticket, refusal }));
            }
        }
    }

    fn query_frame(&self, name: &str, answer: Answer, query: Query, v: &Value) -> Result<Bytes, String> {
        let id = match answer {
            Answer::Client(r) => r.id,
            Answer::Api(_) => None,
        };
        let max = self.shared.config.max_reply_bytes();
        match query {
            Query::Presence => {
                let users = store::parse_presence(v).map_err(|e| e.to_string())?;
                let connections = users.iter().map(|(_, n)| u64::from(*n)).sum();
                let list = users.iter().map(|(u, n)| (u.as_str(), *n));
                Ok(presence_frame(max, name, id, connections, list, users.len()))
            }
            Query::History { since, limit: _ } => {
                let read = store::parse_read(v).map_err(|e| e.to_string())?;
                let (_, _, bounds) = self.namespace_bounds(name);
                let epoch = read.epoch.map(EpochStr::new);
                let epoch_s = epoch.as_ref().map_or("", |e| e.as_str());
                // Newest first, young enough, contiguous down from the channel's offset.
                let mut expect = read.offset;
                let young: Vec<&store::Entry> = read
                    .entries
                    .iter()
                    .take_while(|e| {
                        let ok = e.offset == expect && e.at_ms + bounds.ttl_ms >= read.now_ms;
                        expect = expect.saturating_sub(1);
                        ok
                    })
                    .collect();
                let (newest, complete): (&[&store::Entry], Option<bool>) = match since {
                    None => (&young, None),
                    Some((o, e)) if *e == *epoch_s && o <= read.offset => {
                        (&young, Some(young.len() as u64 == read.offset - o))
                    }
                    Some(_) => (&[], Some(false)),
                };
                let it = newest.iter().map(|e| (e.offset, &e.data[..]));
                Ok(history_frame(max, name, id, (read.offset, epoch_s), it, newest.len(), complete))
            }
        }
    }

    /// Publishes a request for the other nodes on the control channel (answered with a count of 0: the
    /// other nodes close their connections on receipt).
    fn control(&mut self, ticket: Ticket, payload: String) {
        let Some(mut conn) = self.conn.clone() else {
            let msg = ApiMsg::Disconnected { ticket, count: 0 };
            self.send(usize::from(ticket.shard), ShardMsg::Api(msg));
            return;
        };
        let cmd_name = if self.rs.cluster.load(Ordering::Relaxed) { "SPUBLISH" } else { "PUBLISH" };
        let mut cmd = redis::cmd(cmd_name);
        cmd.arg(&self.control).arg(payload);
        let gen = self.gen;
        self.ops.spawn(async move {
            let result = conn.cmd(&cmd).await.map(|_| ()).map_err(|e| e.to_string());
            Done::Controlled { gen, ticket, result }
        });
    }

    /// A request from another node: `d <origin> <code> <user> <reason>` (close a user's connections) or
    /// `c <origin> <code> <node> <shard> <gen> <idx> <reason>` (close one connection of `node`).
    fn on_control(&mut self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let mut it = text.splitn(3, ' ');
        let (Some(kind), Some(origin), Some(rest)) = (it.next(), it.next(), it.next()) else { return };
        if origin == self.rs.node {
            return;
        }
        match kind {
            "d" => {
                let mut it = rest.splitn(3, ' ');
                let (Some(Ok(code)), Some(user)) = (it.next().map(str::parse::<u16>), it.next()) else { return };
                let reason: Box<str> = it.next().unwrap_or("").into();
                self.rs.metrics.control_total.fetch_add(1, Ordering::Relaxed);
                for s in 0..self.me {
                    let msg = ShardMsg::Kick { user: Some(user.into()), client: None, code, reason: reason.clone() };
                    self.send(s, msg);
                }
            }
            "c" => {
                let mut it = rest.splitn(6, ' ');
                let fields = (it.next(), it.next(), it.next(), it.next(), it.next());
                let (Some(code), Some(node), Some(shard), Some(gen), Some(idx)) = fields else { return };
                let (Ok(code), Ok(shard), Ok(gen), Ok(idx)) =
                    (code.parse::<u16>(), shard.parse::<usize>(), gen.parse::<u32>(), idx.parse::<u32>())
                else {
                    return;
                };
                if node != self.rs.node || shard >= self.me {
                    return;
                }
                self.rs.metrics.control_total.fetch_add(1, Ordering::Relaxed);
                let reason: Box<str> = it.next().unwrap_or("").into();
                let client = Some(crate::conn::ConnKey { idx, gen });
                self.send(shard, ShardMsg::Kick { user: None, client, code, reason });
            }
            _ => {}
        }
    }

    fn on_push(&mut self, p: PushInfo) {
        match p.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = p.data.into_iter();
                let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) = (data.next(), data.next()) else {
                    return;
                };
                if ch == self.control.as_bytes() {
                    return self.on_control(&payload);
                }
                let Some(channel) = store::channel_of(&self.cfg.prefix, &ch) else { return };
                let Some((name, _)) = self.chans.get_key_value(channel) else { return };
                let name = name.clone();
                let Some(pushed) = store::parse_pushed(Bytes::from(payload)) else {
                    tracing::warn!(channel, "a malformed message on the channel's pub/sub channel was ignored");
                    return;
                };
                let born = self.stamp();
                let mut out = Vec::new();
                if let Some(c) = self.chans.get_mut(&name) {
                    c.push(pushed, born, &mut out);
                }
                self.act(&name, out);
            }
            PushKind::Disconnection => self.lost("the connection to Redis was closed"),
            _ => {}
        }
    }

    fn on_done(&mut self, d: Done) {
        match d {
            Done::Connected(gen, result) => {
                self.connecting = false;
                if gen != self.gen {
                    return;
                }
                match result {
                    Ok((conn, pushes, cluster)) => self.connected(conn, pushes, cluster),
                    Err(e) => self.retry_later(&e),
                }
            }
            Done::Subscribed { gen, names, result } => {
                self.subscribing = false;
                if gen != self.gen {
                    return;
                }
                if let Err(e) = result {
                    return self.lost(&format!("SUBSCRIBE failed: {e}"));
                }
                for (name, id) in names {
                    let mut out = Vec::new();
                    if let Some(c) = self.chans.get_mut(&name).filter(|c| c.id == id) {
                        if c.phase == super::chan::Phase::Joining {
                            c.joined(&mut out);
                        }
                    }
                    self.act(&name, out);
                }
            }
            Done::Read { gen, name, id, result } => {
                if gen != self.gen {
                    return;
                }
                let read = match result {
                    Ok(r) => r,
                    Err(e) => return self.lost(&format!("reading channel {name}: {e}")),
                };
                let (_, _, bounds) = self.namespace_bounds(&name);
                let mut out = Vec::new();
                if let Some(c) = self.chans.get_mut(&name).filter(|c| c.id == id) {
                    c.read_done(read, bounds, &mut out);
                }
                self.act(&name, out);
            }
            Done::Published { gen, items, result } => {
                self.publishing = false;
                match result {
                    Ok(offsets) => self.published(items, offsets),
                    Err(e) => {
                        for item in items {
                            self.publish_failed(item, UNAVAILABLE);
                        }
                        if gen == self.gen {
                            self.lost(&format!("publishing: {e}"));
                        }
                    }
                }
            }
            Done::Queried { gen, name, answer, query, result } => {
                let frame = result.and_then(|v| self.query_frame(&name, answer, query, &v));
                match frame {
                    Ok(f) => self.answer(answer, Ok(f)),
                    Err(e) => {
                        self.rs.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
                        self.answer(answer, Err(UNAVAILABLE));
                        if gen == self.gen {
                            self.lost(&format!("query on {name}: {e}"));
                        }
                    }
                }
            }
            Done::Wrote { gen, result } => {
                self.writing = false;
                if let (Err(e), true) = (result, gen == self.gen) {
                    self.lost(&format!("writing presence: {e}"));
                }
            }
            Done::Pong { gen, result } => {
                self.pinging = false;
                if let (Err(e), true) = (result, gen == self.gen) {
                    self.lost(&format!("liveness ping: {e}"));
                }
            }
            Done::Controlled { gen, ticket, result } => {
                self.send(usize::from(ticket.shard), ShardMsg::Api(ApiMsg::Disconnected { ticket, count: 0 }));
                if let (Err(e), true) = (result, gen == self.gen) {
                    self.lost(&format!("relaying a disconnect: {e}"));
                }
            }
        }
    }

    fn published(&mut self, items: Vec<PubItem>, offsets: Vec<(u64, u64)>) {
        self.rs.metrics.published_total.fetch_add(offsets.len() as u64, Ordering::Relaxed);
        let mut api: Vec<(Ticket, Vec<(u32, Published)>)> = Vec::new();
        for (item, (offset, epoch)) in items.into_iter().zip(offsets) {
            match item.to {
                PubTo::Client(Some(r)) => {
                    let frame = frame_bytes(|o| message::encode_published(o, r.id, offset));
                    self.send(usize::from(r.shard), ShardMsg::Reply { conn: r.conn, frame });
                }
                PubTo::Client(None) => {}
                PubTo::Api(ticket, i) => match api.last_mut() {
                    Some((t, results)) if *t == ticket => results.push((i, Ok((offset, epoch)))),
                    _ => api.push((ticket, vec![(i, Ok((offset, epoch)))])),
                },
            }
        }
        for (ticket, results) in api {
            self.send(usize::from(ticket.shard), ShardMsg::Api(ApiMsg::Published { ticket, results }));
        }
    }

    /// Starts what waits and may start: a publish batch, a subscription batch.
    fn start_work(&mut self) {
        let Some(conn) = self.conn.clone() else { return };
        if !self.publishing && !self.publishes.is_empty() {
            self.start_publish(conn.clone());
        }
        if !self.subscribing
            && (self.control_pending || !self.to_subscribe.is_empty() || !self.to_unsubscribe.is_empty())
        {
            self.subscribing = true;
            let names = std::mem::take(&mut self.to_subscribe);
            let mut on: Vec<String> = names.iter().map(|(n, _)| store::pubsub_name(&self.cfg.prefix, n)).collect();
            if std::mem::take(&mut self.control_pending) {
                on.push(self.control.clone());
            }
            let off = std::mem::take(&mut self.to_unsubscribe);
            let (gen, mut conn) = (self.gen, conn);
            self.ops.spawn(async move {
                let mut result = conn.subscription(off, false).await;
                if result.is_ok() {
                    result = conn.subscription(on, true).await;
                }
                Done::Subscribed { gen, names, result: result.map_err(|e| e.to_string()) }
            });
        }
    }

    fn start_publish(&mut self, conn: Conn) {
        self.publishing = true;
        // Whole `/api/publish` requests: their answer goes back in one message.
        let mut items = Vec::new();
        while let Some(next) = self.publishes.front() {
            let same_request = matches!((items.last(), &next.to), (Some(PubItem { to: PubTo::Api(a, _), .. }), PubTo::Api(b, _)) if a == b);
            if items.len() >= MAX_BATCH && !same_request {
                break;
            }
            items.extend(self.publishes.pop_front());
        }
        let cluster = self.rs.cluster.load(Ordering::Relaxed);
        let publish_cmd = if cluster { "SPUBLISH" } else { "PUBLISH" };
        // Per slot in a Cluster (a pipeline goes to one node); one pipeline otherwise. Order within a
        // channel is kept either way: a channel has one slot.
        let mut groups: Vec<(u16, redis::Pipeline, Vec<usize>)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let keys = Keys::of(&self.cfg.prefix, &it.name);
            let (size, ttl, _) = self.namespace_bounds(&it.name);
            let slot = if cluster { store::slot(keys.meta.as_bytes()) } else { 0 };
            let at = match groups.iter().position(|(s, _, _)| *s == slot) {
                Some(at) => at,
                None => {
                    groups.push((slot, redis::pipe(), Vec::new()));
                    groups.len() - 1
                }
            };
            let mut cmd = evalsha(store::PUBLISH, &[&keys.meta, &keys.stream]);
            cmd.arg(&keys.pubsub).arg(&it.data[..]).arg(size).arg(ttl).arg(store::META_TTL_SECS);
            cmd.arg(self.next_epoch()).arg(publish_cmd);
            groups[at].1.add_command(cmd);
            groups[at].2.push(i);
        }
        let gen = self.gen;
        let n = items.len();
        self.ops.spawn(async move {
            let mut offsets = vec![(0, 0); n];
            let mut result = Ok(());
            let mut tasks = JoinSet::new();
            for (_, pipe, idx) in groups {
                let mut conn = conn.clone();
                tasks.spawn(async move { (idx, run_pipe(&mut conn, &pipe).await) });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((idx, Ok(values))) => {
                        for (i, v) in idx.into_iter().zip(values) {
                            match store::parse_published(&v) {
                                Ok(o) => offsets[i] = o,
                                Err(e) => result = Err(e.to_string()),
                            }
                        }
                    }
                    Ok((_, Err(e))) => result = Err(e.to_string()),
                    Err(e) => result = Err(e.to_string()),
                }
            }
            Done::Published { gen, items, result: result.map(|()| offsets) }
        });
    }

    fn housekeeping(&mut self) {
        self.outbox.drain();
        let now = Instant::now();
        if self.conn.is_none() {
            if !self.connecting && now >= self.retry_at {
                self.connect();
            }
            return;
        }
        let timeout = self.cfg.timeout;
        if !self.pinging && now >= self.pinged_at + timeout / 3 {
            self.pinging = true;
            self.pinged_at = now;
            let (gen, mut conn) = (self.gen, self.conn.clone());
            self.ops.spawn(async move {
                let result = match conn.as_mut() {
                    Some(c) => match tokio::time::timeout(timeout, c.cmd(&redis::cmd("PING"))).await {
                        Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    },
                    None => Ok(()),
                };
                Done::Pong { gen, result }
            });
        }
        let touch = now >= self.touched_at + self.cfg.presence_ttl / 3;
        if !self.writing && (touch || (!self.changed.is_empty() && now >= self.written_at + PRESENCE_EVERY)) {
            self.write_presence(touch);
        }
    }

    /// Writes this node's changed presence entries (every channel's, with `touch`, refreshing liveness).
    fn write_presence(&mut self, touch: bool) {
        let Some(mut conn) = self.conn.clone() else { return };
        let now = Instant::now();
        self.written_at = now;
        if touch {
            self.touched_at = now;
        }
        let changed = std::mem::take(&mut self.changed);
        let names: Vec<Arc<str>> = if touch {
            self.present.keys().cloned().chain(changed.keys().cloned()).collect::<HashSet<_>>().into_iter().collect()
        } else {
            changed.keys().cloned().collect()
        };
        if names.is_empty() {
            return;
        }
        let ttl_ms = self.cfg.presence_ttl.as_millis() as u64;
        let cluster = self.rs.cluster.load(Ordering::Relaxed);
        let mut by_slot: HashMap<u16, redis::Pipeline> = HashMap::new();
        for name in &names {
            let keys = Keys::of(&self.cfg.prefix, name);
            let mut cmd = evalsha(store::PRESENCE_SET, &[&keys.presence, &keys.live]);
            cmd.arg(&self.rs.node).arg(ttl_ms);
            let users = self.present.get(name);
            for u in changed.get(name).into_iter().flatten() {
                cmd.arg(&**u).arg(users.and_then(|m| m.get(u)).copied().unwrap_or(0));
            }
            let slot = if cluster { store::slot(keys.meta.as_bytes()) } else { 0 };
            by_slot.entry(slot).or_insert_with(redis::pipe).add_command(cmd).ignore();
        }
        self.present.retain(|_, users| !users.is_empty());
        self.writing = true;
        let gen = self.gen;
        self.ops.spawn(async move {
            let mut result = Ok(());
            for (_, pipe) in by_slot {
                if let Err(e) = run_pipe(&mut conn, &pipe).await {
                    result = Err(e.to_string());
                    break;
                }
            }
            Done::Wrote { gen, result }
        });
    }

    fn connect(&mut self) {
        self.connecting = true;
        let (gen, cfg, node) = (self.gen, self.cfg.clone(), self.rs.node.clone());
        self.ops.spawn(async move { Done::Connected(gen, open(&cfg, &node).await) });
    }

    fn connected(&mut self, conn: Conn, pushes: UnboundedReceiver<PushInfo>, cluster: bool) {
        let was = self.rs.metrics.connects_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            cluster,
            node = %self.rs.node,
            channels = self.chans.len(),
            "connected to Redis{}",
            if was > 0 { "; subscribing again and reading what every channel missed" } else { "" }
        );
        self.rs.cluster.store(cluster, Ordering::Relaxed);
        self.conn = Some(conn);
        self.pushes = Some(pushes);
        self.backoff = MIN_BACKOFF;
        self.pinged_at = Instant::now();
        // Everything followed is subscribed again; each channel reads its stream from where it stopped.
        self.control_pending = true;
        self.to_unsubscribe.clear();
        self.to_subscribe = self
            .chans
            .iter_mut()
            .map(|(n, c)| {
                c.rejoin();
                (n.clone(), c.id)
            })
            .collect();
        // Redis may have lost this node's presence entries: write them all again.
        for (name, users) in &self.present {
            self.changed.entry(name.clone()).or_default().extend(users.keys().cloned());
        }
        self.rs.up.store(true, Ordering::Release);
    }

    /// The connection is lost (or was never made): answer what waited, reconnect later.
    fn lost(&mut self, why: &str) {
        if self.conn.is_none() {
            return;
        }
        self.rs.metrics.disconnects_total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = why,
            "lost Redis: cluster-wide publishes and subscribes answer `unavailable` until it is back"
        );
        self.conn = None;
        self.pushes = None;
        self.gen += 1;
        self.rs.up.store(false, Ordering::Release);
        if let Ok(mut e) = self.rs.last_error.lock() {
            *e = why.to_string();
        }
        for item in std::mem::take(&mut self.publishes) {
            self.publish_failed(item, UNAVAILABLE);
        }
        self.subscribing = false;
        self.writing = false;
        self.pinging = false;
        let names: Vec<Arc<str>> = self.chans.keys().cloned().collect();
        for name in names {
            let Some(c) = self.chans.get_mut(&name) else { continue };
            c.rejoin();
            c.reading_from = None;
            let waiting = std::mem::take(&mut c.waiting);
            for req in waiting {
                self.rs.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
                let (code, reason) = (UNAVAILABLE.code, UNAVAILABLE.reason);
                let msg = ShardMsg::Refused { channel: name.clone(), reply: req.reply, subscribe: true, code, reason };
                self.send(usize::from(req.reply.shard), msg);
            }
        }
        self.retry_later(why);
    }

    fn retry_later(&mut self, why: &str) {
        if let Ok(mut e) = self.rs.last_error.lock() {
            *e = why.to_string();
        }
        // Full jitter: anywhere up to the backoff, so nodes that lost Redis together do not return together.
        let wait = Duration::from_nanos(crate::sys::random_u64() % (self.backoff.as_nanos() as u64 + 1));
        tracing::warn!(error = why, retry_in = ?wait, "Redis unavailable; retrying");
        self.retry_at = Instant::now() + wait.max(Duration::from_millis(20));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects: detects a Cluster, opens the connection with pushes (RESP3) and the timeouts, loads the scripts.
async fn open(cfg: &RedisConfig, node: &str) -> Result<(Conn, UnboundedReceiver<PushInfo>, bool), String> {
    let t = cfg.timeout;
    let e = |e: redis::RedisError| e.to_string();
    let resp3 = |url: &str| -> Result<redis::ConnectionInfo, String> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(e)?;
        let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        Ok(info.set_redis_settings(settings))
    };
    let (tx, rx) = unbounded_channel();
    let first = redis::Client::open(resp3(&cfg.urls[0])?).map_err(e)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(t))
        .set_response_timeout(Some(t))
        .set_push_sender(tx.clone());
    let mut single = first.get_multiplexed_async_connection_with_config(&config).await.map_err(e)?;
    let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut single).await.map_err(e)?;
    let cluster = info.lines().any(|l| l.trim() == "cluster_enabled:1");
    let mut conn = if cluster {
        drop(single);
        let infos = cfg.urls.iter().map(|u| resp3(u)).collect::<Result<Vec<_>, _>>()?;
        let client = redis::cluster::ClusterClientBuilder::new(infos)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .connection_timeout(t)
            .response_timeout(t)
            .retries(1)
            .build()
            .map_err(e)?;
        Conn::Cluster(client.get_async_connection().await.map_err(e)?)
    } else {
        Conn::Single(single)
    };
    load_scripts(&mut conn).await.map_err(e)?;
    // Named, so an operator's CLIENT LIST tells which node a connection is.
    let mut name = redis::cmd("CLIENT");
    name.arg("SETNAME").arg(format!("throng-{node}"));
    conn.cmd(&name).await.map_err(e)?;
    Ok((conn, rx, cluster))
}

/// Loads every script (on every master of a Cluster).
async fn load_scripts(conn: &mut Conn) -> redis::RedisResult<()> {
    for src in store::ALL {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(src);
        conn.cmd(&load).await?;
    }
    Ok(())
}

fn no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Runs a command; when Redis lost the scripts (a restart, a failover), loads them and runs it again.
async fn run_cmd(conn: &mut Conn, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
    match conn.cmd(cmd).await {
        Err(e) if no_script(&e) => {
            load_scripts(conn).await?;
            conn.cmd(cmd).await
        }
        r => r,
    }
}

/// [`run_cmd`] for a pipeline.
async fn run_pipe(conn: &mut Conn, p: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
    match conn.pipe(p).await {
        Err(e) if no_script(&e) => {
            load_scripts(conn).await?;
            conn.pipe(p).await
        }
        r => r,
    }
}

/// `EVALSHA` of one of the scripts of [`store`] with its keys; the caller adds the arguments.
fn evalsha(src: &'static str, keys: &[&str]) -> redis::Cmd {
    static SHAS: std::sync::OnceLock<Vec<(&'static str, String)>> = std::sync::OnceLock::new();
    let shas =
        SHAS.get_or_init(|| store::ALL.iter().map(|s| (*s, redis::Script::new(s).get_hash().to_string())).collect());
    let sha = shas.iter().find(|(s, _)| *s == src).map_or("", |(_, h)| h.as_str());
    let mut c = redis::cmd("EVALSHA");
    c.arg(sha).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

async fn recv(rx: &mut Option<UnboundedReceiver<PushInfo>>) -> Option<PushInfo> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn index_of(it: &PubItem) -> u32 {
    match it.to {
        PubTo::Api(_, i) => i,
        PubTo::Client(_) => 0,
    }
}
