//! Parley's simulation kit: faithful fakes of the platforms and the model, and the load
//! generators, kept out of the production crates. [`FakeDingTalk`] plays DingTalk's side
//! (access tokens, robot sends, AI cards, sessionWebhooks, signed callbacks, the Stream-mode
//! WebSocket gateway, the gateway's QPS and monthly limits), [`FakeWecom`] WeCom's (access
//! tokens, message/send, encrypted callbacks), [`FakeAibot`] WeCom's side of an AI bot
//! (智能机器人: encrypted JSON callbacks, stream refreshes paced like WeCom's, the one-shot
//! `response_url`),
//! [`FakeLlm`] an OpenAI-compatible Chat Completions endpoint (with paced SSE
//! streams and scripted mid-stream faults), [`FakeRobots`] the group-robot webhooks
//! notifications go to, [`FakeProxy`] an HTTP or SOCKS5 forward proxy; [`FakeStack`]
//! starts the ones asked for together with a configuration
//! pointing at them (used by `parley demo`, the end-to-end tests and `parley sim serve`).
//! [`run_load`] is an
//! open-loop callback generator for benchmarks, [`run_aibot_load`] the same for AI-bot
//! conversations with their stream refreshes, [`run_chaos_load`] steady callbacks while the
//! fakes fail on a schedule, each message accounted (lost, duplicated, dead-lettered), and
//! [`run_notify_load`] a notification burst against fake robots. The fakes speak the wire formats of PROTOCOLS.md, record what they
//! receive, accept scripted faults, bind port 0 in tests and start in milliseconds. This
//! crate depends on `parley-shared` for wire types, signing and crypto, never on the binary:
//! whoever needs a running Parley starts it and points it at these fakes.

pub mod aibot_load;
pub mod chaos_load;
pub mod dingtalk;
pub mod load;
pub mod notify_load;
pub mod openai;
pub mod proxy;
pub mod record;
pub mod robots;
pub mod stack;
pub mod stream_load;
pub mod wecom;
pub mod wecom_aibot;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

pub use aibot_load::{AibotLoadArgs, AibotLoadReport, run_aibot_load};
pub use chaos_load::{
    ChaosLoadArgs, ChaosReport, DeadLetterSeen, Fault, FaultKind, MessageTrace, run_chaos_load,
};
pub use dingtalk::{
    CallbackSpec, CardFault, CardUpdate, ConversationType, EndpointStats, FakeApp, FakeCard,
    FakeDingTalk, SentMessage, StreamAck, StreamClosedBy, StreamConnection, StreamDelivery,
    StreamDeliveryRecord, StreamPing, Via, send_callback,
};
pub use load::{
    CallsPerCard, CardReport, EndpointReport, Expect, LoadArgs, LoadReport, Percentiles,
    ReplyReport, run_load,
};
pub use notify_load::{NotifyLoadArgs, NotifyLoadReport, RobotReport, run_notify_load};
pub use openai::{ChatRequestSeen, FakeLlm, FakeLlmOptions};
pub use proxy::FakeProxy;
pub use robots::{FakeRobots, Refused, RobotKind, RobotMessage, max_in_any_window};
pub use stack::{FakeStack, FakeStackBuilder};
pub use stream_load::{StreamLoadArgs, StreamLoadReport, run_stream_load};
pub use wecom::{FakeWecom, FakeWecomApp, WecomSent};
pub use wecom_aibot::{
    AibotOptions, Chat, Exchange, FakeAibot, FakeAibotApp, PassiveReply, Refresh, Reply,
    ResponsePost,
};

/// `parley sim …` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SimCommand {
    /// Run the fake DingTalk and the fake OpenAI-compatible model until Ctrl-C.
    Serve {
        /// Listen address of the fake DingTalk (OpenAPI gateway and sessionWebhooks).
        #[arg(long, default_value = "127.0.0.1:9100")]
        dingtalk_listen: SocketAddr,
        /// Listen address of the fake model (`/v1/chat/completions`).
        #[arg(long, default_value = "127.0.0.1:9200")]
        openai_listen: SocketAddr,
        /// A robot app as KEY:SECRET (repeatable).
        #[arg(
            long = "app",
            value_name = "KEY:SECRET",
            default_value = "demo-app:demo-secret"
        )]
        apps: Vec<FakeApp>,
        /// The API key the fake model accepts.
        #[arg(long, default_value = "sk-sim")]
        api_key: String,
        /// Delay before every model answer, in ms.
        #[arg(long, default_value_t = 0)]
        llm_latency_ms: u64,
        /// Every Nth model request gets a 500 (0 = never).
        #[arg(long, default_value_t = 0)]
        llm_fail_every: usize,
        /// Streamed answers: delay before the first token, in ms.
        #[arg(long, default_value_t = 0)]
        llm_first_token_ms: u64,
        /// Streamed answers: characters per chunk (0 = four chunks).
        #[arg(long, default_value_t = 0)]
        llm_chunk_chars: usize,
        /// Streamed answers: delay between chunks, in ms.
        #[arg(long, default_value_t = 0)]
        llm_chunk_interval_ms: u64,
        /// Listen address of the fake group robots (DingTalk custom robots, WeCom group
        /// robots) that notification channels push into.
        #[arg(long, default_value = "127.0.0.1:9300")]
        robots_listen: SocketAddr,
        /// A DingTalk custom robot as ACCESS_TOKEN or ACCESS_TOKEN:SEC… (signed) (repeatable).
        #[arg(long = "dingtalk-robot", value_name = "TOKEN[:SECRET]")]
        dingtalk_robots: Vec<String>,
        /// A WeCom group robot by its webhook KEY (repeatable).
        #[arg(long = "wecom-robot", value_name = "KEY")]
        wecom_robots: Vec<String>,
    },
    /// Send signed callbacks at a fixed rate to an ingress and measure acks and replies
    /// (messages, or with `--expect cards` DingTalk AI cards and their API calls).
    Load(LoadArgs),
    /// Queue many notifications at once and measure how fast fake robots receive them.
    NotifyLoad(NotifyLoadArgs),
    /// Hold WeCom AI-bot conversations at a fixed arrival rate, refreshing each stream to
    /// its end, and measure refresh latency and whether every message got one answer.
    AibotLoad(AibotLoadArgs),
    /// Push DingTalk bot messages at a fixed rate through a fake Stream gateway to the
    /// ingresses connected to it; measure frame → ack, reconnects and one answer per message.
    StreamLoad(StreamLoadArgs),
    /// Send DingTalk callbacks at a fixed rate while the fake model and platform fail on a
    /// schedule (429 storms, stalls, outages, throttling); account every message: sent,
    /// acknowledged, answered, lost, duplicated, dead-lettered (`bench/chaos.sh`).
    ChaosLoad(ChaosLoadArgs),
}

/// Runs a `parley sim` subcommand to completion.
pub async fn run(cmd: SimCommand) -> anyhow::Result<()> {
    match cmd {
        SimCommand::Serve {
            dingtalk_listen,
            openai_listen,
            apps,
            api_key,
            llm_latency_ms,
            llm_fail_every,
            llm_first_token_ms,
            llm_chunk_chars,
            llm_chunk_interval_ms,
            robots_listen,
            dingtalk_robots,
            wecom_robots,
        } => {
            let app_keys: Vec<String> = apps.iter().map(|a| a.app_key.clone()).collect();
            let stack = apps
                .into_iter()
                .fold(FakeStack::builder(), |b, app| {
                    b.dingtalk_bot(app.app_key.clone(), app)
                })
                .dingtalk_listen(dingtalk_listen)
                .llm_listen(openai_listen)
                .robots_listen(robots_listen)
                .llm(FakeLlmOptions {
                    api_key,
                    latency: Duration::from_millis(llm_latency_ms),
                    fail_every: llm_fail_every,
                    stream_first_token: Duration::from_millis(llm_first_token_ms),
                    stream_chunk_chars: llm_chunk_chars,
                    stream_chunk_interval: Duration::from_millis(llm_chunk_interval_ms),
                })
                .start()
                .await?;
            let dingtalk = stack.dingtalk.clone().context("no --app given")?;
            let (llm, robots) = (
                &stack.llm,
                stack.robots.clone().context("robots not started")?,
            );
            println!(
                "fake DingTalk  {}  (apps: {})",
                dingtalk.base_url(),
                app_keys.join(", ")
            );
            println!("fake OpenAI    {}", llm.base_url());
            for spec in &dingtalk_robots {
                let (token, secret) = match spec.split_once(':') {
                    Some((token, secret)) => (token, Some(secret)),
                    None => (spec.as_str(), None),
                };
                println!(
                    "fake robot     {}",
                    robots.add_dingtalk_robot(token, secret, &[])
                );
            }
            for key in &wecom_robots {
                println!("fake robot     {}", robots.add_wecom_robot(key));
            }
            println!("Ctrl-C to stop");
            let echo = tokio::spawn(print_replies(dingtalk.clone()));
            let pushed = tokio::spawn(print_robot_messages(robots.clone()));
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            echo.abort();
            pushed.abort();
            stack.shutdown();
            Ok(())
        }
        SimCommand::Load(args) => run_load(args).await.map(|_| ()),
        SimCommand::NotifyLoad(args) => run_notify_load(args).await,
        SimCommand::AibotLoad(args) => run_aibot_load(args).await.map(|_| ()),
        SimCommand::StreamLoad(args) => run_stream_load(args).await.map(|_| ()),
        SimCommand::ChaosLoad(args) => run_chaos_load(args).await.map(|_| ()),
    }
}

/// Prints every message the fake DingTalk accepts, one line each, as it arrives.
async fn print_replies(dingtalk: FakeDingTalk) {
    let mut shown = 0;
    loop {
        let sent = dingtalk
            .wait_for(shown + 1, Duration::from_secs(3600))
            .await;
        for msg in sent.iter().skip(shown) {
            let to = msg
                .conversation_id
                .clone()
                .unwrap_or_else(|| msg.user_ids.join(","));
            println!("← {:?} to {to} [{}]: {}", msg.via, msg.msgtype, msg.content);
        }
        shown = shown.max(sent.len());
    }
}

/// Prints every message a fake robot accepts, one line each, as it arrives.
async fn print_robot_messages(robots: FakeRobots) {
    let mut shown = 0;
    loop {
        let received = robots.wait_for(shown + 1, Duration::from_secs(3600)).await;
        for msg in received.iter().skip(shown) {
            println!(
                "⇢ {:?} robot {} [{}]: {}",
                msg.kind, msg.robot, msg.msgtype, msg.content
            );
        }
        shown = shown.max(received.len());
    }
}

/// The address to put in URLs for a server bound to `addr`: an unspecified IP (0.0.0.0 or
/// ::) becomes the loopback address of the same family.
pub(crate) fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The first value of `name` in a raw query, percent-decoded the way the platforms'
/// servlet containers do (`+` is a space, `%2B` a plus).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Serves `router` on `listener` in the background until `stop` is cancelled; every fake
/// starts this way.
pub(crate) fn serve_fake(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: tokio_util::sync::CancellationToken,
    name: &'static str,
) {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, fake = name, "fake server stopped");
        }
    });
}
