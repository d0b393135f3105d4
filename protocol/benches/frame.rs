//! Frame decode + unmask, Throng vs tungstenite, and the mask fast path vs its scalar reference.
//!
//! `cargo bench -p throng-protocol --bench frame`
//!
//! Both decoders start from the same masked client bytes. Throng copies them into its receive buffer (what
//! a socket read does) and decodes and unmasks in place with `WsConn::handle_read`; tungstenite reads them
//! from an in-memory stream into its own buffer and decodes a `Message` (its real read path). Binary
//! messages, so the figure is framing + unmasking; text adds UTF-8 validation to both.

use std::hint::black_box;
use std::io::{Cursor, Read, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use throng_protocol::conn::{Event, Limits, Step, WsConn};
use throng_protocol::frame::{apply_mask, apply_mask_scalar, encode_client_frame, OpCode};

struct Stream(Cursor<Vec<u8>>);
impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn frames(size: usize, count: usize, op: OpCode) -> Vec<u8> {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut v = Vec::new();
    for i in 0..count {
        encode_client_frame(&mut v, true, op, (i as u32 * 2_654_435_761).to_le_bytes(), &payload);
    }
    v
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_unmask");
    for (size, count) in [(32usize, 256usize), (1024, 64), (65536, 4)] {
        for (name, op) in [("binary", OpCode::Binary), ("text", OpCode::Text)] {
            let input = frames(size, count, op);
            g.throughput(Throughput::Bytes((size * count) as u64));
            let limits = Limits { max_frame: 1 << 20, max_message: 1 << 20 };
            let mut buf = vec![0u8; input.len()];
            g.bench_with_input(BenchmarkId::new(format!("throng/{name}"), size), &input, |b, input| {
                let mut conn = WsConn::server();
                let mut out = Vec::new();
                b.iter(|| {
                    buf.copy_from_slice(input);
                    let mut off = 0;
                    let mut n = 0;
                    while off < buf.len() {
                        match conn.handle_read(&mut buf[off..], &limits, &mut out) {
                            Ok(Step::Event(used, Event::Message { .. })) => {
                                n += 1;
                                off += used;
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                    black_box(n)
                })
            });
            g.bench_with_input(BenchmarkId::new(format!("tungstenite/{name}"), size), &input, |b, input| {
                let cfg = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(128 * 1024);
                let mut ws = tungstenite::WebSocket::from_raw_socket(
                    Stream(Cursor::new(Vec::new())),
                    tungstenite::protocol::Role::Server,
                    Some(cfg),
                );
                b.iter(|| {
                    let s = ws.get_mut();
                    s.0.get_mut().clear();
                    s.0.get_mut().extend_from_slice(input);
                    s.0.set_position(0);
                    for _ in 0..count {
                        black_box(ws.read().unwrap());
                    }
                })
            });
        }
    }
    g.finish();
}

fn mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in [32usize, 1024, 65536] {
        let mut buf = vec![0x5Au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("fast", size), |b| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
        g.bench_function(BenchmarkId::new("scalar", size), |b| {
            b.iter(|| apply_mask_scalar(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
    }
    g.finish();
}

criterion_group!(benches, decode, mask);
criterion_main!(benches);
