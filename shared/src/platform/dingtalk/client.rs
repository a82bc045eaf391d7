//! The DingTalk messenger. An answer goes through the conversation's sessionWebhook while it
//! is valid (no token, and a group answer can @ the sender), otherwise through the OpenAPI
//! robot sends with the app's access token from the shared [`TokenCache`]. A token DingTalk
//! refuses (`InvalidAuthentication`, 401) is dropped and the call made once more with a
//! fresh one; throttling (403 `…QpsLimit…`, errcode 130101, -1) is reported as retryable.

use crate::config::DingTalkBot;
use crate::job::{DingTalkTarget, Job, ReplyTarget};
use crate::platform::api::PlatformApi;
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::platform::{Messenger, OutgoingMessage, SendError};
use crate::secret::Secret;
use crate::split::Limit;
use async_trait::async_trait;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Characters per message part: DingTalk rejects bodies over 20 000 bytes and is reported to
/// drop long markdown, so parts stay well below both.
pub const PART_CHARS: usize = 3500;
/// A sessionWebhook closer than this to expiry is not used (the send itself takes time).
const WEBHOOK_MARGIN_MS: i64 = 60_000;

/// Sends answers for one DingTalk bot.
#[derive(Debug)]
pub struct DingTalkMessenger {
    api: PlatformApi,
    bot: DingTalkBot,
}

/// What a sessionWebhook send came to.
enum WebhookError {
    /// The session is gone: use OpenAPI instead.
    Expired,
    Send(SendError),
}

impl DingTalkMessenger {
    /// A messenger for `bot`, sharing `http` and `tokens` with the rest of the process.
    pub fn new(http: reqwest::Client, bot: DingTalkBot, tokens: Arc<TokenCache>) -> Self {
        let token_key = format!("token:dingtalk:{}", bot.app_key);
        let api = PlatformApi::new("dingtalk", http, &bot.api_base, tokens, token_key);
        Self { api, bot }
    }

    async fn fetch_token(&self) -> Result<AccessToken, SendError> {
        let resp = self
            .api
            .http
            .post(self.api.url("/v1.0/oauth2/accessToken"))
            .json(&json!({"appKey": self.bot.app_key, "appSecret": self.bot.app_secret.expose()}))
            .send()
            .await
            .map_err(|e| self.api.network_error("token", &e))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        match (body["accessToken"].as_str(), body["expireIn"].as_u64()) {
            (Some(t), Some(secs)) if status.is_success() => {
                self.api.record("token", "ok");
                Ok(AccessToken {
                    value: Secret::new(t),
                    expires_in: Duration::from_secs(secs),
                })
            }
            _ => {
                self.api.record("token", "error");
                let code = body["code"].as_str().unwrap_or("unknown");
                let reason = format!("access token refused ({status}, {code})");
                Err(if status.is_server_error() || code.contains("Limit") {
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

    /// POSTs to an OpenAPI path with the access token, refreshing it once if refused.
    async fn openapi(&self, api: &str, path: &str, body: &Value) -> Result<Value, SendError> {
        let url = self.api.url(path);
        let fetch = || self.fetch_token();
        let call = |token: Secret| {
            let url = &url;
            async move {
                let resp = self
                    .api
                    .http
                    .post(url)
                    .header("x-acs-dingtalk-access-token", token.expose())
                    .json(body)
                    .send()
                    .await
                    .map_err(|e| self.api.network_error(api, &e))?;
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or_default();
                let code = v["code"].as_str().unwrap_or_default();
                if status == 401 || (status == 400 && code == "InvalidAuthentication") {
                    self.api.record(api, "token_refused");
                    return Ok(Authorized::TokenRefused);
                }
                if (200..300).contains(&status) {
                    let throttled = v["flowControlledStaffIdList"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty());
                    if throttled {
                        self.api.record(api, "throttled");
                        return Err(SendError::Retryable {
                            reason: "recipient flow-controlled".into(),
                            after: Some(Duration::from_secs(1)),
                        });
                    }
                    self.api.record(api, "ok");
                    return Ok(Authorized::Ok(v));
                }
                let reason = format!("{api} failed ({status}, {code})");
                if status == 403 && code.contains("Limit") || status >= 500 || status == 429 {
                    self.api.record(api, "throttled");
                    Err(SendError::Retryable {
                        reason,
                        after: Some(Duration::from_secs(1)),
                    })
                } else {
                    self.api.record(api, "refused");
                    Err(SendError::Permanent(reason))
                }
            }
        };
        self.api.with_token(fetch, call).await
    }

    async fn via_webhook(
        &self,
        url: &str,
        target: &DingTalkTarget,
        message: &OutgoingMessage,
    ) -> Result<(), WebhookError> {
        let at_ids: Vec<&str> = if target.group {
            target.sender_staff_id.as_deref().into_iter().collect()
        } else {
            Vec::new()
        };
        let at = json!({"atUserIds": at_ids, "isAtAll": false});
        let body = if message.markdown {
            json!({"msgtype": "markdown", "markdown": {"title": message.title, "text": message.text}, "at": at})
        } else {
            json!({"msgtype": "text", "text": {"content": message.text}, "at": at})
        };
        let resp = self
            .api
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| WebhookError::Send(self.api.network_error("session_webhook", &e)))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        match v["errcode"].as_i64() {
            Some(0) if status.is_success() => {
                self.api.record("session_webhook", "ok");
                Ok(())
            }
            Some(300001) | Some(300002) => {
                self.api.record("session_webhook", "expired");
                Err(WebhookError::Expired)
            }
            Some(code @ (130101 | -1 | 90018 | 90002)) => {
                self.api.record("session_webhook", "throttled");
                Err(WebhookError::Send(SendError::Retryable {
                    reason: format!("session webhook busy (errcode {code})"),
                    after: Some(Duration::from_secs(2)),
                }))
            }
            _ if status.is_server_error() => {
                self.api.record("session_webhook", "error");
                Err(WebhookError::Send(SendError::Retryable {
                    reason: format!("session webhook answered {status}"),
                    after: None,
                }))
            }
            code => {
                self.api.record("session_webhook", "refused");
                Err(WebhookError::Send(SendError::Permanent(format!(
                    "session webhook refused ({status}, errcode {})",
                    code.map(|c| c.to_string()).unwrap_or_else(|| "none".into())
                ))))
            }
        }
    }

    async fn via_openapi(
        &self,
        target: &DingTalkTarget,
        message: &OutgoingMessage,
    ) -> Result<(), SendError> {
        let (key, param) = if message.markdown {
            (
                "sampleMarkdown",
                json!({"title": message.title, "text": message.text}),
            )
        } else {
            ("sampleText", json!({"content": message.text}))
        };
        let robot_code = target
            .robot_code
            .as_deref()
            .unwrap_or(self.bot.robot_code());
        if target.group {
            let body = json!({
                "robotCode": robot_code,
                "openConversationId": target.conversation_id,
                "msgKey": key,
                "msgParam": param.to_string(),
            });
            self.openapi("group_send", "/v1.0/robot/groupMessages/send", &body)
                .await
                .map(drop)
        } else {
            let Some(staff) = &target.sender_staff_id else {
                return Err(SendError::Permanent(
                    "no staffId for a one-to-one OpenAPI send".into(),
                ));
            };
            let body = json!({
                "robotCode": robot_code,
                "userIds": [staff],
                "msgKey": key,
                "msgParam": param.to_string(),
            });
            self.openapi("oto_send", "/v1.0/robot/oToMessages/batchSend", &body)
                .await
                .map(drop)
        }
    }
}

#[async_trait]
impl Messenger for DingTalkMessenger {
    fn limit(&self, _markdown: bool) -> Limit {
        Limit::Chars(PART_CHARS)
    }

    async fn send(&self, job: &Job, message: &OutgoingMessage) -> Result<(), SendError> {
        let ReplyTarget::DingTalk(target) = &job.reply else {
            return Err(SendError::Permanent("not a DingTalk conversation".into()));
        };
        let webhook = target.session_webhook.as_deref().filter(|_| {
            target
                .session_webhook_expires_ms
                .is_none_or(|exp| exp - crate::now_ms() > WEBHOOK_MARGIN_MS)
        });
        if let Some(url) = webhook {
            match self.via_webhook(url, target, message).await {
                Ok(()) => return Ok(()),
                Err(WebhookError::Send(e)) => return Err(e),
                Err(WebhookError::Expired) => {}
            }
        }
        self.via_openapi(target, message).await
    }
}
