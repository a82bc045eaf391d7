//! The body of `POST /notify/{channel}` turned into a Job: `{"text": …}`,
//! `{"markdown": {"title": …, "text": …}}` (either with an optional `at`), or a Prometheus
//! Alertmanager webhook payload (version 4), rendered to one markdown message.

use super::alertmanager;
use crate::config::ChannelSettings;
use crate::job::{Content, JOB_VERSION, Job, ReplyTarget, RobotTarget, Sender};
use serde::Deserialize;

/// Why a notification request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or none of the accepted shapes.
    #[error("malformed notification: {0}")]
    Malformed(String),
    /// The Alertmanager template failed on this payload.
    #[error("{0}")]
    Render(#[from] alertmanager::RenderError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    markdown: Option<Markdown>,
    #[serde(default)]
    at: Option<At>,
}

#[derive(Deserialize)]
struct Markdown {
    #[serde(default)]
    title: Option<String>,
    text: String,
}

#[derive(Deserialize, Default)]
struct At {
    #[serde(default, alias = "atMobiles")]
    at_mobiles: Vec<String>,
    #[serde(default, alias = "atUserIds")]
    at_user_ids: Vec<String>,
    #[serde(default, alias = "isAtAll")]
    at_all: bool,
}

/// Builds the job `id` for `channel` from a request body; `template` overrides the
/// built-in Alertmanager template.
pub fn to_job(
    channel: &ChannelSettings,
    body: &[u8],
    template: Option<&str>,
    id: String,
    now_ms: i64,
) -> Result<Job, RequestError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RequestError::Malformed(e.to_string()))?;
    let (content, at) = if alertmanager::is_alertmanager(&value) {
        let payload: alertmanager::Payload =
            serde_json::from_value(value).map_err(|e| RequestError::Malformed(e.to_string()))?;
        let r = alertmanager::render(&payload, template)?;
        let content = Content::Notice {
            text: r.markdown,
            markdown: true,
            title: Some(r.title),
        };
        (content, At::default())
    } else {
        let p: Plain =
            serde_json::from_value(value).map_err(|e| RequestError::Malformed(e.to_string()))?;
        let content = match (p.text, p.markdown) {
            (Some(text), None) if !text.trim().is_empty() => Content::Notice {
                text,
                markdown: false,
                title: None,
            },
            (None, Some(m)) if !m.text.trim().is_empty() => Content::Notice {
                text: m.text,
                markdown: true,
                title: m.title.filter(|t| !t.trim().is_empty()),
            },
            _ => {
                return Err(RequestError::Malformed(
                    "give a non-empty \"text\" or \"markdown\": {\"title\", \"text\"}".into(),
                ));
            }
        };
        (content, p.at.unwrap_or_default())
    };
    Ok(Job {
        v: JOB_VERSION,
        id,
        bot_id: channel.id.clone(),
        platform: channel.kind.platform(),
        received_at_ms: now_ms,
        // One line per robot: notifications reach a group in the order they were sent.
        conversation_key: format!("robot:{}", channel.id),
        sender: Sender {
            id: "notify".into(),
            nick: None,
        },
        content,
        reply: ReplyTarget::Robot(RobotTarget {
            at_mobiles: at.at_mobiles,
            at_user_ids: at.at_user_ids,
            at_all: at.at_all,
        }),
        trace_id: None,
    })
}

/// The job id of a notification: from the caller's idempotency key when given (so its
/// retries are delivered once), else random.
pub fn job_id(channel_id: &str, idempotency_key: Option<&str>) -> String {
    match idempotency_key {
        Some(k) => format!("notify:{channel_id}:{k}"),
        None => format!("notify:{channel_id}:{:032x}", rand::random::<u128>()),
    }
}
