//! Settling a broker delivery: ack, retry through a delay tier, dead-letter, or — dropped
//! unsettled — return it to its queue in delivery order.

use super::Inner;
use super::headers::{JSON, dead_headers, job_properties, message_properties};
use super::shards::{Dropped, InFlight, ShardSlot};
use super::{QueueError, Settle, Settlement};
use crate::job::Job;
use crate::secret::Scrubber;
use async_trait::async_trait;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

/// Deliveries dropped unsettled within this long of each other go back in one batch, in
/// the order they came.
pub(super) const RETURN_GATHER: Duration = Duration::from_millis(10);

/// Settles a broker delivery. Dropped unsettled (or after a failed settle), it nacks with
/// requeue, so the job comes again — as an embedded delivery is pushed back.
pub(super) struct AmqpSettle {
    pub(super) inner: Arc<Inner>,
    pub(super) generation: u64,
    pub(super) tag: u64,
    pub(super) acker: Acker,
    pub(super) settled: bool,
    /// Keeps the shard from being handed over until this delivery is settled or returned.
    pub(super) in_flight: Option<InFlight>,
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn settle(
        mut self: Box<Self>,
        job: &Job,
        attempt: u32,
        settlement: Settlement,
    ) -> Result<(), QueueError> {
        let inner = self.inner.clone();
        if self.generation != inner.generation.load(Ordering::Acquire) || !self.acker.usable() {
            return Err(QueueError::Unavailable(STALE.into()));
        }
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                // Through the tier's exchange, keyed by the shard the job returns to.
                let tier = inner.topology.retry_tier(delay);
                let shard = inner.topology.shard_queue(job);
                let properties = job_properties(&job.id, attempt.saturating_add(1));
                inner
                    .publish_confirmed(tier, shard, &job.to_bytes(), properties)
                    .await?;
            }
            Settlement::DeadLetter { reason } => {
                let headers = dead_headers(attempt, &reason, crate::now_ms());
                let properties = message_properties(Some(&job.id), JSON, headers);
                let dead = &inner.topology.dead;
                inner
                    .publish_confirmed("", dead, &job.to_bytes(), properties)
                    .await?;
            }
        }
        self.settled = true;
        ack(&self.acker, &inner.scrub).await
    }
}

pub(super) const STALE: &str =
    "the delivery's connection was lost, so it cannot be settled; the broker will deliver it again";

impl Drop for AmqpSettle {
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        let (Ok(runtime), Some(in_flight)) =
            (tokio::runtime::Handle::try_current(), self.in_flight.take())
        else {
            return;
        };
        let slot = in_flight.0.clone();
        let first = {
            let mut returns = slot.returns.lock().unwrap_or_else(PoisonError::into_inner);
            returns.push(Dropped {
                tag: self.tag,
                acker: self.acker.clone(),
                _in_flight: in_flight,
            });
            returns.len() == 1
        };
        if first {
            runtime.spawn(return_dropped(slot));
        }
    }
}

/// Returns the deliveries of a shard dropped unsettled, in the order they were delivered: a
/// worker that stops drops its unstarted jobs all at once in no particular order, and the
/// broker puts returned messages back in the order it gets them, which must be the order
/// of the conversation.
pub(super) async fn return_dropped(slot: Arc<ShardSlot>) {
    tokio::time::sleep(RETURN_GATHER).await;
    let mut batch =
        std::mem::take(&mut *slot.returns.lock().unwrap_or_else(PoisonError::into_inner));
    batch.sort_by_key(|d| d.tag);
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    for dropped in batch {
        if let Err(e) = dropped.acker.nack(requeue).await {
            // The channel is going away: the broker requeues it anyway.
            tracing::debug!(error = %e, "could not return an unsettled delivery");
        }
    }
}

pub(super) async fn ack(acker: &Acker, scrub: &Scrubber) -> Result<(), QueueError> {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Unavailable(STALE.into())),
        Err(e) => Err(QueueError::Unavailable(format!(
            "ack failed ({}); the broker will deliver it again",
            scrub.clean(e)
        ))),
    }
}
