//! The backend HTTP API (`/api/*`): what a backend uses to publish and manage users without speaking
//! WebSocket. JSON in and out, authenticated by `api_key` (`Authorization: apikey <key>`, compared in
//! constant time), on kept-alive connections.
//!
//! | request | does | answer |
//! |---|---|---|
//! | `POST /api/publish` `{"channel","data"}` or `{"batch":[...]}` | publishes at each channel's home, as a client publish | `{"offsets":[{"channel","offset","epoch"}]}` |
//! | `GET /api/presence?channel=` | the home's presence reply | the v1 `presence` object |
//! | `GET /api/history?channel=&since=&epoch=&limit=` | the home's history reply | the v1 `history` object |
//! | `POST /api/disconnect` `{"user"}` or `{"client"}`, `code`, `reason` | closes those WebSockets on every shard | `{"disconnected":N}` |
//! | `GET /api/channels?cursor=&limit=` | channels with subscribers, by name, from every shard | `{"channels":[...],"next_cursor"}` |
//!
//! # Answers from other shards
//! What a request is about may live on other shards (a channel's home; every shard's connections). The
//! request goes to them through the inter-shard rings ([`crate::channel::api::ApiMsg`]) and the HTTP
//! connection waits ([`flag::HTTP_WAITING`]: nothing behind the request is read meanwhile, so pipelined
//! requests are answered in order) for every part of the answer, gathered in this shard's [`Pending`] table:
//! at most [`MAX_PENDING`] requests (more: 503), each entry addressed by a [`Ticket`] (slot and generation).
//! When the last part is in, the response is written if the connection is still the one that asked and
//! still waiting: an answer for a connection that went away, or that timed out (`handshake_timeout`: 503 and
//! close), frees the entry and is dropped. Entries whose answers never come (a shard gone during a drain)
//! are swept once their connection's deadline is long past.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use slab::Slab;
use throng_protocol::frame::parse_header;
use throng_protocol::handshake::{self, Request, Status};
use throng_protocol::message::parse_channel;

use crate::channel::api::{ApiMsg, PublishItem, Published, Ticket};
use crate::channel::bus::{Sent, ShardMsg};
use crate::channel::home::EpochStr;
use crate::channel::Refusal;
use crate::conn::close::{self, Close};
use crate::conn::{flag, timers, Conn, ConnKey, Conns, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

/// API requests one shard keeps waiting for other shards at once; more are answered 503.
pub const MAX_PENDING: usize = 1024;
/// Messages in one `POST /api/publish` batch.
pub const MAX_BATCH: usize = 1000;
/// Most channels one `GET /api/channels` page lists.
pub const MAX_PAGE: u32 = 1000;
/// Longest channel name.
const MAX_CHANNEL: usize = 128;
/// The close code of `POST /api/disconnect` when the request names none.
pub const DEFAULT_CLOSE_CODE: u16 = 4000;
/// Its reason.
pub const DEFAULT_CLOSE_REASON: &str = "disconnected by the server";

/// A shard's API requests waiting for answers from other shards.
#[derive(Debug, Default)]
pub struct Pending {
    entries: Slab<Entry>,
    next_gen: u32,
}

#[derive(Debug)]
struct Entry {
    gen: u32,
    /// The HTTP connection that asked.
    conn: ConnKey,
    /// Parts still to come.
    parts: u32,
    /// Tick the request started waiting at.
    since: u64,
    acc: Acc,
}

/// A response being gathered.
#[derive(Debug)]
enum Acc {
    /// Each message's channel and, once known, its offset and epoch or refusal. `batch`: the request was
    /// a batch (per-message errors in a 200) rather than one message (an error is the response's status).
    Publish { batch: bool, items: Vec<(Box<str>, Option<Published>)> },
    /// A presence or history object.
    Json(Option<Bytes>),
    /// A presence or history request that failed where it was sent (the relay without Redis): 503.
    Failed(Refusal),
    /// Connections closed so far.
    Disconnect(u64),
    /// The page so far: the first `limit` names after the cursor, with their subscribers summed.
    Channels { limit: usize, list: Vec<(Arc<str>, u64)> },
}

impl Pending {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A new entry for `conn`, or `None` when the table is full (after forgetting entries whose answers
    /// are overdue by more than `stale` ticks: their connection's deadline closed it long ago).
    fn insert(&mut self, env: &Env, conn: ConnKey, acc: Acc) -> Option<Ticket> {
        if self.entries.len() >= MAX_PENDING {
            let stale = 2 * Env::ticks(env.cfg().handshake_timeout);
            self.entries.retain(|_, e| env.now.saturating_sub(e.since) <= stale);
            if self.entries.len() >= MAX_PENDING {
                return None;
            }
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let slot = self.entries.insert(Entry { gen, conn, parts: 0, since: env.now, acc });
        Some(Ticket { shard: env.id as u16, slot: slot as u32, gen })
    }

    fn get_mut(&mut self, t: Ticket) -> Option<&mut Entry> {
        self.entries.get_mut(t.slot as usize).filter(|e| e.gen == t.gen)
    }

    fn remove(&mut self, t: Ticket) -> Option<Entry> {
        self.get_mut(t)?;
        Some(self.entries.remove(t.slot as usize))
    }
}

/// Appends a JSON response: `status`, `Content-Type: application/json`, `body`.
fn write_json(out: &mut Vec<u8>, status: Status, body: &[u8], keep_alive: bool, headers: &[(&str, &str)]) {
    let mut h: [(&str, &str); 3] = [("Cache-Control", "no-store"), ("", ""), ("", "")];
    let n = headers.len().min(2);
    h[1..1 + n].copy_from_slice(&headers[..n]);
    handshake::write_response(out, status, "application/json", &h[..1 + n], body, keep_alive);
}

/// Appends an error response: `{"error":"<code>","reason":"<reason>"}` with `status`.
pub fn write_error(
    out: &mut Vec<u8>,
    status: Status,
    code: &str,
    reason: &str,
    keep_alive: bool,
    headers: &[(&str, &str)],
) {
    let mut body = Vec::with_capacity(32 + code.len() + reason.len());
    body.extend_from_slice(b"{\"error\":");
    handshake::write_json_str(&mut body, code);
    body.extend_from_slice(b",\"reason\":");
    handshake::write_json_str(&mut body, reason);
    body.push(b'}');
    write_json(out, status, &body, keep_alive, headers);
}

/// Compares the presented key with the configured one in time that depends only on their lengths: every
/// byte of the configured key is compared (against the presented key's byte at that position, or 0 past
/// its end), differences are accumulated, never returned early.
fn key_matches(given: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != key.len());
    for (i, k) in key.iter().enumerate() {
        diff |= k ^ given.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// The key of an `Authorization: apikey <key>` header (scheme case-insensitive).
fn presented_key<'a>(req: &Request<'a>) -> Option<&'a str> {
    let auth = req.authorization?;
    let (scheme, rest) = auth.split_at(auth.find([' ', '\t'])?);
    scheme.eq_ignore_ascii_case("apikey").then(|| rest.trim_matches([' ', '\t']))
}

/// A refusal: counted, answered with `status` and a JSON reason; the connection stays open (except after a
/// request whose body was refused on its head: see [`crate::http::takes_body`]).
struct Refused {
    status: Status,
    code: &'static str,
    reason: Cow<'static, str>,
}

fn bad(reason: impl Into<Cow<'static, str>>) -> Refused {
    Refused { status: Status::BadRequest, code: "bad_request", reason: reason.into() }
}

/// Whether a request to `/api/*` passes the checks made on its head alone (`public_port`: it came to the
/// main listener while `admin_listen` is set): the API served on this port and enabled, the right key, a
/// known path and its method. Only such a request's body is read ([`crate::http::takes_body`]).
pub fn head_ok(env: &Env, req: &Request<'_>, public_port: bool) -> bool {
    check_head(env, req, public_port).is_ok()
}

/// The checks on the head: served on this port, the API enabled, the right key, a known path, its method.
fn check_head(env: &Env, req: &Request<'_>, public_port: bool) -> Result<(), Refused> {
    if public_port {
        return Err(Refused {
            status: Status::NotFound,
            code: "not_found",
            reason: "the API is served on admin_listen".into(),
        });
    }
    let Some(api_key) = &env.cfg().api_key else {
        return Err(Refused {
            status: Status::NotFound,
            code: "not_found",
            reason: "api disabled: set api_key".into(),
        });
    };
    if !presented_key(req).is_some_and(|k| key_matches(k.as_bytes(), api_key.0.as_bytes())) {
        return Err(Refused {
            status: Status::Unauthorized,
            code: "unauthorized",
            reason: "missing or wrong API key: send Authorization: apikey <key>".into(),
        });
    }
    let post = match req.path {
        "/api/publish" | "/api/disconnect" => true,
        "/api/presence" | "/api/history" | "/api/channels" => false,
        _ => {
            return Err(Refused { status: Status::NotFound, code: "not_found", reason: "no such API endpoint".into() })
        }
    };
    if req.method != if post { "POST" } else { "GET" } {
        let reason = if post { "use POST" } else { "use GET" };
        return Err(Refused { status: Status::MethodNotAllowed, code: "method_not_allowed", reason: reason.into() });
    }
    Ok(())
}

/// Handles a request to `/api/*` (`public_port`: it came to the main listener while `admin_listen` is set).
/// Writes the response to `ctx.out`, or sets [`flag::HTTP_WAITING`] and answers when other shards have.
pub fn on_request(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    body: &[u8],
    public_port: bool,
) {
    let m = &env.metrics;
    ShardMetrics::inc(&m.api_requests_total);
    let keep_alive = req.keep_alive();
    let result = check_head(env, req, public_port).and_then(|()| route(env, ctx, key, conn, req, body));
    if let Err(r) = result {
        ShardMetrics::inc(&m.http_rejected_total);
        ShardMetrics::inc(match r.status {
            Status::Unauthorized => &m.api_unauthorized_total,
            Status::NotFound => &m.api_not_found_total,
            Status::MethodNotAllowed => &m.api_method_not_allowed_total,
            Status::ServiceUnavailable => &m.api_overloaded_total,
            _ => &m.api_bad_request_total,
        });
        let allow = match (r.status, req.path) {
            (Status::MethodNotAllowed, "/api/publish" | "/api/disconnect") => Some("POST"),
            (Status::MethodNotAllowed, _) => Some("GET"),
            _ => None,
        };
        let header = match (r.status, allow) {
            (_, Some(a)) => Some(("Allow", a)),
            (Status::Unauthorized, _) => Some(("WWW-Authenticate", "apikey")),
            _ => None,
        };
        write_error(&mut ctx.out, r.status, r.code, &r.reason, keep_alive, header.as_slice());
    }
}

/// Routes a request that passed [`check_head`].
fn route(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    body: &[u8],
) -> Result<(), Refused> {
    let keep_alive = req.keep_alive();
    match req.path {
        "/api/publish" => publish(env, ctx, key, conn, body, keep_alive),
        "/api/disconnect" => disconnect(env, ctx, key, conn, body, keep_alive),
        "/api/presence" => presence(env, ctx, key, conn, req, keep_alive),
        "/api/history" => history(env, ctx, key, conn, req, keep_alive),
        _ => channels(env, ctx, key, conn, req, keep_alive),
    }
}

/// Checks a channel name: the wire protocol's charset and length, and an existing namespace.
fn valid_channel(env: &Env, name: &str) -> Result<(), Refused> {
    parse_channel(name, MAX_CHANNEL).map_err(|e| bad(format!("channel {name:?}: {e}")))?;
    if env.cfg().namespaces.of_channel(name).is_none() {
        return Err(Refused {
            status: Status::BadRequest,
            code: "unknown_namespace",
            reason: format!("channel {name:?}: no such namespace is configured").into(),
        });
    }
    Ok(())
}

/// Reads a JSON field that may be any value, `null` included (a missing field stays `None`).
fn raw_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "raw_value")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    batch: Option<Vec<PublishOne<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishOne<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refused> {
    if body.is_empty() {
        return Err(bad("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}")))
}

/// Publishes at the home on this shard: the offset and the channel's epoch.
fn publish_here(env: &Env, ctx: &mut Ctx, channel: &str, data: &[u8], born: u64) -> Published {
    let offset = ctx.chans.publish_at(env, channel, data, born)?;
    let epoch = ctx.chans.home_idx(channel).map_or(0, |i| ctx.chans.homes[i].epoch);
    Ok((offset, epoch))
}

/// `POST /api/publish`.
fn publish(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    body: &[u8],
    keep_alive: bool,
) -> Result<(), Refused> {
    let parsed: PublishBody<'_> = json(body)?;
    let (batch, msgs) = match parsed {
        PublishBody { channel: Some(c), data: Some(d), batch: None } => {
            (false, vec![PublishOne { channel: c, data: d }])
        }
        PublishBody { channel: None, data: None, batch: Some(b) } => (true, b),
        _ => {
            return Err(bad("send {\"channel\":...,\"data\":...} or {\"batch\":[{\"channel\":...,\"data\":...},...]}"))
        }
    };
    if msgs.is_empty() || msgs.len() > MAX_BATCH {
        return Err(bad(format!("a batch holds 1 to {MAX_BATCH} messages, got {}", msgs.len())));
    }
    let max_data = env.cfg().max_message_size;
    for m in &msgs {
        valid_channel(env, &m.channel)?;
        if m.data.get().len() > max_data {
            return Err(bad(format!("data of {} bytes is over max_message_size ({max_data})", m.data.get().len())));
        }
    }
    // The shards, and the relay when there is one.
    let destinations = env.shared.inboxes.len();
    let homes: Vec<usize> = msgs.iter().map(|m| env.home(&m.channel)).collect();
    let remote = homes.iter().any(|&h| h != env.id);
    let items = msgs.iter().map(|m| (Box::<str>::from(&*m.channel), None)).collect();
    let ticket = if remote {
        let Some(t) = ctx.api.insert(env, key, Acc::Publish { batch, items }) else { return Err(overloaded()) };
        Some(t)
    } else {
        None
    };
    let born = crate::metrics::stamp(env.shared.started);
    let mut local: Vec<(u32, Published)> = Vec::new();
    let mut groups: Vec<Vec<PublishItem>> = (0..destinations).map(|_| Vec::new()).collect();
    for (i, (m, &home)) in msgs.iter().zip(&homes).enumerate() {
        if home == env.id {
            local.push((i as u32, publish_here(env, ctx, &m.channel, m.data.get().as_bytes(), born)));
        } else {
            groups[home].push((i as u32, Box::from(&*m.channel), Bytes::copy_from_slice(m.data.get().as_bytes())));
        }
    }
    let Some(ticket) = ticket else {
        // Every message was homed here: answered now.
        let acc = Acc::Publish {
            batch,
            items: msgs.iter().zip(local).map(|(m, (_, r))| (Box::<str>::from(&*m.channel), Some(r))).collect(),
        };
        let (status, body) = respond(env, acc);
        write_json(&mut ctx.out, status, &body, keep_alive, &[]);
        return Ok(());
    };
    let mut parts = 0;
    // What is known now: the messages published here, and those whose home's ring refused them.
    let mut known: Vec<(u32, Published)> = local;
    for (home, items) in groups.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
        let msg = ShardMsg::Api(ApiMsg::Publish { ticket, born, items });
        match ctx.chans.outbox.send(home, msg) {
            Sent::Queued => parts += 1,
            Sent::Refused(ShardMsg::Api(ApiMsg::Publish { items, .. })) => {
                ShardMetrics::inc(&env.metrics.overloaded_total);
                known.extend(items.into_iter().map(|(i, _, _)| (i, Err(OVERLOADED))));
            }
            Sent::Refused(_) => {}
        }
    }
    if let Some(e) = ctx.api.get_mut(ticket) {
        e.parts = parts;
        merge(&mut e.acc, Part::Published(known));
    }
    wait_or_answer(env, ctx, key, conn, ticket, keep_alive);
    Ok(())
}

const OVERLOADED: Refusal = Refusal { code: "overloaded", reason: "the channel's shard is overloaded, retry later" };

fn overloaded() -> Refused {
    Refused {
        status: Status::ServiceUnavailable,
        code: "overloaded",
        reason: "too many API requests waiting for other shards; retry later".into(),
    }
}

/// After a request's parts were sent: wait for them, or answer now when none is outstanding (every ring
/// refused).
fn wait_or_answer(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, ticket: Ticket, keep_alive: bool) {
    let parts = ctx.api.get_mut(ticket).map_or(0, |e| e.parts);
    if parts > 0 {
        // Whether the answer keeps the connection is remembered in HTTP_SERVED (the timer looks at
        // HTTP_WAITING first while it waits).
        conn.flags |= flag::HTTP_WAITING;
        if keep_alive {
            conn.flags |= flag::HTTP_SERVED;
        } else {
            conn.flags &= !flag::HTTP_SERVED;
        }
        timers::http_deadline(env, ctx, key, conn);
        return;
    }
    if let Some(e) = ctx.api.remove(ticket) {
        let (status, body) = respond(env, e.acc);
        write_json(&mut ctx.out, status, &body, keep_alive, &[]);
    }
}

/// The channel named by `?channel=`, checked.
fn channel_param(env: &Env, req: &Request<'_>) -> Result<String, Refused> {
    let name = req.query_param("channel").ok_or_else(|| bad("the channel query parameter is required"))?;
    valid_channel(env, &name)?;
    Ok(name.into_owned())
}

/// Sends a request for a channel to its home and waits, or answers a refused one with 503.
fn ask_home(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    home: usize,
    keep_alive: bool,
    make: impl FnOnce(Ticket) -> ApiMsg,
) -> Result<(), Refused> {
    let ticket = ctx.api.insert(env, key, Acc::Json(None)).ok_or_else(overloaded)?;
    match ctx.chans.outbox.send(home, ShardMsg::Api(make(ticket))) {
        Sent::Queued => {
            if let Some(e) = ctx.api.get_mut(ticket) {
                e.parts = 1;
            }
            wait_or_answer(env, ctx, key, conn, ticket, keep_alive);
            Ok(())
        }
        Sent::Refused(_) => {
            ctx.api.remove(ticket);
            ShardMetrics::inc(&env.metrics.overloaded_total);
            Err(Refused { status: Status::ServiceUnavailable, code: "overloaded", reason: OVERLOADED.reason.into() })
        }
    }
}

/// The JSON object inside a v1 reply frame (the frame minus its header).
pub fn frame_json(frame: Bytes) -> Bytes {
    match parse_header(&frame) {
        Ok(Some(h)) => frame.slice(usize::from(h.header_len)..),
        _ => frame,
    }
}

/// `GET /api/presence?channel=`: the v1 `presence` reply's object.
fn presence(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    keep_alive: bool,
) -> Result<(), Refused> {
    let channel = channel_param(env, req)?;
    if !env.cfg().namespaces.of_channel(&channel).is_some_and(|ns| ns.presence) {
        let reason = "presence is disabled in this namespace";
        return Err(Refused { status: Status::BadRequest, code: "not_available", reason: reason.into() });
    }
    let home = env.home(&channel);
    if home == env.id {
        let body = frame_json(ctx.chans.presence_reply(env, &channel, None));
        write_json(&mut ctx.out, Status::Ok, &body, keep_alive, &[]);
        return Ok(());
    }
    ask_home(env, ctx, key, conn, home, keep_alive, |ticket| ApiMsg::Presence { ticket, channel: channel.into() })
}

/// `GET /api/history?channel=&since=&epoch=&limit=`: the v1 `history` reply's object.
fn history(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    keep_alive: bool,
) -> Result<(), Refused> {
    let channel = channel_param(env, req)?;
    let since = match (req.query_param("since"), req.query_param("epoch")) {
        (None, None) => None,
        (Some(s), Some(e)) => {
            let offset = s.parse::<u64>().map_err(|_| bad("since must be an offset (a non-negative integer)"))?;
            if e.is_empty() || e.len() > 64 {
                return Err(bad("epoch must be 1 to 64 characters"));
            }
            Some((offset, Box::<str>::from(&*e)))
        }
        _ => return Err(bad("since and epoch go together: the position last seen")),
    };
    let limit = match req.query_param("limit") {
        None => 100,
        Some(l) => match l.parse::<u32>() {
            Ok(n @ 1..=1000) => n,
            _ => return Err(bad("limit must be 1 to 1000")),
        },
    };
    let home = env.home(&channel);
    if home == env.id {
        let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
        let body = frame_json(ctx.chans.history_reply(env, &channel, None, since_ref, limit));
        write_json(&mut ctx.out, Status::Ok, &body, keep_alive, &[]);
        return Ok(());
    }
    ask_home(env, ctx, key, conn, home, keep_alive, |ticket| ApiMsg::History {
        ticket,
        channel: channel.into(),
        since,
        limit,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody<'a> {
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

/// A client id as the welcome gives it (`<shard>-<generation>-<slot>` in hex, and `-<node>` with Redis,
/// [`crate::shard::Env::client_id`]): its shard, key and node.
fn parse_client(id: &str) -> Option<(usize, ConnKey, Option<&str>)> {
    let mut it = id.split('-');
    let shard = usize::from_str_radix(it.next()?, 16).ok()?;
    let gen = u32::from_str_radix(it.next()?, 16).ok()?;
    let idx = u32::from_str_radix(it.next()?, 16).ok()?;
    let node = match it.next() {
        None => None,
        Some(n) if n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()) => Some(n),
        Some(_) => return None,
    };
    it.next().is_none().then_some((shard, ConnKey { idx, gen }, node))
}

/// `POST /api/disconnect`.
fn disconnect(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    body: &[u8],
    keep_alive: bool,
) -> Result<(), Refused> {
    let b: DisconnectBody<'_> = json(body)?;
    let code = b.code.unwrap_or(DEFAULT_CLOSE_CODE);
    if !(4000..=4999).contains(&code) {
        return Err(bad("code must be 4000 to 4999 (the application's close codes)"));
    }
    let reason = b.reason.as_deref().unwrap_or(DEFAULT_CLOSE_REASON);
    if reason.len() > 123 {
        return Err(bad("reason must be at most 123 bytes (it travels in the close frame)"));
    }
    let me = env.shared.relay.as_ref().map(|r| r.node.as_str());
    let (user, targets, client, remote) = match (&b.user, &b.client) {
        // Every shard of this node, and, with Redis, the relay: it tells every other node.
        (Some(u), None) if crate::auth::valid_user(u) => {
            (Some(Box::<str>::from(&**u)), (0..env.shared.inboxes.len()).collect(), None, None)
        }
        (Some(_), None) => return Err(bad("user must be 1-128 characters of [A-Za-z0-9_.@=/-]")),
        (None, Some(c)) => match parse_client(c) {
            Some((shard, k, node)) if shard < env.shards() && (node.is_none() || node == me) => {
                (None, vec![shard], Some(k), None)
            }
            // Another node's connection: the relay passes the request on to it.
            Some((shard, k, Some(node))) if me.is_some() => {
                (None, vec![env.shards()], Some(k), Some((Box::<str>::from(node), shard as u16)))
            }
            _ => {
                // No such connection can exist.
                write_json(&mut ctx.out, Status::Ok, b"{\"disconnected\":0}", keep_alive, &[]);
                return Ok(());
            }
        },
        _ => return Err(bad("send exactly one of user and client")),
    };
    let ticket = ctx.api.insert(env, key, Acc::Disconnect(0)).ok_or_else(overloaded)?;
    // Every target shard, this one included (through its own inbox: closing needs the connection slab),
    // answers with the connections it closed.
    let mut parts = 0;
    for shard in targets {
        let remote = remote.clone();
        let msg = ApiMsg::Disconnect { ticket, user: user.clone(), client, remote, code, reason: reason.into() };
        match ctx.chans.outbox.send(shard, ShardMsg::Api(msg)) {
            Sent::Queued => parts += 1,
            Sent::Refused(_) => ShardMetrics::inc(&env.metrics.overloaded_total),
        }
    }
    if parts == 0 {
        ctx.api.remove(ticket);
        return Err(overloaded());
    }
    if let Some(e) = ctx.api.get_mut(ticket) {
        e.parts = parts;
    }
    wait_or_answer(env, ctx, key, conn, ticket, keep_alive);
    Ok(())
}

/// This shard's channels with subscribers named after `after`: the first `limit`, in name order.
fn local_channels(ctx: &Ctx, after: &str, limit: usize) -> Vec<(Arc<str>, u64)> {
    let mut list: Vec<(Arc<str>, u64)> = ctx
        .chans
        .locals
        .iter()
        .filter(|(_, c)| !c.subs.is_empty() && &*c.name > after)
        .map(|(_, c)| (c.name.clone(), c.subs.len() as u64))
        .collect();
    if list.len() > limit {
        list.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
        list.truncate(limit);
    }
    list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    list
}

/// `GET /api/channels?cursor=&limit=`.
fn channels(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    keep_alive: bool,
) -> Result<(), Refused> {
    let after = req.query_param("cursor").unwrap_or_default();
    if after.len() > MAX_CHANNEL {
        return Err(bad("cursor is a channel name"));
    }
    let limit = match req.query_param("limit") {
        None => 100,
        Some(l) => match l.parse::<u32>() {
            Ok(n @ 1..=MAX_PAGE) => n,
            _ => return Err(bad(format!("limit must be 1 to {MAX_PAGE}"))),
        },
    };
    // Each shard gives one name more than the page: if the channels after the cursor are more than a page,
    // the first `limit + 1` of them are all among what the shards give (each is among the first `limit + 1`
    // of a shard that has it), so the page and whether there is a next one are both exact.
    let list = local_channels(ctx, &after, limit as usize + 1);
    let acc = Acc::Channels { limit: limit as usize, list };
    if env.shards() == 1 {
        let (status, body) = respond(env, acc);
        write_json(&mut ctx.out, status, &body, keep_alive, &[]);
        return Ok(());
    }
    let ticket = ctx.api.insert(env, key, acc).ok_or_else(overloaded)?;
    let mut parts = 0;
    for shard in (0..env.shards()).filter(|&s| s != env.id) {
        let msg = ApiMsg::Channels { ticket, after: after.as_ref().into(), limit: limit + 1 };
        match ctx.chans.outbox.send(shard, ShardMsg::Api(msg)) {
            Sent::Queued => parts += 1,
            Sent::Refused(_) => {
                // A page missing a shard's channels would be wrong, not just short. Answers already asked
                // for arrive at an entry that is gone: dropped.
                ShardMetrics::inc(&env.metrics.overloaded_total);
                ctx.api.remove(ticket);
                return Err(overloaded());
            }
        }
    }
    if let Some(e) = ctx.api.get_mut(ticket) {
        e.parts = parts;
    }
    wait_or_answer(env, ctx, key, conn, ticket, keep_alive);
    Ok(())
}

/// One part of an answer.
enum Part {
    Published(Vec<(u32, Published)>),
    Json(Bytes),
    Failed(Refusal),
    Count(u64),
    Channels(Vec<(Arc<str>, u64)>),
}

fn merge(acc: &mut Acc, part: Part) {
    match (acc, part) {
        (Acc::Publish { items, .. }, Part::Published(results)) => {
            for (i, r) in results {
                if let Some(slot) = items.get_mut(i as usize) {
                    slot.1 = Some(r);
                }
            }
        }
        (Acc::Json(j), Part::Json(b)) => *j = Some(b),
        (acc @ Acc::Json(_), Part::Failed(r)) => *acc = Acc::Failed(r),
        (Acc::Disconnect(n), Part::Count(c)) => *n += c,
        (Acc::Channels { limit, list }, Part::Channels(more)) => {
            list.extend(more);
            list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            // The same channel from several shards: one entry, subscribers summed.
            list.dedup_by(|later, first| {
                let same = later.0 == first.0;
                if same {
                    first.1 += later.1;
                }
                same
            });
            // One more than the page, to tell whether there is a next one.
            list.truncate(*limit + 1);
        }
        _ => {}
    }
}

/// The response to a complete request.
fn respond(env: &Env, acc: Acc) -> (Status, Vec<u8>) {
    let mut o = Vec::with_capacity(256);
    match acc {
        Acc::Publish { batch, items } => {
            let ok = items.iter().filter(|(_, r)| matches!(r, Some(Ok(_)))).count();
            ShardMetrics::add(&env.metrics.api_published_total, ok as u64);
            if !batch {
                if let Some((_, Some(Err(r)))) = items.first() {
                    o.push(b'{');
                    write_refusal(&mut o, r);
                    return (Status::ServiceUnavailable, o);
                }
            }
            o.extend_from_slice(b"{\"offsets\":[");
            for (i, (channel, r)) in items.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                o.extend_from_slice(b"{\"channel\":");
                handshake::write_json_str(&mut o, channel);
                match r {
                    Some(Ok((offset, epoch))) => {
                        o.extend_from_slice(format!(",\"offset\":{offset},\"epoch\":\"").as_bytes());
                        o.extend_from_slice(EpochStr::new(*epoch).as_str().as_bytes());
                        o.extend_from_slice(b"\"}");
                    }
                    Some(Err(r)) => {
                        o.push(b',');
                        write_refusal(&mut o, r);
                    }
                    None => o.extend_from_slice(b",\"error\":\"internal\",\"reason\":\"no answer\"}"),
                }
            }
            o.extend_from_slice(b"]}");
        }
        Acc::Json(Some(b)) => o.extend_from_slice(&b),
        Acc::Failed(r) => {
            o.push(b'{');
            write_refusal(&mut o, &r);
            return (Status::ServiceUnavailable, o);
        }
        Acc::Json(None) => {
            o.extend_from_slice(b"{\"error\":\"internal\",\"reason\":\"no answer\"}");
            return (Status::InternalServerError, o);
        }
        Acc::Disconnect(n) => {
            ShardMetrics::add(&env.metrics.api_disconnected_total, n);
            o.extend_from_slice(format!("{{\"disconnected\":{n}}}").as_bytes());
        }
        Acc::Channels { limit, list } => write_channels(&mut o, limit, &list),
    }
    (Status::Ok, o)
}

/// `"error":<code>,"reason":<reason>}`: the end of a JSON object saying why something was refused.
fn write_refusal(o: &mut Vec<u8>, r: &Refusal) {
    o.extend_from_slice(b"\"error\":");
    handshake::write_json_str(o, r.code);
    o.extend_from_slice(b",\"reason\":");
    handshake::write_json_str(o, r.reason);
    o.push(b'}');
}

/// A page of `GET /api/channels`: the first `limit` of `list`, and the cursor of the next page when `list`
/// holds more.
fn write_channels(o: &mut Vec<u8>, limit: usize, list: &[(Arc<str>, u64)]) {
    o.extend_from_slice(b"{\"channels\":[");
    for (i, (name, n)) in list.iter().take(limit).enumerate() {
        if i > 0 {
            o.push(b',');
        }
        o.extend_from_slice(b"{\"channel\":");
        handshake::write_json_str(o, name);
        o.extend_from_slice(format!(",\"subscribers\":{n}}}").as_bytes());
    }
    o.extend_from_slice(b"],\"next_cursor\":");
    match list.get(limit.saturating_sub(1)).filter(|_| list.len() > limit) {
        Some((last, _)) => handshake::write_json_str(o, last),
        None => o.extend_from_slice(b"null"),
    }
    o.push(b'}');
}

/// Sends an answer part to the shard that asked (or takes it here when that is this shard).
fn answer(env: &Env, ctx: &mut Ctx, conns: &mut Conns, msg: ApiMsg) {
    let shard = usize::from(msg.ticket().shard);
    if shard == env.id {
        on_shard_msg(env, ctx, conns, msg);
    } else {
        let _ = ctx.chans.outbox.send(shard, ShardMsg::Api(msg));
    }
}

/// Closes this shard's `/ws` connections (and `/sse` streams, held polls) of `user`, or the one connection
/// `client`; returns how many.
/// A scan of the shard's connections (a few ms for 100k): it runs once per request and shard.
pub fn close_matching(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    user: Option<&str>,
    client: Option<ConnKey>,
    code: u16,
    reason: &str,
) -> u64 {
    let keys: Vec<ConnKey> = match (user, client) {
        (_, Some(k)) => vec![k],
        (Some(u), None) => conns
            .keys()
            .into_iter()
            .filter(|&k| conns.get(k).is_some_and(|c| matches!(c.phase, Phase::V1 | Phase::Sse) && c.user() == u))
            .collect(),
        (None, None) => Vec::new(),
    };
    let mut n = 0;
    for k in keys {
        let Some(c) = conns.get_mut(k).filter(|c| matches!(c.phase, Phase::V1 | Phase::Sse)) else { continue };
        close::close(env, ctx, k, c, Close::Ws(code, reason));
        n += 1;
    }
    n
}

/// A backend API message from another shard (or from this one, through its own inbox).
pub fn on_shard_msg(env: &Env, ctx: &mut Ctx, conns: &mut Conns, msg: ApiMsg) {
    match msg {
        ApiMsg::Publish { ticket, born, items } => {
            let results = items
                .into_iter()
                .map(|(i, channel, data)| (i, publish_here(env, ctx, &channel, &data, born)))
                .collect();
            answer(env, ctx, conns, ApiMsg::Published { ticket, results });
        }
        ApiMsg::Presence { ticket, channel } => {
            let body = frame_json(ctx.chans.presence_reply(env, &channel, None));
            answer(env, ctx, conns, ApiMsg::Json { ticket, body });
        }
        ApiMsg::History { ticket, channel, since, limit } => {
            let since_ref = since.as_ref().map(|(o, e)| (*o, &**e));
            let body = frame_json(ctx.chans.history_reply(env, &channel, None, since_ref, limit));
            answer(env, ctx, conns, ApiMsg::Json { ticket, body });
        }
        ApiMsg::Disconnect { ticket, user, client, code, reason, .. } => {
            let count = close_matching(env, ctx, conns, user.as_deref(), client, code, &reason);
            answer(env, ctx, conns, ApiMsg::Disconnected { ticket, count });
        }
        ApiMsg::Channels { ticket, after, limit } => {
            let list = local_channels(ctx, &after, limit as usize);
            answer(env, ctx, conns, ApiMsg::ChannelList { ticket, list });
        }
        ApiMsg::Published { ticket, results } => part(env, ctx, conns, ticket, Part::Published(results)),
        ApiMsg::Json { ticket, body } => part(env, ctx, conns, ticket, Part::Json(body)),
        ApiMsg::Failed { ticket, refusal } => part(env, ctx, conns, ticket, Part::Failed(refusal)),
        ApiMsg::Disconnected { ticket, count } => part(env, ctx, conns, ticket, Part::Count(count)),
        ApiMsg::ChannelList { ticket, list } => part(env, ctx, conns, ticket, Part::Channels(list)),
    }
}

/// One part of a pending request's answer arrived; the last one writes the response, if its connection is
/// still there and waiting for it.
fn part(env: &Env, ctx: &mut Ctx, conns: &mut Conns, ticket: Ticket, part: Part) {
    let Some(e) = ctx.api.get_mut(ticket) else { return };
    merge(&mut e.acc, part);
    e.parts = e.parts.saturating_sub(1);
    if e.parts > 0 {
        return;
    }
    let Some(e) = ctx.api.remove(ticket) else { return };
    let key = e.conn;
    let Some(conn) = conns.get_mut(key).filter(|c| c.phase == Phase::Handshake && c.flags & flag::HTTP_WAITING != 0)
    else {
        return;
    };
    conn.flags &= !flag::HTTP_WAITING;
    let keep_alive = conn.flags & flag::HTTP_SERVED != 0;
    let (status, body) = respond(env, e.acc);
    write_json(&mut ctx.out, status, &body, keep_alive, &[]);
    super::answered_later(env, ctx, key, conn, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        let key = b"0123456789abcdef";
        assert!(key_matches(b"0123456789abcdef", key));
        for wrong in
            [&b""[..], b"0", b"0123456789abcdeX", b"X123456789abcdef", b"0123456789abcdef0", b"0123456789abcde"]
        {
            assert!(!key_matches(wrong, key), "{wrong:?}");
        }
        // A prefix padded with zero bytes is still the wrong length.
        assert!(!key_matches(b"0123456789abcde\0", b"0123456789abcde"));
    }

    #[test]
    fn authorization_scheme() {
        let req = |auth: &str| format!("GET /api/channels HTTP/1.1\r\nAuthorization: {auth}\r\n\r\n");
        for (auth, want) in [
            ("apikey k1", Some("k1")),
            ("ApiKey   k2 ", Some("k2")),
            ("APIKEY\tk3", Some("k3")),
            ("Bearer k4", None),
            ("apikeyk5", None),
            ("apikey", None),
        ] {
            let raw = req(auth);
            let parsed = handshake::parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
            assert_eq!(presented_key(&parsed), want, "{auth:?}");
        }
    }

    #[test]
    fn client_ids() {
        assert_eq!(parse_client("1-2a-7"), Some((1, ConnKey { idx: 7, gen: 0x2a }, None)));
        let node = "0123456789abcdef";
        assert_eq!(parse_client(&format!("1-2a-7-{node}")), Some((1, ConnKey { idx: 7, gen: 0x2a }, Some(node))));
        for bad in ["", "1", "1-2", "1-2-3-4", "1-2-3-0123456789abcdeg", "x-1-1", "1--1", "1-1-fffffffff"] {
            assert_eq!(parse_client(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn channel_pages_merge_exactly() {
        let list = |names: &[(&str, u64)]| names.iter().map(|(n, c)| (Arc::<str>::from(*n), *c)).collect::<Vec<_>>();
        let mut acc = Acc::Channels { limit: 2, list: list(&[("a", 1), ("b", 1), ("c", 1)]) };
        merge(&mut acc, Part::Channels(list(&[("a", 2), ("b", 3), ("d", 1)])));
        let Acc::Channels { list: merged, .. } = &acc else { unreachable!() };
        assert_eq!(merged, &list(&[("a", 3), ("b", 4), ("c", 1)]));
        let page = respond_channels(acc);
        assert_eq!(
            page,
            r#"{"channels":[{"channel":"a","subscribers":3},{"channel":"b","subscribers":4}],"next_cursor":"b"}"#
        );
        let acc = Acc::Channels { limit: 2, list: list(&[("a", 1), ("b", 1)]) };
        assert_eq!(
            respond_channels(acc),
            r#"{"channels":[{"channel":"a","subscribers":1},{"channel":"b","subscribers":1}],"next_cursor":null}"#
        );
    }

    /// The channel page [`respond`] writes (it needs no shard for this kind).
    fn respond_channels(acc: Acc) -> String {
        let Acc::Channels { limit, list } = acc else { unreachable!() };
        let mut o = Vec::new();
        write_channels(&mut o, limit, &list);
        String::from_utf8(o).unwrap()
    }
}
