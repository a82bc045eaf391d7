//! Benchmark reference: the ceiling for the RabbitMQ ingress path on this box — one process
//! publishing persistent ~600-byte messages with publisher confirms to a durable quorum
//! queue, K publishes in flight, nothing else.
//!
//! ```sh
//! cargo run --release --example bare_publish -- --in-flight 64 --in-flight 256 --secs 10
//! ```
//!
//! It declares its own queue (a unique name unless `--queue` is given) with the arguments
//! Parley's shard queues `{prefix}.jobs.{n}` have that matter to a publisher (quorum, `x-overflow:
//! reject-publish`, `x-delivery-limit`), publishes through the default exchange with
//! `mandatory` set (as Parley does), counts a publish only when the broker acked it and did not
//! return it, and deletes the queue at the end. One line per `--in-flight` value:
//! `bare_publish: … N msgs/s …`.
//!
//! With `--queues N` it declares N such queues (`{queue}.0` … `{queue}.{N-1}`) and publishes to
//! them in turn, as an ingress spreads jobs over `[queue] shards` shard queues.
//!
//! With `--rate R` it is instead an open-loop reference for confirm *latency*: one publish
//! every 1/R s for `--secs` (no warm-up), each timed from its intended send time to its
//! confirm (so a stalled broker is not hidden by publishing less), printing
//! `bare_publish: … confirm latency ms p50 … p90 … p99 … max …`.

use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use std::time::{Duration, Instant};

/// Publishes confirmed persistent messages to a quorum queue and prints msgs/s.
#[derive(Parser, Debug)]
struct Args {
    /// AMQP URL of the broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Publishes awaiting their confirm at once; repeat for several runs in a row.
    #[arg(long = "in-flight", default_values_t = [64])]
    in_flight: Vec<usize>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Seconds of publishing before the measurement starts, per run.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 600)]
    body_bytes: usize,
    /// Queue to declare, publish to and delete (default: a unique `bare-publish-…` name).
    #[arg(long)]
    queue: Option<String>,
    /// Quorum queues to spread the publishes over, in turn (Parley's `[queue] shards`).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Open loop instead: publish at this many messages per second and report confirm
    /// latency (ignores `--in-flight` and `--warmup-secs`).
    #[arg(long)]
    rate: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.in_flight.iter().all(|k| *k > 0),
        "--in-flight must be at least 1"
    );
    let queue = args.queue.clone().unwrap_or_else(|| {
        format!(
            "bare-publish-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    // A broker out of file handles accepts the TCP connection and never answers: fail loudly.
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&args.url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("RabbitMQ did not complete the AMQP handshake within 10 s"))??;
    anyhow::ensure!(args.queues > 0, "--queues must be at least 1");
    let queues: Vec<String> = if args.queues == 1 {
        vec![queue.clone()]
    } else {
        (0..args.queues).map(|i| format!("{queue}.{i}")).collect()
    };
    let shown = if args.queues == 1 {
        format!("quorum queue {queue}")
    } else {
        format!("{} quorum queues {queue}.*", args.queues)
    };
    let channel = connection.create_channel().await?;
    for q in &queues {
        channel
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                quorum_arguments(),
            )
            .await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let body = body(args.body_bytes);
    let mut result = Ok(());
    if let Some(rate) = args.rate {
        match open_loop(&channel, &queues, &body, rate, args.secs).await {
            Ok(r) => println!(
                "bare_publish: {shown}, {}-byte persistent messages, open loop {rate:.0} msgs/s for {} s: {} confirmed, {} failed; confirm latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                body.len(),
                args.secs,
                r.latency_us.len(),
                r.failed,
                ms(&r.latency_us, 0.50),
                ms(&r.latency_us, 0.90),
                ms(&r.latency_us, 0.99),
                ms(&r.latency_us, 0.999),
                r.latency_us.max() as f64 / 1000.0
            ),
            Err(e) => result = Err(e),
        }
    }
    for &k in args.in_flight.iter().filter(|_| args.rate.is_none()) {
        match run(&channel, &queues, &body, k, &args).await {
            Ok(r) => println!(
                "bare_publish: {shown}, {}-byte persistent messages, {k} in flight, {} s: {:.0} msgs/s ({} confirmed in the window, {} failed)",
                body.len(),
                args.secs,
                r.confirmed as f64 / r.window.as_secs_f64(),
                r.confirmed,
                r.failed
            ),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }

    // Delete the queues even after a failed run (on a fresh channel: a failure may have
    // closed the publishing one).
    let deleted = async {
        let admin = connection.create_channel().await?;
        for q in &queues {
            admin
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = deleted {
        eprintln!("bare_publish: could not delete {shown}: {e}");
    }
    let _ = connection.close(200, "done".into()).await;
    result
}

/// What one run counted.
struct Counted {
    confirmed: u64,
    failed: u64,
    window: Duration,
}

/// Publishes with `k` confirms outstanding for warm-up + measured seconds, counting the
/// confirms that arrive inside the measured window; then drains what is still in flight.
async fn run(
    channel: &lapin::Channel,
    queues: &[String],
    body: &[u8],
    k: usize,
    args: &Args,
) -> anyhow::Result<Counted> {
    let start = Instant::now();
    let window_start = start + Duration::from_secs(args.warmup_secs);
    let window_end = window_start + Duration::from_secs(args.secs);
    let mut pending = FuturesUnordered::new();
    let (mut confirmed, mut failed, mut seq) = (0u64, 0u64, 0u64);
    loop {
        while pending.len() < k && Instant::now() < window_end {
            seq += 1;
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    queues[seq as usize % queues.len()].as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties(seq),
                )
                .await?;
            pending.push(confirm);
        }
        let Some(outcome) = pending.next().await else {
            break;
        };
        let now = Instant::now();
        let counted = now >= window_start && now < window_end;
        match outcome? {
            Confirmation::Ack(None) => confirmed += u64::from(counted),
            // Returned (unroutable), nacked, or confirms not enabled: a failure either way.
            _ => failed += 1,
        }
    }
    Ok(Counted {
        confirmed,
        failed,
        window: Duration::from_secs(args.secs),
    })
}

/// What an open-loop run measured.
struct Timed {
    /// Intended send time to confirm, µs, of every acked publish.
    latency_us: Histogram<u64>,
    failed: u64,
}

/// Publishes one message every 1/`rate` s for `secs`, timing each from its intended send
/// time to its confirm; then waits for the confirms still outstanding.
async fn open_loop(
    channel: &lapin::Channel,
    queues: &[String],
    body: &[u8],
    rate: f64,
    secs: u64,
) -> anyhow::Result<Timed> {
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let total = (rate * secs as f64).round() as u64;
    let start = tokio::time::Instant::now();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut failed = 0u64;
    let mut pending = FuturesUnordered::new();
    let mut seq = 0u64;
    loop {
        let next_at = start + Duration::from_secs_f64(seq as f64 / rate);
        tokio::select! {
            biased;
            Some((intended, outcome)) = pending.next() => {
                match outcome {
                    Ok(Confirmation::Ack(None)) => {
                        let us = u64::try_from(Instant::now().duration_since(intended).as_micros()).unwrap_or(u64::MAX);
                        latency_us.saturating_record(us.max(1));
                    }
                    _ => failed += 1,
                }
            }
            _ = tokio::time::sleep_until(next_at), if seq < total => {
                seq += 1;
                let intended = next_at.into_std();
                let confirm = channel
                    .basic_publish(
                        ShortString::from(""),
                        queues[seq as usize % queues.len()].as_str().into(),
                        BasicPublishOptions { mandatory: true, immediate: false },
                        body,
                        properties(seq),
                    )
                    .await?;
                pending.push(async move { (intended, confirm.await) });
            }
            else => break,
        }
    }
    Ok(Timed { latency_us, failed })
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The job-queue arguments of Parley's shard queues `{prefix}.jobs.{n}` that a publisher meets.
fn quorum_arguments() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    t.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
    t
}

/// Persistent JSON with a message id and one header, like a Parley job.
fn properties(seq: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("parley-attempt".into(), AMQPValue::LongLongInt(1));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(format!("bare-{seq}").into())
        .with_headers(headers)
}

/// A JSON body of `len` bytes (at least the fixed part), shaped like a queued job.
fn body(len: usize) -> Vec<u8> {
    let head =
        r#"{"v":1,"id":"dingtalk:bench:bare","bot_id":"bench","platform":"dingtalk","text":""#;
    let tail = r#""}"#;
    let fill = len.saturating_sub(head.len() + tail.len());
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(head.as_bytes());
    b.extend(std::iter::repeat_n(b'x', fill));
    b.extend_from_slice(tail.as_bytes());
    b
}
