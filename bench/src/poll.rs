//! Thin wrappers over epoll and nonblocking TCP sockets (libc): what each client thread's event loop needs,
//! and nothing per message beyond one `read`/`write` system call.
//!
//! Registrations are edge-triggered: a socket reported readable must be read until a short read or
//! `EAGAIN`, and in exchange the kernel does not poll every ready socket again on the next wait.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Readiness for reading.
pub const IN: u32 = libc::EPOLLIN as u32;
/// Readiness for writing.
pub const OUT: u32 = libc::EPOLLOUT as u32;
/// Error or hang-up (always reported).
pub const ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// An epoll instance with its event buffer.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// Creates an epoll instance that returns up to `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Self> {
        // SAFETY: epoll_create1 has no pointer arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)] })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, interest: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: interest | libc::EPOLLET as u32, u64: token };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` with `token` for `interest` (edge-triggered).
    pub fn add(&self, fd: RawFd, token: u64, interest: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    /// Changes the interest of a registered `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, interest: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    /// Waits up to `timeout_ns` nanoseconds; returns the ready `(token, events)` pairs.
    ///
    /// Fixed-rate sends are stamped with their scheduled time, so the loop must wake on time: the wait uses
    /// `epoll_pwait2` (Linux 5.11), whose timeout is in nanoseconds; older kernels get `epoll_wait` with the
    /// timeout rounded up to a millisecond.
    pub fn wait(&mut self, timeout_ns: u64) -> io::Result<impl Iterator<Item = (u64, u32)> + '_> {
        static NO_PWAIT2: AtomicBool = AtomicBool::new(false);
        let cap = self.events.len() as libc::c_int;
        let epfd = self.fd.as_raw_fd();
        let mut n = -1;
        if !NO_PWAIT2.load(Relaxed) {
            let ts = libc::timespec {
                tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
            };
            // SAFETY: `events` has room for `cap` entries and outlives the call; `ts` is a valid timespec; a
            // null signal mask leaves the mask alone (its size argument is then unused).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    epfd,
                    self.events.as_mut_ptr(),
                    cap,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                NO_PWAIT2.store(true, Relaxed);
            } else {
                n = rc as libc::c_int;
            }
        }
        if NO_PWAIT2.load(Relaxed) {
            let ms = timeout_ns.div_ceil(1_000_000).min(i32::MAX as u64) as libc::c_int;
            // SAFETY: `events` has room for `cap` entries and outlives the call.
            n = unsafe { libc::epoll_wait(epfd, self.events.as_mut_ptr(), cap, ms) };
        }
        let n = if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            0
        } else {
            n as usize
        };
        Ok(self.events[..n].iter().map(|e| (e.u64, e.events)))
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a c_int that lives for the call and `len` is its size.
    let rc = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(&v).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Outcome of starting a nonblocking connect.
#[derive(Debug)]
pub enum Connecting {
    /// Connected at once.
    Done(OwnedFd),
    /// In progress: wait for writability, then check [`take_error`].
    InProgress(OwnedFd),
}

/// Opens a nonblocking TCP socket (TCP_NODELAY), binds it to `source` when given (port chosen at connect
/// time, so many connections can share a source address), and starts connecting to `addr`.
pub fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<Connecting> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket has no pointer arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let Some(src) = source {
        if src.is_ipv4() {
            // Defer the port choice to connect(), so the 4-tuple, not the source address, must be unique.
            setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        }
        let (ss, len) = sockaddr(SocketAddr::new(src, 0));
        // SAFETY: `ss` holds a valid socket address of `len` bytes.
        let rc = unsafe { libc::bind(raw, std::ptr::from_ref(&ss).cast(), len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (ss, len) = sockaddr(addr);
    // SAFETY: `ss` holds a valid socket address of `len` bytes.
    let rc = unsafe { libc::connect(raw, std::ptr::from_ref(&ss).cast(), len) };
    if rc == 0 {
        return Ok(Connecting::Done(fd));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(Connecting::InProgress(fd))
    } else {
        Err(e)
    }
}

/// The pending error of a socket (`SO_ERROR`), e.g. the result of a nonblocking connect.
pub fn take_error(fd: RawFd) -> Option<io::Error> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid, writable, and `len` is the size of `v`.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, std::ptr::from_mut(&mut v).cast(), &mut len) };
    if rc < 0 {
        return Some(io::Error::last_os_error());
    }
    (v != 0).then(|| io::Error::from_raw_os_error(v))
}

/// One `read`; `Ok(0)` is end of stream.
#[inline]
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `write` (`MSG_NOSIGNAL`, so a closed peer is an error, not a signal).
#[inline]
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A short name for a socket error, used as the key of the error counts in reports.
pub fn error_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ECONNABORTED) => "reset".into(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "addr_unavailable".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(n) => format!("errno_{n}"),
        None => "io".into(),
    }
}
