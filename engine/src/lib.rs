//! `throng`: a thread-per-core WebSocket connection engine.
//!
//! # Layout
//! - `config`: flags, `THRONG_*` variables and the TOML file, resolved into one [`config::Config`];
//! - `shard`: one pinned thread per core running a monoio runtime (io_uring or epoll) with its own
//!   `SO_REUSEPORT` listener, connection slab, timer wheel and pooled buffers;
//! - `poller`: the shard's edge-triggered epoll set of connection sockets and the event loop over it (one
//!   wait through the runtime for all of them; no task per connection);
//! - `conn`: per-connection state (size budget checked at compile time), the readiness-driven read path
//!   into the shard's pooled buffer, the bounded write queue, heartbeats and closes;
//! - `timer`: the hierarchical timer wheel behind handshake timeouts, pings and idle timeouts;
//! - `http`: `/health`, `/metrics`, `/stats` on the same port;
//! - `metrics`: per-shard counters with a single writer each;
//! - `sys`: the handful of raw syscalls (non-blocking recv/sendmsg, shutdown, rlimit).
//!
//! Start-up raises the open-file soft limit to the hard limit; SIGTERM or SIGINT drains: the shards stop
//! accepting, close every WebSocket with 1001, and the process exits 0 within `drain_timeout`.

pub mod bus;
pub mod channel;
pub mod config;
pub mod conn;
pub mod flush;
pub mod http;
pub mod metrics;
pub mod poller;
pub mod shard;
pub mod sys;
pub mod timer;
pub mod v1;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Cli, Config, LogFormat};
use crate::metrics::ShardMetrics;
use crate::shard::{Driver, Shared};

/// File descriptors kept back from `max_connections` for listeners, the runtime and logs.
const FD_RESERVE: u64 = 64;

/// Runs the engine with the given command line until it is drained by a signal.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli)?;
    init_logging(config.log_format);
    // Block the shutdown signals before any thread starts, so every thread inherits the mask and the main
    // thread alone receives them through sigtimedwait.
    let signals = block_shutdown_signals()?;

    let (soft, hard) = sys::raise_nofile_limit().context("reading the open-file limit")?;
    let capacity = soft.saturating_sub(FD_RESERVE) as usize;
    let max_connections = match config.max_connections {
        Some(n) if n > capacity => {
            tracing::warn!(
                max_connections = n,
                open_file_limit = soft,
                "max_connections exceeds what the open-file limit can hold (~{capacity}): past that, accepts \
                 fail; raise the hard limit (currently {hard}; `LimitNOFILE=` in a systemd unit, or limits.conf)"
            );
            n
        }
        Some(n) => n,
        None => capacity,
    };
    config.max_connections = Some(max_connections);
    let driver = Driver::resolve(config.driver)?;
    let shards = config.shards;
    let shared = Arc::new(Shared {
        metrics: (0..shards).map(|_| Arc::new(ShardMetrics::default())).collect(),
        draining: AtomicBool::new(false),
        listening: AtomicUsize::new(0),
        open_connections: AtomicUsize::new(0),
        started: Instant::now(),
        driver_name: driver.name(),
        inboxes: (0..shards).map(|_| bus::Inbox::new(config.ring_capacity)).collect::<Vec<_>>().into(),
        boot_id: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        config: config.clone(),
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(shards);
    for id in 0..shards {
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        handles.push(shard::spawn(id, shared.clone(), driver, core, tx.clone()).context("spawning a shard thread")?);
    }
    drop(tx);
    for _ in 0..shards {
        rx.recv().context("a shard thread died during start-up")??;
    }
    tracing::info!(
        listen = %config.listen,
        shards,
        driver = driver.name(),
        open_file_limit = soft,
        max_connections,
        echo = config.echo,
        "throng listening on {} with {shards} shard(s) on {}; open-file limit {soft}",
        config.listen,
        driver.name(),
    );

    tracing::warn!(
        "OPEN DEVELOPMENT MODE: no JWT key is configured, so any client may connect to /ws as any user \
         (?user=NAME). Do not expose this server to untrusted clients."
    );

    let signal = loop {
        if let Some(sig) = wait_signal(&signals, Duration::from_millis(250)) {
            break sig;
        }
        if handles.iter().any(|h| h.is_finished()) {
            anyhow::bail!("a shard stopped unexpectedly");
        }
    };
    tracing::info!(signal, drain_timeout = ?config.drain_timeout, "draining: closing every connection with 1001");
    shared.draining.store(true, Ordering::SeqCst);
    for h in handles {
        if h.join().is_err() {
            anyhow::bail!("a shard panicked while draining");
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THRONG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread spawned after) and returns the set.
fn block_shutdown_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is a plain C type; all-zero is a valid value that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; these three calls only write into it.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, libc::SIGTERM) };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, libc::SIGINT) };
    // SAFETY: `set` is initialised; the old mask is not needed (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        anyhow::bail!("pthread_sigmask failed: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits up to `timeout` for one of the blocked signals; returns its name.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<&'static str> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested (null).
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    match sig {
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGINT => Some("SIGINT"),
        _ => None,
    }
}
