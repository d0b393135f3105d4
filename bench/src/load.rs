//! The bench's own load, per event-loop thread, sampled every [`SAMPLE_NS`] during the window.
//!
//! An average over the window hides a thread that is saturated in bursts (a 15k fan-out where reading one
//! message from every socket takes 65 ms shows 64% on average, yet sends and reads fall behind in every
//! burst). So each thread's busy time is read in short intervals: CPU time from its thread CPU clock
//! (`pthread_getcpuclockid`, exact) plus the time it waited for a CPU while runnable (`run_delay` in
//! `/proc/self/task/TID/schedstat`, when the kernel has it). An interval in which a thread was busy at least
//! [`SATURATED`] of the time is a saturated interval; the run is client-limited when the busiest thread was
//! saturated in at least [`SIGNIFICANT`] of its intervals.

use serde::{Deserialize, Serialize};

use crate::sys::now_ns;

/// Sampling interval.
pub const SAMPLE_NS: u64 = 20_000_000;
/// Busy share of an interval from which a thread counts as saturated in it.
pub const SATURATED: f64 = 0.9;
/// Share of saturated intervals from which the run is flagged as client-limited.
pub const SIGNIFICANT: f64 = 0.1;

/// One thread's load over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThreadLoad {
    /// Intervals sampled.
    pub intervals: u64,
    /// Intervals in which the thread was busy at least [`SATURATED`] of the time.
    pub saturated: u64,
    /// Busy nanoseconds (on a CPU or waiting for one) over the sampled intervals.
    pub busy_ns: u64,
    /// Wall-clock nanoseconds of the sampled intervals.
    pub wall_ns: u64,
}

impl ThreadLoad {
    /// Share of intervals in which the thread was saturated (0 without samples).
    pub fn saturated_share(&self) -> f64 {
        if self.intervals == 0 {
            0.0
        } else {
            self.saturated as f64 / self.intervals as f64
        }
    }

    /// Average busy share over the sampled intervals.
    pub fn busy(&self) -> f64 {
        if self.wall_ns == 0 {
            0.0
        } else {
            self.busy_ns as f64 / self.wall_ns as f64
        }
    }
}

/// How to read a thread's busy time: its CPU clock and its kernel thread id.
#[derive(Clone, Copy, Debug)]
pub struct ThreadHandle {
    clock: Option<libc::clockid_t>,
    tid: i64,
}

impl ThreadHandle {
    /// The calling thread.
    pub fn current() -> Self {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: `me` is the calling thread, alive for the call; `clock` is a writable clockid_t.
        let rc = unsafe { libc::pthread_getcpuclockid(me, &mut clock) };
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        Self { clock: (rc == 0).then_some(clock), tid }
    }

    /// CPU time plus run-queue wait so far, nanoseconds; `None` once the thread is gone.
    fn busy_ns(&self) -> Option<u64> {
        let cpu = match self.clock {
            Some(clock) => {
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: `ts` is a valid, writable timespec; a stale clock id makes the call fail, not crash.
                if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
                    return None;
                }
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
            }
            None => self.schedstat()?.0,
        };
        Some(cpu + self.schedstat().map_or(0, |s| s.1))
    }

    /// `(on-CPU ns, run-queue wait ns)` from `/proc/self/task/TID/schedstat`.
    fn schedstat(&self) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", self.tid)).ok()?;
        let mut f = s.split_whitespace().map(|v| v.parse::<u64>().ok());
        Some((f.next()??, f.next()??))
    }
}

/// Samples a set of threads every [`SAMPLE_NS`].
#[derive(Debug)]
pub struct Sampler {
    threads: Vec<ThreadHandle>,
    last: Vec<Option<u64>>,
    last_t: u64,
    loads: Vec<ThreadLoad>,
}

impl Sampler {
    /// Starts sampling `threads` now.
    pub fn start(threads: Vec<ThreadHandle>) -> Self {
        let last = threads.iter().map(ThreadHandle::busy_ns).collect();
        let loads = vec![ThreadLoad::default(); threads.len()];
        Self { threads, last, last_t: now_ns(), loads }
    }

    /// When the next sample is due.
    pub fn due(&self) -> u64 {
        self.last_t + SAMPLE_NS
    }

    /// Takes a sample if one is due at `now`.
    pub fn tick(&mut self, now: u64) {
        if now < self.due() {
            return;
        }
        let wall = now - self.last_t;
        self.last_t = now;
        for ((t, last), load) in self.threads.iter().zip(&mut self.last).zip(&mut self.loads) {
            let cur = t.busy_ns();
            if let (Some(a), Some(b)) = (*last, cur) {
                let busy = b.saturating_sub(a).min(wall);
                load.intervals += 1;
                load.busy_ns += busy;
                load.wall_ns += wall;
                if busy as f64 >= SATURATED * wall as f64 {
                    load.saturated += 1;
                }
            }
            *last = cur;
        }
    }

    /// The loads measured.
    pub fn finish(self) -> Vec<ThreadLoad> {
        self.loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_is_saturated_and_a_sleeping_one_is_not() {
        let (tx, rx) = std::sync::mpsc::channel();
        let spinner = std::thread::spawn(move || {
            tx.send(ThreadHandle::current()).unwrap();
            let t0 = now_ns();
            while now_ns() < t0 + 400_000_000 {
                std::hint::spin_loop();
            }
        });
        let h = rx.recv().unwrap();
        // The sleeper sleeps through the whole window: no wake-ups, so no run-queue waits even on a busy
        // machine (the sampling thread itself wakes every 5 ms and may wait for a CPU each time).
        let (tx, rx) = std::sync::mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            tx.send(ThreadHandle::current()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(400));
        });
        let mut sm = Sampler::start(vec![h, rx.recv().unwrap()]);
        let t0 = now_ns();
        while now_ns() < t0 + 300_000_000 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            sm.tick(now_ns());
        }
        spinner.join().unwrap();
        sleeper.join().unwrap();
        let loads = sm.finish();
        assert!(loads[0].intervals >= 10, "{loads:?}");
        // Spinning: on a CPU or waiting for one all the time.
        assert!(loads[0].saturated_share() > 0.8, "{loads:?}");
        assert!(loads[1].saturated_share() < 0.2, "{loads:?}");
    }

    #[test]
    fn shares() {
        let l = ThreadLoad { intervals: 10, saturated: 3, busy_ns: 5, wall_ns: 10 };
        assert!((l.saturated_share() - 0.3).abs() < 1e-9);
        assert!((l.busy() - 0.5).abs() < 1e-9);
        assert_eq!(ThreadLoad::default().saturated_share(), 0.0);
        let h = ThreadHandle::current();
        assert!(h.busy_ns().is_some());
    }
}
