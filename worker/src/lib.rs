//! Parley's worker. It owns what happens between a queued [`Job`] and the answer in the
//! chat: conversation order, commands (`/reset`, `/help`), conversation memory in the cache,
//! model pacing (governor) and the model call, splitting the answer to the platform's limit
//! and delivering every part in order, then settling the delivery. Each step that costs
//! money or reaches the chat is recorded in the cache under the job's id (answer, parts
//! sent, answered marker), so a job delivered again — platform retry, broker redelivery,
//! retry after a failed send — never calls the model twice or repeats a part.

mod order;
mod texts;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use shared::cache::Cache;
use shared::config::{HistorySettings, Settings};
use shared::job::{Content, Job, Platform};
use shared::llm::{ChatMessage, LlmClient, Role};
use shared::platform::{
    Messenger, OutgoingMessage, SendError, looks_like_markdown, markdown_title,
};
use shared::queue::{JobQueue, Settlement};
use shared::split::split;
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long per-job state (answer, progress, answered marker) is kept.
const JOB_STATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// What processing one job came to; [`settlement`] turns it into ack / retry / dead-letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer was delivered.
    Answered,
    /// Already answered before (redelivery): nothing sent.
    Duplicate,
    /// Could not deliver now; try again later (at least `after`).
    Retry {
        /// Why.
        reason: String,
        /// Wait asked for by the platform, if any.
        after: Option<Duration>,
    },
    /// Cannot ever succeed.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// Delay before the n-th retry: growing tiers, so a platform outage is not hammered.
pub fn retry_delay(tiers: &[u64], attempt: u32) -> Duration {
    let i = (attempt.saturating_sub(1) as usize).min(tiers.len().saturating_sub(1));
    Duration::from_secs(tiers.get(i).copied().unwrap_or(5))
}

/// The one place that turns an outcome into what happens to the delivery.
pub fn settlement(outcome: &Outcome, attempt: u32, settings: &WorkerSettings) -> Settlement {
    match outcome {
        Outcome::Answered | Outcome::Duplicate => Settlement::Ack,
        Outcome::Retry { reason, .. } if attempt >= settings.max_attempts => {
            Settlement::DeadLetter {
                reason: format!("gave up after {attempt} attempts: {reason}"),
            }
        }
        Outcome::Retry { after, .. } => Settlement::Retry {
            delay: retry_delay(&settings.retry_delays_secs, attempt).max(after.unwrap_or_default()),
        },
        Outcome::GiveUp { reason } => Settlement::DeadLetter {
            reason: reason.clone(),
        },
    }
}

/// Counts a taken job until its task ends, however it ends; holds its intake permit.
struct TakenGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    worker: Worker,
}

impl Drop for TakenGuard {
    fn drop(&mut self) {
        self.worker
            .inner
            .taken
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How many jobs a worker takes from the queue at most (waiting plus working): also the
/// broker prefetch, so the broker never hands a worker more than it will hold.
pub fn intake_limit(max_concurrency: usize) -> usize {
    max_concurrency
        .saturating_mul(4)
        .clamp(1, usize::from(u16::MAX))
}

/// What the worker needs besides its seams.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// System prompt put first in every model call.
    pub system_prompt: String,
    /// Memory bounds.
    pub history: HistorySettings,
    /// Jobs in flight at once.
    pub max_concurrency: usize,
    /// Deliveries before a job is dead-lettered.
    pub max_attempts: u32,
    /// Model calls per minute.
    pub requests_per_minute: u32,
    /// Retry delay tiers, seconds.
    pub retry_delays_secs: Vec<u64>,
}

impl WorkerSettings {
    /// The worker part of the configuration.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            system_prompt: s.llm.system_prompt.clone(),
            history: s.history.clone(),
            max_concurrency: s.llm.max_concurrency,
            max_attempts: s.queue.max_attempts,
            requests_per_minute: s.llm.requests_per_minute,
            retry_delays_secs: s.queue.retry_delays_secs.clone(),
        }
    }
}

/// The worker; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<dyn JobQueue>,
    cache: Arc<dyn Cache>,
    llm: Arc<dyn LlmClient>,
    messengers: HashMap<(Platform, String), Arc<dyn Messenger>>,
    limiter: DefaultDirectRateLimiter,
    settings: WorkerSettings,
    order: order::ConversationOrder,
    /// Jobs taken from the queue and not yet settled or returned.
    taken: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// The answer to one job, before splitting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Answer {
    text: String,
    markdown: bool,
    /// Title for markdown; derived from the text when absent.
    #[serde(default)]
    title: Option<String>,
    /// Label for `parley_jobs_total{outcome}`.
    kind: String,
}

impl Worker {
    /// A worker over the given seams; `messengers` are keyed by (platform, bot id).
    pub fn new(
        settings: WorkerSettings,
        queue: Arc<dyn JobQueue>,
        cache: Arc<dyn Cache>,
        llm: Arc<dyn LlmClient>,
        messengers: HashMap<(Platform, String), Arc<dyn Messenger>>,
    ) -> Self {
        let rpm = NonZeroU32::new(settings.requests_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            inner: Arc::new(Inner {
                queue,
                cache,
                llm,
                messengers,
                limiter: RateLimiter::direct(Quota::per_minute(rpm)),
                settings,
                order: order::ConversationOrder::default(),
                taken: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// Jobs taken from the queue and not yet finished (waiting or being worked on).
    pub fn taken(&self) -> usize {
        self.inner.taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes jobs until `shutdown`, then lets in-flight jobs finish for up to `grace`;
    /// jobs still running after that are abandoned unsettled, so the queue delivers them again.
    pub async fn run_until_stopped(self, shutdown: CancellationToken, grace: Duration) {
        // Two budgets: jobs taken from the queue (including those waiting for an earlier
        // message of their conversation) and jobs being worked on. A conversation with many
        // queued messages then waits without holding work permits other chats need.
        let intake = Arc::new(Semaphore::new(intake_limit(
            self.inner.settings.max_concurrency,
        )));
        let work = Arc::new(Semaphore::new(self.inner.settings.max_concurrency));
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = intake.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let delivery = tokio::select! {
                d = self.inner.queue.next() => d,
                _ = shutdown.cancelled() => break,
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "queue unavailable; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            // Taken here, in delivery order, so jobs of one conversation run in that order.
            let mut turn = self.inner.order.take_turn(&delivery.job.conversation_key);
            let worker = self.clone();
            let work = work.clone();
            let stopping = shutdown.clone();
            worker
                .inner
                .taken
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tasks.spawn(async move {
                let _taken = TakenGuard {
                    _permit: permit,
                    worker: worker.clone(),
                };
                // A job not yet started when shutdown begins goes back to the queue unsettled.
                let _working = tokio::select! {
                    w = async {
                        turn.wait_for_predecessor().await;
                        work.acquire_owned().await.expect("semaphore is never closed")
                    } => w,
                    _ = stopping.cancelled() => return,
                };
                let m = shared::metrics::get();
                m.jobs_in_flight.inc();
                let outcome = worker.process_job(&delivery.job).await;
                m.jobs_in_flight.dec();
                let s = settlement(&outcome, delivery.attempt, &worker.inner.settings);
                worker.log_settlement(&delivery.job, delivery.attempt, &outcome, &s);
                let gave_up = matches!(s, Settlement::DeadLetter { .. });
                let job = delivery.job.clone();
                match delivery.settle(s).await {
                    // Told only once the dead letter is safely parked.
                    Ok(()) if gave_up => worker.tell_gave_up(&job).await,
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not settle a delivery; it will come again")
                    }
                }
                drop(turn);
            });
        }
        tracing::info!(
            in_flight = tasks.len(),
            "worker stopping; finishing in-flight jobs"
        );
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "grace period over; returning unfinished jobs to the queue"
            );
            tasks.shutdown().await;
        }
    }

    /// Best effort: a dead-lettered message still gets a word back instead of silence.
    async fn tell_gave_up(&self, job: &Job) {
        let Some(messenger) = self
            .inner
            .messengers
            .get(&(job.platform, job.bot_id.clone()))
        else {
            return;
        };
        if let Err(e) = messenger
            .send(job, &OutgoingMessage::text(texts::GAVE_UP))
            .await
        {
            tracing::warn!(job = %job.id, error = %e, "could not tell the chatter their message was given up");
        }
    }

    fn log_settlement(&self, job: &Job, attempt: u32, outcome: &Outcome, s: &Settlement) {
        let platform = job.platform.as_str();
        let m = shared::metrics::get();
        match s {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                m.jobs.with_label_values(&[platform, "retried"]).inc();
                tracing::warn!(job = %job.id, attempt, delay_s = delay.as_secs(), ?outcome, "job will be retried");
            }
            Settlement::DeadLetter { reason } => {
                m.jobs.with_label_values(&[platform, "dead_lettered"]).inc();
                tracing::error!(job = %job.id, attempt, %reason, "job dead-lettered");
            }
        }
    }

    /// Processes one job to the end: the step-able core of the worker, public for tests.
    pub async fn process_job(&self, job: &Job) -> Outcome {
        let cache = &self.inner.cache;
        let answered_key = format!("answered:{}", job.id);
        match cache.get(&answered_key).await {
            Ok(Some(_)) => {
                self.count(job, "duplicate");
                return Outcome::Duplicate;
            }
            Ok(None) => {}
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("cache: {e}"),
                    after: None,
                };
            }
        }
        let Some(messenger) = self
            .inner
            .messengers
            .get(&(job.platform, job.bot_id.clone()))
        else {
            return Outcome::GiveUp {
                reason: format!("no bot {} on {}", job.bot_id, job.platform.as_str()),
            };
        };
        let (answer, resumed) = match self.answer(job).await {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        let outcome = self
            .deliver(job, messenger.as_ref(), &answer, resumed)
            .await;
        if outcome == Outcome::Answered {
            let _ = cache.set(&answered_key, "1", JOB_STATE_TTL).await;
            let _ = cache.delete(&format!("answer:{}", job.id)).await;
            let _ = cache.delete(&format!("progress:{}", job.id)).await;
            self.count(job, &answer.kind);
            shared::metrics::get()
                .job_duration
                .with_label_values(&[job.platform.as_str()])
                .observe(((shared::now_ms() - job.received_at_ms).max(0) as f64) / 1000.0);
        } else if let Outcome::GiveUp { reason } = &outcome {
            tracing::error!(job = %job.id, %reason, "answer could not be delivered");
        }
        outcome
    }

    fn count(&self, job: &Job, outcome: &str) {
        shared::metrics::get()
            .jobs
            .with_label_values(&[job.platform.as_str(), outcome])
            .inc();
    }

    /// The answer for `job`: from the cache if an earlier attempt made it, else composed now.
    /// The answer, and whether it comes from an earlier attempt (which may have sent parts).
    async fn answer(&self, job: &Job) -> Result<(Answer, bool), Outcome> {
        let key = format!("answer:{}", job.id);
        if let Ok(Some(saved)) = self.inner.cache.get(&key).await
            && let Ok(a) = serde_json::from_str::<Answer>(&saved)
        {
            return Ok((a, true));
        }
        let answer = self.compose(job).await?;
        let saved = serde_json::to_string(&answer).expect("answers serialize");
        if let Err(e) = self.inner.cache.set(&key, &saved, JOB_STATE_TTL).await {
            tracing::warn!(error = %e, "could not save an answer; a retry would ask the model again");
        }
        Ok((answer, false))
    }

    async fn compose(&self, job: &Job) -> Result<Answer, Outcome> {
        let fixed = |text: &str, kind: &str| Answer {
            text: text.to_string(),
            markdown: false,
            title: None,
            kind: kind.into(),
        };
        let text = match &job.content {
            Content::Unsupported { kind } => {
                tracing::info!(job = %job.id, kind, "unsupported message type");
                return Ok(fixed(texts::UNSUPPORTED, "unsupported"));
            }
            Content::Fixed { text } => return Ok(fixed(text, "fixed")),
            Content::Notice {
                text,
                markdown,
                title,
            } => {
                return Ok(Answer {
                    text: text.clone(),
                    markdown: *markdown,
                    title: title.clone(),
                    kind: "notice".into(),
                });
            }
            Content::Text { text } => text.trim(),
        };
        let history_key = format!("history:{}", job.conversation_key);
        match texts::command(text) {
            Some(texts::Command::Reset) => {
                self.inner
                    .cache
                    .delete(&history_key)
                    .await
                    .map_err(|e| Outcome::Retry {
                        reason: format!("cache: {e}"),
                        after: None,
                    })?;
                return Ok(fixed(texts::RESET_DONE, "command"));
            }
            Some(texts::Command::Help) => return Ok(fixed(texts::HELP, "command")),
            None => {}
        }
        let history = self.history(&history_key).await;
        let mut messages = Vec::with_capacity(history.len() + 2);
        messages.push(ChatMessage::new(
            Role::System,
            &self.inner.settings.system_prompt,
        ));
        messages.extend(history);
        messages.push(ChatMessage::new(Role::User, text));
        self.inner.limiter.until_ready().await;
        let started = Instant::now();
        match self.inner.llm.chat(&messages).await {
            Ok(c) => {
                tracing::debug!(job = %job.id, ms = started.elapsed().as_millis() as u64, "model answered");
                let turn = [
                    serde_json::to_string(&ChatMessage::new(Role::User, text)),
                    serde_json::to_string(&ChatMessage::new(Role::Assistant, &c.text)),
                ]
                .map(|r| r.expect("messages serialize"));
                let h = &self.inner.settings.history;
                if let Err(e) = self
                    .inner
                    .cache
                    .list_push(
                        &history_key,
                        &turn,
                        h.max_turns * 2,
                        Duration::from_secs(h.idle_ttl_secs),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "could not save conversation history");
                }
                Ok(Answer {
                    markdown: looks_like_markdown(&c.text),
                    title: None,
                    text: c.text,
                    kind: "answered".into(),
                })
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "model gave no answer; telling the chatter");
                Ok(fixed(texts::MODEL_FAILED, "model_failed"))
            }
        }
    }

    /// History of a conversation, newest kept within `max_chars`.
    async fn history(&self, key: &str) -> Vec<ChatMessage> {
        let items = match self.inner.cache.list_range(key).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "conversation history unavailable; answering without it");
                return Vec::new();
            }
        };
        let mut budget = self.inner.settings.history.max_chars;
        let mut kept: Vec<ChatMessage> = items
            .iter()
            .rev()
            .filter_map(|s| serde_json::from_str::<ChatMessage>(s).ok())
            .take_while(|m| {
                let n = m.content.chars().count();
                let fits = n <= budget;
                budget = budget.saturating_sub(n);
                fits
            })
            .collect();
        kept.reverse();
        // A history must start with a question, not a dangling answer.
        while kept.first().is_some_and(|m| m.role != Role::User) {
            kept.remove(0);
        }
        kept
    }

    /// Sends the parts not yet sent, in order, recording progress after each.
    /// Only a `resumed` answer can have parts already sent, so only then is progress read.
    async fn deliver(
        &self,
        job: &Job,
        messenger: &dyn Messenger,
        answer: &Answer,
        resumed: bool,
    ) -> Outcome {
        let parts = split(&answer.text, messenger.limit(answer.markdown));
        let progress_key = format!("progress:{}", job.id);
        let done: usize = match resumed {
            true => match self.inner.cache.get(&progress_key).await {
                Ok(v) => v.and_then(|v| v.parse().ok()).unwrap_or(0),
                Err(_) => 0,
            },
            false => 0,
        };
        let title = match (&answer.title, answer.markdown) {
            (Some(t), _) => t.clone(),
            (None, true) => markdown_title(&answer.text),
            (None, false) => String::new(),
        };
        for (i, part) in parts.iter().enumerate().skip(done) {
            let message = OutgoingMessage {
                text: part.clone(),
                markdown: answer.markdown,
                title: title.clone(),
            };
            match messenger.send(job, &message).await {
                Ok(()) => {
                    if parts.len() > 1 {
                        let _ = self
                            .inner
                            .cache
                            .set(&progress_key, &(i + 1).to_string(), JOB_STATE_TTL)
                            .await;
                    }
                }
                Err(SendError::Retryable { reason, after }) => {
                    return Outcome::Retry { reason, after };
                }
                Err(SendError::Permanent(reason)) => return Outcome::GiveUp { reason },
            }
        }
        Outcome::Answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_settle_as_documented() {
        let settings = WorkerSettings {
            system_prompt: String::new(),
            history: HistorySettings::default(),
            max_concurrency: 1,
            max_attempts: 3,
            requests_per_minute: 1,
            retry_delays_secs: vec![5, 30, 120],
        };
        let retry = |after: u64| Outcome::Retry {
            reason: "busy".into(),
            after: Some(Duration::from_secs(after)),
        };
        let delay = |secs| Settlement::Retry {
            delay: Duration::from_secs(secs),
        };
        assert_eq!(
            settlement(&Outcome::Answered, 1, &settings),
            Settlement::Ack
        );
        assert_eq!(
            settlement(&Outcome::Duplicate, 1, &settings),
            Settlement::Ack
        );
        assert_eq!(settlement(&retry(0), 1, &settings), delay(5));
        assert_eq!(settlement(&retry(0), 2, &settings), delay(30));
        assert_eq!(
            settlement(&retry(60), 1, &settings),
            delay(60),
            "the platform's wait wins"
        );
        assert!(matches!(
            settlement(&retry(0), 3, &settings),
            Settlement::DeadLetter { .. }
        ));
        assert!(matches!(
            settlement(&Outcome::GiveUp { reason: "x".into() }, 1, &settings),
            Settlement::DeadLetter { .. }
        ));
        assert_eq!(retry_delay(&[5, 30], 9), Duration::from_secs(30));
    }
}
