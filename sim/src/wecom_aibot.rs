//! A faithful fake of WeCom's side of an AI bot (企业微信智能机器人, API mode).
//!
//! Here WeCom is the client: it POSTs encrypted JSON callbacks to the bot's URL
//! (`?msg_signature&timestamp&nonce`, body `{"encrypt":…}`, receive id `""`) and reads the
//! encrypted passive reply (`{"encrypt","msgsignature","timestamp","nonce"}`). When the bot
//! answers a message with an unfinished `stream`, WeCom keeps sending stream-refresh
//! callbacks, one at a time and each with a fresh `msgid`, until a reply says
//! `finish:true` or six minutes have passed since the user's message; a refresh that is
//! not answered within 5 s counts as failed and WeCom goes on. [`FakeAibot::converse`]
//! plays that loop; [`FakeAibot::send`] is one callback.
//!
//! Every reply is checked as strictly as the documents allow (status, envelope, nonce,
//! signature, receive id, reply type, the 20 480-byte stream limit) and a violation is an
//! error, never silently accepted. The fake also hosts the one-shot `response_url`
//! (`POST /cgi-bin/aibot/response?response_code=…`), valid for an hour, and records
//! every post to it.

use super::record::Recorder;
use anyhow::{Context, anyhow, bail};
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::post;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::platform::wecom::crypto::{CryptoError, WecomCrypto};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Limit of a stream reply's `content` and of a `response_url` markdown, in UTF-8 bytes.
pub const STREAM_CONTENT_LIMIT: usize = 20_480;
/// How long a `response_url` stays usable.
pub const RESPONSE_URL_TTL: Duration = Duration::from_secs(3600);
/// Images a final stream reply may carry in `stream.msg_item`.
const MSG_ITEM_LIMIT: usize = 10;

/// An AI bot the fake knows (its API-mode callback settings).
#[derive(Debug, Clone)]
pub struct FakeAibotApp {
    /// Callback Token.
    pub token: String,
    /// Callback EncodingAESKey (43 chars).
    pub encoding_aes_key: String,
    /// The bot's `aibotid`, put into every callback.
    pub aibot_id: String,
}

/// How the fake paces stream refreshes; see [`FakeAibot::set_options`].
#[derive(Debug, Clone)]
pub struct AibotOptions {
    /// Pause between refresh callbacks, counted from the previous callback (default 1 s);
    /// a refresh is never sent before the previous reply arrived.
    pub refresh_interval: Duration,
    /// How long after the user's message WeCom keeps refreshing (default 360 s).
    pub window: Duration,
    /// How long WeCom waits for any reply (default 5 s); a later reply is a failure.
    pub reply_timeout: Duration,
    /// `Some(n)`: stop after `n` refresh callbacks (failed ones included), to simulate
    /// WeCom giving up early (default `None`).
    pub max_refreshes: Option<usize>,
}

impl Default for AibotOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(1),
            window: Duration::from_secs(360),
            reply_timeout: Duration::from_secs(5),
            max_refreshes: None,
        }
    }
}

/// One POST to a `response_url`, accepted or not.
#[derive(Debug, Clone, Serialize)]
pub struct ResponsePost {
    /// The `response_code` of the URL (empty if missing).
    pub code: String,
    /// The body's `msgtype` (empty if the body was not JSON).
    pub msgtype: String,
    /// `markdown.content` as posted (empty if absent).
    pub content: String,
    /// The errcode answered: 0 accepted, else 40029, 40058, 40008 or 44004.
    pub errcode: i64,
    /// Arrival time, ms since epoch.
    pub at_ms: i64,
}

impl ResponsePost {
    /// Whether WeCom accepted (and would show) the message.
    pub fn accepted(&self) -> bool {
        self.errcode == 0
    }
}

/// The decrypted content of a passive reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HTTP 200 with an empty body: no reply.
    Empty,
    /// `{"msgtype":"stream","stream":{…}}`; absent fields read as `""` / `false`.
    Stream {
        /// `stream.id`.
        id: String,
        /// `stream.finish`.
        finish: bool,
        /// `stream.content`: the full text so far.
        content: String,
    },
    /// `{"msgtype":"text","text":{"content":…}}` (welcome messages only).
    Text {
        /// `text.content`.
        content: String,
    },
}

impl Reply {
    /// The content shown to the user, if the reply has one.
    pub fn content(&self) -> Option<&str> {
        match self {
            Reply::Empty => None,
            Reply::Stream { content, .. } | Reply::Text { content } => Some(content),
        }
    }
}

/// A checked, decrypted passive reply.
#[derive(Debug, Clone)]
pub struct PassiveReply {
    /// HTTP status (always 200: anything else is an error).
    pub status: u16,
    /// What the bot answered.
    pub reply: Reply,
    /// From sending the callback to having read the whole reply.
    pub latency: Duration,
}

/// One answered stream refresh.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// When the refresh callback was sent, since the user's message.
    pub at: Duration,
    /// How long the reply took.
    pub latency: Duration,
    /// `stream.finish` of the reply.
    pub finish: bool,
    /// `stream.content` of the reply.
    pub content: String,
}

/// A message and everything WeCom did after it (see [`FakeAibot::converse`]).
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The reply to the message itself.
    pub first: PassiveReply,
    /// The stream id of the first reply, if it was a stream.
    pub stream_id: Option<String>,
    /// Answered refreshes, in order (failed ones are only counted).
    pub refreshes: Vec<Refresh>,
    /// Whether a stream reply said `finish:true`.
    pub finished: bool,
    /// The content of the `finish:true` reply.
    pub final_content: Option<String>,
    /// The message's `response_url`, for a bot that missed the window.
    pub response_url: Option<String>,
    /// Refreshes not answered in time, not answered at all (connection error) or answered
    /// with an empty body.
    pub failed_refreshes: usize,
}

impl Exchange {
    /// Every content the user saw, in order: the first reply's, then each refresh's.
    pub fn contents(&self) -> Vec<String> {
        self.first
            .reply
            .content()
            .into_iter()
            .map(str::to_owned)
            .chain(self.refreshes.iter().map(|r| r.content.clone()))
            .collect()
    }

    /// Whether each content extends the one before (stream content is cumulative).
    pub fn is_cumulative(&self) -> bool {
        self.contents().windows(2).all(|w| w[1].starts_with(&w[0]))
    }
}

/// Where a message was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chat {
    /// A single (1:1) chat with the bot.
    Single,
    /// A group chat, by `chatid`.
    Group(String),
}

impl Chat {
    /// The chat of a plaintext callback (`chatid` present: a group).
    pub fn of(msg: &Value) -> Chat {
        match msg["chatid"].as_str() {
            Some(id) => Chat::Group(id.to_owned()),
            None => Chat::Single,
        }
    }
}

/// A fresh `msgid` in WeCom's shape (base64 of 20 random bytes).
pub fn new_msgid() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 20]>())
}

fn base(msgid: &str, chat: &Chat, userid: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("msgid".into(), json!(msgid));
    if let Chat::Group(id) = chat {
        m.insert("chatid".into(), json!(id));
    }
    let chattype = match chat {
        Chat::Single => "single",
        Chat::Group(_) => "group",
    };
    m.insert("chattype".into(), json!(chattype));
    m.insert("from".into(), json!({"userid": userid}));
    m
}

/// The plaintext of a user message of any type: `body` goes under the key `msgtype`
/// (e.g. `"voice", json!({"content": "ASR text"})`, `"mixed", json!({"msg_item": […]})`,
/// `"image"`/`"file"`, `json!({"url": …})`). `aibotid` is filled in when sent.
pub fn message(
    msgid: &str,
    chat: Chat,
    userid: &str,
    response_url: &str,
    msgtype: &str,
    body: Value,
) -> Value {
    let mut m = base(msgid, &chat, userid);
    m.insert("response_url".into(), json!(response_url));
    m.insert("msgtype".into(), json!(msgtype));
    m.insert(msgtype.into(), body);
    Value::Object(m)
}

/// The plaintext of a text message; in a group the content should start with
/// `"@BotName "` as WeCom's does (the caller includes it). `aibotid` is filled in when sent.
pub fn text_message(
    msgid: &str,
    chat: Chat,
    userid: &str,
    content: &str,
    response_url: &str,
) -> Value {
    message(
        msgid,
        chat,
        userid,
        response_url,
        "text",
        json!({"content": content}),
    )
}

/// `msg` quoting an earlier text message (`"quote":{"msgtype":"text","text":{…}}`).
pub fn with_quote(mut msg: Value, quoted_text: &str) -> Value {
    msg["quote"] = json!({"msgtype": "text", "text": {"content": quoted_text}});
    msg
}

/// The plaintext of an event (`enter_chat`, …) in a single chat, with `create_time` now.
/// `aibotid` is filled in when sent.
pub fn event_message(msgid: &str, userid: &str, eventtype: &str) -> Value {
    let mut m = base(msgid, &Chat::Single, userid);
    m.insert("create_time".into(), json!(shared::now_ms() / 1000));
    m.insert("msgtype".into(), json!("event"));
    m.insert("event".into(), json!({"eventtype": eventtype}));
    Value::Object(m)
}

/// The plaintext of a stream-refresh callback for `stream_id` (`msgid` must be fresh).
/// `aibotid` is filled in when sent.
pub fn refresh_message(msgid: &str, chat: &Chat, userid: &str, stream_id: &str) -> Value {
    let mut m = base(msgid, chat, userid);
    m.insert("msgtype".into(), json!("stream"));
    m.insert("stream".into(), json!({"id": stream_id}));
    Value::Object(m)
}

/// The fake WeCom AI-bot platform; cheap to clone.
#[derive(Clone)]
pub struct FakeAibot {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeAibot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self
            .inner
            .apps
            .iter()
            .map(|a| a.aibot_id.as_str())
            .collect();
        f.debug_struct("FakeAibot")
            .field("base_url", &self.inner.base_url)
            .field("aibot_ids", &ids)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base_url: String,
    apps: Vec<FakeAibotApp>,
    options: Mutex<AibotOptions>,
    /// response_code → its state.
    codes: Mutex<HashMap<String, ResponseCode>>,
    posts: Recorder<ResponsePost>,
    client: reqwest::Client,
    stop: CancellationToken,
}

struct ResponseCode {
    expires_at: std::time::Instant,
    used: bool,
}

/// How one callback went wrong: WeCom retries past a transport failure (timeout,
/// connection error) but a violation is the bot's bug.
enum Failure {
    Transport(anyhow::Error),
    Violation(anyhow::Error),
}

impl Failure {
    fn into_error(self) -> anyhow::Error {
        match self {
            Failure::Transport(e) | Failure::Violation(e) => e,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn with_query(url: &str, query: &str) -> String {
    match (query.is_empty(), url.contains('?')) {
        (true, _) => url.to_owned(),
        (false, true) => format!("{url}&{query}"),
        (false, false) => format!("{url}?{query}"),
    }
}

/// `plain` with `aibotid` set to `aibot_id` unless it has one.
fn with_aibotid(plain: &Value, aibot_id: &str) -> Value {
    let mut plain = plain.clone();
    if let Some(m) = plain.as_object_mut() {
        m.entry("aibotid").or_insert_with(|| json!(aibot_id));
    }
    plain
}

fn crypto(app: &FakeAibotApp) -> WecomCrypto {
    WecomCrypto::new(&app.token, &app.encoding_aes_key, "")
        .expect("FakeAibot::start checked every EncodingAESKey")
}

impl FakeAibot {
    /// Binds `addr` (port 0 allowed) for the `response_url` endpoint and serves until
    /// [`Self::shutdown`]. Fails if an app's EncodingAESKey is invalid.
    pub async fn start(addr: SocketAddr, apps: Vec<FakeAibotApp>) -> std::io::Result<Self> {
        for app in &apps {
            if WecomCrypto::new(&app.token, &app.encoding_aes_key, "").is_err() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("invalid EncodingAESKey for AI bot {}", app.aibot_id),
                ));
            }
        }
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{}", super::connectable(local)),
            apps,
            options: Mutex::new(AibotOptions::default()),
            codes: Mutex::new(HashMap::new()),
            posts: Recorder::default(),
            client,
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route("/cgi-bin/aibot/response", post(response_url))
            .with_state(inner.clone());
        super::serve_fake(listener, router, inner.stop.clone(), "wecom_aibot");
        Ok(Self { inner })
    }

    /// Base URL, e.g. `http://127.0.0.1:9400` (the `api_base` of a bot).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    /// Replaces the refresh pacing (applies to callbacks started afterwards).
    pub fn set_options(&self, options: AibotOptions) {
        *lock(&self.inner.options) = options;
    }

    /// The current refresh pacing.
    pub fn options(&self) -> AibotOptions {
        lock(&self.inner.options).clone()
    }

    /// A fresh one-shot `{base}/cgi-bin/aibot/response?response_code=…`, valid for
    /// [`RESPONSE_URL_TTL`].
    pub fn new_response_url(&self) -> String {
        let code = format!("{:032x}", rand::random::<u128>());
        lock(&self.inner.codes).insert(
            code.clone(),
            ResponseCode {
                expires_at: std::time::Instant::now() + RESPONSE_URL_TTL,
                used: false,
            },
        );
        format!(
            "{}/cgi-bin/aibot/response?response_code={code}",
            self.inner.base_url
        )
    }

    /// Lets every `response_url` issued so far expire now (as after an hour).
    pub fn expire_response_urls(&self) {
        let now = std::time::Instant::now();
        for code in lock(&self.inner.codes).values_mut() {
            code.expires_at = now;
        }
    }

    /// Everything POSTed to a `response_url`, in arrival order.
    pub fn posts(&self) -> Vec<ResponsePost> {
        self.inner.posts.all()
    }

    /// Waits for at least `n` posts to `response_url`s or `timeout`.
    pub async fn wait_for_posts(&self, n: usize, timeout: Duration) -> Vec<ResponsePost> {
        self.inner.posts.wait_for(n, timeout).await
    }

    fn app(&self, aibot_id: &str) -> Option<&FakeAibotApp> {
        self.inner.apps.iter().find(|a| a.aibot_id == aibot_id)
    }

    fn known_app(&self, aibot_id: &str) -> &FakeAibotApp {
        self.app(aibot_id)
            .expect("callbacks are built for a configured AI bot")
    }

    /// Encrypts and signs `plain`: (query, body, nonce).
    fn signed(crypto: &WecomCrypto, plain: &Value) -> (String, String, String) {
        let encrypt = crypto.encrypt(&plain.to_string());
        let timestamp = (shared::now_ms() / 1000).to_string();
        let nonce = rand::random_range(1_000_000_000u64..10_000_000_000).to_string();
        let signature = crypto.signature(&timestamp, &nonce, &encrypt);
        (
            format!("msg_signature={signature}&timestamp={timestamp}&nonce={nonce}"),
            json!({"encrypt": encrypt}).to_string(),
            nonce,
        )
    }

    /// The query string and JSON body of a correctly signed callback for `plain` (with
    /// `aibotid` filled in unless present), for tests that tamper with either.
    ///
    /// # Panics
    /// If `aibot_id` is not one of the fake's apps.
    pub fn sign_callback(&self, aibot_id: &str, plain: &Value) -> (String, String) {
        let crypto = crypto(self.known_app(aibot_id));
        let (query, body, _) = Self::signed(&crypto, &with_aibotid(plain, aibot_id));
        (query, body)
    }

    /// The query string of WeCom's URL-verification GET for `echo`: echostr encrypted for
    /// receive id `""` and percent-encoded (`+` as `%2B`, `/` as `%2F`, `=` as `%3D`).
    ///
    /// # Panics
    /// If `aibot_id` is not one of the fake's apps.
    pub fn verify_url_query(&self, aibot_id: &str, echo: &str) -> String {
        let crypto = crypto(self.known_app(aibot_id));
        let echostr = crypto.encrypt(echo);
        let timestamp = (shared::now_ms() / 1000).to_string();
        let nonce = rand::random_range(1_000_000_000u64..10_000_000_000).to_string();
        let signature = crypto.signature(&timestamp, &nonce, &echostr);
        let encoded: String = url::form_urlencoded::byte_serialize(echostr.as_bytes()).collect();
        format!("msg_signature={signature}&timestamp={timestamp}&nonce={nonce}&echostr={encoded}")
    }

    /// POSTs `body` to `url?query` as JSON and reads the answer within `timeout`.
    async fn post_raw(
        &self,
        url: &str,
        query: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> anyhow::Result<(u16, String)> {
        let target = with_query(url, query);
        let exchange = async {
            let resp = self
                .inner
                .client
                .post(&target)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => bail!("no reply from {target} within {timeout:?}"),
            Ok(Err(e)) => Err(anyhow!(e).context(format!("POST {target}"))),
            Ok(Ok((status, bytes))) => Ok((status, String::from_utf8_lossy(&bytes).into_owned())),
        }
    }

    /// Raw variant for negative tests: POSTs `body` to `url?query` (as given, Content-Type
    /// `application/json`) and returns status and body unchecked. Errors only on a
    /// connection failure or no answer within the reply timeout.
    pub async fn send_raw(
        &self,
        url: &str,
        query: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        let timeout = self.options().reply_timeout;
        self.post_raw(url, query, body.to_vec(), timeout).await
    }

    /// One callback: encrypts and signs `plain` (with `aibotid` filled in unless present)
    /// for app `aibot_id`, POSTs it to `url`, checks and decrypts the reply. Errors on
    /// transport failures (no answer within the reply timeout, connection errors) and on
    /// every protocol violation of the reply, with a message naming it.
    pub async fn send(
        &self,
        url: &str,
        aibot_id: &str,
        plain: &Value,
    ) -> anyhow::Result<PassiveReply> {
        let timeout = self.options().reply_timeout;
        self.callback(url, aibot_id, plain, timeout)
            .await
            .map_err(Failure::into_error)
    }

    async fn callback(
        &self,
        url: &str,
        aibot_id: &str,
        plain: &Value,
        timeout: Duration,
    ) -> Result<PassiveReply, Failure> {
        let app = self
            .app(aibot_id)
            .ok_or_else(|| Failure::Violation(anyhow!("no fake AI bot with aibotid {aibot_id}")))?;
        let crypto = crypto(app);
        let plain = with_aibotid(plain, aibot_id);
        let (query, body, nonce) = Self::signed(&crypto, &plain);
        let started = Instant::now();
        let (status, text) = self
            .post_raw(url, &query, body.into_bytes(), timeout)
            .await
            .map_err(Failure::Transport)?;
        let latency = started.elapsed();
        let reply = check_reply(&crypto, &plain, &nonce, status, &text).map_err(|e| {
            Failure::Violation(e.context(format!(
                "reply to a {} callback",
                plain["msgtype"].as_str().unwrap_or("?")
            )))
        })?;
        Ok(PassiveReply {
            status,
            reply,
            latency,
        })
    }

    /// Sends `msg` and, if the reply is an unfinished stream, refreshes it like WeCom until
    /// a reply says `finish:true`, the window has passed or `max_refreshes` is reached.
    /// Returns the whole exchange; a reply that is not a stream ends it at once
    /// (`finished` stays false). Errors if the message callback fails or any reply violates
    /// the protocol; refreshes that time out, fail to connect or get an empty body are
    /// counted in [`Exchange::failed_refreshes`] and the refreshing goes on.
    pub async fn converse(
        &self,
        url: &str,
        aibot_id: &str,
        msg: &Value,
    ) -> anyhow::Result<Exchange> {
        let opts = self.options();
        let started = Instant::now();
        let first = self
            .callback(url, aibot_id, msg, opts.reply_timeout)
            .await
            .map_err(Failure::into_error)
            .context("the message callback")?;
        let mut ex = Exchange {
            stream_id: None,
            refreshes: Vec::new(),
            finished: false,
            final_content: None,
            response_url: msg["response_url"].as_str().map(str::to_owned),
            failed_refreshes: 0,
            first,
        };
        let Reply::Stream {
            id,
            finish,
            content,
        } = ex.first.reply.clone()
        else {
            return Ok(ex);
        };
        ex.stream_id = Some(id.clone());
        if finish {
            ex.finished = true;
            ex.final_content = Some(content);
            return Ok(ex);
        }
        let chat = Chat::of(msg);
        let userid = msg["from"]["userid"].as_str().unwrap_or_default();
        let aibot = msg["aibotid"].as_str().unwrap_or(aibot_id);
        let deadline = started + opts.window;
        let mut last_sent = started;
        let mut attempts = 0;
        while opts.max_refreshes.is_none_or(|max| attempts < max) {
            let next = (last_sent + opts.refresh_interval).max(Instant::now());
            if next >= deadline {
                break;
            }
            tokio::time::sleep_until(next).await;
            attempts += 1;
            last_sent = Instant::now();
            let refresh = with_aibotid(&refresh_message(&new_msgid(), &chat, userid, &id), aibot);
            match self
                .callback(url, aibot_id, &refresh, opts.reply_timeout)
                .await
            {
                Ok(PassiveReply {
                    reply:
                        Reply::Stream {
                            finish, content, ..
                        },
                    latency,
                    ..
                }) => {
                    ex.refreshes.push(Refresh {
                        at: last_sent - started,
                        latency,
                        finish,
                        content: content.clone(),
                    });
                    if finish {
                        ex.finished = true;
                        ex.final_content = Some(content);
                        break;
                    }
                }
                // `check_reply` refuses text replies to refreshes, so this is an empty body.
                Ok(_) => ex.failed_refreshes += 1,
                Err(Failure::Transport(e)) => {
                    tracing::debug!(error = %e, stream = %id, "stream refresh failed");
                    ex.failed_refreshes += 1;
                }
                Err(Failure::Violation(e)) => {
                    return Err(e.context(format!("refresh {attempts} of stream {id}")));
                }
            }
        }
        Ok(ex)
    }
}

/// Checks a passive reply to the callback `plain` that was sent with `nonce`, as WeCom
/// would, and decrypts it.
fn check_reply(
    crypto: &WecomCrypto,
    plain: &Value,
    nonce: &str,
    status: u16,
    body: &str,
) -> anyhow::Result<Reply> {
    if status != 200 {
        let shown: String = body.chars().take(200).collect();
        bail!("WeCom needs HTTP 200, got {status} (body {shown:?})");
    }
    if body.is_empty() {
        return Ok(Reply::Empty);
    }
    let envelope: Value = serde_json::from_str(body)
        .with_context(|| format!("reply body is neither empty nor JSON: {body:.200}"))?;
    let field = |name: &str| {
        envelope[name]
            .as_str()
            .ok_or_else(|| anyhow!("reply envelope has no string \"{name}\": {body:.200}"))
    };
    let encrypt = field("encrypt")?;
    let signature = field("msgsignature")?;
    let reply_nonce = field("nonce")?;
    let timestamp = match &envelope["timestamp"] {
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        other => bail!("reply timestamp must be a JSON integer (seconds), got {other}"),
    };
    if reply_nonce != nonce {
        bail!("reply nonce {reply_nonce:?} does not equal the callback's nonce {nonce:?}");
    }
    let decrypted = crypto
        .decrypt_verified(signature, &timestamp, reply_nonce, encrypt)
        .map_err(|e| match e {
            CryptoError::SignatureMismatch => anyhow!(
                "reply msgsignature does not match SHA1(token, timestamp, nonce, encrypt) (bad signature)"
            ),
            CryptoError::ReceiveIdMismatch => {
                anyhow!("reply was encrypted with a receive id other than \"\" (AI bots use \"\")")
            }
            e => anyhow!("cannot decrypt the reply: {e}"),
        })?;
    let reply: Value = serde_json::from_str(&decrypted)
        .with_context(|| format!("decrypted reply is not JSON: {decrypted:.200}"))?;
    let callback_type = plain["msgtype"].as_str().unwrap_or_default();
    match reply["msgtype"].as_str() {
        Some("stream") => {
            let stream = &reply["stream"];
            if !stream.is_object() {
                bail!("stream reply without a \"stream\" object: {decrypted:.200}");
            }
            let id = optional(stream, "id", Value::as_str)?.unwrap_or_default();
            let finish = optional(stream, "finish", Value::as_bool)?.unwrap_or(false);
            let content = optional(stream, "content", Value::as_str)?.unwrap_or_default();
            if content.len() > STREAM_CONTENT_LIMIT {
                bail!(
                    "stream content is {} bytes, over the limit of {STREAM_CONTENT_LIMIT}",
                    content.len()
                );
            }
            if let Some(items) = stream.get("msg_item") {
                let items = items
                    .as_array()
                    .ok_or_else(|| anyhow!("stream.msg_item must be an array"))?;
                if items.len() > MSG_ITEM_LIMIT {
                    bail!(
                        "stream.msg_item has {} items, at most {MSG_ITEM_LIMIT}",
                        items.len()
                    );
                }
                if !items.is_empty() && !finish {
                    bail!("stream.msg_item images are only allowed on the finish:true reply");
                }
            }
            match callback_type {
                "event" => bail!("a stream reply to an event is not shown by WeCom"),
                "stream" => {
                    let refreshed = plain["stream"]["id"].as_str().unwrap_or_default();
                    if !id.is_empty() && id != refreshed {
                        bail!("refresh of stream {refreshed:?} answered with stream id {id:?}");
                    }
                }
                _ if id.is_empty() => bail!("first stream reply without a stream.id"),
                _ => {}
            }
            Ok(Reply::Stream {
                id: id.to_owned(),
                finish,
                content: content.to_owned(),
            })
        }
        Some("text") => {
            let content = reply["text"]["content"]
                .as_str()
                .ok_or_else(|| anyhow!("text reply without a string text.content"))?;
            let eventtype = plain["event"]["eventtype"].as_str().unwrap_or_default();
            if callback_type != "event" || eventtype != "enter_chat" {
                bail!(
                    "a text reply is only accepted for an enter_chat event, not a {callback_type} callback"
                );
            }
            Ok(Reply::Text {
                content: content.to_owned(),
            })
        }
        Some(other) => bail!(
            "unknown reply msgtype {other:?} (the fake knows stream and text; template cards are not modelled)"
        ),
        None => bail!("decrypted reply has no msgtype: {decrypted:.200}"),
    }
}

/// `v[name]` read with `get`, `None` if absent, an error if present with the wrong type.
fn optional<'a, T>(
    v: &'a Value,
    name: &str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> anyhow::Result<Option<T>> {
    match v.get(name) {
        None => Ok(None),
        Some(x) => get(x)
            .map(Some)
            .ok_or_else(|| anyhow!("stream.{name} has the wrong type: {x}")),
    }
}

#[derive(Deserialize)]
struct ResponseQuery {
    response_code: Option<String>,
}

fn errcode(code: i64, msg: &str) -> Json<Value> {
    Json(json!({"errcode": code, "errmsg": msg}))
}

/// `POST /cgi-bin/aibot/response?response_code=…`. Always HTTP 200 with an errcode:
/// 0 on first valid use; 40029 for an unknown, used or expired code (WeCom does not
/// document which errcode it answers here; 40029 is its generic "invalid code"); 40008
/// for a body that is not JSON or not `markdown`; 40058 for content over 20 480 bytes and
/// 44004 for empty content (both leave the code usable, as does 40008).
async fn response_url(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<ResponseQuery>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let code = q.response_code.unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let msgtype = parsed
        .as_ref()
        .and_then(|v| v["msgtype"].as_str())
        .unwrap_or_default()
        .to_owned();
    let content = parsed
        .as_ref()
        .and_then(|v| v["markdown"]["content"].as_str());
    let (errcode_, errmsg) = {
        let mut codes = lock(&inner.codes);
        match codes.get_mut(&code) {
            Some(c) if !c.used && std::time::Instant::now() < c.expires_at => match content {
                None => (40008, "invalid message type".to_owned()),
                Some(_) if msgtype != "markdown" => (40008, "invalid message type".to_owned()),
                Some(s) if s.len() > STREAM_CONTENT_LIMIT => (
                    40058,
                    format!("markdown.content exceed max length {STREAM_CONTENT_LIMIT}"),
                ),
                Some("") => (44004, "empty content".to_owned()),
                Some(_) => {
                    c.used = true;
                    (0, "ok".to_owned())
                }
            },
            _ => (40029, "invalid response_code".to_owned()),
        }
    };
    inner.posts.push(ResponsePost {
        code,
        msgtype,
        content: content.unwrap_or_default().to_owned(),
        errcode: errcode_,
        at_ms: shared::now_ms(),
    });
    errcode(errcode_, &errmsg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::{IntoResponse, Response};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The key pair of tests/vectors/wecom_aibot.json.
    const TOKEN: &str = "QDG6eK";
    const KEY: &str = "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA";
    const BOT: &str = "AIBOTID";

    fn app() -> FakeAibotApp {
        FakeAibotApp {
            token: TOKEN.into(),
            encoding_aes_key: KEY.into(),
            aibot_id: BOT.into(),
        }
    }

    async fn fake() -> FakeAibot {
        FakeAibot::start("127.0.0.1:0".parse().unwrap(), vec![app()])
            .await
            .unwrap()
    }

    fn fast(max_refreshes: Option<usize>) -> AibotOptions {
        AibotOptions {
            refresh_interval: Duration::from_millis(50),
            window: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(2),
            max_refreshes,
        }
    }

    /// How the test bot spoils its replies.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        WrongNonce,
        BadSignature,
        StringTimestamp,
        WrongReceiveId,
        Status500,
    }

    type Answer = dyn Fn(&Value, usize) -> Option<Value> + Send + Sync;

    /// The bot side, implemented directly on `WecomCrypto` with receive id "".
    struct TestBot {
        crypto: WecomCrypto,
        fault: Fault,
        /// Refresh callbacks seen so far.
        refreshes: AtomicUsize,
        /// Every decrypted callback.
        seen: Mutex<Vec<Value>>,
        /// (refresh number, delay): answer that refresh late.
        slow: Option<(usize, Duration)>,
        /// The plain reply to a callback and its refresh number (0 = not a refresh).
        answer: Box<Answer>,
    }

    async fn bot_handler(
        State(bot): State<Arc<TestBot>>,
        Query(q): Query<HashMap<String, String>>,
        body: axum::body::Bytes,
    ) -> Response {
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        let plain = bot
            .crypto
            .decrypt_verified(
                &q["msg_signature"],
                &q["timestamp"],
                &q["nonce"],
                envelope["encrypt"].as_str().unwrap(),
            )
            .unwrap();
        let plain: Value = serde_json::from_str(&plain).unwrap();
        lock(&bot.seen).push(plain.clone());
        let n = if plain["msgtype"] == "stream" {
            bot.refreshes.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            0
        };
        if let Some((slow, delay)) = bot.slow
            && slow == n
        {
            tokio::time::sleep(delay).await;
        }
        if bot.fault == Fault::Status500 {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response();
        }
        let Some(reply) = (bot.answer)(&plain, n) else {
            return "".into_response();
        };
        let crypto = if bot.fault == Fault::WrongReceiveId {
            WecomCrypto::new(TOKEN, KEY, "wwcorp").unwrap()
        } else {
            bot.crypto.clone()
        };
        let timestamp = shared::now_ms() / 1000;
        let nonce = if bot.fault == Fault::WrongNonce {
            "1".to_owned()
        } else {
            q["nonce"].clone()
        };
        let encrypt = crypto.encrypt(&reply.to_string());
        let signature = if bot.fault == Fault::BadSignature {
            "0".repeat(40)
        } else {
            crypto.signature(&timestamp.to_string(), &nonce, &encrypt)
        };
        let timestamp = if bot.fault == Fault::StringTimestamp {
            json!(timestamp.to_string())
        } else {
            json!(timestamp)
        };
        Json(json!({"encrypt": encrypt, "msgsignature": signature, "timestamp": timestamp, "nonce": nonce}))
            .into_response()
    }

    /// Starts a test bot; returns its callback URL.
    async fn start_bot(
        fault: Fault,
        slow: Option<(usize, Duration)>,
        answer: impl Fn(&Value, usize) -> Option<Value> + Send + Sync + 'static,
    ) -> (String, Arc<TestBot>) {
        let bot = Arc::new(TestBot {
            crypto: WecomCrypto::new(TOKEN, KEY, "").unwrap(),
            fault,
            refreshes: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            slow,
            answer: Box::new(answer),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/wecom/{bot_id}", post(bot_handler))
            .with_state(bot.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (format!("http://{addr}/wecom/ai"), bot)
    }

    fn stream(id: &str, finish: bool, content: &str) -> Value {
        json!({"msgtype": "stream", "stream": {"id": id, "finish": finish, "content": content}})
    }

    /// Answers a message with "d" unfinished, refreshes with "do", "don", then "done".
    fn done_on_third(_: &Value, n: usize) -> Option<Value> {
        let text = ["d", "do", "don", "done"][n.min(3)];
        Some(stream("s1", n >= 3, text))
    }

    async fn post_markdown(url: &str, content: &str) -> i64 {
        let resp = reqwest::Client::new()
            .post(url)
            .json(&json!({"msgtype": "markdown", "markdown": {"content": content}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["errcode"]
            .as_i64()
            .unwrap()
    }

    #[tokio::test]
    async fn response_url_is_one_shot_and_limits_content() {
        let fake = fake().await;
        let url = fake.new_response_url();
        assert!(url.starts_with(&format!(
            "{}/cgi-bin/aibot/response?response_code=",
            fake.base_url()
        )));
        let big = "字".repeat(STREAM_CONTENT_LIMIT / 3 + 1);
        assert_eq!(post_markdown(&url, &big).await, 40058);
        assert_eq!(post_markdown(&url, "final answer").await, 0);
        assert_eq!(post_markdown(&url, "again").await, 40029);
        let unknown = format!(
            "{}/cgi-bin/aibot/response?response_code=nope",
            fake.base_url()
        );
        assert_eq!(post_markdown(&unknown, "hi").await, 40029);
        let other = fake.new_response_url();
        let resp = reqwest::Client::new()
            .post(&other)
            .json(&json!({"msgtype": "news", "news": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.json::<Value>().await.unwrap()["errcode"], 40008);
        fake.expire_response_urls();
        assert_eq!(post_markdown(&other, "late").await, 40029);

        let posts = fake.wait_for_posts(6, Duration::from_secs(1)).await;
        let codes: Vec<i64> = posts.iter().map(|p| p.errcode).collect();
        assert_eq!(codes, [40058, 0, 40029, 40029, 40008, 40029]);
        assert!(posts[1].accepted() && posts[1].msgtype == "markdown");
        assert_eq!(posts[1].content, "final answer");
        assert_eq!(posts[0].code, posts[1].code);
        assert_eq!(posts[3].code, "nope");
        fake.shutdown();
    }

    #[tokio::test]
    async fn converse_refreshes_until_the_stream_finishes() {
        let fake = fake().await;
        fake.set_options(fast(None));
        let (url, bot) = start_bot(Fault::None, None, done_on_third).await;
        let response_url = fake.new_response_url();
        let msg = text_message(
            "m1",
            Chat::Group("CHATID".into()),
            "USERID",
            "@RobotA hello",
            &response_url,
        );
        let ex = fake.converse(&url, BOT, &msg).await.unwrap();
        assert!(ex.finished);
        assert_eq!(ex.stream_id.as_deref(), Some("s1"));
        assert_eq!(ex.refreshes.len(), 3);
        assert_eq!(ex.final_content.as_deref(), Some("done"));
        assert_eq!(ex.response_url.as_deref(), Some(&*response_url));
        assert_eq!(ex.failed_refreshes, 0);
        assert_eq!(ex.contents(), ["d", "do", "don", "done"]);
        assert!(ex.is_cumulative());
        let interval = Duration::from_millis(50);
        assert!(ex.refreshes[0].at >= interval);
        for w in ex.refreshes.windows(2) {
            assert!(w[1].at - w[0].at >= interval, "{:?}", ex.refreshes);
        }

        let seen = lock(&bot.seen).clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0]["aibotid"], BOT);
        assert_eq!(seen[0]["text"]["content"], "@RobotA hello");
        let mut msgids: Vec<&str> = seen.iter().map(|v| v["msgid"].as_str().unwrap()).collect();
        msgids.sort_unstable();
        msgids.dedup();
        assert_eq!(msgids.len(), 4, "every refresh has a fresh msgid");
        for refresh in &seen[1..] {
            assert_eq!(refresh["msgtype"], "stream");
            assert_eq!(refresh["stream"]["id"], "s1");
            assert_eq!(refresh["chatid"], "CHATID");
            assert_eq!(refresh["chattype"], "group");
            assert_eq!(refresh["from"]["userid"], "USERID");
            assert_eq!(refresh["aibotid"], BOT);
        }
        fake.shutdown();
    }

    #[tokio::test]
    async fn converse_stops_after_max_refreshes() {
        let fake = fake().await;
        fake.set_options(AibotOptions {
            refresh_interval: Duration::from_millis(10),
            ..fast(Some(2))
        });
        let (url, bot) = start_bot(Fault::None, None, |_, _| Some(stream("s", false, "…"))).await;
        let msg = text_message("m", Chat::Single, "u", "hi", &fake.new_response_url());
        let ex = fake.converse(&url, BOT, &msg).await.unwrap();
        assert!(!ex.finished && ex.final_content.is_none());
        assert_eq!(ex.refreshes.len(), 2);
        assert_eq!(bot.refreshes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn converse_stops_at_the_end_of_the_window() {
        let fake = fake().await;
        fake.set_options(AibotOptions {
            window: Duration::from_millis(130),
            ..fast(None)
        });
        let (url, _) = start_bot(Fault::None, None, |_, _| Some(stream("s", false, "…"))).await;
        let msg = text_message("m", Chat::Single, "u", "hi", "");
        let ex = fake.converse(&url, BOT, &msg).await.unwrap();
        assert!(!ex.finished);
        // At 50 ms and 100 ms; the next would be at 150 ms, past the window (a slow
        // machine may push the second past it too).
        assert!((1..=2).contains(&ex.refreshes.len()), "{:?}", ex.refreshes);
        assert!(
            ex.refreshes
                .iter()
                .all(|r| r.at < Duration::from_millis(130))
        );
    }

    #[tokio::test]
    async fn a_late_refresh_reply_counts_as_failed_and_refreshing_goes_on() {
        let fake = fake().await;
        fake.set_options(AibotOptions {
            reply_timeout: Duration::from_millis(150),
            ..fast(None)
        });
        let slow = Some((1, Duration::from_millis(400)));
        let (url, _) = start_bot(Fault::None, slow, done_on_third).await;
        let msg = text_message("m", Chat::Single, "u", "hi", "");
        let ex = fake.converse(&url, BOT, &msg).await.unwrap();
        assert!(ex.finished);
        assert_eq!(ex.failed_refreshes, 1);
        assert_eq!(ex.refreshes.len(), 2);
        assert_eq!(ex.contents(), ["d", "don", "done"]);
    }

    #[tokio::test]
    async fn protocol_violations_are_errors() {
        let fake = fake().await;
        fake.set_options(fast(None));
        let msg = text_message("m", Chat::Single, "u", "hi", "");
        let cases = [
            (Fault::WrongNonce, "nonce"),
            (Fault::BadSignature, "bad signature"),
            (Fault::StringTimestamp, "timestamp must be a JSON integer"),
            (Fault::WrongReceiveId, "receive id"),
            (Fault::Status500, "HTTP 200, got 500"),
        ];
        for (fault, expected) in cases {
            let (url, _) = start_bot(fault, None, done_on_third).await;
            let err = fake.send(&url, BOT, &msg).await.unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
        let too_long = "a".repeat(STREAM_CONTENT_LIMIT + 1);
        let (url, _) = start_bot(Fault::None, None, move |_, _| {
            Some(stream("s", false, &too_long))
        })
        .await;
        let err = fake.send(&url, BOT, &msg).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("20481 bytes, over the limit"),
            "{err:#}"
        );
        // Exactly at the limit is fine.
        let at_limit = "a".repeat(STREAM_CONTENT_LIMIT);
        let (url, _) = start_bot(Fault::None, None, move |_, _| {
            Some(stream("s", true, &at_limit))
        })
        .await;
        assert!(fake.send(&url, BOT, &msg).await.is_ok());
        let (url, _) = start_bot(Fault::None, None, |_, _| {
            Some(json!({"msgtype": "text", "text": {"content": "hi"}}))
        })
        .await;
        let err = fake.send(&url, BOT, &msg).await.unwrap_err();
        assert!(format!("{err:#}").contains("enter_chat"), "{err:#}");
        let (url, _) = start_bot(Fault::None, None, |_, _| Some(json!({"msgtype": "news"}))).await;
        let err = fake.send(&url, BOT, &msg).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown reply msgtype"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn welcome_text_and_empty_replies_are_legal() {
        let fake = fake().await;
        let (url, _) = start_bot(Fault::None, None, |plain, _| {
            (plain["msgtype"] == "event")
                .then(|| json!({"msgtype": "text", "text": {"content": "welcome"}}))
        })
        .await;
        let enter = event_message("e1", "u", "enter_chat");
        let reply = fake.send(&url, BOT, &enter).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.reply,
            Reply::Text {
                content: "welcome".into()
            }
        );
        let voice = message(
            "m",
            Chat::Single,
            "u",
            "",
            "voice",
            json!({"content": "hi"}),
        );
        assert_eq!(
            fake.send(&url, BOT, &voice).await.unwrap().reply,
            Reply::Empty
        );
        let ex = fake.converse(&url, BOT, &voice).await.unwrap();
        assert!(ex.stream_id.is_none() && !ex.finished && ex.contents().is_empty());
    }

    #[tokio::test]
    async fn the_reply_check_accepts_the_vector_reply() {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/vectors/wecom_aibot.json")).unwrap();
        let case = &v["cases"][2];
        assert_eq!(case["id"], "aibot_stream_reply");
        let crypto = WecomCrypto::new(TOKEN, KEY, "").unwrap();
        let refresh = refresh_message("m", &Chat::Single, "USERID", "STREAMID");
        let reply = check_reply(
            &crypto,
            &refresh,
            case["nonce"].as_str().unwrap(),
            200,
            case["expected_response_json"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply::Stream {
                id: "STREAMID".into(),
                finish: false,
                content: "**广州**今日天气：29度".into()
            }
        );
    }

    #[tokio::test]
    async fn signed_callbacks_and_url_verification_round_trip() {
        let fake = fake().await;
        let crypto = WecomCrypto::new(TOKEN, KEY, "").unwrap();
        let params = |query: &str| -> HashMap<String, String> {
            url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect()
        };
        let msg = text_message("m", Chat::Single, "u", "hi", "");
        let (query, body) = fake.sign_callback(BOT, &msg);
        let q = params(&query);
        assert!(q["nonce"].chars().all(|c| c.is_ascii_digit()));
        let body: Value = serde_json::from_str(&body).unwrap();
        let plain = crypto
            .decrypt_verified(
                &q["msg_signature"],
                &q["timestamp"],
                &q["nonce"],
                body["encrypt"].as_str().unwrap(),
            )
            .unwrap();
        let plain: Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(plain["aibotid"], BOT);
        assert_eq!(plain["text"]["content"], "hi");

        for i in 0..20 {
            let echo = format!("echo-{i}-{}", "x".repeat(i));
            let query = fake.verify_url_query(BOT, &echo);
            assert!(!query.contains('+'), "{query}");
            let q = params(&query);
            let echoed = crypto
                .verify_url(
                    &q["msg_signature"],
                    &q["timestamp"],
                    &q["nonce"],
                    &q["echostr"],
                )
                .unwrap();
            assert_eq!(echoed, echo);
        }
        fake.shutdown();
    }
}
