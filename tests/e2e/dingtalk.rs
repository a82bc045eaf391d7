//! DingTalk robot conversations end to end.

use crate::helpers::*;
use sim::{ConversationType, Via};
use std::time::Duration;

async fn group_mention_is_answered_through_the_session_webhook_with_an_at(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app.send(&app.group("m1", "今天天气怎么样？")).await;
    assert_eq!(resp.status(), 200);
    let replies = app.replies(1).await;
    let r = &replies[0];
    assert_eq!(r.via, Via::SessionWebhook);
    assert_eq!(r.conversation_id.as_deref(), Some("cid-group-1=="));
    assert_eq!(r.at_user_ids, vec!["staff-42".to_string()]);
    assert_eq!(r.content, "Echo: 今天天气怎么样？ (turn 1)");
    let seen = app.llm.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, "test-model");
    assert_eq!(
        seen[0].messages[0],
        ("system".into(), "You are a test assistant.".into())
    );
    assert_eq!(
        seen[0].messages[1],
        ("user".into(), "今天天气怎么样？".into())
    );
    app.stop().await;
}

async fn one_to_one_message_is_answered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(app.send(&app.one_to_one("s1", "hello")).await.status(), 200);
    let r = &app.replies(1).await[0];
    assert_eq!(r.conversation_id.as_deref(), Some("cid-single-1=="));
    assert!(r.at_user_ids.is_empty());
    assert_eq!(r.content, "Echo: hello (turn 1)");
}

async fn one_to_one_with_expired_session_goes_through_openapi_batch_send(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut body = app.body(&app.one_to_one("s2", "ping"));
    expire_session(&mut body);
    assert_eq!(app.send_body(&body).await.status(), 200);
    let r = &app.replies(1).await[0];
    assert_eq!(r.via, Via::OtoSend);
    assert_eq!(r.user_ids, vec!["staff-42".to_string()]);
    assert_eq!(r.content, "Echo: ping (turn 1)");
}

async fn callback_with_forged_signature_is_rejected_without_a_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = serde_json::to_vec(&app.body(&app.group("f1", "hi"))).unwrap();
    let ts = shared::now_ms().to_string();
    let forged = shared::platform::dingtalk::sign::sign("not-the-secret", &ts);
    let resp = app.send_signed_as(body.clone(), &ts, &forged).await;
    assert_eq!(resp.status(), 401);
    let resp = app
        .client
        .post(app.callback_url())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "missing headers");
    app.assert_settled_at(0).await;
    assert_eq!(app.llm.request_count(), 0);
    assert!(app.metrics().await.contains(r#"outcome="bad_signature""#));
}

async fn callback_with_stale_timestamp_is_rejected(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = serde_json::to_vec(&app.body(&app.group("t1", "hi"))).unwrap();
    let ts = (shared::now_ms() - 3_700_000).to_string();
    let sign = shared::platform::dingtalk::sign::sign(APP_SECRET, &ts);
    assert_eq!(app.send_signed_as(body, &ts, &sign).await.status(), 403);
    app.assert_settled_at(0).await;
    assert_eq!(app.llm.request_count(), 0);
}

async fn unknown_bot_is_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app
        .client
        .post(format!("http://{}/dingtalk/nobody", app.addr))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

async fn duplicate_msg_id_is_answered_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = app.body(&app.group("dup-1", "once please"));
    for _ in 0..3 {
        assert_eq!(app.send_body(&body).await.status(), 200);
    }
    app.replies(1).await;
    app.assert_settled_at(1).await;
    assert_eq!(app.llm.request_count(), 1);
    assert!(app.metrics().await.contains("duplicate"));
}

async fn follow_up_carries_the_history_in_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.send(&app.group("h1", "My name is Mei.")).await;
    app.send(&app.group("h2", "What is my name?")).await;
    app.send(&app.group("h3", "And again?")).await;
    let replies = app.replies(3).await;
    let contents: Vec<_> = replies.iter().map(|r| r.content.as_str()).collect();
    assert_eq!(
        contents,
        vec![
            "Echo: My name is Mei. (turn 1)",
            "Echo: What is my name? (turn 2)",
            "Echo: And again? (turn 3)"
        ]
    );
    let third = &app.llm.requests()[2].messages;
    let roles: Vec<_> = third.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "user", "assistant", "user"]
    );
    assert_eq!(third[2].1, "Echo: My name is Mei. (turn 1)");
}

async fn reset_clears_the_history(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.send(&app.group("r1", "remember 7")).await;
    app.replies(1).await;
    app.send(&app.group("r2", "/reset")).await;
    let replies = app.replies(2).await;
    assert!(
        replies[1].content.contains("清空"),
        "{}",
        replies[1].content
    );
    app.send(&app.group("r3", "what number?")).await;
    let replies = app.replies(3).await;
    assert_eq!(replies[2].content, "Echo: what number? (turn 1)");
    assert_eq!(
        app.llm.request_count(),
        2,
        "/reset is not sent to the model"
    );
}

async fn help_and_unsupported_messages_get_a_polite_reply_without_the_model(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.send(&app.one_to_one("u1", "/help")).await;
    let mut pic = app.one_to_one("u2", "");
    pic.msgtype = "picture".into();
    app.send(&pic).await;
    let replies = app.replies(2).await;
    assert!(replies[0].content.contains("/reset"));
    assert!(replies[1].content.contains("文字"));
    assert_eq!(app.llm.request_count(), 0);
}

async fn audio_with_recognised_text_is_answered_as_text(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut voice = app.one_to_one("a1", "明天开会吗");
    voice.msgtype = "audio".into();
    app.send(&voice).await;
    assert_eq!(app.replies(1).await[0].content, "Echo: 明天开会吗 (turn 1)");
}

async fn token_is_fetched_once_for_twenty_openapi_messages(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for i in 0..20 {
        let mut body = app.body(&app.spec(
            &format!("tok-{i}"),
            &format!("cid-{i}"),
            ConversationType::Group,
            "hi",
        ));
        expire_session(&mut body);
        assert_eq!(app.send_body(&body).await.status(), 200);
    }
    let replies = app.replies(20).await;
    assert!(replies.iter().all(|r| r.via == Via::GroupSend));
    assert_eq!(app.dingtalk.token_fetches(), 1);
}

async fn revoked_token_is_refreshed_and_the_message_resent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut body = app.body(&app.group("rv1", "first"));
    expire_session(&mut body);
    app.send_body(&body).await;
    app.replies(1).await;
    app.dingtalk.revoke_tokens();
    let mut body = app.body(&app.group("rv2", "second"));
    expire_session(&mut body);
    app.send_body(&body).await;
    let replies = app.replies(2).await;
    assert_eq!(replies[1].content, "Echo: second (turn 2)");
    assert_eq!(app.dingtalk.token_fetches(), 2);
    app.assert_settled_at(2).await;
}

async fn model_429_is_retried_and_then_answered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.llm.push_failure(429, Some(1));
    app.send(&app.group("rl1", "busy?")).await;
    let r = &app.replies(1).await[0];
    assert_eq!(r.content, "Echo: busy? (turn 1)");
    assert_eq!(app.llm.request_count(), 2);
}

async fn model_failure_gives_a_friendly_error_not_silence(backend: Backend) {
    let app = TestApp::spawn_with(backend, "timeout_secs = 5").await;
    for _ in 0..3 {
        app.llm.push_failure(500, None);
    }
    app.send(&app.group("mf1", "anyone?")).await;
    let r = &app.replies(1).await[0];
    assert!(r.content.contains("稍后再试"), "{}", r.content);
    assert_eq!(app.llm.request_count(), 3);
    // The failed turn is not remembered.
    app.send(&app.group("mf2", "again")).await;
    assert_eq!(app.replies(2).await[1].content, "Echo: again (turn 1)");
}

async fn long_answer_is_split_and_complete(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let paragraphs: Vec<String> = (0..40)
        .map(|i| format!("段落 {i}: {}", "这是一个很长的回答。".repeat(25)))
        .collect();
    let long = paragraphs.join("\n\n");
    app.llm.push_answer(long.clone());
    app.send(&app.group("long1", "tell me everything")).await;
    let parts = app.dingtalk.wait_for(100, Duration::from_secs(3)).await;
    assert!(
        parts.len() > 1,
        "one part of {} chars",
        long.chars().count()
    );
    for p in &parts {
        assert!(p.content.chars().count() <= 3500);
    }
    // Nothing lost, nothing repeated, in order: only the white space at the cuts may differ.
    let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let joined: String = parts.iter().map(|p| p.content.as_str()).collect();
    assert_eq!(squeeze(&joined), squeeze(&long));
    assert!(
        parts.iter().all(|p| p.content.starts_with("段落")),
        "cuts fall on paragraph breaks"
    );
}

async fn markdown_answer_goes_out_as_markdown_and_reasoning_never_reaches_the_chat(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    app.llm
        .push_answer("<think>private chain of thought</think>## Plan\n1. Build\n2. Ship");
    app.send(&app.group("md1", "plan?")).await;
    let r = &app.replies(1).await[0];
    assert_eq!(r.msgtype, "markdown");
    assert_eq!(r.title.as_deref(), Some("Plan"));
    assert_eq!(r.content, "## Plan\n1. Build\n2. Ship");
    app.llm.push_reasoning("secret reasoning", "Plain answer.");
    app.send(&app.group("md2", "and?")).await;
    let r = &app.replies(2).await[1];
    assert_eq!(
        (r.msgtype.as_str(), r.content.as_str()),
        ("text", "Plain answer.")
    );
}

async fn malformed_json_and_oversized_body_are_4xx_and_the_server_keeps_serving(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let ts = shared::now_ms().to_string();
    let sign = shared::platform::dingtalk::sign::sign(APP_SECRET, &ts);
    let resp = app
        .send_signed_as(b"{\"msgtype\": \"text\", ".to_vec(), &ts, &sign)
        .await;
    assert_eq!(resp.status(), 400);
    let resp = app
        .send_signed_as(b"{\"msgtype\": \"text\"}".to_vec(), &ts, &sign)
        .await;
    assert_eq!(resp.status(), 400, "missing msgId");
    let huge = vec![b' '; 70 * 1024];
    let resp = app.send_signed_as(huge, &ts, &sign).await;
    assert_eq!(resp.status(), 413);
    app.assert_settled_at(0).await;
    assert_eq!(app.llm.request_count(), 0);
    assert_eq!(
        app.send(&app.group("ok1", "still there?")).await.status(),
        200
    );
    app.replies(1).await;
    let health = app.admin_get("/healthz").await;
    assert_eq!(health.status(), 200);
}

async fn admin_endpoints_report_readiness_and_metrics(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 200);
    app.send(&app.group("met1", "count me")).await;
    app.replies(1).await;
    let names = [
        "parley_http_requests_total",
        "parley_ack_duration_seconds_bucket",
        "parley_jobs_total",
        "parley_llm_requests_total",
        "parley_platform_requests_total",
    ];
    // The job is counted just after its reply is delivered: allow for that moment.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut m = app.metrics().await;
    while names.iter().any(|n| !m.contains(n)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = app.metrics().await;
    }
    for name in names {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert!(!m.contains(APP_SECRET) && !m.contains(API_KEY));
}

#[tokio::test]
async fn shutdown_finishes_accepted_jobs_first() {
    let app = TestApp::spawn(Backend::Embedded).await;
    app.llm.set_latency(Duration::from_millis(300));
    for i in 0..5 {
        let spec = app.spec(
            &format!("sd-{i}"),
            &format!("c-{i}"),
            ConversationType::Group,
            "bye",
        );
        assert_eq!(app.send(&spec).await.status(), 200);
    }
    let dingtalk = app.dingtalk.clone();
    app.stop().await;
    assert_eq!(dingtalk.sent().len(), 5);
}

on_both_backends!(
    group_mention_is_answered_through_the_session_webhook_with_an_at,
    one_to_one_message_is_answered,
    one_to_one_with_expired_session_goes_through_openapi_batch_send,
    callback_with_forged_signature_is_rejected_without_a_job,
    callback_with_stale_timestamp_is_rejected,
    unknown_bot_is_404,
    duplicate_msg_id_is_answered_once,
    follow_up_carries_the_history_in_order,
    reset_clears_the_history,
    help_and_unsupported_messages_get_a_polite_reply_without_the_model,
    audio_with_recognised_text_is_answered_as_text,
    token_is_fetched_once_for_twenty_openapi_messages,
    revoked_token_is_refreshed_and_the_message_resent,
    model_429_is_retried_and_then_answered,
    model_failure_gives_a_friendly_error_not_silence,
    long_answer_is_split_and_complete,
    markdown_answer_goes_out_as_markdown_and_reasoning_never_reaches_the_chat,
    malformed_json_and_oversized_body_are_4xx_and_the_server_keeps_serving,
    admin_endpoints_report_readiness_and_metrics,
);

/// What one captured header pair can do (the signature covers only the timestamp): a body
/// naming another robot is refused, and a sessionWebhook pointing off DingTalk's hosts is not
/// used — the answer goes to the conversation through the OpenAPI instead.
#[tokio::test]
async fn a_forged_body_cannot_name_another_robot_or_send_the_answer_elsewhere() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let mut spec = app.group("rb-1", "hi");
    spec.robot_code = "someone-else".into();
    let resp = app.send(&spec).await;
    assert_eq!(resp.status(), 403);
    let mut body = app.body(&app.group("wh-1", "把历史发给我"));
    body["sessionWebhook"] = "http://127.0.0.2:9/robot/sendBySession?session=x".into();
    assert_eq!(app.send_body(&body).await.status(), 200);
    let r = &app.replies(1).await[0];
    assert_eq!(r.via, Via::GroupSend, "{r:#?}");
    assert_eq!(r.conversation_id.as_deref(), Some("cid-group-1=="));
    app.assert_settled_at(1).await;
    assert_eq!(app.llm.request_count(), 1);
}

/// A signed callback announcing a 10 GB body is refused from its headers, not waited for.
#[tokio::test]
async fn a_body_announced_larger_than_the_limit_is_413_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(Backend::Embedded).await;
    let ts = shared::now_ms().to_string();
    let sign = shared::platform::dingtalk::sign::sign(APP_SECRET, &ts);
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: 10000000000\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(app.llm.request_count(), 0);
}
