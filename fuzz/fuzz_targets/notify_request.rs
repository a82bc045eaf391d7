//! Fuzzes a notification request body: JSON → plain or markdown notice, or an Alertmanager
//! webhook rendered through the built-in template → Job. Run:
//!   cargo +nightly fuzz run notify_request -- -max_total_time=60
//! The first byte picks the channel kind (DingTalk or WeCom robot).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::config::ChannelSettings;
use shared::notify::request;
use std::sync::OnceLock;

fn channels() -> &'static [ChannelSettings; 2] {
    static C: OnceLock<[ChannelSettings; 2]> = OnceLock::new();
    C.get_or_init(|| {
        let dt = toml::from_str(
            "id = \"dt\"\nkind = \"dingtalk_robot\"\nurl = \"https://oapi.dingtalk.com/robot/send?access_token=t\"\ntoken = \"tok-0123456789abcdef\"\nkeyword = \"告警\"",
        )
        .expect("valid channel");
        let wx = toml::from_str(
            "id = \"wx\"\nkind = \"wecom_robot\"\nurl = \"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k\"\ntoken = \"tok-0123456789abcdef\"",
        )
        .expect("valid channel");
        [dt, wx]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let channel = &channels()[usize::from(mode % 2)];
    let id = request::job_id(&channel.id, Some("k"));
    if let Ok(job) = request::to_job(channel, body, None, id, 1_700_000_000_000) {
        let _ = serde_json::to_vec(&job).expect("a job serialises");
    }
});
