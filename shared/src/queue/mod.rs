//! The job-queue seam: publish (confirmed), consume, and settle each delivery exactly once
//! as ack, retry-later or dead-letter. The backends are `memory`
//! (embedded, for `parley serve` without a broker) and `amqp` (RabbitMQ), with the same
//! settle semantics.

pub mod amqp;
pub mod memory;

pub use memory::MemoryQueue;

use crate::job::Job;
use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// The default delays of the retry tiers, in seconds (`[queue] retry_delays_secs` sets
/// others): the n-th retry waits the n-th tier (the last one repeats). Every process of a
/// deployment must use the same list, because the broker backend declares one delay queue
/// per tier.
pub const RETRY_TIERS_SECS: [u64; 4] = [5, 30, 120, 600];

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is at capacity; the caller should ask the platform to retry (503).
    #[error("queue is full")]
    Full,
    /// The queue is shut down or its connection is gone.
    #[error("queue is unavailable: {0}")]
    Unavailable(String),
    /// The broker did not confirm in time.
    #[error("publish not confirmed in time")]
    ConfirmTimeout,
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove it.
    Ack,
    /// Deliver again after `delay`, counting one more attempt.
    Retry {
        /// How long to wait first.
        delay: Duration,
    },
    /// Give up: park it in the dead-letter store with the reason.
    DeadLetter {
        /// Short cause, for `parley dlq list` and the log.
        reason: String,
    },
}

/// A job taken from the queue, to be settled once.
pub struct Delivery {
    /// The job.
    pub job: Job,
    /// 1 for the first delivery, 2 after one retry, …
    pub attempt: u32,
    settler: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("job", &self.job.id)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Delivery {
    /// Builds a delivery; for queue backends.
    pub fn new(job: Job, attempt: u32, settler: Box<dyn Settle>) -> Self {
        Self {
            job,
            attempt,
            settler,
        }
    }

    /// Settles the delivery.
    pub async fn settle(self, settlement: Settlement) -> Result<(), QueueError> {
        self.settler
            .settle(&self.job, self.attempt, settlement)
            .await
    }
}

/// Backend half of a delivery: how to ack, retry or dead-letter it.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Carries out the settlement of `job` at `attempt`.
    async fn settle(
        self: Box<Self>,
        job: &Job,
        attempt: u32,
        settlement: Settlement,
    ) -> Result<(), QueueError>;
}

/// A job that was given up on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The job.
    pub job: Job,
    /// Attempts made.
    pub attempts: u32,
    /// Why it was given up.
    pub reason: String,
    /// When (ms since epoch).
    pub at_ms: i64,
}

/// The job queue seam.
#[async_trait]
pub trait JobQueue: Send + Sync + fmt::Debug {
    /// Stores the job durably; returns only once it is safe to tell the platform 2xx.
    async fn publish(&self, job: &Job) -> Result<(), QueueError>;
    /// Waits for the next delivery. Cancel-safe: dropping the future loses nothing.
    async fn next(&self) -> Result<Delivery, QueueError>;
    /// Whether the queue can take and give jobs now (drives `/readyz`).
    fn is_ready(&self) -> bool;
    /// The dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError>;
    /// Puts dead letters back on the queue (all when `id` is None); returns how many.
    async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError>;
}
