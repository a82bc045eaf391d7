//! Turning a decrypted WeCom app message into a [`Job`]. Text is answered; voice with
//! WeCom's recognition is text; `enter_agent`/`subscribe` get the bot's welcome text if it
//! has one; other events are acknowledged and dropped; other message types get the polite
//! "what is supported" reply. Messages dedupe on `MsgId`, events on sender + time + event.
//! The query's `timestamp` window is checked here too, before anything is decrypted.

use super::xml::WecomMessage;
use crate::config::WecomBot;
use crate::job::Platform;
use crate::job::{Content, JOB_VERSION, Job, ReplyTarget, Sender, WecomTarget};

/// How far a callback's `timestamp` (seconds) may be from our clock: one hour, as DingTalk's.
pub const MAX_SKEW_SECS: i64 = 3_600;

/// Why a WeCom callback's `timestamp` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// Not a decimal number of seconds.
    #[error("timestamp is not a number")]
    Malformed,
    /// More than an hour away from now.
    #[error("timestamp outside the one-hour window")]
    Stale,
}

/// Checks the signed query's `timestamp` (seconds) against `now_ms`. A captured callback
/// replayed later than the window is refused before its ciphertext is touched.
pub fn check_timestamp(timestamp: &str, now_ms: i64) -> Result<(), TimestampError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| TimestampError::Malformed)?;
    // abs_diff: `now - ts` overflows (and `abs` wraps) for timestamps near i64::MIN.
    if (now_ms / 1000).abs_diff(ts) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(TimestampError::Stale);
    }
    Ok(())
}

/// The job for `msg`, or None when it needs no answer.
pub fn to_job(bot: &WecomBot, msg: &WecomMessage, now_ms: i64) -> Option<Job> {
    let field = |name: &str| {
        msg.fields
            .get(name)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    };
    let content = match msg.msg_type.as_str() {
        "text" => Content::text(
            msg.content
                .as_deref()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        "voice" => match field("Recognition") {
            Some(t) => Content::text(t.to_string()),
            None => Content::Unsupported {
                kind: "voice".into(),
            },
        },
        "event" => match msg.event.as_deref() {
            Some("enter_agent" | "subscribe") => Content::Fixed {
                text: bot.welcome_text.clone()?,
            },
            _ => return None,
        },
        other => Content::Unsupported {
            kind: other.chars().take(32).collect(),
        },
    };
    let unique = match &msg.msg_id {
        Some(id) => id.clone(),
        None => format!(
            "ev:{}:{}:{}",
            msg.from_user_name,
            msg.create_time,
            msg.event.as_deref().unwrap_or_default()
        ),
    };
    Some(Job {
        v: JOB_VERSION,
        id: format!("wecom:{}:{unique}", bot.id),
        bot_id: bot.id.clone(),
        platform: Platform::Wecom,
        received_at_ms: now_ms,
        conversation_key: format!("wecom:{}:{}", bot.id, msg.from_user_name),
        sender: Sender {
            id: msg.from_user_name.clone(),
            nick: None,
        },
        content,
        reply: ReplyTarget::Wecom(WecomTarget {
            user_id: msg.from_user_name.clone(),
            agent_id: bot.agent_id,
        }),
        trace_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::wecom::xml::parse_message;
    use crate::secret::Secret;

    fn bot(welcome: Option<&str>) -> WecomBot {
        WecomBot {
            id: "wx".into(),
            policy: Default::default(),
            corp_id: "ww1".into(),
            corp_secret: Secret::new("s"),
            agent_id: 1000002,
            token: Secret::new("t"),
            encoding_aes_key: Secret::new("k"),
            api_base: "http://x".into(),
            markdown: false,
            welcome_text: welcome.map(String::from),
            working_notice_secs: 0,
            api_per_minute: 2000,
        }
    }

    fn msg(inner: &str) -> WecomMessage {
        parse_message(&format!(
            "<xml><ToUserName><![CDATA[ww1]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>\
             <CreateTime>1700000000</CreateTime><AgentID>1000002</AgentID>{inner}</xml>"
        ))
        .unwrap()
    }

    #[test]
    fn the_timestamp_window_is_one_hour_either_way() {
        let now_ms = 1_700_000_000_000;
        assert_eq!(check_timestamp("1700000000", now_ms), Ok(()));
        assert_eq!(check_timestamp(" 1700003600 ", now_ms), Ok(()));
        assert_eq!(check_timestamp("1699996400", now_ms), Ok(()));
        assert_eq!(
            check_timestamp("1700003601", now_ms),
            Err(TimestampError::Stale)
        );
        assert_eq!(
            check_timestamp("1699996399", now_ms),
            Err(TimestampError::Stale)
        );
        assert_eq!(check_timestamp("", now_ms), Err(TimestampError::Malformed));
        assert_eq!(
            check_timestamp("17e8", now_ms),
            Err(TimestampError::Malformed)
        );
        for ts in [i64::MIN, i64::MIN + now_ms / 1000, i64::MAX] {
            assert_eq!(
                check_timestamp(&ts.to_string(), now_ms),
                Err(TimestampError::Stale),
                "{ts}"
            );
        }
    }

    #[test]
    fn text_becomes_a_job_keyed_by_msg_id() {
        let m = msg(
            "<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[ 你好 ]]></Content><MsgId>123</MsgId>",
        );
        let job = to_job(&bot(None), &m, 1).unwrap();
        assert_eq!(job.id, "wecom:wx:123");
        assert_eq!(job.text(), Some("你好"));
        assert_eq!(job.conversation_key, "wecom:wx:zhangsan");
        assert_eq!(
            job.reply,
            ReplyTarget::Wecom(WecomTarget {
                user_id: "zhangsan".into(),
                agent_id: 1000002
            })
        );
    }

    #[test]
    fn events_get_the_welcome_text_or_nothing() {
        let m = msg("<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[enter_agent]]></Event>");
        assert!(to_job(&bot(None), &m, 1).is_none());
        let job = to_job(&bot(Some("欢迎")), &m, 1).unwrap();
        assert_eq!(
            job.content,
            Content::Fixed {
                text: "欢迎".into()
            }
        );
        assert_eq!(job.id, "wecom:wx:ev:zhangsan:1700000000:enter_agent");
        let click = msg("<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[click]]></Event>");
        assert!(to_job(&bot(Some("欢迎")), &click, 1).is_none());
    }

    #[test]
    fn images_are_unsupported_and_recognised_voice_is_text() {
        let img =
            msg("<MsgType><![CDATA[image]]></MsgType><PicUrl>http://p</PicUrl><MsgId>9</MsgId>");
        assert_eq!(
            to_job(&bot(None), &img, 1).unwrap().content,
            Content::Unsupported {
                kind: "image".into()
            }
        );
        let voice = msg(
            "<MsgType><![CDATA[voice]]></MsgType><Recognition><![CDATA[开会]]></Recognition><MsgId>10</MsgId>",
        );
        assert_eq!(to_job(&bot(None), &voice, 1).unwrap().text(), Some("开会"));
    }
}
