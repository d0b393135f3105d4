//! Shards: one thread per core, pinned, each running its own monoio runtime with its own `SO_REUSEPORT`
//! listener, connection slab, timer wheel and pooled buffers. A connection lives and dies on the shard that
//! accepted it; nothing on the per-message path crosses threads or takes a lock.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use monoio::net::{ListenerOpts, TcpListener};
use slab::Slab;
use throng_protocol::conn::Limits;

use std::collections::HashMap;

use throng_protocol::message::{Decoder, Limits as DecodeLimits};

use crate::bus::{Inbox, Outbox};
use crate::channel::{HomeChannel, LocalChannel};
use crate::config::{Config, DriverChoice};
use crate::conn::{self, Conn, ConnKey};
use crate::metrics::ShardMetrics;
use crate::timer::TimerWheel;

/// Length of one timer-wheel tick.
pub const TICK: Duration = Duration::from_millis(50);
/// Size of the per-shard receive buffer every connection reads into.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// io_uring submission queue entries per shard (the default 1024 forces extra submits under load).
const URING_ENTRIES: u32 = 8192;

/// State shared by all shards (read-mostly).
#[derive(Debug)]
pub struct Shared {
    /// The resolved configuration.
    pub config: Config,
    /// Every shard's counters, indexed by shard id.
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// Set once on SIGTERM/SIGINT: shards stop accepting and close every connection with 1001.
    pub draining: AtomicBool,
    /// Shards whose listener is bound. `/health` says `ok` only once all are: until then the kernel would
    /// hand every connection to the shards already listening, and they would stay there.
    pub listening: AtomicUsize,
    /// Connections open over all shards, for `max_connections` (touched once per accept and close).
    pub open_connections: AtomicUsize,
    /// When the process started.
    pub started: Instant,
    /// The driver the shards actually run on ("io_uring" or "epoll").
    pub driver_name: &'static str,
    /// Every shard's inbound ring.
    pub inboxes: Arc<[Inbox]>,
    /// Unix time of start in seconds, part of every channel epoch (so epochs change across restarts).
    pub boot_id: u64,
}

/// Which driver to build, after resolving `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// io_uring.
    Uring,
    /// epoll.
    Epoll,
}

impl Driver {
    /// Resolves the configured choice against what the kernel allows.
    pub fn resolve(choice: DriverChoice) -> anyhow::Result<Self> {
        let uring = monoio::utils::detect_uring();
        match choice {
            DriverChoice::Auto if uring => Ok(Self::Uring),
            DriverChoice::Auto | DriverChoice::Epoll => Ok(Self::Epoll),
            DriverChoice::Uring if uring => Ok(Self::Uring),
            DriverChoice::Uring => anyhow::bail!("--driver uring: io_uring is not available on this kernel"),
        }
    }

    /// A short name for logs and `/stats`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

/// Everything one shard owns, behind a `RefCell`: borrowed for the length of one synchronous step (no
/// borrow is held across an `.await`).
#[derive(Debug)]
pub struct Inner {
    /// The connections, addressed by slab index plus a generation (see [`ConnKey`]).
    pub conns: Slab<Conn>,
    /// The pooled receive buffer: every read on this shard lands here first.
    pub scratch: Box<[u8]>,
    /// What the per-connection code needs besides the connection itself.
    pub ctx: Ctx,
    /// Next generation number for a new connection.
    pub next_gen: u32,
}

/// The shard state a connection handler works with, split from the slab so both can be borrowed at once.
#[derive(Debug)]
pub struct Ctx {
    /// Pooled output buffer: replies produced while handling one read are gathered here, then written.
    pub out: Vec<u8>,
    /// Heartbeats, handshake and close timeouts.
    pub wheel: TimerWheel<ConnKey>,
    /// Xorshift state for ping jitter.
    pub rng: u32,
    /// The JSON command decoder, its buffers reused for every command on this shard.
    pub decoder: Decoder,
    /// Channels with local subscribers, and their delivery logs.
    pub channels: Slab<LocalChannel>,
    /// Channel name -> index in `channels`.
    pub channel_index: HashMap<Arc<str>, usize>,
    /// Channels whose home is this shard.
    pub homes: HashMap<Arc<str>, HomeChannel>,
    /// Channels with frames appended since the last flush pass.
    pub dirty: Vec<usize>,
    /// Scratch list of subscribers for the flush pass (reused, not reallocated).
    pub subs_scratch: Vec<(ConnKey, usize)>,
    /// Messages to other shards, with the full-ring policy.
    pub outbox: Outbox,
    /// Flush pass counter: a connection flushed in this pass is not flushed again in it.
    pub pass: u32,
    /// Counter for channel epochs.
    pub epochs: u64,
    /// `unsubscribe` ids of subscriptions cancelled before their home confirmed them, answered (after the
    /// `subscribed`) when the confirmation arrives. Rarely non-empty.
    pub cancelled: Vec<(ConnKey, usize, Option<u64>)>,
}

/// One shard.
#[derive(Debug)]
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// State shared by all shards.
    pub shared: Arc<Shared>,
    /// This shard's counters (this shard is their only writer).
    pub metrics: Arc<ShardMetrics>,
    /// Current time in wheel ticks since start, advanced by the tick task: what "now" means on this shard.
    pub now: Cell<u64>,
    /// WebSocket size limits, from the configuration.
    pub limits: Limits,
    /// The listener's fd, so that draining can shut it down and end the accept loop.
    pub listener_fd: Cell<i32>,
    /// Wakes the flush task when frames were appended to a channel log.
    pub flush_wake: crate::flush::Notify,
    /// Readiness of every connection socket of this shard.
    pub poller: crate::poller::Poller,
    /// Owned state.
    pub inner: RefCell<Inner>,
}

impl Shard {
    /// Converts a duration to whole ticks (at least one).
    pub fn ticks(d: Duration) -> u64 {
        (d.as_millis() / TICK.as_millis()).max(1) as u64
    }
}

/// Binds the shard's listener with `SO_REUSEPORT`.
fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let opts = ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(4096);
    TcpListener::bind_with_config(addr, &opts).with_context(|| format!("binding {addr}"))
}

/// Starts shard `id` on its own thread, pinned to a core. `ready` gets the bind result.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    driver: Driver,
    core: Option<core_affinity::CoreId>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("throng-shard-{id}")).spawn(move || {
        if let Some(core) = core {
            core_affinity::set_for_current(core);
        }
        let result = match driver {
            Driver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(run(id, shared, ready.clone()))),
            Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(run(id, shared, ready.clone()))),
        };
        if let Err(e) = result {
            let _ = ready.send(Err(anyhow::Error::new(e).context(format!("shard {id}: building the runtime"))));
        }
    })
}

/// The shard's main future: binds, spawns the accept loop, then runs the tick loop until drained.
async fn run(id: usize, shared: Arc<Shared>, ready: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    let poller = match crate::poller::Poller::new() {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(anyhow::Error::new(e).context(format!("shard {id}: creating the epoll set"))));
            return;
        }
    };
    let listener = match bind(shared.config.listen) {
        Ok(l) => {
            shared.listening.fetch_add(1, Ordering::Release);
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let max_message = shared.config.max_message_size;
    let shard = Rc::new(Shard {
        id,
        metrics: shared.metrics[id].clone(),
        limits: Limits { max_frame: max_message, max_message },
        now: Cell::new(0),
        listener_fd: Cell::new(listener.as_raw_fd()),
        flush_wake: crate::flush::Notify::default(),
        poller,
        inner: RefCell::new(Inner {
            conns: Slab::with_capacity(1024),
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            ctx: Ctx {
                out: Vec::with_capacity(SCRATCH_BYTES),
                wheel: TimerWheel::new(0),
                rng: 0x2545_F491 ^ (id as u32).wrapping_mul(0x9E37_79B9),
                decoder: Decoder::with_limits(DecodeLimits { max_data_bytes: max_message, ..DecodeLimits::default() }),
                channels: Slab::new(),
                channel_index: HashMap::new(),
                homes: HashMap::new(),
                dirty: Vec::new(),
                subs_scratch: Vec::new(),
                outbox: Outbox::new(shared.inboxes.clone(), shared.config.ring_capacity),
                pass: 0,
                epochs: 0,
                cancelled: Vec::new(),
            },
            next_gen: 1,
        }),
        shared,
    });
    monoio::spawn(crate::poller::run(shard.clone()));
    monoio::spawn(accept_loop(shard.clone(), listener));
    monoio::spawn(crate::flush::flush_task(shard.clone()));
    monoio::spawn(crate::v1::inbox_task(shard.clone()));
    tick_loop(shard).await;
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut last_warn = Instant::now() - Duration::from_secs(60);
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                if shard.shared.draining.load(Ordering::Relaxed) {
                    // Stop accepting: dropping the stream closes it.
                    break;
                }
                ShardMetrics::inc(&shard.metrics.accepted_total);
                conn::register(&shard, stream);
            }
            Err(e) => {
                if shard.shared.draining.load(Ordering::Relaxed) {
                    break;
                }
                ShardMetrics::inc(&shard.metrics.io_errors_total);
                if last_warn.elapsed() > Duration::from_secs(5) {
                    last_warn = Instant::now();
                    tracing::warn!(shard = shard.id, error = %e, "accept failed (out of file descriptors?)");
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::debug!(shard = shard.id, "accept loop stopped");
}

/// Advances the shard clock and the timer wheel every tick; runs the drain when asked to.
async fn tick_loop(shard: Rc<Shard>) {
    let start = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        monoio::time::sleep(TICK).await;
        let now = (start.elapsed().as_millis() / TICK.as_millis()) as u64;
        shard.now.set(now);
        conn::fire_timers(&shard, now);
        crate::v1::housekeeping(&shard, now);
        if shard.shared.draining.load(Ordering::Relaxed) {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                conn::start_drain(&shard);
                Instant::now() + shard.shared.config.drain_timeout
            });
            let empty = shard.inner.borrow().conns.is_empty();
            if empty || Instant::now() >= deadline {
                if !empty {
                    tracing::warn!(shard = shard.id, left = shard.inner.borrow().conns.len(), "drain timeout");
                    conn::abort_all(&shard);
                }
                break;
            }
        }
    }
}
