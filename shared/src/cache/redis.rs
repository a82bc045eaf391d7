//! The Redis backend of the cache seam, on redis-rs's `ConnectionManager`: one multiplexed
//! connection shared by every task, re-established in the background after an I/O error
//! (about 250 ms after Redis is back; the command that failed is not replayed, it returns
//! `CacheError::Unavailable` and the caller decides). The manager connects lazily, so a
//! Redis that is down at start-up is only a not-ready cache.
//!
//! Every key is `{key_prefix}:{key}`, so deployments and test runs can share one Redis.
//! `set_nx` is `SET … NX PX` (one atomic command); `delete_if_eq` is a compare-and-delete
//! Lua script, so a lock is only released by its holder; `list_push` is one MULTI/EXEC of
//! RPUSH, LTRIM and PEXPIRE, so no reader sees an untrimmed or immortal list.
//!
//! [`Cache::is_ready`] is the outcome of the last command, refreshed by a PING every second
//! while idle. If the manager keeps failing for reasons a reconnect does not cure (a
//! connection set-up that Redis refused, e.g. while it was loading its data set), the pinger
//! replaces it with a fresh one. The URL is a secret: it and its password are scrubbed from
//! every message, and timeouts keep a call from hanging longer than [`COMMAND_TIMEOUT`].

use super::{Cache, CacheError, Rate, Reservation};
use crate::config::{CacheSettings, ConfigError};
use crate::secret::Scrubber;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ExistenceCheck, RedisError, Script, SetExpiry, SetOptions, Value};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

/// Longest any one cache call may take, connecting included.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle cache checks that Redis answers.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Failed pings in a row after which the connection manager is replaced.
const REBUILD_AFTER: u32 = 5;

/// Compare-and-delete: removes `KEYS[1]` only if it is a string equal to `ARGV[1]`.
const DELETE_IF_EQ: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Sliding-window slot: `KEYS[1]` is a sorted set of slot-taking times (ms, the server's
/// clock, so every process agrees); `ARGV` = limit, window ms, a unique member. Returns -1
/// when a slot was taken, else the ms until the oldest slot frees.
const TAKE_SLOT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now + 1)
";

/// Reservation against steady rates (GCRA, see `Cache::reserve`), all or nothing:
/// KEYS are the rates' keys; ARGV[1] the longest wait in µs (-1: unbounded), then per rate
/// its interval in µs, its burst and its cost. Returns {wait µs or -1 when too late, index of
/// the binding rate (0-based)}. Times are the server's, in µs.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local tats, wait, binding = {}, 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  if new_tat < now then new_tat = now end
  local room = burst
  if cost > room then room = cost end
  local w = new_tat - now - room * interval
  if w > wait then wait, binding = w, i - 1 end
  tats[i] = new_tat
end
if max_wait >= 0 and wait > max_wait then return {-1, binding} end
for i = 1, #KEYS do
  local ttl = math.ceil((tats[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', ttl)
end
return {math.floor(wait), binding}
";

/// Counter: `INCRBY KEYS[1] ARGV[1]`, with `PEXPIRE ARGV[2]` when this created it.
const ADD: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
";

/// The Redis cache; cheap to clone.
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    manager: RwLock<ConnectionManager>,
    prefix: String,
    ready: AtomicBool,
    scrub: Scrubber,
    delete_if_eq: Script,
    take_slot: Script,
    add: Script,
    reserve: Script,
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.inner.prefix)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Builds the cache and starts its pinger; returns at once without connecting, so a
    /// Redis that is down at start is only a not-ready cache. Needs a Tokio runtime. Fails
    /// only on settings that can never work (no or malformed URL).
    pub fn start(settings: &CacheSettings) -> Result<Self, ConfigError> {
        let invalid = |problem: String| ConfigError {
            key: "cache.url".into(),
            problem,
        };
        let url = settings
            .url
            .as_ref()
            .ok_or_else(|| invalid("is needed for the Redis backend".into()))?;
        let scrub = Scrubber::for_url(url);
        let client = redis::Client::open(url.expose())
            .map_err(|e| invalid(format!("not a valid Redis URL ({})", scrub.clean(e))))?;
        // Few, quick reconnect attempts inside a call: a caller waiting on a platform
        // callback would rather hear "unavailable" now than after a long backoff.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| invalid(scrub.clean(e)))?;
        let inner = Arc::new(Inner {
            client,
            config,
            manager: RwLock::new(manager),
            prefix: settings.key_prefix.clone(),
            ready: AtomicBool::new(false),
            scrub,
            delete_if_eq: Script::new(DELETE_IF_EQ),
            take_slot: Script::new(TAKE_SLOT),
            add: Script::new(ADD),
            reserve: Script::new(RESERVE),
        });
        tokio::spawn(ping_loop(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Waits until Redis answers, at most `timeout`; returns whether it does.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.inner.ping().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The full Redis key for a cache key: `{key_prefix}:{key}`.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}:{key}", self.inner.prefix)
    }
}

/// Milliseconds for `PX`/`PEXPIRE`: at least 1 (Redis refuses 0).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Inner {
    fn connection(&self) -> ConnectionManager {
        self.manager
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs one command or pipeline, with the timeout, and records the outcome.
    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        run: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, CacheError> {
        let mut connection = self.connection();
        let result = tokio::time::timeout(COMMAND_TIMEOUT, run(&mut connection)).await;
        match result {
            Ok(Ok(value)) => {
                self.set_ready(true, None);
                Ok(value)
            }
            Ok(Err(e)) if is_wrong_type(&e) => {
                self.set_ready(true, None);
                Err(CacheError::WrongType)
            }
            Ok(Err(e)) => {
                let message = format!("redis {what}: {}", self.scrub.clean(e));
                self.set_ready(false, Some(&message));
                Err(CacheError::Unavailable(message))
            }
            Err(_) => {
                let message = format!("redis {what}: no answer within {COMMAND_TIMEOUT:?}");
                self.set_ready(false, Some(&message));
                Err(CacheError::Unavailable(message))
            }
        }
    }

    /// Runs one command; see [`Inner::query`].
    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        command: &redis::Cmd,
    ) -> Result<T, CacheError> {
        self.query(what, async |c| command.query_async(c).await)
            .await
    }

    fn set_ready(&self, ready: bool, why: Option<&str>) {
        let was = self.ready.swap(ready, Ordering::AcqRel);
        match (was, ready) {
            (true, false) => tracing::warn!(error = why.unwrap_or(""), "Redis is unavailable"),
            (false, true) => tracing::info!("Redis answers"),
            _ => {}
        }
    }

    async fn ping(&self) -> bool {
        self.query("PING", async |c| {
            redis::cmd("PING").query_async::<()>(c).await
        })
        .await
        .is_ok()
    }

    /// Replaces the connection manager with a fresh, lazily connecting one.
    fn rebuild(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                *self.manager.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                tracing::info!("replaced the Redis connection after repeated failures");
            }
            Err(e) => {
                tracing::warn!(error = %self.scrub.clean(e), "could not rebuild the Redis connection")
            }
        }
    }
}

/// `SET key value <options>`.
fn set_command(key: &str, value: &str, options: SetOptions) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(key).arg(value).arg(options);
    set
}

fn is_wrong_type(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE")
}

/// Pings until the cache is dropped; keeps `is_ready` current while nobody calls.
async fn ping_loop(inner: Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.ping().await {
            failures = 0;
        } else {
            failures += 1;
            if failures >= REBUILD_AFTER {
                strong.rebuild();
                failures = 0;
            }
        }
        drop(strong);
        tokio::time::sleep(PING_EVERY).await;
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let key = self.full_key(key);
        self.inner.run("GET", redis::cmd("GET").arg(&key)).await
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CacheError> {
        let options = SetOptions::default().with_expiration(SetExpiry::PX(millis(ttl)));
        let set = set_command(&self.full_key(key), value, options);
        self.inner.run("SET", &set).await
    }

    async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, CacheError> {
        let options = SetOptions::default()
            .conditional_set(ExistenceCheck::NX)
            .with_expiration(SetExpiry::PX(millis(ttl)));
        let set = set_command(&self.full_key(key), value, options);
        let reply: Value = self.inner.run("SET NX", &set).await?;
        // OK when this call set it, nil when the key was there.
        Ok(!matches!(reply, Value::Nil))
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let key = self.full_key(key);
        self.inner.run("DEL", redis::cmd("DEL").arg(&key)).await
    }

    async fn delete_if_eq(&self, key: &str, expected: &str) -> Result<bool, CacheError> {
        let key = self.full_key(key);
        let script = &self.inner.delete_if_eq;
        let removed: i64 = self
            .inner
            .query("compare-and-delete", async |c| {
                script.key(&key).arg(expected).invoke_async(c).await
            })
            .await?;
        Ok(removed == 1)
    }

    async fn list_push(
        &self,
        key: &str,
        values: &[String],
        max_len: usize,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        if max_len == 0 {
            // LTRIM key -0 -1 would keep everything; an empty list is no list in Redis.
            return self.delete(key).await;
        }
        let key = self.full_key(key);
        let keep_from = -i64::try_from(max_len).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !values.is_empty() {
            pipe.cmd("RPUSH").arg(&key).arg(values).ignore();
        }
        pipe.cmd("LTRIM").arg(&key).arg(keep_from).arg(-1).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(millis(ttl)).ignore();
        self.inner
            .query("list push", async |c| pipe.query_async(c).await)
            .await
    }

    async fn list_range(&self, key: &str) -> Result<Vec<String>, CacheError> {
        let key = self.full_key(key);
        let range = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone();
        self.inner.run("LRANGE", &range).await
    }

    async fn add(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        let key = self.full_key(key);
        let script = &self.inner.add;
        self.inner
            .query("add", async |c| {
                script
                    .key(&key)
                    .arg(by)
                    .arg(millis(ttl))
                    .invoke_async(c)
                    .await
            })
            .await
    }

    async fn take_slot(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CacheError> {
        let key = self.full_key(key);
        let script = &self.inner.take_slot;
        let member = format!("{:032x}", rand::random::<u128>());
        let wait_ms: i64 = self
            .inner
            .query("take slot", async |c| {
                script
                    .key(&key)
                    .arg(limit)
                    .arg(millis(window))
                    .arg(&member)
                    .invoke_async(c)
                    .await
            })
            .await?;
        Ok((wait_ms >= 0).then(|| Duration::from_millis(wait_ms as u64)))
    }

    async fn reserve(
        &self,
        rates: &[Rate],
        max_wait: Option<Duration>,
    ) -> Result<Reservation, CacheError> {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut invocation = self.inner.reserve.prepare_invoke();
        invocation.arg(max_wait.map_or(-1, |d| i64::try_from(micros(d)).unwrap_or(i64::MAX)));
        for rate in rates {
            invocation
                .key(self.full_key(&rate.key))
                // Fractional µs: a high token rate has an interval below one.
                .arg(format!("{:.3}", rate.interval.as_secs_f64() * 1e6))
                .arg(rate.burst)
                .arg(rate.cost);
        }
        let (wait_us, binding): (i64, i64) = self
            .inner
            .query("reserve", async |c| invocation.invoke_async(c).await)
            .await?;
        let binding = usize::try_from(binding).unwrap_or(0);
        Ok(match u64::try_from(wait_us) {
            Ok(us) => Reservation::Wait {
                wait: Duration::from_micros(us),
                binding,
            },
            Err(_) => Reservation::TooLate { binding },
        })
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn ttl_is_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }

    #[tokio::test]
    async fn a_malformed_url_is_refused_without_echoing_it() {
        let settings = CacheSettings {
            url: Some(Secret::new("redis://:hunter2@[::1")),
            key_prefix: "p".into(),
        };
        let err = RedisCache::start(&settings).unwrap_err();
        assert_eq!(err.key, "cache.url");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let none = CacheSettings::default();
        assert_eq!(RedisCache::start(&none).unwrap_err().key, "cache.url");
    }
}
