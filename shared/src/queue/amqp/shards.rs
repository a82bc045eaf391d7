//! Consuming the shard queues: order per conversation, and shards spread over workers.
//!
//! The publisher puts a job in shard [`shard_of`]`(job.conversation_key)`, a fixed
//! hash, so all messages of a conversation line up in one queue in the order the ingress got
//! them confirmed. Every worker subscribes to every shard (one channel and consumer each,
//! `basic.qos` = the worker's concurrency), and single active consumer lets the broker feed a
//! shard to one of them at a time; inside the process the worker runs a conversation's jobs
//! one after another in delivery order, each after its predecessor wrote the history. Shards
//! are spread over workers: the broker makes the *first* subscriber of a queue its active
//! consumer, so the first worker up would otherwise work every shard while the others only
//! stand by. Each worker therefore counts the workers (`{prefix}.workers`) and the shards it
//! knows it is active on (a consumer that got a delivery is active until its channel closes),
//! and every [`REBALANCE_EVERY`] hands shards above `ceil(N / workers)` over: it stops taking
//! that shard's deliveries, lets those it already took finish, then *closes the shard's
//! channel* — the broker returns what was still unacked to the head of the queue before it
//! activates the next waiting consumer — and subscribes again at the back of the line. (A
//! `basic.cancel` would not do: RabbitMQ 3.10 activates the next consumer at once, while the
//! cancelled one still holds unacked jobs, and they come back after newer ones.) A returned
//! job counts one delivery toward the limit. At most N workers are busy at once.
//! What order does *not* survive: a job settled as a retry leaves its line and comes back at
//! its tail after the delay, so later messages of the conversation are answered first (and
//! without its answer in their history); replayed dead letters go to the tail as well. When a
//! worker crashes, its shards go to another worker with their unacked jobs first, in order;
//! but a worker that loses only its connection (a network partition) may still be finishing
//! jobs the broker already handed to the next worker — the answered-marker keeps those from
//! being answered twice, their order is not guaranteed.
//!
//! The shard consumers feed one bounded channel, so [`JobQueue::next`] is
//! cancel-safe. A payload that is not a job is moved to the dead letters at once (and
//! acked); a delivery dropped unsettled is nacked with requeue, as the embedded queue pushes
//! it back.

use super::connection::CLOSE_TIMEOUT;
use super::headers::{attempt_of, dead_headers, message_properties};
use super::settle::ack;
use super::{Incoming, Inner, Link};
use crate::job::Job;
use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Channel, Consumer};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// How often a worker compares the shards it works with its fair share and hands extra ones
/// over.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(2);

/// Longest counting the workers may take; a slower answer skips that rebalancing round.
pub(super) const COUNT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a shard being handed over looks whether its jobs have finished.
pub(super) const HAND_OVER_POLL: Duration = Duration::from_millis(20);

/// This process's consumer of one shard queue, shared by its task, its deliveries and the
/// rebalancer.
pub(super) struct ShardSlot {
    pub(super) index: usize,
    pub(super) queue: String,
    /// Deliveries taken from the current consumer and not yet settled or dropped.
    pub(super) in_flight: AtomicUsize,
    /// The current consumer got a delivery, so it is the shard's single active consumer (and
    /// stays so until its channel closes).
    pub(super) active: AtomicBool,
    /// Set by the rebalancer: hand the shard to the next waiting consumer.
    pub(super) releasing: AtomicBool,
    pub(super) wake: Notify,
    /// Deliveries dropped unsettled, about to be returned (see [`return_dropped`]).
    pub(super) returns: Mutex<Vec<Dropped>>,
}

/// A delivery dropped unsettled, to be returned to its queue.
pub(super) struct Dropped {
    pub(super) tag: u64,
    pub(super) acker: Acker,
    pub(super) _in_flight: InFlight,
}

impl ShardSlot {
    pub(super) fn new(index: usize, queue: String) -> Self {
        Self {
            index,
            queue,
            in_flight: AtomicUsize::new(0),
            active: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
            wake: Notify::new(),
            returns: Mutex::new(Vec::new()),
        }
    }
}

/// Counts a delivery in its shard's `in_flight` while it lives.
pub(super) struct InFlight(pub(super) Arc<ShardSlot>);

impl InFlight {
    pub(super) fn new(slot: &Arc<ShardSlot>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(slot.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hands over the shards this process works beyond its fair share.
pub(super) async fn rebalance(
    inner: &Inner,
    link: &Link,
    shards: &[Arc<ShardSlot>],
) -> Result<(), String> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let workers = inner.topology.workers.as_str();
    let count = link
        .admin
        .queue_declare(workers.into(), passive, FieldTable::default());
    let workers = match tokio::time::timeout(COUNT_TIMEOUT, count).await {
        Ok(Ok(queue)) => queue.consumer_count(),
        Ok(Err(e)) => return Err(format!("counting the workers: {e}")),
        Err(_) => return Ok(()),
    };
    let held: Vec<(usize, usize)> = shards
        .iter()
        .filter(|s| s.active.load(Ordering::Acquire) && !s.releasing.load(Ordering::Acquire))
        .map(|s| (s.index, s.in_flight.load(Ordering::Acquire)))
        .collect();
    let release = shards_to_release(&held, shards.len(), workers);
    if !release.is_empty() {
        tracing::info!(
            workers,
            working = held.len(),
            handing_over = ?release,
            "handing shards over to other workers"
        );
    }
    for index in release {
        let slot = &shards[index];
        slot.releasing.store(true, Ordering::Release);
        slot.wake.notify_one();
    }
    Ok(())
}

/// The next message of the presence subscription (there should be none); pending forever
/// when there is no subscription. `None` when the broker cancelled it.
pub(super) async fn next_presence(presence: &mut Option<Consumer>) -> Option<()> {
    match presence {
        Some(consumer) => consumer.next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Which of the `held` shards (index, deliveries in flight) to hand over so that this
/// process works at most `ceil(shards / workers)`; the least busy first, so the hand-over
/// waits for as little as possible.
pub(super) fn shards_to_release(
    held: &[(usize, usize)],
    shards: usize,
    workers: u32,
) -> Vec<usize> {
    let workers = usize::try_from(workers.max(1)).unwrap_or(usize::MAX);
    let share = shards.div_ceil(workers);
    if held.len() <= share {
        return Vec::new();
    }
    let mut by_load = held.to_vec();
    by_load.sort_by_key(|&(index, in_flight)| (in_flight, index));
    by_load
        .into_iter()
        .take(held.len() - share)
        .map(|(index, _)| index)
        .collect()
}

/// Why a shard task ended, with its consumer if it still has one: dropping a live consumer
/// cancels it, so the session drops it only after closing the connection.
pub(super) struct ShardLost {
    pub(super) reason: String,
    pub(super) consumer: Option<Consumer>,
}

/// This process's consumer of one shard, until the connection is lost: feeds its
/// deliveries to the queue's channel and, when the rebalancer asks, hands the shard over
/// and subscribes again at the back of the line.
pub(super) async fn work_shard(
    inner: Arc<Inner>,
    link: Arc<Link>,
    slot: Arc<ShardSlot>,
    tx: mpsc::Sender<Incoming>,
) -> ShardLost {
    let lost = |reason: String, consumer| ShardLost { reason, consumer };
    loop {
        let (channel, mut stream) = match subscribe(&inner, &link, &slot).await {
            Ok(subscribed) => subscribed,
            Err(e) => return lost(format!("subscribing to {}: {e}", slot.queue), None),
        };
        if let Some(why) = forward(&inner, &mut stream, &tx, link.generation, &slot).await {
            return lost(why, Some(stream));
        }
        // Handing over: what this process took must finish first, then closing the channel
        // returns the rest to the head of the queue before the next consumer is activated.
        while slot.in_flight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(HAND_OVER_POLL).await;
        }
        let closing = channel.close(200, "handing the shard over".into());
        let why = match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("closing the channel of {}: {e}", slot.queue)),
            Err(_) => Some(format!("closing the channel of {} timed out", slot.queue)),
        };
        if let Some(why) = why {
            return lost(why, Some(stream));
        }
        drop(stream);
        slot.active.store(false, Ordering::Release);
        slot.releasing.store(false, Ordering::Release);
        tracing::debug!(shard = %slot.queue, "handed the shard over");
    }
}

/// Opens a channel with `basic.qos` = prefetch and subscribes to the slot's shard.
pub(super) async fn subscribe(
    inner: &Inner,
    link: &Link,
    slot: &ShardSlot,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = link.connection.create_channel().await?;
    channel
        .basic_qos(inner.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!(
        "parley-{}-{}-{:08x}",
        inner.instance,
        slot.index,
        rand::rng().random::<u32>()
    );
    let stream = channel
        .basic_consume(
            slot.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, stream))
}

/// Decodes deliveries into the bounded channel and buries what does not decode, until the
/// shard is to be handed over (`None`) or the consumer ends (`Some(why)`).
pub(super) async fn forward(
    inner: &Arc<Inner>,
    stream: &mut Consumer,
    tx: &mpsc::Sender<Incoming>,
    generation: u64,
    slot: &Arc<ShardSlot>,
) -> Option<String> {
    loop {
        if slot.releasing.load(Ordering::Acquire) {
            return None;
        }
        let next = tokio::select! {
            biased;
            _ = slot.wake.notified() => continue,
            next = stream.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Some(format!("consumer of {} failed: {e}", slot.queue)),
            None => {
                return Some(format!(
                    "the broker cancelled the consumer of {}",
                    slot.queue
                ));
            }
        };
        slot.active.store(true, Ordering::Release);
        let in_flight = InFlight::new(slot);
        let attempt = attempt_of(&delivery.properties);
        match Job::from_bytes(&delivery.data) {
            Ok(job) => {
                let incoming = Incoming {
                    generation,
                    job,
                    attempt,
                    tag: delivery.delivery_tag,
                    acker: delivery.acker,
                    in_flight,
                };
                if tx.send(incoming).await.is_err() {
                    return Some("the queue was closed".into());
                }
            }
            Err(e) => {
                tokio::spawn(bury(inner.clone(), delivery, e.to_string(), in_flight));
            }
        }
    }
}

/// Moves an undecodable message to the dead letters, then acks it. If that fails it goes
/// back to the queue after a pause; the delivery limit bounds how often.
pub(super) async fn bury(
    inner: Arc<Inner>,
    delivery: AmqpDelivery,
    problem: String,
    _in_flight: InFlight,
) {
    let p = &delivery.properties;
    let message_id = p.message_id().as_ref().map(|id| id.as_str().to_string());
    let reason = format!("undecodable job: {problem}");
    let content_type = p
        .content_type()
        .as_ref()
        .map_or("application/octet-stream", ShortString::as_str)
        .to_string();
    let headers = dead_headers(attempt_of(p), &reason, crate::now_ms());
    let properties = message_properties(message_id.as_deref(), &content_type, headers);
    match inner
        .publish_confirmed("", &inner.topology.dead, &delivery.data, properties)
        .await
    {
        Ok(()) => {
            tracing::error!(?message_id, %reason, "an undecodable job was moved to the dead letters");
            if let Err(e) = ack(&delivery.acker, &inner.scrub).await {
                tracing::warn!(error = %e, "could not ack an undecodable job after burying it");
            }
        }
        Err(e) => {
            tracing::error!(?message_id, error = %e, "could not move an undecodable job to the dead letters; returning it");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = delivery.acker.nack(requeue).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_hands_over_what_exceeds_its_fair_share_least_busy_first() {
        // (shard, deliveries in flight)
        let held = [
            (0, 5),
            (1, 0),
            (2, 3),
            (3, 0),
            (4, 1),
            (5, 9),
            (6, 2),
            (7, 0),
        ];
        assert_eq!(shards_to_release(&held, 8, 1), Vec::<usize>::new());
        assert_eq!(shards_to_release(&held, 8, 0), Vec::<usize>::new());
        // 3 workers: at most ceil(8 / 3) = 3 each.
        assert_eq!(shards_to_release(&held, 8, 3), [1, 3, 7, 4, 6]);
        assert_eq!(shards_to_release(&held[..3], 8, 3), Vec::<usize>::new());
        // More workers than shards: one each.
        assert_eq!(shards_to_release(&held[..2], 8, 20), [1]);
    }
}
