//! RFC 6455 frames, one file per concern.
//!
//! - [`coding`]: opcodes and header parsing (`Ok(None)` until the header is complete);
//! - [`mask`]: in-place unmasking, a word-wide fast path and the scalar reference;
//! - [`utf8`]: streaming UTF-8 validation across partial frames and fragments;
//! - [`close`]: close codes and close-payload validation;
//! - [`encode`]: server (unmasked) and client (masked) frame encoders.
//!
//! [`ProtocolError`] is the hand-written error of this hot path: each variant knows the close code and the
//! reason the connection is failed with.

pub mod close;
pub mod coding;
pub mod encode;
pub mod mask;
pub mod utf8;

pub use coding::{parse_header, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
pub use encode::{encode_client_frame, encode_close, encode_server_frame, frame_with, Header};
pub use mask::{apply_mask, apply_mask_scalar};
pub use utf8::{Utf8Error, Utf8Validator};

/// Why a connection is failed. Each variant maps to a close code ([`ProtocolError::close_code`]) and a
/// short reason sent in the close frame ([`ProtocolError::reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// An RSV bit is set but no extension was negotiated.
    ReservedBits,
    /// A reserved opcode (0x3-0x7, 0xB-0xF).
    ReservedOpcode(u8),
    /// A control frame without FIN.
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload.
    ControlTooLong,
    /// A 64-bit payload length with its most significant bit set.
    BadLength,
    /// A client frame without a mask (servers must fail these).
    UnmaskedFrame,
    /// A server frame with a mask (clients must fail these).
    MaskedFrame,
    /// A continuation frame with no fragmented message in progress.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still in progress.
    ExpectedContinuation,
    /// A text message (or close reason) that is not valid UTF-8.
    InvalidUtf8,
    /// A close frame with a 1-byte payload.
    BadClosePayload,
    /// A close frame with a code a peer may not send.
    InvalidCloseCode(u16),
    /// A frame or message over the configured size limit.
    MessageTooBig,
}

impl ProtocolError {
    /// The close code this error fails the connection with.
    pub const fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 => close::INVALID_PAYLOAD,
            Self::MessageTooBig => close::TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// A short human reason, sent in the close frame.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::ReservedBits => "reserved bits set",
            Self::ReservedOpcode(_) => "reserved opcode",
            Self::FragmentedControl => "fragmented control frame",
            Self::ControlTooLong => "control frame payload over 125 bytes",
            Self::BadLength => "invalid payload length",
            Self::UnmaskedFrame => "client frames must be masked",
            Self::MaskedFrame => "server frames must not be masked",
            Self::UnexpectedContinuation => "continuation frame without a message",
            Self::ExpectedContinuation => "new message inside a fragmented message",
            Self::InvalidUtf8 => "invalid UTF-8 in text",
            Self::BadClosePayload => "close payload of 1 byte",
            Self::InvalidCloseCode(_) => "invalid close code",
            Self::MessageTooBig => "message too big",
        }
    }

    /// A short machine label, for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::MessageTooBig => "too_big",
            Self::InvalidCloseCode(_) | Self::BadClosePayload => "bad_close",
            _ => "protocol",
        }
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            Self::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
            _ => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}
