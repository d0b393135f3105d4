//! HTTP on the WebSocket port: the upgrade decision for `/ws` and `/echo`, and the plain endpoints
//! ([`endpoints`]: `/health`, `/metrics`, `/stats`). Every plain response, and every refused upgrade, is
//! followed by closing the connection.

pub mod endpoints;

use throng_protocol::handshake::{self, Request, Status};

use crate::channel::text_frame;
use crate::conn::close::{self, Close};
use crate::conn::read::bucket_caps;
use crate::conn::{timers, Conn, ConnKey, Phase};
use crate::metrics::ShardMetrics;
use crate::shard::{Ctx, Env};

/// Handles a complete request head: upgrades it (writing the 101, and the welcome on `/ws`), or answers it
/// and closes.
pub fn on_request(env: &Env, ctx: &mut Ctx, key: ConnKey, conn: &mut Conn, req: &Request<'_>) {
    if !(req.is_websocket_upgrade() || req.path == "/echo" || req.path == "/ws") {
        endpoints::respond(env, req, &mut ctx.out);
        close::close(env, ctx, key, conn, Close::AfterResponse);
        return;
    }
    let refused = |status: Status, reason: &str| Some((status, reason.to_string()));
    let refusal = if let Err(e) = req.validate_upgrade() {
        refused(e.status(), e.reason())
    } else if req.path != "/ws" && (req.path != "/echo" || !env.cfg().echo) {
        refused(Status::NotFound, "no WebSocket endpoint at this path")
    } else if env.shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        refused(Status::ServiceUnavailable, "server is shutting down")
    } else {
        None
    };
    if let Some((status, reason)) = refusal {
        ShardMetrics::inc(&env.metrics.http_rejected_total);
        handshake::write_rejection(&mut ctx.out, status, &reason);
        close::close(env, ctx, key, conn, Close::AfterResponse);
        return;
    }
    if req.path == "/ws" {
        let user = match req.query_param("user") {
            None => Box::from("anonymous"),
            Some(u) if valid_user(&u) => Box::from(&*u),
            Some(_) => {
                ShardMetrics::inc(&env.metrics.http_rejected_total);
                let reason = "user must be 1-128 characters of [A-Za-z0-9_.@=/-]";
                handshake::write_rejection(&mut ctx.out, Status::BadRequest, reason);
                close::close(env, ctx, key, conn, Close::AfterResponse);
                return;
            }
        };
        let protocol = req.offers_subprotocol("throng.v1").then_some("throng.v1");
        handshake::write_switching_protocols(&mut ctx.out, req.ws_key.unwrap_or_default().as_bytes(), protocol);
        let client = format!("{:x}-{:x}-{:x}", env.id, conn.gen, key.idx);
        let ping = env.cfg().ping_interval.as_secs() as u32;
        text_frame(&mut ctx.out, |o| throng_protocol::message::encode_welcome(o, &client, &user, ping));
        conn.user = user;
        conn.phase = Phase::V1;
        // A new connection starts with full buckets: a second's worth of messages and bytes.
        (conn.msg_credit, conn.byte_credit) = bucket_caps(env);
    } else {
        handshake::write_switching_protocols(&mut ctx.out, req.ws_key.unwrap_or_default().as_bytes(), None);
        conn.phase = Phase::Echo;
    }
    timers::arm_heartbeat(env, ctx, conn);
}

/// Dev-mode user names (from `?user=`): the channel-name charset, so `user:<name>` is a valid channel.
fn valid_user(u: &str) -> bool {
    (1..=128).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@=/-".contains(&b))
}
