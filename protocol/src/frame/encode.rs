//! Frame encoders: server frames (unmasked) and client frames (masked), written into a caller's buffer.
//!
//! For shared payloads the engine writes only a header ([`Header`]) and sends the payload from where it
//! already is; [`frame_with`] lets a message body be written once, straight after room for its header.

use super::coding::{OpCode, MAX_HEADER_LEN};
use super::mask::apply_mask;

/// An encoded frame header, up to 14 bytes, kept on the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl Header {
    /// Encodes a header for a frame of `payload_len` bytes; with a mask key when `mask` is given (clients).
    #[inline]
    pub fn new(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload_len: usize) -> Self {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[0] = (u8::from(fin) << 7) | opcode as u8;
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut len = match payload_len {
            0..=125 => {
                bytes[1] = mask_bit | payload_len as u8;
                2
            }
            126..=0xFFFF => {
                bytes[1] = mask_bit | 126;
                bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
                4
            }
            _ => {
                bytes[1] = mask_bit | 127;
                bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
                10
            }
        };
        if let Some(m) = mask {
            bytes[len..len + 4].copy_from_slice(&m);
            len += 4;
        }
        Self { bytes, len: len as u8 }
    }

    /// The header's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Length of a server (unmasked) frame header for a payload of `payload_len` bytes.
#[inline]
pub const fn server_header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Appends an unmasked (server-to-client) frame to `out`.
#[inline]
pub fn encode_server_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8]) {
    out.extend_from_slice(Header::new(fin, opcode, None, payload.len()).as_bytes());
    out.extend_from_slice(payload);
}

/// Appends a masked (client-to-server) frame to `out`, masking a copy of `payload` with `mask`.
#[inline]
pub fn encode_client_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, mask: [u8; 4], payload: &[u8]) {
    out.extend_from_slice(Header::new(fin, opcode, Some(mask), payload.len()).as_bytes());
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Appends a close frame with `code` and `reason` (cut to fit 125 bytes at a character boundary);
/// masked with `mask` when given (clients).
pub fn encode_close(out: &mut Vec<u8>, mask: Option<[u8; 4]>, code: u16, reason: &str) {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    let payload = &payload[..2 + cut];
    match mask {
        Some(m) => encode_client_frame(out, true, OpCode::Close, m, payload),
        None => encode_server_frame(out, true, OpCode::Close, payload),
    }
}

/// Appends an unmasked single-frame message whose payload `body` writes straight into `out`, then puts
/// the header in front of it. Returns the index in `out` where the frame starts.
///
/// Room for the longest header (10 bytes) is reserved first; once the body's length is known the header
/// is written right-aligned against it, so the body is never moved. The bytes before the returned index
/// are unused padding (the caller slices them off, e.g. with `Bytes::slice`).
pub fn frame_with(out: &mut Vec<u8>, opcode: OpCode, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    let base = out.len();
    out.resize(base + 10, 0);
    body(out);
    let body_len = out.len() - base - 10;
    let h = Header::new(true, opcode, None, body_len);
    let start = base + 10 - h.as_bytes().len();
    out[start..base + 10].copy_from_slice(h.as_bytes());
    start
}

#[cfg(test)]
mod tests {
    use super::super::coding::parse_header;
    use super::*;

    #[test]
    fn rfc6455_5_7_examples_encode() {
        let mut out = Vec::new();
        encode_server_frame(&mut out, true, OpCode::Text, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_client_frame(&mut out, true, OpCode::Text, [0x37, 0xfa, 0x21, 0x3d], b"Hello");
        assert_eq!(out, [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        out.clear();
        encode_server_frame(&mut out, false, OpCode::Text, b"Hel");
        encode_server_frame(&mut out, true, OpCode::Continuation, b"lo");
        assert_eq!(out, [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]);
        out.clear();
        encode_server_frame(&mut out, true, OpCode::Binary, &[0u8; 256]);
        assert_eq!(out[..4], [0x82, 0x7E, 0x01, 0x00]);
        out.clear();
        encode_server_frame(&mut out, true, OpCode::Binary, &[0u8; 65536]);
        assert_eq!(out[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn header_lengths_round_trip() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            for mask in [None, Some([9, 8, 7, 6])] {
                let h = Header::new(true, OpCode::Binary, mask, len);
                let p = parse_header(h.as_bytes()).unwrap().unwrap();
                assert_eq!(p.payload_len, len as u64);
                assert_eq!(p.mask, mask);
                assert_eq!(usize::from(p.header_len), h.as_bytes().len());
                if mask.is_none() {
                    assert_eq!(server_header_len(len), h.as_bytes().len());
                }
            }
        }
    }

    #[test]
    fn close_reason_is_cut_at_char_boundary() {
        let mut out = Vec::new();
        let reason = "é".repeat(100);
        encode_close(&mut out, None, 1000, &reason);
        let h = parse_header(&out).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn frame_with_puts_header_before_body() {
        for n in [0usize, 5, 125, 126, 70000] {
            let mut out = b"xx".to_vec();
            let start = frame_with(&mut out, OpCode::Text, |o| o.extend(std::iter::repeat_n(b'a', n)));
            let mut expect = Vec::new();
            encode_server_frame(&mut expect, true, OpCode::Text, &vec![b'a'; n]);
            assert_eq!(&out[start..], &expect[..]);
        }
    }
}
