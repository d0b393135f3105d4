//! Fuzz the HTTP upgrade parser: arbitrary bytes through `parse_request`, then every accessor, the upgrade
//! validation and every response writer. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use throng_protocol::handshake::{
    accept_key, parse_request, write_json_str, write_rejection, write_response,
    write_switching_protocols, Status, DEFAULT_MAX_HEADER_BYTES,
};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a small header bound sometimes, to reach the 431 path on short inputs.
    let max = match data.first() {
        Some(&b) if b & 0x80 != 0 => usize::from(b & 0x7f) * 8,
        _ => DEFAULT_MAX_HEADER_BYTES,
    };
    let _ = accept_key(data);
    let mut out = Vec::new();
    match parse_request(data, max) {
        Ok(Some(req)) => {
            assert!(req.header_len <= data.len());
            let _ = (req.method, req.target, req.path, req.query, req.version);
            let _ = (
                req.host,
                req.origin,
                req.upgrade,
                req.connection_upgrade,
                req.ws_key,
                req.ws_version,
            );
            let _ = (
                req.ws_protocol,
                req.ws_extensions,
                req.authorization,
                req.forwarded_for,
                req.real_ip,
            );
            let _ = (
                req.content_length,
                req.connection_close,
                req.connection_keep_alive,
            );
            let _ = (
                req.header_count(),
                req.keep_alive(),
                req.is_websocket_upgrade(),
            );
            let _ = req.header("host");
            let _ = req.header("x-anything");
            for (name, value) in req.headers() {
                let _ = (name.len(), value.len());
            }
            for protocol in req.subprotocols() {
                let _ = req.offers_subprotocol(protocol);
            }
            let _ = req.subprotocol_bearer();
            let _ = req.query_param("token");
            let _ = req.query_param("");
            let _ = req.bearer_token();
            let _ = format!("{req:?}");
            match req.validate_upgrade() {
                Ok(()) => {
                    let key = req.ws_key.unwrap_or_default();
                    write_switching_protocols(&mut out, key.as_bytes(), req.subprotocols().next());
                    write_switching_protocols(&mut out, key.as_bytes(), None);
                }
                Err(e) => {
                    let _ = (e.status(), e.reason(), e.to_string());
                    e.write_rejection(&mut out);
                }
            }
            let token = req.query_param("token").unwrap_or_default();
            write_rejection(&mut out, Status::Unauthorized, &token);
            write_json_str(&mut out, req.target);
            write_response(
                &mut out,
                Status::Ok,
                req.header("content-type").unwrap_or(""),
                &[("X-Path", req.path), ("X-Query", req.query.unwrap_or(""))],
                data.get(req.header_len..).unwrap_or_default(),
                req.keep_alive(),
            );
        }
        Ok(None) => assert!(data.len() <= max),
        Err(e) => {
            let _ = (e.status(), e.reason(), e.to_string());
            e.write_rejection(&mut out);
        }
    }
});
