//! Running a plan: threads in this process, or worker processes of this executable, started together.
//!
//! Timeline, the same for one process or many: every thread mints its connections' tokens (when the run
//! has a JWT key) and waits; once all have, the coordinator starts the ramp (so no thread signs while
//! another connects); every thread ramps up its connections and reports ready; the coordinator samples the
//! server, picks a start time a little in the future and hands it to every thread (through [`Control`]
//! in-process, or as a `GO <ns>` line on each worker's stdin); each thread runs the window and the grace
//! period by the monotonic clock, which all processes share, then stops by itself.
//!
//! Worker protocol. Worker to parent (stdout, one line each): `MINTED` when its threads have their tokens,
//! `READY <connections open>`, `PROGRESS <open> <failed> <sent> <received> <churned>` once a second, then
//! `RESULT <tally JSON>`, or `FAIL <reason>`. Parent to worker (stdin): `RAMP` once every worker has minted,
//! then `GO <start ns>`, or `STOP` when no connection anywhere was ready (the worker then reports at once).
//! Workers die with their parent (`PR_SET_PDEATHSIG`), and the parent kills its workers (by PID) when it
//! gives up on them.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cli::{split, Plan, Scenario, Target};
use crate::client::{run_thread, Control, ThreadSpec};
use crate::error::Error;
use crate::load::Sampler;
use crate::report::{Points, Report, Samples};
use crate::sys::{self, now_ns, ServerSample};
use crate::tally::Tally;

/// How to start worker processes (`--procs` > 1): the executable and the arguments it was given.
#[derive(Clone, Debug, Default)]
pub struct WorkerCommand {
    /// The `throng-bench` executable (usually `std::env::current_exe()`).
    pub exe: PathBuf,
    /// The arguments of this run, without the program name; `--worker K/P` is appended per worker.
    pub args: Vec<OsString>,
}

/// Live totals for the progress line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    open: u64,
    failed: u64,
    sent: u64,
    received: u64,
    churned: u64,
}

impl Snapshot {
    fn add(&mut self, o: &Snapshot) {
        self.open += o.open;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
        self.churned += o.churned;
    }
}

/// The thread specs of process `k` of `procs`.
pub fn thread_specs(plan: &Plan, k: u32, procs: u32, fd_budget: u64) -> Vec<ThreadSpec> {
    let (plo, phi) = split(plan.total, u64::from(procs), u64::from(k));
    let threads = plan.threads;
    let all_threads = u64::from(procs) * u64::from(threads);
    let total = plan.total.max(1) as f64;
    // Churn connections this process may hold open at once, shared by its threads.
    let churn_fds = fd_budget.saturating_sub(phi - plo + 64).max(u64::from(threads));
    // Rooms: a thread's share of its run's members (its moves and reconnects are in proportion).
    let members = |lo: u64, hi: u64| (lo..hi.min(plan.receivers)).count() as f64 / plan.receivers.max(1) as f64;
    (0..threads)
        .map(|t| {
            let (a, b) = split(phi - plo, u64::from(threads), u64::from(t));
            let (lo, hi) = (plo + a, plo + b);
            let share = (hi - lo) as f64 / total;
            let rate = match plan.scenario {
                Scenario::Broadcast | Scenario::Churn | Scenario::Rooms => {
                    let pubs = (lo..hi).filter(|&i| plan.publisher_id(i).is_some()).count() as f64;
                    plan.rate.map(|r| r * pubs / plan.publishers.max(1) as f64)
                }
                _ => plan.rate.map(|r| r * share),
            };
            ThreadSpec {
                lo,
                hi,
                rate,
                ramp_rate: (plan.ramp_rate * share).max(1e-3),
                max_pending: ((plan.max_pending as f64 * share).ceil() as usize).max(1),
                churn_rate: plan.churn_rate / all_threads as f64,
                churn_cap: (churn_fds / u64::from(threads)).max(1) as usize,
                churn_base: plan.total + u64::from(k) * u64::from(threads) + u64::from(t),
                churn_step: all_threads,
                // Rooms: a thread moves its own members, in proportion to them.
                moves_rate: plan.rooms.as_ref().map_or(0.0, |r| r.moves_per_s * members(lo, hi)),
                reconnect_rate: plan.rooms.as_ref().map_or(0.0, |r| r.reconnects_per_s * members(lo, hi)),
            }
        })
        .collect()
}

/// This process's threads.
struct Local {
    ctl: Arc<Control>,
    handles: Vec<JoinHandle<Result<Tally, Error>>>,
}

impl Local {
    fn start(plan: &Plan, k: u32, procs: u32) -> Result<Self, Error> {
        let nofile = sys::raise_nofile();
        let (lo, hi) = split(plan.total, u64::from(procs), u64::from(k));
        if hi - lo + 32 > nofile {
            return Err(Error::Config(format!(
                "{} connections in one process exceed its open-file limit ({nofile}); use --procs {}",
                hi - lo,
                (plan.total / nofile.saturating_sub(100).max(1)) + 1
            )));
        }
        let ctl = Arc::new(Control::default());
        let plan = Arc::new(plan.clone());
        let mut handles = Vec::new();
        for (t, spec) in thread_specs(&plan, k, procs, nofile).into_iter().enumerate() {
            let (plan, ctl) = (Arc::clone(&plan), Arc::clone(&ctl));
            let h = std::thread::Builder::new()
                .name(format!("bench-{k}-{t}"))
                .spawn(move || run_thread(&plan, &spec, &ctl))
                .map_err(|e| Error::Io("spawn thread", e))?;
            handles.push(h);
        }
        Ok(Self { ctl, handles })
    }

    fn all_minted(&self) -> bool {
        self.ctl.minted.load(Relaxed) as usize >= self.handles.len()
    }

    fn all_ready(&self) -> bool {
        self.ctl.ready.load(Relaxed) as usize >= self.handles.len()
    }

    fn snapshot(&self) -> Snapshot {
        let p = &self.ctl.progress;
        Snapshot {
            open: p.open.load(Relaxed),
            failed: p.failed.load(Relaxed),
            sent: p.sent.load(Relaxed),
            received: p.received.load(Relaxed),
            churned: p.churned.load(Relaxed),
        }
    }

    fn join(self) -> Result<Tally, Error> {
        let mut total = Tally::default();
        let mut first_err = None;
        for h in self.handles {
            match h.join() {
                Ok(Ok(t)) => total.merge(&t),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(Error::Config("a client thread panicked".into()))),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

#[derive(Debug, Default)]
struct WorkerState {
    minted: bool,
    ready: bool,
    progress: Snapshot,
    result: Option<Tally>,
    failure: Option<String>,
    exited: bool,
}

/// Worker processes.
struct Procs {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    state: Arc<Mutex<Vec<WorkerState>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Procs {
    fn start(plan: &Plan, cmd: &WorkerCommand) -> Result<Self, Error> {
        let p = plan.procs;
        let state = Arc::new(Mutex::new((0..p).map(|_| WorkerState::default()).collect::<Vec<_>>()));
        let mut me = Self { children: Vec::new(), stdins: Vec::new(), state, readers: Vec::new() };
        for k in 0..p {
            let mut child = Command::new(&cmd.exe)
                .args(&cmd.args)
                .arg("--worker")
                .arg(format!("{k}/{p}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| Error::Io("spawn worker", e))?;
            let stdout = child.stdout.take().ok_or_else(|| Error::Worker(k as usize, "no stdout".into()))?;
            let stdin = child.stdin.take().ok_or_else(|| Error::Worker(k as usize, "no stdin".into()))?;
            me.children.push(child);
            me.stdins.push(stdin);
            let state = Arc::clone(&me.state);
            let k = k as usize;
            me.readers.push(std::thread::spawn(move || read_worker(k, stdout, &state)));
        }
        Ok(me)
    }

    fn with_state<R>(&self, f: impl FnOnce(&[WorkerState]) -> R) -> R {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    /// Ok(true) when all have minted their tokens; an error when one failed or exited early.
    fn all_minted(&self) -> Result<bool, Error> {
        self.with_state(|s| {
            for (k, w) in s.iter().enumerate() {
                if let Some(f) = &w.failure {
                    return Err(Error::Worker(k, f.clone()));
                }
                if w.exited && !w.minted {
                    return Err(Error::Worker(k, "exited before it had minted its tokens".into()));
                }
            }
            Ok(s.iter().all(|w| w.minted))
        })
    }

    /// Starts every worker's ramp.
    fn ramp(&mut self) -> Result<(), Error> {
        for (k, stdin) in self.stdins.iter_mut().enumerate() {
            writeln!(stdin, "RAMP").and_then(|()| stdin.flush()).map_err(|e| Error::Worker(k, e.to_string()))?;
        }
        Ok(())
    }

    /// Ok(true) when all are ready; an error when one failed or exited early.
    fn all_ready(&self) -> Result<bool, Error> {
        self.with_state(|s| {
            for (k, w) in s.iter().enumerate() {
                if let Some(f) = &w.failure {
                    return Err(Error::Worker(k, f.clone()));
                }
                if w.exited && !w.ready {
                    return Err(Error::Worker(k, "exited before it was ready".into()));
                }
            }
            Ok(s.iter().all(|w| w.ready))
        })
    }

    fn go(&mut self, go_ns: u64) -> Result<(), Error> {
        for (k, stdin) in self.stdins.iter_mut().enumerate() {
            writeln!(stdin, "GO {go_ns}").and_then(|()| stdin.flush()).map_err(|e| Error::Worker(k, e.to_string()))?;
        }
        Ok(())
    }

    /// Tells every worker to stop without a window (and still report).
    fn stop(&mut self) -> Result<(), Error> {
        for (k, stdin) in self.stdins.iter_mut().enumerate() {
            writeln!(stdin, "STOP").and_then(|()| stdin.flush()).map_err(|e| Error::Worker(k, e.to_string()))?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        self.with_state(|s| {
            let mut t = Snapshot::default();
            for w in s {
                t.add(&w.progress);
            }
            t
        })
    }

    fn join(self, deadline: u64) -> Result<Tally, Error> {
        loop {
            let done = self.with_state(|s| s.iter().all(|w| w.exited || w.result.is_some() || w.failure.is_some()));
            if done || now_ns() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut total = Tally::default();
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        for (k, w) in state.into_iter().enumerate() {
            match (w.result, w.failure) {
                (Some(t), _) => total.merge(&t),
                (None, Some(f)) => return Err(Error::Worker(k, f)),
                (None, None) => return Err(Error::Worker(k, "no result before the deadline".into())),
            }
        }
        Ok(total)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stdins.clear();
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

fn read_worker(k: usize, stdout: std::process::ChildStdout, state: &Mutex<Vec<WorkerState>>) {
    let reader = BufReader::new(stdout);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        // Empty once the parent has taken the results (`Procs::join`): nothing left to record.
        let Some(w) = s.get_mut(k) else { break };
        if line == "MINTED" {
            w.minted = true;
        } else if let Some(open) = line.strip_prefix("READY") {
            w.ready = true;
            w.progress.open = open.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("PROGRESS ") {
            let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
            if let [open, failed, sent, received, churned] = v[..] {
                w.progress = Snapshot { open, failed, sent, received, churned };
            }
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            match serde_json::from_str(json) {
                Ok(t) => w.result = Some(t),
                Err(e) => w.failure = Some(format!("unreadable result: {e}")),
            }
        } else if let Some(f) = line.strip_prefix("FAIL ") {
            w.failure = Some(f.to_string());
        }
    }
    if let Some(w) = state.lock().unwrap_or_else(|e| e.into_inner()).get_mut(k) {
        w.exited = true;
    }
}

enum Fleet {
    Local(Local),
    Procs(Procs),
}

impl Fleet {
    fn all_minted(&self) -> Result<bool, Error> {
        match self {
            Fleet::Local(l) => Ok(l.all_minted()),
            Fleet::Procs(p) => p.all_minted(),
        }
    }

    /// Every thread has its tokens: the connect ramp starts.
    fn ramp(&mut self) -> Result<(), Error> {
        match self {
            Fleet::Local(l) => {
                l.ctl.ramp.store(true, Relaxed);
                Ok(())
            }
            Fleet::Procs(p) => p.ramp(),
        }
    }

    fn all_ready(&self) -> Result<bool, Error> {
        match self {
            Fleet::Local(l) => Ok(l.all_ready()),
            Fleet::Procs(p) => p.all_ready(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        match self {
            Fleet::Local(l) => l.snapshot(),
            Fleet::Procs(p) => p.snapshot(),
        }
    }
}

fn sleep_until(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// Samples the server: `/proc` when its PID is known (several: summed), else its `/stats` (RSS only) when it
/// has one (several `--url`: every node's, summed, or none).
fn sample_server(plan: &Plan, use_stats: &mut bool) -> ServerSample {
    if !plan.server_pids.is_empty() {
        return sys::procs_sample(&plan.server_pids);
    }
    if !*use_stats || plan.url.tls {
        // (Not over TLS: `/stats` is fetched in plain HTTP.)
        return ServerSample::default();
    }
    let rss = plan.urls.iter().map(|u| sys::stats_rss_bytes(u.addr, &u.host)).sum::<Option<u64>>();
    *use_stats = rss.is_some();
    ServerSample { cpu_ns: None, rss_bytes: rss }
}

/// One of the coordinator's sample points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    Before,
    Go,
    WindowEnd,
    End,
}

/// Reads, right after the server's sum and the proxy, each server PID apart (several: the server's sum at
/// this point is then replaced by the sum of these readings), their relay threads (at the start of the
/// window and at the end of the grace period) and Redis.
fn sample_more(plan: &Plan, samples: &mut Samples, point: Point) {
    fn at(p: &mut Points, point: Point) -> &mut ServerSample {
        match point {
            Point::Before => &mut p.before,
            Point::Go => &mut p.at_go,
            Point::WindowEnd => &mut p.at_window_end,
            Point::End => &mut p.at_end,
        }
    }
    samples.nodes.resize(plan.server_pids.len(), Points::default());
    let sum = match point {
        Point::Before => &mut samples.before,
        Point::Go => &mut samples.at_go,
        Point::WindowEnd => &mut samples.at_window_end,
        Point::End => &mut samples.at_end,
    };
    if let [_] = plan.server_pids[..] {
        // One node: its reading is the sum's.
        *at(&mut samples.nodes[0], point) = *sum;
    } else if !plan.server_pids.is_empty() {
        let mut total = ServerSample { cpu_ns: Some(0), rss_bytes: Some(0) };
        for (p, &pid) in samples.nodes.iter_mut().zip(&plan.server_pids) {
            let one = sys::proc_sample(pid);
            *at(p, point) = one;
            total.cpu_ns = total.cpu_ns.zip(one.cpu_ns).map(|(a, b)| a + b);
            total.rss_bytes = total.rss_bytes.zip(one.rss_bytes).map(|(a, b)| a + b);
        }
        // The sum of these readings, so the nodes add up to the server figures exactly.
        *sum = total;
    }
    let relays = || plan.server_pids.iter().map(|&pid| sys::named_threads_sample(pid, sys::RELAY_THREAD)).collect();
    match point {
        Point::Go => samples.relay_at_go = relays(),
        Point::End => samples.relay_at_end = relays(),
        Point::Before | Point::WindowEnd => {}
    }
    if !plan.redis_pids.is_empty() {
        *at(&mut samples.redis, point) = sys::procs_sample(&plan.redis_pids);
    }
}

/// Writes the live progress line (a terminal only).
fn progress_line(phase: &str, s: &Snapshot, prev: &Snapshot, dt_s: f64) {
    let per_s = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt_s.max(1e-9);
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "\r\x1b[2K{phase:>10}  open {:>7}  failed {:>5}  sent {:>9.0}/s  recv {:>10.0}/s  churn {:>6.0}/s",
        s.open,
        s.failed,
        per_s(s.sent, prev.sent),
        per_s(s.received, prev.received),
        per_s(s.churned, prev.churned),
    );
    let _ = out.flush();
}

/// Runs `plan` to the end and reports. With `plan.procs > 1` it starts `worker` processes.
pub fn run(plan: &Plan, worker: &WorkerCommand) -> Result<Report, Error> {
    if let Some(cpus) = &plan.cpus {
        sys::set_affinity(cpus)?;
    }
    let cores = sys::affinity_count();
    let tty = !plan.json && std::io::stdout().is_terminal();
    let mut use_stats = true;
    for (flag, pids) in
        [("--server-pid", &plan.server_pids), ("--proxy-pid", &plan.proxy_pids), ("--redis-pid", &plan.redis_pids)]
    {
        for &pid in pids {
            if sys::proc_sample(pid).cpu_ns.is_none() {
                return Err(Error::Config(format!("{flag} {pid}: no such process (nothing in /proc/{pid})")));
            }
        }
    }
    // The proxy (and each node, and Redis) is sampled right after the server at every point, so all cover
    // the same span.
    let mut samples = Samples { before: sample_server(plan, &mut use_stats), ..Samples::default() };
    samples.proxy_before = sys::procs_sample(&plan.proxy_pids);
    sample_more(plan, &mut samples, Point::Before);
    let spawned = now_ns();
    let mut fleet = if plan.procs > 1 {
        Fleet::Procs(Procs::start(plan, worker)?)
    } else {
        Fleet::Local(Local::start(plan, 0, 1)?)
    };
    // Tokens first, in every thread; the ramp (and its clock) starts when all have theirs. Minting is
    // finite CPU work (about half a millisecond per RS256 token): this only guards against a hang.
    let mint_deadline = spawned + 600_000_000_000 + plan.total * 10_000_000;
    let mut last_line = spawned;
    while !fleet.all_minted()? {
        let now = now_ns();
        if now > mint_deadline {
            return Err(Error::Config("tokens were not minted before the deadline".into()));
        }
        if tty && now - last_line >= 1_000_000_000 {
            progress_line("minting", &Snapshot::default(), &Snapshot::default(), 1.0);
            last_line = now;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let start = now_ns();
    fleet.ramp()?;
    // Every connection resolves (ready, failed or timed out) by itself; this only guards against a hang.
    let per_proc = plan.total / u64::from(plan.procs) + 1;
    let ramp_ns = (per_proc as f64 * u64::from(plan.procs) as f64 / plan.ramp_rate * 1e9) as u64;
    let ready_deadline = start + ramp_ns + 2 * plan.connect_timeout_ns + 60_000_000_000;
    let mut prev = Snapshot::default();
    let mut last_line = start;
    loop {
        if fleet.all_ready()? {
            break;
        }
        let now = now_ns();
        if now > ready_deadline {
            return Err(Error::Config("connections were not ready before the deadline".into()));
        }
        if tty && now - last_line >= 1_000_000_000 {
            let s = fleet.snapshot();
            progress_line("connecting", &s, &prev, (now - last_line) as f64 / 1e9);
            prev = s;
            last_line = now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if matches!(&fleet, Fleet::Local(l) if l.ctl.abort.load(Relaxed)) {
        if let Fleet::Local(l) = fleet {
            l.join()?;
        }
        return Err(Error::Config("a client thread stopped early".into()));
    }
    let connected = now_ns();
    samples.connect_s = (connected - start) as f64 / 1e9;
    if fleet.snapshot().open == 0 {
        // Nothing to measure (the server refused everything, say): report the failures now.
        let tally = match fleet {
            Fleet::Local(l) => {
                l.ctl.abort.store(true, Relaxed);
                l.join()?
            }
            Fleet::Procs(mut p) => {
                p.stop()?;
                p.join(now_ns() + 30_000_000_000)?
            }
        };
        samples.server_source = "none";
        let mut report = Report::build(plan, tally, &samples, cores);
        // After the TLS failure that explains it, if that was it.
        let at = usize::from(report.tls.as_ref().is_some_and(|t| t.first_error.is_some()));
        report.warnings.insert(at, "no connection was ready: the window was skipped".into());
        return Ok(report);
    }
    // Raw servers register a connection when their upgrade completes; give the last ones a moment.
    let settle = if plan.target == Target::Raw && plan.scenario != Scenario::Echo { 200 } else { 50 };
    let go = connected + settle * 1_000_000;
    match &mut fleet {
        Fleet::Local(l) => l.ctl.go_ns.store(go, Relaxed),
        Fleet::Procs(p) => p.go(go)?,
    }
    sleep_until(go);
    // CPU readings come from /proc only; /stats (RSS) is read before and at the end of the window.
    let cpu_sample = |plan: &Plan| sys::procs_sample(&plan.server_pids);
    samples.at_go = cpu_sample(plan);
    samples.proxy_at_go = sys::procs_sample(&plan.proxy_pids);
    sample_more(plan, &mut samples, Point::Go);
    samples.windowed = true;
    let cpu_go = sys::self_cpu_ns();
    let window_end = go + plan.duration_ns;
    let end = window_end + plan.grace_ns;
    // In-process threads are sampled here; worker processes sample their own.
    let mut sampler = match &fleet {
        Fleet::Local(l) => Some(Sampler::start(l.ctl.thread_handles())),
        Fleet::Procs(_) => None,
    };
    let mut prev = fleet.snapshot();
    let mut last_line = go;
    loop {
        let now = now_ns();
        if let Some(s) = &mut sampler {
            s.tick(now);
        }
        if now >= window_end {
            break;
        }
        if tty && now - last_line >= 1_000_000_000 {
            let s = fleet.snapshot();
            progress_line("running", &s, &prev, (now - last_line) as f64 / 1e9);
            prev = s;
            last_line = now;
        }
        let wake = sampler.as_ref().map_or(now + 20_000_000, Sampler::due);
        sleep_until(wake.min(window_end));
    }
    samples.at_window_end = sample_server(plan, &mut use_stats);
    samples.proxy_at_window_end = sys::procs_sample(&plan.proxy_pids);
    sample_more(plan, &mut samples, Point::WindowEnd);
    let cpu_window = sys::self_cpu_ns() - cpu_go;
    // Sample just before the threads close their sockets.
    sleep_until(end.saturating_sub(5_000_000));
    samples.at_end = cpu_sample(plan);
    samples.proxy_at_end = sys::procs_sample(&plan.proxy_pids);
    sample_more(plan, &mut samples, Point::End);
    let cpu_total = sys::self_cpu_ns() - cpu_go;
    if tty {
        print!("\r\x1b[2K");
        let _ = std::io::stdout().flush();
    }
    let mut tally = match fleet {
        Fleet::Local(l) => l.join()?,
        Fleet::Procs(p) => p.join(end + 30_000_000_000)?,
    };
    if let Some(s) = sampler {
        tally.threads.extend(s.finish());
    }
    // In-process: this process's CPU is the client's; with workers: theirs plus this coordinator's.
    tally.cpu_window_ns += cpu_window;
    tally.cpu_total_ns += cpu_total;
    samples.server_source = if !plan.server_pids.is_empty() {
        "proc"
    } else if samples.before.rss_bytes.is_some() {
        "stats"
    } else {
        "none"
    };
    Ok(Report::build(plan, tally, &samples, cores))
}

/// The worker side of `--procs`: runs this process's share, speaking the worker protocol on stdio.
pub fn worker_main(plan: &Plan) -> Result<(), Error> {
    let Some((k, p)) = plan.worker else { return Err(Error::Config("not a worker".into())) };
    sys::die_with_parent(sys::parent_pid());
    let fail = |msg: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "FAIL {}", msg.replace('\n', " "));
        let _ = out.flush();
    };
    let local = match Local::start(plan, k, p) {
        Ok(l) => l,
        Err(e) => {
            fail(e.to_string());
            return Err(e);
        }
    };
    while !local.all_minted() {
        std::thread::sleep(Duration::from_micros(500));
    }
    if local.ctl.abort.load(Relaxed) {
        let e = local.join().err().map_or_else(|| "a client thread stopped early".to_string(), |e| e.to_string());
        fail(e.clone());
        return Err(Error::Worker(k as usize, e));
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "MINTED");
        let _ = out.flush();
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if !matches!(read, Ok(n) if n > 0 && line.trim() == "RAMP") {
        local.ctl.abort.store(true, Relaxed);
        let _ = local.join();
        return Err(Error::Worker(k as usize, "no RAMP from the parent".into()));
    }
    local.ctl.ramp.store(true, Relaxed);
    while !local.all_ready() {
        std::thread::sleep(Duration::from_millis(5));
    }
    if local.ctl.abort.load(Relaxed) {
        let e = local.join().err().map_or_else(|| "a client thread stopped early".to_string(), |e| e.to_string());
        fail(e.clone());
        return Err(Error::Worker(k as usize, e));
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {}", local.snapshot().open);
        let _ = out.flush();
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    let go = match read {
        Ok(n) if n > 0 => line.trim().strip_prefix("GO ").and_then(|v| v.parse::<u64>().ok()),
        _ => None,
    };
    let Some(go) = go else {
        local.ctl.abort.store(true, Relaxed);
        let tally = local.join();
        if line.trim() == "STOP" {
            // No window: report what the connect phase counted.
            let json = serde_json::to_string(&tally?).map_err(|e| Error::Worker(k as usize, e.to_string()))?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "RESULT {json}");
            let _ = out.flush();
            return Ok(());
        }
        return Err(Error::Worker(k as usize, "no GO from the parent".into()));
    };
    local.ctl.go_ns.store(go, Relaxed);
    sleep_until(go);
    let cpu_go = sys::self_cpu_ns();
    let window_end = go + plan.duration_ns;
    let mut sampler = Sampler::start(local.ctl.thread_handles());
    let mut next_progress = go + 1_000_000_000;
    loop {
        let now = now_ns();
        sampler.tick(now);
        if now >= next_progress || now >= window_end {
            next_progress += 1_000_000_000;
            let s = local.snapshot();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "PROGRESS {} {} {} {} {}", s.open, s.failed, s.sent, s.received, s.churned);
            let _ = out.flush();
        }
        if now >= window_end {
            break;
        }
        sleep_until(sampler.due().min(next_progress).min(window_end));
    }
    let cpu_window = sys::self_cpu_ns() - cpu_go;
    let mut tally = match local.join() {
        Ok(t) => t,
        Err(e) => {
            fail(e.to_string());
            return Err(e);
        }
    };
    tally.cpu_window_ns = cpu_window;
    tally.cpu_total_ns = sys::self_cpu_ns() - cpu_go;
    tally.threads = sampler.finish();
    let json = serde_json::to_string(&tally).map_err(|e| Error::Worker(k as usize, e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "RESULT {json}");
    let _ = out.flush();
    Ok(())
}
