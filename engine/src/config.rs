//! Configuration: embedded defaults, overridden by a TOML file (`--config`), then by `THRONG_*` environment
//! variables and command-line flags (clap reads both; a flag beats its variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Which I/O driver the shards run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring; start-up fails if it is unavailable.
    Uring,
    /// epoll.
    Epoll,
}

/// The algorithm tokens must be signed with (pinned: a token naming another is refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
pub enum JwtAlg {
    /// HMAC-SHA256 with `jwt_secret`.
    #[value(name = "HS256")]
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256 with the RSA public key in `jwt_public_key`.
    #[value(name = "RS256")]
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA P-256 SHA-256 with the EC public key in `jwt_public_key`.
    #[value(name = "ES256")]
    #[serde(rename = "ES256")]
    Es256,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; every one can also come from `THRONG_<NAME>` or the TOML file.
#[derive(Debug, Parser)]
#[command(name = "throng", version, about = "Throng: a thread-per-core WebSocket connection engine")]
pub struct Cli {
    /// TOML configuration file; its keys are the long flag names with '_' for '-'
    /// (e.g. `ping_interval = 25`). Flags and THRONG_* variables override it.
    #[arg(long, env = "THRONG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address and port to listen on. [default: 0.0.0.0:8080]
    #[arg(long, env = "THRONG_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Number of shards (threads, one pinned per core), 1 to 64. [default: number of cores]
    #[arg(long, env = "THRONG_SHARDS")]
    pub shards: Option<usize>,
    /// I/O driver: auto (io_uring if available, else epoll), uring or epoll. [default: auto]
    #[arg(long, env = "THRONG_DRIVER", value_enum)]
    pub driver: Option<DriverChoice>,
    /// Most connections held at once, over all shards; upgrades beyond it get 503.
    /// [default: what the open-file limit allows]
    #[arg(long, env = "THRONG_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds between server pings to an otherwise silent connection (jittered by up to 10%). [default: 25]
    #[arg(long, env = "THRONG_PING_INTERVAL")]
    pub ping_interval: Option<f64>,
    /// Seconds without any inbound traffic (pongs count) after which a connection is closed. [default: 60]
    #[arg(long, env = "THRONG_IDLE_TIMEOUT")]
    pub idle_timeout: Option<f64>,
    /// Seconds a client has to complete its HTTP upgrade request. [default: 10]
    #[arg(long, env = "THRONG_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<f64>,
    /// Seconds a graceful shutdown (SIGTERM/SIGINT) keeps serving open connections while `/health` says 503
    /// and new upgrades are refused, so a load balancer takes the node out of rotation before anything is
    /// closed; must exceed the balancer's health-check detection time. 0 closes at once. [default: 5]
    #[arg(long, env = "THRONG_DRAIN_DELAY")]
    pub drain_delay: Option<f64>,
    /// Seconds a graceful shutdown waits, after the drain delay, for clients to answer the 1001 close.
    /// [default: 10]
    #[arg(long, env = "THRONG_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<f64>,
    /// Seconds a `GET /poll` long-poll is held waiting for a message before it is answered with none.
    /// [default: 25]
    #[arg(long, env = "THRONG_POLL_TIMEOUT")]
    pub poll_timeout: Option<f64>,
    /// Largest WebSocket message accepted, in bytes (summed over fragments); larger ones close with 1009.
    /// [default: 65536]
    #[arg(long, env = "THRONG_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Most bytes queued for one client before it is closed as a slow consumer (4008). [default: 1048576]
    #[arg(long, env = "THRONG_MAX_BACKLOG_BYTES")]
    pub max_backlog_bytes: Option<usize>,
    /// Serve the `/echo` endpoint (echoes every message; for conformance tests and benchmarks).
    /// [default: true]
    #[arg(long, env = "THRONG_ECHO")]
    pub echo: Option<bool>,
    /// Capacity, in messages, of each shard's inbound ring from the other shards. When a ring is full the
    /// sender keeps messages in an overflow queue of the same size; past that, deliveries for that shard
    /// are dropped and its subscribers get a `gap` marker (see docs). [default: 65536]
    #[arg(long, env = "THRONG_RING_CAPACITY")]
    pub ring_capacity: Option<usize>,
    /// On a shard busy at least half of the last 50 ms tick, pause between broadcast flush passes (after
    /// one over 1 ms) for this fraction of the last pass's duration (at most 10 ms), so more messages
    /// coalesce into each write: less CPU per delivery, at most that much more latency. A lighter-loaded
    /// shard never pauses. 0 disables pacing. [default: 0.33]
    #[arg(long, env = "THRONG_FLUSH_PACING")]
    pub flush_pacing: Option<f64>,
    /// io_uring driver: receive buffers in each shard's provided-buffer ring, a power of two from 2 to
    /// 32768. Every connection's multishot receive takes one when data arrives and the shard gives it back
    /// once handled; idle connections hold none. Small by default so the buffers the kernel writes into
    /// stay in cache (docs/benchmarks.md, "The io_uring data path"); a burst that finds the ring empty waits
    /// in its socket. [default: 128]
    #[arg(long, env = "THRONG_URING_BUFFERS")]
    pub uring_buffers: Option<u32>,
    /// io_uring driver: bytes per receive buffer, 512 to 65536. [default: 4096]
    #[arg(long, env = "THRONG_URING_BUFFER_SIZE")]
    pub uring_buffer_size: Option<u32>,
    /// io_uring driver: a delivery write with a frame of at least this many bytes is sent zero-copy
    /// (IORING_OP_SENDMSG_ZC: the kernel sends from the frame's own pages instead of copying them; worth it
    /// for large frames on a real NIC, never over loopback, where the kernel copies anyway); 0 disables,
    /// else at least 4096. [default: 0]
    #[arg(long, env = "THRONG_URING_ZEROCOPY_THRESHOLD")]
    pub uring_zerocopy_threshold: Option<u32>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "THRONG_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Most bytes of channel history one shard keeps, over all its channels; past it the oldest messages
    /// of the shard are dropped first (recovery from them then says `recovered:false`). [default: 67108864]
    #[arg(long, env = "THRONG_MAX_HISTORY_BYTES")]
    pub max_history_bytes: Option<usize>,
    /// Most channels one shard holds (as home or with local subscribers); a publish or subscribe that would
    /// create one more gets a `channel_limit` error. [default: 100000]
    #[arg(long, env = "THRONG_MAX_CHANNELS")]
    pub max_channels: Option<usize>,
    /// Messages (pings included) one `/ws` connection may send per second, with a burst of as many; past
    /// it commands get `rate_limited` errors, and a client that keeps on is closed with 4029. 0: no limit.
    /// [default: 1000]
    #[arg(long, env = "THRONG_MAX_MESSAGES_PER_SECOND")]
    pub max_messages_per_second: Option<u32>,
    /// Bytes one `/ws` connection may send per second (burst: a second's worth, at least one message of
    /// `max_message_size`); enforced like the message rate. 0: no limit. [default: 1048576]
    #[arg(long, env = "THRONG_MAX_BYTES_PER_SECOND")]
    pub max_bytes_per_second: Option<u32>,
    /// Most channels one connection may be subscribed to. [default: 256]
    #[arg(long, env = "THRONG_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Most bytes one shard holds for unfinished requests, frames and fragmented messages, over all its
    /// connections; a connection that would pass it is closed with 1013. [default: 67108864]
    #[arg(long, env = "THRONG_MAX_UNFINISHED_BYTES")]
    pub max_unfinished_bytes: Option<usize>,
    /// Seconds a client has to finish a message it has started (a frame or a fragmented message); past
    /// it the connection is closed with 1008. [default: 15]
    #[arg(long, env = "THRONG_MESSAGE_TIMEOUT")]
    pub message_timeout: Option<f64>,
    /// Most bytes of messages on their way to one shard from another (its ring and the sender's overflow
    /// queue together); past it the full-ring policy applies (see docs). [default: 67108864]
    #[arg(long, env = "THRONG_MAX_QUEUE_BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// Secret for HS256 tokens (JWT at the upgrade; `sub` is the user). Prefer THRONG_JWT_SECRET or the
    /// file to a flag, which other users of the host can see.
    #[arg(long, env = "THRONG_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with the public key for RS256 or ES256 tokens.
    #[arg(long, env = "THRONG_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// The one algorithm tokens may use: HS256 (with --jwt-secret), RS256 or ES256 (with --jwt-public-key).
    /// [default: HS256 with a secret; required with a public key]
    #[arg(long, env = "THRONG_JWT_ALG", value_enum)]
    pub jwt_alg: Option<JwtAlg>,
    /// Seconds of clock skew allowed when checking `exp` and `nbf`. [default: 5]
    #[arg(long, env = "THRONG_JWT_LEEWAY")]
    pub jwt_leeway: Option<u64>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "THRONG_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "THRONG_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Longest token accepted, in bytes; longer ones are refused before decoding. [default: 4096]
    #[arg(long, env = "THRONG_MAX_TOKEN_BYTES")]
    pub max_token_bytes: Option<usize>,
    /// Allow the open development mode (no JWT key: `?user=NAME` identities) on an address other than
    /// loopback. Without a key and without this, Throng listens on loopback only.
    #[arg(long, env = "THRONG_INSECURE")]
    pub insecure: bool,
    /// Origins allowed to open WebSockets, comma-separated: exact (`https://app.example.com`) or with one
    /// leading wildcard label (`https://*.example.com`). Others get 403; requests without `Origin`
    /// (non-browser clients) are allowed. [default: any origin]
    #[arg(long, env = "THRONG_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Proxies (comma-separated CIDRs) whose X-Forwarded-For / X-Real-IP headers are believed: the client
    /// address is the right-most address in X-Forwarded-For that is not one of them. [default: none]
    #[arg(long, env = "THRONG_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Every connection starts with a PROXY protocol header (v1 or v2), from which the client address is
    /// taken; connections without one are closed. Only for a listener that a proxy alone can reach.
    #[arg(long, env = "THRONG_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Most WebSocket connections one user (`sub`) may hold, over all shards; more get 403. 0: no limit.
    /// [default: 1000]
    #[arg(long, env = "THRONG_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Most WebSocket connections one client address may hold (IPv6 counted per /64), over all shards;
    /// more get 403. 0: no limit. [default: 10000]
    #[arg(long, env = "THRONG_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<u32>,
    /// Upgrades per second one client address may make (burst: one second's worth); more get 429 with
    /// Retry-After. 0: no limit. [default: 1000]
    #[arg(long, env = "THRONG_MAX_UPGRADES_PER_SECOND_PER_IP")]
    pub max_upgrades_per_second_per_ip: Option<u32>,
    /// Key the backend HTTP API (`/api/*`) requires as `Authorization: apikey <key>`; at least 16 bytes.
    /// Prefer THRONG_API_KEY or the file to a flag. Unset: the API is off (every `/api/*` path answers 404).
    #[arg(long, env = "THRONG_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest HTTP request body accepted (the backend API's JSON), in bytes; a request announcing more is
    /// answered 413 before its body is read. [default: 1048576]
    #[arg(long, env = "THRONG_MAX_API_BODY_BYTES")]
    pub max_api_body_bytes: Option<usize>,
    /// A second address (e.g. 127.0.0.1:9090) serving `/metrics`, `/stats` and `/api/*` only there: the
    /// main listener then answers 404 for them. Accepted by shard 0. [default: none, all on --listen]
    #[arg(long, env = "THRONG_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Redis for a cluster of Throng nodes (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS;
    /// several comma-separated seed URLs for a Redis Cluster, which is detected): publishes get their offsets
    /// from Redis and reach every node's subscribers, history and presence live there. Unset: a single-box
    /// engine that needs no Redis. [default: none]
    #[arg(long, env = "THRONG_REDIS")]
    pub redis: Option<String>,
    /// Prefix of every Redis key and pub/sub channel Throng uses, so several clusters can share a Redis.
    /// [default: throng]
    #[arg(long, env = "THRONG_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Seconds a Redis command or liveness ping may take before Redis counts as lost (publishes answered
    /// `unavailable`, `/health` degraded, reconnect with backoff); a ping goes out every third of it.
    /// [default: 2]
    #[arg(long, env = "THRONG_REDIS_TIMEOUT")]
    pub redis_timeout: Option<f64>,
    /// Seconds a node's presence entries outlive its last refresh in Redis (refreshed every third of it):
    /// how long the users of a node that died stay listed. [default: 15]
    #[arg(long, env = "THRONG_REDIS_PRESENCE_TTL")]
    pub redis_presence_ttl: Option<f64>,
    /// Serve the demo page at `/` (a room chat with presence and the node's figures, using the JavaScript
    /// client served at `/throng.js`). `--demo` alone means true. [default: true in the open development mode
    /// (no JWT key), false otherwise; when off, `/` answers 404]
    #[arg(long, env = "THRONG_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,
    /// Validate the configuration (flags, variables and file), print it, and exit: 0 when it is valid,
    /// 1 with the reason otherwise. Nothing is bound or started.
    #[arg(long)]
    pub check_config: bool,
}

/// The TOML file's shape: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    shards: Option<usize>,
    driver: Option<DriverChoice>,
    max_connections: Option<usize>,
    ping_interval: Option<f64>,
    idle_timeout: Option<f64>,
    handshake_timeout: Option<f64>,
    drain_delay: Option<f64>,
    drain_timeout: Option<f64>,
    poll_timeout: Option<f64>,
    max_message_size: Option<usize>,
    max_backlog_bytes: Option<usize>,
    echo: Option<bool>,
    ring_capacity: Option<usize>,
    flush_pacing: Option<f64>,
    uring_buffers: Option<u32>,
    uring_buffer_size: Option<u32>,
    uring_zerocopy_threshold: Option<u32>,
    log_format: Option<LogFormat>,
    max_history_bytes: Option<usize>,
    max_channels: Option<usize>,
    max_messages_per_second: Option<u32>,
    max_bytes_per_second: Option<u32>,
    max_subscriptions: Option<usize>,
    max_unfinished_bytes: Option<usize>,
    message_timeout: Option<f64>,
    max_queue_bytes: Option<usize>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    jwt_alg: Option<JwtAlg>,
    jwt_leeway: Option<u64>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    max_token_bytes: Option<usize>,
    insecure: Option<bool>,
    allowed_origins: Option<Vec<String>>,
    trusted_proxies: Option<Vec<String>>,
    proxy_protocol: Option<bool>,
    max_connections_per_user: Option<u32>,
    max_connections_per_ip: Option<u32>,
    max_upgrades_per_second_per_ip: Option<u32>,
    api_key: Option<String>,
    max_api_body_bytes: Option<usize>,
    admin_listen: Option<SocketAddr>,
    redis: Option<String>,
    redis_prefix: Option<String>,
    redis_timeout: Option<f64>,
    redis_presence_ttl: Option<f64>,
    demo: Option<bool>,
    /// `[namespace.NAME]` tables; `[namespace.default]` is for channel names without a namespace.
    #[serde(default)]
    namespace: std::collections::BTreeMap<String, NamespaceFile>,
}

/// One `[namespace.NAME]` table of the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    history_size: Option<usize>,
    history_ttl: Option<f64>,
    history_bytes: Option<usize>,
    presence: Option<bool>,
    client_publish: Option<bool>,
    slow_consumer: Option<SlowConsumerPolicy>,
    subscribe_roles: Option<Vec<String>>,
    publish_roles: Option<Vec<String>>,
    presence_roles: Option<Vec<String>>,
    history_roles: Option<Vec<String>>,
    relay: Option<bool>,
}

/// What happens to a subscriber whose unsent backlog passes `max_backlog_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 4008.
    Close,
    /// Drop the oldest unsent messages of the channel and send a `gap` marker so the client recovers.
    DropOldest,
}

/// Settings of one channel namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Namespace {
    /// Namespace name (`""` for channels without one).
    pub name: String,
    /// Messages kept per channel for recovery and `history`.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// Most bytes of history kept per channel (oldest dropped first).
    pub history_bytes: usize,
    /// Whether presence is tracked.
    pub presence: bool,
    /// Whether clients may publish (the backend always may).
    pub client_publish: bool,
    /// Slow-consumer policy.
    pub slow_consumer: SlowConsumerPolicy,
    /// Token roles that may subscribe (and read history, see presence unless those have their own lists);
    /// `"*"`: every authenticated user. Empty: only the token's `channels` patterns grant it.
    pub subscribe_roles: Vec<String>,
    /// Token roles that may publish (`"*"`: everyone); besides the token's `publish` patterns.
    pub publish_roles: Vec<String>,
    /// Token roles that may see presence; `None`: whoever may subscribe.
    pub presence_roles: Option<Vec<String>>,
    /// Token roles that may read history; `None`: whoever may subscribe.
    pub history_roles: Option<Vec<String>>,
    /// With `redis`: whether the namespace's channels span the cluster (offsets, history and presence in
    /// Redis). `false` keeps them on this node, working whether Redis is up or not.
    pub relay: bool,
}

impl Namespace {
    fn defaults(name: &str) -> Self {
        Self {
            name: name.to_string(),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            history_bytes: 1 << 20,
            presence: true,
            client_publish: true,
            slow_consumer: SlowConsumerPolicy::Close,
            subscribe_roles: Vec::new(),
            publish_roles: Vec::new(),
            presence_roles: None,
            history_roles: None,
            relay: true,
        }
    }
}

/// The namespaces channels may use. With none configured every namespace is open with the defaults
/// (history 100 messages / 300 s, presence on, client publish on, close slow consumers); once any is
/// configured only those exist, plus `user` (personal channels) and the default namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Namespaces {
    /// Configured namespaces, by name (`""` is the default namespace).
    pub list: Vec<Namespace>,
    /// True when no namespace was configured: unknown names get the defaults.
    pub open: bool,
    /// The defaults unknown names get when `open` (named `*`).
    pub fallback: Namespace,
}

impl Namespaces {
    /// The index of a namespace's settings, or `None` when it does not exist.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|n| n.name == name)
    }

    /// Settings for `name`, or `None` when the namespace does not exist.
    pub fn get(&self, name: &str) -> Option<&Namespace> {
        self.find(name).map(|i| &self.list[i])
    }

    /// Settings for `name`, falling back to the defaults when namespaces are open (`user` and the default
    /// namespace always exist).
    pub fn resolve(&self, name: &str) -> Option<&Namespace> {
        match self.get(name) {
            Some(n) => Some(n),
            None if self.open => Some(&self.fallback),
            None => None,
        }
    }

    /// The settings of the namespace of a channel name (`ns:name`, or the default namespace), if it exists.
    pub fn of_channel(&self, channel: &str) -> Option<&Namespace> {
        self.resolve(channel.split_once(':').map_or("", |(ns, _)| ns))
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Shard count.
    pub shards: usize,
    /// Requested driver.
    pub driver: DriverChoice,
    /// Connection limit over all shards; `None` means as many as the open-file limit allows.
    pub max_connections: Option<usize>,
    /// Server ping interval.
    pub ping_interval: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Handshake timeout.
    pub handshake_timeout: Duration,
    /// Drain delay: how long a drain keeps serving open connections (with `/health` at 503) before closing
    /// them. Zero closes at once.
    pub drain_delay: Duration,
    /// Drain timeout, counted from the end of the drain delay.
    pub drain_timeout: Duration,
    /// How long a `GET /poll` is held waiting for a message.
    pub poll_timeout: Duration,
    /// Largest message in bytes.
    pub max_message_size: usize,
    /// Slow-consumer bound in bytes.
    pub max_backlog_bytes: usize,
    /// Whether `/echo` is served.
    pub echo: bool,
    /// Inter-shard ring capacity in messages.
    pub ring_capacity: usize,
    /// Pause between flush passes under load, as a fraction of the last pass's duration.
    pub flush_pacing: f64,
    /// Receive buffers per shard in the io_uring driver's provided-buffer ring.
    pub uring_buffers: u32,
    /// Bytes per receive buffer of that ring.
    pub uring_buffer_size: u32,
    /// Frame size from which a delivery write goes zero-copy on io_uring (0: never).
    pub uring_zerocopy_threshold: u32,
    /// Log format.
    pub log_format: LogFormat,
    /// Channel namespaces.
    pub namespaces: Namespaces,
    /// History bytes per shard.
    pub max_history_bytes: usize,
    /// Channels per shard.
    pub max_channels: usize,
    /// Inbound messages per second per `/ws` connection (0: unlimited).
    pub max_messages_per_second: u32,
    /// Inbound bytes per second per `/ws` connection (0: unlimited).
    pub max_bytes_per_second: u32,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Bytes held for unfinished requests, frames and messages per shard.
    pub max_unfinished_bytes: usize,
    /// Time to finish a started message.
    pub message_timeout: Duration,
    /// Bytes in flight toward one shard.
    pub max_queue_bytes: usize,
    /// How clients are identified: JWT, or the open development mode.
    pub auth: AuthConfig,
    /// Allow the open development mode off loopback.
    pub insecure: bool,
    /// Allowed origins (empty: any).
    pub allowed_origins: Vec<String>,
    /// Trusted proxies' networks.
    pub trusted_proxies: Vec<crate::auth::net::Cidr>,
    /// Connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// WebSocket connections per user (0: unlimited).
    pub max_connections_per_user: u32,
    /// WebSocket connections per client address (0: unlimited).
    pub max_connections_per_ip: u32,
    /// Upgrades per second per client address (0: unlimited).
    pub max_upgrades_per_second_per_ip: u32,
    /// The backend API's key; `None`: the API is off.
    pub api_key: Option<ApiKey>,
    /// Largest HTTP request body.
    pub max_api_body_bytes: usize,
    /// Where `/metrics`, `/stats` and `/api/*` are served instead of `listen`, when set.
    pub admin_listen: Option<SocketAddr>,
    /// The Redis relay; `None`: a single node.
    pub redis: Option<RedisConfig>,
    /// Whether the demo page is served at `/`.
    pub demo: bool,
}

/// The Redis relay's settings.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// Seed URLs (one for a single Redis; any of a Cluster's nodes).
    pub urls: Vec<String>,
    /// Prefix of keys and pub/sub channels.
    pub prefix: String,
    /// Command and liveness-ping timeout.
    pub timeout: Duration,
    /// Lifetime of a node's presence entries after their last refresh.
    pub presence_ttl: Duration,
}

impl std::fmt::Debug for RedisConfig {
    /// URLs without their passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisConfig")
            .field("urls", &urls)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("presence_ttl", &self.presence_ttl)
            .finish()
    }
}

/// A Redis URL with its password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// The backend API key (never printed: its `Debug` shows only its length).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey(<{} bytes>)", self.0.len())
    }
}

/// JWT settings; `None` key: the open development mode.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Where the verification key comes from, and the pinned algorithm.
    pub key: Option<(JwtKey, JwtAlg)>,
    /// Clock skew allowed for `exp` and `nbf`, seconds.
    pub leeway: u64,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Longest token accepted.
    pub max_token_bytes: usize,
}

/// A verification key as configured (parsed once, at start, by [`crate::auth::Auth::new`]).
#[derive(Clone)]
pub enum JwtKey {
    /// An HS256 secret.
    Secret(String),
    /// A PEM public key file's contents, and its path (for messages).
    Pem(Vec<u8>, PathBuf),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(s) => write!(f, "Secret(<{} bytes>)", s.len()),
            Self::Pem(_, path) => write!(f, "Pem({})", path.display()),
        }
    }
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        bail!("{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// [`secs`] allowing zero (a setting where 0 turns something off).
fn secs_or_zero(name: &str, v: f64) -> anyhow::Result<Duration> {
    if v == 0.0 {
        return Ok(Duration::ZERO);
    }
    secs(name, v).map_err(|_| anyhow::anyhow!("{name} must be 0 or a positive number of seconds, got {v}"))
}

impl Config {
    /// Resolves flags, environment and the optional TOML file into a configuration.
    pub fn load(cli: Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let auth = auth_config(&cli, &file)?;
        // The demo page is on by default only where anyone may connect anyway: the open development mode.
        let demo = cli.demo.or(file.demo).unwrap_or(auth.key.is_none());
        let cfg = Self {
            listen: cli.listen.or(file.listen).unwrap_or_else(|| default_listen(&cli, &file)),
            shards: cli.shards.or(file.shards).unwrap_or(cores.min(64)),
            driver: cli.driver.or(file.driver).unwrap_or(DriverChoice::Auto),
            max_connections: cli.max_connections.or(file.max_connections),
            ping_interval: secs("ping_interval", cli.ping_interval.or(file.ping_interval).unwrap_or(25.0))?,
            idle_timeout: secs("idle_timeout", cli.idle_timeout.or(file.idle_timeout).unwrap_or(60.0))?,
            handshake_timeout: secs(
                "handshake_timeout",
                cli.handshake_timeout.or(file.handshake_timeout).unwrap_or(10.0),
            )?,
            drain_delay: secs_or_zero("drain_delay", cli.drain_delay.or(file.drain_delay).unwrap_or(5.0))?,
            drain_timeout: secs("drain_timeout", cli.drain_timeout.or(file.drain_timeout).unwrap_or(10.0))?,
            poll_timeout: secs("poll_timeout", cli.poll_timeout.or(file.poll_timeout).unwrap_or(25.0))?,
            max_message_size: cli.max_message_size.or(file.max_message_size).unwrap_or(64 * 1024),
            max_backlog_bytes: cli.max_backlog_bytes.or(file.max_backlog_bytes).unwrap_or(1 << 20),
            echo: cli.echo.or(file.echo).unwrap_or(true),
            ring_capacity: cli.ring_capacity.or(file.ring_capacity).unwrap_or(65536),
            flush_pacing: cli.flush_pacing.or(file.flush_pacing).unwrap_or(0.33),
            uring_buffers: cli.uring_buffers.or(file.uring_buffers).unwrap_or(128),
            uring_buffer_size: cli.uring_buffer_size.or(file.uring_buffer_size).unwrap_or(4096),
            uring_zerocopy_threshold: cli.uring_zerocopy_threshold.or(file.uring_zerocopy_threshold).unwrap_or(0),
            log_format: cli.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            namespaces: namespaces(&file.namespace)?,
            max_history_bytes: cli.max_history_bytes.or(file.max_history_bytes).unwrap_or(64 << 20),
            max_channels: cli.max_channels.or(file.max_channels).unwrap_or(100_000),
            max_messages_per_second: cli.max_messages_per_second.or(file.max_messages_per_second).unwrap_or(1000),
            max_bytes_per_second: cli.max_bytes_per_second.or(file.max_bytes_per_second).unwrap_or(1 << 20),
            max_subscriptions: cli.max_subscriptions.or(file.max_subscriptions).unwrap_or(256),
            max_unfinished_bytes: cli.max_unfinished_bytes.or(file.max_unfinished_bytes).unwrap_or(64 << 20),
            message_timeout: secs("message_timeout", cli.message_timeout.or(file.message_timeout).unwrap_or(15.0))?,
            max_queue_bytes: cli.max_queue_bytes.or(file.max_queue_bytes).unwrap_or(64 << 20),
            auth,
            insecure: cli.insecure || file.insecure.unwrap_or(false),
            allowed_origins: cli.allowed_origins.clone().or(file.allowed_origins.clone()).unwrap_or_default(),
            trusted_proxies: cli
                .trusted_proxies
                .clone()
                .or(file.trusted_proxies.clone())
                .unwrap_or_default()
                .iter()
                .filter(|c| !c.trim().is_empty())
                .map(|c| c.trim().parse().map_err(|e| anyhow::anyhow!("trusted_proxies: {c:?}: {e}")))
                .collect::<anyhow::Result<_>>()?,
            proxy_protocol: cli.proxy_protocol || file.proxy_protocol.unwrap_or(false),
            max_connections_per_user: cli.max_connections_per_user.or(file.max_connections_per_user).unwrap_or(1000),
            max_connections_per_ip: cli.max_connections_per_ip.or(file.max_connections_per_ip).unwrap_or(10_000),
            max_upgrades_per_second_per_ip: cli
                .max_upgrades_per_second_per_ip
                .or(file.max_upgrades_per_second_per_ip)
                .unwrap_or(1000),
            api_key: cli.api_key.clone().or(file.api_key.clone()).map(ApiKey),
            max_api_body_bytes: cli.max_api_body_bytes.or(file.max_api_body_bytes).unwrap_or(1 << 20),
            admin_listen: cli.admin_listen.or(file.admin_listen),
            redis: match cli.redis.clone().or(file.redis.clone()) {
                None => None,
                Some(urls) => Some(RedisConfig {
                    urls: urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect(),
                    prefix: cli.redis_prefix.clone().or(file.redis_prefix.clone()).unwrap_or_else(|| "throng".into()),
                    timeout: secs("redis_timeout", cli.redis_timeout.or(file.redis_timeout).unwrap_or(2.0))?,
                    presence_ttl: secs(
                        "redis_presence_ttl",
                        cli.redis_presence_ttl.or(file.redis_presence_ttl).unwrap_or(15.0),
                    )?,
                }),
            },
            demo,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks the values against each other and against their bounds; the error says what to change.
    pub fn check(&self) -> anyhow::Result<()> {
        const MIB: usize = 1 << 20;
        let within = |name: &str, v: usize, lo: usize, hi: usize| -> anyhow::Result<()> {
            if !(lo..=hi).contains(&v) {
                bail!("{name} must be between {lo} and {hi}, got {v}");
            }
            Ok(())
        };
        let at_most = |name: &str, v: Duration, hi: u64| -> anyhow::Result<()> {
            if v > Duration::from_secs(hi) {
                bail!("{name} must be at most {hi} s, got {} s", v.as_secs_f64());
            }
            Ok(())
        };
        within("shards", self.shards, 1, 64)?;
        within("max_message_size", self.max_message_size, 1, 256 * MIB)?;
        within("max_backlog_bytes", self.max_backlog_bytes, 1024, 1024 * MIB)?;
        if self.max_backlog_bytes < self.max_message_size + 1024 {
            bail!(
                "max_backlog_bytes ({}) must be at least max_message_size + 1024 ({}): an echo or a delivery of the \
                 largest message must fit in a client's backlog",
                self.max_backlog_bytes,
                self.max_message_size + 1024
            );
        }
        within("ring_capacity", self.ring_capacity, 2, 1 << 24)?;
        if !(2..=32_768).contains(&self.uring_buffers) || !self.uring_buffers.is_power_of_two() {
            bail!("uring_buffers must be a power of two from 2 to 32768, got {}", self.uring_buffers);
        }
        within("uring_buffer_size", self.uring_buffer_size as usize, 512, 65_536)?;
        if self.uring_zerocopy_threshold != 0 && self.uring_zerocopy_threshold < 4096 {
            bail!("uring_zerocopy_threshold must be 0 (off) or at least 4096, got {}", self.uring_zerocopy_threshold);
        }
        if !(0.0..=4.0).contains(&self.flush_pacing) {
            bail!("flush_pacing must be between 0 and 4, got {}", self.flush_pacing);
        }
        at_most("ping_interval", self.ping_interval, 86_400)?;
        at_most("idle_timeout", self.idle_timeout, 7 * 86_400)?;
        at_most("handshake_timeout", self.handshake_timeout, 300)?;
        at_most("drain_delay", self.drain_delay, 3600)?;
        at_most("drain_timeout", self.drain_timeout, 3600)?;
        at_most("poll_timeout", self.poll_timeout, 300)?;
        at_most("message_timeout", self.message_timeout, 3600)?;
        if self.idle_timeout <= self.ping_interval {
            bail!(
                "idle_timeout ({} s) must be longer than ping_interval ({} s): a silent connection is pinged after \
                 ping_interval and closed only if it stays silent until idle_timeout",
                self.idle_timeout.as_secs_f64(),
                self.ping_interval.as_secs_f64()
            );
        }
        within("max_history_bytes", self.max_history_bytes, 0, 1 << 40)?;
        within("max_channels", self.max_channels, 1, 1 << 26)?;
        within("max_subscriptions", self.max_subscriptions, 1, 1 << 16)?;
        within("max_unfinished_bytes", self.max_unfinished_bytes, 64 * 1024, 1 << 40)?;
        within("max_queue_bytes", self.max_queue_bytes, 64 * 1024, 1 << 40)?;
        within("max_token_bytes", self.auth.max_token_bytes, 64, 64 * 1024)?;
        within("max_api_body_bytes", self.max_api_body_bytes, 1024, 256 * MIB)?;
        if let Some(k) = &self.api_key {
            if k.0.len() < 16 {
                bail!("api_key must be at least 16 bytes (a short key can be guessed); better as THRONG_API_KEY");
            }
            if !k.0.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("api_key must be printable ASCII without spaces (it travels in an HTTP header)");
            }
        }
        if let Some(r) = &self.redis {
            if r.urls.is_empty() {
                bail!("redis: give at least one URL (redis://host:port or rediss://host:port)");
            }
            for u in &r.urls {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    bail!("redis: {} is not a redis:// or rediss:// URL", redact_url(u));
                }
            }
            if r.prefix.is_empty() || !r.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
                bail!("redis_prefix: 1 or more characters of [A-Za-z0-9_.-]");
            }
            at_most("redis_timeout", r.timeout, 60)?;
            at_most("redis_presence_ttl", r.presence_ttl, 3600)?;
            if r.presence_ttl < Duration::from_secs(3) {
                bail!("redis_presence_ttl must be at least 3 seconds (it is refreshed every third of it)");
            }
        }
        if self.admin_listen.is_some_and(|a| a == self.listen) {
            bail!("admin_listen must differ from listen");
        }
        if self.open_mode() && !self.listen.ip().is_loopback() && !self.insecure {
            bail!(
                "listening on {} with no JWT key would let anyone connect as any user: set jwt_secret (HS256) or \
                 jwt_public_key with jwt_alg (RS256, ES256), or listen on loopback, or pass --insecure to run the \
                 open development mode on this address anyway",
                self.listen
            );
        }
        for o in &self.allowed_origins {
            crate::auth::net::check_origin_pattern(o).map_err(|e| anyhow::anyhow!("allowed_origins: {o:?}: {e}"))?;
        }
        for ns in &self.namespaces.list {
            let name = if ns.name.is_empty() { "default" } else { &ns.name };
            within(&format!("namespace.{name}.history_size"), ns.history_size, 0, 1 << 20)?;
            within(&format!("namespace.{name}.history_bytes"), ns.history_bytes, 0, 1 << 40)?;
            at_most(&format!("namespace.{name}.history_ttl"), ns.history_ttl, 30 * 86_400)?;
        }
        Ok(())
    }

    /// Bytes a reply built from history or presence may take: half the backlog bound, so that a reply to a
    /// client with some backlog already can never push it past the bound.
    pub fn max_reply_bytes(&self) -> usize {
        self.max_backlog_bytes / 2
    }

    /// True in the open development mode: no JWT key, identities from `?user=`.
    pub fn open_mode(&self) -> bool {
        self.auth.key.is_none()
    }
}

/// Where Throng listens when no address is configured: `0.0.0.0:8080`, or, in the open development mode
/// (no JWT key) without `insecure`, `127.0.0.1:8080`: anyone could otherwise connect as anyone.
fn default_listen(cli: &Cli, file: &FileConfig) -> SocketAddr {
    let keyed = cli.jwt_secret.is_some()
        || cli.jwt_public_key.is_some()
        || file.jwt_secret.is_some()
        || file.jwt_public_key.is_some();
    let insecure = cli.insecure || file.insecure.unwrap_or(false);
    if keyed || insecure { "0.0.0.0:8080" } else { "127.0.0.1:8080" }.parse().expect("valid literal")
}

fn auth_config(cli: &Cli, file: &FileConfig) -> anyhow::Result<AuthConfig> {
    let secret = cli.jwt_secret.clone().or(file.jwt_secret.clone());
    let public = cli.jwt_public_key.clone().or(file.jwt_public_key.clone());
    let alg = cli.jwt_alg.or(file.jwt_alg);
    let key = match (secret, public, alg) {
        (Some(_), Some(_), _) => bail!("jwt_secret and jwt_public_key are exclusive: one key, one algorithm"),
        (Some(s), None, None | Some(JwtAlg::Hs256)) => {
            if s.len() < 32 {
                bail!("jwt_secret must be at least 32 bytes (HS256 keys shorter than the hash are weak)");
            }
            Some((JwtKey::Secret(s), JwtAlg::Hs256))
        }
        (Some(_), None, Some(a)) => bail!("jwt_alg {a:?} needs jwt_public_key (a secret is for HS256 only)"),
        (None, Some(path), Some(a @ (JwtAlg::Rs256 | JwtAlg::Es256))) => {
            let pem = std::fs::read(&path).with_context(|| format!("reading jwt_public_key {}", path.display()))?;
            Some((JwtKey::Pem(pem, path), a))
        }
        (None, Some(_), Some(JwtAlg::Hs256)) => bail!("jwt_alg HS256 takes jwt_secret, not a public key"),
        (None, Some(_), None) => bail!("jwt_public_key needs jwt_alg RS256 or ES256"),
        (None, None, Some(a)) => bail!("jwt_alg {a:?} is set but no key is: set jwt_secret or jwt_public_key"),
        (None, None, None) => None,
    };
    Ok(AuthConfig {
        key,
        leeway: cli.jwt_leeway.or(file.jwt_leeway).unwrap_or(5),
        issuer: cli.jwt_issuer.clone().or(file.jwt_issuer.clone()),
        audience: cli.jwt_audience.clone().or(file.jwt_audience.clone()),
        max_token_bytes: cli.max_token_bytes.or(file.max_token_bytes).unwrap_or(4096),
    })
}

fn namespaces(file: &std::collections::BTreeMap<String, NamespaceFile>) -> anyhow::Result<Namespaces> {
    let mut list = Vec::new();
    for (name, f) in file {
        let key = if name == "default" { "" } else { name.as_str() };
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@=/-".contains(&b)) {
            bail!("namespace {name:?}: names use [A-Za-z0-9_.@=/-]");
        }
        let d = Namespace::defaults(key);
        let ttl = match f.history_ttl {
            Some(v) => secs(&format!("namespace.{name}.history_ttl"), v)?,
            None => d.history_ttl,
        };
        list.push(Namespace {
            name: key.to_string(),
            history_size: f.history_size.unwrap_or(d.history_size),
            history_ttl: ttl,
            history_bytes: f.history_bytes.unwrap_or(d.history_bytes),
            presence: f.presence.unwrap_or(d.presence),
            client_publish: f.client_publish.unwrap_or(d.client_publish),
            slow_consumer: f.slow_consumer.unwrap_or(d.slow_consumer),
            subscribe_roles: f.subscribe_roles.clone().unwrap_or_default(),
            publish_roles: f.publish_roles.clone().unwrap_or_default(),
            presence_roles: f.presence_roles.clone(),
            history_roles: f.history_roles.clone(),
            relay: f.relay.unwrap_or(d.relay),
        });
    }
    let open = list.is_empty();
    for implicit in ["", "user"] {
        if !list.iter().any(|n| n.name == implicit) {
            list.push(Namespace::defaults(implicit));
        }
    }
    Ok(Namespaces { list, open, fallback: Namespace::defaults("*") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_flags() {
        let dir = std::env::temp_dir().join(format!("throng-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, "ping_interval = 5\nshards = 3\ndriver = \"epoll\"\n").unwrap();
        let cli = Cli::try_parse_from(["throng", "--config", path.to_str().unwrap(), "--shards", "2"]).unwrap();
        let c = Config::load(cli).unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.ping_interval, Duration::from_secs(5));
        assert_eq!(c.driver, DriverChoice::Epoll);
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        // No JWT key: the open development mode listens on loopback unless told otherwise.
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        std::fs::write(
            &path,
            "[namespace.chat]\nhistory_size = 5\nslow_consumer = \"drop_oldest\"\n[namespace.default]\npresence = false\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["throng", "--config", path.to_str().unwrap()]).unwrap();
        let c = Config::load(cli).unwrap();
        let chat = c.namespaces.resolve("chat").unwrap();
        assert_eq!((chat.history_size, chat.slow_consumer), (5, SlowConsumerPolicy::DropOldest));
        assert!(!c.namespaces.resolve("").unwrap().presence);
        assert!(c.namespaces.resolve("user").is_some());
        assert!(c.namespaces.resolve("other").is_none(), "configured namespaces are closed");
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let cli = Cli::try_parse_from(["throng", "--config", path.to_str().unwrap()]).unwrap();
        assert!(Config::load(cli).is_err());
    }

    #[test]
    fn drain_delay_defaults_to_five_seconds_and_may_be_zero() {
        let c = Config::load(Cli::try_parse_from(["throng"]).unwrap()).unwrap();
        assert_eq!((c.drain_delay, c.drain_timeout), (Duration::from_secs(5), Duration::from_secs(10)));
        let c = Config::load(Cli::try_parse_from(["throng", "--drain-delay", "0"]).unwrap()).unwrap();
        assert_eq!(c.drain_delay, Duration::ZERO);
        let c = Config::load(Cli::try_parse_from(["throng", "--drain-delay", "2.5"]).unwrap()).unwrap();
        assert_eq!(c.drain_delay, Duration::from_millis(2500));
        let e = load_err(&["--drain-delay=-1"]);
        assert!(e.contains("drain_delay must be 0 or a positive number"), "{e}");
        let e = load_err(&["--drain-delay", "4000"]);
        assert!(e.contains("drain_delay must be at most"), "{e}");
    }

    #[test]
    fn poll_timeout_defaults_to_25_seconds() {
        let c = Config::load(Cli::try_parse_from(["throng"]).unwrap()).unwrap();
        assert_eq!(c.poll_timeout, Duration::from_secs(25));
        let c = Config::load(Cli::try_parse_from(["throng", "--poll-timeout", "1.5"]).unwrap()).unwrap();
        assert_eq!(c.poll_timeout, Duration::from_millis(1500));
        assert!(load_err(&["--poll-timeout", "0"]).contains("poll_timeout"));
        assert!(load_err(&["--poll-timeout", "301"]).contains("poll_timeout must be at most"));
    }

    #[test]
    fn demo_is_on_by_default_only_in_the_open_development_mode() {
        let load = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("throng").chain(args.iter().copied())).unwrap();
            Config::load(cli).unwrap().demo
        };
        let secret = "a secret of at least thirty-two bytes";
        assert!(load(&[]), "open mode: demo on");
        assert!(!load(&["--demo", "false"]));
        assert!(!load(&["--jwt-secret", secret]), "with a key: demo off");
        assert!(load(&["--jwt-secret", secret, "--demo"]), "--demo alone turns it on");
        assert!(load(&["--jwt-secret", secret, "--demo", "true"]));
        let dir = std::env::temp_dir().join(format!("throng-cfg-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, format!("demo = true\njwt_secret = \"{secret}\"\n")).unwrap();
        assert!(load(&["--config", path.to_str().unwrap()]), "demo = true in the file");
        assert!(!load(&["--config", path.to_str().unwrap(), "--demo", "false"]), "the flag beats the file");
        std::fs::write(&path, "demo = false\n").unwrap();
        assert!(!load(&["--config", path.to_str().unwrap()]), "demo = false in the file, open mode");
    }

    #[test]
    fn rejects_bad_values() {
        let cli = Cli::try_parse_from(["throng", "--ping-interval=-1"]).unwrap();
        assert!(Config::load(cli).is_err());
        let cli = Cli::try_parse_from(["throng", "--shards", "0"]).unwrap();
        assert!(Config::load(cli).is_err());
    }

    fn load_err(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(std::iter::once("throng").chain(args.iter().copied())).unwrap();
        format!("{:#}", Config::load(cli).expect_err("must be refused"))
    }

    #[test]
    fn values_are_checked_against_each_other() {
        let e = load_err(&["--ping-interval", "30", "--idle-timeout", "20"]);
        assert!(e.contains("idle_timeout") && e.contains("ping_interval"), "{e}");
        let e = load_err(&["--max-message-size", "1000000", "--max-backlog-bytes", "500000"]);
        assert!(e.contains("max_backlog_bytes") && e.contains("max_message_size"), "{e}");
        let e = load_err(&["--handshake-timeout", "100000"]);
        assert!(e.contains("handshake_timeout must be at most"), "{e}");
        let e = load_err(&["--max-subscriptions", "0"]);
        assert!(e.contains("max_subscriptions"), "{e}");
        let cli = Cli::try_parse_from(["throng"]).unwrap();
        let c = Config::load(cli).expect("the embedded defaults are valid");
        assert_eq!(c.max_reply_bytes(), c.max_backlog_bytes / 2);
    }
}
