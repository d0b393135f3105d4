//! Taking connections from the listener: at most [`ACCEPT_BUDGET`] per turn, so accepting goes on at a fair
//! share under any load (and a flood of connects cannot starve the connections already held).
//!
//! - Over `max_connections` (counted over all shards) a new connection is refused at once: a canned `503`
//!   is written to it and it is closed, before any of its request is parsed. What it already sent is read
//!   and discarded first, so the close is a FIN, not a reset that could destroy the 503 on its way.
//! - Out of file descriptors (`EMFILE`, `ENFILE`), accepting pauses for [`OUT_OF_FDS_PAUSE`] (or until a
//!   connection closes) instead of spinning on a listener that stays readable; the kernel's listen queue
//!   holds the newcomers meanwhile. The pause is counted and logged (at most every 5 s).
//! - With the io_uring driver the listener is not in the epoll set: a multishot accept on the shard's ring
//!   takes its connections (no `accept4` per connection), each handed to [`take`] like one accepted here;
//!   out of descriptors the accept ends and is armed again once the pause is over.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use throng_protocol::handshake::{self, Status};

use super::poller::{Poller, Ready};
use super::{Ctx, Env};
use crate::conn::{close, timers, Conn, ConnKey, Conns};
use crate::metrics::ShardMetrics;
use crate::sys::{self, Accept};

/// Connections accepted per turn at most.
pub const ACCEPT_BUDGET: usize = 64;
/// How long accepting pauses when the process is out of file descriptors.
pub const OUT_OF_FDS_PAUSE: Duration = Duration::from_millis(100);

/// The listener and what the shard knows about it.
#[derive(Debug)]
pub struct Acceptor {
    /// The listening socket; `None` once the shard drains.
    listener: Option<OwnedFd>,
    /// The listener reported connections and has not been found empty since (edge-triggered).
    pub ready: bool,
    /// Accepting is paused until then (out of descriptors).
    pub paused_until: Option<Instant>,
    /// The io_uring driver: a multishot accept is armed on the shard's ring (the listener is then not in the
    /// epoll set, and `ready` stays false).
    pub armed: bool,
    last_warn: Option<Instant>,
    /// The response to a connection over `max_connections`.
    over_capacity: Vec<u8>,
}

impl Acceptor {
    /// Wraps a listener, already in the shard's epoll set when `in_set` (else the io_uring driver's multishot
    /// accept takes its connections).
    pub fn new(listener: OwnedFd, in_set: bool) -> Self {
        let mut over_capacity = Vec::new();
        handshake::write_rejection(&mut over_capacity, Status::ServiceUnavailable, "server at max_connections");
        // Reported ready at first (epoll): connections may have queued before the listener joined the set.
        Self {
            listener: Some(listener),
            ready: in_set,
            paused_until: None,
            armed: false,
            last_warn: None,
            over_capacity,
        }
    }

    /// True when the accept step has work now.
    pub fn has_work(&self, now: Instant) -> bool {
        self.listener.is_some() && self.ready && self.paused_until.is_none_or(|t| now >= t)
    }

    /// The io_uring driver: the listener, when its multishot accept is to be armed (not armed, not paused,
    /// not closed). Marks it armed.
    pub fn to_arm(&mut self, now: Instant) -> Option<std::os::fd::BorrowedFd<'_>> {
        if self.armed || self.paused_until.is_some_and(|t| now < t) {
            return None;
        }
        let l = self.listener.as_ref()?;
        self.armed = true;
        Some(l.as_fd())
    }

    /// Stops accepting for good (drain): the listener is shut down and closed, so the kernel stops queueing
    /// connections for this shard and refuses new ones once every shard has done so.
    pub fn close(&mut self) {
        if let Some(l) = self.listener.take() {
            sys::shutdown(l.as_fd());
        }
    }

    /// A connection closed: if accepting was paused for want of descriptors, one is free now.
    pub fn fd_released(&mut self) {
        self.paused_until = None;
    }
}

/// The accept step of a turn. Each new connection is put at the front of `ready`, so its request (usually
/// already there) is read in this turn's connection step: a connection's first read, like its handshake
/// deadline, does not wait behind a backlog of busy connections (at most [`ACCEPT_BUDGET`] go first). With
/// the io_uring driver the listeners are not in the set and this step has nothing to do (see the module doc).
pub fn accept_turn(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    poller: &Poller,
    acc: &mut Acceptor,
    scratch: &mut [u8],
    ready: &mut VecDeque<(ConnKey, Ready)>,
) {
    let Some(listener) = &acc.listener else { return };
    for _ in 0..ACCEPT_BUDGET {
        match sys::accept(listener.as_fd()) {
            Accept::Conn(fd) => {
                if let Some(key) = take(env, ctx, conns, poller, acc, scratch, fd) {
                    ready.push_front((key, Ready { read: true, write: false }));
                }
            }
            Accept::WouldBlock => {
                acc.ready = false;
                return;
            }
            Accept::OutOfFds(e) => {
                out_of_fds(env, acc, &e);
                return;
            }
            Accept::Failed(_) => ShardMetrics::inc(&env.metrics.io_errors_total),
        }
    }
}

/// A connection the listener gave (`accept4`, or the io_uring driver's multishot accept): refused with 503
/// over `max_connections`, else registered. Returns its key; the caller arranges its first read (put first
/// in the connection step's queue, or read at once and its receive armed on the ring).
pub fn take(
    env: &Env,
    ctx: &mut Ctx,
    conns: &mut Conns,
    poller: &Poller,
    acc: &Acceptor,
    scratch: &mut [u8],
    fd: OwnedFd,
) -> Option<ConnKey> {
    ShardMetrics::inc(&env.metrics.accepted_total);
    let shared = &env.shared;
    let max = shared.config.max_connections.unwrap_or(usize::MAX);
    if shared.open_connections.fetch_add(1, Ordering::Relaxed) >= max {
        shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        refuse(env, ctx, &acc.over_capacity, fd, scratch);
        return None;
    }
    register(env, ctx, conns, poller, fd)
}

/// Out of file descriptors: accepting pauses for [`OUT_OF_FDS_PAUSE`] (or until a connection closes),
/// counted, and logged at most every 5 s.
pub fn out_of_fds(env: &Env, acc: &mut Acceptor, e: &std::io::Error) {
    ShardMetrics::inc(&env.metrics.accept_pauses_total);
    crate::metrics::Observed::mark(&env.metrics.obs.fd_pause_at, env.shared.started);
    let now = Instant::now();
    acc.paused_until = Some(now + OUT_OF_FDS_PAUSE);
    if acc.last_warn.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
        acc.last_warn = Some(now);
        tracing::warn!(
            shard = env.id,
            error = %e,
            open = env.shared.open_connections.load(Ordering::Relaxed),
            "out of file descriptors: accepting paused (raise the open-file limit, or lower \
             max_connections so that newcomers get a 503 instead of waiting)"
        );
    }
}

/// Answers a connection over `max_connections` with 503 and closes it, without parsing anything it sent.
fn refuse(env: &Env, ctx: &mut Ctx, response: &[u8], fd: OwnedFd, scratch: &mut [u8]) {
    ShardMetrics::inc(&env.metrics.over_capacity_total);
    ShardMetrics::inc(&env.metrics.http_rejected_total);
    let detail = "server at max_connections";
    close::refused(env, ctx, crate::metrics::Refused::OverCapacity, None, Some(fd.as_fd()), detail);
    // Whatever the client sent so far is discarded, so closing sends a FIN rather than a reset.
    for _ in 0..4 {
        match sys::recv(fd.as_fd(), scratch) {
            Ok(sys::Recv::Data(n)) if n == scratch.len() => continue,
            _ => break,
        }
    }
    let _ = sys::send_vectored(fd.as_fd(), &[IoSlice::new(response)]);
    sys::shutdown_write(fd.as_fd());
}

/// Registers an accepted connection: a slab entry with its handshake deadline, and its socket in the
/// shard's epoll set.
fn register(env: &Env, ctx: &mut Ctx, conns: &mut Conns, poller: &Poller, fd: OwnedFd) -> Option<ConnKey> {
    sys::set_nodelay(fd.as_fd());
    ShardMetrics::inc(&env.metrics.connections);
    ShardMetrics::inc(&env.metrics.http_connections);
    let key = conns.insert(|gen| Conn::new(fd, gen, env.now));
    let conn = conns.get_mut(key)?;
    if env.cfg().proxy_protocol {
        conn.flags |= crate::conn::flag::PROXY_PENDING;
    }
    timers::arm_handshake(env, ctx, key, conn);
    if let Err(e) = poller.add_conn(conn.fd(), key) {
        ShardMetrics::inc(&env.metrics.io_errors_total);
        tracing::warn!(shard = env.id, error = %e, "adding a connection to the epoll set failed; closing it");
        close::remove(env, ctx, conns, key);
        return None;
    }
    Some(key)
}
