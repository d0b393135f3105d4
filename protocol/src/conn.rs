//! The per-connection WebSocket state machine: bytes in, events and control frames out.
//!
//! [`WsConn::handle_read`] takes the receive buffer positioned at the start of the next frame and either
//! needs more bytes, consumes a frame silently, or consumes a frame and yields an [`Event`]. Replies the
//! protocol requires (pong for ping, the close echo, the close sent when failing the connection) are written
//! into the caller's `out` buffer; the caller sends `out` in order with its other frames. No IO, no clocks.
//!
//! Zero-copy contract: an unfragmented message is unmasked in place and reported as a range of the
//! caller's buffer ([`MessageData::InPlace`]). Only fragmented messages are copied, into a buffer that is
//! handed over with the message and not kept ([`MessageData::Assembled`]), so an idle connection holds no
//! buffer. When a frame is incomplete its available payload is already unmasked and, for text, validated,
//! so invalid UTF-8 fails the connection before the frame ends; the caller must then present the same
//! bytes (now unmasked) again, followed by more, on the next call — `WsConn` remembers how far it got.

use std::ops::Range;

use crate::frame::close::parse_close_payload;
use crate::frame::encode::{encode_client_frame, encode_close, encode_server_frame};
use crate::frame::{apply_mask, parse_header, OpCode, ProtocolError, Utf8Validator};

/// Which side of the connection this state machine plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Receives masked frames, sends unmasked ones.
    Server,
    /// Receives unmasked frames, sends masked ones.
    Client,
}

/// Size limits, passed in on every call so that per-connection state does not carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one data frame.
    pub max_frame: usize,
    /// Largest message, summed over its fragments.
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_frame: 1 << 20, max_message: 1 << 20 }
    }
}

/// The kind of a data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A text message; its bytes are valid UTF-8.
    Text,
    /// A binary message.
    Binary,
}

/// Where a received message's payload is.
#[derive(Debug, PartialEq, Eq)]
pub enum MessageData {
    /// Unmasked in place: this range of the buffer passed to [`WsConn::handle_read`].
    InPlace(Range<usize>),
    /// A fragmented message, reassembled into a buffer the caller now owns.
    Assembled(Vec<u8>),
}

/// Something the caller must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete data message.
    Message {
        /// Text or binary.
        kind: MessageKind,
        /// Its payload.
        data: MessageData,
    },
    /// A ping, already answered with a pong in `out`; the range is its payload.
    Ping(Range<usize>),
    /// A pong; the range is its payload.
    Pong(Range<usize>),
    /// The close handshake is over (the peer's close was answered in `out`, or it acknowledged ours):
    /// send what is in `out`, then close the TCP connection.
    Closed {
        /// The code the peer sent, if any.
        code: Option<u16>,
    },
}

/// The result of one [`WsConn::handle_read`] call.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The frame at the front of the buffer is incomplete: call again with the same bytes and more.
    NeedMore,
    /// A frame of this many bytes was consumed and needs no action (e.g. a non-final fragment).
    Consumed(usize),
    /// A frame of this many bytes was consumed and produced an event.
    Event(usize, Event),
}

/// Lifecycle of the WebSocket layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's; incoming data is discarded.
    CloseSent,
    /// The close handshake is complete or the connection failed; nothing more is read or sent.
    Closed,
}

/// Per-connection protocol state. Fits in [`WsConn::SIZE_BUDGET`] bytes (checked at compile time).
#[derive(Debug)]
pub struct WsConn {
    /// Fragments of the message in progress. Empty (no allocation) unless a fragmented message is arriving.
    assembled: Vec<u8>,
    /// Payload bytes of the incomplete frame at the buffer front already unmasked and validated.
    partial_done: u32,
    /// Payload bytes of the fragmented message in progress, for the message-size limit.
    msg_len: u32,
    /// Xorshift state for client mask keys (unused by servers); seeded by the caller, so still sans-IO.
    mask_seed: u32,
    /// UTF-8 state of the text message in progress, carried across partial frames and fragments.
    utf8: Utf8Validator,
    /// Kind of the fragmented message in progress, if one is.
    msg: Option<MessageKind>,
    state: State,
    role: Role,
}

impl WsConn {
    /// The per-connection size budget of the protocol state, in bytes.
    pub const SIZE_BUDGET: usize = 48;

    /// A server-side connection, freshly upgraded.
    pub const fn server() -> Self {
        Self::new(Role::Server, 0)
    }

    /// A client-side connection; `seed` (non-zero) seeds the mask keys of the frames it sends.
    pub const fn client(seed: u32) -> Self {
        Self::new(Role::Client, if seed == 0 { 0x9E37_79B9 } else { seed })
    }

    const fn new(role: Role, mask_seed: u32) -> Self {
        Self {
            assembled: Vec::new(),
            partial_done: 0,
            msg_len: 0,
            mask_seed,
            utf8: Utf8Validator::new(),
            msg: None,
            state: State::Open,
            role,
        }
    }

    /// The current lifecycle state.
    #[inline]
    pub fn state(&self) -> State {
        self.state
    }

    /// True while a fragmented message is being reassembled (the connection holds a buffer).
    pub fn in_fragmented_message(&self) -> bool {
        self.msg.is_some()
    }

    /// Bytes allocated for the fragmented message in progress (0 when none is): what this state machine
    /// holds on the caller's behalf, for a caller that bounds memory held per connection or in total.
    pub fn assembled_capacity(&self) -> usize {
        self.assembled.capacity()
    }

    fn next_mask(&mut self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                let mut x = self.mask_seed;
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                self.mask_seed = x;
                Some(x.to_le_bytes())
            }
        }
    }

    /// Appends one complete frame of this side's kind (masked for clients) to `out`.
    pub fn encode_frame(&mut self, out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8]) {
        match self.next_mask() {
            Some(m) => encode_client_frame(out, fin, opcode, m, payload),
            None => encode_server_frame(out, fin, opcode, payload),
        }
    }

    /// Starts the close handshake: writes a close frame with `code` and `reason` to `out`. Returns false
    /// (writing nothing) when a close was already sent.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> bool {
        if self.state != State::Open {
            return false;
        }
        let mask = self.next_mask();
        encode_close(out, mask, code, reason);
        self.state = State::CloseSent;
        true
    }

    /// Fails the connection: sends a close with the error's code and reason if none was sent yet.
    fn fail(&mut self, err: ProtocolError, out: &mut Vec<u8>) -> ProtocolError {
        if self.state == State::Open {
            let mask = self.next_mask();
            encode_close(out, mask, err.close_code(), err.reason());
        }
        self.state = State::Closed;
        self.assembled = Vec::new();
        err
    }

    /// Processes the frame at the front of `buf` (see the module docs for the buffer contract).
    ///
    /// On error the connection is failed: a close frame with the matching code is in `out` (unless one was
    /// sent before), the state is [`State::Closed`], and the caller sends `out` and closes the socket.
    pub fn handle_read(&mut self, buf: &mut [u8], limits: &Limits, out: &mut Vec<u8>) -> Result<Step, ProtocolError> {
        if self.state == State::Closed {
            return Ok(Step::Consumed(buf.len()));
        }
        let h = match parse_header(buf) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Step::NeedMore),
            Err(e) => return Err(self.fail(e, out)),
        };
        match (self.role, h.mask) {
            (Role::Server, None) => return Err(self.fail(ProtocolError::UnmaskedFrame, out)),
            (Role::Client, Some(_)) => return Err(self.fail(ProtocolError::MaskedFrame, out)),
            _ => {}
        }
        let control = h.opcode.is_control();
        let text = match h.opcode {
            OpCode::Text => true,
            OpCode::Continuation => self.msg == Some(MessageKind::Text),
            _ => false,
        };
        if !control {
            let continuation = h.opcode == OpCode::Continuation;
            if continuation != self.msg.is_some() {
                let e = if continuation {
                    ProtocolError::UnexpectedContinuation
                } else {
                    ProtocolError::ExpectedContinuation
                };
                return Err(self.fail(e, out));
            }
            let before = if continuation { u64::from(self.msg_len) } else { 0 };
            if h.payload_len > limits.max_frame as u64
                || before + h.payload_len > limits.max_message as u64
                || before + h.payload_len > u64::from(u32::MAX)
            {
                return Err(self.fail(ProtocolError::MessageTooBig, out));
            }
        }
        let hl = usize::from(h.header_len);
        // Control payloads are at most 125 bytes and data payloads were bounded above, so this fits.
        let plen = h.payload_len as usize;
        let avail = (buf.len() - hl).min(plen);
        if !control {
            // Unmask and validate what has arrived of a data frame, even if it is incomplete.
            let done = self.partial_done as usize;
            if avail > done {
                let seg = &mut buf[hl + done..hl + avail];
                if let Some(m) = h.mask {
                    apply_mask(seg, m, done);
                }
                if text && self.utf8.feed(seg).is_err() {
                    return Err(self.fail(ProtocolError::InvalidUtf8, out));
                }
                self.partial_done = avail as u32;
            }
        }
        if avail < plen {
            return Ok(Step::NeedMore);
        }
        self.partial_done = 0;
        let consumed = hl + plen;
        let payload = hl..consumed;
        if control {
            if let Some(m) = h.mask {
                apply_mask(&mut buf[payload.clone()], m, 0);
            }
        }
        let open = self.state == State::Open;
        let step = match h.opcode {
            OpCode::Text | OpCode::Binary => {
                let kind = if text { MessageKind::Text } else { MessageKind::Binary };
                if !h.fin {
                    self.msg = Some(kind);
                    self.msg_len = plen as u32;
                    self.assembled.extend_from_slice(&buf[payload]);
                    Step::Consumed(consumed)
                } else {
                    if text && self.utf8.finish().is_err() {
                        return Err(self.fail(ProtocolError::InvalidUtf8, out));
                    }
                    if open {
                        Step::Event(consumed, Event::Message { kind, data: MessageData::InPlace(payload) })
                    } else {
                        Step::Consumed(consumed)
                    }
                }
            }
            OpCode::Continuation => {
                self.msg_len += plen as u32;
                self.assembled.extend_from_slice(&buf[payload]);
                if !h.fin {
                    Step::Consumed(consumed)
                } else {
                    if text && self.utf8.finish().is_err() {
                        return Err(self.fail(ProtocolError::InvalidUtf8, out));
                    }
                    let kind = self.msg.take().unwrap_or(MessageKind::Binary);
                    self.msg_len = 0;
                    let data = std::mem::take(&mut self.assembled);
                    if open {
                        Step::Event(consumed, Event::Message { kind, data: MessageData::Assembled(data) })
                    } else {
                        Step::Consumed(consumed)
                    }
                }
            }
            OpCode::Close => {
                let code = match parse_close_payload(&buf[payload]) {
                    Ok(c) => c,
                    Err(e) => return Err(self.fail(e, out)),
                };
                if open {
                    let mask = self.next_mask();
                    match code {
                        Some(c) => encode_close(out, mask, c, ""),
                        None => match mask {
                            Some(m) => encode_client_frame(out, true, OpCode::Close, m, &[]),
                            None => encode_server_frame(out, true, OpCode::Close, &[]),
                        },
                    }
                }
                self.state = State::Closed;
                self.assembled = Vec::new();
                Step::Event(consumed, Event::Closed { code })
            }
            OpCode::Ping => {
                if open {
                    let mask = self.next_mask();
                    let p = &buf[payload.clone()];
                    match mask {
                        Some(m) => encode_client_frame(out, true, OpCode::Pong, m, p),
                        None => encode_server_frame(out, true, OpCode::Pong, p),
                    }
                }
                Step::Event(consumed, Event::Ping(payload))
            }
            OpCode::Pong => Step::Event(consumed, Event::Pong(payload)),
        };
        Ok(step)
    }
}

const _: () = assert!(std::mem::size_of::<WsConn>() <= WsConn::SIZE_BUDGET);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_client_frame;

    /// Feeds `input` through a server WsConn in chunks, like an engine keeping an unfinished frame's bytes.
    /// Returns (messages, events other than messages, bytes written to out, error).
    type Run = (Vec<(MessageKind, Vec<u8>)>, Vec<Event>, Vec<u8>, Option<ProtocolError>);

    pub(crate) fn run(input: &[u8], chunk: usize, limits: &Limits) -> Run {
        let mut c = WsConn::server();
        let mut pending: Vec<u8> = Vec::new();
        let mut msgs = Vec::new();
        let mut other = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            pending.extend_from_slice(piece);
            let mut off = 0;
            loop {
                match c.handle_read(&mut pending[off..], limits, &mut out) {
                    Ok(Step::NeedMore) => break,
                    Ok(Step::Consumed(n)) => off += n,
                    Ok(Step::Event(n, ev)) => {
                        match ev {
                            Event::Message { kind, data: MessageData::InPlace(r) } => {
                                msgs.push((kind, pending[off..][r].to_vec()))
                            }
                            Event::Message { kind, data: MessageData::Assembled(v) } => msgs.push((kind, v)),
                            e => other.push(e),
                        }
                        off += n;
                    }
                    Err(e) => return (msgs, other, out, Some(e)),
                }
                if off == pending.len() {
                    break;
                }
            }
            pending.drain(..off);
        }
        (msgs, other, out, None)
    }

    fn masked(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_client_frame(&mut v, fin, op, [0x11, 0x22, 0x33, 0x44], payload);
        v
    }

    #[test]
    fn single_frame_in_place() {
        let mut buf = vec![0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut c = WsConn::server();
        let mut out = Vec::new();
        let step = c.handle_read(&mut buf, &Limits::default(), &mut out).unwrap();
        assert_eq!(
            step,
            Step::Event(11, Event::Message { kind: MessageKind::Text, data: MessageData::InPlace(6..11) })
        );
        assert_eq!(&buf[6..11], b"Hello");
        assert!(out.is_empty());
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut input = masked(false, OpCode::Text, b"Hel");
        input.extend(masked(true, OpCode::Ping, b"p"));
        input.extend(masked(true, OpCode::Continuation, b"lo"));
        for chunk in 1..input.len() + 1 {
            let (msgs, other, out, err) = run(&input, chunk, &Limits::default());
            assert_eq!(err, None);
            assert_eq!(msgs, vec![(MessageKind::Text, b"Hello".to_vec())]);
            assert_eq!(other, vec![Event::Ping(6..7)]);
            assert_eq!(out, [0x8A, 0x01, b'p']);
        }
    }

    #[test]
    fn close_handshake_peer_first() {
        let input = masked(true, OpCode::Close, b"\x03\xe8bye");
        let (_, other, out, err) = run(&input, 100, &Limits::default());
        assert_eq!(err, None);
        assert_eq!(other, vec![Event::Closed { code: Some(1000) }]);
        assert_eq!(out, [0x88, 0x02, 0x03, 0xe8]);
    }

    #[test]
    fn close_handshake_server_first() {
        let mut c = WsConn::server();
        let mut out = Vec::new();
        assert!(c.close(1001, "shutting down", &mut out));
        assert!(!c.close(1001, "again", &mut out));
        assert_eq!(&out[..4], &[0x88, 15, 0x03, 0xe9]);
        assert_eq!(c.state(), State::CloseSent);
        out.clear();
        // Data after our close is discarded; the peer's close completes the handshake with no reply.
        let mut buf = masked(true, OpCode::Text, b"late");
        buf.extend(masked(true, OpCode::Close, b"\x03\xe9"));
        let l = Limits::default();
        assert_eq!(c.handle_read(&mut buf, &l, &mut out).unwrap(), Step::Consumed(10));
        assert_eq!(
            c.handle_read(&mut buf[10..], &l, &mut out).unwrap(),
            Step::Event(8, Event::Closed { code: Some(1001) })
        );
        assert!(out.is_empty());
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn errors_send_matching_close() {
        let l = Limits { max_frame: 16, max_message: 20 };
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (vec![0x81, 0x00], ProtocolError::UnmaskedFrame),
            (masked(true, OpCode::Text, &[0xC0, 0x80]), ProtocolError::InvalidUtf8),
            (masked(true, OpCode::Binary, &[0; 17]), ProtocolError::MessageTooBig),
            (
                [masked(false, OpCode::Binary, &[0; 16]), masked(true, OpCode::Continuation, &[0; 5])].concat(),
                ProtocolError::MessageTooBig,
            ),
            (masked(true, OpCode::Continuation, b"x"), ProtocolError::UnexpectedContinuation),
            (
                [masked(false, OpCode::Text, b"a"), masked(true, OpCode::Text, b"b")].concat(),
                ProtocolError::ExpectedContinuation,
            ),
            (masked(true, OpCode::Close, b"\x03"), ProtocolError::BadClosePayload),
            (masked(true, OpCode::Close, b"\x03\xed"), ProtocolError::InvalidCloseCode(1005)),
            (masked(true, OpCode::Close, b"\x03\xe8\xff"), ProtocolError::InvalidUtf8),
            (vec![0xC1, 0x80, 0, 0, 0, 0], ProtocolError::ReservedBits),
            (vec![0x83, 0x80, 0, 0, 0, 0], ProtocolError::ReservedOpcode(3)),
            (masked(false, OpCode::Ping, b""), ProtocolError::FragmentedControl),
        ];
        for (input, expect) in cases {
            let (_, _, out, err) = run(&input, 1000, &l);
            assert_eq!(err, Some(expect), "{input:x?}");
            let code = u16::from_be_bytes([out[2], out[3]]);
            assert_eq!((out[0], code), (0x88, expect.close_code()));
        }
    }

    #[test]
    fn invalid_utf8_fails_before_frame_ends() {
        // Autobahn 6.4.x: the frame announces 20 bytes, but the 5th already makes the text invalid.
        let mut frame =
            masked(true, OpCode::Text, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited");
        frame.truncate(6 + 13);
        let mut c = WsConn::server();
        let mut out = Vec::new();
        let err = c.handle_read(&mut frame, &Limits::default(), &mut out).unwrap_err();
        assert_eq!(err, ProtocolError::InvalidUtf8);
    }

    #[test]
    fn assembled_buffer_is_released() {
        let input = [masked(false, OpCode::Binary, b"ab"), masked(true, OpCode::Continuation, b"cd")].concat();
        let mut c = WsConn::server();
        let mut out = Vec::new();
        let mut buf = input.clone();
        let l = Limits::default();
        let Step::Consumed(n) = c.handle_read(&mut buf, &l, &mut out).unwrap() else { panic!() };
        assert!(c.in_fragmented_message());
        let Step::Event(_, Event::Message { data: MessageData::Assembled(v), .. }) =
            c.handle_read(&mut buf[n..], &l, &mut out).unwrap()
        else {
            panic!()
        };
        assert_eq!(v, b"abcd");
        assert!(!c.in_fragmented_message());
        assert_eq!(c.assembled.capacity(), 0);
    }

    #[test]
    fn client_role_masks_and_rejects_masked() {
        let mut c = WsConn::client(7);
        let mut out = Vec::new();
        c.encode_frame(&mut out, true, OpCode::Text, b"hi");
        assert_eq!(out[1] & 0x80, 0x80);
        let mut bad = masked(true, OpCode::Text, b"x");
        assert_eq!(c.handle_read(&mut bad, &Limits::default(), &mut Vec::new()), Err(ProtocolError::MaskedFrame));
    }
}
