//! Parley's HTTP ingress. It owns the public routes where platforms deliver callbacks: it
//! reads the raw body under a size limit, verifies the platform's signature before parsing
//! anything, turns the message into a [`Job`] (keyed by the platform's message id, so the
//! worker answers a platform retry once), and acknowledges only once the job queue has it —
//! never waiting for the model. One module per platform (`dingtalk`, `wecom`) plus `notify`
//! holds its bots and its route; this file holds what they share: the state, the request
//! span whose trace id the job carries on to the worker, queueing, and the log line and
//! metric of every request. Every refusal is a short 4xx/5xx ([`Rejection`]) with a log
//! line and a metric, and creates no job.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use shared::cache::Cache;
use shared::config::{BotSettings, ChannelSettings, DingTalkBot, DingTalkIngress, Settings};
use shared::job::Job;
use shared::queue::JobQueue;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

mod dingtalk;
pub mod dingtalk_stream;
mod notify;
mod rejection;
pub mod server;
mod wecom;
mod wecom_aibot;

pub use dingtalk_stream::StreamConnections;
pub use rejection::Rejection;

/// Everything a callback handler needs; cheap to clone.
#[derive(Clone)]
pub struct IngressState {
    inner: Arc<Inner>,
}

struct Inner {
    dingtalk: dingtalk::Bots,
    /// DingTalk bots whose messages arrive over a Stream connection, not HTTP.
    streams: Vec<DingTalkBot>,
    wecom: wecom::Bots,
    aibots: wecom_aibot::Bots,
    /// What this replica last showed per AI bot stream (for "no change" answers).
    last_shown: wecom_aibot::LastShown,
    queue: Arc<dyn JobQueue>,
    cache: Arc<dyn Cache>,
    body_limit: usize,
    /// How long a body may take to arrive once the headers are in.
    body_timeout: Duration,
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
            .field("dingtalk_bots", &self.inner.dingtalk.len())
            .field("dingtalk_stream_bots", &self.inner.streams.len())
            .field("wecom_bots", &self.inner.wecom.len())
            .field("wecom_aibots", &self.inner.aibots.len())
            .finish_non_exhaustive()
    }
}

impl IngressState {
    /// State for the bots of `settings`, publishing to `queue`, deduping in `cache`.
    pub fn new(settings: &Settings, queue: Arc<dyn JobQueue>, cache: Arc<dyn Cache>) -> Self {
        Self {
            inner: Arc::new(Inner {
                dingtalk: dingtalk::Bots::new(&settings.bots),
                streams: settings
                    .bots
                    .iter()
                    .filter_map(|b| match b {
                        BotSettings::DingTalk(d) if d.ingress == DingTalkIngress::Stream => {
                            Some(d.clone())
                        }
                        _ => None,
                    })
                    .collect(),
                wecom: wecom::Bots::new(&settings.bots),
                aibots: wecom_aibot::Bots::new(&settings.bots),
                last_shown: wecom_aibot::LastShown::default(),
                queue,
                cache,
                body_limit: settings.server.body_limit_bytes,
                body_timeout: Duration::from_secs(settings.server.body_timeout_secs),
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

/// The public routes: one line per platform, plus notifications.
pub fn router(state: IngressState) -> Router {
    Router::new()
        .route("/dingtalk/{bot_id}", post(dingtalk::callback))
        .route(
            "/wecom/{bot_id}",
            post(wecom::callback).get(wecom::verify_url),
        )
        .route("/notify/{channel_id}", post(notify::notify))
        .with_state(state)
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
    /// A stream refresh answered with the answer's progress.
    Refreshed,
}

/// One request on a public route: its route label, the bot or channel it names, when it
/// arrived, and its trace id. The trace is a field of the request's span and travels in
/// the job, so the worker's lines for the same message carry it too.
struct Call {
    route: &'static str,
    target: String,
    started: Instant,
    trace: String,
}

impl Call {
    fn new(route: &'static str, target: String) -> Self {
        Self {
            route,
            target,
            started: Instant::now(),
            trace: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// The span around everything done for this request.
    fn span(&self) -> tracing::Span {
        // The bot id comes from the path: bounded and escaped before it reaches a log line.
        tracing::info_span!(
            "request",
            route = self.route,
            bot = %shared::untrusted::clip(&self.target, 64),
            trace = %self.trace,
        )
    }

    /// `job`, carrying this request's trace id.
    fn traced(&self, mut job: Job) -> Job {
        job.trace_id = Some(self.trace.clone());
        job
    }

    /// Records the metric and log line of this request.
    fn record(&self, result: &Result<Accepted, Rejection>) {
        let m = shared::metrics::get();
        m.ack_duration
            .with_label_values(&[self.route])
            .observe(self.started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Accepted::Queued) => "accepted",
            Ok(Accepted::Ignored) => "ignored",
            Ok(Accepted::Refreshed) => "refreshed",
            Ok(Accepted::Duplicate) => {
                tracing::info!("duplicate dropped");
                "duplicate"
            }
            Err(r) => {
                // Reasons may quote the request (an XML element's name): bounded, escaped.
                let reason = shared::untrusted::clip(&r.to_string(), 200);
                if r.classify().0.is_server_error() {
                    tracing::error!(%reason, "request not accepted");
                } else {
                    tracing::warn!(%reason, "request rejected");
                }
                r.outcome()
            }
        };
        m.http_requests
            .with_label_values(&[self.route, outcome])
            .inc();
    }

    /// Runs `handle` inside this request's span, then records the callback and answers it.
    async fn respond(
        self,
        handle: impl AsyncFnOnce(&Call) -> Result<Accepted, Rejection>,
    ) -> Response {
        self.respond_with(async |call| {
            handle(call)
                .await
                .map(|a| (a, StatusCode::OK.into_response()))
        })
        .await
    }

    /// As [`Self::respond`], for callbacks answered with a body of their own.
    async fn respond_with(
        self,
        handle: impl AsyncFnOnce(&Call) -> Result<(Accepted, Response), Rejection>,
    ) -> Response {
        let span = self.span();
        async {
            match handle(&self).await {
                Ok((accepted, response)) => {
                    self.record(&Ok(accepted));
                    response
                }
                Err(r) => self.finish(Err(r)),
            }
        }
        .instrument(span)
        .await
    }

    /// Records a platform callback and answers it: an empty 200 once accepted.
    fn finish(&self, result: Result<Accepted, Rejection>) -> Response {
        self.record(&result);
        match result {
            Ok(_) => StatusCode::OK.into_response(),
            Err(r) => r.into_response(),
        }
    }
}

/// Reads the body, refusing more than `[server] body_limit_bytes` without buffering them —
/// at once, without waiting for a byte, when its `Content-Length` already says it is larger —
/// and one that takes longer than `body_timeout_secs` to arrive.
async fn read_body(state: &IngressState, body: Body) -> Result<Bytes, Rejection> {
    use axum::body::HttpBody as _;
    let limit = state.inner.body_limit;
    if body.size_hint().lower() > limit as u64 {
        return Err(Rejection::TooLarge);
    }
    let read = axum::body::to_bytes(body, limit);
    let read = tokio::time::timeout(state.inner.body_timeout, read)
        .await
        .map_err(|_| Rejection::SlowBody)?;
    read.map_err(|e| {
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
async fn enqueue(state: &IngressState, job: &Job) -> Result<Accepted, Rejection> {
    state.inner.queue.publish(job).await?;
    tracing::debug!(job = %job.id, "queued");
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
