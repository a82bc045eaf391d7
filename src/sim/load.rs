//! An open-loop load generator for the DingTalk ingress: it sends signed callbacks at a fixed
//! arrival rate, each with a unique `msgId`, and measures every acknowledgement from the
//! request's *intended* send time, so a slow server shows up as latency instead of silently
//! lowering the rate (no coordinated omission). It runs its own [`FakeDingTalk`] in-process:
//! the callbacks' sessionWebhooks point at it, so the replies Parley sends back are counted
//! (missing, duplicated) and timed end to end.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::dingtalk::{CALLBACK_SESSION_TTL, CallbackSpec, FakeApp, FakeDingTalk, Via};

/// Options of `parley sim load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Ingress callback URL, e.g. `http://127.0.0.1:8080/dingtalk/bot1`.
    #[arg(long)]
    pub target: String,
    /// App secret the ingress verifies the `sign` header with.
    #[arg(long, env = "PARLEY_LOAD_APP_SECRET", hide_env_values = true)]
    pub app_secret: String,
    /// robotCode (= app key) put in the callbacks.
    #[arg(long, default_value = "demo-app")]
    pub robot_code: String,
    /// Arrival rate in requests per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Distinct conversations the callbacks are spread over (round-robin).
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Use group conversations (default: one-to-one chats).
    #[arg(long)]
    pub group: bool,
    /// Where the in-process fake DingTalk listens: its sessionWebhooks receive the replies.
    /// Pick a fixed port if Parley must also reach it for OpenAPI sends.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub fake_listen: SocketAddr,
    /// Wait up to this many seconds for one reply per accepted callback (0 = don't wait).
    #[arg(long, default_value_t = 0)]
    pub wait_replies_secs: u64,
    /// Maximum concurrent in-flight requests.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// The defaults of the command line, for `target` and `app_secret`.
    pub fn new(target: impl Into<String>, app_secret: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            app_secret: app_secret.into(),
            robot_code: "demo-app".to_owned(),
            rate: 1000.0,
            duration_secs: 10,
            conversations: 1000,
            group: false,
            fake_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            wait_replies_secs: 0,
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
    fn from_histogram(h: &Histogram<u64>) -> Self {
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
    /// From a callback's intended send time to its reply's arrival (FIFO per conversation).
    pub latency_ms: Percentiles,
}

/// What one load run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
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
    /// Reply accounting, if `--wait-replies-secs` > 0.
    pub replies: Option<ReplyReport>,
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
        writeln!(f, "load → {}", self.target)?;
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
            writeln!(
                f,
                "  replies           {}  (duplicates {}, missing {}, unattributed {})",
                r.replies, r.duplicates, r.missing, r.unattributed
            )?;
            write!(f, "  reply latency ms  {}", p(&r.latency_ms))?;
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
    let permits = u32::try_from(args.connections).context("--connections is too large")?;

    let fake = FakeDingTalk::start(
        args.fake_listen,
        vec![FakeApp::new(&args.robot_code, &args.app_secret)],
    )
    .await
    .with_context(|| format!("starting the fake DingTalk on {}", args.fake_listen))?;
    let session_ttl = CALLBACK_SESSION_TTL
        + Duration::from_secs(args.duration_secs.saturating_add(args.wait_replies_secs));
    let conversations: Arc<Vec<Conversation>> = Arc::new(
        (0..args.conversations)
            .map(|i| Conversation::new(&fake, &args, i, session_ttl))
            .collect::<anyhow::Result<_>>()?,
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let stats = Arc::new(Mutex::new(AckStats::new()?));
    let semaphore = Arc::new(Semaphore::new(args.connections));
    let run_id: u32 = rand::random();
    let mut signer = Signer::new(&args.app_secret);
    let target: Arc<str> = Arc::from(args.target.as_str());

    eprintln!(
        "sending {total} callbacks at {} req/s to {} (replies to {})",
        args.rate,
        args.target,
        fake.base_url()
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
        let conv_index = (i % conversations.len() as u64) as usize;
        let msg_id = format!("msgLoad{run_id:08x}{i:012}");
        let body = conversations[conv_index]
            .template
            .render(&msg_id, shared::now_ms());
        let (timestamp, sign) = signer.current();
        let request = client
            .post(&*target)
            .header("timestamp", timestamp)
            .header("sign", sign)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            )
            .body(body);
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

    let replies = if args.wait_replies_secs > 0 {
        eprintln!(
            "waiting up to {} s for {} replies",
            args.wait_replies_secs, stats.ok
        );
        let expected = usize::try_from(stats.ok).unwrap_or(usize::MAX);
        fake.wait_for(expected, Duration::from_secs(args.wait_replies_secs))
            .await;
        // A short settle so that late duplicates are seen too.
        let recorded = fake.wait_for(usize::MAX, Duration::from_millis(250)).await;
        Some(account_replies(
            &conversations,
            &stats,
            &recorded,
            start_epoch_us,
        )?)
    } else {
        None
    };
    fake.shutdown();

    let report = LoadReport {
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
    };
    println!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report)
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
        let user = format!("loaduser{index:06}");
        let text = "hello from the load generator";
        let mut spec = if args.group {
            let cid = format!("cidLoadGroup{index:06}==");
            CallbackSpec::group(&args.robot_code, &cid, &user, text)
        } else {
            CallbackSpec::one_to_one(&args.robot_code, &user, text)
        };
        spec.msg_id = MSG_ID_MARK.to_owned();
        let mut body = fake.callback_body(&spec);
        // One long-lived session per conversation instead of one per callback.
        let (webhook, expires) = fake.session_webhook(&spec.conversation_id, session_ttl);
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
            let sign = shared::dingtalk::sign::sign(&self.secret, &timestamp);
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

/// Matches replies to accepted callbacks per conversation, in order, and times them.
fn account_replies(
    conversations: &[Conversation],
    stats: &AckStats,
    recorded: &[super::SentMessage],
    start_epoch_us: i64,
) -> anyhow::Result<ReplyReport> {
    let mut by_conversation: HashMap<&str, usize> = HashMap::new();
    let mut by_user: HashMap<&str, usize> = HashMap::new();
    for (i, c) in conversations.iter().enumerate() {
        by_conversation.insert(c.id.as_str(), i);
        by_user.insert(c.user.as_str(), i);
    }
    let mut sends: Vec<Vec<u64>> = vec![Vec::new(); conversations.len()];
    for &(conv, sent_us) in &stats.accepted {
        sends[conv].push(sent_us);
    }
    let mut arrivals: Vec<Vec<i64>> = vec![Vec::new(); conversations.len()];
    let mut report = ReplyReport::default();
    for msg in recorded {
        let conv = match msg.via {
            Via::OtoSend => msg.user_ids.first().and_then(|u| by_user.get(u.as_str())),
            Via::SessionWebhook | Via::GroupSend => msg
                .conversation_id
                .as_deref()
                .and_then(|c| by_conversation.get(c)),
        };
        match conv {
            Some(&i) => {
                report.replies += 1;
                arrivals[i].push(msg.received_at_ms);
            }
            None => report.unattributed += 1,
        }
    }
    let mut latency = latency_histogram()?;
    for (sent, arrived) in sends.iter_mut().zip(arrivals.iter_mut()) {
        sent.sort_unstable();
        arrived.sort_unstable();
        report.duplicates += arrived.len().saturating_sub(sent.len()) as u64;
        report.missing += sent.len().saturating_sub(arrived.len()) as u64;
        for (&sent_us, &arrived_ms) in sent.iter().zip(arrived.iter()) {
            let sent_epoch_us = start_epoch_us.saturating_add_unsigned(sent_us);
            let us = arrived_ms
                .saturating_mul(1000)
                .saturating_sub(sent_epoch_us);
            latency.saturating_record(u64::try_from(us).unwrap_or(0).max(1));
        }
    }
    report.latency_ms = Percentiles::from_histogram(&latency);
    Ok(report)
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
                        if shared::dingtalk::sign::verify_callback(
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut args = LoadArgs::new(format!("http://{addr}/dingtalk/bot1"), "s3cret");
        args.rate = 200.0;
        args.duration_secs = 1;
        args.conversations = 7;
        args.group = true;
        args.wait_replies_secs = 10;
        args.connections = 16;
        let report = run_load(args).await.unwrap();
        assert_eq!(report.sent, 200);
        assert_eq!(report.ok_2xx, 200, "{report}");
        assert_eq!(report.errors, 0);
        let replies = report.replies.unwrap();
        assert_eq!(replies.replies, 200);
        assert_eq!(replies.missing, 0);
        assert_eq!(replies.duplicates, 0);
        assert_eq!(replies.unattributed, 0);
        assert!(report.ack_latency_ms.max >= report.ack_latency_ms.p50);
    }

    #[tokio::test]
    async fn wrong_secret_shows_as_non_2xx() {
        let app = Router::new().route(
            "/dingtalk/{bot}",
            post(|headers: axum::http::HeaderMap| async move {
                let ts = headers.get("timestamp").and_then(|v| v.to_str().ok());
                let sign = headers.get("sign").and_then(|v| v.to_str().ok());
                match shared::dingtalk::sign::verify_callback("right", ts, sign, shared::now_ms()) {
                    Ok(()) => axum::http::StatusCode::OK,
                    Err(_) => axum::http::StatusCode::UNAUTHORIZED,
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
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
