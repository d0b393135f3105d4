//! Decoding the common commands allocates nothing once the decoder is warmed up.
//!
//! A counting global allocator, in its own test binary with a single test so that no other test thread
//! allocates while counting.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use throng_protocol::message::{encode_message, Command, Decoder};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s guarantees
// hold; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded from our caller, who upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded from our caller, who upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded from our caller, who upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from our caller, who upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAYLOADS: [&[u8]; 6] = [
    br#"{"type":"subscribe","id":1,"channel":"room:42","since":{"offset":17,"epoch":"e1"}}"#,
    br#"{"type":"publish","id":3,"channel":"room:42","data":{"user":"alice","text":"hello, world","ts":1718000000123,"tags":["a","b"],"n":3.25}}"#,
    br#"{"type":"publish","id":4,"channel":"room:42","data":{"text":"with \"escapes\" \u00e9 and \\ backslashes"}}"#,
    br#"{"type":"ping","id":6}"#,
    br#"{"type":"unsubscribe","id":2,"channel":"room:42"}"#,
    br#"{"type":"publish","id":5,"channel":"room:42","data":"bad" "json"}"#,
];

/// Decodes every payload once (copied into `buf`, as a server copies a frame payload into its read
/// buffer) and encodes the messages a publish fans out into `out`.
fn round(decoder: &mut Decoder, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> usize {
    let mut ok = 0;
    for p in PAYLOADS {
        buf.clear();
        buf.extend_from_slice(p);
        match decoder.decode(buf) {
            Ok(Command::Publish { channel, data, .. }) => {
                out.clear();
                encode_message(out, channel, 21, data);
                ok += 1;
            }
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), "bad_json"),
        }
    }
    ok
}

#[test]
fn decoding_allocates_nothing_once_warm() {
    let mut decoder = Decoder::new();
    let mut buf = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    for _ in 0..3 {
        assert_eq!(round(&mut decoder, &mut buf, &mut out), 5);
    }
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let mut ok = 0;
    for _ in 0..1000 {
        ok += round(&mut decoder, &mut buf, &mut out);
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(ok, 5000);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "allocations after warm-up");

    // The counter is live: a fresh decoder allocates its buffers.
    COUNTING.store(true, Ordering::SeqCst);
    let fresh = Decoder::new();
    COUNTING.store(false, Ordering::SeqCst);
    assert!(ALLOCATIONS.load(Ordering::SeqCst) > 0);
    drop(fresh);
}
