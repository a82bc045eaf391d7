//! The embedded cache backend: one map behind a mutex, expired lazily on read and swept
//! now and then. Built [`MemoryCache::durable`], every change of a string or a list is
//! committed to the data directory ([`Store`]) before the call returns, and what the
//! directory holds is loaded at start, so answered markers, saved answers, progress,
//! history and quotas outlive a crash. Rate-limit state (slots, reservations) stays in
//! memory: it is worth seconds, and losing it only forgets recent calls.

use super::{Cache, CacheError, Rate, Reservation};
use crate::store::{Committed, Store, Stored, Write};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

enum Value {
    Str(String),
    List(VecDeque<String>),
    /// When each slot of a sliding window was taken, oldest first.
    Slots(VecDeque<Instant>),
    /// A rate's theoretical arrival time.
    Tat(Instant),
}

struct Entry {
    value: Value,
    expires: Instant,
}

/// The embedded cache.
pub struct MemoryCache {
    map: Mutex<HashMap<String, Entry>>,
    ops: AtomicU64,
    /// Where changes are committed, when durable.
    store: Option<Store>,
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache").finish_non_exhaustive()
    }
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Sweep expired entries every this many writes, so memory stays bounded by live keys.
const SWEEP_EVERY: u64 = 4096;

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            ops: AtomicU64::new(0),
            store: None,
        }
    }

    /// A cache whose strings and lists are committed to `store`, holding again the
    /// `values` the store kept (from its snapshot).
    pub fn durable(store: Store, values: Vec<(String, Stored, i64)>) -> Self {
        let (now, now_ms) = (Instant::now(), crate::now_ms());
        let map = values
            .into_iter()
            .map(|(key, value, expires_ms)| {
                let value = match value {
                    Stored::Str(s) => Value::Str(s),
                    Stored::List(l) => Value::List(l.into()),
                };
                let left = Duration::from_millis(expires_ms.saturating_sub(now_ms).max(0) as u64);
                (
                    key,
                    Entry {
                        value,
                        expires: now + left,
                    },
                )
            })
            .collect();
        Self {
            map: Mutex::new(map),
            ops: AtomicU64::new(0),
            store: Some(store),
        }
    }

    /// Hands `key`'s new state to the store, when durable. Called under the map's lock, so
    /// the store commits changes in the order they were made.
    fn persist(&self, map: &HashMap<String, Entry>, key: &str, now: Instant) -> Option<Committed> {
        let store = self.store.as_ref()?;
        let expiry =
            |e: &Instant| crate::now_ms() + e.saturating_duration_since(now).as_millis() as i64;
        let value = match map.get(key) {
            None => None,
            Some(Entry {
                value: Value::Str(s),
                expires,
            }) => Some((Stored::Str(s.clone()), expiry(expires))),
            Some(Entry {
                value: Value::List(l),
                expires,
            }) => Some((Stored::List(l.iter().cloned().collect()), expiry(expires))),
            Some(_) => return None,
        };
        Some(store.submit(vec![Write::Value {
            key: key.to_string(),
            value,
        }]))
    }

    fn with_map<T>(
        &self,
        write: bool,
        f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T,
    ) -> T {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap();
        if write && self.ops.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            map.retain(|_, e| e.expires > now);
        }
        f(&mut map, now)
    }
}

fn live<'a>(map: &'a mut HashMap<String, Entry>, key: &str, now: Instant) -> Option<&'a mut Entry> {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.get_mut(key)
}

/// The live entry at `key`, or a new one holding `new()` for `ttl`.
fn live_or_new<'a>(
    map: &'a mut HashMap<String, Entry>,
    key: &str,
    now: Instant,
    ttl: Duration,
    new: impl FnOnce() -> Value,
) -> &'a mut Entry {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.entry(key.to_string()).or_insert_with(|| Entry {
        value: new(),
        expires: now + ttl,
    })
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.with_map(false, |map, now| match live(map, key, now) {
            None => Ok(None),
            Some(Entry {
                value: Value::Str(s),
                ..
            }) => Ok(Some(s.clone())),
            Some(_) => Err(CacheError::WrongType),
        })
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CacheError> {
        let committed = self.with_map(true, |map, now| {
            map.insert(
                key.to_string(),
                Entry {
                    value: Value::Str(value.to_string()),
                    expires: now + ttl,
                },
            );
            self.persist(map, key, now)
        });
        settled(committed).await
    }

    async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, CacheError> {
        let committed = self.with_map(true, |map, now| {
            if live(map, key, now).is_some() {
                return None;
            }
            map.insert(
                key.to_string(),
                Entry {
                    value: Value::Str(value.to_string()),
                    expires: now + ttl,
                },
            );
            Some(self.persist(map, key, now))
        });
        let set = committed.is_some();
        settled(committed.flatten()).await?;
        Ok(set)
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let committed = self.with_map(true, |map, now| {
            map.remove(key)?;
            self.persist(map, key, now)
        });
        settled(committed).await
    }

    async fn delete_if_eq(&self, key: &str, expected: &str) -> Result<bool, CacheError> {
        let committed = self.with_map(true, |map, now| {
            let same = matches!(live(map, key, now), Some(Entry { value: Value::Str(s), .. }) if s == expected);
            if !same {
                return None;
            }
            map.remove(key);
            Some(self.persist(map, key, now))
        });
        let removed = committed.is_some();
        settled(committed.flatten()).await?;
        Ok(removed)
    }

    async fn list_push(
        &self,
        key: &str,
        values: &[String],
        max_len: usize,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let committed = self.with_map(true, |map, now| {
            let entry = live_or_new(map, key, now, ttl, || Value::List(VecDeque::new()));
            let Value::List(list) = &mut entry.value else {
                return Err(CacheError::WrongType);
            };
            list.extend(values.iter().cloned());
            while list.len() > max_len {
                list.pop_front();
            }
            entry.expires = now + ttl;
            Ok(self.persist(map, key, now))
        })?;
        settled(committed).await
    }

    async fn list_range(&self, key: &str) -> Result<Vec<String>, CacheError> {
        self.with_map(false, |map, now| match live(map, key, now) {
            None => Ok(Vec::new()),
            Some(Entry {
                value: Value::List(l),
                ..
            }) => Ok(l.iter().cloned().collect()),
            Some(_) => Err(CacheError::WrongType),
        })
    }

    async fn add(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, CacheError> {
        let (n, committed) = self.with_map(true, |map, now| {
            let entry = live_or_new(map, key, now, ttl, || Value::Str("0".into()));
            let Value::Str(s) = &mut entry.value else {
                return Err(CacheError::WrongType);
            };
            let n = s.parse::<i64>().map_err(|_| CacheError::WrongType)? + by;
            *s = n.to_string();
            // Adding 0 reads the counter: nothing to keep.
            let committed = (by != 0).then(|| self.persist(map, key, now)).flatten();
            Ok((n, committed))
        })?;
        settled(committed).await?;
        Ok(n)
    }

    async fn take_slot(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Option<Duration>, CacheError> {
        self.with_map(true, |map, now| {
            let entry = live_or_new(map, key, now, window, || Value::Slots(VecDeque::new()));
            let Value::Slots(taken) = &mut entry.value else {
                return Err(CacheError::WrongType);
            };
            while taken
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                taken.pop_front();
            }
            if taken.len() < limit as usize {
                taken.push_back(now);
                entry.expires = now + window;
                return Ok(None);
            }
            let oldest = taken.front().copied().unwrap_or(now);
            Ok(Some((oldest + window).saturating_duration_since(now)))
        })
    }

    async fn reserve(
        &self,
        rates: &[Rate],
        max_wait: Option<Duration>,
    ) -> Result<Reservation, CacheError> {
        self.with_map(true, |map, now| {
            let mut next = Vec::with_capacity(rates.len());
            let (mut wait, mut binding) = (Duration::ZERO, 0);
            for (i, rate) in rates.iter().enumerate() {
                let tat = match live(map, &rate.key, now) {
                    None => now,
                    Some(Entry {
                        value: Value::Tat(t),
                        ..
                    }) => (*t).max(now),
                    Some(_) => return Err(CacheError::WrongType),
                };
                let (new_tat, w) = gcra_step(tat, now, rate);
                if w > wait {
                    (wait, binding) = (w, i);
                }
                next.push(new_tat);
            }
            if max_wait.is_some_and(|max| wait > max) {
                return Ok(Reservation::TooLate { binding });
            }
            for (rate, tat) in rates.iter().zip(next) {
                map.insert(
                    rate.key.clone(),
                    Entry {
                        value: Value::Tat(tat),
                        expires: tat + Duration::from_secs(1),
                    },
                );
            }
            Ok(Reservation::Wait { wait, binding })
        })
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Waits for a change handed to the store, if any.
async fn settled(committed: Option<Committed>) -> Result<(), CacheError> {
    match committed {
        Some(c) => c
            .wait()
            .await
            .map_err(|e| CacheError::Unavailable(e.to_string())),
        None => Ok(()),
    }
}

/// One rate's step of a reservation: its new theoretical arrival time and how long until
/// the reserved call may start (the same arithmetic as the Redis script).
fn gcra_step(tat: Instant, now: Instant, rate: &Rate) -> (Instant, Duration) {
    let units = rate.cost.unsigned_abs().min(u32::MAX as u64) as u32;
    let span = rate.interval.saturating_mul(units);
    let new_tat = if rate.cost >= 0 {
        tat + span
    } else {
        tat.checked_sub(span).unwrap_or(now).max(now)
    };
    let room = rate.interval.saturating_mul(
        rate.burst
            .max(u32::try_from(rate.cost.max(0)).unwrap_or(u32::MAX)),
    );
    let wait = new_tat.saturating_duration_since(now).saturating_sub(room);
    (new_tat, wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn values_expire() {
        let c = MemoryCache::new();
        c.set("k", "v", Duration::from_millis(20)).await.unwrap();
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some("v"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn set_nx_sets_once_and_delete_if_eq_compares() {
        let c = MemoryCache::new();
        assert!(c.set_nx("k", "a", LONG).await.unwrap());
        assert!(!c.set_nx("k", "b", LONG).await.unwrap());
        assert!(!c.delete_if_eq("k", "b").await.unwrap());
        assert!(c.delete_if_eq("k", "a").await.unwrap());
        assert!(c.set_nx("k", "c", LONG).await.unwrap());
    }

    #[tokio::test]
    async fn counters_add_and_slots_slide() {
        let c = MemoryCache::new();
        assert_eq!(c.add("n", 2, LONG).await.unwrap(), 2);
        assert_eq!(c.add("n", 0, LONG).await.unwrap(), 2);
        let window = Duration::from_millis(200);
        assert_eq!(c.take_slot("w", 2, window).await.unwrap(), None);
        assert_eq!(c.take_slot("w", 2, window).await.unwrap(), None);
        let wait = c.take_slot("w", 2, window).await.unwrap().unwrap();
        assert!(wait > Duration::ZERO && wait <= window);
        tokio::time::sleep(wait).await;
        assert_eq!(c.take_slot("w", 2, window).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_durable_cache_holds_again_what_was_written_and_not_what_expired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, snapshot) = Store::open(dir.path(), false).unwrap();
            let c = MemoryCache::durable(store, snapshot.values);
            c.set("answered:a", "1", LONG).await.unwrap();
            assert!(c.set_nx("working:a", "1", LONG).await.unwrap());
            c.set("answer:a", "x", LONG).await.unwrap();
            c.delete("answer:a").await.unwrap();
            c.set("token", "t", LONG).await.unwrap();
            assert!(c.delete_if_eq("token", "t").await.unwrap());
            c.set("brief", "1", Duration::from_millis(30))
                .await
                .unwrap();
            for i in 0..4 {
                c.list_push("history:c", &[i.to_string()], 3, LONG)
                    .await
                    .unwrap();
            }
            assert_eq!(c.add("quota:n", 2, LONG).await.unwrap(), 2);
            assert_eq!(c.take_slot("w", 1, LONG).await.unwrap(), None);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (store, snapshot) = Store::open(dir.path(), false).unwrap();
        let c = MemoryCache::durable(store, snapshot.values);
        assert_eq!(c.get("answered:a").await.unwrap().as_deref(), Some("1"));
        assert!(!c.set_nx("working:a", "2", LONG).await.unwrap());
        for gone in ["answer:a", "token", "brief"] {
            assert_eq!(c.get(gone).await.unwrap(), None, "{gone}");
        }
        assert_eq!(c.list_range("history:c").await.unwrap(), ["1", "2", "3"]);
        assert_eq!(c.add("quota:n", 1, LONG).await.unwrap(), 3);
        assert_eq!(
            c.take_slot("w", 1, LONG).await.unwrap(),
            None,
            "rate state is not kept"
        );
    }

    #[tokio::test]
    async fn lists_keep_the_newest_items() {
        let c = MemoryCache::new();
        for i in 0..5 {
            c.list_push("l", &[i.to_string()], 3, LONG).await.unwrap();
        }
        assert_eq!(c.list_range("l").await.unwrap(), vec!["2", "3", "4"]);
        c.delete("l").await.unwrap();
        assert!(c.list_range("l").await.unwrap().is_empty());
        c.set("s", "x", LONG).await.unwrap();
        assert!(matches!(
            c.list_range("s").await,
            Err(CacheError::WrongType)
        ));
    }
}
