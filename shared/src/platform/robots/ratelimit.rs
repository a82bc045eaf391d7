//! A cluster-wide "at most N messages in any 60 seconds" limit per robot, kept in the
//! shared cache so every worker process honours the same budget: a send first takes one of
//! the robot's N sliding-window slots ([`Cache::take_slot`], one atomic step in either
//! backend), so no window ever holds more than N sends. The window is the platforms' 60 s
//! unless tests or benchmarks shorten it.

use crate::cache::{Cache, CacheError};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The platforms' window.
pub const PLATFORM_WINDOW: Duration = Duration::from_secs(60);
/// A slot is held this much longer than the window so that the time a send takes to reach
/// the platform can never squeeze N+1 sends into one window.
const MARGIN: Duration = Duration::from_secs(1);

/// N sends per window for each robot key.
pub struct WindowLimiter {
    cache: Arc<dyn Cache>,
    per_window: u32,
    /// How long a claimed slot is held: the window plus [`MARGIN`].
    hold: Duration,
}

impl fmt::Debug for WindowLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowLimiter")
            .field("per_window", &self.per_window)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl WindowLimiter {
    /// At most `per_minute` sends per robot in any [`PLATFORM_WINDOW`].
    pub fn new(cache: Arc<dyn Cache>, per_minute: u32) -> Self {
        Self::with_window(cache, per_minute, PLATFORM_WINDOW)
    }

    /// At most `per_window` sends per robot in any `window` (`[notify] window_secs`).
    pub fn with_window(cache: Arc<dyn Cache>, per_window: u32, window: Duration) -> Self {
        Self {
            cache,
            per_window: per_window.max(1),
            hold: window + MARGIN,
        }
    }

    /// Claims a free slot for a send to `robot`, if one is free now.
    pub async fn try_acquire(&self, robot: &str) -> Result<bool, CacheError> {
        let key = format!("robot-rate:{robot}");
        let wait = self
            .cache
            .take_slot(&key, self.per_window, self.hold)
            .await?;
        Ok(wait.is_none())
    }

    /// Waits until a slot for `robot` is free and claims it.
    pub async fn acquire(&self, robot: &str) -> Result<(), CacheError> {
        let key = format!("robot-rate:{robot}");
        while let Some(wait) = self
            .cache
            .take_slot(&key, self.per_window, self.hold)
            .await?
        {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;

    #[tokio::test]
    async fn only_n_slots_per_window() {
        let limiter = WindowLimiter::new(Arc::new(MemoryCache::new()), 3);
        for _ in 0..3 {
            assert!(limiter.try_acquire("r1").await.unwrap());
        }
        assert!(!limiter.try_acquire("r1").await.unwrap());
        assert!(
            limiter.try_acquire("r2").await.unwrap(),
            "robots are independent"
        );
    }

    #[tokio::test]
    async fn a_short_window_frees_its_slots_after_window_and_margin() {
        let limiter = WindowLimiter::with_window(Arc::new(MemoryCache::new()), 1, Duration::ZERO);
        assert!(limiter.try_acquire("r").await.unwrap());
        assert!(!limiter.try_acquire("r").await.unwrap());
        tokio::time::sleep(MARGIN + Duration::from_millis(100)).await;
        assert!(limiter.try_acquire("r").await.unwrap());
    }
}
