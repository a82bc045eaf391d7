//! A decrypted AI bot callback, parsed strictly: a message (text, voice with WeCom's
//! transcript, `mixed` with text parts; images and files are read as unsupported), a
//! stream refresh, or an event. A message becomes a [`Job`] keyed by `msgid` whose
//! conversation is the group (`chatid`) or, in a single chat, the member; the `@Bot`
//! prefix WeCom puts in front of a group message is removed, and a quoted message's text
//! travels with the question as context.

use super::AibotError;
use super::stream::stream_id;
use crate::config::WecomAibotBot;
use crate::job::{AibotTarget, Content, JOB_VERSION, Job, Platform, ReplyTarget, Sender};
use serde::Deserialize;

/// Longest id (`msgid`, `chatid`, `userid`, stream id) accepted; WeCom's are far shorter,
/// and ids end up in cache keys and log lines.
const MAX_ID_BYTES: usize = 256;

/// What a callback asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Callback {
    /// A member wrote to the bot.
    Message(AibotMessage),
    /// WeCom asks for the text of stream `stream_id` so far.
    Refresh {
        /// The id the bot answered the message with.
        stream_id: String,
    },
    /// An event (`enter_chat`, `template_card_event`, `feedback_event`, …).
    Event {
        /// `event.eventtype`.
        kind: String,
        /// The callback's `msgid`.
        msgid: String,
    },
}

/// A member's message, reduced to what the worker acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct AibotMessage {
    /// WeCom's id of the message: the dedupe key.
    pub msgid: String,
    /// The group, or None in a single chat.
    pub chat_id: Option<String>,
    /// The sender's userid.
    pub user_id: String,
    /// The one-shot reply URL, if WeCom gave one.
    pub response_url: Option<String>,
    /// What was written.
    pub content: Content,
}

#[derive(Deserialize)]
struct Raw {
    msgid: String,
    #[serde(default)]
    chatid: Option<String>,
    #[serde(default)]
    chattype: Option<String>,
    #[serde(default)]
    from: Option<From>,
    #[serde(default)]
    response_url: Option<String>,
    msgtype: String,
    #[serde(default)]
    text: Option<Text>,
    #[serde(default)]
    voice: Option<Text>,
    #[serde(default)]
    mixed: Option<Mixed>,
    #[serde(default)]
    stream: Option<StreamRef>,
    #[serde(default)]
    event: Option<Event>,
    #[serde(default)]
    quote: Option<Quote>,
}

#[derive(Deserialize)]
struct From {
    userid: String,
}

#[derive(Deserialize)]
struct Text {
    content: String,
}

#[derive(Deserialize)]
struct Mixed {
    msg_item: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    msgtype: String,
    #[serde(default)]
    text: Option<Text>,
}

#[derive(Deserialize)]
struct StreamRef {
    id: String,
}

#[derive(Deserialize)]
struct Event {
    eventtype: String,
}

#[derive(Deserialize)]
struct Quote {
    msgtype: String,
    #[serde(default)]
    text: Option<Text>,
    #[serde(default)]
    voice: Option<Text>,
    #[serde(default)]
    mixed: Option<Mixed>,
}

fn malformed(what: &str) -> AibotError {
    AibotError::Malformed(what.to_string())
}

fn id(value: String, what: &str) -> Result<String, AibotError> {
    if value.is_empty() || value.len() > MAX_ID_BYTES || value.chars().any(char::is_control) {
        return Err(malformed(what));
    }
    Ok(value)
}

/// The text parts of a `mixed` message, one per line.
fn mixed_text(m: &Mixed) -> String {
    m.msg_item
        .iter()
        .filter(|i| i.msgtype == "text")
        .filter_map(|i| i.text.as_ref().map(|t| t.content.trim()))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Drops the `@Bot ` WeCom puts in front of a group message.
fn strip_mention(text: &str) -> &str {
    let t = text.trim_start();
    match t.strip_prefix('@') {
        Some(rest) => match rest.find(char::is_whitespace) {
            Some(i) => rest[i..].trim_start(),
            None => "",
        },
        None => t,
    }
}

/// Parses a decrypted callback.
pub fn parse(plain: &str) -> Result<Callback, AibotError> {
    let raw: Raw = serde_json::from_str(plain).map_err(|e| AibotError::json(&e))?;
    let msgid = id(raw.msgid, "msgid")?;
    match raw.msgtype.as_str() {
        "stream" => {
            let s = raw
                .stream
                .ok_or_else(|| malformed("stream without stream.id"))?;
            return Ok(Callback::Refresh {
                stream_id: id(s.id, "stream.id")?,
            });
        }
        "event" => {
            let e = raw
                .event
                .ok_or_else(|| malformed("event without event.eventtype"))?;
            return Ok(Callback::Event {
                kind: id(e.eventtype, "event.eventtype")?,
                msgid,
            });
        }
        "" => return Err(malformed("empty msgtype")),
        _ => {}
    }
    let user_id = id(
        raw.from
            .ok_or_else(|| malformed("message without from.userid"))?
            .userid,
        "from.userid",
    )?;
    let chat_id = match raw.chattype.as_deref() {
        Some("single") => None,
        Some("group") => Some(id(
            raw.chatid
                .ok_or_else(|| malformed("group message without chatid"))?,
            "chatid",
        )?),
        _ => return Err(malformed("chattype is neither single nor group")),
    };
    let text = match raw.msgtype.as_str() {
        "text" => Some(
            raw.text
                .ok_or_else(|| malformed("text without text.content"))?
                .content,
        ),
        "voice" => Some(
            raw.voice
                .ok_or_else(|| malformed("voice without voice.content"))?
                .content,
        ),
        "mixed" => Some(mixed_text(
            &raw.mixed
                .ok_or_else(|| malformed("mixed without mixed.msg_item"))?,
        )),
        _ => None,
    };
    let text = text.map(|t| match chat_id {
        Some(_) => strip_mention(&t).trim().to_string(),
        None => t.trim().to_string(),
    });
    let content = match text {
        // A mixed message of pictures only, or silence WeCom could not transcribe.
        Some(t) if t.is_empty() && raw.msgtype != "text" => Content::Unsupported {
            kind: raw.msgtype.clone(),
        },
        Some(text) => Content::Text {
            text,
            quote: raw.quote.as_ref().and_then(quote_text),
        },
        None => Content::Unsupported {
            kind: raw.msgtype.chars().take(32).collect(),
        },
    };
    Ok(Callback::Message(AibotMessage {
        msgid,
        chat_id,
        user_id,
        response_url: raw.response_url.filter(|u| !u.is_empty()),
        content,
    }))
}

fn quote_text(q: &Quote) -> Option<String> {
    let t = match q.msgtype.as_str() {
        "text" => q.text.as_ref()?.content.trim().to_string(),
        "voice" => q.voice.as_ref()?.content.trim().to_string(),
        "mixed" => mixed_text(q.mixed.as_ref()?),
        _ => return None,
    };
    (!t.is_empty()).then_some(t)
}

/// The job for `msg` to `bot`, accepted at `now_ms`.
pub fn to_job(bot: &WecomAibotBot, msg: &AibotMessage, now_ms: i64) -> Job {
    let conversation = match &msg.chat_id {
        Some(chat) => format!("g:{chat}"),
        None => format!("u:{}", msg.user_id),
    };
    Job {
        v: JOB_VERSION,
        id: format!("wecom_aibot:{}:{}", bot.id, msg.msgid),
        bot_id: bot.id.clone(),
        platform: Platform::WecomAibot,
        received_at_ms: now_ms,
        conversation_key: format!("wecom_aibot:{}:{conversation}", bot.id),
        sender: Sender {
            id: msg.user_id.clone(),
            nick: None,
        },
        content: msg.content.clone(),
        reply: ReplyTarget::WecomAibot(AibotTarget {
            stream_id: stream_id(&bot.id, &msg.msgid),
            response_url: msg.response_url.clone(),
            chat_id: msg.chat_id.clone(),
            user_id: msg.user_id.clone(),
        }),
        trace_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(extra: serde_json::Value) -> Result<Callback, AibotError> {
        let mut v = json!({"msgid": "m1", "aibotid": "B", "chattype": "group", "chatid": "C1",
                           "from": {"userid": "zhang"}, "response_url": "https://x/r"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        parse(&v.to_string())
    }

    fn content(c: Result<Callback, AibotError>) -> Content {
        match c.unwrap() {
            Callback::Message(m) => m.content,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn group_text_loses_the_mention_and_keeps_its_quote() {
        let c = message(
            json!({"msgtype": "text", "text": {"content": "@RobotA  你好 🤖 "},
                               "quote": {"msgtype": "text", "text": {"content": "上一条"}}}),
        );
        assert_eq!(
            content(c),
            Content::Text {
                text: "你好 🤖".into(),
                quote: Some("上一条".into())
            }
        );
    }

    #[test]
    fn voice_and_mixed_are_text_and_pictures_are_not() {
        let voice = message(json!({"msgtype": "voice", "voice": {"content": "开会"}}));
        assert_eq!(content(voice), Content::text("开会"));
        let mixed = message(json!({"msgtype": "mixed", "mixed": {"msg_item": [
            {"msgtype": "text", "text": {"content": "@RobotA 看图"}},
            {"msgtype": "image", "image": {"url": "https://p"}},
            {"msgtype": "text", "text": {"content": "说明"}}]}}));
        assert_eq!(content(mixed), Content::text("看图\n说明"));
        let pictures = message(json!({"msgtype": "mixed", "mixed": {"msg_item": [
            {"msgtype": "image", "image": {"url": "https://p"}}]}}));
        assert_eq!(
            content(pictures),
            Content::Unsupported {
                kind: "mixed".into()
            }
        );
        let image = message(json!({"msgtype": "image", "image": {"url": "https://p"}}));
        assert_eq!(
            content(image),
            Content::Unsupported {
                kind: "image".into()
            }
        );
    }

    #[test]
    fn refreshes_and_events_are_recognised() {
        let r = parse(
            r#"{"msgid":"m2","msgtype":"stream","stream":{"id":"S"},"chattype":"single","from":{"userid":"u"}}"#,
        );
        assert_eq!(
            r.unwrap(),
            Callback::Refresh {
                stream_id: "S".into()
            }
        );
        let e = parse(
            r#"{"msgid":"m3","msgtype":"event","event":{"eventtype":"enter_chat"},"from":{"userid":"u"}}"#,
        );
        assert_eq!(
            e.unwrap(),
            Callback::Event {
                kind: "enter_chat".into(),
                msgid: "m3".into()
            }
        );
    }

    #[test]
    fn malformed_callbacks_are_refused() {
        for bad in [
            json!({"msgtype": "text"}),
            json!({"msgtype": "text", "text": {"content": 5}}),
            json!({"msgtype": "text", "text": {"content": "x"}, "chattype": "room"}),
            json!({"msgtype": "text", "text": {"content": "x"}, "chatid": null}),
            json!({"msgtype": "stream"}),
            json!({"msgtype": "event"}),
            json!({"msgtype": "text", "text": {"content": "x"}, "msgid": "x".repeat(300)}),
            json!({"msgtype": "text", "text": {"content": "x"}, "msgid": ""}),
        ] {
            assert!(
                matches!(message(bad.clone()), Err(AibotError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(parse("{}"), Err(AibotError::Malformed(_))));
    }

    #[test]
    fn jobs_are_keyed_by_msgid_and_talk_per_group_or_member() {
        let bot: WecomAibotBot = toml::from_str(
            "id = \"ai\"\ntoken = \"t\"\nencoding_aes_key = \"N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA\"",
        )
        .unwrap();
        let Callback::Message(m) =
            message(json!({"msgtype": "text", "text": {"content": "@A hi"}})).unwrap()
        else {
            unreachable!()
        };
        let job = to_job(&bot, &m, 7);
        assert_eq!(job.id, "wecom_aibot:ai:m1");
        assert_eq!(job.conversation_key, "wecom_aibot:ai:g:C1");
        let ReplyTarget::WecomAibot(t) = &job.reply else {
            unreachable!()
        };
        assert_eq!(t.stream_id, stream_id("ai", "m1"));
        let single = AibotMessage { chat_id: None, ..m };
        assert_eq!(
            to_job(&bot, &single, 7).conversation_key,
            "wecom_aibot:ai:u:zhang"
        );
        assert_eq!(bot.stream_window_secs, 330);
    }
}
