//! In-place (un)masking of payloads (RFC 6455 section 5.3).
//!
//! [`apply_mask`] is the fast path: the mask is widened to a 64-bit word and XORed 32 bytes at a time, a loop
//! the compiler turns into vector instructions; [`apply_mask_scalar`] is the byte-by-byte reference it is
//! tested against. Both take `offset`, the position of `buf[0]` within the payload, so a payload can be
//! unmasked in pieces as it arrives.

/// Unmasks (or masks: XOR is its own inverse) `buf` one byte at a time. The reference implementation.
#[inline]
pub fn apply_mask_scalar(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

/// Unmasks (or masks) `buf` in place, word-wide. `offset` is the index of `buf[0]` within the payload.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if buf.len() < 16 {
        return apply_mask_scalar(buf, mask, offset);
    }
    // Rotate the key so that byte 0 of `buf` lines up with key byte 0.
    let m = u32::from_le_bytes(mask).rotate_right(8 * (offset as u32 & 3));
    let m = m.to_le_bytes();
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(32);
    for chunk in &mut chunks {
        for lane in chunk.chunks_exact_mut(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(lane);
            lane.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
        }
    }
    // 32 is a multiple of 4, so the remainder still starts at key byte 0 of the rotated key.
    apply_mask_scalar(chunks.into_remainder(), m, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc6455_5_7_masked_hello() {
        let mut p = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut p, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&p, b"Hello");
    }

    #[test]
    fn pieces_equal_whole() {
        let mask = [1, 2, 3, 0xF0];
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        let mut pieces = data.clone();
        let mut off = 0;
        for len in [1usize, 3, 17, 64, 5, 200, 33] {
            apply_mask(&mut pieces[off..off + len], mask, off);
            off += len;
        }
        apply_mask(&mut pieces[off..], mask, off);
        assert_eq!(whole, pieces);
    }

    proptest! {
        #[test]
        fn fast_matches_scalar(data in proptest::collection::vec(any::<u8>(), 0..300),
                               mask in any::<[u8; 4]>(), offset in 0usize..16) {
            let mut a = data.clone();
            let mut b = data;
            apply_mask(&mut a, mask, offset);
            apply_mask_scalar(&mut b, mask, offset);
            prop_assert_eq!(a, b);
        }
    }
}
