//! A fake OpenAI-compatible Chat Completions server (PROTOCOLS.md §h). Answers are
//! deterministic — `Echo: <last user message> (turn <user messages>)` — so tests can check
//! that the conversation history reached the model; answers, reasoning and failures (429 with
//! `Retry-After`, 500, …) can be scripted per request, latency changed at run time, and every
//! request is recorded. Both plain JSON and `stream: true` (SSE) responses are produced.
//!
//! Streams are paced like a real model (a delay before the first token, a chunk size and a
//! delay between chunks, see [`FakeLlmOptions`]) and use the SSE spec the way providers do, so
//! a client that only handles the easy case fails here rather than in production:
//! `: keep-alive` comments before the first chunk and every few chunks, a `retry:` field,
//! occasional `id:` and `event: message` lines, the finish chunk's JSON spread over two
//! `data:` lines, and some frames cut in two body chunks at an arbitrary byte (mid-JSON,
//! possibly mid-UTF-8). Mid-stream failures can be scripted: an in-band `data: {"error":…}`
//! after N characters, or a body that just ends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the fake model behaves from the start.
#[derive(Clone)]
pub struct FakeLlmOptions {
    /// The only key accepted as `Authorization: Bearer <key>` (default `sk-sim`).
    pub api_key: String,
    /// Delay before every answer's response headers (or scripted failure) (default 0);
    /// changeable later with `set_latency`.
    pub latency: Duration,
    /// Every Nth request gets a 500 (default 0 = never).
    pub fail_every: usize,
    /// Streams: further delay after the headers and the role chunk, before the first
    /// reasoning or content delta (default 0). Changeable with `set_stream_pacing`.
    pub stream_first_token: Duration,
    /// Streams: characters per delta (default 0 = the content in 4 deltas and the
    /// reasoning in 3, whatever their length).
    pub stream_chunk_chars: usize,
    /// Streams: delay between two deltas (default 0).
    pub stream_chunk_interval: Duration,
}

impl Default for FakeLlmOptions {
    fn default() -> Self {
        Self {
            api_key: "sk-sim".to_owned(),
            latency: Duration::ZERO,
            fail_every: 0,
            stream_first_token: Duration::ZERO,
            stream_chunk_chars: 0,
            stream_chunk_interval: Duration::ZERO,
        }
    }
}

impl fmt::Debug for FakeLlmOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlmOptions")
            .field("api_key", &"<redacted>")
            .field("latency", &self.latency)
            .field("fail_every", &self.fail_every)
            .field("stream_first_token", &self.stream_first_token)
            .field("stream_chunk_chars", &self.stream_chunk_chars)
            .field("stream_chunk_interval", &self.stream_chunk_interval)
            .finish()
    }
}

/// One chat request the fake received (with a valid key and body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequestSeen {
    /// `model` as sent.
    pub model: String,
    /// `(role, content)` of every message; parts arrays are joined to their text.
    pub messages: Vec<(String, String)>,
    /// Whether it asked for `stream: true`.
    pub stream: bool,
    /// When it arrived, ms since the Unix epoch.
    pub received_at_ms: i64,
}

/// The fake model server. Cheap to clone; all clones share one server, scripts and record.
#[derive(Clone)]
pub struct FakeLlm {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlm")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base_url: String,
    api_key: String,
    count: AtomicUsize,
    state: Mutex<LlmState>,
    stop: CancellationToken,
}

struct LlmState {
    latency: Duration,
    fail_every: usize,
    pacing: Pacing,
    failures: VecDeque<(u16, Option<u64>)>,
    /// Every request fails so while set (after the scripted failures).
    failing: Option<(u16, Option<u64>)>,
    stream_faults: VecDeque<StreamFault>,
    answers: VecDeque<Scripted>,
    seen: Vec<ChatRequestSeen>,
}

#[derive(Debug, Clone)]
struct Scripted {
    reasoning: Option<String>,
    text: String,
}

/// How a stream is paced (see [`FakeLlmOptions`]).
#[derive(Debug, Clone, Copy, Default)]
struct Pacing {
    first_token: Duration,
    chunk_chars: usize,
    interval: Duration,
}

/// A scripted mid-stream failure, after that many content characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamFault {
    /// An in-band `data: {"error":…}` event, then the end of the body.
    Error(usize),
    /// The end of the body: no finish_reason, no `[DONE]`.
    Cut(usize),
}

/// What the handler decided to answer, after the latency.
enum Outcome {
    Fail(u16, Option<u64>),
    Answer(Scripted, Option<StreamFault>),
}

impl FakeLlm {
    /// Binds `addr` (port 0 picks a free port) and serves until [`Self::shutdown`] or the end
    /// of the runtime.
    pub async fn start(addr: SocketAddr, opts: FakeLlmOptions) -> std::io::Result<FakeLlm> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{}/v1", super::connectable(local)),
            api_key: opts.api_key,
            count: AtomicUsize::new(0),
            state: Mutex::new(LlmState {
                latency: opts.latency,
                fail_every: opts.fail_every,
                pacing: Pacing {
                    first_token: opts.stream_first_token,
                    chunk_chars: opts.stream_chunk_chars,
                    interval: opts.stream_chunk_interval,
                },
                failures: VecDeque::new(),
                failing: None,
                stream_faults: VecDeque::new(),
                answers: VecDeque::new(),
                seen: Vec::new(),
            }),
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(azure_chat_completions),
            )
            .route("/_sim/arrivals", get(arrivals))
            .fallback(not_found)
            .with_state(inner.clone());
        super::serve_fake(listener, router, inner.stop.clone(), "model");
        Ok(FakeLlm { inner })
    }

    /// Base URL including `/v1`, e.g. `http://127.0.0.1:9200/v1`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Stops accepting connections and ends the server once in-flight requests finish.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    /// Changes the delay applied before every later answer (or scripted failure).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.lock().latency = latency;
    }

    /// Queues a failure: the next request gets `status` with OpenAI's error JSON
    /// (429 → `rate_limit_exceeded`, 5xx → `server_error`) and `Retry-After` if given.
    pub fn push_failure(&self, status: u16, retry_after_secs: Option<u64>) {
        self.inner
            .lock()
            .failures
            .push_back((status, retry_after_secs));
    }

    /// While `Some((status, retry_after_secs))`, every request (once the queued failures of
    /// [`Self::push_failure`] are used up) fails like a pushed failure — a 429 storm, an
    /// outage; `None` ends it. Requests already waiting out the latency decide when it ends.
    pub fn set_failing(&self, failure: Option<(u16, Option<u64>)>) {
        self.inner.lock().failing = failure;
    }

    /// Changes how later streams are paced: `first_token` after the headers before the
    /// first delta, `chunk_chars` characters per delta (0 = 4 content and 3 reasoning
    /// deltas), `interval` between deltas.
    pub fn set_stream_pacing(&self, first_token: Duration, chunk_chars: usize, interval: Duration) {
        self.inner.lock().pacing = Pacing {
            first_token,
            chunk_chars,
            interval,
        };
    }

    /// Queues a mid-stream error for the next request that would be answered: HTTP 200,
    /// the first `after_chars` characters of its answer (after any reasoning), then
    /// `data: {"error":{"message","type":"server_error","code":null}}` and the end of the
    /// body, without `[DONE]`. The answer itself (a scripted one stays queued) is not
    /// consumed, so a retry gets it whole. A non-streaming request gets a 500 instead.
    pub fn push_stream_error(&self, after_chars: usize) {
        self.inner
            .lock()
            .stream_faults
            .push_back(StreamFault::Error(after_chars));
    }

    /// Queues a cut stream, like [`Self::push_stream_error`] but the body simply ends after
    /// `after_chars` characters: no error, no finish_reason, no usage, no `[DONE]`.
    pub fn push_stream_cut(&self, after_chars: usize) {
        self.inner
            .lock()
            .stream_faults
            .push_back(StreamFault::Cut(after_chars));
    }

    /// Queues an answer: the next successful answer's content is exactly `text`.
    pub fn push_answer(&self, text: impl Into<String>) {
        self.inner.lock().answers.push_back(Scripted {
            reasoning: None,
            text: text.into(),
        });
    }

    /// Queues an answer carrying `message.reasoning_content` = `reasoning` and content `text`.
    pub fn push_reasoning(&self, reasoning: &str, text: &str) {
        self.inner.lock().answers.push_back(Scripted {
            reasoning: Some(reasoning.to_owned()),
            text: text.to_owned(),
        });
    }

    /// Every well-formed, authenticated request so far (including ones answered with a
    /// failure), in arrival order.
    pub fn requests(&self) -> Vec<ChatRequestSeen> {
        self.inner.lock().seen.clone()
    }

    /// Every request to `/v1/chat/completions` so far, rejected and failed ones included.
    pub fn request_count(&self) -> usize {
        self.inner.count.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, LlmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorized(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(key) if key == self.api_key => Ok(()),
            Some(key) => Err(api_error(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    mask_key(key)
                ),
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )),
            None => Err(api_error(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            )),
        }
    }
}

/// A parsed, valid chat request.
struct ChatRequest {
    model: String,
    messages: Vec<(String, String)>,
    stream: bool,
    include_usage: bool,
}

async fn chat_completions(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = inner.count.fetch_add(1, Ordering::SeqCst) + 1;
    if let Err(refusal) = inner.authorized(&headers) {
        return refusal.into_response();
    }
    complete(inner, n, &body, None).await
}

/// Azure OpenAI's route: `POST /openai/deployments/{deployment}/chat/completions
/// ?api-version=…` with the key in an `api-key` header; the deployment is the model.
async fn azure_chat_completions(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path(deployment): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = inner.count.fetch_add(1, Ordering::SeqCst) + 1;
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    if key != Some(inner.api_key.as_str()) {
        let body = json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}});
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    if query.get("api-version").is_none_or(|v| v.is_empty()) {
        return api_error(
            StatusCode::NOT_FOUND,
            "Resource not found",
            "invalid_request_error",
            None,
            Some("404"),
        )
        .into_response();
    }
    complete(inner, n, &body, Some(deployment)).await
}

/// Answers the `n`-th request, already authorized; `deployment` is Azure's model.
async fn complete(
    inner: Arc<Inner>,
    n: usize,
    body: &[u8],
    deployment: Option<String>,
) -> Response {
    let req = match parse_request(body) {
        Ok(req) => req,
        Err(refusal) => return refusal.into_response(),
    };
    let latency = {
        let mut state = inner.lock();
        state.seen.push(ChatRequestSeen {
            model: deployment.unwrap_or_else(|| req.model.clone()),
            messages: req.messages.clone(),
            stream: req.stream,
            received_at_ms: shared::now_ms(),
        });
        state.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (outcome, pacing) = {
        let mut state = inner.lock();
        let echoed = || Scripted {
            reasoning: None,
            text: echo(&req.messages),
        };
        let outcome = if let Some((status, retry_after)) = state.failures.pop_front() {
            Outcome::Fail(status, retry_after)
        } else if let Some((status, retry_after)) = state.failing {
            Outcome::Fail(status, retry_after)
        } else if state.fail_every > 0 && n.is_multiple_of(state.fail_every) {
            Outcome::Fail(500, None)
        } else if let Some(fault) = state.stream_faults.pop_front() {
            // The failed attempt only shows the answer: a retry must still get all of it.
            let answer = state.answers.front().cloned().unwrap_or_else(echoed);
            Outcome::Answer(answer, Some(fault))
        } else {
            Outcome::Answer(state.answers.pop_front().unwrap_or_else(echoed), None)
        };
        (outcome, state.pacing)
    };
    match outcome {
        Outcome::Fail(status, retry_after) => scripted_failure(status, retry_after),
        Outcome::Answer(answer, fault) if req.stream => stream_answer(&req, &answer, pacing, fault),
        // A stream failure has no in-band form without a stream: fail the whole request.
        Outcome::Answer(_, Some(_)) => scripted_failure(500, None),
        Outcome::Answer(answer, None) => json_answer(&req, &answer),
    }
}

async fn models(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = inner.authorized(&headers) {
        return refusal.into_response();
    }
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": "sim-model", "object": "model", "created": 0, "owned_by": "parley-sim" }],
    }))
    .into_response()
}

/// `GET /_sim/arrivals` (the fake's own, for benchmarks in another process): when every
/// chat completion request seen so far arrived, ms since the epoch, in arrival order.
async fn arrivals(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = inner.authorized(&headers) {
        return refusal.into_response();
    }
    let at: Vec<i64> = inner.lock().seen.iter().map(|r| r.received_at_ms).collect();
    axum::Json(json!({ "received_at_ms": at })).into_response()
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
        None,
        None,
    )
    .into_response()
}

/// The deterministic default answer.
fn echo(messages: &[(String, String)]) -> String {
    let last_user = messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map_or("", |(_, content)| content.as_str());
    let turns = messages.iter().filter(|(role, _)| role == "user").count();
    format!("Echo: {last_user} (turn {turns})")
}

fn parse_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let bad = |message: &str, param: Option<&str>, code: Option<&'static str>| {
        api_error(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            param,
            code,
        )
    };
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
            None,
            None,
        ));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(bad("you must provide a model parameter", None, None));
        }
    };
    let items = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(bad(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                Some("missing_required_parameter"),
            ));
        }
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                Some("empty_array"),
            ));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(bad(
                "Invalid type for 'messages': expected an array of objects.",
                Some("messages"),
                Some("invalid_type"),
            ));
        }
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(role) = item.get("role").and_then(Value::as_str) else {
            let param = format!("messages[{i}].role");
            return Err(bad(
                &format!("Missing required parameter: '{param}'."),
                Some(&param),
                Some("missing_required_parameter"),
            ));
        };
        let content = match item.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Some(_) => {
                let param = format!("messages[{i}].content");
                return Err(bad(
                    &format!("Invalid type for '{param}': expected a string or an array."),
                    Some(&param),
                    Some("invalid_type"),
                ));
            }
        };
        messages.push((role.to_owned(), content));
    }
    Ok(ChatRequest {
        model,
        messages,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

fn scripted_failure(status: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (message, kind, code) = match status.as_u16() {
        429 => (
            "Rate limit reached for requests. Please try again later.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        503 => (
            "The engine is currently overloaded, please try again later.",
            "server_error",
            Some("server_error"),
        ),
        s if s >= 500 => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            Some("server_error"),
        ),
        _ => (
            "The request was rejected (scripted failure).",
            "invalid_request_error",
            None,
        ),
    };
    let mut resp = api_error(status, message, kind, None, code).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn unix_secs() -> i64 {
    shared::now_ms() / 1000
}

/// Roughly one token per four bytes, at least one.
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

fn usage(req: &ChatRequest, answer: &Scripted) -> Value {
    let prompt: u64 = req.messages.iter().map(|(_, c)| tokens(c)).sum();
    let reasoning = answer.reasoning.as_deref().map_or(0, tokens);
    let completion = tokens(&answer.text) + reasoning;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": 0 },
        "completion_tokens_details": { "reasoning_tokens": reasoning },
    })
}

fn json_answer(req: &ChatRequest, answer: &Scripted) -> Response {
    let mut message = json!({ "role": "assistant", "content": answer.text, "refusal": null });
    if let (Some(reasoning), Value::Object(map)) = (&answer.reasoning, &mut message) {
        map.insert("reasoning_content".to_owned(), json!(reasoning));
    }
    axum::Json(json!({
        "id": completion_id(),
        "object": "chat.completion",
        "created": unix_secs(),
        "model": req.model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": "stop" }],
        "usage": usage(req, answer),
        "system_fingerprint": "fp_parley_sim",
    }))
    .into_response()
}

/// Splits `text` into at most `parts` pieces of similar length, on char boundaries.
fn split_chunks(text: &str, parts: usize) -> Vec<&str> {
    let chars = text.chars().count();
    if chars == 0 {
        return Vec::new();
    }
    split_every(text, chars.div_ceil(parts.max(1)))
}

/// Splits `text` into pieces of `per` chars (the last may be shorter), on char boundaries.
fn split_every(text: &str, per: usize) -> Vec<&str> {
    if text.is_empty() {
        return Vec::new();
    }
    let per = per.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, (idx, _)) in text.char_indices().enumerate() {
        if i > 0 && i % per == 0 {
            out.push(&text[start..idx]);
            start = idx;
        }
    }
    out.push(&text[start..]);
    out
}

/// The first `n` chars of `text`.
fn first_chars(text: &str, n: usize) -> &str {
    text.char_indices()
        .nth(n)
        .map_or(text, |(idx, _)| &text[..idx])
}

/// A keep-alive comment goes out before every this many deltas (and before the first chunk).
const KEEPALIVE_EVERY: usize = 5;

/// One step of a streamed body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A body chunk.
    Write(Bytes),
    /// A pause (pacing).
    Pause(Duration),
    /// Gives way once, so the chunk before is flushed on its own (a split frame's first half).
    Yield,
}

/// Builds the steps of a stream: frames with the SSE decorations providers use.
#[derive(Debug, Default)]
struct Plan {
    steps: Vec<Step>,
    /// `data:` events written so far.
    events: usize,
}

impl Plan {
    fn keep_alive(&mut self) {
        self.steps
            .push(Step::Write(Bytes::from_static(b": keep-alive\n\n")));
    }

    fn pause(&mut self, d: Duration) {
        if !d.is_zero() {
            self.steps.push(Step::Pause(d));
        }
    }

    /// One event. A `\n` in `data` (never in serde's JSON) continues it on a second `data:`
    /// line, which a spec-compliant reader joins back with `\n` — harmless JSON whitespace.
    fn event(&mut self, data: &str) {
        let i = self.events;
        self.events += 1;
        let mut frame = String::new();
        if i % 4 == 2 {
            frame.push_str(&format!("id: {i}\n"));
        }
        if i % 6 == 3 {
            // `message` is the default event type: an explicit one changes nothing per spec.
            frame.push_str("event: message\n");
        }
        frame.push_str("data: ");
        frame.push_str(&data.replace('\n', "\ndata: "));
        frame.push_str("\n\n");
        let frame = Bytes::from(frame);
        if i % 3 == 1 {
            // Cut mid-JSON: inside a multi-byte character if there is one (one byte past
            // the lead byte nearest the midpoint), else at the midpoint.
            let half = frame.len() / 2;
            let is_lead = |b: &u8| *b >= 0xC0;
            let mid = frame[half..]
                .iter()
                .position(is_lead)
                .map(|p| half + p + 1)
                .or_else(|| frame[..half].iter().rposition(is_lead).map(|p| p + 1))
                .unwrap_or(half);
            self.steps.push(Step::Write(frame.slice(..mid)));
            self.steps.push(Step::Yield);
            self.steps.push(Step::Write(frame.slice(mid..)));
        } else {
            self.steps.push(Step::Write(frame));
        }
    }
}

/// The steps of a streamed answer: headers go out with the first keep-alive and the role
/// chunk, then after `first_token` the reasoning deltas, the content deltas (`interval`
/// apart), the finish chunk, the usage chunk if asked for, and `[DONE]` — or, with a
/// `fault`, the first `after_chars` content characters and then an error event or nothing.
fn stream_plan(
    req: &ChatRequest,
    answer: &Scripted,
    pacing: Pacing,
    fault: Option<StreamFault>,
) -> Vec<Step> {
    let id = completion_id();
    let created = unix_secs();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_parley_sim",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if req.include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let pieces = |text: &'_ str, default_parts: usize| -> Vec<String> {
        let pieces = if pacing.chunk_chars == 0 {
            split_chunks(text, default_parts)
        } else {
            split_every(text, pacing.chunk_chars)
        };
        pieces.into_iter().map(str::to_owned).collect()
    };
    let (text, limit) = match fault {
        Some(StreamFault::Error(n) | StreamFault::Cut(n)) => (first_chars(&answer.text, n), true),
        None => (answer.text.as_str(), false),
    };
    let mut deltas: Vec<Value> = Vec::new();
    if let Some(reasoning) = &answer.reasoning {
        for piece in pieces(reasoning, 3) {
            deltas.push(json!({ "reasoning_content": piece }));
        }
    }
    // A cut answer keeps the pacing of the whole one: chunk it whole, then stop early.
    let mut budget = text.chars().count();
    for piece in pieces(&answer.text, 4) {
        if budget == 0 && limit {
            break;
        }
        let piece = if limit {
            first_chars(&piece, budget).to_owned()
        } else {
            piece
        };
        budget = budget.saturating_sub(piece.chars().count());
        deltas.push(json!({ "content": piece }));
    }

    let mut plan = Plan::default();
    plan.steps.push(Step::Write(Bytes::from_static(
        b": keep-alive\nretry: 3000\n\n",
    )));
    plan.event(&chunk(json!({ "role": "assistant", "content": "" }), Value::Null).to_string());
    plan.pause(pacing.first_token);
    for (i, delta) in deltas.into_iter().enumerate() {
        if i > 0 {
            plan.pause(pacing.interval);
            if i % KEEPALIVE_EVERY == 0 {
                plan.keep_alive();
            }
        }
        plan.event(&chunk(delta, Value::Null).to_string());
    }
    match fault {
        Some(StreamFault::Error(_)) => {
            plan.event(
                &json!({ "error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error",
                    "code": null,
                } })
                .to_string(),
            );
            return plan.steps;
        }
        Some(StreamFault::Cut(_)) => return plan.steps,
        None => {}
    }
    // Spread over two `data:` lines at a point between two JSON tokens.
    let finish =
        chunk(json!({}), json!("stop"))
            .to_string()
            .replacen(",\"created\":", "\n,\"created\":", 1);
    plan.event(&finish);
    if req.include_usage {
        plan.event(
            &json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "system_fingerprint": "fp_parley_sim",
                "choices": [],
                "usage": usage(req, answer),
            })
            .to_string(),
        );
    }
    plan.event("[DONE]");
    plan.steps
}

fn stream_answer(
    req: &ChatRequest,
    answer: &Scripted,
    pacing: Pacing,
    fault: Option<StreamFault>,
) -> Response {
    let steps = stream_plan(req, answer, pacing, fault);
    let body = futures::stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Write(bytes) => return Some((Ok::<_, Infallible>(bytes), steps)),
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Yield => tokio::task::yield_now().await,
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// An OpenAI-style refusal: `{"error":{"message","type","param","code"}}` with a status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                },
            })),
        )
            .into_response()
    }
}

fn api_error(
    status: StatusCode,
    message: &str,
    kind: &'static str,
    param: Option<&str>,
    code: Option<&'static str>,
) -> ApiError {
    ApiError {
        status,
        message: message.to_owned(),
        kind,
        param: param.map(str::to_owned),
        code,
    }
}

/// `sk-abc…xyz` → `sk-a***xyz`, as OpenAI shows a wrong key.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "***".to_owned();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fake(opts: FakeLlmOptions) -> FakeLlm {
        FakeLlm::start("127.0.0.1:0".parse().unwrap(), opts)
            .await
            .unwrap()
    }

    fn chat(user_turns: &[&str]) -> Value {
        let mut messages = vec![json!({ "role": "system", "content": "be brief" })];
        for (i, turn) in user_turns.iter().enumerate() {
            if i > 0 {
                messages.push(json!({ "role": "assistant", "content": "ok" }));
            }
            messages.push(json!({ "role": "user", "content": turn }));
        }
        json!({ "model": "sim-model", "messages": messages })
    }

    async fn post(llm: &FakeLlm, key: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", llm.base_url()))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn default_answer_echoes_the_last_user_message_and_turn() {
        let llm = fake(FakeLlmOptions::default()).await;
        let resp = post(&llm, "sk-sim", &chat(&["first", "second"])).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "sim-model");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Echo: second (turn 2)"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let seen = llm.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].messages.len(), 4);
        assert_eq!(
            seen[0].messages[0],
            ("system".to_owned(), "be brief".to_owned())
        );
    }

    #[tokio::test]
    async fn scripted_failures_come_first_then_scripted_answers() {
        let llm = fake(FakeLlmOptions::default()).await;
        llm.push_failure(429, Some(2));
        llm.push_failure(500, None);
        llm.push_answer("scripted");
        llm.push_reasoning("thinking", "done");
        let body = chat(&["hi"]);

        let resp = post(&llm, "sk-sim", &body).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");

        let resp = post(&llm, "sk-sim", &body).await;
        assert_eq!(resp.status(), 500);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "server_error");

        let v: Value = post(&llm, "sk-sim", &body).await.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "scripted");
        let v: Value = post(&llm, "sk-sim", &body).await.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["reasoning_content"], "thinking");
        assert_eq!(v["choices"][0]["message"]["content"], "done");
        let v: Value = post(&llm, "sk-sim", &body).await.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: hi (turn 1)");
        assert_eq!(llm.request_count(), 5);
        assert_eq!(llm.requests().len(), 5);
    }

    #[tokio::test]
    async fn a_failing_window_fails_every_request_until_it_ends() {
        let llm = fake(FakeLlmOptions::default()).await;
        let body = chat(&["hi"]);
        llm.push_failure(500, None);
        llm.set_failing(Some((429, Some(1))));
        assert_eq!(
            post(&llm, "sk-sim", &body).await.status(),
            500,
            "pushed first"
        );
        for _ in 0..3 {
            let resp = post(&llm, "sk-sim", &body).await;
            assert_eq!(resp.status(), 429);
            assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        }
        llm.set_failing(None);
        let v: Value = post(&llm, "sk-sim", &body).await.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: hi (turn 1)");
    }

    #[tokio::test]
    async fn arrivals_list_every_request_seen() {
        let llm = fake(FakeLlmOptions::default()).await;
        for q in ["a", "b"] {
            assert_eq!(post(&llm, "sk-sim", &chat(&[q])).await.status(), 200);
        }
        let url = llm.base_url().replace("/v1", "/_sim/arrivals");
        let client = reqwest::Client::new();
        assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
        let v: Value = client
            .get(&url)
            .bearer_auth("sk-sim")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let at = v["received_at_ms"].as_array().unwrap();
        assert_eq!(at.len(), 2);
        assert!(at[0].as_i64().unwrap() <= at[1].as_i64().unwrap());
    }

    #[tokio::test]
    async fn azure_route_needs_its_key_header_and_api_version() {
        let llm = fake(FakeLlmOptions::default()).await;
        let root = llm.base_url().replace("/v1", "");
        let url = format!("{root}/openai/deployments/prod-4o/chat/completions");
        let client = reqwest::Client::new();
        let send = |url: String, key: &'static str| {
            client
                .post(url)
                .header("api-key", key)
                .json(&chat(&["hi"]))
                .send()
        };
        let ok = format!("{url}?api-version=2024-10-21");
        assert_eq!(send(ok.clone(), "sk-wrong").await.unwrap().status(), 401);
        assert_eq!(send(url.clone(), "sk-sim").await.unwrap().status(), 404);
        assert_eq!(send(ok, "sk-sim").await.unwrap().status(), 200);
        let seen = llm.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].model, "prod-4o");
    }

    #[tokio::test]
    async fn bad_key_and_bad_body_get_openai_errors() {
        let llm = fake(FakeLlmOptions::default()).await;
        let resp = post(&llm, "sk-wrong-key-123456", &chat(&["hi"])).await;
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert!(
            !v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("wrong-key")
        );

        let resp = post(&llm, "sk-sim", &json!({ "model": "m", "messages": [] })).await;
        assert_eq!(resp.status(), 400);
        let resp = post(
            &llm,
            "sk-sim",
            &json!({ "messages": [{ "role": "user", "content": "x" }] }),
        )
        .await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string());
        assert_eq!(llm.request_count(), 3);
        assert!(llm.requests().is_empty());
    }

    #[tokio::test]
    async fn fail_every_fails_each_nth_request() {
        let llm = fake(FakeLlmOptions {
            fail_every: 2,
            ..FakeLlmOptions::default()
        })
        .await;
        let body = chat(&["hi"]);
        let statuses = [
            post(&llm, "sk-sim", &body).await.status().as_u16(),
            post(&llm, "sk-sim", &body).await.status().as_u16(),
            post(&llm, "sk-sim", &body).await.status().as_u16(),
            post(&llm, "sk-sim", &body).await.status().as_u16(),
        ];
        assert_eq!(statuses, [200, 500, 200, 500]);
    }

    /// What a spec-compliant SSE reader (WHATWG "event stream interpretation") sees.
    #[derive(Debug, Default)]
    struct Sse {
        /// `(event type, data)` of every dispatched event.
        events: Vec<(Option<String>, String)>,
        comments: usize,
        /// Bytes after the last blank line (an event never terminated).
        unterminated: String,
    }

    fn parse_sse(body: &str) -> Sse {
        let mut sse = Sse::default();
        // Per spec: every `data:` value is appended plus `\n`; a blank line dispatches the
        // buffer without its last `\n`, unless it is empty.
        let (mut data, mut event) = (String::new(), None::<String>);
        let mut lines: Vec<&str> = body.split('\n').collect();
        // The text after the last `\n` is an incomplete line.
        let tail = lines.pop().unwrap_or("");
        let mut pending = String::new();
        for line in lines {
            if line.is_empty() {
                if let Some(d) = data.strip_suffix('\n') {
                    sse.events.push((event.take(), d.to_owned()));
                }
                data.clear();
                event = None;
                pending.clear();
                continue;
            }
            pending.push_str(line);
            pending.push('\n');
            if line.starts_with(':') {
                sse.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "event" => event = Some(value.to_owned()),
                "id" | "retry" => {}
                other => panic!("unexpected field {other:?}"),
            }
        }
        pending.push_str(tail);
        sse.unterminated = pending;
        sse
    }

    /// The JSON chunks of a stream (up to `[DONE]` or an error).
    fn json_chunks(sse: &Sse) -> Vec<Value> {
        sse.events
            .iter()
            .take_while(|(_, d)| d != "[DONE]")
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn deltas(chunks: &[Value], field: &str) -> Vec<String> {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn stream_body(user: &str) -> Value {
        let mut body = chat(&[user]);
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
        body
    }

    #[tokio::test]
    async fn streaming_sends_role_then_content_chunks_then_done() {
        let llm = fake(FakeLlmOptions::default()).await;
        let resp = post(&llm, "sk-sim", &stream_body("stream me please")).await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = resp.text().await.unwrap();
        assert!(text.starts_with(": keep-alive\n"), "{text}");
        assert!(text.contains("\nid: ") && text.contains("\nevent: message\n"));
        let sse = parse_sse(&text);
        assert_eq!(sse.unterminated, "");
        assert_eq!(sse.events.last().unwrap().1, "[DONE]");
        assert!(
            sse.events
                .iter()
                .all(|(e, _)| e.as_deref().is_none_or(|e| e == "message"))
        );
        let chunks = json_chunks(&sse);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            deltas(&chunks, "content").concat(),
            "Echo: stream me please (turn 1)"
        );
        assert_eq!(deltas(&chunks, "content").len(), 4);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["total_tokens"].is_u64());
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "stop"
        );
        // The finish chunk spans two `data:` lines.
        assert!(text.contains("\ndata: ,\"created\":"), "{text}");
        assert!(llm.requests()[0].stream);
    }

    #[tokio::test]
    async fn a_naive_reader_concatenating_content_gets_exactly_the_answer() {
        let llm = fake(FakeLlmOptions {
            stream_chunk_chars: 1,
            ..FakeLlmOptions::default()
        })
        .await;
        let answer = "多字节的回答：λ → ✓, \"quoted\" and\nnew lines 🎉";
        llm.push_reasoning("先想一想……", answer);
        let mut resp = post(&llm, "sk-sim", &stream_body("x")).await;
        // Read body chunks as they come; frames may be cut anywhere, even mid-character.
        let mut raw = Vec::new();
        while let Some(bytes) = resp.chunk().await.unwrap() {
            raw.extend_from_slice(&bytes);
        }
        let sse = parse_sse(std::str::from_utf8(&raw).unwrap());
        let chunks = json_chunks(&sse);
        assert_eq!(deltas(&chunks, "content").concat(), answer);
        assert_eq!(deltas(&chunks, "reasoning_content").concat(), "先想一想……");
        assert!(
            deltas(&chunks, "content")
                .iter()
                .all(|d| d.chars().count() == 1)
        );
        // Reasoning comes first, all of it.
        let kinds: Vec<&str> = chunks
            .iter()
            .filter_map(|c| {
                let d = &c["choices"][0]["delta"];
                if d["reasoning_content"].is_string() {
                    Some("r")
                } else if d["content"].as_str().is_some_and(|s| !s.is_empty()) {
                    Some("c")
                } else {
                    None
                }
            })
            .collect();
        let first_content = kinds.iter().position(|k| *k == "c").unwrap();
        assert!(kinds[..first_content].iter().all(|k| *k == "r"));
        assert!(kinds[first_content..].iter().all(|k| *k == "c"));
        // Long streams keep sending keep-alives.
        assert!(sse.comments > answer.chars().count() / KEEPALIVE_EVERY);
        assert!(!llm.requests()[0].messages.is_empty());
    }

    #[test]
    fn frames_are_cut_mid_json_and_mid_character() {
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![("user".into(), "hi".into())],
            stream: true,
            include_usage: false,
        };
        let answer = Scripted {
            reasoning: None,
            text: "你好世界你好世界".into(),
        };
        let steps = stream_plan(&req, &answer, Pacing::default(), None);
        let writes: Vec<&Bytes> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Write(b) => Some(b),
                _ => None,
            })
            .collect();
        let cut = writes.iter().filter(|b| !b.ends_with(b"\n\n")).count();
        assert!(cut >= 2, "{writes:?}");
        assert!(
            writes.iter().any(|b| std::str::from_utf8(b).is_err()),
            "one cut falls inside a character"
        );
        assert!(steps.contains(&Step::Yield));
        let whole: Vec<u8> = writes.iter().flat_map(|b| b.iter().copied()).collect();
        let sse = parse_sse(std::str::from_utf8(&whole).unwrap());
        assert_eq!(deltas(&json_chunks(&sse), "content").concat(), answer.text);
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Pause(_))),
            "no pacing by default"
        );
    }

    #[tokio::test]
    async fn pacing_delays_the_first_token_and_spaces_the_chunks() {
        let llm = fake(FakeLlmOptions::default()).await;
        let first_token = Duration::from_millis(300);
        let interval = Duration::from_millis(40);
        llm.set_stream_pacing(first_token, 5, interval);
        llm.push_answer("0123456789abcdefghij");
        let started = std::time::Instant::now();
        let mut resp = post(&llm, "sk-sim", &stream_body("x")).await;
        let mut raw = Vec::new();
        let mut first_content = None;
        while let Some(bytes) = resp.chunk().await.unwrap() {
            raw.extend_from_slice(&bytes);
            let seen = String::from_utf8_lossy(&raw).into_owned();
            if first_content.is_none() && seen.contains("\"content\":\"01234\"") {
                first_content = Some(started.elapsed());
            }
        }
        let total = started.elapsed();
        let first_content = first_content.unwrap();
        assert!(first_content >= first_token, "{first_content:?}");
        // Four chunks of five chars, three intervals between them.
        assert!(total >= first_token + interval * 3, "{total:?}");
        assert!(total < Duration::from_secs(5), "{total:?}");
        let sse = parse_sse(std::str::from_utf8(&raw).unwrap());
        assert_eq!(
            deltas(&json_chunks(&sse), "content"),
            vec!["01234", "56789", "abcde", "fghij"]
        );

        // Back to unpaced: answered at once.
        llm.set_stream_pacing(Duration::ZERO, 0, Duration::ZERO);
        let started = std::time::Instant::now();
        post(&llm, "sk-sim", &stream_body("x"))
            .await
            .text()
            .await
            .unwrap();
        assert!(started.elapsed() < first_token);
    }

    #[tokio::test]
    async fn stream_faults_error_or_cut_after_n_chars_and_keep_the_answer() {
        let llm = fake(FakeLlmOptions::default()).await;
        llm.push_answer("the scripted answer");
        llm.push_stream_error(5);
        llm.push_stream_cut(9);
        let body = stream_body("x");

        let resp = post(&llm, "sk-sim", &body).await;
        assert_eq!(resp.status(), 200);
        let sse = parse_sse(&resp.text().await.unwrap());
        assert_eq!(sse.unterminated, "");
        let last = &sse.events.last().unwrap().1;
        let error: Value = serde_json::from_str(last).unwrap();
        assert_eq!(error["error"]["type"], "server_error");
        assert!(error["error"]["message"].is_string());
        assert!(error["error"]["code"].is_null());
        assert!(sse.events.iter().all(|(_, d)| d != "[DONE]"));
        let chunks: Vec<Value> = json_chunks(&sse)
            .into_iter()
            .filter(|c| c.get("error").is_none())
            .collect();
        assert_eq!(deltas(&chunks, "content").concat(), "the s");
        assert!(
            chunks
                .iter()
                .all(|c| c["choices"][0]["finish_reason"].is_null())
        );

        let resp = post(&llm, "sk-sim", &body).await;
        assert_eq!(resp.status(), 200);
        let sse = parse_sse(&resp.text().await.unwrap());
        assert!(sse.events.iter().all(|(_, d)| d != "[DONE]"));
        let chunks = json_chunks(&sse);
        assert!(chunks.iter().all(|c| c.get("error").is_none()));
        assert!(
            chunks
                .iter()
                .all(|c| c["choices"][0]["finish_reason"].is_null())
        );
        assert!(
            chunks.iter().all(|c| c["choices"] != json!([])),
            "no usage chunk"
        );
        assert_eq!(deltas(&chunks, "content").concat(), "the scrip");

        // The scripted answer survived both failed attempts.
        let sse = parse_sse(&post(&llm, "sk-sim", &body).await.text().await.unwrap());
        assert_eq!(sse.events.last().unwrap().1, "[DONE]");
        assert_eq!(
            deltas(&json_chunks(&sse), "content").concat(),
            "the scripted answer"
        );

        // A fault past the end streams the whole answer, then fails.
        llm.push_stream_cut(1000);
        let sse = parse_sse(&post(&llm, "sk-sim", &body).await.text().await.unwrap());
        assert_eq!(
            deltas(&json_chunks(&sse), "content").concat(),
            "Echo: x (turn 1)"
        );
        assert!(sse.events.iter().all(|(_, d)| d != "[DONE]"));

        // Without a stream the fault is a plain 500.
        llm.push_stream_error(3);
        let resp = post(&llm, "sk-sim", &chat(&["plain"])).await;
        assert_eq!(resp.status(), 500);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "server_error");
        let v: Value = post(&llm, "sk-sim", &chat(&["plain"]))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Echo: plain (turn 1)"
        );
        let seen: Vec<bool> = llm.requests().iter().map(|r| r.stream).collect();
        assert_eq!(seen, [true, true, true, true, false, false]);
    }

    #[test]
    fn split_chunks_respects_char_boundaries() {
        assert_eq!(split_every("你好世界呀", 2), vec!["你好", "世界", "呀"]);
        assert_eq!(first_chars("你好世界", 2), "你好");
        assert_eq!(first_chars("ab", 5), "ab");
        assert_eq!(split_chunks("你好世界呀", 2), vec!["你好世", "界呀"]);
        assert_eq!(split_chunks("ab", 4), vec!["a", "b"]);
        assert!(split_chunks("", 4).is_empty());
        assert_eq!(split_chunks("abcdefgh", 4).concat(), "abcdefgh");
    }
}
