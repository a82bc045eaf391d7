//! `POST /dingtalk/{bot}`: DingTalk robot callbacks. The `timestamp`/`sign` headers are
//! checked (window, then HMAC in constant time) before the body is read; the body becomes
//! a job keyed by DingTalk's `msgId`.

use super::{Accepted, Call, IngressState, Rejection, enqueue, read_body};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use shared::config::{BotSettings, DingTalkBot, DingTalkIngress};
use shared::platform::dingtalk::{callback, sign};
use std::collections::HashMap;

const ROUTE: &str = "dingtalk_callback";

/// The DingTalk bots taking HTTP callbacks, by id (a Stream bot's route is off).
pub(crate) struct Bots(HashMap<String, DingTalkBot>);

impl Bots {
    pub(crate) fn new(bots: &[BotSettings]) -> Self {
        Self(
            bots.iter()
                .filter_map(|b| match b {
                    BotSettings::DingTalk(d) if d.ingress == DingTalkIngress::Http => {
                        Some((d.id.clone(), d.clone()))
                    }
                    _ => None,
                })
                .collect(),
        )
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

pub(crate) async fn callback(
    State(state): State<IngressState>,
    Path(bot_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Call::new(ROUTE, bot_id)
        .respond(async |call| handle(&state, call, &headers, body).await)
        .await
}

async fn handle(
    state: &IngressState,
    call: &Call,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Rejection> {
    let bot = state
        .inner
        .dingtalk
        .0
        .get(&call.target)
        .ok_or(Rejection::UnknownBot)?;
    // A repeated header is not guessed at: only a single value counts.
    let header = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    };
    // DingTalk posts JSON; a body declared as anything else is not a callback.
    if let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) {
        let json = ct.to_str().is_ok_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Err(Rejection::WrongContentType);
        }
    }
    let now = shared::now_ms();
    sign::verify_callback(
        bot.app_secret.expose(),
        header("timestamp"),
        header("sign"),
        now,
    )?;
    let body = read_body(state, body).await?;
    let job = call.traced(callback::parse(&bot.id, &body, now)?);
    callback::check_robot(&job, bot.robot_code())?;
    enqueue(state, &job).await
}
