//! Per-shard counters, readable from any shard for `/metrics` and `/stats`.
//!
//! Each shard is the only writer of its own [`ShardMetrics`], so an increment is a relaxed load and store
//! (two plain moves), not an atomic read-modify-write; readers on other threads see a value at most a few
//! increments old. Nothing on the per-message path takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($( #[doc = $doc:literal] $name:ident : $kind:literal ),* $(,)?) => {
        /// The counters and gauges of one shard.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( #[doc = $doc] pub $name: AtomicU64, )*
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
    /// WebSocket frames queued or written to clients.
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
}
