//! DingTalk Stream mode (PROTOCOLS.md §d): for every bot with `ingress = "stream"` this
//! process dials out to DingTalk instead of waiting for callbacks. One task per bot holds at
//! most one connection: `connections/open` with the app's credentials for a one-use ticket,
//! then the WebSocket at `endpoint?ticket=…`. A bot-message `CALLBACK` frame goes through the
//! same parser and the same queueing as an HTTP callback and is acknowledged on the socket
//! only once the queue has confirmed the job, so a frame that could not be queued is pushed
//! again by the platform; the job id is the message id, so a copy delivered twice (to two
//! replicas, or again after a lost ack) is answered once by the worker's answered marker.
//! `ping` frames are answered with their headers and data; a `disconnect` frame, a closed or
//! silent socket, or a failed open ends the connection and the task dials again after a
//! jittered backoff (short after `disconnect`, growing after failures).

use super::{Call, IngressState, enqueue};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use shared::config::DingTalkBot;
use shared::platform::dingtalk::callback;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The Stream gateway's API for a connection ticket, under the bot's `api_base`.
pub(crate) const OPEN_PATH: &str = "/v1.0/gateway/connections/open";
/// The topic bot messages arrive on.
pub(crate) const BOT_MESSAGE_TOPIC: &str = "/v1.0/im/bot/messages/get";

/// WebSocket ping interval; the socket counts as dead after [`SILENCE_LIMIT`] without a frame.
const KEEPALIVE: Duration = Duration::from_secs(20);
const SILENCE_LIMIT: Duration = Duration::from_secs(50);
/// How long `connections/open` and the WebSocket handshake may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection still waits for its in-flight frames' queue confirms, so
/// their acks go out before the socket closes (what misses it is pushed again).
const DRAIN: Duration = Duration::from_secs(1);
/// Frames being queued at once per connection; reading pauses beyond it.
const MAX_IN_FLIGHT: usize = 512;
/// Largest frame accepted; a bot message is a few KB.
const MAX_FRAME_BYTES: usize = 1 << 20;
/// Backoff after failures: doubling from `BACKOFF_BASE` up to `BACKOFF_MAX`, jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Most delay before dialling again after a `disconnect` frame (jitter only, so replicas
/// told to leave at once do not all dial in the same millisecond).
const DISCONNECT_JITTER_MS: u64 = 250;
/// A bot without a connection for this long makes the process not ready.
const NOT_READY_AFTER: Duration = Duration::from_secs(30);
/// How often the job queue's readiness is looked at.
const QUEUE_POLL: Duration = Duration::from_millis(250);
/// Bad credentials are logged at most this often.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(60);

/// Where a bot's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Connecting = 0,
    Connected = 1,
    AuthFailed = 2,
    Failed = 3,
}

impl State {
    const ALL: [State; 4] = [
        State::Connecting,
        State::Connected,
        State::AuthFailed,
        State::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::AuthFailed => "auth_failed",
            State::Failed => "failed",
        }
    }
}

/// Why a connection ended (the `cause` label of the reconnect metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The platform sent `disconnect`.
    Disconnect,
    /// The socket closed or failed.
    Closed,
    /// Nothing arrived for [`SILENCE_LIMIT`].
    Timeout,
    /// `connections/open` refused the app's credentials.
    AuthFailed,
    /// `connections/open` failed otherwise.
    OpenFailed,
    /// The WebSocket handshake failed.
    ConnectFailed,
    /// The job queue cannot take jobs: a connection that cannot acknowledge would only hold
    /// messages back from the other replicas.
    QueueDown,
    /// This process is stopping.
    Shutdown,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Disconnect => "disconnect",
            Cause::Closed => "closed",
            Cause::Timeout => "timeout",
            Cause::AuthFailed => "auth_failed",
            Cause::OpenFailed => "open_failed",
            Cause::ConnectFailed => "connect_failed",
            Cause::QueueDown => "queue_unavailable",
            Cause::Shutdown => "shutdown",
        }
    }
}

/// One bot's connection state, read by `/readyz`.
struct Status {
    bot: String,
    state: AtomicU8,
    /// Since when the bot has had no connection (`None` while connected).
    down_since: Mutex<Option<Instant>>,
}

impl Status {
    fn new(bot: &str) -> Self {
        let s = Self {
            bot: bot.to_string(),
            state: AtomicU8::new(State::Connecting as u8),
            down_since: Mutex::new(Some(Instant::now())),
        };
        s.show(State::Connecting);
        s
    }

    fn set(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match (state, *down) {
            (State::Connected, _) => *down = None,
            (_, None) => *down = Some(Instant::now()),
            _ => {}
        }
        drop(down);
        self.show(state);
    }

    fn show(&self, state: State) {
        let gauge = &shared::metrics::get().stream_state;
        for s in State::ALL {
            gauge
                .with_label_values(&[self.bot.as_str(), s.label()])
                .set(i64::from(s == state));
        }
    }

    fn ready(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == State::AuthFailed as u8 {
            return false;
        }
        let down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        down.is_none_or(|since| since.elapsed() < NOT_READY_AFTER)
    }
}

/// The Stream connections of one ingress process: a task per Stream bot.
pub struct StreamConnections {
    statuses: Vec<Arc<Status>>,
    tasks: JoinSet<()>,
}

impl fmt::Debug for StreamConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bots: Vec<_> = self.statuses.iter().map(|s| s.bot.as_str()).collect();
        f.debug_struct("StreamConnections")
            .field("bots", &bots)
            .finish_non_exhaustive()
    }
}

impl StreamConnections {
    /// Starts a connection task for each Stream bot of `state`; they end when `stop` fires,
    /// after acknowledging what they have queued.
    pub fn start(state: &IngressState, stop: CancellationToken) -> Self {
        let http = reqwest::Client::builder()
            .timeout(DIAL_TIMEOUT)
            .connect_timeout(DIAL_TIMEOUT)
            .build()
            .expect("HTTP client builds");
        let mut tasks = JoinSet::new();
        let mut statuses = Vec::new();
        for bot in state.inner.streams.iter().cloned() {
            let status = Arc::new(Status::new(&bot.id));
            statuses.push(status.clone());
            let conn = Connection {
                bot,
                state: state.clone(),
                http: http.clone(),
                status,
                stop: stop.clone(),
            };
            tasks.spawn(conn.run());
        }
        Self { statuses, tasks }
    }

    /// A readiness check: true while every Stream bot is connected, or lost its connection
    /// only moments ago and not for bad credentials.
    pub fn readiness(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let statuses = self.statuses.clone();
        Arc::new(move || statuses.iter().all(|s| s.ready()))
    }

    /// Waits until every task has ended (after the stop token fired).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What `connections/open` answers.
#[derive(Deserialize)]
struct Ticket {
    endpoint: String,
    ticket: String,
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("the gateway refused the app's credentials (HTTP {0})")]
    Auth(u16),
    #[error("connections/open failed: {0}")]
    Open(String),
    #[error("WebSocket handshake failed: {0}")]
    Connect(String),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One bot's connection task.
struct Connection {
    bot: DingTalkBot,
    state: IngressState,
    http: reqwest::Client,
    status: Arc<Status>,
    stop: CancellationToken,
}

impl Connection {
    async fn run(self) {
        let span = tracing::info_span!("dingtalk_stream", bot = %self.bot.id);
        async {
            let mut failures: u32 = 0;
            let mut auth_logged: Option<Instant> = None;
            loop {
                self.status.set(State::Connecting);
                if !self.queue_ready().await {
                    break;
                }
                let cause = match self.dial().await {
                    Ok(socket) => {
                        self.status.set(State::Connected);
                        tracing::info!("stream connected");
                        auth_logged = None;
                        let cause = self.session(socket).await;
                        if cause != Cause::Shutdown {
                            tracing::info!(cause = cause.label(), "stream connection ended");
                        }
                        cause
                    }
                    Err(DialError::Auth(status)) => {
                        self.status.set(State::AuthFailed);
                        if auth_logged.is_none_or(|t| t.elapsed() >= AUTH_LOG_EVERY) {
                            tracing::error!(
                                status,
                                "DingTalk refused the app's credentials for Stream mode: check app_key and app_secret"
                            );
                            auth_logged = Some(Instant::now());
                        }
                        Cause::AuthFailed
                    }
                    Err(e) => {
                        self.status.set(State::Failed);
                        tracing::warn!(error = %e, "stream dial failed");
                        match e {
                            DialError::Connect(_) => Cause::ConnectFailed,
                            _ => Cause::OpenFailed,
                        }
                    }
                };
                if cause == Cause::Shutdown || self.stop.is_cancelled() {
                    break;
                }
                shared::metrics::get()
                    .stream_reconnects
                    .with_label_values(&[self.bot.id.as_str(), cause.label()])
                    .inc();
                let delay = match cause {
                    Cause::Disconnect => {
                        failures = 0;
                        Duration::from_millis(rand::random_range(0..=DISCONNECT_JITTER_MS))
                    }
                    _ => {
                        failures = failures.saturating_add(1);
                        backoff(failures)
                    }
                };
                if !matches!(cause, Cause::Disconnect | Cause::AuthFailed) {
                    self.status.set(State::Failed);
                }
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            self.status.set(State::Failed);
        }
        .instrument(span)
        .await
    }

    /// Waits until the job queue can take jobs (a replica whose broker is not connected yet
    /// must not take messages it cannot acknowledge); false when stopped meanwhile.
    async fn queue_ready(&self) -> bool {
        let mut logged = false;
        while !self.state.inner.queue.is_ready() {
            if !logged {
                tracing::info!("waiting for the job queue before opening the stream connection");
                logged = true;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(QUEUE_POLL) => {}
            }
        }
        !self.stop.is_cancelled()
    }

    /// Asks for a ticket and opens the WebSocket with it.
    async fn dial(&self) -> Result<Socket, DialError> {
        let url = format!("{}{OPEN_PATH}", self.bot.api_base.trim_end_matches('/'));
        let body = json!({
            "clientId": self.bot.app_key,
            "clientSecret": self.bot.app_secret.expose(),
            "subscriptions": [{ "type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC }],
            "ua": concat!("parley/", env!("CARGO_PKG_VERSION")),
        });
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| DialError::Open(e.without_url().to_string()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| DialError::Open(e.without_url().to_string()))?;
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || text.contains("\"authFailed\"")
        {
            return Err(DialError::Auth(status.as_u16()));
        }
        if !status.is_success() {
            return Err(DialError::Open(format!(
                "HTTP {}: {}",
                status.as_u16(),
                shared::untrusted::clip(&text, 200)
            )));
        }
        let ticket: Ticket = serde_json::from_str(&text)
            .map_err(|e| DialError::Open(format!("unexpected answer: {e}")))?;
        let mut endpoint = url::Url::parse(&ticket.endpoint)
            .map_err(|e| DialError::Open(format!("bad endpoint: {e}")))?;
        if !matches!(endpoint.scheme(), "ws" | "wss") {
            return Err(DialError::Open(format!(
                "endpoint scheme {} is not ws or wss",
                endpoint.scheme()
            )));
        }
        endpoint
            .query_pairs_mut()
            .append_pair("ticket", &ticket.ticket);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let connecting =
            tokio_tungstenite::connect_async_with_config(endpoint.as_str(), Some(config), true);
        // The ticket is a credential: errors name the host, never the URL.
        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(e)) => Err(DialError::Connect(format!(
                "{}: {e}",
                endpoint.host_str().unwrap_or("?")
            ))),
            Err(_) => Err(DialError::Connect("timed out".into())),
        }
    }

    /// Serves one connection until it ends; returns why.
    async fn session(&self, socket: Socket) -> Cause {
        let (mut sink, mut source) = socket.split();
        let mut in_flight: JoinSet<Option<Ack>> = JoinSet::new();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let mut queue_check = tokio::time::interval(QUEUE_POLL);
        let mut last_seen = Instant::now();
        let cause = loop {
            tokio::select! {
                _ = self.stop.cancelled() => break Cause::Shutdown,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(Some(ack)) = done
                        && self.send_ack(&mut sink, ack).await.is_err()
                    {
                        break Cause::Closed;
                    }
                }
                frame = source.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                    let text = match frame {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Cause::Closed,
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(_))) => {
                            self.count("unknown", "malformed");
                            tracing::warn!("binary frame ignored");
                            last_seen = Instant::now();
                            continue;
                        }
                        Some(Ok(_)) => {
                            last_seen = Instant::now();
                            continue;
                        }
                    };
                    last_seen = Instant::now();
                    match self.frame(text.as_str()) {
                        Step::Reply(ack) => {
                            if self.send_ack(&mut sink, ack).await.is_err() {
                                break Cause::Closed;
                            }
                        }
                        Step::Queue(job, ack) => {
                            let state = self.state.clone();
                            in_flight.spawn(queue(state, job, ack));
                        }
                        Step::Disconnect(ack) => {
                            let _ = self.send_ack(&mut sink, ack).await;
                            break Cause::Disconnect;
                        }
                        Step::Nothing => {}
                    }
                }
                _ = queue_check.tick() => {
                    if !self.state.inner.queue.is_ready() {
                        tracing::warn!("job queue unavailable: stream connection closed until it is back");
                        break Cause::QueueDown;
                    }
                }
                _ = keepalive.tick() => {
                    if last_seen.elapsed() > SILENCE_LIMIT {
                        break Cause::Timeout;
                    }
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break Cause::Closed;
                    }
                }
            }
        };
        // Frames already being queued still get their acks while the socket is open: the
        // platform's `disconnect` leaves it open for a while, and on shutdown a few seconds
        // are allowed. What misses this is pushed again and answered once.
        if matches!(
            cause,
            Cause::Disconnect | Cause::Shutdown | Cause::QueueDown
        ) {
            let deadline = tokio::time::Instant::now() + DRAIN;
            while !in_flight.is_empty() {
                match tokio::time::timeout_at(deadline, in_flight.join_next()).await {
                    Ok(Some(Ok(Some(ack)))) => {
                        if self.send_ack(&mut sink, ack).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = sink.send(Message::Close(None)).await;
        }
        // Frames still being queued finish on their own; their acks are lost with the socket.
        in_flight.detach_all();
        cause
    }

    /// Writes an ack and records its latency.
    async fn send_ack(
        &self,
        sink: &mut futures::stream::SplitSink<Socket, Message>,
        ack: Ack,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let sent = sink.send(Message::Text(ack.body.into())).await;
        if let Some(started) = ack.started {
            shared::metrics::get()
                .stream_ack_duration
                .with_label_values(&[self.bot.id.as_str()])
                .observe(started.elapsed().as_secs_f64());
        }
        sent
    }

    fn count(&self, kind: &str, outcome: &str) {
        shared::metrics::get()
            .stream_frames
            .with_label_values(&[self.bot.id.as_str(), kind, outcome])
            .inc();
    }

    /// Decides what a text frame needs, and counts and logs it.
    fn frame(&self, text: &str) -> Step {
        let started = Instant::now();
        match decode(&self.bot, text, shared::now_ms()) {
            Decoded::Malformed(why) => {
                self.count("unknown", "malformed");
                tracing::warn!(error = %why, len = text.len(), "unparseable stream frame ignored");
                Step::Nothing
            }
            Decoded::System { ack, disconnect } => {
                if disconnect {
                    self.count("system", "disconnect");
                    Step::Disconnect(ack)
                } else {
                    self.count("system", "answered");
                    Step::Reply(ack)
                }
            }
            Decoded::Callback { message_id, job } => {
                let call = Call::new("dingtalk_stream", self.bot.id.clone());
                match *job {
                    Ok(job) => Step::Queue(
                        Box::new((call.traced(job), call.span())),
                        Ack::new(200, &message_id, "OK", &json!({ "response": "OK" }))
                            .timed(started),
                    ),
                    Err(e) => {
                        self.count("callback", "malformed");
                        let _enter = call.span().entered();
                        tracing::warn!(error = %e, "stream callback refused");
                        Step::Reply(
                            Ack::new(400, &message_id, "bad callback", &json!({})).timed(started),
                        )
                    }
                }
            }
            Decoded::Unsupported { kind, topic, ack } => {
                self.count(kind, "unsupported");
                tracing::info!(
                    topic = %shared::untrusted::clip(&topic, 100),
                    "stream frame not subscribed to; answered not implemented"
                );
                Step::Reply(ack)
            }
        }
    }
}

/// What a Stream frame asks of its connection, decided from its text alone.
#[derive(Debug)]
pub enum Decoded {
    /// Not a frame (not JSON, or without a messageId): nothing can be answered.
    Malformed(String),
    /// A `SYSTEM` frame and its answer (its own headers and data); `disconnect` ends the
    /// connection after it.
    System {
        /// The answer.
        ack: Ack,
        /// The platform is about to close the connection.
        disconnect: bool,
    },
    /// A bot message: its job, or why it is refused (a 400 ack).
    Callback {
        /// The frame's id, for the ack.
        message_id: String,
        /// The job, as the HTTP callback's would be (boxed: a Job is large).
        job: Box<Result<shared::job::Job, callback::CallbackError>>,
    },
    /// A frame of a kind or topic not taken: answered 404 "not implemented".
    Unsupported {
        /// `callback`, `event` or `unknown` (the metric's type label).
        kind: &'static str,
        /// Its topic, untrusted.
        topic: String,
        /// The answer.
        ack: Ack,
    },
}

/// Decodes one text frame for `bot` (PROTOCOLS.md §d.3): pure, so tests and the fuzzer
/// reach it without a connection.
pub fn decode(bot: &DingTalkBot, text: &str, now_ms: i64) -> Decoded {
    let frame: Frame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Decoded::Malformed(e.to_string()),
    };
    let Some(message_id) = frame.header("messageId").map(str::to_string) else {
        return Decoded::Malformed("no messageId".into());
    };
    let topic = frame.header("topic").unwrap_or_default().to_string();
    match frame.kind.as_str() {
        // Every system frame is answered with its own headers and data (the SDKs do so; for
        // `ping` the platform checks it).
        "SYSTEM" => Decoded::System {
            ack: Ack::echo(&frame, &message_id),
            disconnect: topic == "disconnect",
        },
        "CALLBACK" if topic == BOT_MESSAGE_TOPIC => {
            let data = frame.data.as_deref().unwrap_or_default();
            let job = callback::parse(&bot.id, data.as_bytes(), now_ms).and_then(|job| {
                callback::check_robot(&job, bot.robot_code())?;
                Ok(job)
            });
            Decoded::Callback {
                message_id,
                job: Box::new(job),
            }
        }
        kind => Decoded::Unsupported {
            kind: match kind {
                "CALLBACK" => "callback",
                "EVENT" => "event",
                _ => "unknown",
            },
            topic,
            ack: Ack::new(404, &message_id, "not implemented", &json!({})),
        },
    }
}

/// Queues a frame's job; its ack once the queue confirmed it, none if it could not.
async fn queue(
    state: IngressState,
    job: Box<(shared::job::Job, tracing::Span)>,
    ack: Ack,
) -> Option<Ack> {
    let (job, span) = *job;
    let bot = job.bot_id.clone();
    let queued = enqueue(&state, &job).instrument(span.clone()).await;
    let m = shared::metrics::get();
    match queued {
        Ok(_) => {
            m.stream_frames
                .with_label_values(&[bot.as_str(), "callback", "queued"])
                .inc();
            Some(ack)
        }
        Err(e) => {
            m.stream_frames
                .with_label_values(&[bot.as_str(), "callback", "not_queued"])
                .inc();
            let _enter = span.entered();
            tracing::error!(reason = %e, "stream callback not queued; left unacknowledged for the platform to push again");
            None
        }
    }
}

/// What to do with a frame.
enum Step {
    /// Answer at once.
    Reply(Ack),
    /// Queue the job; answer with the ack once it is confirmed.
    Queue(Box<(shared::job::Job, tracing::Span)>, Ack),
    /// Answer, then end the connection and dial again.
    Disconnect(Ack),
    Nothing,
}

/// A downstream frame (PROTOCOLS.md §d.3).
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    headers: Map<String, Value>,
    /// A JSON document as a string.
    #[serde(default)]
    data: Option<String>,
}

impl Frame {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// An upstream ack frame, and when its frame arrived.
#[derive(Debug)]
pub struct Ack {
    body: String,
    started: Option<Instant>,
}

impl Ack {
    /// The ack's JSON text, as sent on the socket.
    pub fn text(&self) -> &str {
        &self.body
    }

    fn new(code: u16, message_id: &str, message: &str, data: &Value) -> Self {
        let body = json!({
            "code": code,
            "headers": { "contentType": "application/json", "messageId": message_id },
            "message": message,
            "data": data.to_string(),
        });
        Self {
            body: body.to_string(),
            started: None,
        }
    }

    /// A system frame's answer: its own headers and data back.
    fn echo(frame: &Frame, message_id: &str) -> Self {
        let mut headers = frame.headers.clone();
        headers.insert("messageId".into(), Value::from(message_id));
        headers
            .entry("contentType")
            .or_insert_with(|| Value::from("application/json"));
        let body = json!({
            "code": 200,
            "headers": headers,
            "message": "OK",
            "data": frame.data.clone().unwrap_or_default(),
        });
        Self {
            body: body.to_string(),
            started: None,
        }
    }

    fn timed(mut self, started: Instant) -> Self {
        self.started = Some(started);
        self
    }
}

/// Exponential backoff with full jitter in its upper half.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    let cap = exp.min(BACKOFF_MAX);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(ms / 2..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(250) && first <= BACKOFF_BASE);
            let late = backoff(50);
            assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX);
        }
        assert!(backoff(4) >= Duration::from_secs(2));
    }

    #[test]
    fn ping_is_answered_with_its_headers_and_data() {
        let frame: Frame = serde_json::from_str(
            r#"{"specVersion":"1.0","type":"SYSTEM","headers":{"appId":"a","messageId":"m1","topic":"ping","contentType":"application/json","time":"1"},"data":"{\"opaque\":\"x\"}"}"#,
        )
        .unwrap();
        let ack: Value = serde_json::from_str(&Ack::echo(&frame, "m1").body).unwrap();
        assert_eq!(ack["code"], 200);
        assert_eq!(ack["headers"]["messageId"], "m1");
        assert_eq!(ack["headers"]["topic"], "ping");
        assert_eq!(ack["data"], "{\"opaque\":\"x\"}");
    }

    #[test]
    fn callback_ack_carries_the_message_id_and_a_json_string() {
        let ack: Value =
            serde_json::from_str(&Ack::new(200, "m2", "OK", &json!({ "response": "OK" })).body)
                .unwrap();
        assert_eq!(ack["headers"]["messageId"], "m2");
        let data: Value = serde_json::from_str(ack["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["response"], "OK");
    }
}
