//! The cache seam: strings and bounded lists with a time-to-live, set-if-absent (dedupe
//! keys, answered markers, short locks), compare-and-delete, counters, sliding-window
//! slots and reservations against steady rates (cluster-wide rate limits: each is one atomic
//! step, no read-then-write race). Keys are given without the
//! deployment prefix; each backend adds `[cache].key_prefix`. The backends are
//! `memory` (embedded) and `redis`.

pub mod memory;
pub mod redis;

pub use memory::MemoryCache;

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// Why a cache call failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The backend cannot be reached now.
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    /// The key holds a value of another kind.
    #[error("wrong kind of value at key")]
    WrongType,
}

/// The cache seam.
#[async_trait]
pub trait Cache: Send + Sync + fmt::Debug {
    /// The value at `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError>;
    /// Sets `key` to `value` for `ttl`.
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CacheError>;
    /// Sets `key` only if absent; true if this call set it.
    async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, CacheError>;
    /// Removes `key`.
    async fn delete(&self, key: &str) -> Result<(), CacheError>;
    /// Removes `key` only if it still holds `expected`; true if removed.
    async fn delete_if_eq(&self, key: &str, expected: &str) -> Result<bool, CacheError>;
    /// Appends to the list at `key`, keeps its last `max_len` items, and resets its TTL.
    async fn list_push(
        &self,
        key: &str,
        values: &[String],
        max_len: usize,
        ttl: Duration,
    ) -> Result<(), CacheError>;
    /// The whole list at `key`, oldest first (empty if absent).
    async fn list_range(&self, key: &str) -> Result<Vec<String>, CacheError>;
    /// Adds `by` to the counter at `key` (absent = 0), setting its TTL when it is created;
    /// returns the new value.
    async fn add(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError>;
    /// Takes one of `limit` slots of the sliding window `window` at `key`: succeeds (None)
    /// when fewer than `limit` slots were taken in the last `window`, else says how long
    /// until the oldest frees. With Redis the clock is the server's, one for the cluster.
    async fn take_slot(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CacheError>;
    /// Reserves `cost` of every rate in `rates` in one atomic step (GCRA with reservations:
    /// each rate is a theoretical arrival time advanced by `cost × interval`). Returns how long
    /// until the reserved call may start — [`Reservation::Wait`], the longest of the rates'
    /// waits, with the index of the rate that set it — or [`Reservation::TooLate`] when that
    /// would be more than `max_wait`, and then reserves nothing. A negative cost gives units
    /// back (a correction); `max_wait` None never refuses. With Redis the clock is the
    /// server's, one for the cluster.
    async fn reserve(
        &self,
        rates: &[Rate],
        max_wait: Option<Duration>,
    ) -> Result<Reservation, CacheError>;
    /// Whether the backend answers now (drives `/readyz`).
    fn is_ready(&self) -> bool;
}

/// One steady rate a [`Cache::reserve`] draws from: a unit every `interval`, up to `burst`
/// units at once (a call costing more than `burst` waits until the rate is idle).
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// The cache key holding the rate's state.
    pub key: String,
    /// Time per unit.
    pub interval: Duration,
    /// Units that may go at once.
    pub burst: u32,
    /// Units this reservation takes (negative: gives back).
    pub cost: i64,
}

/// The answer of [`Cache::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved: the call may start after `wait`; `binding` is the index of the rate whose
    /// wait that is (the first rate when none waits).
    Wait {
        /// How long until the call may start.
        wait: Duration,
        /// Index into the rates of the one that made the wait.
        binding: usize,
    },
    /// Not reserved: the call could not start within `max_wait`; `binding` as above.
    TooLate {
        /// Index into the rates of the one that made the wait.
        binding: usize,
    },
}
