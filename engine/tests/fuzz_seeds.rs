//! Runs every committed seed of the `token` fuzz target through the target's own code, on every `cargo test`,
//! without libFuzzer.
//!
//! `fuzz/fuzz_targets/token.rs` is compiled here as a module: `extern crate self as libfuzzer_sys` makes its
//! `use libfuzzer_sys::fuzz_target;` resolve to the stand-in macro below, which turns the target's body into
//! a plain `pub fn run(data: &[u8])`, so a seed runs exactly the assertions the fuzzer runs. On top of that,
//! a seed's name says what it must do (see `docs/fuzzing.md`): `ok_*` is accepted by at least one verifier;
//! `err_<kind>_*` gets that error from at least one verifier (`places`: a token in more than one place;
//! `notoken`: none at all), and, unless the kind is `issuer` or `audience` (which only one verifier checks),
//! is accepted by none.

extern crate self as libfuzzer_sys;

use std::path::{Path, PathBuf};

use throng::auth::TokenError;

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
#[path = "../fuzz/fuzz_targets/token.rs"]
mod token_target;

use token_target::{Extraction, Outcome};

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

/// Runs the target on every seed, naming the seed that panics.
fn run_all(target: &str) -> Vec<(String, Outcome)> {
    let mut all = Vec::new();
    for (name, path) in seeds(target) {
        let bytes = std::fs::read(&path).unwrap();
        match std::panic::catch_unwind(|| token_target::check(&bytes)) {
            Ok(outcome) => all.push((name, outcome)),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!("seeds/{target}/{name}: {}", msg.unwrap_or_default());
            }
        }
    }
    all
}

/// Whether `e` is the error a seed name's `<kind>` stands for.
fn is_kind(e: &TokenError, kind: &str) -> bool {
    matches!(
        (kind, e),
        ("toolarge", TokenError::TooLarge(_))
            | ("malformed", TokenError::Malformed)
            | ("wrongalg", TokenError::WrongAlgorithm)
            | ("badsig", TokenError::BadSignature)
            | ("expired", TokenError::Expired)
            | ("nbf", TokenError::NotYetValid)
            | ("issuer", TokenError::WrongIssuer)
            | ("audience", TokenError::WrongAudience)
            | ("claim", TokenError::BadClaim(_))
    )
}

#[test]
fn token_seeds() {
    let all = run_all("token");
    assert!((20..=60).contains(&all.len()), "{} token seeds", all.len());
    for (name, outcome) in &all {
        let accepted = outcome.results.iter().any(Result::is_ok);
        if name.starts_with("ok_") {
            assert!(accepted, "seeds/token/{name} should be accepted: {outcome:?}");
        } else if let Some(rest) = name.strip_prefix("err_") {
            let kind = rest.split('_').next().unwrap_or_default();
            let hit = match kind {
                "places" => outcome.extraction == Extraction::Conflict,
                "notoken" => outcome.extraction == Extraction::NoToken,
                _ => outcome.results.iter().any(|r| r.as_ref().is_err_and(|e| is_kind(e, kind))),
            };
            assert!(hit, "seeds/token/{name} should fail with {kind}: {outcome:?}");
            if kind != "issuer" && kind != "audience" {
                assert!(!accepted, "seeds/token/{name} was accepted: {outcome:?}");
            }
        }
    }
    // Every mode has seeds.
    for mode in b'0'..=b'3' {
        let n = seeds("token")
            .iter()
            .filter(|(_, p)| std::fs::read(p).unwrap().first().is_some_and(|b| b % 4 == mode % 4))
            .count();
        assert!(n >= 3, "only {n} seeds of mode {}", char::from(mode));
    }
}

/// Inputs no seed covers: empty, a mode byte alone, each mode on a few short inputs.
#[test]
fn token_target_edge_inputs() {
    token_target::run(&[]);
    for mode in 0..=255u8 {
        token_target::run(&[mode]);
    }
    for mode in 0..4u8 {
        for tail in [&b"\n"[..], b"{}", b"{}\n{}", b"\xff\xfe", b"a.b.c", b"GET / HTTP/1.1\r\n\r\n", &[0xAA; 64]] {
            let mut input = vec![mode];
            input.extend_from_slice(tail);
            token_target::run(&input);
        }
    }
}
