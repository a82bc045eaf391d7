//! `POST /wecom/{bot}` for WeCom AI bots (智能机器人): encrypted JSON callbacks, answered
//! with encrypted passive replies. A message is queued and answered at once with the id of
//! the stream its answer will show in; WeCom then asks again and again ("refresh") and each
//! refresh is answered from the answer's progress in the cache, by whichever replica it
//! reaches, within [`REFRESH_BOUND`] however slow the cache is. The signature, timestamp
//! window and URL check are the app bots' (`wecom.rs`); only the body format differs.

use super::wecom::WecomQuery;
use super::{Accepted, Call, IngressState, Rejection, read_body};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::config::{BotSettings, WecomAibotBot};
use shared::platform::wecom::callback::check_timestamp;
use shared::platform::wecom::crypto::WecomCrypto;
use shared::platform::wecom_aibot::callback::{Callback, to_job};
use shared::platform::wecom_aibot::stream::{Claim, FOLLOWS, Streams, stream_id};
use shared::platform::wecom_aibot::{
    AibotError, open_callback, reply_body, stream_reply, text_reply,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most a refresh waits for the cache before answering "no change": WeCom gives up
/// on a reply after 5 s.
pub(crate) const REFRESH_BOUND: Duration = Duration::from_millis(1500);

/// Streams whose last text this replica remembers, for a "no change" answer when the
/// cache is slow.
const REMEMBERED: usize = 1024;

/// The AI bots, by id, each with its AES key decoded once, at start-up.
pub(crate) struct Bots(HashMap<String, (WecomAibotBot, WecomCrypto)>);

impl Bots {
    pub(crate) fn new(bots: &[BotSettings]) -> Self {
        Self(
            bots.iter()
                .filter_map(|b| match b {
                    BotSettings::WecomAibot(w) => {
                        let crypto =
                            WecomCrypto::new(w.token.expose(), w.encoding_aes_key.expose(), "")
                                .expect("EncodingAESKey was validated with the configuration");
                        Some((w.id.clone(), (w.clone(), crypto)))
                    }
                    _ => None,
                })
                .collect(),
        )
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn get(&self, id: &str) -> Option<&(WecomAibotBot, WecomCrypto)> {
        self.0.get(id)
    }
}

/// The last text this replica showed per stream, a bounded first-in-first-out memory.
#[derive(Default)]
pub(crate) struct LastShown(Mutex<(HashMap<String, String>, VecDeque<String>)>);

impl LastShown {
    fn remember(&self, stream: &str, text: &str) {
        let mut guard = self.0.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        if map.insert(stream.to_string(), text.to_string()).is_none() {
            order.push_back(stream.to_string());
            while order.len() > REMEMBERED {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    fn recall(&self, stream: &str) -> String {
        let guard = self.0.lock().expect("not poisoned");
        guard.0.get(stream).cloned().unwrap_or_default()
    }
}

impl From<AibotError> for Rejection {
    fn from(e: AibotError) -> Self {
        match e {
            AibotError::Crypto(e) => Rejection::Crypto(e),
            AibotError::Malformed(detail) => Rejection::Json(detail),
        }
    }
}

/// `POST /wecom/{bot}` for an AI bot.
pub(crate) async fn callback(
    state: IngressState,
    bot_id: String,
    query: Option<String>,
    body: Body,
) -> Response {
    Call::new("wecom_aibot_callback", bot_id)
        .respond_with(async |call| handle(&state, call, query.as_deref(), body).await)
        .await
}

async fn handle(
    state: &IngressState,
    call: &Call,
    query: Option<&str>,
    body: Body,
) -> Result<(Accepted, Response), Rejection> {
    let (bot, crypto) = state
        .inner
        .aibots
        .get(&call.target)
        .ok_or(Rejection::UnknownBot)?;
    let q = WecomQuery::parse(query)?;
    let now = shared::now_ms();
    check_timestamp(&q.timestamp, now)?;
    let body = read_body(state, body).await?;
    let opened = open_callback(crypto, &q.msg_signature, &q.timestamp, &q.nonce, &body)?;
    let reply = |plain: &Value| {
        (
            [("content-type", "application/json")],
            reply_body(crypto, plain, &q.nonce, shared::now_ms()),
        )
            .into_response()
    };
    match opened {
        Callback::Message(m) => {
            let job = call.traced(to_job(bot, &m, now));
            let stream = stream_id(&bot.id, &m.msgid);
            let streams = Streams(state.inner.cache.as_ref());
            // The stream is the dedupe mark: a repeat of the msgid gets the same id and no job.
            let accepted = match streams.begin(&stream, now).await {
                Ok(true) => {
                    if let Err(e) = state.inner.queue.publish(&job).await {
                        let _ = streams.abandon(&stream).await;
                        return Err(e.into());
                    }
                    tracing::debug!(job = %job.id, "queued");
                    Accepted::Queued
                }
                Ok(false) => Accepted::Duplicate,
                Err(e) => {
                    tracing::error!(error = %e, "stream store unavailable");
                    return Err(Rejection::CacheDown);
                }
            };
            Ok((accepted, reply(&stream_reply(&stream, false, ""))))
        }
        Callback::Refresh { stream_id } => {
            let started = Instant::now();
            let (plain, outcome) = refresh(state, bot, &stream_id).await;
            let m = shared::metrics::get();
            m.aibot_refreshes.with_label_values(&[outcome]).inc();
            m.aibot_refresh_duration
                .with_label_values::<&str>(&[])
                .observe(started.elapsed().as_secs_f64());
            Ok((Accepted::Refreshed, reply(&plain)))
        }
        Callback::Event { kind, .. } => match (kind.as_str(), &bot.welcome_text) {
            ("enter_chat", Some(welcome)) => Ok((Accepted::Ignored, reply(&text_reply(welcome)))),
            _ => {
                tracing::info!(event = %kind, "AI bot event needs no answer");
                Ok((Accepted::Ignored, StatusCode::OK.into_response()))
            }
        },
    }
}

/// The reply to a refresh of `stream`, and its outcome label. Reads are bounded: when the
/// cache does not answer in time the stream shows what this replica showed last.
async fn refresh(state: &IngressState, bot: &WecomAibotBot, stream: &str) -> (Value, &'static str) {
    let deadline = tokio::time::Instant::now() + REFRESH_BOUND;
    let streams = Streams(state.inner.cache.as_ref());
    let slow = || {
        (
            stream_reply(stream, false, &state.inner.last_shown.recall(stream)),
            "slow",
        )
    };
    let read = tokio::time::timeout_at(deadline, streams.read(stream)).await;
    let progress = match read {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return (stream_reply(stream, true, ""), "unknown"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "stream store unavailable; answering no change");
            return slow();
        }
        Err(_) => {
            tracing::warn!("stream store slow; answering no change");
            return slow();
        }
    };
    let window_over =
        shared::now_ms() >= progress.started_ms + (bot.stream_window_secs as i64) * 1000;
    if !progress.finish && !window_over {
        state.inner.last_shown.remember(stream, &progress.text);
        return (stream_reply(stream, false, &progress.text), "progress");
    }
    // The answer is complete, or too late for the stream: exactly one way delivers it.
    let by = if progress.finish {
        Claim::Stream
    } else {
        Claim::ResponseUrl
    };
    match tokio::time::timeout_at(deadline, streams.claim(stream, by)).await {
        Ok(Ok(Claim::Stream)) if progress.finish => {
            (stream_reply(stream, true, &progress.text), "final")
        }
        Ok(Ok(_)) => (stream_reply(stream, true, FOLLOWS), "follows"),
        Ok(Err(_)) | Err(_) => slow(),
    }
}
