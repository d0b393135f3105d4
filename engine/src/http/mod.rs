//! HTTP on the WebSocket port: the upgrade decision for `/ws` and `/echo` (origin, client address, upgrade
//! rate, identity, connection limits), the plain endpoints ([`endpoints`]: `/health`, `/metrics`,
//! `/stats`, and the embedded files of [`static_files`]: `/throng.js`, the demo page at `/`) and the
//! backend API ([`api`]: `/api/*`). A refused upgrade is followed by closing the connection; a plain
//! request's connection is kept for the next request unless the client or an error response closes it
//! (`Connection: close`), or its body was refused on its head ([`takes_body`]: then it is answered at once
//! and closed, the body unread), and is closed when idle for `handshake_timeout`.
//!
//! The checks run cheapest first and before anything is kept for the connection: a refused upgrade costs
//! the parse of its request head and, for a token, its verification, and holds nothing after the response.

pub mod api;
pub mod endpoints;
pub mod sse;
pub mod static_files;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use throng_protocol::handshake::{self, Request, Status};

use crate::auth::limits::Over;
use crate::auth::{self, net, Identity};
use crate::channel::text_frame;
use crate::conn::close::{self, Close};
use crate::conn::read::bucket_caps;
use crate::conn::{flag, timers, write, Conn, ConnKey, Phase};
use crate::metrics::{Refused, ShardMetrics};
use crate::shard::{Ctx, Env};
use crate::sys;

/// Refuses an upgrade from `client_addr`: the status and JSON reason, counted (`throng_refusals_total`, by a
/// reason told from the status) and logged (at info, rate-limited per reason, with the client's real
/// address: [`close::refused`]), then close.
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
    let why = match status {
        Status::ServiceUnavailable => Refused::Draining,
        Status::NotFound => Refused::NotFound,
        Status::TooManyRequests => Refused::UpgradeRate,
        Status::Unauthorized => Refused::Unauthorized,
        Status::Forbidden if reason.contains("max_connections_per_user") => Refused::UserLimit,
        Status::Forbidden if reason.contains("max_connections_per_ip") => Refused::IpLimit,
        Status::Forbidden => Refused::Origin,
        _ => Refused::BadRequest,
    };
    close::refused(env, ctx, why, Some(client_addr), None, reason);
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

/// Handles a complete request: upgrades it (writing the 101, and the welcome on `/ws`), or answers it (a
/// plain request, with its `body`).
pub fn on_request(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>, body: &[u8]) {
    if !(req.is_websocket_upgrade() || req.path == "/echo" || req.path == "/ws") {
        plain(env, ctx, key, conn, req, body);
        return;
    }
    let cfg = env.cfg();
    let client_addr = client_ip(env, ctx, key, conn, req);
    let refusal = if let Err(e) = req.validate_upgrade() {
        Some((e.status(), e.reason()))
    } else if on_admin_listener(env, conn) {
        Some((Status::NotFound, "no WebSocket endpoint on the admin listener"))
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
    let client = env.client_id(conn.gen, key.idx);
    let ping = cfg.ping_interval.as_secs() as u32;
    text_frame(&mut ctx.out, |o| throng_protocol::message::encode_welcome(o, &client, &identity.user, ping));
    tracing::debug!(shard = env.id, %client_addr, %client, user = &*identity.user, "connected");
    conn.expires_at = timers::expiry_tick(env, identity.exp());
    conn.id = Some(Arc::new(identity));
    conn.phase = Phase::V1;
    // A new connection starts with full buckets: a second's worth of messages and bytes.
    (conn.msg_credit, conn.byte_credit) = bucket_caps(env);
    timers::arm_heartbeat(env, ctx, conn);
}

/// Whether the body of a plain request whose head has arrived is to be read: only for an API request that
/// passes every check made on its head ([`api::head_ok`]: served on this port, the API enabled, the right
/// key, a known path and its method), and for `POST /publish` from a client whose token verifies. Any other
/// request with a body (refused on its head, or to an endpoint that takes none) is answered from its head
/// alone and its connection closed, the body unread: nobody without the key (or a token) makes a shard
/// buffer a byte of body, nor gets a `100 Continue`.
pub fn takes_body(env: &Env, conn: &Conn, req: &Request<'_>) -> bool {
    if is_api(req.path) {
        return api::head_ok(env, req, public_port(env, conn, req));
    }
    // The fallback clients' `POST /publish`: a body only from a client whose token verifies (any client in
    // the open development mode).
    req.path == "/publish" && req.method == "POST" && identify(env, req).is_ok()
}

fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Whether the request came to the main listener for what `admin_listen`, when set, serves alone.
fn public_port(env: &Env, conn: &Conn, req: &Request<'_>) -> bool {
    env.cfg().admin_listen.is_some()
        && (req.path.starts_with("/api") || matches!(req.path, "/metrics" | "/stats"))
        && !on_admin_listener(env, conn)
}

/// A plain request: the backend API, or an endpoint. With `admin_listen` set, `/metrics`, `/stats` and the
/// API are served only on connections accepted there.
fn plain(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>, body: &[u8]) {
    let keep_alive = req.keep_alive();
    let start = ctx.out.len();
    let public_port = public_port(env, conn, req);
    if is_api(req.path) {
        api::on_request(env, ctx, key, conn, req, body, public_port);
        if conn.flags & flag::HTTP_WAITING != 0 {
            return;
        }
    } else if matches!(req.path, "/sse" | "/poll" | "/publish") {
        // The fallback transports: a refusal closes, a stream keeps the connection.
        sse::on_request(env, ctx, key, conn, req, body);
        if conn.phase != Phase::Handshake || conn.flags & flag::HTTP_WAITING != 0 {
            return;
        }
    } else if public_port && matches!(req.path, "/metrics" | "/stats") {
        ShardMetrics::inc(&env.metrics.http_requests_total);
        ShardMetrics::inc(&env.metrics.http_rejected_total);
        api::write_error(&mut ctx.out, Status::NotFound, "not_found", "served on admin_listen only", keep_alive, &[]);
    } else {
        endpoints::respond(env, req, &mut ctx.out, keep_alive);
    }
    finish(env, ctx, key, conn, start);
}

/// Whether the connection came through `admin_listen` (its local address is that one): one `getsockname`,
/// made only when an admin listener is configured.
fn on_admin_listener(env: &Env, conn: &Conn) -> bool {
    let Some(admin) = env.cfg().admin_listen else { return false };
    let local = socket2::SockRef::from(&conn.fd()).local_addr().ok().and_then(|a| a.as_socket());
    local.is_some_and(|l| l.port() == admin.port() && (admin.ip().is_unspecified() || l.ip() == admin.ip()))
}

/// A plain response is in `ctx.out` from `start` on: keep the connection for the next request (within
/// `handshake_timeout`), or close it after the response when the response says `Connection: close`.
pub fn finish(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, start: usize) {
    if response_closes(&ctx.out[start..]) {
        close::close(env, ctx, key, conn, Close::AfterResponse);
    } else {
        conn.flags |= flag::HTTP_SERVED;
        timers::http_deadline(env, ctx, key, conn);
    }
}

/// A request that waited (for other shards, or a held poll) is answered: its response is in `ctx.out` from
/// `start` on. Keeps or closes the connection as [`finish`] does, writes, and queues the connection to be
/// read on: the pipelined requests behind this one, or (closing) the peer's EOF, which arrived unread while
/// the request waited and will not be signalled again.
pub fn answered_later(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, start: usize) {
    finish(env, ctx, key, conn, start);
    write::send_out(env, ctx, key, conn);
    ctx.resume.push(key);
}

/// Whether a response written by `handshake::write_response` or `write_rejection` closes its connection.
fn response_closes(resp: &[u8]) -> bool {
    let head = resp.windows(4).position(|w| w == b"\r\n\r\n").map_or(resp, |end| &resp[..end + 2]);
    head.windows(19).any(|w| w == b"\r\nConnection: close")
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
