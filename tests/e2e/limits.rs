//! The model contract across the cluster: the request limit shared by every worker, "busy"
//! at once instead of a late answer, per-chatter quotas, and each bot's access policy.

use crate::helpers::*;
use sim::ConversationType;
use std::time::Duration;

/// The fake model's requests, as ms since the first, in arrival order.
fn arrivals(app: &TestApp) -> Vec<i64> {
    let mut at: Vec<i64> = app
        .llm
        .requests()
        .iter()
        .map(|r| r.received_at_ms)
        .collect();
    at.sort_unstable();
    let first = at.first().copied().unwrap_or_default();
    at.iter().map(|t| t - first).collect()
}

/// Two worker processes share one limit of 600 calls a minute in Redis: while 1,000
/// questions wait, the model sees 600 ± 5 % in the first 60 s, and every one is answered in
/// the end or told to come back (none is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_600_requests_a_minute() {
    let app = TestApp::spawn_opts(Options {
        backend: Backend::Brokers,
        llm: "requests_per_minute = 600\nmax_concurrency = 64".into(),
        ..Options::default()
    })
    .await;
    let second = app.extra_worker().await;
    for i in 0..1000 {
        let spec = app.spec(
            &format!("msg-rpm-{i}"),
            &format!("cid-rpm-{i}"),
            ConversationType::OneToOne,
            "hi",
        );
        assert_eq!(app.send(&spec).await.status(), 200);
    }
    // The first 60 s of calls, plus a little for the last of them to arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let at = arrivals(&app);
        if at.last().is_some_and(|t| *t >= 61_000) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} calls", at.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let at = arrivals(&app);
    let in_first_minute = at.iter().filter(|t| **t < 60_000).count();
    assert!(
        (570..=630).contains(&in_first_minute),
        "{in_first_minute} calls in the first 60 s of a 600/min limit"
    );
    // No second of it ran far above the pace (10 a second at once, then one per 100 ms).
    let busiest = (0..60)
        .map(|s| at.iter().filter(|t| **t / 1000 == s).count())
        .max()
        .unwrap();
    assert!(busiest <= 21, "{busiest} calls in one second");
    second.stop().await;
}

/// A call that could not start before `max_wait_secs` is not made: the chatter hears at
/// once that the bot is busy.
async fn busy_is_answered_at_once_instead_of_late(backend: Backend) {
    // 80 a minute: 2 at once, then one per 750 ms; with 2 s allowed the 5th (2.25 s) and
    // the 6th are too late.
    let app = TestApp::spawn_opts(Options {
        backend,
        llm: "requests_per_minute = 80".into(),
        extra: "[limits]\nmax_wait_secs = 2\n".into(),
        ..Options::default()
    })
    .await;
    for i in 0..6 {
        let spec = app.spec(
            &format!("msg-busy-{i}"),
            &format!("cid-busy-{i}"),
            ConversationType::OneToOne,
            "hi",
        );
        assert_eq!(app.send(&spec).await.status(), 200);
    }
    let replies = app.replies(6).await;
    let busy: Vec<_> = replies
        .iter()
        .filter(|r| r.content.contains("try again shortly"))
        .collect();
    assert_eq!(busy.len(), 2, "{replies:#?}");
    let first = replies.iter().map(|r| r.received_at_ms).min().unwrap();
    assert!(
        busy.iter().all(|r| r.received_at_ms - first < 1500),
        "busy answers come at once: {replies:#?}"
    );
    app.assert_settled_at(6).await;
    assert_eq!(app.llm.request_count(), 4);
    assert!(
        app.metrics()
            .await
            .contains("parley_limit_rejections_total{kind=\"rpm\"}")
    );
}

/// A chatter over `user_messages_per_minute` gets the quota reply and no model call.
async fn a_chatter_over_quota_gets_the_quota_reply(backend: Backend) {
    let app = TestApp::spawn_opts(Options {
        backend,
        extra: "[limits]\nuser_messages_per_minute = 2\nquota_reply = \"今天到此为止\"\n".into(),
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        let spec = app.one_to_one(&format!("msg-quota-{i}"), &format!("问题 {i}"));
        assert_eq!(app.send(&spec).await.status(), 200);
        app.replies(i + 1).await;
    }
    let replies = app.replies(3).await;
    assert_eq!(replies[2].content, "今天到此为止", "{replies:#?}");
    assert!(replies[..2].iter().all(|r| r.content.starts_with("Echo: ")));
    app.assert_settled_at(3).await;
    assert_eq!(app.llm.request_count(), 2);
}

async fn spawn_with_bot(backend: Backend, bot: &str, extra: &str) -> TestApp {
    TestApp::spawn_opts(Options {
        backend,
        dingtalk: bot.into(),
        extra: extra.into(),
        ..Options::default()
    })
    .await
}

/// Denied users and conversations, and `groups = false`, get no model call; with
/// `deny_reply` they are told so, without it they hear nothing.
async fn the_access_policy_keeps_the_model_from_who_it_denies(backend: Backend) {
    let app = spawn_with_bot(backend, "groups = false\ndeny_users = [\"staff-7\"]", "").await;
    let mut denied_user = app.one_to_one("msg-pol-1", "你好");
    denied_user.sender_staff_id = "staff-7".into();
    assert_eq!(app.send(&denied_user).await.status(), 200);
    assert_eq!(
        app.send(&app.group("msg-pol-2", "群里问")).await.status(),
        200
    );
    assert_eq!(
        app.send(&app.one_to_one("msg-pol-3", "私聊问"))
            .await
            .status(),
        200
    );
    let replies = app.replies(1).await;
    assert_eq!(replies[0].content, "Echo: 私聊问 (turn 1)");
    app.assert_settled_at(1).await;
    assert_eq!(
        app.llm.request_count(),
        1,
        "only the allowed one asked the model"
    );
    app.stop().await;

    let app = spawn_with_bot(
        backend,
        "deny_conversations = [\"cid-group-1==\"]\ndeny_reply = \"这个群不开放\"\nallow_users = [\"staff-42\"]",
        "",
    )
    .await;
    assert_eq!(
        app.send(&app.group("msg-pol-4", "群里问")).await.status(),
        200
    );
    let mut stranger = app.one_to_one("msg-pol-5", "我能用吗");
    stranger.sender_staff_id = "staff-9".into();
    assert_eq!(app.send(&stranger).await.status(), 200);
    let replies = app.replies(2).await;
    assert!(
        replies.iter().all(|r| r.content == "这个群不开放"),
        "{replies:#?}"
    );
    app.assert_settled_at(2).await;
    assert_eq!(app.llm.request_count(), 0);
}

/// An admin may ask `/status` and is not held to the chatters' quotas; others get the help.
async fn admins_see_the_status_and_have_no_quota(backend: Backend) {
    let app = spawn_with_bot(
        backend,
        "admin_users = [\"staff-42\"]",
        "[limits]\nuser_messages_per_minute = 1\n",
    )
    .await;
    assert_eq!(
        app.send(&app.one_to_one("msg-adm-1", "/status"))
            .await
            .status(),
        200
    );
    let status = &app.replies(1).await[0].content;
    assert!(status.contains("requests/min 60000"), "{status}");
    assert!(status.contains("messages/min 1"), "{status}");
    for i in 2..4 {
        let spec = app.one_to_one(&format!("msg-adm-{i}"), &format!("问题 {i}"));
        assert_eq!(app.send(&spec).await.status(), 200);
        app.replies(i).await;
    }
    let mut other = app.one_to_one("msg-adm-4", "/status");
    other.sender_staff_id = "staff-9".into();
    assert_eq!(app.send(&other).await.status(), 200);
    let replies = app.replies(4).await;
    assert!(replies[1].content.starts_with("Echo: ") && replies[2].content.starts_with("Echo: "));
    assert!(
        replies[3].content.contains("/reset"),
        "non-admins get the help: {replies:#?}"
    );
    assert_eq!(app.llm.request_count(), 2);
}

on_both_backends!(
    busy_is_answered_at_once_instead_of_late,
    a_chatter_over_quota_gets_the_quota_reply,
    the_access_policy_keeps_the_model_from_who_it_denies,
    admins_see_the_status_and_have_no_quota,
);

/// A bot's own model and a conversation's own system prompt reach the model.
#[tokio::test]
async fn per_bot_and_per_conversation_overrides_reach_the_model() {
    let app = spawn_with_bot(
        Backend::Embedded,
        "model = \"bot-model\"\n[[bots.conversations]]\nid = \"cid-group-1==\"\nsystem_prompt = \"你是财务群的助手。\"\nmodel = \"finance-model\"",
        "",
    )
    .await;
    assert_eq!(
        app.send(&app.group("msg-ovr-1", "报销")).await.status(),
        200
    );
    assert_eq!(
        app.send(&app.one_to_one("msg-ovr-2", "你好"))
            .await
            .status(),
        200
    );
    app.replies(2).await;
    let seen = app.llm.requests();
    let group = seen
        .iter()
        .find(|r| r.messages.iter().any(|(_, c)| c == "报销"))
        .unwrap();
    assert_eq!(group.model, "finance-model");
    assert_eq!(
        group.messages[0],
        ("system".into(), "你是财务群的助手。".into())
    );
    let single = seen
        .iter()
        .find(|r| r.messages.iter().any(|(_, c)| c == "你好"))
        .unwrap();
    assert_eq!(single.model, "bot-model");
    assert_eq!(single.messages[0].1, "You are a test assistant.");
}

/// The primary upstream failing: answers come from the second; after five failed calls the
/// primary's breaker opens and it is no longer asked; after the cool-down one call probes
/// it and, as it answers again, it serves once more.
#[tokio::test]
async fn a_failing_upstream_is_skipped_and_taken_back_when_it_recovers() {
    let backup = sim::FakeLlm::start(
        "127.0.0.1:0".parse().unwrap(),
        sim::FakeLlmOptions {
            api_key: "sk-backup-123456".into(),
            ..sim::FakeLlmOptions::default()
        },
    )
    .await
    .unwrap();
    // The stack's fake model is the primary; its URL and key are the stack's.
    let app = TestApp::spawn_opts(Options {
        llm: format!(
            "breaker_cooldown_secs = 2\n\
             [[llm.upstreams]]\nname = \"e2e-primary\"\nbase_url = \"{{LLM}}\"\napi_key = \"{API_KEY}\"\n\
             [[llm.upstreams]]\nname = \"e2e-backup\"\nbase_url = \"{}\"\napi_key = \"sk-backup-123456\"\nmodel = \"backup-model\"\n",
            backup.base_url()
        ),
        ..Options::default()
    })
    .await;
    // Every attempt of five calls (each tried 3 times: max_retries = 2) fails.
    for _ in 0..15 {
        app.llm.push_failure(503, None);
    }
    let ask = |i: usize| app.one_to_one(&format!("msg-up-{i}"), &format!("问题 {i}"));
    for i in 0..5 {
        assert_eq!(app.send(&ask(i)).await.status(), 200);
        app.replies(i + 1).await;
    }
    assert_eq!(app.llm.request_count(), 15);
    assert_eq!(backup.request_count(), 5);
    assert!(backup.requests().iter().all(|r| r.model == "backup-model"));
    assert!(
        app.metrics()
            .await
            .contains("parley_llm_breaker_state{upstream=\"e2e-primary\"} 1")
    );
    for i in 5..8 {
        assert_eq!(app.send(&ask(i)).await.status(), 200);
        app.replies(i + 1).await;
    }
    assert_eq!(
        app.llm.request_count(),
        15,
        "the open breaker skips the primary"
    );
    assert_eq!(backup.request_count(), 8);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for i in 8..10 {
        assert_eq!(app.send(&ask(i)).await.status(), 200);
        app.replies(i + 1).await;
    }
    assert_eq!(app.llm.request_count(), 17, "probed, closed, serving again");
    assert_eq!(backup.request_count(), 8);
    let replies = app.replies(10).await;
    assert!(
        replies.iter().all(|r| r.content.starts_with("Echo: ")),
        "{replies:#?}"
    );
    assert!(
        app.metrics()
            .await
            .contains("parley_llm_breaker_state{upstream=\"e2e-primary\"} 0")
    );
    backup.shutdown();
}

/// An Azure upstream gets Azure's request: the deployment in the path, `api-version` in the
/// query, the key in `api-key`.
#[tokio::test]
async fn an_azure_upstream_gets_azures_request_shape() {
    let app = TestApp::spawn_opts(Options {
        llm: format!(
            "[[llm.upstreams]]\nname = \"e2e-azure\"\nkind = \"azure\"\nbase_url = \"{{LLM_ROOT}}\"\n\
             api_key = \"{API_KEY}\"\nmodel = \"gpt4o-prod\"\napi_version = \"2024-10-21\"\n"
        ),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.send(&app.one_to_one("msg-az-1", "你好")).await.status(),
        200
    );
    assert_eq!(app.replies(1).await[0].content, "Echo: 你好 (turn 1)");
    let seen = app.llm.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, "gpt4o-prod", "the deployment from the path");
}

/// Model calls reach the upstream through an HTTP proxy (the upstream's own `proxy`) and
/// through a SOCKS5 proxy (`[llm] proxy`).
#[tokio::test]
async fn model_calls_go_through_http_and_socks5_proxies() {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let http = sim::FakeProxy::http(any).await.unwrap();
    let socks = sim::FakeProxy::socks5(any).await.unwrap();
    for (llm, proxy) in [
        (
            format!(
                "[[llm.upstreams]]\nname = \"e2e-via-http\"\nbase_url = \"{{LLM}}\"\napi_key = \"{API_KEY}\"\nproxy = \"{}\"\n",
                http.url()
            ),
            &http,
        ),
        (format!("proxy = \"{}\"\n", socks.url()), &socks),
    ] {
        let app = TestApp::spawn_opts(Options {
            llm,
            ..Options::default()
        })
        .await;
        assert_eq!(
            app.send(&app.one_to_one("msg-px-1", "经代理"))
                .await
                .status(),
            200
        );
        assert_eq!(app.replies(1).await[0].content, "Echo: 经代理 (turn 1)");
        let model = app.llm.base_url();
        let host = model.trim_start_matches("http://").trim_end_matches("/v1");
        assert_eq!(proxy.targets(), vec![host.to_string()], "{}", proxy.url());
        app.stop().await;
    }
    http.shutdown();
    socks.shutdown();
}

/// A WeCom AI bot's stream ends, empty, for a message its policy does not answer: the
/// chatter is not left with a stream that never finishes, and nothing goes to the
/// response_url.
#[tokio::test]
async fn a_denied_ai_bot_message_ends_its_stream_empty() {
    let app = TestApp::spawn_opts(Options {
        aibot: "deny_users = [\"zhangsan\"]".into(),
        ..Options::default()
    })
    .await;
    app.aibot.set_options(sim::AibotOptions {
        refresh_interval: Duration::from_millis(100),
        ..sim::AibotOptions::default()
    });
    let msg = sim::wecom_aibot::text_message(
        &sim::wecom_aibot::new_msgid(),
        sim::Chat::Single,
        "zhangsan",
        "你好",
        &app.aibot.new_response_url(),
    );
    let ex = app
        .aibot
        .converse(&app.aibot_url(), AIBOT_ID, &msg)
        .await
        .unwrap();
    assert!(ex.finished, "{ex:?}");
    assert_eq!(ex.final_content.as_deref(), Some(""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.aibot.posts().is_empty());
    assert_eq!(app.llm.request_count(), 0);
}
