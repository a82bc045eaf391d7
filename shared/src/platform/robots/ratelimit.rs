//! A cluster-wide "at most N messages in any 60 seconds" limit per robot, kept in the
//! shared cache so every worker process honours the same budget. The budget is N slot keys
//! per robot; a send first claims a free slot (set-if-absent with a TTL of one window),
//! so a slot taken at t is free again at t + window and no 60-second window ever holds
//! more than N sends. Only set-if-absent is needed, which both cache backends do
//! atomically; no clock is shared between processes.

use crate::cache::{Cache, CacheError};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The platforms' window. A slot is held one second longer than the window so that the
/// time a send takes to reach the platform can never squeeze N+1 sends into one window.
const WINDOW: Duration = Duration::from_secs(61);
/// How often a sender waiting for a free slot looks again.
const POLL: Duration = Duration::from_millis(250);

/// N sends per window for each robot key.
pub struct WindowLimiter {
    cache: Arc<dyn Cache>,
    per_window: u32,
}

impl fmt::Debug for WindowLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowLimiter")
            .field("per_window", &self.per_window)
            .finish_non_exhaustive()
    }
}

impl WindowLimiter {
    /// At most `per_minute` sends per robot in any window.
    pub fn new(cache: Arc<dyn Cache>, per_minute: u32) -> Self {
        Self {
            cache,
            per_window: per_minute.max(1),
        }
    }

    /// Claims a free slot for a send to `robot`, if one is free now.
    pub async fn try_acquire(&self, robot: &str) -> Result<bool, CacheError> {
        for slot in 0..self.per_window {
            let key = format!("robot-rate:{robot}:{slot}");
            if self.cache.set_nx(&key, "1", WINDOW).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waits until a slot for `robot` is free and claims it.
    pub async fn acquire(&self, robot: &str) -> Result<(), CacheError> {
        while !self.try_acquire(robot).await? {
            tokio::time::sleep(POLL).await;
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
}
