//! The LLM seam and its OpenAI-compatible client. One call = one chat completion, retried
//! on connection errors, timeouts, 408/409/429/5xx (not on `insufficient_quota`) with the
//! delay the server asks for (`retry-after-ms`, `Retry-After`) or capped exponential backoff
//! with jitter — the policy of the official SDK. Reasoning output (`<think>` blocks,
//! `reasoning_content`) is dropped here so it can never reach a chat.
//!
//! A call may also stream (`stream: true`, read by [`sse`] and [`stream`]): the visible text
//! so far is published as it grows, so a reply can show the answer while it is written. A
//! streamed call is retried only while nothing of it has been shown.

pub mod sse;
pub mod stream;
pub mod upstreams;

pub use upstreams::Upstreams;

/// Azure OpenAI's `api-version` when an upstream does not set one.
const AZURE_API_VERSION: &str = "2024-10-21";

use crate::config::{LlmSettings, UpstreamKind, UpstreamSettings};
use crate::secret::Secret;
use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How one call is asked, when not as `[llm]` says: another model, another upstream first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Route<'a> {
    /// The model (Azure: the deployment) instead of the upstream's own.
    pub model: Option<&'a str>,
    /// The `[[llm.upstreams]]` name to ask first; the others remain the failover.
    pub upstream: Option<&'a str>,
}

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The chatter.
    User,
    /// The model.
    Assistant,
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A model answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The visible answer, reasoning removed.
    pub text: String,
    /// Prompt tokens, if reported.
    pub prompt_tokens: u64,
    /// Completion tokens, if reported.
    pub completion_tokens: u64,
    /// The upstream that answered (empty when a single client answered).
    pub upstream: String,
}

/// Why the model gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    /// No answer within the timeout.
    #[error("model call timed out")]
    Timeout,
    /// Could not connect or the connection broke.
    #[error("model unreachable: {0}")]
    Network(String),
    /// 429 rate limit, still after retries.
    #[error("model rate limit")]
    RateLimited,
    /// 429 `insufficient_quota`: billing, not worth retrying.
    #[error("model quota exhausted")]
    QuotaExhausted,
    /// 5xx, still after retries.
    #[error("model server error {0}")]
    Server(u16),
    /// 4xx other than 429: our request or our key is wrong.
    #[error("model refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The provider's message, trimmed.
        message: String,
    },
    /// A 2xx whose body is not a chat completion, or has no text.
    #[error("model answer malformed: {0}")]
    Malformed(String),
    /// A stream that broke off: an error object mid-stream, or an end before it finished.
    #[error("model stream interrupted: {0}")]
    Interrupted(String),
}

impl LlmError {
    /// Label for `parley_llm_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            LlmError::Timeout => "timeout",
            LlmError::Network(_) => "network",
            LlmError::RateLimited => "rate_limited",
            LlmError::QuotaExhausted => "quota_exhausted",
            LlmError::Server(_) => "server_error",
            LlmError::Refused { .. } => "refused",
            LlmError::Malformed(_) => "malformed",
            LlmError::Interrupted(_) => "interrupted",
        }
    }
}

/// The LLM seam.
#[async_trait]
pub trait LlmClient: Send + Sync + fmt::Debug {
    /// One chat completion for `messages`, asked as `route` says.
    async fn chat(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
    ) -> Result<Completion, LlmError>;

    /// Each upstream's name and health ("healthy", "open", "probing"), for `/status`.
    fn health(&self) -> Vec<(String, &'static str)> {
        Vec::new()
    }

    /// One chat completion, streamed: `shown` holds the visible text so far (reasoning
    /// removed) and is updated as it grows. The default shows the whole answer at once.
    async fn chat_streaming(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
        shown: &watch::Sender<String>,
    ) -> Result<Completion, LlmError> {
        let c = self.chat(route, messages).await?;
        shown.send_replace(c.text.clone());
        Ok(c)
    }
}

/// Client for one upstream: any OpenAI-compatible `/chat/completions` endpoint, or Azure
/// OpenAI's deployment route.
pub struct OpenAiClient {
    http: reqwest::Client,
    name: String,
    kind: UpstreamKind,
    base_url: String,
    api_version: String,
    api_key: Secret,
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    max_retries: u32,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct Response {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub(crate) prompt_tokens: u64,
    #[serde(default)]
    pub(crate) completion_tokens: u64,
}

/// One failed attempt: the error, and whether and when to try again.
struct Attempt {
    error: LlmError,
    retry: bool,
    after: Option<Duration>,
}

impl OpenAiClient {
    /// A client for the first upstream of `[llm]`.
    pub fn new(settings: &LlmSettings) -> Result<Self, reqwest::Error> {
        let first = settings.upstream_list().remove(0);
        Self::for_upstream(&first, settings)
    }

    /// A client for `upstream`, with `[llm]`'s defaults for what it does not set.
    pub fn for_upstream(
        upstream: &UpstreamSettings,
        settings: &LlmSettings,
    ) -> Result<Self, reqwest::Error> {
        let timeout = upstream.timeout_secs.unwrap_or(settings.timeout_secs);
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(timeout))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(settings.max_concurrency);
        if let Some(proxy) = upstream.proxy.as_ref().or(settings.proxy.as_ref()) {
            http = http.proxy(reqwest::Proxy::all(proxy.expose())?);
        }
        let http = http.build()?;
        Ok(Self {
            http,
            name: upstream.name.clone(),
            kind: upstream.kind,
            base_url: upstream.base_url.trim_end_matches('/').to_string(),
            api_version: upstream
                .api_version
                .clone()
                .unwrap_or_else(|| AZURE_API_VERSION.into()),
            api_key: upstream.api_key.clone(),
            model: upstream
                .model
                .clone()
                .unwrap_or_else(|| settings.model.clone()),
            max_tokens: settings.max_tokens,
            temperature: settings.temperature,
            max_retries: settings.max_retries,
        })
    }

    /// Sends one request; a transport failure is a retryable attempt.
    async fn send(
        &self,
        model: Option<&str>,
        messages: &[ChatMessage],
        stream: bool,
    ) -> Result<reqwest::Response, Attempt> {
        let model = model.unwrap_or(&self.model);
        let body = Request {
            model,
            messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let mut req = match self.kind {
            UpstreamKind::OpenAi => {
                let req = self
                    .http
                    .post(format!("{}/chat/completions", self.base_url));
                match self.api_key.is_empty() {
                    true => req,
                    false => req.bearer_auth(self.api_key.expose()),
                }
            }
            UpstreamKind::Azure => self
                .http
                .post(format!(
                    "{}/openai/deployments/{model}/chat/completions",
                    self.base_url
                ))
                .query(&[("api-version", self.api_version.as_str())])
                .header("api-key", self.api_key.expose()),
        };
        req = req.json(&body);
        let resp = req.send().await.map_err(Attempt::transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(refusal(resp).await)
    }

    async fn attempt(
        &self,
        model: Option<&str>,
        messages: &[ChatMessage],
    ) -> Result<Completion, Attempt> {
        let resp = self.send(model, messages, false).await?;
        let bytes = resp.bytes().await.map_err(Attempt::transport)?;
        parse_completion(&bytes).map_err(Attempt::final_error)
    }

    /// One streamed attempt. Once something was shown, a failure is final: a retry would
    /// show the chatter the answer starting over.
    async fn attempt_streaming(
        &self,
        model: Option<&str>,
        messages: &[ChatMessage],
        shown: &watch::Sender<String>,
    ) -> Result<Completion, Attempt> {
        let mut resp = self.send(model, messages, true).await?;
        let mut decoder = sse::SseDecoder::default();
        let mut state = stream::StreamState::default();
        let mut visible = String::new();
        let fail = |error: LlmError, visible: &str| Attempt {
            error,
            retry: visible.is_empty(),
            after: None,
        };
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let mut a = Attempt::transport(e);
                    a.retry = visible.is_empty();
                    return Err(a);
                }
            };
            let events = decoder
                .feed(&chunk)
                .map_err(|e| fail(LlmError::Malformed(e.to_string()), &visible))?;
            for data in events {
                if state.on_data(&data).map_err(|e| fail(e, &visible))? == stream::Step::Done {
                    return state.into_completion().map_err(Attempt::final_error);
                }
            }
            let now = state.visible();
            if now != visible {
                visible = now;
                shown.send_replace(visible.clone());
            }
        }
        if let Some(data) = decoder.finish() {
            state.on_data(&data).map_err(|e| fail(e, &visible))?;
        }
        // Some servers close without `[DONE]` after the last chunk; a finish_reason says
        // the answer is whole. Without one the answer was cut off.
        if state.finished() {
            return state.into_completion().map_err(Attempt::final_error);
        }
        Err(fail(
            LlmError::Interrupted("stream ended before the answer finished".into()),
            &visible,
        ))
    }

    /// Makes attempts until one succeeds, one fails for good, or retries run out; counts
    /// each in the metrics.
    async fn with_retries<F, Fut>(&self, attempt: F) -> Result<Completion, LlmError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Completion, Attempt>>,
    {
        let m = crate::metrics::get();
        let mut n = 0;
        loop {
            let started = Instant::now();
            match attempt().await {
                Ok(c) => {
                    m.llm_requests.with_label_values(&["ok"]).inc();
                    m.llm_duration
                        .with_label_values(&[self.name.as_str()])
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Completion {
                        upstream: self.name.clone(),
                        ..c
                    });
                }
                Err(a) => {
                    m.llm_requests.with_label_values(&[a.error.outcome()]).inc();
                    if !a.retry || n >= self.max_retries {
                        return Err(a.error);
                    }
                    let delay = a.after.unwrap_or_else(|| backoff(n));
                    tracing::warn!(error = %a.error, attempt = n + 1, delay_ms = delay.as_millis() as u64, "model call failed; retrying");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
            }
        }
    }
}

impl Attempt {
    /// A transport failure (connect, timeout, a body cut off): worth another try.
    fn transport(e: reqwest::Error) -> Self {
        Self {
            error: if e.is_timeout() {
                LlmError::Timeout
            } else {
                LlmError::Network(without_url(&e))
            },
            retry: true,
            after: None,
        }
    }

    /// An answer that came but is not usable: asking again would get the same.
    fn final_error(error: LlmError) -> Self {
        Self {
            error,
            retry: false,
            after: None,
        }
    }
}

/// Reads a non-2xx answer into an attempt: what failed, whether the official SDK's policy
/// retries it, and the wait the server asked for.
async fn refusal(resp: reqwest::Response) -> Attempt {
    let status = resp.status().as_u16();
    let after = retry_after(resp.headers());
    let should_retry = resp
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v == "true");
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = error_fields(&text);
    let error = match status {
        429 if code == "insufficient_quota" => LlmError::QuotaExhausted,
        429 => LlmError::RateLimited,
        500..=599 => LlmError::Server(status),
        _ => LlmError::Refused { status, message },
    };
    let retry = should_retry.unwrap_or(match error {
        LlmError::QuotaExhausted => false,
        LlmError::Refused { status, .. } => matches!(status, 408 | 409),
        _ => true,
    });
    Attempt {
        error,
        retry,
        after,
    }
}

#[async_trait]
impl LlmClient for OpenAiClient {
    async fn chat(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
    ) -> Result<Completion, LlmError> {
        self.with_retries(|| self.attempt(route.model, messages))
            .await
    }

    async fn chat_streaming(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
        shown: &watch::Sender<String>,
    ) -> Result<Completion, LlmError> {
        self.with_retries(|| self.attempt_streaming(route.model, messages, shown))
            .await
    }
}

/// reqwest errors print the URL; ours may carry a key in the query of some providers.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<model url>");
    }
    s
}

fn parse_completion(bytes: &[u8]) -> Result<Completion, LlmError> {
    let r: Response =
        serde_json::from_slice(bytes).map_err(|e| LlmError::Malformed(e.to_string()))?;
    let content = r
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.message.content)
        .ok_or_else(|| LlmError::Malformed("no choices[0].message.content".into()))?;
    let text = strip_reasoning(&content);
    if text.is_empty() {
        return Err(LlmError::Malformed("empty answer".into()));
    }
    let usage = r.usage.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    Ok(Completion {
        upstream: String::new(),
        text,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    })
}

fn error_fields(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let err = &v["error"];
    let code = err["code"].as_str().unwrap_or_default().to_string();
    (code, trimmed(err["message"].as_str().unwrap_or(body)))
}

/// A provider's message, cut to 200 bytes on a character boundary.
fn trimmed(message: &str) -> String {
    crate::split::truncate_bytes(message, 200).to_string()
}

/// The delay the server asked for, if it is sane (0 < d ≤ 120 s): `retry-after-ms`,
/// `Retry-After` (seconds), else the later of OpenAI's `x-ratelimit-reset-requests` and
/// `x-ratelimit-reset-tokens` (`1s`, `6m0s`, `20ms`).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let d = if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::from_secs_f64(ms / 1000.0)
    } else if get("retry-after").is_none() {
        ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
            .iter()
            .filter_map(|h| get(h).and_then(reset_duration))
            .max()?
    } else {
        let secs = get("retry-after")?.trim().parse::<f64>().ok()?;
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::from_secs_f64(secs)
    };
    (d > Duration::ZERO && d <= Duration::from_secs(120)).then_some(d)
}

/// A duration as OpenAI's reset headers write it: numbers with `h`, `m`, `s` or `ms`.
fn reset_duration(v: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = v.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else {
            match rest.chars().next()? {
                'h' => (3600.0, 1),
                'm' => (60.0, 1),
                's' => (1.0, 1),
                _ => return None,
            }
        };
        total += value * unit;
        rest = &rest[len..];
    }
    total.is_finite().then(|| Duration::from_secs_f64(total))
}

/// min(0.5·2ⁿ, 8) s, minus up to 25 % jitter.
fn backoff(n: u32) -> Duration {
    let base = (0.5 * 2f64.powi(n as i32)).min(8.0);
    let jitter = 1.0 - 0.25 * rand::rng().random::<f64>();
    Duration::from_secs_f64(base * jitter)
}

/// Removes `<think>…</think>` blocks (and an unclosed leading one) and trims.
pub fn strip_reasoning(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<think>") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</think>") {
            Some(end) => rest = &rest[start + end + "</think>".len()..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_is_removed() {
        assert_eq!(strip_reasoning("<think>hmm</think>\n\nHello"), "Hello");
        assert_eq!(
            strip_reasoning("A<think>x</think>B<think>y</think>C"),
            "ABC"
        );
        assert_eq!(strip_reasoning("<think>never closed"), "");
        assert_eq!(strip_reasoning("plain"), "plain");
    }

    #[test]
    fn completion_parsing_ignores_reasoning_content() {
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi","reasoning_content":"secret thoughts"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!((c.text.as_str(), c.prompt_tokens), ("Hi", 3));
        assert!(parse_completion(br#"{"choices":[]}"#).is_err());
        assert!(parse_completion(b"not json").is_err());
    }

    #[test]
    fn retry_after_headers_are_honoured_within_bounds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "1.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", "200".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(200)));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "600".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&h), None, "beyond 120 s");
        h.insert("x-ratelimit-reset-tokens", "1.5s".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("x-ratelimit-reset-requests", "20ms".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(reset_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(reset_duration("soon"), None);
        assert!(backoff(10) <= Duration::from_secs(8));
    }

    /// A one-connection-per-response HTTP server writing each response as the given
    /// pieces, with pauses, then closing: the body ends where the connection does.
    async fn serve(responses: Vec<Vec<&'static str>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for pieces in responses {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                for p in pieces {
                    sock.write_all(p.as_bytes()).await.unwrap();
                    sock.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        url
    }

    fn client(url: &str) -> OpenAiClient {
        let settings: LlmSettings = toml::from_str(&format!(
            "base_url = \"{url}\"\nmodel = \"m\"\nmax_retries = 1\n"
        ))
        .unwrap();
        OpenAiClient::new(&settings).unwrap()
    }

    const HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_stream_is_shown_as_it_grows_and_reasoning_never_is() {
        let url = serve(vec![vec![
            HEAD,
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel",
            "lo\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ]])
        .await;
        let (tx, mut rx) = watch::channel(String::new());
        let seen = tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                seen.push(rx.borrow_and_update().clone());
            }
            seen
        });
        let c = client(&url)
            .chat_streaming(Route::default(), &[], &tx)
            .await
            .unwrap();
        drop(tx);
        assert_eq!((c.text.as_str(), c.prompt_tokens), ("Hello there", 4));
        assert_eq!(seen.await.unwrap(), vec!["Hello", "Hello there"]);
    }

    #[tokio::test]
    async fn a_stream_cut_after_text_was_shown_is_not_retried() {
        let url = serve(vec![vec![
            HEAD,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Half\"}}]}\n\n",
        ]])
        .await;
        let (tx, _rx) = watch::channel(String::new());
        let e = client(&url)
            .chat_streaming(Route::default(), &[], &tx)
            .await
            .unwrap_err();
        assert!(matches!(e, LlmError::Interrupted(_)), "{e:?}");
    }

    #[tokio::test]
    async fn an_error_before_anything_was_shown_is_retried() {
        let url = serve(vec![
            vec![HEAD, "data: {\"error\":{\"message\":\"overloaded\"}}\n\n"],
            vec![
                HEAD,
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\n\n",
            ],
        ])
        .await;
        let (tx, _rx) = watch::channel(String::new());
        let c = client(&url)
            .chat_streaming(Route::default(), &[], &tx)
            .await
            .unwrap();
        assert_eq!(
            c.text, "ok",
            "the second answer, ended by its finish_reason alone"
        );
    }
}
