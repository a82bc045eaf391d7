//! One governor per app for every call to its platform's API, shared by all worker
//! processes through the cache. DingTalk counts calls per app and endpoint (20 QPS on the
//! standard edition, `403 …QpsLimitForAppkeyAndApi` beyond) and per org per month; WeCom
//! per enterprise per minute, and drops silently what one app sends one member beyond 30 a
//! minute. How the limits are counted is not documented, so the governor never lets more
//! than N calls start in any sliding window slightly longer than the platform's — safe
//! whether the platform counts fixed buckets or a sliding window (a token bucket with a
//! burst of N is not: it allows 2N in one window).
//!
//! Calls come in two priorities. [`Priority::First`] (card creates, final updates, plain
//! sends) may use every slot; [`Priority::Later`] (intermediate card updates) only three in
//! four, so the first kind never waits behind a crowd of updates, and a card's updates
//! simply come less often when many cards share the endpoint. Inside a process, waiters of
//! one endpoint and priority are served in arrival order. If the cache is down the governor
//! paces this process alone rather than stop answering.

use crate::cache::{Cache, MemoryCache};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// DingTalk's window as the governor holds it: one second plus a margin for the time
/// between taking a slot and the call reaching the platform, which varies from call to call.
pub const SECOND: Duration = Duration::from_millis(1200);
/// WeCom's window as the governor holds it: a minute plus the same kind of margin.
pub const MINUTE: Duration = Duration::from_secs(61);

/// How soon a call is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Creates, final updates and plain sends: every slot.
    First,
    /// Intermediate updates: three slots in four.
    Later,
}

/// The wait for a slot outlasted the caller's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no API slot before the deadline")]
pub struct NoSlot;

/// Paces the calls of one app.
pub struct Governor {
    cache: Arc<dyn Cache>,
    /// Stands in for the shared cache while it is unavailable.
    local: MemoryCache,
    platform: &'static str,
    /// The app's key in the cache, e.g. `dingtalk:{app_key}`.
    app: String,
    per_window: u32,
    window: Duration,
    monthly_budget: u64,
    queues: Mutex<HashMap<(String, Priority), Turns>>,
}

/// The line of one endpoint and priority's waiters in this process, served in order.
type Turns = Arc<tokio::sync::Mutex<()>>;

impl fmt::Debug for Governor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Governor")
            .field("app", &self.app)
            .field("per_window", &self.per_window)
            .field("window", &self.window)
            .field("monthly_budget", &self.monthly_budget)
            .finish_non_exhaustive()
    }
}

impl Governor {
    /// A governor for `app` allowing `per_window` calls per endpoint in any `window` (0 =
    /// unpaced) and `monthly_budget` metered calls a month (0 = unlimited).
    pub fn new(
        cache: Arc<dyn Cache>,
        platform: &'static str,
        app: String,
        (per_window, window): (u32, Duration),
        monthly_budget: u64,
    ) -> Self {
        Self {
            cache,
            local: MemoryCache::new(),
            platform,
            app,
            per_window,
            window,
            monthly_budget,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Slots of a window a priority may use.
    fn limit(&self, priority: Priority) -> u32 {
        match priority {
            Priority::First => self.per_window,
            Priority::Later => (self.per_window * 3 / 4).max(1),
        }
    }

    /// Waits for one of `limit` slots in any `window` for calls to one recipient, `scope`
    /// (WeCom's 30 messages a minute to one member), besides the endpoint's own limit.
    pub async fn acquire_for(&self, scope: &str, limit: u32, window: Duration) {
        let key = format!("api-rate:{}:to:{scope}", self.app);
        let started = Instant::now();
        self.take(&key, limit, window).await;
        self.observe_wait("recipient", started);
    }

    /// Takes a slot of the window at `key`, waiting as long as it takes; falls back to this
    /// process's own count while the shared cache is unavailable.
    async fn take(&self, key: &str, limit: u32, window: Duration) {
        loop {
            let taken = match self.cache.take_slot(key, limit, window).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "shared API limit unavailable; pacing this process alone");
                    self.local
                        .take_slot(key, limit, window)
                        .await
                        .unwrap_or(None)
                }
            };
            match taken {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    fn observe_wait(&self, api: &str, started: Instant) {
        let waited = started.elapsed();
        if waited >= Duration::from_millis(5) {
            crate::metrics::get()
                .throttle_wait
                .with_label_values(&[self.platform, api])
                .observe(waited.as_secs_f64());
        }
    }

    /// Waits for a slot to call `endpoint`, at most until `deadline` (None: as long as it
    /// takes). The wait is counted in `parley_platform_throttle_wait_seconds`.
    pub async fn acquire(
        &self,
        endpoint: &str,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<(), NoSlot> {
        if self.per_window == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let queue = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues
                .entry((endpoint.to_string(), priority))
                .or_default()
                .clone()
        };
        let wait = async {
            let _turn = queue.lock().await;
            let key = format!("api-rate:{}:{endpoint}", self.app);
            self.take(&key, self.limit(priority), self.window).await;
        };
        let result = match deadline {
            None => {
                wait.await;
                Ok(())
            }
            Some(d) => tokio::time::timeout_at(d, wait).await.map_err(|_| NoSlot),
        };
        self.observe_wait(endpoint, started);
        result
    }

    /// The cache key of this month's metered calls; months are Asia/Shanghai's (UTC+8,
    /// no daylight saving), as the platform's are.
    fn month_key(&self) -> String {
        let (y, m) = shanghai_month(crate::now_ms());
        format!("api-month:{}:{y:04}-{m:02}", self.app)
    }

    /// Counts one metered call against the monthly budget.
    pub async fn count_metered(&self, bot: &str) {
        if self.monthly_budget == 0 {
            return;
        }
        match self.cache.add(&self.month_key(), 1, MONTH_TTL).await {
            Ok(used) => self.show_left(bot, used),
            Err(e) => tracing::warn!(error = %e, "could not count a metered API call"),
        }
    }

    /// Metered calls left this month; None when there is no budget. An unreadable count
    /// reads as nothing left, so a cache outage costs cards, not the org's quota.
    pub async fn budget_left(&self, bot: &str) -> Option<u64> {
        if self.monthly_budget == 0 {
            return None;
        }
        let used = self.cache.add(&self.month_key(), 0, MONTH_TTL).await;
        let used = match used {
            Ok(used) => used,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the monthly API budget");
                return Some(0);
            }
        };
        self.show_left(bot, used);
        Some(self.monthly_budget.saturating_sub(used.max(0) as u64))
    }

    fn show_left(&self, bot: &str, used: i64) {
        let left = self.monthly_budget.saturating_sub(used.max(0) as u64);
        crate::metrics::get()
            .budget_remaining
            .with_label_values(&[bot])
            .set(i64::try_from(left).unwrap_or(i64::MAX));
    }
}

/// A month's counter outlives the month, so a count is never reset while it still applies.
const MONTH_TTL: Duration = Duration::from_secs(32 * 24 * 3600);

/// Year and month in Asia/Shanghai of a Unix time in ms.
fn shanghai_month(unix_ms: i64) -> (i64, u32) {
    let days = (unix_ms + 8 * 3600 * 1000).div_euclid(86_400_000);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_shanghai_months() {
        // 2026-11-30T16:00:00Z is 2026-12-01 00:00 in Shanghai.
        assert_eq!(shanghai_month(1_796_054_400_000), (2026, 12));
        assert_eq!(shanghai_month(1_796_054_399_999), (2026, 11));
        assert_eq!(shanghai_month(0), (1970, 1));
        // 2024-02-29T12:00:00Z
        assert_eq!(shanghai_month(1_709_208_000_000), (2024, 2));
    }

    #[tokio::test]
    async fn no_window_holds_more_than_the_limit_and_later_calls_leave_room() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let g = Arc::new(Governor::new(
            cache,
            "dingtalk",
            "app".into(),
            (4, SECOND),
            0,
        ));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                g.acquire("e", Priority::First, None).await.unwrap();
                started.elapsed()
            }));
        }
        let mut at: Vec<Duration> = Vec::new();
        for t in tasks {
            at.push(t.await.unwrap());
        }
        at.sort();
        assert!(at[3] < Duration::from_millis(100), "{at:?}");
        assert!(at[4] >= SECOND - Duration::from_millis(5), "{at:?}");
        // Later calls use three slots in four; a First call still gets the fourth.
        let g = Governor::new(
            Arc::new(MemoryCache::new()),
            "dingtalk",
            "b".into(),
            (4, SECOND),
            0,
        );
        for _ in 0..3 {
            g.acquire("e", Priority::Later, None).await.unwrap();
        }
        let soon = Some(Instant::now() + Duration::from_millis(100));
        assert_eq!(g.acquire("e", Priority::Later, soon).await, Err(NoSlot));
        assert_eq!(g.acquire("e", Priority::First, soon).await, Ok(()));
        assert_eq!(g.acquire("other", Priority::Later, soon).await, Ok(()));
    }

    #[tokio::test]
    async fn the_monthly_budget_counts_down() {
        let g = Governor::new(
            Arc::new(MemoryCache::new()),
            "dingtalk",
            "a".into(),
            (20, SECOND),
            3,
        );
        assert_eq!(g.budget_left("bot").await, Some(3));
        g.count_metered("bot").await;
        g.count_metered("bot").await;
        assert_eq!(g.budget_left("bot").await, Some(1));
        let unlimited = Governor::new(
            Arc::new(MemoryCache::new()),
            "dingtalk",
            "a".into(),
            (20, SECOND),
            0,
        );
        assert_eq!(unlimited.budget_left("bot").await, None);
    }
}
