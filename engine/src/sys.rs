//! The few raw syscalls the shards make directly: non-blocking `recv` into the shard's pooled buffer,
//! `sendmsg` of an iovec batch, `shutdown`, and the open-file limit.
//!
//! Why raw: a connection waits for readiness in the shard's epoll set ([`crate::poller`]) and then reads
//! synchronously into a buffer owned by the shard, so an idle connection pins no buffer (a pending
//! io_uring `recv` would pin one per socket). Every call passes `MSG_DONTWAIT`, so it never blocks whatever
//! mode the socket is in.

use std::io;
use std::os::fd::RawFd;

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
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    loop {
        // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the duration of the call, and
        // `fd` is an open socket owned by the calling shard (the connection is still in its slab).
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
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
pub fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
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
        // an open socket owned by the calling shard.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
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
/// EOF and the connection is removed: how the shard ends a connection from outside its read path
/// (timeouts, drain, slow consumers).
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; on a bad fd it merely fails, and the result is not needed.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Shuts the sending direction down (FIN after what is queued); reading goes on.
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; on a bad fd it merely fails, and the result is not needed.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
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

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}
