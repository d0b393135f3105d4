//! Throng's wire protocol, sans-IO.
//!
//! Everything here works on byte slices handed in by the caller: no sockets, no clocks, no threads, no
//! runtime. The engine (`throng`), the load generator (`throng-bench`) and the tests all drive the same code.
//!
//! # Layout
//! - [`proxy`]: the PROXY protocol header (HAProxy v1 text line and v2 binary) a load balancer writes before
//!   the request, parsed incrementally into the client's address.
//! - [`handshake`]: HTTP/1.1 upgrade requests parsed incrementally from a buffer, `Sec-WebSocket-Accept`,
//!   the `101 Switching Protocols` response and JSON-bodied rejections.
//! - [`frame`]: RFC 6455 frames, one file per concern: header coding, masking, streaming UTF-8
//!   validation, close codes, encoders for server (unmasked) and client (masked) frames.
//! - [`conn`]: the per-connection state machine: bytes in, events and control frames out, limits, the close
//!   handshake; with a written size budget.
//! - [`message`]: the JSON messages of wire protocol v1: client commands decoded in place with simd-json,
//!   server messages encoded with the published `data` spliced raw.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod proxy;
