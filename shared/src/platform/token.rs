//! Platform access tokens, shared by every worker through the cache. DingTalk and WeCom
//! both hand out 2-hour tokens, rate-limit the fetch, and may revoke a token early; so both
//! go through this one cache: fetch once per expiry window (single-flight within the
//! process by a mutex, across processes by a short lock key in the cache), reuse until a
//! few minutes before expiry, and drop a token the platform rejected so the next call
//! fetches a fresh one.

use crate::cache::Cache;
use crate::secret::Secret;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A token as the platform returned it.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The token.
    pub value: Secret,
    /// How long the platform says it is valid.
    pub expires_in: Duration,
}

/// The outcome of one API call made with a token.
#[derive(Debug)]
pub enum Authorized<T> {
    /// The platform accepted the token; here is the call's result.
    Ok(T),
    /// The platform refused the token (expired or revoked early).
    TokenRefused,
}

/// The platform refused a freshly fetched token too.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the platform refused a fresh access token")]
pub struct TokenRefused;

/// How long before the platform's expiry a token stops being reused.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long one process may hold the fetch lock.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How often a process waiting for another's fetch looks again.
const POLL: Duration = Duration::from_millis(50);

/// The shared token cache.
pub struct TokenCache {
    cache: Arc<dyn Cache>,
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A token cache over `cache`.
    pub fn new(cache: Arc<dyn Cache>) -> Self {
        Self {
            cache,
            local: Mutex::new(HashMap::new()),
        }
    }

    /// The token at `key` (e.g. `token:dingtalk:APPKEY`), fetching it with `fetch` if no
    /// valid one is cached. Concurrent callers share one fetch.
    pub async fn get<E, F, Fut>(&self, key: &str, fetch: F) -> Result<Secret, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<AccessToken, E>>,
    {
        if let Some(t) = self.cached(key).await {
            return Ok(t);
        }
        let local = {
            let mut map = self.local.lock().unwrap();
            map.entry(key.to_string()).or_default().clone()
        };
        let _guard = local.lock().await;
        if let Some(t) = self.cached(key).await {
            return Ok(t);
        }
        let lock_key = format!("{key}:lock");
        let mut waited = Duration::ZERO;
        loop {
            match self.cache.set_nx(&lock_key, "1", LOCK_TTL).await {
                Ok(true) | Err(_) => break,
                Ok(false) => {
                    // Another process is fetching: wait for its result rather than racing it.
                    tokio::time::sleep(POLL).await;
                    waited += POLL;
                    if let Some(t) = self.cached(key).await {
                        return Ok(t);
                    }
                    if waited >= LOCK_TTL {
                        break;
                    }
                }
            }
        }
        let result = fetch().await;
        if let Ok(token) = &result {
            let margin = REFRESH_MARGIN.min(token.expires_in / 2);
            let ttl = token
                .expires_in
                .saturating_sub(margin)
                .max(Duration::from_secs(1));
            if let Err(e) = self.cache.set(key, token.value.expose(), ttl).await {
                tracing::warn!(error = %e, "could not store an access token in the cache");
            }
        }
        let _ = self.cache.delete(&lock_key).await;
        result.map(|t| t.value)
    }

    /// Calls a platform API with the token at `key`: if the platform refuses the token
    /// (`Authorized::TokenRefused`), drops it and calls once more with a fresh one. Both
    /// platforms revoke tokens early now and then; this is the one place that handles it.
    pub async fn call<T, E, F, Fut, C, CFut>(&self, key: &str, fetch: F, call: C) -> Result<T, E>
    where
        E: From<TokenRefused>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<AccessToken, E>>,
        C: Fn(Secret) -> CFut,
        CFut: Future<Output = Result<Authorized<T>, E>>,
    {
        for _ in 0..2 {
            let token = self.get(key, &fetch).await?;
            match call(token.clone()).await? {
                Authorized::Ok(v) => return Ok(v),
                Authorized::TokenRefused => self.invalidate(key, &token).await,
            }
        }
        Err(TokenRefused.into())
    }

    /// Forgets `stale` (a token the platform refused) unless it was already replaced.
    pub async fn invalidate(&self, key: &str, stale: &Secret) {
        if let Err(e) = self.cache.delete_if_eq(key, stale.expose()).await {
            tracing::warn!(error = %e, "could not drop a refused access token from the cache");
        }
    }

    async fn cached(&self, key: &str) -> Option<Secret> {
        match self.cache.get(key).await {
            Ok(v) => v.map(Secret::new),
            Err(e) => {
                tracing::warn!(error = %e, "token cache read failed; fetching a token");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_invalidate_refetches() {
        let tokens = Arc::new(TokenCache::new(Arc::new(MemoryCache::new())));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (tokens, fetches) = (tokens.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                tokens
                    .get("t", || async {
                        let n = fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, ()>(AccessToken {
                            value: Secret::new(format!("tok{n}")),
                            expires_in: Duration::from_secs(7200),
                        })
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "tok0");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        tokens.invalidate("t", &Secret::new("tok0")).await;
        let t = tokens
            .get("t", || async {
                Ok::<_, ()>(AccessToken {
                    value: Secret::new("tok1"),
                    expires_in: Duration::from_secs(7200),
                })
            })
            .await
            .unwrap();
        assert_eq!(t.expose(), "tok1");
    }
}
