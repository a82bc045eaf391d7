//! DingTalk Stream mode end to end: the bot `main` set to `ingress = "stream"`, its messages
//! pushed by the fake's Stream gateway over the WebSocket Parley opened, acknowledged once
//! queued, answered through the same worker path as HTTP callbacks. Several ingresses,
//! both delivery modes, lost acks, `disconnect`, a killed replica and bad credentials.

use crate::helpers::*;
use sim::StreamDelivery;
use std::collections::HashMap;
use std::time::Duration;

/// Room for a re-push or a reconnect on top of the answer itself.
const LONG_WAIT: Duration = Duration::from_secs(30);

async fn stream_app(opts: Options) -> TestApp {
    let opts = Options {
        dingtalk: format!("ingress = \"stream\"\n{}", opts.dingtalk),
        ..opts
    };
    let app = TestApp::spawn_opts(opts).await;
    assert!(
        app.dingtalk
            .wait_for_stream_connections(APP_KEY, 1, WAIT)
            .await,
        "Parley never opened a Stream connection"
    );
    app
}

async fn stream_on(backend: Backend) -> TestApp {
    stream_app(Options {
        backend,
        ..Options::default()
    })
    .await
}

/// Pushes `n` one-to-one messages, each in a conversation of its own; returns their texts.
fn push(app: &TestApp, tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let text = format!("{tag} {i}");
            let spec = app.spec(
                &format!("{tag}-{i}"),
                &format!("cid-{tag}-{i}=="),
                sim::ConversationType::OneToOne,
                &text,
            );
            app.dingtalk.stream_push(&spec);
            text
        })
        .collect()
}

/// Waits for one answer to each of `texts` and asserts no text got two.
async fn assert_answered_once(app: &TestApp, texts: &[String], within: Duration) {
    let replies = app.dingtalk.wait_for(texts.len(), within).await;
    let mut answers: HashMap<&str, usize> = HashMap::new();
    for r in &replies {
        *answers.entry(r.content.as_str()).or_default() += 1;
    }
    for t in texts {
        let want = format!("Echo: {t} (turn 1)");
        assert_eq!(
            answers.get(want.as_str()).copied().unwrap_or(0),
            1,
            "{t:?} not answered exactly once: {replies:#?}"
        );
    }
    app.assert_settled_at(texts.len()).await;
}

async fn stream_messages_are_acknowledged_once_queued_and_answered_once(backend: Backend) {
    let app = stream_on(backend).await;
    let texts = push(&app, "flow", 10);
    let acks = app.dingtalk.wait_for_stream_acks(10, WAIT).await;
    assert_eq!(acks.len(), 10, "{acks:#?}");
    for ack in &acks {
        assert_eq!(ack.code, 200, "{ack:#?}");
        let data: serde_json::Value = serde_json::from_str(&ack.data).unwrap();
        assert_eq!(data["response"], "OK");
    }
    assert_answered_once(&app, &texts, WAIT).await;
    assert_eq!(app.dingtalk.stream_pending(APP_KEY), 0);
    // The bot's HTTP route is off: a signed callback finds no bot.
    let resp = app.send(&app.one_to_one("http-1", "hi")).await;
    assert_eq!(resp.status(), 404);
    let m = app.metrics().await;
    assert!(
        m.contains(r#"parley_stream_connection_state{bot="main",state="connected"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"parley_stream_frames_total{bot="main",outcome="queued",type="callback"}"#)
    );
    assert!(m.contains("parley_stream_ack_seconds_bucket{bot=\"main\""));
    app.stop().await;
}

#[tokio::test]
async fn stream_pings_are_answered_with_their_data() {
    let app = stream_on(Backend::Embedded).await;
    let ids = app.dingtalk.stream_ping(APP_KEY);
    assert_eq!(ids.len(), 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pings = app.dingtalk.stream_pings();
        if let Some(p) = pings.iter().find(|p| p.message_id == ids[0] && p.answered) {
            assert!(p.answer_matches, "{p:#?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ping unanswered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Answering a ping leaves the connection as it was.
    assert_eq!(app.dingtalk.stream_connections(APP_KEY).len(), 1);
}

async fn disconnect_is_followed_by_a_new_connection_with_a_new_ticket_and_nothing_lost(
    backend: Backend,
) {
    let app = stream_on(backend).await;
    let mut texts = push(&app, "before", 5);
    app.dingtalk.stream_disconnect(APP_KEY);
    texts.extend(push(&app, "during", 5));
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.dingtalk.stream_connections(APP_KEY).len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_answered_once(&app, &texts, LONG_WAIT).await;
    let conns = app.dingtalk.stream_connections(APP_KEY);
    assert_eq!(
        conns.len(),
        2,
        "one connection per bot at a time: {conns:#?}"
    );
    assert_ne!(conns[0].ticket, conns[1].ticket);
    let closed = conns[0].closed_at_ms.expect("the old connection is closed");
    assert!(closed <= conns[1].opened_at_ms, "{conns:#?}");
    assert!(
        app.metrics()
            .await
            .contains(r#"parley_stream_reconnects_total{bot="main",cause="disconnect"}"#)
    );
}

async fn a_message_pushed_again_after_a_lost_ack_is_answered_once(backend: Backend) {
    let app = stream_on(backend).await;
    app.dingtalk
        .set_stream_repush_after(Duration::from_millis(300));
    app.dingtalk.stream_lose_acks(1);
    let texts = push(&app, "lost", 1);
    assert_answered_once(&app, &texts, LONG_WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.dingtalk.stream_pending(APP_KEY) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliveries = app.dingtalk.stream_deliveries();
    assert!(deliveries.len() >= 2, "{deliveries:#?}");
    assert!(
        deliveries
            .iter()
            .all(|d| d.message_id == deliveries[0].message_id)
    );
    app.assert_settled_at(1).await;
}

#[tokio::test]
async fn unparseable_frames_get_an_error_ack_and_the_connection_carries_on() {
    let app = stream_on(Backend::Embedded).await;
    let topic = "/v1.0/im/bot/messages/get";
    let bad = [
        app.dingtalk
            .stream_push_raw(APP_KEY, "CALLBACK", topic, "not json"),
        app.dingtalk
            .stream_push_raw(APP_KEY, "CALLBACK", topic, "{}"),
        app.dingtalk.stream_push_raw(
            APP_KEY,
            "CALLBACK",
            topic,
            r#"{"msgId":"x","conversationType":"3","conversationId":"c"}"#,
        ),
    ];
    let other = app
        .dingtalk
        .stream_push_raw(APP_KEY, "NOTIFY", "/v1.0/some/new/kind", "{}");
    let acks = app.dingtalk.wait_for_stream_acks(4, WAIT).await;
    let code = |id: &str| acks.iter().find(|a| a.message_id == id).map(|a| a.code);
    for id in &bad {
        assert_eq!(code(id), Some(400), "{acks:#?}");
    }
    assert_eq!(code(&other), Some(404), "{acks:#?}");
    let texts = push(&app, "after", 1);
    assert_answered_once(&app, &texts, WAIT).await;
    assert_eq!(app.llm.request_count(), 1, "no model call for a bad frame");
    assert_eq!(app.dingtalk.stream_connections(APP_KEY).len(), 1);
}

async fn two_ingresses(delivery: StreamDelivery) {
    let app = stream_app(Options {
        backend: Backend::Brokers,
        ..Options::default()
    })
    .await;
    app.dingtalk.set_stream_delivery(delivery);
    let (second, _) = app.extra_ingress().await;
    assert!(
        app.dingtalk
            .wait_for_stream_connections(APP_KEY, 2, WAIT)
            .await
    );
    let texts = push(&app, "pair", 20);
    assert_answered_once(&app, &texts, LONG_WAIT).await;
    let copies = match delivery {
        StreamDelivery::One => 20,
        StreamDelivery::Every => 40,
    };
    let acks = app.dingtalk.wait_for_stream_acks(copies, WAIT).await;
    assert_eq!(acks.len(), copies);
    let by_connection: std::collections::HashSet<_> =
        acks.iter().map(|a| a.connection_id.clone()).collect();
    assert_eq!(by_connection.len(), 2, "both ingresses took messages");
    second.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn two_ingresses_answer_each_message_once_when_one_connection_gets_it() {
    two_ingresses(StreamDelivery::One).await;
}

#[tokio::test]
async fn two_ingresses_answer_each_message_once_when_every_connection_gets_it() {
    two_ingresses(StreamDelivery::Every).await;
}

#[tokio::test]
async fn when_one_ingress_is_killed_the_other_carries_on() {
    let app = stream_app(Options {
        backend: Backend::Brokers,
        ..Options::default()
    })
    .await;
    app.dingtalk.set_stream_repush_after(Duration::from_secs(2));
    let (second, _) = app.extra_ingress().await;
    assert!(
        app.dingtalk
            .wait_for_stream_connections(APP_KEY, 2, WAIT)
            .await
    );
    let mut texts = push(&app, "kill", 10);
    second.kill().await;
    texts.extend(push(&app, "survivor", 10));
    assert_answered_once(&app, &texts, Duration::from_secs(10)).await;
    app.stop().await;
}

#[tokio::test]
async fn bad_credentials_leave_the_ingress_not_ready_without_a_crash() {
    let app = TestApp::spawn_opts(Options {
        dingtalk: "ingress = \"stream\"".into(),
        // Metrics are process-wide: a bot id of its own keeps other tests' gauges apart.
        replace: vec![
            (
                format!("app_secret = \"{APP_SECRET}\""),
                "app_secret = \"wrong-secret\"".into(),
            ),
            ("id = \"main\"".into(), "id = \"badcreds\"".into()),
        ],
        wait_ready: false,
        ..Options::default()
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let resp = app.admin_get("/readyz").await;
        if resp.status() == 503 {
            let text = resp.text().await.unwrap();
            assert!(text.contains("dingtalk_stream"), "{text}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = app.dingtalk.stream_open_refusals();
    assert!(refused >= 1);
    // It keeps trying, backing off, and stays alive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(app.dingtalk.stream_open_refusals() < refused + 5);
    assert_eq!(app.admin_get("/healthz").await.status(), 200);
    assert_eq!(app.dingtalk.open_stream_connections(APP_KEY), 0);
    let m = app.metrics().await;
    assert!(
        m.contains(r#"parley_stream_connection_state{bot="badcreds",state="auth_failed"} 1"#),
        "{m}"
    );
    assert!(!m.contains("wrong-secret"));
    app.stop().await;
}

on_both_backends!(
    stream_messages_are_acknowledged_once_queued_and_answered_once,
    disconnect_is_followed_by_a_new_connection_with_a_new_ticket_and_nothing_lost,
    a_message_pushed_again_after_a_lost_ack_is_answered_once,
);
