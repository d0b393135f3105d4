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
            // 503 takes the node out of a load balancer's rotation: while starting (connections accepted now
            // would all stay on the shards already up) and for the whole drain, from the signal on.
            let (up, all) = (env.shared.listening.load(Acquire), env.shared.config.shards);
            let unavailable = if env.shared.draining.load(Relaxed) {
                Some(("draining", "shutting down: new connections go to other nodes".to_string()))
            } else if up < all {
                Some(("starting", format!("starting: {up} of {all} shards listening")))
            } else {
                None
            };
            if let Some((status, reason)) = unavailable {
                ShardMetrics::inc(&env.metrics.http_rejected_total);
                let mut body = format!("{{\"status\":\"{status}\",\"reason\":").into_bytes();
                handshake::write_json_str(&mut body, &reason);
                body.push(b'}');
                let body = if head { &[][..] } else { &body[..] };
                let headers = [("Cache-Control", "no-store")];
                handshake::write_response(out, Status::ServiceUnavailable, "application/json", &headers, body, false);
                return;
            }
            ("text/plain", "ok".to_string())
        }
        "/metrics" => {
            let rss = sys::rss_bytes().unwrap_or(0);
            let uptime = env.shared.started.elapsed().as_secs();
            let dropped = env.shared.inboxes.iter().map(|i| i.dropped.load(Relaxed)).sum();
            let phase = match (env.shared.draining.load(Relaxed), env.shared.closing.load(Relaxed)) {
                (_, true) => 2,
                (true, false) => 1,
                (false, false) => 0,
            };
            let extra = [
                ("rss_bytes", "gauge", "Resident set size of the process.", rss),
                ("uptime_seconds", "gauge", "Seconds since start.", uptime),
                (
                    "drain_phase",
                    "gauge",
                    "0 serving; 1 draining, in the drain delay (/health 503, upgrades refused, connections open); 2 closing connections with 1001.",
                    phase,
                ),
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
        "{{\"version\":\"{}\",\"driver\":\"{}\",\"shards\":{},\"uptime_seconds\":{},\"connections\":{},\"rss_bytes\":{},\"draining\":{},\"closing\":{},\"auth\":\"{}\",\"users\":{},\"client_addresses\":{},\"per_shard\":[",
        env!("CARGO_PKG_VERSION"),
        s.driver_name,
        s.metrics.len(),
        s.started.elapsed().as_secs(),
        s.open_connections.load(Relaxed),
        sys::rss_bytes().unwrap_or(0),
        s.draining.load(Relaxed),
        s.closing.load(Relaxed),
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
