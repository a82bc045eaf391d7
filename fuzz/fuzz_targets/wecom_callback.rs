//! Fuzzes the untrusted-input path of a WeCom app callback: envelope XML → signature →
//! AES decrypt → message XML → Job. Run (needs nightly and cargo-fuzz):
//!   cargo +nightly fuzz run wecom_callback -- -max_total_time=60
//! Half the inputs are used as they are (garbage envelopes, ciphertexts, signatures); the
//! other half are treated as a decrypted message and encrypted and signed with the test
//! key first, so the fuzzer also reaches the inner XML parser and the Job mapping.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::config::WecomBot;
use shared::secret::Secret;
use shared::platform::wecom::crypto::WecomCrypto;
use shared::platform::wecom::{callback, open_callback};
use std::sync::OnceLock;

const TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
const AES_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
const CORP_ID: &str = "ww1436e0e65a779aee";

fn setup() -> &'static (WecomCrypto, WecomBot) {
    static SETUP: OnceLock<(WecomCrypto, WecomBot)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let crypto = WecomCrypto::new(TOKEN, AES_KEY, CORP_ID).expect("valid test key");
        let bot = WecomBot {
            id: "fuzz".into(),
            policy: Default::default(),
            corp_id: CORP_ID.into(),
            corp_secret: Secret::new("s"),
            agent_id: 1000002,
            token: Secret::new(TOKEN),
            encoding_aes_key: Secret::new(AES_KEY),
            api_base: "http://127.0.0.1".into(),
            markdown: false,
            welcome_text: Some("hi".into()),
            working_notice_secs: 0,
            api_per_minute: 2000,
        };
        (crypto, bot)
    })
}

fuzz_target!(|data: &[u8]| {
    let (crypto, bot) = setup();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (ts, nonce) = ("1700000000", "42");
    let body: Vec<u8>;
    let signature: String;
    if mode % 2 == 0 {
        // Raw: a garbage envelope, signed over whatever it carries, so decryption runs.
        body = rest.to_vec();
        let encrypt = std::str::from_utf8(rest)
            .ok()
            .and_then(|t| shared::platform::wecom::xml::parse_envelope(t).ok())
            .map(|e| e.encrypt)
            .unwrap_or_default();
        signature = crypto.signature(ts, nonce, &encrypt);
    } else {
        // Structured: the input is the plaintext message, wrapped as WeCom would.
        let plain = String::from_utf8_lossy(rest);
        let encrypt = crypto.encrypt_with_random([7; 16], &plain);
        signature = crypto.signature(ts, nonce, &encrypt);
        body = format!("<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>").into_bytes();
    }
    if let Ok(msg) = open_callback(crypto, &signature, ts, nonce, &body) {
        let _ = callback::to_job(bot, &msg, 0);
    }
});
