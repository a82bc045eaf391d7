//! Cost of opening a WeCom app callback (envelope XML → signature → AES decrypt → message
//! XML) for a message whose text is 2 KiB, the largest WeCom sends. Target: < 20 µs.
//! Run: `cargo bench -p parley-shared --bench wecom`.

use criterion::{Criterion, criterion_group, criterion_main};
use shared::platform::wecom::crypto::WecomCrypto;
use shared::platform::wecom::open_callback;
use std::hint::black_box;

const TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
const AES_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
const CORP_ID: &str = "ww1436e0e65a779aee";

fn open_2k_message(c: &mut Criterion) {
    let crypto = WecomCrypto::new(TOKEN, AES_KEY, CORP_ID).expect("valid key");
    let text = "企业微信消息".repeat(114); // 2052 bytes of UTF-8
    let xml = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>\
         <CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{text}]]></Content>\
         <MsgId>1234567890123456</MsgId><AgentID>1000002</AgentID></xml>"
    );
    let encrypt = crypto.encrypt(&xml);
    let (ts, nonce) = ("1700000000", "1597212914");
    let signature = crypto.signature(ts, nonce, &encrypt);
    let body = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><AgentID><![CDATA[1000002]]></AgentID><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    );
    assert!(open_callback(&crypto, &signature, ts, nonce, body.as_bytes()).is_ok());
    c.bench_function("wecom_open_callback_2KiB", |b| {
        b.iter(|| {
            open_callback(
                &crypto,
                black_box(&signature),
                ts,
                nonce,
                black_box(body.as_bytes()),
            )
            .expect("valid callback")
        })
    });
}

/// The steps of the same path, to see where the time goes.
fn steps(c: &mut Criterion) {
    let crypto = WecomCrypto::new(TOKEN, AES_KEY, CORP_ID).expect("valid key");
    let text = "企业微信消息".repeat(114);
    let xml = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>\
         <CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{text}]]></Content>\
         <MsgId>1234567890123456</MsgId><AgentID>1000002</AgentID></xml>"
    );
    let encrypt = crypto.encrypt(&xml);
    let body = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    );
    c.bench_function("step_signature", |b| {
        b.iter(|| crypto.signature("1700000000", "1597212914", black_box(&encrypt)))
    });
    c.bench_function("step_decrypt", |b| {
        b.iter(|| crypto.decrypt(black_box(&encrypt)).expect("valid"))
    });
    c.bench_function("step_parse_envelope", |b| {
        b.iter(|| shared::platform::wecom::xml::parse_envelope(black_box(&body)).expect("valid"))
    });
    c.bench_function("step_parse_message", |b| {
        b.iter(|| shared::platform::wecom::xml::parse_message(black_box(&xml)).expect("valid"))
    });
}

criterion_group!(benches, open_2k_message, steps);
criterion_main!(benches);
