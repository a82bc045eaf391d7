//! Live replies: showing an answer while the model writes it (a DingTalk AI card). The
//! engine runs [`follow`] beside the handler: at the first visible text the reply is opened
//! (within [`OPEN_DEADLINE`], else the answer goes out as messages), then updated with the
//! newest text — at most one update per interval, one in flight, skipped updates simply
//! folded into the next. Once the whole answer is known, [`finish`] sends it as the final
//! update. Whether a job's reply is open is kept in the cache (`card:{job}`), so a job
//! delivered again finishes the reply it opened instead of opening a second.

use crate::engine::JOB_STATE_TTL;
use crate::handler::Answer;
use shared::cache::Cache;
use shared::job::Job;
use shared::platform::{LiveReply, SendError, Stage};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long after the first visible text a reply may take to open before the answer is
/// sent as messages instead.
pub(crate) const OPEN_DEADLINE: Duration = Duration::from_secs(2);
/// Tries of the final update before the job is retried later.
const FINAL_TRIES: u32 = 3;
/// The wait after a refused call when the platform named none.
const BACKOFF: Duration = Duration::from_secs(2);

/// The cache key saying a job's live reply is open.
pub(crate) fn open_key(job: &Job) -> String {
    format!("card:{}", job.id)
}

/// What following an answer came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Followed {
    /// The reply is open: the answer must end there.
    pub(crate) open: bool,
    /// Updates sent (the open not counted).
    pub(crate) updates: u32,
}

/// Resolves once the handler is done (its sender is dropped).
async fn writer_done(mut rx: watch::Receiver<String>) {
    while rx.changed().await.is_ok() {}
}

/// Shows the text published on `rx` in `live` until the handler drops its sender. `open`
/// says an earlier delivery of the job already opened the reply.
pub(crate) async fn follow(
    live: &dyn LiveReply,
    job: &Job,
    cache: &dyn Cache,
    mut rx: watch::Receiver<String>,
    open: bool,
) -> Followed {
    let mut followed = Followed { open, updates: 0 };
    let mut last = String::new();
    if !open {
        // Wait for the first visible text.
        loop {
            if rx.changed().await.is_err() {
                return followed;
            }
            if !rx.borrow_and_update().is_empty() {
                break;
            }
        }
        match open_reply(live, job, &rx).await {
            Ok(text) => {
                followed.open = true;
                last = text;
                if let Err(e) = cache.set(&open_key(job), "open", JOB_STATE_TTL).await {
                    tracing::warn!(error = %e, "could not record an open card; a redelivery would open another");
                }
                let waited = (shared::now_ms() - job.received_at_ms).max(0) as f64 / 1000.0;
                shared::metrics::get()
                    .first_content
                    .with_label_values(&[job.platform.as_str()])
                    .observe(waited);
            }
            Err(e) => {
                tracing::info!(error = %e, "card not opened; the answer goes out as a message");
                writer_done(rx).await;
                return followed;
            }
        }
    }
    let mut last_at = Instant::now();
    let done = writer_done(rx.clone());
    tokio::pin!(done);
    let mut writer_finished = false;
    loop {
        let step = async {
            rx.changed().await.ok()?;
            tokio::time::sleep_until(last_at + live.interval()).await;
            Some(live.pace(Stage::Update, None).await)
        };
        let paced = tokio::select! {
            p = step => p,
            _ = &mut done => {
                writer_finished = true;
                None
            }
        };
        let Some(paced) = paced else { break };
        if let Err(e) = paced {
            tracing::info!(error = %e, "card updates stop; the final answer still follows");
            break;
        }
        let text = rx.borrow_and_update().clone();
        if text == last {
            continue;
        }
        match live.show(job, &text, Stage::Update).await {
            Ok(()) => {
                followed.updates += 1;
                last = text;
            }
            Err(SendError::Retryable { reason, after }) => {
                tracing::debug!(%reason, "card update refused; the next one carries its text");
                tokio::time::sleep(after.unwrap_or(BACKOFF)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "card update failed; the final answer still follows");
                break;
            }
        }
        last_at = Instant::now();
    }
    if !writer_finished {
        done.await;
    }
    followed
}

/// Opens the reply with the newest text, retrying a throttled open until the deadline.
async fn open_reply(
    live: &dyn LiveReply,
    job: &Job,
    rx: &watch::Receiver<String>,
) -> Result<String, SendError> {
    let deadline = Instant::now() + OPEN_DEADLINE;
    loop {
        live.pace(Stage::Open, Some(deadline)).await?;
        let text = rx.borrow().clone();
        match live.show(job, &text, Stage::Open).await {
            Ok(()) => return Ok(text),
            Err(SendError::Retryable { after, .. })
                if Instant::now() + after.unwrap_or(BACKOFF) < deadline =>
            {
                tokio::time::sleep(after.unwrap_or(BACKOFF)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How ending a live reply went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The reply shows the whole answer.
    Done,
    /// The platform refused the reply for good: the answer must go out as messages.
    Refused(String),
    /// Could not end it now; the job is retried and ends it then.
    Later {
        /// Why.
        reason: String,
        /// Wait the platform asked for.
        after: Option<Duration>,
    },
}

/// Sends the whole answer as the reply's final update.
pub(crate) async fn finish(live: &dyn LiveReply, job: &Job, answer: &Answer) -> Finished {
    let stage = Stage::Final {
        failed: answer.failed,
    };
    let mut tries = 0;
    loop {
        tries += 1;
        if let Err(e) = live.pace(stage, None).await {
            return Finished::Refused(e.to_string());
        }
        match live.show(job, &answer.text, stage).await {
            Ok(()) => return Finished::Done,
            Err(SendError::Retryable { reason, after }) if tries >= FINAL_TRIES => {
                return Finished::Later { reason, after };
            }
            Err(SendError::Retryable { after, .. }) => {
                tokio::time::sleep(after.unwrap_or(BACKOFF)).await;
            }
            Err(SendError::Permanent(reason)) => return Finished::Refused(reason),
        }
    }
}
