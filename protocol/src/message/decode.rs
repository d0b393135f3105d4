//! The client command decoder: simd-json, strings borrowed in place, `data` spliced raw.
//!
//! # How a payload is decoded
//!
//! 1. The payload is copied into the decoder's reusable `raw` buffer, followed by the padding simd-json
//!    needs (`simd_json::fill_tape` would make the same copy internally; `fill_tape_padded` parses ours in
//!    place instead). simd-json unescapes strings inside that copy, and the payload itself is never
//!    written to: it keeps the client's bytes, which is what `data` must be.
//! 2. The copy is parsed into the decoder's reusable tape (recycled across calls with `Tape::reset`). The
//!    top-level members are read off the tape: known keys are validated, the others are skipped. String
//!    fields are remembered as byte ranges of the copy, so that the tape can be recycled before the
//!    returned [`Command`] borrows them.
//! 3. For `publish`, the raw text of `data` is found from simd-json's structural indexes (the sorted byte
//!    offsets of every `{ } [ ] : ,` outside strings and of every value's first byte, opening quotes
//!    included). The tape gives where the `"data"` key starts (its string points into the copy, just
//!    after the quote) and where the next top-level key starts, if any. A binary search finds the key's
//!    quote among the indexes: the one after it is the `:`, the next one is the first byte of the value.
//!    The value ends at the index just before the next key's quote (its `,`), or at the last index (the
//!    closing `}`) when `data` is the last member; trailing whitespace is trimmed. The slice is taken from
//!    the payload, so it is byte-identical to what the client sent.
//!
//! simd-json refuses numbers it cannot represent: integers beyond `i64`/`u64` and floats beyond `f64`
//! (`18446744073709551616`, `1e400`), though they are valid JSON. Such a number inside `data` (or inside an
//! unknown field) must not make a publish fail, so on that error the decoder retries once on a fresh copy
//! in which every such number is overwritten by `0` and spaces (same length, so every offset stays put);
//! the raw `data` still comes from the payload. A patched number in `id`, `since` or `limit` is refused as
//! a bad field. This path is rare and may allocate.
//!
//! # Cost
//!
//! Decoding is linear in the payload whatever its content: simd-json's two stages are, the retry runs
//! them once more, and finding the numbers to patch reads each byte at most once (see
//! `patch_numbers`). A client cannot make one command cost more than a constant times its length.
//!
//! # Duplicate keys
//!
//! The **last** occurrence of a key wins, as in JavaScript's `JSON.parse`, for every field, `data`
//! included.
//!
//! # Optional fields
//!
//! `id`, `since` and `limit` given as `null` are treated as absent.

use simd_json::{Buffers, ErrorType, Node, StaticNode, Tape, INPUT_PADDING};
use thiserror::Error;

use super::channel::{parse_channel, ChannelError};

/// Size limits enforced by the [`Decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest raw JSON text of a publish's `data`, in bytes. Default 64 KiB.
    pub max_data_bytes: usize,
    /// Longest channel name, in bytes. Default 128.
    pub max_channel_len: usize,
    /// Longest `token` of a refresh (after unescaping), in bytes. Default 8 KiB.
    pub max_token_len: usize,
    /// Longest `since.epoch` (after unescaping), in bytes. Default 64.
    pub max_epoch_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_data_bytes: 64 * 1024, max_channel_len: 128, max_token_len: 8 * 1024, max_epoch_len: 64 }
    }
}

/// A stream position: the offset of the last message the client saw, in the channel epoch it saw it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Since<'a> {
    /// Offset of the last message seen.
    pub offset: u64,
    /// Epoch of the channel when that message was seen; if the channel's epoch changed since, the history
    /// is gone and the client cannot be recovered.
    pub epoch: &'a str,
}

/// A client command, borrowing its strings from the decoded payload.
///
/// Every `channel` has passed [`parse_channel`](super::parse_channel) with the decoder's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command<'a> {
    /// `{"type":"subscribe","id":1,"channel":"room:42","since":{"offset":17,"epoch":"e1"}}`
    Subscribe {
        /// Echoed in the reply.
        id: Option<u64>,
        /// Channel to subscribe to.
        channel: &'a str,
        /// Where the client left off, to recover missed messages.
        since: Option<Since<'a>>,
    },
    /// `{"type":"unsubscribe","id":2,"channel":"room:42"}`
    Unsubscribe {
        /// Echoed in the reply.
        id: Option<u64>,
        /// Channel to leave.
        channel: &'a str,
    },
    /// `{"type":"publish","id":3,"channel":"room:42","data":<any JSON>}`
    Publish {
        /// Echoed in the reply.
        id: Option<u64>,
        /// Channel to publish to.
        channel: &'a str,
        /// The raw JSON text of `data`, byte-identical to the client's (surrounding whitespace excluded).
        data: &'a [u8],
    },
    /// `{"type":"presence","id":4,"channel":"room:42"}`
    Presence {
        /// Echoed in the reply.
        id: Option<u64>,
        /// Channel whose subscribers are asked for.
        channel: &'a str,
    },
    /// `{"type":"history","id":5,"channel":"room:42","since":{...},"limit":100}`
    History {
        /// Echoed in the reply.
        id: Option<u64>,
        /// Channel whose history is asked for.
        channel: &'a str,
        /// Only messages after this position.
        since: Option<Since<'a>>,
        /// At most this many messages, `1..=1000`.
        limit: Option<u32>,
    },
    /// `{"type":"ping","id":6}`, the application-level ping of browsers.
    Ping {
        /// Echoed in the reply.
        id: Option<u64>,
    },
    /// `{"type":"refresh","id":7,"token":"<new jwt>"}`
    Refresh {
        /// Echoed in the reply.
        id: Option<u64>,
        /// The new token.
        token: &'a str,
    },
}

impl<'a> Command<'a> {
    /// The command's `id`, echoed in its reply.
    #[must_use]
    pub fn id(&self) -> Option<u64> {
        match *self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Presence { id, .. }
            | Command::History { id, .. }
            | Command::Ping { id }
            | Command::Refresh { id, .. } => id,
        }
    }

    /// The channel the command is about, if it is a channel command.
    #[must_use]
    pub fn channel(&self) -> Option<&'a str> {
        match *self {
            Command::Subscribe { channel, .. }
            | Command::Unsubscribe { channel, .. }
            | Command::Publish { channel, .. }
            | Command::Presence { channel, .. }
            | Command::History { channel, .. } => Some(channel),
            Command::Ping { .. } | Command::Refresh { .. } => None,
        }
    }

    /// The command's `type` as sent on the wire (`"subscribe"`, `"publish"`, ...).
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { .. } => "publish",
            Command::Presence { .. } => "presence",
            Command::History { .. } => "history",
            Command::Ping { .. } => "ping",
            Command::Refresh { .. } => "refresh",
        }
    }
}

/// Why a payload is not a valid command.
#[derive(Debug, PartialEq, Error)]
pub enum DecodeError {
    /// The payload is not JSON (or holds a number simd-json cannot parse where it matters).
    #[error("not valid JSON: {0}")]
    NotJson(simd_json::Error),
    /// The payload is JSON but not an object.
    #[error("a command must be a JSON object")]
    NotAnObject,
    /// The object has no `type` member.
    #[error("missing \"type\"")]
    MissingType,
    /// `type` names no known command.
    #[error("unknown command type")]
    UnknownType,
    /// A member the command requires is absent.
    #[error("missing field \"{0}\"")]
    MissingField(&'static str),
    /// A member has the wrong JSON type or an out-of-range value.
    #[error("field \"{field}\" must be {expected}")]
    BadField {
        /// The member's name (`since.offset` for nested ones).
        field: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },
    /// `channel` is not a valid channel name.
    #[error("bad channel: {0}")]
    BadChannel(ChannelError),
    /// A member is larger than the decoder's [`Limits`] allow.
    #[error("field \"{field}\" is larger than {max} bytes")]
    TooLarge {
        /// The member's name.
        field: &'static str,
        /// The limit it broke, in bytes.
        max: usize,
    },
}

impl DecodeError {
    /// The machine-readable code sent in `{"type":"error","code":...}`: `bad_json`, `bad_request`,
    /// `unknown_command`, `bad_channel` or `too_large`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "bad_json",
            DecodeError::NotAnObject
            | DecodeError::MissingType
            | DecodeError::MissingField(_)
            | DecodeError::BadField { .. } => "bad_request",
            DecodeError::UnknownType => "unknown_command",
            DecodeError::BadChannel(_) => "bad_channel",
            DecodeError::TooLarge { .. } => "too_large",
        }
    }
}

/// A refused command: the error, with the command's `id` when it could be read, so the reply can be
/// `{"type":"error","id":3,"code":...}`.
#[derive(Debug, PartialEq, Error)]
#[error("{error}")]
pub struct DecodeFailure {
    /// The command's `id`, if the payload was an object with a valid `id`.
    pub id: Option<u64>,
    /// What was wrong.
    pub error: DecodeError,
}

impl DecodeFailure {
    /// The machine-readable error code, see [`DecodeError::code`].
    #[must_use]
    pub fn code(&self) -> &'static str {
        self.error.code()
    }
}

const fn fail(id: Option<u64>, error: DecodeError) -> DecodeFailure {
    DecodeFailure { id, error }
}

fn internal() -> DecodeFailure {
    fail(None, DecodeError::NotJson(simd_json::Error::generic(ErrorType::InternalError)))
}

/// Decodes client commands, reusing its buffers across calls.
///
/// Once warmed up (a few payloads of the usual sizes), decoding `subscribe`, `publish`, `ping` and the
/// other commands allocates nothing. One decoder per shard (or thread) is enough: a decoded [`Command`]
/// borrows the decoder until it is dropped.
pub struct Decoder {
    buffers: Buffers,
    /// Recycled between calls: always empty between them (`Tape::reset`).
    tape: Tape<'static>,
    /// The payload copy that is parsed (and unescaped) in place, followed by `INPUT_PADDING` bytes.
    raw: Vec<u8>,
    /// Ordinals of the top-level members holding a patched number.
    flagged: Vec<u32>,
    limits: Limits,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("limits", &self.limits)
            .field("tape_capacity", &self.tape.0.capacity())
            .field("raw_capacity", &self.raw.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// A byte range of the parsed buffer.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: usize,
    len: usize,
}

impl Span {
    /// The range of `s`, a string slice pointing into the buffer that starts at address `base`.
    fn of(s: &str, base: usize) -> Self {
        Self { start: s.as_ptr().addr().wrapping_sub(base), len: s.len() }
    }

    fn get(self, buf: &[u8]) -> Result<&str, DecodeFailure> {
        let end = self.start.checked_add(self.len).ok_or_else(internal)?;
        let bytes = buf.get(self.start..end).ok_or_else(internal)?;
        std::str::from_utf8(bytes).map_err(|_| internal())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Subscribe,
    Unsubscribe,
    Publish,
    Presence,
    History,
    Ping,
    Refresh,
}

/// What the tape said, with strings as spans: it outlives the tape.
#[derive(Debug)]
struct Parsed {
    kind: Kind,
    id: Option<u64>,
    channel: Span,
    since: Option<(u64, Span)>,
    limit: Option<u32>,
    token: Span,
    /// Offsets of the `"data"` key's opening quote and of the next top-level key's, if any.
    data_key: (usize, Option<usize>),
}

#[derive(Debug)]
enum Attempt {
    /// simd-json refused a number: worth the retry with patched numbers.
    Number(DecodeFailure),
    Failed(DecodeFailure),
}

impl Decoder {
    /// A decoder with the default [`Limits`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A decoder with the given limits.
    #[must_use]
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            buffers: Buffers::new(512),
            tape: Tape(Vec::with_capacity(64)),
            raw: Vec::with_capacity(512 + INPUT_PADDING),
            flagged: Vec::new(),
            limits,
        }
    }

    /// The limits this decoder enforces.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes one command from `payload`, the unmasked payload of a text frame.
    ///
    /// The payload is not modified: it is copied into the decoder, which parses (and unescapes) the copy
    /// in place. The returned command borrows its strings from the decoder and its `data` from the
    /// payload.
    ///
    /// # Errors
    /// A [`DecodeFailure`] carrying the command's `id` when it could be read. Never panics.
    pub fn decode<'a>(&'a mut self, payload: &'a [u8]) -> Result<Command<'a>, DecodeFailure> {
        let Self { buffers, tape, raw, flagged, limits } = self;
        let len = payload.len();
        copy_padded(raw, payload);
        let parsed = match parse(raw, len, buffers, tape, limits, None) {
            Ok(p) => p,
            Err(Attempt::Failed(f)) => return Err(f),
            Err(Attempt::Number(f)) => {
                // Stage 1 succeeded, so the structural indexes are those of the payload.
                copy_padded(raw, payload);
                flagged.clear();
                if !patch_numbers(&mut raw[..len], buffers.structural_indexes(), flagged) {
                    return Err(f);
                }
                match parse(raw, len, buffers, tape, limits, Some(flagged)) {
                    Ok(p) => p,
                    Err(Attempt::Failed(f) | Attempt::Number(f)) => return Err(f),
                }
            }
        };
        let raw: &'a Vec<u8> = raw;
        build(&parsed, raw, payload, buffers.structural_indexes(), limits)
    }
}

/// `raw` = `payload` followed by `INPUT_PADDING` zero bytes.
fn copy_padded(raw: &mut Vec<u8>, payload: &[u8]) {
    raw.clear();
    raw.reserve(payload.len() + INPUT_PADDING);
    raw.extend_from_slice(payload);
    raw.extend_from_slice(&[0; INPUT_PADDING]);
}

/// Parses `input[..len]` (padded after `len`) into the recycled tape and reads the command's fields off it.
/// `flagged` is `None` on the first attempt, and the ordinals of members holding patched numbers on the
/// retry.
fn parse(
    input: &mut [u8],
    len: usize,
    buffers: &mut Buffers,
    tape: &mut Tape<'static>,
    limits: &Limits,
    flagged: Option<&[u32]>,
) -> Result<Parsed, Attempt> {
    let base = input.as_ptr().addr();
    let mut t = std::mem::replace(tape, Tape(Vec::new())).reset();
    let res = match simd_json::fill_tape_padded(input, len, buffers, &mut t) {
        Ok(()) => read_fields(&t.0, base, limits, flagged.unwrap_or(&[])).map_err(Attempt::Failed),
        Err(e) => {
            let number = flagged.is_none() && matches!(e.error(), ErrorType::InvalidNumber);
            let f = fail(None, DecodeError::NotJson(e));
            Err(if number { Attempt::Number(f) } else { Attempt::Failed(f) })
        }
    };
    *tape = t.reset();
    res
}

/// A known top-level member: its ordinal among the members and the tape index of its value.
#[derive(Debug, Clone, Copy)]
struct Member {
    ordinal: u32,
    at: usize,
}

#[derive(Debug, Default)]
struct Members {
    ty: Option<Member>,
    id: Option<Member>,
    channel: Option<Member>,
    data: Option<Member>,
    since: Option<Member>,
    limit: Option<Member>,
    token: Option<Member>,
}

/// Number of tape nodes a value takes, itself included.
fn node_len(n: &Node<'_>) -> usize {
    match n {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// A non-negative integer.
fn uint(n: &Node<'_>) -> Option<u64> {
    match n {
        Node::Static(StaticNode::U64(v)) => Some(*v),
        Node::Static(StaticNode::I64(v)) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn is_null(n: &Node<'_>) -> bool {
    matches!(n, Node::Static(StaticNode::Null))
}

fn read_fields(nodes: &[Node<'_>], base: usize, limits: &Limits, flagged: &[u32]) -> Result<Parsed, DecodeFailure> {
    let Some(&Node::Object { len, .. }) = nodes.first() else {
        return Err(fail(None, DecodeError::NotAnObject));
    };
    let mut m = Members::default();
    // Offsets of the quote opening the (last) `"data"` key and of the key after it.
    let (mut data_key, mut after_data_key) = (0, None);
    let mut previous_was_data = false;
    let mut i = 1;
    for ordinal in 0..len {
        let Some(Node::String(key)) = nodes.get(i) else {
            return Err(internal());
        };
        let quote = Span::of(key, base).start.wrapping_sub(1);
        if previous_was_data {
            after_data_key = Some(quote);
        }
        previous_was_data = *key == "data";
        if previous_was_data {
            (data_key, after_data_key) = (quote, None);
        }
        let at = i + 1;
        let value = nodes.get(at).ok_or_else(internal)?;
        let slot = match *key {
            "type" => &mut m.ty,
            "id" => &mut m.id,
            "channel" => &mut m.channel,
            "data" => &mut m.data,
            "since" => &mut m.since,
            "limit" => &mut m.limit,
            "token" => &mut m.token,
            _ => {
                i = at + node_len(value);
                continue;
            }
        };
        *slot = Some(Member { ordinal: u32::try_from(ordinal).map_err(|_| internal())?, at });
        i = at + node_len(value);
    }
    let node = |m: Member| nodes.get(m.at).ok_or_else(internal);
    let patched = |m: Member| flagged.binary_search(&m.ordinal).is_ok();

    const NON_NEG: &str = "a non-negative integer";
    let id = match m.id {
        None => None,
        Some(mm) => {
            let n = node(mm)?;
            if is_null(n) {
                None
            } else {
                match uint(n) {
                    Some(v) if !patched(mm) => Some(v),
                    _ => return Err(fail(None, DecodeError::BadField { field: "id", expected: NON_NEG })),
                }
            }
        }
    };
    let err = |error| fail(id, error);

    let kind = match m.ty {
        None => return Err(err(DecodeError::MissingType)),
        Some(mm) => match node(mm)? {
            Node::String(s) => match *s {
                "subscribe" => Kind::Subscribe,
                "unsubscribe" => Kind::Unsubscribe,
                "publish" => Kind::Publish,
                "presence" => Kind::Presence,
                "history" => Kind::History,
                "ping" => Kind::Ping,
                "refresh" => Kind::Refresh,
                _ => return Err(err(DecodeError::UnknownType)),
            },
            _ => return Err(err(DecodeError::BadField { field: "type", expected: "a string" })),
        },
    };
    let mut parsed = Parsed {
        kind,
        id,
        channel: Span::default(),
        since: None,
        limit: None,
        token: Span::default(),
        data_key: (0, None),
    };

    if matches!(kind, Kind::Ping | Kind::Refresh) {
        if kind == Kind::Refresh {
            let mm = m.token.ok_or_else(|| err(DecodeError::MissingField("token")))?;
            let Node::String(token) = node(mm)? else {
                return Err(err(DecodeError::BadField { field: "token", expected: "a string" }));
            };
            if token.len() > limits.max_token_len {
                return Err(err(DecodeError::TooLarge { field: "token", max: limits.max_token_len }));
            }
            parsed.token = Span::of(token, base);
        }
        return Ok(parsed);
    }

    let mm = m.channel.ok_or_else(|| err(DecodeError::MissingField("channel")))?;
    let Node::String(channel) = node(mm)? else {
        return Err(err(DecodeError::BadField { field: "channel", expected: "a string" }));
    };
    parse_channel(channel, limits.max_channel_len).map_err(|e| err(DecodeError::BadChannel(e)))?;
    parsed.channel = Span::of(channel, base);

    match kind {
        Kind::Publish => {
            if m.data.is_none() {
                return Err(err(DecodeError::MissingField("data")));
            }
            parsed.data_key = (data_key, after_data_key);
        }
        Kind::Subscribe | Kind::History => {
            if let Some(mm) = m.since {
                let n = node(mm)?;
                if !is_null(n) {
                    if patched(mm) {
                        return Err(err(DecodeError::BadField { field: "since.offset", expected: NON_NEG }));
                    }
                    let since = nodes.get(mm.at..).ok_or_else(internal)?;
                    parsed.since = Some(read_since(since, base, limits).map_err(err)?);
                }
            }
            if kind == Kind::History {
                if let Some(mm) = m.limit {
                    let n = node(mm)?;
                    if !is_null(n) {
                        match uint(n).and_then(|v| u32::try_from(v).ok()) {
                            Some(v @ 1..=1000) if !patched(mm) => parsed.limit = Some(v),
                            _ => {
                                return Err(err(DecodeError::BadField {
                                    field: "limit",
                                    expected: "an integer in 1..=1000",
                                }))
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(parsed)
}

/// Reads `since` from the tape slice starting at its value.
fn read_since(nodes: &[Node<'_>], base: usize, limits: &Limits) -> Result<(u64, Span), DecodeError> {
    let Some(&Node::Object { len, .. }) = nodes.first() else {
        return Err(DecodeError::BadField { field: "since", expected: "an object with \"offset\" and \"epoch\"" });
    };
    let (mut offset, mut epoch) = (None, None);
    let mut i = 1;
    for _ in 0..len {
        let (Some(Node::String(key)), Some(value)) = (nodes.get(i), nodes.get(i + 1)) else {
            return Err(internal().error);
        };
        match *key {
            "offset" => offset = Some(value),
            "epoch" => epoch = Some(value),
            _ => {}
        }
        i += 1 + node_len(value);
    }
    let offset = uint(offset.ok_or(DecodeError::MissingField("since.offset"))?)
        .ok_or(DecodeError::BadField { field: "since.offset", expected: "a non-negative integer" })?;
    let Node::String(epoch) = epoch.ok_or(DecodeError::MissingField("since.epoch"))? else {
        return Err(DecodeError::BadField { field: "since.epoch", expected: "a string" });
    };
    if epoch.len() > limits.max_epoch_len {
        return Err(DecodeError::TooLarge { field: "since.epoch", max: limits.max_epoch_len });
    }
    Ok((offset, Span::of(epoch, base)))
}

/// Builds the command from the parsed fields: strings out of `strings` (the parsed buffer), `data` out of
/// `src` (the unmodified bytes) located through the structural indexes.
fn build<'a>(
    p: &Parsed,
    strings: &'a [u8],
    src: &'a [u8],
    structurals: &[u32],
    limits: &Limits,
) -> Result<Command<'a>, DecodeFailure> {
    let id = p.id;
    Ok(match p.kind {
        Kind::Ping => Command::Ping { id },
        Kind::Refresh => Command::Refresh { id, token: p.token.get(strings)? },
        Kind::Unsubscribe => Command::Unsubscribe { id, channel: p.channel.get(strings)? },
        Kind::Presence => Command::Presence { id, channel: p.channel.get(strings)? },
        Kind::Subscribe => Command::Subscribe { id, channel: p.channel.get(strings)?, since: since(p, strings)? },
        Kind::History => {
            Command::History { id, channel: p.channel.get(strings)?, since: since(p, strings)?, limit: p.limit }
        }
        Kind::Publish => {
            let (key, next_key) = p.data_key;
            let data = member_value(src, structurals, key, next_key).ok_or_else(internal)?;
            if data.len() > limits.max_data_bytes {
                return Err(fail(id, DecodeError::TooLarge { field: "data", max: limits.max_data_bytes }));
            }
            Command::Publish { id, channel: p.channel.get(strings)?, data }
        }
    })
}

fn since<'a>(p: &Parsed, strings: &'a [u8]) -> Result<Option<Since<'a>>, DecodeFailure> {
    p.since.map(|(offset, epoch)| Ok(Since { offset, epoch: epoch.get(strings)? })).transpose()
}

/// A byte that can occur in a JSON number.
fn is_number_byte(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The raw text of the value of the top-level member whose key's opening quote is at `key`, in `src`, a
/// valid JSON object whose structural indexes are `structurals`; `next_key` is where the next member's key
/// opens, `None` for the last member. Trailing whitespace is trimmed. `None` if the indexes do not say
/// what they should (never for a document simd-json accepted).
fn member_value<'a>(src: &'a [u8], structurals: &[u32], key: usize, next_key: Option<usize>) -> Option<&'a [u8]> {
    let at = |i: usize| structurals.get(i).map(|&p| p as usize);
    let find = |pos: usize| {
        let pos = u32::try_from(pos).ok()?;
        structurals.binary_search(&pos).ok()
    };
    let k = find(key)?;
    // `"data"` `:` value
    if src.get(at(k + 1)?) != Some(&b':') {
        return None;
    }
    let start = at(k + 2)?;
    let end = match next_key {
        Some(next) => at(find(next)?.checked_sub(1)?)?,
        None => at(structurals.len().checked_sub(1)?)?,
    };
    if !matches!(src.get(end), Some(b',' | b'}')) {
        return None;
    }
    let value = src.get(start..end)?;
    let trimmed = value.len() - value.iter().rev().take_while(|&&b| is_ws(b)).count();
    value.get(..trimmed)
}

/// Overwrites with `0` and spaces every number in `buf` that simd-json refuses though it is valid JSON
/// (see [`out_of_range`]), keeping every byte offset. Records in `flagged` the ordinal of the top-level
/// member each was found in. Returns whether anything was patched.
fn patch_numbers(buf: &mut [u8], structurals: &[u32], flagged: &mut Vec<u32>) -> bool {
    let mut depth = 0usize;
    let mut member = 0u32;
    let mut any = false;
    for &p in structurals {
        let p = p as usize;
        let Some(&b) = buf.get(p) else { break };
        match b {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => member = member.saturating_add(1),
            b'-' | b'0'..=b'9' => {
                // The token is the run of number characters from here: O(its length), and runs starting
                // at different structural indexes never overlap (an index marks a value's first byte, and
                // a run holds no whitespace or structural character), so the whole loop is O(n). Scanning
                // to the next delimiter instead was quadratic on `[1[1[1[...` (issue 9).
                let rest = &buf[p..];
                let len = rest.iter().position(|&c| !is_number_byte(c)).unwrap_or(rest.len());
                if out_of_range(&rest[..len]) {
                    buf[p] = b'0';
                    buf[p + 1..p + len].fill(b' ');
                    any = true;
                    // Members come in order: `flagged` stays sorted and free of repeats.
                    if flagged.last() != Some(&member) {
                        flagged.push(member);
                    }
                }
            }
            _ => {}
        }
    }
    any
}

/// Whether `tok` is a valid JSON number that simd-json may refuse: an integer beyond `i64`/`u64`, a float
/// that overflows `f64`, or an exponent of four or more digits. Invalid numbers are left to simd-json.
fn out_of_range(tok: &[u8]) -> bool {
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut i = usize::from(tok.first() == Some(&b'-'));
    let int = digits(&tok[i..]);
    if int == 0 || (int > 1 && tok[i] == b'0') {
        return false;
    }
    i += int;
    let mut float = false;
    if tok.get(i) == Some(&b'.') {
        let frac = digits(&tok[i + 1..]);
        if frac == 0 {
            return false;
        }
        i += 1 + frac;
        float = true;
    }
    let mut long_exponent = false;
    if matches!(tok.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(tok.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(&tok[i..]);
        if exp == 0 {
            return false;
        }
        let significant = tok[i..i + exp].iter().skip_while(|&&b| b == b'0').count();
        long_exponent = significant > 3;
        i += exp;
        float = true;
    }
    if i != tok.len() {
        return false;
    }
    // ASCII digits and signs only, so always UTF-8.
    let Ok(s) = std::str::from_utf8(tok) else {
        return false;
    };
    if !float {
        return if s.starts_with('-') { s.parse::<i64>().is_err() } else { s.parse::<u64>().is_err() };
    }
    long_exponent || s.parse::<f64>().map_or(true, f64::is_infinite)
}
