//! Interop property tests: Throng's frame codec against tungstenite 0.26, both directions, both roles.
//!
//! - (a) our client encoder (`WsConn::client(seed).encode_frame` or `encode_client_frame`) writes random
//!   messages, fragmented into random frames with pings in between; a tungstenite server-role `WebSocket`
//!   decodes them, answers the pings (decoded back by our client) and the close handshake completes;
//! - (b) a tungstenite client-role `WebSocket` writes (masks) random messages; our `WsConn::server()` decodes
//!   them from random chunk splits, the way an engine keeps the unfinished frame and appends the next read;
//!   the pongs and the close echo it writes are accepted by tungstenite;
//! - (c) any split of one byte stream (valid or not) into chunks gives the same events, error, replies and
//!   final state as feeding it whole, and as feeding it one byte at a time;
//! - (d) our server encoder (`encode_server_frame`) -> tungstenite client-role decode, pongs and close back;
//! - (e) tungstenite server-role writes -> our `WsConn::client` decode from random chunk splits.
//!
//! Payloads are generated from a seed (a 70 000-byte `Vec` strategy would make proptest crawl); sizes
//! favour the length-encoding boundaries 125/126/65535/65536.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use throng_protocol::conn::{Event, Limits, MessageData, MessageKind, State, Step, WsConn};
use throng_protocol::frame::{encode_client_frame, encode_server_frame, OpCode, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, Data as TData, OpCode as TOpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::{CloseFrame, Message, Role, WebSocketConfig};
use tungstenite::WebSocket;

// ---------------------------------------------------------------------------------------------------------
// In-memory stream and a chunk-feeding engine loop.
// ---------------------------------------------------------------------------------------------------------

/// One side of an in-memory connection: reads drain `input` (`WouldBlock` when it is empty, like a
/// non-blocking socket), writes append to `output`.
#[derive(Debug, Default)]
struct Pipe {
    input: VecDeque<u8>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tungstenite(role: Role) -> WebSocket<Pipe> {
    // Defaults allow 64 MiB messages and 16 MiB frames: far above what these tests send.
    WebSocket::from_raw_socket(Pipe::default(), role, Some(WebSocketConfig::default()))
}

/// Reads every message tungstenite can decode from what is in its pipe, until it would block (or, for a
/// server that has completed the close handshake, until it reports the connection closed).
fn drain_tungstenite(ws: &mut WebSocket<Pipe>) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        match ws.read() {
            Ok(m) => got.push(m),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return got,
            Err(tungstenite::Error::ConnectionClosed) => return got,
            Err(e) => panic!("tungstenite failed after {} messages: {e:?}", got.len()),
        }
    }
}

/// An event with its payload copied out, so runs over different buffers can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    /// Kind, payload, and whether it came in place (single frame) or assembled (fragmented).
    Msg(MessageKind, Vec<u8>, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Closed(Option<u16>),
}

/// Drives a `WsConn` like an engine: keeps the unconsumed bytes, appends each new read, and calls
/// `handle_read` again from the front of the unfinished frame. Checks the contract on every step.
#[derive(Debug)]
struct Feeder {
    conn: WsConn,
    limits: Limits,
    pending: Vec<u8>,
    out: Vec<u8>,
    events: Vec<Ev>,
    error: Option<ProtocolError>,
}

impl Feeder {
    fn new(conn: WsConn, limits: Limits) -> Self {
        Self { conn, limits, pending: Vec::new(), out: Vec::new(), events: Vec::new(), error: None }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.error.is_some() || chunk.is_empty() {
            return;
        }
        self.pending.extend_from_slice(chunk);
        let mut off = 0;
        while off < self.pending.len() {
            let buf = &mut self.pending[off..];
            let len = buf.len();
            match self.conn.handle_read(buf, &self.limits, &mut self.out) {
                Ok(Step::NeedMore) => break,
                Ok(Step::Consumed(n)) => {
                    assert!(n > 0 && n <= len, "consumed {n} of {len}");
                    off += n;
                }
                Ok(Step::Event(n, ev)) => {
                    assert!(n > 0 && n <= len, "consumed {n} of {len}");
                    let frame = &self.pending[off..off + n];
                    let slice = |r: std::ops::Range<usize>| {
                        assert!(r.start <= r.end && r.end <= n, "range {r:?} outside frame of {n}");
                        frame[r].to_vec()
                    };
                    let ev = match ev {
                        Event::Message { kind, data: MessageData::InPlace(r) } => Ev::Msg(kind, slice(r), true),
                        Event::Message { kind, data: MessageData::Assembled(v) } => Ev::Msg(kind, v, false),
                        Event::Ping(r) => Ev::Ping(slice(r)),
                        Event::Pong(r) => Ev::Pong(slice(r)),
                        Event::Closed { code } => Ev::Closed(code),
                    };
                    if let Ev::Msg(MessageKind::Text, p, _) = &ev {
                        assert!(std::str::from_utf8(p).is_ok(), "text message with invalid UTF-8");
                    }
                    self.events.push(ev);
                    off += n;
                }
                Err(e) => {
                    assert_eq!(self.conn.state(), State::Closed);
                    self.error = Some(e);
                    break;
                }
            }
        }
        self.pending.drain(..off);
    }

    /// Feeds `input` cut at `cuts` (positions, in any order, clamped to the input).
    fn push_split(&mut self, input: &[u8], cuts: &[usize]) {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.sort_unstable();
        let mut start = 0;
        for c in cuts {
            self.push(&input[start..c]);
            start = c;
        }
        self.push(&input[start..]);
    }

    /// Everything observable: events, error, bytes written, bytes left pending, final state.
    fn outcome(&self) -> (Vec<Ev>, Option<ProtocolError>, Vec<u8>, usize, State) {
        let pending = if self.error.is_some() { 0 } else { self.pending.len() };
        (self.events.clone(), self.error, self.out.clone(), pending, self.conn.state())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generated messages.
// ---------------------------------------------------------------------------------------------------------

/// xorshift64*, to expand a seed into a payload.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Exactly `len` bytes: random bytes, or valid UTF-8 mixing 1- to 4-byte characters.
fn payload(text: bool, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    if !text {
        while v.len() < len {
            v.extend_from_slice(&rng.next().to_le_bytes()[..(len - v.len()).min(8)]);
        }
        return v;
    }
    const CHARS: [char; 8] = ['a', 'Z', ' ', '{', 'é', 'κ', '€', '𝄞'];
    let mut b = [0u8; 4];
    while v.len() < len {
        let c = CHARS[rng.below(CHARS.len())];
        let c = if c.len_utf8() <= len - v.len() { c } else { 'x' };
        v.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
    }
    v
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..200,
        2 => prop::sample::select(vec![0usize, 1, 124, 125, 126, 127, 65535, 65536]),
        1 => 0usize..70_000,
    ]
}

/// A message and how it goes on the wire: payload cut into frames at `cuts`, a ping after some frames.
#[derive(Clone, Debug)]
struct Msg {
    text: bool,
    payload: Vec<u8>,
    /// Sorted cut positions; empty for a single-frame message. Cuts may repeat (empty fragments) and may
    /// split a UTF-8 character between fragments, which is legal.
    cuts: Vec<usize>,
    /// `pings[i]`: a ping sent right after frame `i` (never after the last frame).
    pings: Vec<Option<Vec<u8>>>,
}

impl Msg {
    fn kind(&self) -> MessageKind {
        if self.text {
            MessageKind::Text
        } else {
            MessageKind::Binary
        }
    }

    fn fragments(&self) -> Vec<&[u8]> {
        let mut parts = Vec::new();
        let mut start = 0;
        for &c in &self.cuts {
            parts.push(&self.payload[start..c]);
            start = c;
        }
        parts.push(&self.payload[start..]);
        parts
    }

    /// Calls `frame(fin, opcode, payload)` for each frame in wire order, pings included.
    fn for_each_frame(&self, mut frame: impl FnMut(bool, OpCode, &[u8])) {
        let parts = self.fragments();
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            let op = match (i, self.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            frame(i == last, op, part);
            if i < last {
                if let Some(Some(p)) = self.pings.get(i) {
                    frame(true, OpCode::Ping, p);
                }
            }
        }
    }

    fn pings(&self) -> Vec<Vec<u8>> {
        let frames = self.cuts.len();
        self.pings.iter().take(frames).flatten().cloned().collect()
    }

    /// The events our decoder must report for this message.
    fn expected_events(&self) -> Vec<Ev> {
        let mut evs: Vec<Ev> = self.pings().into_iter().map(Ev::Ping).collect();
        evs.push(Ev::Msg(self.kind(), self.payload.clone(), self.cuts.is_empty()));
        evs
    }

    fn to_tungstenite(&self) -> Message {
        if self.text {
            Message::text(String::from_utf8(self.payload.clone()).unwrap())
        } else {
            Message::binary(self.payload.clone())
        }
    }
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        any::<bool>(),
        size(),
        any::<u64>(),
        prop_oneof![2 => Just(Vec::new()), 1 => vec(any::<Index>(), 1..5)],
        vec(proptest::option::weighted(0.4, vec(any::<u8>(), 0..=125)), 4),
    )
        .prop_map(|(text, len, seed, cuts, pings)| {
            let payload = payload(text, len, seed);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
            cuts.sort_unstable();
            Msg { text, payload, cuts, pings }
        })
}

/// Chunk boundaries for a stream of `len` bytes, from random indices.
fn cut_points(idx: &[Index], len: usize) -> Vec<usize> {
    idx.iter().map(|i| i.index(len + 1)).collect()
}

fn as_tungstenite_message(ev: &Ev) -> Message {
    match ev {
        Ev::Msg(MessageKind::Text, p, _) => Message::text(String::from_utf8(p.clone()).unwrap()),
        Ev::Msg(MessageKind::Binary, p, _) => Message::binary(p.clone()),
        Ev::Ping(p) => Message::Ping(p.clone().into()),
        Ev::Pong(p) => Message::Pong(p.clone().into()),
        Ev::Closed(_) => unreachable!(),
    }
}

/// What tungstenite must report for `msgs`: the pings and the messages in order.
fn expected_tungstenite(msgs: &[Msg]) -> Vec<Message> {
    msgs.iter().flat_map(Msg::expected_events).map(|e| as_tungstenite_message(&e)).collect()
}

fn pongs(msgs: &[Msg]) -> Vec<Ev> {
    msgs.iter().flat_map(Msg::pings).map(Ev::Pong).collect()
}

/// A tungstenite data frame for one of our fragments.
fn tungstenite_frame(fin: bool, op: OpCode, p: &[u8]) -> Message {
    let op = match op {
        OpCode::Text => TOpCode::Data(TData::Text),
        OpCode::Binary => TOpCode::Data(TData::Binary),
        OpCode::Continuation => TOpCode::Data(TData::Continue),
        OpCode::Ping => return Message::Ping(p.to_vec().into()),
        other => unreachable!("{other:?}"),
    };
    Message::Frame(Frame::message(p.to_vec(), op, fin))
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, max_shrink_iters: 2000, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------------------
// (c) split invariance: raw frames, valid or not.
// ---------------------------------------------------------------------------------------------------------

/// A raw frame, possibly invalid: any opcode, RSV bits, missing mask, oversized control, bad close code,
/// invalid UTF-8.
#[derive(Clone, Debug)]
struct RawFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
}

impl RawFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.fin) << 7 | self.rsv << 4 | self.opcode);
        let m = if self.mask.is_some() { 0x80 } else { 0 };
        let n = self.payload.len();
        match n {
            0..=125 => out.push(m | n as u8),
            126..=0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match self.mask {
            Some(k) => {
                out.extend_from_slice(&k);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ k[i & 3]));
            }
            None => out.extend_from_slice(&self.payload),
        }
    }
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    let opcode = prop_oneof![
        6 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        1 => 0u8..16,
    ];
    let len = prop_oneof![8 => 0usize..40, 1 => prop::sample::select(vec![125usize, 126, 300]), 1 => 0usize..3000];
    let body = prop_oneof![
        3 => (len.clone(), any::<u64>()).prop_map(|(n, s)| payload(true, n, s)),
        1 => (len, any::<u64>()).prop_map(|(n, s)| payload(false, n, s)),
        // A close payload: a code (valid or not) and a short reason, sometimes invalid UTF-8.
        1 => (
            prop::sample::select(vec![0u16, 999, 1000, 1001, 1004, 1005, 1006, 1013, 1015, 1016, 2999, 3000, 4999, 5000]),
            prop_oneof![Just(b"".to_vec()), Just(b"bye".to_vec()), Just(b"\xff".to_vec())],
        )
            .prop_map(|(c, r)| [c.to_be_bytes().to_vec(), r].concat()),
    ];
    (
        prop::bool::weighted(0.8),
        prop_oneof![15 => Just(0u8), 1 => 0u8..8],
        opcode,
        prop_oneof![15 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)],
        body,
    )
        .prop_map(|(fin, rsv, opcode, mask, payload)| RawFrame { fin, rsv, opcode, mask, payload })
}

/// Repairs a frame sequence into a mostly valid stream: no RSV bits, masked, valid opcodes, continuation
/// only inside a fragmented message, control frames final and short, a close only at the end. Text can
/// still turn invalid when a fragment boundary or a payload from the close generator breaks UTF-8.
fn sanitize(mut frames: Vec<RawFrame>) -> Vec<RawFrame> {
    let mut in_msg = false;
    let last = frames.len() - 1;
    for (i, f) in frames.iter_mut().enumerate() {
        f.rsv = 0;
        f.mask = Some(f.mask.unwrap_or([0xA5, 0x5A, 0x00, 0xFF]));
        f.opcode = [0u8, 1, 2, 8, 9, 10][usize::from(f.opcode) % 6];
        if f.opcode == 8 && i != last {
            f.opcode = 9;
        }
        if f.opcode >= 8 {
            f.fin = true;
            f.payload.truncate(125);
            if f.opcode == 8 {
                f.payload = vec![0x03, 0xE8];
            }
        } else {
            if in_msg {
                f.opcode = 0;
            } else if f.opcode == 0 {
                f.opcode = 2;
            }
            in_msg = !f.fin;
        }
    }
    frames
}

// ---------------------------------------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// (a) Our client encoder -> tungstenite server.
    #[test]
    fn a_client_encoder_to_tungstenite_server(
        msgs in vec(msg(), 1..5),
        seed in any::<u32>(),
        direct in any::<bool>(),
        close_reason in "[a-z ]{0,20}",
    ) {
        let mut client = WsConn::client(seed);
        let mut rng = Rng::new(u64::from(seed));
        let mut wire = Vec::new();
        for m in &msgs {
            m.for_each_frame(|fin, op, p| {
                if direct {
                    let key = (rng.next() as u32).to_le_bytes();
                    encode_client_frame(&mut wire, fin, op, key, p);
                } else {
                    client.encode_frame(&mut wire, fin, op, p);
                }
            });
        }
        prop_assert!(client.close(1000, &close_reason, &mut wire));

        let mut server = tungstenite(Role::Server);
        server.get_mut().input.extend(&wire);
        let got = drain_tungstenite(&mut server);
        let mut expect = expected_tungstenite(&msgs);
        expect.push(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: close_reason.clone().into() })));
        prop_assert_eq!(got.len(), expect.len());
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            prop_assert!(g == e, "message {} differs: {:?} vs {:?}", i, summary(g), summary(e));
        }

        // tungstenite's pongs and close echo, decoded by our client.
        let _ = server.flush();
        let back = std::mem::take(&mut server.get_mut().output);
        let mut f = Feeder::new(client, Limits::default());
        f.push(&back);
        let mut expect = pongs(&msgs);
        expect.push(Ev::Closed(Some(1000)));
        prop_assert_eq!(f.error, None);
        prop_assert_eq!(&f.events, &expect);
        prop_assert!(f.out.is_empty(), "our client answered the close echo");
        prop_assert_eq!(f.conn.state(), State::Closed);
    }

    /// (b) tungstenite client -> our server, fed in random chunk splits.
    #[test]
    fn b_tungstenite_client_to_server_in_chunks(
        msgs in vec(msg(), 1..5),
        cuts in vec(any::<Index>(), 0..24),
        close_cuts in vec(any::<Index>(), 0..4),
    ) {
        let mut client = tungstenite(Role::Client);
        for m in &msgs {
            if m.cuts.is_empty() && m.pings.iter().all(Option::is_none) && m.payload.len() % 3 == 0 {
                // The plain API for some single-frame messages, raw frames for the others.
                client.write(m.to_tungstenite()).unwrap();
            } else {
                m.for_each_frame(|fin, op, p| client.write(tungstenite_frame(fin, op, p)).unwrap());
            }
        }
        client.flush().unwrap();
        let wire = std::mem::take(&mut client.get_mut().output);

        let mut server = Feeder::new(WsConn::server(), Limits::default());
        server.push_split(&wire, &cut_points(&cuts, wire.len()));
        let expect: Vec<Ev> = msgs.iter().flat_map(Msg::expected_events).collect();
        prop_assert_eq!(server.error, None);
        prop_assert_eq!(server.pending.len(), 0);
        prop_assert!(server.events == expect, "events differ: {:?}", server.events.iter().map(ev_summary).collect::<Vec<_>>());

        // Our pongs, read by tungstenite.
        client.get_mut().input.extend(std::mem::take(&mut server.out));
        let got = drain_tungstenite(&mut client);
        let expect: Vec<Message> = pongs(&msgs).iter().map(as_tungstenite_message).collect();
        prop_assert_eq!(got, expect);

        // The close handshake, tungstenite first.
        let reason = "done";
        client.close(Some(CloseFrame { code: CloseCode::Away, reason: reason.into() })).unwrap();
        let wire = std::mem::take(&mut client.get_mut().output);
        server.push_split(&wire, &cut_points(&close_cuts, wire.len()));
        prop_assert_eq!(server.error, None);
        prop_assert_eq!(server.events.last(), Some(&Ev::Closed(Some(1001))));
        prop_assert_eq!(server.conn.state(), State::Closed);
        client.get_mut().input.extend(std::mem::take(&mut server.out));
        match client.read() {
            Ok(Message::Close(Some(cf))) => prop_assert_eq!(cf.code, CloseCode::Away),
            other => prop_assert!(false, "expected the close echo, got {:?}", other),
        }
    }

    /// (c) Any split of a byte stream, valid or not, gives what feeding it whole gives.
    #[test]
    fn c_every_split_gives_the_same_outcome(
        frames in prop_oneof![vec(raw_frame(), 1..8), vec(raw_frame(), 1..16).prop_map(sanitize)],
        cuts in vec(any::<Index>(), 1..16),
        garbage in prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..20)],
        small in any::<bool>(),
    ) {
        let mut input = Vec::new();
        for f in &frames {
            f.encode(&mut input);
        }
        input.extend_from_slice(&garbage);
        let limits = if small { Limits { max_frame: 100, max_message: 150 } } else { Limits::default() };

        let mut whole = Feeder::new(WsConn::server(), limits);
        whole.push(&input);
        let expect = whole.outcome();

        let mut split = Feeder::new(WsConn::server(), limits);
        split.push_split(&input, &cut_points(&cuts, input.len()));
        prop_assert_eq!(split.outcome(), expect.clone());

        let mut bytewise = Feeder::new(WsConn::server(), limits);
        for b in &input {
            bytewise.push(std::slice::from_ref(b));
        }
        prop_assert_eq!(bytewise.outcome(), expect);
    }

    /// (c) The same for well-formed message streams (large payloads, fragments, pings, a final close).
    #[test]
    fn c_valid_streams_split_anywhere(
        msgs in vec(msg(), 1..4),
        cuts in vec(any::<Index>(), 1..16),
        seed in any::<u32>(),
    ) {
        let mut c = WsConn::client(seed);
        let mut input = Vec::new();
        for m in &msgs {
            m.for_each_frame(|fin, op, p| c.encode_frame(&mut input, fin, op, p));
        }
        c.close(1000, "", &mut input);
        let mut whole = Feeder::new(WsConn::server(), Limits::default());
        whole.push(&input);
        let mut expect: Vec<Ev> = msgs.iter().flat_map(Msg::expected_events).collect();
        expect.push(Ev::Closed(Some(1000)));
        prop_assert!(whole.events == expect);
        prop_assert_eq!(whole.error, None);
        let mut split = Feeder::new(WsConn::server(), Limits::default());
        split.push_split(&input, &cut_points(&cuts, input.len()));
        prop_assert!(split.outcome() == whole.outcome());
    }

    /// (d) Our server encoder -> tungstenite client.
    #[test]
    fn d_server_encoder_to_tungstenite_client(msgs in vec(msg(), 1..5), code in prop::sample::select(vec![1000u16, 1001, 1011, 1013, 3000, 4008, 4999])) {
        let mut wire = Vec::new();
        for m in &msgs {
            m.for_each_frame(|fin, op, p| encode_server_frame(&mut wire, fin, op, p));
        }
        let mut server = WsConn::server();
        prop_assert!(server.close(code, "bye", &mut wire));

        let mut client = tungstenite(Role::Client);
        client.get_mut().input.extend(&wire);
        let got = drain_tungstenite(&mut client);
        let mut expect = expected_tungstenite(&msgs);
        expect.push(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: "bye".into() })));
        prop_assert_eq!(got.len(), expect.len());
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            prop_assert!(g == e, "message {} differs: {:?} vs {:?}", i, summary(g), summary(e));
        }

        // tungstenite's (masked) pongs and close echo, decoded by our server, which sent the close first.
        let _ = client.flush();
        let back = std::mem::take(&mut client.get_mut().output);
        let mut f = Feeder::new(server, Limits::default());
        f.push(&back);
        let mut expect = pongs(&msgs);
        expect.push(Ev::Closed(Some(code)));
        prop_assert_eq!(f.error, None);
        prop_assert_eq!(&f.events, &expect);
        prop_assert!(f.out.is_empty(), "a close echo was answered");
        prop_assert_eq!(f.conn.state(), State::Closed);
    }

    /// (e) tungstenite server -> our client, fed in random chunk splits.
    #[test]
    fn e_tungstenite_server_to_client_in_chunks(
        msgs in vec(msg(), 1..5),
        cuts in vec(any::<Index>(), 0..24),
        seed in any::<u32>(),
    ) {
        let mut server = tungstenite(Role::Server);
        for m in &msgs {
            m.for_each_frame(|fin, op, p| server.write(tungstenite_frame(fin, op, p)).unwrap());
        }
        server.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).unwrap();
        let wire = std::mem::take(&mut server.get_mut().output);
        let mut client = Feeder::new(WsConn::client(seed), Limits::default());
        client.push_split(&wire, &cut_points(&cuts, wire.len()));
        let mut expect: Vec<Ev> = msgs.iter().flat_map(Msg::expected_events).collect();
        expect.push(Ev::Closed(Some(1000)));
        prop_assert_eq!(client.error, None);
        prop_assert!(client.events == expect);

        // Our masked pongs and close echo, accepted by tungstenite.
        server.get_mut().input.extend(std::mem::take(&mut client.out));
        let mut got = Vec::new();
        loop {
            match server.read() {
                Ok(m) => got.push(m),
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => prop_assert!(false, "tungstenite: {:?}", e),
            }
        }
        let mut expect: Vec<Message> = pongs(&msgs).iter().map(as_tungstenite_message).collect();
        expect.push(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })));
        prop_assert_eq!(got, expect);
    }
}

/// A short description of a message (payloads run to 64 KiB).
fn summary(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("Text({} bytes)", t.len()),
        Message::Binary(b) => format!("Binary({} bytes)", b.len()),
        other => format!("{other:?}"),
    }
}

fn ev_summary(e: &Ev) -> String {
    match e {
        Ev::Msg(k, p, in_place) => format!("{k:?}({} bytes, in place: {in_place})", p.len()),
        other => format!("{other:?}"),
    }
}

/// A fixed case at every length boundary, both kinds, single and fragmented, tungstenite both ways.
#[test]
fn length_boundaries_both_ways() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 65537] {
        for text in [false, true] {
            for cuts in [vec![], vec![len / 2], vec![0, len]] {
                let m = Msg { text, payload: payload(text, len, len as u64), cuts, pings: vec![Some(b"p".to_vec())] };
                let mut wire = Vec::new();
                let mut c = WsConn::client(7);
                m.for_each_frame(|fin, op, p| c.encode_frame(&mut wire, fin, op, p));
                let mut server = tungstenite(Role::Server);
                server.get_mut().input.extend(&wire);
                assert_eq!(drain_tungstenite(&mut server), expected_tungstenite(std::slice::from_ref(&m)));

                let mut client = tungstenite(Role::Client);
                m.for_each_frame(|fin, op, p| client.write(tungstenite_frame(fin, op, p)).unwrap());
                client.flush().unwrap();
                let wire = std::mem::take(&mut client.get_mut().output);
                let mut f = Feeder::new(WsConn::server(), Limits::default());
                f.push_split(&wire, &[1, 3, 7, 100, 65000]);
                assert_eq!(f.error, None);
                assert_eq!(f.events, m.expected_events(), "len {len} text {text}");
            }
        }
    }
}
