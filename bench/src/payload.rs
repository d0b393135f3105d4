//! What the bench puts in its messages and how it finds it again, without a JSON parser.
//!
//! Every measured message carries a stamp `"bt":[T,ID,SEQ]`: `T` is the send time (`CLOCK_MONOTONIC` ns),
//! `ID` the publisher (broadcast) or connection (echo), `SEQ` that sender's sequence number. The payload is
//! a JSON object `{"bt":[T,ID,SEQ],"pad":"xxx…"}` padded to the requested size, so it is valid as the
//! `data` of a Throng v1 `publish` and as a plain text message for the peers. On receipt the stamp is found
//! with a precompiled substring search: in a raw echo or relay it is at offset 0; in a v1 `message` it
//! follows `"data":`.

use memchr::memmem::Finder;

/// The stamp's key, as it appears in the payload.
pub const MARK: &[u8] = b"\"bt\":[";

/// A decoded stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, `CLOCK_MONOTONIC` nanoseconds.
    pub t_ns: u64,
    /// Publisher or connection id.
    pub id: u64,
    /// Sequence number of that sender.
    pub seq: u64,
}

/// Appends the decimal digits of `v`.
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Appends a stamped payload of `size` bytes (or just over, when `size` is smaller than the stamp).
pub fn write_payload(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    let start = out.len();
    out.extend_from_slice(b"{\"bt\":[");
    push_u64(out, stamp.t_ns);
    out.push(b',');
    push_u64(out, stamp.id);
    out.push(b',');
    push_u64(out, stamp.seq);
    out.push(b']');
    // `,"pad":""}` is 10 bytes.
    let used = out.len() - start;
    if size >= used + 10 {
        out.extend_from_slice(b",\"pad\":\"");
        out.resize(out.len() + (size - used - 10), b'x');
        out.extend_from_slice(b"\"}");
    } else {
        out.push(b'}');
    }
}

/// Appends a v1 `publish` command carrying a stamped payload of `size` bytes as its `data`.
pub fn write_publish(out: &mut Vec<u8>, channel: &str, stamp: Stamp, size: usize) {
    out.extend_from_slice(b"{\"type\":\"publish\",\"channel\":\"");
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    write_payload(out, stamp, size);
    out.push(b'}');
}

/// Appends a v1 `publish` command with an `id` (echoed in its `published` reply) carrying a stamped payload.
pub fn write_publish_id(out: &mut Vec<u8>, channel: &str, id: u64, stamp: Stamp, size: usize) {
    out.extend_from_slice(b"{\"type\":\"publish\",\"id\":");
    push_u64(out, id);
    out.extend_from_slice(b",\"channel\":\"");
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    write_payload(out, stamp, size);
    out.push(b'}');
}

/// Appends a v1 `unsubscribe` command.
pub fn write_unsubscribe(out: &mut Vec<u8>, id: u64, channel: &str) {
    out.extend_from_slice(b"{\"type\":\"unsubscribe\",\"id\":");
    push_u64(out, id);
    out.extend_from_slice(b",\"channel\":\"");
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// The decimal number right after the first occurrence of `finder`'s needle (`"offset":`, `"id":`) in `msg`.
#[inline]
pub fn number_after(finder: &Finder<'_>, msg: &[u8]) -> Option<u64> {
    let at = finder.find(msg)? + finder.needle().len();
    let digits = msg[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    Some(msg[at..at + digits].iter().fold(0u64, |v, &b| v * 10 + u64::from(b - b'0')))
}

/// Appends a v1 `subscribe` command.
pub fn write_subscribe(out: &mut Vec<u8>, id: u64, channel: &str) {
    out.extend_from_slice(b"{\"type\":\"subscribe\",\"id\":");
    push_u64(out, id);
    out.extend_from_slice(b",\"channel\":\"");
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Parses a decimal number at the front of `s`; returns it and the rest after one separator byte.
#[inline]
fn take_u64(s: &[u8]) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u64::from(s[i] - b'0'))?;
        i += 1;
    }
    if i == 0 || i >= s.len() {
        return None;
    }
    Some((v, &s[i + 1..]))
}

/// What a received text message is, as far as the bench cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A stamped bench payload (echo, raw relay, or the `data` of a v1 `message`).
    Stamp(Stamp),
    /// A v1 `subscribed` acknowledgement.
    Subscribed,
    /// A v1 `error` reply.
    Error,
    /// Anything else (`welcome`, `published`, `pong`, ...).
    Other,
}

/// Precompiled searchers for [`Scanner::classify`] and [`Scanner::stamp`].
#[derive(Debug)]
pub struct Scanner {
    mark: Finder<'static>,
    subscribed: Finder<'static>,
    error: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// Builds the searchers.
    pub fn new() -> Self {
        Self {
            mark: Finder::new(MARK),
            subscribed: Finder::new(b"\"type\":\"subscribed\""),
            error: Finder::new(b"\"type\":\"error\""),
        }
    }

    /// Finds the stamp in `msg`, if there is one. `hint` is where the previous one was (1 for raw payloads,
    /// a fixed offset for v1 messages of one channel): checked first, updated when the search finds it
    /// elsewhere.
    #[inline]
    pub fn stamp(&self, msg: &[u8], hint: &mut usize) -> Option<Stamp> {
        let at = if msg.get(*hint..*hint + MARK.len()) == Some(MARK) {
            *hint
        } else {
            let at = self.mark.find(msg)?;
            *hint = at;
            at
        };
        let s = &msg[at + MARK.len()..];
        let (t_ns, s) = take_u64(s)?;
        let (id, s) = take_u64(s)?;
        let (seq, _) = take_u64(s)?;
        Some(Stamp { t_ns, id, seq })
    }

    /// Classifies a received message (`hint` as for [`Scanner::stamp`]).
    #[inline]
    pub fn classify(&self, msg: &[u8], hint: &mut usize) -> Incoming {
        if let Some(s) = self.stamp(msg, hint) {
            return Incoming::Stamp(s);
        }
        if self.subscribed.find(msg).is_some() {
            Incoming::Subscribed
        } else if self.error.find(msg).is_some() {
            Incoming::Error
        } else {
            Incoming::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_requested_size_and_round_trips() {
        let sc = Scanner::new();
        let stamp = Stamp { t_ns: 123_456_789_012, id: 7, seq: 42 };
        for size in [0usize, 10, 40, 100, 1000] {
            let mut out = Vec::new();
            write_payload(&mut out, stamp, size);
            if size >= 40 {
                assert_eq!(out.len(), size);
            }
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["bt"][2], 42);
            assert_eq!(sc.classify(&out, &mut 1), Incoming::Stamp(stamp));
        }
    }

    #[test]
    fn finds_stamp_in_v1_message() {
        let sc = Scanner::new();
        let stamp = Stamp { t_ns: 5, id: 0, seq: 0 };
        let mut publish = Vec::new();
        write_publish(&mut publish, "bench:0", stamp, 100);
        let v: serde_json::Value = serde_json::from_slice(&publish).unwrap();
        assert_eq!(v["type"], "publish");
        let mut msg = b"{\"type\":\"message\",\"channel\":\"bench:0\",\"offset\":3,\"data\":".to_vec();
        write_payload(&mut msg, stamp, 100);
        msg.push(b'}');
        assert_eq!(sc.classify(&msg, &mut 1), Incoming::Stamp(stamp));
        let mut sub = Vec::new();
        write_subscribe(&mut sub, 1, "bench:0");
        assert_eq!(sub, br#"{"type":"subscribe","id":1,"channel":"bench:0"}"#);
        assert_eq!(sc.classify(br#"{"type":"subscribed","id":1,"channel":"bench:0"}"#, &mut 1), Incoming::Subscribed);
        assert_eq!(sc.classify(br#"{"type":"error","id":1,"code":"forbidden"}"#, &mut 1), Incoming::Error);
        assert_eq!(sc.classify(br#"{"type":"welcome","client":"x"}"#, &mut 1), Incoming::Other);
        assert_eq!(sc.stamp(br#"{"bt":[1,2"#, &mut 1), None);
        let mut out = Vec::new();
        write_publish_id(&mut out, "room:3", 4, stamp, 80);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["id"].as_u64(), v["channel"].as_str()),
            (Some("publish"), Some(4), Some("room:3"))
        );
        out.clear();
        write_unsubscribe(&mut out, 4, "room:3");
        assert_eq!(out, br#"{"type":"unsubscribe","id":4,"channel":"room:3"}"#);
        let offset = Finder::new(b"\"offset\":");
        assert_eq!(
            number_after(&offset, br#"{"type":"message","channel":"room:3","offset":28,"data":{"offset":1}}"#),
            Some(28)
        );
        assert_eq!(number_after(&offset, br#"{"type":"unsubscribed","id":4,"channel":"room:3"}"#), None);
        assert_eq!(number_after(&offset, br#"{"offset":x}"#), None);
    }
}
