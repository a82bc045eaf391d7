//! Fuzzes a DingTalk HTTP callback's untrusted input: the `timestamp` and `sign` headers
//! (window, then HMAC) and the JSON body → Job → robotCode check. Run:
//!   cargo +nightly fuzz run dingtalk_callback -- -max_total_time=60
//! The first byte picks the header mode (garbage headers, or a valid signature so the body
//! parser is reached); a newline splits the timestamp from the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::platform::dingtalk::{callback, sign};

const SECRET: &str = "fuzz-secret";
const NOW: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let ts = String::from_utf8_lossy(head);
    let signature = if mode % 2 == 0 {
        sign::sign(SECRET, &ts)
    } else {
        String::from_utf8_lossy(body).into_owned()
    };
    let _ = sign::verify_callback(SECRET, Some(&ts), Some(&signature), NOW);
    let _ = sign::verify_callback(SECRET, Some(&ts), None, i64::MIN);
    if let Ok(job) = callback::parse("fuzz", body, NOW) {
        let _ = callback::check_robot(&job, "ding-fuzz");
        let _ = serde_json::to_vec(&job).expect("a job serialises");
    }
});
