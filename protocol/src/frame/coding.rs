//! Frame header coding: opcodes and the RFC 6455 section 5.2 base framing, parsed from the front of a
//! receive buffer without copying.

use super::ProtocolError;

/// A frame opcode (RFC 6455 section 5.2). Reserved opcodes are rejected by [`parse_header`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// `0x0`: a continuation of a fragmented message.
    Continuation = 0x0,
    /// `0x1`: the first frame of a text message.
    Text = 0x1,
    /// `0x2`: the first frame of a binary message.
    Binary = 0x2,
    /// `0x8`: connection close.
    Close = 0x8,
    /// `0x9`: ping.
    Ping = 0x9,
    /// `0xA`: pong.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for the reserved ones (0x3-0x7, 0xB-0xF).
    #[inline]
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) have the high bit of the opcode set.
    #[inline]
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Largest payload a control frame may carry (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest possible frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// A parsed frame header. The payload is `buf[header_len .. header_len + payload_len]` of the buffer the
/// header was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN bit: this is the last frame of its message.
    pub fin: bool,
    /// The three RSV bits, as the low bits (RSV1 = 0b100). Non-zero only with a negotiated extension.
    pub rsv: u8,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// The masking key, present on client-to-server frames.
    pub mask: Option<[u8; 4]>,
    /// Header length in bytes (2 to 14).
    pub header_len: u8,
    /// Payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Total frame length (header and payload), saturating at `u64::MAX`.
    #[inline]
    pub fn frame_len(&self) -> u64 {
        self.payload_len.saturating_add(u64::from(self.header_len))
    }
}

/// Parses the frame header at the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a header. Checks what the header alone can show: RSV
/// bits (no extensions are negotiated), reserved opcodes, control frames that are fragmented or longer than
/// 125 bytes, and a 64-bit length with its most significant bit set. Whether a mask must be present depends
/// on the side and is checked by [`crate::conn::WsConn`].
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, ProtocolError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::ReservedOpcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(ProtocolError::FragmentedControl);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(ProtocolError::ControlTooLong);
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let len = u64::from_be_bytes(a);
            if len >> 63 != 0 {
                return Err(ProtocolError::BadLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let Some(m) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    Ok(Some(FrameHeader { fin, rsv, opcode, mask, header_len: pos as u8, payload_len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_5_7_single_frame_unmasked_text() {
        // "Hello", unmasked.
        let b = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = parse_header(&b).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader { fin: true, rsv: 0, opcode: OpCode::Text, mask: None, header_len: 2, payload_len: 5 }
        );
    }

    #[test]
    fn rfc6455_5_7_single_frame_masked_text() {
        let b = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let h = parse_header(&b).unwrap().unwrap();
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!((h.header_len, h.payload_len), (6, 5));
    }

    #[test]
    fn rfc6455_5_7_fragmented_unmasked_text() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        let second = [0x80, 0x02, 0x6c, 0x6f];
        let a = parse_header(&first).unwrap().unwrap();
        let b = parse_header(&second).unwrap().unwrap();
        assert!(!a.fin && a.opcode == OpCode::Text && a.payload_len == 3);
        assert!(b.fin && b.opcode == OpCode::Continuation && b.payload_len == 2);
    }

    #[test]
    fn rfc6455_5_7_ping_and_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let pong = [0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(parse_header(&ping).unwrap().unwrap().opcode, OpCode::Ping);
        let p = parse_header(&pong).unwrap().unwrap();
        assert_eq!((p.opcode, p.payload_len), (OpCode::Pong, 5));
    }

    #[test]
    fn rfc6455_5_7_binary_256_and_64k() {
        let b256 = [0x82, 0x7E, 0x01, 0x00];
        let h = parse_header(&b256).unwrap().unwrap();
        assert_eq!((h.opcode, h.header_len, h.payload_len), (OpCode::Binary, 4, 256));
        let b64k = [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        let h = parse_header(&b64k).unwrap().unwrap();
        assert_eq!((h.header_len, h.payload_len), (10, 65536));
    }

    #[test]
    fn length_boundaries() {
        // 125 fits in 7 bits, 126 takes the 16-bit form, 65535 is the largest 16-bit, 65536 the 64-bit form.
        for (bytes, len, hl) in [
            (vec![0x82, 125], 125u64, 2u8),
            (vec![0x82, 126, 0, 126], 126, 4),
            (vec![0x82, 126, 0xFF, 0xFF], 65535, 4),
            (vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0], 65536, 10),
        ] {
            let h = parse_header(&bytes).unwrap().unwrap();
            assert_eq!((h.payload_len, h.header_len), (len, hl));
        }
    }

    #[test]
    fn incomplete_headers_need_more() {
        let full = [0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for n in 0..full.len() {
            assert_eq!(parse_header(&full[..n]).unwrap(), None, "prefix {n}");
        }
        assert_eq!(parse_header(&full).unwrap().unwrap().header_len, 14);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(parse_header(&[0xC1, 0x00]), Err(ProtocolError::ReservedBits)); // RSV1
        assert_eq!(parse_header(&[0xA1, 0x00]), Err(ProtocolError::ReservedBits)); // RSV2
        assert_eq!(parse_header(&[0x91, 0x00]), Err(ProtocolError::ReservedBits)); // RSV3
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(parse_header(&[0x80 | op, 0x00]), Err(ProtocolError::ReservedOpcode(op)));
        }
        assert_eq!(parse_header(&[0x09, 0x00]), Err(ProtocolError::FragmentedControl));
        assert_eq!(parse_header(&[0x89, 126]), Err(ProtocolError::ControlTooLong));
        assert_eq!(parse_header(&[0x88, 127]), Err(ProtocolError::ControlTooLong));
        assert_eq!(parse_header(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]), Err(ProtocolError::BadLength));
    }
}
