//! WeCom self-built app conversations end to end.

use crate::helpers::*;
use sim::wecom::{event_message, text_message};
use std::time::Duration;

fn text(msg_id: &str, content: &str) -> String {
    text_message(CORP_ID, AGENT_ID, "zhangsan", msg_id, content)
}

async fn wecom_url_verification_echoes_the_plaintext(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // '+' and '/' in the echostr must survive the query decoding.
    for echo in ["1616140317555161061", "plain+echo/with=chars"] {
        let query = app.wecom.verify_url_query(CORP_ID, echo);
        let resp = app
            .client
            .get(format!("{}?{query}", app.wecom_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), echo);
    }
    let query = app
        .wecom
        .verify_url_query(CORP_ID, "x")
        .replace("msg_signature=", "msg_signature=0");
    let resp = app
        .client
        .get(format!("{}?{query}", app.wecom_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

async fn wecom_text_message_is_answered_through_message_send(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app.send_wecom(&text("7001", "报销流程是什么？")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "", "WeCom wants an empty 200");
    let sent = app.wecom.wait_for(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].user.as_str(), sent[0].agent_id),
        ("zhangsan", AGENT_ID)
    );
    assert_eq!(sent[0].content, "Echo: 报销流程是什么？ (turn 1)");
    assert_eq!(sent[0].msgtype, "text");
}

async fn wecom_retries_of_one_msg_id_are_answered_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let xml = text("7002", "只回答一次");
    for _ in 0..3 {
        assert_eq!(app.send_wecom(&xml).await.status(), 200);
    }
    app.wecom.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.wecom.sent().len(), 1);
    assert_eq!(app.llm.request_count(), 1);
}

async fn wecom_long_answer_is_split_at_2048_bytes_without_loss(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let long: String = (0..12)
        .map(|i| format!("第{i}段：{}", "企业微信的消息有长度限制。".repeat(20)))
        .collect::<Vec<_>>()
        .join("\n\n");
    assert!(long.len() > 3 * 2048);
    app.llm.push_answer(long.clone());
    app.send_wecom(&text("7003", "详细说说")).await;
    let parts = app.wecom.wait_for(50, Duration::from_secs(3)).await;
    assert!(parts.len() >= 4, "{} parts", parts.len());
    assert!(
        parts
            .iter()
            .all(|p| !p.truncated && p.content.len() <= 2048)
    );
    let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let joined: String = parts.iter().map(|p| p.content.as_str()).collect();
    assert_eq!(squeeze(&joined), squeeze(&long));
}

/// WeCom drops what one app sends one member beyond 30 a minute, silently: the parts of a
/// very long answer wait for the next minute instead (about 61 s of waiting, so this runs
/// once, on the shared limit in Redis).
#[tokio::test]
async fn wecom_answer_longer_than_30_parts_waits_instead_of_being_dropped() {
    let app = TestApp::spawn(Backend::Brokers).await;
    let paragraph = "企业微信的消息有长度限制。".repeat(50);
    assert!(paragraph.len() < 2048 && paragraph.len() > 1024);
    let long = vec![paragraph; 34].join("\n\n");
    app.llm.push_answer(long);
    app.send_wecom(&text("7400", "越长越好")).await;
    let first = app.wecom.wait_for(34, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 30, "30 in the first minute");
    let all = app.wecom.wait_for(34, Duration::from_secs(75)).await;
    assert_eq!(all.len(), 34);
    assert_eq!(app.wecom.dropped(), 0);
}

async fn wecom_token_is_cached_and_refreshed_once_when_revoked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for i in 0..5 {
        app.send_wecom(&text(&format!("71{i}"), "hi")).await;
    }
    app.wecom.wait_for(5, WAIT).await;
    assert_eq!(app.wecom.token_fetches(), 1);
    app.wecom.revoke_tokens();
    app.send_wecom(&text("7200", "after revoke")).await;
    let sent = app.wecom.wait_for(6, WAIT).await;
    assert_eq!(sent.len(), 6);
    assert_eq!(app.wecom.token_fetches(), 2);
}

async fn wecom_markdown_answer_goes_out_as_markdown_when_enabled(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.llm.push_answer("## 步骤\n- 提交申请\n- 等待审批");
    app.send_wecom(&text("7300", "怎么请假")).await;
    let sent = app.wecom.wait_for(1, WAIT).await;
    assert_eq!(sent[0].msgtype, "markdown");
}

async fn wecom_enter_agent_gets_the_welcome_text_and_other_events_are_ignored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app
        .send_wecom(&event_message(CORP_ID, AGENT_ID, "lisi", "enter_agent"))
        .await;
    assert_eq!(resp.status(), 200);
    let resp = app
        .send_wecom(&event_message(CORP_ID, AGENT_ID, "lisi", "click"))
        .await;
    assert_eq!(resp.status(), 200);
    let sent = app.wecom.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.wecom.sent().len(), 1);
    assert_eq!(sent[0].content, "欢迎使用 AI 助手");
    assert_eq!(app.llm.request_count(), 0);
}

async fn wecom_forged_and_corrupted_callbacks_are_rejected_without_a_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (query, body) = app.wecom.callback(CORP_ID, &text("7400", "hi"));
    // Forged signature.
    let forged = query.replacen("msg_signature=", "msg_signature=f", 1);
    assert_eq!(app.post_wecom(&forged, body.clone()).await.status(), 401);
    // Ciphertext changed after signing: the signature no longer matches.
    let tampered = body.replacen("<Encrypt><![CDATA[", "<Encrypt><![CDATA[AAAA", 1);
    assert_eq!(app.post_wecom(&query, tampered).await.status(), 401);
    // Malformed XML and a DTD.
    assert_eq!(
        app.post_wecom(&query, "<xml><Encrypt>".into())
            .await
            .status(),
        400
    );
    let dtd = format!("<!DOCTYPE xml [<!ENTITY x \"y\">]>{body}");
    assert_eq!(app.post_wecom(&query, dtd).await.status(), 400);
    // Missing query parameters, unknown bot, oversized body.
    assert_eq!(
        app.post_wecom("timestamp=1&nonce=2", body.clone())
            .await
            .status(),
        400
    );
    let resp = app
        .client
        .post(format!("http://{}/wecom/nobody?{query}", app.addr))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        app.post_wecom(&query, " ".repeat(70 * 1024)).await.status(),
        413
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.wecom.sent().is_empty());
    assert_eq!(app.llm.request_count(), 0);
    // And the genuine one still works.
    assert_eq!(app.post_wecom(&query, body).await.status(), 200);
    assert_eq!(app.wecom.wait_for(1, WAIT).await.len(), 1);
}

on_both_backends!(
    wecom_url_verification_echoes_the_plaintext,
    wecom_text_message_is_answered_through_message_send,
    wecom_retries_of_one_msg_id_are_answered_once,
    wecom_long_answer_is_split_at_2048_bytes_without_loss,
    wecom_token_is_cached_and_refreshed_once_when_revoked,
    wecom_markdown_answer_goes_out_as_markdown_when_enabled,
    wecom_enter_agent_gets_the_welcome_text_and_other_events_are_ignored,
    wecom_forged_and_corrupted_callbacks_are_rejected_without_a_job,
);

/// What one captured request can do: a verification outside the hour's window is refused,
/// and a captured message replayed as a verification (its `Encrypt` as `echostr`, with the
/// same signature) is never answered decrypted.
#[tokio::test]
async fn url_verification_is_windowed_and_never_decrypts_a_message() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let crypto =
        shared::platform::wecom::crypto::WecomCrypto::new(WECOM_TOKEN, WECOM_AES_KEY, CORP_ID)
            .unwrap();
    let get = |query: String| {
        let url = format!("{}?{query}", app.wecom_url());
        let client = app.client.clone();
        async move { client.get(url).send().await.unwrap() }
    };
    let echostr = crypto.encrypt("1616140317555161061");
    let encoded = form_encoded(&echostr);
    let old = (shared::now_ms() / 1000 - 30 * 86_400).to_string();
    let sig = crypto.signature(&old, "n1", &echostr);
    let resp = get(format!(
        "msg_signature={sig}&timestamp={old}&nonce=n1&echostr={encoded}"
    ))
    .await;
    assert_eq!(resp.status(), 403, "30 days old");
    let (query, body) = app.wecom.callback(CORP_ID, &text("7100", "机密内容"));
    let encrypt = body
        .split("<Encrypt><![CDATA[")
        .nth(1)
        .and_then(|r| r.split("]]>").next())
        .unwrap();
    let encoded = form_encoded(encrypt);
    let resp = get(format!("{query}&echostr={encoded}")).await;
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("机密内容") && !text.contains("<xml"),
        "{text}"
    );
    assert_eq!(app.wecom.sent().len(), 0);
}

/// Base64 made safe for a query string.
fn form_encoded(b64: &str) -> String {
    b64.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}
