//! The broker backends against the real services on 127.0.0.1: RabbitMQ on 5672
//! (guest/guest) and Redis on 6379 (`.ci/run` starts both). A service that is not there
//! fails the test loudly instead of skipping it. Every test uses its own queue or key
//! prefix and removes what it created, even when it fails.

use shared::cache::redis::RedisCache;
use shared::cache::{Cache, CacheError, MemoryCache, Rate, Reservation};
use shared::config::{CacheSettings, QueueSettings};
use shared::job::{JOB_VERSION, Job};
use shared::queue::amqp::{ATTEMPT_HEADER, AmqpQueue, REASON_HEADER, REBALANCE_EVERY, shard_of};
use shared::queue::{Delivery, JobQueue, QueueError, Settlement};
use shared::secret::Secret;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
const WAIT: Duration = Duration::from_secs(15);

fn unique(name: &str) -> String {
    format!("test-{name}-{:08x}", rand::random::<u32>())
}

fn require(service: &str, port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        panic!("{service} is not reachable on {addr} ({e}); start it (see .ci/run)");
    }
}

/// A group text job, written as JSON the way it travels.
fn job(id: &str) -> Job {
    job_in(id, "dingtalk:main:cid1")
}

/// A job of the conversation `conversation_key`.
fn job_in(id: &str, conversation_key: &str) -> Job {
    serde_json::from_value(serde_json::json!({
        "v": JOB_VERSION,
        "id": id,
        "bot_id": "main",
        "platform": "dingtalk",
        "received_at_ms": 1,
        "conversation_key": conversation_key,
        "sender": { "id": "u1" },
        "content": { "type": "text", "text": "hi" },
        "reply": { "platform": "dingtalk", "group": true, "conversation_id": "cid1" },
    }))
    .expect("a valid job")
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

/// A started queue with a fresh prefix; its queues are deleted when it is dropped.
struct Broker {
    queue: AmqpQueue,
    prefix: String,
    settings: QueueSettings,
    tiers: Vec<u64>,
    _cleanup: DeleteQueues,
}

async fn broker(name: &str, tiers: &[u64], prefetch: u16) -> Broker {
    broker_at(AMQP_URL, name, tiers, prefetch, 5000).await
}

async fn broker_at(
    url: &str,
    name: &str,
    tiers: &[u64],
    prefetch: u16,
    confirm_timeout_ms: u64,
) -> Broker {
    let settings = QueueSettings {
        url: Some(Secret::new(url)),
        confirm_timeout_ms,
        ..QueueSettings::default()
    };
    broker_with(name, settings, tiers, prefetch).await
}

/// A broker with `settings` (its prefix is made unique).
async fn broker_with(
    name: &str,
    mut settings: QueueSettings,
    tiers: &[u64],
    prefetch: u16,
) -> Broker {
    require("RabbitMQ", 5672);
    let prefix = unique(name);
    settings.prefix = prefix.clone();
    let queue = AmqpQueue::start_with_tiers(&settings, prefetch, tiers).unwrap();
    let cleanup = DeleteQueues(queue.queue_names());
    assert!(
        queue.wait_ready(WAIT).await,
        "the queue did not connect to RabbitMQ"
    );
    Broker {
        queue,
        prefix,
        settings,
        tiers: tiers.to_vec(),
        _cleanup: cleanup,
    }
}

/// `shards` shard queues on the local broker.
fn sharded(shards: u16) -> QueueSettings {
    QueueSettings {
        url: Some(Secret::new(AMQP_URL)),
        shards,
        ..QueueSettings::default()
    }
}

impl Broker {
    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// The shard queue of conversation `key`.
    fn shard(&self, key: &str) -> String {
        self.name(&format!("jobs.{}", shard_of(key, self.settings.shards)))
    }

    /// Another worker process of the same deployment.
    async fn another(&self, prefetch: u16) -> AmqpQueue {
        let queue = AmqpQueue::start_with_tiers(&self.settings, prefetch, &self.tiers).unwrap();
        assert!(
            queue.wait_ready(WAIT).await,
            "the other queue did not connect"
        );
        queue
    }

    /// Closes the connection first, so nothing re-declares the queues being deleted.
    async fn finish(self) {
        self.queue.close().await;
    }

    async fn next(&self) -> Delivery {
        tokio::time::timeout(WAIT, self.queue.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery")
    }

    /// Takes the next delivery, checks that it is `id` at `attempt`, and acks it.
    async fn ack_next(&self, id: &str, attempt: u32) {
        let d = self.next().await;
        assert_eq!((d.job.id.as_str(), d.attempt), (id, attempt));
        assert_eq!(d.job, job(id));
        d.settle(Settlement::Ack).await.unwrap();
    }

    async fn nothing_more(&self, within: Duration) {
        if let Ok(d) = tokio::time::timeout(within, self.queue.next()).await {
            panic!("unexpected delivery {d:?}");
        }
    }
}

struct DeleteQueues(Vec<String>);

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Runs on its own runtime so it also works while a failed test unwinds.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok((conn, ch)) = raw_channel().await else {
                    return;
                };
                for name in names {
                    let _ = ch
                        .queue_delete(name.as_str().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

async fn raw_channel() -> lapin::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(AMQP_URL, Default::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Deletes `queue` from under a running test.
async fn delete_queue(queue: &str) {
    let (conn, ch) = raw_channel().await.unwrap();
    ch.queue_delete(queue.into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Messages ready in `queue` (a passive declare: works on single-active-consumer queues,
/// which refuse `basic.get`).
async fn depth(ch: &lapin::Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, Default::default())
        .await
        .expect("the queue exists")
        .message_count()
}

/// Waits for one message on `queue`, taken with `basic.get` and left unacked.
async fn raw_get(ch: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = ch
            .basic_get(queue.into(), Default::default())
            .await
            .expect("basic.get");
        if let Some(m) = got {
            return m;
        }
        assert!(Instant::now() < deadline, "nothing arrived on {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header(m: &lapin::message::BasicGetMessage, name: &str) -> lapin::types::AMQPValue {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
        .unwrap_or_else(|| panic!("header {name} missing"))
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes only this test's connection (found by its name), as an operator or a broker
/// restart would; other tests on the broker keep theirs.
fn force_close_connection(prefix: &str) {
    let listed = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
    let needle = format!("parley {prefix}");
    let pids: Vec<&str> = listed
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(pids.len(), 1, "connections named {needle:?}: {listed}");
    rabbitmqctl(&["close_connection", pids[0], "test"]);
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_published_job_is_delivered_once_and_acked() {
    let b = broker("ack", &[1], 4).await;
    b.queue.publish(&job("a")).await.unwrap();
    b.ack_next("a", 1).await;
    b.nothing_more(Duration::from_millis(1500)).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_retry_comes_back_after_the_tier_delay_with_the_next_attempt() {
    let b = broker("retry", &[1, 2], 4).await;
    b.queue.publish(&job("r")).await.unwrap();
    let d = b.next().await;
    let (d, waited) = retried(&b, d, Duration::from_millis(200)).await;
    assert_eq!((d.job.id.as_str(), d.attempt), ("r", 2));
    assert!(
        waited >= Duration::from_millis(900),
        "back after {waited:?}"
    );
    // A delay longer than every tier takes the longest one.
    let (d, waited) = retried(&b, d, Duration::from_secs(3600)).await;
    assert_eq!(d.attempt, 3);
    assert!(
        waited >= Duration::from_millis(1900),
        "back after {waited:?}"
    );
    d.settle(Settlement::Ack).await.unwrap();
    b.finish().await;
}

/// Settles `d` as a retry after `delay`; returns it when it comes back, and how long that took.
async fn retried(b: &Broker, d: Delivery, delay: Duration) -> (Delivery, Duration) {
    let settled = Instant::now();
    d.settle(Settlement::Retry { delay }).await.unwrap();
    let d = b.next().await;
    (d, settled.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_topology_and_message_properties_are_what_the_broker_needs() {
    let b = broker("topology", &[60], 4).await;
    b.queue.publish(&job("p")).await.unwrap();
    b.next()
        .await
        .settle(Settlement::Retry {
            delay: Duration::from_secs(1),
        })
        .await
        .unwrap();
    // The retry copy waits in the 60 s tier: persistent JSON, id, next attempt.
    let (conn, ch) = raw_channel().await.unwrap();
    let m = raw_get(&ch, &b.name("delay.60s")).await;
    // Published to the tier's exchange with the shard as routing key: where it returns.
    assert_eq!(m.delivery.exchange.as_str(), b.name("delay.60s"));
    assert_eq!(
        m.delivery.routing_key.as_str(),
        b.shard("dingtalk:main:cid1")
    );
    let p = &m.delivery.properties;
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(p.message_id().as_ref().map(|c| c.as_str()), Some("p"));
    assert_eq!(
        header(&m, ATTEMPT_HEADER),
        lapin::types::AMQPValue::LongLongInt(2)
    );
    assert_eq!(Job::from_bytes(&m.delivery.data).unwrap(), job("p"));
    let _ = conn.close(200, "done".into()).await;

    // What the broker recorded (it would silently accept malformed values).
    let listed = rabbitmqctl(&[
        "-q",
        "list_queues",
        "name",
        "type",
        "durable",
        "arguments",
        "--formatter",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed).expect("json queues");
    let queue = |suffix: &str| {
        let name = b.name(suffix);
        rows.iter()
            .find(|r| r["name"] == name.as_str())
            .unwrap_or_else(|| panic!("queue {name} not declared: {listed}"))
            .clone()
    };
    // Each argument is listed as [name, type, value].
    let arg = |row: &serde_json::Value, name: &str| {
        row["arguments"]
            .as_array()
            .and_then(|args| args.iter().find(|a| a[0] == name))
            .map(|a| (a[1].clone(), a[2].clone()))
            .unwrap_or_else(|| panic!("argument {name} missing in {row}"))
    };
    let long = |n: i64| (serde_json::json!("long"), serde_json::json!(n));
    let text = |s: &str| (serde_json::json!("longstr"), serde_json::json!(s));
    for i in 0..b.settings.shards {
        let jobs = queue(&format!("jobs.{i}"));
        assert_eq!(
            (&jobs["type"], &jobs["durable"]),
            (&"quorum".into(), &true.into())
        );
        assert_eq!(arg(&jobs, "x-delivery-limit"), long(20));
        assert_eq!(arg(&jobs, "x-dead-letter-exchange"), text(""));
        assert_eq!(
            arg(&jobs, "x-dead-letter-routing-key"),
            text(&b.name("dead"))
        );
        assert_eq!(arg(&jobs, "x-dead-letter-strategy"), text("at-least-once"));
        assert_eq!(arg(&jobs, "x-overflow"), text("reject-publish"));
        assert_eq!(
            arg(&jobs, "x-single-active-consumer"),
            (serde_json::json!("bool"), serde_json::json!(true))
        );
    }
    assert!(
        !rows.iter().any(|r| r["name"] == b.name("jobs").as_str()),
        "the unsharded jobs queue is not declared any more"
    );
    let retry = queue("delay.60s");
    assert_eq!(retry["type"], "quorum");
    assert_eq!(arg(&retry, "x-message-ttl"), long(60_000));
    assert_eq!(arg(&retry, "x-dead-letter-exchange"), text(""));
    assert!(
        !retry["arguments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a[0] == "x-dead-letter-routing-key"),
        "an expired retry must keep its own routing key: {retry}"
    );
    for suffix in ["dead", "workers"] {
        let classic = queue(suffix);
        assert_eq!(classic["type"], "classic");
        assert_eq!(classic["durable"], true);
    }
    // The tier's fanout exchange, bound to its queue.
    let exchanges = rabbitmqctl(&[
        "-q",
        "list_exchanges",
        "name",
        "type",
        "durable",
        "auto_delete",
        "--formatter",
        "json",
    ]);
    let exchanges: Vec<serde_json::Value> = serde_json::from_str(&exchanges).unwrap();
    let tier = exchanges
        .iter()
        .find(|e| e["name"] == b.name("delay.60s").as_str())
        .expect("the tier exchange");
    assert_eq!(
        (&tier["type"], &tier["durable"], &tier["auto_delete"]),
        (&"fanout".into(), &true.into(), &true.into())
    );
    let bindings = rabbitmqctl(&[
        "-q",
        "list_bindings",
        "source_name",
        "destination_name",
        "--formatter",
        "json",
    ]);
    let bindings: Vec<serde_json::Value> = serde_json::from_str(&bindings).unwrap();
    assert!(
        bindings
            .iter()
            .any(|r| r["source_name"] == b.name("delay.60s").as_str()
                && r["destination_name"] == b.name("delay.60s").as_str())
    );
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_dead_letters_are_listed_without_being_consumed_and_replayed() {
    let b = broker("dead", &[1], 4).await;
    b.queue.publish(&job("a")).await.unwrap();
    b.queue.publish(&job("b")).await.unwrap();
    for reason in ["poison a", "poison b"] {
        b.next()
            .await
            .settle(Settlement::DeadLetter {
                reason: reason.into(),
            })
            .await
            .unwrap();
    }
    let listed = b.queue.dead_letters().await.unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|d| (d.job.id.as_str(), d.attempts, d.reason.as_str()))
        .collect();
    assert_eq!(summary, [("a", 1, "poison a"), ("b", 1, "poison b")]);
    let age = shared::now_ms() - listed[0].at_ms;
    assert!((0..60_000).contains(&age), "dead-lettered {age} ms ago");
    // Listing again shows the same: nothing was consumed, the order holds.
    let again: Vec<_> = b.queue.dead_letters().await.unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].job.id, "a");

    assert_eq!(b.queue.replay_dead_letters(Some("zzz")).await.unwrap(), 0);
    assert_eq!(b.queue.replay_dead_letters(Some("b")).await.unwrap(), 1);
    b.ack_next("b", 1).await;
    let left = b.queue.dead_letters().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].job.id, "a");
    assert_eq!(b.queue.replay_dead_letters(None).await.unwrap(), 1);
    b.ack_next("a", 1).await;
    assert!(b.queue.dead_letters().await.unwrap().is_empty());
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_delivery_dropped_unsettled_comes_back() {
    let b = broker("drop", &[1], 4).await;
    b.queue.publish(&job("d")).await.unwrap();
    drop(b.next().await);
    b.ack_next("d", 1).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_undecodable_payload_is_dead_lettered_and_never_delivered() {
    let b = broker("poison", &[1], 4).await;
    let (conn, ch) = raw_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        b.shard("dingtalk:main:cid1").as_str().into(),
        Default::default(),
        b"\x00not a job{",
        lapin::BasicProperties::default().with_message_id("garbage-1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    b.queue.publish(&job("good")).await.unwrap();
    b.ack_next("good", 1).await;

    let m = raw_get(&ch, &b.name("dead")).await;
    assert_eq!(m.delivery.data, b"\x00not a job{");
    let lapin::types::AMQPValue::LongString(reason) = header(&m, REASON_HEADER) else {
        panic!("the reason is not a string");
    };
    let reason = reason.to_string();
    assert!(reason.contains("undecodable job"), "{reason}");
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("garbage-1")
    );
    let _ = conn.close(200, "done".into()).await;
    // Not a job, so not listed, but left in place for an operator.
    assert!(b.queue.dead_letters().await.unwrap().is_empty());
    b.nothing_more(Duration::from_millis(500)).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_unroutable_dead_letter_fails_and_the_delivery_comes_back() {
    let b = broker("unroutable", &[1], 4).await;
    // The dead queue disappears under the running queue: nothing would take the letter.
    delete_queue(&b.name("dead")).await;
    b.queue.publish(&job("u")).await.unwrap();
    let err = b
        .next()
        .await
        .settle(Settlement::DeadLetter {
            reason: "poison".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QueueError::Unavailable(m) if m.contains("could not route")),
        "{err}"
    );
    // Acked by the broker but returned: not settled, so the job is back, same attempt.
    b.ack_next("u", 1).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_deleted_tier_fails_the_retry_and_the_queue_heals_by_redeclaring() {
    let b = broker("heal", &[1], 4).await;
    // Deleting the tier queue also removes its (auto-delete) exchange.
    delete_queue(&b.name("delay.1s")).await;
    b.queue.publish(&job("h")).await.unwrap();
    let retry = Settlement::Retry {
        delay: Duration::from_secs(1),
    };
    assert!(b.next().await.settle(retry.clone()).await.is_err());
    // The publish channel failed, so the queue reconnected and declared both again; the job
    // came back (same attempt), and now its retry works.
    let d = b.next().await;
    assert_eq!((d.job.id.as_str(), d.attempt), ("h", 1));
    d.settle(retry).await.unwrap();
    b.ack_next("h", 2).await;
    b.finish().await;
}

/// A conversation key whose shard (of `shards`) is `shard`.
fn key_in_shard(shard: u16, shards: u16, tag: &str) -> String {
    (0..)
        .map(|i| format!("dingtalk:main:{tag}-{i}"))
        .find(|k| shard_of(k, shards) == shard)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_retries_and_replays_go_back_to_the_jobs_own_shard() {
    let b = broker_with("shardroute", sharded(4), &[1], 4).await;
    // Not the first shard, so no default route could find it by chance.
    let key = key_in_shard(3, 4, "route");
    let shards: Vec<String> = (0..4).map(|i| b.name(&format!("jobs.{i}"))).collect();
    let (conn, ch) = raw_channel().await.unwrap();
    let only_in_shard_3 = || async {
        let mut depths = Vec::new();
        for shard in &shards {
            depths.push(depth(&ch, shard).await);
        }
        depths == [0, 0, 0, 1]
    };

    b.queue.publish(&job_in("r", &key)).await.unwrap();
    let d = b.next().await;
    d.settle(Settlement::Retry {
        delay: Duration::from_secs(1),
    })
    .await
    .unwrap();
    // Nobody consumes now: where the retry lands after its delay is where it stays.
    b.queue.close().await;
    let deadline = Instant::now() + WAIT;
    while !only_in_shard_3().await {
        assert!(
            Instant::now() < deadline,
            "the retry never came back to shard 3"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let worker = b.another(4).await;
    let d = tokio::time::timeout(WAIT, worker.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.job.id.as_str(), d.attempt), ("r", 2));
    d.settle(Settlement::DeadLetter {
        reason: "poison".into(),
    })
    .await
    .unwrap();
    worker.close().await;
    let publisher = AmqpQueue::publisher(&b.settings, &b.tiers).unwrap();
    assert!(publisher.wait_ready(WAIT).await);
    assert_eq!(publisher.replay_dead_letters(None).await.unwrap(), 1);
    assert!(only_in_shard_3().await, "the replayed job is in its shard");
    publisher.close().await;
    let _ = conn.close(200, "done".into()).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_deliveries_dropped_together_come_back_in_their_order() {
    let b = broker("dropped-order", &[1], 8).await;
    let key = "dingtalk:main:one";
    for i in 0..5 {
        b.queue
            .publish(&job_in(&format!("o{i}"), key))
            .await
            .unwrap();
    }
    let mut taken = Vec::new();
    for i in 0..5 {
        let d = b.next().await;
        assert_eq!(d.job.id, format!("o{i}"));
        taken.push(d);
    }
    // A stopping worker drops its unstarted jobs in whatever order its tasks end.
    while let Some(d) = taken.pop() {
        drop(d);
    }
    for i in 0..5 {
        let d = b.next().await;
        assert_eq!((d.job.id.clone(), d.attempt), (format!("o{i}"), 1));
        d.settle(Settlement::Ack).await.unwrap();
    }
    b.finish().await;
}

/// What a test worker did: when, which worker, job id, conversation key.
type WorkLog = Arc<Mutex<Vec<(Instant, usize, String, String)>>>;

/// Takes deliveries from `queue` as worker `w` until the task is aborted: logs each after
/// `work` and acks it.
fn logging_worker(
    queue: AmqpQueue,
    w: usize,
    work: Duration,
    log: WorkLog,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok(d) = queue.next().await else { return };
            tokio::time::sleep(work).await;
            let entry = (
                Instant::now(),
                w,
                d.job.id.clone(),
                d.job.conversation_key.clone(),
            );
            log.lock().unwrap().push(entry);
            d.settle(Settlement::Ack).await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_shards_are_spread_over_workers_with_one_active_consumer_each() {
    let b = broker_with("spread", sharded(6), &[1], 4).await;
    let queues = [b.queue.clone(), b.another(4).await, b.another(4).await];
    let keys: Vec<String> = (0..6).map(|s| key_in_shard(s, 6, "spread")).collect();
    let log: WorkLog = Arc::default();
    let workers: Vec<_> = queues
        .iter()
        .enumerate()
        .map(|(w, q)| logging_worker(q.clone(), w, Duration::ZERO, log.clone()))
        .collect();
    // Traffic on every shard; after a few rebalancing rounds each of the 3 workers works
    // at most ceil(6 / 3) = 2 shards, and every shard is worked by exactly one of them.
    let deadline = Instant::now() + 10 * REBALANCE_EVERY + WAIT;
    let mut n = 0;
    let balanced = loop {
        for key in &keys {
            b.queue
                .publish(&job_in(&format!("j{n}"), key))
                .await
                .unwrap();
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let window = Instant::now() - Duration::from_millis(1500);
        let mut by_worker: HashMap<usize, BTreeSet<u16>> = HashMap::new();
        for (at, w, _, key) in log.lock().unwrap().iter() {
            if *at >= window {
                by_worker.entry(*w).or_default().insert(shard_of(key, 6));
            }
        }
        let sizes: Vec<usize> = by_worker.values().map(BTreeSet::len).collect();
        if by_worker.len() == 3 && sizes.iter().all(|&k| k <= 2) && sizes.iter().sum::<usize>() == 6
        {
            break by_worker;
        }
        if Instant::now() > deadline {
            panic!("never balanced; last window: {by_worker:?}");
        }
    };
    // The broker agrees: three consumers per shard, one of them active.
    let listed = rabbitmqctl(&[
        "-q",
        "list_consumers",
        "queue_name",
        "active",
        "--formatter",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    for i in 0..6 {
        let shard = b.name(&format!("jobs.{i}"));
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r["queue_name"] == shard.as_str())
            .collect();
        assert_eq!(mine.len(), 3, "{shard}: {mine:?}");
        assert_eq!(
            mine.iter().filter(|r| r["active"] == true).count(),
            1,
            "{shard}: {mine:?}"
        );
    }
    eprintln!("balanced after {n} jobs: {balanced:?}");
    for w in workers {
        w.abort();
    }
    for q in &queues[1..] {
        q.close().await;
    }
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_handing_a_shard_over_keeps_each_conversations_order() {
    let b = broker_with("handover", sharded(2), &[1], 8).await;
    let keys = [key_in_shard(0, 2, "ho"), key_in_shard(1, 2, "ho")];
    let log: WorkLog = Arc::default();
    let work = Duration::from_millis(20);
    let first = logging_worker(b.queue.clone(), 0, work, log.clone());
    // Faster than one worker can go, so jobs are queued, prefetched and in flight when
    // the second worker arrives and one shard is handed over to it.
    const PER_CONVERSATION: usize = 150;
    let publisher = {
        let queue = b.queue.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            for seq in 0..PER_CONVERSATION {
                for (c, key) in keys.iter().enumerate() {
                    queue
                        .publish(&job_in(&format!("c{c}-{seq}"), key))
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = b.another(8).await;
    let second = logging_worker(other.clone(), 1, work, log.clone());
    publisher.await.unwrap();
    let deadline = Instant::now() + 4 * WAIT;
    while log.lock().unwrap().len() < 2 * PER_CONVERSATION {
        assert!(
            Instant::now() < deadline,
            "only {} answered",
            log.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2 * PER_CONVERSATION, "nothing twice");
    for c in 0..2 {
        let seqs: Vec<usize> = log
            .iter()
            .filter_map(|(_, _, id, _)| id.strip_prefix(&format!("c{c}-")))
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (0..PER_CONVERSATION).collect::<Vec<_>>(),
            "conversation {c}"
        );
    }
    let by_second = log.iter().filter(|(_, w, _, _)| *w == 1).count();
    assert!(by_second > 0, "the second worker never got a shard");
    first.abort();
    second.abort();
    other.close().await;
    b.finish().await;
}

/// A TCP proxy to RabbitMQ that can stall: while frozen it passes no byte either way, as
/// a broker that hangs (or a network that drops silently) would.
struct StallingProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

async fn stalling_proxy() -> StallingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            tokio::spawn(pump(client_read, upstream_write, flag.clone()));
            tokio::spawn(pump(upstream_read, client_write, flag.clone()));
        }
    });
    StallingProxy { port, frozen }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_publish_the_broker_does_not_confirm_in_time_is_a_confirm_timeout() {
    let proxy = stalling_proxy().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let b = broker_at(&url, "stall", &[1], 4, 300).await;
    b.queue.publish(&job("before")).await.unwrap();
    proxy.frozen.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let result = b.queue.publish(&job("stalled")).await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(QueueError::ConfirmTimeout)),
        "{result:?}"
    );
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(2)).contains(&waited),
        "gave up after {waited:?}"
    );
    // The broker comes back: same connection, publishes are confirmed again.
    proxy.frozen.store(false, Ordering::Relaxed);
    b.queue.publish(&job("after")).await.unwrap();
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_lost_connection_recovers_and_loses_nothing_confirmed() {
    let b = broker("reconnect", &[1], 32).await;
    b.queue.publish(&job("before")).await.unwrap();
    let taken_before = b.next().await;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let queue = b.queue.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut refused = 0;
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("j{i}");
                match queue.publish(&job(&id)).await {
                    Ok(()) => confirmed.push(id),
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (confirmed, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    force_close_connection(&b.prefix);
    wait_until("the queue is not ready", || !b.queue.is_ready()).await;
    assert!(
        matches!(
            b.queue.publish(&job("while-down")).await,
            Err(QueueError::Unavailable(_))
        ) || b.queue.is_ready()
    );
    wait_until("the queue is ready again", || b.queue.is_ready()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    // Taken on the old connection: cannot be settled, and will come again.
    assert!(taken_before.settle(Settlement::Ack).await.is_err());
    let (confirmed, refused) = publisher.await.unwrap();
    assert!(refused > 0, "the drop did not hit any publish");
    assert!(confirmed.len() > 100, "only {} confirmed", confirmed.len());
    b.queue.publish(&job("after")).await.unwrap();

    let mut missing: HashSet<String> = confirmed.into_iter().collect();
    missing.insert("before".into());
    missing.insert("after".into());
    while !missing.is_empty() {
        let d = tokio::time::timeout(WAIT, b.queue.next())
            .await
            .unwrap_or_else(|_| panic!("never delivered: {missing:?}"))
            .unwrap();
        missing.remove(&d.job.id);
        d.settle(Settlement::Ack).await.unwrap();
    }
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_down_at_start_is_not_ready_and_never_echoes_the_password() {
    let settings = QueueSettings {
        url: Some(Secret::new("amqp://guest:hunter2@127.0.0.1:1/%2f")),
        prefix: unique("down"),
        ..QueueSettings::default()
    };
    let queue = AmqpQueue::start(&settings, 4).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queue.is_ready());
    let started = Instant::now();
    let err = queue.publish(&job("x")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(matches!(err, QueueError::Unavailable(_)), "{err}");
    assert!(!format!("{err} {queue:?}").contains("hunter2"));
    assert!(queue.dead_letters().await.is_err());
    tokio::time::timeout(Duration::from_secs(5), queue.close())
        .await
        .expect("close returns while disconnected");
}

// ---------------------------------------------------------------------------------------
// Redis

const LONG: Duration = Duration::from_secs(60);

/// A started cache with a fresh prefix; its keys are deleted when it is dropped.
struct Redis {
    cache: RedisCache,
    prefix: String,
}

async fn redis_cache(name: &str) -> Redis {
    require("Redis", 6379);
    let prefix = unique(name);
    let settings = CacheSettings {
        url: Some(Secret::new(REDIS_URL)),
        key_prefix: prefix.clone(),
    };
    let cache = RedisCache::start(&settings).unwrap();
    assert!(cache.wait_ready(WAIT).await, "Redis did not answer");
    Redis { cache, prefix }
}

async fn raw_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("raw Redis connection")
}

impl Drop for Redis {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.prefix);
        let _ = std::thread::spawn(move || {
            let Ok(client) = redis::Client::open(REDIS_URL) else {
                return;
            };
            let Ok(mut con) = client.get_connection() else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut con)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut con);
            }
        })
        .join();
    }
}

async fn pttl(key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut raw_redis().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_values_are_prefixed_and_expire() {
    let r = redis_cache("expiry").await;
    let c = &r.cache;
    c.set("k", "v", Duration::from_millis(300)).await.unwrap();
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some("v"));
    let full = format!("{}:k", r.prefix);
    assert_eq!(r.cache.full_key("k"), full);
    let raw: Option<String> = redis::cmd("GET")
        .arg(&full)
        .query_async(&mut raw_redis().await)
        .await
        .unwrap();
    assert_eq!(raw.as_deref(), Some("v"));
    let ttl = pttl(&full).await;
    assert!((1..=300).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get("k").await.unwrap(), None);
    assert!(c.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_set_nx_sets_once_and_delete_if_eq_compares() {
    let r = redis_cache("nx").await;
    let c = &r.cache;
    assert!(c.set_nx("lock", "a", LONG).await.unwrap());
    assert!(!c.set_nx("lock", "b", LONG).await.unwrap());
    assert_eq!(c.get("lock").await.unwrap().as_deref(), Some("a"));
    let ttl = pttl(&r.cache.full_key("lock")).await;
    assert!((1..=60_000).contains(&ttl), "PTTL {ttl}");
    assert!(!c.delete_if_eq("lock", "b").await.unwrap());
    assert!(c.delete_if_eq("lock", "a").await.unwrap());
    assert!(!c.delete_if_eq("lock", "a").await.unwrap());
    assert!(
        c.set_nx("lock", "c", Duration::from_millis(100))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.set_nx("lock", "d", LONG).await.unwrap());
    c.delete("lock").await.unwrap();
    assert_eq!(c.get("lock").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lists_keep_the_newest_items_and_their_ttl() {
    let r = redis_cache("lists").await;
    let c = &r.cache;
    for i in 0..5 {
        c.list_push("l", &[i.to_string()], 3, LONG).await.unwrap();
    }
    assert_eq!(c.list_range("l").await.unwrap(), ["2", "3", "4"]);
    let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).into();
    c.list_push("l", &items, 3, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(c.list_range("l").await.unwrap(), ["b", "c", "d"]);
    let ttl = pttl(&c.full_key("l")).await;
    assert!((1..=5000).contains(&ttl), "PTTL {ttl}");
    // Nothing to add still refreshes the TTL.
    c.list_push("l", &[], 3, LONG).await.unwrap();
    assert!(pttl(&c.full_key("l")).await > 5000);
    c.list_push("l", &items, 0, LONG).await.unwrap();
    assert!(c.list_range("l").await.unwrap().is_empty());
    assert!(c.list_range("never").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slots_are_shared_by_every_process_and_slide() {
    let r = redis_cache("slots").await;
    // A second cache on the same prefix stands for another worker process.
    let other = RedisCache::start(&CacheSettings {
        url: Some(Secret::new(REDIS_URL)),
        key_prefix: r.prefix.clone(),
    })
    .unwrap();
    assert!(other.wait_ready(WAIT).await);
    let window = Duration::from_millis(500);
    let takers: Vec<&RedisCache> = vec![&r.cache, &other];
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = takers[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            c.take_slot("api", 5, window).await.unwrap()
        }));
    }
    let mut waits = Vec::new();
    for t in tasks {
        waits.push(t.await.unwrap());
    }
    assert_eq!(waits.iter().filter(|w| w.is_none()).count(), 5, "{waits:?}");
    let longest = waits.iter().flatten().max().copied().unwrap();
    assert!(longest <= window + Duration::from_millis(2), "{longest:?}");
    tokio::time::sleep(longest).await;
    assert_eq!(other.take_slot("api", 5, window).await.unwrap(), None);
    assert!(pttl(&r.cache.full_key("api")).await <= 500);

    assert_eq!(r.cache.add("month", 3, LONG).await.unwrap(), 3);
    assert_eq!(other.add("month", 2, LONG).await.unwrap(), 5);
    assert_eq!(r.cache.add("month", 0, LONG).await.unwrap(), 5);
    let ttl = pttl(&r.cache.full_key("month")).await;
    assert!((1..=60_000).contains(&ttl), "PTTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wrong_kind_of_value_is_reported_as_such() {
    let r = redis_cache("types").await;
    let c = &r.cache;
    c.list_push("l", &["x".into()], 3, LONG).await.unwrap();
    assert!(matches!(c.get("l").await, Err(CacheError::WrongType)));
    assert!(!c.delete_if_eq("l", "x").await.unwrap());
    c.set("s", "x", LONG).await.unwrap();
    assert!(matches!(
        c.list_range("s").await,
        Err(CacheError::WrongType)
    ));
    assert!(matches!(
        c.list_push("s", &["y".into()], 3, LONG).await,
        Err(CacheError::WrongType)
    ));
    assert!(c.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_not_ready_and_never_echoes_the_password() {
    let settings = CacheSettings {
        url: Some(Secret::new("redis://:hunter2@127.0.0.1:1/0")),
        key_prefix: unique("down"),
    };
    let cache = RedisCache::start(&settings).unwrap();
    let started = Instant::now();
    let err = cache.get("k").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(matches!(&err, CacheError::Unavailable(_)), "{err}");
    assert!(!format!("{err} {cache:?}").contains("hunter2"), "{err}");
    assert!(!cache.is_ready());
}

// ---------------------------------------------------------------------------------------
// Benchmark (issue 3: ≥ 70 % of a bare lapin confirmed-publish loop)

const BENCH_MESSAGES: usize = 4000;
const BENCH_CONCURRENCY: usize = 64;

/// Publishes `BENCH_MESSAGES` persistent messages on one confirm channel, `window` in flight
/// at a time, as a hand-written lapin loop would; returns messages per second.
async fn bare_lapin_rate(queue: &str, window: usize) -> f64 {
    let (conn, ch) = raw_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let payload = job("bench").to_bytes();
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..BENCH_MESSAGES {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &payload,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        pending.push_back(confirm);
        if pending.len() >= window
            && let Some(oldest) = pending.pop_front()
        {
            assert!(oldest.await.unwrap().is_ack());
        }
    }
    for confirm in pending {
        assert!(confirm.await.unwrap().is_ack());
    }
    let rate = BENCH_MESSAGES as f64 / started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    rate
}

/// `BENCH_MESSAGES` publishes through the seam from `BENCH_CONCURRENCY` tasks, as the
/// ingress does from concurrent requests; returns messages per second.
async fn seam_rate(queue: &AmqpQueue) -> f64 {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..BENCH_CONCURRENCY {
        let queue = queue.clone();
        tasks.spawn(async move {
            for i in (t..BENCH_MESSAGES).step_by(BENCH_CONCURRENCY) {
                queue.publish(&job(&format!("bench-{i}"))).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    BENCH_MESSAGES as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test -p parley-shared --release --test backends -- --ignored --nocapture"]
async fn amqp_publish_rate_is_at_least_70_percent_of_a_bare_lapin_loop() {
    let b = broker_with("bench", sharded(1), &[1], 1).await;
    let jobs = b.name("jobs.0");
    let sequential = bare_lapin_rate(&jobs, 1).await;
    let pipelined = bare_lapin_rate(&jobs, BENCH_CONCURRENCY).await;
    let seam = seam_rate(&b.queue).await;
    eprintln!(
        "confirmed persistent publishes/s: bare sequential {sequential:.0}, bare {BENCH_CONCURRENCY} in flight {pipelined:.0}, AmqpQueue from {BENCH_CONCURRENCY} tasks {seam:.0} ({:.0} % of the pipelined loop)",
        100.0 * seam / pipelined
    );
    assert!(seam >= 0.7 * pipelined);
    b.finish().await;
}

/// A Redis of this test's own on a free port, so it can be killed and restarted without
/// touching the shared one.
struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut redis = Self { port, child: None };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_survived_without_restarting_the_cache() {
    require("Redis", 6379); // the same binary; fail loudly where Redis is missing
    let mut server = PrivateRedis::start();
    let settings = CacheSettings {
        url: Some(Secret::new(format!("redis://127.0.0.1:{}/0", server.port))),
        key_prefix: unique("restart"),
    };
    let cache = RedisCache::start(&settings).unwrap();
    assert!(cache.wait_ready(WAIT).await);
    cache.set("k", "v", LONG).await.unwrap();

    server.kill();
    assert!(matches!(
        cache.get("k").await,
        Err(CacheError::Unavailable(_))
    ));
    assert!(!cache.is_ready());

    server.restart();
    let back = Instant::now();
    let deadline = back + WAIT;
    while cache.get("k").await.is_err() {
        assert!(Instant::now() < deadline, "the cache never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "recovered only after {took:?}"
    );
    // The data went with the old server; the connection is what came back.
    assert_eq!(cache.get("k").await.unwrap(), None);
    wait_until("the cache is ready again", || cache.is_ready()).await;
}

fn rate(key: &str, interval_ms: u64, burst: u32, cost: i64) -> Rate {
    Rate {
        key: key.into(),
        interval: Duration::from_millis(interval_ms),
        burst,
        cost,
    }
}

fn waited(r: Reservation) -> Duration {
    match r {
        Reservation::Wait { wait, .. } => wait,
        Reservation::TooLate { .. } => panic!("refused: {r:?}"),
    }
}

/// The reservation arithmetic every backend must share: a burst goes at once, then one call
/// per interval; a refusal reserves nothing; the longest of several rates binds; a negative
/// cost gives time back; a call costing more than the burst waits for an idle rate.
async fn reservations_follow_the_rate(c: &dyn Cache, other: &dyn Cache) {
    let ms = Duration::from_millis;
    let close = |d: Duration, want: u64| {
        let want = ms(want);
        assert!(
            d <= want && d + ms(15) >= want,
            "{d:?} not just under {want:?}"
        );
    };
    let r = [rate("rpm", 100, 2, 1)];
    assert_eq!(waited(c.reserve(&r, None).await.unwrap()), Duration::ZERO);
    assert_eq!(
        waited(other.reserve(&r, None).await.unwrap()),
        Duration::ZERO
    );
    close(waited(c.reserve(&r, None).await.unwrap()), 100);
    close(waited(other.reserve(&r, None).await.unwrap()), 200);
    assert_eq!(
        c.reserve(&r, Some(ms(250))).await.unwrap(),
        Reservation::TooLate { binding: 0 }
    );
    close(waited(c.reserve(&r, Some(ms(400))).await.unwrap()), 300);
    // Giving two units back brings the next call forward by two intervals.
    waited(c.reserve(&[rate("rpm", 100, 2, -2)], None).await.unwrap());
    close(waited(other.reserve(&r, None).await.unwrap()), 200);

    let both = [rate("a", 10, 1, 1), rate("b", 100, 1, 1)];
    let first = c.reserve(&both, None).await.unwrap();
    assert_eq!(
        first,
        Reservation::Wait {
            wait: Duration::ZERO,
            binding: 0
        }
    );
    match c.reserve(&both, None).await.unwrap() {
        Reservation::Wait { wait, binding: 1 } => close(wait, 100),
        other => panic!("{other:?}"),
    }
    // Too late on "b": "a" was not advanced either.
    assert_eq!(
        c.reserve(&both, Some(ms(50))).await.unwrap(),
        Reservation::TooLate { binding: 1 }
    );
    close(
        waited(c.reserve(&[rate("a", 10, 1, 1)], None).await.unwrap()),
        20,
    );

    // Tokens: 1 ms each, 5 at once; 20 at once waits only for the rate to be idle.
    let tokens = |cost| [rate("tpm", 1, 5, cost)];
    assert_eq!(
        waited(c.reserve(&tokens(20), None).await.unwrap()),
        Duration::ZERO
    );
    close(waited(c.reserve(&tokens(20), None).await.unwrap()), 20);
    close(waited(c.reserve(&tokens(5), None).await.unwrap()), 40);
}

#[tokio::test]
async fn memory_reservations_follow_the_rate() {
    let c = MemoryCache::new();
    reservations_follow_the_rate(&c, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reservations_follow_the_rate_for_every_process() {
    let r = redis_cache("reserve").await;
    let other = RedisCache::start(&CacheSettings {
        url: Some(Secret::new(REDIS_URL)),
        key_prefix: r.prefix.clone(),
    })
    .unwrap();
    assert!(other.wait_ready(WAIT).await);
    reservations_follow_the_rate(&r.cache, &other).await;

    // Many callers in two processes at once: their start times are one interval apart.
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let c = if i % 2 == 0 {
            r.cache.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let wait = waited(c.reserve(&[rate("many", 10, 1, 1)], None).await.unwrap());
            Instant::now() + wait
        }));
    }
    let mut starts = Vec::new();
    for t in tasks {
        starts.push(t.await.unwrap() - began);
    }
    starts.sort();
    for w in starts.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap + Duration::from_millis(4) >= Duration::from_millis(10),
            "{starts:?}"
        );
    }
    let span = starts[59] - starts[0];
    assert!(
        span >= Duration::from_millis(585),
        "60 calls at 10 ms apart: {span:?}"
    );
    assert!(pttl(&r.cache.full_key("many")).await > 0);
}
