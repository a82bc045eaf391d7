//! The WeCom messenger: answers go to the member through `message/send` with the app's
//! access token from the shared [`TokenCache`] (refreshed once on 40014/42001/42009).
//! WeCom limits text and app markdown to 2048 UTF-8 bytes and silently truncates beyond,
//! so the worker splits to [`PART_BYTES`] before anything is sent. Sends are paced by the
//! enterprise's [`Governor`] (`api_per_minute`, cluster-wide) and by [`MEMBER_PER_MINUTE`]
//! per member, so the parts of a long answer wait rather than vanish.

use crate::cache::Cache;
use crate::config::WecomBot;
use crate::job::{Job, ReplyTarget};
use crate::platform::api::{PlatformApi, Verdict};
use crate::platform::governor::{Governor, MINUTE, Priority};
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::platform::{Messenger, OutgoingMessage, SendError};
use crate::secret::Secret;
use crate::split::Limit;
use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Bytes per message part (`text.content` and app `markdown.content`).
pub const PART_BYTES: usize = 2048;

/// Messages one app may send one member per minute: WeCom drops more without an error.
pub const MEMBER_PER_MINUTE: u32 = 30;

/// errcodes meaning "this access token is no good": invalid, expired, expired (legacy).
const TOKEN_ERRORS: [i64; 3] = [40014, 42001, 42009];

/// Sends answers for one WeCom app.
#[derive(Debug)]
pub struct WecomMessenger {
    api: PlatformApi,
    bot: WecomBot,
    governor: Governor,
}

impl WecomMessenger {
    /// A messenger for `bot`, sharing `http` and `tokens` with the rest of the process and
    /// the enterprise's API limits with the cluster through `cache`.
    pub fn new(
        http: reqwest::Client,
        bot: WecomBot,
        tokens: Arc<TokenCache>,
        cache: Arc<dyn Cache>,
    ) -> Self {
        let token_key = format!("token:wecom:{}:{}", bot.corp_id, bot.agent_id);
        let api = PlatformApi::new("wecom", http, &bot.api_base, tokens, token_key);
        let governor = Governor::new(
            cache,
            "wecom",
            format!("wecom:{}", bot.corp_id),
            (bot.api_per_minute, MINUTE),
            0,
        );
        Self { api, bot, governor }
    }

    async fn fetch_token(&self) -> Result<AccessToken, SendError> {
        let request = self
            .api
            .http
            .get(self.api.url("/cgi-bin/gettoken"))
            .query(&[
                ("corpid", self.bot.corp_id.as_str()),
                ("corpsecret", self.bot.corp_secret.expose()),
            ]);
        self.api.call("gettoken", request, gettoken_table).await
    }

    async fn send_once(&self, token: Secret, body: &Value) -> Result<Authorized<()>, SendError> {
        let request = self
            .api
            .http
            .post(self.api.url("/cgi-bin/message/send"))
            .query(&[("access_token", token.expose())])
            .json(body);
        self.api.call("message_send", request, send_table).await
    }
}

/// WeCom's error table for `gettoken`: -1 (busy), 45009 and 45033 (limits) are worth
/// retrying.
fn gettoken_table(_status: StatusCode, body: &Value) -> Verdict<AccessToken> {
    let code = body["errcode"].as_i64().unwrap_or(-1);
    match (
        code,
        body["access_token"].as_str(),
        body["expires_in"].as_u64(),
    ) {
        (0, Some(t), Some(secs)) => Verdict::ok(AccessToken {
            value: Secret::new(t),
            expires_in: Duration::from_secs(secs),
        }),
        _ => {
            let reason = format!("gettoken refused (errcode {code})");
            if matches!(code, -1 | 45009 | 45033) {
                Verdict::retry("error", reason, None)
            } else {
                Verdict::new("error", Err(SendError::Permanent(reason)))
            }
        }
    }
}

/// WeCom's error table for `message/send`: [`TOKEN_ERRORS`] refuse the token; -1, 45009
/// (a minute's wait) and 45033 mean busy; a success naming the recipient invalid or
/// unlicensed is a refusal.
fn send_table(status: StatusCode, body: &Value) -> Verdict<Authorized<()>> {
    let Some(code) = body["errcode"].as_i64() else {
        return Verdict::retry(
            "error",
            format!("message/send answered {status} without errcode"),
            None,
        );
    };
    match code {
        0 => {
            let invalid = ["invaliduser", "unlicenseduser"]
                .iter()
                .any(|k| body[k].as_str().is_some_and(|s| !s.is_empty()));
            if invalid {
                return Verdict::refused("recipient invalid or unlicensed".into());
            }
            Verdict::ok(Authorized::Ok(()))
        }
        c if TOKEN_ERRORS.contains(&c) => Verdict::token_refused(),
        -1 | 45009 | 45033 => Verdict::retry(
            "throttled",
            format!("message/send busy (errcode {code})"),
            Some(Duration::from_secs(if code == 45009 { 60 } else { 2 })),
        ),
        _ => Verdict::refused(format!("message/send refused (errcode {code})")),
    }
}

#[async_trait]
impl Messenger for WecomMessenger {
    fn working_notice_after(&self) -> Option<Duration> {
        (self.bot.working_notice_secs > 0)
            .then(|| Duration::from_secs(self.bot.working_notice_secs))
    }

    fn limit(&self, _markdown: bool) -> Limit {
        Limit::Bytes(PART_BYTES)
    }

    async fn send(&self, job: &Job, message: &OutgoingMessage) -> Result<(), SendError> {
        let ReplyTarget::Wecom(target) = &job.reply else {
            return Err(SendError::Permanent("not a WeCom conversation".into()));
        };
        let body = if message.markdown && self.bot.markdown {
            json!({"touser": target.user_id, "msgtype": "markdown", "agentid": target.agent_id,
                   "markdown": {"content": message.text}})
        } else {
            json!({"touser": target.user_id, "msgtype": "text", "agentid": target.agent_id,
                   "text": {"content": message.text}})
        };
        let member = format!("{}:{}", target.agent_id, target.user_id);
        self.governor
            .acquire_for(&member, MEMBER_PER_MINUTE, MINUTE)
            .await;
        self.governor
            .acquire("message_send", Priority::First, None)
            .await
            .ok();
        self.api
            .with_token(|| self.fetch_token(), |token| self.send_once(token, &body))
            .await
    }
}
