//! The connection supervisor.
//!
//! A supervisor task connects with jittered exponential backoff (so start-up
//! never fails because the broker is down), declares the topology, and after any loss of the
//! connection or a channel starts over with a fresh connection; [`JobQueue::is_ready`] is
//! false in between (and while the broker blocks publishers); a 10 s heartbeat (unless the
//! URL sets one) notices a peer that vanished without closing the socket. Deliveries taken before a
//! reconnect cannot be acked any more: settling them fails, the broker delivers them again,
//! and the worker's answered-marker absorbs the repeat. A connection is closed *before* its
//! consumers are dropped (dropping one sends `basic.cancel`, see above). The URL is a secret:
//! it and its password are scrubbed from every message this module logs or returns.

use super::shards::{REBALANCE_EVERY, ShardLost, ShardSlot, next_presence, rebalance, work_shard};
use super::topology::declare;
use super::{Incoming, Inner, Link};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, Event};
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// First wait before reconnecting; doubles per failed attempt up to [`RECONNECT_MAX`].
pub(super) const RECONNECT_MIN: Duration = Duration::from_millis(500);
pub(super) const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Longest a connect plus topology declaration may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor looks at the connection and channel states.
pub(super) const HEALTH_TICK: Duration = Duration::from_millis(500);
/// Longest a graceful connection close may take.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn close_quietly(channel: &Channel) {
    let closing = channel.close(200, "done".into());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(error = %e, "closing a side channel failed");
    }
}

/// Connects, runs until the connection is lost, and starts over, until `stop`.
pub(super) async fn supervise(
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

pub(super) fn log_connect_failure(target: &str, failures: u32, error: &str) {
    // First failure and then every tenth: a broker down for an hour is not 7,000 lines.
    if failures == 1 || failures.is_multiple_of(10) {
        tracing::warn!(broker = %target, failures, error, "cannot connect to RabbitMQ; retrying");
    } else {
        tracing::debug!(broker = %target, failures, error, "cannot connect to RabbitMQ; retrying");
    }
}

/// ±20 % so replicas that lost the broker together do not return in lockstep.
pub(super) fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// A live connection with its shard consumers.
pub(super) struct Session {
    pub(super) link: Arc<Link>,
    pub(super) events: futures::stream::BoxStream<'static, Event>,
    /// This process's consumer of each shard; empty when publish-only.
    pub(super) shards: Vec<Arc<ShardSlot>>,
    /// One task per shard; one that ends means the connection is no longer usable.
    pub(super) consumers: JoinSet<ShardLost>,
    /// Consumers of shard tasks that ended, kept until the connection is closed.
    pub(super) parked: Vec<Consumer>,
    /// The subscription to the presence queue that makes this process count as a worker.
    pub(super) presence: Option<Consumer>,
}

/// Connects, declares the topology, opens the channels, installs the link and starts
/// consuming.
pub(super) async fn open(
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
    pub(super) async fn run(&mut self, inner: &Inner, stop: &CancellationToken) -> Option<String> {
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

impl Session {
    /// Marks the queue not ready and closes the connection, which returns its unacked
    /// deliveries; only then drops the consumers (dropping a live one would cancel it, and
    /// the next worker would get newer jobs before those returned).
    pub(super) async fn end(mut self, inner: &Inner) {
        inner.uninstall();
        close_connection(&self.link).await;
        self.consumers.shutdown().await;
        self.parked.clear();
        drop(self.presence.take());
    }
}

pub(super) async fn close_connection(link: &Link) {
    let closing = link.connection.close(200, "bye".into());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(error = %e, "closing the RabbitMQ connection failed");
    }
}
