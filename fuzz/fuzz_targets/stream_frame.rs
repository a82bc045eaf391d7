//! Fuzzes a DingTalk Stream frame as the ingress decodes it: frame JSON → headers → SYSTEM
//! echo / CALLBACK data → the callback parser → Job, and every ack built. Run:
//!   cargo +nightly fuzz run stream_frame -- -max_total_time=60
//! Half the inputs are the frame itself; the other half are wrapped as the `data` of a
//! bot-message CALLBACK frame, so the callback parser is reached through the frame.

#![no_main]

use ingress::dingtalk_stream::{Decoded, decode};
use libfuzzer_sys::fuzz_target;
use shared::config::DingTalkBot;
use std::sync::OnceLock;

fn bot() -> &'static DingTalkBot {
    static BOT: OnceLock<DingTalkBot> = OnceLock::new();
    BOT.get_or_init(|| {
        toml::from_str("id = \"fuzz\"\napp_key = \"ding-fuzz\"\napp_secret = \"s\"\ningress = \"stream\"")
            .expect("valid bot")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let frame = if mode % 2 == 0 {
        text.into_owned()
    } else {
        serde_json::json!({
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {"messageId": "m", "topic": "/v1.0/im/bot/messages/get"},
            "data": text,
        })
        .to_string()
    };
    match decode(bot(), &frame, 1_700_000_000_000) {
        Decoded::System { ack, .. } | Decoded::Unsupported { ack, .. } => {
            let _: serde_json::Value = serde_json::from_str(ack.text()).expect("acks are JSON");
        }
        Decoded::Callback { job, .. } => {
            if let Ok(job) = *job {
                assert_eq!(job.bot_id, "fuzz");
            }
        }
        _ => {}
    }
});
