//! Delivery: writes channel logs to subscribers, one `sendmsg` per connection per pass.
//!
//! A publish only appends a shared frame to a channel log and marks the channel dirty. The flush pass then
//! walks the dirty channels' subscribers and writes, for each connection, its queued replies and every
//! unsent frame of every channel it is subscribed to, gathered into one iovec batch. Frames published in a
//! burst therefore reach a socket in one syscall, and nothing is allocated, copied or reference-counted per
//! delivery: iovecs point into the log.
//!
//! A pass is resumable: the shard loop gives it a slice of time per turn ([`flush_turn`]) and it carries on
//! from the same channel and subscriber in the next turn, so a pass over tens of thousands of subscribers
//! never holds up timers, accepts or the inbox for longer than its slice.
//!
//! Adaptive pacing, only when the shard is busy: when a pass took over 1 ms of the shard's time and the
//! shard was busy (not parked) for at least half of the last tick (50 ms), the next pass waits
//! `flush_pacing` times as long as the last one took (at most 10 ms), so more frames coalesce per write.
//! One write costs about the same whatever it carries, so this trades latency for CPU per delivery where
//! CPU is short (docs/benchmarks.md has the measured curve). The bound: pacing delays a message by at most
//! `min(flush_pacing x the last pass, 10 ms)`, and never on a shard that was idle half of the last tick
//! (there a pass runs in the turn after the publish).

use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use super::local::LocalChannel;
use crate::config::SlowConsumerPolicy;
use crate::conn::close::{self, Close};
use crate::conn::write::{self, Flushed, QueuePool};
use crate::conn::{flag, Conn, ConnKey, Conns};
use crate::metrics::{Recorder, ShardMetrics};
use crate::shard::uring::{SendRing, BATCH_CONNS};
use crate::shard::{Ctx, Env};
use crate::sys;

/// Passes longer than this count as saturation and trigger pacing.
const PACE_THRESHOLD: Duration = Duration::from_millis(1);
/// Longest pause between passes.
const PACE_MAX: Duration = Duration::from_millis(10);
/// Share of the last tick the shard must have been busy (not parked) for passes to be paced.
pub const PACE_BUSY: f64 = 0.5;
/// Most buffers gathered into one `sendmsg`.
const MAX_IOV: usize = 256;
/// Subscribers handled between two looks at the clock.
const CLOCK_EVERY: usize = 32;

/// Writes a connection's queue, then every unsent frame of its channels, in batches of `MAX_IOV` buffers.
/// A frame the socket took only part of moves (its unsent rest) to the front of the queue, so cursors
/// always point at whole frames and the stream stays frame-aligned whatever is queued next. Each message
/// frame handed to the socket records its publish-to-write latency in `rec` (one clock read per write).
pub fn flush_conn(
    conn: &mut Conn,
    channels: &mut Slab<LocalChannel>,
    queues: &mut QueuePool,
    metrics: &ShardMetrics,
    rec: &mut Recorder,
) -> Flushed {
    flush_stream(conn, channels, queues, metrics, rec, None)
}

/// Collects a connection's unsent bytes, at most `max` buffers, handing each to `push`: its queue first,
/// then every unsent log entry of its channels in subscription order (as Server-Sent Events when `is_sse`,
/// advancing `ahead` over them). Returns the bytes and the log entries gathered.
fn gather<'a>(
    conn: &'a Conn,
    channels: &'a Slab<LocalChannel>,
    max: usize,
    is_sse: bool,
    mut ahead: Option<&mut crate::http::sse::Ahead<'_>>,
    mut push: impl FnMut(&'a Bytes),
) -> (usize, usize) {
    let (mut n, mut total, mut entries) = (0, 0, 0);
    for b in conn.outq.iter().take(max) {
        push(b);
        total += b.len();
        n += 1;
    }
    'subs: for s in conn.subs.iter().filter(|s| s.is_active()) {
        let ch = &channels[s.chan as usize];
        let cursor = ch.subs[s.slot as usize].cursor;
        for e in ch.log.range((cursor - ch.base) as usize..) {
            if n == max {
                break 'subs;
            }
            let bytes = e.wire(is_sse);
            push(bytes);
            total += bytes.len();
            n += 1;
            entries += 1;
            if let Some(p) = ahead.as_mut().filter(|_| e.offset != 0) {
                p.advance(s.chan, e.offset);
            }
        }
    }
    (total, entries)
}

/// What a write of a gathered batch did, from [`account`].
struct Accounted {
    /// Log entries written whole (or started: a cut one's rest is queued).
    frames: u64,
    /// Bytes written past the queue and the log entries (an SSE `id:` line's share).
    left: usize,
    /// A log entry was cut and its rest queued.
    partial: bool,
}

/// Accounts for `written` bytes of a gather of `entries` log entries having gone out: the queue consumed,
/// cursors moved over every entry handed to the socket (each message's publish-to-write latency recorded),
/// the unsent rest of a cut entry queued (frame-aligned from there on), and the counters.
#[allow(clippy::too_many_arguments)]
fn account(
    conn: &mut Conn,
    channels: &mut Slab<LocalChannel>,
    queues: &mut QueuePool,
    metrics: &ShardMetrics,
    rec: &mut Recorder,
    written: usize,
    entries: usize,
    mut sse: Option<&mut crate::http::sse::Stream>,
) -> Accounted {
    let is_sse = sse.is_some();
    ShardMetrics::add(&metrics.bytes_out_total, written as u64);
    let mut left = write::consume_queue(conn, written, queues);
    let mut frames = 0u64;
    let mut now = 0;
    let mut partial = false;
    if left > 0 {
        'walk: for s in conn.subs.iter().filter(|s| s.is_active()) {
            let ch = &mut channels[s.chan as usize];
            let base = ch.base;
            let sub = &mut ch.subs[s.slot as usize];
            while left > 0 {
                if frames as usize == entries {
                    break 'walk;
                }
                let Some(e) = ch.log.get((sub.cursor - base) as usize) else { break };
                sub.cursor += 1;
                frames += 1;
                if e.born != 0 {
                    if now == 0 {
                        now = rec.stamp();
                    }
                    rec.latency.record_us(now.saturating_sub(e.born) / 1000);
                }
                if let Some(st) = sse.as_mut().filter(|_| e.offset != 0) {
                    st.delivered(s.chan, e.offset);
                }
                let bytes = e.wire(is_sse);
                if bytes.len() <= left {
                    left -= bytes.len();
                } else {
                    let rest = if is_sse {
                        e.sse.get().map_or_else(Bytes::new, |b| b.slice(left..))
                    } else {
                        e.frame.slice(left..)
                    };
                    conn.queued += rest.len() as u32;
                    queues.bytes += rest.len() as u64;
                    conn.outq.push_back(rest, queues);
                    conn.flags |= flag::HEAD_STARTED;
                    left = 0;
                    partial = true;
                }
            }
            if left == 0 {
                break;
            }
        }
    }
    ShardMetrics::add(&metrics.frames_out_total, frames);
    Accounted { frames, left, partial }
}

/// [`flush_conn`] for any subscriber: with `sse` (an `/sse` stream's positions), the log entries are
/// written as their Server-Sent Events ([`super::local::LogEntry::wire`], encoded once per entry for all
/// SSE subscribers) and each write that carries messages ends with an `id:` line naming the stream's
/// position in every channel (`crate::http::sse`), so the browser's `Last-Event-ID` resumes them all.
pub fn flush_stream(
    conn: &mut Conn,
    channels: &mut Slab<LocalChannel>,
    queues: &mut QueuePool,
    metrics: &ShardMetrics,
    rec: &mut Recorder,
    mut sse: Option<&mut crate::http::sse::Stream>,
) -> Flushed {
    let is_sse = sse.is_some();
    // One slot is kept for an SSE stream's `id:` line.
    let max_iov = if is_sse { MAX_IOV - 1 } else { MAX_IOV };
    loop {
        let mut id_line = Vec::new();
        // Log entries gathered: the walk after the write passes at most these (an `id:` line follows them).
        let (written, gathered, entries, full) = {
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            let mut ahead = sse.as_ref().map(|s| s.positions());
            let (mut total, entries) = gather(conn, channels, max_iov, is_sse, ahead.as_mut(), |b| {
                iov[n] = IoSlice::new(b);
                n += 1;
            });
            if let (Some(stream), Some(p)) = (sse.as_ref(), ahead) {
                if p.moved || stream.unsent {
                    p.write_id(&mut id_line);
                    iov[n] = IoSlice::new(&id_line);
                    total += id_line.len();
                    n += 1;
                }
            }
            if n == 0 {
                return Flushed::Done;
            }
            match sys::send_vectored(conn.fd(), &iov[..n]) {
                Ok(w) => (w, total, entries, n >= max_iov),
                Err(_) => return Flushed::Failed,
            }
        };
        let Accounted { frames, left, partial } =
            account(conn, channels, queues, metrics, rec, written, entries, sse.as_deref_mut());
        // The `id:` line goes out only behind every frame it counts: whole, or its rest queued.
        if let Some(st) = sse.as_mut().filter(|_| !id_line.is_empty()) {
            if !partial && frames as usize == entries && left > 0 {
                if left < id_line.len() {
                    let rest = Bytes::copy_from_slice(&id_line[left..]);
                    conn.queued += rest.len() as u32;
                    queues.bytes += rest.len() as u64;
                    conn.outq.push_back(rest, queues);
                    conn.flags |= flag::HEAD_STARTED;
                }
                st.unsent = false;
            }
        }
        if written < gathered {
            return Flushed::Blocked;
        }
        if !full {
            return Flushed::Done;
        }
    }
}

/// [`flush_stream`] of a connection of this shard: an `/sse` stream with its positions; a held `/poll`
/// takes its frames into its answer.
fn flush_of(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) -> Flushed {
    let sse = if conn.phase == crate::conn::Phase::Sse { ctx.sse.get_mut(&key) } else { None };
    if sse.as_ref().is_some_and(|s| s.is_poll()) {
        // A held long-poll takes the frames into its answer instead.
        crate::http::sse::poll_flush(env, ctx, key, conn);
        return Flushed::Done;
    }
    flush_stream(conn, &mut ctx.chans.locals, &mut ctx.queues, &env.metrics, &mut ctx.rec, sse)
}

/// Room to write: flushes a connection that waits for it (queue and channel frames).
pub fn on_writable(env: &Env, ctx: &mut Ctx, conns: &mut Conns, key: ConnKey) {
    let Some(conn) = conns.get_mut(key) else { return };
    if !conn.writer_active() {
        return;
    }
    match flush_of(env, ctx, key, conn) {
        Flushed::Blocked => {}
        Flushed::Done => {
            conn.flags &= !flag::WRITER;
            close::drained(conn);
        }
        Flushed::Failed => write::socket_failed(env, ctx, key, conn),
    }
}

/// Applies the namespace's slow-consumer policy to a subscriber whose socket is full, if its unsent bytes
/// (queue plus channel backlog) passed the bound.
fn check_lag(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, ch_idx: usize, slot: usize) {
    let bound = env.cfg().max_backlog_bytes as u64;
    let ch = &ctx.chans.locals[ch_idx];
    let cursor = ch.subs[slot].cursor;
    if ch.lag(cursor) + u64::from(conn.queued) <= bound {
        return;
    }
    match ch.policy {
        SlowConsumerPolicy::Close => close::close(env, ctx, key, conn, Close::SlowConsumer),
        SlowConsumerPolicy::DropOldest => {
            let (new_cursor, skipped) = ch.skip_to_fit(cursor, bound / 2);
            let name = ch.name.clone();
            ctx.chans.locals[ch_idx].subs[slot].cursor = new_cursor;
            if let Some((from, to)) = skipped {
                ShardMetrics::inc(&env.metrics.gaps_total);
                let mut gap = super::frame_bytes(|o| throng_protocol::message::encode_gap(o, &name, from, to));
                if conn.phase == crate::conn::Phase::Sse {
                    gap = crate::http::sse::event_of(&gap);
                }
                // The queue is written before the channel's frames: the marker lands right after what was
                // already sent, before the frames that follow the skipped ones.
                write::push(conn, gap, &mut ctx.queues);
                ShardMetrics::inc(&env.metrics.frames_out_total);
            }
        }
    }
}

/// The flush pass in progress, and the pacing between passes.
#[derive(Debug, Default)]
pub struct FlushState {
    /// Pass counter: a connection flushed in this pass is not flushed again in it.
    pub pass: u32,
    /// The dirty channels this pass covers, and how far it got.
    channels: Vec<usize>,
    pos: usize,
    /// The current channel's subscribers when the pass reached it, and how far it got.
    subs: Vec<(ConnKey, usize)>,
    sub_pos: usize,
    /// A pass is under way.
    active: bool,
    /// Time spent on this pass so far.
    spent: Duration,
    /// No new pass before this (pacing).
    not_before: Option<Instant>,
    /// The io_uring driver's batched writes (`None` on epoll).
    pub batch: Option<Batch>,
    /// Share of the last tick the shard was busy (not parked), set by the loop once per tick: passes are
    /// paced only from [`PACE_BUSY`].
    pub busy: f64,
}

/// WebSocket subscribers gathered by the flush pass and not written yet: their writes go to the kernel
/// together ([`SendRing`]: one `io_uring_enter` for up to [`crate::shard::uring::BATCH_CONNS`]
/// connections), then each is accounted for exactly as after its own `sendmsg` ([`account`]).
#[derive(Debug)]
pub struct Batch {
    ring: SendRing,
    /// The connections in the batch, in the ring's order.
    conns: Vec<Batched>,
    /// Channels whose trim waits for the batch (their subscribers' cursors move when it has been sent).
    trims: Vec<usize>,
}

/// One connection's write in a [`Batch`].
#[derive(Clone, Copy, Debug)]
struct Batched {
    key: ConnKey,
    /// The subscription the pass reached it through (channel, slot): for the slow-consumer check.
    ch_idx: usize,
    slot: usize,
    /// Log entries and bytes gathered.
    entries: usize,
    gathered: usize,
    /// The gather stopped at `MAX_IOV` buffers: more may be unsent.
    full: bool,
}

impl Batch {
    /// The batch and its ring; writes with a buffer of `zc_threshold` bytes or more go zero-copy (0: none).
    pub fn new(zc_threshold: usize) -> std::io::Result<Self> {
        Ok(Self { ring: SendRing::new(zc_threshold)?, conns: Vec::with_capacity(BATCH_CONNS), trims: Vec::new() })
    }
}

/// Adds a WebSocket subscriber the pass reached (through subscription `slot` of channel `ch_idx`) to the
/// batch, when the shard has one and the connection is due a write in this pass. False otherwise: the pass
/// then handles it as without a batch.
fn batch_add(env: &Env, ctx: &mut Ctx, conns: &mut Conns, key: ConnKey, ch_idx: usize, slot: usize) -> bool {
    let Some(batch) = ctx.flush.batch.as_ref().filter(|b| !b.ring.broken) else { return false };
    let Some(conn) = conns.get(key) else { return false };
    if conn.flush_mark == ctx.flush.pass || conn.writer_active() || conn.phase == crate::conn::Phase::Sse {
        return false;
    }
    // Room for the largest gather (a connection's writes are a few buffers: batches fill by connections).
    if !batch.ring.has_room(MAX_IOV) {
        send_batch(env, ctx, conns);
    }
    let (Some(conn), Some(batch)) = (conns.get_mut(key), ctx.flush.batch.as_mut()) else { return false };
    conn.flush_mark = ctx.flush.pass;
    let from = batch.ring.iov_len();
    let ring = &mut batch.ring;
    let (total, entries) = gather(conn, &ctx.chans.locals, MAX_IOV, false, None, |b| ring.push(b));
    let bufs = ring.iov_len() - from;
    if bufs == 0 {
        return true;
    }
    ring.end(conn.fd(), from);
    batch.conns.push(Batched { key, ch_idx, slot, entries, gathered: total, full: bufs >= MAX_IOV });
    true
}

/// Sends the batch and accounts for each connection's write: cursors and queue as after a `sendmsg`, a full
/// socket waits for its output edge (and meets the slow-consumer bound), a failed one is closed; then the
/// channels whose trim waited.
fn send_batch(env: &Env, ctx: &mut Ctx, conns: &mut Conns) {
    let Some(batch) = ctx.flush.batch.as_mut() else { return };
    let mut results = [0i32; BATCH_CONNS];
    let n = batch.ring.len();
    if n > 0 {
        // SAFETY: the buffers are the batched connections' queued `Bytes` and their channels' log entries.
        // Between the gathering and this send nothing changes or drops them: connections are removed only
        // between the loop's steps, their queues change only when accounted below, and logs are appended to
        // only outside the flush step and trimmed only after this (`trims`).
        results[..n].copy_from_slice(unsafe { batch.ring.send() });
        ShardMetrics::inc(&env.metrics.uring_send_batches_total);
        ShardMetrics::add(&env.metrics.uring_batched_writes_total, n as u64);
        ShardMetrics::set(&env.metrics.uring_zerocopy_sends_total, batch.ring.zc_sent);
        ShardMetrics::set(&env.metrics.uring_zerocopy_copied_total, batch.ring.zc_copied);
    }
    let mut list = std::mem::take(&mut batch.conns);
    for (&res, b) in results.iter().zip(&list) {
        let Some(conn) = conns.get_mut(b.key) else { continue };
        let flushed = if res == -libc::EAGAIN {
            Flushed::Blocked
        } else if res < 0 {
            Flushed::Failed
        } else {
            let w = res as usize;
            account(conn, &mut ctx.chans.locals, &mut ctx.queues, &env.metrics, &mut ctx.rec, w, b.entries, None);
            if w < b.gathered {
                Flushed::Blocked
            } else if b.full {
                // More than one write's worth: the rest at once, as `flush_stream` would have.
                flush_of(env, ctx, b.key, conn)
            } else {
                Flushed::Done
            }
        };
        match flushed {
            Flushed::Done => {}
            Flushed::Blocked => write::wait_writable(env, conn),
            Flushed::Failed => write::socket_failed(env, ctx, b.key, conn),
        }
        if conn.writer_active() {
            check_lag(env, ctx, b.key, conn, b.ch_idx, b.slot);
        }
    }
    list.clear();
    let Some(batch) = ctx.flush.batch.as_mut() else { return };
    batch.conns = list;
    for &ch_idx in &batch.trims {
        if let Some(ch) = ctx.chans.locals.get_mut(ch_idx) {
            ch.trim();
        }
    }
    batch.trims.clear();
}

impl FlushState {
    /// A flush state whose passes write through `batch` (the io_uring driver), or each connection with its
    /// own `sendmsg` (`None`).
    pub fn new(batch: Option<Batch>) -> Self {
        Self { batch, ..Self::default() }
    }

    /// Whether the flush step has work now: a pass to continue, or dirty channels and no pacing pause.
    pub fn has_work(&self, dirty: bool, now: Instant) -> bool {
        self.active || (dirty && self.not_before.is_none_or(|t| now >= t))
    }

    /// When a paced pass may start, if one waits.
    pub fn paced_until(&self, dirty: bool) -> Option<Instant> {
        (!self.active && dirty).then_some(self.not_before).flatten()
    }
}

/// Runs the flush pass (starting one if none is under way) until it ends or `until` passes. Returns the
/// number of connections written to.
pub fn flush_turn(env: &Env, ctx: &mut Ctx, conns: &mut Conns, until: Instant) -> usize {
    let t0 = Instant::now();
    if !ctx.flush.active {
        if ctx.chans.dirty.is_empty() {
            return 0;
        }
        let f = &mut ctx.flush;
        f.pass = f.pass.wrapping_add(1);
        f.channels.clear();
        std::mem::swap(&mut f.channels, &mut ctx.chans.dirty);
        (f.pos, f.sub_pos, f.spent, f.active) = (0, 0, Duration::ZERO, true);
        f.subs.clear();
    }
    let pass = ctx.flush.pass;
    let mut written = 0;
    let mut since_clock = 0;
    while ctx.flush.pos < ctx.flush.channels.len() {
        let ch_idx = ctx.flush.channels[ctx.flush.pos];
        if ctx.flush.sub_pos == 0 {
            // Starting this channel: take its subscribers as they are now. Later joiners are positioned at
            // the log's end, and anything appended from here on marks the channel dirty for the next pass.
            ctx.flush.subs.clear();
            if let Some(ch) = ctx.chans.locals.get_mut(ch_idx) {
                ch.dirty = false;
                ctx.flush.subs.extend(ch.subs.iter().map(|(slot, s)| (s.conn, slot)));
            }
        }
        while ctx.flush.sub_pos < ctx.flush.subs.len() {
            let (key, slot) = ctx.flush.subs[ctx.flush.sub_pos];
            ctx.flush.sub_pos += 1;
            since_clock += 1;
            if since_clock == CLOCK_EVERY {
                since_clock = 0;
                if Instant::now() >= until {
                    ctx.flush.sub_pos -= 1;
                    send_batch(env, ctx, conns);
                    ctx.flush.spent += t0.elapsed();
                    return written;
                }
            }
            // The slot must still be this connection's subscription (it may have left, and the slot been
            // reused by another subscriber, since the pass took its list).
            if ctx.chans.locals.get(ch_idx).is_none_or(|c| c.sub_of(slot, key).is_none()) {
                continue;
            }
            if batch_add(env, ctx, conns, key, ch_idx, slot) {
                written += 1;
                continue;
            }
            let Some(conn) = conns.get_mut(key) else { continue };
            // Write first; only what the socket would not take counts against the slow-consumer bound.
            if conn.flush_mark != pass && !conn.writer_active() {
                conn.flush_mark = pass;
                written += 1;
                match flush_of(env, ctx, key, conn) {
                    Flushed::Done => continue,
                    Flushed::Blocked => write::wait_writable(env, conn),
                    Flushed::Failed => {
                        write::socket_failed(env, ctx, key, conn);
                        continue;
                    }
                }
            }
            if conn.writer_active() {
                check_lag(env, ctx, key, conn, ch_idx, slot);
            }
        }
        match ctx.flush.batch.as_mut().filter(|b| !b.ring.is_empty()) {
            // Its batched subscribers' cursors move once the batch is sent: trimmed then.
            Some(b) => b.trims.push(ch_idx),
            None => {
                if let Some(ch) = ctx.chans.locals.get_mut(ch_idx) {
                    ch.trim();
                }
            }
        }
        ctx.flush.pos += 1;
        ctx.flush.sub_pos = 0;
    }
    send_batch(env, ctx, conns);
    // The pass is over.
    let f = &mut ctx.flush;
    f.active = false;
    f.spent += t0.elapsed();
    ctx.rec.flush.record(f.spent);
    let pace = env.cfg().flush_pacing;
    f.not_before = (f.spent > PACE_THRESHOLD && pace > 0.0 && f.busy >= PACE_BUSY)
        .then(|| Instant::now() + f.spent.mul_f64(pace).min(PACE_MAX));
    ctx.chans.outbox.drain();
    written
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::conn::{ConnSub, Phase};

    /// A `gap` marker for deliveries lost between shards reaches a subscriber after the frames logged
    /// before it and before the ones logged after it. (It used to go into the connection's queue, which
    /// is written before the channel's frames: ahead of messages older than the loss.)
    #[test]
    fn gap_marker_arrives_in_log_order() {
        let (server, mut client) = UnixStream::pair().expect("socketpair");
        server.set_nonblocking(true).expect("nonblocking");
        let mut channels = Slab::new();
        let idx = channels.insert(LocalChannel::new(Arc::from("c"), SlowConsumerPolicy::Close));
        let key = ConnKey { idx: 0, gen: 1 };
        let slot = channels[idx].subscribe(key, 0);
        let mut conn = Conn::new(OwnedFd::from(server), 1, 0);
        conn.phase = Phase::V1;
        conn.subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
        let ch = &mut channels[idx];
        ch.append(1, &Bytes::from_static(b"[one]"), 1);
        ch.append(2, &Bytes::from_static(b"[two]"), 1);
        ch.append_marker(Bytes::from_static(b"[gap 3-5]"));
        ch.append(6, &Bytes::from_static(b"[six]"), 1);
        let metrics = ShardMetrics::default();
        let mut queues = QueuePool::default();
        let mut rec = Recorder::new(std::time::Instant::now());
        assert_eq!(flush_conn(&mut conn, &mut channels, &mut queues, &metrics, &mut rec), Flushed::Done);
        let mut got = vec![0u8; 24];
        client.read_exact(&mut got).expect("read");
        assert_eq!(got, b"[one][two][gap 3-5][six]");
        assert_eq!(metrics.frames_out_total.load(std::sync::atomic::Ordering::Relaxed), 4);
        assert_eq!(rec.latency.count(), 3, "one latency per message, none for the marker");
    }
}
