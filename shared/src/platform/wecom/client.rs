//! The WeCom messenger: answers go to the member through `message/send` with the app's
//! access token from the shared [`TokenCache`] (refreshed once on 40014/42001/42009).
//! WeCom limits text and app markdown to 2048 UTF-8 bytes and silently truncates beyond,
//! so the worker splits to [`PART_BYTES`] before anything is sent.

use crate::config::WecomBot;
use crate::job::{Job, ReplyTarget};
use crate::platform::api::PlatformApi;
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::platform::{Messenger, OutgoingMessage, SendError};
use crate::secret::Secret;
use crate::split::Limit;
use async_trait::async_trait;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Bytes per message part (`text.content` and app `markdown.content`).
pub const PART_BYTES: usize = 2048;

/// errcodes meaning "this access token is no good": invalid, expired, expired (legacy).
const TOKEN_ERRORS: [i64; 3] = [40014, 42001, 42009];

/// Sends answers for one WeCom app.
#[derive(Debug)]
pub struct WecomMessenger {
    api: PlatformApi,
    bot: WecomBot,
}

impl WecomMessenger {
    /// A messenger for `bot`, sharing `http` and `tokens` with the rest of the process.
    pub fn new(http: reqwest::Client, bot: WecomBot, tokens: Arc<TokenCache>) -> Self {
        let token_key = format!("token:wecom:{}:{}", bot.corp_id, bot.agent_id);
        let api = PlatformApi::new("wecom", http, &bot.api_base, tokens, token_key);
        Self { api, bot }
    }

    async fn fetch_token(&self) -> Result<AccessToken, SendError> {
        let resp = self
            .api
            .http
            .get(self.api.url("/cgi-bin/gettoken"))
            .query(&[
                ("corpid", self.bot.corp_id.as_str()),
                ("corpsecret", self.bot.corp_secret.expose()),
            ])
            .send()
            .await
            .map_err(|e| self.api.network_error("gettoken", &e))?;
        let v: Value = resp.json().await.unwrap_or_default();
        let code = v["errcode"].as_i64().unwrap_or(-1);
        match (code, v["access_token"].as_str(), v["expires_in"].as_u64()) {
            (0, Some(t), Some(secs)) => {
                self.api.record("gettoken", "ok");
                Ok(AccessToken {
                    value: Secret::new(t),
                    expires_in: Duration::from_secs(secs),
                })
            }
            _ => {
                self.api.record("gettoken", "error");
                let reason = format!("gettoken refused (errcode {code})");
                Err(if matches!(code, -1 | 45009 | 45033) {
                    SendError::Retryable {
                        reason,
                        after: None,
                    }
                } else {
                    SendError::Permanent(reason)
                })
            }
        }
    }

    async fn send_once(&self, token: Secret, body: &Value) -> Result<Authorized<()>, SendError> {
        let resp = self
            .api
            .http
            .post(self.api.url("/cgi-bin/message/send"))
            .query(&[("access_token", token.expose())])
            .json(body)
            .send()
            .await
            .map_err(|e| self.api.network_error("message_send", &e))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        let Some(code) = v["errcode"].as_i64() else {
            self.api.record("message_send", "error");
            return Err(SendError::Retryable {
                reason: format!("message/send answered {status} without errcode"),
                after: None,
            });
        };
        match code {
            0 => {
                let invalid = ["invaliduser", "unlicenseduser"]
                    .iter()
                    .any(|k| v[k].as_str().is_some_and(|s| !s.is_empty()));
                if invalid {
                    self.api.record("message_send", "refused");
                    return Err(SendError::Permanent(
                        "recipient invalid or unlicensed".into(),
                    ));
                }
                self.api.record("message_send", "ok");
                Ok(Authorized::Ok(()))
            }
            c if TOKEN_ERRORS.contains(&c) => {
                self.api.record("message_send", "token_refused");
                Ok(Authorized::TokenRefused)
            }
            -1 | 45009 | 45033 => {
                self.api.record("message_send", "throttled");
                Err(SendError::Retryable {
                    reason: format!("message/send busy (errcode {code})"),
                    after: Some(Duration::from_secs(if code == 45009 { 60 } else { 2 })),
                })
            }
            _ => {
                self.api.record("message_send", "refused");
                Err(SendError::Permanent(format!(
                    "message/send refused (errcode {code})"
                )))
            }
        }
    }
}

#[async_trait]
impl Messenger for WecomMessenger {
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
        self.api
            .with_token(|| self.fetch_token(), |token| self.send_once(token, &body))
            .await
    }
}
