//! A faithful fake of DingTalk's server side for one or more enterprise-internal robot apps
//! (PROTOCOLS.md §a–d): the OpenAPI gateway (`/v1.0/oauth2/accessToken`, group and 1:1
//! robot sends, the AI card API of `dingtalk/card.rs`), the `sessionWebhook` reply endpoint,
//! the signed callbacks DingTalk POSTs to a bot, and the Stream-mode gateway of
//! `dingtalk/stream.rs` (tickets, the WebSocket, pushed bot messages, acks and re-pushes).
//! Error shapes follow the real services: the new gateway answers non-2xx with `{code,
//! message, requestid}`, the oapi-style sessionWebhook answers HTTP 200 with `{errcode,
//! errmsg}`. Every accepted message and card is recorded for assertions; tokens can be
//! revoked, sessions expired, and sends throttled or failed (an outage: 503) on demand.
//!
//! Like the real gateway, every OpenAPI call except the token API is limited per app and API
//! (default 20 QPS, sliding window) and counted against the org's monthly budget (see
//! `dingtalk/meter.rs`); the sessionWebhook is neither. Bad input never panics: it gets the
//! 4xx (or errcode) the real API would give.

mod card;
mod meter;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::record::Recorder;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use card::{
    CARD_CREATE_AND_DELIVER_PATH, CARD_DELIVER_MODEL_INVALID_CODE, CARD_DELIVER_PATH,
    CARD_DUPLICATE_CODE, CARD_INSTANCES_PATH, CARD_NO_PERMISSION_CODE, CARD_NOT_DELIVERED_CODE,
    CARD_NOT_FOUND_CODE, CARD_OPEN_SPACE_ID_INVALID_CODE, CARD_PARAM_MAP_INVALID_CODE,
    CARD_SERVER_ERROR_CODE, CARD_STREAMING_PATH, CARD_TEMPLATE_UNPUBLISHED_CODE, CardFault,
    CardUpdate, FakeCard,
};
pub use meter::{DEFAULT_API_QPS, EndpointStats, ORG_QUOTA_CODE, QPS_LIMIT_CODE};
pub use stream::{
    BOT_MESSAGE_TOPIC, DEFAULT_STREAM_DISCONNECT_GRACE, DEFAULT_STREAM_REPUSH_AFTER,
    SIM_STREAM_ACKS_PATH, SIM_STREAM_CONNECTIONS_PATH, SIM_STREAM_DISCONNECT_PATH,
    SIM_STREAM_PUSH_PATH, STREAM_AUTH_FAILED_CODE, STREAM_CONNECT_PATH, STREAM_INVALID_TICKET_CODE,
    STREAM_MAX_ATTEMPTS, STREAM_OPEN_PATH, STREAM_TICKET_TTL, StreamAck, StreamClosedBy,
    StreamConnection, StreamDelivery, StreamDeliveryRecord, StreamPing,
};

/// Lifetime of a freshly issued access token (`expireIn`), unless changed by `set_token_ttl`.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 7200;
/// Lifetime of the sessionWebhook minted for each callback (≈ 90 min, as observed).
pub const CALLBACK_SESSION_TTL: Duration = Duration::from_secs(90 * 60);
/// Largest sessionWebhook body DingTalk accepts, in bytes.
pub const MAX_WEBHOOK_BODY_BYTES: usize = 20_000;
/// Most `userIds` one `oToMessages/batchSend` call accepts.
pub const MAX_OTO_USER_IDS: usize = 20;

/// Route of the token API (neither rate-limited nor metered).
pub const ACCESS_TOKEN_PATH: &str = "/v1.0/oauth2/accessToken";
/// Route of the group robot send.
pub const GROUP_SEND_PATH: &str = "/v1.0/robot/groupMessages/send";
/// Route of the 1:1 robot batch send.
pub const OTO_SEND_PATH: &str = "/v1.0/robot/oToMessages/batchSend";

const CORP_ID: &str = "dingsimcorp0000000000000000000000";
const ACCESS_TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";

/// One robot app the fake knows: its app key (= robotCode) and app secret.
#[derive(Clone, PartialEq, Eq)]
pub struct FakeApp {
    /// App key (Client ID); also the robot's `robotCode`.
    pub app_key: String,
    /// App secret (Client Secret); signs callbacks and fetches tokens.
    pub app_secret: String,
}

impl FakeApp {
    /// An app with the given key and secret.
    pub fn new(app_key: impl Into<String>, app_secret: impl Into<String>) -> Self {
        Self {
            app_key: app_key.into(),
            app_secret: app_secret.into(),
        }
    }
}

impl fmt::Debug for FakeApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApp")
            .field("app_key", &self.app_key)
            .field("app_secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for FakeApp {
    type Err = String;

    /// Parses `KEY:SECRET` (the secret may itself contain `:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((key, secret)) if !key.is_empty() && !secret.is_empty() => {
                Ok(Self::new(key, secret))
            }
            _ => Err(format!("expected KEY:SECRET, got {s:?}")),
        }
    }
}

/// The route a recorded message arrived through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Via {
    /// `POST /robot/sendBySession?session=…` (the callback's reply URL).
    SessionWebhook,
    /// `POST /v1.0/robot/groupMessages/send`.
    GroupSend,
    /// `POST /v1.0/robot/oToMessages/batchSend`.
    OtoSend,
}

/// One message the fake accepted, normalised across the three send routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentMessage {
    /// Route it came through.
    pub via: Via,
    /// `robotCode` of OpenAPI sends; `None` for sessionWebhook.
    pub robot_code: Option<String>,
    /// The session's conversation (sessionWebhook) or `openConversationId` (group send).
    pub conversation_id: Option<String>,
    /// Recipients of a 1:1 batch send; empty otherwise.
    pub user_ids: Vec<String>,
    /// `"text"`, `"markdown"`, or the raw webhook msgtype / OpenAPI msgKey for other kinds.
    pub msgtype: String,
    /// Text content, markdown text, or the raw JSON of other kinds.
    pub content: String,
    /// Markdown (or card) title, when there is one.
    pub title: Option<String>,
    /// `at.atUserIds` of a sessionWebhook message.
    pub at_user_ids: Vec<String>,
    /// When the fake accepted it, ms since the Unix epoch.
    pub received_at_ms: i64,
}

/// Kind of chat a callback comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConversationType {
    /// Private chat with the robot (`conversationType: "1"`).
    #[default]
    OneToOne,
    /// Group chat where the robot was @-mentioned (`conversationType: "2"`).
    Group,
}

impl ConversationType {
    /// The wire value: `"1"` or `"2"` (a string, not a number).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneToOne => "1",
            Self::Group => "2",
        }
    }
}

/// What a simulated user sent; turned into a full callback body by [`FakeDingTalk::callback_body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackSpec {
    /// `msgId`, the platform's dedupe key.
    pub msg_id: String,
    /// `conversationId` (for groups the `openConversationId`).
    pub conversation_id: String,
    /// One-to-one or group.
    pub conversation_type: ConversationType,
    /// `senderStaffId`, the sender's userId in the org.
    pub sender_staff_id: String,
    /// `senderNick`, the sender's display name.
    pub sender_nick: String,
    /// The text typed (or, for audio, the speech recognition).
    pub text: String,
    /// `robotCode` (= app key).
    pub robot_code: String,
    /// `msgtype`: `text` (default), `picture`, `richText`, `audio`, `video` or `file`.
    pub msgtype: String,
}

impl CallbackSpec {
    /// A 1:1 text message from `sender_staff_id` to the robot, with a fresh msgId and a
    /// conversation id derived deterministically from the robot and the sender.
    pub fn one_to_one(robot_code: &str, sender_staff_id: &str, text: &str) -> Self {
        Self {
            msg_id: fresh_msg_id(),
            conversation_id: one_to_one_conversation_id(robot_code, sender_staff_id),
            conversation_type: ConversationType::OneToOne,
            sender_staff_id: sender_staff_id.to_owned(),
            sender_nick: format!("Nick {sender_staff_id}"),
            text: text.to_owned(),
            robot_code: robot_code.to_owned(),
            msgtype: "text".to_owned(),
        }
    }

    /// A group text message @-mentioning the robot, with a fresh msgId.
    pub fn group(
        robot_code: &str,
        conversation_id: &str,
        sender_staff_id: &str,
        text: &str,
    ) -> Self {
        Self {
            conversation_id: conversation_id.to_owned(),
            conversation_type: ConversationType::Group,
            ..Self::one_to_one(robot_code, sender_staff_id, text)
        }
    }
}

/// A fresh, unique msgId shaped like DingTalk's (`msg` + base64).
pub fn fresh_msg_id() -> String {
    format!("msg{}", STANDARD.encode(uuid::Uuid::new_v4().as_bytes()))
}

/// The fake DingTalk server. Cheap to clone; all clones share one server and one record.
#[derive(Clone)]
pub struct FakeDingTalk {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeDingTalk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&String> = self.inner.apps.keys().collect();
        keys.sort();
        f.debug_struct("FakeDingTalk")
            .field("base_url", &self.inner.base_url)
            .field("apps", &keys)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base_url: String,
    /// app_key → app_secret; fixed at start.
    apps: HashMap<String, String>,
    state: Mutex<DtState>,
    sent: Recorder<SentMessage>,
    /// Woken on every card change (for `wait_for_finished_cards`).
    cards_changed: Notify,
    /// Stream-mode records and wake-ups kept outside the state lock.
    stream: stream::StreamHub,
    stop: CancellationToken,
}

struct DtState {
    token_ttl: Duration,
    /// access token → what it is for.
    tokens: HashMap<String, IssuedToken>,
    /// app_key → its current token.
    current: HashMap<String, String>,
    /// app_key → successful token fetches.
    fetches: HashMap<String, usize>,
    /// session token → session.
    sessions: HashMap<String, Session>,
    fail_next: usize,
    /// Every send is answered 503 while set (see [`FakeDingTalk::set_send_outage`]).
    outage: bool,
    meters: meter::Meters,
    cards: card::CardStore,
    stream: stream::StreamStore,
}

struct IssuedToken {
    app_key: String,
    expires_at: Instant,
}

struct Session {
    conversation_id: String,
    expires_at_ms: i64,
}

type Reply = Result<Response, Refusal>;

impl FakeDingTalk {
    /// Binds `addr` (port 0 picks a free port) and serves the fake until [`Self::shutdown`]
    /// or the end of the runtime.
    pub async fn start(addr: SocketAddr, apps: Vec<FakeApp>) -> std::io::Result<FakeDingTalk> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{}", super::connectable(local)),
            apps: apps
                .into_iter()
                .map(|a| (a.app_key, a.app_secret))
                .collect(),
            state: Mutex::new(DtState {
                token_ttl: Duration::from_secs(DEFAULT_TOKEN_TTL_SECS),
                tokens: HashMap::new(),
                current: HashMap::new(),
                fetches: HashMap::new(),
                sessions: HashMap::new(),
                fail_next: 0,
                outage: false,
                meters: meter::Meters::default(),
                cards: card::CardStore::default(),
                stream: stream::StreamStore::default(),
            }),
            sent: Recorder::default(),
            cards_changed: Notify::new(),
            stream: stream::StreamHub::default(),
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route(ACCESS_TOKEN_PATH, post(access_token))
            .route(GROUP_SEND_PATH, post(group_send))
            .route(OTO_SEND_PATH, post(oto_send))
            .route(CARD_INSTANCES_PATH, post(card::create).put(card::update))
            .route(CARD_DELIVER_PATH, post(card::deliver_card))
            .route(CARD_CREATE_AND_DELIVER_PATH, post(card::create_and_deliver))
            .route(CARD_STREAMING_PATH, put(card::streaming))
            .route("/robot/sendBySession", post(send_by_session))
            .route(STREAM_OPEN_PATH, post(stream::open))
            .route(STREAM_CONNECT_PATH, get(stream::connect))
            .route(SIM_STREAM_PUSH_PATH, post(stream::sim_push))
            .route(SIM_STREAM_DISCONNECT_PATH, post(stream::sim_disconnect))
            .route(SIM_STREAM_ACKS_PATH, get(stream::sim_acks))
            .route(SIM_STREAM_CONNECTIONS_PATH, get(stream::sim_connections))
            .fallback(not_found)
            // The gateway answers a wrong method like an unknown API, not with a bare 405.
            .method_not_allowed_fallback(not_found)
            .with_state(inner.clone());
        super::serve_fake(listener, router, inner.stop.clone(), "dingtalk");
        stream::spawn_timers(&inner);
        Ok(FakeDingTalk { inner })
    }

    /// Base URL of both the OpenAPI gateway and oapi routes, e.g. `http://127.0.0.1:9100`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Stops accepting connections and ends the server once in-flight requests finish.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    /// Successful token fetches over all apps (a renewal inside validity counts too).
    pub fn token_fetches(&self) -> usize {
        self.inner.lock().fetches.values().sum()
    }

    /// Successful token fetches of one app.
    pub fn token_fetches_for(&self, app_key: &str) -> usize {
        self.inner.lock().fetches.get(app_key).copied().unwrap_or(0)
    }

    /// Invalidates every issued token: their next use gets `InvalidAuthentication`, and the
    /// next fetch issues a new token.
    pub fn revoke_tokens(&self) {
        let mut state = self.inner.lock();
        state.tokens.clear();
        state.current.clear();
    }

    /// Sets the lifetime (`expireIn`) of tokens issued or renewed from now on.
    pub fn set_token_ttl(&self, secs: u64) {
        self.inner.lock().token_ttl = Duration::from_secs(secs);
    }

    /// Mints a sessionWebhook bound to `conversation_id`, valid for `ttl`; returns its full
    /// URL and its expiry (ms since the Unix epoch), as a callback's `sessionWebhook` /
    /// `sessionWebhookExpiredTime` would carry them.
    pub fn session_webhook(&self, conversation_id: &str, ttl: Duration) -> (String, i64) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at_ms = shared::now_ms().saturating_add(ttl_ms);
        self.inner.lock().sessions.insert(
            token.clone(),
            Session {
                conversation_id: conversation_id.to_owned(),
                expires_at_ms,
            },
        );
        let url = format!(
            "{}/robot/sendBySession?session={token}",
            self.inner.base_url
        );
        (url, expires_at_ms)
    }

    /// Expires every session minted so far (their webhook then answers errcode 300_001).
    pub fn expire_sessions(&self) {
        let now = shared::now_ms();
        for session in self.inner.lock().sessions.values_mut() {
            session.expires_at_ms = session.expires_at_ms.min(now);
        }
    }

    /// Makes the next `n` sends that would otherwise be accepted (any route) fail with the
    /// throttling error: HTTP 403 `QpsLimitForAppkeyAndApi`, or errcode 130_101 on a webhook.
    /// Card routes are not affected (see [`Self::refuse_cards`]).
    pub fn fail_next_sends(&self, n: usize) {
        self.inner.lock().fail_next = n;
    }

    /// While `down`, every send (sessionWebhook, group and 1:1 robot sends) is answered
    /// HTTP 503 `ServiceUnavailable` and not recorded, as during an outage of DingTalk's
    /// servers; sends pass again once it is cleared. Card routes are not affected.
    pub fn set_send_outage(&self, down: bool) {
        self.inner.lock().outage = down;
    }

    /// Sets how many calls per app may start on one OpenAPI route in any sliding one-second
    /// window (default [`DEFAULT_API_QPS`]; 0 = unlimited). Calls over it get HTTP 403
    /// [`QPS_LIMIT_CODE`] and are not executed.
    pub fn set_api_qps(&self, qps: u32) {
        self.inner.lock().meters.qps = qps;
    }

    /// Sets the org's budget of metered calls (`None`, the default, = unlimited). Once
    /// [`Self::metered_calls`] reaches it, metered calls get HTTP 403 [`ORG_QUOTA_CODE`].
    pub fn set_monthly_quota(&self, quota: Option<u64>) {
        self.inner.lock().meters.monthly_quota = quota;
    }

    /// Metered calls executed so far, over all apps: every authenticated OpenAPI call except
    /// the token API that passed the QPS limit and the budget, whatever it answered.
    pub fn metered_calls(&self) -> u64 {
        self.inner.lock().meters.metered
    }

    /// Per-(app key, route path) statistics of the metered routes (e.g.
    /// `("app1", "/v1.0/card/streaming")`); card create and card update share
    /// [`CARD_INSTANCES_PATH`]. Requests with a bad token are not attributed to any app.
    pub fn endpoint_stats(&self) -> BTreeMap<(String, String), EndpointStats> {
        self.inner.lock().meters.stats()
    }

    /// The statistics of one app on one route (zeros if it never called it).
    pub fn endpoint_stats_for(&self, app_key: &str, path: &str) -> EndpointStats {
        self.endpoint_stats()
            .remove(&(app_key.to_owned(), path.to_owned()))
            .unwrap_or_default()
    }

    /// Zeroes the metered-call counter, the QPS windows and the statistics (the limits
    /// themselves stay).
    pub fn reset_meters(&self) {
        self.inner.lock().meters.reset();
    }

    /// Every message accepted so far, in arrival order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.inner.sent.all()
    }

    /// The messages accepted after the first `n`, in arrival order: for following the record
    /// of a long run without copying all of it each time.
    pub fn sent_since(&self, n: usize) -> Vec<SentMessage> {
        self.inner.sent.since(n)
    }

    /// Waits until at least `n` messages are recorded or `timeout` passes, then returns
    /// whatever is recorded.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        self.inner.sent.wait_for(n, timeout).await
    }

    /// Forgets the recorded messages and cards (tokens, sessions, faults and counters stay).
    pub fn clear(&self) {
        self.inner.sent.clear();
        self.inner.lock().cards.clear();
    }

    /// The full JSON body DingTalk would POST to the bot for `spec` (PROTOCOLS.md §a),
    /// including a freshly minted sessionWebhook on this fake valid for ~90 minutes.
    pub fn callback_body(&self, spec: &CallbackSpec) -> Value {
        let create_at = shared::now_ms();
        let (webhook, webhook_expires) =
            self.session_webhook(&spec.conversation_id, CALLBACK_SESSION_TTL);
        let chatbot_user_id = lwcp_id(&format!("robot/{}", spec.robot_code));
        let mut body = json!({
            "msgtype": spec.msgtype,
            "msgId": spec.msg_id,
            "createAt": create_at,
            "conversationType": spec.conversation_type.as_str(),
            "conversationId": spec.conversation_id,
            "senderId": lwcp_id(&format!("user/{}", spec.sender_staff_id)),
            "senderStaffId": spec.sender_staff_id,
            "senderNick": spec.sender_nick,
            "senderCorpId": CORP_ID,
            "senderPlatform": "Win",
            "chatbotUserId": chatbot_user_id,
            "chatbotCorpId": CORP_ID,
            "robotCode": spec.robot_code,
            "isAdmin": false,
            "isInAtList": true,
            "sessionWebhook": webhook,
            "sessionWebhookExpiredTime": webhook_expires,
        });
        let download_code = format!("dc{}", short_hash(&spec.msg_id));
        let payload = match spec.msgtype.as_str() {
            "text" => ("text", json!({ "content": format!(" {}", spec.text) })),
            "picture" => (
                "content",
                json!({ "downloadCode": download_code, "pictureDownloadCode": download_code }),
            ),
            "richText" => (
                "content",
                json!({ "richText": [
                    { "text": spec.text },
                    { "type": "picture", "downloadCode": download_code, "pictureDownloadCode": download_code },
                ] }),
            ),
            "audio" => (
                "content",
                json!({ "downloadCode": download_code, "recognition": spec.text, "duration": 3000 }),
            ),
            "video" => (
                "content",
                json!({ "downloadCode": download_code, "videoType": "mp4", "duration": 5000 }),
            ),
            "file" => (
                "content",
                json!({ "downloadCode": download_code, "fileName": spec.text }),
            ),
            _ => ("content", json!({ "downloadCode": download_code })),
        };
        if let Value::Object(map) = &mut body {
            map.insert(payload.0.to_owned(), payload.1);
            if spec.conversation_type == ConversationType::Group {
                map.insert("conversationTitle".to_owned(), json!("Parley sim group"));
                map.insert(
                    "atUsers".to_owned(),
                    json!([{ "dingtalkId": chatbot_user_id }]),
                );
            }
        }
        body
    }
}

/// A fake with two apps (`app1`/`secret1`, `app2`/`secret2`), for the submodules' tests.
#[cfg(test)]
pub(crate) async fn two_app_fake() -> FakeDingTalk {
    FakeDingTalk::start(
        "127.0.0.1:0".parse().unwrap(),
        vec![
            FakeApp::new("app1", "secret1"),
            FakeApp::new("app2", "secret2"),
        ],
    )
    .await
    .unwrap()
}

/// POSTs a callback `body` to `url` signed like DingTalk does: headers `timestamp` (now, ms)
/// and `sign` = base64(HMAC-SHA256(app_secret, timestamp + "\n" + app_secret)).
pub async fn send_callback(
    client: &reqwest::Client,
    url: &str,
    app_secret: &str,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    let timestamp = shared::now_ms().to_string();
    let sign = shared::platform::dingtalk::sign::sign(app_secret, &timestamp);
    client
        .post(url)
        .header("timestamp", timestamp)
        .header("sign", sign)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .body(body.to_vec())
        .send()
        .await
}

impl Inner {
    /// Locks the state; a poisoned lock (a panicked holder) is still usable for a fake.
    fn lock(&self) -> MutexGuard<'_, DtState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the app's valid token, renewing its lifetime, or issues a new one.
    fn issue_token(&self, app_key: &str) -> (String, u64) {
        let mut state = self.lock();
        let now = Instant::now();
        let ttl = state.token_ttl;
        *state.fetches.entry(app_key.to_owned()).or_default() += 1;
        let current = state.current.get(app_key).cloned();
        if let Some(token) = current {
            match state.tokens.get_mut(&token) {
                Some(issued) if issued.expires_at > now => {
                    issued.expires_at = now + ttl;
                    return (token, ttl.as_secs());
                }
                _ => {}
            }
            state.tokens.remove(&token);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        state.tokens.insert(
            token.clone(),
            IssuedToken {
                app_key: app_key.to_owned(),
                expires_at: now + ttl,
            },
        );
        state.current.insert(app_key.to_owned(), token.clone());
        (token, ttl.as_secs())
    }

    /// The app key owning the request's valid access token, or the gateway's 400.
    fn authenticate(&self, headers: &HeaderMap) -> Result<String, Refusal> {
        let token = headers
            .get(ACCESS_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let state = self.lock();
        match state.tokens.get(token) {
            Some(issued) if issued.expires_at > Instant::now() => Ok(issued.app_key.clone()),
            _ => Err(gateway_error(
                StatusCode::BAD_REQUEST,
                "InvalidAuthentication",
                "不合法的access_token",
            )),
        }
    }

    /// Authenticates an OpenAPI call to `path` and meters it (QPS window, monthly budget);
    /// returns the token's app key.
    fn open_api(&self, headers: &HeaderMap, path: &'static str) -> Result<String, Refusal> {
        let app = self.authenticate(headers)?;
        self.lock().meters.admit(&app, path, Instant::now())?;
        Ok(app)
    }

    /// Checks that `robot_code` is a configured robot and that the token's app owns it.
    fn check_robot(&self, token_app: &str, robot_code: &str) -> Result<(), Refusal> {
        if !self.apps.contains_key(robot_code) {
            return Err(gateway_error(
                StatusCode::BAD_REQUEST,
                "invalidParameter.robotCode.notExist",
                "robot 不存在",
            ));
        }
        if token_app != robot_code {
            return Err(gateway_error(
                StatusCode::FORBIDDEN,
                "Forbidden.AccessDenied.AccessTokenPermissionDenied",
                "没有调用该接口的权限: the access token belongs to another app",
            ));
        }
        Ok(())
    }

    /// Records `msg` unless an outage is on or a throttling fault is pending.
    fn accept(&self, msg: SentMessage) -> Result<(), SendRefused> {
        {
            let mut state = self.lock();
            if state.outage {
                return Err(SendRefused::Outage);
            }
            if state.fail_next > 0 {
                state.fail_next -= 1;
                return Err(SendRefused::Throttled);
            }
        }
        self.sent.push(msg);
        Ok(())
    }
}

// ---- handlers ------------------------------------------------------------------------------

async fn access_token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Reply {
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let app_key = required_str(&obj, "appKey")?;
    let app_secret = required_str(&obj, "appSecret")?;
    match inner.apps.get(app_key) {
        Some(secret) if secret == app_secret => {}
        _ => {
            return Err(gateway_error(
                StatusCode::BAD_REQUEST,
                "invalidClientIdOrSecret",
                "无效的clientId或者clientSecret",
            ));
        }
    }
    let (token, expire_in) = inner.issue_token(app_key);
    Ok(ok_json(
        json!({ "accessToken": token, "expireIn": expire_in }),
    ))
}

async fn group_send(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Reply {
    let app = inner.open_api(&headers, GROUP_SEND_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let robot_code = required_str(&obj, "robotCode")?;
    let conversation_id = required_str(&obj, "openConversationId")?;
    let msg_key = required_str(&obj, "msgKey")?;
    let param = msg_param(&obj)?;
    inner.check_robot(&app, robot_code)?;
    let (msgtype, content, title) = template_content(msg_key, &param)?;
    let accepted = inner.accept(SentMessage {
        via: Via::GroupSend,
        robot_code: Some(robot_code.to_owned()),
        conversation_id: Some(conversation_id.to_owned()),
        user_ids: Vec::new(),
        msgtype,
        content,
        title,
        at_user_ids: Vec::new(),
        received_at_ms: shared::now_ms(),
    });
    accepted.map_err(SendRefused::openapi)?;
    Ok(ok_json(json!({ "processQueryKey": query_key() })))
}

async fn oto_send(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Reply {
    let app = inner.open_api(&headers, OTO_SEND_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let robot_code = required_str(&obj, "robotCode")?;
    let user_ids = match obj.get("userIds") {
        None | Some(Value::Null) => return Err(missing_parameter("userIds")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .filter(|ids| !ids.is_empty() && ids.iter().all(|id| !id.is_empty()))
            .ok_or_else(|| invalid_parameter("userIds", "userIds 必须是非空字符串数组"))?,
        Some(_) => {
            return Err(invalid_parameter("userIds", "userIds 必须是非空字符串数组"));
        }
    };
    if user_ids.len() > MAX_OTO_USER_IDS {
        return Err(invalid_parameter(
            "userIds",
            &format!("userIds 最多{MAX_OTO_USER_IDS}个"),
        ));
    }
    let msg_key = required_str(&obj, "msgKey")?;
    let param = msg_param(&obj)?;
    inner.check_robot(&app, robot_code)?;
    let (msgtype, content, title) = template_content(msg_key, &param)?;
    let accepted = inner.accept(SentMessage {
        via: Via::OtoSend,
        robot_code: Some(robot_code.to_owned()),
        conversation_id: None,
        user_ids,
        msgtype,
        content,
        title,
        at_user_ids: Vec::new(),
        received_at_ms: shared::now_ms(),
    });
    accepted.map_err(SendRefused::openapi)?;
    Ok(ok_json(json!({
        "processQueryKey": query_key(),
        "invalidStaffIdList": [],
        "flowControlledStaffIdList": [],
        "filteredStaffIdList": [],
    })))
}

async fn send_by_session(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let token = crate::query_param(query.as_deref(), "session").unwrap_or_default();
    let conversation_id = {
        let state = inner.lock();
        match state.sessions.get(&token) {
            Some(s) if s.expires_at_ms > shared::now_ms() => s.conversation_id.clone(),
            _ => return Err(oapi_error(300_001, "session is not exist")),
        }
    };
    if !is_json_content_type(&headers) {
        return Err(oapi_error(43004, "无效的HTTP HEADER Content-Type"));
    }
    if body.len() > MAX_WEBHOOK_BODY_BYTES {
        return Err(oapi_error(460_101, "body 大小不合法，不能超过20000bytes"));
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&body) else {
        return Err(oapi_error(40035, "不合法的参数: body is not a JSON object"));
    };
    let msgtype = obj
        .get("msgtype")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| oapi_error(40035, "缺少参数 msgtype"))?;
    let section = obj.get(msgtype).and_then(Value::as_object);
    let (content, title) = match msgtype {
        "text" => {
            let content = section
                .and_then(|s| s.get("content"))
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| oapi_error(40035, "缺少参数 text.content"))?;
            (content.to_owned(), None)
        }
        "markdown" => {
            let title = section
                .and_then(|s| s.get("title"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| oapi_error(40035, "缺少参数 markdown.title"))?;
            let text = section
                .and_then(|s| s.get("text"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| oapi_error(40035, "缺少参数 markdown.text"))?;
            (text.to_owned(), Some(title.to_owned()))
        }
        "actionCard" | "link" | "feedCard" => {
            let section =
                section.ok_or_else(|| oapi_error(40035, &format!("缺少参数 {msgtype}")))?;
            let title = section
                .get("title")
                .and_then(Value::as_str)
                .map(str::to_owned);
            (Value::Object(section.clone()).to_string(), title)
        }
        other => {
            return Err(oapi_error(
                40035,
                &format!("不合法的参数: unsupported msgtype {other}"),
            ));
        }
    };
    let at_user_ids = obj
        .get("at")
        .and_then(|at| at.get("atUserIds"))
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let accepted = inner.accept(SentMessage {
        via: Via::SessionWebhook,
        robot_code: None,
        conversation_id: Some(conversation_id),
        user_ids: Vec::new(),
        msgtype: msgtype.to_owned(),
        content,
        title,
        at_user_ids,
        received_at_ms: shared::now_ms(),
    });
    accepted.map_err(SendRefused::webhook)?;
    Ok(ok_json(json!({ "errcode": 0, "errmsg": "ok" })))
}

async fn not_found() -> Refusal {
    gateway_error(
        StatusCode::NOT_FOUND,
        "InvalidAction.NotFound",
        "Specified api is not found, please check your url and method.",
    )
}

// ---- helpers -------------------------------------------------------------------------------

/// Parses the body as a JSON object if the content type says JSON (as the gateway requires).
fn json_object(headers: &HeaderMap, body: &[u8]) -> Option<Map<String, Value>> {
    if !is_json_content_type(headers) || body.is_empty() {
        return None;
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, Refusal> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(missing_parameter(key)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(missing_parameter(key)),
        Some(_) => Err(invalid_parameter(key, &format!("{key} 必须是字符串"))),
    }
}

/// `msgParam` must be a JSON-encoded *string* holding an object, as the real API insists.
fn msg_param(obj: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let raw = required_str(obj, "msgParam")?;
    match serde_json::from_str(raw) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(invalid_parameter(
            "msgParam",
            "msgParam 必须是JSON对象序列化后的字符串",
        )),
    }
}

/// Checks a template's parameters; returns (msgtype, content, title) for the record.
fn template_content(
    msg_key: &str,
    param: &Map<String, Value>,
) -> Result<(String, String, Option<String>), Refusal> {
    let field = |name: &str| -> Result<String, Refusal> {
        param
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| invalid_parameter("msgParam", &format!("msgParam 缺少参数 {name}")))
    };
    match msg_key {
        "sampleText" => Ok(("text".to_owned(), field("content")?, None)),
        "sampleMarkdown" => Ok(("markdown".to_owned(), field("text")?, Some(field("title")?))),
        other => Ok((
            other.to_owned(),
            Value::Object(param.clone()).to_string(),
            param
                .get("title")
                .and_then(Value::as_str)
                .map(str::to_owned),
        )),
    }
}

fn ok_json(value: Value) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

/// A request the fake refuses, in the style of the route that refused it.
#[derive(Debug)]
enum Refusal {
    /// New gateway: non-2xx with `{code, message, requestid}`.
    Gateway {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// Oapi style: HTTP 200 with a non-zero `errcode`.
    Oapi { errcode: i64, errmsg: String },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::Gateway {
                status,
                code,
                message,
            } => {
                let request_id = uuid::Uuid::new_v4().hyphenated().to_string().to_uppercase();
                (
                    status,
                    axum::Json(
                        json!({ "code": code, "message": message, "requestid": request_id }),
                    ),
                )
                    .into_response()
            }
            Self::Oapi { errcode, errmsg } => {
                ok_json(json!({ "errcode": errcode, "errmsg": errmsg }))
            }
        }
    }
}

fn gateway_error(status: StatusCode, code: &str, message: &str) -> Refusal {
    Refusal::Gateway {
        status,
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

fn oapi_error(errcode: i64, errmsg: &str) -> Refusal {
    Refusal::Oapi {
        errcode,
        errmsg: errmsg.to_owned(),
    }
}

fn body_is_mandatory() -> Refusal {
    gateway_error(
        StatusCode::BAD_REQUEST,
        "MissingParameter",
        "body is mandatory for this action.",
    )
}

fn missing_parameter(name: &str) -> Refusal {
    gateway_error(
        StatusCode::BAD_REQUEST,
        &format!("Missing{name}"),
        &format!("{name} is mandatory for this action."),
    )
}

fn invalid_parameter(name: &str, message: &str) -> Refusal {
    gateway_error(
        StatusCode::BAD_REQUEST,
        &format!("InvalidParameter.{name}"),
        message,
    )
}

/// Why a well-formed send was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendRefused {
    /// A pending `fail_next_sends` fault.
    Throttled,
    /// `set_send_outage(true)`.
    Outage,
}

impl SendRefused {
    /// As the OpenAPI gateway answers it.
    fn openapi(self) -> Refusal {
        match self {
            Self::Throttled => throttled(),
            Self::Outage => service_unavailable(),
        }
    }

    /// As the sessionWebhook answers it.
    fn webhook(self) -> Refusal {
        match self {
            Self::Throttled => oapi_error(130_101, "send too fast, exceed 20 times per minute"),
            Self::Outage => service_unavailable(),
        }
    }
}

fn service_unavailable() -> Refusal {
    gateway_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "The request has failed due to a temporary failure of the server.",
    )
}

fn throttled() -> Refusal {
    gateway_error(
        StatusCode::FORBIDDEN,
        QPS_LIMIT_CODE,
        "该应用调用接口的QPS超过限制，请降低调用频率",
    )
}

fn query_key() -> String {
    STANDARD.encode(uuid::Uuid::new_v4().as_bytes())
}

fn short_hash(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    STANDARD.encode(digest)[..32].to_owned()
}

/// An encrypted-looking DingTalk id (`$:LWCP_v1:$…`), stable for a given seed.
fn lwcp_id(seed: &str) -> String {
    format!("$:LWCP_v1:${}", short_hash(seed))
}

/// The 1:1 conversation id the fake gives a (robot, user) pair: `cid…==`, deterministic.
pub fn one_to_one_conversation_id(robot_code: &str, staff_id: &str) -> String {
    format!(
        "cid{}==",
        &short_hash(&format!("{robot_code}/{staff_id}"))[..22]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fake() -> FakeDingTalk {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        FakeDingTalk::start(addr, vec![FakeApp::new("app1", "secret1")])
            .await
            .unwrap()
    }

    async fn token(client: &reqwest::Client, dt: &FakeDingTalk) -> String {
        let v: Value = client
            .post(format!("{}/v1.0/oauth2/accessToken", dt.base_url()))
            .json(&json!({ "appKey": "app1", "appSecret": "secret1" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["expireIn"], 7200);
        v["accessToken"].as_str().unwrap().to_owned()
    }

    async fn group_send_with(
        client: &reqwest::Client,
        dt: &FakeDingTalk,
        token: &str,
        body: Value,
    ) -> (u16, Value) {
        let resp = client
            .post(format!("{}/v1.0/robot/groupMessages/send", dt.base_url()))
            .header(ACCESS_TOKEN_HEADER, token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn token_is_reused_until_revoked_and_revoked_token_is_rejected() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let first = token(&client, &dt).await;
        assert_eq!(token(&client, &dt).await, first);
        assert_eq!(dt.token_fetches(), 2);
        assert_eq!(dt.token_fetches_for("app1"), 2);

        dt.revoke_tokens();
        let body = json!({
            "robotCode": "app1", "openConversationId": "cid1==", "msgKey": "sampleText",
            "msgParam": "{\"content\":\"hi\"}",
        });
        let (status, v) = group_send_with(&client, &dt, &first, body.clone()).await;
        assert_eq!(status, 400);
        assert_eq!(v["code"], "InvalidAuthentication");

        let second = token(&client, &dt).await;
        assert_ne!(second, first);
        let (status, v) = group_send_with(&client, &dt, &second, body).await;
        assert_eq!(status, 200, "{v}");
        assert!(v["processQueryKey"].is_string());
        let sent = dt.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].via, Via::GroupSend);
        assert_eq!(sent[0].conversation_id.as_deref(), Some("cid1=="));
        assert_eq!(sent[0].content, "hi");
    }

    #[tokio::test]
    async fn bad_token_requests_get_gateway_errors() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let url = format!("{}/v1.0/oauth2/accessToken", dt.base_url());
        let form = client
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("appKey=app1&appSecret=secret1")
            .send()
            .await
            .unwrap();
        assert_eq!(form.status(), 400);
        let v: Value = form.json().await.unwrap();
        assert_eq!(v["code"], "MissingParameter");
        let wrong = client
            .post(&url)
            .json(&json!({ "appKey": "app1", "appSecret": "nope" }))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 400);
        assert_eq!(dt.token_fetches(), 0);
    }

    #[tokio::test]
    async fn msg_param_as_object_is_rejected() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let token = token(&client, &dt).await;
        let (status, v) = group_send_with(
            &client,
            &dt,
            &token,
            json!({
                "robotCode": "app1", "openConversationId": "cid1==", "msgKey": "sampleText",
                "msgParam": { "content": "hi" },
            }),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(v["code"], "InvalidParameter.msgParam");
        let (status, v) = group_send_with(
            &client,
            &dt,
            &token,
            json!({
                "robotCode": "other", "openConversationId": "cid1==", "msgKey": "sampleText",
                "msgParam": "{\"content\":\"hi\"}",
            }),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(dt.sent().is_empty());
    }

    #[tokio::test]
    async fn oto_send_is_recorded_and_throttling_is_injected() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let token = token(&client, &dt).await;
        let url = format!("{}/v1.0/robot/oToMessages/batchSend", dt.base_url());
        let body = json!({
            "robotCode": "app1", "userIds": ["u1"], "msgKey": "sampleMarkdown",
            "msgParam": "{\"title\":\"T\",\"text\":\"## hi\"}",
        });
        dt.fail_next_sends(1);
        let throttled = client
            .post(&url)
            .header(ACCESS_TOKEN_HEADER, &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(throttled.status(), 403);
        let v: Value = throttled.json().await.unwrap();
        assert_eq!(v["code"], "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi");
        let ok = client
            .post(&url)
            .header(ACCESS_TOKEN_HEADER, &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let v: Value = ok.json().await.unwrap();
        assert_eq!(v["flowControlledStaffIdList"], json!([]));
        let sent = dt.wait_for(1, Duration::from_secs(1)).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].via, Via::OtoSend);
        assert_eq!(sent[0].user_ids, vec!["u1".to_owned()]);
        assert_eq!(sent[0].title.as_deref(), Some("T"));
        assert_eq!(sent[0].content, "## hi");
    }

    #[tokio::test]
    async fn an_outage_refuses_every_send_with_503_until_cleared() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let token = token(&client, &dt).await;
        let (webhook, _) = dt.session_webhook("cid1==", Duration::from_secs(60));
        let text = json!({ "msgtype": "text", "text": { "content": "hi" } });
        let group = json!({
            "robotCode": "app1", "openConversationId": "cid1==", "msgKey": "sampleText",
            "msgParam": "{\"content\":\"hi\"}",
        });
        dt.set_send_outage(true);
        let down = client.post(&webhook).json(&text).send().await.unwrap();
        assert_eq!(down.status(), 503);
        let (status, v) = group_send_with(&client, &dt, &token, group.clone()).await;
        assert_eq!(status, 503);
        assert_eq!(v["code"], "ServiceUnavailable");
        assert!(dt.sent().is_empty());
        dt.set_send_outage(false);
        let up: Value = client
            .post(&webhook)
            .json(&text)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(up["errcode"], 0);
        let (status, _) = group_send_with(&client, &dt, &token, group).await;
        assert_eq!(status, 200);
        assert_eq!(dt.sent().len(), 2);
        let later = dt.sent_since(1);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].via, Via::GroupSend);
        assert!(dt.sent_since(2).is_empty() && dt.sent_since(9).is_empty());
    }

    #[tokio::test]
    async fn session_webhook_accepts_until_expiry() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let (url, expires) = dt.session_webhook("cidG==", Duration::from_secs(60));
        assert!(expires > shared::now_ms());
        let v: Value = client
            .post(&url)
            .json(&json!({
                "msgtype": "text", "text": { "content": "hello" },
                "at": { "atUserIds": ["u1"], "isAtAll": false },
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v, json!({ "errcode": 0, "errmsg": "ok" }));
        let sent = dt.sent();
        assert_eq!(sent[0].via, Via::SessionWebhook);
        assert_eq!(sent[0].conversation_id.as_deref(), Some("cidG=="));
        assert_eq!(sent[0].at_user_ids, vec!["u1".to_owned()]);

        let no_title: Value = client
            .post(&url)
            .json(&json!({ "msgtype": "markdown", "markdown": { "text": "x" } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(no_title["errcode"], 40035);
        let big = "x".repeat(MAX_WEBHOOK_BODY_BYTES);
        let too_big: Value = client
            .post(&url)
            .json(&json!({ "msgtype": "text", "text": { "content": big } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(too_big["errcode"], 460_101);

        let (expired_url, _) = dt.session_webhook("cidG==", Duration::ZERO);
        let resp = client
            .post(&expired_url)
            .json(&json!({ "msgtype": "text", "text": { "content": "late" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["errcode"], 300_001);
        dt.expire_sessions();
        let v: Value = client
            .post(&url)
            .json(&json!({ "msgtype": "text", "text": { "content": "after expiry" } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["errcode"], 300_001);
        assert_eq!(dt.sent().len(), 1);
    }

    #[tokio::test]
    async fn callback_body_is_realistic_and_its_webhook_works() {
        let dt = fake().await;
        let spec = CallbackSpec::group("app1", "cidGroup==", "staff1", "你好");
        let body = dt.callback_body(&spec);
        assert_eq!(body["text"]["content"], " 你好");
        assert_eq!(body["conversationType"], "2");
        assert_eq!(body["msgId"], spec.msg_id.as_str());
        assert!(body["createAt"].is_i64());
        assert!(
            body["senderId"]
                .as_str()
                .unwrap()
                .starts_with("$:LWCP_v1:$")
        );
        assert_eq!(body["conversationTitle"], "Parley sim group");
        let expires = body["sessionWebhookExpiredTime"].as_i64().unwrap();
        let create_at = body["createAt"].as_i64().unwrap();
        assert!((expires - create_at - 5_400_000).abs() < 1_000);

        let audio = CallbackSpec {
            msgtype: "audio".into(),
            ..CallbackSpec::one_to_one("app1", "staff1", "speech")
        };
        let body = dt.callback_body(&audio);
        assert_eq!(body["conversationType"], "1");
        assert_eq!(body["content"]["recognition"], "speech");
        assert!(body.get("text").is_none());

        let webhook = body["sessionWebhook"].as_str().unwrap();
        let resp = reqwest::Client::new()
            .post(webhook)
            .json(&json!({ "msgtype": "text", "text": { "content": "reply" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let sent = dt.wait_for(1, Duration::from_secs(1)).await;
        assert_eq!(
            sent[0].conversation_id.as_deref(),
            Some(audio.conversation_id.as_str())
        );
    }

    #[tokio::test]
    async fn expired_token_is_rejected_and_replaced() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        dt.set_token_ttl(0);
        let url = format!("{}/v1.0/oauth2/accessToken", dt.base_url());
        let body = json!({ "appKey": "app1", "appSecret": "secret1" });
        let first: Value = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(first["expireIn"], 0);
        let (status, v) = group_send_with(
            &client,
            &dt,
            first["accessToken"].as_str().unwrap(),
            json!({
                "robotCode": "app1", "openConversationId": "cid1==", "msgKey": "sampleText",
                "msgParam": "{\"content\":\"hi\"}",
            }),
        )
        .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some("InvalidAuthentication"))
        );
        dt.set_token_ttl(DEFAULT_TOKEN_TTL_SECS);
        let second = token(&client, &dt).await;
        assert_ne!(Some(second.as_str()), first["accessToken"].as_str());
    }

    #[tokio::test]
    async fn send_callback_signs_like_dingtalk() {
        let app = Router::new().route(
            "/cb",
            post(|headers: HeaderMap, body: Bytes| async move {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let verified = shared::platform::dingtalk::sign::verify_callback(
                    "secret1",
                    header("timestamp"),
                    header("sign"),
                    shared::now_ms(),
                );
                let json_ct = header("content-type") == Some("application/json; charset=utf-8");
                let parsed = serde_json::from_slice::<Value>(&body).is_ok();
                if verified.is_ok() && json_ct && parsed {
                    StatusCode::OK
                } else {
                    StatusCode::FORBIDDEN
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let dt = fake().await;
        let body = dt.callback_body(&CallbackSpec::one_to_one("app1", "staff1", "hi"));
        let bytes = serde_json::to_vec(&body).unwrap();
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/cb");
        let ok = send_callback(&client, &url, "secret1", &bytes)
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let forged = send_callback(&client, &url, "other", &bytes).await.unwrap();
        assert_eq!(forged.status(), 403);
    }

    #[tokio::test]
    async fn wait_for_returns_what_is_there_at_timeout() {
        let dt = fake().await;
        let started = Instant::now();
        let sent = dt.wait_for(1, Duration::from_millis(50)).await;
        assert!(sent.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn fake_app_parses_key_colon_secret() {
        let app: FakeApp = "k:s:x".parse().unwrap();
        assert_eq!(app, FakeApp::new("k", "s:x"));
        assert!("nokey".parse::<FakeApp>().is_err());
        assert!(!format!("{app:?}").contains("s:x"));
    }
}
