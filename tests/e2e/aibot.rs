//! WeCom AI bot (智能机器人) conversations end to end: encrypted JSON callbacks, the answer
//! streamed through WeCom's refreshes, the `response_url` when the stream cannot carry it.

use crate::helpers::*;
use serde_json::{Value, json};
use shared::platform::wecom_aibot::stream::{CONTINUED, FOLLOWS};
use sim::wecom_aibot::{Chat, new_msgid, refresh_message, text_message};
use sim::{AibotOptions, Reply};
use std::time::Duration;

fn fast_refreshes(app: &TestApp) {
    app.aibot.set_options(AibotOptions {
        refresh_interval: Duration::from_millis(100),
        ..AibotOptions::default()
    });
}

fn ask(app: &TestApp, chat: Chat, content: &str) -> Value {
    text_message(
        &new_msgid(),
        chat,
        "zhangsan",
        content,
        &app.aibot.new_response_url(),
    )
}

async fn aibot_single_and_group_chats_stream_to_the_whole_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    fast_refreshes(&app);
    app.llm
        .set_stream_pacing(Duration::from_millis(50), 4, Duration::from_millis(60));
    let single = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "报销流程是什么？"),
        )
        .await
        .unwrap();
    assert!(single.finished, "{single:?}");
    assert_eq!(
        single.final_content.as_deref(),
        Some("Echo: 报销流程是什么？ (turn 1)")
    );
    assert!(single.is_cumulative(), "{:?}", single.contents());
    let partial = single
        .refreshes
        .iter()
        .filter(|r| !r.finish && !r.content.is_empty())
        .count();
    assert!(
        partial >= 1,
        "the answer was shown while written: {:?}",
        single.contents()
    );
    let group = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Group("wrkSFfCgAA".into()), "@RobotA 群里问一下"),
        )
        .await
        .unwrap();
    assert_eq!(
        group.final_content.as_deref(),
        Some("Echo: 群里问一下 (turn 1)"),
        "the @mention is not part of the question; the group is its own conversation"
    );
    assert!(
        app.aibot.posts().is_empty(),
        "no response_url when the stream carries it"
    );
    assert_eq!(app.llm.request_count(), 2);
    assert!(app.llm.requests().iter().all(|r| r.stream));
}

async fn aibot_repeats_of_one_msgid_get_one_stream_and_one_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    fast_refreshes(&app);
    let msg = ask(&app, Chat::Single, "只回答一次");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = app
            .aibot
            .send(&app.aibot_url(), AIBOT_ID, &msg)
            .await
            .unwrap();
        let Reply::Stream { id, finish, .. } = r.reply else {
            panic!("{r:?}")
        };
        assert!(!finish);
        ids.push(id);
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let ex = app
        .aibot
        .converse(&app.aibot_url(), AIBOT_ID, &msg)
        .await
        .unwrap();
    assert_eq!(
        ex.final_content.as_deref(),
        Some("Echo: 只回答一次 (turn 1)")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.llm.request_count(), 1);
    assert!(app.aibot.posts().is_empty());
}

async fn aibot_late_answers_go_to_the_response_url_once(backend: Backend) {
    let app = TestApp::spawn_opts(Options {
        backend,
        aibot: "stream_window_secs = 2".into(),
        ..Options::default()
    })
    .await;
    fast_refreshes(&app);
    app.llm
        .set_stream_pacing(Duration::from_millis(3000), 0, Duration::from_millis(10));
    let ex = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "慢慢想"),
        )
        .await
        .unwrap();
    assert!(ex.finished);
    assert_eq!(
        ex.final_content.as_deref(),
        Some(FOLLOWS),
        "the stream says the answer follows"
    );
    let posts = app.aibot.wait_for_posts(1, WAIT).await;
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].content, "Echo: 慢慢想 (turn 1)");
    assert_eq!(
        (posts[0].msgtype.as_str(), posts[0].errcode),
        ("markdown", 0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.aibot.posts().len(), 1, "one post, never two");
    // Process-wide metrics: other tests may have counted too.
    assert!(
        app.metrics()
            .await
            .contains("parley_aibot_response_url_total{outcome=\"ok\",reason=\"late\"}")
    );
}

async fn aibot_answers_wecom_stopped_refreshing_go_to_the_response_url(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.aibot.set_options(AibotOptions {
        refresh_interval: Duration::from_millis(100),
        max_refreshes: Some(2),
        ..AibotOptions::default()
    });
    app.llm
        .set_stream_pacing(Duration::from_millis(1000), 0, Duration::from_millis(10));
    let ex = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "没人刷新"),
        )
        .await
        .unwrap();
    assert!(!ex.finished);
    // The worker waits for a refresh to take the final text, then posts it.
    let posts = app.aibot.wait_for_posts(1, 2 * WAIT).await;
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].content, "Echo: 没人刷新 (turn 1)");
    // A refresh that still comes sees the stream closed, not the answer a second time.
    let id = ex.stream_id.unwrap();
    let r = app
        .aibot
        .send(
            &app.aibot_url(),
            AIBOT_ID,
            &refresh_message(&new_msgid(), &Chat::Single, "zhangsan", &id),
        )
        .await
        .unwrap();
    assert_eq!(
        r.reply,
        Reply::Stream {
            id,
            finish: true,
            content: FOLLOWS.into()
        }
    );
}

async fn aibot_long_answers_end_in_the_stream_and_continue_through_the_response_url(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    fast_refreshes(&app);
    let long: String = (0..40)
        .map(|i| {
            format!(
                "第{i}段：{}",
                "企业微信智能机器人的流式消息最多两万字节。".repeat(10)
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(long.len() > 25_000 && long.len() < 40_000);
    app.llm.push_answer(long.clone());
    let ex = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "详细说说"),
        )
        .await
        .unwrap();
    let shown = ex.final_content.unwrap();
    assert!(shown.ends_with(CONTINUED) && shown.len() <= 20_480);
    let posts = app.aibot.wait_for_posts(1, WAIT).await;
    assert_eq!(posts.len(), 1);
    let head = shown.strip_suffix(CONTINUED).unwrap();
    assert_eq!(
        format!("{head}\n{}", posts[0].content),
        long,
        "nothing lost"
    );
}

async fn aibot_model_failure_ends_the_stream_with_the_friendly_text(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    fast_refreshes(&app);
    for _ in 0..3 {
        app.llm.push_failure(500, None);
    }
    let ex = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "会失败"),
        )
        .await
        .unwrap();
    assert!(ex.finished);
    assert!(
        ex.final_content
            .unwrap()
            .contains("Sorry, I can't answer right now")
    );
    // Mid-stream: the text shown so far is replaced by the apology.
    app.llm.push_stream_error(6);
    app.llm.push_stream_error(6);
    app.llm.push_stream_error(6);
    app.llm
        .set_stream_pacing(Duration::from_millis(10), 2, Duration::from_millis(150));
    let ex = app
        .aibot
        .converse(
            &app.aibot_url(),
            AIBOT_ID,
            &ask(&app, Chat::Single, "中途失败"),
        )
        .await
        .unwrap();
    assert!(
        ex.final_content
            .unwrap()
            .contains("Sorry, I can't answer right now")
    );
    assert!(app.aibot.posts().is_empty());
}

async fn aibot_welcome_pictures_quotes_and_url_verification(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    fast_refreshes(&app);
    let query = app
        .aibot
        .verify_url_query(AIBOT_ID, "plain+echo/with=chars");
    let resp = app
        .client
        .get(format!("{}?{query}", app.aibot_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "plain+echo/with=chars");
    let enter = sim::wecom_aibot::event_message(&new_msgid(), "zhangsan", "enter_chat");
    let r = app
        .aibot
        .send(&app.aibot_url(), AIBOT_ID, &enter)
        .await
        .unwrap();
    assert_eq!(
        r.reply,
        Reply::Text {
            content: "你好，我是 AI 助手".into()
        }
    );
    let feedback = sim::wecom_aibot::event_message(&new_msgid(), "zhangsan", "feedback_event");
    let r = app
        .aibot
        .send(&app.aibot_url(), AIBOT_ID, &feedback)
        .await
        .unwrap();
    assert_eq!(r.reply, Reply::Empty);
    let picture = sim::wecom_aibot::message(
        &new_msgid(),
        Chat::Single,
        "zhangsan",
        &app.aibot.new_response_url(),
        "image",
        json!({"url": "https://example.invalid/p.png"}),
    );
    let ex = app
        .aibot
        .converse(&app.aibot_url(), AIBOT_ID, &picture)
        .await
        .unwrap();
    assert!(
        ex.final_content.unwrap().contains("text"),
        "the polite note"
    );
    let quoted = sim::wecom_aibot::with_quote(
        ask(&app, Chat::Single, "这句话什么意思？"),
        "落霞与孤鹜齐飞",
    );
    let ex = app
        .aibot
        .converse(&app.aibot_url(), AIBOT_ID, &quoted)
        .await
        .unwrap();
    assert!(ex.finished);
    let seen = app.llm.requests();
    let (_, asked) = seen.last().unwrap().messages.last().unwrap();
    assert!(
        asked.contains("> 落霞与孤鹜齐飞") && asked.ends_with("这句话什么意思？"),
        "{asked}"
    );
    assert_eq!(
        app.llm.request_count(),
        1,
        "no model call for events and pictures"
    );
}

async fn aibot_bad_callbacks_are_rejected_without_a_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let msg = ask(&app, Chat::Single, "坏请求");
    let (query, body) = app.aibot.sign_callback(AIBOT_ID, &msg);
    let url = app.aibot_url();
    let status = |q: String, b: Vec<u8>| {
        let aibot = app.aibot.clone();
        let url = url.clone();
        async move { aibot.send_raw(&url, &q, &b).await.unwrap().0 }
    };
    let forged = query.replace("msg_signature=", "msg_signature=0");
    assert_eq!(status(forged, body.clone().into_bytes()).await, 401);
    let stale_ts = (shared::now_ms() / 1000 - 7200).to_string();
    let stale = regex_replace_ts(&query, &stale_ts);
    assert_eq!(
        status(stale, body.clone().into_bytes()).await,
        403,
        "stale (and so unsigned)"
    );
    let mut tampered: Value = serde_json::from_str(&body).unwrap();
    let enc = tampered["encrypt"].as_str().unwrap().to_string();
    // Another first character (one encryption in 64 already starts with "A").
    let first = if enc.starts_with('A') { 'B' } else { 'A' };
    tampered["encrypt"] = format!("{first}{}", &enc[1..]).into();
    assert_eq!(
        status(query.clone(), tampered.to_string().into_bytes()).await,
        401
    );
    assert_eq!(status(query.clone(), b"{not json".to_vec()).await, 400);
    assert_eq!(status(query.clone(), vec![b' '; 70 * 1024]).await, 413);
    // Encrypted for another receiver (a self-built app's CorpID), signed correctly.
    let other =
        shared::platform::wecom::crypto::WecomCrypto::new(AIBOT_TOKEN, AIBOT_AES_KEY, CORP_ID)
            .unwrap();
    let encrypt = other.encrypt(&msg.to_string());
    let (ts, nonce) = ((shared::now_ms() / 1000).to_string(), "12345");
    let sig = other.signature(&ts, nonce, &encrypt);
    let q = format!("msg_signature={sig}&timestamp={ts}&nonce={nonce}");
    assert_eq!(
        status(q, json!({"encrypt": encrypt}).to_string().into_bytes()).await,
        403
    );
    // Signed and decrypted, but not a callback WeCom sends.
    let (q, b) = app
        .aibot
        .sign_callback(AIBOT_ID, &json!({"msgid": "x", "msgtype": "text"}));
    assert_eq!(status(q, b.into_bytes()).await, 400);
    let unknown = format!("http://{}/wecom/nobody", app.addr);
    assert_eq!(
        app.aibot
            .send_raw(&unknown, &query, body.as_bytes())
            .await
            .unwrap()
            .0,
        404
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.llm.request_count(), 0);
    // The genuine one still works.
    let ex = app.aibot.converse(&url, AIBOT_ID, &msg).await.unwrap();
    assert_eq!(ex.final_content.as_deref(), Some("Echo: 坏请求 (turn 1)"));
}

/// `query` with its `timestamp` replaced.
fn regex_replace_ts(query: &str, ts: &str) -> String {
    query
        .split('&')
        .map(|p| {
            if p.starts_with("timestamp=") {
                format!("timestamp={ts}")
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

on_both_backends!(
    aibot_single_and_group_chats_stream_to_the_whole_answer,
    aibot_repeats_of_one_msgid_get_one_stream_and_one_answer,
    aibot_late_answers_go_to_the_response_url_once,
    aibot_answers_wecom_stopped_refreshing_go_to_the_response_url,
    aibot_long_answers_end_in_the_stream_and_continue_through_the_response_url,
    aibot_model_failure_ends_the_stream_with_the_friendly_text,
    aibot_welcome_pictures_quotes_and_url_verification,
    aibot_bad_callbacks_are_rejected_without_a_job,
);

/// Refreshes reach another ingress replica than the message did: the progress is in Redis.
#[tokio::test]
async fn aibot_refreshes_are_served_by_a_second_ingress() {
    let app = TestApp::spawn(Backend::Brokers).await;
    let (second, addr) = app.extra_ingress().await;
    app.llm
        .set_stream_pacing(Duration::from_millis(50), 4, Duration::from_millis(60));
    let msg = ask(&app, Chat::Single, "换一台接");
    let first = app
        .aibot
        .send(&app.aibot_url(), AIBOT_ID, &msg)
        .await
        .unwrap();
    let Reply::Stream { id, .. } = first.reply else {
        panic!("{first:?}")
    };
    let other = format!("http://{addr}/wecom/ai");
    let deadline = tokio::time::Instant::now() + WAIT;
    let done = loop {
        let refresh = refresh_message(&new_msgid(), &Chat::Single, "zhangsan", &id);
        let r = app.aibot.send(&other, AIBOT_ID, &refresh).await.unwrap();
        if let Reply::Stream {
            finish: true,
            content,
            ..
        } = r.reply
        {
            break content;
        }
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done, "Echo: 换一台接 (turn 1)");
    assert!(app.aibot.posts().is_empty());
    second.stop().await;
}

/// `parley sim aibot-load` against a running Parley: a small run must account every
/// conversation as answered once in its stream, with every refresh answered.
#[tokio::test]
async fn aibot_load_generator_accounts_every_conversation() {
    let app = TestApp::spawn(Backend::Embedded).await;
    app.llm
        .set_stream_pacing(Duration::from_millis(50), 4, Duration::from_millis(60));
    let mut args = sim::AibotLoadArgs::new(app.aibot_url());
    args.token = AIBOT_TOKEN.into();
    args.encoding_aes_key = AIBOT_AES_KEY.into();
    args.aibot_id = AIBOT_ID.into();
    args.rate = 20.0;
    args.duration_secs = 1;
    args.refresh_interval_ms = 100;
    args.settle_secs = 1;
    let report = sim::run_aibot_load(args).await.unwrap();
    assert_eq!(report.conversations, 20, "{report}");
    assert_eq!(report.finished_in_stream, 20, "{report}");
    assert_eq!(
        (report.lost, report.duplicated, report.wrong, report.errors),
        (0, 0, 0, 0),
        "{report}"
    );
    assert_eq!(report.failed_refreshes, 0, "{report}");
    assert!(report.refreshes >= 20, "{report}");
    assert_eq!(app.llm.request_count(), 20);
}
