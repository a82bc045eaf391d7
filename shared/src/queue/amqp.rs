//! The RabbitMQ backend of the job-queue seam, on lapin 4.
//!
//! **Topology** (every name starts with `[queue].prefix`, declared idempotently on every
//! connect). Jobs live in `[queue].shards` (N) *shard queues* `{prefix}.jobs.0` …
//! `{prefix}.jobs.{N-1}`: durable *quorum* queues — replicated, so a job the ingress was told
//! is safe survives the loss of a broker node, and counting redeliveries, so a message that
//! keeps killing its consumer is dead-lettered by the broker after [`DELIVERY_LIMIT`] instead
//! of looping forever — with *single active consumer* (see **Order**). The limit and the
//! dead-letter target are set explicitly because RabbitMQ 3.10 has no default limit while
//! 3.13/4.x default to 20, and dead-lettering is `at-least-once` (which needs
//! `x-overflow: reject-publish`) so nothing is dropped on the way. Delayed retries use one
//! quorum queue per delay tier, `{prefix}.delay.{secs}s`, with a queue-wide `x-message-ttl`,
//! fed by a fanout exchange of the same name: a retry is published to the tier's exchange
//! *with its shard queue's name as routing key*, and the tier queue dead-letters expired
//! messages to the default exchange *without* `x-dead-letter-routing-key`, so the broker
//! routes each one by the key it was published with — back into its own shard. (The
//! delayed-message plugin is often unavailable, and a queue expires messages only from its
//! head, so mixing delays in one queue would hold short delays behind long ones.) The tier
//! exchanges are auto-delete: deleting a tier queue also removes its exchange, so a retry
//! then fails loudly, the connection starts over and re-declares both. Given-up jobs go to
//! `{prefix}.dead`, a durable *classic* queue: it is read by `basic.get` and put back by
//! requeueing, which keeps a classic queue's order and never trips a delivery limit, whereas
//! a quorum queue would reorder it and (on 4.x) eventually drop a letter that was merely
//! listed twenty times. `{prefix}.workers` is an always-empty classic queue every consuming
//! process subscribes to: its consumer count is the number of workers, used to balance shards.
//!
//! **Messages** are persistent JSON with `message_id` = job id and the attempt number in the
//! [`ATTEMPT_HEADER`] header; a retry or a dead letter is a *new* message (published with a
//! confirm, then the original is acked), never a broker dead-letter cycle, so the attempt
//! count is ours and the broker's cycle detection never drops a retry.
//!
//! **Order.** The publisher puts a job in shard [`shard_of`]`(job.conversation_key)`, a fixed
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
//! **Publishing** waits for the publisher confirm, at most `confirm_timeout_ms`. Every publish
//! is `mandatory`: a message no queue took is confirmed with an *ack plus a returned message*,
//! so an ack alone proves nothing and a return counts as a failure. Many publishes share one
//! confirm channel and are in flight together; only the hand-over of the frames is
//! serialised (lapin numbers a publish before it queues its frames, and two tasks racing
//! there would get each other's confirms), never the wait for the confirm.
//!
//! **Consuming**: the shard consumers feed one bounded channel, so [`JobQueue::next`] is
//! cancel-safe. A payload that is not a job is moved to the dead letters at once (and
//! acked); a delivery dropped unsettled is nacked with requeue, as the embedded queue pushes
//! it back.
//!
//! **Connection**: a supervisor task connects with jittered exponential backoff (so start-up
//! never fails because the broker is down), declares the topology, and after any loss of the
//! connection or a channel starts over with a fresh connection; [`JobQueue::is_ready`] is
//! false in between (and while the broker blocks publishers); a 10 s heartbeat (unless the
//! URL sets one) notices a peer that vanished without closing the socket. Deliveries taken before a
//! reconnect cannot be acked any more: settling them fails, the broker delivers them again,
//! and the worker's answered-marker absorbs the repeat. A connection is closed *before* its
//! consumers are dropped (dropping one sends `basic.cancel`, see above). The URL is a secret:
//! it and its password are scrubbed from every message this module logs or returns.
//!
//! **Upgrading** from the single `{prefix}.jobs` queue: RabbitMQ refuses to re-declare a
//! queue with other arguments, so this layout uses new names only (`{prefix}.jobs.{i}`,
//! `{prefix}.delay.{secs}s`, `{prefix}.workers`) and never touches the old `{prefix}.jobs`
//! and `{prefix}.retry.{secs}s`, which no new process reads. Either drain them first (stop
//! the old ingresses, let old workers empty `{prefix}.jobs` and the retry queues, which
//! dead-letter into it, then deploy), or move what is left into `{prefix}.dead` (e.g. a
//! shovel or the management UI's "move messages") and run `parley dlq replay --all`, which
//! puts each job into its shard; then delete the old queues. Changing `shards` later moves
//! conversations between shards: do it with the ingresses stopped and the shards drained
//! (shard queues above the new N are no longer read), or accept that messages of a
//! conversation in flight during the change may be answered out of order.

use super::{DeadLetter, Delivery, JobQueue, QueueError, RETRY_TIERS_SECS, Settle, Settlement};
use crate::config::{ConfigError, MAX_SHARDS, QueueSettings};
use crate::job::Job;
use crate::secret::Secret;
use async_trait::async_trait;
use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    Event, ExchangeKind,
};
use rand::Rng;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// Header with the attempt number of a job message: 1 for the first delivery, +1 per retry.
pub const ATTEMPT_HEADER: &str = "parley-attempt";
/// Header of a dead letter: why the job was given up.
pub const REASON_HEADER: &str = "parley-reason";
/// Header of a dead letter: when it was given up (ms since epoch).
pub const DEAD_AT_HEADER: &str = "parley-dead-at-ms";
/// Deliveries of one message (redeliveries after crashes, shutdowns, reconnects, shard
/// hand-overs) before the broker dead-letters it by itself. Retries do not count: each retry
/// is a new message.
pub const DELIVERY_LIMIT: i64 = 20;
/// How often a worker compares the shards it works with its fair share and hands extra ones
/// over.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(2);

/// Heartbeat asked for unless the URL sets one: a dead peer is noticed within ~2 × this.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// First wait before reconnecting; doubles per failed attempt up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Longest a connect plus topology declaration may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor looks at the connection and channel states.
const HEALTH_TICK: Duration = Duration::from_millis(500);
/// Longest a graceful connection close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest listing or replaying the dead letters may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest counting the workers may take; a slower answer skips that rebalancing round.
const COUNT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a shard being handed over looks whether its jobs have finished.
const HAND_OVER_POLL: Duration = Duration::from_millis(20);
/// Deliveries dropped unsettled within this long of each other go back in one batch, in
/// the order they came.
const RETURN_GATHER: Duration = Duration::from_millis(10);
/// Reasons longer than this are cut (they travel in a header frame).
const MAX_REASON_BYTES: usize = 1024;
/// Queue names are AMQP short strings (255 bytes); leave room for the suffixes.
const MAX_PREFIX_BYTES: usize = 200;

/// The shard (`0..shards`) of a conversation: the 64-bit FNV-1a hash of the key's UTF-8
/// bytes, mixed with MurmurHash3's `fmix64` finaliser (FNV-1a's low bits depend only on the
/// low bits of the input bytes, and a small modulus reads little else), modulo `shards`.
/// This is part of the wire contract: every process of a deployment, whatever its release,
/// must compute the same shard, so it never changes (and never uses a per-process seed).
pub fn shard_of(conversation_key: &str, shards: u16) -> u16 {
    let h = fmix64(fnv1a64(conversation_key.as_bytes()));
    // The remainder is below `shards`, so it fits.
    (h % u64::from(shards.max(1))) as u16
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

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

/// This process's consumer of one shard queue, shared by its task, its deliveries and the
/// rebalancer.
struct ShardSlot {
    index: usize,
    queue: String,
    /// Deliveries taken from the current consumer and not yet settled or dropped.
    in_flight: AtomicUsize,
    /// The current consumer got a delivery, so it is the shard's single active consumer (and
    /// stays so until its channel closes).
    active: AtomicBool,
    /// Set by the rebalancer: hand the shard to the next waiting consumer.
    releasing: AtomicBool,
    wake: Notify,
    /// Deliveries dropped unsettled, about to be returned (see [`return_dropped`]).
    returns: Mutex<Vec<Dropped>>,
}

/// A delivery dropped unsettled, to be returned to its queue.
struct Dropped {
    tag: u64,
    acker: Acker,
    _in_flight: InFlight,
}

impl ShardSlot {
    fn new(index: usize, queue: String) -> Self {
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
struct InFlight(Arc<ShardSlot>);

impl InFlight {
    fn new(slot: &Arc<ShardSlot>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(slot.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Names of the queues (and tier exchanges) of one deployment.
#[derive(Debug, Clone)]
struct Topology {
    /// Shard queues, by shard number.
    shards: Vec<String>,
    dead: String,
    /// Presence queue: its consumer count is the number of workers.
    workers: String,
    /// (delay in seconds, name of the tier's queue and of its fanout exchange), shortest first.
    tiers: Vec<(u64, String)>,
}

impl Topology {
    fn new(prefix: &str, shards: u16, tiers: &[u64]) -> Self {
        Self {
            shards: (0..shards).map(|i| format!("{prefix}.jobs.{i}")).collect(),
            dead: format!("{prefix}.dead"),
            workers: format!("{prefix}.workers"),
            tiers: tiers
                .iter()
                .map(|s| (*s, format!("{prefix}.delay.{s}s")))
                .collect(),
        }
    }

    /// The shard queue of `job`.
    fn shard_queue(&self, job: &Job) -> &str {
        let n = u16::try_from(self.shards.len()).unwrap_or(u16::MAX);
        &self.shards[usize::from(shard_of(&job.conversation_key, n))]
    }

    /// The retry tier for `delay`: the shortest at least as long, else the longest.
    fn retry_tier(&self, delay: Duration) -> &str {
        let i = self
            .tiers
            .iter()
            .position(|(s, _)| Duration::from_secs(*s) >= delay)
            .unwrap_or(self.tiers.len() - 1);
        &self.tiers[i].1
    }
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
        let t = &self.inner.topology;
        t.shards
            .iter()
            .chain([&t.dead, &t.workers])
            .chain(t.tiers.iter().map(|(_, name)| name))
            .cloned()
            .collect()
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
        let walk = self.inner.walk_dead_letters("listing dead letters").await?;
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

    async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, QueueError> {
        let inner = &self.inner;
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

/// One pass over the dead queue on a short-lived channel: every message is taken with
/// `basic.get` and stays unacked unless the caller acks it, so closing the channel (or
/// dropping the walk) puts the rest back, in their order.
struct DeadWalk<'a> {
    inner: &'a Inner,
    channel: Channel,
    what: &'static str,
    deadline: tokio::time::Instant,
}

impl DeadWalk<'_> {
    async fn next(&self) -> Result<Option<AmqpDelivery>, QueueError> {
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

    async fn close(self) {
        close_quietly(&self.channel).await;
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

    /// Starts a pass over the dead letters; `what` names it in errors.
    async fn walk_dead_letters(&self, what: &'static str) -> Result<DeadWalk<'_>, QueueError> {
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

    /// Publishes to `exchange` (`""`: the default exchange, which routes to the queue named
    /// `routing_key`) and waits for the confirm, at most `confirm_timeout`. Ok only for an
    /// ack without a returned message.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        let link = self.link()?;
        let confirmed = async {
            let mut publish = std::pin::pin!(link.publisher.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                properties,
            ));
            // lapin numbers a publish and queues its frames in the first poll, before its
            // first await (the hand-over of the frames to its I/O thread): only that poll
            // is serialised, so publishes from many tasks never wait for each other's
            // frames to be written and the I/O thread writes them in batches.
            let first = std::future::poll_fn(|cx| {
                let _order = link
                    .publish_order
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                std::task::Poll::Ready(publish.as_mut().poll(cx))
            })
            .await;
            let pending = match first {
                std::task::Poll::Ready(handed_over) => handed_over,
                std::task::Poll::Pending => publish.await,
            }
            .map_err(|e| self.unavailable("publish", e))?;
            pending
                .await
                .map_err(|e| self.unavailable("publish confirm", e))
        };
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirmed)
            .await
            .map_err(|_| QueueError::ConfirmTimeout)??;
        let target = || {
            if exchange.is_empty() {
                routing_key.to_string()
            } else {
                format!("exchange {exchange} (key {routing_key})")
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                let returned_id = returned.delivery.properties.message_id().clone();
                tracing::warn!(
                    target = %target(),
                    returned_id = ?returned_id.as_ref().map(ShortString::as_str),
                    "the broker returned a message: no queue took it"
                );
                Err(QueueError::Unavailable(format!(
                    "the broker could not route the message to {} ({} {})",
                    target(),
                    returned.reply_code,
                    returned.reply_text
                )))
            }
            Confirmation::Nack(_) => Err(QueueError::Unavailable(format!(
                "the broker refused the message for {} (nack)",
                target()
            ))),
            Confirmation::NotRequested => Err(QueueError::Unavailable(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }
}

/// Settles a broker delivery. Dropped unsettled (or after a failed settle), it nacks with
/// requeue, so the job comes again — as an embedded delivery is pushed back.
struct AmqpSettle {
    inner: Arc<Inner>,
    generation: u64,
    tag: u64,
    acker: Acker,
    settled: bool,
    /// Keeps the shard from being handed over until this delivery is settled or returned.
    in_flight: Option<InFlight>,
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

const STALE: &str =
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
async fn return_dropped(slot: Arc<ShardSlot>) {
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

async fn ack(acker: &Acker, scrub: &Scrubber) -> Result<(), QueueError> {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Unavailable(STALE.into())),
        Err(e) => Err(QueueError::Unavailable(format!(
            "ack failed ({}); the broker will deliver it again",
            scrub.clean(e)
        ))),
    }
}

async fn close_quietly(channel: &Channel) {
    let closing = channel.close(200, "done".into());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(error = %e, "closing a side channel failed");
    }
}

// ---------------------------------------------------------------------------------------
// Supervisor

/// Connects, runs until the connection is lost, and starts over, until `stop`.
async fn supervise(
    inner: Arc<Inner>,
    uri: AMQPUri,
    tx: mpsc::Sender<Incoming>,
    stop: CancellationToken,
) {
    let target = format!(
        "{}:{} vhost {:?}",
        uri.authority.host, uri.authority.port, uri.vhost
    );
    let mut delay = RECONNECT_MIN;
    let mut failures = 0u32;
    loop {
        let opened = tokio::select! {
            opened = tokio::time::timeout(CONNECT_TIMEOUT, open(&inner, &uri, &tx)) => opened,
            _ = stop.cancelled() => break,
        };
        match opened {
            Ok(Ok(mut session)) => {
                if failures > 0 {
                    tracing::info!(broker = %target, failures, "connected to RabbitMQ");
                } else {
                    tracing::info!(broker = %target, "connected to RabbitMQ");
                }
                failures = 0;
                let connected_at = tokio::time::Instant::now();
                let lost = session.run(&inner, &stop).await;
                session.end(&inner).await;
                // A connection that dies at once again and again keeps backing off.
                if connected_at.elapsed() >= STABLE_AFTER {
                    delay = RECONNECT_MIN;
                }
                match lost {
                    Some(reason) => tracing::warn!(
                        broker = %target,
                        reason = %inner.scrub.clean(reason),
                        "lost the RabbitMQ connection; reconnecting"
                    ),
                    None => break,
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                log_connect_failure(&target, failures, &inner.scrub.clean(e));
            }
            Err(_) => {
                failures += 1;
                log_connect_failure(&target, failures, "timed out");
            }
        }
        let wait = jitter(delay);
        delay = (delay * 2).min(RECONNECT_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
    inner.uninstall();
    tracing::info!(broker = %target, "RabbitMQ queue stopped");
}

fn log_connect_failure(target: &str, failures: u32, error: &str) {
    // First failure and then every tenth: a broker down for an hour is not 7,000 lines.
    if failures == 1 || failures.is_multiple_of(10) {
        tracing::warn!(broker = %target, failures, error, "cannot connect to RabbitMQ; retrying");
    } else {
        tracing::debug!(broker = %target, failures, error, "cannot connect to RabbitMQ; retrying");
    }
}

/// ±20 % so replicas that lost the broker together do not return in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// A live connection with its shard consumers.
struct Session {
    link: Arc<Link>,
    events: futures::stream::BoxStream<'static, Event>,
    /// This process's consumer of each shard; empty when publish-only.
    shards: Vec<Arc<ShardSlot>>,
    /// One task per shard; one that ends means the connection is no longer usable.
    consumers: JoinSet<ShardLost>,
    /// Consumers of shard tasks that ended, kept until the connection is closed.
    parked: Vec<Consumer>,
    /// The subscription to the presence queue that makes this process count as a worker.
    presence: Option<Consumer>,
}

/// Connects, declares the topology, opens the channels, installs the link and starts
/// consuming.
async fn open(
    inner: &Arc<Inner>,
    uri: &AMQPUri,
    tx: &mpsc::Sender<Incoming>,
) -> lapin::Result<Session> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(inner.connection_name.as_str()));
    let connection = Connection::connect_uri(uri.clone(), properties).await?;
    let events = connection.events_listener().boxed();
    let admin = connection.create_channel().await?;
    declare(&admin, &inner.topology).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let presence = if inner.consume {
        let tag = format!("parley-{}-presence", inner.instance);
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let workers = inner.topology.workers.as_str();
        match admin
            .basic_consume(workers.into(), tag.into(), options, FieldTable::default())
            .await
        {
            Ok(consumer) => Some(consumer),
            Err(e) => {
                let _ = connection.close(200, "bye".into()).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let generation = inner.generation.load(Ordering::Acquire) + 1;
    let link = Arc::new(Link {
        generation,
        connection,
        publisher,
        publish_order: Mutex::new(()),
        admin,
    });
    // Installed before consuming, so no delivery of this connection is ever taken for stale.
    inner.install(link.clone());
    let mut session = Session {
        link,
        events,
        shards: Vec::new(),
        consumers: JoinSet::new(),
        parked: Vec::new(),
        presence,
    };
    if inner.consume {
        for (index, queue) in inner.topology.shards.iter().enumerate() {
            let slot = Arc::new(ShardSlot::new(index, queue.clone()));
            session.shards.push(slot.clone());
            let task = work_shard(inner.clone(), session.link.clone(), slot, tx.clone());
            session.consumers.spawn(task);
        }
    }
    Ok(session)
}

impl Session {
    /// Waits until the connection is lost (`Some(reason)`) or `stop` fires (`None`);
    /// rebalances the shards meanwhile.
    async fn run(&mut self, inner: &Inner, stop: &CancellationToken) -> Option<String> {
        let mut tick = tokio::time::interval(HEALTH_TICK);
        let mut balance_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + REBALANCE_EVERY,
            REBALANCE_EVERY,
        );
        balance_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consuming = !self.shards.is_empty();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                event = self.events.next() => match event {
                    Some(Event::Error(e)) => return Some(format!("connection error: {e}")),
                    Some(Event::ConnectionBlocked(why)) => {
                        inner.ready.store(false, Ordering::Release);
                        tracing::warn!(reason = %why, "RabbitMQ blocks publishing (resource alarm)");
                    }
                    Some(Event::ConnectionUnblocked) => {
                        inner.ready.store(true, Ordering::Release);
                        tracing::info!("RabbitMQ unblocked publishing");
                    }
                    Some(_) => {}
                    None => return Some("connection events ended".into()),
                },
                ended = self.consumers.join_next(), if consuming => {
                    return Some(match ended {
                        Some(Ok(lost)) => {
                            self.parked.extend(lost.consumer);
                            lost.reason
                        }
                        Some(Err(e)) => format!("a shard consumer task failed: {e}"),
                        None => "no shard consumers left".into(),
                    });
                }
                message = next_presence(&mut self.presence) => {
                    if message.is_none() {
                        return Some("the broker cancelled the presence subscription".into());
                    }
                }
                _ = tick.tick() => {
                    if !self.link.healthy() {
                        return Some("the connection or one of its channels closed".into());
                    }
                }
                _ = balance_tick.tick(), if consuming => {
                    if let Err(reason) = rebalance(inner, &self.link, &self.shards).await {
                        return Some(reason);
                    }
                }
            }
        }
    }
}

/// Hands over the shards this process works beyond its fair share.
async fn rebalance(inner: &Inner, link: &Link, shards: &[Arc<ShardSlot>]) -> Result<(), String> {
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

impl Session {
    /// Marks the queue not ready and closes the connection, which returns its unacked
    /// deliveries; only then drops the consumers (dropping a live one would cancel it, and
    /// the next worker would get newer jobs before those returned).
    async fn end(mut self, inner: &Inner) {
        inner.uninstall();
        close_connection(&self.link).await;
        self.consumers.shutdown().await;
        self.parked.clear();
        drop(self.presence.take());
    }
}

/// The next message of the presence subscription (there should be none); pending forever
/// when there is no subscription. `None` when the broker cancelled it.
async fn next_presence(presence: &mut Option<Consumer>) -> Option<()> {
    match presence {
        Some(consumer) => consumer.next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Which of the `held` shards (index, deliveries in flight) to hand over so that this
/// process works at most `ceil(shards / workers)`; the least busy first, so the hand-over
/// waits for as little as possible.
fn shards_to_release(held: &[(usize, usize)], shards: usize, workers: u32) -> Vec<usize> {
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

async fn close_connection(link: &Link) {
    let closing = link.connection.close(200, "bye".into());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(error = %e, "closing the RabbitMQ connection failed");
    }
}

/// Declares every queue, tier exchange and binding; idempotent while the arguments stay
/// the same.
async fn declare(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(t.dead.as_str().into(), durable, classic_arguments())
        .await?;
    channel
        .queue_declare(t.workers.as_str().into(), durable, classic_arguments())
        .await?;
    for shard in &t.shards {
        channel
            .queue_declare(shard.as_str().into(), durable, shard_arguments(&t.dead))
            .await?;
    }
    let exchange = ExchangeDeclareOptions {
        durable: true,
        auto_delete: true,
        ..ExchangeDeclareOptions::default()
    };
    for (secs, name) in &t.tiers {
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                exchange,
                FieldTable::default(),
            )
            .await?;
        let arguments = retry_arguments(Duration::from_secs(*secs));
        channel
            .queue_declare(name.as_str().into(), durable, arguments)
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Why a shard task ended, with its consumer if it still has one: dropping a live consumer
/// cancels it, so the session drops it only after closing the connection.
struct ShardLost {
    reason: String,
    consumer: Option<Consumer>,
}

/// This process's consumer of one shard, until the connection is lost: feeds its
/// deliveries to the queue's channel and, when the rebalancer asks, hands the shard over
/// and subscribes again at the back of the line.
async fn work_shard(
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
async fn subscribe(
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
async fn forward(
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
async fn bury(inner: Arc<Inner>, delivery: AmqpDelivery, problem: String, _in_flight: InFlight) {
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

// ---------------------------------------------------------------------------------------
// Arguments, properties, headers

const JSON: &str = "application/json";

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

/// Arguments every quorum queue here shares: dead-letter through the default exchange, at
/// least once (which needs `reject-publish` overflow).
fn quorum_arguments() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]
}

/// A shard: one active consumer at a time; dead-letters to `dead` after the delivery limit.
fn shard_arguments(dead: &str) -> FieldTable {
    let mut args = quorum_arguments();
    args.push(("x-dead-letter-routing-key", text(dead)));
    args.push(("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)));
    args.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    table(args)
}

/// A delay tier: expired messages are dead-lettered with the routing key they were
/// published with (no `x-dead-letter-routing-key`), i.e. into their shard.
fn retry_arguments(delay: Duration) -> FieldTable {
    let ttl_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut args = quorum_arguments();
    args.push(("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)));
    table(args)
}

/// The dead and presence queues.
fn classic_arguments() -> FieldTable {
    // Explicit, because a 4.x vhost may default new queues to quorum.
    table(vec![("x-queue-type", text("classic"))])
}

fn message_properties(
    message_id: Option<&str>,
    content_type: &str,
    headers: FieldTable,
) -> BasicProperties {
    let now_secs = u64::try_from(crate::now_ms() / 1000).unwrap_or(0);
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::try_new(content_type).unwrap_or_else(|_| JSON.into()))
        .with_timestamp(now_secs)
        .with_headers(headers);
    // A message id longer than a short string is left out rather than failing the publish.
    if let Some(id) = message_id.and_then(|id| ShortString::try_new(id).ok()) {
        p = p.with_message_id(id);
    }
    p
}

fn job_properties(job_id: &str, attempt: u32) -> BasicProperties {
    let headers = table(vec![(
        ATTEMPT_HEADER,
        AMQPValue::LongLongInt(attempt.into()),
    )]);
    message_properties(Some(job_id), JSON, headers)
}

fn dead_headers(attempt: u32, reason: &str, at_ms: i64) -> FieldTable {
    table(vec![
        (ATTEMPT_HEADER, AMQPValue::LongLongInt(attempt.into())),
        (REASON_HEADER, text(truncate(reason, MAX_REASON_BYTES))),
        (DEAD_AT_HEADER, AMQPValue::LongLongInt(at_ms)),
    ])
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

fn as_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The attempt number of a message; 1 when absent or nonsense.
fn attempt_of(p: &BasicProperties) -> u32 {
    header(p, ATTEMPT_HEADER)
        .and_then(as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Rebuilds a dead letter from a message of the dead queue: ours carry the reason headers;
/// one the broker dead-lettered (delivery limit) carries `x-death` instead.
fn dead_letter_of(delivery: &AmqpDelivery) -> Option<DeadLetter> {
    let job = Job::from_bytes(&delivery.data).ok()?;
    let p = &delivery.properties;
    let reason = header(p, REASON_HEADER)
        .and_then(as_text)
        .or_else(|| {
            header(p, "x-first-death-reason")
                .and_then(as_text)
                .map(|why| format!("dead-lettered by the broker ({why})"))
        })
        .unwrap_or_else(|| "unknown".into());
    let at_ms = header(p, DEAD_AT_HEADER)
        .and_then(as_i64)
        .or_else(|| broker_death_ms(p))
        .unwrap_or(0);
    Some(DeadLetter {
        job,
        attempts: attempt_of(p),
        reason,
        at_ms,
    })
}

/// `time` of the newest `x-death` entry, in ms.
fn broker_death_ms(p: &BasicProperties) -> Option<i64> {
    let AMQPValue::FieldArray(deaths) = header(p, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("time")? {
        AMQPValue::Timestamp(secs) => i64::try_from(*secs).ok()?.checked_mul(1000),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Secrets

/// Removes a connection URL and its password from text bound for a log line or an error,
/// since client libraries quote the URL in some errors.
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secrets: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrubber(***)")
    }
}

impl Scrubber {
    /// Scrubs `url`, and its password both as written and percent-decoded.
    pub(crate) fn for_url(url: &Secret) -> Self {
        let mut scrub = Self::default();
        scrub.add(url.expose());
        if let Ok(parsed) = url::Url::parse(url.expose())
            && let Some(password) = parsed.password()
        {
            scrub.add(password);
            scrub.add(&percent_decode(password));
        }
        scrub
    }

    /// Adds one more string to remove.
    pub(crate) fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
            // Longest first, so the URL goes before the password inside it.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every secret replaced by `***`.
    pub(crate) fn clean(&self, text: impl fmt::Display) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn arg<'a>(t: &'a FieldTable, k: &str) -> &'a AMQPValue {
        t.inner()
            .get(k)
            .unwrap_or_else(|| panic!("argument {k} missing"))
    }

    // The broker accepts malformed arguments silently, so their types are pinned here.
    #[test]
    fn queue_arguments_have_the_types_rabbitmq_expects() {
        let shard = shard_arguments("p.dead");
        assert_eq!(arg(&shard, "x-queue-type"), &text("quorum"));
        assert_eq!(
            arg(&shard, "x-delivery-limit"),
            &AMQPValue::LongLongInt(DELIVERY_LIMIT)
        );
        assert_eq!(arg(&shard, "x-dead-letter-exchange"), &text(""));
        assert_eq!(arg(&shard, "x-dead-letter-routing-key"), &text("p.dead"));
        assert_eq!(
            arg(&shard, "x-dead-letter-strategy"),
            &text("at-least-once")
        );
        assert_eq!(arg(&shard, "x-overflow"), &text("reject-publish"));
        assert_eq!(
            arg(&shard, "x-single-active-consumer"),
            &AMQPValue::Boolean(true)
        );
        assert_eq!(shard.inner().len(), 7);

        let retry = retry_arguments(Duration::from_secs(30));
        assert_eq!(
            arg(&retry, "x-message-ttl"),
            &AMQPValue::LongLongInt(30_000)
        );
        assert_eq!(arg(&retry, "x-dead-letter-exchange"), &text(""));
        // Without a dead-letter routing key, an expired retry keeps the key it was published
        // with: its shard's name.
        assert!(!retry.contains_key("x-dead-letter-routing-key"));
        assert!(!retry.contains_key("x-delivery-limit"));
        assert_eq!(retry.inner().len(), 5);

        assert_eq!(arg(&classic_arguments(), "x-queue-type"), &text("classic"));
    }

    #[test]
    fn retry_goes_to_the_shortest_tier_that_is_long_enough() {
        let t = Topology::new("p", 8, &[5, 30, 120, 600]);
        let q = |secs| t.retry_tier(Duration::from_secs(secs)).to_string();
        assert_eq!(q(0), "p.delay.5s");
        assert_eq!(q(5), "p.delay.5s");
        assert_eq!(q(6), "p.delay.30s");
        assert_eq!(q(600), "p.delay.600s");
        assert_eq!(q(3600), "p.delay.600s");
        assert_eq!(t.retry_tier(Duration::from_millis(5001)), "p.delay.30s");
    }

    #[test]
    fn shard_queues_are_numbered_and_a_job_goes_to_its_conversations_shard() {
        let t = Topology::new("p", 3, &[5]);
        assert_eq!(t.shards, ["p.jobs.0", "p.jobs.1", "p.jobs.2"]);
        let mut job = crate::job::tests::sample_job("a", "hi");
        job.conversation_key = "dingtalk:main:cid-1".into();
        let expected = format!("p.jobs.{}", shard_of(&job.conversation_key, 3));
        assert_eq!(t.shard_queue(&job), expected);
    }

    // The hash is a wire contract between processes of different releases: these values
    // must never change.
    #[test]
    fn shard_function_is_fixed() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
        // Also computed by an independent implementation of the definition.
        let pinned = [
            ("", 8, 6),
            ("dingtalk:main:cid-group-1==", 8, 2),
            ("wecom:wx:zhangsan", 8, 2),
            ("dingtalk:main:cid-group-1==", 256, 42),
            ("wecom:wx:a", 8, 4),
            ("wecom:wx:q", 8, 7),
        ];
        for (key, n, shard) in pinned {
            assert_eq!(shard_of(key, n), shard, "shard_of({key:?}, {n})");
        }
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("anything", 0), 0, "zero shards is treated as one");
    }

    #[test]
    fn shard_function_spreads_similar_keys_evenly() {
        for n in [2u16, 3, 8, 16] {
            let mut counts = vec![0usize; usize::from(n)];
            let keys = 800 * usize::from(n);
            for i in 0..keys {
                counts[usize::from(shard_of(&format!("dingtalk:main:cid-{i}"), n))] += 1;
            }
            // 800 expected per shard; ±15 % is more than 4 standard deviations.
            assert!(
                counts.iter().all(|c| (680..=920).contains(c)),
                "{n} shards: {counts:?}"
            );
        }
        // Keys that differ only in high bits of one character (FNV-1a alone would put all of
        // these in one shard of 8).
        let shards: HashSet<u16> = ["a", "i", "q", "y"]
            .iter()
            .map(|c| shard_of(&format!("wecom:wx:{c}"), 8))
            .collect();
        assert!(shards.len() > 1, "{shards:?}");
    }

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

    #[test]
    fn attempt_header_is_read_whatever_the_integer_type() {
        let with = |v| BasicProperties::default().with_headers(table(vec![(ATTEMPT_HEADER, v)]));
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(3))), 3);
        assert_eq!(attempt_of(&with(AMQPValue::ShortShortUInt(2))), 2);
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(0))), 1);
        assert_eq!(attempt_of(&with(text("2"))), 1);
        assert_eq!(attempt_of(&BasicProperties::default()), 1);
        assert_eq!(attempt_of(&job_properties("j", 4)), 4);
    }

    #[test]
    fn job_properties_are_persistent_json_with_the_id() {
        let p = job_properties("j1", 1);
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some(JSON)
        );
        assert_eq!(p.message_id().as_ref().map(ShortString::as_str), Some("j1"));
        let long = "x".repeat(300);
        assert!(job_properties(&long, 1).message_id().is_none());
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let cut = truncate(&reason, MAX_REASON_BYTES);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn scrubber_removes_url_and_password_in_both_spellings() {
        let url = Secret::new("amqp://user:p%40ss%2Fw0rd@broker:5672/%2f");
        let s = Scrubber::for_url(&url);
        let cleaned = s.clean(format!(
            "Invalid URL: '{}' (p@ss/w0rd, p%40ss%2Fw0rd)",
            url.expose()
        ));
        assert_eq!(cleaned, "Invalid URL: '***' (***, ***)");
        assert_eq!(percent_decode("a%2"), "a%2");
    }

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
