//! The model contract held for the whole deployment, and what each chatter may use of it.
//!
//! [`ModelLimits`]: `[llm] requests_per_minute` and `tokens_per_minute` are one reservation in
//! the cache ([`Cache::reserve`]: with Redis one Lua step shared by every worker, embedded the
//! process's own). A call reserves its start time before it opens any connection; the
//! reservations are spaced one interval apart, so the cluster's calls arrive at the
//! contract's pace however many workers ask, and a burst of one second's worth at most. A
//! call whose start would come later than the job may still wait (`[limits] max_wait_secs`
//! from the message's arrival) reserves nothing and is answered "busy" at once. Tokens are
//! estimated from the prompt before the call and corrected by the response's `usage`.
//!
//! [`Quotas`]: `[limits] user_messages_per_minute` (a sliding minute),
//! `user_messages_per_day` and `user_tokens_per_day` (calendar days in Asia/Shanghai) per
//! chatter, counted in the cache, so cluster-wide with Redis.

use crate::cache::{Cache, CacheError, Rate, Reservation};
use crate::config::{LimitSettings, LlmSettings};
use crate::llm::ChatMessage;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A minute, the period of every per-minute limit.
const MINUTE: Duration = Duration::from_secs(60);
/// China Standard Time's offset from UTC: quota days turn over at midnight there.
const SHANGHAI_OFFSET_SECS: i64 = 8 * 3600;
/// Day counters outlive their day by a day, for a clock that is a little off.
const DAY_TTL: Duration = Duration::from_secs(2 * 86_400);
/// Completion tokens assumed for a call without `max_tokens`, until `usage` corrects it.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Why a call did not get a start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The request rate would make the answer too late.
    Requests,
    /// The token rate would make the answer too late.
    Tokens,
    /// The message already waited in the backlog for as long as an answer may take.
    Backlog,
}

impl Busy {
    /// Label for `parley_limit_rejections_total{kind}`.
    pub fn kind(self) -> &'static str {
        match self {
            Busy::Requests => "rpm",
            Busy::Tokens => "tpm",
            Busy::Backlog => "backlog",
        }
    }
}

/// A reserved model call: its start is [`Self::wait`] away; after the call, [`ModelLimits::settle`]
/// corrects the tokens it reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// How long until the call may start.
    pub wait: Duration,
    /// Tokens reserved for it (0 when tokens are not limited).
    pub tokens: u64,
}

/// The deployment's requests and tokens per minute; see the module comment.
pub struct ModelLimits {
    cache: Arc<dyn Cache>,
    requests_per_minute: u32,
    tokens_per_minute: u32,
    completion_estimate: u64,
    max_wait: Duration,
}

impl fmt::Debug for ModelLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelLimits")
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// The rate of `per_minute` units, with a second's worth at once (at least one).
fn per_minute(key: &str, per_minute: u32, cost: i64) -> Rate {
    Rate {
        key: key.into(),
        interval: MINUTE / per_minute.max(1),
        burst: per_minute.div_ceil(60).max(1),
        cost,
    }
}

impl ModelLimits {
    /// The limits of `[llm]` and `[limits]`, kept in `cache`.
    pub fn new(cache: Arc<dyn Cache>, llm: &LlmSettings, limits: &LimitSettings) -> Self {
        Self {
            cache,
            requests_per_minute: llm.requests_per_minute,
            tokens_per_minute: llm.tokens_per_minute,
            completion_estimate: llm
                .max_tokens
                .map_or(DEFAULT_COMPLETION_ESTIMATE, u64::from),
            max_wait: Duration::from_secs(limits.max_wait_secs),
        }
    }

    /// The limits that are on, each taking `requests` or `tokens`, with the kind of each.
    fn rates(&self, requests: i64, tokens: i64) -> (Vec<Rate>, Vec<Busy>) {
        [
            (
                self.requests_per_minute,
                "llm:rpm",
                requests,
                Busy::Requests,
            ),
            (self.tokens_per_minute, "llm:tpm", tokens, Busy::Tokens),
        ]
        .into_iter()
        .filter(|(limit, ..)| *limit > 0)
        .map(|(limit, key, cost, kind)| (per_minute(key, limit, cost), kind))
        .unzip()
    }

    /// Tokens a call with `messages` is expected to use: the prompt (a token per four ASCII
    /// characters, one per other character — Chinese text is about one a character — and
    /// a few per message) plus the completion's estimate.
    pub fn estimate(&self, messages: &[ChatMessage]) -> u64 {
        let prompt: u64 = messages
            .iter()
            .map(|m| {
                let (ascii, other) = m.content.chars().fold((0u64, 0u64), |(a, o), c| {
                    if c.is_ascii() { (a + 1, o) } else { (a, o + 1) }
                });
                4 + ascii.div_ceil(4) + other
            })
            .sum();
        prompt + self.completion_estimate
    }

    /// Reserves a start for a call expected to use `tokens`, for a message that arrived
    /// `waited` ago: `Ok(Err(busy))` when the answer would come later than `max_wait_secs`
    /// after the message (then nothing is reserved).
    pub async fn admit(
        &self,
        tokens: u64,
        waited: Duration,
    ) -> Result<Result<Admission, Busy>, CacheError> {
        let m = crate::metrics::get();
        let Some(budget) = self.max_wait.checked_sub(waited) else {
            m.limit_rejections.with_label_values(&["backlog"]).inc();
            return Ok(Err(Busy::Backlog));
        };
        let tokens = if self.tokens_per_minute > 0 {
            tokens
        } else {
            0
        };
        let (rates, kinds) = self.rates(1, i64::try_from(tokens).unwrap_or(i64::MAX));
        if rates.is_empty() {
            return Ok(Ok(Admission {
                wait: Duration::ZERO,
                tokens,
            }));
        }
        match self.cache.reserve(&rates, Some(budget)).await? {
            Reservation::Wait { wait, binding } => {
                if !wait.is_zero() {
                    m.limit_wait
                        .with_label_values(&[kinds[binding].kind()])
                        .observe(wait.as_secs_f64());
                }
                Ok(Ok(Admission { wait, tokens }))
            }
            Reservation::TooLate { binding } => {
                let busy = kinds[binding];
                m.limit_rejections.with_label_values(&[busy.kind()]).inc();
                Ok(Err(busy))
            }
        }
    }

    /// How long a call asked for now would wait for the limits (a reservation of nothing).
    pub async fn current_wait(&self) -> Result<Duration, CacheError> {
        let (rates, _) = self.rates(0, 0);
        if rates.is_empty() {
            return Ok(Duration::ZERO);
        }
        Ok(match self.cache.reserve(&rates, None).await? {
            Reservation::Wait { wait, .. } => wait,
            Reservation::TooLate { .. } => Duration::ZERO,
        })
    }

    /// After the call: gives back or takes the difference between the tokens reserved and
    /// `used` (the response's `usage`; 0 when the server did not report it, which keeps the
    /// estimate).
    pub async fn settle(&self, admission: &Admission, used: u64) {
        if self.tokens_per_minute == 0 || used == 0 || used == admission.tokens {
            return;
        }
        let delta = i64::try_from(used)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(admission.tokens).unwrap_or(i64::MAX));
        let rate = per_minute("llm:tpm", self.tokens_per_minute, delta);
        if let Err(e) = self.cache.reserve(&[rate], None).await {
            tracing::warn!(error = %e, delta, "could not correct the token reservation");
        }
    }
}

/// What a chatter has used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverQuota {
    /// `user_messages_per_minute`.
    MessagesPerMinute,
    /// `user_messages_per_day`.
    MessagesPerDay,
    /// `user_tokens_per_day`.
    TokensPerDay,
}

/// Per-chatter quotas; see the module comment.
pub struct Quotas {
    cache: Arc<dyn Cache>,
    per_minute: u32,
    per_day: u32,
    tokens_per_day: u64,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("per_minute", &self.per_minute)
            .field("per_day", &self.per_day)
            .field("tokens_per_day", &self.tokens_per_day)
            .finish_non_exhaustive()
    }
}

/// Today's number in Asia/Shanghai (days since 1970-01-01 there) at `now_ms`.
pub fn shanghai_day(now_ms: i64) -> i64 {
    (now_ms.div_euclid(1000) + SHANGHAI_OFFSET_SECS).div_euclid(86_400)
}

impl Quotas {
    /// The quotas of `[limits]`, counted in `cache`.
    pub fn new(cache: Arc<dyn Cache>, limits: &LimitSettings) -> Self {
        Self {
            cache,
            per_minute: limits.user_messages_per_minute,
            per_day: limits.user_messages_per_day,
            tokens_per_day: limits.user_tokens_per_day,
        }
    }

    /// Whether any quota is set.
    pub fn any(&self) -> bool {
        self.per_minute > 0 || self.per_day > 0 || self.tokens_per_day > 0
    }

    /// Counts one message of `chatter` (a platform-qualified user id) unless a quota is used
    /// up, which is returned instead; a refused message is not counted.
    pub async fn take_message(&self, chatter: &str) -> Result<Option<OverQuota>, CacheError> {
        let day = shanghai_day(crate::now_ms());
        if self.tokens_per_day > 0 {
            let used = self
                .cache
                .get(&format!("quota:{chatter}:tokens:{day}"))
                .await?
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if used >= self.tokens_per_day {
                return Ok(Some(OverQuota::TokensPerDay));
            }
        }
        let day_key = format!("quota:{chatter}:messages:{day}");
        if self.per_day > 0 {
            let n = self.cache.add(&day_key, 1, DAY_TTL).await?;
            if n > i64::from(self.per_day) {
                self.cache.add(&day_key, -1, DAY_TTL).await?;
                return Ok(Some(OverQuota::MessagesPerDay));
            }
        }
        if self.per_minute > 0 {
            let key = format!("quota:{chatter}:minute");
            if self
                .cache
                .take_slot(&key, self.per_minute, MINUTE)
                .await?
                .is_some()
            {
                if self.per_day > 0 {
                    self.cache.add(&day_key, -1, DAY_TTL).await?;
                }
                return Ok(Some(OverQuota::MessagesPerMinute));
            }
        }
        Ok(None)
    }

    /// Counts `tokens` the model used for `chatter` today.
    pub async fn charge_tokens(&self, chatter: &str, tokens: u64) {
        if self.tokens_per_day == 0 || tokens == 0 {
            return;
        }
        let day = shanghai_day(crate::now_ms());
        let key = format!("quota:{chatter}:tokens:{day}");
        let by = i64::try_from(tokens).unwrap_or(i64::MAX);
        if let Err(e) = self.cache.add(&key, by, DAY_TTL).await {
            tracing::warn!(error = %e, "could not count the chatter's tokens");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;
    use crate::llm::Role;

    fn limits(rpm: u32, tpm: u32, max_wait_secs: u64) -> ModelLimits {
        ModelLimits {
            cache: Arc::new(MemoryCache::new()),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            completion_estimate: 100,
            max_wait: Duration::from_secs(max_wait_secs),
        }
    }

    #[test]
    fn days_turn_over_at_midnight_in_shanghai() {
        // 2026-12-03 15:59:59 UTC is 23:59:59 in Shanghai; a second later is the next day.
        let before = 1_796_313_599_000;
        assert_eq!(shanghai_day(before) + 1, shanghai_day(before + 1000));
        assert_eq!(shanghai_day(before - 8 * 3_600_000), shanghai_day(before));
    }

    #[test]
    fn estimates_count_chinese_characters_as_tokens() {
        let l = limits(0, 1000, 120);
        let ascii = [ChatMessage::new(Role::User, "abcdefgh")];
        let chinese = [ChatMessage::new(Role::User, "报销流程是什么")];
        assert_eq!(l.estimate(&ascii), 4 + 2 + 100);
        assert_eq!(l.estimate(&chinese), 4 + 7 + 100);
    }

    #[tokio::test]
    async fn a_second_of_calls_goes_at_once_then_one_per_interval() {
        let l = limits(600, 0, 120);
        for _ in 0..10 {
            let a = l.admit(50, Duration::ZERO).await.unwrap().unwrap();
            assert_eq!(a.wait, Duration::ZERO);
            assert_eq!(a.tokens, 0, "tokens are not limited");
        }
        let next = l.admit(50, Duration::ZERO).await.unwrap().unwrap();
        assert!(next.wait > Duration::from_millis(80), "{next:?}");
    }

    #[tokio::test]
    async fn a_start_later_than_max_wait_is_busy_and_reserves_nothing() {
        // 60 a minute, one at once: the third call would start 2 s out.
        let l = limits(60, 0, 1);
        l.admit(1, Duration::ZERO).await.unwrap().unwrap();
        let second = l.admit(1, Duration::ZERO).await.unwrap().unwrap();
        assert!(second.wait <= Duration::from_secs(1));
        assert_eq!(
            l.admit(1, Duration::ZERO).await.unwrap(),
            Err(Busy::Requests)
        );
        assert_eq!(
            l.admit(1, Duration::from_secs(2)).await.unwrap(),
            Err(Busy::Backlog),
            "a message that already waited longer than max_wait"
        );
    }

    #[tokio::test]
    async fn tokens_bind_and_are_corrected_by_usage() {
        // 6,000 tokens a minute = 100 a second at once.
        let l = limits(0, 6000, 5);
        let a = l.admit(300, Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((a.wait, a.tokens), (Duration::ZERO, 300));
        // The call used only 100: 200 given back, so the next 300 start 1 s out, not 3.
        l.settle(&a, 100).await;
        let b = l.admit(300, Duration::ZERO).await.unwrap().unwrap();
        assert!(
            b.wait <= Duration::from_millis(1000) && b.wait > Duration::from_millis(900),
            "{b:?}"
        );
        let c = l.admit(300, Duration::ZERO).await.unwrap().unwrap();
        assert!(c.wait > Duration::from_millis(3900), "{c:?}");
        assert_eq!(
            l.admit(300, Duration::ZERO).await.unwrap(),
            Err(Busy::Tokens),
            "would start 7 s out, 5 allowed"
        );
    }

    #[tokio::test]
    async fn quotas_refuse_without_counting_the_refused() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let q = Quotas::new(
            cache.clone(),
            &LimitSettings {
                user_messages_per_minute: 2,
                user_messages_per_day: 3,
                user_tokens_per_day: 1000,
                ..LimitSettings::default()
            },
        );
        assert!(q.any());
        assert_eq!(q.take_message("dingtalk:u1").await.unwrap(), None);
        assert_eq!(q.take_message("dingtalk:u1").await.unwrap(), None);
        assert_eq!(
            q.take_message("dingtalk:u1").await.unwrap(),
            Some(OverQuota::MessagesPerMinute)
        );
        assert_eq!(
            q.take_message("dingtalk:u2").await.unwrap(),
            None,
            "per chatter"
        );
        let day = shanghai_day(crate::now_ms());
        let counted = cache
            .get(&format!("quota:dingtalk:u1:messages:{day}"))
            .await
            .unwrap();
        assert_eq!(
            counted.as_deref(),
            Some("2"),
            "the refused one is not counted"
        );
        q.charge_tokens("dingtalk:u2", 1000).await;
        assert_eq!(
            q.take_message("dingtalk:u2").await.unwrap(),
            Some(OverQuota::TokensPerDay)
        );
    }
}
