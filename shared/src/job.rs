//! The Job: what the ingress hands the worker through the queue. It is versioned JSON so
//! ingress and worker replicas of different releases can share a queue during a rollout:
//! a worker refuses (dead-letters) a version it does not know instead of guessing.

use serde::{Deserialize, Serialize};

/// The schema version this build writes and understands.
pub const JOB_VERSION: u32 = 1;

/// The chat platforms Parley speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// DingTalk (钉钉).
    DingTalk,
    /// WeCom (企业微信).
    Wecom,
    /// A WeCom AI bot (智能机器人).
    #[serde(rename = "wecom_aibot")]
    WecomAibot,
    /// A DingTalk custom group robot (notifications).
    #[serde(rename = "dingtalk_robot")]
    DingTalkRobot,
    /// A WeCom group robot (notifications).
    #[serde(rename = "wecom_robot")]
    WecomRobot,
}

impl Platform {
    /// Lower-case name, used in routes and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::DingTalk => "dingtalk",
            Platform::Wecom => "wecom",
            Platform::WecomAibot => "wecom_aibot",
            Platform::DingTalkRobot => "dingtalk_robot",
            Platform::WecomRobot => "wecom_robot",
        }
    }
}

/// One chat message to answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Schema version, [`JOB_VERSION`].
    pub v: u32,
    /// Unique id derived from the platform's message id: the dedupe and answered-marker key.
    pub id: String,
    /// The bot (config `[[bots]].id`) that received the message.
    pub bot_id: String,
    /// The platform it came from.
    pub platform: Platform,
    /// When the ingress accepted it (ms since epoch).
    pub received_at_ms: i64,
    /// Stable key of the conversation: messages with the same key are answered in order
    /// and share history.
    pub conversation_key: String,
    /// Who wrote it.
    pub sender: Sender,
    /// What was written.
    pub content: Content,
    /// Where and how the answer goes back.
    pub reply: ReplyTarget,
    /// The ingress span's id for this message, so ingress and worker log lines of one
    /// message can be joined; absent in jobs from older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The author of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    /// Platform user id (DingTalk staffId when known, else the encrypted sender id).
    pub id: String,
    /// Display name, if the platform gave one.
    pub nick: Option<String>,
}

/// The content of a message, reduced to what the worker acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// Text (or speech the platform already recognised as text).
    Text {
        /// The text, trimmed of the @mention's leading space.
        text: String,
        /// The text of the message it quotes, if any: context for the model.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quote: Option<String>,
    },
    /// A reply decided without the model (a welcome text): sent as it is.
    Fixed {
        /// The text to send.
        text: String,
    },
    /// A notification pushed into a group robot: sent as it is.
    Notice {
        /// The text (markdown source when `markdown`).
        text: String,
        /// Render as markdown.
        markdown: bool,
        /// Title shown in notifications (DingTalk markdown).
        title: Option<String>,
    },
    /// Something the assistant cannot read (picture, file, video…).
    Unsupported {
        /// The platform's message type, e.g. `picture`.
        kind: String,
    },
}

/// Platform-specific facts needed to deliver the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "platform", rename_all = "snake_case")]
pub enum ReplyTarget {
    /// A DingTalk robot conversation.
    #[serde(rename = "dingtalk")]
    DingTalk(DingTalkTarget),
    /// A WeCom app member.
    Wecom(WecomTarget),
    /// A WeCom AI bot conversation: the stream the answer is shown in.
    #[serde(rename = "wecom_aibot")]
    WecomAibot(AibotTarget),
    /// A group robot (the job's `bot_id` is the channel id).
    Robot(RobotTarget),
}

/// Who a robot notification @-mentions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RobotTarget {
    /// Mobiles to @.
    pub at_mobiles: Vec<String>,
    /// User ids to @.
    pub at_user_ids: Vec<String>,
    /// @all.
    pub at_all: bool,
}

/// Where a WeCom app answer goes: `message/send` to the member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WecomTarget {
    /// The member's UserID (`FromUserName`).
    pub user_id: String,
    /// The app's AgentId.
    pub agent_id: i64,
}

/// Where a WeCom AI bot's answer goes: into the stream WeCom refreshes, else (late, or
/// once WeCom stopped refreshing) the callback's one-shot `response_url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AibotTarget {
    /// The stream id the callback was answered with (derived from the bot and `msgid`).
    pub stream_id: String,
    /// The one-shot reply URL from the callback (valid 1 h), if any.
    pub response_url: Option<String>,
    /// The group's `chatid`; None in a single chat.
    pub chat_id: Option<String>,
    /// The sender's `from.userid`.
    pub user_id: String,
}

/// Where a DingTalk answer goes: the sessionWebhook while it is valid, else OpenAPI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DingTalkTarget {
    /// True for a group chat, false for one-to-one.
    pub group: bool,
    /// openConversationId (groups) or the 1:1 conversation id.
    pub conversation_id: String,
    /// The temporary reply URL from the callback, if any.
    pub session_webhook: Option<String>,
    /// When the session webhook expires (ms since epoch).
    pub session_webhook_expires_ms: Option<i64>,
    /// The sender's staffId (needed for @ in groups and for 1:1 OpenAPI sends).
    pub sender_staff_id: Option<String>,
    /// robotCode from the callback.
    pub robot_code: Option<String>,
}

impl Content {
    /// Text without a quote.
    pub fn text(text: impl Into<String>) -> Self {
        Content::Text {
            text: text.into(),
            quote: None,
        }
    }
}

impl Job {
    /// Where the message was written: whether a group chat, and the conversation's platform
    /// id (DingTalk conversationId, WeCom AI bot chatid; a one-to-one chat's on WeCom is the
    /// user's id). None for notifications.
    pub fn place(&self) -> Option<(bool, &str)> {
        match &self.reply {
            ReplyTarget::DingTalk(t) => Some((t.group, &t.conversation_id)),
            ReplyTarget::Wecom(t) => Some((false, &t.user_id)),
            ReplyTarget::WecomAibot(t) => Some(match &t.chat_id {
                Some(chat) => (true, chat.as_str()),
                None => (false, t.user_id.as_str()),
            }),
            ReplyTarget::Robot(_) => None,
        }
    }

    /// The text of a text message, if it is one.
    pub fn text(&self) -> Option<&str> {
        match &self.content {
            Content::Text { text, .. } => Some(text),
            Content::Fixed { .. } | Content::Notice { .. } | Content::Unsupported { .. } => None,
        }
    }

    /// Serializes for the queue.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Job always serializes")
    }

    /// Parses a queued job, refusing versions this build does not know.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JobDecodeError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let Version { v } = serde_json::from_slice(bytes).map_err(JobDecodeError::Malformed)?;
        if v != JOB_VERSION {
            return Err(JobDecodeError::UnknownVersion(v));
        }
        serde_json::from_slice(bytes).map_err(JobDecodeError::Malformed)
    }
}

/// A queued payload that is not a Job this build can handle.
#[derive(Debug, thiserror::Error)]
pub enum JobDecodeError {
    /// Not JSON, or not a Job.
    #[error("malformed job: {0}")]
    Malformed(serde_json::Error),
    /// Written by a newer (or much older) release.
    #[error("unknown job version {0}")]
    UnknownVersion(u32),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A group text job, for tests across the crate.
    pub(crate) fn sample_job(id: &str, text: &str) -> Job {
        Job {
            v: JOB_VERSION,
            id: id.into(),
            bot_id: "main".into(),
            platform: Platform::DingTalk,
            received_at_ms: 1,
            conversation_key: "dingtalk:main:cid1".into(),
            sender: Sender {
                id: "u1".into(),
                nick: Some("Li".into()),
            },
            content: Content::text(text),
            reply: ReplyTarget::DingTalk(DingTalkTarget {
                group: true,
                conversation_id: "cid1".into(),
                session_webhook: None,
                session_webhook_expires_ms: None,
                sender_staff_id: Some("u1".into()),
                robot_code: Some("ding".into()),
            }),
            trace_id: None,
        }
    }

    #[test]
    fn job_round_trips_and_unknown_versions_are_refused() {
        let job = sample_job("j1", "hi");
        assert_eq!(Job::from_bytes(&job.to_bytes()).unwrap(), job);
        let mut v2 = serde_json::to_value(&job).unwrap();
        v2["v"] = 2.into();
        assert!(matches!(
            Job::from_bytes(&serde_json::to_vec(&v2).unwrap()),
            Err(JobDecodeError::UnknownVersion(2))
        ));
        assert!(Job::from_bytes(b"nope").is_err());
    }
}
