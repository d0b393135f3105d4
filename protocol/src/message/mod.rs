//! The JSON messages of wire protocol v1: one JSON object per text frame.
//!
//! - Client commands (`subscribe`, `unsubscribe`, `publish`, `presence`, `history`, `ping`, `refresh`) are
//!   decoded by a reusable [`Decoder`] with simd-json into a borrowed [`Command`] (strings unescaped in
//!   place in the decoder's buffer, never copied out); a publish's `data` comes back as its raw JSON text,
//!   a slice of the frame payload byte-identical to what the client sent, ready to be spliced into the
//!   `message` every subscriber gets. Decoding allocates nothing once
//!   the decoder is warmed up. A refused command gives a [`DecodeFailure`] that carries the command's `id`
//!   and a machine code for the `error` reply.
//! - Server messages are written by the `encode_*` functions straight into a caller's `Vec<u8>`
//!   ([`encode_message`] with [`message_len`] for the hot path of fan-out: the frame header can be written
//!   before the body).
//! - Channel names are checked by [`parse_channel`].
//!
//! ```
//! use throng_protocol::message::{encode_message, Command, Decoder};
//!
//! let mut decoder = Decoder::new();
//! let payload = br#"{"type":"publish","id":3,"channel":"room:42","data":{"text":"hi \"you\""}}"#;
//! let Ok(Command::Publish { id, channel, data }) = decoder.decode(payload) else { panic!() };
//! assert_eq!((id, channel), (Some(3), "room:42"));
//! assert_eq!(data, br#"{"text":"hi \"you\""}"#);
//!
//! let mut out = Vec::new();
//! encode_message(&mut out, channel, 21, data);
//! assert_eq!(out, br#"{"type":"message","channel":"room:42","offset":21,"data":{"text":"hi \"you\""}}"#);
//! ```

mod channel;
mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use channel::{parse_channel, personal_channel_owner, Channel, ChannelError};
pub use decode::{Command, DecodeError, DecodeFailure, Decoder, Limits, Since};
pub use encode::{
    encode_command, encode_error, encode_gap, encode_history, encode_message, encode_pong, encode_presence,
    encode_published, encode_refreshed, encode_subscribed, encode_unsubscribed, encode_welcome, message_len,
};

/// The wire protocol version, sent as `version` in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
