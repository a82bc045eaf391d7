//! The chat job kind: commands (`/reset`, `/help`), conversation memory in the cache, model
//! pacing (governor) and the model call. A model that still fails after the client's own
//! retries gets the chatter a short apology instead of silence.

use crate::handler::{Answer, Handler, Shown};
use crate::notice::NoticeHandler;
use crate::settle::Outcome;
use crate::texts;
use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use shared::cache::Cache;
use shared::config::{HistorySettings, Settings};
use shared::job::{Content, Job};
use shared::llm::{ChatMessage, LlmClient, Role};
use shared::platform::looks_like_markdown;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the chat handler needs besides its seams.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// System prompt put first in every model call.
    pub system_prompt: String,
    /// Memory bounds.
    pub history: HistorySettings,
    /// Model calls per minute.
    pub requests_per_minute: u32,
}

impl ChatSettings {
    /// The chat part of the configuration.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            system_prompt: s.llm.system_prompt.clone(),
            history: s.history.clone(),
            requests_per_minute: s.llm.requests_per_minute,
        }
    }
}

/// Answers chat messages with the model, remembering the conversation.
pub struct ChatHandler {
    cache: Arc<dyn Cache>,
    llm: Arc<dyn LlmClient>,
    limiter: DefaultDirectRateLimiter,
    settings: ChatSettings,
}

impl fmt::Debug for ChatHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatHandler")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ChatHandler {
    /// A chat handler keeping history in `cache` and asking `llm`.
    pub fn new(settings: ChatSettings, cache: Arc<dyn Cache>, llm: Arc<dyn LlmClient>) -> Self {
        let rpm = NonZeroU32::new(settings.requests_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            cache,
            llm,
            limiter: RateLimiter::direct(Quota::per_minute(rpm)),
            settings,
        }
    }

    /// History of a conversation, newest kept within `max_chars`.
    async fn history(&self, key: &str) -> Vec<ChatMessage> {
        let items = match self.cache.list_range(key).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "conversation history unavailable; answering without it");
                return Vec::new();
            }
        };
        let mut budget = self.settings.history.max_chars;
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
}

#[async_trait]
impl Handler for ChatHandler {
    async fn answer(&self, job: &Job, shown: Option<&Shown>) -> Result<Answer, Outcome> {
        let (text, quote) = match &job.content {
            Content::Unsupported { kind } => {
                tracing::info!(kind, "unsupported message type");
                return Ok(Answer::plain(texts::UNSUPPORTED, "unsupported"));
            }
            Content::Fixed { text } => return Ok(Answer::plain(text, "fixed")),
            // The chat lane never carries notices; answered as the notice lane would, as
            // the one worker did before the lanes had handlers of their own.
            Content::Notice { .. } => return NoticeHandler.answer(job, None).await,
            Content::Text { text, quote } => (text.trim(), quote.as_deref()),
        };
        let history_key = format!("history:{}", job.conversation_key);
        match texts::command(text) {
            Some(texts::Command::Reset) => {
                self.cache
                    .delete(&history_key)
                    .await
                    .map_err(|e| Outcome::Retry {
                        reason: format!("cache: {e}"),
                        after: None,
                    })?;
                return Ok(Answer::plain(texts::RESET_DONE, "command"));
            }
            Some(texts::Command::Help) => return Ok(Answer::plain(texts::HELP, "command")),
            None => {}
        }
        let history = self.history(&history_key).await;
        let mut messages = Vec::with_capacity(history.len() + 2);
        messages.push(ChatMessage::new(Role::System, &self.settings.system_prompt));
        messages.extend(history);
        // A quoted message is context the question refers to; it is remembered with it.
        let asked = match quote {
            Some(q) if !q.trim().is_empty() => format!("{}\n\n{text}", quoted(q)),
            _ => text.to_string(),
        };
        messages.push(ChatMessage::new(Role::User, &asked));
        self.limiter.until_ready().await;
        let started = Instant::now();
        let called = match shown {
            Some(shown) => self.llm.chat_streaming(&messages, shown).await,
            None => self.llm.chat(&messages).await,
        };
        match called {
            Ok(c) => {
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "model answered");
                let turn = [
                    serde_json::to_string(&ChatMessage::new(Role::User, &asked)),
                    serde_json::to_string(&ChatMessage::new(Role::Assistant, &c.text)),
                ]
                .map(|r| r.expect("messages serialize"));
                let h = &self.settings.history;
                if let Err(e) = self
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
                    failed: false,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "model gave no answer; telling the chatter");
                Ok(Answer {
                    failed: true,
                    ..Answer::plain(texts::MODEL_FAILED, "model_failed")
                })
            }
        }
    }
}

/// `q` as a markdown quote block, the way chat clients show a quoted message.
fn quoted(q: &str) -> String {
    q.trim()
        .lines()
        .map(|l| format!("> {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
