//! The host limits that cap how many connections Throng can hold: read once at start, logged, and checked
//! against `max_connections`.
//!
//! Each connection is one descriptor, so the count Throng can hold is its open-file limit (the soft limit,
//! raised to the hard one at start) less the descriptors it keeps for itself: those open at start (stdin,
//! stdout, stderr), [`FDS_PER_SHARD`] per shard, and [`FD_RESERVE`]. That count is the default
//! `max_connections`, so a connection past it gets a `503` rather than waiting for a descriptor.
//! `tuning/throng-tune check` makes the same estimate from outside (its `BASE_FDS`, `FDS_PER_SHARD` and
//! `FD_RESERVE` mirror [`BASE_FDS`], [`FDS_PER_SHARD`] and [`FD_RESERVE`]); `engine/tests/tuning.rs`
//! checks that both agree with what a server actually holds.
//!
//! The other limits are warned about, not enforced: `fs.file-max` (system-wide) below `max_connections`,
//! `net.core.somaxconn` below the listen backlog (the kernel silently cuts each listener's queue to it), and
//! on kernels before 5.12, which charge io_uring rings to `RLIMIT_MEMLOCK`, a memlock limit too small for
//! the shards' rings.

use std::fmt;
use std::path::Path;

/// Descriptors a process started normally holds before Throng opens anything: stdin, stdout, stderr.
/// Start-up counts what it actually holds (`/proc/self/fd`); this is the figure `throng-tune` assumes.
pub const BASE_FDS: u64 = 3;
/// Descriptors each shard holds: its listener, its epoll set, its inbox doorbell (an eventfd), and its
/// runtime's own two (the io_uring ring or the epoll driver's epoll fd, and the runtime's waker eventfd).
pub const FDS_PER_SHARD: u64 = 5;
/// Descriptors kept free beyond those, for what the process opens now and then: `/proc/self/statm` for
/// `/stats` (one at a time per shard), a key or configuration file, the Redis relay's connections.
pub const FD_RESERVE: u64 = 16;
/// The backlog each shard's listener asks for. The kernel cuts it to `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Bytes of an io_uring submission queue entry and of a completion queue entry.
const SQE_BYTES: u64 = 64;
const CQE_BYTES: u64 = 16;

/// The limits read at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// Open-file soft limit after raising it to the hard limit (what binds).
    pub nofile_soft: u64,
    /// Open-file hard limit.
    pub nofile_hard: u64,
    /// `RLIMIT_MEMLOCK` soft limit in bytes; `None` when unlimited.
    pub memlock: Option<u64>,
    /// `net.core.somaxconn`; `None` when it cannot be read.
    pub somaxconn: Option<u64>,
    /// `fs.file-max`; `None` when it cannot be read.
    pub file_max: Option<u64>,
    /// Descriptors open when the limits were read, before any shard (normally [`BASE_FDS`]).
    pub fds_at_start: u64,
    /// Shards that will run.
    pub shards: usize,
    /// Kernel version (major, minor); `None` when unknown.
    pub kernel: Option<(u32, u32)>,
}

impl HostLimits {
    /// Reads the limits of this process and host, given the open-file limits as raised
    /// ([`crate::sys::raise_nofile_limit`]).
    pub fn read((nofile_soft, nofile_hard): (u64, u64), shards: usize) -> Self {
        let proc_u64 = |name: &str| read_proc_u64(Path::new("/proc/sys").join(name));
        Self {
            nofile_soft,
            nofile_hard,
            memlock: crate::sys::memlock_limit().unwrap_or(None),
            somaxconn: proc_u64("net/core/somaxconn"),
            file_max: proc_u64("fs/file-max"),
            fds_at_start: crate::sys::open_fd_count().unwrap_or(BASE_FDS),
            shards,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().and_then(|r| kernel_version(&r)),
        }
    }

    /// Descriptors the process keeps for itself: those open at start, [`FDS_PER_SHARD`] per shard and
    /// [`FD_RESERVE`].
    pub fn fds_kept(&self) -> u64 {
        self.fds_at_start + FDS_PER_SHARD * self.shards as u64 + FD_RESERVE
    }

    /// Connections the open-file limit leaves room for.
    pub fn capacity(&self) -> u64 {
        self.nofile_soft.saturating_sub(self.fds_kept())
    }

    /// What each shard's listen queue really gets: the backlog asked for, cut to `somaxconn`.
    pub fn effective_backlog(&self) -> u64 {
        let asked = u64::from(LISTEN_BACKLOG);
        self.somaxconn.map_or(asked, |s| s.min(asked))
    }

    /// The limits that fall short, for `max_connections` connections, with io_uring rings of
    /// `uring_entries` submission entries per shard (`None` on epoll).
    pub fn warnings(&self, max_connections: usize, uring_entries: Option<u32>) -> Vec<Warning> {
        let max = max_connections as u64;
        let mut out = Vec::new();
        if max > self.capacity() {
            out.push(Warning::OpenFiles {
                max_connections: max,
                capacity: self.capacity(),
                soft: self.nofile_soft,
                hard: self.nofile_hard,
            });
        }
        if let Some(file_max) = self.file_max.filter(|&f| f < max) {
            out.push(Warning::FileMax { max_connections: max, file_max });
        }
        if let Some(somaxconn) = self.somaxconn.filter(|&s| s < u64::from(LISTEN_BACKLOG)) {
            out.push(Warning::Somaxconn { somaxconn, backlog: LISTEN_BACKLOG });
        }
        let charged = self.kernel.is_some_and(|k| k < (5, 12));
        if let (Some(entries), Some(memlock), true) = (uring_entries, self.memlock, charged) {
            let needed = self.shards as u64 * uring_ring_bytes(entries);
            if memlock < needed {
                out.push(Warning::Memlock { memlock, needed });
            }
        }
        out
    }
}

/// A limit below what the configuration asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warning {
    /// The open-file limit holds fewer connections than `max_connections`.
    OpenFiles { max_connections: u64, capacity: u64, soft: u64, hard: u64 },
    /// `fs.file-max` (every process's files together) is below `max_connections`.
    FileMax { max_connections: u64, file_max: u64 },
    /// `net.core.somaxconn` cuts the listen backlog.
    Somaxconn { somaxconn: u64, backlog: u32 },
    /// `RLIMIT_MEMLOCK` is below what the io_uring rings need on a kernel that charges them to it.
    Memlock { memlock: u64, needed: u64 },
}

impl Warning {
    /// A short name for the log's `limit` field.
    pub fn limit(&self) -> &'static str {
        match self {
            Self::OpenFiles { .. } => "open_files",
            Self::FileMax { .. } => "file_max",
            Self::Somaxconn { .. } => "somaxconn",
            Self::Memlock { .. } => "memlock",
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OpenFiles { max_connections, capacity, soft, hard } => write!(
                f,
                "max_connections exceeds what the open-file limit can hold: {max_connections} > {capacity} \
                 (open files {soft}, hard limit {hard}); past that, accepts pause for want of descriptors: \
                 raise the hard limit (LimitNOFILE= in a systemd unit, nofile in limits.conf; \
                 tuning/README.md)"
            ),
            Self::FileMax { max_connections, file_max } => write!(
                f,
                "fs.file-max ({file_max}, open files of every process together) is below max_connections \
                 ({max_connections}): raise it (tuning/sysctl.conf)"
            ),
            Self::Somaxconn { somaxconn, backlog } => write!(
                f,
                "net.core.somaxconn ({somaxconn}) is below the listen backlog ({backlog}): the kernel cuts each \
                 shard's queue of new connections to {somaxconn}; raise it (tuning/sysctl.conf)"
            ),
            Self::Memlock { memlock, needed } => write!(
                f,
                "the locked-memory limit ({memlock} B) is below what the io_uring rings need ({needed} B) on \
                 this kernel (before 5.12 rings count against it): raise it (LimitMEMLOCK=, memlock in \
                 limits.conf) or run with --driver epoll"
            ),
        }
    }
}

/// Bytes of the rings of one io_uring with `entries` submission entries (and twice as many completion
/// entries, the kernel's default): the entries, the submission index array, and a page of ring header each.
pub fn uring_ring_bytes(entries: u32) -> u64 {
    let n = u64::from(entries);
    n * SQE_BYTES + n * 4 + 2 * n * CQE_BYTES + 2 * 4096
}

/// Major and minor version from a kernel release string (`6.18.44-fc-v669`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn read_proc_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

/// `Some(n)` as text, `None` as the given word: for log fields.
#[derive(Debug)]
pub struct Shown(pub Option<u64>, pub &'static str);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str(self.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLimits {
        HostLimits {
            nofile_soft: 1200,
            nofile_hard: 1200,
            memlock: Some(8 << 20),
            somaxconn: Some(4096),
            file_max: Some(2_000_000),
            fds_at_start: BASE_FDS,
            shards: 1,
            kernel: Some((6, 18)),
        }
    }

    #[test]
    fn capacity_is_open_files_less_what_the_process_keeps() {
        let h = host();
        assert_eq!(h.fds_kept(), 3 + 5 + 16);
        assert_eq!(h.capacity(), 1200 - 24);
        let h = HostLimits { shards: 4, fds_at_start: 7, ..host() };
        assert_eq!(h.capacity(), 1200 - (7 + 4 * 5 + 16));
        let h = HostLimits { nofile_soft: 10, ..host() };
        assert_eq!(h.capacity(), 0);
    }

    #[test]
    fn no_warning_when_everything_fits() {
        assert_eq!(host().warnings(1176, Some(1024)), vec![]);
    }

    #[test]
    fn warns_when_open_files_hold_fewer_than_max_connections() {
        let w = host().warnings(1177, None);
        assert_eq!(w, vec![Warning::OpenFiles { max_connections: 1177, capacity: 1176, soft: 1200, hard: 1200 }]);
        // engine/tests/hostile.rs looks for this phrase.
        assert!(w[0].to_string().contains("max_connections exceeds what the open-file limit can hold"));
    }

    #[test]
    fn warns_on_file_max_and_somaxconn() {
        let h = HostLimits { nofile_soft: 10_000_000, file_max: Some(100_000), somaxconn: Some(128), ..host() };
        let w = h.warnings(1_000_000, None);
        assert_eq!(
            w,
            vec![
                Warning::FileMax { max_connections: 1_000_000, file_max: 100_000 },
                Warning::Somaxconn { somaxconn: 128, backlog: LISTEN_BACKLOG },
            ]
        );
        assert_eq!(h.effective_backlog(), 128);
        assert_eq!(host().effective_backlog(), u64::from(LISTEN_BACKLOG));
        // Unreadable figures warn about nothing.
        let h = HostLimits { file_max: None, somaxconn: None, ..h };
        assert_eq!(h.warnings(1000, None), vec![]);
    }

    #[test]
    fn memlock_matters_only_for_io_uring_before_5_12() {
        let rings = uring_ring_bytes(1024);
        assert!((90_000..120_000).contains(&rings), "{rings} B of rings for 1024 entries");
        let old = HostLimits { memlock: Some(64 * 1024), kernel: Some((5, 4)), shards: 2, ..host() };
        assert_eq!(old.warnings(10, Some(1024)), vec![Warning::Memlock { memlock: 64 * 1024, needed: 2 * rings }]);
        assert_eq!(old.warnings(10, None), vec![], "epoll needs no locked memory");
        let new = HostLimits { kernel: Some((5, 12)), ..old.clone() };
        assert_eq!(new.warnings(10, Some(1024)), vec![], "5.12+ charges the memory cgroup");
        let unlimited = HostLimits { memlock: None, ..old };
        assert_eq!(unlimited.warnings(10, Some(1024)), vec![]);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("6.1-rc3"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn the_real_host_reads() {
        let h = HostLimits::read(crate::sys::raise_nofile_limit().unwrap(), 2);
        assert!(h.fds_at_start >= 3, "{h:?}");
        assert!(h.nofile_soft >= h.fds_kept(), "{h:?}");
        assert!(h.kernel.is_some(), "{h:?}");
    }
}
