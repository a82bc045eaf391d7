//! The DingTalk messenger. An answer goes through the conversation's sessionWebhook while it
//! is valid (no token, and a group answer can @ the sender), otherwise through the OpenAPI
//! robot sends with the app's access token from the shared [`TokenCache`]. A token DingTalk
//! refuses (`InvalidAuthentication`, 401) is dropped and the call made once more with a
//! fresh one; throttling (403 `…QpsLimit…`, errcode 130101, -1, 90018, 90002) is reported
//! as retryable. Every OpenAPI call first takes a slot of the app's [`Governor`] and is
//! counted against its monthly budget; the sessionWebhook is neither paced nor metered.

use crate::cache::Cache;
use crate::config::{DingTalkBot, ReplyMode};
use crate::job::{DingTalkTarget, Job, ReplyTarget};
use crate::platform::api::{PlatformApi, Verdict};
use crate::platform::governor::{Governor, Priority};
use crate::platform::token::{AccessToken, Authorized, TokenCache};
use crate::platform::{LiveReply, Messenger, OutgoingMessage, SendError};
use crate::secret::Secret;
use crate::split::Limit;
use async_trait::async_trait;
use reqwest::StatusCode;
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
    pub(super) api: PlatformApi,
    pub(super) bot: DingTalkBot,
    pub(super) governor: Governor,
}

/// What a sessionWebhook send came to.
enum Webhook {
    Sent,
    /// The session is gone: use OpenAPI instead.
    Expired,
}

impl DingTalkMessenger {
    /// A messenger for `bot`, sharing `http` and `tokens` with the rest of the process and
    /// the app's API limits with the cluster through `cache`.
    pub fn new(
        http: reqwest::Client,
        bot: DingTalkBot,
        tokens: Arc<TokenCache>,
        cache: Arc<dyn Cache>,
    ) -> Self {
        let token_key = format!("token:dingtalk:{}", bot.app_key);
        let api = PlatformApi::new("dingtalk", http, &bot.api_base, tokens, token_key);
        let governor = Governor::new(
            cache,
            "dingtalk",
            format!("dingtalk:{}", bot.app_key),
            (bot.api_qps, crate::platform::governor::SECOND),
            bot.api_monthly_budget,
        );
        Self { api, bot, governor }
    }

    async fn fetch_token(&self) -> Result<AccessToken, SendError> {
        let body = json!({"appKey": self.bot.app_key, "appSecret": self.bot.app_secret.expose()});
        let request = self
            .api
            .http
            .post(self.api.url("/v1.0/oauth2/accessToken"))
            .json(&body);
        self.api.call("token", request, token_table).await
    }

    /// POSTs to an OpenAPI path; see [`Self::openapi_call`].
    async fn openapi(
        &self,
        api: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        self.governor.acquire(api, Priority::First, None).await.ok();
        self.openapi_call(reqwest::Method::POST, api, path, body)
            .await
    }

    /// Calls an OpenAPI path with the access token, refreshing it once if refused, and
    /// counts it against the monthly budget. The caller has taken the governor's slot.
    pub(super) async fn openapi_call(
        &self,
        method: reqwest::Method,
        api: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        let url = self.api.url(path);
        let fetch = || self.fetch_token();
        let call = |token: Secret| {
            let request = self
                .api
                .http
                .request(method.clone(), &url)
                .header("x-acs-dingtalk-access-token", token.expose())
                .json(body);
            async move {
                self.governor.count_metered(&self.bot.id).await;
                self.api
                    .call(api, request, move |status, v| openapi_table(api, status, v))
                    .await
            }
        };
        self.api.with_token(fetch, call).await
    }

    async fn via_webhook(
        &self,
        url: &str,
        target: &DingTalkTarget,
        message: &OutgoingMessage,
    ) -> Result<Webhook, SendError> {
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
        let request = self.api.http.post(url).json(&body);
        self.api
            .call("session_webhook", request, webhook_table)
            .await
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

/// DingTalk's error table for the access-token fetch.
fn token_table(status: StatusCode, body: &Value) -> Verdict<AccessToken> {
    match (body["accessToken"].as_str(), body["expireIn"].as_u64()) {
        (Some(t), Some(secs)) if status.is_success() => Verdict::ok(AccessToken {
            value: Secret::new(t),
            expires_in: Duration::from_secs(secs),
        }),
        _ => {
            let code = body["code"].as_str().unwrap_or("unknown");
            let reason = format!("access token refused ({status}, {code})");
            if status.is_server_error() || code.contains("Limit") {
                Verdict::retry("error", reason, None)
            } else {
                Verdict::new("error", Err(SendError::Permanent(reason)))
            }
        }
    }
}

/// How long to wait after the platform throttled a call: peers found 1 s too short.
pub const THROTTLE_BACKOFF: Duration = Duration::from_secs(2);

/// DingTalk's error table for OpenAPI calls: a refused token is 401 or 400
/// `InvalidAuthentication`; throttling is 403 `…QpsLimit…`, oapi errcode 90018 or 90002,
/// 429, 5xx, or a success that flow-controlled the recipient; the org's monthly quota
/// (`ApiCountLimitForOrg`) is a refusal, as it lasts until the month ends.
fn openapi_table(api: &str, status: StatusCode, body: &Value) -> Verdict<Authorized<Value>> {
    let status = status.as_u16();
    let code = body["code"].as_str().unwrap_or_default();
    if status == 401 || (status == 400 && code == "InvalidAuthentication") {
        return Verdict::token_refused();
    }
    if let Some(errcode @ (90018 | 90002)) = body["errcode"].as_i64() {
        return Verdict::retry(
            "throttled",
            format!("{api} throttled (errcode {errcode})"),
            Some(THROTTLE_BACKOFF),
        );
    }
    if (200..300).contains(&status) {
        let throttled = body["flowControlledStaffIdList"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if throttled {
            return Verdict::retry(
                "throttled",
                "recipient flow-controlled".into(),
                Some(Duration::from_secs(1)),
            );
        }
        return Verdict::ok(Authorized::Ok(body.clone()));
    }
    let reason = format!("{api} failed ({status}, {code})");
    if code.contains("ApiCountLimit") {
        Verdict::new("quota_exhausted", Err(SendError::Permanent(reason)))
    } else if status == 403 && code.contains("Limit") || status == 429 {
        Verdict::retry("throttled", reason, Some(THROTTLE_BACKOFF))
    } else if status >= 500 {
        Verdict::retry("error", reason, Some(Duration::from_secs(1)))
    } else {
        Verdict::refused(reason)
    }
}

/// DingTalk's error table for sessionWebhook sends: 300001/300002 mean the session is
/// gone; 130101, -1, 90018 and 90002 mean busy.
fn webhook_table(status: StatusCode, body: &Value) -> Verdict<Webhook> {
    match body["errcode"].as_i64() {
        Some(0) if status.is_success() => Verdict::ok(Webhook::Sent),
        Some(300001) | Some(300002) => Verdict::new("expired", Ok(Webhook::Expired)),
        Some(code @ (130101 | -1 | 90018 | 90002)) => Verdict::retry(
            "throttled",
            format!("session webhook busy (errcode {code})"),
            Some(Duration::from_secs(2)),
        ),
        _ if status.is_server_error() => {
            Verdict::retry("error", format!("session webhook answered {status}"), None)
        }
        code => Verdict::refused(format!(
            "session webhook refused ({status}, errcode {})",
            code.map(|c| c.to_string()).unwrap_or_else(|| "none".into())
        )),
    }
}

/// Whether a callback's `sessionWebhook` may be posted to: HTTPS on DingTalk's domain, the
/// exact origin (scheme, host, port) of the bot's `api_base` (so the fakes work), or HTTPS on
/// a host of `session_webhook_hosts`. A DingTalk callback's signature does not cover its
/// body, so a captured header pair could otherwise send an answer built on the victim
/// conversation's history to any host.
pub fn webhook_allowed(bot: &DingTalkBot, webhook: &str) -> bool {
    let Ok(url) = url::Url::parse(webhook) else {
        return false;
    };
    if !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    if url::Url::parse(&bot.api_base).is_ok_and(|base| base.origin() == url.origin()) {
        return true;
    }
    if url.scheme() != "https" || url.port().is_some_and(|p| p != 443) {
        return false;
    }
    host == "dingtalk.com"
        || host.ends_with(".dingtalk.com")
        || bot
            .session_webhook_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host))
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
        let webhook = webhook.filter(|url| {
            let allowed = webhook_allowed(&self.bot, url);
            if !allowed {
                tracing::warn!(
                    webhook = %crate::untrusted::clip(url, 120),
                    "sessionWebhook not on DingTalk's hosts; answering through the OpenAPI"
                );
            }
            allowed
        });
        if let Some(url) = webhook {
            match self.via_webhook(url, target, message).await? {
                Webhook::Sent => return Ok(()),
                Webhook::Expired => {}
            }
        }
        self.via_openapi(target, message).await
    }

    fn live(&self, job: &Job) -> Option<&dyn LiveReply> {
        let card = self.bot.reply_mode == ReplyMode::Card
            && matches!(&job.reply, ReplyTarget::DingTalk(t) if t.group || t.sender_staff_id.is_some());
        card.then_some(self as &dyn LiveReply)
    }

    fn working_notice_after(&self) -> Option<Duration> {
        (self.bot.working_notice_secs > 0)
            .then(|| Duration::from_secs(self.bot.working_notice_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::webhook_allowed;
    use crate::config::DingTalkBot;

    fn bot(extra: &str) -> DingTalkBot {
        toml::from_str(&format!(
            "id = \"m\"\napp_key = \"k\"\napp_secret = \"s\"\napi_base = \"http://127.0.0.1:9100\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn session_webhooks_only_on_dingtalk_the_api_base_or_listed_hosts() {
        let b = bot("session_webhook_hosts = [\"dt-proxy.corp.example\"]");
        for ok in [
            "https://oapi.dingtalk.com/robot/sendBySession?session=s",
            "https://OAPI.DingTalk.com:443/robot/sendBySession?session=s",
            "http://127.0.0.1:9100/robot/sendBySession?session=s",
            "https://dt-proxy.corp.example/robot/sendBySession?session=s",
        ] {
            assert!(webhook_allowed(&b, ok), "{ok}");
        }
        for bad in [
            "http://oapi.dingtalk.com/robot/sendBySession",
            "https://oapi.dingtalk.com:8443/robot/sendBySession",
            "https://evil.example/robot/sendBySession",
            "https://dingtalk.com.evil.example/x",
            "https://evildingtalk.com/x",
            "https://user@oapi.dingtalk.com/x",
            "http://127.0.0.1:9101/robot/sendBySession",
            "https://127.0.0.1:9100/robot/sendBySession",
            "http://dt-proxy.corp.example/x",
            "not a url",
            "",
        ] {
            assert!(!webhook_allowed(&b, bad), "{bad}");
        }
        assert!(!webhook_allowed(
            &bot(""),
            "https://dt-proxy.corp.example/x"
        ));
    }
}
