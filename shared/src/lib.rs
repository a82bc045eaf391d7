//! Parley's shared core. This crate owns everything the ingress and the worker both need:
//! the configuration (`config`), the versioned `Job` that travels between them (`job`), the
//! seams of ARCHITECTURE.md as traits with their embedded backends (`queue`, `cache`,
//! `messenger`, `llm`), the platform clients and signature checks (`dingtalk`), the
//! shared access-token cache (`token`), text splitting (`split`) and the one module that
//! names every metric (`metrics`). Code above the seams holds `Arc<dyn Trait>` and never
//! knows which backend sits behind it.

pub mod api;
pub mod cache;
pub mod config;
pub mod dingtalk;
pub mod job;
pub mod llm;
pub mod messenger;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod secret;
pub mod split;
pub mod token;
pub mod wecom;

/// Milliseconds since the Unix epoch, the unit both platforms use for timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
