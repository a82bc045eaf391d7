//! The notice job kind: a notification (`Content::Notice`) is delivered as it was given —
//! text or markdown, with its title. Splitting to the robot's limit is the engine's.

use crate::handler::{Answer, Handler, Shown};
use crate::settle::Outcome;
use async_trait::async_trait;
use shared::job::{Content, Job};

/// Answers a notice with the notice itself; needs no model.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoticeHandler;

impl NoticeHandler {
    /// The answer a notice job is delivered as, or `None` for other content.
    pub fn render(job: &Job) -> Option<Answer> {
        match &job.content {
            Content::Notice {
                text,
                markdown,
                title,
            } => Some(Answer {
                text: text.clone(),
                markdown: *markdown,
                title: title.clone(),
                kind: "notice".into(),
                failed: false,
            }),
            _ => None,
        }
    }
}

#[async_trait]
impl Handler for NoticeHandler {
    async fn answer(&self, job: &Job, _shown: Option<&Shown>) -> Result<Answer, Outcome> {
        // Only the ingress's notification routes publish on this lane, and they publish
        // notices only.
        Self::render(job).ok_or_else(|| Outcome::GiveUp {
            reason: "not a notification".into(),
        })
    }
}
