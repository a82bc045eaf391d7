//! `GET|POST /wecom/{bot}`: WeCom self-built app callbacks (and the dispatch of AI bot
//! callbacks, which share the route, to `wecom_aibot.rs`). `GET` is the URL check
//! (decrypt `echostr`, answer the plain text); `POST` carries an encrypted XML message.
//! The query's timestamp window and `msg_signature` are checked before anything is
//! decrypted; the message becomes a job keyed by `MsgId`.

use super::{Accepted, Call, IngressState, Rejection, enqueue, read_body};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use shared::config::{BotSettings, WecomBot};
use shared::platform::wecom::callback::{check_timestamp, to_job};
use shared::platform::wecom::crypto::WecomCrypto;
use shared::platform::wecom::open_callback;
use std::collections::HashMap;

/// The WeCom app bots, by id, each with its AES key decoded once, at start-up.
pub(crate) struct Bots(HashMap<String, (WecomBot, WecomCrypto)>);

impl Bots {
    pub(crate) fn new(bots: &[BotSettings]) -> Self {
        Self(
            bots.iter()
                .filter_map(|b| match b {
                    BotSettings::Wecom(w) => {
                        let crypto = WecomCrypto::new(
                            w.token.expose(),
                            w.encoding_aes_key.expose(),
                            &w.corp_id,
                        )
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

    fn get(&self, id: &str) -> Result<&(WecomBot, WecomCrypto), Rejection> {
        self.0.get(id).ok_or(Rejection::UnknownBot)
    }

    fn crypto(&self, id: &str) -> Option<&WecomCrypto> {
        self.0.get(id).map(|(_, c)| c)
    }
}

/// The query parameters WeCom signs. Percent-decoded by hand: `echostr` is base64 and a
/// form decoder would turn its `+` into a space and break the signature.
pub(crate) struct WecomQuery {
    pub(crate) msg_signature: String,
    pub(crate) timestamp: String,
    pub(crate) nonce: String,
    echostr: Option<String>,
}

impl WecomQuery {
    pub(crate) fn parse(raw: Option<&str>) -> Result<Self, Rejection> {
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

pub(crate) async fn verify_url(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let call = Call::new("wecom_verify", bot_id);
    let _span = call.span().entered();
    let result = (|| {
        // App bots and AI bots verify their URL alike; only the receive id differs.
        let crypto = state
            .inner
            .wecom
            .crypto(&call.target)
            .or_else(|| state.inner.aibots.get(&call.target).map(|(_, c)| c))
            .ok_or(Rejection::UnknownBot)?;
        let q = WecomQuery::parse(query.as_deref())?;
        // The same window as a message: a captured verification is not good for ever.
        check_timestamp(&q.timestamp, shared::now_ms())?;
        let echostr = q.echostr.ok_or(Rejection::MissingParam("echostr"))?;
        Ok(crypto.verify_url(&q.msg_signature, &q.timestamp, &q.nonce, &echostr)?)
    })();
    match result {
        Ok(plain) => {
            call.record(&Ok(Accepted::Ignored));
            tracing::info!("WeCom callback URL verified");
            plain.into_response()
        }
        Err(r) => call.finish(Err(r)),
    }
}

pub(crate) async fn callback(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    // The bot's platform says which format the route speaks.
    if state.inner.aibots.get(&bot_id).is_some() {
        return super::wecom_aibot::callback(state, bot_id, query, body).await;
    }
    Call::new("wecom_callback", bot_id)
        .respond(async |call| handle(&state, call, query.as_deref(), body).await)
        .await
}

async fn handle(
    state: &IngressState,
    call: &Call,
    query: Option<&str>,
    body: Body,
) -> Result<Accepted, Rejection> {
    let (bot, crypto) = state.inner.wecom.get(&call.target)?;
    let q = WecomQuery::parse(query)?;
    let now = shared::now_ms();
    check_timestamp(&q.timestamp, now)?;
    let body = read_body(state, body).await?;
    let message = open_callback(crypto, &q.msg_signature, &q.timestamp, &q.nonce, &body)?;
    match to_job(bot, &message, now) {
        Some(job) => enqueue(state, &call.traced(job)).await,
        None => Ok(Accepted::Ignored),
    }
}
