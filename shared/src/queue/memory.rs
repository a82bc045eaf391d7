//! The embedded job queue used by `parley serve` without a broker: bounded for new jobs,
//! with the same settle semantics as the broker backend, including "a delivery dropped
//! without being settled goes back to the queue". The bound applies to new callbacks only:
//! a retry, a redelivery or a replayed dead letter is an accepted job and always goes back.
//! Built [`MemoryQueue::durable`], every change is committed to the data directory
//! ([`Store`]) before it is acknowledged, and what the directory holds is queued again at
//! start: a job taken but not settled when the process died comes again, as an unacked
//! broker delivery would.

use super::{DeadLetter, Delivery, JobQueue, QueueError, Settle, Settlement};
use crate::job::Job;
use crate::store::{Committed, JobRecord, JobRow, Store, StoreError, Write};
use async_trait::async_trait;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

struct Envelope {
    seq: i64,
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
    dead: Mutex<Vec<(i64, DeadLetter)>>,
    /// Where every change is committed, when durable.
    store: Option<Store>,
    /// Seqs when not durable (the store hands them out otherwise, unique across lanes).
    seq: AtomicI64,
}

impl fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("depth", &self.depth())
            .field("durable", &self.inner.store.is_some())
            .finish()
    }
}

fn unavailable(e: StoreError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl MemoryQueue {
    /// A queue holding at most `capacity` waiting jobs of `lane` (`chat`, `notify`), in
    /// memory only.
    pub fn new(capacity: usize, lane: &'static str) -> Self {
        Self::build(capacity, lane, None)
    }

    /// A queue as [`MemoryQueue::new`] whose every change is committed to `store`, holding
    /// again the `jobs` the store kept for `lane` (from its snapshot): waiting ones are
    /// queued in their order, ones due for a retry when it is due, dead ones as dead
    /// letters. Must be called within the runtime.
    pub fn durable(capacity: usize, lane: &'static str, store: Store, jobs: Vec<JobRow>) -> Self {
        let q = Self::build(capacity, lane, Some(store));
        let now = crate::now_ms();
        for row in jobs {
            match row.dead {
                Some((reason, at_ms)) => q.inner.dead.lock().unwrap().push((
                    row.seq,
                    DeadLetter {
                        job: row.job,
                        attempts: row.attempt,
                        reason,
                        at_ms,
                    },
                )),
                None if row.due_ms > now => {
                    let delay = Duration::from_millis((row.due_ms - now) as u64);
                    q.push_after(delay, row.seq, row.job, row.attempt);
                }
                None => {
                    let _ = q.push(row.seq, row.job, row.attempt);
                }
            }
        }
        q
    }

    fn build(capacity: usize, lane: &'static str, store: Option<Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(MemoryInner {
                lane,
                capacity,
                depth: AtomicUsize::new(0),
                tx,
                rx: tokio::sync::Mutex::new(rx),
                dead: Mutex::new(Vec::new()),
                store,
                seq: AtomicI64::new(1),
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

    fn next_seq(&self) -> i64 {
        match &self.inner.store {
            Some(store) => store.next_seq(),
            None => self.inner.seq.fetch_add(1, Ordering::SeqCst),
        }
    }

    /// Commits the change `write` builds, when durable (built only then).
    async fn commit(&self, write: impl FnOnce() -> Write) -> Result<(), QueueError> {
        match &self.inner.store {
            Some(store) => store.write(vec![write()]).await.map_err(unavailable),
            None => Ok(()),
        }
    }

    /// A job of this lane as stored, waiting (not dead).
    fn row(&self, seq: i64, job: &Job, attempt: u32, due_ms: i64) -> JobRecord {
        JobRecord::new(seq, self.inner.lane, job, attempt, due_ms, None)
    }

    /// Queues a new job once its place is reserved and `stored` says it is committed;
    /// gives the place back when it is not.
    fn queue_new(
        &self,
        seq: i64,
        job: Job,
        stored: Result<(), StoreError>,
    ) -> Result<(), QueueError> {
        let sent = stored.map_err(unavailable).and_then(|()| {
            let envelope = Envelope {
                seq,
                job,
                attempt: 1,
            };
            self.inner
                .tx
                .send(envelope)
                .map_err(|_| QueueError::Unavailable("closed".into()))
        });
        if sent.is_err() {
            self.inner.depth.fetch_sub(1, Ordering::SeqCst);
        }
        self.record_depth();
        sent
    }

    /// Queues a job that was already accepted (a retry, a redelivery, a replay): never
    /// refused for the bound.
    fn push(&self, seq: i64, job: Job, attempt: u32) -> Result<(), QueueError> {
        self.inner.depth.fetch_add(1, Ordering::SeqCst);
        if self.inner.tx.send(Envelope { seq, job, attempt }).is_err() {
            self.inner.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueError::Unavailable("closed".into()));
        }
        self.record_depth();
        Ok(())
    }

    /// Queues an accepted job after `delay`, unless the queue is gone by then (a durable
    /// queue's store still holds it, and a waiting retry must not keep the store open).
    fn push_after(&self, delay: Duration, seq: i64, job: Job, attempt: u32) {
        let queue = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(inner) = queue.upgrade() else { return };
            if let Err(e) = (MemoryQueue { inner }).push(seq, job, attempt) {
                tracing::error!(error = %e, "embedded queue could not take a retried job back");
            }
        });
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
        let seq = self.next_seq();
        let Some(store) = &self.inner.store else {
            return self.queue_new(seq, job.clone(), Ok(()));
        };
        let committed = store.submit(vec![Write::Job(self.row(seq, job, 1, 0))]);
        Publishing {
            queue: self.clone(),
            seq,
            job: Some(job.clone()),
            committed: Some(committed),
        }
        .finish()
        .await
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
            seq: env.seq,
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
        Ok(self
            .inner
            .dead
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.clone())
            .collect())
    }

    async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError> {
        let taken: Vec<(i64, DeadLetter)> = {
            let mut dead = self.inner.dead.lock().unwrap();
            let (take, keep) = dead
                .drain(..)
                .partition(|(_, d)| id.is_none_or(|id| d.job.id == id));
            *dead = keep;
            take
        };
        let n = taken.len();
        let writes = taken
            .iter()
            .map(|(seq, d)| Write::Job(self.row(*seq, &d.job, 1, 0)))
            .collect();
        if let Some(store) = &self.inner.store
            && let Err(e) = store.write(writes).await
        {
            // Still dead in the store: keep them dead here too.
            self.inner.dead.lock().unwrap().extend(taken);
            return Err(unavailable(e));
        }
        for (seq, d) in taken {
            self.push(seq, d.job, 1)?;
        }
        Ok(n)
    }
}

/// A new job handed to the store and not yet queued. It is queued once committed even if
/// its publisher stops waiting (a cancelled request), so a committed job never waits in
/// the store alone until the next start.
struct Publishing {
    queue: MemoryQueue,
    seq: i64,
    job: Option<Job>,
    committed: Option<Committed>,
}

impl Publishing {
    async fn finish(mut self) -> Result<(), QueueError> {
        let stored = self.committed.as_mut().expect("not finished").await;
        self.committed = None;
        let job = self.job.take().expect("not finished");
        self.queue.queue_new(self.seq, job, stored)
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        if let (Some(committed), Some(job)) = (self.committed.take(), self.job.take()) {
            let (queue, seq) = (self.queue.clone(), self.seq);
            tokio::spawn(async move {
                let _ = queue.queue_new(seq, job, committed.await);
            });
        }
    }
}

/// Settles an embedded delivery; if dropped unsettled (worker shut down or crashed task),
/// the job goes back to the queue, as an unacked broker delivery would.
struct MemorySettle {
    queue: MemoryQueue,
    seq: i64,
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
        let (queue, seq) = (&self.queue, self.seq);
        match settlement {
            Settlement::Ack => queue.commit(|| Write::JobDone { seq }).await,
            Settlement::Retry { delay } => {
                let due_ms = crate::now_ms() + delay.as_millis() as i64;
                // Queued again here whatever the store says: it is not lost while the
                // process lives, and the store still holds it from before.
                let committed = queue
                    .commit(|| Write::Job(queue.row(seq, job, attempt + 1, due_ms)))
                    .await;
                queue.push_after(delay, seq, job.clone(), attempt + 1);
                committed
            }
            Settlement::DeadLetter { reason } => {
                let dead = DeadLetter {
                    job: job.clone(),
                    attempts: attempt,
                    reason,
                    at_ms: crate::now_ms(),
                };
                let why = Some((dead.reason.clone(), dead.at_ms));
                let committed = queue
                    .commit(|| {
                        Write::Job(JobRecord::new(seq, queue.inner.lane, job, attempt, 0, why))
                    })
                    .await;
                queue.inner.dead.lock().unwrap().push((seq, dead));
                committed
            }
        }
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst)
            && let Some(job) = self.job.lock().unwrap().take()
        {
            // Unsettled: same as an unacked broker delivery, it comes again.
            let _ = self.queue.push(self.seq, job, self.attempt);
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

    /// Opens `dir` and the chat lane's durable queue on it, as `parley serve` does at start.
    fn reopen(dir: &std::path::Path) -> MemoryQueue {
        let (store, mut snapshot) = Store::open(dir, false).unwrap();
        let jobs = snapshot.take_jobs("chat");
        MemoryQueue::durable(8, "chat", store, jobs)
    }

    #[tokio::test]
    async fn a_durable_queue_holds_again_what_was_not_settled_when_it_went() {
        let dir = tempfile::tempdir().unwrap();
        let q = reopen(dir.path());
        for id in ["acked", "retried", "dead", "taken", "waiting"] {
            q.publish(&sample_job(id, "hi")).await.unwrap();
        }
        q.next()
            .await
            .unwrap()
            .settle(Settlement::Ack)
            .await
            .unwrap();
        let retry = Settlement::Retry {
            delay: Duration::from_millis(300),
        };
        q.next().await.unwrap().settle(retry).await.unwrap();
        let dead = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        q.next().await.unwrap().settle(dead).await.unwrap();
        let taken = q.next().await.unwrap();
        assert_eq!(taken.job.id, "taken");
        // The process dies: nothing more is settled or written (the unsettled delivery
        // goes back to a queue that is gone).
        drop((q, taken));
        let q = reopen(dir.path());
        let mut first = Vec::new();
        for _ in 0..2 {
            let d = q.next().await.unwrap();
            first.push((d.job.id.clone(), d.attempt));
            d.settle(Settlement::Ack).await.unwrap();
        }
        assert_eq!(
            first,
            [("taken".to_string(), 1), ("waiting".to_string(), 1)],
            "a job taken but not settled comes again, in its order"
        );
        let later = tokio::time::timeout(Duration::from_secs(5), q.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (later.job.id.as_str(), later.attempt),
            ("retried", 2),
            "a retry comes when it is due, with its next attempt"
        );
        let dead = q.dead_letters().await.unwrap();
        assert_eq!((dead.len(), dead[0].reason.as_str()), (1, "poison"));
        assert_eq!(q.replay_dead_letters(None).await.unwrap(), 1);
        drop((q, later));
        let q = reopen(dir.path());
        assert!(q.dead_letters().await.unwrap().is_empty());
        let ids: Vec<_> = [q.next().await.unwrap(), q.next().await.unwrap()]
            .into_iter()
            .map(|d| d.job.id.clone())
            .collect();
        assert_eq!(
            ids,
            ["retried", "dead"],
            "unsettled and replayed jobs are kept"
        );
    }

    #[tokio::test]
    async fn a_publish_given_up_on_while_it_commits_still_queues_its_job() {
        let dir = tempfile::tempdir().unwrap();
        let q = reopen(dir.path());
        // Polled once (handed to the store), then dropped, as a cancelled request would be.
        let job = sample_job("a", "hi");
        let polled_once = futures::FutureExt::now_or_never(q.publish(&job));
        assert!(polled_once.is_none(), "still committing when given up on");
        let d = tokio::time::timeout(Duration::from_secs(5), q.next())
            .await
            .expect("the job is queued")
            .unwrap();
        assert_eq!(d.job.id, "a");
        d.settle(Settlement::Ack).await.unwrap();
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn dropped_delivery_returns_to_the_queue() {
        let q = MemoryQueue::new(4, "chat");
        q.publish(&sample_job("a", "hi")).await.unwrap();
        drop(q.next().await.unwrap());
        assert_eq!(q.next().await.unwrap().job.id, "a");
    }
}
