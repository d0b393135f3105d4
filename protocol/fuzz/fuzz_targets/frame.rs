//! Fuzz the frame layer: arbitrary bytes through `WsConn::server()` and `WsConn::client(1)`, fed the way an
//! engine feeds them (unconsumed bytes kept, the next read appended, `handle_read` called again from the
//! frame start), in chunks whose sizes come from the input; plus `parse_header` on the raw input and
//! `apply_mask` against `apply_mask_scalar`. Nothing may panic, and:
//!
//! - every consumed count is in `1..=remaining`, every payload range (`InPlace`, ping, pong) lies inside
//!   the consumed frame, `NeedMore` only comes when the frame at the front really is incomplete;
//! - text messages are valid UTF-8, messages respect the limits, an error leaves the state `Closed`;
//! - chunked feeding gives exactly what feeding the input whole gives (events, error, `out`, state);
//! - whatever a side writes to `out` (pongs, close echo, the failing close) decodes cleanly at the peer
//!   into the matching pongs and close code.
//!
//! Input layout: byte 0 is a flag byte — bits 0-2: how many chunk-size bytes follow (0: feed whole);
//! bit 3: small limits (max_frame 64, max_message 256); bit 4: start the close handshake (`close(1000)`)
//! before feeding; bits 4-7 also give the mask offset for the `apply_mask` check. Then the chunk-size
//! bytes (chunk = byte + 1, cycled), then the stream. The seeds in `seeds/frame/` follow this layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use throng_protocol::conn::{Event, Limits, MessageData, MessageKind, State, Step, WsConn};
use throng_protocol::frame::{apply_mask, apply_mask_scalar, parse_header, Header, ProtocolError};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Msg(MessageKind, Vec<u8>, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Closed(Option<u16>),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Ev>,
    error: Option<ProtocolError>,
    out: Vec<u8>,
    pending: usize,
    state: State,
}

/// Feeds `stream` to `conn` in chunks of `chunks` sizes (cycled; empty = whole), checking the contract.
fn drive(mut conn: WsConn, stream: &[u8], chunks: &[usize], limits: &Limits, close_first: bool) -> Outcome {
    let mut out = Vec::new();
    if close_first {
        assert!(conn.close(1000, "", &mut out));
        assert_eq!(conn.state(), State::CloseSent);
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    let mut error = None;
    let mut rest = stream;
    let mut i = 0;
    'feed: while !rest.is_empty() {
        let n = if chunks.is_empty() { rest.len() } else { chunks[i % chunks.len()].min(rest.len()) };
        i += 1;
        pending.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let mut off = 0;
        while off < pending.len() {
            let buf = &mut pending[off..];
            let len = buf.len();
            let before = conn.state();
            match conn.handle_read(buf, limits, &mut out) {
                Ok(Step::NeedMore) => {
                    // Only when the frame at the front is really incomplete.
                    if let Ok(Some(h)) = parse_header(&pending[off..]) {
                        assert!((len as u64) < h.frame_len(), "NeedMore with a complete frame");
                    }
                    break;
                }
                Ok(Step::Consumed(n)) => {
                    assert!(n >= 1 && n <= len, "consumed {n} of {len}");
                    off += n;
                }
                Ok(Step::Event(n, ev)) => {
                    assert!(n >= 1 && n <= len, "consumed {n} of {len}");
                    assert_ne!(before, State::Closed, "event after close");
                    let frame = &pending[off..off + n];
                    let slice = |r: std::ops::Range<usize>| {
                        assert!(r.start <= r.end && r.end <= n, "range {r:?} outside the {n}-byte frame");
                        frame[r].to_vec()
                    };
                    let ev = match ev {
                        Event::Message { kind, data: MessageData::InPlace(r) } => {
                            let p = slice(r);
                            assert!(p.len() <= limits.max_frame);
                            Ev::Msg(kind, p, true)
                        }
                        Event::Message { kind, data: MessageData::Assembled(v) } => {
                            assert!(v.len() <= limits.max_message);
                            Ev::Msg(kind, v, false)
                        }
                        Event::Ping(r) => Ev::Ping(slice(r)),
                        Event::Pong(r) => Ev::Pong(slice(r)),
                        Event::Closed { code } => {
                            assert_eq!(conn.state(), State::Closed);
                            Ev::Closed(code)
                        }
                    };
                    match &ev {
                        Ev::Msg(kind, p, _) => {
                            assert_eq!(before, State::Open, "message delivered while closing");
                            if *kind == MessageKind::Text {
                                assert!(std::str::from_utf8(p).is_ok(), "text message with invalid UTF-8");
                            }
                        }
                        Ev::Ping(p) | Ev::Pong(p) => assert!(p.len() <= 125),
                        Ev::Closed(_) => {}
                    }
                    events.push(ev);
                    off += n;
                }
                Err(e) => {
                    assert_eq!(conn.state(), State::Closed);
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                    error = Some(e);
                    pending.clear();
                    break 'feed;
                }
            }
        }
        pending.drain(..off);
    }
    Outcome { events, error, out, pending: pending.len(), state: conn.state() }
}

/// Decodes what one side wrote with a peer of the other role: it must be exactly the pongs for the pings
/// answered, then the close (echo or failure), and nothing invalid.
fn check_replies(server: bool, o: &Outcome, close_first: bool) {
    let mut expect = Vec::new();
    if close_first {
        expect.push(Ev::Closed(Some(1000)));
    } else {
        for ev in &o.events {
            match ev {
                Ev::Ping(p) => expect.push(Ev::Pong(p.clone())),
                Ev::Closed(code) => expect.push(Ev::Closed(*code)),
                _ => {}
            }
        }
        if let Some(e) = o.error {
            expect.push(Ev::Closed(Some(e.close_code())));
        }
    }
    let peer = if server { WsConn::client(7) } else { WsConn::server() };
    let limits = Limits { max_frame: 1 << 20, max_message: 1 << 20 };
    let got = drive(peer, &o.out, &[], &limits, false);
    assert_eq!(got.error, None, "peer failed on what we wrote");
    assert_eq!(got.pending, 0, "we wrote a partial frame");
    assert_eq!(got.events, expect);
}

fn check_header(data: &[u8]) {
    match parse_header(data) {
        Ok(Some(h)) => {
            let hl = usize::from(h.header_len);
            assert!((2..=14).contains(&hl) && hl <= data.len());
            for k in 0..hl {
                assert_eq!(parse_header(&data[..k]), Ok(None), "a prefix of a valid header");
            }
            assert_eq!(parse_header(&data[..hl]), Ok(Some(h)));
            assert!(h.payload_len >> 63 == 0);
            if h.opcode.is_control() {
                assert!(h.fin && h.payload_len <= 125);
            }
            // Re-encoding gives the same header in its minimal form.
            let again = Header::new(h.fin, h.opcode, h.mask, h.payload_len as usize);
            let p = parse_header(again.as_bytes()).unwrap().unwrap();
            assert_eq!((p.fin, p.opcode, p.mask, p.payload_len), (h.fin, h.opcode, h.mask, h.payload_len));
            assert!(p.header_len <= h.header_len);
        }
        Ok(None) => assert!(data.len() < 14, "a 14-byte prefix always decides"),
        Err(_) => {}
    }
}

fn check_mask(data: &[u8], offset: usize) {
    let key = match data {
        [a, b, c, d, ..] => [*a, *b, *c, *d],
        _ => [0x37, 0xfa, 0x21, 0x3d],
    };
    let mut fast = data.to_vec();
    let mut scalar = data.to_vec();
    apply_mask(&mut fast, key, offset);
    apply_mask_scalar(&mut scalar, key, offset);
    assert_eq!(fast, scalar);
    // In two pieces, the second one at its offset within the payload.
    let cut = data.len() / 3;
    let mut pieces = data.to_vec();
    let (a, b) = pieces.split_at_mut(cut);
    apply_mask(a, key, offset);
    apply_mask(b, key, offset + cut);
    assert_eq!(pieces, scalar);
    apply_mask(&mut pieces, key, offset);
    assert_eq!(pieces, data);
}

fuzz_target!(|data: &[u8]| {
    check_header(data);
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(flags & 7).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let chunks: Vec<usize> = sizes.iter().map(|&b| usize::from(b) + 1).collect();
    let limits = if flags & 8 != 0 {
        Limits { max_frame: 64, max_message: 256 }
    } else {
        Limits { max_frame: 1 << 20, max_message: 1 << 20 }
    };
    let close_first = flags & 0x10 != 0;
    check_header(stream);
    check_mask(stream, usize::from(flags >> 4));
    for server in [true, false] {
        let conn = || if server { WsConn::server() } else { WsConn::client(1) };
        let chunked = drive(conn(), stream, &chunks, &limits, close_first);
        let whole = drive(conn(), stream, &[], &limits, close_first);
        assert_eq!(chunked, whole, "chunked feeding differs from whole");
        check_replies(server, &whole, close_first);
    }
});
