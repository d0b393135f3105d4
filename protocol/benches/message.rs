//! JSON wire messages: decoding a ~200-byte `publish` with our simd-json [`Decoder`] against serde_json
//! into an equivalent borrowed struct, and encoding the `message` every subscriber gets.
//!
//! Our decoder parses in place, so each iteration first copies the payload into a reused buffer (a server
//! reads each frame into its buffer anyway). `copy_only` measures that copy alone: subtract it from the
//! `throng_decoder` figures for the decode itself. serde_json reads the payload without modifying it and
//! needs no copy.
//!
//! `cargo bench -p throng-protocol --bench message -- --warm-up-time 1 --measurement-time 3`

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::Deserialize;
use serde_json::value::RawValue;
use throng_protocol::message::{encode_message, message_len, parse_channel, Command, Decoder};

const PUBLISH: &[u8] = br#"{"type":"publish","id":1042,"channel":"chat:room-42","data":{"user":"alice","text":"the deploy finished, all checks are green","ts":1718000000123,"tags":["deploy","ci"],"reply_to":null,"score":3.25}}"#;
const PUBLISH_ESCAPED: &[u8] = br#"{"type":"publish","id":1042,"channel":"chat:room-42","data":{"user":"alice","text":"the \"deploy\" finished, all checks are green","ts":1718000000123,"tags":["ci"],"reply_to":null,"score":3.25}}"#;
const PING: &[u8] = br#"{"type":"ping","id":6}"#;

/// What serde_json decodes into: the same fields as [`Command`], strings borrowed when unescaped.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct SerdeSince<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct SerdeCommand<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<SerdeSince<'a>>,
    limit: Option<u32>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

/// A publish of about 4 KiB: 45 chat messages in `data`.
fn publish_4k() -> Vec<u8> {
    let mut s = String::from(r#"{"type":"publish","id":7,"channel":"chat:room-42","data":{"batch":["#);
    for i in 0..45 {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"user":"user-{i}","text":"message number {i}, nothing to see","ts":{},"n":{i}.5}}"#,
            1_718_000_000_000u64 + i
        ));
    }
    s.push_str("]}}");
    s.into_bytes()
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_decode");
    let big = publish_4k();
    for (name, payload) in [
        ("publish_200B", PUBLISH),
        ("publish_escaped_200B", PUBLISH_ESCAPED),
        ("ping", PING),
        ("publish_4KiB", &big[..]),
    ] {
        g.throughput(Throughput::Bytes(payload.len() as u64));
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        g.bench_function(format!("copy_only/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(black_box(payload));
                black_box(&buf);
            })
        });
        let mut decoder = Decoder::new();
        g.bench_function(format!("throng_decoder/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(black_box(payload));
                match decoder.decode(&buf) {
                    Ok(Command::Publish { data, channel, id }) => {
                        black_box((data.len(), channel.len(), id));
                    }
                    Ok(cmd) => {
                        black_box(cmd.id());
                    }
                    Err(e) => panic!("{e}"),
                }
            })
        });
        // The parser alone, as our decoder runs it (padded copy, `fill_tape_padded`), reading no field:
        // the floor under our decoder.
        let mut buffers = simd_json::Buffers::new(512);
        let mut tape = simd_json::Tape::null();
        g.bench_function(format!("simd_json_parse_only/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(black_box(payload));
                buf.extend_from_slice(&[0; simd_json::INPUT_PADDING]);
                let mut t = std::mem::replace(&mut tape, simd_json::Tape::null()).reset();
                simd_json::fill_tape_padded(&mut buf, payload.len(), &mut buffers, &mut t).unwrap();
                black_box(t.0.len());
                tape = t.reset();
            })
        });
        g.bench_function(format!("serde_json_raw_value/{name}"), |b| {
            b.iter(|| {
                let cmd: SerdeCommand<'_> = serde_json::from_slice(black_box(payload)).unwrap();
                // Same checks as our decoder: the channel is validated.
                if let Some(ch) = &cmd.channel {
                    parse_channel(ch, 128).unwrap();
                }
                black_box((cmd.data.map(|d| d.get().len()), cmd.id, &cmd.ty));
            })
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_encode");
    let data =
        br#"{"user":"alice","text":"the deploy finished, all checks are green now!","ts":1718000000123,"n":3.25}"#;
    let data = &data[..];
    let mut out = Vec::with_capacity(512);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function(format!("encode_message/{}B_data", data.len()), |b| {
        b.iter(|| {
            out.clear();
            encode_message(&mut out, black_box("chat:room-42"), black_box(123_456), black_box(data));
            black_box(&out);
        })
    });
    g.bench_function(format!("message_len+encode_message/{}B_data", data.len()), |b| {
        b.iter(|| {
            out.clear();
            let len = message_len(black_box("chat:room-42"), black_box(123_456), black_box(data));
            out.extend_from_slice(&[0x81, 126, (len >> 8) as u8, len as u8]);
            encode_message(&mut out, "chat:room-42", 123_456, data);
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
