//! Operating-system helpers: the monotonic clock, CPU pinning, file limits, CPU accounting of this process
//! and of the server under test (`/proc/PID/stat`, `/proc/PID/status`, or its `/stats` endpoint).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::Error;

/// Nanoseconds on `CLOCK_MONOTONIC`: comparable between processes on one machine, which is what lets a
/// publisher's timestamp be compared with a subscriber's clock in another worker process.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Parses a CPU list such as `1`, `0,2` or `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, Error> {
    let bad = || Error::Config(format!("bad CPU list {s:?} (expected e.g. 1 or 0-3,6)"));
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b >= libc::CPU_SETSIZE as usize {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => {
                let c: usize = part.parse().map_err(|_| bad())?;
                if c >= libc::CPU_SETSIZE as usize {
                    return Err(bad());
                }
                cpus.push(c);
            }
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Pins the calling process (and the threads and processes it starts afterwards) to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> Result<(), Error> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `c` was checked to be below CPU_SETSIZE by `parse_cpu_list`; `set` is a valid set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::Io("sched_setaffinity", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// How many CPUs the calling thread may run on.
pub fn affinity_count() -> usize {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is writable and of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    // SAFETY: `set` was filled in by sched_getaffinity.
    let n = unsafe { libc::CPU_COUNT(&set) };
    (n as usize).max(1)
}

/// Raises the soft open-file limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `want` is a valid rlimit not above the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// CPU time (user + system) used so far by this process, all threads included, in nanoseconds.
pub fn self_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time used so far by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Asks the kernel to kill this process when its parent dies (worker processes), and checks the parent is
/// not already gone.
pub fn die_with_parent(parent: libc::pid_t) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers are involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        std::process::exit(3);
    }
}

/// The PID of the calling process's parent.
pub fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() }
}

/// The PID of the calling process.
pub fn own_pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// One reading of a server's resource use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerSample {
    /// User + system CPU time in nanoseconds (all threads), when read from `/proc`.
    pub cpu_ns: Option<u64>,
    /// Resident set size in bytes.
    pub rss_bytes: Option<u64>,
}

/// Reads CPU time and RSS of process `pid` from `/proc`.
pub fn proc_sample(pid: u32) -> ServerSample {
    ServerSample { cpu_ns: proc_cpu_ns(pid), rss_bytes: proc_rss_bytes(pid) }
}

/// CPU time and RSS of several processes (a proxy's master and workers), summed: `None` in a field when any
/// process could not be read (gone), so a sum is never silently partial. RSS counts pages shared between the
/// processes once per process; differences between two readings are what to compare.
pub fn procs_sample(pids: &[u32]) -> ServerSample {
    if pids.is_empty() {
        return ServerSample::default();
    }
    let mut sum = ServerSample { cpu_ns: Some(0), rss_bytes: Some(0) };
    for &pid in pids {
        let s = proc_sample(pid);
        sum.cpu_ns = sum.cpu_ns.zip(s.cpu_ns).map(|(a, b)| a + b);
        sum.rss_bytes = sum.rss_bytes.zip(s.rss_bytes).map(|(a, b)| a + b);
    }
    sum
}

/// The name of Throng's Redis relay thread(s) (`--redis`): their CPU is reported apart, per node.
pub const RELAY_THREAD: &str = "throng-relay";

/// CPU time of the threads of one process that bear one name, each apart: `(thread id, CPU ns)`, by thread
/// id. Empty when the process has no such thread (or is gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadsSample {
    /// `(tid, CPU ns)` of each thread found, in thread-id order.
    pub threads: Vec<(u32, u64)>,
}

impl ThreadsSample {
    /// CPU used since `earlier` by the threads of this reading: a thread that was already there counts its
    /// growth, a thread started since counts all its time (it was all spent since); a thread gone since
    /// takes its time with it.
    pub fn cpu_since(&self, earlier: &ThreadsSample) -> u64 {
        self.threads
            .iter()
            .map(|&(tid, ns)| match earlier.threads.iter().find(|(t, _)| *t == tid) {
                Some(&(_, before)) => ns.saturating_sub(before),
                None => ns,
            })
            .sum()
    }
}

/// The CPU time of every thread of `pid` named `name` (its `/proc/PID/task/TID/comm`): from the thread's
/// `schedstat` (nanoseconds), or its `stat` utime + stime (clock ticks) where the kernel keeps no schedstats.
pub fn named_threads_sample(pid: u32, name: &str) -> ThreadsSample {
    let mut threads = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return ThreadsSample::default() };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else { continue };
        if comm.trim_end_matches('\n') != name {
            continue;
        }
        let path = task.path();
        let cpu = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .or_else(|| stat_file_cpu_ns(&path.join("stat")));
        if let Some(ns) = cpu {
            threads.push((tid, ns));
        }
    }
    threads.sort_unstable();
    ThreadsSample { threads }
}

fn proc_cpu_ns(pid: u32) -> Option<u64> {
    schedstat_cpu_ns(pid).or_else(|| stat_cpu_ns(pid))
}

/// CPU time of every thread of `pid` from `/proc/PID/task/TID/schedstat` (nanoseconds, where the kernel
/// keeps schedstats), so a short ramp is not rounded to clock ticks.
fn schedstat_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread that exits between the listing and the read takes its time with it: the process's
        // stat fallback would not have it either.
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn stat_cpu_ns(pid: u32) -> Option<u64> {
    stat_file_cpu_ns(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime of a `/proc/PID/stat` or `/proc/PID/task/TID/stat` file, in nanoseconds.
fn stat_file_cpu_ns(path: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after the closing parenthesis are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as u64 } else { 100 };
    Some((utime + stime) * 1_000_000_000 / tck)
}

fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Fetches `GET /stats` from the server and returns its `rss_bytes` field, if it has one (Throng does).
pub fn stats_rss_bytes(addr: SocketAddr, host: &str) -> Option<u64> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET /stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = Vec::new();
    s.take(1 << 20).read_to_end(&mut body).ok()?;
    let head_end = memchr::memmem::find(&body, b"\r\n\r\n")?;
    if !body.starts_with(b"HTTP/1.1 200") && !body.starts_with(b"HTTP/1.0 200") {
        return None;
    }
    let json = &body[head_end + 4..];
    let at = memchr::memmem::find(json, b"\"rss_bytes\":")? + b"\"rss_bytes\":".len();
    let digits: Vec<u8> =
        json[at..].iter().copied().skip_while(|b| *b == b' ').take_while(u8::is_ascii_digit).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn own_process_sample() {
        let s = proc_sample(std::process::id());
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(s.cpu_ns.is_some());
        assert!(now_ns() > 0);
    }

    #[test]
    fn named_threads() {
        // A thread named like the relay, and one named otherwise; both wait (no CPU taken from the tests
        // running beside this one) until told to end.
        let start = |name: &str| {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let h = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    // SAFETY: gettid has no arguments and cannot fail.
                    tid_tx.send(unsafe { libc::syscall(libc::SYS_gettid) } as u32).unwrap();
                    let _ = stop_rx.recv();
                })
                .unwrap();
            (h, tid_rx.recv().unwrap(), stop_tx)
        };
        let me = std::process::id();
        let before = named_threads_sample(me, RELAY_THREAD);
        let (relay, relay_tid, stop_relay) = start(RELAY_THREAD);
        let (other, _, stop_other) = start("throng-other");
        let during = named_threads_sample(me, RELAY_THREAD);
        drop((stop_relay, stop_other));
        relay.join().unwrap();
        other.join().unwrap();
        assert!(before.threads.iter().all(|(t, _)| *t != relay_tid), "{before:?}");
        assert_eq!(during.threads.iter().map(|t| t.0).collect::<Vec<_>>(), vec![relay_tid], "{during:?}");
        // Started after `before`: all its time counts.
        assert_eq!(during.cpu_since(&before), during.threads[0].1);
        // No such thread, no such process: empty.
        assert!(named_threads_sample(me, "no-such-thread").threads.is_empty());
        assert!(named_threads_sample(0, RELAY_THREAD).threads.is_empty());
    }

    #[test]
    fn threads_cpu_since() {
        let a = ThreadsSample { threads: vec![(1, 100), (2, 50)] };
        let b = ThreadsSample { threads: vec![(1, 130), (3, 20)] };
        // Thread 1 grew by 30; thread 3 is new (20); thread 2 is gone (its time with it).
        assert_eq!(b.cpu_since(&a), 50);
        assert_eq!(b.cpu_since(&ThreadsSample::default()), 150);
        assert_eq!(ThreadsSample::default().cpu_since(&a), 0);
    }

    #[test]
    fn summed_samples() {
        let me = std::process::id();
        assert_eq!(procs_sample(&[]), ServerSample::default());
        let one = procs_sample(&[me]);
        assert!(one.rss_bytes.unwrap() > 0 && one.cpu_ns.is_some());
        // PID 0 has no /proc entry: the sum is missing, not partial.
        assert_eq!(procs_sample(&[me, 0]), ServerSample::default());
    }
}
