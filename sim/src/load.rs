//! An open-loop load generator for the ingress: it sends callbacks at a fixed arrival rate —
//! DingTalk's (signed JSON) or a WeCom self-built app's (encrypted, signed XML) — each with a
//! unique message id, and measures every acknowledgement from the request's *intended* send
//! time, so a slow server shows up as latency instead of silently lowering the rate (no
//! coordinated omission). It runs the platform's fake in-process ([`FakeDingTalk`] or
//! [`FakeWecom`]), so the replies Parley sends back are counted (missing, duplicated) and
//! timed end to end.
//!
//! Scheduling and measuring are one code path for both platforms; only how a request is
//! built and how a reply is attributed to its conversation differ (`Callbacks`). WeCom
//! bodies are encrypted and signed before the run starts, so AES and SHA-1 cost on the
//! generator's side cannot disturb the schedule.
//!
//! With `--expect cards` (DingTalk bots in `reply_mode = "card"`) a question is answered by
//! a finalized AI card in its conversation, or by a plain message there when the card could
//! not be opened; the run reports how soon each card showed its first text, how many API
//! calls each card took, and what every OpenAPI route of the fake saw (peak calls per
//! second, throttled calls).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::json;
use shared::platform::wecom::crypto::WecomCrypto;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::dingtalk::{
    CALLBACK_SESSION_TTL, CallbackSpec, DEFAULT_API_QPS, EndpointStats, FakeApp, FakeCard,
    FakeDingTalk, Via,
};
use super::wecom::{FakeWecom, FakeWecomApp, PER_MEMBER_PER_MINUTE, text_message};

/// Tencent's sample self-built app: the defaults of the WeCom options.
const SAMPLE_CORP_ID: &str = "ww1436e0e65a779aee";
const SAMPLE_AGENT_ID: i64 = 1000002;
const SAMPLE_WECOM_TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
const SAMPLE_ENCODING_AES_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
const DEFAULT_CORP_SECRET: &str = "demo-secret";
/// WeCom callbacks are signed before the run and Parley, like WeCom, refuses timestamps more
/// than an hour away: a WeCom run must end well inside that hour.
const WECOM_MAX_DURATION_SECS: u64 = 3000;
/// Pre-encrypted WeCom requests are held in memory (about 1 KB each) and their MsgIds carry
/// the request number in 32 bits.
const WECOM_MAX_REQUESTS: u64 = 5_000_000;
/// The text of every generated message.
const MESSAGE_TEXT: &str = "hello from the load generator";
/// After the expected replies arrived, how long to keep listening for late duplicates.
const REPLY_SETTLE: Duration = Duration::from_millis(250);
/// How often the fake's cards are looked at while waiting for them to finish.
const CARD_POLL: Duration = Duration::from_millis(100);
/// The template variable Parley streams an answer into by default (`card_content_key`).
const DEFAULT_CARD_CONTENT_KEY: &str = "msgContent";

/// Which platform's callbacks `parley sim load` sends.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPlatform {
    /// Signed JSON callbacks (`POST /dingtalk/{bot}`); replies arrive on sessionWebhooks.
    #[default]
    #[value(name = "dingtalk")]
    DingTalk,
    /// Encrypted, signed XML callbacks of a self-built app (`POST /wecom/{bot}`); replies
    /// arrive on `message/send`.
    Wecom,
}

impl fmt::Display for LoadPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadPlatform::DingTalk => "dingtalk",
            LoadPlatform::Wecom => "wecom",
        })
    }
}

/// What answers a question in `parley sim load`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// One message per question (sessionWebhook or robot send; WeCom `message/send`).
    #[default]
    Messages,
    /// DingTalk AI cards: a finalized card in the question's conversation, or a plain
    /// message there when its card could not be opened.
    Cards,
}

/// Options of `parley sim load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Platform whose callbacks to send.
    #[arg(long, value_enum, default_value_t = LoadPlatform::DingTalk)]
    pub platform: LoadPlatform,
    /// Ingress callback URL, e.g. `http://127.0.0.1:8080/dingtalk/bot1` or
    /// `http://127.0.0.1:8080/wecom/bot1`.
    #[arg(long)]
    pub target: String,
    /// DingTalk (required there): app secret the ingress verifies the `sign` header with.
    #[arg(long, env = "PARLEY_LOAD_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<String>,
    /// DingTalk: robotCode (= app key) put in the callbacks.
    #[arg(long, default_value = "demo-app")]
    pub robot_code: String,
    /// WeCom: CorpID, the receive id inside every encrypted message.
    #[arg(long, default_value = SAMPLE_CORP_ID)]
    pub corp_id: String,
    /// WeCom: AgentId of the app the messages are sent to.
    #[arg(long, default_value_t = SAMPLE_AGENT_ID)]
    pub agent_id: i64,
    /// WeCom: the app Secret the in-process fake WeCom issues access tokens for (the bot's
    /// `corp_secret` in Parley's configuration).
    #[arg(
        long,
        env = "PARLEY_LOAD_CORP_SECRET",
        hide_env_values = true,
        default_value = DEFAULT_CORP_SECRET
    )]
    pub corp_secret: String,
    /// WeCom: callback Token the callbacks are signed with.
    #[arg(
        long,
        env = "PARLEY_LOAD_WECOM_TOKEN",
        hide_env_values = true,
        default_value = SAMPLE_WECOM_TOKEN
    )]
    pub wecom_token: String,
    /// WeCom: callback EncodingAESKey (43 characters) the callbacks are encrypted with.
    #[arg(
        long,
        env = "PARLEY_LOAD_ENCODING_AES_KEY",
        hide_env_values = true,
        default_value = SAMPLE_ENCODING_AES_KEY
    )]
    pub encoding_aes_key: String,
    /// Arrival rate in requests per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Distinct conversations the callbacks are spread over (round-robin). For WeCom, each
    /// is one member (FromUserName).
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// DingTalk: use group conversations (default: one-to-one chats).
    #[arg(long)]
    pub group: bool,
    /// Where the in-process fake platform listens. DingTalk: its sessionWebhooks receive the
    /// replies; pick a fixed port if Parley must also reach it for OpenAPI sends. WeCom: the
    /// bot's `api_base` must point here for replies to be counted, so pick a fixed port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub fake_listen: SocketAddr,
    /// Wait up to this many seconds for one reply per accepted callback (0 = don't wait).
    #[arg(long, default_value_t = 0)]
    pub wait_replies_secs: u64,
    /// What answers a question: `messages`, or (DingTalk) `cards` — a finalized AI card, or
    /// a plain message for its conversation when the card could not be opened. The bot's
    /// `api_base` must point at `--fake-listen` for cards to be seen.
    #[arg(long, value_enum, default_value_t = Expect::Messages)]
    pub expect: Expect,
    /// DingTalk cards: the template variable answers stream into (the bot's
    /// `card_content_key`). A card whose create already carries text there shows content
    /// from its creation; otherwise from its first non-empty streaming update.
    #[arg(long, default_value = DEFAULT_CARD_CONTENT_KEY)]
    pub card_content_key: String,
    /// DingTalk: send callbacks whose sessionWebhook has already expired, so that replies
    /// must use the OpenAPI robot sends (`oToMessages/batchSend`, `groupMessages/send`).
    #[arg(long)]
    pub expired_sessions: bool,
    /// DingTalk: calls per app and OpenAPI route the in-process fake admits in any sliding
    /// one-second window; more get HTTP 403 `QpsLimitForAppkeyAndApi` (0 = unlimited).
    #[arg(long, default_value_t = DEFAULT_API_QPS)]
    pub api_qps: u32,
    /// Maximum concurrent in-flight requests.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// The defaults of the command line for a DingTalk run against `target`, signed with
    /// `app_secret`.
    pub fn new(target: impl Into<String>, app_secret: impl Into<String>) -> Self {
        Self {
            app_secret: Some(app_secret.into()),
            ..Self::defaults(target.into(), LoadPlatform::DingTalk)
        }
    }

    /// The defaults of the command line for a WeCom run against `target` (a
    /// `/wecom/{bot}` URL), as Tencent's sample app.
    pub fn wecom(target: impl Into<String>) -> Self {
        Self::defaults(target.into(), LoadPlatform::Wecom)
    }

    fn defaults(target: String, platform: LoadPlatform) -> Self {
        Self {
            platform,
            target,
            app_secret: None,
            robot_code: "demo-app".to_owned(),
            corp_id: SAMPLE_CORP_ID.to_owned(),
            agent_id: SAMPLE_AGENT_ID,
            corp_secret: DEFAULT_CORP_SECRET.to_owned(),
            wecom_token: SAMPLE_WECOM_TOKEN.to_owned(),
            encoding_aes_key: SAMPLE_ENCODING_AES_KEY.to_owned(),
            rate: 1000.0,
            duration_secs: 10,
            conversations: 1000,
            group: false,
            fake_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            wait_replies_secs: 0,
            expect: Expect::Messages,
            card_content_key: DEFAULT_CARD_CONTENT_KEY.to_owned(),
            expired_sessions: false,
            api_qps: DEFAULT_API_QPS,
            connections: 256,
            json: false,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value seen.
    pub max: f64,
}

impl Percentiles {
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Reply accounting, when the run waited for replies.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplyReport {
    /// Replies the fake recorded for this run's conversations.
    pub replies: u64,
    /// Replies beyond one per accepted callback, summed over conversations.
    pub duplicates: u64,
    /// Accepted callbacks that got no reply, summed over conversations.
    pub missing: u64,
    /// Messages the fake recorded that belong to none of this run's conversations.
    pub unattributed: u64,
    /// Replies the fake platform accepted and silently dropped (WeCom: beyond 30 a minute to
    /// one member); they count as missing too.
    pub dropped_by_platform: u64,
    /// From a callback's intended send time to its reply's arrival (FIFO per conversation).
    pub latency_ms: Percentiles,
    /// From the first callback's intended send time to the last reply of this run's
    /// conversations, ms (0 when none arrived).
    pub last_reply_ms: f64,
}

/// Card accounting (`--expect cards`), when the run waited for answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CardReport {
    /// Accepted callbacks answered once: by a finalized card or a plain message.
    pub answered: u64,
    /// Accepted callbacks with neither a finalized card nor a message, summed over
    /// conversations.
    pub missing: u64,
    /// Answers (cards, finished or not, and messages) beyond one per accepted callback,
    /// summed over conversations: a conversation asked once with a card and a message, or
    /// with two cards, has one duplicate.
    pub duplicates: u64,
    /// Cards created in this run's conversations.
    pub cards: u64,
    /// Of those, finalized (`isFinalize`).
    pub finalized: u64,
    /// Of the finalized, marked failed (`isError`, the friendly failure text).
    pub errored: u64,
    /// Cards created and never finalized.
    pub unfinished: u64,
    /// Messages in this run's conversations (the answers of cards that could not be opened).
    pub as_messages: u64,
    /// Cards and messages of none of this run's conversations.
    pub unattributed: u64,
    /// Cards whose create carried the first text (`cardParamMap`): their first content is
    /// their `created_at_ms`; the others' is their first non-empty streaming update.
    pub text_in_create: u64,
    /// From a callback's intended send time to its card's first content (FIFO per
    /// conversation).
    pub first_content_ms: Percentiles,
    /// From a callback's intended send time to its plain message's arrival.
    pub message_latency_ms: Percentiles,
    /// Card API calls per card: its create plus its streaming updates (admitted ones; the
    /// throttled are in the endpoint statistics).
    pub calls_per_card: CallsPerCard,
    /// From a card's creation to its last streaming update.
    pub stream_span_ms: Percentiles,
    /// Cards whose final update carried the same text as the streaming update before it:
    /// that update already showed the whole answer, so one of the two was redundant.
    pub final_repeats_update: u64,
    /// From a card's create to its first streaming update and between its later ones (the
    /// final update excluded): at least `card_update_interval_ms` when Parley keeps to it,
    /// longer when the governor had no slot sooner.
    pub update_gap_ms: Percentiles,
    /// From the first callback's intended send time to the last answer (a card's final
    /// update or a message), ms.
    pub last_answer_ms: f64,
}

/// The distribution of API calls over the cards of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CallsPerCard {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// Largest.
    pub max: u64,
}

/// What one OpenAPI route of the in-process fake DingTalk saw from one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointReport {
    /// App key.
    pub app: String,
    /// Route path, e.g. `/v1.0/card/streaming`.
    pub path: String,
    /// Calls, throttled calls and the peak calls in any one-second window.
    #[serde(flatten)]
    pub stats: EndpointStats,
}

/// What one load run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
    /// The platform whose callbacks were sent.
    pub platform: LoadPlatform,
    /// The callback URL.
    pub target: String,
    /// Requested arrival rate, req/s.
    pub target_rate: f64,
    /// Requested duration, seconds.
    pub duration_secs: u64,
    /// Distinct conversations used.
    pub conversations: usize,
    /// Callbacks sent.
    pub sent: u64,
    /// Callbacks answered 2xx.
    pub ok_2xx: u64,
    /// Callbacks answered otherwise, by HTTP status.
    pub non_2xx: BTreeMap<u16, u64>,
    /// Callbacks that failed at the transport (connect, timeout, reset).
    pub errors: u64,
    /// The first transport error, for diagnosis.
    pub first_error: Option<String>,
    /// Callbacks issued per second of sending (below `target_rate` when the server pushed back).
    pub achieved_rate: f64,
    /// Acknowledgement latency from the intended send time.
    pub ack_latency_ms: Percentiles,
    /// Reply accounting, if `--wait-replies-secs` > 0 with `--expect messages`.
    pub replies: Option<ReplyReport>,
    /// Card accounting, if `--wait-replies-secs` > 0 with `--expect cards`.
    pub cards: Option<CardReport>,
    /// Per-route statistics of the fake DingTalk's OpenAPI over the run (after the wait for
    /// replies); empty for WeCom.
    pub endpoints: Vec<EndpointReport>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                p.p50, p.p90, p.p99, p.p999, p.max
            )
        };
        let non_2xx = if self.non_2xx.is_empty() {
            "0".to_owned()
        } else {
            self.non_2xx
                .iter()
                .map(|(status, n)| format!("{status}×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "load → {}  ({})", self.target, self.platform)?;
        writeln!(
            f,
            "  schedule          {} req/s for {} s over {} conversations",
            self.target_rate, self.duration_secs, self.conversations
        )?;
        writeln!(
            f,
            "  sent              {}  (achieved {:.1} req/s)",
            self.sent, self.achieved_rate
        )?;
        writeln!(f, "  2xx               {}", self.ok_2xx)?;
        writeln!(f, "  non-2xx           {non_2xx}")?;
        match &self.first_error {
            Some(e) => writeln!(f, "  errors            {}  (first: {e})", self.errors)?,
            None => writeln!(f, "  errors            {}", self.errors)?,
        }
        write!(f, "  ack latency ms    {}", p(&self.ack_latency_ms))?;
        if let Some(r) = &self.replies {
            writeln!(f)?;
            write!(
                f,
                "  replies           {}  (duplicates {}, missing {}, unattributed {}",
                r.replies, r.duplicates, r.missing, r.unattributed
            )?;
            if r.dropped_by_platform > 0 {
                write!(f, ", dropped by the platform {}", r.dropped_by_platform)?;
            }
            writeln!(f, ")")?;
            write!(f, "  reply latency ms  {}", p(&r.latency_ms))?;
            write!(
                f,
                "\n  last reply        {:.0} ms after the first callback",
                r.last_reply_ms
            )?;
        }
        if let Some(c) = &self.cards {
            write!(
                f,
                "\n  answered          {}  (missing {}, duplicates {}, unattributed {})",
                c.answered, c.missing, c.duplicates, c.unattributed
            )?;
            write!(
                f,
                "\n  cards             {}  (finalized {}, errored {}, unfinished {}; first text in the create: {})",
                c.cards, c.finalized, c.errored, c.unfinished, c.text_in_create
            )?;
            write!(f, "\n  plain messages    {}", c.as_messages)?;
            write!(f, "\n  first content ms  {}", p(&c.first_content_ms))?;
            write!(f, "\n  message ms        {}", p(&c.message_latency_ms))?;
            write!(
                f,
                "\n  API calls / card  mean {:.2}  p50 {}  max {}  (create + streaming updates)",
                c.calls_per_card.mean, c.calls_per_card.p50, c.calls_per_card.max
            )?;
            write!(f, "\n  stream span ms    {}", p(&c.stream_span_ms))?;
            write!(f, "\n  update gap ms     {}", p(&c.update_gap_ms))?;
            write!(
                f,
                "\n  final repeats the update before it: {} cards",
                c.final_repeats_update
            )?;
            write!(
                f,
                "\n  last answer       {:.0} ms after the first callback",
                c.last_answer_ms
            )?;
        }
        for e in &self.endpoints {
            write!(
                f,
                "\n  endpoint          {} {}: calls {}, throttled {}, peak {}/s",
                e.app, e.path, e.stats.calls, e.stats.throttled, e.stats.peak_per_second
            )?;
        }
        Ok(())
    }
}

/// Sends the load described by `args`, prints the report (and a JSON line with `--json`) to
/// stdout, and returns it.
pub async fn run_load(args: LoadArgs) -> anyhow::Result<LoadReport> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    if args.conversations == 0 || args.connections == 0 {
        bail!("--conversations and --connections must be at least 1");
    }
    let total = (args.rate * args.duration_secs as f64).round() as u64;
    if total == 0 {
        bail!("rate × duration is less than one request");
    }
    if args.platform != LoadPlatform::DingTalk
        && (args.expect == Expect::Cards || args.expired_sessions)
    {
        bail!("--expect cards and --expired-sessions are for --platform dingtalk");
    }
    let permits = u32::try_from(args.connections).context("--connections is too large")?;
    let mut callbacks = Callbacks::prepare(&args, total).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let stats = Arc::new(Mutex::new(AckStats::new()?));
    let semaphore = Arc::new(Semaphore::new(args.connections));

    eprintln!(
        "sending {total} {} callbacks at {} req/s to {} (replies to {})",
        args.platform,
        args.rate,
        args.target,
        callbacks.fake_url()
    );
    let start = Instant::now();
    let start_epoch_us = epoch_us();
    let period_ns = 1e9 / args.rate;
    for i in 0..total {
        let offset = Duration::from_nanos((i as f64 * period_ns) as u64);
        let intended = start + offset;
        if intended > Instant::now() {
            tokio::time::sleep_until(intended).await;
        }
        let permit = semaphore.clone().acquire_owned().await?;
        let conv_index = conversation_of(i, args.conversations);
        let request = callbacks.request(&client, i, conv_index)?;
        let stats = stats.clone();
        tokio::spawn(async move {
            let result = match request.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    // Read the (small) body so the connection goes back to the pool.
                    let _ = resp.bytes().await;
                    Ok(status)
                }
                Err(e) => Err(e),
            };
            let latency_us = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX);
            let sent_us = u64::try_from(offset.as_micros()).unwrap_or(u64::MAX);
            stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(conv_index, sent_us, latency_us, result);
            drop(permit);
        });
    }
    let send_window = start.elapsed();
    // Every task holds one permit until it has recorded its result.
    let _all = semaphore.acquire_many(permits).await?;
    let stats = std::mem::replace(
        &mut *stats.lock().unwrap_or_else(|e| e.into_inner()),
        AckStats::new()?,
    );

    let expected = usize::try_from(stats.ok).unwrap_or(usize::MAX);
    let wait = Duration::from_secs(args.wait_replies_secs);
    let (mut replies, mut cards) = (None, None);
    if args.wait_replies_secs > 0 {
        eprintln!(
            "waiting up to {} s for {} {}",
            args.wait_replies_secs,
            stats.ok,
            match args.expect {
                Expect::Messages => "replies",
                Expect::Cards => "answers (finalized cards or messages)",
            }
        );
        match (args.expect, &callbacks) {
            (Expect::Cards, Callbacks::DingTalk(d)) => {
                let seen = d.answers(expected, wait, &args.card_content_key).await;
                cards = Some(account_cards(
                    args.conversations,
                    &stats.accepted,
                    &seen,
                    start_epoch_us,
                )?);
            }
            _ => {
                let arrivals = callbacks.replies(expected, wait).await;
                replies = Some(account_replies(
                    args.conversations,
                    &stats.accepted,
                    &arrivals,
                    start_epoch_us,
                )?);
            }
        }
    }
    let endpoints = callbacks.endpoints();
    drop(callbacks);

    let report = LoadReport {
        platform: args.platform,
        target: args.target.clone(),
        target_rate: args.rate,
        duration_secs: args.duration_secs,
        conversations: args.conversations,
        sent: total,
        ok_2xx: stats.ok,
        non_2xx: stats.non_2xx,
        errors: stats.errors,
        first_error: stats.first_error,
        achieved_rate: total as f64 / send_window.as_secs_f64().max(1e-9),
        ack_latency_ms: Percentiles::from_histogram(&stats.latency),
        replies,
        cards,
        endpoints,
    };
    println!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report)
}

/// The conversation (round-robin) of callback number `i`.
fn conversation_of(i: u64, conversations: usize) -> usize {
    // The remainder is below `conversations`, so it fits.
    (i % conversations as u64) as usize
}

/// The user id of conversation number `index`.
fn user_name(index: usize) -> String {
    format!("loaduser{index:06}")
}

/// The platform side of a run: its in-process fake, how each callback is built, and how
/// each reply is attributed to a conversation. Dropping it stops the fake.
enum Callbacks {
    DingTalk(DingTalkCallbacks),
    Wecom(WecomCallbacks),
}

/// Replies the fake recorded: the conversation each belongs to (None: not this run's) and
/// its arrival time in ms since the epoch; plus what the fake dropped silently.
struct Arrivals {
    replies: Vec<(Option<usize>, i64)>,
    dropped: u64,
}

impl Callbacks {
    /// Starts the fake and builds what the run needs before the clock starts.
    async fn prepare(args: &LoadArgs, total: u64) -> anyhow::Result<Self> {
        let target = Url::parse(&args.target)
            .with_context(|| format!("--target {:?} is not a URL", args.target))?;
        let run_id: u32 = rand::random();
        Ok(match args.platform {
            LoadPlatform::DingTalk => {
                Self::DingTalk(DingTalkCallbacks::prepare(args, target, run_id).await?)
            }
            LoadPlatform::Wecom => {
                Self::Wecom(WecomCallbacks::prepare(args, target, total, run_id).await?)
            }
        })
    }

    fn fake_url(&self) -> String {
        match self {
            Self::DingTalk(d) => d.fake.base_url(),
            Self::Wecom(w) => w.fake.base_url(),
        }
    }

    /// What the fake DingTalk's OpenAPI routes saw so far (none for WeCom).
    fn endpoints(&self) -> Vec<EndpointReport> {
        match self {
            Self::DingTalk(d) => d
                .fake
                .endpoint_stats()
                .into_iter()
                .map(|((app, path), stats)| EndpointReport { app, path, stats })
                .collect(),
            Self::Wecom(_) => Vec::new(),
        }
    }

    /// The request of callback number `i`, which belongs to conversation `conv_index`.
    fn request(
        &mut self,
        client: &reqwest::Client,
        i: u64,
        conv_index: usize,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        match self {
            Self::DingTalk(d) => Ok(d.request(client, i, conv_index)),
            Self::Wecom(w) => w.request(client),
        }
    }

    /// Waits up to `timeout` for `expected` replies, then [`REPLY_SETTLE`] longer so that
    /// late duplicates are seen too, and attributes what the fake recorded.
    async fn replies(&self, expected: usize, timeout: Duration) -> Arrivals {
        match self {
            Self::DingTalk(d) => {
                d.fake.wait_for(expected, timeout).await;
                let recorded = d.fake.wait_for(usize::MAX, REPLY_SETTLE).await;
                Arrivals {
                    replies: d.attribute(&recorded),
                    dropped: 0,
                }
            }
            Self::Wecom(w) => {
                w.fake.wait_for(expected, timeout).await;
                let recorded = w.fake.wait_for(usize::MAX, REPLY_SETTLE).await;
                Arrivals {
                    replies: w.attribute(&recorded),
                    dropped: w.fake.dropped() as u64,
                }
            }
        }
    }
}

/// DingTalk: a pre-rendered body per conversation, completed and signed per request.
struct DingTalkCallbacks {
    fake: FakeDingTalk,
    conversations: Vec<Conversation>,
    signer: Signer,
    target: Url,
    run_id: u32,
}

impl DingTalkCallbacks {
    async fn prepare(args: &LoadArgs, target: Url, run_id: u32) -> anyhow::Result<Self> {
        let Some(app_secret) = args.app_secret.as_deref() else {
            bail!("--app-secret (or PARLEY_LOAD_APP_SECRET) is required with --platform dingtalk");
        };
        let fake = FakeDingTalk::start(
            args.fake_listen,
            vec![FakeApp::new(&args.robot_code, app_secret)],
        )
        .await
        .with_context(|| format!("starting the fake DingTalk on {}", args.fake_listen))?;
        fake.set_api_qps(args.api_qps);
        let mut callbacks = Self {
            fake,
            conversations: Vec::with_capacity(args.conversations),
            signer: Signer::new(app_secret),
            target,
            run_id,
        };
        let session_ttl = CALLBACK_SESSION_TTL
            + Duration::from_secs(args.duration_secs.saturating_add(args.wait_replies_secs));
        for i in 0..args.conversations {
            let conversation = Conversation::new(&callbacks.fake, args, i, session_ttl)?;
            callbacks.conversations.push(conversation);
        }
        Ok(callbacks)
    }

    fn request(
        &mut self,
        client: &reqwest::Client,
        i: u64,
        conv_index: usize,
    ) -> reqwest::RequestBuilder {
        let msg_id = format!("msgLoad{:08x}{i:012}", self.run_id);
        let body = self.conversations[conv_index]
            .template
            .render(&msg_id, shared::now_ms());
        let (timestamp, sign) = self.signer.current();
        client
            .post(self.target.clone())
            .header("timestamp", timestamp)
            .header("sign", sign)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            )
            .body(body)
    }

    /// Waits up to `timeout` until `expected` questions are answered — cards finalized plus
    /// messages, whoever they belong to — then [`REPLY_SETTLE`] longer for late duplicates,
    /// and attributes the cards and messages to this run's conversations.
    async fn answers(&self, expected: usize, timeout: Duration, content_key: &str) -> CardsSeen {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.fake.sent().len();
            let finalized = self.fake.cards().iter().filter(|c| c.finalized).count();
            if messages + finalized >= expected || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(CARD_POLL).await;
        }
        tokio::time::sleep(REPLY_SETTLE).await;
        let messages = self.attribute(&self.fake.sent());
        let by_conversation = index_by(self.conversations.iter().map(|c| c.id.as_str()));
        let by_user = index_by(self.conversations.iter().map(|c| c.user.as_str()));
        let mut update_gaps_ms = Vec::new();
        let cards = self
            .fake
            .cards()
            .iter()
            .map(|card| {
                let conv = card_space(card).and_then(|(kind, id)| match kind {
                    "IM_GROUP" => by_conversation.get(id).copied(),
                    "IM_ROBOT" => by_user.get(id).copied(),
                    _ => None,
                });
                if conv.is_some() {
                    update_gaps_ms.extend(update_gaps(card));
                }
                (conv, CardSeen::of(card, content_key))
            })
            .collect();
        CardsSeen {
            cards,
            messages,
            update_gaps_ms,
        }
    }

    /// Replies by sessionWebhook or group send belong to their conversation, one-to-one
    /// sends to their user's.
    fn attribute(&self, recorded: &[super::SentMessage]) -> Vec<(Option<usize>, i64)> {
        let by_conversation = index_by(self.conversations.iter().map(|c| c.id.as_str()));
        let by_user = index_by(self.conversations.iter().map(|c| c.user.as_str()));
        recorded
            .iter()
            .map(|msg| {
                let conv = match msg.via {
                    Via::OtoSend => msg.user_ids.first().and_then(|u| by_user.get(u.as_str())),
                    Via::SessionWebhook | Via::GroupSend => msg
                        .conversation_id
                        .as_deref()
                        .and_then(|c| by_conversation.get(c)),
                };
                (conv.copied(), msg.received_at_ms)
            })
            .collect()
    }
}

/// The (type, id) of the first space a card was delivered into: `("IM_GROUP", cid)` or
/// `("IM_ROBOT", staffId)`.
fn card_space(card: &FakeCard) -> Option<(&str, &str)> {
    card.space_ids
        .first()?
        .strip_prefix("dtv1.card//")?
        .split_once('.')
}

/// The time from a card's create to its first streaming update and between its later
/// ones, the final update excluded (it goes out when the answer is complete, unpaced), ms.
fn update_gaps(card: &FakeCard) -> impl Iterator<Item = i64> + '_ {
    let times = std::iter::once(card.created_at_ms).chain(
        card.updates
            .iter()
            .filter(|u| !u.is_finalize)
            .map(|u| u.at_ms),
    );
    times.clone().zip(times.skip(1)).map(|(a, b)| b - a)
}

/// What the fake saw of one card, in ms since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CardSeen {
    created_ms: i64,
    /// Its first visible text: the create if that carried text, else the first non-empty
    /// streaming update (None: never any text).
    first_content_ms: Option<i64>,
    text_in_create: bool,
    finalized: bool,
    errored: bool,
    /// The create plus its streaming updates.
    calls: u64,
    /// Its last streaming update (its creation if none).
    last_update_ms: i64,
    /// Its final update carried the same text as the streaming update just before it.
    final_repeats_update: bool,
}

impl CardSeen {
    fn of(card: &FakeCard, content_key: &str) -> Self {
        let text_in_create = card
            .params
            .get(content_key)
            .is_some_and(|text| !text.is_empty());
        Self {
            created_ms: card.created_at_ms,
            first_content_ms: if text_in_create {
                Some(card.created_at_ms)
            } else {
                card.first_content_at_ms
            },
            text_in_create,
            finalized: card.finalized,
            errored: card.errored,
            calls: 1 + card.updates.len() as u64,
            last_update_ms: card.updates.last().map_or(card.created_at_ms, |u| u.at_ms),
            final_repeats_update: match card.updates.as_slice() {
                [.., before, last] => {
                    last.is_finalize && !before.is_finalize && before.content == last.content
                }
                _ => false,
            },
        }
    }
}

/// The cards and messages of a card run, each with the conversation it belongs to (None:
/// not this run's).
struct CardsSeen {
    cards: Vec<(Option<usize>, CardSeen)>,
    messages: Vec<(Option<usize>, i64)>,
    /// [`update_gaps`] of this run's cards.
    update_gaps_ms: Vec<i64>,
}

/// WeCom: every request of the run, encrypted and signed before the clock starts.
struct WecomCallbacks {
    fake: FakeWecom,
    /// The FromUserName of each conversation.
    users: Vec<String>,
    /// The requests in send order.
    prepared: std::vec::IntoIter<PreparedCallback>,
}

/// One encrypted WeCom callback: the target URL with `msg_signature`, `timestamp` and
/// `nonce`, and the XML envelope.
struct PreparedCallback {
    url: Url,
    body: String,
}

impl WecomCallbacks {
    async fn prepare(
        args: &LoadArgs,
        target: Url,
        total: u64,
        run_id: u32,
    ) -> anyhow::Result<Self> {
        if args.duration_secs > WECOM_MAX_DURATION_SECS {
            bail!(
                "--duration-secs is at most {WECOM_MAX_DURATION_SECS} with --platform wecom: \
                 callbacks are signed before the run and timestamps older than an hour are refused"
            );
        }
        if total > WECOM_MAX_REQUESTS {
            bail!(
                "at most {WECOM_MAX_REQUESTS} requests with --platform wecom (they are \
                 encrypted before the run and held in memory); lower --rate or --duration-secs"
            );
        }
        WecomCrypto::new(&args.wecom_token, &args.encoding_aes_key, &args.corp_id)
            .map_err(|e| anyhow!("--encoding-aes-key: {e}"))?;
        let app = FakeWecomApp {
            corp_id: args.corp_id.clone(),
            corp_secret: args.corp_secret.clone(),
            agent_id: args.agent_id,
            token: args.wecom_token.clone(),
            encoding_aes_key: args.encoding_aes_key.clone(),
        };
        if args.wait_replies_secs > 0 {
            if args.fake_listen.port() == 0 {
                eprintln!(
                    "warning: the fake WeCom listens on a random port; replies are counted only \
                     if the bot's api_base points at it (pass a fixed --fake-listen)"
                );
            }
            let per_member = total
                .min((args.rate * 60.0).ceil() as u64)
                .div_ceil(args.conversations as u64);
            if per_member > PER_MEMBER_PER_MINUTE as u64 {
                eprintln!(
                    "warning: about {per_member} messages a minute per member; WeCom (and its \
                     fake) silently drop replies beyond {PER_MEMBER_PER_MINUTE}: raise --conversations"
                );
            }
        }
        let fake = FakeWecom::start(args.fake_listen, vec![app])
            .await
            .with_context(|| format!("starting the fake WeCom on {}", args.fake_listen))?;
        let mut callbacks = Self {
            fake,
            users: (0..args.conversations).map(user_name).collect(),
            prepared: Vec::new().into_iter(),
        };
        let began = std::time::Instant::now();
        let (fake, users) = (callbacks.fake.clone(), callbacks.users.clone());
        let (corp_id, agent_id) = (args.corp_id.clone(), args.agent_id);
        let prepared = tokio::task::spawn_blocking(move || {
            (0..total)
                .map(|i| {
                    let from = &users[conversation_of(i, users.len())];
                    // Numeric and unique, like WeCom's 64-bit MsgIds; i < 2^32 (checked above).
                    let msg_id = (u64::from(run_id) << 32 | i).to_string();
                    let xml = text_message(&corp_id, agent_id, from, &msg_id, MESSAGE_TEXT);
                    let (query, body) = fake.callback(&corp_id, &xml);
                    PreparedCallback {
                        url: with_query(&target, &query),
                        body,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .context("encrypting the WeCom callbacks")?;
        eprintln!(
            "encrypted and signed {total} WeCom callbacks in {:.2} s",
            began.elapsed().as_secs_f64()
        );
        callbacks.prepared = prepared.into_iter();
        Ok(callbacks)
    }

    fn request(&mut self, client: &reqwest::Client) -> anyhow::Result<reqwest::RequestBuilder> {
        let next = self
            .prepared
            .next()
            .context("more requests scheduled than prepared")?;
        Ok(client
            .post(next.url)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("text/xml; charset=utf-8"),
            )
            .body(next.body))
    }

    /// `message/send` replies belong to the conversation of their `touser`.
    fn attribute(&self, recorded: &[super::WecomSent]) -> Vec<(Option<usize>, i64)> {
        let by_user = index_by(self.users.iter().map(String::as_str));
        recorded
            .iter()
            .map(|msg| (by_user.get(msg.user.as_str()).copied(), msg.received_at_ms))
            .collect()
    }
}

impl Drop for DingTalkCallbacks {
    fn drop(&mut self) {
        self.fake.shutdown();
    }
}

impl Drop for WecomCallbacks {
    fn drop(&mut self) {
        self.fake.shutdown();
    }
}

/// `base` with `query` appended to its query string.
fn with_query(base: &Url, query: &str) -> Url {
    let mut url = base.clone();
    match base.query().filter(|q| !q.is_empty()) {
        Some(existing) => url.set_query(Some(&format!("{existing}&{query}"))),
        None => url.set_query(Some(query)),
    }
    url
}

/// Position of every name.
fn index_by<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    names.enumerate().map(|(i, name)| (name, i)).collect()
}

/// One simulated conversation: its id, its user, and its pre-rendered callback body.
struct Conversation {
    id: String,
    user: String,
    template: BodyTemplate,
}

impl Conversation {
    fn new(
        fake: &FakeDingTalk,
        args: &LoadArgs,
        index: usize,
        session_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let user = user_name(index);
        let text = MESSAGE_TEXT;
        let mut spec = if args.group {
            let cid = format!("cidLoadGroup{index:06}==");
            CallbackSpec::group(&args.robot_code, &cid, &user, text)
        } else {
            CallbackSpec::one_to_one(&args.robot_code, &user, text)
        };
        spec.msg_id = MSG_ID_MARK.to_owned();
        let mut body = fake.callback_body(&spec);
        // One long-lived session per conversation instead of one per callback; or, with
        // --expired-sessions, one already expired (its webhook answers errcode 300001).
        let ttl = if args.expired_sessions {
            Duration::ZERO
        } else {
            session_ttl
        };
        let (webhook, expires) = fake.session_webhook(&spec.conversation_id, ttl);
        body["sessionWebhook"] = json!(webhook);
        body["sessionWebhookExpiredTime"] = json!(expires);
        body["createAt"] = json!(CREATE_AT_MARK);
        Ok(Self {
            id: spec.conversation_id,
            user,
            template: BodyTemplate::new(&serde_json::to_string(&body)?)?,
        })
    }
}

const MSG_ID_MARK: &str = "@@PARLEY_LOAD_MSG_ID@@";
const CREATE_AT_MARK: &str = "@@PARLEY_LOAD_CREATE_AT@@";

/// A serialized callback body with two holes: the msgId (inside its string) and createAt
/// (a number, replacing the quoted marker).
struct BodyTemplate {
    pieces: Vec<String>,
    slots: Vec<Slot>,
}

#[derive(Clone, Copy)]
enum Slot {
    MsgId,
    CreateAt,
}

impl BodyTemplate {
    fn new(serialized: &str) -> anyhow::Result<Self> {
        let create_at_quoted = format!("\"{CREATE_AT_MARK}\"");
        let mut pieces = Vec::new();
        let mut slots = Vec::new();
        let mut rest = serialized;
        loop {
            let msg = rest
                .find(MSG_ID_MARK)
                .map(|i| (i, MSG_ID_MARK.len(), Slot::MsgId));
            let created = rest
                .find(&create_at_quoted)
                .map(|i| (i, create_at_quoted.len(), Slot::CreateAt));
            let next = match (msg, created) {
                (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            let Some((at, len, slot)) = next else { break };
            pieces.push(rest[..at].to_owned());
            slots.push(slot);
            rest = &rest[at + len..];
        }
        pieces.push(rest.to_owned());
        if slots.len() != 2 {
            bail!("callback template has {} holes, expected 2", slots.len());
        }
        Ok(Self { pieces, slots })
    }

    /// The body with `msg_id` (plain ASCII, no escaping needed) and `create_at` filled in.
    fn render(&self, msg_id: &str, create_at: i64) -> Vec<u8> {
        let len: usize = self.pieces.iter().map(String::len).sum();
        let mut out = String::with_capacity(len + msg_id.len() + 20);
        for (piece, slot) in self.pieces.iter().zip(&self.slots) {
            out.push_str(piece);
            match slot {
                Slot::MsgId => out.push_str(msg_id),
                Slot::CreateAt => out.push_str(&create_at.to_string()),
            }
        }
        if let Some(last) = self.pieces.last() {
            out.push_str(last);
        }
        out.into_bytes()
    }
}

/// The `timestamp`/`sign` header pair, rebuilt at most once per second (a signature depends
/// only on the timestamp and the secret, and stays valid for an hour).
struct Signer {
    secret: String,
    second: i64,
    headers: (HeaderValue, HeaderValue),
}

impl Signer {
    fn new(secret: &str) -> Self {
        Self {
            secret: secret.to_owned(),
            second: i64::MIN,
            headers: (HeaderValue::from_static("0"), HeaderValue::from_static("")),
        }
    }

    fn current(&mut self) -> (HeaderValue, HeaderValue) {
        let now = shared::now_ms();
        if now / 1000 != self.second {
            let timestamp = now.to_string();
            let sign = shared::platform::dingtalk::sign::sign(&self.secret, &timestamp);
            // Both are ASCII digits / base64, always valid header values.
            if let (Ok(ts), Ok(sig)) = (
                HeaderValue::from_str(&timestamp),
                HeaderValue::from_str(&sign),
            ) {
                self.second = now / 1000;
                self.headers = (ts, sig);
            }
        }
        self.headers.clone()
    }
}

/// Acknowledgement results, shared by the request tasks.
struct AckStats {
    ok: u64,
    non_2xx: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
    /// (conversation index, intended send offset µs) of every 2xx callback.
    accepted: Vec<(usize, u64)>,
}

impl AckStats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            ok: 0,
            non_2xx: BTreeMap::new(),
            errors: 0,
            first_error: None,
            latency: latency_histogram()?,
            accepted: Vec::new(),
        })
    }

    fn record(
        &mut self,
        conv_index: usize,
        sent_us: u64,
        latency_us: u64,
        result: reqwest::Result<u16>,
    ) {
        self.latency.saturating_record(latency_us.max(1));
        match result {
            Ok(status) if (200..300).contains(&status) => {
                self.ok += 1;
                self.accepted.push((conv_index, sent_us));
            }
            Ok(status) => *self.non_2xx.entry(status).or_default() += 1,
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(error_chain(&e));
                }
            }
        }
    }
}

/// The accepted callbacks' send times (µs since the start), per conversation.
fn sends_per_conversation(conversations: usize, accepted: &[(usize, u64)]) -> Vec<Vec<u64>> {
    let mut sends: Vec<Vec<u64>> = vec![Vec::new(); conversations];
    for &(conv, sent_us) in accepted {
        if let Some(list) = sends.get_mut(conv) {
            list.push(sent_us);
        }
    }
    sends
}

/// µs from a callback's send time (µs since `start_epoch_us`) to `at_ms` (ms since the
/// epoch), at least 1 so every answer is recorded.
fn since_sent_us(start_epoch_us: i64, sent_us: u64, at_ms: i64) -> u64 {
    let us = at_ms
        .saturating_mul(1000)
        .saturating_sub(start_epoch_us.saturating_add_unsigned(sent_us));
    u64::try_from(us).unwrap_or(0).max(1)
}

/// Matches replies to accepted callbacks per conversation, in order, and times them.
fn account_replies(
    conversations: usize,
    accepted: &[(usize, u64)],
    arrivals: &Arrivals,
    start_epoch_us: i64,
) -> anyhow::Result<ReplyReport> {
    let mut sends = sends_per_conversation(conversations, accepted);
    let mut received: Vec<Vec<i64>> = vec![Vec::new(); conversations];
    let mut report = ReplyReport {
        dropped_by_platform: arrivals.dropped,
        ..ReplyReport::default()
    };
    for &(conv, arrived_ms) in &arrivals.replies {
        match conv.and_then(|i| received.get_mut(i)) {
            Some(list) => {
                report.replies += 1;
                list.push(arrived_ms);
            }
            None => report.unattributed += 1,
        }
    }
    let last = received.iter().flatten().max().copied();
    report.last_reply_ms = last.map_or(0.0, |ms| since_start_ms(ms, start_epoch_us));
    let mut latency = latency_histogram()?;
    for (sent, arrived) in sends.iter_mut().zip(received.iter_mut()) {
        sent.sort_unstable();
        arrived.sort_unstable();
        report.duplicates += arrived.len().saturating_sub(sent.len()) as u64;
        report.missing += sent.len().saturating_sub(arrived.len()) as u64;
        for (&sent_us, &arrived_ms) in sent.iter().zip(arrived.iter()) {
            latency.saturating_record(since_sent_us(start_epoch_us, sent_us, arrived_ms));
        }
    }
    report.latency_ms = Percentiles::from_histogram(&latency);
    Ok(report)
}

/// One answer of a card run: a card, or a plain message (arrival, ms since the epoch).
#[derive(Debug, Clone, Copy)]
enum Answer {
    Card(CardSeen),
    Message(i64),
}

impl Answer {
    /// When it began: a card's creation, a message's arrival.
    fn began_ms(&self) -> i64 {
        match self {
            Answer::Card(c) => c.created_ms,
            Answer::Message(ms) => *ms,
        }
    }
}

/// Matches cards and messages to accepted callbacks per conversation, in order (a
/// conversation's answers by when they began), and times them.
fn account_cards(
    conversations: usize,
    accepted: &[(usize, u64)],
    seen: &CardsSeen,
    start_epoch_us: i64,
) -> anyhow::Result<CardReport> {
    let mut sends = sends_per_conversation(conversations, accepted);
    let mut report = CardReport::default();
    let mut answers: Vec<Vec<Answer>> = vec![Vec::new(); conversations];
    let mut calls = Vec::new();
    let mut span = latency_histogram()?;
    let mut last_ms = None::<i64>;
    for &(conv, card) in &seen.cards {
        let Some(list) = conv.and_then(|i| answers.get_mut(i)) else {
            report.unattributed += 1;
            continue;
        };
        list.push(Answer::Card(card));
        report.cards += 1;
        report.text_in_create += u64::from(card.text_in_create);
        if card.finalized {
            report.finalized += 1;
            report.errored += u64::from(card.errored);
            last_ms = last_ms.max(Some(card.last_update_ms));
        } else {
            report.unfinished += 1;
        }
        calls.push(card.calls);
        report.final_repeats_update += u64::from(card.final_repeats_update);
        let span_us = (card.last_update_ms - card.created_ms).saturating_mul(1000);
        span.saturating_record(u64::try_from(span_us).unwrap_or(0).max(1));
    }
    for &(conv, arrived_ms) in &seen.messages {
        let Some(list) = conv.and_then(|i| answers.get_mut(i)) else {
            report.unattributed += 1;
            continue;
        };
        list.push(Answer::Message(arrived_ms));
        report.as_messages += 1;
        last_ms = last_ms.max(Some(arrived_ms));
    }
    let (mut first_content, mut message) = (latency_histogram()?, latency_histogram()?);
    let since_sent = |sent_us: u64, at_ms: i64| since_sent_us(start_epoch_us, sent_us, at_ms);
    for (sent, got) in sends.iter_mut().zip(answers.iter_mut()) {
        sent.sort_unstable();
        got.sort_by_key(Answer::began_ms);
        let done = got
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Answer::Message(_)
                        | Answer::Card(CardSeen {
                            finalized: true,
                            ..
                        })
                )
            })
            .count();
        report.answered += done.min(sent.len()) as u64;
        report.missing += sent.len().saturating_sub(done) as u64;
        report.duplicates += got.len().saturating_sub(sent.len()) as u64;
        for (&sent_us, answer) in sent.iter().zip(got.iter()) {
            match answer {
                Answer::Card(card) => {
                    if let Some(at) = card.first_content_ms {
                        first_content.saturating_record(since_sent(sent_us, at));
                    }
                }
                Answer::Message(at) => message.saturating_record(since_sent(sent_us, *at)),
            }
        }
    }
    report.first_content_ms = Percentiles::from_histogram(&first_content);
    report.message_latency_ms = Percentiles::from_histogram(&message);
    report.stream_span_ms = Percentiles::from_histogram(&span);
    let mut gaps = latency_histogram()?;
    for &gap in &seen.update_gaps_ms {
        gaps.saturating_record(u64::try_from(gap.saturating_mul(1000)).unwrap_or(0).max(1));
    }
    report.update_gap_ms = Percentiles::from_histogram(&gaps);
    calls.sort_unstable();
    if !calls.is_empty() {
        report.calls_per_card = CallsPerCard {
            mean: calls.iter().sum::<u64>() as f64 / calls.len() as f64,
            p50: calls[(calls.len() - 1) / 2],
            max: calls[calls.len() - 1],
        };
    }
    report.last_answer_ms = last_ms.map_or(0.0, |ms| since_start_ms(ms, start_epoch_us));
    Ok(report)
}

/// `at_ms` (ms since the epoch) as ms after the run's start.
fn since_start_ms(at_ms: i64, start_epoch_us: i64) -> f64 {
    (at_ms as f64 * 1000.0 - start_epoch_us as f64) / 1000.0
}

/// Microsecond histogram from 1 µs to 1 h with 3 significant digits.
fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("creating a latency histogram")
}

fn epoch_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::post;

    #[test]
    fn template_fills_msg_id_and_create_at() {
        let raw =
            format!("{{\"createAt\":\"{CREATE_AT_MARK}\",\"msgId\":\"{MSG_ID_MARK}\",\"x\":1}}");
        let t = BodyTemplate::new(&raw).unwrap();
        let body = t.render("msgA1", 42);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, json!({ "createAt": 42, "msgId": "msgA1", "x": 1 }));
    }

    /// A tiny ingress stand-in: checks the signature, answers 200, and replies through the
    /// callback's sessionWebhook like Parley would.
    #[tokio::test]
    async fn load_run_counts_acks_and_replies() {
        let client = reqwest::Client::new();
        let app = Router::new().route(
            "/dingtalk/{bot}",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let client = client.clone();
                    async move {
                        let ts = headers.get("timestamp").and_then(|v| v.to_str().ok());
                        let sign = headers.get("sign").and_then(|v| v.to_str().ok());
                        if shared::platform::dingtalk::sign::verify_callback(
                            "s3cret",
                            ts,
                            sign,
                            shared::now_ms(),
                        )
                        .is_err()
                        {
                            return axum::http::StatusCode::FORBIDDEN;
                        }
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let webhook = v["sessionWebhook"].as_str().unwrap().to_owned();
                        let text = v["text"]["content"].as_str().unwrap().trim().to_owned();
                        tokio::spawn(async move {
                            let _ = client
                                .post(webhook)
                                .json(&json!({ "msgtype": "text", "text": { "content": text } }))
                                .send()
                                .await;
                        });
                        axum::http::StatusCode::OK
                    }
                },
            ),
        );
        let addr = serve(app).await;

        let mut args = LoadArgs::new(format!("http://{addr}/dingtalk/bot1"), "s3cret");
        args.conversations = 7;
        args.group = true;
        let report = run_200_expecting_every_reply(args).await;
        assert_eq!(report.platform, LoadPlatform::DingTalk);
        assert!(report.ack_latency_ms.max >= report.ack_latency_ms.p50);
    }

    /// Sends 200 callbacks in one second and checks that each was acknowledged and answered
    /// exactly once.
    async fn run_200_expecting_every_reply(mut args: LoadArgs) -> LoadReport {
        args.rate = 200.0;
        args.duration_secs = 1;
        args.wait_replies_secs = 10;
        args.connections = 16;
        let report = run_load(args).await.unwrap();
        assert_eq!(report.sent, 200);
        assert_eq!(report.ok_2xx, 200, "{report}");
        assert_eq!(report.errors, 0);
        let replies = report.replies.as_ref().unwrap();
        let expected = ReplyReport {
            replies: 200,
            latency_ms: replies.latency_ms,
            last_reply_ms: replies.last_reply_ms,
            ..ReplyReport::default()
        };
        assert!(replies.last_reply_ms >= replies.latency_ms.max, "{report}");
        assert_eq!(replies, &expected);
        report
    }

    /// A tiny WeCom ingress stand-in built from Parley's own pieces: it opens the callback,
    /// answers 200, and replies with the message's text through [`WecomMessenger`] at
    /// `api_base`. Every MsgId it accepts goes into `seen`.
    ///
    /// [`WecomMessenger`]: shared::platform::wecom::client::WecomMessenger
    fn wecom_stand_in(api_base: String, seen: Arc<Mutex<Vec<String>>>) -> Router {
        use shared::platform::{Messenger, OutgoingMessage};
        use shared::secret::Secret;
        let bot = shared::config::WecomBot {
            id: "bot1".into(),
            policy: Default::default(),
            corp_id: SAMPLE_CORP_ID.into(),
            corp_secret: Secret::new(DEFAULT_CORP_SECRET),
            agent_id: SAMPLE_AGENT_ID,
            token: Secret::new(SAMPLE_WECOM_TOKEN),
            encoding_aes_key: Secret::new(SAMPLE_ENCODING_AES_KEY),
            api_base,
            markdown: false,
            welcome_text: None,
            working_notice_secs: 0,
            api_per_minute: 2000,
        };
        let crypto =
            WecomCrypto::new(SAMPLE_WECOM_TOKEN, SAMPLE_ENCODING_AES_KEY, SAMPLE_CORP_ID).unwrap();
        let cache: Arc<dyn shared::cache::Cache> = Arc::new(shared::cache::MemoryCache::new());
        let tokens = Arc::new(shared::platform::token::TokenCache::new(cache.clone()));
        let messenger = Arc::new(shared::platform::wecom::client::WecomMessenger::new(
            reqwest::Client::new(),
            bot.clone(),
            tokens,
            cache,
        ));
        Router::new().route(
            "/wecom/{bot}",
            post(
                move |axum::extract::RawQuery(query): axum::extract::RawQuery,
                      body: axum::body::Bytes| {
                    let (bot, crypto, messenger, seen) =
                        (bot.clone(), crypto.clone(), messenger.clone(), seen.clone());
                    async move {
                        let q: HashMap<String, String> =
                            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                                .into_owned()
                                .collect();
                        let opened = shared::platform::wecom::open_callback(
                            &crypto,
                            &q["msg_signature"],
                            &q["timestamp"],
                            &q["nonce"],
                            &body,
                        );
                        let Ok(msg) = opened else {
                            return axum::http::StatusCode::UNAUTHORIZED;
                        };
                        seen.lock().unwrap().push(msg.msg_id.clone().unwrap());
                        let job = shared::platform::wecom::callback::to_job(&bot, &msg, 0).unwrap();
                        tokio::spawn(async move {
                            let text = OutgoingMessage::text(job.text().unwrap_or_default());
                            messenger.send(&job, &text).await.unwrap();
                        });
                        axum::http::StatusCode::OK
                    }
                },
            ),
        )
    }

    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn wecom_run_counts_acks_and_replies() {
        // The fake WeCom must listen where the stand-in sends: reserve a port for it.
        let fake_listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve(wecom_stand_in(
            format!("http://{fake_listen}"),
            seen.clone(),
        ))
        .await;

        let mut args = LoadArgs::wecom(format!("http://{addr}/wecom/bot1"));
        // 20 messages per member: below WeCom's 30 a minute.
        args.conversations = 10;
        args.fake_listen = fake_listen;
        let report = run_200_expecting_every_reply(args).await;
        assert_eq!(report.platform, LoadPlatform::Wecom);
        let mut ids = seen.lock().unwrap().clone();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 200, "MsgIds are unique");
        assert!(ids.iter().all(|id| id.parse::<u64>().is_ok()), "{ids:?}");
    }

    #[tokio::test]
    async fn wecom_wrong_token_shows_as_401() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve(wecom_stand_in("http://127.0.0.1:9".into(), seen.clone())).await;
        let mut args = LoadArgs::wecom(format!("http://{addr}/wecom/bot1"));
        args.wecom_token = "not-the-token".into();
        args.rate = 50.0;
        args.duration_secs = 1;
        let report = run_load(args).await.unwrap();
        assert_eq!(report.non_2xx.get(&401), Some(&50), "{report}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_wecom_and_dingtalk_options_are_refused_before_sending() {
        let mut args = LoadArgs::wecom("http://127.0.0.1:9/wecom/b");
        args.encoding_aes_key = "short".into();
        let e = run_load(args).await.unwrap_err();
        assert!(e.to_string().contains("--encoding-aes-key"), "{e}");

        let mut args = LoadArgs::wecom("http://127.0.0.1:9/wecom/b");
        args.duration_secs = WECOM_MAX_DURATION_SECS + 1;
        args.rate = 1.0;
        assert!(run_load(args).await.is_err());

        let mut args = LoadArgs::new("http://127.0.0.1:9/dingtalk/b", "s");
        args.app_secret = None;
        let e = run_load(args).await.unwrap_err();
        assert!(e.to_string().contains("--app-secret"), "{e}");
    }

    #[test]
    fn command_line_selects_the_platform() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            load: LoadArgs,
        }
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "load",
            "--platform",
            "wecom",
            "--target",
            "http://h/wecom/b",
            "--agent-id",
            "7",
        ])
        .unwrap();
        assert_eq!(cli.load.platform, LoadPlatform::Wecom);
        assert_eq!(cli.load.agent_id, 7);
        assert_eq!(cli.load.corp_id, SAMPLE_CORP_ID);
        assert_eq!(cli.load.encoding_aes_key, SAMPLE_ENCODING_AES_KEY);
        let cli = Cli::try_parse_from([
            "load",
            "--target",
            "http://h/dingtalk/b",
            "--app-secret",
            "x",
        ])
        .unwrap();
        assert_eq!(cli.load.platform, LoadPlatform::DingTalk);
    }

    /// A tiny card-mode ingress stand-in: every fourth question is answered by a message on
    /// its sessionWebhook, the others by an AI card on the fake at `api_base` — created with
    /// the first text, one streaming update, then the final one.
    fn card_stand_in(api_base: String) -> Router {
        let client = reqwest::Client::new();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Router::new().route(
            "/dingtalk/{bot}",
            post(move |body: axum::body::Bytes| {
                let (client, api_base) = (client.clone(), api_base.clone());
                let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    tokio::spawn(async move {
                        if n % 4 == 3 {
                            let webhook = v["sessionWebhook"].as_str().unwrap();
                            let text = json!({ "msgtype": "text", "text": { "content": "a" } });
                            client.post(webhook).json(&text).send().await.unwrap();
                            return;
                        }
                        let token: serde_json::Value = client
                            .post(format!("{api_base}/v1.0/oauth2/accessToken"))
                            .json(&json!({ "appKey": "demo-app", "appSecret": "s3cret" }))
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        let token = token["accessToken"].as_str().unwrap().to_owned();
                        let staff = v["senderStaffId"].as_str().unwrap();
                        let track = v["msgId"].as_str().unwrap();
                        let call =
                            |method: reqwest::Method, path: &str, body: serde_json::Value| {
                                client
                                    .request(method, format!("{api_base}{path}"))
                                    .header("x-acs-dingtalk-access-token", &token)
                                    .json(&body)
                                    .send()
                            };
                        let created = call(
                            reqwest::Method::POST,
                            "/v1.0/card/instances/createAndDeliver",
                            json!({
                                "cardTemplateId": "t.schema", "outTrackId": track,
                                "cardData": { "cardParamMap": { "msgContent": "Ec" } },
                                "openSpaceId": format!("dtv1.card//IM_ROBOT.{staff}"),
                                "imRobotOpenDeliverModel": { "spaceType": "IM_ROBOT" },
                            }),
                        )
                        .await
                        .unwrap();
                        assert_eq!(created.status(), 200);
                        for (text, last) in [("Echo", false), ("Echo!", true)] {
                            let body = json!({
                                "outTrackId": track, "guid": text, "key": "msgContent",
                                "content": text, "isFull": true, "isFinalize": last,
                            });
                            let r = call(reqwest::Method::PUT, "/v1.0/card/streaming", body);
                            assert_eq!(r.await.unwrap().status(), 200);
                        }
                    });
                    axum::http::StatusCode::OK
                }
            }),
        )
    }

    #[tokio::test]
    async fn card_run_counts_cards_fallback_messages_and_api_calls() {
        let fake_listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let addr = serve(card_stand_in(format!("http://{fake_listen}"))).await;
        let mut args = LoadArgs::new(format!("http://{addr}/dingtalk/bot1"), "s3cret");
        args.expect = Expect::Cards;
        args.fake_listen = fake_listen;
        args.api_qps = 0;
        args.rate = 20.0;
        args.duration_secs = 1;
        args.conversations = 20;
        args.wait_replies_secs = 10;
        let report = run_load(args).await.unwrap();
        assert_eq!(report.ok_2xx, 20, "{report}");
        assert!(report.replies.is_none());
        let cards = report.cards.as_ref().unwrap();
        assert_eq!(
            (
                cards.answered,
                cards.missing,
                cards.duplicates,
                cards.unattributed
            ),
            (20, 0, 0, 0),
            "{report}"
        );
        assert_eq!(
            (cards.cards, cards.finalized, cards.as_messages),
            (15, 15, 5)
        );
        assert_eq!(
            (cards.text_in_create, cards.unfinished, cards.errored),
            (15, 0, 0)
        );
        assert_eq!((cards.calls_per_card.max, cards.calls_per_card.p50), (3, 3));
        assert!(cards.first_content_ms.max > 0.0 && cards.message_latency_ms.max > 0.0);
        assert_eq!(cards.final_repeats_update, 0, "the final adds a character");
        assert!(
            cards.last_answer_ms >= cards.first_content_ms.max,
            "{report}"
        );
        let calls = |path: &str| {
            report
                .endpoints
                .iter()
                .find(|e| e.path == path)
                .map(|e| (e.stats.calls, e.stats.throttled))
        };
        assert_eq!(
            calls("/v1.0/card/instances/createAndDeliver"),
            Some((15, 0))
        );
        assert_eq!(calls("/v1.0/card/streaming"), Some((30, 0)));
        let shown = report.to_string();
        assert!(shown.contains("plain messages    5"), "{shown}");
    }

    #[test]
    fn card_accounting_counts_duplicates_missing_and_strangers() {
        let card = |created_ms, finalized, updates: u64| CardSeen {
            created_ms,
            first_content_ms: Some(created_ms),
            text_in_create: true,
            finalized,
            errored: false,
            calls: 1 + updates,
            last_update_ms: created_ms + 100 * updates as i64,
            final_repeats_update: false,
        };
        // The run started 1,000 ms after the epoch.
        let start_us = 1_000_000_i64;
        let seen = CardsSeen {
            cards: vec![
                (Some(0), card(2_000, true, 3)),
                // Conversation 1: a card that never finished, then its answer as a message.
                (Some(1), card(2_500, false, 1)),
                (None, card(2_600, true, 1)),
            ],
            messages: vec![(Some(1), 4_000), (None, 4_100)],
            update_gaps_ms: vec![500, 700],
        };
        // One question in each of three conversations, sent at the start.
        let accepted = [(0, 0), (1, 0), (2, 0)];
        let r = account_cards(3, &accepted, &seen, start_us).unwrap();
        assert_eq!(
            (r.answered, r.missing, r.duplicates, r.unattributed),
            (2, 1, 1, 2)
        );
        assert_eq!(
            (r.cards, r.finalized, r.unfinished, r.as_messages),
            (2, 1, 1, 1)
        );
        assert_eq!(r.calls_per_card.max, 4);
        assert!((r.update_gap_ms.max - 700.0).abs() < 1.0, "{r:?}");
        assert!((r.calls_per_card.mean - 3.0).abs() < 1e-9);
        // A question is timed by its conversation's first answer: conversation 0's card at
        // 1,000 ms, conversation 1's unfinished card at 1,500 ms (shown before the message,
        // which is the duplicate); the last answer is that message, at 3,000 ms.
        assert!((r.first_content_ms.p50 - 1000.0).abs() < 1.0, "{r:?}");
        assert!((r.first_content_ms.max - 1500.0).abs() < 1.0, "{r:?}");
        assert_eq!(r.message_latency_ms, Percentiles::default());
        assert!((r.last_answer_ms - 3000.0).abs() < 1e-9, "{r:?}");
    }

    #[tokio::test]
    async fn expired_sessions_make_the_webhook_refuse() {
        let fake = FakeDingTalk::start(
            "127.0.0.1:0".parse().unwrap(),
            vec![FakeApp::new("demo-app", "s")],
        )
        .await
        .unwrap();
        let mut args = LoadArgs::new("http://127.0.0.1:9/dingtalk/b", "s");
        args.expired_sessions = true;
        let conversation = Conversation::new(&fake, &args, 0, CALLBACK_SESSION_TTL).unwrap();
        let body = conversation.template.render("msgX", shared::now_ms());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["sessionWebhookExpiredTime"].as_i64().unwrap() <= shared::now_ms());
        let answer: serde_json::Value = reqwest::Client::new()
            .post(v["sessionWebhook"].as_str().unwrap())
            .json(&json!({ "msgtype": "text", "text": { "content": "late" } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["errcode"], 300_001);
        fake.shutdown();
    }

    #[tokio::test]
    async fn cards_are_for_dingtalk_only() {
        let mut args = LoadArgs::wecom("http://127.0.0.1:9/wecom/b");
        args.expect = Expect::Cards;
        let e = run_load(args).await.unwrap_err();
        assert!(e.to_string().contains("--expect cards"), "{e}");
    }

    #[test]
    fn prepared_urls_keep_an_existing_query() {
        let base = Url::parse("http://h/wecom/b?x=1").unwrap();
        assert_eq!(
            with_query(&base, "msg_signature=s&timestamp=1&nonce=2").as_str(),
            "http://h/wecom/b?x=1&msg_signature=s&timestamp=1&nonce=2"
        );
        let base = Url::parse("http://h/wecom/b").unwrap();
        assert_eq!(with_query(&base, "a=b").query(), Some("a=b"));
    }

    #[tokio::test]
    async fn wrong_secret_shows_as_non_2xx() {
        let app = Router::new().route(
            "/dingtalk/{bot}",
            post(|headers: axum::http::HeaderMap| async move {
                let ts = headers.get("timestamp").and_then(|v| v.to_str().ok());
                let sign = headers.get("sign").and_then(|v| v.to_str().ok());
                match shared::platform::dingtalk::sign::verify_callback(
                    "right",
                    ts,
                    sign,
                    shared::now_ms(),
                ) {
                    Ok(()) => axum::http::StatusCode::OK,
                    Err(_) => axum::http::StatusCode::UNAUTHORIZED,
                }
            }),
        );
        let addr = serve(app).await;
        let mut args = LoadArgs::new(format!("http://{addr}/dingtalk/bot1"), "wrong");
        args.rate = 50.0;
        args.duration_secs = 1;
        args.conversations = 3;
        let report = run_load(args).await.unwrap();
        assert_eq!(report.sent, 50);
        assert_eq!(report.ok_2xx, 0);
        assert_eq!(report.non_2xx.get(&401), Some(&50));
        assert!(report.replies.is_none());
    }
}
