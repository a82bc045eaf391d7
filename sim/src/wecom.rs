//! A faithful fake of WeCom (企业微信) for self-built apps: `gettoken`, `message/send` with
//! its errcodes and limits, and the sending side of app callbacks, encrypted and signed
//! exactly as WeCom does (AES-256-CBC, 32-byte PKCS#7, SHA1 over the sorted values).
//!
//! Like WeCom it answers HTTP 200 with an `errcode` for every API outcome; truncates text
//! and markdown beyond 2048 bytes (recording that it did, so a test can see loss); and
//! silently drops messages beyond 30 per minute from one app to one member.

use super::record::Recorder;
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::platform::wecom::crypto::WecomCrypto;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Content limit of app text and markdown messages, in bytes.
pub const CONTENT_LIMIT_BYTES: usize = 2048;
/// Messages one app may send one member per minute; beyond, WeCom drops them silently.
pub const PER_MEMBER_PER_MINUTE: usize = 30;

/// A self-built app the fake knows.
#[derive(Debug, Clone)]
pub struct FakeWecomApp {
    /// CorpID (`ww…`).
    pub corp_id: String,
    /// The app's Secret.
    pub corp_secret: String,
    /// AgentId.
    pub agent_id: i64,
    /// Callback Token.
    pub token: String,
    /// Callback EncodingAESKey (43 chars).
    pub encoding_aes_key: String,
}

/// A message WeCom accepted from `message/send`.
#[derive(Debug, Clone, Serialize)]
pub struct WecomSent {
    /// `touser`.
    pub user: String,
    /// `agentid`.
    pub agent_id: i64,
    /// `text` or `markdown`.
    pub msgtype: String,
    /// The content as delivered (truncated to 2048 bytes like WeCom).
    pub content: String,
    /// Whether WeCom had to truncate it.
    pub truncated: bool,
    /// Arrival time, ms since epoch.
    pub received_at_ms: i64,
}

/// The fake WeCom server; cheap to clone.
#[derive(Clone)]
pub struct FakeWecom {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeWecom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeWecom")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base_url: String,
    apps: Vec<FakeWecomApp>,
    state: Mutex<WecomState>,
    sent: Recorder<WecomSent>,
    stop: CancellationToken,
}

#[derive(Default)]
struct WecomState {
    /// token → (corp secret it was issued for, expiry).
    tokens: HashMap<String, (String, Instant)>,
    /// corp secret → current token.
    current: HashMap<String, String>,
    fetches: usize,
    /// (agent, user) → send times of the last minute.
    per_member: HashMap<(i64, String), Vec<Instant>>,
    dropped: usize,
}

const TOKEN_TTL: Duration = Duration::from_secs(7200);

fn errcode(code: i64, msg: &str) -> Json<Value> {
    Json(json!({"errcode": code, "errmsg": msg}))
}

impl FakeWecom {
    /// Binds `addr` (port 0 allowed) and serves until [`Self::shutdown`].
    pub async fn start(addr: SocketAddr, apps: Vec<FakeWecomApp>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{}", super::connectable(local)),
            apps,
            state: Mutex::new(WecomState::default()),
            sent: Recorder::default(),
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route("/cgi-bin/gettoken", get(gettoken))
            .route("/cgi-bin/message/send", post(message_send))
            .with_state(inner.clone());
        super::serve_fake(listener, router, inner.stop.clone(), "wecom");
        Ok(Self { inner })
    }

    /// Base URL, e.g. `http://127.0.0.1:9300` (the `api_base` of a bot).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WecomState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Successful `gettoken` calls so far.
    pub fn token_fetches(&self) -> usize {
        self.state().fetches
    }

    /// Invalidates every issued token (next use: errcode 42001, as after an early expiry).
    pub fn revoke_tokens(&self) {
        let mut s = self.state();
        s.tokens.clear();
        s.current.clear();
    }

    /// Messages dropped by the per-member limit.
    pub fn dropped(&self) -> usize {
        self.state().dropped
    }

    /// Every message delivered so far.
    pub fn sent(&self) -> Vec<WecomSent> {
        self.inner.sent.all()
    }

    /// Waits for at least `n` delivered messages or `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<WecomSent> {
        self.inner.sent.wait_for(n, timeout).await
    }

    fn app(&self, corp_id: &str) -> &FakeWecomApp {
        self.inner
            .apps
            .iter()
            .find(|a| a.corp_id == corp_id)
            .expect("callbacks are built for a configured app")
    }

    fn crypto(app: &FakeWecomApp) -> WecomCrypto {
        WecomCrypto::new(&app.token, &app.encoding_aes_key, &app.corp_id)
            .expect("fake apps have valid EncodingAESKeys")
    }

    /// The query string and XML body WeCom would POST to the app's callback URL for the
    /// plaintext message `xml` (see [`text_message`], [`event_message`]).
    pub fn callback(&self, corp_id: &str, xml: &str) -> (String, String) {
        let app = self.app(corp_id);
        let crypto = Self::crypto(app);
        let encrypt = crypto.encrypt(xml);
        let timestamp = (shared::now_ms() / 1000).to_string();
        let nonce = format!("{}", rand::random::<u32>());
        let signature = crypto.signature(&timestamp, &nonce, &encrypt);
        let body = format!(
            "<xml><ToUserName><![CDATA[{}]]></ToUserName><AgentID><![CDATA[{}]]></AgentID><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>",
            app.corp_id, app.agent_id
        );
        (
            format!("msg_signature={signature}&timestamp={timestamp}&nonce={nonce}"),
            body,
        )
    }

    /// The query string of WeCom's URL verification GET for `echo` (echostr percent-encoded).
    pub fn verify_url_query(&self, corp_id: &str, echo: &str) -> String {
        let crypto = Self::crypto(self.app(corp_id));
        let echostr = crypto.encrypt(echo);
        let timestamp = (shared::now_ms() / 1000).to_string();
        let nonce = "1597212914";
        let signature = crypto.signature(&timestamp, nonce, &echostr);
        let encoded: String = url::form_urlencoded::byte_serialize(echostr.as_bytes()).collect();
        format!("msg_signature={signature}&timestamp={timestamp}&nonce={nonce}&echostr={encoded}")
    }
}

/// The decrypted XML of a text message from `from` to app `agent_id` of `corp_id`.
pub fn text_message(
    corp_id: &str,
    agent_id: i64,
    from: &str,
    msg_id: &str,
    content: &str,
) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{corp_id}]]></ToUserName><FromUserName><![CDATA[{from}]]></FromUserName>\
         <CreateTime>{}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content>\
         <MsgId>{msg_id}</MsgId><AgentID>{agent_id}</AgentID></xml>",
        shared::now_ms() / 1000
    )
}

/// The decrypted XML of an event (`enter_agent`, `subscribe`, …) from `from`.
pub fn event_message(corp_id: &str, agent_id: i64, from: &str, event: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{corp_id}]]></ToUserName><FromUserName><![CDATA[{from}]]></FromUserName>\
         <CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>\
         <EventKey><![CDATA[]]></EventKey><AgentID>{agent_id}</AgentID></xml>",
        shared::now_ms() / 1000
    )
}

#[derive(Deserialize)]
struct TokenQuery {
    corpid: Option<String>,
    corpsecret: Option<String>,
}

async fn gettoken(State(inner): State<Arc<Inner>>, Query(q): Query<TokenQuery>) -> Json<Value> {
    let (Some(corp_id), Some(secret)) = (q.corpid, q.corpsecret) else {
        return errcode(41004, "corpsecret missing");
    };
    let Some(app) = inner.apps.iter().find(|a| a.corp_id == corp_id) else {
        return errcode(40013, "invalid corpid");
    };
    if app.corp_secret != secret {
        return errcode(40001, "invalid credential");
    }
    let mut s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    s.fetches += 1;
    let now = Instant::now();
    let current = s
        .current
        .get(&secret)
        .filter(|t| s.tokens.get(*t).is_some_and(|(_, exp)| *exp > now))
        .cloned();
    let token = match current {
        Some(t) => t,
        None => {
            let t = format!("wx-token-{:016x}", rand::random::<u64>());
            s.tokens
                .insert(t.clone(), (secret.clone(), now + TOKEN_TTL));
            s.current.insert(secret, t.clone());
            t
        }
    };
    Json(
        json!({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": TOKEN_TTL.as_secs()}),
    )
}

#[derive(Deserialize)]
struct SendQuery {
    access_token: Option<String>,
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn message_send(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<SendQuery>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let Some(token) = q.access_token.filter(|t| !t.is_empty()) else {
        return errcode(41001, "access_token missing");
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return errcode(47001, "data format error");
    };
    let mut s = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let Some((secret, expiry)) = s.tokens.get(&token).cloned() else {
        return errcode(42001, "access_token expired");
    };
    if expiry <= Instant::now() {
        return errcode(42001, "access_token expired");
    }
    let Some(agent_id) = v["agentid"].as_i64() else {
        return errcode(40056, "invalid agentid");
    };
    let app_ok = inner
        .apps
        .iter()
        .any(|a| a.corp_secret == secret && a.agent_id == agent_id);
    if !app_ok {
        return errcode(40056, "invalid agentid");
    }
    let user = v["touser"].as_str().unwrap_or_default().to_string();
    if user.is_empty() {
        return errcode(40003, "invalid userid");
    }
    let msgtype = v["msgtype"].as_str().unwrap_or_default().to_string();
    let content = match msgtype.as_str() {
        "text" => v["text"]["content"].as_str(),
        "markdown" => v["markdown"]["content"].as_str(),
        _ => return errcode(40008, "invalid message type"),
    }
    .unwrap_or_default();
    if content.is_empty() {
        return errcode(44004, "empty content");
    }
    let now = Instant::now();
    let window = s.per_member.entry((agent_id, user.clone())).or_default();
    window.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
    if window.len() >= PER_MEMBER_PER_MINUTE {
        // WeCom answers ok and never delivers.
        s.dropped += 1;
        return Json(json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": "dropped"}));
    }
    window.push(now);
    drop(s);
    let delivered = truncate(content, CONTENT_LIMIT_BYTES);
    inner.sent.push(WecomSent {
        user,
        agent_id,
        msgtype,
        content: delivered.to_string(),
        truncated: delivered.len() < content.len(),
        received_at_ms: shared::now_ms(),
    });
    Json(
        json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "invalidparty": "", "invalidtag": "",
                "unlicenseduser": "", "msgid": format!("msg{:x}", rand::random::<u64>())}),
    )
}
