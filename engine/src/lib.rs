//! `throng`: a thread-per-core WebSocket connection engine.
//!
//! # Layout
//! Layers, each calling only the ones below it (the read path reaches the application through a trait it
//! is handed, not by name):
//! - `config`, `metrics`, `sys`, `limits`: configuration (flags, `THRONG_*` variables, TOML, checks),
//!   per-shard counters, the raw syscalls, the host limits that cap the connection count;
//! - [`channel`]: channel state with no connection in it: homes and history ([`channel::home`],
//!   [`channel::history`]), local logs ([`channel::local`]), the inter-shard bus ([`channel::bus`]);
//! - [`conn`]: a connection: state and slab, the read path with its bounds ([`conn::read`]), the output
//!   queue ([`conn::write`]), the close state machine ([`conn::close`]), its timer ([`conn::timers`]);
//! - [`channel::delivery`], [`v1`], [`http`]: what uses connections and channels together: the broadcast
//!   flush pass and slow consumers, wire protocol v1 commands and the answers from other shards, HTTP
//!   (upgrades and `/health`, `/metrics`, `/stats`);
//! - [`shard`]: one pinned thread per core running the shard loop ([`shard::event_loop`]) over its epoll
//!   set ([`shard::poller`]), listener ([`shard::accept`]) and timer wheel ([`shard::timer`]).
//!
//! Start-up raises the open-file soft limit to the hard limit and logs the limits that cap the process
//! ([`limits`]), warning about those below `max_connections`; SIGTERM or SIGINT drains: `/health` answers
//! 503 and new upgrades are refused at once, connections keep working for `drain_delay` (a load balancer
//! takes the node out of rotation meanwhile), then the shards stop accepting, close every WebSocket with
//! 1001, and the process exits 0 within `drain_timeout`. A second SIGTERM or SIGINT exits at once.

pub mod auth;
pub mod channel;
pub mod config;
pub mod conn;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod relay;
pub mod shard;
pub mod sys;
pub mod v1;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::channel::bus::Inbox;
use crate::config::{Cli, Config, LogFormat};
use crate::metrics::ShardMetrics;
use crate::shard::{Driver, Shared};

/// Runs the engine with the given command line until it is drained by a signal.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let check_only = cli.check_config;
    let mut config = Config::load(cli)?;
    if check_only {
        println!("configuration is valid:\n{config:#?}");
        return Ok(());
    }
    init_logging(config.log_format);
    // Block the shutdown signals before any thread starts, so every thread inherits the mask and the main
    // thread alone receives them through sigtimedwait.
    let signals = block_shutdown_signals()?;

    let nofile = sys::raise_nofile_limit().context("reading the open-file limit")?;
    let host = limits::HostLimits::read(nofile, config.shards);
    let soft = host.nofile_soft;
    let max_connections = config.max_connections.unwrap_or(host.capacity() as usize);
    config.max_connections = Some(max_connections);
    let driver = Driver::resolve(config.driver)?;
    log_limits(&host, max_connections, driver);
    let shards = config.shards;
    // With Redis, the relay is one more destination on the bus, after the shards.
    let relay = config.redis.as_ref().map(|_| Arc::new(relay::RelayShared::new()));
    let destinations = shards + usize::from(relay.is_some());
    let shared = Arc::new(Shared {
        metrics: (0..shards).map(|_| Arc::new(ShardMetrics::default())).collect(),
        draining: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        listening: AtomicUsize::new(0),
        open_connections: AtomicUsize::new(0),
        started: Instant::now(),
        driver_name: driver.name(),
        inboxes: (0..destinations)
            .map(|_| Inbox::new(config.ring_capacity))
            .collect::<std::io::Result<Vec<_>>>()
            .context("creating the inter-shard rings")?
            .into(),
        auth: auth::Auth::new(&config.auth)?,
        limits: auth::limits::Limiter::new(
            config.max_connections_per_user,
            config.max_connections_per_ip,
            config.max_upgrades_per_second_per_ip,
        ),
        config: config.clone(),
        relay: relay.clone(),
    });
    if let (Some(rs), Some(redis)) = (&relay, &config.redis) {
        let urls: Vec<String> = redis.urls.iter().map(|u| config::redact_url(u)).collect();
        tracing::info!(node = %rs.node, redis = ?urls, prefix = %redis.prefix, "Redis relay on: relayed channels span every node on this Redis");
        relay::spawn(shared.clone(), rs.clone()).context("starting the Redis relay thread")?;
    }
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

    if let Some(admin) = config.admin_listen {
        tracing::info!(%admin, "admin listener on {admin} (shard 0): /metrics, /stats and /api/* served only there");
    }
    if config.demo {
        tracing::info!(
            "demo page on http://{}/ (a room chat on the JavaScript client served at /throng.js); --demo false turns it off",
            config.listen
        );
    }
    if config.api_key.is_none() {
        tracing::info!("backend API off (every /api/* path answers 404): set api_key to enable it");
    }
    if config.open_mode() {
        tracing::warn!(
            listen = %config.listen,
            "OPEN DEVELOPMENT MODE: no JWT key is configured, so any client may connect to /ws as any user \
             (?user=NAME){}. Configure --jwt-secret or --jwt-public-key before exposing this server.",
            if config.listen.ip().is_loopback() { "; listening on loopback only" } else { ", and --insecure lets it listen beyond loopback" }
        );
    } else {
        tracing::info!(alg = ?config.auth.key.as_ref().map(|k| k.1), "JWT required at the upgrade");
    }

    let signal = loop {
        if let Some(sig) = wait_signal(&signals, Duration::from_millis(250)) {
            break sig;
        }
        if handles.iter().any(|h| h.is_finished()) {
            anyhow::bail!("a shard stopped unexpectedly");
        }
    };
    // The drain, in two phases. First the delay: /health answers 503 and new upgrades are refused, while the
    // listeners stay open and every connection keeps working, so that load balancers see the node fail its
    // health check and take it out of rotation before anything is closed. Then the shards close their
    // listeners and every connection with 1001, within drain_timeout. A second signal exits at once.
    tracing::info!(
        signal,
        drain_delay = ?config.drain_delay,
        drain_timeout = ?config.drain_timeout,
        "draining: /health answers 503 and new upgrades are refused; open connections are closed with 1001 \
         after the drain delay (a second signal exits at once)"
    );
    shared.draining.store(true, Ordering::SeqCst);
    let delay_ends = Instant::now() + config.drain_delay;
    loop {
        let left = delay_ends.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(sig) = wait_signal(&signals, left.min(Duration::from_millis(50))) {
            tracing::warn!(signal = sig, "second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
        if handles.iter().any(|h| h.is_finished()) {
            anyhow::bail!("a shard stopped unexpectedly during the drain delay");
        }
    }
    if !config.drain_delay.is_zero() {
        tracing::info!(drain_timeout = ?config.drain_timeout, "drain delay over: closing every connection with 1001");
    }
    shared.closing.store(true, Ordering::SeqCst);
    while !handles.iter().all(|h| h.is_finished()) {
        if let Some(sig) = wait_signal(&signals, Duration::from_millis(50)) {
            tracing::warn!(signal = sig, "second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
    }
    for h in handles {
        if h.join().is_err() {
            anyhow::bail!("a shard panicked while draining");
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Logs the limits that cap the process and the connections they leave room for (one `info` line with a
/// `connection_capacity` field), then a warning for each limit below what the configuration asks.
fn log_limits(host: &limits::HostLimits, max_connections: usize, driver: Driver) {
    let memlock = limits::Shown(host.memlock, "unlimited");
    let somaxconn = limits::Shown(host.somaxconn, "unknown");
    tracing::info!(
        open_files_soft = host.nofile_soft,
        open_files_hard = host.nofile_hard,
        memlock = %memlock,
        somaxconn = %somaxconn,
        listen_backlog = limits::LISTEN_BACKLOG,
        fds_at_start = host.fds_at_start,
        fds_kept = host.fds_kept(),
        connection_capacity = host.capacity(),
        max_connections,
        "limits: open files {} (hard {}), memlock {memlock}, somaxconn {somaxconn}, listen backlog {} per \
         shard; room for {} connections: open files less {} the process keeps ({} open at start, {} per shard \
         x {}, {} reserve)",
        host.nofile_soft,
        host.nofile_hard,
        limits::LISTEN_BACKLOG,
        host.capacity(),
        host.fds_kept(),
        host.fds_at_start,
        limits::FDS_PER_SHARD,
        host.shards,
        limits::FD_RESERVE,
    );
    for w in host.warnings(max_connections, (driver == Driver::Uring).then_some(shard::URING_ENTRIES)) {
        tracing::warn!(limit = w.limit(), max_connections, "{w}");
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THRONG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file, a pipe or journald gets plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
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
