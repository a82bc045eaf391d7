//! Fuzzes the untrusted-input path of a WeCom AI bot callback: JSON envelope → signature →
//! AES decrypt (receive id "") → callback JSON → Job. Run (needs nightly and cargo-fuzz):
//!   cargo +nightly fuzz run aibot_callback -- -max_total_time=60
//! Half the inputs are used as they are (garbage envelopes, signed over what they carry);
//! the other half are treated as the decrypted callback and encrypted and signed first, so
//! the fuzzer also reaches the callback parser and the Job mapping.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::config::WecomAibotBot;
use shared::platform::wecom::crypto::WecomCrypto;
use shared::platform::wecom_aibot::callback::{Callback, to_job};
use shared::platform::wecom_aibot::open_callback;
use std::sync::OnceLock;

const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA";

fn setup() -> &'static (WecomCrypto, WecomAibotBot) {
    static SETUP: OnceLock<(WecomCrypto, WecomAibotBot)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let crypto = WecomCrypto::new(TOKEN, AES_KEY, "").expect("valid test key");
        let bot: WecomAibotBot = toml::from_str(&format!(
            "id = \"fuzz\"\ntoken = \"{TOKEN}\"\nencoding_aes_key = \"{AES_KEY}\""
        ))
        .expect("valid bot");
        (crypto, bot)
    })
}

fuzz_target!(|data: &[u8]| {
    let (crypto, bot) = setup();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (ts, nonce) = ("1700000000", "42");
    let (body, signature) = if mode % 2 == 0 {
        let encrypt = serde_json::from_slice::<serde_json::Value>(rest)
            .ok()
            .and_then(|v| v["encrypt"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (rest.to_vec(), crypto.signature(ts, nonce, &encrypt))
    } else {
        let plain = String::from_utf8_lossy(rest);
        let encrypt = crypto.encrypt_with_random([7; 16], &plain);
        let signature = crypto.signature(ts, nonce, &encrypt);
        (serde_json::json!({"encrypt": encrypt}).to_string().into_bytes(), signature)
    };
    if let Ok(Callback::Message(m)) = open_callback(crypto, &signature, ts, nonce, &body) {
        let _ = to_job(bot, &m, 0);
    }
});
