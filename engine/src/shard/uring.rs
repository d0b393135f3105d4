//! The io_uring receive path of a shard (`--driver uring`): every connection has one multishot receive
//! armed on the shard's own ring, taking its buffer from a provided-buffer ring the shard owns, and the
//! shard reaps the completions in its connection step. No `recv` syscall per read, no readiness event per
//! read, and no buffer per idle connection: the kernel picks a buffer only when data arrives.
//!
//! The ring sits beside the shard's epoll set, not instead of it: its fd is in the set (an io_uring fd is
//! readable while completions wait), so the loop parks on one thing as before, and the listener, the inbox
//! doorbell and the output edges of full sockets stay epoll events. A connection is registered in the set for
//! output only ([`super::poller::Poller::add_conn`]).
//!
//! Buffers: [`BufRing`], `uring_buffers` of `uring_buffer_size` bytes (128 x 4 KiB, 512 KiB per shard by
//! default), touched once at start so they are part of the shard's fixed memory, not of any connection's. A
//! completion names the buffer it filled; the shard hands the bytes to the connection's read path (parsed and
//! unmasked in place) and gives the buffer back to the ring at once, so only completions reaped and not yet
//! handled hold buffers. The ring is small on purpose: the kernel takes its buffers in turn, so a busy shard
//! writes to all of them in a cycle, and a ring larger than the cache makes every receive's copy miss it
//! (a saturated echo shard spent 11-15% more CPU per message with 1024 buffers than with 128).
//!
//! When the ring runs dry (more connections' data arrived between two reapings than there are buffers), the
//! kernel ends the receives that found it empty with `ENOBUFS`. Their data stays in the sockets (TCP flow
//! control holds the senders back), and the shard re-arms them at the end of its ring step, after the
//! completions it handled have given their buffers back ([`Ring::rearm_later`], [`Ring::rearm_noted`];
//! completions still waiting in the step's backlog hold theirs until their turn): a burst larger than the
//! ring is delayed, never lost. Counted in `throng_uring_buffers_empty_total`.
//!
//! A connection removed while its receive is armed: the shard cancels the receive (the request holds the
//! socket open until it ends); late completions name a key whose generation no longer matches and are
//! dropped, their buffers given back.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::conn::ConnKey;

/// User data of cancel requests (no connection key has it: see `super::poller::LISTENER`).
const CANCEL: u64 = u64::MAX;
/// User data of the listener's multishot accept.
const ACCEPT: u64 = u64::MAX - 1;
/// User data of the admin listener's multishot accept.
const ADMIN_ACCEPT: u64 = u64::MAX - 2;
/// Submission queue entries of the receive ring; a full queue is submitted before more are pushed.
const ENTRIES: u32 = 256;
/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): with it, `io_uring_enter` runs the ring's deferred work.
const ENTER_GETEVENTS: u32 = 1;

/// One entry of a provided-buffer ring, as the kernel lays it out (`struct io_uring_buf`). The `resv` field
/// of the first entry is the ring's tail, which the kernel reads: entries are written field by field, never
/// as a whole.
#[repr(C)]
struct BufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A provided-buffer ring: the entries the kernel takes buffers from, and the buffers.
pub struct BufRing {
    /// Page-aligned array of `count` entries, registered with the kernel.
    entries: *mut BufEntry,
    layout: Layout,
    /// The buffers, `count` x `size` bytes, one allocation.
    bufs: Box<[u8]>,
    size: u32,
    count: u16,
    /// Our tail: entries before it are the kernel's to take.
    tail: u16,
}

impl BufRing {
    /// Allocates `count` (a power of two) buffers of `size` bytes and their ring, every buffer in the ring.
    fn new(count: u16, size: u32) -> io::Result<Self> {
        assert!(count.is_power_of_two());
        let layout = Layout::from_size_align(usize::from(count) * size_of::<BufEntry>(), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (count >= 1) and a valid alignment.
        let entries = unsafe { alloc::alloc_zeroed(layout) }.cast::<BufEntry>();
        if entries.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // Written, not just reserved: the buffers are the shard's fixed memory from the start, not RSS that
        // appears as the first connections arrive.
        let bufs = vec![0x5a_u8; usize::from(count) * size as usize].into_boxed_slice();
        let mut ring = Self { entries, layout, bufs, size, count, tail: 0 };
        for bid in 0..count {
            ring.give(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Puts buffer `bid` back in the ring (visible to the kernel at the next [`BufRing::publish`]).
    fn give(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        let addr = self.bufs.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // The fields are written one by one, so the first entry's `resv` (the tail the kernel reads) is never
        // written here. The kernel does not read an entry at or past the published tail, and this one is past
        // it until `publish`.
        let e = self.entries.wrapping_add(idx).cast::<u8>();
        // SAFETY: `idx < count`: `e` is inside the allocation, and `addr` (offset 0) is aligned for a u64.
        unsafe { e.cast::<u64>().write(addr) };
        // SAFETY: as above; `len` is the u32 at offset 8.
        unsafe { e.wrapping_add(8).cast::<u32>().write(self.size) };
        // SAFETY: as above; `bid` is the u16 at offset 12.
        unsafe { e.wrapping_add(12).cast::<u16>().write(bid) };
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the tail: the entries given since the last call become the kernel's.
    fn publish(&self) {
        // SAFETY: the tail is the `resv` field of the first entry, a u16 at byte 14 of the page-aligned
        // allocation (so aligned for an atomic u16); the kernel reads it with acquire ordering.
        let tail = self.entries.cast::<u8>().wrapping_add(14).cast::<AtomicU16>();
        // SAFETY: (see above) valid for the ring's lifetime, aligned.
        let tail = unsafe { &*tail };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring that used it is dropped first (`Ring` field
        // order), so the kernel no longer refers to it.
        unsafe { alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing").field("count", &self.count).field("size", &self.size).finish()
    }
}

/// Buffer group id of the shard's buffer ring (one ring per io_uring instance).
const GROUP: u16 = 0;

/// What one completion of the receive ring says.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// Data for connection `key` in buffer `bid`, `len` bytes; `more` while the receive stays armed.
    Data { key: ConnKey, bid: u16, len: usize, more: bool },
    /// The peer's EOF (the receive ended).
    Eof(ConnKey),
    /// The receive ended without data: `ENOBUFS` (the ring was empty) or another reason to re-arm it.
    Rearm(ConnKey, i32),
    /// The receive failed (`-errno`): the socket is finished with, or it was cancelled.
    Failed(ConnKey, i32),
    /// A cancel request's own completion.
    Cancelled,
    /// The (admin) listener's multishot accept.
    Accept(Accepted),
}

/// A completion of a listener's multishot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The admin listener's.
    pub admin: bool,
    /// A new connection's fd, or `-errno`.
    pub res: i32,
    /// The accept stays armed.
    pub more: bool,
}

/// A shard's receive ring. Field order matters: the ring is dropped (and with it the kernel's reference to
/// the buffers) before the buffers.
pub struct Ring {
    ring: IoUring,
    bufs: BufRing,
    /// Signalled by the kernel when the first completion of a batch waits to be run (the ring defers the
    /// receives' work to the shard's own `io_uring_enter`, [`Ring::submit`]); in the shard's epoll set.
    efd: OwnedFd,
    /// Connections whose receive ended and must be armed again, once buffers are back.
    rearm: Vec<ConnKey>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("fd", &self.ring.as_raw_fd()).field("bufs", &self.bufs).finish()
    }
}

impl Ring {
    /// Creates the ring and registers `count` buffers of `size` bytes, then checks on a socket pair that a
    /// multishot receive works on this kernel (6.0 or later). The error says what is missing.
    pub fn new(count: u32, size: u32) -> io::Result<Self> {
        let count = u16::try_from(count).map_err(|_| io::Error::other("uring_buffers must be at most 32768"))?;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize((u32::from(count) * 2).max(4096))
            .build(ENTRIES)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
        let bufs = BufRing::new(count, size)?;
        // SAFETY: the entries stay allocated (and at this address) until `bufs` is dropped, which happens
        // after `ring` (field order of `Ring`), and the ring is the only one this group is registered with.
        unsafe { ring.submitter().register_buf_ring(bufs.entries as u64, count, GROUP) }
            .map_err(|e| io::Error::new(e.kind(), format!("registering a provided-buffer ring (Linux 5.19+): {e}")))?;
        let efd = crate::sys::eventfd()?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let mut me = Self { ring, bufs, efd, rearm: Vec::new() };
        me.self_test()?;
        Ok(me)
    }

    /// Arms a multishot receive on a socket pair, writes a byte, and checks the completion carries a buffer
    /// and stays armed; then cancels it.
    fn self_test(&mut self) -> io::Result<()> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        let probe = ConnKey { idx: u32::MAX - 7, gen: 0 };
        self.arm_recv(b.as_fd(), probe);
        std::io::Write::write_all(&mut &a, b"x")?;
        self.ring.submit_and_wait(1)?;
        let cqe = self.ring.completion().next().ok_or_else(|| io::Error::other("no completion"))?;
        let (res, flags) = (cqe.result(), cqe.flags());
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs.give(bid);
            self.bufs.publish();
        }
        self.cancel(probe);
        self.submit();
        // Wait for the cancel (and the receive's end) so nothing of the probe is left in flight.
        let _ = self.ring.submit_and_wait(2);
        self.ring.completion().for_each(|c| {
            if let Some(bid) = cqueue::buffer_select(c.flags()) {
                self.bufs.give(bid);
            }
        });
        self.bufs.publish();
        if res != 1 || cqueue::buffer_select(flags).is_none() || !cqueue::more(flags) {
            return Err(io::Error::other(format!(
                "multishot receive with provided buffers not supported (Linux 6.0+): result {res}, flags {flags:#x}"
            )));
        }
        Ok(())
    }

    /// The fd that becomes readable when completions wait, for the shard's epoll set.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    fn push(&mut self, e: &squeue::Entry) {
        loop {
            // SAFETY: the entries pushed here point at no memory of ours (a multishot receive takes its
            // buffers from the registered ring; a cancel only names user data).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            // Full: submit what is queued and try again.
            self.submit();
        }
    }

    /// Arms connection `key`'s receive (submitted at the next [`Ring::submit`]).
    pub fn arm_recv(&mut self, fd: BorrowedFd<'_>, key: ConnKey) {
        self.arm(fd.as_raw_fd(), key);
    }

    fn arm(&mut self, fd: RawFd, key: ConnKey) {
        let e = opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(key.to_u64());
        self.push(&e);
    }

    /// Arms a multishot accept on a listener (the admin one when `admin`): every connection it takes comes
    /// as a [`Completion::Accept`], non-blocking and close-on-exec.
    pub fn arm_accept(&mut self, listener: BorrowedFd<'_>, admin: bool) {
        let e = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(if admin { ADMIN_ACCEPT } else { ACCEPT });
        self.push(&e);
    }

    /// Cancels the (admin) listener's multishot accept (the drain; the request holds the listener open).
    pub fn cancel_accept(&mut self, admin: bool) {
        let e = opcode::AsyncCancel::new(if admin { ADMIN_ACCEPT } else { ACCEPT }).build().user_data(CANCEL);
        self.push(&e);
    }

    /// Cancels connection `key`'s receive, if armed.
    pub fn cancel(&mut self, key: ConnKey) {
        let e = opcode::AsyncCancel::new(key.to_u64()).build().user_data(CANCEL);
        self.push(&e);
    }

    /// Notes that `key`'s receive must be armed again once buffers are back.
    pub fn rearm_later(&mut self, key: ConnKey) {
        self.rearm.push(key);
    }

    /// Arms again the receives noted by [`Ring::rearm_later`] of the connections `fd_of` still knows.
    pub fn rearm_noted(&mut self, fd_of: impl Fn(ConnKey) -> Option<RawFd>) {
        let mut keys = std::mem::take(&mut self.rearm);
        for &key in &keys {
            if let Some(fd) = fd_of(key) {
                self.arm(fd, key);
            }
        }
        keys.clear();
        self.rearm = keys;
    }

    /// Submits what was pushed and runs the receives' deferred work (the kernel copies what arrived into
    /// ring buffers and posts the completions now, in this thread: the ring is set up with
    /// `IORING_SETUP_DEFER_TASKRUN`), without waiting. One syscall, only when there is something to do.
    pub fn submit(&mut self) {
        let sq = self.ring.submission();
        // Completions that overflowed the queue are moved back into it by the same call.
        let (pending, work, overflow) = (sq.len(), sq.taskrun(), sq.cq_overflow());
        drop(sq);
        if pending == 0 && !work && !overflow {
            return;
        }
        loop {
            // SAFETY: no argument is passed (`None`); the entries submitted point at no memory of ours.
            let res =
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(pending as u32, 0, ENTER_GETEVENTS, None) };
            match res {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reaped first, submitted again at the next call.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed");
                    break;
                }
            }
        }
    }

    /// Takes the next completion, if any.
    pub fn reap(&mut self) -> Option<Completion> {
        let cqe = self.ring.completion().next()?;
        let (data, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
        if data == CANCEL {
            return Some(Completion::Cancelled);
        }
        if data == ACCEPT || data == ADMIN_ACCEPT {
            return Some(Completion::Accept(Accepted { admin: data == ADMIN_ACCEPT, res, more: cqueue::more(flags) }));
        }
        let key = ConnKey::from_u64(data);
        Some(match (res, cqueue::buffer_select(flags)) {
            (n, Some(bid)) if n > 0 => Completion::Data { key, bid, len: n as usize, more: cqueue::more(flags) },
            (0, _) => Completion::Eof(key),
            (e, _) if e == -libc::ENOBUFS || (e > 0 && !cqueue::more(flags)) => Completion::Rearm(key, e),
            (e, _) => Completion::Failed(key, e),
        })
    }

    /// The bytes of buffer `bid` a completion reported (the shard's until [`Ring::give_back`]).
    pub fn buffer(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let size = self.bufs.size as usize;
        let start = usize::from(bid) * size;
        &mut self.bufs.bufs[start..start + len.min(size)]
    }

    /// Returns buffer `bid` to the ring (published at once: the kernel may need it for the next receive).
    pub fn give_back(&mut self, bid: u16) {
        self.bufs.give(bid);
        self.bufs.publish();
    }
}

/// Connections one [`SendRing`] batch holds at most.
pub const BATCH_CONNS: usize = 64;
/// Buffers one batch holds at most (over all its connections).
pub const BATCH_IOVS: usize = 4096;

/// The flush pass's writes for many connections in one `io_uring_enter`: one `sendmsg` request per
/// connection, each gathering that connection's buffers, all submitted together. Each carries
/// `MSG_DONTWAIT`, so the kernel completes it inline during the submit (bytes written, or `EAGAIN` for a
/// full socket: never parked waiting for room), and the batch is complete when the call returns; the
/// buffers only have to stay put until then.
pub struct SendRing {
    ring: IoUring,
    /// Every buffer of the batch, connection after connection. Its capacity is fixed ([`BATCH_IOVS`]): it
    /// never moves while the batch is built.
    iov: Vec<libc::iovec>,
    /// Each connection's socket and its range in `iov`.
    msgs: Vec<(RawFd, usize, usize)>,
    hdrs: Vec<libc::msghdr>,
    /// Each connection's result: bytes written or `-errno`.
    results: Vec<i32>,
    /// A submit failed: not used again.
    pub broken: bool,
    /// Zero-copy send for a connection's write that has a buffer of at least this many bytes (0: never).
    zc_threshold: usize,
    /// The buffers of the connection being gathered (kept only while zero-copy is on: a zero-copy write's
    /// buffers must outlive the batch, until the kernel's notification).
    cur: Vec<Bytes>,
    /// Per connection of the batch: its buffers when its write goes zero-copy.
    zc: Vec<Option<Vec<Bytes>>>,
    /// Zero-copy writes sent whose notification has not come: their id and buffers.
    held: Vec<(u64, Vec<Bytes>)>,
    /// Id of the batch's first request (ids grow, so a late notification names its write).
    seq: u64,
    /// Zero-copy writes sent, and those the kernel copied after all (notification with the copied flag).
    pub zc_sent: u64,
    /// (See `zc_sent`.)
    pub zc_copied: u64,
}

/// `IORING_CQE_F_NOTIF`: the completion is a zero-copy send's notification (its buffers are released).
const CQE_F_NOTIF: u32 = 1 << 3;
/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

impl std::fmt::Debug for SendRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRing").field("fd", &self.ring.as_raw_fd()).field("msgs", &self.msgs.len()).finish()
    }
}

impl SendRing {
    /// Creates the ring; writes with a buffer of `zc_threshold` bytes or more go zero-copy (0: none).
    pub fn new(zc_threshold: usize) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_cqsize(2 * BATCH_CONNS as u32)
            .build(BATCH_CONNS as u32)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
        Ok(Self {
            ring,
            iov: Vec::with_capacity(BATCH_IOVS),
            msgs: Vec::with_capacity(BATCH_CONNS),
            hdrs: Vec::with_capacity(BATCH_CONNS),
            results: Vec::with_capacity(BATCH_CONNS),
            broken: false,
            zc_threshold,
            cur: Vec::new(),
            zc: Vec::with_capacity(BATCH_CONNS),
            held: Vec::new(),
            seq: 0,
            zc_sent: 0,
            zc_copied: 0,
        })
    }

    /// Connections in the batch.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// True when the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Room for one more connection of up to `bufs` buffers.
    pub fn has_room(&self, bufs: usize) -> bool {
        !self.broken && self.msgs.len() < BATCH_CONNS && self.iov.len() + bufs <= BATCH_IOVS
    }

    /// Adds one buffer of the connection being gathered (after [`SendRing::has_room`] for all of them).
    pub fn push(&mut self, b: &Bytes) {
        debug_assert!(self.iov.len() < BATCH_IOVS);
        self.iov.push(libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() });
        if self.zc_threshold > 0 {
            self.cur.push(b.clone());
        }
    }

    /// Ends the connection whose buffers were pushed since `from` (`iov_len()` before them). Its write goes
    /// zero-copy when one of them reaches the threshold.
    pub fn end(&mut self, fd: BorrowedFd<'_>, from: usize) {
        self.msgs.push((fd.as_raw_fd(), from, self.iov.len() - from));
        let zc = self.zc_threshold > 0 && self.cur.iter().any(|b| b.len() >= self.zc_threshold);
        self.zc.push(zc.then(|| std::mem::take(&mut self.cur)));
        self.cur.clear();
    }

    /// Handles a notification or a result; `n` requests of the batch from `self.seq`.
    fn complete(&mut self, data: u64, res: i32, flags: u32, n: usize, got: &mut usize) {
        if flags & CQE_F_NOTIF != 0 {
            if res as u32 & NOTIF_USAGE_ZC_COPIED != 0 {
                self.zc_copied += 1;
            }
            // The kernel is done with the write's buffers.
            if let Some(pos) = self.held.iter().position(|(id, _)| *id == data) {
                self.held.swap_remove(pos);
            }
            return;
        }
        let Some(i) = data.checked_sub(self.seq).map(|i| i as usize).filter(|&i| i < n) else { return };
        self.results[i] = res;
        *got += 1;
        if let Some(bufs) = self.zc[i].take() {
            self.zc_sent += 1;
            if cqueue::more(flags) {
                // A notification follows: the buffers stay until it comes.
                self.held.push((data, bufs));
            }
        }
    }

    /// Buffers pushed so far.
    pub fn iov_len(&self) -> usize {
        self.iov.len()
    }

    /// Sends the batch and returns each connection's result (bytes written or `-errno`), in the order they
    /// were added; the batch is empty afterwards.
    ///
    /// # Safety
    ///
    /// Every buffer pushed since the last send must still be valid and unchanged.
    pub unsafe fn send(&mut self) -> &[i32] {
        self.hdrs.clear();
        for &(_, from, len) in &self.msgs {
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_iov = self.iov[from..].as_ptr().cast_mut();
            h.msg_iovlen = len;
            self.hdrs.push(h);
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        for (i, &(fd, from, len)) in self.msgs.iter().enumerate() {
            let e = if self.zc[i].is_some() {
                opcode::SendMsgZc::new(types::Fd(fd), &self.hdrs[i])
                    .flags(flags as u32)
                    .ioprio(SEND_ZC_REPORT_USAGE)
                    .build()
            } else if len == 1 {
                // One buffer (one frame: the common case at moderate rates): a plain send, which spares the
                // kernel the message header and the iovec import.
                let b = self.iov[from];
                opcode::Send::new(types::Fd(fd), b.iov_base.cast_const().cast(), b.iov_len as u32).flags(flags).build()
            } else {
                opcode::SendMsg::new(types::Fd(fd), &self.hdrs[i]).flags(flags as u32).build()
            }
            .user_data(self.seq + i as u64);
            // SAFETY: the header and the iovecs it points to live in `self` (capacities fixed: they do not
            // move) until every completion is reaped below; the buffers are the caller's promise until then,
            // and a zero-copy write's are held here (`held`) until its notification.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                unreachable!("the submission queue holds a whole batch");
            }
        }
        let n = self.msgs.len();
        self.results.clear();
        self.results.resize(n, -libc::EIO);
        let mut got = 0;
        while got < n {
            // Every request completes during the submit (MSG_DONTWAIT); waiting for `n` only makes sure
            // nothing the kernel reads is released before it is done with it.
            match self.ring.submit_and_wait(n - got) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Not expected (the queues hold a whole batch). The connections not completed see an
                    // error (treated as a failed socket), and the ring is never submitted to again: what is
                    // left in its queue can then never reach the kernel.
                    tracing::error!(error = %e, "io_uring send batch failed; the shard writes with sendmsg from now on");
                    self.broken = true;
                    break;
                }
            }
            loop {
                let next = self.ring.completion().next();
                let Some(c) = next else { break };
                self.complete(c.user_data(), c.result(), c.flags(), n, &mut got);
            }
        }
        self.seq += n as u64;
        self.zc.clear();
        self.iov.clear();
        self.msgs.clear();
        &self.results
    }
}

impl Drop for SendRing {
    fn drop(&mut self) {
        // Zero-copy writes whose notification has not come: the kernel may still read their buffers. Wait a
        // little for them; what is still held then is leaked rather than freed under the kernel.
        for _ in 0..100 {
            let mut got = 0;
            loop {
                let next = self.ring.completion().next();
                let Some(c) = next else { break };
                self.complete(c.user_data(), c.result(), c.flags(), 0, &mut got);
            }
            if self.held.is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::mem::forget(std::mem::take(&mut self.held));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn key(idx: u32) -> ConnKey {
        ConnKey { idx, gen: 1 }
    }

    /// Data written to two sockets arrives as completions naming their keys and buffers; a buffer given
    /// back is used again; EOF ends the receive.
    #[test]
    fn multishot_receives_into_ring_buffers() {
        let mut ring = Ring::new(4, 512).expect("ring");
        let (mut a, a2) = UnixStream::pair().unwrap();
        let (mut b, b2) = UnixStream::pair().unwrap();
        ring.arm_recv(a2.as_fd(), key(1));
        ring.arm_recv(b2.as_fd(), key(2));
        ring.submit();
        a.write_all(b"hello").unwrap();
        b.write_all(b"world!").unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            ring.ring.submit_and_wait(1).unwrap();
            while let Some(c) = ring.reap() {
                if let Completion::Data { key, bid, len, more } = c {
                    assert!(more);
                    got.push((key.idx, ring.buffer(bid, len).to_vec()));
                    ring.give_back(bid);
                }
            }
            if got.len() == 2 {
                break;
            }
        }
        got.sort();
        assert_eq!(got, vec![(1, b"hello".to_vec()), (2, b"world!".to_vec())]);
        drop(a);
        ring.ring.submit_and_wait(1).unwrap();
        assert_eq!(ring.reap(), Some(Completion::Eof(key(1))));
        drop((b, b2));
    }

    /// With every buffer out of the ring, a receive ends with ENOBUFS (to be re-armed); once buffers are
    /// back, the re-armed receive gets the data that waited in the socket.
    #[test]
    fn empty_ring_ends_receive_and_rearm_recovers() {
        let mut ring = Ring::new(2, 512).expect("ring");
        let (mut a, a2) = UnixStream::pair().unwrap();
        ring.arm_recv(a2.as_fd(), key(1));
        ring.submit();
        // Two writes, read into both buffers; keep them out of the ring.
        let mut held = Vec::new();
        for msg in [&b"one"[..], b"two"] {
            a.write_all(msg).unwrap();
            ring.ring.submit_and_wait(1).unwrap();
            match ring.reap() {
                Some(Completion::Data { bid, len, .. }) => held.push((bid, ring.buffer(bid, len).to_vec())),
                other => panic!("expected data, got {other:?}"),
            }
        }
        a.write_all(b"three").unwrap();
        ring.ring.submit_and_wait(1).unwrap();
        assert_eq!(ring.reap(), Some(Completion::Rearm(key(1), -libc::ENOBUFS)));
        for (bid, _) in &held {
            ring.give_back(*bid);
        }
        ring.arm_recv(a2.as_fd(), key(1));
        ring.submit();
        ring.ring.submit_and_wait(1).unwrap();
        match ring.reap() {
            Some(Completion::Data { bid, len, .. }) => assert_eq!(ring.buffer(bid, len), b"three"),
            other => panic!("expected data, got {other:?}"),
        }
    }
}
