//! Streaming UTF-8 validation across arbitrary chunk boundaries (partial frames and fragments).
//!
//! Text is validated as it arrives, and an invalid sequence is reported as soon as its first impossible byte
//! is seen, not once the message is complete: that is what lets a server fail a connection mid-frame
//! (Autobahn section 6.4). A code point cut by a chunk boundary is carried over in at most 3 bytes.

/// The byte length of a UTF-8 sequence by its lead byte; 0 for bytes that cannot start one.
#[inline]
const fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

/// Invalid UTF-8 was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Error;

impl std::fmt::Display for Utf8Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid UTF-8 in a text message")
    }
}

impl std::error::Error for Utf8Error {}

/// Validates a text message fed in pieces. Four bytes of state: the bytes of an unfinished code point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    /// The leading bytes of a code point cut by the last chunk boundary (a valid prefix).
    partial: [u8; 3],
    /// How many bytes of `partial` are in use (0 to 3).
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Self { partial: [0; 3], partial_len: 0 }
    }

    /// True when no code point is left unfinished.
    #[inline]
    pub fn is_complete(&self) -> bool {
        self.partial_len == 0
    }

    /// Validates the next piece of the message. Fails as soon as the bytes seen so far cannot be the prefix
    /// of valid UTF-8.
    #[inline]
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Utf8Error> {
        if self.partial_len != 0 {
            let have = usize::from(self.partial_len);
            let need = sequence_len(self.partial[0]) - have;
            let take = need.min(data.len());
            let mut cp = [0u8; 4];
            cp[..have].copy_from_slice(&self.partial[..have]);
            cp[have..have + take].copy_from_slice(&data[..take]);
            let cp = &cp[..have + take];
            match simdutf8::compat::from_utf8(cp) {
                Ok(_) => {}
                Err(e) if e.error_len().is_some() => return Err(Utf8Error),
                Err(_) => {
                    // Still a valid prefix, still unfinished: everything in `data` went into it.
                    self.partial[..cp.len()].copy_from_slice(cp);
                    self.partial_len = cp.len() as u8;
                    return Ok(());
                }
            }
            self.partial_len = 0;
            data = &data[take..];
        }
        match simdutf8::compat::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(Utf8Error),
            Err(e) => {
                let rest = &data[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.partial_len = rest.len() as u8;
                Ok(())
            }
        }
    }

    /// Ends the message: fails if it stopped inside a code point. Resets the validator for the next message.
    #[inline]
    pub fn finish(&mut self) -> Result<(), Utf8Error> {
        let complete = self.is_complete();
        *self = Self::new();
        if complete {
            Ok(())
        } else {
            Err(Utf8Error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_in_pieces(data: &[u8], cuts: &[usize]) -> Result<(), Utf8Error> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &c in cuts {
            let c = c.clamp(start, data.len());
            v.feed(&data[start..c])?;
            start = c;
        }
        v.feed(&data[start..])?;
        v.finish()
    }

    #[test]
    fn valid_split_everywhere() {
        let s = "κόσμε ascii 𝄞 €uro \u{10FFFF} end".as_bytes();
        for i in 0..=s.len() {
            for j in i..=s.len() {
                assert_eq!(validate_in_pieces(s, &[i, j]), Ok(()), "cuts {i} {j}");
            }
        }
    }

    #[test]
    fn fails_fast_inside_a_frame() {
        // Autobahn 6.4.1: a valid prefix, then 0xF4 0x90 (above U+10FFFF) must fail right away,
        // before the rest of the message arrives.
        let mut v = Utf8Validator::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        assert_eq!(v.feed(&[0xF4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(Utf8Error));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xCE, 0xBA, 0xF4, 0x90]), Err(Utf8Error));
    }

    #[test]
    fn rejects_truncated_and_bad_bytes() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xE2, 0x82]).unwrap();
        assert_eq!(v.finish(), Err(Utf8Error));
        for bad in [&[0xC0u8, 0x80][..], &[0xED, 0xA0, 0x80], &[0xFF], &[0x80], &[0xF8, 0x88, 0x80, 0x80]] {
            assert_eq!(validate_in_pieces(bad, &[1]), Err(Utf8Error), "{bad:x?}");
        }
    }

    proptest! {
        #[test]
        fn agrees_with_std(data in proptest::collection::vec(any::<u8>(), 0..64),
                           cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let expect = std::str::from_utf8(&data).is_ok();
            prop_assert_eq!(validate_in_pieces(&data, &cuts).is_ok(), expect);
        }

        #[test]
        fn agrees_with_std_on_text(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..160, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(validate_in_pieces(s.as_bytes(), &cuts), Ok(()));
        }
    }
}
