//! `POST /notify/{channel}`: ops and business systems push a message (plain, markdown or
//! an Alertmanager webhook) into a group robot. The caller authenticates with the
//! channel's bearer token (compared in constant time); the message is queued on the
//! notification lane and answered `202 {"id": …}` at once. An `Idempotency-Key` header
//! (1–128 visible ASCII characters, once; else 400) makes retries of one request deliver once.

use super::{Accepted, Call, IngressState, Rejection, enqueue_once, read_body};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::notify::request;
use subtle::ConstantTimeEq;
use tracing::Instrument;

const ROUTE: &str = "notify";

pub(crate) async fn notify(
    State(state): State<IngressState>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call = Call::new(ROUTE, channel_id);
    async {
        let result = handle(&state, &call, &headers, body).await;
        let (accepted, id) = match result {
            Ok((a, id)) => (Ok(a), Some(id)),
            Err(r) => (Err(r), None),
        };
        call.record(&accepted);
        match (accepted, id) {
            (Ok(a), Some(id)) => {
                let body = serde_json::json!({"id": id, "duplicate": a == Accepted::Duplicate});
                (StatusCode::ACCEPTED, axum::Json(body)).into_response()
            }
            (Err(r), _) => r.into_response(),
            (Ok(_), None) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
    .instrument(call.span())
    .await
}

async fn handle(
    state: &IngressState,
    call: &Call,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Accepted, String), Rejection> {
    let inner = &state.inner;
    let channel_id = call.target.as_str();
    let (Some(channel), Some(queue)) = (inner.channels.get(channel_id), &inner.notify_queue) else {
        return Err(Rejection::UnknownBot);
    };
    let mut auth = headers.get_all("authorization").iter();
    let presented = match (auth.next(), auth.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
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
    let body = read_body(state, body).await?;
    // A key that is present but unusable is refused, not ignored: ignoring it would send
    // the caller's retries as duplicates.
    let key = match headers
        .get_all("idempotency-key")
        .iter()
        .collect::<Vec<_>>()[..]
    {
        [] => None,
        [value] => Some(
            value
                .to_str()
                .ok()
                .filter(|k| {
                    !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or(Rejection::BadIdempotencyKey)?,
        ),
        _ => return Err(Rejection::BadIdempotencyKey),
    };
    let id = request::job_id(channel_id, key);
    let job = call.traced(request::to_job(
        channel,
        &body,
        inner.alert_template.as_deref(),
        id.clone(),
        shared::now_ms(),
    )?);
    let accepted = enqueue_once(state, queue.as_ref(), &job).await?;
    Ok((accepted, id))
}
