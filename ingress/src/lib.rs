//! Parley's HTTP ingress. It owns the public routes where platforms deliver callbacks: it
//! reads the raw body under a size limit, verifies the platform's signature before parsing
//! anything, turns the message into a [`Job`] (keyed by the platform's message id, so the worker
//! answers a platform retry once), and acknowledges only once the job queue has it — never waiting for the model. Every refusal
//! is a short 4xx/5xx with a log line and a metric, and creates no job.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use shared::cache::Cache;
use shared::config::{BotSettings, ChannelSettings, DingTalkBot, Settings, WecomBot};
use shared::job::{Job, Platform};
use shared::platform::dingtalk;
use shared::platform::wecom::OpenError;
use shared::platform::wecom::crypto::{CryptoError, WecomCrypto};
use shared::platform::wecom::xml::XmlError;
use shared::queue::{JobQueue, QueueError};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod notify;

/// Everything a callback handler needs; cheap to clone.
#[derive(Clone)]
pub struct IngressState {
    inner: Arc<Inner>,
}

/// A bot as the ingress needs it: WeCom's AES key is decoded once, at start-up.
enum Bot {
    DingTalk(DingTalkBot),
    Wecom(WecomBot, WecomCrypto),
}

struct Inner {
    bots: HashMap<(Platform, String), Bot>,
    queue: Arc<dyn JobQueue>,
    cache: Arc<dyn Cache>,
    body_limit: usize,
    dedupe_ttl: Duration,
    channels: HashMap<String, ChannelSettings>,
    /// The notification lane; None when no channel is configured.
    notify_queue: Option<Arc<dyn JobQueue>>,
    /// The user's Alertmanager template, read at start-up.
    alert_template: Option<String>,
}

impl fmt::Debug for IngressState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngressState")
            .field("bots", &self.inner.bots.len())
            .finish_non_exhaustive()
    }
}

impl IngressState {
    /// State for the bots of `settings`, publishing to `queue`, deduping in `cache`.
    pub fn new(settings: &Settings, queue: Arc<dyn JobQueue>, cache: Arc<dyn Cache>) -> Self {
        let bots = settings
            .bots
            .iter()
            .map(|b| {
                let bot = match b {
                    BotSettings::DingTalk(d) => Bot::DingTalk(d.clone()),
                    BotSettings::Wecom(w) => {
                        let crypto = WecomCrypto::new(
                            w.token.expose(),
                            w.encoding_aes_key.expose(),
                            &w.corp_id,
                        )
                        .expect("EncodingAESKey was validated with the configuration");
                        Bot::Wecom(w.clone(), crypto)
                    }
                };
                ((b.platform(), b.id().to_string()), bot)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                bots,
                queue,
                cache,
                body_limit: settings.server.body_limit_bytes,
                dedupe_ttl: Duration::from_secs(settings.server.dedupe_ttl_secs),
                channels: settings
                    .channels
                    .iter()
                    .map(|c| (c.id.clone(), c.clone()))
                    .collect(),
                notify_queue: None,
                alert_template: None,
            }),
        }
    }

    /// Adds the notification lane, and the Alertmanager template (already validated).
    pub fn with_notify(mut self, queue: Arc<dyn JobQueue>, alert_template: Option<String>) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.notify_queue = Some(queue);
        inner.alert_template = alert_template;
        self
    }
}

/// The public routes.
pub fn router(state: IngressState) -> Router {
    Router::new()
        .route("/dingtalk/{bot_id}", post(dingtalk_callback))
        .route(
            "/wecom/{bot_id}",
            post(wecom_callback).get(wecom_verify_url),
        )
        .route("/notify/{channel_id}", post(notify::notify))
        .with_state(state)
}

/// Why a callback was not accepted. Each maps to one status, one log line, one metric label.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// No bot with that id on that platform.
    #[error("unknown bot")]
    UnknownBot,
    /// The body is larger than `[server].body_limit_bytes`.
    #[error("body too large")]
    TooLarge,
    /// The body could not be read.
    #[error("body unreadable")]
    Unreadable,
    /// Signature or timestamp refused.
    #[error("{0}")]
    Signature(#[from] dingtalk::sign::SignError),
    /// Signed, but not a message we can parse.
    #[error("{0}")]
    Malformed(#[from] dingtalk::callback::CallbackError),
    /// A required query parameter is absent.
    #[error("missing query parameter {0}")]
    MissingParam(&'static str),
    /// The timestamp is not a number or more than an hour away.
    #[error("stale or malformed timestamp")]
    StaleTimestamp,
    /// WeCom signature or decryption refused.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// WeCom XML refused.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// The queue cannot take the job now; the platform should retry.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// The dedupe store cannot be reached; accepting would risk double answers or loss.
    #[error("dedupe store unavailable")]
    CacheDown,
    /// No or wrong bearer token.
    #[error("bad bearer token")]
    Unauthorized,
    /// A notification body that is not one of the accepted shapes.
    #[error("{0}")]
    Notice(#[from] shared::notify::request::RequestError),
}

impl Rejection {
    /// The one mapping from a rejection to its HTTP status and its
    /// `parley_http_requests_total{outcome}` label, so the two never drift apart.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        use dingtalk::sign::SignError::*;
        use shared::notify::request::RequestError;
        match self {
            Rejection::UnknownBot => (StatusCode::NOT_FOUND, "unknown_bot"),
            Rejection::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Rejection::Unreadable => (StatusCode::BAD_REQUEST, "unreadable"),
            Rejection::Signature(MissingHeader | SignatureMismatch) => {
                (StatusCode::UNAUTHORIZED, "bad_signature")
            }
            Rejection::Signature(StaleTimestamp) => (StatusCode::FORBIDDEN, "stale_timestamp"),
            Rejection::Signature(MalformedTimestamp) => (StatusCode::BAD_REQUEST, "bad_timestamp"),
            Rejection::Malformed(_) | Rejection::MissingParam(_) => {
                (StatusCode::BAD_REQUEST, "malformed")
            }
            Rejection::StaleTimestamp => (StatusCode::FORBIDDEN, "stale_timestamp"),
            Rejection::Crypto(CryptoError::SignatureMismatch) => {
                (StatusCode::UNAUTHORIZED, "bad_signature")
            }
            Rejection::Crypto(CryptoError::ReceiveIdMismatch) => {
                (StatusCode::FORBIDDEN, "wrong_receiver")
            }
            Rejection::Crypto(_) => (StatusCode::BAD_REQUEST, "bad_ciphertext"),
            Rejection::Xml(XmlError::TooLarge) => (StatusCode::PAYLOAD_TOO_LARGE, "malformed"),
            Rejection::Xml(_) => (StatusCode::BAD_REQUEST, "malformed"),
            Rejection::Queue(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable"),
            Rejection::CacheDown => (StatusCode::SERVICE_UNAVAILABLE, "cache_unavailable"),
            Rejection::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Rejection::Notice(RequestError::Render(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "malformed")
            }
            Rejection::Notice(_) => (StatusCode::BAD_REQUEST, "malformed"),
        }
    }

    /// Label for `parley_http_requests_total{outcome}`.
    pub fn outcome(&self) -> &'static str {
        self.classify().1
    }
}

/// What happened to an accepted callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new job is queued.
    Queued,
    /// A platform retry of a message already queued.
    Duplicate,
    /// Valid, but needs no answer (an event we do not act on).
    Ignored,
}

/// Reads the body, refusing more than `limit` bytes without buffering them.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, Rejection> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            Rejection::TooLarge
        } else {
            Rejection::Unreadable
        }
    })
}

/// Queues `job`: the platform-independent tail of every callback route. A platform retry
/// of a message already queued is queued again and dropped by the worker, whose answered
/// marker is keyed by the same message id and which answers a conversation's jobs one
/// after another, so the copy meets the marker of the first. Deduplicating here would
/// put a cache round trip in front of every acknowledgement to catch the rare retry.
pub async fn enqueue(state: &IngressState, job: &Job) -> Result<Accepted, Rejection> {
    state.inner.queue.publish(job).await?;
    Ok(Accepted::Queued)
}

/// Queues `job` on `queue` unless its id was queued within the dedupe window: for requests
/// whose caller is told about duplicates (a notification's `Idempotency-Key`). The mark is
/// removed again if the queue refuses, so the caller's retry is not mistaken for a
/// duplicate of a message that was never queued.
async fn enqueue_once(
    state: &IngressState,
    queue: &dyn JobQueue,
    job: &Job,
) -> Result<Accepted, Rejection> {
    let inner = &state.inner;
    let key = format!("dedupe:{}", job.id);
    let fresh = inner
        .cache
        .set_nx(&key, "1", inner.dedupe_ttl)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "dedupe store unavailable");
            Rejection::CacheDown
        })?;
    if !fresh {
        return Ok(Accepted::Duplicate);
    }
    if let Err(e) = queue.publish(job).await {
        let _ = inner.cache.delete(&key).await;
        return Err(e.into());
    }
    Ok(Accepted::Queued)
}

/// Records the metric and log line of one request.
fn record(
    route: &'static str,
    bot_id: &str,
    started: Instant,
    result: &Result<Accepted, Rejection>,
) {
    let m = shared::metrics::get();
    m.ack_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(Accepted::Queued) => "accepted",
        Ok(Accepted::Ignored) => "ignored",
        Ok(Accepted::Duplicate) => {
            tracing::info!(route, bot = bot_id, "duplicate dropped");
            "duplicate"
        }
        Err(r) => {
            if r.classify().0.is_server_error() {
                tracing::error!(route, bot = bot_id, reason = %r, "request not accepted");
            } else {
                tracing::warn!(route, bot = bot_id, reason = %r, "request rejected");
            }
            r.outcome()
        }
    };
    m.http_requests.with_label_values(&[route, outcome]).inc();
}

/// The answer to a refused request: its status and a short machine-readable reason.
fn refusal(r: &Rejection) -> Response {
    let (status, outcome) = r.classify();
    let body = serde_json::json!({"error": outcome}).to_string();
    (status, [("content-type", "application/json")], body).into_response()
}

/// Records a platform callback and answers it: an empty 200 once accepted.
fn finish(
    route: &'static str,
    bot_id: &str,
    started: Instant,
    result: Result<Accepted, Rejection>,
) -> Response {
    record(route, bot_id, started, &result);
    match result {
        Ok(_) => StatusCode::OK.into_response(),
        Err(r) => refusal(&r),
    }
}

async fn dingtalk_callback(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle_dingtalk(&state, &bot_id, &headers, body).await;
    finish("dingtalk_callback", &bot_id, started, result)
}

async fn handle_dingtalk(
    state: &IngressState,
    bot_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Rejection> {
    let Some(Bot::DingTalk(bot)) = state
        .inner
        .bots
        .get(&(Platform::DingTalk, bot_id.to_string()))
    else {
        return Err(Rejection::UnknownBot);
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = shared::now_ms();
    dingtalk::sign::verify_callback(
        bot.app_secret.expose(),
        header("timestamp"),
        header("sign"),
        now,
    )?;
    let body = read_body(body, state.inner.body_limit).await?;
    let job = dingtalk::callback::parse(&bot.id, &body, now)?;
    enqueue(state, &job).await
}

fn wecom_bot<'a>(
    state: &'a IngressState,
    bot_id: &str,
) -> Result<(&'a WecomBot, &'a WecomCrypto), Rejection> {
    match state.inner.bots.get(&(Platform::Wecom, bot_id.to_string())) {
        Some(Bot::Wecom(bot, crypto)) => Ok((bot, crypto)),
        _ => Err(Rejection::UnknownBot),
    }
}

/// The query parameters WeCom signs. Percent-decoded by hand: `echostr` is base64 and a
/// form decoder would turn its `+` into a space and break the signature.
struct WecomQuery {
    msg_signature: String,
    timestamp: String,
    nonce: String,
    echostr: Option<String>,
}

impl WecomQuery {
    fn parse(raw: Option<&str>) -> Result<Self, Rejection> {
        let mut params: HashMap<&str, String> = HashMap::new();
        for pair in raw.unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            params.insert(k, v);
        }
        let mut take = |k: &'static str| params.remove(k).ok_or(Rejection::MissingParam(k));
        Ok(Self {
            msg_signature: take("msg_signature")?,
            timestamp: take("timestamp")?,
            nonce: take("nonce")?,
            echostr: take("echostr").ok(),
        })
    }
}

async fn wecom_verify_url(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let started = Instant::now();
    let result = (|| {
        let (_, crypto) = wecom_bot(&state, &bot_id)?;
        let q = WecomQuery::parse(query.as_deref())?;
        let echostr = q.echostr.ok_or(Rejection::MissingParam("echostr"))?;
        Ok(crypto.verify_url(&q.msg_signature, &q.timestamp, &q.nonce, &echostr)?)
    })();
    match result {
        Ok(plain) => {
            record("wecom_verify", &bot_id, started, &Ok(Accepted::Ignored));
            tracing::info!(bot = %bot_id, "WeCom callback URL verified");
            plain.into_response()
        }
        Err(r) => finish("wecom_verify", &bot_id, started, Err(r)),
    }
}

async fn wecom_callback(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle_wecom(&state, &bot_id, query.as_deref(), body).await;
    finish("wecom_callback", &bot_id, started, result)
}

async fn handle_wecom(
    state: &IngressState,
    bot_id: &str,
    query: Option<&str>,
    body: Body,
) -> Result<Accepted, Rejection> {
    let (bot, crypto) = wecom_bot(state, bot_id)?;
    let q = WecomQuery::parse(query)?;
    let now = shared::now_ms();
    let ts: i64 = q
        .timestamp
        .trim()
        .parse()
        .map_err(|_| Rejection::StaleTimestamp)?;
    if (now / 1000 - ts).abs() > dingtalk::sign::MAX_SKEW_MS / 1000 {
        return Err(Rejection::StaleTimestamp);
    }
    let body = read_body(body, state.inner.body_limit).await?;
    let message = shared::platform::wecom::open_callback(
        crypto,
        &q.msg_signature,
        &q.timestamp,
        &q.nonce,
        &body,
    )
    .map_err(|e| match e {
        OpenError::Xml(e) => Rejection::Xml(e),
        OpenError::Crypto(e) => Rejection::Crypto(e),
    })?;
    match shared::platform::wecom::callback::to_job(bot, &message, now) {
        Some(job) => enqueue(state, &job).await,
        None => Ok(Accepted::Ignored),
    }
}
