//! `parley sim chaos-load`: steady DingTalk traffic through a Parley deployment while its
//! model and its platform misbehave on a schedule, accounted message by message
//! (`bench/chaos.sh` adds the process faults: SIGKILLed workers and servers, closed broker
//! connections, a restarted Redis).
//!
//! The driver hosts the fake DingTalk (the bot's `api_base`: OpenAPI, sessionWebhooks) and
//! the fake model, and POSTs signed callbacks to the ingress at a fixed open-loop rate. A
//! callback that is not answered 2xx (a 503 while the queue is away, a reset or refused
//! connection while a server restarts) is sent again with the same `msgId`, as the platform
//! does, until it is acknowledged or the retry window ends. Every message carries its own
//! sessionWebhook, minted for it alone, and a share of them an expired one, so that their
//! answers go through the OpenAPI robot send to a sender of their own: every reply the fake
//! records belongs to exactly one message. A reply is the model's answer (`Echo: <the
//! question> (turn n)`: checked to be this message's question), an apology that stands for
//! an answer (the model failed after its retries, the limits made it too late), the
//! notice that the message was given up (dead-lettered), or something unexpected.
//!
//! Faults the driver plays itself (`--fault KIND@START+SECS`, seconds from the first
//! message): `model-429` (every model call answered 429 with `Retry-After`), `model-stall`
//! (calls arriving in the window hang `--stall-secs` before answering), `platform-fail`
//! (every send answered 503), `platform-throttle` (the OpenAPI's QPS limit at 1 and about
//! half of each second's sends refused as throttled: errcode 130101 on the sessionWebhook,
//! 403 `QpsLimit…` on the OpenAPI).
//!
//! Once the last message is sent, the run waits (up to `--drain-secs`) until every
//! acknowledged message is answered or dead-lettered — dead letters come from
//! `--dead-letters-cmd`, a command printing `parley dlq list` lines — then `--settle-secs`
//! more for late duplicates, and reports: sent, acknowledged, answered, lost (acknowledged,
//! neither answered nor dead-lettered), duplicated (more than one answer), dead-lettered
//! with their reasons.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::dingtalk::{
    CALLBACK_SESSION_TTL, CallbackSpec, DEFAULT_API_QPS, FakeApp, FakeDingTalk, SentMessage, Via,
    send_callback,
};
use super::load::Percentiles;
use super::openai::{FakeLlm, FakeLlmOptions};

/// The label of the sessionWebhook minted for message `i` is this prefix and `i`: the fake
/// records it as the conversation of every reply sent through that webhook.
const SESSION_LABEL: &str = "chaos-m";
/// The sender of message `i` when its answer must go through the OpenAPI: this prefix and `i`.
const OPENAPI_SENDER: &str = "chaos-oapi-";
/// How the worker's apologies and notices end (worker/src/texts.rs), with the kind each is
/// reported as. The first two stand for an answer; the others do not.
const REPLY_TEXTS: [(&str, ReplyKind); 4] = [
    (
        "(Sorry, I can't answer right now. Please try again in a moment.)",
        ReplyKind::Apology("model_failed"),
    ),
    (
        "(I'm busy right now. Please try again shortly.)",
        ReplyKind::Apology("busy"),
    ),
    (
        "(Sorry, I could not deliver an answer to that message. Please send it again later.)",
        ReplyKind::GaveUp,
    ),
    ("(Working on it, one moment…)", ReplyKind::Working),
];
/// How often the replies are followed and progress shown.
const TICK: Duration = Duration::from_secs(1);
/// How often progress is printed while messages are sent.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often the dead letters are read while the run drains.
const DEAD_LETTERS_EVERY: Duration = Duration::from_secs(5);
/// Longest the dead-letter command may take.
const DEAD_LETTERS_TIMEOUT: Duration = Duration::from_secs(90);
/// Lost and duplicated messages kept in the report, for looking them up in the logs.
const TRACES_KEPT: usize = 1000;
/// Of those, shown in the printed report.
const TRACES_SHOWN: usize = 10;
/// Dead letters listed one by one in the report at most (all are counted by reason).
const DEAD_LETTERS_KEPT: usize = 200;
/// The most callbacks in flight at once; beyond it the schedule waits (and the achieved
/// rate shows it).
const MAX_IN_FLIGHT: usize = 2048;

/// Options of `parley sim chaos-load`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosLoadArgs {
    /// Ingress callback URL, e.g. `http://127.0.0.1:18480/dingtalk/chaos`.
    #[arg(long)]
    pub target: String,
    /// The robot app as KEY:SECRET: its callbacks are signed with the secret, and the fake
    /// DingTalk issues its tokens.
    #[arg(long, default_value = "chaos-app:chaos-secret")]
    pub app: FakeApp,
    /// Where the fake DingTalk listens: the bot's `api_base`.
    #[arg(long, default_value = "127.0.0.1:19140")]
    pub dingtalk_listen: SocketAddr,
    /// Where the fake model listens (`[llm] base_url` is it with `/v1`).
    #[arg(long, default_value = "127.0.0.1:19240")]
    pub openai_listen: SocketAddr,
    /// The key the fake model accepts.
    #[arg(long, default_value = "sk-chaos")]
    pub api_key: String,
    /// The fake model's time to answer outside stalls, ms.
    #[arg(long, default_value_t = 100)]
    pub model_latency_ms: u64,
    /// How long a model call that arrives during a `model-stall` hangs, seconds.
    #[arg(long, default_value_t = 30)]
    pub stall_secs: u64,
    /// The `Retry-After` of a `model-429` storm's answers, seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// For how long messages are sent, seconds.
    #[arg(long, default_value_t = 300)]
    pub duration_secs: u64,
    /// One-to-one conversations the messages go round (the OpenAPI share excepted).
    #[arg(long, default_value_t = 500)]
    pub conversations: usize,
    /// Share of messages whose sessionWebhook has expired, so their answers go through the
    /// OpenAPI robot send (paced by Parley, limited by the fake), each to a sender of its own.
    #[arg(long, default_value_t = 0.1)]
    pub openapi_share: f64,
    /// The fake's OpenAPI calls per route in any second outside throttling (the bot's
    /// `api_qps` should not be above it).
    #[arg(long, default_value_t = DEFAULT_API_QPS)]
    pub api_qps: u32,
    /// A fault on the schedule as KIND@START+SECS (repeatable), seconds from the first
    /// message; KIND is model-429, model-stall, platform-fail or platform-throttle.
    #[arg(long = "fault", value_name = "KIND@START+SECS")]
    pub faults: Vec<Fault>,
    /// Wait for this URL to answer 2xx (up to 3 minutes) before the first message, e.g. the
    /// ingress's `/readyz`.
    #[arg(long)]
    pub ready_url: Option<String>,
    /// A refused callback is sent again after 1, 2, 4, 8, 8, … s for up to this long after
    /// its first try, as the platform retries; then it counts as never acknowledged.
    #[arg(long, default_value_t = 120)]
    pub retry_window_secs: u64,
    /// Timeout of one callback request, seconds.
    #[arg(long, default_value_t = 10)]
    pub request_timeout_secs: u64,
    /// After the last message, how long to wait for every acknowledged message to be
    /// answered or dead-lettered.
    #[arg(long, default_value_t = 300)]
    pub drain_secs: u64,
    /// Once drained, how much longer to watch for late duplicates.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
    /// A shell command printing the deployment's dead letters as `parley dlq list` does (one
    /// `ID<TAB>N attempt(s)<TAB>AT_MS<TAB>REASON` line each); run while the run drains and at
    /// its end.
    #[arg(long)]
    pub dead_letters_cmd: Option<String>,
    /// Write every reply the fake recorded to this file, one JSON object a line (message
    /// number and msgId, route, kind, arrival in ms since the epoch, text), for looking up
    /// lost and duplicated messages.
    #[arg(long)]
    pub replies_out: Option<std::path::PathBuf>,
    /// A name for the run, shown in the report.
    #[arg(long, default_value = "chaos")]
    pub label: String,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

impl ChaosLoadArgs {
    /// The defaults of the command line for a run against `target`.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            app: FakeApp::new("chaos-app", "chaos-secret"),
            dingtalk_listen: SocketAddr::from(([127, 0, 0, 1], 19140)),
            openai_listen: SocketAddr::from(([127, 0, 0, 1], 19240)),
            api_key: "sk-chaos".to_owned(),
            model_latency_ms: 100,
            stall_secs: 30,
            retry_after_secs: 1,
            rate: 100.0,
            duration_secs: 300,
            conversations: 500,
            openapi_share: 0.1,
            api_qps: DEFAULT_API_QPS,
            faults: Vec::new(),
            ready_url: None,
            retry_window_secs: 120,
            request_timeout_secs: 10,
            drain_secs: 300,
            settle_secs: 30,
            dead_letters_cmd: None,
            replies_out: None,
            label: "chaos".to_owned(),
            json: false,
        }
    }
}

/// What a fault does while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Every model call is answered 429 with `Retry-After`.
    Model429,
    /// Model calls arriving in the window hang `--stall-secs` before answering.
    ModelStall,
    /// Every send to the platform is answered 503.
    PlatformFail,
    /// The OpenAPI's QPS limit drops to 1 and about half of each second's sends are refused
    /// as throttled.
    PlatformThrottle,
}

impl FaultKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Model429 => "model-429",
            Self::ModelStall => "model-stall",
            Self::PlatformFail => "platform-fail",
            Self::PlatformThrottle => "platform-throttle",
        }
    }
}

/// One scheduled fault: `KIND@START+SECS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// What it does.
    pub kind: FaultKind,
    /// Seconds from the first message to its start.
    pub start_secs: u64,
    /// How long it lasts, seconds.
    pub secs: u64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}+{}",
            self.kind.as_str(),
            self.start_secs,
            self.secs
        )
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected KIND@START+SECS (e.g. model-429@40+15), got {s:?}");
        let (kind, when) = s.split_once('@').ok_or_else(bad)?;
        let (start, secs) = when.split_once('+').ok_or_else(bad)?;
        let kind = match kind {
            "model-429" => FaultKind::Model429,
            "model-stall" => FaultKind::ModelStall,
            "platform-fail" => FaultKind::PlatformFail,
            "platform-throttle" => FaultKind::PlatformThrottle,
            other => {
                return Err(format!(
                    "unknown fault {other:?}: model-429, model-stall, platform-fail or platform-throttle"
                ));
            }
        };
        let start_secs = start.parse().map_err(|_| bad())?;
        let secs: u64 = secs.parse().map_err(|_| bad())?;
        if secs == 0 {
            return Err(format!("{s:?}: a fault lasts at least a second"));
        }
        Ok(Self {
            kind,
            start_secs,
            secs,
        })
    }
}

/// One dead letter of this run's messages, as the dead-letter command listed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterSeen {
    /// The job id (`dingtalk:{bot}:{msgId}`).
    pub id: String,
    /// Attempts made, as listed (`5 attempt(s)`).
    pub attempts: String,
    /// Why it was given up.
    pub reason: String,
}

/// A lost or duplicated message, for looking it up in the logs and the fault schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageTrace {
    /// Its msgId (the job id is `dingtalk:{bot}:{msgId}`).
    pub msg_id: String,
    /// When it was first sent, seconds from the first message.
    pub sent_at_s: f64,
    /// When each of its answers arrived, seconds from the first message.
    pub answered_at_s: Vec<f64>,
}

impl fmt::Display for MessageTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sent t={:.1} s", self.msg_id, self.sent_at_s)?;
        if !self.answered_at_s.is_empty() {
            let at: Vec<String> = self
                .answered_at_s
                .iter()
                .map(|s| format!("{s:.1}"))
                .collect();
            write!(f, ", answered t={} s", at.join(", "))?;
        }
        Ok(())
    }
}

/// What a chaos run came to.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChaosReport {
    /// The run's name (`--label`).
    pub label: String,
    /// Requested rate, messages per second.
    pub target_rate: f64,
    /// Requested sending time, seconds.
    pub duration_secs: u64,
    /// Messages sent (each once, whatever its retries).
    pub sent: u64,
    /// Messages sent per second of sending.
    pub achieved_rate: f64,
    /// Callback requests in all, the platform-style retries included.
    pub callbacks: u64,
    /// Messages refused at least once (non-2xx or a transport failure) and sent again.
    pub refused_then_retried: u64,
    /// Refused callback requests by cause: the HTTP status, `timeout`, `connect` or
    /// `transport`.
    pub refusals: BTreeMap<String, u64>,
    /// Messages answered 2xx by the ingress (at some attempt).
    pub acknowledged: u64,
    /// Messages never answered 2xx within the retry window: the platform gives up on them;
    /// they are not Parley's to answer (and are not counted lost).
    pub never_acknowledged: u64,
    /// Acknowledged messages with at least one answer: the model's or an apology.
    pub answered: u64,
    /// Of those, answered by the model with their own question.
    pub answered_by_model: u64,
    /// Of those, answered with an apology, by kind (`model_failed`, `busy`).
    pub answered_with_apology: BTreeMap<String, u64>,
    /// Messages answered that the ingress never acknowledged (it queued them, then failed
    /// to say so): not lost, counted apart.
    pub answered_unacknowledged: u64,
    /// Acknowledged messages neither answered nor dead-lettered.
    pub lost: u64,
    /// Messages with more than one answer.
    pub duplicated: u64,
    /// Acknowledged messages dead-lettered (listed, or announced by the gave-up notice).
    pub dead_lettered: u64,
    /// Dead letters by reason (a reason seen only as the gave-up notice is
    /// `(gave-up notice only)`).
    pub dead_letter_reasons: BTreeMap<String, u64>,
    /// The dead letters of this run's messages, as listed (at most 200).
    pub dead_letters: Vec<DeadLetterSeen>,
    /// Messages both answered and dead-lettered or told they were given up.
    pub answered_and_given_up: u64,
    /// Gave-up notices received.
    pub gave_up_notices: u64,
    /// "Working on it" notices received.
    pub working_notices: u64,
    /// Model answers that echo another message's question than the one they answer.
    pub misdirected: u64,
    /// Replies of no message of this run.
    pub unattributed: u64,
    /// Replies whose text is none of the expected ones.
    pub unexpected: u64,
    /// The first unexpected reply, for diagnosis.
    pub first_unexpected: Option<String>,
    /// When the first message was sent, ms since the epoch (the `t=0` of the traces).
    pub started_at_ms: i64,
    /// The lost messages (the first 1,000).
    pub lost_messages: Vec<MessageTrace>,
    /// The duplicated messages (the first 1,000).
    pub duplicated_messages: Vec<MessageTrace>,
    /// From a message's first send to its first answer.
    pub reply_latency_ms: Percentiles,
    /// From the last message's send to the moment every acknowledged message was answered
    /// or dead-lettered, ms (None: not within `--drain-secs`).
    pub drained_after_ms: Option<u64>,
    /// Whether the dead letters could be read at the end (None: no command given).
    pub dead_letters_read: Option<bool>,
    /// Model calls the fake model received (failed ones included).
    pub model_requests: u64,
    /// The faults played, as given.
    pub faults: Vec<String>,
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "chaos run {}", self.label)?;
        writeln!(
            f,
            "  faults played by the driver: {}",
            if self.faults.is_empty() {
                "none".to_owned()
            } else {
                self.faults.join(" ")
            }
        )?;
        writeln!(
            f,
            "  sent                {:>7}   ({:.1}/s for {} s; {} callback requests with the platform's retries)",
            self.sent, self.achieved_rate, self.duration_secs, self.callbacks
        )?;
        writeln!(
            f,
            "  refused, retried    {:>7}   messages refused at least once, sent again as the platform does ({})",
            self.refused_then_retried,
            if self.refusals.is_empty() {
                "none".to_owned()
            } else {
                by(&self.refusals)
            }
        )?;
        writeln!(f, "  acknowledged        {:>7}", self.acknowledged)?;
        writeln!(
            f,
            "  never acknowledged  {:>7}   (the platform gives up; not Parley's to answer)",
            self.never_acknowledged
        )?;
        let apologies = self.answered_with_apology.values().sum::<u64>();
        writeln!(
            f,
            "  answered            {:>7}   (by the model {}, with an apology {}{})",
            self.answered,
            self.answered_by_model,
            apologies,
            if apologies > 0 {
                format!(": {}", by(&self.answered_with_apology))
            } else {
                String::new()
            }
        )?;
        if self.answered_unacknowledged > 0 {
            writeln!(
                f,
                "  answered, never acknowledged {} (queued, then the ingress failed to say so)",
                self.answered_unacknowledged
            )?;
        }
        writeln!(
            f,
            "  lost                {:>7}   (acknowledged, neither answered nor dead-lettered; must be 0)",
            self.lost
        )?;
        writeln!(
            f,
            "  duplicated          {:>7}   (more than one answer; must be 0)",
            self.duplicated
        )?;
        writeln!(f, "  dead-lettered       {:>7}", self.dead_lettered)?;
        for (reason, n) in &self.dead_letter_reasons {
            writeln!(f, "      {n} × {reason}")?;
        }
        writeln!(
            f,
            "  other               answered and given up {}, gave-up notices {}, working notices {}, misdirected {}, unattributed {}, unexpected {}",
            self.answered_and_given_up,
            self.gave_up_notices,
            self.working_notices,
            self.misdirected,
            self.unattributed,
            self.unexpected
        )?;
        let l = &self.reply_latency_ms;
        writeln!(
            f,
            "  reply latency ms    p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        match self.drained_after_ms {
            Some(ms) => writeln!(
                f,
                "  drained             {:.1} s after the last message",
                ms as f64 / 1000.0
            )?,
            None => writeln!(f, "  drained             NOT within the drain time")?,
        }
        if self.dead_letters_read == Some(false) {
            writeln!(
                f,
                "  warning: the dead letters could not be read at the end"
            )?;
        }
        for (what, traces) in [
            ("lost", &self.lost_messages),
            ("duplicated", &self.duplicated_messages),
        ] {
            if !traces.is_empty() {
                writeln!(f, "  {what} (t from the first message):")?;
            }
            for t in traces.iter().take(TRACES_SHOWN) {
                writeln!(f, "      {t}")?;
            }
            if traces.len() > TRACES_SHOWN {
                let more = traces.len() - TRACES_SHOWN;
                writeln!(f, "      … {more} more in the JSON report")?;
            }
        }
        if let Some(text) = &self.first_unexpected {
            writeln!(f, "  first unexpected reply: {text:?}")?;
        }
        write!(f, "  model calls         {}", self.model_requests)
    }
}

/// Runs the chaos load, prints the report (and a JSON line with `--json`) to stdout, and
/// returns it. Progress and the faults as they are played go to stderr.
pub async fn run_chaos_load(args: ChaosLoadArgs) -> anyhow::Result<ChaosReport> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    if !(0.0..=1.0).contains(&args.openapi_share) {
        bail!("--openapi-share must be between 0 and 1");
    }
    if args.conversations == 0 {
        bail!("--conversations must be at least 1");
    }
    let total = (args.rate * args.duration_secs as f64).round() as u64;
    if total == 0 {
        bail!("rate × duration is less than one message");
    }
    let fake = FakeDingTalk::start(args.dingtalk_listen, vec![args.app.clone()])
        .await
        .with_context(|| format!("starting the fake DingTalk on {}", args.dingtalk_listen))?;
    fake.set_api_qps(args.api_qps);
    let base_latency = Duration::from_millis(args.model_latency_ms);
    let llm = FakeLlm::start(
        args.openai_listen,
        FakeLlmOptions {
            api_key: args.api_key.clone(),
            latency: base_latency,
            ..FakeLlmOptions::default()
        },
    )
    .await
    .with_context(|| format!("starting the fake model on {}", args.openai_listen))?;
    eprintln!(
        "chaos-load: fake DingTalk {}, fake model {}",
        fake.base_url(),
        llm.base_url()
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.request_timeout_secs.max(1)))
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    if let Some(url) = &args.ready_url {
        wait_ready(&client, url).await?;
    }

    let run = Arc::new(Run::new(&args));
    let tally = Arc::new(Mutex::new(Tally::new(total)));
    let ledger = Arc::new(Mutex::new(Ledger::new(total)));
    let start = Instant::now();
    let started_at_ms = shared::now_ms();
    eprintln!(
        "chaos-load: started at {started_at_ms} (ms since the epoch): {total} messages at {}/s for {} s to {}",
        args.rate, args.duration_secs, args.target
    );
    let mut faults = JoinSet::new();
    for fault in args.faults.iter().copied() {
        let player = FaultPlayer {
            fake: fake.clone(),
            llm: llm.clone(),
            base_latency,
            stall: Duration::from_secs(args.stall_secs),
            retry_after_secs: args.retry_after_secs,
            api_qps: args.api_qps,
            throttled_per_second: (args.rate / 2.0).ceil() as usize,
        };
        faults.spawn(player.play(fault, start));
    }
    let progress = tokio::spawn(show_progress(
        fake.clone(),
        run.clone(),
        tally.clone(),
        ledger.clone(),
        start,
    ));

    let retry_window = Duration::from_secs(args.retry_window_secs);
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut callbacks = JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let body = run.callback(&fake, i)?;
        ledger_lock(&ledger).first_sent_ms[i as usize] = shared::now_ms();
        let (client, ledger) = (client.clone(), ledger.clone());
        let (target, secret) = (args.target.clone(), args.app.app_secret.clone());
        callbacks.spawn(async move {
            deliver(&client, &target, &secret, &body, i, &ledger, retry_window).await;
            drop(permit);
        });
    }
    let send_window = start.elapsed();
    let last_sent = Instant::now();
    eprintln!(
        "chaos-load: all {total} messages sent in {:.1} s; waiting for the platform-style retries",
        send_window.as_secs_f64()
    );
    while callbacks.join_next().await.is_some() {}
    // A fault still on is ended now: the run drains without it.
    faults.abort_all();
    while faults.join_next().await.is_some() {}
    FaultPlayer::clear_all(&fake, &llm, base_latency, args.api_qps);
    progress.abort();

    let (drained_after_ms, mut dead) = drain(&args, &fake, &run, &tally, &ledger, last_sent).await;
    eprintln!(
        "chaos-load: {}; watching {} s for late duplicates",
        match drained_after_ms {
            Some(ms) => format!("drained {:.1} s after the last message", ms as f64 / 1000.0),
            None => "NOT drained in time".to_owned(),
        },
        args.settle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    tally_lock(&tally).follow(&fake, &run);
    let dead_letters_read = match &args.dead_letters_cmd {
        Some(cmd) => match read_dead_letters(cmd, &run).await {
            Ok(read) => {
                dead = read;
                Some(true)
            }
            Err(e) => {
                eprintln!("chaos-load: could not read the dead letters: {e:#}");
                Some(false)
            }
        },
        None => None,
    };

    if let Some(path) = &args.replies_out {
        write_replies(path, &fake.sent(), &run)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let ledger = std::mem::replace(&mut *ledger_lock(&ledger), Ledger::new(0));
    let tally = std::mem::replace(&mut *tally_lock(&tally), Tally::new(0));
    let mut report = account(&run, &ledger, &tally, &dead, started_at_ms)?;
    report.label = args.label.clone();
    report.target_rate = args.rate;
    report.duration_secs = args.duration_secs;
    report.achieved_rate = total as f64 / send_window.as_secs_f64().max(1e-9);
    report.drained_after_ms = drained_after_ms;
    report.dead_letters_read = dead_letters_read;
    report.model_requests = llm.request_count() as u64;
    report.faults = args.faults.iter().map(Fault::to_string).collect();
    println!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    fake.shutdown();
    llm.shutdown();
    Ok(report)
}

/// Waits (up to `--drain-secs`) until every acknowledged message is answered or
/// dead-lettered, reading the dead letters every few seconds meanwhile; returns how long
/// after `last_sent` that was (None: not in time) and the dead letters last read.
async fn drain(
    args: &ChaosLoadArgs,
    fake: &FakeDingTalk,
    run: &Run,
    tally: &Mutex<Tally>,
    ledger: &Mutex<Ledger>,
    last_sent: Instant,
) -> (Option<u64>, DeadLetters) {
    let deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    let mut dead = DeadLetters::default();
    let mut next_dead_read = Instant::now();
    let mut next_note = Instant::now();
    loop {
        tally_lock(tally).follow(fake, run);
        let pending = {
            let ledger = ledger_lock(ledger);
            tally_lock(tally).pending(&ledger.acked, &dead.by_index)
        };
        if pending == 0 {
            return (Some(last_sent.elapsed().as_millis() as u64), dead);
        }
        if Instant::now() >= deadline {
            return (None, dead);
        }
        if let Some(cmd) = &args.dead_letters_cmd
            && Instant::now() >= next_dead_read
        {
            if let Ok(read) = read_dead_letters(cmd, run).await {
                dead = read;
            }
            next_dead_read = Instant::now() + DEAD_LETTERS_EVERY;
        }
        if Instant::now() >= next_note {
            eprintln!(
                "chaos-load: draining: {pending} acknowledged message(s) neither answered nor dead-lettered yet"
            );
            next_note = Instant::now() + DEAD_LETTERS_EVERY;
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Waits until `url` answers 2xx, for up to three minutes.
async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    eprintln!("chaos-load: waiting for {url}");
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer 2xx within 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The messages of a run: their ids, texts, and how each is answered.
struct Run {
    /// Random per run: the msgIds and questions of two runs never meet.
    id: u32,
    robot_code: String,
    conversations: usize,
    /// Every `openapi_every`-th message has an expired sessionWebhook (0 = none).
    openapi_every: u64,
    session_ttl: Duration,
}

impl Run {
    fn new(args: &ChaosLoadArgs) -> Self {
        let openapi_every = if args.openapi_share > 0.0 {
            (1.0 / args.openapi_share).round().max(1.0) as u64
        } else {
            0
        };
        Self {
            id: rand::random(),
            robot_code: args.app.app_key.clone(),
            conversations: args.conversations,
            openapi_every,
            session_ttl: CALLBACK_SESSION_TTL
                + Duration::from_secs(
                    args.duration_secs
                        .saturating_add(args.drain_secs)
                        .saturating_add(args.retry_window_secs),
                ),
        }
    }

    fn msg_id(&self, i: u64) -> String {
        format!("msgChaos{:08x}{i:010}", self.id)
    }

    /// The message number of a msgId of this run (or of a job id ending in one).
    fn index_of_msg_id(&self, id: &str) -> Option<u64> {
        let prefix = format!("msgChaos{:08x}", self.id);
        let at = id.rfind(&prefix)?;
        id[at + prefix.len()..].parse().ok()
    }

    fn question(&self, i: u64) -> String {
        format!("chaos {:08x} {i}", self.id)
    }

    fn via_openapi(&self, i: u64) -> bool {
        self.openapi_every > 0 && i.is_multiple_of(self.openapi_every)
    }

    /// The callback body of message `i`, with a sessionWebhook of its own (expired for the
    /// OpenAPI share, whose sender is its own too).
    fn callback(&self, fake: &FakeDingTalk, i: u64) -> anyhow::Result<Vec<u8>> {
        let text = self.question(i);
        let mut spec = if self.via_openapi(i) {
            CallbackSpec::one_to_one(&self.robot_code, &format!("{OPENAPI_SENDER}{i}"), &text)
        } else {
            let user = format!("chaos-user-{:05}", i as usize % self.conversations);
            CallbackSpec::one_to_one(&self.robot_code, &user, &text)
        };
        spec.msg_id = self.msg_id(i);
        let mut body = fake.callback_body(&spec);
        let ttl = if self.via_openapi(i) {
            Duration::ZERO
        } else {
            self.session_ttl
        };
        let (webhook, expires) = fake.session_webhook(&format!("{SESSION_LABEL}{i}"), ttl);
        body["sessionWebhook"] = json!(webhook);
        body["sessionWebhookExpiredTime"] = json!(expires);
        Ok(serde_json::to_vec(&body)?)
    }

    /// The message a recorded reply belongs to.
    fn owner(&self, msg: &SentMessage) -> Option<u64> {
        let label = match msg.via {
            Via::SessionWebhook => msg.conversation_id.as_deref()?.strip_prefix(SESSION_LABEL),
            Via::OtoSend => msg.user_ids.first()?.strip_prefix(OPENAPI_SENDER),
            Via::GroupSend => None,
        }?;
        label.parse().ok()
    }
}

/// What the ingress said to each message's callbacks.
struct Ledger {
    first_sent_ms: Vec<i64>,
    acked: Vec<bool>,
    attempts: Vec<u32>,
    refused: Vec<bool>,
    refusals: BTreeMap<String, u64>,
}

impl Ledger {
    fn new(total: u64) -> Self {
        let n = total as usize;
        Self {
            first_sent_ms: vec![0; n],
            acked: vec![false; n],
            attempts: vec![0; n],
            refused: vec![false; n],
            refusals: BTreeMap::new(),
        }
    }
}

fn ledger_lock(l: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

fn tally_lock(t: &Mutex<Tally>) -> MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends message `i`'s callback until it is acknowledged or `window` after its first try
/// is over, waiting 1, 2, 4, 8, 8, … s between tries.
async fn deliver(
    client: &reqwest::Client,
    target: &str,
    secret: &str,
    body: &[u8],
    i: u64,
    ledger: &Mutex<Ledger>,
    window: Duration,
) {
    let first = Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        let outcome = match send_callback(client, target, secret, body).await {
            Ok(resp) => {
                let status = resp.status();
                let _ = resp.bytes().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status.as_u16().to_string())
                }
            }
            Err(e) if e.is_timeout() => Err("timeout".to_owned()),
            Err(e) if e.is_connect() => Err("connect".to_owned()),
            Err(_) => Err("transport".to_owned()),
        };
        {
            let mut l = ledger_lock(ledger);
            let n = i as usize;
            l.attempts[n] += 1;
            match outcome {
                Ok(()) => {
                    l.acked[n] = true;
                    return;
                }
                Err(cause) => {
                    l.refused[n] = true;
                    *l.refusals.entry(cause).or_default() += 1;
                }
            }
        }
        if first.elapsed() + pause > window {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(8));
    }
}

/// What the replies to one message were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Replies {
    /// The model's answers to its own question.
    answers: u32,
    /// Apologies standing for an answer.
    apologies: u32,
    /// The first apology's kind.
    apology: Option<&'static str>,
    gave_up: u32,
    working: u32,
    /// Model answers to another question.
    misdirected: u32,
    unexpected: u32,
    /// When each answer (or apology) arrived, ms since the epoch.
    answers_at_ms: Vec<i64>,
}

impl Replies {
    /// Answers of any kind: the model's, apologies and misdirected ones.
    fn finals(&self) -> u32 {
        self.answers + self.apologies + self.misdirected
    }
}

/// How a reply's text reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    /// `Echo: <question> (turn n)` of this question.
    Answer,
    /// An echo of another question.
    Misdirected,
    /// An apology standing for an answer, of this kind.
    Apology(&'static str),
    GaveUp,
    Working,
    Unexpected,
}

fn classify(content: &str, question: &str) -> ReplyKind {
    if let Some(rest) = content.strip_prefix("Echo: ") {
        let asked = rest.rsplit_once(" (turn ").map_or(rest, |(q, _)| q);
        return if asked == question {
            ReplyKind::Answer
        } else {
            ReplyKind::Misdirected
        };
    }
    REPLY_TEXTS
        .iter()
        .find(|(ending, _)| content.ends_with(ending))
        .map_or(ReplyKind::Unexpected, |(_, kind)| *kind)
}

/// The replies recorded so far, by message; followed incrementally.
struct Tally {
    seen: usize,
    per: Vec<Replies>,
    unattributed: u64,
    first_unexpected: Option<String>,
}

impl Tally {
    fn new(total: u64) -> Self {
        Self {
            seen: 0,
            per: vec![Replies::default(); total as usize],
            unattributed: 0,
            first_unexpected: None,
        }
    }

    /// Takes in what the fake recorded since the last call.
    fn follow(&mut self, fake: &FakeDingTalk, run: &Run) {
        let new = fake.sent_since(self.seen);
        self.seen += new.len();
        for msg in &new {
            self.add(msg, run);
        }
    }

    fn add(&mut self, msg: &SentMessage, run: &Run) {
        let Some(r) = run
            .owner(msg)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.per.get_mut(i).map(|r| (i, r)))
        else {
            self.unattributed += 1;
            return;
        };
        let (i, r) = r;
        let kind = classify(&msg.content, &run.question(i as u64));
        match kind {
            ReplyKind::Answer => r.answers += 1,
            ReplyKind::Misdirected => r.misdirected += 1,
            ReplyKind::Apology(k) => {
                r.apologies += 1;
                r.apology.get_or_insert(k);
            }
            ReplyKind::GaveUp => r.gave_up += 1,
            ReplyKind::Working => r.working += 1,
            ReplyKind::Unexpected => {
                r.unexpected += 1;
                if self.first_unexpected.is_none() {
                    self.first_unexpected = Some(shared::untrusted::clip(&msg.content, 200));
                }
            }
        }
        if matches!(
            kind,
            ReplyKind::Answer | ReplyKind::Apology(_) | ReplyKind::Misdirected
        ) {
            r.answers_at_ms.push(msg.received_at_ms);
        }
    }

    /// Acknowledged messages neither answered nor dead-lettered (nor told so).
    fn pending(&self, acked: &[bool], dead: &HashMap<u64, DeadLetterSeen>) -> usize {
        self.per
            .iter()
            .zip(acked)
            .enumerate()
            .filter(|(i, (r, acked))| {
                **acked && r.finals() == 0 && r.gave_up == 0 && !dead.contains_key(&(*i as u64))
            })
            .count()
    }
}

/// Writes `replies` as JSON lines (see `--replies-out`).
fn write_replies(path: &std::path::Path, replies: &[SentMessage], run: &Run) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for msg in replies {
        let owner = run.owner(msg);
        let kind = match owner {
            Some(i) => format!("{:?}", classify(&msg.content, &run.question(i))),
            None => "Unattributed".to_owned(),
        };
        let line = json!({
            "i": owner,
            "msg_id": owner.map(|i| run.msg_id(i)),
            "via": msg.via,
            "kind": kind,
            "at_ms": msg.received_at_ms,
            "text": shared::untrusted::clip(&msg.content, 120),
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// The dead letters of this run's messages, by message number; others are ignored.
#[derive(Debug, Default)]
struct DeadLetters {
    by_index: HashMap<u64, DeadLetterSeen>,
}

/// Runs `cmd` (by `sh -c`) and reads `parley dlq list` lines from its output.
async fn read_dead_letters(cmd: &str, run: &Run) -> anyhow::Result<DeadLetters> {
    let output = tokio::time::timeout(
        DEAD_LETTERS_TIMEOUT,
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the dead-letter command timed out")?
    .context("running the dead-letter command")?;
    if !output.status.success() {
        bail!(
            "the dead-letter command failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(parse_dead_letters(
        &String::from_utf8_lossy(&output.stdout),
        run,
    ))
}

/// `ID<TAB>N attempt(s)<TAB>AT_MS<TAB>REASON` lines of this run's messages.
fn parse_dead_letters(listing: &str, run: &Run) -> DeadLetters {
    let mut dead = DeadLetters::default();
    for line in listing.lines() {
        let mut fields = line.splitn(4, '\t');
        let (Some(id), Some(attempts), Some(_at), Some(reason)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Some(i) = run.index_of_msg_id(id) {
            dead.by_index.insert(
                i,
                DeadLetterSeen {
                    id: id.to_owned(),
                    attempts: attempts.to_owned(),
                    reason: reason.trim().to_owned(),
                },
            );
        }
    }
    dead
}

/// The report's counts from what the ingress said, the replies and the dead letters.
fn account(
    run: &Run,
    ledger: &Ledger,
    tally: &Tally,
    dead: &DeadLetters,
    started_at_ms: i64,
) -> anyhow::Result<ChaosReport> {
    let since_start = |ms: i64| (ms - started_at_ms) as f64 / 1000.0;
    let trace = |i: usize, replies: &Replies| MessageTrace {
        msg_id: run.msg_id(i as u64),
        sent_at_s: since_start(ledger.first_sent_ms[i]),
        answered_at_s: replies
            .answers_at_ms
            .iter()
            .map(|&ms| since_start(ms))
            .collect(),
    };
    let mut r = ChaosReport {
        started_at_ms,
        sent: tally.per.len() as u64,
        callbacks: ledger.attempts.iter().map(|&a| u64::from(a)).sum(),
        refusals: ledger.refusals.clone(),
        unattributed: tally.unattributed,
        first_unexpected: tally.first_unexpected.clone(),
        ..ChaosReport::default()
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for (i, replies) in tally.per.iter().enumerate() {
        let index = i as u64;
        let acked = ledger.acked[i];
        let finals = replies.finals();
        let listed = dead.by_index.get(&index);
        let given_up = listed.is_some() || replies.gave_up > 0;
        r.refused_then_retried += u64::from(ledger.refused[i]);
        r.gave_up_notices += u64::from(replies.gave_up);
        r.working_notices += u64::from(replies.working);
        r.misdirected += u64::from(replies.misdirected);
        r.unexpected += u64::from(replies.unexpected);
        if finals > 1 {
            r.duplicated += 1;
            if r.duplicated_messages.len() < TRACES_KEPT {
                r.duplicated_messages.push(trace(i, replies));
            }
        }
        if finals > 0 && given_up {
            r.answered_and_given_up += 1;
        }
        if !acked {
            r.never_acknowledged += 1;
            r.answered_unacknowledged += u64::from(finals > 0);
            continue;
        }
        r.acknowledged += 1;
        if finals > 0 {
            r.answered += 1;
            if replies.answers > 0 {
                r.answered_by_model += 1;
            } else if let Some(kind) = replies.apology {
                *r.answered_with_apology.entry(kind.to_owned()).or_default() += 1;
            }
            if let Some(&at) = replies.answers_at_ms.first() {
                let ms = (at - ledger.first_sent_ms[i]).max(0) as u64;
                latency.saturating_record(ms.saturating_mul(1000).max(1));
            }
        } else if given_up {
            r.dead_lettered += 1;
            let reason = listed.map_or("(gave-up notice only)", |d| d.reason.as_str());
            *r.dead_letter_reasons.entry(reason.to_owned()).or_default() += 1;
        } else {
            r.lost += 1;
            if r.lost_messages.len() < TRACES_KEPT {
                r.lost_messages.push(trace(i, replies));
            }
        }
    }
    let mut listed: Vec<&DeadLetterSeen> = dead.by_index.values().collect();
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    r.dead_letters = listed
        .into_iter()
        .take(DEAD_LETTERS_KEPT)
        .cloned()
        .collect();
    r.reply_latency_ms = Percentiles::from_histogram(&latency);
    Ok(r)
}

/// Prints sent / acknowledged / answered every ten seconds while messages are sent.
async fn show_progress(
    fake: FakeDingTalk,
    run: Arc<Run>,
    tally: Arc<Mutex<Tally>>,
    ledger: Arc<Mutex<Ledger>>,
    start: Instant,
) {
    let mut next = start + PROGRESS_EVERY;
    loop {
        tokio::time::sleep_until(next).await;
        next += PROGRESS_EVERY;
        let (sent, acked, refused) = {
            let l = ledger_lock(&ledger);
            let sent = l.first_sent_ms.iter().filter(|&&ms| ms > 0).count();
            let acked = l.acked.iter().filter(|&&a| a).count();
            (sent, acked, l.refusals.values().sum::<u64>())
        };
        let answered = {
            let mut t = tally_lock(&tally);
            t.follow(&fake, &run);
            t.per.iter().filter(|r| r.finals() > 0).count()
        };
        eprintln!(
            "chaos-load: t={:>4.0}s sent {sent} acknowledged {acked} answered {answered} (refused requests so far {refused})",
            start.elapsed().as_secs_f64()
        );
    }
}

/// Plays the driver's faults on the fakes.
struct FaultPlayer {
    fake: FakeDingTalk,
    llm: FakeLlm,
    base_latency: Duration,
    stall: Duration,
    retry_after_secs: u64,
    api_qps: u32,
    throttled_per_second: usize,
}

impl FaultPlayer {
    async fn play(self, fault: Fault, start: Instant) {
        let on = start + Duration::from_secs(fault.start_secs);
        let off = on + Duration::from_secs(fault.secs);
        tokio::time::sleep_until(on).await;
        eprintln!(
            "chaos-load: t={:>4.0}s fault {} on for {} s",
            start.elapsed().as_secs_f64(),
            fault.kind.as_str(),
            fault.secs
        );
        match fault.kind {
            FaultKind::Model429 => self
                .llm
                .set_failing(Some((429, Some(self.retry_after_secs)))),
            FaultKind::ModelStall => self.llm.set_latency(self.stall),
            FaultKind::PlatformFail => self.fake.set_send_outage(true),
            FaultKind::PlatformThrottle => {
                self.fake.set_api_qps(1);
                while Instant::now() < off {
                    self.fake.fail_next_sends(self.throttled_per_second);
                    tokio::time::sleep_until(off.min(Instant::now() + TICK)).await;
                }
            }
        }
        tokio::time::sleep_until(off).await;
        match fault.kind {
            FaultKind::Model429 => self.llm.set_failing(None),
            FaultKind::ModelStall => self.llm.set_latency(self.base_latency),
            FaultKind::PlatformFail => self.fake.set_send_outage(false),
            FaultKind::PlatformThrottle => {
                self.fake.fail_next_sends(0);
                self.fake.set_api_qps(self.api_qps);
            }
        }
        eprintln!(
            "chaos-load: t={:>4.0}s fault {} off",
            start.elapsed().as_secs_f64(),
            fault.kind.as_str()
        );
    }

    /// Ends every fault at once (the run's end, whatever was still on).
    fn clear_all(fake: &FakeDingTalk, llm: &FakeLlm, base_latency: Duration, api_qps: u32) {
        llm.set_failing(None);
        llm.set_latency(base_latency);
        fake.set_send_outage(false);
        fake.fail_next_sends(0);
        fake.set_api_qps(api_qps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn faults_parse_and_print_as_given() {
        let f: Fault = "model-429@40+15".parse().unwrap();
        assert_eq!(
            f,
            Fault {
                kind: FaultKind::Model429,
                start_secs: 40,
                secs: 15
            }
        );
        assert_eq!(f.to_string(), "model-429@40+15");
        for kind in ["model-stall", "platform-fail", "platform-throttle"] {
            let f: Fault = format!("{kind}@0+1").parse().unwrap();
            assert_eq!(f.kind.as_str(), kind);
        }
        for bad in [
            "model-429",
            "model-429@40",
            "disk-full@1+2",
            "model-429@x+1",
            "model-429@1+0",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_are_classified_by_text() {
        let q = "chaos 0000abcd 7";
        assert_eq!(
            classify("Echo: chaos 0000abcd 7 (turn 3)", q),
            ReplyKind::Answer
        );
        assert_eq!(
            classify("Echo: chaos 0000abcd 70 (turn 1)", q),
            ReplyKind::Misdirected
        );
        assert_eq!(
            classify(
                "抱歉，我暂时无法回答，请稍后再试。(Sorry, I can't answer right now. Please try again in a moment.)",
                q
            ),
            ReplyKind::Apology("model_failed")
        );
        assert_eq!(
            classify(
                "现在提问的人太多，请稍后再试。(I'm busy right now. Please try again shortly.)",
                q
            ),
            ReplyKind::Apology("busy")
        );
        assert_eq!(
            classify(
                "抱歉，这条消息多次处理失败，已经放弃，请稍后重新发送。(Sorry, I could not deliver an answer to that message. Please send it again later.)",
                q
            ),
            ReplyKind::GaveUp
        );
        assert_eq!(classify("hello", q), ReplyKind::Unexpected);
    }

    #[test]
    fn dead_letter_lines_of_the_run_are_read() {
        let mut args = ChaosLoadArgs::new("http://127.0.0.1:9/dingtalk/b");
        args.openapi_share = 0.0;
        let run = Run::new(&args);
        let listing = format!(
            "dingtalk:chaos:{}\t10 attempt(s)\t1700000000000\tgave up after 10 attempts: cache: down\n\
             dingtalk:chaos:msgOther\t1 attempt(s)\t1\tno bot\n\
             garbage\n\
             2 dead letter(s)\n",
            run.msg_id(42)
        );
        let dead = parse_dead_letters(&listing, &run);
        assert_eq!(dead.by_index.len(), 1);
        let d = &dead.by_index[&42];
        assert_eq!(d.attempts, "10 attempt(s)");
        assert_eq!(d.reason, "gave up after 10 attempts: cache: down");
        assert_eq!(run.index_of_msg_id(&run.msg_id(7)), Some(7));
        assert_eq!(
            run.index_of_msg_id("dingtalk:chaos:msgChaos00000000x"),
            None
        );
    }

    /// An ingress stand-in: checks the signature; refuses the first try of message 3 with
    /// 503; answers message 5 twice, message 7 not at all (it lists it as a dead letter),
    /// message 8 never (lost), message 9 with the model's apology; answers the messages
    /// whose sessionWebhook expired through the OpenAPI 1:1 send; all others by echoing
    /// the question on their sessionWebhook.
    fn stand_in(dead_file: std::path::PathBuf) -> Router {
        let client = reqwest::Client::new();
        let refused_once = Arc::new(AtomicBool::new(false));
        Router::new().route(
            "/dingtalk/{bot}",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (client, refused_once) = (client.clone(), refused_once.clone());
                    let dead_file = dead_file.clone();
                    async move {
                        let ts = headers.get("timestamp").and_then(|v| v.to_str().ok());
                        let sign = headers.get("sign").and_then(|v| v.to_str().ok());
                        let now = shared::now_ms();
                        if shared::platform::dingtalk::sign::verify_callback("s3", ts, sign, now)
                            .is_err()
                        {
                            return axum::http::StatusCode::FORBIDDEN;
                        }
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let msg_id = v["msgId"].as_str().unwrap().to_owned();
                        let n: u64 = msg_id[msg_id.len() - 10..].parse().unwrap();
                        if n == 3 && !refused_once.swap(true, Ordering::SeqCst) {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let question = v["text"]["content"].as_str().unwrap().trim().to_owned();
                        let webhook = v["sessionWebhook"].as_str().unwrap().to_owned();
                        let expired = v["sessionWebhookExpiredTime"].as_i64().unwrap() <= now;
                        let staff = v["senderStaffId"].as_str().unwrap().to_owned();
                        tokio::spawn(async move {
                            let text = match n {
                                7 => {
                                    let line = format!(
                                        "dingtalk:b:{msg_id}\t3 attempt(s)\t{now}\tgave up after 3 attempts: x\n"
                                    );
                                    std::fs::write(&dead_file, line).unwrap();
                                    return;
                                }
                                8 => return,
                                9 => "抱歉。(Sorry, I can't answer right now. Please try again in a moment.)".to_owned(),
                                _ => format!("Echo: {question} (turn 1)"),
                            };
                            let times = if n == 5 { 2 } else { 1 };
                            for _ in 0..times {
                                if expired {
                                    let base = webhook.split("/robot/").next().unwrap();
                                    let token: serde_json::Value = client
                                        .post(format!("{base}/v1.0/oauth2/accessToken"))
                                        .json(&json!({ "appKey": "app", "appSecret": "s3" }))
                                        .send()
                                        .await
                                        .unwrap()
                                        .json()
                                        .await
                                        .unwrap();
                                    let sent = client
                                        .post(format!("{base}/v1.0/robot/oToMessages/batchSend"))
                                        .header(
                                            "x-acs-dingtalk-access-token",
                                            token["accessToken"].as_str().unwrap(),
                                        )
                                        .json(&json!({
                                            "robotCode": "app", "userIds": [staff],
                                            "msgKey": "sampleText",
                                            "msgParam": json!({ "content": text }).to_string(),
                                        }))
                                        .send()
                                        .await
                                        .unwrap();
                                    assert_eq!(sent.status(), 200);
                                } else {
                                    let body = json!({ "msgtype": "text", "text": { "content": text } });
                                    client.post(&webhook).json(&body).send().await.unwrap();
                                }
                            }
                        });
                        axum::http::StatusCode::OK
                    }
                },
            ),
        )
    }

    #[tokio::test]
    async fn a_run_accounts_retries_answers_duplicates_losses_and_dead_letters() {
        let dir = std::env::temp_dir().join(format!("chaos-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let dead_file = dir.join("dead");
        std::fs::write(&dead_file, "").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = stand_in(dead_file.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut args = ChaosLoadArgs::new(format!("http://{addr}/dingtalk/b"));
        args.app = FakeApp::new("app", "s3");
        args.dingtalk_listen = "127.0.0.1:0".parse().unwrap();
        args.openai_listen = "127.0.0.1:0".parse().unwrap();
        args.rate = 20.0;
        args.duration_secs = 1;
        args.conversations = 4;
        // Messages 0 and 10 answer through the OpenAPI.
        args.openapi_share = 0.1;
        args.retry_window_secs = 10;
        args.drain_secs = 3;
        args.settle_secs = 1;
        args.dead_letters_cmd = Some(format!("cat {}", dead_file.display()));
        let r = run_chaos_load(args).await.unwrap();
        assert_eq!(
            (r.sent, r.acknowledged, r.never_acknowledged),
            (20, 20, 0),
            "{r}"
        );
        assert_eq!((r.refused_then_retried, r.callbacks), (1, 21), "{r}");
        assert_eq!(r.refusals.get("503"), Some(&1));
        assert_eq!((r.answered, r.answered_by_model), (18, 17), "{r}");
        assert_eq!(r.answered_with_apology.get("model_failed"), Some(&1));
        assert_eq!((r.lost, r.duplicated, r.dead_lettered), (1, 1, 1), "{r}");
        assert_eq!(r.lost_messages.len(), 1);
        assert!(r.lost_messages[0].msg_id.ends_with("0000000008"), "{r}");
        assert!(r.lost_messages[0].answered_at_s.is_empty());
        let dup = &r.duplicated_messages[0];
        assert!(dup.msg_id.ends_with("0000000005"), "{r}");
        assert_eq!(dup.answered_at_s.len(), 2);
        assert!(
            dup.sent_at_s >= 0.0 && dup.answered_at_s[0] >= dup.sent_at_s,
            "{r}"
        );
        assert_eq!(
            r.dead_letter_reasons.get("gave up after 3 attempts: x"),
            Some(&1)
        );
        assert_eq!(r.dead_letters.len(), 1);
        assert_eq!(
            (r.misdirected, r.unattributed, r.unexpected),
            (0, 0, 0),
            "{r}"
        );
        assert_eq!(r.dead_letters_read, Some(true));
        assert!(r.drained_after_ms.is_none(), "message 8 never drains");
        assert!(r.reply_latency_ms.max > 0.0);
        let shown = r.to_string();
        assert!(shown.contains("lost                      1"), "{shown}");
        assert!(shown.contains("1 × gave up after 3 attempts: x"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
