//! `parley demo`: the README's first command. It starts the built-in fakes of DingTalk and
//! of an OpenAI-compatible model, runs the real serve path (embedded queue and cache) wired
//! to them, plays a few realistic conversations through signed callbacks — a group @, a
//! one-to-one chat, a follow-up that needs the history, `/reset` — prints each exchange
//! with what the model was sent, and exits 0 only if every message got its answer.

use crate::app::Application;
use anyhow::{Context, ensure};
use shared::config::Settings;
use sim::{CallbackSpec, ConversationType, FakeApp, FakeLlmOptions, FakeStack};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const APP_KEY: &str = "demo-app";
const APP_SECRET: &str = "demo-secret";

struct Step {
    conversation: &'static str,
    kind: ConversationType,
    who: &'static str,
    text: &'static str,
}

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let stack = FakeStack::builder()
        .dingtalk_bot("demo", FakeApp::new(APP_KEY, APP_SECRET))
        .llm(FakeLlmOptions {
            api_key: "sk-demo".into(),
            latency: Duration::from_millis(150),
            ..FakeLlmOptions::default()
        })
        .model(
            "fake-gpt",
            r#"system_prompt = "You are Parley's demo assistant.""#,
        )
        .start()
        .await?;
    let (dingtalk, llm) = (
        stack.dingtalk.clone().context("no fake DingTalk")?,
        &stack.llm,
    );
    // A data directory of its own, so the demo runs beside a `parley serve` and leaves nothing.
    let data = std::env::temp_dir().join(format!("parley-demo-{}", std::process::id()));
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[queue]\npath = {:?}\n{}",
        data,
        stack.config_toml()
    );
    let settings = Settings::from_toml(&toml, |_| None)?;
    let app = Application::build(settings).await?;
    let url = format!("http://{}/dingtalk/demo", app.address());
    println!(
        "Parley demo: serve path on {} (admin {}), embedded queue and cache",
        app.address(),
        app.admin_address()
    );
    println!(
        "fake DingTalk at {}, fake model at {}\n",
        dingtalk.base_url(),
        llm.base_url()
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let steps = [
        Step {
            conversation: "cid-demo-group==",
            kind: ConversationType::Group,
            who: "张伟",
            text: "帮我总结一下今天站会的要点",
        },
        Step {
            conversation: "cid-demo-single==",
            kind: ConversationType::OneToOne,
            who: "李娜",
            text: "What is the capital of France?",
        },
        Step {
            conversation: "cid-demo-single==",
            kind: ConversationType::OneToOne,
            who: "李娜",
            text: "And of Germany?",
        },
        Step {
            conversation: "cid-demo-single==",
            kind: ConversationType::OneToOne,
            who: "李娜",
            text: "/reset",
        },
        Step {
            conversation: "cid-demo-single==",
            kind: ConversationType::OneToOne,
            who: "李娜",
            text: "And of Germany?",
        },
    ];
    let client = reqwest::Client::new();
    for (i, step) in steps.iter().enumerate() {
        let where_ = match step.kind {
            ConversationType::Group => "group chat, @Parley",
            ConversationType::OneToOne => "one-to-one chat",
        };
        println!("── {} ({where_}) {}: {}", i + 1, step.who, step.text);
        let spec = CallbackSpec {
            msg_id: format!("msg-demo-{i}"),
            conversation_id: step.conversation.into(),
            conversation_type: step.kind,
            sender_staff_id: format!("staff-{}", step.who.len()),
            sender_nick: step.who.into(),
            text: step.text.into(),
            robot_code: APP_KEY.into(),
            msgtype: "text".into(),
        };
        let body = serde_json::to_vec(&dingtalk.callback_body(&spec))?;
        let before = llm.request_count();
        let resp = sim::send_callback(&client, &url, APP_SECRET, &body).await?;
        ensure!(
            resp.status().is_success(),
            "callback refused: {}",
            resp.status()
        );
        let replies = dingtalk.wait_for(i + 1, Duration::from_secs(10)).await;
        let reply = replies.get(i).context("no answer within 10 s")?;
        if llm.request_count() > before {
            let req = llm.requests().pop().context("model request not recorded")?;
            println!(
                "   model was sent {} messages (system prompt + {} of history + the question)",
                req.messages.len(),
                req.messages.len().saturating_sub(2)
            );
        } else {
            println!("   (answered by Parley itself, no model call)");
        }
        let at = if reply.at_user_ids.is_empty() {
            String::new()
        } else {
            format!(" @{}", step.who)
        };
        println!(
            "   Parley{at} [{:?}, {}]: {}\n",
            reply.via, reply.msgtype, reply.content
        );
    }
    shutdown.cancel();
    let stopped = running.await;
    let _ = std::fs::remove_dir_all(&data);
    stopped??;
    ensure!(
        dingtalk.sent().len() == steps.len(),
        "expected exactly one answer per message"
    );
    println!(
        "Every message got exactly one answer. Next: write parley.toml (see parley.example.toml) and run `parley serve`."
    );
    stack.shutdown();
    Ok(())
}
