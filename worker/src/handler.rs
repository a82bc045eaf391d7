//! Job kinds: a [`Handler`] turns a job into the [`Answer`] the engine delivers. The engine
//! owns everything around it (order, budgets, the answer cache, delivery, settlement), so a
//! new kind of job — a chat, a notice, later a streamed reply — is one handler.

use crate::settle::Outcome;
use async_trait::async_trait;
use shared::job::Job;
use std::fmt;
use tokio::sync::watch;

/// Where a handler shows the visible text of an answer while it is written.
pub type Shown = watch::Sender<String>;

/// The answer to one job, before splitting. Cached as JSON under `answer:{job}` so a
/// redelivered job is answered the same way without composing it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// The whole text; the engine splits it to the messenger's limit.
    pub text: String,
    /// Send as markdown.
    pub markdown: bool,
    /// Title for markdown; derived from the text when absent.
    #[serde(default)]
    pub title: Option<String>,
    /// Label for `parley_jobs_total{outcome}`.
    pub kind: String,
    /// The text is the apology for an answer that could not be made (a live reply shows
    /// it as failed).
    #[serde(default)]
    pub failed: bool,
}

impl Answer {
    /// A plain-text answer counted as `kind`.
    pub fn plain(text: &str, kind: &str) -> Self {
        Self {
            text: text.to_string(),
            markdown: false,
            title: None,
            kind: kind.into(),
            failed: false,
        }
    }
}

/// One kind of job: what the answer to a job is.
#[async_trait]
pub trait Handler: Send + Sync + fmt::Debug {
    /// The answer to `job`, or the outcome that ends the job without one. With `shown`,
    /// the answer's text so far is published there as it is written.
    async fn answer(&self, job: &Job, shown: Option<&Shown>) -> Result<Answer, Outcome>;
}
