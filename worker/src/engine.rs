//! The engine: takes jobs from a lane's queue and sees each through, whatever its kind.
//! It owns the intake and work budgets, conversation order, the per-job records in the
//! cache (`claim:{job}`, `answer:{job}`, `progress:{job}`, `answered:{job}`), splitting an answer to the
//! messenger's limit and delivering its parts in order, settlement, telling the chatter
//! when a job is given up, and shutdown with grace. What the answer is comes from the
//! lane's [`Handler`]; the engine knows nothing of models, history or commands.

use crate::claim::{self, Claim};
use crate::handler::{Answer, Handler};
use crate::live::{self, Finished, Followed};
use crate::order;
use crate::settle::{Outcome, settlement};
use crate::texts;
use shared::cache::Cache;
use shared::config::Settings;
use shared::job::Job;
use shared::job::Platform;
use shared::platform::{Messenger, OutgoingMessage, SendError, markdown_title};
use shared::queue::{JobQueue, Settlement};
use shared::split::split;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long per-job state (answer, progress, answered marker) is kept.
pub(crate) const JOB_STATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// How many jobs a worker takes from the queue at most (waiting plus working): also the
/// broker prefetch, so the broker never hands a worker more than it will hold.
pub fn intake_limit(max_concurrency: usize) -> usize {
    max_concurrency
        .saturating_mul(4)
        .clamp(1, usize::from(u16::MAX))
}

/// What the engine of one lane needs besides its seams.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The lane's name in logs: `chat` or `notify`.
    pub lane: &'static str,
    /// Jobs in flight at once.
    pub max_concurrency: usize,
    /// Deliveries before a job is dead-lettered.
    pub max_attempts: u32,
    /// Retry delay tiers, seconds.
    pub retry_delays_secs: Vec<u64>,
}

impl EngineSettings {
    /// The chat lane's part of the configuration.
    pub fn chat(s: &Settings) -> Self {
        Self {
            lane: "chat",
            max_concurrency: s.llm.max_concurrency,
            max_attempts: s.queue.max_attempts,
            retry_delays_secs: s.queue.retry_delays_secs.clone(),
        }
    }

    /// The notification lane's part of the configuration.
    pub fn notify(s: &Settings) -> Self {
        Self {
            lane: "notify",
            max_concurrency: s.notify.max_concurrency,
            ..Self::chat(s)
        }
    }
}

/// Messengers keyed by (platform, bot or channel id).
pub type Messengers = HashMap<(Platform, String), Arc<dyn Messenger>>;

/// The engine of one lane; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<dyn JobQueue>,
    cache: Arc<dyn Cache>,
    handler: Arc<dyn Handler>,
    messengers: Messengers,
    settings: EngineSettings,
    order: order::ConversationOrder,
    /// Jobs taken from the queue and not yet settled or returned.
    taken: AtomicUsize,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.inner.settings)
            .field("handler", &self.inner.handler)
            .finish_non_exhaustive()
    }
}

/// Counts a taken job until its task ends, however it ends; holds its intake permit.
struct TakenGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    engine: Engine,
}

impl Drop for TakenGuard {
    fn drop(&mut self) {
        self.engine.inner.taken.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The span every line logged for a job carries, the messengers' included. `trace` is
/// the trace id of the ingress request that queued the job, so its ingress and worker
/// lines can be joined; jobs queued by older versions have none.
pub fn job_span(job: &Job, lane: &str, attempt: u32) -> tracing::Span {
    let span = tracing::info_span!(
        "job",
        job = %job.id,
        bot = %job.bot_id,
        platform = job.platform.as_str(),
        lane,
        attempt,
        trace = tracing::field::Empty,
    );
    if let Some(trace) = &job.trace_id {
        span.record("trace", trace.as_str());
    }
    span
}

impl Engine {
    /// An engine over the given seams answering jobs with `handler`.
    pub fn new(
        settings: EngineSettings,
        queue: Arc<dyn JobQueue>,
        cache: Arc<dyn Cache>,
        handler: Arc<dyn Handler>,
        messengers: Messengers,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue,
                cache,
                handler,
                messengers,
                settings,
                order: order::ConversationOrder::default(),
                taken: AtomicUsize::new(0),
            }),
        }
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
            let engine = self.clone();
            let work = work.clone();
            let stopping = shutdown.clone();
            let span = job_span(&delivery.job, self.inner.settings.lane, delivery.attempt);
            engine.inner.taken.fetch_add(1, Ordering::SeqCst);
            let task = async move {
                let _taken = TakenGuard {
                    _permit: permit,
                    engine: engine.clone(),
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
                let outcome = engine.process_job(&delivery.job).await;
                m.jobs_in_flight.dec();
                let s = settlement(&outcome, delivery.attempt, &engine.inner.settings);
                engine.log_settlement(&delivery.job, delivery.attempt, &outcome, &s);
                let gave_up = matches!(s, Settlement::DeadLetter { .. });
                let job = delivery.job.clone();
                match delivery.settle(s).await {
                    // Told only once the dead letter is safely parked.
                    Ok(()) if gave_up => engine.tell_gave_up(&job).await,
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not settle a delivery; it will come again")
                    }
                }
                drop(turn);
            };
            tasks.spawn(task.instrument(span));
        }
        tracing::info!(
            lane = self.inner.settings.lane,
            in_flight = tasks.len(),
            "worker stopping; finishing in-flight jobs"
        );
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                lane = self.inner.settings.lane,
                left = tasks.len(),
                "grace period over; returning unfinished jobs to the queue"
            );
            tasks.shutdown().await;
        }
    }

    fn messenger(&self, job: &Job) -> Option<&Arc<dyn Messenger>> {
        self.inner
            .messengers
            .get(&(job.platform, job.bot_id.clone()))
    }

    /// Best effort: a dead-lettered message still gets a word back instead of silence.
    async fn tell_gave_up(&self, job: &Job) {
        let Some(messenger) = self.messenger(job) else {
            return;
        };
        if let Err(e) = messenger
            .send(job, &OutgoingMessage::text(texts::GAVE_UP))
            .await
        {
            tracing::warn!(error = %e, "could not tell the chatter their message was given up");
        }
    }

    fn log_settlement(&self, job: &Job, attempt: u32, outcome: &Outcome, s: &Settlement) {
        let platform = job.platform.as_str();
        let m = shared::metrics::get();
        match s {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                m.jobs.with_label_values(&[platform, "retried"]).inc();
                tracing::warn!(
                    attempt,
                    delay_s = delay.as_secs(),
                    ?outcome,
                    "job will be retried"
                );
            }
            Settlement::DeadLetter { reason } => {
                m.jobs.with_label_values(&[platform, "dead_lettered"]).inc();
                tracing::error!(attempt, %reason, "job dead-lettered");
            }
        }
    }

    /// Processes one job to the end: the step-able core of the engine, public for tests.
    pub async fn process_job(&self, job: &Job) -> Outcome {
        let cache = &self.inner.cache;
        let answered_key = format!("answered:{}", job.id);
        match cache.get(&answered_key).await {
            Ok(Some(_)) => {
                count(job, "duplicate");
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
        // Held until this function returns, past the answered marker.
        let _claim = match claim::claim(cache, &job.id, &answered_key).await {
            Ok(Claim::Held(held)) => held,
            Ok(Claim::Answered) => {
                count(job, "duplicate");
                return Outcome::Duplicate;
            }
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("cache: {e}"),
                    after: None,
                };
            }
        };
        let Some(messenger) = self.messenger(job) else {
            return Outcome::GiveUp {
                reason: format!("no bot {} on {}", job.bot_id, job.platform.as_str()),
            };
        };
        let (answer, resumed, followed) = match self.answer(job, messenger.as_ref()).await {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        let outcome = match messenger.live(job).filter(|_| followed.open) {
            Some(reply) => match live::finish(reply, job, &answer).await {
                Finished::Done => {
                    shared::metrics::get()
                        .card_updates
                        .with_label_values(&[job.platform.as_str()])
                        .observe(f64::from(followed.updates + 1));
                    Outcome::Answered
                }
                Finished::Later { reason, after } => Outcome::Retry { reason, after },
                Finished::Refused(reason) => {
                    tracing::warn!(%reason, "card refused its final update; answering with a message");
                    self.deliver(job, messenger.as_ref(), &answer, resumed)
                        .await
                }
            },
            None => {
                self.deliver(job, messenger.as_ref(), &answer, resumed)
                    .await
            }
        };
        if outcome == Outcome::Answered {
            let _ = cache.set(&answered_key, "1", JOB_STATE_TTL).await;
            let _ = cache.delete(&format!("answer:{}", job.id)).await;
            let _ = cache.delete(&format!("progress:{}", job.id)).await;
            let _ = cache.delete(&live::open_key(job)).await;
            count(job, &answer.kind);
            shared::metrics::get()
                .job_duration
                .with_label_values(&[job.platform.as_str()])
                .observe(((shared::now_ms() - job.received_at_ms).max(0) as f64) / 1000.0);
        } else if let Outcome::GiveUp { reason } = &outcome {
            tracing::error!(%reason, "answer could not be delivered");
        }
        outcome
    }

    /// The answer, whether it comes from an earlier attempt (which may have sent parts),
    /// and how its live reply went: from the cache if an earlier attempt made it, else from
    /// the handler now — shown live while it is written when the bot has a live reply.
    async fn answer(
        &self,
        job: &Job,
        messenger: &dyn Messenger,
    ) -> Result<(Answer, bool, Followed), Outcome> {
        let cache = self.inner.cache.as_ref();
        let reply = messenger.live(job);
        let open = match reply {
            Some(_) => matches!(cache.get(&live::open_key(job)).await, Ok(Some(_))),
            None => false,
        };
        let key = format!("answer:{}", job.id);
        if let Ok(Some(saved)) = cache.get(&key).await
            && let Ok(a) = serde_json::from_str::<Answer>(&saved)
        {
            return Ok((a, true, Followed { open, updates: 0 }));
        }
        let handler = self.inner.handler.as_ref();
        let (answer, followed) = match reply {
            Some(reply) => {
                let (shown, seen) = tokio::sync::watch::channel(String::new());
                let write = async move {
                    let answer = handler.answer(job, Some(&shown)).await;
                    drop(shown);
                    answer
                };
                let (answer, followed) =
                    tokio::join!(write, live::follow(reply, job, cache, seen, open));
                (answer?, followed)
            }
            None => {
                let answer = self
                    .with_working_notice(job, messenger, handler.answer(job, None))
                    .await?;
                (answer, Followed::default())
            }
        };
        let saved = serde_json::to_string(&answer).expect("answers serialize");
        if let Err(e) = cache.set(&key, &saved, JOB_STATE_TTL).await {
            tracing::warn!(error = %e, "could not save an answer; a retry would ask the model again");
        }
        Ok((answer, false, followed))
    }

    /// Runs `answering`; if it takes longer than the bot's working-notice time, tells the
    /// chatter once (across deliveries of the job) that the answer is coming.
    async fn with_working_notice(
        &self,
        job: &Job,
        messenger: &dyn Messenger,
        answering: impl std::future::Future<Output = Result<Answer, Outcome>>,
    ) -> Result<Answer, Outcome> {
        let Some(after) = messenger.working_notice_after() else {
            return answering.await;
        };
        tokio::pin!(answering);
        tokio::select! {
            answer = &mut answering => return answer,
            _ = tokio::time::sleep(after) => {}
        }
        let key = format!("working:{}", job.id);
        if matches!(
            self.inner.cache.set_nx(&key, "1", JOB_STATE_TTL).await,
            Ok(true)
        ) && let Err(e) = messenger
            .send(job, &OutgoingMessage::text(texts::WORKING))
            .await
        {
            tracing::warn!(error = %e, "could not tell the chatter the answer is coming");
        }
        answering.await
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
        let key = format!("progress:{}", job.id);
        let done: usize = match resumed {
            true => match self.inner.cache.get(&key).await {
                Ok(v) => v.and_then(|v| v.parse().ok()).unwrap_or(0),
                Err(_) => 0,
            },
            false => 0,
        };
        let progress = Progress {
            cache: self.inner.cache.as_ref(),
            key,
            done,
        };
        match send_parts(job, messenger, answer, Some(progress)).await {
            Ok(_) => Outcome::Answered,
            Err(SendError::Retryable { reason, after }) => Outcome::Retry { reason, after },
            Err(SendError::Permanent(reason)) => Outcome::GiveUp { reason },
        }
    }
}

fn count(job: &Job, outcome: &str) {
    shared::metrics::get()
        .jobs
        .with_label_values(&[job.platform.as_str(), outcome])
        .inc();
}

/// Where a job's delivery stands: parts already sent, and the cache key recording it.
struct Progress<'a> {
    cache: &'a dyn Cache,
    key: String,
    done: usize,
}

/// Delivers `answer` to `job`'s conversation now, split to the messenger's limit, every
/// part in order, without the engine's records: for one-off sends such as `parley notify`.
/// Returns the number of parts sent.
pub async fn deliver_answer(
    job: &Job,
    messenger: &dyn Messenger,
    answer: &Answer,
) -> Result<usize, SendError> {
    send_parts(job, messenger, answer, None).await
}

/// The one split-and-send loop: skips the parts `progress` says were sent and records
/// each part sent after them.
async fn send_parts(
    job: &Job,
    messenger: &dyn Messenger,
    answer: &Answer,
    progress: Option<Progress<'_>>,
) -> Result<usize, SendError> {
    // An empty answer says nothing on purpose (a message the bot's policy does not answer).
    if answer.text.is_empty() {
        messenger.end_unanswered(job).await?;
        return Ok(0);
    }
    let parts = split(&answer.text, messenger.limit(answer.markdown));
    let title = match (&answer.title, answer.markdown) {
        (Some(t), _) => t.clone(),
        (None, true) => markdown_title(&answer.text),
        (None, false) => String::new(),
    };
    let done = progress.as_ref().map_or(0, |p| p.done);
    for (i, part) in parts.iter().enumerate().skip(done) {
        let message = OutgoingMessage {
            text: part.clone(),
            markdown: answer.markdown,
            title: title.clone(),
        };
        messenger.send(job, &message).await?;
        if let Some(p) = &progress
            && parts.len() > 1
        {
            let _ = p
                .cache
                .set(&p.key, &(i + 1).to_string(), JOB_STATE_TTL)
                .await;
        }
    }
    Ok(parts.len())
}
