//! `POST /notify/{channel}`: ops and business systems push a message (plain, markdown or
//! an Alertmanager webhook) into a group robot. The caller authenticates with the
//! channel's bearer token (compared in constant time); the message is queued on the
//! notification lane and answered `202 {"id": …}` at once. An `Idempotency-Key` header
//! makes retries of one request deliver once.

use super::{Accepted, IngressState, Rejection, enqueue_once, read_body, record, refusal};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::notify::request;
use std::time::Instant;
use subtle::ConstantTimeEq;

const ROUTE: &str = "notify";

pub(crate) async fn notify(
    State(state): State<IngressState>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle(&state, &channel_id, &headers, body).await;
    let (accepted, id) = match result {
        Ok((a, id)) => (Ok(a), Some(id)),
        Err(r) => (Err(r), None),
    };
    record(ROUTE, &channel_id, started, &accepted);
    match (accepted, id) {
        (Ok(a), Some(id)) => {
            let body = serde_json::json!({"id": id, "duplicate": a == Accepted::Duplicate});
            (StatusCode::ACCEPTED, axum::Json(body)).into_response()
        }
        (Err(r), _) => refusal(&r),
        (Ok(_), None) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn handle(
    state: &IngressState,
    channel_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Accepted, String), Rejection> {
    let inner = &state.inner;
    let (Some(channel), Some(queue)) = (inner.channels.get(channel_id), &inner.notify_queue) else {
        return Err(Rejection::UnknownBot);
    };
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !bool::from(
        presented
            .as_bytes()
            .ct_eq(channel.token.expose().as_bytes()),
    ) {
        return Err(Rejection::Unauthorized);
    }
    let body = read_body(body, inner.body_limit).await?;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic()));
    let id = request::job_id(channel_id, key);
    let job = request::to_job(
        channel,
        &body,
        inner.alert_template.as_deref(),
        id.clone(),
        shared::now_ms(),
    )?;
    let accepted = enqueue_once(state, queue.as_ref(), &job).await?;
    Ok((accepted, id))
}
