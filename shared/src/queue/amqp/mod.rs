//! The RabbitMQ backend of the job-queue seam, on lapin 4, split by concern:
//! `topology` (the queues, exchanges and arguments, where a job goes, upgrading),
//! `headers` (message properties and our headers), `publish` (confirms), `shards`
//! (consuming with order per conversation, spreading shards over workers), `settle`
//! (ack, retry, dead-letter, return), `dead` (listing and replaying dead letters) and
//! `connection` (the supervisor that connects, reconnects and starts over). This file holds
//! the queue itself and the state those share. The URL is a secret: it and its password are
//! scrubbed from every message this module logs or returns.

mod connection;
mod dead;
mod headers;
mod publish;
mod settle;
mod shards;
mod topology;

pub use headers::{ATTEMPT_HEADER, DEAD_AT_HEADER, REASON_HEADER};
pub use shards::REBALANCE_EVERY;
pub use topology::{DELIVERY_LIMIT, DeclaredNames, declared_names, shard_of};

use super::{DeadLetter, Delivery, JobQueue, QueueError, RETRY_TIERS_SECS, Settle, Settlement};
use crate::config::{ConfigError, MAX_SHARDS, QueueSettings};
use crate::job::Job;
use crate::secret::Scrubber;
use async_trait::async_trait;
use connection::supervise;
use headers::job_properties;
use lapin::uri::AMQPUri;
use lapin::{Acker, Channel, Connection};
use rand::Rng;
use settle::AmqpSettle;
use shards::InFlight;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::Topology;

/// Heartbeat asked for unless the URL sets one: a dead peer is noticed within ~2 × this.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Queue names are AMQP short strings (255 bytes); leave room for the suffixes.
const MAX_PREFIX_BYTES: usize = 200;

/// The RabbitMQ job queue; cheap to clone, all clones share one connection. The connection
/// is closed when [`AmqpQueue::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
    handle: Arc<Handle>,
}

/// Stops the supervisor when the last `AmqpQueue` clone goes away.
struct Handle {
    stop: CancellationToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Inner {
    topology: Topology,
    confirm_timeout: Duration,
    prefetch: u16,
    /// False for a publish-only process (the ingress role): it must not take deliveries
    /// it will never work on.
    consume: bool,
    connection_name: String,
    /// Random per instance; starts its consumer tags, so an operator can tell processes apart.
    instance: String,
    scrub: Scrubber,
    /// The live connection, if any.
    link: RwLock<Option<Arc<Link>>>,
    /// Generation of the live (or last) connection; deliveries of older ones are stale.
    generation: AtomicU64,
    ready: AtomicBool,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
}

/// One connection and its shared channels (each shard consumer has a channel of its own).
struct Link {
    generation: u64,
    connection: Connection,
    /// Confirm-mode channel for every publish.
    publisher: Channel,
    /// Held while a publish numbers itself and queues its frames: the first, synchronous
    /// poll of `basic_publish` (never while the frames are written or the confirm awaited).
    publish_order: Mutex<()>,
    /// Declarations, the presence subscription and counting the workers.
    admin: Channel,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
            && [&self.publisher, &self.admin]
                .iter()
                .all(|c| c.status().connected())
    }
}

/// A decoded delivery on its way from a shard consumer to [`JobQueue::next`].
struct Incoming {
    generation: u64,
    job: Job,
    attempt: u32,
    /// Delivery tag: grows in delivery order on the shard's channel.
    tag: u64,
    acker: Acker,
    in_flight: InFlight,
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("shards", &self.inner.topology.shards.len())
            .field("instance", &self.inner.instance)
            .field("ready", &self.is_ready())
            .field("generation", &self.inner.generation.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl AmqpQueue {
    /// Starts the queue with the standard retry tiers ([`RETRY_TIERS_SECS`]) and returns at
    /// once: the connection is made in the background, so a broker that is down at start is
    /// only a not-ready queue. `prefetch` is how many deliveries may be unsettled at once
    /// (the worker's `max_concurrency`). Needs a Tokio runtime. Fails only on settings that
    /// can never work (no or malformed URL, bad prefix or shard count, zero prefetch).
    /// A consuming queue subscribes to every shard, each with `prefetch` as its `basic.qos`
    /// (a shard is this process's alone while it works it), and works the shards it is the
    /// active consumer of.
    pub fn start(settings: &QueueSettings, prefetch: u16) -> Result<Self, ConfigError> {
        Self::start_with_tiers(settings, prefetch, &RETRY_TIERS_SECS)
    }

    /// Like [`AmqpQueue::start`] with other retry delays (seconds, ascending; one delay
    /// queue each), e.g. from configuration or a test's short tiers. Every process sharing a
    /// prefix must use the same list: a retry goes to the shortest tier at least as long as
    /// the delay asked for, else the longest.
    pub fn start_with_tiers(
        settings: &QueueSettings,
        prefetch: u16,
        tiers: &[u64],
    ) -> Result<Self, ConfigError> {
        Self::build(settings, prefetch, tiers, true)
    }

    /// A publish-only queue for the ingress role: declares the topology and publishes, but
    /// never consumes (deliveries taken by a process that does not work on them would sit
    /// unacknowledged until it exits).
    pub fn publisher(settings: &QueueSettings, tiers: &[u64]) -> Result<Self, ConfigError> {
        Self::build(settings, 1, tiers, false)
    }

    fn build(
        settings: &QueueSettings,
        prefetch: u16,
        tiers: &[u64],
        consume: bool,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError {
            key: format!("queue.{key}"),
            problem,
        };
        let url = settings
            .url
            .as_ref()
            .ok_or_else(|| invalid("url", "is needed for the RabbitMQ backend".into()))?;
        let mut scrub = Scrubber::for_url(url);
        let mut uri = AMQPUri::from_str(url.expose())
            .map_err(|e| invalid("url", format!("not a valid AMQP URL ({})", scrub.clean(e))))?;
        scrub.add(&uri.authority.userinfo.password);
        // RabbitMQ proposes 60 s, so a silently dead peer would go unnoticed for two
        // minutes; `?heartbeat=N` in the URL still wins.
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        let prefix = &settings.prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_BYTES
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(invalid(
                "prefix",
                format!(
                    "must be 1–{MAX_PREFIX_BYTES} characters of letters, digits, '.', '-', '_', ':'"
                ),
            ));
        }
        if tiers.is_empty() || tiers[0] == 0 || !tiers.windows(2).all(|w| w[0] < w[1]) {
            return Err(invalid(
                "retry_delays_secs",
                "must be non-empty, positive and ascending".into(),
            ));
        }
        if !(1..=MAX_SHARDS).contains(&settings.shards) {
            return Err(invalid(
                "shards",
                format!("must be between 1 and {MAX_SHARDS}"),
            ));
        }
        if prefetch == 0 {
            return Err(invalid("prefetch", "must be at least 1".into()));
        }
        let (tx, rx) = mpsc::channel(usize::from(prefetch));
        let inner = Arc::new(Inner {
            topology: Topology::new(prefix, settings.shards, tiers),
            confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
            prefetch,
            consume,
            connection_name: format!("parley {prefix}"),
            instance: format!("{:08x}", rand::rng().random::<u32>()),
            scrub,
            link: RwLock::new(None),
            generation: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            deliveries: tokio::sync::Mutex::new(rx),
        });
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(inner.clone(), uri, tx, stop.clone()));
        Ok(Self {
            inner,
            handle: Arc::new(Handle {
                stop,
                supervisor: Mutex::new(Some(supervisor)),
            }),
        })
    }

    /// Waits until the queue is connected, at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops reconnecting and closes the connection; deliveries not yet settled go back to
    /// the queue (the broker requeues them). Call it after the worker has drained.
    pub async fn close(&self) {
        self.handle.stop.cancel();
        let supervisor = self
            .handle
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = supervisor {
            let _ = task.await;
        }
    }

    /// Every queue this instance declares: the shards in order, dead, workers, then the
    /// retry tiers (each also names the tier's exchange, which goes away with its queue).
    pub fn queue_names(&self) -> Vec<String> {
        self.inner.topology.names().queues
    }

    /// The shard queue a job goes to.
    pub fn shard_queue(&self, job: &Job) -> &str {
        self.inner.topology.shard_queue(job)
    }
}

#[async_trait]
impl JobQueue for AmqpQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let shard = self.inner.topology.shard_queue(job);
        self.inner
            .publish_confirmed("", shard, &job.to_bytes(), job_properties(&job.id, 1))
            .await
    }

    async fn next(&self) -> Result<Delivery, QueueError> {
        // Cancel-safe: nothing is taken off the channel unless it is returned in full.
        let mut deliveries = self.inner.deliveries.lock().await;
        loop {
            let incoming = deliveries
                .recv()
                .await
                .ok_or_else(|| QueueError::Unavailable("the queue was closed".into()))?;
            let settler = AmqpSettle {
                inner: self.inner.clone(),
                generation: incoming.generation,
                tag: incoming.tag,
                acker: incoming.acker,
                settled: false,
                in_flight: Some(incoming.in_flight),
            };
            if incoming.generation != self.inner.generation.load(Ordering::Acquire) {
                // Taken on a connection that is gone: the broker delivers it again.
                continue;
            }
            return Ok(Delivery::new(
                incoming.job,
                incoming.attempt,
                Box::new(settler),
            ));
        }
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner.list_dead_letters().await
    }

    async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError> {
        self.inner.replay_dead_letters(id).await
    }
}

impl Inner {
    fn link(&self) -> Result<Arc<Link>, QueueError> {
        self.link
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| QueueError::Unavailable("not connected to RabbitMQ".into()))
    }

    fn install(&self, link: Arc<Link>) {
        self.generation.store(link.generation, Ordering::Release);
        *self.link.write().unwrap_or_else(PoisonError::into_inner) = Some(link);
        self.ready.store(true, Ordering::Release);
    }

    /// Forgets the link; deliveries taken on it become stale at once.
    fn uninstall(&self) {
        self.ready.store(false, Ordering::Release);
        *self.link.write().unwrap_or_else(PoisonError::into_inner) = None;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn unavailable(&self, what: &str, e: impl fmt::Display) -> QueueError {
        QueueError::Unavailable(format!("{what}: {}", self.scrub.clean(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[tokio::test]
    async fn settings_that_can_never_work_are_refused_without_echoing_the_url() {
        let mut s = QueueSettings::default();
        let err = AmqpQueue::start(&s, 4).unwrap_err();
        assert_eq!(err.key, "queue.url");
        s.url = Some(Secret::new("amqp//hunter2@nowhere"));
        let err = AmqpQueue::start(&s, 4).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        s.url = Some(Secret::new("amqp://127.0.0.1:1/%2f"));
        s.prefix = "has space".into();
        assert_eq!(AmqpQueue::start(&s, 4).unwrap_err().key, "queue.prefix");
        s.prefix = "ok".into();
        assert_eq!(AmqpQueue::start(&s, 0).unwrap_err().key, "queue.prefetch");
        s.shards = 0;
        assert_eq!(AmqpQueue::start(&s, 1).unwrap_err().key, "queue.shards");
        s.shards = 1;
        let err = AmqpQueue::start_with_tiers(&s, 1, &[5, 5]).unwrap_err();
        assert_eq!(err.key, "queue.retry_delays_secs");
    }
}
