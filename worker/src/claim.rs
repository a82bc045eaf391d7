//! One worker at a time per job. A broker hands a delivery to another worker as soon as the
//! first one's connection closes, while the first may still be answering it (its worker
//! lives; only its connection went): without a claim both answer. A worker claims a job in
//! the cache before it works on it and keeps the claim alive while it does; a second copy
//! waits for the claim to end — answered (the copy is a duplicate) or run out (its holder
//! died, and the copy takes over).

use shared::cache::{Cache, CacheError};
use std::sync::Arc;
use std::time::Duration;

/// A claim runs out this long after its holder last renewed it (a killed worker's jobs
/// wait at most this long for another worker).
const LEASE: Duration = Duration::from_secs(10);
/// The holder renews its claim this often.
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// A copy checks this often whether the claim has ended.
const POLL: Duration = Duration::from_millis(200);

/// How claiming a job ended.
pub(crate) enum Claim {
    /// This worker holds the job until the guard is dropped.
    Held(Held),
    /// Another worker answered the job while this copy waited.
    Answered,
}

/// A held claim: renewed while it lives, released when dropped.
pub(crate) struct Held {
    renew: tokio::task::JoinHandle<()>,
    cache: Arc<dyn Cache>,
    key: String,
    token: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renew.abort();
        // Not while the runtime itself goes away: the claim then runs out on its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (cache, key, token) = (self.cache.clone(), self.key.clone(), self.token.clone());
            runtime.spawn(async move {
                let _ = cache.delete_if_eq(&key, &token).await;
            });
        }
    }
}

/// Claims `job_id`, waiting while another worker holds it; the job counts as answered once
/// `answered_key` is set (checked while waiting).
pub(crate) async fn claim(
    cache: &Arc<dyn Cache>,
    job_id: &str,
    answered_key: &str,
) -> Result<Claim, CacheError> {
    let answered = async || cache.get(answered_key).await.map(|v| v.is_some());
    let key = format!("claim:{job_id}");
    let token = format!("{:016x}", rand::random::<u64>());
    let mut waited = false;
    loop {
        if cache.set_nx(&key, &token, LEASE).await? {
            if waited && answered().await? {
                let _ = cache.delete_if_eq(&key, &token).await;
                return Ok(Claim::Answered);
            }
            let renew = tokio::spawn(renew(cache.clone(), key.clone(), token.clone()));
            return Ok(Claim::Held(Held {
                renew,
                cache: cache.clone(),
                key,
                token,
            }));
        }
        if !waited {
            tracing::info!("another worker holds this job; waiting for it to answer or to go");
            waited = true;
        }
        tokio::time::sleep(POLL).await;
        if answered().await? {
            return Ok(Claim::Answered);
        }
    }
}

async fn renew(cache: Arc<dyn Cache>, key: String, token: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        // Renewed only while still ours: a claim that ran out may be another's by now.
        if matches!(cache.get(&key).await, Ok(Some(t)) if t == token) {
            let _ = cache.set(&key, &token, LEASE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::cache::MemoryCache;

    #[tokio::test]
    async fn a_second_copy_waits_for_the_first_and_sees_it_answered() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let Claim::Held(first) = claim(&cache, "j", "answered:j").await.unwrap() else {
            panic!("the first copy holds it");
        };
        let second = tokio::spawn({
            let cache = cache.clone();
            async move { claim(&cache, "j", "answered:j").await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !second.is_finished(),
            "the copy waits while the first works"
        );
        cache
            .set("answered:j", "1", Duration::from_secs(60))
            .await
            .unwrap();
        drop(first);
        let outcome = tokio::time::timeout(Duration::from_secs(2), second)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Claim::Answered));
    }

    #[tokio::test]
    async fn a_claim_given_up_unanswered_passes_to_the_copy() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let Claim::Held(first) = claim(&cache, "k", "answered:k").await.unwrap() else {
            panic!("held");
        };
        let copy = tokio::spawn({
            let cache = cache.clone();
            async move { claim(&cache, "k", "answered:k").await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(first);
        let again = tokio::time::timeout(Duration::from_secs(2), copy)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(again, Claim::Held(_)));
    }
}
