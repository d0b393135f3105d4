//! Encoders: server messages (and, for the load generator and tests, client commands) written as JSON text.
//!
//! Every encoder **appends** one JSON object to the caller's `Vec<u8>` and allocates nothing else (the
//! `Vec` itself may grow). `data` values are spliced raw: the caller hands the JSON text it got from the
//! publisher, which must be one valid JSON value (as [`Decoder`](super::Decoder) returns it).

use super::{Command, Since};

// JSON strings are written by the one escaper the crate has (also used for HTTP rejection bodies).
pub(crate) use crate::handshake::{json_str_len, write_json_str as json_str};

/// Two ASCII digits for every number 0..100.
const DIGITS2: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appends the decimal digits of `n`.
pub(crate) fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    while n >= 100 {
        let d = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGITS2[d..d + 2]);
    }
    if n >= 10 {
        let d = n as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGITS2[d..d + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + n as u8;
    }
    out.extend_from_slice(&buf[i..]);
}

/// Number of decimal digits of `n`.
pub(crate) fn u64_len(n: u64) -> usize {
    match n.checked_ilog10() {
        Some(l) => l as usize + 1,
        None => 1,
    }
}

/// Appends `,"key":` (`key` is a literal that needs no escaping).
#[inline]
fn key(out: &mut Vec<u8>, k: &[u8]) {
    out.push(b',');
    out.push(b'"');
    out.extend_from_slice(k);
    out.extend_from_slice(b"\":");
}

/// Appends `{"type":"<ty>"`.
#[inline]
fn open(out: &mut Vec<u8>, ty: &[u8]) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(ty);
    out.push(b'"');
}

/// Appends `,"id":N` when there is an id.
#[inline]
fn opt_id(out: &mut Vec<u8>, id: Option<u64>) {
    if let Some(id) = id {
        key(out, b"id");
        write_u64(out, id);
    }
}

#[inline]
fn bool_lit(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// `{"type":"welcome","client":"<client>","user":"<user>","ping_interval":25,"version":1}`, the first
/// message after the upgrade. `version` is the wire protocol version, [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
pub fn encode_welcome(out: &mut Vec<u8>, client: &str, user: &str, ping_interval: u32) {
    open(out, b"welcome");
    key(out, b"client");
    json_str(out, client);
    key(out, b"user");
    json_str(out, user);
    key(out, b"ping_interval");
    write_u64(out, u64::from(ping_interval));
    key(out, b"version");
    write_u64(out, u64::from(super::PROTOCOL_VERSION));
    out.push(b'}');
}

/// `{"type":"subscribed","id":1,"channel":"room:42","offset":20,"epoch":"e1","recovered":true}`: the reply
/// to `subscribe`, with the channel's current offset and epoch; `recovered` says whether every message
/// since the client's `since` position follows (it is `false` when there was no `since`).
pub fn encode_subscribed(out: &mut Vec<u8>, id: Option<u64>, channel: &str, offset: u64, epoch: &str, recovered: bool) {
    open(out, b"subscribed");
    opt_id(out, id);
    key(out, b"channel");
    json_str(out, channel);
    key(out, b"offset");
    write_u64(out, offset);
    key(out, b"epoch");
    json_str(out, epoch);
    key(out, b"recovered");
    bool_lit(out, recovered);
    out.push(b'}');
}

/// `{"type":"unsubscribed","id":2,"channel":"room:42"}`: the reply to `unsubscribe`.
pub fn encode_unsubscribed(out: &mut Vec<u8>, id: Option<u64>, channel: &str) {
    open(out, b"unsubscribed");
    opt_id(out, id);
    key(out, b"channel");
    json_str(out, channel);
    out.push(b'}');
}

const MESSAGE_HEAD: &[u8] = b"{\"type\":\"message\",\"channel\":";
const MESSAGE_OFFSET: &[u8] = b",\"offset\":";
const MESSAGE_DATA: &[u8] = b",\"data\":";

/// `{"type":"message","channel":"room:42","offset":21,"data":<data_raw>}`: one published message as every
/// subscriber receives it. `data_raw` is the publisher's JSON text, spliced as is (it must be one valid JSON
/// value). Exactly [`message_len`] bytes are appended, and at most one growth of `out` happens.
pub fn encode_message(out: &mut Vec<u8>, channel: &str, offset: u64, data_raw: &[u8]) {
    out.reserve(message_len(channel, offset, data_raw));
    out.extend_from_slice(MESSAGE_HEAD);
    json_str(out, channel);
    out.extend_from_slice(MESSAGE_OFFSET);
    write_u64(out, offset);
    out.extend_from_slice(MESSAGE_DATA);
    out.extend_from_slice(data_raw);
    out.push(b'}');
}

/// The exact number of bytes [`encode_message`] appends for these arguments, so that a caller can write a
/// frame header in front of the body before encoding it.
#[must_use]
pub fn message_len(channel: &str, offset: u64, data_raw: &[u8]) -> usize {
    MESSAGE_HEAD.len()
        + json_str_len(channel)
        + MESSAGE_OFFSET.len()
        + u64_len(offset)
        + MESSAGE_DATA.len()
        + data_raw.len()
        + 1
}

/// `{"type":"published","id":3,"offset":21}`: the reply to `publish`, with the offset the message got.
pub fn encode_published(out: &mut Vec<u8>, id: Option<u64>, offset: u64) {
    open(out, b"published");
    opt_id(out, id);
    key(out, b"offset");
    write_u64(out, offset);
    out.push(b'}');
}

/// `{"type":"pong","id":6}`: the reply to the application-level `ping`.
pub fn encode_pong(out: &mut Vec<u8>, id: Option<u64>) {
    open(out, b"pong");
    opt_id(out, id);
    out.push(b'}');
}

/// `{"type":"error","id":3,"code":"forbidden","reason":"..."}`: a refused command; the connection stays
/// open. `code` is a short machine-readable code (such as [`DecodeFailure::code`](super::DecodeFailure::code)),
/// `reason` a human explanation.
pub fn encode_error(out: &mut Vec<u8>, id: Option<u64>, code: &str, reason: &str) {
    open(out, b"error");
    opt_id(out, id);
    key(out, b"code");
    json_str(out, code);
    key(out, b"reason");
    json_str(out, reason);
    out.push(b'}');
}

/// `{"type":"presence","id":4,"channel":"room:42","count":3,"users":[{"user":"a","connections":2},...]}`:
/// the reply to `presence`. `count` is the number of connections subscribed; `users` lists each distinct
/// user with how many of its connections are subscribed (the list may be truncated by the caller, `count`
/// stays exact).
///
/// `truncated` (written only when true) says the list was cut short of `count`'s users by a bound.
pub fn encode_presence<'u>(
    out: &mut Vec<u8>,
    id: Option<u64>,
    channel: &str,
    count: u64,
    users: impl IntoIterator<Item = (&'u str, u32)>,
    truncated: bool,
) {
    open(out, b"presence");
    opt_id(out, id);
    key(out, b"channel");
    json_str(out, channel);
    key(out, b"count");
    write_u64(out, count);
    if truncated {
        key(out, b"truncated");
        bool_lit(out, true);
    }
    key(out, b"users");
    out.push(b'[');
    for (i, (user, connections)) in users.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user\":");
        json_str(out, user);
        key(out, b"connections");
        write_u64(out, u64::from(connections));
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// `{"type":"history","id":5,"channel":"room:42","offset":40,"epoch":"e1","recovered":true,
/// "messages":[{"offset":17,"data":<raw>},...]}`: the reply to `history`. `offset_now` and `epoch` are the
/// channel's current position; `recovered` (omitted when `None`) says whether the messages are complete
/// since the client's `since`; `truncated` (written only when true) says older messages that `limit`
/// allowed were left out by a size bound; each message's `data` is spliced raw.
#[allow(clippy::too_many_arguments)]
pub fn encode_history<'m>(
    out: &mut Vec<u8>,
    id: Option<u64>,
    channel: &str,
    offset_now: u64,
    epoch: &str,
    messages: impl IntoIterator<Item = (u64, &'m [u8])>,
    recovered: Option<bool>,
    truncated: bool,
) {
    open(out, b"history");
    opt_id(out, id);
    key(out, b"channel");
    json_str(out, channel);
    key(out, b"offset");
    write_u64(out, offset_now);
    key(out, b"epoch");
    json_str(out, epoch);
    if let Some(r) = recovered {
        key(out, b"recovered");
        bool_lit(out, r);
    }
    if truncated {
        key(out, b"truncated");
        bool_lit(out, true);
    }
    key(out, b"messages");
    out.push(b'[');
    for (i, (offset, data)) in messages.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"offset\":");
        write_u64(out, offset);
        key(out, b"data");
        out.extend_from_slice(data);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// `{"type":"gap","channel":"room:42","from":18,"to":40}`: told to a slow consumer that the messages with
/// offsets `from..=to` of the channel were dropped for it; it must recover them (`history` with `since`)
/// or resubscribe.
pub fn encode_gap(out: &mut Vec<u8>, channel: &str, from_offset: u64, to_offset: u64) {
    open(out, b"gap");
    key(out, b"channel");
    json_str(out, channel);
    key(out, b"from");
    write_u64(out, from_offset);
    key(out, b"to");
    write_u64(out, to_offset);
    out.push(b'}');
}

/// `{"type":"refreshed","id":7,"expires":1700000000}`: the reply to `refresh`; `expires` (Unix seconds,
/// omitted when the new token does not expire) is when the connection's new token runs out.
pub fn encode_refreshed(out: &mut Vec<u8>, id: Option<u64>, expires: Option<u64>) {
    open(out, b"refreshed");
    opt_id(out, id);
    if let Some(e) = expires {
        key(out, b"expires");
        write_u64(out, e);
    }
    out.push(b'}');
}

/// Client side: appends `cmd` as the JSON text a client sends, e.g.
/// `{"type":"publish","id":3,"channel":"room:42","data":{"x":1}}`. Used by the load generator and the
/// tests; the output decodes back to an equal command with [`Decoder`](super::Decoder).
pub fn encode_command(out: &mut Vec<u8>, cmd: &Command<'_>) {
    fn since(out: &mut Vec<u8>, s: Option<&Since<'_>>) {
        if let Some(s) = s {
            key(out, b"since");
            out.extend_from_slice(b"{\"offset\":");
            write_u64(out, s.offset);
            key(out, b"epoch");
            json_str(out, s.epoch);
            out.push(b'}');
        }
    }
    match cmd {
        Command::Subscribe { id, channel, since: s } => {
            open(out, b"subscribe");
            opt_id(out, *id);
            key(out, b"channel");
            json_str(out, channel);
            since(out, s.as_ref());
        }
        Command::Unsubscribe { id, channel } => {
            open(out, b"unsubscribe");
            opt_id(out, *id);
            key(out, b"channel");
            json_str(out, channel);
        }
        Command::Publish { id, channel, data } => {
            open(out, b"publish");
            opt_id(out, *id);
            key(out, b"channel");
            json_str(out, channel);
            key(out, b"data");
            out.extend_from_slice(data);
        }
        Command::Presence { id, channel } => {
            open(out, b"presence");
            opt_id(out, *id);
            key(out, b"channel");
            json_str(out, channel);
        }
        Command::History { id, channel, since: s, limit } => {
            open(out, b"history");
            opt_id(out, *id);
            key(out, b"channel");
            json_str(out, channel);
            since(out, s.as_ref());
            if let Some(l) = limit {
                key(out, b"limit");
                write_u64(out, u64::from(*l));
            }
        }
        Command::Ping { id } => {
            open(out, b"ping");
            opt_id(out, *id);
        }
        Command::Refresh { id, token } => {
            open(out, b"refresh");
            opt_id(out, *id);
            key(out, b"token");
            json_str(out, token);
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(out: &[u8]) -> Value {
        serde_json::from_slice(out).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {}", String::from_utf8_lossy(out));
        })
    }

    #[test]
    fn integers() {
        for n in [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 12345, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(u64_len(n), out.len());
        }
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            for n in [p - 1, p, p + 1, next - 1] {
                let mut out = Vec::new();
                write_u64(&mut out, n);
                assert_eq!(out, n.to_string().as_bytes());
                assert_eq!(u64_len(n), out.len());
            }
            p = next;
        }
    }

    #[test]
    fn strings_escape() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        for s in [
            "",
            "plain",
            "q\"uote",
            "back\\slash",
            "\u{7f}\u{e9}\u{1f600}",
            "\u{2028}",
            all_controls.as_str(),
            "end\\",
            "\"",
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(out.len(), json_str_len(s));
            assert_eq!(parse(&out), Value::String(s.to_owned()), "{s:?}");
        }
        let mut out = Vec::new();
        json_str(&mut out, "a\u{1}\n");
        assert_eq!(out, br#""a\u0001\u000a""#);
    }

    #[test]
    fn welcome() {
        let mut out = Vec::new();
        encode_welcome(&mut out, "c-1", "al\"ice", 25);
        assert_eq!(
            parse(&out),
            json!({"type":"welcome","client":"c-1","user":"al\"ice","ping_interval":25,"version":1})
        );
    }

    #[test]
    fn subscribed_and_unsubscribed() {
        let mut out = Vec::new();
        encode_subscribed(&mut out, Some(1), "room:42", 20, "e1", true);
        assert_eq!(
            out,
            br#"{"type":"subscribed","id":1,"channel":"room:42","offset":20,"epoch":"e1","recovered":true}"#
        );
        out.clear();
        encode_subscribed(&mut out, None, "room:42", 0, "", false);
        assert_eq!(
            parse(&out),
            json!({"type":"subscribed","channel":"room:42","offset":0,"epoch":"","recovered":false})
        );
        out.clear();
        encode_unsubscribed(&mut out, Some(2), "room:42");
        assert_eq!(parse(&out), json!({"type":"unsubscribed","id":2,"channel":"room:42"}));
        out.clear();
        encode_unsubscribed(&mut out, None, "x");
        assert_eq!(parse(&out), json!({"type":"unsubscribed","channel":"x"}));
    }

    #[test]
    fn message_and_len() {
        let mut out = b"prefix".to_vec();
        let data = br#"{"t":"x\"y\\u00e9","n":[1,2.50,-0]}"#;
        encode_message(&mut out, "room:42", 21, data);
        let body = &out[6..];
        assert_eq!(body.len(), message_len("room:42", 21, data));
        assert_eq!(
            body,
            &br#"{"type":"message","channel":"room:42","offset":21,"data":{"t":"x\"y\\u00e9","n":[1,2.50,-0]}}"#[..]
        );
        assert_eq!(
            parse(body),
            json!({"type":"message","channel":"room:42","offset":21,"data":{"t":"x\"y\\u00e9","n":[1,2.5,-0.0]}})
        );
        for (ch, off, d) in [("a", 0u64, &b"null"[..]), ("we\"ird\n", u64::MAX, b"\"s\""), ("", 9, b"[]")] {
            let mut out = Vec::new();
            encode_message(&mut out, ch, off, d);
            assert_eq!(out.len(), message_len(ch, off, d));
            let v = parse(&out);
            assert_eq!(v["channel"], json!(ch));
            assert_eq!(v["offset"], json!(off));
        }
    }

    #[test]
    fn published_pong_error_refreshed() {
        let mut out = Vec::new();
        encode_published(&mut out, Some(3), 21);
        assert_eq!(parse(&out), json!({"type":"published","id":3,"offset":21}));
        out.clear();
        encode_published(&mut out, None, 0);
        assert_eq!(parse(&out), json!({"type":"published","offset":0}));
        out.clear();
        encode_pong(&mut out, Some(6));
        assert_eq!(out, br#"{"type":"pong","id":6}"#);
        out.clear();
        encode_pong(&mut out, None);
        assert_eq!(out, br#"{"type":"pong"}"#);
        out.clear();
        encode_error(&mut out, Some(3), "forbidden", "no \"publish\" here\n");
        assert_eq!(parse(&out), json!({"type":"error","id":3,"code":"forbidden","reason":"no \"publish\" here\n"}));
        out.clear();
        encode_error(&mut out, None, "bad_json", "");
        assert_eq!(parse(&out), json!({"type":"error","code":"bad_json","reason":""}));
        out.clear();
        encode_refreshed(&mut out, Some(7), Some(1_700_000_000));
        assert_eq!(parse(&out), json!({"type":"refreshed","id":7,"expires":1_700_000_000u64}));
        out.clear();
        encode_refreshed(&mut out, None, None);
        assert_eq!(parse(&out), json!({"type":"refreshed"}));
    }

    #[test]
    fn presence() {
        let mut out = Vec::new();
        encode_presence(&mut out, Some(4), "room:42", 3, [("a", 2u32), ("b\\", 1)], false);
        assert_eq!(
            parse(&out),
            json!({"type":"presence","id":4,"channel":"room:42","count":3,
                   "users":[{"user":"a","connections":2},{"user":"b\\","connections":1}]})
        );
        out.clear();
        encode_presence(&mut out, None, "x", 0, std::iter::empty(), false);
        assert_eq!(parse(&out), json!({"type":"presence","channel":"x","count":0,"users":[]}));
        out.clear();
        encode_presence(&mut out, None, "x", 5, [("a", 1u32)], true);
        assert_eq!(
            parse(&out),
            json!({"type":"presence","channel":"x","count":5,"truncated":true,"users":[{"user":"a","connections":1}]})
        );
    }

    #[test]
    fn history() {
        let mut out = Vec::new();
        let msgs: [(u64, &[u8]); 2] = [(17, br#"{"a":1}"#), (18, b"\"two\"")];
        encode_history(&mut out, Some(5), "room:42", 40, "e1", msgs, Some(true), false);
        assert_eq!(
            parse(&out),
            json!({"type":"history","id":5,"channel":"room:42","offset":40,"epoch":"e1","recovered":true,
                   "messages":[{"offset":17,"data":{"a":1}},{"offset":18,"data":"two"}]})
        );
        out.clear();
        encode_history(&mut out, None, "c", 0, "e", std::iter::empty(), None, false);
        assert_eq!(parse(&out), json!({"type":"history","channel":"c","offset":0,"epoch":"e","messages":[]}));
        out.clear();
        encode_history(&mut out, None, "c", 9, "e", [(9, &b"1"[..])], Some(false), true);
        assert_eq!(
            parse(&out),
            json!({"type":"history","channel":"c","offset":9,"epoch":"e","recovered":false,"truncated":true,
                   "messages":[{"offset":9,"data":1}]})
        );
    }

    #[test]
    fn gap() {
        let mut out = Vec::new();
        encode_gap(&mut out, "room:42", 18, 40);
        assert_eq!(out, br#"{"type":"gap","channel":"room:42","from":18,"to":40}"#);
    }

    #[test]
    fn commands() {
        let cases: [(Command<'_>, Value); 7] = [
            (
                Command::Subscribe {
                    id: Some(1),
                    channel: "room:42",
                    since: Some(Since { offset: 17, epoch: "e\"1" }),
                },
                json!({"type":"subscribe","id":1,"channel":"room:42","since":{"offset":17,"epoch":"e\"1"}}),
            ),
            (Command::Unsubscribe { id: None, channel: "a" }, json!({"type":"unsubscribe","channel":"a"})),
            (
                Command::Publish { id: Some(3), channel: "a:b", data: br#"[1, {"x": null}]"# },
                json!({"type":"publish","id":3,"channel":"a:b","data":[1,{"x":null}]}),
            ),
            (Command::Presence { id: Some(4), channel: "p" }, json!({"type":"presence","id":4,"channel":"p"})),
            (
                Command::History { id: Some(5), channel: "h:1", since: None, limit: Some(100) },
                json!({"type":"history","id":5,"channel":"h:1","limit":100}),
            ),
            (Command::Ping { id: Some(6) }, json!({"type":"ping","id":6})),
            (Command::Refresh { id: None, token: "t\\k" }, json!({"type":"refresh","token":"t\\k"})),
        ];
        for (cmd, want) in cases {
            let mut out = Vec::new();
            encode_command(&mut out, &cmd);
            assert_eq!(parse(&out), want);
        }
    }
}
