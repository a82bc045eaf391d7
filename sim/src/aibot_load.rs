//! `parley sim aibot-load`: conversations with a WeCom AI bot (智能机器人) started at a fixed
//! arrival rate, each played through to its end as WeCom plays it — the message callback,
//! then stream refreshes at a set cadence until a reply says `finish:true` or the window
//! passes — by the in-process [`FakeAibot`], which also serves the one-shot `response_url`s
//! the messages carry (the bot's `api_base` must point at `--fake-listen`).
//!
//! The report answers what the AI-bot figures ask: how fast every refresh was answered at
//! the refresh rate the run reached, and whether every message ended with exactly one
//! complete answer — in the stream, or else through its `response_url` — none lost, none
//! duplicated (a stream that finished and a post as well, or two posts), none wrong (an
//! answer that does not carry the question, as the fake model's echo does). Replies are
//! checked as WeCom checks them (signature, encryption, receive id, size); a violation ends
//! the conversation and is counted as an error with the first one shown.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::load::Percentiles;
use super::wecom_aibot::{AibotOptions, Chat, Exchange, FakeAibot, FakeAibotApp, text_message};

/// Tencent's sample AES key, also the test vectors' (any valid 43-character key will do).
const SAMPLE_AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
/// The text of every question; the fake model's answer echoes it.
const MESSAGE_TEXT: &str = "hello from the AI bot load generator";
/// How a group message addresses the bot (the ingress strips it).
const MENTION: &str = "@ParleyBot ";

/// Options of `parley sim aibot-load`.
#[derive(clap::Args, Debug, Clone)]
pub struct AibotLoadArgs {
    /// The AI bot's callback URL on Parley, e.g. `http://127.0.0.1:8080/wecom/ai`.
    #[arg(long)]
    pub target: String,
    /// The bot's callback Token.
    #[arg(long, default_value = "QDG6eK")]
    pub token: String,
    /// The bot's callback EncodingAESKey (43 characters).
    #[arg(long, default_value = SAMPLE_AES_KEY)]
    pub encoding_aes_key: String,
    /// The bot's `aibotid`, put into every callback.
    #[arg(long, default_value = "AIBOTID")]
    pub aibot_id: String,
    /// New conversations started per second (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// For how long conversations are started.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Pause between two refreshes of one stream, counted from the previous refresh.
    #[arg(long, default_value_t = 1000)]
    pub refresh_interval_ms: u64,
    /// How long after its message a stream is refreshed at most (WeCom: 6 minutes).
    #[arg(long, default_value_t = 360)]
    pub window_secs: u64,
    /// Where the fake's `response_url` endpoint listens; the bot's `api_base` must be it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub fake_listen: SocketAddr,
    /// After the last conversation ended, how long to wait for `response_url` posts still
    /// due and for late duplicates (Parley's worker waits up to 10 s for an unclaimed
    /// stream before it posts).
    #[arg(long, default_value_t = 12)]
    pub settle_secs: u64,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

impl AibotLoadArgs {
    /// The defaults of the command line against `target`.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            token: "QDG6eK".to_owned(),
            encoding_aes_key: SAMPLE_AES_KEY.to_owned(),
            aibot_id: "AIBOTID".to_owned(),
            rate: 50.0,
            duration_secs: 10,
            refresh_interval_ms: 1000,
            window_secs: 360,
            fake_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            settle_secs: 12,
            json: false,
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AibotLoadReport {
    /// Conversations started (one message each); half single chats, half group chats.
    pub conversations: u64,
    /// Conversations that ended in an error: the message callback failed or a reply broke
    /// the protocol.
    pub errors: u64,
    /// The first such error.
    pub first_error: Option<String>,
    /// Messages whose stream ended with `finish:true` and no `response_url` post.
    pub finished_in_stream: u64,
    /// Messages not finished in the stream and answered by one accepted `response_url` post.
    pub via_response_url: u64,
    /// Messages with neither.
    pub lost: u64,
    /// Messages answered more than once (a finished stream and a post, or two posts).
    pub duplicated: u64,
    /// Answers (stream finals or posts) that do not carry the question.
    pub wrong: u64,
    /// `response_url` posts the fake refused (one-shot used, expired, malformed).
    pub refused_posts: u64,
    /// Streams whose contents did not each extend the one before.
    pub not_cumulative: u64,
    /// From a message callback's send to its reply (the first, empty stream frame).
    pub message_reply_ms: Percentiles,
    /// Refreshes answered, over the whole run.
    pub refreshes: u64,
    /// Refreshes not answered within WeCom's 5 s, not answered, or answered empty.
    pub failed_refreshes: u64,
    /// From a refresh callback's send to its whole reply.
    pub refresh_ms: Percentiles,
    /// Refreshes sent per second: the median and the highest over the run's full seconds.
    pub refresh_rate_p50: u64,
    /// See `refresh_rate_p50`.
    pub refresh_rate_max: u64,
    /// From a message's send to the refresh reply that finished its stream.
    pub answer_ms: Percentiles,
}

impl fmt::Display for AibotLoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms",
                p.p50, p.p90, p.p99, p.max
            )
        };
        writeln!(
            f,
            "conversations {}: finished in the stream {}, via response_url {}, lost {}, \
             duplicated {}, wrong {}, errors {}{}",
            self.conversations,
            self.finished_in_stream,
            self.via_response_url,
            self.lost,
            self.duplicated,
            self.wrong,
            self.errors,
            self.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "refreshes {} (failed {}), {}/s median, {}/s peak: answered {}",
            self.refreshes,
            self.failed_refreshes,
            self.refresh_rate_p50,
            self.refresh_rate_max,
            p(&self.refresh_ms)
        )?;
        writeln!(f, "message replies {}", p(&self.message_reply_ms))?;
        write!(
            f,
            "answers finished in the stream after {}; refused posts {}, non-cumulative streams {}",
            p(&self.answer_ms),
            self.refused_posts,
            self.not_cumulative
        )
    }
}

/// What one conversation left behind.
struct Outcome {
    exchange: anyhow::Result<Exchange>,
    /// When its message was sent, since the run's start.
    sent: Duration,
    /// The `response_code` of its `response_url`.
    code: String,
}

/// Runs the conversations described by `args`, prints the report (and a JSON line with
/// `--json`) and returns it.
pub async fn run_aibot_load(args: AibotLoadArgs) -> anyhow::Result<AibotLoadReport> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    let total = (args.rate * args.duration_secs as f64).round() as u64;
    if total == 0 {
        bail!("rate × duration is less than one conversation");
    }
    let fake = FakeAibot::start(
        args.fake_listen,
        vec![FakeAibotApp {
            token: args.token.clone(),
            encoding_aes_key: args.encoding_aes_key.clone(),
            aibot_id: args.aibot_id.clone(),
        }],
    )
    .await?;
    fake.set_options(AibotOptions {
        refresh_interval: Duration::from_millis(args.refresh_interval_ms),
        window: Duration::from_secs(args.window_secs),
        ..AibotOptions::default()
    });
    eprintln!(
        "starting {total} AI-bot conversations at {}/s against {} (response_url on {})",
        args.rate,
        args.target,
        fake.base_url()
    );
    let run_id: u32 = rand::random();
    let start = Instant::now();
    let period_ns = 1e9 / args.rate;
    let mut tasks = JoinSet::new();
    for i in 0..total {
        let offset = Duration::from_nanos((i as f64 * period_ns) as u64);
        tokio::time::sleep_until(start + offset).await;
        let response_url = fake.new_response_url();
        let code = response_code(&response_url).to_owned();
        let user = format!("aibotload{run_id:08x}u{i:06}");
        let msg = if i % 2 == 0 {
            let text = MESSAGE_TEXT;
            text_message(&msgid(run_id, i), Chat::Single, &user, text, &response_url)
        } else {
            let chat = Chat::Group(format!("aibotload{run_id:08x}g{i:06}"));
            let text = format!("{MENTION}{MESSAGE_TEXT}");
            text_message(&msgid(run_id, i), chat, &user, &text, &response_url)
        };
        let (fake, url, aibot) = (fake.clone(), args.target.clone(), args.aibot_id.clone());
        tasks.spawn(async move {
            let sent = start.elapsed();
            let exchange = fake.converse(&url, &aibot, &msg).await;
            Outcome {
                exchange,
                sent,
                code,
            }
        });
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done?);
    }
    // Messages not finished in the stream are owed a post; finished ones must get none.
    let owed = outcomes
        .iter()
        .filter(|o| !o.exchange.as_ref().is_ok_and(|e| e.finished))
        .count();
    let settle = Duration::from_secs(args.settle_secs);
    let posts_before = fake.posts().len();
    fake.wait_for_posts(posts_before + owed, settle).await;
    tokio::time::sleep(settle.min(Duration::from_secs(2))).await;
    let report = account(&outcomes, &fake, start)?;
    fake.shutdown();
    println!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report)
}

/// The `response_code` query parameter of a fake `response_url`.
fn response_code(url: &str) -> &str {
    url.rsplit_once("response_code=").map_or("", |(_, c)| c)
}

/// A message id unique to the run and the conversation.
fn msgid(run_id: u32, i: u64) -> String {
    format!("aibotload{run_id:08x}m{i:08}")
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

fn account(
    outcomes: &[Outcome],
    fake: &FakeAibot,
    start: Instant,
) -> anyhow::Result<AibotLoadReport> {
    let mut posts: HashMap<&str, (u64, u64, Vec<String>)> = HashMap::new();
    let all_posts = fake.posts();
    for p in &all_posts {
        let e = posts.entry(p.code.as_str()).or_default();
        if p.accepted() {
            e.0 += 1;
            e.2.push(p.content.clone());
        } else {
            e.1 += 1;
        }
    }
    let (mut message_reply, mut refresh, mut answer) = (histogram()?, histogram()?, histogram()?);
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    let mut r = AibotLoadReport {
        conversations: outcomes.len() as u64,
        ..AibotLoadReport::default()
    };
    for o in outcomes {
        let (accepted, refused, contents) = posts
            .get(o.code.as_str())
            .map(|(a, r, c)| (*a, *r, c.as_slice()))
            .unwrap_or((0, 0, &[]));
        r.refused_posts += refused;
        let ex = match &o.exchange {
            Ok(ex) => ex,
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| format!("{e:#}"));
                // Whatever was posted for it still counts towards lost and duplicated.
                match accepted {
                    0 => r.lost += 1,
                    1 => r.via_response_url += 1,
                    _ => r.duplicated += 1,
                }
                continue;
            }
        };
        record(&mut message_reply, ex.first.latency);
        for f in &ex.refreshes {
            record(&mut refresh, f.latency);
            r.refreshes += 1;
            let second = (o.sent + f.at).as_secs();
            *per_second.entry(second).or_default() += 1;
        }
        r.failed_refreshes += ex.failed_refreshes as u64;
        if !ex.is_cumulative() {
            r.not_cumulative += 1;
        }
        let answers = u64::from(ex.finished) + accepted;
        match answers {
            0 => r.lost += 1,
            1 if ex.finished => {
                r.finished_in_stream += 1;
                if let Some(last) = ex.refreshes.last() {
                    record(&mut answer, last.at + last.latency);
                }
            }
            1 => r.via_response_url += 1,
            _ => r.duplicated += 1,
        }
        let shown = ex
            .final_content
            .iter()
            .map(String::as_str)
            .chain(contents.iter().map(String::as_str));
        if answers > 0 && !shown.into_iter().any(|c| c.contains(MESSAGE_TEXT)) {
            r.wrong += 1;
        }
    }
    // Full seconds only: the first and the last second of the run are ramps.
    let last = start.elapsed().as_secs();
    let mut rates: Vec<u64> = per_second
        .iter()
        .filter(|(s, _)| **s > 0 && **s + 1 < last)
        .map(|(_, n)| *n)
        .collect();
    rates.sort_unstable();
    r.refresh_rate_p50 = rates.get(rates.len() / 2).copied().unwrap_or(0);
    r.refresh_rate_max = rates.last().copied().unwrap_or(0);
    r.message_reply_ms = Percentiles::from_histogram(&message_reply);
    r.refresh_ms = Percentiles::from_histogram(&refresh);
    r.answer_ms = Percentiles::from_histogram(&answer);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_code_is_the_query_value() {
        assert_eq!(
            response_code("http://127.0.0.1:1/cgi-bin/aibot/response?response_code=ab12"),
            "ab12"
        );
        assert_eq!(response_code("http://x/none"), "");
    }

    #[tokio::test]
    async fn rejects_a_run_without_conversations() {
        let mut args = AibotLoadArgs::new("http://127.0.0.1:9/wecom/ai");
        args.rate = 0.0;
        assert!(run_aibot_load(args.clone()).await.is_err());
        args.rate = 1.0;
        args.duration_secs = 0;
        assert!(run_aibot_load(args).await.is_err());
    }
}
