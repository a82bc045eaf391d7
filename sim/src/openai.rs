//! A fake OpenAI-compatible Chat Completions server (PROTOCOLS.md §h). Answers are
//! deterministic — `Echo: <last user message> (turn <user messages>)` — so tests can check
//! that the conversation history reached the model; answers, reasoning and failures (429 with
//! `Retry-After`, 500, …) can be scripted per request, latency changed at run time, and every
//! request is recorded. Both plain JSON and `stream: true` (SSE) responses are produced.

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
    /// Delay before every answer (default 0); changeable later with `set_latency`.
    pub latency: Duration,
    /// Every Nth request gets a 500 (default 0 = never).
    pub fail_every: usize,
}

impl Default for FakeLlmOptions {
    fn default() -> Self {
        Self {
            api_key: "sk-sim".to_owned(),
            latency: Duration::ZERO,
            fail_every: 0,
        }
    }
}

impl fmt::Debug for FakeLlmOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlmOptions")
            .field("api_key", &"<redacted>")
            .field("latency", &self.latency)
            .field("fail_every", &self.fail_every)
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
    failures: VecDeque<(u16, Option<u64>)>,
    answers: VecDeque<Scripted>,
    seen: Vec<ChatRequestSeen>,
}

struct Scripted {
    reasoning: Option<String>,
    text: String,
}

/// What the handler decided to answer, after the latency.
enum Outcome {
    Fail(u16, Option<u64>),
    Answer(Scripted),
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
                failures: VecDeque::new(),
                answers: VecDeque::new(),
                seen: Vec::new(),
            }),
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
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
    let req = match parse_request(&body) {
        Ok(req) => req,
        Err(refusal) => return refusal.into_response(),
    };
    let latency = {
        let mut state = inner.lock();
        state.seen.push(ChatRequestSeen {
            model: req.model.clone(),
            messages: req.messages.clone(),
            received_at_ms: shared::now_ms(),
        });
        state.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let outcome = {
        let mut state = inner.lock();
        if let Some((status, retry_after)) = state.failures.pop_front() {
            Outcome::Fail(status, retry_after)
        } else if state.fail_every > 0 && n % state.fail_every == 0 {
            Outcome::Fail(500, None)
        } else {
            Outcome::Answer(state.answers.pop_front().unwrap_or_else(|| Scripted {
                reasoning: None,
                text: echo(&req.messages),
            }))
        }
    };
    match outcome {
        Outcome::Fail(status, retry_after) => scripted_failure(status, retry_after),
        Outcome::Answer(answer) if req.stream => stream_answer(&req, &answer),
        Outcome::Answer(answer) => json_answer(&req, &answer),
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
    let per = chars.div_ceil(parts.max(1));
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

fn stream_answer(req: &ChatRequest, answer: &Scripted) -> Response {
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
    let mut events = vec![chunk(
        json!({ "role": "assistant", "content": "" }),
        Value::Null,
    )];
    if let Some(reasoning) = &answer.reasoning {
        for piece in split_chunks(reasoning, 3) {
            events.push(chunk(json!({ "reasoning_content": piece }), Value::Null));
        }
    }
    for piece in split_chunks(&answer.text, 4) {
        events.push(chunk(json!({ "content": piece }), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if req.include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_parley_sim",
            "choices": [],
            "usage": usage(req, answer),
        }));
    }
    let mut frames: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let body = Body::from_stream(futures::stream::iter(
        frames.into_iter().map(Ok::<_, Infallible>),
    ));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
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

    #[tokio::test]
    async fn streaming_sends_role_then_content_chunks_then_done() {
        let llm = fake(FakeLlmOptions::default()).await;
        let mut body = chat(&["stream me please"]);
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
        let resp = post(&llm, "sk-sim", &body).await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = resp.text().await.unwrap();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(*events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "Echo: stream me please (turn 1)");
        assert!(chunks.len() >= 5);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["total_tokens"].is_u64());
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "stop"
        );
    }

    #[test]
    fn split_chunks_respects_char_boundaries() {
        assert_eq!(split_chunks("你好世界呀", 2), vec!["你好世", "界呀"]);
        assert_eq!(split_chunks("ab", 4), vec!["a", "b"]);
        assert!(split_chunks("", 4).is_empty());
        assert_eq!(split_chunks("abcdefgh", 4).concat(), "abcdefgh");
    }
}
