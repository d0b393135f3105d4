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

/// A connection's queue of bytes the socket has not taken yet. Nothing is allocated, and it takes 8 bytes
/// of the connection's state, until a write leaves something unsent; emptied, it frees its memory again.
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

    /// Queues `b` last.
    pub fn push_back(&mut self, b: Bytes) {
        self.0.get_or_insert_with(Default::default).push_back(b);
    }

    /// The oldest buffer.
    pub fn front_mut(&mut self) -> Option<&mut Bytes> {
        self.0.as_mut()?.front_mut()
    }

    /// Removes the oldest buffer; frees the queue once it is empty.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let q = self.0.as_mut()?;
        let b = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        b
    }

    /// Keeps the `n` oldest buffers.
    pub fn truncate(&mut self, n: usize) {
        if let Some(q) = &mut self.0 {
            q.truncate(n);
            if q.is_empty() {
                self.0 = None;
            }
        }
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
        if conn.outq.is_empty() && !conn.writer_active() {
            match sys::send_vectored(conn.fd(), &[IoSlice::new(&ctx.out)]) {
                Ok(n) => {
                    ShardMetrics::add(&env.metrics.bytes_out_total, n as u64);
                    if n < ctx.out.len() {
                        push(conn, Bytes::copy_from_slice(&ctx.out[n..]));
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
            push(conn, Bytes::copy_from_slice(&ctx.out));
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

/// Queues bytes behind what is already queued.
pub fn push(conn: &mut Conn, b: Bytes) {
    conn.queued += b.len() as u32;
    conn.outq.push_back(b);
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
pub fn consume_queue(conn: &mut Conn, mut written: usize) -> usize {
    while written > 0 {
        let Some(front) = conn.outq.front_mut() else { break };
        if front.len() <= written {
            written -= front.len();
            conn.queued -= front.len() as u32;
            conn.outq.pop_front();
            conn.flags &= !flag::HEAD_STARTED;
        } else {
            front.advance(written);
            conn.queued -= written as u32;
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
