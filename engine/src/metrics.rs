//! Per-shard counters, readable from any shard for `/metrics` and `/stats`.
//!
//! Each shard is the only writer of its own [`ShardMetrics`], so an increment is a relaxed load and store
//! (two plain moves), not an atomic read-modify-write; readers on other threads see a value at most a few
//! increments old. Nothing on the per-message path takes a lock.
//!
//! Besides the counters: closes by code and refusals by reason (arrays of the same single-writer counters,
//! exported with a `code` / `reason` label), and histograms ([`Hist`]): each shard records into its own
//! hdrhistogram and, once per tick (50 ms), adds what it recorded into a snapshot behind a mutex that the
//! scrape reads ([`SharedHist`]): one lock per shard per tick, none per message.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

macro_rules! counters {
    ($( #[doc = $doc:literal] $name:ident : $kind:literal ),* $(,)?) => {
        /// The counters and gauges of one shard.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( #[doc = $doc] pub $name: AtomicU64, )*
            /// Labelled counters, histograms and health marks (see [`Observed`]).
            pub obs: Observed,
        }

        impl ShardMetrics {
            /// Every metric as (name, kind, help, value).
            pub fn each(&self, mut f: impl FnMut(&'static str, &'static str, &'static str, u64)) {
                $( f(stringify!($name), $kind, $doc, self.$name.load(Relaxed)); )*
            }
        }
    };
}

counters! {
    /// Connections currently open (WebSocket or HTTP).
    connections: "gauge",
    /// Connections accepted since start.
    accepted_total: "counter",
    /// Successful WebSocket upgrades.
    upgrades_total: "counter",
    /// Upgrade or HTTP requests answered with an error status.
    http_rejected_total: "counter",
    /// Plain HTTP requests served.
    http_requests_total: "counter",
    /// Connections dropped for not completing the upgrade in time.
    handshake_timeouts_total: "counter",
    /// Connections closed for protocol errors (1002).
    protocol_errors_total: "counter",
    /// Connections closed for invalid UTF-8 (1007).
    invalid_utf8_total: "counter",
    /// Connections closed for oversize messages (1009).
    too_big_total: "counter",
    /// Connections closed as slow consumers (4008).
    slow_consumers_total: "counter",
    /// Connections closed after the idle timeout.
    idle_timeouts_total: "counter",
    /// Server pings sent.
    pings_sent_total: "counter",
    /// WebSocket messages received.
    messages_in_total: "counter",
    /// WebSocket frames queued or written to clients: every one (deliveries, echoes, replies, welcomes, pings, pongs, closes).
    frames_out_total: "counter",
    /// Bytes read from sockets.
    bytes_in_total: "counter",
    /// Bytes written to sockets.
    bytes_out_total: "counter",
    /// Writes that found the socket buffer full and had to wait.
    write_waits_total: "counter",
    /// Connections refused because max_connections was reached.
    over_capacity_total: "counter",
    /// Socket errors other than resets.
    io_errors_total: "counter",
    /// v1 commands received.
    commands_total: "counter",
    /// v1 commands refused as malformed or invalid.
    bad_commands_total: "counter",
    /// Connections closed with 1008 after repeated invalid commands.
    abuse_closes_total: "counter",
    /// Commands refused by permissions.
    forbidden_total: "counter",
    /// Commands refused because another shard's ring was full.
    overloaded_total: "counter",
    /// Messages published on channels whose home is this shard.
    publishes_total: "counter",
    /// Subscriptions started on this shard.
    subscriptions_total: "counter",
    /// Gap markers sent (drop-oldest slow consumers, or deliveries dropped on a full ring).
    gaps_total: "counter",
    /// Publishes and subscribes refused because the shard holds max_channels channels.
    channel_limit_total: "counter",
    /// Messages refused by the per-connection rate limits (max_messages_per_second, max_bytes_per_second).
    rate_limited_total: "counter",
    /// Subscribes refused because the connection holds max_subscriptions.
    subscription_limit_total: "counter",
    /// Connections closed with 1013 because the shard's max_unfinished_bytes was used up.
    unfinished_limit_closes_total: "counter",
    /// Connections closed with 1008 for not finishing a message within message_timeout.
    message_timeouts_total: "counter",
    /// History messages dropped to keep the shard within max_history_bytes.
    history_evicted_total: "counter",
    /// Pings answered by a later ping's pong (more than 16 in one read).
    pongs_coalesced_total: "counter",
    /// Times accepting paused because the process ran out of file descriptors.
    accept_pauses_total: "counter",
    /// io_uring driver: receives ended because the shard's buffer ring was empty (re-armed once buffers were back; the data waited in the socket).
    uring_buffers_empty_total: "counter",
    /// io_uring driver: flush-pass write batches submitted (one io_uring_enter each).
    uring_send_batches_total: "counter",
    /// io_uring driver: connection writes sent in those batches.
    uring_batched_writes_total: "counter",
    /// io_uring driver: writes sent zero-copy (a buffer of at least uring_zerocopy_threshold bytes).
    uring_zerocopy_sends_total: "counter",
    /// io_uring driver: zero-copy writes the kernel copied after all (loopback always does).
    uring_zerocopy_copied_total: "counter",
    /// Bytes of channel history held.
    history_bytes: "gauge",
    /// Channels held (homes plus channels with local subscribers).
    channels: "gauge",
    /// Bytes held for unfinished requests, frames and messages.
    unfinished_bytes: "gauge",
    /// Upgrades refused with 401: missing, malformed or invalid token.
    auth_refused_total: "counter",
    /// Upgrades refused with 403 for their Origin.
    origin_refused_total: "counter",
    /// Upgrades refused with 429: max_upgrades_per_second_per_ip.
    upgrade_rate_limited_total: "counter",
    /// Upgrades refused with 403: max_connections_per_user.
    user_limit_total: "counter",
    /// Upgrades refused with 403: max_connections_per_ip.
    ip_limit_total: "counter",
    /// Connections closed with 4001 when their token expired.
    tokens_expired_total: "counter",
    /// Tokens replaced by `refresh`.
    refreshes_total: "counter",
    /// Connections closed for a missing or malformed PROXY protocol header.
    proxy_header_errors_total: "counter",
    /// Upgrades refused with 503 because the server is draining (also in http_rejected_total).
    drain_refused_total: "counter",
    /// Shard loop turns.
    turns_total: "counter",
    /// Turns that ended with work left over (a step used up its budget).
    busy_turns_total: "counter",

    // observability: connection kinds, subscriptions, queues, ring drops (labelled counters and histograms:
    // `Observed`).
    /// Upgraded connections currently open (WebSocket: /ws and /echo).
    ws_connections: "gauge",
    /// Connections currently open that are not upgraded (HTTP requests, upgrades in progress).
    http_connections: "gauge",
    /// Active channel subscriptions of this shard's connections.
    active_subscriptions: "gauge",
    /// Bytes in connections' output queues (copies of what their sockets did not take yet).
    queued_bytes: "gauge",
    /// Deliveries dropped on their way to this shard from other shards (its ring and the senders' overflow full).
    ring_dropped_total: "counter",

    // api: the backend HTTP API (`/api/*`, engine/src/http/api.rs). Requests, then refusals by reason.
    /// Backend API requests received (every `/api/*` request, refused ones included).
    api_requests_total: "counter",
    /// Messages published through the backend API (each item of a batch counts).
    api_published_total: "counter",
    /// WebSocket connections closed by `POST /api/disconnect`.
    api_disconnected_total: "counter",
    /// API requests refused with 401: missing or wrong `Authorization: apikey`.
    api_unauthorized_total: "counter",
    /// API requests refused with 404: the API is off (no api_key), an unknown path, or not on admin_listen.
    api_not_found_total: "counter",
    /// API requests refused with 405: a wrong method for the path.
    api_method_not_allowed_total: "counter",
    /// API requests refused with 400: malformed JSON, a bad field, an invalid channel or query.
    api_bad_request_total: "counter",
    /// Requests refused with 413 (body over max_api_body_bytes, before it is read) or 411 (chunked).
    api_too_large_total: "counter",
    /// API requests refused with 503: too many waiting for other shards, a full ring, or no answer in time.
    api_overloaded_total: "counter",
}

impl ShardMetrics {
    /// Adds `n` to a counter this shard owns (single writer: no atomic read-modify-write needed).
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }

    /// Subtracts one from a gauge.
    #[inline]
    pub fn dec(c: &AtomicU64) {
        c.store(c.load(Relaxed).saturating_sub(1), Relaxed);
    }
}

/// Close codes counted apart in `throng_closes_total{code}`; anything else is `other`. 1005: the client's
/// close carried no code. 1006 (never sent on the wire) counts WebSocket connections that ended without a
/// close handshake (reset, EOF, write error).
pub const CLOSE_CODES: [u16; 16] =
    [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1013, 4001, 4003, 4008, 4029];
const CLOSE_SLOTS: usize = CLOSE_CODES.len() + 1;

/// Why a connection or upgrade was refused: the `reason` label of `throng_refusals_total`, and the key of the
/// rate-limited refusal log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached: 503 right after accept.
    OverCapacity,
    /// Draining: 503.
    Draining,
    /// A malformed request head or upgrade (400, 426, 431, 501...), a token in two places, a bad `?user=`.
    BadRequest,
    /// No WebSocket endpoint at the path (404).
    NotFound,
    /// Origin not allowed (403).
    Origin,
    /// `max_upgrades_per_second_per_ip` (429).
    UpgradeRate,
    /// Missing, malformed or invalid token (401).
    Unauthorized,
    /// `max_connections_per_user` (403).
    UserLimit,
    /// `max_connections_per_ip` (403).
    IpLimit,
    /// Missing or malformed PROXY protocol header (dropped).
    ProxyHeader,
    /// Request not complete within `handshake_timeout` (dropped).
    HandshakeTimeout,
}

impl Refused {
    /// Every reason, in label order.
    pub const ALL: [Refused; 11] = [
        Refused::OverCapacity,
        Refused::Draining,
        Refused::BadRequest,
        Refused::NotFound,
        Refused::Origin,
        Refused::UpgradeRate,
        Refused::Unauthorized,
        Refused::UserLimit,
        Refused::IpLimit,
        Refused::ProxyHeader,
        Refused::HandshakeTimeout,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Refused::OverCapacity => "over_capacity",
            Refused::Draining => "draining",
            Refused::BadRequest => "bad_request",
            Refused::NotFound => "not_found",
            Refused::Origin => "origin",
            Refused::UpgradeRate => "upgrade_rate",
            Refused::Unauthorized => "unauthorized",
            Refused::UserLimit => "user_limit",
            Refused::IpLimit => "ip_limit",
            Refused::ProxyHeader => "proxy_header",
            Refused::HandshakeTimeout => "handshake_timeout",
        }
    }
}

/// Histogram bucket bounds (`le`), in seconds, shared by every histogram.
pub const BUCKETS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// A shard's own histogram of durations in microseconds (1 µs to 1 h, 2 significant digits), with the exact
/// sum. Recording costs a few nanoseconds and never allocates.
#[derive(Debug)]
pub struct Hist {
    h: Histogram<u64>,
    sum_us: u64,
}

impl Default for Hist {
    fn default() -> Self {
        // Bounds are constants that hdrhistogram accepts.
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap_or_else(|_| unreachable!());
        Self { h, sum_us: 0 }
    }
}

impl Hist {
    /// Records one duration.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Records one duration in microseconds.
    #[inline]
    pub fn record_us(&mut self, us: u64) {
        self.h.saturating_record(us);
        self.sum_us = self.sum_us.wrapping_add(us);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Cumulative counts at each of [`BUCKETS`] (then +Inf = the total), and the sum in microseconds.
    pub fn buckets(&self) -> ([u64; BUCKETS.len()], u64, u64) {
        let mut per = [0u64; BUCKETS.len()];
        let mut over = 0;
        for v in self.h.iter_recorded() {
            let us = self.h.lowest_equivalent(v.value_iterated_to());
            let n = v.count_at_value();
            match BUCKETS.iter().position(|&le| us as f64 <= le * 1e6) {
                Some(i) => per[i] += n,
                None => over += n,
            }
        }
        let mut cum = [0u64; BUCKETS.len()];
        let mut acc = 0;
        for (i, n) in per.iter().enumerate() {
            acc += n;
            cum[i] = acc;
        }
        (cum, acc + over, self.sum_us)
    }
}

/// What a scrape reads of one shard histogram: the shard adds what it recorded once per tick.
#[derive(Debug, Default)]
pub struct SharedHist(Mutex<Hist>);

impl SharedHist {
    /// Moves what `local` recorded into the snapshot (the shard's once-per-tick step).
    pub fn absorb(&self, local: &mut Hist) {
        if local.h.is_empty() {
            return;
        }
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.h.add(&local.h);
        s.sum_us = s.sum_us.wrapping_add(local.sum_us);
        drop(s);
        local.h.reset();
        local.sum_us = 0;
    }

    /// Cumulative buckets, count and sum (µs) of the snapshot.
    pub fn read(&self) -> ([u64; BUCKETS.len()], u64, u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).buckets()
    }
}

/// The histograms every shard keeps.
pub const HISTOGRAMS: [(&str, &str); 3] = [
    (
        "delivery_latency_seconds",
        "Time from a publish's arrival (the command or API request read) to its frame being written to a subscriber's socket, per delivery.",
    ),
    ("loop_lag_seconds", "How late the shard ran each timer tick (50 ms) after it was due: timers fire this late."),
    ("flush_pass_seconds", "Shard time spent on each broadcast flush pass (over its slices)."),
];

/// A shard's labelled counters, histogram snapshots, and the marks `/health` reads.
#[derive(Debug, Default)]
pub struct Observed {
    /// Closes by code, indexed like [`CLOSE_CODES`] (then `other`).
    pub closes: [AtomicU64; CLOSE_SLOTS],
    /// Refusals by reason, indexed like [`Refused::ALL`].
    pub refusals: [AtomicU64; Refused::ALL.len()],
    /// Snapshots of the histograms, in [`HISTOGRAMS`] order.
    pub hists: [SharedHist; 3],
    /// Milliseconds since start (+1; 0 = never) of the last tick at which the shard found deliveries dropped
    /// on their way to it.
    pub ring_drop_at: AtomicU64,
    /// The same for the last tick that ran over [`LAG_DEGRADED`] late, and how late (µs).
    pub lag_at: AtomicU64,
    /// How late that tick ran, in microseconds.
    pub lag_us: AtomicU64,
    /// The same for the last time accepting paused for want of file descriptors.
    pub fd_pause_at: AtomicU64,
}

/// A tick this late makes `/health` say `degraded` (for [`DEGRADED_WINDOW`]).
pub const LAG_DEGRADED: Duration = Duration::from_millis(500);
/// How long an event (ring drop, late tick, accept pause) keeps `/health` at `degraded`.
pub const DEGRADED_WINDOW: Duration = Duration::from_secs(10);

impl Observed {
    /// Counts a close with `code`.
    #[inline]
    pub fn close(&self, code: u16) {
        let i = CLOSE_CODES.iter().position(|&c| c == code).unwrap_or(CLOSE_CODES.len());
        ShardMetrics::inc(&self.closes[i]);
    }

    /// Counts a refusal.
    #[inline]
    pub fn refused(&self, why: Refused) {
        ShardMetrics::inc(&self.refusals[why as usize]);
    }

    /// Stores "now" (ms since `started`, +1) in a mark.
    pub fn mark(mark: &AtomicU64, started: Instant) {
        mark.store(started.elapsed().as_millis() as u64 + 1, Relaxed);
    }

    /// Whether a mark was set within [`DEGRADED_WINDOW`].
    pub fn recent(mark: &AtomicU64, started: Instant) -> bool {
        let at = mark.load(Relaxed);
        at != 0 && (started.elapsed().as_millis() as u64 + 1).saturating_sub(at) < DEGRADED_WINDOW.as_millis() as u64
    }
}

/// What a shard records for itself: its histograms (moved into [`Observed::hists`] once per tick) and the
/// refusal log's rate limit. `epoch` is the process start, the origin of the publish timestamps carried with
/// messages (nanoseconds since it, +1; 0 = none).
#[derive(Debug)]
pub struct Recorder {
    /// The process start.
    pub epoch: Instant,
    /// Publish-to-write latency per delivery.
    pub latency: Hist,
    /// Loop lag per tick.
    pub lag: Hist,
    /// Flush pass durations.
    pub flush: Hist,
    /// The refusal log's rate limit.
    pub refusals: RefusalLog,
}

impl Recorder {
    /// A recorder timing from `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            latency: Hist::default(),
            lag: Hist::default(),
            flush: Hist::default(),
            refusals: RefusalLog::default(),
        }
    }

    /// A publish timestamp for now.
    #[inline]
    pub fn stamp(&self) -> u64 {
        stamp(self.epoch)
    }

    /// Moves what was recorded into the snapshots scrapes read.
    pub fn publish(&mut self, m: &ShardMetrics) {
        m.obs.hists[0].absorb(&mut self.latency);
        m.obs.hists[1].absorb(&mut self.lag);
        m.obs.hists[2].absorb(&mut self.flush);
    }
}

/// A publish timestamp: nanoseconds since `epoch`, plus one (0 means "no timestamp").
#[inline]
pub fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64 + 1
}

/// Rate limit of the refusal log: at most one line per reason per second per shard; the refusals left out
/// are counted and reported on the next line.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: [Option<Instant>; Refused::ALL.len()],
    suppressed: [u64; Refused::ALL.len()],
}

impl RefusalLog {
    /// Lines per reason: one per this interval.
    pub const INTERVAL: Duration = Duration::from_secs(1);

    /// A refusal for `why` at `now`: `Some(suppressed since the last line)` when it is to be logged.
    pub fn admit(&mut self, why: Refused, now: Instant) -> Option<u64> {
        let i = why as usize;
        if self.last[i].is_some_and(|t| now.duration_since(t) < Self::INTERVAL) {
            self.suppressed[i] += 1;
            return None;
        }
        self.last[i] = Some(now);
        Some(std::mem::take(&mut self.suppressed[i]))
    }
}

/// Renders all shards' metrics in the Prometheus text format, with a `shard` label, followed by the
/// process-wide `extra` ones (name, kind, help, value).
pub fn prometheus(shards: &[std::sync::Arc<ShardMetrics>], extra: &[(&str, &str, &str, u64)]) -> String {
    let mut out = String::with_capacity(4096);
    let mut rows: Vec<(&'static str, &'static str, &'static str, Vec<u64>)> = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        let mut k = 0;
        s.each(|name, kind, help, v| {
            if i == 0 {
                rows.push((name, kind, help, Vec::with_capacity(shards.len())));
            }
            rows[k].3.push(v);
            k += 1;
        });
    }
    for (name, kind, help, values) in rows {
        let help = help.trim();
        let _ = writeln!(out, "# HELP throng_{name} {help}\n# TYPE throng_{name} {kind}");
        for (i, v) in values.iter().enumerate() {
            let _ = writeln!(out, "throng_{name}{{shard=\"{i}\"}} {v}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP throng_closes_total WebSocket connections closed, by the code of the close frame sent (ours, or the echo of the client's); 1006: ended without a close handshake.\n# TYPE throng_closes_total counter"
    );
    for (i, s) in shards.iter().enumerate() {
        for (k, c) in s.obs.closes.iter().enumerate() {
            let code = CLOSE_CODES.get(k).map_or_else(|| "other".to_string(), u16::to_string);
            let _ = writeln!(out, "throng_closes_total{{shard=\"{i}\",code=\"{code}\"}} {}", c.load(Relaxed));
        }
    }
    let _ = writeln!(
        out,
        "# HELP throng_refusals_total Connections and upgrades refused, by reason.\n# TYPE throng_refusals_total counter"
    );
    for (i, s) in shards.iter().enumerate() {
        for why in Refused::ALL {
            let v = s.obs.refusals[why as usize].load(Relaxed);
            let _ = writeln!(out, "throng_refusals_total{{shard=\"{i}\",reason=\"{}\"}} {v}", why.name());
        }
    }
    for (h, (name, help)) in HISTOGRAMS.iter().enumerate() {
        let _ = writeln!(out, "# HELP throng_{name} {help}\n# TYPE throng_{name} histogram");
        for (i, s) in shards.iter().enumerate() {
            let (cum, count, sum_us) = s.obs.hists[h].read();
            for (le, n) in BUCKETS.iter().zip(cum) {
                let _ = writeln!(out, "throng_{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(out, "throng_{name}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "throng_{name}_sum{{shard=\"{i}\"}} {:.6}", sum_us as f64 / 1e6);
            let _ = writeln!(out, "throng_{name}_count{{shard=\"{i}\"}} {count}");
        }
    }
    for (name, kind, help, v) in extra {
        let _ = writeln!(out, "# HELP throng_{name} {help}\n# TYPE throng_{name} {kind}\nthrong_{name} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_prometheus_text() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::inc(&a.accepted_total);
        ShardMetrics::add(&b.accepted_total, 5);
        let text = prometheus(&[a, b], &[("rss_bytes", "gauge", "Resident memory", 42)]);
        assert!(text.contains("# TYPE throng_accepted_total counter\n"));
        assert!(text.contains("throng_accepted_total{shard=\"0\"} 1\n"));
        assert!(text.contains("throng_accepted_total{shard=\"1\"} 5\n"));
        assert!(text.contains("# HELP throng_connections Connections currently open (WebSocket or HTTP).\n"));
        assert!(text.contains("throng_rss_bytes 42\n"));
    }

    #[test]
    fn histograms_are_cumulative_with_exact_sums() {
        let m = Arc::new(ShardMetrics::default());
        let mut local = Hist::default();
        for us in [5, 40, 40, 900, 2_000_000, 20_000_000] {
            local.record_us(us);
        }
        m.obs.hists[0].absorb(&mut local);
        assert_eq!(local.count(), 0, "absorbed");
        let (cum, count, sum) = m.obs.hists[0].read();
        assert_eq!((count, sum), (6, 5 + 40 + 40 + 900 + 2_000_000 + 20_000_000));
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        // le=10us: 1; le=50us: 3; le=1ms: 4; le=2.5s: 5; 20 s is over the last bound: +Inf only.
        assert_eq!((cum[0], cum[2], cum[6], cum[16], cum[18]), (1, 3, 4, 5, 5));
        let text = prometheus(std::slice::from_ref(&m), &[]);
        assert!(text.contains("throng_delivery_latency_seconds_bucket{shard=\"0\",le=\"+Inf\"} 6\n"), "{text}");
        assert!(text.contains("throng_delivery_latency_seconds_sum{shard=\"0\"} 22.000985\n"), "{text}");
        m.obs.close(1000);
        m.obs.close(3999);
        m.obs.refused(Refused::Origin);
        let text = prometheus(&[m], &[]);
        assert!(text.contains("throng_closes_total{shard=\"0\",code=\"1000\"} 1\n"), "{text}");
        assert!(text.contains("throng_closes_total{shard=\"0\",code=\"other\"} 1\n"), "{text}");
        assert!(text.contains("throng_refusals_total{shard=\"0\",reason=\"origin\"} 1\n"), "{text}");
    }

    #[test]
    fn refusal_log_is_rate_limited_per_reason() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.admit(Refused::Origin, t0), Some(0));
        for _ in 0..99 {
            assert_eq!(log.admit(Refused::Origin, t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(log.admit(Refused::Unauthorized, t0), Some(0), "per reason");
        assert_eq!(log.admit(Refused::Origin, t0 + Duration::from_secs(1)), Some(99));
    }
}
