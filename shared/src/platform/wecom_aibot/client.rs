//! The worker's side of an AI bot: the live reply writes the answer's progress where the
//! ingress reads it for WeCom's refreshes (no platform call per update), and the final
//! answer is delivered exactly once — by the stream if a refresh takes it within
//! [`CLAIM_WAIT`] and the bot's `stream_window_secs`, else by one markdown post to the
//! callback's one-shot `response_url`. An answer longer than a stream shows ends in the
//! stream with a pointer and its rest goes to the `response_url`.

use super::stream::{Claim, FOLLOWS, StreamState, Streams, fit, fit_post};
use crate::cache::Cache;
use crate::config::WecomAibotBot;
use crate::job::{AibotTarget, Job, ReplyTarget};
use crate::platform::api::{PlatformApi, Verdict};
use crate::platform::{LiveReply, Messenger, OutgoingMessage, SendError, Stage};
use crate::split::Limit;
use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How long after the final text is in place the worker waits for a refresh to take it.
/// WeCom keeps refreshing while a stream is open (its cadence is not documented); ten
/// seconds without one mean it has stopped.
pub const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// Least time between two progress writes of one answer.
const UPDATE_INTERVAL: Duration = Duration::from_millis(300);

/// How often the worker looks whether a refresh took the final text.
const CLAIM_POLL: Duration = Duration::from_millis(100);

/// The origin every genuine `response_url` has.
const WECOM_ORIGIN: &str = "https://qyapi.weixin.qq.com";

/// Shows and delivers the answers of one AI bot.
pub struct AibotMessenger {
    bot: WecomAibotBot,
    cache: Arc<dyn Cache>,
    api: PlatformApi,
    /// Origins a `response_url` may have: WeCom's and the bot's `api_base`'s.
    origins: Vec<String>,
}

impl fmt::Debug for AibotMessenger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AibotMessenger")
            .field("bot", &self.bot.id)
            .finish_non_exhaustive()
    }
}

fn origin(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    matches!(u.scheme(), "http" | "https").then(|| u.origin().ascii_serialization())
}

fn cache_error(e: crate::cache::CacheError) -> SendError {
    SendError::Retryable {
        reason: format!("stream store: {e}"),
        after: None,
    }
}

impl AibotMessenger {
    /// A messenger for `bot`, keeping progress in `cache` and posting through `http`.
    pub fn new(http: reqwest::Client, bot: WecomAibotBot, cache: Arc<dyn Cache>) -> Self {
        let mut origins = vec![WECOM_ORIGIN.to_string()];
        origins.extend(origin(&bot.api_base));
        Self {
            bot,
            cache,
            api: PlatformApi::without_token("wecom_aibot", http),
            origins,
        }
    }

    fn target(job: &Job) -> Result<&AibotTarget, SendError> {
        match &job.reply {
            ReplyTarget::WecomAibot(t) => Ok(t),
            _ => Err(SendError::Permanent("not a WeCom AI bot job".into())),
        }
    }

    fn streams(&self) -> Streams<'_> {
        Streams(self.cache.as_ref())
    }

    /// When the stream stops being the way to show this job's answer (ms since epoch).
    fn window_end(&self, job: &Job) -> i64 {
        job.received_at_ms
            .saturating_add((self.bot.stream_window_secs as i64).saturating_mul(1000))
    }

    /// Shows the text so far in the stream.
    async fn progress(&self, job: &Job, text: &str) -> Result<(), SendError> {
        if crate::now_ms() >= self.window_end(job) {
            return Err(SendError::Permanent("the stream window has passed".into()));
        }
        let t = Self::target(job)?;
        let state = StreamState {
            text: fit(text).0,
            finish: false,
            started_ms: job.received_at_ms,
        };
        self.streams()
            .write(&t.stream_id, &state)
            .await
            .map_err(cache_error)
    }

    /// Delivers the whole answer once: through the stream if a refresh takes it in time,
    /// else through the `response_url`. Safe to call again after a failure: the claim and
    /// the post are recorded.
    async fn conclude(&self, job: &Job, text: &str) -> Result<(), SendError> {
        let t = Self::target(job)?;
        let streams = self.streams();
        let (shown, rest) = fit(text);
        let claimed = match streams.claimed(&t.stream_id).await.map_err(cache_error)? {
            Some(c) => c,
            None => self.offer(job, t, shown).await?,
        };
        match claimed {
            Claim::Stream => match rest {
                Some(rest) => self.post_once(t, rest, "rest").await,
                None => Ok(()),
            },
            // Nothing to say (an unanswered message) is not posted.
            Claim::ResponseUrl if text.is_empty() => Ok(()),
            Claim::ResponseUrl => {
                let late = crate::now_ms() >= self.window_end(job);
                self.post_once(t, text, if late { "late" } else { "not_refreshed" })
                    .await
            }
        }
    }

    /// Puts the final text in the stream and waits for a refresh to take it; claims the
    /// `response_url` when none does in time. Returns who delivers the answer.
    async fn offer(&self, job: &Job, t: &AibotTarget, shown: String) -> Result<Claim, SendError> {
        let streams = self.streams();
        let window_end = self.window_end(job);
        let now = crate::now_ms();
        if now < window_end {
            let state = StreamState {
                text: shown,
                finish: true,
                started_ms: job.received_at_ms,
            };
            streams
                .write(&t.stream_id, &state)
                .await
                .map_err(cache_error)?;
            let until = tokio::time::Instant::now()
                + CLAIM_WAIT.min(Duration::from_millis((window_end - now) as u64));
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(CLAIM_POLL).await;
                if let Ok(Some(c)) = streams.claimed(&t.stream_id).await {
                    return Ok(c);
                }
            }
        }
        let claim = streams
            .claim(&t.stream_id, Claim::ResponseUrl)
            .await
            .map_err(cache_error)?;
        if claim == Claim::ResponseUrl {
            // Close the stream for a refresh that still comes.
            let state = StreamState {
                text: FOLLOWS.to_string(),
                finish: true,
                started_ms: job.received_at_ms,
            };
            if let Err(e) = streams.write(&t.stream_id, &state).await {
                tracing::warn!(error = %e, "could not close the stream; WeCom ends it by itself");
            }
            tracing::info!("no refresh took the answer in time; posting it to the response_url");
        }
        Ok(claim)
    }

    /// Posts `text` as markdown to the job's `response_url`, unless that was done.
    async fn post_once(
        &self,
        t: &AibotTarget,
        text: &str,
        reason: &'static str,
    ) -> Result<(), SendError> {
        let streams = self.streams();
        if streams.posted(&t.stream_id).await.map_err(cache_error)? {
            return Ok(());
        }
        let m = crate::metrics::get();
        let count = |outcome: &str| {
            m.aibot_response_url
                .with_label_values(&[reason, outcome])
                .inc()
        };
        let Some(url) = &t.response_url else {
            count("no_url");
            return Err(SendError::Permanent(
                "the callback had no response_url".into(),
            ));
        };
        if !origin(url).is_some_and(|o| self.origins.contains(&o)) {
            count("refused");
            return Err(SendError::Permanent(
                "the response_url is not on WeCom's host or the bot's api_base".into(),
            ));
        }
        let body = json!({"msgtype": "markdown", "markdown": {"content": fit_post(text)}});
        let request = self.api.http.post(url).json(&body);
        match self.api.call("response_url", request, response_table).await {
            Ok(()) => {
                count("ok");
                if let Err(e) = streams.mark_posted(&t.stream_id).await {
                    tracing::warn!(error = %e, "could not record the response_url post; a retry would post again");
                }
                Ok(())
            }
            Err(e) => {
                count("failed");
                Err(e)
            }
        }
    }
}

/// The `response_url`'s error table: errcode 0 is delivered; -1, a 5xx or an answer
/// without errcode is worth retrying; anything else (a used or expired URL) is final.
fn response_table(status: StatusCode, body: &Value) -> Verdict<()> {
    let code = body["errcode"].as_i64();
    match code {
        Some(0) if status.is_success() => Verdict::ok(()),
        Some(-1) => Verdict::retry(
            "busy",
            "response_url busy".into(),
            Some(Duration::from_secs(2)),
        ),
        _ if status.is_server_error() || code.is_none() => Verdict::retry(
            "error",
            format!("response_url answered HTTP {status}"),
            None,
        ),
        _ => Verdict::refused(format!(
            "response_url refused (errcode {})",
            code.unwrap_or_default()
        )),
    }
}

#[async_trait]
impl Messenger for AibotMessenger {
    fn limit(&self, _markdown: bool) -> Limit {
        // The answer goes out whole: the stream (and the response_url for the rest of a long
        // one) is cut here, not by the engine, since each way can be used once.
        Limit::Bytes(usize::MAX / 2)
    }

    async fn send(&self, job: &Job, message: &OutgoingMessage) -> Result<(), SendError> {
        self.conclude(job, &message.text).await
    }

    async fn end_unanswered(&self, job: &Job) -> Result<(), SendError> {
        // WeCom keeps refreshing an open stream for minutes: finish it, empty.
        self.conclude(job, "").await
    }

    fn live(&self, job: &Job) -> Option<&dyn LiveReply> {
        matches!(job.reply, ReplyTarget::WecomAibot(_)).then_some(self as &dyn LiveReply)
    }
}

#[async_trait]
impl LiveReply for AibotMessenger {
    fn interval(&self) -> Duration {
        UPDATE_INTERVAL
    }

    async fn pace(
        &self,
        _stage: Stage,
        _deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SendError> {
        // Progress is a cache write, not a platform call: nothing to pace.
        Ok(())
    }

    async fn show(&self, job: &Job, text: &str, stage: Stage) -> Result<(), SendError> {
        match stage {
            Stage::Open | Stage::Update => self.progress(job, text).await,
            Stage::Final { .. } => self.conclude(job, text).await,
        }
    }
}
