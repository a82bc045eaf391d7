//! The queues and exchanges of one deployment, and where a job goes among them.
//!
//! Every name starts with `[queue].prefix` (declared idempotently on every
//! connect). Jobs live in `[queue].shards` (N) *shard queues* `{prefix}.jobs.0` …
//! `{prefix}.jobs.{N-1}`: durable *quorum* queues — replicated, so a job the ingress was told
//! is safe survives the loss of a broker node, and counting redeliveries, so a message that
//! keeps killing its consumer is dead-lettered by the broker after [`DELIVERY_LIMIT`] instead
//! of looping forever — with *single active consumer* (see `shards`). The limit and the
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

use super::headers::{table, text};
use crate::job::Job;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// Deliveries of one message (redeliveries after crashes, shutdowns, reconnects, shard
/// hand-overs) before the broker dead-letters it by itself. Retries do not count: each retry
/// is a new message.
pub const DELIVERY_LIMIT: i64 = 20;

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

pub(super) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(super) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The queues and exchanges a deployment declares: what to delete to remove it without
/// a trace (an operator retiring a prefix, a test cleaning up after itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredNames {
    /// The shards in order, dead, workers, then the retry tiers.
    pub queues: Vec<String>,
    /// The retry tiers' fanout exchanges (named as their queues; auto-delete).
    pub exchanges: Vec<String>,
}

/// What a lane with this prefix, shard count and retry tiers declares on the broker.
pub fn declared_names(prefix: &str, shards: u16, tiers: &[u64]) -> DeclaredNames {
    Topology::new(prefix, shards, tiers).names()
}

/// Names of the queues (and tier exchanges) of one deployment.
#[derive(Debug, Clone)]
pub(super) struct Topology {
    /// Shard queues, by shard number.
    pub(super) shards: Vec<String>,
    pub(super) dead: String,
    /// Presence queue: its consumer count is the number of workers.
    pub(super) workers: String,
    /// (delay in seconds, name of the tier's queue and of its fanout exchange), shortest first.
    pub(super) tiers: Vec<(u64, String)>,
}

impl Topology {
    pub(super) fn new(prefix: &str, shards: u16, tiers: &[u64]) -> Self {
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

    /// Every queue and exchange [`declare`] makes.
    pub(super) fn names(&self) -> DeclaredNames {
        let tiers = self.tiers.iter().map(|(_, name)| name.clone());
        DeclaredNames {
            queues: self
                .shards
                .iter()
                .chain([&self.dead, &self.workers])
                .cloned()
                .chain(tiers.clone())
                .collect(),
            exchanges: tiers.collect(),
        }
    }

    /// The shard queue of `job`.
    pub(super) fn shard_queue(&self, job: &Job) -> &str {
        let n = u16::try_from(self.shards.len()).unwrap_or(u16::MAX);
        &self.shards[usize::from(shard_of(&job.conversation_key, n))]
    }

    /// The retry tier for `delay`: the shortest at least as long, else the longest.
    pub(super) fn retry_tier(&self, delay: Duration) -> &str {
        let i = self
            .tiers
            .iter()
            .position(|(s, _)| Duration::from_secs(*s) >= delay)
            .unwrap_or(self.tiers.len() - 1);
        &self.tiers[i].1
    }
}

/// Declares every queue, tier exchange and binding; idempotent while the arguments stay
/// the same.
pub(super) async fn declare(channel: &Channel, t: &Topology) -> lapin::Result<()> {
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

/// Arguments every quorum queue here shares: dead-letter through the default exchange, at
/// least once (which needs `reject-publish` overflow).
pub(super) fn quorum_arguments() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]
}

/// A shard: one active consumer at a time; dead-letters to `dead` after the delivery limit.
pub(super) fn shard_arguments(dead: &str) -> FieldTable {
    let mut args = quorum_arguments();
    args.push(("x-dead-letter-routing-key", text(dead)));
    args.push(("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)));
    args.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    table(args)
}

/// A delay tier: expired messages are dead-lettered with the routing key they were
/// published with (no `x-dead-letter-routing-key`), i.e. into their shard.
pub(super) fn retry_arguments(delay: Duration) -> FieldTable {
    let ttl_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut args = quorum_arguments();
    args.push(("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)));
    table(args)
}

/// The dead and presence queues.
pub(super) fn classic_arguments() -> FieldTable {
    // Explicit, because a 4.x vhost may default new queues to quorum.
    table(vec![("x-queue-type", text("classic"))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::amqp::headers::text;
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
    fn declared_names_cover_shards_dead_workers_and_tiers() {
        let names = declared_names("p", 2, &[5, 60]);
        assert_eq!(
            names.queues,
            [
                "p.jobs.0",
                "p.jobs.1",
                "p.dead",
                "p.workers",
                "p.delay.5s",
                "p.delay.60s"
            ]
        );
        assert_eq!(names.exchanges, ["p.delay.5s", "p.delay.60s"]);
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
}
