//! Benchmark: what the deployment-wide model limit costs a worker per model call — the
//! reservation before the call and the token correction after it (`ModelLimits::admit` and
//! `settle`, one Redis script each) — beside a plain Redis `GET` round trip measured the same
//! way in the same run. Prints µs of this process's CPU and of wall time per call, one caller
//! and 64 at once. Needs Redis on 127.0.0.1:6379; its keys carry a unique prefix and expire.
//!
//! `cargo run --release --example reserve_cost [CALLS]`

use shared::cache::Cache;
use shared::cache::redis::RedisCache;
use shared::config::{CacheSettings, LimitSettings, LlmSettings};
use shared::limits::ModelLimits;
use shared::secret::Secret;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This process's user + system CPU so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

async fn measure<F, Fut>(name: &str, calls: usize, parallel: usize, f: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (cpu0, wall0) = (cpu(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..calls / parallel {
                f().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (cpu_us, wall_us) = (
        (cpu() - cpu0).as_secs_f64() * 1e6 / calls as f64,
        wall0.elapsed().as_secs_f64() * 1e6 / calls as f64,
    );
    println!(
        "{name:<44} {parallel:>3} at once: {cpu_us:>6.1} µs CPU, {wall_us:>7.1} µs wall per call"
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let prefix = format!("bench-reserve-{}", std::process::id());
    let cache = RedisCache::start(&CacheSettings {
        url: Some(Secret::new("redis://127.0.0.1:6379/")),
        key_prefix: prefix,
    })
    .unwrap();
    assert!(
        cache.wait_ready(Duration::from_secs(5)).await,
        "Redis on 127.0.0.1:6379"
    );
    let cache: Arc<dyn Cache> = Arc::new(cache);
    // Limits far above the calls made, so no call waits: the cost of the step alone.
    let llm: LlmSettings = serde_json::from_value(serde_json::json!({
        "base_url": "http://127.0.0.1:1/v1",
        "model": "m",
        "requests_per_minute": 100_000_000,
        "tokens_per_minute": 1_000_000_000u32,
    }))
    .unwrap();
    let limits = Arc::new(ModelLimits::new(
        cache.clone(),
        &llm,
        &LimitSettings::default(),
    ));
    cache
        .set("probe", "1", Duration::from_secs(60))
        .await
        .unwrap();
    println!("{calls} calls each, one Tokio worker thread (the worker's CPU per call):");
    for parallel in [1, 64] {
        let c = cache.clone();
        measure(
            "reference: Redis GET (one round trip)",
            calls,
            parallel,
            move || {
                let c = c.clone();
                async move {
                    c.get("probe").await.unwrap();
                }
            },
        )
        .await;
        let l = limits.clone();
        measure(
            "admit (rpm + tpm, one script)",
            calls,
            parallel,
            move || {
                let l = l.clone();
                async move {
                    l.admit(300, Duration::ZERO).await.unwrap().unwrap();
                }
            },
        )
        .await;
        let l = limits.clone();
        measure(
            "admit + settle (usage differs: two scripts)",
            calls,
            parallel,
            move || {
                let l = l.clone();
                async move {
                    let a = l.admit(300, Duration::ZERO).await.unwrap().unwrap();
                    l.settle(&a, 280).await;
                }
            },
        )
        .await;
    }
}
