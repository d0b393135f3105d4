//! Readiness for a whole shard: one edge-triggered epoll set holding every connection, the listener and the
//! inbox doorbell, itself waited on through the runtime (an io_uring poll request on the uring driver, the
//! runtime's own epoll on the legacy driver) when the shard has nothing else to do.
//!
//! Why not one runtime readiness wait per connection: on io_uring that is a one-shot `PollAdd` re-armed
//! after every readiness event, and monoio 0.2 has no multishot poll. That re-arm is what made a
//! request/response connection cost 7.6 us of server CPU per echo on io_uring against 3.6 us on epoll
//! (docs/benchmarks.md, "Drivers"). Each waiting connection also needed a task, several hundred bytes per
//! idle connection. Here a connection is an fd in the set with its [`ConnKey`] as the event's data: no task,
//! no per-connection wait request, and one look at the set covers every event that arrived meanwhile.
//!
//! Edge-triggered means the handlers must read until the socket is drained (a short read or `EAGAIN`) and
//! must treat a full socket as "wait for the next output edge"; [`crate::conn`] does both, and the shard
//! loop resumes a connection it stopped reading early for fairness.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::time::Duration;

use monoio::net::TcpStream;

use crate::conn::ConnKey;

/// Event data of the listener (no connection key has this value: generations start at 1 and the index
/// is below `u32::MAX`).
pub const LISTENER: u64 = u64::MAX;
/// Event data of the inbox doorbell.
pub const DOORBELL: u64 = u64::MAX - 1;
/// Event data of the admin listener (`admin_listen`, shard 0 only).
pub const ADMIN_LISTENER: u64 = u64::MAX - 2;
/// Event data of the shard's io_uring receive ring (`super::uring`): completions are waiting.
pub const RING: u64 = u64::MAX - 3;

/// A shard's epoll set.
pub struct Poller {
    /// The epoll fd, wrapped in a runtime stream only so the runtime can wait for it to become readable
    /// (an epoll fd is readable while it has events to report). No stream I/O is ever done on it. Owning it
    /// here also closes it when the shard ends.
    set: TcpStream,
    /// Connections' input comes through the shard's io_uring ring (`super::uring`): they are in the set for
    /// output only.
    ring_reads: bool,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").field("epfd", &self.set.as_raw_fd()).finish()
    }
}

impl Poller {
    /// Creates the set. Must run inside the shard's runtime (the wait registers with it).
    pub fn new(ring_reads: bool) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created epoll fd that nothing else owns; the std stream takes ownership
        // (and `from_std` passes it on to the runtime's stream, which closes it on drop). Only readiness is
        // ever asked of it, which the kernel answers for any pollable fd.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        Ok(Self { set: TcpStream::from_std(std)?, ring_reads })
    }

    fn epfd(&self) -> RawFd {
        self.set.as_raw_fd()
    }

    fn add(&self, fd: BorrowedFd<'_>, events: i32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: (events | libc::EPOLLET) as u32, u64: data };
        // SAFETY: `ev` is a valid epoll_event the kernel only reads; the epoll fd is ours and `fd` is open
        // for the call.
        if unsafe { libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds a connection socket, edge-triggered for input, output, and the peer's half-close (for output
    /// only when input comes through the io_uring ring). It leaves the set by itself when the socket is
    /// closed.
    pub fn add_conn(&self, fd: BorrowedFd<'_>, key: ConnKey) -> io::Result<()> {
        let events = if self.ring_reads { libc::EPOLLOUT } else { libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP };
        self.add(fd, events, key.to_u64())
    }

    /// Adds the shard's io_uring ring (readable while completions wait).
    pub fn add_ring(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(fd, libc::EPOLLIN, RING)
    }

    /// Adds the listening socket (edge-triggered: a new event only when new connections arrive after the
    /// queue was found empty).
    pub fn add_listener(&self, fd: &impl AsFd) -> io::Result<()> {
        self.add(fd.as_fd(), libc::EPOLLIN, LISTENER)
    }

    /// Adds the admin listener (`admin_listen`), like the main one.
    pub fn add_admin_listener(&self, fd: &impl AsFd) -> io::Result<()> {
        self.add(fd.as_fd(), libc::EPOLLIN, ADMIN_LISTENER)
    }

    /// Adds the inbox doorbell (an eventfd).
    pub fn add_doorbell(&self, fd: &impl AsFd) -> io::Result<()> {
        self.add(fd.as_fd(), libc::EPOLLIN, DOORBELL)
    }

    /// Takes up to `events.len()` ready events without waiting.
    pub fn take(&self, events: &mut [libc::epoll_event]) -> usize {
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

    /// Parks the shard until the set has something to report or `timeout` passes.
    pub async fn wait(&self, timeout: Duration) {
        match monoio::time::timeout(timeout, self.set.readable(false)).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => {
                // Not expected from a poll on an epoll fd; the loop looks at the set again anyway.
                tracing::error!(error = %e, "waiting on the shard's epoll set failed");
                monoio::time::sleep(Duration::from_millis(1)).await;
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
    /// Decodes an event's bits.
    pub fn from_bits(bits: u32) -> Self {
        let err = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        Self {
            read: err || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
            write: err || bits & libc::EPOLLOUT as u32 != 0,
        }
    }
}
