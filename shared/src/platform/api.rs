//! The HTTP plumbing every platform messenger shares: the process's HTTP client, the API
//! base URL, the bot's entry in the shared token cache, and the one path of a platform
//! call ([`PlatformApi::call`]): send, read the JSON body, let the platform's error table
//! classify it into a [`Verdict`], count it in the metric. Platform modules keep only what
//! really differs: endpoints, bodies and their error tables, i.e. how each platform spells
//! success, throttling (and the wait it asks for), a refused token and a permanent refusal.

use crate::platform::SendError;
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::secret::Secret;
use reqwest::StatusCode;
use serde_json::Value;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A platform error table's reading of one answer: the outcome label the call is counted
/// under in `parley_platform_requests_total`, and what the caller gets.
#[derive(Debug)]
pub struct Verdict<T> {
    outcome: &'static str,
    result: Result<T, SendError>,
}

impl<T> Verdict<T> {
    /// Success, counted as `ok`.
    pub fn ok(value: T) -> Self {
        Self::new("ok", Ok(value))
    }

    /// Any reading, counted as `outcome`.
    pub fn new(outcome: &'static str, result: Result<T, SendError>) -> Self {
        Self { outcome, result }
    }

    /// A failure worth retrying (after `after`, when the platform asked for a wait).
    pub fn retry(outcome: &'static str, reason: String, after: Option<Duration>) -> Self {
        Self::new(outcome, Err(SendError::Retryable { reason, after }))
    }

    /// A refusal for good, counted as `refused`.
    pub fn refused(reason: String) -> Self {
        Self::new("refused", Err(SendError::Permanent(reason)))
    }
}

impl<T> Verdict<Authorized<T>> {
    /// The platform refused the access token, counted as `token_refused`; the token cache
    /// drops it and the call is made once more.
    pub fn token_refused() -> Self {
        Self::new("token_refused", Ok(Authorized::TokenRefused))
    }
}

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

    /// The one path of a platform call: sends `request`, reads the JSON body (one that is
    /// not JSON reads as `null`), lets the platform's error `table` classify status and
    /// body, and counts the call under the verdict's outcome. A transport failure is
    /// retryable and counted as `network`.
    pub async fn call<T>(
        &self,
        api: &str,
        request: reqwest::RequestBuilder,
        table: impl FnOnce(StatusCode, &Value) -> Verdict<T>,
    ) -> Result<T, SendError> {
        let resp = request
            .send()
            .await
            .map_err(|e| self.network_error(api, &e))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        let verdict = table(status, &body);
        self.record(api, verdict.outcome);
        verdict.result
    }

    /// Counts one call in `parley_platform_requests_total`.
    fn record(&self, api: &str, outcome: &str) {
        crate::metrics::get()
            .platform_requests
            .with_label_values(&[self.platform, api, outcome])
            .inc();
    }

    /// A transport failure as a retryable error. reqwest errors print the URL, and platform
    /// URLs may carry secrets or tokens in the query, so only the kind of failure is kept.
    fn network_error(&self, api: &str, e: &reqwest::Error) -> SendError {
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
