//! Shards: one thread per core, pinned, each running its own monoio runtime with its own `SO_REUSEPORT`
//! listener, connection slab, timer wheel and pooled buffers. A connection lives and dies on the shard that
//! accepted it; nothing on the per-message path crosses threads or takes a lock.
//!
//! A shard is one task: the loop in [`event_loop`], which owns all of the shard's state (no `RefCell`, no
//! `Rc`) and gives every kind of work its turn in a fixed order with a bound per turn. It waits through the
//! runtime only when there is nothing to do: for its epoll set ([`poller`]: connections, the listener, the
//! inbox doorbell) to become readable, or for the next tick.
//!
//! - [`event_loop`]: the turn, its order and its budgets;
//! - [`accept`]: taking connections from the listener, refusing them at capacity, pausing when out of
//!   descriptors;
//! - [`poller`]: the epoll set;
//! - [`timer`]: the hierarchical timer wheel.

pub mod accept;
pub mod event_loop;
pub mod poller;
pub mod timer;
pub mod uring;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use throng_protocol::conn::Limits;
use throng_protocol::message::{Decoder, Limits as DecodeLimits};

use crate::channel::bus::{Inbox, Outbox};
use crate::channel::delivery::{Batch, FlushState};
use crate::channel::Channels;
use crate::config::{Config, DriverChoice};
use crate::conn::{ConnKey, Conns};
use crate::metrics::ShardMetrics;
use timer::TimerWheel;

/// Length of one timer-wheel tick.
pub const TICK: Duration = Duration::from_millis(50);
/// Size of the per-shard receive buffer every connection reads into.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// io_uring submission queue entries per shard.
pub const URING_ENTRIES: u32 = 1024;

/// State shared by all shards (read-mostly).
#[derive(Debug)]
pub struct Shared {
    /// The resolved configuration.
    pub config: Config,
    /// Every shard's counters, indexed by shard id.
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// Set once on SIGTERM/SIGINT: `/health` answers 503 and new upgrades are refused, while the listeners
    /// stay open and connections keep working (the drain delay, for load balancers to notice).
    pub draining: AtomicBool,
    /// Set once the drain delay is over: shards stop accepting and close every connection with 1001, within
    /// the drain timeout.
    pub closing: AtomicBool,
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
    /// The JWT verifier; `None` in the open development mode.
    pub auth: Option<crate::auth::Auth>,
    /// Connections per user and address, upgrades per second per address.
    pub limits: crate::auth::limits::Limiter,
    /// The Redis relay, when configured (its inbox is the last of `inboxes`).
    pub relay: Option<Arc<crate::relay::RelayShared>>,
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
    /// Resolves the configured choice against what the kernel allows: the io_uring driver needs io_uring
    /// itself, a provided-buffer ring and multishot receive (checked on a socket pair, [`uring::Ring::new`]).
    /// `auto` picks io_uring when all are there and logs why not otherwise.
    pub fn resolve(choice: DriverChoice) -> anyhow::Result<Self> {
        if choice == DriverChoice::Epoll {
            return Ok(Self::Epoll);
        }
        let why_not = if monoio::utils::detect_uring() {
            uring::Ring::new(2, 512).err().map(|e| e.to_string())
        } else {
            Some("io_uring is not available on this kernel".to_string())
        };
        match (choice, why_not) {
            (_, None) => Ok(Self::Uring),
            (DriverChoice::Uring, Some(why)) => anyhow::bail!("--driver uring: {why}"),
            (_, Some(why)) => {
                tracing::warn!(reason = %why, "driver auto: using epoll");
                Ok(Self::Epoll)
            }
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

/// What every handler on a shard reads: who the shard is, the configuration, its counters, and the current
/// time. Nothing here changes during a step of the loop; `now` advances between turns.
#[derive(Debug)]
pub struct Env {
    /// Shard index.
    pub id: usize,
    /// State shared by all shards.
    pub shared: Arc<Shared>,
    /// This shard's counters (this shard is their only writer).
    pub metrics: Arc<ShardMetrics>,
    /// WebSocket size limits, from the configuration.
    pub limits: Limits,
    /// Current time in wheel ticks since the shard started.
    pub now: u64,
    /// Connections' input comes through the shard's io_uring ring ([`uring`]), not `recv` on readiness.
    pub ring_reads: bool,
}

impl Env {
    /// The configuration.
    pub fn cfg(&self) -> &Config {
        &self.shared.config
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shared.metrics.len()
    }

    /// The id the welcome gives a connection: `<shard>-<generation>-<slot>` in hex, and with Redis
    /// `-<node>` after it, so that `/api/disconnect` on any node finds the node that holds it.
    pub fn client_id(&self, gen: u32, idx: u32) -> String {
        match &self.shared.relay {
            Some(r) => format!("{:x}-{:x}-{:x}-{}", self.id, gen, idx, r.node),
            None => format!("{:x}-{:x}-{:x}", self.id, gen, idx),
        }
    }

    /// Where a channel's requests go: its home shard ([`crate::channel::home_of`]), or the Redis relay (its
    /// index on the bus is the shard count) for a channel of a relayed namespace when Redis is configured.
    pub fn home(&self, channel: &str) -> usize {
        let shards = self.shards();
        if self.shared.relay.is_some() && self.cfg().namespaces.of_channel(channel).is_some_and(|ns| ns.relay) {
            return shards;
        }
        crate::channel::home_of(channel, shards)
    }

    /// Converts a duration to whole ticks (at least one).
    pub fn ticks(d: Duration) -> u64 {
        (d.as_millis() / TICK.as_millis()).max(1) as u64
    }
}

/// The mutable state handlers work with besides the connection slab (kept apart so a connection and the
/// rest can be borrowed at once).
#[derive(Debug)]
pub struct Ctx {
    /// Pooled output buffer: replies produced for one connection are gathered here, then written. It only
    /// ever holds one connection's bytes, and is empty between handlers.
    pub out: Vec<u8>,
    /// Every connection's timer.
    pub wheel: TimerWheel<ConnKey>,
    /// Xorshift state for ping jitter.
    pub rng: u32,
    /// The JSON command decoder, its buffers reused for every command on this shard.
    pub decoder: Decoder,
    /// Channels: homes, local logs, history budget, the outbox to other shards.
    pub chans: Channels,
    /// Bytes held for unfinished requests, frames and messages over all connections.
    pub unfinished: usize,
    /// The flush pass in progress and its pacing.
    pub flush: FlushState,
    /// Spare output queues (no allocation per blocked-then-drained write cycle).
    pub queues: crate::conn::write::QueuePool,
    /// Client addresses read from PROXY protocol headers, for connections whose request has not come yet.
    pub proxied: std::collections::HashMap<ConnKey, std::net::IpAddr>,
    /// The shard's histograms and refusal-log rate limit.
    pub rec: crate::metrics::Recorder,
    /// Where frames start in `out` (after a 101 written to it), for `frames_out_total`; 0 otherwise.
    pub frames_from: usize,
    /// Backend API requests waiting for answers from other shards.
    pub api: crate::http::api::Pending,
    /// HTTP connections whose waiting request was answered this turn: the connection step reads on.
    pub resume: Vec<ConnKey>,
    /// `/sse` streams: each one's position in its channels (for its `id:` lines).
    pub sse: crate::http::sse::Streams,
    /// Connections removed this turn whose io_uring receive is to be cancelled (the request holds the socket
    /// open until it ends); the loop passes them to the ring.
    pub ring_cancels: Vec<ConnKey>,
}

/// One shard: everything its loop owns.
#[derive(Debug)]
pub struct Shard {
    /// Identity, configuration, counters, time.
    pub env: Env,
    /// The connections.
    pub conns: Conns,
    /// Everything else handlers change.
    pub ctx: Ctx,
    /// The pooled receive buffer: every read on this shard lands here first.
    pub scratch: Box<[u8]>,
    /// Readiness of the connections, the listener, the doorbell and the ring.
    pub poller: poller::Poller,
    /// The io_uring receive ring (`--driver uring`): connections' input.
    pub ring: Option<uring::Ring>,
    /// The listener and its state.
    pub acceptor: accept::Acceptor,
    /// The `admin_listen` listener: on shard 0 only, when configured (`/metrics`, `/stats` and the API are
    /// served only on connections accepted there).
    pub admin: Option<accept::Acceptor>,
}

/// Binds the shard's listener with `SO_REUSEPORT`, non-blocking.
fn bind(addr: SocketAddr) -> anyhow::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    sock.listen(crate::limits::LISTEN_BACKLOG as i32).with_context(|| format!("listening on {addr}"))?;
    Ok(sock.into())
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

/// The shard's one task: binds, builds its state, and runs the loop until drained.
async fn run(id: usize, shared: Arc<Shared>, ready: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    let setup = || -> anyhow::Result<Shard> {
        let cfg = &shared.config;
        let ring = match shared.driver_name {
            "io_uring" => Some(
                uring::Ring::new(cfg.uring_buffers, cfg.uring_buffer_size)
                    .context("creating the io_uring receive ring")?,
            ),
            _ => None,
        };
        let poller = poller::Poller::new(ring.is_some()).context("creating the epoll set")?;
        if let Some(r) = &ring {
            poller.add_ring(r.fd())?;
        }
        // With the io_uring ring the listeners are not in the set: a multishot accept on the ring takes their
        // connections (armed by the loop's ring step).
        let in_set = ring.is_none();
        let listener = bind(shared.config.listen)?;
        if in_set {
            poller.add_listener(&listener)?;
        }
        poller.add_doorbell(&shared.inboxes[id].doorbell)?;
        let admin = match shared.config.admin_listen {
            Some(addr) if id == 0 => {
                let l = bind(addr)?;
                if in_set {
                    poller.add_admin_listener(&l)?;
                }
                Some(accept::Acceptor::new(l, in_set))
            }
            _ => None,
        };
        let max_message = cfg.max_message_size;
        let outbox = Outbox::new(shared.inboxes.clone(), cfg.ring_capacity, cfg.max_queue_bytes);
        Ok(Shard {
            env: Env {
                id,
                metrics: shared.metrics[id].clone(),
                limits: Limits { max_frame: max_message, max_message },
                now: 0,
                ring_reads: ring.is_some(),
                shared: shared.clone(),
            },
            conns: Conns::default(),
            ctx: Ctx {
                out: Vec::with_capacity(SCRATCH_BYTES),
                wheel: TimerWheel::new(0),
                rng: 0x2545_F491 ^ (id as u32).wrapping_mul(0x9E37_79B9),
                decoder: Decoder::with_limits(DecodeLimits { max_data_bytes: max_message, ..DecodeLimits::default() }),
                chans: Channels::new(outbox, cfg.max_history_bytes),
                unfinished: 0,
                flush: FlushState::new(match &ring {
                    Some(_) => Some(
                        Batch::new(cfg.uring_zerocopy_threshold as usize).context("creating the io_uring send ring")?,
                    ),
                    None => None,
                }),
                queues: Default::default(),
                proxied: Default::default(),
                rec: crate::metrics::Recorder::new(shared.started),
                frames_from: 0,
                api: Default::default(),
                sse: Default::default(),
                resume: Vec::new(),
                ring_cancels: Vec::new(),
            },
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            poller,
            ring,
            acceptor: accept::Acceptor::new(listener, in_set),
            admin,
        })
    };
    let shard = match setup() {
        Ok(s) => {
            shared.listening.fetch_add(1, Ordering::Release);
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e.context(format!("shard {id}"))));
            return;
        }
    };
    event_loop::run(shard).await;
}
