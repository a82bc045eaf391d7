//! The embedded job queue used by `parley serve` without a broker: bounded for new jobs,
//! with the same settle semantics as the broker backend, including "a delivery dropped
//! without being settled goes back to the queue". The bound applies to new callbacks only:
//! a retry, a redelivery or a replayed dead letter is an accepted job and always goes back.

use super::{DeadLetter, Delivery, JobQueue, QueueError, Settle, Settlement};
use crate::job::Job;
use async_trait::async_trait;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

struct Envelope {
    job: Job,
    attempt: u32,
}

/// The embedded, in-process queue.
#[derive(Clone)]
pub struct MemoryQueue {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    /// The lane it serves (`chat`, `notify`): its depth metric's label.
    lane: &'static str,
    /// New jobs beyond this many waiting are refused.
    capacity: usize,
    /// Jobs waiting.
    depth: AtomicUsize,
    tx: mpsc::UnboundedSender<Envelope>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Envelope>>,
    dead: Mutex<Vec<DeadLetter>>,
}

impl fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("depth", &self.depth())
            .finish()
    }
}

impl MemoryQueue {
    /// A queue holding at most `capacity` waiting jobs of `lane` (`chat`, `notify`).
    pub fn new(capacity: usize, lane: &'static str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(MemoryInner {
                lane,
                capacity,
                depth: AtomicUsize::new(0),
                tx,
                rx: tokio::sync::Mutex::new(rx),
                dead: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Jobs waiting (not in flight).
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::SeqCst)
    }

    fn record_depth(&self) {
        crate::metrics::get()
            .queue_depth
            .with_label_values(&[self.inner.lane])
            .set(self.depth() as i64);
    }

    /// Queues a job that was already accepted (a retry, a redelivery, a replay): never
    /// refused for the bound.
    fn push(&self, job: Job, attempt: u32) -> Result<(), QueueError> {
        self.inner.depth.fetch_add(1, Ordering::SeqCst);
        if self.inner.tx.send(Envelope { job, attempt }).is_err() {
            self.inner.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueError::Unavailable("closed".into()));
        }
        self.record_depth();
        Ok(())
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        // Reserve a place first, so concurrent publishers cannot overshoot the bound.
        let taken = self
            .inner
            .depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                (d < self.inner.capacity).then_some(d + 1)
            });
        if taken.is_err() {
            return Err(QueueError::Full);
        }
        if self
            .inner
            .tx
            .send(Envelope {
                job: job.clone(),
                attempt: 1,
            })
            .is_err()
        {
            self.inner.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueError::Unavailable("closed".into()));
        }
        self.record_depth();
        Ok(())
    }

    async fn next(&self) -> Result<Delivery, QueueError> {
        let env = {
            let mut rx = self.inner.rx.lock().await;
            rx.recv()
                .await
                .ok_or_else(|| QueueError::Unavailable("closed".into()))?
        };
        self.inner.depth.fetch_sub(1, Ordering::SeqCst);
        self.record_depth();
        let settler = MemorySettle {
            queue: self.clone(),
            settled: AtomicBool::new(false),
            job: Mutex::new(Some(env.job.clone())),
            attempt: env.attempt,
        };
        Ok(Delivery::new(env.job, env.attempt, Box::new(settler)))
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.inner.dead.lock().unwrap().clone())
    }

    async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError> {
        let taken: Vec<DeadLetter> = {
            let mut dead = self.inner.dead.lock().unwrap();
            let (take, keep) = dead
                .drain(..)
                .partition(|d| id.is_none_or(|id| d.job.id == id));
            *dead = keep;
            take
        };
        let n = taken.len();
        for d in taken {
            self.push(d.job, 1)?;
        }
        Ok(n)
    }
}

/// Settles an embedded delivery; if dropped unsettled (worker shut down or crashed task),
/// the job goes back to the queue, as an unacked broker delivery would.
struct MemorySettle {
    queue: MemoryQueue,
    settled: AtomicBool,
    job: Mutex<Option<Job>>,
    attempt: u32,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn settle(
        self: Box<Self>,
        job: &Job,
        attempt: u32,
        settlement: Settlement,
    ) -> Result<(), QueueError> {
        self.settled.store(true, Ordering::SeqCst);
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                let queue = self.queue.clone();
                let job = job.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = queue.push(job, attempt + 1) {
                        tracing::error!(error = %e, "embedded queue could not take a retried job back");
                    }
                });
            }
            Settlement::DeadLetter { reason } => {
                self.queue.inner.dead.lock().unwrap().push(DeadLetter {
                    job: job.clone(),
                    attempts: attempt,
                    reason,
                    at_ms: crate::now_ms(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst)
            && let Some(job) = self.job.lock().unwrap().take()
        {
            // Unsettled: same as an unacked broker delivery, it comes again.
            let _ = self.queue.push(job, self.attempt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::sample_job;
    use std::time::Duration;

    #[tokio::test]
    async fn published_job_is_delivered_and_acked() {
        let q = MemoryQueue::new(4, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        let d = q.next().await.unwrap();
        assert_eq!((d.job.id.as_str(), d.attempt), ("a", 1));
        d.settle(Settlement::Ack).await.unwrap();
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn each_lane_reports_its_own_depth() {
        let (chat, notify) = (
            MemoryQueue::new(4, "lane-test-a"),
            MemoryQueue::new(4, "lane-test-b"),
        );
        chat.publish(&sample_job("a", "1")).await.unwrap();
        chat.publish(&sample_job("b", "2")).await.unwrap();
        notify.publish(&sample_job("c", "3")).await.unwrap();
        let depth = |lane| {
            crate::metrics::get()
                .queue_depth
                .with_label_values(&[lane])
                .get()
        };
        assert_eq!((depth("lane-test-a"), depth("lane-test-b")), (2, 1));
        let _taken = notify.next().await.unwrap();
        assert_eq!((depth("lane-test-a"), depth("lane-test-b")), (2, 0));
    }

    #[tokio::test]
    async fn full_queue_refuses() {
        let q = MemoryQueue::new(1, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        assert!(matches!(
            q.publish(&sample_job("b", "hi")).await,
            Err(QueueError::Full)
        ));
    }

    #[tokio::test]
    async fn a_retry_goes_back_even_when_new_jobs_filled_the_queue() {
        let q = MemoryQueue::new(1, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        let d = q.next().await.unwrap();
        q.publish(&sample_job("b", "hi")).await.unwrap();
        d.settle(Settlement::Retry {
            delay: Duration::from_millis(10),
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(q.depth(), 2, "the retry is back beside the new job");
        assert!(matches!(
            q.publish(&sample_job("c", "hi")).await,
            Err(QueueError::Full)
        ));
        let ids = [q.next().await.unwrap(), q.next().await.unwrap()]
            .map(|d| (d.job.id.clone(), d.attempt));
        assert_eq!(ids, [("b".to_string(), 1), ("a".to_string(), 2)]);
    }

    #[tokio::test]
    async fn retry_comes_back_with_next_attempt_and_dead_letters_replay() {
        let q = MemoryQueue::new(4, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        let d = q.next().await.unwrap();
        d.settle(Settlement::Retry {
            delay: Duration::from_millis(10),
        })
        .await
        .unwrap();
        let d = q.next().await.unwrap();
        assert_eq!(d.attempt, 2);
        d.settle(Settlement::DeadLetter {
            reason: "poison".into(),
        })
        .await
        .unwrap();
        let dead = q.dead_letters().await.unwrap();
        assert_eq!((dead.len(), dead[0].attempts), (1, 2));
        assert_eq!(q.replay_dead_letters(Some("a")).await.unwrap(), 1);
        assert_eq!(q.next().await.unwrap().attempt, 1);
    }

    #[tokio::test]
    async fn dropped_delivery_returns_to_the_queue() {
        let q = MemoryQueue::new(4, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        drop(q.next().await.unwrap());
        assert_eq!(q.next().await.unwrap().job.id, "a");
    }
}
