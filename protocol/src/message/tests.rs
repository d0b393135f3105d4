//! Decoder tests: literals for every command and error, the raw `data` splice, and property tests.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn decode(json: &str) -> Result<Command<'static>, DecodeFailure> {
    // Leaked so that the command can outlive the call: tests only.
    let decoder: &'static mut Decoder = Box::leak(Box::new(Decoder::new()));
    let payload: &'static [u8] = Box::leak(json.as_bytes().to_vec().into_boxed_slice());
    decoder.decode(payload)
}

fn err(json: &str) -> DecodeFailure {
    match decode(json) {
        Ok(c) => panic!("{json} decoded as {c:?}"),
        Err(e) => e,
    }
}

fn data_of(json: &str) -> &'static [u8] {
    match decode(json) {
        Ok(Command::Publish { data, .. }) => data,
        other => panic!("{json}: {other:?}"),
    }
}

#[test]
fn every_command() {
    assert_eq!(
        decode(r#"{"type":"subscribe","id":1,"channel":"room:42","since":{"offset":17,"epoch":"e1"}}"#),
        Ok(Command::Subscribe { id: Some(1), channel: "room:42", since: Some(Since { offset: 17, epoch: "e1" }) })
    );
    assert_eq!(
        decode(r#"{"type":"subscribe","channel":"lobby"}"#),
        Ok(Command::Subscribe { id: None, channel: "lobby", since: None })
    );
    assert_eq!(
        decode(r#"{"type":"unsubscribe","id":2,"channel":"room:42"}"#),
        Ok(Command::Unsubscribe { id: Some(2), channel: "room:42" })
    );
    assert_eq!(
        decode(r#"{"type":"publish","id":3,"channel":"room:42","data":{"text":"hi","n":[1,2]}}"#),
        Ok(Command::Publish { id: Some(3), channel: "room:42", data: br#"{"text":"hi","n":[1,2]}"# })
    );
    assert_eq!(
        decode(r#"{"type":"presence","id":4,"channel":"room:42"}"#),
        Ok(Command::Presence { id: Some(4), channel: "room:42" })
    );
    assert_eq!(
        decode(r#"{"type":"history","id":5,"channel":"room:42","since":{"offset":0,"epoch":""},"limit":100}"#),
        Ok(Command::History {
            id: Some(5),
            channel: "room:42",
            since: Some(Since { offset: 0, epoch: "" }),
            limit: Some(100)
        })
    );
    assert_eq!(
        decode(r#"{"type":"history","channel":"h"}"#),
        Ok(Command::History { id: None, channel: "h", since: None, limit: None })
    );
    assert_eq!(decode(r#"{"type":"ping","id":6}"#), Ok(Command::Ping { id: Some(6) }));
    assert_eq!(decode(r#"{"type":"ping"}"#), Ok(Command::Ping { id: None }));
    assert_eq!(
        decode(r#"{"type":"refresh","id":7,"token":"abc.def.ghi"}"#),
        Ok(Command::Refresh { id: Some(7), token: "abc.def.ghi" })
    );
}

#[test]
fn command_accessors() {
    let c = decode(r#"{"type":"publish","id":3,"channel":"a:b","data":1}"#).unwrap();
    assert_eq!(c.id(), Some(3));
    assert_eq!(c.channel(), Some("a:b"));
    assert_eq!(c.type_name(), "publish");
    let c = decode(r#"{"type":"refresh","token":"t"}"#).unwrap();
    assert_eq!((c.id(), c.channel(), c.type_name()), (None, None, "refresh"));
}

#[test]
fn ids() {
    assert_eq!(decode(r#"{"type":"ping","id":18446744073709551615}"#), Ok(Command::Ping { id: Some(u64::MAX) }));
    assert_eq!(decode(r#"{"type":"ping","id":0}"#), Ok(Command::Ping { id: Some(0) }));
    assert_eq!(decode(r#"{"type":"ping","id":-0}"#), Ok(Command::Ping { id: Some(0) }));
    assert_eq!(decode(r#"{"type":"ping","id":null}"#), Ok(Command::Ping { id: None }));
    let bad_id = DecodeError::BadField { field: "id", expected: "a non-negative integer" };
    for json in [
        r#"{"type":"ping","id":-1}"#,
        r#"{"type":"ping","id":1.5}"#,
        r#"{"type":"ping","id":1.0}"#,
        r#"{"type":"ping","id":"1"}"#,
        r#"{"type":"ping","id":[1]}"#,
        r#"{"type":"ping","id":true}"#,
        r#"{"type":"ping","id":18446744073709551616}"#,
        r#"{"type":"ping","id":1e400}"#,
    ] {
        let e = err(json);
        assert_eq!(e.id, None, "{json}");
        assert_eq!(e.error, bad_id, "{json}");
        assert_eq!(e.code(), "bad_request");
    }
}

#[test]
fn errors_carry_the_id() {
    let cases: &[(&str, Option<u64>, DecodeError, &str)] = &[
        (r#"{"type":"sub"#, None, DecodeError::NotAnObject, "bad_json"),
        (r#"[1,2]"#, None, DecodeError::NotAnObject, "bad_request"),
        (r#""str""#, None, DecodeError::NotAnObject, "bad_request"),
        (r#"{"id":9}"#, Some(9), DecodeError::MissingType, "bad_request"),
        (r#"{"id":9,"type":3}"#, Some(9), DecodeError::BadField { field: "type", expected: "a string" }, "bad_request"),
        (r#"{"type":"subscribed","id":10}"#, Some(10), DecodeError::UnknownType, "unknown_command"),
        (r#"{"type":"subscribe","id":11}"#, Some(11), DecodeError::MissingField("channel"), "bad_request"),
        (r#"{"type":"publish","id":12,"channel":"a:b"}"#, Some(12), DecodeError::MissingField("data"), "bad_request"),
        (r#"{"type":"refresh","id":13}"#, Some(13), DecodeError::MissingField("token"), "bad_request"),
        (
            r#"{"type":"refresh","id":13,"token":5}"#,
            Some(13),
            DecodeError::BadField { field: "token", expected: "a string" },
            "bad_request",
        ),
        (
            r#"{"type":"presence","id":14,"channel":42}"#,
            Some(14),
            DecodeError::BadField { field: "channel", expected: "a string" },
            "bad_request",
        ),
        (
            r#"{"type":"presence","id":15,"channel":"a b"}"#,
            Some(15),
            DecodeError::BadChannel(ChannelError::BadChar(' ')),
            "bad_channel",
        ),
        (
            r#"{"type":"unsubscribe","id":16,"channel":""}"#,
            Some(16),
            DecodeError::BadChannel(ChannelError::Empty),
            "bad_channel",
        ),
        (
            r#"{"type":"subscribe","id":17,"channel":"a","since":5}"#,
            Some(17),
            DecodeError::BadField { field: "since", expected: "an object with \"offset\" and \"epoch\"" },
            "bad_request",
        ),
        (
            r#"{"type":"subscribe","id":18,"channel":"a","since":{"epoch":"e"}}"#,
            Some(18),
            DecodeError::MissingField("since.offset"),
            "bad_request",
        ),
        (
            r#"{"type":"subscribe","id":19,"channel":"a","since":{"offset":1}}"#,
            Some(19),
            DecodeError::MissingField("since.epoch"),
            "bad_request",
        ),
        (
            r#"{"type":"history","id":20,"channel":"a","since":{"offset":-1,"epoch":"e"}}"#,
            Some(20),
            DecodeError::BadField { field: "since.offset", expected: "a non-negative integer" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":21,"channel":"a","since":{"offset":1,"epoch":1}}"#,
            Some(21),
            DecodeError::BadField { field: "since.epoch", expected: "a string" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":22,"channel":"a","limit":0}"#,
            Some(22),
            DecodeError::BadField { field: "limit", expected: "an integer in 1..=1000" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":23,"channel":"a","limit":1001}"#,
            Some(23),
            DecodeError::BadField { field: "limit", expected: "an integer in 1..=1000" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":24,"channel":"a","limit":"5"}"#,
            Some(24),
            DecodeError::BadField { field: "limit", expected: "an integer in 1..=1000" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":25,"channel":"a","limit":4294967297}"#,
            Some(25),
            DecodeError::BadField { field: "limit", expected: "an integer in 1..=1000" },
            "bad_request",
        ),
        (
            r#"{"type":"history","id":26,"channel":"a","limit":1e400}"#,
            Some(26),
            DecodeError::BadField { field: "limit", expected: "an integer in 1..=1000" },
            "bad_request",
        ),
        (
            r#"{"type":"subscribe","id":27,"channel":"a","since":{"offset":18446744073709551616,"epoch":"e"}}"#,
            Some(27),
            DecodeError::BadField { field: "since.offset", expected: "a non-negative integer" },
            "bad_request",
        ),
    ];
    for (json, id, error, code) in cases {
        let e = err(json);
        assert_eq!(e.id, *id, "{json}");
        if *code == "bad_json" {
            assert!(matches!(e.error, DecodeError::NotJson(_)), "{json}: {e:?}");
        } else {
            assert_eq!(&e.error, error, "{json}");
        }
        assert_eq!(e.code(), *code, "{json}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn not_json() {
    for json in [
        "",
        " ",
        "{",
        "}",
        r#"{"type":"ping",}"#,
        r#"{"type":"ping"} x"#,
        r#"{"type":'ping'}"#,
        r#"{"type":"ping","id":01}"#,
        r#"{"type":"ping","x":1.}"#,
        r#"{"type":"ping","x":-}"#,
        r#"{"type":"ping","x":"\x"}"#,
        r#"{"type":"ping","x":"a	b"}"#,
        "{\"type\":\"ping\",\"x\":\"\u{0}\"}",
    ] {
        let e = err(json);
        assert!(matches!(e.error, DecodeError::NotJson(_)), "{json:?}: {e:?}");
        assert_eq!((e.id, e.code()), (None, "bad_json"), "{json:?}");
    }
    let mut d = Decoder::new();
    let invalid_utf8 = b"{\"type\":\"ping\",\"x\":\"\xff\"}".to_vec();
    assert_eq!(d.decode(&invalid_utf8).unwrap_err().code(), "bad_json");
}

#[test]
fn too_large() {
    let limits = Limits { max_data_bytes: 8, max_channel_len: 5, max_token_len: 3, max_epoch_len: 2 };
    let mut d = Decoder::with_limits(limits);
    assert_eq!(d.limits(), &limits);
    let mut check = |json: &str, want: Result<(), DecodeError>| {
        let p = json.as_bytes().to_vec();
        let got = d.decode(&p).map(|_| ());
        match (got, want) {
            (Ok(()), Ok(())) => {}
            (Err(f), Err(w)) => {
                assert_eq!(f.error, w, "{json}");
                assert_eq!(f.id, Some(1), "{json}");
            }
            (g, w) => panic!("{json}: got {g:?}, want {w:?}"),
        }
    };
    check(
        r#"{"type":"publish","id":1,"channel":"a","data":[1,2,3,4]}"#,
        Err(DecodeError::TooLarge { field: "data", max: 8 }),
    );
    check(r#"{"type":"publish","id":1,"channel":"a","data":[1,2,34] }"#, Ok(()));
    check(
        r#"{"type":"publish","id":1,"channel":"abcdef","data":1}"#,
        Err(DecodeError::BadChannel(ChannelError::TooLong { len: 6, max: 5 })),
    );
    check(r#"{"type":"publish","id":1,"channel":"ab:de","data":1}"#, Ok(()));
    check(r#"{"type":"refresh","id":1,"token":"abcd"}"#, Err(DecodeError::TooLarge { field: "token", max: 3 }));
    // The limit applies to the unescaped token.
    check(r#"{"type":"refresh","id":1,"token":"\u0061bc"}"#, Ok(()));
    check(
        r#"{"type":"subscribe","id":1,"channel":"a","since":{"offset":1,"epoch":"abc"}}"#,
        Err(DecodeError::TooLarge { field: "since.epoch", max: 2 }),
    );
    check(r#"{"type":"history","id":1,"channel":"a","since":{"offset":1,"epoch":"ab"}}"#, Ok(()));
}

#[test]
fn escaped_strings_are_unescaped() {
    assert_eq!(
        decode(
            r#"{"type":"subscribe","id":1,"channel":"room\u003a4\u0032","since":{"offset":1,"epoch":"e\"\\\u00e9\ud83d\ude00"}}"#
        ),
        Ok(Command::Subscribe {
            id: Some(1),
            channel: "room:42",
            since: Some(Since { offset: 1, epoch: "e\"\\\u{e9}\u{1f600}" })
        })
    );
    assert_eq!(
        decode(r#"{"type":"refresh","token":"a\/b\nc\td\u0000"}"#),
        Ok(Command::Refresh { id: None, token: "a/b\nc\td\u{0}" })
    );
    // Keys and the type may be escaped too.
    assert_eq!(decode(r#"{"t\u0079pe":"p\u0069ng","\u0069d":4}"#), Ok(Command::Ping { id: Some(4) }));
    assert_eq!(
        decode(r#"{"type":"publish","channel":"a","d\u0061ta":"x\"y"}"#),
        Ok(Command::Publish { id: None, channel: "a", data: br#""x\"y""# })
    );
    assert_eq!(
        err(r#"{"type":"publish","channel":"a\u0020b","data":1}"#).error,
        DecodeError::BadChannel(ChannelError::BadChar(' '))
    );
}

#[test]
fn data_is_spliced_raw() {
    assert_eq!(data_of(r#"{"type":"publish","channel":"a:b","data":{"t":"x\"y\\u00e9"}}"#), br#"{"t":"x\"y\\u00e9"}"#);
    assert_eq!(data_of(r#"{"type":"publish","channel":"a:b","data":"\u00e9\n"}"#), br#""\u00e9\n""#);
    // Whitespace around the value is not part of it; whitespace inside is.
    assert_eq!(
        data_of("{\"type\":\"publish\",\"channel\":\"a\",\"data\" \t\r\n: \n [ 1 , {\"a\" : 2} ] \r\n\t , \"id\":1}"),
        b"[ 1 , {\"a\" : 2} ]"
    );
    assert_eq!(data_of("  {\"type\":\"publish\",\"channel\":\"a\",\"data\":  7.50e+1  }  "), b"7.50e+1");
    // First key, last key, only scalar values.
    assert_eq!(data_of(r#"{"data":[],"type":"publish","channel":"a"}"#), b"[]");
    assert_eq!(data_of(r#"{"type":"publish","channel":"a","data":{}}"#), b"{}");
    for scalar in ["null", "true", "false", "0", "-0", "1.50", "-1e-7", "\"\"", "\"s\""] {
        let json = format!(r#"{{"type":"publish","channel":"a","data":{scalar}}}"#);
        assert_eq!(data_of(&json), scalar.as_bytes());
        let json = format!(r#"{{"data":{scalar},"type":"publish","channel":"a"}}"#);
        assert_eq!(data_of(&json), scalar.as_bytes());
    }
    // Nested `data` keys and look-alike strings do not confuse the search.
    assert_eq!(
        data_of(
            r#"{"type":"publish","x":{"data":1},"channel":"a","data":{"data":{"data":"data"},"k":"\"data\":"},"y":["data",{"data":2}]}"#
        ),
        br#"{"data":{"data":"data"},"k":"\"data\":"}"#
    );
    assert_eq!(data_of(r#"{"type":"publish","channel":"a","k":"},{","data":"},{:[","z":"]"}"#), br#""},{:[""#);
    // Duplicate keys: the last one wins.
    assert_eq!(data_of(r#"{"type":"publish","channel":"a","data":1,"data":[2]}"#), b"[2]");
}

#[test]
fn payload_is_not_modified() {
    let mut d = Decoder::new();
    let text = br#"{"type":"publish","channel":"\u0061","n":1e400,"data":{"s":"\"\u00e9\n"}}"#;
    let payload = text.to_vec();
    let cmd = d.decode(&payload).unwrap();
    assert_eq!(cmd, Command::Publish { id: None, channel: "a", data: br#"{"s":"\"\u00e9\n"}"# });
    assert_eq!(payload, text);
}

#[test]
fn duplicates_last_wins() {
    assert_eq!(
        decode(r#"{"type":"ping","id":1,"type":"subscribe","channel":"x","id":2,"channel":"y"}"#),
        Ok(Command::Subscribe { id: Some(2), channel: "y", since: None })
    );
}

#[test]
fn unknown_fields_and_nulls() {
    assert_eq!(
        decode(
            r#"{"type":"history","v":2,"channel":"c","extra":{"a":[1,{"b":null}],"c":"d"},"since":null,"limit":null,"more":[]}"#
        ),
        Ok(Command::History { id: None, channel: "c", since: None, limit: None })
    );
    // Fields that do not belong to the command are ignored.
    assert_eq!(
        decode(r#"{"type":"ping","channel":5,"data":1,"token":null,"limit":0}"#),
        Ok(Command::Ping { id: None })
    );
    assert_eq!(
        decode(r#"{"type":"subscribe","channel":"c","since":{"offset":3,"epoch":"e","x":1,"offset":4}}"#),
        Ok(Command::Subscribe { id: None, channel: "c", since: Some(Since { offset: 4, epoch: "e" }) })
    );
}

#[test]
fn out_of_range_numbers() {
    for n in [
        "1e400",
        "-1e400",
        "18446744073709551616",
        "-9223372036854775809",
        "1e99999999999999999999",
        "123456789012345678901234567890",
        "0.5e1000",
    ] {
        let json = format!(r#"{{"type":"publish","id":4,"channel":"a","data":{{"n":[{n}, 1]}}}}"#);
        assert_eq!(
            decode(&json),
            Ok(Command::Publish { id: Some(4), channel: "a", data: format!(r#"{{"n":[{n}, 1]}}"#).as_bytes() }),
            "{json}"
        );
        // Also with escapes elsewhere (the raw copy path), and in an unknown field.
        let json = format!(r#"{{"type":"publish","id":4,"big":{n},"channel":"\u0061","data":["\"",{n}]}}"#);
        assert_eq!(
            decode(&json),
            Ok(Command::Publish { id: Some(4), channel: "a", data: format!(r#"["\"",{n}]"#).as_bytes() }),
            "{json}"
        );
        let json = format!(r#"{{"type":"ping","id":5,"big":{n}}}"#);
        assert_eq!(decode(&json), Ok(Command::Ping { id: Some(5) }));
    }
    // A big number does not hide a syntax error.
    let e = err(r#"{"type":"publish","channel":"a","data":[1e400, 01]}"#);
    assert_eq!(e.code(), "bad_json");
    let e = err(r#"{"type":"publish","channel":"a","data":[1e400,]}"#);
    assert_eq!(e.code(), "bad_json");
}

#[test]
fn decoder_is_reusable_after_errors() {
    let mut d = Decoder::new();
    for i in 0..50u64 {
        let ok = format!(r#"{{"type":"publish","id":{i},"channel":"c:{i}","data":{{"i":{i},"s":"\"q\""}}}}"#);
        let bad = format!(r#"{{"type":"publish","id":{i},"channel":"c:{i}"}}"#);
        let p = bad.into_bytes();
        assert_eq!(d.decode(&p).unwrap_err().id, Some(i));
        let p = b"{nope".to_vec();
        assert!(d.decode(&p).is_err());
        let p = ok.clone().into_bytes();
        let channel = format!("c:{i}");
        let data = format!(r#"{{"i":{i},"s":"\"q\""}}"#);
        assert_eq!(d.decode(&p), Ok(Command::Publish { id: Some(i), channel: &channel, data: data.as_bytes() }));
    }
}

#[test]
fn encode_command_round_trips() {
    let mut d = Decoder::new();
    let cmds = [
        Command::Subscribe { id: Some(1), channel: "room:42", since: Some(Since { offset: 17, epoch: "é\"\n" }) },
        Command::Publish { id: None, channel: "a", data: br#"{"x":"\"","y":[1e400]}"# },
        Command::History { id: Some(u64::MAX), channel: "h", since: None, limit: Some(1000) },
        Command::Refresh { id: Some(0), token: "\u{1}\\" },
    ];
    for cmd in cmds {
        let mut out = Vec::new();
        encode_command(&mut out, &cmd);
        assert_eq!(d.decode(&out), Ok(cmd));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------------------

fn ws() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", "", " ", "\n", "\t", "\r\n  ", "  "])
}

fn json_string_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9 ]{1,6}",
        1 => "[\u{80}-\u{10ffff}]{1,2}",
        2 => prop::sample::select(vec![
            r#"\""#, r#"\\"#, r#"\/"#, r#"\b"#, r#"\f"#, r#"\n"#, r#"\r"#, r#"\t"#, r#"\u00e9"#,
            r#"\u0000"#, r#"\ud83d\ude00"#, r#"\u2028"#, r#"\\u00e9"#, "{", "}", "[", "]", ",", ":",
            "data", r#"\"data\":"#, "é", "😀",
        ])
        .prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn json_number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "-0",
            "1.50",
            "-0.0",
            "1e400",
            "-1e400",
            "18446744073709551616",
            "18446744073709551615",
            "-9223372036854775808",
            "-9223372036854775809",
            "1E+2",
            "2.5e-3",
            "123456789012345678901234567890",
            "1e-400",
            "3.141592653589793",
            "1e99999",
            "0.1e-99999",
            "5e0",
            "1.0000000000000000000000001",
        ])
        .prop_map(String::from),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (any::<i32>(), 0u32..100, -400i32..400).prop_map(|(m, f, e)| format!("{m}.{f}e{e}")),
    ]
}

fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec!["null", "true", "false"]).prop_map(String::from),
        json_number_text(),
        json_string_text(),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let body: Vec<String> = items.iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                format!("[{}]", body.join(","))
            }),
            prop::collection::vec((ws(), json_string_text(), ws(), ws(), inner, ws()), 0..5).prop_map(|members| {
                let body: Vec<String> =
                    members.iter().map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{v}{d}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// A publish whose `data` is `data` and whose members come in a random order, among unknown ones, with
/// random whitespace; the `data` key is sometimes escaped.
fn publish_text(data: String) -> impl Strategy<Value = String> {
    let extras = prop::collection::vec((json_string_text(), json_text()), 0..3);
    (extras, any::<bool>(), any::<prop::sample::Index>(), prop::collection::vec(ws(), 32)).prop_flat_map(
        move |(extras, escaped_key, id, spaces)| {
            let data_key = if escaped_key { r#""d\u0061ta""# } else { r#""data""# };
            let mut members = vec![
                (r#""type""#.to_owned(), r#""publish""#.to_owned()),
                (r#""channel""#.to_owned(), r#""ns:chan-1""#.to_owned()),
                (data_key.to_owned(), data.clone()),
            ];
            if id.index(2) == 0 {
                members.push((r#""id""#.to_owned(), "42".to_owned()));
            }
            // Unknown keys only: drop generated keys that could collide with known ones.
            members.extend(
                extras
                    .into_iter()
                    .filter(|(k, _)| !k.contains('\\') && !KNOWN.iter().any(|n| *k == format!("\"{n}\""))),
            );
            let spaces = spaces.clone();
            Just(members).prop_shuffle().prop_map(move |members| {
                let mut s = String::from(spaces[0]);
                s.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    let w = |j: usize| spaces[(i * 4 + j) % spaces.len()];
                    s.push_str(&format!("{}{k}{}:{}{v}{}", w(1), w(2), w(3), w(4)));
                }
                s.push('}');
                s.push_str(spaces[31]);
                s
            })
        },
    )
}

const KNOWN: [&str; 7] = ["type", "id", "channel", "data", "since", "limit", "token"];

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Exact binary fractions: they print and parse back without rounding.
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 8.0)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_channel() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9_.@=/-]{1,20}(:[A-Za-z0-9_.@=/-]{1,20})?",
        1 => any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Cmd {
    Subscribe(String, Option<(u64, String)>),
    Unsubscribe(String),
    Publish(String, Value),
    Presence(String),
    History(String, Option<(u64, String)>, Option<u32>),
    Ping,
    Refresh(String),
}

fn arb_cmd() -> impl Strategy<Value = (Option<u64>, Cmd)> {
    let since = prop::option::of((any::<u64>(), "\\PC{0,16}"));
    let cmd = prop_oneof![
        (arb_channel(), since.clone()).prop_map(|(c, s)| Cmd::Subscribe(c, s)),
        arb_channel().prop_map(Cmd::Unsubscribe),
        (arb_channel(), arb_value()).prop_map(|(c, d)| Cmd::Publish(c, d)),
        arb_channel().prop_map(Cmd::Presence),
        (arb_channel(), since, prop::option::of(1u32..=1000)).prop_map(|(c, s, l)| Cmd::History(c, s, l)),
        Just(Cmd::Ping),
        any::<String>().prop_map(Cmd::Refresh),
    ];
    (prop::option::of(any::<u64>()), cmd)
}

fn to_json(id: Option<u64>, cmd: &Cmd) -> Value {
    let since = |s: &Option<(u64, String)>| s.as_ref().map(|(o, e)| json!({"offset": o, "epoch": e}));
    let mut v = match cmd {
        Cmd::Subscribe(c, s) => json!({"type":"subscribe","channel":c,"since":since(s)}),
        Cmd::Unsubscribe(c) => json!({"type":"unsubscribe","channel":c}),
        Cmd::Publish(c, d) => json!({"type":"publish","channel":c,"data":d}),
        Cmd::Presence(c) => json!({"type":"presence","channel":c}),
        Cmd::History(c, s, l) => json!({"type":"history","channel":c,"since":since(s),"limit":l}),
        Cmd::Ping => json!({"type":"ping"}),
        Cmd::Refresh(t) => json!({"type":"refresh","token":t}),
    };
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

proptest! {
    // 512 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    /// The raw `data` is byte-identical to the value's text in the input, whatever the value and wherever
    /// the member sits.
    #[test]
    fn prop_data_is_byte_identical(
        (data, text) in json_text().prop_flat_map(|d| (Just(d.clone()), publish_text(d)))
    ) {
        let mut d = Decoder::new();
        let payload = text.clone().into_bytes();
        match d.decode(&payload) {
            Ok(Command::Publish { id, channel, data: got }) => {
                prop_assert_eq!(channel, "ns:chan-1");
                prop_assert!(id.is_none() || id == Some(42));
                prop_assert_eq!(
                    std::str::from_utf8(got).unwrap(),
                    data.as_str(),
                    "payload {}",
                    text
                );
            }
            other => prop_assert!(false, "{text}: {other:?}"),
        }
    }

    /// Any command serialized by serde_json (compact or pretty) decodes to what was serialized.
    #[test]
    fn prop_serde_round_trip((id, cmd) in arb_cmd(), pretty in any::<bool>()) {
        let v = to_json(id, &cmd);
        let text = if pretty {
            serde_json::to_vec_pretty(&v).unwrap()
        } else {
            serde_json::to_vec(&v).unwrap()
        };
        let limits = Limits::default();
        let mut d = Decoder::new();
        let payload = text.clone();
        let got = d.decode(&payload);
        let channel_of = |c: &String| parse_channel(c, limits.max_channel_len).map(|_| ());
        let channel = match &cmd {
            Cmd::Subscribe(c, _) | Cmd::Unsubscribe(c) | Cmd::Publish(c, _) | Cmd::Presence(c)
            | Cmd::History(c, _, _) => Some(c),
            Cmd::Ping | Cmd::Refresh(_) => None,
        };
        if let Some(Err(e)) = channel.map(channel_of) {
            let f = got.unwrap_err();
            prop_assert_eq!(f.id, id);
            prop_assert_eq!(f.error, DecodeError::BadChannel(e));
            return Ok(());
        }
        let since = |s: &Option<(u64, String)>| s.as_ref().map(|(o, e)| (*o, e.clone()));
        let got = got.map_err(|e| format!("{}: {e:?}", String::from_utf8_lossy(&text)));
        let got = got.unwrap();
        prop_assert_eq!(got.id(), id);
        match (&cmd, got) {
            (Cmd::Subscribe(c, s), Command::Subscribe { channel, since: gs, .. }) => {
                prop_assert_eq!(channel, c.as_str());
                prop_assert_eq!(gs.map(|g| (g.offset, g.epoch.to_owned())), since(s));
            }
            (Cmd::Unsubscribe(c), Command::Unsubscribe { channel, .. })
            | (Cmd::Presence(c), Command::Presence { channel, .. }) => {
                prop_assert_eq!(channel, c.as_str());
            }
            (Cmd::Publish(c, data), Command::Publish { channel, data: raw, .. }) => {
                prop_assert_eq!(channel, c.as_str());
                let back: Value = serde_json::from_slice(raw).unwrap();
                prop_assert_eq!(&back, data);
                if !pretty {
                    let compact = serde_json::to_vec(data).unwrap();
                    prop_assert_eq!(raw, compact.as_slice());
                }
            }
            (Cmd::History(c, s, l), Command::History { channel, since: gs, limit, .. }) => {
                prop_assert_eq!(channel, c.as_str());
                prop_assert_eq!(gs.map(|g| (g.offset, g.epoch.to_owned())), since(s));
                prop_assert_eq!(limit, *l);
            }
            (Cmd::Ping, Command::Ping { .. }) => {}
            (Cmd::Refresh(t), Command::Refresh { token, .. }) => {
                prop_assert_eq!(token, t.as_str());
            }
            (want, got) => prop_assert!(false, "{want:?} decoded as {got:?}"),
        }
    }

    /// Arbitrary bytes never panic.
    #[test]
    fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut d = Decoder::new();
        let p = bytes.clone();
        if let Ok(Command::Publish { data, .. }) = d.decode(&p) {
            prop_assert!(!data.is_empty());
        }
    }

    /// Valid commands with random edits never panic, and a publish's data stays a slice of the input.
    #[test]
    fn prop_mutated_commands_never_panic(
        (_, cmd) in arb_cmd(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = serde_json::to_vec(&to_json(Some(1), &cmd)).unwrap();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
        }
        let original = bytes.clone();
        let mut d = Decoder::new();
        let p = bytes;
        if let Ok(Command::Publish { data, .. }) = d.decode(&p) {
            prop_assert!(original.windows(data.len()).any(|w| w == data));
        }
    }

    /// `encode_command` output decodes to the same command.
    #[test]
    fn prop_encode_command_round_trip((id, cmd) in arb_cmd()) {
        let v = to_json(id, &cmd);
        let text = serde_json::to_vec(&v).unwrap();
        let mut d = Decoder::new();
        let p = text.clone();
        let Ok(first) = d.decode(&p) else { return Ok(()); };
        let mut out = Vec::new();
        encode_command(&mut out, &first);
        let mut d2 = Decoder::new();
        prop_assert_eq!(d2.decode(&out), Ok(first));
    }

    /// Unknown keys never change the result.
    #[test]
    fn prop_unknown_keys_ignored(key in "[a-z_]{1,8}", value in json_text()) {
        prop_assume!(!KNOWN.contains(&key.as_str()));
        let text = format!(r#"{{"type":"ping","{key}":{value},"id":3}}"#);
        let mut d = Decoder::new();
        let p = text.into_bytes();
        prop_assert_eq!(d.decode(&p), Ok(Command::Ping { id: Some(3) }));
    }
}

/// The input that made the number retry quadratic: `[-[` then `1[` repeated, `len` bytes in all. The `-[`
/// makes simd-json refuse a number (so the retry runs) and every `1` starts another number.
fn number_retry_bomb(len: usize) -> Vec<u8> {
    let mut v = b"[-[".to_vec();
    while v.len() + 2 <= len {
        v.extend_from_slice(b"1[");
    }
    v
}

/// Fastest of `runs` decodes of `payload`, in nanoseconds.
fn fastest_decode_ns(payload: &[u8], runs: usize) -> u128 {
    let mut d = Decoder::with_limits(Limits { max_data_bytes: 1 << 20, ..Limits::default() });
    (0..runs)
        .map(|_| {
            let t = std::time::Instant::now();
            let r = d.decode(payload);
            let ns = t.elapsed().as_nanos();
            assert_eq!(r.map_err(|e| e.code()), Err("bad_json"));
            ns
        })
        .min()
        .unwrap_or(0)
        .max(1)
}

/// Decoding time grows linearly with the input, also for inputs built to trigger the number retry: 8x the
/// bytes may cost at most ~3x8x the time (a quadratic decoder takes ~64x; the old retry scanned from every
/// number start to the next `,` `}` `]` or space, and took 860 ms on 60 KiB in a release build). A ratio,
/// not an absolute time, so a slow or busy machine does not change the verdict.
#[test]
fn decoding_is_linear_in_the_input() {
    let small = number_retry_bomb(8 * 1024);
    let large = number_retry_bomb(64 * 1024);
    // Warm the decoder's buffers and the caches up first.
    fastest_decode_ns(&large, 2);
    let (t_small, t_large) = (fastest_decode_ns(&small, 7), fastest_decode_ns(&large, 7));
    let ratio = t_large as f64 / t_small as f64;
    assert!(ratio < 24.0, "8x the input took {ratio:.1}x the time ({t_small} ns -> {t_large} ns): not linear");
    // The same input with a valid number where the bomb starts still decodes as an ordinary command error.
    let mut ok = br#"{"type":"publish","channel":"c","data":"#.to_vec();
    ok.extend_from_slice(&large[..large.len() - 1]);
    assert_eq!(decode(std::str::from_utf8(&ok).unwrap()).map_err(|e| e.code()), Err("bad_json"));
}
