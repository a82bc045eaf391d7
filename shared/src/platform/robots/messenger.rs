//! The messenger of a group robot channel: DingTalk custom robots (signed with the `SEC…`
//! secret as `&timestamp=&sign=`, keyword added when missing, @ by mobile or user id) and
//! WeCom group robots (`mentioned_list` / `mentioned_mobile_list`). Every send first takes
//! a slot from the cluster-wide [`WindowLimiter`], so all workers together stay within the
//! robot's documented 20 messages per minute instead of tripping its throttle (DingTalk
//! blocks an over-eager robot for ten minutes).

use super::ratelimit::WindowLimiter;
use crate::config::{ChannelKind, ChannelSettings};
use crate::job::{Job, ReplyTarget, RobotTarget};
use crate::platform::api::{PlatformApi, Verdict};
use crate::platform::{Messenger, OutgoingMessage, SendError};
use crate::split::Limit;
use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Sends notifications to one robot.
#[derive(Debug)]
pub struct RobotMessenger {
    api: PlatformApi,
    channel: ChannelSettings,
    limiter: Arc<WindowLimiter>,
}

impl RobotMessenger {
    /// A messenger for `channel`; `limiter` is shared by all channels of the process.
    pub fn new(
        http: reqwest::Client,
        channel: ChannelSettings,
        limiter: Arc<WindowLimiter>,
    ) -> Self {
        let api = PlatformApi::without_token(channel.kind.platform().as_str(), http);
        Self {
            api,
            channel,
            limiter,
        }
    }

    /// The @-mentions of `job`, or the channel's defaults.
    fn mentions(&self, job: &Job) -> RobotTarget {
        match &job.reply {
            ReplyTarget::Robot(t)
                if !t.at_mobiles.is_empty() || !t.at_user_ids.is_empty() || t.at_all =>
            {
                t.clone()
            }
            _ => RobotTarget {
                at_mobiles: self.channel.at_mobiles.clone(),
                at_user_ids: self.channel.at_user_ids.clone(),
                at_all: self.channel.at_all,
            },
        }
    }

    fn dingtalk_body(&self, message: &OutgoingMessage, at: &RobotTarget) -> Value {
        let mut text = message.text.clone();
        let mut title = message.title.clone();
        if let Some(k) = &self.channel.keyword
            && !text.contains(k.as_str())
            && !title.contains(k.as_str())
        {
            text.push_str("\n\n");
            text.push_str(k);
        }
        // DingTalk renders an @ only where "@mobile" / "@userId" appears in the text.
        let missing: Vec<String> = at
            .at_mobiles
            .iter()
            .chain(&at.at_user_ids)
            .map(|m| format!("@{m}"))
            .filter(|m| !text.contains(m.as_str()))
            .collect();
        if !missing.is_empty() {
            text.push_str(if message.markdown { "\n\n" } else { " " });
            text.push_str(&missing.join(" "));
        }
        let at =
            json!({"atMobiles": at.at_mobiles, "atUserIds": at.at_user_ids, "isAtAll": at.at_all});
        if message.markdown {
            if title.is_empty() {
                title = crate::platform::markdown_title(&text);
            }
            json!({"msgtype": "markdown", "markdown": {"title": title, "text": text}, "at": at})
        } else {
            json!({"msgtype": "text", "text": {"content": text}, "at": at})
        }
    }

    fn wecom_body(message: &OutgoingMessage, at: &RobotTarget) -> Value {
        if message.markdown {
            return json!({"msgtype": "markdown", "markdown": {"content": message.text}});
        }
        let mut users = at.at_user_ids.clone();
        if at.at_all {
            users.push("@all".into());
        }
        json!({"msgtype": "text", "text": {"content": message.text,
               "mentioned_list": users, "mentioned_mobile_list": at.at_mobiles}})
    }

    fn url(&self) -> String {
        let base = self.channel.url.expose();
        match &self.channel.secret {
            Some(secret) => {
                let sep = if base.contains('?') { '&' } else { '?' };
                let query = crate::platform::dingtalk::sign::webhook_query(
                    secret.expose(),
                    crate::now_ms(),
                );
                format!("{base}{sep}{query}")
            }
            None => base.to_string(),
        }
    }
}

#[async_trait]
impl Messenger for RobotMessenger {
    fn limit(&self, markdown: bool) -> Limit {
        match (self.channel.kind, markdown) {
            // DingTalk: bodies up to 20,000 bytes; keep parts like chat answers.
            (ChannelKind::DingtalkRobot, _) => {
                Limit::Chars(crate::platform::dingtalk::client::PART_CHARS)
            }
            (ChannelKind::WecomRobot, false) => Limit::Bytes(2048),
            (ChannelKind::WecomRobot, true) => Limit::Bytes(4096),
        }
    }

    async fn send(&self, job: &Job, message: &OutgoingMessage) -> Result<(), SendError> {
        let at = self.mentions(job);
        let body = match self.channel.kind {
            ChannelKind::DingtalkRobot => self.dingtalk_body(message, &at),
            ChannelKind::WecomRobot => Self::wecom_body(message, &at),
        };
        self.limiter
            .acquire(&self.channel.id)
            .await
            .map_err(|e| SendError::Retryable {
                reason: format!("rate-limit store: {e}"),
                after: None,
            })?;
        let request = self.api.http.post(self.url()).json(&body);
        self.api.call("robot_send", request, robot_table).await
    }
}

/// The group robots' error table. Throttled: DingTalk 130101 (then blocked ten minutes),
/// WeCom 45009; busy: -1; a 5xx or an answer without errcode is worth retrying.
fn robot_table(status: StatusCode, body: &Value) -> Verdict<()> {
    let code = body["errcode"].as_i64();
    let (outcome, after) = match code {
        Some(0) if status.is_success() => return Verdict::ok(()),
        Some(130101) => ("throttled", Some(Duration::from_secs(600))),
        Some(45009) => ("throttled", Some(Duration::from_secs(60))),
        Some(-1) => ("busy", Some(Duration::from_secs(5))),
        _ if status.is_server_error() || code.is_none() => ("error", None),
        _ => {
            let msg = body["errmsg"].as_str().unwrap_or_default();
            return Verdict::refused(format!(
                "robot refused (errcode {}, {msg})",
                code.unwrap_or_default()
            ));
        }
    };
    let reason = format!("robot {outcome} (HTTP {status}, errcode {code:?})");
    Verdict::retry(outcome, reason, after)
}
