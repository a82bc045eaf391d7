//! Parsing a verified DingTalk robot callback into a [`Job`]. Tolerant where DingTalk is
//! inconsistent (`createAt` as number or string, the @mention's leading space, unknown
//! fields, non-text payloads under `content`), strict where a wrong guess would misroute an
//! answer (message id, conversation id and type must be present).

use crate::job::Platform;
use crate::job::{Content, DingTalkTarget, JOB_VERSION, Job, ReplyTarget, Sender};
use serde::Deserialize;

/// Why a callback body is not a usable message.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// Not JSON, or a field has the wrong type.
    #[error("malformed callback JSON: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A field we cannot answer without is absent or empty.
    #[error("callback lacks {0}")]
    Missing(&'static str),
    /// The callback names another robot than the bot it was delivered to.
    #[error("callback is for another robot")]
    WrongRobot,
}

/// Refuses a callback whose `robotCode` is not `robot_code`, the bot's: a callback signed
/// for one app (the signature covers only the timestamp) must not speak for another.
pub fn check_robot(job: &Job, robot_code: &str) -> Result<(), CallbackError> {
    let ReplyTarget::DingTalk(target) = &job.reply else {
        return Err(CallbackError::Missing("robotCode"));
    };
    match target.robot_code.as_deref() {
        None => Err(CallbackError::Missing("robotCode")),
        Some(code) if code == robot_code => Ok(()),
        Some(_) => Err(CallbackError::WrongRobot),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    #[serde(default)]
    msgtype: String,
    #[serde(default)]
    msg_id: String,
    #[serde(default)]
    conversation_type: String,
    #[serde(default)]
    conversation_id: String,
    #[serde(default)]
    sender_id: String,
    #[serde(default)]
    sender_staff_id: Option<String>,
    #[serde(default)]
    sender_nick: Option<String>,
    #[serde(default)]
    robot_code: Option<String>,
    #[serde(default)]
    session_webhook: Option<String>,
    #[serde(default)]
    session_webhook_expired_time: Option<serde_json::Value>,
    #[serde(default)]
    text: Option<TextBody>,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TextBody {
    #[serde(default)]
    content: String,
}

/// Parses a callback for bot `bot_id`, accepted at `now_ms`.
pub fn parse(bot_id: &str, body: &[u8], now_ms: i64) -> Result<Job, CallbackError> {
    let b: Body = serde_json::from_slice(body)?;
    if b.msg_id.is_empty() {
        return Err(CallbackError::Missing("msgId"));
    }
    if b.conversation_id.is_empty() {
        return Err(CallbackError::Missing("conversationId"));
    }
    let group = match b.conversation_type.as_str() {
        "1" => false,
        "2" => true,
        _ => return Err(CallbackError::Missing("conversationType")),
    };
    let content = match b.msgtype.as_str() {
        "text" => Content::text(
            b.text
                .map(|t| t.content.trim().to_string())
                .unwrap_or_default(),
        ),
        "audio" => match b
            .content
            .as_ref()
            .and_then(|c| c["recognition"].as_str())
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            Some(t) => Content::text(t.to_string()),
            None => Content::Unsupported {
                kind: "audio".into(),
            },
        },
        "" => return Err(CallbackError::Missing("msgtype")),
        other => Content::Unsupported {
            kind: other.chars().take(32).collect(),
        },
    };
    let staff = b.sender_staff_id.filter(|s| !s.is_empty());
    let sender_id = staff.clone().unwrap_or(b.sender_id);
    Ok(Job {
        v: JOB_VERSION,
        id: format!("dingtalk:{bot_id}:{}", b.msg_id),
        bot_id: bot_id.to_string(),
        platform: Platform::DingTalk,
        received_at_ms: now_ms,
        conversation_key: format!("dingtalk:{bot_id}:{}", b.conversation_id),
        sender: Sender {
            id: sender_id,
            nick: b.sender_nick,
        },
        content,
        reply: ReplyTarget::DingTalk(DingTalkTarget {
            group,
            conversation_id: b.conversation_id,
            session_webhook: b.session_webhook.filter(|s| !s.is_empty()),
            session_webhook_expires_ms: b.session_webhook_expired_time.as_ref().and_then(ms_value),
            sender_staff_id: staff,
            robot_code: b.robot_code.filter(|s| !s.is_empty()),
        }),
        trace_id: None,
    })
}

/// DingTalk sends times as numbers in samples and strings in its docs: accept both.
fn ms_value(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = r#"{
        "conversationId": "cidXYZ==", "atUsers": [{"dingtalkId": "$:LWCP_v1:$bot"}],
        "chatbotCorpId": "ding1", "chatbotUserId": "$:LWCP_v1:$bot", "msgId": "msgA",
        "senderNick": "张三", "isAdmin": true, "senderStaffId": "manager123",
        "sessionWebhookExpiredTime": 1700005400000, "createAt": "1700000000000",
        "senderCorpId": "ding1", "conversationType": "2", "senderId": "$:LWCP_v1:$abc",
        "conversationTitle": "研发群", "isInAtList": true,
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=s1",
        "text": {"content": " 你好"}, "robotCode": "dingbot", "msgtype": "text",
        "senderPlatform": "Win"
    }"#;

    #[test]
    fn group_text_callback_becomes_a_job() {
        let job = parse("main", GROUP.as_bytes(), 5).unwrap();
        assert_eq!(job.id, "dingtalk:main:msgA");
        assert_eq!(job.text(), Some("你好"));
        assert_eq!(job.sender.id, "manager123");
        let ReplyTarget::DingTalk(t) = &job.reply else {
            panic!("a DingTalk target")
        };
        assert!(t.group);
        assert_eq!(t.session_webhook_expires_ms, Some(1_700_005_400_000));
        assert_eq!(t.robot_code.as_deref(), Some("dingbot"));
    }

    #[test]
    fn audio_with_recognition_is_text_and_pictures_are_unsupported() {
        let audio = GROUP
            .replace(r#""msgtype": "text""#, r#""msgtype": "audio""#)
            .replace(
                r#""text": {"content": " 你好"},"#,
                r#""content": {"recognition": "天气如何", "downloadCode": "x"},"#,
            );
        assert_eq!(
            parse("main", audio.as_bytes(), 0).unwrap().text(),
            Some("天气如何")
        );
        let pic = GROUP.replace(r#""msgtype": "text""#, r#""msgtype": "picture""#);
        assert_eq!(
            parse("main", pic.as_bytes(), 0).unwrap().content,
            Content::Unsupported {
                kind: "picture".into()
            }
        );
    }

    #[test]
    fn the_robot_code_must_be_the_bots() {
        let job = parse("main", GROUP.as_bytes(), 5).unwrap();
        assert!(check_robot(&job, "dingbot").is_ok());
        assert!(matches!(
            check_robot(&job, "other"),
            Err(CallbackError::WrongRobot)
        ));
        let none = GROUP.replace(r#""robotCode": "dingbot","#, "");
        let job = parse("main", none.as_bytes(), 5).unwrap();
        assert!(matches!(
            check_robot(&job, "dingbot"),
            Err(CallbackError::Missing("robotCode"))
        ));
    }

    #[test]
    fn malformed_or_incomplete_callbacks_are_refused() {
        assert!(matches!(
            parse("m", b"{not json", 0),
            Err(CallbackError::Malformed(_))
        ));
        assert!(parse("m", b"[]", 0).is_err());
        assert!(parse("m", b"", 0).is_err());
        let no_id = GROUP.replace(r#""msgId": "msgA","#, "");
        assert!(matches!(
            parse("m", no_id.as_bytes(), 0),
            Err(CallbackError::Missing("msgId"))
        ));
        let bad_type = GROUP.replace(r#""conversationType": "2""#, r#""conversationType": 2"#);
        assert!(parse("m", bad_type.as_bytes(), 0).is_err());
    }
}
