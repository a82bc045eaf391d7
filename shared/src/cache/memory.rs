//! The embedded cache backend: one map behind a mutex, expired lazily on read and swept
//! now and then.

use super::{Cache, CacheError};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

enum Value {
    Str(String),
    List(VecDeque<String>),
}

struct Entry {
    value: Value,
    expires: Instant,
}

/// The embedded cache.
pub struct MemoryCache {
    map: Mutex<HashMap<String, Entry>>,
    ops: AtomicU64,
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
        }
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
        self.with_map(true, |map, now| {
            map.insert(
                key.to_string(),
                Entry {
                    value: Value::Str(value.to_string()),
                    expires: now + ttl,
                },
            );
        });
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, CacheError> {
        Ok(self.with_map(true, |map, now| {
            if live(map, key, now).is_some() {
                return false;
            }
            map.insert(
                key.to_string(),
                Entry {
                    value: Value::Str(value.to_string()),
                    expires: now + ttl,
                },
            );
            true
        }))
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.with_map(true, |map, _| map.remove(key));
        Ok(())
    }

    async fn delete_if_eq(&self, key: &str, expected: &str) -> Result<bool, CacheError> {
        Ok(self.with_map(true, |map, now| {
            let same = matches!(live(map, key, now), Some(Entry { value: Value::Str(s), .. }) if s == expected);
            if same {
                map.remove(key);
            }
            same
        }))
    }

    async fn list_push(
        &self,
        key: &str,
        values: &[String],
        max_len: usize,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        self.with_map(true, |map, now| {
            let entry = match live(map, key, now) {
                Some(e) => e,
                None => map.entry(key.to_string()).or_insert(Entry {
                    value: Value::List(VecDeque::new()),
                    expires: now + ttl,
                }),
            };
            let Value::List(list) = &mut entry.value else {
                return Err(CacheError::WrongType);
            };
            list.extend(values.iter().cloned());
            while list.len() > max_len {
                list.pop_front();
            }
            entry.expires = now + ttl;
            Ok(())
        })
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

    fn is_ready(&self) -> bool {
        true
    }
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
