//! The write side of a connection: replies gathered in the shard's `out` buffer are written straight from
//! it; only what the socket does not take is copied into the connection's queue of `Bytes`, which the next
//! output edge (or flush pass) writes, ahead of any channel frames.
//!
//! The queue is bounded in bytes (`max_backlog_bytes`). Bytes are always queued whole — a reply or frame
//! that has started going out is never cut — and a connection whose queue then passes the bound is a slow
//! consumer: [`super::close`] drops what has not started and closes it with 4008.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

use super::close::{self, Close};
use super::{flag, Conn, ConnKey, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};
use crate::sys;

/// A connection's queue of bytes the socket has not taken yet. It takes 8 bytes of the connection's state
/// and holds no memory until a write leaves something unsent; emptied, it goes back to the shard's
/// [`QueuePool`].
// The box is the point: 8 bytes per idle connection instead of an empty deque's 32.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub struct OutQueue(Option<Box<VecDeque<Bytes>>>);

impl OutQueue {
    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    /// The queued buffers, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.0.iter().flat_map(|q| q.iter())
    }

    /// Queues `b` last (taking a spare queue from `pool` when this one holds none).
    pub fn push_back(&mut self, b: Bytes, pool: &mut QueuePool) {
        self.0.get_or_insert_with(|| pool.take()).push_back(b);
    }

    /// The oldest buffer.
    pub fn front_mut(&mut self) -> Option<&mut Bytes> {
        self.0.as_mut()?.front_mut()
    }

    /// Removes the oldest buffer; the queue goes back to `pool` once it is empty.
    pub fn pop_front(&mut self, pool: &mut QueuePool) -> Option<Bytes> {
        let q = self.0.as_mut()?;
        let b = q.pop_front();
        if q.is_empty() {
            self.release(pool);
        }
        b
    }

    /// Keeps the `n` oldest buffers.
    pub fn truncate(&mut self, n: usize, pool: &mut QueuePool) {
        if let Some(q) = &mut self.0 {
            q.truncate(n);
            if q.is_empty() {
                self.release(pool);
            }
        }
    }

    fn release(&mut self, pool: &mut QueuePool) {
        if let Some(q) = self.0.take() {
            pool.give(q);
        }
    }
}

/// Spare output queues of a shard. A connection whose writes block takes one, and gives it back once it
/// has drained, so a blocked-then-drained cycle allocates nothing once the pool has warmed up. Bounded: at
/// most [`QueuePool::MAX`] spares, each of at most [`QueuePool::MAX_CAPACITY`] entries (a larger one is
/// freed instead), so an idle shard keeps at most a few hundred KiB here.
// Boxed because connections hold them boxed (`OutQueue`): handing one over moves a pointer, not a deque.
#[allow(clippy::box_collection, clippy::vec_box)]
#[derive(Debug)]
pub struct QueuePool {
    spare: Vec<Box<VecDeque<Bytes>>>,
    /// Bytes queued over all of the shard's connections (`Conn::queued` summed), for `throng_queued_bytes`.
    pub bytes: u64,
}

impl Default for QueuePool {
    fn default() -> Self {
        Self { spare: Vec::with_capacity(Self::MAX), bytes: 0 }
    }
}

impl QueuePool {
    /// Most spare queues kept.
    pub const MAX: usize = 1024;
    /// Largest capacity (entries) a spare queue may keep.
    pub const MAX_CAPACITY: usize = 64;

    #[allow(clippy::box_collection)]
    fn take(&mut self) -> Box<VecDeque<Bytes>> {
        self.spare.pop().unwrap_or_default()
    }

    #[allow(clippy::box_collection)]
    fn give(&mut self, mut q: Box<VecDeque<Bytes>>) {
        if self.spare.len() < Self::MAX && q.capacity() <= Self::MAX_CAPACITY {
            q.clear();
            self.spare.push(q);
        }
    }

    /// Spare queues held.
    pub fn len(&self) -> usize {
        self.spare.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.spare.is_empty()
    }
}

/// Outcome of writing to one connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything pending was written.
    Done,
    /// The socket is full; the rest waits for writability.
    Blocked,
    /// The socket failed.
    Failed,
}

/// Writes `ctx.out` to the connection and clears it: directly when nothing is queued ahead of it, else
/// behind the queue. Then applies the backlog bound, and finishes a close whose last bytes just went out.
pub fn send_out(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    if !ctx.out.is_empty() {
        if conn.flags & flag::UPGRADED != 0 {
            // Everything in `out` after a 101 is whole frames (replies, pongs, pings, echoes, closes).
            let frames = count_frames(ctx.out.get(ctx.frames_from..).unwrap_or_default());
            ShardMetrics::add(&env.metrics.frames_out_total, frames);
        }
        ctx.frames_from = 0;
        if conn.outq.is_empty() && !conn.writer_active() {
            match sys::send_vectored(conn.fd(), &[IoSlice::new(&ctx.out)]) {
                Ok(n) => {
                    ShardMetrics::add(&env.metrics.bytes_out_total, n as u64);
                    if n < ctx.out.len() {
                        push(conn, Bytes::copy_from_slice(&ctx.out[n..]), &mut ctx.queues);
                        if n > 0 {
                            conn.flags |= flag::HEAD_STARTED;
                        }
                        wait_writable(env, conn);
                    }
                }
                Err(_) => {
                    ctx.out.clear();
                    socket_failed(env, ctx, key, conn);
                    return;
                }
            }
        } else {
            push(conn, Bytes::copy_from_slice(&ctx.out), &mut ctx.queues);
        }
        ctx.out.clear();
        if conn.phase.is_open() && conn.queued as usize > env.cfg().max_backlog_bytes {
            close::close(env, ctx, key, conn, Close::SlowConsumer);
            return;
        }
    }
    if conn.outq.is_empty() && !conn.writer_active() && conn.phase == Phase::Closing {
        close::drained(conn);
    }
}

/// The number of frames in `buf`, which holds whole frames this server encoded: a walk over their headers
/// with the protocol crate's parser.
fn count_frames(mut buf: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok(Some(h)) = throng_protocol::frame::parse_header(buf) {
        n += 1;
        buf = buf.get(usize::try_from(h.frame_len()).unwrap_or(usize::MAX)..).unwrap_or_default();
    }
    n
}

/// Queues bytes behind what is already queued.
pub fn push(conn: &mut Conn, b: Bytes, pool: &mut QueuePool) {
    conn.queued += b.len() as u32;
    pool.bytes += b.len() as u64;
    conn.outq.push_back(b, pool);
}

/// The socket is full: the connection waits for its next output edge, and nothing else writes to it
/// meanwhile.
pub fn wait_writable(env: &Env, conn: &mut Conn) {
    if !conn.writer_active() {
        conn.flags |= flag::WRITER;
        ShardMetrics::inc(&env.metrics.write_waits_total);
    }
}

/// Accounts for `written` bytes of the queue having gone out.
pub fn consume_queue(conn: &mut Conn, mut written: usize, pool: &mut QueuePool) -> usize {
    while written > 0 {
        let Some(front) = conn.outq.front_mut() else { break };
        if front.len() <= written {
            written -= front.len();
            conn.queued -= front.len() as u32;
            pool.bytes = pool.bytes.saturating_sub(front.len() as u64);
            conn.outq.pop_front(pool);
            conn.flags &= !flag::HEAD_STARTED;
        } else {
            front.advance(written);
            conn.queued -= written as u32;
            pool.bytes = pool.bytes.saturating_sub(written as u64);
            conn.flags |= flag::HEAD_STARTED;
            written = 0;
        }
    }
    written
}

/// A write failed (the peer reset the connection, ...): nothing more can be sent; the socket is shut down
/// and the connection goes once its EOF is read.
pub fn socket_failed(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn) {
    ShardMetrics::inc(&env.metrics.io_errors_total);
    conn.flags &= !flag::WRITER;
    close::close(env, ctx, key, conn, Close::Abort);
}
