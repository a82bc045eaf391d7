//! The platforms Parley talks to, and the messenger seam they share: deliver one message
//! part to the conversation a Job came from. The worker splits answers to `limit()` and
//! sends parts in order; a messenger only knows its platform's APIs, and says through
//! [`SendError`] whether a failure is worth retrying.
//!
//! One folder per platform (`dingtalk`, `wecom`, `wecom_aibot`, `robots`) holds its callback checks and
//! parsing, wire types, client and limits. What they share sits here: the messenger trait
//! and markdown helpers, the one "post JSON, classify the platform's error, count it" path
//! (`api`), and the access-token cache (`token`). A new platform is a new folder.

pub mod api;
pub mod dingtalk;
pub mod governor;
pub mod robots;
pub mod token;
pub mod wecom;
pub mod wecom_aibot;

use crate::job::Job;
use crate::split::Limit;
use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// One message part to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The text (markdown source when `markdown` is set).
    pub text: String,
    /// Render as markdown.
    pub markdown: bool,
    /// Title shown in notifications and previews (markdown only).
    pub title: String,
}

impl OutgoingMessage {
    /// A plain-text message.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            markdown: false,
            title: String::new(),
        }
    }
}

/// Why a part was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Throttled, busy or unreachable: try again later.
    #[error("platform send failed, retryable: {reason}")]
    Retryable {
        /// Short cause.
        reason: String,
        /// The wait the platform asked for, if any.
        after: Option<Duration>,
    },
    /// The platform refused for good (bad credentials, unknown recipient…).
    #[error("platform send failed: {0}")]
    Permanent(String),
}

impl From<crate::platform::token::TokenRefused> for SendError {
    fn from(e: crate::platform::token::TokenRefused) -> Self {
        SendError::Retryable {
            reason: e.to_string(),
            after: None,
        }
    }
}

/// The messenger seam.
#[async_trait]
pub trait Messenger: Send + Sync + fmt::Debug {
    /// The longest part the platform accepts.
    fn limit(&self, markdown: bool) -> Limit;
    /// Delivers one part as an answer to `job`.
    async fn send(&self, job: &Job, message: &OutgoingMessage) -> Result<(), SendError>;
    /// The reply that shows `job`'s answer while it is written, if this bot has one.
    fn live(&self, _job: &Job) -> Option<&dyn LiveReply> {
        None
    }
    /// How long a chatter waits for a message answer before being told it is coming.
    fn working_notice_after(&self) -> Option<Duration> {
        None
    }
    /// Ends `job` without an answer (a message the bot's policy leaves unanswered): nothing
    /// is sent, unless the platform waits for an end, as a WeCom AI bot's stream does.
    async fn end_unanswered(&self, _job: &Job) -> Result<(), SendError> {
        Ok(())
    }
}

/// Which call of a live reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The first: the reply appears, showing the first text.
    Open,
    /// The text so far, replacing what is shown.
    Update,
    /// The whole answer, or with `failed` the friendly failure text; nothing follows.
    Final {
        /// The model failed: the reply is marked as failed.
        failed: bool,
    },
}

/// A reply shown while it is written (a DingTalk AI card, a WeCom AI bot's stream). The worker decides when to
/// call; the platform side knows its calls, limits and budget.
#[async_trait]
pub trait LiveReply: Send + Sync {
    /// The least time between two updates of one reply.
    fn interval(&self) -> Duration;
    /// Waits until a call of `stage` may go out (rate limits, budget), at most until
    /// `deadline`. An error means not now: an update is skipped, an open falls back to
    /// messages.
    async fn pace(
        &self,
        stage: Stage,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SendError>;
    /// Shows `text` at `stage`. Repeating a call is harmless: each shows the whole text,
    /// and opening a reply that is already open succeeds.
    async fn show(&self, job: &Job, text: &str, stage: Stage) -> Result<(), SendError>;
}

/// Whether an answer uses markdown worth rendering (headings, lists, emphasis, code,
/// tables, links), so plain answers stay plain text.
pub fn looks_like_markdown(text: &str) -> bool {
    if text.contains("```") || text.contains("**") || text.contains("](") {
        return true;
    }
    text.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("# ")
            || l.starts_with("## ")
            || l.starts_with("### ")
            || l.starts_with("- ")
            || l.starts_with("* ")
            || l.starts_with("> ")
            || (l.starts_with('|') && l.ends_with('|') && l.len() > 2)
            || l.split_once(". ").is_some_and(|(n, _)| {
                !n.is_empty() && n.len() <= 3 && n.chars().all(|c| c.is_ascii_digit())
            })
    })
}

/// A markdown title: the first non-empty line without markup, at most 20 characters.
pub fn markdown_title(text: &str) -> String {
    let line = text
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches(['#', '>', '-', '*', ' '])
                .trim()
        })
        .find(|l| !l.is_empty() && !l.starts_with("```"))
        .unwrap_or("Answer");
    let title: String = line.replace("**", "").chars().take(20).collect();
    if title.is_empty() {
        "Answer".into()
    } else {
        title
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_is_recognised_and_plain_text_is_not() {
        assert!(looks_like_markdown("## Steps\n1. do\n2. done"));
        assert!(looks_like_markdown("Use `x`:\n```\ncode\n```"));
        assert!(looks_like_markdown("This is **bold**."));
        assert!(!looks_like_markdown("Hello! How are you today?"));
        assert!(!looks_like_markdown("It costs 3.5 dollars."));
    }

    #[test]
    fn titles_are_short_and_clean() {
        assert_eq!(markdown_title("## **Deploy** steps\nmore"), "Deploy steps");
        assert_eq!(markdown_title("```\ncode\n```"), "code");
        assert_eq!(markdown_title(&"长".repeat(50)).chars().count(), 20);
    }
}
