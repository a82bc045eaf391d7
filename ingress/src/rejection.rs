//! Why a request on a public route was refused, and the one mapping from a refusal to its
//! HTTP status and its `parley_http_requests_total{outcome}` label.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::notify::request::RequestError;
use shared::platform::dingtalk::callback::CallbackError;
use shared::platform::dingtalk::sign::SignError;
use shared::platform::wecom::OpenError;
use shared::platform::wecom::callback::TimestampError;
use shared::platform::wecom::crypto::CryptoError;
use shared::platform::wecom::xml::XmlError;
use shared::queue::QueueError;

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
    /// The body is declared as something other than what the platform sends.
    #[error("wrong content type")]
    WrongContentType,
    /// The body did not arrive within `[server] body_timeout_secs`.
    #[error("body too slow")]
    SlowBody,
    /// DingTalk signature or timestamp refused.
    #[error("{0}")]
    Signature(#[from] SignError),
    /// Signed, but not a DingTalk message we can parse.
    #[error("{0}")]
    Malformed(#[from] CallbackError),
    /// A required query parameter is absent.
    #[error("missing query parameter {0}")]
    MissingParam(&'static str),
    /// The WeCom timestamp is not a number or more than an hour away.
    #[error("{0}")]
    Timestamp(#[from] TimestampError),
    /// WeCom signature or decryption refused.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// WeCom XML refused.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// WeCom AI bot JSON refused (the detail names the place, not the content).
    #[error("{0}")]
    Json(String),
    /// The queue cannot take the job now; the platform should retry.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// The dedupe store cannot be reached; accepting would risk double answers or loss.
    #[error("dedupe store unavailable")]
    CacheDown,
    /// No or wrong bearer token.
    #[error("bad bearer token")]
    Unauthorized,
    /// An `Idempotency-Key` that is empty, too long, not visible ASCII, or repeated.
    #[error("malformed Idempotency-Key")]
    BadIdempotencyKey,
    /// A notification body that is not one of the accepted shapes.
    #[error("{0}")]
    Notice(#[from] RequestError),
}

impl From<OpenError> for Rejection {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Xml(e) => Rejection::Xml(e),
            OpenError::Crypto(e) => Rejection::Crypto(e),
        }
    }
}

impl Rejection {
    /// The one mapping from a rejection to its HTTP status and its
    /// `parley_http_requests_total{outcome}` label, so the two never drift apart.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            Rejection::UnknownBot => (StatusCode::NOT_FOUND, "unknown_bot"),
            Rejection::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Rejection::Unreadable => (StatusCode::BAD_REQUEST, "unreadable"),
            Rejection::SlowBody => (StatusCode::REQUEST_TIMEOUT, "slow_body"),
            Rejection::WrongContentType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "malformed"),
            Rejection::Signature(SignError::MissingHeader | SignError::SignatureMismatch) => {
                (StatusCode::UNAUTHORIZED, "bad_signature")
            }
            Rejection::Signature(SignError::StaleTimestamp)
            | Rejection::Timestamp(TimestampError::Stale) => {
                (StatusCode::FORBIDDEN, "stale_timestamp")
            }
            Rejection::Signature(SignError::MalformedTimestamp)
            | Rejection::Timestamp(TimestampError::Malformed) => {
                (StatusCode::BAD_REQUEST, "bad_timestamp")
            }
            Rejection::Malformed(CallbackError::WrongRobot) => {
                (StatusCode::FORBIDDEN, "wrong_receiver")
            }
            Rejection::Malformed(_) | Rejection::MissingParam(_) | Rejection::BadIdempotencyKey => {
                (StatusCode::BAD_REQUEST, "malformed")
            }
            Rejection::Crypto(CryptoError::SignatureMismatch) => {
                (StatusCode::UNAUTHORIZED, "bad_signature")
            }
            Rejection::Crypto(CryptoError::ReceiveIdMismatch) => {
                (StatusCode::FORBIDDEN, "wrong_receiver")
            }
            Rejection::Crypto(CryptoError::NotAnEchostr) => (StatusCode::BAD_REQUEST, "malformed"),
            Rejection::Crypto(_) => (StatusCode::BAD_REQUEST, "bad_ciphertext"),
            Rejection::Xml(XmlError::TooLarge) => (StatusCode::PAYLOAD_TOO_LARGE, "malformed"),
            Rejection::Xml(_) | Rejection::Json(_) => (StatusCode::BAD_REQUEST, "malformed"),
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

impl IntoResponse for Rejection {
    /// The status and a short machine-readable reason; never the details, which may quote
    /// what the caller sent.
    fn into_response(self) -> Response {
        let (status, outcome) = self.classify();
        let body = serde_json::json!({"error": outcome}).to_string();
        (status, [("content-type", "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_platforms_map_a_stale_timestamp_alike() {
        assert_eq!(
            Rejection::Signature(SignError::StaleTimestamp).classify(),
            Rejection::Timestamp(TimestampError::Stale).classify()
        );
        assert_eq!(
            Rejection::Signature(SignError::MalformedTimestamp).classify(),
            Rejection::Timestamp(TimestampError::Malformed).classify()
        );
        assert_eq!(
            Rejection::Timestamp(TimestampError::Stale).classify(),
            (StatusCode::FORBIDDEN, "stale_timestamp")
        );
    }

    #[test]
    fn server_side_failures_are_5xx_and_caller_faults_4xx() {
        assert!(Rejection::CacheDown.classify().0.is_server_error());
        assert!(Rejection::UnknownBot.classify().0.is_client_error());
        assert_eq!(Rejection::TooLarge.outcome(), "too_large");
    }
}
