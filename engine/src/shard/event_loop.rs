//! The shard loop: one task that owns the shard and runs it in turns. Each turn gives every kind of work
//! its share, in this order, each with a bound:
//!
//! | step | what | bound per turn |
//! |---|---|---|
//! | 1. timers | advance the shard clock; fire due connection timers (handshake, heartbeat, message deadline, close grace); once per tick: ring retries, history ageing, the drain's closing phase | [`TIMER_BUDGET`] timers or [`STEP_SLICE`] |
//! | 2. inbox | messages from other shards (deliveries, requests for channels homed here, answers) | [`INBOX_BUDGET`] messages or [`STEP_SLICE`] |
//! | 3. accept | new connections (epoll; on io_uring they come as ring completions in step 4) | [`ACCEPT_BUDGET`] connections |
//! | 4. connections | readiness events: reads (each at most [`READS_PER_EVENT`] reads of 64 KiB), writes; on io_uring then the ring's completions (input; accepted connections once the completions taken before them are handled, else first in the next turn) | [`EVENT_BUDGET`] events or [`STEP_SLICE`]; `RING_BUDGET` completions |
//! | 5. flush | the broadcast flush pass, resumed where the last turn left it (unless paced) | [`FLUSH_SLICE`] |
//!
//! Work left over by a step (a budget used up, a connection stopped at its read bound, more events in the
//! set) waits for the same step in the next turn, so no kind of work can starve another: a timer fires at
//! most one tick plus one turn late whatever the load, accepting continues at its share, and `/health`
//! answers. A turn lasts at most about `3 × STEP_SLICE + FLUSH_SLICE` plus one item's overrun (one
//! connection's read turn, one message's decode: both linear in bytes that are bounded).
//!
//! When a turn finds nothing to do, the shard parks: it waits through the runtime for its epoll set
//! (connections, listener, and the doorbell other shards ring when they send while it is parked), at most
//! until the next tick, a paced flush, or the end of an accept pause. The loop never relies on the runtime
//! to schedule anything else: monoio runs its timers and cross-thread wake-ups only when it parks, and the
//! loop never parks while there is work.
//!
//! [`READS_PER_EVENT`]: crate::conn::read::READS_PER_EVENT
//! [`ACCEPT_BUDGET`]: super::accept::ACCEPT_BUDGET

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use throng_protocol::conn::MessageKind;
use throng_protocol::frame::{close as code, OpCode};
use throng_protocol::handshake::Request;

use super::accept;
use super::poller::{Ready, ADMIN_LISTENER, DOORBELL, LISTENER, RING};
use super::uring::{Accepted, Completion};
use super::{Ctx, Env, Shard, TICK};
use crate::channel::delivery;
use crate::conn::close::{self, Close};
use crate::conn::read::{self, Flow, Sink};
use crate::conn::{timers, Conn, ConnKey, Conns, Phase};
use crate::metrics::{Observed, ShardMetrics, LAG_DEGRADED};
use crate::sys;

/// Timers fired per turn at most.
pub const TIMER_BUDGET: usize = 1024;
/// Messages from other shards handled per turn at most.
pub const INBOX_BUDGET: usize = 4096;
/// Readiness events handled per turn at most (also the batch taken from the epoll set at once).
pub const EVENT_BUDGET: usize = 256;
/// Time one of the timer, inbox and connection steps may take per turn.
pub const STEP_SLICE: Duration = Duration::from_millis(2);
/// Time the flush pass may take per turn.
pub const FLUSH_SLICE: Duration = Duration::from_millis(4);

/// Where connections' input goes: HTTP requests to [`crate::http`], `/ws` messages to [`crate::v1`], `/echo`
/// messages back to their sender.
struct App;

impl Sink for App {
    fn request(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>, body: &[u8]) {
        crate::http::on_request(env, ctx, key, conn, req, body);
    }

    fn takes_body(&mut self, env: &Env, conn: &Conn, req: &Request<'_>) -> bool {
        crate::http::takes_body(env, conn, req)
    }

    fn message(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, kind: MessageKind, data: &[u8]) {
        match (conn.phase, kind) {
            (Phase::V1, MessageKind::Text) => crate::v1::on_command(env, ctx, key, conn, data),
            (Phase::V1, MessageKind::Binary) => crate::v1::on_binary(env, ctx, key, conn),
            (Phase::Echo, _) => {
                let op = if kind == MessageKind::Text { OpCode::Text } else { OpCode::Binary };
                // Counted in frames_out_total when written (`write::send_out`).
                conn.ws.encode_frame(&mut ctx.out, true, op, data);
            }
            _ => {}
        }
    }

    fn rate_limited(&mut self, env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, data: &[u8]) {
        crate::v1::on_rate_limited(env, ctx, key, conn, data);
    }
}

/// Loop state that lives only across turns.
struct Turns {
    start: Instant,
    /// Readiness events taken from the set and not handled yet (new connections first).
    ready: VecDeque<(ConnKey, Ready)>,
    /// Connections stopped at their read bound: resumed after the next batch taken from the set, so they
    /// never keep the set from being looked at.
    again: Vec<ConnKey>,
    events: Vec<libc::epoll_event>,
    /// The last look at the set filled the batch: more may be waiting there.
    set_full: bool,
    /// Completions taken out of the ring and not handled yet, oldest first (the accepts' apart).
    ring_backlog: VecDeque<Completion>,
    /// The listeners' completions taken out of the ring after the backlog's: handled once everything before
    /// them is, or at the start of the next ring step, whichever comes first (see [`ring_step`]).
    ring_accepts: Vec<Accepted>,
    /// The timer step stopped at its budget with timers still due.
    timers_left: bool,
    /// The tick housekeeping last ran at.
    housekept: u64,
    /// When the drain must end, once its closing phase has begun (after the drain delay).
    drain_deadline: Option<Instant>,
    /// Time parked since `window`: once per tick the share of it the shard was busy goes to the flush
    /// pacing (`FlushState::busy`).
    parked: Duration,
    window: Instant,
}

/// Runs the shard until it has drained.
pub async fn run(mut sh: Shard) {
    let mut t = Turns {
        start: Instant::now(),
        ready: VecDeque::with_capacity(2 * EVENT_BUDGET),
        again: Vec::new(),
        events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENT_BUDGET],
        set_full: false,
        ring_backlog: VecDeque::new(),
        ring_accepts: Vec::new(),
        timers_left: false,
        housekept: u64::MAX,
        drain_deadline: None,
        parked: Duration::ZERO,
        window: Instant::now(),
    };
    let inboxes = sh.env.shared.inboxes.clone();
    let inbox = &inboxes[sh.env.id];
    loop {
        ShardMetrics::inc(&sh.env.metrics.turns_total);
        let now = Instant::now();
        sh.env.now = (now.duration_since(t.start).as_millis() / TICK.as_millis()) as u64;

        // 1. Timers, housekeeping, drain.
        timer_step(&mut sh, &mut t, now);
        if let Some(deadline) = t.drain_deadline {
            if sh.conns.is_empty() || now >= deadline {
                if !sh.conns.is_empty() {
                    tracing::warn!(shard = sh.env.id, left = sh.conns.len(), "drain timeout");
                }
                return;
            }
        }

        // 2. Inbox.
        let until = Instant::now() + STEP_SLICE;
        let mut inbox_left = false;
        for n in 0..INBOX_BUDGET {
            if n % 64 == 63 && Instant::now() >= until {
                inbox_left = true;
                break;
            }
            let Some(msg) = inbox.try_recv() else { break };
            crate::v1::inbox::handle(&sh.env, &mut sh.ctx, &mut sh.conns, msg);
        }
        sh.ctx.chans.outbox.drain();

        // 3. Accept.
        if sh.acceptor.has_work(Instant::now()) {
            let Shard { env, ctx, conns, poller, acceptor, scratch, .. } = &mut sh;
            accept::accept_turn(env, ctx, conns, poller, acceptor, scratch, &mut t.ready);
        }
        if let Shard { env, ctx, conns, poller, admin: Some(admin), scratch, .. } = &mut sh {
            if admin.has_work(Instant::now()) {
                accept::accept_turn(env, ctx, conns, poller, admin, scratch, &mut t.ready);
            }
        }

        // 4. Connections: readiness events, then the io_uring ring's completions.
        event_step(&mut sh, &mut t);
        ring_step(&mut sh, &mut t);

        // 5. Flush.
        let now = Instant::now();
        let dirty = !sh.ctx.chans.dirty.is_empty();
        if sh.ctx.flush.has_work(dirty, now) {
            delivery::flush_turn(&sh.env, &mut sh.ctx, &mut sh.conns, now + FLUSH_SLICE);
        }

        // 6. Park when nothing is left.
        ShardMetrics::set(&sh.env.metrics.unfinished_bytes, sh.ctx.unfinished as u64);
        let now = Instant::now();
        let dirty = !sh.ctx.chans.dirty.is_empty();
        let busy = !t.ready.is_empty()
            || !t.ring_backlog.is_empty()
            || !t.ring_accepts.is_empty()
            || !t.again.is_empty()
            || t.set_full
            || t.timers_left
            || inbox_left
            || !inbox.rx.is_empty()
            || !sh.ctx.resume.is_empty()
            || sh.acceptor.has_work(now)
            || sh.admin.as_ref().is_some_and(|a| a.has_work(now))
            || sh.ctx.flush.has_work(dirty, now);
        if busy {
            ShardMetrics::inc(&sh.env.metrics.busy_turns_total);
            continue;
        }
        let next_tick = t.start + TICK * (sh.env.now as u32 + 1);
        let wake = [Some(next_tick), sh.ctx.flush.paced_until(dirty), sh.acceptor.paused_until]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_tick);
        inbox.parked.store(true, Ordering::SeqCst);
        if !inbox.rx.is_empty() {
            inbox.parked.store(false, Ordering::Relaxed);
            continue;
        }
        sh.poller.wait(wake.saturating_duration_since(now)).await;
        t.parked += now.elapsed();
        inbox.parked.store(false, Ordering::Relaxed);
    }
}

/// Step 1: the clock's timers, once-per-tick housekeeping, and the drain.
fn timer_step(sh: &mut Shard, t: &mut Turns, now: Instant) {
    let env = &sh.env;
    let until = now + STEP_SLICE;
    let mut fired = 0;
    t.timers_left = false;
    loop {
        if fired == TIMER_BUDGET || (fired % 64 == 63 && Instant::now() >= until) {
            // Stopped by a budget, not by an empty wheel: more may be due.
            t.timers_left = true;
            break;
        }
        let Some((tk, key)) = sh.ctx.wheel.poll(env.now) else { break };
        fired += 1;
        // A stale timer (its connection gone, or the key re-armed since) is skipped.
        if sh.conns.get(key).is_some_and(|c| c.timer == Some(tk)) {
            timers::fire(env, &mut sh.ctx, &mut sh.conns, key);
        }
    }
    if t.housekept == env.now {
        return;
    }
    if t.housekept != u64::MAX {
        // Loop lag: how long after it was due the first tick not yet run is run (its timers fire this late).
        let due = t.start + TICK * (t.housekept as u32 + 1);
        let lag = now.saturating_duration_since(due);
        sh.ctx.rec.lag.record(lag);
        if lag > LAG_DEGRADED {
            Observed::mark(&env.metrics.obs.lag_at, env.shared.started);
            ShardMetrics::set(&env.metrics.obs.lag_us, lag.as_micros() as u64);
        }
    }
    t.housekept = env.now;
    let elapsed = now.saturating_duration_since(t.window);
    if !elapsed.is_zero() {
        sh.ctx.flush.busy = 1.0 - (t.parked.as_secs_f64() / elapsed.as_secs_f64()).min(1.0);
    }
    (t.parked, t.window) = (Duration::ZERO, now);
    sh.ctx.chans.housekeeping(env);
    observe_tick(env, &mut sh.ctx);
    // The drain's first phase (`draining`: /health 503, upgrades refused) needs nothing from the loop; its
    // closing phase starts once the main thread has waited out the drain delay.
    if env.shared.closing.load(Ordering::Relaxed) && t.drain_deadline.is_none() {
        t.drain_deadline = Some(now + env.cfg().drain_timeout);
        start_drain(sh);
    }
}

/// Once per tick: the histograms recorded since the last tick go to the snapshots scrapes read; gauges.
fn observe_tick(env: &Env, ctx: &mut Ctx) {
    let m = &env.metrics;
    ctx.rec.publish(m);
    ShardMetrics::set(&m.queued_bytes, ctx.queues.bytes);
    let dropped = env.shared.inboxes[env.id].dropped.load(Ordering::Relaxed);
    if dropped != m.ring_dropped_total.load(Ordering::Relaxed) {
        ShardMetrics::set(&m.ring_dropped_total, dropped);
        Observed::mark(&m.obs.ring_drop_at, env.shared.started);
    }
}

/// The drain's closing phase: stops accepting; every upgraded connection gets a 1001 close, the others
/// are shut down.
fn start_drain(sh: &mut Shard) {
    sh.acceptor.close();
    if let Some(admin) = &mut sh.admin {
        admin.close();
    }
    if let Some(ring) = &mut sh.ring {
        // The multishot accepts hold the listeners open until they end.
        ring.cancel_accept(false);
        ring.cancel_accept(true);
    }
    for key in sh.conns.keys() {
        let Some(conn) = sh.conns.get_mut(key) else { continue };
        let how = match conn.phase {
            Phase::Echo | Phase::V1 | Phase::Sse => Close::Ws(code::GOING_AWAY, "server shutting down"),
            Phase::Handshake => Close::Abort,
            Phase::Closing | Phase::Draining | Phase::Aborted => continue,
        };
        close::close(&sh.env, &mut sh.ctx, key, conn, how);
    }
}

/// Step 4: readiness events, refilled from the epoll set once the previous batch is handled.
fn event_step(sh: &mut Shard, t: &mut Turns) {
    if t.ready.is_empty() {
        let n = sh.poller.take(&mut t.events);
        t.set_full = n == t.events.len();
        for ev in &t.events[..n] {
            let (bits, data) = (ev.events, ev.u64);
            match data {
                LISTENER => sh.acceptor.ready = true,
                ADMIN_LISTENER => {
                    if let Some(admin) = &mut sh.admin {
                        admin.ready = true;
                    }
                }
                DOORBELL => sys::eventfd_clear(sh.env.shared.inboxes[sh.env.id].doorbell.as_fd()),
                // Completions wait in the ring: the ring step reaps them (every turn).
                RING => {}
                _ => t.ready.push_back((ConnKey::from_u64(data), Ready::from_bits(bits))),
            }
        }
        t.ready.extend(t.again.drain(..).map(|key| (key, Ready { read: true, write: false })));
    } else {
        t.set_full = false;
    }
    let until = Instant::now() + STEP_SLICE;
    let mut app = App;
    // HTTP connections whose waiting request was answered from the inbox: read on (at most one per
    // pending API request answered this turn).
    while let Some(key) = sh.ctx.resume.pop() {
        let Shard { env, ctx, conns, scratch, acceptor, .. } = &mut *sh;
        match read::resume(env, ctx, conns, scratch, key, &mut app) {
            Flow::Continue => {}
            Flow::More => t.again.push(key),
            Flow::End => remove(env, ctx, conns, acceptor, key),
        }
    }
    for n in 0..EVENT_BUDGET {
        if n % 16 == 15 && Instant::now() >= until {
            break;
        }
        let Some((key, ready)) = t.ready.pop_front() else { break };
        let Shard { env, ctx, conns, scratch, acceptor, .. } = &mut *sh;
        if ready.write {
            delivery::on_writable(env, ctx, conns, key);
        }
        // With the ring, input (and the peer's EOF or a reset) comes as its completions, never from here.
        if ready.read && !env.ring_reads {
            match read::on_readable(env, ctx, conns, scratch, key, &mut app) {
                Flow::Continue => {}
                Flow::More => t.again.push(key),
                Flow::End => remove(env, ctx, conns, acceptor, key),
            }
        }
    }
}

/// Removes a finished connection; its descriptor is free again (an accept paused for want of one resumes).
fn remove(env: &Env, ctx: &mut Ctx, conns: &mut Conns, acceptor: &mut accept::Acceptor, key: ConnKey) {
    if close::remove(env, ctx, conns, key) {
        acceptor.fd_released();
    }
}

/// Completions the ring step handles per turn at most.
const RING_BUDGET: usize = 4 * EVENT_BUDGET;

/// Step 4, io_uring: the ring's completions: input handed to the read path in the buffer the kernel filled
/// (which goes back to the ring at once; EOF and errors end the connection), and the listeners' multishot
/// accepts' connections (the accept step's work on this driver; armed again here after they end, unless
/// paused for want of descriptors or closed by the drain). Then the receives to arm again and the cancels of
/// removed connections, submitted together.
///
/// Order, as on the epoll driver: every completion is taken out of the ring at once (the kernel's deferred
/// receive work for all connections runs in that one `io_uring_enter`) into `ring_backlog`, handled oldest
/// first within the step's budget; the listeners' completions are set apart and handled once everything taken
/// before them is (a connection closed by its client before it asked `/stats` is counted out first), or at
/// the start of the next ring step, ahead of what is left of the backlog. So a saturated shard still accepts
/// (and answers `/health`) once per turn, not after the whole backlog, as the epoll driver's accept step does.
fn ring_step(sh: &mut Shard, t: &mut Turns) {
    let Shard { env, ctx, conns, scratch, acceptor, admin, poller, ring: Some(ring), .. } = sh else { return };
    let now = Instant::now();
    if let Some(l) = acceptor.to_arm(now) {
        ring.arm_accept(l, false);
    }
    if let Some(l) = admin.as_mut().and_then(|a| a.to_arm(now)) {
        ring.arm_accept(l, true);
    }
    // The connections accepted in an earlier step, behind a backlog then: their turn now.
    for c in t.ring_accepts.drain(..) {
        ring_accept(env, ctx, conns, scratch, poller, ring, acceptor, admin.as_mut(), c);
    }
    // Receives armed by the accept step go in, and what arrived since the last step is posted.
    ring.submit();
    while let Some(c) = ring.reap() {
        match c {
            Completion::Accept(a) => t.ring_accepts.push(a),
            Completion::Cancelled => {}
            _ => t.ring_backlog.push_back(c),
        }
    }
    let until = Instant::now() + STEP_SLICE;
    let mut app = App;
    for n in 0..RING_BUDGET {
        if n % 16 == 15 && Instant::now() >= until {
            break;
        }
        let Some(c) = t.ring_backlog.pop_front() else { break };
        let end = match c {
            Completion::Data { key, bid, len, more } => {
                read::on_data(env, ctx, conns, scratch, key, ring.buffer(bid, len), &mut app);
                ring.give_back(bid);
                if !more && conns.get(key).is_some() {
                    ring.rearm_later(key);
                }
                None
            }
            Completion::Rearm(key, e) => {
                if e == -libc::ENOBUFS {
                    ShardMetrics::inc(&env.metrics.uring_buffers_empty_total);
                }
                if conns.get(key).is_some() {
                    ring.rearm_later(key);
                }
                None
            }
            Completion::Eof(key) => Some(key),
            Completion::Failed(key, e) => {
                if e != -libc::ECANCELED && e != -libc::ECONNRESET && e != -libc::EPIPE {
                    ShardMetrics::inc(&env.metrics.io_errors_total);
                }
                Some(key)
            }
            // Set apart when reaped: never in the backlog.
            Completion::Cancelled | Completion::Accept(_) => None,
        };
        if let Some(key) = end {
            remove(env, ctx, conns, acceptor, key);
        }
    }
    if t.ring_backlog.is_empty() {
        for c in t.ring_accepts.drain(..) {
            ring_accept(env, ctx, conns, scratch, poller, ring, acceptor, admin.as_mut(), c);
        }
    }
    ring.rearm_noted(|key| conns.get(key).map(|c| c.fd().as_raw_fd()));
    for key in ctx.ring_cancels.drain(..) {
        ring.cancel(key);
    }
    ring.submit();
}

/// A completion of the (admin) listener's multishot accept: the new connection is registered and read at once
/// (its request is usually there already, and the epoll driver reads a new connection first too), then the
/// ring takes over its socket; out of descriptors, accepting pauses. An accept that ended is armed again by
/// a later ring step.
#[allow(clippy::too_many_arguments)]
fn ring_accept(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    scratch: &mut [u8],
    poller: &super::poller::Poller,
    ring: &mut super::uring::Ring,
    acceptor: &mut accept::Acceptor,
    admin: Option<&mut accept::Acceptor>,
    Accepted { admin: is_admin, res, more }: Accepted,
) {
    let Some(acc) = (if is_admin { admin } else { Some(&mut *acceptor) }) else { return };
    if !more {
        acc.armed = false;
    }
    if [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&-res) {
        accept::out_of_fds(env, acc, &std::io::Error::from_raw_os_error(-res));
        return;
    }
    if res < 0 {
        if res != -libc::ECANCELED && res != -libc::EINVAL {
            ShardMetrics::inc(&env.metrics.io_errors_total);
        }
        return;
    }
    // SAFETY: a completed accept's result is a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(res) };
    let Some(key) = accept::take(env, ctx, conns, poller, acc, scratch, fd) else { return };
    match read::on_readable(env, ctx, conns, scratch, key, &mut App) {
        Flow::End => remove(env, ctx, conns, acceptor, key),
        Flow::Continue | Flow::More => {
            if let Some(conn) = conns.get(key) {
                ring.arm_recv(conn.fd(), key);
            }
        }
    }
}
