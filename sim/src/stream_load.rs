//! `parley sim stream-load`: DingTalk bot messages pushed at a fixed rate through the fake's
//! Stream gateway to whatever Parley ingresses connected to it (the bot's `api_base` must
//! point at `--fake-listen`), with `disconnect` frames at chosen moments.
//!
//! The report answers what the Stream figures ask: the time from a frame's send to its ack
//! on the socket (measured by the gateway, so it holds the ingress's parse, the broker's
//! confirm and both WebSocket hops), the time from each `disconnect` to the first message
//! a connection opened after it received, and whether every message was answered exactly
//! once (the fake model's answer echoes the question; answers arrive on the fake's
//! sessionWebhook), none lost, none duplicated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::dingtalk::{CallbackSpec, FakeApp, FakeDingTalk, StreamDelivery};
use super::load::Percentiles;

/// Options of `parley sim stream-load`.
#[derive(clap::Args, Debug, Clone)]
pub struct StreamLoadArgs {
    /// Where the fake DingTalk (Stream gateway, OpenAPI, sessionWebhooks) listens; the bot's
    /// `api_base` must be it.
    #[arg(long, default_value = "127.0.0.1:19130")]
    pub fake_listen: SocketAddr,
    /// The robot app as KEY:SECRET.
    #[arg(long, default_value = "stream-app:stream-secret")]
    pub app: FakeApp,
    /// Open connections to wait for before the first message (one per ingress process).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// `one`: each message to one connection; `every`: a copy to each.
    #[arg(long, default_value = "one")]
    pub delivery: String,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// For how long messages are pushed.
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    /// Conversations the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Seconds into the run at which every connection is sent `disconnect` (repeatable).
    #[arg(long = "disconnect-at")]
    pub disconnect_at: Vec<u64>,
    /// Re-push an unacknowledged message after this many ms (the platform: ~60 s).
    #[arg(long, default_value_t = 60_000)]
    pub repush_ms: u64,
    /// After the last message, how long to wait for answers (and late duplicates).
    #[arg(long, default_value_t = 20)]
    pub settle_secs: u64,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamLoadReport {
    /// Messages pushed.
    pub pushed: u64,
    /// Messages pushed per second, median over full seconds.
    pub push_rate_p50: u64,
    /// Messages acknowledged with code 200 (each at least once).
    pub acked: u64,
    /// Acks received in all (copies to every connection, re-pushes).
    pub acks: u64,
    /// Acks with a code other than 200.
    pub error_acks: u64,
    /// Frame sent → its ack received, as the gateway measured it.
    pub ack_ms: Percentiles,
    /// Frames sent again (a lost ack, a connection gone).
    pub repushes: u64,
    /// Connections opened during the run.
    pub connections_opened: u64,
    /// For each `disconnect`: ms until a connection opened after it received a message.
    pub reconnect_ms: Vec<u64>,
    /// Messages answered exactly once.
    pub answered_once: u64,
    /// Messages never answered.
    pub lost: u64,
    /// Messages answered more than once.
    pub duplicated: u64,
}

/// Runs the load and prints the report.
pub async fn run_stream_load(args: StreamLoadArgs) -> anyhow::Result<StreamLoadReport> {
    let delivery = match args.delivery.as_str() {
        "one" => StreamDelivery::One,
        "every" => StreamDelivery::Every,
        other => bail!("--delivery: expected one or every, got {other:?}"),
    };
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let key = args.app.app_key.clone();
    let fake = FakeDingTalk::start(args.fake_listen, vec![args.app.clone()]).await?;
    fake.set_stream_delivery(delivery);
    fake.set_stream_repush_after(Duration::from_millis(args.repush_ms));
    eprintln!(
        "fake DingTalk {}: waiting for {} Stream connection(s) of {key}",
        fake.base_url(),
        args.connections
    );
    if !fake
        .wait_for_stream_connections(&key, args.connections, Duration::from_secs(120))
        .await
    {
        bail!("fewer than {} Stream connections opened", args.connections);
    }
    let opened_before = fake.stream_connections(&key).len();
    let total = (args.rate * args.duration_secs as f64).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now();
    let mut disconnects: Vec<u64> = args.disconnect_at.clone();
    disconnects.sort_unstable();
    let mut disconnect_times: Vec<i64> = Vec::new();
    let mut per_second: Vec<u64> = vec![0; args.duration_secs as usize + 1];
    let mut texts: Vec<String> = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        while disconnects
            .first()
            .is_some_and(|s| start.elapsed() >= Duration::from_secs(*s))
        {
            disconnects.remove(0);
            disconnect_times.push(shared::now_ms());
            fake.stream_disconnect(&key);
        }
        let text = format!("stream load {i}");
        let conversation = format!("cid-stream-{}==", i as usize % args.conversations.max(1));
        let mut spec = CallbackSpec::one_to_one(&key, &format!("staff-{i}"), &text);
        spec.conversation_id = conversation;
        fake.stream_push(&spec);
        texts.push(text);
        let second = (start.elapsed().as_secs() as usize).min(per_second.len() - 1);
        per_second[second] += 1;
    }
    let mut full: Vec<u64> = per_second
        .iter()
        .take(args.duration_secs as usize)
        .copied()
        .collect();
    full.sort_unstable();
    // Answers: wait until each has one, or the settle time is up; then a little for late
    // duplicates.
    let deadline = Instant::now() + Duration::from_secs(args.settle_secs);
    loop {
        if fake.sent().len() >= texts.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answers: HashMap<String, u64> = HashMap::new();
    for m in fake.sent() {
        // "Echo: stream load 17 (turn 3)" → "stream load 17"
        let question = m
            .content
            .strip_prefix("Echo: ")
            .and_then(|rest| rest.rsplit_once(" (turn "))
            .map(|(q, _)| q.to_string())
            .unwrap_or(m.content);
        *answers.entry(question).or_default() += 1;
    }
    let mut report = StreamLoadReport {
        pushed: total,
        push_rate_p50: full.get(full.len() / 2).copied().unwrap_or(0),
        ..StreamLoadReport::default()
    };
    for t in &texts {
        match answers.get(t).copied().unwrap_or(0) {
            0 => report.lost += 1,
            1 => report.answered_once += 1,
            _ => report.duplicated += 1,
        }
    }
    let acks = fake.stream_acks();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut acked: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for a in &acks {
        if a.code == 200 {
            acked.insert(a.message_id.as_str());
            hist.record(a.latency.as_micros().max(1) as u64)?;
        } else {
            report.error_acks += 1;
        }
    }
    report.acks = acks.len() as u64;
    report.acked = acked.len() as u64;
    report.ack_ms = Percentiles::from_histogram(&hist);
    report.repushes = fake
        .stream_deliveries()
        .iter()
        .filter(|d| d.attempt > 1)
        .count() as u64;
    let connections = fake.stream_connections(&key);
    report.connections_opened = (connections.len() - opened_before) as u64;
    for t in disconnect_times {
        let first = connections
            .iter()
            .filter(|c| c.opened_at_ms >= t)
            .filter_map(|c| c.first_delivery_at_ms)
            .min();
        report.reconnect_ms.push(match first {
            Some(at) => u64::try_from(at - t).unwrap_or(0),
            None => u64::MAX,
        });
    }
    print_report(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    fake.shutdown();
    Ok(report)
}

fn print_report(r: &StreamLoadReport) {
    let p = &r.ack_ms;
    println!(
        "pushed {} (median {}/s over full seconds); acked {} ({} acks, {} not 200); re-pushed {}",
        r.pushed, r.push_rate_p50, r.acked, r.acks, r.error_acks, r.repushes
    );
    println!(
        "frame -> ack: p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
    println!(
        "connections opened during the run {}; disconnect -> new connection receiving: {:?} ms",
        r.connections_opened, r.reconnect_ms
    );
    println!(
        "answered once {}, lost {}, duplicated {}",
        r.answered_once, r.lost, r.duplicated
    );
}
