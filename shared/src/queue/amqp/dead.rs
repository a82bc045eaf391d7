//! The dead letters: listed and replayed by walking `{prefix}.dead` with `basic.get`.

use super::Inner;
use super::connection::close_quietly;
use super::headers::{dead_letter_of, job_properties};
use super::settle::ack;
use super::{DeadLetter, QueueError};
use crate::job::Job;
use lapin::Channel;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::BasicGetOptions;
use std::time::Duration;

/// Longest listing or replaying the dead letters may take.
pub(super) const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// `basic.get` and stays unacked unless the caller acks it, so closing the channel (or
/// dropping the walk) puts the rest back, in their order.
pub(super) struct DeadWalk<'a> {
    pub(super) inner: &'a Inner,
    pub(super) channel: Channel,
    pub(super) what: &'static str,
    pub(super) deadline: tokio::time::Instant,
}

impl DeadWalk<'_> {
    pub(super) async fn next(&self) -> Result<Option<AmqpDelivery>, QueueError> {
        let dead = self.inner.topology.dead.as_str();
        let get = self
            .channel
            .basic_get(dead.into(), BasicGetOptions { no_ack: false });
        match tokio::time::timeout_at(self.deadline, get).await {
            Ok(Ok(message)) => Ok(message.map(|m| m.delivery)),
            Ok(Err(e)) => Err(self.inner.unavailable(self.what, e)),
            Err(_) => Err(QueueError::Unavailable(format!("{} timed out", self.what))),
        }
    }

    pub(super) async fn close(self) {
        close_quietly(&self.channel).await;
    }
}

impl Inner {
    pub(super) async fn walk_dead_letters(
        &self,
        what: &'static str,
    ) -> Result<DeadWalk<'_>, QueueError> {
        let link = self.link()?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| self.unavailable("opening a channel", e))?;
        Ok(DeadWalk {
            inner: self,
            channel,
            what,
            deadline: tokio::time::Instant::now() + ADMIN_TIMEOUT,
        })
    }

    /// Every dead letter, oldest first; the queue is left as it was.
    pub(super) async fn list_dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let walk = self.walk_dead_letters("listing dead letters").await?;
        let listed = async {
            let mut letters = Vec::new();
            let mut unreadable = 0usize;
            while let Some(delivery) = walk.next().await? {
                match dead_letter_of(&delivery) {
                    Some(letter) => letters.push(letter),
                    None => unreadable += 1,
                }
            }
            if unreadable > 0 {
                tracing::warn!(
                    unreadable,
                    "dead letters that are not jobs this build can read were left in place"
                );
            }
            Ok(letters)
        }
        .await;
        walk.close().await;
        listed
    }

    /// Puts dead letters (all, or the one with job id `id`) back into their shards.
    pub(super) async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError> {
        let inner = self;
        let walk = inner.walk_dead_letters("replaying dead letters").await?;
        let mut replayed = 0;
        let walked = async {
            while let Some(delivery) = walk.next().await? {
                let Ok(job) = Job::from_bytes(&delivery.data) else {
                    continue;
                };
                if id.is_some_and(|id| id != job.id) {
                    continue;
                }
                // Publish first, then ack: a crash in between replays twice, never zero times.
                // Into the job's shard (at its tail), like a new message of the conversation.
                let properties = job_properties(&job.id, 1);
                let shard = inner.topology.shard_queue(&job);
                inner
                    .publish_confirmed("", shard, &delivery.data, properties)
                    .await?;
                ack(&delivery.acker, &inner.scrub).await?;
                replayed += 1;
            }
            Ok(())
        }
        .await;
        walk.close().await;
        match walked {
            Ok(()) => Ok(replayed),
            Err(QueueError::Unavailable(why)) if replayed > 0 => Err(QueueError::Unavailable(
                format!("{why} (after replaying {replayed})"),
            )),
            Err(e) => Err(e),
        }
    }
}
