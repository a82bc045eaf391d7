//! The HTTP plumbing both platform messengers share: the process's HTTP client, the API
//! base URL, the bot's entry in the shared token cache, and the metric and error shapes of
//! platform calls. Platform modules keep only what really differs: endpoints, bodies and
//! how each platform spells success, throttling and a refused token.

use crate::platform::SendError;
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::secret::Secret;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// One bot's connection to its platform's API.
pub struct PlatformApi {
    /// The shared HTTP client.
    pub http: reqwest::Client,
    base: String,
    /// The token cache and this bot's key in it; None for APIs without tokens (robots).
    tokens: Option<(Arc<TokenCache>, String)>,
    platform: &'static str,
}

impl fmt::Debug for PlatformApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformApi")
            .field("platform", &self.platform)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl PlatformApi {
    /// `platform` is the metric label; `token_key` names the bot's token in the cache.
    pub fn new(
        platform: &'static str,
        http: reqwest::Client,
        base: &str,
        tokens: Arc<TokenCache>,
        token_key: String,
    ) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            tokens: Some((tokens, token_key)),
            platform,
        }
    }

    /// An API that needs no access token (group robot webhooks carry theirs in the URL).
    pub fn without_token(platform: &'static str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: String::new(),
            tokens: None,
            platform,
        }
    }

    /// The full URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Counts one call in `parley_platform_requests_total`.
    pub fn record(&self, api: &str, outcome: &str) {
        crate::metrics::get()
            .platform_requests
            .with_label_values(&[self.platform, api, outcome])
            .inc();
    }

    /// A transport failure as a retryable error. reqwest errors print the URL, and platform
    /// URLs may carry secrets or tokens in the query, so only the kind of failure is kept.
    pub fn network_error(&self, api: &str, e: &reqwest::Error) -> SendError {
        self.record(api, "network");
        let kind = if e.is_timeout() {
            "timeout"
        } else {
            "connection failed"
        };
        SendError::Retryable {
            reason: format!("{api}: {kind}"),
            after: None,
        }
    }

    /// Calls the platform with the bot's token, fetching it with `fetch` when needed and
    /// refreshing it once if the platform refuses it.
    pub async fn with_token<T, F, Fut, C, CFut>(&self, fetch: F, call: C) -> Result<T, SendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<AccessToken, SendError>>,
        C: Fn(Secret) -> CFut,
        CFut: Future<Output = Result<Authorized<T>, SendError>>,
    {
        let counted_fetch = || {
            crate::metrics::get()
                .token_fetches
                .with_label_values(&[self.platform])
                .inc();
            fetch()
        };
        let Some((tokens, key)) = &self.tokens else {
            return Err(SendError::Permanent(format!(
                "{} API has no access token",
                self.platform
            )));
        };
        tokens.call(key, counted_fetch, call).await
    }
}
