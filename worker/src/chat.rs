//! The chat job kind: commands (`/reset`, `/help`), conversation memory in the cache, the
//! chatter's quotas, the deployment's model limits (a reserved start, or "busy" at once when
//! that would make the answer too late) and the model call. A model that still fails after
//! the client's own retries gets the chatter a short apology instead of silence.

use crate::handler::{Answer, Handler, Shown};
use crate::notice::NoticeHandler;
use crate::settle::Outcome;
use crate::texts;
use async_trait::async_trait;
use shared::cache::Cache;
use shared::config::{BotPolicy, HistorySettings, LimitSettings, LlmSettings, Settings};
use shared::job::{Content, Job, Platform};
use shared::limits::{ModelLimits, Quotas};
use shared::llm::{ChatMessage, LlmClient, Role, Route};
use shared::platform::looks_like_markdown;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the chat handler needs besides its seams.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// System prompt put first in every model call.
    pub system_prompt: String,
    /// Memory bounds.
    pub history: HistorySettings,
    /// The model and its limits.
    pub llm: LlmSettings,
    /// How late an answer may be; the chatters' quotas.
    pub limits: LimitSettings,
    /// Each bot's policy (access, overrides), by platform and bot id.
    pub policies: HashMap<(Platform, String), BotPolicy>,
}

impl ChatSettings {
    /// The chat part of the configuration.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            system_prompt: s.llm.system_prompt.clone(),
            history: s.history.clone(),
            llm: s.llm.clone(),
            limits: s.limits.clone(),
            policies: s
                .bots
                .iter()
                .map(|b| ((b.platform(), b.id().to_string()), b.policy().clone()))
                .collect(),
        }
    }
}

/// Answers chat messages with the model, remembering the conversation.
pub struct ChatHandler {
    cache: Arc<dyn Cache>,
    llm: Arc<dyn LlmClient>,
    limits: ModelLimits,
    quotas: Quotas,
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
        Self {
            limits: ModelLimits::new(cache.clone(), &settings.llm, &settings.limits),
            quotas: Quotas::new(cache.clone(), &settings.limits),
            cache,
            llm,
            settings,
        }
    }

    /// `/status` for a bot's admins: the deployment's model limits, how long a new call
    /// would wait for them now, the chatters' quotas and the upstreams' health.
    async fn status(&self) -> String {
        let (llm, limits) = (&self.settings.llm, &self.settings.limits);
        let off = |n: u64| match n {
            0 => "off".to_string(),
            n => n.to_string(),
        };
        let wait = match self.limits.current_wait().await {
            Ok(w) => format!("{:.1} s", w.as_secs_f64()),
            Err(e) => format!("unknown ({e})"),
        };
        let upstreams: Vec<String> = self
            .llm
            .health()
            .into_iter()
            .map(|(name, state)| format!("{name} {state}"))
            .collect();
        format!(
            "model {}: requests/min {}, tokens/min {}; a new call would wait {wait} \
             (busy beyond {} s)\nper chatter: messages/min {}, messages/day {}, tokens/day {}\n\
             upstreams: {}",
            llm.model,
            off(u64::from(llm.requests_per_minute)),
            off(u64::from(llm.tokens_per_minute)),
            limits.max_wait_secs,
            off(u64::from(limits.user_messages_per_minute)),
            off(u64::from(limits.user_messages_per_day)),
            off(limits.user_tokens_per_day),
            upstreams.join(", "),
        )
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
        let policy = self
            .settings
            .policies
            .get(&(job.platform, job.bot_id.clone()));
        if let (Some(access), Some((group, conversation))) = (policy, job.place())
            && !access.allows(&job.sender.id, conversation, group)
        {
            tracing::info!(
                group,
                "not allowed by the bot's access policy; no model call"
            );
            shared::metrics::get()
                .limit_rejections
                .with_label_values(&["policy"])
                .inc();
            // An empty answer is not sent (a live reply ends empty).
            let reply = access.deny_reply.as_deref().unwrap_or_default();
            return Ok(Answer::plain(reply, "denied"));
        }
        let admin = policy.is_some_and(|a| a.is_admin(&job.sender.id));
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
                self.cache.delete(&history_key).await.map_err(cache_retry)?;
                return Ok(Answer::plain(texts::RESET_DONE, "command"));
            }
            Some(texts::Command::Help) => return Ok(Answer::plain(texts::HELP, "command")),
            Some(texts::Command::Status) if admin => {
                return Ok(Answer::plain(&self.status().await, "command"));
            }
            Some(texts::Command::Status) => return Ok(Answer::plain(texts::HELP, "command")),
            None => {}
        }
        let history = self.history(&history_key).await;
        let overrides = policy.map_or_else(Default::default, |p| {
            p.overrides(job.place().map(|(_, c)| c))
        });
        let route = Route {
            model: overrides.model,
            upstream: overrides.upstream,
        };
        let mut messages = Vec::with_capacity(history.len() + 2);
        messages.push(ChatMessage::new(
            Role::System,
            overrides
                .system_prompt
                .unwrap_or(&self.settings.system_prompt),
        ));
        messages.extend(history);
        // A quoted message is context the question refers to; it is remembered with it.
        let asked = match quote {
            Some(q) if !q.trim().is_empty() => format!("{}\n\n{text}", quoted(q)),
            _ => text.to_string(),
        };
        messages.push(ChatMessage::new(Role::User, &asked));
        let chatter = format!("{}:{}", job.platform.as_str(), job.sender.id);
        if self.quotas.any() && !admin {
            match self.quotas.take_message(&chatter).await {
                Ok(None) => {}
                Ok(Some(over)) => {
                    tracing::info!(?over, "chatter over quota; not asking the model");
                    shared::metrics::get()
                        .limit_rejections
                        .with_label_values(&["user_quota"])
                        .inc();
                    return Ok(Answer::plain(&self.settings.limits.quota_reply, "quota"));
                }
                Err(e) => return Err(cache_retry(e)),
            }
        }
        let waited = Duration::from_millis(
            u64::try_from(shared::now_ms().saturating_sub(job.received_at_ms)).unwrap_or(0),
        );
        let admission = match self
            .limits
            .admit(self.limits.estimate(&messages), waited)
            .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(busy)) => {
                tracing::warn!(
                    limit = busy.kind(),
                    "the answer would be too late; telling the chatter to try again"
                );
                return Ok(Answer::plain(texts::BUSY, "busy"));
            }
            Err(e) => return Err(cache_retry(e)),
        };
        // Waiting here holds no model connection: the call opens one when it starts.
        tokio::time::sleep(admission.wait).await;
        let started = Instant::now();
        let called = match shown {
            Some(shown) => self.llm.chat_streaming(route, &messages, shown).await,
            None => self.llm.chat(route, &messages).await,
        };
        match called {
            Ok(c) => {
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "model answered");
                let used = c.prompt_tokens + c.completion_tokens;
                let tokens = &shared::metrics::get().llm_tokens;
                for (kind, n) in [
                    ("prompt", c.prompt_tokens),
                    ("completion", c.completion_tokens),
                ] {
                    tokens
                        .with_label_values(&[job.bot_id.as_str(), c.upstream.as_str(), kind])
                        .inc_by(n);
                }
                self.limits.settle(&admission, used).await;
                self.quotas
                    .charge_tokens(&chatter, if used > 0 { used } else { admission.tokens })
                    .await;
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

/// A cache that cannot answer now: the job is tried again later rather than answered
/// without its limits or memory.
fn cache_retry(e: shared::cache::CacheError) -> Outcome {
    Outcome::Retry {
        reason: format!("cache: {e}"),
        after: None,
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
