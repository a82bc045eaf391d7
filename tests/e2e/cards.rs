//! DingTalk AI cards end to end: answers streaming into cards, within the app's API limits,
//! and every way a card can fail ending in exactly one complete answer.

use crate::helpers::*;
use sim::{CardFault, CardUpdate, ConversationType, FakeCard};
use std::time::Duration;

const CARD: &str = "reply_mode = \"card\"\ncard_update_interval_ms = 200";

async fn card_app(backend: Backend, extra: &str) -> TestApp {
    let app = TestApp::spawn_opts(Options {
        backend,
        dingtalk: format!("{CARD}\n{extra}"),
        ..Options::default()
    })
    .await;
    // About 1.2 s of streaming for a short question: several updates at 200 ms.
    app.llm
        .set_stream_pacing(Duration::from_millis(100), 2, Duration::from_millis(100));
    app
}

async fn one_finished_card(app: &TestApp) -> FakeCard {
    let cards = app.dingtalk.wait_for_finished_cards(1, WAIT).await;
    assert_eq!(cards.len(), 1, "{cards:?}");
    // Nothing else follows: no second card, no message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.dingtalk.cards().len(), 1);
    assert!(app.dingtalk.sent().is_empty(), "{:?}", app.dingtalk.sent());
    app.dingtalk.card(&cards[0].out_track_id).unwrap()
}

fn assert_streamed(card: &FakeCard, answer: &str, interval_ms: i64) {
    assert!(card.finalized && !card.errored, "{card:?}");
    assert_eq!(card.content["msgContent"], answer);
    let last = card.updates.last().unwrap();
    assert!(last.is_finalize && last.is_full && last.content == answer);
    assert_eq!(
        card.updates.iter().filter(|u| u.is_finalize).count(),
        1,
        "one final update and nothing after it"
    );
    let between: Vec<&CardUpdate> = card.updates.iter().filter(|u| !u.is_finalize).collect();
    assert!(!between.is_empty(), "the answer streamed: {card:?}");
    for u in &between {
        assert!(u.is_full && answer.starts_with(&u.content), "{u:?}");
    }
    // At most one update per interval (a little slack for the loopback's jitter).
    for pair in between.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(gap >= interval_ms - 20, "updates {gap} ms apart");
    }
}

async fn group_card_streams_and_finishes_with_the_whole_answer(backend: Backend) {
    let app = card_app(backend, "").await;
    let resp = app.send(&app.group("c1", "stream me please")).await;
    assert_eq!(resp.status(), 200);
    let card = one_finished_card(&app).await;
    assert_eq!(
        card.template_id,
        "382e4302-551d-4880-bf29-a30acfab2e71.schema"
    );
    assert_eq!(card.space_ids, ["dtv1.card//IM_GROUP.cid-group-1=="]);
    assert_eq!(card.at_user_ids, ["staff-42"]);
    assert_streamed(&card, "Echo: stream me please (turn 1)", 200);
    assert!(
        app.llm.requests()[0].stream,
        "the model was asked to stream"
    );
    let m = app.metrics().await;
    assert!(m.contains("parley_first_content_seconds_bucket"));
    assert!(m.contains("parley_card_updates_bucket"));
    assert!(m.contains(r#"api="card_stream",outcome="ok""#));
}

async fn one_to_one_card_goes_to_the_robot_chat(backend: Backend) {
    let app = card_app(backend, "").await;
    assert_eq!(
        app.send(&app.one_to_one("c2", "hello card")).await.status(),
        200
    );
    let card = one_finished_card(&app).await;
    assert_eq!(card.space_ids, ["dtv1.card//IM_ROBOT.staff-42"]);
    assert!(card.at_user_ids.is_empty());
    assert_streamed(&card, "Echo: hello card (turn 1)", 200);
}

async fn card_api_refusing_means_one_plain_message(backend: Backend) {
    for fault in [
        CardFault::TemplateUnpublished,
        CardFault::NoPermission,
        CardFault::ServerError,
    ] {
        let app = card_app(backend, "").await;
        app.dingtalk.refuse_cards(Some(fault));
        assert_eq!(app.send(&app.group("r1", "refused")).await.status(), 200);
        let replies = app.replies(1).await;
        assert_eq!(replies[0].content, "Echo: refused (turn 1)", "{fault:?}");
        app.assert_settled_at(1).await;
        assert!(
            app.dingtalk.cards().iter().all(|c| !c.is_finished()),
            "{fault:?}"
        );
    }
}

async fn budget_too_low_for_a_card_means_a_plain_message(backend: Backend) {
    let app = card_app(backend, "api_monthly_budget = 5").await;
    assert_eq!(app.send(&app.group("b1", "cheap")).await.status(), 200);
    let replies = app.replies(1).await;
    assert_eq!(replies[0].via, sim::Via::SessionWebhook, "not metered");
    assert_eq!(replies[0].content, "Echo: cheap (turn 1)");
    app.assert_settled_at(1).await;
    assert!(app.dingtalk.cards().is_empty());
    assert_eq!(app.dingtalk.metered_calls(), 0);
    assert!(
        app.metrics()
            .await
            .contains(r#"parley_platform_budget_remaining{bot="main"} 5"#)
    );
}

async fn model_failing_mid_stream_marks_the_card_failed_with_the_friendly_text(backend: Backend) {
    let app = card_app(backend, "").await;
    app.llm.push_stream_error(10);
    assert_eq!(
        app.send(&app.group("e1", "break please")).await.status(),
        200
    );
    let cards = app.dingtalk.wait_for_finished_cards(1, WAIT).await;
    let card = &cards[0];
    assert!(card.errored, "{card:?}");
    let last = card.updates.last().unwrap();
    assert!(last.is_error && last.is_finalize);
    assert!(last.content.contains("Sorry"), "{}", last.content);
    assert_eq!(
        app.llm.request_count(),
        1,
        "shown text is never asked for again"
    );
    assert!(app.dingtalk.sent().is_empty());
}

async fn reasoning_never_reaches_the_card(backend: Backend) {
    let app = card_app(backend, "").await;
    app.llm.push_reasoning(
        "SECRET chain of thought",
        "<think>hidden</think>The answer.",
    );
    assert_eq!(app.send(&app.group("t1", "think hard")).await.status(), 200);
    let card = one_finished_card(&app).await;
    assert_eq!(card.content["msgContent"], "The answer.");
    for u in &card.updates {
        assert!(!u.content.contains("SECRET") && !u.content.contains("hidden"));
        assert!(!u.content.contains("<think"), "{u:?}");
    }
    assert!(!card.params.values().any(|v| v.contains("SECRET")));
}

async fn many_cards_share_the_endpoints_without_throttling(backend: Backend) {
    let app = card_app(backend, "").await;
    // Two workers share the limit through Redis on the brokers backend.
    let _second = match backend {
        Backend::Brokers => Some(app.extra_worker().await),
        Backend::Embedded => None,
    };
    let n = 60;
    let specs: Vec<_> = (0..n)
        .map(|i| {
            app.spec(
                &format!("many-{i}"),
                &format!("cid-many-{i}"),
                ConversationType::Group,
                &format!("question number {i}"),
            )
        })
        .collect();
    for r in futures::future::join_all(specs.iter().map(|s| app.send(s))).await {
        assert_eq!(r.status(), 200);
    }
    // Every question answered once: as a finished card, or (when its card could not be
    // opened in time) as one message.
    let answered = || {
        let cards = app.dingtalk.cards();
        cards.iter().filter(|c| c.finalized).count() + app.dingtalk.sent().len()
    };
    let deadline = tokio::time::Instant::now() + 4 * WAIT;
    while answered() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(), n);
    let cards: Vec<FakeCard> = app.dingtalk.cards();
    let sent = app.dingtalk.sent();
    let conversations: std::collections::HashSet<String> = sent
        .iter()
        .filter_map(|m| m.conversation_id.clone())
        .chain(cards.iter().flat_map(|c| {
            c.space_ids
                .iter()
                .map(|s| s.trim_start_matches("dtv1.card//IM_GROUP.").to_string())
        }))
        .collect();
    assert_eq!(conversations.len(), n, "one answer per conversation");
    eprintln!("{} cards, {} plain messages", cards.len(), sent.len());
    for c in &cards {
        assert!(c.finalized, "{c:?}");
    }
    for (key, stats) in app.dingtalk.endpoint_stats() {
        assert_eq!(stats.throttled, 0, "{key:?} {stats:?}");
        assert!(stats.peak_per_second <= 20, "{key:?} {stats:?}");
    }
}

async fn platform_throttling_anyway_is_backed_off_and_each_question_answered_once(
    backend: Backend,
) {
    let app = card_app(backend, "").await;
    // The platform allows less than Parley was told: it throttles, Parley backs off.
    app.dingtalk.set_api_qps(2);
    let n = 8;
    let specs: Vec<_> = (0..n)
        .map(|i| {
            app.spec(
                &format!("thr-{i}"),
                &format!("cid-thr-{i}"),
                ConversationType::OneToOne,
                &format!("throttle me {i}"),
            )
        })
        .collect();
    for s in &specs {
        let mut body = app.body(s);
        expire_session(&mut body);
        assert_eq!(app.send_body(&body).await.status(), 200);
    }
    let done = || {
        let finished = app.dingtalk.cards().iter().filter(|c| c.finalized).count();
        finished + app.dingtalk.sent().len()
    };
    let deadline = tokio::time::Instant::now() + 6 * WAIT;
    while done() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        done(),
        n,
        "cards {:?} sent {:?}",
        app.dingtalk.cards(),
        app.dingtalk.sent()
    );
    let throttled: u64 = app
        .dingtalk
        .endpoint_stats()
        .values()
        .map(|s| s.throttled)
        .sum();
    assert!(throttled > 0, "the fake did throttle");
    // One answer per question: a finished card or one message, never both, never two.
    let mut answers = std::collections::HashMap::new();
    for c in app.dingtalk.cards().iter().filter(|c| c.finalized) {
        let text = c.content["msgContent"].clone();
        *answers.entry(text).or_insert(0) += 1;
    }
    for m in app.dingtalk.sent() {
        *answers.entry(m.content.clone()).or_insert(0) += 1;
    }
    for i in 0..n {
        let want = format!("Echo: throttle me {i} (turn 1)");
        assert_eq!(answers.get(&want), Some(&1), "{want}: {answers:?}");
    }
}

async fn a_slow_message_answer_sends_one_working_notice(backend: Backend) {
    let app = TestApp::spawn_opts(Options {
        backend,
        dingtalk: "working_notice_secs = 1".into(),
        ..Options::default()
    })
    .await;
    app.llm.set_latency(Duration::from_millis(1800));
    assert_eq!(
        app.send(&app.group("w1", "take your time")).await.status(),
        200
    );
    let replies = app.replies(2).await;
    assert!(replies[0].content.contains("Working on it"), "{replies:?}");
    assert_eq!(replies[1].content, "Echo: take your time (turn 1)");
    app.llm.set_latency(Duration::ZERO);
    assert_eq!(app.send(&app.group("w2", "quick")).await.status(), 200);
    app.replies(3).await;
    app.assert_settled_at(3).await;
}

on_both_backends!(
    platform_throttling_anyway_is_backed_off_and_each_question_answered_once,
    a_slow_message_answer_sends_one_working_notice,
    group_card_streams_and_finishes_with_the_whole_answer,
    one_to_one_card_goes_to_the_robot_chat,
    card_api_refusing_means_one_plain_message,
    budget_too_low_for_a_card_means_a_plain_message,
    model_failing_mid_stream_marks_the_card_failed_with_the_friendly_text,
    reasoning_never_reaches_the_card,
    many_cards_share_the_endpoints_without_throttling,
);
