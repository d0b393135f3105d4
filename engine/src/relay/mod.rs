//! The Redis relay: several Throng nodes behind a load balancer behave as one engine.
//!
//! With `--redis`, the channels of relayed namespaces (all by default; `relay = false` keeps a namespace on
//! its node) have their home in Redis instead of on a shard: [`crate::shard::Env::home`] sends their
//! publishes, subscribes, presence and history requests to the relay, an extra destination on the
//! inter-shard bus (the last inbox, its doorbell an eventfd the relay's runtime waits on). The relay is one
//! thread off the shard cores running a current-thread tokio runtime with the `redis` crate; the shards
//! never wait on Redis, and without `--redis` no relay thread exists and nothing on the shards changes.
//!
//! - A publish (from a client, `/api/publish` or `POST /publish` on any node) is one atomic script
//!   ([`store::PUBLISH`]): the next offset, an append to the channel's bounded stream, a pub/sub publish.
//!   Every node therefore assigns and sees the same offsets, and any node serves recovery and `history`.
//!   Publishes are sent in batches, one batch in flight (pipelined; per slot in a Cluster), so their order
//!   per channel is kept.
//! - A node subscribes to a channel's pub/sub channel only while one of its shards has a subscriber
//!   (interest per shard, a bit each; subscribes and unsubscribes batched, one batch in flight), and
//!   encodes each received message once for all its shards. [`chan`] keeps each channel's delivery in
//!   offset order and fills gaps from the stream.
//! - Presence: each node writes its own users' connection counts per channel ([`store::PRESENCE_SET`]) and
//!   refreshes its liveness every third of `redis_presence_ttl`; a dead node's entries vanish within that
//!   ttl. `/api/disconnect` of a user reaches the other nodes through the control channel.
//! - Faults: a command or liveness ping (every third of `redis_timeout`) not answered within `redis_timeout`
//!   means Redis is lost: publishes and subscribes of relayed channels are answered `unavailable` at once,
//!   `/health` says `degraded`, the relay reconnects with exponential backoff and full jitter, subscribes
//!   again and reads every channel's stream from where its delivery stopped, so subscribers get what
//!   history covers and a `gap` for the rest. Node-local namespaces keep working throughout.
//!
//! Layout: [`store`] (keys, scripts, answers), [`chan`] (one channel's state machine), `run` (the thread).

pub mod chan;
mod run;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

pub use run::spawn;

/// The relay's counters (one writer: the relay thread).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Publishes Redis assigned an offset to.
    pub published_total: AtomicU64,
    /// Publishes answered `unavailable` (Redis lost or unreachable): not relayed.
    pub publish_failed_total: AtomicU64,
    /// Subscribe, presence and history requests answered `unavailable`.
    pub refused_total: AtomicU64,
    /// Messages received through pub/sub and handed to this node's shards.
    pub received_total: AtomicU64,
    /// Messages read from a stream to fill a gap (after a reconnect or a missed message).
    pub filled_total: AtomicU64,
    /// Messages neither received nor still in the stream: subscribers got a `gap`.
    pub lost_total: AtomicU64,
    /// Times the connection to Redis was lost.
    pub disconnects_total: AtomicU64,
    /// Successful (re)connections.
    pub connects_total: AtomicU64,
    /// Channels this node is subscribed to in Redis.
    pub channels: AtomicU64,
    /// Requests from other nodes carried out here (user disconnects).
    pub control_total: AtomicU64,
}

/// What the shards and the HTTP endpoints see of the relay.
#[derive(Debug)]
pub struct RelayShared {
    /// This node's id in Redis (presence entries, control messages): random per start.
    pub node: String,
    /// Connected to Redis.
    pub up: AtomicBool,
    /// Redis is a Cluster (sharded pub/sub).
    pub cluster: AtomicBool,
    /// Counters.
    pub metrics: RelayMetrics,
    /// Why the last connection attempt or connection failed, for `/health`.
    pub last_error: Mutex<String>,
}

impl RelayMetrics {
    /// Every counter with its Prometheus name (`throng_relay_` + name), type and help, for `/metrics` and
    /// `/stats`.
    pub fn each(&self, mut f: impl FnMut(&'static str, &'static str, &'static str, u64)) {
        let rows: [(&str, &str, &str, &AtomicU64); 10] = [
            ("published_total", "counter", "Publishes Redis assigned an offset to.", &self.published_total),
            (
                "publish_failed_total",
                "counter",
                "Publishes answered `unavailable` (Redis unreachable): not relayed.",
                &self.publish_failed_total,
            ),
            (
                "refused_total",
                "counter",
                "Subscribe, presence and history requests answered `unavailable`.",
                &self.refused_total,
            ),
            (
                "received_total",
                "counter",
                "Messages received from Redis pub/sub and handed to this node's shards.",
                &self.received_total,
            ),
            ("filled_total", "counter", "Messages read from a channel's stream to fill a gap.", &self.filled_total),
            (
                "lost_total",
                "counter",
                "Messages neither received nor still in history: subscribers got a gap.",
                &self.lost_total,
            ),
            ("disconnects_total", "counter", "Times the connection to Redis was lost.", &self.disconnects_total),
            (
                "connects_total",
                "counter",
                "Connections to Redis made (the first and every reconnection).",
                &self.connects_total,
            ),
            ("channels", "gauge", "Channels this node is subscribed to in Redis.", &self.channels),
            (
                "control_total",
                "counter",
                "Requests from other nodes carried out here (user disconnects).",
                &self.control_total,
            ),
        ];
        for (name, kind, help, v) in rows {
            f(name, kind, help, v.load(Ordering::Relaxed));
        }
    }
}

impl RelayShared {
    /// A relay not connected yet.
    pub fn new() -> Self {
        Self {
            node: format!("{:016x}", crate::sys::random_u64()),
            up: AtomicBool::new(false),
            cluster: AtomicBool::new(false),
            metrics: RelayMetrics::default(),
            last_error: Mutex::new("not connected yet".into()),
        }
    }

    /// Connected to Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The last error, for `/health`.
    pub fn error(&self) -> String {
        self.last_error.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Default for RelayShared {
    fn default() -> Self {
        Self::new()
    }
}
