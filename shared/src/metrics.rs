//! Every metric Parley exports, named in one place. Names carry the `parley_` prefix and
//! base units; counters end in `_total`; labels come from closed sets (platform, route,
//! outcome, api) and never carry user ids, chat ids or text. One process-wide registry,
//! rendered by the admin endpoint `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::OnceLock;

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Callbacks by route and outcome (`accepted`, `duplicate`, `bad_signature`, …).
    pub http_requests: IntCounterVec,
    /// Time from request to the 2xx/4xx answer, by route.
    pub ack_duration: HistogramVec,
    /// Jobs finished by the worker, by platform and outcome.
    pub jobs: IntCounterVec,
    /// Time from the ingress accepting a job to the last reply part delivered, by platform.
    pub job_duration: HistogramVec,
    /// Jobs being processed now.
    pub jobs_in_flight: IntGauge,
    /// Jobs waiting in the embedded queue.
    pub queue_depth: IntGaugeVec,
    /// Model calls by outcome (`ok`, `rate_limited`, `server_error`, `timeout`, …).
    pub llm_requests: IntCounterVec,
    /// Duration of successful model calls, by upstream.
    pub llm_duration: HistogramVec,
    /// Tokens reported by the model, by bot, upstream and kind (`prompt`, `completion`).
    pub llm_tokens: IntCounterVec,
    /// `parley_llm_breaker_state{upstream}`: 0 closed, 1 open, 2 half-open (probing).
    pub llm_breaker: IntGaugeVec,
    /// Calls to platform APIs by platform, api and outcome.
    pub platform_requests: IntCounterVec,
    /// Access-token fetches by platform.
    pub token_fetches: IntCounterVec,
    /// `parley_platform_throttle_wait_seconds{platform,api}`
    pub throttle_wait: HistogramVec,
    /// `parley_platform_budget_remaining{bot}`
    pub budget_remaining: IntGaugeVec,
    /// `parley_first_content_seconds{platform}`
    pub first_content: HistogramVec,
    /// `parley_card_updates{platform}`
    pub card_updates: HistogramVec,
    /// `parley_aibot_refreshes_total{outcome}`: WeCom AI bot stream refreshes answered.
    pub aibot_refreshes: IntCounterVec,
    /// `parley_aibot_refresh_seconds`: time to answer a stream refresh.
    pub aibot_refresh_duration: HistogramVec,
    /// `parley_aibot_response_url_total{reason,outcome}`: answers posted to `response_url`.
    pub aibot_response_url: IntCounterVec,
    /// `parley_limit_wait_seconds{kind}`: how long model calls waited for the shared limit
    /// (`rpm`, `tpm`: the rate that set the wait).
    pub limit_wait: HistogramVec,
    /// `parley_limit_rejections_total{kind}`: messages answered without the model because
    /// of a limit (`rpm`, `tpm`, `backlog`: busy; `user_quota`).
    pub limit_rejections: IntCounterVec,
    /// `parley_stream_connection_state{bot,state}`: 1 for the state each DingTalk Stream
    /// bot's connection is in (`connecting`, `connected`, `auth_failed`, `failed`), else 0.
    pub stream_state: IntGaugeVec,
    /// `parley_stream_reconnects_total{bot,cause}`: connections ended and dialled again
    /// (`disconnect`, `closed`, `timeout`, `open_failed`, `auth_failed`, `connect_failed`,
    /// `queue_unavailable`).
    pub stream_reconnects: IntCounterVec,
    /// `parley_stream_frames_total{bot,type,outcome}`: frames received on Stream connections.
    pub stream_frames: IntCounterVec,
    /// `parley_stream_ack_seconds{bot}`: time from a callback frame to its ack on the socket
    /// (the job confirmed by the queue in between).
    pub stream_ack_duration: HistogramVec,
    /// `parley_connections_open`: connections open on the public listener.
    pub connections_open: IntGauge,
    /// `parley_connections_shed_total`: connections closed at the cap to make room.
    pub connections_shed: IntCounterVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics, created on first use.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let fast = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ];
        let slow = vec![0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];
        Self {
            http_requests: counter(
                &r,
                "parley_http_requests_total",
                "Callbacks and API requests received, by route and outcome.",
                &["route", "outcome"],
            ),
            ack_duration: histogram(
                &r,
                "parley_ack_duration_seconds",
                "Time from receiving a callback to answering it.",
                &["route"],
                fast.clone(),
            ),
            jobs: counter(
                &r,
                "parley_jobs_total",
                "Jobs finished by workers, by platform and outcome.",
                &["platform", "outcome"],
            ),
            job_duration: histogram(
                &r,
                "parley_job_duration_seconds",
                "Time from accepting a message to delivering its whole answer.",
                &["platform"],
                slow.clone(),
            ),
            jobs_in_flight: gauge(&r, "parley_jobs_in_flight", "Jobs being processed now."),
            queue_depth: gauge_vec(
                &r,
                "parley_queue_depth",
                "Jobs waiting in the embedded queue, by lane (chat, notify).",
                &["lane"],
            ),
            llm_requests: counter(
                &r,
                "parley_llm_requests_total",
                "Model calls, by outcome.",
                &["outcome"],
            ),
            llm_duration: histogram(
                &r,
                "parley_llm_duration_seconds",
                "Duration of successful model calls, by upstream.",
                &["upstream"],
                slow,
            ),
            llm_tokens: counter(
                &r,
                "parley_llm_tokens_total",
                "Tokens reported by the model, by bot, upstream and kind (prompt, completion).",
                &["bot", "upstream", "kind"],
            ),
            llm_breaker: gauge_vec(
                &r,
                "parley_llm_breaker_state",
                "Each model upstream's circuit breaker: 0 closed, 1 open (skipped), 2 half-open (one probe).",
                &["upstream"],
            ),
            platform_requests: counter(
                &r,
                "parley_platform_requests_total",
                "Calls to platform APIs, by platform, api and outcome.",
                &["platform", "api", "outcome"],
            ),
            token_fetches: counter(
                &r,
                "parley_token_fetches_total",
                "Access-token fetches, by platform.",
                &["platform"],
            ),
            throttle_wait: histogram(
                &r,
                "parley_platform_throttle_wait_seconds",
                "Time platform calls waited for the app's shared rate limit, by platform and api.",
                &["platform", "api"],
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
            ),
            budget_remaining: gauge_vec(
                &r,
                "parley_platform_budget_remaining",
                "Metered platform API calls left this month (api_monthly_budget), by bot.",
                &["bot"],
            ),
            first_content: histogram(
                &r,
                "parley_first_content_seconds",
                "Time from accepting a message to the first visible text of its streamed answer.",
                &["platform"],
                vec![0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0],
            ),
            card_updates: histogram(
                &r,
                "parley_card_updates",
                "Streaming updates sent per card, the final one included.",
                &["platform"],
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0],
            ),
            aibot_refreshes: counter(
                &r,
                "parley_aibot_refreshes_total",
                "WeCom AI bot stream refreshes by outcome (progress, final, follows, unknown, slow).",
                &["outcome"],
            ),
            aibot_refresh_duration: histogram(
                &r,
                "parley_aibot_refresh_seconds",
                "Time to answer a WeCom AI bot stream refresh.",
                &[],
                vec![
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            aibot_response_url: counter(
                &r,
                "parley_aibot_response_url_total",
                "WeCom AI bot answers posted to the response_url, by why (late, not_refreshed, rest) and outcome.",
                &["reason", "outcome"],
            ),
            limit_wait: histogram(
                &r,
                "parley_limit_wait_seconds",
                "Time model calls waited for the deployment's request or token limit, by the limit that set it.",
                &["kind"],
                vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                ],
            ),
            limit_rejections: counter(
                &r,
                "parley_limit_rejections_total",
                "Messages answered without the model because of a limit (rpm, tpm, backlog: busy; user_quota).",
                &["kind"],
            ),
            stream_state: gauge_vec(
                &r,
                "parley_stream_connection_state",
                "State of each DingTalk Stream bot's connection: 1 for the current state, else 0.",
                &["bot", "state"],
            ),
            stream_reconnects: counter(
                &r,
                "parley_stream_reconnects_total",
                "DingTalk Stream connections dialled again, by cause.",
                &["bot", "cause"],
            ),
            stream_frames: counter(
                &r,
                "parley_stream_frames_total",
                "Frames received on DingTalk Stream connections, by type and outcome.",
                &["bot", "type", "outcome"],
            ),
            stream_ack_duration: histogram(
                &r,
                "parley_stream_ack_seconds",
                "Time from a DingTalk Stream callback frame to its ack, the job queued in between.",
                &["bot"],
                fast,
            ),
            connections_open: gauge(
                &r,
                "parley_connections_open",
                "Connections open on the public listener.",
            ),
            connections_shed: counter(
                &r,
                "parley_connections_shed_total",
                "Connections on the public listener closed at max_connections to make room.",
                &[],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }
}
