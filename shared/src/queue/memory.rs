//! The embedded job queue used by `parley serve` without a broker: bounded, with the same
//! settle semantics as the broker backend, including "a delivery dropped without being
//! settled goes back to the queue".

use super::{DeadLetter, Delivery, JobQueue, QueueError, Settle, Settlement};
use crate::job::Job;
use async_trait::async_trait;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
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
    tx: mpsc::Sender<Envelope>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Envelope>>,
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
        let (tx, rx) = mpsc::channel(capacity);
        Self {
            inner: Arc::new(MemoryInner {
                lane,
                tx,
                rx: tokio::sync::Mutex::new(rx),
                dead: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Jobs waiting (not in flight).
    pub fn depth(&self) -> usize {
        self.inner.tx.max_capacity() - self.inner.tx.capacity()
    }

    fn record_depth(&self) {
        crate::metrics::get()
            .queue_depth
            .with_label_values(&[self.inner.lane])
            .set(self.depth() as i64);
    }

    fn push(&self, job: Job, attempt: u32) -> Result<(), QueueError> {
        self.inner
            .tx
            .try_send(Envelope { job, attempt })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Unavailable("closed".into()),
            })?;
        self.record_depth();
        Ok(())
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        self.push(job.clone(), 1)
    }

    async fn next(&self) -> Result<Delivery, QueueError> {
        let env = {
            let mut rx = self.inner.rx.lock().await;
            rx.recv()
                .await
                .ok_or_else(|| QueueError::Unavailable("closed".into()))?
        };
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
