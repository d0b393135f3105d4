//! Socket readiness for a whole shard: one edge-triggered epoll set holding every connection, itself
//! waited on through the runtime (an io_uring poll request on the uring driver, the runtime's own epoll on
//! the legacy driver).
//!
//! Why not one runtime readiness wait per connection: on io_uring that is a one-shot `PollAdd` re-armed
//! after every readiness event, and monoio 0.2 has no multishot poll. That re-arm is what made a
//! request/response connection cost 7.6 us of server CPU per echo on io_uring against 3.6 us on epoll
//! (docs/benchmarks.md, "Drivers"). Each waiting connection also needed a task (a future plus the runtime's
//! task header and an `Rc`'d socket), several hundred bytes per idle connection. Here a connection is an
//! fd in the set with its [`ConnKey`] as the event's data: no task, no per-connection wait request, and one
//! wait on the set covers every event that arrives before the shard looks again.
//!
//! The connection sockets are registered once, edge-triggered for input and output. Edge-triggered means
//! the handlers must read until the socket is drained (a short read or `EAGAIN`) and must treat a full
//! socket as "wait for the next output edge"; [`crate::conn`] does both, and re-queues a connection that
//! it stopped reading early for fairness (see [`Flow::More`](crate::conn)).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use monoio::net::TcpStream;

use crate::conn::{self, ConnKey};
use crate::shard::Shard;

/// Events taken from the set per `epoll_wait`; the loop yields to the shard's other tasks between batches.
const BATCH: usize = 256;

/// A shard's epoll set.
pub struct Poller {
    /// The epoll fd, wrapped in a runtime stream only so the runtime can wait for it to become readable
    /// (an epoll fd is readable while it has events to report). No stream I/O is ever done on it. Owning it
    /// here also closes it when the shard ends.
    set: TcpStream,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").field("epfd", &self.set.as_raw_fd()).finish()
    }
}

impl Poller {
    /// Creates the set. Must run inside the shard's runtime (the wait registers with it).
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created epoll fd that nothing else owns; the std stream takes ownership
        // (and `from_std` passes it on to the runtime's stream, which closes it on drop). Only readiness is
        // ever asked of it, which the kernel answers for any pollable fd.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        Ok(Self { set: TcpStream::from_std(std)? })
    }

    fn epfd(&self) -> RawFd {
        self.set.as_raw_fd()
    }

    /// Adds a connection socket, edge-triggered for input, output, and the peer's half-close.
    pub fn add(&self, fd: RawFd, key: ConnKey) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: key.to_u64(),
        };
        // SAFETY: `ev` is a valid epoll_event the kernel only reads; both fds are open.
        if unsafe { libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes up to `events.len()` ready events without waiting.
    fn take(&self, events: &mut [libc::epoll_event]) -> usize {
        loop {
            // SAFETY: `events` is a writable array of `events.len()` epoll_events; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.epfd(), events.as_mut_ptr(), events.len() as i32, 0) };
            if n >= 0 {
                return n as usize;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return 0;
            }
        }
    }
}

/// Readiness bits of one event, as the connection handlers need them.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// Input, the peer's half-close, a hang-up or an error: read (an error or EOF then ends the connection).
    pub read: bool,
    /// Room to write (or an error, which the write then reports).
    pub write: bool,
}

impl Ready {
    fn from_bits(bits: u32) -> Self {
        let err = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        Self {
            read: err || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
            write: err || bits & libc::EPOLLOUT as u32 != 0,
        }
    }
}

/// The shard's event loop for its connections: waits for the set, dispatches every ready event to the
/// connection's handler, and goes back to waiting once the set is empty and nothing was left unfinished.
pub async fn run(shard: Rc<Shard>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    // Connections whose handler stopped reading early (fairness bound) and must be resumed.
    let mut again: Vec<ConnKey> = Vec::new();
    let mut resume: Vec<ConnKey> = Vec::new();
    loop {
        let n = shard.poller.take(&mut events);
        for ev in &events[..n] {
            let (bits, data) = (ev.events, ev.u64);
            if conn::on_event(&shard, ConnKey::from_u64(data), Ready::from_bits(bits)) {
                again.push(ConnKey::from_u64(data));
            }
        }
        std::mem::swap(&mut again, &mut resume);
        for key in resume.drain(..) {
            if conn::on_event(&shard, key, Ready { read: true, write: false }) {
                again.push(key);
            }
        }
        if n == BATCH || !again.is_empty() {
            // More may be ready: let the shard's other tasks (flush, inbox, timers, accept) run first.
            YieldNow(false).await;
        } else if let Err(e) = shard.poller.set.readable(false).await {
            // Not expected from a poll on an epoll fd; retry rather than strand every connection.
            tracing::error!(shard = shard.id, error = %e, "waiting on the shard's epoll set failed; retrying");
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// Returns `Pending` once (after waking itself), so the runtime runs its other ready tasks first.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
