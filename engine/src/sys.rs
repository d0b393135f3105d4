//! The raw syscalls the shards make directly: non-blocking `recv` into the shard's pooled buffer,
//! `sendmsg` of an iovec batch, `shutdown`, `accept4` on the listener, an eventfd for cross-shard wake-ups,
//! `getrandom`, and the open-file and locked-memory limits.
//!
//! Why raw: a connection waits for readiness in the shard's epoll set ([`crate::shard::poller`]) and then
//! reads synchronously into a buffer owned by the shard, so an idle connection pins no buffer (a pending
//! io_uring `recv` would pin one per socket). Every call passes `MSG_DONTWAIT` or works on a non-blocking
//! descriptor, so none ever blocks.
//!
//! Every wrapper takes a [`BorrowedFd`]: the caller proves the descriptor is open for the length of the call
//! (it is owned by a connection still in the slab, or by the shard), instead of passing a bare number that
//! could name a descriptor already closed and reused.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Outcome of a non-blocking read.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were read (more than zero).
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed its side (or the socket was shut down).
    Eof,
}

/// Reads what is available from `fd` into `buf` without blocking.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Recv> {
    loop {
        // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the duration of the call, and
        // `fd` is open for the call (a `BorrowedFd`).
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Ok(Recv::Data(n as usize));
        }
        if n == 0 {
            return Ok(Recv::Eof);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(Recv::WouldBlock),
            _ => return Err(e),
        }
    }
}

/// Writes the gathered `bufs` with one `sendmsg` without blocking. Returns the bytes written; 0 means the
/// socket buffer is full (would block).
pub fn send_vectored(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    if bufs.is_empty() {
        return Ok(0);
    }
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with `struct iovec` (guaranteed by std on Unix); the kernel only reads it.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    loop {
        // SAFETY: `msg` points at `msg_iovlen` valid iovecs whose memory stays borrowed for the call; `fd` is
        // open for the call.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Shuts both directions of a socket down. The shard's epoll set then reports the socket, the read finds
/// EOF and the connection is removed: how the shard ends a connection from outside its read path.
pub fn shutdown(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown takes no pointers; `fd` is open for the call. The result is not needed: on a socket
    // that is already disconnected it fails harmlessly.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Shuts the sending direction down (FIN after what is queued); reading goes on.
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // SAFETY: as for `shutdown`.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR);
    }
}

/// Outcome of a non-blocking accept.
#[derive(Debug)]
pub enum Accept {
    /// A new connection, non-blocking and close-on-exec.
    Conn(OwnedFd),
    /// No connection is waiting.
    WouldBlock,
    /// The process or the system is out of file descriptors: accepting must pause.
    OutOfFds(io::Error),
    /// Another error (the connection was reset before it was accepted, ...): skip it.
    Failed(io::Error),
}

/// Takes the next connection from a listening socket without blocking, as a non-blocking, close-on-exec
/// descriptor that the caller owns.
pub fn accept(listener: BorrowedFd<'_>) -> Accept {
    loop {
        // SAFETY: no peer address is asked for (null pointers are allowed); `listener` is open for the call.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            return Accept::Conn(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Accept::WouldBlock,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => return Accept::OutOfFds(e),
            _ => return Accept::Failed(e),
        }
    }
}

/// Sets `TCP_NODELAY` (replies and frames go out at once; writes are already batched by the shard).
pub fn set_nodelay(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the duration of the call and its size is passed; `fd` is open.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The address of a socket's peer (`getpeername`), if it has one.
pub fn peer_ip(fd: BorrowedFd<'_>) -> Option<std::net::IpAddr> {
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket().map(|a| a.ip())
}

/// A new non-blocking eventfd (counter 0): the shard's inbox doorbell, in its epoll set.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, making it readable. A full counter (never, in practice) is ignored:
/// it is readable already.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, valid for the call; `fd` is open.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Resets an eventfd's counter to 0 (reading it), so it stops being readable.
pub fn eventfd_clear(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into `v`, valid and writable for the call; `fd` is open and
    // non-blocking, so an empty counter returns EAGAIN at once.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
    }
}

/// 8 random bytes from the kernel (`getrandom`), for channel epochs and other values that must differ
/// across restarts and nodes. Falls back to the clock and the process id only if the syscall fails.
pub fn random_u64() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: writes at most 8 bytes into `v`, valid and writable for the call.
    let n = unsafe { libc::getrandom((&mut v as *mut u64).cast(), 8, 0) };
    if n == 8 {
        return v;
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()) << 32
}

/// Raises the soft open-file limit to the hard limit. Returns (soft, hard) after the change.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `want` is a valid rlimit struct that the kernel only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim = want;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The locked-memory soft limit (`RLIMIT_MEMLOCK`) in bytes; `None` when unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur))
}

/// Descriptors this process has open now (`/proc/self/fd`, less the one listing it).
pub fn open_fd_count() -> io::Result<u64> {
    let n = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(n.saturating_sub(1))
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}
