//! Fuzzes the model's event-stream decoder with arbitrary bytes fed in arbitrary pieces
//! (the first byte of each piece is its length), then the end of the stream. Run:
//!   cargo +nightly fuzz run sse -- -max_total_time=60

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::llm::sse::SseDecoder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = SseDecoder::default();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (piece, after) = tail.split_at(n);
        if decoder.feed(piece).is_err() {
            return;
        }
        rest = after;
    }
    let _ = decoder.finish();
});
