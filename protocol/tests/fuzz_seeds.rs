//! Runs every committed fuzz seed of the `frame`, `message` and `proxy` targets through the targets' own
//! code, on every `cargo test`, without libFuzzer. (The `handshake` seeds are checked in `tests/handshake.rs`.)
//!
//! The target files in `fuzz/fuzz_targets/` are compiled here as modules: `extern crate self as
//! libfuzzer_sys` makes their `use libfuzzer_sys::fuzz_target;` resolve to the stand-in macro below, which
//! turns the target's body into a plain `pub fn run(data: &[u8])`. So a seed runs exactly the assertions
//! the fuzzer runs. On top of "no panic", seeds named `ok_*` must decode without error and seeds named
//! `err_*` must fail a server connection (frame seeds; the naming is described in `docs/fuzzing.md`);
//! proxy seeds named `ok_*` must parse to a complete header, `partial_*` need more bytes, `err_*` are refused.

extern crate self as libfuzzer_sys;

use std::path::{Path, PathBuf};

use throng_protocol::conn::{Limits, Step, WsConn};

/// Stand-in for `libfuzzer_sys::fuzz_target!`: the body becomes `pub fn run(data: &[u8])`.
#[macro_export]
macro_rules! fuzz_target {
    (|$data:ident: &[u8]| $body:expr) => {
        pub fn run($data: &[u8]) {
            $body
        }
    };
}

#[allow(unused_attributes, unused_imports, dead_code)]
#[path = "../fuzz/fuzz_targets/frame.rs"]
mod frame_target;

#[allow(unused_attributes, unused_imports, dead_code)]
#[path = "../fuzz/fuzz_targets/message.rs"]
mod message_target;

#[allow(unused_attributes, unused_imports, dead_code)]
#[path = "../fuzz/fuzz_targets/proxy.rs"]
mod proxy_target;

fn seeds(target: &str) -> Vec<(String, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), path)
        })
        .collect();
    v.sort();
    v
}

/// Runs `run` on every seed of `target`, naming the seed that panics.
fn run_all(target: &str, run: fn(&[u8])) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for (name, path) in seeds(target) {
        let bytes = std::fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| run(&bytes)) {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("seeds/{target}/{name}: {}", msg.unwrap_or_default());
        }
        all.push((name, bytes));
    }
    all
}

/// Whether a frame seed's stream fails a server connection (same layout as the target: flag byte, chunk
/// sizes, stream; bit 3 of the flags selects the small limits).
fn frame_seed_fails(seed: &[u8]) -> bool {
    let Some((&flags, rest)) = seed.split_first() else { return false };
    let mut stream = rest[usize::from(flags & 7).min(rest.len())..].to_vec();
    let limits = if flags & 8 != 0 {
        Limits { max_frame: 64, max_message: 256 }
    } else {
        Limits { max_frame: 1 << 20, max_message: 1 << 20 }
    };
    let mut conn = WsConn::server();
    let mut out = Vec::new();
    let mut off = 0;
    while off < stream.len() {
        match conn.handle_read(&mut stream[off..], &limits, &mut out) {
            Ok(Step::NeedMore) => return false,
            Ok(Step::Consumed(n) | Step::Event(n, _)) => off += n,
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn frame_seeds() {
    let all = run_all("frame", frame_target::run);
    assert!(all.len() >= 12, "only {} frame seeds", all.len());
    for (name, bytes) in &all {
        if name.starts_with("ok_") {
            assert!(!frame_seed_fails(bytes), "seeds/frame/{name} should decode without error");
        } else if name.starts_with("err_") {
            assert!(frame_seed_fails(bytes), "seeds/frame/{name} should fail the connection");
        }
    }
}

#[test]
fn message_seeds() {
    let all = run_all("message", message_target::run);
    assert!(!all.is_empty(), "no message seeds");
}

#[test]
fn proxy_seeds() {
    let all = run_all("proxy", proxy_target::run);
    assert!(all.len() >= 20, "only {} proxy seeds", all.len());
    for (name, bytes) in &all {
        let parsed = throng_protocol::proxy::parse(bytes);
        if name.starts_with("ok_") {
            assert!(matches!(parsed, Ok(Some(_))), "seeds/proxy/{name}: {parsed:?}");
        } else if name.starts_with("partial_") {
            assert_eq!(parsed, Ok(None), "seeds/proxy/{name}");
        } else if name.starts_with("err_") {
            assert!(parsed.is_err(), "seeds/proxy/{name}: {parsed:?}");
        }
    }
}

/// Inputs no seed covers, through the frame target too: empty, flags only, all flag combinations.
#[test]
fn frame_target_edge_inputs() {
    frame_target::run(&[]);
    for flags in 0..=255u8 {
        frame_target::run(&[flags]);
        frame_target::run(&[flags, 0x81, 0x80, 1, 2, 3, 4]);
        frame_target::run(&[flags, 0, 1, 2, 3, 4, 5, 6, 0x89, 0x81, 1, 2, 3, 4, 5, 0x88, 0x80, 0, 0, 0, 0]);
    }
}
