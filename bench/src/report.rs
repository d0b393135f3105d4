//! The result of a run: derived figures (rates, loss, CPU per message, memory per connection), the JSON
//! form (`--json`) and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::addr::WsUrl;
use crate::cli::{Plan, Scenario};
use crate::hist::Summary;
use crate::load::{SAMPLE_NS, SATURATED, SIGNIFICANT};
use crate::sys::{ServerSample, ThreadsSample};
use crate::tally::Tally;

/// Server readings taken by the coordinator.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// Before the first connection.
    pub before: ServerSample,
    /// At the start of the window (all connections ready).
    pub at_go: ServerSample,
    /// At the end of the window (connections still held).
    pub at_window_end: ServerSample,
    /// At the end of the grace period, before the sockets close.
    pub at_end: ServerSample,
    /// Seconds from the first connection attempt until all were ready.
    pub connect_s: f64,
    /// Where the readings came from: `proc`, `stats` or `none`.
    pub server_source: &'static str,
    /// True once the window started (false when no connection was ready and it was skipped).
    pub windowed: bool,
    /// The proxy's processes (`--proxy-pid`), summed, read just after the server at each of its points.
    pub proxy_before: ServerSample,
    /// At the start of the window.
    pub proxy_at_go: ServerSample,
    /// At the end of the window.
    pub proxy_at_window_end: ServerSample,
    /// At the end of the grace period.
    pub proxy_at_end: ServerSample,
    /// Each `--server-pid` apart (in their order), read with the server's sum at its points.
    pub nodes: Vec<Points>,
    /// Each `--server-pid`'s `throng-relay` thread(s), at the start of the window.
    pub relay_at_go: Vec<ThreadsSample>,
    /// The same at the end of the grace period.
    pub relay_at_end: Vec<ThreadsSample>,
    /// The Redis processes (`--redis-pid`), summed, read with the proxy at its points.
    pub redis: Points,
}

/// Readings of one process (or a summed set) at the coordinator's four points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Points {
    /// Before the first connection.
    pub before: ServerSample,
    /// At the start of the window.
    pub at_go: ServerSample,
    /// At the end of the window.
    pub at_window_end: ServerSample,
    /// At the end of the grace period.
    pub at_end: ServerSample,
}

impl Points {
    /// CPU from the start of the window to the end of the grace period, ns.
    pub fn cpu_ns(&self) -> Option<u64> {
        self.at_go.cpu_ns.zip(self.at_end.cpu_ns).map(|(a, b)| b.saturating_sub(a))
    }

    /// Whether a reading that was taken is missing (the process exited, or was never there).
    pub fn any_missing(&self, windowed: bool) -> bool {
        let taken: &[ServerSample] =
            if windowed { &[self.before, self.at_go, self.at_window_end, self.at_end] } else { &[self.before] };
        taken.iter().any(|x| x.cpu_ns.is_none())
    }
}

/// Connection figures.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectReport {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections upgraded (101).
    pub established: u64,
    /// Connections ready for the window (throng subscribers: subscribed).
    pub ready: u64,
    /// Connections that failed before they were ready.
    pub failed: u64,
    /// Failures by kind: `refused`, `timeout`, `status_NNN`, `reset`, `addr_unavailable`, ...
    pub errors: BTreeMap<String, u64>,
    /// Connections open at the end of the window.
    pub held: u64,
    /// Ready connections the server closed during the run.
    pub dropped: u64,
    /// Why they were closed.
    pub drop_reasons: BTreeMap<String, u64>,
    /// Seconds to ramp up all connections.
    pub ramp_s: f64,
    /// Connections ready per second of ramp.
    pub per_s: f64,
    /// TCP connect (+ TLS handshake) + upgrade latency, µs.
    pub latency_us: Summary,
    /// Server CPU (with `--server-pid`) from before the first connection until all were ready, seconds: what
    /// the ramp cost the server (its accepts, upgrades, token checks, and for throng the welcome and any
    /// subscribe).
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` per ready connection, µs.
    pub server_cpu_us_per_conn: Option<f64>,
    /// The proxy's CPU (with `--proxy-pid`: all its processes and threads) over the same span, seconds: its
    /// accepts, TLS handshakes and upgrades toward the server.
    pub proxy_cpu_s: Option<f64>,
    /// `proxy_cpu_s` per ready connection, µs.
    pub proxy_cpu_us_per_conn: Option<f64>,
    /// The bench's CPU over the ramp, seconds (all threads, from the start of the ramp until each had its
    /// connections resolved): what connecting cost the client (TLS handshakes above all).
    pub client_cpu_s: f64,
    /// `client_cpu_s` per connection attempted, µs.
    pub client_cpu_us_per_conn: Option<f64>,
    /// Share of the bench's CPUs used over the ramp (`client_cpu_s` / (`ramp_s` × cores)): near 1, the
    /// connect rate and latencies were the client's limit, not the server's.
    pub client_utilization: f64,
}

/// TLS figures (`wss://`).
#[derive(Clone, Debug, Serialize)]
pub struct TlsReport {
    /// Negotiated by the first handshake that completed: `TLSv1.3` or `TLSv1.2`.
    pub version: Option<String>,
    /// Its cipher suite (`TLS13_AES_128_GCM_SHA256`, ...).
    pub cipher_suite: Option<String>,
    /// Its key exchange group (`X25519`, ...).
    pub kx_group: Option<String>,
    /// How the server certificate was checked: `ca-file`, `system` or `none` (`--insecure-skip-verify`).
    pub verify: &'static str,
    /// The name sent as SNI and checked (an IP address is checked against the certificate, not sent).
    pub server_name: String,
    /// Whether sessions were resumed when the cache had one (off with `--no-tls-resumption`).
    pub resumption: bool,
    /// Handshakes completed (churn connections included).
    pub handshakes: u64,
    /// Those that resumed a session (no certificate check, no signature).
    pub resumed: u64,
    /// Handshake time: TCP connected to handshake done, µs.
    pub handshake_us: Summary,
    /// Client CPU per handshake (in rustls: key exchange, certificate check, signature), µs.
    pub handshake_cpu_us: Summary,
    /// The first handshake failure's message.
    pub first_error: Option<String>,
}

/// Message figures (echo, broadcast, churn).
///
/// Every message counted was scheduled inside the window. `expected` = `received` + `late` + `lost`;
/// duplicates and stale copies are counted apart and never make up for a lost message.
#[derive(Clone, Debug, Serialize)]
pub struct MessageReport {
    /// Messages sent in the window.
    pub sent: u64,
    /// Messages scheduled in the window but not sent (backlog over 4 MiB, or the sender's connection was not
    /// open): lost messages, counted in `expected` and `lost`.
    pub skipped: u64,
    /// Distinct stamped messages (echoes or deliveries) that arrived before the end of the window.
    pub received: u64,
    /// Distinct stamped messages that arrived after the window, in the grace period (not in the rate).
    pub late: u64,
    /// `received` + `late`: distinct messages that arrived by the end of the grace period.
    pub delivered: u64,
    /// Messages that should have arrived: echo: sent + skipped; broadcast: (sent + skipped) × `receivers`,
    /// every subscriber requested, ready or not.
    pub expected: u64,
    /// Expected but not delivered by the end of the grace period: `expected` − `received` − `late`.
    pub lost: u64,
    /// Copies of messages already received.
    pub duplicates: u64,
    /// Messages too far behind their sender's newest to tell from copies (counted neither way).
    pub stale: u64,
    /// Messages missing in a sender's sequence before one received later, still missing at the end.
    pub gaps: u64,
    /// Messages that arrived after a later one from the same sender (and so filled a gap).
    pub reordered: u64,
    /// Messages without a readable stamp (or not this connection's, for echo).
    pub unparsed: u64,
    /// Sends skipped because a connection's unsent backlog was over 4 MiB (part of `skipped`).
    pub backpressured: u64,
    /// v1 `error` replies.
    pub v1_errors: u64,
    /// Receivers the server should have served: echo connections, or subscribers requested.
    pub receivers: u64,
    /// Those that became ready (the rest count as failed connections, and their messages as lost).
    pub receivers_ready: u64,
    /// Sent per second of window.
    pub sent_per_s: f64,
    /// `expected` per second of window: the load offered.
    pub expected_per_s: f64,
    /// `received` (in the window) per second of window.
    pub received_per_s: f64,
    /// Latency of `received`, from the scheduled send time to arrival, µs.
    pub latency_us: Summary,
    /// Latency of `late` messages, µs.
    pub late_latency_us: Summary,
    /// How far behind schedule fixed-rate sends went out (the bench's own lag, included in the latencies), µs.
    pub send_lag_us: Summary,
}

/// api-publish figures: `POST /api/publish` requests, closed loop over keep-alive connections.
///
/// A request counts where its response arrived: in the window (`ok`, `published`, `latency_us`, the rates)
/// or in the grace period (`ok_late`, `published_late`, `late_latency_us`). Every request that did not get a
/// `200` with an offset for each of its messages is in `errors`, by status or kind.
#[derive(Clone, Debug, Serialize)]
pub struct ApiReport {
    /// HTTP connections.
    pub connections: u64,
    /// Requests in flight per connection.
    pub pipeline: u32,
    /// Messages per request.
    pub batch: u32,
    /// Channels used round-robin.
    pub channels: usize,
    /// Requests sent in the window.
    pub requests_sent: u64,
    /// Messages in them.
    pub messages_sent: u64,
    /// `200` responses with every message's offset, arrived in the window.
    pub ok: u64,
    /// The same, arrived in the grace period (not in the rates).
    pub ok_late: u64,
    /// `ok` per second of window.
    pub requests_per_s: f64,
    /// Messages published (an offset returned) in the window's responses.
    pub published: u64,
    /// The same in the grace period's.
    pub published_late: u64,
    /// `published` per second of window.
    pub messages_per_s: f64,
    /// Messages refused inside a `200` (a batch's per-message errors).
    pub message_errors: u64,
    /// Failed requests (the sum of `errors`).
    pub failed: u64,
    /// Failed requests by HTTP status (`401`, `404`, `503`, ...) or kind: `200_incomplete` (a `200` short
    /// of offsets), `closed` (in flight when the server closed the connection), `unanswered` (no response by
    /// the end of the grace period), `bad_response`, `unexpected_response`.
    pub errors: BTreeMap<String, u64>,
    /// Request latency (sent to its `200` parsed) of the window's responses, µs.
    pub latency_us: Summary,
    /// The same for the grace period's, µs.
    pub late_latency_us: Summary,
    /// With `--server-pid`: the server's CPU from the start of the window to the end of the grace period
    /// per `200` (deliveries to `--subscribers` included), µs.
    pub server_cpu_us_per_request: Option<f64>,
    /// The same per message published, µs.
    pub server_cpu_us_per_message: Option<f64>,
}

/// Churn figures.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    /// Churn connections started.
    pub opened: u64,
    /// Completed connect-upgrade-close cycles.
    pub completed: u64,
    /// Failed cycles.
    pub failed: u64,
    /// Completed cycles per second of window.
    pub per_s: f64,
    /// Handshake latency, µs.
    pub handshake_us: Summary,
    /// Server CPU µs per completed cycle (the steady connections' traffic included), with `--server-pid`.
    pub server_cpu_us_per_cycle: Option<f64>,
}

/// Rooms group moves (`--churn-rate`): members leaving their group and joining another.
#[derive(Clone, Debug, Serialize)]
pub struct MovesReport {
    /// Moves per second asked for (`--churn-rate`).
    pub rate: f64,
    /// Leaves started (`unsubscribe` sent).
    pub leaves_started: u64,
    /// Leaves confirmed (`unsubscribed`).
    pub leaves: u64,
    /// Joins confirmed (`subscribed` to the next group).
    pub joins: u64,
    /// Confirmed leaves per second of window.
    pub leaves_per_s: f64,
    /// Confirmed joins per second of window.
    pub joins_per_s: f64,
    /// Moves due while no member of a thread was free to move.
    pub skipped: u64,
    /// Leaves or joins the server refused (`error`).
    pub refused: u64,
    /// Group messages received outside a confirmed membership (should be 0).
    pub strays: u64,
    /// `unsubscribe` to `unsubscribed`, µs.
    pub leave_latency_us: Summary,
    /// `subscribe` to `subscribed`, µs.
    pub join_latency_us: Summary,
    /// Memberships still open at the end (they expect their groups' offsets up to the last published).
    pub open_at_end: u64,
    /// Reconnects per second asked for (`--reconnect-rate`).
    pub reconnect_rate: f64,
    /// Connections dropped to reconnect.
    pub reconnects_started: u64,
    /// Reconnected with both subscriptions confirmed.
    pub reconnects: u64,
    /// Reconnected per second of window.
    pub reconnects_per_s: f64,
    /// Reconnects that failed.
    pub reconnects_failed: u64,
    /// Connect to both `subscribed`, µs.
    pub reconnect_latency_us: Summary,
}

/// Server resource figures.
#[derive(Clone, Debug, Serialize)]
pub struct ServerReport {
    /// Server PID when given (the first of several `--server-pid`).
    pub pid: Option<u32>,
    /// Every `--server-pid`: the figures below are their sums (CPU, RSS), and `nodes` has each apart.
    pub pids: Vec<u32>,
    /// `proc` (`--server-pid`) or `stats` (its `/stats` endpoint, RSS only).
    pub source: &'static str,
    /// Server CPU seconds from the start of the window to the end of the grace period.
    pub cpu_s: Option<f64>,
    /// That CPU time in cores (1.0 = one core busy) over the window and grace.
    pub cpu_cores: Option<f64>,
    /// Server CPU µs per message received by the bench (per echo, per delivery); echo and broadcast only.
    pub cpu_us_per_msg: Option<f64>,
    /// RSS before the first connection.
    pub rss_before_bytes: Option<u64>,
    /// RSS at the end of the window, connections held.
    pub rss_held_bytes: Option<u64>,
    /// Growth of RSS per connection held: (held − before) / connections held.
    pub rss_per_conn_bytes: Option<f64>,
    /// CPU seconds of the `throng-relay` threads of every node over the window and grace (none found on
    /// any node: `None`).
    pub relay_cpu_s: Option<f64>,
    /// That per message published (a publish is relayed once through Redis), µs.
    pub relay_cpu_us_per_publish: Option<f64>,
    /// Each `--server-pid` apart (empty without one).
    pub nodes: Vec<NodeReport>,
}

/// One node of several (`--server-pid` given more than once, or once): its own share of the server figures.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    /// Its PID.
    pub pid: u32,
    /// CPU seconds from the start of the window to the end of the grace period (all its threads).
    pub cpu_s: Option<f64>,
    /// That in cores over the window and grace.
    pub cpu_cores: Option<f64>,
    /// Its CPU per message received by the bench (all nodes' messages), µs.
    pub cpu_us_per_msg: Option<f64>,
    /// RSS before the first connection.
    pub rss_before_bytes: Option<u64>,
    /// RSS with the connections held (as the server's `rss_held_bytes`).
    pub rss_held_bytes: Option<u64>,
    /// Threads named `throng-relay` at the end of the grace period (0: no relay on this node).
    pub relay_threads: usize,
    /// Their CPU seconds over the window and grace (`None` without such a thread).
    pub relay_cpu_s: Option<f64>,
    /// That per message published (all publishers), µs.
    pub relay_cpu_us_per_publish: Option<f64>,
    /// Its relay's share of its CPU.
    pub relay_share: Option<f64>,
}

/// One `--url` and the connections it got.
#[derive(Clone, Debug, Serialize)]
pub struct UrlReport {
    /// `ws://host:port` (or `wss://`, `http://`...), as the summary names the first.
    pub url: String,
    /// Connections planned on it (publishers on the first).
    pub connections: u64,
    /// Those that became ready (with one URL: every ready connection).
    pub ready: u64,
}

/// The Redis the nodes relay through (`--redis-pid`): its processes summed, sampled at the server's points.
#[derive(Clone, Debug, Serialize)]
pub struct RedisReport {
    /// The PIDs sampled.
    pub pids: Vec<u32>,
    /// CPU seconds from the start of the window to the end of the grace period.
    pub cpu_s: Option<f64>,
    /// That in cores over the window and grace.
    pub cpu_cores: Option<f64>,
    /// That per message published, µs.
    pub cpu_us_per_publish: Option<f64>,
    /// RSS (summed) before the first connection.
    pub rss_before_bytes: Option<u64>,
    /// RSS at the end of the window.
    pub rss_held_bytes: Option<u64>,
}

/// Resource figures of a proxy in front of the server (`--proxy-pid`): its processes summed, sampled at the
/// server's points, so `cpu_us_per_msg` here plus the server's is the cost of a message through both.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyReport {
    /// The PIDs sampled.
    pub pids: Vec<u32>,
    /// Proxy CPU seconds from the start of the window to the end of the grace period (as the server's).
    pub cpu_s: Option<f64>,
    /// That CPU time in cores over the window and grace.
    pub cpu_cores: Option<f64>,
    /// Proxy CPU µs per message received by the bench (per echo, per delivery); echo and broadcast only.
    pub cpu_us_per_msg: Option<f64>,
    /// RSS (summed over the processes) before the first connection.
    pub rss_before_bytes: Option<u64>,
    /// RSS at the end of the window, connections held.
    pub rss_held_bytes: Option<u64>,
    /// Growth of RSS per connection held: (held − before) / connections held.
    pub rss_per_conn_bytes: Option<f64>,
}

/// The bench's own resource use.
#[derive(Clone, Debug, Serialize)]
pub struct ClientReport {
    /// CPU seconds in the window, all bench processes.
    pub cpu_window_s: f64,
    /// CPU seconds from the start of the window to the end of the grace period.
    pub cpu_s: f64,
    /// CPUs the bench could use (affinity, and at most procs × threads).
    pub cores: usize,
    /// Share of those CPUs the bench used during the window.
    pub utilization: f64,
    /// Bench CPU µs per message received; echo and broadcast only.
    pub cpu_us_per_msg: Option<f64>,
    /// Sampling interval of the per-thread load, ms.
    pub sample_ms: f64,
    /// Event-loop threads sampled (all processes).
    pub threads_sampled: usize,
    /// The busiest thread's share of sampling intervals in which it was saturated (busy, on a CPU or waiting
    /// for one, at least 90% of the interval).
    pub saturated_share: f64,
    /// That thread's average busy share over the window.
    pub busiest_thread_busy: f64,
    /// True when the client, not the server, may have been the limit: the busiest thread was saturated in at
    /// least 10% of the intervals, or the bench used ≥ 90% of its CPUs over the window.
    pub limited: bool,
    /// Tokens minted before the connect ramp (0 without a JWT key).
    pub tokens_minted: u64,
    /// Wall-clock milliseconds the longest thread spent minting them, before the ramp (not in `ramp_s`).
    pub token_mint_ms: f64,
    /// CPU µs per token minted (all threads' minting CPU time / tokens).
    pub token_mint_us: Option<f64>,
    /// Tokens minted during the window, churn connections beyond the foreseen count (their signing is in
    /// the churn handshake times); normally 0.
    pub tokens_minted_in_window: u64,
}

/// How connections authenticated.
#[derive(Clone, Debug, Serialize)]
pub struct AuthReport {
    /// `HS256`, `RS256` or `ES256`.
    pub alg: &'static str,
    /// Where the token went: `query`, `header` or `subprotocol`.
    pub token_in: &'static str,
    /// Token lifetime, seconds.
    pub ttl_s: u64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Target protocol.
    pub target: &'static str,
    /// Server URL as given (the first of several `--url`).
    pub url: String,
    /// Every `--url` with the connections each got.
    pub urls: Vec<UrlReport>,
    /// Request path used (with `--transport sse`, the publishers').
    pub path: String,
    /// How the subscribers received: `ws` (v1 WebSocket), or `sse` (`GET /sse` streams).
    pub transport: &'static str,
    /// Receivers (echo connections, subscribers, idle connections).
    pub connections: u64,
    /// Publishers.
    pub publishers: u64,
    /// Worker processes.
    pub procs: u32,
    /// Threads per process.
    pub threads: u32,
    /// Window, seconds.
    pub duration_s: f64,
    /// Grace period, seconds.
    pub grace_s: f64,
    /// Payload bytes.
    pub size: usize,
    /// Aggregate send rate, if fixed.
    pub rate: Option<f64>,
    /// Receive pacing period, ms (0 = off); latencies include up to this much of the bench's own wait.
    pub pace_ms: f64,
    /// Tokens, when the run had a JWT key.
    pub auth: Option<AuthReport>,
    /// TLS, for a `wss://` URL.
    pub tls: Option<TlsReport>,
    /// Connection figures.
    pub connect: ConnectReport,
    /// Message figures (not for connect).
    pub messages: Option<MessageReport>,
    /// Churn figures (churn only).
    pub churn: Option<ChurnReport>,
    /// Rooms group moves (rooms with `--churn-rate`).
    pub moves: Option<MovesReport>,
    /// api-publish figures (api-publish only).
    pub api: Option<ApiReport>,
    /// Server figures, when it could be observed.
    pub server: Option<ServerReport>,
    /// Proxy figures, with `--proxy-pid`.
    pub proxy: Option<ProxyReport>,
    /// Redis figures, with `--redis-pid`.
    pub redis: Option<RedisReport>,
    /// The bench's own CPU.
    pub client: ClientReport,
    /// Things to look at before trusting the figures.
    pub warnings: Vec<String>,
    /// The raw counts behind the figures.
    #[serde(skip)]
    pub tally: Tally,
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

impl Report {
    /// Derives the report from the merged counts and the server readings.
    pub fn build(plan: &Plan, t: Tally, s: &Samples, affinity_cores: usize) -> Report {
        let dur = plan.duration_ns as f64 / 1e9;
        let grace = plan.grace_ns as f64 / 1e9;
        let scenario = plan.scenario;
        let mut warnings = Vec::new();
        let is_api = scenario == Scenario::ApiPublish;
        // api-publish: message figures are the subscribers' (none without them).
        let messages = (scenario != Scenario::Connect && !(is_api && plan.receivers == 0)).then(|| {
            let scheduled = t.sent + t.skipped;
            // Every subscriber requested should have had every message, whether it became ready or not.
            let expected = match scenario {
                Scenario::Echo => scheduled,
                // Every message the server published (an offset returned), to every subscriber.
                Scenario::ApiPublish => (t.api_published + t.api_published_late) * plan.receivers,
                // Each message to every member of its channel.
                // With moves: group deliveries expected by each membership's offsets (the closed ones are in
                // `expected_deliveries` already).
                Scenario::Rooms => t.expected_deliveries + t.room_open_expected(),
                _ => scheduled * plan.receivers,
            };
            MessageReport {
                sent: t.sent,
                skipped: t.skipped,
                received: t.received,
                late: t.late,
                delivered: t.received + t.late,
                expected,
                lost: expected.saturating_sub(t.received + t.late),
                duplicates: t.duplicates,
                stale: t.stale,
                gaps: t.gaps,
                reordered: t.reordered,
                unparsed: t.unparsed,
                backpressured: t.backpressured,
                v1_errors: t.v1_errors,
                receivers: plan.receivers,
                receivers_ready: if scenario == Scenario::Echo { t.ready } else { t.ready_receivers },
                sent_per_s: round(t.sent as f64 / dur, 1),
                expected_per_s: round(expected as f64 / dur, 1),
                received_per_s: round(t.received as f64 / dur, 1),
                latency_us: t.latency.summary(),
                late_latency_us: t.late_latency.summary(),
                send_lag_us: t.send_lag.summary(),
            }
        });
        let server_cpu = match (s.at_go.cpu_ns, s.at_end.cpu_ns) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let churn = (scenario == Scenario::Churn).then(|| ChurnReport {
            opened: t.churn_opened,
            completed: t.churn_completed,
            failed: t.churn_failed,
            per_s: round(t.churn_completed as f64 / dur, 1),
            handshake_us: t.churn_lat.summary(),
            server_cpu_us_per_cycle: server_cpu
                .filter(|_| t.churn_completed > 0)
                .map(|c| round(c as f64 / 1e3 / t.churn_completed as f64, 2)),
        });
        let moves = plan.rooms.as_ref().filter(|r| r.moving()).map(|r| MovesReport {
            rate: r.moves_per_s,
            leaves_started: t.room_leaves_started,
            leaves: t.room_leaves,
            joins: t.room_joins,
            leaves_per_s: round(t.room_leaves as f64 / dur, 1),
            joins_per_s: round(t.room_joins as f64 / dur, 1),
            skipped: t.room_moves_skipped,
            refused: t.room_moves_refused,
            strays: t.room_strays,
            leave_latency_us: t.room_leave_lat.summary(),
            join_latency_us: t.room_join_lat.summary(),
            open_at_end: t.room_open.iter().sum(),
            reconnect_rate: r.reconnects_per_s,
            reconnects_started: t.room_reconnects_started,
            reconnects: t.room_reconnects,
            reconnects_per_s: round(t.room_reconnects as f64 / dur, 1),
            reconnects_failed: t.room_reconnects_failed,
            reconnect_latency_us: t.room_reconnect_lat.summary(),
        });
        if let Some(m) = &moves {
            if m.strays > 0 {
                warnings.push(format!("{} group messages arrived outside a confirmed membership", m.strays));
            }
            if m.leaves < m.leaves_started || m.joins < m.leaves {
                warnings.push(format!(
                    "moves unfinished at the end: {} leaves started, {} confirmed, {} joins confirmed",
                    m.leaves_started, m.leaves, m.joins
                ));
            }
            if m.refused > 0 {
                warnings.push(format!("{} leaves or joins were refused", m.refused));
            }
            if m.reconnects < m.reconnects_started {
                warnings.push(format!(
                    "reconnects: {} started, {} done, {} failed",
                    m.reconnects_started, m.reconnects, m.reconnects_failed
                ));
            }
        }
        // Per-message figures make sense where messages are the work: not for connect or churn.
        let msgs = match scenario {
            Scenario::Echo | Scenario::Broadcast | Scenario::Rooms => t.received,
            // The messages published are the work (their deliveries to subscribers included).
            Scenario::ApiPublish => t.api_published + t.api_published_late,
            Scenario::Connect | Scenario::Churn => 0,
        };
        let api = plan.api.as_ref().map(|a| {
            let oks = t.api_ok + t.api_ok_late;
            let published = t.api_published + t.api_published_late;
            ApiReport {
                connections: plan.publishers,
                pipeline: a.pipeline,
                batch: a.batch,
                channels: a.channels.len(),
                requests_sent: t.api_requests,
                messages_sent: t.sent,
                ok: t.api_ok,
                ok_late: t.api_ok_late,
                requests_per_s: round(t.api_ok as f64 / dur, 1),
                published: t.api_published,
                published_late: t.api_published_late,
                messages_per_s: round(t.api_published as f64 / dur, 1),
                message_errors: t.api_message_errors,
                failed: t.api_errors.values().sum(),
                errors: t.api_errors.clone(),
                latency_us: t.api_latency.summary(),
                late_latency_us: t.api_late_latency.summary(),
                server_cpu_us_per_request: server_cpu
                    .filter(|_| oks > 0)
                    .map(|c| round(c as f64 / 1e3 / oks as f64, 3)),
                server_cpu_us_per_message: server_cpu
                    .filter(|_| published > 0)
                    .map(|c| round(c as f64 / 1e3 / published as f64, 3)),
            }
        });
        if let Some(a) = &api {
            if a.ok + a.ok_late == 0 && t.ready > 0 {
                warnings.push("no API request succeeded: nothing was measured (see the errors)".into());
            }
            if a.failed > 0 {
                let list = a.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
                let mut hints = Vec::new();
                if a.errors.contains_key("401") {
                    hints.push("401: the server refused the key: check --api-key (or THRONG_BENCH_API_KEY)");
                }
                if a.errors.contains_key("404") {
                    hints.push(
                        "404: the server has no API (no api_key configured), or serves it only on its admin_listen",
                    );
                }
                if a.errors.contains_key("503") {
                    hints
                        .push("503: the server was overloaded (API requests waiting for other shards, or a ring full)");
                }
                if a.errors.contains_key("closed") {
                    hints.push("closed: the server closed connections with requests in flight");
                }
                let hints = if hints.is_empty() { String::new() } else { format!(" ({})", hints.join("; ")) };
                warnings.push(format!(
                    "{} of {} API requests failed: {list}{hints}",
                    a.failed,
                    a.requests_sent.max(a.failed)
                ));
            }
            if a.message_errors > 0 {
                warnings.push(format!(
                    "{} messages were refused inside 200 responses (per-message errors of a batch)",
                    a.message_errors
                ));
            }
        }
        let per_conn = |before: Option<u64>, held: Option<u64>| match (before, held) {
            (Some(a), Some(b)) if t.held > 0 => Some(round((b as f64 - a as f64) / t.held as f64, 1)),
            _ => None,
        };
        // Messages published: what the relay and Redis carry, once each (not per delivery).
        let publishes = match scenario {
            Scenario::Broadcast | Scenario::Rooms | Scenario::Churn => t.sent,
            Scenario::ApiPublish => t.api_published + t.api_published_late,
            Scenario::Echo | Scenario::Connect => 0,
        };
        let per_publish = |c: u64| (publishes > 0).then(|| round(c as f64 / 1e3 / publishes as f64, 3));
        // Rooms: when every subscription was confirmed, before any publish (as idle as connect's).
        let held_at =
            |p: &Points| if scenario == Scenario::Rooms { p.at_go.rss_bytes } else { p.at_window_end.rss_bytes };
        let nodes: Vec<NodeReport> = plan
            .server_pids
            .iter()
            .enumerate()
            .map(|(i, &pid)| {
                let p = s.nodes.get(i).copied().unwrap_or_default();
                let cpu = p.cpu_ns();
                let (go, end) = (s.relay_at_go.get(i), s.relay_at_end.get(i));
                let found = go.is_some_and(|g| !g.threads.is_empty()) || end.is_some_and(|e| !e.threads.is_empty());
                let relay = match (found, end) {
                    (true, Some(end)) => Some(end.cpu_since(go.unwrap_or(&ThreadsSample::default()))),
                    _ => None,
                };
                NodeReport {
                    pid,
                    cpu_s: cpu.map(|c| round(c as f64 / 1e9, 3)),
                    cpu_cores: cpu.map(|c| round(c as f64 / 1e9 / (dur + grace), 3)),
                    cpu_us_per_msg: cpu.filter(|_| msgs > 0).map(|c| round(c as f64 / 1e3 / msgs as f64, 3)),
                    rss_before_bytes: p.before.rss_bytes,
                    rss_held_bytes: held_at(&p),
                    relay_threads: end.map_or(0, |e| e.threads.len()),
                    relay_cpu_s: relay.map(|c| round(c as f64 / 1e9, 3)),
                    relay_cpu_us_per_publish: relay.and_then(per_publish),
                    relay_share: relay.zip(cpu).filter(|(_, c)| *c > 0).map(|(r, c)| round(r as f64 / c as f64, 3)),
                }
            })
            .collect();
        for (i, &pid) in plan.server_pids.iter().enumerate() {
            if plan.server_pids.len() > 1 && s.nodes.get(i).is_none_or(|p| p.any_missing(s.windowed)) {
                warnings.push(format!(
                    "--server-pid {pid} could not be read at every sample point (it exited?): the server figures, \
                     summed over the nodes, are missing"
                ));
            }
        }
        let relay_total = nodes
            .iter()
            .zip(s.relay_at_go.iter().zip(&s.relay_at_end))
            .filter(|(n, _)| n.relay_cpu_s.is_some())
            .map(|(_, (go, end))| end.cpu_since(go))
            .reduce(|a, b| a + b);
        let server = (s.server_source != "none").then(|| {
            let cpu = server_cpu;
            let rss_held =
                held_at(&Points { before: s.before, at_go: s.at_go, at_window_end: s.at_window_end, at_end: s.at_end });
            let per_conn = per_conn(s.before.rss_bytes, rss_held);
            ServerReport {
                pid: plan.server_pid(),
                pids: plan.server_pids.clone(),
                source: s.server_source,
                cpu_s: cpu.map(|c| round(c as f64 / 1e9, 3)),
                cpu_cores: cpu.map(|c| round(c as f64 / 1e9 / (dur + grace), 3)),
                cpu_us_per_msg: cpu.filter(|_| msgs > 0).map(|c| round(c as f64 / 1e3 / msgs as f64, 3)),
                rss_before_bytes: s.before.rss_bytes,
                rss_held_bytes: rss_held,
                rss_per_conn_bytes: per_conn,
                relay_cpu_s: relay_total.map(|c| round(c as f64 / 1e9, 3)),
                relay_cpu_us_per_publish: relay_total.and_then(per_publish),
                nodes,
            }
        });
        let span = |a: ServerSample, b: ServerSample| a.cpu_ns.zip(b.cpu_ns).map(|(a, b)| b.saturating_sub(a));
        let proxy = (!plan.proxy_pids.is_empty()).then(|| {
            let cpu = span(s.proxy_at_go, s.proxy_at_end);
            let all = [s.proxy_before, s.proxy_at_go, s.proxy_at_window_end, s.proxy_at_end];
            if s.windowed && all.iter().any(|x| x.cpu_ns.is_none()) {
                warnings.push(format!(
                    "a --proxy-pid process ({}) could not be read at every sample point (it exited, or a worker \
                     was replaced): the proxy figures it affects are missing",
                    plan.proxy_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                ));
            }
            ProxyReport {
                pids: plan.proxy_pids.clone(),
                cpu_s: cpu.map(|c| round(c as f64 / 1e9, 3)),
                cpu_cores: cpu.map(|c| round(c as f64 / 1e9 / (dur + grace), 3)),
                cpu_us_per_msg: cpu.filter(|_| msgs > 0).map(|c| round(c as f64 / 1e3 / msgs as f64, 3)),
                rss_before_bytes: s.proxy_before.rss_bytes,
                rss_held_bytes: s.proxy_at_window_end.rss_bytes,
                rss_per_conn_bytes: per_conn(s.proxy_before.rss_bytes, s.proxy_at_window_end.rss_bytes),
            }
        });
        let redis = (!plan.redis_pids.is_empty()).then(|| {
            let cpu = s.redis.cpu_ns();
            if s.redis.any_missing(s.windowed) {
                warnings.push(format!(
                    "a --redis-pid process ({}) could not be read at every sample point (it exited, or was \
                     restarted): the Redis figures it affects are missing",
                    plan.redis_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                ));
            }
            RedisReport {
                pids: plan.redis_pids.clone(),
                cpu_s: cpu.map(|c| round(c as f64 / 1e9, 3)),
                cpu_cores: cpu.map(|c| round(c as f64 / 1e9 / (dur + grace), 3)),
                cpu_us_per_publish: cpu.and_then(per_publish),
                rss_before_bytes: s.redis.before.rss_bytes,
                rss_held_bytes: s.redis.at_window_end.rss_bytes,
            }
        });
        let per_url = plan.connections_per_url();
        let urls = plan
            .urls
            .iter()
            .enumerate()
            .map(|(i, u)| UrlReport {
                url: url_name(plan, u),
                connections: per_url[i],
                ready: if plan.urls.len() == 1 { t.ready } else { t.ready_per_url.get(i).copied().unwrap_or(0) },
            })
            .collect();
        let cores = affinity_cores.min((plan.procs * plan.threads) as usize).max(1);
        let utilization = t.cpu_window_ns as f64 / 1e9 / (dur * cores as f64);
        // The busiest thread: the one saturated most often (then the one busiest on average).
        let busiest = t
            .threads
            .iter()
            .max_by(|a, b| a.saturated_share().total_cmp(&b.saturated_share()).then(a.busy().total_cmp(&b.busy())));
        let saturated_share = busiest.map_or(0.0, |l| l.saturated_share());
        let busiest_busy = busiest.map_or(0.0, |l| l.busy());
        let limited = saturated_share >= SIGNIFICANT || utilization >= 0.9;
        if limited {
            warnings.push(format!(
                "client was the limit: the busiest bench thread was saturated (>= {:.0}% busy) in {:.0}% of the \
                 {} ms intervals of the window ({:.0}% busy on average), and the bench used {:.0}% of its {cores} \
                 CPU(s); the server may be faster than measured (more --procs/--threads, more cores for the bench)",
                SATURATED * 100.0,
                saturated_share * 100.0,
                SAMPLE_NS / 1_000_000,
                busiest_busy * 100.0,
                utilization * 100.0
            ));
        }
        let client = ClientReport {
            cpu_window_s: round(t.cpu_window_ns as f64 / 1e9, 3),
            cpu_s: round(t.cpu_total_ns as f64 / 1e9, 3),
            cores,
            utilization: round(utilization, 3),
            cpu_us_per_msg: (msgs > 0).then(|| round(t.cpu_total_ns as f64 / 1e3 / msgs as f64, 3)),
            sample_ms: SAMPLE_NS as f64 / 1e6,
            threads_sampled: t.threads.len(),
            saturated_share: round(saturated_share, 3),
            busiest_thread_busy: round(busiest_busy, 3),
            limited,
            tokens_minted: t.tokens_minted,
            token_mint_ms: round(t.token_mint_wall_ns as f64 / 1e6, 3),
            token_mint_us: (t.tokens_minted > 0)
                .then(|| round(t.token_mint_cpu_ns as f64 / 1e3 / t.tokens_minted as f64, 2)),
            tokens_minted_in_window: t.tokens_minted_in_window,
        };
        if t.failed > 0 {
            warnings.push(format!("{} of {} connections failed: {:?}", t.failed, t.attempted, t.errors));
        }
        if t.dropped > 0 {
            warnings.push(format!("{} connections were closed during the run: {:?}", t.dropped, t.drop_reasons));
        }
        if let Some(m) = &messages {
            if m.lost > 0 {
                let mut why = Vec::new();
                if m.receivers_ready < m.receivers && scenario != Scenario::Echo {
                    let n = m.receivers - m.receivers_ready;
                    if scenario == Scenario::Rooms {
                        why.push(format!("{n} receiver(s) never ready"));
                    } else {
                        why.push(format!("{n} receiver(s) never ready: {}", n * (m.sent + m.skipped)));
                    }
                }
                if m.skipped > 0 && scenario == Scenario::Rooms {
                    why.push(format!("{} sends skipped", m.skipped));
                } else if m.skipped > 0 {
                    let per = if scenario == Scenario::Echo { 1 } else { m.receivers };
                    why.push(format!("skipped sends: {}", m.skipped * per));
                }
                let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) };
                warnings.push(format!(
                    "{} of {} expected messages were not received by the end of the grace period{why}",
                    m.lost, m.expected
                ));
            }
            // What is in flight as the window ends always arrives late; warn when it is more than that.
            if m.late > 0 && m.late * 1000 >= m.expected {
                warnings.push(format!(
                    "{} messages arrived after the window, in the grace period: counted as late, not in the rate \
                     (late p99 {})",
                    m.late,
                    ms(m.late_latency_us.p99)
                ));
            }
            if m.duplicates > 0 {
                warnings.push(format!("{} duplicate messages (copies of messages already received)", m.duplicates));
            }
            if m.stale > 0 {
                warnings.push(format!("{} messages arrived too far behind to tell from copies", m.stale));
            }
            if m.reordered > 0 {
                warnings.push(format!("{} messages arrived out of order", m.reordered));
            }
            if m.skipped > 0 {
                warnings.push(format!(
                    "{} scheduled sends skipped, counted as lost: {} with the connection's unsent backlog over \
                     4 MiB (the server was not reading fast enough), {} on connections that were not open",
                    m.skipped,
                    m.backpressured,
                    m.skipped - m.backpressured
                ));
            }
            if m.send_lag_us.p99 >= 5000.0 {
                warnings.push(format!(
                    "fixed-rate sends went out up to {} behind schedule (p99 {}): the bench's own lag, included in \
                     the latencies (they count from the scheduled times)",
                    ms(m.send_lag_us.max),
                    ms(m.send_lag_us.p99)
                ));
            }
            if m.v1_errors > 0 {
                warnings.push(format!("{} error replies from the server", m.v1_errors));
            }
            if m.unparsed > 0 {
                warnings.push(format!("{} messages had no readable stamp", m.unparsed));
            }
        }
        if plan.pace_ns > 0 && messages.is_some() {
            warnings.push(format!(
                "receive pacing of {} ms: latencies include up to that much of the bench's own waiting",
                plan.pace_ns as f64 / 1e6
            ));
        }
        let ramp_s = s.connect_s.max(t.connect_span_ns as f64 / 1e9);
        let ramp_util = if ramp_s > 0.0 { t.ramp_cpu_ns as f64 / 1e9 / (ramp_s * cores as f64) } else { 0.0 };
        let tls = plan.tls.as_ref().map(|p| TlsReport {
            version: t.tls.as_ref().map(|i| i.version.clone()),
            cipher_suite: t.tls.as_ref().map(|i| i.cipher_suite.clone()),
            kx_group: t.tls.as_ref().and_then(|i| i.kx_group.clone()),
            verify: p.verify,
            server_name: p.server_name.to_str().into_owned(),
            resumption: p.resumption,
            handshakes: t.tls_handshakes,
            resumed: t.tls_resumed,
            handshake_us: t.tls_handshake.summary(),
            handshake_cpu_us: t.tls_handshake_cpu.summary(),
            first_error: t.tls_error.clone(),
        });
        if let (Some(r), Some(e)) = (&tls, &t.tls_error) {
            let certificate = t.errors.keys().any(|k| crate::tls::is_certificate_kind(k));
            let hint = if e.contains("CaUsedAsEndEntity") {
                ": the server's certificate is a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` \
                 makes by default), which webpki refuses as a server's: make it with `-addext \
                 basicConstraints=critical,CA:FALSE`, or sign it with a separate CA (or --insecure-skip-verify, \
                 benchmarking only)"
            } else if certificate {
                match r.verify {
                    "system" => {
                        ": trust the server's certificate with --ca-file PEM (its CA, or the self-signed \
                                 certificate itself), or --insecure-skip-verify (benchmarking only); an IP address in \
                                 the URL needs --sni NAME unless the certificate lists the address"
                    }
                    _ => ": check --ca-file and the name checked (--sni)",
                }
            } else {
                ""
            };
            let failed: u64 = t.errors.iter().filter(|(k, _)| k.starts_with("tls_")).map(|(_, v)| v).sum();
            warnings.insert(0, format!("{failed} TLS handshake(s) failed, the first with \"{e}\"{hint}"));
        }
        if ramp_util >= 0.9 && t.attempted > 0 {
            warnings.push(format!(
                "the bench used {:.0}% of its {cores} CPU(s) over the ramp ({:.0} us per connection{}): the connect \
                 rate and latencies may be the client's limit (more --procs/--threads, a lower --ramp-rate)",
                ramp_util * 100.0,
                t.ramp_cpu_ns as f64 / 1e3 / t.attempted as f64,
                tls.as_ref()
                    .filter(|r| r.handshake_cpu_us.count > 0)
                    .map(|r| format!(", TLS handshakes {} of CPU each at the median", ms(r.handshake_cpu_us.p50)))
                    .unwrap_or_default()
            ));
        }
        let ramp_cpu = span(s.before, s.at_go);
        let proxy_ramp_cpu = span(s.proxy_before, s.proxy_at_go);
        let auth = plan.auth.as_ref().map(|a| AuthReport {
            alg: a.minter.alg().name(),
            token_in: a.token_in.name(),
            ttl_s: a.minter.ttl_s(),
        });
        if let Some(a) = &auth {
            // Tokens are minted before the ramp: the last connections (churn) use them the longest after.
            let used_for = t.token_mint_wall_ns as f64 / 1e9 + ramp_s + dur + grace;
            if (a.ttl_s as f64) < used_for {
                warnings.push(format!(
                    "tokens live {} s (--jwt-ttl) but were minted before the ramp of a {used_for:.0} s run: \
                     connections opened late (churn) presented expired tokens, and a server that closes \
                     connections at `exp` closed some",
                    a.ttl_s
                ));
            }
        }
        if t.tokens_minted_in_window > 0 {
            warnings.push(format!(
                "{} churn tokens were minted during the window (more churn connections than foreseen): their \
                 signing time is in the churn handshake latencies",
                t.tokens_minted_in_window
            ));
        }
        Report {
            scenario: scenario.name(),
            target: plan.target.name(),
            url: url_name(plan, &plan.url),
            urls,
            path: plan.path.clone(),
            transport: plan.transport.name(),
            connections: plan.receivers,
            publishers: plan.publishers,
            procs: plan.procs,
            threads: plan.threads,
            duration_s: dur,
            grace_s: grace,
            size: plan.size,
            rate: plan.rate,
            pace_ms: plan.pace_ns as f64 / 1e6,
            auth,
            tls,
            connect: ConnectReport {
                attempted: t.attempted,
                established: t.established,
                ready: t.ready,
                failed: t.failed,
                errors: t.errors.clone(),
                held: t.held,
                dropped: t.dropped,
                drop_reasons: t.drop_reasons.clone(),
                ramp_s: round(ramp_s, 3),
                per_s: if ramp_s > 0.0 { round(t.ready as f64 / ramp_s, 1) } else { 0.0 },
                latency_us: t.connect_lat.summary(),
                server_cpu_s: ramp_cpu.map(|c| round(c as f64 / 1e9, 3)),
                server_cpu_us_per_conn: ramp_cpu
                    .filter(|_| t.ready > 0)
                    .map(|c| round(c as f64 / 1e3 / t.ready as f64, 2)),
                proxy_cpu_s: proxy_ramp_cpu.map(|c| round(c as f64 / 1e9, 3)),
                proxy_cpu_us_per_conn: proxy_ramp_cpu
                    .filter(|_| t.ready > 0)
                    .map(|c| round(c as f64 / 1e3 / t.ready as f64, 2)),
                client_cpu_s: round(t.ramp_cpu_ns as f64 / 1e9, 3),
                client_cpu_us_per_conn: (t.attempted > 0)
                    .then(|| round(t.ramp_cpu_ns as f64 / 1e3 / t.attempted as f64, 2)),
                client_utilization: round(ramp_util, 3),
            },
            messages,
            churn,
            moves,
            api,
            server,
            proxy,
            redis,
            client,
            warnings,
            tally: t,
        }
    }

    /// The human summary.
    pub fn human(&self) -> String {
        let mut o = String::new();
        if let Some(a) = &self.api {
            let _ = writeln!(
                o,
                "throng-bench api-publish -> {}/api/publish: {} connections x pipeline {}, batch {} x {} B over {} \
                 channels, {} subscribers ({}), closed loop, {} s + {} s grace, {} proc x {} thread",
                self.url,
                a.connections,
                a.pipeline,
                a.batch,
                self.size,
                a.channels,
                self.connections,
                self.path,
                self.duration_s,
                self.grace_s,
                self.procs,
                self.threads
            );
        }
        let load = match (self.scenario, self.rate) {
            ("connect", _) => format!("held {} s", self.duration_s),
            (_, Some(r)) => format!("{r} msg/s x {} B, {} s + {} s grace", self.size, self.duration_s, self.grace_s),
            (_, None) => format!("closed loop x {} B, {} s + {} s grace", self.size, self.duration_s, self.grace_s),
        };
        if self.api.is_none() {
            let _ = writeln!(
                o,
                "throng-bench {} -> {}{} ({}): {} connections{}{}, {load}, {} proc x {} thread",
                self.scenario,
                self.url,
                self.path,
                self.target,
                self.connections,
                if self.transport == "sse" { " (SSE subscribers, GET /sse)" } else { "" },
                if self.publishers > 0 { format!(" + {} publishers", self.publishers) } else { String::new() },
                self.procs,
                self.threads
            );
        }
        if self.urls.len() > 1 {
            let list = self
                .urls
                .iter()
                .map(|u| format!("{} {} ({} ready)", u.url, u.connections, u.ready))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(o, "nodes     {} URLs, connections: {list}", self.urls.len());
        }
        let c = &self.connect;
        let errors = if c.errors.is_empty() {
            "none".to_string()
        } else {
            c.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            o,
            "connect   {} of {} ready in {:.2} s ({:.0}/s), {} held to the end; errors: {errors}",
            c.ready, c.attempted, c.ramp_s, c.per_s, c.held
        );
        let _ = writeln!(o, "          latency {}", lat(&c.latency_us));
        if let (Some(cpu), Some(us)) = (c.server_cpu_s, c.server_cpu_us_per_conn) {
            let _ = writeln!(o, "          server CPU over the ramp {cpu:.3} s: {us:.2} us per connection");
        }
        if let (Some(cpu), Some(us)) = (c.proxy_cpu_s, c.proxy_cpu_us_per_conn) {
            let _ = writeln!(o, "          proxy CPU over the ramp {cpu:.3} s: {us:.2} us per connection");
        }
        if let Some(us) = c.client_cpu_us_per_conn {
            let _ = writeln!(
                o,
                "          client CPU over the ramp {:.3} s: {us:.2} us per connection ({:.0}% of its CPUs)",
                c.client_cpu_s,
                c.client_utilization * 100.0
            );
        }
        if let Some(t) = &self.tls {
            let _ = writeln!(
                o,
                "tls       {} {}{}, certificate check: {} ({}); {} handshakes, {} resumed{}",
                t.version.as_deref().unwrap_or("-"),
                t.cipher_suite.as_deref().unwrap_or("-"),
                t.kx_group.as_deref().map(|g| format!(" ({g})")).unwrap_or_default(),
                t.verify,
                t.server_name,
                t.handshakes,
                t.resumed,
                if t.resumption { "" } else { " (resumption off)" }
            );
            let _ = writeln!(o, "          handshake {}", lat(&t.handshake_us));
            let _ = writeln!(o, "          client CPU per handshake {}", lat(&t.handshake_cpu_us));
        }
        if let Some(a) = &self.auth {
            let cl = &self.client;
            let _ = writeln!(
                o,
                "          tokens: {} {} ({} s) in the {}, minted before the ramp in {:.1} ms ({} CPU each)",
                cl.tokens_minted,
                a.alg,
                a.ttl_s,
                a.token_in,
                cl.token_mint_ms,
                cl.token_mint_us.map_or_else(|| "-".to_string(), ms)
            );
        }
        if c.dropped > 0 {
            let _ = writeln!(o, "          dropped during the run: {} {:?}", c.dropped, c.drop_reasons);
        }
        if let Some(m) = &self.messages {
            let _ = writeln!(
                o,
                "messages  sent {} ({:.0}/s), skipped {}; received {} in the window ({:.0}/s of {:.0}/s offered) \
                 + {} late, of {} expected",
                m.sent, m.sent_per_s, m.skipped, m.received, m.received_per_s, m.expected_per_s, m.late, m.expected
            );
            let _ = writeln!(
                o,
                "          lost {}, duplicates {}, reordered {}, gaps {}; receivers ready {} of {}",
                m.lost, m.duplicates, m.reordered, m.gaps, m.receivers_ready, m.receivers
            );
            let _ = writeln!(o, "          latency {}", lat(&m.latency_us));
            if m.late > 0 {
                let _ = writeln!(o, "          late    {}", lat(&m.late_latency_us));
            }
            if m.send_lag_us.count > 0 {
                let _ = writeln!(o, "          send lag {}", lat(&m.send_lag_us));
            }
        }
        if let Some(a) = &self.api {
            let errors = if a.errors.is_empty() {
                "none".to_string()
            } else {
                a.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            };
            let _ = writeln!(
                o,
                "api       {} requests sent ({} messages); {} ok in the window ({:.0}/s) + {} late; {} messages \
                 published ({:.0}/s) + {} late; failed {}: {errors}",
                a.requests_sent,
                a.messages_sent,
                a.ok,
                a.requests_per_s,
                a.ok_late,
                a.published,
                a.messages_per_s,
                a.published_late,
                a.failed
            );
            let _ = writeln!(o, "          latency {}", lat(&a.latency_us));
            if a.ok_late > 0 {
                let _ = writeln!(o, "          late    {}", lat(&a.late_latency_us));
            }
            if let (Some(r), Some(m)) = (a.server_cpu_us_per_request, a.server_cpu_us_per_message) {
                let _ = writeln!(o, "          server CPU {r:.2} us per request, {m:.3} us per message");
            }
        }
        if let Some(ch) = &self.churn {
            let _ = writeln!(
                o,
                "churn     {} opened, {} completed ({:.0}/s), {} failed, {} unfinished at the end",
                ch.opened,
                ch.completed,
                ch.per_s,
                ch.failed,
                ch.opened.saturating_sub(ch.completed + ch.failed)
            );
            let _ = writeln!(o, "          handshake {}", lat(&ch.handshake_us));
            if let Some(us) = ch.server_cpu_us_per_cycle {
                let _ = writeln!(o, "          server CPU {us:.1} us per cycle (steady traffic included)");
            }
        }
        if let Some(m) = &self.moves {
            let _ = writeln!(
                o,
                "moves     {:.0}/s asked: {} leaves ({:.0}/s), {} joins ({:.0}/s), {} skipped, {} refused, {} strays; \
                 {} memberships open at the end",
                m.rate, m.leaves, m.leaves_per_s, m.joins, m.joins_per_s, m.skipped, m.refused, m.strays, m.open_at_end
            );
            let _ = writeln!(o, "          leave   {}", lat(&m.leave_latency_us));
            let _ = writeln!(o, "          join    {}", lat(&m.join_latency_us));
            if m.reconnect_rate > 0.0 {
                let _ = writeln!(
                    o,
                    "reconnect {:.0}/s asked: {} done ({:.0}/s), {} failed; connect to both subscribed {}",
                    m.reconnect_rate,
                    m.reconnects,
                    m.reconnects_per_s,
                    m.reconnects_failed,
                    lat(&m.reconnect_latency_us)
                );
            }
        }
        if let Some(s) = &self.server {
            let who = match (s.pid, s.pids.len()) {
                (None, _) => "(/stats)".to_string(),
                (Some(p), 1) => format!("pid {p}"),
                (_, n) => format!(
                    "pids {} ({n} nodes, summed)",
                    s.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                ),
            };
            let mut line = format!("server    {who}");
            if let (Some(cpu), Some(cores)) = (s.cpu_s, s.cpu_cores) {
                let _ = write!(line, ": {cpu:.2} s CPU ({:.0}% of a core)", cores * 100.0);
            }
            if let Some(us) = s.cpu_us_per_msg {
                let _ = write!(line, ", {us:.2} us per message");
            }
            if let (Some(a), Some(b)) = (s.rss_before_bytes, s.rss_held_bytes) {
                let _ = write!(line, "; RSS {} -> {}", bytes(a as f64), bytes(b as f64));
            }
            if let Some(p) = s.rss_per_conn_bytes {
                let _ = write!(line, " ({} per connection)", bytes(p));
            }
            if let Some(r) = s.relay_cpu_s {
                let _ = write!(line, "; relay {r:.2} s CPU");
                if let Some(us) = s.relay_cpu_us_per_publish {
                    let _ = write!(line, ", {us:.2} us per publish");
                }
            }
            let _ = writeln!(o, "{line}");
            let with_relay = s.nodes.iter().any(|n| n.relay_cpu_s.is_some());
            for n in s.nodes.iter().filter(|_| s.nodes.len() > 1 || with_relay) {
                let mut line = format!("  node    pid {}", n.pid);
                if let (Some(cpu), Some(cores)) = (n.cpu_s, n.cpu_cores) {
                    let _ = write!(line, ": {cpu:.2} s CPU ({:.0}% of a core)", cores * 100.0);
                }
                if let Some(us) = n.cpu_us_per_msg {
                    let _ = write!(line, ", {us:.2} us per message");
                }
                if let (Some(a), Some(b)) = (n.rss_before_bytes, n.rss_held_bytes) {
                    let _ = write!(line, "; RSS {} -> {}", bytes(a as f64), bytes(b as f64));
                }
                match n.relay_cpu_s {
                    Some(r) => {
                        let _ = write!(line, "; relay CPU {r:.2} s");
                        if let Some(us) = n.relay_cpu_us_per_publish {
                            let _ = write!(line, ", {us:.2} us per publish");
                        }
                        if let Some(share) = n.relay_share {
                            let _ = write!(line, " ({:.0}% of the node's)", share * 100.0);
                        }
                    }
                    None => line.push_str("; no relay thread"),
                }
                let _ = writeln!(o, "{line}");
            }
        }
        if let Some(p) = &self.proxy {
            let pids = p.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let mut line = format!("proxy     pid {pids}");
            if let (Some(cpu), Some(cores)) = (p.cpu_s, p.cpu_cores) {
                let _ = write!(line, ": {cpu:.2} s CPU ({:.0}% of a core)", cores * 100.0);
            }
            if let Some(us) = p.cpu_us_per_msg {
                let _ = write!(line, ", {us:.2} us per message");
            }
            if let (Some(a), Some(b)) = (p.rss_before_bytes, p.rss_held_bytes) {
                let _ = write!(line, "; RSS {} -> {}", bytes(a as f64), bytes(b as f64));
            }
            if let Some(b) = p.rss_per_conn_bytes {
                let _ = write!(line, " ({} per connection)", bytes(b));
            }
            let _ = writeln!(o, "{line}");
        }
        if let Some(r) = &self.redis {
            let pids = r.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let mut line = format!("redis     pid {pids}");
            if let (Some(cpu), Some(cores)) = (r.cpu_s, r.cpu_cores) {
                let _ = write!(line, ": {cpu:.2} s CPU ({:.0}% of a core)", cores * 100.0);
            }
            if let Some(us) = r.cpu_us_per_publish {
                let _ = write!(line, ", {us:.2} us per publish");
            }
            if let (Some(a), Some(b)) = (r.rss_before_bytes, r.rss_held_bytes) {
                let _ = write!(line, "; RSS {} -> {}", bytes(a as f64), bytes(b as f64));
            }
            let _ = writeln!(o, "{line}");
        }
        let cl = &self.client;
        let _ = write!(
            o,
            "client    {:.2} s CPU in the window on {} CPU(s) ({:.0}%)",
            cl.cpu_window_s,
            cl.cores,
            cl.utilization * 100.0
        );
        if let Some(us) = cl.cpu_us_per_msg {
            let _ = write!(o, ", {us:.2} us per message");
        }
        let _ = write!(
            o,
            "; busiest thread saturated in {:.0}% of {} ms intervals ({:.0}% busy){}",
            cl.saturated_share * 100.0,
            cl.sample_ms,
            cl.busiest_thread_busy * 100.0,
            if cl.limited { " - client-limited" } else { "" }
        );
        o.push('\n');
        for w in &self.warnings {
            let _ = writeln!(o, "warning: {w}");
        }
        o
    }
}

/// `ws://host:port` (`wss`, or `http`/`https` for api-publish) of one `--url`.
fn url_name(plan: &Plan, u: &WsUrl) -> String {
    let scheme = match (plan.api.is_some(), u.tls) {
        (false, false) => "ws",
        (false, true) => "wss",
        (true, false) => "http",
        (true, true) => "https",
    };
    format!("{scheme}://{}", u.host)
}

fn ms(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn lat(s: &Summary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!("p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", ms(s.p50), ms(s.p90), ms(s.p99), ms(s.p999), ms(s.max))
}

fn bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if a >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Args;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["throng-bench"];
        v.extend_from_slice(args);
        Plan::from_args(&Args::parse_from(v)).unwrap()
    }

    fn at(cpu_ms: u64, rss: u64) -> ServerSample {
        ServerSample { cpu_ns: Some(cpu_ms * 1_000_000), rss_bytes: Some(rss) }
    }

    fn points(go_ms: u64, end_ms: u64, rss_before: u64, rss_held: u64) -> Points {
        Points {
            before: at(0, rss_before),
            at_go: at(go_ms, rss_held),
            at_window_end: at(end_ms, rss_held),
            at_end: at(end_ms, rss_held),
        }
    }

    fn relay(threads: &[(u32, u64)]) -> ThreadsSample {
        ThreadsSample { threads: threads.iter().map(|&(t, ms)| (t, ms * 1_000_000)).collect() }
    }

    /// Two nodes and a Redis: the server figures are the nodes' sums, each node is reported apart with its
    /// relay thread, Redis per publish, and every URL with its connections.
    #[test]
    fn nodes_relay_and_redis() {
        let p = plan(&[
            "broadcast",
            "--url",
            "ws://127.0.0.1:1,ws://127.0.0.1:2",
            "--connections",
            "4",
            "--duration",
            "1",
            "--grace",
            "1",
            "--server-pid",
            "100,200",
            "--redis-pid",
            "300",
        ]);
        // 100 publishes in the window, delivered to the 4 subscribers.
        let t = Tally { ready: 5, held: 5, sent: 100, received: 400, ready_per_url: vec![3, 2], ..Tally::default() };
        let (a, b) = (points(100, 500, 1000, 3000), points(200, 400, 2000, 3000));
        let sum = |f: fn(&Points) -> ServerSample| {
            let (x, y) = (f(&a), f(&b));
            ServerSample {
                cpu_ns: Some(x.cpu_ns.unwrap() + y.cpu_ns.unwrap()),
                rss_bytes: Some(x.rss_bytes.unwrap() + y.rss_bytes.unwrap()),
            }
        };
        let s = Samples {
            before: sum(|p| p.before),
            at_go: sum(|p| p.at_go),
            at_window_end: sum(|p| p.at_window_end),
            at_end: sum(|p| p.at_end),
            server_source: "proc",
            windowed: true,
            nodes: vec![a, b],
            // Node 1: one relay thread using 40 ms; node 2: none.
            relay_at_go: vec![relay(&[(7, 10)]), relay(&[])],
            relay_at_end: vec![relay(&[(7, 50)]), relay(&[])],
            redis: points(1000, 1020, 5000, 6000),
            ..Samples::default()
        };
        let r = Report::build(&p, t, &s, 1);
        let srv = r.server.as_ref().unwrap();
        assert_eq!((srv.pid, srv.pids.clone()), (Some(100), vec![100, 200]));
        // 400 + 200 ms over 400 deliveries; RSS: (6000 - 3000) / 5 held.
        assert_eq!((srv.cpu_s, srv.cpu_us_per_msg, srv.rss_per_conn_bytes), (Some(0.6), Some(1500.0), Some(600.0)));
        assert_eq!((srv.relay_cpu_s, srv.relay_cpu_us_per_publish), (Some(0.04), Some(400.0)));
        let (n1, n2) = (&srv.nodes[0], &srv.nodes[1]);
        assert_eq!((n1.pid, n1.cpu_s, n1.cpu_us_per_msg, n1.relay_threads), (100, Some(0.4), Some(1000.0), 1));
        assert_eq!((n1.relay_cpu_s, n1.relay_cpu_us_per_publish, n1.relay_share), (Some(0.04), Some(400.0), Some(0.1)));
        assert_eq!(
            (n2.pid, n2.cpu_s, n2.relay_threads, n2.relay_cpu_s, n2.relay_cpu_us_per_publish),
            (200, Some(0.2), 0, None, None)
        );
        let redis = r.redis.as_ref().unwrap();
        assert_eq!((redis.pids.clone(), redis.cpu_s, redis.cpu_us_per_publish), (vec![300], Some(0.02), Some(200.0)));
        let urls: Vec<_> = r.urls.iter().map(|u| (u.url.as_str(), u.connections, u.ready)).collect();
        assert_eq!(urls, vec![("ws://127.0.0.1:1", 3, 3), ("ws://127.0.0.1:2", 2, 2)]);
        assert!(r.warnings.iter().all(|w| !w.contains("could not be read")), "{:?}", r.warnings);
        let human = r.human();
        for want in [
            "nodes     2 URLs, connections: ws://127.0.0.1:1 3 (3 ready), ws://127.0.0.1:2 2 (2 ready)",
            "server    pids 100,200 (2 nodes, summed): 0.60 s CPU",
            "; relay 0.04 s CPU, 400.00 us per publish",
            "  node    pid 100: 0.40 s CPU (20% of a core), 1000.00 us per message",
            "; relay CPU 0.04 s, 400.00 us per publish (10% of the node's)",
            "  node    pid 200: 0.20 s CPU",
            "; no relay thread",
            "redis     pid 300: 0.02 s CPU (1% of a core), 200.00 us per publish",
        ] {
            assert!(human.contains(want), "no {want:?} in:\n{human}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["server"]["nodes"][0]["relay_cpu_us_per_publish"], 400.0);
        assert_eq!(json["redis"]["cpu_us_per_publish"], 200.0);
        assert_eq!(json["urls"][1]["connections"], 2);

        // A node gone at the end: its figures and the sum are missing, with a warning.
        let mut gone = s.clone();
        gone.nodes[1].at_end = ServerSample::default();
        gone.at_end = ServerSample::default();
        gone.redis.at_end = ServerSample::default();
        let r = Report::build(&p, Tally { sent: 100, received: 400, ..Tally::default() }, &gone, 1);
        assert_eq!((r.server.as_ref().unwrap().cpu_s, r.server.as_ref().unwrap().nodes[1].cpu_s), (None, None));
        assert!(r.warnings.iter().any(|w| w.contains("--server-pid 200 could not be read")), "{:?}", r.warnings);
        assert!(r.warnings.iter().any(|w| w.contains("--redis-pid process (300)")), "{:?}", r.warnings);
    }

    /// One node, one URL, no relay: the figures and the summary as before (no node or nodes lines).
    #[test]
    fn one_node_as_before() {
        let p = plan(&[
            "echo",
            "--url",
            "ws://127.0.0.1:1",
            "--connections",
            "2",
            "--duration",
            "1",
            "--grace",
            "1",
            "--server-pid",
            "100",
        ]);
        let t = Tally { ready: 2, held: 2, sent: 10, received: 10, ..Tally::default() };
        let a = points(0, 100, 1000, 1000);
        let s = Samples {
            before: a.before,
            at_go: a.at_go,
            at_window_end: a.at_window_end,
            at_end: a.at_end,
            server_source: "proc",
            windowed: true,
            nodes: vec![a],
            relay_at_go: vec![relay(&[])],
            relay_at_end: vec![relay(&[])],
            ..Samples::default()
        };
        let r = Report::build(&p, t, &s, 1);
        let srv = r.server.as_ref().unwrap();
        assert_eq!(
            (srv.pid, srv.cpu_s, srv.cpu_us_per_msg, srv.relay_cpu_s),
            (Some(100), Some(0.1), Some(10000.0), None)
        );
        assert_eq!((srv.nodes.len(), srv.nodes[0].cpu_s), (1, Some(0.1)));
        assert!(r.redis.is_none());
        assert_eq!(r.urls.iter().map(|u| (u.connections, u.ready)).collect::<Vec<_>>(), vec![(2, 2)]);
        let human = r.human();
        assert!(human.contains("server    pid 100: 0.10 s CPU"), "{human}");
        assert!(!human.contains("node") && !human.contains("relay") && !human.contains("redis"), "{human}");
    }
}
