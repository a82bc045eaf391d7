//! Settlement: what processing a job came to ([`Outcome`]) and the one function that turns
//! it into what happens to the delivery — ack, a retry after a growing delay, or dead-letter.

use crate::engine::EngineSettings;
use shared::queue::Settlement;
use std::time::Duration;

/// What processing one job came to; [`settlement`] turns it into ack / retry / dead-letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer was delivered.
    Answered,
    /// Already answered before (redelivery): nothing sent.
    Duplicate,
    /// Could not deliver now; try again later (at least `after`).
    Retry {
        /// Why.
        reason: String,
        /// Wait asked for by the platform, if any.
        after: Option<Duration>,
    },
    /// Cannot ever succeed.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// Delay before the n-th retry: growing tiers, so a platform outage is not hammered.
pub fn retry_delay(tiers: &[u64], attempt: u32) -> Duration {
    let i = (attempt.saturating_sub(1) as usize).min(tiers.len().saturating_sub(1));
    Duration::from_secs(tiers.get(i).copied().unwrap_or(5))
}

/// The one place that turns an outcome into what happens to the delivery.
pub fn settlement(outcome: &Outcome, attempt: u32, settings: &EngineSettings) -> Settlement {
    match outcome {
        Outcome::Answered | Outcome::Duplicate => Settlement::Ack,
        Outcome::Retry { reason, .. } if attempt >= settings.max_attempts => {
            Settlement::DeadLetter {
                reason: format!("gave up after {attempt} attempts: {reason}"),
            }
        }
        Outcome::Retry { after, .. } => Settlement::Retry {
            delay: retry_delay(&settings.retry_delays_secs, attempt).max(after.unwrap_or_default()),
        },
        Outcome::GiveUp { reason } => Settlement::DeadLetter {
            reason: reason.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_settle_as_documented() {
        let settings = EngineSettings {
            lane: "chat",
            max_concurrency: 1,
            max_attempts: 3,
            retry_delays_secs: vec![5, 30, 120],
        };
        let retry = |after: u64| Outcome::Retry {
            reason: "busy".into(),
            after: Some(Duration::from_secs(after)),
        };
        let delay = |secs| Settlement::Retry {
            delay: Duration::from_secs(secs),
        };
        assert_eq!(
            settlement(&Outcome::Answered, 1, &settings),
            Settlement::Ack
        );
        assert_eq!(
            settlement(&Outcome::Duplicate, 1, &settings),
            Settlement::Ack
        );
        assert_eq!(settlement(&retry(0), 1, &settings), delay(5));
        assert_eq!(settlement(&retry(0), 2, &settings), delay(30));
        assert_eq!(
            settlement(&retry(60), 1, &settings),
            delay(60),
            "the platform's wait wins"
        );
        assert!(matches!(
            settlement(&retry(0), 3, &settings),
            Settlement::DeadLetter { .. }
        ));
        assert!(matches!(
            settlement(&Outcome::GiveUp { reason: "x".into() }, 1, &settings),
            Settlement::DeadLetter { .. }
        ));
        assert_eq!(retry_delay(&[5, 30], 9), Duration::from_secs(30));
    }
}
