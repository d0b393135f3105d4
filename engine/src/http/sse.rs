//! The HTTP fallback for clients whose WebSocket is blocked: `GET /sse` (Server-Sent Events, for
//! `EventSource`), and CORS for the fallback endpoints (`/sse`, `/poll`, `/publish`).
//!
//! # One delivery path
//! An `/sse` stream is a connection in the [`Phase::Sse`] phase and a subscriber in the shard's channel
//! tables exactly like a `/ws` connection: the same local logs and cursors, the same flush pass
//! ([`crate::channel::delivery::flush_stream`]), the same slow-consumer bound (`max_backlog_bytes`; an SSE
//! stream over it is closed with a `close` event, code 4008). What differs is the bytes: a log entry is
//! written as its Server-Sent Event ([`event_of`]), made once per entry by the first SSE subscriber it is
//! written to and shared by all the others (`LogEntry::wire`): a publish is encoded once for WebSocket and
//! once for SSE per shard, never per SSE subscriber.
//!
//! # Positions and `Last-Event-ID`
//! Every write that carries messages to a stream ends with an `id:` line (with no data: it sets the
//! browser's last event id without dispatching an event) naming the stream's position in each of its
//! channels, in the order of the request's `channel` parameters: `<epoch>:<offset>` (16 hex digits, a
//! decimal offset) or `-` for a channel whose position is not known yet, separated by commas. At most
//! [`MAX_CHANNELS`] channels, so an id is at most ~2.4 KB and fits a request head. On reconnect the browser
//! sends it back as `Last-Event-ID` (the same URL, so the same channels in the same order), and each channel
//! resumes through history as a `/ws` subscribe with `since` would: `subscribed` says `recovered`.
//! Delivery is at least once across a reconnect: events written after the last `id:` line that reached the
//! browser come again (deduplicate by channel and offset).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use throng_protocol::handshake::{self, Request, Status};
use throng_protocol::message::{self, parse_channel};

use crate::auth::{net, Action};
use crate::channel::bus::{ReplyTo, Sent, ShardMsg};
use crate::channel::home::EpochStr;
use crate::channel::{frame_bytes, Refusal};
use crate::conn::{flag, timers, write, Conn, ConnKey, ConnSub, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

/// Most channels one `/sse` request may name (and at most `max_subscriptions`).
pub const MAX_CHANNELS: usize = 64;

/// Response headers computed per request (CORS).
pub type Headers = Vec<(&'static str, String)>;

/// A shard's `/sse` streams, by connection.
pub type Streams = HashMap<ConnKey, Stream>;

/// What a stream delivered in each of its channels: the position its next `id:` line names.
#[derive(Debug, Default)]
pub struct Stream {
    pos: Vec<Pos>,
    /// Messages were delivered since the last `id:` line went out.
    pub unsent: bool,
    /// A held `GET /poll` rather than an `/sse` stream.
    poll: Option<Box<Poll>>,
    /// A `POST /publish` waiting for the channel's home shard (not a stream): the CORS headers and
    /// keep-alive of its response.
    publish: Option<(Headers, bool, Box<str>)>,
}

/// The answer a held `GET /poll` is gathering.
#[derive(Debug, Default)]
struct Poll {
    /// The messages so far: v1 `message` objects, comma-separated.
    body: Vec<u8>,
    /// How many.
    count: usize,
    /// Channels whose `since` could not be served (`recovered:false`).
    lost: Vec<Box<str>>,
    /// Refused channels: name, code, reason.
    errors: Vec<(Box<str>, &'static str, &'static str)>,
    /// Subscriptions the home has not confirmed yet.
    pending: u32,
    /// The answer reached its bound: nothing more is taken.
    full: bool,
    /// CORS headers for the response.
    headers: Vec<(&'static str, String)>,
    keep_alive: bool,
}

impl Poll {
    /// Takes one message's JSON into the answer, unless that would pass [`POLL_BODY_BOUND`] (the first
    /// message is always taken): then the answer is full, and false says the rest waits for the next poll.
    fn take(&mut self, json: &[u8]) -> bool {
        if self.full || (self.count > 0 && self.body.len() + json.len() > POLL_BODY_BOUND) {
            self.full = true;
            return false;
        }
        if self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(json);
        self.count += 1;
        true
    }
}

/// A stream's position in one channel.
#[derive(Clone, Debug)]
struct Pos {
    /// The channel.
    name: Box<str>,
    /// Its local channel index while subscribed ([`NOT_SUBSCRIBED`] otherwise).
    chan: u32,
    /// Epoch and offset of the last message delivered (or of the client's `since`), when known.
    at: Option<(u64, u64)>,
}

const NOT_SUBSCRIBED: u32 = u32::MAX;

/// Positions as they will be once the frames being gathered are written: the stream's, with the offsets
/// of the messages in the write over them (no allocation).
#[derive(Debug)]
pub struct Ahead<'a> {
    stream: &'a Stream,
    last: [u64; MAX_CHANNELS],
    /// Some message moved a position.
    pub moved: bool,
}

impl Ahead<'_> {
    /// A message of the local channel `chan` at `offset` is in the write.
    pub fn advance(&mut self, chan: u32, offset: u64) {
        if let Some(i) = self.stream.pos.iter().position(|p| p.chan == chan).filter(|&i| i < MAX_CHANNELS) {
            self.last[i] = offset;
            self.moved = true;
        }
    }

    /// Writes the `id:` line (a block of its own, so it dispatches nothing).
    pub fn write_id(&self, out: &mut Vec<u8>) {
        write_id_with(out, &self.stream.pos, &self.last);
    }
}

impl Stream {
    /// True for a held `GET /poll`.
    pub fn is_poll(&self) -> bool {
        self.poll.is_some()
    }

    /// The positions, to advance over a write being gathered.
    pub fn positions(&self) -> Ahead<'_> {
        Ahead { stream: self, last: [0; MAX_CHANNELS], moved: false }
    }

    /// A message of the local channel `chan` at `offset` was handed to the socket (or queued whole).
    pub fn delivered(&mut self, chan: u32, offset: u64) {
        if let Some(p) = self.pos.iter_mut().find(|p| p.chan == chan) {
            p.at = Some((p.at.map_or(0, |a| a.0), offset));
            self.unsent = true;
        }
    }
}

fn write_id(out: &mut Vec<u8>, pos: &[Pos]) {
    write_id_with(out, pos, &[]);
}

/// The `id:` line of `pos`, with `last[i]` (when not 0) as the offset of channel `i`.
fn write_id_with(out: &mut Vec<u8>, pos: &[Pos], last: &[u64]) {
    use std::io::Write as _;
    out.extend_from_slice(b"id: ");
    for (i, p) in pos.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let at = match last.get(i).filter(|&&o| o != 0) {
            Some(&o) => Some((p.at.map_or(0, |a| a.0), o)),
            None => p.at,
        };
        match at {
            Some((epoch, offset)) => {
                out.extend_from_slice(EpochStr::new(epoch).as_str().as_bytes());
                let _ = write!(out, ":{offset}");
            }
            None => out.push(b'-'),
        }
    }
    out.extend_from_slice(b"\n\n");
}

/// Parses positions as `id:` lines write them (`since=`, `Last-Event-ID`): one per channel.
fn parse_positions(s: &str, channels: usize) -> Option<Vec<Option<(u64, u64)>>> {
    let list: Vec<Option<(u64, u64)>> = s
        .trim()
        .split(',')
        .map(|p| match p {
            "-" => Some(None),
            p => {
                let (e, o) = p.split_once(':')?;
                if e.len() != 16 {
                    return None;
                }
                Some(Some((u64::from_str_radix(e, 16).ok()?, o.parse().ok()?)))
            }
        })
        .collect::<Option<_>>()?;
    (list.len() == channels).then_some(list)
}

/// The payload of an unmasked server frame.
fn payload(frame: &[u8]) -> &[u8] {
    let head = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(head..).unwrap_or_default()
}

/// Appends the Server-Sent Event of a v1 message (its JSON object, as the payload of `frame`): messages
/// as unnamed events (`onmessage`), others (`welcome`, `subscribed`, `gap`, `error`, ...) named by their
/// `type`. JSON needs no line breaks outside strings and allows none inside them, so any in the published
/// data (pretty-printed JSON) become spaces: one `data:` line, the same JSON value.
pub fn write_event(out: &mut Vec<u8>, frame: &[u8]) {
    let json = payload(frame);
    let ty = json
        .strip_prefix(b"{\"type\":\"")
        .and_then(|r| r.iter().position(|&b| b == b'"').map(|end| &r[..end]))
        .unwrap_or(b"message");
    if ty != b"message" {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(ty);
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    let at = out.len();
    out.extend_from_slice(json);
    for b in &mut out[at..] {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    out.extend_from_slice(b"\n\n");
}

/// [`write_event`] as shared bytes: what a log entry becomes for SSE subscribers.
pub fn event_of(frame: &[u8]) -> Bytes {
    let mut o = Vec::with_capacity(frame.len() + 16);
    write_event(&mut o, frame);
    Bytes::from(o)
}

/// The last event of a stream the server ends: `event: close` with the code and reason a WebSocket would
/// have got (1001 shutdown, 4001 token expired, 4008 slow consumer, ...).
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.extend_from_slice(b"event: close\ndata: {\"type\":\"close\",\"code\":");
    out.extend_from_slice(code.to_string().as_bytes());
    out.extend_from_slice(b",\"reason\":");
    handshake::write_json_str(out, reason);
    out.extend_from_slice(b"}\n\n");
}

/// The last bytes of a stream or held poll the server ends (drain, expiry, slow consumer): a `close`
/// event, or for a poll a 503.
pub fn goodbye(out: &mut Vec<u8>, stream: Option<&Stream>, code: u16, reason: &str) {
    match stream {
        Some(s) if s.is_poll() => handshake::write_rejection(out, Status::ServiceUnavailable, reason),
        _ => write_close(out, code, reason),
    }
}

/// An `error` event for a channel whose subscription was refused (the stream goes on with the others).
fn write_error(out: &mut Vec<u8>, channel: &str, code: &str, reason: &str) {
    out.extend_from_slice(b"event: error\ndata: {\"type\":\"error\",\"channel\":");
    handshake::write_json_str(out, channel);
    out.extend_from_slice(b",\"code\":");
    handshake::write_json_str(out, code);
    out.extend_from_slice(b",\"reason\":");
    handshake::write_json_str(out, reason);
    out.extend_from_slice(b"}\n\n");
}

/// The epoch in a `subscribed` frame.
fn epoch_in(frame: &[u8]) -> u64 {
    let json = payload(frame);
    let key = b"\"epoch\":\"";
    json.windows(key.len())
        .position(|w| w == key)
        .and_then(|i| json.get(i + key.len()..i + key.len() + 16))
        .and_then(|h| u64::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
        .unwrap_or(0)
}

/// Percent-decodes a query value (`+` as space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every value of the query parameter `name`, decoded.
pub fn query_all(req: &Request<'_>, name: &str) -> Vec<String> {
    req.query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == name).then(|| decode(v))
        })
        .collect()
}

/// The CORS headers of a response to a fallback request: `None` when the request has an `Origin` that
/// `allowed_origins` does not allow (refused with 403), else the headers (none without an `Origin`).
/// An allowed origin is echoed (with `Vary: Origin` and `Access-Control-Allow-Credentials: true`); with
/// no `allowed_origins` configured every origin is allowed as `*`, without credentials.
pub fn cors(env: &Env, req: &Request<'_>) -> Option<Vec<(&'static str, String)>> {
    let Some(origin) = req.origin else { return Some(Vec::new()) };
    let allowed = &env.cfg().allowed_origins;
    if !net::origin_allowed(origin, allowed) {
        return None;
    }
    Some(if allowed.is_empty() {
        vec![("Access-Control-Allow-Origin", "*".into())]
    } else {
        vec![
            ("Access-Control-Allow-Origin", origin.into()),
            ("Access-Control-Allow-Credentials", "true".into()),
            ("Vary", "Origin".into()),
        ]
    })
}

fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

/// Handles a request to a fallback endpoint (`/sse`, `/poll`, `/publish`), or its CORS preflight.
/// Writes a response to `ctx.out` (the caller keeps or closes the connection after it), or refuses and
/// closes, or starts a stream or a held poll (the connection is then in [`Phase::Sse`]).
pub fn on_request(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>, body: &[u8]) {
    ShardMetrics::inc(&env.metrics.http_requests_total);
    let client_addr = super::client_ip(env, ctx, key, conn, req);
    let Some(cors) = cors(env, req) else {
        ShardMetrics::inc(&env.metrics.origin_refused_total);
        return super::refuse(env, ctx, key, conn, client_addr, Status::Forbidden, "origin not allowed", &[]);
    };
    let headers = as_refs(&cors);
    if req.method == "OPTIONS" {
        let mut h = headers.clone();
        h.push(("Access-Control-Allow-Methods", "GET, POST, OPTIONS"));
        h.push(("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"));
        h.push(("Access-Control-Max-Age", "600"));
        handshake::write_response(&mut ctx.out, Status::NoContent, "", &h, b"", req.keep_alive());
        return;
    }
    if req.path == "/publish" {
        return publish(env, ctx, key, conn, req, body, client_addr, cors);
    }
    let poll = req.path == "/poll";
    if req.method != "GET" {
        let mut h = headers.clone();
        h.push(("Allow", "GET"));
        return super::refuse(env, ctx, key, conn, client_addr, Status::MethodNotAllowed, "use GET", &h);
    }
    if env.shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        ShardMetrics::inc(&env.metrics.drain_refused_total);
        let reason = "server is shutting down: connect to another node";
        return super::refuse(env, ctx, key, conn, client_addr, Status::ServiceUnavailable, reason, &headers);
    }
    let mut identity = match super::identify(env, req) {
        Ok(i) => i,
        Err((status, reason)) => {
            if status == Status::Unauthorized {
                ShardMetrics::inc(&env.metrics.auth_refused_total);
            }
            return super::refuse(env, ctx, key, conn, client_addr, status, &reason, &headers);
        }
    };
    let channels = query_all(req, "channel");
    let most = MAX_CHANNELS.min(env.cfg().max_subscriptions);
    let bad = |reason: String| Err((Status::BadRequest, reason));
    let checked: Result<(), (Status, String)> = if channels.is_empty() {
        bad(format!("name at least one channel: {}?channel=a&channel=b", req.path))
    } else if channels.len() > most {
        ShardMetrics::inc(&env.metrics.subscription_limit_total);
        bad(format!("at most {most} channels per request (max_subscriptions, and {MAX_CHANNELS})"))
    } else {
        channels.iter().enumerate().try_for_each(|(i, c)| {
            if channels[..i].contains(c) {
                return bad(format!("channel {c:?} named twice"));
            }
            parse_channel(c, 128).map_err(|e| (Status::BadRequest, format!("channel {c:?}: {e}")))?;
            let Some(ns) = env.cfg().namespaces.of_channel(c) else {
                return bad(format!("channel {c:?}: no such namespace is configured"));
            };
            identity.may(Action::Subscribe, c, ns).map_err(|d| {
                ShardMetrics::inc(&env.metrics.forbidden_total);
                (Status::Forbidden, format!("channel {c:?}: {}", d.reason()))
            })
        })
    };
    if let Err((status, reason)) = checked {
        return super::refuse(env, ctx, key, conn, client_addr, status, &reason, &headers);
    }
    let since = if poll {
        // `since=<channel>:<epoch>:<offset>`, once per channel that has a position.
        let mut since = vec![None; channels.len()];
        for s in query_all(req, "since") {
            let parsed = s.rsplit_once(':').and_then(|(rest, o)| {
                let (c, e) = rest.rsplit_once(':')?;
                let i = channels.iter().position(|x| x == c)?;
                (e.len() == 16).then_some(())?;
                Some((i, u64::from_str_radix(e, 16).ok()?, o.parse::<u64>().ok()?))
            });
            match parsed {
                Some((i, e, o)) => since[i] = Some((e, o)),
                None => {
                    let reason = "since: <channel>:<epoch>:<offset> of one of the channels, as positions give them";
                    return super::refuse(env, ctx, key, conn, client_addr, Status::BadRequest, reason, &headers);
                }
            }
        }
        since
    } else {
        // Where to resume: the browser's Last-Event-ID (an id this server wrote: ignored when it does not
        // fit these channels), else `since=` (the same format; 400 when malformed).
        let last = req.header("last-event-id").and_then(|l| parse_positions(l, channels.len()));
        match (last, req.query_param("since")) {
            (Some(l), _) => l,
            (None, Some(s)) => match parse_positions(&s, channels.len()) {
                Some(s) => s,
                None => {
                    let reason = "since: one <epoch>:<offset> or - per channel, comma-separated, as the id lines";
                    return super::refuse(env, ctx, key, conn, client_addr, Status::BadRequest, reason, &headers);
                }
            },
            (None, None) => vec![None; channels.len()],
        }
    };
    let ip = net::limit_key(client_addr);
    if let Err(over) = env.shared.limits.acquire(&identity.user, Some(ip)) {
        let (metric, reason) = match over {
            crate::auth::limits::Over::User => {
                (&env.metrics.user_limit_total, "this user holds max_connections_per_user connections")
            }
            crate::auth::limits::Over::Ip => {
                (&env.metrics.ip_limit_total, "this address holds max_connections_per_ip connections")
            }
        };
        ShardMetrics::inc(metric);
        return super::refuse(env, ctx, key, conn, client_addr, Status::Forbidden, reason, &headers);
    }
    identity.ip = Some(ip);
    let user: Box<str> = identity.user.as_ref().into();
    conn.expires_at = timers::expiry_tick(env, identity.exp());
    conn.id = Some(Arc::new(identity));
    conn.phase = Phase::Sse;
    if poll {
        let p = Poll { headers: cors, keep_alive: req.keep_alive(), ..Poll::default() };
        ctx.sse.insert(key, Stream { poll: Some(Box::new(p)), ..Stream::default() });
        let deadline = env.now + crate::shard::Env::ticks(env.cfg().poll_timeout);
        match conn.timer {
            Some(t) if ctx.wheel.reset(t, deadline) => {}
            _ => conn.timer = Some(ctx.wheel.insert(deadline, key)),
        }
    } else {
        // The stream: its head, then events until either side ends it.
        ctx.out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Accel-Buffering: no\r\n",
        );
        for (n, v) in &headers {
            ctx.out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        ctx.out.extend_from_slice(b"\r\nretry: 1000\n\n");
        let client = env.client_id(conn.gen, key.idx);
        let ping = env.cfg().ping_interval.as_secs() as u32;
        let welcome = frame_bytes(|o| message::encode_welcome(o, &client, &user, ping));
        write_event(&mut ctx.out, &welcome);
        tracing::debug!(shard = env.id, %client_addr, %client, user = &*user, "sse stream");
        timers::arm_heartbeat(env, ctx, conn);
        ctx.sse.insert(key, Stream::default());
    }
    for (name, at) in channels.iter().zip(since) {
        // Its entry first, in request order, at the client's position until the home positions it.
        if let Some(stream) = ctx.sse.get_mut(&key) {
            stream.pos.push(Pos { name: name.as_str().into(), chan: NOT_SUBSCRIBED, at });
        }
        match subscribe(env, ctx, key, conn, name, at) {
            Subscribed::Now(idx, frame, missed, offset) => {
                took(ctx, key, idx, name, at.is_some(), &frame, &missed, offset)
            }
            Subscribed::Pending(idx) => {
                if let Some(p) = ctx.sse.get_mut(&key).and_then(|s| s.pos.iter_mut().find(|p| &*p.name == name)) {
                    p.chan = idx;
                }
            }
            Subscribed::Refused(code, reason) => refused_here(ctx, key, name, code, reason),
        }
    }
    if poll {
        if ctx.sse.get(&key).is_some_and(ready) {
            answer(env, ctx, key, conn, false);
        } else {
            // Held: nothing behind the request is read until it is answered, so pipelined requests
            // keep their order.
            conn.flags |= flag::HTTP_WAITING;
        }
    } else if let Some(stream) = ctx.sse.get(&key) {
        write_id(&mut ctx.out, &stream.pos);
    }
}

enum Subscribed {
    /// Positioned now (the home is this shard): local channel, the `subscribed` frame, the missed
    /// messages, the offset.
    Now(u32, Bytes, Vec<Bytes>, u64),
    /// Asked the home; [`confirmed`] or [`refused`] follows.
    Pending(u32),
    /// Refused: code and reason.
    Refused(&'static str, &'static str),
}

/// Subscribes the stream to one channel, as a `/ws` subscribe with `since` (permissions already checked).
fn subscribe(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    channel: &str,
    since: Option<(u64, u64)>,
) -> Subscribed {
    let Some(ns) = env.cfg().namespaces.of_channel(channel) else {
        return Subscribed::Refused("unknown_namespace", "no such namespace is configured");
    };
    let idx = match ctx.chans.local_entry(env, channel, ns) {
        Ok(i) => i,
        Err(Refusal { code, reason }) => return Subscribed::Refused(code, reason),
    };
    let user = ns.presence.then(|| conn.presence_user());
    let home = env.home(channel);
    let reply = ReplyTo { shard: env.id as u16, conn: key, id: None };
    let epoch = since.map(|(e, _)| EpochStr::new(e));
    let since_ref = since.zip(epoch.as_ref()).map(|((_, o), e)| (o, e.as_str()));
    if home == env.id {
        match ctx.chans.subscribe_at_home(env, channel, reply, since_ref, user.as_ref()) {
            Ok((frame, missed, offset)) => {
                let slot = ctx.chans.locals[idx].subscribe(key, offset);
                conn.subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
                ShardMetrics::inc(&env.metrics.subscriptions_total);
                ShardMetrics::inc(&env.metrics.active_subscriptions);
                Subscribed::Now(idx as u32, frame, missed, offset)
            }
            Err(Refusal { code, reason }) => {
                ctx.chans.drop_local_if_unused(idx);
                Subscribed::Refused(code, reason)
            }
        }
    } else {
        let since = since_ref.map(|(o, e)| (o, Box::<str>::from(e)));
        let msg = ShardMsg::Subscribe { channel: channel.into(), reply, since, user };
        match ctx.chans.outbox.send(home, msg) {
            Sent::Queued => {
                ctx.chans.locals[idx].pending += 1;
                conn.subs.push(ConnSub { chan: idx as u32, slot: ConnSub::PENDING });
                if let Some(p) = ctx.sse.get_mut(&key).and_then(|s| s.poll.as_mut()) {
                    p.pending += 1;
                }
                Subscribed::Pending(idx as u32)
            }
            Sent::Refused(_) => {
                ShardMetrics::inc(&env.metrics.overloaded_total);
                ctx.chans.drop_local_if_unused(idx);
                Subscribed::Refused("overloaded", "the channel's shard is overloaded, retry later")
            }
        }
    }
}

/// The offset in a v1 `message` object.
fn offset_in(json: &[u8]) -> u64 {
    let key = b"\"offset\":";
    json.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            json[i + key.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |a, &d| a * 10 + u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

/// A subscription positioned at `offset` (its `subscribed` frame and the missed messages): written as
/// events to a stream, or taken into a poll's answer (within the reply bound: the position stays at the
/// last message taken). `asked`: the client gave a position (so `recovered:false` is news).
#[allow(clippy::too_many_arguments)]
fn took(ctx: &mut Ctx, key: ConnKey, idx: u32, name: &str, asked: bool, frame: &Bytes, missed: &[Bytes], offset: u64) {
    let epoch = epoch_in(frame);
    let recovered = recovered_in(frame);
    let Some(stream) = ctx.sse.get_mut(&key) else { return };
    let Some(entry) = stream.pos.iter_mut().find(|p| &*p.name == name) else { return };
    entry.chan = idx;
    match stream.poll.as_mut() {
        None => {
            entry.at = Some((epoch, offset));
            write_event(&mut ctx.out, frame);
            for f in missed {
                write_event(&mut ctx.out, f);
            }
        }
        Some(p) => {
            if asked && !recovered {
                p.lost.push(name.into());
            }
            let mut last = None;
            for f in missed {
                let json = payload(f);
                if !p.take(json) {
                    // The rest waits for the next poll: the position stays at the last message taken.
                    break;
                }
                last = Some(offset_in(json));
            }
            entry.at = match (p.full, last) {
                (false, _) => Some((epoch, offset)),
                (true, Some(o)) => Some((epoch, o)),
                (true, None) => entry.at,
            };
        }
    }
}

/// Bytes of messages one poll answer carries at most (the client polls again for the rest).
const POLL_BODY_BOUND: usize = 256 * 1024;

/// Whether a `subscribed` frame says `recovered:true`.
fn recovered_in(frame: &[u8]) -> bool {
    let json = payload(frame);
    json.windows(16).any(|w| w == b"\"recovered\":true")
}

/// A refused subscription: an `error` event, or an error in the poll's answer.
fn refused_here(ctx: &mut Ctx, key: ConnKey, channel: &str, code: &'static str, reason: &'static str) {
    let Some(stream) = ctx.sse.get_mut(&key) else { return };
    if let Some(p) = stream.pos.iter_mut().find(|p| &*p.name == channel) {
        p.chan = NOT_SUBSCRIBED;
    }
    match stream.poll.as_mut() {
        Some(p) => p.errors.push((channel.into(), code, reason)),
        None => write_error(&mut ctx.out, channel, code, reason),
    }
}

/// A poll has something to say and nothing more to wait for from other shards.
fn ready(s: &Stream) -> bool {
    s.poll.as_ref().is_some_and(|p| p.pending == 0 && (p.count > 0 || !p.lost.is_empty() || !p.errors.is_empty()))
}

/// Answers a held poll: `{"messages":[...],"positions":{...},"recovered":..}`; the connection leaves its
/// channels and goes back to reading requests. `later`: answered outside its request's handling (a
/// delivery, a confirmation, the timeout), so the response is written here and reading resumes.
fn answer(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, later: bool) {
    let Some(stream) = ctx.sse.remove(&key) else { return };
    let Some(p) = stream.poll else { return };
    let user = conn.presence_user();
    for sub in std::mem::take(&mut conn.subs) {
        ctx.chans.leave(env, &user, sub);
    }
    if let Some(id) = conn.id.take() {
        env.shared.limits.release(&id.user, id.ip);
    }
    let mut o = Vec::with_capacity(p.body.len() + 128);
    o.extend_from_slice(b"{\"messages\":[");
    o.extend_from_slice(&p.body);
    o.extend_from_slice(b"],\"positions\":{");
    for (i, pos) in stream.pos.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        handshake::write_json_str(&mut o, &pos.name);
        o.push(b':');
        match pos.at {
            Some((e, off)) => o.extend_from_slice(format!("\"{}:{off}\"", EpochStr::new(e).as_str()).as_bytes()),
            None => o.extend_from_slice(b"null"),
        }
    }
    o.extend_from_slice(b"},\"recovered\":");
    o.extend_from_slice(if p.lost.is_empty() { b"true" } else { b"false" });
    if !p.lost.is_empty() {
        o.extend_from_slice(b",\"not_recovered\":[");
        for (i, c) in p.lost.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            handshake::write_json_str(&mut o, c);
        }
        o.push(b']');
    }
    if !p.errors.is_empty() {
        o.extend_from_slice(b",\"errors\":[");
        for (i, (c, code, reason)) in p.errors.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            o.extend_from_slice(b"{\"channel\":");
            handshake::write_json_str(&mut o, c);
            o.extend_from_slice(b",\"code\":");
            handshake::write_json_str(&mut o, code);
            o.extend_from_slice(b",\"reason\":");
            handshake::write_json_str(&mut o, reason);
            o.push(b'}');
        }
        o.push(b']');
    }
    o.push(b'}');
    conn.phase = Phase::Handshake;
    conn.flags &= !flag::HTTP_WAITING;
    let mut h = as_refs(&p.headers);
    h.push(("Cache-Control", "no-store"));
    let start = ctx.out.len();
    handshake::write_response(&mut ctx.out, Status::Ok, "application/json", &h, &o, p.keep_alive);
    if later {
        super::answered_later(env, ctx, key, conn, start);
    }
}

/// The flush pass reached a held poll: takes what its channels' logs hold for it into its answer, and
/// answers when there is something (and no confirmation is still awaited).
pub fn poll_flush(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    let Some(stream) = ctx.sse.get_mut(&key) else { return };
    let Stream { pos, poll: Some(p), .. } = stream else { return };
    for s in conn.subs.iter().filter(|s| s.is_active()) {
        if p.full {
            break;
        }
        let ch = &mut ctx.chans.locals[s.chan as usize];
        let base = ch.base;
        let sub = &mut ch.subs[s.slot as usize];
        while let Some(e) = ch.log.get((sub.cursor - base) as usize) {
            if e.offset != 0 {
                let json = payload(&e.frame);
                if !p.take(json) {
                    break;
                }
                if let Some(x) = pos.iter_mut().find(|x| x.chan == s.chan) {
                    x.at = Some((x.at.map_or(0, |a| a.0), e.offset));
                }
            }
            sub.cursor += 1;
        }
    }
    if ctx.sse.get(&key).is_some_and(ready) {
        answer(env, ctx, key, conn, true);
    }
}

/// A held poll's time is up: answered with what it has (usually nothing).
pub fn poll_expired(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    answer(env, ctx, key, conn, true);
}

/// A subscription confirmed by its home shard (the subscriber is positioned already): the `subscribed`
/// event, the missed messages, the new `id:`; for a poll, into its answer.
#[allow(clippy::too_many_arguments)]
pub fn confirmed(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    idx: usize,
    offset: u64,
    frame: &Bytes,
    missed: &[Bytes],
) {
    ShardMetrics::inc(&env.metrics.subscriptions_total);
    ShardMetrics::inc(&env.metrics.active_subscriptions);
    let Some(stream) = ctx.sse.get_mut(&key) else { return };
    let Some(pos) = stream.pos.iter().find(|p| p.chan == idx as u32) else { return };
    let (name, asked) = (pos.name.clone(), pos.at.is_some());
    if let Some(p) = stream.poll.as_mut() {
        p.pending = p.pending.saturating_sub(1);
    }
    took(ctx, key, idx as u32, &name, asked, frame, missed, offset);
    match ctx.sse.get(&key) {
        Some(s) if s.is_poll() && ready(s) => answer(env, ctx, key, conn, true),
        Some(s) if s.is_poll() => {}
        Some(s) => {
            write_id(&mut ctx.out, &s.pos);
            write::send_out(env, ctx, key, conn);
        }
        None => {}
    }
}

/// A subscription refused by its home shard: an `error` event (the stream goes on with its other
/// channels, and keeps the client's position in this one for its next reconnect), or an error in a
/// poll's answer.
pub fn refused(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    channel: &str,
    code: &'static str,
    reason: &'static str,
) {
    if let Some(p) = ctx.sse.get_mut(&key).and_then(|s| s.poll.as_mut()) {
        p.pending = p.pending.saturating_sub(1);
    }
    refused_here(ctx, key, channel, code, reason);
    if ctx.sse.get(&key).is_some_and(|s| s.is_poll()) {
        if ctx.sse.get(&key).is_some_and(ready) {
            answer(env, ctx, key, conn, true);
        }
    } else {
        write::send_out(env, ctx, key, conn);
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// `POST /publish` `{"channel","data"}` from a fallback client: the checks of a `/ws` publish (the token,
/// the namespace, the `publish` claim or role, `max_message_size`), counted against the address's
/// `max_upgrades_per_second_per_ip` (each request is a new HTTP exchange, like an upgrade); answers
/// `{"channel","offset"}` once the channel's home has published it.
#[allow(clippy::too_many_arguments)]
fn publish(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    req: &Request<'_>,
    body: &[u8],
    client_addr: std::net::IpAddr,
    cors: Vec<(&'static str, String)>,
) {
    let headers = as_refs(&cors);
    let keep_alive = req.keep_alive();
    if req.method != "POST" {
        let mut h = headers.clone();
        h.push(("Allow", "POST"));
        return super::refuse(env, ctx, key, conn, client_addr, Status::MethodNotAllowed, "use POST", &h);
    }
    let identity = match super::identify(env, req) {
        Ok(i) => i,
        Err((status, reason)) => {
            if status == Status::Unauthorized {
                ShardMetrics::inc(&env.metrics.auth_refused_total);
            }
            return super::refuse(env, ctx, key, conn, client_addr, status, &reason, &headers);
        }
    };
    if let Err(secs) = env.shared.limits.upgrade(net::limit_key(client_addr), std::time::Instant::now()) {
        ShardMetrics::inc(&env.metrics.rate_limited_total);
        let retry = secs.to_string();
        let mut h = headers.clone();
        h.push(("Retry-After", &retry));
        let reason = "too many requests from this address: max_upgrades_per_second_per_ip";
        return super::refuse(env, ctx, key, conn, client_addr, Status::TooManyRequests, reason, &h);
    }
    let parsed: Result<PublishBody<'_>, String> = if body.is_empty() {
        Err("a JSON body {\"channel\":...,\"data\":...} is required".into())
    } else {
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))
    };
    let checked = parsed.and_then(|p| {
        parse_channel(&p.channel, 128).map_err(|e| format!("channel {:?}: {e}", p.channel))?;
        let max = env.cfg().max_message_size;
        if p.data.get().len() > max {
            return Err(format!("data of {} bytes is over max_message_size ({max})", p.data.get().len()));
        }
        Ok(p)
    });
    let p = match checked {
        Ok(p) => p,
        Err(reason) => return super::refuse(env, ctx, key, conn, client_addr, Status::BadRequest, &reason, &headers),
    };
    let channel = &*p.channel;
    let Some(ns) = env.cfg().namespaces.of_channel(channel) else {
        let reason = format!("channel {channel:?}: no such namespace is configured");
        return super::refuse(env, ctx, key, conn, client_addr, Status::BadRequest, &reason, &headers);
    };
    if let Err(d) = identity.may(Action::Publish, channel, ns) {
        ShardMetrics::inc(&env.metrics.forbidden_total);
        let reason = format!("channel {channel:?}: {}", d.reason());
        return super::refuse(env, ctx, key, conn, client_addr, Status::Forbidden, &reason, &headers);
    }
    ShardMetrics::inc(&env.metrics.commands_total);
    let home = env.home(channel);
    let born = crate::metrics::stamp(env.shared.started);
    let data = p.data.get().as_bytes();
    if home == env.id {
        let res = ctx.chans.publish_at(env, channel, data, born).map_err(|r| (r.code, r.reason));
        write_published(&mut ctx.out, channel, res, &headers, keep_alive);
        return;
    }
    let reply = Some(ReplyTo { shard: env.id as u16, conn: key, id: None });
    let msg = ShardMsg::Publish { channel: channel.into(), data: Bytes::copy_from_slice(data), reply, born };
    match ctx.chans.outbox.send(home, msg) {
        Sent::Queued => {
            ctx.sse.insert(key, Stream { publish: Some((cors, keep_alive, channel.into())), ..Stream::default() });
            conn.flags |= flag::HTTP_WAITING;
            timers::http_deadline(env, ctx, key, conn);
        }
        Sent::Refused(_) => {
            ShardMetrics::inc(&env.metrics.overloaded_total);
            let res = Err(("overloaded", "the channel's shard is overloaded, retry later"));
            write_published(&mut ctx.out, channel, res, &headers, keep_alive);
        }
    }
}

/// The response to a `POST /publish`: `{"channel","offset"}`, or the home's refusal (503).
fn write_published(
    out: &mut Vec<u8>,
    channel: &str,
    res: Result<u64, (&str, &str)>,
    headers: &[(&'static str, &str)],
    keep_alive: bool,
) {
    let mut h = headers.to_vec();
    h.push(("Cache-Control", "no-store"));
    match res {
        Ok(offset) => {
            let mut o = Vec::with_capacity(64 + channel.len());
            o.extend_from_slice(b"{\"channel\":");
            handshake::write_json_str(&mut o, channel);
            o.extend_from_slice(format!(",\"offset\":{offset}}}").as_bytes());
            handshake::write_response(out, Status::Ok, "application/json", &h, &o, keep_alive);
        }
        Err((code, reason)) => {
            super::api::write_error(out, Status::ServiceUnavailable, code, reason, keep_alive, &h[..h.len().min(2)])
        }
    }
}

/// Whether `conn` waits for the answer to a `POST /publish` ([`published`] takes it).
pub fn awaits_publish(ctx: &Ctx, key: ConnKey, conn: &Conn) -> bool {
    conn.phase == Phase::Handshake
        && conn.flags & flag::HTTP_WAITING != 0
        && ctx.sse.get(&key).is_some_and(|s| s.publish.is_some())
}

/// The home's answer to a waiting `POST /publish`: its `published` frame, or its refusal.
pub fn published(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, res: Result<&[u8], (&str, &str)>) {
    let Some(Stream { publish: Some((cors, keep_alive, channel)), .. }) = ctx.sse.remove(&key) else { return };
    conn.flags &= !flag::HTTP_WAITING;
    let res = res.map(|frame| offset_in(payload(frame)));
    write_published(&mut ctx.out, &channel, res, &as_refs(&cors), keep_alive);
    super::answered_later(env, ctx, key, conn, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::text_frame;

    #[test]
    fn events_from_frames() {
        let mut frame = Vec::new();
        text_frame(&mut frame, |o| {
            o.extend_from_slice(b"{\"type\":\"message\",\"channel\":\"c\",\"offset\":3,\"data\":{\n\"a\":1}}")
        });
        assert_eq!(
            &event_of(&frame)[..],
            b"data: {\"type\":\"message\",\"channel\":\"c\",\"offset\":3,\"data\":{ \"a\":1}}\n\n"
        );
        let mut gap = Vec::new();
        text_frame(&mut gap, |o| message::encode_gap(o, "c", 1, 2));
        assert!(event_of(&gap).starts_with(b"event: gap\ndata: {\"type\":\"gap\""));
        let big = "x".repeat(70_000);
        let mut frame = Vec::new();
        text_frame(&mut frame, |o| {
            o.extend_from_slice(format!("{{\"type\":\"message\",\"data\":\"{big}\"}}").as_bytes())
        });
        assert!(event_of(&frame).starts_with(b"data: {\"type\":\"message\""));
    }

    #[test]
    fn positions_round_trip() {
        let pos =
            vec![Pos { name: "a".into(), chan: 0, at: Some((0xabc, 17)) }, Pos { name: "b".into(), chan: 1, at: None }];
        let mut out = Vec::new();
        write_id(&mut out, &pos);
        assert_eq!(out, b"id: 0000000000000abc:17,-\n\n");
        let id = std::str::from_utf8(&out[4..out.len() - 2]).unwrap();
        assert_eq!(parse_positions(id, 2), Some(vec![Some((0xabc, 17)), None]));
        assert_eq!(parse_positions(id, 3), None);
        assert_eq!(parse_positions("abc:1", 1), None);
        assert_eq!(parse_positions("0000000000000abc:x", 1), None);
    }

    /// The flush pass writes an SSE subscriber the shared events of both its channels, then one `id:` line
    /// with both positions; a write with no messages carries no id line.
    #[test]
    fn flush_writes_events_then_positions() {
        use std::io::Read;
        use std::os::fd::OwnedFd;
        use std::os::unix::net::UnixStream;

        use slab::Slab;

        use crate::channel::delivery::flush_stream;
        use crate::channel::LocalChannel;
        use crate::config::SlowConsumerPolicy;
        use crate::conn::write::{Flushed, QueuePool};
        use crate::metrics::Recorder;

        let (server, mut client) = UnixStream::pair().expect("socketpair");
        server.set_nonblocking(true).expect("nonblocking");
        client.set_nonblocking(true).expect("nonblocking");
        let key = ConnKey { idx: 0, gen: 1 };
        let mut channels = Slab::new();
        let mut conn = Conn::new(OwnedFd::from(server), 1, 0);
        conn.phase = Phase::Sse;
        let mut stream = Stream::default();
        for (name, epoch) in [("a", 0xa_u64), ("b", 0xb)] {
            let idx = channels.insert(LocalChannel::new(Arc::from(name), SlowConsumerPolicy::Close));
            let slot = channels[idx].subscribe(key, 0);
            conn.subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
            stream.pos.push(Pos { name: name.into(), chan: idx as u32, at: Some((epoch, 0)) });
        }
        let msg = |ch: &str, off: u64| {
            frame_bytes(|o| {
                o.extend_from_slice(
                    format!(r#"{{"type":"message","channel":"{ch}","offset":{off},"data":1}}"#).as_bytes(),
                )
            })
        };
        channels[0].append(1, &msg("a", 1), 1);
        channels[0].append(2, &msg("a", 2), 1);
        channels[1].append(1, &msg("b", 1), 1);
        let (metrics, mut queues, mut rec) =
            (ShardMetrics::default(), QueuePool::default(), Recorder::new(std::time::Instant::now()));
        let flushed = flush_stream(&mut conn, &mut channels, &mut queues, &metrics, &mut rec, Some(&mut stream));
        assert_eq!(flushed, Flushed::Done);
        let mut got = String::new();
        let _ = client.read_to_string(&mut got);
        let want = concat!(
            "data: {\"type\":\"message\",\"channel\":\"a\",\"offset\":1,\"data\":1}\n\n",
            "data: {\"type\":\"message\",\"channel\":\"a\",\"offset\":2,\"data\":1}\n\n",
            "data: {\"type\":\"message\",\"channel\":\"b\",\"offset\":1,\"data\":1}\n\n",
            "id: 000000000000000a:2,000000000000000b:1\n\n",
        );
        assert_eq!(got, want);
        assert!(!stream.unsent, "the id line went out");
        assert!(channels[0].log[0].sse.get().is_some(), "the event is kept with the entry, for other SSE readers");
        // Nothing new: nothing written.
        assert_eq!(
            flush_stream(&mut conn, &mut channels, &mut queues, &metrics, &mut rec, Some(&mut stream)),
            Flushed::Done
        );
        let mut more = String::new();
        let _ = client.read_to_string(&mut more);
        assert_eq!(more, "");
    }

    #[test]
    fn query_values() {
        assert_eq!(decode("room%3A42+x%2"), "room:42 x%2");
        assert_eq!(decode("%41"), "A");
        assert_eq!(decode("a%4"), "a%4");
    }
}
