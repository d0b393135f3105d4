//! Command-line arguments and the [`Plan`] derived from them: who connects where, in which role, at what
//! rate, and how the work is split over processes and threads.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::addr::{parse_source_ips, parse_ws_url, WsUrl};
use crate::error::Error;
use crate::jwt::{self, Alg, Minter, TokenIn};
use crate::sys::parse_cpu_list;
use crate::tls::{TlsOptions, TlsPlan, TlsVersion};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Ramp up connections, hold them idle; connect latency, errors, server memory per connection.
    Connect,
    /// Every connection sends and gets its messages back; throughput and round-trip latency.
    Echo,
    /// Subscribers on one channel, publishers at a fixed rate; deliveries/s, fan-out latency, loss, order.
    Broadcast,
    /// Broadcast to steady subscribers while other connections open and close at a rate.
    Churn,
    /// `POST /api/publish` over HTTP/1.1 keep-alive, closed loop, optionally checked by WebSocket
    /// subscribers; requests/s, messages/s, request latency, errors by status.
    ApiPublish,
    /// Throng only: every connection on its personal channel and one group channel of `--group-size`;
    /// publishers post to random groups and personal channels; deliveries/s, latency, loss, server CPU per
    /// delivery and RSS per connection.
    Rooms,
}

/// The protocol spoken to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Throng wire protocol v1 on `/ws` (subscribe/publish commands); echo uses `/echo`.
    Throng,
    /// The plain contract of the comparison peers: `/echo` echoes, `/broadcast` relays to all (sender too).
    Raw,
}

/// How throng broadcast subscribers receive (`--transport`); the publishers are v1 WebSocket either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// v1 WebSocket subscriptions on `/ws`.
    Ws,
    /// Server-Sent Events: `GET /sse?channel=<channel>` streams (HTTP/1.1 over plain TCP).
    Sse,
}

impl Transport {
    /// The transport's name as typed.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

impl Scenario {
    /// The scenario's name as typed.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Echo => "echo",
            Scenario::Broadcast => "broadcast",
            Scenario::Churn => "churn",
            Scenario::ApiPublish => "api-publish",
            Scenario::Rooms => "rooms",
        }
    }
}

impl Target {
    /// The target's name as typed.
    pub fn name(self) -> &'static str {
        match self {
            Target::Throng => "throng",
            Target::Raw => "raw",
        }
    }
}

/// `throng-bench SCENARIO --url ws://... [options]`
#[derive(Clone, Debug, Parser)]
#[command(name = "throng-bench", version, about = "Load generator for Throng and other WebSocket servers")]
pub struct Args {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Server URL, `ws://host:port[/path]` or `wss://host:port[/path]` (TLS 1.3/1.2); a path overrides the
    /// scenario's default path. Several nodes of one cluster: repeat the flag (or `a,b,c`); connection i then
    /// goes to URL i mod N (over all processes and threads) and the publishers (broadcast, churn, rooms, the
    /// api-publish HTTP connections) to the first. Every URL must have the same scheme and path.
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Protocol: `throng` (v1 on /ws) or `raw` (the peers' /echo and /broadcast).
    #[arg(long, value_enum, default_value_t = Target::Throng)]
    pub target: Target,
    /// Broadcast to Throng: how the subscribers receive, `ws` (v1 subscriptions on /ws) or `sse`
    /// (`GET /sse?channel=<channel>` streams, plain TCP); the publishers are v1 WebSocket either way.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Connections: echo connections, subscribers (broadcast, churn: the steady ones), idle connections, or
    /// api-publish's HTTP connections. [default: 100; api-publish: 10]
    #[arg(long)]
    pub connections: Option<u64>,
    /// Length of the measured window in seconds (connect: default for --hold).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Messages per second, all senders together: echo (default: closed loop), broadcast publishes
    /// (default 100), churn's steady stream (default 10).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Payload bytes per message (the `data` of a v1 publish), stamp included.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Worker processes (each holds its share of the connections; keep each under ~9.9k sockets).
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// Event-loop threads per process.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Publishers (broadcast, churn). Throng: extra connections; raw: some of the --connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Channel for throng broadcast and churn; api-publish: the prefix of its channels (`<prefix>-0`,
    /// `<prefix>-1`, ...). [default: bench:0; api-publish: bench:api]
    #[arg(long)]
    pub channel: Option<String>,
    /// api-publish: requests each HTTP connection keeps in flight (pipelined, answered in order).
    #[arg(long, default_value_t = 1)]
    pub pipeline: u32,
    /// api-publish: messages per request (1: `{"channel","data"}`; more: `{"batch":[...]}`, at most 1000).
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// api-publish: distinct channels, used round-robin (their homes spread over the server's shards).
    #[arg(long, default_value_t = 16)]
    pub channels: u32,
    /// api-publish: WebSocket subscribers (v1, on every channel) that check every published message arrives.
    #[arg(long, default_value_t = 0)]
    pub subscribers: u64,
    /// api-publish: the server's API key, sent as `Authorization: apikey <key>` (or THRONG_BENCH_API_KEY,
    /// which other users of the host cannot see in the process list).
    #[arg(long, env = "THRONG_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Rooms: members of each group channel (`room:<k>` holds connections k*G .. k*G+G-1).
    #[arg(long, default_value_t = 10)]
    pub group_size: u64,
    /// Rooms: the share of publishes that go to a random personal channel (the rest to a random group).
    /// Clients may not publish to `user:` channels, so with the default --personal-prefix this must be 0.
    /// [default: 0.5; 0 with --personal-prefix user:]
    #[arg(long)]
    pub personal_share: Option<f64>,
    /// Rooms: connections closed (the socket dropped, no close handshake) and opened again per second in
    /// total; each reconnects as the same user and subscribes to its personal channel and its group again.
    /// Needs --personal-share 0 (a personal channel's deliveries are counted per publish).
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_rate: f64,
    /// Rooms: the personal channel of connection i is `<prefix>bench-<i>` (`bench-<i>` is its user: the
    /// token's `sub`, or `?user=` without a JWT key). A namespace clients may publish to (`inbox:`) lets
    /// publishers reach personal channels over WebSocket.
    #[arg(long, default_value = "user:")]
    pub personal_prefix: String,
    /// PID of the server: sample its CPU time and RSS (`/proc`) before and after. Several nodes: repeat the
    /// flag (or `a,b,c`); their CPU and RSS are summed into the server figures (CPU per message, memory per
    /// connection) and each is also reported apart, with the CPU of its `throng-relay` thread(s).
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// PIDs of a proxy in front of the server (repeat the flag, or `a,b,c`; nginx: its master and every
    /// worker): their CPU time (all threads) and RSS, summed over the processes, are sampled at the same
    /// points as `--server-pid` and reported as `proxy`.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub proxy_pid: Vec<u32>,
    /// PID of the Redis server the nodes relay through (repeat, or `a,b,c`, for a Redis Cluster's masters):
    /// sampled at the same points as `--server-pid`, summed, and reported as `redis`: its CPU in total and
    /// per message published.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub redis_pid: Vec<u32>,
    /// Source addresses to spread connections over (`127.0.0.1-127.0.0.50`, `127.0.0.0/24`, `a,b,c`).
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Connect: seconds to hold the connections idle (default: --duration).
    #[arg(long)]
    pub hold: Option<f64>,
    /// New connections per second while ramping up, all processes together.
    #[arg(long, default_value_t = 5000.0)]
    pub ramp_rate: f64,
    /// Handshakes in progress at once, all processes together.
    #[arg(long, default_value_t = 512)]
    pub max_pending: u64,
    /// Seconds a connection may take for TCP connect + upgrade (+ subscribe) before it counts as timed out.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds to keep receiving after the window, for messages still in flight.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// Echo, closed loop: messages each connection keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub inflight: u32,
    /// Receive pacing in milliseconds (0 = off): during the window the loop wakes at most once per period,
    /// so each read takes more frames and the bench costs less per message; fixed-rate sends go out in bursts
    /// at those wake-ups, stamped with their scheduled times, so measured latencies then include up to this
    /// much of the bench's own waiting on each side. For saturation runs where the bench would otherwise be
    /// the limit.
    #[arg(long, default_value_t = 0.0)]
    pub pace_ms: f64,
    /// Churn: connections opened (and closed again) per second [default: 100]. Rooms: group moves per second
    /// in total, over every subscriber: a member unsubscribes from its group and, once `unsubscribed`,
    /// subscribes to another random group [default: 0].
    #[arg(long)]
    pub churn_rate: Option<f64>,
    /// Mint an HS256 JWT per connection with this secret (or THRONG_BENCH_JWT_SECRET, which other users of
    /// the host cannot see in the process list).
    #[arg(long, env = "THRONG_BENCH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Mint an RS256 or ES256 JWT per connection with this PEM private key: RSA (PKCS#1 or PKCS#8) for
    /// RS256, EC P-256 in PKCS#8 for ES256.
    #[arg(long, value_name = "FILE")]
    pub jwt_private_key: Option<PathBuf>,
    /// Signing algorithm. [default: HS256 with --jwt-secret; with --jwt-private-key, the key's: RS256 for an
    /// RSA key, ES256 for an EC key (given, it must fit the key)]
    #[arg(long, value_enum)]
    pub jwt_alg: Option<Alg>,
    /// Token lifetime in seconds (`exp` = `iat` + this). Tokens are minted before the ramp, so it must cover
    /// the whole run. [default: 3600]
    #[arg(long, value_name = "SECS")]
    pub jwt_ttl: Option<u64>,
    /// `iss` claim.
    #[arg(long)]
    pub jwt_issuer: Option<String>,
    /// `aud` claim (repeat for several: an array).
    #[arg(long)]
    pub jwt_audience: Vec<String>,
    /// `kid` in the token header.
    #[arg(long)]
    pub jwt_kid: Option<String>,
    /// Extra claims, a JSON object merged over the defaults (`channels`, `publish`, `iss`, `aud` may be
    /// replaced; `sub`, `iat`, `exp` may not), e.g. '{"channels":["bench:*"]}'.
    #[arg(long, value_name = "JSON")]
    pub jwt_claims: Option<String>,
    /// Where the token goes: `query` (`?token=`), `header` (`Authorization: Bearer`) or `subprotocol`
    /// (`Sec-WebSocket-Protocol: throng.v1, bearer.<token>`; the 101 must select throng.v1). [default: query]
    #[arg(long, value_enum)]
    pub token_in: Option<TokenIn>,
    /// wss: trust the certificates in this PEM file (the server's CA, or a self-signed certificate itself)
    /// instead of the system's store.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// wss, benchmarking only: accept any server certificate (no chain or name check; the handshake
    /// signature is still verified). Never against a server that is not your own.
    #[arg(long)]
    pub insecure_skip_verify: bool,
    /// wss: server name for SNI and the certificate check (default: the URL host; an IP address is checked
    /// against the certificate's IP addresses and sends no SNI).
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// wss: TLS versions offered: `auto` (1.3 and 1.2, the server chooses), `1.2` or `1.3`.
    #[arg(long, value_enum, default_value_t = TlsVersion::Auto)]
    pub tls_version: TlsVersion,
    /// wss: no session resumption: every connection makes a full handshake (certificate check, signature).
    #[arg(long)]
    pub no_tls_resumption: bool,
    /// Request path (default: /ws for throng, /echo or /broadcast for raw, /echo for echo).
    #[arg(long)]
    pub path: Option<String>,
    /// Pin the bench to these CPUs (`1`, `0-1`, `2,3`).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Seed for WebSocket keys and mask keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Internal: run as worker K of P (`K/P`), speaking the worker protocol on stdin/stdout.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
    /// Testing only: `EVERY_MS:BUSY_MS` makes every event-loop thread spin (busy, neither sending nor
    /// reading) for BUSY_MS every EVERY_MS of the window, the first time EVERY_MS into it: a slow bench loop
    /// on demand.
    #[arg(long, hide = true)]
    pub test_busy: Option<String>,
}

/// The role a connection plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the connection, reads and answers pings.
    Idle,
    /// Sends stamped messages and measures their echo.
    Echo,
    /// Receives broadcast deliveries (throng: after subscribing).
    Sub,
    /// Throng publisher: sends `publish` commands, receives no deliveries.
    Pub,
    /// api-publish: an HTTP/1.1 connection sending `POST /api/publish` requests, closed loop.
    Api,
    /// Raw publisher: one of the `/broadcast` connections, so it also receives.
    PubSub,
    /// Churn: connects, upgrades (and subscribes), closes, repeatedly.
    Churn,
}

impl Role {
    /// True for roles that receive broadcast deliveries.
    pub fn receives(self) -> bool {
        matches!(self, Role::Sub | Role::PubSub)
    }
}

/// A validated run: everything the workers need, derived from [`Args`].
#[derive(Clone, Debug)]
pub struct Plan {
    /// What to measure.
    pub scenario: Scenario,
    /// Protocol spoken.
    pub target: Target,
    /// The server: the first `--url` (publishers, `/stats`, the TLS server name).
    pub url: WsUrl,
    /// Every `--url`, the first included: connection i goes to `urls[url_index(i, role)]`.
    pub urls: Vec<WsUrl>,
    /// The request path (with query, without the token).
    pub path: String,
    /// How throng broadcast subscribers receive.
    pub transport: Transport,
    /// `--transport sse`: the subscribers' request target, `/sse?channel=<channel>` (without the token);
    /// empty otherwise.
    pub sse_path: String,
    /// Measured receivers: echo connections, subscribers, or idle connections.
    pub receivers: u64,
    /// Connections held for the whole run (receivers plus throng publishers).
    pub total: u64,
    /// Publishers (broadcast, churn), else 0.
    pub publishers: u64,
    /// Aggregate message rate; `None` for closed-loop echo and for connect.
    pub rate: Option<f64>,
    /// Closed-loop echo: messages in flight per connection.
    pub inflight: u32,
    /// Payload size.
    pub size: usize,
    /// Measured window.
    pub duration_ns: u64,
    /// Receive-only time after the window.
    pub grace_ns: u64,
    /// api-publish: its settings (`None` for the other scenarios).
    pub api: Option<ApiPlan>,
    /// Receive pacing period during the window (0 = off).
    pub pace_ns: u64,
    /// Connections per second while ramping (all processes).
    pub ramp_rate: f64,
    /// Handshakes in flight at once (all processes).
    pub max_pending: u64,
    /// Per-connection handshake timeout.
    pub connect_timeout_ns: u64,
    /// Churn rate (all processes); 0 outside churn.
    pub churn_rate: f64,
    /// Channel for throng broadcast.
    pub channel: String,
    /// Source addresses, possibly empty (kernel's choice).
    pub source_ips: Vec<IpAddr>,
    /// Per-connection tokens, when the server wants them.
    pub auth: Option<Auth>,
    /// TLS settings for a `wss://` URL.
    pub tls: Option<TlsPlan>,
    /// Seed for keys and masks.
    pub seed: u64,
    /// Worker processes.
    pub procs: u32,
    /// Threads per process.
    pub threads: u32,
    /// Server PIDs to sample, summed (each also apart); empty: none.
    pub server_pids: Vec<u32>,
    /// Proxy PIDs to sample, summed (empty: no proxy figures).
    pub proxy_pids: Vec<u32>,
    /// Redis PIDs to sample, summed (empty: no Redis figures).
    pub redis_pids: Vec<u32>,
    /// CPUs to pin to.
    pub cpus: Option<Vec<usize>>,
    /// Machine-readable output.
    pub json: bool,
    /// When this process is worker `k` of `p`.
    pub worker: Option<(u32, u32)>,
    /// Testing only: every `.0` ns of the window, spin for `.1` ns (`--test-busy`).
    pub test_busy: Option<(u64, u64)>,
    /// Rooms: its settings (`None` for the other scenarios).
    pub rooms: Option<RoomsPlan>,
}

/// What the rooms scenario subscribes and publishes to.
#[derive(Clone, Debug)]
pub struct RoomsPlan {
    /// Members per group channel.
    pub group_size: u64,
    /// Group channels: `ceil(receivers / group_size)`.
    pub groups: u64,
    /// Share of publishes to personal channels.
    pub personal_share: f64,
    /// Personal channel prefix (`user:`).
    pub personal_prefix: String,
    /// Group moves per second over all subscribers (`--churn-rate`; 0: members stay in their groups).
    pub moves_per_s: f64,
    /// Reconnects per second over all subscribers (`--reconnect-rate`).
    pub reconnects_per_s: f64,
}

impl RoomsPlan {
    /// True when members move between groups: group deliveries are then accounted by the channel offsets
    /// of each membership (see `docs/benchmarks.md`, rooms).
    pub fn moving(&self) -> bool {
        self.moves_per_s > 0.0 || self.reconnects_per_s > 0.0
    }
}

/// The group channel prefix of the rooms scenario.
pub const ROOM_PREFIX: &str = "room:";

/// What api-publish's HTTP connections send.
#[derive(Clone, Debug)]
pub struct ApiPlan {
    /// Requests in flight per connection.
    pub pipeline: u32,
    /// Messages per request.
    pub batch: u32,
    /// The channel names, used round-robin.
    pub channels: Vec<String>,
    /// The key for `Authorization: apikey`.
    pub key: String,
}

/// Most messages in one `POST /api/publish` (the server's bound).
pub const MAX_API_BATCH: u32 = 1000;
/// Most channels a subscriber may be on at once (the server's default `max_subscriptions`).
pub const MAX_API_SUB_CHANNELS: u32 = 256;

/// The api-publish settings of `args`, checked.
fn api(args: &Args, channel: &str) -> Result<ApiPlan, Error> {
    let Some(key) = args.api_key.clone() else {
        return Err(Error::Config("api-publish needs --api-key (or THRONG_BENCH_API_KEY)".into()));
    };
    if key.is_empty() || key.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(Error::Config("--api-key must be printable ASCII without spaces".into()));
    }
    if args.pipeline == 0 || args.batch == 0 || args.channels == 0 {
        return Err(Error::Config("--pipeline, --batch and --channels must be at least 1".into()));
    }
    if args.batch > MAX_API_BATCH {
        return Err(Error::Config(format!("--batch is at most {MAX_API_BATCH} (the server's bound)")));
    }
    if args.subscribers > 0 && args.channels > MAX_API_SUB_CHANNELS {
        return Err(Error::Config(format!(
            "with --subscribers every subscriber joins every channel: --channels is then at most \
             {MAX_API_SUB_CHANNELS} (the server's default max_subscriptions)"
        )));
    }
    if args.rate.is_some() {
        return Err(Error::Config("api-publish is a closed loop: no --rate (use --pipeline and --connections)".into()));
    }
    let channels = (0..args.channels).map(|i| format!("{channel}-{i}")).collect();
    Ok(ApiPlan { pipeline: args.pipeline, batch: args.batch, channels, key })
}

/// The rooms settings of `args`, checked.
fn rooms(args: &Args, receivers: u64) -> Result<RoomsPlan, Error> {
    if args.group_size == 0 {
        return Err(Error::Config("--group-size must be at least 1".into()));
    }
    let prefix = args.personal_prefix.clone();
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || b"_.@=/-".contains(&b);
    if prefix.bytes().filter(|&b| b == b':').count() > 1 || !prefix.bytes().all(|b| b == b':' || name_ok(b)) {
        return Err(Error::Config(format!("--personal-prefix {prefix:?}: channel characters and one ':' at most")));
    }
    let user_ns = prefix == "user:";
    let share = args.personal_share.unwrap_or(if user_ns { 0.0 } else { 0.5 });
    if !(0.0..=1.0).contains(&share) {
        return Err(Error::Config(format!("--personal-share must be in 0..1 (got {share})")));
    }
    if user_ns && share > 0.0 {
        return Err(Error::Config(
            "clients may not publish to user: channels (docs/protocol.md, the backend does): --personal-share 0, \
             or --personal-prefix <namespace>: for one clients may publish to (e.g. inbox:)"
                .into(),
        ));
    }
    let groups = receivers.div_ceil(args.group_size);
    let moves_per_s = args.churn_rate.unwrap_or(0.0);
    if !moves_per_s.is_finite() || moves_per_s < 0.0 {
        return Err(Error::Config(format!("--churn-rate must be 0 or positive (got {moves_per_s})")));
    }
    if moves_per_s > 0.0 && groups < 2 {
        return Err(Error::Config("--churn-rate moves members between groups: it needs at least 2 groups".into()));
    }
    let reconnects_per_s = args.reconnect_rate;
    if !reconnects_per_s.is_finite() || reconnects_per_s < 0.0 {
        return Err(Error::Config(format!("--reconnect-rate must be 0 or positive (got {reconnects_per_s})")));
    }
    if reconnects_per_s > 0.0 && share > 0.0 {
        return Err(Error::Config(
            "--reconnect-rate needs --personal-share 0: personal deliveries are counted per publish, and a member \
             that is reconnecting misses them by design"
                .into(),
        ));
    }
    Ok(RoomsPlan {
        group_size: args.group_size,
        groups,
        personal_share: share,
        personal_prefix: prefix,
        moves_per_s,
        reconnects_per_s,
    })
}

/// How connections authenticate: a token per connection, signed by `minter`, sent in `token_in`.
#[derive(Clone, Debug)]
pub struct Auth {
    /// The parsed key and the claims.
    pub minter: Minter,
    /// Where the upgrade request carries the token.
    pub token_in: TokenIn,
}

/// The token settings of `args`: `None` without a secret or key (and then no other token option).
fn auth(args: &Args) -> Result<Option<Auth>, Error> {
    let claims = jwt::Claims {
        ttl_s: args.jwt_ttl.unwrap_or(jwt::DEFAULT_TTL_S),
        issuer: args.jwt_issuer.clone(),
        audience: args.jwt_audience.clone(),
        kid: args.jwt_kid.clone(),
        extra: args.jwt_claims.clone(),
    };
    if args.jwt_ttl == Some(0) {
        return Err(Error::Config("--jwt-ttl must be at least 1 second".into()));
    }
    let minter = match (&args.jwt_secret, &args.jwt_private_key) {
        (Some(_), Some(_)) => {
            return Err(Error::Config(
                "--jwt-secret (or THRONG_BENCH_JWT_SECRET) and --jwt-private-key exclude each other".into(),
            ))
        }
        (Some(secret), None) => match args.jwt_alg {
            None | Some(Alg::Hs256) => Minter::hs256(secret.as_bytes(), &claims)?,
            Some(a) => {
                return Err(Error::Config(format!(
                    "--jwt-alg {} signs with a private key (--jwt-private-key), not --jwt-secret",
                    a.name()
                )))
            }
        },
        (None, Some(path)) => {
            let pem =
                std::fs::read(path).map_err(|e| Error::Config(format!("--jwt-private-key {}: {e}", path.display())))?;
            Minter::from_pem(&pem, args.jwt_alg, &claims, &path.display().to_string())?
        }
        (None, None) => {
            let given = [
                ("--jwt-alg", args.jwt_alg.is_some()),
                ("--jwt-ttl", args.jwt_ttl.is_some()),
                ("--jwt-issuer", args.jwt_issuer.is_some()),
                ("--jwt-audience", !args.jwt_audience.is_empty()),
                ("--jwt-kid", args.jwt_kid.is_some()),
                ("--jwt-claims", args.jwt_claims.is_some()),
                ("--token-in", args.token_in.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(Error::Config(format!("{flag} needs --jwt-secret or --jwt-private-key")));
            }
            return Ok(None);
        }
    };
    Ok(Some(Auth { minter, token_in: args.token_in.unwrap_or(TokenIn::Query) }))
}

/// The TLS settings of `args`: `None` for a `ws://` URL (and then no TLS option).
fn tls(args: &Args, url: &WsUrl) -> Result<Option<TlsPlan>, Error> {
    if !url.tls {
        let given = [
            ("--ca-file", args.ca_file.is_some()),
            ("--insecure-skip-verify", args.insecure_skip_verify),
            ("--sni", args.sni.is_some()),
            ("--tls-version", args.tls_version != TlsVersion::Auto),
            ("--no-tls-resumption", args.no_tls_resumption),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(Error::Config(format!("{flag} needs a wss:// URL")));
        }
        return Ok(None);
    }
    if args.ca_file.is_some() && args.insecure_skip_verify {
        return Err(Error::Config("--ca-file and --insecure-skip-verify exclude each other".into()));
    }
    let opts = TlsOptions {
        ca_file: args.ca_file.clone(),
        insecure_skip_verify: args.insecure_skip_verify,
        sni: args.sni.clone(),
        version: args.tls_version,
        no_resumption: args.no_tls_resumption,
    };
    TlsPlan::new(&url.hostname, &opts).map(Some)
}

fn secs(name: &str, v: f64, min: f64) -> Result<u64, Error> {
    if !v.is_finite() || v < min {
        return Err(Error::Config(format!("--{name} must be at least {min} (got {v})")));
    }
    Ok((v * 1e9) as u64)
}

impl Plan {
    /// Validates `args` and derives the plan.
    pub fn from_args(args: &Args) -> Result<Plan, Error> {
        let urls = args.url.iter().flat_map(|u| split_urls(u)).map(parse_ws_url).collect::<Result<Vec<_>, _>>()?;
        let Some(url) = urls.first().cloned() else {
            return Err(Error::Config("--url is required".into()));
        };
        let s = args.scenario;
        let t = args.target;
        if urls.len() > 1 {
            if urls.iter().any(|u| u.tls != url.tls || u.path != url.path) {
                return Err(Error::Config("every --url must have the same scheme (ws or wss) and path".into()));
            }
            if url.tls && args.sni.is_none() && urls.iter().any(|u| u.hostname != url.hostname) {
                return Err(Error::Config(
                    "wss:// URLs with different host names: give the name every node's certificate has with --sni"
                        .into(),
                ));
            }
            if t == Target::Raw && matches!(s, Scenario::Broadcast | Scenario::Churn) {
                return Err(Error::Config(
                    "several --url with --target raw broadcast or churn: a raw /broadcast relays within one server"
                        .into(),
                ));
            }
        }
        let is_api = s == Scenario::ApiPublish;
        let connections = args.connections.unwrap_or(if is_api { 10 } else { 100 });
        let channel = args.channel.clone().unwrap_or_else(|| (if is_api { "bench:api" } else { "bench:0" }).into());
        if is_api && t == Target::Raw {
            return Err(Error::Config("api-publish drives Throng's backend API: no --target raw".into()));
        }
        let path = match (&args.path, &url.path) {
            (Some(p), _) | (None, Some(p)) => p.clone(),
            (None, None) => match (s, t) {
                (Scenario::Echo, _) => "/echo".into(),
                (_, Target::Throng) => "/ws".into(),
                (Scenario::Connect, Target::Raw) => "/echo".into(),
                (_, Target::Raw) => "/broadcast".into(),
            },
        };
        if !path.starts_with('/') {
            return Err(Error::Config(format!("path must start with / (got {path:?})")));
        }
        let is_rooms = s == Scenario::Rooms;
        let bcast = matches!(s, Scenario::Broadcast | Scenario::Churn | Scenario::Rooms);
        if is_rooms && t != Target::Throng {
            return Err(Error::Config("rooms runs against --target throng only (for now)".into()));
        }
        if args.procs == 0 || args.threads == 0 {
            return Err(Error::Config("--procs and --threads must be at least 1".into()));
        }
        if connections == 0 {
            return Err(Error::Config("--connections must be at least 1".into()));
        }
        let api = if is_api { Some(api(args, &channel)?) } else { None };
        // api-publish: the HTTP connections are its publishers, the subscribers its receivers.
        let publishers = if bcast {
            args.publishers
        } else if is_api {
            connections
        } else {
            0
        };
        if bcast && publishers == 0 {
            return Err(Error::Config("--publishers must be at least 1".into()));
        }
        if bcast && t == Target::Raw && publishers > connections {
            return Err(Error::Config("raw target: --publishers are among the --connections; too many".into()));
        }
        let receivers = if is_api { args.subscribers } else { connections };
        let rooms = if is_rooms { Some(rooms(args, receivers)?) } else { None };
        let total = if (bcast && t == Target::Throng) || is_api { receivers + publishers } else { connections };
        let rate = match s {
            Scenario::Connect | Scenario::ApiPublish => None,
            Scenario::Echo => args.rate,
            Scenario::Broadcast | Scenario::Rooms => Some(args.rate.unwrap_or(100.0)),
            Scenario::Churn => Some(args.rate.unwrap_or(10.0)),
        };
        if let Some(r) = rate {
            if !r.is_finite() || r <= 0.0 {
                return Err(Error::Config(format!("--rate must be positive (got {r})")));
            }
        }
        if args.inflight == 0 {
            return Err(Error::Config("--inflight must be at least 1".into()));
        }
        if !args.ramp_rate.is_finite() || args.ramp_rate <= 0.0 || args.max_pending == 0 {
            return Err(Error::Config("--ramp-rate and --max-pending must be positive".into()));
        }
        let churn_rate = args.churn_rate.unwrap_or(if s == Scenario::Churn { 100.0 } else { 0.0 });
        if s == Scenario::Churn && (!churn_rate.is_finite() || churn_rate <= 0.0) {
            return Err(Error::Config("--churn-rate must be positive".into()));
        }
        if channel.is_empty() || channel.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            return Err(Error::Config("--channel must be non-empty without quotes or backslashes".into()));
        }
        let window = if s == Scenario::Connect { args.hold.unwrap_or(args.duration) } else { args.duration };
        let worker = match &args.worker {
            None => None,
            Some(w) => {
                let bad = || Error::Config(format!("bad --worker {w:?}"));
                let (k, p) = w.split_once('/').ok_or_else(bad)?;
                let (k, p): (u32, u32) = (k.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?);
                if k >= p {
                    return Err(bad());
                }
                Some((k, p))
            }
        };
        let test_busy = match &args.test_busy {
            None => None,
            Some(v) => {
                let bad = || Error::Config(format!("bad --test-busy {v:?} (expected EVERY_MS:BUSY_MS)"));
                let (e, b) = v.split_once(':').ok_or_else(bad)?;
                let (e, b): (f64, f64) = (e.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if !(e > 0.0 && b >= 0.0 && b < e) {
                    return Err(bad());
                }
                Some(((e * 1e6) as u64, (b * 1e6) as u64))
            }
        };
        let tls = tls(args, &url)?;
        let sse_path = match args.transport {
            Transport::Ws => String::new(),
            Transport::Sse => {
                if s != Scenario::Broadcast || t != Target::Throng {
                    return Err(Error::Config("--transport sse is for broadcast with --target throng".into()));
                }
                if url.tls {
                    return Err(Error::Config("--transport sse runs over plain TCP: a ws:// or http:// URL".into()));
                }
                if args.token_in == Some(TokenIn::Subprotocol) {
                    return Err(Error::Config("--transport sse: --token-in query or header (no subprotocol)".into()));
                }
                sse_target(&channel)
            }
        };
        let mut seen = std::collections::HashMap::new();
        for (flag, pids) in
            [("--server-pid", &args.server_pid), ("--proxy-pid", &args.proxy_pid), ("--redis-pid", &args.redis_pid)]
        {
            for &pid in pids {
                if pid == 0 {
                    return Err(Error::Config(format!("{flag} 0: not a process")));
                }
                match seen.insert(pid, flag) {
                    Some(f) if f == flag => {
                        return Err(Error::Config(format!("{flag} {pid}: given twice (it would count twice)")))
                    }
                    Some(f) => return Err(Error::Config(format!("{flag} {pid} is also the {f}"))),
                    None => {}
                }
            }
        }
        Ok(Plan {
            scenario: s,
            target: t,
            url,
            urls,
            path,
            transport: args.transport,
            sse_path,
            receivers,
            total,
            publishers,
            rate,
            inflight: args.inflight,
            size: args.size,
            duration_ns: secs(if s == Scenario::Connect { "hold" } else { "duration" }, window, 0.1)?,
            grace_ns: secs("grace", args.grace, 0.0)?,
            api,
            pace_ns: secs("pace-ms", args.pace_ms / 1000.0, 0.0)?,
            ramp_rate: args.ramp_rate,
            max_pending: args.max_pending,
            connect_timeout_ns: secs("connect-timeout", args.connect_timeout, 0.1)?,
            churn_rate: if s == Scenario::Churn { churn_rate } else { 0.0 },
            channel,
            source_ips: match &args.source_ips {
                Some(v) => parse_source_ips(v)?,
                None => Vec::new(),
            },
            auth: auth(args)?,
            tls,
            seed: args.seed,
            procs: args.procs,
            threads: args.threads,
            server_pids: args.server_pid.clone(),
            proxy_pids: args.proxy_pid.clone(),
            redis_pids: args.redis_pid.clone(),
            cpus: args.cpu.as_deref().map(parse_cpu_list).transpose()?,
            json: args.json,
            worker,
            test_busy,
            rooms,
        })
    }

    /// The role of the connection with global index `i` (`0..total`).
    pub fn role(&self, i: u64) -> Role {
        match self.scenario {
            Scenario::Connect => Role::Idle,
            Scenario::Echo => Role::Echo,
            Scenario::Broadcast | Scenario::Churn | Scenario::Rooms => match (self.publisher_id(i), self.target) {
                (Some(_), Target::Throng) => Role::Pub,
                (Some(_), Target::Raw) => Role::PubSub,
                (None, _) => Role::Sub,
            },
            Scenario::ApiPublish => match self.publisher_id(i) {
                Some(_) => Role::Api,
                None => Role::Sub,
            },
        }
    }

    /// The stamp ids a receiver tracks a sequence for: the publishers (broadcast, churn); api-publish: one
    /// per (HTTP connection, channel), the order the server keeps (a connection's messages to one channel
    /// are published in the order sent; to different channels, homed on different shards, they may be
    /// delivered in another order).
    pub fn senders(&self) -> u64 {
        match (&self.api, &self.rooms) {
            (Some(a), _) => self.publishers * a.channels.len() as u64,
            // Rooms: a stamp id per (publisher, personal or group): `2 * publisher + kind`; the sequence is
            // the publisher's per channel, so a receiver sees each of its two channels in order.
            (None, Some(_)) => self.publishers * 2,
            (None, None) => self.publishers,
        }
    }

    /// Rooms: the members of group `k` (the last group may be short).
    pub fn group_members(&self, k: u64) -> u64 {
        match &self.rooms {
            Some(r) => self.receivers.saturating_sub(k * r.group_size).min(r.group_size),
            None => 0,
        }
    }

    /// Publishers are spread evenly over the connection indices: the one at `i` has id `i / stride`.
    pub fn publisher_id(&self, i: u64) -> Option<u64> {
        if self.publishers == 0 {
            return None;
        }
        if self.rooms.is_some() {
            // Rooms: subscriber i is connection i (user `bench-<i>`); the publishers come after them.
            return (i >= self.receivers && i < self.total).then(|| i - self.receivers);
        }
        let stride = (self.total / self.publishers).max(1);
        (i.is_multiple_of(stride) && i / stride < self.publishers).then_some(i / stride)
    }

    /// The index in `urls` of the connection with global index `gidx` playing `role`: publishers (and
    /// api-publish's HTTP connections) on the first URL, every other connection on URL `gidx mod N`.
    pub fn url_index(&self, gidx: u64, role: Role) -> usize {
        let n = self.urls.len() as u64;
        if n <= 1 || matches!(role, Role::Pub | Role::PubSub | Role::Api) {
            0
        } else {
            (gidx % n) as usize
        }
    }

    /// How many of the connections held for the whole run (`0..total`) go to each URL.
    pub fn connections_per_url(&self) -> Vec<u64> {
        let mut per = vec![0; self.urls.len()];
        for i in 0..self.total {
            per[self.url_index(i, self.role(i))] += 1;
        }
        per
    }

    /// The first `--server-pid` (the only one, for a single node).
    pub fn server_pid(&self) -> Option<u32> {
        self.server_pids.first().copied()
    }

    /// True when throng subscribers must subscribe (and be acknowledged) before they count as ready.
    pub fn subscribes(&self) -> bool {
        self.target == Target::Throng
            && matches!(self.scenario, Scenario::Broadcast | Scenario::Churn | Scenario::ApiPublish | Scenario::Rooms)
    }
}

/// The URLs of one `--url` value: `a,b,c` split at the commas followed by a scheme (`ws://`, `wss://`,
/// `http://`, `https://`), so a comma inside a URL's query stays in it.
pub fn split_urls(v: &str) -> Vec<&str> {
    let schemes = ["ws://", "wss://", "http://", "https://"];
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in v.match_indices(',') {
        if schemes.iter().any(|sch| v[i + 1..].trim_start().starts_with(sch)) {
            out.push(v[start..i].trim());
            start = i + 1;
        }
    }
    out.push(v[start..].trim());
    out
}

/// `/sse?channel=<channel>`, the channel percent-encoded where a query needs it.
fn sse_target(channel: &str) -> String {
    let mut t = String::from("/sse?channel=");
    for b in channel.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@/!$'()*,;".contains(&b) {
            t.push(b as char);
        } else {
            t.push_str(&format!("%{b:02X}"));
        }
    }
    t
}

/// Part `k` of `n` equal contiguous parts of `0..total`.
pub fn split(total: u64, n: u64, k: u64) -> (u64, u64) {
    let base = total / n;
    let extra = total % n;
    let lo = k * base + k.min(extra);
    let hi = lo + base + u64::from(k < extra);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["throng-bench"];
        v.extend_from_slice(args);
        Plan::from_args(&Args::parse_from(v)).unwrap()
    }

    #[test]
    fn splits_cover_everything() {
        for total in [0u64, 1, 7, 100, 10_001] {
            for n in 1..5u64 {
                let mut next = 0;
                for k in 0..n {
                    let (lo, hi) = split(total, n, k);
                    assert_eq!(lo, next);
                    next = hi;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn roles_and_paths() {
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1", "--connections", "10", "--publishers", "2"]);
        assert_eq!((p.total, p.path.as_str()), (12, "/ws"));
        let pubs: Vec<u64> = (0..p.total).filter_map(|i| p.publisher_id(i)).collect();
        assert_eq!(pubs, vec![0, 1]);
        assert_eq!((0..p.total).filter(|&i| p.role(i) == Role::Pub).count(), 2);
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1", "--target", "raw", "--connections", "10"]);
        assert_eq!((p.total, p.path.as_str(), p.role(0), p.role(1)), (10, "/broadcast", Role::PubSub, Role::Sub));
        let p = plan(&["echo", "--url", "ws://127.0.0.1:1/custom"]);
        assert_eq!((p.path.as_str(), p.rate), ("/custom", None));
        let p = plan(&["connect", "--url", "ws://127.0.0.1:1", "--hold", "3", "--target", "raw"]);
        assert_eq!((p.path.as_str(), p.duration_ns), ("/echo", 3_000_000_000));
    }

    #[test]
    fn sse_transport() {
        let p = plan(&["broadcast", "--url", "http://127.0.0.1:1", "--transport", "sse", "--channel", "a:b c&d"]);
        assert_eq!(
            (p.transport, p.sse_path.as_str(), p.path.as_str()),
            (Transport::Sse, "/sse?channel=a:b%20c%26d", "/ws")
        );
        assert_eq!(p.role(0), Role::Pub);
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1"]);
        assert_eq!((p.transport, p.sse_path.as_str()), (Transport::Ws, ""));
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench"];
            v.extend_from_slice(args);
            v.extend_from_slice(&["--transport", "sse"]);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&["echo", "--url", "ws://127.0.0.1:1"]).contains("broadcast"));
        assert!(err(&["broadcast", "--url", "ws://127.0.0.1:1", "--target", "raw"]).contains("throng"));
        assert!(err(&["broadcast", "--url", "wss://127.0.0.1:1", "--insecure-skip-verify"]).contains("plain"));
        let sub = ["broadcast", "--url", "ws://127.0.0.1:1", "--jwt-secret", "s", "--token-in", "subprotocol"];
        assert!(err(&sub).contains("subprotocol"));
    }

    #[test]
    fn api_publish_options() {
        let p = plan(&["api-publish", "--url", "http://127.0.0.1:1", "--api-key", "k", "--subscribers", "3"]);
        let a = p.api.as_ref().unwrap();
        assert_eq!((p.publishers, p.receivers, p.total, p.path.as_str()), (10, 3, 13, "/ws"));
        assert_eq!((a.pipeline, a.batch, a.channels.len()), (1, 1, 16));
        assert_eq!((a.channels[0].as_str(), a.channels[15].as_str()), ("bench:api-0", "bench:api-15"));
        assert_eq!((0..p.total).filter(|&i| p.role(i) == Role::Api).count(), 10);
        // A sequence per (connection, channel).
        assert_eq!(p.senders(), 160);
        assert!(plan(&["echo", "--url", "ws://127.0.0.1:1"]).api.is_none());
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench", "api-publish", "--url", "ws://127.0.0.1:1"];
            v.extend_from_slice(args);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&[]).contains("--api-key"));
        assert!(err(&["--api-key", "k", "--batch", "1001"]).contains("--batch"));
        assert!(err(&["--api-key", "k", "--pipeline", "0"]).contains("--pipeline"));
        assert!(err(&["--api-key", "k", "--rate", "10"]).contains("closed loop"));
        assert!(err(&["--api-key", "k", "--subscribers", "1", "--channels", "300"]).contains("--channels"));
        assert!(err(&["--api-key", "has space"]).contains("--api-key"));
    }

    #[test]
    fn proxy_pids_repeat_or_comma_separated() {
        let p = plan(&["echo", "--url", "ws://127.0.0.1:1", "--proxy-pid", "10,11", "--proxy-pid", "12"]);
        assert_eq!(p.proxy_pids, vec![10, 11, 12]);
        assert!(plan(&["echo", "--url", "ws://127.0.0.1:1"]).proxy_pids.is_empty());
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench", "echo", "--url", "ws://127.0.0.1:1"];
            v.extend_from_slice(args);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&["--proxy-pid", "10,10"]).contains("twice"));
        assert!(err(&["--proxy-pid", "7", "--server-pid", "7"]).contains("--server-pid"));
    }

    #[test]
    fn several_urls() {
        let one = "ws://127.0.0.1:1";
        let p = plan(&["broadcast", "--url", one, "--connections", "9", "--publishers", "2"]);
        assert_eq!((p.urls.len(), p.connections_per_url()), (1, vec![11]));
        assert!((0..p.total).all(|i| p.url_index(i, p.role(i)) == 0));
        // Repeated, or comma-separated: the same three nodes.
        let urls = "ws://127.0.0.1:1,ws://127.0.0.1:2,ws://127.0.0.1:3";
        let rep = ["--url", one, "--url", "ws://127.0.0.1:2", "--url", "ws://127.0.0.1:3"];
        let a = plan(&[&["broadcast", "--connections", "9", "--publishers", "2"][..], &rep[..]].concat());
        let b = plan(&["broadcast", "--url", urls, "--connections", "9", "--publishers", "2"]);
        assert_eq!(a.urls, b.urls);
        assert_eq!(b.urls.iter().map(|u| u.addr.port()).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(b.url, b.urls[0]);
        // Connection i on URL i mod 3, the publishers (connections 0 and 5 of 11) on the first.
        let on: Vec<usize> = (0..b.total).map(|i| b.url_index(i, b.role(i))).collect();
        assert_eq!(on, vec![0, 1, 2, 0, 1, 0, 0, 1, 2, 0, 1]);
        assert_eq!((b.role(0), b.role(5)), (Role::Pub, Role::Pub));
        assert_eq!(b.connections_per_url(), vec![5, 4, 2]);
        // Echo and connect: every connection by its index, across processes and threads.
        let e = plan(&["echo", "--url", urls, "--connections", "7", "--procs", "2", "--threads", "2"]);
        assert_eq!(e.connections_per_url(), vec![3, 2, 2]);
        let c = plan(&["connect", "--url", urls, "--connections", "6"]);
        assert_eq!(c.connections_per_url(), vec![2, 2, 2]);
        // api-publish: the HTTP connections on the first, the subscribers spread.
        let two = "http://127.0.0.1:1,http://127.0.0.1:2";
        let api = plan(&["api-publish", "--url", two, "--api-key", "k", "--subscribers", "4"]);
        assert_eq!((api.total, api.connections_per_url()), (14, vec![12, 2]));
        assert!((0..10).all(|i| api.url_index(i, Role::Api) == 0));
        assert_eq!(api.url_index(11, Role::Sub), 1);
        // Rooms: subscriber i on URL i mod N, the publishers after them on the first.
        let r = plan(&["rooms", "--url", "ws://127.0.0.1:1,ws://127.0.0.1:2", "--connections", "4"]);
        assert_eq!(r.connections_per_url(), vec![3, 2]);
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench"];
            v.extend_from_slice(args);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&["echo", "--url", "ws://127.0.0.1:1,wss://127.0.0.1:2"]).contains("scheme"));
        assert!(err(&["echo", "--url", "ws://127.0.0.1:1/a,ws://127.0.0.1:2/b"]).contains("path"));
        assert!(err(&["broadcast", "--url", "ws://127.0.0.1:1,ws://127.0.0.1:2", "--target", "raw"]).contains("raw"));
        let wss = ["echo", "--url", "wss://localhost:1,wss://127.0.0.1:2", "--insecure-skip-verify"];
        assert!(err(&wss).contains("--sni"));
        let p = plan(&[&wss[..], &["--sni", "localhost"][..]].concat());
        assert_eq!(p.urls.len(), 2);
    }

    #[test]
    fn url_lists_split_before_a_scheme() {
        assert_eq!(split_urls("ws://a:1"), vec!["ws://a:1"]);
        assert_eq!(
            split_urls("ws://a:1, wss://b:2,http://c,https://d"),
            vec!["ws://a:1", "wss://b:2", "http://c", "https://d"]
        );
        // A comma inside a URL's query stays in it.
        assert_eq!(split_urls("ws://a:1/ws?x=1,2,ws://b:2"), vec!["ws://a:1/ws?x=1,2", "ws://b:2"]);
    }

    #[test]
    fn server_and_redis_pids() {
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1", "--server-pid", "10,11", "--server-pid", "12"]);
        assert_eq!((p.server_pids.clone(), p.server_pid()), (vec![10, 11, 12], Some(10)));
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1", "--server-pid", "10"]);
        assert_eq!((p.server_pids.clone(), p.server_pid(), p.redis_pids.clone()), (vec![10], Some(10), vec![]));
        assert_eq!(plan(&["echo", "--url", "ws://127.0.0.1:1"]).server_pid(), None);
        let p = plan(&["broadcast", "--url", "ws://127.0.0.1:1", "--redis-pid", "20", "--redis-pid", "21,22"]);
        assert_eq!(p.redis_pids, vec![20, 21, 22]);
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench", "broadcast", "--url", "ws://127.0.0.1:1"];
            v.extend_from_slice(args);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&["--server-pid", "10,10"]).contains("twice"));
        assert!(err(&["--server-pid", "0"]).contains("--server-pid 0"));
        assert!(err(&["--redis-pid", "7,7"]).contains("twice"));
        assert!(err(&["--redis-pid", "7", "--server-pid", "8,7"]).contains("--redis-pid 7 is also the --server-pid"));
        assert!(err(&["--redis-pid", "7", "--proxy-pid", "7"]).contains("--redis-pid 7 is also the --proxy-pid"));
    }

    #[test]
    fn tls_options() {
        let p = plan(&["echo", "--url", "wss://127.0.0.1:1", "--insecure-skip-verify", "--sni", "example.test"]);
        let t = p.tls.unwrap();
        assert_eq!((t.verify, t.resumption), ("none", true));
        assert_eq!(t.server_name.to_str(), "example.test");
        let p = plan(&["echo", "--url", "wss://localhost:1", "--insecure-skip-verify", "--no-tls-resumption"]);
        assert!(!p.tls.unwrap().resumption);
        assert!(plan(&["echo", "--url", "ws://127.0.0.1:1"]).tls.is_none());
        let err = |args: &[&str]| {
            let mut v = vec!["throng-bench"];
            v.extend_from_slice(args);
            Plan::from_args(&Args::parse_from(v)).unwrap_err().to_string()
        };
        assert!(err(&["echo", "--url", "ws://127.0.0.1:1", "--insecure-skip-verify"]).contains("wss://"));
        assert!(err(&["echo", "--url", "ws://127.0.0.1:1", "--tls-version", "1.2"]).contains("--tls-version"));
        let both = ["echo", "--url", "wss://127.0.0.1:1", "--insecure-skip-verify", "--ca-file", "/nonexistent"];
        assert!(err(&both).contains("exclude"));
        assert!(err(&["echo", "--url", "wss://127.0.0.1:1", "--ca-file", "/nonexistent.pem"]).contains("--ca-file"));
    }
}
