//! Parley's shared core: everything the ingress and the worker both need, grouped by what
//! it owns. `job` holds the domain types that travel between them (the versioned `Job`,
//! its content and reply target, the `Platform`). `platform` is the messenger seam and one
//! folder per platform (`dingtalk`, `wecom`, group `robots`), each with its callback
//! checks and parsing, wire types, client and limits, over one shared "post JSON, classify
//! the platform's error" path and the shared access-token cache. `queue` and `cache` are
//! the seams of ARCHITECTURE.md as traits with their backends (memory and RabbitMQ; memory
//! and Redis); `llm` is the model client; `notify` is what a notice is (the request body
//! and Alertmanager rendering). Besides: `config`, `metrics` (the one module that names
//! every metric), `secret` and `split` (text splitting). Code above the seams holds
//! `Arc<dyn Trait>` and never knows which backend sits behind it.

pub mod cache;
pub mod config;
pub mod job;
pub mod limits;
pub mod llm;
pub mod metrics;
pub mod notify;
pub mod platform;
pub mod queue;
pub mod secret;
pub mod split;
pub mod store;
pub mod untrusted;

/// Milliseconds since the Unix epoch, the unit both platforms use for timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
