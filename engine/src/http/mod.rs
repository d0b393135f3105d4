//! HTTP on the WebSocket port: the upgrade decision for `/ws` and `/echo` (origin, client address, upgrade
//! rate, identity, connection limits), and the plain endpoints ([`endpoints`]: `/health`, `/metrics`,
//! `/stats`). Every plain response, and every refused upgrade, is followed by closing the connection.
//!
//! The checks run cheapest first and before anything is kept for the connection: a refused upgrade costs
//! the parse of its request head and, for a token, its verification, and holds nothing after the response.

pub mod endpoints;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use throng_protocol::handshake::{self, Request, Status};

use crate::auth::limits::Over;
use crate::auth::{self, net, Identity};
use crate::channel::text_frame;
use crate::conn::close::{self, Close};
use crate::conn::read::bucket_caps;
use crate::conn::{timers, Conn, ConnKey, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};
use crate::sys;

/// Refuses an upgrade from `client_addr`: the status and JSON reason, counted and logged (at debug level, with
/// the client's real address), then close.
#[allow(clippy::too_many_arguments)]
fn refuse(
    env: &Env,
    ctx: &mut Ctx,
    key: ConnKey,
    conn: &mut Conn,
    client_addr: IpAddr,
    status: Status,
    reason: &str,
    headers: &[(&str, &str)],
) {
    ShardMetrics::inc(&env.metrics.http_rejected_total);
    tracing::debug!(shard = env.id, %client_addr, status = status.code(), reason, "upgrade refused");
    handshake::write_rejection_with(&mut ctx.out, status, reason, headers);
    close::close(env, ctx, key, conn, Close::AfterResponse);
}

/// The client's address: from the PROXY header when there was one, else the TCP peer, believed to be a
/// proxy only when it is one of `trusted_proxies` (then the forwarding headers say who the client is).
fn client_ip(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &Conn, req: &Request<'_>) -> IpAddr {
    if let Some(ip) = ctx.proxied.remove(&key) {
        return ip;
    }
    let peer = sys::peer_ip(conn.fd()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let headers = || req.headers().filter_map(|(n, v)| Some((n, std::str::from_utf8(v).ok()?)));
    let xff = headers().filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for")).map(|(_, v)| v);
    let real = headers().find(|(n, _)| n.eq_ignore_ascii_case("x-real-ip")).map(|(_, v)| v);
    net::client_addr(peer, &env.cfg().trusted_proxies, xff, real)
}

/// Handles a complete request head: upgrades it (writing the 101, and the welcome on `/ws`), or answers it
/// and closes.
pub fn on_request(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>) {
    if !(req.is_websocket_upgrade() || req.path == "/echo" || req.path == "/ws") {
        endpoints::respond(env, req, &mut ctx.out);
        close::close(env, ctx, key, conn, Close::AfterResponse);
        return;
    }
    let cfg = env.cfg();
    let client_addr = client_ip(env, ctx, key, conn, req);
    let refusal = if let Err(e) = req.validate_upgrade() {
        Some((e.status(), e.reason()))
    } else if req.path != "/ws" && (req.path != "/echo" || !cfg.echo) {
        Some((Status::NotFound, "no WebSocket endpoint at this path"))
    } else if env.shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        // From the signal on, through the drain delay: the connections already here keep working, new ones
        // go elsewhere (a proxy retries another node on this 503).
        ShardMetrics::inc(&env.metrics.drain_refused_total);
        Some((Status::ServiceUnavailable, "server is shutting down: connect to another node"))
    } else if req.origin.is_some_and(|o| !net::origin_allowed(o, &cfg.allowed_origins)) {
        ShardMetrics::inc(&env.metrics.origin_refused_total);
        Some((Status::Forbidden, "origin not allowed"))
    } else {
        None
    };
    if let Some((status, reason)) = refusal {
        return refuse(env, ctx, key, conn, client_addr, status, reason, &[]);
    }
    let ip = net::limit_key(client_addr);
    if let Err(secs) = env.shared.limits.upgrade(ip, Instant::now()) {
        ShardMetrics::inc(&env.metrics.upgrade_rate_limited_total);
        let retry = secs.to_string();
        let reason = "too many upgrades from this address: max_upgrades_per_second_per_ip";
        return refuse(env, ctx, key, conn, client_addr, Status::TooManyRequests, reason, &[("Retry-After", &retry)]);
    }
    if req.path != "/ws" {
        handshake::write_switching_protocols(&mut ctx.out, req.ws_key.unwrap_or_default().as_bytes(), None);
        conn.phase = Phase::Echo;
        timers::arm_heartbeat(env, ctx, conn);
        return;
    }
    let mut identity = match identify(env, req) {
        Ok(i) => i,
        Err((status, reason)) => {
            if status == Status::Unauthorized {
                ShardMetrics::inc(&env.metrics.auth_refused_total);
            }
            return refuse(env, ctx, key, conn, client_addr, status, &reason, &[]);
        }
    };
    if req.subprotocol_bearer().is_some() && !req.offers_subprotocol("throng.v1") {
        let reason = "a bearer.<token> subprotocol goes with throng.v1, which the server selects";
        return refuse(env, ctx, key, conn, client_addr, Status::BadRequest, reason, &[]);
    }
    identity.ip = Some(ip);
    if let Err(over) = env.shared.limits.acquire(&identity.user, identity.ip) {
        let (metric, reason) = match over {
            Over::User => (&env.metrics.user_limit_total, "this user holds max_connections_per_user connections"),
            Over::Ip => (&env.metrics.ip_limit_total, "this address holds max_connections_per_ip connections"),
        };
        ShardMetrics::inc(metric);
        return refuse(env, ctx, key, conn, client_addr, Status::Forbidden, reason, &[]);
    }
    let protocol = req.offers_subprotocol("throng.v1").then_some("throng.v1");
    handshake::write_switching_protocols(&mut ctx.out, req.ws_key.unwrap_or_default().as_bytes(), protocol);
    let client = format!("{:x}-{:x}-{:x}", env.id, conn.gen, key.idx);
    let ping = cfg.ping_interval.as_secs() as u32;
    text_frame(&mut ctx.out, |o| throng_protocol::message::encode_welcome(o, &client, &identity.user, ping));
    tracing::debug!(shard = env.id, %client_addr, %client, user = &*identity.user, "connected");
    conn.expires_at = timers::expiry_tick(env, identity.exp);
    conn.id = Some(Arc::new(identity));
    conn.phase = Phase::V1;
    // A new connection starts with full buckets: a second's worth of messages and bytes.
    (conn.msg_credit, conn.byte_credit) = bucket_caps(env);
    timers::arm_heartbeat(env, ctx, conn);
}

/// Who the request is: a verified token's identity, or (open development mode) the `?user=` name.
fn identify(env: &Env, req: &Request<'_>) -> Result<Identity, (Status, String)> {
    let Some(verifier) = &env.shared.auth else {
        return match req.query_param("user") {
            None => Ok(Identity::open("anonymous")),
            Some(u) if auth::valid_user(&u) => Ok(Identity::open(&u)),
            Some(_) => Err((Status::BadRequest, "user must be 1-128 characters of [A-Za-z0-9_.@=/-]".into())),
        };
    };
    match auth::token_of(req) {
        Err(reason) => Err((Status::BadRequest, reason.into())),
        Ok(None) => Err((
            Status::Unauthorized,
            "missing token: send it as ?token=, Authorization: Bearer, or the subprotocol bearer.<token>".into(),
        )),
        Ok(Some(token)) => verifier.verify(&token).map_err(|e| (Status::Unauthorized, e.to_string())),
    }
}
