//! The plain endpoints: `/health`, `/metrics` (Prometheus text) and `/stats` (JSON). Each response is
//! followed by closing the connection.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::{Acquire, Relaxed};

use throng_protocol::handshake::{self, Request, Status};

use crate::metrics::{self, ShardMetrics};
use crate::shard::Env;
use crate::sys;

/// Writes the response to a non-upgrade request into `out`.
pub fn respond(env: &Env, req: &Request<'_>, out: &mut Vec<u8>) {
    ShardMetrics::inc(&env.metrics.http_requests_total);
    if req.method != "GET" && req.method != "HEAD" {
        ShardMetrics::inc(&env.metrics.http_rejected_total);
        handshake::write_rejection(out, Status::MethodNotAllowed, "only GET is served here");
        return;
    }
    let head = req.method == "HEAD";
    let (ctype, body) = match req.path {
        "/health" => {
            if env.shared.draining.load(Relaxed) {
                ShardMetrics::inc(&env.metrics.http_rejected_total);
                handshake::write_rejection(out, Status::ServiceUnavailable, "draining");
                return;
            }
            let (up, all) = (env.shared.listening.load(Acquire), env.shared.config.shards);
            if up < all {
                ShardMetrics::inc(&env.metrics.http_rejected_total);
                let reason = format!("starting: {up} of {all} shards listening");
                handshake::write_rejection(out, Status::ServiceUnavailable, &reason);
                return;
            }
            ("text/plain", "ok".to_string())
        }
        "/metrics" => {
            let rss = sys::rss_bytes().unwrap_or(0);
            let uptime = env.shared.started.elapsed().as_secs();
            let dropped = env.shared.inboxes.iter().map(|i| i.dropped.load(Relaxed)).sum();
            let extra = [
                ("rss_bytes", "gauge", "Resident set size of the process.", rss),
                ("uptime_seconds", "gauge", "Seconds since start.", uptime),
                (
                    "ring_dropped_total",
                    "counter",
                    "Deliveries dropped between shards (ring and overflow full).",
                    dropped,
                ),
            ];
            ("text/plain; version=0.0.4", metrics::prometheus(&env.shared.metrics, &extra))
        }
        "/stats" => ("application/json", stats(env)),
        _ => {
            ShardMetrics::inc(&env.metrics.http_rejected_total);
            handshake::write_rejection(out, Status::NotFound, "unknown path");
            return;
        }
    };
    let body = if head { &[][..] } else { body.as_bytes() };
    handshake::write_response(out, Status::Ok, ctype, &[("Cache-Control", "no-store")], body, false);
}

/// `/stats`: connections, memory and per-shard counters as one JSON object.
fn stats(env: &Env) -> String {
    let s = &env.shared;
    // WebSocket connections are counted per user and per client address (the real one, behind trusted
    // proxies or the PROXY protocol).
    let (users, addresses) = s.limits.counted();
    let mut o = String::with_capacity(1024);
    let _ = write!(
        o,
        "{{\"version\":\"{}\",\"driver\":\"{}\",\"shards\":{},\"uptime_seconds\":{},\"connections\":{},\"rss_bytes\":{},\"draining\":{},\"auth\":\"{}\",\"users\":{},\"client_addresses\":{},\"per_shard\":[",
        env!("CARGO_PKG_VERSION"),
        s.driver_name,
        s.metrics.len(),
        s.started.elapsed().as_secs(),
        s.open_connections.load(Relaxed),
        sys::rss_bytes().unwrap_or(0),
        s.draining.load(Relaxed),
        if s.auth.is_some() { "jwt" } else { "open" },
        users,
        addresses,
    );
    for (i, m) in s.metrics.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push('{');
        let mut first = true;
        m.each(|name, _, _, v| {
            if !first {
                o.push(',');
            }
            first = false;
            let _ = write!(o, "\"{name}\":{v}");
        });
        o.push('}');
    }
    o.push_str("]}");
    o
}
