//! The plain endpoints: `/health`, `/metrics` (Prometheus text), `/stats` (JSON), and the embedded files
//! (`/throng.js`, the demo page at `/`: [`static_files`]). A connection is kept open after a success when the
//! client keeps it alive (HTTP/1.1 without `Connection: close`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::{Acquire, Relaxed};

use throng_protocol::handshake::{self, Request, Status};

use super::static_files;
use crate::metrics::{self, Observed, ShardMetrics};
use crate::shard::Env;
use crate::sys;

/// Writes the response to a non-upgrade request into `out`: with `keep_alive` (the client's choice) a
/// success keeps the connection open; an error response always closes it.
pub fn respond(env: &Env, req: &Request<'_>, out: &mut Vec<u8>, keep_alive: bool) {
    ShardMetrics::inc(&env.metrics.http_requests_total);
    if req.method != "GET" && req.method != "HEAD" {
        ShardMetrics::inc(&env.metrics.http_rejected_total);
        handshake::write_rejection(out, Status::MethodNotAllowed, "only GET is served here");
        return;
    }
    let head = req.method == "HEAD";
    if let Some(file) = static_files::lookup(req.path, env.cfg().demo) {
        let body = if head { &[][..] } else { file.body.as_bytes() };
        let headers = [("Cache-Control", file.cache_control), ("X-Content-Type-Options", "nosniff")];
        handshake::write_response(out, Status::Ok, file.content_type, &headers, body, keep_alive);
        return;
    }
    let (ctype, body) = match req.path {
        "/health" => {
            // 503 takes the node out of a load balancer's rotation: while starting (connections accepted now
            // would all stay on the shards already up) and for the whole drain, from the signal on. A
            // degraded node answers 200: it serves, and the body says what an operator should look at.
            let (serving, body) = health(env);
            if !serving {
                ShardMetrics::inc(&env.metrics.http_rejected_total);
                let body = if head { &[][..] } else { body.as_bytes() };
                let headers = [("Cache-Control", "no-store")];
                handshake::write_response(
                    out,
                    Status::ServiceUnavailable,
                    "application/json",
                    &headers,
                    body,
                    keep_alive,
                );
                return;
            }
            ("application/json", body)
        }
        "/metrics" => {
            let rss = sys::rss_bytes().unwrap_or(0);
            let uptime = env.shared.started.elapsed().as_secs();
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
            ];
            let mut text = metrics::prometheus(&env.shared.metrics, &extra);
            if let Some(r) = &env.shared.relay {
                let _ = writeln!(text, "# HELP throng_relay_up 1 while the Redis relay is connected.\n# TYPE throng_relay_up gauge\nthrong_relay_up {}", u8::from(r.is_up()));
                r.metrics.each(|name, kind, help, v| {
                    let _ = writeln!(
                        text,
                        "# HELP throng_relay_{name} {help}\n# TYPE throng_relay_{name} {kind}\nthrong_relay_{name} {v}"
                    );
                });
            }
            ("text/plain; version=0.0.4", text)
        }
        "/stats" => ("application/json", stats(env)),
        _ => {
            ShardMetrics::inc(&env.metrics.http_rejected_total);
            handshake::write_rejection(out, Status::NotFound, "unknown path");
            return;
        }
    };
    let body = if head { &[][..] } else { body.as_bytes() };
    handshake::write_response(out, Status::Ok, ctype, &[("Cache-Control", "no-store")], body, keep_alive);
}

/// `/health`: whether the node serves (false: 503) and the JSON body. `status` is `starting` until every
/// shard listens, `draining` from the drain's signal on, `degraded` while it serves but an operator should
/// look ([`metrics::DEGRADED_WINDOW`] after any of: a shard dropped deliveries from other shards, a shard ran
/// its timers more than [`metrics::LAG_DEGRADED`] late, accepting paused for want of file descriptors; and
/// while at least 90% of `max_connections` are open), `ok` otherwise; `reason` says why when not `ok`.
fn health(env: &Env) -> (bool, String) {
    let s = &env.shared;
    let (up, all) = (s.listening.load(Acquire), s.config.shards);
    // Not counting this request's own connection.
    let open = s.open_connections.load(Relaxed).saturating_sub(1);
    let websockets: u64 = s.metrics.iter().map(|m| m.ws_connections.load(Relaxed)).sum();
    let max = s.config.max_connections;
    let shards: Vec<ShardHealth> = s
        .metrics
        .iter()
        .map(|m| ShardHealth {
            late_ms: Observed::recent(&m.obs.lag_at, s.started).then(|| m.obs.lag_us.load(Relaxed) / 1000),
            ring_drops: Observed::recent(&m.obs.ring_drop_at, s.started),
            fd_pause: Observed::recent(&m.obs.fd_pause_at, s.started),
        })
        .collect();
    let (mut status, mut reasons) = verdict(s.draining.load(Relaxed), up, all, open, max, &shards);
    if let Some(r) = s.relay.as_ref().filter(|r| !r.is_up()) {
        // Relayed channels cannot publish or subscribe; connections and node-local channels still work.
        if status == "ok" {
            status = "degraded";
        }
        reasons.push(format!(
            "Redis unreachable ({}): cluster-wide publishes and subscribes answer unavailable",
            r.error()
        ));
    }
    let mut o = String::with_capacity(256);
    let _ = write!(
        o,
        "{{\"status\":\"{status}\",\"shards\":{all},\"shards_listening\":{up},\"connections\":{open},\"websockets\":{websockets},\"max_connections\":{},\"uptime_seconds\":{}",
        max.map_or_else(|| "null".to_string(), |m| m.to_string()),
        s.started.elapsed().as_secs(),
    );
    if !reasons.is_empty() {
        let mut reason = Vec::with_capacity(128);
        handshake::write_json_str(&mut reason, &reasons.join("; "));
        o.push_str(",\"reason\":");
        o.push_str(&String::from_utf8_lossy(&reason));
    }
    o.push('}');
    (matches!(status, "ok" | "degraded"), o)
}

/// What `/health` knows of one shard: recent trouble within [`metrics::DEGRADED_WINDOW`].
#[derive(Clone, Copy, Debug, Default)]
struct ShardHealth {
    /// It ran a tick more than [`metrics::LAG_DEGRADED`] late: how late (ms).
    late_ms: Option<u64>,
    /// Deliveries to it were dropped.
    ring_drops: bool,
    /// It paused accepting, out of file descriptors.
    fd_pause: bool,
}

/// The status and its reasons (none when `ok`).
fn verdict(
    draining: bool,
    up: usize,
    all: usize,
    open: usize,
    max: Option<usize>,
    shards: &[ShardHealth],
) -> (&'static str, Vec<String>) {
    let window = metrics::DEGRADED_WINDOW.as_secs();
    if draining {
        return ("draining", vec!["shutting down: new connections go to other nodes".into()]);
    }
    if up < all {
        return ("starting", vec![format!("starting: {up} of {all} shards listening")]);
    }
    let mut reasons = Vec::new();
    if let Some(max) = max.filter(|&m| m > 0 && open * 10 >= m * 9) {
        reasons.push(format!("{open} of max_connections {max} open: at the limit newcomers get 503"));
    }
    for (i, sh) in shards.iter().enumerate() {
        if let Some(ms) = sh.late_ms {
            reasons.push(format!("shard {i} ran its timers {ms} ms late in the last {window} s: overloaded"));
        }
        if sh.ring_drops {
            reasons.push(format!(
                "shard {i} lost deliveries from other shards (ring full) in the last {window} s: subscribers got gap markers"
            ));
        }
        if sh.fd_pause {
            reasons.push(format!("shard {i} ran out of file descriptors in the last {window} s: accepting paused"));
        }
    }
    (if reasons.is_empty() { "ok" } else { "degraded" }, reasons)
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
        "{{\"version\":\"{}\",\"driver\":\"{}\",\"shards\":{},\"uptime_seconds\":{},\"connections\":{},\"rss_bytes\":{},\"draining\":{},\"closing\":{},\"auth\":\"{}\",\"users\":{},\"client_addresses\":{},",
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
    // Publish-to-write latency over every delivery since start (the histogram `/metrics` exports), summed
    // over the shards: a reader takes two samples for deliveries per second and their mean latency.
    let (count, sum_us) = s.metrics.iter().fold((0u64, 0u64), |(c, t), m| {
        let (_, count, sum_us) = m.obs.hists[0].read();
        (c + count, t.wrapping_add(sum_us))
    });
    let _ = write!(o, "\"delivery_latency\":{{\"count\":{count},\"sum_us\":{sum_us}}},\"per_shard\":[");
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
    o.push(']');
    if let Some(r) = &s.relay {
        let _ = write!(
            o,
            ",\"relay\":{{\"node\":\"{}\",\"up\":{},\"cluster\":{}",
            r.node,
            r.is_up(),
            r.cluster.load(Relaxed)
        );
        r.metrics.each(|name, _, _, v| {
            let _ = write!(o, ",\"{name}\":{v}");
        });
        o.push('}');
    }
    o.push('}');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_verdicts() {
        let calm = [ShardHealth::default(); 2];
        assert_eq!(verdict(false, 2, 2, 5, Some(100), &calm), ("ok", vec![]));
        let (s, r) = verdict(false, 1, 2, 0, None, &calm);
        assert_eq!((s, r[0].as_str()), ("starting", "starting: 1 of 2 shards listening"));
        // Draining wins over everything else.
        assert_eq!(verdict(true, 1, 2, 99, Some(100), &calm).0, "draining");
        let (s, r) = verdict(false, 2, 2, 90, Some(100), &calm);
        assert_eq!(s, "degraded");
        assert!(r[0].contains("max_connections"), "{r:?}");
        assert_eq!(verdict(false, 2, 2, 89, Some(100), &calm).0, "ok");
        let troubled = [ShardHealth::default(), ShardHealth { late_ms: Some(700), ring_drops: true, fd_pause: true }];
        let (s, r) = verdict(false, 2, 2, 0, None, &troubled);
        assert_eq!((s, r.len()), ("degraded", 3), "{r:?}");
        assert!(r[0].starts_with("shard 1 ran its timers 700 ms late"), "{r:?}");
    }
}
